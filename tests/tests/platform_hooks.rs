//! The platform's side of the edge: webhooks and the events stream.
//!
//! A hyper server in the test plays the platform: it checks every webhook's `Burrow-Signature`
//! with the secret (the one the edge generated into `state_dir/webhook.secret`, or one the test
//! wrote for `platform.webhook_secret_file`) and records what it was sent. The events stream
//! is read with curl, and once with a raw TCP client that stops reading.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use burrow_edge::platform::Event;
use burrow_tests::relay::Relay;
use burrow_tests::{TestAgent, TestEdge, WAIT, until};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ring::hmac;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

/// The platform's webhook receiver.
struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    received: watch::Receiver<Vec<Value>>,
}

struct Shared {
    /// The signing secret, once the test knows it.
    secret: std::sync::Mutex<Option<Vec<u8>>>,
    /// Answers 500 to this many POSTs first.
    fail_first: usize,
    /// POSTs so far.
    attempts: AtomicUsize,
    /// POSTs whose signature, timestamp or content type was wrong.
    bad: std::sync::Mutex<Vec<String>>,
    /// The events of the accepted POSTs, in order.
    accepted: watch::Sender<Vec<Value>>,
}

impl Receiver {
    /// Listens on loopback; answers 500 to the first `fail_first` POSTs.
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, received) = watch::channel(Vec::new());
        let shared = Arc::new(Shared {
            secret: std::sync::Mutex::new(None),
            fail_first,
            attempts: AtomicUsize::new(0),
            bad: std::sync::Mutex::new(Vec::new()),
            accepted,
        });
        let serving = shared.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let shared = serving.clone();
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(shared.answer(req).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        Receiver {
            addr,
            shared,
            received,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/burrow-events", self.addr)
    }

    fn set_secret(&self, secret: &str) {
        *self.shared.secret.lock().expect("lock") = Some(secret.as_bytes().to_vec());
    }

    /// Waits until `n` events were accepted; all of them.
    async fn events(&self, n: usize) -> Vec<Value> {
        let mut received = self.received.clone();
        let got = tokio::time::timeout(WAIT, received.wait_for(|v| v.len() >= n)).await;
        let all = self.received.borrow().clone();
        assert!(got.is_ok(), "{n} webhooks within {WAIT:?}; got {all:#?}");
        all
    }

    /// An edge from `builder` whose webhooks come here, with `lines` more of its `[platform]`
    /// table, and the secret it generated (`state_dir/webhook.secret`) taken to check them.
    async fn edge(&self, builder: burrow_tests::EdgeBuilder, lines: &str) -> TestEdge {
        let platform = format!("[platform]\nwebhook_url = \"{}\"\n{lines}", self.url());
        let edge = builder.toml(&platform).start().await;
        let file = edge.state_dir.join("webhook.secret");
        let secret =
            std::fs::read_to_string(&file).expect("the edge wrote state_dir/webhook.secret");
        self.set_secret(secret.trim());
        edge
    }

    /// An edge whose webhooks come here, signed with `secret`, which the test writes to a
    /// file of `dir` for `platform.webhook_secret_file` (with `written` after it).
    async fn edge_with_secret(
        &self,
        dir: &std::path::Path,
        secret: &str,
        written: &str,
    ) -> TestEdge {
        let secret_file = dir.join("webhook.secret");
        std::fs::write(&secret_file, format!("{secret}{written}")).expect("write");
        self.set_secret(secret);
        let platform = format!(
            "[platform]\nwebhook_url = \"{}\"\nwebhook_secret_file = \"{}\"",
            self.url(),
            secret_file.display()
        );
        TestEdge::builder().toml(&platform).start().await
    }

    fn bad(&self) -> Vec<String> {
        self.shared.bad.lock().expect("lock").clone()
    }
}

impl Shared {
    /// Checks and records one POST.
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        let signature = req
            .headers()
            .get("burrow-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let json = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/json");
        let post = req.method() == http::Method::POST && req.uri().path() == "/burrow-events";
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let (status, verdict) = match (signature, body) {
            (Some(signature), Ok(body)) if json && post => match self.verify(&signature, &body) {
                Ok(()) if attempt <= self.fail_first => (StatusCode::INTERNAL_SERVER_ERROR, None),
                Ok(()) => (StatusCode::NO_CONTENT, Some(Ok(body))),
                Err(why) => (StatusCode::UNAUTHORIZED, Some(Err(why))),
            },
            _ => (
                StatusCode::BAD_REQUEST,
                Some(Err("not a signed JSON POST".into())),
            ),
        };
        match verdict {
            Some(Ok(body)) => {
                let event: Value = serde_json::from_slice(&body).expect("JSON");
                self.accepted.send_modify(|all| all.push(event));
            }
            Some(Err(why)) => self.bad.lock().expect("lock").push(why),
            None => {}
        }
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        response
    }

    /// What a platform does with `Burrow-Signature: t=..,v1=..`: the HMAC of "t.body" with
    /// the secret, compared in constant time, and a timestamp within five minutes.
    fn verify(&self, header: &str, body: &[u8]) -> Result<(), String> {
        let secret = self.secret.lock().expect("lock").clone();
        let secret = secret.ok_or("a webhook before the test knew the secret")?;
        let (t, v1) = header
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .ok_or_else(|| format!("malformed signature {header:?}"))?;
        let t: u64 = t.parse().map_err(|_| format!("bad t in {header:?}"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        if now.abs_diff(t) > 300 {
            return Err(format!("t={t} is more than 5 minutes from now ({now})"));
        }
        let tag = unhex(v1).ok_or_else(|| format!("v1 is not hex: {header:?}"))?;
        let mut signed = format!("{t}.").into_bytes();
        signed.extend_from_slice(body);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        hmac::verify(&key, &signed, &tag).map_err(|_| format!("wrong signature {header:?}"))
    }
}

/// Lowercase hex to bytes.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The metric line `name{result="..."} N`'s N.
fn counter(edge: &TestEdge, series: &str) -> u64 {
    let e = edge.edge();
    let text = e.metrics.render(&e.registry);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
}

/// Each event's type and devbox, in order.
fn kinds(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let kind = e["type"].as_str().expect("type").to_owned();
            (kind, e["devbox"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

fn pairs(id: &str, kinds: &[&str]) -> Vec<(String, String)> {
    kinds
        .iter()
        .map(|k| ((*k).to_owned(), id.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_announce_agents_and_tunnels_signed_with_the_generated_secret() {
    let receiver = Receiver::start(0).await;
    let edge = receiver.edge(TestEdge::builder(), "").await;
    let file = edge.state_dir.join("webhook.secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the secret is the owner's only");
    }

    // Registering a devbox without a tunnel is not an event; its agent connecting is.
    let devbox = edge.devbox(None).await;
    let id = devbox.id.as_str();
    let agent = TestAgent::start(&edge, &devbox).await;
    let tunnel = format!("/v1/devboxes/{id}/tunnel");
    let (code, _) = edge
        .admin("POST", &tunnel, Some(json!({"auth_mode": "authenticated"})))
        .await;
    assert_eq!(code, 200);
    let (code, _) = edge
        .admin("POST", &tunnel, Some(json!({"auth_mode": "authenticated"})))
        .await;
    assert_eq!(code, 200, "enabled again as it is: no change, no event");
    let (code, _) = edge
        .admin("POST", &format!("{tunnel}/rotate-token"), None)
        .await;
    assert_eq!(code, 200);
    let (code, _) = edge.admin("DELETE", &tunnel, None).await;
    assert_eq!(code, 204);
    agent.stop().await;

    let events = receiver.events(5).await;
    let expected = [
        "agent.connected",
        "tunnel.enabled",
        "tunnel.rotated",
        "tunnel.disabled",
        "agent.disconnected",
    ];
    assert_eq!(kinds(&events), pairs(id, &expected), "{events:#?}");
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e["id"].as_u64().expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let now_ms = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms");
    for event in &events {
        let at = event["at_ms"].as_u64().expect("at_ms");
        assert!(now_ms - at < 60_000, "at_ms is when it happened: {event}");
    }
    assert!(receiver.bad().is_empty(), "{:?}", receiver.bad());
    assert_eq!(
        receiver.shared.attempts.load(Ordering::SeqCst),
        5,
        "one POST each"
    );
    // Counted once the edge has read the receiver's answer.
    until("5 deliveries counted", || async {
        counter(&edge, "burrow_edge_webhooks_total{result=\"delivered\"}") == 5
    })
    .await;
    assert_eq!(
        counter(&edge, "burrow_edge_webhooks_total{result=\"retried\"}"),
        0
    );
    assert_eq!(counter(&edge, "burrow_edge_webhook_dropped_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_three_times_gets_the_event_on_the_fourth_try() {
    let receiver = Receiver::start(3).await;
    let dir = tempfile::tempdir().expect("dir");
    let edge = receiver
        .edge_with_secret(dir.path(), "whsec-from-the-platform", "\n")
        .await;
    assert!(
        !edge.state_dir.join("webhook.secret").exists(),
        "no secret generated when the platform gave one"
    );
    edge.edge().events.emit(Event::wake("box-asleep"));
    edge.edge().events.emit(Event::agent_connected("box-next"));
    let events = receiver.events(2).await;
    assert_eq!(
        kinds(&events),
        [
            ("devbox.wake".to_owned(), "box-asleep".to_owned()),
            ("agent.connected".to_owned(), "box-next".to_owned()),
        ],
        "delivered in order, the first after its retries"
    );
    assert_eq!(
        receiver.shared.attempts.load(Ordering::SeqCst),
        5,
        "4 tries, then 1"
    );
    assert!(
        receiver.bad().is_empty(),
        "every try signed: {:?}",
        receiver.bad()
    );
    until("2 deliveries counted", || async {
        counter(&edge, "burrow_edge_webhooks_total{result=\"delivered\"}") == 2
    })
    .await;
    assert_eq!(
        counter(&edge, "burrow_edge_webhooks_total{result=\"retried\"}"),
        3
    );
    assert_eq!(
        counter(&edge, "burrow_edge_webhooks_total{result=\"failed\"}"),
        0
    );
}

/// One Server-Sent Events message: (id, event, data).
type Message = (u64, String, Value);

/// Reads SSE messages from curl's output until `n` arrived (comments skipped).
async fn read_messages(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    n: usize,
) -> Vec<Message> {
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (None, None, None);
    while out.len() < n {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{n} events within {WAIT:?}; got {out:#?}"))
            .expect("read")
            .unwrap_or_else(|| panic!("the stream ended after {out:#?}"));
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.parse::<u64>().expect("numeric id"));
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(serde_json::from_str::<Value>(v).expect("data is JSON"));
        } else if line.is_empty() {
            if let (Some(id), Some(event), Some(data)) = (id.take(), event.take(), data.take()) {
                out.push((id, event, data));
            }
        } else {
            assert!(line.starts_with(':'), "a comment or a field: {line:?}");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_stream_carries_connects_tunnel_changes_and_disconnects_in_order() {
    let edge = TestEdge::start().await;
    let admin = edge.edge().admin_addr;
    let token = edge.edge().admin_token.expose().to_owned();
    let (code, _) = edge.admin_with("GET", "/v1/events", None, None).await;
    assert_eq!(code, 401, "the admin token is required");
    let (code, _) = edge.admin("POST", "/v1/events", None).await;
    assert_eq!(code, 405);

    let mut curl = tokio::process::Command::new("curl")
        .args(["-sS", "-N", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://{admin}/v1/events"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl runs (install curl)");
    let stdout = curl.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    // The stream's first line: subscribed from here on.
    let first = tokio::time::timeout(WAIT, lines.next_line()).await;
    let first = first.expect("subscribed in time").expect("read");
    assert_eq!(first.as_deref(), Some(": burrow events"));

    let devbox = edge.devbox(Some("open")).await;
    let id = devbox.id.as_str();
    let agent = TestAgent::start(&edge, &devbox).await;
    let tunnel = format!("/v1/devboxes/{id}/tunnel");
    let (code, _) = edge
        .admin("POST", &tunnel, Some(json!({"auth_mode": "authenticated"})))
        .await;
    assert_eq!(code, 200);
    let (code, _) = edge.admin("DELETE", &tunnel, None).await;
    assert_eq!(code, 204);
    agent.stop().await;

    let messages = read_messages(&mut lines, 5).await;
    let expected = [
        "tunnel.enabled",
        "agent.connected",
        "tunnel.enabled",
        "tunnel.disabled",
        "agent.disconnected",
    ];
    let seen: Vec<(String, String)> = messages
        .iter()
        .map(|(_, event, data)| {
            assert_eq!(data["type"].as_str(), Some(event.as_str()), "{data}");
            (
                event.clone(),
                data["devbox"].as_str().expect("devbox").to_owned(),
            )
        })
        .collect();
    assert_eq!(seen, pairs(id, &expected), "{messages:#?}");
    for (sse_id, _, data) in &messages {
        assert_eq!(
            data["id"].as_u64(),
            Some(*sse_id),
            "the SSE id is the event's"
        );
    }
    assert!(messages.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    edge.edge().events.emit(Event::wake(id));
    let wake = read_messages(&mut lines, 1).await;
    assert_eq!(wake[0].1, "devbox.wake");
}

/// VmRSS of this process (the edge runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_disconnected_and_nothing_piles_up() {
    let edge = TestEdge::start().await;
    let events = edge.edge().events.clone();
    let token = edge.edge().admin_token.expose().to_owned();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut tcp = socket
        .connect(edge.edge().admin_addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /v1/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("send");
    // Read the head and the greeting, to know it is subscribed; then never read again.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&head).contains(": burrow events") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut byte))
            .await
            .expect("the head in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "the stream ended early: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));

    let before = rss_kib();
    let mut emitted = 0u64;
    // Far more than the subscriber's queue and every socket buffer on the way hold; the
    // edge must give up on the reader long before. Paced (a pause every 256 events, a busy
    // edge's rate) so that the edge's writer fills the sockets first, as with a real reader
    // that stalls, instead of the burst outrunning it at once.
    while events.lagged() == 0 {
        assert!(
            emitted < 2_000_000,
            "still subscribed after {emitted} events"
        );
        events.emit(Event::wake(format!("devbox-{emitted}")));
        emitted += 1;
        if emitted % 256 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    let grown = rss_kib().saturating_sub(before);
    println!("disconnected after {emitted} events; RSS grew {grown} KiB");
    assert!(
        grown < 64 * 1024,
        "RSS grew {grown} KiB while the reader stalled"
    );

    // The edge closed the connection: what the socket buffers held, then the end.
    let mut sink = vec![0u8; 64 * 1024];
    let mut buffered = 0usize;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buffered += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was closed by the edge");
    println!("{buffered} bytes were on their way to the reader when the edge closed it");
    assert_eq!(events.lagged(), 1);
    // The edge goes on serving its admin API.
    let (code, _) = edge.admin("GET", "/v1/devboxes", None).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_takes_over_its_own_session_is_not_announced_again() {
    let receiver = Receiver::start(0).await;
    let dir = tempfile::tempdir().expect("dir");
    let edge = receiver
        .edge_with_secret(dir.path(), "whsec-takeover", "")
        .await;
    let devbox = edge.devbox(Some("open")).await;
    let relay = Relay::start(edge.agents_addr()).await;
    let via = relay.addr().to_string();
    let agent = TestAgent::start_with(&edge, &devbox, &[("edge", &via)]).await;
    let connected = receiver.events(2).await;
    let id = devbox.id.as_str();
    assert_eq!(
        kinds(&connected),
        pairs(id, &["tunnel.enabled", "agent.connected"])
    );

    // The path dies; the agent notices and dials again, while the edge still holds the old
    // connection (its idle timeout is longer): the new one takes over.
    relay.set_blackhole(true);
    agent
        .wait_for("notices the dead path", |s| !s.connected)
        .await;
    relay.set_blackhole(false);
    agent
        .wait_for("connected again", |s| s.connected && s.sessions >= 2)
        .await;
    let (code, view) = edge.admin("GET", &format!("/v1/devboxes/{id}"), None).await;
    assert_eq!((code, &view["agent"]["connected"]), (200, &json!(true)));
    agent.stop().await;
    let events = receiver.events(3).await;
    assert_eq!(
        kinds(&events),
        pairs(
            id,
            &["tunnel.enabled", "agent.connected", "agent.disconnected"]
        ),
        "a takeover is neither a disconnect nor a connect: {events:#?}"
    );
    assert!(receiver.bad().is_empty(), "{:?}", receiver.bad());
}

/// An edge whose webhooks go to `receiver` (its generated secret handed to it), with
/// `platform.wake_wait` of `wake_wait` and room for 128 waiting requests per devbox, and a
/// devbox whose tunnel has `wake_on_http`; its tunnel key.
async fn waking_edge(
    receiver: &Receiver,
    wake_wait: &str,
) -> (TestEdge, burrow_tests::Devbox, String) {
    let builder = TestEdge::builder().flag("agents.max_waiting", "128");
    let edge = receiver
        .edge(builder, &format!("wake_wait = \"{wake_wait}\""))
        .await;
    let devbox = edge.devbox(None).await;
    let tunnel = json!({ "auth_mode": "open", "wake_on_http": true });
    let path = format!("/v1/devboxes/{}/tunnel", devbox.id);
    let (code, answer) = edge.admin("POST", &path, Some(tunnel)).await;
    assert_eq!(code, 200, "{answer}");
    let key = answer["tunnel_key"].as_str().expect("key").to_owned();
    (edge, devbox, key)
}

/// The `devbox.wake` webhooks `receiver` accepted so far.
fn wakes(receiver: &Receiver) -> Vec<Value> {
    let all = receiver.received.borrow().clone();
    all.into_iter()
        .filter(|e| e["type"] == "devbox.wake")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_sleeping_devbox_wake_it_once_and_are_served_when_it_is_up() {
    // Built before the clock starts, so the platform below starts the agent at once.
    burrow_tests::binary("burrow-agent");
    let receiver = Receiver::start(0).await;
    let (edge, devbox, key) = waking_edge(&receiver, "30s").await;
    let service = burrow_tests::services::http_service("127.0.0.1:0").await;
    let host = format!("{}-{key}.{}", service.addr.port(), burrow_tests::DOMAIN);

    // 100 requests at once while the devbox sleeps (no agent).
    let requests: Vec<_> = (0..100)
        .map(|i| {
            let host = host.clone();
            let addr = edge.http();
            tokio::spawn(async move {
                let path = format!("/asleep?i={i}");
                burrow_tests::request(addr, "GET", &host, &path, &[], Vec::new()).await
            })
        })
        .collect();
    // The platform hears of it, and wakes the devbox: its agent starts, a real process, after
    // a while (a resume takes a moment).
    until("the platform is asked to wake the devbox", || async {
        !wakes(&receiver).is_empty()
    })
    .await;
    let woken = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let _agent = burrow_tests::agent_process::AgentProcess::spawn(&edge, &devbox, &[]);
    for request in requests {
        let reply = request.await.expect("task").expect("an answer");
        assert_eq!(
            reply.status,
            200,
            "served once the agent is up: {}",
            reply.text()
        );
    }
    let waited = woken.elapsed();
    let asked = wakes(&receiver);
    assert_eq!(asked.len(), 1, "one wake for 100 requests: {asked:#?}");
    assert_eq!(asked[0]["devbox"], devbox.id.as_str());
    assert_eq!(counter(&edge, "burrow_edge_wakes_total"), 1);
    assert!(receiver.bad().is_empty(), "{:?}", receiver.bad());
    eprintln!("served {waited:?} after the wake webhook (the platform waited 500 ms)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devbox_that_does_not_wake_gets_503_after_the_wake_wait() {
    let receiver = Receiver::start(0).await;
    let (edge, devbox, key) = waking_edge(&receiver, "2s").await;
    let started = std::time::Instant::now();
    let host = format!("8080-{key}.{}", burrow_tests::DOMAIN);
    let reply = burrow_tests::request(edge.http(), "GET", &host, "/", &[], Vec::new())
        .await
        .expect("an answer");
    let waited = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.header("retry-after").is_some(), "Retry-After");
    assert!(
        reply.text().contains("asked to wake up"),
        "{}",
        reply.text()
    );
    assert!(
        waited >= std::time::Duration::from_millis(1900),
        "waited {waited:?}"
    );
    assert!(waited < WAIT, "waited {waited:?}");
    assert_eq!(wakes(&receiver).len(), 1);

    // The wake was not carried out: after wake_wait the next request asks again.
    let reply = burrow_tests::request(edge.http(), "GET", &host, "/", &[], Vec::new())
        .await
        .expect("an answer");
    assert_eq!(reply.status, 503);
    assert_eq!(wakes(&receiver).len(), 2, "asked again");
    assert_eq!(wakes(&receiver)[1]["devbox"], devbox.id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_webhooks_come_at_most_once_per_devbox_per_interval() {
    let receiver = Receiver::start(0).await;
    let edge = receiver
        .edge(TestEdge::builder(), "activity_interval = \"1s\"")
        .await;
    let (busy, quiet) = (
        edge.devbox(Some("open")).await,
        edge.devbox(Some("open")).await,
    );
    let _agents = (
        TestAgent::start(&edge, &busy).await,
        TestAgent::start(&edge, &quiet).await,
    );
    let service = burrow_tests::services::http_service("127.0.0.1:0").await;
    let host = format!(
        "{}-{}.{}",
        service.addr.port(),
        busy.key.as_deref().expect("key"),
        burrow_tests::DOMAIN
    );
    // Requests without a pause for 3.5 s: three or four intervals.
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < std::time::Duration::from_millis(3500) {
        let reply = burrow_tests::request(edge.http(), "GET", &host, "/", &[], Vec::new()).await;
        assert_eq!(reply.expect("an answer").status, 200);
        sent += 1;
    }
    let elapsed = started.elapsed();
    until("the last interval's report", || async {
        let all = receiver.received.borrow().clone();
        let last = all.iter().rev().find(|e| e["type"] == "devbox.activity");
        last.and_then(|e| e["devboxes"][0]["last_activity_ms"].as_u64())
            .is_some_and(|ms| ms >= u64::try_from(now_ms_test() - 1500).unwrap_or(0))
    })
    .await;
    let reports: Vec<Value> = receiver
        .received
        .borrow()
        .iter()
        .filter(|e| e["type"] == "devbox.activity")
        .cloned()
        .collect();
    let intervals = elapsed.as_secs() + 2;
    assert!(
        !reports.is_empty() && reports.len() as u64 <= intervals,
        "{} requests over {elapsed:?}: {} reports, at most one an interval: {reports:#?}",
        sent,
        reports.len()
    );
    for report in &reports {
        let ids: Vec<&str> = report["devboxes"]
            .as_array()
            .expect("devboxes")
            .iter()
            .map(|d| d["id"].as_str().expect("id"))
            .collect();
        assert_eq!(
            ids,
            [busy.id.as_str()],
            "only the busy devbox, once: {report}"
        );
    }
    let _ = quiet;
}

fn now_ms_test() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    i64::try_from(since.as_millis()).expect("ms")
}
