//! `bench`: burrow side by side with the origin itself (`direct`), nginx as a one-hop reverse
//! proxy, rathole (TCP and Noise transports), and bore, all on loopback, for the scenarios of
//! issue 6. `bench/run` installs the peers, builds, and runs this; see `bench/README.md`.
//!
//!     bench [--quick | --smoke] [--rounds N] [--only SYSTEMS] [--scenarios LIST]
//!
//! It prints a Markdown table per scenario on stdout (progress on stderr), and writes
//! `RESULTS/latest.json` (every sample, the medians, the machine and versions) and
//! `RESULTS/latency.svg`. Subcommands: `bench cluster` (the cluster's forwarding hop, a fleet of
//! agents, failover) and `bench grpc` (gRPC through burrow, nginx and directly).
//!
//! # Layout
//!
//! - `plan`: scenarios and the durations of each mode.
//! - `origin`: the service behind every system (`bench origin`, a process of its own).
//! - `systems`, `burrow`, `peers`: start and stop each system as real processes.
//! - `procs`: child processes and `/proc` (CPU-seconds, RSS).
//! - `load`, `ws`, `tools`: load generators (in-process; wrk, h2load, oha).
//! - `stats`: percentiles, medians.
//! - `scenarios`: one scenario against one system, as named metrics.
//! - `driver`: rounds, rotation, fresh systems per run.
//! - `results`, `report`, `chart`: JSON, Markdown, SVG.
//! - `cluster`, `fleet`, `failover`: `bench cluster`.
//! - `grpc`: `bench grpc`.

mod burrow;
mod chart;
mod cluster;
mod driver;
mod failover;
mod fleet;
mod grpc;
mod load;
mod origin;
mod peers;
mod plan;
mod procs;
mod report;
mod results;
mod scenarios;
mod stats;
mod systems;
mod tools;
mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::process::Command;
use tokio::time::Instant;

use crate::plan::{Plan, Scenario};
use crate::procs::Proc;
use crate::results::Results;
use crate::systems::{Env, System};
use crate::tools::Tools;

/// Benchmarks burrow against direct loopback, nginx, rathole and bore (issue 6).
#[derive(Debug, Parser)]
#[command(name = "bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Rounds of the short scenarios (bulk, rps, h2, churn, hol); default 3 (quick, smoke: 1)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// Only these systems, comma-separated: direct,nginx,rathole-tcp,rathole-noise,bore,burrow
    /// (direct is always added: it is what ratios are taken against)
    #[arg(long, value_name = "SYSTEMS", value_delimiter = ',')]
    only: Vec<String>,
    /// Only these scenarios, comma-separated: bulk,rps,h2,latency,churn,ws,hol,idle,cold
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Every scenario with short durations (about 3 minutes)
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// For CI: direct and burrow only, tiny durations, in-process load generators only
    /// (no wrk, h2load or oha needed)
    #[arg(long)]
    smoke: bool,
    /// Where burrow-edge and burrow-agent are; default: this program's directory
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Keep the scratch directory (configs and every process's log) and print its path
    #[arg(long)]
    keep: bool,
    /// Where latest.json and latency.svg go
    #[arg(long, value_name = "DIR", default_value = "bench/results")]
    results: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the origin service (the benchmark starts it itself)
    #[command(hide = true)]
    Origin {
        /// Address to listen on
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Run the gRPC echo service (`bench grpc` starts it itself)
    #[command(hide = true)]
    GrpcEcho {
        /// Address to listen on
        #[arg(long)]
        listen: SocketAddr,
    },
    /// gRPC through burrow, through nginx (`grpc_pass`) and directly: unary calls a second and
    /// their latency, streaming MB/s each way; writes RESULTS/grpc.json
    Grpc {
        /// One round, shorter runs, 256 MiB streams
        #[arg(long)]
        quick: bool,
        /// Rounds (default 3, quick: 1)
        #[arg(long, value_name = "N")]
        rounds: Option<usize>,
        /// Where grpc.json goes
        #[arg(long, value_name = "DIR", default_value = "bench/results")]
        results: PathBuf,
    },
    /// The cluster's forwarding hop: two edges on a throwaway PostgreSQL, the same requests
    /// through the edge that holds the agent and through the other
    Cluster {
        /// Requests a second of the fixed-rate run
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds of each run
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Keep-alive connections
        #[arg(long, default_value_t = 8)]
        conns: usize,
        /// Rounds (the two paths take turns; the median round is shown)
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Which parts to run: hop (the forwarding hop), fleet (idle agents and presence lag),
        /// failover (an edge killed under agents holding two edges)
        #[arg(long, value_delimiter = ',', default_value = "hop,fleet,failover")]
        parts: Vec<String>,
        /// Devboxes, each with a real agent process (failover)
        #[arg(long, default_value_t = 10)]
        failover_devboxes: usize,
        /// Simulated idle agents on one edge (fleet)
        #[arg(long, default_value_t = 10_000)]
        idle_agents: usize,
        /// Agent connects (and disconnects) a second while churning (fleet)
        #[arg(long, default_value_t = 1_000)]
        churn_rate: u32,
        /// Seconds of churn (fleet)
        #[arg(long, default_value_t = 10)]
        churn_seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let service = match cli.command {
        Some(Cmd::Origin { listen }) => Some(("origin", origin::run(listen))),
        Some(Cmd::GrpcEcho { listen }) => Some(("grpc-echo", grpc::echo_main(listen))),
        _ => None,
    };
    if let Some((name, result)) = service {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench {name}: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let run = async {
            match cli.command {
                Some(Cmd::Cluster {
                    rate,
                    seconds,
                    conns,
                    rounds,
                    parts,
                    idle_agents,
                    churn_rate,
                    churn_seconds,
                    failover_devboxes,
                }) => {
                    let hop = parts.iter().any(|p| p == "hop").then_some(cluster::Shape {
                        rate,
                        seconds,
                        conns,
                        rounds: rounds.max(1),
                    });
                    let fleet = parts.iter().any(|p| p == "fleet").then_some(fleet::Shape {
                        idle: idle_agents,
                        rate: churn_rate,
                        seconds: churn_seconds.max(1),
                    });
                    let failover = parts
                        .iter()
                        .any(|p| p == "failover")
                        .then_some(failover_devboxes.max(1));
                    cluster_bench(cli.bin_dir.clone(), hop, fleet, failover).await
                }
                Some(Cmd::Grpc {
                    quick,
                    rounds,
                    ref results,
                }) => {
                    let shape = grpc::Shape::new(quick, rounds);
                    grpc::run(cli.bin_dir.clone(), shape, results).await
                }
                _ => bench(cli).await,
            }
        };
        tokio::select! {
            r = run => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    });
    // Dropping the runtime drops every child process (killed on drop).
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts `bench origin` on a reserved loopback port.
async fn start_origin(exe: &Path, work: &Path) -> Result<(Proc, SocketAddr)> {
    let origin_port = systems::reserved_port()?;
    let origin_addr = SocketAddr::from(([127, 0, 0, 1], origin_port));
    let origin = Proc::spawn(
        "origin",
        "origin",
        Command::new(exe)
            .arg("origin")
            .arg("--listen")
            .arg(origin_addr.to_string()),
        work,
    )?;
    systems::accepting(origin_port, Duration::from_secs(10))
        .await
        .with_context(|| format!("the origin did not start: {}", origin.log_tail()))?;
    Ok((origin, origin_addr))
}

/// `bench cluster`.
async fn cluster_bench(
    bin_dir: Option<PathBuf>,
    hop: Option<cluster::Shape>,
    fleet: Option<fleet::Shape>,
    failover: Option<usize>,
) -> Result<()> {
    let exe = std::env::current_exe().context("this program's path")?;
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => exe.parent().context("this program's directory")?.to_owned(),
    };
    let work = tempfile::Builder::new()
        .prefix("burrow-bench-cluster-")
        .tempdir()?;
    let (origin, origin_addr) = start_origin(&exe, work.path()).await?;
    let result = async {
        if let Some(shape) = hop {
            cluster::run(&bin_dir, work.path(), origin_addr, shape).await?;
        }
        if let Some(shape) = fleet {
            fleet::run(&bin_dir, &work.path().join("fleet"), shape).await?;
        }
        if let Some(devboxes) = failover {
            let dir = work.path().join("failover");
            failover::run(&bin_dir, &dir, origin_addr, devboxes).await?;
        }
        Ok(())
    }
    .await;
    origin.stop().await;
    result
}

async fn bench(cli: Cli) -> Result<()> {
    let started = Instant::now();
    let mut plan = if cli.smoke {
        Plan::smoke()
    } else if cli.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(r) = cli.rounds {
        plan.rounds = r.max(1);
        plan.cold_rounds = plan.cold_rounds.max(plan.rounds);
    }
    let systems = choose_systems(&cli)?;
    let scenarios = choose_scenarios(&cli)?;
    let nofile = procs::raise_nofile();

    let exe = std::env::current_exe().context("this program's path")?;
    let bin_dir = match cli.bin_dir.clone() {
        Some(d) => d,
        None => exe.parent().context("this program's directory")?.to_owned(),
    };
    let mut work = tempfile::Builder::new().prefix("burrow-bench-").tempdir()?;
    work.disable_cleanup(cli.keep);
    let (origin, origin_addr) = start_origin(&exe, work.path()).await?;

    let env = Env::new(bin_dir, work.path().to_owned(), origin_addr);
    let mut tools = if plan.in_process {
        Tools::default()
    } else {
        Tools::find()
    };
    let mut results = Results::default();
    let mut run_systems = Vec::new();
    for system in systems {
        match env.missing(system) {
            Some(why) => {
                println!("skipping {}: {why}", system.name());
                results.skipped.push((system, why));
            }
            None => run_systems.push(system),
        }
    }
    if !plan.in_process {
        for (name, missing) in [
            ("wrk", tools.wrk.is_none()),
            ("oha", tools.oha.is_none()),
            ("h2load", tools.h2load.is_none()),
        ] {
            if missing {
                let line = format!(
                    "{name} not found: its scenarios use the in-process generator (h2: skipped)"
                );
                println!("{line}");
                results.notes.push(line);
            }
        }
    } else {
        tools = Tools::default();
    }
    eprintln!(
        "bench: {} run of {} on {}; open-file limit {nofile}; scratch {}",
        plan.mode,
        scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(","),
        run_systems
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(","),
        work.path().display()
    );

    driver::run(&plan, &run_systems, &scenarios, &env, &tools, &mut results).await;
    origin.stop().await;

    let elapsed = started.elapsed();
    let meta = meta(&plan, &env, &tools, elapsed);
    let markdown = report::markdown(&results, &plan);
    println!("{}", header(&meta));
    println!("{markdown}");
    write_results(&cli.results, &results, meta, &plan)?;
    eprintln!(
        "bench: done in {:.0} s; results in {}",
        elapsed.as_secs_f64(),
        cli.results.display()
    );
    Ok(())
}

fn choose_systems(cli: &Cli) -> Result<Vec<System>> {
    if cli.only.is_empty() {
        return Ok(if cli.smoke {
            vec![System::Direct, System::Burrow]
        } else {
            System::ALL.to_vec()
        });
    }
    let mut out = vec![System::Direct];
    for name in &cli.only {
        let Some(s) = System::parse(name.trim()) else {
            bail!(
                "--only: unknown system `{name}` (direct, nginx, rathole-tcp, rathole-noise, bore, burrow)"
            );
        };
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.sort();
    Ok(out)
}

fn choose_scenarios(cli: &Cli) -> Result<Vec<Scenario>> {
    if cli.scenarios.is_empty() {
        return Ok(Scenario::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in &cli.scenarios {
        let Some(s) = Scenario::parse(name.trim()) else {
            bail!(
                "--scenarios: unknown scenario `{name}` (bulk, rps, h2, latency, churn, ws, hol, idle, cold)"
            );
        };
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.sort();
    Ok(out)
}

/// The machine, the versions, the command.
fn meta(plan: &Plan, env: &Env, tools: &Tools, elapsed: Duration) -> serde_json::Value {
    let mut versions: Vec<(String, String)> = tools.versions();
    versions.extend(env.versions());
    if let Ok(o) = std::process::Command::new(env.bin_dir.join("burrow-edge"))
        .arg("--version")
        .output()
    {
        versions.push((
            "burrow".into(),
            String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        ));
    }
    let versions: serde_json::Map<String, serde_json::Value> =
        versions.into_iter().map(|(k, v)| (k, json!(v))).collect();
    json!({
        "date": utc_now(),
        "mode": plan.mode,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "versions": versions,
        "elapsed_s": elapsed.as_secs_f64().round(),
    })
}

/// This machine: cores, memory, CPU model, kernel.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    json!({
        "cores": cores,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0).round(),
        "cpu": cpu,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

fn header(meta: &serde_json::Value) -> String {
    let m = &meta["machine"];
    let versions = meta["versions"]
        .as_object()
        .map(|v| {
            v.iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    format!(
        "## burrow bench ({} run)\n\n{} · {} cores, {} GiB, {} · Linux {} · {:.0} s\n\n`{}`\n\n{versions}\n\n\
         Medians over the rounds. \"public + devbox\": CPU of the public side (edge, nginx, rathole or bore server) \
         and of the devbox side (agent, rathole or bore client), from /proc; the load generator and the origin are not counted.",
        meta["mode"].as_str().unwrap_or(""),
        meta["date"].as_str().unwrap_or(""),
        m["cores"],
        m["memory_gib"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        meta["elapsed_s"].as_f64().unwrap_or(0.0),
        meta["command"].as_str().unwrap_or(""),
    )
}

fn write_results(
    dir: &Path,
    results: &Results,
    meta: serde_json::Value,
    plan: &Plan,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let json = results.to_json(meta);
    let path = dir.join("latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| path.display().to_string())?;
    let (table, what) = if results.tables().iter().any(|t| t == "latency") {
        (
            "latency",
            format!("Latency at a fixed {} req/s (median of rounds)", plan.rate),
        )
    } else {
        (
            "rps",
            "Latency under closed-loop load (median of rounds)".to_owned(),
        )
    };
    if let Some(svg) = chart::latency_svg(results, table, &what) {
        let path = dir.join("latency.svg");
        std::fs::write(&path, svg).with_context(|| path.display().to_string())?;
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM UTC`, from the system clock (days to civil date: Howard Hinnant's
/// algorithm).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
