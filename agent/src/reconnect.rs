//! The loop around the session: dial, serve, and dial again when the connection ends.
//!
//! For now the policy is a fixed delay (longer after the edge refused the agent, so a bad token
//! does not hammer the edge); the agent never gives up because the edge is unreachable.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::session::{Session, SessionError};
use crate::status::Status;
use crate::tls;

/// Delay after the edge refused the agent (bad token, replaced).
const REJECTED_DELAY: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` fires. Fails only on a configuration that cannot work (an
/// unreadable CA file), never because the edge is unreachable.
pub async fn run(
    config: Config,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) -> Result<(), tls::TlsError> {
    let client = tls::client_config(config.ca.as_deref())?;
    loop {
        let attempt = async {
            tokio::select! {
                () = shutdown.cancelled() => None,
                r = Session::connect(&config, &client) => Some(r),
            }
        };
        let delay = match attempt.await {
            None => return Ok(()),
            Some(Ok(session)) => {
                let devbox = session.devbox_id().to_owned();
                let span = info_span!("session", devbox = %devbox);
                match session.tunnel() {
                    Some(t) => span.in_scope(|| info!(edge = %config.edge, url = %t.url_template, mode = t.auth_mode.as_str(), "connected")),
                    None => span.in_scope(|| info!(edge = %config.edge, "connected; the tunnel is not enabled yet")),
                }
                let tunnel = session.tunnel().cloned();
                status.send_modify(|s| {
                    s.connected = true;
                    s.devbox_id = Some(devbox.clone());
                    s.tunnel = tunnel;
                    s.sessions += 1;
                    s.last_error = None;
                });
                let ended = session
                    .serve(&config, &status, &shutdown)
                    .instrument(span.clone())
                    .await;
                status.send_modify(|s| s.connected = false);
                match ended {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        span.in_scope(|| warn!(error = %e, "disconnected; reconnecting"));
                        status.send_modify(|s| s.last_error = Some(e.to_string()));
                        config.reconnect_delay
                    }
                }
            }
            Some(Err(e)) => {
                let rejected = matches!(e, SessionError::Rejected(_));
                if rejected {
                    error!(error = %e, "the edge refused this agent; check its token");
                } else {
                    warn!(edge = %config.edge, error = %e, "cannot reach the edge; retrying");
                }
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                if rejected {
                    REJECTED_DELAY
                } else {
                    config.reconnect_delay
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}
