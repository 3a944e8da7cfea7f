//! Presence: which edges hold a connection of which devbox's agent, written by each edge for
//! its own agents only, and its heartbeat.
//!
//! Connects and disconnects arrive as [`PresenceEvent`]s and are written in batches: whatever
//! came while the previous batch was being written goes in the next one transaction, so a
//! connect storm after an edge restart costs a few transactions, not one per agent. Each row
//! carries the connection's epoch (the registry's session generation): a connect raises it, a
//! disconnect removes the row only up to its own epoch, so a late disconnect never removes a
//! newer connection. Every write also appends the devboxes to the change log that every edge
//! follows ([`super::follow`]).
//!
//! When joining, and again after any failed write (the database was away), the edge rewrites
//! its whole presence from its live sessions: what it wrote before may be lost or stale.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::postgres::{CHANNEL, Shared, WRITE_LOCK};
use super::{Postgres, StoreError};

/// How often an edge heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// An edge not heard from for this long is dropped from routing.
pub const EDGE_DEAD_AFTER: Duration = Duration::from_secs(3);
/// The most events one transaction takes.
const MAX_BATCH: usize = 5000;

/// An agent connection of a devbox began (`present`) or ended on this edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    /// The devbox.
    pub devbox: String,
    /// The connection's epoch: greater for a later connection.
    pub epoch: u64,
    /// Connected (`true`) or gone.
    pub present: bool,
}

/// What this edge's presence writer reports, for metrics and tests.
#[derive(Debug, Clone)]
pub struct PresenceStats {
    /// Transactions that wrote presence.
    pub transactions: IntCounter,
    /// Events written.
    pub events: IntCounter,
}

impl Default for PresenceStats {
    fn default() -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        PresenceStats {
            transactions: counter(
                "burrow_edge_cluster_presence_writes_total",
                "Transactions that wrote this edge's presence (connects and disconnects, batched)",
            ),
            events: counter(
                "burrow_edge_cluster_presence_events_total",
                "Agent connects and disconnects this edge wrote to the cluster store",
            ),
        }
    }
}

/// This edge's live sessions: (devbox, epoch) pairs, for a rewrite; and how many agents.
pub trait Sessions: Send + Sync + 'static {
    /// Every live session.
    fn live(&self) -> Vec<(String, u64)>;
}

impl<T: Fn() -> Vec<(String, u64)> + Send + Sync + 'static> Sessions for T {
    fn live(&self) -> Vec<(String, u64)> {
        self()
    }
}

impl Postgres {
    /// Joins the cluster as `node`: starts its heartbeat and its presence writer, which takes
    /// the events sent to the returned channel, until `stop`. `sessions` tells the live
    /// sessions for a rewrite.
    pub fn join(
        &self,
        node: &str,
        addrs: EdgeAddrs,
        sessions: impl Sessions,
        stats: Arc<PresenceStats>,
        stop: CancellationToken,
    ) -> mpsc::UnboundedSender<PresenceEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            shared: self.shared(),
            node: node.to_owned(),
            addrs,
            sessions: Box::new(sessions),
            stats,
        };
        // Stopped with the edge: its heartbeat ends, and the other edges drop it from routing.
        self.spawn(async move {
            tokio::select! {
                () = writer.run(rx) => {}
                () = stop.cancelled() => {}
            }
        });
        tx
    }
}

/// Where other edges and agents reach an edge, as it heartbeats them.
#[derive(Debug, Clone, Default)]
pub struct EdgeAddrs {
    /// `cluster.mesh_addr`.
    pub mesh: Option<String>,
    /// `cluster.agents_addr`.
    pub agents: Option<String>,
}

struct Writer {
    shared: Arc<Shared>,
    node: String,
    addrs: EdgeAddrs,
    sessions: Box<dyn Sessions>,
    stats: Arc<PresenceStats>,
}

impl Writer {
    async fn run(self, mut events: mpsc::UnboundedReceiver<PresenceEvent>) {
        let mut rewrite = true;
        let mut pending: Vec<PresenceEvent> = Vec::new();
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => pending.push(event),
                    None => return,
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = self.heartbeat().await {
                        if !rewrite {
                            warn!(error = %e, "cannot write this edge's presence; rewriting it when the store is back");
                        }
                        rewrite = true;
                    }
                }
            }
            // Whatever else has come is written in the same transaction.
            while pending.len() < MAX_BATCH {
                match events.try_recv() {
                    Ok(event) => pending.push(event),
                    Err(_) => break,
                }
            }
            let mut written = Ok(());
            if rewrite {
                written = self.rewrite().await;
            }
            // Events already taken go too: each row keeps the newest epoch it was given.
            if written.is_ok() && !pending.is_empty() {
                written = self.write(&pending).await.map(|()| pending.clear());
            }
            match written {
                Ok(()) => {
                    if rewrite {
                        info!(node = %self.node, "this edge's presence is written");
                    }
                    rewrite = false;
                }
                Err(e) => {
                    if !rewrite {
                        warn!(error = %e, "cannot write this edge's presence; rewriting it when the store is back");
                    }
                    // The live sessions say it all once the store is back.
                    pending.clear();
                    rewrite = true;
                }
            }
        }
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let node = self.node.clone();
        let (mesh, agents_addr) = (self.addrs.mesh.clone(), self.addrs.agents.clone());
        let agents = i64::try_from(self.sessions.live().len()).unwrap_or(i64::MAX);
        self.shared
            .with(move |c| {
                Box::pin(async move {
                    c.execute(
                        "INSERT INTO edges (node, last_seen, agents, mesh_addr, agents_addr)
                         VALUES ($1, now(), $2, $3, $4)
                         ON CONFLICT (node) DO UPDATE
                         SET last_seen = now(), agents = $2, mesh_addr = $3, agents_addr = $4",
                        &[&node, &agents, &mesh, &agents_addr],
                    )
                    .await
                    .map(drop)
                })
            })
            .await
    }

    /// Writes a batch: per devbox, its latest connect and latest disconnect decide.
    async fn write(&self, events: &[PresenceEvent]) -> Result<(), StoreError> {
        let mut latest: HashMap<&str, (Option<u64>, Option<u64>)> = HashMap::new();
        for e in events {
            let (up, down) = latest.entry(e.devbox.as_str()).or_default();
            let slot = if e.present { up } else { down };
            *slot = Some(slot.map_or(e.epoch, |s| s.max(e.epoch)));
        }
        let (mut present, mut gone) = (Batch::default(), Batch::default());
        for (devbox, (up, down)) in latest {
            match (up, down) {
                (Some(up), down) if down.is_none_or(|d| up > d) => present.push(devbox, up),
                (_, Some(down)) => gone.push(devbox, down),
                _ => {}
            }
        }
        self.transaction(present, gone, false).await?;
        self.stats.events.inc_by(events.len() as u64);
        Ok(())
    }

    /// Replaces everything this edge wrote with its live sessions.
    async fn rewrite(&self) -> Result<(), StoreError> {
        let mut present = Batch::default();
        for (devbox, epoch) in self.sessions.live() {
            present.push(&devbox, epoch);
        }
        self.transaction(present, Batch::default(), true).await
    }

    async fn transaction(
        &self,
        present: Batch,
        gone: Batch,
        replace: bool,
    ) -> Result<(), StoreError> {
        let node = self.node.clone();
        self.shared
            .with(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                        .await?;
                    let mut changed = present.devboxes.clone();
                    changed.extend(gone.devboxes.iter().cloned());
                    if replace {
                        let held = tx
                            .query("DELETE FROM presence WHERE node = $1 RETURNING devbox", &[&node])
                            .await?;
                        for row in held {
                            changed.push(row.try_get(0)?);
                        }
                    }
                    tx.execute(
                        "INSERT INTO presence (devbox, node, epoch)
                         SELECT t.d, $2, t.e FROM unnest($1::text[], $3::bigint[]) AS t(d, e)
                         WHERE EXISTS (SELECT 1 FROM devboxes WHERE id = t.d)
                         ON CONFLICT (devbox, node) DO UPDATE SET epoch = excluded.epoch
                         WHERE presence.epoch < excluded.epoch",
                        &[&present.devboxes, &node, &present.epochs],
                    )
                    .await?;
                    tx.execute(
                        "DELETE FROM presence p USING unnest($1::text[], $3::bigint[]) AS t(d, e)
                         WHERE p.devbox = t.d AND p.node = $2 AND p.epoch <= t.e",
                        &[&gone.devboxes, &node, &gone.epochs],
                    )
                    .await?;
                    if !changed.is_empty() {
                        tx.execute(
                            "INSERT INTO devbox_changes (devbox, node) SELECT unnest($1::text[]), $2",
                            &[&changed, &node],
                        )
                        .await?;
                        tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
                    }
                    tx.commit().await
                })
            })
            .await?;
        self.stats.transactions.inc();
        Ok(())
    }
}

/// Devboxes and epochs, as two arrays for `unnest`.
#[derive(Debug, Default)]
struct Batch {
    devboxes: Vec<String>,
    epochs: Vec<i64>,
}

impl Batch {
    fn push(&mut self, devbox: &str, epoch: u64) {
        self.devboxes.push(devbox.to_owned());
        self.epochs.push(i64::try_from(epoch).unwrap_or(i64::MAX));
    }
}
