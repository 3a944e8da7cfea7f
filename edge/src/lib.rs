//! burrow-edge: the public side. Terminates HTTP(S) for `*.{domain}`, routes `{port}-{key}` to
//! the devbox's agent over QUIC, enforces the tunnel's access mode, and serves the admin API.
//!
//! # Layout
//!
//! In data-flow order:
//! - [`config`]: the checked [`Config`] from file, environment and flags.
//! - [`server`]: wiring of listeners, state directory and shutdown ([`Edge`]).
//! - [`certs`]: TLS for agents (generated CA) and for the public HTTPS listener.
//! - [`agents`]: the QUIC listener: hello, token check, welcome, control stream.
//! - [`route`]: parsing `{port}-{key}.{domain}`.
//! - [`proxy`]: a public request: access check, data stream, HTTP/1.1 to the service, upgrades.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` listener.
//! - [`pages`]: the edge's own answers (HTML for browsers, text for others).
//! - [`admin`]: the admin API.
//! - [`registry`]: devboxes, tunnels and live sessions in memory, written through to the store.
//! - [`store`]: SQLite in `state_dir`.
//! - [`secret`]: tokens and keys: generation, hashing, constant-time comparison.
//! - [`cli`]: `burrow-edge serve` (the binary, with `dev`, is built by burrow-quickstart).

#![forbid(unsafe_code)]

pub mod admin;
pub mod agents;
pub mod auth;
pub mod certs;
pub mod cli;
pub mod config;
pub mod idle;
pub mod limits;
pub mod metrics;
pub mod pages;
pub mod pool;
pub mod proxy;
pub mod raw;
pub mod registry;
pub mod route;
pub mod secret;
pub mod server;
pub mod store;

pub use config::Config;
pub use server::Edge;
