//! The entrypoint sidecar: `burrow-agent [options] -- CMD ARGS...` runs the devbox's entrypoint
//! and the tunnel side by side, and acts as the entrypoint's init.
//!
//! ```text
//!   start:    signal streams installed -> CMD spawned -> agent spawned (the tunnel comes up now)
//!   SIGTERM, SIGINT ----------------------> forwarded to CMD (or its group), the tunnel drains
//!   SIGHUP, SIGQUIT, SIGUSR1/2, SIGWINCH -> forwarded
//!   SIGCHLD ------------------------------> waitpid(-1, WNOHANG) until nothing is left: CMD's
//!                                           status is kept, orphans are just collected
//!   CMD exits ----------------------------> the tunnel drains (bounded), exit with CMD's code
//!                                           (128+N for signal N); with keep_running the
//!                                           tunnel stays up until SIGTERM or SIGINT
//! ```
//!
//! CMD is started with [`std::process::Command`], not `tokio::process`: tokio reaps its own
//! children, and a `waitpid(-1)` reaper next to it would steal their statuses (or tokio
//! ours). Here one loop owns every `waitpid`. Order matters twice: the SIGCHLD and forwarded
//! signal streams exist before CMD is spawned, so no exit and no signal is missed, and nothing
//! reaps until `spawn` has returned, because std collects a child whose `exec` failed itself.
//!
//! Not PID 1, the agent makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`), so orphans
//! of CMD's tree come to it rather than to the host's init. This module installs the binary's
//! signal handlers in sidecar mode; only [`crate::cli`] calls it.

use std::ffi::OsString;
use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::{Agent, tls};
use burrow_runtime::sources::{self, ConfigError, Kind, Setting};

/// The signals passed on to the entrypoint. SIGTERM and SIGINT also drain the tunnel.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Time the tunnel gets, on top of `drain_grace`, to finish after the entrypoint exited.
const DRAIN_MARGIN: Duration = Duration::from_secs(2);

/// The sidecar's settings: flags next to the entrypoint, `BURROW_*` variables, or the
/// `[entrypoint]` table of the config file.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "entrypoint.keep_running",
        env: "BURROW_KEEP_RUNNING",
        kind: Kind::Bool,
    },
    Setting {
        key: "entrypoint.signal_group",
        env: "BURROW_SIGNAL_GROUP",
        kind: Kind::Bool,
    },
];

/// The entrypoint and how to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entrypoint {
    /// The program, looked up in `PATH` unless it holds a `/`.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Keep the tunnel up after the entrypoint exits, until SIGTERM or SIGINT.
    pub keep_running: bool,
    /// Run the entrypoint in a process group of its own and signal the whole group.
    pub signal_group: bool,
}

impl Entrypoint {
    /// The entrypoint `command` (program first; `None` if empty) with the settings from the
    /// environment and flags (`("keep_running", "true")`), flags winning.
    pub fn load(
        command: Vec<OsString>,
        file: Option<sources::File<'_>>,
        env: &std::collections::HashMap<String, String>,
        flags: &[(&'static str, String)],
    ) -> Result<Option<Entrypoint>, ConfigError> {
        let mut command = command.into_iter();
        // Without an entrypoint the settings are not read: the agent runs as it always did.
        let Some(program) = command.next() else {
            return Ok(None);
        };
        let table = sources::layer(SETTINGS, file, env, flags)?;
        let section = table.get("entrypoint").and_then(toml::Value::as_table);
        let flag = |key: &'static str| -> Result<bool, ConfigError> {
            match section.and_then(|t| t.get(key)) {
                None => Ok(false),
                Some(toml::Value::Boolean(b)) => Ok(*b),
                Some(other) => Err(ConfigError::Invalid {
                    key: if key == "keep_running" {
                        "entrypoint.keep_running"
                    } else {
                        "entrypoint.signal_group"
                    },
                    message: format!("`{other}` is not true or false"),
                }),
            }
        };
        Ok(Some(Entrypoint {
            program,
            args: command.collect(),
            keep_running: flag("keep_running")?,
            signal_group: flag("signal_group")?,
        }))
    }

    /// The program's name, for messages.
    fn name(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }

    /// Starts the entrypoint: this process's environment without systemd's notify variables
    /// (the readiness socket and watchdog are the agent's, not the entrypoint's) and without
    /// the agent token (a secret the user's processes have no use for), its working
    /// directory, and its stdin, stdout and stderr.
    fn spawn(&self) -> Result<Pid, SidecarError> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args);
        for var in burrow_runtime::notify::INHERITED_VARS {
            cmd.env_remove(var);
        }
        cmd.env_remove(crate::config::TOKEN_ENV);
        if self.signal_group {
            cmd.process_group(0);
        }
        let command = self.name();
        // The handle is dropped without `wait`: `reap` collects the child with waitpid(-1).
        let child = cmd.spawn().map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => SidecarError::NotFound { command },
            std::io::ErrorKind::PermissionDenied => SidecarError::NotExecutable { command },
            _ => SidecarError::Spawn { command, source },
        })?;
        // Linux pids are below 2^22, so they fit an i32.
        Ok(Pid::from_raw(child.id() as i32))
    }
}

/// Why the sidecar could not run its entrypoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    /// The program is not there or not on `PATH`.
    #[error("cannot start the entrypoint `{command}`: command not found")]
    NotFound {
        /// The program.
        command: String,
    },
    /// The program may not be executed.
    #[error("cannot start the entrypoint `{command}`: permission denied (is it executable?)")]
    NotExecutable {
        /// The program.
        command: String,
    },
    /// The program could not be started for another reason.
    #[error("cannot start the entrypoint `{command}`: {source}")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot handle {signal}: {source}")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The agent's TLS settings cannot work.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl SidecarError {
    /// The exit code: 127 and 126 like shells for a command that cannot run, 2 for a bad
    /// configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            SidecarError::NotFound { .. } => 127,
            SidecarError::NotExecutable { .. } | SidecarError::Spawn { .. } => 126,
            SidecarError::Tls(tls::TlsError::Ca { .. } | tls::TlsError::NoSystemRoots) => 2,
            SidecarError::Signal { .. } | SidecarError::Tls(_) => 1,
        }
    }
}

/// How the entrypoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

impl Exit {
    /// The agent's exit code for it: the code itself, or 128+N for signal N.
    pub fn code(self) -> u8 {
        match self {
            // waitpid reports the low 8 bits of the status only.
            Exit::Code(code) => code as u8,
            Exit::Signal(signal) => 128u8.saturating_add(signal as u8),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(signal) => write!(f, "killed by {}", signal.as_str()),
        }
    }
}

/// Runs the entrypoint and the agent until the entrypoint exits (or, with `keep_running`,
/// until SIGTERM or SIGINT after that); the agent's exit code, which is the entrypoint's.
pub async fn run(
    config: Config,
    entrypoint: Entrypoint,
    notifier: Option<burrow_runtime::notify::Notifier>,
) -> Result<u8, SidecarError> {
    // A configuration that cannot work fails before the entrypoint starts.
    tls::client_config(config.ca.as_deref(), &config.liveness, config.max_streams)?;
    let mut init = Init::start(&entrypoint)?;
    let shutdown = CancellationToken::new();
    let grace = config.drain_grace + DRAIN_MARGIN;
    let agent = Agent::spawn(config, shutdown.clone());
    let notify = notifier.map(|notifier| {
        notifier.ready();
        tokio::spawn(burrow_runtime::notify::run(
            notifier,
            agent.status.clone(),
            crate::status::status_line,
            shutdown.clone(),
        ))
    });
    let mut agent = agent.task;
    let mut agent_done = false;
    let mut exited = None;
    let exit = loop {
        tokio::select! {
            signal = init.signals.recv() => {
                if exited.is_none() {
                    init.forward(signal);
                }
                if matches!(signal, Signal::SIGTERM | Signal::SIGINT) && !shutdown.is_cancelled() {
                    info!(signal = signal.as_str(), "stopping: draining the tunnel while the entrypoint stops");
                    shutdown.cancel();
                }
                if let Some(exit) = exited.filter(|_| shutdown.is_cancelled()) {
                    break exit;
                }
            }
            Some(()) = init.sigchld.recv() => {
                let Some(exit) = init.reap() else { continue };
                if entrypoint.keep_running && !shutdown.is_cancelled() {
                    info!(pid = init.child.as_raw(), status = %exit, "the entrypoint exited; keep_running: the tunnel stays up until SIGTERM");
                    exited = Some(exit);
                } else {
                    info!(pid = init.child.as_raw(), status = %exit, "the entrypoint exited; draining the tunnel");
                    break exit;
                }
            }
            ended = &mut agent, if !agent_done => {
                agent_done = true;
                match ended {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => error!(error = %e, "the tunnel stopped"),
                    Err(e) => error!(error = %e, "the tunnel failed"),
                }
                if let Some(exit) = exited {
                    break exit;
                }
            }
        }
    };
    shutdown.cancel();
    if let Some(notify) = notify {
        let _ = notify.await;
    }
    if !agent_done {
        init.drain(agent, grace).await;
    }
    Ok(exit.code())
}

/// The init side of the sidecar: the entrypoint's pid, the signal streams, the reaper.
struct Init {
    child: Pid,
    signal_group: bool,
    sigchld: SignalStream,
    signals: Signals,
}

impl Init {
    /// Installs the signal streams, becomes a subreaper, then spawns the entrypoint.
    fn start(entrypoint: &Entrypoint) -> Result<Init, SidecarError> {
        let sigchld = signal(SignalKind::child()).map_err(|source| SidecarError::Signal {
            signal: "SIGCHLD",
            source,
        })?;
        let signals = Signals::install()?;
        if std::process::id() != 1 {
            if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
                warn!(error = %e, "cannot become a child subreaper; orphans of the entrypoint go to init");
            }
        }
        let child = entrypoint.spawn()?;
        info!(command = %entrypoint.name(), pid = child.as_raw(), "started the entrypoint");
        Ok(Init {
            child,
            signal_group: entrypoint.signal_group,
            sigchld,
            signals,
        })
    }

    /// Passes `signal` on to the entrypoint, or to its process group.
    fn forward(&self, signal: Signal) {
        let sent = if self.signal_group {
            killpg(self.child, signal)
        } else {
            kill(self.child, signal)
        };
        match sent {
            Ok(()) => debug!(
                signal = signal.as_str(),
                pid = self.child.as_raw(),
                "forwarded"
            ),
            Err(Errno::ESRCH) => debug!(signal = signal.as_str(), "the entrypoint is gone"),
            Err(e) => warn!(signal = signal.as_str(), error = %e, "cannot forward the signal"),
        }
    }

    /// Collects every child that has exited; the entrypoint's status if it was among them.
    fn reap(&self) -> Option<Exit> {
        let mut found = None;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == self.child => {
                    found = Some(Exit::Code(code));
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == self.child => {
                    found = Some(Exit::Signal(signal));
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return found,
                Ok(other) => debug!(pid = ?other.pid(), "reaped an orphaned process"),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "waitpid failed");
                    return found;
                }
            }
        }
    }

    /// Waits up to `grace` for the agent to finish draining, still reaping orphans; SIGTERM
    /// or SIGINT ends the wait at once.
    async fn drain(
        &mut self,
        mut agent: tokio::task::JoinHandle<Result<(), tls::TlsError>>,
        grace: Duration,
    ) {
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut agent => return,
                Some(()) = self.sigchld.recv() => { self.reap(); }
                signal = self.signals.recv() => {
                    if matches!(signal, Signal::SIGTERM | Signal::SIGINT) {
                        warn!(signal = signal.as_str(), "exiting without waiting for the tunnel to drain");
                        break;
                    }
                }
                () = &mut deadline => {
                    warn!(?grace, "the tunnel did not finish draining in time; exiting");
                    break;
                }
            }
        }
        agent.abort();
    }
}

/// A stream per forwarded signal, read as one.
struct Signals {
    streams: Vec<(Signal, SignalStream)>,
}

impl Signals {
    fn install() -> Result<Signals, SidecarError> {
        let streams = FORWARDED
            .iter()
            .map(|&sig| {
                signal(SignalKind::from_raw(sig as i32))
                    .map(|stream| (sig, stream))
                    .map_err(|source| SidecarError::Signal {
                        signal: sig.as_str(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Signals { streams })
    }

    /// The next signal received, of any kind.
    async fn recv(&mut self) -> Signal {
        poll_fn(|cx| {
            for (sig, stream) in &mut self.streams {
                // `None` only when the runtime shuts down; then nothing is pending either.
                if let Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return Poll::Ready(*sig);
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Exit::Code(0).code(), 0);
        assert_eq!(Exit::Code(3).code(), 3);
        assert_eq!(Exit::Signal(Signal::SIGKILL).code(), 137);
        assert_eq!(Exit::Signal(Signal::SIGTERM).code(), 143);
        let not_found = SidecarError::NotFound {
            command: "x".into(),
        };
        assert_eq!(not_found.exit_code(), 127);
        assert!(not_found.to_string().contains("`x`"));
    }

    #[test]
    fn loads_command_and_settings() {
        // Without a command the settings are not even read.
        let env = HashMap::from([("BURROW_KEEP_RUNNING".to_owned(), "maybe".to_owned())]);
        let none = Entrypoint::load(Vec::new(), None, &env, &[]).unwrap();
        assert_eq!(none, None);

        let env = HashMap::from([("BURROW_KEEP_RUNNING".to_owned(), "yes".to_owned())]);
        let flags = [("entrypoint.signal_group", "true".to_owned())];
        let ep = Entrypoint::load(os(&["python3", "-m", "http.server"]), None, &env, &flags)
            .unwrap()
            .unwrap();
        assert_eq!(ep.program, "python3");
        assert_eq!(ep.args, os(&["-m", "http.server"]));
        assert!(ep.keep_running && ep.signal_group);

        let env = HashMap::from([("BURROW_KEEP_RUNNING".to_owned(), "maybe".to_owned())]);
        let err = Entrypoint::load(os(&["sh"]), None, &env, &[]).unwrap_err();
        assert!(err.to_string().contains("BURROW_KEEP_RUNNING"), "{err}");
    }
}
