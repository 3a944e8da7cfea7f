//! `bench cluster`: what the cluster's forwarding hop costs. A throwaway PostgreSQL, two release
//! edges on it (`one`, `two`) and one agent connected to `two`; the same `GET /` goes to `two`
//! (the edge that holds the agent) and to `one` (which forwards it to `two` over the mesh), at
//! a fixed rate (latency from when each request was due) and then closed-loop (requests a
//! second). The difference between the two rows is the hop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use burrow_tests::postgres::Postgres;
use tokio::process::Command;
use tokio::time::Instant;

use crate::burrow::{edge_toml, register};
use crate::load::{Target, closed_loop, first_200, fixed_rate};
use crate::procs::Proc;
use crate::stats::Summary;
use crate::systems::{DOMAIN, accepting, quiet, reserved_port};

/// How the run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Requests a second of the fixed-rate run.
    pub rate: u32,
    /// Seconds of each run.
    pub seconds: u64,
    /// Keep-alive connections.
    pub conns: usize,
    /// Rounds; the two paths take turns.
    pub rounds: usize,
}

/// One edge of the benchmark's cluster.
pub struct Edge {
    pub proc: Proc,
    pub http: u16,
    pub agents: u16,
    pub admin: u16,
    pub metrics: u16,
    pub state: std::path::PathBuf,
}

/// Starts the edge `node` of the cluster on `pg`.
pub async fn edge(bin_dir: &Path, dir: &Path, pg: &Postgres, node: &str) -> Result<Edge> {
    let (http, agents, admin, mesh, metrics) = (
        reserved_port()?,
        reserved_port()?,
        reserved_port()?,
        reserved_port()?,
        reserved_port()?,
    );
    let dir = dir.join(node);
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("state");
    let mut toml = edge_toml(&state, http, agents, admin);
    toml.push_str(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
         [cluster]\nstore = \"{}\"\nnode = \"{node}\"\nmesh_listen = \"127.0.0.1:{mesh}\"\n",
        pg.url()
    ));
    let conf = dir.join("edge.toml");
    std::fs::write(&conf, toml)?;
    // BENCH_EDGE_WRAPPER (heaptrack, say) runs the edges under another program.
    let mut cmd = match std::env::var_os("BENCH_EDGE_WRAPPER") {
        Some(wrapper) => {
            let mut cmd = Command::new(wrapper);
            cmd.arg(bin_dir.join("burrow-edge"));
            cmd
        }
        None => Command::new(bin_dir.join("burrow-edge")),
    };
    cmd.arg("serve").arg("--config").arg(&conf);
    let proc = Proc::spawn(node, "edge", quiet(&mut cmd), &dir)?;
    accepting(http, Duration::from_secs(20))
        .await
        .with_context(|| format!("edge {node} did not start: {}", proc.log_tail()))?;
    Ok(Edge {
        proc,
        http,
        agents,
        admin,
        metrics,
        state,
    })
}

/// Runs the cluster benchmark and prints its table.
pub async fn run(bin_dir: &Path, work: &Path, origin: SocketAddr, shape: Shape) -> Result<()> {
    let pg = Postgres::start().await;
    let one = edge(bin_dir, work, &pg, "one").await?;
    let two = edge(bin_dir, work, &pg, "two").await?;
    let (key, agent_token) = register(&one.state, one.admin).await?;
    let mut cmd = Command::new(bin_dir.join("burrow-agent"));
    cmd.args(["--edge", &format!("127.0.0.1:{}", two.agents)])
        .args(["--server-name", "localhost"])
        .arg("--ca")
        .arg(two.state.join("agent-ca.pem"))
        .args(["--max-streams", "20000"])
        .arg("--state-dir")
        .arg(work.join("agent-state"))
        .env("BURROW_AGENT_TOKEN", agent_token);
    let agent = Proc::spawn("agent", "agent", quiet(&mut cmd), work)?;
    let host = format!("{}-{key}.{DOMAIN}", origin.port());
    let target = |edge: &Edge| Target {
        addr: ([127, 0, 0, 1], edge.http).into(),
        host: host.clone(),
    };
    let (owner, forwarding) = (target(&two), target(&one));
    let patience = Duration::from_secs(20);
    for t in [&owner, &forwarding] {
        first_200(t, Instant::now(), Duration::from_millis(5), patience)
            .await
            .with_context(|| format!("no answer through {}: {}", t.addr, agent.log_tail()))?;
    }
    // Warm both paths (connections, the mesh, the allocator) before measuring.
    let warm = Duration::from_secs(1);
    closed_loop(&owner, shape.conns, warm, false).await;
    closed_loop(&forwarding, shape.conns, warm, false).await;

    // The two paths take turns, round after round, so drift in the machine's load falls on
    // both; each row is the median round.
    let run = Duration::from_secs(shape.seconds);
    let mut rounds: [Vec<(Summary, Summary)>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..shape.rounds {
        for (i, t) in [&owner, &forwarding].into_iter().enumerate() {
            let fixed = fixed_rate(t, shape.rate, shape.conns, run).await.summary();
            let closed = closed_loop(t, shape.conns, run, false).await.summary();
            rounds[i].push((fixed, closed));
        }
    }
    let [owner_rounds, hop_rounds] = rounds;
    let rows = [
        (
            "through the edge that holds the agent",
            median(owner_rounds),
        ),
        ("through another edge (one hop)", median(hop_rounds)),
    ]
    .map(|(name, (fixed, closed))| (name, fixed, closed));
    print_table(&rows, shape);
    agent.stop().await;
    one.proc.stop().await;
    two.proc.stop().await;
    Ok(())
}

/// The round whose fixed-rate p50 is the median.
fn median(mut rounds: Vec<(Summary, Summary)>) -> (Summary, Summary) {
    rounds.sort_by(|a, b| {
        let p50 = |s: &Summary| s.p50_us.unwrap_or(f64::MAX);
        p50(&a.0).total_cmp(&p50(&b.0))
    });
    let middle = rounds.len() / 2;
    rounds.swap_remove(middle)
}

fn print_table(rows: &[(&str, Summary, Summary)], shape: Shape) {
    let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} µs"));
    println!(
        "\n### Cluster: the forwarding hop ({} req/s fixed rate and closed loop, {} keep-alive connections, {} s each; the median of {} rounds, the paths taking turns)\n",
        shape.rate, shape.conns, shape.seconds, shape.rounds
    );
    println!("| path | p50 | p99 | p99.9 | errors | closed-loop req/s | errors |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, fixed, closed) in rows {
        println!(
            "| {name} | {} | {} | {} | {} | {:.0} | {} |",
            us(fixed.p50_us),
            us(fixed.p99_us),
            us(fixed.p999_us),
            fixed.errors,
            closed.rps(),
            closed.errors
        );
    }
    if let [(_, direct, _), (_, hop, _)] = rows {
        let added = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
        println!(
            "\nThe hop adds {} at p50 and {} at p99.",
            us(added(direct.p50_us, hop.p50_us)),
            us(added(direct.p99_us, hop.p99_us))
        );
    }
}
