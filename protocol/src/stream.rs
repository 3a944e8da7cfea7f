//! Data streams: the edge opens a bi-directional stream per public request and sends a
//! [`StreamHeader`]; the agent answers a [`StreamAnswer`]; after an accept, raw bytes follow both
//! ways until each side closes.
//!
//! Frame types and bodies (see [`crate::frame`] for integers and options):
//!
//! | type | message | body |
//! | --- | --- | --- |
//! | 0x40 | StreamHeader | version u16, port u16 (not 0), kind u8 (1 http, 2 raw, 3 http2), client Option\<addr\> |
//! | 0x41 | StreamAnswer | 0 (accept), or 1 then a reason u8 (refuse), or 2 (accept; the port speaks HTTP/2 only) |
//!
//! A client address is a tag 4, 4 bytes of IPv4 and a port u16, or a tag 6, 16 bytes of IPv6 and
//! a port u16 (IPv6 flow info and scope id are not sent; they decode as 0). Refuse reasons:
//! 1 not listening, 2 port not allowed, 3 connect timeout, 4 too many streams, 5 unsupported
//! version.
//!
//! Kind 3 and answer 2 came after the first release, without a new version: an agent that does
//! not know kind 3 drops the stream (the edge says to update the agent), and an agent sends
//! answer 2 only for a port it marks HTTP/2-only, which an edge that does not know answer 2
//! could not have served anyway.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use bytes::{Bytes, BytesMut};

use crate::frame::{Reader, Writer, decode_frame, write_frame};
use crate::{DecodeError, VERSION};

pub use crate::port::Port;

const STREAM_HEADER: u8 = 0x40;
const STREAM_ANSWER: u8 = 0x41;

/// What the bytes after the header are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamKind {
    /// HTTP/1.1 from the edge to the service (upgrades continue as raw bytes)
    Http,
    /// A raw byte stream (TCP)
    Raw,
    /// HTTP/2 with prior knowledge (h2c) from the edge to the service: gRPC, and services the
    /// agent marks HTTP/2-only. One stream carries one HTTP/2 connection, many requests.
    Http2,
}

impl StreamKind {
    /// A short name for logs: `"http"`, `"raw"` or `"http2"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Raw => "raw",
            Self::Http2 => "http2",
        }
    }
}

/// The edge's first frame on a data stream: where to connect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The protocol version of this header; may differ from [`VERSION`] (the agent decides).
    pub version: u16,
    /// The devbox port to connect to, on loopback.
    pub port: Port,
    /// What the bytes after the answer are.
    pub kind: StreamKind,
    /// The public client's address, when the edge knows it.
    pub client: Option<SocketAddr>,
}

impl StreamHeader {
    /// A header of this build's [`VERSION`].
    pub fn new(port: Port, kind: StreamKind, client: Option<SocketAddr>) -> Self {
        Self {
            version: VERSION,
            port,
            kind,
            client,
        }
    }

    /// Appends exactly one frame to `buf`. An IPv6 client's flow info and scope id are not sent.
    pub fn encode(&self, buf: &mut BytesMut) {
        write_frame(buf, STREAM_HEADER, |w| {
            w.put_u16(self.version);
            w.put_u16(self.port.get());
            w.put_u8(match self.kind {
                StreamKind::Http => 1,
                StreamKind::Raw => 2,
                StreamKind::Http2 => 3,
            });
            w.put_option(self.client.as_ref(), put_addr);
        });
    }

    /// Decodes one frame from the front of `buf` (see the crate docs for the contract). Any
    /// version is accepted as long as the body is well-formed.
    pub fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        decode_frame(buf, |ty, r| {
            if ty != STREAM_HEADER {
                return Err(DecodeError::UnexpectedType(ty));
            }
            Ok(Self {
                version: r.get_u16()?,
                port: Port::new(r.get_u16()?).ok_or(DecodeError::Invalid("port 0"))?,
                kind: match r.get_u8()? {
                    1 => StreamKind::Http,
                    2 => StreamKind::Raw,
                    3 => StreamKind::Http2,
                    _ => return Err(DecodeError::Invalid("unknown stream kind")),
                },
                client: r.get_option(get_addr)?,
            })
        })
    }

    /// The header as one frame, in a fresh buffer.
    pub fn encoded(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }
}

fn put_addr(w: &mut Writer<'_>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            w.put_u8(4);
            w.put_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            w.put_u8(6);
            w.put_slice(&a.ip().octets());
        }
    }
    w.put_u16(addr.port());
}

fn get_addr(r: &mut Reader<'_>) -> Result<SocketAddr, DecodeError> {
    Ok(match r.get_u8()? {
        4 => {
            let ip = Ipv4Addr::from(r.get_array::<4>()?);
            SocketAddrV4::new(ip, r.get_u16()?).into()
        }
        6 => {
            let ip = Ipv6Addr::from(r.get_array::<16>()?);
            SocketAddrV6::new(ip, r.get_u16()?, 0, 0).into()
        }
        _ => return Err(DecodeError::Invalid("unknown address family")),
    })
}

/// Why the agent refused a data stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseReason {
    /// Nothing accepted the connection on loopback
    NotListening,
    /// The agent's port policy forbids this port
    PortNotAllowed,
    /// The local service did not accept in time
    ConnectTimeout,
    /// The agent has too many streams open
    TooManyStreams,
    /// The stream header's version is not one the agent speaks
    UnsupportedVersion,
}

impl RefuseReason {
    /// A short phrase for logs and error pages: `"not listening"`, `"port not allowed"`,
    /// `"connect timeout"`, `"too many streams"`, `"unsupported version"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotListening => "not listening",
            Self::PortNotAllowed => "port not allowed",
            Self::ConnectTimeout => "connect timeout",
            Self::TooManyStreams => "too many streams",
            Self::UnsupportedVersion => "unsupported version",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::NotListening => 1,
            Self::PortNotAllowed => 2,
            Self::ConnectTimeout => 3,
            Self::TooManyStreams => 4,
            Self::UnsupportedVersion => 5,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            1 => Self::NotListening,
            2 => Self::PortNotAllowed,
            3 => Self::ConnectTimeout,
            4 => Self::TooManyStreams,
            5 => Self::UnsupportedVersion,
            _ => return Err(DecodeError::Invalid("unknown refuse reason")),
        })
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent's answer to a [`StreamHeader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamAnswer {
    /// Connected to the local service; bytes follow both ways.
    Accept,
    /// Connected to a service the agent marks HTTP/2-only (`forward.http2_ports`), answered to
    /// an HTTP stream of either kind: the edge speaks HTTP/2 (h2c) on it.
    AcceptHttp2,
    /// Not connected; the agent closes the stream after this frame.
    Refuse(RefuseReason),
}

impl StreamAnswer {
    /// Appends exactly one frame to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        write_frame(buf, STREAM_ANSWER, |w| match self {
            Self::Accept => w.put_u8(0),
            Self::Refuse(reason) => {
                w.put_u8(1);
                w.put_u8(reason.code());
            }
            Self::AcceptHttp2 => w.put_u8(2),
        });
    }

    /// Decodes one frame from the front of `buf` (see the crate docs for the contract).
    pub fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        decode_frame(buf, |ty, r| {
            if ty != STREAM_ANSWER {
                return Err(DecodeError::UnexpectedType(ty));
            }
            match r.get_u8()? {
                0 => Ok(Self::Accept),
                1 => RefuseReason::from_code(r.get_u8()?).map(Self::Refuse),
                2 => Ok(Self::AcceptHttp2),
                _ => Err(DecodeError::Invalid("unknown stream answer")),
            }
        })
    }

    /// The answer as one frame, in a fresh buffer.
    pub fn encoded(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &'static [u8]) -> Result<StreamHeader, DecodeError> {
        StreamHeader::decode(&mut Bytes::from_static(bytes))
    }

    fn answer(bytes: &'static [u8]) -> Result<StreamAnswer, DecodeError> {
        StreamAnswer::decode(&mut Bytes::from_static(bytes))
    }

    fn port(n: u16) -> Port {
        Port::new(n).expect("test ports are not 0")
    }

    #[test]
    fn header_with_ipv4_client_has_the_documented_layout() {
        let client = "192.0.2.7:51000".parse().ok();
        let h = StreamHeader::new(port(3000), StreamKind::Http, client);
        let bytes = h.encoded();
        assert_eq!(
            &bytes[..],
            b"\x40\x00\x0d\x00\x01\x0b\xb8\x01\x01\x04\xc0\x00\x02\x07\xc7\x38"
        );
        assert_eq!(StreamHeader::decode(&mut bytes.clone()), Ok(h));
    }

    #[test]
    fn ipv6_scope_and_flowinfo_are_not_sent() {
        let sent = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 443, 7, 3);
        let h = StreamHeader::new(port(22), StreamKind::Raw, Some(sent.into()));
        let back = StreamHeader::decode(&mut h.encoded()).expect("decodes");
        let want = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 443, 0, 0);
        assert_eq!(back.client, Some(want.into()));
    }

    #[test]
    fn http2_streams_have_kind_3() {
        let h = StreamHeader::new(port(50051), StreamKind::Http2, None);
        assert_eq!(&h.encoded()[..], b"\x40\x00\x06\x00\x01\xc3\x83\x03\x00");
        assert_eq!(StreamHeader::decode(&mut h.encoded()), Ok(h));
    }

    #[test]
    fn header_of_another_version_still_decodes() {
        let got = header(b"\x40\x00\x06\x00\x09\x00\x50\x02\x00");
        assert_eq!(got.map(|h| h.version), Ok(9));
    }

    #[test]
    fn header_errors_are_named() {
        assert_eq!(
            header(b"\x40\x00\x06\x00\x01\x00\x00\x01\x00"),
            Err(DecodeError::Invalid("port 0"))
        );
        assert_eq!(
            header(b"\x40\x00\x06\x00\x01\x00\x50\x04\x00"),
            Err(DecodeError::Invalid("unknown stream kind"))
        );
        assert_eq!(
            header(b"\x40\x00\x08\x00\x01\x00\x50\x01\x01\x05\x00"),
            Err(DecodeError::Invalid("unknown address family"))
        );
        assert_eq!(
            header(b"\x40\x00\x07\x00\x01\x00\x50\x01\x00\x00"),
            Err(DecodeError::Invalid("trailing bytes"))
        );
        assert_eq!(
            header(b"\x40\x00\x08\x00\x01\x00\x50\x01\x01\x04\x7f"),
            Err(DecodeError::Invalid("truncated body"))
        );
        assert_eq!(
            header(b"\x41\x00\x01\x00"),
            Err(DecodeError::UnexpectedType(0x41))
        );
        assert_eq!(
            header(b"\x04\x00\x08\x00\x00\x00\x00\x00\x00\x00\x01"),
            Err(DecodeError::UnexpectedType(0x04))
        );
    }

    #[test]
    fn answer_layout_and_errors() {
        assert_eq!(&StreamAnswer::Accept.encoded()[..], b"\x41\x00\x01\x00");
        let refuse = StreamAnswer::Refuse(RefuseReason::PortNotAllowed);
        assert_eq!(&refuse.encoded()[..], b"\x41\x00\x02\x01\x02");
        assert_eq!(answer(b"\x41\x00\x02\x01\x02"), Ok(refuse));
        assert_eq!(
            answer(b"\x41\x00\x02\x01\x00"),
            Err(DecodeError::Invalid("unknown refuse reason"))
        );
        assert_eq!(
            &StreamAnswer::AcceptHttp2.encoded()[..],
            b"\x41\x00\x01\x02"
        );
        assert_eq!(answer(b"\x41\x00\x01\x02"), Ok(StreamAnswer::AcceptHttp2));
        assert_eq!(
            answer(b"\x41\x00\x01\x03"),
            Err(DecodeError::Invalid("unknown stream answer"))
        );
        assert_eq!(
            answer(b"\x41\x00\x00"),
            Err(DecodeError::Invalid("truncated body"))
        );
        assert_eq!(
            answer(b"\x41\x00\x02\x00\x00"),
            Err(DecodeError::Invalid("trailing bytes"))
        );
        assert_eq!(
            answer(b"\x40\x00\x01\x00"),
            Err(DecodeError::UnexpectedType(0x40))
        );
    }

    #[test]
    fn refuse_reasons_read_as_phrases() {
        assert_eq!(RefuseReason::NotListening.to_string(), "not listening");
        assert_eq!(
            RefuseReason::UnsupportedVersion.as_str(),
            "unsupported version"
        );
    }
}
