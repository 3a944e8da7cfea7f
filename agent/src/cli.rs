//! The `burrow-agent` command line: flags, loading, logging, signals.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sidecar::{self, Entrypoint};
use crate::{Agent, tls};
use burrow_runtime::notify;
use burrow_runtime::signals::ShutdownSignals;
use burrow_runtime::sources::{self, File};

/// burrow-agent: keeps this devbox's ports reachable through a burrow edge.
///
/// Every option can also be set in the TOML file (`--config`) or in a `BURROW_*` environment
/// variable; flags win over the environment, which wins over the file. The agent token is read
/// from `token_file` or from BURROW_AGENT_TOKEN. Exit codes: 0 clean stop, 2 bad usage or
/// config, 1 runtime failure.
///
/// With `-- CMD ARGS...` the agent runs CMD, the devbox's entrypoint, next to the tunnel: CMD
/// gets the agent's environment (without NOTIFY_SOCKET), directory and stdio; SIGTERM, SIGINT,
/// SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH are passed on to it, and SIGTERM or SIGINT
/// also drain the tunnel; orphaned processes are reaped (as PID 1, or as a child subreaper).
/// When CMD exits, the tunnel drains and the agent exits with CMD's exit code (128+N if signal
/// N killed it); 127 if CMD is not found, 126 if it cannot be executed.
#[derive(Debug, Clone, Parser)]
#[command(name = "burrow-agent", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file [env: BURROW_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The edge's QUIC listener, host:port, or several, comma-separated (key `edge`) [env:
    /// BURROW_EDGE]
    #[arg(long, value_name = "HOST:PORT")]
    pub edge: Option<String>,
    /// Connections to hold, each to a distinct edge; default 2 with several edges, else 1
    /// (key `ha_connections`) [env: BURROW_HA_CONNECTIONS]
    #[arg(long, value_name = "N")]
    pub ha_connections: Option<String>,
    /// TLS name the edge's certificate must carry; default: the host of `edge` (key
    /// `server_name`) [env: BURROW_SERVER_NAME]
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// PEM file of roots to trust instead of the system's (key `ca`) [env: BURROW_CA]
    #[arg(long, value_name = "FILE")]
    pub ca: Option<String>,
    /// File holding the agent token (key `token_file`) [env: BURROW_TOKEN_FILE]; or put the
    /// token itself in BURROW_AGENT_TOKEN
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<String>,
    /// Directory for what must survive a restart (the last accepted instance id, so the edge
    /// tells a restarted agent from a cloned devbox); created if missing; default:
    /// $STATE_DIRECTORY (systemd's StateDirectory=), then /var/lib/burrow-agent (key
    /// `state_dir`) [env: BURROW_STATE_DIR]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<String>,
    /// Only these ports are forwarded, comma-separated; empty: all (key
    /// `forward.allow_ports`) [env: BURROW_FORWARD_ALLOW_PORTS]
    #[arg(long, value_name = "PORTS")]
    pub allow_ports: Option<String>,
    /// These ports are never forwarded, comma-separated (key `forward.deny_ports`) [env:
    /// BURROW_FORWARD_DENY_PORTS]
    #[arg(long, value_name = "PORTS")]
    pub deny_ports: Option<String>,
    /// Ports whose services speak HTTP/2 only (h2c, such as a gRPC server), comma-separated:
    /// the edge speaks HTTP/2 to them for every request (key `forward.http2_ports`) [env:
    /// BURROW_FORWARD_HTTP2_PORTS]
    #[arg(long, value_name = "PORTS")]
    pub http2_ports: Option<String>,
    /// Streams in flight at once; more are refused, default 1024 (key `forward.max_streams`)
    /// [env: BURROW_FORWARD_MAX_STREAMS]
    #[arg(long, value_name = "N")]
    pub max_streams: Option<String>,
    /// Time the local service has to accept a connection, default 5s (key
    /// `forward.connect_timeout`) [env: BURROW_FORWARD_CONNECT_TIMEOUT]
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Address for the agent's metrics listener; its port is never forwarded (key
    /// `metrics.listen`) [env: BURROW_METRICS_LISTEN]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Time running streams get to finish at shutdown or when the edge goes away, default 10s
    /// (key `drain_grace`) [env: BURROW_DRAIN_GRACE]
    #[arg(long, value_name = "DURATION")]
    pub drain_grace: Option<String>,
    /// Time between heartbeats, default 5s (key `liveness.heartbeat_interval`) [env:
    /// BURROW_LIVENESS_HEARTBEAT_INTERVAL]
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// Time a heartbeat may take to be answered, default 3s (key
    /// `liveness.heartbeat_timeout`) [env: BURROW_LIVENESS_HEARTBEAT_TIMEOUT]
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_timeout: Option<String>,
    /// Time between nudges (one-byte QUIC datagrams that let a lost connection show within
    /// that time), default 1s (key `liveness.nudge_interval`) [env:
    /// BURROW_LIVENESS_NUDGE_INTERVAL]
    #[arg(long, value_name = "DURATION")]
    pub nudge_interval: Option<String>,
    /// QUIC idle timeout, default 20s (key `liveness.idle_timeout`) [env:
    /// BURROW_LIVENESS_IDLE_TIMEOUT]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Clock sampling period for resume detection, default 1s (key `liveness.resume_tick`)
    /// [env: BURROW_LIVENESS_RESUME_TICK]
    #[arg(long, value_name = "DURATION")]
    pub resume_tick: Option<String>,
    /// First reconnect backoff ceiling, default 100ms (key `reconnect.backoff_initial`) [env:
    /// BURROW_RECONNECT_BACKOFF_INITIAL]
    #[arg(long, value_name = "DURATION")]
    pub backoff_initial: Option<String>,
    /// Highest reconnect backoff, default 2s (key `reconnect.backoff_max`) [env:
    /// BURROW_RECONNECT_BACKOFF_MAX]
    #[arg(long, value_name = "DURATION")]
    pub backoff_max: Option<String>,
    /// A session up this long resets the backoff, default 30s (key `reconnect.healthy_after`)
    /// [env: BURROW_RECONNECT_HEALTHY_AFTER]
    #[arg(long, value_name = "DURATION")]
    pub healthy_after: Option<String>,
    /// Time one dial may take, default 3s (key `reconnect.dial_timeout`) [env:
    /// BURROW_RECONNECT_DIAL_TIMEOUT]
    #[arg(long, value_name = "DURATION")]
    pub dial_timeout: Option<String>,
    /// With an entrypoint: when it exits, keep the tunnel up until SIGTERM or SIGINT (for a
    /// one-shot setup script); the agent then exits with the entrypoint's code (key
    /// `entrypoint.keep_running`) [env: BURROW_KEEP_RUNNING]
    #[arg(long, requires = "entrypoint")]
    pub keep_running: bool,
    /// With an entrypoint: run it in a process group of its own and send forwarded signals to
    /// the whole group (key `entrypoint.signal_group`) [env: BURROW_SIGNAL_GROUP]
    #[arg(long, requires = "entrypoint")]
    pub signal_group: bool,
    /// Log level or filter, e.g. info, debug, burrow_agent=debug; default: RUST_LOG, then info
    /// (key `log.level`; SIGHUP reloads it) [env: BURROW_LOG_LEVEL]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log lines as `text` (default) or `json` (key `log.format`) [env: BURROW_LOG_FORMAT]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// The devbox's entrypoint to run next to the tunnel, after `--`, e.g. `-- python3 -m
    /// http.server 8080`
    #[arg(last = true, value_name = "CMD")]
    pub entrypoint: Vec<OsString>,
}

impl Cli {
    /// The flags that were given, as `(key, value)` pairs.
    pub fn flags(&self) -> Vec<(&'static str, String)> {
        [
            ("edge", &self.edge),
            ("ha_connections", &self.ha_connections),
            ("server_name", &self.server_name),
            ("ca", &self.ca),
            ("token_file", &self.token_file),
            ("state_dir", &self.state_dir),
            ("forward.allow_ports", &self.allow_ports),
            ("forward.deny_ports", &self.deny_ports),
            ("forward.http2_ports", &self.http2_ports),
            ("forward.max_streams", &self.max_streams),
            ("forward.connect_timeout", &self.connect_timeout),
            ("metrics.listen", &self.metrics_listen),
            ("drain_grace", &self.drain_grace),
            ("liveness.heartbeat_interval", &self.heartbeat_interval),
            ("liveness.heartbeat_timeout", &self.heartbeat_timeout),
            ("liveness.nudge_interval", &self.nudge_interval),
            ("liveness.idle_timeout", &self.idle_timeout),
            ("liveness.resume_tick", &self.resume_tick),
            ("reconnect.backoff_initial", &self.backoff_initial),
            ("reconnect.backoff_max", &self.backoff_max),
            ("reconnect.healthy_after", &self.healthy_after),
            ("reconnect.dial_timeout", &self.dial_timeout),
            ("log.level", &self.log_level),
            ("log.format", &self.log_format),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }

    /// The config file named by `--config` or BURROW_CONFIG, and its text; `None` if none is.
    fn config_file(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<Option<(PathBuf, String)>, sources::ConfigError> {
        let Some(path) = self
            .config
            .clone()
            .or_else(|| env.get("BURROW_CONFIG").map(PathBuf::from))
        else {
            return Ok(None);
        };
        let text = sources::read_file(&path)?;
        Ok(Some((path, text)))
    }

    /// Loads the configuration this command line names.
    pub fn load(&self, env: &HashMap<String, String>) -> Result<Config, sources::ConfigError> {
        let read = self.config_file(env)?;
        let file = read.as_ref().map(|(path, text)| File { path, text });
        Config::load(file, env, &self.flags())
    }

    /// The entrypoint after `--`, if any, with its settings from the environment and flags.
    pub fn entrypoint(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<Option<Entrypoint>, sources::ConfigError> {
        let flags: Vec<(&'static str, String)> = [
            ("entrypoint.keep_running", self.keep_running),
            ("entrypoint.signal_group", self.signal_group),
        ]
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(key, _)| (key, "true".to_owned()))
        .collect();
        let read = self.config_file(env)?;
        let file = read.as_ref().map(|(path, text)| File { path, text });
        Entrypoint::load(self.entrypoint.clone(), file, env, &flags)
    }
}

/// Other things `burrow-agent` does besides running the agent.
#[derive(Debug, Clone, clap::Subcommand)]
enum Command {
    /// Show a running agent's state: edge, connection, RTT, uptime, tunnel URL, busiest ports.
    ///
    /// Reads the agent's local metrics listener (`metrics.listen` from the same config file,
    /// environment or `--metrics`), so the agent must run with one.
    Status {
        /// The agent's metrics listener; default: `metrics.listen` of the config
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<String>,
        /// TOML config file to read `metrics.listen` from [env: BURROW_CONFIG]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the raw JSON
        #[arg(long)]
        json: bool,
    },
}

/// Reloads the port policy and the log level on SIGHUP, from the same sources as at start; a
/// bad configuration is refused with a log line and the running one kept. `hangups` is
/// installed before the agent says it is ready, so an early SIGHUP is never fatal.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    cli: Cli,
    env: HashMap<String, String>,
    policy: crate::policy::PortPolicy,
    level: burrow_runtime::logging::LevelHandle,
) {
    while hangups.recv().await.is_some() {
        match cli.load(&env) {
            Ok(next) => {
                policy.replace(&next.policy);
                level.set(&next.log.level);
                tracing::info!(level = %next.log.level, "reloaded the port policy and log level");
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused: bad configuration; keeping the current one")
            }
        }
    }
}

/// The binary's main.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    if let Some(Command::Status {
        metrics,
        config,
        json,
    }) = &cli.command
    {
        return crate::status::command(metrics.as_deref(), config.as_deref(), *json, &env);
    }
    let config = match cli.load(&env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let level = burrow_runtime::logging::init(&config.log);
    let entrypoint = match cli.entrypoint(&env) {
        Ok(entrypoint) => entrypoint,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let (runtime, hangups) = match runtime_with_hangups() {
        Ok(started) => started,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.spawn(reload_on_hangup(
        hangups,
        cli.clone(),
        env.clone(),
        config.policy.clone(),
        level,
    ));
    match entrypoint {
        Some(entrypoint) => run_sidecar(runtime, config, entrypoint, &env),
        None => runtime.block_on(run_agent(config, &env)),
    }
}

/// The runtime, with the SIGHUP handler installed in it: it exists before READY=1 is sent (an
/// early SIGHUP must not kill).
fn runtime_with_hangups() -> Result<(tokio::runtime::Runtime, tokio::signal::unix::Signal), String>
{
    use tokio::signal::unix::{SignalKind, signal};
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // One worker thread, whatever the devbox's size (tokio's default is one per CPU): with
    // several, a stream's memory is often freed on another thread than the one that took it,
    // and glibc's per-thread arenas keep the difference. `bench/memory.py` (rounds of wrk
    // through the tunnel), agent RSS idle after rounds 1-3: 1 worker 7.8 / 7.9 / 7.9 MB,
    // 2 workers 8.2 / 8.4 / 8.5 MB and still growing, 16 workers 9.8 / 10.2 / 10.5 MB. `bench`
    // on 2 cores, 2 runs each, 1 worker vs 2: download 328-354 vs 355-420 MB/s, upload 366-369
    // vs 324-399 MB/s, keep-alive 25.6-26.9k vs 27.6-28.0k req/s (the machine's noise is about
    // as large). One core carries about 500 MB/s of download; TOKIO_WORKER_THREADS sets more.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let hangups = {
        let _entered = runtime.enter();
        signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?
    };
    Ok((runtime, hangups))
}

/// Runs the agent next to the devbox's entrypoint (`-- CMD`), and exits with CMD's code.
fn run_sidecar(
    runtime: tokio::runtime::Runtime,
    config: Config,
    entrypoint: Entrypoint,
    env: &HashMap<String, String>,
) -> ExitCode {
    // The sidecar installs its own handlers, for the signals it passes on, before READY=1.
    let notifier = notify::Notifier::from_env(env);
    let code = match runtime.block_on(sidecar::run(config, entrypoint, notifier)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            e.exit_code()
        }
    };
    // Tasks still running (a dial, a DNS lookup) must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    ExitCode::from(code)
}

/// Runs the agent alone until SIGTERM or SIGINT (drained; a second signal exits at once) or
/// until it fails.
async fn run_agent(config: Config, env: &HashMap<String, String>) -> ExitCode {
    // SIGTERM and SIGINT are caught before READY=1: an early one drains, it does not kill.
    let mut shutdown_signals = match ShutdownSignals::install_or_exit("burrow-agent") {
        Ok(signals) => signals,
        Err(code) => return code,
    };
    let shutdown = CancellationToken::new();
    let agent = Agent::spawn(config, shutdown.clone());
    // systemd: ready once the config is loaded; the watchdog and the status line from here.
    let notify = notify::Notifier::from_env(env).map(|notifier| {
        notifier.ready();
        tokio::spawn(notify::run(
            notifier,
            agent.status.clone(),
            crate::status::status_line,
            shutdown.clone(),
        ))
    });
    let mut task = agent.task;
    let ended = tokio::select! {
        () = shutdown_signals.recv() => {
            tracing::info!("shutting down: draining running streams (a second signal exits at once)");
            shutdown.cancel();
            tokio::select! {
                ended = &mut task => ended,
                () = shutdown_signals.recv() => {
                    eprintln!("burrow-agent: second signal; exiting now");
                    std::process::exit(130);
                }
            }
        }
        ended = &mut task => ended,
    };
    // Sends STOPPING=1 (at once on a signal: the task wakes on the cancel) and ends.
    shutdown.cancel();
    if let Some(notify) = notify {
        let _ = notify.await;
    }
    exit_code(ended)
}

/// The exit code for how the agent's task ended: 2 for a configuration problem found only at
/// run time (the CA file), 1 for any other failure.
fn exit_code(ended: Result<Result<(), tls::TlsError>, tokio::task::JoinError>) -> ExitCode {
    match ended {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e @ tls::TlsError::Ca { .. })) | Ok(Err(e @ tls::TlsError::NoSystemRoots)) => {
            eprintln!("burrow-agent: {e}");
            ExitCode::from(2)
        }
        Ok(Err(e)) => {
            eprintln!("burrow-agent: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            ExitCode::from(1)
        }
    }
}
