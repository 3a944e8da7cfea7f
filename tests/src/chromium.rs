//! A real browser for end-to-end tests: headless Chromium driven over the Chrome DevTools
//! Protocol (CDP), with nothing but a WebSocket (what Puppeteer and Playwright do underneath).
//!
//! [`Chromium::start`] runs `chromium --headless=new` on a throwaway profile with
//! `--remote-debugging-port=0`, reads the browser's DevTools address from its stderr and
//! connects to it. [`Chromium::page`] opens a tab, in the default browser context or in a fresh
//! one ([`Chromium::new_context`]: its own cookie jar, like a private window), attached as a flat
//! session on the same connection. A [`Page`] navigates and waits for the load of that very
//! document, evaluates JavaScript (awaiting promises), and keeps the events of each load so a
//! test sees the HTTP status and the redirects like the browser did. Every wait is bounded by
//! [`STEP`]. Dropping the [`Chromium`] kills its process group.
//!
//! Chromium missing is a failure, not a skip: the message says to run `.ci/run`, which installs
//! Debian's `chromium`. `--no-sandbox` is always passed: Chromium refuses to run as root (CI
//! containers) with its sandbox, and it only opens the tests' own pages. Tunnel hosts need no
//! DNS: test domains are under `localhost`, which Chromium resolves to loopback by itself.

mod cdp;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use cdp::{Conn, str_at};
pub use cdp::{Load, Page, Redirect};

/// The bound on each browser step (a command's answer, a load, an event): generous for a
/// loaded 2-core machine, where a page load takes well under a second.
pub const STEP: Duration = Duration::from_secs(30);

/// The bound on Chromium's start, until DevTools listens (a second or two on an idle machine).
const START: Duration = Duration::from_secs(60);

/// What to do when Chromium is not installed.
const INSTALL: &str = "this test needs a real browser: run `bash .ci/run` (it installs Debian's \
                       `chromium`), or `apt-get install chromium` yourself";

/// The names Chromium goes by on `PATH`, Debian's first.
const NAMES: &[&str] = &[
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
];

/// How many lines of Chromium's stderr are kept for failure messages.
const LOG_LINES: usize = 200;

/// A running headless Chromium and a DevTools connection to it.
#[derive(Debug)]
pub struct Chromium {
    conn: Arc<Conn>,
    /// Reads the connection; aborted on drop, before the process is killed.
    reader: JoinHandle<()>,
    _process: Process,
}

/// A browser context (`Target.createBrowserContext`): cookies and cache of its own.
#[derive(Debug, Clone)]
pub struct Context(String);

impl Chromium {
    /// Starts Chromium on a fresh profile and connects to its DevTools endpoint.
    pub async fn start() -> Chromium {
        let program = find().unwrap_or_else(|| {
            panic!(
                "no Chromium on PATH (looked for {}): {INSTALL}",
                NAMES.join(", ")
            )
        });
        // The profile, and the places Chromium writes to outside it (crash reports in
        // `$XDG_CONFIG_HOME`, caches in `$XDG_CACHE_HOME`), all in one temporary directory.
        let home = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new(&program)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                // Containers often have a small /dev/shm; Chromium crashes when it fills up.
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                // No calls home (there is no network here) and no proxy from the environment:
                // only the test's own loopback traffic.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-proxy-server",
                "--remote-debugging-port=0",
            ])
            .arg(format!(
                "--user-data-dir={}",
                home.path().join("profile").display()
            ))
            .arg("about:blank")
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("XDG_CACHE_HOME", home.path().join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that dropping it kills its renderers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{} cannot run: {e}: {INSTALL}", program.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (found, listening) = oneshot::channel();
        // A thread, not a task: it blocks on the pipe, which it keeps draining to the end so that
        // Chromium never blocks on a full stderr.
        let lines = log.clone();
        std::thread::spawn(move || read_stderr(stderr, &lines, found));
        let process = Process {
            child,
            log,
            _home: home,
        };
        let url = match timeout(START, listening).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => panic!(
                "Chromium exited before its DevTools listened; its stderr:\n{}",
                process.log()
            ),
            Err(_) => panic!(
                "Chromium's DevTools did not listen within {START:?}; its stderr:\n{}",
                process.log()
            ),
        };
        let (conn, reader) = Conn::connect(&url, process.log.clone()).await;
        Chromium {
            conn,
            reader,
            _process: process,
        }
    }

    /// A new browser context, sharing nothing with the others (a private window).
    pub async fn new_context(&self) -> Context {
        let result = self
            .conn
            .call(None, "Target.createBrowserContext", json!({}))
            .await;
        Context(str_at(&result, "/browserContextId").to_owned())
    }

    /// Opens a tab on `about:blank`, in `context` or the default one, with the `Page` and
    /// `Network` domains and lifecycle events enabled.
    pub async fn page(&self, context: Option<&Context>) -> Page {
        let mut params = json!({ "url": "about:blank" });
        if let Some(Context(id)) = context {
            params["browserContextId"] = json!(id);
        }
        let target = self.conn.call(None, "Target.createTarget", params).await;
        let target = str_at(&target, "/targetId");
        let attached = self
            .conn
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await;
        let session = str_at(&attached, "/sessionId");
        Page::attach(self.conn.clone(), session).await
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The Chromium process, its stderr's last lines and its directory (profile, config, cache).
#[derive(Debug)]
struct Process {
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    _home: tempfile::TempDir,
}

impl Process {
    fn log(&self) -> String {
        log_text(&self.log)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The whole group: the browser and the renderer, GPU and utility processes it started.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        // Reaped before its directory is removed.
        let _ = self.child.wait();
    }
}

/// Keeps Chromium's stderr lines and sends the DevTools address once it is printed
/// (`DevTools listening on ws://127.0.0.1:{port}/devtools/browser/{id}`).
fn read_stderr(
    stderr: std::process::ChildStderr,
    log: &Mutex<VecDeque<String>>,
    found: oneshot::Sender<String>,
) {
    let mut found = Some(found);
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(url) = line.strip_prefix("DevTools listening on ") {
            if let Some(found) = found.take() {
                let _ = found.send(url.trim().to_owned());
            }
        }
        let mut log = log.lock().expect("lock");
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(line);
    }
}

/// The kept stderr lines, without the D-Bus complaints of a machine that has no D-Bus
/// (harmless: headless Chromium works without it).
fn log_text(log: &Mutex<VecDeque<String>>) -> String {
    let log = log.lock().expect("lock");
    let lines: Vec<&str> = log
        .iter()
        .map(String::as_str)
        .filter(|l| !l.contains(":ERROR:dbus/"))
        .collect();
    lines.join("\n")
}

/// The first Chromium on `PATH`.
fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    NAMES.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}
