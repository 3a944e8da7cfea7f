//! `burrow-agent [options] -- CMD ARGS...`: the entrypoint sidecar, run as the real binary.
//!
//! The agent is pointed at an edge that is not there (`127.0.0.1:9`); it keeps dialing in the
//! background, which is what it does in a devbox whose edge is away, and the entrypoint runs
//! regardless. Every wait is on an event (a file, an exit) polled under a deadline; the shell
//! scripts the entrypoints run may sleep, the tests never do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use burrow_testkit::{ChildGuard, Signal};

/// How long a test waits for an event before failing: generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(20);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);

/// A scratch directory for one test, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("burrow-sidecar-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A path as a string for a shell script.
    fn sh(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent binary with a (missing) edge and a token, its stderr in `dir/agent.log`, and no
/// `BURROW_*` from the test's environment.
fn agent_command(program: &Path, dir: &Scratch) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars() {
        if name.starts_with("BURROW_") || name == "NOTIFY_SOCKET" {
            cmd.env_remove(name);
        }
    }
    let log = std::fs::File::create(dir.path("agent.log")).expect("log file");
    cmd.env("BURROW_AGENT_TOKEN", "x")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}

/// The agent with `flags`, then `--` and the entrypoint.
fn sidecar(dir: &Scratch, flags: &[&str], entrypoint: &[&str]) -> Command {
    let mut cmd = agent_command(Path::new(env!("CARGO_BIN_EXE_burrow-agent")), dir);
    cmd.args(["--edge", "127.0.0.1:9"])
        .args(flags)
        .arg("--")
        .args(entrypoint);
    cmd
}

/// `sidecar` with the entrypoint `sh -c SCRIPT`, killed if the test ends first.
fn agent_sh(dir: &Scratch, flags: &[&str], script: &str) -> ChildGuard {
    ChildGuard::spawn(&mut sidecar(dir, flags, &["sh", "-c", script]))
}

/// Waits up to [`WAIT`] for the process to exit; its status.
fn exit_status(child: &mut Child, dir: &Scratch) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "burrow-agent did not exit within {WAIT:?}; its log:\n{}",
                log(dir)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Waits for the exit; its exit code (None if a signal killed it).
fn exit_code(child: &mut Child, dir: &Scratch) -> Option<i32> {
    exit_status(child, dir).code()
}

/// Waits up to [`WAIT`] for `path` to exist with a complete line; its contents.
fn wait_file(path: &Path, child: &mut Child, dir: &Scratch) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{} did not appear within {WAIT:?}; the agent's log:\n{}",
                path.display(),
                log(dir)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Waits up to [`WAIT`] for the agent's log to satisfy `until`.
fn wait_log(dir: &Scratch, child: &mut Child, what: &str, until: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !until(&log(dir)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent log: no {what} within {WAIT:?}:\n{}", log(dir));
        }
        std::thread::sleep(POLL);
    }
}

fn log(dir: &Scratch) -> String {
    std::fs::read_to_string(dir.path("agent.log")).unwrap_or_default()
}

#[test]
fn exits_with_the_entrypoint_exit_code() {
    let dir = Scratch::new("exit3");
    let started = Instant::now();
    let mut agent = agent_sh(&dir, &[], "exit 3");
    assert_eq!(exit_code(&mut agent, &dir), Some(3), "{}", log(&dir));
    // No connection to drain: the agent does not wait out drain_grace (10 s).
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let log = log(&dir);
    assert!(log.contains("the entrypoint exited"), "{log}");
}

#[test]
fn a_killed_entrypoint_gives_128_plus_the_signal() {
    let dir = Scratch::new("kill9");
    let mut agent = agent_sh(&dir, &[], "kill -9 $$");
    assert_eq!(exit_code(&mut agent, &dir), Some(137), "{}", log(&dir));
}

#[test]
fn a_signal_reaches_the_entrypoint() {
    let dir = Scratch::new("usr1");
    let script = format!(
        "trap 'echo got-usr1 > {got}; exit 0' USR1; echo ready > {ready}; \
         while :; do sleep 0.1; done",
        got = dir.sh("got"),
        ready = dir.sh("ready"),
    );
    let mut agent = agent_sh(&dir, &[], &script);
    wait_file(&dir.path("ready"), &mut agent, &dir);
    agent.signal(Signal::SIGUSR1);
    assert_eq!(wait_file(&dir.path("got"), &mut agent, &dir), "got-usr1\n");
    assert_eq!(exit_code(&mut agent, &dir), Some(0), "{}", log(&dir));
}

#[test]
fn sigterm_is_forwarded_and_the_entrypoint_status_returned() {
    let dir = Scratch::new("term");
    let script = format!(
        "trap 'echo got-term > {got}; exit 42' TERM; echo ready > {ready}; \
         while :; do sleep 0.1; done",
        got = dir.sh("got"),
        ready = dir.sh("ready"),
    );
    let mut agent = agent_sh(&dir, &[], &script);
    wait_file(&dir.path("ready"), &mut agent, &dir);
    agent.signal(Signal::SIGTERM);
    assert_eq!(exit_code(&mut agent, &dir), Some(42), "{}", log(&dir));
    assert_eq!(
        std::fs::read_to_string(dir.path("got")).ok().as_deref(),
        Some("got-term\n")
    );
    assert!(log(&dir).contains("draining the tunnel"), "{}", log(&dir));

    // An entrypoint that does not handle SIGTERM dies of it: 128 + 15.
    let dir = Scratch::new("term-default");
    let script = format!("echo ready > {}; exec sleep 60", dir.sh("ready"));
    let mut agent = agent_sh(&dir, &[], &script);
    wait_file(&dir.path("ready"), &mut agent, &dir);
    agent.signal(Signal::SIGTERM);
    assert_eq!(exit_code(&mut agent, &dir), Some(143), "{}", log(&dir));
}

#[test]
fn signal_group_reaches_the_whole_group() {
    // The grandchild traps USR1 too; only a signal to the group reaches it.
    let dir = Scratch::new("group");
    let inner = format!(
        "trap \"echo grandchild > {g}; exit 0\" USR1; echo ready > {ready}; \
         while :; do sleep 0.1; done",
        g = dir.sh("grandchild"),
        ready = dir.sh("ready"),
    );
    let script = format!(
        "trap 'echo main > {m}' USR1; sh -c '{inner}' & \
         while [ ! -f {g} ]; do sleep 0.1; done; exit 0",
        m = dir.sh("main"),
        g = dir.sh("grandchild"),
    );
    let mut agent = agent_sh(&dir, &["--signal-group"], &script);
    wait_file(&dir.path("ready"), &mut agent, &dir);
    agent.signal(Signal::SIGUSR1);
    assert_eq!(
        wait_file(&dir.path("grandchild"), &mut agent, &dir),
        "grandchild\n"
    );
    assert_eq!(wait_file(&dir.path("main"), &mut agent, &dir), "main\n");
    assert_eq!(exit_code(&mut agent, &dir), Some(0), "{}", log(&dir));
}

#[test]
fn entrypoint_gets_the_environment_and_directory_without_notify_socket() {
    let dir = Scratch::new("env");
    let script = format!(
        "env > {env}; pwd > {pwd}",
        env = dir.sh("env"),
        pwd = dir.sh("pwd")
    );
    let mut agent = ChildGuard::spawn(
        sidecar(&dir, &[], &["sh", "-c", &script])
            .env("NOTIFY_SOCKET", "/run/burrow-test/notify.sock")
            .env("SIDECAR_MARKER", "kept")
            .current_dir(&dir.0),
    );
    assert_eq!(exit_code(&mut agent, &dir), Some(0), "{}", log(&dir));
    let env = std::fs::read_to_string(dir.path("env")).expect("env written");
    assert!(env.lines().any(|l| l == "SIDECAR_MARKER=kept"), "{env}");
    assert!(!env.contains("NOTIFY_SOCKET"), "{env}");
    assert!(
        !env.contains("BURROW_AGENT_TOKEN"),
        "the agent token stays with the agent: {env}"
    );
    let pwd = std::fs::read_to_string(dir.path("pwd")).expect("pwd written");
    let expected = dir.0.canonicalize().expect("canonical");
    assert_eq!(Path::new(pwd.trim()), expected);
}

#[test]
fn a_command_that_cannot_run_exits_127_or_126() {
    let dir = Scratch::new("notfound");
    let mut agent = ChildGuard::spawn(&mut sidecar(&dir, &[], &["burrow-no-such-command", "arg"]));
    assert_eq!(exit_code(&mut agent, &dir), Some(127), "{}", log(&dir));
    assert!(
        log(&dir).contains("`burrow-no-such-command`: command not found"),
        "{}",
        log(&dir)
    );

    let dir = Scratch::new("noexec");
    let script = dir.path("script.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").expect("write");
    let mut agent = ChildGuard::spawn(&mut sidecar(&dir, &[], &[script.to_str().expect("path")]));
    assert_eq!(exit_code(&mut agent, &dir), Some(126), "{}", log(&dir));
    assert!(log(&dir).contains("script.sh"), "{}", log(&dir));
}

#[test]
fn bad_configuration_exits_2_before_the_entrypoint_starts() {
    let dir = Scratch::new("badconfig");
    let script = format!("echo started > {}", dir.sh("started"));
    // No edge at all.
    let mut cmd = agent_command(Path::new(env!("CARGO_BIN_EXE_burrow-agent")), &dir);
    let mut agent = ChildGuard::spawn(cmd.args(["--", "sh", "-c", &script]));
    assert_eq!(exit_code(&mut agent, &dir), Some(2), "{}", log(&dir));
    assert!(log(&dir).contains("`edge`"), "{}", log(&dir));
    // A CA file that is not there: found by the TLS setup, still before the entrypoint.
    let mut agent = ChildGuard::spawn(&mut sidecar(
        &dir,
        &["--ca", "/nonexistent/ca.pem"],
        &["sh", "-c", &script],
    ));
    assert_eq!(exit_code(&mut agent, &dir), Some(2), "{}", log(&dir));
    assert!(log(&dir).contains("`ca`"), "{}", log(&dir));
    // A sidecar setting with a bad value.
    let mut agent = ChildGuard::spawn(
        sidecar(&dir, &[], &["sh", "-c", &script]).env("BURROW_KEEP_RUNNING", "perhaps"),
    );
    assert_eq!(exit_code(&mut agent, &dir), Some(2), "{}", log(&dir));
    assert!(log(&dir).contains("BURROW_KEEP_RUNNING"), "{}", log(&dir));
    assert!(!dir.path("started").exists(), "the entrypoint ran");
}

#[test]
fn keep_running_keeps_the_tunnel_after_the_entrypoint_exits() {
    let dir = Scratch::new("keep");
    let mut agent = agent_sh(
        &dir,
        &[
            "--keep-running",
            "--dial-timeout",
            "200ms",
            "--backoff-max",
            "200ms",
        ],
        "exit 3",
    );
    const EXITED: &str = "the entrypoint exited";
    const RETRY: &str = "cannot reach the edge";
    // The agent goes on dialing after the entrypoint is gone: a dial failure logged after it.
    wait_log(
        &dir,
        &mut agent,
        "dial after the entrypoint exited",
        |log| log.find(EXITED).is_some_and(|at| log[at..].contains(RETRY)),
    );
    assert!(
        agent.try_wait().expect("try_wait").is_none(),
        "{}",
        log(&dir)
    );
    agent.signal(Signal::SIGTERM);
    // Stopped, it exits with the entrypoint's code.
    assert_eq!(exit_code(&mut agent, &dir), Some(3), "{}", log(&dir));
}

/// As PID 1 of a new PID namespace, the agent reaps an orphaned grandchild, and still exits
/// with the entrypoint's own code.
#[test]
fn as_pid_1_orphans_are_reaped() {
    let dir = Scratch::new("pid1");
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match probe {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: unshare(1) is not installed");
            return;
        }
        Ok(out) if !out.status.success() => {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Operation not permitted") {
                eprintln!("skipped: unshare --pid is not permitted here: {err}");
                return;
            }
            panic!("unshare --pid --fork --mount-proc true failed: {err}");
        }
        Err(e) => panic!("unshare: {e}"),
        Ok(_) => {}
    }
    // The orphan: a shell whose parent (the subshell) exits at once, so it is handed to PID 1;
    // it dies when told to. The entrypoint then counts zombies in the namespace until none is
    // left (up to 5 s), writes the count, and exits 7.
    let script = format!(
        "(sh -c 'echo $$ > {orphan}.tmp; mv {orphan}.tmp {orphan}; \
              while [ ! -f {die} ]; do sleep 0.05; done' &); \
         while [ ! -f {orphan} ]; do sleep 0.05; done; \
         echo $PPID > {ppid}; touch {die}; \
         opid=$(cat {orphan}); while [ -d /proc/$opid ] && ! grep -q '^State:.*Z' /proc/$opid/status; do sleep 0.05; done; \
         i=0; while [ $i -lt 100 ]; do \
            z=$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' | wc -l); \
            [ \"$z\" -eq 0 ] && break; i=$((i+1)); sleep 0.05; done; \
         echo $z > {zombies}; exit 7",
        orphan = dir.sh("orphan"),
        die = dir.sh("die"),
        ppid = dir.sh("ppid"),
        zombies = dir.sh("zombies"),
    );
    let mut cmd = agent_command(Path::new("unshare"), &dir);
    let mut agent = ChildGuard::spawn(
        cmd.args(["--pid", "--fork", "--mount-proc"])
            .arg(env!("CARGO_BIN_EXE_burrow-agent"))
            .args(["--edge", "127.0.0.1:9", "--", "sh", "-c", &script]),
    );
    let zombies = wait_file(&dir.path("zombies"), &mut agent, &dir);
    assert_eq!(exit_code(&mut agent, &dir), Some(7), "{}", log(&dir));
    // The entrypoint's parent was the agent, and it was PID 1.
    let ppid = std::fs::read_to_string(dir.path("ppid")).expect("ppid");
    assert_eq!(ppid.trim(), "1");
    assert_eq!(
        zombies.trim(),
        "0",
        "zombies left; the agent's log:\n{}",
        log(&dir)
    );
}
