//! `bench grpc`: what burrow costs a gRPC client, against the service itself (`direct`) and
//! nginx as one `grpc_pass` hop. The service is the test kit's tonic echo service
//! ([`burrow_tests::grpc::serve`]) in a process of its own; the client is the kit's tonic
//! client, h2c with prior knowledge, `:authority` the tunnel's host for burrow.
//!
//! For each round and each system (the order rotating from round to round), fresh processes,
//! then: unary calls back to back with 64 in flight on one HTTP/2 connection, on 4
//! connections of 16, and one at a time (calls a second, latency, CPU of the proxy); unary
//! calls at a fixed rate
//! (latency from when each was due); one server-streaming download and one client-streaming
//! upload of the same size, in 1 MiB and in 64 KiB messages (MB/s, CPU of the proxy).
//!
//! # Layout
//!
//! - `start`: the echo service's process and each system in front of it.
//! - `calls`: the load generators (unary closed loop and fixed rate, the two streams).
//! - `report`: medians, the Markdown tables, `grpc.json`.

mod calls;
mod report;
mod start;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;

pub use start::echo_main;

use crate::procs::Proc;
use crate::results::{Results, Sample};
use crate::scenarios::Metrics;
use crate::stats::Summary;
use crate::systems::{Running, System};

/// The systems, in table order.
const SYSTEMS: [System; 3] = [System::Direct, System::Nginx, System::Burrow];

/// The unary calls' message: about a small API request.
const UNARY_BYTES: usize = 100;

/// The streaming calls' message sizes, with their names in metrics.
const MESSAGE_SIZES: [(u32, &str); 2] = [(1 << 20, "1mib"), (64 << 10, "64kib")];

/// How a run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// `full` or `quick`.
    pub mode: &'static str,
    /// Rounds; every figure is the median over them.
    pub rounds: usize,
    /// Closed-loop calls before measuring, not counted (connections, allocator, pools).
    pub warm: Duration,
    /// Each closed-loop run.
    pub run: Duration,
    /// Calls a second of the fixed-rate run.
    pub rate: u32,
    /// The fixed-rate run.
    pub fixed: Duration,
    /// Bytes of each download and upload.
    pub bytes: u64,
}

impl Shape {
    /// The full run, or `--quick`, with `rounds` instead of its own if given.
    pub fn new(quick: bool, rounds: Option<usize>) -> Shape {
        let shape = if quick { Shape::quick() } else { Shape::full() };
        Shape {
            rounds: rounds.unwrap_or(shape.rounds).max(1),
            ..shape
        }
    }

    /// The full run: 3 rounds, 5 s closed loops, 10 s at 1,000 calls/s, 1 GiB streams.
    pub fn full() -> Shape {
        Shape {
            mode: "full",
            rounds: 3,
            warm: Duration::from_secs(1),
            run: Duration::from_secs(5),
            rate: 1000,
            fixed: Duration::from_secs(10),
            bytes: 1 << 30,
        }
    }

    /// `--quick`: 1 round, 3 s closed loops, 5 s at 1,000 calls/s, 256 MiB streams.
    pub fn quick() -> Shape {
        Shape {
            mode: "quick",
            rounds: 1,
            run: Duration::from_secs(3),
            fixed: Duration::from_secs(5),
            bytes: 256 << 20,
            ..Shape::full()
        }
    }
}

/// Runs `bench grpc`: prints the tables and writes `{results}/grpc.json`.
pub async fn run(bin_dir: Option<PathBuf>, shape: Shape, results_dir: &Path) -> Result<()> {
    let started = tokio::time::Instant::now();
    let exe = std::env::current_exe().context("this program's path")?;
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => exe.parent().context("this program's directory")?.to_owned(),
    };
    let nginx = crate::procs::which("nginx");
    let bins = start::Bins {
        burrow: &bin_dir,
        nginx: nginx.as_deref(),
    };
    let work = tempfile::Builder::new()
        .prefix("burrow-bench-grpc-")
        .tempdir()?;
    let mut results = Results::default();
    let mut systems = SYSTEMS.to_vec();
    if nginx.is_none() {
        let why = "nginx not found".to_owned();
        println!("skipping nginx: {why}");
        results.skipped.push((System::Nginx, why));
        systems.retain(|s| *s != System::Nginx);
    }
    for round in 0..shape.rounds {
        let mut order = systems.clone();
        let len = order.len();
        order.rotate_left(round % len);
        for system in order {
            eprintln!(
                "bench grpc: round {} of {}, {}",
                round + 1,
                shape.rounds,
                system.name()
            );
            let dir = work.path().join(format!("{}-{round}", system.name()));
            std::fs::create_dir_all(&dir)?;
            let mut metrics = Metrics::new();
            let error = one(&exe, &bins, &dir, system, shape, &mut metrics)
                .await
                .err()
                .map(|e| format!("{e:#}"));
            if let Some(e) = &error {
                eprintln!("bench grpc: {}: {e}", system.name());
            }
            results.samples.push(Sample {
                table: "grpc".into(),
                system,
                round,
                metrics,
                error,
            });
        }
    }
    report::print(&results, shape);
    report::write(&results, shape, &bins, started.elapsed(), results_dir)
}

/// One system for one round: a fresh echo service and system, every measurement.
async fn one(
    exe: &Path,
    bins: &start::Bins<'_>,
    dir: &Path,
    system: System,
    shape: Shape,
    metrics: &mut Metrics,
) -> Result<()> {
    let (echo, echo_addr): (Proc, SocketAddr) = start::echo(exe, dir).await?;
    let result = match start::system(system, bins, dir, echo_addr).await {
        Ok(mut running) => {
            let measured = measure(&mut running, shape, metrics).await;
            running.stop().await;
            measured
        }
        Err(e) => Err(e),
    };
    echo.stop().await;
    result
}

/// Every measurement of one round against a started system, into `metrics`.
async fn measure(running: &mut Running, shape: Shape, metrics: &mut Metrics) -> Result<()> {
    let target = running.target.clone();
    let message = Bytes::from(vec![0x42u8; UNARY_BYTES]);
    calls::closed_loop(&target, 1, 64, &message, shape.warm).await?;
    for (conns, in_flight) in [(1, 64), (4, 16), (1, 1)] {
        let before = cpu(running);
        let stats = calls::closed_loop(&target, conns, in_flight, &message, shape.run).await?;
        let summary = stats.summary();
        let prefix = format!("unary_{conns}x{in_flight}_");
        per_call_cpu(&summary, before, cpu(running), &prefix, metrics);
        metrics.extend(summary.metrics(&prefix));
        running.check()?;
    }
    let stats = calls::fixed_rate(&target, shape.rate, &message, shape.fixed).await?;
    metrics.extend(stats.summary().metrics("fixed_"));
    running.check()?;
    for (size, name) in MESSAGE_SIZES {
        let before = cpu(running);
        let took = calls::download(&target, shape.bytes, size).await?;
        transfer(
            &format!("down_{name}_"),
            shape.bytes,
            took,
            before,
            cpu(running),
            metrics,
        );
        let before = cpu(running);
        let took = calls::upload(&target, shape.bytes, size).await?;
        transfer(
            &format!("up_{name}_"),
            shape.bytes,
            took,
            before,
            cpu(running),
            metrics,
        );
        running.check()?;
    }
    Ok(())
}

/// CPU-seconds so far of the system's public side and devbox side.
fn cpu(running: &Running) -> (f64, f64) {
    let usage = running.usage();
    (usage.server_cpu, usage.client_cpu)
}

/// CPU-milliseconds per 1,000 calls of each side over a closed-loop run.
fn per_call_cpu(
    summary: &Summary,
    before: (f64, f64),
    after: (f64, f64),
    prefix: &str,
    metrics: &mut Metrics,
) {
    let calls = summary.requests.max(1) as f64;
    for (side, b, a) in [("public", before.0, after.0), ("devbox", before.1, after.1)] {
        metrics.push((
            format!("{prefix}cpu_{side}_ms_per_1k"),
            (a - b) * 1e6 / calls,
        ));
    }
}

/// MB/s (10^6 bytes) and CPU-seconds per GiB of each side of one transfer.
fn transfer(
    prefix: &str,
    bytes: u64,
    took: Duration,
    before: (f64, f64),
    after: (f64, f64),
    metrics: &mut Metrics,
) {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    metrics.push((
        format!("{prefix}mbps"),
        bytes as f64 / took.as_secs_f64() / 1e6,
    ));
    for (side, b, a) in [("public", before.0, after.0), ("devbox", before.1, after.1)] {
        metrics.push((format!("{prefix}cpu_{side}_s_per_gib"), (a - b) / gib));
    }
}
