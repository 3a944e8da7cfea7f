//! The live half of the registry: each devbox's current agent session (attached when an agent's
//! hello is accepted, detached when its connection ends), and the requests waiting for an agent
//! that is away. Nothing here touches the store: sessions live in memory only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use burrow_protocol::{ControlMsg, GoAway, GoAwayReason, TunnelState, close};
use tokio::sync::{Notify, mpsc};

use super::Registry;
use crate::platform::{Event, Events};
use crate::secret::Secret;
use crate::store::PresenceEvent;

/// A live agent connection.
#[derive(Debug, Clone)]
pub struct AgentSession {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// When it was established.
    pub since: SystemTime,
    /// Distinguishes this session from earlier ones of the same devbox.
    pub generation: u64,
    /// Messages for the agent's control stream.
    pub control: mpsc::Sender<Box<ControlMsg>>,
    /// The random instance id of the agent's connection (from its hello).
    pub instance: u64,
    /// The instance of the agent's previous accepted connection (from its hello); 0 if none.
    pub previous: u64,
}

impl AgentSession {
    /// Ends the session for good: the agent is told why and its connection closed.
    pub fn revoke(&self, why: &str) {
        let _ = self.control.try_send(Box::new(ControlMsg::GoAway(GoAway {
            reason: GoAwayReason::Revoked,
            message: why.into(),
        })));
        self.conn.close(close::REVOKED.into(), why.as_bytes());
    }

    /// Whether a hello with `instance` and `previous` comes from this session's agent,
    /// restarted or reconnecting, rather than from a second agent holding the same token (a
    /// cloned devbox): its `previous` is this session's instance (or, from an agent that draws
    /// its instance once per process, its `instance` is).
    pub fn continued_by(&self, instance: u64, previous: u64) -> bool {
        instance == self.instance || (previous != 0 && previous == self.instance)
    }
}

/// The result of attaching an agent session.
#[derive(Debug)]
pub struct Attached {
    /// The devbox the token belongs to.
    pub devbox_id: String,
    /// The new session's generation.
    pub generation: u64,
    /// The session it replaced, if any.
    pub replaced: Option<AgentSession>,
    /// The devbox's tunnel, as the welcome announces it.
    pub tunnel: Option<TunnelState>,
}

/// Why an agent could not attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    /// Unknown or revoked token.
    BadToken,
    /// Another agent holds the session and this one did not ask to take over.
    Busy,
}

/// A place in a devbox's queue of requests waiting for its agent.
#[derive(Debug)]
pub struct QueuePlace {
    registry: Arc<Registry>,
    devbox_id: String,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let mut waiting = self
            .registry
            .live
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = waiting.get_mut(&self.devbox_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                waiting.remove(&self.devbox_id);
            }
        }
    }
}

/// What the live half keeps beside the sessions themselves (which sit in the devboxes' entries,
/// under the registry's lock).
#[derive(Debug, Default)]
pub(super) struct Live {
    /// Woken at every attach.
    attached: Notify,
    /// Attaches so far, of any devbox: a request compares it with the count its route was
    /// read at (one atomic load) to learn whether any connection took over since, and looks
    /// its route up again only then.
    attaches: AtomicU64,
    /// Requests waiting for their agent, per devbox.
    waiting: Mutex<HashMap<String, usize>>,
    /// When the platform was last asked to wake a devbox whose agent has not attached since.
    waking: Mutex<HashMap<String, std::time::Instant>>,
    /// Where attaches and detaches go, on an edge of a cluster.
    presence: OnceLock<mpsc::UnboundedSender<PresenceEvent>>,
    /// Where the registry's events (agents, tunnels) go ([`Registry::set_events`]).
    events: OnceLock<Events>,
}

impl Registry {
    /// Finds the devbox an agent token belongs to and makes `make(generation)` its live
    /// session, in one step so that no admin call slips in between. `None`: unknown or revoked
    /// token.
    ///
    /// Without `takeover`, a live session of another agent (one the new session does not
    /// continue) stays and this one is refused ([`AttachError::Busy`]): an agent that was
    /// replaced waits its turn.
    pub fn attach(
        &self,
        token: &str,
        takeover: bool,
        make: impl FnOnce(u64) -> AgentSession,
    ) -> Result<Attached, AttachError> {
        let hash = Secret::new(token).hash();
        let mut inner = self.write();
        let id = inner
            .by_token
            .get(&hash.to_hex())
            .ok_or(AttachError::BadToken)?
            .clone();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let entry = inner.devboxes.get_mut(&id).ok_or(AttachError::BadToken)?;
        // The map lookup found the row by hash; compare once more in constant time.
        if entry.record.agent_token != hash {
            return Err(AttachError::BadToken);
        }
        let session = make(generation);
        if !takeover
            && entry
                .session
                .as_ref()
                .is_some_and(|live| !live.continued_by(session.instance, session.previous))
        {
            return Err(AttachError::Busy);
        }
        self.report(&id, generation, true);
        self.live
            .waking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let replaced = entry.session.replace(session);
        // A takeover is no news: the devbox stays connected here. Emitted under the lock, so
        // a detach and the next attach are announced in the order they happened.
        if replaced.is_none() {
            self.emit(Event::agent_connected(id.as_str()));
        }
        let tunnel = entry.record.tunnel.as_ref().map(|t| self.tunnel_state(t));
        // Counted under the write lock, so a route read under the read lock sees the session
        // and the count that go together.
        self.live.attaches.fetch_add(1, Ordering::Release);
        drop(inner);
        self.live.attached.notify_waiters();
        Ok(Attached {
            devbox_id: id,
            generation,
            replaced,
            tunnel,
        })
    }

    /// Attaches so far (see [`Route::attaches`](crate::registry::Route::attaches)).
    pub fn attaches(&self) -> u64 {
        self.live.attaches.load(Ordering::Acquire)
    }

    /// A future that completes at the next attach; create it before checking the route, so
    /// an attach in between is not missed.
    pub fn next_attach(&self) -> tokio::sync::futures::Notified<'_> {
        self.live.attached.notified()
    }

    /// Whether a request for `devbox_id`, whose agent is away, is the one to ask the platform
    /// to wake it: the first since the agent was last attached, or since a wake asked more than
    /// `within` ago (one the platform did not carry out).
    pub fn begin_wake(&self, devbox_id: &str, within: std::time::Duration) -> bool {
        let mut waking = self.live.waking.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match waking.get(devbox_id) {
            Some(asked) if now.duration_since(*asked) < within => false,
            _ => {
                waking.insert(devbox_id.to_owned(), now);
                true
            }
        }
    }

    /// Takes a place in a devbox's queue of requests waiting for its agent; `None` when the
    /// queue is full. The place is given back when the guard drops.
    pub fn queue(self: &Arc<Self>, devbox_id: &str, max: usize) -> Option<QueuePlace> {
        let mut waiting = self.live.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let n = waiting.entry(devbox_id.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(QueuePlace {
            registry: self.clone(),
            devbox_id: devbox_id.to_owned(),
        })
    }

    /// Forgets a session if it is still the devbox's current one (it closed, or its agent
    /// said go-away): new requests wait for the next one.
    pub fn detach(&self, devbox_id: &str, generation: u64) {
        let mut inner = self.write();
        match inner.devboxes.get_mut(devbox_id) {
            Some(entry) => {
                if entry
                    .session
                    .as_ref()
                    .is_some_and(|s| s.generation == generation)
                {
                    entry.session = None;
                    self.report(devbox_id, generation, false);
                    self.emit(Event::agent_disconnected(devbox_id));
                }
            }
            // Deleted meanwhile: its presence goes too.
            None => self.report(devbox_id, generation, false),
        }
    }

    /// Emits the registry's events to `events` from now on: `agent.connected` when a devbox
    /// gets a session on this edge and `agent.disconnected` when it has none left (a takeover
    /// is neither), and the `tunnel.*` changes made through this registry. Set once, before
    /// agents attach; later calls change nothing.
    pub fn set_events(&self, events: Events) {
        if self.live.events.set(events).is_err() {
            tracing::warn!("the registry's events were set twice; keeping the first");
        }
    }

    /// The events this registry emits to (set by [`Registry::set_events`]; until then, ones
    /// that go to their subscribers only).
    pub fn events(&self) -> &Events {
        self.live.events.get_or_init(Events::detached)
    }

    /// Emits `event` to the registry's events.
    pub fn emit(&self, event: Event) {
        if let Some(events) = self.live.events.get() {
            events.emit(event);
        }
    }

    /// Sends this edge's attaches and detaches to `presence` from now on (an edge of a
    /// cluster: the store's presence writer).
    pub fn report_presence(&self, presence: mpsc::UnboundedSender<PresenceEvent>) {
        let _ = self.live.presence.set(presence);
    }

    fn report(&self, devbox: &str, epoch: u64, present: bool) {
        if let Some(presence) = self.live.presence.get() {
            let _ = presence.send(PresenceEvent {
                devbox: devbox.to_owned(),
                epoch,
                present,
            });
        }
    }

    /// The devbox's agent connection on this edge, if it has a live one (for a request another
    /// edge forwards here).
    pub fn local_conn(&self, devbox_id: &str) -> Option<quinn::Connection> {
        self.read()
            .devboxes
            .get(devbox_id)?
            .session
            .as_ref()
            .filter(|s| s.conn.close_reason().is_none())
            .map(|s| s.conn.clone())
    }

    /// Every live session's devbox and generation (for a rewrite of this edge's presence).
    pub fn live_sessions(&self) -> Vec<(String, u64)> {
        self.read()
            .devboxes
            .values()
            .filter_map(|e| Some((e.record.id.clone(), e.session.as_ref()?.generation)))
            .collect()
    }

    /// Every live session, for a go-away at shutdown.
    pub fn sessions(&self) -> Vec<AgentSession> {
        self.read()
            .devboxes
            .values()
            .filter_map(|e| e.session.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::UrlBase;
    use crate::store::Sqlite;

    #[test]
    fn queue_places_are_bounded_per_devbox_and_given_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Sqlite::open(&dir.path().join("burrow.db")).expect("store"));
        let urls = UrlBase {
            scheme: "http",
            domain: "tunnel.example.com".into(),
            port_suffix: String::new(),
        };
        let registry = Registry::load(store, urls).expect("registry");
        let first = registry.queue("d1", 2).expect("first place");
        let _second = registry.queue("d1", 2).expect("second place");
        assert!(registry.queue("d1", 2).is_none(), "the queue is full");
        assert!(
            registry.queue("d2", 2).is_some(),
            "other devboxes have their own"
        );
        drop(first);
        assert!(
            registry.queue("d1", 2).is_some(),
            "a dropped place is given back"
        );
    }
}
