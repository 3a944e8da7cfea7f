//! Wiring: state directory, admin token, store, certificates, the four listeners (public HTTP,
//! public HTTPS, agents over QUIC, admin), and orderly shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::activity;
use crate::admin::Admin;
use crate::agents;
use crate::auth::CookieKey;
use crate::certs::{self, CertError, Identity, PublicCert};
use crate::cluster::{self, ClusterView, Forwarding};
use crate::config::Config;
use crate::handshakes::Handshakes;
use crate::listener::{self, Handler};
use crate::mesh::{self, Mesh};
use crate::metrics::Metrics;
use crate::platform::{self, Events};
use crate::pool::Pool;
use crate::proxy::Proxy;
use crate::registry::{Registry, UrlBase};
use crate::route::Scheme;
use crate::secret::Secret;
use crate::store::{self, Postgres, Sqlite, StoreError};
use crate::tasks::Tasks;

/// File names in `state_dir`.
const STORE_FILE: &str = "burrow.db";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const RESET_KEY_FILE: &str = "reset.key";
pub const COOKIE_KEY_FILE: &str = "cookie.key";

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
    /// The cluster settings cannot work.
    #[error("{0}")]
    Cluster(String),
}

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
    /// The cluster as this edge sees it, when it is one of several.
    pub cluster: Option<Arc<ClusterView>>,
    /// Events for the platform: emitted here, streamed on `GET /v1/events`, and POSTed to
    /// `platform.webhook_url` when it is set.
    pub events: Events,
    public_cert: Option<Arc<PublicCert>>,
    agents_endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Client and upgraded connections, cut off once the listeners and agents have drained.
    clients: Tasks,
}

impl Edge {
    /// Starts every listener. Returns once all are bound and serving.
    pub async fn start(config: Config) -> Result<Edge, StartError> {
        create_state_dir(&config.state_dir)?;
        // Files first (a cluster's secrets, admin token, agents' CA), then the listeners.
        let db = open_store(&config)?;
        let admin_token = admin_token(&config)?;
        let (identity, agent_ca) = agents_identity(&config)?;
        let listeners = Listeners::bind(&config).await?;
        let (http_addr, https_addr) = (listeners.http_addr(), listeners.https_addr());
        let (shutdown, metrics) = (CancellationToken::new(), Metrics::new());
        let urls = listeners.urls(&config.domain);
        let (tasks, clients) = (TaskTracker::new(), Tasks::new());
        let (registry, cluster) =
            platform_registry(&config, db, urls, &metrics, &tasks, &shutdown)?;
        let endpoint = agents_endpoint(&config, certs::agents_server_config(identity)?)?;
        let agents_addr = endpoint.local_addr().unwrap_or(config.agents_listen);
        let admin_addr = local(&listeners.admin).unwrap_or(config.admin_listen);
        let limits = &config.limits;
        let handshakes =
            Handshakes::new(limits.agent_handshakes, limits.agent_handshakes_per_source);
        tasks.spawn(agents::serve(
            endpoint.clone(),
            registry.clone(),
            metrics.clone(),
            handshakes,
            config.drain_grace,
            cluster.as_ref().map(|c| c.view.advertised()),
            shutdown.clone(),
        ));
        let proxy = Arc::new(Proxy::new(
            registry.clone(),
            metrics.clone(),
            &config,
            Pool::new(
                config.pool_max_idle,
                config.pool_max_idle_total,
                config.pool_idle,
                metrics.clone(),
            ),
            CookieKey::load_or_create(&config.state_dir.join(COOKIE_KEY_FILE))?,
            clients.clone(),
            cluster.clone(),
        ));
        let admin = Arc::new(Admin::new(
            registry.clone(),
            cluster.as_ref().map(|forwarding| forwarding.view.clone()),
            admin_token.hash(),
            metrics.clone(),
            config.limits.admin_failures,
        ));
        let serve = |listener, tls, handler| {
            let (config, metrics) = (config.clone(), metrics.clone());
            tasks.spawn(listener::serve(
                listener,
                tls,
                handler,
                config,
                metrics,
                clients.clone(),
                shutdown.clone(),
            ));
        };
        if let Some(listener) = listeners.http {
            let handler = public_handler(&proxy, &metrics, Scheme::Http);
            serve(listener, None, handler);
        }
        if let Some((listener, tls)) = listeners.https {
            let handler = public_handler(&proxy, &metrics, Scheme::Https);
            serve(listener, Some(tls), handler);
        }
        serve(listeners.admin, None, admin_handler(admin));
        let metrics_addr = listeners.metrics.and_then(|listener| {
            let addr = local(&listener);
            serve(listener, None, metrics_handler(&metrics, &registry));
            addr
        });
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
            events: registry.events().clone(),
            registry,
            cluster: cluster.map(|forwarding| forwarding.view),
            public_cert: listeners.public_cert,
            agents_endpoint: endpoint,
            shutdown,
            tasks,
            clients,
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

    /// Stops accepting, tells agents to go away, drains running requests for the drain grace,
    /// and returns once everything the edge started has ended: connections still open then
    /// (a client that sends nothing, a WebSocket) are cut off.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the edge has stopped (after its shutdown token fired), as [`Edge::stop`].
    /// Webhooks go on until then (agents disconnecting in the drain are announced), and get
    /// the drain grace again to deliver what is queued.
    pub async fn wait(&self) {
        self.tasks.wait().await;
        self.clients.cut_off().await;
        self.events.finish().await;
    }
}

/// The TCP listeners, all bound before anything starts serving.
struct Listeners {
    http: Option<TcpListener>,
    https: Option<(TcpListener, TlsAcceptor)>,
    /// The public HTTPS certificate, kept for reloads.
    public_cert: Option<Arc<PublicCert>>,
    admin: TcpListener,
    metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds every configured listener and loads the public certificate.
    async fn bind(config: &Config) -> Result<Listeners, StartError> {
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
        let metrics = match config.metrics_listen {
            Some(addr) => Some(bind("metrics.listen", addr).await?),
            None => None,
        };
        Ok(Listeners {
            http,
            https,
            public_cert,
            admin,
            metrics,
        })
    }

    fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(local)
    }

    fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| local(l))
    }

    /// How public URLs are written: on the HTTPS listener's port if there is one.
    fn urls(&self, domain: &str) -> UrlBase {
        match (self.https_addr(), self.http_addr()) {
            (Some(addr), _) => url_base("https", domain, addr.port(), 443),
            (None, Some(addr)) => url_base("http", domain, addr.port(), 80),
            (None, None) => url_base("http", domain, 80, 80),
        }
    }
}

fn local(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

/// The public listeners' handler: the request pipeline, timed and counted.
fn public_handler(proxy: &Arc<Proxy>, metrics: &Arc<Metrics>, scheme: Scheme) -> Handler {
    let (proxy, metrics) = (proxy.clone(), metrics.clone());
    Arc::new(move |req, conn| {
        let (proxy, metrics) = (proxy.clone(), metrics.clone());
        Box::pin(async move {
            let started = std::time::Instant::now();
            let response = proxy.handle(req, conn, scheme).await;
            metrics.answered(response.status(), started.elapsed());
            response
        })
    })
}

/// The admin listener's handler.
fn admin_handler(admin: Arc<Admin>) -> Handler {
    Arc::new(move |req, conn| {
        let admin = admin.clone();
        Box::pin(async move { admin.handle(req, conn.peer).await })
    })
}

/// The metrics listener's handler.
fn metrics_handler(metrics: &Arc<Metrics>, registry: &Arc<Registry>) -> Handler {
    let (metrics, registry) = (metrics.clone(), registry.clone());
    Arc::new(move |req, _conn| {
        let response = metrics.handle(req.uri().path(), &registry);
        Box::pin(async move { response })
    })
}

/// The store the configuration names: SQLite in `state_dir`, or the cluster's PostgreSQL,
/// whose secrets are then written into `state_dir` ([`cluster::share_secrets`]).
enum Db {
    Sqlite(Sqlite),
    /// With the cluster's mesh CA key.
    Postgres(Arc<Postgres>, String),
}

fn open_store(config: &Config) -> Result<Db, StartError> {
    let Some(url) = &config.cluster_store else {
        return Ok(Db::Sqlite(Sqlite::open(
            &config.state_dir.join(STORE_FILE),
        )?));
    };
    let pg = Arc::new(Postgres::connect(url)?);
    let mesh_key = cluster::share_secrets(&pg, config)?;
    Ok(Db::Postgres(pg, mesh_key))
}

/// [`load_registry`], with the platform's events set up on it: webhooks, the events stream,
/// and the activity reports.
fn platform_registry(
    config: &Config,
    db: Db,
    urls: UrlBase,
    metrics: &Metrics,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(Arc<Registry>, Option<Forwarding>), StartError> {
    let (registry, cluster) = load_registry(config, db, urls, metrics, tasks, shutdown)?;
    registry.set_events(platform::start(config, metrics, shutdown.clone())?);
    let every = config.platform.activity_interval;
    activity::spawn_reports(&registry, every, tasks, shutdown.clone());
    Ok((registry, cluster))
}

/// The devboxes from the store. An edge of a cluster also joins it: it follows the other
/// edges' changes, writes its own agents' presence and relays the requests other edges forward
/// to it (in `tasks`) until `shutdown`.
fn load_registry(
    config: &Config,
    db: Db,
    urls: UrlBase,
    metrics: &Metrics,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(Arc<Registry>, Option<Forwarding>), StartError> {
    let (pg, mesh_key) = match db {
        Db::Sqlite(store) => return Ok((Registry::load(Arc::new(store), urls)?, None)),
        Db::Postgres(pg, mesh_key) => (pg, mesh_key),
    };
    let (mesh, mesh_addr) = bind_mesh(config, &mesh_key)?;
    // Read before the devboxes: a change in between is applied twice, never missed.
    let since = pg.last_change()?;
    let registry = Registry::load(pg.clone(), urls)?;
    let view = Arc::new(ClusterView::new(&config.cluster_node));
    metrics.register(view.collectors());
    metrics.register(mesh.collectors());
    let sessions = Arc::downgrade(&registry);
    let live = move || {
        sessions
            .upgrade()
            .map(|r| r.live_sessions())
            .unwrap_or_default()
    };
    let stats = view.stats.clone();
    let node = &config.cluster_node;
    let addrs = store::EdgeAddrs {
        mesh: Some(mesh_addr.to_string()),
        agents: config.cluster_agents_addr.clone(),
    };
    registry.report_presence(pg.join(node, addrs, live, stats, shutdown.clone()));
    let taker = view.clone();
    let follower = store::through(Arc::downgrade(&registry), move |registry, change| {
        taker.apply(&change);
        registry.apply(change);
    });
    registry.follows_others();
    pg.follow(since, follower, shutdown.clone());
    mesh.serve(
        registry.clone(),
        tasks,
        shutdown.clone(),
        config.drain_grace,
    );
    Ok((registry, Some(Forwarding { mesh, view })))
}

/// Binds the mesh on `cluster.mesh_listen`; with the address other edges are to dial.
fn bind_mesh(config: &Config, ca_key: &str) -> Result<(Arc<Mesh>, SocketAddr), StartError> {
    let bind_err = |source| StartError::Bind {
        key: "cluster.mesh_listen",
        addr: config.mesh_listen,
        source,
    };
    let mesh = Mesh::bind(config.mesh_listen, mesh::tls::mesh_tls(ca_key)?).map_err(bind_err)?;
    let bound = mesh.local_addr().map_err(bind_err)?;
    let advertised = config.mesh_addr.unwrap_or(bound);
    if advertised.ip().is_unspecified() {
        return Err(StartError::Cluster(format!(
            "`cluster.mesh_listen` is {bound}: set `cluster.mesh_addr` to the address other \
             edges reach this one at"
        )));
    }
    Ok((Arc::new(mesh), advertised))
}

/// The agents' TLS identity: the configured certificate, or a leaf of the CA generated in
/// `state_dir` (whose path is returned, for agents to trust).
fn agents_identity(config: &Config) -> Result<(Identity, Option<PathBuf>), StartError> {
    Ok(match &config.agents_tls {
        Some(files) => (Identity::load(files)?, None),
        None => {
            let (identity, ca) =
                certs::generated_agent_identity(&config.state_dir, &config.agents_server_name)?;
            (identity, Some(ca))
        }
    })
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
    // quinn sends at most one stateless reset per 20 ms by default: after a restart, 1,000
    // agents whose heartbeats arrive within the same second get 50 resets, and the rest wait
    // for their idle timeout. A reset is smaller than the packet it answers and goes only to a
    // connection ID this edge signed, so a far higher rate amplifies nothing.
    endpoint_config.min_reset_interval(Duration::from_micros(50));
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
