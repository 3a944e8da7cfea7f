//! Feeds raw bytes to `ControlMsg::decode` the way a control-stream reader would: frame after
//! frame until an error. No input may panic; an error must leave the buffer untouched; whatever
//! decodes must re-encode to exactly the bytes it came from (a hello in an older layout, without
//! its trailing `wants`, or `previous` and `wants`, re-encodes with them 0) and decode again to
//! the same value.

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
            assert!(
                older_hellos(&encoded)
                    .iter()
                    .any(|older| older[..] == decoded[..]),
                "re-encoding gives the same bytes, or adds a hello's `wants` (and `previous`) 0"
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

/// A hello frame in the older layouts its trailing zeros allow: without `wants` (8 bytes
/// shorter) and without `previous` and `wants` (16). Empty for any other frame.
fn older_hellos(frame: &[u8]) -> Vec<Vec<u8>> {
    [8, 16]
        .into_iter()
        .filter_map(|cut| older_hello(frame, cut))
        .collect()
}

/// `frame` without its last `cut` bytes, if it is a hello and they are all 0.
fn older_hello(frame: &[u8], cut: usize) -> Option<Vec<u8>> {
    let (kept, trailing) = frame.split_at_checked(frame.len().checked_sub(cut)?)?;
    if frame.first() != Some(&0x01) || trailing.iter().any(|b| *b != 0) {
        return None;
    }
    let mut older = kept.to_vec();
    let len = u16::from_be_bytes([*older.get(1)?, *older.get(2)?])
        .checked_sub(u16::try_from(cut).ok()?)?;
    older[1..3].copy_from_slice(&len.to_be_bytes());
    Some(older)
}
