//! The load: clients that keep HTTP requests (new connections and kept-alive ones),
//! WebSockets, SSE streams and raw TCP connections going through the tunnel, each operation
//! checked end to end and written to the [`Ledger`].

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_client::connect::{Connector, Target};
use burrow_tests::request;
use burrow_tests::services::sha256_hex;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use crate::world::Tunnel;

/// The longest one operation may take before it counts as failed.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a client did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A request on a new connection (GET, or POST of a body whose hash the service returns).
    Http,
    /// A request on a kept-alive connection.
    KeptAlive,
    /// A WebSocket session: opened, a message echoed every 100 ms for 1-4 s, closed.
    WebSocket,
    /// An SSE stream of five events, one every 200 ms, read to its end.
    Sse,
    /// A raw TCP connection (`burrow connect`'s library): 4 x 32 KiB echoed and checked.
    RawTcp,
}

impl Kind {
    /// All kinds, in report order.
    pub const ALL: [Kind; 5] = [
        Kind::Http,
        Kind::KeptAlive,
        Kind::WebSocket,
        Kind::Sse,
        Kind::RawTcp,
    ];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Http => "HTTP request, new connection",
            Kind::KeptAlive => "HTTP request, kept-alive connection",
            Kind::WebSocket => "WebSocket session",
            Kind::Sse => "SSE stream",
            Kind::RawTcp => "raw TCP connection",
        })
    }
}

/// One operation and how it ended.
#[derive(Debug, Clone)]
pub struct Op {
    /// What it was.
    pub kind: Kind,
    /// When it started.
    pub start: Instant,
    /// When it succeeded or failed.
    pub end: Instant,
    /// Why it failed; `None`: it succeeded.
    pub error: Option<String>,
}

/// Every operation, in the order they ended.
#[derive(Debug, Default)]
pub struct Ledger {
    ops: Mutex<Vec<Op>>,
}

impl Ledger {
    fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Everything recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How many clients of each kind, and whether they pause between operations.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Clients per kind, in [`Kind::ALL`] order.
    pub clients: [usize; 5],
    /// A random 10-50 ms pause after each operation (the fault phase's steady traffic);
    /// without it the clients go flat out (the memory rounds).
    pub paced: bool,
}

/// Runs the clients until `stop`; each writes every operation to `ledger`.
pub async fn run(tunnel: Arc<Tunnel>, ledger: Arc<Ledger>, mix: Mix, stop: CancellationToken) {
    let mut clients = JoinSet::new();
    for (kind, &n) in Kind::ALL.iter().zip(&mix.clients) {
        for _ in 0..n {
            let (tunnel, ledger, stop) = (tunnel.clone(), ledger.clone(), stop.clone());
            clients.spawn(client(*kind, tunnel, ledger, mix.paced, stop));
        }
    }
    while clients.join_next().await.is_some() {}
}

async fn client(
    kind: Kind,
    tunnel: Arc<Tunnel>,
    ledger: Arc<Ledger>,
    paced: bool,
    stop: CancellationToken,
) {
    let mut kept: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    while !stop.is_cancelled() {
        let start = Instant::now();
        let outcome = tokio::time::timeout(OP_TIMEOUT, async {
            match kind {
                Kind::Http => http(&tunnel).await,
                Kind::KeptAlive => kept_alive(&tunnel, &mut kept).await,
                Kind::WebSocket => websocket(&tunnel).await,
                Kind::Sse => sse(&tunnel).await,
                Kind::RawTcp => raw_tcp(&tunnel).await,
            }
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {OP_TIMEOUT:?}")));
        let failed = outcome.is_err();
        if failed {
            kept = None;
        }
        ledger.record(Op {
            kind,
            start,
            end: Instant::now(),
            error: outcome.err().map(|e| format!("{e:#}")),
        });
        let pause = match (failed, paced) {
            (true, _) => fastrand::u64(100..200),
            (false, true) => fastrand::u64(10..50),
            (false, false) => 0,
        };
        if pause > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(pause)) => {}
                () = stop.cancelled() => {}
            }
        }
    }
}

fn bearer(tunnel: &Tunnel) -> (String, String) {
    (
        "authorization".to_owned(),
        format!("Bearer {}", tunnel.token()),
    )
}

/// A GET or a POST with a random body on a new connection; the service's JSON checked.
async fn http(tunnel: &Tunnel) -> anyhow::Result<()> {
    let host = tunnel.host(tunnel.http_port);
    let body: Vec<u8> = if fastrand::bool() {
        (0..fastrand::usize(1..64 * 1024))
            .map(|_| fastrand::u8(..))
            .collect()
    } else {
        Vec::new()
    };
    let method = if body.is_empty() { "GET" } else { "POST" };
    let sha = sha256_hex(&body);
    let reply = request(tunnel.http, method, &host, "/soak", &[bearer(tunnel)], body).await?;
    check_echo(reply.status, &reply.body, &sha)
}

fn check_echo(status: u16, body: &[u8], sha: &str) -> anyhow::Result<()> {
    if status != 200 {
        anyhow::bail!("status {status}: {}", String::from_utf8_lossy(body).trim());
    }
    let json: serde_json::Value = serde_json::from_slice(body)?;
    if json["path"] != "/soak" || json["sha256"] != sha {
        anyhow::bail!("the service saw another request: {json}");
    }
    Ok(())
}

/// A GET on the client's kept-alive connection (a new one when it has none or it closed).
async fn kept_alive(
    tunnel: &Tunnel,
    kept: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
) -> anyhow::Result<()> {
    let usable = match kept.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    if !usable {
        let tcp = TcpStream::connect(tunnel.http).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        *kept = Some(sender);
    }
    let Some(sender) = kept.as_mut() else {
        anyhow::bail!("no connection");
    };
    let req = http::Request::get("/soak")
        .header("host", tunnel.host(tunnel.http_port))
        .header("authorization", format!("Bearer {}", tunnel.token()))
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    check_echo(status, &body, &sha256_hex(b""))
}

/// A WebSocket session: a message every 100 ms for 1-4 s, each echo checked, then a close.
async fn websocket(tunnel: &Tunnel) -> anyhow::Result<()> {
    let url = format!(
        "ws://{}:{}/",
        tunnel.host(tunnel.ws_port),
        tunnel.http.port()
    );
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", tunnel.token()).parse()?,
    );
    let tcp = TcpStream::connect(tunnel.http).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    for i in 0..fastrand::u32(10..40) {
        let text = format!("message {i} {}", fastrand::u64(..));
        ws.send(Message::text(text.clone())).await?;
        let echo = ws.next().await.context_closed("the echo")??;
        if echo != Message::text(text) {
            anyhow::bail!("echo {i} was {echo:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ws.close(None).await?;
    while let Some(msg) = ws.next().await {
        msg?;
    }
    Ok(())
}

/// The service's five-event SSE stream, read to its end.
async fn sse(tunnel: &Tunnel) -> anyhow::Result<()> {
    let headers = [
        bearer(tunnel),
        ("accept".to_owned(), "text/event-stream".to_owned()),
    ];
    let host = tunnel.host(tunnel.http_port);
    let reply = request(tunnel.http, "GET", &host, "/sse", &headers, vec![]).await?;
    if reply.status != 200 {
        anyhow::bail!("status {}: {}", reply.status, reply.text().trim());
    }
    let text = reply.text();
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    let expected: Vec<String> = (0..5).map(|i| format!("data: event {i}")).collect();
    if events != expected {
        anyhow::bail!("the stream carried {events:?}");
    }
    Ok(())
}

/// A raw TCP connection through the tunnel: 4 x 32 KiB of random bytes echoed and compared.
async fn raw_tcp(tunnel: &Tunnel) -> anyhow::Result<()> {
    let target: Target = format!(
        "http://{}:{}",
        tunnel.host(tunnel.tcp_port),
        tunnel.http.port()
    )
    .parse()?;
    let dial = Some(tunnel.http.to_string());
    let connector = Connector::new(target, Some(tunnel.token()), None, dial)?;
    let mut conn = connector.open().await?;
    let mut back = vec![0u8; 32 * 1024];
    for _ in 0..4 {
        let sent: Vec<u8> = (0..back.len()).map(|_| fastrand::u8(..)).collect();
        conn.write_all(&sent).await?;
        conn.flush().await?;
        conn.read_exact(&mut back).await?;
        if back != sent {
            anyhow::bail!("the echo differs from what was sent");
        }
    }
    conn.shutdown().await?;
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await?;
    if !rest.is_empty() {
        anyhow::bail!("{} bytes more than were sent came back", rest.len());
    }
    Ok(())
}

/// `Option` of a stream's next item, as an error naming what was missing.
trait ClosedContext<T> {
    fn context_closed(self, what: &str) -> anyhow::Result<T>;
}

impl<T> ClosedContext<T> for Option<T> {
    fn context_closed(self, what: &str) -> anyhow::Result<T> {
        self.ok_or_else(|| anyhow::anyhow!("the connection closed before {what}"))
    }
}
