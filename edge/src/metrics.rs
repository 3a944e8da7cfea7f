//! The edge's Prometheus metrics, registered once here, and the handler of its metrics
//! listener: `/metrics`, `/healthz` (alive) and `/readyz` (listeners up and store open; a
//! cluster edge stays ready while its shared store is away, routing from memory).
//!
//! Labels are bounded (status classes, directions, results); never tunnel keys, devbox ids or
//! client addresses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tracing::warn;

use crate::activity::{self, Activity};
use crate::body::{self, Body};
use crate::registry::Registry as Devboxes;
use crate::store::StoreError;

/// Every metric of the edge.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    agents_connected: IntGauge,
    devboxes: IntGauge,
    /// Public requests answered, by status class.
    pub requests: IntCounterVec,
    /// Time from request to response head.
    pub request_duration: Histogram,
    /// Body bytes, by direction.
    pub bytes: IntCounterVec,
    /// Upgraded connections (WebSocket) open now.
    pub upgrades_open: IntGauge,
    /// Requests past the limits step and not finished (an upgraded connection counts until it
    /// closes, a response until its body ends).
    pub requests_in_flight: IntGauge,
    /// Server-Sent Events responses open now.
    pub sse_open: IntGauge,
    /// Wakes asked of the platform for `wake_on_http` tunnels (`devbox.wake`).
    pub wakes: IntCounter,
    /// Requests that waited for an absent agent, by result.
    pub waits: IntCounterVec,
    /// How long requests waited for an agent.
    pub wait_duration: Histogram,
    /// Requests refused for a missing or wrong tunnel token.
    pub auth_failures: IntCounter,
    /// Agent hellos, by result.
    pub agent_hellos: IntCounterVec,
    /// Requests and connections refused by a limit, by limit.
    pub limited: IntCounterVec,
    /// Requests by how they reached the service: a kept-alive connection, or a fresh stream.
    pub pooled: IntCounterVec,
    /// Idle kept-alive connections to services now, all devboxes together.
    pub pool_idle: IntGauge,
    /// Idle kept-alive connections closed before their reuse, by reason.
    pub pool_evictions: IntCounterVec,
    /// Streams forwarded to another edge of the cluster, by result.
    forwarded: IntCounterVec,
    /// How long opening a stream through another edge took (the hop's added latency, with the
    /// agent's answer).
    forward_open: Histogram,
    /// The labelled counters every request touches, looked up once.
    hot: std::sync::OnceLock<Hot>,
}

/// The labelled counters of the request path: a lookup by label hashes the label values and
/// takes a lock, four times a request (`bench`'s profile showed it at 0.5% of the edge).
#[derive(Debug)]
struct Hot {
    /// `requests_total` by class, 1xx to 5xx.
    by_class: [IntCounter; 5],
    from_client: IntCounter,
    to_client: IntCounter,
    reused: IntCounter,
    opened: IntCounter,
}

impl Hot {
    fn of(m: &Metrics) -> Hot {
        Hot {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| m.requests.with_label_values(&[class])),
            from_client: m.bytes.with_label_values(&["from_client"]),
            to_client: m.bytes.with_label_values(&["to_client"]),
            reused: m.pooled.with_label_values(&["reused"]),
            opened: m.pooled.with_label_values(&["opened"]),
        }
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric")
        };
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let (forwarded, forward_open) = forwarding(counter_vec, histogram);
        let m = Metrics {
            hot: std::sync::OnceLock::new(),
            registry: Registry::new(),
            agents_connected: gauge("burrow_edge_agents_connected", "Agents connected now"),
            devboxes: gauge("burrow_edge_devboxes", "Devboxes registered"),
            requests: counter_vec(
                "burrow_edge_requests_total",
                "Public requests answered, by status class (1xx..5xx)",
                &["class"],
            ),
            request_duration: histogram(
                "burrow_edge_request_duration_seconds",
                "Time from a public request to its response head (time to first byte)",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ],
            ),
            bytes: counter_vec(
                "burrow_edge_bytes_total",
                "HTTP body bytes through the edge, by direction (from_client, to_client)",
                &["direction"],
            ),
            upgrades_open: gauge(
                "burrow_edge_upgrades_open",
                "Upgraded connections (WebSocket) open now",
            ),
            requests_in_flight: gauge(
                "burrow_edge_requests_in_flight",
                "Requests admitted and not finished (upgrades until they close)",
            ),
            sse_open: gauge(
                "burrow_edge_sse_open",
                "Server-Sent Events responses streaming now",
            ),
            wakes: counter(
                "burrow_edge_wakes_total",
                "Devboxes the platform was asked to wake (devbox.wake) for a request to a wake_on_http tunnel",
            ),
            waits: counter_vec(
                "burrow_edge_agent_waits_total",
                "Requests that waited for an absent agent, by result (served, timed_out, queue_full)",
                &["result"],
            ),
            wait_duration: histogram(
                "burrow_edge_agent_wait_seconds",
                "How long requests waited for an absent agent",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0],
            ),
            auth_failures: counter(
                "burrow_edge_auth_failures_total",
                "Requests refused for a missing or wrong tunnel token",
            ),
            agent_hellos: counter_vec(
                "burrow_edge_agent_hellos_total",
                "Agent hellos, by result (accepted, bad_token, busy, bad_version)",
                &["result"],
            ),
            limited: counter_vec(
                "burrow_edge_limited_total",
                "Requests and connections refused by a limit, by limit (rate, streams, connections, admin_failures, handshakes, handshakes_per_source)",
                &["limit"],
            ),
            pooled: counter_vec(
                "burrow_edge_service_connections_total",
                "Requests by the connection to the service they used (reused: kept alive; opened: a new stream to the agent)",
                &["connection"],
            ),
            pool_idle: gauge(
                "burrow_edge_pool_idle",
                "Idle kept-alive connections to services now, all devboxes together",
            ),
            pool_evictions: counter_vec(
                "burrow_edge_pool_evictions_total",
                "Idle kept-alive connections closed before their reuse, by reason (total_cap, devbox_limit, agent_streams, expired, closed)",
                &["reason"],
            ),
            forwarded,
            forward_open,
        };
        for c in m.collectors() {
            // Invariant: the names above are distinct and valid.
            m.registry.register(c).expect("metric registers once");
        }
        Arc::new(m)
    }

    /// Every metric, for registering.
    fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 19] {
        let m = self;
        [
            Box::new(m.agents_connected.clone()),
            Box::new(m.devboxes.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.upgrades_open.clone()),
            Box::new(m.requests_in_flight.clone()),
            Box::new(m.sse_open.clone()),
            Box::new(m.wakes.clone()),
            Box::new(m.waits.clone()),
            Box::new(m.wait_duration.clone()),
            Box::new(m.auth_failures.clone()),
            Box::new(m.agent_hellos.clone()),
            Box::new(m.limited.clone()),
            Box::new(m.pooled.clone()),
            Box::new(m.pool_idle.clone()),
            Box::new(m.pool_evictions.clone()),
            Box::new(m.forwarded.clone()),
            Box::new(m.forward_open.clone()),
        ]
    }

    /// Counts an answered request.
    pub fn answered(&self, status: StatusCode, took: Duration) {
        let class = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.hot().by_class[class].inc();
        self.request_duration.observe(took.as_secs_f64());
    }

    fn hot(&self) -> &Hot {
        self.hot.get_or_init(|| Hot::of(self))
    }

    /// Counts a request sent on a kept-alive connection (`reused`) or a fresh stream.
    pub fn pooled(&self, reused: bool) {
        let hot = self.hot();
        if reused { &hot.reused } else { &hot.opened }.inc();
    }

    /// Wraps a body so its bytes are counted in `direction`, and each frame touches the
    /// devbox's `activity` (a tunnel with `http_keep_alive`); `guard` lives as long as the
    /// body (an open-SSE gauge, a devbox's stream slot).
    pub fn count_body<B>(
        &self,
        body: B,
        direction: Direction,
        guard: impl Send + Sync + 'static,
        activity: Option<Activity>,
    ) -> CountedBody<B>
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        let counter = match direction {
            Direction::FromClient => self.hot().from_client.clone(),
            Direction::ToClient => self.hot().to_client.clone(),
        };
        body.map_frame(Box::new(move |frame: hyper::body::Frame<Bytes>| {
            let _alive = &guard;
            if let Some(data) = frame.data_ref() {
                counter.inc_by(data.len() as u64);
            }
            activity::touch(activity.as_ref());
            frame
        }))
    }

    /// Counts a stream opened (or not) through another edge, and how long it took.
    pub fn forwarded(&self, result: &str, took: std::time::Duration) {
        self.forwarded.with_label_values(&[result]).inc();
        if result == "opened" {
            self.forward_open.observe(took.as_secs_f64());
        }
    }

    /// Registers more metrics (a cluster edge's) to be rendered with these.
    pub fn register(&self, collectors: Vec<Box<dyn prometheus::core::Collector>>) {
        for c in collectors {
            if let Err(e) = self.registry.register(c) {
                warn!(error = %e, "a metric registers twice");
            }
        }
    }

    /// The text exposition, with the scrape-time gauges refreshed from `devboxes`.
    pub fn render(&self, devboxes: &Devboxes) -> String {
        let list = devboxes.list();
        self.devboxes
            .set(i64::try_from(list.len()).unwrap_or(i64::MAX));
        let connected = list.iter().filter(|d| d.connected_since.is_some()).count();
        self.agents_connected
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Answers a request on the metrics listener.
    pub fn handle(&self, path: &str, devboxes: &Devboxes) -> Response<Body> {
        let (status, content_type, text) = match path {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.render(devboxes),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            "/readyz" => match devboxes.store_ok() {
                Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
                // A cluster edge routes from memory while its shared store is away: taking
                // every edge out of a load balancer at once would turn a database outage
                // into a tunnel outage. Only admin writes wait for the store.
                Err(e @ StoreError::Unavailable(_)) => (
                    StatusCode::OK,
                    "text/plain",
                    format!("ready; admin writes fail until the store is back: {e}\n"),
                ),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {e}\n"),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /metrics, /healthz or /readyz\n".to_owned(),
            ),
        };
        let mut r = Response::new(body::full(text));
        *r.status_mut() = status;
        if let Ok(v) = header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        r
    }
}

/// Which way a body goes (`burrow_edge_bytes_total{direction}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A request's body, toward the service.
    FromClient,
    /// A response's body, toward the client.
    ToClient,
}

/// A body whose data frames are counted.
pub type CountedBody<B> = http_body_util::combinators::MapFrame<
    B,
    Box<dyn FnMut(hyper::body::Frame<Bytes>) -> hyper::body::Frame<Bytes> + Send + Sync>,
>;

/// Decrements a gauge when dropped (an open SSE response, an upgraded connection).
#[derive(Debug)]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `gauge` now and decrements it on drop.
    pub fn new(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The metrics of requests forwarded to another edge of the cluster.
fn forwarding(
    counter_vec: impl Fn(&str, &str, &[&str]) -> IntCounterVec,
    histogram: impl Fn(&str, &str, Vec<f64>) -> Histogram,
) -> (IntCounterVec, Histogram) {
    let forwarded = counter_vec(
        "burrow_edge_forwarded_total",
        "Streams opened through another edge of the cluster, by result (opened, not_here, refused, failed)",
        &["result"],
    );
    let open = histogram(
        "burrow_edge_forward_open_seconds",
        "Time to open a stream through another edge: the mesh hop and the agent's answer",
        vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ],
    );
    (forwarded, open)
}
