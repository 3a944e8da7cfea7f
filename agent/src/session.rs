//! One connection to the edge: dial, hello, welcome, then serve data streams and the control
//! stream until the connection ends or shutdown is asked for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow_protocol::{
    ControlMsg, GoAway, GoAwayReason, Hello, RefuseReason, Reject, TunnelState, VERSION, Welcome,
};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::forward::{self, Limits};
use crate::status::Status;
use crate::wire::{self, WireError};

/// How long the edge may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long running streams may take to finish when shutting down.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// QUIC application close codes the agent uses.
pub mod close {
    /// Clean shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 2;
}

/// Why a session could not be established or ended.
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
    /// The edge did not answer the hello in time.
    #[error("the edge did not answer the hello within {0:?}")]
    HelloTimeout(Duration),
    /// The edge refused this agent.
    #[error("the edge refused the agent ({:?}): {}", .0.reason, .0.message)]
    Rejected(Reject),
    /// The edge sent something out of place.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// An established session.
#[derive(Debug)]
pub struct Session {
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
    welcome: Welcome,
}

impl Session {
    /// Resolves the edge, dials it from a fresh UDP socket, and exchanges hello and welcome.
    pub async fn connect(
        config: &Config,
        client: &quinn::ClientConfig,
    ) -> Result<Session, SessionError> {
        let addr = tokio::net::lookup_host(&config.edge)
            .await
            .map_err(|e| SessionError::Resolve(config.edge.clone(), e.to_string()))?
            .next()
            .ok_or_else(|| SessionError::Resolve(config.edge.clone(), "no address".into()))?;
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(SessionError::Socket)?;
        let conn = endpoint
            .connect_with(client.clone(), addr, &config.server_name)?
            .await
            .map_err(|source| SessionError::Connect { addr, source })?;
        let (mut control_send, mut control_recv) = conn.open_bi().await?;
        let hello = ControlMsg::Hello(Hello {
            min_version: VERSION,
            max_version: VERSION,
            token: config.token.clone(),
            agent: concat!("burrow-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
        });
        wire::write_frame(&mut control_send, hello.encoded()).await?;
        let answer = tokio::time::timeout(
            HELLO_TIMEOUT,
            wire::read_msg(&mut control_recv, ControlMsg::decode),
        )
        .await
        .map_err(|_| SessionError::HelloTimeout(HELLO_TIMEOUT))??;
        match answer {
            Some(ControlMsg::Welcome(welcome)) => Ok(Session {
                conn,
                control_send,
                control_recv,
                welcome,
            }),
            Some(ControlMsg::Reject(reject)) => Err(SessionError::Rejected(reject)),
            Some(other) => Err(SessionError::Protocol(format!(
                "expected welcome, got {}",
                other.name()
            ))),
            None => Err(SessionError::Protocol(
                "control stream closed before welcome".into(),
            )),
        }
    }

    /// The devbox this agent serves.
    pub fn devbox_id(&self) -> &str {
        &self.welcome.devbox_id
    }

    /// The tunnel as the edge announced it.
    pub fn tunnel(&self) -> Option<&TunnelState> {
        self.welcome.tunnel.as_ref()
    }

    /// Serves streams until the connection ends (an error) or `shutdown` fires (`Ok`).
    pub async fn serve(
        self,
        config: &Config,
        status: &watch::Sender<Status>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let Session {
            conn,
            mut control_send,
            control_recv,
            welcome: _,
        } = self;
        let mut control = wire::spawn_control_reader(control_recv);
        let limits = Arc::new(Limits {
            policy: config.policy.clone(),
            connect_timeout: config.connect_timeout,
        });
        let slots = Arc::new(Semaphore::new(config.max_streams));
        let tasks = TaskTracker::new();

        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                accepted = conn.accept_bi() => {
                    let (send, recv) = match accepted {
                        Ok(pair) => pair,
                        Err(e) => break Err(e.into()),
                    };
                    let permit = slots.clone().try_acquire_owned().ok();
                    let refuse = permit.is_none().then_some(RefuseReason::TooManyStreams);
                    let limits = limits.clone();
                    let span = info_span!("stream", stream_id = %send.id());
                    tasks.spawn(async move {
                        if let Err(e) = forward::serve(send, recv, &limits, refuse).await {
                            debug!(error = %e, "stream ended early");
                        }
                        drop(permit);
                    }.instrument(span));
                }
                msg = control.recv() => {
                    match msg.transpose() {
                        Ok(Some(ControlMsg::Ping { seq })) => {
                            let pong = ControlMsg::Pong { seq }.encoded();
                            if let Err(e) = wire::write_frame(&mut control_send, pong).await {
                                break Err(e.into());
                            }
                        }
                        Ok(Some(ControlMsg::Pong { .. })) => {}
                        Ok(Some(ControlMsg::TunnelUpdate(update))) => {
                            match &update {
                                Some(t) => info!(key = %t.key, mode = t.auth_mode.as_str(), url = %t.url_template, "tunnel updated"),
                                None => info!("tunnel disabled"),
                            }
                            status.send_modify(|s| s.tunnel = update);
                        }
                        Ok(Some(ControlMsg::GoAway(GoAway { reason, message, .. }))) => {
                            info!(?reason, %message, "edge asked to go away");
                            if reason == GoAwayReason::Revoked {
                                warn!("the edge revoked this agent's token");
                            }
                            break Err(SessionError::Protocol(format!("go-away: {message}")));
                        }
                        Ok(Some(other)) => {
                            let what = format!("unexpected {} on the control stream", other.name());
                            conn.close(close::PROTOCOL.into(), what.as_bytes());
                            break Err(SessionError::Protocol(what));
                        }
                        Ok(None) => break Err(SessionError::Protocol("the edge closed the control stream".into())),
                        Err(e) => {
                            if matches!(e, WireError::Decode(_) | WireError::Truncated) {
                                conn.close(close::PROTOCOL.into(), b"bad control frame");
                            }
                            break Err(e.into());
                        }
                    }
                }
            }
        };

        // Drain: no new streams; running ones get a grace period, then the connection closes.
        tasks.close();
        if shutdown.is_cancelled() {
            let _ = tokio::time::timeout(DRAIN_GRACE, tasks.wait()).await;
            conn.close(close::SHUTDOWN.into(), b"agent shutting down");
        }
        result
    }
}
