//! The order of a run: scenario by scenario; within one, round by round; within a round, every
//! system in turn (the order rotates each round, so no system always runs first or last on a
//! warm machine). Each (scenario, round, system) starts the system fresh and stops it after,
//! so no scenario inherits another's memory or connections.

use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use crate::plan::{Plan, Scenario};
use crate::results::{Results, Sample};
use crate::scenarios::{self, Ctx, Metrics};
use crate::systems::{self, Env, System};
use crate::tools::Tools;

/// A scenario run that takes longer than this is abandoned (a hung transfer).
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// Runs `scenarios` against `systems`, appending to `results`.
pub async fn run(
    plan: &Plan,
    systems: &[System],
    scenarios: &[Scenario],
    env: &Env,
    tools: &Tools,
    results: &mut Results,
) {
    let scratch = env.work.join("scratch");
    let _ = std::fs::create_dir_all(&scratch);
    let ctx = Ctx {
        plan,
        tools,
        scratch: &scratch,
    };
    for &scenario in scenarios {
        let started = Instant::now();
        match scenario {
            Scenario::Idle => idle(plan, systems, env, results).await,
            Scenario::Cold => {
                for round in 0..plan.cold_rounds {
                    for system in rotated(systems, round) {
                        if system == System::Direct {
                            continue;
                        }
                        let r = cold(system, env).await;
                        record(results, "cold", system, round, r);
                    }
                }
            }
            Scenario::Ws => {
                for &n in &plan.ws_counts {
                    let table = format!("ws-{n}");
                    for system in rotated(systems, 0) {
                        let r = one(scenario, n, system, env, &ctx).await;
                        push(results, &table, system, 0, r);
                    }
                }
            }
            _ => {
                // The fixed-rate run is long (30 s a system): one round.
                let rounds = if scenario == Scenario::Latency {
                    1
                } else {
                    plan.rounds
                };
                for round in 0..rounds {
                    for system in rotated(systems, round) {
                        if !scenarios::applies(scenario, system, &ctx) {
                            continue;
                        }
                        let r = one(scenario, 0, system, env, &ctx).await;
                        push(results, scenario.name(), system, round, r);
                    }
                }
            }
        }
        eprintln!(
            "bench: {} done in {:.0} s",
            scenario.name(),
            started.elapsed().as_secs_f64()
        );
    }
}

fn rotated(systems: &[System], round: usize) -> Vec<System> {
    let mut v = systems.to_vec();
    if !v.is_empty() {
        let n = round % v.len();
        v.rotate_left(n);
    }
    v
}

fn record(results: &mut Results, table: &str, system: System, round: usize, r: Result<Metrics>) {
    let r = match r {
        Ok(m) => (m, None),
        Err(e) => (Metrics::new(), Some(flat(&e))),
    };
    push(results, table, system, round, r);
}

fn push(
    results: &mut Results,
    table: &str,
    system: System,
    round: usize,
    (metrics, error): (Metrics, Option<String>),
) {
    let shown: Vec<String> = metrics
        .iter()
        .filter(|(k, _)| !k.contains("_server_") && !k.contains("_client_"))
        .take(6)
        .map(|(k, v)| format!("{k}={v:.1}"))
        .collect();
    eprintln!(
        "  [{table} r{}] {}: {}{}",
        round + 1,
        system.name(),
        shown.join(" "),
        error
            .as_deref()
            .map(|e| format!(" ERROR {e}"))
            .unwrap_or_default()
    );
    results.samples.push(Sample {
        table: table.to_owned(),
        system,
        round,
        metrics,
        error,
    });
}

fn flat(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Starts `system`, runs the scenario, checks nothing died, stops it. What was measured is
/// kept even if a process died meanwhile (bore's server at 10,000 WebSockets), with the error.
async fn one(
    scenario: Scenario,
    variant: usize,
    system: System,
    env: &Env,
    ctx: &Ctx<'_>,
) -> (Metrics, Option<String>) {
    let mut running = match systems::start(system, env).await {
        Ok(r) => r,
        Err(e) => return (Metrics::new(), Some(flat(&e))),
    };
    let run = scenarios::run(scenario, variant, &running, ctx);
    let r = tokio::time::timeout(RUN_LIMIT, run).await;
    let alive = running.check();
    running.stop().await;
    let (mut metrics, error) = match r {
        Ok(Ok(m)) => (m, None),
        Ok(Err(e)) => (Metrics::new(), Some(flat(&e))),
        Err(_) => (
            Metrics::new(),
            Some(format!("no result within {RUN_LIMIT:?}")),
        ),
    };
    if alive.is_err() {
        // A dead process has no RSS and echoes nothing: only the counts mean something.
        metrics.retain(|(k, _)| k == "opened" || k == "open_failed");
    }
    (metrics, alive.err().map(|e| flat(&e)).or(error))
}

/// A start, timed: public side spawn to accepting, devbox side spawn to the first 200. The
/// system has been started and stopped once in the same directory before, so a first-boot step
/// (burrow's edge generating its CA) is not counted: this is a restart, as after a reboot.
async fn cold(system: System, env: &Env) -> Result<Metrics> {
    let dir = env.dir(system)?;
    systems::start_in(system, env, &dir).await?.stop().await;
    let running = systems::start_in(system, env, &dir).await?;
    let (s, c) = (running.server_start, running.client_start);
    let two_sided = running.client.is_some();
    running.stop().await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut m = vec![("server_ms".into(), ms(s)), ("total_ms".into(), ms(s + c))];
    if two_sided {
        m.push(("client_ms".into(), ms(c)));
    }
    Ok(m)
}

/// Every tunnel started, then left idle (connected) for `plan.idle_time` together: CPU and
/// RSS of each side over that time.
async fn idle(plan: &Plan, systems: &[System], env: &Env, results: &mut Results) {
    let mut running = Vec::new();
    for &system in systems.iter().filter(|s| **s != System::Direct) {
        match systems::start(system, env).await {
            Ok(r) => running.push(r),
            Err(e) => record(results, "idle", system, 0, Err(e)),
        }
    }
    // Settle after the start-up request, then watch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<_> = running.iter().map(|r| r.usage()).collect();
    tokio::time::sleep(plan.idle_time).await;
    for (mut r, before) in running.into_iter().zip(before) {
        let after = r.usage();
        let alive = r.check();
        let system = r.system;
        let two_sided = r.client.is_some();
        r.stop().await;
        let m = alive.map(|()| {
            let mut m: Metrics = vec![
                ("server_rss_kib".into(), after.server_rss as f64),
                ("server_cpu_s".into(), after.server_cpu - before.server_cpu),
            ];
            if two_sided {
                m.push(("client_rss_kib".into(), after.client_rss as f64));
                m.push(("client_cpu_s".into(), after.client_cpu - before.client_cpu));
            }
            m
        });
        record(results, "idle", system, 0, m);
    }
}
