//! burrow-edge: the public side. Terminates HTTP(S) for `*.{domain}`, routes `{port}-{key}` to
//! the devbox's agent over QUIC, enforces the tunnel's access mode, and serves the admin API.
//!
//! # Layout
//!
//! Start-up first, then the modules in the order a public request goes through them, then the
//! agents' side, the admin API and what they share:
//! - [`config`]: the checked [`Config`] from file, environment and flags.
//! - [`server`]: wiring of listeners, state directory and shutdown ([`Edge`]).
//! - [`certs`]: TLS for agents (generated CA) and for the public HTTPS listener.
//! - [`listener`]: HTTP(S) on one TCP listener: accept, connections per client, TLS, drain.
//! - [`proxy`]: a public request as a pipeline; one function lists the steps below.
//! - [`route`]: step 1, the host `{port}-{key}.{domain}` parsed and looked up, once.
//! - [`registry`]: devboxes, tunnels and live sessions in memory, written through to the store.
//! - [`cluster`]: several edges on one PostgreSQL store: the secrets they share, presence.
//! - [`mesh`]: forwarding a request to the edge that holds the devbox's agent, in one hop.
//! - [`store`]: the durable store: SQLite in `state_dir`, or PostgreSQL for a cluster.
//! - [`auth`]: step 2, access: the tunnel's bearer token, or a browser's signed cookie.
//! - [`throttle`]: step 3, the tunnel's request rate and the devbox's requests in flight.
//! - [`activity`]: when traffic last crossed a devbox's tunnel (`http_keep_alive`).
//! - [`limits`]: the bounds and the counters behind them (rates, slots, per-client keys).
//! - [`forward`]: step 4, one of three: an HTTP exchange with the service,
//! - [`upgrade`]: or a WebSocket passed through to the service,
//! - [`raw`]: or raw TCP for `burrow connect`.
//! - [`outbound`]: the request as the service gets it (headers, target, HTTP version).
//! - [`pool`]: kept-alive HTTP/1.1 connections to services, for the next request.
//! - [`http2`]: shared HTTP/2 connections to services (gRPC, HTTP/2-only ports).
//! - [`idle`]: copying an upgraded connection both ways, closed when nothing moves.
//! - [`tasks`]: client connections and upgraded connections, tracked and cut off at stop.
//! - [`dial`]: a data stream to the devbox's agent, waiting a while for an agent that is away.
//! - [`agents`]: the QUIC listener: hello, token check, welcome, control stream.
//! - [`handshakes`]: bounds on agent connections before their hello is accepted.
//! - [`headers`]: header helpers the steps share: lists, hop-by-hop and forwarding headers.
//! - [`pages`]: the edge's own answers (HTML for browsers, text for others).
//! - [`body`]: the body type of every response the edge sends.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` listener.
//! - [`admin`]: the admin API.
//! - [`openapi`]: the admin API's OpenAPI 3.1 document, served at `GET /v1/openapi.json`.
//! - [`platform`]: events for the platform: webhooks and the admin API's events stream.
//! - [`secret`]: tokens and keys: generation, hashing, constant-time comparison.
//! - [`cli`]: `burrow-edge serve` (the binary, with `dev`, is built by burrow-quickstart).

#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod agents;
pub mod auth;
pub mod body;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dial;
pub mod forward;
pub mod h1;
pub mod handshakes;
pub mod headers;
pub mod http2;
pub mod idle;
pub mod limits;
pub mod listener;
pub mod mesh;
pub mod metrics;
pub mod openapi;
pub mod outbound;
pub mod pages;
pub mod platform;
pub mod pool;
pub mod proxy;
pub mod raw;
pub mod registry;
pub mod route;
pub mod secret;
pub mod server;
pub mod store;
pub mod tasks;
pub mod throttle;
pub mod upgrade;

pub use config::Config;
pub use server::Edge;
