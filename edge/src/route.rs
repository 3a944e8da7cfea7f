//! The first step of a public request: which tunnel it is for. The host the request names
//! (`{port}-{key}.{domain}`, with an optional `:port` suffix and an optional trailing dot,
//! case-insensitive) is parsed, checked against the TLS server name, and looked up in the
//! registry once; what was found travels on to the later steps as a [`Routed`].

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_protocol::Port;
use http::header;
use http::{Method, Request, StatusCode};

use crate::pages::{self, Answer, Form};
use crate::registry::{Registry, Route};

/// How the client reached the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
}

impl Scheme {
    /// `http` or `https`, as URLs and `X-Forwarded-Proto` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What the route step found, carried through the later steps.
#[derive(Debug)]
pub struct Routed {
    /// The public host, as the request named it.
    pub host: String,
    /// The devbox port and the tunnel key the host names.
    pub target: Target,
    /// The tunnel's settings and its agent's connection, from the one registry lookup.
    pub route: Route,
    /// The client's address.
    pub client: SocketAddr,
    /// How the client reached the edge.
    pub scheme: Scheme,
    /// How the edge's own answers are written for this client: HTML, text, or gRPC.
    pub form: Form,
}

/// The route step: the tunnel domain, and the registry its tunnels are looked up in.
#[derive(Debug)]
pub struct Router {
    registry: Arc<Registry>,
    domain: String,
}

impl Router {
    /// Routes hosts under `domain` (lowercase, no trailing dot) to the tunnels in `registry`.
    pub fn new(registry: Arc<Registry>, domain: String) -> Router {
        Router { registry, domain }
    }

    /// Finds the tunnel a request from `client` is for, or answers it here: CONNECT (405), no
    /// usable host (400), a host that is not a tunnel host (400), over HTTPS a host that is
    /// not the connection's server name `sni` (421), no enabled tunnel at the key (404).
    pub fn route<B>(
        &self,
        req: &Request<B>,
        client: SocketAddr,
        sni: Option<&str>,
        scheme: Scheme,
    ) -> Result<Routed, Answer> {
        let form = Form::of(req.headers());
        let refuse = |status: StatusCode, detail: &str| pages::error(status, detail, form);
        if req.method() == Method::CONNECT {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: the edge forwards HTTP requests to the devbox",
            ));
        }
        let host = request_host(req).map_err(|detail| refuse(StatusCode::BAD_REQUEST, detail))?;
        let target = parse(&host, &self.domain)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, &e.to_string()))?;
        if scheme == Scheme::Https && !same_name(&host, sni) {
            // A connection made for one name and reused for another (HTTP/2 coalescing, or a
            // forged Host): 421 tells a browser to retry on a connection of its own.
            return Err(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "the request's host is not the name this TLS connection was made for (SNI)",
            ));
        }
        // An unknown key and a disabled tunnel get the same answer, so keys cannot be probed.
        let route = self
            .registry
            .route(&target.key)
            .ok_or_else(|| not_found(form))?;
        Ok(Routed {
            host,
            target,
            route,
            client,
            scheme,
            form,
        })
    }
}

/// The explanation for an unknown key or a disabled tunnel: the same for both.
pub const NOT_FOUND: &str = "no tunnel is enabled at this address; check the URL";

/// The answer for an unknown key or a disabled tunnel.
pub fn not_found(form: Form) -> Answer {
    pages::error(StatusCode::NOT_FOUND, NOT_FOUND, form)
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

/// Where a public request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The devbox port.
    pub port: Port,
    /// The tunnel key (lowercase).
    pub key: String,
}

/// Why a host is not a tunnel host; the message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// No Host header or authority.
    #[error("the request names no host")]
    Missing,
    /// The host is not under the tunnel domain.
    #[error("`{0}` is not a tunnel host: expected {{port}}-{{key}}.{1}")]
    NotOurs(String, String),
    /// The first label is not `{port}-{key}`.
    #[error(
        "`{0}` is not a tunnel host: the first label must be {{port}}-{{key}}, e.g. 3000-k3v9x2q7ma"
    )]
    BadLabel(String),
    /// The port is out of range.
    #[error("`{0}` is not a port: expected 1-65535")]
    BadPort(String),
}

/// Longest tunnel key accepted (a DNS label is at most 63 characters).
const MAX_KEY: usize = 57;

/// Parses a Host header value (or URI authority) against the tunnel domain (lowercase, no
/// trailing dot).
pub fn parse(host: &str, domain: &str) -> Result<Target, HostError> {
    let shown = || host.chars().take(100).collect::<String>();
    let name = strip_port(host).ok_or_else(|| HostError::BadLabel(shown()))?;
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let label = name
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
        .ok_or_else(|| HostError::NotOurs(shown(), domain.to_owned()))?;
    let (port, key) = label
        .split_once('-')
        .ok_or_else(|| HostError::BadLabel(shown()))?;
    let key_ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if !key_ok || !port_ok {
        return Err(HostError::BadLabel(shown()));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|_| !port.starts_with('0'))
        .and_then(Port::new)
        .ok_or_else(|| HostError::BadPort(port.to_owned()))?;
    Ok(Target {
        port,
        key: key.to_owned(),
    })
}

/// Whether a Host value names the same host as a TLS server name (SNI): case and a trailing
/// dot aside, with the Host's `:port` ignored. No server name never matches.
pub fn same_name(host: &str, sni: Option<&str>) -> bool {
    let Some(sni) = sni else { return false };
    let Some(name) = strip_port(host) else {
        return false;
    };
    let trim = |s: &str| s.strip_suffix('.').unwrap_or(s).to_owned();
    trim(name).eq_ignore_ascii_case(&trim(sni))
}

/// Removes a `:port` suffix; `None` if the suffix is not a port.
fn strip_port(host: &str) -> Option<&str> {
    match host.rsplit_once(':') {
        None => Some(host),
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            Some(name)
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "tunnel.example.com";

    fn ok(host: &str) -> (u16, String) {
        let t = parse(host, D).unwrap_or_else(|e| panic!("{host}: {e}"));
        (t.port.get(), t.key)
    }

    #[test]
    fn accepts_tunnel_hosts() {
        assert_eq!(
            ok("3000-k3v9x2q7ma.tunnel.example.com"),
            (3000, "k3v9x2q7ma".into())
        );
        assert_eq!(
            ok("3000-K3V9X2Q7MA.Tunnel.Example.COM."),
            (3000, "k3v9x2q7ma".into())
        );
        assert_eq!(ok("1-a.tunnel.example.com:8080"), (1, "a".into()));
        assert_eq!(ok("65535-a.tunnel.example.com"), (65535, "a".into()));
    }

    #[test]
    fn host_and_server_name_agree() {
        let sni = Some("3000-k.tunnel.example.com");
        assert!(same_name("3000-k.tunnel.example.com", sni));
        assert!(same_name("3000-K.Tunnel.Example.com.:443", sni));
        assert!(!same_name("3001-k.tunnel.example.com", sni));
        assert!(!same_name("3000-k.tunnel.example.com", None));
    }

    #[test]
    fn the_host_comes_from_one_place() {
        let req = |uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().uri(uri);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).expect("request")
        };
        let h = "3000-k.tunnel.example.com";
        assert_eq!(request_host(&req("/", &[h])).as_deref(), Ok(h));
        let absolute = format!("http://{h}/x");
        assert_eq!(request_host(&req(&absolute, &[])).as_deref(), Ok(h));
        let upper = h.to_ascii_uppercase();
        assert_eq!(request_host(&req(&absolute, &[&upper])).as_deref(), Ok(h));
        for bad in [
            req("/", &[]),
            req("/", &[h, h]),
            req(&absolute, &["3001-k.tunnel.example.com"]),
        ] {
            assert!(request_host(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for host in [
            "",
            "tunnel.example.com",
            "example.com",
            "3000-k.other.com",
            "3000-k.eviltunnel.example.com",
            "a.3000-k.tunnel.example.com",
            "3000k.tunnel.example.com",
            "-k.tunnel.example.com",
            "3000-.tunnel.example.com",
            "0-k.tunnel.example.com",
            "65536-k.tunnel.example.com",
            "03000-k.tunnel.example.com",
            "+300-k.tunnel.example.com",
            "3000-k_x.tunnel.example.com",
            "3000-k-x.tunnel.example.com",
            "3000-k.tunnel.example.com:abc",
            "[::1]:80",
            "127.0.0.1",
        ] {
            assert!(parse(host, D).is_err(), "{host:?} was accepted");
        }
        assert!(matches!(
            parse("0-k.tunnel.example.com", D),
            Err(HostError::BadPort(_))
        ));
    }
}
