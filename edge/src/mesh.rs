//! Edge-to-edge forwarding: a public request that lands on an edge without the devbox's agent
//! goes, in one hop, to an edge that holds it ([`crate::cluster::ClusterView::remote_holders`]),
//! over a persistent QUIC connection between the two (mutually authenticated with the
//! cluster's mesh CA, [`tls`]).
//!
//! The owner relays a data stream, nothing more: the forwarding edge opens a mesh stream, names
//! the devbox, and then speaks to the agent exactly as over its own agent connection (stream
//! header, the agent's answer, then the bytes of HTTP, WebSocket, SSE or raw TCP). Routing,
//! access checks and limits all happened at the forwarding edge; the owner only splices the
//! mesh stream to a new stream on its agent connection, and never forwards again. An owner
//! that no longer holds the agent says so ("not here") and the forwarding edge tries the next.
//!
//! ```text
//!   forwarding edge                      owner edge                       agent
//!   open_bi, [len][devbox id] ------->   local session?
//!                                         no:  [1] + finish
//!                                         yes: open_bi on the agent ------->
//!                              <-------   [0], then both ways, byte for byte
//!   stream header ------------------------------------------------------------>
//!                              <-------------------------------------------- answer
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_protocol::{RefuseReason, StreamAnswer, StreamHeader};
use burrow_runtime::wire;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::registry::Registry;

pub mod tls;

/// The owner relays the stream.
const RELAYING: u8 = 0;
/// The owner holds no connection of the devbox's agent.
const NOT_HERE: u8 = 1;
/// How long dialing another edge may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the owner may take to say whether it relays, and the agent to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an owner may take to say whether it relays when another owner could be tried
/// instead. It only opens a stream on its agent connection first (one round trip on a healthy
/// mesh), so silence this long means the edge is dead or frozen, and the request moves on.
const OWNER_TIMEOUT: Duration = Duration::from_millis(500);
/// How long an edge that failed (no answer in time, a dial or a connection that failed) is
/// tried after the others. By then its heartbeat has stopped counting, or it answered again.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Why a forwarded stream was not opened.
#[derive(Debug)]
pub enum NotForwarded {
    /// The owner does not hold the agent (its presence was stale): try the next.
    NotHere,
    /// The agent refused the stream, on the connection with this id.
    Refused(RefuseReason, usize),
    /// The other edge could not be reached, or the stream failed: try the next.
    Failed(String),
}

/// This edge's end of the mesh.
#[derive(Debug)]
pub struct Mesh {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// Connections to other edges, by mesh address; each slot is dialed by one request at a
    /// time, and the others wait for that dial (other addresses are not held up).
    conns:
        std::sync::Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    /// Edges that failed lately, and when: tried last ([`Mesh::order`]).
    down: Arc<Down>,
    /// Open mesh connections, by direction: `out` (this edge dialed), `in` (another did).
    open: prometheus::IntGaugeVec,
}

/// Edges that failed lately.
#[derive(Debug, Default)]
struct Down(std::sync::Mutex<HashMap<SocketAddr, Instant>>);

impl Down {
    fn mark(&self, edge: SocketAddr) {
        let mut down = self.0.lock().unwrap_or_else(|p| p.into_inner());
        down.retain(|_, since| since.elapsed() < DOWN_FOR);
        down.insert(edge, Instant::now());
    }

    fn clear(&self, edge: SocketAddr) {
        let mut down = self.0.lock().unwrap_or_else(|p| p.into_inner());
        down.remove(&edge);
    }

    fn is_down(&self, edge: SocketAddr) -> bool {
        let down = self.0.lock().unwrap_or_else(|p| p.into_inner());
        down.get(&edge)
            .is_some_and(|since| since.elapsed() < DOWN_FOR)
    }
}

/// A stream to a devbox's agent through another edge, accepted by the agent.
#[derive(Debug)]
pub struct Forwarded {
    /// Toward the service.
    pub send: quinn::SendStream,
    /// From the service.
    pub recv: quinn::RecvStream,
    /// The mesh connection it rides.
    pub conn: quinn::Connection,
    /// The agent said the port speaks only HTTP/2.
    pub http2_only: bool,
}

impl Mesh {
    /// Binds the mesh's UDP socket on `listen`.
    pub fn bind(listen: SocketAddr, tls: tls::MeshTls) -> std::io::Result<Mesh> {
        let endpoint = quinn::Endpoint::server(tls.server, listen)?;
        let open = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "burrow_edge_mesh_connections",
                "Open QUIC connections with other edges of the cluster, by direction (out: this \
                 edge dialed; in: another edge did)",
            ),
            &["direction"],
        )
        .expect("valid metric");
        Ok(Mesh {
            endpoint,
            client: tls.client,
            conns: std::sync::Mutex::default(),
            down: Arc::default(),
            open,
        })
    }

    /// The mesh's metrics, to register with the edge's.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.open.clone())]
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Relays the streams other edges open. From `shutdown` on, no new mesh connection is
    /// taken, but those open go on relaying while this edge's agents move to other edges (they
    /// were told to go away): until none is left here, or `drain_grace` is over.
    pub fn serve(
        self: &Arc<Self>,
        registry: Arc<Registry>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
        drain_grace: Duration,
    ) {
        let endpoint = self.endpoint.clone();
        let inner = tasks.clone();
        let open_in = self.open.with_label_values(&["in"]);
        tasks.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    incoming = endpoint.accept() => incoming,
                    () = shutdown.cancelled() => break,
                };
                let Some(incoming) = incoming else { break };
                let registry = registry.clone();
                let open = open_in.clone();
                inner.spawn(async move {
                    match incoming.await {
                        Ok(conn) => {
                            open.inc();
                            serve_edge(conn, registry).await;
                            open.dec();
                        }
                        Err(e) => debug!(error = %e, "a mesh connection failed its handshake"),
                    }
                });
            }
            let deadline = tokio::time::Instant::now() + drain_grace;
            while !registry.live_sessions().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            endpoint.close(0u32.into(), b"edge stopping");
        });
    }

    /// `edges` in the order to try them: as given, but those that failed lately last.
    pub fn order(&self, mut edges: Vec<SocketAddr>) -> Vec<SocketAddr> {
        edges.sort_by_key(|e| self.down.is_down(*e));
        edges
    }

    /// Opens a stream to `devbox`'s agent through the edge at `to`, sends `header` and waits
    /// for the agent's answer. With `more` (another edge could be tried instead), the owner has
    /// [`OWNER_TIMEOUT`] to say whether it relays; an edge that does not is marked down.
    pub async fn open(
        &self,
        to: SocketAddr,
        devbox: &str,
        header: &StreamHeader,
        more: bool,
    ) -> Result<Forwarded, NotForwarded> {
        let conn = self.connection(to, more).await?;
        let failed = |e: &dyn std::fmt::Display| NotForwarded::Failed(e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
        let id = devbox.as_bytes();
        let len = u16::try_from(id.len()).map_err(|e| failed(&e))?;
        let mut request = len.to_be_bytes().to_vec();
        request.extend_from_slice(id);
        send.write_all(&request).await.map_err(|e| failed(&e))?;
        wire::write_frame(&mut send, header.encoded())
            .await
            .map_err(|e| failed(&e))?;
        let mut status = [0u8; 1];
        let patience = if more { OWNER_TIMEOUT } else { ANSWER_TIMEOUT };
        match tokio::time::timeout(patience, recv.read_exact(&mut status)).await {
            Ok(Ok(())) => self.down.clear(to),
            Ok(Err(e)) => return Err(failed(&e)),
            Err(_) => {
                self.down.mark(to);
                let _ = send.reset(burrow_protocol::reset::EDGE_ABORT.into());
                let _ = recv.stop(burrow_protocol::reset::EDGE_ABORT.into());
                return Err(failed(&format_args!(
                    "the edge did not answer within {patience:?}"
                )));
            }
        }
        if status[0] != RELAYING {
            return Err(NotForwarded::NotHere);
        }
        let answer = async {
            match wire::read_msg(&mut recv, StreamAnswer::decode).await {
                Ok(Some(StreamAnswer::Accept)) => Ok(false),
                Ok(Some(StreamAnswer::AcceptHttp2)) => Ok(true),
                Ok(Some(StreamAnswer::Refuse(reason))) => {
                    Err(NotForwarded::Refused(reason, conn.stable_id()))
                }
                Ok(None) => Err(failed(&"the stream ended before the agent's answer")),
                Err(e) => Err(failed(&e)),
            }
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
            Ok(Ok(http2_only)) => Ok(Forwarded {
                send,
                recv,
                conn,
                http2_only,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(failed(&"no answer in time")),
        }
    }

    /// The live connection to the edge at `to`, if there is one and the edge has not failed
    /// lately (none is dialed).
    pub fn existing(&self, to: SocketAddr) -> Option<quinn::Connection> {
        if self.down.is_down(to) {
            return None;
        }
        let slot = self.slot(to);
        let conn = slot.try_lock().ok()?;
        conn.as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The slot of the connection to `to`.
    fn slot(&self, to: SocketAddr) -> Arc<tokio::sync::Mutex<Option<quinn::Connection>>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.entry(to).or_default().clone()
    }

    /// The connection to the edge at `to`, dialed if there is none or it closed. A dial that
    /// fails, or a connection that times out, marks the edge down. With `more` (another edge
    /// could be tried instead), an edge marked down is not dialed, and a dial gets
    /// [`OWNER_TIMEOUT`].
    async fn connection(
        &self,
        to: SocketAddr,
        more: bool,
    ) -> Result<quinn::Connection, NotForwarded> {
        let slot = self.slot(to);
        let mut conn = slot.lock().await;
        if let Some(live) = conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(live.clone());
        }
        let timed_out = |c: &quinn::Connection| {
            matches!(c.close_reason(), Some(quinn::ConnectionError::TimedOut))
        };
        if conn.as_ref().is_some_and(timed_out) {
            // Its watcher may not have run yet.
            self.down.mark(to);
        }
        let failed = |e: &dyn std::fmt::Display| {
            self.down.mark(to);
            NotForwarded::Failed(format!("cannot reach the edge at {to}: {e}"))
        };
        if more && self.down.is_down(to) {
            return Err(NotForwarded::Failed(format!(
                "the edge at {to} failed lately; trying another first"
            )));
        }
        let patience = if more { OWNER_TIMEOUT } else { DIAL_TIMEOUT };
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), to, tls::MESH_NAME)
            .map_err(|e| failed(&e))?;
        let dialed = tokio::time::timeout(patience, connecting)
            .await
            .map_err(|_| failed(&"no answer in time"))?
            .map_err(|e| failed(&e))?;
        info!(edge = %to, "mesh connection up");
        let open = self.open.with_label_values(&["out"]);
        open.inc();
        let watched = watch(dialed.clone(), to, self.down.clone());
        tokio::spawn(async move {
            watched.await;
            open.dec();
        });
        *conn = Some(dialed.clone());
        Ok(dialed)
    }
}

/// How often a mesh connection's traffic is sampled ([`watch`]).
const SILENCE_SAMPLE: Duration = Duration::from_millis(100);
/// Samples in a row with nothing received that make a connection dead: 700 ms, more than two
/// keep-alive intervals of the peer (each side probes every 300 ms when idle, and each probe is
/// acknowledged), under half of the idle timeout.
const SILENT_SAMPLES: u32 = 7;

/// Watches a mesh connection this edge dialed until it closes: one that times out, or that
/// hears nothing for [`SILENT_SAMPLES`] samples, marks its edge down; a silent one is closed
/// at once, so the requests waiting on it (a kept-alive connection to a service through a dead
/// edge) fail now and go again to another holder where HTTP allows, instead of waiting out
/// the idle timeout.
async fn watch(conn: quinn::Connection, to: SocketAddr, down: Arc<Down>) {
    let mut heard = conn.stats().udp_rx.datagrams;
    let mut silent = 0;
    loop {
        tokio::select! {
            reason = conn.closed() => {
                if matches!(reason, quinn::ConnectionError::TimedOut) {
                    warn!(edge = %to, "mesh connection timed out; the edge is tried last for a while");
                    down.mark(to);
                }
                return;
            }
            () = tokio::time::sleep(SILENCE_SAMPLE) => {}
        }
        let now = conn.stats().udp_rx.datagrams;
        silent = if now == heard { silent + 1 } else { 0 };
        heard = now;
        if silent >= SILENT_SAMPLES {
            warn!(edge = %to, "nothing from the edge for 700 ms; closing the mesh connection, and the edge is tried last for a while");
            down.mark(to);
            conn.close(0u32.into(), b"silent");
            return;
        }
    }
}

/// Relays every stream another edge opens on `conn`, until it closes (the mesh endpoint
/// closes it once this edge has drained).
async fn serve_edge(conn: quinn::Connection, registry: Arc<Registry>) {
    debug!(edge = %conn.remote_address(), "mesh connection accepted");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                debug!(error = %e, "mesh connection ended");
                return;
            }
        };
        let registry = registry.clone();
        tokio::spawn(relay(send, recv, registry));
    }
}

/// One forwarded stream: to the devbox's agent on this edge, or "not here".
async fn relay(mut send: quinn::SendStream, mut recv: quinn::RecvStream, registry: Arc<Registry>) {
    let mut len = [0u8; 2];
    if recv.read_exact(&mut len).await.is_err() {
        return;
    }
    let mut id = vec![0u8; usize::from(u16::from_be_bytes(len))];
    if recv.read_exact(&mut id).await.is_err() {
        return;
    }
    let devbox = String::from_utf8_lossy(&id).into_owned();
    let agent = match registry.local_conn(&devbox) {
        Some(conn) => tokio::time::timeout(ANSWER_TIMEOUT, conn.open_bi()).await,
        None => {
            let _ = send.write_all(&[NOT_HERE]).await;
            let _ = send.finish();
            return;
        }
    };
    let Ok(Ok((mut agent_send, mut agent_recv))) = agent else {
        warn!(%devbox, "cannot open a stream to the agent for a forwarded request");
        let _ = send.write_all(&[NOT_HERE]).await;
        let _ = send.finish();
        return;
    };
    if send.write_all(&[RELAYING]).await.is_err() {
        return;
    }
    let inbound = async {
        tokio::io::copy(&mut recv, &mut agent_send).await?;
        agent_send.shutdown().await
    };
    let outbound = async {
        tokio::io::copy(&mut agent_recv, &mut send).await?;
        send.shutdown().await
    };
    if let Err(e) = tokio::try_join!(inbound, outbound) {
        debug!(%devbox, error = %e, "forwarded stream ended with an error");
        let code = burrow_protocol::reset::EDGE_ABORT;
        let _ = send.reset(code.into());
        let _ = agent_send.reset(code.into());
        let _ = recv.stop(code.into());
        let _ = agent_recv.stop(code.into());
    }
}
