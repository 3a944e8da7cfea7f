//! gRPC through the tunnel with real gRPC stacks on both ends (tonic, and Python's grpcio):
//! every call kind, big messages, metadata and trailers, deadlines and cancellation reaching
//! the service, flow control, quiet long calls, access by token, and the edge's own answers in
//! gRPC's terms. Over plain h2c to the edge and over HTTPS (h2 by ALPN).

use std::time::Duration;

use burrow_tests::grpc::{
    self, EchoClient, EchoServer, Method, python_call, python_server, stream_message, summary,
};
use burrow_tests::testkit::ports::tokio_listener;
use burrow_tests::{DOMAIN, Devbox, EdgeBuilder, TestAgent, TestEdge, WAIT, until};
use bytes::Bytes;
use futures_util::stream;
use tokio::sync::mpsc;
use tonic::Code;

/// An edge, a devbox with a tunnel in `mode`, its agent, and tonic's echo service.
struct World {
    edge: TestEdge,
    devbox: Devbox,
    key: String,
    agent: Option<TestAgent>,
    service: EchoServer,
}

impl World {
    async fn start(
        builder: EdgeBuilder,
        mode: &str,
        agent_flags: &[(&'static str, &str)],
    ) -> World {
        let edge = builder.start().await;
        let devbox = edge.devbox(Some(mode)).await;
        let key = devbox.key.clone().expect("tunnel key");
        let agent = TestAgent::start_with(&edge, &devbox, agent_flags).await;
        let service = grpc::serve(tokio_listener().await);
        World {
            edge,
            devbox,
            key,
            agent: Some(agent),
            service,
        }
    }

    /// The plain-HTTP URL of `port` (h2c to the edge).
    fn h2c(&self, port: u16) -> String {
        self.edge
            .url(port, &self.key, "")
            .trim_end_matches('/')
            .to_owned()
    }

    /// A client of the echo service over h2c.
    async fn client(&self) -> EchoClient {
        let url = self.h2c(self.service.addr.port());
        EchoClient::connect_h2c(&url).await.expect("connects")
    }

    /// A client of the echo service over HTTPS, trusting the edge's public CA.
    async fn tls_client(&self) -> EchoClient {
        let ca = self.edge.public_ca.as_ref().expect("an HTTPS edge");
        let ca = std::fs::read(ca).expect("the public CA");
        let url = self.edge.https_url(self.service.addr.port(), &self.key, "");
        let url = url.trim_end_matches('/');
        EchoClient::connect_tls(url, &ca)
            .await
            .expect("connects over TLS")
    }
}

fn big(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed)
        .collect::<Vec<_>>()
        .into()
}

/// A stream of messages the test sends one at a time, and its sending end.
fn outbox() -> (
    mpsc::Sender<Bytes>,
    impl futures_util::Stream<Item = Bytes> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(1);
    let messages = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    (tx, messages)
}

/// Every call kind against `client`, as a user of the echo service sees it.
async fn every_call_kind(client: &EchoClient, world: &World, over: &str) {
    let small = client
        .unary(Bytes::from_static(b"hello"), &[("x-echo-who", over)], None)
        .await
        .unwrap_or_else(|s| panic!("unary over {over}: {s:?}"));
    assert_eq!(
        small.metadata().get("x-echo-who").map(|v| v.to_str().ok()),
        Some(Some(over))
    );
    assert_eq!(small.into_inner(), Bytes::from_static(b"hello"));
    let seen = world
        .service
        .observed
        .last(Method::Unary)
        .expect("the service saw it");
    let host = format!("{}-{}.{DOMAIN}", world.service.addr.port(), world.key);
    let authority = seen.authority.unwrap_or_default();
    assert!(authority.starts_with(&host), "{authority} names {host}");

    let eight = big(8 << 20, 7);
    let echoed = client
        .unary(eight.clone(), &[], None)
        .await
        .expect("8 MiB unary");
    assert!(
        echoed.into_inner() == eight,
        "8 MiB came back intact over {over}"
    );

    let failed = client
        .unary(
            Bytes::new(),
            &[("x-fail-with", "5"), ("x-trailer", "t1")],
            None,
        )
        .await
        .expect_err("asked to fail");
    assert_eq!(
        (failed.code(), failed.message()),
        (Code::NotFound, "asked to fail")
    );
    let trailer = failed
        .metadata()
        .get("x-trailer-echo")
        .map(|v| v.to_str().ok());
    assert_eq!(trailer, Some(Some("t1")), "trailing metadata over {over}");

    let mut down = client
        .server_stream(8, 1 << 20, &[])
        .await
        .expect("server stream")
        .into_inner();
    for i in 0..8 {
        let message = down
            .message()
            .await
            .expect("a message")
            .expect("not the end yet");
        assert!(
            message == stream_message(i, 1 << 20),
            "message {i} over {over}"
        );
    }
    assert_eq!(
        down.message().await.expect("the end").map(|m| m.len()),
        None
    );

    // A status after data: real HTTP/2 trailers, behind eight 1 KiB messages.
    let metadata = [("x-fail-with", "9"), ("x-trailer", "t2")];
    let mut down = client
        .server_stream(3, 1024, &metadata)
        .await
        .expect("stream")
        .into_inner();
    for _ in 0..3 {
        down.message()
            .await
            .expect("a message")
            .expect("three of them");
    }
    let status = down
        .message()
        .await
        .expect_err("the status in the trailers");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let trailer = status
        .metadata()
        .get("x-trailer-echo")
        .map(|v| v.to_str().ok());
    assert_eq!(trailer, Some(Some("t2")), "trailers after data over {over}");

    let up = vec![Bytes::from_static(b"a"), big(8 << 20, 3), big(100 << 10, 5)];
    let answer = client
        .client_stream(stream::iter(up.clone()))
        .await
        .expect("client stream");
    assert_eq!(
        answer.into_inner(),
        summary(&up),
        "client stream over {over}"
    );

    let (tx, messages) = outbox();
    let mut echoes = client.bidi(messages).await.expect("bidi").into_inner();
    for word in ["one", "two", "three"] {
        tx.send(Bytes::from(word)).await.expect("send");
        let echo = echoes
            .message()
            .await
            .expect("an echo")
            .expect("not the end");
        assert_eq!(echo, Bytes::from(word), "bidi over {over}");
    }
    drop(tx);
    assert_eq!(echoes.message().await.expect("the end"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_kind_over_h2c_and_https() {
    let world = World::start(TestEdge::builder().https(), "open", &[]).await;
    every_call_kind(&world.client().await, &world, "h2c").await;
    every_call_kind(&world.tls_client().await, &world, "https").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellations_reach_the_service() {
    let world = World::start(TestEdge::builder(), "open", &[]).await;
    let client = world.client().await;

    let status = client
        .wait(Some(Duration::from_millis(300)))
        .await
        .expect_err("Wait never answers");
    // tonic's client says CANCELLED ("Timeout expired") when its own timer fires first.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let ended = world.service.observed.wait_ended().await;
    assert!(
        ended.grpc_timeout.is_some(),
        "the service got the deadline: {ended:?}"
    );
    assert!(ended.after < WAIT, "{ended:?}");

    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.wait(None).await }
    });
    until("the service runs the second Wait", || async {
        world
            .service
            .observed
            .requests()
            .iter()
            .filter(|s| s.method == Method::Wait)
            .count()
            == 2
    })
    .await;
    waiting.abort();
    until("the service saw the call cancelled", || async {
        world.service.observed.ended().len() == 2
    })
    .await;
    let cancelled = &world.service.observed.ended()[1];
    assert_eq!(cancelled.grpc_timeout, None, "{cancelled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_tunnel_takes_the_token_as_metadata() {
    let world = World::start(TestEdge::builder().https(), "authenticated", &[]).await;
    let token = world.devbox.auth_token.clone().expect("a token");
    for client in [world.client().await, world.tls_client().await] {
        let answer = client
            .clone()
            .with_bearer(&token)
            .unary(Bytes::from_static(b"hi"), &[], None)
            .await
            .expect("the token lets the call through");
        assert_eq!(answer.into_inner(), Bytes::from_static(b"hi"));
        let seen = world.service.observed.last(Method::Unary).expect("seen");
        assert!(
            seen.metadata.get("authorization").is_none(),
            "the token was stripped"
        );

        for client in [client.clone(), client.with_bearer("wrong-token")] {
            let status = client
                .unary(Bytes::from_static(b"hi"), &[], None)
                .await
                .expect_err("no valid token");
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert!(status.message().contains("token"), "{status:?}");
        }
    }
    let calls = world.service.observed.requests().len();
    assert_eq!(
        calls, 2,
        "only the calls with the token reached the service"
    );
}

/// The status of a small unary call to `url`.
async fn status_of(url: &str) -> tonic::Status {
    let client = EchoClient::connect_h2c(url).await.expect("connects");
    client
        .unary(Bytes::from_static(b"x"), &[], None)
        .await
        .expect_err("the edge answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_answers_grpc_calls_with_grpc_statuses() {
    let nothing = tokio_listener().await.local_addr().expect("addr").port();
    let denied = tokio_listener().await;
    let denied_port = denied.local_addr().expect("addr").port().to_string();
    let builder = TestEdge::builder().flag("agents.wait", "1s");
    let mut world = World::start(builder, "open", &[("forward.deny_ports", &denied_port)]).await;

    let unknown = world
        .edge
        .url(world.service.addr.port(), "nosuchtunnelkey0000000000", "");
    let cases = [
        (unknown, Code::NotFound, "no tunnel"),
        (
            world.h2c(nothing),
            Code::Unavailable,
            "nothing is listening",
        ),
        (
            world.h2c(denied.local_addr().expect("addr").port()),
            Code::PermissionDenied,
            "not allowed",
        ),
    ];
    for (url, code, says) in cases {
        let status = status_of(url.trim_end_matches('/')).await;
        assert_eq!(status.code(), code, "{url}: {status:?}");
        assert!(status.message().contains(says), "{url}: {status:?}");
    }

    world.agent.take().expect("the agent").stop().await;
    let started = std::time::Instant::now();
    let status = status_of(&world.h2c(world.service.addr.port())).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not connected"), "{status:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "after the wait window"
    );

    let limited = World::start(
        TestEdge::builder().toml("[limits]\nrate = 1\nburst = 2"),
        "open",
        &[],
    )
    .await;
    let client = limited.client().await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        if let Err(status) = client.unary(Bytes::from_static(b"x"), &[], None).await {
            statuses.push(status);
        }
    }
    let over = statuses.first().expect("some calls were over the rate");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_writer_back() {
    const COUNT: u64 = 200;
    let world = World::start(TestEdge::builder(), "open", &[]).await;
    let client = world.client().await;
    let mut down = client
        .server_stream(COUNT, 1 << 20, &[])
        .await
        .expect("stream")
        .into_inner();
    for i in 0..2 {
        let message = down.message().await.expect("a message").expect("more");
        assert!(message == stream_message(i, 1 << 20));
    }
    // The reader stops; the writer must stop soon after, held back by flow control all the
    // way (HTTP/2 windows at both ends, QUIC's, TCP's), not buffered whole by the tunnel.
    let observed = &world.service.observed;
    let mut last = (observed.sent(), std::time::Instant::now());
    while last.1.elapsed() < Duration::from_secs(1) {
        assert!(last.1.elapsed() < WAIT, "the writer never stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
        if observed.sent() != last.0 {
            last = (observed.sent(), std::time::Instant::now());
        }
    }
    assert!(
        last.0 < 48,
        "the service wrote {} MiB ahead of a reader at 2",
        last.0
    );
    for i in 2..COUNT {
        let message = down.message().await.expect("a message").expect("more");
        assert!(
            message.len() == 1 << 20 && message[0] == (i % 251) as u8,
            "message {i}"
        );
    }
    assert_eq!(
        down.message().await.expect("the end").map(|m| m.len()),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_call_outlives_the_idle_limits_for_requests() {
    let limits = "[limits]\nhead_timeout = \"1s\"\nupgrade_idle = \"1s\"";
    let builder = TestEdge::builder()
        .toml(limits)
        .flag("agents.pool_idle", "1s");
    let world = World::start(builder, "open", &[]).await;
    let client = world.client().await;
    let (tx, messages) = outbox();
    let mut echoes = client.bidi(messages).await.expect("bidi").into_inner();
    for word in ["before", "after"] {
        tx.send(Bytes::from(word)).await.expect("send");
        let echo = echoes
            .message()
            .await
            .expect("an echo")
            .expect("not the end");
        assert_eq!(echo, Bytes::from(word));
        // Quiet for three times every idle limit: the call must stay up.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    drop(tx);
    assert_eq!(echoes.message().await.expect("the end"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_and_server_through_the_tunnel() {
    let edge = TestEdge::builder().https().start().await;
    let devbox = edge.devbox(Some("authenticated")).await;
    let key = devbox.key.clone().expect("tunnel key");
    let token = devbox.auth_token.clone().expect("a token");
    let _agent = TestAgent::start(&edge, &devbox).await;
    let server = python_server().await;
    let authority = format!("{}-{key}.{DOMAIN}", server.port);
    let ca = edge.public_ca.clone().expect("an HTTPS edge");
    let plain = (
        edge.http(),
        format!("{authority}:{}", edge.http().port()),
        None,
    );
    let https = edge.edge().https_addr.expect("an HTTPS listener");
    let tls = (
        https,
        format!("{authority}:{}", https.port()),
        Some(ca.as_path()),
    );
    for (target, authority, ca) in [plain, tls] {
        let got = python_call(target, &authority, Some(&token), ca).await;
        assert_eq!(got["unary"], "ok", "{got}");
        assert_eq!(got["echo_header"], "world", "{got}");
        assert_eq!(got["trailer"], "t1", "{got}");
        assert_eq!(got["fail"]["code"], "NOT_FOUND", "{got}");
        assert_eq!(got["fail"]["trailer"], "why", "{got}");
        assert_eq!(got["server_stream"]["ok"], true, "{got}");
        assert_eq!(got["client_stream"]["sha256_ok"], true, "{got}");
        assert_eq!(
            got["bidi"],
            serde_json::json!(["one", "two", "three"]),
            "{got}"
        );
        assert_eq!(got["deadline"]["code"], "DEADLINE_EXCEEDED", "{got}");
        assert_eq!(got["no_token"]["code"], "UNAUTHENTICATED", "{got}");
        let seen = server.last(Method::Unary).expect("the service saw calls");
        assert!(
            seen.get("authorization").is_none(),
            "the token was stripped: {seen}"
        );
    }
    until("the Python service saw a deadline end", || async {
        server.lines.text().contains("ended deadline")
    })
    .await;
}

/// The value of a series in the edge's metrics.
fn metric(edge: &TestEdge, series: &str) -> u64 {
    let e = edge.edge();
    let text = e.metrics.render(&e.registry);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_calls_shares_one_connection_to_the_service() {
    let world = World::start(TestEdge::builder(), "open", &[]).await;
    let client = world.client().await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let message = Bytes::from(format!("call {i}"));
                client.unary(message, &[], None).await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.expect("task").expect("answered");
        assert_eq!(answer.into_inner(), Bytes::from(format!("call {i}")));
    }
    let series = "burrow_edge_service_connections_total{connection=\"opened\"}";
    assert_eq!(
        metric(&world.edge, series),
        1,
        "20 calls at once on a port without a connection open one stream to the agent"
    );
}
