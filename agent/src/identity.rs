//! Who the agent says it is in its hello: a chain of instance ids, so the edge can tell this
//! agent restarted or reconnecting from a second agent holding the same token (a cloned devbox).
//!
//! Every connection attempt draws a fresh random `instance` and sends, as `previous`, the
//! instance of this agent's last connection the edge accepted (a welcome came back), 0 if none.
//! On a welcome that instance becomes `previous`, in memory and in `{state_dir}/instance`, which
//! the agent reads at start: a restarted agent (kill -9, `Restart=always`, a container restart)
//! continues the chain, and the edge closes its old connection instead of calling it a clone.
//!
//! A snapshot clone starts with the same file as its original, so the two send the same
//! `previous`. Whichever connects first continues the chain (the edge takes it for a restart);
//! the other's `previous` is then stale, no longer the live session's instance, and the edge
//! sees a clone. Without a usable `state_dir` the chain lives in memory only: a restart then
//! looks like a clone, as it did before the chain existed.

use std::io;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::session::Identity;

/// The file in `state_dir` that holds the last accepted instance, in decimal.
const FILE: &str = "instance";

/// This agent's instance chain: the last accepted instance, and where it is kept.
#[derive(Debug)]
pub struct Chain {
    /// `{state_dir}/instance`; `None` once the directory proved unusable.
    file: Option<PathBuf>,
    /// The instance of the last connection the edge accepted; 0 if none.
    previous: u64,
}

impl Chain {
    /// Continues the chain kept in `state_dir`, creating the directory if needed. Never fails:
    /// an unusable directory is logged once and the chain kept in memory only; an unreadable or
    /// garbled file is logged and the chain starts over.
    pub fn open(state_dir: &Path) -> Chain {
        Chain::open_slot(state_dir, 0)
    }

    /// [`Chain::open`] for one of the agent's connections: each keeps its own chain (each edge
    /// sees one of them), in `instance` for the first and `instance-{slot}` for the others.
    pub fn open_slot(state_dir: &Path, slot: usize) -> Chain {
        if let Err(e) = std::fs::create_dir_all(state_dir) {
            unusable(state_dir, &e);
            return Chain {
                file: None,
                previous: 0,
            };
        }
        let file = match slot {
            0 => state_dir.join(FILE),
            n => state_dir.join(format!("{FILE}-{n}")),
        };
        let previous = match read(&file) {
            Ok(previous) => previous,
            Err(e) => {
                warn!(path = %file.display(), error = %e, "cannot read the agent's last instance; starting a new chain (the edge may take this agent for a clone once)");
                0
            }
        };
        Chain {
            file: Some(file),
            previous,
        }
    }

    /// The identity for the next connection attempt: a fresh instance, the chain's `previous`.
    pub fn next(&self, takeover: bool) -> Identity {
        Identity {
            instance: random_instance(),
            previous: self.previous,
            takeover,
        }
    }

    /// The instance of the last connection the edge accepted; 0 if none.
    pub fn previous(&self) -> u64 {
        self.previous
    }

    /// Records that the edge accepted `instance`: it is `previous` from now on, here and in
    /// the file. A failed write is logged once and the chain kept in memory from then on.
    pub fn accepted(&mut self, instance: u64) {
        self.previous = instance;
        let Some(file) = &self.file else { return };
        if let Err(e) = write(file, instance) {
            let dir = file.parent().unwrap_or(file);
            unusable(dir, &e);
            self.file = None;
        }
    }
}

/// The one warning for a `state_dir` the agent cannot use.
fn unusable(dir: &Path, e: &io::Error) {
    warn!(
        state_dir = %dir.display(),
        error = %e,
        "cannot use `state_dir` (BURROW_STATE_DIR, --state-dir); running without it: if this \
         agent restarts, the edge takes it for a second agent (a cloned devbox) once"
    );
}

/// The instance in `file`; 0 if there is no file yet.
fn read(file: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(file) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not a decimal instance id")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Writes `instance` to `file` through a temporary file and a rename, so a crash leaves the old
/// value or the new one, never half of one. No fsync: losing the last value to a power cut
/// costs one restart seen as a clone.
fn write(file: &Path, instance: u64) -> io::Result<()> {
    let temp = file.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&temp, format!("{instance}\n"))?;
    std::fs::rename(&temp, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
}

/// A random instance id, never 0 (which means "none" as `previous`). No secret: fastrand's
/// thread-local generator, randomly seeded.
fn random_instance() -> u64 {
    fastrand::u64(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_continues_the_chain_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut first = Chain::open(&state);
        assert_eq!(first.previous(), 0, "no file yet: a new chain");
        let hello = first.next(true);
        assert_ne!(hello.instance, 0);
        assert_eq!(hello.previous, 0);
        first.accepted(hello.instance);
        let again = first.next(true);
        assert_eq!(again.previous, hello.instance, "a reconnect continues it");
        assert_ne!(
            again.instance, hello.instance,
            "a fresh instance per attempt"
        );

        let restarted = Chain::open(&state);
        assert_eq!(
            restarted.previous(),
            hello.instance,
            "a restart continues it"
        );
        let text = std::fs::read_to_string(state.join(FILE)).unwrap();
        assert_eq!(text, format!("{}\n", hello.instance));
        let left: Vec<_> = std::fs::read_dir(&state).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }

    #[test]
    fn only_an_accepted_instance_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut chain = Chain::open(dir.path());
        chain.accepted(41);
        let refused = chain.next(false);
        assert_eq!(refused.previous, 41);
        assert!(!refused.takeover);
        // The refused attempt's instance is never recorded: the next still names 41.
        assert_eq!(chain.next(true).previous, 41);
        assert_eq!(Chain::open(dir.path()).previous(), 41);
    }

    #[test]
    fn garbage_or_an_unreadable_file_starts_a_new_chain() {
        let dir = tempfile::tempdir().unwrap();
        for garbage in [
            "",
            "not a number\n",
            "-1",
            "18446744073709551616",
            "\u{fffd}",
        ] {
            std::fs::write(dir.path().join(FILE), garbage).unwrap();
            assert_eq!(Chain::open(dir.path()).previous(), 0, "{garbage:?}");
        }
        std::fs::write(dir.path().join(FILE), " 12 \n").unwrap();
        assert_eq!(Chain::open(dir.path()).previous(), 12, "whitespace is fine");
        // A directory where the file should be: unreadable, and the write fails too.
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        std::fs::create_dir(dir.path().join(FILE)).unwrap();
        let mut chain = Chain::open(dir.path());
        assert_eq!(chain.previous(), 0);
        chain.accepted(5);
        assert_eq!(chain.next(true).previous, 5, "kept in memory");
        assert!(
            chain.file.is_none(),
            "persistence is off after a failed write"
        );
    }

    #[test]
    fn an_unusable_state_dir_keeps_the_chain_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, "").unwrap();
        let mut chain = Chain::open(&blocker.join("state"));
        assert!(chain.file.is_none());
        chain.accepted(9);
        assert_eq!(chain.next(true).previous, 9);
    }
}
