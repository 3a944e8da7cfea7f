//! The `burrow-agent` binary under a stand-in for systemd: the test binds the notify socket (a
//! path, or a name in the abstract namespace), starts the agent with `NOTIFY_SOCKET` and
//! `WATCHDOG_USEC`, and reads what arrives, in order.
//!
//! The agent is pointed at an edge that is not there (`127.0.0.1:9`): the watchdog must keep
//! being pet through the outage, and the status line must say the agent is not connected.

use std::process::Stdio;

use burrow_testkit::{ChildGuard, NotifyManager, Signal, WAIT};

/// The agent, dialing an edge that is not there, as systemd would start it.
fn agent(manager: &NotifyManager, extra_env: &[(&str, &str)], args: &[&str]) -> ChildGuard {
    let mut cmd = manager.command(env!("CARGO_BIN_EXE_burrow-agent"));
    cmd.env("BURROW_AGENT_TOKEN", "x")
        .env("NO_COLOR", "1")
        .args(["--edge", "127.0.0.1:9", "--dial-timeout", "200ms"])
        .args(args)
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    ChildGuard::spawn(&mut cmd)
}

fn is_status(m: &str) -> bool {
    m.starts_with("STATUS=")
}

#[test]
fn ready_then_status_and_watchdog_through_an_edge_outage_then_stopping() {
    let manager = NotifyManager::at_path();
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

    child.signal(Signal::SIGTERM);
    let got = manager.recv_until(|m| m == "STOPPING=1");
    assert!(
        got.iter()
            .all(|m| m == "WATCHDOG=1" || is_status(m) || m == "STOPPING=1"),
        "{got:?}"
    );
    let status = child.wait_within(WAIT);
    assert!(status.success(), "{status}");
    assert_eq!(
        manager.rest(),
        Vec::<String>::new(),
        "nothing after STOPPING=1"
    );
}

#[test]
fn abstract_notify_socket_and_no_watchdog_unless_asked() {
    let manager = NotifyManager::abstract_name();
    let mut child = agent(&manager, &[], &[]);
    assert_eq!(manager.recv(), "READY=1");
    assert!(is_status(&manager.recv()));
    child.signal(Signal::SIGTERM);
    let got = manager.recv_until(|m| m == "STOPPING=1");
    assert!(
        got.iter().all(|m| is_status(m) || m == "STOPPING=1"),
        "no WATCHDOG_USEC, no pings: {got:?}"
    );
    assert!(child.wait_within(WAIT).success());
}

/// systemd may signal the moment READY=1 arrives: a SIGHUP then must reload, not kill, and a
/// SIGTERM must drain and say STOPPING=1 (no handler yet would mean the default action: death).
#[test]
fn signals_the_moment_ready_arrives_are_handled() {
    let manager = NotifyManager::at_path();
    let mut child = agent(&manager, &[], &[]);
    assert_eq!(manager.recv(), "READY=1");
    child.signal(Signal::SIGHUP);
    child.signal(Signal::SIGTERM);
    let got = manager.recv_until(|m| m == "STOPPING=1");
    assert!(
        got.iter().all(|m| is_status(m) || m == "STOPPING=1"),
        "{got:?}"
    );
    let status = child.wait_within(WAIT);
    assert!(
        status.success(),
        "a signal right after READY=1 killed the agent: {status}"
    );
}

#[test]
fn the_sidecar_entrypoint_does_not_inherit_the_notify_socket() {
    let manager = NotifyManager::at_path();
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
    let status = child.wait_within(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "the entrypoint saw NOTIFY_SOCKET, WATCHDOG_USEC or WATCHDOG_PID"
    );
}
