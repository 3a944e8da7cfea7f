//! The Markdown report: one table per scenario, systems as rows, medians over the rounds, with
//! ratios to `direct` (or, for latency, the difference from it).

use std::fmt::Write as _;

use crate::plan::Plan;
use crate::results::Results;
use crate::systems::System;

/// How a column shows its value.
#[derive(Debug, Clone, Copy)]
enum Fmt {
    /// A count or a rate, no decimals, thousands separated.
    Int,
    /// Two significant decimals.
    Dec,
    /// Microseconds, shown as µs or ms.
    Us,
    /// KiB, shown as MiB.
    Mib,
    /// Milliseconds, one decimal.
    Ms,
}

/// What a column adds after the value.
#[derive(Debug, Clone, Copy)]
enum Vs {
    /// Nothing.
    No,
    /// A column of its own: value / direct's value.
    Ratio,
    /// A column of its own: value − direct's value.
    Delta,
}

#[derive(Debug, Clone, Copy)]
struct Col {
    head: &'static str,
    metric: &'static str,
    fmt: Fmt,
    vs: Vs,
    /// Shown after the value as `(public + devbox)`.
    split: Option<(&'static str, &'static str)>,
}

const fn col(head: &'static str, metric: &'static str, fmt: Fmt, vs: Vs) -> Col {
    Col {
        head,
        metric,
        fmt,
        vs,
        split: None,
    }
}

const fn split(head: &'static str, metric: &'static str, s: &'static str, c: &'static str) -> Col {
    Col {
        head,
        metric,
        fmt: Fmt::Dec,
        vs: Vs::No,
        split: Some((s, c)),
    }
}

/// The table's title and columns.
fn spec(table: &str, plan: &Plan) -> (String, Vec<Col>) {
    match table {
        "bulk" => bulk_spec(plan),
        "rps" | "h2" | "churn" => rate_spec(table, plan),
        "latency" => (
            format!(
                "3. Added latency at a fixed {} req/s: {}, 32 connections, {} s, latency-corrected",
                thousands(i64::from(plan.rate)),
                generator(plan, "oha"),
                plan.rate_time.as_secs()
            ),
            vec![
                col("p50", "p50_us", Fmt::Us, Vs::Delta),
                col("p99", "p99_us", Fmt::Us, Vs::Delta),
                col("p99.9", "p999_us", Fmt::Us, Vs::Delta),
                col(
                    "CPU % of a core (public + devbox)",
                    "cpu_pct",
                    Fmt::Dec,
                    Vs::No,
                ),
                col("errors", "errors", Fmt::Int, Vs::No),
            ],
        ),
        "hol" => (
            format!(
                "6. Head-of-line: small requests at {} req/s ({} s), alone and while {} MiB downloads run back to back through the same tunnel, {} round(s)",
                plan.hol_rate,
                plan.hol_time.as_secs(),
                plan.bulk_bytes >> 20,
                plan.rounds
            ),
            vec![
                col("p99 alone", "idle_p99_us", Fmt::Us, Vs::No),
                col("p99 during download", "busy_p99_us", Fmt::Us, Vs::No),
                col("during / alone", "p99_ratio", Fmt::Dec, Vs::No),
                col("errors during", "busy_errors", Fmt::Int, Vs::No),
                col("download MB/s meanwhile", "bulk_mbps", Fmt::Int, Vs::No),
            ],
        ),
        "idle" | "cold" => process_spec(table, plan),
        ws => ws_spec(ws, plan),
    }
}

/// The load generator a table names: the tool, or the in-process one (`--smoke`).
fn generator(plan: &Plan, tool: &str) -> String {
    if plan.in_process {
        "in-process generator".to_owned()
    } else {
        tool.to_owned()
    }
}

/// Table 1, bulk transfers.
fn bulk_spec(plan: &Plan) -> (String, Vec<Col>) {
    (
        format!(
            "1. Bulk: {} MiB over one connection, {} round(s)",
            plan.bulk_bytes >> 20,
            plan.rounds
        ),
        vec![
            col("download MB/s", "down_mbps", Fmt::Int, Vs::Ratio),
            col("upload MB/s", "up_mbps", Fmt::Int, Vs::Ratio),
            split(
                "CPU-s / GiB down (public + devbox)",
                "down_cpu_s_per_gib",
                "down_server_cpu_s_per_gib",
                "down_client_cpu_s_per_gib",
            ),
            split(
                "CPU-s / GiB up (public + devbox)",
                "up_cpu_s_per_gib",
                "up_server_cpu_s_per_gib",
                "up_client_cpu_s_per_gib",
            ),
        ],
    )
}

/// Tables 2, 2b and 4: requests (or new connections) a second.
fn rate_spec(table: &str, plan: &Plan) -> (String, Vec<Col>) {
    let title = match table {
        "rps" => format!(
            "2. Requests per second: {}, {} keep-alive connections, {} s, small response, {} round(s)",
            generator(plan, "wrk"),
            plan.rps_conns,
            plan.rps_time.as_secs(),
            plan.rounds
        ),
        "h2" => format!(
            "2b. HTTP/2 (h2c, prior knowledge): h2load, 8 connections x 8 streams, {} s, {} round(s)",
            plan.rps_time.as_secs(),
            plan.rounds
        ),
        _ => format!(
            "4. Connection churn: a new connection per request ({}, `Connection: close`), {} connections, {} s, {} round(s)",
            generator(plan, "wrk"),
            plan.rps_conns,
            plan.rps_time.as_secs(),
            plan.rounds
        ),
    };
    let rate = if table == "churn" {
        "new connections/s"
    } else {
        "req/s"
    };
    let cpu_1k = split(
        "CPU ms / 1k req (public + devbox)",
        "cpu_ms_per_1k",
        "server_cpu_ms_per_1k",
        "client_cpu_ms_per_1k",
    );
    (
        title,
        vec![
            col(rate, "rps", Fmt::Int, Vs::Ratio),
            col("p50", "p50_us", Fmt::Us, Vs::No),
            col("p99", "p99_us", Fmt::Us, Vs::No),
            cpu_1k,
            col("errors", "errors", Fmt::Int, Vs::No),
        ],
    )
}

/// Tables 7a and 7b: an idle tunnel, and a cold start.
fn process_spec(table: &str, plan: &Plan) -> (String, Vec<Col>) {
    if table == "idle" {
        return (
            format!(
                "7a. Idle, connected tunnel over {} s",
                plan.idle_time.as_secs()
            ),
            vec![
                col("devbox side RSS MiB", "client_rss_kib", Fmt::Mib, Vs::No),
                col("devbox side CPU-s", "client_cpu_s", Fmt::Dec, Vs::No),
                col("public side RSS MiB", "server_rss_kib", Fmt::Mib, Vs::No),
                col("public side CPU-s", "server_cpu_s", Fmt::Dec, Vs::No),
            ],
        );
    }
    (
        format!(
            "7b. Cold start: spawn to accepting (public side), spawn to the first proxied 200 (devbox side), {} round(s)",
            plan.cold_rounds
        ),
        vec![
            col("public side up, ms", "server_ms", Fmt::Ms, Vs::No),
            col("devbox side to first 200, ms", "client_ms", Fmt::Ms, Vs::No),
            col("total, ms", "total_ms", Fmt::Ms, Vs::No),
        ],
    )
}

/// Table 5: `ws` (`ws-{n}`) concurrent WebSockets.
fn ws_spec(ws: &str, plan: &Plan) -> (String, Vec<Col>) {
    let n = ws.trim_start_matches("ws-");
    (
        format!(
            "5. {n} concurrent WebSockets through one tunnel: memory and echo latency (each socket echoes once, paced over {} s)",
            plan.ws_window.as_secs_f64()
        ),
        vec![
            col("opened", "opened", Fmt::Int, Vs::No),
            col("public RSS MiB", "server_rss_kib", Fmt::Mib, Vs::No),
            col("devbox RSS MiB", "client_rss_kib", Fmt::Mib, Vs::No),
            split(
                "KiB / connection (public + devbox)",
                "kib_per_conn",
                "server_kib_per_conn",
                "client_kib_per_conn",
            ),
            col("echo p50", "echo_p50_us", Fmt::Us, Vs::No),
            col("echo p99", "echo_p99_us", Fmt::Us, Vs::No),
            col("failed to open", "open_failed", Fmt::Int, Vs::No),
        ],
    )
}

/// The whole Markdown report.
pub fn markdown(results: &Results, plan: &Plan) -> String {
    let mut out = String::new();
    for (system, why) in &results.skipped {
        let _ = writeln!(out, "> skipped {}: {why}", system.name());
    }
    for note in &results.notes {
        let _ = writeln!(out, "> {note}");
    }
    for table in results.tables() {
        out.push('\n');
        out.push_str(&render(results, &table, plan));
    }
    out
}

fn render(results: &Results, table: &str, plan: &Plan) -> String {
    let (title, cols) = spec(table, plan);
    let mut out = format!("### {title}\n\n| system |");
    let mut rule = String::from("| --- |");
    for c in &cols {
        let _ = write!(out, " {} |", c.head);
        rule.push_str(" ---: |");
        match c.vs {
            Vs::Ratio => {
                out.push_str(" vs direct |");
                rule.push_str(" ---: |");
            }
            Vs::Delta => {
                out.push_str(" minus direct |");
                rule.push_str(" ---: |");
            }
            Vs::No => {}
        }
    }
    let _ = writeln!(out, "\n{rule}");
    for system in results.systems(table) {
        let _ = write!(out, "| {} |", system.name());
        for c in &cols {
            let v = results.median(table, system, c.metric);
            let mut cell = v.map_or("-".to_owned(), |v| fmt(v, c.fmt));
            // The split, where the system has both sides.
            if let Some((s, d)) = c.split {
                let part = |m| results.median(table, system, m);
                if let (Some(s), Some(d)) = (part(s), part(d)) {
                    cell = format!("{cell} ({} + {})", fmt(s, Fmt::Dec), fmt(d, Fmt::Dec));
                }
            }
            let _ = write!(out, " {cell} |");
            let direct = results.median(table, System::Direct, c.metric);
            match (c.vs, v, direct) {
                (Vs::No, ..) => {}
                (Vs::Ratio, Some(v), Some(d)) if d > 0.0 => {
                    let _ = write!(out, " {:.2}x |", v / d);
                }
                (Vs::Delta, Some(v), Some(d)) if system != System::Direct => {
                    let delta = v - d;
                    let sign = if delta < 0.0 { "-" } else { "+" };
                    let _ = write!(out, " {sign}{} |", fmt(delta.abs(), c.fmt));
                }
                _ => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    for e in results.errors(table) {
        let _ = writeln!(out, "\n- error: {e}");
    }
    out
}

fn fmt(v: f64, f: Fmt) -> String {
    match f {
        Fmt::Int => thousands(v.round() as i64),
        Fmt::Dec if v.abs() >= 100.0 => format!("{v:.0}"),
        Fmt::Dec if v.abs() >= 10.0 => format!("{v:.1}"),
        Fmt::Dec => format!("{v:.2}"),
        Fmt::Us if v >= 1e6 => format!("{:.2} s", v / 1e6),
        Fmt::Us if v >= 1e4 => format!("{:.1} ms", v / 1e3),
        Fmt::Us if v >= 1e3 => format!("{:.2} ms", v / 1e3),
        Fmt::Us => format!("{v:.0} µs"),
        Fmt::Mib => format!("{:.1}", v / 1024.0),
        Fmt::Ms => format!("{v:.1}"),
    }
}

/// Microseconds as the tables show them: µs, or ms from 1,000.
pub fn micros(v: f64) -> String {
    fmt(v, Fmt::Us)
}

/// An integer with thousands separated by commas.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(fmt(412.4, Fmt::Us), "412 µs");
        assert_eq!(fmt(1430.0, Fmt::Us), "1.43 ms");
        assert_eq!(fmt(2048.0, Fmt::Mib), "2.0");
    }
}
