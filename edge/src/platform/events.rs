//! The events themselves and their fan-out: [`Event`] is what happened, [`Events`] numbers
//! it, serializes it once and hands it to every events-stream subscriber and to the webhook
//! queue, without ever waiting for either.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::webhook::{Queue, Webhooks};

/// Events a subscriber of `GET /v1/events` may have queued; one that falls further behind is
/// disconnected rather than buffered for.
pub const SUBSCRIBER_QUEUE: usize = 1024;

/// Subscribers at once; more are refused (503) until one leaves.
pub const MAX_SUBSCRIBERS: usize = 64;

/// One devbox's last activity, in a [`Event::DevboxActivity`] batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Activity {
    /// The devbox.
    pub id: String,
    /// When its tunnel last carried traffic (unix milliseconds).
    pub last_activity_ms: u64,
}

/// Something the platform hears about. Serialized as JSON with `"type"` naming the variant
/// (`"devbox.wake"`, ...) and, once emitted, `"id"` and `"at_ms"` (see [`Events::emit`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum Event {
    /// A request reached a devbox whose agent is away and whose tunnel has `wake_on_http`:
    /// the platform is asked to wake it.
    #[serde(rename = "devbox.wake")]
    DevboxWake {
        /// The devbox.
        devbox: String,
    },
    /// Tunnel traffic counted as devbox activity (`http_keep_alive`), batched.
    #[serde(rename = "devbox.activity")]
    DevboxActivity {
        /// Each devbox with traffic since the last batch.
        devboxes: Vec<Activity>,
    },
    /// The devbox's agent connected to this edge (it had no connection here before).
    #[serde(rename = "agent.connected")]
    AgentConnected {
        /// The devbox.
        devbox: String,
    },
    /// The devbox's agent has no connection to this edge any more.
    #[serde(rename = "agent.disconnected")]
    AgentDisconnected {
        /// The devbox.
        devbox: String,
    },
    /// The devbox's tunnel was enabled, or its mode or options changed.
    #[serde(rename = "tunnel.enabled")]
    TunnelEnabled {
        /// The devbox.
        devbox: String,
    },
    /// The devbox's tunnel was disabled.
    #[serde(rename = "tunnel.disabled")]
    TunnelDisabled {
        /// The devbox.
        devbox: String,
    },
    /// The tunnel's bearer token was replaced.
    #[serde(rename = "tunnel.rotated")]
    TunnelRotated {
        /// The devbox.
        devbox: String,
    },
}

impl Event {
    /// `devbox.wake`.
    pub fn wake(devbox: impl Into<String>) -> Event {
        Event::DevboxWake {
            devbox: devbox.into(),
        }
    }

    /// `devbox.activity` for a batch of devboxes.
    pub fn activity(devboxes: Vec<Activity>) -> Event {
        Event::DevboxActivity { devboxes }
    }

    /// `agent.connected`.
    pub fn agent_connected(devbox: impl Into<String>) -> Event {
        Event::AgentConnected {
            devbox: devbox.into(),
        }
    }

    /// `agent.disconnected`.
    pub fn agent_disconnected(devbox: impl Into<String>) -> Event {
        Event::AgentDisconnected {
            devbox: devbox.into(),
        }
    }

    /// `tunnel.enabled`.
    pub fn tunnel_enabled(devbox: impl Into<String>) -> Event {
        Event::TunnelEnabled {
            devbox: devbox.into(),
        }
    }

    /// `tunnel.disabled`.
    pub fn tunnel_disabled(devbox: impl Into<String>) -> Event {
        Event::TunnelDisabled {
            devbox: devbox.into(),
        }
    }

    /// `tunnel.rotated`.
    pub fn tunnel_rotated(devbox: impl Into<String>) -> Event {
        Event::TunnelRotated {
            devbox: devbox.into(),
        }
    }

    /// The `"type"` value (and the SSE `event:` name).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::DevboxWake { .. } => "devbox.wake",
            Event::DevboxActivity { .. } => "devbox.activity",
            Event::AgentConnected { .. } => "agent.connected",
            Event::AgentDisconnected { .. } => "agent.disconnected",
            Event::TunnelEnabled { .. } => "tunnel.enabled",
            Event::TunnelDisabled { .. } => "tunnel.disabled",
            Event::TunnelRotated { .. } => "tunnel.rotated",
        }
    }
}

/// An event as emitted: numbered, stamped and serialized once, then shared by every
/// subscriber and the webhook queue.
#[derive(Debug)]
pub struct Posted {
    /// Increasing within one run of this edge (the SSE `id:`).
    pub id: u64,
    /// The event's type.
    pub kind: &'static str,
    /// The JSON body: `{"id", "at_ms", "type", ...}`.
    pub json: Bytes,
}

impl Posted {
    /// The event as one Server-Sent Events message.
    pub fn sse(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.json.len() + 48);
        out.extend_from_slice(format!("id: {}\nevent: {}\ndata: ", self.id, self.kind).as_bytes());
        // serde_json escapes newlines inside strings, so the JSON is one `data:` line.
        out.extend_from_slice(&self.json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

/// Where emitted events go. Cheap to clone; [`Events::emit`] never waits.
#[derive(Debug, Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The subscribers, and the next id: ids are drawn under this lock, so every subscriber
    /// and the webhook queue get the events in id order.
    state: Mutex<State>,
    /// Events for the webhook task, when webhooks are configured.
    webhooks: Option<Arc<Queue>>,
    /// The webhook task, stopped by [`Events::finish`].
    delivery: Option<Webhooks>,
    /// Fired when the edge stops: every stream ends.
    closed: CancellationToken,
    /// Subscribers disconnected for falling behind.
    lagged: AtomicU64,
}

#[derive(Debug)]
struct State {
    next_id: u64,
    subscribers: Vec<Subscriber>,
}

/// One `GET /v1/events` client.
#[derive(Debug)]
struct Subscriber {
    queue: mpsc::Sender<Arc<Posted>>,
    /// Closes the subscriber's connection: one that does not read cannot be ended by its
    /// response body, which is not polled while the socket is full.
    close: Option<CancellationToken>,
}

/// A subscription: the subscriber's queue, and what ends it.
#[derive(Debug)]
pub(super) struct Subscription {
    /// The events, in order; closed when the subscriber fell behind.
    pub events: mpsc::Receiver<Arc<Posted>>,
    /// Fired when the edge stops.
    pub closed: CancellationToken,
}

impl Events {
    /// Events for an edge without webhooks: to the subscribers of the events stream, whose
    /// streams end when `closed` fires.
    pub fn new(closed: CancellationToken) -> Events {
        Events::build(None, closed)
    }

    /// Events for an edge with webhooks: also to `queue`, which the `delivery` task drains.
    pub fn with_webhooks(
        queue: Arc<Queue>,
        delivery: Webhooks,
        closed: CancellationToken,
    ) -> Events {
        Events::build(Some((queue, delivery)), closed)
    }

    /// Events that go to subscribers only (no webhooks), until dropped.
    pub fn detached() -> Events {
        Events::new(CancellationToken::new())
    }

    fn build(webhooks: Option<(Arc<Queue>, Webhooks)>, closed: CancellationToken) -> Events {
        let (webhooks, delivery) = webhooks.unzip();
        Events {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    next_id: 1,
                    subscribers: Vec::new(),
                }),
                webhooks,
                delivery,
                closed,
                lagged: AtomicU64::new(0),
            }),
        }
    }

    /// Stops the webhook task, if any, once it has delivered what is queued (or its flush
    /// time, the drain grace, is over); returns when it has ended. For the edge's stop, after
    /// everything that emits events has.
    pub async fn finish(&self) {
        if let Some(delivery) = &self.inner.delivery {
            delivery.finish().await;
        }
    }

    /// Sends `event` to every subscriber and the webhook queue, stamped with the time now and
    /// the next id. Never waits: a subscriber whose queue is full is disconnected, and a full
    /// webhook queue drops its oldest event.
    pub fn emit(&self, event: Event) {
        if self.inner.webhooks.is_none() && self.lock().subscribers.is_empty() {
            return;
        }
        let at_ms = unix_ms();
        // Serialized outside the lock; only the id is spliced in under it.
        let body = match serde_json::to_vec(&event) {
            Ok(body) => body,
            Err(e) => {
                warn!(error = %e, event = event.kind(), "cannot serialize an event; dropped");
                return;
            }
        };
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let posted = Arc::new(Posted {
            id,
            kind: event.kind(),
            json: envelope(id, at_ms, &body),
        });
        state.subscribers.retain_mut(|s| self.offer(s, &posted));
        if let Some(queue) = &self.inner.webhooks {
            queue.push(posted);
        }
    }

    /// Gives `posted` to one subscriber; `false` drops the subscriber (gone, or behind).
    fn offer(&self, subscriber: &mut Subscriber, posted: &Arc<Posted>) -> bool {
        match subscriber.queue.try_send(posted.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.lagged.fetch_add(1, Ordering::Relaxed);
                warn!(
                    queued = SUBSCRIBER_QUEUE,
                    "an events stream subscriber fell behind; disconnecting it"
                );
                if let Some(close) = &subscriber.close {
                    close.cancel();
                }
                false
            }
        }
    }

    /// A new subscriber's queue; `close` closes its connection should it fall behind. `None`
    /// when [`MAX_SUBSCRIBERS`] are subscribed.
    pub(super) fn subscribe(&self, close: Option<CancellationToken>) -> Option<Subscription> {
        let mut state = self.lock();
        state.subscribers.retain(|s| !s.queue.is_closed());
        if state.subscribers.len() >= MAX_SUBSCRIBERS {
            debug!("too many events stream subscribers; refusing one more");
            return None;
        }
        let (queue, events) = mpsc::channel(SUBSCRIBER_QUEUE);
        state.subscribers.push(Subscriber { queue, close });
        Some(Subscription {
            events,
            closed: self.inner.closed.clone(),
        })
    }

    /// Subscribers disconnected so far for falling behind.
    pub fn lagged(&self) -> u64 {
        self.inner.lagged.load(Ordering::Relaxed)
    }

    /// The state; a panic elsewhere while it was held left it consistent (single statements).
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `{"id":N,"at_ms":T,` followed by the event's own JSON object without its `{`.
fn envelope(id: u64, at_ms: u64, event: &[u8]) -> Bytes {
    let mut out = format!("{{\"id\":{id},\"at_ms\":{at_ms},").into_bytes();
    // An internally tagged enum serializes as an object that always holds "type".
    out.extend_from_slice(event.strip_prefix(b"{").unwrap_or(event));
    Bytes::from(out)
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse(posted: &Posted) -> Value {
        serde_json::from_slice(&posted.json).expect("JSON")
    }

    #[test]
    fn events_serialize_as_the_design_says() {
        let events = Events::detached();
        let mut sub = events.subscribe(None).expect("subscribed");
        let before = unix_ms();
        events.emit(Event::agent_connected("box-1"));
        events.emit(Event::activity(vec![Activity {
            id: "box-1".into(),
            last_activity_ms: 1234,
        }]));
        events.emit(Event::wake("box-2"));
        let first = sub.events.try_recv().expect("first");
        let v = parse(&first);
        assert_eq!(v["type"], "agent.connected");
        assert_eq!(v["devbox"], "box-1");
        assert_eq!(v["id"], 1);
        let at = v["at_ms"].as_u64().expect("at_ms");
        assert!(at >= before && at <= unix_ms(), "{at}");
        let second = parse(&sub.events.try_recv().expect("second"));
        assert_eq!(
            second["devboxes"],
            json!([{ "id": "box-1", "last_activity_ms": 1234 }])
        );
        assert_eq!(
            (second["type"].as_str(), second["id"].as_u64()),
            (Some("devbox.activity"), Some(2))
        );
        let third = sub.events.try_recv().expect("third");
        assert_eq!(parse(&third)["type"], "devbox.wake");
        let sse = String::from_utf8(third.sse().to_vec()).expect("text");
        assert!(
            sse.starts_with("id: 3\nevent: devbox.wake\ndata: {") && sse.ends_with("}\n\n"),
            "{sse:?}"
        );
        let lines: Vec<&str> = sse.lines().collect();
        assert_eq!(lines.len(), 4, "id, event, one data line, blank: {sse:?}");
        assert_eq!(lines[3], "", "{sse:?}");
    }

    #[test]
    fn every_kind_names_its_serialized_type() {
        for event in [
            Event::wake("d"),
            Event::activity(Vec::new()),
            Event::agent_connected("d"),
            Event::agent_disconnected("d"),
            Event::tunnel_enabled("d"),
            Event::tunnel_disabled("d"),
            Event::tunnel_rotated("d"),
        ] {
            let v = serde_json::to_value(&event).expect("JSON");
            assert_eq!(v["type"], event.kind());
        }
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_dropped_and_its_connection_closed() {
        let events = Events::detached();
        let close = CancellationToken::new();
        let mut slow = events.subscribe(Some(close.clone())).expect("slow");
        let mut fast = events.subscribe(None).expect("fast");
        for i in 0..SUBSCRIBER_QUEUE {
            events.emit(Event::wake(format!("d{i}")));
            assert!(fast.events.try_recv().is_ok());
        }
        assert!(!close.is_cancelled(), "a full queue is not yet behind");
        events.emit(Event::wake("one too many"));
        assert!(close.is_cancelled(), "its connection is closed");
        assert_eq!(events.lagged(), 1);
        let mut queued = 0;
        while slow.events.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, SUBSCRIBER_QUEUE, "no more than its queue was kept");
        assert!(
            slow.events.is_closed(),
            "its queue is closed: the stream ends"
        );
        assert!(fast.events.try_recv().is_ok(), "the other goes on");
    }

    #[test]
    fn subscribers_are_bounded_and_a_gone_one_frees_its_place() {
        let events = Events::detached();
        let mut held: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| events.subscribe(None).expect("subscriber"))
            .collect();
        assert!(events.subscribe(None).is_none(), "one too many");
        held.pop();
        assert!(events.subscribe(None).is_some(), "a place was freed");
    }
}
