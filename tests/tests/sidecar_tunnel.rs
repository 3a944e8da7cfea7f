//! The entrypoint sidecar end to end: `burrow-agent -- python3 -m http.server 0`, the way a
//! devbox is started with its entrypoint, serves the entrypoint's port through the tunnel, and
//! a SIGTERM stops both with the entrypoint's exit status.

use std::process::Stdio;
use std::time::Duration;

use burrow_tests::testkit::{AsyncChildGuard, Lines, Signal};
use burrow_tests::{TestEdge, WAIT, binary, curl};
use tokio::time::{Instant, sleep};

/// How often the test asks again while the tunnel comes up.
const POLL: Duration = Duration::from_millis(50);

/// The port from python's `Serving HTTP on 127.0.0.1 port 45678 (http://...) ...`.
fn serving_port(line: &str) -> u16 {
    line.split(" port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in `{line}`"))
}

#[tokio::test]
async fn the_tunnel_serves_the_entrypoint_port() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");

    // The entrypoint serves its working directory, which is the agent's.
    let site = tempfile::tempdir().expect("tempdir");
    std::fs::write(site.path().join("hello.txt"), "hello from the entrypoint\n").expect("write");

    let mut cmd = tokio::process::Command::new(binary("burrow-agent"));
    for (name, _) in std::env::vars() {
        if name.starts_with("BURROW_") {
            cmd.env_remove(name);
        }
    }
    for (key, value) in edge.agent_flags(None) {
        cmd.arg(format!("--{}", key.replace('_', "-"))).arg(value);
    }
    // Port 0: python binds a port the kernel chooses and prints it.
    cmd.args(["--", "python3", "-m", "http.server", "0"])
        .args(["--bind", "127.0.0.1"])
        .current_dir(site.path())
        .env("BURROW_AGENT_TOKEN", &devbox.agent_token)
        .env("BURROW_STATE_DIR", edge.agent_state_dir())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut agent = AsyncChildGuard::spawn(&mut cmd);
    let log = Lines::new();
    log.read_async(agent.stdout.take().expect("piped stdout"));
    log.read_async(agent.stderr.take().expect("piped stderr"));
    let port = serving_port(&log.wait_for_async("Serving HTTP on", WAIT).await);

    // Through the tunnel until the server answers: 503 while the agent connects.
    let url = edge.url(port, &key, "/hello.txt");
    let deadline = Instant::now() + WAIT;
    let started = Instant::now();
    let reply = loop {
        let reply = curl(&["--max-time", "5", &url]).await;
        if reply.code == 200 {
            break reply;
        }
        assert!(
            Instant::now() < deadline,
            "no 200 from {url} within {WAIT:?}; last: {} {}{}\nagent log:\n{}",
            reply.code,
            reply.body,
            reply.stderr,
            log.text()
        );
        sleep(POLL).await;
    };
    assert_eq!(reply.body, "hello from the entrypoint\n");
    println!("first 200 through the tunnel after {:?}", started.elapsed());

    // SIGTERM goes to python, which dies of it; the agent drains and exits with 128 + 15.
    agent.signal(Signal::SIGTERM);
    let exited = agent.wait_within(WAIT).await;
    assert_eq!(exited.code(), Some(143), "{}", log.text());
    // Python's own log, and the agent's word on the exit (the pipes may still hold them).
    log.wait_for_async("GET /hello.txt", WAIT).await;
    log.wait_for_async("the entrypoint exited", WAIT).await;
}
