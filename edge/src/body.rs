//! The body type of every response the edge sends, on every listener: a service's streamed
//! body, a page of the edge's own, an admin API answer. A module of its own so that any module
//! can build a response without importing the request pipeline.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// The body of a response from the edge.
pub type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A whole body from bytes or a string.
pub fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}
