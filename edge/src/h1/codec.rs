//! HTTP/1.1 as bytes: the request head the edge writes to a service, the response head it reads
//! back, and the response body's framing (RFC 9112). No I/O: each function takes the bytes
//! received so far and says what they hold, so the parser is tested (and fuzzed) on its own.
//!
//! Whatever the service sends is untrusted here: every limit is checked before memory is
//! taken for it, and a malformed answer is an [`Invalid`] naming what was wrong, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, request};

/// The most a response head (status line and header fields) may take: hyper's own default
/// (8 KiB + 100 x 4 KiB), so a service that worked through the hyper client still works.
pub const MAX_HEAD: usize = 8 * 1024 + 100 * 4 * 1024;
/// The most header fields a response head (or a trailer section) may have.
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (the size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// What was wrong with the service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

fn invalid(what: impl Into<String>) -> Invalid {
    Invalid(what.into())
}

/// How a request's body is framed on the way to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no framing field (a GET).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`: a body of unknown length.
    Chunked,
}

/// The request head as the service reads it: `parts` (already as the service should see
/// them: origin-form target, hop-by-hop fields gone) with the framing field the body needs.
/// Any `Content-Length` or `Transfer-Encoding` in `parts` is replaced by `framing`'s.
pub fn encode_request(parts: &request::Parts, framing: RequestFraming) -> Bytes {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fields: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let mut out = BytesMut::with_capacity(parts.method.as_str().len() + target.len() + fields + 64);
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.put_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        RequestFraming::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// A data chunk of a chunked request body, framed: size line, data, CRLF.
pub fn chunk_frame(data: &Bytes) -> [Bytes; 3] {
    [
        Bytes::from(format!("{:x}\r\n", data.len())),
        data.clone(),
        Bytes::from_static(b"\r\n"),
    ]
}

/// The end of a chunked request body: the last chunk, `trailers` (if any) and the empty line.
pub fn last_chunk(trailers: Option<&HeaderMap>) -> Bytes {
    let mut out = BytesMut::from(&b"0\r\n"[..]);
    for (name, value) in trailers.into_iter().flatten() {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// A response head, parsed.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// How its body is framed.
    pub framing: Framing,
    /// Whether the connection may take another request once the body is read: HTTP/1.1, no
    /// `Connection: close`, a body whose end is marked (not one read until the close).
    pub keep_alive: bool,
}

/// How a response body is framed (RFC 9112, 6.3), and how much of it is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// No body at all (HEAD, 1xx, 204, 304), or one read to its end.
    Done,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// Neither: the body is what comes until the service closes the connection.
    UntilClose,
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data: this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

/// What the next bytes of a body hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The trailer fields of a chunked body (the body ends after them).
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More bytes are needed to say.
    More,
}

/// Parses the response head at the start of `buf`, taking it (and any interim 1xx responses
/// before it, which the client does not get) out of `buf`; `Ok(None)` when `buf` does not hold
/// all of it yet. `head_request`: the request was a HEAD, whose answer has no body.
pub fn parse_response(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Invalid> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            // However the bytes came (all at once or a few at a time), the same limit.
            Ok(httparse::Status::Complete(_)) => return Err(too_large()),
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(too_large()),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(invalid(format!(
                    "the response has more than {MAX_HEADERS} header fields"
                )));
            }
            Err(e) => return Err(invalid(format!("the response head is malformed: {e}"))),
        };
        let code = response.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| invalid(format!("the response status {code} is not valid")))?;
        let http11 = response.version == Some(1);
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints: interim, for this hop only.
            buf.advance(len);
            continue;
        }
        let headers = header_map(response.headers)?;
        buf.advance(len);
        return head(status, headers, http11, head_request).map(Some);
    }
}

fn too_large() -> Invalid {
    invalid(format!("the response head is over {MAX_HEAD} bytes"))
}

/// The fields as a map; a name or value `http` rejects is an error.
fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, Invalid> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| invalid(format!("the header name {:?} is not valid", field.name)))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| invalid(format!("the value of header {name} is not valid")))?;
        map.append(name, value);
    }
    Ok(map)
}

/// The head's framing and keep-alive, from its status and fields.
fn head(
    status: StatusCode,
    mut headers: HeaderMap,
    http11: bool,
    head_request: bool,
) -> Result<Head, Invalid> {
    let close = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
    let encoded = headers.contains_key(header::TRANSFER_ENCODING);
    if encoded {
        // A Transfer-Encoding overrides any Content-Length, which must not reach the client
        // (it would frame the re-encoded body by it): RFC 9112, 6.3, point 3.
        headers.remove(header::CONTENT_LENGTH);
    }
    let framing = if head_request
        || status == StatusCode::SWITCHING_PROTOCOLS
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Done
    } else if encoded {
        if last_coding_is_chunked(&headers) {
            Framing::Chunked(Chunked::Size)
        } else {
            Framing::UntilClose
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        Framing::Length(content_length(&headers)?)
    } else {
        Framing::UntilClose
    };
    let keep_alive = http11
        && !close
        && status != StatusCode::SWITCHING_PROTOCOLS
        && framing != Framing::UntilClose;
    Ok(Head {
        status,
        headers,
        framing,
        keep_alive,
    })
}

fn last_coding_is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().split(|b| *b == b',').next_back())
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The one length every `Content-Length` value (and list element) names.
fn content_length(headers: &HeaderMap) -> Result<u64, Invalid> {
    let mut length = None;
    for element in headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
    {
        let n = parse_decimal(element.trim_ascii())
            .ok_or_else(|| invalid("the response's Content-Length is not a number"))?;
        if length.is_some_and(|l| l != n) {
            return Err(invalid(
                "the response has Content-Length values that differ",
            ));
        }
        length = Some(n);
    }
    length.ok_or_else(|| invalid("the response's Content-Length is empty"))
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

impl Framing {
    /// Whether the body has no more bytes to come.
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Done | Framing::Length(0))
    }

    /// How many body bytes may be read straight from the stream, uncopied, when nothing is
    /// buffered: the rest of a length-framed body or of a chunk; `None` for framing that has
    /// to be read through the buffer.
    pub fn raw_data(&self) -> Option<u64> {
        match self {
            Framing::Length(n) | Framing::Chunked(Chunked::Data(n)) if *n > 0 => Some(*n),
            Framing::UntilClose => Some(u64::MAX),
            _ => None,
        }
    }

    /// Counts `n` bytes read straight from the stream (at most [`Framing::raw_data`]).
    pub fn consumed(&mut self, n: u64) {
        match self {
            Framing::Length(left) => *left -= n.min(*left),
            Framing::Chunked(state) => {
                if let Chunked::Data(left) = state {
                    *left -= n.min(*left);
                    if *left == 0 {
                        *state = Chunked::DataEnd;
                    }
                }
            }
            Framing::Done | Framing::UntilClose => {}
        }
    }

    /// Takes the next step of the body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, Invalid> {
        match self {
            Framing::Done => Ok(Step::End),
            Framing::Length(0) => {
                *self = Framing::Done;
                Ok(Step::End)
            }
            Framing::Length(_) | Framing::UntilClose if buf.is_empty() => Ok(Step::More),
            Framing::UntilClose => Ok(Step::Data(buf.split().freeze())),
            Framing::Length(_) => {
                let data = take_data(buf, self.raw_data().unwrap_or(0));
                self.consumed(data.len() as u64);
                Ok(Step::Data(data))
            }
            Framing::Chunked(state) => {
                let step = decode_chunked(state, buf)?;
                if matches!(step, Step::Trailers(_) | Step::End) {
                    *self = Framing::Done;
                }
                Ok(step)
            }
        }
    }
}

/// Up to `max` bytes from the front of `buf`.
fn take_data(buf: &mut BytesMut, max: u64) -> Bytes {
    let n = usize::try_from(max).unwrap_or(usize::MAX).min(buf.len());
    buf.split_to(n).freeze()
}

/// One step of a chunked body (RFC 9112, 7.1).
fn decode_chunked(state: &mut Chunked, buf: &mut BytesMut) -> Result<Step, Invalid> {
    loop {
        match state {
            Chunked::Size => {
                let end = buf.windows(2).position(|w| w == b"\r\n");
                if end.map_or(buf.len(), |end| end + 2) > MAX_CHUNK_LINE {
                    return Err(invalid("a chunk-size line of the response is too long"));
                }
                let Some(end) = end else {
                    return Ok(Step::More);
                };
                let size = chunk_size(&buf[..end])?;
                buf.advance(end + 2);
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let data = take_data(buf, *left);
                *left -= data.len() as u64;
                if *left == 0 {
                    *state = Chunked::DataEnd;
                }
                return Ok(Step::Data(data));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("a chunk of the response does not end with CRLF"));
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => return trailers(buf),
        }
    }
}

/// The chunk size of a chunk-size line (without its CRLF): hex digits, then optional
/// extensions after `;`, which are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, Invalid> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let bad = || invalid("a chunk size in the response is not a hex number");
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    digits.iter().try_fold(0u64, |n, d| {
        let v = (*d as char).to_digit(16).ok_or_else(bad)?;
        Ok(n * 16 + u64::from(v))
    })
}

/// The trailer section after the last chunk, up to its empty line.
fn trailers(buf: &mut BytesMut) -> Result<Step, Invalid> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((len, _))) if len > MAX_HEAD => {
            Err(invalid("the response's trailer section is too large"))
        }
        Ok(httparse::Status::Complete((len, fields))) => {
            let map = header_map(fields)?;
            buf.advance(len);
            Ok(if map.is_empty() {
                Step::End
            } else {
                Step::Trailers(map)
            })
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            Err(invalid("the response's trailer section is too large"))
        }
        Ok(httparse::Status::Partial) => Ok(Step::More),
        Err(e) => Err(invalid(format!(
            "the response's trailer section is malformed: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request};

    fn parse(bytes: &[u8]) -> Result<Option<Head>, Invalid> {
        parse_response(&mut BytesMut::from(bytes), false)
    }

    /// The whole body of `framing` in `bytes`, fed `step` bytes at a time.
    fn body(mut framing: Framing, bytes: &[u8], step: usize) -> (Vec<u8>, Option<HeaderMap>) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match framing.decode(&mut buf).expect("valid body") {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Trailers(t) => return (out, Some(t)),
                Step::End => return (out, None),
                Step::More => {
                    assert!(fed < bytes.len(), "body ended early");
                    let to = (fed + step).min(bytes.len());
                    buf.extend_from_slice(&bytes[fed..to]);
                    fed = to;
                }
            }
        }
    }

    #[test]
    fn a_request_head_carries_its_fields_and_the_bodys_framing() {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/upload?x=1")
            .header("host", "localhost:3000")
            .header("content-length", "999")
            .header("transfer-encoding", "gzip")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let head = encode_request(&parts, RequestFraming::Length(5));
        assert_eq!(
            &head[..],
            b"POST /upload?x=1 HTTP/1.1\r\nhost: localhost:3000\r\ncontent-length: 5\r\n\r\n"
        );
        let head = encode_request(&parts, RequestFraming::Chunked);
        assert!(head.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        assert!(!head.windows(14).any(|w| w == b"content-length"));
    }

    #[test]
    fn a_length_framed_response_is_read_to_its_length_and_keeps_the_connection() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..]);
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        let mut framing = head.framing;
        assert_eq!(
            framing.decode(&mut buf),
            Ok(Step::Data(Bytes::from("hello")))
        );
        assert_eq!(framing.decode(&mut buf), Ok(Step::End));
        assert!(buf.is_empty());
    }

    #[test]
    fn interim_responses_are_skipped_and_a_partial_head_waits() {
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        let head = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        assert_eq!(head.framing, Framing::Done);
        assert!(head.headers.get("link").is_none());
    }

    #[test]
    fn a_chunked_body_decodes_however_it_is_cut_with_its_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, trailers) = body(Framing::Chunked(Chunked::Size), wire, step);
            assert_eq!(data, b"hello world", "fed {step} at a time");
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
        }
        let (data, trailers) = body(Framing::Chunked(Chunked::Size), b"3\r\nabc\r\n0\r\n\r\n", 1);
        assert_eq!((data.as_slice(), trailers), (&b"abc"[..], None));
    }

    #[test]
    fn transfer_encoding_overrides_content_length_and_is_never_passed_with_it() {
        let head =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.framing, Framing::Chunked(Chunked::Size));
        assert!(head.headers.get("content-length").is_none());
        let head = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.keep_alive);
        // The fuzzer's find: an answer to a HEAD has no body, but its fields still go out.
        let mut wire = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        );
        let head = parse_response(&mut wire, true).unwrap().unwrap();
        assert!(head.headers.get("content-length").is_none());
    }

    #[test]
    fn what_ends_the_connection_after_the_answer() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive, close\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert!(!parse(wire).unwrap().unwrap().keep_alive, "{wire:?}");
        }
        let head = parse_response(
            &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"[..]),
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, Framing::Done, "a HEAD answer has no body");
        assert!(head.keep_alive);
    }

    #[test]
    fn malformed_answers_are_named_not_panicked_on() {
        let cases: [(&[u8], &str); 7] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", "differ"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "not a number",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "not a number",
            ),
            (b"HTTP/1.1 099 Nope\r\n\r\n", "not valid"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed"),
            (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "malformed"),
            (b"HTTP/1.1 200 OK\r\nx: \x01\r\n\r\n", "malformed"),
        ];
        for (wire, says) in cases {
            let e = parse(wire).expect_err("malformed");
            assert!(e.0.contains(says), "{wire:?}: {e}");
        }
        let mut framing = Framing::Chunked(Chunked::Size);
        let e = framing
            .decode(&mut BytesMut::from(&b"zz\r\n"[..]))
            .unwrap_err();
        assert!(e.0.contains("hex"), "{e}");
        let mut framing = Framing::Chunked(Chunked::Size);
        let e = framing
            .decode(&mut BytesMut::from(&b"2\r\nabXY"[..]))
            .and_then(|_| framing.decode(&mut BytesMut::from(&b"XY"[..])))
            .unwrap_err();
        assert!(e.0.contains("CRLF"), "{e}");
        let mut framing = Framing::Chunked(Chunked::Size);
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(framing.decode(&mut BytesMut::from(&long[..])).is_err());
    }

    #[test]
    fn an_oversized_head_is_refused_once_it_passes_the_limit() {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        while wire.len() <= MAX_HEAD {
            wire.extend_from_slice(
                b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        let e = parse(&wire).expect_err("too large");
        assert!(
            e.0.contains("header fields") || e.0.contains("bytes"),
            "{e}"
        );
    }
}
