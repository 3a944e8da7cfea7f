//! `burrow-edge serve` under a stand-in for systemd: READY=1 once every listener is bound, a
//! status line naming them, watchdog pings, STOPPING=1 on SIGTERM, in that order.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn serve_says_ready_pets_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let sock = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&sock).expect("bind the notify socket");
    manager.set_read_timeout(Some(WAIT)).expect("read timeout");
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = manager.recv(&mut buf).expect("a notification within WAIT");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow-edge"));
    for (name, _) in std::env::vars() {
        if name.starts_with("BURROW_") || name.starts_with("WATCHDOG_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd
        .args(["serve", "--domain", "tunnel.test", "--state-dir"])
        .arg(dir.path().join("state"))
        .args([
            "--public-http",
            "127.0.0.1:0",
            "--agents-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "400000")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("burrow-edge starts");

    assert_eq!(recv(), "READY=1");
    let status = recv();
    assert!(
        status.starts_with("STATUS=listening: http 127.0.0.1:"),
        "{status}"
    );
    assert_eq!(recv(), "WATCHDOG=1");
    assert_eq!(recv(), "WATCHDOG=1");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let mut last = recv();
    while last == "WATCHDOG=1" {
        last = recv();
    }
    assert_eq!(last, "STOPPING=1");

    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "burrow-edge did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
