//! The external load generators: wrk (HTTP/1.1 keep-alive and, with `Connection: close`,
//! connection churn), h2load (HTTP/2 with prior knowledge) and oha (a fixed request rate, with
//! latency correction). Each runs as a child process against `127.0.0.1` with the system's
//! Host header; their output is parsed into a [`Summary`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::load::Target;
use crate::procs;
use crate::stats::{Stats, Summary};

/// The generators found on PATH.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    /// wrk.
    pub wrk: Option<PathBuf>,
    /// h2load (Debian's nghttp2-client).
    pub h2load: Option<PathBuf>,
    /// oha.
    pub oha: Option<PathBuf>,
}

impl Tools {
    /// Looks for each on PATH.
    pub fn find() -> Tools {
        Tools {
            wrk: procs::which("wrk"),
            h2load: procs::which("h2load"),
            oha: procs::which("oha"),
        }
    }

    /// Their versions, for the report.
    pub fn versions(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, bin, arg) in [
            ("wrk", &self.wrk, "-v"),
            ("h2load", &self.h2load, "--version"),
            ("oha", &self.oha, "--version"),
        ] {
            let Some(bin) = bin else { continue };
            if let Ok(o) = std::process::Command::new(bin).arg(arg).output() {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                if let Some(line) = text.lines().find(|l| !l.trim().is_empty()) {
                    out.push((name.to_owned(), line.trim().to_owned()));
                }
            }
        }
        out
    }
}

async fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// `wrk -t2 -c{conns} -d{secs} --latency`: keep-alive, or a new connection per request with
/// `close` (`Connection: close`: the server closes, wrk reconnects).
pub async fn wrk(
    wrk: &PathBuf,
    target: &Target,
    conns: usize,
    d: Duration,
    close: bool,
) -> Result<Summary> {
    let mut cmd = Command::new(wrk);
    cmd.args([
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{}s", d.as_secs().max(1)),
    ])
    .args(["--latency", "--timeout", "10s"])
    .args(["-H", &format!("Host: {}", target.host)]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(target.url("/"));
    let text = output(&mut cmd, "wrk").await?;
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<Summary> {
    let mut s = Summary::default();
    let mut total = None;
    let mut non_2xx = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => s.p50_us = wrk_time_us(v),
            ["90%", v] => s.p90_us = wrk_time_us(v),
            ["99%", v] => s.p99_us = wrk_time_us(v),
            [n, "requests", "in", secs, ..] => {
                total = n.parse::<u64>().ok();
                s.seconds = wrk_time_us(secs.trim_end_matches(',')).unwrap_or(0.0) / 1e6;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => non_2xx = n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                eprintln!("  wrk: {line}");
                s.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    // Non-2xx answers are in wrk's request count; socket errors are not.
    let total = total.context("no `requests in` line")?;
    s.requests = total.saturating_sub(non_2xx);
    s.errors += non_2xx;
    Ok(s)
}

/// wrk's `471.00us`, `1.43ms`, `2.00s`, `1.00m` in µs.
fn wrk_time_us(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        "h" => n * 3600e6,
        _ => return None,
    })
}

/// `h2load` over HTTP/2 with prior knowledge: `clients` connections × `streams` concurrent
/// streams for `d`; percentiles from its per-request log.
pub async fn h2load(
    h2load: &PathBuf,
    target: &Target,
    clients: usize,
    streams: usize,
    d: Duration,
    scratch: &std::path::Path,
) -> Result<Summary> {
    let log = scratch.join("h2load.tsv");
    let mut cmd = Command::new(h2load);
    cmd.args([
        "-t2",
        "-c",
        &clients.to_string(),
        "-m",
        &streams.to_string(),
    ])
    .args(["-D", &d.as_secs().max(1).to_string()])
    .args(["-H", &format!(":authority: {}", target.host)])
    .arg("--log-file")
    .arg(&log)
    .arg(target.url("/"));
    let text = output(&mut cmd, "h2load").await?;
    let mut s = Summary::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            s.seconds = rest
                .split_whitespace()
                .next()
                .and_then(|v| wrk_time_us(v.trim_end_matches(',')))
                .unwrap_or(0.0)
                / 1e6;
        }
        if let Some(rest) = line.strip_prefix("requests: ") {
            let count = |word: &str| {
                rest.split(',')
                    .map(str::trim)
                    .find(|p| p.ends_with(word))
                    .and_then(|p| p.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            s.requests = count("succeeded");
            s.errors = count("failed") + count("errored") + count("timeout");
        }
    }
    let log_text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
    let mut stats = Stats::default();
    for line in log_text.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if let (Some(&"200"), Some(us)) =
            (cols.get(1), cols.get(2).and_then(|v| v.parse::<f64>().ok()))
        {
            stats.latencies_us.push(us);
        }
    }
    let _ = tokio::fs::remove_file(&log).await;
    let p = stats.summary();
    s.p50_us = p.p50_us;
    s.p90_us = p.p90_us;
    s.p99_us = p.p99_us;
    s.p999_us = p.p999_us;
    if s.seconds == 0.0 {
        bail!("no `finished in` line in h2load's output:\n{text}");
    }
    Ok(s)
}

/// `oha` at a fixed `rate` for `d` over `conns` keep-alive connections, latency-corrected
/// (a request's latency counts from when it was due).
pub async fn oha_rate(
    oha: &PathBuf,
    target: &Target,
    rate: u32,
    conns: usize,
    d: Duration,
) -> Result<Summary> {
    let mut cmd = Command::new(oha);
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "--latency-correction",
    ])
    .args(["-z", &format!("{}s", d.as_secs().max(1))])
    .args(["-q", &rate.to_string(), "-c", &conns.to_string()])
    .args(["-H", &format!("Host: {}", target.host)])
    .arg(target.url("/"));
    let text = output(&mut cmd, "oha").await?;
    parse_oha(&text).with_context(|| format!("reading oha's JSON:\n{text}"))
}

fn parse_oha(text: &str) -> Result<Summary> {
    let json: serde_json::Value = serde_json::from_str(text)?;
    let summary = &json["summary"];
    let secs = |v: &serde_json::Value| v.as_f64().map(|s| s * 1e6);
    let p = &json["latencyPercentiles"];
    let ok = json["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let statuses: u64 = json["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    if let Some(kinds) = json["errorDistribution"]
        .as_object()
        .filter(|m| !m.is_empty())
    {
        eprintln!("  oha errors: {}", serde_json::Value::Object(kinds.clone()));
    }
    // Requests still in flight when the run's time is up are cut by oha, not failed.
    let errors: u64 = json["errorDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("aborted due to deadline"))
                .filter_map(|(_, v)| v.as_u64())
                .sum()
        })
        .unwrap_or(0);
    Ok(Summary {
        requests: ok,
        errors: errors + statuses - ok,
        seconds: summary["total"].as_f64().context("summary.total")?,
        p50_us: secs(&p["p50"]),
        p90_us: secs(&p["p90"]),
        p99_us: secs(&p["p99"]),
        p999_us: secs(&p["p99.9"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n\
            Latency Distribution\n     50%  471.00us\n     75%  600.00us\n     90%  1.00ms\n\
                 99%    1.43ms\n  100000 requests in 5.00s, 15.00MB read\n\
              Socket errors: connect 0, read 2, write 0, timeout 1\n\
              Non-2xx or 3xx responses: 7\nRequests/sec:  20000.00\n";
        let s = parse_wrk(text).expect("parses");
        assert_eq!(s.p50_us, Some(471.0));
        assert_eq!(s.p99_us, Some(1430.0));
        assert_eq!(s.errors, 10);
        assert_eq!(s.requests, 99_993);
        assert_eq!(s.seconds, 5.0);
    }
}
