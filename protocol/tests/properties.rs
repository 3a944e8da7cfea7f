//! Property tests of every decoder through the public API: round trips, back-to-back frames,
//! truncation, arbitrary bytes and oversized frames.

use std::fmt::Debug;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use burrow_protocol::frame::{HEADER_LEN, MAX_BODY, body_len};
use burrow_protocol::{
    AgentToken, AuthMode, ControlMsg, DecodeError, GoAway, GoAwayReason, Hello, Port, RefuseReason,
    Reject, RejectReason, StreamAnswer, StreamHeader, StreamKind, TunnelState, Welcome,
};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

/// The three message types share one contract; this lets each property be written once.
trait Codec: Sized + Debug + PartialEq {
    fn enc(&self, buf: &mut BytesMut);
    fn dec(buf: &mut Bytes) -> Result<Self, DecodeError>;
    fn bytes(&self) -> Bytes;
}

macro_rules! codec {
    ($($t:ty),*) => {$(
        impl Codec for $t {
            fn enc(&self, buf: &mut BytesMut) { self.encode(buf) }
            fn dec(buf: &mut Bytes) -> Result<Self, DecodeError> { <$t>::decode(buf) }
            fn bytes(&self) -> Bytes { self.encoded() }
        }
    )*};
}
codec!(ControlMsg, StreamHeader, StreamAnswer);

fn roundtrip<M: Codec>(msg: &M) -> Result<(), TestCaseError> {
    let mut buf = msg.bytes();
    let mut again = BytesMut::new();
    msg.enc(&mut again);
    prop_assert_eq!(&buf, &again.freeze(), "encoded() and encode() agree");
    prop_assert_eq!(&M::dec(&mut buf)?, msg);
    prop_assert!(buf.is_empty(), "{} bytes left", buf.len());
    Ok(())
}

fn back_to_back<M: Codec>(a: &M, b: &M) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    a.enc(&mut buf);
    b.enc(&mut buf);
    let mut buf = buf.freeze();
    prop_assert_eq!(&M::dec(&mut buf)?, a);
    prop_assert_eq!(&M::dec(&mut buf)?, b);
    prop_assert!(buf.is_empty());
    prop_assert_eq!(M::dec(&mut buf), Err(DecodeError::Incomplete));
    Ok(())
}

fn every_prefix_is_incomplete<M: Codec>(msg: &M) -> Result<(), TestCaseError> {
    let whole = msg.bytes();
    for cut in 0..whole.len() {
        let mut buf = whole.slice(..cut);
        prop_assert_eq!(
            M::dec(&mut buf),
            Err(DecodeError::Incomplete),
            "cut at {}",
            cut
        );
        prop_assert_eq!(&buf, &whole.slice(..cut), "untouched after cut at {}", cut);
    }
    Ok(())
}

/// On any input: no panic; an error leaves the buffer as it was; a success consumed exactly the
/// canonical encoding of what it decoded, or, for a hello, the older layout without its trailing
/// `previous` (then 0).
fn decodes_safely<M: Codec>(input: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = Bytes::copy_from_slice(input);
    match M::dec(&mut buf) {
        Err(_) => prop_assert_eq!(&buf[..], input),
        Ok(msg) => {
            let used = input.len() - buf.len();
            let canonical = msg.bytes();
            if canonical[..] != input[..used] {
                prop_assert_eq!(older_hello(&canonical), Some(input[..used].to_vec()));
            }
        }
    }
    Ok(())
}

/// A hello frame whose `previous` is 0 in the layout before that field: 8 bytes shorter. `None`
/// for any other frame.
fn older_hello(frame: &[u8]) -> Option<Vec<u8>> {
    let (kept, trailing) = frame.split_at_checked(frame.len().checked_sub(16)?)?;
    if frame.first() != Some(&0x01) || trailing != [0; 16] {
        return None;
    }
    let mut older = kept.to_vec();
    let len = u16::from_be_bytes([*older.get(1)?, *older.get(2)?]).checked_sub(16)?;
    older[1..3].copy_from_slice(&len.to_be_bytes());
    Some(older)
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn tunnel() -> impl Strategy<Value = TunnelState> {
    let mode = prop_oneof![Just(AuthMode::Open), Just(AuthMode::Authenticated)];
    (text(), mode, text()).prop_map(|(key, auth_mode, url_template)| TunnelState {
        key,
        auth_mode,
        url_template,
    })
}

fn control_msg() -> impl Strategy<Value = ControlMsg> {
    let reject = prop_oneof![
        Just(RejectReason::BadToken),
        Just(RejectReason::UnsupportedVersion),
        Just(RejectReason::Replaced),
        Just(RejectReason::Internal),
    ];
    let go_away = prop_oneof![
        Just(GoAwayReason::Shutdown),
        Just(GoAwayReason::Replaced),
        Just(GoAwayReason::Revoked),
    ];
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            text(),
            text(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(min, max, token, agent, instance, takeover, previous, wants)| {
                    ControlMsg::Hello(Hello {
                        min_version: min,
                        max_version: max,
                        token: AgentToken::new(token),
                        agent,
                        instance,
                        takeover,
                        previous,
                        wants,
                    })
                }
            ),
        (any::<u16>(), text(), proptest::option::of(tunnel())).prop_map(|(v, id, tunnel)| {
            ControlMsg::Welcome(Welcome {
                version: v,
                devbox_id: id,
                tunnel,
            })
        }),
        (reject, text())
            .prop_map(|(reason, message)| ControlMsg::Reject(Reject { reason, message })),
        any::<u64>().prop_map(|seq| ControlMsg::Ping { seq }),
        any::<u64>().prop_map(|seq| ControlMsg::Pong { seq }),
        proptest::option::of(tunnel()).prop_map(ControlMsg::TunnelUpdate),
        (go_away, text())
            .prop_map(|(reason, message)| ControlMsg::GoAway(GoAway { reason, message })),
    ]
}

fn stream_header() -> impl Strategy<Value = StreamHeader> {
    let port = (1..=u16::MAX).prop_map(|n| Port::new(n).expect("range starts at 1"));
    let kind = prop_oneof![
        Just(StreamKind::Http),
        Just(StreamKind::Raw),
        Just(StreamKind::Http2)
    ];
    let v6 = (any::<[u8; 16]>(), any::<u16>())
        .prop_map(|(ip, p)| SocketAddr::from(SocketAddrV6::new(Ipv6Addr::from(ip), p, 0, 0)));
    let client = prop_oneof![
        any::<std::net::SocketAddrV4>().prop_map(SocketAddr::from),
        v6
    ];
    (any::<u16>(), port, kind, proptest::option::of(client)).prop_map(
        |(version, port, kind, client)| StreamHeader {
            version,
            port,
            kind,
            client,
        },
    )
}

fn stream_answer() -> impl Strategy<Value = StreamAnswer> {
    prop_oneof![
        Just(StreamAnswer::Accept),
        Just(StreamAnswer::AcceptHttp2),
        Just(StreamAnswer::Refuse(RefuseReason::NotListening)),
        Just(StreamAnswer::Refuse(RefuseReason::PortNotAllowed)),
        Just(StreamAnswer::Refuse(RefuseReason::ConnectTimeout)),
        Just(StreamAnswer::Refuse(RefuseReason::TooManyStreams)),
        Just(StreamAnswer::Refuse(RefuseReason::UnsupportedVersion)),
    ]
}

/// A well-framed frame (correct length) of a likely type with an arbitrary body, so that body
/// parsers see far more than random bytes would reach.
fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop_oneof![0x01..=0x07u8, 0x40..=0x41u8, any::<u8>()];
    (
        ty,
        proptest::collection::vec(any::<u8>(), 0..80),
        any::<bool>(),
    )
        .prop_map(|(ty, body, tail)| {
            let mut f = vec![ty];
            f.extend(u16::try_from(body.len()).expect("short").to_be_bytes());
            f.extend(&body);
            if tail {
                f.extend(b"\x04\x00");
            }
            f
        })
}

proptest! {
    #[test]
    fn control_roundtrips(msg in control_msg()) { roundtrip(&msg)?; }

    #[test]
    fn older_hellos_decode_with_previous_0(msg in control_msg()) {
        if let ControlMsg::Hello(hello) = msg {
            let hello = ControlMsg::Hello(Hello { previous: 0, wants: 0, ..hello });
            let older = older_hello(&hello.bytes()).expect("a hello frame");
            prop_assert_eq!(ControlMsg::dec(&mut Bytes::from(older.clone())), Ok(hello));
            decodes_safely::<ControlMsg>(&older)?;
        }
    }

    #[test]
    fn stream_header_roundtrips(h in stream_header()) { roundtrip(&h)?; }

    #[test]
    fn stream_answer_roundtrips(a in stream_answer()) { roundtrip(&a)?; }

    #[test]
    fn control_back_to_back(a in control_msg(), b in control_msg()) { back_to_back(&a, &b)?; }

    #[test]
    fn stream_header_back_to_back(a in stream_header(), b in stream_header()) {
        back_to_back(&a, &b)?;
    }

    #[test]
    fn stream_answer_back_to_back(a in stream_answer(), b in stream_answer()) {
        back_to_back(&a, &b)?;
    }

    #[test]
    fn control_prefixes_are_incomplete(msg in control_msg()) { every_prefix_is_incomplete(&msg)?; }

    #[test]
    fn stream_header_prefixes_are_incomplete(h in stream_header()) {
        every_prefix_is_incomplete(&h)?;
    }

    #[test]
    fn stream_answer_prefixes_are_incomplete(a in stream_answer()) {
        every_prefix_is_incomplete(&a)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..96)) {
        decodes_safely::<ControlMsg>(&input)?;
        decodes_safely::<StreamHeader>(&input)?;
        decodes_safely::<StreamAnswer>(&input)?;
    }

    #[test]
    fn arbitrary_bodies_never_panic(input in framed_garbage()) {
        decodes_safely::<ControlMsg>(&input)?;
        decodes_safely::<StreamHeader>(&input)?;
        decodes_safely::<StreamAnswer>(&input)?;
    }

    #[test]
    fn oversized_length_is_too_large_from_the_header_on(
        ty in any::<u8>(),
        len in (MAX_BODY as u16 + 1)..=u16::MAX,
        extra in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let [hi, lo] = len.to_be_bytes();
        let header = [ty, hi, lo];
        let want = DecodeError::TooLarge(usize::from(len));
        prop_assert_eq!(body_len(&header), Err(want.clone()));
        let input = [&header[..], &extra].concat();
        let mut buf = Bytes::copy_from_slice(&input);
        prop_assert_eq!(ControlMsg::dec(&mut buf).err(), Some(want.clone()));
        prop_assert_eq!(StreamHeader::dec(&mut buf).err(), Some(want.clone()));
        prop_assert_eq!(StreamAnswer::dec(&mut buf).err(), Some(want));
        prop_assert_eq!(&buf[..], &input[..], "untouched");
    }

    #[test]
    fn body_len_accepts_every_length_up_to_the_bound(ty in any::<u8>(), len in 0..=MAX_BODY as u16) {
        let [hi, lo] = len.to_be_bytes();
        let header: [u8; HEADER_LEN] = [ty, hi, lo];
        prop_assert_eq!(body_len(&header), Ok(usize::from(len)));
    }

    #[test]
    fn long_strings_are_cut_to_decodable_frames(s in "\\PC{300,700}") {
        let msg = ControlMsg::Hello(Hello::new(AgentToken::new(s.clone()), s.repeat(2)));
        let Ok(ControlMsg::Hello(back)) = ControlMsg::decode(&mut msg.encoded()) else {
            return Err(TestCaseError::fail("an overlong hello did not decode"));
        };
        prop_assert!(back.token.expose().len() <= 512);
        prop_assert!(s.starts_with(back.token.expose()));
        prop_assert!(back.agent.len() <= 1024);
        prop_assert!(s.repeat(2).starts_with(&back.agent));
    }
}
