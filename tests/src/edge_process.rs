//! A cluster edge as the real `burrow-edge serve` process, for tests whose fault is the process
//! itself: kill -9, SIGSTOP, a restart on the same ports and state. Every listener is on a
//! reserved loopback port, kept across restarts, and the edge tells agents of the other edges
//! its agents address (`cluster.agents_addr`); its log goes to `edge.log` in its directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use burrow_testkit::ports::ReservedPort;
use burrow_testkit::process::{AsyncChildGuard, Signal};
use serde_json::Value;

use crate::postgres::Postgres;
use crate::{DOMAIN, WAIT, binary, request};

/// One `burrow-edge serve` of a cluster on a test's PostgreSQL.
#[derive(Debug)]
pub struct EdgeProcess {
    /// Its `cluster.node`.
    pub node: String,
    child: Option<AsyncChildGuard>,
    http: ReservedPort,
    agents: ReservedPort,
    admin: ReservedPort,
    metrics: ReservedPort,
    mesh: ReservedPort,
    dir: tempfile::TempDir,
    store: String,
}

impl EdgeProcess {
    /// Starts the edge `node` of the cluster on `pg` and waits until it is ready.
    pub async fn start(pg: &Postgres, node: &str) -> EdgeProcess {
        let mut edge = EdgeProcess {
            node: node.to_owned(),
            child: None,
            http: ReservedPort::new(),
            agents: ReservedPort::new(),
            admin: ReservedPort::new(),
            metrics: ReservedPort::new(),
            mesh: ReservedPort::new(),
            dir: tempfile::Builder::new()
                .prefix(&format!("edge-{node}-"))
                .tempdir()
                .expect("edge directory"),
            store: pg.url(),
        };
        edge.start_again().await;
        edge
    }

    /// Starts the process (again: same ports, same state) and waits until `/readyz` is 200.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "edge {} is running", self.node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("edge.log"))
            .expect("edge log");
        let mut cmd = tokio::process::Command::new(binary("burrow-edge"));
        cmd.arg("serve")
            .args(["--domain", DOMAIN])
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--public-http", &self.http.addr().to_string()])
            .args(["--agents-listen", &self.agents.addr().to_string()])
            .args(["--admin-listen", &self.admin.addr().to_string()])
            .args(["--metrics-listen", &self.metrics.addr().to_string()])
            .env("RUST_LOG", "info,burrow_edge::dial=debug,burrow_edge::mesh=debug,burrow_edge::forward=debug,burrow_edge::pool=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (name, _) in std::env::vars() {
            if name.starts_with("BURROW_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("BURROW_CLUSTER_STORE", &self.store)
            .env("BURROW_CLUSTER_NODE", &self.node)
            .env("BURROW_CLUSTER_MESH_LISTEN", self.mesh.addr().to_string())
            .env("BURROW_CLUSTER_AGENTS_ADDR", self.agents.addr().to_string());
        self.child = Some(AsyncChildGuard::spawn(&mut cmd));
        let start = tokio::time::Instant::now();
        loop {
            let ready = request(
                self.metrics.addr(),
                "GET",
                "localhost",
                "/readyz",
                &[],
                vec![],
            )
            .await
            .is_ok_and(|r| r.status == 200);
            if ready {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "edge {} not ready within {WAIT:?}:\n{}",
                self.node,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9, and reaped.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.signal(Signal::SIGKILL);
            child.wait_within(WAIT).await;
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...).
    pub fn signal(&mut self, signal: Signal) {
        self.child
            .as_mut()
            .unwrap_or_else(|| panic!("edge {} is not running", self.node))
            .signal(signal);
    }

    /// Its `state_dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("edge.log")).unwrap_or_default()
    }

    /// The public HTTP address.
    pub fn http(&self) -> SocketAddr {
        self.http.addr()
    }

    /// The agents' QUIC address.
    pub fn agents_addr(&self) -> SocketAddr {
        self.agents.addr()
    }

    /// The metrics address (`/metrics`, `/readyz`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.addr()
    }

    /// `http://{port}-{key}.{domain}:{edge port}{path}`.
    pub fn url(&self, port: u16, key: &str, path: &str) -> String {
        format!("http://{port}-{key}.{DOMAIN}:{}{path}", self.http.port())
    }

    /// The cluster's agent CA file, as this edge wrote it.
    pub fn agent_ca(&self) -> PathBuf {
        self.state_dir().join("agent-ca.pem")
    }

    /// Calls the admin API with the cluster's admin token: the status and the JSON body (null
    /// when empty); `None` when the edge does not answer at all.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let token = std::fs::read_to_string(self.state_dir().join("admin.token")).ok()?;
        let headers = [
            ("content-type".to_owned(), "application/json".to_owned()),
            (
                "authorization".to_owned(),
                format!("Bearer {}", token.trim()),
            ),
        ];
        let text = body.as_ref().map(Value::to_string).unwrap_or_default();
        let call = request(
            self.admin.addr(),
            method,
            "localhost",
            path,
            &headers,
            text.into_bytes(),
        );
        let reply = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .ok()?
            .ok()?;
        let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        let answer = (!reply.body.is_empty()).then_some(&json);
        crate::openapi::check_call(method, path, body.as_ref(), reply.status, answer);
        Some((reply.status, json))
    }
}
