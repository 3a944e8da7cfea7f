//! The WebSocket step: a handshake is checked here before anything becomes raw bytes (RFC 6455,
//! 4.2.1), sent to the service like any request ([`Forward::send`]), and when the service
//! answers 101 the two connections are spliced, byte for byte, until both ends close or
//! nothing moves for `limits.upgrade_idle`. An answer other than 101 goes back as a plain
//! response. An `Upgrade` to anything but `websocket` is not an upgrade here: the request is
//! answered as plain HTTP, as RFC 9110 allows.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::body::{self, Body};
use crate::forward::Forward;
use crate::headers::list_has;
use crate::idle;
use crate::metrics::{GaugeGuard, Metrics};
use crate::pages::{self, Answer, Form};
use crate::route::Routed;
use crate::tasks::Tasks;
use crate::throttle::InFlight;

/// The WebSocket step: the forward step it sends the handshake with, and the idle limit.
#[derive(Debug)]
pub struct Upgrade {
    forward: Arc<Forward>,
    metrics: Arc<Metrics>,
    /// An upgraded connection with no bytes either way for this long is closed.
    idle: Duration,
    /// Where upgraded connections run.
    tasks: Tasks,
}

impl Upgrade {
    /// Sends handshakes with `forward`; connections idle for `idle` are closed.
    pub fn new(
        forward: Arc<Forward>,
        metrics: Arc<Metrics>,
        idle: Duration,
        tasks: Tasks,
    ) -> Upgrade {
        Upgrade {
            forward,
            metrics,
            idle,
            tasks,
        }
    }

    /// Passes a WebSocket handshake (checked by [`requested`]) to the service, and the
    /// connection through once the service switched protocols.
    pub async fn pass(
        &self,
        mut req: Request<Incoming>,
        routed: &Routed,
        slot: InFlight,
    ) -> Result<Response<Body>, Answer> {
        let port = routed.target.port;
        let client_side = hyper::upgrade::on(&mut req);
        let mut answered = self.forward.send(req, routed, true).await?;
        if answered.response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(self.forward.deliver(answered, port, slot));
        }
        let service_side = hyper::upgrade::on(&mut answered.response);
        let open = GaugeGuard::new(&self.metrics.upgrades_open);
        let idle = self.idle;
        let activity = slot.activity();
        self.tasks.spawn(async move {
            let _open = (open, slot);
            match tokio::try_join!(client_side, service_side) {
                Ok((client_io, service_io)) => {
                    let client_io = TokioIo::new(client_io);
                    let service_io = TokioIo::new(service_io);
                    if let Ok(true) =
                        idle::copy_bidirectional(client_io, service_io, idle, activity).await
                    {
                        debug!(%port, "upgraded connection idle; closed");
                    }
                }
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        });
        // The service's 101 as it is: its `Upgrade` and `Connection` are what switch the client.
        let (parts, _) = answered.response.into_parts();
        Ok(Response::from_parts(parts, body::empty()))
    }
}

/// Whether the request is a WebSocket handshake (`Ok(true)`), a plain request (`Ok(false)`; an
/// `Upgrade` to anything else is ignored), or a malformed handshake, answered here: 400, or 426
/// naming the version the edge speaks.
pub fn requested<B>(req: &Request<B>, form: Form) -> Result<bool, Answer> {
    websocket(req.method(), req.version(), req.headers()).map_err(|(status, detail)| {
        let mut response = pages::error(status, detail, form);
        if status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                HeaderName::from_static("sec-websocket-version"),
                HeaderValue::from_static("13"),
            );
        }
        response
    })
}

/// [`requested`], with the refusal as a status and an explanation.
fn websocket(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<bool, (StatusCode, &'static str)> {
    if !is_upgrade(headers) || version != Version::HTTP_11 {
        return Ok(false);
    }
    let websocket = list_has(headers, &header::UPGRADE, |p| {
        p.eq_ignore_ascii_case("websocket")
    });
    if !websocket {
        return Ok(false);
    }
    if method != Method::GET {
        return Err((
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake must be a GET request",
        ));
    }
    let key_ok = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| k.to_str().ok())
        .is_some_and(|k| is_websocket_key(k.trim()));
    if !key_ok {
        return Err((
            StatusCode::BAD_REQUEST,
            "the WebSocket handshake needs a Sec-WebSocket-Key of 16 base64-encoded bytes",
        ));
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    if !version_ok {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is supported (Sec-WebSocket-Version: 13)",
        ));
    }
    Ok(true)
}

/// 16 bytes in base64: 22 characters of the alphabet and `==`.
fn is_websocket_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        // The last character carries 2 bits; the other 4 must be zero.
        && b"AQgw".contains(&b[21])
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection: upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && list_has(headers, &header::CONNECTION, |t| {
            t.eq_ignore_ascii_case("upgrade")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn handshake(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in lines {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let h = handshake(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
        ]);
        assert!(is_upgrade(&h));
        assert!(!is_upgrade(&handshake(&[("upgrade", "websocket")])));
        assert!(!is_upgrade(&handshake(&[("connection", "upgrade")])));
    }

    #[test]
    fn handshakes_are_checked() {
        let good = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", KEY),
            ("sec-websocket-version", "13"),
        ];
        let get = |h: &HeaderMap| websocket(&Method::GET, Version::HTTP_11, h);
        assert_eq!(get(&handshake(&good)), Ok(true));
        assert_eq!(
            websocket(&Method::GET, Version::HTTP_10, &handshake(&good)),
            Ok(false)
        );
        let h2c = [("upgrade", "h2c"), ("connection", "Upgrade")];
        assert_eq!(
            get(&handshake(&h2c)),
            Ok(false),
            "other protocols are ignored"
        );
        let post = websocket(&Method::POST, Version::HTTP_11, &handshake(&good));
        assert_eq!(post.map_err(|e| e.0), Err(StatusCode::BAD_REQUEST));
        let old = [good[0], good[1], good[2], ("sec-websocket-version", "8")];
        assert_eq!(
            get(&handshake(&old)).map_err(|e| e.0),
            Err(StatusCode::UPGRADE_REQUIRED)
        );
    }

    #[test]
    fn keys_are_16_bytes_of_base64() {
        assert!(is_websocket_key(KEY));
        assert!(
            !is_websocket_key("dGhlIHNhbXBsZSBub25jZR=="),
            "stray low bits"
        );
        assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZQ="));
        assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25j*Q=="));
    }
}
