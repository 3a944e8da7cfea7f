//! The edge's view of every devbox: what the store holds (ids, token hashes, tunnels), indexed
//! in memory for the hot paths (tunnel key -> devbox, agent token -> devbox), and the live
//! agent session of each devbox (in `registry/sessions.rs`: attach, detach, the requests
//! waiting for an agent).
//!
//! Every change goes to the [`Store`] first and to memory second, so an answer the admin API
//! gives is already durable. Changes are blocking (SQLite with fsync, or a PostgreSQL round
//! trip): call them from `spawn_blocking`, never on the async workers. With a cluster store,
//! the changes other edges make arrive through [`Registry::apply`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use burrow_protocol::{AuthMode, ControlMsg, TunnelState};

use crate::activity::Activity;
use crate::platform::Event;
use crate::secret::{self, Secret, TokenHash};
use crate::store::{Change, DevboxRecord, Store, StoreError, TunnelRecord, now_unix};

mod sessions;
mod tunnels;

use sessions::Live;
pub use sessions::{AgentSession, AttachError, Attached, QueuePlace};
pub use tunnels::TunnelSpec;
use tunnels::{issue_record, issue_tunnel};

/// How public URLs are written: `{scheme}://{port}-{key}.{domain}{suffix}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlBase {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The tunnel domain.
    pub domain: String,
    /// `:8080`, or empty for the scheme's default port.
    pub port_suffix: String,
}

impl UrlBase {
    /// The URL template of a tunnel, with a literal `{port}`.
    pub fn template(&self, key: &str) -> String {
        format!(
            "{}://{{port}}-{key}.{}{}",
            self.scheme, self.domain, self.port_suffix
        )
    }
}

/// What a request needs to know of its tunnel key: the route step's one registry lookup.
#[derive(Debug, Clone)]
pub struct Route {
    /// The devbox.
    pub devbox_id: String,
    /// Access mode.
    pub auth_mode: AuthMode,
    /// The bearer token's hash, for authenticated tunnels.
    pub auth_token: Option<TokenHash>,
    /// Send `Host: localhost:{port}` to the service.
    pub rewrite_host: bool,
    /// `burrow connect` may reach raw TCP ports (always so on an authenticated tunnel).
    pub raw_tcp: bool,
    /// Where traffic on this tunnel is recorded as the devbox's activity (`http_keep_alive`).
    pub activity: Option<Activity>,
    /// A request while the agent is away asks the platform to wake the devbox.
    pub wake_on_http: bool,
    /// The agent's connection, if it is connected.
    pub conn: Option<quinn::Connection>,
    /// The registry's attach count when this was read: while it stays the same, `conn` is
    /// still the devbox's current connection (if it has not closed).
    pub attaches: u64,
}

/// A devbox as the admin API shows it.
#[derive(Debug, Clone)]
pub struct DevboxView {
    /// The stored record.
    pub record: DevboxRecord,
    /// When the current agent session started, if connected.
    pub connected_since: Option<SystemTime>,
    /// The current session's RTT.
    pub rtt: Option<std::time::Duration>,
    /// When traffic last crossed the tunnel (`http_keep_alive` tunnels), Unix milliseconds.
    pub last_activity_ms: Option<i64>,
}

/// A tunnel as handed out by an enable call: the token appears here once.
#[derive(Debug, Clone)]
pub struct IssuedTunnel {
    /// The stored tunnel.
    pub record: TunnelRecord,
    /// The bearer token, for authenticated tunnels.
    pub auth_token: Option<Secret>,
}

/// An admin operation's failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No devbox has this id.
    #[error("no devbox `{0}`")]
    NotFound(String),
    /// The OS RNG failed.
    #[error("cannot generate a secret: {0}")]
    Random(#[from] getrandom::Error),
    /// The devbox has no tunnel.
    #[error("devbox `{0}` has no tunnel; enable one with POST /v1/devboxes/{0}/tunnel")]
    NoTunnel(String),
    /// The tunnel is open: it has no token.
    #[error("the tunnel of devbox `{0}` is open and has no token; make it authenticated first")]
    OpenTunnel(String),
}

#[derive(Debug, Default)]
struct Inner {
    devboxes: HashMap<String, Entry>,
    by_key: HashMap<String, String>,
    by_token: HashMap<String, String>,
    next_generation: u64,
}

#[derive(Debug)]
struct Entry {
    record: DevboxRecord,
    session: Option<AgentSession>,
    activity: Activity,
}

/// All devboxes, their tunnels and their live sessions.
#[derive(Debug)]
pub struct Registry {
    store: Arc<dyn Store>,
    urls: UrlBase,
    inner: RwLock<Inner>,
    writer: Mutex<()>,
    live: Live,
    /// On an edge of a cluster: notified whenever changes read from the store were applied.
    applied: tokio::sync::Notify,
    /// Whether this edge follows a store other edges write ([`Registry::follows_others`]).
    followed: std::sync::atomic::AtomicBool,
}

impl Registry {
    /// Loads every devbox from the store.
    pub fn load(store: Arc<dyn Store>, urls: UrlBase) -> Result<Arc<Registry>, StoreError> {
        let mut inner = Inner::default();
        for record in store.all()? {
            inner.index(&record);
            inner.devboxes.insert(record.id.clone(), Entry::new(record));
        }
        Ok(Arc::new(Registry {
            store,
            urls,
            inner: RwLock::new(inner),
            writer: Mutex::new(()),
            live: Live::default(),
            applied: tokio::sync::Notify::new(),
            followed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    // A poisoned lock means a panic elsewhere while holding it; the maps themselves are
    // updated in single statements, so they are still consistent.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Serializes changes: held across a store write and the memory update after it, so the
    /// read lock that every request takes is never held across disk I/O.
    fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How URLs are written.
    pub fn urls(&self) -> &UrlBase {
        &self.urls
    }

    /// The tunnel state an agent is told about.
    pub fn tunnel_state(&self, tunnel: &TunnelRecord) -> TunnelState {
        TunnelState {
            key: tunnel.key.clone(),
            auth_mode: tunnel.auth_mode,
            url_template: self.urls.template(&tunnel.key),
        }
    }

    /// Looks up a tunnel key for the proxy.
    pub fn route(&self, key: &str) -> Option<Route> {
        let inner = self.read();
        let entry = inner.devboxes.get(inner.by_key.get(key)?)?;
        let tunnel = entry.record.tunnel.as_ref()?;
        Some(Route {
            devbox_id: entry.record.id.clone(),
            auth_mode: tunnel.auth_mode,
            auth_token: tunnel.auth_token,
            rewrite_host: tunnel.rewrite_host,
            raw_tcp: tunnel.raw_tcp || tunnel.auth_mode == AuthMode::Authenticated,
            activity: tunnel.http_keep_alive.then(|| entry.activity.clone()),
            wake_on_http: tunnel.wake_on_http,
            // A connection that already failed is as good as none: wait for the next.
            conn: entry
                .session
                .as_ref()
                .filter(|s| s.conn.close_reason().is_none())
                .map(|s| s.conn.clone()),
            attaches: self.attaches(),
        })
    }

    /// Every devbox, oldest first.
    pub fn list(&self) -> Vec<DevboxView> {
        let inner = self.read();
        let mut out: Vec<DevboxView> = inner.devboxes.values().map(Entry::view).collect();
        out.sort_by(|a, b| {
            (a.record.created_at, &a.record.id).cmp(&(b.record.created_at, &b.record.id))
        });
        out
    }

    /// Every devbox with traffic through its tunnel so far (`http_keep_alive`), and when it
    /// last crossed, Unix milliseconds.
    pub fn activities(&self) -> Vec<(String, i64)> {
        let inner = self.read();
        let seen = inner.devboxes.iter();
        seen.filter_map(|(id, e)| Some((id.clone(), e.activity.last_ms()?)))
            .collect()
    }

    /// One devbox.
    pub fn get(&self, id: &str) -> Option<DevboxView> {
        self.read().devboxes.get(id).map(Entry::view)
    }

    /// Registers a devbox, optionally with a tunnel. Returns its agent token (once).
    pub fn create(
        &self,
        id: Option<String>,
        tunnel: Option<TunnelSpec>,
    ) -> Result<(DevboxRecord, Secret, Option<IssuedTunnel>), RegistryError> {
        let id = match id {
            Some(id) => id,
            None => format!("dbx-{}", &secret::tunnel_key()?[..16]),
        };
        let token = Secret::generate()?;
        let issued = tunnel.map(issue_tunnel).transpose()?;
        let record = DevboxRecord {
            id: id.clone(),
            agent_token: token.hash(),
            created_at: now_unix(),
            tunnel: issued.as_ref().map(|t| t.record.clone()),
        };
        let _writer = self.writer();
        self.store.insert(&record)?;
        let mut inner = self.write();
        inner.index(&record);
        inner
            .devboxes
            .insert(id.clone(), Entry::new(record.clone()));
        if issued.is_some() {
            self.emit(Event::tunnel_enabled(id));
        }
        Ok((record, token, issued))
    }

    /// Enables a devbox's tunnel or changes its mode and options. The key stays the same for
    /// the life of the tunnel. Enabling it again in the mode it has issues no token (the
    /// current one keeps working; an option given is applied); a tunnel that becomes
    /// authenticated gets a fresh token, returned here once. An option not given keeps its
    /// current value (off for a new tunnel).
    pub fn enable_tunnel(&self, id: &str, spec: TunnelSpec) -> Result<IssuedTunnel, RegistryError> {
        let _writer = self.writer();
        let existing = self.tunnel_record(id)?;
        // Options not named keep their current values (the defaults for a new tunnel).
        let spec = spec.or(existing.as_ref());
        if let Some(existing) = existing.clone().filter(|t| t.auth_mode == spec.auth_mode) {
            let fresh = issue_record(spec, existing.key.clone(), None);
            let record = TunnelRecord {
                auth_token: existing.auth_token,
                created_ms: existing.created_ms,
                ..fresh
            };
            if record != existing {
                self.set_tunnel(id, &record)?;
                self.emit(Event::tunnel_enabled(id));
            }
            return Ok(IssuedTunnel {
                record,
                auth_token: None,
            });
        }
        let mut issued = issue_tunnel(spec)?;
        if let Some(existing) = existing {
            issued.record.key = existing.key;
            issued.record.created_ms = existing.created_ms;
        }
        self.set_tunnel(id, &issued.record)?;
        self.emit(Event::tunnel_enabled(id));
        Ok(issued)
    }

    /// Issues a new bearer token for an authenticated tunnel; the previous one stops working
    /// at once. The key, the agent's session and running requests are untouched.
    pub fn rotate_tunnel_token(&self, id: &str) -> Result<IssuedTunnel, RegistryError> {
        let _writer = self.writer();
        let Some(existing) = self.tunnel_record(id)? else {
            return Err(RegistryError::NoTunnel(id.to_owned()));
        };
        if existing.auth_mode != AuthMode::Authenticated {
            return Err(RegistryError::OpenTunnel(id.to_owned()));
        }
        let token = Secret::generate()?;
        let record = TunnelRecord {
            auth_token: Some(token.hash()),
            ..existing
        };
        self.set_tunnel(id, &record)?;
        self.emit(Event::tunnel_rotated(id));
        Ok(IssuedTunnel {
            record,
            auth_token: Some(token),
        })
    }

    /// Issues a new agent token; the previous one is refused from now on. The agent's live
    /// session stays connected (its tunnel keeps serving); its next connection needs the new
    /// token.
    pub fn rotate_agent_token(&self, id: &str) -> Result<Secret, RegistryError> {
        let _writer = self.writer();
        if !self.read().devboxes.contains_key(id) {
            return Err(RegistryError::NotFound(id.to_owned()));
        }
        let token = Secret::generate()?;
        let hash = token.hash();
        self.store.set_agent_token(id, &hash)?;
        let mut inner = self.write();
        if let Some(mut entry) = inner.devboxes.remove(id) {
            inner.unindex(&entry.record);
            entry.record.agent_token = hash;
            inner.index(&entry.record);
            inner.devboxes.insert(id.to_owned(), entry);
        }
        Ok(token)
    }

    /// The devbox's tunnel as stored.
    fn tunnel_record(&self, id: &str) -> Result<Option<TunnelRecord>, RegistryError> {
        Ok(self
            .read()
            .devboxes
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?
            .record
            .tunnel
            .clone())
    }

    /// Stores a tunnel and tells the agent (the caller holds the writer lock).
    fn set_tunnel(&self, id: &str, record: &TunnelRecord) -> Result<(), RegistryError> {
        self.store.set_tunnel(id, Some(record))?;
        let state = self.tunnel_state(record);
        let mut inner = self.write();
        let entry = inner.set_tunnel(id, Some(record.clone()));
        notify(entry, ControlMsg::TunnelUpdate(Some(state)));
        Ok(())
    }

    /// Disables a devbox's tunnel: its URLs answer 404 from now on.
    pub fn disable_tunnel(&self, id: &str) -> Result<(), RegistryError> {
        let _writer = self.writer();
        let had = self.tunnel_record(id)?.is_some();
        self.store.set_tunnel(id, None)?;
        let mut inner = self.write();
        let entry = inner.set_tunnel(id, None);
        notify(entry, ControlMsg::TunnelUpdate(None));
        if had {
            self.emit(Event::tunnel_disabled(id));
        }
        Ok(())
    }

    /// Deletes a devbox: its token is revoked and its agent's session returned for closing.
    pub fn delete(&self, id: &str) -> Result<Option<AgentSession>, RegistryError> {
        let _writer = self.writer();
        if !self.read().devboxes.contains_key(id) {
            return Err(RegistryError::NotFound(id.to_owned()));
        }
        self.store.delete(id)?;
        let mut inner = self.write();
        let Some(entry) = inner.devboxes.remove(id) else {
            return Ok(None);
        };
        inner.unindex(&entry.record);
        if entry.session.is_some() {
            // Its connection's end finds no devbox: announced here, once.
            self.emit(Event::agent_disconnected(id));
        }
        Ok(entry.session)
    }

    /// Brings memory in line with the store after another edge changed it (the devboxes of a
    /// [`Change`]; presence is [`crate::cluster::ClusterView`]'s): each devbox as it is stored now (a tunnel changed reaches its agent here as it would on the edge that made
    /// the change; a devbox deleted has its agent's session revoked).
    pub fn apply(&self, change: Change) {
        let _writer = self.writer();
        let changed = match change {
            Change::Some { devboxes, .. } => devboxes,
            Change::Edges(_) => return,
            Change::All {
                devboxes: records, ..
            } => {
                let mut changed: Vec<(String, Option<DevboxRecord>)> = {
                    let inner = self.read();
                    inner
                        .devboxes
                        .keys()
                        .filter(|id| !records.iter().any(|r| &&r.id == id))
                        .map(|id| (id.clone(), None))
                        .collect()
                };
                changed.extend(records.into_iter().map(|r| (r.id.clone(), Some(r))));
                changed
            }
        };
        for (id, record) in changed {
            self.apply_one(&id, record);
        }
        self.applied.notify_waiters();
    }

    /// Marks this registry as following a store other edges write ([`Registry::catch_up`]).
    pub fn follows_others(&self) {
        self.followed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A future that completes when the next changes of other edges have been applied;
    /// `None` on an edge that follows no shared store (nothing will come). Create it (and
    /// `enable` it) before looking for what the changes may bring, so changes applied in
    /// between are not missed.
    pub fn next_applied(&self) -> Option<tokio::sync::futures::Notified<'_>> {
        self.followed
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| self.applied.notified())
    }

    /// [`Registry::apply`] for one devbox (the caller holds the writer lock).
    fn apply_one(&self, id: &str, record: Option<DevboxRecord>) {
        let mut inner = self.write();
        let Some(record) = record else {
            if let Some(entry) = inner.devboxes.remove(id) {
                inner.unindex(&entry.record);
                if let Some(session) = entry.session {
                    self.emit(Event::agent_disconnected(id));
                    session.revoke("the devbox was deleted");
                }
            }
            return;
        };
        let Some(mut entry) = inner.devboxes.remove(id) else {
            inner.index(&record);
            inner.devboxes.insert(id.to_owned(), Entry::new(record));
            return;
        };
        let tunnel_changed = entry.record.tunnel != record.tunnel;
        inner.unindex(&entry.record);
        inner.index(&record);
        entry.record = record;
        if tunnel_changed {
            let state = entry.record.tunnel.as_ref().map(|t| self.tunnel_state(t));
            notify(Some(&entry), ControlMsg::TunnelUpdate(state));
        }
        inner.devboxes.insert(id.to_owned(), entry);
    }

    /// Whether the store answers (for `/readyz`).
    pub fn store_ok(&self) -> Result<(), StoreError> {
        self.store.ping()
    }
}

fn notify(entry: Option<&Entry>, msg: ControlMsg) {
    if let Some(session) = entry.and_then(|e| e.session.as_ref()) {
        // A full queue means the agent is not reading its control stream; it gets the state
        // again in the welcome of its next session.
        let _ = session.control.try_send(Box::new(msg));
    }
}

impl Inner {
    fn index(&mut self, record: &DevboxRecord) {
        self.by_token
            .insert(record.agent_token.to_hex(), record.id.clone());
        if let Some(t) = &record.tunnel {
            self.by_key.insert(t.key.clone(), record.id.clone());
        }
    }

    fn unindex(&mut self, record: &DevboxRecord) {
        self.by_token.remove(&record.agent_token.to_hex());
        if let Some(t) = &record.tunnel {
            self.by_key.remove(&t.key);
        }
    }

    fn set_tunnel(&mut self, id: &str, tunnel: Option<TunnelRecord>) -> Option<&Entry> {
        let old = self.devboxes.get(id)?.record.tunnel.clone();
        if let Some(old) = old {
            self.by_key.remove(&old.key);
        }
        if let Some(t) = &tunnel {
            self.by_key.insert(t.key.clone(), id.to_owned());
        }
        let entry = self.devboxes.get_mut(id)?;
        entry.record.tunnel = tunnel;
        Some(entry)
    }
}

impl Entry {
    fn new(record: DevboxRecord) -> Entry {
        Entry {
            record,
            session: None,
            activity: Activity::default(),
        }
    }

    fn view(&self) -> DevboxView {
        DevboxView {
            record: self.record.clone(),
            connected_since: self.session.as_ref().map(|s| s.since),
            rtt: self.session.as_ref().map(|s| s.conn.rtt()),
            last_activity_ms: self.activity.last_ms(),
        }
    }
}
