//! The embedded engine: SQLite in `state_dir`, the default for one edge. Every write is
//! committed (synchronous=FULL) before the API call that made it answers, so an edge restart
//! loses nothing.

use std::path::Path;
use std::sync::{Mutex, TryLockError};

use rusqlite::{Connection, OptionalExtension, params};

use super::{DevboxRecord, RawRow, Store, StoreError, TunnelRecord, tunnel_columns};
use crate::secret::TokenHash;

/// The SQLite engine.
#[derive(Debug)]
pub struct Sqlite {
    conn: Mutex<Connection>,
    /// How the last operation that reached SQLite went: `Some(error)` if it failed. Never held
    /// across I/O, so [`Store::ping`] can answer from it while a write holds `conn`.
    last_failure: Mutex<Option<String>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devboxes (
    id TEXT PRIMARY KEY,
    agent_token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    tunnel_key TEXT UNIQUE,
    auth_mode TEXT,
    auth_token_hash TEXT,
    rewrite_host INTEGER NOT NULL DEFAULT 0,
    raw_tcp INTEGER NOT NULL DEFAULT 0,
    http_keep_alive INTEGER NOT NULL DEFAULT 1,
    wake_on_http INTEGER NOT NULL DEFAULT 0,
    tunnel_created_ms INTEGER
);
";

/// Every column of a devbox, in the order [`row`] reads them.
const SELECT: &str = "SELECT id, agent_token_hash, created_at, tunnel_key, auth_mode,
    auth_token_hash, rewrite_host, raw_tcp, http_keep_alive, wake_on_http, tunnel_created_ms
    FROM devboxes";

/// Columns added after the first release, with their definitions: added to an older store
/// when it is opened.
const ADDED_COLUMNS: [(&str, &str); 5] = [
    ("rewrite_host", "INTEGER NOT NULL DEFAULT 0"),
    ("raw_tcp", "INTEGER NOT NULL DEFAULT 0"),
    ("http_keep_alive", "INTEGER NOT NULL DEFAULT 1"),
    ("wake_on_http", "INTEGER NOT NULL DEFAULT 0"),
    ("tunnel_created_ms", "INTEGER"),
];

impl Sqlite {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        let present: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('devboxes')")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for (name, definition) in ADDED_COLUMNS {
            if !present.iter().any(|p| p == name) {
                conn.execute_batch(&format!(
                    "ALTER TABLE devboxes ADD COLUMN {name} {definition}"
                ))?;
            }
        }
        Ok(Sqlite {
            conn: Mutex::new(conn),
            last_failure: Mutex::new(None),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A poisoned lock only means another thread panicked mid-call; SQLite's own
        // transaction state is intact, so carry on.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let result = f(&conn);
        self.record(&result);
        result
    }

    /// Remembers whether SQLite failed (not whether a call was refused for its input).
    fn record<T>(&self, result: &Result<T, StoreError>) {
        let failure = match result {
            Err(e @ StoreError::Sqlite(_)) => Some(e.to_string()),
            _ => None,
        };
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = failure;
    }
}

impl Store for Sqlite {
    /// Every devbox.
    fn all(&self) -> Result<Vec<DevboxRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("{SELECT} ORDER BY created_at, id"))?;
            let rows = stmt.query_map([], row)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r??);
            }
            Ok(out)
        })
    }

    /// Adds a devbox.
    fn insert(&self, devbox: &DevboxRecord) -> Result<(), StoreError> {
        self.with(|c| {
            let t = tunnel_columns(devbox.tunnel.as_ref());
            let done = c.execute(
                "INSERT OR IGNORE INTO devboxes
                 (id, agent_token_hash, created_at, tunnel_key, auth_mode, auth_token_hash,
                  rewrite_host, raw_tcp, http_keep_alive, wake_on_http, tunnel_created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    devbox.id,
                    devbox.agent_token.to_hex(),
                    devbox.created_at,
                    t.key,
                    t.mode,
                    t.token,
                    t.rewrite_host,
                    t.raw_tcp,
                    t.http_keep_alive,
                    t.wake_on_http,
                    t.created_ms
                ],
            )?;
            if done == 0 {
                return Err(StoreError::Exists(devbox.id.clone()));
            }
            Ok(())
        })
    }

    /// Sets or clears a devbox's tunnel. `false`: no such devbox.
    fn set_tunnel(&self, id: &str, tunnel: Option<&TunnelRecord>) -> Result<bool, StoreError> {
        self.with(|c| {
            let t = tunnel_columns(tunnel);
            let n = c.execute(
                "UPDATE devboxes SET tunnel_key = ?2, auth_mode = ?3, auth_token_hash = ?4,
                 rewrite_host = ?5, raw_tcp = ?6, http_keep_alive = ?7, wake_on_http = ?8,
                 tunnel_created_ms = ?9 WHERE id = ?1",
                params![
                    id,
                    t.key,
                    t.mode,
                    t.token,
                    t.rewrite_host,
                    t.raw_tcp,
                    t.http_keep_alive,
                    t.wake_on_http,
                    t.created_ms
                ],
            )?;
            Ok(n > 0)
        })
    }

    /// Replaces a devbox's agent token hash. `false`: no such devbox.
    fn set_agent_token(&self, id: &str, token: &TokenHash) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE devboxes SET agent_token_hash = ?2 WHERE id = ?1",
                params![id, token.to_hex()],
            )?;
            Ok(n > 0)
        })
    }

    /// Removes a devbox. `false`: no such devbox.
    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM devboxes WHERE id = ?1", params![id])? > 0))
    }

    /// Checks that the database answers, without waiting: while another call holds the
    /// connection (an admin write waiting on its fsync), the answer is how the last operation
    /// went. `/readyz` asks this, and must not hang behind a slow disk.
    fn ping(&self) -> Result<(), StoreError> {
        let conn = match self.conn.try_lock() {
            Ok(conn) => conn,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
                return match last.as_ref() {
                    Some(e) => Err(StoreError::Failing(e.clone())),
                    None => Ok(()),
                };
            }
        };
        let result = conn
            .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map(|_| ())
            .map_err(StoreError::from);
        self.record(&result);
        result
    }

    /// One devbox.
    fn get(&self, id: &str) -> Result<Option<DevboxRecord>, StoreError> {
        self.with(|c| {
            c.query_row(&format!("{SELECT} WHERE id = ?1"), params![id], row)
                .optional()?
                .transpose()
        })
    }
}

/// Reads a row of [`SELECT`]'s columns.
fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<DevboxRecord, StoreError>> {
    Ok(RawRow {
        id: r.get(0)?,
        agent_token: r.get(1)?,
        created_at: r.get(2)?,
        key: r.get(3)?,
        mode: r.get(4)?,
        auth: r.get(5)?,
        rewrite_host: r.get(6)?,
        raw_tcp: r.get(7)?,
        http_keep_alive: r.get(8)?,
        wake_on_http: r.get(9)?,
        created_ms: r.get(10)?,
    }
    .parse())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use burrow_protocol::AuthMode;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("burrow.db");
        let token = Secret::new("agent-token");
        let auth = Secret::new("auth-token");
        let record = DevboxRecord {
            id: "box1".into(),
            agent_token: token.hash(),
            created_at: 1,
            tunnel: None,
        };
        {
            let store = Sqlite::open(&path).unwrap();
            store.insert(&record).unwrap();
            assert!(matches!(store.insert(&record), Err(StoreError::Exists(_))));
            let tunnel = TunnelRecord {
                key: "k".repeat(26),
                auth_mode: AuthMode::Authenticated,
                auth_token: Some(auth.hash()),
                rewrite_host: true,
                raw_tcp: true,
                http_keep_alive: false,
                wake_on_http: true,
                created_ms: 1_765_000_000_042,
            };
            assert!(store.set_tunnel("box1", Some(&tunnel)).unwrap());
            assert!(!store.set_tunnel("nope", Some(&tunnel)).unwrap());
        }
        let store = Sqlite::open(&path).unwrap();
        let all = store.all().unwrap();
        assert_eq!(all.len(), 1);
        let t = all[0].tunnel.as_ref().unwrap();
        assert!(t.auth_token.unwrap().matches("auth-token"));
        assert!(t.rewrite_host && t.raw_tcp);
        assert!(all[0].agent_token.matches("agent-token"));
        assert!(store.delete("box1").unwrap());
        assert!(store.get("box1").unwrap().is_none());
    }

    /// A store written before `rewrite_host`, `raw_tcp`, `http_keep_alive`, `wake_on_http`
    /// and `tunnel_created_ms` existed opens, keeps its rows, and gains the columns (with
    /// their defaults; the tunnel's creation is its devbox's).
    #[test]
    fn an_older_store_gains_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("burrow.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE devboxes (id TEXT PRIMARY KEY, agent_token_hash TEXT NOT NULL UNIQUE,
                 created_at INTEGER NOT NULL, tunnel_key TEXT UNIQUE, auth_mode TEXT,
                 auth_token_hash TEXT);",
            )
            .unwrap();
            c.execute(
                "INSERT INTO devboxes VALUES ('old', ?1, 5, 'key', 'open', NULL)",
                params![Secret::new("t").hash().to_hex()],
            )
            .unwrap();
        }
        let store = Sqlite::open(&path).unwrap();
        let old = store.get("old").unwrap().unwrap();
        let tunnel = old.tunnel.unwrap();
        assert_eq!(tunnel.auth_mode, AuthMode::Open);
        assert!(!tunnel.rewrite_host && !tunnel.raw_tcp);
        assert!(tunnel.http_keep_alive && !tunnel.wake_on_http);
        assert_eq!(tunnel.created_ms, 5_000);
        drop(store);
        Sqlite::open(&path).expect("opening twice adds nothing twice");
    }

    #[test]
    fn ping_does_not_wait_behind_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("store.db")).unwrap();
        assert!(store.ping().is_ok());
        // A write in progress holds the connection: the ping answers at once, from the last
        // operation, instead of queueing behind it.
        let held = store.conn.lock().unwrap();
        assert!(store.ping().is_ok(), "busy but healthy");
        *store.last_failure.lock().unwrap() = Some("disk I/O error".into());
        let busy_failing = store.ping().unwrap_err().to_string();
        assert!(busy_failing.contains("disk I/O error"), "{busy_failing}");
        drop(held);
        assert!(store.ping().is_ok(), "an answering database is ready again");
    }
}
