//! Framing: `type: u8 | body_len: u16 big-endian | body`.
//!
//! Every message on every stream is one frame. The header is [`HEADER_LEN`] bytes and the body at
//! most [`MAX_BODY`], so a reader never holds more than `HEADER_LEN + MAX_BODY` bytes for one
//! message. A stream reader can read the header, call [`body_len`], then read exactly that many
//! more bytes before decoding.
//!
//! Inside a body, integers are big-endian; a string is a `u16` byte length and that many bytes of
//! UTF-8, bounded by [`MAX_TOKEN_LEN`] (secrets) or [`MAX_STR_LEN`] (everything else); an
//! `Option` is a presence byte, 0 or 1, followed by the value when 1.
//!
//! The crate-private `Writer` and `Reader` are what every message's `encode` and `decode`
//! are built on, through `write_frame` and `decode_frame`, so that the decode contract
//! (incomplete, too large, untouched on error, trailing bytes) is written once.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::DecodeError;

/// Bytes in a frame header: the type byte and the big-endian `u16` body length.
pub const HEADER_LEN: usize = 3;

/// The largest body a frame may declare; a larger one is [`DecodeError::TooLarge`].
pub const MAX_BODY: usize = 16 * 1024;

/// The longest token string (in bytes) a frame carries.
pub const MAX_TOKEN_LEN: usize = 512;

/// The longest string (in bytes) other than a token that a frame carries.
pub const MAX_STR_LEN: usize = 1024;

/// Reads a frame header and returns the body length that follows, checking the bound
/// ([`DecodeError::TooLarge`] past [`MAX_BODY`]). Does NOT check the type.
pub fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, DecodeError> {
    let [_ty, hi, lo] = *header;
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_BODY {
        return Err(DecodeError::TooLarge(len));
    }
    Ok(len)
}

/// Appends one frame of type `ty` to `buf`: reserves the header, lets `body` write the body, then
/// patches the length in.
pub(crate) fn write_frame(buf: &mut BytesMut, ty: u8, body: impl FnOnce(&mut Writer<'_>)) {
    let start = buf.len();
    buf.put_u8(ty);
    buf.put_u16(0); // patched below
    body(&mut Writer { buf });
    let len = buf.len() - start - HEADER_LEN;
    // Every message's fields are bounded (strings are cut to their limit by `put_str`), and the
    // largest message body is a few KiB, far under MAX_BODY; this only fires on a bug here.
    assert!(len <= MAX_BODY, "frame body of {len} bytes over MAX_BODY");
    let len = u16::try_from(len).expect("MAX_BODY fits in a u16");
    buf[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Decodes one frame from the front of `buf` with `parse`, which gets the frame type and a
/// reader over the complete body.
///
/// Returns `Incomplete` until the whole frame is there (`TooLarge` as soon as the header is);
/// rejects bytes `parse` leaves over; advances `buf` past the frame only on success.
pub(crate) fn decode_frame<T>(
    buf: &mut Bytes,
    parse: impl FnOnce(u8, &mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Incomplete);
    };
    let ty = header[0];
    let end = HEADER_LEN + body_len(header)?; // no overflow: at most 3 + 16 KiB
    let Some(body) = buf.get(HEADER_LEN..end) else {
        return Err(DecodeError::Incomplete);
    };
    let mut reader = Reader { rest: body };
    let msg = parse(ty, &mut reader)?;
    if !reader.rest.is_empty() {
        return Err(DecodeError::Invalid("trailing bytes"));
    }
    buf.advance(end);
    Ok(msg)
}

/// Writes the fields of one frame body.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    buf: &'a mut BytesMut,
}

impl Writer<'_> {
    pub(crate) fn put_u8(&mut self, v: u8) {
        self.buf.put_u8(v);
    }

    pub(crate) fn put_u16(&mut self, v: u16) {
        self.buf.put_u16(v);
    }

    pub(crate) fn put_u64(&mut self, v: u64) {
        self.buf.put_u64(v);
    }

    pub(crate) fn put_slice(&mut self, v: &[u8]) {
        self.buf.put_slice(v);
    }

    /// Writes a length-prefixed string, cut at a character boundary to at most `max` bytes so
    /// that the peer (which rejects longer ones) can always decode what this side sends.
    pub(crate) fn put_str(&mut self, s: &str, max: usize) {
        let s = truncate(s, max);
        // `truncate` bounds the length by `max`, which is at most MAX_STR_LEN.
        let len = u16::try_from(s.len()).expect("string limits fit in a u16");
        self.put_u16(len);
        self.put_slice(s.as_bytes());
    }

    /// Writes an `Option` as a presence byte, then the value with `put` when there is one.
    pub(crate) fn put_option<T>(&mut self, v: Option<&T>, put: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.put_u8(0),
            Some(v) => {
                self.put_u8(1);
                put(self, v);
            }
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1; // stops at 0 at the latest, which is always a boundary
    }
    &s[..end]
}

/// Reads the fields of one complete frame body.
///
/// The frame's length prefix said the body was whole, so running out of bytes here is
/// `Invalid("truncated body")`, not `Incomplete`.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

const TRUNCATED: DecodeError = DecodeError::Invalid("truncated body");

impl<'a> Reader<'a> {
    /// Whether the body has been read to its end (an optional trailing field is absent).
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(crate) fn get_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or(TRUNCATED)?;
        self.rest = rest;
        Ok(*head)
    }

    pub(crate) fn get_u8(&mut self) -> Result<u8, DecodeError> {
        let [v] = self.get_array()?;
        Ok(v)
    }

    pub(crate) fn get_u16(&mut self) -> Result<u16, DecodeError> {
        self.get_array().map(u16::from_be_bytes)
    }

    pub(crate) fn get_u64(&mut self) -> Result<u64, DecodeError> {
        self.get_array().map(u64::from_be_bytes)
    }

    fn get_slice(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self.rest.split_at_checked(len).ok_or(TRUNCATED)?;
        self.rest = rest;
        Ok(head)
    }

    /// Reads a length-prefixed UTF-8 string of at most `max` bytes.
    pub(crate) fn get_str(&mut self, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.get_u16()?);
        if len > max {
            return Err(DecodeError::Invalid("string too long"));
        }
        let bytes = self.get_slice(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid("string not UTF-8"))?;
        Ok(s.to_owned())
    }

    /// Reads an `Option`: a presence byte (0 or 1, anything else is invalid), then the value with
    /// `get` when present.
    pub(crate) fn get_option<T>(
        &mut self,
        get: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        match self.get_u8()? {
            0 => Ok(None),
            1 => get(self).map(Some),
            _ => Err(DecodeError::Invalid("presence byte not 0 or 1")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, body: &[u8]) -> Bytes {
        let mut buf = BytesMut::new();
        write_frame(&mut buf, ty, |w| w.put_slice(body));
        buf.freeze()
    }

    #[test]
    fn body_len_reads_big_endian_and_checks_the_bound() {
        assert_eq!(body_len(&[0xff, 0x01, 0x02]), Ok(0x0102));
        assert_eq!(body_len(&[0, 0x40, 0x00]), Ok(MAX_BODY));
        assert_eq!(
            body_len(&[0, 0x40, 0x01]),
            Err(DecodeError::TooLarge(MAX_BODY + 1))
        );
        assert_eq!(
            body_len(&[0, 0xff, 0xff]),
            Err(DecodeError::TooLarge(0xffff))
        );
    }

    #[test]
    fn write_frame_patches_the_length_after_earlier_frames() {
        let mut buf = BytesMut::from(&b"xy"[..]);
        write_frame(&mut buf, 9, |w| w.put_str("héllo", MAX_STR_LEN));
        assert_eq!(&buf[..], b"xy\x09\x00\x08\x00\x06h\xc3\xa9llo");
    }

    #[test]
    fn put_str_cuts_long_strings_at_a_char_boundary() {
        let long = "é".repeat(600); // 1200 bytes
        let mut out = BytesMut::new();
        write_frame(&mut out, 1, |w| w.put_str(&long, MAX_TOKEN_LEN - 1));
        let mut bytes = out.freeze();
        let s = decode_frame(&mut bytes, |_, r| r.get_str(MAX_TOKEN_LEN)).expect("decodes");
        assert_eq!(s.len(), MAX_TOKEN_LEN - 2);
        assert!(long.starts_with(&s));
    }

    #[test]
    fn decode_frame_consumes_one_frame_and_leaves_the_rest() {
        let mut buf = [frame(5, b"ab"), frame(6, b"")].concat().into();
        let got = decode_frame(&mut buf, |ty, r| Ok((ty, r.get_u16()?)));
        assert_eq!(got, Ok((5, u16::from_be_bytes(*b"ab"))));
        assert_eq!(&buf[..], b"\x06\x00\x00");
    }

    #[test]
    fn decode_frame_wants_the_whole_frame() {
        for input in [
            &b""[..],
            b"\x01",
            b"\x01\x00",
            b"\x01\x00\x02",
            b"\x01\x00\x02a",
        ] {
            let mut buf = Bytes::copy_from_slice(input);
            let got = decode_frame(&mut buf, |_, _| Ok(()));
            assert_eq!(got, Err(DecodeError::Incomplete), "{input:?}");
            assert_eq!(&buf[..], input);
        }
    }

    #[test]
    fn decode_frame_rejects_too_large_with_only_the_header() {
        let mut buf = Bytes::from_static(b"\x01\x40\x01");
        let got = decode_frame(&mut buf, |_, _| Ok(()));
        assert_eq!(got, Err(DecodeError::TooLarge(MAX_BODY + 1)));
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn decode_frame_rejects_trailing_bytes_and_leaves_buf() {
        let mut buf = frame(1, b"abc");
        let got = decode_frame(&mut buf, |_, r| r.get_u16());
        assert_eq!(got, Err(DecodeError::Invalid("trailing bytes")));
        assert_eq!(buf.len(), 6);
    }

    #[test]
    fn running_out_inside_a_body_is_truncated_not_incomplete() {
        let mut buf = frame(1, b"a");
        assert_eq!(
            decode_frame(&mut buf, |_, r| r.get_u64()),
            Err(DecodeError::Invalid("truncated body"))
        );
        let mut buf = frame(1, b"\x00\x05abc");
        assert_eq!(
            decode_frame(&mut buf, |_, r| r.get_str(MAX_STR_LEN)),
            Err(DecodeError::Invalid("truncated body"))
        );
    }

    #[test]
    fn strings_must_be_utf8_and_within_their_bound() {
        let mut buf = frame(1, b"\x00\x02\xc3\x28");
        assert_eq!(
            decode_frame(&mut buf, |_, r| r.get_str(MAX_STR_LEN)),
            Err(DecodeError::Invalid("string not UTF-8"))
        );
        let mut buf = frame(1, b"\x00\x04abcd");
        assert_eq!(
            decode_frame(&mut buf, |_, r| r.get_str(3)),
            Err(DecodeError::Invalid("string too long"))
        );
    }

    #[test]
    fn presence_byte_is_zero_or_one() {
        for (body, want) in [
            (&b"\x00"[..], Ok(None)),
            (b"\x01\x07", Ok(Some(7))),
            (
                b"\x02\x07",
                Err(DecodeError::Invalid("presence byte not 0 or 1")),
            ),
        ] {
            let mut buf = frame(1, body);
            assert_eq!(
                decode_frame(&mut buf, |_, r| r.get_option(Reader::get_u8)),
                want
            );
        }
    }
}
