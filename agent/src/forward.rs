//! One data stream: read the edge's stream header, check the port policy, dial the local service
//! on loopback, answer accept or refuse, then copy bytes both ways until both directions end
//! ([`copy`]).
//!
//! Only loopback is ever dialed, whatever the header says: `127.0.0.1` first, then `::1`, so
//! services bound to `0.0.0.0`, `127.0.0.1` or `::1` are all reached.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use burrow_protocol::{Port, RefuseReason, StreamAnswer, StreamHeader, StreamKind, VERSION, reset};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info};

use crate::copy;
use crate::policy::PortPolicy;
use burrow_runtime::wire::{self, WireError};

/// How long the edge may take to send the stream header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream waits for one of the `forward.max_streams` slots before it is refused
/// as too many. A slot comes free only when a stream's task sees its stream closed: when the
/// edge closes idle kept-alive streams to make room and asks again at once, their slots free
/// a few milliseconds later, and this wait lets the new stream take one of them (the
/// semaphore wakes it, first come first served) instead of racing them to a refusal. Short
/// enough that an agent at its cap for real still refuses quickly.
pub const SLOT_WAIT: Duration = Duration::from_millis(200);

/// What this stream needs from the agent.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The port policy.
    pub policy: PortPolicy,
    /// How long the local service may take to accept.
    pub connect_timeout: Duration,
}

/// Why a stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The stream header did not arrive in time.
    #[error("no stream header within {0:?}")]
    HeaderTimeout(Duration),
    /// The stream ended before its header.
    #[error("stream ended before its header")]
    NoHeader,
    /// The header could not be read.
    #[error("stream header: {0}")]
    Wire(#[from] WireError),
}

/// How a stream ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted and copied until both sides finished: bytes to and from the service.
    Copied(u64, u64),
    /// Refused with a reason.
    Refused(RefuseReason),
    /// Accepted, then reset by one side.
    Reset,
}

/// One of the `forward.max_streams` slots, waiting up to [`SLOT_WAIT`] for one; `None`: the
/// stream is refused as too many.
pub async fn slot(slots: Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    tokio::time::timeout(SLOT_WAIT, slots.acquire_owned())
        .await
        .ok()?
        .ok()
}

/// Serves one stream from the edge. `refuse` short-circuits with a reason (stream cap reached).
/// Returns the port and how the stream ended; an error means no usable header arrived.
pub async fn serve(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    limits: &Limits,
    refuse: Option<RefuseReason>,
    on_answer: impl FnOnce(Port, Result<(), RefuseReason>),
) -> Result<(Port, Outcome), ForwardError> {
    let header = tokio::time::timeout(
        HEADER_TIMEOUT,
        wire::read_msg(&mut recv, StreamHeader::decode),
    )
    .await
    .map_err(|_| ForwardError::HeaderTimeout(HEADER_TIMEOUT))??
    .ok_or(ForwardError::NoHeader)?;
    let port = header.port;
    let reason = if let Some(reason) = refuse {
        Err(reason)
    } else if header.version != VERSION {
        Err(RefuseReason::UnsupportedVersion)
    } else if !limits.policy.allows(port) {
        Err(RefuseReason::PortNotAllowed)
    } else {
        dial(port, limits.connect_timeout).await
    };
    on_answer(port, reason.as_ref().map(|_| ()).map_err(|r| *r));
    let mut tcp = match reason {
        Ok(tcp) => tcp,
        Err(reason) => {
            debug!(%port, reason = reason.as_str(), "refused stream");
            wire::write_frame(&mut send, StreamAnswer::Refuse(reason).encoded()).await?;
            let _ = send.finish();
            return Ok((port, Outcome::Refused(reason)));
        }
    };
    // A port marked HTTP/2-only is said so on an HTTP stream: the edge speaks HTTP/2 on it
    // (an HTTP/1.1 stream it opened for a plain request becomes one), and knows for later.
    let http = matches!(header.kind, StreamKind::Http | StreamKind::Http2);
    let answer = if http && limits.policy.http2_only(port) {
        StreamAnswer::AcceptHttp2
    } else {
        StreamAnswer::Accept
    };
    wire::write_frame(&mut send, answer.encoded()).await?;
    debug!(%port, client = ?header.client, "stream accepted");

    let copied = tokio::select! {
        copied = copy::both_ways(&mut tcp, &mut send, &mut recv) => copied,
        () = limits.policy.denied(port) => {
            info!(%port, "the reloaded port policy denies this port; cutting its stream");
            Err(std::io::Error::other("port denied by a reload"))
        }
    };
    match copied {
        Ok((from_service, to_service)) => {
            debug!(%port, to_service, from_service, "stream done");
            Ok((port, Outcome::Copied(to_service, from_service)))
        }
        Err(e) => {
            debug!(%port, error = %e, "stream reset");
            let _ = send.reset(reset::AGENT_ABORT.into());
            let _ = recv.stop(reset::AGENT_ABORT.into());
            Ok((port, Outcome::Reset))
        }
    }
}

/// Dials the port on IPv4 loopback, then IPv6 loopback.
async fn dial(port: Port, timeout: Duration) -> Result<TcpStream, RefuseReason> {
    let targets = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port.get())),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port.get())),
    ];
    let mut reason = RefuseReason::NotListening;
    for addr in targets {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) => debug!(%addr, error = %e, "local dial failed"),
            Err(_) => reason = RefuseReason::ConnectTimeout,
        }
    }
    Err(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stream_waits_briefly_for_a_slot() {
        let slots = Arc::new(Semaphore::new(1));
        let held = slot(slots.clone()).await.expect("a free slot at once");
        let started = tokio::time::Instant::now();
        assert!(slot(slots.clone()).await.is_none(), "none comes free");
        assert_eq!(started.elapsed(), SLOT_WAIT, "refused after the wait");

        let waiting = tokio::spawn(slot(slots.clone()));
        tokio::time::sleep(SLOT_WAIT / 4).await;
        drop(held);
        let started = tokio::time::Instant::now();
        assert!(waiting.await.expect("task").is_some(), "the freed slot");
        assert_eq!(
            started.elapsed(),
            std::time::Duration::ZERO,
            "taken at once"
        );
    }
}
