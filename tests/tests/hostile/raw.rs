//! Raw HTTP/1.1 on a socket, both ways: a client that writes exact bytes and reads back a status
//! line, headers and body, or the fact that the connection closed; and a backend that records the
//! bytes that reach it and answers only when the test lets it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_tests::WAIT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// What came back for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A status line and headers (and the body, as far as it came).
    Response(Response),
    /// The connection closed, or was reset, before a whole response head arrived.
    Closed,
}

impl Answer {
    /// The status code; 0 for a closed connection.
    pub fn status(&self) -> u16 {
        match self {
            Answer::Response(r) => r.status,
            Answer::Closed => 0,
        }
    }

    /// The response; panics on a closed connection.
    pub fn response(&self) -> &Response {
        match self {
            Answer::Response(r) => r,
            Answer::Closed => panic!("expected a response, the connection closed"),
        }
    }
}

/// A response as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client connection that speaks bytes.
#[derive(Debug)]
pub struct Raw<S> {
    io: S,
    buf: Vec<u8>,
}

impl Raw<TcpStream> {
    /// Connects from the default address.
    pub async fn connect(addr: SocketAddr) -> Self {
        Raw::new(TcpStream::connect(addr).await.expect("connect"))
    }

    /// Connects from `local` (any of 127/8 is loopback on Linux).
    pub async fn connect_from(local: IpAddr, addr: SocketAddr) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(local, 0)).expect("bind");
        Raw::new(socket.connect(addr).await.expect("connect"))
    }
}

/// A TLS client connection to `addr` that trusts `ca` and sends `sni` as its server name.
pub async fn connect_tls(
    addr: SocketAddr,
    ca: &Path,
    sni: &str,
) -> Raw<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the public CA") {
        roots.add(cert.expect("a PEM certificate")).expect("a CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(sni.to_owned()).expect("a server name");
    let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
    Raw::new(tls)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    /// Wraps a connected stream.
    pub fn new(io: S) -> Self {
        Raw {
            io,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`. A peer that closed makes this fail, which hostile cases expect: the
    /// error is returned, not raised.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
        self.io.write_all(bytes.as_ref()).await?;
        self.io.flush().await
    }

    /// Writes `bytes`, then reads one answer.
    pub async fn exchange(&mut self, bytes: impl AsRef<[u8]>) -> Answer {
        // A write error (the edge closed early) still leaves its answer, if any, to read.
        let _ = self.send(bytes).await;
        self.answer().await
    }

    /// Reads one response, or notices the close; fails the test after [`WAIT`].
    pub async fn answer(&mut self) -> Answer {
        tokio::time::timeout(WAIT, self.read_answer())
            .await
            .unwrap_or_else(|_| panic!("neither an answer nor a close within {WAIT:?}"))
    }

    /// Waits up to `bound` for the peer to close the connection; returns any bytes it sent
    /// first. Panics if the connection is still open after `bound`.
    pub async fn closed_within(&mut self, bound: Duration) -> Vec<u8> {
        let closed = tokio::time::timeout(bound, async {
            while matches!(self.fill().await, Ok(1..)) {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "the connection is still open after {bound:?}"
        );
        std::mem::take(&mut self.buf)
    }

    /// Reads more bytes into the buffer; 0 at the end.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.io.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads until the buffer holds `n` bytes; false if the connection ended first.
    async fn fill_to(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if !matches!(self.fill().await, Ok(1..)) {
                return false;
            }
        }
        true
    }

    async fn read_answer(&mut self) -> Answer {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !matches!(self.fill().await, Ok(1..)) {
                return Answer::Closed;
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_end).collect();
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if status < 200 || status == 204 || status == 304 {
            return Answer::Response(response);
        }
        if let Some(len) = response
            .header("content-length")
            .and_then(|l| l.parse().ok())
        {
            self.fill_to(len).await;
            let len = len.min(self.buf.len());
            response.body = self.buf.drain(..len).collect();
        } else if response
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            response.body = self.read_chunked().await;
        } else {
            while matches!(self.fill().await, Ok(1..)) {}
            response.body = std::mem::take(&mut self.buf);
        }
        Answer::Response(response)
    }

    /// A chunked body, as far as it comes.
    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if !matches!(self.fill().await, Ok(1..)) {
                    return body;
                }
            };
            let line: Vec<u8> = self.buf.drain(..line_end + 2).collect();
            let size = String::from_utf8_lossy(&line[..line_end]);
            let size = size.split(';').next().unwrap_or_default().trim();
            let Ok(size) = usize::from_str_radix(size, 16) else {
                return body;
            };
            if size == 0 {
                // Trailers (none expected) and the final CRLF.
                let _ = self.fill_to(2).await;
                self.buf.drain(..2.min(self.buf.len()));
                return body;
            }
            if !self.fill_to(size + 2).await {
                body.append(&mut self.buf);
                return body;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }
}

/// The first position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A stand-in for a devbox service that speaks no HTTP of its own: it counts the connections
/// that reach it and records their bytes. It holds every request until [`RawBackend::release`],
/// then answers each whole request head with a `200` and closes; it drops a connection whose
/// peer closes.
#[derive(Debug)]
pub struct RawBackend {
    /// The port it listens on (`127.0.0.1`).
    pub port: u16,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    accepted: watch::Receiver<usize>,
    ended: watch::Receiver<usize>,
    release: watch::Sender<bool>,
}

impl RawBackend {
    /// Starts it on the current runtime.
    pub async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (accepted_tx, accepted) = watch::channel(0);
        let (ended_tx, ended) = watch::channel(0);
        let (release, released) = watch::channel(false);
        let ended_tx = Arc::new(ended_tx);
        let record = received.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let index = {
                    let mut all = record.lock().expect("lock");
                    all.push(Vec::new());
                    all.len() - 1
                };
                accepted_tx.send_modify(|n| *n += 1);
                let record = record.clone();
                let released = released.clone();
                let ended = ended_tx.clone();
                tokio::spawn(async move {
                    hold(tcp, index, record, released).await;
                    ended.send_modify(|n| *n += 1);
                });
            }
        });
        RawBackend {
            port,
            received,
            accepted,
            ended,
            release,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    /// The bytes each connection brought, in order of arrival.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits (up to [`WAIT`]) until `n` connections were accepted.
    pub async fn wait_accepted(&self, n: usize) {
        let mut accepted = self.accepted.clone();
        tokio::time::timeout(WAIT, accepted.wait_for(|a| *a >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} connections at the backend within {WAIT:?}"))
            .expect("backend running");
    }

    /// Waits (up to [`WAIT`]) until `n` connections have ended.
    pub async fn wait_ended(&self, n: usize) {
        let mut ended = self.ended.clone();
        tokio::time::timeout(WAIT, ended.wait_for(|e| *e >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} backend connections ended within {WAIT:?}"))
            .expect("backend running");
    }

    /// From now on, whole requests (held ones included) get a `200`.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    /// Asserts that no connection ever reached it.
    pub fn assert_untouched(&self, case: &str) {
        assert_eq!(
            self.accepted(),
            0,
            "{case}: the backend was reached: {:?}",
            self.received()
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>()
        );
    }
}

/// One backend connection: record bytes until the peer closes, or answer once released and the
/// request head is whole.
async fn hold(
    mut tcp: TcpStream,
    index: usize,
    record: Arc<Mutex<Vec<Vec<u8>>>>,
    mut released: watch::Receiver<bool>,
) {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut watching = true;
    loop {
        let head_done = find(&seen, b"\r\n\r\n").is_some();
        if head_done && *released.borrow() {
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
            let _ = tcp.shutdown().await;
            return;
        }
        tokio::select! {
            read = tcp.read(&mut chunk) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    seen.extend_from_slice(&chunk[..n]);
                    record.lock().expect("lock")[index].extend_from_slice(&chunk[..n]);
                }
            },
            changed = released.changed(), if watching && head_done => {
                if changed.is_err() {
                    watching = false;
                }
            }
        }
    }
}
