//! The benchmark harness works: `bench --smoke` (direct and burrow, tiny durations, in-process
//! load generators only) exits 0 and prints a table row for burrow. Figures are not checked:
//! benchmarks are not timed tests.

use std::process::Command;

#[test]
fn bench_smoke_prints_a_burrow_row() {
    let exe = env!("CARGO_BIN_EXE_bench");
    // The test kit builds burrow-edge and burrow-agent; both land in the profile's directory.
    let edge = burrow_tests::binary("burrow-edge");
    let agent = burrow_tests::binary("burrow-agent");
    let bin_dir = edge.parent().expect("the profile's directory").to_owned();
    assert_eq!(agent.parent(), Some(bin_dir.as_path()));
    let results = tempfile::tempdir().expect("tempdir");
    let out = Command::new(exe)
        .arg("--smoke")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--results")
        .arg(results.path())
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for table in [
        "### 1. Bulk",
        "### 2. Requests per second",
        "### 5. 50 concurrent WebSockets",
    ] {
        assert!(stdout.contains(table), "no `{table}` table:\n{stdout}");
    }
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| burrow |"))
        .collect();
    assert!(!rows.is_empty(), "no burrow row:\n{stdout}\n{stderr}");
    assert!(
        !stdout.contains("- error:"),
        "a scenario failed:\n{stdout}\n{stderr}"
    );
    let json = std::fs::read_to_string(results.path().join("latest.json")).expect("latest.json");
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert!(
        json["medians"]["bulk"]["burrow"]["down_mbps"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "no burrow download figure in latest.json"
    );
    assert!(
        results.path().join("latency.svg").exists(),
        "no latency.svg"
    );
}
