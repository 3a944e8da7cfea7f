//! A real VM paused and continued: the release `burrow-agent` inside a QEMU guest (TCG; Debian's
//! kernel, busybox-static as the userland and as the devbox's service; `tests/vm/`), reaching
//! a test edge on the host's loopback through QEMU's user-mode network (the guest's 10.0.2.2).
//!
//! The guest is paused with QMP `stop` for 30 s, longer than the QUIC idle timeout (20 s), as a
//! devbox suspended by its platform or restored from a snapshot is, and continued with `cont`.
//! Under TCG every guest clock follows QEMU's virtual clock, which stops with the VM: the test
//! checks that CLOCK_BOOTTIME, CLOCK_MONOTONIC and CLOCK_REALTIME all stood still across the
//! pause, so the agent sees no time pass and only the network can tell it the connection is
//! gone. Twice in one guest: once as it is, once with the wall clock stepped to the host's right
//! after `cont` (NTP after a resume). Each time the first request through the tunnel must
//! answer 200 within [`BOUND`] of `cont`; the figures are printed (`-- --nocapture`), and
//! `bench/vm_resume.py` measures them over several trials.
//!
//! Needs `qemu-system-x86_64` and a static busybox (`tests/run` installs both); without them
//! the test says so and passes, except under CI (`CI=true`), where that is a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use burrow_tests::testkit::{AsyncChildGuard, Lines};
use burrow_tests::{TestEdge, WAIT, curl};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::ChildStdin;
use tokio::time::{Instant, timeout};

/// How long the guest stays paused: past QUIC's idle timeout (20 s), so the edge has given the
/// connection up by the time the guest runs again.
const PAUSE: Duration = Duration::from_secs(30);

/// The first request after `cont` must answer 200 within this: generous for a loaded 2-core
/// machine (the agent notices within a heartbeat interval and redials at once).
const BOUND: Duration = Duration::from_secs(5);

/// How far a guest clock may move across the pause beyond the time the guest actually ran
/// between the two samples (the samples' own run time under TCG, serial latency).
const SLACK: Duration = Duration::from_secs(2);

/// How long the guest may take from QEMU's start to its init's `ready`, and then to the first
/// 200 through the tunnel: about 4 s and 3 s on an idle 2-core machine (TCG translates all the
/// code it meets the first time), three times that while other builds load it.
const BOOT: Duration = Duration::from_secs(60);

/// The service's port inside the guest (busybox httpd on 127.0.0.1).
const SERVICE_PORT: u16 = 8080;

/// What the guest's httpd serves.
const BODY: &str = "hello from the guest\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_paused_past_the_idle_timeout_serves_again_after_cont() {
    if let Some(why) = missing_tools() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{why}: under CI the VM test must run (tests/run installs it)"
        );
        println!("skipped: {why}; `bash tests/run --install-only` installs it");
        return;
    }
    let target = TargetDir::of_this_test();
    let agent = target.release_agent().await;
    let (kernel, initramfs) = target.guest(&agent).await;

    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let url = edge.url(SERVICE_PORT, &key, "/");

    let booted = Instant::now();
    let mut guest = Guest::boot(&edge, &devbox.agent_token, &kernel, &initramfs).await;
    guest
        .console
        .wait_for_async("burrow-guest: ready", BOOT)
        .await;
    let ready = booted.elapsed();
    let (_, body) = first_200(&url, BOOT).await;
    assert_eq!(body, BODY, "the guest's service answers through the tunnel");
    println!(
        "guest booted: init ready {ready:?}, first 200 through the tunnel {:?} after QEMU started ({})",
        booted.elapsed(),
        guest
            .console
            .find("burrow-guest: clocksource", 0)
            .unwrap_or_default()
    );

    let frozen = guest.pause_and_continue(&url, After::Nothing).await;
    let stepped = guest.pause_and_continue(&url, After::ClockStep).await;
    println!(
        "first 200 after cont: {frozen:?} (clocks frozen), {stepped:?} (wall clock stepped after cont)"
    );
}

/// The first of `qemu-system-x86_64` and `busybox` that is not on PATH, as a reason to skip.
fn missing_tools() -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
    ]
    .into_iter()
    .find(|(tool, _)| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
    .map(|(tool, package)| format!("{tool} is not installed (Debian's {package})"))
}

/// The cargo target directory this test was built in.
struct TargetDir {
    /// `target`, or `CARGO_TARGET_DIR`.
    dir: PathBuf,
    /// `--target`'s triple, if the test was built with one.
    triple: Option<std::ffi::OsString>,
}

impl TargetDir {
    /// Read off the test executable's path, `<dir>[/<triple>]/<profile>/deps/vm-<hash>`; cargo
    /// tags the target directory with a `CACHEDIR.TAG`, which tells it apart from a triple's.
    fn of_this_test() -> TargetDir {
        let exe = std::env::current_exe().expect("the test executable's path");
        let above = exe
            .ancestors()
            .nth(3)
            .expect("a test runs from <target>/<profile>/deps");
        if above.join("CACHEDIR.TAG").is_file() {
            TargetDir {
                dir: above.to_owned(),
                triple: None,
            }
        } else {
            TargetDir {
                dir: above.parent().expect("a triple's directory").to_owned(),
                triple: above.file_name().map(Into::into),
            }
        }
    }

    /// Builds the release `burrow-agent` (what devboxes run; the test kit's `binary` builds
    /// the test's profile) and returns its path.
    async fn release_agent(&self) -> PathBuf {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ is in the workspace");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = tokio::process::Command::new(cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(workspace.join("Cargo.toml"))
            .args(["--release", "-p", "burrow-agent", "--bin", "burrow-agent"])
            .arg("--target-dir")
            .arg(&self.dir);
        let mut profile = self.dir.clone();
        if let Some(triple) = &self.triple {
            cmd.arg("--target").arg(triple);
            profile.push(triple);
        }
        let start = Instant::now();
        let out = cmd.output().await.expect("cargo runs");
        assert!(
            out.status.success(),
            "`{cmd:?}` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("release burrow-agent built in {:?}", start.elapsed());
        profile.join("release").join("burrow-agent")
    }

    /// The guest's kernel and initramfs with `agent` in it, from `tests/vm/build-guest.sh`
    /// (cached in `<target>/vm-guest`).
    async fn guest(&self, agent: &Path) -> (PathBuf, PathBuf) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/build-guest.sh");
        let start = Instant::now();
        let out = tokio::process::Command::new("bash")
            .arg(&script)
            .arg(agent)
            .arg(self.dir.join("vm-guest"))
            .output()
            .await
            .expect("bash runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} failed:\n{stdout}\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let path = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("build-guest.sh printed no {name}: {stdout}"))
        };
        println!("guest assembled in {:?}", start.elapsed());
        (path("kernel="), path("initramfs="))
    }
}

/// What happens right after `cont`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Nothing: the guest's clocks carry on from where they stopped.
    Nothing,
    /// The guest's wall clock is stepped to the host's, as NTP does after a resume.
    ClockStep,
}

/// A running guest: QEMU (killed on drop), its serial console (the guest's log and the test's
/// commands) and its QMP monitor.
struct Guest {
    _qemu: AsyncChildGuard,
    /// Everything the console printed (and QEMU's own stderr).
    console: Lines,
    input: ChildStdin,
    qmp: Qmp,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Starts QEMU with the agent's configuration for `edge` handed over through fw_cfg, and
    /// connects its QMP monitor.
    async fn boot(edge: &TestEdge, token: &str, kernel: &Path, initramfs: &Path) -> Guest {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = edge.edge();
        let config = format!(
            "# QEMU's user-mode network maps 10.0.2.2 to the host's 127.0.0.1.\n\
             edge = \"10.0.2.2:{}\"\n\
             server_name = \"{}\"\n\
             ca = \"/etc/burrow/agent-ca.pem\"\n\
             token_file = \"/etc/burrow/agent.token\"\n\
             state_dir = \"/tmp/burrow\"\n\
             [forward]\n\
             allow_ports = [{SERVICE_PORT}]\n",
            e.agents_addr.port(),
            e.server_name,
        );
        let ca = e
            .agent_ca
            .clone()
            .expect("the test edge generates its agent CA");
        let files = [
            ("agent.toml", dir.path().join("agent.toml")),
            ("agent.token", dir.path().join("agent.token")),
            ("agent-ca.pem", ca),
        ];
        std::fs::write(&files[0].1, config).expect("write agent.toml");
        std::fs::write(&files[1].1, token).expect("write agent.token");

        // QEMU connects to the test's listener: bound before QEMU starts, nothing to poll.
        let qmp_path = dir.path().join("qmp.sock");
        let qmp_listener = UnixListener::bind(&qmp_path).expect("bind the QMP socket");
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "512", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-nic", "user,model=e1000"])
            .args([
                "-chardev",
                "stdio,id=console,signal=off",
                "-serial",
                "chardev:console",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=qmp,path={}", qmp_path.display()))
            .args(["-mon", "chardev=qmp,mode=control"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initramfs)
            .args(["-append", "console=ttyS0 quiet panic=1"]);
        for (name, file) in &files {
            cmd.arg("-fw_cfg")
                .arg(format!("name=opt/burrow/{name},file={}", file.display()));
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut qemu = AsyncChildGuard::spawn(&mut cmd);
        let console = Lines::new();
        console.read_async(qemu.stdout.take().expect("piped stdout"));
        console.read_async(qemu.stderr.take().expect("piped stderr"));
        let input = qemu.stdin.take().expect("piped stdin");
        let (stream, _) = timeout(WAIT, qmp_listener.accept())
            .await
            .unwrap_or_else(|_| panic!("QEMU did not connect to QMP:\n{}", console.text()))
            .expect("accept QMP");
        let qmp = Qmp::handshake(stream).await;
        Guest {
            _qemu: qemu,
            console,
            input,
            qmp,
            _dir: dir,
        }
    }

    /// Types a command line on the guest's console (its init runs each line).
    async fn send(&mut self, line: &str) {
        self.input
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the guest's console");
        self.input.flush().await.expect("flush");
    }

    /// The guest's clocks from the `burrow-clocks:` line after console line `from`.
    async fn clocks_line(&self, from: usize) -> GuestClocks {
        let line = self
            .console
            .wait_for_from_async("burrow-clocks:", from, WAIT)
            .await;
        GuestClocks::parse(&line)
    }

    /// Samples the guest's clocks; the host's instant the command was sent at.
    async fn clocks(&mut self) -> (GuestClocks, Instant) {
        let from = self.console.len();
        let sent = Instant::now();
        self.send("clocks").await;
        (self.clocks_line(from).await, sent)
    }

    /// Pauses the guest for [`PAUSE`], continues it (then does `after`), checks that its
    /// clocks stood still meanwhile and that the tunnel serves within [`BOUND`] of `cont`; the
    /// time to that first 200.
    async fn pause_and_continue(&mut self, url: &str, after: After) -> Duration {
        let what = match after {
            After::Nothing => "paused, continued",
            After::ClockStep => "paused, continued, wall clock stepped",
        };
        let (before, before_at) = self.clocks().await;
        self.qmp.execute("stop").await;
        let stopped = Instant::now();
        // The pause is the scenario: the guest is frozen for this long.
        tokio::time::sleep(PAUSE).await;
        let from = self.console.len();
        let resumed = Instant::now();
        self.qmp.execute("cont").await;
        let paused = resumed.duration_since(stopped);
        let after_at = Instant::now();
        let epoch = unix_now().as_secs();
        match after {
            After::Nothing => self.send("clocks").await,
            // The clocks first, so the sample shows them before the step.
            After::ClockStep => self.send(&format!("clocks; step_clock {epoch}")).await,
        }
        let (tries, body) = first_200(url, BOUND).await;
        let first = resumed.elapsed();
        assert_eq!(body, BODY);
        assert!(
            first < BOUND,
            "{what}: the first 200 came {first:?} after cont ({tries} tries)"
        );

        let sample = self.clocks_line(from).await;
        let host = after_at.duration_since(before_at);
        let ran = host.saturating_sub(paused);
        println!(
            "{what}: paused {paused:?}; across it the host's clock moved {host:?}, the guest's \
             boottime {:.3} s, monotonic {:.3} s, realtime {:.3} s",
            sample.boottime - before.boottime,
            sample.monotonic - before.monotonic,
            sample.realtime - before.realtime,
        );
        for (clock, moved) in [
            ("CLOCK_BOOTTIME", sample.boottime - before.boottime),
            ("CLOCK_MONOTONIC", sample.monotonic - before.monotonic),
            ("CLOCK_REALTIME", sample.realtime - before.realtime),
        ] {
            assert!(
                moved >= 0.0 && moved < (ran + SLACK).as_secs_f64(),
                "the guest's {clock} moved {moved:.3} s across a pause of {paused:?}: it should \
                 have stood still (the guest ran only {ran:?} of the {host:?} between samples)"
            );
        }
        if after == After::ClockStep {
            let line = self
                .console
                .wait_for_from_async("burrow-stepped:", from, WAIT)
                .await;
            let stepped: u64 = line
                .rsplit_once('=')
                .and_then(|(_, n)| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no time in `{line}`"));
            assert!(
                stepped.abs_diff(epoch) <= 2,
                "the guest's clock reads {stepped} after the step to {epoch}"
            );
            println!(
                "{what}: wall clock stepped by {:.1} s",
                epoch as f64 - sample.realtime
            );
            self.console
                .wait_for_from_async("resume detected", from, WAIT)
                .await;
        }
        println!("{what}: first 200 {first:?} after cont ({tries} tries); the guest said:");
        for line in self.console.text().lines().skip(from) {
            println!("  {line}");
        }
        first
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest console ---\n{}", self.console.text());
        }
    }
}

/// The guest's clocks, in seconds, as its init's `clocks` prints them:
/// `burrow-clocks: boottime=2.80 monotonic_ns=2849642873 realtime=1796590418.939707`.
#[derive(Debug, Clone, Copy)]
struct GuestClocks {
    boottime: f64,
    monotonic: f64,
    realtime: f64,
}

impl GuestClocks {
    fn parse(line: &str) -> GuestClocks {
        let field = |name: &str| -> f64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in `{line}`"))
        };
        GuestClocks {
            boottime: field("boottime="),
            monotonic: field("monotonic_ns=") / 1e9,
            realtime: field("realtime="),
        }
    }
}

/// QEMU's monitor protocol: one JSON object a line each way.
struct Qmp {
    reader: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Reads the greeting and leaves capabilities negotiation.
    async fn handshake(stream: tokio::net::UnixStream) -> Qmp {
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read).lines(),
            writer,
        };
        let greeting = qmp.next().await;
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities").await;
        qmp
    }

    /// Runs `command`; its `return` value. Events that come first are skipped.
    async fn execute(&mut self, command: &str) -> Value {
        let line = format!("{}\n", serde_json::json!({ "execute": command }));
        self.writer
            .write_all(line.as_bytes())
            .await
            .expect("write to QMP");
        loop {
            let reply = self.next().await;
            if let Some(ret) = reply.get("return") {
                return ret.clone();
            }
            assert!(reply.get("event").is_some(), "QMP {command}: {reply}");
        }
    }

    async fn next(&mut self) -> Value {
        let line = timeout(WAIT, self.reader.next_line())
            .await
            .expect("QMP answers in time")
            .expect("read QMP")
            .expect("QMP open");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent `{line}`: {e}"))
    }
}

/// GETs `url` with curl until it answers 200 (each try bounded by 10 s): the tries and the body.
/// Panics with the last answer after `bound`.
async fn first_200(url: &str, bound: Duration) -> (u32, String) {
    let start = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        let reply = curl(&["--max-time", "10", url]).await;
        if reply.code == 200 {
            return (tries, reply.body);
        }
        assert!(
            start.elapsed() < bound,
            "no 200 from {url} within {bound:?} ({tries} tries); last: {} {} {}",
            reply.code,
            reply.body,
            reply.stderr
        );
        // An immediate answer (503 from an edge that gave up waiting) is retried at a modest pace.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the host's clock is after 1970")
}
