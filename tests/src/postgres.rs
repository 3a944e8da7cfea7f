//! A throwaway PostgreSQL server on loopback, and `psql` to query it: a real database protocol
//! for tests of raw TCP tunnels (`burrow connect`).
//!
//! [`Postgres::start`] runs `initdb --auth=trust -U postgres` in a temporary directory, then
//! `pg_ctl start` listening on a Unix socket in that directory only, and returns once the
//! server accepts connections (`pg_ctl -w`). PostgreSQL refuses to run as root, so as root (CI
//! containers) both run as the `postgres` user through `runuser`, on a directory chowned to it.
//! Dropping the fixture stops the server (`pg_ctl stop -m immediate`).
//!
//! Its TCP port on 127.0.0.1 is a listener of the test's own, bound on `:0`, that relays each
//! connection byte for byte to the server's socket. PostgreSQL has no port 0; a TCP port told
//! to it would have to be chosen before it binds it, where another socket may take it. The
//! socket's directory is the fixture's alone, so its port number (5432, which only names the
//! socket file) is never in use.
//!
//! PostgreSQL missing is a failure, not a skip: the message says to run `.ci/run`, which
//! installs Debian's `postgresql` and `postgresql-client`. Debian keeps `initdb`, `pg_ctl` and
//! `postgres` in `/usr/lib/postgresql/{version}/bin`, off `PATH`; both places are searched.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixStream};
use tokio::process::Command;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use crate::WAIT;

/// The bound on `initdb` and on `pg_ctl start` (a second or two on an idle machine).
const START: Duration = Duration::from_secs(90);

/// The server's port: it only names its Unix socket (`.s.PGSQL.5432`) in the fixture's
/// directory.
const SOCKET_PORT: u16 = 5432;

/// What to do when PostgreSQL is not installed.
const INSTALL: &str = "this test needs a real PostgreSQL: run `bash .ci/run` (it installs \
                       Debian's `postgresql` and `postgresql-client`), or install them yourself";

/// A running PostgreSQL server on `127.0.0.1:{port}`, user `postgres`, trust authentication.
#[derive(Debug)]
pub struct Postgres {
    /// Its TCP port on 127.0.0.1 (the relay's).
    pub port: u16,
    /// The relay from the TCP port to the server's socket; stopped with the fixture.
    relay: JoinHandle<()>,
    /// The directory holding `initdb`, `pg_ctl` and `postgres`.
    bin: PathBuf,
    /// Whether the server runs as the `postgres` user (the test runs as root).
    as_postgres: bool,
    /// The data directory, the server log and the Unix socket.
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Creates a database cluster and starts a server, reached on a loopback port.
    pub async fn start() -> Postgres {
        let bin = server_bin().unwrap_or_else(|| {
            panic!("no `initdb` and `pg_ctl` on PATH nor in /usr/lib/postgresql/*/bin: {INSTALL}")
        });
        // Fail before starting anything if the client is missing too.
        psql_path();
        let dir = tempfile::tempdir().expect("tempdir");
        let as_postgres = running_as_root();
        if as_postgres {
            let chown = std::process::Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .output()
                .expect("chown(1) runs");
            assert!(
                chown.status.success(),
                "chown postgres: {} failed (is there a `postgres` user? {INSTALL}): {}",
                dir.path().display(),
                String::from_utf8_lossy(&chown.stderr)
            );
        }
        let listener = burrow_testkit::ports::tokio_listener().await;
        let port = listener
            .local_addr()
            .expect("a bound listener's address")
            .port();
        let socket = dir.path().join(format!(".s.PGSQL.{SOCKET_PORT}"));
        let server = Postgres {
            port,
            relay: tokio::spawn(relay(listener, socket)),
            bin,
            as_postgres,
            dir,
        };
        let data = server.data();
        let initdb: [OsString; 9] = [
            "-D".into(),
            data.into(),
            "--auth=trust".into(),
            "-U".into(),
            "postgres".into(),
            "--no-sync".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
        ];
        server.run("initdb", &initdb).await;
        server.pg_ctl_start().await;
        server
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`: the URL an edge's `cluster.store`
    /// takes.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Kills the server with SIGKILL (a crash: no shutdown, connections cut) and waits until
    /// it is gone. [`Postgres::start_again`] brings it back on the same port.
    pub async fn kill(&self) {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap_or_default();
        let pid = pid.lines().next().unwrap_or_default().to_owned();
        assert!(pid.parse::<u32>().is_ok(), "no postmaster pid: {pid:?}");
        // The postmaster and its children (backends, background workers) at once, as a crash
        // of the machine would: a child left behind would keep the shared memory in use and
        // refuse the next start.
        let mut pids = children(&pid);
        pids.push(pid);
        // A child may exit by itself meanwhile (kill(1) then fails for it): what matters is
        // that every one is gone, waited for below.
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status()
            .await;
        timeout(WAIT, async {
            while pids
                .iter()
                .any(|p| PathBuf::from(format!("/proc/{p}")).exists())
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the killed server exits");
    }

    /// Starts the server again after [`Postgres::kill`] (crash recovery, then accepting).
    pub async fn start_again(&self) {
        self.pg_ctl_start().await;
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    async fn pg_ctl_start(&self) {
        // pg_ctl hands `-o` to a shell: the socket directory is quoted.
        let options = format!(
            "-c listen_addresses='' -p {SOCKET_PORT} -k '{}' -c fsync=off",
            self.dir.path().display()
        );
        let start: [OsString; 10] = [
            "-D".into(),
            self.data().into(),
            "-l".into(),
            self.log().into(),
            "-o".into(),
            options.into(),
            "-w".into(),
            "-t".into(),
            START.as_secs().to_string().into(),
            "start".into(),
        ];
        self.run("pg_ctl", &start).await;
    }

    /// The server's log so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The command line that runs `program` from the server's directory, as `postgres` when
    /// the test runs as root.
    fn argv(&self, program: &str) -> Vec<OsString> {
        let path = self.bin.join(program).into_os_string();
        if self.as_postgres {
            vec![
                "runuser".into(),
                "-u".into(),
                "postgres".into(),
                "--".into(),
                path,
            ]
        } else {
            vec![path]
        }
    }

    /// Runs `program` to completion; panics with its output and the server log if it fails.
    async fn run(&self, program: &str, args: &[OsString]) {
        let argv = self.argv(program);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        without_pg_env(cmd.as_std_mut());
        let out = timeout(START, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{program} did not finish within {START:?}"))
            .unwrap_or_else(|e| panic!("{} cannot run: {e}", argv[0].to_string_lossy()));
        assert!(
            out.status.success(),
            "{program} failed ({}):\n{}{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.server_log()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.relay.abort();
        let data = self.data();
        let argv = self.argv("pg_ctl");
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg("-D")
            .arg(&data)
            .args(["stop", "-m", "immediate", "-w"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        without_pg_env(&mut cmd);
        if cmd.status().is_ok_and(|s| s.success()) {
            return;
        }
        // pg_ctl could not stop it (or it never started): kill the postmaster it recorded.
        let pid = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
        if let Some(pid) = pid.lines().next().filter(|p| p.parse::<u32>().is_ok()) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .status();
        }
    }
}

/// The processes whose parent is `pid`.
fn children(pid: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.parse::<u32>().is_ok())
        .filter(|name| {
            // `pid (comm) state ppid ...`: the command may hold spaces, so split after `)`.
            std::fs::read_to_string(format!("/proc/{name}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    == Some(pid)
            })
        })
        .collect()
}

/// Runs `sql` (any number of statements) with `psql` against `127.0.0.1:{port}` as user
/// `postgres`: the script on stdin, quiet, unaligned tuples only (`-q -At`), stopping at the
/// first error. Returns what psql printed, without the final newline; panics with psql's
/// stderr if it fails or takes longer than [`WAIT`].
pub async fn psql(port: u16, sql: &str) -> String {
    let mut cmd = Command::new(psql_path());
    cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .arg(format!("--port={port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    without_pg_env(cmd.as_std_mut());
    let mut child = cmd.spawn().expect("psql starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let script = sql.as_bytes().to_vec();
    // Written alongside the wait: a long script must not block on psql's full stdout.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&script).await;
        let _ = stdin.write_all(b"\n").await;
    });
    let out = timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("psql on port {port} did not finish within {WAIT:?}"))
        .expect("psql runs");
    let _ = writer.await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "psql on port {port} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned()
}

/// `psql`: on PATH (Debian's `postgresql-client` puts a wrapper there), else next to the server.
fn psql_path() -> PathBuf {
    path_dirs()
        .into_iter()
        .chain(debian_bins())
        .map(|dir| dir.join("psql"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no `psql` on PATH nor in /usr/lib/postgresql/*/bin: {INSTALL}"))
}

/// The first directory on PATH, then Debian's newest version directory, that holds both
/// `initdb` and `pg_ctl`.
fn server_bin() -> Option<PathBuf> {
    path_dirs()
        .into_iter()
        .chain(debian_bins())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

/// Debian's `/usr/lib/postgresql/{version}/bin`, newest version first.
fn debian_bins() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let major = name.split('.').next()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The test's own `PG*` settings (PGHOST, PGPORT, PGDATA, PGUSER, ...) would override the
/// fixture's: none reach the PostgreSQL programs.
fn without_pg_env(cmd: &mut std::process::Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            cmd.env_remove(name);
        }
    }
}

/// Accepts on `listener` and relays each connection to the server's Unix socket `socket`,
/// both ways, each direction's end passed on as a half-close; the relays end with this task.
async fn relay(listener: TcpListener, socket: PathBuf) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // A failed accept (a connection reset before it was taken) ends that one only.
                let Ok((mut tcp, _)) = accepted else { continue };
                // PostgreSQL sets TCP_NODELAY on its own sockets; without it here, Nagle held
                // each small reply for the client's delayed ACK: 40 ms stalls, ~120 ms per
                // admin write (measured by `bench cluster` registering devboxes).
                let _ = tcp.set_nodelay(true);
                let socket = socket.clone();
                connections.spawn(async move {
                    if let Ok(mut unix) = UnixStream::connect(&socket).await {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
