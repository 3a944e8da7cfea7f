//! The state machine around the session: dial, serve, and dial again, forever, until shutdown.
//!
//! ```text
//!   Disconnected { delay } --dial--> Connecting --welcome--> Connected --ended--> Disconnected
//!        ^                               |                       |
//!        +------- failure (backoff) -----+                       +-- replaced --> Standby
//! ```
//!
//! `Link` is that state (standby is `Disconnected` with a long delay, shown in the status); each
//! state's step is one method of `Redial`, which returns the next state.
//!
//! The policy lives in [`crate::backoff`]: the first redial after a session ends is immediate
//! (a resume, a dead path, the edge's go-away), failures back off with full jitter up to a low
//! cap, and a session that stayed up `healthy_after` resets it. A new endpoint (UDP socket) and
//! a fresh DNS resolution are used for every dial. The agent never gives up because the edge is
//! unreachable; a refused token backs off to a minute and says so in the log.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_protocol::{GoAwayReason, RejectReason};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, error, info, info_span, warn};

use crate::backoff::{Backoff, Policy};
use crate::clock::{Clocks, SystemClocks};
use crate::config::Config;
use crate::identity::Chain;
use crate::metrics::Metrics;
use crate::session::{Ended, Session, SessionError};
use crate::status::{State, Status};
use crate::{resume, session, tls};

/// Backoff after the edge refused the token: it will not change by itself soon.
const REFUSED: Policy = Policy {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(60),
};
/// How often an agent that was replaced by another instance checks whether it left.
const STANDBY: Duration = Duration::from_secs(30);

/// Runs the agent until `shutdown` fires, with the system clocks.
pub async fn run(
    config: Config,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) -> Result<(), tls::TlsError> {
    let metrics = Metrics::new();
    run_with_clocks(config, Arc::new(SystemClocks), status, metrics, shutdown).await
}

/// Runs the agent with the given clocks (tests make them jump). Fails only on a configuration
/// that cannot work (an unreadable CA file), never because the edge is unreachable.
pub async fn run_with_clocks(
    config: Config,
    clocks: Arc<dyn Clocks>,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), tls::TlsError> {
    let client = tls::client_config(config.ca.as_deref(), &config.liveness, config.max_streams)?;
    let (resume_tx, resumes) = watch::channel(0u64);
    let background = TaskTracker::new();
    background.spawn(resume::watch(
        clocks,
        config.liveness.resume_tick,
        config.liveness.resume_threshold,
        resume_tx,
        metrics.clone(),
        shutdown.clone(),
    ));
    serve_metrics(&config, &status, &metrics, &shutdown, &background).await;
    background.spawn(count_resumes(
        resumes.clone(),
        status.clone(),
        shutdown.clone(),
    ));

    // One reconnect loop per connection the agent holds, each to a distinct edge; the status
    // the agent shows merges theirs.
    let slots = config.ha_connections.max(1);
    let held: Held = Arc::new(Mutex::new(vec![None; slots]));
    let learned = session::Learned::default();
    let mut slot_status = Vec::with_capacity(slots);
    let mut loops = Vec::with_capacity(slots);
    for slot in 0..slots {
        let (tx, rx) = watch::channel(Status::default());
        slot_status.push(rx);
        let redial = Redial {
            slot,
            held: held.clone(),
            learned: learned.clone(),
            rotate: slot,
            backoff: Backoff::new(config.reconnect.backoff),
            refused: Backoff::new(REFUSED),
            chain: Chain::open_slot(&config.state_dir, slot),
            takeover: slot == 0,
            config: config.clone(),
            client: client.clone(),
            status: tx,
            metrics: metrics.clone(),
            resumes: resumes.clone(),
            background: background.clone(),
            shutdown: shutdown.clone(),
        };
        loops.push(redial.run());
    }
    merge_status(slot_status, &status, &background, &shutdown);
    futures_util::future::join_all(loops).await;
    status.send_modify(|s| {
        s.state = State::Draining;
        s.connected = false;
    });
    background.close();
    background.wait().await;
    Ok(())
}

/// Which edge address each of the agent's connections holds (`None`: not connected), so each
/// dials an edge the others do not hold.
type Held = Arc<Mutex<Vec<Option<SocketAddr>>>>;

/// Keeps `status` the merge of the connections' own statuses, until shutdown.
fn merge_status(
    slots: Vec<watch::Receiver<Status>>,
    status: &watch::Sender<Status>,
    background: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let all = Arc::new(slots);
    for mine in all.iter() {
        let (mut mine, all) = (mine.clone(), all.clone());
        let (status, shutdown) = (status.clone(), shutdown.clone());
        background.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = mine.changed() => if changed.is_err() { return },
                }
                let slots: Vec<Status> = all.iter().map(|s| s.borrow().clone()).collect();
                // Once the agent drains, that is what it shows.
                status.send_modify(|s| {
                    if s.state != State::Draining {
                        merge(s, &slots);
                    }
                });
            }
        });
    }
}

/// The agent's status from its connections': connected while any is, its streams and sessions
/// added up; the rest from a connected one (else the first). `resumes` is the agent's own.
fn merge(status: &mut Status, slots: &[Status]) {
    let Some(first) = slots.first() else { return };
    let live: Vec<&Status> = slots.iter().filter(|s| s.connected).collect();
    let lead = live.first().copied().unwrap_or(first);
    status.state = lead.state;
    status.connected = lead.connected;
    status.devbox_id = slots
        .iter()
        .find_map(|s| s.devbox_id.clone())
        .or(status.devbox_id.take());
    status.tunnel.clone_from(&lead.tunnel);
    status.sessions = slots.iter().map(|s| s.sessions).sum();
    status.streams = slots.iter().map(|s| s.streams).sum();
    status.rtt = live.iter().filter_map(|s| s.rtt).min().or(lead.rtt);
    status.last_error.clone_from(&lead.last_error);
}

/// Serves the metrics listener in `background`, if one is configured. A listener that cannot
/// bind is logged, not fatal.
async fn serve_metrics(
    config: &Config,
    status: &watch::Sender<Status>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    background: &TaskTracker,
) {
    let Some(addr) = config.metrics_listen else {
        return;
    };
    match crate::metrics::bind(addr).await {
        Ok(listener) => {
            background.spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                status.subscribe(),
                config.edge.clone(),
                shutdown.clone(),
            ));
        }
        Err(e) => warn!("{e}; metrics are not served"),
    }
}

/// Counts the detected resumes in the status, until shutdown.
async fn count_resumes(
    mut resumes: watch::Receiver<u64>,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = resumes.changed() => {
                if changed.is_err() { return }
                status.send_modify(|s| s.resumes += 1);
            }
        }
    }
}

/// Where the agent stands with the edge.
enum Link {
    /// Waiting `delay` before the next dial.
    Disconnected {
        /// Zero right after a session ended; a backoff after a failure.
        delay: Duration,
    },
    /// Dialing the edge.
    Connecting,
    /// A session is established.
    Connected(Box<Session>),
}

/// What the reconnect loop keeps from one dial to the next: the mechanism (how to dial, where to
/// report) and the policy's state (the backoffs, whether to take over).
struct Redial {
    /// Which of the agent's connections this loop keeps (0: the first).
    slot: usize,
    /// The addresses every loop holds.
    held: Held,
    /// The other edges the edges told of, dialed after the configured ones.
    learned: session::Learned,
    /// Where in the edges' addresses the next dial starts; moves on after a failure.
    rotate: usize,
    config: Config,
    client: quinn::ClientConfig,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
    resumes: watch::Receiver<u64>,
    background: TaskTracker,
    shutdown: CancellationToken,
    /// This agent's instance ids: a fresh one per dial, and the last one the edge accepted.
    chain: Chain,
    /// Whether the next dial replaces another agent's live session (not after being replaced).
    takeover: bool,
    /// For dial failures and short-lived sessions.
    backoff: Backoff,
    /// For a refused or revoked token.
    refused: Backoff,
}

impl Redial {
    /// Runs this connection's loop until shutdown.
    async fn run(mut self) {
        let mut link = Link::Disconnected {
            delay: Duration::ZERO,
        };
        while let Some(next) = self.step(link).await {
            link = next;
        }
    }

    /// The address to dial: from `rotate` on, the first that no other connection holds.
    fn pick(&self, addrs: &[SocketAddr]) -> Option<SocketAddr> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let others: Vec<SocketAddr> = held
            .iter()
            .enumerate()
            .filter(|(slot, _)| *slot != self.slot)
            .filter_map(|(_, addr)| *addr)
            .collect();
        let n = addrs.len();
        let start = self.rotate % n.max(1);
        (0..n)
            .map(|k| addrs[(start + k) % n])
            .find(|a| !others.contains(a))
            .or_else(|| addrs.get(start).copied())
    }

    /// Records the address this connection holds (`None`: none).
    fn hold(&self, addr: Option<SocketAddr>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = held.get_mut(self.slot) {
            *slot = addr;
        }
    }

    /// Takes `link` one step; `None` once shutdown was asked for.
    async fn step(&mut self, link: Link) -> Option<Link> {
        match link {
            Link::Disconnected { delay } => self.wait(delay).await,
            Link::Connecting => self.dial().await,
            Link::Connected(session) => self.serve(*session).await,
        }
    }

    /// `Disconnected`: waits out `delay`, then dials. `None` on shutdown.
    async fn wait(&mut self, delay: Duration) -> Option<Link> {
        self.status.send_modify(|s| {
            if s.state != State::Standby {
                s.state = State::Disconnected;
            }
        });
        if !delay.is_zero() {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
        // A resume while waiting makes the wait moot: dial now.
        self.resumes.borrow_and_update();
        Some(Link::Connecting)
    }

    /// `Connecting`: one dial, within the dial timeout. `None` on shutdown.
    async fn dial(&mut self) -> Option<Link> {
        self.status.send_modify(|s| {
            if s.state != State::Standby {
                s.state = State::Connecting;
            }
        });
        let timeout = self.config.reconnect.dial_timeout;
        // Only the first connection takes over another agent's session: a second one that
        // lands on the edge the first holds is refused there and moves to another edge.
        let identity = self.chain.next(self.takeover && self.slot == 0);
        let mut names = self.config.edges.clone();
        names.extend(
            self.learned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        let dial = tokio::time::timeout(timeout, async {
            let addrs = session::resolve(&names).await?;
            let addr = self.pick(&addrs).ok_or_else(|| {
                SessionError::Resolve(self.config.edge.clone(), "no address".into())
            })?;
            Session::connect(&self.config, &self.client, identity, addr)
                .await
                .map(|session| (session, addr))
        });
        let attempt = tokio::select! {
            () = self.shutdown.cancelled() => return None,
            r = dial => r.unwrap_or(Err(SessionError::Timeout(timeout))),
        };
        let delay = match attempt {
            Ok((mut session, addr)) => {
                session.learn_into(self.learned.clone());
                self.chain.accepted(identity.instance);
                self.hold(Some(addr));
                return Some(Link::Connected(Box::new(session)));
            }
            Err(e) => {
                // The next dial starts at the next address: a dead edge is not tried first
                // again while others may answer.
                self.rotate = self.rotate.wrapping_add(1);
                self.dial_failed(e)
            }
        };
        Some(Link::Disconnected { delay })
    }

    /// Reports a failed dial; returns how long to wait before the next.
    fn dial_failed(&mut self, e: SessionError) -> Duration {
        match e {
            SessionError::Rejected(reject)
                if reject.reason == RejectReason::Replaced && self.slot > 0 =>
            {
                info!("another connection of this agent holds that edge; trying another");
                self.status
                    .send_modify(|s| s.last_error = Some(reject.message.clone()));
                self.backoff.next_delay()
            }
            SessionError::Rejected(reject) if reject.reason == RejectReason::Replaced => {
                self.metrics
                    .dial_failures
                    .with_label_values(&["standby"])
                    .inc();
                info!("another agent with this token is connected; standing by");
                self.status.send_modify(|s| {
                    s.state = State::Standby;
                    s.last_error = Some(reject.message.clone());
                });
                jitter(STANDBY)
            }
            e @ SessionError::Rejected(_) => {
                self.metrics
                    .dial_failures
                    .with_label_values(&["refused"])
                    .inc();
                let delay = self.refused.next_delay().max(REFUSED.initial);
                error!(error = %e, retry_in = ?delay, "the edge refused this agent; check its token");
                self.status
                    .send_modify(|s| s.last_error = Some(e.to_string()));
                delay
            }
            e => {
                let cause = match e {
                    SessionError::Timeout(_) => "timeout",
                    SessionError::Resolve(..) => "resolve",
                    _ => "unreachable",
                };
                self.metrics.dial_failures.with_label_values(&[cause]).inc();
                let delay = self.backoff.next_delay();
                warn!(edge = %self.config.edge, error = %e, retry_in = ?delay, "cannot reach the edge; retrying");
                self.status
                    .send_modify(|s| s.last_error = Some(e.to_string()));
                delay
            }
        }
    }

    /// `Connected`: serves the session until it ends. `None` when it ended for shutdown.
    async fn serve(&mut self, session: Session) -> Option<Link> {
        self.takeover = true;
        self.refused.reset();
        let span = self.connected(&session);
        let started = Instant::now();
        let ended = session
            .serve(
                &self.config,
                &self.status,
                &mut self.resumes,
                &self.background,
                &self.metrics,
                &self.shutdown,
            )
            .instrument(span.clone())
            .await;
        self.disconnected(&ended, started);
        let delay = span.in_scope(|| self.after(ended))?;
        Some(Link::Disconnected { delay })
    }

    /// Reports a new session; returns its span.
    fn connected(&self, session: &Session) -> Span {
        let devbox = session.devbox_id().to_owned();
        let span = info_span!("session", devbox = %devbox);
        let edge = &self.config.edge;
        match session.tunnel() {
            Some(t) => span.in_scope(
                || info!(%edge, url = %t.url_template, mode = t.auth_mode.as_str(), "connected"),
            ),
            None => span.in_scope(|| info!(%edge, "connected; the tunnel is not enabled yet")),
        }
        let tunnel = session.tunnel().cloned();
        self.status.send_modify(|s| {
            s.state = State::Connected;
            s.connected = true;
            s.devbox_id = Some(devbox);
            s.tunnel = tunnel;
            s.sessions += 1;
            s.last_error = None;
        });
        self.metrics.connects.inc();
        self.metrics
            .set_connection(Some(session.connection().clone()));
        span
    }

    /// Reports a session that ended, however it ended; a session that stayed up long enough
    /// resets the backoff.
    fn disconnected(&mut self, ended: &Ended, started: Instant) {
        self.hold(None);
        // The next dial starts at the next edge: the one just lost may be gone for good (with
        // one edge configured, it is the same one).
        self.rotate = self.rotate.wrapping_add(1);
        self.status.send_modify(|s| s.connected = false);
        self.metrics.set_connection(None);
        let cause = match ended {
            Ended::Shutdown => "shutdown",
            Ended::GoAway(g) => match g.reason {
                GoAwayReason::Replaced => "replaced",
                GoAwayReason::Revoked => "revoked",
                _ => "edge_going_away",
            },
            Ended::Dead(_) => "dead_path",
            Ended::Lost(_) => "connection_lost",
        };
        self.metrics.disconnects.with_label_values(&[cause]).inc();
        if started.elapsed() >= self.config.reconnect.healthy_after {
            self.backoff.reset();
        }
    }

    /// The policy after a session: how long to wait before dialing again (`None`: shutdown).
    /// The first redial after a session ends is immediate; failures then back off.
    fn after(&mut self, ended: Ended) -> Option<Duration> {
        let mut delay = Duration::ZERO;
        match ended {
            Ended::Shutdown => return None,
            Ended::GoAway(go_away) => match go_away.reason {
                GoAwayReason::Replaced if self.slot > 0 => {
                    // The first connection moved onto this edge: find another.
                    info!(message = %go_away.message, "this edge took the agent's other connection; trying another");
                    self.rotate = self.rotate.wrapping_add(1);
                }
                GoAwayReason::Replaced => {
                    warn!(message = %go_away.message, "replaced by another agent with this token; standing by");
                    self.takeover = false;
                    self.status.send_modify(|s| {
                        s.state = State::Standby;
                        s.last_error = Some(go_away.message.clone());
                    });
                    delay = jitter(STANDBY);
                }
                GoAwayReason::Revoked => {
                    error!(message = %go_away.message, "the edge revoked this agent's token");
                    self.status
                        .send_modify(|s| s.last_error = Some(go_away.message.clone()));
                    delay = self.refused.next_delay().max(REFUSED.initial);
                }
                _ => info!(message = %go_away.message, "the edge is going away; reconnecting"),
            },
            Ended::Dead(why) => {
                warn!(why, "the connection stopped answering; reconnecting");
                self.status
                    .send_modify(|s| s.last_error = Some(why.to_owned()));
            }
            Ended::Lost(e) => {
                warn!(error = %e, "disconnected; reconnecting");
                self.status
                    .send_modify(|s| s.last_error = Some(e.to_string()));
                if self.backoff.failures() > 0 {
                    // The last session was short-lived: keep backing off rather than loop.
                    delay = self.backoff.next_delay();
                }
            }
        }
        Some(delay)
    }
}

/// A delay uniform in [d/2, d].
fn jitter(d: Duration) -> Duration {
    let mut b = Backoff::new(Policy {
        initial: d / 2,
        max: d / 2,
    });
    d / 2 + b.next_delay()
}
