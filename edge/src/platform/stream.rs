//! `GET /v1/events`: the events as Server-Sent Events, from the moment the client subscribes.
//!
//! Each message is `id: N`, `event: <type>`, `data: <the webhook's JSON>` and a blank line; a
//! comment line every [`KEEP_ALIVE`] keeps proxies from timing the stream out. A subscriber has
//! a bounded queue ([`SUBSCRIBER_QUEUE`](super::events::SUBSCRIBER_QUEUE)): one that falls
//! behind is disconnected, never buffered for.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::time::{Instant, Interval};

use super::events::{Events, Subscription};
use crate::body::{self, Body};
use crate::listener::CloseConnection;

/// How often a quiet stream sends a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The first bytes of every stream: the response head goes out with them.
const GREETING: &[u8] = b": burrow events\n\n";

impl Events {
    /// The events stream's response to `req` (which the caller authorized): 200 with a body
    /// that carries every event emitted from now on, or 503 when too many streams are open.
    pub fn response<B>(&self, req: &Request<B>) -> Response<Body> {
        let close = req
            .extensions()
            .get::<CloseConnection>()
            .map(|c| c.0.clone());
        let Some(subscription) = self.subscribe(close) else {
            let mut r = Response::new(body::full(
                "{\"error\":\"too many events streams are open; close one and try again\"}\n",
            ));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            return r;
        };
        let chunks = futures_util::stream::unfold(Sse::new(subscription), Sse::next);
        let frames = chunks.map(|chunk| Ok::<_, crate::body::BoxError>(Frame::data(chunk)));
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        let headers = r.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // nginx and its kind buffer responses unless told not to.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    }
}

/// One subscriber's stream: its queue, the keep-alive timer, whether it was greeted.
struct Sse {
    subscription: Subscription,
    keep_alive: Interval,
    greeted: bool,
}

impl Sse {
    fn new(subscription: Subscription) -> Sse {
        let mut keep_alive = tokio::time::interval_at(Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Sse {
            subscription,
            keep_alive,
            greeted: false,
        }
    }

    /// The next chunk of the body: the greeting, an event or a keep-alive comment. `None` ends
    /// the stream: the edge stops, or the subscriber fell behind (its queue was closed).
    async fn next(mut self) -> Option<(Bytes, Sse)> {
        if !self.greeted {
            self.greeted = true;
            return Some((Bytes::from_static(GREETING), self));
        }
        let closed = self.subscription.closed.clone();
        let chunk = tokio::select! {
            biased;
            () = closed.cancelled() => return None,
            posted = self.subscription.events.recv() => posted?.sse(),
            _ = self.keep_alive.tick() => Bytes::from_static(b": keep-alive\n\n"),
        };
        // Whatever was sent counts as activity: the next comment is a full period away.
        self.keep_alive.reset();
        Some((chunk, self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::events::Event;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;

    /// The next data frame of `body`, as text.
    async fn chunk(body: &mut Body) -> Option<String> {
        let frame = body.frame().await?.expect("no body error");
        let data = frame.into_data().expect("a data frame");
        Some(String::from_utf8(data.to_vec()).expect("text"))
    }

    #[tokio::test(start_paused = true)]
    async fn events_then_keep_alives_then_the_end_at_shutdown() {
        let closed = CancellationToken::new();
        let events = Events::new(closed.clone());
        let response = events.response(&Request::new(()));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body();
        assert_eq!(
            chunk(&mut body).await.as_deref(),
            Some(": burrow events\n\n")
        );
        events.emit(Event::agent_connected("box-1"));
        let message = chunk(&mut body).await.expect("an event");
        assert!(
            message.starts_with("id: 1\nevent: agent.connected\ndata: {"),
            "{message:?}"
        );
        let before = Instant::now();
        let comment = chunk(&mut body).await.expect("a keep-alive");
        assert_eq!(comment, ": keep-alive\n\n");
        assert_eq!(
            before.elapsed(),
            KEEP_ALIVE,
            "after a quiet period (the clock is paused)"
        );
        closed.cancel();
        assert_eq!(
            chunk(&mut body).await,
            None,
            "the stream ends when the edge stops"
        );
    }
}
