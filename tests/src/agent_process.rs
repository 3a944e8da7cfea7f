//! The real `burrow-agent` binary as a child process, for tests whose fault is a signal or
//! whose platform starts the agent itself.

use std::process::Stdio;
use std::time::Duration;

use crate::testkit::{AsyncChildGuard, Lines, Signal};
use crate::{Devbox, TestEdge, binary};

/// The `burrow-agent` binary running as a child process (killed on drop), its stderr
/// collected line by line.
#[derive(Debug)]
pub struct AgentProcess {
    /// The process.
    pub child: AsyncChildGuard,
    /// What it logged (stderr), line by line.
    pub log: Lines,
}

impl AgentProcess {
    /// Starts the agent for `devbox`, pointed at `edge` with flags, the token in
    /// BURROW_AGENT_TOKEN, and `env` on top. Nothing else from the test's `BURROW_*`
    /// environment reaches it. Its `state_dir` is a new one unless `env` names one
    /// (BURROW_STATE_DIR).
    pub fn spawn(edge: &TestEdge, devbox: &Devbox, env: &[(&str, &str)]) -> AgentProcess {
        let mut cmd = tokio::process::Command::new(binary("burrow-agent"));
        for (key, value) in edge.agent_flags(None) {
            let flag = match key {
                "edge" => "--edge",
                "server_name" => "--server-name",
                "ca" => "--ca",
                other => panic!("no flag for agent setting `{other}`"),
            };
            cmd.arg(flag).arg(value);
        }
        for (name, _) in std::env::vars() {
            if name.starts_with("BURROW_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("BURROW_AGENT_TOKEN", &devbox.agent_token)
            .env("BURROW_STATE_DIR", edge.agent_state_dir())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = AsyncChildGuard::spawn(&mut cmd);
        let log = Lines::new();
        log.read_async(child.stderr.take().expect("piped stderr"));
        AgentProcess { child, log }
    }

    /// Lines logged so far.
    pub fn lines(&self) -> usize {
        self.log.len()
    }

    /// Waits up to `bound` for a line after the first `from` lines containing `what`.
    pub async fn wait_log(&self, what: &str, from: usize, bound: Duration) -> String {
        self.log.wait_for_from_async(what, from, bound).await
    }

    /// Sends a signal.
    pub fn signal(&mut self, signal: Signal) {
        self.child.signal(signal);
    }

    /// Waits up to `bound` for the agent to exit; its exit code.
    pub async fn exit_code(&mut self, bound: Duration) -> i32 {
        let status = self.child.wait_within(bound).await;
        status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {status}"))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- burrow-agent log ---\n{}", self.log.text());
        }
    }
}
