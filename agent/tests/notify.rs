//! The `burrow-agent` binary under a stand-in for systemd: the test binds the notify socket (a
//! path, or a name in the abstract namespace), starts the agent with `NOTIFY_SOCKET` and
//! `WATCHDOG_USEC`, and reads what arrives, in order.
//!
//! The agent is pointed at an edge that is not there (`127.0.0.1:9`): the watchdog must keep
//! being pet through the outage, and the status line must say the agent is not connected.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a test waits for a message or an exit: generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(20);

/// systemd's side of the protocol: the bound notify socket.
struct Manager {
    socket: UnixDatagram,
    notify_socket: String,
    path: Option<PathBuf>,
}

impl Manager {
    fn at_path(name: &str) -> Manager {
        let path = std::env::temp_dir().join(format!(
            "burrow-agent-notify-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let notify_socket = path.display().to_string();
        Manager::new(socket, notify_socket, Some(path))
    }

    fn abstract_name(name: &str) -> Manager {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("burrow-agent-notify-{}-{name}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the notify socket");
        Manager::new(socket, format!("@{name}"), None)
    }

    fn new(socket: UnixDatagram, notify_socket: String, path: Option<PathBuf>) -> Manager {
        socket.set_read_timeout(Some(WAIT)).expect("read timeout");
        Manager {
            socket,
            notify_socket,
            path,
        }
    }

    /// The next message; fails the test after [`WAIT`].
    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {WAIT:?}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Messages up to and with the first one `done` accepts.
    fn recv_until(&self, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
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

    /// Messages that arrived and were not read yet.
    fn rest(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The agent, dialing an edge that is not there, as systemd would start it.
fn agent(manager: &Manager, extra_env: &[(&str, &str)], args: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow-agent"));
    for (name, _) in std::env::vars() {
        if name.starts_with("BURROW_") || name.starts_with("WATCHDOG_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("NOTIFY_SOCKET", &manager.notify_socket)
        .env("BURROW_AGENT_TOKEN", "x")
        .env("NO_COLOR", "1")
        .args(["--edge", "127.0.0.1:9", "--dial-timeout", "200ms"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("burrow-agent starts")
}

fn signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits an i32"));
    kill(pid, signal).expect("signal the agent");
}

fn wait(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("burrow-agent did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_status(m: &str) -> bool {
    m.starts_with("STATUS=")
}

#[test]
fn ready_then_status_and_watchdog_through_an_edge_outage_then_stopping() {
    let manager = Manager::at_path("outage");
    // A 400 ms watchdog timeout: a ping every 200 ms.
    let mut child = agent(&manager, &[("WATCHDOG_USEC", "400000")], &[]);

    assert_eq!(manager.recv(), "READY=1", "READY=1 comes first");
    let status = manager.recv();
    assert!(
        status.starts_with("STATUS=") && status.contains("not connected to the edge"),
        "{status}"
    );
    // The edge stays unreachable; the pings go on. Status lines may come in between.
    let mut pings = 0;
    let got = manager.recv_until(|m| {
        pings += usize::from(m == "WATCHDOG=1");
        pings == 5
    });
    for m in &got {
        assert!(
            m == "WATCHDOG=1" || (is_status(m) && m.contains("not connected to the edge")),
            "unexpected during the outage: {m}"
        );
    }

    signal(&child, Signal::SIGTERM);
    let got = manager.recv_until(|m| m == "STOPPING=1");
    assert!(
        got.iter()
            .all(|m| m == "WATCHDOG=1" || is_status(m) || m == "STOPPING=1"),
        "{got:?}"
    );
    let status = wait(&mut child);
    assert!(status.success(), "{status}");
    assert_eq!(
        manager.rest(),
        Vec::<String>::new(),
        "nothing after STOPPING=1"
    );
}

#[test]
fn abstract_notify_socket_and_no_watchdog_unless_asked() {
    let manager = Manager::abstract_name("abstract");
    let mut child = agent(&manager, &[], &[]);
    assert_eq!(manager.recv(), "READY=1");
    assert!(is_status(&manager.recv()));
    signal(&child, Signal::SIGTERM);
    let got = manager.recv_until(|m| m == "STOPPING=1");
    assert!(
        got.iter().all(|m| is_status(m) || m == "STOPPING=1"),
        "no WATCHDOG_USEC, no pings: {got:?}"
    );
    assert!(wait(&mut child).success());
}

/// systemd may signal the moment READY=1 arrives: a SIGHUP then must reload, not kill, and a
/// SIGTERM must drain and say STOPPING=1 (no handler yet would mean the default action: death).
#[test]
fn signals_the_moment_ready_arrives_are_handled() {
    let manager = Manager::at_path("early");
    let mut child = agent(&manager, &[], &[]);
    assert_eq!(manager.recv(), "READY=1");
    signal(&child, Signal::SIGHUP);
    signal(&child, Signal::SIGTERM);
    let got = manager.recv_until(|m| m == "STOPPING=1");
    assert!(
        got.iter().all(|m| is_status(m) || m == "STOPPING=1"),
        "{got:?}"
    );
    let status = wait(&mut child);
    assert!(
        status.success(),
        "a signal right after READY=1 killed the agent: {status}"
    );
}

#[test]
fn the_sidecar_entrypoint_does_not_inherit_the_notify_socket() {
    let manager = Manager::at_path("sidecar");
    // The entrypoint exits 0 only if none of systemd's variables reached it; the agent exits
    // with its code.
    let script = r#"test -z "${NOTIFY_SOCKET+x}${WATCHDOG_USEC+x}${WATCHDOG_PID+x}""#;
    let mut child = agent(
        &manager,
        &[("WATCHDOG_USEC", "400000"), ("WATCHDOG_PID", "1")],
        &["--", "sh", "-c", script],
    );
    assert_eq!(manager.recv(), "READY=1", "the agent itself still notifies");
    let got = manager.recv_until(|m| m == "STOPPING=1");
    assert!(
        got.iter().all(|m| is_status(m) || m == "STOPPING=1"),
        "WATCHDOG_PID names another process: no pings: {got:?}"
    );
    let status = wait(&mut child);
    assert_eq!(
        status.code(),
        Some(0),
        "the entrypoint saw NOTIFY_SOCKET, WATCHDOG_USEC or WATCHDOG_PID"
    );
}
