//! A plain HTTP/1.1 client for tests: connects to an address and sends any Host, so tunnel
//! hosts need no DNS.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// The body, read whole.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request on a new connection and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> anyhow::Result<Reply> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let response = sender
        .send_request(req.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// What curl printed: the response code (from `-w %{http_code}`), the body, and stderr.
#[derive(Debug)]
pub struct Curl {
    /// HTTP status, 0 if none.
    pub code: u16,
    /// The body.
    pub body: String,
    /// curl's own messages.
    pub stderr: String,
}

/// Runs `curl -sS ARGS -w '\n%{http_code}'` and splits body and status.
pub async fn curl(args: &[&str]) -> Curl {
    let out = tokio::process::Command::new("curl")
        .arg("-sS")
        .args(args)
        .args(["-w", "\n%{http_code}"])
        .output()
        .await
        .expect("curl runs (install curl)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curl {
        code: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
