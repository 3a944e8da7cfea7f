//! `burrow-edge serve`: its options and its main. The `burrow-edge` binary, which also carries
//! `dev`, is in the quickstart crate.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use burrow_runtime::notify;
use burrow_runtime::signals::ShutdownSignals;
use burrow_runtime::sources::{self, File};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server::{Edge, StartError};

/// `burrow-edge serve`'s options.
///
/// Every option can be set in the TOML file, in a `BURROW_*` environment variable, or as a flag;
/// flags win over the environment, which wins over the file. Exit codes: 0 clean stop, 2 bad
/// usage or config, 1 runtime failure.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML config file [env: BURROW_CONFIG]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Public URLs are {port}-{key}.{domain} (key `domain`) [env: BURROW_DOMAIN]
    #[arg(long)]
    domain: Option<String>,
    /// Store, generated certificates and tokens (key `state_dir`) [env: BURROW_STATE_DIR]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<String>,
    /// Plain HTTP listener (key `public.http`) [env: BURROW_PUBLIC_HTTP]
    #[arg(long, value_name = "ADDR:PORT")]
    public_http: Option<String>,
    /// HTTPS listener (key `public.https`) [env: BURROW_PUBLIC_HTTPS]
    #[arg(long, value_name = "ADDR:PORT")]
    public_https: Option<String>,
    /// Certificate chain for *.{domain} (key `public.cert`) [env: BURROW_PUBLIC_CERT]
    #[arg(long, value_name = "FILE")]
    public_cert: Option<String>,
    /// Its private key (key `public.key`) [env: BURROW_PUBLIC_KEY]
    #[arg(long, value_name = "FILE")]
    public_key: Option<String>,
    /// QUIC (UDP) listener for agents (key `agents.listen`, default 0.0.0.0:443) [env:
    /// BURROW_AGENTS_LISTEN]
    #[arg(long, value_name = "ADDR:PORT")]
    agents_listen: Option<String>,
    /// The name agents verify (key `agents.server_name`, default: the domain) [env:
    /// BURROW_AGENTS_SERVER_NAME]
    #[arg(long, value_name = "NAME")]
    agents_server_name: Option<String>,
    /// Certificate for agents; omitted: a CA is generated in state_dir (key `agents.cert`)
    /// [env: BURROW_AGENTS_CERT]
    #[arg(long, value_name = "FILE")]
    agents_cert: Option<String>,
    /// Its private key (key `agents.key`) [env: BURROW_AGENTS_KEY]
    #[arg(long, value_name = "FILE")]
    agents_key: Option<String>,
    /// How long a request waits for an absent agent before 503, default 5s (key
    /// `agents.wait`) [env: BURROW_AGENTS_WAIT]
    #[arg(long, value_name = "DURATION")]
    agents_wait: Option<String>,
    /// Requests that may wait per devbox, default 64 (key `agents.max_waiting`) [env:
    /// BURROW_AGENTS_MAX_WAITING]
    #[arg(long, value_name = "N")]
    agents_max_waiting: Option<String>,
    /// How long an idle kept-alive connection to a devbox service is kept, default 30s (key
    /// `agents.pool_idle`) [env: BURROW_AGENTS_POOL_IDLE]
    #[arg(long, value_name = "DURATION")]
    agents_pool_idle: Option<String>,
    /// Idle kept-alive connections per devbox port, 0 for none, default 64 (key
    /// `agents.pool_max_idle`) [env: BURROW_AGENTS_POOL_MAX_IDLE]
    #[arg(long, value_name = "N")]
    agents_pool_max_idle: Option<String>,
    /// Idle kept-alive connections in all, past which the oldest is closed, 0 for none,
    /// default 1024 (key `agents.pool_max_idle_total`) [env: BURROW_AGENTS_POOL_MAX_IDLE_TOTAL]
    #[arg(long, value_name = "N")]
    agents_pool_max_idle_total: Option<String>,
    /// Time running requests get to finish at shutdown, default 10s (key `drain_grace`) [env:
    /// BURROW_DRAIN_GRACE]
    #[arg(long, value_name = "DURATION")]
    drain_grace: Option<String>,
    /// Log level or filter, e.g. info, debug; default: RUST_LOG, then info (key `log.level`)
    /// [env: BURROW_LOG_LEVEL]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log lines as `text` (default) or `json` (key `log.format`) [env: BURROW_LOG_FORMAT]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Admin API listener (key `admin.listen`, default 127.0.0.1:7081) [env:
    /// BURROW_ADMIN_LISTEN]
    #[arg(long, value_name = "ADDR:PORT")]
    admin_listen: Option<String>,
    /// Admin token file; omitted: generated in state_dir/admin.token (key `admin.token_file`)
    /// [env: BURROW_ADMIN_TOKEN_FILE]
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<String>,
    /// Metrics listener (key `metrics.listen`) [env: BURROW_METRICS_LISTEN]
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<String>,
    /// The cluster's PostgreSQL store, postgres://user@host/database; omitted: SQLite in
    /// state_dir, one edge (key `cluster.store`) [env: BURROW_CLUSTER_STORE]
    #[arg(long, value_name = "URL")]
    cluster_store: Option<String>,
    /// This edge's unique name in its cluster; default: the host name (key `cluster.node`)
    /// [env: BURROW_CLUSTER_NODE]
    #[arg(long, value_name = "NAME")]
    cluster_node: Option<String>,
    /// Where other edges of the cluster forward requests to this one, QUIC over UDP (key
    /// `cluster.mesh_listen`, default 0.0.0.0:7443) [env: BURROW_CLUSTER_MESH_LISTEN]
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_mesh_listen: Option<String>,
    /// The address other edges dial for the mesh; default: mesh_listen's (key
    /// `cluster.mesh_addr`) [env: BURROW_CLUSTER_MESH_ADDR]
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_mesh_addr: Option<String>,
    /// Where agents reach this edge directly, told to agents of the other edges so they find
    /// it; default: not told (key `cluster.agents_addr`) [env: BURROW_CLUSTER_AGENTS_ADDR]
    #[arg(long, value_name = "HOST:PORT")]
    cluster_agents_addr: Option<String>,
    /// Where the edge POSTs its events (devbox.wake, devbox.activity, agent.connected,
    /// agent.disconnected, tunnel.*), http:// or https://; omitted: no webhooks (key
    /// `platform.webhook_url`) [env: BURROW_PLATFORM_WEBHOOK_URL]
    #[arg(long, value_name = "URL")]
    platform_webhook_url: Option<String>,
    /// The secret that signs webhooks (Burrow-Signature); omitted: generated once and written
    /// to state_dir/webhook.secret (key `platform.webhook_secret_file`) [env:
    /// BURROW_PLATFORM_WEBHOOK_SECRET_FILE]
    #[arg(long, value_name = "FILE")]
    platform_webhook_secret_file: Option<String>,
    /// At most one activity event per devbox per interval, default 30s (key
    /// `platform.activity_interval`) [env: BURROW_PLATFORM_ACTIVITY_INTERVAL]
    #[arg(long, value_name = "DURATION")]
    platform_activity_interval: Option<String>,
    /// How long a request waits for the agent of a devbox it asked the platform to wake,
    /// default 60s (key `platform.wake_wait`) [env: BURROW_PLATFORM_WAKE_WAIT]
    #[arg(long, value_name = "DURATION")]
    platform_wake_wait: Option<String>,
    /// Request line and headers in bytes; 431 past it, default 32768 (key `limits.max_head_bytes`) [env: BURROW_LIMITS_MAX_HEAD_BYTES]
    #[arg(long = "limits-max-head-bytes", value_name = "N")]
    limits_max_head_bytes: Option<String>,
    /// Header lines in a request; 431 past it, default 100 (key `limits.max_headers`) [env: BURROW_LIMITS_MAX_HEADERS]
    #[arg(long = "limits-max-headers", value_name = "N")]
    limits_max_headers: Option<String>,
    /// Time to receive a request head, default 10s (key `limits.head_timeout`) [env: BURROW_LIMITS_HEAD_TIMEOUT]
    #[arg(long = "limits-head-timeout", value_name = "DURATION")]
    limits_head_timeout: Option<String>,
    /// A WebSocket idle this long either way is closed, default 1h (key `limits.upgrade_idle`) [env: BURROW_LIMITS_UPGRADE_IDLE]
    #[arg(long = "limits-upgrade-idle", value_name = "DURATION")]
    limits_upgrade_idle: Option<String>,
    /// Open connections per client address, default 256 (key `limits.connections_per_client`) [env: BURROW_LIMITS_CONNECTIONS_PER_CLIENT]
    #[arg(long = "limits-connections-per-client", value_name = "N")]
    limits_connections_per_client: Option<String>,
    /// Agent handshakes in progress at once, default 4096 (key `limits.agent_handshakes`) [env: BURROW_LIMITS_AGENT_HANDSHAKES]
    #[arg(long = "limits-agent-handshakes", value_name = "N")]
    limits_agent_handshakes: Option<String>,
    /// Agent handshakes in progress at once from one address, default 512 (key `limits.agent_handshakes_per_source`) [env: BURROW_LIMITS_AGENT_HANDSHAKES_PER_SOURCE]
    #[arg(long = "limits-agent-handshakes-per-source", value_name = "N")]
    limits_agent_handshakes_per_source: Option<String>,
    /// Requests in flight per devbox; 503 past it, default 1024 (key `limits.streams_per_devbox`) [env: BURROW_LIMITS_STREAMS_PER_DEVBOX]
    #[arg(long = "limits-streams-per-devbox", value_name = "N")]
    limits_streams_per_devbox: Option<String>,
    /// Requests a second per tunnel, 0 unlimited; 429 past it, default 1000 (key `limits.rate`) [env: BURROW_LIMITS_RATE]
    #[arg(long = "limits-rate", value_name = "N")]
    limits_rate: Option<String>,
    /// Requests a tunnel may make at once above the rate, default 2000 (key `limits.burst`) [env: BURROW_LIMITS_BURST]
    #[arg(long = "limits-burst", value_name = "N")]
    limits_burst: Option<String>,
    /// Failed admin authentications per client a minute, default 10 (key `limits.admin_failures`) [env: BURROW_LIMITS_ADMIN_FAILURES]
    #[arg(long = "limits-admin-failures", value_name = "N")]
    limits_admin_failures: Option<String>,
}

impl ServeArgs {
    fn flags(&self) -> Vec<(&'static str, String)> {
        [
            ("domain", &self.domain),
            ("state_dir", &self.state_dir),
            ("public.http", &self.public_http),
            ("public.https", &self.public_https),
            ("public.cert", &self.public_cert),
            ("public.key", &self.public_key),
            ("agents.listen", &self.agents_listen),
            ("agents.server_name", &self.agents_server_name),
            ("agents.cert", &self.agents_cert),
            ("agents.key", &self.agents_key),
            ("agents.wait", &self.agents_wait),
            ("agents.max_waiting", &self.agents_max_waiting),
            ("agents.pool_idle", &self.agents_pool_idle),
            ("agents.pool_max_idle", &self.agents_pool_max_idle),
            (
                "agents.pool_max_idle_total",
                &self.agents_pool_max_idle_total,
            ),
            ("drain_grace", &self.drain_grace),
            ("log.level", &self.log_level),
            ("log.format", &self.log_format),
            ("admin.listen", &self.admin_listen),
            ("admin.token_file", &self.admin_token_file),
            ("metrics.listen", &self.metrics_listen),
            ("cluster.store", &self.cluster_store),
            ("cluster.node", &self.cluster_node),
            ("cluster.mesh_listen", &self.cluster_mesh_listen),
            ("cluster.mesh_addr", &self.cluster_mesh_addr),
            ("cluster.agents_addr", &self.cluster_agents_addr),
            ("platform.webhook_url", &self.platform_webhook_url),
            (
                "platform.webhook_secret_file",
                &self.platform_webhook_secret_file,
            ),
            (
                "platform.activity_interval",
                &self.platform_activity_interval,
            ),
            ("platform.wake_wait", &self.platform_wake_wait),
            ("limits.max_head_bytes", &self.limits_max_head_bytes),
            ("limits.max_headers", &self.limits_max_headers),
            ("limits.head_timeout", &self.limits_head_timeout),
            ("limits.upgrade_idle", &self.limits_upgrade_idle),
            (
                "limits.connections_per_client",
                &self.limits_connections_per_client,
            ),
            ("limits.agent_handshakes", &self.limits_agent_handshakes),
            (
                "limits.agent_handshakes_per_source",
                &self.limits_agent_handshakes_per_source,
            ),
            ("limits.streams_per_devbox", &self.limits_streams_per_devbox),
            ("limits.rate", &self.limits_rate),
            ("limits.burst", &self.limits_burst),
            ("limits.admin_failures", &self.limits_admin_failures),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }

    fn load(&self, env: &HashMap<String, String>) -> Result<Config, sources::ConfigError> {
        let path = self
            .config
            .clone()
            .or_else(|| env.get("BURROW_CONFIG").map(PathBuf::from));
        let text = path.as_deref().map(sources::read_file).transpose()?;
        let file = path
            .as_deref()
            .zip(text.as_deref())
            .map(|(path, text)| File { path, text });
        Config::load(file, env, &self.flags())
    }
}

/// `burrow-edge serve`: loads the configuration, runs an edge until SIGTERM or SIGINT (SIGHUP
/// reloads its certificates), and says why it stopped in the exit code.
pub fn serve_main(args: &ServeArgs) -> ExitCode {
    let runtime = match burrow_runtime::signals::runtime("burrow-edge") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match args.load(&env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("burrow-edge: {e}");
            return ExitCode::from(2);
        }
    };
    burrow_runtime::logging::init(&config.log);
    runtime.block_on(serve(config, args, &env))
}

async fn serve(config: Config, args: &ServeArgs, env: &HashMap<String, String>) -> ExitCode {
    // Every handler exists before READY=1: systemd may signal at once, and a signal without a
    // handler would kill the edge without draining (SIGTERM) or take it down (SIGHUP).
    let signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .and_then(|hangups| Ok((hangups, ShutdownSignals::install()?)));
    let (mut hangups, mut shutdown) = match signals {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("burrow-edge: cannot handle SIGHUP, SIGTERM and SIGINT: {e}");
            return ExitCode::from(1);
        }
    };
    let edge = match Edge::start(config).await {
        Ok(edge) => edge,
        Err(e) => {
            eprintln!("burrow-edge: {e}");
            let code = match e {
                StartError::Bind { .. } | StartError::Cert(_) | StartError::File { .. } => 2,
                _ => 1,
            };
            return ExitCode::from(code);
        }
    };
    if let Some(ca) = &edge.agent_ca {
        tracing::info!(ca = %ca.display(), "agents trust the generated CA in this file");
    }
    // systemd: ready now that every listener is bound; the watchdog from here.
    let stopping = CancellationToken::new();
    let notify = notify::Notifier::from_env(env).map(|notifier| {
        notifier.ready();
        let mut listening: Vec<String> = [("http", edge.http_addr), ("https", edge.https_addr)]
            .into_iter()
            .filter_map(|(name, addr)| Some(format!("{name} {}", addr?)))
            .collect();
        listening.push(format!("agents {} (QUIC)", edge.agents_addr));
        listening.push(format!("admin {}", edge.admin_addr));
        notifier.status(&format!("listening: {}", listening.join(", ")));
        tokio::spawn(notify::keepalive(notifier, stopping.clone()))
    });
    loop {
        tokio::select! {
            () = shutdown.recv() => break,
            Some(()) = hangups.recv() => {
                // Reload from the same sources; a bad new config is refused and the old kept.
                match args.load(env) {
                    Ok(next) => {
                        if let Err(e) = edge.reload_certs(&next) {
                            tracing::error!(error = %e, "reload refused; keeping the current certificates");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "reload refused: bad config; keeping the current one"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    stopping.cancel();
    if let Some(notify) = notify {
        let _ = notify.await; // STOPPING=1 sent
    }
    edge.stop().await;
    ExitCode::SUCCESS
}
