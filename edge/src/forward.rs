//! The forward step: a request as an HTTP exchange with the service, over a data stream to the
//! devbox's agent: HTTP/1.1 on a kept-alive stream from the [`Pool`] when there is one, or
//! HTTP/2 on the port's shared connection ([`http2`]) for gRPC and HTTP/2-only services. The request goes
//! as the service should see it (`outbound_request`); the response streams back as it comes,
//! and its connection returns to the pool once the client has the whole body.
//!
//! The WebSocket step ([`upgrade`](crate::upgrade)) sends its handshake the same way, with
//! [`Forward::send`], and hands an answer other than 101 back with [`Forward::deliver`].

use std::sync::Arc;

use burrow_protocol::{Port, RefuseReason, StreamKind};
use http::header;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::body::{Body, ToService};
use crate::dial::{Dialer, Opened, Refusal};
use crate::h1::{self, Failed};
use crate::headers;
use crate::http2::{self, Claim, Connecting, Http2Conns};
use crate::metrics::{CountedBody, Direction, GaugeGuard, Metrics};
use crate::outbound::{for_http2, outbound_request};
use crate::pages::{self, Answer, Form};
use crate::pool::Pool;
use crate::route::Routed;
use crate::throttle::InFlight;

/// How long a gRPC call waits for another call that is opening its port's HTTP/2 connection
/// (that call's own stream open and the agent's answer are bounded by less).
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The request as it goes to the service, its body counted.
type Outbound = Request<CountedBody<ToService>>;

/// The forward step: streams to agents, the pool of kept-alive connections, the shared HTTP/2
/// connections, the metrics.
#[derive(Debug)]
pub struct Forward {
    dial: Arc<Dialer>,
    pool: Arc<Pool>,
    http2: Arc<Http2Conns>,
    metrics: Arc<Metrics>,
}

/// A service's response body: from hyper's client (HTTP/2, and the WebSocket handshake's
/// HTTP/1.1), or from the edge's own HTTP/1.1 ([`h1`]), whose connection goes back to the pool.
pub type FromService = Either<Incoming, h1::Reply>;

/// The service's answer, with the connection it came on.
#[derive(Debug)]
pub struct Answered {
    /// The response head and its streaming body.
    pub response: Response<FromService>,
    /// The pool's id of the agent connection (or of the mesh connection and devbox).
    conn_id: usize,
}

/// The agent connection a kept connection to a service would ride: the devbox's own on this
/// edge, or a mesh connection to the edge that holds it.
struct Via {
    conn: quinn::Connection,
    /// The pool's id for it.
    conn_id: usize,
    forwarded: bool,
}

/// A kept connection to a service.
enum Kept {
    /// An idle HTTP/1.1 connection from the pool, this request's alone.
    Http1(h1::Conn),
    /// A shared HTTP/2 connection.
    Http2(http2::Sender),
}

impl Forward {
    /// Forwards over streams `dial` opens, reusing the HTTP/1.1 connections `pool` keeps and
    /// the HTTP/2 connections `http2` keeps.
    pub fn new(
        dial: Arc<Dialer>,
        pool: Arc<Pool>,
        http2: Arc<Http2Conns>,
        metrics: Arc<Metrics>,
    ) -> Forward {
        Forward {
            dial,
            pool,
            http2,
            metrics,
        }
    }

    /// Forwards a plain HTTP request and streams the service's answer back.
    pub async fn exchange(
        &self,
        req: Request<Incoming>,
        routed: &Routed,
        slot: InFlight,
    ) -> Result<Response<Body>, Answer> {
        let answered = self.send(req, routed, false).await?;
        if answered.response.status() == StatusCode::SWITCHING_PROTOCOLS {
            warn!(port = %routed.target.port, "service switched protocols without being asked");
            return Err(pages::error(
                StatusCode::BAD_GATEWAY,
                "the service sent an unexpected 101",
                routed.form,
            ));
        }
        Ok(self.deliver(answered, routed.target.port, slot))
    }

    /// Sends the request to the service and waits for its response head.
    ///
    /// Which protocol: HTTP/2 for gRPC (`content-type: application/grpc*`, not gRPC-Web) and
    /// for every request to a port the agent marks HTTP/2-only, on the port's shared HTTP/2
    /// connection when it has one; HTTP/1.1 for the rest, on a kept-alive connection for a
    /// request HTTP lets the edge send again (not for an `upgrade`, which takes the connection
    /// over, nor a POST). A request no kept connection took goes on a fresh stream, where the
    /// agent's answer may still turn it to HTTP/2.
    pub async fn send(
        &self,
        req: Request<Incoming>,
        routed: &Routed,
        upgrade: bool,
    ) -> Result<Answered, Answer> {
        let port = routed.target.port;
        let service_host = routed
            .route
            .rewrite_host
            .then(|| format!("localhost:{port}"));
        let outbound = outbound_request(
            req,
            &routed.host,
            service_host.as_deref(),
            routed.client,
            routed.scheme,
            upgrade,
        );
        let activity = routed.route.activity.clone();
        let mut outbound = outbound.map(|body| {
            self.metrics
                .count_body(Either::Left(body), Direction::FromClient, (), activity)
        });
        let grpc = routed.form == Form::Grpc { web: false };
        if upgrade {
            return self.send_fresh(outbound, routed, Want::Upgrade, None).await;
        }
        // A request HTTP does not let the edge send again (a POST, a body) goes on a fresh
        // HTTP/1.1 stream, whose body waits for the agent's accept: on a kept-alive stream of
        // an agent that has just died it would be sent into the void, and the edge could not
        // tell whether the service saw it (the soak met this: a POST sent right after
        // `kill -9`, answered 502 once the restarted agent took over). HTTP/2 is shared by
        // design, and its requests go on the open connection.
        let mut claim = None;
        if let Some(via) = self.via(routed).await {
            let key = (via.conn_id, port.get());
            let kept = if grpc {
                match self.http2.claim(key) {
                    Claim::Open(sender) => Some(Kept::Http2(sender)),
                    Claim::Busy(mut opening) => {
                        // Another call is opening the port's connection: wait for it, then
                        // take it (or, if it failed, open one of this call's own).
                        let _ = tokio::time::timeout(CONNECT_WAIT, opening.changed()).await;
                        self.http2.get(key, true).map(Kept::Http2)
                    }
                    Claim::Mine(connecting) => {
                        claim = Some(connecting);
                        None
                    }
                }
            } else {
                match self.http2.get(key, false) {
                    Some(sender) => Some(Kept::Http2(sender)),
                    None if !Replay::allowed(&outbound) => None,
                    None => self.pool.checkout(key).map(Kept::Http1),
                }
            };
            if let Some(kept) = kept {
                match self.send_kept(kept, outbound, routed, &via).await? {
                    Ok(answered) => return Ok(answered),
                    Err(back) => outbound = back,
                }
            }
        }
        let want = if grpc { Want::Http2 } else { Want::Http1 };
        self.send_fresh(outbound, routed, want, claim).await
    }

    /// The service's response as the client gets it: hop-by-hop headers gone, the body counted
    /// (and an open SSE stream), the devbox's `slot` held until the body is done; an HTTP/1.1
    /// connection then goes back to the pool, keeping the slot while it waits there.
    pub fn deliver(&self, answered: Answered, port: Port, slot: InFlight) -> Response<Body> {
        let Answered {
            mut response,
            conn_id,
        } = answered;
        headers::strip_hop_by_hop(response.headers_mut());
        let sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let guard = sse.then(|| GaugeGuard::new(&self.metrics.sse_open));
        let activity = slot.activity();
        let (slot, counted) = slot.into_parts();
        let slot = match response.body_mut() {
            Either::Right(reply) => {
                // An HTTP/1.1 connection goes back to the pool, with the devbox's place its
                // request held, once its answer has been read to the end.
                let pool = self.pool.clone();
                let key = (conn_id, port.get());
                reply.on_done(Box::new(move |conn| pool.checkin(key, conn, slot)));
                None
            }
            Either::Left(_) => Some(slot),
        };
        response.map(|body| {
            let guards = (guard, counted, slot);
            self.metrics
                .count_body(body, Direction::ToClient, guards, activity)
                .boxed()
        })
    }

    /// Where a kept connection to the routed devbox would be: the agent connection the route
    /// step has just read, or without one here, a mesh connection to another edge that holds
    /// the devbox's agent.
    async fn via(&self, routed: &Routed) -> Option<Via> {
        match routed.route.conn.as_ref() {
            Some(conn) => Some(Via {
                conn: conn.clone(),
                conn_id: conn.stable_id(),
                forwarded: false,
            }),
            None => {
                let (conn, conn_id) = self.dial.forwarded_conn(&routed.route.devbox_id).await?;
                Some(Via {
                    conn,
                    conn_id,
                    forwarded: true,
                })
            }
        }
    }

    /// Sends on a kept connection. `Ok(Err(request))`: the connection did not take the
    /// request; it can go on a fresh one.
    ///
    /// A kept connection rides its agent connection, which may be dead without the edge
    /// knowing yet (an agent killed and restarted). When a newer connection of the devbox takes
    /// over, or the kept connection fails, before the service answered, a `replay` (a
    /// bodiless idempotent request, which HTTP lets a client send again) goes again on a fresh
    /// stream of the newest connection; any other request is answered 502, as it may have
    /// reached the service.
    async fn send_kept(
        &self,
        kept: Kept,
        outbound: Outbound,
        routed: &Routed,
        via: &Via,
    ) -> Result<Result<Answered, Outbound>, Answer> {
        let port = routed.target.port;
        let replay = Replay::of(&outbound);
        let superseded = async {
            if via.forwarded {
                // The owner's agent connection is the owner's to follow: a stream it can no
                // longer relay fails, and the request goes again below.
                via.conn.closed().await;
            } else {
                let key = &routed.target.key;
                let attaches = routed.route.attaches;
                self.dial.superseded(&via.conn, key, attaches).await;
            }
        };
        let sending = async move {
            match kept {
                Kept::Http1(conn) => match conn.exchange(outbound).await {
                    Ok(response) => Ok(response.map(Either::Right)),
                    Err(Failed::NoAnswer(e)) => Err(NotSent::Failed(e)),
                    Err(Failed::Invalid(e)) => Err(NotSent::Invalid(e)),
                },
                Kept::Http2(mut sender) => {
                    match sender.try_send_request(for_http2(outbound)).await {
                        Ok(response) => Ok(response.map(Either::Left)),
                        Err(mut e) => match e.take_message() {
                            Some(request) => Err(NotSent::Back(Box::new(request))),
                            None => Err(NotSent::Failed(e.into_error().to_string())),
                        },
                    }
                }
            }
        };
        let sent = tokio::select! {
            sent = sending => sent,
            () = superseded => {
                return match replay {
                    Some(replay) => {
                        debug!(%port, "agent connection replaced under a kept-alive request; sending it again");
                        Ok(Err(replay.request(&self.metrics)))
                    }
                    None => Err(not_sent_again(routed.form)),
                };
            }
        };
        match sent {
            Ok(response) => {
                self.metrics.pooled(true);
                Ok(Ok(Answered {
                    response,
                    conn_id: via.conn_id,
                }))
            }
            Err(NotSent::Back(request)) => Ok(Err(*request)),
            Err(NotSent::Invalid(e)) => Err(invalid_answer(port, &e, routed.form)),
            Err(NotSent::Failed(e)) => match replay {
                // The kept connection died under the request: the agent's connection was
                // closed (it may beat the news that a newer one took over), or the service
                // closed the idle connection as the request went out. A request HTTP lets a
                // client send again goes again, on a fresh stream.
                Some(replay) => {
                    debug!(error = %e, %port, "kept-alive connection failed under the request; sending it again");
                    Ok(Err(replay.request(&self.metrics)))
                }
                None if via.conn.close_reason().is_some() => {
                    debug!(error = %e, %port, "agent connection closed under a kept-alive request");
                    Err(not_sent_again(routed.form))
                }
                None => {
                    debug!(error = %e, %port, "kept-alive connection failed");
                    Err(no_answer(port, routed.form))
                }
            },
        }
    }

    /// Sends on a new connection over a fresh data stream. When the agent connection under it
    /// closes before the service answered (an agent killed and restarted, a dead path given
    /// up), a bodiless idempotent request goes once more, on a fresh stream of the newest
    /// connection; any other request is answered 502, as it may have reached the service. A
    /// service that closes without answering on a live connection gets no second try.
    /// `claim`: this request opens its port's HTTP/2 connection for the others waiting.
    async fn send_fresh(
        &self,
        outbound: Outbound,
        routed: &Routed,
        want: Want,
        claim: Option<Connecting>,
    ) -> Result<Answered, Answer> {
        let port = routed.target.port;
        let replay = Replay::of(&outbound);
        let lost = match self.send_fresh_once(outbound, routed, want, claim).await? {
            Ok(answered) => return Ok(answered),
            Err(lost) => lost,
        };
        match replay {
            Some(replay) if lost => {
                debug!(%port, "agent connection closed under a request on a fresh stream; sending it again");
                let again = self.send_fresh_once(replay.request(&self.metrics), routed, want, None);
                again.await?.map_err(|_| no_answer(port, routed.form))
            }
            _ if lost => Err(not_sent_again(routed.form)),
            _ if want == Want::Http2 => Err(pages::error(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "the service on port {port} did not answer over HTTP/2 (h2c, prior \
                     knowledge), which gRPC needs"
                ),
                routed.form,
            )),
            _ => Err(no_answer(port, routed.form)),
        }
    }

    /// One try of [`Forward::send_fresh`]. `Ok(Err(lost))`: the service did not answer;
    /// `lost` says the agent connection under the stream had closed.
    async fn send_fresh_once(
        &self,
        outbound: Outbound,
        routed: &Routed,
        want: Want,
        claim: Option<Connecting>,
    ) -> Result<Result<Answered, bool>, Answer> {
        let port = routed.target.port;
        let kind = match want {
            Want::Http2 => StreamKind::Http2,
            Want::Http1 | Want::Upgrade => StreamKind::Http,
        };
        let opened = self.open(routed, kind).await?;
        self.metrics.pooled(false);
        let conn = opened.conn.clone();
        let conn_id = opened.conn_id;
        let http2_only = opened.http2_only;
        let stream_failed = |e: hyper::Error| {
            debug!(error = %e, "handshake on data stream failed");
            pages::error(
                StatusCode::BAD_GATEWAY,
                "the tunnel stream failed",
                routed.form,
            )
        };
        let sent = if kind == StreamKind::Http2 || http2_only {
            if want == Want::Upgrade {
                return Err(pages::error(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "the service on port {port} speaks HTTP/2 only (the agent's \
                         forward.http2_ports): it takes no WebSocket"
                    ),
                    routed.form,
                ));
            }
            let mut sender = http2::handshake(opened).await.map_err(stream_failed)?;
            self.http2.put((conn_id, port.get()), &sender, http2_only);
            // The calls waiting for this connection may go on it now.
            drop(claim);
            let sent = sender.send_request(for_http2(outbound)).await;
            sent.map(|response| response.map(Either::Left))
                .map_err(|e| e.to_string())
        } else if want == Want::Upgrade {
            // A WebSocket handshake goes through hyper's client, whose upgrade hands the
            // stream over once the service switched protocols.
            let io = TokioIo::new(tokio::io::join(opened.recv, opened.send));
            let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
                .handshake::<_, CountedBody<ToService>>(io)
                .await
                .map_err(stream_failed)?;
            tokio::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(error = %e, "service connection ended with an error");
                }
            });
            let sent = sender.send_request(outbound).await;
            sent.map(|response| response.map(Either::Left))
                .map_err(|e| e.to_string())
        } else {
            let sent = h1::Conn::new(opened.send, opened.recv)
                .exchange(outbound)
                .await;
            match sent {
                Ok(response) => Ok(response.map(Either::Right)),
                Err(Failed::Invalid(e)) => return Err(invalid_answer(port, &e, routed.form)),
                Err(Failed::NoAnswer(e)) => Err(e),
            }
        };
        match sent {
            Ok(response) => Ok(Ok(Answered { response, conn_id })),
            Err(e) => {
                debug!(error = %e, %port, "service did not answer");
                Ok(Err(conn.close_reason().is_some()))
            }
        }
    }

    /// Opens a data stream of `kind` for a new connection. An agent at its
    /// `forward.max_streams` refuses it; when kept-alive connections idle on the refusing
    /// agent connection, each holding one of those streams, they are closed and the stream
    /// asked for once more.
    ///
    /// The agent frees a stream only when its task for it sees the stream closed, a moment
    /// after the edge closed it; so the agent, not the edge, waits (up to 200 ms, its
    /// `forward::SLOT_WAIT`) for a free stream before refusing one. The retry is then a single
    /// stream answered as soon as a stream is free, rather than a loop of tries on a timer here.
    async fn open(&self, routed: &Routed, kind: StreamKind) -> Result<Opened, Answer> {
        let not = match self.dial.open(routed, kind).await {
            Ok(opened) => return Ok(opened),
            Err(not) => not,
        };
        let out_of_streams = match not.refusal {
            Some(Refusal {
                reason: RefuseReason::TooManyStreams,
                conn_id,
            }) => self.pool.evict_conn(conn_id) > 0,
            _ => false,
        };
        if !out_of_streams {
            return Err(not.answer);
        }
        debug!(port = %routed.target.port, "agent out of streams; closed its idle kept-alive ones and trying again");
        Ok(self.dial.open(routed, kind).await?)
    }
}

/// What a request needs of a fresh connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// HTTP/1.1, or HTTP/2 if the agent says the port speaks only that.
    Http1,
    /// HTTP/2 (gRPC).
    Http2,
    /// HTTP/1.1 for a WebSocket handshake, which takes the connection over.
    Upgrade,
}

/// What is needed to send a request again: only for an idempotent method without a body
/// (RFC 9110, 9.2.2: a client may retry those when the connection closed before the answer).
#[derive(Debug)]
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    /// Whether HTTP lets the edge send `req` again: an idempotent method without a body.
    fn allowed<B: hyper::body::Body>(req: &Request<B>) -> bool {
        req.method().is_idempotent() && hyper::body::Body::is_end_stream(req.body())
    }

    fn of<B: hyper::body::Body>(req: &Request<B>) -> Option<Replay> {
        Replay::allowed(req).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    /// The request again, with an empty body counted in `metrics` like any other.
    fn request(self, metrics: &Metrics) -> Outbound {
        let body = metrics.count_body(Either::Right(Empty::new()), Direction::FromClient, (), None);
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Why a kept connection did not bring an answer.
enum NotSent {
    /// The connection did not take the request, which comes back to go on another.
    Back(Box<Outbound>),
    /// The connection failed under it (what failed).
    Failed(String),
    /// The service's answer was not HTTP the edge can pass on.
    Invalid(h1::codec::Invalid),
}

/// 502 for a service whose answer was not HTTP/1.1 the edge can pass on.
fn invalid_answer(port: Port, e: &h1::codec::Invalid, form: Form) -> Answer {
    warn!(%port, error = %e, "service sent an answer that is not valid HTTP/1.1");
    pages::error(
        StatusCode::BAD_GATEWAY,
        &format!("the service on port {port} did not answer with valid HTTP/1.1: {e}"),
        form,
    )
}

/// 502 for a service that took the request and closed the connection without an answer.
fn no_answer(port: Port, form: Form) -> Answer {
    pages::error(
        StatusCode::BAD_GATEWAY,
        &format!("the service on port {port} closed the connection without answering"),
        form,
    )
}

/// 502 for a request whose agent connection closed or was replaced under it, and which HTTP
/// does not let the edge send again.
fn not_sent_again(form: Form) -> Answer {
    pages::error(
        StatusCode::BAD_GATEWAY,
        "the devbox's agent connection closed or was replaced while the request was on it; it \
         was not sent again, as it may have reached the service",
        form,
    )
}
