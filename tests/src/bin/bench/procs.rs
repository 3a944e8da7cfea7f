//! The benchmark's child processes, and what `/proc` says about them: CPU-seconds
//! (utime + stime) and resident memory (VmRSS) of a process and all its descendants (nginx's
//! workers are the master's children).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// `/proc/PID/stat` counts CPU time in USER_HZ ticks, which Linux fixes at 100 a second.
const TICKS_PER_SECOND: f64 = 100.0;

/// A child process the benchmark started; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages: `edge`, `rathole client`.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `{logs}/{file}.log`.
    pub fn spawn(name: &str, file: &str, cmd: &mut Command, logs: &Path) -> Result<Proc> {
        let log = logs.join(format!("{file}.log"));
        let out = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.as_std().get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// The process and its descendants.
    pub fn tree(&self) -> Vec<u32> {
        match self.child.id() {
            Some(pid) => tree(pid),
            None => Vec::new(),
        }
    }

    /// `Some(status)` if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// What its log says went wrong (a line with `Error`, `error` or `panicked`), else its
    /// last lines, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let cause = lines.iter().rev().find(|l| {
            ["Error", "error", "panicked", "ERROR"]
                .iter()
                .any(|w| l.contains(w))
        });
        match cause {
            Some(line) => line.trim().to_owned(),
            None => lines[lines.len().saturating_sub(3)..].join(" / "),
        }
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// kill -9, and reaped.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, up to 3 s to exit, then SIGKILL.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(3), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

impl Drop for Proc {
    /// A process still running (an interrupted run) goes with its descendants: nginx's
    /// workers would outlive a killed master.
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            for p in tree(pid).into_iter().rev() {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
        }
    }
}

/// CPU-seconds (user + system) a process has used, threads included.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_fields(pid).map_or(0.0, |f| {
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // Fields after the command name: state is field 3, utime 14, stime 15.
        (ticks(11) + ticks(12)) as f64 / TICKS_PER_SECOND
    })
}

/// Resident memory of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `pid` and every process descended from it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(child).and_then(|f| f.get(1)?.parse().ok()) {
                parents.entry(ppid).or_default().push(child);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(children) = parents.get(&out[i]) {
            out.extend(children);
        }
        i += 1;
    }
    out
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Raises this process's open-file limit to its hard limit (children inherit it): 10,000
/// WebSockets need 10,000 sockets in the client and more in each tunnel process.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

/// Where `name` is on PATH (or in /usr/sbin, where Debian puts nginx).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `true` if `/proc` shows the current user as root (nginx then needs `user root;` to read the
/// benchmark's temporary files).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}
