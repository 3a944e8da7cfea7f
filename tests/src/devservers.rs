//! Real dev servers on loopback, for the tests of `rewrite_host` (tests/tests/devservers.rs):
//! JupyterLab from PyPI and Vite from the npm registry, the kind of server that refuses a
//! `Host` it does not know.
//!
//! - [`Jupyter::start`]: `jupyter-lab` from a virtualenv (`BURROW_TEST_VENV`, by default
//!   `~/.cache/burrow/test-venv`, where `.ci/run` installs it), with a token of its own, a
//!   temporary root and temporary config and runtime directories.
//! - [`Vite::start`]: `vite` in a temporary copy of `tests/fixtures/vite-app` (its
//!   `node_modules`, installed there by `.ci/run` with `npm ci`, linked entry by entry, so Vite's
//!   cache lands in the copy), which the test may edit.
//!
//! Both listen on a port of 127.0.0.1 reserved by the test kit ([`ReservedPort`]) and are
//! returned once they accept connections there (Jupyter prints its URL a moment before it
//! listens). They are told the port up front: both take a port 0 only by binding a port the
//! kernel chooses, closing it and binding it again (jupyter_server's `_find_http_port`, Vite's
//! `getAvailableEphemeralPort`), the bind-drop race inside the kernel's ephemeral range. A
//! reserved port lies outside that range, where no bind on `:0` lands, and no other test holds
//! it while the server runs. Each runs in a process group of
//! its own; dropping the fixture sends the group SIGTERM, waits a bounded time for the server
//! to exit (Jupyter shuts its kernels down then), and SIGKILLs what is left. A missing program
//! is a failure naming `bash .ci/run`, never a skip.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_testkit::ports::ReservedPort;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// The bound on a dev server's start: a few seconds on an idle machine, much more for a first
/// JupyterLab start on a loaded 2-core one.
pub const START: Duration = Duration::from_secs(60);

/// How long a dropped server gets to exit after SIGTERM before its group is killed.
const STOP: Duration = Duration::from_secs(10);

/// What to do when a dev server is not installed.
const INSTALL: &str = "run `bash .ci/run`: it installs JupyterLab into a virtualenv \
                       (BURROW_TEST_VENV, default ~/.cache/burrow/test-venv) and runs `npm ci` \
                       in tests/fixtures/vite-app";

/// The virtualenv that holds JupyterLab: `BURROW_TEST_VENV`, else `~/.cache/burrow/test-venv`.
pub fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("BURROW_TEST_VENV") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/burrow/test-venv")
}

/// A JupyterLab server on `127.0.0.1:{port}`.
#[derive(Debug)]
pub struct Jupyter {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The token its API and pages want (`Authorization: token ...` or `?token=`).
    pub token: String,
    /// The running server.
    pub server: DevServer,
    /// The port's reservation, given up after the server has stopped.
    _port: ReservedPort,
}

impl Jupyter {
    /// Starts `jupyter-lab` from [`venv`] and waits until it accepts connections.
    pub async fn start() -> Jupyter {
        let bin = venv().join("bin/jupyter-lab");
        assert!(bin.is_file(), "{} is missing: {INSTALL}", bin.display());
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["root", "config", "runtime", "data", "ipython"] {
            std::fs::create_dir(dir.path().join(sub)).expect("create a temporary directory");
        }
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let token = random_token();
        let mut cmd = Command::new(&bin);
        cmd.arg("--no-browser")
            .arg("--ServerApp.ip=127.0.0.1")
            .arg(format!("--ServerApp.port={port}"))
            .arg("--ServerApp.port_retries=0")
            .arg(format!("--IdentityProvider.token={token}"))
            .arg(format!(
                "--ServerApp.root_dir={}",
                dir.path().join("root").display()
            ))
            // CI runs as root.
            .arg("--ServerApp.allow_root=True")
            // Nothing of the user's Jupyter setup, and nothing written into it.
            .env("JUPYTER_CONFIG_DIR", dir.path().join("config"))
            .env("JUPYTER_RUNTIME_DIR", dir.path().join("runtime"))
            .env("JUPYTER_DATA_DIR", dir.path().join("data"))
            .env("IPYTHONDIR", dir.path().join("ipython"))
            .env("JUPYTER_PLATFORM_DIRS", "1")
            .current_dir(dir.path());
        let mut server = DevServer::spawn("jupyter-lab", cmd, dir);
        server.wait_listening(port, START).await;
        Jupyter {
            port,
            token,
            server,
            _port: reserved,
        }
    }
}

/// A Vite dev server on `127.0.0.1:{port}`, serving a copy of `tests/fixtures/vite-app`.
#[derive(Debug)]
pub struct Vite {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The app it serves: a temporary copy of the fixture, the test's to edit.
    pub app: PathBuf,
    /// The running server.
    pub server: DevServer,
    /// The port's reservation, given up after the server has stopped.
    _port: ReservedPort,
}

impl Vite {
    /// Copies the fixture app, starts `vite --host 127.0.0.1 --port {reserved} --strictPort` in
    /// the copy and waits until it accepts connections.
    pub async fn start() -> Vite {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vite-app");
        let modules = fixture.join("node_modules");
        assert!(
            modules.join(".bin/vite").is_file(),
            "{} is missing: {INSTALL}",
            modules.join(".bin/vite").display()
        );
        assert!(
            on_path("node"),
            "`node` is not on PATH: {INSTALL} (it installs Debian's nodejs if missing)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let app = dir.path().join("app");
        copy_app(&fixture, &app);
        link_modules(&modules, &app.join("node_modules"));
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let mut cmd = Command::new(app.join("node_modules/.bin/vite"));
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--strictPort")
            .env("NO_COLOR", "1")
            .current_dir(&app);
        let mut server = DevServer::spawn("vite", cmd, dir);
        server.wait_listening(port, START).await;
        Vite {
            port,
            app,
            server,
            _port: reserved,
        }
    }
}

/// A server process in a process group of its own, its output collected, its temporary
/// directory kept until it has stopped.
#[derive(Debug)]
pub struct DevServer {
    name: &'static str,
    child: Child,
    log: watch::Receiver<String>,
    readers: JoinSet<()>,
    _dir: tempfile::TempDir,
}

impl DevServer {
    /// Spawns `cmd` (stdin closed, stdout and stderr collected) in a new process group.
    fn spawn(name: &'static str, mut cmd: Command, dir: tempfile::TempDir) -> DevServer {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name} cannot start ({e}): {INSTALL}"));
        let (tx, log) = watch::channel(String::new());
        let tx = Arc::new(tx);
        let mut readers = JoinSet::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        readers.spawn(collect(stdout, tx.clone()));
        readers.spawn(collect(stderr, tx));
        DevServer {
            name,
            child,
            log,
            readers,
            _dir: dir,
        }
    }

    /// Everything the server printed so far (stdout and stderr, line by line).
    pub fn log(&self) -> String {
        self.log.borrow().clone()
    }

    /// Waits (up to `within`) until the server has printed `text`; panics with its output
    /// if it does not.
    pub async fn wait_for_log(&self, text: &str, within: Duration) {
        let mut log = self.log.clone();
        let seen = timeout(within, log.wait_for(|log| log.contains(text))).await;
        assert!(
            matches!(seen, Ok(Ok(_))),
            "{} did not print `{text}` within {within:?}:\n{}",
            self.name,
            self.log()
        );
    }

    /// Waits until the server accepts connections on `127.0.0.1:{port}`; panics with its
    /// output if it exits first or takes longer than `within`. Nothing tells a listener from
    /// outside the process but a connection: the port is tried every 50 ms.
    pub async fn wait_listening(&mut self, port: u16, within: Duration) {
        let name = self.name;
        let listening = async {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let outcome = timeout(within, async {
            tokio::select! {
                status = self.child.wait() => Err(status),
                () = listening => Ok(()),
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(status)) => {
                // Let the readers take in the last lines.
                let _ = timeout(Duration::from_secs(2), async {
                    while self.readers.join_next().await.is_some() {}
                })
                .await;
                panic!(
                    "{name} exited ({status:?}) before listening on port {port}:\n{}",
                    self.log()
                )
            }
            Err(_) => panic!(
                "{name} did not listen on port {port} within {within:?}:\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else {
            return; // already reaped
        };
        // The child leads its group (`process_group(0)`): the group id is its pid.
        let group = Pid::from_raw(i32::try_from(pid).expect("a pid fits in i32"));
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + STOP;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (the server if it ignored SIGTERM, its helpers).
        let _ = killpg(group, Signal::SIGKILL);
    }
}

/// Appends each line of `out` to the log.
async fn collect(out: impl AsyncRead + Unpin, log: Arc<watch::Sender<String>>) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.send_modify(|text| {
            text.push_str(&line);
            text.push('\n');
        });
    }
}

/// Copies the fixture app's files (not its `node_modules`) to `to`.
fn copy_app(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the app's copy");
    for entry in std::fs::read_dir(from).expect("read the fixture app") {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name();
        if name == "node_modules" {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            copy_app(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).expect("copy a fixture file");
        }
    }
}

/// Makes `to` a directory of links to each entry of `modules` but Vite's cache (`.vite`), so
/// the copy runs the installed packages and Vite writes its cache into the copy.
fn link_modules(modules: &Path, to: &Path) {
    std::fs::create_dir(to).expect("create node_modules in the copy");
    for entry in std::fs::read_dir(modules).expect("read the fixture's node_modules") {
        let entry = entry.expect("a directory entry");
        if entry.file_name() == ".vite" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), to.join(entry.file_name()))
            .expect("link a package");
    }
}

/// Whether `program` is an executable file in a directory of PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(program).is_file()))
}

/// 32 random hex digits (the standard library's per-process random hash keys).
pub fn random_token() -> String {
    let a = RandomState::new().hash_one(std::process::id());
    let b = RandomState::new().hash_one(Instant::now());
    format!("{a:016x}{b:016x}")
}
