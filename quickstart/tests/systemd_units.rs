//! The unit files in `systemd/`, checked by systemd's own tools: `systemd-analyze verify` must
//! accept both without a warning, and `systemd-analyze security` must rate their exposure low.
//! Also the promises the units make to the binaries: the paths the README installs to, a stop
//! timeout longer than the drain grace, the state directories.
//!
//! `.ci/run` installs systemd-analyze (Debian package `systemd`) when it is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use burrow_runtime::sources::parse_duration;

const AGENT_UNIT: &str = "burrow-agent.service";
const EDGE_UNIT: &str = "burrow-edge.service";
/// Highest overall exposure `systemd-analyze security` may report, in its tenths (2.0).
const MAX_EXPOSURE: &str = "20";

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn read_unit(name: &str) -> String {
    let path = unit_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every value of `key` in the unit, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .collect()
}

fn value<'a>(unit: &'a str, key: &str) -> &'a str {
    match values(unit, key).as_slice() {
        [one] => one,
        other => panic!("expected one {key}= in the unit, found {other:?}"),
    }
}

fn duration(unit: &str, key: &'static str) -> Duration {
    parse_duration(key, value(unit, key)).unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn systemd_analyze(args: &[&str], dir: &Path) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}); install it: apt-get install systemd")
        })
}

/// Both units copied to a temporary directory, `ExecStart`'s binary replaced by one that exists
/// here. verify checks only that the command is an executable file; it runs nothing, so the
/// edge's binary stands in for the agent's too (the agent's binary is not built by this test).
fn units_with_real_binaries() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    let binary = env!("CARGO_BIN_EXE_burrow-edge");
    for (name, installed) in [
        (AGENT_UNIT, "/usr/local/bin/burrow-agent "),
        (EDGE_UNIT, "/usr/local/bin/burrow-edge "),
    ] {
        let unit = read_unit(name);
        assert!(
            value(&unit, "ExecStart").starts_with(installed),
            "{name}: ExecStart must run {installed}"
        );
        let unit = unit.replace(installed, &format!("{binary} "));
        std::fs::write(dir.path().join(name), unit).expect("write the unit");
    }
    dir
}

#[test]
fn systemd_analyze_verify_accepts_both_units_without_a_warning() {
    let dir = units_with_real_binaries();
    // `--recursive-errors=no` makes a bad or unknown setting in the unit itself an error (by
    // default such lines are only logged and skipped); nothing else on this machine is checked.
    let out = systemd_analyze(
        &[
            "verify",
            "--man=no",
            "--recursive-errors=no",
            &format!("./{AGENT_UNIT}"),
            &format!("./{EDGE_UNIT}"),
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    let about_ours: Vec<&str> = stderr.lines().filter(|l| l.contains("burrow-")).collect();
    assert!(about_ours.is_empty(), "warnings: {about_ours:#?}");
}

#[test]
fn systemd_analyze_security_rates_both_units_low() {
    let dir = units_with_real_binaries();
    for name in [AGENT_UNIT, EDGE_UNIT] {
        let out = systemd_analyze(
            &[
                "security",
                "--offline=true",
                &format!("--threshold={MAX_EXPOSURE}"),
                &format!("./{name}"),
            ],
            dir.path(),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let overall = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{name}: no overall exposure in {stdout}"));
        // The figure README.md states; shown with `cargo test -- --nocapture`.
        println!(
            "{}",
            overall.trim_start_matches(|c: char| !c.is_alphabetic())
        );
        assert!(
            out.status.success(),
            "{name}: exposure above {MAX_EXPOSURE} tenths:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn units_promise_what_the_binaries_need() {
    let agent = read_unit(AGENT_UNIT);
    let edge = read_unit(EDGE_UNIT);
    assert_eq!(
        value(&agent, "ExecStart"),
        "/usr/local/bin/burrow-agent --config /etc/burrow/agent.toml"
    );
    assert_eq!(
        value(&edge, "ExecStart"),
        "/usr/local/bin/burrow-edge serve --config /etc/burrow/edge.toml"
    );

    // Both drain for drain_grace at shutdown: systemd must not SIGKILL them before that ends.
    let env = HashMap::from([("BURROW_AGENT_TOKEN".to_owned(), "t".to_owned())]);
    let agent_grace = burrow_agent::Config::load(None, &env, &[("edge", "edge.test:443".into())])
        .expect("agent config from defaults")
        .drain_grace;
    let edge_grace = burrow_edge::Config::load(
        None,
        &HashMap::new(),
        &[
            ("domain", "t.test".into()),
            ("state_dir", "/var/lib/burrow-edge".into()),
            ("public.http", "0.0.0.0:80".into()),
        ],
    )
    .expect("edge config from defaults")
    .drain_grace;
    for (unit, grace) in [(&agent, agent_grace), (&edge, edge_grace)] {
        assert_eq!(value(unit, "Type"), "notify");
        assert_eq!(value(unit, "Restart"), "always");
        assert_eq!(
            value(unit, "StartLimitIntervalSec"),
            "0",
            "never failed for good"
        );
        assert_eq!(duration(unit, "WatchdogSec"), Duration::from_secs(30));
        assert!(
            duration(unit, "TimeoutStopSec") >= grace + Duration::from_secs(10),
            "TimeoutStopSec must exceed drain_grace ({grace:?}) with room to spare"
        );
    }

    // DESIGN.md's edge.toml keeps its store in /var/lib/burrow-edge.
    assert_eq!(value(&edge, "StateDirectory"), "burrow-edge");
    // The agent's state_dir defaults to the directory systemd makes for StateDirectory= (and
    // names in $STATE_DIRECTORY), so the unit needs no setting for it.
    assert_eq!(value(&agent, "StateDirectory"), "burrow-agent");
    let systemd = HashMap::from([
        ("BURROW_AGENT_TOKEN".to_owned(), "t".to_owned()),
        (
            "STATE_DIRECTORY".to_owned(),
            "/var/lib/burrow-agent".to_owned(),
        ),
    ]);
    let state_dir = burrow_agent::Config::load(None, &systemd, &[("edge", "e.test:443".into())])
        .expect("agent config under systemd")
        .state_dir;
    assert_eq!(state_dir, Path::new("/var/lib/burrow-agent"));
    for unit in [&agent, &edge] {
        assert_eq!(value(unit, "StateDirectoryMode"), "0700");
    }

    // Capabilities: the edge binds :80 and :443, the agent needs none.
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        assert_eq!(value(&edge, key), "CAP_NET_BIND_SERVICE");
        assert_eq!(value(&agent, key), "");
    }
}
