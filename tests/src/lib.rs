//! The end-to-end harness: a real edge and a real agent (the libraries, in process) over
//! loopback, real local services, and helpers to speak to them like users do.
//!
//! - [`TestEdge::start`] / [`TestEdge::builder`]: an edge on `127.0.0.1:0` with a temporary state
//!   directory, plain HTTP always and HTTPS on request, domain `tunnel.localhost` (so curl
//!   resolves every tunnel host to loopback by itself).
//! - [`TestEdge::admin`]: the admin API with the admin token; every answer is checked against
//!   the API's OpenAPI document ([`openapi`]).
//! - [`TestEdge::devbox`]: registers a devbox, optionally with a tunnel.
//! - [`TestAgent::start`]: an agent for a devbox, returned once it is connected, with a
//!   `state_dir` of its own ([`TestEdge::agent_state_dir`]).
//! - [`agent_process`]: the real `burrow-agent` binary as a child process, killed on drop.
//! - [`logs`]: what the edge logged about a devbox, for asserting on what an operator reads.
//! - [`services`]: local services (HTTP echo, bulk bytes, SSE, WebSocket echo).
//! - [`postgres`]: a throwaway PostgreSQL server on loopback, and `psql` to query it.
//! - [`grpc`]: gRPC with raw-bytes messages: an echo service and a client (tonic), and the
//!   same with Python's grpcio (`tests/python/grpc_echo.py`).
//! - [`devservers`]: real dev servers (Jupyter, Vite) that refuse hosts they do not know.
//! - [`site`]: a small web app (two linked pages, a JSON endpoint, a WebSocket echo) for a
//!   browser to use.
//! - [`chromium`]: headless Chromium driven over the DevTools protocol, a real browser.
//! - [`testkit`] (burrow-testkit, re-exported): loopback ports without races, child processes
//!   killed on drop, and [`binary`], the workspace's binaries built for the test.

#![forbid(unsafe_code)]

pub mod agent_process;
pub mod chromium;
pub mod client;
pub mod devservers;
pub mod edge_process;
pub mod grpc;
pub mod logs;
pub mod openapi;
pub mod postgres;
pub mod relay;
pub mod services;
pub mod sim;
pub mod site;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_agent::Agent;
use burrow_edge::{Config, Edge};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The test kit: ports, child processes, the notify manager, and [`binary`], which builds the
/// workspace's binaries (`burrow-agent`, `burrow-edge`, `burrow`) for tests that run them.
pub use burrow_testkit::{self as testkit, WAIT, binary};
pub use client::{Curl, Reply, curl, request};

/// The tunnel domain of test edges (another with [`EdgeBuilder::domain`]).
pub const DOMAIN: &str = "tunnel.localhost";

/// Polls `check` every 10 ms until it holds (for state another process or task reaches, such
/// as presence read from PostgreSQL); how long it took. Panics naming `what` after [`WAIT`].
pub async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    check: impl Fn() -> F,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// Sends test logs to the test's captured output (`RUST_LOG` selects), and keeps the edge's
/// for [`logs::edge_log`].
pub fn init_tracing() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let readable = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(readable)
        .with(logs::layer())
        .try_init();
}

/// Options for a test edge.
#[derive(Debug, Default)]
pub struct EdgeBuilder {
    domain: Option<String>,
    https: bool,
    state_dir: Option<PathBuf>,
    http: Option<SocketAddr>,
    agents: Option<SocketAddr>,
    extra: String,
    flags: Vec<(&'static str, String)>,
}

impl EdgeBuilder {
    /// Uses another tunnel domain than [`DOMAIN`]: dev servers trust any `*.localhost` host,
    /// and refuse one like `tunnel.example.com`, as in production.
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = Some(domain.to_owned());
        self
    }

    /// Adds an HTTPS listener with a certificate for `*.tunnel.localhost` from a test CA.
    pub fn https(mut self) -> Self {
        self.https = true;
        self
    }

    /// Uses an existing state directory (a restart).
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_owned());
        self
    }

    /// Listens for public HTTP on this address (a restart on the same port).
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.http = Some(addr);
        self
    }

    /// Listens for agents on this address (a restart on the same port).
    pub fn agents(mut self, addr: SocketAddr) -> Self {
        self.agents = Some(addr);
        self
    }

    /// Sets a key as its flag would (`("agents.wait", "1s")`): for keys of the tables the
    /// builder writes itself (`[public]`, `[agents]`, `[admin]`), which [`EdgeBuilder::toml`]
    /// cannot add to.
    pub fn flag(mut self, key: &'static str, value: &str) -> Self {
        self.flags.push((key, value.to_owned()));
        self
    }

    /// Adds top-level TOML lines (before any table), e.g. `drain_grace = "1s"`.
    pub fn toml(mut self, lines: &str) -> Self {
        self.extra.push_str(lines);
        self.extra.push('\n');
        self
    }

    /// Starts the edge.
    pub async fn start(self) -> TestEdge {
        init_tracing();
        let temp = tempfile::tempdir().expect("tempdir");
        let domain = self.domain.unwrap_or_else(|| DOMAIN.to_owned());
        let state_dir = self.state_dir.unwrap_or_else(|| temp.path().join("state"));
        let http = self
            .http
            .map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
        let agents = self
            .agents
            .map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut text = format!(
            "domain = \"{domain}\"\nstate_dir = \"{}\"\n{}[public]\nhttp = \"{http}\"\n",
            state_dir.display(),
            self.extra,
        );
        let mut public_ca = None;
        if self.https {
            let (ca, cert, key) = public_cert(temp.path(), &domain);
            text.push_str(&format!(
                "https = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.display(),
                key.display()
            ));
            public_ca = Some(ca);
        }
        text.push_str(&format!(
            "[agents]\nlisten = \"{agents}\"\nserver_name = \"localhost\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n"
        ));
        let file = burrow_runtime::sources::File {
            path: Path::new("test-edge.toml"),
            text: &text,
        };
        let config = Config::load(Some(file), &HashMap::new(), &self.flags).expect("edge config");
        let edge = Edge::start(config).await.expect("edge starts");
        TestEdge {
            edge: Some(edge),
            domain,
            state_dir,
            public_ca,
            _temp: temp,
        }
    }
}

/// A running edge and its temporary files.
#[derive(Debug)]
pub struct TestEdge {
    edge: Option<Edge>,
    /// The tunnel domain: [`DOMAIN`] unless [`EdgeBuilder::domain`] set another.
    pub domain: String,
    /// The edge's state directory.
    pub state_dir: PathBuf,
    /// The CA that signed the HTTPS certificate, if HTTPS is on.
    pub public_ca: Option<PathBuf>,
    _temp: tempfile::TempDir,
}

/// A registered devbox.
#[derive(Debug, Clone)]
pub struct Devbox {
    /// Its id.
    pub id: String,
    /// Its agent token.
    pub agent_token: String,
    /// Its tunnel key, if a tunnel was enabled.
    pub key: Option<String>,
    /// Its tunnel's bearer token, for authenticated tunnels.
    pub auth_token: Option<String>,
}

impl TestEdge {
    /// An edge with plain HTTP only.
    pub async fn start() -> TestEdge {
        EdgeBuilder::default().start().await
    }

    /// Options.
    pub fn builder() -> EdgeBuilder {
        EdgeBuilder::default()
    }

    /// The running edge.
    pub fn edge(&self) -> &Edge {
        self.edge.as_ref().expect("edge running")
    }

    /// The public HTTP address.
    pub fn http(&self) -> SocketAddr {
        self.edge().http_addr.expect("http listener")
    }

    /// `http://{port}-{key}.{domain}:{edge port}{path}`.
    pub fn url(&self, port: u16, key: &str, path: &str) -> String {
        format!(
            "http://{port}-{key}.{}:{}{path}",
            self.domain,
            self.http().port()
        )
    }

    /// `https://...` on the HTTPS listener.
    pub fn https_url(&self, port: u16, key: &str, path: &str) -> String {
        let addr = self.edge().https_addr.expect("https listener");
        format!("https://{port}-{key}.{}:{}{path}", self.domain, addr.port())
    }

    /// Calls the admin API with the admin token.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = self.edge().admin_token.expose().to_owned();
        self.admin_with(method, path, body, Some(&token)).await
    }

    /// Calls the admin API with any token (or none).
    pub async fn admin_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(token) = token {
            headers.push(("authorization".to_owned(), format!("Bearer {token}")));
        }
        let text = body.as_ref().map(Value::to_string).unwrap_or_default();
        let reply = request(
            self.edge().admin_addr,
            method,
            "localhost",
            path,
            &headers,
            text.into_bytes(),
        )
        .await
        .expect("admin API answers");
        let json = if reply.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&reply.body).expect("admin API answers JSON")
        };
        let answer = (!reply.body.is_empty()).then_some(&json);
        openapi::check_call(method, path, body.as_ref(), reply.status, answer);
        (reply.status, json)
    }

    /// Registers a devbox; with `mode`, enables its tunnel at creation.
    pub async fn devbox(&self, mode: Option<&str>) -> Devbox {
        let body = mode.map(|m| serde_json::json!({ "tunnel": { "auth_mode": m } }));
        let (status, json) = self
            .admin("POST", "/v1/devboxes", body.or(Some(serde_json::json!({}))))
            .await;
        assert_eq!(status, 201, "{json}");
        Devbox {
            id: json["id"].as_str().expect("id").to_owned(),
            agent_token: json["agent_token"]
                .as_str()
                .expect("agent_token")
                .to_owned(),
            key: json["tunnel"]["tunnel_key"].as_str().map(str::to_owned),
            auth_token: json["tunnel"]["auth_token"].as_str().map(str::to_owned),
        }
    }

    /// Stops the edge, keeping its state directory for a restart.
    pub async fn stop(&mut self) {
        if let Some(edge) = self.edge.take() {
            edge.stop().await;
        }
    }

    /// Stops and starts the edge again on the same state directory (new ports).
    pub async fn restart(self) -> TestEdge {
        let builder = EdgeBuilder::default().domain(&self.domain);
        self.restart_with(builder).await
    }

    /// Stops the edge and starts another with `builder` on the same state directory.
    pub async fn restart_with(mut self, builder: EdgeBuilder) -> TestEdge {
        self.stop().await;
        let mut next = builder.state_dir(&self.state_dir).start().await;
        // Keep the old temporary directory alive: it holds the state.
        std::mem::swap(&mut next._temp, &mut self._temp);
        next
    }

    /// A new empty directory for one agent's `state_dir`, removed with the edge's temporary
    /// files: every agent a test starts gets its own (each devbox has its own disk), so none
    /// writes the default `/var/lib/burrow-agent` of the machine running the tests.
    pub fn agent_state_dir(&self) -> PathBuf {
        tempfile::Builder::new()
            .prefix("agent-state-")
            .tempdir_in(self._temp.path())
            .expect("agent state directory")
            .keep()
    }

    /// The agents' QUIC address.
    pub fn agents_addr(&self) -> SocketAddr {
        self.edge().agents_addr
    }

    /// The agent config flags that point an agent at this edge (or at `via`, a relay).
    pub fn agent_flags(&self, via: Option<SocketAddr>) -> Vec<(&'static str, String)> {
        let e = self.edge();
        let ca = e.agent_ca.as_ref().expect("generated CA");
        vec![
            ("edge", via.unwrap_or(e.agents_addr).to_string()),
            ("server_name", e.server_name.clone()),
            ("ca", ca.display().to_string()),
        ]
    }
}

/// A running agent.
#[derive(Debug)]
pub struct TestAgent {
    /// The agent.
    pub agent: Agent,
    shutdown: CancellationToken,
}

impl TestAgent {
    /// Starts an agent for `devbox` and waits until it is connected.
    pub async fn start(edge: &TestEdge, devbox: &Devbox) -> TestAgent {
        Self::start_with(edge, devbox, &[]).await
    }

    /// Starts an agent with extra flags (`("forward.deny_ports", "22")`, ...).
    pub async fn start_with(
        edge: &TestEdge,
        devbox: &Devbox,
        flags: &[(&'static str, &str)],
    ) -> TestAgent {
        let agent = Self::spawn(edge, devbox, flags);
        let mut status = agent.agent.status.clone();
        tokio::time::timeout(WAIT, status.wait_for(|s| s.connected))
            .await
            .expect("agent connects in time")
            .expect("agent running");
        agent
    }

    /// Starts an agent without waiting for it to connect. `flags` override the defaults
    /// (`("edge", relay address)` dials through a relay).
    pub fn spawn(edge: &TestEdge, devbox: &Devbox, flags: &[(&'static str, &str)]) -> TestAgent {
        Self::spawn_full(edge, devbox, flags, &[], None)
    }

    /// [`TestAgent::spawn`] with `BURROW_*` environment settings (such as
    /// `BURROW_LIVENESS_HEARTBEAT_INTERVAL`) and, optionally, clocks of the test's. The agent
    /// gets a new `state_dir` unless `flags` name one.
    pub fn spawn_full(
        edge: &TestEdge,
        devbox: &Devbox,
        flags: &[(&'static str, &str)],
        env: &[(&str, &str)],
        clocks: Option<std::sync::Arc<dyn burrow_agent::clock::Clocks>>,
    ) -> TestAgent {
        let mut all = edge.agent_flags(None);
        all.push(("state_dir", edge.agent_state_dir().display().to_string()));
        all.extend(flags.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Self::spawn_config(&all, &devbox.agent_token, env, clocks)
    }

    /// Starts an agent with the token `token` and exactly the settings `all` (no defaults
    /// from an edge), without waiting for it to connect.
    pub fn spawn_config(
        all: &[(&'static str, String)],
        token: &str,
        env: &[(&str, &str)],
        clocks: Option<std::sync::Arc<dyn burrow_agent::clock::Clocks>>,
    ) -> TestAgent {
        let mut vars: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        vars.insert(burrow_agent::config::TOKEN_ENV.to_owned(), token.to_owned());
        let config = burrow_agent::Config::load(None, &vars, all).expect("agent config");
        let shutdown = CancellationToken::new();
        let agent = match clocks {
            Some(clocks) => Agent::spawn_with_clocks(config, clocks, shutdown.clone()),
            None => Agent::spawn(config, shutdown.clone()),
        };
        TestAgent { agent, shutdown }
    }

    /// Waits (up to [`WAIT`]) until the agent's status satisfies `until`.
    pub async fn wait_for(&self, what: &str, until: impl Fn(&burrow_agent::Status) -> bool) {
        let mut status = self.agent.status.clone();
        tokio::time::timeout(WAIT, status.wait_for(|s| until(s)))
            .await
            .unwrap_or_else(|_| panic!("agent: {what} within {WAIT:?}"))
            .expect("agent running");
    }

    /// The agent's status now.
    pub fn status(&self) -> burrow_agent::Status {
        self.agent.status.borrow().clone()
    }

    /// Stops the agent and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = (&mut self.agent.task).await;
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A CA and a certificate for `*.{domain}` signed by it, as PEM files.
fn public_cert(dir: &Path, domain: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf whose issuer equals its subject looks self-signed to clients.
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "burrow test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![format!("*.{domain}")]).expect("params");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("*.{domain}"));
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let paths = (
        dir.join("public-ca.pem"),
        dir.join("public.pem"),
        dir.join("public.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    paths
}

/// Clocks a test can make jump: the system's, plus offsets the test adds.
#[derive(Debug, Default)]
pub struct TestClocks {
    offsets: std::sync::Mutex<(std::time::Duration, std::time::Duration)>,
}

impl TestClocks {
    /// Simulates a suspend of `slept`: CLOCK_BOOTTIME and CLOCK_REALTIME move ahead of
    /// CLOCK_MONOTONIC.
    pub fn suspend(&self, slept: Duration) {
        let mut o = self.offsets.lock().expect("lock");
        o.0 += slept;
        o.1 += slept;
    }

    /// Simulates a stepped wall clock (NTP after a VM resume).
    pub fn step_realtime(&self, by: Duration) {
        self.offsets.lock().expect("lock").1 += by;
    }
}

impl burrow_agent::clock::Clocks for TestClocks {
    fn sample(&self) -> burrow_agent::clock::Sample {
        let mut s = burrow_agent::clock::SystemClocks.sample();
        let o = *self.offsets.lock().expect("lock");
        s.boottime += o.0;
        s.realtime += o.1;
        s
    }
}
