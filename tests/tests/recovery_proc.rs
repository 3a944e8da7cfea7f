//! Recovery from faults of whole processes: the agent frozen (SIGSTOP) past its idle timeout,
//! the agent killed and restarted with requests in flight (and seen as restarted, not as a
//! clone), a GET and a POST the killed agent had passed to the service (the GET goes again,
//! the POST is answered 502), a simulated suspend and a stepped wall clock, a second agent
//! with the same token and snapshot clones sharing one state file, the agent stopped with
//! SIGTERM while a download runs, and a graceful restart of the edge with a WebSocket and an
//! event stream open.
//!
//! The agent runs as the real `burrow-agent` binary where signals are the fault, and in process
//! where the test needs its clocks or its status. Every wait is on an event with a deadline;
//! the figures each test measures are printed (`-- --nocapture`).

use std::sync::Arc;
use std::time::Duration;

use burrow_agent::status::State;
use burrow_tests::agent_process::AgentProcess;
use burrow_tests::logs::edge_log;
use burrow_tests::services::{http_service, ws_echo};
use burrow_tests::testkit::Signal;
use burrow_tests::{DOMAIN, TestAgent, TestClocks, TestEdge, WAIT, request};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The public host of `port` in the tunnel `key`.
fn host(port: u16, key: &str) -> String {
    format!("{port}-{key}.{DOMAIN}")
}

/// GETs `url` with curl until it answers 200, each try bounded by 10 s; the time that took and
/// the tries. Panics with the last answer after `bound`.
async fn first_200(url: &str, bound: Duration) -> (Duration, u32) {
    let start = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        let reply = burrow_tests::curl(&["--max-time", "10", "-o", "/dev/null", url]).await;
        if reply.code == 200 {
            return (start.elapsed(), tries);
        }
        assert!(
            start.elapsed() < bound,
            "no 200 from {url} within {bound:?} ({tries} tries); last: {} {}",
            reply.code,
            reply.stderr
        );
        // An immediate answer (a refused connection) is retried at a modest pace.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_process_stopped_longer_than_idle_timeout() {
    // A short QUIC idle timeout (the default is 20 s) so that holding the process stopped
    // past it takes seconds, not half a minute: the edge gives up on the connection while the
    // agent cannot answer, and the agent must notice on waking and dial again. Heartbeats
    // (which double as QUIC keep-alives) must come more often than the idle timeout, or an
    // idle connection times out between two of them: every 1 s instead of 5 s.
    const IDLE: &str = "4s";
    const HOLD: Duration = Duration::from_secs(8);
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let service = http_service("127.0.0.1:0").await;
    let url = edge.url(service.addr.port(), &key, "/");

    let mut agent = AgentProcess::spawn(
        &edge,
        &devbox,
        &[
            ("BURROW_LIVENESS_IDLE_TIMEOUT", IDLE),
            ("BURROW_LIVENESS_HEARTBEAT_INTERVAL", "1s"),
        ],
    );
    let (up, _) = first_200(&url, WAIT).await;
    println!("agent process serving after {up:?}");

    agent.signal(Signal::SIGSTOP);
    tokio::time::sleep(HOLD).await;
    let before = agent.lines();
    agent.signal(Signal::SIGCONT);
    let (recovered, tries) = first_200(&url, WAIT).await;
    println!(
        "stopped {HOLD:?} (idle timeout {IDLE}): first 200 {recovered:?} after SIGCONT, {tries} tries"
    );
    // The late clock tick shows the stop, and the connection the edge dropped meanwhile is
    // replaced by a new one.
    agent.wait_log("resume detected", before, WAIT).await;
    agent.wait_log(": connected", before, WAIT).await;
    for line in agent.log.text().lines().skip(before) {
        println!("agent after SIGCONT: {line}");
    }
    assert!(
        recovered < Duration::from_secs(10),
        "the tunnel took {recovered:?} to serve again after SIGCONT"
    );

    agent.signal(Signal::SIGTERM);
    let code = agent.exit_code(WAIT).await;
    assert_eq!(code, 0, "SIGTERM is a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_resume_is_detected_and_requests_succeed() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let service = http_service("127.0.0.1:0").await;
    let target = host(service.addr.port(), &key);
    let clocks = Arc::new(TestClocks::default());
    let agent = TestAgent::spawn_full(&edge, &devbox, &[], &[], Some(clocks.clone()));
    agent.wait_for("connected", |s| s.connected).await;
    assert_eq!(
        agent.status().resumes,
        0,
        "no resume before the test makes one"
    );

    // The resume tick is 1 s: a suspend shows at the next sample.
    let detect_bound = Duration::from_secs(5);
    for (n, what) in [(1, "suspend of 60 s"), (2, "wall clock stepped by 30 s")] {
        let start = Instant::now();
        if n == 1 {
            clocks.suspend(Duration::from_secs(60));
        } else {
            clocks.step_realtime(Duration::from_secs(30));
        }
        let mut status = agent.agent.status.clone();
        timeout(detect_bound, status.wait_for(|s| s.resumes >= n))
            .await
            .unwrap_or_else(|_| panic!("{what}: not detected within {detect_bound:?}"))
            .expect("agent running");
        let detected = start.elapsed();
        let reply = timeout(WAIT, request(edge.http(), "GET", &target, "/", &[], vec![]))
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(reply.status, 200, "{what}: {}", reply.text());
        println!(
            "{what}: detected after {detected:?}, a request answered 200 {:?} after the fault",
            start.elapsed()
        );
        assert_eq!(agent.status().resumes, n, "{what}: counted once");
    }

    // Both probes went out on a live connection; once their deadline (the heartbeat timeout,
    // 3 s) has passed, the answered probes must have kept the session.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = agent.status();
    println!(
        "after both probes: sessions {}, resumes {}, rtt {:?}",
        status.sessions, status.resumes, status.rtt
    );
    assert!(status.connected, "still connected: {status:?}");
    assert_eq!(
        status.sessions, 1,
        "an answered probe keeps the connection: {status:?}"
    );
    assert_eq!(status.resumes, 2, "no resume counted without a fault");
}

/// The agent is killed (kill -9) and started again, as `Restart=always` or a container restart
/// does, while 20 requests wait on its dead connection: the edge cannot know it is dead until
/// the QUIC idle timeout (20 s), and used to hold the requests there until its 15 s answer
/// timeout (504). They must move to the new connection as soon as it attaches, and all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_and_restarted_with_20_requests_in_flight() {
    const REQUESTS: i64 = 20;
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let service = http_service("127.0.0.1:0").await;
    let target = host(service.addr.port(), &key);
    // One state directory for both processes, as for an agent restarted in the same devbox.
    let state_dir = edge.agent_state_dir();
    let state = [(
        "BURROW_STATE_DIR",
        state_dir.to_str().expect("a UTF-8 path"),
    )];
    let mut first = AgentProcess::spawn(&edge, &devbox, &state);
    first_200(&edge.url(service.addr.port(), &key, "/"), WAIT).await;

    first.signal(Signal::SIGKILL);
    first.child.wait_within(WAIT).await;
    let http = edge.http();
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let target = target.clone();
            tokio::spawn(async move {
                let path = format!("/in-flight-{i}");
                let sent = Instant::now();
                let reply = timeout(WAIT, request(http, "GET", &target, &path, &[], vec![])).await;
                (i, sent.elapsed(), reply)
            })
        })
        .collect();
    // Every request is past the edge's limits and waiting for an answer on the dead connection.
    let in_flight = &edge.edge().metrics.requests_in_flight;
    let deadline = Instant::now() + WAIT;
    while in_flight.get() < REQUESTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {REQUESTS} requests reached the edge",
            in_flight.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let restarted = Instant::now();
    let second = AgentProcess::spawn(&edge, &devbox, &state);
    let mut worst = Duration::ZERO;
    for task in requests {
        let (i, took, reply) = task.await.expect("request task");
        let reply = reply
            .unwrap_or_else(|_| panic!("request {i} had no answer within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        worst = worst.max(took);
    }
    let all_done = restarted.elapsed();
    println!(
        "{REQUESTS} requests in flight across kill -9 and restart: all 200, the last {all_done:?} \
         after the restart (each waited at most {worst:?})"
    );
    // Well before the answer timeout (15 s) that failed them, and the QUIC idle timeout (20 s)
    // that would have moved them eventually.
    assert!(
        all_done < Duration::from_secs(10),
        "the requests took {all_done:?} after the restart"
    );
    // The operator reads a restart, not a clone: the new process continued the instance chain
    // the first one left in state_dir.
    let log = edge_log(&devbox.id);
    assert!(
        log.iter()
            .any(|l| l.contains("the agent restarted or reconnected")),
        "the edge logs a restart: {log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("second agent")),
        "the edge does not take the restarted agent for a clone: {log:#?}"
    );
    drop(second);
}

/// A service that holds the first request for each path under `/hold/` unanswered (the one a
/// killed agent was carrying) and answers every later one at once; it reports each arrival
/// under `/hold/` by path.
async fn holds_first_request() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    let held = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (seen_tx, held) = (seen_tx.clone(), held.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (seen_tx, held) = (seen_tx.clone(), held.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let hold = path.starts_with("/hold/");
                        if hold {
                            let _ = seen_tx.send(path.clone());
                        }
                        let first = hold && held.lock().expect("lock").insert(path);
                        if first {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from("answered")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (port, seen)
}

/// The agent is killed while the service holds a GET and a POST it received (the agent had
/// accepted their streams and passed them on), and started again: the GET, which HTTP lets a
/// client send again, goes once more on the new connection and succeeds; the POST, which may
/// have had its effect, is answered 502 saying so, not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_the_killed_agent_was_carrying_goes_again_and_a_post_does_not() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let (port, mut seen) = holds_first_request().await;
    let target = host(port, &key);
    let state_dir = edge.agent_state_dir();
    let state = [(
        "BURROW_STATE_DIR",
        state_dir.to_str().expect("a UTF-8 path"),
    )];
    let mut first = AgentProcess::spawn(&edge, &devbox, &state);
    first_200(&edge.url(port, &key, "/warm-up"), WAIT).await;
    let http = edge.http();
    let send = |method: &'static str, path: &'static str| {
        let target = target.clone();
        tokio::spawn(async move {
            let body = if method == "POST" {
                b"order".to_vec()
            } else {
                vec![]
            };
            timeout(WAIT, request(http, method, &target, path, &[], body)).await
        })
    };
    let get = send("GET", "/hold/report");
    let post = send("POST", "/hold/order");
    let mut arrived = Vec::new();
    while arrived.len() < 2 {
        let path = timeout(WAIT, seen.recv())
            .await
            .expect("both reach the service");
        arrived.push(path.expect("service running"));
    }
    arrived.sort();
    assert_eq!(arrived, ["/hold/order", "/hold/report"]);

    first.signal(Signal::SIGKILL);
    first.child.wait_within(WAIT).await;
    let killed = Instant::now();
    let _second = AgentProcess::spawn(&edge, &devbox, &state);
    let get = get
        .await
        .expect("task")
        .expect("GET answered in time")
        .expect("GET");
    assert_eq!(get.status, 200, "the GET went again: {}", get.text());
    assert_eq!(get.text(), "answered");
    println!("the GET answered {:?} after the kill", killed.elapsed());
    let post = post
        .await
        .expect("task")
        .expect("POST answered in time")
        .expect("POST");
    assert_eq!(post.status, 502, "{}", post.text());
    assert!(
        post.text().contains("not sent again"),
        "the 502 says why: {}",
        post.text()
    );
    // The service saw the GET twice and the POST once.
    assert_eq!(seen.try_recv().ok().as_deref(), Some("/hold/report"));
    assert!(seen.try_recv().is_err(), "the POST was not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_token() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port().to_string();
    let target = host(service.addr.port(), &key);
    let get = || async {
        timeout(WAIT, request(edge.http(), "GET", &target, "/", &[], vec![]))
            .await
            .expect("an answer in time")
            .expect("an answer")
    };

    // A refuses the service's port, B allows it: a 200 can only come from B.
    let a = TestAgent::start_with(&edge, &devbox, &[("forward.deny_ports", &port)]).await;
    let reply = get().await;
    assert_eq!(reply.status, 403, "A serves and refuses: {}", reply.text());

    let start = Instant::now();
    let b = TestAgent::start(&edge, &devbox).await;
    let b_connected = start.elapsed();
    a.wait_for("standby", |s| s.state == State::Standby).await;
    let a_standby = start.elapsed();
    println!("B connected after {b_connected:?}, A in standby after {a_standby:?}");
    let a_status = a.status();
    let why = a_status.last_error.clone().unwrap_or_default();
    println!("A's last error: {why}");
    assert!(why.contains("another agent"), "A says why: {a_status:?}");
    assert!(!a_status.connected, "A has no session: {a_status:?}");

    for i in 0..5 {
        let reply = get().await;
        assert_eq!(
            reply.status,
            200,
            "request {i} is served by B: {}",
            reply.text()
        );
        let a_status = a.status();
        assert_eq!(a_status.state, State::Standby, "A stays in standby");
        assert_eq!(a_status.sessions, 1, "A does not take over: {a_status:?}");
    }
    let b_status = b.status();
    assert!(b_status.connected, "{b_status:?}");
    assert_eq!(b_status.state, State::Connected);
    assert_eq!(b_status.sessions, 1, "B was never pushed out: {b_status:?}");
    println!(
        "after 5 requests: A {} sessions {}, B {} sessions {}",
        a.status().state.as_str(),
        a.status().sessions,
        b_status.state.as_str(),
        b_status.sessions
    );
    // Two agents with state directories of their own (two devboxes given one token): B's
    // chain does not continue A's session, so the edge names it a second agent.
    let log = edge_log(&devbox.id);
    assert!(
        log.iter().any(|l| l.contains("second agent")),
        "the edge logs a clone: {log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("restarted or reconnected")),
        "{log:#?}"
    );
}

/// A snapshot clone: a second devbox started from a snapshot of the first has the agent's
/// state_dir as it was, so both agents start the same instance chain. The first of the two to
/// connect continues it (the edge takes it for a restart), which leaves the other's chain
/// stale: that one is the clone. Then one serves, the other stands by, and no fight follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_clones_share_a_state_file_and_do_not_fight() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let service = http_service("127.0.0.1:0").await;
    let target = host(service.addr.port(), &key);
    let a_dir = edge.agent_state_dir();
    let a_state = a_dir.to_str().expect("a UTF-8 path");
    let a = TestAgent::start_with(&edge, &devbox, &[("state_dir", a_state)]).await;

    let b_dir = edge.agent_state_dir();
    std::fs::copy(a_dir.join("instance"), b_dir.join("instance"))
        .expect("the original's state file, as the snapshot has it");
    let b_state = b_dir.to_str().expect("a UTF-8 path");
    let start = Instant::now();
    let b = TestAgent::spawn(&edge, &devbox, &[("state_dir", b_state)]);
    let settled = |x: &burrow_agent::Status, y: &burrow_agent::Status| {
        x.connected && x.state == State::Connected && !y.connected && y.state == State::Standby
    };
    let deadline = Instant::now() + WAIT;
    let (serving, standing_by) = loop {
        let (sa, sb) = (a.status(), b.status());
        if settled(&sa, &sb) {
            break (&a, &b);
        }
        if settled(&sb, &sa) {
            break (&b, &a);
        }
        assert!(
            Instant::now() < deadline,
            "one agent serves and the other stands by within {WAIT:?}: A {sa:?}, B {sb:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let name = |agent: &TestAgent| if std::ptr::eq(agent, &a) { "A" } else { "B" };
    println!(
        "{} serves, {} stands by, {:?} after the clone started",
        name(serving),
        name(standing_by),
        start.elapsed()
    );
    let why = standing_by.status().last_error.unwrap_or_default();
    assert!(
        why.contains("another agent"),
        "the one standing by says why: {why}"
    );
    let sessions = (serving.status().sessions, standing_by.status().sessions);
    for i in 0..5 {
        let reply = timeout(WAIT, request(edge.http(), "GET", &target, "/", &[], vec![]))
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        let now = (serving.status(), standing_by.status());
        assert!(settled(&now.0, &now.1), "no fight: {now:?}");
        assert_eq!(
            (now.0.sessions, now.1.sessions),
            sessions,
            "no fight: {now:?}"
        );
    }
    let log = edge_log(&devbox.id);
    let clones = log.iter().filter(|l| l.contains("second agent")).count();
    let restarts = log
        .iter()
        .filter(|l| l.contains("restarted or reconnected"))
        .count();
    println!("edge log: {restarts} restart, {clones} clone");
    assert_eq!(clones, 1, "the clone is named once, no ping-pong: {log:#?}");
    assert!(restarts <= 1, "{log:#?}");
}

/// A one-shot slow service: answers the first request with `chunks` x `chunk` bytes
/// (content-length), one chunk every `pause`, then closes. Chunk `i` is all `b'a' + i`. The
/// receiver fires once the first chunk is written.
async fn slow_download(
    chunks: usize,
    chunk: usize,
    pause: Duration,
) -> (u16, oneshot::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (first_tx, first_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.expect("read request");
            assert!(n > 0, "the request ended before its head");
            head.extend_from_slice(&buf[..n]);
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            chunks * chunk
        );
        tcp.write_all(response.as_bytes())
            .await
            .expect("write head");
        let mut first = Some(first_tx);
        for i in 0..chunks {
            let fill = b'a' + u8::try_from(i % 26).expect("small");
            tcp.write_all(&vec![fill; chunk])
                .await
                .expect("write chunk");
            tcp.flush().await.expect("flush");
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            if i + 1 < chunks {
                tokio::time::sleep(pause).await;
            }
        }
        let _ = tcp.shutdown().await;
    });
    (port, first_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_lets_running_streams_finish() {
    const CHUNKS: usize = 10;
    const CHUNK: usize = 100 * 1024;
    const DRAIN_GRACE: Duration = Duration::from_secs(10);
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let service = http_service("127.0.0.1:0").await;
    let mut agent = AgentProcess::spawn(&edge, &devbox, &[]);
    first_200(&edge.url(service.addr.port(), &key, "/"), WAIT).await;

    let (port, first_chunk) = slow_download(CHUNKS, CHUNK, Duration::from_millis(300)).await;
    let url = edge.url(port, &key, "/download");
    let download = tokio::spawn(async move {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "60", &url])
            .output()
            .await
            .expect("curl runs");
        (out, Instant::now())
    });
    timeout(WAIT, first_chunk)
        .await
        .expect("the service starts sending in time")
        .expect("the service sent its first chunk");

    let before = agent.lines();
    let term = Instant::now();
    agent.signal(Signal::SIGTERM);
    agent.wait_log("shutting down", before, WAIT).await;
    let code = agent.exit_code(DRAIN_GRACE + Duration::from_secs(5)).await;
    let exited = term.elapsed();
    let (out, done) = timeout(WAIT, download)
        .await
        .expect("curl finishes in time")
        .expect("curl task");
    let body = out.stdout;
    println!(
        "SIGTERM mid-download: curl done {:?} after it ({} of {} bytes, {}), agent exited {code} after {exited:?}",
        done.duration_since(term),
        body.len(),
        CHUNKS * CHUNK,
        out.status
    );
    assert!(
        out.status.success(),
        "curl: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(body.len(), CHUNKS * CHUNK, "the whole body arrived");
    for (i, chunk) in body.chunks(CHUNK).enumerate() {
        let fill = b'a' + u8::try_from(i % 26).expect("small");
        assert!(chunk.iter().all(|b| *b == fill), "chunk {i} arrived intact");
    }
    assert_eq!(code, 0, "a drained stop exits 0");
    assert!(
        exited < DRAIN_GRACE + Duration::from_secs(5),
        "exited {exited:?} after SIGTERM"
    );

    // No agent now: a request waits the edge's `agents.wait` (5 s), then 503.
    let start = Instant::now();
    let reply = burrow_tests::curl(&[
        "--max-time",
        "30",
        &edge.url(service.addr.port(), &key, "/"),
    ])
    .await;
    let waited = start.elapsed();
    println!(
        "request with the agent gone: {} after {waited:?}",
        reply.code
    );
    assert_eq!(reply.code, 503, "{} {}", reply.body, reply.stderr);
    assert!(
        waited >= Duration::from_millis(4500),
        "the request waited for an agent first ({waited:?})"
    );
}

/// An endless event stream: one `id: {i}\ndata: event {i}\n\n` event every 100 ms, each
/// written whole as one HTTP/1.1 chunk, for every connection.
async fn endless_sse() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for i in 0u64.. {
                    let event = format!("id: {i}\ndata: event {i}\n\n");
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if tcp.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_graceful_restart_keeps_the_url_and_queued_requests_succeed() {
    const DRAIN_GRACE: Duration = Duration::from_secs(2);
    let grace = "drain_grace = \"2s\"";
    let edge = TestEdge::builder().toml(grace).start().await;
    let (http, agents) = (edge.http(), edge.agents_addr());
    let devbox = edge.devbox(Some("open")).await;
    let agent = TestAgent::start(&edge, &devbox).await;
    let key = agent
        .status()
        .tunnel
        .map(|t| t.key.to_string())
        .expect("the agent knows its tunnel");
    assert_eq!(Some(&key), devbox.key.as_ref());
    let service = http_service("127.0.0.1:0").await;
    let sse_port = endless_sse().await;
    let ws_port = ws_echo().await.port();

    // An event stream, read as it arrives until it ends.
    let tcp = TcpStream::connect(http).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/events")
        .header("host", host(sse_port, &key))
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = timeout(WAIT, sender.send_request(req))
        .await
        .expect("SSE headers in time")
        .expect("SSE response");
    assert_eq!(response.status(), 200);
    let (first_tx, first_rx) = oneshot::channel();
    let sse = tokio::spawn(async move {
        let mut body = response.into_body();
        let mut text = String::new();
        let mut first = Some(first_tx);
        let end = loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        text.push_str(&String::from_utf8_lossy(data));
                        if text.contains("\n\n") {
                            if let Some(tx) = first.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                }
                Some(Err(e)) => break format!("error: {e}"),
                None => break "end of body".to_owned(),
            }
        };
        (text, end, Instant::now())
    });
    timeout(WAIT, first_rx)
        .await
        .expect("a first event in time")
        .expect("SSE reader");

    // A WebSocket, echoing once, then read until it ends.
    let ws_url = format!("ws://{}:{}/", host(ws_port, &key), http.port());
    let tcp = TcpStream::connect(http).await.expect("connect");
    let (mut ws, _) = timeout(
        WAIT,
        tokio_tungstenite::client_async(ws_url.into_client_request().expect("ws request"), tcp),
    )
    .await
    .expect("WebSocket handshake in time")
    .expect("WebSocket handshake");
    ws.send(Message::text("before the restart"))
        .await
        .expect("send");
    let echo = timeout(WAIT, ws.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("a message");
    assert_eq!(echo, Message::text("before the restart"));
    let ws_task = tokio::spawn(async move {
        let end = loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break format!("close {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("error: {e}"),
                None => break "end of stream".to_owned(),
            }
        };
        (end, Instant::now())
    });

    let sessions = agent.status().sessions;
    let stop = Instant::now();
    let mut edge = edge;
    edge.stop().await;
    let stopped = stop.elapsed();
    // `Edge::stop` returns while quinn's endpoint driver still holds the agents' UDP port (it
    // lingers until closed connections have drained), so binding it again at once fails with
    // AddrInUse. A new process would not meet this (the old one's exit frees the port); wait
    // until the port is free.
    let free = Instant::now();
    loop {
        match std::net::UdpSocket::bind(agents) {
            Ok(socket) => break drop(socket),
            Err(e) => assert!(
                free.elapsed() < WAIT,
                "the agents' port {agents} is still bound {:?} after the edge stopped: {e}",
                free.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port_free = free.elapsed();
    let builder = TestEdge::builder().http(http).agents(agents).toml(grace);
    let edge = edge.restart_with(builder).await;
    let restarted = stop.elapsed();
    println!("edge stopped in {stopped:?}; its UDP port was free {port_free:?} later");
    // Right away, before the agent is back: this request waits for it.
    let agent_back_at_send = agent.status().connected;
    let sent = Instant::now();
    let reply = timeout(
        WAIT,
        request(
            http,
            "GET",
            &host(service.addr.port(), &key),
            "/",
            &[],
            vec![],
        ),
    )
    .await
    .expect("an answer in time")
    .expect("an answer");
    let answered = sent.elapsed();
    println!(
        "edge restarted in {restarted:?}; a request sent right after waited {answered:?} for {}: {}",
        if agent_back_at_send {
            "nothing (the agent was already back)"
        } else {
            "the agent"
        },
        reply.status
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(edge.http(), http, "the same public address");

    let margin = Duration::from_secs(5);
    let (text, sse_end, sse_at) = timeout(WAIT, sse)
        .await
        .expect("the event stream ends")
        .expect("SSE reader");
    let (ws_end, ws_at) = timeout(WAIT, ws_task)
        .await
        .expect("the WebSocket ends")
        .expect("WebSocket reader");
    let events = text.matches("\n\n").count();
    println!(
        "SSE ended {:?} after the stop began ({sse_end}), {events} events, {} bytes; \
         WebSocket ended {:?} after ({ws_end})",
        sse_at.duration_since(stop),
        text.len(),
        ws_at.duration_since(stop)
    );
    assert!(
        sse_at.duration_since(stop) < DRAIN_GRACE + margin,
        "the event stream ended {:?} after the stop began",
        sse_at.duration_since(stop)
    );
    assert!(
        ws_at.duration_since(stop) < DRAIN_GRACE + margin,
        "the WebSocket ended {:?} after the stop began",
        ws_at.duration_since(stop)
    );
    assert!(
        text.ends_with("\n\n"),
        "the last event arrived whole: {:?}",
        &text[text.len().saturating_sub(60)..]
    );

    agent
        .wait_for("connected to the new edge", |s| {
            s.connected && s.sessions > sessions
        })
        .await;
    let status = agent.status();
    let key_after = status.tunnel.as_ref().map(|t| t.key.to_string());
    println!(
        "agent sessions {} -> {}, tunnel key {key} -> {key_after:?}",
        sessions, status.sessions
    );
    assert_eq!(key_after.as_deref(), Some(key.as_str()), "the same URL");
    assert!(
        !agent_back_at_send,
        "the agent was back before the request was sent: the queue was not exercised"
    );
}
