//! Agent connections before their hello is accepted: anyone can complete a QUIC handshake
//! with the edge's agent listener, so what such a connection can hold is bounded. Each case
//! is a raw QUIC client (the agent's own TLS settings, no agent behind it) from 127.0.0.2,
//! while a real agent from 127.0.0.1 must go on being served.

use std::net::SocketAddr;
use std::time::Duration;

use burrow_agent::config::Liveness;
use burrow_tests::services::http_service;
use burrow_tests::{TestEdge, WAIT};

use crate::shared::{Tunnel, assert_serves};

/// A QUIC client endpoint on 127.0.0.2 that trusts `edge`'s agent CA.
fn hostile_client(edge: &TestEdge) -> (quinn::Endpoint, quinn::ClientConfig, String) {
    let e = edge.edge();
    let liveness = Liveness {
        heartbeat_interval: Duration::from_secs(5),
        heartbeat_timeout: Duration::from_secs(3),
        nudge_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(20),
        resume_tick: Duration::from_secs(1),
        resume_threshold: Duration::from_secs(2),
    };
    let config = burrow_agent::tls::client_config(e.agent_ca.as_deref(), &liveness, 16)
        .expect("client config");
    let bind: SocketAddr = "127.0.0.2:0".parse().expect("an address");
    let endpoint = quinn::Endpoint::client(bind).expect("a client endpoint on 127.0.0.2");
    (endpoint, config, e.server_name.clone())
}

/// A connection that has not said hello holds little: one stream (before the bounds: four,
/// three of them never read, so about 1.25 MB each of quinn's default stream window), of
/// which the edge reads one frame (16 KiB at most) before it closes the connection for not
/// starting with a hello; and a connection that says nothing at all is closed at the hello
/// deadline (5 s). A real agent is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_handshake_without_hello_is_bounded() {
    const CASE: &str = "agent_handshake_without_hello_is_bounded";
    let edge = TestEdge::start().await;
    let tunnel = Tunnel::start(&edge, "open", &[]).await;
    let echo = http_service("127.0.0.1:0").await;
    let (endpoint, config, name) = hostile_client(&edge);
    let connect = || async {
        endpoint
            .connect_with(config.clone(), edge.agents_addr(), &name)
            .expect("connect")
            .await
            .expect("the handshake completes")
    };

    let silent = connect().await;
    let conn = connect().await;
    let (mut send, _recv) = conn.open_bi().await.expect("one stream is allowed");
    let second = tokio::time::timeout(Duration::from_secs(1), conn.open_bi()).await;
    assert!(
        second.is_err(),
        "{CASE}: a second stream opened before the hello"
    );

    // A frame header declaring the longest body the edge reads, then bytes until the edge
    // stops taking them (the write stalls) or closes the connection.
    let mut taken = 0usize;
    let mut frame = vec![0x01, 0x3f, 0xff];
    frame.resize(4 * 1024, 0x61);
    let chunk = vec![0x61u8; 4 * 1024];
    let mut next: &[u8] = &frame;
    while taken < 1024 * 1024 {
        match tokio::time::timeout(Duration::from_secs(1), send.write(next)).await {
            Ok(Ok(n)) => taken += n,
            Ok(Err(_)) | Err(_) => break,
        }
        next = &chunk;
    }
    println!("{CASE}: the edge took {taken} bytes before a hello");
    assert!(
        taken <= 48 * 1024,
        "{CASE}: the edge took {taken} bytes from a connection without a hello"
    );
    let closed = tokio::time::timeout(WAIT, conn.closed()).await;
    assert!(
        closed.is_ok(),
        "{CASE}: a stream of garbage did not close the connection"
    );

    let since = std::time::Instant::now();
    let closed = tokio::time::timeout(WAIT, silent.closed()).await;
    assert!(
        closed.is_ok(),
        "{CASE}: a silent connection outlived the hello deadline"
    );
    println!(
        "{CASE}: the silent connection closed {:?} later",
        since.elapsed()
    );

    assert_serves(&edge, &tunnel, &echo, CASE).await;
}

/// `agent_handshakes_per_source = 4`: four connections from 127.0.0.2 that never say hello
/// hold that address's places; a fifth gets no answer while an agent from 127.0.0.1 connects
/// and serves; once the four close, the fifth completes (its QUIC stack kept resending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_handshakes_per_source() {
    const CASE: &str = "agent_handshakes_per_source";
    let edge = TestEdge::builder()
        .toml("[limits]\nagent_handshakes_per_source = 4")
        .start()
        .await;
    let (endpoint, config, name) = hostile_client(&edge);
    let connect = || {
        endpoint
            .connect_with(config.clone(), edge.agents_addr(), &name)
            .expect("connect")
    };
    let mut held = Vec::new();
    for i in 0..4 {
        let conn = tokio::time::timeout(WAIT, connect())
            .await
            .unwrap_or_else(|_| panic!("{CASE}: connection {i} in time"))
            .unwrap_or_else(|e| panic!("{CASE}: connection {i}: {e}"));
        held.push(conn);
    }
    let mut fifth = Box::pin(connect());
    let early = tokio::time::timeout(Duration::from_millis(1500), &mut fifth).await;
    assert!(
        early.is_err(),
        "{CASE}: the fifth handshake got an answer: {early:?}"
    );
    let limited = edge
        .edge()
        .metrics
        .limited
        .with_label_values(&["handshakes_per_source"])
        .get();
    assert!(limited >= 1, "{CASE}: nothing counted as limited");

    // Another source is not held back: a real agent connects and serves.
    let tunnel = Tunnel::start(&edge, "open", &[]).await;
    let echo = http_service("127.0.0.1:0").await;
    assert_serves(&edge, &tunnel, &echo, CASE).await;

    for conn in held {
        conn.close(0u32.into(), b"done");
    }
    let fifth = tokio::time::timeout(WAIT, fifth)
        .await
        .unwrap_or_else(|_| panic!("{CASE}: the fifth never completed after the four closed"));
    assert!(fifth.is_ok(), "{CASE}: the fifth failed: {fifth:?}");
}
