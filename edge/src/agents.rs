//! The QUIC listener for agents: handshake, hello, token check, welcome, then the control
//! stream for as long as the connection lives. One live session per devbox: a newer connection
//! replaces an older one. The hello's `instance` and `previous` tell whether the newer one is
//! the same agent (restarted or reconnecting: the old connection is closed) or a second agent
//! with the same token (a cloned devbox: the old one is told to stand by).
//!
//! The edge answers the agent's heartbeats and never pings itself; its side of liveness is a
//! passive [`Liveness`] machine that keeps the go-aways both ways, so an agent hears at most one
//! go-away from a connection (told to stand by, then the edge shutting down: only the first).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use burrow_protocol::control::WANTS_EDGES;
use burrow_protocol::liveness::{Liveness, Output};
use burrow_protocol::machine::{EdgeAction, EdgeControl};
use burrow_protocol::{
    ControlMsg, GoAway, GoAwayReason, Hello, Reject, RejectReason, VERSION, Welcome,
};
use burrow_runtime::wire::{self, WireError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::handshakes::{Admission, Handshakes, Place};
use crate::metrics::Metrics;
use crate::registry::{AgentSession, AttachError, Attached, Registry};

/// How long an agent has to complete the handshake and send its hello: a few round trips
/// suffice (the agent itself gives up on a dial after 3 s), and until then the connection holds
/// one of the edge's handshake places.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The QUIC application close codes, named in the protocol crate (the edge sends `SHUTDOWN`,
/// `REJECTED`, `PROTOCOL`, `REPLACED` and `REVOKED`).
pub use burrow_protocol::close;

/// Accepts agent connections until `shutdown` fires, then tells every agent to go away. At
/// most as many handshakes as `handshakes` allows are in progress at once.
pub async fn serve(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    handshakes: Handshakes,
    drain_grace: Duration,
    advertised: Option<Advertised>,
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
        let remote = incoming.remote_address();
        let place = match handshakes.admit(remote.ip(), incoming.remote_address_validated()) {
            Admission::Admitted(place) => place,
            Admission::Retry => {
                if let Err(e) = incoming.retry() {
                    // Only an address already proved cannot be asked again; it is ignored.
                    e.into_incoming().ignore();
                }
                continue;
            }
            Admission::Ignore(limit) => {
                metrics.limited.with_label_values(&[limit]).inc();
                debug!(%remote, limit, "too many agent handshakes; ignoring one");
                incoming.ignore();
                continue;
            }
        };
        let registry = registry.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let advertised = advertised.clone();
        tasks.spawn(
            async move {
                let served = session(incoming, place, registry, metrics, advertised, shutdown);
                if let Err(e) = served.await {
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
        let _ = session
            .control
            .try_send(Box::new(ControlMsg::GoAway(GoAway {
                reason: GoAwayReason::Shutdown,
                message: "the edge is shutting down".into(),
            })));
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

/// One agent connection: its hello, admission, then its control stream until it ends.
async fn session(
    incoming: quinn::Incoming,
    place: Place,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    advertised: Option<Advertised>,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let mut greeted = greet(incoming).await?;
    let (control_tx, control_rx) = mpsc::channel(16);
    let attached = admit(&mut greeted, &registry, &metrics, control_tx).await?;
    // Admitted: the handshake's place goes back, and the connection gets the windows its
    // data streams need (until now it could make the edge buffer only a few KiB).
    drop(place);
    greeted.conn.set_receive_window(quinn::VarInt::MAX);
    let Greeted {
        conn,
        send,
        recv,
        hello,
        machine,
    } = greeted;
    let Attached {
        devbox_id,
        generation,
        replaced,
        tunnel,
    } = attached;
    metrics.agent_hellos.with_label_values(&["accepted"]).inc();
    let span = info_span!("session", devbox = %devbox_id);
    if let Some(old) = replaced {
        span.in_scope(|| replace(&old, &hello));
    }
    let welcome = ControlMsg::Welcome(Welcome {
        version: VERSION,
        devbox_id: devbox_id.clone(),
        tunnel,
    });
    let mut control = Control {
        conn,
        send,
        control: wire::spawn_control_reader(recv),
        outbox: control_rx,
        machine,
        live: Liveness::passive(),
        registry: registry.clone(),
        devbox_id,
        generation,
        edges: advertised.filter(|_| hello.wants & WANTS_EDGES != 0),
    };
    let result = async {
        wire::write_frame(&mut control.send, welcome.encoded()).await?;
        let remote = control.conn.remote_address();
        info!(agent = %hello.agent, %remote, "agent connected");
        control.send_edges().await?;
        control.serve(&shutdown).await
    }
    .instrument(span.clone())
    .await;
    registry.detach(&control.devbox_id, generation);
    span.in_scope(|| match &result {
        Ok(()) => info!("agent disconnected"),
        Err(e) => info!(error = %e, "agent disconnected"),
    });
    result
}

/// An agent connection whose first message was a hello.
struct Greeted {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: Hello,
    machine: EdgeControl,
}

/// How long an edge of a cluster waits for other edges' changes before it refuses a token it
/// does not know (admin writes reach every edge within a second).
const TOKEN_CATCH_UP: Duration = Duration::from_millis(1500);

/// Completes the handshake and reads the hello, within [`HELLO_TIMEOUT`]. Anything but a hello
/// first closes the connection as a protocol error.
async fn greet(incoming: quinn::Incoming) -> Result<Greeted, SessionError> {
    let setup = async {
        let conn = incoming.await?;
        let (send, mut recv) = conn.accept_bi().await?;
        let hello = wire::read_msg(&mut recv, ControlMsg::decode).await?;
        Ok::<_, SessionError>((conn, send, recv, hello))
    };
    let (conn, send, recv, hello) = tokio::time::timeout(HELLO_TIMEOUT, setup)
        .await
        .map_err(|_| SessionError::Timeout(HELLO_TIMEOUT))??;
    let mut machine = EdgeControl::new();
    let step = match hello {
        Some(msg) => machine.on_message(msg),
        None => machine.on_end_of_stream().map(|()| EdgeAction::Nothing),
    };
    let what = match step {
        Ok(EdgeAction::Hello(hello)) => {
            return Ok(Greeted {
                conn,
                send,
                recv,
                hello,
                machine,
            });
        }
        Ok(_) => "the agent did not start with a hello".to_owned(),
        Err(violation) => violation.to_string(),
    };
    conn.close(close::PROTOCOL.into(), what.as_bytes());
    Err(SessionError::Protocol(what))
}

/// Checks the hello's version and token and attaches the session to its devbox; rejects the
/// agent otherwise.
async fn admit(
    greeted: &mut Greeted,
    registry: &Registry,
    metrics: &Metrics,
    control: mpsc::Sender<Box<ControlMsg>>,
) -> Result<Attached, SessionError> {
    let Greeted {
        conn, send, hello, ..
    } = greeted;
    if !(hello.min_version..=hello.max_version).contains(&VERSION) {
        metrics
            .agent_hellos
            .with_label_values(&["bad_version"])
            .inc();
        let message = format!("this edge speaks protocol version {VERSION}");
        reject(conn, send, RejectReason::UnsupportedVersion, &message).await;
        return Err(SessionError::Refused("unsupported version"));
    }
    // A token this edge does not know yet may be a devbox just registered through another
    // edge of the cluster: its change arrives within a second, so wait for it before refusing.
    let catch_up = tokio::time::Instant::now() + TOKEN_CATCH_UP;
    let attached = loop {
        // Registered before the attach: a change applied between a miss and the wait below
        // still wakes it (the CI met that race: refused after the whole wait).
        let mut applied = registry.next_applied().map(Box::pin);
        if let Some(applied) = applied.as_mut() {
            applied.as_mut().enable();
        }
        let attached = registry.attach(hello.token.expose(), hello.takeover, |generation| {
            AgentSession {
                conn: conn.clone(),
                since: SystemTime::now(),
                generation,
                control: control.clone(),
                instance: hello.instance,
                previous: hello.previous,
            }
        });
        let left = catch_up.saturating_duration_since(tokio::time::Instant::now());
        if let (Err(AttachError::BadToken), Some(applied)) = (&attached, applied) {
            if !left.is_zero() && tokio::time::timeout(left, applied).await.is_ok() {
                continue;
            }
        }
        break attached;
    };
    match attached {
        Ok(attached) => Ok(attached),
        Err(AttachError::BadToken) => {
            metrics.agent_hellos.with_label_values(&["bad_token"]).inc();
            warn!(agent = %hello.agent, "agent presented an unknown or revoked token");
            let message = "unknown or revoked agent token";
            reject(conn, send, RejectReason::BadToken, message).await;
            Err(SessionError::Refused("bad token"))
        }
        Err(AttachError::Busy) => {
            metrics.agent_hellos.with_label_values(&["busy"]).inc();
            let message = "another agent with this token is connected";
            reject(conn, send, RejectReason::Replaced, message).await;
            Err(SessionError::Refused("another instance is connected"))
        }
    }
}

/// Deals with the session the new one `hello` replaced.
fn replace(old: &AgentSession, hello: &Hello) {
    if old.continued_by(hello.instance, hello.previous) {
        // The same agent dialed again: it has given up on the old connection (a dead path, a
        // resume, or it was restarted and continues its instance chain from its state_dir).
        // Close it so requests stuck on it retry on the new one.
        info!("the agent restarted or reconnected; closing its previous connection");
        old.conn
            .close(close::REPLACED.into(), b"replaced by a newer connection");
    } else {
        // Another agent holds the same token (a cloned snapshot; its `previous` is not the
        // live session's instance): the newest wins, the other is told why and finishes its
        // running streams.
        warn!(
            "a second agent with this devbox's token connected; the previous one is told to stand by"
        );
        let _ = old.control.try_send(Box::new(ControlMsg::GoAway(GoAway {
            reason: GoAwayReason::Replaced,
            message: "another agent with this devbox's token connected (a cloned devbox?); \
                      this one stands by"
                .into(),
        })));
    }
}

/// An attached agent's control stream: what it reads and writes, its two machines (the message
/// order and liveness), and where it is registered.
struct Control {
    conn: quinn::Connection,
    send: quinn::SendStream,
    /// Messages read from the agent.
    control: wire::ControlRx,
    /// Messages for the agent, from the registry, the admin API and the listener.
    outbox: mpsc::Receiver<Box<ControlMsg>>,
    machine: EdgeControl,
    /// Passive: the edge answers the agent's pings and never pings itself; it keeps the
    /// go-aways, so the agent hears at most one from this connection.
    live: Liveness,
    registry: Arc<Registry>,
    devbox_id: String,
    generation: u64,
    /// The other edges, for an agent that takes them ([`WANTS_EDGES`]).
    edges: Option<Advertised>,
}

/// The other live edges of a cluster, as agents are told of them (`cluster.agents_addr` each):
/// updated as edges come and go.
pub type Advertised = tokio::sync::watch::Receiver<Arc<Vec<String>>>;

impl Control {
    /// Tells the agent the other edges (when it takes them and there are any), and marks them
    /// seen.
    async fn send_edges(&mut self) -> Result<(), SessionError> {
        let Some(edges) = self.edges.as_mut() else {
            return Ok(());
        };
        let list = edges.borrow_and_update().clone();
        if list.is_empty() {
            return Ok(());
        }
        self.send_msg(ControlMsg::Edges(list.to_vec())).await
    }

    /// Resolves when the other edges changed; never without them.
    async fn edges_changed(edges: &mut Option<Advertised>) {
        match edges {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    *edges = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Serves the control stream until it ends, the connection closes, or shutdown.
    async fn serve(&mut self, shutdown: &CancellationToken) -> Result<(), SessionError> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // The listener sends the go-away; keep serving the control stream.
                    let next = tokio::time::timeout(Duration::from_secs(1), self.outbox.recv());
                    if let Ok(Some(msg)) = next.await {
                        let _ = self.send_msg(*msg).await;
                    }
                    return Ok(());
                }
                msg = self.outbox.recv() => {
                    let Some(msg) = msg else { return Ok(()) };
                    self.send_msg(*msg).await?;
                }
                msg = self.control.recv() => {
                    let Some(msg) = msg.map(|m| *m).transpose()? else { return Ok(()) };
                    self.on_message(msg).await?;
                }
                () = Self::edges_changed(&mut self.edges) => self.send_edges().await?,
                reason = self.conn.closed() => {
                    debug!(%reason, "connection closed");
                    return Ok(());
                }
            }
        }
    }

    /// Sends a message to the agent. A go-away goes through the liveness machine, which lets
    /// only the first one out (a replaced session that then sees shutdown says nothing more).
    async fn send_msg(&mut self, msg: ControlMsg) -> Result<(), SessionError> {
        match msg {
            ControlMsg::GoAway(go_away) => {
                self.live.start_drain(go_away);
                self.drive().await
            }
            msg => {
                self.machine.sent(&msg);
                wire::write_frame(&mut self.send, msg.encoded()).await?;
                Ok(())
            }
        }
    }

    /// Takes one message from the agent.
    async fn on_message(&mut self, msg: ControlMsg) -> Result<(), SessionError> {
        match self.machine.on_message(msg) {
            Ok(EdgeAction::Reply(reply)) => {
                wire::write_frame(&mut self.send, reply.encoded()).await?;
            }
            Ok(EdgeAction::PeerGoingAway(go_away)) => {
                self.live.handle_go_away(go_away);
                self.drive().await?;
            }
            Ok(EdgeAction::Nothing | EdgeAction::Pong { .. } | EdgeAction::Hello(_)) => {}
            Err(violation) => {
                let what = violation.to_string();
                self.conn.close(close::PROTOCOL.into(), what.as_bytes());
                return Err(SessionError::Protocol(what));
            }
        }
        Ok(())
    }

    /// Carries out what the liveness machine asks, in order.
    async fn drive(&mut self) -> Result<(), SessionError> {
        while let Some(output) = self.live.poll() {
            match output {
                Output::Transmit(msg) => {
                    self.machine.sent(&msg);
                    wire::write_frame(&mut self.send, msg.encoded()).await?;
                }
                Output::PeerGoingAway(go_away) => {
                    // The agent is leaving: no new requests for it; running streams finish
                    // on this connection until the agent closes it.
                    info!(message = %go_away.message, "agent going away");
                    self.registry.detach(&self.devbox_id, self.generation);
                }
                // A passive machine never probes.
                Output::Rebind | Output::Answered { .. } | Output::Dead(_) | Output::Nudge => {}
            }
        }
        Ok(())
    }
}
