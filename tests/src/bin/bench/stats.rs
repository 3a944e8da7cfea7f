//! Latency samples, percentiles and medians.

use std::time::Duration;

/// Samples from an in-process load generator.
#[derive(Debug, Default)]
pub struct Stats {
    /// Latency of each successful request, µs.
    pub latencies_us: Vec<f64>,
    /// Requests that failed (error or a status other than 200).
    pub errors: u64,
    /// Wall time of the run.
    pub seconds: f64,
}

impl Stats {
    /// Records one successful request.
    pub fn record(&mut self, latency: Duration) {
        self.latencies_us.push(latency.as_secs_f64() * 1e6);
    }

    /// Adds another task's samples.
    pub fn merge(&mut self, other: Stats) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
    }

    /// Counts and percentiles.
    pub fn summary(mut self) -> Summary {
        self.latencies_us.sort_by(f64::total_cmp);
        let l = &self.latencies_us;
        Summary {
            requests: l.len() as u64,
            errors: self.errors,
            seconds: self.seconds,
            p50_us: percentile(l, 0.50),
            p90_us: percentile(l, 0.90),
            p99_us: percentile(l, 0.99),
            p999_us: percentile(l, 0.999),
        }
    }
}

/// What a load generator run measured, whoever ran it.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Successful requests.
    pub requests: u64,
    /// Failed requests (errors, timeouts, statuses other than 2xx).
    pub errors: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Latency percentiles, µs, where the generator reports them.
    pub p50_us: Option<f64>,
    /// 90th percentile.
    pub p90_us: Option<f64>,
    /// 99th percentile.
    pub p99_us: Option<f64>,
    /// 99.9th percentile.
    pub p999_us: Option<f64>,
}

impl Summary {
    /// Successful requests a second.
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// The metrics as (name, value) pairs, with `prefix` before each name.
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut out = vec![
            (format!("{prefix}rps"), self.rps()),
            (format!("{prefix}requests"), self.requests as f64),
            (format!("{prefix}errors"), self.errors as f64),
        ];
        for (name, v) in [
            ("p50_us", self.p50_us),
            ("p90_us", self.p90_us),
            ("p99_us", self.p99_us),
            ("p999_us", self.p999_us),
        ] {
            if let Some(v) = v {
                out.push((format!("{prefix}{name}"), v));
            }
        }
        out
    }
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(500.0));
        assert_eq!(percentile(&v, 0.99), Some(990.0));
        assert_eq!(percentile(&v, 0.999), Some(999.0));
        assert_eq!(percentile(&v, 1.0), Some(1000.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
