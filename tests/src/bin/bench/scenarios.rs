//! One scenario against one running system: runs the load, reads `/proc` before and after, and
//! returns named metrics (the JSON's and the tables' vocabulary):
//!
//! - `*_cpu_*`: CPU-seconds of the system's processes (public side + devbox side), never the
//!   load generator's or the origin's;
//! - `*_us`: microseconds; `*_kib`: KiB; `*_mbps`: MB/s (10^6 bytes).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::load::{self, Target};
use crate::plan::{Plan, Scenario};
use crate::stats::Summary;
use crate::systems::{Running, System, Usage};
use crate::tools::{self, Tools};
use crate::ws::Fleet;

/// Named values.
pub type Metrics = Vec<(String, f64)>;

const GIB: f64 = (1u64 << 30) as f64;

/// What a scenario run needs besides the system.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// Durations and sizes.
    pub plan: &'a Plan,
    /// External load generators (unused with `plan.in_process`).
    pub tools: &'a Tools,
    /// Scratch directory.
    pub scratch: &'a Path,
}

/// Whether `scenario` runs against `system` at all.
pub fn applies(scenario: Scenario, system: System, ctx: &Ctx<'_>) -> bool {
    match scenario {
        // h2load speaks HTTP/2 (h2c) to burrow's edge and to nginx; the origin is the baseline.
        Scenario::H2 => {
            matches!(system, System::Direct | System::Nginx | System::Burrow)
                && !ctx.plan.in_process
                && ctx.tools.h2load.is_some()
        }
        _ => true,
    }
}

/// Runs `scenario` (`variant`: the WebSocket count) against `running`.
pub async fn run(
    scenario: Scenario,
    variant: usize,
    running: &Running,
    ctx: &Ctx<'_>,
) -> Result<Metrics> {
    let target = &running.target;
    let plan = ctx.plan;
    match scenario {
        Scenario::Bulk => bulk(running, plan).await,
        Scenario::Rps => {
            let before = running.usage();
            let s = match (&ctx.tools.wrk, plan.in_process) {
                (Some(wrk), false) => {
                    tools::wrk(wrk, target, plan.rps_conns, plan.rps_time, false).await?
                }
                _ => load::closed_loop(target, plan.rps_conns, plan.rps_time, false)
                    .await
                    .summary(),
            };
            Ok(with_cpu(&s, running, before, running.usage()))
        }
        Scenario::H2 => {
            let h2load = ctx.tools.h2load.as_ref().context("h2load")?;
            let before = running.usage();
            // 8 connections x 8 streams: the same 64 requests in flight as wrk's 64 connections.
            let h2 = running.h2.as_ref().context("the system takes no HTTP/2")?;
            let s = tools::h2load(h2load, h2, 8, 8, plan.rps_time, ctx.scratch).await?;
            Ok(with_cpu(&s, running, before, running.usage()))
        }
        Scenario::Latency => {
            let before = running.usage();
            let s = match (&ctx.tools.oha, plan.in_process) {
                (Some(oha), false) => {
                    tools::oha_rate(oha, target, plan.rate, 32, plan.rate_time).await?
                }
                _ => load::fixed_rate(target, plan.rate, 32, plan.rate_time)
                    .await
                    .summary(),
            };
            let mut m = with_cpu(&s, running, before, running.usage());
            if let Some((_, cpu)) = m.iter().find(|(k, _)| k == "cpu_s") {
                let pct = 100.0 * cpu / s.seconds.max(1e-9);
                m.push(("cpu_pct".into(), pct));
            }
            Ok(m)
        }
        Scenario::Churn => {
            let before = running.usage();
            let s = match (&ctx.tools.wrk, plan.in_process) {
                (Some(wrk), false) => {
                    tools::wrk(wrk, target, plan.rps_conns, plan.rps_time, true).await?
                }
                _ => load::closed_loop(target, plan.rps_conns, plan.rps_time, true)
                    .await
                    .summary(),
            };
            Ok(with_cpu(&s, running, before, running.usage()))
        }
        Scenario::Ws => websockets(running, variant, plan).await,
        Scenario::Hol => head_of_line(target, plan).await,
        Scenario::Idle | Scenario::Cold => bail!("{} is run by the driver", scenario.name()),
    }
}

/// Download, then upload, `plan.bulk_bytes` over one connection each.
async fn bulk(running: &Running, plan: &Plan) -> Result<Metrics> {
    let mut m = Metrics::new();
    for dir in ["down", "up"] {
        let before = running.usage();
        let took = if dir == "down" {
            load::download(&running.target, plan.bulk_bytes).await?
        } else {
            load::upload(&running.target, plan.bulk_bytes).await?
        };
        let after = running.usage();
        let gib = plan.bulk_bytes as f64 / GIB;
        let server = (after.server_cpu - before.server_cpu) / gib;
        let client = (after.client_cpu - before.client_cpu) / gib;
        m.push((
            format!("{dir}_mbps"),
            plan.bulk_bytes as f64 / 1e6 / took.as_secs_f64(),
        ));
        if running.server.is_some() {
            m.push((format!("{dir}_cpu_s_per_gib"), server + client));
            m.push((format!("{dir}_server_cpu_s_per_gib"), server));
        }
        if running.client.is_some() {
            m.push((format!("{dir}_client_cpu_s_per_gib"), client));
        }
    }
    Ok(m)
}

/// A load generator's summary plus the system's CPU over it: CPU-seconds and CPU-milliseconds
/// per 1,000 successful requests, split by side.
fn with_cpu(s: &Summary, running: &Running, before: Usage, after: Usage) -> Metrics {
    let mut m = s.metrics("");
    if running.server.is_none() {
        return m;
    }
    let server = after.server_cpu - before.server_cpu;
    let client = after.client_cpu - before.client_cpu;
    let per_1k = |cpu: f64| cpu * 1e3 / (s.requests.max(1) as f64 / 1e3);
    m.push(("cpu_s".into(), server + client));
    m.push(("cpu_ms_per_1k".into(), per_1k(server + client)));
    m.push(("server_cpu_ms_per_1k".into(), per_1k(server)));
    if running.client.is_some() {
        m.push(("client_cpu_ms_per_1k".into(), per_1k(client)));
    }
    m
}

/// `n` open WebSockets: RSS of both sides before and with them open, per connection; echo
/// latency with all of them open.
async fn websockets(running: &Running, n: usize, plan: &Plan) -> Result<Metrics> {
    let before = running.usage();
    let mut fleet = Fleet::open(&running.target, n, plan.ws_deadline).await;
    if let Some(e) = &fleet.first_error {
        eprintln!(
            "  {}: {} of {n} WebSockets failed to open, first: {e}",
            running.system.name(),
            fleet.failed
        );
    }
    let echo = fleet.echo(plan.ws_window).await;
    let after = running.usage();
    let opened = fleet.opened;
    let failed = fleet.failed;
    fleet.close().await;
    let grown = (after.server_rss + after.client_rss) as f64
        - (before.server_rss + before.client_rss) as f64;
    let echo_errors = echo.errors;
    let s = echo.summary();
    let mut m: Metrics = vec![
        ("opened".into(), opened as f64),
        ("open_failed".into(), failed as f64),
        ("echo_errors".into(), echo_errors as f64),
    ];
    let per_conn = |a: u64, b: u64| (a as f64 - b as f64) / opened.max(1) as f64;
    if running.server.is_some() {
        m.push(("server_rss_kib".into(), after.server_rss as f64));
        m.push(("server_rss_before_kib".into(), before.server_rss as f64));
        if opened > 0 {
            m.push(("kib_per_conn".into(), grown / opened as f64));
            let v = per_conn(after.server_rss, before.server_rss);
            m.push(("server_kib_per_conn".into(), v));
        }
    }
    if running.client.is_some() {
        m.push(("client_rss_kib".into(), after.client_rss as f64));
        m.push(("client_rss_before_kib".into(), before.client_rss as f64));
        if opened > 0 {
            let v = per_conn(after.client_rss, before.client_rss);
            m.push(("client_kib_per_conn".into(), v));
        }
    }
    for (k, v) in [("echo_p50_us", s.p50_us), ("echo_p99_us", s.p99_us)] {
        if let Some(v) = v {
            m.push((k.into(), v));
        }
    }
    Ok(m)
}

/// Small requests at a fixed rate, first alone, then while downloads run back to back through
/// the same system.
async fn head_of_line(target: &Target, plan: &Plan) -> Result<Metrics> {
    let conns = 4;
    let idle = load::fixed_rate(target, plan.hol_rate, conns, plan.hol_time)
        .await
        .summary();
    // The downloads run on a thread and runtime of their own, so they never hold up the
    // small requests' runtime: the two only share the cores, as two clients would.
    let stop = CancellationToken::new();
    let moved = Arc::new(AtomicU64::new(0));
    let bulk = {
        let (target, stop, bytes) = (target.clone(), stop.clone(), plan.bulk_bytes);
        let moved = moved.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        r = load::download_counting(&target, bytes, Some(&moved)) => {
                            if r.is_err() { break }
                        }
                        () = stop.cancelled() => break,
                    }
                }
            });
        })
    };
    // Let the download reach full speed first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t, before) = (tokio::time::Instant::now(), moved.load(Ordering::Relaxed));
    let busy = load::fixed_rate(target, plan.hol_rate, conns, plan.hol_time)
        .await
        .summary();
    let bulk_mbps =
        (moved.load(Ordering::Relaxed) - before) as f64 / 1e6 / t.elapsed().as_secs_f64();
    stop.cancel();
    let _ = tokio::task::spawn_blocking(move || bulk.join()).await;
    let mut m = Metrics::new();
    for (name, s) in [("idle", &idle), ("busy", &busy)] {
        if let Some(v) = s.p50_us {
            m.push((format!("{name}_p50_us"), v));
        }
        if let Some(v) = s.p99_us {
            m.push((format!("{name}_p99_us"), v));
        }
        m.push((format!("{name}_errors"), s.errors as f64));
    }
    if let (Some(a), Some(b)) = (idle.p99_us, busy.p99_us) {
        m.push(("p99_ratio".into(), b / a));
    }
    m.push(("bulk_mbps".into(), bulk_mbps));
    Ok(m)
}
