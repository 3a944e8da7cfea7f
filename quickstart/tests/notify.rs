//! `burrow-edge serve` under a stand-in for systemd: READY=1 once every listener is bound, a
//! status line naming them, watchdog pings, STOPPING=1 on SIGTERM, in that order.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(20);

/// systemd's side: the bound notify socket, in a directory that lives as long as it does.
struct Manager {
    dir: tempfile::TempDir,
    socket: UnixDatagram,
}

impl Manager {
    fn bind() -> Manager {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = UnixDatagram::bind(dir.path().join("notify.sock")).expect("bind");
        socket.set_read_timeout(Some(WAIT)).expect("read timeout");
        Manager { dir, socket }
    }

    /// The next message; fails the test after [`WAIT`].
    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within WAIT");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// `burrow-edge serve` on loopback ports, as systemd would start it.
    fn serve(&self) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow-edge"));
        for (name, _) in std::env::vars() {
            if name.starts_with("BURROW_") || name.starts_with("WATCHDOG_") {
                cmd.env_remove(name);
            }
        }
        cmd.args(["serve", "--domain", "tunnel.test", "--state-dir"])
            .arg(self.dir.path().join("state"))
            .args([
                "--public-http",
                "127.0.0.1:0",
                "--agents-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .env("WATCHDOG_USEC", "400000")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("burrow-edge starts")
    }
}

/// The edge's exit status, within [`WAIT`].
fn wait(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("burrow-edge did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits an i32"));
    kill(pid, signal).expect("signal the edge");
}

#[test]
fn serve_says_ready_pets_the_watchdog_and_says_stopping() {
    let manager = Manager::bind();
    let recv = || manager.recv();
    let mut child = manager.serve();

    assert_eq!(recv(), "READY=1");
    let status = recv();
    assert!(
        status.starts_with("STATUS=listening: http 127.0.0.1:"),
        "{status}"
    );
    assert_eq!(recv(), "WATCHDOG=1");
    assert_eq!(recv(), "WATCHDOG=1");

    signal(&child, Signal::SIGTERM);
    let mut last = recv();
    while last == "WATCHDOG=1" {
        last = recv();
    }
    assert_eq!(last, "STOPPING=1");

    let status = wait(&mut child);
    assert!(status.success(), "{status}");
}

/// systemd may signal the moment READY=1 arrives: a SIGHUP then must reload, not kill, and a
/// SIGTERM must drain and say STOPPING=1 (no handler yet would mean the default action: death).
#[test]
fn signals_the_moment_ready_arrives_are_handled() {
    let manager = Manager::bind();
    let mut child = manager.serve();
    assert_eq!(manager.recv(), "READY=1");
    signal(&child, Signal::SIGHUP);
    signal(&child, Signal::SIGTERM);
    let mut last = manager.recv();
    while last != "STOPPING=1" {
        assert!(
            last.starts_with("STATUS=") || last == "WATCHDOG=1",
            "unexpected before STOPPING=1: {last}"
        );
        last = manager.recv();
    }
    let status = wait(&mut child);
    assert!(
        status.success(),
        "a signal right after READY=1 killed the edge: {status}"
    );
}
