//! `bench cluster`, the fleet's part: what idle agents cost an edge, and how soon presence
//! reaches the other edges while agents come and go. Two release edges on a throwaway
//! PostgreSQL; the agents are simulated (`burrow_tests::sim`: real QUIC and TLS connections
//! from this process, each with its own devbox's token, idle after the welcome).
//!
//! - Idle agents: the edge's RSS with every devbox registered and no agent, then with 1,000
//!   and with `idle` agents connected and idle; KiB per agent is the difference over the
//!   agents added.
//! - Presence lag: agents connect to edge `one` and disconnect at `rate` a second each way
//!   (a pool of connected agents, the oldest closed as each new one comes); edge `two`'s
//!   `burrow_edge_cluster_change_lag_seconds` (committed by `one` to applied by `two`) over the
//!   run, and, end to end, from a sample of welcomes to `two` showing the devbox held by `one`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burrow_tests::postgres::Postgres;
use burrow_tests::sim::{SimAgent, SimAgents};
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::cluster::{Edge, edge};
use crate::procs::rss_kib;

/// How the fleet's part is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Idle agents on one edge (the memory figure).
    pub idle: usize,
    /// Connects (and disconnects) a second while churning.
    pub rate: u32,
    /// Seconds of churn.
    pub seconds: u64,
}

/// A registered devbox: its id, tunnel key and agent token.
pub struct Devbox {
    pub id: String,
    pub key: String,
    pub token: String,
}

/// Runs the fleet's part and prints its tables.
pub async fn run(bin_dir: &Path, work: &Path, shape: Shape) -> Result<()> {
    let pg = Postgres::start().await;
    let one = edge(bin_dir, work, &pg, "one").await?;
    let two = edge(bin_dir, work, &pg, "two").await?;
    let pool = (shape.rate as usize).max(100);
    let total = shape.idle.max(pool * 2);
    let started = Instant::now();
    let devboxes = register(&one, total).await?;
    println!(
        "\n(registered {total} devboxes through edge one in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let ca = one.state.join("agent-ca.pem");
    idle(&one, &two, &ca, &devboxes[..shape.idle], shape.idle).await?;
    churn(&one, &two, &ca, &devboxes, pool, shape).await?;
    one.proc.stop().await;
    two.proc.stop().await;
    Ok(())
}

/// The idle agents' table.
async fn idle(one: &Edge, two: &Edge, ca: &Path, devboxes: &[Devbox], n: usize) -> Result<()> {
    let pid = one.proc.pid().context("edge one exited")?;
    let mut sims = SimAgents::new(ca, "localhost")?;
    let agents: std::net::SocketAddr = ([127, 0, 0, 1], one.agents).into();
    settle().await;
    let mut rows = vec![(0usize, rss_kib(pid), Duration::ZERO)];
    for step in [n.min(1_000), n] {
        let have = rows.last().map_or(0, |r| r.0);
        if step <= have {
            continue;
        }
        let tokens: Vec<String> = devboxes[have..step]
            .iter()
            .map(|d| d.token.clone())
            .collect();
        let started = Instant::now();
        sims.connect(agents, &tokens, 256)
            .await
            .context("connecting the idle agents")?;
        let took = started.elapsed();
        converged(two, "one", step).await?;
        settle().await;
        rows.push((step, rss_kib(pid), took));
    }
    println!("\n### Cluster: idle agents on one edge (simulated agents, each its own devbox)\n");
    println!("| agents | edge RSS | KiB per agent (since the row above) | connected in |");
    println!("| ---: | ---: | ---: | ---: |");
    for w in 0..rows.len() {
        let (agents, rss, took) = rows[w];
        let per = match w.checked_sub(1).map(|p| rows[p]) {
            Some((a0, r0, _)) if agents > a0 => {
                format!("{:.1}", (rss as f64 - r0 as f64) / (agents - a0) as f64)
            }
            _ => "-".to_owned(),
        };
        println!(
            "| {agents} | {:.1} MiB | {per} | {:.1} s |",
            rss as f64 / 1024.0,
            took.as_secs_f64()
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last())
        && last.0 > 0
    {
        let per = (last.1 as f64 - first.1 as f64) / last.0 as f64;
        println!(
            "\nOver all {} agents: {per:.1} KiB of edge RSS per idle agent.",
            last.0
        );
    }
    sims.close_all().await;
    converged(two, "one", 0).await
}

/// Lets the edge's allocator and background work settle before RSS is read.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// Waits until edge `at` counts `agents` agents on edge `node` (presence converged).
async fn converged(at: &Edge, node: &str, agents: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cluster = admin(at, "GET", "/v1/cluster").await?;
        let held = cluster["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node"] == node))
            .and_then(|n| n["agents"].as_u64());
        if held == Some(agents as u64) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("edge {node}'s {agents} agents not seen after 120 s (seen: {held:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The presence-lag table: `pool` agents connected, then `shape.rate` replaced a second.
async fn churn(
    one: &Edge,
    two: &Edge,
    ca: &Path,
    devboxes: &[Devbox],
    pool: usize,
    shape: Shape,
) -> Result<()> {
    let sims = SimAgents::new(ca, "localhost")?;
    let dialer = sims.dialer();
    let agents: std::net::SocketAddr = ([127, 0, 0, 1], one.agents).into();
    let mut live: std::collections::VecDeque<(usize, SimAgent)> = Default::default();
    for (i, d) in devboxes.iter().enumerate().take(pool) {
        live.push_back((i, dialer.dial(agents, &d.token).await?));
    }
    converged(two, "one", pool).await?;
    let before = lag_buckets(two).await?;
    let mut free: std::collections::VecDeque<usize> = (pool..devboxes.len()).collect();
    let (tx, mut joined) = tokio::sync::mpsc::unbounded_channel::<(usize, SimAgent, Instant)>();
    let (sample_tx, mut samples) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let every = Duration::from_secs(1) / shape.rate.max(1);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = Instant::now() + Duration::from_secs(shape.seconds);
    let (mut started, mut welcomed_n) = (0u64, 0u64);
    let token = admin_token(&two.state)?;
    while Instant::now() < end {
        tick.tick().await;
        while let Ok((i, agent, welcomed)) = joined.try_recv() {
            live.push_back((i, agent));
            // Every 100th, end to end: from the welcome to edge two seeing it held by one
            // (polled every 10 ms, so the admin API is not what is measured).
            welcomed_n += 1;
            if welcomed_n % 100 == 0 {
                let (two_admin, id, sample_tx) =
                    (two.admin, devboxes[i].id.clone(), sample_tx.clone());
                let token = token.clone();
                tokio::spawn(async move {
                    if held_by_one(two_admin, &token, &id).await {
                        let _ = sample_tx.send(welcomed.elapsed());
                    }
                });
            }
        }
        if let Some((i, agent)) = live.pop_front() {
            agent.close();
            free.push_back(i);
        }
        let Some(i) = free.pop_front() else { continue };
        let (dialer, tx, token) = (dialer.clone(), tx.clone(), devboxes[i].token.clone());
        started += 1;
        tokio::spawn(async move {
            if let Ok(agent) = dialer.dial(agents, &token).await {
                let _ = tx.send((i, agent, Instant::now()));
            }
        });
    }
    let elapsed_rate = started as f64 / shape.seconds as f64;
    drop(sample_tx);
    let mut end_to_end = Vec::new();
    let collect = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(d) = samples.recv().await {
            end_to_end.push(d);
        }
    });
    let _ = collect.await;
    while let Ok((i, agent, _)) = joined.try_recv() {
        welcomed_n += 1;
        live.push_back((i, agent));
    }
    let failed = started.saturating_sub(welcomed_n);
    let after = lag_buckets(two).await?;
    print_churn(
        &before,
        &after,
        &mut end_to_end,
        elapsed_rate,
        shape,
        failed,
    );
    for (_, agent) in live {
        agent.close();
    }
    Ok(())
}

/// Whether edge two shows `id` held by edge one, polled every 10 ms for up to 10 s.
async fn held_by_one(admin_port: u16, token: &str, id: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let path = format!("/v1/devboxes/{id}");
        if let Ok(view) = admin_with(admin_port, token, "GET", &path).await
            && view["agent"]["edges"]
                .as_array()
                .is_some_and(|e| e.iter().any(|n| n == "one"))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Edge two's change-lag histogram: cumulative counts by upper bound (seconds).
async fn lag_buckets(edge: &Edge) -> Result<Vec<(f64, f64)>> {
    let metrics_port = edge.metrics;
    let reply = burrow_tests::request(
        ([127, 0, 0, 1], metrics_port).into(),
        "GET",
        "localhost",
        "/metrics",
        &[],
        vec![],
    )
    .await?;
    let text = reply.text();
    let prefix = "burrow_edge_cluster_change_lag_seconds_bucket{le=\"";
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect())
}

/// The quantile `q` of a histogram's counts (`(upper bound, cumulative count)`), linear within
/// the bucket; `None` without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= want {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (want - lower.1) / (count - lower.1).max(1.0);
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

fn print_churn(
    before: &[(f64, f64)],
    after: &[(f64, f64)],
    end_to_end: &mut [Duration],
    rate: f64,
    shape: Shape,
    failed: u64,
) {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect();
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.0} ms", v * 1000.0));
    end_to_end.sort();
    let pick = |q: f64| {
        let i = ((end_to_end.len() as f64 - 1.0) * q).round() as usize;
        end_to_end.get(i).map(Duration::as_secs_f64)
    };
    println!(
        "\n### Cluster: presence lag under churn ({:.0} connects and as many disconnects a second asked for {} s; {rate:.0} connects a second started; {failed} failed)\n",
        shape.rate, shape.seconds
    );
    println!("| measure | changes | p50 | p99 |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| committed by edge one -> applied by edge two | {:.0} | {} | {} |",
        delta.last().map_or(0.0, |d| d.1),
        ms(quantile(&delta, 0.5)),
        ms(quantile(&delta, 0.99))
    );
    println!(
        "| agent welcomed by one -> edge two shows it held (every 100th; polled every 10 ms) | {} | {} | {} |",
        end_to_end.len(),
        ms(pick(0.5)),
        ms(pick(0.99))
    );
}

/// Registers `n` devboxes with open tunnels through `edge`, 16 at a time.
pub async fn register(edge: &Edge, n: usize) -> Result<Vec<Devbox>> {
    let token = admin_token(&edge.state)?;
    let port = edge.admin;
    let calls = (0..n).map(|_| {
        let token = token.clone();
        async move {
            let body = br#"{"tunnel": {"auth_mode": "open"}}"#.to_vec();
            let json = call(port, &token, "POST", "/v1/devboxes", body).await?;
            let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
            let key = text(&json["tunnel"]["tunnel_key"]);
            match (text(&json["id"]), key, text(&json["agent_token"])) {
                (Some(id), Some(key), Some(token)) => Ok(Devbox { id, key, token }),
                _ => bail!("the admin API answered {json}"),
            }
        }
    });
    futures_util::stream::iter(calls)
        .buffer_unordered(16)
        .collect::<Vec<Result<Devbox>>>()
        .await
        .into_iter()
        .collect()
}

fn admin_token(state: &Path) -> Result<String> {
    let file = state.join("admin.token");
    Ok(std::fs::read_to_string(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .to_owned())
}

pub async fn admin(edge: &Edge, method: &str, path: &str) -> Result<serde_json::Value> {
    admin_with(edge.admin, &admin_token(&edge.state)?, method, path).await
}

async fn admin_with(port: u16, token: &str, method: &str, path: &str) -> Result<serde_json::Value> {
    call(port, token, method, path, Vec::new()).await
}

/// One admin API call: its JSON answer (an error unless 2xx).
async fn call(
    port: u16,
    token: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value> {
    let headers = vec![
        ("authorization".to_owned(), format!("Bearer {token}")),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    let reply = burrow_tests::request(
        ([127, 0, 0, 1], port).into(),
        method,
        "localhost",
        path,
        &headers,
        body,
    )
    .await?;
    if !(200..300).contains(&reply.status) {
        bail!("{method} {path}: {} {}", reply.status, reply.text());
    }
    Ok(serde_json::from_slice(&reply.body)?)
}
