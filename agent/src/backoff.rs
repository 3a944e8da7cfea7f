//! When to dial again: exponential backoff with full jitter, the policy kept apart from the
//! reconnect mechanism. The first redial after a session ends is immediate; each failure after
//! that doubles the ceiling up to a low cap (seconds, not minutes), and a session that stayed
//! healthy long enough resets it.

use std::time::Duration;

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Highest ceiling.
    pub max: Duration,
}

/// Exponential backoff with full jitter: each delay is uniform in `[0, min(max, initial *
/// 2^n)]`, so a fleet of agents that lost the same edge does not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    failures: u32,
    /// Jitter only: not a secret, so a fast non-cryptographic generator will do.
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff with no failures yet, its jitter randomly seeded.
    pub fn new(policy: Policy) -> Backoff {
        Backoff::with_rng(policy, fastrand::Rng::new())
    }

    /// A backoff whose jitter is the same on every run for the same `seed` (tests).
    pub fn with_seed(policy: Policy, seed: u64) -> Backoff {
        Backoff::with_rng(policy, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(policy: Policy, rng: fastrand::Rng) -> Backoff {
        Backoff {
            policy,
            failures: 0,
            rng,
        }
    }

    /// The delay before the next attempt, and one more failure counted.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        // Full jitter: uniform in [0, ceiling).
        ceiling.mul_f64(self.rng.f64())
    }

    /// The current ceiling, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(30));
        self.policy
            .initial
            .saturating_mul(factor)
            .min(self.policy.max)
    }

    /// Failures counted since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Forgets past failures (after a healthy session).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };

    #[test]
    fn ceiling_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(POLICY);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= POLICY.max);
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), POLICY.initial);
    }

    #[test]
    fn delays_are_jittered_across_the_range() {
        let mut b = Backoff::with_seed(POLICY, 7);
        for _ in 0..10 {
            b.next_delay();
        }
        let delays: Vec<Duration> = (0..1000).map(|_| b.next_delay()).collect();
        let low = delays
            .iter()
            .filter(|d| **d < Duration::from_millis(500))
            .count();
        let high = delays
            .iter()
            .filter(|d| **d > Duration::from_millis(1500))
            .count();
        assert!(low > 150 && high > 150, "low {low}, high {high}");
    }

    #[test]
    fn a_seed_repeats_its_delays_and_fresh_backoffs_differ() {
        let delays = |mut b: Backoff| (0..20).map(|_| b.next_delay()).collect::<Vec<_>>();
        assert_eq!(
            delays(Backoff::with_seed(POLICY, 42)),
            delays(Backoff::with_seed(POLICY, 42))
        );
        assert_ne!(
            delays(Backoff::new(POLICY)),
            delays(Backoff::new(POLICY)),
            "two agents do not come back in lockstep"
        );
    }
}
