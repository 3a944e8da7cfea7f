//! What burrow's test suites share, so that none repeats its plumbing: the end-to-end harness
//! (`burrow-tests`), the agent's and the quickstart's own tests, and the benchmark use it. It
//! depends on no burrow crate, so every package can take it as a dev-dependency.
//!
//! # Layout
//!
//! - [`ports`]: loopback sockets bound on `127.0.0.1:0` and handed over whole, a port where
//!   nothing listens, and a port reserved for a server that must be told one up front.
//! - [`binary`]: the path of a workspace binary (`burrow-agent`, `burrow-edge`, `burrow`) for
//!   the test's profile, built by the kit with `cargo build` once per test process.
//! - [`process`]: child processes killed and reaped on drop, signalled, waited for within a
//!   bound, and their output collected line by line for a test to wait on.
//! - [`notify`]: systemd's side of `sd_notify`, a datagram socket that a process under test
//!   sends `READY=1`, `STATUS=`, `WATCHDOG=1` and `STOPPING=1` to.

#![forbid(unsafe_code)]

pub mod binary;
pub mod notify;
pub mod ports;
pub mod process;

use std::time::Duration;

pub use binary::binary;
pub use notify::NotifyManager;
pub use process::{AsyncChildGuard, ChildGuard, Lines, Signal};

/// How long a test waits for an event before failing: generous for a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);
