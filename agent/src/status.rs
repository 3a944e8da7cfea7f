//! What the agent reports about itself: its connection state, devbox, tunnel, streams.
//! Published on a `watch` channel so tests, logs and (later) metrics and the systemd status
//! line read one source.

use std::time::Duration;

use burrow_protocol::TunnelState;

/// Where the reconnect state machine stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum State {
    /// Waiting before the next dial.
    #[default]
    Disconnected,
    /// Dialing.
    Connecting,
    /// A session is up.
    Connected,
    /// Another agent with the same token took over; waiting for it to leave.
    Standby,
    /// Shutting down: running streams finish.
    Draining,
}

impl State {
    /// A short word for logs and status lines.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Disconnected => "disconnected",
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Standby => "standby",
            State::Draining => "draining",
        }
    }
}

/// The agent's state as others see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The reconnect state.
    pub state: State,
    /// Whether a session with the edge is up.
    pub connected: bool,
    /// The devbox the edge says this agent serves (after the first welcome).
    pub devbox_id: Option<String>,
    /// The tunnel, if enabled.
    pub tunnel: Option<TunnelState>,
    /// Sessions established since start.
    pub sessions: u64,
    /// Data streams open now.
    pub streams: u64,
    /// Resumes detected since start.
    pub resumes: u64,
    /// The last heartbeat round trip.
    pub rtt: Option<Duration>,
    /// The last error that ended a session or a dial, for the log and the status line.
    pub last_error: Option<String>,
}
