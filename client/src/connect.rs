//! `burrow connect`: raw TCP to a devbox port from the user's own machine. Each local
//! connection (or stdin/stdout) becomes a WebSocket to `{port}-{key}.{domain}` that asks for
//! the [`SUBPROTOCOL`]; the edge applies the tunnel's access mode and carries the bytes to the
//! agent, which connects to the port. See [`burrow_runtime::wsbytes`] for how bytes ride the WebSocket.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, http};

use burrow_runtime::trust as tls;
use burrow_runtime::wsbytes::{self, SUBPROTOCOL, WsBytes};

/// burrow: the client side of a burrow tunnel, for your own machine.
#[derive(Debug, Parser)]
#[command(name = "burrow", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reach a raw TCP port of a devbox (a database, SSH) through its tunnel.
    ///
    /// Each connection accepted on --listen (or stdin/stdout with --stdio) is carried as a
    /// WebSocket over HTTPS to the edge, which passes the bytes to the devbox's agent and on to
    /// the port. Authenticated tunnels need the tunnel's token: --token-file or BURROW_TOKEN.
    ///
    ///   burrow connect 5432-k3v9x2q7ma.tunnel.example.com --listen 127.0.0.1:15432
    ///   psql -h 127.0.0.1 -p 15432 -U postgres
    ///
    ///   ssh -o ProxyCommand='burrow connect --stdio %h' 22-k3v9x2q7ma.tunnel.example.com
    Connect(ConnectArgs),
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// `{port}-{key}.{domain}` (HTTPS), or a URL: `https://...`, or `http://...` for a
    /// plain-HTTP edge such as `burrow-edge dev` (`http://5432-KEY.tunnel.localhost:8080`)
    target: String,
    /// Accept local connections on this address, e.g. 127.0.0.1:15432 (port 0 picks one; the
    /// address is printed as `listening on ADDR`)
    #[arg(
        long,
        value_name = "ADDR",
        required_unless_present = "stdio",
        conflicts_with = "stdio"
    )]
    listen: Option<SocketAddr>,
    /// Carry stdin and stdout as one connection (for ssh's ProxyCommand)
    #[arg(long)]
    stdio: bool,
    /// A file holding the tunnel's token, for authenticated tunnels [env: BURROW_TOKEN holds
    /// the token itself]
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Trust the edge certificate's CA from this PEM file instead of the system roots
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Dial this address instead of resolving the target's host (the Host header and TLS
    /// name stay the target's)
    #[arg(long, value_name = "HOST:PORT")]
    connect_to: Option<String>,
}

/// What `burrow connect` was asked to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// HTTPS (else plain HTTP).
    pub tls: bool,
    /// The tunnel host, `{port}-{key}.{domain}`, lowercase.
    pub host: String,
    /// The edge's TCP port.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// A target that cannot be reached as given; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{given}` is not a tunnel address: {why}; expected {{port}}-{{key}}.{{domain}}, e.g. 5432-k3v9x2q7ma.tunnel.example.com or http://5432-k3v9x2q7ma.tunnel.localhost:8080"
)]
pub struct TargetError {
    given: String,
    why: &'static str,
}

impl std::str::FromStr for Target {
    type Err = TargetError;

    fn from_str(given: &str) -> Result<Target, TargetError> {
        let err = |why| TargetError {
            given: given.chars().take(200).collect(),
            why,
        };
        let (tls, rest) = if let Some(rest) = strip_prefix_ci(given, "https://") {
            (true, rest)
        } else if let Some(rest) = strip_prefix_ci(given, "http://") {
            (false, rest)
        } else if given.contains("://") {
            return Err(err("only https:// and http:// are supported"));
        } else {
            (true, given)
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !(path.is_empty() || path == "/") {
            return Err(err("it names a path; give the host only"));
        }
        if authority.contains('@') {
            return Err(err("user names go to the service, not in the address"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| err("the edge port is not a number from 1 to 65535"))?,
            ),
            None => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let name_ok = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !name_ok {
            return Err(err("the host name has characters a DNS name cannot have"));
        }
        let label = host.split('.').next().unwrap_or_default();
        let label_ok = host.contains('.')
            && label.split_once('-').is_some_and(|(port, key)| {
                port.parse::<u16>().is_ok_and(|p| p != 0)
                    && !key.is_empty()
                    && key.bytes().all(|b| b.is_ascii_alphanumeric())
            });
        if !label_ok {
            return Err(err("its first label is not {port}-{key}"));
        }
        Ok(Target { tls, host, port })
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Why a connection through the tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The edge could not be reached.
    #[error("cannot reach the edge at {addr}: {source}")]
    Dial {
        /// What was dialed.
        addr: String,
        /// Why it failed.
        source: io::Error,
    },
    /// TLS with the edge failed (its certificate is not trusted, or the handshake broke).
    #[error("TLS with the edge failed: {0}")]
    Tls(io::Error),
    /// The edge answered the upgrade with an HTTP error: the status and the edge's reason.
    #[error("the edge refused: {status}: {reason}")]
    Refused {
        /// The HTTP status.
        status: http::StatusCode,
        /// The edge's explanation (its error page, trimmed).
        reason: String,
    },
    /// The WebSocket handshake failed otherwise.
    #[error("the WebSocket handshake failed: {0}")]
    Handshake(Box<tungstenite::Error>),
    /// The connection broke after it was open.
    #[error("the connection broke: {0}")]
    Broken(io::Error),
}

/// Everything needed to open connections: the target, the token, the TLS settings.
#[derive(Clone)]
pub struct Connector {
    target: Target,
    token: Option<String>,
    dial: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("target", &self.target)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("dial", &self.dial)
            .finish_non_exhaustive()
    }
}

/// Bytes both ways: a TCP or TLS connection to the edge.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Connector {
    /// A connector for `target`; `ca` replaces the system roots for HTTPS; `dial` replaces
    /// resolving the target's host.
    pub fn new(
        target: Target,
        token: Option<String>,
        ca: Option<&Path>,
        dial: Option<String>,
    ) -> Result<Connector, tls::TlsError> {
        let tls = if target.tls {
            let roots = tls::roots(ca)?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| tls::TlsError::Config(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Connector {
            target,
            token,
            dial,
            tls,
        })
    }

    /// Opens one connection to the devbox port: dial, TLS, the WebSocket handshake.
    pub async fn open(&self) -> Result<WsBytes<Box<dyn Io>>, ConnectError> {
        let tcp = self.dial().await?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| ConnectError::Tls(io::Error::other(e)))?;
                Box::new(
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(ConnectError::Tls)?,
                )
            }
            None => Box::new(tcp),
        };
        let request = self.request().map_err(ConnectError::Handshake)?;
        let (ws, response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(wsbytes::config()))
                .await
                .map_err(|e| match e {
                    tungstenite::Error::Http(response) => refused(&response),
                    other => ConnectError::Handshake(Box::new(other)),
                })?;
        let agreed = response
            .headers()
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .is_some_and(|p| p.as_bytes() == SUBPROTOCOL.as_bytes());
        if !agreed {
            return Err(ConnectError::Handshake(Box::new(
                tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(
                        tungstenite::error::SubProtocolError::NoSubProtocol,
                    ),
                ),
            )));
        }
        Ok(WsBytes::new(ws))
    }

    /// The TCP connection to the edge: `--connect-to`, loopback for `*.localhost` (as curl and
    /// browsers do), or the target's host resolved.
    async fn dial(&self) -> Result<TcpStream, ConnectError> {
        let host = &self.target.host;
        let addr = match &self.dial {
            Some(addr) => addr.clone(),
            None if host == "localhost" || host.ends_with(".localhost") => {
                format!("127.0.0.1:{}", self.target.port)
            }
            None => format!("{host}:{}", self.target.port),
        };
        let connect = TcpStream::connect(addr.as_str());
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(source)) => Err(ConnectError::Dial { addr, source }),
            Err(_) => Err(ConnectError::Dial {
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "no answer within 10s"),
            }),
        }
    }

    /// The upgrade request: the subprotocol, and the token as a bearer token.
    fn request(&self) -> Result<http::Request<()>, Box<tungstenite::Error>> {
        let scheme = if self.target.tls { "wss" } else { "ws" };
        let mut request = format!("{scheme}://{}:{}/", self.target.host, self.target.port)
            .into_client_request()?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(concat!("burrow/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(token) = &self.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| Box::new(tungstenite::Error::HttpFormat(e.into())))?;
            value.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, value);
        }
        Ok(request)
    }
}

/// The edge's refusal: its status and the first line of its text.
fn refused(response: &http::Response<Option<Vec<u8>>>) -> ConnectError {
    let reason = response
        .body()
        .as_deref()
        .map(String::from_utf8_lossy)
        .and_then(|text| {
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "no reason given".to_owned());
    ConnectError::Refused {
        status: response.status(),
        reason: reason.chars().take(300).collect(),
    }
}

/// Carries `local` through one new tunnel connection until both directions end.
pub async fn carry<L>(connector: &Connector, mut local: L) -> Result<(), ConnectError>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    let mut remote = connector.open().await?;
    match tokio::io::copy_bidirectional(&mut local, &mut remote).await {
        Ok(_) => {
            remote.close(CloseCode::Normal, "").await;
            Ok(())
        }
        Err(e) => {
            remote.close(CloseCode::Error, "the local side broke").await;
            Err(ConnectError::Broken(e))
        }
    }
}

/// The `burrow` binary's main.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Connect(args) = cli.command;
    let target: Target = match args.target.parse() {
        Ok(target) => target,
        Err(e) => {
            eprintln!("burrow connect: {e}");
            return ExitCode::from(2);
        }
    };
    let token = match token(args.token_file.as_deref()) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("burrow connect: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("burrow connect: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let loopback = target.host == "localhost" || target.host.ends_with(".localhost");
    if !target.tls && token.is_some() && !loopback {
        eprintln!(
            "burrow connect: warning: the tunnel token goes to {target} over plain HTTP, readable on the way; use https://"
        );
    }
    let connector = match Connector::new(target, token, args.ca.as_deref(), args.connect_to) {
        Ok(connector) => connector,
        Err(tls::TlsError::Ca { path, message }) => {
            eprintln!("burrow connect: --ca {path}: {message}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("burrow connect: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async move {
        if args.stdio {
            let local = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
            return match carry(&connector, local).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("burrow connect: {}: {e}", connector.target);
                    ExitCode::from(1)
                }
            };
        }
        let Some(listen) = args.listen else {
            eprintln!("burrow connect: give --listen ADDR or --stdio");
            return ExitCode::from(2);
        };
        listen_and_carry(connector, listen).await
    });
    // A read of stdin may still be blocked in its thread; it must not hold up the exit.
    runtime.shutdown_background();
    code
}

/// Accepts local connections on `listen` and carries each, until SIGINT or SIGTERM.
async fn listen_and_carry(connector: Connector, listen: SocketAddr) -> ExitCode {
    let mut signals =
        match burrow_runtime::signals::ShutdownSignals::install_or_exit("burrow connect") {
            Ok(signals) => signals,
            Err(code) => return code,
        };
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("burrow connect: cannot listen on {listen}: {e}");
            return ExitCode::from(2);
        }
    };
    let bound = listener.local_addr().unwrap_or(listen);
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {bound}");
        let _ = out.flush();
    }
    eprintln!("burrow connect: {bound} -> {}", connector.target);
    let connector = Arc::new(connector);
    loop {
        let accepted = tokio::select! {
            () = signals.recv() => return ExitCode::SUCCESS,
            accepted = listener.accept() => accepted,
        };
        let (local, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: say so, breathe, go on.
                eprintln!("burrow connect: accepting a local connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = local.set_nodelay(true);
        let connector = connector.clone();
        tokio::spawn(async move {
            if let Err(e) = carry(&connector, local).await {
                eprintln!(
                    "burrow connect: connection from {peer} to {}: {e}",
                    connector.target
                );
            }
        });
    }
}

/// The token from `--token-file`, else from `BURROW_TOKEN`, else none.
fn token(file: Option<&Path>) -> Result<Option<String>, String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("--token-file {}: {e}", path.display()))?,
        None => match std::env::var("BURROW_TOKEN") {
            Ok(token) => token,
            Err(_) => return Ok(None),
        },
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(match file {
            Some(path) => format!("--token-file {} is empty", path.display()),
            None => "BURROW_TOKEN is set but empty".to_owned(),
        });
    }
    Ok(Some(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Result<Target, TargetError> {
        s.parse()
    }

    #[test]
    fn targets_parse_with_https_implied() {
        assert_eq!(
            target("5432-k3v9x2q7ma.tunnel.example.com").unwrap(),
            Target {
                tls: true,
                host: "5432-k3v9x2q7ma.tunnel.example.com".into(),
                port: 443
            }
        );
        assert_eq!(
            target("http://5432-K3V9.Tunnel.Localhost:8080/").unwrap(),
            Target {
                tls: false,
                host: "5432-k3v9.tunnel.localhost".into(),
                port: 8080
            }
        );
        assert_eq!(
            target("HTTPS://22-abc.example.com:8443").unwrap().port,
            8443
        );
    }

    #[test]
    fn bad_targets_say_what_to_fix() {
        for (given, why) in [
            ("ftp://5432-k.example.com", "only https:// and http://"),
            ("https://5432-k.example.com/db", "names a path"),
            ("https://user@5432-k.example.com", "user names"),
            ("5432-k.example.com:0", "edge port"),
            ("5432-k.example.com:99999", "edge port"),
            ("db.example.com", "first label"),
            ("0-k.example.com", "first label"),
            ("5432-.example.com", "first label"),
            ("5432-k", "first label"),
            ("5432-k.example.com?burrow_token=x", "characters"),
            ("5432-k.exa mple.com", "characters"),
        ] {
            let e = target(given).unwrap_err().to_string();
            assert!(e.contains(why), "{given}: {e}");
            assert!(e.contains("{port}-{key}.{domain}"), "{given}: {e}");
        }
    }

    #[test]
    fn the_token_is_redacted_from_debug_output() {
        let connector = Connector::new(
            target("http://1-k.example.com").unwrap(),
            Some("s3cret".into()),
            None,
            None,
        )
        .unwrap();
        assert!(!format!("{connector:?}").contains("s3cret"));
    }
}
