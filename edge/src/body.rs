//! The body type of every response the edge sends, on every listener: a service's streamed
//! body, a page of the edge's own, an admin API answer; and of every request it sends to a
//! service. A module of its own so that any module can build one without importing the request
//! pipeline.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// The body of a response from the edge.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// What a body's error can be: hyper's, or the edge's own HTTP/1.1's ([`crate::h1`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request toward a service: the client's, or none (a bodiless idempotent
/// request sent again after the agent connection it first went on was replaced).
pub type ToService = http_body_util::Either<hyper::body::Incoming, http_body_util::Empty<Bytes>>;

/// A whole body from bytes or a string.
pub fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}
