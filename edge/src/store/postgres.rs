//! The shared engine: PostgreSQL, for several edges serving one domain (`[cluster] store`).
//!
//! The store's calls are blocking, like SQLite's; this engine runs its connection on a runtime
//! of its own (one thread, `burrow-store`) and the caller waits on a channel for the answer, so
//! a call is safe from any thread, async or not. Every call has [`OP_TIMEOUT`]: a database that
//! stops answering fails the call with [`StoreError::Unavailable`] (the admin API's 503)
//! instead of hanging it, and the connection is made again on the next call. A health check
//! every [`HEALTH_EVERY`] keeps [`Store::ping`] current without waiting on anything.
//!
//! Writes are transactions that also append the devbox's id to `devbox_changes` and send a
//! `NOTIFY`; every edge follows that log ([`super::follow`]). Writers take one advisory lock,
//! so changes commit in the order of their sequence numbers and a follower that read up to
//! `seq` has seen every change before it. Admin writes are rare; the lock costs nothing there.
//!
//! A write whose commit was sent but not answered within the timeout reports unavailable and may
//! still have been committed: the follower shows its effect either way.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use tracing::{debug, info};

use super::{DevboxRecord, RawRow, Store, StoreError, TunnelRecord, tunnel_columns};
use crate::secret::TokenHash;

/// How long one call may take, connecting included.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the health check asks the database.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// The advisory lock every write transaction holds until it commits.
pub(super) const WRITE_LOCK: i64 = 0x6275_7272_6f77_0001;
/// The advisory lock held while migrating, so edges starting together migrate once.
const MIGRATE_LOCK: i64 = 0x6275_7272_6f77_0002;
/// The channel a write notifies.
pub const CHANNEL: &str = "burrow_changes";

/// The schema, one entry per version; an entry never changes once released.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE devboxes (
    id TEXT PRIMARY KEY,
    agent_token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    tunnel_key TEXT UNIQUE,
    auth_mode TEXT,
    auth_token_hash TEXT,
    rewrite_host BOOLEAN NOT NULL DEFAULT false,
    raw_tcp BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE devbox_changes (
    seq BIGSERIAL PRIMARY KEY,
    devbox TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX devbox_changes_at ON devbox_changes (at);
CREATE TABLE cluster_secrets (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
",
    "
ALTER TABLE devbox_changes ADD COLUMN node TEXT;
CREATE TABLE presence (
    devbox TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    PRIMARY KEY (devbox, node)
);
CREATE TABLE edges (
    node TEXT PRIMARY KEY,
    last_seen TIMESTAMPTZ NOT NULL,
    agents BIGINT NOT NULL DEFAULT 0
);
",
    "
ALTER TABLE edges ADD COLUMN mesh_addr TEXT;
",
    "
ALTER TABLE edges ADD COLUMN agents_addr TEXT;
",
    "
ALTER TABLE devboxes ADD COLUMN http_keep_alive BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE devboxes ADD COLUMN wake_on_http BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE devboxes ADD COLUMN tunnel_created_ms BIGINT;
",
];

/// Every column of a devbox, in the order [`row`] reads them.
pub(super) const COLUMNS: &str = "id, agent_token_hash, created_at, tunnel_key, auth_mode, \
                                  auth_token_hash, rewrite_host, raw_tcp, http_keep_alive, \
                                  wake_on_http, tunnel_created_ms";

/// A PostgreSQL URL (`postgres://user:password@host:port/database`), checked; its password
/// never appears in messages or logs.
#[derive(Clone)]
pub struct StoreUrl {
    config: tokio_postgres::Config,
    shown: String,
}

impl FromStr for StoreUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("not a PostgreSQL URL (postgres://user@host/database): {e}"))?;
        if config.get_hosts().is_empty() {
            return Err("names no host (postgres://user@host/database)".into());
        }
        let shown = shown(&config);
        Ok(StoreUrl { config, shown })
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// `postgres://user@host:port/database`, without the password.
fn shown(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// A PostgreSQL client's result.
pub(super) type PgResult<T> = Result<T, tokio_postgres::Error>;

/// One operation on the connection: a closure that borrows it for the future it returns.
pub(super) trait Op<T>:
    for<'c> FnOnce(&'c mut Client) -> BoxFuture<'c, PgResult<T>> + Send + 'static
{
}

impl<T, F> Op<T> for F where
    F: for<'c> FnOnce(&'c mut Client) -> BoxFuture<'c, PgResult<T>> + Send + 'static
{
}

/// The PostgreSQL engine.
pub struct Postgres {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.shared.url)
            .finish_non_exhaustive()
    }
}

/// What the engine's tasks share.
pub(super) struct Shared {
    pub(super) url: StoreUrl,
    client: tokio::sync::Mutex<Option<Client>>,
    last_failure: Mutex<Option<String>>,
}

impl Postgres {
    /// Connects to the database at `url` and brings its schema up to date. Fails when the
    /// database cannot be reached: an edge of a cluster does not start without its store.
    pub fn connect(url: &StoreUrl) -> Result<Postgres, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("burrow-store")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the store's thread: {e}"))
            })?;
        let shared = Arc::new(Shared {
            url: url.clone(),
            client: tokio::sync::Mutex::new(None),
            last_failure: Mutex::new(None),
        });
        let engine = Postgres {
            runtime: Some(runtime),
            shared: shared.clone(),
        };
        let migrating = shared.clone();
        engine.block(async move { migrating.with(|c| Box::pin(migrate(c))).await? })?;
        engine.spawn(health(shared));
        info!(store = %url, "cluster store ready");
        Ok(engine)
    }

    /// Runs `task` on the engine's runtime.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Some(runtime) = &self.runtime {
            runtime.spawn(task);
        }
    }

    /// The engine's shared state, for the follower.
    pub(super) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs `task` on the engine's runtime and waits for its answer, from any thread.
    fn block<T: Send + 'static>(
        &self,
        task: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = tx.send(task.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the store's thread stopped".into())))
    }

    /// Runs one store operation and records how it went for [`Store::ping`].
    fn op<T: Send + 'static>(&self, op: impl Op<T>) -> Result<T, StoreError> {
        let shared = self.shared.clone();
        let result = self.block(async move { shared.with(op).await });
        self.shared.record(&result);
        result
    }

    /// The newest change's sequence number (0 for none): a follower started after reading the
    /// devboxes continues from a number read before it.
    pub fn last_change(&self) -> Result<i64, StoreError> {
        self.op(|c| {
            Box::pin(async move {
                let row = c
                    .query_one("SELECT coalesce(max(seq), 0) FROM devbox_changes", &[])
                    .await?;
                row.try_get(0)
            })
        })
    }

    /// The cluster's secret `name`: the one stored, or `fresh` if there was none (the first
    /// edge to ask stores it; every edge gets the same value).
    pub fn cluster_secret(&self, name: &str, fresh: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let name = name.to_owned();
        self.op(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO cluster_secrets (name, value) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING",
                    &[&name, &fresh],
                )
                .await?;
                let row = c
                    .query_one(
                        "SELECT value FROM cluster_secrets WHERE name = $1",
                        &[&name],
                    )
                    .await?;
                row.try_get(0)
            })
        })
    }

    /// A write of one devbox's row, logged as a change of it; the rows it touched.
    fn change(
        &self,
        devbox: &str,
        sql: &'static str,
        params: Vec<Box<dyn ToSql + Send + Sync>>,
    ) -> Result<u64, StoreError> {
        let devbox = devbox.to_owned();
        self.op(move |c| {
            Box::pin(async move {
                let params: Vec<&(dyn ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                    .await?;
                let n = tx.execute(sql, &params).await?;
                if n > 0 {
                    tx.execute(
                        "INSERT INTO devbox_changes (devbox) VALUES ($1)",
                        &[&devbox],
                    )
                    .await?;
                    tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
                }
                tx.commit().await?;
                Ok(n)
            })
        })
    }
}

impl Store for Postgres {
    fn all(&self) -> Result<Vec<DevboxRecord>, StoreError> {
        self.op(|c| {
            Box::pin(async move {
                let sql = format!("SELECT {COLUMNS} FROM devboxes ORDER BY created_at, id");
                let rows = c.query(&sql, &[]).await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    out.extend(row(r, 0)?);
                }
                Ok(out.into_iter().collect::<Result<Vec<_>, _>>())
            })
        })?
    }

    fn get(&self, id: &str) -> Result<Option<DevboxRecord>, StoreError> {
        let id = id.to_owned();
        let found = self.op(move |c| {
            Box::pin(async move {
                let sql = format!("SELECT {COLUMNS} FROM devboxes WHERE id = $1");
                match c.query_opt(&sql, &[&id]).await? {
                    Some(r) => row(&r, 0),
                    None => Ok(None),
                }
            })
        })?;
        found.transpose()
    }

    fn insert(&self, devbox: &DevboxRecord) -> Result<(), StoreError> {
        let t = tunnel_columns(devbox.tunnel.as_ref());
        let n = self.change(
            &devbox.id,
            "INSERT INTO devboxes
             (id, agent_token_hash, created_at, tunnel_key, auth_mode, auth_token_hash,
              rewrite_host, raw_tcp, http_keep_alive, wake_on_http, tunnel_created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
            vec![
                Box::new(devbox.id.clone()),
                Box::new(devbox.agent_token.to_hex()),
                Box::new(devbox.created_at),
                Box::new(t.key),
                Box::new(t.mode),
                Box::new(t.token),
                Box::new(t.rewrite_host),
                Box::new(t.raw_tcp),
                Box::new(t.http_keep_alive),
                Box::new(t.wake_on_http),
                Box::new(t.created_ms),
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(devbox.id.clone()));
        }
        Ok(())
    }

    fn set_tunnel(&self, id: &str, tunnel: Option<&TunnelRecord>) -> Result<bool, StoreError> {
        let t = tunnel_columns(tunnel);
        let n = self.change(
            id,
            "UPDATE devboxes SET tunnel_key = $2, auth_mode = $3, auth_token_hash = $4,
             rewrite_host = $5, raw_tcp = $6, http_keep_alive = $7, wake_on_http = $8,
             tunnel_created_ms = $9 WHERE id = $1",
            vec![
                Box::new(id.to_owned()),
                Box::new(t.key),
                Box::new(t.mode),
                Box::new(t.token),
                Box::new(t.rewrite_host),
                Box::new(t.raw_tcp),
                Box::new(t.http_keep_alive),
                Box::new(t.wake_on_http),
                Box::new(t.created_ms),
            ],
        )?;
        Ok(n > 0)
    }

    fn set_agent_token(&self, id: &str, token: &TokenHash) -> Result<bool, StoreError> {
        let n = self.change(
            id,
            "UPDATE devboxes SET agent_token_hash = $2 WHERE id = $1",
            vec![Box::new(id.to_owned()), Box::new(token.to_hex())],
        )?;
        Ok(n > 0)
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.change(
            id,
            "DELETE FROM devboxes WHERE id = $1",
            vec![Box::new(id.to_owned())],
        )?;
        Ok(n > 0)
    }

    /// Whether the last call or health check (at most [`HEALTH_EVERY`] ago) reached the
    /// database; never waits.
    fn ping(&self) -> Result<(), StoreError> {
        match self
            .shared
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(why) => Err(StoreError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async caller may not do; its tasks only hold
        // connections, which close with it.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Shared {
    /// The database's connection settings.
    pub(super) fn url_config(&self) -> &tokio_postgres::Config {
        &self.url.config
    }

    /// A new connection, its I/O driven by a task of its own.
    pub(super) async fn connect(&self) -> Result<Client, StoreError> {
        let connecting = tokio::time::timeout(CONNECT_TIMEOUT, self.url.config.connect(NoTls));
        let (client, connection) = connecting
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "{} did not answer within {CONNECT_TIMEOUT:?}",
                    self.url
                ))
            })?
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.url)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "the store's connection ended");
            }
        });
        Ok(client)
    }

    /// Runs `op` on the connection (made first if there is none or it closed), within
    /// [`OP_TIMEOUT`]; a connection that failed or timed out is dropped.
    pub(super) async fn with<T>(&self, op: impl Op<T>) -> Result<T, StoreError> {
        let mut slot = self.client.lock().await;
        let attempt = async {
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = Some(self.connect().await?);
            }
            let Some(client) = slot.as_mut() else {
                return Err(StoreError::Unavailable("no connection".into()));
            };
            op(client).await.map_err(|e| classify(&self.url, &e))
        };
        let result = match tokio::time::timeout(OP_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{} did not answer within {OP_TIMEOUT:?}",
                self.url
            ))),
        };
        if matches!(result, Err(StoreError::Unavailable(_))) {
            *slot = None;
        }
        result
    }

    /// Remembers whether the database failed (not whether a call was refused for its input).
    fn record<T>(&self, result: &Result<T, StoreError>) {
        let failure = match result {
            Err(StoreError::Unavailable(why)) => Some(why.clone()),
            _ => None,
        };
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = failure;
    }
}

/// Asks the database every [`HEALTH_EVERY`], so [`Store::ping`] is current and a database that
/// came back is connected to before the next admin call.
async fn health(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(HEALTH_EVERY).await;
        let result = shared
            .with(|c| Box::pin(async move { c.simple_query("SELECT 1").await.map(drop) }))
            .await;
        shared.record(&result);
    }
}

/// A client error as a store error: lost or refused connections, timeouts and a server
/// shutting down are [`StoreError::Unavailable`]; the rest is what the server said.
fn classify(url: &StoreUrl, e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // 08: connection exceptions; 57P0x: the server shutting down or starting.
            if code.starts_with("08") || code.starts_with("57P") {
                StoreError::Unavailable(format!("{url}: {}", db.message()))
            } else {
                StoreError::Postgres(format!("{} ({code})", db.message()))
            }
        }
        None => StoreError::Unavailable(format!("{url}: {e}")),
    }
}

/// Brings the schema up to date, under an advisory lock so edges starting together migrate
/// once.
async fn migrate(c: &mut Client) -> PgResult<Result<(), StoreError>> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS burrow_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM burrow_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if found > known {
        return Ok(Err(StoreError::Newer { found, known }));
    }
    for (version, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO burrow_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        info!(version, "cluster store migrated");
    }
    tx.commit().await?;
    Ok(Ok(()))
}

/// Reads a devbox from the columns of [`COLUMNS`] starting at `at`; `None` if the id is null
/// (a change of a devbox that is gone).
pub(super) fn row(
    r: &tokio_postgres::Row,
    at: usize,
) -> PgResult<Option<Result<DevboxRecord, StoreError>>> {
    let Some(id) = r.try_get::<_, Option<String>>(at)? else {
        return Ok(None);
    };
    let raw = RawRow {
        id,
        agent_token: r.try_get(at + 1)?,
        created_at: r.try_get(at + 2)?,
        key: r.try_get(at + 3)?,
        mode: r.try_get(at + 4)?,
        auth: r.try_get(at + 5)?,
        rewrite_host: r.try_get(at + 6)?,
        raw_tcp: r.try_get(at + 7)?,
        http_keep_alive: r.try_get(at + 8)?,
        wake_on_http: r.try_get(at + 9)?,
        created_ms: r.try_get(at + 10)?,
    };
    Ok(Some(raw.parse()))
}
