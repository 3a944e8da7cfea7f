//! Feeds raw bytes to `ControlMsg::decode` the way a control-stream reader would: frame after
//! frame until an error. No input may panic; an error must leave the buffer untouched; whatever
//! decodes must re-encode to exactly the bytes it came from and decode again to the same value.

#![no_main]

use burrow_protocol::ControlMsg;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = Bytes::copy_from_slice(data);
    loop {
        let before = buf.clone();
        let Ok(msg) = ControlMsg::decode(&mut buf) else {
            assert_eq!(buf, before, "an error leaves the buffer untouched");
            break;
        };
        let consumed = before.len() - buf.len();
        let encoded = msg.encoded();
        assert_eq!(
            encoded,
            before.slice(..consumed),
            "re-encoding gives the same bytes"
        );
        let mut again = encoded.clone();
        assert_eq!(
            ControlMsg::decode(&mut again),
            Ok(msg),
            "own encoding decodes"
        );
        assert!(again.is_empty(), "own encoding is one whole frame");
    }
});
