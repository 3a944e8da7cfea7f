//! `burrow_edge::h1::codec`: the edge reading a service's HTTP/1.1 answer (issue 15: the edge
//! speaks HTTP/1.1 to services itself). The first input byte is how many bytes arrive at a
//! time (as QUIC hands them over: any cut); the rest is what the service sent, answering a GET
//! (or a HEAD, when the first byte is odd).
//!
//! No input panics. Afterwards:
//! - the outcome (head, body bytes, trailers, the end or an error) is the same whether the
//!   bytes arrive all at once or a few at a time;
//! - a head with a Transfer-Encoding never keeps a Content-Length (the client would get a body
//!   framed by both);
//! - no more body bytes come out than went in, and a length-framed body is never longer than
//!   its length.

#![no_main]

use burrow_edge::h1::codec::{Framing, Step, parse_response};
use bytes::BytesMut;
use http::header;
use libfuzzer_sys::fuzz_target;

/// What reading an answer came to.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    head: Option<(u16, Vec<(String, Vec<u8>)>, bool)>,
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    ended: bool,
    failed: bool,
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, wire)) = data.split_first() else {
        return;
    };
    let head_request = first % 2 == 1;
    let step = usize::from(first / 2).max(1);
    let whole = read(wire, wire.len().max(1), head_request);
    let cut = read(wire, step, head_request);
    assert_eq!(whole, cut, "fed {step} at a time");
    assert!(whole.body.len() <= wire.len());
});

/// Reads `wire` as an answer, `step` bytes arriving at a time.
fn read(wire: &[u8], step: usize, head_request: bool) -> Outcome {
    let mut out = Outcome {
        head: None,
        body: Vec::new(),
        trailers: None,
        ended: false,
        failed: false,
    };
    let mut chunks = wire.chunks(step);
    let mut buf = BytesMut::new();
    let head = loop {
        match parse_response(&mut buf, head_request) {
            Ok(Some(head)) => break head,
            Ok(None) => match chunks.next() {
                Some(chunk) => buf.extend_from_slice(chunk),
                None => return out,
            },
            Err(_) => {
                out.failed = true;
                return out;
            }
        }
    };
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "{head:?}");
    }
    let limit = match head.framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    out.head = Some((head.status.as_u16(), fields(&head.headers), head.keep_alive));
    let mut framing = head.framing;
    loop {
        match framing.decode(&mut buf) {
            Ok(Step::Data(data)) => {
                assert!(!data.is_empty(), "an empty data step");
                out.body.extend_from_slice(&data);
            }
            Ok(Step::Trailers(trailers)) => {
                out.trailers = Some(fields(&trailers));
                out.ended = true;
                break;
            }
            Ok(Step::End) => {
                out.ended = true;
                break;
            }
            Ok(Step::More) => match chunks.next() {
                Some(chunk) => buf.extend_from_slice(chunk),
                None => break,
            },
            Err(_) => {
                out.failed = true;
                break;
            }
        }
    }
    if let Some(limit) = limit {
        assert!(out.body.len() as u64 <= limit, "{} over {limit}", out.body.len());
    }
    out
}

fn fields(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}
