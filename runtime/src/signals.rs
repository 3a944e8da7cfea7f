//! Shutdown signals for the binaries' `main`: SIGTERM and SIGINT, installed before the process
//! says it is up.

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

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
