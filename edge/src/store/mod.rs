//! The durable store: devboxes, their agent token hashes and their tunnels. One interface,
//! [`Store`], and two engines: [`Sqlite`] in `state_dir` (the default, one edge) and
//! [`Postgres`] (`[cluster] store`, several edges sharing one database). Every write is durable
//! before the call returns, so an answer the admin API gives survives a restart. Secrets are
//! stored only as hashes.

use std::time::{SystemTime, UNIX_EPOCH};

use burrow_protocol::AuthMode;

use crate::secret::TokenHash;

mod follow;
mod postgres;
mod presence;
mod sqlite;

pub use follow::{Apply, Change, EdgeRow, through};
pub use postgres::{Postgres, StoreUrl};
pub use presence::{EDGE_DEAD_AFTER, EdgeAddrs, PresenceEvent, PresenceStats};
pub use sqlite::Sqlite;

/// The store's operations; both engines keep the same contract (`tests/tests/store.rs` runs
/// one suite against each). Calls block until the engine answers: the registry makes them
/// from `spawn_blocking` or at startup, never on the async workers' hot paths.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every devbox, oldest first.
    fn all(&self) -> Result<Vec<DevboxRecord>, StoreError>;
    /// One devbox.
    fn get(&self, id: &str) -> Result<Option<DevboxRecord>, StoreError>;
    /// Adds a devbox; [`StoreError::Exists`] if its id is taken.
    fn insert(&self, devbox: &DevboxRecord) -> Result<(), StoreError>;
    /// Sets or clears a devbox's tunnel. `false`: no such devbox.
    fn set_tunnel(&self, id: &str, tunnel: Option<&TunnelRecord>) -> Result<bool, StoreError>;
    /// Replaces a devbox's agent token hash. `false`: no such devbox.
    fn set_agent_token(&self, id: &str, token: &TokenHash) -> Result<bool, StoreError>;
    /// Removes a devbox. `false`: no such devbox.
    fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Whether the database answers, without waiting behind a write: `/readyz` asks this.
    fn ping(&self) -> Result<(), StoreError>;
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL could not be reached or did not answer in time: the call may succeed later.
    #[error("store: PostgreSQL is unavailable ({0}); try again once it is back")]
    Unavailable(String),
    /// PostgreSQL answered with an error.
    #[error("store: PostgreSQL: {0}")]
    Postgres(String),
    /// A row holds something this edge cannot read (edited by hand or corrupted).
    #[error("store: corrupt row for devbox `{0}`")]
    Corrupt(String),
    /// A devbox with this id exists already.
    #[error("devbox `{0}` exists already")]
    Exists(String),
    /// The store is busy with a write, and the last operation that reached it failed.
    #[error("store: the last operation failed: {0}")]
    Failing(String),
    /// The store's schema is newer than this edge knows.
    #[error(
        "store: the database is at schema version {found}, this edge knows up to {known}; \
         upgrade this edge"
    )]
    Newer {
        /// The database's version.
        found: i32,
        /// The newest this edge knows.
        known: i32,
    },
}

impl StoreError {
    /// Whether the call may succeed once the database is back (the admin API answers 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Failing(_))
    }
}

/// A devbox as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevboxRecord {
    /// Its id.
    pub id: String,
    /// Hash of its agent token.
    pub agent_token: TokenHash,
    /// Unix seconds.
    pub created_at: i64,
    /// Its tunnel, if enabled.
    pub tunnel: Option<TunnelRecord>,
}

/// A tunnel as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRecord {
    /// The key in its URLs.
    pub key: String,
    /// Who may use it.
    pub auth_mode: AuthMode,
    /// Hash of its bearer token (authenticated tunnels only).
    pub auth_token: Option<TokenHash>,
    /// Requests reach the service with `Host: localhost:{port}` (for dev servers that refuse
    /// other hosts); `X-Forwarded-Host` keeps the public one.
    pub rewrite_host: bool,
    /// `burrow connect` may reach raw TCP ports through an open tunnel (an authenticated one
    /// always allows it: its token already stands for the devbox's owner).
    pub raw_tcp: bool,
    /// Traffic through the tunnel counts as the devbox's activity (`last_activity_ms`, the
    /// `devbox.activity` event), so the platform does not suspend a devbox in use.
    pub http_keep_alive: bool,
    /// A request while the agent is away asks the platform to wake the devbox
    /// (`devbox.wake`) and waits for it up to `platform.wake_wait`.
    pub wake_on_http: bool,
    /// When the tunnel was first enabled, Unix milliseconds (a tunnel stored before this was
    /// kept: its devbox's creation).
    pub created_ms: i64,
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A devbox's tunnel as the columns both engines store, in this order after the devbox's own:
/// `tunnel_key, auth_mode, auth_token_hash, rewrite_host, raw_tcp, http_keep_alive,
/// wake_on_http, tunnel_created_ms`.
struct Columns {
    key: Option<String>,
    mode: Option<&'static str>,
    token: Option<String>,
    rewrite_host: bool,
    raw_tcp: bool,
    http_keep_alive: bool,
    wake_on_http: bool,
    created_ms: Option<i64>,
}

fn tunnel_columns(tunnel: Option<&TunnelRecord>) -> Columns {
    match tunnel {
        None => Columns {
            key: None,
            mode: None,
            token: None,
            rewrite_host: false,
            raw_tcp: false,
            http_keep_alive: true,
            wake_on_http: false,
            created_ms: None,
        },
        Some(t) => Columns {
            key: Some(t.key.clone()),
            mode: Some(t.auth_mode.as_str()),
            token: t.auth_token.map(|h| h.to_hex()),
            rewrite_host: t.rewrite_host,
            raw_tcp: t.raw_tcp,
            http_keep_alive: t.http_keep_alive,
            wake_on_http: t.wake_on_http,
            created_ms: Some(t.created_ms),
        },
    }
}

/// One devbox row as either engine returns it, before it is checked.
struct RawRow {
    id: String,
    agent_token: String,
    created_at: i64,
    key: Option<String>,
    mode: Option<String>,
    auth: Option<String>,
    rewrite_host: bool,
    raw_tcp: bool,
    http_keep_alive: bool,
    wake_on_http: bool,
    created_ms: Option<i64>,
}

impl RawRow {
    /// The record, or [`StoreError::Corrupt`] naming the devbox.
    fn parse(self) -> Result<DevboxRecord, StoreError> {
        let corrupt = || StoreError::Corrupt(self.id.clone());
        let agent_token = TokenHash::from_hex(&self.agent_token).ok_or_else(corrupt)?;
        let tunnel = match (self.key, self.mode) {
            (Some(key), Some(mode)) => {
                let auth_mode: AuthMode = mode.parse().map_err(|_| corrupt())?;
                let auth_token = match &self.auth {
                    Some(h) => Some(TokenHash::from_hex(h).ok_or_else(corrupt)?),
                    None => None,
                };
                if (auth_mode == AuthMode::Authenticated) != auth_token.is_some() {
                    return Err(corrupt());
                }
                Some(TunnelRecord {
                    key,
                    auth_mode,
                    auth_token,
                    rewrite_host: self.rewrite_host,
                    raw_tcp: self.raw_tcp,
                    http_keep_alive: self.http_keep_alive,
                    wake_on_http: self.wake_on_http,
                    created_ms: self
                        .created_ms
                        .unwrap_or(self.created_at.saturating_mul(1000)),
                })
            }
            (None, None) => None,
            _ => return Err(corrupt()),
        };
        Ok(DevboxRecord {
            id: self.id,
            agent_token,
            created_at: self.created_at,
            tunnel,
        })
    }
}
