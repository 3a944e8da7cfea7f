//! The platform's side of a tunnel: its options (`http_keep_alive`, `wake_on_http`,
//! `create_time_ms`) in the admin API, kept across restarts, and `last_activity_ms`, which
//! traffic through a keep-alive tunnel moves (HTTP, WebSocket messages, raw TCP bytes) and
//! traffic through another does not.

use std::time::{SystemTime, UNIX_EPOCH};

use burrow_tests::services::{http_service, ws_echo};
use burrow_tests::{TestAgent, TestEdge, WAIT, curl, until};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    i64::try_from(since.as_millis()).expect("ms")
}

async fn devbox_view(edge: &TestEdge, id: &str) -> Value {
    let (status, view) = edge.admin("GET", &format!("/v1/devboxes/{id}"), None).await;
    assert_eq!(status, 200, "{view}");
    view
}

/// Waits until the clock has passed `ms`, so that a later touch shows as later.
async fn after(ms: i64) {
    until("the clock moves on", || async move { now_ms() > ms }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_options_default_change_one_at_a_time_and_persist() {
    let edge = TestEdge::start().await;
    let before = now_ms();
    let body = json!({ "id": "box-1", "tunnel": { "auth_mode": "open" } });
    let (status, created) = edge.admin("POST", "/v1/devboxes", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    let tunnel = &created["tunnel"];
    assert_eq!(tunnel["http_keep_alive"], true, "{tunnel}");
    assert_eq!(tunnel["wake_on_http"], false, "{tunnel}");
    let created_ms = tunnel["create_time_ms"].as_i64().expect("create_time_ms");
    assert!((before..=now_ms()).contains(&created_ms), "{created_ms}");
    assert_eq!(
        devbox_view(&edge, "box-1").await["last_activity_ms"],
        Value::Null
    );

    let path = "/v1/devboxes/box-1/tunnel";
    let wake = json!({ "auth_mode": "open", "wake_on_http": true });
    let (status, changed) = edge.admin("POST", path, Some(wake)).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["wake_on_http"], true);
    assert_eq!(changed["http_keep_alive"], true, "left out: unchanged");
    let quiet = json!({ "auth_mode": "authenticated", "http_keep_alive": false });
    let (status, changed) = edge.admin("POST", path, Some(quiet)).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (&changed["http_keep_alive"], &changed["wake_on_http"]),
        (&json!(false), &json!(true)),
        "{changed}"
    );
    assert_eq!(changed["tunnel_key"], tunnel["tunnel_key"], "same key");
    assert_eq!(
        changed["create_time_ms"], created_ms,
        "same tunnel, same creation"
    );

    let bad = json!({ "auth_mode": "open", "wake_on_http": "yes" });
    let (status, error) = edge.admin("POST", path, Some(bad)).await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("wake_on_http")),
        "{error}"
    );

    let edge = edge.restart().await;
    let view = devbox_view(&edge, "box-1").await;
    assert_eq!(view["tunnel"]["http_keep_alive"], false, "{view}");
    assert_eq!(view["tunnel"]["wake_on_http"], true, "{view}");
    assert_eq!(view["tunnel"]["create_time_ms"], created_ms, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_last_activity_on_keep_alive_tunnels_only() {
    let edge = TestEdge::start().await;
    let busy = edge.devbox(Some("open")).await;
    let quiet = edge.devbox(Some("open")).await;
    let off = json!({ "auth_mode": "open", "http_keep_alive": false });
    let path = format!("/v1/devboxes/{}/tunnel", quiet.id);
    assert_eq!(edge.admin("POST", &path, Some(off)).await.0, 200);
    let _agents = (
        TestAgent::start(&edge, &busy).await,
        TestAgent::start(&edge, &quiet).await,
    );
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();

    let start = now_ms();
    for devbox in [&busy, &quiet] {
        let key = devbox.key.as_deref().expect("key");
        let got = curl(&[&edge.url(port, key, "/")]).await;
        assert_eq!(got.code, 200, "{got:?}");
    }
    let seen = devbox_view(&edge, &busy.id).await["last_activity_ms"].as_i64();
    let seen = seen.expect("a request moved it");
    assert!(seen >= start && seen <= now_ms(), "{seen}");
    let untouched = devbox_view(&edge, &quiet.id).await;
    assert_eq!(untouched["last_activity_ms"], Value::Null, "{untouched}");

    // A WebSocket's messages move it too, long after its handshake.
    let ws = ws_echo().await;
    let key = busy.key.as_deref().expect("key");
    let url = format!(
        "ws://{}-{key}.tunnel.localhost:{}/",
        ws.port(),
        edge.http().port()
    );
    let tcp = tokio::net::TcpStream::connect(edge.http())
        .await
        .expect("connect");
    let (mut socket, _) = tokio_tungstenite::client_async(url, tcp)
        .await
        .expect("handshake");
    let handshake = devbox_view(&edge, &busy.id).await["last_activity_ms"].as_i64();
    let handshake = handshake.expect("the handshake moved it");
    after(handshake).await;
    socket.send(Message::text("ping")).await.expect("send");
    let echo = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("in time");
    assert_eq!(echo.expect("open").expect("message"), Message::text("ping"));
    let moved = devbox_view(&edge, &busy.id).await["last_activity_ms"].as_i64();
    assert!(
        moved.expect("still set") > handshake,
        "a message moved it on"
    );
    let untouched = devbox_view(&edge, &quiet.id).await;
    assert_eq!(untouched["last_activity_ms"], Value::Null, "{untouched}");
}
