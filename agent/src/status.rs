//! What the agent reports about itself: connected or not, to which devbox, with which tunnel.
//! Published on a `watch` channel so tests, the status line and (later) metrics read one source.

use burrow_protocol::TunnelState;

/// The agent's state as others see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Whether a session with the edge is up.
    pub connected: bool,
    /// The devbox the edge says this agent serves (after the first welcome).
    pub devbox_id: Option<String>,
    /// The tunnel, if enabled.
    pub tunnel: Option<TunnelState>,
    /// Sessions established since start.
    pub sessions: u64,
    /// The last error that ended a session or a dial, for the log and the status line.
    pub last_error: Option<String>,
}
