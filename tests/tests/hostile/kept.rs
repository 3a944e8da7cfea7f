//! One kept-alive public connection, many requests: each is routed, checked and rewritten on
//! its own, exactly as a first request on a new connection would be. The edge keeps its
//! streams to services between requests (issue 15), so nothing a first request established
//! (a port, a tunnel, a token that was let through) may carry over to the next.

use burrow_tests::WAIT;
use serde_json::Value;

use crate::assert_status;
use crate::raw::{Answer, Raw};
use crate::shared::shared;

/// A GET of `path` for `host` with header `lines`, keeping the connection.
fn get(host: &str, path: &str, lines: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n")
}

/// The echo's JSON in a 200 answer.
#[track_caller]
fn echoed(answer: &Answer, case: &str) -> Value {
    assert_status(answer, 200, case);
    serde_json::from_slice(&answer.response().body).expect("echo JSON")
}

#[tokio::test]
async fn every_request_on_a_kept_connection_is_routed_and_checked_on_its_own() {
    let s = shared().await;
    let (a, b) = (s.echo_service().await, s.echo_service().await);
    let seen =
        |echo: &burrow_tests::services::HttpService| echo.seen.lock().unwrap().requests.len();
    let (port_a, port_b) = (a.addr.port(), b.addr.port());
    let mut conn = Raw::connect(s.http()).await;

    let first = conn.exchange(get(&s.open.host(port_a), "/first", "")).await;
    assert_eq!(echoed(&first, "first")["path"], "/first");

    // Another port of the same tunnel: the other service, not the first one's stream.
    let case = "another port";
    let answer = conn.exchange(get(&s.open.host(port_b), "/b", "")).await;
    assert_eq!(echoed(&answer, case)["path"], "/b");
    assert_eq!((seen(&a), seen(&b)), (1, 1), "{case}");

    // Another tunnel, whose agent is another connection.
    let case = "another tunnel";
    let answer = conn
        .exchange(get(&s.other.host(port_a), "/other", ""))
        .await;
    assert_eq!(echoed(&answer, case)["path"], "/other");
    assert_eq!(seen(&a), 2, "{case}");

    // An authenticated tunnel: let through with its token, then refused without one and
    // with another tunnel's, on the same connection.
    let bearer = |token: &str| format!("Authorization: Bearer {token}\r\n");
    let case = "the right token";
    let answer = conn
        .exchange(get(&s.auth.host(port_a), "/auth", &bearer(s.auth.token())))
        .await;
    let json = echoed(&answer, case);
    assert!(
        json["headers"].get("authorization").is_none(),
        "{case}: {json}"
    );
    for (case, lines) in [
        ("no token after a good one", String::new()),
        ("another tunnel's token", bearer(s.auth2.token())),
    ] {
        let answer = conn
            .exchange(get(&s.auth.host(port_a), "/auth", &lines))
            .await;
        assert_status(&answer, 401, case);
    }
    assert_eq!(seen(&a), 3, "the refused requests reached the service");

    // A host that names no tunnel, between good requests.
    let answer = conn
        .exchange(get("3000-nosuchkey.tunnel.localhost", "/", ""))
        .await;
    assert_status(&answer, 404, "a host of no tunnel");

    // Forged forwarding headers and hop-by-hop fields are stripped from a kept request too.
    let case = "forged headers";
    let lines =
        "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nConnection: x-secret\r\nX-Secret: 1\r\n";
    let answer = conn
        .exchange(get(&s.open.host(port_a), "/forged", lines))
        .await;
    let json = echoed(&answer, case);
    let headers = &json["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{case}: {json}");
    assert!(headers.get("x-real-ip").is_none(), "{case}: {json}");
    assert!(headers.get("x-secret").is_none(), "{case}: {json}");

    // A smuggling attempt on the kept connection: Transfer-Encoding wins, the hidden request
    // never reaches the service, and the edge closes the connection after its answer.
    let case = "smuggling on a kept connection";
    let hidden = get(&s.open.host(port_a), "/smuggled", "");
    let body = format!("0\r\n\r\n{hidden}");
    let answer = conn
        .exchange(format!(
            "POST /post HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
            s.open.host(port_a),
            body.len()
        ))
        .await;
    let json = echoed(&answer, case);
    assert_eq!(
        (json["path"].clone(), json["len"].clone()),
        ("/post".into(), 0.into()),
        "{case}"
    );
    let rest = conn.closed_within(WAIT).await;
    assert!(
        rest.is_empty(),
        "{case}: {}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(seen(&a), 5, "{case}: the service saw the hidden request");
    s.assert_serving(case).await;
}
