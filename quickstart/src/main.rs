//! The `burrow-edge` binary: `serve` runs an edge (the edge library), `dev` runs the quickstart
//! (an edge and an agent together, this crate).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use burrow_quickstart::DevOptions;
use burrow_runtime::signals::ShutdownSignals;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// burrow-edge: the public side of burrow tunnels. Serves `{port}-{key}.{domain}` over HTTP(S),
/// routes each request to the devbox's agent over QUIC, and serves the admin API.
#[derive(Debug, Parser)]
#[command(name = "burrow-edge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an edge from a config file, environment and flags.
    ///
    /// Every option can be set in the TOML file, in a `BURROW_*` environment variable, or as a
    /// flag; flags win over the environment, which wins over the file. Exit codes: 0 clean stop,
    /// 2 bad usage or config, 1 runtime failure.
    Serve(Box<burrow_edge::cli::ServeArgs>),
    /// Try burrow on this machine: an edge on loopback, a devbox with an open tunnel, its agent,
    /// and a demo service; prints a URL template and a curl line that works as printed.
    Dev(DevArgs),
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// Public HTTP listener on loopback.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Keep state here instead of in a temporary directory.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => burrow_edge::cli::serve_main(&args),
        Command::Dev(args) => dev(args),
    }
}

fn dev(args: DevArgs) -> ExitCode {
    let runtime = match burrow_runtime::signals::runtime("burrow-edge") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        burrow_runtime::logging::init_from_env();
        // Caught before the banner: a signal right after it drains, it does not kill.
        let mut signals = match ShutdownSignals::install_or_exit("burrow-edge dev") {
            Ok(signals) => signals,
            Err(code) => return code,
        };
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            signals.recv().await;
            signal.cancel();
        });
        let options = DevOptions {
            http: args.http,
            state_dir: args.state_dir,
        };
        match burrow_quickstart::run(options, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("burrow-edge dev: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}
