//! `burrow-edge serve` under a stand-in for systemd: READY=1 once every listener is bound, a
//! status line naming them, watchdog pings, STOPPING=1 on SIGTERM, in that order.

use std::path::Path;
use std::process::Stdio;

use burrow_testkit::{ChildGuard, NotifyManager, Signal, WAIT};

/// `burrow-edge serve` on loopback ports with its state in `state`, as systemd would start it.
fn serve(manager: &NotifyManager, state: &Path) -> ChildGuard {
    let mut cmd = manager.command(env!("CARGO_BIN_EXE_burrow-edge"));
    cmd.args(["serve", "--domain", "tunnel.test", "--state-dir"])
        .arg(state)
        .args([
            "--public-http",
            "127.0.0.1:0",
            "--agents-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("WATCHDOG_USEC", "400000")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    ChildGuard::spawn(&mut cmd)
}

#[test]
fn serve_says_ready_pets_the_watchdog_and_says_stopping() {
    let manager = NotifyManager::at_path();
    let state = tempfile::tempdir().expect("a state directory");
    let recv = || manager.recv();
    let mut child = serve(&manager, state.path());

    assert_eq!(recv(), "READY=1");
    let status = recv();
    assert!(
        status.starts_with("STATUS=listening: http 127.0.0.1:"),
        "{status}"
    );
    assert_eq!(recv(), "WATCHDOG=1");
    assert_eq!(recv(), "WATCHDOG=1");

    child.signal(Signal::SIGTERM);
    let mut last = recv();
    while last == "WATCHDOG=1" {
        last = recv();
    }
    assert_eq!(last, "STOPPING=1");

    let status = child.wait_within(WAIT);
    assert!(status.success(), "{status}");
}

/// systemd may signal the moment READY=1 arrives: a SIGHUP then must reload, not kill, and a
/// SIGTERM must drain and say STOPPING=1 (no handler yet would mean the default action: death).
#[test]
fn signals_the_moment_ready_arrives_are_handled() {
    let manager = NotifyManager::at_path();
    let state = tempfile::tempdir().expect("a state directory");
    let mut child = serve(&manager, state.path());
    assert_eq!(manager.recv(), "READY=1");
    child.signal(Signal::SIGHUP);
    child.signal(Signal::SIGTERM);
    let mut last = manager.recv();
    while last != "STOPPING=1" {
        assert!(
            last.starts_with("STATUS=") || last == "WATCHDOG=1",
            "unexpected before STOPPING=1: {last}"
        );
        last = manager.recv();
    }
    let status = child.wait_within(WAIT);
    assert!(
        status.success(),
        "a signal right after READY=1 killed the edge: {status}"
    );
}
