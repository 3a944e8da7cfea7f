//! The QUIC listener for agents: handshake, hello, token check, welcome, then the control
//! stream for as long as the connection lives. One live session per devbox: a newer connection
//! replaces an older one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use burrow_protocol::machine::{EdgeAction, EdgeControl};
use burrow_protocol::{ControlMsg, GoAway, GoAwayReason, Reject, RejectReason, VERSION, Welcome};
use burrow_runtime::wire::{self, WireError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::Metrics;
use crate::registry::{AgentSession, AttachError, Attached, Registry};

/// How long an agent has to complete the handshake and send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close codes the edge uses.
pub mod close {
    /// The edge is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The agent was refused (bad token, version).
    pub const REJECTED: u32 = 1;
    /// The agent broke the protocol.
    pub const PROTOCOL: u32 = 2;
    /// A newer connection of the same devbox took over.
    pub const REPLACED: u32 = 3;
    /// The devbox was deleted.
    pub const REVOKED: u32 = 4;
}

/// Accepts agent connections until `shutdown` fires, then tells every agent to go away.
pub async fn serve(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    drain_grace: Duration,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let registry = registry.clone();
        let metrics = metrics.clone();
        let remote = incoming.remote_address();
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                if let Err(e) = session(incoming, registry, metrics, shutdown).await {
                    debug!(error = %e, "agent session ended");
                }
            }
            .instrument(info_span!("agent", %remote)),
        );
    }
    // New handshakes are refused from now on, so agents told to go away fail fast and find
    // the next edge instead of waiting out a dial into this one.
    endpoint.set_server_config(None);
    for session in registry.sessions() {
        let _ = session.control.try_send(ControlMsg::GoAway(GoAway {
            reason: GoAwayReason::Shutdown,
            message: "the edge is shutting down".into(),
        }));
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    // Agents drain their running streams and then close; give them the grace period.
    let _ = tokio::time::timeout(drain_grace, endpoint.wait_idle()).await;
    endpoint.close(close::SHUTDOWN.into(), b"edge shutting down");
    // Let the close frames go out and the socket be released before returning: a restart on
    // the same address follows.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Sends a reject, gives it a moment to arrive, then closes the connection with its reason.
async fn reject(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    reason: RejectReason,
    message: &str,
) {
    let frame = ControlMsg::Reject(Reject {
        reason,
        message: message.to_owned(),
    })
    .encoded();
    let _ = wire::write_frame(send, frame).await;
    let _ = send.finish();
    // The close would overtake the reject; wait until the agent has read it (or a second).
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(close::REJECTED.into(), message.as_bytes());
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("control stream: {0}")]
    Wire(#[from] WireError),
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(&'static str),
}

async fn session(
    incoming: quinn::Incoming,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let setup = async {
        let conn = incoming.await?;
        let (send, mut recv) = conn.accept_bi().await?;
        let hello = wire::read_msg(&mut recv, ControlMsg::decode).await?;
        Ok::<_, SessionError>((conn, send, recv, hello))
    };
    let (conn, mut send, recv, hello) = tokio::time::timeout(HELLO_TIMEOUT, setup)
        .await
        .map_err(|_| SessionError::Timeout(HELLO_TIMEOUT))??;
    let mut machine = EdgeControl::new();
    let step = match hello {
        Some(msg) => machine.on_message(msg),
        None => machine.on_end_of_stream().map(|()| EdgeAction::Nothing),
    };
    let hello = match step {
        Ok(EdgeAction::Hello(hello)) => hello,
        Ok(_) => {
            let what = "the agent did not start with a hello".to_owned();
            conn.close(close::PROTOCOL.into(), what.as_bytes());
            return Err(SessionError::Protocol(what));
        }
        Err(violation) => {
            let what = violation.to_string();
            conn.close(close::PROTOCOL.into(), what.as_bytes());
            return Err(SessionError::Protocol(what));
        }
    };
    if !(hello.min_version..=hello.max_version).contains(&VERSION) {
        metrics
            .agent_hellos
            .with_label_values(&["bad_version"])
            .inc();
        let message = format!("this edge speaks protocol version {VERSION}");
        reject(&conn, &mut send, RejectReason::UnsupportedVersion, &message).await;
        return Err(SessionError::Refused("unsupported version"));
    }
    let (control_tx, mut control_rx) = mpsc::channel(16);
    let attached = registry.attach(hello.token.expose(), hello.takeover, |generation| {
        AgentSession {
            conn: conn.clone(),
            since: SystemTime::now(),
            generation,
            control: control_tx,
            instance: hello.instance,
        }
    });
    let Attached {
        devbox_id,
        generation,
        replaced,
        tunnel,
    } = match attached {
        Ok(attached) => attached,
        Err(AttachError::BadToken) => {
            metrics.agent_hellos.with_label_values(&["bad_token"]).inc();
            warn!(agent = %hello.agent, "agent presented an unknown or revoked token");
            let message = "unknown or revoked agent token";
            reject(&conn, &mut send, RejectReason::BadToken, message).await;
            return Err(SessionError::Refused("bad token"));
        }
        Err(AttachError::Busy) => {
            metrics.agent_hellos.with_label_values(&["busy"]).inc();
            let message = "another agent with this token is connected";
            reject(&conn, &mut send, RejectReason::Replaced, message).await;
            return Err(SessionError::Refused("another instance is connected"));
        }
    };

    metrics.agent_hellos.with_label_values(&["accepted"]).inc();
    let span = info_span!("session", devbox = %devbox_id);
    if let Some(old) = replaced {
        if old.instance == hello.instance {
            // The same agent dialed again: it has given up on the old connection (a dead
            // path, a resume). Close it so requests stuck on it retry on the new one.
            span.in_scope(|| info!("the agent reconnected; closing its previous connection"));
            old.conn
                .close(close::REPLACED.into(), b"replaced by a newer connection");
        } else {
            // Another agent holds the same token (a cloned snapshot): the newest wins, the
            // other is told why and finishes its running streams.
            span.in_scope(|| warn!("a second agent with this devbox's token connected; the previous one is told to stand by"));
            let _ = old.control.try_send(ControlMsg::GoAway(GoAway {
                reason: GoAwayReason::Replaced,
                message: "another agent with this devbox's token connected (a cloned devbox?); \
                          this one stands by"
                    .into(),
            }));
        }
    }
    let welcome = ControlMsg::Welcome(Welcome {
        version: VERSION,
        devbox_id: devbox_id.clone(),
        tunnel,
    });
    let mut control = wire::spawn_control_reader(recv);
    let result = async {
        wire::write_frame(&mut send, welcome.encoded()).await?;
        info!(agent = %hello.agent, remote = %conn.remote_address(), "agent connected");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // The listener sends the go-away; keep serving the control stream.
                    if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(1), control_rx.recv()).await {
                        machine.sent(&msg);
                        let _ = wire::write_frame(&mut send, msg.encoded()).await;
                    }
                    return Ok(());
                }
                msg = control_rx.recv() => {
                    let Some(msg) = msg else { return Ok(()) };
                    machine.sent(&msg);
                    wire::write_frame(&mut send, msg.encoded()).await?;
                }
                msg = control.recv() => {
                    let step = match msg.transpose()? {
                        Some(msg) => machine.on_message(msg),
                        None => return Ok(()),
                    };
                    match step {
                        Ok(EdgeAction::Reply(reply)) => {
                            wire::write_frame(&mut send, reply.encoded()).await?;
                        }
                        Ok(EdgeAction::PeerGoingAway(go_away)) => {
                            // The agent is leaving: no new requests for it; running streams
                            // finish on this connection until the agent closes it.
                            info!(message = %go_away.message, "agent going away");
                            registry.detach(&devbox_id, generation);
                        }
                        Ok(EdgeAction::Nothing | EdgeAction::Answered { .. } | EdgeAction::Hello(_)) => {}
                        Err(violation) => {
                            let what = violation.to_string();
                            conn.close(close::PROTOCOL.into(), what.as_bytes());
                            return Err(SessionError::Protocol(what));
                        }
                    }
                }
                reason = conn.closed() => {
                    debug!(%reason, "connection closed");
                    return Ok(());
                }
            }
        }
    }
    .instrument(span.clone())
    .await;
    registry.detach(&devbox_id, generation);
    span.in_scope(|| match &result {
        Ok(()) => info!("agent disconnected"),
        Err(e) => info!(error = %e, "agent disconnected"),
    });
    result
}
