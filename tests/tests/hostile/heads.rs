//! Hostile request heads and bodies: broken request lines, oversized heads, ambiguous framing
//! (request smuggling), broken chunked bodies, clients that trickle.

use std::time::{Duration, Instant};

use burrow_tests::services::{HttpService, http_service, sha256_hex};
use burrow_tests::{TestEdge, WAIT, request};
use serde_json::Value;

use crate::raw::{Raw, RawBackend};
use crate::shared::{Tunnel, assert_serves, shared};
use crate::{assert_bad_or_closed, assert_status};

/// A request line that is not HTTP at all (`GARBAGE`), with a valid Host.
#[tokio::test]
async fn head_garbage_request_line() {
    const CASE: &str = "head_garbage_request_line";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = s.open.host(backend.port);
    let (answer, _) = s.raw(format!("GARBAGE\r\nHost: {host}\r\n\r\n")).await;
    assert_bad_or_closed(&answer, CASE);
    backend.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// An HTTP version that does not exist (`HTTP/9.9`).
#[tokio::test]
async fn head_unknown_http_version() {
    const CASE: &str = "head_unknown_http_version";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = s.open.host(backend.port);
    let (answer, _) = s
        .raw(format!("GET / HTTP/9.9\r\nHost: {host}\r\n\r\n"))
        .await;
    assert_bad_or_closed(&answer, CASE);
    backend.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// A 10 KiB header against `max_head_bytes = 8192`.
#[tokio::test]
async fn head_over_max_head_bytes() {
    const CASE: &str = "head_over_max_head_bytes";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = s.open.host(backend.port);
    let big = "a".repeat(10 * 1024);
    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {big}\r\n\r\n"
        ))
        .await;
    assert_status(&answer, 431, CASE);
    backend.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// 40 short header lines (well under 8 KiB) against `max_headers = 20`.
#[tokio::test]
async fn head_over_max_headers() {
    const CASE: &str = "head_over_max_headers";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = s.open.host(backend.port);
    let lines: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (answer, _) = s
        .raw(format!("GET / HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n"))
        .await;
    assert_status(&answer, 431, CASE);
    backend.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// 5000 tiny headers (a header flood, about 50 KB).
#[tokio::test]
async fn head_header_flood() {
    const CASE: &str = "head_header_flood";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = s.open.host(backend.port);
    let lines: String = (0..5000).map(|i| format!("X-{i}: 1\r\n")).collect();
    let (answer, _) = s
        .raw(format!("GET / HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n"))
        .await;
    assert_status(&answer, 431, CASE);
    backend.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// Request smuggling: `Content-Length` and `Transfer-Encoding: chunked` on one request
/// (`Content-Length` first if `cl_first`), with a second request hidden behind the end of the
/// chunked body but inside the declared length.
async fn smuggle(case: &str, cl_first: bool) {
    let s = shared().await;
    let echo = s.echo_service().await;
    let host = s.open.host(echo.addr.port());
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let body = format!("0\r\n\r\n{smuggled}");
    let cl = format!("Content-Length: {}\r\n", body.len());
    let te = "Transfer-Encoding: chunked\r\n";
    let framing = if cl_first {
        cl + te
    } else {
        format!("{te}{cl}")
    };
    let (answer, mut conn) = s
        .raw(format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n{body}"
        ))
        .await;
    // Transfer-Encoding wins: the body ends at `0\r\n\r\n`, so the service saw none.
    assert_status(&answer, 200, case);
    let json: Value = serde_json::from_slice(&answer.response().body).expect("echo JSON");
    assert_eq!(json["path"], "/", "{case}: {json}");
    assert_eq!(json["len"], 0, "{case}: {json}");
    // The edge closes after the response, so the rest is never read as a request.
    let rest = conn.closed_within(WAIT).await;
    assert!(
        rest.is_empty(),
        "{case}: a second answer came back: {}",
        String::from_utf8_lossy(&rest)
    );
    let requests = echo.seen.lock().expect("lock").requests.clone();
    assert_eq!(
        requests.len(),
        1,
        "{case}: the smuggled request reached the service: {requests:?}"
    );
    let has = |name: &str| requests[0].iter().any(|(n, _)| n == name);
    assert!(
        !(has("content-length") && has("transfer-encoding")),
        "{case}: the service got both framings: {:?}",
        requests[0]
    );
    s.assert_serving(case).await;
}

/// `Content-Length` then `Transfer-Encoding: chunked`, a request smuggled behind the body.
#[tokio::test]
async fn smuggle_cl_then_te() {
    smuggle("smuggle_cl_then_te", true).await;
}

/// `Transfer-Encoding: chunked` then `Content-Length`, a request smuggled behind the body.
#[tokio::test]
async fn smuggle_te_then_cl() {
    smuggle("smuggle_te_then_cl", false).await;
}

/// A request the edge must refuse with 400 before anything reaches the service.
async fn refused_with_400(case: &str, head_and_body: impl Fn(&str) -> String) {
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = s.open.host(backend.port);
    let (answer, _) = s.raw(head_and_body(&host)).await;
    assert_status(&answer, 400, case);
    backend.assert_untouched(case);
    s.assert_serving(case).await;
}

/// `Transfer-Encoding: gzip`: chunked is not the last coding, so the length is unknowable.
#[tokio::test]
async fn te_gzip_not_chunked() {
    refused_with_400("te_gzip_not_chunked", |host| {
        format!("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\n\r\nabc")
    })
    .await;
}

/// `Transfer-Encoding: chunked, gzip`: chunked present but not last.
#[tokio::test]
async fn te_chunked_not_last() {
    refused_with_400("te_chunked_not_last", |host| {
        format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
        )
    })
    .await;
}

/// `Transfer-Encoding : chunked`: whitespace before the colon, a classic smuggling vector.
#[tokio::test]
async fn te_space_before_colon() {
    refused_with_400("te_space_before_colon", |host| {
        format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        )
    })
    .await;
}

/// Two different `Content-Length` values.
#[tokio::test]
async fn two_content_lengths() {
    refused_with_400("two_content_lengths", |host| {
        format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        )
    })
    .await;
}

/// `Transfer-Encoding` on an HTTP/1.0 request (1.0 has no chunked coding).
#[tokio::test]
async fn te_on_http10() {
    refused_with_400("te_on_http10", |host| {
        format!("POST / HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    })
    .await;
}

/// Obsolete line folding: a header value continued on the next line.
#[tokio::test]
async fn head_obs_fold() {
    refused_with_400("head_obs_fold", |host| {
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n b\r\n\r\n")
    })
    .await;
}

/// A NUL byte inside a header value.
#[tokio::test]
async fn head_nul_in_value() {
    refused_with_400("head_nul_in_value", |host| {
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-A: a\0b\r\n\r\n")
    })
    .await;
}

/// A chunked body whose second chunk size is not hex (`zz`), after a valid head and chunk,
/// with a request hidden behind it: the rest of a broken body must never be read as a request.
#[tokio::test]
async fn bad_chunk_size() {
    const CASE: &str = "bad_chunk_size";
    let s = shared().await;
    // A service that reads the whole body before it answers.
    let backend = s.holding_backend().await;
    let hidden = s.echo_service().await;
    let host = s.open.host(backend.port);
    let (answer, mut conn) = s
        .raw(format!(
            "POST /chunks HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\nzz\r\nGET /hidden HTTP/1.1\r\nHost: {}\r\n\r\n0\r\n\r\n",
            s.open.host(hidden.addr.port())
        ))
        .await;
    assert!(
        matches!(answer.status(), 400 | 502 | 0),
        "{CASE}: expected 400, 502 or a close, got {answer:?}"
    );
    let rest = conn.closed_within(WAIT).await;
    assert!(
        rest.is_empty(),
        "{CASE}: a second answer came back: {}",
        String::from_utf8_lossy(&rest)
    );
    // The head was valid, so the service was dialed and may have been given what came before
    // the bad chunk; it must never get the rest, nor the end of a whole request.
    backend.wait_ended(backend.accepted()).await;
    for got in backend.received() {
        let text = String::from_utf8_lossy(&got);
        assert!(
            !text.contains("hidden"),
            "{CASE}: the service got: {text:?}"
        );
        assert!(
            !got.ends_with(b"0\r\n\r\n"),
            "{CASE}: the service got a complete request: {text:?}"
        );
    }
    let seen = hidden.seen.lock().expect("lock").requests.len();
    assert_eq!(seen, 0, "{CASE}: the hidden request was served");
    s.assert_serving(CASE).await;
}

/// `CONNECT` to an address in the devbox: the edge is no forward proxy; it answers 405, no tunnel is made,
/// the address is never dialed, and bytes sent after the answer reach nothing.
#[tokio::test]
async fn connect_not_tunneled() {
    const CASE: &str = "connect_not_tunneled";
    let s = shared().await;
    let service = s.raw_backend().await;
    let target = s.raw_backend().await;
    let host = s.open.host(service.port);
    let (answer, mut conn) = s
        .raw(format!(
            "CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: {host}\r\n\r\n",
            target.port
        ))
        .await;
    // The edge refuses CONNECT itself: no tunnel is made.
    assert_status(&answer, 405, CASE);
    // What follows is read as HTTP again (RFC 9110, 9.3.6): garbage gets the edge's own 400,
    // never a relay.
    let _ = conn.send("SSH-2.0-hostile\r\n\r\n").await;
    let rest = conn.closed_within(WAIT).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 400"),
        "{CASE}: after the answer: {rest}"
    );
    service.wait_ended(service.accepted()).await;
    for got in service.received() {
        let text = String::from_utf8_lossy(&got);
        assert!(
            !text.contains("SSH-2.0"),
            "{CASE}: relayed to the service: {text:?}"
        );
    }
    target.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// An edge with `head_timeout = "2s"`, an open tunnel and an echo.
async fn slow_edge() -> (TestEdge, Tunnel, HttpService) {
    let edge = TestEdge::builder()
        .toml("[limits]\nhead_timeout = \"2s\"")
        .start()
        .await;
    let tunnel = Tunnel::start(&edge, "open", &[]).await;
    let echo = http_service("127.0.0.1:0").await;
    (edge, tunnel, echo)
}

/// Slowloris: a request head trickled a byte every half second, past `head_timeout = "2s"`,
/// while another client asks for a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_slowloris() {
    const CASE: &str = "head_slowloris";
    let (edge, tunnel, echo) = slow_edge().await;
    let backend = RawBackend::start().await;
    let head = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nX-Slow: {}\r\n\r\n",
        tunnel.host(backend.port),
        "z".repeat(40)
    );
    let mut conn = Raw::connect(edge.http()).await;
    let started = Instant::now();
    let trickle = async {
        for byte in head.bytes() {
            if conn.send([byte]).await.is_err() {
                break;
            }
            // The pace of the attack; the read also notices the close.
            let read = tokio::time::timeout(Duration::from_millis(500), conn.fill()).await;
            if let Ok(Ok(0) | Err(_)) = read {
                break;
            }
        }
        let sent_for = started.elapsed();
        (sent_for, conn.closed_within(WAIT).await)
    };
    let meanwhile = async {
        let reply = request(
            edge.http(),
            "GET",
            &tunnel.host(echo.addr.port()),
            "/meanwhile",
            &[],
            vec![],
        )
        .await
        .expect("a request meanwhile");
        (reply.status, started.elapsed())
    };
    let ((closed_after, before_close), (status, served_after)) = tokio::join!(trickle, meanwhile);
    assert!(
        closed_after >= Duration::from_millis(1500),
        "{CASE}: closed after {closed_after:?}, before the head timeout"
    );
    assert!(
        closed_after < WAIT,
        "{CASE}: the head of {} bytes was still being read after {closed_after:?}",
        head.len()
    );
    let said = String::from_utf8_lossy(&before_close);
    assert!(
        before_close.is_empty() || said.starts_with("HTTP/1.1 408"),
        "{CASE}: before the close the edge sent {said:?}"
    );
    assert_eq!(status, 200, "{CASE}: the other client");
    assert!(
        served_after < closed_after,
        "{CASE}: the other client waited for the slow one"
    );
    backend.assert_untouched(CASE);
    assert_serves(&edge, &tunnel, &echo, CASE).await;
}

/// A POST whose 12-byte body trickles for longer than `head_timeout`, while another client is
/// served: the body is the service's business and is streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body() {
    const CASE: &str = "slow_body";
    let (edge, tunnel, echo) = slow_edge().await;
    let slow = http_service("127.0.0.1:0").await;
    let body = b"slowly, slow";
    let mut conn = Raw::connect(edge.http()).await;
    conn.send(format!(
        "POST /slow HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
        tunnel.host(slow.addr.port()),
        body.len()
    ))
    .await
    .expect("send head");
    let started = Instant::now();
    let trickle = async {
        for byte in body {
            // The pace of the client.
            tokio::time::sleep(Duration::from_millis(250)).await;
            conn.send([*byte])
                .await
                .expect("the edge keeps reading the body");
        }
        let answer = conn.answer().await;
        (answer, started.elapsed())
    };
    let meanwhile = async {
        let reply = request(
            edge.http(),
            "GET",
            &tunnel.host(echo.addr.port()),
            "/meanwhile",
            &[],
            vec![],
        )
        .await
        .expect("a request meanwhile");
        (reply.status, started.elapsed())
    };
    let ((answer, finished), (status, served)) = tokio::join!(trickle, meanwhile);
    assert_eq!(status, 200, "{CASE}: the other client");
    assert!(served < finished, "{CASE}: the other client waited");
    assert!(
        finished > Duration::from_secs(2),
        "{CASE}: the body took {finished:?}, not longer than head_timeout"
    );
    assert_status(&answer, 200, CASE);
    let json: Value = serde_json::from_slice(&answer.response().body).expect("echo JSON");
    assert_eq!(json["len"], body.len(), "{CASE}: {json}");
    assert_eq!(json["sha256"], sha256_hex(body), "{CASE}: {json}");
    assert_eq!(slow.seen.lock().expect("lock").requests.len(), 1, "{CASE}");
    assert_serves(&edge, &tunnel, &echo, CASE).await;
}
