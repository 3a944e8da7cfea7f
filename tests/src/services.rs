//! Local services that stand in for what runs in a devbox: an HTTP echo with bulk and SSE
//! routes, and a WebSocket echo.
//!
//! HTTP routes:
//! - `GET /bytes/{n}`: `n` bytes of a fixed pattern ([`pattern`]), streamed in 64 KiB chunks.
//! - `GET /sse`: five `data: event {i}` events, one every 200 ms.
//! - anything else: JSON `{"method", "path", "version", "authority", "headers": {...}, "len",
//!   "sha256"}` describing the request as the service saw it (`sha256` of the body, hex;
//!   `version` as `HTTP/1.1` or `HTTP/2.0`; `authority` the target's, HTTP/2's `:authority`).
//!
//! [`http_service`] speaks HTTP/1.1 only; [`h2c_service`] the same routes over HTTP/2 only
//! (prior knowledge, no TLS), as gRPC servers and some others do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::digest::{Context, SHA256, digest};
use serde_json::json;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

/// What an HTTP service observed, for assertions.
#[derive(Debug, Default)]
pub struct Seen {
    /// Headers of every request, as (name, value) lists.
    pub requests: Vec<Vec<(String, String)>>,
    /// When the SSE route wrote its last event.
    pub sse_last_write: Option<Instant>,
}

/// A running HTTP service.
#[derive(Debug, Clone)]
pub struct HttpService {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Mutex<Seen>>,
}

/// The byte at offset `i` of a `/bytes` body.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// SHA-256 hex of a byte slice.
pub fn sha256_hex(data: &[u8]) -> String {
    digest(&SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Starts the HTTP service on `bind` (`127.0.0.1:0`, `0.0.0.0:0`, `[::1]:0`).
pub async fn http_service(bind: &str) -> HttpService {
    serve(bind, false).await
}

/// Starts the service on `bind`, speaking HTTP/2 only (h2c with prior knowledge): an
/// HTTP/1.1 request to it fails.
pub async fn h2c_service(bind: &str) -> HttpService {
    serve(bind, true).await
}

async fn serve(bind: &str, http2: bool) -> HttpService {
    let listener = TcpListener::bind(bind).await.expect("bind service");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let seen = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(handle(req, seen).await) }
                });
                let io = TokioIo::new(tcp);
                if http2 {
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(io, service).await;
                } else {
                    let builder = hyper::server::conn::http1::Builder::new();
                    let _ = builder.serve_connection(io, service).await;
                }
            });
        }
    });
    HttpService { addr, seen }
}

async fn handle(req: Request<Incoming>, seen: Arc<Mutex<Seen>>) -> Response<Body> {
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    seen.lock().expect("lock").requests.push(headers.clone());
    let path = req.uri().path().to_owned();
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let chunks = futures_util::stream::unfold(0u64, move |offset| async move {
            if offset >= n {
                return None;
            }
            let len = (n - offset).min(64 * 1024);
            let chunk: Vec<u8> = (offset..offset + len).map(pattern).collect();
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))),
                offset + len,
            ))
        });
        return Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-length", n.to_string())
            .body(BodyExt::boxed(StreamBody::new(chunks)))
            .expect("response");
    }
    if path == "/sse" {
        let events = futures_util::stream::unfold(0u32, move |i| {
            let seen = seen.clone();
            async move {
                if i == 5 {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if i == 4 {
                    seen.lock().expect("lock").sse_last_write = Some(Instant::now());
                }
                let event = format!("id: {i}\ndata: event {i}\n\n");
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), i + 1))
            }
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(BodyExt::boxed(StreamBody::new(events)))
            .expect("response");
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let authority = req.uri().authority().map(|a| a.to_string());
    let query = req.uri().query().map(str::to_owned);
    let mut hasher = Context::new(&SHA256);
    let mut len = 0u64;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            hasher.update(data);
            len += data.len() as u64;
        }
    }
    let sha: String = hasher
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let out = json!({
        "method": method, "path": path, "query": query, "headers": headers,
        "version": version, "authority": authority,
        "len": len, "sha256": sha,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(out.to_string()))))
        .expect("response")
}

/// Starts a WebSocket echo service on `127.0.0.1:0`: echoes text and binary messages, answers
/// pings, and completes the close handshake.
pub async fn ws_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
