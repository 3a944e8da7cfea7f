//! burrow-quickstart: the one place that runs an edge and an agent together. `burrow-edge dev`,
//! the newcomer's first command, is an edge on loopback with generated credentials, a devbox
//! with an open tunnel, an agent for it, and a small demo service, so the printed `curl` line
//! works as printed. The edge library never links the agent; this crate links both, and so it
//! also builds the `burrow-edge` binary (`serve` from the edge library, `dev` from here).
//!
//! # Layout
//!
//! - [`run`]: the quickstart: edge, devbox, demo service, agent, banner, Ctrl-C.
//! - `src/main.rs`: the `burrow-edge` command line, `serve` and `dev`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use burrow_agent::Agent;
use burrow_protocol::AuthMode;
use http::{Response, header};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use burrow_edge::Config;
use burrow_edge::Edge;
use burrow_edge::registry::TunnelSpec;

/// The tunnel domain `dev` uses: `*.localhost` resolves to loopback in curl and browsers.
pub const DEV_DOMAIN: &str = "tunnel.localhost";

/// Options of `burrow-edge dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Public HTTP listener.
    pub http: SocketAddr,
    /// State directory; `None`: a temporary one, removed at exit.
    pub state_dir: Option<PathBuf>,
}

/// The devbox the quickstart registers.
const DEVBOX: &str = "dev";

/// Runs the dev setup until `shutdown` fires: the edge, the devbox and its tunnel, a demo
/// service, the agent, then the banner; at the end the agent and the edge stop in that order.
pub async fn run(options: DevOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let temp = match options.state_dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("burrow-dev-").tempdir()?),
    };
    let state_dir = options
        .state_dir
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_owned()))
        .context("no state directory")?;
    let edge = start_edge(options.http, &state_dir).await?;
    let (key, agent_token) = register_devbox(&edge)?;

    let demo = TcpListener::bind("127.0.0.1:0").await?;
    let demo_port = demo.local_addr()?.port();
    tokio::spawn(demo_service(demo, shutdown.clone()));

    let agent = start_agent(&edge, &state_dir, agent_token, shutdown.clone()).await?;
    print_banner(&edge, &key, demo_port, &state_dir)?;

    shutdown.cancelled().await;
    let _ = agent.task.await;
    edge.stop().await;
    if agent.status.borrow().connected {
        bail!("the agent did not stop");
    }
    Ok(())
}

/// An edge on loopback: public HTTP on `http`, agents and admin on ports of the system's choice.
async fn start_edge(http: SocketAddr, state_dir: &std::path::Path) -> anyhow::Result<Edge> {
    let text = format!(
        "domain = \"{DEV_DOMAIN}\"\n\
         [public]\nhttp = \"{http}\"\n\
         [agents]\nlisten = \"127.0.0.1:0\"\nserver_name = \"localhost\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut flags = vec![("state_dir", state_dir.display().to_string())];
    flags.retain(|(_, v)| !v.is_empty());
    let config = Config::load(
        Some(burrow_runtime::sources::File {
            path: std::path::Path::new("<dev>"),
            text: &text,
        }),
        &HashMap::new(),
        &flags,
    )?;
    Edge::start(config).await.context("starting the edge")
}

/// Registers the devbox with an open tunnel (raw TCP on: everything is on loopback) and returns
/// the tunnel key and a fresh agent token. A kept state directory starts over with a new token.
fn register_devbox(edge: &Edge) -> anyhow::Result<(String, burrow_edge::secret::Secret)> {
    let spec = TunnelSpec {
        raw_tcp: Some(true),
        ..TunnelSpec::new(AuthMode::Open)
    };
    if edge.registry.get(DEVBOX).is_some() {
        edge.registry.delete(DEVBOX)?;
    }
    let (_, agent_token, issued) = edge.registry.create(Some(DEVBOX.into()), Some(spec))?;
    let issued = issued.context("tunnel not issued")?;
    Ok((issued.record.key, agent_token))
}

/// The devbox's agent, in this process, trusting the edge's generated CA, its `state_dir` in
/// the edge's (`agent/`); returns once it is connected.
async fn start_agent(
    edge: &Edge,
    state_dir: &std::path::Path,
    agent_token: burrow_edge::secret::Secret,
    shutdown: CancellationToken,
) -> anyhow::Result<Agent> {
    let ca = edge.agent_ca.as_ref().context("no generated CA")?;
    let agent_config = burrow_agent::Config::load(
        None,
        &HashMap::from([(
            burrow_agent::config::TOKEN_ENV.to_owned(),
            agent_token.expose().to_owned(),
        )]),
        &[
            ("edge", edge.agents_addr.to_string()),
            ("server_name", edge.server_name.clone()),
            ("ca", ca.display().to_string()),
            ("state_dir", state_dir.join("agent").display().to_string()),
        ],
    )?;
    let agent = Agent::spawn(agent_config, shutdown);
    let mut status = agent.status.clone();
    tokio::time::timeout(Duration::from_secs(15), status.wait_for(|s| s.connected))
        .await
        .context("the agent did not connect within 15 s")??;
    Ok(agent)
}

/// What the newcomer reads: the URL template, a curl line that works as printed, where the
/// admin API and its token are.
fn print_banner(
    edge: &Edge,
    key: &str,
    demo_port: u16,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let http = edge.http_addr.context("no HTTP listener")?;
    let base = |port: &str| format!("http://{port}-{key}.{DEV_DOMAIN}:{}", http.port());
    println!("burrow dev is running: an edge on loopback and an agent for the devbox `{DEVBOX}`.");
    println!();
    println!("  URL template:  {}/", base("{port}"));
    println!("  Try it (a demo service on port {demo_port}):");
    println!("    curl {}/", base(&demo_port.to_string()));
    println!("  Any local port works, e.g.:");
    println!("    python3 -m http.server 8000 --bind 127.0.0.1 &");
    println!("    curl {}/", base("8000"));
    println!("  Raw TCP (a database, SSH) with the burrow client:");
    println!(
        "    burrow connect {} --listen 127.0.0.1:15432",
        base("5432")
    );
    println!();
    println!(
        "  Admin API:     http://{}  (token in {})",
        edge.admin_addr,
        state_dir.join("admin.token").display()
    );
    println!("Press Ctrl-C to stop.");
    Ok(())
}

/// A tiny service so the first curl line answers without the user starting anything.
async fn demo_service(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let tcp = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        tokio::spawn(async move {
            let service = service_fn(
                move |req: http::Request<hyper::body::Incoming>| async move {
                    let host = req
                        .headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("?")
                        .to_owned();
                    let body = format!(
                        "Hello from burrow! This is a service on port {port} inside the devbox, reached as {host}.\n"
                    );
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
