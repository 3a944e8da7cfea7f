//! Noticing that the devbox slept or was frozen. Rust's `Instant` and tokio's timers run on
//! CLOCK_MONOTONIC, which stops during a suspend, so after a resume every timer believes no time
//! passed and a dead connection looks alive. The detector samples the clocks on a short tick and
//! reports a resume when they diverge or when a tick arrives far too late.
//!
//! A VM paused and continued can resume with all clocks frozen together (DESIGN.md); then only
//! the network notices (heartbeat deadline, stateless reset), which the session handles.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::clock::{Clocks, Sample};
use crate::metrics::Metrics;

/// What the detector concluded from two samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// CLOCK_BOOTTIME advanced past CLOCK_MONOTONIC: the machine was suspended this long.
    Suspended(Duration),
    /// CLOCK_REALTIME jumped relative to CLOCK_MONOTONIC (a stepped clock, often right after a
    /// VM resume).
    ClockStep(Duration),
    /// The tick came this late by every clock: the process was stopped (SIGSTOP, a frozen
    /// cgroup) or starved.
    Stalled(Duration),
}

/// Compares successive samples. Pure: the caller supplies every sample.
#[derive(Debug, Clone)]
pub struct Detector {
    last: Sample,
    tick: Duration,
    threshold: Duration,
}

impl Detector {
    /// A detector expecting a sample every `tick`, flagging divergences over `threshold`.
    pub fn new(first: Sample, tick: Duration, threshold: Duration) -> Detector {
        Detector {
            last: first,
            tick,
            threshold,
        }
    }

    /// Takes the next sample; `Some` if it shows a resume.
    pub fn observe(&mut self, now: Sample) -> Option<Resume> {
        let prev = std::mem::replace(&mut self.last, now);
        let mono = now.monotonic.saturating_sub(prev.monotonic);
        let boot = now.boottime.saturating_sub(prev.boottime);
        let slept = boot.saturating_sub(mono);
        if slept > self.threshold {
            return Some(Resume::Suspended(slept));
        }
        let step = if now.realtime >= prev.realtime {
            (now.realtime - prev.realtime).abs_diff(mono)
        } else {
            // Wall time went backwards: the whole distance counts.
            (prev.realtime - now.realtime) + mono
        };
        if step > self.threshold {
            return Some(Resume::ClockStep(step));
        }
        let late = mono.saturating_sub(self.tick);
        if late > self.threshold {
            return Some(Resume::Stalled(late));
        }
        None
    }
}

/// Samples `clocks` every `tick` until `shutdown`, bumping `resumes` on every detected resume.
pub async fn watch(
    clocks: Arc<dyn Clocks>,
    tick: Duration,
    threshold: Duration,
    resumes: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut detector = Detector::new(clocks.sample(), tick, threshold);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        if let Some(resume) = detector.observe(clocks.sample()) {
            info!(?resume, "resume detected; probing the connection");
            let kind = match resume {
                Resume::Suspended(_) => "suspended",
                Resume::ClockStep(_) => "clock_step",
                Resume::Stalled(_) => "stalled",
            };
            metrics.resumes.with_label_values(&[kind]).inc();
            resumes.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_secs(1);
    const THRESHOLD: Duration = Duration::from_secs(2);

    fn s(mono: u64, boot: u64, real: u64) -> Sample {
        Sample {
            monotonic: Duration::from_secs(mono),
            boottime: Duration::from_secs(boot),
            realtime: Duration::from_secs(real),
        }
    }

    fn detector() -> Detector {
        Detector::new(s(100, 100, 1_000_000), TICK, THRESHOLD)
    }

    #[test]
    fn regular_ticks_are_quiet() {
        let mut d = detector();
        for i in 1..10 {
            assert_eq!(d.observe(s(100 + i, 100 + i, 1_000_000 + i)), None);
        }
    }

    #[test]
    fn suspend_shows_as_boottime_running_ahead() {
        let mut d = detector();
        assert_eq!(
            d.observe(s(101, 161, 1_000_061)),
            Some(Resume::Suspended(Duration::from_secs(60)))
        );
        assert_eq!(d.observe(s(102, 162, 1_000_062)), None, "once only");
    }

    #[test]
    fn stepped_wall_clock_either_way() {
        let mut d = detector();
        assert_eq!(
            d.observe(s(101, 101, 1_000_031)),
            Some(Resume::ClockStep(Duration::from_secs(30)))
        );
        let mut d = detector();
        assert_eq!(
            d.observe(s(101, 101, 999_971)),
            Some(Resume::ClockStep(Duration::from_secs(30)))
        );
    }

    #[test]
    fn a_late_tick_is_a_stall() {
        let mut d = detector();
        assert_eq!(
            d.observe(s(140, 140, 1_000_040)),
            Some(Resume::Stalled(Duration::from_secs(39)))
        );
    }
}
