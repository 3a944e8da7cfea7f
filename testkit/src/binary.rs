//! The workspace's binaries, for tests that run them as processes.
//!
//! Cargo builds a package's own binaries for its integration tests (`CARGO_BIN_EXE_<name>`),
//! and no other package's: `cargo test -p burrow-tests` alone builds no `burrow-agent`, and a
//! `target/debug/burrow-agent` left by an earlier build may be stale. So [`binary`] builds the
//! binary itself, `cargo build -p <package> --bin <name>` for the profile and target directory
//! the test was built with, once per name per test process, and returns its path. When the
//! binary is up to date that build only checks, in a fraction of a second; it always runs, so
//! a stale binary is never used.
//!
//! The nested cargo shares the outer one's target directory, and with it everything already
//! built. It does not wait on the outer `cargo test`: cargo holds the target directory's locks
//! while it compiles, not while the tests it built run (tried: `cargo test -p burrow-tests
//! --test ops` with `target/debug/burrow-agent` deleted builds it from inside the test). Two
//! test processes that build at the same time take turns on those locks, as two cargo commands
//! do. The nested build selects only the binary's package, so cargo may unify dependency
//! features differently than for the test and compile some dependencies once more, the first
//! time.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The package that owns each binary a test may ask for.
const PACKAGES: [(&str, &str); 6] = [
    ("burrow-agent", "burrow-agent"),
    ("burrow-edge", "burrow-quickstart"),
    ("burrow", "burrow-client"),
    ("bench", "burrow-tests"),
    ("recovery", "burrow-tests"),
    ("soak", "burrow-tests"),
];

/// The path of the workspace binary `name` (`burrow-agent`, `burrow-edge`, `burrow`, `bench`,
/// `recovery`, `soak`), built for this test's profile if this process has not built it yet. Panics
/// with cargo's output if the build fails.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    // Held through the build: another test thread asking for a binary waits for it.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let path = build(name);
    built.insert(name.to_owned(), path.clone());
    path
}

/// Runs `cargo build` for `name`; its path.
fn build(name: &str) -> PathBuf {
    let package = PACKAGES
        .iter()
        .find(|(bin, _)| *bin == name)
        .map(|(_, package)| *package)
        .unwrap_or_else(|| {
            let known: Vec<&str> = PACKAGES.iter().map(|(bin, _)| *bin).collect();
            panic!("no workspace binary `{name}`: the kit builds {known:?}")
        });
    let out = Output::of_this_test();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(workspace().join("Cargo.toml"))
        .args(["--package", package, "--bin", name])
        .arg("--target-dir")
        .arg(&out.target_dir)
        .args(out.profile_args());
    if let Some(triple) = &out.triple {
        cmd.arg("--target").arg(triple);
    }
    let result = cmd
        .output()
        .unwrap_or_else(|e| panic!("{} cannot run: {e}", Path::new(&cargo).display()));
    assert!(
        result.status.success(),
        "`{cmd:?}` failed ({}):\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    let path = out.profile_dir.join(name);
    assert!(
        path.is_file(),
        "`{cmd:?}` succeeded, but there is no {}",
        path.display()
    );
    path
}

/// The workspace root: the kit's parent directory.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kit lives in the workspace")
}

/// Where the running test's binaries are.
#[derive(Debug)]
struct Output {
    /// The target directory (`target`, or `CARGO_TARGET_DIR`).
    target_dir: PathBuf,
    /// `--target`'s triple, if the test was built with one.
    triple: Option<OsString>,
    /// `target[/triple]/<profile>`.
    profile_dir: PathBuf,
}

impl Output {
    /// Read off the test executable's path: `<target dir>[/<triple>]/<profile>/deps/<test>`
    /// for a test, `<...>/<profile>/<binary>` for a binary. Cargo tags the target directory
    /// with a `CACHEDIR.TAG`, which tells it apart from a triple's directory.
    fn of_this_test() -> Output {
        let exe = std::env::current_exe().expect("the test executable's path");
        let dir = exe.parent().expect("the executable's directory");
        let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
            dir.parent().expect("deps is in the profile's directory")
        } else {
            dir
        };
        let above = profile_dir
            .parent()
            .expect("the profile's directory is in the target directory");
        let (target_dir, triple) = if above.join("CACHEDIR.TAG").is_file() {
            (above, None)
        } else {
            let target_dir = above.parent().expect("a triple's directory has a parent");
            (target_dir, above.file_name().map(OsString::from))
        };
        Output {
            target_dir: target_dir.to_owned(),
            triple,
            profile_dir: profile_dir.to_owned(),
        }
    }

    /// The cargo flags that build for the test's profile: the directory `debug` is the dev
    /// profile's (and the test profile's), `release` the release profile's, any other a custom
    /// profile's of that name.
    fn profile_args(&self) -> Vec<OsString> {
        match self.profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => Vec::new(),
            Some("release") => vec!["--release".into()],
            Some(other) => vec!["--profile".into(), other.into()],
            None => panic!("no profile in {}", self.profile_dir.display()),
        }
    }
}
