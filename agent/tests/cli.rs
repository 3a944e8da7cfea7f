//! The `burrow-agent` binary's command line: exit codes and messages that name what to fix.
//! (Its presence also makes `cargo test --workspace` build the binary for the end-to-end
//! tests that run it as a process.)

use std::process::Command;

fn agent(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow-agent"));
    cmd.args(args)
        .env_remove("BURROW_AGENT_TOKEN")
        .env_remove("BURROW_EDGE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("burrow-agent runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let (code, err) = agent(&[], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`edge`"), "{err}");

    let (code, err) = agent(&["--edge", "edge.example.com:443"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token_file"), "{err}");

    let (code, err) = agent(
        &["--edge", "edge.example.com:443"],
        &[
            ("BURROW_AGENT_TOKEN", "t"),
            ("BURROW_LIVENESS_HEARTBEAT_INTERVAL", "soon"),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("liveness.heartbeat_interval"), "{err}");

    let dir = std::env::temp_dir().join(format!("burrow-agent-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("agent.toml");
    std::fs::write(&file, "edge = \"e:1\"\n[forward]\nallow_port = [1]\n").expect("write");
    let (code, err) = agent(
        &["--config", file.to_str().expect("path")],
        &[("BURROW_AGENT_TOKEN", "t")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("allow_port"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn help_lists_every_environment_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_burrow-agent"))
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "BURROW_EDGE",
        "BURROW_CA",
        "BURROW_TOKEN_FILE",
        "BURROW_AGENT_TOKEN",
        "BURROW_FORWARD_ALLOW_PORTS",
    ] {
        assert!(help.contains(var), "--help does not mention {var}");
    }
}
