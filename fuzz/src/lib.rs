//! Shared pieces of burrow's fuzz targets: mirrors of the protocol's messages that derive
//! [`Arbitrary`] (the protocol crate itself does not depend on `arbitrary`), and what the codec
//! is expected to turn them into.
//!
//! The input layout these types read is simple on purpose, so that seed files can be written by
//! hand or by `seeds.py`: integers are little-endian and read from the front; a `bool` is one
//! byte (odd is true); an `Option` is a `bool` then the value; an enum is a little-endian `u32`
//! `x` choosing variant `(x * variants) >> 32`; a list is its elements each preceded by a 1 byte
//! and ended by a 0 byte (or the end of the input, for the last field of a target's input);
//! [`Text`] and [`RawFrame`] are described on their types.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use arbitrary::{Arbitrary, Unstructured};
use burrow_protocol::frame::{MAX_STR_LEN, MAX_TOKEN_LEN};
use burrow_protocol::{
    AgentToken, AuthMode, ControlMsg, GoAway, GoAwayReason, Hello, Port, RefuseReason, Reject,
    RejectReason, StreamAnswer, StreamHeader, StreamKind, TunnelState, Welcome,
};

/// A string field: a length byte, that many bytes (fewer if the input ends; invalid UTF-8
/// becomes U+FFFD), then a byte `r`: the text is repeated `1 + r % 16` times, so strings past the
/// wire limits (512 bytes for a token, 1024 for others) are common.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u8::arbitrary(u)?).min(u.len());
        let bytes = u.bytes(len)?;
        let times = 1 + usize::from(u8::arbitrary(u)? % 16);
        Ok(Text(String::from_utf8_lossy(bytes).repeat(times)))
    }
}

/// Raw bytes for a decoder: a little-endian `u16` length, then that many bytes (fewer if the
/// input ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame(pub Vec<u8>);

impl<'a> Arbitrary<'a> for RawFrame {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u16::arbitrary(u)?).min(u.len());
        Ok(RawFrame(u.bytes(len)?.to_vec()))
    }
}

/// A [`TunnelState`].
#[derive(Debug, Clone, Arbitrary)]
pub struct Tunnel {
    /// The tunnel key.
    pub key: Text,
    /// `AuthMode::Authenticated` when true, `Open` otherwise.
    pub authenticated: bool,
    /// The URL template.
    pub url_template: Text,
}

/// A [`ControlMsg`]; reason codes pick a reason modulo the number of reasons.
#[derive(Debug, Clone, Arbitrary)]
pub enum Msg {
    /// [`ControlMsg::Hello`].
    Hello {
        /// Lowest version spoken.
        min_version: u16,
        /// Highest version spoken.
        max_version: u16,
        /// The agent token.
        token: Text,
        /// Software name.
        agent: Text,
        /// This connection attempt's instance.
        instance: u64,
        /// Take over a live session.
        takeover: bool,
        /// The instance of the agent's last accepted connection.
        previous: u64,
        /// What the agent takes beyond the first release's messages.
        wants: u64,
    },
    /// [`ControlMsg::Welcome`].
    Welcome {
        /// Chosen version.
        version: u16,
        /// The devbox.
        devbox_id: Text,
        /// Its tunnel.
        tunnel: Option<Tunnel>,
    },
    /// [`ControlMsg::Reject`].
    Reject {
        /// Index into the reject reasons.
        reason: u8,
        /// Detail.
        message: Text,
    },
    /// [`ControlMsg::Ping`].
    Ping {
        /// Sequence number.
        seq: u64,
    },
    /// [`ControlMsg::Pong`].
    Pong {
        /// Sequence number.
        seq: u64,
    },
    /// [`ControlMsg::TunnelUpdate`].
    TunnelUpdate(Option<Tunnel>),
    /// [`ControlMsg::GoAway`].
    GoAway {
        /// Index into the go-away reasons.
        reason: u8,
        /// Detail.
        message: Text,
    },
    /// [`ControlMsg::Edges`].
    Edges(Vec<Text>),
}

const REJECT_REASONS: [RejectReason; 4] = [
    RejectReason::BadToken,
    RejectReason::UnsupportedVersion,
    RejectReason::Replaced,
    RejectReason::Internal,
];

const GO_AWAY_REASONS: [GoAwayReason; 3] = [
    GoAwayReason::Shutdown,
    GoAwayReason::Replaced,
    GoAwayReason::Revoked,
];

const REFUSE_REASONS: [RefuseReason; 5] = [
    RefuseReason::NotListening,
    RefuseReason::PortNotAllowed,
    RefuseReason::ConnectTimeout,
    RefuseReason::TooManyStreams,
    RefuseReason::UnsupportedVersion,
];

fn pick<T: Copy, const N: usize>(list: [T; N], index: u8) -> T {
    list[usize::from(index) % N]
}

impl Tunnel {
    /// The protocol value.
    pub fn build(&self) -> TunnelState {
        TunnelState {
            key: self.key.0.clone(),
            auth_mode: if self.authenticated {
                AuthMode::Authenticated
            } else {
                AuthMode::Open
            },
            url_template: self.url_template.0.clone(),
        }
    }
}

impl Msg {
    /// The protocol value.
    pub fn build(&self) -> ControlMsg {
        match self {
            Msg::Hello {
                min_version,
                max_version,
                token,
                agent,
                instance,
                takeover,
                previous,
                wants,
            } => ControlMsg::Hello(Hello {
                min_version: *min_version,
                max_version: *max_version,
                token: AgentToken::new(token.0.clone()),
                agent: agent.0.clone(),
                instance: *instance,
                takeover: *takeover,
                previous: *previous,
                wants: *wants,
            }),
            Msg::Welcome {
                version,
                devbox_id,
                tunnel,
            } => ControlMsg::Welcome(Welcome {
                version: *version,
                devbox_id: devbox_id.0.clone(),
                tunnel: tunnel.as_ref().map(Tunnel::build),
            }),
            Msg::Reject { reason, message } => ControlMsg::Reject(Reject {
                reason: pick(REJECT_REASONS, *reason),
                message: message.0.clone(),
            }),
            Msg::Ping { seq } => ControlMsg::Ping { seq: *seq },
            Msg::Pong { seq } => ControlMsg::Pong { seq: *seq },
            Msg::TunnelUpdate(tunnel) => {
                ControlMsg::TunnelUpdate(tunnel.as_ref().map(Tunnel::build))
            }
            Msg::GoAway { reason, message } => ControlMsg::GoAway(GoAway {
                reason: pick(GO_AWAY_REASONS, *reason),
                message: message.0.clone(),
            }),
            Msg::Edges(edges) => ControlMsg::Edges(edges.iter().map(|e| e.0.clone()).collect()),
        }
    }
}

/// A client address of a [`StreamHeader`].
#[derive(Debug, Clone, Arbitrary)]
pub enum Client {
    /// IPv4 address and port.
    V4([u8; 4], u16),
    /// IPv6 address, port, flow info and scope id (the last two are not sent).
    V6([u8; 16], u16, u32, u32),
}

/// A [`StreamHeader`].
#[derive(Debug, Clone, Arbitrary)]
pub struct Header {
    /// Header version.
    pub version: u16,
    /// The port; 0 cannot be built.
    pub port: u16,
    /// The kind: an index into HTTP, raw, HTTP/2.
    pub kind: u8,
    /// The client.
    pub client: Option<Client>,
}

impl Header {
    /// The protocol value, or `None` for port 0, which [`Port::new`] refuses.
    pub fn build(&self) -> Option<StreamHeader> {
        let client = self.client.as_ref().map(|c| match *c {
            Client::V4(ip, port) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)),
            Client::V6(ip, port, flow, scope) => {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope))
            }
        });
        let kind = pick([StreamKind::Http, StreamKind::Raw, StreamKind::Http2], self.kind);
        Some(StreamHeader {
            version: self.version,
            port: Port::new(self.port)?,
            kind,
            client,
        })
    }
}

/// A [`StreamAnswer`].
#[derive(Debug, Clone, Arbitrary)]
pub enum Answer {
    /// Accept.
    Accept,
    /// Accept, the port speaks HTTP/2 only.
    AcceptHttp2,
    /// Refuse, with an index into the refuse reasons.
    Refuse(u8),
}

impl Answer {
    /// The protocol value.
    pub fn build(&self) -> StreamAnswer {
        match *self {
            Answer::Accept => StreamAnswer::Accept,
            Answer::AcceptHttp2 => StreamAnswer::AcceptHttp2,
            Answer::Refuse(reason) => StreamAnswer::Refuse(pick(REFUSE_REASONS, reason)),
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary: what the
/// encoder sends for a string over its wire limit.
pub fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn cut_tunnel(t: &TunnelState) -> TunnelState {
    TunnelState {
        key: cut(&t.key, MAX_STR_LEN),
        auth_mode: t.auth_mode,
        url_template: cut(&t.url_template, MAX_STR_LEN),
    }
}

/// What a message decodes to after a round trip: itself, with every string cut to its wire
/// limit.
pub fn expected_control(msg: &ControlMsg) -> ControlMsg {
    let s = |s: &str| cut(s, MAX_STR_LEN);
    match msg {
        ControlMsg::Hello(h) => ControlMsg::Hello(Hello {
            token: AgentToken::new(cut(h.token.expose(), MAX_TOKEN_LEN)),
            agent: s(&h.agent),
            ..h.clone()
        }),
        ControlMsg::Welcome(w) => ControlMsg::Welcome(Welcome {
            version: w.version,
            devbox_id: s(&w.devbox_id),
            tunnel: w.tunnel.as_ref().map(cut_tunnel),
        }),
        ControlMsg::Reject(r) => ControlMsg::Reject(Reject {
            reason: r.reason,
            message: s(&r.message),
        }),
        ControlMsg::TunnelUpdate(t) => ControlMsg::TunnelUpdate(t.as_ref().map(cut_tunnel)),
        ControlMsg::GoAway(g) => ControlMsg::GoAway(GoAway {
            reason: g.reason,
            message: s(&g.message),
        }),
        ControlMsg::Edges(edges) => ControlMsg::Edges(
            edges
                .iter()
                .take(burrow_protocol::control::MAX_EDGES)
                .map(|e| cut(e, burrow_protocol::control::MAX_EDGE_ADDR_LEN))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// What a header decodes to after a round trip: itself, without IPv6 flow info and scope id.
pub fn expected_header(h: &StreamHeader) -> StreamHeader {
    let client = h.client.map(|c| match c {
        SocketAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(*a.ip(), a.port(), 0, 0)),
        v4 => v4,
    });
    StreamHeader {
        client,
        ..h.clone()
    }
}

/// A configuration as the config targets read it: TOML text up to the first NUL byte (TOML
/// allows no NUL, so nothing is lost), then one source per line: `NAME=value` sets an
/// environment variable, `--dotted.key=value` a flag (only keys in `settings`, as the command
/// line gives only those). Invalid UTF-8 becomes U+FFFD.
#[derive(Debug, Clone, Default)]
pub struct ConfigInput {
    /// The file's text.
    pub text: String,
    /// The environment.
    pub env: std::collections::HashMap<String, String>,
    /// The flags given.
    pub flags: Vec<(&'static str, String)>,
}

impl ConfigInput {
    /// Splits `data` into its sources; `settings` lists the keys a flag may set.
    pub fn parse(data: &[u8], settings: &[burrow_runtime::sources::Setting]) -> Self {
        let (text, rest) = match data.iter().position(|&b| b == 0) {
            Some(nul) => (&data[..nul], &data[nul + 1..]),
            None => (data, &[][..]),
        };
        let mut input = ConfigInput {
            text: String::from_utf8_lossy(text).into_owned(),
            ..ConfigInput::default()
        };
        for line in String::from_utf8_lossy(rest).lines() {
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            match name.strip_prefix("--") {
                Some(key) => {
                    if let Some(setting) = settings.iter().find(|s| s.key == key) {
                        input.flags.push((setting.key, value.to_owned()));
                    }
                }
                None => {
                    input.env.insert(name.to_owned(), value.to_owned());
                }
            }
        }
        input
    }
}
