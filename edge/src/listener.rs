//! Serving HTTP (1.1 and 2, TLS or not) on one TCP listener: accept, the bound on connections
//! per client, TCP keep-alive, the TLS handshake under the head's deadline, and at shutdown a
//! drain of the connections still open. What a request gets is the [`Handler`]'s business: the
//! public pipeline, the admin API or the metrics.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::body::Body;
use crate::config::Config;
use crate::limits::{self, Limits, PerKey};
use crate::metrics::Metrics;
use crate::tasks::Tasks;

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keep-alive on public connections: idle time before the first probe, and between probes.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// What the edge knows about a client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The TLS server name the client asked for (HTTPS only).
    pub sni: Option<Arc<str>>,
}

/// A request's handle on its connection, in the request's extensions: cancelling it closes
/// the connection at once, whatever its requests are doing (an events stream whose client
/// stopped reading: its response body is not even polled while the socket is full). On
/// HTTP/2 it closes every stream of the connection.
#[derive(Debug, Clone)]
pub struct CloseConnection(pub CancellationToken);

/// What answers the requests of one listener.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>, ConnInfo) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// Serves HTTP (1.1 and 2) on a listener until shutdown, then drains for `drain_grace`. Each
/// connection runs among `tasks`, which the edge cuts off after the drain.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Handler,
    config: Config,
    metrics: Arc<Metrics>,
    tasks: Tasks,
    shutdown: CancellationToken,
) {
    let limits = &config.limits;
    let builder = http_builder(limits);
    let per_client = PerKey::new(limits.connections_per_client);
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_client.acquire(&limits::client_key(peer.ip())) else {
            debug!(%peer, "too many connections from this client; closing");
            metrics.limited.with_label_values(&["connections"]).inc();
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // A client that vanished (a laptop asleep) must not hold an upgraded stream forever.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE)
            .with_interval(TCP_KEEPALIVE_INTERVAL);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let connection = Connection {
            peer,
            handler: handler.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            head_timeout: limits.head_timeout,
        };
        let tls = tls.clone();
        tasks.spawn(async move {
            let _slot = slot;
            connection.serve(tcp, tls).await;
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.drain_grace) => {
            debug!("drain grace over; the remaining connections are cut off");
        }
    }
}

/// HTTP/1.1 and HTTP/2 with the head's bounds of `limits`.
fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_head_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(TCP_KEEPALIVE))
        .keep_alive_timeout(TCP_KEEPALIVE_INTERVAL * 2);
    builder
}

/// One accepted client connection and what serves it.
struct Connection {
    peer: SocketAddr,
    handler: Handler,
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
    head_timeout: Duration,
}

impl Connection {
    /// Serves the connection's requests (after the TLS handshake, with `tls`) until it closes
    /// or the drain at shutdown ends it.
    async fn serve(self, tcp: TcpStream, tls: Option<TlsAcceptor>) {
        let Connection {
            peer,
            handler,
            builder,
            watcher,
            head_timeout,
        } = self;
        let close = CancellationToken::new();
        let service = |sni: Option<Arc<str>>| {
            let info = ConnInfo { peer, sni };
            let close = CloseConnection(close.clone());
            service_fn(move |mut req: Request<Incoming>| {
                let handler = handler.clone();
                let info = info.clone();
                req.extensions_mut().insert(close.clone());
                async move { Ok::<_, Infallible>(handler(req, info).await) }
            })
        };
        let served = async {
            match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(tcp), service(None));
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    // The handshake shares the head's deadline: a client that trickles its
                    // ClientHello is as slow as one that trickles its headers.
                    let handshake = TLS_HANDSHAKE_TIMEOUT.min(head_timeout);
                    let stream = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return Ok(());
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return Ok(());
                        }
                    };
                    let sni = stream.get_ref().1.server_name().map(Arc::from);
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service(sni));
                    watcher.watch(conn.into_owned()).await
                }
            }
        };
        let result = tokio::select! {
            result = served => result,
            () = close.cancelled() => {
                debug!(%peer, "connection closed by the edge");
                Ok(())
            }
        };
        if let Err(e) = result {
            debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}
