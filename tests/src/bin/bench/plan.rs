//! What a run measures and for how long: the scenarios of issue 6 and the durations of each
//! mode (full, `--quick`, `--smoke`).

use std::time::Duration;

/// A scenario (a table of the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// 1: a 1 GiB download and upload over one connection.
    Bulk,
    /// 2: closed-loop requests, 64 keep-alive HTTP/1.1 connections (wrk).
    Rps,
    /// 2: the same over HTTP/2 (h2load; burrow and direct only).
    H2,
    /// 3: a fixed 1,000 req/s (oha): percentiles against direct.
    Latency,
    /// 4: a new connection per request (wrk with `Connection: close`).
    Churn,
    /// 5: many open WebSockets: memory per connection, echo latency.
    Ws,
    /// 6: small-request p99 while a bulk download runs through the same tunnel.
    Hol,
    /// 7: an idle, connected tunnel: RSS and CPU over a minute.
    Idle,
    /// 7: process start to the first proxied 200.
    Cold,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 9] = [
        Scenario::Bulk,
        Scenario::Rps,
        Scenario::H2,
        Scenario::Latency,
        Scenario::Churn,
        Scenario::Ws,
        Scenario::Hol,
        Scenario::Idle,
        Scenario::Cold,
    ];

    /// Its name in `--scenarios` and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Bulk => "bulk",
            Scenario::Rps => "rps",
            Scenario::H2 => "h2",
            Scenario::Latency => "latency",
            Scenario::Churn => "churn",
            Scenario::Ws => "ws",
            Scenario::Hol => "hol",
            Scenario::Idle => "idle",
            Scenario::Cold => "cold",
        }
    }

    /// The scenario named `name`.
    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// How much of everything a run does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `full`, `quick` or `smoke`.
    pub mode: &'static str,
    /// Rounds of the short scenarios (bulk, rps, h2, churn, hol).
    pub rounds: usize,
    /// Rounds of the cold start.
    pub cold_rounds: usize,
    /// Bytes of each bulk transfer.
    pub bulk_bytes: u64,
    /// Length of a requests-per-second run (wrk, h2load) and of a churn run.
    pub rps_time: Duration,
    /// Keep-alive connections of the requests-per-second runs.
    pub rps_conns: usize,
    /// The fixed rate of scenario 3, and for how long.
    pub rate: u32,
    /// How long the fixed rate runs.
    pub rate_time: Duration,
    /// How many WebSockets, one table each.
    pub ws_counts: Vec<usize>,
    /// The window over which every WebSocket sends its one echo.
    pub ws_window: Duration,
    /// Time to open all the WebSockets before giving up on the rest.
    pub ws_deadline: Duration,
    /// Small requests a second during head-of-line, and for how long each phase.
    pub hol_rate: u32,
    /// Length of each head-of-line phase.
    pub hol_time: Duration,
    /// How long an idle tunnel is watched.
    pub idle_time: Duration,
    /// Only in-process load generators (no wrk, h2load, oha).
    pub in_process: bool,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

impl Plan {
    /// The full run: the whole of issue 6, in under 15 minutes on 2 cores.
    pub fn full() -> Plan {
        Plan {
            mode: "full",
            rounds: 3,
            cold_rounds: 5,
            bulk_bytes: GIB,
            rps_time: Duration::from_secs(5),
            rps_conns: 64,
            rate: 1000,
            rate_time: Duration::from_secs(30),
            ws_counts: vec![1000, 10_000],
            ws_window: Duration::from_secs(3),
            ws_deadline: Duration::from_secs(40),
            hol_rate: 200,
            hol_time: Duration::from_secs(3),
            idle_time: Duration::from_secs(60),
            in_process: false,
        }
    }

    /// `--quick`: every scenario, short.
    pub fn quick() -> Plan {
        Plan {
            mode: "quick",
            rounds: 1,
            cold_rounds: 3,
            bulk_bytes: 256 * MIB,
            rps_time: Duration::from_secs(3),
            rate_time: Duration::from_secs(5),
            ws_counts: vec![1000],
            ws_window: Duration::from_secs(2),
            ws_deadline: Duration::from_secs(30),
            hol_time: Duration::from_secs(2),
            idle_time: Duration::from_secs(10),
            ..Plan::full()
        }
    }

    /// `--smoke`: a check that the harness works (CI), in-process generators only.
    pub fn smoke() -> Plan {
        Plan {
            mode: "smoke",
            rounds: 1,
            cold_rounds: 1,
            bulk_bytes: 16 * MIB,
            rps_time: Duration::from_secs(1),
            rps_conns: 8,
            rate: 200,
            rate_time: Duration::from_secs(1),
            ws_counts: vec![50],
            ws_window: Duration::from_millis(500),
            ws_deadline: Duration::from_secs(10),
            hol_rate: 100,
            hol_time: Duration::from_secs(1),
            idle_time: Duration::from_secs(1),
            in_process: true,
        }
    }
}
