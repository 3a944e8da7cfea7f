//! The state machine around the session: dial, serve, and dial again, forever, until shutdown.
//!
//! ```text
//!   Disconnected { delay } --dial--> Connecting --welcome--> Connected --ended--> Disconnected
//!        ^                               |                       |
//!        +------- failure (backoff) -----+                       +-- replaced --> Standby
//! ```
//!
//! The policy lives in [`crate::backoff`]: the first redial after a session ends is immediate
//! (a resume, a dead path, the edge's go-away), failures back off with full jitter up to a low
//! cap, and a session that stayed up `healthy_after` resets it. A new endpoint (UDP socket) and
//! a fresh DNS resolution are used for every dial. The agent never gives up because the edge is
//! unreachable; a refused token backs off to a minute and says so in the log.

use std::sync::Arc;
use std::time::Duration;

use burrow_protocol::{GoAwayReason, RejectReason};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::backoff::{Backoff, Policy};
use crate::clock::{Clocks, SystemClocks};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::{Ended, Identity, Session, SessionError};
use crate::status::{State, Status};
use crate::{resume, tls};

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
    let (resume_tx, mut resumes) = watch::channel(0u64);
    let background = TaskTracker::new();
    background.spawn(resume::watch(
        clocks,
        config.liveness.resume_tick,
        config.liveness.resume_threshold,
        resume_tx,
        metrics.clone(),
        shutdown.clone(),
    ));
    if let Some(addr) = config.metrics_listen {
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
    let mut count_resumes = resumes.clone();
    let counter_status = status.clone();
    let counter_shutdown = shutdown.clone();
    background.spawn(async move {
        loop {
            tokio::select! {
                () = counter_shutdown.cancelled() => return,
                changed = count_resumes.changed() => {
                    if changed.is_err() { return }
                    counter_status.send_modify(|s| s.resumes += 1);
                }
            }
        }
    });

    let mut identity = Identity {
        instance: random_instance(),
        takeover: true,
    };
    let mut backoff = Backoff::new(config.reconnect.backoff);
    let mut refused = Backoff::new(REFUSED);
    let mut delay = Duration::ZERO;
    loop {
        status.send_modify(|s| {
            if s.state != State::Standby {
                s.state = State::Disconnected;
            }
        });
        if !delay.is_zero() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        // A resume while waiting makes the wait moot: dial now.
        resumes.borrow_and_update();
        status.send_modify(|s| {
            if s.state != State::Standby {
                s.state = State::Connecting;
            }
        });
        let dial = tokio::time::timeout(
            config.reconnect.dial_timeout,
            Session::connect(&config, &client, identity),
        );
        let attempt = tokio::select! {
            () = shutdown.cancelled() => break,
            r = dial => r.unwrap_or(Err(SessionError::Timeout(config.reconnect.dial_timeout))),
        };
        let session = match attempt {
            Ok(session) => session,
            Err(SessionError::Rejected(reject)) if reject.reason == RejectReason::Replaced => {
                metrics.dial_failures.with_label_values(&["standby"]).inc();
                info!("another agent with this token is connected; standing by");
                status.send_modify(|s| {
                    s.state = State::Standby;
                    s.last_error = Some(reject.message.clone());
                });
                delay = jitter(STANDBY);
                continue;
            }
            Err(e @ SessionError::Rejected(_)) => {
                metrics.dial_failures.with_label_values(&["refused"]).inc();
                delay = refused.next_delay().max(REFUSED.initial);
                error!(error = %e, retry_in = ?delay, "the edge refused this agent; check its token");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                continue;
            }
            Err(e) => {
                let cause = match e {
                    SessionError::Timeout(_) => "timeout",
                    SessionError::Resolve(..) => "resolve",
                    _ => "unreachable",
                };
                metrics.dial_failures.with_label_values(&[cause]).inc();
                delay = backoff.next_delay();
                warn!(edge = %config.edge, error = %e, retry_in = ?delay, "cannot reach the edge; retrying");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                continue;
            }
        };

        identity.takeover = true;
        refused.reset();
        let devbox = session.devbox_id().to_owned();
        let span = info_span!("session", devbox = %devbox);
        match session.tunnel() {
            Some(t) => span.in_scope(|| info!(edge = %config.edge, url = %t.url_template, mode = t.auth_mode.as_str(), "connected")),
            None => span.in_scope(|| info!(edge = %config.edge, "connected; the tunnel is not enabled yet")),
        }
        let tunnel = session.tunnel().cloned();
        status.send_modify(|s| {
            s.state = State::Connected;
            s.connected = true;
            s.devbox_id = Some(devbox.clone());
            s.tunnel = tunnel;
            s.sessions += 1;
            s.last_error = None;
        });
        metrics.connects.inc();
        metrics.set_connection(Some(session.connection().clone()));
        let started = Instant::now();
        let ended = session
            .serve(
                &config,
                &status,
                &mut resumes,
                &background,
                &metrics,
                &shutdown,
            )
            .instrument(span.clone())
            .await;
        status.send_modify(|s| s.connected = false);
        metrics.set_connection(None);
        let cause = match &ended {
            Ended::Shutdown => "shutdown",
            Ended::GoAway(g) => match g.reason {
                GoAwayReason::Replaced => "replaced",
                GoAwayReason::Revoked => "revoked",
                _ => "edge_going_away",
            },
            Ended::Dead(_) => "dead_path",
            Ended::Lost(_) => "connection_lost",
        };
        metrics.disconnects.with_label_values(&[cause]).inc();
        if started.elapsed() >= config.reconnect.healthy_after {
            backoff.reset();
        }
        // The first redial after a session ends is immediate; failures then back off.
        delay = Duration::ZERO;
        let _enter = span.enter();
        match ended {
            Ended::Shutdown => break,
            Ended::GoAway(go_away) => match go_away.reason {
                GoAwayReason::Replaced => {
                    warn!(message = %go_away.message, "replaced by another agent with this token; standing by");
                    identity.takeover = false;
                    status.send_modify(|s| {
                        s.state = State::Standby;
                        s.last_error = Some(go_away.message.clone());
                    });
                    delay = jitter(STANDBY);
                }
                GoAwayReason::Revoked => {
                    error!(message = %go_away.message, "the edge revoked this agent's token");
                    status.send_modify(|s| s.last_error = Some(go_away.message.clone()));
                    delay = refused.next_delay().max(REFUSED.initial);
                }
                _ => info!(message = %go_away.message, "the edge is going away; reconnecting"),
            },
            Ended::Dead(why) => {
                warn!(why, "the connection stopped answering; reconnecting");
                status.send_modify(|s| s.last_error = Some(why.to_owned()));
            }
            Ended::Lost(e) => {
                warn!(error = %e, "disconnected; reconnecting");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                if backoff.failures() > 0 {
                    // The last session was short-lived: keep backing off rather than loop.
                    delay = backoff.next_delay();
                }
            }
        }
    }
    status.send_modify(|s| {
        s.state = State::Draining;
        s.connected = false;
    });
    background.close();
    background.wait().await;
    Ok(())
}

/// A delay uniform in [d/2, d].
fn jitter(d: Duration) -> Duration {
    let mut b = Backoff::new(Policy {
        initial: d / 2,
        max: d / 2,
    });
    d / 2 + b.next_delay()
}

/// A random instance id for this process.
fn random_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
