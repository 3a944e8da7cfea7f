//! Opening a data stream to a devbox's agent, for the last step of a request (forward, upgrade
//! or raw): the stream header, the agent's answer, and the bounded wait for an agent that is
//! away. The first try uses the agent connection the route step found; the registry is asked
//! again only when that one is missing or fails, for the connection that attached meanwhile.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use burrow_protocol::{Port, RefuseReason, StreamAnswer, StreamHeader, StreamKind, reset};
use burrow_runtime::wire;
use http::StatusCode;
use tokio::time::Instant;
use tracing::debug;

use crate::cluster::Forwarding;
use crate::mesh::NotForwarded;
use crate::metrics::Metrics;
use crate::pages::{self, Answer};
use crate::registry::Registry;
use crate::route::{self, Routed};

/// How long the agent may take to answer a stream header (it dials the service meanwhile, with
/// a connect timeout of its own, 5 s by default, for each loopback address).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens data streams to agents.
#[derive(Debug)]
pub struct Dialer {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// How long a request waits for an absent agent.
    agent_wait: Duration,
    /// Requests waiting per devbox, at most.
    max_waiting: usize,
    /// On an edge of a cluster: the other edges a request can go to.
    forwarding: Option<Forwarding>,
    /// The pool's connection ids of streams through another edge: one per mesh connection and
    /// devbox ([`Dialer::forward_id`]).
    forward_ids: std::sync::Mutex<HashMap<(usize, String), usize>>,
    /// Waking devboxes of `wake_on_http` tunnels, when the platform is told of it.
    wake: Option<Wake>,
}

/// How a request wakes a suspended devbox: the platform is asked once (`devbox.wake`), and
/// requests wait for its agent up to `wait` instead of `agents.wait`.
#[derive(Clone)]
pub struct Wake {
    /// How long a request waits for a woken devbox's agent (`platform.wake_wait`).
    pub wait: Duration,
    /// Asks the platform to wake a devbox (sends `devbox.wake`).
    pub ask: Arc<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wake")
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

/// A data stream the agent accepted.
#[derive(Debug)]
pub struct Opened {
    /// Toward the service.
    pub send: quinn::SendStream,
    /// From the service.
    pub recv: quinn::RecvStream,
    /// The agent connection it is on ([`quinn::Connection::stable_id`]).
    pub conn_id: usize,
    /// That connection (a mesh connection when `forwarded`).
    pub conn: quinn::Connection,
    /// Through another edge (`conn_id` is then the pool's id for the mesh connection and the
    /// devbox).
    pub forwarded: bool,
    /// The agent answered that the port speaks only HTTP/2 ([`StreamAnswer::AcceptHttp2`]):
    /// HTTP/2 is spoken on it whatever kind it was opened as.
    pub http2_only: bool,
}

/// Why a stream could not be opened: the answer's status and explanation.
type Failed = (StatusCode, String);

/// A stream the agent refused, and the agent connection that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The agent's reason.
    pub reason: RefuseReason,
    /// The connection ([`quinn::Connection::stable_id`]).
    pub conn_id: usize,
}

/// No stream: the answer for the client, and the agent's refusal when that is why.
#[derive(Debug)]
pub struct NotOpened {
    /// What the client gets.
    pub answer: Answer,
    /// The agent refused the stream (else it was away too long, or failed).
    pub refusal: Option<Refusal>,
}

impl From<NotOpened> for Answer {
    fn from(not: NotOpened) -> Answer {
        not.answer
    }
}

/// Inside the dialer: a failure, or the agent's refusal on a connection.
enum NoStream {
    Failed(Failed),
    Refused(Refusal),
}

impl From<Failed> for NoStream {
    fn from(failed: Failed) -> NoStream {
        NoStream::Failed(failed)
    }
}

impl Dialer {
    /// Requests wait up to `agent_wait` for an absent agent, at most `max_waiting` of them per
    /// devbox.
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        agent_wait: Duration,
        max_waiting: usize,
        forwarding: Option<Forwarding>,
    ) -> Dialer {
        Dialer {
            registry,
            metrics,
            agent_wait,
            max_waiting,
            forwarding,
            forward_ids: std::sync::Mutex::default(),
            wake: None,
        }
    }

    /// Wakes the devboxes of `wake_on_http` tunnels whose agent is away through `wake`.
    pub fn with_wake(mut self, wake: Wake) -> Dialer {
        self.wake = Some(wake);
        self
    }

    /// For a `wake_on_http` tunnel (when waking is set up), asks the platform to wake the
    /// devbox, once while a wake is pending however many requests wait, and returns how long
    /// to wait for it; `None`: wait `agents.wait` as usual.
    fn wake(&self, routed: &Routed) -> Option<Duration> {
        let wake = self.wake.as_ref().filter(|_| routed.route.wake_on_http)?;
        let devbox = &routed.route.devbox_id;
        if self.registry.begin_wake(devbox, wake.wait) {
            debug!(%devbox, "agent away; asking the platform to wake the devbox");
            self.metrics.wakes.inc();
            (wake.ask)(devbox);
        }
        Some(wake.wait)
    }

    /// The pool's id for streams to `devbox` over the mesh connection `mesh_id`: kept-alive
    /// connections through another edge are pooled per devbox (a mesh connection carries many
    /// devboxes, and one devbox's kept-alive connection must never carry another's request).
    /// The top bit is set, so an id is never a local agent connection's (`stable_id` is an
    /// address, which has it clear).
    fn forward_id(&self, mesh_id: usize, devbox: &str) -> usize {
        let mut ids = self.forward_ids.lock().unwrap_or_else(|p| p.into_inner());
        let next = ids.len() | (1 << (usize::BITS - 1));
        *ids.entry((mesh_id, devbox.to_owned())).or_insert(next)
    }

    /// The live mesh connection to an edge holding `devbox`'s agent, and the pool's id for
    /// it: where a kept-alive connection through another edge would be. None is dialed.
    pub async fn forwarded_conn(&self, devbox: &str) -> Option<(quinn::Connection, usize)> {
        let forwarding = self.forwarding.as_ref()?;
        for to in forwarding.view.remote_holders(devbox) {
            if let Some(conn) = forwarding.mesh.existing(to) {
                let id = self.forward_id(conn.stable_id(), devbox);
                return Some((conn, id));
            }
        }
        None
    }

    /// Opens a stream of `kind` to the routed port and waits for the agent's answer, or answers
    /// the request here (the agent refused, is away too long, or failed).
    pub async fn open(&self, routed: &Routed, kind: StreamKind) -> Result<Opened, NotOpened> {
        let port = routed.target.port;
        let header = StreamHeader::new(port, kind, Some(routed.client));
        self.open_waiting(routed, header).await.map_err(|no| {
            let ((status, detail), refusal) = match no {
                NoStream::Failed(failed) => (failed, None),
                NoStream::Refused(r) => (refusal(r.reason, port), Some(r)),
            };
            NotOpened {
                answer: pages::error(status, &detail, routed.form),
                refusal,
            }
        })
    }

    /// While the agent is away (reconnecting, resuming, the edge just restarted) the request
    /// waits in a bounded queue for up to `agent_wait`; a connection that fails under it is
    /// retried on the next one, so a short blip costs no request. The request body is not read
    /// until the agent accepted, so a retry never replays anything.
    async fn open_waiting(
        &self,
        routed: &Routed,
        header: StreamHeader,
    ) -> Result<Opened, NoStream> {
        let mut deadline = Instant::now() + self.agent_wait;
        let mut waking = false;
        // The first try goes to the connection the route step found; the registry is asked
        // again only when there is none to try (after a wait, or a connection that failed).
        let mut found = Some((routed.route.conn.clone(), routed.route.attaches));
        let mut place = None;
        let mut failed = None;
        let mut waiting_since: Option<Instant> = None;
        loop {
            // Register for the next attach (and, in a cluster, the next presence change)
            // before looking, so one in between is not missed.
            let next_attach = self.registry.next_attach();
            tokio::pin!(next_attach);
            next_attach.as_mut().enable();
            let mut next_change = self
                .forwarding
                .as_ref()
                .map(|f| Box::pin(f.view.next_change()));
            if let Some(change) = next_change.as_mut() {
                change.as_mut().enable();
            }
            let (conn, attaches) = match found.take() {
                Some(found) => found,
                None => match self.registry.route(&routed.target.key) {
                    Some(route) => (route.conn, route.attaches),
                    None => {
                        let not_found = (StatusCode::NOT_FOUND, route::NOT_FOUND.to_owned());
                        return Err(not_found.into());
                    }
                },
            };
            if let Some(c) = conn.filter(|c| Some(c.stable_id()) != failed) {
                let key = &routed.target.key;
                let attempt = self.attempt(&c, key, attaches, header.clone()).await;
                let http2 = header.kind == StreamKind::Http2;
                match self.settle(attempt, &c, waiting_since, http2) {
                    ControlFlow::Break(answer) => return answer,
                    ControlFlow::Continue(()) => {
                        failed = Some(c.stable_id());
                        continue;
                    }
                }
            }
            // No connection here: another edge of the cluster may hold the agent.
            if let Some(opened) = self.forward(routed, &header).await? {
                self.waited(waiting_since, "served");
                return Ok(opened);
            }
            if place.is_none() {
                place = self
                    .registry
                    .queue(&routed.route.devbox_id, self.max_waiting);
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if let Some(wait) = place.as_ref().and_then(|_| self.wake(routed)) {
                    deadline = since + wait;
                    waking = true;
                }
                if place.is_none() {
                    self.metrics.waits.with_label_values(&["queue_full"]).inc();
                    return Err(NoStream::Failed((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many requests are waiting for this devbox's agent; try again in a few seconds".to_owned(),
                    )));
                }
            }
            let woken = async {
                match next_change {
                    Some(change) => tokio::select! {
                        () = next_attach => {}
                        () = change => {}
                    },
                    None => next_attach.await,
                }
            };
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                self.waited(waiting_since, "timed_out");
                let why = if waking {
                    "the devbox was asked to wake up and its agent is not connected yet; try \
                     again in a few seconds"
                } else {
                    "the devbox's agent is not connected; try again in a few seconds"
                };
                return Err(NoStream::Failed((
                    StatusCode::SERVICE_UNAVAILABLE,
                    why.to_owned(),
                )));
            }
        }
    }

    /// What a try on the agent connection `c` means for the request: its answer (`Break`), or
    /// go on to the newest connection (`Continue`: `c` closed or was replaced under it).
    fn settle(
        &self,
        attempt: Attempt,
        c: &quinn::Connection,
        waiting_since: Option<Instant>,
        http2: bool,
    ) -> ControlFlow<Result<Opened, NoStream>> {
        let failed = |status, message: &str| {
            ControlFlow::Break(Err(NoStream::Failed((status, message.to_owned()))))
        };
        match attempt {
            Attempt::Accepted(send, recv, http2_only) => {
                self.waited(waiting_since, "served");
                ControlFlow::Break(Ok(Opened {
                    send,
                    recv,
                    conn_id: c.stable_id(),
                    conn: c.clone(),
                    forwarded: false,
                    http2_only,
                }))
            }
            Attempt::Refused(reason) => {
                let conn_id = c.stable_id();
                ControlFlow::Break(Err(NoStream::Refused(Refusal { reason, conn_id })))
            }
            Attempt::Superseded => {
                debug!("agent connection closed or replaced under a request; trying the newest");
                ControlFlow::Continue(())
            }
            Attempt::Failed(e) if connection_lost(&e) => {
                debug!(error = %e, "agent connection failed under a request; waiting for the next");
                ControlFlow::Continue(())
            }
            Attempt::Failed(e) if http2 => {
                debug!(error = %e, "HTTP/2 data stream failed");
                failed(
                    StatusCode::BAD_GATEWAY,
                    "the stream to the devbox's agent failed; HTTP/2 to the devbox's services \
                     (gRPC) needs a burrow-agent of this edge's release or newer",
                )
            }
            Attempt::Failed(e) => {
                debug!(error = %e, "data stream failed");
                failed(
                    StatusCode::BAD_GATEWAY,
                    "the stream to the devbox's agent failed; try again",
                )
            }
            Attempt::TimedOut => failed(
                StatusCode::GATEWAY_TIMEOUT,
                "the devbox's agent did not answer in time",
            ),
        }
    }

    /// Opens a stream on `conn` and waits up to [`ANSWER_TIMEOUT`] for the agent's answer;
    /// `None` when, before the answer came, `conn` closed or the devbox's tunnel moved to a newer
    /// connection (an agent that crashed and came back: the old connection may look alive for
    /// its whole idle timeout). Nothing of the request has been sent then, only the header, so
    /// the caller tries the newest connection at once; the abandoned stream is reset.
    async fn attempt(
        &self,
        conn: &quinn::Connection,
        key: &str,
        attaches: u64,
        header: StreamHeader,
    ) -> Attempt {
        let superseded = self.superseded(conn, key, attaches);
        tokio::pin!(superseded);
        let (mut send, mut recv) = tokio::select! {
            opened = conn.open_bi() => match opened {
                Ok(streams) => streams,
                Err(e) => return Attempt::Failed(quinn::ReadError::ConnectionLost(e).into()),
            },
            () = &mut superseded => return Attempt::Superseded,
        };
        let answer = tokio::select! {
            answer = tokio::time::timeout(ANSWER_TIMEOUT, exchange(&mut send, &mut recv, header)) => {
                answer
            }
            () = &mut superseded => {
                let _ = send.reset(reset::EDGE_ABORT.into());
                let _ = recv.stop(reset::EDGE_ABORT.into());
                return Attempt::Superseded;
            }
        };
        match answer {
            Ok(Ok(Ok(http2_only))) => Attempt::Accepted(send, recv, http2_only),
            Ok(Ok(Err(reason))) => Attempt::Refused(reason),
            Ok(Err(e)) => Attempt::Failed(e),
            Err(_) => Attempt::TimedOut,
        }
    }

    /// Resolves once `conn` closes or is no longer the connection the tunnel `key` routes to
    /// (a newer one took over, or none is left). `conn` was the current one when the registry
    /// had seen `attaches` attaches; the route is looked up again only after another attach
    /// (of any devbox), so the usual case costs one atomic load. Woken by attaches, not by
    /// polling.
    pub async fn superseded(&self, conn: &quinn::Connection, key: &str, mut attaches: u64) {
        loop {
            let next_attach = self.registry.next_attach();
            tokio::pin!(next_attach);
            next_attach.as_mut().enable();
            let now = self.registry.attaches();
            if now != attaches {
                let current = self.registry.route(key).and_then(|route| route.conn);
                if current.is_none_or(|c| c.stable_id() != conn.stable_id()) {
                    return;
                }
                attaches = now;
            }
            tokio::select! {
                () = next_attach => {}
                _ = conn.closed() => return,
            }
        }
    }

    /// Opens the stream through another edge that holds the devbox's agent: each in turn, until
    /// one relays it (an edge whose presence was stale says so, and the next is tried; one that
    /// does not answer at once while another is left, dead or frozen, gives way to the next, and
    /// edges that failed lately come last). `Ok(None)`: no other edge holds it now.
    async fn forward(
        &self,
        routed: &Routed,
        header: &StreamHeader,
    ) -> Result<Option<Opened>, NoStream> {
        let Some(forwarding) = &self.forwarding else {
            return Ok(None);
        };
        let devbox = &routed.route.devbox_id;
        let owners = forwarding
            .mesh
            .order(forwarding.view.remote_holders(devbox));
        for (i, &to) in owners.iter().enumerate() {
            let started = Instant::now();
            let more = i + 1 < owners.len();
            match forwarding.mesh.open(to, devbox, header, more).await {
                Ok(forwarded) => {
                    self.metrics.forwarded("opened", started.elapsed());
                    return Ok(Some(Opened {
                        send: forwarded.send,
                        recv: forwarded.recv,
                        conn_id: self.forward_id(forwarded.conn.stable_id(), devbox),
                        conn: forwarded.conn,
                        forwarded: true,
                        http2_only: forwarded.http2_only,
                    }));
                }
                Err(NotForwarded::Refused(reason, mesh_id)) => {
                    self.metrics.forwarded("refused", started.elapsed());
                    let conn_id = self.forward_id(mesh_id, devbox);
                    return Err(NoStream::Refused(Refusal { reason, conn_id }));
                }
                Err(NotForwarded::NotHere) => {
                    self.metrics.forwarded("not_here", started.elapsed());
                    debug!(%devbox, edge = %to, "the edge no longer holds the agent; trying the next");
                }
                Err(NotForwarded::Failed(e)) => {
                    self.metrics.forwarded("failed", started.elapsed());
                    debug!(%devbox, edge = %to, error = %e, "forwarding failed; trying the next");
                }
            }
        }
        Ok(None)
    }

    /// Records a wait for an agent, if the request waited.
    fn waited(&self, since: Option<Instant>, result: &str) {
        if let Some(since) = since {
            self.metrics.waits.with_label_values(&[result]).inc();
            self.metrics
                .wait_duration
                .observe(since.elapsed().as_secs_f64());
        }
    }
}

/// How one try to open a data stream on one agent connection ended.
enum Attempt {
    /// The agent accepted: toward the service, from the service, and whether it said the
    /// port speaks only HTTP/2.
    Accepted(quinn::SendStream, quinn::RecvStream, bool),
    /// The agent refused, with its reason.
    Refused(RefuseReason),
    /// The connection closed, or another took over, before the answer: try the newest.
    Superseded,
    /// The stream failed (perhaps with its whole connection: [`connection_lost`]).
    Failed(wire::WireError),
    /// No answer within [`ANSWER_TIMEOUT`].
    TimedOut,
}

/// Writes the stream header and reads the agent's answer: `Ok(Ok(http2_only))` accepted, the
/// port marked HTTP/2-only or not.
async fn exchange(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    header: StreamHeader,
) -> Result<Result<bool, RefuseReason>, wire::WireError> {
    wire::write_frame(send, header.encoded()).await?;
    match wire::read_msg(recv, StreamAnswer::decode).await? {
        Some(StreamAnswer::Accept) => Ok(Ok(false)),
        Some(StreamAnswer::AcceptHttp2) => Ok(Ok(true)),
        Some(StreamAnswer::Refuse(reason)) => Ok(Err(reason)),
        None => Err(wire::WireError::Truncated),
    }
}

/// Whether a stream failed because its whole connection did (the request may go to the next).
fn connection_lost(e: &wire::WireError) -> bool {
    use quinn::{ReadError, WriteError};
    matches!(
        e,
        wire::WireError::Read(ReadError::ConnectionLost(_))
            | wire::WireError::Write(WriteError::ConnectionLost(_))
    )
}

/// The answer for a stream the agent refused.
fn refusal(reason: RefuseReason, port: Port) -> Failed {
    match reason {
        RefuseReason::NotListening => (
            StatusCode::BAD_GATEWAY,
            format!("nothing is listening on port {port} in this devbox"),
        ),
        RefuseReason::PortNotAllowed => (
            StatusCode::FORBIDDEN,
            format!("port {port} is not allowed by this devbox's agent"),
        ),
        RefuseReason::ConnectTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("the service on port {port} did not accept the connection in time"),
        ),
        RefuseReason::TooManyStreams => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the devbox's agent is at its stream limit; try again shortly".to_owned(),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            format!("the devbox's agent refused the stream ({reason})"),
        ),
    }
}
