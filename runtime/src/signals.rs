//! What a binary's `main` sets up before anything else: the tokio runtime, and the shutdown
//! signals (SIGTERM and SIGINT), installed before the process says it is up. A failure of either
//! is reported with the program's name and becomes exit code 1.

use std::process::ExitCode;

/// SIGTERM and SIGINT, caught from the moment [`ShutdownSignals::install`] returns.
///
/// Install it before telling anyone (systemd, a test, a supervisor) that the process is up: a
/// signal that comes before the handler exists takes the default action and kills the process
/// without draining or saying `STOPPING=1`.
#[derive(Debug)]
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers; must run inside a tokio runtime.
    pub fn install() -> std::io::Result<ShutdownSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// [`ShutdownSignals::install`], or the message `{program}: cannot handle SIGTERM and
    /// SIGINT: ...` on stderr and exit code 1.
    pub fn install_or_exit(program: &str) -> Result<ShutdownSignals, ExitCode> {
        Self::install().map_err(|e| {
            eprintln!("{program}: cannot handle SIGTERM and SIGINT: {e}");
            ExitCode::from(1)
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// A multi-threaded tokio runtime with I/O and timers, or the message `{program}: cannot start
/// the runtime: ...` on stderr and exit code 1.
///
/// Its worker threads are half the CPUs, at least one (tokio's default is one per CPU);
/// `TOKIO_WORKER_THREADS` sets them. The edge's work per request is short and hops between a
/// few tasks (the public connection, the QUIC connection's driver, the endpoint's receiver):
/// every hop to an idle worker is a futex wake and a context switch, and the kernel's own
/// network work (loopback and UDP softirqs, the clients') wants the cores too. `bench --quick`
/// on 2 cores, 1 worker against 2, two runs each (issue 15): keep-alive 29.6k / 35.4k against
/// 27.1k / 25.3k req/s, download 555 / 456 against 364 / 388 MB/s at 2.9-3.2 against 3.9-4.1
/// CPU-s a GiB, p50 at 1,000 req/s 369 / 281 against 378 / 329 µs.
pub fn runtime(program: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(default_workers());
    }
    builder.enable_all().build().map_err(|e| {
        eprintln!("{program}: cannot start the runtime: {e}");
        ExitCode::from(1)
    })
}

/// Half the CPUs this process may use, at least one.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
