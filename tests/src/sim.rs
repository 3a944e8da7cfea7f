//! Simulated agents: many agent connections from one process and one UDP socket. Each is a real
//! QUIC connection with the agent's TLS and ALPN that says hello with its devbox's token, gets
//! the edge's welcome, and then idles with its control stream open (QUIC keep-alives every 5 s,
//! as the real agent's heartbeat would keep it). For connect storms and for what one idle agent
//! costs an edge; the real agent's streams, heartbeats and reconnects are not simulated.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use burrow_protocol::{AgentToken, ControlMsg, Hello, VERSION};
use burrow_runtime::wire;
use futures_util::StreamExt;

/// Agent connections held open, all on one endpoint.
#[derive(Debug)]
pub struct SimAgents {
    dialer: Dialer,
    held: Vec<SimAgent>,
}

/// Dials simulated agents (cheap to clone: one endpoint for all).
#[derive(Debug, Clone)]
pub struct Dialer {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    server_name: String,
}

/// One simulated agent's connection and its control stream (dropping them would end it).
#[derive(Debug)]
pub struct SimAgent {
    conn: quinn::Connection,
    _control: (quinn::SendStream, quinn::RecvStream),
}

impl SimAgent {
    /// Closes the connection, as an agent that stops does.
    pub fn close(self) {
        self.conn.close(0u32.into(), b"simulated agent stopping");
    }

    /// Whether the connection is still up.
    pub fn is_live(&self) -> bool {
        self.conn.close_reason().is_none()
    }
}

impl SimAgents {
    /// Agents that trust the CA in `ca` and expect the edge's certificate for `server_name`.
    pub fn new(ca: &Path, server_name: &str) -> anyhow::Result<SimAgents> {
        let liveness = burrow_agent::config::Liveness {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(3),
            nudge_interval: Duration::ZERO,
            idle_timeout: Duration::from_secs(20),
            resume_tick: Duration::from_secs(1),
            resume_threshold: Duration::from_secs(2),
        };
        let mut client = burrow_agent::tls::client_config(Some(ca), &liveness, 64)
            .context("simulated agents' TLS")?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_idle_timeout(Some(Duration::from_secs(20).try_into()?));
        transport.max_concurrent_bidi_streams(64u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        client.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
        let dialer = Dialer {
            endpoint,
            client,
            server_name: server_name.to_owned(),
        };
        Ok(SimAgents {
            dialer,
            held: Vec::new(),
        })
    }

    /// What dials them, for agents the caller keeps itself.
    pub fn dialer(&self) -> Dialer {
        self.dialer.clone()
    }

    /// Connects one agent per token to the edge at `edge`, at most `at_once` handshakes in
    /// flight. An agent whose dial fails dials again (as the real agent does), up to three
    /// times in all; fails naming the first agent the edge did not welcome by then.
    pub async fn connect(
        &mut self,
        edge: SocketAddr,
        tokens: &[String],
        at_once: usize,
    ) -> anyhow::Result<()> {
        let dials = tokens.iter().enumerate().map(|(i, token)| {
            let dialer = self.dialer.clone();
            async move {
                let mut tries = 0;
                loop {
                    tries += 1;
                    match dialer.dial(edge, token).await {
                        Ok(held) => return Ok(held),
                        Err(e) if tries >= 3 => {
                            return Err(e.context(format!("simulated agent {i}, {tries} dials")));
                        }
                        Err(_) => {}
                    }
                }
            }
        });
        let mut dials = futures_util::stream::iter(dials).buffer_unordered(at_once.max(1));
        while let Some(held) = dials.next().await {
            self.held.push(held?);
        }
        Ok(())
    }

    /// How many are connected now.
    pub fn live(&self) -> usize {
        self.held.iter().filter(|h| h.is_live()).count()
    }

    /// Closes every connection (as an agent that stops does), 64 at a time a few milliseconds
    /// apart: a QUIC close is sent once, and hundreds at once from one socket overflow the
    /// edge's receive buffer on loopback (a real fleet does not stop in the same millisecond),
    /// leaving the edge to find out at its idle timeout.
    pub async fn close_all(&mut self) {
        for chunk in std::mem::take(&mut self.held).chunks(64) {
            for held in chunk {
                held.conn.close(0u32.into(), b"simulated agent stopping");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Dialer {
    /// One agent for `token` at the edge `edge`: handshake, hello, welcome.
    pub async fn dial(&self, edge: SocketAddr, token: &str) -> anyhow::Result<SimAgent> {
        let connecting =
            self.endpoint
                .connect_with(self.client.clone(), edge, &self.server_name)?;
        let conn = connecting.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            min_version: VERSION,
            max_version: VERSION,
            token: AgentToken::new(token),
            agent: "burrow-sim/0".to_owned(),
            instance: fastrand::u64(1..),
            takeover: true,
            previous: 0,
            wants: 0,
        };
        wire::write_frame(&mut send, ControlMsg::Hello(hello).encoded()).await?;
        match wire::read_msg(&mut recv, ControlMsg::decode).await? {
            Some(ControlMsg::Welcome(_)) => Ok(SimAgent {
                conn,
                _control: (send, recv),
            }),
            Some(ControlMsg::Reject(reject)) => bail!("refused: {}", reject.message),
            other => bail!("the edge answered the hello with {other:?}"),
        }
    }
}
