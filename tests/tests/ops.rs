//! Operating a real agent process: JSON logs without secrets, `burrow-agent status`, and
//! SIGHUP reloading the port policy (a bad file is refused and the running policy kept).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burrow_tests::services::http_service;
use burrow_tests::{TestEdge, WAIT, binary, curl};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_status_command_and_sighup_reload() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let url = edge.url(port, &key, "/");
    let metrics = format!("127.0.0.1:{}", free_port());

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    let flags = edge.agent_flags(None);
    let write_config = |deny: &str| {
        let text = format!(
            "edge = \"{}\"\nserver_name = \"{}\"\nca = \"{}\"\n[forward]\ndeny_ports = [{deny}]\n\
             [metrics]\nlisten = \"{metrics}\"\n[log]\nformat = \"json\"\n",
            flags[0].1, flags[1].1, flags[2].1
        );
        std::fs::write(&config, text).expect("write config");
    };
    write_config("");
    let mut agent = KillOnDrop(
        Command::new(binary("burrow-agent"))
            .arg("--config")
            .arg(&config)
            .env("BURROW_AGENT_TOKEN", &devbox.agent_token)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent starts"),
    );
    let (tx, lines) = mpsc::channel::<String>();
    let stderr = agent.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let mut wait_log = |needle: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = seen.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("agent log line `{needle}`; saw {seen:#?}"));
            seen.push(line);
        }
    };

    // JSON log lines, with the devbox in the session's fields and no token anywhere.
    let connected = wait_log("\"connected");
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
    signal(agent.id(), "-HUP");
    wait_log("reloaded the port policy");
    assert_eq!(curl(&[&url]).await.code, 403);

    // A broken file is refused; the running policy stays.
    std::fs::write(&config, "edge = [").expect("write");
    signal(agent.id(), "-HUP");
    wait_log("reload refused");
    assert_eq!(curl(&[&url]).await.code, 403);

    signal(agent.id(), "-TERM");
    let exit = agent.wait().expect("wait");
    assert!(exit.success(), "{exit}");
    let all = seen.join("\n");
    assert!(
        !all.contains(&devbox.agent_token),
        "the agent token never reaches the log"
    );
    let sessions = seen.iter().filter(|l| l.contains("\"connected")).count();
    assert_eq!(sessions, 1, "reloads do not reconnect");
}

/// The agent process, killed if the test fails before it stops it (an orphan would keep the
/// test harness's output pipe open).
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
