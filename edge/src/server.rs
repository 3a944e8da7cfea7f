//! Wiring: state directory, admin token, store, certificates, the four listeners (public HTTP,
//! public HTTPS, agents over QUIC, admin), and orderly shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admin::Admin;
use crate::agents;
use crate::auth::CookieKey;
use crate::certs::{self, CertError, Identity, PublicCert};
use crate::config::Config;
use crate::limits::{self, PerKey};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::proxy::{Body, Proxy, Scheme};
use crate::registry::{Registry, UrlBase};
use crate::secret::Secret;
use crate::store::{Store, StoreError};

/// File names in `state_dir`.
const STORE_FILE: &str = "burrow.db";
const ADMIN_TOKEN_FILE: &str = "admin.token";
const RESET_KEY_FILE: &str = "reset.key";
const COOKIE_KEY_FILE: &str = "cookie.key";
/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A file or directory problem.
    #[error("{path}: {message}")]
    File {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (`{key}`): {source}")]
    Bind {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Certificates.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The OS RNG failed.
    #[error("cannot generate the admin token: {0}")]
    Random(#[from] getrandom::Error),
}

/// TCP keep-alive on public connections: idle time before the first probe, and between probes.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// A running edge.
#[derive(Debug)]
pub struct Edge {
    /// The public HTTP listener's address.
    pub http_addr: Option<SocketAddr>,
    /// The public HTTPS listener's address.
    pub https_addr: Option<SocketAddr>,
    /// The QUIC listener's address.
    pub agents_addr: SocketAddr,
    /// The admin API's address.
    pub admin_addr: SocketAddr,
    /// The metrics listener's address.
    pub metrics_addr: Option<SocketAddr>,
    /// The edge's metrics.
    pub metrics: Arc<Metrics>,
    /// The admin token.
    pub admin_token: Secret,
    /// The generated CA agents should trust, when no agents certificate is configured.
    pub agent_ca: Option<PathBuf>,
    /// The TLS name agents verify.
    pub server_name: String,
    /// Devboxes, tunnels and sessions.
    pub registry: Arc<Registry>,
    public_cert: Option<Arc<PublicCert>>,
    agents_endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// What the edge knows about a client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The TLS server name the client asked for (HTTPS only).
    pub sni: Option<Arc<str>>,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>, ConnInfo) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

impl Edge {
    /// Starts every listener. Returns once all are bound and serving.
    pub async fn start(config: Config) -> Result<Edge, StartError> {
        create_state_dir(&config.state_dir)?;
        let admin_token = admin_token(&config)?;
        let store = Store::open(&config.state_dir.join(STORE_FILE))?;

        let http = match config.http {
            Some(addr) => Some(bind("public.http", addr).await?),
            None => None,
        };
        let public_cert = match &config.https {
            Some(h) => Some(Arc::new(PublicCert::new(Identity::load(&h.tls)?)?)),
            None => None,
        };
        let https = match (&config.https, &public_cert) {
            (Some(h), Some(cert)) => {
                let tls = certs::public_tls_config(cert.clone())?;
                Some((
                    bind("public.https", h.listen).await?,
                    TlsAcceptor::from(Arc::new(tls)),
                ))
            }
            _ => None,
        };
        let admin = bind("admin.listen", config.admin_listen).await?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(bind("metrics.listen", addr).await?),
            None => None,
        };
        let local = |l: &TcpListener| l.local_addr().ok();
        let http_addr = http.as_ref().and_then(local);
        let https_addr = https.as_ref().and_then(|(l, _)| local(l));
        let urls = match (https_addr, http_addr) {
            (Some(addr), _) => url_base("https", &config.domain, addr.port(), 443),
            (None, Some(addr)) => url_base("http", &config.domain, addr.port(), 80),
            (None, None) => url_base("http", &config.domain, 80, 80),
        };
        let registry = Registry::load(store, urls)?;

        let (identity, agent_ca) = match &config.agents_tls {
            Some(files) => (Identity::load(files)?, None),
            None => {
                let (identity, ca) =
                    certs::generated_agent_identity(&config.state_dir, &config.agents_server_name)?;
                (identity, Some(ca))
            }
        };
        let endpoint = agents_endpoint(&config, certs::agents_server_config(identity)?)?;
        let agents_endpoint = endpoint.clone();
        let agents_addr = endpoint.local_addr().unwrap_or(config.agents_listen);
        let admin_addr = local(&admin).unwrap_or(config.admin_listen);

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let metrics = Metrics::new();
        tasks.spawn(agents::serve(
            endpoint,
            registry.clone(),
            metrics.clone(),
            config.drain_grace,
            shutdown.clone(),
        ));

        let proxy = Arc::new(Proxy::new(
            registry.clone(),
            metrics.clone(),
            &config,
            Pool::new(config.pool_max_idle, config.pool_idle),
            CookieKey::load_or_create(&config.state_dir.join(COOKIE_KEY_FILE))?,
        ));
        let public = |scheme: Scheme| -> Handler {
            let proxy = proxy.clone();
            let metrics = metrics.clone();
            Arc::new(move |req, conn| {
                let proxy = proxy.clone();
                let metrics = metrics.clone();
                Box::pin(async move {
                    let started = std::time::Instant::now();
                    let response = proxy.handle(req, conn, scheme).await;
                    metrics.answered(response.status(), started.elapsed());
                    response
                })
            })
        };
        if let Some(listener) = http {
            tasks.spawn(serve(
                listener,
                None,
                public(Scheme::Http),
                config.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        if let Some((listener, tls)) = https {
            tasks.spawn(serve(
                listener,
                Some(tls),
                public(Scheme::Https),
                config.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        let admin_api = Arc::new(Admin::new(
            registry.clone(),
            admin_token.hash(),
            metrics.clone(),
            config.limits.admin_failures,
        ));
        let admin_handler: Handler = Arc::new(move |req, conn| {
            let admin_api = admin_api.clone();
            Box::pin(async move { admin_api.handle(req, conn.peer).await })
        });
        tasks.spawn(serve(
            admin,
            None,
            admin_handler,
            config.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let metrics_addr = match metrics_listener {
            Some(listener) => {
                let addr = local(&listener);
                let (scraped, registry) = (metrics.clone(), registry.clone());
                let handler: Handler = Arc::new(move |req, _conn| {
                    let response = scraped.handle(req.uri().path(), &registry);
                    Box::pin(async move { response })
                });
                tasks.spawn(serve(
                    listener,
                    None,
                    handler,
                    config.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ));
                addr
            }
            None => None,
        };
        tasks.close();

        info!(
            http = ?http_addr, https = ?https_addr, agents = %agents_addr, admin = %admin_addr,
            domain = %config.domain, "edge listening"
        );
        Ok(Edge {
            http_addr,
            https_addr,
            agents_addr,
            admin_addr,
            metrics_addr,
            metrics,
            admin_token,
            agent_ca,
            server_name: config.agents_server_name.clone(),
            registry,
            public_cert,
            agents_endpoint,
            shutdown,
            tasks,
        })
    }

    /// Reloads the certificates (SIGHUP): the public HTTPS certificate and the agents'
    /// certificate (or a fresh leaf from the generated CA). Running connections keep theirs;
    /// new ones get the new certificates. On error nothing changes.
    pub fn reload_certs(&self, config: &Config) -> Result<(), StartError> {
        if self.shutdown.is_cancelled() {
            return Ok(());
        }
        let agents = match &config.agents_tls {
            Some(files) => Identity::load(files)?,
            None => {
                certs::generated_agent_identity(&config.state_dir, &config.agents_server_name)?.0
            }
        };
        let public = match (&config.https, &self.public_cert) {
            (Some(h), Some(_)) => Some(Identity::load(&h.tls)?),
            _ => None,
        };
        let agents = certs::agents_server_config(agents)?;
        if let (Some(identity), Some(cert)) = (public, &self.public_cert) {
            cert.replace(identity)?;
        }
        self.agents_endpoint.set_server_config(Some(agents));
        info!("certificates reloaded");
        Ok(())
    }

    /// A token that stops the edge when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, tells agents to go away, drains running requests, and returns.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }

    /// Waits until the edge has stopped (after its shutdown token fired).
    pub async fn wait(&self) {
        self.tasks.wait().await;
    }
}

/// The QUIC endpoint for agents, with the stateless reset key kept in `state_dir`: after a
/// restart, a packet of a connection the edge no longer knows is answered with a stateless reset
/// the agent can verify, so it redials at once instead of waiting out its idle timeout.
fn agents_endpoint(
    config: &Config,
    server: quinn::ServerConfig,
) -> Result<quinn::Endpoint, StartError> {
    let key = certs::load_or_create_secret(&config.state_dir.join(RESET_KEY_FILE), 64)?;
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(hmac));
    // Connection IDs are signed so the edge can tell its own from garbage; the signing key
    // must survive a restart too, or the new process drops an old connection's packets as
    // invalid instead of answering them with the reset.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&key[32..40]);
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let bind_err = |source| StartError::Bind {
        key: "agents.listen",
        addr: config.agents_listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(config.agents_listen).map_err(bind_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no async runtime")))?;
    quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime).map_err(bind_err)
}

fn url_base(scheme: &'static str, domain: &str, port: u16, default: u16) -> UrlBase {
    UrlBase {
        scheme,
        domain: domain.to_owned(),
        port_suffix: if port == default {
            String::new()
        } else {
            format!(":{port}")
        },
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

fn create_state_dir(dir: &Path) -> Result<(), StartError> {
    let err = |e: std::io::Error| StartError::File {
        path: dir.to_owned(),
        message: format!("cannot create the state directory (`state_dir`): {e}"),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// The admin token: from `admin.token_file`, or generated once in `state_dir`.
fn admin_token(config: &Config) -> Result<Secret, StartError> {
    let generated = config.state_dir.join(ADMIN_TOKEN_FILE);
    let path = config.admin_token_file.clone().unwrap_or(generated);
    if config.admin_token_file.is_none() && !path.exists() {
        let token = Secret::generate()?;
        certs::write_private(&path, format!("{}\n", token.expose()).as_bytes())?;
        return Ok(token);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| StartError::File {
        path: path.clone(),
        message: format!("cannot read the admin token (`admin.token_file`): {e}"),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(StartError::File {
            path,
            message: "the admin token file is empty".into(),
        });
    }
    Ok(Secret::new(token))
}

/// Serves HTTP (1.1 and 2) on a listener until shutdown, then drains for `drain_grace`.
async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Handler,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let limits = &config.limits;
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
        let handler = handler.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let head_timeout = limits.head_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let service = |sni: Option<Arc<str>>| {
                let info = ConnInfo { peer, sni };
                service_fn(move |req| {
                    let handler = handler.clone();
                    let info = info.clone();
                    async move { Ok::<_, Infallible>(handler(req, info).await) }
                })
            };
            let result = match tls {
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
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let sni = stream.get_ref().1.server_name().map(Arc::from);
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service(sni));
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.drain_grace) => {
            debug!("drain grace over; dropping remaining connections");
        }
    }
}
