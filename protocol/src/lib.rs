//! burrow's wire format between the agent (inside a devbox) and the edge (the public side).
//!
//! The agent keeps one QUIC connection (ALPN [`ALPN`]) to the edge. On it:
//!
//! - the agent opens one bi-directional **control stream** and sends [`Hello`] first; the edge
//!   answers [`Welcome`] or [`Reject`], and from then on both sides exchange [`ControlMsg`]s
//!   (heartbeats, tunnel updates, go-away notices);
//! - for each public request the edge opens a bi-directional **data stream** and sends a
//!   [`StreamHeader`]; the agent answers a [`StreamAnswer`]; after an accept, raw bytes flow both
//!   ways.
//!
//! Every message is one frame: `type: u8 | body_len: u16 big-endian | body`, with the body at most
//! [`frame::MAX_BODY`] bytes. This crate is sans-IO: it turns messages into bytes and bytes into
//! messages, and knows nothing about sockets, tasks or clocks: its state machines are handed the
//! time.
//!
//! # Layout
//!
//! In data-flow order, from bytes on the wire to typed messages:
//!
//! - [`frame`]: the frame header, its size bounds, and the body reader/writer every message uses.
//! - `tunnel`: values the control stream carries: [`TunnelState`], [`AuthMode`], [`AgentToken`]
//!   (re-exported from [`control`]).
//! - [`control`]: messages of the control stream ([`ControlMsg`]).
//! - [`machine`]: the control stream's rules for each side ([`machine::AgentControl`],
//!   [`machine::EdgeControl`]): which message may come when, and what it asks for.
//! - [`liveness`]: the heartbeat on the control stream ([`liveness::Liveness`]): when to ping,
//!   the round trip, what a missed pong means (rebind, then dead), go-away both ways.
//! - `port`: [`Port`], a non-zero TCP port (re-exported from [`stream`]).
//! - [`stream`]: the header and answer that open each data stream ([`StreamHeader`],
//!   [`StreamAnswer`]).
//! - [`codes`]: the QUIC application codes that close a connection ([`close`]) or cut a data
//!   stream ([`reset`]), re-exported at the root.
//! - `error`: [`DecodeError`], which tells "need more bytes" apart from "invalid".
//!
//! # Decoding
//!
//! Every `decode(&mut Bytes)` follows one contract: with fewer bytes than a whole frame it returns
//! [`DecodeError::Incomplete`] (but a declared body over [`frame::MAX_BODY`] is
//! [`DecodeError::TooLarge`] as soon as the header is there); on success it consumes exactly one
//! frame and leaves the rest; on any error it leaves the buffer untouched. No input panics.

#![forbid(unsafe_code)]

pub mod codes;
pub mod control;
mod error;
pub mod frame;
pub mod liveness;
pub mod machine;
mod port;
pub mod stream;
mod tunnel;

pub use codes::{close, reset};
pub use control::{
    AgentToken, AuthMode, ControlMsg, GoAway, GoAwayReason, Hello, Reject, RejectReason,
    TunnelState, Welcome,
};
pub use error::DecodeError;
pub use stream::{Port, RefuseReason, StreamAnswer, StreamHeader, StreamKind};

/// The QUIC application protocol (ALPN) both sides offer.
pub const ALPN: &[u8] = b"burrow/1";

/// Protocol version this build speaks.
pub const VERSION: u16 = 1;
