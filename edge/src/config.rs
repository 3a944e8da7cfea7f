//! The edge's configuration (`burrow-edge serve --config edge.toml`): parsed once from the file,
//! `BURROW_*` environment variables and flags into a [`Config`] that needs no further checks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_runtime::sources::{self, ConfigError, File, Kind, Setting, int};

use crate::limits::Limits;
pub use crate::platform::PlatformConfig;
use crate::platform::settings as platform;
use crate::store::StoreUrl;
use serde::Deserialize;

macro_rules! settings {
    ($($key:literal => $env:literal $(as $kind:ident)?),* $(,)?) => {
        &[$(Setting { key: $key, env: $env, kind: settings!(@kind $($kind)?) }),*]
    };
    (@kind) => { Kind::Str };
    (@kind $kind:ident) => { Kind::$kind };
}

/// Every key the edge reads, with its environment variable.
pub const SETTINGS: &[Setting] = settings! {
    "domain" => "BURROW_DOMAIN",
    "state_dir" => "BURROW_STATE_DIR",
    "public.http" => "BURROW_PUBLIC_HTTP",
    "public.https" => "BURROW_PUBLIC_HTTPS",
    "public.cert" => "BURROW_PUBLIC_CERT",
    "public.key" => "BURROW_PUBLIC_KEY",
    "agents.listen" => "BURROW_AGENTS_LISTEN",
    "agents.server_name" => "BURROW_AGENTS_SERVER_NAME",
    "agents.cert" => "BURROW_AGENTS_CERT",
    "agents.key" => "BURROW_AGENTS_KEY",
    "agents.wait" => "BURROW_AGENTS_WAIT",
    "agents.max_waiting" => "BURROW_AGENTS_MAX_WAITING" as Int,
    "agents.pool_idle" => "BURROW_AGENTS_POOL_IDLE",
    "agents.pool_max_idle" => "BURROW_AGENTS_POOL_MAX_IDLE" as Int,
    "agents.pool_max_idle_total" => "BURROW_AGENTS_POOL_MAX_IDLE_TOTAL" as Int,
    "drain_grace" => "BURROW_DRAIN_GRACE",
    "log.level" => "BURROW_LOG_LEVEL",
    "log.format" => "BURROW_LOG_FORMAT",
    "admin.listen" => "BURROW_ADMIN_LISTEN",
    "admin.token_file" => "BURROW_ADMIN_TOKEN_FILE",
    "metrics.listen" => "BURROW_METRICS_LISTEN",
    "limits.max_head_bytes" => "BURROW_LIMITS_MAX_HEAD_BYTES" as Int,
    "limits.max_headers" => "BURROW_LIMITS_MAX_HEADERS" as Int,
    "limits.head_timeout" => "BURROW_LIMITS_HEAD_TIMEOUT",
    "limits.upgrade_idle" => "BURROW_LIMITS_UPGRADE_IDLE",
    "limits.connections_per_client" => "BURROW_LIMITS_CONNECTIONS_PER_CLIENT" as Int,
    "limits.agent_handshakes" => "BURROW_LIMITS_AGENT_HANDSHAKES" as Int,
    "limits.agent_handshakes_per_source" => "BURROW_LIMITS_AGENT_HANDSHAKES_PER_SOURCE" as Int,
    "limits.streams_per_devbox" => "BURROW_LIMITS_STREAMS_PER_DEVBOX" as Int,
    "limits.rate" => "BURROW_LIMITS_RATE" as Int,
    "limits.burst" => "BURROW_LIMITS_BURST" as Int,
    "limits.admin_failures" => "BURROW_LIMITS_ADMIN_FAILURES" as Int,
    "cluster.store" => "BURROW_CLUSTER_STORE",
    "cluster.node" => "BURROW_CLUSTER_NODE",
    "cluster.mesh_listen" => "BURROW_CLUSTER_MESH_LISTEN",
    "cluster.mesh_addr" => "BURROW_CLUSTER_MESH_ADDR",
    "cluster.agents_addr" => "BURROW_CLUSTER_AGENTS_ADDR",
    "platform.webhook_url" => "BURROW_PLATFORM_WEBHOOK_URL",
    "platform.webhook_secret_file" => "BURROW_PLATFORM_WEBHOOK_SECRET_FILE",
    "platform.activity_interval" => "BURROW_PLATFORM_ACTIVITY_INTERVAL",
    "platform.wake_wait" => "BURROW_PLATFORM_WAKE_WAIT",
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    domain: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    public: RawPublic,
    #[serde(default)]
    agents: RawAgents,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    metrics: RawMetrics,
    drain_grace: Option<String>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    platform: platform::RawPlatform,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    store: Option<String>,
    node: Option<String>,
    mesh_listen: Option<String>,
    mesh_addr: Option<String>,
    agents_addr: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_head_bytes: Option<i64>,
    max_headers: Option<i64>,
    head_timeout: Option<String>,
    upgrade_idle: Option<String>,
    connections_per_client: Option<i64>,
    agent_handshakes: Option<i64>,
    agent_handshakes_per_source: Option<i64>,
    streams_per_devbox: Option<i64>,
    rate: Option<i64>,
    burst: Option<i64>,
    admin_failures: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublic {
    http: Option<String>,
    https: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    listen: Option<String>,
    server_name: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    wait: Option<String>,
    max_waiting: Option<usize>,
    pool_idle: Option<String>,
    pool_max_idle: Option<i64>,
    pool_max_idle_total: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// The public HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Https {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Certificate for `*.{domain}`.
    pub tls: CertFiles,
}

/// The edge's checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public URLs are `{port}-{key}.{domain}`; lowercase, no trailing dot.
    pub domain: String,
    /// Store, generated certificates and tokens.
    pub state_dir: PathBuf,
    /// Plain HTTP listener.
    pub http: Option<SocketAddr>,
    /// HTTPS listener.
    pub https: Option<Https>,
    /// QUIC listener for agents.
    pub agents_listen: SocketAddr,
    /// The TLS name agents verify.
    pub agents_server_name: String,
    /// The agents' certificate; `None`: a CA and certificate are generated in `state_dir`.
    pub agents_tls: Option<CertFiles>,
    /// Admin API listener.
    pub admin_listen: SocketAddr,
    /// Admin token file; `None`: generated in `state_dir/admin.token`.
    pub admin_token_file: Option<PathBuf>,
    /// Metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a request waits for an absent agent before 503.
    pub agent_wait: Duration,
    /// Requests that may wait per devbox; more get 503 at once.
    pub max_waiting: usize,
    /// How long an idle kept-alive connection to a service is kept.
    pub pool_idle: Duration,
    /// Idle kept-alive connections per devbox port; 0: none kept.
    pub pool_max_idle: usize,
    /// Idle kept-alive connections, all devboxes and ports together; past it a returned one
    /// closes the oldest. 0: none kept.
    pub pool_max_idle_total: usize,
    /// Bounds on public clients, tunnels and devboxes.
    pub limits: Limits,
    /// Grace period for running requests at shutdown.
    pub drain_grace: Duration,
    /// Log level and format.
    pub log: burrow_runtime::logging::LogSettings,
    /// The cluster's PostgreSQL store; `None`: SQLite in `state_dir`, one edge.
    pub cluster_store: Option<StoreUrl>,
    /// This edge's unique name in its cluster (default: the host name).
    pub cluster_node: String,
    /// Where other edges forward requests to this one (QUIC, UDP).
    pub mesh_listen: SocketAddr,
    /// The address other edges dial; `None`: `mesh_listen`'s.
    pub mesh_addr: Option<SocketAddr>,
    /// Where agents reach this edge directly (`host:port`), told to the agents of the other
    /// edges; `None`: not told.
    pub cluster_agents_addr: Option<String>,
    /// Webhooks and the timings of the platform's side.
    pub platform: PlatformConfig,
}

/// `agents.pool_max_idle_total` by default: the agent's default `forward.max_streams` and the
/// edge's default `limits.streams_per_devbox`, so the pool alone can hold every stream of one
/// busy devbox (16 ports at the per-port 64), while what all idle connections cost together
/// stays bounded: at the edge a hyper connection and a QUIC stream each, and in the devboxes a
/// stream of the agent and a TCP connection to the service each; about 50 KiB in all for one,
/// edge, agent and service in one process (`tests/tests/pool.rs`'s setup, 512 connections), so
/// some 50 MB at the cap.
const POOL_MAX_IDLE_TOTAL: usize = 1024;

impl Config {
    /// Loads the configuration from a file (optional), the environment and flags.
    pub fn load(
        file: Option<File<'_>>,
        env: &HashMap<String, String>,
        flags: &[(&'static str, String)],
    ) -> Result<Config, ConfigError> {
        let table = sources::layer(SETTINGS, file, env, flags)?;
        let raw: RawConfig = sources::deserialize(table, file)?;
        let base = file.and_then(|f| f.path.parent()).map(Path::to_path_buf);
        let path = |p: PathBuf| match &base {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        };

        let domain = raw.domain.ok_or_else(|| ConfigError::Missing {
            key: "domain",
            hint: "set `domain = \"tunnel.example.com\"` (public URLs are {port}-{key}.{domain})"
                .into(),
        })?;
        let domain = check_domain(&domain)?;
        let state_dir = path(raw.state_dir.ok_or_else(|| ConfigError::Missing {
            key: "state_dir",
            hint: "set `state_dir = \"/var/lib/burrow-edge\"` (the store lives there)".into(),
        })?);

        let (http, https) = public(raw.public, path)?;
        let agents_listen = addr(
            "agents.listen",
            raw.agents.listen.as_deref().unwrap_or("0.0.0.0:443"),
        )?;
        let agents_tls = agents_tls(raw.agents.cert, raw.agents.key, path)?;
        let agents_server_name = raw.agents.server_name.unwrap_or_else(|| domain.clone());
        let admin_listen = addr(
            "admin.listen",
            raw.admin.listen.as_deref().unwrap_or("127.0.0.1:7081"),
        )?;
        let metrics_listen = raw
            .metrics
            .listen
            .map(|s| addr("metrics.listen", &s))
            .transpose()?;

        Ok(Config {
            domain,
            state_dir,
            http,
            https,
            agents_listen,
            agents_server_name,
            agents_tls,
            admin_listen,
            admin_token_file: raw.admin.token_file.map(path),
            metrics_listen,
            agent_wait: duration("agents.wait", raw.agents.wait, Duration::from_secs(5))?,
            max_waiting: raw.agents.max_waiting.unwrap_or(64),
            pool_idle: duration(
                "agents.pool_idle",
                raw.agents.pool_idle,
                Duration::from_secs(30),
            )?,
            pool_max_idle: int(
                "agents.pool_max_idle",
                raw.agents.pool_max_idle,
                64,
                0..=100_000,
            )?,
            pool_max_idle_total: int(
                "agents.pool_max_idle_total",
                raw.agents.pool_max_idle_total,
                POOL_MAX_IDLE_TOTAL,
                0..=1_000_000,
            )?,
            log: burrow_runtime::logging::LogSettings::parse(raw.log.level, raw.log.format, env)?,
            limits: limits(raw.limits)?,
            drain_grace: duration("drain_grace", raw.drain_grace, Duration::from_secs(10))?,
            cluster_node: node(raw.cluster.node)?,
            mesh_listen: addr(
                "cluster.mesh_listen",
                raw.cluster.mesh_listen.as_deref().unwrap_or("0.0.0.0:7443"),
            )?,
            mesh_addr: raw
                .cluster
                .mesh_addr
                .map(|a| addr("cluster.mesh_addr", &a))
                .transpose()?,
            cluster_agents_addr: raw.cluster.agents_addr.map(host_port).transpose()?,
            cluster_store: raw.cluster.store.map(store_url).transpose()?,
            platform: platform::PlatformConfig::parse(raw.platform, path)?,
        })
    }
}

/// `cluster.store`, checked.
fn store_url(url: String) -> Result<StoreUrl, ConfigError> {
    url.parse().map_err(|message| ConfigError::Invalid {
        key: "cluster.store",
        message,
    })
}

/// `cluster.node`: 1-63 letters, digits, `-`, `_` or `.`; by default the host name.
fn node(raw: Option<String>) -> Result<String, ConfigError> {
    let node = match raw {
        Some(node) => node,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
    };
    let fits = (1..=63).contains(&node.len())
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fits {
        Ok(node)
    } else {
        Err(ConfigError::Invalid {
            key: "cluster.node",
            message: format!(
                "`{node}` is not a node name: use 1-63 letters, digits, `-`, `_` or `.`, unique \
                 among the cluster's edges"
            ),
        })
    }
}

/// The public listeners: plain HTTP, HTTPS with its certificate, at least one of them.
fn public(
    raw: RawPublic,
    path: impl Fn(PathBuf) -> PathBuf,
) -> Result<(Option<SocketAddr>, Option<Https>), ConfigError> {
    let http = raw.http.map(|s| addr("public.http", &s)).transpose()?;
    let https = match (raw.https, raw.cert, raw.key) {
        (None, _, _) => None,
        (Some(listen), Some(cert), Some(key)) => Some(Https {
            listen: addr("public.https", &listen)?,
            tls: CertFiles {
                cert: path(cert),
                key: path(key),
            },
        }),
        (Some(_), None, _) => {
            return Err(ConfigError::Missing {
                key: "public.cert",
                hint: "`public.https` needs a certificate chain for *.{domain}".into(),
            });
        }
        (Some(_), _, None) => {
            return Err(ConfigError::Missing {
                key: "public.key",
                hint: "`public.https` needs the certificate's private key".into(),
            });
        }
    };
    if http.is_none() && https.is_none() {
        return Err(ConfigError::Missing {
            key: "public.http",
            hint: "set `public.http` or `public.https` (or both): the public listeners".into(),
        });
    }
    Ok((http, https))
}

/// The agents' certificate and key, both or neither (then the edge generates them).
fn agents_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    path: impl Fn(PathBuf) -> PathBuf,
) -> Result<Option<CertFiles>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(CertFiles {
            cert: path(cert),
            key: path(key),
        })),
        (Some(_), None) => Err(ConfigError::Missing {
            key: "agents.key",
            hint: "`agents.cert` needs its private key".into(),
        }),
        (None, Some(_)) => Err(ConfigError::Missing {
            key: "agents.cert",
            hint: "`agents.key` needs its certificate chain".into(),
        }),
    }
}

/// A duration key: its value parsed, or the default.
fn duration(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.map_or(Ok(default), |v| sources::parse_duration(key, &v))
}

fn limits(raw: RawLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let limits = Limits {
        max_head_bytes: int(
            "limits.max_head_bytes",
            raw.max_head_bytes,
            d.max_head_bytes,
            8192..=1024 * 1024,
        )?,
        max_headers: int(
            "limits.max_headers",
            raw.max_headers,
            d.max_headers,
            8..=1000,
        )?,
        head_timeout: duration("limits.head_timeout", raw.head_timeout, d.head_timeout)?,
        upgrade_idle: duration("limits.upgrade_idle", raw.upgrade_idle, d.upgrade_idle)?,
        connections_per_client: int(
            "limits.connections_per_client",
            raw.connections_per_client,
            d.connections_per_client,
            1..=1_000_000,
        )?,
        agent_handshakes: int(
            "limits.agent_handshakes",
            raw.agent_handshakes,
            d.agent_handshakes,
            1..=1_000_000,
        )?,
        agent_handshakes_per_source: int(
            "limits.agent_handshakes_per_source",
            raw.agent_handshakes_per_source,
            d.agent_handshakes_per_source,
            1..=1_000_000,
        )?,
        streams_per_devbox: int(
            "limits.streams_per_devbox",
            raw.streams_per_devbox,
            d.streams_per_devbox,
            1..=1_000_000,
        )?,
        rate: int("limits.rate", raw.rate, d.rate, 0..=10_000_000)?,
        burst: int("limits.burst", raw.burst, d.burst, 1..=10_000_000)?,
        admin_failures: int(
            "limits.admin_failures",
            raw.admin_failures,
            d.admin_failures,
            1..=1_000_000,
        )?,
    };
    for (key, value) in [
        ("limits.head_timeout", limits.head_timeout),
        ("limits.upgrade_idle", limits.upgrade_idle),
    ] {
        if value.is_zero() {
            return Err(ConfigError::Invalid {
                key,
                message: "must be longer than 0, e.g. 10s".into(),
            });
        }
    }
    Ok(limits)
}

/// `cluster.agents_addr`: a `host:port` agents can dial (a name or an address; the port not
/// 0).
fn host_port(value: String) -> Result<String, ConfigError> {
    let value = value.trim();
    let valid = value.rsplit_once(':').is_some_and(|(host, port)| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if valid {
        Ok(value.to_owned())
    } else {
        Err(ConfigError::Invalid {
            key: "cluster.agents_addr",
            message: format!("`{value}` is not host:port (e.g. edge-1.example.com:443)"),
        })
    }
}

fn addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| ConfigError::Invalid {
        key,
        message: format!("`{s}` is not an IP address and port, e.g. 0.0.0.0:443 or [::]:443"),
    })
}

/// Whether `d` (lowercase, no trailing dot) is a domain the edge serves: DNS labels of
/// letters, digits and hyphens, not starting or ending with a hyphen.
pub fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Lowercases and checks a domain (see [`is_domain`]).
fn check_domain(domain: &str) -> Result<String, ConfigError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    if is_domain(&d) {
        Ok(d)
    } else {
        Err(ConfigError::Invalid {
            key: "domain",
            message: format!("`{domain}` is not a DNS name like tunnel.example.com"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let file = File {
            path: Path::new("/etc/burrow/edge.toml"),
            text,
        };
        Config::load(Some(file), &HashMap::new(), &[])
    }

    #[test]
    fn cluster_agents_addr_is_host_port() {
        let ok =
            load("domain = \"t.example.com\"\nstate_dir = \"/tmp/x\"\n[public]\nhttp = \"127.0.0.1:80\"\n[cluster]\nagents_addr = \"edge-1.example.com:443\"")
                .expect("a host:port loads");
        assert_eq!(
            ok.cluster_agents_addr.as_deref(),
            Some("edge-1.example.com:443")
        );
        for bad in ["edge-1.example.com", "edge-1:0", ":443"] {
            let text = format!(
                "domain = \"t.example.com\"\nstate_dir = \"/tmp/x\"\n[public]\nhttp = \"127.0.0.1:80\"\n[cluster]\nagents_addr = \"{bad}\""
            );
            let err = load(&text).expect_err(bad).to_string();
            assert!(err.contains("cluster.agents_addr"), "{bad}: {err}");
        }
    }

    #[test]
    fn design_example_loads() {
        let cfg = load(
            r#"
            domain = "Tunnel.Example.com."
            state_dir = "/var/lib/burrow-edge"
            [public]
            http = "0.0.0.0:80"
            https = "0.0.0.0:443"
            cert = "/etc/burrow/public.pem"
            key = "public.key"
            [agents]
            listen = "0.0.0.0:443"
            server_name = "edge.example.com"
            [admin]
            listen = "127.0.0.1:7081"
            [metrics]
            listen = "127.0.0.1:9465"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.domain, "tunnel.example.com");
        assert_eq!(
            cfg.https.unwrap().tls.key,
            PathBuf::from("/etc/burrow/public.key")
        );
        assert_eq!(cfg.agents_server_name, "edge.example.com");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "state_dir = \"/x\"\n[public]\nhttp = \"0.0.0.0:80\"",
                "`domain`",
            ),
            ("domain = \"a_b\"\nstate_dir = \"/x\"", "`domain`"),
            ("domain = \"a.b\"\nstate_dir = \"/x\"", "public.http"),
            (
                "domain = \"a.b\"\nstate_dir = \"/x\"\n[public]\nhttp = \"80\"",
                "public.http",
            ),
            (
                "domain = \"a.b\"\nstate_dir = \"/x\"\n[public]\nhttps = \"0.0.0.0:443\"",
                "public.cert",
            ),
            (
                "domain = \"a.b\"\nstate_dir = \"/x\"\n[public]\nhttpx = \"0.0.0.0:80\"",
                "httpx",
            ),
        ];
        for (text, key) in cases {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn pool_bounds_from_file_environment_and_defaults() {
        let base = "domain = \"a.b\"\nstate_dir = \"/x\"\n[public]\nhttp = \"0.0.0.0:80\"\n";
        let cfg = load(base).unwrap();
        assert_eq!((cfg.pool_max_idle, cfg.pool_max_idle_total), (64, 1024));
        let cfg = load(&format!("{base}[agents]\npool_max_idle_total = 3\n")).unwrap();
        assert_eq!(cfg.pool_max_idle_total, 3);
        let file = File {
            path: Path::new("/etc/burrow/edge.toml"),
            text: base,
        };
        let env = HashMap::from([(
            "BURROW_AGENTS_POOL_MAX_IDLE_TOTAL".to_owned(),
            "0".to_owned(),
        )]);
        let cfg = Config::load(Some(file), &env, &[]).unwrap();
        assert_eq!(cfg.pool_max_idle_total, 0, "0 keeps none");
        let err = load(&format!("{base}[agents]\npool_max_idle_total = -1\n")).unwrap_err();
        assert!(
            err.to_string().contains("agents.pool_max_idle_total"),
            "{err}"
        );
    }

    #[test]
    fn platform_keys_from_file_environment_flags_and_defaults() {
        let base = "domain = \"a.b\"\nstate_dir = \"/x\"\n[public]\nhttp = \"0.0.0.0:80\"\n";
        let cfg = load(base).unwrap();
        assert!(cfg.platform.webhook_url.is_none());
        assert_eq!(cfg.platform.webhook_secret_file, None);
        assert_eq!(cfg.platform.activity_interval, Duration::from_secs(30));
        assert_eq!(cfg.platform.wake_wait, Duration::from_secs(60));
        let cfg = load(&format!(
            "{base}[platform]\nwebhook_url = \"https://platform.internal/burrow-events\"\n\
             webhook_secret_file = \"webhook.secret\"\nactivity_interval = \"5s\"\n"
        ))
        .unwrap();
        let url = cfg.platform.webhook_url.expect("webhook_url");
        assert_eq!(url.to_string(), "https://platform.internal/burrow-events");
        assert_eq!(
            cfg.platform.webhook_secret_file.as_deref(),
            Some(Path::new("/etc/burrow/webhook.secret")),
            "relative to the config file"
        );
        assert_eq!(cfg.platform.activity_interval, Duration::from_secs(5));
        let file = File {
            path: Path::new("/etc/burrow/edge.toml"),
            text: base,
        };
        let env = HashMap::from([
            (
                "BURROW_PLATFORM_WEBHOOK_URL".to_owned(),
                "http://127.0.0.1:9/hook".to_owned(),
            ),
            ("BURROW_PLATFORM_WAKE_WAIT".to_owned(), "2m".to_owned()),
        ]);
        let flags = [("platform.wake_wait", "90s".to_owned())];
        let cfg = Config::load(Some(file), &env, &flags).unwrap();
        assert_eq!(
            cfg.platform.webhook_url.map(|u| u.to_string()).as_deref(),
            Some("http://127.0.0.1:9/hook")
        );
        assert_eq!(cfg.platform.wake_wait, Duration::from_secs(90), "flags win");
        for (bad, key) in [
            ("webhook_url = \"ftp://x/y\"", "platform.webhook_url"),
            ("webhook_url = \"https://\"", "platform.webhook_url"),
            ("webhook_url = \"not a url\"", "platform.webhook_url"),
            ("activity_interval = \"0s\"", "platform.activity_interval"),
            ("wake_wait = \"soon\"", "platform.wake_wait"),
        ] {
            let err = load(&format!("{base}[platform]\n{bad}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }
}
