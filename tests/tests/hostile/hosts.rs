//! Hostile hosts: labels that are almost `{port}-{key}`, other domains, no host at all, an
//! HTTPS request whose Host is not the name its TLS connection was made for, and requests that
//! name two tunnels at once (two Host lines, an absolute-form target, HTTP/2 `:authority`).

use burrow_tests::WAIT;
use serde_json::Value;

use crate::assert_status;
use crate::raw::{Answer, connect_tls};
use crate::shared::{Shared, shared};

/// Sends a GET with `host` as its Host header (raw bytes) to the shared edge.
async fn get(s: &Shared, host: &[u8]) -> Answer {
    let mut bytes = b"GET / HTTP/1.1\r\nHost: ".to_vec();
    bytes.extend_from_slice(host);
    bytes.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    s.raw(bytes).await.0
}

/// A host built from the shared tunnel's key and a raw backend's port gets `status`, and the
/// backend is never dialed.
async fn host_case(case: &str, status: u16, make: impl Fn(u16, &str) -> Vec<u8>) {
    let s = shared().await;
    let backend = s.raw_backend().await;
    let host = make(backend.port, &s.open.key);
    let answer = get(s, &host).await;
    assert_status(&answer, status, case);
    backend.assert_untouched(case);
    s.assert_serving(case).await;
}

/// Port 0.
#[tokio::test]
async fn host_port_zero() {
    host_case("host_port_zero", 400, |_, key| {
        format!("0-{key}.tunnel.localhost").into_bytes()
    })
    .await;
}

/// The backend's port plus 65536: a parser that wrapped to 16 bits would dial the backend.
#[tokio::test]
async fn host_port_over_65535() {
    host_case("host_port_over_65535", 400, |port, key| {
        format!("{}-{key}.tunnel.localhost", 65536 + u32::from(port)).into_bytes()
    })
    .await;
}

/// A port in exponent notation (`1e3`).
#[tokio::test]
async fn host_port_exponent() {
    host_case("host_port_exponent", 400, |_, key| {
        format!("1e3-{key}.tunnel.localhost").into_bytes()
    })
    .await;
}

/// The backend's port with a leading zero.
#[tokio::test]
async fn host_port_leading_zero() {
    host_case("host_port_leading_zero", 400, |port, key| {
        format!("0{port}-{key}.tunnel.localhost").into_bytes()
    })
    .await;
}

/// The backend's port with a plus sign (`u16::from_str` would take it).
#[tokio::test]
async fn host_port_plus_sign() {
    host_case("host_port_plus_sign", 400, |port, key| {
        format!("+{port}-{key}.tunnel.localhost").into_bytes()
    })
    .await;
}

/// No port before the dash (`-key`).
#[tokio::test]
async fn host_port_missing() {
    host_case("host_port_missing", 400, |_, key| {
        format!("-{key}.tunnel.localhost").into_bytes()
    })
    .await;
}

/// No key after the dash (`3000-`).
#[tokio::test]
async fn host_key_missing() {
    host_case("host_key_missing", 400, |port, _| {
        format!("{port}-.tunnel.localhost").into_bytes()
    })
    .await;
}

/// A key with a non-ASCII letter, sent as raw UTF-8 bytes.
#[tokio::test]
async fn host_unicode_key() {
    host_case("host_unicode_key", 400, |port, key| {
        format!("{port}-{}é.tunnel.localhost", &key[..key.len() - 1]).into_bytes()
    })
    .await;
}

/// A punycode label (`xn--...`) as the key: a hyphen is not a key character.
#[tokio::test]
async fn host_punycode_key() {
    host_case("host_punycode_key", 400, |port, key| {
        format!("{port}-xn--{key}.tunnel.localhost").into_bytes()
    })
    .await;
}

/// The tunnel host under another domain.
#[tokio::test]
async fn host_other_domain() {
    host_case("host_other_domain", 400, |port, key| {
        format!("{port}-{key}.example.com").into_bytes()
    })
    .await;
}

/// The tunnel domain as a prefix of another (`...tunnel.localhost.example.com`).
#[tokio::test]
async fn host_domain_as_prefix() {
    host_case("host_domain_as_prefix", 400, |port, key| {
        format!("{port}-{key}.tunnel.localhost.example.com").into_bytes()
    })
    .await;
}

/// A look-alike domain that ends with the tunnel domain's text (`eviltunnel.localhost`).
#[tokio::test]
async fn host_domain_lookalike() {
    host_case("host_domain_lookalike", 400, |port, key| {
        format!("{port}-{key}.eviltunnel.localhost").into_bytes()
    })
    .await;
}

/// An extra label in front (`a.{port}-{key}.tunnel.localhost`).
#[tokio::test]
async fn host_nested_label() {
    host_case("host_nested_label", 400, |port, key| {
        format!("a.{port}-{key}.tunnel.localhost").into_bytes()
    })
    .await;
}

/// A `:port` suffix that is not a number.
#[tokio::test]
async fn host_bad_port_suffix() {
    host_case("host_bad_port_suffix", 400, |port, key| {
        format!("{port}-{key}.tunnel.localhost:abc").into_bytes()
    })
    .await;
}

/// A key of valid characters but the wrong length: unknown, 404.
#[tokio::test]
async fn host_unknown_key() {
    host_case("host_unknown_key", 404, |port, key| {
        format!("{port}-{}.tunnel.localhost", "a".repeat(key.len() + 3)).into_bytes()
    })
    .await;
}

/// The tunnel host in upper case: hosts are case-insensitive, so it is routed.
#[tokio::test]
async fn host_uppercase_routed() {
    const CASE: &str = "host_uppercase_routed";
    let s = shared().await;
    let echo = s.echo_service().await;
    let host = s.open.host(echo.addr.port()).to_ascii_uppercase();
    let answer = get(s, host.as_bytes()).await;
    assert_status(&answer, 200, CASE);
    let json: Value = serde_json::from_slice(&answer.response().body).expect("echo JSON");
    assert_eq!(json["path"], "/", "{CASE}: {json}");
    assert_eq!(echo.seen.lock().expect("lock").requests.len(), 1, "{CASE}");
    s.assert_serving(CASE).await;
}

/// An HTTP/1.1 request without a Host header.
#[tokio::test]
async fn host_missing() {
    const CASE: &str = "host_missing";
    let s = shared().await;
    let (answer, _) = s.raw("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_status(&answer, 400, CASE);
    s.assert_serving(CASE).await;
}

/// A disabled tunnel answers exactly like a key that never existed, so keys cannot be probed.
#[tokio::test]
async fn host_disabled_same_as_unknown() {
    const CASE: &str = "host_disabled_same_as_unknown";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let devbox = s.edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("a tunnel key");
    let (status, json) = s
        .edge
        .admin(
            "DELETE",
            &format!("/v1/devboxes/{}/tunnel", devbox.id),
            None,
        )
        .await;
    assert_eq!(status, 204, "{CASE}: disable: {json}");
    let disabled = get(
        s,
        format!("{}-{key}.tunnel.localhost", backend.port).as_bytes(),
    )
    .await;
    let unknown_key: String = key.chars().rev().collect();
    let unknown = get(
        s,
        format!("{}-{unknown_key}.tunnel.localhost", backend.port).as_bytes(),
    )
    .await;
    assert_status(&disabled, 404, CASE);
    assert_status(&unknown, 404, CASE);
    let (d, u) = (disabled.response(), unknown.response());
    assert_eq!(d.body, u.body, "{CASE}: bodies differ");
    assert_eq!(
        d.header("content-type"),
        u.header("content-type"),
        "{CASE}: content types differ"
    );
    backend.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// HTTPS: a TLS connection made for one tunnel's name (SNI) carrying a request for another.
#[tokio::test]
async fn https_sni_host_mismatch() {
    const CASE: &str = "https_sni_host_mismatch";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let ca = s.edge.public_ca.as_deref().expect("HTTPS on");
    let https = s.edge.edge().https_addr.expect("HTTPS listener");
    let sni = s.other.host(backend.port);
    let mut conn = connect_tls(https, ca, &sni).await;
    let answer = conn
        .exchange(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.open.host(backend.port)
        ))
        .await;
    assert_status(&answer, 421, CASE);
    backend.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// HTTPS: the same request on a connection made for its own name is served.
#[tokio::test]
async fn https_sni_matches() {
    const CASE: &str = "https_sni_matches";
    let s = shared().await;
    let echo = s.echo_service().await;
    let ca = s.edge.public_ca.as_deref().expect("HTTPS on");
    let https = s.edge.edge().https_addr.expect("HTTPS listener");
    let host = s.open.host(echo.addr.port());
    let mut conn = connect_tls(https, ca, &host).await;
    let answer = conn
        .exchange(format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_status(&answer, 200, CASE);
    let json: Value = serde_json::from_slice(&answer.response().body).expect("echo JSON");
    assert_eq!(
        json["headers"]["x-forwarded-proto"], "https",
        "{CASE}: {json}"
    );
    assert_eq!(echo.seen.lock().expect("lock").requests.len(), 1, "{CASE}");
    s.assert_serving(CASE).await;
}

/// Two Host header lines naming different tunnels. RFC 9112, 3.2: a server MUST answer 400,
/// since a proxy in front of the edge may pick the other line and disagree on the tunnel.
#[tokio::test]

async fn host_duplicate() {
    const CASE: &str = "host_duplicate";
    let s = shared().await;
    let first = s.raw_backend().await;
    let second = s.raw_backend().await;
    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.open.host(first.port),
            s.other.host(second.port)
        ))
        .await;
    assert_status(&answer, 400, CASE);
    first.assert_untouched(CASE);
    second.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// An absolute-form request target naming one tunnel, with a Host naming another. RFC 9112,
/// 3.2.2: the target's authority wins and Host is ignored; so the request goes to the
/// target's tunnel, or is refused, but never to the Host's.
#[tokio::test]

async fn host_absolute_form_disagrees() {
    const CASE: &str = "host_absolute_form_disagrees";
    let s = shared().await;
    let by_host = s.raw_backend().await;
    let by_target = s.echo_service().await;
    let (answer, _) = s
        .raw(format!(
            "GET http://{}/abs HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.other.host(by_target.addr.port()),
            s.open.host(by_host.port)
        ))
        .await;
    assert!(
        matches!(answer.status(), 400 | 200),
        "{CASE}: expected 400 or 200 from the target's tunnel, got {answer:?}"
    );
    by_host.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}

/// HTTP/2 (cleartext, prior knowledge) with `:authority` naming one tunnel and a Host header
/// naming another. RFC 9113, 8.3.1: such a request is malformed; it must not reach the Host's
/// tunnel.
#[tokio::test]

async fn h2_authority_host_disagree() {
    use bytes::Bytes;
    use http_body_util::Empty;
    const CASE: &str = "h2_authority_host_disagree";
    let s = shared().await;
    let by_host = s.raw_backend().await;
    let by_authority = s.echo_service().await;
    let tcp = tokio::net::TcpStream::connect(s.http())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri(format!(
            "http://{}/h2",
            s.other.host(by_authority.addr.port())
        ))
        .header("host", s.open.host(by_host.port))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let status = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("an answer in time")
        .map(|r| r.status().as_u16());
    assert!(
        matches!(status, Ok(400 | 200) | Err(_)),
        "{CASE}: expected 400, a reset, or 200 from the :authority's tunnel, got {status:?}"
    );
    by_host.assert_untouched(CASE);
    s.assert_serving(CASE).await;
}
