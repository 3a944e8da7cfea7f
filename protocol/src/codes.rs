//! The numbers QUIC carries for burrow outside its frames: application error codes when a side
//! closes the whole connection ([`close`]) or cuts one data stream ([`reset`]). They are on the
//! wire, so their values never change; a peer that reads a code it does not know treats it as a
//! plain error. The crate has no QUIC dependency: callers convert (`quinn::VarInt::from_u32`).

/// Application codes for closing the connection (QUIC `CONNECTION_CLOSE`). Each side sends only
/// some of them; the doc line says which.
pub mod close {
    /// Either side: a clean shutdown, or a connection that finished draining after a go-away.
    pub const SHUTDOWN: u32 = 0;
    /// The edge: it refused the agent's hello (bad token, unsupported version, another instance
    /// connected) and sent a reject first.
    pub const REJECTED: u32 = 1;
    /// Either side: the peer broke the protocol (a frame that does not decode, a message out of
    /// order); the close reason names what arrived.
    pub const PROTOCOL: u32 = 2;
    /// The edge: a newer connection of the same agent took over from this one.
    pub const REPLACED: u32 = 3;
    /// The edge: the devbox was deleted and its agent token revoked; do not dial again with it.
    pub const REVOKED: u32 = 4;
    /// The agent: heartbeats or a resume probe went unanswered, so it gave up on this path and
    /// dials anew.
    pub const DEAD: u32 = 5;
}

/// Application codes for cutting one data stream (QUIC `RESET_STREAM` for the sending half,
/// `STOP_SENDING` for the receiving half) before its end. A stream that ends well is finished,
/// never reset.
pub mod reset {
    /// The edge: a raw TCP stream broke on the public side (the client's connection failed, or
    /// nothing moved for the idle limit); the agent cuts its connection to the service too, so
    /// the service sees a break rather than the end of the stream.
    pub const EDGE_ABORT: u32 = 0;
    /// The agent: the connection to the local service broke mid-stream, or a reloaded port
    /// policy now denies the port.
    pub const AGENT_ABORT: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_keep_their_wire_values() {
        let close = [
            close::SHUTDOWN,
            close::REJECTED,
            close::PROTOCOL,
            close::REPLACED,
            close::REVOKED,
            close::DEAD,
        ];
        assert_eq!(close, [0, 1, 2, 3, 4, 5]);
        assert_eq!([reset::EDGE_ABORT, reset::AGENT_ABORT], [0, 1]);
    }
}
