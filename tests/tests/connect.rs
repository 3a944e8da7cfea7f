//! `burrow connect`, the client end of a raw TCP tunnel, end to end: a 64 MiB SSH-like stream
//! through `--listen` and a smaller one through `--stdio` (how ssh's ProxyCommand uses it),
//! both half-closed by the client; real PostgreSQL queried with psql through `--listen`; and an
//! authenticated tunnel, refused with 401 without its token and carried with it.
//!
//! `burrow` runs as the real binary, pointed at the edge's plain-HTTP listener with
//! `--connect-to`; the edge and the agent run in process. Every wait has a bound; the figures
//! the bulk tests measure are printed (`-- --nocapture`).

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use burrow_tests::postgres::{Postgres, psql};
use burrow_tests::testkit::{AsyncChildGuard, Lines};
use burrow_tests::{DOMAIN, TestAgent, TestEdge, WAIT, binary};
use ring::digest::{Context, SHA256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{ChildStdout, Command};
use tokio::time::{Instant, timeout};

const MIB: u64 = 1024 * 1024;

/// The bound on one bulk transfer: 64 MiB each way through debug builds on a loaded 2-core
/// machine.
const TRANSFER: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_carries_64_mib_both_ways_with_half_close() {
    let edge = TestEdge::start().await;
    let (key, _agent) = open_tunnel(&edge).await;
    let service = digest_echo().await;
    let mut listening = Listening::start(connect(&edge, service.port(), &key)).await;

    let tcp = TcpStream::connect(listening.addr)
        .await
        .expect("connect to burrow's listener");
    let (read, write) = tcp.into_split();
    let started = Instant::now();
    exchange(write, read, 64 * MIB, &listening.burrow.stderr)
        .await
        .assert_complete();
    println!(
        "64 MiB each way through `burrow connect --listen` in {:?}",
        started.elapsed()
    );

    let rest = listening.stop().await;
    assert_eq!(
        rest, "",
        "burrow prints nothing after its `listening on` line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_carries_a_stream_and_exits_0_when_the_service_ends() {
    let edge = TestEdge::start().await;
    let (key, _agent) = open_tunnel(&edge).await;
    let service = digest_echo().await;
    let mut burrow = Burrow::stdio(connect(&edge, service.port(), &key));
    let stdin = burrow.child.stdin.take().expect("piped stdin");
    let stdout = burrow.child.stdout.take().expect("piped stdout");

    let started = Instant::now();
    exchange(stdin, stdout, 4 * MIB, &burrow.stderr)
        .await
        .assert_complete();
    println!(
        "4 MiB each way through `burrow connect --stdio` in {:?}",
        started.elapsed()
    );

    let status = burrow.exit().await;
    let stderr = burrow.stderr.ended_async(WAIT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "burrow exits 0 when the service ends the connection; stderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_through_listen_reaches_a_real_postgres() {
    let pg = Postgres::start().await;
    let edge = TestEdge::start().await;
    let (key, _agent) = open_tunnel(&edge).await;
    let mut listening = Listening::start(connect(&edge, pg.port, &key)).await;
    let port = listening.addr.port();

    assert_eq!(psql(port, "select 40 + 2").await, "42");

    // 1.6 MB from the server in one row, the same as psql gets directly.
    let big = "select string_agg(md5(i::text), '') from generate_series(1, 50000) i";
    let direct = psql(pg.port, big).await;
    assert_eq!(direct.len(), 50_000 * 32, "the query's own result");
    let through = psql(port, big).await;
    assert_eq!(
        through.len(),
        direct.len(),
        "the result's length through burrow"
    );
    assert!(through == direct, "the result through burrow differs");

    // 1 MB towards the server: a query text that large.
    let literal: String = (0..1_000_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let long = format!("select length(q), md5(q) from (select '{literal}'::text as q) s");
    let through = psql(port, &long).await;
    assert!(through.starts_with("1000000|"), "{through}");
    assert_eq!(through, psql(pg.port, &long).await);

    // A session of several statements, each a round trip on one connection.
    let session = "create temporary table t (i int, v text);\n\
                   insert into t select i, md5(i::text) from generate_series(1, 1000) i;\n\
                   select count(*), sum(length(v)) from t;";
    assert_eq!(psql(port, session).await, "1000|32000");

    assert!(
        listening.burrow.running(),
        "the listener serves every psql; stderr:\n{}",
        listening.burrow.stderr.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_to_an_authenticated_tunnel_needs_its_token() {
    let edge = TestEdge::start().await;
    let (key, token, _agent) = auth_tunnel(&edge).await;
    let service = digest_echo().await;
    let port = service.port();

    let none = refused_stdio(connect(&edge, port, &key)).await;
    assert!(none.contains("401"), "no token: {none}");

    let mut wrong = connect(&edge, port, &key);
    wrong.env("BURROW_TOKEN", "not-the-token");
    let wrong = refused_stdio(wrong).await;
    assert!(wrong.contains("401"), "wrong token: {wrong}");
    assert!(
        !wrong.contains("not-the-token"),
        "the token is not echoed: {wrong}"
    );

    let mut right = connect(&edge, port, &key);
    right.env("BURROW_TOKEN", &token);
    let mut burrow = Burrow::stdio(right);
    let stdin = burrow.child.stdin.take().expect("piped stdin");
    let stdout = burrow.child.stdout.take().expect("piped stdout");
    exchange(stdin, stdout, 64 * 1024, &burrow.stderr)
        .await
        .assert_complete();
    let status = burrow.exit().await;
    let stderr = burrow.stderr.ended_async(WAIT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "with BURROW_TOKEN; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(&token),
        "the token is not logged: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_uses_the_token_file_and_closes_refused_connections() {
    let edge = TestEdge::start().await;
    let (key, token, _agent) = auth_tunnel(&edge).await;
    let service = digest_echo().await;
    let port = service.port();

    // The token from a file, its trailing newline ignored.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).expect("write the token file");
    let mut with_file = connect(&edge, port, &key);
    with_file.arg("--token-file").arg(&file);
    let listening = Listening::start(with_file).await;
    let tcp = TcpStream::connect(listening.addr).await.expect("connect");
    let (read, write) = tcp.into_split();
    exchange(write, read, 256 * 1024, &listening.burrow.stderr)
        .await
        .assert_complete();

    // Without a token each local connection is closed, a stderr line says why, and the
    // listener keeps listening.
    let mut refusing = Listening::start(connect(&edge, port, &key)).await;
    for attempt in 1..=2 {
        let mut tcp = TcpStream::connect(refusing.addr).await.expect("connect");
        let _ = tcp.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        let mut buf = [0u8; 1024];
        let read = timeout(WAIT, tcp.read(&mut buf)).await.unwrap_or_else(|_| {
            panic!(
                "connection {attempt} was not closed within {WAIT:?}; stderr:\n{}",
                refusing.burrow.stderr.text()
            )
        });
        // EOF, or a reset if burrow closed it with our bytes unread.
        if let Ok(n) = read {
            assert_eq!(n, 0, "connection {attempt} got bytes: {:?}", &buf[..n]);
        }
        refusing
            .burrow
            .stderr
            .wait_count_async("401", attempt, WAIT)
            .await;
        assert!(
            refusing.burrow.running(),
            "a refused connection does not stop the listener; stderr:\n{}",
            refusing.burrow.stderr.text()
        );
    }
}

// ---- The `burrow` process ----

/// `burrow connect` to `port` in the tunnel `key`, through the edge's plain-HTTP listener.
/// Nothing from the test's own `BURROW_*` environment reaches it; add `BURROW_TOKEN` or
/// `--token-file` to the returned command.
fn connect(edge: &TestEdge, port: u16, key: &str) -> Command {
    let http = edge.http().port();
    let mut cmd = Command::new(binary("burrow"));
    cmd.arg("connect")
        .arg(format!("http://{port}-{key}.{DOMAIN}:{http}"))
        .arg("--connect-to")
        .arg(format!("127.0.0.1:{http}"));
    for (name, _) in std::env::vars() {
        if name.starts_with("BURROW_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// A running `burrow` (killed on drop), its stderr collected line by line.
struct Burrow {
    child: AsyncChildGuard,
    stderr: Lines,
}

impl Burrow {
    /// Spawns `cmd` with `--stdio`, stdin and stdout piped for the test to use.
    fn stdio(mut cmd: Command) -> Burrow {
        cmd.arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        Burrow::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Burrow {
        let mut child = AsyncChildGuard::spawn(cmd.stderr(Stdio::piped()));
        let stderr = Lines::new();
        stderr.read_async(child.stderr.take().expect("piped stderr"));
        Burrow { child, stderr }
    }

    /// Waits up to [`WAIT`] for it to exit.
    async fn exit(&mut self) -> ExitStatus {
        match timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.expect("wait for burrow"),
            Err(_) => panic!(
                "burrow did not exit within {WAIT:?}; stderr:\n{}",
                self.stderr.text()
            ),
        }
    }

    /// Whether it is still running.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// `burrow connect ... --listen 127.0.0.1:0`, once it has said where it listens.
struct Listening {
    burrow: Burrow,
    /// The address from its `listening on ADDR` line.
    addr: SocketAddr,
    stdout: BufReader<ChildStdout>,
}

impl Listening {
    async fn start(mut cmd: Command) -> Listening {
        cmd.args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut burrow = Burrow::spawn(cmd);
        let mut stdout = BufReader::new(burrow.child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let read = timeout(WAIT, stdout.read_line(&mut line)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            let status = burrow.child.try_wait();
            panic!(
                "no `listening on` line within {WAIT:?} ({read:?}, exit {status:?}); stderr:\n{}",
                burrow.stderr.text()
            );
        }
        let addr = line
            .strip_suffix('\n')
            .and_then(|l| l.strip_prefix("listening on "))
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("not a `listening on ADDR` line: {line:?}"));
        assert_eq!(addr.ip().to_string(), "127.0.0.1", "{line}");
        assert_ne!(
            addr.port(),
            0,
            "the bound port, not the requested :0: {line}"
        );
        Listening {
            burrow,
            addr,
            stdout,
        }
    }

    /// Kills it; what it printed to stdout after its first line.
    async fn stop(&mut self) -> String {
        let _ = self.burrow.child.kill().await;
        let mut rest = String::new();
        timeout(WAIT, self.stdout.read_to_string(&mut rest))
            .await
            .expect("stdout ends once burrow is killed")
            .expect("read burrow's stdout");
        rest
    }
}

/// Runs `--stdio` that the edge must refuse: stdin stays open after an SSH client banner (ssh
/// waits for the server), so only the refusal can end it. Asserts exit code 1 and nothing on
/// stdout; returns stderr.
async fn refused_stdio(cmd: Command) -> String {
    let mut burrow = Burrow::stdio(cmd);
    let mut stdin = burrow.child.stdin.take().expect("piped stdin");
    let mut stdout = burrow.child.stdout.take().expect("piped stdout");
    let _ = stdin.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    let status = burrow.exit().await;
    let stderr = burrow.stderr.ended_async(WAIT).await;
    let mut out = Vec::new();
    let _ = timeout(WAIT, stdout.read_to_end(&mut out)).await;
    assert_eq!(status.code(), Some(1), "refused: exit 1; stderr:\n{stderr}");
    assert!(
        out.is_empty(),
        "nothing on stdout: {:?}",
        String::from_utf8_lossy(&out)
    );
    drop(stdin);
    stderr
}

// ---- The devbox side ----

/// An open tunnel and its connected agent.
/// An authenticated tunnel: its key, its token, its agent.
async fn auth_tunnel(edge: &TestEdge) -> (String, String, TestAgent) {
    let devbox = edge.devbox(Some("authenticated")).await;
    let token = devbox
        .auth_token
        .clone()
        .expect("auth token returned at creation");
    let key = devbox.key.clone().expect("key");
    let agent = TestAgent::start(edge, &devbox).await;
    (key, token, agent)
}

/// A WebSocket handshake asking the edge for raw TCP (`burrow-tcp.v1`) to `host`, with the
/// extra `headers`, as a client other than `burrow connect` would send it.
async fn raw_handshake(
    edge: &TestEdge,
    host: &str,
    headers: &[(&'static str, &str)],
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{host}/")
        .into_client_request()
        .expect("a request");
    let all = [("sec-websocket-protocol", "burrow-tcp.v1")];
    for (name, value) in all.iter().chain(headers) {
        let value = value.parse().expect("a header value");
        request.headers_mut().insert(*name, value);
    }
    let tcp = TcpStream::connect(edge.http()).await.expect("connect");
    tokio_tungstenite::client_async(request, tcp).await
}

/// An open tunnel with raw TCP enabled (`raw_tcp`, off by default for open tunnels).
async fn open_tunnel(edge: &TestEdge) -> (String, TestAgent) {
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("an open tunnel has a key");
    let body = serde_json::json!({ "auth_mode": "open", "raw_tcp": true });
    let path = format!("/v1/devboxes/{}/tunnel", devbox.id);
    let (status, json) = edge.admin("POST", &path, Some(body)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["raw_tcp"], true, "{json}");
    let agent = TestAgent::start(edge, &devbox).await;
    (key, agent)
}

/// A stand-in for sshd or any byte-stream service on loopback: it echoes what it reads as it
/// reads it and, once the client has half-closed, writes `received {n} bytes, sha256 {hex}\n`
/// (the write side still works after the read side's EOF) and closes.
async fn digest_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve_digest_echo(tcp));
        }
    });
    addr
}

async fn serve_digest_echo(tcp: TcpStream) -> std::io::Result<()> {
    let (mut read, mut write) = tcp.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    let mut hasher = Context::new(&SHA256);
    let mut received = 0u64;
    loop {
        let n = read.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        received += n as u64;
        write.write_all(&buf[..n]).await?;
    }
    write
        .write_all(digest_line(received, &hex(hasher.finish().as_ref())).as_bytes())
        .await?;
    write.shutdown().await
}

fn digest_line(len: u64, sha256: &str) -> String {
    format!("received {len} bytes, sha256 {sha256}\n")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- The client side of a digest-echo exchange ----

/// The size of the blocks written and of the generator's steps on both sides.
const BLOCK: usize = 64 * 1024;

/// Pseudo-random bytes (xorshift64*), generated a [`BLOCK`] at a time: the sender writes them,
/// the receiver generates them again to check the echo without keeping 64 MiB around.
struct Noise(u64);

impl Noise {
    fn new() -> Noise {
        Noise(0x9e37_79b9_7f4a_7c15)
    }

    fn block(&mut self, block: &mut [u8]) {
        debug_assert_eq!(
            block.len(),
            BLOCK,
            "both sides step a whole block at a time"
        );
        for word in block.chunks_exact_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            word.copy_from_slice(&self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

/// Bytes moved so far, for the message of a transfer that times out.
#[derive(Debug, Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
}

/// What one exchange with [`digest_echo`] showed.
#[derive(Debug)]
struct Exchange {
    len: u64,
    /// The sender's SHA-256 of what it wrote, hex.
    sent: Result<String, String>,
    received: Received,
}

/// What the client read.
#[derive(Debug)]
struct Received {
    /// How many bytes of the echo arrived.
    echoed: u64,
    /// The offset of the first echoed byte that differs from what was sent.
    first_difference: Option<u64>,
    /// What arrived after the echo: the service's digest line.
    trailer: Vec<u8>,
    /// How the stream ended: EOF, or the error.
    end: Result<(), String>,
}

impl Exchange {
    fn assert_complete(&self) {
        let (len, got) = (self.len, &self.received);
        let sent = self.sent.as_ref().expect("writing to burrow");
        got.end.as_ref().expect("reading from burrow until EOF");
        assert_eq!(
            got.first_difference, None,
            "the echo differs from what was sent"
        );
        assert_eq!(got.echoed, len, "bytes echoed");
        assert_eq!(
            String::from_utf8_lossy(&got.trailer),
            digest_line(len, sent),
            "the service's digest after the client's half-close"
        );
    }
}

/// Writes `len` bytes of [`Noise`] to `write` while reading the echo from `read`, then
/// half-closes and reads to EOF; bounded by [`TRANSFER`].
async fn exchange<W, R>(write: W, read: R, len: u64, stderr: &Lines) -> Exchange
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let progress = Progress::default();
    let both = async { tokio::join!(send(write, len, &progress), receive(read, len, &progress)) };
    let Ok((sent, received)) = timeout(TRANSFER, both).await else {
        panic!(
            "{len} bytes not echoed within {TRANSFER:?}: {} sent, {} received; burrow's \
             stderr:\n{}",
            progress.sent.load(Ordering::Relaxed),
            progress.received.load(Ordering::Relaxed),
            stderr.text()
        );
    };
    Exchange {
        len,
        sent,
        received,
    }
}

async fn send<W: AsyncWrite + Unpin>(
    mut write: W,
    len: u64,
    progress: &Progress,
) -> Result<String, String> {
    let mut noise = Noise::new();
    let mut block = vec![0u8; BLOCK];
    let mut hasher = Context::new(&SHA256);
    let mut sent = 0u64;
    while sent < len {
        noise.block(&mut block);
        let n = BLOCK.min((len - sent) as usize);
        write
            .write_all(&block[..n])
            .await
            .map_err(|e| format!("write at byte {sent}: {e}"))?;
        hasher.update(&block[..n]);
        sent += n as u64;
        progress.sent.store(sent, Ordering::Relaxed);
    }
    // The half-close: the service reads EOF, and can still answer.
    write
        .shutdown()
        .await
        .map_err(|e| format!("half-close: {e}"))?;
    drop(write);
    Ok(hex(hasher.finish().as_ref()))
}

/// Reads to EOF: the echo of the first `len` bytes, compared as it comes with the same
/// [`Noise`], then the trailer.
async fn receive<R: AsyncRead + Unpin>(mut read: R, len: u64, progress: &Progress) -> Received {
    let mut noise = Noise::new();
    let mut expected = vec![0u8; BLOCK];
    let mut used = BLOCK;
    let mut buf = vec![0u8; BLOCK];
    let mut got = Received {
        echoed: 0,
        first_difference: None,
        trailer: Vec::new(),
        end: Ok(()),
    };
    let mut total = 0u64;
    got.end = loop {
        let n = match read.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(format!("read after {total} bytes: {e}")),
        };
        total += n as u64;
        progress.received.store(total, Ordering::Relaxed);
        let mut data = &buf[..n];
        while !data.is_empty() && got.echoed < len {
            if used == BLOCK {
                noise.block(&mut expected);
                used = 0;
            }
            let k = data
                .len()
                .min(BLOCK - used)
                .min((len - got.echoed) as usize);
            let want = &expected[used..used + k];
            if got.first_difference.is_none() && data[..k] != want[..] {
                let at = data.iter().zip(want).position(|(a, b)| a != b);
                got.first_difference = Some(got.echoed + at.unwrap_or(0) as u64);
            }
            used += k;
            got.echoed += k as u64;
            data = &data[k..];
        }
        got.trailer.extend_from_slice(data);
        if got.trailer.len() > 4096 {
            break Err(format!("{} bytes past the echo", got.trailer.len()));
        }
    };
    got
}

/// A client that speaks the raw-TCP subprotocol badly is cut off with a close frame that says
/// why (1011), and the edge goes on serving: a text message, and a message larger than the
/// edge takes (128 KiB; `burrow connect` sends at most 64 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_the_subprotocol_is_cut_off() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let edge = TestEdge::start().await;
    let (key, _agent) = open_tunnel(&edge).await;
    let service = digest_echo().await;
    let host = format!("{}-{key}.{DOMAIN}:{}", service.port(), edge.http().port());
    let open = || async {
        let (ws, response) = raw_handshake(&edge, &host, &[])
            .await
            .expect("the edge accepts the upgrade");
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "burrow-tcp.v1",
            "the edge agreed on the subprotocol"
        );
        ws
    };
    for (case, message) in [
        ("a text message", Message::text("hello")),
        ("a 200 KiB message", Message::binary(vec![7u8; 200 * 1024])),
    ] {
        let mut ws = open().await;
        // Some bytes first, so the stream to the service is known to be up.
        ws.send(Message::binary(&b"ping"[..])).await.expect("send");
        let echoed = timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{case}: no echo within {WAIT:?}"));
        assert!(
            matches!(echoed, Some(Ok(Message::Binary(ref b))) if &b[..] == b"ping"),
            "{case}: {echoed:?}"
        );
        let _ = ws.send(message).await;
        let close = timeout(WAIT, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("{case}: the WebSocket failed before a close: {e}"),
                    None => panic!("{case}: the connection ended without a close frame"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{case}: not cut off within {WAIT:?}"))
        .unwrap_or_else(|| panic!("{case}: a close frame without a code"));
        assert_eq!(close.code, CloseCode::Error, "{case}: {close:?}");
        assert!(!close.reason.is_empty(), "{case}: the close says why");
    }
    // The edge still carries a well-behaved client.
    let mut ws = open().await;
    ws.send(Message::binary(&b"still here"[..]))
        .await
        .expect("send");
    let echoed = timeout(WAIT, ws.next()).await.expect("an echo");
    assert!(
        matches!(echoed, Some(Ok(Message::Binary(ref b))) if &b[..] == b"still here"),
        "{echoed:?}"
    );
}

/// Raw TCP is off for an open tunnel until the platform enables it (`raw_tcp`): `burrow
/// connect` is refused with 403 naming the setting, and the service is never dialed. A
/// handshake with an `Origin` (what a web page's WebSocket sends) is refused even with the
/// tunnel's token, so a page on another tunnel cannot read a devbox's raw ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_needs_the_tunnel_setting_and_no_web_page() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("a key");
    let _agent = TestAgent::start(&edge, &devbox).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stderr = refused_stdio(connect(&edge, port, &key)).await;
    assert!(
        stderr.contains("403") && stderr.contains("raw_tcp"),
        "the refusal names the setting:\n{stderr}"
    );
    let dialed = timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(dialed.is_err(), "the service was dialed");

    let (auth_key, token, _auth_agent) = auth_tunnel(&edge).await;
    let host = format!("{port}-{auth_key}.{DOMAIN}:{}", edge.http().port());
    let bearer = format!("Bearer {token}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("origin", "http://3000-other.tunnel.localhost"),
    ];
    match raw_handshake(&edge, &host, &headers).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert!(body.contains("Origin"), "{body}");
        }
        other => panic!("a handshake with Origin was not refused: {other:?}"),
    }
    let dialed = timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(dialed.is_err(), "the service was dialed");
}
