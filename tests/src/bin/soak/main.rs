//! The soak: HTTP requests, WebSockets, SSE streams and raw TCP connections kept running
//! through one tunnel while faults are injected at random, and every operation accounted for.
//!
//!     cargo run --release -p burrow-tests --bin soak -- --minutes 30
//!
//! The edge and the agent are the workspace's binaries (built for the soak's own profile), run
//! as processes on reserved loopback ports with a UDP relay between them. First come memory
//! rounds: the same flat-out load, repeated, each followed by a settle, with both processes'
//! RSS and descriptors sampled; then the fault phase: a steady paced load while faults of
//! every kind (see `faults.rs`) come in shuffled rounds; then a last settle.
//!
//! It fails (exit 1) when an operation failed outside every fault window, or inside one that
//! should have spared it (an agent restart or a blip must cost no request started during it);
//! when descriptors do not return to their baseline; when, after the first half of the memory
//! rounds (the warm-up), a round raises a process's RSS by more than 5 % (at least 1 MiB) over
//! the warm-up's last; or, for release builds, when the idle agent stays at 10 MiB or more.

#![forbid(unsafe_code)]

mod faults;
mod load;
mod report;
mod world;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use faults::Fault;
use load::{Ledger, Mix};
use world::{Sample, World};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Soak burrow under load and random faults; account for every operation")]
struct Args {
    /// Minutes of the fault phase.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Stop the fault phase after this many shuffled rounds of every fault instead.
    #[arg(long)]
    cycles: Option<usize>,
    /// Seconds between faults (each gap is this plus up to as much again, at random).
    #[arg(long, default_value_t = 10.0)]
    gap: f64,
    /// Memory rounds.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Seconds of load in each memory round.
    #[arg(long, default_value_t = 10.0)]
    load: f64,
    /// The memory rounds' clients per kind: new-connection HTTP, kept-alive HTTP, WebSocket,
    /// SSE, raw TCP (to find which kind a memory change comes with).
    #[arg(long, value_delimiter = ',', default_values_t = HEAVY.clients)]
    mix: Vec<usize>,
}

/// The memory rounds' clients: flat out, kept-alive requests the most.
const HEAVY: Mix = Mix {
    clients: [8, 16, 4, 2, 2],
    paced: false,
};
/// The fault phase's clients: a steady paced load of every kind.
const STEADY: Mix = Mix {
    clients: [4, 4, 2, 2, 1],
    paced: true,
};
/// An idle agent is meant to stay under this, in KiB.
const AGENT_IDLE_MAX_KIB: u64 = 10 * 1024;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match soak(&args).await {
        Ok(problems) if problems.is_empty() => {
            println!("\nsoak passed");
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            println!("\nsoak FAILED:");
            for p in problems {
                println!("- {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("\nsoak could not run: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every phase; the problems found.
async fn soak(args: &Args) -> anyhow::Result<Vec<String>> {
    let mut world = World::start()
        .await
        .context("starting the edge and agent")?;
    let t0 = Instant::now();
    println!("logs in {}", world.log_dir().display());
    let ledger = Arc::new(Ledger::default());
    let baseline = settle(&world).await?;
    if args.mix.len() != HEAVY.clients.len() {
        bail!("--mix takes 5 numbers, e.g. 8,16,4,2,2");
    }
    let mut heavy = HEAVY;
    for (n, &given) in heavy.clients.iter_mut().zip(&args.mix) {
        *n = given;
    }
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        load_for(&world, &ledger, heavy, Duration::from_secs_f64(args.load)).await;
        rounds.push(settle(&world).await?);
        println!("memory round {round} done");
    }

    let stop = CancellationToken::new();
    let load = tokio::spawn(load::run(
        world.tunnel.clone(),
        ledger.clone(),
        STEADY,
        stop.clone(),
    ));
    let deadline = stop.clone();
    let minutes = Duration::from_secs_f64(args.minutes * 60.0);
    if args.cycles.is_none() {
        tokio::spawn(async move {
            tokio::time::sleep(minutes).await;
            deadline.cancel();
        });
    }
    let gap = Duration::from_secs_f64(args.gap);
    let fault_start = Instant::now();
    let injected = faults::inject(&mut world, &Fault::ALL, gap, args.cycles, &stop, t0).await;
    // The last fault's window gets its grace before the load stops.
    tokio::time::sleep(faults::GRACE).await;
    stop.cancel();
    load.await.context("the load")?;
    let windows = injected?;
    let phase = fault_start.elapsed();
    let end = settle_to(&world, &baseline).await?;

    let ops = ledger.ops();
    let accounts = report::account(&ops, &windows);
    println!(
        "\n## burrow soak: {} memory rounds, then {:.1} min with {} faults; {} operations\n",
        rounds.len(),
        phase.as_secs_f64() / 60.0,
        windows.len(),
        ops.len()
    );
    report::print(&accounts, &windows, t0);
    print_memory(&baseline, &rounds, &end);

    let mut problems = Vec::new();
    if !accounts.violations.is_empty() {
        problems.push(format!(
            "{} operations failed outside what the faults allow",
            accounts.violations.len()
        ));
    }
    problems.extend(check_memory(&baseline, &rounds, &end));
    Ok(problems)
}

/// Runs the load `mix` for `time`.
async fn load_for(world: &World, ledger: &Arc<Ledger>, mix: Mix, time: Duration) {
    let stop = CancellationToken::new();
    let run = tokio::spawn(load::run(
        world.tunnel.clone(),
        ledger.clone(),
        mix,
        stop.clone(),
    ));
    tokio::time::sleep(time).await;
    stop.cancel();
    let _ = run.await;
}

/// Waits until the edge's pool has let go of its idle streams and both processes' RSS and
/// descriptors hold still (two samples 500 ms apart with the same descriptors and RSS within
/// 64 KiB); that sample.
async fn settle(world: &World) -> anyhow::Result<Sample> {
    let start = Instant::now();
    while world.pool_idle().await? > 0.0 {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the edge's pool still holds idle streams after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut last = world.sample()?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = world.sample()?;
        let still = |a: world::Usage, b: world::Usage| {
            a.fds == b.fds && a.rss_kib.abs_diff(b.rss_kib) <= 64
        };
        if still(last.edge, now.edge) && still(last.agent, now.agent) {
            return Ok(now);
        }
        if start.elapsed() > Duration::from_secs(90) {
            return Ok(now);
        }
        last = now;
    }
}

/// [`settle`], then waits (up to 60 s) for both processes' descriptors to come back to the
/// baseline; the last sample.
async fn settle_to(world: &World, baseline: &Sample) -> anyhow::Result<Sample> {
    let start = Instant::now();
    loop {
        let now = settle(world).await?;
        let back = now.edge.fds <= baseline.edge.fds && now.agent.fds <= baseline.agent.fds;
        if back || start.elapsed() > Duration::from_secs(60) {
            return Ok(now);
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_memory(baseline: &Sample, rounds: &[Sample], end: &Sample) {
    println!("\n| idle, after | edge RSS | edge fds | agent RSS | agent fds |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let row = |name: &str, s: &Sample| {
        println!(
            "| {name} | {} | {} | {} | {} |",
            mib(s.edge.rss_kib),
            s.edge.fds,
            mib(s.agent.rss_kib),
            s.agent.fds
        );
    };
    row("start (baseline)", baseline);
    for (i, s) in rounds.iter().enumerate() {
        row(&format!("memory round {}", i + 1), s);
    }
    row("the fault phase (processes restarted by it)", end);
}

/// What the memory samples show wrong.
fn check_memory(baseline: &Sample, rounds: &[Sample], end: &Sample) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, now, base) in [
        ("edge", end.edge.fds, baseline.edge.fds),
        ("agent", end.agent.fds, baseline.agent.fds),
    ] {
        if now > base {
            problems.push(format!(
                "the {name} holds {now} descriptors after the load, {base} before"
            ));
        }
    }
    // The first half of the rounds warm up (pools, caches, the allocator's arenas); from then
    // on the same round must not raise either process's RSS.
    let warm = rounds.len().div_ceil(2);
    if let Some(after_warm_up) = rounds.get(warm.saturating_sub(1)) {
        for (i, s) in rounds.iter().enumerate().skip(warm) {
            for (name, now, was) in [
                ("edge", s.edge.rss_kib, after_warm_up.edge.rss_kib),
                ("agent", s.agent.rss_kib, after_warm_up.agent.rss_kib),
            ] {
                if now > was + (was / 20).max(1024) {
                    problems.push(format!(
                        "the {name}'s RSS grew to {} after memory round {}, from {} after round {warm}",
                        mib(now),
                        i + 1,
                        mib(was)
                    ));
                }
            }
        }
    }
    let idle = rounds
        .last()
        .map_or(baseline.agent.rss_kib, |s| s.agent.rss_kib);
    if !cfg!(debug_assertions) && idle >= AGENT_IDLE_MAX_KIB {
        problems.push(format!(
            "the idle agent holds {} after the memory rounds (meant to stay under {})",
            mib(idle),
            mib(AGENT_IDLE_MAX_KIB)
        ));
    }
    problems
}
