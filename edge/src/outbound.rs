//! The request as the service gets it ([`outbound_request`]), and as HTTP/2 sends it
//! ([`for_http2`]): what the forward step rewrites before a request leaves the edge.

use std::net::SocketAddr;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Version};
use hyper::body::Incoming;

use crate::headers;
use crate::route::Scheme;

/// The request as the service gets it: HTTP/1.1, origin-form, hop-by-hop headers gone, `Host`
/// the public host (or `service_host`, for a tunnel that rewrites it), `X-Forwarded-*` set by
/// the edge (client-sent values are replaced).
/// With `service_host`, an `Origin` naming the public host names `service_host` too, so a
/// dev server that checks Origin against Host (Jupyter, Vite's WebSocket) still agrees.
pub fn outbound_request(
    req: Request<Incoming>,
    host: &str,
    service_host: Option<&str>,
    client: SocketAddr,
    scheme: Scheme,
    upgrade: bool,
) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
    let trailers = headers::list_has(&parts.headers, &header::TE, |e| {
        e.eq_ignore_ascii_case("trailers")
    });
    headers::filter_headers(&mut parts.headers);
    let headers = &mut parts.headers;
    if let Ok(public) = HeaderValue::from_str(host) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), public.clone());
        headers.insert(header::HOST, public);
    }
    if let Some(service_host) = service_host {
        if let Ok(value) = HeaderValue::from_str(service_host) {
            headers.insert(header::HOST, value);
        }
        let public_origin = format!("{}://{host}", scheme.as_str());
        let names_public = headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| o.eq_ignore_ascii_case(&public_origin));
        if names_public {
            if let Ok(origin) = HeaderValue::from_str(&format!("http://{service_host}")) {
                headers.insert(header::ORIGIN, origin);
            }
        }
    }
    if let Ok(ip) = HeaderValue::from_str(&client.ip().to_string()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), ip);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(scheme.as_str()),
    );
    if trailers {
        // The client reads trailers (gRPC's status comes in them); the service may send them.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        if let Some(protocol) = upgrade_to {
            headers.insert(header::UPGRADE, protocol);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    parts.version = Version::HTTP_11;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = path.parse().unwrap_or_default();
    Request::from_parts(parts, body)
}

/// The request as HTTP/2 sends it: the host in the target (`:authority`), not in a `Host`
/// header, and `:scheme` http (the loopback leg is h2c).
pub fn for_http2<B>(req: Request<B>) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .headers
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Some(uri) = authority.and_then(|a| format!("http://{a}{path}").parse().ok()) {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_2;
    Request::from_parts(parts, body)
}
