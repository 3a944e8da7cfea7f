//! The raw TCP step, for `burrow connect`: a WebSocket upgrade that asks for the
//! [`SUBPROTOCOL`] is answered by the edge itself, and the bytes its binary messages carry go
//! to the agent on a [`StreamKind::Raw`] stream, which the agent connects to the port as is.
//! The tunnel's access mode, rate and stream limits apply as to any request: the upgrade is an
//! ordinary request until it is answered.

use std::sync::Arc;
use std::time::Duration;

use burrow_protocol::{Port, StreamKind, reset};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::debug;

pub use burrow_runtime::wsbytes::SUBPROTOCOL;
use burrow_runtime::wsbytes::{self, WsBytes};

use crate::activity::Activity;
use crate::body::{self, Body};
use crate::dial::{Dialer, Opened};
use crate::headers::list_has;
use crate::idle;
use crate::metrics::{GaugeGuard, Metrics};
use crate::pages::{self, Answer};
use crate::route::Routed;
use crate::tasks::Tasks;
use crate::throttle::InFlight;

/// The raw TCP step: streams to agents, and the idle limit.
#[derive(Debug)]
pub struct Raw {
    dial: Arc<Dialer>,
    metrics: Arc<Metrics>,
    /// A raw stream with no bytes either way for this long is closed.
    idle: Duration,
    /// Where raw streams run.
    tasks: Tasks,
}

impl Raw {
    /// Opens raw streams with `dial`; streams idle for `idle` are closed.
    pub fn new(dial: Arc<Dialer>, metrics: Arc<Metrics>, idle: Duration, tasks: Tasks) -> Raw {
        Raw {
            dial,
            metrics,
            idle,
            tasks,
        }
    }

    /// Answers a raw TCP handshake (a WebSocket handshake, already checked, that
    /// [`requested`] the subprotocol): a refusal, or a 101 after which the client's messages
    /// are carried to the agent's stream.
    pub async fn carry(
        &self,
        mut req: Request<Incoming>,
        routed: &Routed,
        slot: InFlight,
    ) -> Result<Response<Body>, Answer> {
        if let Some(why) = refused(req.headers(), routed.route.raw_tcp) {
            return Err(pages::error(StatusCode::FORBIDDEN, why, routed.form));
        }
        let opened = self.dial.open(routed, StreamKind::Raw).await?;
        let key = req
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|k| k.to_str().unwrap_or_default().trim().to_owned())
            .unwrap_or_default();
        let upgrade = hyper::upgrade::on(&mut req);
        let open = GaugeGuard::new(&self.metrics.upgrades_open);
        let (port, idle) = (routed.target.port, self.idle);
        let activity = slot.activity();
        self.tasks.spawn(async move {
            let _open = (open, slot);
            splice(upgrade, opened, port, (idle, activity)).await;
        });
        Ok(switching(key.as_bytes()))
    }
}

/// Whether a WebSocket handshake asks for a raw TCP stream (its `Sec-WebSocket-Protocol`
/// names [`SUBPROTOCOL`]); other WebSockets go to the service as they are.
pub fn requested(headers: &HeaderMap) -> bool {
    list_has(headers, &header::SEC_WEBSOCKET_PROTOCOL, |p| {
        p == SUBPROTOCOL
    })
}

/// Why a raw TCP handshake is refused, if it is: the tunnel does not allow raw TCP (an open
/// tunnel without `raw_tcp`), or a browser page opened it. A page on any tunnel of the domain
/// is same-site with every other, so its WebSocket would carry the visitor's cookie and read
/// raw bytes from another devbox's port; browsers always send `Origin`, `burrow connect` never.
fn refused(headers: &HeaderMap, allowed: bool) -> Option<&'static str> {
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
fn switching(key: &[u8]) -> Response<Body> {
    let mut response = Response::new(body::empty());
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
/// `idle`: how long nothing may move, and the devbox's activity to touch when bytes do.
async fn splice(
    upgrade: OnUpgrade,
    opened: Opened,
    port: Port,
    (idle, activity): (Duration, Option<Activity>),
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
    let mut service = tokio::io::join(opened.recv, opened.send);
    let copied = idle::copy_bidirectional(&mut client, &mut service, idle, activity).await;
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
        let _ = send.reset(quinn::VarInt::from_u32(reset::EDGE_ABORT));
    }
    client.close(code, &reason).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_burrow_connect_gets_raw_tcp() {
        let mut h = HeaderMap::new();
        assert!(!requested(&h));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, burrow-tcp.v1"),
        );
        assert!(requested(&h));
        assert!(refused(&h, true).is_none());
        assert!(refused(&h, false).is_some(), "the tunnel does not allow it");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://a.example"),
        );
        assert!(refused(&h, true).is_some(), "a web page opened it");
    }

    #[test]
    fn the_switch_accepts_the_key() {
        // RFC 6455, 1.3.
        let r = switching(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        let h = r.headers();
        assert_eq!(
            h[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(h[header::SEC_WEBSOCKET_PROTOCOL], SUBPROTOCOL);
    }
}
