//! A test's child processes: killed and reaped when dropped, so a failing test leaves no
//! orphan holding a port or the test harness's output pipe; signalled; waited for within a
//! bound; and their output collected line by line, for a test to wait on a line (a log line
//! that reports a bound port, a reload, a shutdown) instead of sleeping.
//!
//! - [`ChildGuard`]: a `std::process::Child`, for tests without a runtime.
//! - [`AsyncChildGuard`]: a `tokio::process::Child`.
//! - [`Lines`]: what the pipes of either said so far, with waits on a line.

use std::io::{BufRead, BufReader, Read};
use std::ops::{Deref, DerefMut};
use std::process::ExitStatus;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead};

pub use nix::sys::signal::Signal;

/// How often a blocking wait for an exit looks again: `std::process::Child` offers no wait
/// with a timeout.
const POLL: Duration = Duration::from_millis(10);

/// How long a dropped, killed child gets to be reaped.
const REAP: Duration = Duration::from_secs(5);

/// A child process, killed (SIGKILL) and reaped when dropped unless it has exited already.
#[derive(Debug)]
pub struct ChildGuard {
    child: std::process::Child,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd`; panics naming the program if it cannot start.
    pub fn spawn(cmd: &mut std::process::Command) -> ChildGuard {
        let name = program_name(cmd.get_program());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name} cannot start: {e}"));
        ChildGuard { child, name }
    }

    /// Sends `signal`; panics if the child has exited (and been reaped) already.
    pub fn signal(&mut self, signal: Signal) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "{} has exited: no {signal} for it",
            self.name
        );
        send(self.child.id(), signal, &self.name);
    }

    /// Waits up to `within` for the child to exit; kills it and panics if it does not.
    pub fn wait_within(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within {within:?}", self.name);
            }
            std::thread::sleep(POLL);
        }
    }
}

impl From<std::process::Child> for ChildGuard {
    /// Guards a child the caller spawned (with a message of its own should that fail).
    fn from(child: std::process::Child) -> ChildGuard {
        let name = format!("child process {}", child.id());
        ChildGuard { child, name }
    }
}

impl Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A tokio child process, killed (SIGKILL) and reaped when dropped unless it has exited.
#[derive(Debug)]
pub struct AsyncChildGuard {
    child: tokio::process::Child,
    pid: u32,
    name: String,
}

impl AsyncChildGuard {
    /// Spawns `cmd`; panics naming the program if it cannot start.
    pub fn spawn(cmd: &mut tokio::process::Command) -> AsyncChildGuard {
        let name = program_name(cmd.as_std().get_program());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name} cannot start: {e}"));
        let pid = child.id().expect("a child that just started has a pid");
        AsyncChildGuard { child, pid, name }
    }

    /// Its pid (also after it has exited).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal`; panics if the child has exited (and been reaped) already.
    pub fn signal(&mut self, signal: Signal) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "{} has exited: no {signal} for it",
            self.name
        );
        send(self.pid, signal, &self.name);
    }

    /// Waits up to `within` for the child to exit; panics (and the drop kills it) if it does
    /// not.
    pub async fn wait_within(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for {}: {e}", self.name)),
            Err(_) => panic!("{} did not exit within {within:?}", self.name),
        }
    }
}

impl From<tokio::process::Child> for AsyncChildGuard {
    /// Guards a child the caller spawned (with a message of its own should that fail).
    fn from(child: tokio::process::Child) -> AsyncChildGuard {
        let pid = child
            .id()
            .expect("a child that was not waited for has a pid");
        let name = format!("child process {pid}");
        AsyncChildGuard { child, pid, name }
    }
}

impl Deref for AsyncChildGuard {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl DerefMut for AsyncChildGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

impl Drop for AsyncChildGuard {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = self.child.start_kill();
        // Reaped here rather than by tokio's orphan queue, so the process is gone when the
        // guard is: a SIGKILLed process exits at once.
        let deadline = Instant::now() + REAP;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn send(pid: u32, signal: Signal, name: &str) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("a pid fits in an i32"));
    nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to {name}: {e}"));
}

fn program_name(program: &std::ffi::OsStr) -> String {
    let path = std::path::Path::new(program);
    path.file_name()
        .unwrap_or(program)
        .to_string_lossy()
        .into_owned()
}

/// The lines a child printed on the pipes given to [`Lines::read`] (a thread each) or
/// [`Lines::read_async`] (a task each), in the order they came. Clones share the lines.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Blocking waiters.
    changed: Condvar,
    /// Async waiters.
    notify: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<String>,
    /// Pipes still being read.
    open: usize,
}

impl Lines {
    /// An empty collection; add pipes with [`Lines::read`] or [`Lines::read_async`].
    pub fn new() -> Lines {
        Lines::default()
    }

    /// Reads `pipe` line by line on a thread of its own, until it ends.
    pub fn read(&self, pipe: impl Read + Send + 'static) -> &Lines {
        self.shared.opened();
        let shared = self.shared.clone();
        std::thread::spawn(move || {
            let mut pipe = BufReader::new(pipe);
            let mut line = Vec::new();
            while pipe.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                shared.push(&line);
                line.clear();
            }
            shared.closed();
        });
        self
    }

    /// Reads `pipe` line by line on a task of its own (on the current tokio runtime).
    pub fn read_async(&self, pipe: impl AsyncRead + Unpin + Send + 'static) -> &Lines {
        self.shared.opened();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut pipe = tokio::io::BufReader::new(pipe);
            let mut line = Vec::new();
            while pipe.read_until(b'\n', &mut line).await.is_ok_and(|n| n > 0) {
                shared.push(&line);
                line.clear();
            }
            shared.closed();
        });
        self
    }

    /// Everything so far, each line with its newline.
    pub fn text(&self) -> String {
        joined(&self.shared.lock().lines)
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.shared.lock().lines.len()
    }

    /// Whether nothing was printed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first line containing `needle`, among the lines from index `from` on.
    pub fn find(&self, needle: &str, from: usize) -> Option<String> {
        find(&self.shared.lock(), needle, from)
    }

    /// Blocks until a line containing `needle` has come (the first such line), for up to
    /// `within`; panics with everything printed if none comes or every pipe ends first.
    pub fn wait_for(&self, needle: &str, within: Duration) -> String {
        self.wait_for_from(needle, 0, within)
    }

    /// [`Lines::wait_for`] among the lines from index `from` on.
    pub fn wait_for_from(&self, needle: &str, from: usize, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut state = self.shared.lock();
        loop {
            if let Some(line) = find(&state, needle, from) {
                return line;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.open == 0 || left.is_zero() {
                let why = if state.open == 0 {
                    "before its output ended"
                } else {
                    "in time"
                };
                panic!(
                    "no line with `{needle}` {why} ({within:?}); the output:\n{}",
                    joined(&state.lines)
                );
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .map(|(state, _)| state)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// [`Lines::wait_for`] without blocking the runtime.
    pub async fn wait_for_async(&self, needle: &str, within: Duration) -> String {
        self.wait_for_from_async(needle, 0, within).await
    }

    /// [`Lines::wait_for_from`] without blocking the runtime.
    pub async fn wait_for_from_async(&self, needle: &str, from: usize, within: Duration) -> String {
        let what = format!("a line with `{needle}`");
        self.wait_async(&what, within, |state| find(state, needle, from))
            .await
    }

    /// Waits up to `within` until `count` lines contain `needle`; panics with everything
    /// printed if they do not.
    pub async fn wait_count_async(&self, needle: &str, count: usize, within: Duration) {
        let what = format!("{count} lines with `{needle}`");
        self.wait_async(&what, within, |state| {
            let seen = state.lines.iter().filter(|l| l.contains(needle)).count();
            (seen >= count).then_some(())
        })
        .await;
    }

    /// Everything, once every pipe has ended (the process and whatever shared its pipes have
    /// exited), within `within`.
    pub async fn ended_async(&self, within: Duration) -> String {
        self.wait_async("the end of the output", within, |state| {
            (state.open == 0).then(|| joined(&state.lines))
        })
        .await
    }

    /// Waits up to `within` until `check` finds something in the lines; panics naming `what`
    /// with everything printed if the time runs out or every pipe ends first.
    async fn wait_async<T>(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&State) -> Option<T>,
    ) -> T {
        let found = tokio::time::timeout(within, async {
            loop {
                let notified = self.shared.notify.notified();
                tokio::pin!(notified);
                // Registered before the look, so a line pushed in between wakes it.
                notified.as_mut().enable();
                {
                    let state = self.shared.lock();
                    if let Some(found) = check(&state) {
                        return Some(found);
                    }
                    if state.open == 0 {
                        return None;
                    }
                }
                notified.await;
            }
        })
        .await;
        match found {
            Ok(Some(found)) => found,
            Ok(None) => panic!(
                "no {what} before the output ended; the output:\n{}",
                self.text()
            ),
            Err(_) => panic!("no {what} within {within:?}; the output:\n{}", self.text()),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A reader thread never panics while holding the lock; a poisoned one still holds
        // every line pushed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn opened(&self) {
        self.lock().open += 1;
    }

    /// Adds a line as read (with its newline, if any; not necessarily UTF-8).
    fn push(&self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        self.lock()
            .lines
            .push(String::from_utf8_lossy(line).into_owned());
        self.wake();
    }

    fn closed(&self) {
        self.lock().open -= 1;
        self.wake();
    }

    fn wake(&self) {
        self.changed.notify_all();
        self.notify.notify_waiters();
    }
}

/// Each line with its newline.
fn joined(lines: &[String]) -> String {
    lines
        .iter()
        .flat_map(|line| [line.as_str(), "\n"])
        .collect()
}

fn find(state: &State, needle: &str, from: usize) -> Option<String> {
    state
        .lines
        .iter()
        .skip(from)
        .find(|l| l.contains(needle))
        .cloned()
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn a_dropped_guard_kills_and_reaps_its_child() {
        let mut child = ChildGuard::spawn(Command::new("sleep").arg("600"));
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let stdout = child.stdout.take();
        assert!(stdout.is_none());
        drop(child);
        // Reaped: the pid names no process (not even a zombie) any more.
        assert!(nix::sys::signal::kill(pid, None).is_err());
    }

    #[test]
    fn lines_wait_for_a_line_and_fail_when_the_output_ends() {
        let mut child = ChildGuard::spawn(
            Command::new("sh")
                .args(["-c", "echo one; echo 'listening on 127.0.0.1:4242'"])
                .stdout(Stdio::piped()),
        );
        let lines = Lines::new();
        lines.read(child.stdout.take().expect("piped"));
        let line = lines.wait_for("listening on", Duration::from_secs(20));
        assert_eq!(line, "listening on 127.0.0.1:4242");
        assert!(child.wait_within(Duration::from_secs(20)).success());
        let missing = std::panic::catch_unwind(|| lines.wait_for("never", Duration::from_secs(20)));
        assert!(missing.is_err(), "ended output fails the wait at once");
    }

    #[tokio::test]
    async fn lines_wait_without_blocking_the_runtime() {
        let mut child = AsyncChildGuard::spawn(
            tokio::process::Command::new("sh")
                .args(["-c", "echo ready >&2"])
                .stderr(Stdio::piped()),
        );
        let lines = Lines::new();
        lines.read_async(child.stderr.take().expect("piped"));
        assert_eq!(
            lines.wait_for_async("ready", Duration::from_secs(20)).await,
            "ready"
        );
        assert!(child.wait_within(Duration::from_secs(20)).await.success());
    }
}
