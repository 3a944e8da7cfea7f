//! Network faults between a connected agent and its edge, injected by a UDP relay on the path,
//! with the agent's default liveness settings (what users get): a long blackhole, an edge that
//! dies and comes back on the same address, a NAT rebinding in the middle of a transfer, and a
//! lossy slow path. Each test prints what it measured (run with `--nocapture` to see it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_agent::Status;
use burrow_tests::relay::{Relay, RelayStats};
use burrow_tests::services::{http_service, pattern};
use burrow_tests::{Devbox, EdgeBuilder, TestAgent, TestEdge, WAIT, curl};
use tokio::time::{Instant, timeout};

const MIB: u64 = 1024 * 1024;
/// The size of the bulk download on a clean path.
const BULK: u64 = 32 * MIB;
/// The size of the bulk download on the lossy path: 5% loss at a 200 ms round trip caps
/// congestion-controlled throughput near 40 KB/s (measured: 32 MiB would take about 14 min).
const LOSSY_BULK: u64 = 2 * MIB;

/// An edge, a devbox with an open tunnel, a local HTTP service, and an agent that dials the
/// edge through a relay.
struct Tunnel {
    edge: TestEdge,
    devbox: Devbox,
    key: String,
    port: u16,
    relay: Relay,
    agent: TestAgent,
}

impl Tunnel {
    /// Starts everything; `path` sets the relay up before the agent's first packet.
    async fn start(edge: EdgeBuilder, path: impl FnOnce(&Relay)) -> Tunnel {
        let edge = edge.start().await;
        let devbox = edge.devbox(Some("open")).await;
        let key = devbox.key.clone().expect("tunnel key");
        let service = http_service("127.0.0.1:0").await;
        let relay = Relay::start(edge.agents_addr()).await;
        path(&relay);
        let via = relay.addr().to_string();
        let agent = TestAgent::spawn_full(&edge, &devbox, &[("edge", &via)], &[], None);
        agent.wait_for("connected", |s| s.connected).await;
        Tunnel {
            edge,
            devbox,
            key,
            port: service.addr.port(),
            relay,
            agent,
        }
    }

    /// The tunnel URL of `path` on the service.
    fn url(&self, path: &str) -> String {
        self.edge.url(self.port, &self.key, path)
    }

    /// Waits up to `bound` for the agent's status to satisfy `until`; the time it took.
    async fn within(
        &self,
        bound: Duration,
        what: &str,
        until: impl Fn(&Status) -> bool,
    ) -> Duration {
        let start = Instant::now();
        let mut status = self.agent.agent.status.clone();
        timeout(bound, status.wait_for(|s| until(s)))
            .await
            .unwrap_or_else(|_| panic!("agent: {what} within {bound:?}; now {:?}", self.status()))
            .expect("agent running");
        start.elapsed()
    }

    fn status(&self) -> Status {
        self.agent.status()
    }

    /// Asserts that one request through the tunnel answers 200.
    async fn assert_ok(&self, when: &str) {
        let reply = curl(&["--max-time", "10", &self.url("/")]).await;
        assert_eq!(reply.code, 200, "{when}: {reply:?}");
    }

    /// Sends requests (each curl `--max-time 10`) until one answers 200 and returns how long
    /// that took; panics once `bound` is over without one.
    async fn first_200(&self, bound: Duration) -> Duration {
        let start = Instant::now();
        let mut failed = Vec::new();
        loop {
            let reply = curl(&["--max-time", "10", &self.url("/")]).await;
            let took = start.elapsed();
            assert!(
                took < bound,
                "no 200 within {bound:?} (last answer after {took:?}); earlier answers {failed:?}, \
                 last {reply:?}; agent {:?}",
                self.status(),
            );
            if reply.code == 200 {
                if !failed.is_empty() {
                    println!("  answers before the first 200: {failed:?}");
                }
                return took;
            }
            failed.push(reply.code);
            // Pace the retries a little: a refused connection returns at once.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Downloads `url` with curl into `file`; returns curl's output and how long it took.
fn spawn_download(
    url: String,
    file: std::path::PathBuf,
    max_time: &'static str,
) -> tokio::task::JoinHandle<(std::process::Output, Duration)> {
    tokio::spawn(async move {
        let start = Instant::now();
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", max_time, "-w", "%{http_code}", "-o"])
            .arg(&file)
            .arg(&url)
            .output()
            .await
            .expect("curl runs (install curl)");
        (out, start.elapsed())
    })
}

/// Asserts that curl got a 200 and that `file` holds exactly the `/bytes/{size}` body.
fn assert_download(out: &std::process::Output, file: &std::path::Path, size: u64) {
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && code == "200",
        "curl {:?}, code {code}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let body = std::fs::read(file).expect("downloaded file");
    assert_eq!(body.len() as u64, size, "downloaded size");
    if let Some(at) = (0..size).find(|&i| body[i as usize] != pattern(i)) {
        panic!("downloaded bytes differ from the service's from offset {at}");
    }
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64()
}

/// Records every `last_error` the agent reports, in order, until the agent stops.
fn record_errors(agent: &TestAgent) -> Arc<Mutex<Vec<String>>> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let mut status = agent.agent.status.clone();
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let error = status.borrow_and_update().last_error.clone();
            let mut seen = seen.lock().expect("lock");
            if let Some(error) = error
                && seen.last() != Some(&error)
            {
                seen.push(error);
            }
        }
    });
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_30s_then_heal() {
    let t = Tunnel::start(TestEdge::builder(), |_| {}).await;
    t.assert_ok("before the fault").await;
    let sessions = t.status().sessions;

    let hold = Duration::from_secs(30);
    let start = Instant::now();
    t.relay.set_blackhole(true);
    // Heartbeats every 5 s, a pong late by 3 s moves to a fresh socket, a second miss ends the
    // session: at most ~11 s. The QUIC idle timeout alone (20 s) would miss this bound.
    let noticed = t
        .within(Duration::from_secs(15), "notices the dead path", |s| {
            !s.connected
        })
        .await;
    tokio::time::sleep_until(start + hold).await;
    println!(
        "blackhole: the agent noticed after {noticed:?} ({:?})",
        t.status().last_error
    );
    assert!(
        !t.status().connected,
        "still blackholed, yet the agent says connected: {:?}",
        t.status()
    );

    t.relay.set_blackhole(false);
    let recovered = t.first_200(Duration::from_secs(10)).await;
    println!("blackhole: first 200 {recovered:?} after the path healed");
    let status = t.status();
    assert!(
        status.connected && status.sessions > sessions,
        "the agent reconnected: {status:?}"
    );
    println!("blackhole: sessions {} -> {}", sessions, status.sessions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_killed_and_restarted_on_the_same_address() {
    let quick_stop = "drain_grace = \"1s\"";
    let t = Tunnel::start(TestEdge::builder().toml(quick_stop), |_| {}).await;
    let Tunnel {
        edge,
        devbox,
        key,
        port,
        relay,
        agent,
    } = t;
    let url = edge.url(port, &key, "/");
    let reply = curl(&["--max-time", "10", &url]).await;
    assert_eq!(reply.code, 200, "before the restart: {reply:?}");
    let devbox_path = format!("/v1/devboxes/{}", devbox.id);
    let (code, before) = edge.admin("GET", &devbox_path, None).await;
    assert_eq!(code, 200, "{before}");
    assert_eq!(agent.status().sessions, 1);
    let errors = record_errors(&agent);

    // kill -9: nothing the old edge says on its way down reaches the agent.
    let http = edge.http();
    relay.set_blackhole(true);
    let stopping = Instant::now();
    let edge = edge
        .restart_with(TestEdge::builder().toml(quick_stop).http(http))
        .await;
    let restart = stopping.elapsed();
    relay.set_upstream(edge.agents_addr());
    let before_heal = agent.status();
    relay.set_blackhole(false);
    let healed = Instant::now();

    let t = Tunnel {
        edge,
        devbox,
        key,
        port,
        relay,
        agent,
    };
    let reconnected = t
        .within(WAIT, "reconnects to the new edge", |s| {
            s.connected && s.sessions >= 2
        })
        .await;
    let errors = errors.lock().expect("lock").clone();
    println!(
        "edge restart: stop + start {restart:?}; agent connected before the heal: {}; \
         reconnected {reconnected:?} after the heal; errors seen: {errors:?}",
        before_heal.connected
    );
    assert_eq!(before_heal.sessions, 1, "no session while blackholed");
    // The agent's next packet (a nudge, within a second) reaches an edge that does not know
    // the connection and answers a stateless reset; the agent redials at once. Without the
    // reset, two missed pongs (3 s each) after the next heartbeat end the session: 6 to 11 s;
    // without the nudges, the reset waits for that heartbeat (up to 5 s, or 8 s when a ping
    // went out into the blackhole).
    assert!(
        !errors
            .iter()
            .any(|e| e.contains("unanswered") || e.contains("timed out")),
        "the session should end by a stateless reset, not by liveness or idle timeout: \
         {errors:?} (reconnected {reconnected:?} after the heal)"
    );
    assert!(
        reconnected < Duration::from_secs(4),
        "a nudge meets the new edge's stateless reset within a second and the agent redials \
         at once; it took {reconnected:?}"
    );
    // The agent's token survived too: the new edge accepted the same agent.
    assert_eq!(t.status().sessions, 2, "one reconnect: {:?}", t.status());

    assert_eq!(t.edge.http(), http, "the same public address");
    let reply = curl(&["--max-time", "10", &url]).await;
    assert_eq!(reply.code, 200, "the same URL on the new edge: {reply:?}");
    println!(
        "edge restart: 200 on the same URL {:?} after the heal",
        healed.elapsed()
    );

    let (code, after) = t.edge.admin("GET", &devbox_path, None).await;
    assert_eq!(code, 200, "{after}");
    for field in ["id", "created_at", "tunnel"] {
        assert_eq!(after[field], before[field], "{field} survives the restart");
    }
    assert_eq!(after["tunnel"]["tunnel_key"], t.key.as_str());
    assert_eq!(after["agent"]["connected"], true, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_rebinding_during_a_transfer() {
    let t = Tunnel::start(TestEdge::builder(), |_| {}).await;
    t.assert_ok("before the transfer").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bulk");
    let base = t.relay.stats();

    let download = spawn_download(t.url(&format!("/bytes/{BULK}")), file.clone(), "120");
    // The body flows from the agent to the edge: up, in the relay's terms.
    let flowing = |s: &RelayStats| s.up_bytes > base.up_bytes + MIB;
    timeout(WAIT, t.relay.wait_stats(flowing))
        .await
        .unwrap_or_else(|_| panic!("1 MiB flows within {WAIT:?}: {:?}", t.relay.stats()));
    t.relay.rebind();
    let at_rebind = t.relay.stats();
    assert!(
        !download.is_finished(),
        "the transfer is still running at the rebind"
    );

    let (out, took) = timeout(Duration::from_secs(150), download)
        .await
        .expect("curl ends")
        .expect("download task");
    assert_download(&out, &file, BULK);
    let after = t.relay.stats();
    let moved = after.up_bytes - at_rebind.up_bytes;
    println!(
        "rebind: {} MiB took {took:?} ({:.1} MiB/s); rebound after {:.1} MiB, {:.1} MiB after",
        BULK / MIB,
        mib_per_s(BULK, took),
        (at_rebind.up_bytes - base.up_bytes) as f64 / MIB as f64,
        moved as f64 / MIB as f64,
    );
    assert!(
        moved > BULK / 2,
        "most of the transfer crossed the new mapping: {moved} bytes"
    );
    let status = t.status();
    assert!(
        status.connected && status.sessions == 1,
        "QUIC migration carried the connection, no reconnect: {status:?}"
    );
    t.assert_ok("after the transfer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_slow_path_still_delivers() {
    let t = Tunnel::start(TestEdge::builder(), |relay| {
        relay.set_loss(0.05);
        relay.set_delay(Duration::from_millis(100));
    })
    .await;
    t.assert_ok("on the lossy path").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bulk");

    let download = spawn_download(t.url(&format!("/bytes/{LOSSY_BULK}")), file.clone(), "180");
    let (out, took) = timeout(Duration::from_secs(200), download)
        .await
        .expect("curl ends")
        .expect("download task");
    let stats = t.relay.stats();
    println!(
        "lossy: {} MiB took {took:?} ({:.3} MiB/s); relay dropped {} of {} packets",
        LOSSY_BULK / MIB,
        mib_per_s(LOSSY_BULK, took),
        stats.dropped,
        stats.dropped + stats.up_packets + stats.down_packets,
    );
    assert_download(&out, &file, LOSSY_BULK);

    let sessions = t.status().sessions;
    let idle = Duration::from_secs(60);
    tokio::time::sleep(idle).await;
    let status = t.status();
    println!(
        "lossy: idle {idle:?}: sessions {sessions} -> {}, rtt {:?}, last error {:?}",
        status.sessions, status.rtt, status.last_error
    );
    assert!(
        status.connected && status.sessions == sessions,
        "no reconnect on a lossy but working path: {status:?}"
    );
    t.assert_ok("after idling on the lossy path").await;
}
