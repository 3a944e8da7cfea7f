//! One connection to the edge: dial, hello, welcome, then serve data streams and the control
//! stream until the connection ends, the edge asks the agent to go away, the path proves dead,
//! or shutdown is asked for.
//!
//! Liveness is decided by [`burrow_protocol::liveness::Liveness`]; this module only drives it:
//! it sleeps until the machine's deadline, feeds it pongs, resumes and the edge's go-away, and
//! carries out what it asks (write a ping, move to a fresh UDP socket, give up on the path).
//! The heartbeat stops once either side says go-away: a draining connection is not probed.

use bytes::Bytes;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use burrow_protocol::liveness::{Heartbeat, Liveness, Output, Probe};
use burrow_protocol::machine::{AgentAction, AgentControl};
use burrow_protocol::{
    ControlMsg, GoAway, GoAwayReason, Hello, RefuseReason, Reject, TunnelState, VERSION, Welcome,
};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::forward::{self, Limits};
use crate::metrics::Metrics;
use crate::status::Status;
use crate::tls::StreamCredit;
use burrow_runtime::wire::{self, WireError};

/// The QUIC application close codes, named in the protocol crate (the agent sends `SHUTDOWN`,
/// `PROTOCOL` and `DEAD`).
pub use burrow_protocol::close;

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

/// How this agent introduces itself in one hello ([`crate::identity`] draws it).
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Random per connection attempt.
    pub instance: u64,
    /// The instance of this agent's last connection the edge accepted; 0 if none.
    pub previous: u64,
    /// Whether to replace a live session of another agent.
    pub takeover: bool,
}

/// An established session.
#[derive(Debug)]
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control: wire::ControlRx,
    welcome: Welcome,
    machine: AgentControl,
    /// Where the other edges the edge tells of go ([`Session::learn_into`]).
    learned: Option<Learned>,
}

/// The other edges of the cluster, as the edges told of them (`host:port` each): the agent
/// dials them too, after the configured ones. Shared by the agent's connections.
pub type Learned = Arc<std::sync::Mutex<Vec<String>>>;

/// Every address of every configured edge, in order, each once: resolved afresh for each dial
/// (a name may point elsewhere after a failover).
pub async fn resolve(edges: &[String]) -> Result<Vec<SocketAddr>, SessionError> {
    let mut addrs = Vec::new();
    let mut last_error = None;
    for edge in edges {
        match tokio::net::lookup_host(edge).await {
            Ok(found) => {
                for addr in found {
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
            }
            Err(e) => last_error = Some(SessionError::Resolve(edge.clone(), e.to_string())),
        }
    }
    match (addrs.is_empty(), last_error) {
        (false, _) => Ok(addrs),
        (true, Some(e)) => Err(e),
        (true, None) => Err(SessionError::Resolve(edges.join(","), "no address".into())),
    }
}

impl Session {
    /// Dials the edge at `addr` from a fresh UDP socket, and exchanges hello and welcome.
    pub async fn connect(
        config: &Config,
        client: &quinn::ClientConfig,
        identity: Identity,
        addr: SocketAddr,
    ) -> Result<Session, SessionError> {
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
            previous: identity.previous,
            wants: burrow_protocol::control::WANTS_EDGES,
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
                learned: None,
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

    /// The other edges this session's edge tells of go to `learned`.
    pub fn learn_into(&mut self, learned: Learned) {
        self.learned = Some(learned);
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
        let mut serving = Serving::new(self, config, status, metrics);
        resumes.borrow_and_update();
        let ended = serving.run(resumes, shutdown).await;
        serving.end(ended, config.drain_grace, drains).await
    }
}

/// A session while it serves: the connection, the control stream with its two machines (the
/// message order and liveness), and the data streams it runs.
struct Serving {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control: wire::ControlRx,
    machine: AgentControl,
    live: Liveness,
    /// UDP datagrams received from the edge when the last nudge went out (`None`: it did not):
    /// a nudge interval later, the same count means silence ([`Liveness::handle_silence`]).
    heard_at_nudge: Option<u64>,
    streams: Streams,
    learned: Option<Learned>,
}

/// What running the edge's data streams takes; owned, so a connection the edge is moving the
/// agent off can go on taking streams after the session loop ended ([`Serving::end`]).
struct Streams {
    conn: quinn::Connection,
    limits: Arc<Limits>,
    slots: Arc<Semaphore>,
    credit: StreamCredit,
    tasks: TaskTracker,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
}

impl Serving {
    fn new(
        session: Session,
        config: &Config,
        status: &watch::Sender<Status>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let heartbeat = Heartbeat {
            interval: config.liveness.heartbeat_interval,
            timeout: config.liveness.heartbeat_timeout,
        };
        Serving {
            endpoint: session.endpoint,
            conn: session.conn.clone(),
            control_send: session.control_send,
            control: session.control,
            machine: session.machine,
            live: Liveness::new(now(), heartbeat)
                .with_nudges(now(), config.liveness.nudge_interval),
            heard_at_nudge: None,
            learned: session.learned,
            streams: Streams {
                conn: session.conn.clone(),
                limits: Arc::new(Limits {
                    policy: config.policy.clone(),
                    connect_timeout: config.connect_timeout,
                }),
                slots: Arc::new(Semaphore::new(config.max_streams)),
                credit: StreamCredit::new(config.max_streams),
                tasks: TaskTracker::new(),
                status: status.clone(),
                metrics: metrics.clone(),
            },
        }
    }

    /// Serves until something ends the session. Every event goes to its handler, then the
    /// liveness machine's outputs are carried out.
    async fn run(
        &mut self,
        resumes: &mut watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let mut resumes_open = true;
        loop {
            let deadline = self.live.poll_timeout().map(Instant::from_std);
            let step = tokio::select! {
                () = shutdown.cancelled() => ControlFlow::Break(Ended::Shutdown),
                accepted = self.conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        self.streams.spawn(send, recv);
                        ControlFlow::Continue(())
                    }
                    Err(e) => ControlFlow::Break(Ended::Lost(e.into())),
                },
                msg = self.control.recv() => self.on_control(msg.map(|m| *m)).await,
                changed = resumes.changed(), if resumes_open => {
                    match changed {
                        Ok(()) => self.live.handle_resume(now()),
                        Err(_) => resumes_open = false,
                    }
                    ControlFlow::Continue(())
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.live.handle_timeout(now());
                    ControlFlow::Continue(())
                }
            };
            if let ControlFlow::Break(ended) = step {
                return ended;
            }
            if let ControlFlow::Break(ended) = self.drive().await {
                return ended;
            }
        }
    }

    /// Takes what the control stream brought: a message, its end, or a read error.
    async fn on_control(
        &mut self,
        msg: Option<Result<ControlMsg, WireError>>,
    ) -> ControlFlow<Ended> {
        let step = match msg.transpose() {
            Ok(Some(msg)) => self.machine.on_message(msg),
            Ok(None) => self
                .machine
                .on_end_of_stream()
                .map(|()| AgentAction::Nothing),
            Err(e) => {
                if matches!(e, WireError::Decode(_) | WireError::Truncated) {
                    self.conn
                        .close(close::PROTOCOL.into(), b"bad control frame");
                }
                return ControlFlow::Break(Ended::Lost(e.into()));
            }
        };
        match step {
            Ok(AgentAction::Reply(reply)) => {
                if let Err(e) = wire::write_frame(&mut self.control_send, reply.encoded()).await {
                    return ControlFlow::Break(Ended::Lost(e.into()));
                }
            }
            Ok(AgentAction::Pong { seq }) => self.live.handle_pong(now(), seq),
            Ok(AgentAction::TunnelChanged(update)) => {
                match &update {
                    Some(t) => {
                        info!(key = %t.key, mode = t.auth_mode.as_str(), url = %t.url_template, "tunnel updated")
                    }
                    None => info!("tunnel disabled"),
                }
                self.streams.status.send_modify(|s| s.tunnel = update);
            }
            Ok(AgentAction::PeerGoingAway(go_away)) => self.live.handle_go_away(go_away),
            Ok(AgentAction::Edges(edges)) => self.learn(edges),
            Ok(AgentAction::Nothing | AgentAction::Welcomed(_) | AgentAction::Rejected(_)) => {}
            Err(violation) => {
                let what = violation.to_string();
                self.conn.close(close::PROTOCOL.into(), what.as_bytes());
                return ControlFlow::Break(Ended::Lost(SessionError::Protocol(what)));
            }
        }
        ControlFlow::Continue(())
    }

    /// Keeps the other edges the edge told of (each `host:port`; anything else is dropped).
    fn learn(&mut self, edges: Vec<String>) {
        let Some(learned) = &self.learned else { return };
        let edges: Vec<String> = edges
            .into_iter()
            .filter(|e| crate::edges::is_host_port(e))
            .collect();
        let mut known = learned.lock().unwrap_or_else(|p| p.into_inner());
        if *known != edges {
            info!(edges = ?edges, "the edge told of the cluster's other edges");
            *known = edges;
        }
    }

    /// Carries out what the liveness machine asks, in order; breaks when the session ends.
    async fn drive(&mut self) -> ControlFlow<Ended> {
        while let Some(output) = self.live.poll() {
            match output {
                Output::Transmit(msg) => {
                    self.machine.sent(&msg);
                    // A failed write needs no handling here: a ping that did not go out shows
                    // up as a missed pong, and a go-away is followed by the close anyway.
                    let _ = wire::write_frame(&mut self.control_send, msg.encoded()).await;
                }
                Output::Rebind => self.rebind(),
                Output::Answered { probe, rtt } => {
                    if probe != Probe::Heartbeat {
                        let rtt_ms = rtt.as_millis() as u64;
                        info!(rtt_ms, "the connection answered the probe");
                    }
                    self.streams.status.send_modify(|s| s.rtt = Some(rtt));
                    self.streams.metrics.pong(rtt);
                }
                Output::Dead(why) => return ControlFlow::Break(Ended::Dead(why.as_str())),
                Output::PeerGoingAway(go_away) => {
                    return ControlFlow::Break(Ended::GoAway(go_away));
                }
                Output::Nudge => {
                    // Nothing from the edge since the last nudge, not even its ACK: the
                    // heartbeat goes now.
                    let heard = self.conn.stats().udp_rx.datagrams;
                    if self.heard_at_nudge == Some(heard) {
                        debug!("nothing from the edge for a nudge interval; probing now");
                        self.live.handle_silence(now());
                    }
                    // One byte in a QUIC datagram: acknowledged by the edge, never sent again.
                    // An edge too old to take datagrams just gets no nudges.
                    self.heard_at_nudge = match self.conn.send_datagram(Bytes::from_static(&[0])) {
                        Ok(()) => Some(heard),
                        Err(e) => {
                            debug!(error = %e, "nudge not sent");
                            None
                        }
                    };
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// Moves the endpoint to a fresh UDP socket: the connection migrates if the edge still
    /// holds it. Failing that, the probe that follows goes out on the old socket.
    fn rebind(&self) {
        warn!("heartbeat unanswered; moving to a fresh UDP socket and probing");
        match std::net::UdpSocket::bind(unspecified(self.conn.remote_address())) {
            Ok(socket) => {
                if let Err(e) = self.endpoint.rebind(socket) {
                    debug!(error = %e, "rebind failed");
                }
            }
            Err(e) => debug!(error = %e, "no fresh UDP socket"),
        }
    }

    /// Closes the session the way it ended. The liveness machine is no longer driven: no
    /// heartbeat goes out while streams drain.
    async fn end(mut self, ended: Ended, grace: Duration, drains: &TaskTracker) -> Ended {
        match &ended {
            Ended::Shutdown => {
                self.streams.tasks.close();
                // Tell the edge first, so new requests wait for another agent session (or
                // fail fast) instead of landing here; then let running streams finish.
                self.live.start_drain(GoAway {
                    reason: GoAwayReason::Shutdown,
                    message: "the agent is shutting down".into(),
                });
                let _ = self.drive().await;
                let tasks = &self.streams.tasks;
                if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
                    warn!(
                        streams = tasks.len(),
                        "drain grace over; closing running streams"
                    );
                }
                self.conn
                    .close(close::SHUTDOWN.into(), b"agent shutting down");
                self.endpoint.wait_idle().await;
            }
            Ended::GoAway(go_away) => {
                // The edge is moving this agent off (it drains or stops) or replaced it. While
                // it moves, make before break: this connection goes on taking the streams the
                // edge still opens until the reconnect loop's next connection is up (or the
                // grace is over), then finishes the running ones and closes.
                let moving = !matches!(
                    go_away.reason,
                    GoAwayReason::Replaced | GoAwayReason::Revoked
                );
                let Serving {
                    endpoint,
                    conn,
                    mut streams,
                    ..
                } = self;
                let mut next = streams.status.subscribe();
                let before = next.borrow().sessions;
                drains.spawn(async move {
                    let deadline = tokio::time::Instant::now() + grace;
                    if moving {
                        let next_up = tokio::time::timeout_at(
                            deadline,
                            next.wait_for(|s| s.sessions > before),
                        );
                        tokio::pin!(next_up);
                        loop {
                            tokio::select! {
                                _ = &mut next_up => break,
                                accepted = conn.accept_bi() => match accepted {
                                    Ok((send, recv)) => streams.spawn(send, recv),
                                    Err(_) => break,
                                },
                            }
                        }
                    }
                    streams.tasks.close();
                    let _ = tokio::time::timeout_at(deadline, streams.tasks.wait()).await;
                    conn.close(close::SHUTDOWN.into(), b"drained");
                    endpoint.wait_idle().await;
                });
            }
            Ended::Dead(why) => self.conn.close(close::DEAD.into(), why.as_bytes()),
            Ended::Lost(_) => {}
        }
        ended
    }
}

impl Streams {
    /// Serves one data stream the edge opened, in a task of its own.
    fn spawn(&mut self, send: quinn::SendStream, recv: quinn::RecvStream) {
        let slots = self.slots.clone();
        let limits = self.limits.clone();
        let span = info_span!("stream", stream_id = %send.id());
        let status = self.status.clone();
        let metrics = self.metrics.clone();
        let mut open = 0;
        status.send_modify(|s| {
            s.streams += 1;
            open = s.streams;
        });
        if let Some(credit) = self.credit.raise(open) {
            debug!(open, credit, "more stream credit for the edge");
            self.conn.set_max_concurrent_bi_streams(credit.into());
        }
        metrics.streams_open.inc();
        self.tasks.spawn(
            async move {
                let permit = forward::slot(slots).await;
                let refuse = permit.is_none().then_some(RefuseReason::TooManyStreams);
                let started = Instant::now();
                let answered = |port, answer| metrics.answered(port, answer);
                match forward::serve(send, recv, &limits, refuse, answered).await {
                    Ok((port, outcome)) => metrics.ended(port, outcome, started.elapsed()),
                    Err(e) => debug!(error = %e, "stream ended early"),
                }
                metrics.streams_open.dec();
                status.send_modify(|s| s.streams = s.streams.saturating_sub(1));
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// The current time, as the liveness machine takes it. tokio's clock, so `tokio::time::pause()`
/// moves it too.
fn now() -> std::time::Instant {
    Instant::now().into_std()
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
