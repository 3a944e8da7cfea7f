//! burrow-client: `burrow connect`, the client for a person's own machine. It carries raw TCP
//! (a database, SSH) to a devbox port as a WebSocket through the edge, with the tunnel's access
//! mode applied like for any request. It links neither the agent nor the edge, and no QUIC.
//!
//! # Layout
//!
//! - [`connect`]: the command line, the target URL, the edge's TLS, and one WebSocket per local
//!   connection (or stdin/stdout), its bytes carried by `burrow_runtime::wsbytes`.

#![forbid(unsafe_code)]

pub mod connect;
