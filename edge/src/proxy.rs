//! A public request, as a pipeline: one function (`Proxy::pipeline`) lists its steps, each a
//! module of its own, entered once, handing on what it found. A step either lets the request go on or answers
//! it itself (with a page from [`pages`], a redirect, a refusal).
//!
//! 1. [`route`]: the host names a tunnel; the one registry lookup, carried on as [`Routed`].
//! 2. [`auth`]: the tunnel's access mode lets the request through.
//! 3. [`throttle`]: the tunnel's rate and the devbox's requests in flight ([`limits`]).
//! 4. One of: [`forward`] (an HTTP exchange with the service), [`upgrade`] (a WebSocket passed
//!    through), [`raw`] (raw TCP for `burrow connect`). Each opens its data stream to the
//!    agent with [`dial`].
//!
//! [`pages`]: crate::pages
//! [`route`]: crate::route
//! [`auth`]: crate::auth
//! [`throttle`]: crate::throttle
//! [`limits`]: crate::limits
//! [`forward`]: crate::forward
//! [`upgrade`]: crate::upgrade
//! [`raw`]: crate::raw
//! [`dial`]: crate::dial

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::auth::{Access, CookieKey};
use crate::body::Body;
use crate::cluster::Forwarding;
use crate::config::Config;
use crate::dial::{Dialer, Wake};
use crate::forward::Forward;
use crate::http2::Http2Conns;
use crate::listener::ConnInfo;
use crate::metrics::Metrics;
use crate::pages::Answer;
use crate::platform::Event;
use crate::pool::Pool;
use crate::raw::{self, Raw};
use crate::registry::Registry;
use crate::route::{Routed, Router, Scheme};
use crate::tasks::Tasks;
use crate::throttle::Throttle;
use crate::upgrade::{self, Upgrade};

/// Serves public requests: the steps of the pipeline, each with what it needs.
#[derive(Debug)]
pub struct Proxy {
    router: Router,
    access: Access,
    throttle: Throttle,
    forward: Arc<Forward>,
    upgrade: Upgrade,
    raw: Raw,
}

/// Which last step a request takes.
enum Kind {
    /// A plain HTTP request.
    Http,
    /// A WebSocket handshake for the service.
    WebSocket,
    /// A WebSocket handshake for raw TCP (`burrow connect`).
    Raw,
}

impl Proxy {
    /// A proxy for the tunnels under `config.domain`; requests wait up to `config.agent_wait`
    /// for an absent agent, at most `config.max_waiting` of them per devbox; `config.limits`
    /// bound rates and streams; kept-alive connections to services wait in `pool`; browsers'
    /// cookies for authenticated tunnels are signed with `cookie_key`; upgraded connections
    /// run among `tasks`.
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: &Config,
        pool: Arc<Pool>,
        cookie_key: CookieKey,
        tasks: Tasks,
        forwarding: Option<Forwarding>,
    ) -> Proxy {
        let idle = config.limits.upgrade_idle;
        let events = registry.events().clone();
        let wake = Wake {
            wait: config.platform.wake_wait,
            ask: Arc::new(move |devbox: &str| events.emit(Event::wake(devbox))),
        };
        let dial = Dialer::new(
            registry.clone(),
            metrics.clone(),
            config.agent_wait,
            config.max_waiting,
            forwarding,
        );
        let dial = Arc::new(dial.with_wake(wake));
        let http2 = Http2Conns::new(config.pool_idle);
        let forward = Arc::new(Forward::new(
            dial.clone(),
            pool.clone(),
            http2,
            metrics.clone(),
        ));
        Proxy {
            router: Router::new(registry, config.domain.clone()),
            access: Access::new(cookie_key, metrics.clone()),
            throttle: Throttle::new(&config.limits, pool, metrics.clone()),
            upgrade: Upgrade::new(forward.clone(), metrics.clone(), idle, tasks.clone()),
            raw: Raw::new(dial, metrics, idle, tasks),
            forward,
        }
    }

    /// Answers one public request that came in on `conn` over `scheme`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        scheme: Scheme,
    ) -> Response<Body> {
        match self.pipeline(req, &conn, scheme).await {
            Ok(response) => response,
            Err(answer) => *answer,
        }
    }

    /// The steps, in order. `Err` is an answer a step gave instead of letting the request on.
    async fn pipeline(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        scheme: Scheme,
    ) -> Result<Response<Body>, Answer> {
        let routed = self
            .router
            .route(&req, conn.peer, conn.sni.as_deref(), scheme)?;
        self.access.check(&mut req, &routed)?;
        let slot = self.throttle.admit(&routed)?;
        match kind(&req, &routed)? {
            Kind::Http => self.forward.exchange(req, &routed, slot).await,
            Kind::WebSocket => self.upgrade.pass(req, &routed, slot).await,
            Kind::Raw => self.raw.carry(req, &routed, slot).await,
        }
    }
}

/// Which last step a request takes: a checked WebSocket handshake is for raw TCP when it asks
/// for `burrow connect`'s subprotocol, for the service otherwise; anything else is plain HTTP.
fn kind<B>(req: &Request<B>, routed: &Routed) -> Result<Kind, Answer> {
    if !upgrade::requested(req, routed.form)? {
        Ok(Kind::Http)
    } else if raw::requested(req.headers()) {
        Ok(Kind::Raw)
    } else {
        Ok(Kind::WebSocket)
    }
}
