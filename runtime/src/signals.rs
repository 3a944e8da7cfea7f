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
pub fn runtime(program: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{program}: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}
