//! The gRPC benchmark's report: the medians over the rounds as two Markdown tables, burrow's
//! ratios to `direct` and to `nginx`, and `grpc.json` (every sample, the medians, the
//! machine, the shape of the run).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use super::start::Bins;
use super::{MESSAGE_SIZES, Shape, UNARY_BYTES};
use crate::report::{micros, thousands};
use crate::results::Results;
use crate::systems::System;

/// The results' table name.
const TABLE: &str = "grpc";

/// Prints the tables on stdout.
pub fn print(results: &Results, shape: Shape) {
    println!("{}", markdown(results, shape));
}

/// Writes `{dir}/grpc.json`.
pub fn write(
    results: &Results,
    shape: Shape,
    bins: &Bins<'_>,
    elapsed: Duration,
    dir: &Path,
) -> Result<()> {
    let mut versions = serde_json::Map::new();
    if let Some(v) = bins.nginx.and_then(|n| crate::peers::version_of(n, "-v")) {
        versions.insert("nginx".into(), json!(v));
    }
    if let Some(v) = crate::peers::version_of(&bins.burrow.join("burrow-edge"), "--version") {
        versions.insert("burrow".into(), json!(v));
    }
    let meta = json!({
        "date": crate::utc_now(),
        "mode": shape.mode,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": crate::machine(),
        "versions": versions,
        "elapsed_s": elapsed.as_secs_f64().round(),
        "shape": {
            "rounds": shape.rounds,
            "warm_s": shape.warm.as_secs_f64(),
            "closed_loop_s": shape.run.as_secs_f64(),
            "unary_bytes": UNARY_BYTES,
            "fixed_rate": shape.rate,
            "fixed_s": shape.fixed.as_secs_f64(),
            "stream_bytes": shape.bytes,
            "stream_message_bytes": MESSAGE_SIZES.map(|(size, _)| size),
        },
    });
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let path = dir.join("grpc.json");
    let text = serde_json::to_string_pretty(&results.to_json(meta))?;
    std::fs::write(&path, text).with_context(|| path.display().to_string())?;
    eprintln!("bench grpc: results in {}", path.display());
    Ok(())
}

/// Both tables, the ratios, and any errors.
fn markdown(results: &Results, shape: Shape) -> String {
    let systems = results.systems(TABLE);
    let get = |system: System, metric: &str| results.median(TABLE, system, metric);
    let mut out = format!(
        "\n### gRPC ({} run: the median of {} round{}; tonic client and service, h2c)\n\n\
         Unary: {UNARY_BYTES}-byte messages, {} s closed loop after {} s of warm-up; then {} s at \
         {} calls/s on one connection, latency from when each call was due. Streams: one call \
         of {} MiB each way.\n\n",
        shape.mode,
        shape.rounds,
        if shape.rounds == 1 { "" } else { "s" },
        shape.run.as_secs(),
        shape.warm.as_secs(),
        shape.fixed.as_secs(),
        thousands(i64::from(shape.rate)),
        shape.bytes >> 20,
    );
    let rate = thousands(i64::from(shape.rate));
    let _ = writeln!(
        out,
        "| system | unary calls/s (64 in flight, 1 connection) | p50 | p99 | p50 / p99 at \
         {rate} calls/s | download MB/s (1 MiB messages) | upload MB/s (1 MiB messages) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for &system in &systems {
        let v = |metric: &str| get(system, metric);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} / {} | {} | {} |",
            system.name(),
            cell(v("unary_1x64_rps"), int),
            cell(v("unary_1x64_p50_us"), micros),
            cell(v("unary_1x64_p99_us"), micros),
            cell(v("fixed_p50_us"), micros),
            cell(v("fixed_p99_us"), micros),
            cell(v("down_1mib_mbps"), int),
            cell(v("up_1mib_mbps"), int),
        );
    }
    out.push_str(&second_table(results, &systems, &rate));
    for base in [System::Direct, System::Nginx] {
        if let Some(line) = ratios(results, base) {
            let _ = write!(out, "\n{line}");
        }
    }
    let errors = results.errors(TABLE);
    if !errors.is_empty() {
        let _ = write!(out, "\n\nErrors:\n- {}", errors.join("\n- "));
    }
    out
}

/// Four connections of 16 calls, one call at a time, p99.9 at the fixed rate, 64 KiB
/// messages, and what the proxy's processes spent.
fn second_table(results: &Results, systems: &[System], rate: &str) -> String {
    let mut out = format!(
        "\n| system | unary calls/s (4 connections × 16) | p50 | p99 | one call at a time: p50 / \
         p99 | p99.9 at {rate} calls/s | download MB/s (64 KiB messages) | upload MB/s (64 KiB \
         messages) | CPU ms per 1,000 calls (64 in flight; public + devbox) | CPU-s per GiB down \
         / up (1 MiB; public + devbox) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for &system in systems {
        let v = |metric: &str| results.median(TABLE, system, metric);
        let cpu = |prefix: &str, unit: &str| {
            let public = v(&format!("{prefix}cpu_public_{unit}"));
            let devbox = v(&format!("{prefix}cpu_devbox_{unit}"));
            match system {
                System::Direct => "-".to_owned(),
                System::Burrow => format!("{} + {}", cell(public, dec), cell(devbox, dec)),
                _ => cell(public, dec),
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} / {} |",
            system.name(),
            cell(v("unary_4x16_rps"), int),
            cell(v("unary_4x16_p50_us"), micros),
            cell(v("unary_4x16_p99_us"), micros),
            cell(v("unary_1x1_p50_us"), micros),
            cell(v("unary_1x1_p99_us"), micros),
            cell(v("fixed_p999_us"), micros),
            cell(v("down_64kib_mbps"), int),
            cell(v("up_64kib_mbps"), int),
            cpu("unary_1x64_", "ms_per_1k"),
            cpu("down_1mib_", "s_per_gib"),
            cpu("up_1mib_", "s_per_gib"),
        );
    }
    out
}

/// burrow against `base`: calls/s and MB/s as ratios, the fixed-rate latency as differences.
fn ratios(results: &Results, base: System) -> Option<String> {
    let get = |system: System, metric: &str| results.median(TABLE, system, metric);
    let ratio = |metric: &str| {
        let r = get(System::Burrow, metric)? / get(base, metric)?;
        Some(format!("{r:.2}"))
    };
    let added = |metric: &str| {
        let d = get(System::Burrow, metric)? - get(base, metric)?;
        Some(format!(
            "{}{}",
            if d < 0.0 { "-" } else { "+" },
            micros(d.abs())
        ))
    };
    let text = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    get(base, "unary_1x64_rps")?;
    Some(format!(
        "\nburrow / {}: unary calls/s {} (4 × 16: {}); download {} (64 KiB messages: {}); \
         upload {} (64 KiB messages: {}); burrow adds {} at p50 and {} at p99 at the fixed \
         rate, {} at p50 one call at a time.",
        base.name(),
        text(ratio("unary_1x64_rps")),
        text(ratio("unary_4x16_rps")),
        text(ratio("down_1mib_mbps")),
        text(ratio("down_64kib_mbps")),
        text(ratio("up_1mib_mbps")),
        text(ratio("up_64kib_mbps")),
        text(added("fixed_p50_us")),
        text(added("fixed_p99_us")),
        text(added("unary_1x1_p50_us")),
    ))
}

/// A value, or `-` when there is none.
fn cell(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// A count or rate: no decimals, thousands separated.
fn int(v: f64) -> String {
    thousands(v.round() as i64)
}

/// A small figure with one decimal.
fn dec(v: f64) -> String {
    format!("{v:.1}")
}
