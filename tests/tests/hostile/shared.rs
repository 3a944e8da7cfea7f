//! One edge, its agents and services, shared by every case that needs no special limits.
//!
//! Each `#[tokio::test]` runs on a runtime of its own that ends with the test, so what must
//! outlive a test (the shared edge, the agents, the services behind them) runs on one more
//! runtime, [`runtime`], for the life of the binary. Cases start what they alone use there too
//! ([`on_shared`]), and speak to it as clients from their own runtime.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;

use burrow_tests::services::{self, HttpService};
use burrow_tests::{DOMAIN, Devbox, TestAgent, TestEdge, request};
use tokio::sync::OnceCell;

use crate::raw::{Answer, Raw, RawBackend};

/// Limits of the shared edge: small heads, and a quick admin throttle.
const LIMITS: &str = "[limits]\nmax_head_bytes = 8192\nmax_headers = 20\nadmin_failures = 3";

/// The runtime the shared edge lives on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("shared-edge")
            .enable_all()
            .build()
            .expect("shared runtime")
    })
}

/// Runs `task` on the shared runtime and waits for it; a panic in it is the caller's.
pub async fn on_shared<T: Send + 'static>(task: impl Future<Output = T> + Send + 'static) -> T {
    match runtime().spawn(task).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("shared task: {e}"),
    }
}

/// A devbox with a tunnel and its connected agent.
#[derive(Debug)]
pub struct Tunnel {
    /// The devbox.
    pub devbox: Devbox,
    /// Its tunnel key.
    pub key: String,
    /// Its agent.
    pub agent: TestAgent,
}

impl Tunnel {
    /// Registers a devbox with a tunnel of `mode` and starts its agent with `flags`, on the
    /// current runtime.
    pub async fn start(edge: &TestEdge, mode: &str, flags: &[(&'static str, &str)]) -> Tunnel {
        let devbox = edge.devbox(Some(mode)).await;
        let key = devbox.key.clone().expect("a tunnel key");
        let agent = TestAgent::start_with(edge, &devbox, flags).await;
        Tunnel { devbox, key, agent }
    }

    /// The public host of `port` in this tunnel.
    pub fn host(&self, port: u16) -> String {
        host(port, &self.key)
    }

    /// The bearer token of an authenticated tunnel.
    pub fn token(&self) -> &str {
        self.devbox
            .auth_token
            .as_deref()
            .expect("an authenticated tunnel")
    }
}

/// `{port}-{key}.tunnel.localhost`.
pub fn host(port: u16, key: &str) -> String {
    format!("{port}-{key}.{DOMAIN}")
}

/// The shared edge (plain HTTP and HTTPS) with its tunnels and an echo service.
#[derive(Debug)]
pub struct Shared {
    /// The edge.
    pub edge: TestEdge,
    /// An open tunnel, for the "still serving" checks and most cases.
    pub open: Tunnel,
    /// A second open tunnel.
    pub other: Tunnel,
    /// An authenticated tunnel.
    pub auth: Tunnel,
    /// A second authenticated tunnel.
    pub auth2: Tunnel,
    /// The echo behind the "still serving" checks.
    pub echo: HttpService,
}

/// The shared edge, started by whichever case comes first.
pub async fn shared() -> &'static Shared {
    static SHARED: OnceCell<Shared> = OnceCell::const_new();
    SHARED.get_or_init(|| on_shared(Shared::start())).await
}

impl Shared {
    async fn start() -> Shared {
        let edge = TestEdge::builder().https().toml(LIMITS).start().await;
        let open = Tunnel::start(&edge, "open", &[]).await;
        let other = Tunnel::start(&edge, "open", &[]).await;
        let auth = Tunnel::start(&edge, "authenticated", &[]).await;
        let auth2 = Tunnel::start(&edge, "authenticated", &[]).await;
        let echo = services::http_service("127.0.0.1:0").await;
        Shared {
            edge,
            open,
            other,
            auth,
            auth2,
            echo,
        }
    }

    /// The public HTTP address.
    pub fn http(&self) -> SocketAddr {
        self.edge.http()
    }

    /// A fresh HTTP echo (its `seen` belongs to the case alone).
    pub async fn echo_service(&self) -> HttpService {
        on_shared(services::http_service("127.0.0.1:0")).await
    }

    /// A fresh raw backend that answers every whole request with `200 ok`, so a request that
    /// wrongly reaches it fails its case at once instead of hanging.
    pub async fn raw_backend(&self) -> RawBackend {
        let backend = self.holding_backend().await;
        backend.release();
        backend
    }

    /// A fresh raw backend that holds every request.
    pub async fn holding_backend(&self) -> RawBackend {
        on_shared(RawBackend::start()).await
    }

    /// A new tunnel of `mode` on the shared edge, its agent started with `flags`.
    pub async fn tunnel(
        &'static self,
        mode: &'static str,
        flags: Vec<(&'static str, String)>,
    ) -> Tunnel {
        on_shared(async move {
            let flags: Vec<(&'static str, &str)> =
                flags.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Tunnel::start(&self.edge, mode, &flags).await
        })
        .await
    }

    /// Sends `bytes` on a new plain connection; returns the answer and the connection.
    pub async fn raw(&self, bytes: impl AsRef<[u8]>) -> (Answer, Raw<tokio::net::TcpStream>) {
        let mut conn = Raw::connect(self.http()).await;
        let answer = conn.exchange(bytes).await;
        (answer, conn)
    }

    /// A GET of `path` with header `lines` through `tunnel` to a fresh echo: the answer, and
    /// the headers of each request that reached the echo.
    pub async fn get_through(
        &self,
        tunnel: &Tunnel,
        path: &str,
        lines: &str,
    ) -> (Answer, Vec<Vec<(String, String)>>) {
        let echo = self.echo_service().await;
        let host = tunnel.host(echo.addr.port());
        let (answer, _) = self
            .raw(format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}Connection: close\r\n\r\n"
            ))
            .await;
        let reached = echo.seen.lock().expect("lock").requests.clone();
        (answer, reached)
    }

    /// Rotates the token of `tunnel` through the admin API (`rotate-token`); the new token.
    pub async fn rotate_token(&self, tunnel: &Tunnel, case: &str) -> String {
        let (status, json) = self
            .edge
            .admin(
                "POST",
                &format!("/v1/devboxes/{}/tunnel/rotate-token", tunnel.devbox.id),
                None,
            )
            .await;
        assert_eq!(status, 200, "{case}: rotate: {json}");
        let new = json["auth_token"].as_str().expect("a new token").to_owned();
        assert_ne!(new, tunnel.token(), "{case}: the same token after rotation");
        new
    }

    /// Asserts that the edge and the shared tunnel still serve a plain request (after `case`).
    pub async fn assert_serving(&self, case: &str) {
        assert_serves(&self.edge, &self.open, &self.echo, case).await;
    }
}

/// Asserts that `tunnel` on `edge` answers a plain GET to `echo` with 200.
pub async fn assert_serves(edge: &TestEdge, tunnel: &Tunnel, echo: &HttpService, case: &str) {
    let reply = request(
        edge.http(),
        "GET",
        &tunnel.host(echo.addr.port()),
        "/still-serving",
        &[],
        vec![],
    )
    .await
    .unwrap_or_else(|e| panic!("{case}: the edge no longer answers: {e}"));
    assert_eq!(
        reply.status,
        200,
        "{case}: a normal request afterwards: {}",
        reply.text()
    );
}
