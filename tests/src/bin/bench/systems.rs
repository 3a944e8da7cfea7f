//! The systems under test, each started as real processes on loopback in front of the origin,
//! and stopped again: `direct` (the origin itself), `nginx` (one-hop reverse proxy),
//! `rathole-tcp`, `rathole-noise`, `bore`, and `burrow` (edge + agent, plain HTTP).
//!
//! Each start is timed the way a user meets it (cold start): the public side is spawned and
//! polled every millisecond until it accepts TCP, then the devbox side is spawned and a request
//! is sent every millisecond until one is proxied with 200.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burrow_testkit::ports::ReservedPort;
use tokio::process::Command;
use tokio::time::Instant;

use crate::load::{Target, first_200};
use crate::peers::{nginx_conf, noise_keypair, rathole_confs, version_of};
use crate::procs::{self, Proc};

/// The domain of the benchmark's burrow edge.
pub const DOMAIN: &str = "tunnel.localhost";

/// How long a system gets to come up.
const START_PATIENCE: Duration = Duration::from_secs(20);

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    /// The origin, no tunnel: the baseline every ratio is taken against.
    Direct,
    /// nginx as a one-hop reverse proxy, keep-alive upstream.
    Nginx,
    /// rathole, plain TCP transport.
    RatholeTcp,
    /// rathole, Noise transport (Noise_NK_25519_ChaChaPoly_BLAKE2s).
    RatholeNoise,
    /// bore, a TCP tunnel.
    Bore,
    /// burrow: edge and agent over QUIC, public plain HTTP.
    Burrow,
}

impl System {
    /// Every system, in table order.
    pub const ALL: [System; 6] = [
        System::Direct,
        System::Nginx,
        System::RatholeTcp,
        System::RatholeNoise,
        System::Bore,
        System::Burrow,
    ];

    /// Its name in flags, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Nginx => "nginx",
            System::RatholeTcp => "rathole-tcp",
            System::RatholeNoise => "rathole-noise",
            System::Bore => "bore",
            System::Burrow => "burrow",
        }
    }

    /// The system named `name`.
    pub fn parse(name: &str) -> Option<System> {
        System::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What the systems need: binaries, the origin, a scratch directory.
#[derive(Debug)]
pub struct Env {
    /// Where burrow-edge and burrow-agent are.
    pub bin_dir: PathBuf,
    /// Scratch directory (configs, state, logs).
    pub work: PathBuf,
    /// The origin's address.
    pub origin: SocketAddr,
    nginx: Option<PathBuf>,
    rathole: Option<PathBuf>,
    bore: Option<PathBuf>,
    noise_keys: Option<(String, String)>,
    starts: std::sync::atomic::AtomicU32,
}

impl Env {
    /// Finds the peers' binaries.
    pub fn new(bin_dir: PathBuf, work: PathBuf, origin: SocketAddr) -> Env {
        let rathole = procs::which("rathole");
        let noise_keys = rathole.as_deref().and_then(noise_keypair);
        Env {
            bin_dir,
            work,
            origin,
            nginx: procs::which("nginx"),
            rathole,
            bore: procs::which("bore"),
            noise_keys,
            starts: 0.into(),
        }
    }

    /// Why `system` cannot run here, if it cannot.
    pub fn missing(&self, system: System) -> Option<String> {
        let burrow = ["burrow-edge", "burrow-agent"]
            .iter()
            .map(|b| self.bin_dir.join(b))
            .find(|p| !p.is_file());
        match system {
            System::Direct => None,
            System::Nginx if self.nginx.is_none() => Some("nginx not found".into()),
            System::RatholeTcp if self.rathole.is_none() => Some("rathole not found".into()),
            System::RatholeNoise if self.noise_keys.is_none() => {
                Some("rathole (with the noise feature) not found".into())
            }
            System::Bore if self.bore.is_none() => Some("bore not found".into()),
            System::Burrow => burrow.map(|p| format!("{} not found", p.display())),
            _ => None,
        }
    }

    /// The peers' versions, for the report.
    pub fn versions(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, bin, arg) in [
            ("nginx", &self.nginx, "-v"),
            ("rathole", &self.rathole, "--version"),
            ("bore", &self.bore, "--version"),
        ] {
            if let Some(v) = bin.as_deref().and_then(|b| version_of(b, arg)) {
                out.push((name.to_owned(), v));
            }
        }
        out
    }

    /// A fresh scratch directory for one start of `system`.
    pub fn dir(&self, system: System) -> Result<PathBuf> {
        let n = self
            .starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.work.join(format!("{}-{n}", system.name()));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

/// A started system.
#[derive(Debug)]
pub struct Running {
    /// Which.
    pub system: System,
    /// Where clients send requests.
    pub target: Target,
    /// Where HTTP/2 clients (h2c with prior knowledge) send them, for a system that takes them.
    pub h2: Option<Target>,
    /// The public side (edge, nginx, rathole or bore server).
    pub server: Option<Proc>,
    /// The devbox side (agent, rathole or bore client).
    pub client: Option<Proc>,
    /// Public side spawned to accepting connections.
    pub server_start: Duration,
    /// Devbox side spawned (after the public side was up) to the first proxied 200.
    pub client_start: Duration,
}

/// CPU-seconds and RSS of a system's processes at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Public side, CPU-seconds since it started.
    pub server_cpu: f64,
    /// Devbox side, CPU-seconds since it started.
    pub client_cpu: f64,
    /// Public side, KiB resident.
    pub server_rss: u64,
    /// Devbox side, KiB resident.
    pub client_rss: u64,
}

impl Running {
    /// Its processes' CPU and memory now.
    pub fn usage(&self) -> Usage {
        let measure = |p: &Option<Proc>| {
            p.as_ref().map_or((0.0, 0), |p| {
                p.tree().into_iter().fold((0.0, 0), |(c, r), pid| {
                    (c + procs::cpu_seconds(pid), r + procs::rss_kib(pid))
                })
            })
        };
        let (server_cpu, server_rss) = measure(&self.server);
        let (client_cpu, client_rss) = measure(&self.client);
        Usage {
            server_cpu,
            client_cpu,
            server_rss,
            client_rss,
        }
    }

    /// An error if one of its processes has exited.
    pub fn check(&mut self) -> Result<()> {
        for p in [&mut self.server, &mut self.client].into_iter().flatten() {
            if let Some(status) = p.exited() {
                bail!("{} exited ({status}): {}", p.name, p.log_tail());
            }
        }
        Ok(())
    }

    /// Stops its processes, devbox side first.
    pub async fn stop(self) {
        if let Some(p) = self.client {
            p.stop().await;
        }
        if let Some(p) = self.server {
            p.stop().await;
        }
    }
}

/// Starts `system` and waits until a request through it is answered 200.
pub async fn start(system: System, env: &Env) -> Result<Running> {
    start_in(system, env, &env.dir(system)?).await
}

/// [`start`] in a given scratch directory: a second start in the same one finds the state of
/// the first (burrow's edge: its generated CA, its store), as a restarted service does.
pub async fn start_in(system: System, env: &Env, dir: &Path) -> Result<Running> {
    if let Some(why) = env.missing(system) {
        bail!("{} cannot run: {why}", system.name());
    }
    let dir = dir.to_owned();
    let mut running = match system {
        System::Direct => Running {
            system,
            target: Target {
                addr: env.origin,
                host: env.origin.to_string(),
            },
            // The origin serves h2c on the same port.
            h2: Some(Target {
                addr: env.origin,
                host: env.origin.to_string(),
            }),
            server: None,
            client: None,
            server_start: Duration::ZERO,
            client_start: Duration::ZERO,
        },
        System::Nginx => start_nginx(env, &dir).await?,
        System::RatholeTcp | System::RatholeNoise => start_rathole(system, env, &dir).await?,
        System::Bore => start_bore(env, &dir).await?,
        System::Burrow => crate::burrow::start(env, &dir).await?,
    };
    running.check()?;
    Ok(running)
}

/// nginx as a one-hop reverse proxy to the origin, up once it answers a first 200.
async fn start_nginx(env: &Env, dir: &Path) -> Result<Running> {
    let (listen, h2) = (reserved_port()?, reserved_port()?);
    let bin = env.nginx.as_deref().context("nginx")?;
    let conf = dir.join("nginx.conf");
    let http2_on = crate::peers::http2_directive(bin);
    std::fs::write(
        &conf,
        nginx_conf(dir, listen, h2, env.origin.port(), http2_on),
    )?;
    let t = Instant::now();
    let server = Proc::spawn(
        "nginx",
        "nginx",
        Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log")),
        dir,
    )?;
    let target = loopback(listen);
    let mut running = Running {
        system: System::Nginx,
        target: target.clone(),
        h2: Some(loopback(h2)),
        server: Some(server),
        client: None,
        server_start: Duration::ZERO,
        client_start: Duration::ZERO,
    };
    let up = until_up(
        &mut running,
        first_200(&target, t, Duration::from_millis(1), START_PATIENCE),
    )
    .await;
    match up {
        Ok(d) => Ok(Running {
            server_start: d,
            ..running
        }),
        Err(e) => Err(failed(running, e).await),
    }
}

/// rathole's server and client, over TCP or Noise.
async fn start_rathole(system: System, env: &Env, dir: &Path) -> Result<Running> {
    let control = reserved_port()?;
    let public = reserved_port()?;
    let (server_conf, client_conf) = rathole_confs(
        control,
        public,
        env.origin.port(),
        (system == System::RatholeNoise)
            .then_some(env.noise_keys.as_ref())
            .flatten(),
    );
    std::fs::write(dir.join("server.toml"), server_conf)?;
    std::fs::write(dir.join("client.toml"), client_conf)?;
    let bin = env.rathole.as_deref().context("rathole")?;
    let server = |d: &Path| {
        Proc::spawn(
            "rathole server",
            "server",
            quiet(Command::new(bin).arg("-s").arg(d.join("server.toml"))),
            d,
        )
    };
    let client = |d: &Path| {
        Proc::spawn(
            "rathole client",
            "client",
            quiet(Command::new(bin).arg("-c").arg(d.join("client.toml"))),
            d,
        )
    };
    two_sided(system, dir, control, loopback(public), server, client).await
}

/// bore's server and client.
async fn start_bore(env: &Env, dir: &Path) -> Result<Running> {
    let public = reserved_port()?;
    let origin_port = env.origin.port();
    let bin = env.bore.as_deref().context("bore")?;
    let server = |d: &Path| {
        let mut cmd = Command::new(bin);
        cmd.args(["server", "--bind-addr", "127.0.0.1"])
            .args(["--min-port", &public.to_string()])
            .args(["--max-port", &public.to_string()]);
        Proc::spawn("bore server", "server", quiet(&mut cmd), d)
    };
    let client = |d: &Path| {
        let mut cmd = Command::new(bin);
        cmd.args(["local", &origin_port.to_string()])
            .args(["--local-host", "127.0.0.1", "--to", "127.0.0.1"])
            .args(["--port", &public.to_string()]);
        Proc::spawn("bore client", "client", quiet(&mut cmd), d)
    };
    // bore's control port is fixed: 7835.
    two_sided(System::Bore, dir, 7835, loopback(public), server, client).await
}

/// Spawns the public side, waits for `control` to accept, spawns the devbox side, waits for
/// the first proxied 200.
async fn two_sided(
    system: System,
    dir: &Path,
    control: u16,
    target: Target,
    server: impl Fn(&Path) -> Result<Proc>,
    client: impl Fn(&Path) -> Result<Proc>,
) -> Result<Running> {
    let t = Instant::now();
    let server = server(dir)?;
    let mut running = Running {
        system,
        target,
        h2: None,
        server: Some(server),
        client: None,
        server_start: Duration::ZERO,
        client_start: Duration::ZERO,
    };
    match until_up(&mut running, accepting(control, START_PATIENCE)).await {
        Ok(()) => running.server_start = t.elapsed(),
        Err(e) => return Err(failed(running, e).await),
    }
    let t = Instant::now();
    running.client = Some(client(dir)?);
    let target = running.target.clone();
    let up = first_200(&target, t, Duration::from_millis(1), START_PATIENCE);
    match until_up(&mut running, up).await {
        Ok(d) => running.client_start = d,
        Err(e) => return Err(failed(running, e).await),
    }
    Ok(running)
}

/// Waits for `up`, failing as soon as one of the system's processes exits (a bad config).
pub async fn until_up<T>(running: &mut Running, up: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::pin!(up);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            r = &mut up => return r,
            _ = tick.tick() => running.check()?,
        }
    }
}

/// Stops a system that did not come up; the error, with its processes' last log lines.
pub async fn failed(mut running: Running, e: anyhow::Error) -> anyhow::Error {
    let mut msg = format!("{} did not come up: {e:#}", running.system.name());
    let _ = running.check();
    for p in [&running.server, &running.client].into_iter().flatten() {
        msg.push_str(&format!("\n  {} log: {}", p.name, p.log_tail()));
    }
    running.stop().await;
    anyhow::anyhow!(msg)
}

/// Polls a TCP port every millisecond until it accepts.
pub async fn accepting(port: u16, patience: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if t.elapsed() > patience {
            bail!("nothing accepts on 127.0.0.1:{port} after {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A port of 127.0.0.1 (TCP and UDP) for a system that is told its port up front: outside
/// the kernel's ephemeral range, where no bind on `:0` lands, and locked against other test
/// processes ([`ReservedPort`]). The reservations are held until the benchmark exits, so no
/// two systems, nor two starts, share a port.
pub fn reserved_port() -> Result<u16> {
    static HELD: Mutex<Vec<ReservedPort>> = Mutex::new(Vec::new());
    let reserved = ReservedPort::new();
    let port = reserved.port();
    HELD.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(reserved);
    Ok(port)
}

fn loopback(port: u16) -> Target {
    Target {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        host: format!("127.0.0.1:{port}"),
    }
}

/// Peers log at info per connection by default; every system logs warnings only.
pub fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.env("RUST_LOG", "warn")
}
