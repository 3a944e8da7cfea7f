//! The soak, CI-sized: three memory rounds of 3 s, then one shuffled round of every fault
//! (agent kill -9 and restart, SIGSTOP/SIGCONT, edge kill -9 and restart, edge graceful
//! restart, a blip, a long blackhole, packet loss, NAT rebinding, tunnel and agent token
//! rotation) 3-6 s apart under a steady load of every kind. The soak itself judges: every
//! operation succeeded or failed inside a fault window that allows it, descriptors came back
//! to their baseline, and a round after the warm-up did not raise either process's RSS.

use std::process::Command;

#[test]
fn a_round_of_every_fault_loses_nothing_it_should_not() {
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args([
            "--cycles", "1", "--gap", "3", "--rounds", "3", "--load", "3",
        ])
        .output()
        .expect("the soak runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("soak passed"),
        "the soak failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for row in [
        "| HTTP request, new connection |",
        "| HTTP request, kept-alive connection |",
        "| WebSocket session |",
        "| SSE stream |",
        "| raw TCP connection |",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no `{row}` row:\n{stdout}"));
        let succeeded: u64 = line
            .split('|')
            .nth(2)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(succeeded > 0, "nothing of `{row}` succeeded:\n{stdout}");
    }
    for fault in [
        "| agent kill -9 and restart | 1 |",
        "| edge kill -9 and restart | 1 |",
        "| edge graceful restart (SIGTERM) | 1 |",
        "| NAT rebinding | 1 |",
        "| tunnel token rotated | 1 |",
    ] {
        assert!(stdout.contains(fault), "no `{fault}` row:\n{stdout}");
    }
}
