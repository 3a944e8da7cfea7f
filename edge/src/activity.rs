//! When traffic last crossed a devbox's tunnel, for tunnels with `http_keep_alive`: the
//! platform reads it as `last_activity_ms` in the admin API and hears of it in batched
//! `devbox.activity` events, so a devbox in use through its URL is not suspended under its
//! user.
//!
//! Kept as cheaply as the hot path allows: one atomic per devbox, written with a relaxed store
//! of the wall clock (read once) when a request is admitted and as a response body, a
//! WebSocket or a raw TCP connection moves bytes. Nothing is written to the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::platform;
use crate::registry::Registry;
use crate::store::now_unix_ms;

/// A devbox's last activity, shared by its route and every request on it.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<AtomicI64>);

impl Activity {
    /// Traffic crossed the tunnel now.
    pub fn touch(&self) {
        self.0.store(now_unix_ms(), Ordering::Relaxed);
    }

    /// When traffic last crossed it, Unix milliseconds; `None` before any.
    pub fn last_ms(&self) -> Option<i64> {
        let ms = self.0.load(Ordering::Relaxed);
        (ms > 0).then_some(ms)
    }
}

/// Touches `activity`, when there is one (a tunnel with `http_keep_alive`).
pub fn touch(activity: Option<&Activity>) {
    if let Some(activity) = activity {
        activity.touch();
    }
}

/// Sends `devbox.activity` events through the registry's events every `every` until
/// `shutdown` (see [`report`]).
pub fn spawn_reports(
    registry: &Arc<Registry>,
    every: std::time::Duration,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let weak = Arc::downgrade(registry);
    let events = registry.events().clone();
    tasks.spawn(
        shutdown.run_until_cancelled_owned(report(weak, every, move |moved| {
            let devboxes = moved
                .into_iter()
                .map(|(id, ms)| platform::Activity {
                    id,
                    last_activity_ms: u64::try_from(ms).unwrap_or(0),
                })
                .collect();
            events.emit(platform::Event::activity(devboxes));
        })),
    );
}

/// Reports activity every `interval` until the registry is gone: the devboxes whose traffic
/// moved since the last report, with when it last did, all in one `report` call (the
/// `devbox.activity` event), so each devbox is reported at most once an interval however busy
/// it is, and a quiet one not at all.
pub async fn report(
    registry: std::sync::Weak<Registry>,
    interval: std::time::Duration,
    report: impl Fn(Vec<(String, i64)>),
) {
    let mut reported: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let now = registry.activities();
        drop(registry);
        let moved = moved_since(&mut reported, now);
        if !moved.is_empty() {
            report(moved);
        }
    }
}

/// The entries of `now` later than what `reported` holds for them, which `reported` then
/// holds; devboxes gone from `now` are forgotten.
fn moved_since(
    reported: &mut std::collections::HashMap<String, i64>,
    now: Vec<(String, i64)>,
) -> Vec<(String, i64)> {
    let mut moved = Vec::new();
    let mut next = std::collections::HashMap::with_capacity(now.len());
    for (id, last) in now {
        if reported.get(&id).is_none_or(|&before| last > before) {
            moved.push((id.clone(), last));
        }
        next.insert(id, last);
    }
    *reported = next;
    moved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_touch_is_seen_by_every_clone() {
        let activity = Activity::default();
        assert_eq!(activity.last_ms(), None);
        let shared = activity.clone();
        let before = now_unix_ms();
        shared.touch();
        let last = activity.last_ms().expect("touched");
        assert!(last >= before && last <= now_unix_ms());
    }

    #[test]
    fn each_devbox_is_reported_once_per_move() {
        let mut reported = std::collections::HashMap::new();
        let at = |pairs: &[(&str, i64)]| -> Vec<(String, i64)> {
            pairs.iter().map(|(id, t)| ((*id).to_owned(), *t)).collect()
        };
        assert_eq!(
            moved_since(&mut reported, at(&[("a", 1), ("b", 2)])),
            at(&[("a", 1), ("b", 2)])
        );
        assert_eq!(
            moved_since(&mut reported, at(&[("a", 1), ("b", 5)])),
            at(&[("b", 5)])
        );
        assert_eq!(
            moved_since(&mut reported, at(&[("a", 1), ("b", 5)])),
            at(&[])
        );
        assert_eq!(
            moved_since(&mut reported, at(&[("b", 5)])),
            at(&[]),
            "a is gone"
        );
        assert_eq!(
            moved_since(&mut reported, at(&[("a", 9), ("b", 5)])),
            at(&[("a", 9)])
        );
    }
}
