//! systemd's notify protocol (`sd_notify(3)`), spoken directly: one datagram per message to the
//! socket in `$NOTIFY_SOCKET`, a filesystem path or, with a leading `@`, a name in Linux's
//! abstract namespace. Both binaries use it: `READY=1` once the config is loaded and the listeners
//! are bound, `STATUS=` kept current, `WATCHDOG=1` from a tokio task, `STOPPING=1` at shutdown.
//!
//! The watchdog ping proves that the runtime still schedules tasks, not that the edge is
//! reachable: an outage of the edge must never make systemd kill a healthy agent. Every send is
//! best effort and non-blocking; a supervisor that is gone or slow costs a log line, not a stall.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Variables a child process must not inherit: a child that finds `NOTIFY_SOCKET` could tell
/// systemd it is ready, or stopping, on the agent's behalf. Remove them from the sidecar's
/// command (`cmd.env_remove(var)` for each).
pub const INHERITED_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// The least time between two `STATUS=` lines: the stream count changes with every request, and
/// each line wakes PID 1. Changes in between are folded into the next line.
const STATUS_MIN_GAP: Duration = Duration::from_secs(1);

/// A handle on the service manager's notify socket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Arc<UnixDatagram>,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, or `None` when the process does not run under a
    /// service manager that listens (or the variable is unusable: that is logged).
    ///
    /// `$WATCHDOG_USEC` enables the watchdog, unless `$WATCHDOG_PID` names another process (the
    /// variables were inherited from a parent that is the one being watched).
    pub fn from_env(env: &HashMap<String, String>) -> Option<Notifier> {
        let path = env.get("NOTIFY_SOCKET").filter(|p| !p.is_empty())?;
        let addr = match socket_addr(path) {
            Ok(addr) => addr,
            Err(e) => {
                warn!(notify_socket = %path, error = %e, "ignoring NOTIFY_SOCKET");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(socket) => socket,
            Err(e) => {
                warn!(error = %e, "cannot create a socket for systemd notifications");
                return None;
            }
        };
        Some(Notifier {
            socket: Arc::new(socket),
            addr,
            watchdog: watchdog_timeout(env),
        })
    }

    /// Tells the manager that start-up is done: config loaded, listeners bound.
    pub fn ready(&self) {
        self.send_logged("READY=1");
    }

    /// Sets the one-line status `systemctl status` shows. Line breaks become spaces.
    pub fn status(&self, line: &str) {
        self.send_logged(&format!("STATUS={}", line.replace(['\n', '\r'], " ")));
    }

    /// Tells the manager that shutdown has begun (draining under the grace timeout).
    pub fn stopping(&self) {
        self.send_logged("STOPPING=1");
    }

    /// Pets the watchdog. Sent only from a task on the runtime; see [`run`].
    pub fn watchdog(&self) {
        self.send_logged("WATCHDOG=1");
    }

    /// How often to pet the watchdog: half of `$WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
    /// advises. `None` when the watchdog is off for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Sends one message (`KEY=value` lines) as one datagram.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(drop)
    }

    fn send_logged(&self, message: &str) {
        match self.send(message) {
            Ok(()) => debug!(message, "sent to systemd"),
            Err(e) => warn!(message, error = %e, "cannot notify systemd"),
        }
    }
}

/// A notifier task that reports a status: `STATUS=` with `line(status)` whenever that line
/// changes (at most one a [`STATUS_MIN_GAP`]), `WATCHDOG=1` every
/// [`Notifier::watchdog_interval`] whatever the status says, and `STOPPING=1` once `shutdown`
/// fires, after which it returns. The agent runs it with its connection status.
///
/// Call [`Notifier::ready`] before spawning it.
pub async fn run<S>(
    notifier: Notifier,
    mut status: watch::Receiver<S>,
    line: fn(&S) -> String,
    shutdown: CancellationToken,
) {
    let mut watchdog = watchdog_timer(&notifier);
    let mut sent = line(&status.borrow_and_update());
    notifier.status(&sent);
    let mut last_sent = Instant::now();
    let mut pending = false;
    // After the agent's task ends (its sender dropped) only the watchdog is left to serve.
    let mut watching = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tick(&mut watchdog) => notifier.watchdog(),
            changed = status.changed(), if watching => match changed {
                Ok(()) => {
                    // Seen now, so `changed` waits for the next change; the line is built
                    // from the newest value when it is due.
                    status.borrow_and_update();
                    pending = true;
                }
                Err(_) => watching = false,
            },
            () = tokio::time::sleep_until(last_sent + STATUS_MIN_GAP), if pending => {}
        }
        if pending && last_sent.elapsed() >= STATUS_MIN_GAP {
            pending = false;
            let next = line(&status.borrow());
            if next != sent {
                notifier.status(&next);
                sent = next;
                last_sent = Instant::now();
            }
        }
    }
    notifier.stopping();
}

/// A notifier task without a status (the edge's): `WATCHDOG=1` every [`Notifier::watchdog_interval`], and
/// `STOPPING=1` once `shutdown` fires, after which it returns.
///
/// Call [`Notifier::ready`] before spawning it.
pub async fn keepalive(notifier: Notifier, shutdown: CancellationToken) {
    let mut watchdog = watchdog_timer(&notifier);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tick(&mut watchdog) => notifier.watchdog(),
        }
    }
    notifier.stopping();
}

/// `$NOTIFY_SOCKET` as an address: an absolute path, or `@name` in the abstract namespace.
fn socket_addr(path: &str) -> io::Result<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        return abstract_addr(name);
    }
    if path.starts_with('/') {
        return SocketAddr::from_pathname(path);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "neither an absolute path nor an abstract socket (@name)",
    ))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &str) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &str) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist on Linux only",
    ))
}

/// `$WATCHDOG_USEC`, when set, positive, and meant for this process.
fn watchdog_timeout(env: &HashMap<String, String>) -> Option<Duration> {
    let usec: u64 = env.get("WATCHDOG_USEC")?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = env.get("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            debug!(watchdog_pid = %pid, "WATCHDOG_PID names another process; watchdog off");
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

fn watchdog_timer(notifier: &Notifier) -> Option<tokio::time::Interval> {
    notifier.watchdog_interval().map(|period| {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    })
}

/// The next watchdog tick; never, when the watchdog is off.
async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// systemd's side: a datagram socket the notifier sends to. An async one, read alongside
    /// the notifier's task on the test's runtime; the binaries' suites share the blocking
    /// `burrow_testkit::NotifyManager`, which the runtime does not depend on.
    struct Manager {
        socket: tokio::net::UnixDatagram,
        env: HashMap<String, String>,
        path: Option<std::path::PathBuf>,
    }

    static NEXT: AtomicU32 = AtomicU32::new(0);

    fn unique(prefix: &str) -> String {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", std::process::id())
    }

    impl Manager {
        fn at_path() -> Manager {
            let path = std::env::temp_dir().join(unique("burrow-notify") + ".sock");
            let socket = UnixDatagram::bind(&path).unwrap();
            let notify = path.to_str().unwrap().to_owned();
            Manager::new(socket, notify, Some(path))
        }

        fn abstract_name() -> Manager {
            use std::os::linux::net::SocketAddrExt;
            let name = unique("burrow-notify-test");
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let socket = UnixDatagram::bind_addr(&addr).unwrap();
            Manager::new(socket, format!("@{name}"), None)
        }

        fn new(socket: UnixDatagram, notify: String, path: Option<std::path::PathBuf>) -> Self {
            socket.set_nonblocking(true).unwrap();
            let env = HashMap::from([("NOTIFY_SOCKET".to_owned(), notify)]);
            let socket = tokio::net::UnixDatagram::from_std(socket).unwrap();
            Manager { socket, env, path }
        }

        fn with_watchdog(mut self, usec: u64) -> Self {
            self.env.insert("WATCHDOG_USEC".into(), usec.to_string());
            self
        }

        fn notifier(&self) -> Notifier {
            Notifier::from_env(&self.env).unwrap()
        }

        async fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.socket.recv(&mut buf))
                .await
                .expect("no notification within 10s")
                .unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }

        /// Messages until (and with) `last`, watchdog pings included.
        async fn recv_until(&self, last: &str) -> Vec<String> {
            let mut got = Vec::new();
            loop {
                let message = self.recv().await;
                let done = message == last;
                got.push(message);
                if done {
                    return got;
                }
            }
        }

        fn nothing_queued(&self) -> bool {
            let mut buf = [0u8; 4096];
            matches!(self.socket.try_recv(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }

    impl Drop for Manager {
        fn drop(&mut self) {
            if let Some(path) = &self.path {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_socket_no_notifier() {
        assert!(Notifier::from_env(&env(&[])).is_none());
        assert!(Notifier::from_env(&env(&[("NOTIFY_SOCKET", "")])).is_none());
        assert!(Notifier::from_env(&env(&[("NOTIFY_SOCKET", "relative/path")])).is_none());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_process_only() {
        let with = |extra: &[(&str, &str)]| {
            let mut e = env(&[("NOTIFY_SOCKET", "/run/systemd/notify")]);
            e.extend(env(extra));
            Notifier::from_env(&e).unwrap().watchdog_interval()
        };
        assert_eq!(with(&[]), None);
        assert_eq!(
            with(&[("WATCHDOG_USEC", "30000000")]),
            Some(Duration::from_secs(15))
        );
        assert_eq!(with(&[("WATCHDOG_USEC", "0")]), None);
        assert_eq!(with(&[("WATCHDOG_USEC", "soon")]), None);
        let me = std::process::id().to_string();
        assert_eq!(
            with(&[("WATCHDOG_USEC", "2000000"), ("WATCHDOG_PID", &me)]),
            Some(Duration::from_secs(1))
        );
        let other = (std::process::id() + 1).to_string();
        assert_eq!(
            with(&[("WATCHDOG_USEC", "2000000"), ("WATCHDOG_PID", &other)]),
            None
        );
    }

    async fn messages_in_order(manager: Manager) {
        let notifier = manager.notifier();
        notifier.ready();
        notifier.status("connected\nto the edge");
        notifier.watchdog();
        notifier.stopping();
        assert_eq!(manager.recv().await, "READY=1");
        assert_eq!(manager.recv().await, "STATUS=connected to the edge");
        assert_eq!(manager.recv().await, "WATCHDOG=1");
        assert_eq!(manager.recv().await, "STOPPING=1");
        assert!(manager.nothing_queued());
    }

    #[tokio::test]
    async fn messages_reach_a_path_socket_in_order() {
        messages_in_order(Manager::at_path()).await;
    }

    #[tokio::test]
    async fn messages_reach_an_abstract_socket_in_order() {
        messages_in_order(Manager::abstract_name()).await;
    }

    /// A status for the tests: a count, shown as a line.
    fn line(streams: &u64) -> String {
        format!("{streams} streams open")
    }

    #[tokio::test]
    async fn status_task_reports_pets_the_watchdog_whatever_the_status_and_says_stopping() {
        // 100 ms timeout: a ping every 50 ms.
        let manager = Manager::abstract_name().with_watchdog(100_000);
        let notifier = manager.notifier();
        let (tx, rx) = watch::channel(0u64);
        let shutdown = CancellationToken::new();
        notifier.ready();
        let task = tokio::spawn(run(notifier, rx, line, shutdown.clone()));

        assert_eq!(manager.recv().await, "READY=1");
        assert_eq!(manager.recv().await, "STATUS=0 streams open");
        // The status stays the same: the pings go on regardless.
        for _ in 0..3 {
            assert_eq!(manager.recv().await, "WATCHDOG=1");
        }

        tx.send_replace(2);
        let got = manager.recv_until("STATUS=2 streams open").await;
        assert!(
            got[..got.len() - 1].iter().all(|m| m == "WATCHDOG=1"),
            "{got:?}"
        );

        shutdown.cancel();
        let got = manager.recv_until("STOPPING=1").await;
        assert!(
            got[..got.len() - 1].iter().all(|m| m == "WATCHDOG=1"),
            "{got:?}"
        );
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(manager.nothing_queued());
    }

    #[tokio::test]
    async fn status_task_folds_quick_changes_into_one_line() {
        let manager = Manager::at_path();
        let (tx, rx) = watch::channel(0u64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(manager.notifier(), rx, line, shutdown.clone()));
        assert!(manager.recv().await == "STATUS=0 streams open");
        for streams in 1..=50 {
            tx.send_replace(streams);
            tokio::task::yield_now().await;
        }
        // No watchdog here: the next message is the folded status line.
        assert!(
            manager.recv().await == "STATUS=50 streams open",
            "intermediate counts were sent"
        );
        shutdown.cancel();
        assert_eq!(manager.recv().await, "STOPPING=1");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn keepalive_pets_the_watchdog_then_says_stopping() {
        let manager = Manager::at_path().with_watchdog(100_000);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(keepalive(manager.notifier(), shutdown.clone()));
        assert_eq!(manager.recv().await, "WATCHDOG=1");
        assert_eq!(manager.recv().await, "WATCHDOG=1");
        shutdown.cancel();
        let got = manager.recv_until("STOPPING=1").await;
        assert!(
            got[..got.len() - 1].iter().all(|m| m == "WATCHDOG=1"),
            "{got:?}"
        );
        task.await.unwrap();
    }
}
