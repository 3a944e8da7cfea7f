//! The entrypoint sidecar end to end: `burrow-agent -- python3 -m http.server PORT`, the way a
//! devbox is started with its entrypoint, serves the entrypoint's port through the tunnel, and
//! a SIGTERM stops both with the entrypoint's exit status.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use burrow_tests::{TestEdge, WAIT, binary, curl};
use tokio::time::{Instant, sleep, timeout};

/// How often the test asks again while the tunnel and the server come up.
const POLL: Duration = Duration::from_millis(50);

/// A port nothing listens on now: bound on `:0`, then released for the entrypoint to take.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
    listener.local_addr().expect("local address").port()
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn the_tunnel_serves_the_entrypoint_port() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let port = free_port();

    // The entrypoint serves its working directory, which is the agent's.
    let site = tempfile::tempdir().expect("tempdir");
    std::fs::write(site.path().join("hello.txt"), "hello from the entrypoint\n").expect("write");
    let logs = tempfile::tempdir().expect("tempdir");
    let log_path = logs.path().join("agent.log");
    let log = std::fs::File::create(&log_path).expect("log file");

    let mut cmd = tokio::process::Command::new(binary("burrow-agent"));
    for (name, _) in std::env::vars() {
        if name.starts_with("BURROW_") {
            cmd.env_remove(name);
        }
    }
    for (key, value) in edge.agent_flags(None) {
        cmd.arg(format!("--{}", key.replace('_', "-"))).arg(value);
    }
    let port_arg = port.to_string();
    cmd.args(["--", "python3", "-m", "http.server", &port_arg])
        .args(["--bind", "127.0.0.1"])
        .current_dir(site.path())
        .env("BURROW_AGENT_TOKEN", &devbox.agent_token)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .kill_on_drop(true);
    let mut agent = cmd.spawn().expect("burrow-agent starts");
    let pid = agent.id().expect("a running child has a pid");

    // Through the tunnel until the server answers: 503 while the agent connects, 502 while
    // nothing listens on the port yet.
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
            read_log(&log_path)
        );
        sleep(POLL).await;
    };
    assert_eq!(reply.body, "hello from the entrypoint\n");
    println!("first 200 through the tunnel after {:?}", started.elapsed());

    // SIGTERM goes to python, which dies of it; the agent drains and exits with 128 + 15.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill(1) runs");
    assert!(status.success());
    let exited = timeout(WAIT, agent.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the agent did not exit within {WAIT:?}; its log:\n{}",
                read_log(&log_path)
            )
        })
        .expect("wait for burrow-agent");
    assert_eq!(exited.code(), Some(143), "{}", read_log(&log_path));
    let log = read_log(&log_path);
    assert!(log.contains("GET /hello.txt"), "python's own log: {log}");
    assert!(log.contains("the entrypoint exited"), "{log}");
}
