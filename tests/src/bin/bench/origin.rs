//! The origin: the service every system forwards to, run as a process of its own
//! (`bench origin --listen ADDR`) so that its CPU and memory are never counted as a tunnel's.
//!
//! One port serves everything, so a TCP tunnel forwards one port for every scenario:
//! - `GET /`: a small response ([`SMALL`], with Content-Length).
//! - `GET /bytes/{n}`: `n` bytes, streamed from one shared 256 KiB buffer (no copy, no
//!   allocation per chunk).
//! - `POST /upload`: reads the body to its end, answers its length.
//! - `GET` with `Upgrade: websocket`: a WebSocket echo (text and binary messages come back).
//!
//! HTTP/1.1 and HTTP/2 (h2c with prior knowledge, for `h2load` directly) on a 2-worker tokio
//! runtime, `TCP_NODELAY` on every connection.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

type Body = BoxBody<Bytes, Infallible>;

/// The small response body: about the size of a JSON API answer.
pub const SMALL: &[u8] = b"{\"ok\":true,\"service\":\"burrow bench origin\",\"note\":\"a small response of about one hundred bytes\"}\n";

const CHUNK: usize = 256 * 1024;

/// A WebSocket configuration with small buffers: 10,000 idle sockets should cost the origin
/// (and the client) little, so their memory does not crowd the machine.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Serves until the process is killed.
pub fn run(listen: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(listen))
}

async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("origin: binding {listen}"))?;
    let chunk = Bytes::from(vec![0x5a_u8; CHUNK]);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let chunk = chunk.clone();
                async move { Ok::<_, Infallible>(handle(req, chunk).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, chunk: Bytes) -> Response<Body> {
    let path = req.uri().path();
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        return download(n, chunk);
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut len = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                len += data.len() as u64;
            }
        }
        return small(StatusCode::OK, Bytes::from(format!("{len}\n")));
    }
    if req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        return websocket(req);
    }
    small(StatusCode::OK, Bytes::from_static(SMALL))
}

fn small(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(BodyExt::boxed(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn download(n: u64, chunk: Bytes) -> Response<Body> {
    let chunks = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= n {
                return None;
            }
            let len = (n - sent).min(chunk.len() as u64);
            let data = chunk.slice(..len as usize);
            Some((Ok::<_, Infallible>(Frame::data(data)), sent + len))
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
    resp
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return small(StatusCode::BAD_REQUEST, Bytes::from_static(b"no key\n"));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config()),
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(Full::new(Bytes::new())));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(accept) = header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}
