//! The agent's side of the QUIC link: TLS 1.3 only, the edge's certificate verified against a
//! configured CA or the system roots, ALPN `burrow/1`, and the transport settings.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;

pub use burrow_runtime::trust::TlsError;
use burrow_runtime::trust::roots;

use crate::config::Liveness;

/// Builds the QUIC client configuration; the edge may open up to about `max_streams` data
/// streams at once, the credit for them granted as they open ([`StreamCredit`]).
pub fn client_config(
    ca: Option<&Path>,
    liveness: &Liveness,
    max_streams: usize,
) -> Result<quinn::ClientConfig, TlsError> {
    let roots = roots(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![burrow_protocol::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport(liveness, max_streams)));
    Ok(config)
}

/// How many data streams the edge may have open on this connection at once (QUIC's
/// `MAX_STREAMS` credit).
///
/// quinn keeps, per connection, one receive-side state for every stream the credit allows, and
/// recycles them; each keeps the largest reassembly queue its streams ever needed. With the
/// credit at its ceiling from the start (1,280 by default), an agent that had carried a few
/// thousand streams held ~2 KiB more for each of 1,280 recycled states: its idle RSS rose by
/// 0.3 MiB with every round of raw TCP load until the ring was full (issue 11: 7.7 -> 10.2 MiB
/// over ten rounds). So the credit starts at [`StreamCredit::INITIAL`] and doubles whenever half
/// of it is in use, up to its ceiling: an agent holds states for the streams it has needed, not
/// for the most it could ever take.
#[derive(Debug, Clone, Copy)]
pub struct StreamCredit {
    granted: u32,
    ceiling: u32,
}

impl StreamCredit {
    /// The credit a new connection starts with.
    pub const INITIAL: u32 = 64;

    /// The credit for an agent with `forward.max_streams`: its ceiling sits 256 above it, so
    /// the streams past `max_streams` are refused with a reason the edge can show instead of
    /// waiting for credit.
    pub fn new(max_streams: usize) -> Self {
        let ceiling = u32::try_from(max_streams.saturating_add(256)).unwrap_or(u32::MAX);
        StreamCredit {
            granted: Self::INITIAL.min(ceiling),
            ceiling,
        }
    }

    /// The credit granted so far.
    pub fn granted(&self) -> u32 {
        self.granted
    }

    /// With `open` streams open: the larger credit to grant, if half of it is in use.
    pub fn raise(&mut self, open: u64) -> Option<u32> {
        let open = u32::try_from(open).unwrap_or(u32::MAX);
        if self.granted >= self.ceiling || open.saturating_mul(2) < self.granted {
            return None;
        }
        self.granted = self.granted.saturating_mul(2).min(self.ceiling);
        Some(self.granted)
    }
}

/// Transport settings for the agent's end.
fn transport(liveness: &Liveness, max_streams: usize) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // The edge opens a bidirectional stream per connection to a service. The credit starts
    // small and the session raises it as streams open ([`StreamCredit`]).
    t.max_concurrent_bidi_streams(StreamCredit::new(max_streams).granted().into());
    t.max_concurrent_uni_streams(0u32.into());
    // The heartbeat already sends a packet every interval; QUIC's keep-alive at the same
    // interval only fires if heartbeats stop being sent, and keeps NAT mappings open then.
    t.keep_alive_interval(Some(liveness.heartbeat_interval));
    if let Ok(idle) = liveness.idle_timeout.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    // quinn assumes 333 ms before it has measured the path, so a lost Initial is sent again
    // only after about 1 s, then 2 s, 4 s. A lower guess retries sooner while the edge is
    // unreachable, which shortens the time to reconnect once the path heals.
    t.initial_rtt(Duration::from_millis(100));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credit_doubles_when_half_is_in_use_up_to_its_ceiling() {
        let mut credit = StreamCredit::new(1024);
        assert_eq!(credit.granted(), 64);
        assert_eq!(credit.raise(31), None, "under half");
        assert_eq!(credit.raise(32), Some(128));
        assert_eq!(credit.raise(33), None, "under half of the new credit");
        let mut last = 128;
        for open in 64..2000 {
            if let Some(granted) = credit.raise(open) {
                assert!(granted > last && granted <= 1280, "{granted} after {last}");
                last = granted;
            }
        }
        assert_eq!(credit.granted(), 1280, "max_streams + 256 at most");
    }

    #[test]
    fn the_ceiling_is_max_streams_and_256() {
        let mut credit = StreamCredit::new(0);
        assert_eq!(credit.granted(), 64);
        assert_eq!(credit.raise(1000), Some(128));
        assert_eq!(credit.raise(1000), Some(256));
        assert_eq!(credit.raise(1000), None, "256 = 0 + 256");
    }
}
