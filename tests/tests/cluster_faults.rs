//! A cluster under faults of whole processes: three real `burrow-edge serve` processes on a
//! real PostgreSQL, an agent holding two of them, and steady requests through the edges that
//! stay up while one edge is killed (kill -9), frozen (SIGSTOP), or PostgreSQL is killed and
//! started again. What a user of a surviving edge sees is asserted: no request fails. The
//! figures each test measures are printed (`-- --nocapture`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burrow_tests::edge_process::EdgeProcess;
use burrow_tests::postgres::Postgres;
use burrow_tests::services::http_service;
use burrow_tests::testkit::Signal;
use burrow_tests::{DOMAIN, TestAgent, curl, until};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// A devbox with an open tunnel, registered through `edge`: its id, tunnel key and agent token.
async fn devbox(edge: &EdgeProcess) -> (String, String, String) {
    let body = json!({ "tunnel": { "auth_mode": "open" } });
    let (status, json) = edge
        .admin("POST", "/v1/devboxes", Some(body))
        .await
        .expect("admin API answers");
    assert_eq!(status, 201, "{json}");
    let text = |v: &Value| v.as_str().expect("a string").to_owned();
    (
        text(&json["id"]),
        text(&json["tunnel"]["tunnel_key"]),
        text(&json["agent_token"]),
    )
}

/// Edges `one`, `two` and `three` of the cluster on `pg`, as processes.
async fn three_edges(pg: &Postgres) -> Vec<EdgeProcess> {
    let mut edges = Vec::new();
    for node in ["one", "two", "three"] {
        edges.push(EdgeProcess::start(pg, node).await);
    }
    edges
}

/// An agent given `edges` (holding two of them by default), with `extra` settings on top. Its
/// heartbeat timeout is 1 s, as the README suggests with several edges: a dead edge's
/// connection is replaced sooner.
fn agent(edges: &[&EdgeProcess], token: &str, extra: &[(&'static str, &str)]) -> TestAgent {
    let list = edges
        .iter()
        .map(|e| e.agents_addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let state = tempfile::tempdir().expect("agent state").keep();
    let mut flags = vec![
        ("edge", list),
        ("server_name", DOMAIN.to_owned()),
        ("ca", edges[0].agent_ca().display().to_string()),
        ("state_dir", state.display().to_string()),
        ("liveness.heartbeat_timeout", "1s".to_owned()),
    ];
    flags.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    TestAgent::spawn_config(&flags, token, &[], None)
}

/// The edges `edge` says hold `devbox`'s agent.
async fn held_by(edge: &EdgeProcess, devbox: &str) -> Vec<String> {
    let Some((200, view)) = edge
        .admin("GET", &format!("/v1/devboxes/{devbox}"), None)
        .await
    else {
        return Vec::new();
    };
    let edges = view["agent"]["edges"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    edges
        .iter()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect()
}

/// Whether `edge` counts `node` as alive in `GET /v1/cluster`.
async fn alive(edge: &EdgeProcess, node: &str) -> bool {
    let Some((200, cluster)) = edge.admin("GET", "/v1/cluster", None).await else {
        return false;
    };
    let nodes = cluster["nodes"].as_array().cloned().unwrap_or_default();
    nodes
        .iter()
        .any(|n| n["node"] == node && n["alive"] == true)
}

/// The status code of a GET of `url` (0: no HTTP answer at all).
async fn code(url: &str) -> u16 {
    curl(&["-o", "/dev/null", "--max-time", "20", url])
        .await
        .code
}

/// Requests, one after another, to each of `urls` in turn until stopped: when each was sent,
/// its status code and how long it took.
struct Load {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<(Instant, u16, Duration)>>,
}

impl Load {
    fn start(urls: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut sent = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for url in &urls {
                    let at = Instant::now();
                    let code = code(url).await;
                    sent.push((at, code, at.elapsed()));
                }
            }
            sent
        });
        Load { stop, task }
    }

    /// Stops it; panics naming the requests that failed (and showing what `edges` logged).
    /// Returns how many were sent and the slowest.
    async fn stop_and_check(self, edges: &[EdgeProcess]) -> (usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.task.await.expect("load task");
        let failed: Vec<_> = sent.iter().filter(|(_, code, _)| *code != 200).collect();
        if !failed.is_empty() || std::env::var_os("BURROW_TEST_EDGE_LOGS").is_some() {
            for e in edges {
                eprintln!("--- edge {}:\n{}", e.node, e.log());
            }
        }
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {failed:?}",
            failed.len(),
            sent.len()
        );
        let slowest = sent.iter().map(|s| s.2).max().unwrap_or_default();
        let slow: Vec<_> = sent
            .iter()
            .filter(|s| s.2 > Duration::from_secs(1))
            .collect();
        if !slow.is_empty() {
            println!("requests slower than 1 s: {slow:?}");
        }
        (sent.len(), slowest)
    }
}

/// Three edges, a devbox registered through the first, its agent on two of them, and a
/// service answering in the devbox; every edge serves the tunnel.
struct Cluster {
    pg: Postgres,
    edges: Vec<EdgeProcess>,
    devbox: String,
    key: String,
    service_port: u16,
    agent: TestAgent,
    _service: burrow_tests::services::HttpService,
}

impl Cluster {
    async fn start() -> Cluster {
        let pg = Postgres::start().await;
        let edges = three_edges(&pg).await;
        let (devbox, key, token) = devbox(&edges[0]).await;
        let agent = agent(&edges.iter().collect::<Vec<_>>(), &token, &[]);
        for e in &edges {
            until("every edge knows the agent's two edges", || async {
                held_by(e, &devbox).await.len() == 2
            })
            .await;
        }
        let service = http_service("127.0.0.1:0").await;
        let cluster = Cluster {
            pg,
            edges,
            devbox,
            key,
            service_port: service.addr.port(),
            agent,
            _service: service,
        };
        for e in &cluster.edges {
            let url = cluster.url(e);
            until("every edge serves the tunnel", || async {
                code(&url).await == 200
            })
            .await;
        }
        cluster
    }

    fn url(&self, edge: &EdgeProcess) -> String {
        edge.url(self.service_port, &self.key, "/steady")
    }

    /// The index of an edge that holds the agent.
    async fn a_holder(&self) -> usize {
        let held = held_by(&self.edges[0], &self.devbox).await;
        self.edges
            .iter()
            .position(|e| held.contains(&e.node))
            .expect("an edge holds the agent")
    }

    /// Requests through every edge but `except`.
    fn load_around(&self, except: usize) -> Load {
        let urls = (0..self.edges.len())
            .filter(|i| *i != except)
            .map(|i| self.url(&self.edges[i]))
            .collect();
        Load::start(urls)
    }
}

/// When the agent establishes its next session (a connection replacing one it lost).
fn next_session(agent: &TestAgent) -> JoinHandle<Instant> {
    let mut status = agent.agent.status.clone();
    tokio::spawn(async move {
        let before = status.borrow().sessions;
        status
            .wait_for(|s| s.sessions > before)
            .await
            .expect("agent running");
        Instant::now()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_edge_that_holds_the_agent_fails_no_request_through_the_others() {
    let mut c = Cluster::start().await;
    let lost = c.a_holder().await;
    let load = c.load_around(lost);
    let session = next_session(&c.agent);
    let killed = Instant::now();
    c.edges[lost].kill().await;
    let lost_node = c.edges[lost].node.clone();
    let survivor = (lost + 1) % c.edges.len();
    let dropped = until("the others drop the killed edge", || async {
        !alive(&c.edges[survivor], &lost_node).await
    })
    .await;
    let replaced = until("the agent holds two live edges again", || async {
        let held = held_by(&c.edges[survivor], &c.devbox).await;
        held.len() == 2 && !held.contains(&lost_node)
    })
    .await;
    let again = session.await.expect("status watch").duration_since(killed);
    let (sent, slowest) = load.stop_and_check(&c.edges).await;
    println!(
        "edge {lost_node} killed: dropped from routing after {dropped:?}; the agent had two \
         connections again after {again:?} (every edge knew after {replaced:?}); {sent} requests through \
         the other edges, none failed, the slowest took {slowest:?}"
    );
    // Two nudge intervals of silence and two 1 s timeouts at most, then a dial; generous
    // for a loaded machine.
    assert!(
        again < Duration::from_secs(8),
        "the agent replaced the lost connection only after {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_edge_is_dropped_from_routing_and_requests_go_around_it() {
    let mut c = Cluster::start().await;
    let frozen = c.a_holder().await;
    let frozen_node = c.edges[frozen].node.clone();
    let load = c.load_around(frozen);
    c.edges[frozen].signal(Signal::SIGSTOP);
    let survivor = (frozen + 1) % c.edges.len();
    let dropped = until("the others drop the frozen edge", || async {
        !alive(&c.edges[survivor], &frozen_node).await
    })
    .await;
    // Requests keep going around it for a while after it was dropped.
    let after = Instant::now();
    until("the agent holds two live edges", || async {
        let held = held_by(&c.edges[survivor], &c.devbox).await;
        held.len() == 2 && !held.contains(&frozen_node)
    })
    .await;
    while after.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (sent, slowest) = load.stop_and_check(&c.edges).await;
    println!(
        "edge {frozen_node} frozen: dropped from routing after {dropped:?}; {sent} requests \
         through the other edges, none failed, the slowest took {slowest:?}"
    );
    // Thawed, it heartbeats again and counts as alive.
    c.edges[frozen].signal(Signal::SIGCONT);
    until("the thawed edge is alive again", || async {
        alive(&c.edges[survivor], &frozen_node).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_and_back_routing_goes_on_writes_wait_and_presence_is_rewritten() {
    let mut c = Cluster::start().await;
    let holder = c.a_holder().await;
    let holder_node = c.edges[holder].node.clone();
    let load = c.load_around(holder);
    c.pg.kill().await;

    // Writes fail with a clear 503 on every edge while routing goes on from memory.
    for e in &c.edges {
        let (status, body) = e
            .admin("POST", "/v1/devboxes", Some(json!({})))
            .await
            .expect("the admin API answers while PostgreSQL is away");
        assert_eq!(status, 503, "{body}");
        let error = body.to_string();
        assert!(error.contains("PostgreSQL"), "{error}");
    }
    // Meanwhile an edge that holds the agent dies, and the agent moves to the third edge:
    // presence the store has not seen, while the others still believe the dead edge alive.
    let session = next_session(&c.agent);
    let killed = Instant::now();
    c.edges[holder].kill().await;
    let moved = session.await.expect("status watch").duration_since(killed);

    c.pg.start_again().await;
    let back = Instant::now();
    let survivor = (holder + 1) % c.edges.len();
    let expected: Vec<String> = {
        let mut nodes: Vec<String> = c
            .edges
            .iter()
            .filter(|e| e.node != holder_node)
            .map(|e| e.node.clone())
            .collect();
        nodes.sort();
        nodes
    };
    until("presence is rewritten once PostgreSQL is back", || async {
        let mut held = held_by(&c.edges[survivor], &c.devbox).await;
        held.sort();
        held == expected
    })
    .await;
    let rewritten = back.elapsed();
    let (status, body) = c.edges[survivor]
        .admin("POST", "/v1/devboxes", Some(json!({})))
        .await
        .expect("admin API answers");
    assert_eq!(status, 201, "writes work again: {body}");
    let (sent, slowest) = load.stop_and_check(&c.edges).await;
    println!(
        "PostgreSQL killed: edge {holder_node} killed meanwhile, the agent held two edges again \
         after {moved:?}; PostgreSQL back: presence agreed after {rewritten:?}; {sent} requests \
         through the other edges, none failed, the slowest took {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_edge_stop_moves_a_single_connection_agent_without_a_failed_request() {
    let pg = Postgres::start().await;
    let mut edges = three_edges(&pg).await;
    let (devbox, key, token) = devbox(&edges[0]).await;
    // One connection only: nothing else carries the devbox while it moves.
    let all: Vec<&EdgeProcess> = edges.iter().collect();
    let agent = agent(&all, &token, &[("ha_connections", "1")]);
    for e in &edges {
        until("every edge knows the agent's edge", || async {
            held_by(e, &devbox).await.len() == 1
        })
        .await;
    }
    let holder_node = held_by(&edges[0], &devbox).await.remove(0);
    let holder = edges
        .iter()
        .position(|e| e.node == holder_node)
        .expect("a holder");
    let service = http_service("127.0.0.1:0").await;
    let urls: Vec<String> = (0..edges.len())
        .filter(|i| *i != holder)
        .map(|i| edges[i].url(service.addr.port(), &key, "/steady"))
        .collect();
    for url in &urls {
        until("every edge serves the tunnel", || async {
            code(url).await == 200
        })
        .await;
    }
    let load = Load::start(urls);
    let session = next_session(&agent);
    let stopping = Instant::now();
    edges[holder].signal(Signal::SIGTERM);
    let moved = session
        .await
        .expect("status watch")
        .duration_since(stopping);
    let survivor = (holder + 1) % edges.len();
    until("the others see the agent on another edge", || async {
        let held = held_by(&edges[survivor], &devbox).await;
        held.len() == 1 && held[0] != holder_node
    })
    .await;
    let (sent, slowest) = load.stop_and_check(&edges).await;
    println!(
        "edge {holder_node} stopped (SIGTERM): the agent's new connection was up after \
         {moved:?}; {sent} requests through the other edges, none failed, the slowest took \
         {slowest:?}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_one_edge_learns_the_others_and_outlives_it() {
    let pg = Postgres::start().await;
    let mut edges = three_edges(&pg).await;
    let (devbox, key, token) = devbox(&edges[0]).await;
    // Only edge one is configured; the edges tell the agent where the others are.
    let _agent = agent(&[&edges[0]], &token, &[("ha_connections", "2")]);
    let learned = until("the agent holds edge one and a learned edge", || async {
        let held = held_by(&edges[1], &devbox).await;
        held.len() == 2 && held.contains(&"one".to_owned())
    })
    .await;
    let (_, cluster) = edges[1]
        .admin("GET", "/v1/cluster", None)
        .await
        .expect("admin API answers");
    let told = cluster["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .all(|n| n["agents_addr"].is_string());
    assert!(told, "every edge shows where agents reach it: {cluster}");

    // The one configured edge dies: the agent holds two edges it only learned of.
    let service = http_service("127.0.0.1:0").await;
    edges[0].kill().await;
    let replaced = until("the agent holds two learned edges", || async {
        let held = held_by(&edges[1], &devbox).await;
        held.len() == 2 && !held.contains(&"one".to_owned())
    })
    .await;
    for e in &edges[1..] {
        let url = e.url(service.addr.port(), &key, "/");
        assert_eq!(code(&url).await, 200, "through edge {}", e.node);
    }
    println!(
        "given edge one only: held a learned edge after {learned:?}; edge one killed, two \
         learned edges held after {replaced:?}"
    );
}
