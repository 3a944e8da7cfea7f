//! The tasks the edge starts for one client each, beyond its accept loops: client connections
//! and the upgraded connections (WebSockets, raw TCP) that outlive their request. They are
//! tracked so that [`Edge::stop`](crate::server::Edge::stop) returns only once every one is
//! gone, and cut off when the drain grace is over instead of running on behind a stopped edge.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Client tasks: spawned here, cut off together, waited for together.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    cutoff: CancellationToken,
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` until it ends or the tasks are cut off (it is dropped then, with whatever
    /// connection it holds).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let cutoff = self.cutoff.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = cutoff.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// Drops every task still running, and those spawned later at once; returns when all are
    /// gone.
    pub async fn cut_off(&self) {
        self.cutoff.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Whether none is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cut_off_drops_running_tasks_and_waits_for_them() {
        let tasks = Tasks::new();
        let (held, mut dropped) = tokio::sync::mpsc::channel::<()>(1);
        tasks.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        tasks.spawn(async {});
        tasks.cut_off().await;
        assert!(tasks.is_empty());
        assert_eq!(dropped.recv().await, None, "the running task was dropped");
        // Spawned after the cut-off: dropped before it runs.
        let (late, mut late_dropped) = tokio::sync::mpsc::channel::<()>(1);
        tasks.spawn(async move {
            let _late = late;
            std::future::pending::<()>().await;
        });
        assert_eq!(late_dropped.recv().await, None);
    }
}
