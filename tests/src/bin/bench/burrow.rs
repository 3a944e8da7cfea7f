//! burrow as the benchmark runs it: `burrow-edge serve` and `burrow-agent` as separate release
//! processes on loopback, an open tunnel registered through the admin API, and every bound that
//! would turn a benchmark into a test of the limits lifted (`[limits]` rate 0, large
//! `streams_per_devbox` and `connections_per_client`; the agent's `--max-streams 20000`).
//! Everything else is the default a user gets.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tokio::time::Instant;

use crate::load::{Target, first_200};
use crate::procs::Proc;
use crate::systems::{
    DOMAIN, Env, Running, System, accepting, failed, quiet, reserved_port, until_up,
};

/// The edge's configuration file.
pub fn edge_toml(state: &Path, http: u16, agents: u16, admin: u16) -> String {
    format!(
        "domain = \"{DOMAIN}\"\nstate_dir = \"{}\"\ndrain_grace = \"1s\"\n\
         [public]\nhttp = \"127.0.0.1:{http}\"\n\
         [agents]\nlisten = \"127.0.0.1:{agents}\"\nserver_name = \"localhost\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [limits]\nrate = 0\nburst = 10000000\nstreams_per_devbox = 1000000\n\
         connections_per_client = 1000000\n",
        state.display()
    )
}

/// Starts an edge, registers a devbox with an open tunnel, starts its agent, and waits until a
/// request reaches the origin. The registration is not part of the timed start.
pub async fn start(env: &Env, dir: &Path) -> Result<Running> {
    let http = reserved_port()?;
    let admin = reserved_port()?;
    // The QUIC port (a reserved port is free on UDP too).
    let agents = reserved_port()?;
    let state = dir.join("state");
    let conf = dir.join("edge.toml");
    std::fs::write(&conf, edge_toml(&state, http, agents, admin))?;

    let t = Instant::now();
    let edge = Proc::spawn(
        "edge",
        "edge",
        quiet(
            Command::new(env.bin_dir.join("burrow-edge"))
                .arg("serve")
                .arg("--config")
                .arg(&conf),
        ),
        dir,
    )?;
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
    match until_up(&mut running, accepting(http, Duration::from_secs(20))).await {
        Ok(()) => running.server_start = t.elapsed(),
        Err(e) => return Err(failed(running, e).await),
    }
    if let Err(e) = accepting(admin, Duration::from_secs(20)).await {
        return Err(failed(running, e).await);
    }
    let (key, agent_token) = match register(&state, admin).await {
        Ok(r) => r,
        Err(e) => return Err(failed(running, e).await),
    };
    running.target.host = format!("{}-{key}.{DOMAIN}", env.origin.port());
    // The edge's plain HTTP listener takes h2c with prior knowledge too.
    running.h2 = Some(running.target.clone());

    let t = Instant::now();
    let agent = Proc::spawn(
        "agent",
        "agent",
        quiet(
            Command::new(env.bin_dir.join("burrow-agent"))
                .args(["--edge", &format!("127.0.0.1:{agents}")])
                .args(["--server-name", "localhost"])
                .arg("--ca")
                .arg(state.join("agent-ca.pem"))
                .args(["--max-streams", "20000", "--drain-grace", "1s"])
                .arg("--state-dir")
                .arg(dir.join("agent-state"))
                .env("BURROW_AGENT_TOKEN", agent_token),
        ),
        dir,
    )?;
    running.client = Some(agent);
    let target = running.target.clone();
    let up = first_200(
        &target,
        t,
        Duration::from_millis(1),
        Duration::from_secs(20),
    );
    match until_up(&mut running, up).await {
        Ok(d) => running.client_start = d,
        Err(e) => return Err(failed(running, e).await),
    }
    Ok(running)
}

/// `POST /v1/devboxes` with an open tunnel: (tunnel key, agent token). `BENCH_HTTP_KEEP_ALIVE=0`
/// registers it with `http_keep_alive: false` (traffic not recorded as the devbox's activity),
/// to measure what recording it costs; unset, the tunnel has the edge's default (on).
pub async fn register(state: &Path, admin: u16) -> Result<(String, String)> {
    let token_file = state.join("admin.token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading {}", token_file.display()))?;
    let headers = vec![
        (
            "authorization".to_owned(),
            format!("Bearer {}", token.trim()),
        ),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    let body = match std::env::var("BENCH_HTTP_KEEP_ALIVE").as_deref() {
        Ok("0") => br#"{"tunnel": {"auth_mode": "open", "http_keep_alive": false}}"#.to_vec(),
        _ => br#"{"tunnel": {"auth_mode": "open"}}"#.to_vec(),
    };
    let reply = burrow_tests::request(
        ([127, 0, 0, 1], admin).into(),
        "POST",
        "localhost",
        "/v1/devboxes",
        &headers,
        body,
    )
    .await
    .context("admin API")?;
    if reply.status != 201 {
        bail!("admin API answered {}: {}", reply.status, reply.text());
    }
    let json: serde_json::Value = serde_json::from_slice(&reply.body)?;
    let key = json["tunnel"]["tunnel_key"]
        .as_str()
        .context("no tunnel_key in the admin answer")?;
    let agent = json["agent_token"]
        .as_str()
        .context("no agent_token in the admin answer")?;
    Ok((key.to_owned(), agent.to_owned()))
}
