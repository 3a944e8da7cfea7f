//! The three clocks the resume detector compares, behind a trait so tests can make them jump.
//!
//! CLOCK_MONOTONIC stops while the machine is suspended; CLOCK_BOOTTIME keeps counting through
//! a suspend; CLOCK_REALTIME is wall time, which NTP or a guest agent may step after a resume.

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// One reading of every clock, each as time since its own epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// CLOCK_MONOTONIC.
    pub monotonic: Duration,
    /// CLOCK_BOOTTIME.
    pub boottime: Duration,
    /// CLOCK_REALTIME.
    pub realtime: Duration,
}

/// A source of clock samples.
pub trait Clocks: Send + Sync + 'static {
    /// Reads all three clocks, as close together as possible.
    fn sample(&self) -> Sample;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClocks;

impl Clocks for SystemClocks {
    fn sample(&self) -> Sample {
        Sample {
            monotonic: read(ClockId::CLOCK_MONOTONIC),
            boottime: read(ClockId::CLOCK_BOOTTIME),
            realtime: read(ClockId::CLOCK_REALTIME),
        }
    }
}

fn read(clock: ClockId) -> Duration {
    // These clocks exist on every Linux this agent supports; a failure reads as zero, which
    // the detector sees as no change.
    clock_gettime(clock).map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clocks_move_forward_together() {
        let a = SystemClocks.sample();
        let b = SystemClocks.sample();
        assert!(b.monotonic >= a.monotonic);
        assert!(b.boottime >= a.boottime);
        assert!(
            a.realtime > Duration::from_secs(1_600_000_000),
            "wall time since 1970"
        );
    }
}
