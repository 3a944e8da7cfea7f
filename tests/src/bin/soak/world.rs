//! What the soak runs: the release (or debug) `burrow-edge` and `burrow-agent` binaries as
//! processes on reserved loopback ports, a UDP relay between them (blackhole, loss, NAT
//! rebinding), the devbox's local services, and the tunnel as clients reach it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use burrow_tests::relay::Relay;
use burrow_tests::services::{http_service, ws_echo};
use burrow_tests::testkit::ports::ReservedPort;
use burrow_tests::testkit::process::AsyncChildGuard;
use burrow_tests::{DOMAIN, binary, request};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// How long a process gets to come up (or back) before the soak gives up on it.
const UP: Duration = Duration::from_secs(30);

/// The tunnel as a client sees it: where to connect, which hosts, and the bearer token (swapped
/// when the soak rotates it).
#[derive(Debug)]
pub struct Tunnel {
    /// The edge's public HTTP listener.
    pub http: SocketAddr,
    /// The tunnel key.
    pub key: String,
    /// The HTTP service's port in the devbox (JSON echo, `/bytes/N`, `/sse`).
    pub http_port: u16,
    /// The WebSocket echo's port.
    pub ws_port: u16,
    /// The raw TCP echo's port.
    pub tcp_port: u16,
    token: RwLock<String>,
}

impl Tunnel {
    /// `{port}-{key}.{domain}`.
    pub fn host(&self, port: u16) -> String {
        format!("{port}-{}.{DOMAIN}", self.key)
    }

    /// The tunnel's bearer token now.
    pub fn token(&self) -> String {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_token(&self, token: String) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }
}

/// The processes and the network between them.
pub struct World {
    dir: tempfile::TempDir,
    http: ReservedPort,
    agents: ReservedPort,
    admin: ReservedPort,
    edge_metrics: ReservedPort,
    agent_metrics: ReservedPort,
    edge: Option<AsyncChildGuard>,
    agent: Option<AsyncChildGuard>,
    /// The path between agent and edge.
    pub relay: Relay,
    admin_token: String,
    devbox: String,
    /// The tunnel.
    pub tunnel: Arc<Tunnel>,
}

impl World {
    /// Starts the services, the edge, a devbox with an authenticated tunnel that also carries
    /// raw TCP, and its agent through the relay; returns once the agent is connected.
    pub async fn start() -> anyhow::Result<World> {
        let dir = tempfile::tempdir().context("temporary directory")?;
        let (http, agents, admin) = (
            ReservedPort::new(),
            ReservedPort::new(),
            ReservedPort::new(),
        );
        let (edge_metrics, agent_metrics) = (ReservedPort::new(), ReservedPort::new());
        let relay = Relay::start(agents.addr()).await;
        let mut world = World {
            dir,
            http,
            agents,
            admin,
            edge_metrics,
            agent_metrics,
            edge: None,
            agent: None,
            relay,
            admin_token: String::new(),
            devbox: String::new(),
            tunnel: Arc::new(Tunnel {
                http: "127.0.0.1:0".parse()?,
                key: String::new(),
                http_port: 0,
                ws_port: 0,
                tcp_port: 0,
                token: RwLock::new(String::new()),
            }),
        };
        world.start_edge().await?;
        world.admin_token = std::fs::read_to_string(world.state_dir().join("admin.token"))
            .context("the edge's admin token")?
            .trim()
            .to_owned();
        let body = json!({"tunnel": {"auth_mode": "authenticated", "raw_tcp": true}});
        let created = world.admin_call("POST", "/v1/devboxes", Some(body)).await?;
        world.devbox = text(&created, "id")?;
        std::fs::write(world.token_file(), text(&created, "agent_token")?)?;
        let service = http_service("127.0.0.1:0").await;
        world.tunnel = Arc::new(Tunnel {
            http: world.http.addr(),
            key: text(&created["tunnel"], "tunnel_key")?,
            http_port: service.addr.port(),
            ws_port: ws_echo().await.port(),
            tcp_port: tcp_echo().await?,
            token: RwLock::new(text(&created["tunnel"], "auth_token")?),
        });
        world.start_agent().await?;
        Ok(world)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("edge")
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("agent.token")
    }

    /// Where the processes' logs go (appended across restarts).
    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the edge and waits until its `/readyz` answers 200.
    pub async fn start_edge(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("edge.log"))?;
        let mut cmd = tokio::process::Command::new(binary("burrow-edge"));
        cmd.arg("serve")
            .args(["--domain", DOMAIN])
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--public-http", &self.http.addr().to_string()])
            .args(["--agents-listen", &self.agents.addr().to_string()])
            .args(["--admin-listen", &self.admin.addr().to_string()])
            .args(["--metrics-listen", &self.edge_metrics.addr().to_string()])
            // Idle pooled streams hold a descriptor (and a little memory) in the agent until
            // they expire: 5 s instead of 30 s lets a memory round settle sooner.
            .args(["--agents-pool-idle", "5s", "--drain-grace", "2s"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        clear_burrow_env(&mut cmd);
        // The memory rounds go flat out, past the default 1,000 requests a second per tunnel:
        // the soak is about faults, not the rate limiter.
        cmd.env("BURROW_LIMITS_RATE", "1000000")
            .env("BURROW_LIMITS_BURST", "1000000");
        self.edge = Some(AsyncChildGuard::spawn(&mut cmd));
        self.wait_ok(self.edge_metrics.addr(), "/readyz", "the edge's /readyz")
            .await
    }

    /// Starts the agent (dialing through the relay) and waits until it is connected.
    pub async fn start_agent(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))?;
        let mut cmd = tokio::process::Command::new(binary("burrow-agent"));
        cmd.args(["--edge", &self.relay.addr().to_string()])
            .args(["--server-name", DOMAIN])
            .arg("--ca")
            .arg(self.state_dir().join("agent-ca.pem"))
            .arg("--token-file")
            .arg(self.token_file())
            .arg("--state-dir")
            .arg(self.dir.path().join("agent"))
            .args(["--metrics-listen", &self.agent_metrics.addr().to_string()])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        clear_burrow_env(&mut cmd);
        self.agent = Some(AsyncChildGuard::spawn(&mut cmd));
        self.agent_ready().await
    }

    /// Waits until the agent's `/readyz` says it is connected.
    pub async fn agent_ready(&self) -> anyhow::Result<()> {
        self.wait_ok(self.agent_metrics.addr(), "/readyz", "the agent's /readyz")
            .await
    }

    /// Waits until a request through the tunnel succeeds.
    pub async fn tunnel_serves(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        let host = self.tunnel.host(self.tunnel.http_port);
        loop {
            let auth = format!("Bearer {}", self.tunnel.token());
            let headers = [("authorization".to_owned(), auth)];
            let reply = request(self.tunnel.http, "GET", &host, "/", &headers, vec![]).await;
            if matches!(&reply, Ok(r) if r.status == 200) {
                return Ok(());
            }
            if start.elapsed() > UP {
                bail!("no request through the tunnel succeeded within {UP:?}: {reply:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` to the agent.
    pub fn signal_agent(&mut self, signal: Signal) {
        if let Some(agent) = self.agent.as_mut() {
            agent.signal(signal);
        }
    }

    /// kill -9 the agent and reap it.
    pub async fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.signal(Signal::SIGKILL);
            agent.wait_within(UP).await;
        }
    }

    /// kill -9 the edge and reap it.
    pub async fn kill_edge(&mut self) {
        if let Some(mut edge) = self.edge.take() {
            edge.signal(Signal::SIGKILL);
            edge.wait_within(UP).await;
        }
    }

    /// SIGTERM the edge (it drains for its `drain_grace`, 2 s) and wait for it to exit.
    pub async fn stop_edge(&mut self) -> anyhow::Result<()> {
        if let Some(mut edge) = self.edge.take() {
            edge.signal(Signal::SIGTERM);
            let status = edge.wait_within(UP).await;
            if !status.success() {
                bail!("the edge exited with {status} after SIGTERM");
            }
        }
        Ok(())
    }

    /// Rotates the tunnel's bearer token; clients use the new one from the answer on.
    pub async fn rotate_tunnel_token(&self) -> anyhow::Result<()> {
        let path = format!("/v1/devboxes/{}/tunnel/rotate-token", self.devbox);
        let answer = self.admin_call("POST", &path, None).await?;
        self.tunnel.set_token(text(&answer, "auth_token")?);
        Ok(())
    }

    /// Rotates the agent token and writes it to the agent's token file, as an operator does.
    pub async fn rotate_agent_token(&self) -> anyhow::Result<()> {
        let path = format!("/v1/devboxes/{}/rotate-agent-token", self.devbox);
        let answer = self.admin_call("POST", &path, None).await?;
        std::fs::write(self.token_file(), text(&answer, "agent_token")?)?;
        Ok(())
    }

    /// RSS and open descriptors of the edge and the agent.
    pub fn sample(&self) -> anyhow::Result<Sample> {
        let of = |child: &Option<AsyncChildGuard>, name: &str| {
            let pid = child.as_ref().map(AsyncChildGuard::pid);
            pid.with_context(|| format!("the {name} is not running"))
                .and_then(usage)
        };
        let (edge, agent) = (of(&self.edge, "edge")?, of(&self.agent, "agent")?);
        Ok(Sample { edge, agent })
    }

    /// Idle kept-alive streams in the edge's pool (`burrow_edge_pool_idle`).
    pub async fn pool_idle(&self) -> anyhow::Result<f64> {
        let reply = request(
            self.edge_metrics.addr(),
            "GET",
            "localhost",
            "/metrics",
            &[],
            vec![],
        )
        .await?;
        let text = reply.text();
        let line = text
            .lines()
            .find(|l| l.starts_with("burrow_edge_pool_idle "))
            .context("no burrow_edge_pool_idle in the edge's metrics")?;
        Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
    }

    async fn admin_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let headers = [
            (
                "authorization".to_owned(),
                format!("Bearer {}", self.admin_token),
            ),
            ("content-type".to_owned(), "application/json".to_owned()),
        ];
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let reply = request(self.admin.addr(), method, "localhost", path, &headers, body).await?;
        if !(200..300).contains(&reply.status) {
            bail!("{method} {path}: {} {}", reply.status, reply.text());
        }
        Ok(serde_json::from_slice(&reply.body)?)
    }

    async fn wait_ok(&self, addr: SocketAddr, path: &str, what: &str) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let reply = request(addr, "GET", "localhost", path, &[], vec![]).await;
            if matches!(&reply, Ok(r) if r.status == 200) {
                return Ok(());
            }
            if start.elapsed() > UP {
                bail!("{what} did not answer 200 within {UP:?}: {reply:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Memory and descriptors of both processes at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The edge.
    pub edge: Usage,
    /// The agent.
    pub agent: Usage,
}

/// One process's resident memory and open descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
}

fn usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Usage { rss_kib, fds })
}

fn text(v: &Value, field: &str) -> anyhow::Result<String> {
    v[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no `{field}` in {v}"))
}

/// Nothing from the soak's own `BURROW_*` environment reaches the processes.
fn clear_burrow_env(cmd: &mut tokio::process::Command) {
    for (name, _) in std::env::vars() {
        if name.starts_with("BURROW_") {
            cmd.env_remove(name);
        }
    }
}

/// A TCP echo service on loopback: what a database or SSH stands in for. Its port.
async fn tcp_echo() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(port)
}
