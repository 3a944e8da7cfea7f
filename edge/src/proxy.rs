//! A public request: route the host to a tunnel, enforce its access mode, open a data stream to
//! the agent, and carry the request as HTTP/1.1 on it. Response bodies stream as they come;
//! upgrades (WebSocket) continue as raw bytes both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use burrow_protocol::{AuthMode, RefuseReason, StreamAnswer, StreamHeader, StreamKind};
use burrow_runtime::wire;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::auth::{self, CookieKey};
use crate::config::Config;
use crate::idle;
use crate::limits::{Limits, PerKey, Rate};
use crate::metrics::{CountedBody, GaugeGuard, Metrics};
use crate::pages;
use crate::pool::{Pool, Returning};
use crate::raw;
use crate::registry::Registry;
use crate::route;
use crate::secret::TokenHash;
use crate::server::ConnInfo;

/// The body type of every response the edge sends.
pub type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Headers that apply to one connection only and are never forwarded (RFC 9110, 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// How long the agent may take to answer a stream header (it dials the service meanwhile, with
/// a connect timeout of its own, 5 s by default, for each loopback address).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves public requests.
#[derive(Debug)]
pub struct Proxy {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    domain: String,
    agent_wait: Duration,
    max_waiting: usize,
    limits: Limits,
    rates: Rate<String>,
    in_flight: PerKey<String>,
    pool: Arc<Pool>,
    cookie_key: CookieKey,
}

/// How the client reached the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl Proxy {
    /// A proxy for the tunnels under `config.domain`; requests wait up to `config.agent_wait`
    /// for an absent agent, at most `config.max_waiting` of them per devbox; `config.limits`
    /// bound rates and streams; browsers' cookies for authenticated tunnels are signed with
    /// `cookie_key`.
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: &Config,
        pool: Arc<Pool>,
        cookie_key: CookieKey,
    ) -> Proxy {
        let limits = config.limits.clone();
        Proxy {
            pool,
            cookie_key,
            registry,
            metrics,
            domain: config.domain.clone(),
            agent_wait: config.agent_wait,
            max_waiting: config.max_waiting,
            rates: Rate::new(f64::from(limits.rate), f64::from(limits.burst)),
            in_flight: PerKey::new(limits.streams_per_devbox),
            limits,
        }
    }

    /// Answers one public request.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        scheme: Scheme,
    ) -> Response<Body> {
        let client = conn.peer;
        let html = pages::wants_html(req.headers());
        if req.method() == http::Method::CONNECT {
            return pages::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: the edge forwards HTTP requests to the devbox",
                html,
            );
        }
        let host = match request_host(&req) {
            Ok(host) => host,
            Err(detail) => return pages::error(StatusCode::BAD_REQUEST, detail, html),
        };
        let target = match route::parse(&host, &self.domain) {
            Ok(target) => target,
            Err(e) => return pages::error(StatusCode::BAD_REQUEST, &e.to_string(), html),
        };
        if scheme == Scheme::Https && !route::same_name(&host, conn.sni.as_deref()) {
            // A connection made for one name and reused for another (HTTP/2 coalescing, or a
            // forged Host): 421 tells a browser to retry on a connection of its own.
            return pages::error(
                StatusCode::MISDIRECTED_REQUEST,
                "the request's host is not the name this TLS connection was made for (SNI)",
                html,
            );
        }
        // An unknown key and a disabled tunnel get the same answer, so keys cannot be probed.
        let Some(route) = self.registry.route(&target.key) else {
            return not_found(html);
        };
        if route.auth_mode == AuthMode::Authenticated {
            if let Some(answer) =
                self.authenticate(&mut req, &host, &target.key, route.auth_token, scheme, html)
            {
                return answer;
            }
        }
        // The browser cookie never reaches a service, on any tunnel (one that was
        // authenticated keeps getting it from browsers for a while after it turned open).
        auth::strip_cookie(req.headers_mut());
        if let Err(wait) = self.rates.take(&target.key) {
            self.metrics.limited.with_label_values(&["rate"]).inc();
            let mut response = pages::error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "this tunnel is over its request rate ({} a second); slow down",
                    self.limits.rate
                ),
                html,
            );
            let secs = wait.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return response;
        }
        let upgrade_wanted = match websocket_upgrade(req.method(), req.version(), req.headers()) {
            Ok(wanted) => wanted,
            Err((status, detail)) => {
                let mut response = pages::error(status, detail, html);
                if status == StatusCode::UPGRADE_REQUIRED {
                    response.headers_mut().insert(
                        HeaderName::from_static("sec-websocket-version"),
                        HeaderValue::from_static("13"),
                    );
                }
                return response;
            }
        };
        let Some(slot) = self.in_flight.acquire(&route.devbox_id) else {
            self.metrics.limited.with_label_values(&["streams"]).inc();
            return pages::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this devbox has too many requests in flight; try again shortly",
                html,
            );
        };
        let port = target.port;
        if upgrade_wanted && raw::requested(req.headers()) {
            // `burrow connect`: the edge ends the WebSocket and carries its bytes raw.
            if let Some(why) = raw::refused(req.headers(), route.raw_tcp) {
                return pages::error(StatusCode::FORBIDDEN, why, html);
            }
            let header = StreamHeader::new(port, StreamKind::Raw, Some(client));
            let (send, recv, _) = match self
                .stream_to_agent(&target.key, &route.devbox_id, header)
                .await
            {
                Ok(opened) => opened,
                Err((status, detail)) => return pages::error(status, &detail, html),
            };
            let key = req
                .headers()
                .get(header::SEC_WEBSOCKET_KEY)
                .map(|k| k.to_str().unwrap_or_default().trim().to_owned())
                .unwrap_or_default();
            let upgrade = hyper::upgrade::on(&mut req);
            let open = GaugeGuard::new(&self.metrics.upgrades_open);
            let idle = self.limits.upgrade_idle;
            tokio::spawn(async move {
                let _open = (open, slot);
                raw::carry(upgrade, send, recv, port, idle).await;
            });
            return raw::switching(key.as_bytes());
        }
        let upgrade = upgrade_wanted.then(|| hyper::upgrade::on(&mut req));
        let service_host = route.rewrite_host.then(|| format!("localhost:{port}"));
        let outbound = outbound_request(
            req,
            &host,
            service_host.as_deref(),
            client,
            scheme,
            upgrade.is_some(),
        )
        .map(|body| self.metrics.count_body(body, "from_client", ()));

        // A kept-alive connection to the service first (not for upgrades: they take the
        // connection over); a request it could not even start goes on a fresh one.
        let idle = match (&route.conn, &upgrade) {
            (Some(conn), None) => self
                .pool
                .checkout((conn.stable_id(), port.get()))
                .map(|sender| (sender, conn.stable_id())),
            _ => None,
        };
        let attempt = match idle {
            Some((mut sender, conn_id)) => match sender.try_send_request(outbound).await {
                Ok(response) => {
                    self.metrics.pooled.with_label_values(&["reused"]).inc();
                    Ok((response, sender, conn_id))
                }
                Err(mut e) => match e.take_message() {
                    Some(request) => Err(request),
                    None => {
                        debug!(error = %e.into_error(), %port, "kept-alive connection failed");
                        return no_answer(port, html);
                    }
                },
            },
            None => Err(outbound),
        };
        let (mut response, sender, conn_id) = match attempt {
            Ok(done) => done,
            Err(outbound) => {
                let header = StreamHeader::new(port, StreamKind::Http, Some(client));
                let (send, recv, conn_id) = match self
                    .stream_to_agent(&target.key, &route.devbox_id, header)
                    .await
                {
                    Ok(opened) => opened,
                    Err((status, detail)) => return pages::error(status, &detail, html),
                };
                self.metrics.pooled.with_label_values(&["opened"]).inc();
                let io = TokioIo::new(tokio::io::join(recv, send));
                let (mut sender, connection) = match hyper::client::conn::http1::Builder::new()
                    .handshake::<_, CountedBody<Incoming>>(io)
                    .await
                {
                    Ok(pair) => pair,
                    Err(e) => {
                        debug!(error = %e, "handshake on data stream failed");
                        return pages::error(
                            StatusCode::BAD_GATEWAY,
                            "the tunnel stream failed",
                            html,
                        );
                    }
                };
                tokio::spawn(async move {
                    if let Err(e) = connection.with_upgrades().await {
                        debug!(error = %e, "service connection ended with an error");
                    }
                });
                match sender.send_request(outbound).await {
                    Ok(response) => (response, sender, conn_id),
                    Err(e) => {
                        debug!(error = %e, %port, "service did not answer");
                        return no_answer(port, html);
                    }
                }
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_side) = upgrade else {
                warn!(%port, "service switched protocols without being asked");
                return pages::error(
                    StatusCode::BAD_GATEWAY,
                    "the service sent an unexpected 101",
                    html,
                );
            };
            let service_side = hyper::upgrade::on(&mut response);
            let open = GaugeGuard::new(&self.metrics.upgrades_open);
            let idle = self.limits.upgrade_idle;
            tokio::spawn(async move {
                let _open = (open, slot);
                match tokio::try_join!(client_side, service_side) {
                    Ok((client_io, service_io)) => {
                        let client_io = TokioIo::new(client_io);
                        let service_io = TokioIo::new(service_io);
                        if let Ok(true) =
                            idle::copy_bidirectional(client_io, service_io, idle).await
                        {
                            debug!(%port, "upgraded connection idle; closed");
                        }
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, pages::full(Bytes::new()));
        }

        strip_hop_by_hop(response.headers_mut());
        let sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let guard = sse.then(|| GaugeGuard::new(&self.metrics.sse_open));
        let back = Some((self.pool.clone(), (conn_id, port.get()), sender));
        response.map(|body| {
            self.metrics
                .count_body(Returning::new(body, back), "to_client", (guard, slot))
                .boxed()
        })
    }
}

impl Proxy {
    /// Opens a data stream to the devbox's agent and waits for its answer. While the agent is
    /// away (reconnecting, resuming, the edge just restarted) the request waits in a bounded
    /// queue for up to `agent_wait`; a connection that fails under it is retried on the next
    /// one, so a short blip costs no request. The request body is not read until the agent
    /// accepted, so a retry never replays anything.
    async fn stream_to_agent(
        &self,
        key: &str,
        devbox_id: &str,
        header: StreamHeader,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, usize), (StatusCode, String)> {
        let port = header.port;
        let deadline = Instant::now() + self.agent_wait;
        let mut place = None;
        let mut failed = None;
        let mut waiting_since: Option<Instant> = None;
        loop {
            // Register for the next attach before looking, so one in between is not missed.
            let next_attach = self.registry.next_attach();
            tokio::pin!(next_attach);
            next_attach.as_mut().enable();
            let Some(route) = self.registry.route(key) else {
                return Err((StatusCode::NOT_FOUND, NOT_FOUND.to_owned()));
            };
            if let Some(conn) = route.conn.filter(|c| Some(c.stable_id()) != failed) {
                let answer =
                    tokio::time::timeout(ANSWER_TIMEOUT, open_stream(&conn, header.clone()));
                match answer.await {
                    Ok(Ok(Ok((send, recv)))) => {
                        self.waited(waiting_since, "served");
                        return Ok((send, recv, conn.stable_id()));
                    }
                    Ok(Ok(Err(reason))) => return Err(refusal(reason, port)),
                    Ok(Err(e)) if connection_lost(&e) => {
                        debug!(error = %e, "agent connection failed under a request; waiting for the next");
                        failed = Some(conn.stable_id());
                        continue;
                    }
                    Ok(Err(e)) => {
                        debug!(error = %e, "data stream failed");
                        return Err((
                            StatusCode::BAD_GATEWAY,
                            "the stream to the devbox's agent failed; try again".to_owned(),
                        ));
                    }
                    Err(_) => {
                        return Err((
                            StatusCode::GATEWAY_TIMEOUT,
                            "the devbox's agent did not answer in time".to_owned(),
                        ));
                    }
                }
            }
            if place.is_none() {
                place = self.registry.queue(devbox_id, self.max_waiting);
                waiting_since.get_or_insert_with(Instant::now);
                if place.is_none() {
                    self.metrics.waits.with_label_values(&["queue_full"]).inc();
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many requests are waiting for this devbox's agent; try again in a few seconds".to_owned(),
                    ));
                }
            }
            if tokio::time::timeout_at(deadline, next_attach)
                .await
                .is_err()
            {
                self.waited(waiting_since, "timed_out");
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the devbox's agent is not connected; try again in a few seconds".to_owned(),
                ));
            }
        }
    }
}

impl Proxy {
    /// Lets a request through an authenticated tunnel (`None`), or answers it here: a
    /// browser's first visit with the token in the query, or a refusal. The token and the
    /// cookie are taken out of a request that passes: they never reach the service.
    fn authenticate<B>(
        &self,
        req: &mut Request<B>,
        host: &str,
        key: &str,
        hash: Option<TokenHash>,
        scheme: Scheme,
        html: bool,
    ) -> Option<Response<Body>> {
        let refuse = |detail: &str| {
            self.metrics.auth_failures.inc();
            Some(pages::error(StatusCode::UNAUTHORIZED, detail, html))
        };
        // No token hash means the tunnel cannot be opened at all.
        let Some(hash) = hash else {
            return refuse("this tunnel has no token; rotate it through the admin API");
        };
        if let Some((token, rest)) = auth::query_token(req.uri()) {
            if !hash.matches(token.expose()) {
                return refuse("the burrow_token in the URL is not this tunnel's token");
            }
            let value = self.cookie_key.value(key, &hash, auth::now());
            // Absolute, on this host: a path like `//elsewhere.example/` must not turn the
            // redirect into one to another site, nor one without a leading `/` (an HTTP/2
            // `:path` can lack it) into `http://host@elsewhere`.
            let slash = if rest.starts_with('/') { "" } else { "/" };
            let location = format!("{}://{host}{slash}{rest}", scheme.as_str());
            return Some(auth::redirect_with_cookie(
                &location,
                &value,
                scheme == Scheme::Https,
            ));
        }
        // The tunnel's token, or a browser's cookie. A request may carry both the cookie and
        // an `Authorization` of the application's own (a single-page app's bearer token):
        // that header then goes to the service untouched.
        let presented = bearer(req.headers());
        let by_token = presented.is_some_and(|token| hash.matches(token));
        let now = auth::now();
        let by_cookie = !by_token
            && auth::cookies(req.headers()).any(|c| self.cookie_key.verify(key, &hash, c, now));
        if !(by_token || by_cookie) {
            let detail = if presented.is_some() {
                "the bearer token is not this tunnel's token"
            } else if auth::cookies(req.headers()).next().is_some() {
                "this browser's tunnel cookie is not valid here (expired, the token was rotated, or it is another tunnel's); open the URL with ?burrow_token=<token> again"
            } else {
                "this tunnel needs `Authorization: Bearer <token>`, or, in a browser, the URL opened once with ?burrow_token=<token>"
            };
            return refuse(detail);
        }
        if by_token {
            // The tunnel's own token never reaches the service.
            req.headers_mut().remove(header::AUTHORIZATION);
        }
        None
    }

    /// Records a wait for an agent, if the request waited.
    fn waited(&self, since: Option<Instant>, result: &str) {
        if let Some(since) = since {
            self.metrics.waits.with_label_values(&[result]).inc();
            self.metrics
                .wait_duration
                .observe(since.elapsed().as_secs_f64());
        }
    }
}

/// 502 for a service that took the request and closed the connection without an answer.
fn no_answer(port: burrow_protocol::Port, html: bool) -> Response<Body> {
    pages::error(
        StatusCode::BAD_GATEWAY,
        &format!("the service on port {port} closed the connection without answering"),
        html,
    )
}

/// The answer for a stream the agent refused.
fn refusal(reason: RefuseReason, port: burrow_protocol::Port) -> (StatusCode, String) {
    match reason {
        RefuseReason::NotListening => (
            StatusCode::BAD_GATEWAY,
            format!("nothing is listening on port {port} in this devbox"),
        ),
        RefuseReason::PortNotAllowed => (
            StatusCode::FORBIDDEN,
            format!("port {port} is not allowed by this devbox's agent"),
        ),
        RefuseReason::ConnectTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("the service on port {port} did not accept the connection in time"),
        ),
        RefuseReason::TooManyStreams => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the devbox's agent is at its stream limit; try again shortly".to_owned(),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            format!("the devbox's agent refused the stream ({reason})"),
        ),
    }
}

/// Whether a stream failed because its whole connection did (the request may go to the next).
fn connection_lost(e: &wire::WireError) -> bool {
    use quinn::{ReadError, WriteError};
    matches!(
        e,
        wire::WireError::Read(ReadError::ConnectionLost(_))
            | wire::WireError::Write(WriteError::ConnectionLost(_))
    )
}

/// Opens a data stream and waits for the agent's answer.
async fn open_stream(
    conn: &quinn::Connection,
    header: StreamHeader,
) -> Result<Result<(quinn::SendStream, quinn::RecvStream), RefuseReason>, wire::WireError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| wire::WireError::Read(quinn::ReadError::ConnectionLost(e)))?;
    wire::write_frame(&mut send, header.encoded()).await?;
    match wire::read_msg(&mut recv, StreamAnswer::decode).await? {
        Some(StreamAnswer::Accept) => Ok(Ok((send, recv))),
        Some(StreamAnswer::Refuse(reason)) => Ok(Err(reason)),
        None => Err(wire::WireError::Truncated),
    }
}

/// The public host, from the one place the request names it. The target's authority (an
/// absolute-form HTTP/1.1 target, HTTP/2's `:authority`) wins over `Host` (RFC 9112, 3.2.2),
/// and a request whose two disagree is refused (RFC 9113, 8.3.1), as is one with several
/// `Host` lines (RFC 9112, 3.2): a proxy in front might read the other one.
fn request_host<B>(req: &Request<B>) -> Result<String, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header");
    }
    let host = host
        .map(|h| h.to_str().map_err(|_| "the Host header is not ASCII"))
        .transpose()?;
    match (req.uri().authority().map(|a| a.as_str()), host) {
        (Some(authority), Some(host)) if !authority.eq_ignore_ascii_case(host) => {
            Err("the request's target and its Host header name different hosts")
        }
        (Some(name), _) | (None, Some(name)) => Ok(name.to_owned()),
        (None, None) => Err("the request names no host"),
    }
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The answer for an unknown key or a disabled tunnel: the same for both.
const NOT_FOUND: &str = "no tunnel is enabled at this address; check the URL";

fn not_found(html: bool) -> Response<Body> {
    pages::error(StatusCode::NOT_FOUND, NOT_FOUND, html)
}

/// Whether the request is a WebSocket upgrade the edge will carry (`Ok(true)`), a plain request
/// (`Ok(false)`; an `Upgrade` to anything else is ignored, as RFC 9110 allows), or a malformed
/// WebSocket handshake, refused before anything is switched to raw bytes (RFC 6455, 4.2.1).
fn websocket_upgrade(
    method: &http::Method,
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
    if method != http::Method::GET {
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

/// Whether a comma-separated header (every line of it) has an element `wanted` accepts
/// (elements trimmed; lines that are not ASCII are skipped).
pub fn list_has(headers: &HeaderMap, name: &HeaderName, wanted: impl Fn(&str) -> bool) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|element| wanted(element.trim()))
}

/// Removes hop-by-hop headers and any header the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Split the bytes, not a string: a value with one non-ASCII byte still names the rest.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// HTTP/2 may split cookies into several fields; HTTP/1.1 needs one (RFC 9113, 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// The client's headers as the service may see them: no hop-by-hop header (nor any the
/// `Connection` header names), no client-sent forwarding header (the edge writes its own), and
/// cookies in one field.
pub fn filter_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let n = name.as_str();
            n.starts_with("x-forwarded-") || n == "forwarded" || n == "x-real-ip"
        })
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
    join_cookies(headers);
}

/// The request as the service gets it: HTTP/1.1, origin-form, hop-by-hop headers gone, `Host`
/// the public host (or `service_host`, for a tunnel that rewrites it), `X-Forwarded-*` set by
/// the edge (client-sent values are replaced).
/// With `service_host`, an `Origin` naming the public host names `service_host` too, so a
/// dev server that checks Origin against Host (Jupyter, Vite's WebSocket) still agrees.
fn outbound_request(
    req: Request<Incoming>,
    host: &str,
    service_host: Option<&str>,
    client: SocketAddr,
    scheme: Scheme,
    upgrade: bool,
) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
    filter_headers(&mut parts.headers);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::UPGRADE) && !h.contains_key(header::CONNECTION));
    }

    #[test]
    fn split_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

    /// Found by the `header_filter` fuzz target: a non-ASCII byte hid the named headers.
    #[test]
    fn connection_names_survive_a_non_ascii_byte() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-a, \x80").expect("obs-text is a valid value"),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        filter_headers(&mut h);
        assert!(!h.contains_key("x-a"));
    }

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-secret, close"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-secret"));
        assert!(h.contains_key("x-kept"));
    }
}
