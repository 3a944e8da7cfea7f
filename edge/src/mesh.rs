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
use std::time::Duration;

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
    /// Connections to other edges, by mesh address.
    conns: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
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
}

impl Mesh {
    /// Binds the mesh's UDP socket on `listen`.
    pub fn bind(listen: SocketAddr, tls: tls::MeshTls) -> std::io::Result<Mesh> {
        let endpoint = quinn::Endpoint::server(tls.server, listen)?;
        Ok(Mesh {
            endpoint,
            client: tls.client,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Relays the streams other edges open, until `shutdown`.
    pub fn serve(
        self: &Arc<Self>,
        registry: Arc<Registry>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        let endpoint = self.endpoint.clone();
        let inner = tasks.clone();
        tasks.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    incoming = endpoint.accept() => incoming,
                    () = shutdown.cancelled() => break,
                };
                let Some(incoming) = incoming else { break };
                let registry = registry.clone();
                let shutdown = shutdown.clone();
                inner.spawn(async move {
                    match incoming.await {
                        Ok(conn) => serve_edge(conn, registry, shutdown).await,
                        Err(e) => debug!(error = %e, "a mesh connection failed its handshake"),
                    }
                });
            }
            endpoint.close(0u32.into(), b"edge stopping");
        });
    }

    /// Opens a stream to `devbox`'s agent through the edge at `to`, sends `header` and waits
    /// for the agent's answer.
    pub async fn open(
        &self,
        to: SocketAddr,
        devbox: &str,
        header: &StreamHeader,
    ) -> Result<Forwarded, NotForwarded> {
        let conn = self.connection(to).await?;
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
        let answer = async {
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await.map_err(|e| failed(&e))?;
            if status[0] != RELAYING {
                return Err(NotForwarded::NotHere);
            }
            match wire::read_msg(&mut recv, StreamAnswer::decode).await {
                Ok(Some(StreamAnswer::Accept)) => Ok(()),
                Ok(Some(StreamAnswer::Refuse(reason))) => {
                    Err(NotForwarded::Refused(reason, conn.stable_id()))
                }
                Ok(None) => Err(failed(&"the stream ended before the agent's answer")),
                Err(e) => Err(failed(&e)),
            }
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
            Ok(Ok(())) => Ok(Forwarded { send, recv, conn }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(failed(&"no answer in time")),
        }
    }

    /// The live connection to the edge at `to`, if there is one (none is dialed).
    pub async fn existing(&self, to: SocketAddr) -> Option<quinn::Connection> {
        let conns = self.conns.lock().await;
        conns
            .get(&to)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The connection to the edge at `to`, dialed if there is none or it closed.
    async fn connection(&self, to: SocketAddr) -> Result<quinn::Connection, NotForwarded> {
        let mut conns = self.conns.lock().await;
        if let Some(conn) = conns.get(&to).filter(|c| c.close_reason().is_none()) {
            return Ok(conn.clone());
        }
        let failed = |e: &dyn std::fmt::Display| {
            NotForwarded::Failed(format!("cannot reach the edge at {to}: {e}"))
        };
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), to, tls::MESH_NAME)
            .map_err(|e| failed(&e))?;
        let conn = tokio::time::timeout(DIAL_TIMEOUT, connecting)
            .await
            .map_err(|_| failed(&"no answer in time"))?
            .map_err(|e| failed(&e))?;
        info!(edge = %to, "mesh connection up");
        conns.insert(to, conn.clone());
        Ok(conn)
    }
}

/// Relays every stream another edge opens on `conn`.
async fn serve_edge(conn: quinn::Connection, registry: Arc<Registry>, shutdown: CancellationToken) {
    debug!(edge = %conn.remote_address(), "mesh connection accepted");
    loop {
        let (send, recv) = tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok(streams) => streams,
                Err(e) => {
                    debug!(error = %e, "mesh connection ended");
                    return;
                }
            },
            () = shutdown.cancelled() => return,
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
