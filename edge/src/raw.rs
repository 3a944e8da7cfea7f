//! Raw TCP to a devbox port, for `burrow connect`: a WebSocket upgrade that asks for the
//! [`SUBPROTOCOL`] is answered by the edge itself, and the bytes its binary messages carry go
//! to the agent on a [`StreamKind::Raw`](burrow_protocol::StreamKind::Raw) stream, which the
//! agent connects to the port as is. The tunnel's access mode, rate and stream limits apply as
//! to any request: the upgrade is an ordinary request until it is answered.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::debug;

pub use burrow_runtime::wsbytes::SUBPROTOCOL;
use burrow_runtime::wsbytes::{self, WsBytes};

use crate::idle;
use crate::pages;
use crate::proxy::Body;

/// Whether a WebSocket handshake asks for a raw TCP stream (its `Sec-WebSocket-Protocol`
/// names [`SUBPROTOCOL`]); other WebSockets go to the service as they are.
pub fn requested(headers: &HeaderMap) -> bool {
    crate::proxy::list_has(headers, &header::SEC_WEBSOCKET_PROTOCOL, |p| {
        p == SUBPROTOCOL
    })
}

/// Why a raw TCP handshake is refused, if it is: the tunnel does not allow raw TCP (an open
/// tunnel without `raw_tcp`), or a browser page opened it. A page on any tunnel of the domain
/// is same-site with every other, so its WebSocket would carry the visitor's cookie and read
/// raw bytes from another devbox's port; browsers always send `Origin`, `burrow connect` never.
pub fn refused(headers: &HeaderMap, allowed: bool) -> Option<&'static str> {
    if !allowed {
        return Some(
            "raw TCP is off for this open tunnel; the platform enables it with `raw_tcp: true`, or the tunnel can be authenticated",
        );
    }
    if headers.contains_key(header::ORIGIN) {
        return Some(
            "raw TCP is for `burrow connect`; a web page cannot open it (the request has an Origin)",
        );
    }
    None
}

/// The 101 that accepts the handshake whose `Sec-WebSocket-Key` is `key`.
pub fn switching(key: &[u8]) -> Response<Body> {
    let mut response = Response::new(pages::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key)) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Carries the upgraded client connection to the agent's stream until both directions end,
/// either side breaks, or nothing moves for `idle`; then closes the WebSocket saying why.
pub async fn carry(
    upgrade: OnUpgrade,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    port: burrow_protocol::Port,
    idle: Duration,
) {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            debug!(error = %e, %port, "raw stream: the client's upgrade failed");
            return;
        }
    };
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(wsbytes::config()),
    )
    .await;
    let mut client = WsBytes::new(ws);
    let mut service = tokio::io::join(recv, send);
    let copied = idle::copy_bidirectional(&mut client, &mut service, idle).await;
    let (code, reason) = match copied {
        Ok(false) => (CloseCode::Normal, String::new()),
        Ok(true) => (
            CloseCode::Away,
            format!("nothing moved for {}s; closed", idle.as_secs()),
        ),
        Err(e) => {
            debug!(error = %e, %port, "raw stream ended with an error");
            (CloseCode::Error, format!("port {port}: {e}"))
        }
    };
    if code != CloseCode::Normal {
        // The service sees a break as a break (a reset), not as the end of the stream.
        let (_, mut send) = service.into_inner();
        let _ = send.reset(quinn::VarInt::from_u32(0));
    }
    client.close(code, &reason).await;
}
