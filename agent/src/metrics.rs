//! The agent's Prometheus metrics, registered once here, and its small HTTP listener for
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (connected to the edge).
//!
//! Labels are bounded: causes, outcomes, port classes and directions, never ports, devbox ids,
//! tunnel keys or addresses. The listener is hand-written HTTP/1.1 (one request per connection)
//! so the agent, which runs in every devbox, carries no HTTP server library.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_protocol::{Port, RefuseReason};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::forward::Outcome;
use crate::status::Status;

/// Every metric of the agent.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// 1 while a session with the edge is up.
    pub connected: IntGauge,
    /// Sessions established.
    pub connects: IntCounter,
    /// Sessions ended, by cause.
    pub disconnects: IntCounterVec,
    /// Dials that failed, by cause.
    pub dial_failures: IntCounterVec,
    /// Resumes detected, by kind.
    pub resumes: IntCounterVec,
    /// Last heartbeat round trip.
    pub rtt: Gauge,
    /// Data streams open now.
    pub streams_open: IntGauge,
    /// Data streams by port class and outcome.
    pub streams: IntCounterVec,
    /// Bytes copied, by direction.
    pub bytes: IntCounterVec,
    /// How long accepted streams lasted.
    pub stream_duration: Histogram,
    heartbeat_age: Gauge,
    quic_lost_packets: IntGauge,
    quic_cwnd: IntGauge,
    quic_path_rtt: Gauge,
    last_pong: Mutex<Option<Instant>>,
    conn: Mutex<Option<quinn::Connection>>,
    /// Streams and bytes per port, for `burrow-agent status` (not a label: unbounded).
    ports: Mutex<HashMap<u16, PortStats>>,
    started: Instant,
}

/// Per-port totals shown by `burrow-agent status`.
#[derive(Debug, Clone, Copy, Default)]
struct PortStats {
    streams: u64,
    refused: u64,
    bytes: u64,
}

/// Ports remembered for the status view; past this, new ports are not tracked.
const MAX_TRACKED_PORTS: usize = 4096;

/// Bucket bounds of `burrow_agent_stream_duration_seconds`: a millisecond to half an hour.
const STREAM_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0, 1800.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        let m = Metrics {
            connected: int_gauge(
                r,
                "burrow_agent_connected",
                "1 while a session with the edge is up",
            ),
            connects: register(
                r,
                IntCounter::new("burrow_agent_connects_total", "Sessions established"),
            ),
            disconnects: counter_vec(
                r,
                "burrow_agent_disconnects_total",
                "Sessions ended, by cause",
                &["cause"],
            ),
            dial_failures: counter_vec(
                r,
                "burrow_agent_dial_failures_total",
                "Dials that failed, by cause",
                &["cause"],
            ),
            resumes: counter_vec(
                r,
                "burrow_agent_resumes_total",
                "Resumes detected, by kind",
                &["kind"],
            ),
            rtt: gauge(
                r,
                "burrow_agent_rtt_seconds",
                "Round trip of the last heartbeat answered by the edge",
            ),
            streams_open: int_gauge(r, "burrow_agent_streams_open", "Data streams open now"),
            streams: counter_vec(
                r,
                "burrow_agent_streams_total",
                "Data streams, by port class (system, user, dynamic) and outcome",
                &["port_class", "outcome"],
            ),
            bytes: counter_vec(
                r,
                "burrow_agent_bytes_total",
                "Bytes copied between edge and local services, by direction",
                &["direction"],
            ),
            stream_duration: histogram(
                r,
                "burrow_agent_stream_duration_seconds",
                "How long accepted data streams lasted",
                STREAM_DURATION_BUCKETS,
            ),
            heartbeat_age: gauge(
                r,
                "burrow_agent_heartbeat_age_seconds",
                "Time since the edge last answered a heartbeat (absent before the first)",
            ),
            quic_lost_packets: int_gauge(
                r,
                "burrow_agent_quic_lost_packets",
                "Packets lost on the current connection",
            ),
            quic_cwnd: int_gauge(
                r,
                "burrow_agent_quic_congestion_window_bytes",
                "Congestion window of the current connection",
            ),
            quic_path_rtt: gauge(
                r,
                "burrow_agent_quic_path_rtt_seconds",
                "QUIC's smoothed RTT estimate of the current connection",
            ),
            last_pong: Mutex::new(None),
            conn: Mutex::new(None),
            ports: Mutex::new(HashMap::new()),
            started: Instant::now(),
            registry,
        };
        Arc::new(m)
    }

    /// A heartbeat was answered.
    pub fn pong(&self, rtt: Duration) {
        self.rtt.set(rtt.as_secs_f64());
        *self.last_pong.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// The connection whose QUIC stats are reported (`None` while disconnected).
    pub fn set_connection(&self, conn: Option<quinn::Connection>) {
        self.connected.set(i64::from(conn.is_some()));
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }

    /// Counts a stream when the agent answers it: accepted, or refused and why.
    pub fn answered(&self, port: Port, answer: Result<(), RefuseReason>) {
        let outcome_label = match answer {
            Ok(()) => "accepted",
            Err(RefuseReason::NotListening) => "not_listening",
            Err(RefuseReason::PortNotAllowed) => "port_not_allowed",
            Err(RefuseReason::ConnectTimeout) => "connect_timeout",
            Err(RefuseReason::TooManyStreams) => "too_many_streams",
            Err(_) => "refused_other",
        };
        self.streams
            .with_label_values(&[port_class(port), outcome_label])
            .inc();
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if ports.len() < MAX_TRACKED_PORTS || ports.contains_key(&port.get()) {
            let entry = ports.entry(port.get()).or_default();
            entry.streams += 1;
            if answer.is_err() {
                entry.refused += 1;
            }
        }
    }

    /// Counts how an accepted stream ended: its bytes and duration, or a reset.
    pub fn ended(&self, port: Port, outcome: Outcome, took: Duration) {
        match outcome {
            Outcome::Copied(to_service, from_service) => {
                self.bytes
                    .with_label_values(&["to_service"])
                    .inc_by(to_service);
                self.bytes
                    .with_label_values(&["from_service"])
                    .inc_by(from_service);
                self.stream_duration.observe(took.as_secs_f64());
                let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(entry) = ports.get_mut(&port.get()) {
                    entry.bytes += to_service + from_service;
                }
            }
            Outcome::Reset => {
                self.stream_duration.observe(took.as_secs_f64());
                self.streams
                    .with_label_values(&[port_class(port), "reset"])
                    .inc();
            }
            Outcome::Refused(_) => {}
        }
    }

    /// What `burrow-agent status` shows, as JSON.
    pub fn status_json(&self, status: &Status, edge: &str) -> serde_json::Value {
        let mut ports: Vec<(u16, PortStats)> = self
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, s)| (*p, *s))
            .collect();
        ports.sort_by(|a, b| b.1.streams.cmp(&a.1.streams).then(a.0.cmp(&b.0)));
        let busiest: Vec<serde_json::Value> = ports
            .iter()
            .take(5)
            .map(|(port, s)| {
                serde_json::json!({
                    "port": port, "streams": s.streams, "refused": s.refused, "bytes": s.bytes,
                })
            })
            .collect();
        let heartbeat_age = self
            .last_pong
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed().as_secs_f64());
        serde_json::json!({
            "edge": edge,
            "state": status.state.as_str(),
            "connected": status.connected,
            "devbox": status.devbox_id,
            "tunnel": status.tunnel.as_ref().map(|t| serde_json::json!({
                "key": t.key, "url_template": t.url_template, "auth_mode": t.auth_mode.as_str(),
            })),
            "uptime_secs": self.started.elapsed().as_secs(),
            "rtt_ms": status.rtt.map(|r| r.as_secs_f64() * 1000.0),
            "heartbeat_age_secs": heartbeat_age,
            "sessions": status.sessions,
            "resumes": status.resumes,
            "streams_open": status.streams,
            "last_error": status.last_error,
            "busiest_ports": busiest,
        })
    }

    /// The Prometheus text exposition, with the scrape-time gauges refreshed.
    pub fn render(&self) -> String {
        if let Some(at) = *self.last_pong.lock().unwrap_or_else(|p| p.into_inner()) {
            self.heartbeat_age.set(at.elapsed().as_secs_f64());
        }
        if let Some(conn) = &*self.conn.lock().unwrap_or_else(|p| p.into_inner()) {
            let stats = conn.stats();
            self.quic_lost_packets
                .set(i64::try_from(stats.path.lost_packets).unwrap_or(i64::MAX));
            self.quic_cwnd
                .set(i64::try_from(stats.path.cwnd).unwrap_or(i64::MAX));
            self.quic_path_rtt.set(stats.path.rtt.as_secs_f64());
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Registers a metric just made, and hands it back to be kept.
fn register<C>(registry: &Registry, metric: prometheus::Result<C>) -> C
where
    C: prometheus::core::Collector + Clone + 'static,
{
    // Invariant: every name and help text in `Metrics::new` is valid, and each is registered
    // once.
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registers once");
    metric
}

/// A gauge, registered.
fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(registry, Gauge::new(name, help))
}

/// An integer gauge, registered.
fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help))
}

/// A histogram with these bucket bounds, registered.
fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, Histogram::with_opts(opts))
}

/// A counter with labels, registered.
fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    status: watch::Receiver<Status>,
    edge: String,
    shutdown: CancellationToken,
) {
    let edge: Arc<str> = edge.into();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let status = status.clone();
        let edge = edge.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                respond(tcp, &metrics, &status, &edge),
            );
            if !matches!(answer.await, Ok(Ok(()))) {
                debug!(%peer, "metrics request failed or timed out");
            }
        });
    }
}

/// Binds the metrics listener, naming the key on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("`metrics.listen`: cannot listen on {addr}: {e}"))
}

async fn respond(
    mut tcp: TcpStream,
    metrics: &Metrics,
    status: &watch::Receiver<Status>,
    edge: &str,
) -> std::io::Result<()> {
    // Read the request head (bounded); only the request line matters.
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 || head.len() + n > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/status") => {
            let s = status.borrow().clone();
            let mut body = metrics.status_json(&s, edge).to_string();
            body.push('\n');
            ("200 OK", "application/json", body)
        }
        ("GET", "/readyz") => {
            let s = status.borrow().clone();
            if s.connected {
                ("200 OK", "text/plain", "connected to the edge\n".to_owned())
            } else {
                let why = s.last_error.unwrap_or_else(|| "not connected yet".into());
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("not connected to the edge: {why}\n"),
                )
            }
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(response.as_bytes()).await?;
    tcp.shutdown().await
}

/// The class label of a port.
fn port_class(port: Port) -> &'static str {
    match port.get() {
        0..=1023 => "system",
        1024..=49151 => "user",
        _ => "dynamic",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_family_with_bounded_labels() {
        let m = Metrics::new();
        m.connects.inc();
        m.answered(Port::new(3000).unwrap(), Ok(()));
        m.ended(
            Port::new(3000).unwrap(),
            Outcome::Copied(10, 20),
            Duration::from_millis(5),
        );
        m.answered(Port::new(22).unwrap(), Err(RefuseReason::PortNotAllowed));
        m.pong(Duration::from_millis(3));
        let text = m.render();
        for needle in [
            "burrow_agent_connects_total 1",
            "burrow_agent_streams_total{outcome=\"accepted\",port_class=\"user\"} 1",
            "burrow_agent_streams_total{outcome=\"port_not_allowed\",port_class=\"system\"} 1",
            "burrow_agent_bytes_total{direction=\"from_service\"} 20",
            "burrow_agent_stream_duration_seconds_count 1",
            "burrow_agent_rtt_seconds 0.003",
            "burrow_agent_heartbeat_age_seconds",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains("3000"), "no port numbers as labels");
    }
}
