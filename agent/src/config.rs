//! The agent's configuration: parsed once from its sources into a [`Config`] with no optional
//! values left to check later.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_protocol::{AgentToken, Port};
use serde::Deserialize;

use crate::edges::{RawEdges, edge};
use crate::policy::PortPolicy;
use burrow_runtime::sources::{self, ConfigError, File, Kind, Setting};

/// Every key the agent reads, with its environment variable.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "edge",
        env: "BURROW_EDGE",
        kind: Kind::Str,
    },
    Setting {
        key: "server_name",
        env: "BURROW_SERVER_NAME",
        kind: Kind::Str,
    },
    Setting {
        key: "ha_connections",
        env: "BURROW_HA_CONNECTIONS",
        kind: Kind::Int,
    },
    Setting {
        key: "ca",
        env: "BURROW_CA",
        kind: Kind::Str,
    },
    Setting {
        key: "token_file",
        env: "BURROW_TOKEN_FILE",
        kind: Kind::Str,
    },
    Setting {
        key: "state_dir",
        env: "BURROW_STATE_DIR",
        kind: Kind::Str,
    },
    Setting {
        key: "forward.allow_ports",
        env: "BURROW_FORWARD_ALLOW_PORTS",
        kind: Kind::Ports,
    },
    Setting {
        key: "forward.deny_ports",
        env: "BURROW_FORWARD_DENY_PORTS",
        kind: Kind::Ports,
    },
    Setting {
        key: "forward.http2_ports",
        env: "BURROW_FORWARD_HTTP2_PORTS",
        kind: Kind::Ports,
    },
    Setting {
        key: "forward.max_streams",
        env: "BURROW_FORWARD_MAX_STREAMS",
        kind: Kind::Int,
    },
    Setting {
        key: "forward.connect_timeout",
        env: "BURROW_FORWARD_CONNECT_TIMEOUT",
        kind: Kind::Str,
    },
    Setting {
        key: "metrics.listen",
        env: "BURROW_METRICS_LISTEN",
        kind: Kind::Str,
    },
    Setting {
        key: "drain_grace",
        env: "BURROW_DRAIN_GRACE",
        kind: Kind::Str,
    },
    Setting {
        key: "log.level",
        env: "BURROW_LOG_LEVEL",
        kind: Kind::Str,
    },
    Setting {
        key: "log.format",
        env: "BURROW_LOG_FORMAT",
        kind: Kind::Str,
    },
    Setting {
        key: "liveness.heartbeat_interval",
        env: "BURROW_LIVENESS_HEARTBEAT_INTERVAL",
        kind: Kind::Str,
    },
    Setting {
        key: "liveness.heartbeat_timeout",
        env: "BURROW_LIVENESS_HEARTBEAT_TIMEOUT",
        kind: Kind::Str,
    },
    Setting {
        key: "liveness.nudge_interval",
        env: "BURROW_LIVENESS_NUDGE_INTERVAL",
        kind: Kind::Str,
    },
    Setting {
        key: "liveness.idle_timeout",
        env: "BURROW_LIVENESS_IDLE_TIMEOUT",
        kind: Kind::Str,
    },
    Setting {
        key: "liveness.resume_tick",
        env: "BURROW_LIVENESS_RESUME_TICK",
        kind: Kind::Str,
    },
    Setting {
        key: "reconnect.backoff_initial",
        env: "BURROW_RECONNECT_BACKOFF_INITIAL",
        kind: Kind::Str,
    },
    Setting {
        key: "reconnect.backoff_max",
        env: "BURROW_RECONNECT_BACKOFF_MAX",
        kind: Kind::Str,
    },
    Setting {
        key: "reconnect.healthy_after",
        env: "BURROW_RECONNECT_HEALTHY_AFTER",
        kind: Kind::Str,
    },
    Setting {
        key: "reconnect.dial_timeout",
        env: "BURROW_RECONNECT_DIAL_TIMEOUT",
        kind: Kind::Str,
    },
];

/// The environment variable that may hold the agent token itself.
pub const TOKEN_ENV: &str = "BURROW_AGENT_TOKEN";

/// Where systemd tells a unit with `StateDirectory=` its directory: `state_dir`'s default.
pub const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";

/// `state_dir` without `state_dir` or [`STATE_DIRECTORY_ENV`] set.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/burrow-agent";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    edge: Option<RawEdges>,
    ha_connections: Option<i64>,
    server_name: Option<String>,
    ca: Option<PathBuf>,
    token_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    forward: RawForward,
    #[serde(default)]
    metrics: RawMetrics,
    drain_grace: Option<String>,
    #[serde(default)]
    liveness: RawLiveness,
    #[serde(default)]
    reconnect: RawReconnect,
    /// Read by the sidecar (`crate::sidecar`), accepted here so the file may carry it.
    #[serde(default, rename = "entrypoint")]
    _entrypoint: RawEntrypoint,
    #[serde(default)]
    log: RawLog,
}

/// `[log]`, shared by both binaries.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub(crate) level: Option<String>,
    pub(crate) format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntrypoint {
    #[serde(rename = "keep_running")]
    _keep_running: Option<bool>,
    #[serde(rename = "signal_group")]
    _signal_group: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLiveness {
    heartbeat_interval: Option<String>,
    heartbeat_timeout: Option<String>,
    nudge_interval: Option<String>,
    idle_timeout: Option<String>,
    resume_tick: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconnect {
    backoff_initial: Option<String>,
    backoff_max: Option<String>,
    healthy_after: Option<String>,
    dial_timeout: Option<String>,
}

/// How the agent notices a dead path or a resume. Defaults and their costs:
///
/// - A heartbeat (ping on the control stream, answered by the edge) every 5 s: on an idle
///   devbox that is a ping, a pong and an ACK, about 3 small packets every 5 s. It measures
///   RTT and serves as the QUIC keep-alive, which keeps NAT mappings open.
/// - A nudge every second in between: a one-byte QUIC datagram the edge only acknowledges (one
///   small packet each way). An edge that lost the connection (it restarted, or timed the
///   connection out while the devbox was frozen with its clocks) answers it with a stateless
///   reset, so the agent notices within a second and dials again.
/// - A pong missing for 3 s makes the path suspect: the agent moves to a fresh UDP socket (so
///   the connection migrates if the edge still has it) and probes again for 3 s; still nothing,
///   and the connection is dropped and dialed anew.
/// - A nudge interval with nothing at all from the edge (not even the ACK of the nudge that
///   opened it) brings the heartbeat forward: a dead path costs at most about
///   2 x nudge_interval + 2 x timeout (8 s) to notice, instead of interval + 2 x timeout (11 s).
///   With several edges, a shorter `heartbeat_timeout` replaces a dead edge's connection
///   sooner (1 s: within 4 s); the other connection carries the devbox meanwhile.
/// - QUIC's idle timeout (20 s) is the backstop.
/// - The clocks are sampled every second; a resume (clocks diverging by more than 2 s, or a
///   tick more than 2 s late) triggers an immediate probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Time a heartbeat or probe may take to be answered.
    pub heartbeat_timeout: Duration,
    /// Time between nudges (one-byte QUIC datagrams the edge only acknowledges).
    pub nudge_interval: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Clock sampling period for resume detection.
    pub resume_tick: Duration,
    /// Divergence that counts as a resume.
    pub resume_threshold: Duration,
}

/// When to dial again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// Backoff between failed dials.
    pub backoff: crate::backoff::Policy,
    /// A session that lasted this long resets the backoff.
    pub healthy_after: Duration,
    /// Time one dial (resolve, QUIC handshake, hello) may take.
    pub dial_timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    #[serde(default)]
    allow_ports: Vec<u16>,
    #[serde(default)]
    deny_ports: Vec<u16>,
    #[serde(default)]
    http2_ports: Vec<u16>,
    max_streams: Option<i64>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

/// The agent's checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The edges' QUIC listeners, as given (comma-separated), for logs and the status.
    pub edge: String,
    /// Each edge's QUIC listener, `host:port`; resolved again on every dial.
    pub edges: Vec<String>,
    /// How many connections the agent holds, to distinct edges ([`crate::reconnect`]).
    pub ha_connections: usize,
    /// The TLS name the edge's certificate must carry.
    pub server_name: String,
    /// Roots to trust instead of the system's.
    pub ca: Option<PathBuf>,
    /// The agent token, as loaded.
    pub token: AgentToken,
    /// The file the token came from, read again on every dial so a rotated token is picked
    /// up without a restart.
    pub token_file: Option<PathBuf>,
    /// Where the agent keeps what must survive a restart: the instance of its last accepted
    /// connection ([`crate::identity`]). Created at start; if it cannot be, the agent runs
    /// without it (and says so).
    pub state_dir: PathBuf,
    /// Which ports may be forwarded.
    pub policy: PortPolicy,
    /// Where `/metrics` is served, if anywhere; its port is never forwarded.
    pub metrics_listen: Option<SocketAddr>,
    /// Heartbeats, timeouts, resume detection.
    pub liveness: Liveness,
    /// Reconnect policy.
    pub reconnect: Reconnect,
    /// How long running streams may take to finish at shutdown or after a go-away.
    pub drain_grace: Duration,
    /// Log level and format.
    pub log: burrow_runtime::logging::LogSettings,
    /// How long a local service may take to accept a connection.
    pub connect_timeout: Duration,
    /// How many data streams may be open at once.
    pub max_streams: usize,
}

impl Config {
    /// The token to present now: `token_file` read afresh (an operator who rotated the token
    /// wrote the new one there), or the loaded token if the file is unreadable or empty.
    pub fn current_token(&self) -> AgentToken {
        match &self.token_file {
            None => self.token.clone(),
            Some(path) => match read_token(path) {
                Ok(token) if !token.is_empty() => AgentToken::new(token),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "token_file is empty; using the token read at start");
                    self.token.clone()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read token_file; using the token read at start");
                    self.token.clone()
                }
            },
        }
    }

    /// Loads the configuration from a file (optional), the environment and flags.
    pub fn load(
        file: Option<File<'_>>,
        env: &HashMap<String, String>,
        flags: &[(&'static str, String)],
    ) -> Result<Config, ConfigError> {
        let table = sources::layer(SETTINGS, file, env, flags)?;
        let raw: RawConfig = sources::deserialize(table, file)?;
        let base = file.and_then(|f| f.path.parent()).map(PathBuf::from);
        let relative = |p: PathBuf| match &base {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        };

        let (edges, server_name) = edge(raw.edge, raw.server_name)?;
        let ha_default = if edges.len() > 1 { 2 } else { 1 };
        let ha_connections = sources::int("ha_connections", raw.ha_connections, ha_default, 1..=8)?;
        let (token, token_file) = token(env, raw.token_file.map(relative))?;
        let state_dir = relative(state_dir(raw.state_dir, env)?);
        let metrics_listen = metrics_listen(raw.metrics.listen)?;
        let policy = policy(&raw.forward, metrics_listen)?;
        let liveness = liveness(raw.liveness)?;
        let log = burrow_runtime::logging::LogSettings::parse(raw.log.level, raw.log.format, env)?;
        Ok(Config {
            edge: edges.join(","),
            edges,
            ha_connections,
            server_name,
            ca: raw.ca.map(relative),
            token,
            token_file,
            state_dir,
            policy,
            metrics_listen,
            liveness,
            reconnect: reconnect(raw.reconnect)?,
            drain_grace: duration("drain_grace", raw.drain_grace, Duration::from_secs(10))?,
            log,
            connect_timeout: duration(
                "forward.connect_timeout",
                raw.forward.connect_timeout,
                Duration::from_secs(5),
            )?,
            max_streams: sources::int(
                "forward.max_streams",
                raw.forward.max_streams,
                1024,
                1..=1_000_000,
            )?,
        })
    }
}

/// The agent token: from [`TOKEN_ENV`] itself, or read from `token_file` (already resolved
/// against the config file's directory), which is then kept to be read again on every dial.
fn token(
    env: &HashMap<String, String>,
    token_file: Option<PathBuf>,
) -> Result<(AgentToken, Option<PathBuf>), ConfigError> {
    let (token, token_file) = match (env.get(TOKEN_ENV), token_file) {
        (Some(token), _) => (token.trim().to_owned(), None),
        (None, Some(path)) => {
            let token = read_token(&path).map_err(|e| ConfigError::Invalid {
                key: "token_file",
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            (token, Some(path))
        }
        (None, None) => {
            return Err(ConfigError::Missing {
                key: "token_file",
                hint: format!("set `token_file`, BURROW_TOKEN_FILE, --token-file, or {TOKEN_ENV}"),
            });
        }
    };
    if token.is_empty() {
        return Err(ConfigError::Invalid {
            key: "token_file",
            message: "the agent token is empty".into(),
        });
    }
    Ok((AgentToken::new(token), token_file))
}

/// `state_dir`: as set, else systemd's `$STATE_DIRECTORY` (its first directory), else
/// [`DEFAULT_STATE_DIR`].
fn state_dir(
    state_dir: Option<PathBuf>,
    env: &HashMap<String, String>,
) -> Result<PathBuf, ConfigError> {
    let systemd = env
        .get(STATE_DIRECTORY_ENV)
        .and_then(|dirs| dirs.split(':').next())
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from);
    let dir = state_dir
        .or(systemd)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if dir.as_os_str().is_empty() {
        return Err(ConfigError::Invalid {
            key: "state_dir",
            message: "must name a directory".into(),
        });
    }
    Ok(dir)
}

/// `metrics.listen`, an address and port, if set.
fn metrics_listen(listen: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    listen
        .map(|s| {
            s.parse().map_err(|_| ConfigError::Invalid {
                key: "metrics.listen",
                message: format!("`{s}` is not an address:port"),
            })
        })
        .transpose()
}

/// Which ports may be forwarded: `forward.allow_ports` less `forward.deny_ports`, and never
/// the metrics listener's port; and which speak HTTP/2 only (`forward.http2_ports`).
fn policy(
    forward: &RawForward,
    metrics_listen: Option<SocketAddr>,
) -> Result<PortPolicy, ConfigError> {
    let ports = |key: &'static str, list: &[u16]| -> Result<Vec<Port>, ConfigError> {
        list.iter()
            .map(|&p| {
                Port::new(p).ok_or_else(|| ConfigError::Invalid {
                    key,
                    message: "0 is not a port (1-65535)".into(),
                })
            })
            .collect()
    };
    let mut deny = ports("forward.deny_ports", &forward.deny_ports)?;
    if let Some(port) = metrics_listen.and_then(|a| Port::new(a.port())) {
        deny.push(port);
    }
    let allow = ports("forward.allow_ports", &forward.allow_ports)?;
    let http2 = ports("forward.http2_ports", &forward.http2_ports)?;
    Ok(PortPolicy::new(allow, deny).with_http2(http2))
}

/// The reconnect settings.
fn reconnect(raw: RawReconnect) -> Result<Reconnect, ConfigError> {
    Ok(Reconnect {
        backoff: crate::backoff::Policy {
            initial: duration(
                "reconnect.backoff_initial",
                raw.backoff_initial,
                Duration::from_millis(100),
            )?,
            max: duration(
                "reconnect.backoff_max",
                raw.backoff_max,
                Duration::from_secs(2),
            )?,
        },
        healthy_after: duration(
            "reconnect.healthy_after",
            raw.healthy_after,
            Duration::from_secs(30),
        )?,
        dial_timeout: duration(
            "reconnect.dial_timeout",
            raw.dial_timeout,
            Duration::from_secs(3),
        )?,
    })
}

/// The liveness settings, checked against each other.
fn liveness(raw: RawLiveness) -> Result<Liveness, ConfigError> {
    let liveness = Liveness {
        heartbeat_interval: duration(
            "liveness.heartbeat_interval",
            raw.heartbeat_interval,
            Duration::from_secs(5),
        )?,
        heartbeat_timeout: duration(
            "liveness.heartbeat_timeout",
            raw.heartbeat_timeout,
            Duration::from_secs(3),
        )?,
        nudge_interval: duration(
            "liveness.nudge_interval",
            raw.nudge_interval,
            Duration::from_secs(1),
        )?,
        idle_timeout: duration(
            "liveness.idle_timeout",
            raw.idle_timeout,
            Duration::from_secs(20),
        )?,
        resume_tick: duration(
            "liveness.resume_tick",
            raw.resume_tick,
            Duration::from_secs(1),
        )?,
        resume_threshold: Duration::from_secs(2),
    };
    if liveness.idle_timeout <= liveness.heartbeat_interval {
        return Err(ConfigError::Invalid {
            key: "liveness.idle_timeout",
            message: format!(
                "{:?} must be longer than heartbeat_interval ({:?}), or an idle connection \
                 times out between heartbeats",
                liveness.idle_timeout, liveness.heartbeat_interval
            ),
        });
    }
    Ok(liveness)
}

/// A duration key: its value parsed, or the default.
fn duration(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = value.map_or(Ok(default), |v| sources::parse_duration(key, &v))?;
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            message: "must be more than zero".into(),
        });
    }
    Ok(d)
}

/// A token file's content, trimmed.
fn read_token(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path).map(|t| t.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(text: &str, e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = File {
            path: Path::new("/etc/burrow/agent.toml"),
            text,
        };
        Config::load(Some(file), &env(e), &[])
    }

    #[test]
    fn full_config_with_token_from_environment() {
        let cfg = load(
            r#"
            edge = "edge.example.com:443"
            [forward]
            allow_ports = [3000, 8080]
            [metrics]
            listen = "0.0.0.0:9464"
            "#,
            &[(TOKEN_ENV, "secret\n")],
        )
        .unwrap();
        assert_eq!(cfg.server_name, "edge.example.com");
        assert_eq!(cfg.token.expose(), "secret");
        assert!(cfg.policy.allows(Port::new(3000).unwrap()));
        assert!(!cfg.policy.allows(Port::new(3001).unwrap()));
        assert!(!format!("{cfg:?}").contains("secret"));
    }

    #[test]
    fn the_entrypoint_table_is_accepted() {
        let cfg = load(
            "edge = \"e:1\"\n[entrypoint]\nkeep_running = true",
            &[(TOKEN_ENV, "t")],
        );
        assert!(cfg.is_ok(), "{cfg:?}");
    }

    #[test]
    fn a_rotated_token_file_is_read_on_the_next_dial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.token");
        std::fs::write(&path, "first\n").unwrap();
        let text = format!("edge = \"e:1\"\ntoken_file = \"{}\"", path.display());
        let cfg = load(&text, &[]).unwrap();
        assert_eq!(cfg.current_token().expose(), "first");
        std::fs::write(&path, "second\n").unwrap();
        assert_eq!(cfg.current_token().expose(), "second");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            cfg.current_token().expose(),
            "first",
            "unreadable: the token read at start"
        );
    }

    #[test]
    fn state_dir_is_set_or_systemds_or_the_default() {
        let t = (TOKEN_ENV, "t");
        let cfg = load("edge = \"e:1\"", &[t]).unwrap();
        assert_eq!(cfg.state_dir, Path::new(DEFAULT_STATE_DIR));
        let systemd = (STATE_DIRECTORY_ENV, "/var/lib/burrow-agent:/var/lib/other");
        let cfg = load("edge = \"e:1\"", &[t, systemd]).unwrap();
        assert_eq!(cfg.state_dir, Path::new("/var/lib/burrow-agent"));
        let cfg = load("edge = \"e:1\"\nstate_dir = \"state\"", &[t, systemd]).unwrap();
        assert_eq!(
            cfg.state_dir,
            Path::new("/etc/burrow/state"),
            "relative to the file"
        );
        let cfg = load("edge = \"e:1\"", &[t, ("BURROW_STATE_DIR", "/srv/a")]).unwrap();
        assert_eq!(cfg.state_dir, Path::new("/srv/a"));
        let err = load("edge = \"e:1\"\nstate_dir = \"\"", &[t]).unwrap_err();
        assert!(err.to_string().contains("state_dir"), "{err}");
    }

    #[test]
    fn metrics_port_is_always_denied() {
        let cfg = load(
            "edge = \"[::1]:4433\"\n[metrics]\nlisten = \"127.0.0.1:9464\"",
            &[(TOKEN_ENV, "t")],
        )
        .unwrap();
        assert_eq!(cfg.server_name, "::1");
        assert!(!cfg.policy.allows(Port::new(9464).unwrap()));
        assert!(cfg.policy.allows(Port::new(9465).unwrap()));
    }

    #[test]
    fn errors_name_the_key() {
        let err = load("", &[(TOKEN_ENV, "t")]).unwrap_err();
        assert!(err.to_string().contains("`edge`"), "{err}");
        let err = load("edge = \"nohost\"", &[(TOKEN_ENV, "t")]).unwrap_err();
        assert!(err.to_string().contains("`edge`"), "{err}");
        let err = load("edge = \"e:1\"", &[]).unwrap_err();
        assert!(err.to_string().contains("token_file"), "{err}");
        let err = load("edge = \"e:1\"\nedgee = 1", &[(TOKEN_ENV, "t")]).unwrap_err();
        assert!(err.to_string().contains("edgee"), "{err}");
        let err = load(
            "edge = \"e:1\"\n[liveness]\nidle_timeout = \"4s\"",
            &[(TOKEN_ENV, "t")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("liveness.idle_timeout"), "{err}");
        let err = load("edge = \"e:1\"\ntoken_file = \"missing.token\"", &[]).unwrap_err();
        assert!(
            err.to_string().contains("/etc/burrow/missing.token"),
            "{err}"
        );
    }
}
