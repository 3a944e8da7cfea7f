//! The edge's pool of kept-alive connections to services, as users meet it: an idle connection
//! never costs a request its answer. Each idle connection holds one of its agent's streams
//! (`forward.max_streams`) and one of its devbox's places (`limits.streams_per_devbox`), and
//! the pool is bounded in all (`agents.pool_max_idle_total`), as `/metrics` shows
//! (`burrow_edge_pool_idle`, `burrow_edge_pool_evictions_total{reason}`).
//!
//! The pool is filled the way users fill it: `n` requests in flight on a port at once (a
//! [`Gate`] service holds them until told), answered together, leave `n` idle connections.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use burrow_tests::services::http_service;
use burrow_tests::{DOMAIN, Reply, TestAgent, TestEdge, WAIT, request, testkit};

/// A service that holds every request until its gate opens, counting those that arrived.
struct Gate {
    port: u16,
    arrived: watch::Receiver<usize>,
    open: watch::Sender<bool>,
}

impl Gate {
    async fn start() -> Gate {
        let listener = testkit::ports::tokio_listener().await;
        let port = listener.local_addr().expect("addr").port();
        let (arrivals, arrived) = watch::channel(0usize);
        let arrivals = Arc::new(arrivals);
        let (open, opened) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (arrivals, opened) = (arrivals.clone(), opened.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        arrivals.send_modify(|n| *n += 1);
                        let mut opened = opened.clone();
                        async move {
                            let _ = opened.wait_for(|open| *open).await;
                            let ok = Full::new(Bytes::from_static(b"ok\n"));
                            Ok::<_, Infallible>(hyper::Response::new(ok))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Gate {
            port,
            arrived,
            open,
        }
    }

    /// Waits until `n` requests in all have reached the service.
    async fn until_arrived(&mut self, n: usize) {
        tokio::time::timeout(WAIT, self.arrived.wait_for(|a| *a >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} requests at the service within {WAIT:?}"))
            .expect("service running");
    }
}

/// Where a test sends its requests, and reads the edge's metrics.
struct Target {
    http: SocketAddr,
    metrics: SocketAddr,
    key: String,
}

impl Target {
    /// A GET to `port` of the tunnel, on a connection of its own.
    async fn get(&self, port: u16) -> Reply {
        get(self.http, self.key.clone(), port).await
    }

    /// [`Target::get`] in a task of its own, to hold in flight.
    fn spawn_get(&self, port: u16) -> tokio::task::JoinHandle<Reply> {
        tokio::spawn(get(self.http, self.key.clone(), port))
    }

    /// Sends `n` requests to `gate` at once, opens it once all are at the service, and checks
    /// every answer: `n` connections go back to the pool.
    async fn fill(&self, gate: &mut Gate, n: usize) {
        let before = *gate.arrived.borrow();
        let sent: Vec<_> = (0..n).map(|_| self.spawn_get(gate.port)).collect();
        gate.until_arrived(before + n).await;
        gate.open.send_replace(true);
        for reply in sent {
            let reply = reply.await.expect("request task");
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }

    /// A sample of the edge's `/metrics`: `series` is a name with its labels; 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        let reply = request(
            self.metrics,
            "GET",
            "localhost",
            "/metrics",
            &[],
            Vec::new(),
        )
        .await
        .expect("the metrics listener answers");
        reply
            .text()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `series` reads `want`. `/metrics` is read, as a scraper would, until then:
    /// there is no event to wait on from outside the edge.
    async fn until_metric(&self, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.metric(series).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {got}, not {want}, after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A GET to `port` of the tunnel `key`, through the edge's `http` listener.
async fn get(http: SocketAddr, key: String, port: u16) -> Reply {
    let host = format!("{port}-{key}.{DOMAIN}");
    request(http, "GET", &host, "/", &[], Vec::new())
        .await
        .expect("the edge answers")
}

const IDLE: &str = "burrow_edge_pool_idle";

fn evicted(reason: &str) -> String {
    format!("burrow_edge_pool_evictions_total{{reason=\"{reason}\"}}")
}

/// An edge with a metrics listener and `extra` config lines, and an open tunnel.
async fn edge(extra: &str) -> (TestEdge, burrow_tests::Devbox, Target) {
    let edge = TestEdge::builder()
        .toml(&format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}"))
        .start()
        .await;
    let devbox = edge.devbox(Some("open")).await;
    let target = Target {
        http: edge.http(),
        metrics: edge.edge().metrics_addr.expect("metrics listener"),
        key: devbox.key.clone().expect("a tunnel key"),
    };
    (edge, devbox, target)
}

/// `forward.max_streams = 8`, all eight streams held by idle kept-alive connections on three
/// ports: a request on a fourth port is answered 200 (before the pool gave way, the agent
/// refused its stream and the client got 503). The agent refuses, the edge closes the idle
/// connections on that agent connection and asks once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_give_way_to_a_request_on_another_port() {
    let (edge, devbox, target) = edge("").await;
    let agent = TestAgent::start_with(&edge, &devbox, &[("forward.max_streams", "8")]).await;
    for n in [3, 3, 2] {
        target.fill(&mut Gate::start().await, n).await;
    }
    agent
        .wait_for("its eight streams open", |s| s.streams == 8)
        .await;
    target.until_metric(IDLE, 8.0).await;

    let other = http_service("127.0.0.1:0").await;
    let started = Instant::now();
    let reply = target.get(other.addr.port()).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.text());
    eprintln!("a request past the agent's streams, idle ones closed first: {took:?}");
    assert_eq!(target.metric(&evicted("agent_streams")).await, 8.0);
    // Left: the answered request's own connection, idle on the fourth port.
    agent
        .wait_for("the idle streams closed", |s| s.streams == 1)
        .await;
    target.until_metric(IDLE, 1.0).await;
}

/// `limits.streams_per_devbox = 2`: two idle kept-alive connections hold the devbox's two
/// places, so a request on another port closes the oldest and takes its place (200), and the
/// devbox never has more than two streams open; requests really in flight at the limit still
/// give 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_count_toward_streams_per_devbox() {
    let (edge, devbox, target) = edge("[limits]\nstreams_per_devbox = 2").await;
    let agent = TestAgent::start(&edge, &devbox).await;
    target.fill(&mut Gate::start().await, 2).await;
    target.until_metric(IDLE, 2.0).await;

    let other = http_service("127.0.0.1:0").await;
    let reply = target.get(other.addr.port()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(target.metric(&evicted("devbox_limit")).await, 1.0);
    agent
        .wait_for("no more streams than the devbox's limit", |s| {
            s.streams == 2
        })
        .await;
    target.until_metric(IDLE, 2.0).await;

    // Two requests held in flight: they take the two idle connections' places.
    let mut held = Gate::start().await;
    let sent: Vec<_> = (0..2).map(|_| target.spawn_get(held.port)).collect();
    held.until_arrived(2).await;
    assert_eq!(target.metric(&evicted("devbox_limit")).await, 3.0);
    let third = target.get(held.port).await;
    assert_eq!(third.status, 503, "{}", third.text());
    assert!(
        third.text().contains("too many requests in flight"),
        "{}",
        third.text()
    );
    assert_eq!(*held.arrived.borrow(), 2, "the third reached the service");
    held.open.send_replace(true);
    for reply in sent {
        assert_eq!(reply.await.expect("request task").status, 200);
    }
    target.until_metric(IDLE, 2.0).await;
}

/// `agents.pool_max_idle_total = 3`: two idle connections on one port, then three on another;
/// the pool keeps three, the newest, and the two oldest close (their agent streams too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_cap_closes_the_oldest() {
    let capped = CappedEdge::start(3).await;
    let target = &capped.target;
    let (mut first, mut second) = (Gate::start().await, Gate::start().await);
    target.fill(&mut first, 2).await;
    target.until_metric(IDLE, 2.0).await;
    target.fill(&mut second, 3).await;
    target.until_metric(&evicted("total_cap"), 2.0).await;
    assert_eq!(target.metric(IDLE).await, 3.0);
    let mut status = capped.agent.status.clone();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.streams == 3))
        .await
        .expect("the evicted streams close at the agent")
        .expect("agent running");

    // What was kept: the second port's connections, not the first's.
    let reused = "burrow_edge_service_connections_total{connection=\"reused\"}";
    let opened = "burrow_edge_service_connections_total{connection=\"opened\"}";
    let (reused_before, opened_before) = (target.metric(reused).await, target.metric(opened).await);
    assert_eq!(target.get(second.port).await.status, 200);
    assert_eq!(target.metric(reused).await, reused_before + 1.0);
    assert_eq!(target.get(first.port).await.status, 200);
    assert_eq!(target.metric(opened).await, opened_before + 1.0);
    // Its connection back in the pool, past the cap again: the oldest of the others goes.
    target.until_metric(&evicted("total_cap"), 3.0).await;
    assert_eq!(target.metric(IDLE).await, 3.0);
}

/// An edge whose `[agents]` table sets `pool_max_idle_total` (the harness's builder writes that
/// table itself, so this config is written whole), an open tunnel, and its agent, connected.
struct CappedEdge {
    target: Target,
    agent: burrow_agent::Agent,
    _stop: tokio_util::sync::DropGuard,
    _edge: burrow_edge::Edge,
    _temp: tempfile::TempDir,
}

impl CappedEdge {
    async fn start(total: usize) -> CappedEdge {
        burrow_tests::init_tracing();
        let temp = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "domain = \"{DOMAIN}\"\nstate_dir = \"{}\"\n[public]\nhttp = \"127.0.0.1:0\"\n\
             [agents]\nlisten = \"127.0.0.1:0\"\nserver_name = \"localhost\"\n\
             pool_max_idle_total = {total}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            temp.path().join("state").display()
        );
        let file = burrow_runtime::sources::File {
            path: Path::new("pool-edge.toml"),
            text: &text,
        };
        let config = burrow_edge::Config::load(Some(file), &HashMap::new(), &[]).expect("config");
        let edge = burrow_edge::Edge::start(config).await.expect("edge starts");
        let token = format!("Bearer {}", edge.admin_token.expose());
        let headers = [
            ("authorization".to_owned(), token),
            ("content-type".to_owned(), "application/json".to_owned()),
        ];
        let body = br#"{"tunnel": {"auth_mode": "open"}}"#.to_vec();
        let created = request(
            edge.admin_addr,
            "POST",
            "localhost",
            "/v1/devboxes",
            &headers,
            body,
        )
        .await
        .expect("admin API answers");
        assert_eq!(created.status, 201, "{}", created.text());
        let json: Value = serde_json::from_slice(&created.body).expect("JSON");
        let field = |path: &[&str]| {
            let value = path.iter().fold(&json, |v, k| &v[k]);
            value.as_str().expect("a string").to_owned()
        };
        let ca = edge.agent_ca.as_ref().expect("generated CA");
        let state_dir = temp.path().join("agent-state");
        let flags = [
            ("edge", edge.agents_addr.to_string()),
            ("server_name", edge.server_name.clone()),
            ("ca", ca.display().to_string()),
            ("state_dir", state_dir.display().to_string()),
        ];
        let vars = HashMap::from([(
            burrow_agent::config::TOKEN_ENV.to_owned(),
            field(&["agent_token"]),
        )]);
        let agent_config = burrow_agent::Config::load(None, &vars, &flags).expect("agent config");
        let stop = CancellationToken::new();
        let agent = burrow_agent::Agent::spawn(agent_config, stop.clone());
        let mut status = agent.status.clone();
        tokio::time::timeout(WAIT, status.wait_for(|s| s.connected))
            .await
            .expect("the agent connects")
            .expect("agent running");
        CappedEdge {
            target: Target {
                http: edge.http_addr.expect("http listener"),
                metrics: edge.metrics_addr.expect("metrics listener"),
                key: field(&["tunnel", "tunnel_key"]),
            },
            agent,
            _stop: stop.drop_guard(),
            _edge: edge,
            _temp: temp,
        }
    }
}
