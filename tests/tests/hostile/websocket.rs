//! Hostile upgrades: malformed WebSocket handshakes, a service that does not switch, and
//! upgrades to protocols the edge does not carry.

use burrow_tests::WAIT;
use serde_json::Value;

use crate::assert_status;
use crate::raw::Answer;
use crate::shared::shared;

/// A valid `Sec-WebSocket-Key` (RFC 6455's example).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A malformed handshake (`method`, extra header lines) is refused with `status` and never
/// reaches the service.
async fn refused(case: &str, method: &str, lines: &str, status: u16) -> Answer {
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = s.open.host(backend.port);
    let (answer, _) = s
        .raw(format!(
            "{method} / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             {lines}Content-Length: 0\r\n\r\n"
        ))
        .await;
    assert_status(&answer, status, case);
    backend.assert_untouched(case);
    s.assert_serving(case).await;
    answer
}

/// `Sec-WebSocket-Version: 8`: 426, naming the version the edge speaks.
#[tokio::test]
async fn ws_version_8() {
    const CASE: &str = "ws_version_8";
    let lines = format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n");
    let answer = refused(CASE, "GET", &lines, 426).await;
    assert_eq!(
        answer.response().header("sec-websocket-version"),
        Some("13"),
        "{CASE}: {answer:?}"
    );
}

/// A `Sec-WebSocket-Key` that is not 16 bytes of base64 (`abc`).
#[tokio::test]
async fn ws_malformed_key() {
    refused(
        "ws_malformed_key",
        "GET",
        "Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n",
        400,
    )
    .await;
}

/// No `Sec-WebSocket-Key` at all.
#[tokio::test]
async fn ws_missing_key() {
    refused(
        "ws_missing_key",
        "GET",
        "Sec-WebSocket-Version: 13\r\n",
        400,
    )
    .await;
}

/// A POST carrying a WebSocket handshake.
#[tokio::test]
async fn ws_post_upgrade() {
    let lines = format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n");
    refused("ws_post_upgrade", "POST", &lines, 400).await;
}

/// A valid handshake to a service that answers 200 instead of 101: the client gets the 200
/// and the connection stays HTTP; WebSocket bytes sent after it are not carried to the service.
#[tokio::test]
async fn ws_service_answers_200() {
    const CASE: &str = "ws_service_answers_200";
    let s = shared().await;
    let echo = s.echo_service().await;
    let host = s.open.host(echo.addr.port());
    let (answer, mut conn) = s
        .raw(format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ))
        .await;
    assert_status(&answer, 200, CASE);
    // A masked text frame, "hello", as a client that believed it switched would send.
    let frame = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let after = conn.exchange(frame).await;
    assert!(
        matches!(after.status(), 400 | 0),
        "{CASE}: the frame after the 200 got {after:?}"
    );
    let rest = conn.closed_within(WAIT).await;
    assert!(
        rest.is_empty(),
        "{CASE}: then: {}",
        String::from_utf8_lossy(&rest)
    );
    let requests = echo.seen.lock().expect("lock").requests.clone();
    assert_eq!(requests.len(), 1, "{CASE}: {requests:?}");
    s.assert_serving(CASE).await;
}

/// An upgrade to something other than WebSocket is ignored: a normal answer, and neither
/// `Upgrade` nor `Connection` (nor what `Connection` names) reaches the service.
async fn ignored(case: &str, version: &str, lines: &str) {
    let s = shared().await;
    let echo = s.echo_service().await;
    let host = s.open.host(echo.addr.port());
    let (answer, _) = s
        .raw(format!("GET /up {version}\r\nHost: {host}\r\n{lines}\r\n"))
        .await;
    assert_status(&answer, 200, case);
    let json: Value = serde_json::from_slice(&answer.response().body).expect("echo JSON");
    let headers = json["headers"].as_object().expect("headers");
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(
            !headers.contains_key(name),
            "{case}: the service got `{name}`: {json}"
        );
    }
    assert_eq!(echo.seen.lock().expect("lock").requests.len(), 1, "{case}");
    s.assert_serving(case).await;
}

/// `Upgrade: h2c` (cleartext HTTP/2) with its settings header.
#[tokio::test]
async fn upgrade_h2c_ignored() {
    ignored(
        "upgrade_h2c_ignored",
        "HTTP/1.1",
        "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    )
    .await;
}

/// `Upgrade: IRC/6.9`, a protocol nobody carries.
#[tokio::test]
async fn upgrade_other_protocol_ignored() {
    ignored(
        "upgrade_other_protocol_ignored",
        "HTTP/1.1",
        "Upgrade: IRC/6.9\r\nConnection: Upgrade\r\n",
    )
    .await;
}

/// `Upgrade: websocket` without `Connection: Upgrade`: not a handshake, a plain request.
#[tokio::test]
async fn upgrade_without_connection_ignored() {
    ignored(
        "upgrade_without_connection_ignored",
        "HTTP/1.1",
        &format!("Upgrade: websocket\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"),
    )
    .await;
}

/// A WebSocket handshake on HTTP/1.0, which has no upgrades: a plain request.
#[tokio::test]
async fn upgrade_on_http10_ignored() {
    ignored(
        "upgrade_on_http10_ignored",
        "HTTP/1.0",
        &format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        ),
    )
    .await;
}
