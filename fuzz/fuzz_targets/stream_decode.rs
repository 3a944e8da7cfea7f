//! Feeds raw bytes to `StreamHeader::decode` and `StreamAnswer::decode`, frame after frame until
//! an error, the way the agent and the edge read the start of a data stream. No input may panic;
//! an error must leave the buffer untouched; whatever decodes must re-encode to exactly the bytes
//! it came from and decode again to the same value.

#![no_main]

use std::fmt::Debug;

use burrow_protocol::{DecodeError, StreamAnswer, StreamHeader};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn check<M: PartialEq + Debug>(
    data: &[u8],
    decode: fn(&mut Bytes) -> Result<M, DecodeError>,
    encoded: fn(&M) -> Bytes,
) {
    let mut buf = Bytes::copy_from_slice(data);
    loop {
        let before = buf.clone();
        let Ok(msg) = decode(&mut buf) else {
            assert_eq!(buf, before, "an error leaves the buffer untouched");
            break;
        };
        let consumed = before.len() - buf.len();
        let bytes = encoded(&msg);
        assert_eq!(
            bytes,
            before.slice(..consumed),
            "re-encoding gives the same bytes"
        );
        let mut again = bytes.clone();
        assert_eq!(decode(&mut again), Ok(msg), "own encoding decodes");
        assert!(again.is_empty(), "own encoding is one whole frame");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, StreamHeader::decode, StreamHeader::encoded);
    check(data, StreamAnswer::decode, StreamAnswer::encoded);
});
