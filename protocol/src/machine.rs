//! The control stream's rules without I/O: which message may arrive when, and what each one asks
//! of the side that receives it.
//!
//! Each side keeps one machine per control stream and feeds it every message it decodes
//! ([`AgentControl::on_message`], [`EdgeControl::on_message`]), the end of the stream
//! (`on_end_of_stream`) and what it writes itself (`sent`). The machine answers with what to do
//! ([`AgentAction`], [`EdgeAction`]) or a [`Violation`], after which the caller closes the
//! connection with a protocol error. When to ping, which pong answers which ping and what
//! silence means belong to the liveness machine ([`crate::liveness`]), which takes the pongs
//! this one passes on; sockets and policy (which token is good) stay with the caller.
//!
//! Both sides go through the same [`Phase`]s:
//!
//! - [`Phase::Handshake`]: the agent has sent [`Hello`] and waits for [`Welcome`] or [`Reject`];
//!   the edge waits for the `Hello`. Nothing else is valid.
//! - [`Phase::Established`]: heartbeats both ways (a `Ping` is answered by a `Pong` with the same
//!   `seq`), tunnel updates from the edge, a go-away from either side.
//! - [`Phase::Draining`]: a side said go-away. Messages already in flight are still valid
//!   (heartbeats continue while streams drain), but the peer may say go-away only once.
//! - [`Phase::Closed`]: a reject, the end of the stream, or a violation. Every further message is
//!   a violation; the machine never panics.

use crate::{ControlMsg, GoAway, Hello, Reject, TunnelState, Welcome};

/// Where a control stream stands; the same for both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The agent waits for the edge's welcome or reject; the edge waits for the agent's hello.
    Handshake,
    /// Hello and welcome are done; heartbeats, tunnel updates and go-aways flow.
    Established,
    /// One side said go-away: running streams drain, heartbeats continue.
    Draining,
    /// Nothing more is valid: rejected, ended, or the peer broke the protocol.
    Closed,
}

/// The peer broke the control protocol: what arrived and where the machine was. The caller closes
/// the connection with a protocol error, with this message as the reason.
///
/// Displays as `unexpected {got} {context}`, e.g. "unexpected Welcome after the handshake".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected {got} {context}")]
#[non_exhaustive]
pub struct Violation {
    /// What arrived: a message name (`"Welcome"`, `"Ping"`, ...) or `"end of stream"`.
    pub got: &'static str,
    /// Where the machine was, as a phrase: `"after the handshake"`, `"before the hello"`, ...
    pub context: &'static str,
}

/// What the agent does with a message from the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// Nothing to do (callers map the clean end of the stream to it).
    Nothing,
    /// Write this message back on the control stream (a `Pong` for a `Ping`).
    Reply(ControlMsg),
    /// The edge accepted the hello: the session is established.
    Welcomed(Welcome),
    /// The edge refused the hello; the edge closes the connection next.
    Rejected(Reject),
    /// A pong arrived: hand it to the liveness machine ([`crate::liveness::Liveness`]), which
    /// knows which ping is outstanding.
    Pong {
        /// The sequence number it answers.
        seq: u64,
    },
    /// The tunnel was enabled or changed (`Some`) or disabled (`None`).
    TunnelChanged(Option<TunnelState>),
    /// The edge is going away: open no new streams, let running ones drain, dial again.
    PeerGoingAway(GoAway),
    /// The other edges of the cluster, where this agent may connect too.
    Edges(Vec<String>),
}

/// What the edge does with a message from an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeAction {
    /// Nothing to do (callers map the clean end of the stream to it).
    Nothing,
    /// Write this message back on the control stream (a `Pong` for a `Ping`).
    Reply(ControlMsg),
    /// The agent introduced itself: check it, then write a [`Welcome`] or a [`Reject`].
    Hello(Hello),
    /// A pong arrived: hand it to the liveness machine, if this side pings.
    Pong {
        /// The sequence number it answers.
        seq: u64,
    },
    /// The agent is leaving: send it no new streams; running ones finish.
    PeerGoingAway(GoAway),
}

/// The agent's view of the control stream, from its hello on.
#[derive(Debug, Clone)]
pub struct AgentControl {
    core: Core,
    /// The hello's version range: a welcome must choose within it.
    versions: (u16, u16),
}

impl AgentControl {
    /// A machine for a control stream on which the agent sends `hello` first.
    pub fn new(hello: &Hello) -> Self {
        Self {
            core: Core::new(),
            versions: (hello.min_version, hello.max_version),
        }
    }

    /// Where the stream stands.
    pub fn phase(&self) -> Phase {
        self.core.phase
    }

    /// Takes one message from the edge.
    pub fn on_message(&mut self, msg: ControlMsg) -> Result<AgentAction, Violation> {
        let got = name(&msg);
        match self.core.phase {
            Phase::Closed => Err(self.core.after_close(got)),
            Phase::Handshake => match msg {
                ControlMsg::Welcome(welcome) => {
                    let (min, max) = self.versions;
                    if !(min..=max).contains(&welcome.version) {
                        return Err(self
                            .core
                            .fail(got, "with a version the hello did not offer"));
                    }
                    self.core.establish();
                    Ok(AgentAction::Welcomed(welcome))
                }
                ControlMsg::Reject(reject) => {
                    self.core.close("after the reject");
                    Ok(AgentAction::Rejected(reject))
                }
                _ => Err(self.core.fail(got, "before the welcome")),
            },
            Phase::Established | Phase::Draining => match msg {
                ControlMsg::Ping { seq } => Ok(AgentAction::Reply(ControlMsg::Pong { seq })),
                ControlMsg::Pong { seq } => Ok(AgentAction::Pong { seq }),
                ControlMsg::TunnelUpdate(tunnel) => Ok(AgentAction::TunnelChanged(tunnel)),
                ControlMsg::Edges(edges) => Ok(AgentAction::Edges(edges)),
                ControlMsg::GoAway(go_away) => {
                    self.core.peer_goes_away(got, "after the edge's go-away")?;
                    Ok(AgentAction::PeerGoingAway(go_away))
                }
                ControlMsg::Hello(_) => Err(self.core.fail(got, "from the edge")),
                ControlMsg::Welcome(_) | ControlMsg::Reject(_) => {
                    Err(self.core.fail(got, "after the handshake"))
                }
            },
        }
    }

    /// The edge finished the control stream. Valid once a go-away was said or the stream is
    /// closed anyway; before the welcome or without a go-away it is a violation. The machine is
    /// [`Phase::Closed`] afterwards either way.
    pub fn on_end_of_stream(&mut self) -> Result<(), Violation> {
        let context = match self.core.phase {
            Phase::Handshake => Some("before the welcome"),
            Phase::Established => Some("without a go-away"),
            Phase::Draining | Phase::Closed => None,
        };
        self.core.end_of_stream(context)
    }

    /// Records a message this side wrote: a `GoAway` starts draining (at once, or when the
    /// welcome arrives). Other messages change nothing.
    pub fn sent(&mut self, msg: &ControlMsg) {
        self.core.sent(msg);
    }
}

/// The edge's view of one agent's control stream, before its hello on.
#[derive(Debug, Clone, Default)]
pub struct EdgeControl {
    core: Core,
}

impl EdgeControl {
    /// A machine for a control stream the agent just opened.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the stream stands.
    pub fn phase(&self) -> Phase {
        self.core.phase
    }

    /// Takes one message from the agent. A hello establishes the stream at once: the agent sends
    /// nothing else before the answer, and an edge that rejects closes the connection.
    pub fn on_message(&mut self, msg: ControlMsg) -> Result<EdgeAction, Violation> {
        let got = name(&msg);
        match self.core.phase {
            Phase::Closed => Err(self.core.after_close(got)),
            Phase::Handshake => match msg {
                ControlMsg::Hello(hello) => {
                    self.core.establish();
                    Ok(EdgeAction::Hello(hello))
                }
                _ => Err(self.core.fail(got, "before the hello")),
            },
            Phase::Established | Phase::Draining => match msg {
                ControlMsg::Ping { seq } => Ok(EdgeAction::Reply(ControlMsg::Pong { seq })),
                ControlMsg::Pong { seq } => Ok(EdgeAction::Pong { seq }),
                ControlMsg::GoAway(go_away) => {
                    self.core.peer_goes_away(got, "after the agent's go-away")?;
                    Ok(EdgeAction::PeerGoingAway(go_away))
                }
                ControlMsg::Hello(_) => Err(self.core.fail(got, "after the handshake")),
                ControlMsg::Welcome(_)
                | ControlMsg::Reject(_)
                | ControlMsg::TunnelUpdate(_)
                | ControlMsg::Edges(_) => Err(self.core.fail(got, "from an agent")),
            },
        }
    }

    /// The agent finished the control stream. Before the hello it is a violation; afterwards it
    /// is how an agent leaves (detach it). The machine is [`Phase::Closed`] afterwards either way.
    pub fn on_end_of_stream(&mut self) -> Result<(), Violation> {
        let context = match self.core.phase {
            Phase::Handshake => Some("before the hello"),
            Phase::Established | Phase::Draining | Phase::Closed => None,
        };
        self.core.end_of_stream(context)
    }

    /// Records a message this side wrote: a `GoAway` starts draining; a `Reject` closes the stream. Other messages change nothing (the edge's
    /// `Welcome` needs no record: the hello already established the stream).
    pub fn sent(&mut self, msg: &ControlMsg) {
        if let ControlMsg::Reject(_) = msg {
            self.core.close("after the reject");
        }
        self.core.sent(msg);
    }
}

/// What both sides track: the phase, who said go-away, and the heartbeat.
#[derive(Debug, Clone)]
struct Core {
    phase: Phase,
    /// The peer said go-away; a second one is a violation.
    peer_went_away: bool,
    /// This side said go-away (possibly before the handshake completed).
    went_away: bool,
    /// Why the stream closed, as the context of later violations.
    closed_because: &'static str,
}

impl Default for Core {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    fn new() -> Self {
        Self {
            phase: Phase::Handshake,
            peer_went_away: false,
            went_away: false,
            closed_because: "after the stream closed",
        }
    }

    /// The handshake completed: established, or draining if this side already said go-away.
    fn establish(&mut self) {
        self.phase = if self.went_away {
            Phase::Draining
        } else {
            Phase::Established
        };
    }

    fn close(&mut self, because: &'static str) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.closed_because = because;
        }
    }

    /// Closes the stream for a violation and returns it.
    fn fail(&mut self, got: &'static str, context: &'static str) -> Violation {
        self.close("after a protocol violation");
        Violation { got, context }
    }

    fn after_close(&self, got: &'static str) -> Violation {
        Violation {
            got,
            context: self.closed_because,
        }
    }

    fn peer_goes_away(&mut self, got: &'static str, twice: &'static str) -> Result<(), Violation> {
        if self.peer_went_away {
            return Err(self.fail(got, twice));
        }
        self.peer_went_away = true;
        self.phase = Phase::Draining;
        Ok(())
    }

    /// Closes on end of stream; `Some(context)` makes it a violation.
    fn end_of_stream(&mut self, violation: Option<&'static str>) -> Result<(), Violation> {
        match violation {
            Some(context) => Err(self.fail("end of stream", context)),
            None => {
                self.close("after the end of the stream");
                Ok(())
            }
        }
    }

    fn sent(&mut self, msg: &ControlMsg) {
        if let ControlMsg::GoAway(_) = msg {
            self.went_away = true;
            if self.phase == Phase::Established {
                self.phase = Phase::Draining;
            }
        }
    }
}

/// The message's type name, as violations show it.
fn name(msg: &ControlMsg) -> &'static str {
    match msg {
        ControlMsg::Hello(_) => "Hello",
        ControlMsg::Welcome(_) => "Welcome",
        ControlMsg::Reject(_) => "Reject",
        ControlMsg::Ping { .. } => "Ping",
        ControlMsg::Pong { .. } => "Pong",
        ControlMsg::TunnelUpdate(_) => "TunnelUpdate",
        ControlMsg::GoAway(_) => "GoAway",
        ControlMsg::Edges(_) => "Edges",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentToken, AuthMode, GoAwayReason, RejectReason, VERSION};

    fn hello() -> ControlMsg {
        Hello::new(AgentToken::new("t"), "a/1").into()
    }

    fn welcome(version: u16) -> ControlMsg {
        let tunnel = None;
        let devbox_id = "dbx".into();
        Welcome {
            version,
            devbox_id,
            tunnel,
        }
        .into()
    }

    fn reject() -> ControlMsg {
        let (reason, message) = (RejectReason::BadToken, "no".into());
        Reject { reason, message }.into()
    }

    fn go_away() -> ControlMsg {
        let (reason, message) = (GoAwayReason::Shutdown, "bye".into());
        GoAway { reason, message }.into()
    }

    fn update() -> ControlMsg {
        ControlMsg::TunnelUpdate(Some(TunnelState {
            key: "k3v9x2q7ma".into(),
            auth_mode: AuthMode::Open,
            url_template: "https://{port}-k3v9x2q7ma.example.com".into(),
        }))
    }

    fn ping(seq: u64) -> ControlMsg {
        ControlMsg::Ping { seq }
    }

    fn pong(seq: u64) -> ControlMsg {
        ControlMsg::Pong { seq }
    }

    fn agent() -> AgentControl {
        let mut m = AgentControl::new(&Hello::new(AgentToken::new("t"), "a/1"));
        assert!(matches!(
            m.on_message(welcome(VERSION)),
            Ok(AgentAction::Welcomed(_))
        ));
        assert_eq!(m.phase(), Phase::Established);
        m
    }

    fn edge() -> EdgeControl {
        let mut m = EdgeControl::new();
        assert!(matches!(m.on_message(hello()), Ok(EdgeAction::Hello(_))));
        assert_eq!(m.phase(), Phase::Established);
        m
    }

    /// The violation's message, as the caller would log it and send it in the close reason.
    fn agent_err(m: &mut AgentControl, msg: ControlMsg) -> String {
        let got = m.on_message(msg).map_err(|v| v.to_string());
        assert_eq!(m.phase(), Phase::Closed, "a violation closes: {got:?}");
        got.expect_err("a violation")
    }

    fn edge_err(m: &mut EdgeControl, msg: ControlMsg) -> String {
        let got = m.on_message(msg).map_err(|v| v.to_string());
        assert_eq!(m.phase(), Phase::Closed, "a violation closes: {got:?}");
        got.expect_err("a violation")
    }

    #[test]
    fn agent_takes_only_welcome_or_reject_first() {
        for msg in [hello(), ping(1), pong(1), update(), go_away()] {
            let mut m = AgentControl::new(&Hello::new(AgentToken::new("t"), "a/1"));
            let name = name(&msg);
            assert_eq!(
                agent_err(&mut m, msg),
                format!("unexpected {name} before the welcome")
            );
        }
        let mut m = AgentControl::new(&Hello::new(AgentToken::new("t"), "a/1"));
        assert!(matches!(
            m.on_message(reject()),
            Ok(AgentAction::Rejected(_))
        ));
        assert_eq!(m.phase(), Phase::Closed);
        assert_eq!(
            agent_err(&mut m, ping(1)),
            "unexpected Ping after the reject"
        );
        assert_eq!(m.on_end_of_stream(), Ok(()));
    }

    #[test]
    fn agent_refuses_a_welcome_outside_its_versions() {
        let mut h = Hello::new(AgentToken::new("t"), "a/1");
        (h.min_version, h.max_version) = (2, 3);
        for bad in [1, 4] {
            assert_eq!(
                agent_err(&mut AgentControl::new(&h), welcome(bad)),
                "unexpected Welcome with a version the hello did not offer"
            );
        }
        assert!(AgentControl::new(&h).on_message(welcome(3)).is_ok());
    }

    #[test]
    fn agent_answers_pings_and_reports_updates() {
        let mut m = agent();
        for seq in [0, 7, u64::MAX] {
            assert_eq!(m.on_message(ping(seq)), Ok(AgentAction::Reply(pong(seq))));
        }
        let ControlMsg::TunnelUpdate(tunnel) = update() else {
            unreachable!("update() is a tunnel update");
        };
        let got = m.on_message(update());
        assert_eq!(got, Ok(AgentAction::TunnelChanged(tunnel)));
        let got = m.on_message(ControlMsg::TunnelUpdate(None));
        assert_eq!(got, Ok(AgentAction::TunnelChanged(None)));
        assert_eq!(m.phase(), Phase::Established);
    }

    #[test]
    fn pongs_go_to_the_liveness_machine_whatever_their_seq() {
        // Which ping a pong answers is the liveness machine's business, not the order's.
        let mut m = agent();
        m.sent(&ping(2));
        assert_eq!(m.on_message(pong(1)), Ok(AgentAction::Pong { seq: 1 }));
        assert_eq!(m.on_message(pong(2)), Ok(AgentAction::Pong { seq: 2 }));
        assert_eq!(m.on_message(pong(2)), Ok(AgentAction::Pong { seq: 2 }));

        let mut e = edge();
        assert_eq!(e.on_message(pong(9)), Ok(EdgeAction::Pong { seq: 9 }));
    }

    #[test]
    fn agent_refuses_handshake_messages_later() {
        let cases = [
            (welcome(VERSION), "unexpected Welcome after the handshake"),
            (reject(), "unexpected Reject after the handshake"),
            (hello(), "unexpected Hello from the edge"),
        ];
        for (msg, want) in cases {
            assert_eq!(agent_err(&mut agent(), msg), want);
        }
    }

    #[test]
    fn edge_go_away_drains_and_comes_once() {
        let mut m = agent();
        assert!(matches!(
            m.on_message(go_away()),
            Ok(AgentAction::PeerGoingAway(_))
        ));
        assert_eq!(m.phase(), Phase::Draining);
        // The edge still answers heartbeats while streams drain.
        m.sent(&ping(1));
        assert_eq!(m.on_message(pong(1)), Ok(AgentAction::Pong { seq: 1 }));
        assert_eq!(
            agent_err(&mut m, go_away()),
            "unexpected GoAway after the edge's go-away"
        );
    }

    #[test]
    fn own_go_away_still_takes_messages_in_flight() {
        let mut m = agent();
        m.sent(&go_away());
        assert_eq!(m.phase(), Phase::Draining);
        assert_eq!(m.on_message(ping(3)), Ok(AgentAction::Reply(pong(3))));
        assert!(m.on_message(update()).is_ok());
        assert!(m.on_message(go_away()).is_ok());
        assert_eq!(m.on_end_of_stream(), Ok(()));
        assert_eq!(m.phase(), Phase::Closed);

        let mut e = edge();
        e.sent(&go_away());
        assert_eq!(e.on_message(ping(5)), Ok(EdgeAction::Reply(pong(5))));
        assert!(matches!(
            e.on_message(go_away()),
            Ok(EdgeAction::PeerGoingAway(_))
        ));

        // Said before the welcome arrived: the session drains from the welcome on.
        let mut m = AgentControl::new(&Hello::new(AgentToken::new("t"), "a/1"));
        m.sent(&go_away());
        assert_eq!(m.phase(), Phase::Handshake);
        assert!(m.on_message(welcome(VERSION)).is_ok());
        assert_eq!(m.phase(), Phase::Draining);
    }

    #[test]
    fn agent_end_of_stream_needs_a_go_away() {
        let mut m = AgentControl::new(&Hello::new(AgentToken::new("t"), "a/1"));
        let err = m.on_end_of_stream().map_err(|v| v.to_string());
        assert_eq!(
            err,
            Err("unexpected end of stream before the welcome".into())
        );
        let err = agent().on_end_of_stream().map_err(|v| v.to_string());
        assert_eq!(
            err,
            Err("unexpected end of stream without a go-away".into())
        );

        let mut m = agent();
        assert!(m.on_message(go_away()).is_ok());
        assert_eq!(m.on_end_of_stream(), Ok(()));
        assert_eq!(
            agent_err(&mut m, ping(1)),
            "unexpected Ping after the end of the stream"
        );
    }

    #[test]
    fn after_a_violation_everything_is_a_violation() {
        let mut m = agent();
        agent_err(&mut m, hello());
        for msg in [ping(1), pong(1), welcome(VERSION), go_away()] {
            let want = format!("unexpected {} after a protocol violation", name(&msg));
            assert_eq!(agent_err(&mut m, msg), want);
        }
        let mut e = edge();
        edge_err(&mut e, hello());
        assert_eq!(
            edge_err(&mut e, ping(1)),
            "unexpected Ping after a protocol violation"
        );
    }

    #[test]
    fn edge_takes_only_a_hello_first_and_once() {
        for msg in [
            welcome(VERSION),
            reject(),
            ping(1),
            pong(1),
            update(),
            go_away(),
        ] {
            let want = format!("unexpected {} before the hello", name(&msg));
            assert_eq!(edge_err(&mut EdgeControl::new(), msg), want);
        }
        let err = EdgeControl::new()
            .on_end_of_stream()
            .map_err(|v| v.to_string());
        assert_eq!(err, Err("unexpected end of stream before the hello".into()));
        assert_eq!(
            edge_err(&mut edge(), hello()),
            "unexpected Hello after the handshake"
        );
    }

    #[test]
    fn edge_answers_pings_and_refuses_edge_messages() {
        let mut e = edge();
        assert_eq!(e.on_message(ping(42)), Ok(EdgeAction::Reply(pong(42))));
        for msg in [welcome(VERSION), reject(), update()] {
            let want = format!("unexpected {} from an agent", name(&msg));
            assert_eq!(edge_err(&mut edge(), msg), want);
        }
    }

    #[test]
    fn agent_leaves_by_go_away_or_end_of_stream() {
        let mut e = edge();
        assert!(matches!(
            e.on_message(go_away()),
            Ok(EdgeAction::PeerGoingAway(_))
        ));
        assert_eq!(e.phase(), Phase::Draining);
        assert_eq!(
            edge_err(&mut e, go_away()),
            "unexpected GoAway after the agent's go-away"
        );

        let mut e = edge();
        assert_eq!(e.on_end_of_stream(), Ok(()));
        assert_eq!(e.phase(), Phase::Closed);
        assert_eq!(
            edge_err(&mut e, ping(1)),
            "unexpected Ping after the end of the stream"
        );
    }

    #[test]
    fn edge_reject_sent_closes() {
        let mut e = edge();
        e.sent(&reject());
        assert_eq!(e.phase(), Phase::Closed);
        assert_eq!(
            edge_err(&mut e, ping(1)),
            "unexpected Ping after the reject"
        );
    }
}
