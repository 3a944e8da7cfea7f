//! Access modes and the edge's own answers when something is missing.

use burrow_tests::services::http_service;
use burrow_tests::testkit::ports::ClosedPort;
use burrow_tests::{DOMAIN, TestAgent, TestEdge, WAIT, curl, request};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_tunnel_needs_its_token_and_never_forwards_it() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("authenticated")).await;
    let token = devbox
        .auth_token
        .clone()
        .expect("auth token returned at creation");
    let key = devbox.key.clone().expect("key");
    let _agent = TestAgent::start(&edge, &devbox).await;
    let service = http_service("127.0.0.1:0").await;
    let url = edge.url(service.addr.port(), &key, "/private");

    let none = curl(&["-i", &url]).await;
    assert_eq!(none.code, 401, "{none:?}");
    assert!(
        none.body
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        none.body
    );

    let wrong = curl(&["-H", "Authorization: Bearer not-the-token", &url]).await;
    assert_eq!(wrong.code, 401, "{wrong:?}");

    let other_scheme = curl(&["-H", &format!("Authorization: Basic {token}"), &url]).await;
    assert_eq!(other_scheme.code, 401, "{other_scheme:?}");

    let right = curl(&["-H", &format!("Authorization: Bearer {token}"), &url]).await;
    assert_eq!(right.code, 200, "{right:?}");
    let json: Value = serde_json::from_str(&right.body).expect("json");
    assert_eq!(json["path"], "/private");

    let seen = service.seen.lock().expect("lock");
    assert_eq!(
        seen.requests.len(),
        1,
        "only the authorized request reached the service"
    );
    for (name, value) in &seen.requests[0] {
        assert!(
            !value.contains(&token),
            "the token reached the service in `{name}`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnel_needs_no_token_and_leaves_app_authorization_alone() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let _agent = TestAgent::start(&edge, &devbox).await;
    let service = http_service("127.0.0.1:0").await;
    let url = edge.url(service.addr.port(), &key, "/");
    assert_eq!(curl(&[&url]).await.code, 200);
    let with_app_auth = curl(&["-H", "Authorization: Basic YXBwOnB3", &url]).await;
    let json: Value = serde_json::from_str(&with_app_auth.body).expect("json");
    assert_eq!(json["headers"]["authorization"], "Basic YXBwOnB3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_things_get_clear_answers() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();

    // Agent not connected yet: 503 with Retry-After.
    let away = curl(&["-i", &edge.url(port, &key, "/")]).await;
    assert_eq!(away.code, 503, "{away:?}");
    assert!(
        away.body.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        away.body
    );
    assert!(away.body.contains("not connected"), "{}", away.body);

    let _agent = TestAgent::start_with(&edge, &devbox, &[("forward.deny_ports", "1,2")]).await;
    assert_eq!(curl(&[&edge.url(port, &key, "/")]).await.code, 200);

    // Unknown key: 404.
    let unknown = curl(&[&edge.url(port, "abcdefghijklmnopqrstuvwxyz", "/")]).await;
    assert_eq!(unknown.code, 404, "{unknown:?}");

    // Malformed hosts: 400.
    for host in [
        format!("nokey.{DOMAIN}"),
        format!("0-{key}.{DOMAIN}"),
        format!("70000-{key}.{DOMAIN}"),
        "example.com".to_owned(),
    ] {
        let reply = request(edge.http(), "GET", &host, "/", &[], vec![])
            .await
            .expect("request");
        assert_eq!(reply.status, 400, "{host}: {}", reply.text());
    }

    // Nothing listening: 502 naming the port.
    let closed_port = ClosedPort::new();
    let closed = closed_port.port();
    let nothing = curl(&[&edge.url(closed, &key, "/")]).await;
    assert_eq!(nothing.code, 502, "{nothing:?}");
    assert!(
        nothing.body.contains(&format!(
            "nothing is listening on port {closed} in this devbox"
        )),
        "{}",
        nothing.body
    );

    // Denied by the agent's port policy: 403.
    let denied = curl(&[&edge.url(2, &key, "/")]).await;
    assert_eq!(denied.code, 403, "{denied:?}");
    assert!(
        denied.body.contains("port 2 is not allowed"),
        "{}",
        denied.body
    );

    // Browsers get a short HTML page.
    let html = curl(&["-H", "Accept: text/html", &edge.url(closed, &key, "/")]).await;
    assert!(html.body.starts_with("<!doctype html>"), "{}", html.body);
    assert!(html.body.contains("nothing is listening"), "{}", html.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_stops_makes_the_url_answer_503() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let service = http_service("127.0.0.1:0").await;
    let agent = TestAgent::start(&edge, &devbox).await;
    let url = edge.url(service.addr.port(), &key, "/");
    assert_eq!(curl(&[&url]).await.code, 200);
    agent.stop().await;
    // The edge learns of the close from the agent's CONNECTION_CLOSE; wait for the admin view.
    tokio::time::timeout(WAIT, async {
        loop {
            let (_, json) = edge
                .admin("GET", &format!("/v1/devboxes/{}", devbox.id), None)
                .await;
            if json["agent"]["connected"] == false {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("edge notices the agent left");
    assert_eq!(curl(&[&url]).await.code, 503);
}
