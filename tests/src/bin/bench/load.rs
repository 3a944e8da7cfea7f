//! Load generators that run inside the benchmark process: bulk transfers over raw TCP (so the
//! client costs as little as possible), and small-request generators (closed loop, fixed rate,
//! connection churn) over hyper. `--smoke` uses these instead of wrk, h2load and oha; every
//! mode uses them for bulk, head-of-line and cold start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::stats::Stats;

/// How late tokio's timer may wake up (its resolution is 1 ms).
const TIMER_SLACK: Duration = Duration::from_micros(1500);

/// Where a system takes requests: the address to connect to and the Host header to send.
#[derive(Debug, Clone)]
pub struct Target {
    /// The system's public address.
    pub addr: SocketAddr,
    /// The Host header (burrow routes on it: `{port}-{key}.tunnel.localhost`).
    pub host: String,
}

impl Target {
    /// `http://127.0.0.1:{port}{path}`, for load generators that take a URL (and `-H Host`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    send: SendRequest<Empty<Bytes>>,
    host: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("host", &self.host).finish()
    }
}

impl Conn {
    /// Connects and completes the HTTP/1.1 handshake (nothing is sent yet).
    pub async fn open(target: &Target) -> Result<Conn> {
        let tcp = TcpStream::connect(target.addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Conn {
            send,
            host: target.host.clone(),
        })
    }

    /// `GET {path}`, reading the whole body; the status.
    pub async fn get(&mut self, path: &str, close: bool) -> Result<u16> {
        self.send.ready().await?;
        let mut req = http::Request::get(path).header(http::header::HOST, &self.host);
        if close {
            req = req.header(http::header::CONNECTION, "close");
        }
        let resp = self.send.send_request(req.body(Empty::new())?).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// One request on a fresh connection; the status.
pub async fn get_once(target: &Target, path: &str) -> Result<u16> {
    Conn::open(target).await?.get(path, true).await
}

/// Requests `GET /` every `every` (each on a new connection, each with up to `patience`)
/// until one answers 200; the time from `since` to that answer.
pub async fn first_200(
    target: &Target,
    since: Instant,
    every: Duration,
    patience: Duration,
) -> Result<Duration> {
    let mut attempts = JoinSet::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if since.elapsed() > patience {
                    bail!("no 200 from {} within {patience:?}", target.addr);
                }
                let target = target.clone();
                attempts.spawn(async move {
                    tokio::time::timeout(patience, get_once(&target, "/")).await
                });
            }
            Some(done) = attempts.join_next() => {
                if let Ok(Ok(Ok(200))) = done {
                    return Ok(since.elapsed());
                }
            }
        }
    }
}

/// Downloads `GET /bytes/{bytes}` over one connection; the time from request to last byte.
pub async fn download(target: &Target, bytes: u64) -> Result<Duration> {
    download_counting(target, bytes, None).await
}

/// [`download`], adding each body read to `moved` as it arrives.
pub async fn download_counting(
    target: &Target,
    bytes: u64,
    moved: Option<&AtomicU64>,
) -> Result<Duration> {
    let mut tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let start = Instant::now();
    let head = format!(
        "GET /bytes/{bytes} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        target.host
    );
    tcp.write_all(head.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let (status, mut body) = read_head(&mut tcp, &mut buf).await?;
    if status != 200 {
        bail!("download answered {status}");
    }
    while body < bytes {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            bail!("download cut after {body} of {bytes} bytes");
        }
        body += n as u64;
        if let Some(moved) = moved {
            moved.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(start.elapsed())
}

/// Uploads `bytes` to `POST /upload` over one connection; the time from the request's first
/// byte to the answer.
pub async fn upload(target: &Target, bytes: u64) -> Result<Duration> {
    let mut tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let start = Instant::now();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n",
        target.host
    );
    tcp.write_all(head.as_bytes()).await?;
    let chunk = vec![0xa5u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        tcp.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    let mut buf = vec![0u8; 4096];
    let (status, _) = read_head(&mut tcp, &mut buf).await?;
    if status != 200 {
        bail!("upload answered {status}");
    }
    Ok(start.elapsed())
}

/// Reads a response head; its status and how many body bytes came with it.
async fn read_head(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(u16, u64)> {
    let mut filled = 0;
    loop {
        let n = tcp.read(&mut buf[filled..]).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        filled += n;
        if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("response head")?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("status line")?;
            return Ok((status, (filled - end - 4) as u64));
        }
        if filled == buf.len() {
            bail!("response head too large");
        }
    }
}

/// `conns` keep-alive connections, each sending `GET /` back to back for `duration`
/// (`close`: a new connection for every request instead).
pub async fn closed_loop(target: &Target, conns: usize, duration: Duration, close: bool) -> Stats {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let target = target.clone();
        tasks.spawn(async move {
            let mut stats = Stats::default();
            let mut conn = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                let result = async {
                    if conn.is_none() {
                        conn = Some(Conn::open(&target).await?);
                    }
                    let c = conn.as_mut().context("connection")?;
                    c.get("/", close).await
                }
                .await;
                if close {
                    conn = None;
                }
                match result {
                    Ok(200) => stats.record(t.elapsed()),
                    _ => {
                        stats.errors += 1;
                        conn = None;
                    }
                }
            }
            stats
        });
    }
    let mut total = Stats::default();
    while let Some(Ok(s)) = tasks.join_next().await {
        total.merge(s);
    }
    total.seconds = start.elapsed().as_secs_f64();
    total
}

/// `GET /` at a fixed `rate` a second for `duration` over `conns` keep-alive connections.
/// Latency counts from when a request was due, not when it was sent, so a stall is not hidden
/// (no coordinated omission).
pub async fn fixed_rate(target: &Target, rate: u32, conns: usize, duration: Duration) -> Stats {
    let total = (f64::from(rate) * duration.as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let target = target.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut stats = Stats::default();
            let mut conn: Option<Conn> = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return stats;
                }
                let due = start + interval.mul_f64(i as f64);
                tokio::time::sleep_until(due).await;
                // tokio's timer wakes up to a millisecond late: lateness within that is the
                // generator's, not the system's, so it is not counted; a request held back
                // longer (every connection busy) counts from when it was due.
                let sent = Instant::now();
                let due = if sent - due < TIMER_SLACK { sent } else { due };
                let result = async {
                    if conn.is_none() {
                        conn = Some(Conn::open(&target).await?);
                    }
                    conn.as_mut().context("connection")?.get("/", false).await
                }
                .await;
                match result {
                    Ok(200) => stats.record(due.elapsed()),
                    _ => {
                        stats.errors += 1;
                        conn = None;
                    }
                }
            }
        });
    }
    let mut all = Stats::default();
    while let Some(Ok(s)) = tasks.join_next().await {
        all.merge(s);
    }
    all.seconds = start.elapsed().as_secs_f64();
    all
}
