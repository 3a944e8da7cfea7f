//! Structured values through the codec: every `ControlMsg`, `StreamHeader` and `StreamAnswer`
//! that can be built encodes to one well-formed frame, and decoding it gives the value back,
//! with strings over their wire limit cut at a character boundary (the encoder's documented
//! behaviour) and an IPv6 client's flow info and scope id dropped. A header with port 0 cannot
//! be built (`Port::new` refuses it). Every strict prefix of a frame is `Incomplete`; the frames
//! of all values, written back to back, decode one after another; and a decoder of the other
//! stream kind refuses each frame by its type without consuming it.

#![no_main]

use std::fmt::Debug;

use arbitrary::Arbitrary;
use burrow_fuzz::{Answer, Header, Msg, expected_control, expected_header};
use burrow_protocol::frame::{HEADER_LEN, MAX_BODY, body_len};
use burrow_protocol::{ControlMsg, DecodeError, StreamAnswer, StreamHeader};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Item {
    Control(Msg),
    Header(Header),
    Answer(Answer),
}

#[derive(Debug, Arbitrary)]
struct Input {
    items: Vec<Item>,
}

/// A built value: how to decode its frame, and what must come back.
enum Expect {
    Control(ControlMsg),
    Header(StreamHeader),
    Answer(StreamAnswer),
}

fuzz_target!(|input: Input| {
    let mut stream = BytesMut::new();
    let mut expected = Vec::new();
    for item in &input.items {
        let (bytes, expect) = match item {
            Item::Control(m) => {
                let msg = m.build();
                let back = check(msg.encoded(), ControlMsg::decode, expected_control(&msg));
                assert_eq!(back.encoded(), msg.encoded(), "re-encoding is stable");
                (msg.encoded(), Expect::Control(expected_control(&msg)))
            }
            Item::Header(h) => {
                let Some(header) = h.build() else {
                    assert_eq!(h.port, 0, "only port 0 is refused");
                    continue;
                };
                check(
                    header.encoded(),
                    StreamHeader::decode,
                    expected_header(&header),
                );
                (header.encoded(), Expect::Header(expected_header(&header)))
            }
            Item::Answer(a) => {
                let answer = a.build();
                check(answer.encoded(), StreamAnswer::decode, answer);
                (answer.encoded(), Expect::Answer(answer))
            }
        };
        stream.extend_from_slice(&bytes);
        expected.push(expect);
    }

    let mut stream = stream.freeze();
    for expect in expected {
        match expect {
            Expect::Control(want) => {
                refused_by_type(&mut stream, StreamHeader::decode);
                assert_eq!(ControlMsg::decode(&mut stream), Ok(want));
            }
            Expect::Header(want) => {
                refused_by_type(&mut stream, ControlMsg::decode);
                refused_by_type(&mut stream, StreamAnswer::decode);
                assert_eq!(StreamHeader::decode(&mut stream), Ok(want));
            }
            Expect::Answer(want) => {
                refused_by_type(&mut stream, StreamHeader::decode);
                assert_eq!(StreamAnswer::decode(&mut stream), Ok(want));
            }
        }
    }
    assert!(stream.is_empty(), "every frame was consumed");
});

/// One frame: well-formed, within bounds, incomplete when cut short, and decoding to `want`.
fn check<M: PartialEq + Debug>(
    frame: Bytes,
    decode: fn(&mut Bytes) -> Result<M, DecodeError>,
    want: M,
) -> M {
    let header = frame
        .first_chunk::<HEADER_LEN>()
        .expect("a frame has a header");
    let len = body_len(header).expect("the body is within MAX_BODY");
    assert!(len <= MAX_BODY);
    assert_eq!(
        frame.len(),
        HEADER_LEN + len,
        "the length prefix is the body's"
    );
    for cut in [0, 1, 2, HEADER_LEN, frame.len() / 2, frame.len() - 1] {
        if cut < frame.len() {
            let mut short = frame.slice(..cut);
            assert_eq!(
                decode(&mut short),
                Err(DecodeError::Incomplete),
                "prefix {cut}"
            );
            assert_eq!(short.len(), cut, "an incomplete frame is not consumed");
        }
    }
    let mut buf = frame.clone();
    let got = decode(&mut buf).expect("an encoded value decodes");
    assert!(buf.is_empty(), "one value is one whole frame");
    assert_eq!(got, want);
    got
}

/// A decoder for another kind of frame refuses this one by its type and leaves it in place.
fn refused_by_type<M: Debug>(stream: &mut Bytes, decode: fn(&mut Bytes) -> Result<M, DecodeError>) {
    let before = stream.clone();
    assert!(matches!(
        decode(stream),
        Err(DecodeError::UnexpectedType(_))
    ));
    assert_eq!(*stream, before);
}
