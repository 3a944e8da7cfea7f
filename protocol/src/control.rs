//! The control stream: the agent opens it, sends [`Hello`], and the edge answers [`Welcome`] or
//! [`Reject`]. Then both sides exchange heartbeats ([`ControlMsg::Ping`]/[`ControlMsg::Pong`]),
//! the edge pushes [`ControlMsg::TunnelUpdate`]s, and either side may announce a [`GoAway`].
//!
//! Frame types and bodies (see [`crate::frame`] for integers, strings and options):
//!
//! | type | message | body |
//! | --- | --- | --- |
//! | 0x01 | Hello | min_version u16, max_version u16, token str(512), agent str, instance u64, takeover u8 (0/1), previous u64 (optional), wants u64 (optional) |
//! | 0x02 | Welcome | version u16, devbox_id str, tunnel Option\<TunnelState\> |
//! | 0x03 | Reject | reason u8, message str |
//! | 0x04 | Ping | seq u64 |
//! | 0x05 | Pong | seq u64 |
//! | 0x06 | TunnelUpdate | Option\<TunnelState\> |
//! | 0x07 | GoAway | reason u8, message str |
//! | 0x08 | Edges | count u16 (at most 60), then that many str(260) (`host:port`) |
//!
//! A `TunnelState` is key str, auth_mode u8 (1 open, 2 authenticated), url_template str. Reason
//! codes start at 1; a code this build does not know is invalid.
//!
//! The hello's `previous` was added after the first release, as an optional trailing field: it
//! is always written, and a hello that ends after `takeover` (an older agent's) decodes with
//! `previous` 0, so a new edge accepts old agents. An edge older than the field refuses a hello
//! that carries it (trailing bytes): upgrade the edges before the agents. `wants` came later
//! still, the same way (an agent that leaves it out gets no `Edges`), and so did `Edges`,
//! which an edge sends only to an agent whose hello wants it.

use bytes::{Bytes, BytesMut};

use crate::frame::{MAX_STR_LEN, MAX_TOKEN_LEN, decode_frame, write_frame};
use crate::tunnel::{get_tunnel, put_tunnel};
use crate::{DecodeError, VERSION};

pub use crate::tunnel::{AgentToken, AuthMode, TunnelState};

const HELLO: u8 = 0x01;
const WELCOME: u8 = 0x02;
const REJECT: u8 = 0x03;
const PING: u8 = 0x04;
const PONG: u8 = 0x05;
const TUNNEL_UPDATE: u8 = 0x06;
const GO_AWAY: u8 = 0x07;
const EDGES: u8 = 0x08;

/// The agent's first message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The lowest protocol version the agent speaks.
    pub min_version: u16,
    /// The highest protocol version the agent speaks.
    pub max_version: u16,
    /// The agent token the edge issued for this devbox.
    pub token: AgentToken,
    /// Software name and version, e.g. `"burrow-agent/0.1.0"`.
    pub agent: String,
    /// Random for every connection attempt (an agent older than `previous` drew it once per
    /// process). The edge keeps it as the live session's instance.
    pub instance: u64,
    /// `true`: this connection replaces the devbox's live session, if any. `false`: connect
    /// only if no other agent is connected (an agent that was replaced waits its turn instead
    /// of fighting).
    pub takeover: bool,
    /// The `instance` of this agent's last connection the edge accepted (a welcome came back),
    /// 0 if none; the agent keeps it in its `state_dir`, so a restart continues the chain.
    ///
    /// It tells the same agent (restarted or reconnecting) from a second agent that holds the
    /// same token (a cloned devbox): a hello whose `previous` is the live session's instance
    /// continues that session. A snapshot clone starts with its original's `previous`, but
    /// only the first of the two to connect continues the chain; the other's `previous` is
    /// then stale, and it is seen as a clone. Optional on the wire (see the module docs).
    pub previous: u64,
    /// What the agent takes beyond the first release's messages, a bit set: [`WANTS_EDGES`].
    /// Optional on the wire, after `previous` (absent: 0).
    pub wants: u64,
}

/// [`Hello::wants`]: the agent takes [`ControlMsg::Edges`], the other edges of the cluster.
pub const WANTS_EDGES: u64 = 1;

/// The most addresses one [`ControlMsg::Edges`] carries.
pub const MAX_EDGES: usize = 60;

/// The longest address in a [`ControlMsg::Edges`] (a DNS name is at most 253 bytes, then
/// `:port`); longer ones are cut.
pub const MAX_EDGE_ADDR_LEN: usize = 260;

// A full `Edges` fits in one frame.
const _: () = assert!(2 + MAX_EDGES * (2 + MAX_EDGE_ADDR_LEN) <= crate::frame::MAX_BODY);

impl Hello {
    /// A hello that speaks exactly this build's [`VERSION`].
    pub fn new(token: AgentToken, agent: impl Into<String>) -> Self {
        Self {
            min_version: VERSION,
            max_version: VERSION,
            token,
            agent: agent.into(),
            instance: 0,
            takeover: true,
            previous: 0,
            wants: WANTS_EDGES,
        }
    }

    /// Whether the agent speaks `version` (its range is inclusive; an empty range, min above
    /// max, speaks nothing).
    pub fn supports(&self, version: u16) -> bool {
        (self.min_version..=self.max_version).contains(&version)
    }
}

/// The edge's answer to an accepted [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version chosen for this connection, within the hello's range.
    pub version: u16,
    /// The devbox the token belongs to.
    pub devbox_id: String,
    /// The devbox's tunnel, or `None` while no tunnel is enabled.
    pub tunnel: Option<TunnelState>,
}

/// Why the edge refused a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The token is unknown or revoked.
    BadToken,
    /// No version in the hello's range is one the edge speaks.
    UnsupportedVersion,
    /// Another connection for the same devbox took over.
    Replaced,
    /// The edge failed on its side; try again later.
    Internal,
}

/// The edge's answer to a refused [`Hello`]; the edge closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Why, for the agent to decide whether to retry.
    pub reason: RejectReason,
    /// Detail for humans and logs; never contains a secret.
    pub message: String,
}

/// Why a side is about to close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GoAwayReason {
    /// The sender is shutting down; reconnect (the edge) or expect a reconnect (the agent).
    Shutdown,
    /// A newer connection for the same devbox took over this one.
    Replaced,
    /// The devbox or its token was revoked; do not reconnect with this token.
    Revoked,
}

/// Notice of a graceful close: no new streams; open ones drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// Why the connection is closing.
    pub reason: GoAwayReason,
    /// Detail for humans and logs; never contains a secret.
    pub message: String,
}

/// Every message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlMsg {
    /// Agent to edge, first: who I am and which versions I speak.
    Hello(Hello),
    /// Edge to agent: accepted, with the devbox's tunnel state.
    Welcome(Welcome),
    /// Edge to agent: refused, with a reason.
    Reject(Reject),
    /// A heartbeat; the peer answers [`ControlMsg::Pong`] with the same `seq`.
    Ping {
        /// Chosen by the sender to match the answer (and measure the round trip).
        seq: u64,
    },
    /// The answer to [`ControlMsg::Ping`].
    Pong {
        /// The `seq` of the ping answered.
        seq: u64,
    },
    /// Edge to agent: the tunnel was enabled, changed (`Some`) or disabled (`None`).
    TunnelUpdate(Option<TunnelState>),
    /// Either way: the sender is closing the connection gracefully.
    GoAway(GoAway),
    /// Edge to agent, to an agent whose hello wants it ([`WANTS_EDGES`]): where agents reach
    /// the other live edges of the cluster (`host:port` each, at most [`MAX_EDGES`] of at most
    /// [`MAX_EDGE_ADDR_LEN`] bytes: a full list fits one frame); sent after
    /// the welcome and again whenever the set changes.
    Edges(Vec<String>),
}

impl ControlMsg {
    /// A short name for logs: `"hello"`, `"welcome"`, `"reject"`, `"ping"`, `"pong"`,
    /// `"tunnel_update"`, `"go_away"`, `"edges"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Welcome(_) => "welcome",
            Self::Reject(_) => "reject",
            Self::Ping { .. } => "ping",
            Self::Pong { .. } => "pong",
            Self::TunnelUpdate(_) => "tunnel_update",
            Self::GoAway(_) => "go_away",
            Self::Edges(_) => "edges",
        }
    }

    /// Appends exactly one frame to `buf`. Strings longer than their wire bound are cut at a
    /// character boundary (512 bytes for the token, 1024 for every other string).
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Self::Hello(h) => write_frame(buf, HELLO, |w| {
                w.put_u16(h.min_version);
                w.put_u16(h.max_version);
                w.put_str(h.token.expose(), MAX_TOKEN_LEN);
                w.put_str(&h.agent, MAX_STR_LEN);
                w.put_u64(h.instance);
                w.put_u8(u8::from(h.takeover));
                w.put_u64(h.previous);
                w.put_u64(h.wants);
            }),
            Self::Welcome(m) => write_frame(buf, WELCOME, |w| {
                w.put_u16(m.version);
                w.put_str(&m.devbox_id, MAX_STR_LEN);
                w.put_option(m.tunnel.as_ref(), put_tunnel);
            }),
            Self::Reject(m) => write_frame(buf, REJECT, |w| {
                w.put_u8(reject_code(m.reason));
                w.put_str(&m.message, MAX_STR_LEN);
            }),
            Self::Ping { seq } => write_frame(buf, PING, |w| w.put_u64(*seq)),
            Self::Pong { seq } => write_frame(buf, PONG, |w| w.put_u64(*seq)),
            Self::TunnelUpdate(t) => write_frame(buf, TUNNEL_UPDATE, |w| {
                w.put_option(t.as_ref(), put_tunnel);
            }),
            Self::GoAway(m) => write_frame(buf, GO_AWAY, |w| {
                w.put_u8(go_away_code(m.reason));
                w.put_str(&m.message, MAX_STR_LEN);
            }),
            Self::Edges(edges) => write_frame(buf, EDGES, |w| {
                let edges = &edges[..edges.len().min(MAX_EDGES)];
                w.put_u16(u16::try_from(edges.len()).unwrap_or(0));
                for edge in edges {
                    w.put_str(edge, MAX_EDGE_ADDR_LEN);
                }
            }),
        }
    }

    /// Decodes one frame from the front of `buf` (see the crate docs for the contract).
    pub fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        decode_frame(buf, |ty, r| {
            Ok(match ty {
                HELLO => Self::Hello(Hello {
                    min_version: r.get_u16()?,
                    max_version: r.get_u16()?,
                    token: AgentToken::new(r.get_str(MAX_TOKEN_LEN)?),
                    agent: r.get_str(MAX_STR_LEN)?,
                    instance: r.get_u64()?,
                    takeover: match r.get_u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(DecodeError::Invalid("takeover flag not 0 or 1")),
                    },
                    // Absent in an older agent's hello.
                    previous: if r.is_empty() { 0 } else { r.get_u64()? },
                    wants: if r.is_empty() { 0 } else { r.get_u64()? },
                }),
                WELCOME => Self::Welcome(Welcome {
                    version: r.get_u16()?,
                    devbox_id: r.get_str(MAX_STR_LEN)?,
                    tunnel: r.get_option(get_tunnel)?,
                }),
                REJECT => Self::Reject(Reject {
                    reason: reject_reason(r.get_u8()?)?,
                    message: r.get_str(MAX_STR_LEN)?,
                }),
                PING => Self::Ping { seq: r.get_u64()? },
                PONG => Self::Pong { seq: r.get_u64()? },
                TUNNEL_UPDATE => Self::TunnelUpdate(r.get_option(get_tunnel)?),
                GO_AWAY => Self::GoAway(GoAway {
                    reason: go_away_reason(r.get_u8()?)?,
                    message: r.get_str(MAX_STR_LEN)?,
                }),
                EDGES => {
                    let n = usize::from(r.get_u16()?);
                    if n > MAX_EDGES {
                        return Err(DecodeError::Invalid(
                            "more edges than an Edges message takes",
                        ));
                    }
                    let mut edges = Vec::with_capacity(n);
                    for _ in 0..n {
                        edges.push(r.get_str(MAX_EDGE_ADDR_LEN)?);
                    }
                    Self::Edges(edges)
                }
                other => return Err(DecodeError::UnexpectedType(other)),
            })
        })
    }

    /// The message as one frame, in a fresh buffer.
    pub fn encoded(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }
}

impl From<Hello> for ControlMsg {
    fn from(m: Hello) -> Self {
        Self::Hello(m)
    }
}

impl From<Welcome> for ControlMsg {
    fn from(m: Welcome) -> Self {
        Self::Welcome(m)
    }
}

impl From<Reject> for ControlMsg {
    fn from(m: Reject) -> Self {
        Self::Reject(m)
    }
}

impl From<GoAway> for ControlMsg {
    fn from(m: GoAway) -> Self {
        Self::GoAway(m)
    }
}

fn reject_code(reason: RejectReason) -> u8 {
    match reason {
        RejectReason::BadToken => 1,
        RejectReason::UnsupportedVersion => 2,
        RejectReason::Replaced => 3,
        RejectReason::Internal => 4,
    }
}

fn reject_reason(code: u8) -> Result<RejectReason, DecodeError> {
    Ok(match code {
        1 => RejectReason::BadToken,
        2 => RejectReason::UnsupportedVersion,
        3 => RejectReason::Replaced,
        4 => RejectReason::Internal,
        _ => return Err(DecodeError::Invalid("unknown reject reason")),
    })
}

fn go_away_code(reason: GoAwayReason) -> u8 {
    match reason {
        GoAwayReason::Shutdown => 1,
        GoAwayReason::Replaced => 2,
        GoAwayReason::Revoked => 3,
    }
}

fn go_away_reason(code: u8) -> Result<GoAwayReason, DecodeError> {
    Ok(match code {
        1 => GoAwayReason::Shutdown,
        2 => GoAwayReason::Replaced,
        3 => GoAwayReason::Revoked,
        _ => return Err(DecodeError::Invalid("unknown go-away reason")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<ControlMsg, DecodeError> {
        ControlMsg::decode(&mut Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn ping_has_the_documented_layout() {
        let bytes = ControlMsg::Ping { seq: 0x0102 }.encoded();
        assert_eq!(&bytes[..], b"\x04\x00\x08\x00\x00\x00\x00\x00\x00\x01\x02");
    }

    #[test]
    fn hello_has_the_documented_layout() {
        let hello = Hello::new(AgentToken::new("t0k"), "a/1");
        let bytes = ControlMsg::from(hello.clone()).encoded();
        assert_eq!(
            &bytes[..],
            b"\x01\x00\x27\x00\x01\x00\x01\x00\x03t0k\x00\x03a/1\x00\x00\x00\x00\x00\x00\x00\x00\x01\
              \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"
        );
        assert_eq!(decode(&bytes), Ok(ControlMsg::Hello(hello)));
    }

    #[test]
    fn hello_carries_previous_after_takeover() {
        let hello = Hello {
            instance: 7,
            previous: 0x0102_0304_0506_0708,
            ..Hello::new(AgentToken::new("t"), "a")
        };
        let bytes = ControlMsg::from(hello.clone()).encoded();
        assert_eq!(
            &bytes[bytes.len() - 17..bytes.len() - 8],
            b"\x01\x01\x02\x03\x04\x05\x06\x07\x08"
        );
        assert_eq!(decode(&bytes), Ok(ControlMsg::Hello(hello)));
    }

    #[test]
    fn a_hello_without_wants_decodes_with_wants_0() {
        let hello = Hello {
            wants: 0,
            ..Hello::new(AgentToken::new("t"), "a")
        };
        let mut bytes = ControlMsg::from(hello.clone()).encoded().to_vec();
        bytes.truncate(bytes.len() - 8);
        bytes[2] -= 8;
        assert_eq!(decode(&bytes), Ok(ControlMsg::Hello(hello)));
    }

    #[test]
    fn edges_round_trip_and_a_list_too_long_is_invalid() {
        let edges = ControlMsg::Edges(vec!["edge-2.internal:443".into(), "[::1]:7443".into()]);
        let bytes = edges.encoded();
        assert_eq!(&bytes[..5], b"\x08\x00\x23\x00\x02");
        assert_eq!(decode(&bytes), Ok(edges));
        assert_eq!(
            decode(&ControlMsg::Edges(Vec::new()).encoded()),
            Ok(ControlMsg::Edges(Vec::new()))
        );
        // More than MAX_EDGES, or longer than MAX_EDGE_ADDR_LEN, are cut when sent (the
        // largest list still fits a frame), and a longer list is refused when received.
        let many: Vec<String> = (0..70)
            .map(|i| format!("{}{i}:1", "e".repeat(300)))
            .collect();
        let Ok(ControlMsg::Edges(sent)) = decode(&ControlMsg::Edges(many).encoded()) else {
            panic!("a cut list decodes");
        };
        assert_eq!(sent.len(), MAX_EDGES);
        assert!(sent.iter().all(|e| e.len() == MAX_EDGE_ADDR_LEN));
        assert_eq!(
            decode(b"\x08\x00\x02\x00\x41"),
            Err(DecodeError::Invalid(
                "more edges than an Edges message takes"
            ))
        );
    }

    #[test]
    fn an_older_agents_hello_without_previous_decodes_with_previous_0() {
        // The layout before `previous`: the frame ends after the takeover flag.
        let bytes = b"\x01\x00\x17\x00\x01\x00\x01\x00\x03t0k\x00\x03a/1\x00\x00\x00\x00\x00\x00\x00\x09\x00";
        let Ok(ControlMsg::Hello(hello)) = decode(bytes) else {
            panic!("an older agent's hello decodes");
        };
        assert_eq!(
            (hello.instance, hello.takeover, hello.previous),
            (9, false, 0)
        );
        // A cut `previous` is not an absent one.
        let mut cut = bytes.to_vec();
        cut[2] += 3;
        cut.extend([0, 0, 1]);
        assert_eq!(decode(&cut), Err(DecodeError::Invalid("truncated body")));
    }

    #[test]
    fn token_never_shows_in_debug() {
        let hello = Hello::new(AgentToken::new("s3cret-token"), "burrow-agent/0.1.0");
        let debug = format!("{:?}", ControlMsg::Hello(hello));
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("AgentToken(***)"), "{debug}");
    }

    #[test]
    fn hello_supports_its_inclusive_range() {
        let mut hello = Hello::new(AgentToken::new("t"), "a");
        (hello.min_version, hello.max_version) = (2, 4);
        assert!(!hello.supports(1));
        assert!(hello.supports(2) && hello.supports(4));
        assert!(!hello.supports(5));
    }

    #[test]
    fn stream_frame_types_are_unexpected_here() {
        assert_eq!(
            decode(b"\x40\x00\x00"),
            Err(DecodeError::UnexpectedType(0x40))
        );
        assert_eq!(
            decode(b"\x41\x00\x01\x00"),
            Err(DecodeError::UnexpectedType(0x41))
        );
        assert_eq!(decode(b"\x00\x00\x00"), Err(DecodeError::UnexpectedType(0)));
    }

    #[test]
    fn unknown_codes_are_invalid() {
        assert_eq!(
            decode(b"\x03\x00\x03\x09\x00\x00"),
            Err(DecodeError::Invalid("unknown reject reason"))
        );
        assert_eq!(
            decode(b"\x07\x00\x03\x00\x00\x00"),
            Err(DecodeError::Invalid("unknown go-away reason"))
        );
        assert_eq!(
            decode(b"\x06\x00\x06\x01\x00\x00\x03\x00\x00"),
            Err(DecodeError::Invalid("unknown auth mode"))
        );
        assert_eq!(
            decode(b"\x06\x00\x01\x02"),
            Err(DecodeError::Invalid("presence byte not 0 or 1"))
        );
    }

    #[test]
    fn bad_utf8_and_trailing_bytes_are_invalid() {
        assert_eq!(
            decode(b"\x03\x00\x05\x01\x00\x02\xff\xfe"),
            Err(DecodeError::Invalid("string not UTF-8"))
        );
        assert_eq!(
            decode(b"\x04\x00\x09\x00\x00\x00\x00\x00\x00\x00\x01\x00"),
            Err(DecodeError::Invalid("trailing bytes"))
        );
        assert_eq!(
            decode(b"\x04\x00\x07\x00\x00\x00\x00\x00\x00\x01"),
            Err(DecodeError::Invalid("truncated body"))
        );
    }

    #[test]
    fn overlong_token_is_invalid_and_cut_on_encode() {
        let mut body = vec![0, 1, 0, 1, 0x02, 0x01]; // versions, then a 513-byte token
        body.extend([b'a'; 513]);
        body.extend([0, 0]);
        let mut frame = vec![HELLO];
        frame.extend(u16::try_from(body.len()).expect("small").to_be_bytes());
        frame.extend(&body);
        assert_eq!(decode(&frame), Err(DecodeError::Invalid("string too long")));

        let msg = ControlMsg::from(Hello::new(AgentToken::new("a".repeat(600)), "x"));
        let Ok(ControlMsg::Hello(back)) = decode(&msg.encoded()) else {
            panic!("an overlong token still encodes to a valid frame");
        };
        assert_eq!(back.token.expose(), "a".repeat(MAX_TOKEN_LEN));
    }
}
