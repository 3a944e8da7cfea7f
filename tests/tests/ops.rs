//! Operating a real agent process: JSON logs without secrets, `burrow-agent status`, and
//! SIGHUP reloading the port policy (a bad file is refused and the running policy kept).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burrow_tests::services::http_service;
use burrow_tests::testkit::ports::ReservedPort;
use burrow_tests::testkit::{ChildGuard, Lines, Signal};
use burrow_tests::{TestEdge, WAIT, binary, curl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_status_command_and_sighup_reload() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let url = edge.url(port, &key, "/");
    // The metrics port is named up front, not bound on `:0`: the config file is how
    // `burrow-agent status --config` finds the agent, and the agent denies that port to the
    // tunnel when it reads it.
    let metrics_port = ReservedPort::new();
    let metrics = metrics_port.addr();

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    let flags = edge.agent_flags(None);
    let state_dir = edge.agent_state_dir();
    let write_config = |deny: &str| {
        let text = format!(
            "edge = \"{}\"\nserver_name = \"{}\"\nca = \"{}\"\nstate_dir = \"{}\"\n\
             [forward]\ndeny_ports = [{deny}]\n\
             [metrics]\nlisten = \"{metrics}\"\n[log]\nformat = \"json\"\n",
            flags[0].1,
            flags[1].1,
            flags[2].1,
            state_dir.display()
        );
        std::fs::write(&config, text).expect("write config");
    };
    write_config("");
    let mut agent = ChildGuard::spawn(
        Command::new(binary("burrow-agent"))
            .arg("--config")
            .arg(&config)
            .env("BURROW_AGENT_TOKEN", &devbox.agent_token)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped()),
    );
    let log = Lines::new();
    log.read(agent.stderr.take().expect("stderr"));

    // JSON log lines, with the devbox in the session's fields and no token anywhere.
    let connected = log.wait_for_async("\"connected", WAIT).await;
    let parsed: serde_json::Value = serde_json::from_str(&connected).expect("a JSON log line");
    assert_eq!(parsed["level"], "INFO", "{connected}");
    assert!(
        connected.contains(&devbox.id),
        "the devbox is named: {connected}"
    );

    let deadline = Instant::now() + WAIT;
    while curl(&[&url]).await.code != 200 {
        assert!(Instant::now() < deadline, "tunnel serves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `burrow-agent status` reads the same config to find the agent.
    let status = Command::new(binary("burrow-agent"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .expect("status runs");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for needle in [
        "state:         connected",
        &key,
        "busiest ports:",
        &port.to_string(),
    ] {
        assert!(text.contains(needle), "status lacks `{needle}`:\n{text}");
    }

    // SIGHUP with a new deny list: the port is refused from now on, without a reconnect.
    write_config(&port.to_string());
    agent.signal(Signal::SIGHUP);
    log.wait_for_async("reloaded the port policy", WAIT).await;
    assert_eq!(curl(&[&url]).await.code, 403);

    // A broken file is refused; the running policy stays.
    std::fs::write(&config, "edge = [").expect("write");
    agent.signal(Signal::SIGHUP);
    log.wait_for_async("reload refused", WAIT).await;
    assert_eq!(curl(&[&url]).await.code, 403);

    agent.signal(Signal::SIGTERM);
    let exit = agent.wait_within(WAIT);
    assert!(exit.success(), "{exit}");
    let all = log.text();
    assert!(
        !all.contains(&devbox.agent_token),
        "the agent token never reaches the log"
    );
    let sessions = all.lines().filter(|l| l.contains("\"connected")).count();
    assert_eq!(sessions, 1, "reloads do not reconnect");
}
