//! Feeds raw bytes to `ControlMsg::decode` the way a control-stream reader would: frame after
//! frame until an error. No input may panic; an error must leave the buffer untouched; whatever
//! decodes must re-encode to exactly the bytes it came from (a hello in the older layout, without
//! its trailing `previous`, re-encodes with `previous` 0 appended) and decode again to the same
//! value.

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
        let decoded = before.slice(..consumed);
        if encoded != decoded {
            assert_eq!(
                older_hello(&encoded).as_deref(),
                Some(&decoded[..]),
                "re-encoding gives the same bytes, or adds a hello's `previous` 0"
            );
        }
        let mut again = encoded.clone();
        assert_eq!(
            ControlMsg::decode(&mut again),
            Ok(msg),
            "own encoding decodes"
        );
        assert!(again.is_empty(), "own encoding is one whole frame");
    }
});

/// A hello frame whose `previous` is 0 in the layout before that field: 8 bytes shorter. `None`
/// for any other frame.
fn older_hello(frame: &[u8]) -> Option<Vec<u8>> {
    let (kept, previous) = frame.split_at_checked(frame.len().checked_sub(8)?)?;
    if frame.first() != Some(&0x01) || previous != [0; 8] {
        return None;
    }
    let mut older = kept.to_vec();
    let len = u16::from_be_bytes([*older.get(1)?, *older.get(2)?]).checked_sub(8)?;
    older[1..3].copy_from_slice(&len.to_be_bytes());
    Some(older)
}
