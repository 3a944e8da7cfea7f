//! Following the cluster store's changes: every admin write on any edge appends the devbox's id
//! to `devbox_changes` and sends a `NOTIFY`; each edge reads the log from where it was, on the
//! notification or every [`POLL_EVERY`] if none came, and hands the rows as they are now to the
//! registry. The notification is only a wake-up (it is lost while the listening connection is
//! down); the log is what is read, so a missed one costs at most [`POLL_EVERY`].
//!
//! After the listening connection is lost, or when the edge has not read the log for longer
//! than entries are kept, the follower reads every devbox again ([`Change::All`]).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::postgres::{CHANNEL, COLUMNS, PgResult, Shared, row};
use super::{DevboxRecord, Postgres, StoreError};

/// How often the log is read when no notification comes.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// How long log entries are kept.
const KEEP: Duration = Duration::from_secs(600);
/// How often this edge deletes entries older than [`KEEP`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How many entries one read takes.
const BATCH: i64 = 1000;

/// What changed in the store.
#[derive(Debug, Clone)]
pub enum Change {
    /// Every devbox as stored, and which edges hold each devbox's agent: anything else in
    /// memory is gone.
    All {
        /// The devboxes.
        devboxes: Vec<DevboxRecord>,
        /// Which edges hold each devbox's agent.
        presence: HashMap<String, Vec<String>>,
    },
    /// These devboxes as they are now (`None`: deleted), and the edges that now hold the
    /// agents of those whose presence changed.
    Some {
        /// The devboxes changed.
        devboxes: Vec<(String, Option<DevboxRecord>)>,
        /// The devboxes whose presence changed, with the edges holding them now.
        presence: Vec<(String, Vec<String>)>,
        /// How long before `read_at` each change read was written.
        ages: Vec<Duration>,
        /// When the changes were read.
        read_at: Instant,
    },
    /// The cluster's edges, read at every poll.
    Edges(Vec<EdgeRow>),
}

/// An edge of the cluster as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeRow {
    /// Its name.
    pub node: String,
    /// How long ago it last heartbeat, by the database's clock.
    pub last_seen: Duration,
    /// The agents it holds.
    pub agents: u64,
    /// Where other edges forward requests to it.
    pub mesh_addr: Option<String>,
    /// Where agents reach it (`cluster.agents_addr`).
    pub agents_addr: Option<String>,
}

/// Who takes the changes: `false` once it is gone (the follower stops).
pub trait Apply: Send + Sync + 'static {
    /// Applies one batch of changes.
    fn apply(&self, change: Change) -> bool;
}

impl<T: Fn(Change) -> bool + Send + Sync + 'static> Apply for T {
    fn apply(&self, change: Change) -> bool {
        self(change)
    }
}

impl Postgres {
    /// Follows the change log from `since` (see [`Postgres::last_change`]) until `stop` or
    /// until `apply` says its taker is gone.
    pub fn follow(&self, since: i64, apply: impl Apply, stop: CancellationToken) {
        let shared = self.shared();
        self.spawn(async move {
            tokio::select! {
                () = follow(shared, since, apply) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// A holder that may be gone: `Weak<T>` applies through it while it lives.
pub fn through<T: Send + Sync + 'static>(
    weak: Weak<T>,
    f: impl Fn(&T, Change) + Send + Sync + 'static,
) -> impl Apply {
    move |change| match weak.upgrade() {
        Some(holder) => {
            f(&holder, change);
            true
        }
        None => false,
    }
}

async fn follow(shared: Arc<Shared>, since: i64, apply: impl Apply) {
    let apply = Arc::new(apply);
    let mut since = Some(since);
    let mut warned = false;
    loop {
        let (client, mut wakeups) = match listen(&shared).await {
            Ok(listening) => listening,
            Err(e) => {
                if !warned {
                    warn!(error = %e, "cannot follow the cluster store's changes; retrying");
                    warned = true;
                }
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            }
        };
        if warned {
            info!("following the cluster store's changes again");
            warned = false;
        }
        let mut last_read = Instant::now();
        let mut last_prune = Instant::now();
        loop {
            let result = match since {
                Some(from) if last_read.elapsed() < KEEP / 2 => read(&client, from).await,
                _ => read_all(&client).await.map(|(all, to)| (Some(all), to)),
            };
            let edges = edges(&client).await;
            match result.and_then(|read| Ok((read, edges?))) {
                Ok(((change, to), edges)) => {
                    // Applied off this runtime's one worker: the registry takes its writer
                    // lock, which an admin write holds while it waits on this runtime for its
                    // commit.
                    for change in change.into_iter().chain([Change::Edges(edges)]) {
                        let taker = apply.clone();
                        let applied = tokio::task::spawn_blocking(move || taker.apply(change));
                        if !applied.await.unwrap_or(false) {
                            return;
                        }
                    }
                    since = Some(to);
                    last_read = Instant::now();
                }
                Err(e) => {
                    debug!(error = %e, "reading the change log failed");
                    break;
                }
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                prune(&client).await;
            }
            tokio::select! {
                woke = wakeups.recv() => if woke.is_none() { break },
                () = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
        // The connection was lost: changes may have been pruned meanwhile; read everything.
        since = None;
    }
}

/// A connection that listens on [`CHANNEL`], and its wake-ups (closed when it ends).
async fn listen(
    shared: &Shared,
) -> Result<(tokio_postgres::Client, mpsc::Receiver<()>), StoreError> {
    let connecting = tokio::time::timeout(
        super::postgres::OP_TIMEOUT,
        shared.url_config().connect(NoTls),
    );
    let (client, mut connection) = connecting
        .await
        .map_err(|_| StoreError::Unavailable(format!("{} did not answer", shared.url)))?
        .map_err(|e| StoreError::Unavailable(format!("{}: {e}", shared.url)))?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    // One wake-up pending is enough: the read takes everything since.
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %e, "the change follower's connection ended");
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(|e| StoreError::Unavailable(format!("{}: {e}", shared.url)))?;
    Ok((client, rx))
}

/// The devboxes changed after `since`, as they are now, with the edges holding those whose
/// presence changed; and the last sequence number read.
async fn read(client: &tokio_postgres::Client, since: i64) -> PgResult<(Option<Change>, i64)> {
    let columns = COLUMNS
        .split(", ")
        .map(|c| format!("d.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT c.seq, c.devbox, c.node,
                (extract(epoch FROM clock_timestamp() - c.at) * 1000000)::bigint, {columns}
         FROM devbox_changes c
         LEFT JOIN devboxes d ON d.id = c.devbox
         WHERE c.seq > $1 ORDER BY c.seq LIMIT {BATCH}"
    );
    let rows = client.query(&sql, &[&since]).await?;
    let mut to = since;
    let mut devboxes: Vec<(String, Option<DevboxRecord>)> = Vec::new();
    let mut moved: Vec<String> = Vec::new();
    let mut ages = Vec::with_capacity(rows.len());
    let read_at = Instant::now();
    for r in &rows {
        to = r.try_get(0)?;
        let id: String = r.try_get(1)?;
        let age: i64 = r.try_get(3)?;
        ages.push(Duration::from_micros(u64::try_from(age).unwrap_or(0)));
        if r.try_get::<_, Option<String>>(2)?.is_some() {
            if !moved.contains(&id) {
                moved.push(id);
            }
            continue;
        }
        let record = match row(r, 4)? {
            Some(Ok(record)) => Some(record),
            Some(Err(e)) => {
                warn!(devbox = %id, error = %e, "skipping a devbox the store holds corrupt");
                continue;
            }
            None => None,
        };
        // A devbox changed twice reads the same row twice: keep one.
        devboxes.retain(|(seen, _)| *seen != id);
        devboxes.push((id, record));
    }
    if devboxes.is_empty() && moved.is_empty() {
        return Ok((None, to));
    }
    let mut holders = presence(client, Some(&moved)).await?;
    let presence = moved
        .into_iter()
        .map(|id| {
            let nodes = holders.remove(&id).unwrap_or_default();
            (id, nodes)
        })
        .collect();
    let change = Change::Some {
        devboxes,
        presence,
        ages,
        read_at,
    };
    Ok((Some(change), to))
}

/// Which edges hold each devbox's agent: of `only` these devboxes, or of all.
async fn presence(
    client: &tokio_postgres::Client,
    only: Option<&[String]>,
) -> PgResult<HashMap<String, Vec<String>>> {
    let rows = match only {
        Some(ids) => {
            let sql = "SELECT devbox, node FROM presence WHERE devbox = ANY($1) ORDER BY node";
            client.query(sql, &[&ids]).await?
        }
        None => {
            let sql = "SELECT devbox, node FROM presence ORDER BY node";
            client.query(sql, &[]).await?
        }
    };
    let mut holders: HashMap<String, Vec<String>> = HashMap::new();
    for r in &rows {
        holders
            .entry(r.try_get(0)?)
            .or_default()
            .push(r.try_get(1)?);
    }
    Ok(holders)
}

/// The cluster's edges and how long ago each heartbeat.
async fn edges(client: &tokio_postgres::Client) -> PgResult<Vec<EdgeRow>> {
    let rows = client
        .query(
            "SELECT node, (extract(epoch FROM now() - last_seen) * 1000)::bigint, agents,
                    mesh_addr, agents_addr
             FROM edges ORDER BY node",
            &[],
        )
        .await?;
    let mut edges = Vec::with_capacity(rows.len());
    for r in &rows {
        let ago: i64 = r.try_get(1)?;
        let agents: i64 = r.try_get(2)?;
        edges.push(EdgeRow {
            node: r.try_get(0)?,
            last_seen: Duration::from_millis(u64::try_from(ago).unwrap_or(0)),
            agents: u64::try_from(agents).unwrap_or(0),
            mesh_addr: r.try_get(3)?,
            agents_addr: r.try_get(4)?,
        });
    }
    Ok(edges)
}

/// Every devbox and presence, and the log's last sequence number, from one snapshot.
async fn read_all(client: &tokio_postgres::Client) -> PgResult<(Change, i64)> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await?;
    let to: i64 = client
        .query_one("SELECT coalesce(max(seq), 0) FROM devbox_changes", &[])
        .await?
        .try_get(0)?;
    let rows = client
        .query(&format!("SELECT {COLUMNS} FROM devboxes"), &[])
        .await?;
    let presence = presence(client, None).await?;
    client.batch_execute("COMMIT").await?;
    let mut devboxes = Vec::with_capacity(rows.len());
    for r in &rows {
        match row(r, 0)? {
            Some(Ok(record)) => devboxes.push(record),
            Some(Err(e)) => warn!(error = %e, "skipping a devbox the store holds corrupt"),
            None => {}
        }
    }
    Ok((Change::All { devboxes, presence }, to))
}

/// Deletes log entries older than [`KEEP`]; any edge may, at any time.
async fn prune(client: &tokio_postgres::Client) {
    let keep = format!("{} seconds", KEEP.as_secs());
    let sql = "DELETE FROM devbox_changes WHERE at < now() - $1::text::interval";
    if let Err(e) = client.execute(sql, &[&keep]).await {
        debug!(error = %e, "pruning the change log failed");
    }
}
