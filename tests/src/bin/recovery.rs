//! The `recovery` benchmark: how fast a tunnel comes back, measured over many rounds of each
//! fault, with an edge and an agent over loopback and a UDP relay between them.
//!
//!     cargo run --release -p burrow-tests --bin recovery -- [ROUNDS]
//!
//! Per scenario it prints the time the agent took to notice (detect), the time from the end of
//! the fault to the first successful request (p50, p95, max), and the requests that failed.
//! The agent runs with its default settings, as a user gets it.

use std::sync::Arc;
use std::time::Duration;

use burrow_tests::relay::Relay;
use burrow_tests::services::http_service;
use burrow_tests::{DOMAIN, Devbox, TestAgent, TestClocks, TestEdge, request};
use tokio::time::Instant;

/// One scenario's samples.
#[derive(Debug, Default)]
struct Samples {
    detect: Vec<Duration>,
    recover: Vec<Duration>,
    failed: u64,
    sent: u64,
}

struct Setup {
    edge: TestEdge,
    devbox: Devbox,
    key: String,
    relay: Relay,
    agent: TestAgent,
    clocks: Arc<TestClocks>,
    port: u16,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut setup = setup().await;
    let mut table = Vec::new();

    let mut s = Samples::default();
    for _ in 0..rounds {
        blackhole(&mut setup, Duration::from_secs(10), &mut s).await;
    }
    table.push(("path blackholed 10 s, then healed", s));

    let mut s = Samples::default();
    for _ in 0..rounds {
        blackhole(&mut setup, Duration::from_secs(2), &mut s).await;
    }
    table.push(("path blackholed 2 s (a blip), then healed", s));

    let mut s = Samples::default();
    for _ in 0..rounds {
        resume(&mut setup, &mut s).await;
    }
    table.push(("resume: clocks jump 60 s and the NAT mapping changes", s));

    let mut s = Samples::default();
    for _ in 0..rounds {
        setup = edge_killed(setup, &mut s).await;
    }
    table.push(("edge killed and restarted on the same address", s));

    // Idle background traffic of a connected agent.
    let idle = Duration::from_secs(60);
    setup.relay.reset_stats();
    let sessions = setup.agent.status().sessions;
    tokio::time::sleep(idle).await;
    let stats = setup.relay.stats();

    println!("\n## burrow recovery ({rounds} rounds each, defaults, loopback via a UDP relay)\n");
    println!(
        "| scenario | detect p50 | first request after the fault: p50 | p95 | max | failed requests |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, s) in &table {
        println!(
            "| {name} | {} | {} | {} | {} | {} of {} |",
            ms(percentile(&s.detect, 0.5)),
            ms(percentile(&s.recover, 0.5)),
            ms(percentile(&s.recover, 0.95)),
            ms(percentile(&s.recover, 1.0)),
            s.failed,
            s.sent
        );
    }
    println!(
        "\nIdle agent over {} s: agent to edge {} packets / {} bytes, edge to agent {} packets / {} bytes; reconnects during it: {}.",
        idle.as_secs(),
        stats.up_packets,
        stats.up_bytes,
        stats.down_packets,
        stats.down_bytes,
        setup.agent.status().sessions - sessions,
    );
}

async fn setup() -> Setup {
    let edge = TestEdge::builder()
        .toml("drain_grace = \"1s\"")
        .start()
        .await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let relay = Relay::start(edge.agents_addr()).await;
    let clocks = Arc::new(TestClocks::default());
    let via = relay.addr().to_string();
    // `BURROW_RECOVERY_NUDGE_INTERVAL=1h` compares a run without the agent's nudges.
    let nudge = std::env::var("BURROW_RECOVERY_NUDGE_INTERVAL").unwrap_or_else(|_| "1s".into());
    let flags = [("edge", via.as_str()), ("liveness.nudge_interval", &nudge)];
    let agent = TestAgent::spawn_full(&edge, &devbox, &flags, &[], Some(clocks.clone()));
    agent.wait_for("connected", |s| s.connected).await;
    let service = http_service("127.0.0.1:0").await;
    Setup {
        edge,
        devbox,
        key,
        relay,
        agent,
        clocks,
        port: service.addr.port(),
    }
}

/// One request through the tunnel; `true` on 200.
async fn get(setup: &Setup) -> bool {
    let host = format!("{}-{}.{DOMAIN}", setup.port, setup.key);
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        request(setup.edge.http(), "GET", &host, "/", &[], vec![]),
    )
    .await;
    matches!(r, Ok(Ok(reply)) if reply.status == 200)
}

/// Requests until one succeeds; the time it took.
async fn first_success(setup: &Setup, s: &mut Samples) -> Duration {
    let start = Instant::now();
    loop {
        s.sent += 1;
        if get(setup).await {
            return start.elapsed();
        }
        s.failed += 1;
        if start.elapsed() > Duration::from_secs(60) {
            return start.elapsed();
        }
    }
}

async fn blackhole(setup: &mut Setup, hold: Duration, s: &mut Samples) {
    // Rounds would otherwise keep one phase against the agent's 5 s heartbeat (a round that
    // keeps its connection lasts about the hold): a random wait gives each its own, since
    // whether an outage outlasts "heartbeat + two 3 s timeouts" depends on it.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..5000))).await;
    assert!(get(setup).await, "tunnel up before the fault");
    let start = Instant::now();
    setup.relay.set_blackhole(true);
    // A user keeps using the tunnel during a short blip: requests wait at the edge.
    let mut status = setup.agent.agent.status.clone();
    // `wait_for` answers with a read guard on the status; holding it would block the agent's
    // next status update, so only whether it fired is kept.
    let noticed = tokio::time::timeout(hold, status.wait_for(|st| !st.connected))
        .await
        .is_ok();
    if noticed {
        s.detect.push(start.elapsed());
    }
    tokio::time::sleep_until(start + hold).await;
    setup.relay.set_blackhole(false);
    let recovered = first_success(setup, s).await;
    s.recover.push(recovered);
    setup.agent.wait_for("connected", |st| st.connected).await;
}

async fn resume(setup: &mut Setup, s: &mut Samples) {
    assert!(get(setup).await, "tunnel up before the fault");
    let resumes = setup.agent.status().resumes;
    let start = Instant::now();
    setup.clocks.suspend(Duration::from_secs(60));
    setup.relay.rebind();
    setup
        .agent
        .wait_for("resume detected", |st| st.resumes > resumes)
        .await;
    s.detect.push(start.elapsed());
    let recovered = first_success(setup, s).await;
    s.recover.push(recovered);
}

async fn edge_killed(setup: Setup, s: &mut Samples) -> Setup {
    let Setup {
        edge,
        devbox,
        key,
        relay,
        agent,
        clocks,
        port,
    } = setup;
    let http = edge.http();
    relay.set_blackhole(true);
    let sessions = agent.status().sessions;
    let edge = edge
        .restart_with(TestEdge::builder().http(http).toml("drain_grace = \"1s\""))
        .await;
    relay.set_upstream(edge.agents_addr());
    let start = Instant::now();
    relay.set_blackhole(false);
    let setup = Setup {
        edge,
        devbox,
        key,
        relay,
        agent,
        clocks,
        port,
    };
    setup
        .agent
        .wait_for("reconnected", |st| st.sessions > sessions && st.connected)
        .await;
    s.detect.push(start.elapsed());
    let recovered = start.elapsed() + first_success(&setup, s).await;
    s.recover.push(recovered);
    setup
}

fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), |d| format!("{} ms", d.as_millis()))
}
