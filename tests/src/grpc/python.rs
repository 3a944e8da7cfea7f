//! grpcio's side: the echo service and a scripted client, `tests/python/grpc_echo.py`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use burrow_testkit::{AsyncChildGuard, Lines, WAIT};

use super::Method;

/// The Python of the test virtualenv, which has grpcio (`bash tests/run --install-only`).
pub fn python() -> PathBuf {
    crate::devservers::venv().join("bin/python")
}

/// `tests/python/grpc_echo.py`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_echo.py")
}

/// What to do when grpcio is missing.
const INSTALL: &str = "run `bash tests/run --install-only`: it installs grpcio into the test \
                       virtualenv (BURROW_TEST_VENV, default ~/.cache/burrow/test-venv)";

/// grpcio's echo service, `grpc_echo.py serve 0`, killed on drop.
#[derive(Debug)]
pub struct PythonServer {
    /// The port it bound on 127.0.0.1.
    pub port: u16,
    /// What it printed: `seen {method} {metadata as JSON}` per call, `ended {cancelled |
    /// deadline}` when a `Wait` call ends.
    pub lines: Lines,
    _child: AsyncChildGuard,
}

impl PythonServer {
    /// The metadata of the latest call of `method`, as the server printed it (a JSON object;
    /// grpcio keeps `grpc-timeout` to itself: `Wait` adds its `time_remaining` instead).
    pub fn last(&self, method: Method) -> Option<serde_json::Value> {
        let prefix = format!("seen {} ", method.path());
        let text = self.lines.text();
        let line = text.lines().rev().find(|l| l.starts_with(&prefix))?;
        Some(serde_json::from_str(&line[prefix.len()..]).expect("the server prints JSON"))
    }
}

/// Starts grpcio's echo service on a port of 127.0.0.1 it binds itself, and waits until it
/// serves (it prints `ready {port}`).
pub async fn python_server() -> PythonServer {
    let python = python();
    assert!(
        python.is_file(),
        "{} is missing: {INSTALL}",
        python.display()
    );
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(script())
        .args(["serve", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = AsyncChildGuard::spawn(&mut cmd);
    let lines = Lines::new();
    lines.read_async(child.stdout.take().expect("piped stdout"));
    lines.read_async(child.stderr.take().expect("piped stderr"));
    let ready = lines.wait_for_async("ready ", WAIT).await;
    let port = ready
        .trim_start_matches("ready ")
        .parse()
        .unwrap_or_else(|_| panic!("grpc_echo.py said `{ready}`, not `ready {{port}}`"));
    PythonServer {
        port,
        lines,
        _child: child,
    }
}

/// Runs grpcio's scripted client, `grpc_echo.py call`, against `target` (the edge's address)
/// with `authority` (`{port}-{key}.tunnel.localhost:{edge port}`), a bearer token, and TLS
/// trusting `ca` if given; returns the JSON object it prints (see the script for its fields).
pub async fn python_call(
    target: SocketAddr,
    authority: &str,
    token: Option<&str>,
    ca: Option<&Path>,
) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script())
        .args(["call", &target.to_string(), authority])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    let output = tokio::time::timeout(WAIT * 3, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("grpc_echo.py call did not finish within {:?}", WAIT * 3))
        .unwrap_or_else(|e| panic!("grpc_echo.py cannot start ({e}): {INSTALL}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "grpc_echo.py call: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        let stdout = String::from_utf8_lossy(&output.stdout);
        panic!("grpc_echo.py call printed no JSON ({e}): {stdout}\n{stderr}")
    })
}
