//! systemd's side of `sd_notify` for tests of a binary's service integration: the test binds
//! the notify socket, starts the process with `NOTIFY_SOCKET` naming it, and reads what
//! arrives (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`) in order.
//!
//! (burrow-runtime's own unit tests of its notifier keep a small async manager of their own:
//! the runtime does not take the kit as a dev-dependency.)

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::WAIT;

/// The bound notify socket, at a path in a temporary directory of its own or at a name in the
/// abstract namespace (`@name`); each message read within [`WAIT`].
#[derive(Debug)]
pub struct NotifyManager {
    socket: UnixDatagram,
    notify_socket: String,
    /// The directory of a path socket; removed with the manager.
    _dir: Option<tempfile::TempDir>,
}

impl NotifyManager {
    /// A socket at `notify.sock` in a new temporary directory.
    pub fn at_path() -> NotifyManager {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let notify_socket = path.to_str().expect("a UTF-8 temporary path").to_owned();
        NotifyManager::new(socket, notify_socket, Some(dir))
    }

    /// A socket at a name in the abstract namespace, unique to this process and call.
    pub fn abstract_name() -> NotifyManager {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("burrow-testkit-notify-{}-{n}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("an abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the notify socket");
        NotifyManager::new(socket, format!("@{name}"), None)
    }

    fn new(
        socket: UnixDatagram,
        notify_socket: String,
        dir: Option<tempfile::TempDir>,
    ) -> NotifyManager {
        socket
            .set_read_timeout(Some(WAIT))
            .expect("set the read timeout");
        NotifyManager {
            socket,
            notify_socket,
            _dir: dir,
        }
    }

    /// The value of `NOTIFY_SOCKET` that names this socket.
    pub fn notify_socket(&self) -> &str {
        &self.notify_socket
    }

    /// `program` as systemd would start it: `NOTIFY_SOCKET` names this socket, and nothing of
    /// the test's own `BURROW_*`, `NOTIFY_SOCKET` or `WATCHDOG_*` reaches it (set
    /// `WATCHDOG_USEC` on the command to ask for pings).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("BURROW_") || text.starts_with("WATCHDOG_") {
                cmd.env_remove(&name);
            }
        }
        cmd.env("NOTIFY_SOCKET", &self.notify_socket);
        cmd
    }

    /// The next message; panics after [`WAIT`].
    pub fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {WAIT:?}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Messages up to and with the first one `done` accepts.
    pub fn recv_until(&self, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let message = self.recv();
            let last = done(&message);
            got.push(message);
            if last {
                return got;
            }
        }
    }

    /// Messages that arrived and were not read yet, without waiting for more.
    pub fn rest(&self) -> Vec<String> {
        self.socket
            .set_nonblocking(true)
            .expect("set the socket nonblocking");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.socket
            .set_nonblocking(false)
            .expect("set the socket blocking");
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(manager: &NotifyManager, messages: &[&str]) {
        let client = UnixDatagram::unbound().expect("a datagram socket");
        let target = manager.notify_socket();
        for message in messages {
            match target.strip_prefix('@') {
                Some(name) => {
                    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
                    client.send_to_addr(message.as_bytes(), &addr)
                }
                None => client.send_to(message.as_bytes(), target),
            }
            .expect("send a notification");
        }
    }

    #[test]
    fn messages_arrive_in_order_on_both_kinds_of_socket() {
        for manager in [NotifyManager::at_path(), NotifyManager::abstract_name()] {
            send(
                &manager,
                &["READY=1", "STATUS=up", "WATCHDOG=1", "STOPPING=1"],
            );
            assert_eq!(manager.recv(), "READY=1");
            let got = manager.recv_until(|m| m == "WATCHDOG=1");
            assert_eq!(got, ["STATUS=up", "WATCHDOG=1"]);
            assert_eq!(manager.rest(), ["STOPPING=1"]);
            assert!(manager.rest().is_empty());
        }
    }
}
