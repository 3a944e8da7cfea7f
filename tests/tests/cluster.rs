//! Several edges on one PostgreSQL store (`[cluster] store`): what one edge is told, every edge
//! knows. A real PostgreSQL server, real edges and a real agent on loopback.

use std::future::Future;
use std::time::{Duration, Instant};

use burrow_tests::postgres::Postgres;
use burrow_tests::services::http_service;
use burrow_tests::{TestAgent, TestEdge, WAIT, curl, request};
use serde_json::json;

/// How soon an admin change on one edge must show on another.
const EVERY_EDGE_WITHIN: Duration = Duration::from_secs(1);

/// The edge `node` of the cluster on `pg`, with a metrics listener.
async fn edge(pg: &Postgres, node: &str) -> TestEdge {
    TestEdge::builder()
        .toml(&format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[cluster]\nstore = \"{}\"\nnode = \"{node}\"",
            pg.url()
        ))
        .start()
        .await
}

/// Waits until `check` holds; how long it took. Panics after [`WAIT`].
async fn until<F: Future<Output = bool>>(what: &str, check: impl Fn() -> F) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// The status code `url` answers with (and `token` as the bearer token, if given).
async fn code(url: &str, token: Option<&str>) -> u16 {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec!["-o", "/dev/null"];
    if let Some(auth) = &auth {
        args.extend(["-H", auth.as_str()]);
    }
    args.push(url);
    curl(&args).await.code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_on_one_store_share_secrets_devboxes_and_every_change() {
    let pg = Postgres::start().await;
    let one = edge(&pg, "one").await;
    let two = edge(&pg, "two").await;

    // One set of secrets: the same admin token, and the files a single edge generates.
    assert_eq!(
        one.edge().admin_token.expose(),
        two.edge().admin_token.expose()
    );
    for file in ["agent-ca.key", "cookie.key", "reset.key", "admin.token"] {
        let read = |edge: &TestEdge| std::fs::read(edge.state_dir.join(file)).expect(file);
        assert_eq!(read(&one), read(&two), "{file} differs between the edges");
    }

    // Registered through edge 1; its agent reaches edge 2, trusting edge 1's CA file.
    let devbox = one.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let one_ca = one.edge().agent_ca.clone().expect("generated CA");
    let one_ca = one_ca.display().to_string();
    let agent = TestAgent::start_with(&two, &devbox, &[("ca", one_ca.as_str())]).await;
    let service = http_service("127.0.0.1:0").await;
    let url = two.url(service.addr.port(), &key, "/hello");
    assert_eq!(code(&url, None).await, 200, "served through edge 2");
    let (status, view) = two
        .admin("GET", &format!("/v1/devboxes/{}", devbox.id), None)
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["agent"]["connected"], true, "{view}");

    // Made authenticated through edge 1: edge 2 asks for the token within a second.
    let path = format!("/v1/devboxes/{}/tunnel", devbox.id);
    let body = Some(json!({ "auth_mode": "authenticated" }));
    let (status, tunnel) = one.admin("POST", &path, body).await;
    assert_eq!(status, 200, "{tunnel}");
    let token = tunnel["auth_token"].as_str().expect("a token").to_owned();
    let took = until("edge 2 asks for the token", || async {
        code(&url, None).await == 401
    })
    .await;
    println!("a tunnel made authenticated on edge 1 was so on edge 2 after {took:?}");
    assert!(took < EVERY_EDGE_WITHIN, "took {took:?}");
    assert_eq!(code(&url, Some(&token)).await, 200);

    // The token rotated through edge 1: the old one stops working on edge 2.
    let (status, rotated) = one
        .admin("POST", &format!("{path}/rotate-token"), None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    let fresh = rotated["auth_token"].as_str().expect("a token").to_owned();
    let took = until("edge 2 refuses the old token", || async {
        code(&url, Some(&token)).await == 401
    })
    .await;
    assert!(took < EVERY_EDGE_WITHIN, "took {took:?}");
    assert_eq!(code(&url, Some(&fresh)).await, 200);

    // Disabled through edge 1: edge 2 answers 404 and tells its agent.
    let (status, _) = one.admin("DELETE", &path, None).await;
    assert_eq!(status, 204);
    let took = until("edge 2 forgets the tunnel", || async {
        code(&url, Some(&fresh)).await == 404
    })
    .await;
    assert!(took < EVERY_EDGE_WITHIN, "took {took:?}");
    agent
        .wait_for("the tunnel gone", |s| s.tunnel.is_none())
        .await;

    // Deleted through edge 1: edge 2 revokes its agent's session.
    let (status, _) = one
        .admin("DELETE", &format!("/v1/devboxes/{}", devbox.id), None)
        .await;
    assert_eq!(status, 204);
    agent.wait_for("revoked", |s| !s.connected).await;
    let (status, _) = two
        .admin("GET", &format!("/v1/devboxes/{}", devbox.id), None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_edge_routes_from_memory_while_postgres_is_away() {
    let pg = Postgres::start().await;
    let one = edge(&pg, "one").await;
    let devbox = one.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let _agent = TestAgent::start(&one, &devbox).await;
    let service = http_service("127.0.0.1:0").await;
    let url = one.url(service.addr.port(), &key, "/");
    assert_eq!(code(&url, None).await, 200);

    pg.kill().await;
    assert_eq!(code(&url, None).await, 200, "routing needs no database");
    let (status, body) = one.admin("POST", "/v1/devboxes", Some(json!({}))).await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.contains("PostgreSQL is unavailable") && message.contains("try again"),
        "{body}"
    );
    let metrics = one.edge().metrics_addr.expect("metrics listener");
    let ready = request(metrics, "GET", "localhost", "/readyz", &[], Vec::new())
        .await
        .expect("readyz answers");
    let text = String::from_utf8_lossy(&ready.body).into_owned();
    assert_eq!(ready.status, 200, "still ready: {text}");
    assert!(text.contains("admin writes fail"), "{text}");

    pg.start_again().await;
    until("admin writes work again", || async {
        one.admin("POST", "/v1/devboxes", Some(json!({}))).await.0 == 201
    })
    .await;
    assert_eq!(code(&url, None).await, 200);
}

/// `edge`'s `/metrics`.
async fn metrics(edge: &TestEdge) -> String {
    let addr = edge.edge().metrics_addr.expect("metrics listener");
    let reply = request(addr, "GET", "localhost", "/metrics", &[], Vec::new())
        .await
        .expect("metrics answer");
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// The edges holding `devbox`'s agent, as `edge`'s admin API shows them.
async fn holders(edge: &TestEdge, devbox: &str) -> serde_json::Value {
    let (status, view) = edge
        .admin("GET", &format!("/v1/devboxes/{devbox}"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    view["agent"]["edges"].clone()
}

/// `node`'s entry in `edge`'s `GET /v1/cluster`.
async fn node(edge: &TestEdge, node: &str) -> serde_json::Value {
    let (status, cluster) = edge.admin("GET", "/v1/cluster", None).await;
    assert_eq!(status, 200, "{cluster}");
    let nodes = cluster["nodes"].as_array().cloned().unwrap_or_default();
    nodes
        .into_iter()
        .find(|n| n["node"] == node)
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_knows_which_edge_holds_an_agent_and_drops_a_stopped_edge() {
    let pg = Postgres::start().await;
    let one = edge(&pg, "one").await;
    let mut two = edge(&pg, "two").await;
    let three = edge(&pg, "three").await;
    let devbox = one.devbox(Some("open")).await;
    let _agent = TestAgent::start(&two, &devbox).await;

    for e in [&one, &two, &three] {
        until("every edge sees edge two hold the agent", || async {
            holders(e, &devbox.id).await == json!(["two"])
        })
        .await;
    }
    let (status, cluster) = three.admin("GET", "/v1/cluster", None).await;
    assert_eq!(status, 200, "{cluster}");
    assert_eq!(cluster["node"], "three");
    let names: Vec<&str> = cluster["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(names, ["one", "three", "two"], "{cluster}");
    until("edge two's heartbeat counts its agent", || async {
        node(&three, "two").await["agents"] == 1
    })
    .await;
    assert_eq!(node(&three, "two").await["alive"], true);
    until("edge one's metrics count three live edges", || async {
        metrics(&one)
            .await
            .contains("burrow_edge_cluster_edges{state=\"alive\"} 3")
    })
    .await;
    let text = metrics(&one).await;
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(value("burrow_edge_cluster_change_lag_seconds_count") >= 1.0);
    assert!(value("burrow_edge_cluster_presence_writes_total") >= 1.0);

    // Edge two stops: its heartbeat ends, and the others drop it from routing.
    two.stop().await;
    let took = until("edge two dropped", || async {
        node(&one, "two").await["alive"] == false
    })
    .await;
    println!("a stopped edge was dropped after {took:?}");
    assert_eq!(holders(&one, &devbox.id).await, json!([]));
    assert_eq!(node(&one, "one").await["alive"], true);

    // A single edge has no cluster to show.
    let single = TestEdge::start().await;
    let (status, body) = single.admin("GET", "/v1/cluster", None).await;
    assert_eq!(status, 404, "{body}");
}
