//! The gRPC benchmark's processes: the kit's echo service as a process of its own
//! (`bench grpc-echo`, so its CPU is never a proxy's and it never shares the client's
//! runtime), and each system in front of it, started fresh and checked with a real call:
//! `direct` (nothing), `nginx` (`grpc_pass` to a keep-alive upstream), `burrow` (release edge
//! and agent, the same configuration as the main benchmark's).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::net::TcpSocket;
use tokio::process::Command;
use tokio::time::Instant;

use super::calls::{call, connect};
use crate::burrow::{edge_toml, register};
use crate::load::Target;
use crate::procs::{self, Proc};
use crate::systems::{DOMAIN, Running, System, accepting, failed, quiet, reserved_port, until_up};

/// How long a process gets to come up.
const PATIENCE: Duration = Duration::from_secs(20);

/// Serves the echo service on `listen` until the process is killed, on a 2-worker runtime
/// like the main benchmark's origin.
pub fn echo_main(listen: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        // Accepted connections inherit it (Linux): no Nagle delay on the service's side, like
        // the main benchmark's origin; tonic's server leaves it off by default.
        socket.set_nodelay(true)?;
        socket
            .bind(listen)
            .with_context(|| format!("grpc-echo: binding {listen}"))?;
        let listener = socket.listen(1024)?;
        // It keeps serving while this holds it.
        let _server = burrow_tests::grpc::serve(listener);
        std::future::pending::<Result<()>>().await
    })
}

/// Starts `bench grpc-echo` on a reserved loopback port, logging into `dir`.
pub async fn echo(exe: &Path, dir: &Path) -> Result<(Proc, SocketAddr)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], reserved_port()?));
    let mut cmd = Command::new(exe);
    cmd.arg("grpc-echo").arg("--listen").arg(addr.to_string());
    let proc = Proc::spawn("grpc echo", "grpc-echo", &mut cmd, dir)?;
    accepting(addr.port(), PATIENCE)
        .await
        .with_context(|| format!("the gRPC echo service did not start: {}", proc.log_tail()))?;
    Ok((proc, addr))
}

/// Where the systems' binaries are.
#[derive(Debug)]
pub struct Bins<'a> {
    /// The directory of `burrow-edge` and `burrow-agent`.
    pub burrow: &'a Path,
    /// nginx, if there is one.
    pub nginx: Option<&'a Path>,
}

/// Starts `system` in `dir` in front of the echo service at `echo`, and waits until a unary
/// call through it is answered.
pub async fn system(
    system: System,
    bins: &Bins<'_>,
    dir: &Path,
    echo: SocketAddr,
) -> Result<Running> {
    let mut running = match system {
        System::Direct => Running {
            system,
            target: Target {
                addr: echo,
                host: echo.to_string(),
            },
            h2: None,
            server: None,
            client: None,
            server_start: Duration::ZERO,
            client_start: Duration::ZERO,
        },
        System::Nginx => {
            let nginx = bins.nginx.context("nginx not found")?;
            start_nginx(nginx, dir, echo).await?
        }
        System::Burrow => start_burrow(bins.burrow, dir, echo).await?,
        other => bail!("{} has no gRPC configuration here", other.name()),
    };
    let target = running.target.clone();
    if let Err(e) = until_up(&mut running, answered(target)).await {
        return Err(failed(running, e).await);
    }
    Ok(running)
}

/// Makes unary calls, a new connection each, until one is answered with its echo.
async fn answered(target: Target) -> Result<()> {
    let t = Instant::now();
    let message = Bytes::from_static(b"ready?");
    loop {
        let attempt = async {
            let client = connect(&target).await?;
            call(&client, &message).await
        };
        let last = match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("no answer within 2 s"),
        };
        if t.elapsed() > PATIENCE {
            bail!(
                "no gRPC answer through {} within {PATIENCE:?}: {last:#}",
                target.addr
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// nginx with `grpc_pass` to the echo service, as a process of its own (`-p dir`, no daemon).
async fn start_nginx(nginx: &Path, dir: &Path, echo: SocketAddr) -> Result<Running> {
    let listen = reserved_port()?;
    let conf = dir.join("nginx.conf");
    let http2_on = crate::peers::http2_directive(nginx);
    std::fs::write(&conf, nginx_conf(dir, listen, echo.port(), http2_on))?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p").arg(dir).arg("-c").arg(&conf);
    cmd.arg("-e").arg(dir.join("error.log"));
    let server = Proc::spawn("nginx", "nginx", &mut cmd, dir)?;
    Ok(Running {
        system: System::Nginx,
        target: Target {
            addr: ([127, 0, 0, 1], listen).into(),
            host: format!("127.0.0.1:{listen}"),
        },
        h2: None,
        server: Some(server),
        client: None,
        server_start: Duration::ZERO,
        client_start: Duration::ZERO,
    })
}

/// nginx as one gRPC hop: h2c with prior knowledge on a plain listener, `grpc_pass` to a
/// keep-alive upstream (nginx opens an upstream connection per call in flight, and reuses
/// them), 64 KiB buffers like the main benchmark's nginx, no body size limit.
pub fn nginx_conf(dir: &Path, listen: u16, echo: u16, http2_on: bool) -> String {
    let d = dir.display();
    let user = if procs::is_root() { "user root;\n" } else { "" };
    let (listen_http2, http2) = if http2_on {
        ("", "    http2 on;\n")
    } else {
        (" http2", "")
    };
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 20000;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n{user}\
         events {{ worker_connections 20000; }}\n\
         http {{\n  access_log off;\n  tcp_nodelay on;\n\
           keepalive_requests 1000000;\n  keepalive_timeout 75s;\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream echo {{ server 127.0.0.1:{echo}; keepalive 256; keepalive_requests 1000000; }}\n\
           server {{\n    listen 127.0.0.1:{listen}{listen_http2} backlog=4096;\n{http2}\
             client_max_body_size 0;\n    client_body_buffer_size 64k;\n\
             location / {{\n      grpc_pass grpc://echo;\n      grpc_buffer_size 64k;\n\
               grpc_read_timeout 1h;\n      grpc_send_timeout 1h;\n    }}\n  }}\n}}\n"
    )
}

/// The release edge and agent, configured as [`crate::burrow::start`] does (rate limit off,
/// stream and connection bounds lifted), with an open tunnel to the echo service's port.
async fn start_burrow(bin_dir: &Path, dir: &Path, echo: SocketAddr) -> Result<Running> {
    let (http, agents, admin) = (reserved_port()?, reserved_port()?, reserved_port()?);
    let state = dir.join("state");
    let conf = dir.join("edge.toml");
    std::fs::write(&conf, edge_toml(&state, http, agents, admin))?;
    let mut cmd = Command::new(bin_dir.join("burrow-edge"));
    cmd.arg("serve").arg("--config").arg(&conf);
    let edge = Proc::spawn("edge", "edge", quiet(&mut cmd), dir)?;
    let mut running = Running {
        system: System::Burrow,
        target: Target {
            addr: ([127, 0, 0, 1], http).into(),
            host: String::new(),
        },
        h2: None,
        server: Some(edge),
        client: None,
        server_start: Duration::ZERO,
        client_start: Duration::ZERO,
    };
    let up = async {
        accepting(http, PATIENCE).await?;
        accepting(admin, PATIENCE).await?;
        register(&state, admin).await
    };
    let (key, agent_token) = match until_up(&mut running, up).await {
        Ok(r) => r,
        Err(e) => return Err(failed(running, e).await),
    };
    running.target.host = format!("{}-{key}.{DOMAIN}:{http}", echo.port());
    let mut cmd = Command::new(bin_dir.join("burrow-agent"));
    cmd.args(["--edge", &format!("127.0.0.1:{agents}")])
        .args(["--server-name", "localhost"])
        .arg("--ca")
        .arg(state.join("agent-ca.pem"))
        .args(["--max-streams", "20000", "--drain-grace", "1s"])
        .arg("--state-dir")
        .arg(dir.join("agent-state"))
        .env("BURROW_AGENT_TOKEN", agent_token);
    running.client = Some(Proc::spawn("agent", "agent", quiet(&mut cmd), dir)?);
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_takes_http2_where_its_version_wants_it() {
        let dir = Path::new("/tmp/x");
        let old = nginx_conf(dir, 8080, 9090, false);
        assert!(
            old.contains("listen 127.0.0.1:8080 http2 backlog=4096;"),
            "{old}"
        );
        assert!(!old.contains("http2 on;"));
        let new = nginx_conf(dir, 8080, 9090, true);
        assert!(new.contains("listen 127.0.0.1:8080 backlog=4096;"), "{new}");
        assert!(new.contains("http2 on;"));
        assert!(new.contains("grpc_pass grpc://echo;") && new.contains("127.0.0.1:9090"));
    }
}
