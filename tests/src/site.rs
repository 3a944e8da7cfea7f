//! A small web app for browser tests, standing in for what a person opens in a devbox: two HTML
//! pages with a link between them, a JSON endpoint the page fetches, and a WebSocket echo, on
//! one port. It records every request it gets, so a test can check what reached the service
//! through the tunnel (and what never did).
//!
//! Routes:
//! - `GET /`: [`FIRST`], with a link `<a id=next href="/second">`.
//! - `GET /second`: [`SECOND`].
//! - `GET /api`: JSON `{"page": "api"}`.
//! - `GET /ws`: a WebSocket echo (text and binary messages come back).
//! - anything else: 404.
//!
//! The pages name an empty icon (`data:,`), so a browser asks for no `/favicon.ico`: the
//! requests the app sees are exactly the ones the test makes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// The title and heading of `/`.
pub const FIRST: &str = "burrow test site: first page";
/// The title and heading of `/second`.
pub const SECOND: &str = "burrow test site: second page";

/// A request as the app saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, ...
    pub method: String,
    /// The path and query, as received.
    pub target: String,
    /// Every header, as (name, value).
    pub headers: Vec<(String, String)>,
}

/// The running app.
#[derive(Debug)]
pub struct Site {
    /// Where it listens (`127.0.0.1`).
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: JoinSet<()>,
}

impl Site {
    /// Starts the app on `127.0.0.1:0`.
    pub async fn start() -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind site");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        tasks.spawn(serve(listener, seen.clone()));
        Site { addr, seen, tasks }
    }

    /// The requests received so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Accepts connections until the app is dropped (which ends its connections too). A connection
/// upgraded to a WebSocket becomes the echo, in the same task.
async fn serve(listener: TcpListener, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        connections.spawn(async move {
            let (upgrades, mut upgraded) = mpsc::unbounded_channel();
            let service = service_fn(move |req| {
                let seen = seen.clone();
                let upgrades = upgrades.clone();
                async move { Ok::<_, Infallible>(handle(req, &seen, &upgrades)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
            if let Ok(upgrade) = upgraded.try_recv() {
                echo(upgrade).await;
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

fn handle(
    mut req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    upgrades: &mpsc::UnboundedSender<OnUpgrade>,
) -> Response<Full<Bytes>> {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    seen.lock().expect("lock").push(Seen {
        method: req.method().to_string(),
        target,
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });
    match req.uri().path() {
        "/" => page(
            FIRST,
            "<p>Start here.</p>\n<a id=next href=\"/second\">the second page</a>",
        ),
        "/second" => page(SECOND, "<p>You followed the link.</p>"),
        "/api" => reply(StatusCode::OK, "application/json", r#"{"page":"api"}"#),
        "/ws" => websocket(&mut req, upgrades),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn page(title: &str, body: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">\
         <title>{title}</title></head>\n<body><h1 id=title>{title}</h1>\n{body}\n</body></html>\n"
    );
    reply(StatusCode::OK, "text/html; charset=utf-8", &html)
}

fn reply(status: StatusCode, content_type: &'static str, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Answers a WebSocket handshake with 101, handing the connection's upgrade to its task.
fn websocket(
    req: &mut Request<Incoming>,
    upgrades: &mpsc::UnboundedSender<OnUpgrade>,
) -> Response<Full<Bytes>> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| wants)
    else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "a WebSocket handshake\n",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let _ = upgrades.send(hyper::upgrade::on(req));
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Echoes text and binary messages on an upgraded connection until it closes.
async fn echo(upgrade: OnUpgrade) {
    let Ok(upgraded) = upgrade.await else { return };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}
