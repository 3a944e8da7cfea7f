//! Webhooks: every emitted event POSTed to `platform.webhook_url`, in order, signed, retried.
//!
//! The emitter only pushes onto a bounded [`Queue`] (the oldest event is dropped when it is
//! full); one task takes events off it and delivers each before the next. An attempt fails on a
//! connection error, a timeout ([`ATTEMPT_TIMEOUT`]) or an answer other than 2xx; the
//! [`Backoff`] policy says how long to wait before the next, and when to give the event up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, Opts};
use ring::hmac;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::client::{Client, WebhookUrl};
use super::events::Posted;
use crate::secret::hex;

/// Events the queue holds; past it the oldest is dropped (and counted).
pub const QUEUE_CAPACITY: usize = 10_000;

/// How long one delivery attempt may take: connecting, sending, and the answer's head.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Burrow-Signature";

/// Events waiting for delivery, oldest first, at most `capacity` of them.
#[derive(Debug)]
pub struct Queue {
    items: Mutex<VecDeque<Arc<Posted>>>,
    capacity: usize,
    /// Woken at every push.
    ready: Notify,
    /// Events dropped because the queue was full.
    dropped: IntCounter,
}

impl Queue {
    /// An empty queue of `capacity` events; events dropped for room are counted in `dropped`.
    pub fn new(capacity: usize, dropped: IntCounter) -> Queue {
        Queue {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            ready: Notify::new(),
            dropped,
        }
    }

    /// Adds an event at the back, dropping the oldest when the queue is full. Never waits.
    pub fn push(&self, posted: Arc<Posted>) {
        let mut items = self.lock();
        if items.len() >= self.capacity {
            if let Some(oldest) = items.pop_front() {
                self.dropped.inc();
                debug!(
                    id = oldest.id,
                    event = oldest.kind,
                    "webhook queue full; dropped the oldest event"
                );
            }
        }
        items.push_back(posted);
        drop(items);
        self.ready.notify_one();
    }

    /// The oldest event, if any.
    pub fn pop(&self) -> Option<Arc<Posted>> {
        self.lock().pop_front()
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the oldest event.
    pub async fn next(&self) -> Arc<Posted> {
        loop {
            if let Some(posted) = self.pop() {
                return posted;
            }
            // A push between the pop and here left a permit: this returns at once then.
            self.ready.notified().await;
        }
    }

    /// The events; a panic elsewhere while it was held left a valid deque.
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Posted>>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// When to try a failed delivery again: exponential from `first`, capped at `max`, with ±25 %
/// jitter (never past `max`), for at most `tries` attempts in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// Attempts in all, the first included.
    pub tries: u32,
}

impl Default for Backoff {
    /// 0.5 s, 1 s, 2 s, ... 30 s, 30 s: ten tries within about four minutes (with every attempt
    /// timing out), then the event is given up.
    fn default() -> Backoff {
        Backoff {
            first: Duration::from_millis(500),
            max: Duration::from_secs(30),
            tries: 10,
        }
    }
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (1 for the first); `None` when that was
    /// the last. `jitter` in [0, 1) picks the point in the ±25 % band.
    pub fn after(&self, attempt: u32, jitter: f64) -> Option<Duration> {
        if attempt == 0 || attempt >= self.tries {
            return None;
        }
        let doubled = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
        let nominal = self.first.saturating_mul(doubled).min(self.max);
        let jittered = nominal.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0));
        Some(jittered.min(self.max))
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`: the `Burrow-Signature` value.
pub fn signature(key: &hmac::Key, t: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={t},v1={}", hex(ctx.sign().as_ref()))
}

/// The webhook metrics: `burrow_edge_webhooks_total{result}` and
/// `burrow_edge_webhook_dropped_total`.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    /// Attempts by result: delivered, retried (failed, tried again), failed (given up).
    pub results: IntCounterVec,
    /// Events dropped from a full queue.
    pub dropped: IntCounter,
}

impl WebhookMetrics {
    /// Creates the metrics (every result at 0), to be registered once.
    pub fn new() -> WebhookMetrics {
        // Invariant: the names and labels are valid and fixed.
        let results = IntCounterVec::new(
            Opts::new(
                "burrow_edge_webhooks_total",
                "Webhook deliveries by result (delivered; retried: an attempt failed and will be \
                 tried again; failed: given up after every try)",
            ),
            &["result"],
        )
        .expect("valid metric");
        for result in ["delivered", "retried", "failed"] {
            results.with_label_values(&[result]);
        }
        let dropped = IntCounter::new(
            "burrow_edge_webhook_dropped_total",
            "Events dropped from the full webhook queue (the oldest goes first)",
        )
        .expect("valid metric");
        WebhookMetrics { results, dropped }
    }

    /// The collectors, for [`crate::metrics::Metrics::register`].
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.results.clone()),
            Box::new(self.dropped.clone()),
        ]
    }
}

impl Default for WebhookMetrics {
    fn default() -> WebhookMetrics {
        WebhookMetrics::new()
    }
}

/// The running webhook task.
#[derive(Debug)]
pub struct Webhooks {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Webhooks {
    /// Starts delivering what `queue` receives to `url`, signed with `secret`.
    pub fn start(
        url: WebhookUrl,
        secret: &[u8],
        queue: Arc<Queue>,
        metrics: WebhookMetrics,
        flush: Duration,
    ) -> Webhooks {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let deliverer = Deliverer {
            client: Client::new(url, tasks.clone()),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            queue,
            metrics,
            backoff: Backoff::default(),
        };
        tasks.spawn(deliverer.run(stop.clone(), flush));
        Webhooks { stop, tasks }
    }

    /// Stops the task once it has delivered what is queued, or after its flush time; returns
    /// when it (and its connections) ended.
    pub async fn finish(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What the webhook task owns.
struct Deliverer {
    client: Client,
    key: hmac::Key,
    queue: Arc<Queue>,
    metrics: WebhookMetrics,
    backoff: Backoff,
}

impl Deliverer {
    /// Delivers events in order until `stop`, then what is left for up to `flush`.
    async fn run(mut self, stop: CancellationToken, flush: Duration) {
        let mut interrupted = None;
        loop {
            let posted = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                posted = self.queue.next() => posted,
            };
            tokio::select! {
                () = self.deliver(&posted) => {}
                () = stop.cancelled() => {
                    interrupted = Some(posted);
                    break;
                }
            }
        }
        let rest = async {
            if let Some(posted) = interrupted {
                self.deliver(&posted).await;
            }
            while let Some(posted) = self.queue.pop() {
                self.deliver(&posted).await;
            }
        };
        if tokio::time::timeout(flush, rest).await.is_err() {
            warn!(
                undelivered = self.queue.len(),
                "the edge stopped before every webhook was delivered"
            );
        }
    }

    /// Delivers one event, trying again as [`Backoff`] says; gives it up after the last try.
    async fn deliver(&mut self, posted: &Posted) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.attempt(posted).await {
                Ok(()) => {
                    self.metrics.results.with_label_values(&["delivered"]).inc();
                    debug!(
                        id = posted.id,
                        event = posted.kind,
                        attempt,
                        "webhook delivered"
                    );
                    return;
                }
                Err(error) => error,
            };
            let Some(wait) = self.backoff.after(attempt, fastrand::f64()) else {
                self.metrics.results.with_label_values(&["failed"]).inc();
                warn!(
                    id = posted.id, event = posted.kind, attempts = attempt, %error,
                    "webhook given up after its last try; the event is dropped (check \
                     `platform.webhook_url` and the receiver)"
                );
                return;
            };
            self.metrics.results.with_label_values(&["retried"]).inc();
            info!(
                id = posted.id, event = posted.kind, attempt, %error, retry_in = ?wait,
                "webhook failed; trying again"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One signed POST of the event, within [`ATTEMPT_TIMEOUT`].
    async fn attempt(&mut self, posted: &Posted) -> Result<(), String> {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signed = signature(&self.key, t, &posted.json);
        let post = self.client.post(posted.json.clone(), &signed);
        match tokio::time::timeout(ATTEMPT_TIMEOUT, post).await {
            Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(status)) if status.is_success() => Ok(()),
            Ok(Ok(status)) => Err(format!("the receiver answered {status}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn posted(id: u64) -> Arc<Posted> {
        Arc::new(Posted {
            id,
            kind: "devbox.wake",
            json: Bytes::from(format!("{{\"id\":{id}}}")),
        })
    }

    #[test]
    fn signature_is_hmac_sha256_of_time_dot_body_in_hex() {
        let secret = b"whsec-test-secret";
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let body = br#"{"id":1,"at_ms":1700000000000,"type":"agent.connected","devbox":"box-1"}"#;
        let header = signature(&key, 1_700_000_000, body);
        let (t, v1) = header
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .expect("t=...,v1=...");
        assert_eq!(t, "1700000000");
        assert_eq!(v1.len(), 64, "hex of 32 bytes: {v1}");
        assert!(
            v1.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // Computed independently: openssl over the same input, when it is installed ...
        let input = format!("{t}.{}", std::str::from_utf8(body).expect("text"));
        let openssl = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-hmac", "whsec-test-secret"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(input.as_bytes())?;
                }
                child.wait_with_output()
            });
        if let Some(out) = openssl.ok().filter(|o| o.status.success()) {
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(text.trim().rsplit(' ').next(), Some(v1), "{text}");
        }
        // ... and always a fixed vector, computed once outside burrow: `printf '%s' 1.x |
        // openssl dgst -sha256 -hmac key`, and Python's hmac module, agree on it.
        let fixed = signature(&hmac::Key::new(hmac::HMAC_SHA256, b"key"), 1, b"x");
        assert_eq!(
            fixed,
            "t=1,v1=fc4913c41a7bf793267e2a384f3261c9436ec2cd097bd745e7b0d99113f510ec"
        );
    }

    #[test]
    fn backoff_doubles_from_half_a_second_to_thirty_and_stops_after_ten_tries() {
        let b = Backoff::default();
        let middle: Vec<f64> = (1..10)
            .map(|n| b.after(n, 0.5).expect("a try left").as_secs_f64())
            .collect();
        assert_eq!(middle, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
        assert_eq!(b.after(10, 0.5), None, "ten tries in all");
        assert_eq!(b.after(0, 0.5), None);
        for n in 1..10 {
            let low = b.after(n, 0.0).expect("low");
            let high = b.after(n, 0.999).expect("high");
            let nominal = middle[n as usize - 1];
            assert!(
                (low.as_secs_f64() - nominal * 0.75).abs() < 1e-9,
                "{n}: {low:?}"
            );
            assert!(
                high.as_secs_f64() <= (nominal * 1.25).min(30.0),
                "{n}: {high:?}"
            );
            assert!(
                high > low || nominal >= 30.0,
                "{n}: jitter spreads the waits"
            );
        }
        let total: f64 = (1..10)
            .map(|n| b.after(n, 0.999).expect("wait").as_secs_f64())
            .sum();
        let worst = total + 10.0 * ATTEMPT_TIMEOUT.as_secs_f64();
        assert!(worst < 300.0, "given up within five minutes: {worst} s");
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let dropped = IntCounter::new("dropped", "test").expect("counter");
        let queue = Queue::new(3, dropped.clone());
        for id in 1..=5 {
            queue.push(posted(id));
        }
        assert_eq!(dropped.get(), 2);
        let ids: Vec<u64> = std::iter::from_fn(|| queue.pop()).map(|p| p.id).collect();
        assert_eq!(ids, [3, 4, 5], "the newest are kept, in order");
    }

    #[tokio::test]
    async fn next_waits_for_a_push() {
        let queue = Arc::new(Queue::new(8, IntCounter::new("d", "t").expect("counter")));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await.id }
        });
        tokio::task::yield_now().await;
        queue.push(posted(7));
        let id = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the push")
            .expect("task");
        assert_eq!(id, 7);
    }
}
