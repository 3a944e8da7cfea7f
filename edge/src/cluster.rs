//! Several edges serving one domain on one PostgreSQL store (`[cluster] store`).
//!
//! [`ClusterView`] is this edge's picture of the cluster, kept from the store's change log:
//! the edges and their heartbeats, and which edges hold each devbox's agent (presence). Each
//! edge writes only its own agents' presence ([`crate::store::Postgres::join`]).
//!
//! What the edges share lives in the store: devboxes and tunnels (the store's engine), and the
//! secrets a single edge generates into `state_dir` on its first start. For a cluster they are
//! generated once, by whichever edge asks first, and every edge writes the cluster's values
//! into its own `state_dir` at start, where the single-edge code reads them as always: an
//! agent token, admin token, cookie or stateless reset issued by one edge is good at every
//! other, and agents trust the same CA whichever edge they reach.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntGaugeVec, Opts};
use tokio::sync::Notify;

use crate::certs::{self, CA_KEY_FILE};
use crate::config::Config;
use crate::mesh::Mesh;
use crate::platform::WEBHOOK_SECRET_FILE;
use crate::secret::Secret;
use crate::server::{ADMIN_TOKEN_FILE, COOKIE_KEY_FILE, RESET_KEY_FILE, StartError};
use crate::store::{Change, EDGE_DEAD_AFTER, EdgeRow, Postgres, PresenceStats};

/// Writes the cluster's secrets into `state_dir`, generating any the cluster lacks: the agents'
/// CA key (unless `agents.cert` is configured), the admin token (unless `admin.token_file`
/// is), the webhook secret (with `platform.webhook_url` and without
/// `platform.webhook_secret_file`), the cookie key and the stateless-reset key.
/// Returns the cluster's mesh CA key (PEM), which stays in memory.
pub fn share_secrets(store: &Postgres, config: &Config) -> Result<String, StartError> {
    let dir = &config.state_dir;
    if config.agents_tls.is_none() {
        let fresh = rcgen::KeyPair::generate()
            .map_err(certs::CertError::from)?
            .serialize_pem();
        let key = store.cluster_secret(CA_KEY_FILE, fresh.into_bytes())?;
        write(dir, CA_KEY_FILE, &key)?;
    }
    if config.admin_token_file.is_none() {
        let fresh = format!("{}\n", Secret::generate()?.expose());
        let token = store.cluster_secret(ADMIN_TOKEN_FILE, fresh.into_bytes())?;
        write(dir, ADMIN_TOKEN_FILE, &token)?;
    }
    let platform = &config.platform;
    if platform.webhook_url.is_some() && platform.webhook_secret_file.is_none() {
        let fresh = format!("{}\n", Secret::generate()?.expose());
        let secret = store.cluster_secret(WEBHOOK_SECRET_FILE, fresh.into_bytes())?;
        write(dir, WEBHOOK_SECRET_FILE, &secret)?;
    }
    for (name, len) in [(COOKIE_KEY_FILE, 32), (RESET_KEY_FILE, 64)] {
        let mut fresh = vec![0u8; len];
        getrandom::fill(&mut fresh)?;
        let secret = store.cluster_secret(name, fresh)?;
        write(dir, name, &secret)?;
    }
    let fresh = rcgen::KeyPair::generate()
        .map_err(certs::CertError::from)?
        .serialize_pem();
    let mesh = store.cluster_secret("mesh-ca.key", fresh.into_bytes())?;
    String::from_utf8(mesh).map_err(|_| StartError::File {
        path: dir.join("mesh-ca.key"),
        message: "the cluster's mesh CA key in the store is not PEM text".into(),
    })
}

/// What forwarding a request to another edge takes: the mesh, and who holds which agent.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// This edge's end of the mesh.
    pub mesh: Arc<Mesh>,
    /// The cluster as this edge sees it.
    pub view: Arc<ClusterView>,
}

/// Writes one secret file (mode 0600) unless it already holds the cluster's value.
fn write(dir: &Path, name: &str, value: &[u8]) -> Result<(), StartError> {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|held| held == value) {
        return Ok(());
    }
    if path.exists() {
        tracing::info!(path = %path.display(), "replacing a secret with the cluster's");
    }
    certs::write_private(&path, value)?;
    Ok(())
}

/// This edge's picture of the cluster.
#[derive(Debug)]
pub struct ClusterView {
    /// This edge's name.
    pub node: String,
    /// How this edge's presence writes went.
    pub stats: Arc<PresenceStats>,
    /// Edges by state (alive, dead), as of the last read.
    edges_gauge: IntGaugeVec,
    /// From a change written (by any edge) to this edge applying it.
    change_lag: Histogram,
    /// Woken whenever presence or the edges change: a request waiting for an agent looks again.
    changed: Notify,
    /// Where agents reach the other live edges (`cluster.agents_addr`), for agents that take it.
    advertised: tokio::sync::watch::Sender<Arc<Vec<String>>>,
    inner: RwLock<ViewInner>,
}

#[derive(Debug, Default)]
struct ViewInner {
    /// Devbox -> the edges holding its agent.
    presence: HashMap<String, Vec<String>>,
    /// The edges, and when this edge read them.
    edges: Vec<EdgeRow>,
    read_at: Option<Instant>,
}

/// An edge as [`ClusterView::edges`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeView {
    /// Its name.
    pub node: String,
    /// How long ago it last heartbeat.
    pub last_seen: Duration,
    /// The agents it holds.
    pub agents: u64,
    /// Whether it heartbeat within [`EDGE_DEAD_AFTER`]: a dead edge is routed around.
    pub alive: bool,
    /// Where other edges forward requests to it.
    pub mesh_addr: Option<String>,
    /// Where agents reach it, if it says (`cluster.agents_addr`).
    pub agents_addr: Option<String>,
}

impl ClusterView {
    /// An empty picture for the edge `node`.
    pub fn new(node: &str) -> ClusterView {
        let edges_gauge = IntGaugeVec::new(
            Opts::new(
                "burrow_edge_cluster_edges",
                "The cluster's edges by state (alive: heartbeat within 3 s; dead)",
            ),
            &["state"],
        )
        .expect("valid metric");
        let change_lag = Histogram::with_opts(
            HistogramOpts::new(
                "burrow_edge_cluster_change_lag_seconds",
                "From a change (admin write or presence) committed by any edge to this edge applying it",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        ClusterView {
            node: node.to_owned(),
            stats: Arc::default(),
            edges_gauge,
            change_lag,
            changed: Notify::new(),
            advertised: tokio::sync::watch::Sender::new(Arc::default()),
            inner: RwLock::new(ViewInner::default()),
        }
    }

    /// This edge's cluster metrics, to register with the others.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.stats.transactions.clone()),
            Box::new(self.stats.events.clone()),
            Box::new(self.edges_gauge.clone()),
            Box::new(self.change_lag.clone()),
        ]
    }

    /// Takes the presence and edges of a change (its devboxes are the registry's).
    pub fn apply(&self, change: &Change) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match change {
            Change::All { presence, .. } => inner.presence.clone_from(presence),
            Change::Some {
                presence,
                ages,
                read_at,
                ..
            } => {
                let since_read = read_at.elapsed();
                for age in ages {
                    self.change_lag.observe((*age + since_read).as_secs_f64());
                }
                for (devbox, nodes) in presence {
                    if nodes.is_empty() {
                        inner.presence.remove(devbox);
                    } else {
                        inner.presence.insert(devbox.clone(), nodes.clone());
                    }
                }
            }
            Change::Edges(edges) => {
                inner.edges.clone_from(edges);
                inner.read_at = Some(Instant::now());
                let alive = edges
                    .iter()
                    .filter(|e| e.last_seen < EDGE_DEAD_AFTER)
                    .count();
                let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
                self.edges_gauge
                    .with_label_values(&["alive"])
                    .set(count(alive));
                self.edges_gauge
                    .with_label_values(&["dead"])
                    .set(count(edges.len() - alive));
                let mut others: Vec<String> = edges
                    .iter()
                    .filter(|e| e.last_seen < EDGE_DEAD_AFTER && e.node != self.node)
                    .filter_map(|e| e.agents_addr.clone())
                    .collect();
                others.sort();
                others.dedup();
                self.advertised.send_if_modified(|current| {
                    let changed = **current != others;
                    if changed {
                        *current = Arc::new(others);
                    }
                    changed
                });
            }
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Where agents reach the other live edges, kept current: what edges tell agents that
    /// take it ([`burrow_protocol::ControlMsg::Edges`]).
    pub fn advertised(&self) -> tokio::sync::watch::Receiver<Arc<Vec<String>>> {
        self.advertised.subscribe()
    }

    /// Every edge the store knows, with how long ago it heartbeat.
    pub fn edges(&self) -> Vec<EdgeView> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let since_read = inner.read_at.map_or(Duration::ZERO, |at| at.elapsed());
        inner
            .edges
            .iter()
            .map(|e| {
                let last_seen = e.last_seen + since_read;
                EdgeView {
                    node: e.node.clone(),
                    last_seen,
                    agents: e.agents,
                    alive: last_seen < EDGE_DEAD_AFTER,
                    mesh_addr: e.mesh_addr.clone(),
                    agents_addr: e.agents_addr.clone(),
                }
            })
            .collect()
    }

    /// A future that completes at the next change of presence or edges; create it before
    /// looking, so a change in between is not missed.
    pub fn next_change(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// The mesh addresses of the other live edges holding `devbox`'s agent.
    pub fn remote_holders(&self, devbox: &str) -> Vec<SocketAddr> {
        let edges = self.edges();
        self.holders(devbox)
            .into_iter()
            .filter(|node| *node != self.node)
            .filter_map(|node| {
                let edge = edges.iter().find(|e| e.node == node)?;
                edge.mesh_addr.as_deref()?.parse().ok()
            })
            .collect()
    }

    /// The live edges holding `devbox`'s agent, by name.
    pub fn holders(&self, devbox: &str) -> Vec<String> {
        let alive: Vec<String> = self
            .edges()
            .into_iter()
            .filter(|e| e.alive)
            .map(|e| e.node)
            .collect();
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .presence
            .get(devbox)
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|n| alive.contains(n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}
