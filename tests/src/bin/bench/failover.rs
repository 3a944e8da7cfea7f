//! `bench cluster`, failover: how long after an edge's death every devbox is reachable again.
//! Three release edges on a throwaway PostgreSQL, `devboxes` real agent processes, each listing
//! the three edges and holding two (`liveness.heartbeat_timeout = "1s"`, as the README advises
//! with several edges). Each devbox is requested through the edge that holds none of them, one
//! request after another, while an edge that holds every agent is killed (kill -9): for each
//! devbox, the time from the kill until a request sent after it was answered 200. Then how long
//! until every agent held two live edges again.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burrow_tests::postgres::Postgres;
use tokio::process::Command;
use tokio::time::Instant;

use crate::cluster::{Edge, edge};
use crate::fleet::{admin, register};
use crate::load::{Target, get_once};
use crate::procs::Proc;
use crate::systems::{DOMAIN, quiet};

/// Runs the failover part and prints its table.
pub async fn run(bin_dir: &Path, work: &Path, origin: SocketAddr, devboxes: usize) -> Result<()> {
    let pg = Postgres::start().await;
    let mut edges = Vec::new();
    for node in ["one", "two", "three"] {
        edges.push(edge(bin_dir, work, &pg, node).await?);
    }
    let registered = register(&edges[0], devboxes).await?;
    let agents = start_agents(bin_dir, work, &edges, &registered)?;
    // Every agent on two edges, as the third edge sees it.
    let ids: Vec<String> = registered.iter().map(|d| d.id.clone()).collect();
    wait(
        Duration::from_secs(60),
        "every agent on two edges",
        || async {
            held(&edges[2], &ids)
                .await
                .is_ok_and(|h| h.iter().all(|e| e.len() == 2))
        },
    )
    .await?;
    let before = held(&edges[2], &ids).await?;
    let victim = edges
        .iter()
        .position(|e| before.iter().all(|h| h.contains(&node_name(e))))
        .context("no edge holds every agent")?;
    let bystander = edges
        .iter()
        .position(|e| before.iter().all(|h| !h.contains(&node_name(e))))
        .context("no edge holds none of the agents")?;
    let targets: Vec<Target> = registered
        .iter()
        .map(|d| Target {
            addr: ([127, 0, 0, 1], edges[bystander].http).into(),
            host: format!("{}-{}.{DOMAIN}", origin.port(), d.key),
        })
        .collect();
    // Warm the path through the bystander (its mesh connections, the pools).
    for t in &targets {
        get_once(t, "/").await?;
    }
    let killed = Instant::now();
    edges[victim].proc.kill().await;
    let probes = targets
        .into_iter()
        .map(|t| tokio::spawn(reachable_again(t, killed)));
    let mut times = Vec::new();
    let mut failures = 0;
    for probe in probes {
        let (took, failed) = probe.await??;
        times.push(took);
        failures += failed;
    }
    let victim_name = node_name(&edges[victim]);
    wait(Duration::from_secs(60), "two live edges again", || async {
        held(&edges[bystander], &ids)
            .await
            .is_ok_and(|h| h.iter().all(|e| e.len() == 2 && !e.contains(&victim_name)))
    })
    .await?;
    let back = killed.elapsed();
    times.sort();
    let ms = |d: &Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "\n### Cluster: an edge killed (kill -9) while {devboxes} agents held it and another edge\n"
    );
    println!("| measure | p50 | max |");
    println!("| --- | ---: | ---: |");
    println!(
        "| kill -> a devbox answers again through the edge holding none ({} devboxes; {failures} requests failed) | {} | {} |",
        times.len(),
        times.get(times.len() / 2).map_or("-".into(), ms),
        times.last().map_or("-".into(), ms)
    );
    println!(
        "| kill -> every agent on two live edges again (as the other edges see it) | - | {} |",
        ms(&back)
    );
    for a in agents {
        a.stop().await;
    }
    for e in edges {
        e.proc.stop().await;
    }
    Ok(())
}

/// One real agent process per devbox, each listing every edge.
fn start_agents(
    bin_dir: &Path,
    work: &Path,
    edges: &[Edge],
    devboxes: &[crate::fleet::Devbox],
) -> Result<Vec<Proc>> {
    let list = edges
        .iter()
        .map(|e| format!("127.0.0.1:{}", e.agents))
        .collect::<Vec<_>>()
        .join(",");
    let mut agents = Vec::new();
    for (i, d) in devboxes.iter().enumerate() {
        let mut cmd = Command::new(bin_dir.join("burrow-agent"));
        cmd.args(["--edge", &list])
            .args(["--server-name", "localhost"])
            .arg("--ca")
            .arg(edges[0].state.join("agent-ca.pem"))
            .arg("--state-dir")
            .arg(work.join(format!("agent-{i}")))
            .env("BURROW_AGENT_TOKEN", &d.token)
            .env("BURROW_LIVENESS_HEARTBEAT_TIMEOUT", "1s");
        agents.push(Proc::spawn(
            "agent",
            &format!("agent-{i}"),
            quiet(&mut cmd),
            work,
        )?);
    }
    Ok(agents)
}

/// Requests `GET /` through `target`, one after another, until one sent after `killed` is
/// answered 200: the time from `killed` to that answer, and how many failed before it.
async fn reachable_again(target: Target, killed: Instant) -> Result<(Duration, u32)> {
    let mut failed = 0;
    loop {
        let answer = tokio::time::timeout(Duration::from_secs(10), get_once(&target, "/")).await;
        if matches!(answer, Ok(Ok(200))) {
            return Ok((killed.elapsed(), failed));
        }
        failed += 1;
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("{} not reachable 30 s after the kill", target.host);
        }
    }
}

/// The node name an edge was started with (its directory's name).
fn node_name(edge: &Edge) -> String {
    edge.state
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The edges holding each devbox of `ids`, as `edge` sees them.
async fn held(edge: &Edge, ids: &[String]) -> Result<Vec<Vec<String>>> {
    let mut all = Vec::new();
    for id in ids {
        let view = admin(edge, "GET", &format!("/v1/devboxes/{id}")).await?;
        let edges = view["agent"]["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        all.push(
            edges
                .iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect(),
        );
    }
    Ok(all)
}

/// Polls `check` every 20 ms until it holds: how long that took; fails after `patience`.
async fn wait<F: Future<Output = bool>>(
    patience: Duration,
    what: &str,
    check: impl Fn() -> F,
) -> Result<Duration> {
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > patience {
            bail!("{what}: not within {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}
