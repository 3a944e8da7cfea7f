//! Floods, each against an edge of its own with a small limit: connections from one address,
//! requests a second to one tunnel, requests in flight to one devbox.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use burrow_tests::services::http_service;
use burrow_tests::{TestEdge, WAIT};

use crate::assert_status;
use crate::raw::{Answer, Raw, RawBackend};
use crate::shared::{Tunnel, assert_serves};

/// A GET for `host` that closes the connection after the answer.
fn get(host: &str) -> String {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

/// Sends `get(host)` on fresh connections until one is answered 200, up to [`WAIT`]: the edge
/// gives a limit's units back a moment after the client sees its answer.
async fn until_served(edge: &TestEdge, host: &str, case: &str) {
    tokio::time::timeout(WAIT, async {
        loop {
            let mut conn = Raw::connect(edge.http()).await;
            if conn.exchange(get(host)).await.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{case}: not served again within {WAIT:?}"));
}

/// `connections_per_client = 8`: eight kept-alive connections from 127.0.0.1, then a ninth,
/// which is closed at once without an answer; 127.0.0.2 is still served, and 127.0.0.1 again
/// once the eight close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_connections_per_client() {
    const CASE: &str = "flood_connections_per_client";
    let edge = TestEdge::builder()
        .toml("[limits]\nconnections_per_client = 8\nhead_timeout = \"60s\"")
        .start()
        .await;
    let tunnel = Tunnel::start(&edge, "open", &[]).await;
    let echo = http_service("127.0.0.1:0").await;
    let host = tunnel.host(echo.addr.port());
    let keep_alive = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut held = Vec::new();
    for i in 0..8 {
        let mut conn = Raw::connect(edge.http()).await;
        let answer = conn.exchange(&keep_alive).await;
        assert_status(&answer, 200, &format!("{CASE}: connection {i}"));
        held.push(conn);
    }
    let mut ninth = Raw::connect(edge.http()).await;
    let answer = ninth.exchange(&keep_alive).await;
    assert_eq!(answer, Answer::Closed, "{CASE}: the ninth connection");
    let limited = edge
        .edge()
        .metrics
        .limited
        .with_label_values(&["connections"])
        .get();
    assert!(limited >= 1, "{CASE}: no connection counted as limited");

    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut conn = Raw::connect_from(other, edge.http()).await;
    assert_status(
        &conn.exchange(get(&host)).await,
        200,
        &format!("{CASE}: 127.0.0.2"),
    );

    drop(held);
    until_served(&edge, &host, CASE).await;
    assert_eq!(
        echo.seen.lock().expect("lock").requests.len(),
        10,
        "{CASE}: the refused connection's request reached the service"
    );
}

/// `rate = 5, burst = 5`: ten requests at once to one tunnel; those past the burst get 429
/// with `Retry-After` and never reach the service; another tunnel is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_rate() {
    const CASE: &str = "flood_rate";
    let edge = TestEdge::builder()
        .toml("[limits]\nrate = 5\nburst = 5")
        .start()
        .await;
    let flooded = Tunnel::start(&edge, "open", &[]).await;
    let spared = Tunnel::start(&edge, "open", &[]).await;
    let echo = http_service("127.0.0.1:0").await;
    let host = flooded.host(echo.addr.port());
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(Raw::connect(edge.http()).await);
    }
    let started = Instant::now();
    for conn in &mut conns {
        conn.send(get(&host)).await.expect("send");
    }
    let mut answers = Vec::new();
    for conn in &mut conns {
        answers.push(conn.answer().await);
    }
    let took = started.elapsed();
    let ok = answers.iter().filter(|a| a.status() == 200).count();
    let limited: Vec<&Answer> = answers.iter().filter(|a| a.status() == 429).collect();
    assert_eq!(ok + limited.len(), 10, "{CASE}: {answers:?}");
    assert!(ok >= 5, "{CASE}: the burst was not served: {answers:?}");
    // Tokens come back at 5 a second while the ten are under way.
    let refilled = (took.as_secs_f64() * 5.0).ceil() as usize;
    assert!(ok <= 5 + refilled, "{CASE}: {ok} served in {took:?}");
    assert!(!limited.is_empty(), "{CASE}: nothing limited in {took:?}");
    for answer in &limited {
        let retry = answer.response().header("retry-after").unwrap_or("");
        assert!(
            retry.parse::<u32>().is_ok_and(|r| r >= 1),
            "{CASE}: Retry-After {retry:?}"
        );
    }
    assert_eq!(
        echo.seen.lock().expect("lock").requests.len(),
        ok,
        "{CASE}: a limited request reached the service"
    );
    assert_serves(&edge, &spared, &echo, CASE).await;
}

/// `streams_per_devbox = 2`: two requests held open by a service that does not answer, then a
/// third, which gets 503 with `Retry-After`; another devbox is unaffected; once the two end,
/// the devbox is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_streams_per_devbox() {
    const CASE: &str = "flood_streams_per_devbox";
    let edge = TestEdge::builder()
        .toml("[limits]\nstreams_per_devbox = 2")
        .start()
        .await;
    let busy = Tunnel::start(&edge, "open", &[]).await;
    let spared = Tunnel::start(&edge, "open", &[]).await;
    let backend = RawBackend::start().await;
    let echo = http_service("127.0.0.1:0").await;
    let host = busy.host(backend.port);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = Raw::connect(edge.http()).await;
        conn.send(get(&host)).await.expect("send");
        held.push(conn);
    }
    backend.wait_accepted(2).await;

    let mut third = Raw::connect(edge.http()).await;
    let answer = third.exchange(get(&host)).await;
    assert_status(&answer, 503, CASE);
    let retry = answer.response().header("retry-after").unwrap_or("");
    assert!(
        retry.parse::<u32>().is_ok_and(|r| r >= 1),
        "{CASE}: Retry-After {retry:?}"
    );
    assert_eq!(
        backend.accepted(),
        2,
        "{CASE}: the third reached the service"
    );
    assert_serves(&edge, &spared, &echo, CASE).await;

    backend.release();
    for conn in &mut held {
        assert_status(
            &conn.answer().await,
            200,
            &format!("{CASE}: a held request"),
        );
    }
    until_served(&edge, &host, CASE).await;
    assert_serves(&edge, &busy, &echo, CASE).await;
}
