//! The admin API: every call, its errors, and a tunnel that survives an edge restart.

use burrow_tests::services::http_service;
use burrow_tests::{TestAgent, TestEdge, WAIT, curl};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_call_does_what_it_says() {
    let edge = TestEdge::start().await;
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();

    // Register without a tunnel, with a chosen id.
    let (status, created) = edge
        .admin("POST", "/v1/devboxes", Some(json!({"id": "box-1"})))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["id"], "box-1");
    assert!(
        created["agent_token"].as_str().expect("token").len() >= 43,
        "256-bit token"
    );
    assert!(created.get("tunnel").is_none());
    let devbox = burrow_tests::Devbox {
        id: "box-1".into(),
        agent_token: created["agent_token"].as_str().expect("token").into(),
        key: None,
        auth_token: None,
    };

    let (status, got) = edge.admin("GET", "/v1/devboxes/box-1", None).await;
    assert_eq!(status, 200);
    assert_eq!(got["tunnel"], serde_json::Value::Null);
    assert_eq!(got["agent"]["connected"], false);

    let agent = TestAgent::start(&edge, &devbox).await;
    let (_, got) = edge.admin("GET", "/v1/devboxes/box-1", None).await;
    assert_eq!(got["agent"]["connected"], true, "{got}");
    assert!(got["agent"]["rtt_ms"].as_f64().is_some(), "{got}");
    assert!(got["agent"]["since"].as_u64().is_some(), "{got}");

    // Enable (option 2): open.
    let (status, tunnel) = edge
        .admin(
            "POST",
            "/v1/devboxes/box-1/tunnel",
            Some(json!({"auth_mode": "open"})),
        )
        .await;
    assert_eq!(status, 200, "{tunnel}");
    let key = tunnel["tunnel_key"].as_str().expect("key").to_owned();
    assert!(
        key.len() >= 26
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );
    assert!(tunnel.get("auth_token").is_none());
    let template = tunnel["url_template"].as_str().expect("template");
    assert!(template.contains(&format!("{{port}}-{key}.")), "{template}");
    // The agent hears about the tunnel on its control stream.
    let mut status_rx = agent.agent.status.clone();
    tokio::time::timeout(
        WAIT,
        status_rx.wait_for(|s| s.tunnel.as_ref().is_some_and(|t| t.key == key)),
    )
    .await
    .expect("agent told of the tunnel")
    .expect("agent running");
    assert_eq!(curl(&[&edge.url(port, &key, "/")]).await.code, 200);

    // Switch to authenticated: same key, a token, and the old way in is closed.
    let (status, auth) = edge
        .admin(
            "POST",
            "/v1/devboxes/box-1/tunnel",
            Some(json!({"auth_mode": "authenticated"})),
        )
        .await;
    assert_eq!(status, 200, "{auth}");
    assert_eq!(
        auth["tunnel_key"],
        key.as_str(),
        "the key stays for the life of the tunnel"
    );
    let token = auth["auth_token"].as_str().expect("auth token").to_owned();
    assert_eq!(curl(&[&edge.url(port, &key, "/")]).await.code, 401);
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(
        curl(&["-H", &bearer, &edge.url(port, &key, "/")])
            .await
            .code,
        200
    );

    // List.
    let (status, list) = edge.admin("GET", "/v1/devboxes", None).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().expect("array").len(), 1);
    assert_eq!(list[0]["tunnel"]["auth_mode"], "authenticated");
    assert!(
        !list.to_string().contains(&token),
        "tokens are shown once only"
    );

    // Disable: the URL answers 404 from then on.
    let (status, _) = edge
        .admin("DELETE", "/v1/devboxes/box-1/tunnel", None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        curl(&["-H", &bearer, &edge.url(port, &key, "/")])
            .await
            .code,
        404
    );

    // Delete: the agent's token is revoked and its connection closed.
    let (status, _) = edge.admin("DELETE", "/v1/devboxes/box-1", None).await;
    assert_eq!(status, 204);
    tokio::time::timeout(WAIT, status_rx.wait_for(|s| !s.connected))
        .await
        .expect("agent disconnected by the delete")
        .expect("agent running");
    let (status, _) = edge.admin("GET", "/v1/devboxes/box-1", None).await;
    assert_eq!(status, 404);
    tokio::time::timeout(
        WAIT,
        status_rx.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused"))
        }),
    )
    .await
    .expect("a revoked token is refused on reconnect")
    .expect("agent running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_bad_tokens_and_bad_input() {
    let edge = TestEdge::start().await;
    let (status, body) = edge.admin_with("GET", "/v1/devboxes", None, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = edge
        .admin_with("GET", "/v1/devboxes", None, Some("wrong"))
        .await;
    assert_eq!(status, 401);
    let (status, _) = edge
        .admin_with("POST", "/v1/devboxes", Some(json!({})), Some("wrong"))
        .await;
    assert_eq!(status, 401);
    let (_, list) = edge.admin("GET", "/v1/devboxes", None).await;
    assert_eq!(list, json!([]), "a refused call changed nothing");

    let cases = [
        (
            "POST",
            "/v1/devboxes",
            json!({"tunnel": {"auth_mode": "public"}}),
            400,
            "auth_mode",
        ),
        (
            "POST",
            "/v1/devboxes",
            json!({"id": "no spaces"}),
            400,
            "id",
        ),
        ("POST", "/v1/devboxes", json!({"name": "x"}), 400, "name"),
        (
            "POST",
            "/v1/devboxes/nope/tunnel",
            json!({"auth_mode": "open"}),
            404,
            "nope",
        ),
        ("DELETE", "/v1/devboxes/nope", json!(null), 404, "nope"),
        ("GET", "/v1/elsewhere", json!(null), 404, "elsewhere"),
    ];
    for (method, path, body, want, mentions) in cases {
        let body = (!body.is_null()).then_some(body);
        let (status, answer) = edge.admin(method, path, body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
        let message = answer["error"].as_str().expect("error message");
        assert!(message.contains(mentions), "{method} {path}: {message}");
    }
    let (status, _) = edge
        .admin("POST", "/v1/devboxes", Some(json!({"id": "dup"})))
        .await;
    assert_eq!(status, 201);
    let (status, answer) = edge
        .admin("POST", "/v1/devboxes", Some(json!({"id": "dup"})))
        .await;
    assert_eq!(status, 409, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_survives_an_edge_restart_with_the_same_key_and_token() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("authenticated")).await;
    let key = devbox.key.clone().expect("key");
    let token = devbox.auth_token.clone().expect("token");
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let bearer = format!("Authorization: Bearer {token}");
    {
        let _agent = TestAgent::start(&edge, &devbox).await;
        assert_eq!(
            curl(&["-H", &bearer, &edge.url(port, &key, "/")])
                .await
                .code,
            200
        );
    }
    let admin_token = edge.edge().admin_token.clone();

    let edge = edge.restart().await;
    assert_eq!(
        edge.edge().admin_token,
        admin_token,
        "the generated admin token persists"
    );
    let (status, got) = edge
        .admin("GET", &format!("/v1/devboxes/{}", devbox.id), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(got["tunnel"]["tunnel_key"], key.as_str());
    // The same agent token still works, and so do the same URL and bearer token.
    let _agent = TestAgent::start(&edge, &devbox).await;
    assert_eq!(
        curl(&["-H", &bearer, &edge.url(port, &key, "/")])
            .await
            .code,
        200
    );
    assert_eq!(curl(&[&edge.url(port, &key, "/")]).await.code, 401);
}
