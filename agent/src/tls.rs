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
/// streams at once.
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

/// Transport settings for the agent's end.
fn transport(liveness: &Liveness, max_streams: usize) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // The edge opens a bidirectional stream per connection to a service. QUIC's own limit sits
    // above `forward.max_streams`, so the streams past it are refused with a reason the edge
    // can show instead of waiting for credit.
    let limit = u32::try_from(max_streams.saturating_add(256)).unwrap_or(u32::MAX);
    t.max_concurrent_bidi_streams(limit.into());
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
