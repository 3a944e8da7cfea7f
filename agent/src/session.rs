//! One connection to the edge: dial, hello, welcome, then serve data streams and the control
//! stream until the connection ends, the edge asks the agent to go away, the path proves dead,
//! or shutdown is asked for.
//!
//! Liveness: a heartbeat ping every `heartbeat_interval`; a pong late by `heartbeat_timeout`
//! makes the path suspect, so the endpoint moves to a fresh UDP socket (the connection migrates
//! if the edge still has it) and probes once more; a second miss ends the session as dead. A
//! detected resume probes at once with the same deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow_protocol::{
    ControlMsg, GoAway, GoAwayReason, Hello, RefuseReason, Reject, TunnelState, VERSION, Welcome,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use burrow_protocol::machine::{AgentAction, AgentControl};

use crate::config::Config;
use crate::forward::{self, Limits};
use crate::metrics::Metrics;
use crate::status::Status;
use burrow_runtime::wire::{self, WireError};

/// QUIC application close codes the agent uses.
pub mod close {
    /// Clean shutdown, or a drained connection.
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 2;
    /// The path stopped answering; the agent dials anew.
    pub const DEAD: u32 = 5;
}

/// Why a session could not be established or ended with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The edge address did not resolve.
    #[error("cannot resolve edge address `{0}`: {1}")]
    Resolve(String, String),
    /// The local UDP socket could not be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    /// The QUIC handshake failed (unreachable, certificate not trusted, ...).
    #[error("cannot connect to the edge at {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// The connection could not be started (bad server name, ...).
    #[error("cannot start a connection: {0}")]
    Start(#[from] quinn::ConnectError),
    /// The control stream failed.
    #[error("control stream: {0}")]
    Wire(#[from] WireError),
    /// The connection failed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The dial did not complete in time.
    #[error("no answer from the edge within {0:?}")]
    Timeout(Duration),
    /// The edge refused this agent.
    #[error("the edge refused the agent ({:?}): {}", .0.reason, .0.message)]
    Rejected(Reject),
    /// The edge sent something out of place.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// How a session ended.
#[derive(Debug)]
pub enum Ended {
    /// Shutdown was asked for; the agent said go-away and drained.
    Shutdown,
    /// The edge asked the agent to go away; running streams finish in the background.
    GoAway(GoAway),
    /// Heartbeats or a resume probe went unanswered: the path is gone.
    Dead(&'static str),
    /// The connection failed or the edge closed it.
    Lost(SessionError),
}

/// How this agent introduces itself.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Random per process.
    pub instance: u64,
    /// Whether to replace a live session of another instance.
    pub takeover: bool,
}

/// An established session.
#[derive(Debug)]
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control: mpsc::Receiver<Result<ControlMsg, WireError>>,
    welcome: Welcome,
    machine: AgentControl,
}

/// Where a heartbeat stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// A regular heartbeat.
    Heartbeat,
    /// After a missed heartbeat, on a fresh socket.
    Rebound,
    /// After a detected resume.
    Resume,
}

#[derive(Debug)]
struct Outstanding {
    seq: u64,
    sent: Instant,
    deadline: Instant,
    probe: Probe,
}

impl Session {
    /// Resolves the edge, dials it from a fresh UDP socket, and exchanges hello and welcome.
    pub async fn connect(
        config: &Config,
        client: &quinn::ClientConfig,
        identity: Identity,
    ) -> Result<Session, SessionError> {
        let addr = tokio::net::lookup_host(&config.edge)
            .await
            .map_err(|e| SessionError::Resolve(config.edge.clone(), e.to_string()))?
            .next()
            .ok_or_else(|| SessionError::Resolve(config.edge.clone(), "no address".into()))?;
        let endpoint = quinn::Endpoint::client(unspecified(addr)).map_err(SessionError::Socket)?;
        let conn = endpoint
            .connect_with(client.clone(), addr, &config.server_name)?
            .await
            .map_err(|source| SessionError::Connect { addr, source })?;
        let (mut control_send, mut control_recv) = conn.open_bi().await?;
        let hello = Hello {
            min_version: VERSION,
            max_version: VERSION,
            token: config.current_token(),
            agent: concat!("burrow-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
            instance: identity.instance,
            takeover: identity.takeover,
        };
        let mut machine = AgentControl::new(&hello);
        wire::write_frame(&mut control_send, ControlMsg::Hello(hello).encoded()).await?;
        let step = match wire::read_msg(&mut control_recv, ControlMsg::decode).await? {
            Some(msg) => machine.on_message(msg),
            None => machine.on_end_of_stream().map(|()| AgentAction::Nothing),
        };
        match step {
            Ok(AgentAction::Welcomed(welcome)) => Ok(Session {
                endpoint,
                conn,
                control_send,
                control: wire::spawn_control_reader(control_recv),
                welcome,
                machine,
            }),
            Ok(AgentAction::Rejected(reject)) => Err(SessionError::Rejected(reject)),
            Ok(_) => Err(SessionError::Protocol(
                "the edge answered the hello with neither welcome nor reject".into(),
            )),
            Err(violation) => {
                let what = violation.to_string();
                conn.close(close::PROTOCOL.into(), what.as_bytes());
                Err(SessionError::Protocol(what))
            }
        }
    }

    /// The devbox this agent serves.
    pub fn devbox_id(&self) -> &str {
        &self.welcome.devbox_id
    }

    /// The QUIC connection (for its stats).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The tunnel as the edge announced it.
    pub fn tunnel(&self) -> Option<&TunnelState> {
        self.welcome.tunnel.as_ref()
    }

    /// Serves streams until the session ends. Connections that end by go-away keep draining
    /// in `drains` after this returns.
    pub async fn serve(
        self,
        config: &Config,
        status: &watch::Sender<Status>,
        resumes: &mut watch::Receiver<u64>,
        drains: &TaskTracker,
        metrics: &Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let Session {
            endpoint,
            conn,
            mut control_send,
            mut control,
            welcome: _,
            mut machine,
        } = self;
        let limits = Arc::new(Limits {
            policy: config.policy.clone(),
            connect_timeout: config.connect_timeout,
        });
        let slots = Arc::new(Semaphore::new(config.max_streams));
        let tasks = TaskTracker::new();
        let liveness = config.liveness;
        let mut heartbeat = tokio::time::interval(liveness.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut outstanding: Option<Outstanding> = None;
        resumes.borrow_and_update();
        let mut resumes_open = true;

        let ended = loop {
            let deadline = outstanding.as_ref().map(|o| o.deadline);
            tokio::select! {
                () = shutdown.cancelled() => break Ended::Shutdown,
                accepted = conn.accept_bi() => {
                    let (send, recv) = match accepted {
                        Ok(pair) => pair,
                        Err(e) => break Ended::Lost(e.into()),
                    };
                    let permit = slots.clone().try_acquire_owned().ok();
                    let refuse = permit.is_none().then_some(RefuseReason::TooManyStreams);
                    let limits = limits.clone();
                    let span = info_span!("stream", stream_id = %send.id());
                    let status = status.clone();
                    let metrics = metrics.clone();
                    status.send_modify(|s| s.streams += 1);
                    metrics.streams_open.inc();
                    tasks.spawn(async move {
                        let started = Instant::now();
                        let answered = |port, answer| metrics.answered(port, answer);
                        match forward::serve(send, recv, &limits, refuse, answered).await {
                            Ok((port, outcome)) => metrics.ended(port, outcome, started.elapsed()),
                            Err(e) => debug!(error = %e, "stream ended early"),
                        }
                        metrics.streams_open.dec();
                        status.send_modify(|s| s.streams = s.streams.saturating_sub(1));
                        drop(permit);
                    }.instrument(span));
                }
                msg = control.recv() => {
                    let step = match msg.transpose() {
                        Ok(Some(msg)) => machine.on_message(msg),
                        Ok(None) => machine.on_end_of_stream().map(|()| AgentAction::Nothing),
                        Err(e) => {
                            if matches!(e, WireError::Decode(_) | WireError::Truncated) {
                                conn.close(close::PROTOCOL.into(), b"bad control frame");
                            }
                            break Ended::Lost(e.into());
                        }
                    };
                    match step {
                        Ok(AgentAction::Reply(reply)) => {
                            if let Err(e) = wire::write_frame(&mut control_send, reply.encoded()).await {
                                break Ended::Lost(e.into());
                            }
                        }
                        Ok(AgentAction::Answered { seq: answered }) => {
                            if let Some(o) = outstanding.take_if(|o| o.seq == answered) {
                                let rtt = o.sent.elapsed();
                                if o.probe != Probe::Heartbeat {
                                    info!(rtt_ms = rtt.as_millis() as u64, "the connection answered the probe");
                                }
                                status.send_modify(|s| s.rtt = Some(rtt));
                                metrics.pong(rtt);
                            }
                        }
                        Ok(AgentAction::TunnelChanged(update)) => {
                            match &update {
                                Some(t) => info!(key = %t.key, mode = t.auth_mode.as_str(), url = %t.url_template, "tunnel updated"),
                                None => info!("tunnel disabled"),
                            }
                            status.send_modify(|s| s.tunnel = update);
                        }
                        Ok(AgentAction::PeerGoingAway(go_away)) => break Ended::GoAway(go_away),
                        Ok(AgentAction::Nothing | AgentAction::Welcomed(_) | AgentAction::Rejected(_)) => {}
                        Err(violation) => {
                            let what = violation.to_string();
                            conn.close(close::PROTOCOL.into(), what.as_bytes());
                            break Ended::Lost(SessionError::Protocol(what));
                        }
                    }
                }
                _ = heartbeat.tick(), if outstanding.is_none() => {
                    seq += 1;
                    outstanding = Some(ping(&mut control_send, &mut machine, seq, Probe::Heartbeat, liveness.heartbeat_timeout).await);
                }
                changed = resumes.changed(), if resumes_open => {
                    if changed.is_err() {
                        resumes_open = false;
                        continue;
                    }
                    seq += 1;
                    outstanding = Some(ping(&mut control_send, &mut machine, seq, Probe::Resume, liveness.heartbeat_timeout).await);
                }
                () = sleep_until(deadline) => {
                    let Some(missed) = outstanding.take() else { continue };
                    match missed.probe {
                        Probe::Heartbeat => {
                            warn!("heartbeat unanswered; moving to a fresh UDP socket and probing");
                            match std::net::UdpSocket::bind(unspecified(conn.remote_address())) {
                                Ok(socket) => {
                                    if let Err(e) = endpoint.rebind(socket) {
                                        debug!(error = %e, "rebind failed");
                                    }
                                }
                                Err(e) => debug!(error = %e, "no fresh UDP socket"),
                            }
                            seq += 1;
                            outstanding = Some(ping(&mut control_send, &mut machine, seq, Probe::Rebound, liveness.heartbeat_timeout).await);
                        }
                        Probe::Rebound => break Ended::Dead("heartbeats unanswered"),
                        Probe::Resume => break Ended::Dead("no answer after resume"),
                    }
                }
            }
        };

        tasks.close();
        match &ended {
            Ended::Shutdown => {
                // Tell the edge first, so new requests wait for another agent session (or
                // fail fast) instead of landing here; then let running streams finish.
                let bye = ControlMsg::GoAway(GoAway {
                    reason: GoAwayReason::Shutdown,
                    message: "the agent is shutting down".into(),
                });
                let _ = wire::write_frame(&mut control_send, bye.encoded()).await;
                if tokio::time::timeout(config.drain_grace, tasks.wait())
                    .await
                    .is_err()
                {
                    warn!(
                        streams = tasks.len(),
                        "drain grace over; closing running streams"
                    );
                }
                conn.close(close::SHUTDOWN.into(), b"agent shutting down");
                endpoint.wait_idle().await;
            }
            Ended::GoAway(_) => {
                // The edge keeps serving running streams on this connection; finish them in
                // the background while the reconnect loop dials again.
                let grace = config.drain_grace;
                drains.spawn(async move {
                    let _ = tokio::time::timeout(grace, tasks.wait()).await;
                    conn.close(close::SHUTDOWN.into(), b"drained");
                    endpoint.wait_idle().await;
                });
            }
            Ended::Dead(why) => conn.close(close::DEAD.into(), why.as_bytes()),
            Ended::Lost(_) => {}
        }
        ended
    }
}

/// Sends a ping and returns what to wait for.
async fn ping(
    control: &mut quinn::SendStream,
    machine: &mut AgentControl,
    seq: u64,
    probe: Probe,
    timeout: Duration,
) -> Outstanding {
    let msg = ControlMsg::Ping { seq };
    machine.sent(&msg);
    // A failed write shows up as a missed pong.
    let _ = wire::write_frame(control, msg.encoded()).await;
    let sent = Instant::now();
    Outstanding {
        seq,
        sent,
        deadline: sent + timeout,
        probe,
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The wildcard address of the same family as `addr`, port 0.
fn unspecified(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    }
}
