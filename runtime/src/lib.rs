//! burrow-runtime: the plumbing burrow's binaries share, so that the agent, the edge and the
//! client never link one another. Nothing here knows an agent's status or an edge's routes.
//!
//! # Layout
//!
//! In the order a binary meets them:
//! - [`sources`]: a config file, `BURROW_*` environment and flags layered into one set of values.
//! - [`logging`]: text or JSON log lines, with a level a reload can change.
//! - [`signals`]: the tokio runtime and SIGTERM/SIGINT, set up before the process says it is up.
//! - [`notify`]: systemd's notify protocol: ready, status line, watchdog, stopping.
//! - [`trust`]: the roots a client verifies the edge against (a CA file or the system's).
//! - [`wire`]: burrow frames on QUIC streams (feature `quic`: the agent and the edge).
//! - [`wsbytes`]: a byte stream over a WebSocket (`burrow-tcp.v1`: the edge and the client).

#![forbid(unsafe_code)]

pub mod logging;
pub mod notify;
pub mod signals;
pub mod sources;
pub mod trust;
#[cfg(feature = "quic")]
pub mod wire;
pub mod wsbytes;
