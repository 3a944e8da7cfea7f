//! The webhook's HTTP client: HTTP/1.1 POSTs to one URL, over TCP or TLS (verified against the
//! system's roots), on a connection kept for the next POST while the receiver keeps it open.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use super::webhook::SIGNATURE_HEADER;

/// A kept connection idle longer than this is not reused: receivers close idle connections
/// (often after 5 s or more), and a POST on one just closed would fail for nothing.
const REUSE_WITHIN: Duration = Duration::from_secs(4);

/// The most of an answer's body read (and thrown away) to keep its connection for the next.
const MAX_ANSWER: usize = 64 * 1024;

/// `platform.webhook_url`, checked: http:// or https://, a host, no user name or password.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    uri: Uri,
    /// The host to dial and verify, without IPv6 brackets.
    host: String,
    port: u16,
    tls: bool,
}

impl FromStr for WebhookUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<WebhookUrl, String> {
        let example = "e.g. https://platform.internal/burrow-events";
        let uri: Uri = url
            .trim()
            .parse()
            .map_err(|e| format!("`{url}` is not a URL ({e}); {example}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "`{url}` must start with http:// or https://; {example}"
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` names no host; {example}"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{url}` holds a user name or password; webhooks are authenticated by their \
                 signature (platform.webhook_secret_file) instead"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{url}` names no host; {example}"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(WebhookUrl {
            host: host.to_owned(),
            port,
            tls,
            uri,
        })
    }
}

impl fmt::Display for WebhookUrl {
    /// The URL without its query, which may carry a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        let authority = self.uri.authority().map_or("", |a| a.as_str());
        write!(f, "{scheme}://{authority}{}", self.uri.path())?;
        if self.uri.query().is_some() {
            f.write_str("?***")?;
        }
        Ok(())
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a POST got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostError {
    /// The TCP connection failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    /// TLS could not be set up or failed.
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    /// The request could not be built from the URL (its path or host).
    #[error("a request to {0}: {1}")]
    Request(String, http::Error),
    /// HTTP failed on the connection.
    #[error("HTTP to {0}: {1}")]
    Http(String, hyper::Error),
}

/// Bytes both ways: TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// POSTs to the webhook URL.
pub struct Client {
    url: WebhookUrl,
    /// For https://: the connector, or why there is none (no system roots).
    tls: Option<Result<TlsConnector, String>>,
    /// The last connection, while it may still serve, and when it last answered.
    kept: Option<(SendRequest<Full<Bytes>>, Instant)>,
    /// Where connections run.
    tasks: TaskTracker,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `url`, trusting the system's roots for https://; its connections run
    /// among `tasks`. Without roots every POST fails (logged now, and at each try).
    pub fn new(url: WebhookUrl, tasks: TaskTracker) -> Client {
        let roots = url.tls.then(|| {
            burrow_runtime::trust::roots(None).map_err(|e| {
                error!(
                    url = %url, error = %e,
                    "https webhooks cannot be verified: install the system's CA certificates \
                     (ca-certificates) or use an http:// `platform.webhook_url`"
                );
                e.to_string()
            })
        });
        Client::with_roots(url, roots, tasks)
    }

    /// A client that trusts `roots` for https:// (`None` for http://).
    fn with_roots(
        url: WebhookUrl,
        roots: Option<Result<rustls::RootCertStore, String>>,
        tasks: TaskTracker,
    ) -> Client {
        let tls = roots.map(|roots| roots.and_then(connector));
        Client {
            url,
            tls,
            kept: None,
            tasks,
        }
    }

    /// POSTs `body` (JSON) with its signature; the answer's status. A kept connection the
    /// receiver closed meanwhile is replaced by a fresh one, once.
    pub async fn post(&mut self, body: Bytes, signature: &str) -> Result<StatusCode, PostError> {
        let kept = self
            .kept
            .take()
            .filter(|(sender, at)| !sender.is_closed() && at.elapsed() < REUSE_WITHIN);
        if let Some((sender, _)) = kept {
            match self.send(sender, body.clone(), signature).await {
                Err(PostError::Http(_, e)) if e.is_canceled() || e.is_incomplete_message() => {
                    debug!(error = %e, "a kept webhook connection was closed; dialing again");
                }
                done => return done,
            }
        }
        let sender = self.connect().await?;
        self.send(sender, body, signature).await
    }

    /// Sends one POST on `sender`, reads the answer, and keeps the connection if it may
    /// serve again.
    async fn send(
        &mut self,
        mut sender: SendRequest<Full<Bytes>>,
        body: Bytes,
        signature: &str,
    ) -> Result<StatusCode, PostError> {
        let http = |e| PostError::Http(self.url.to_string(), e);
        sender.ready().await.map_err(http)?;
        let path = self.url.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = self.url.uri.authority().map_or("", |a| a.as_str());
        let request = Request::post(path)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("burrow-edge/", env!("CARGO_PKG_VERSION")),
            )
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(body))
            .map_err(|e| PostError::Request(self.url.to_string(), e))?;
        let answer = sender.send_request(request).await.map_err(http)?;
        let status = answer.status();
        let read = Limited::new(answer.into_body(), MAX_ANSWER).collect().await;
        if read.is_ok() && !sender.is_closed() {
            self.kept = Some((sender, Instant::now()));
        }
        Ok(status)
    }

    /// A new connection to the URL's host: TCP, TLS for https://, the HTTP/1.1 handshake.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, PostError> {
        let target = format!("{}:{}", self.url.host, self.url.port);
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| PostError::Connect(target.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(Err(why)) => return Err(PostError::Tls(target, why.clone())),
            Some(Ok(connector)) => {
                let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
                    .map_err(|e| PostError::Tls(target.clone(), e.to_string()))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| PostError::Tls(target.clone(), e.to_string()))?;
                Box::new(tls)
            }
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| PostError::Http(self.url.to_string(), e))?;
        // Ends when the receiver closes the connection or the sender is dropped.
        self.tasks.spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "webhook connection ended");
            }
        });
        Ok(sender)
    }
}

/// A TLS connector trusting `roots`, HTTP/1.1 by ALPN.
fn connector(roots: rustls::RootCertStore) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    #[test]
    fn urls_are_checked_and_shown_without_their_query() {
        let url: WebhookUrl = "https://platform.internal/burrow-events?token=s3cret"
            .parse()
            .expect("valid");
        assert_eq!(
            (url.host.as_str(), url.port, url.tls),
            ("platform.internal", 443, true)
        );
        assert_eq!(
            url.to_string(),
            "https://platform.internal/burrow-events?***"
        );
        let v6: WebhookUrl = "http://[::1]:8080/hook".parse().expect("IPv6");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8080));
        for bad in [
            "ftp://x/y",
            "platform.internal/hook",
            "https://user:pw@x/y",
            "http:///x",
        ] {
            assert!(bad.parse::<WebhookUrl>().is_err(), "{bad}");
        }
    }

    /// An HTTPS receiver with a certificate for `localhost` from a CA of the test's; its CA.
    async fn https_receiver() -> (std::net::SocketAddr, rustls::RootCertStore) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf whose issuer equals its subject looks self-signed.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "webhook test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let signed = req.headers().contains_key(SIGNATURE_HEADER);
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let ok = signed && body.is_ok_and(|b| b.as_ref() == b"{}");
                        let status = if ok {
                            StatusCode::NO_CONTENT
                        } else {
                            StatusCode::BAD_REQUEST
                        };
                        let mut answer = hyper::Response::new(Full::new(Bytes::new()));
                        *answer.status_mut() = status;
                        Ok::<_, Infallible>(answer)
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service),
                );
            }
        });
        (addr, roots)
    }

    #[tokio::test]
    async fn posts_over_https_verified_against_the_given_roots_and_reuses_the_connection() {
        let (addr, roots) = https_receiver().await;
        let url: WebhookUrl = format!("https://localhost:{}/hook", addr.port())
            .parse()
            .expect("url");
        let tasks = TaskTracker::new();
        let mut client = Client::with_roots(url.clone(), Some(Ok(roots)), tasks.clone());
        let status = client
            .post(Bytes::from_static(b"{}"), "t=1,v1=00")
            .await
            .expect("POST");
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(client.kept.is_some(), "the connection is kept");
        let again = client
            .post(Bytes::from_static(b"{}"), "t=1,v1=00")
            .await
            .expect("again");
        assert_eq!(again, StatusCode::NO_CONTENT);
        // Not trusted: the system's roots (or none) do not know the test's CA.
        let empty = rustls::RootCertStore::empty();
        let mut stranger = Client::with_roots(url.clone(), Some(Ok(empty)), tasks.clone());
        let err = stranger
            .post(Bytes::from_static(b"{}"), "t")
            .await
            .expect_err("untrusted");
        assert!(matches!(err, PostError::Tls(..)), "{err}");
        // No roots at all: every POST fails, naming why, and nothing panics.
        let mut rootless = Client::with_roots(url, Some(Err("no roots".into())), tasks.clone());
        let err = rootless
            .post(Bytes::from_static(b"{}"), "t")
            .await
            .expect_err("rootless");
        assert!(err.to_string().contains("no roots"), "{err}");
        drop((client, stranger, rootless));
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("connections end with their clients");
    }
}
