//! Long-lived and concurrent traffic through the tunnel, with real clients: a WebSocket session
//! (tokio-tungstenite), a server-sent event stream read as it arrives (hyper), many HTTP/2
//! requests multiplexed on one connection (curl), and two ports served at once.

use std::time::{Duration, Instant};

use burrow_tests::{DOMAIN, Devbox, TestAgent, TestEdge, WAIT, services};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// An edge, an open tunnel and its connected agent.
async fn tunnel(edge: &TestEdge) -> (Devbox, String, TestAgent) {
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let agent = TestAgent::start(edge, &devbox).await;
    (devbox, key, agent)
}

/// The public host of `port` in the tunnel `key`.
fn host(port: u16, key: &str) -> String {
    format!("{port}-{key}.{DOMAIN}")
}

/// The next message that is not a Pong (a server may interleave pongs with echoes).
async fn next_message<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("a WebSocket message in time")
            .expect("the WebSocket is still open")
            .expect("a well-formed WebSocket message");
        if !matches!(msg, Message::Pong(_)) {
            return msg;
        }
    }
}

/// A WebSocket to `port` of tunnel `key` through the edge, and the edge's 101.
async fn websocket(
    edge: &TestEdge,
    key: &str,
    port: u16,
) -> (
    tokio_tungstenite::WebSocketStream<TcpStream>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let url = format!("ws://{}:{}/", host(port, key), edge.http().port());
    let request = url.into_client_request().expect("a WebSocket request");
    let tcp = TcpStream::connect(edge.http())
        .await
        .expect("connect to the edge");
    timeout(WAIT, tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("the WebSocket handshake finishes in time")
        .expect("the edge switches protocols")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_tunnel() {
    let edge = TestEdge::start().await;
    let (_devbox, key, _agent) = tunnel(&edge).await;
    let service = services::ws_echo().await;

    let (mut ws, response) = websocket(&edge, &key, service.port()).await;
    assert_eq!(response.status(), 101);

    ws.send(Message::text("hello through the tunnel"))
        .await
        .expect("send text");
    match next_message(&mut ws).await {
        Message::Text(text) => assert_eq!(text.as_str(), "hello through the tunnel"),
        other => panic!("expected the text echoed, got {other:?}"),
    }

    let small = Bytes::from_static(&[0, 1, 2, 0xfe, 0xff]);
    ws.send(Message::Binary(small.clone()))
        .await
        .expect("send binary");
    match next_message(&mut ws).await {
        Message::Binary(data) => assert_eq!(data, small),
        other => panic!("expected the binary echoed, got {other:?}"),
    }

    // 1 MiB, well past one QUIC packet and one socket buffer, within tungstenite's default
    // 16 MiB frame and 64 MiB message limits.
    let big: Bytes = (0..1024 * 1024u64)
        .map(services::pattern)
        .collect::<Vec<u8>>()
        .into();
    ws.send(Message::Binary(big.clone()))
        .await
        .expect("send 1 MiB");
    match next_message(&mut ws).await {
        Message::Binary(data) => {
            assert_eq!(data.len(), big.len(), "the 1 MiB echo has the same length");
            assert!(data == big, "the 1 MiB echo differs from what was sent");
        }
        other => panic!("expected the 1 MiB binary echoed, got {:?}", kind(&other)),
    }

    let payload = Bytes::from_static(b"are you there?");
    ws.send(Message::Ping(payload.clone()))
        .await
        .expect("send ping");
    let pong = timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(data))) => return data,
                Some(Ok(_)) => continue,
                other => panic!("the WebSocket ended before a pong: {other:?}"),
            }
        }
    })
    .await
    .expect("a pong in time");
    assert_eq!(pong, payload, "the pong carries the ping's payload");

    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    })))
    .await
    .expect("send close");
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the service's close frame, got {other:?}"),
    }
    // The handshake is complete once the service closes the connection and the edge passes the
    // end on: the stream ends instead of hanging.
    match timeout(WAIT, ws.next())
        .await
        .expect("the WebSocket ends in time")
    {
        None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {}
        other => panic!("expected the WebSocket to end, got {other:?}"),
    }
}

/// A message's kind and size, for failure messages that would otherwise print a MiB.
fn kind(msg: &Message) -> String {
    match msg {
        Message::Text(t) => format!("Text({} bytes)", t.len()),
        Message::Binary(b) => format!("Binary({} bytes)", b.len()),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_stream_as_written() {
    let edge = TestEdge::start().await;
    let (_devbox, key, _agent) = tunnel(&edge).await;
    let service = services::http_service("127.0.0.1:0").await;

    let tcp = TcpStream::connect(edge.http())
        .await
        .expect("connect to the edge");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let request = Request::get("/sse")
        .header("host", host(service.addr.port(), &key))
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = timeout(WAIT, sender.send_request(request))
        .await
        .expect("response headers in time")
        .expect("a response");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    assert_eq!(content_type, Some("text/event-stream"));

    let mut body = response.into_body();
    let mut text = String::new();
    let mut first_event_at: Option<Instant> = None;
    timeout(WAIT, async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the SSE body reads without error");
            if let Some(data) = frame.data_ref() {
                text.push_str(std::str::from_utf8(data).expect("SSE is UTF-8"));
                if first_event_at.is_none() && text.contains("data: event 0\n") {
                    first_event_at = Some(Instant::now());
                }
            }
        }
    })
    .await
    .expect("the whole SSE stream in time");

    let expected: String = (0..5)
        .map(|i| format!("id: {i}\ndata: event {i}\n\n"))
        .collect();
    assert_eq!(text, expected, "all five events, in order, unchanged");
    let first = first_event_at.expect("event 0 arrived");
    let last_write = service
        .seen
        .lock()
        .expect("lock")
        .sse_last_write
        .expect("service wrote event 4");
    assert!(
        first < last_write,
        "event 0 arrived {:?} after the service wrote its last event: the edge buffered the stream",
        first.duration_since(last_write)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_many_concurrent_requests_over_one_connection() {
    const N: usize = 50;
    let edge = TestEdge::builder().https().start().await;
    let (_devbox, key, _agent) = tunnel(&edge).await;
    let service = services::http_service("127.0.0.1:0").await;
    let ca = edge.public_ca.clone().expect("an HTTPS edge has a CA");

    let mut args: Vec<String> = [
        "--http2",
        "--parallel",
        "--parallel-max",
        "50",
        "-sS",
        "--max-time",
        "60",
        "-w",
        "%{http_version} %{response_code} %{num_connects}\\n",
        "--cacert",
    ]
    .map(str::to_owned)
    .into();
    args.push(ca.display().to_string());
    for i in 0..N {
        args.push("-o".to_owned());
        args.push("/dev/null".to_owned());
        args.push(edge.https_url(service.addr.port(), &key, &format!("/?i={i}")));
    }
    // tokio's `process` feature is not enabled in the workspace: run curl on a blocking thread.
    let output = timeout(
        WAIT * 3,
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(&args)
                .output()
                .expect("run curl")
        }),
    )
    .await
    .expect("curl finishes in time")
    .expect("curl thread");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "curl failed: {}\n{stderr}",
        output.status
    );

    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), N, "one line per transfer:\n{stdout}");
    let mut connects = 0;
    for line in &lines {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "{line}");
        assert_eq!(fields[0], "2", "every transfer speaks HTTP/2: {line}");
        assert_eq!(fields[1], "200", "every transfer succeeds: {line}");
        connects += fields[2].parse::<u32>().expect("num_connects");
    }
    // curl waits for the first connection to confirm multiplexing before opening more; a few
    // connections at most (not fifty) shows the requests shared one.
    assert!(
        connects <= 3,
        "{connects} connections for {N} requests:\n{stdout}"
    );
    assert_eq!(service.seen.lock().expect("lock").requests.len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ports_at_once_through_one_tunnel() {
    let edge = TestEdge::start().await;
    let (_devbox, key, _agent) = tunnel(&edge).await;
    let a = services::http_service("127.0.0.1:0").await;
    let b = services::http_service("127.0.0.1:0").await;
    let (host_a, host_b) = (host(a.addr.port(), &key), host(b.addr.port(), &key));

    let (reply_a, reply_b) = timeout(WAIT, async {
        tokio::join!(
            burrow_tests::request(edge.http(), "GET", &host_a, "/from-a", &[], vec![]),
            burrow_tests::request(edge.http(), "GET", &host_b, "/from-b", &[], vec![]),
        )
    })
    .await
    .expect("both answers in time");
    for (reply, path) in [(reply_a, "/from-a"), (reply_b, "/from-b")] {
        let reply = reply.expect("an answer");
        assert_eq!(reply.status, 200, "{}", reply.text());
        let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(json["path"], path);
    }
    // Each service saw exactly its own request: the edge routed by port.
    for (service, host) in [(&a, &host_a), (&b, &host_b)] {
        let seen = service.seen.lock().expect("lock");
        assert_eq!(
            seen.requests.len(),
            1,
            "{} saw {:?}",
            service.addr,
            seen.requests
        );
        let got = seen.requests[0]
            .iter()
            .find(|(k, _)| k == "host")
            .map(|(_, v)| v);
        assert_eq!(got, Some(host));
    }
}

/// `Edge::stop` returns only once everything the edge started has ended: a WebSocket still
/// open and a client still sending its request head when the drain grace runs out are cut off,
/// not left running behind a stopped edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cuts_off_what_is_still_open_after_the_drain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut edge = TestEdge::builder()
        .toml("drain_grace = \"1s\"")
        .start()
        .await;
    let (_devbox, key, _agent) = tunnel(&edge).await;
    let service = services::ws_echo().await;
    let (mut ws, _) = websocket(&edge, &key, service.port()).await;
    ws.send(Message::text("before the stop"))
        .await
        .expect("send");
    assert!(matches!(next_message(&mut ws).await, Message::Text(_)));

    let mut slow = TcpStream::connect(edge.http()).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: slow")
        .await
        .expect("half a head");

    let stopping = Instant::now();
    timeout(WAIT, edge.stop())
        .await
        .expect("the edge stops within the drain grace and a little");
    println!("stopped after {:?}", stopping.elapsed());

    // Both are closed by the time `stop` returned: reading finds the end at once (the head
    // timeout, 10 s, would close the slow one much later).
    let mut buf = [0u8; 64];
    let read = timeout(Duration::from_secs(2), slow.read(&mut buf))
        .await
        .expect("the slow client's connection is closed, not left waiting for its head");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "no answer, just the end: {read:?}"
    );
    let ended = timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the WebSocket is closed when the edge has stopped"
    );
}
