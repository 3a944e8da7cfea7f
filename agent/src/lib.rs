//! burrow-agent: the daemon inside a devbox. It keeps one QUIC connection open to the edge and
//! connects each data stream the edge opens to a local service on loopback.
//!
//! # Layout
//!
//! In data-flow order (config sources, logging, systemd notify, signals and QUIC framing come
//! from `burrow-runtime`, the session's rules and liveness from `burrow-protocol`):
//! - [`config`]: the agent's checked [`Config`].
//! - [`tls`]: TLS 1.3 client settings, the edge's certificate verified, ALPN `burrow/1`.
//! - [`reconnect`]: the state machine that dials, serves, and dials again.
//! - [`identity`]: the instance ids of the hello, a chain kept in `state_dir`, so the edge tells
//!   this agent restarted from a cloned devbox.
//! - [`backoff`]: when to dial again (exponential, full jitter, low cap).
//! - [`resume`] and [`clock`]: noticing that the devbox slept or was frozen.
//! - [`session`]: one connection: hello, welcome, the control stream driving the protocol's
//!   liveness machine, accepting data streams.
//! - [`forward`]: one data stream: port policy, loopback dial, accept/refuse, byte copy.
//! - [`copy`]: a stream's bytes both ways, no buffer held while it is idle.
//! - [`policy`]: the allow/deny port lists.
//! - [`status`]: what the agent reports about itself.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` listener.
//! - [`sidecar`]: `burrow-agent -- CMD`: the devbox's entrypoint run next to the tunnel, its
//!   signals forwarded, orphans reaped, its exit code passed on.
//! - [`cli`]: the `burrow-agent` command line.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod copy;
pub mod edges;
pub mod forward;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod reconnect;
pub mod resume;
pub mod session;
pub mod sidecar;
pub mod status;
pub mod tls;

pub use config::Config;
pub use status::Status;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running agent: its status and its task.
#[derive(Debug)]
pub struct Agent {
    /// The agent's status, updated as sessions come and go.
    pub status: watch::Receiver<Status>,
    /// The agent's task; ends after `shutdown` fires.
    pub task: JoinHandle<Result<(), tls::TlsError>>,
    /// The agent's metrics.
    pub metrics: std::sync::Arc<metrics::Metrics>,
    /// The port policy in force; `replace` it to reload.
    pub policy: policy::PortPolicy,
}

impl Agent {
    /// Starts an agent on the current tokio runtime.
    pub fn spawn(config: Config, shutdown: CancellationToken) -> Agent {
        Self::spawn_with_clocks(config, std::sync::Arc::new(clock::SystemClocks), shutdown)
    }

    /// Starts an agent whose resume detector reads `clocks` (tests make them jump).
    pub fn spawn_with_clocks(
        config: Config,
        clocks: std::sync::Arc<dyn clock::Clocks>,
        shutdown: CancellationToken,
    ) -> Agent {
        let (tx, status) = watch::channel(Status::default());
        let metrics = metrics::Metrics::new();
        let policy = config.policy.clone();
        let task = tokio::spawn(reconnect::run_with_clocks(
            config,
            clocks,
            tx,
            metrics.clone(),
            shutdown,
        ));
        Agent {
            status,
            task,
            metrics,
            policy,
        }
    }
}
