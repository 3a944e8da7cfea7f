//! gRPC through the tunnel, with two real gRPC stacks and no protobuf: messages are raw bytes.
//!
//! - [`serve`]: the echo service `burrow.test.Echo` (tonic) over h2c on a listener of the
//!   kit's, and [`Observed`], what it saw: request metadata, server-stream progress, `Wait`
//!   calls that started and ended.
//! - [`EchoClient`]: tonic's client for each method, over h2c or TLS, with a bearer token if
//!   asked. It dials loopback for a `*.localhost` host (the system resolver here does not) and
//!   keeps the URL's host as `:authority`, which the edge routes on.
//! - [`python_server`] and [`python_call`]: the same service, and a scripted client, with
//!   Python's grpcio (`tests/python/grpc_echo.py`, from the test virtualenv).
//!
//! The methods, each on `/burrow.test.Echo/{name}`:
//! - `Unary`: answers the request's bytes; copies `x-echo-*` metadata into its response
//!   headers; with `x-fail-with: {code}` it fails with that code, message `asked to fail`, and
//!   `x-trailer-echo` set to the request's `x-trailer`.
//! - `ServerStream`: the request is a count N (8 bytes, big-endian) and a size S (4 bytes); it
//!   answers N messages of S bytes, every byte of message `i` being `i % 251`
//!   ([`stream_message`]); `x-fail-with` ends the stream with that status after them.
//! - `ClientStream`: answers the total length of the messages and the SHA-256 of their
//!   concatenation ([`summary`]).
//! - `Bidi`: echoes each message as it arrives.
//! - `Wait`: never answers; it ends when the client cancels or the deadline passes.
//!
//! tonic reports an expired deadline as `CANCELLED` with the message `Timeout expired`, on the
//! client (its own timer) and on the server (the answer it sends); grpcio reports
//! `DEADLINE_EXCEEDED`. A failure before any message is a trailers-only answer: the status and
//! its metadata come in the response headers, not in trailers after a body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use burrow_testkit::WAIT;
use bytes::{Buf, BufMut, Bytes};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use ring::digest::{Context as Sha, SHA256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tower::service_fn;

mod client;
mod python;

pub use client::EchoClient;
pub use python::{PythonServer, python, python_call, python_server, script};

/// The echo service's name.
pub const SERVICE: &str = "burrow.test.Echo";

/// The largest message either side sends or accepts, both stacks (tonic accepts 4 MiB by
/// default, grpcio 4 MiB too): room for the 8 MiB messages of the big-message tests.
pub const MAX_MESSAGE: usize = 16 << 20;

/// A method of the echo service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Answers the request.
    Unary,
    /// Answers N messages of S bytes.
    ServerStream,
    /// Answers the total length and SHA-256 of the messages.
    ClientStream,
    /// Echoes each message.
    Bidi,
    /// Never answers.
    Wait,
}

impl Method {
    const ALL: [Method; 5] = [
        Method::Unary,
        Method::ServerStream,
        Method::ClientStream,
        Method::Bidi,
        Method::Wait,
    ];

    /// Its request path, `/burrow.test.Echo/{name}`.
    pub fn path(self) -> &'static str {
        match self {
            Method::Unary => "/burrow.test.Echo/Unary",
            Method::ServerStream => "/burrow.test.Echo/ServerStream",
            Method::ClientStream => "/burrow.test.Echo/ClientStream",
            Method::Bidi => "/burrow.test.Echo/Bidi",
            Method::Wait => "/burrow.test.Echo/Wait",
        }
    }

    fn from_path(path: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.path() == path)
    }
}

/// A codec whose messages are the bytes themselves: no protobuf.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> BytesCodec {
        *self
    }

    fn decoder(&mut self) -> BytesCodec {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // The buffer holds exactly one message: tonic has taken the framing off.
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The request of one call, as the service saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The method called.
    pub method: Method,
    /// Its `:authority` (`host:port`), if it had one.
    pub authority: Option<String>,
    /// Its request headers (gRPC metadata and the protocol's own: `te`, `grpc-timeout`...).
    pub metadata: http::HeaderMap,
}

/// How a `Wait` call ended: tonic dropped its handler, because the client reset the stream,
/// the connection closed, or the deadline passed (`Wait` never answers by itself).
#[derive(Debug, Clone)]
pub struct Ended {
    /// How long after it started.
    pub after: Duration,
    /// The `grpc-timeout` metadata it came with, if any (`200m`: 200 ms).
    pub grpc_timeout: Option<String>,
}

/// What the echo service saw, shared with the test.
#[derive(Debug, Clone)]
pub struct Observed {
    state: Arc<watch::Sender<State>>,
}

#[derive(Debug, Default)]
struct State {
    requests: Vec<Seen>,
    sent: u64,
    waiting: usize,
    ended: Vec<Ended>,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            state: Arc::new(watch::channel(State::default()).0),
        }
    }
}

impl Observed {
    /// Every call's request so far, in the order they came.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.borrow().requests.clone()
    }

    /// The request of the latest call of `method`.
    pub fn last(&self, method: Method) -> Option<Seen> {
        let state = self.state.borrow();
        state
            .requests
            .iter()
            .rev()
            .find(|s| s.method == method)
            .cloned()
    }

    /// How many `ServerStream` messages tonic's encoder has taken so far, over all calls: a
    /// message counts when the encoder asks for it, not when it is made ahead.
    pub fn sent(&self) -> u64 {
        self.state.borrow().sent
    }

    /// Waits until [`Observed::sent`] reaches `count`; panics after [`WAIT`].
    pub async fn wait_sent(&self, count: u64) -> u64 {
        let what = format!("{count} server-stream messages sent");
        self.until(&what, |s| (s.sent >= count).then_some(s.sent))
            .await
    }

    /// Waits until a `Wait` call is in the service (so cancelling it now reaches the service);
    /// panics after [`WAIT`].
    pub async fn wait_waiting(&self) {
        self.until("a Wait call in the service", |s| {
            (s.waiting > 0).then_some(())
        })
        .await;
    }

    /// Waits until a `Wait` call has ended, and returns the first that did; panics after
    /// [`WAIT`].
    pub async fn wait_ended(&self) -> Ended {
        self.until("a Wait call ended", |s| s.ended.first().cloned())
            .await
    }

    /// The `Wait` calls that have ended so far.
    pub fn ended(&self) -> Vec<Ended> {
        self.state.borrow().ended.clone()
    }

    /// Waits until `check` finds something; panics naming `what` after [`WAIT`].
    async fn until<T>(&self, what: &str, check: impl Fn(&State) -> Option<T>) -> T {
        let mut changes = self.state.subscribe();
        let found = tokio::time::timeout(WAIT, changes.wait_for(|s| check(s).is_some())).await;
        match found {
            // The sender lives in `self`: the wait cannot fail for want of one.
            Ok(Ok(state)) => check(&state).expect("the state just matched"),
            _ => panic!("the echo service saw no {what} within {WAIT:?}"),
        }
    }

    fn saw(&self, method: Method, request: &http::Request<Body>) {
        let seen = Seen {
            method,
            authority: request.uri().authority().map(|a| a.to_string()),
            metadata: request.headers().clone(),
        };
        self.state.send_modify(|s| s.requests.push(seen));
    }
}

/// The echo service as a tower service of HTTP requests, the shape of tonic's generated code.
#[derive(Debug, Clone, Default)]
pub struct EchoService {
    observed: Observed,
}

impl NamedService for EchoService {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<Body>> for EchoService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(route(self.observed.clone(), request).map(Ok))
    }
}

/// Hands the request to its method's handler through tonic's server-side framing.
async fn route(o: Observed, request: http::Request<Body>) -> http::Response<Body> {
    let Some(method) = Method::from_path(request.uri().path()) else {
        let path = request.uri().path().to_owned();
        return Status::unimplemented(format!("no method {path}")).into_http();
    };
    o.saw(method, &request);
    let mut grpc = tonic::server::Grpc::new(BytesCodec)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    match method {
        Method::Unary => grpc.unary(service_fn(unary), request).await,
        Method::ServerStream => {
            let handler = service_fn(|r| server_stream(o.clone(), r));
            grpc.server_streaming(handler, request).await
        }
        Method::ClientStream => {
            let handler = service_fn(client_stream);
            grpc.client_streaming(handler, request).await
        }
        Method::Bidi => grpc.streaming(service_fn(bidi), request).await,
        Method::Wait => {
            grpc.unary(service_fn(|r| wait(o.clone(), r)), request)
                .await
        }
    }
}

async fn unary(request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    if let Some(status) = asked_to_fail(request.metadata()) {
        return Err(status);
    }
    let mut response = Response::new(request.get_ref().clone());
    for entry in request.metadata().iter() {
        match entry {
            KeyAndValueRef::Ascii(key, value) if key.as_str().starts_with("x-echo-") => {
                response.metadata_mut().append(key.clone(), value.clone());
            }
            KeyAndValueRef::Binary(key, value) if key.as_str().starts_with("x-echo-") => {
                response
                    .metadata_mut()
                    .append_bin(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    Ok(response)
}

/// The status `x-fail-with: {code}` asks for, carrying `x-trailer-echo` from `x-trailer`.
fn asked_to_fail(metadata: &MetadataMap) -> Option<Status> {
    let code: i32 = metadata.get("x-fail-with")?.to_str().ok()?.parse().ok()?;
    let mut trailers = MetadataMap::new();
    if let Some(value) = metadata.get("x-trailer") {
        trailers.insert("x-trailer-echo", value.clone());
    }
    Some(Status::with_metadata(
        Code::from(code),
        "asked to fail",
        trailers,
    ))
}

type Messages = BoxStream<'static, Result<Bytes, Status>>;

async fn server_stream(
    observed: Observed,
    request: Request<Bytes>,
) -> Result<Response<Messages>, Status> {
    let mut body = request.get_ref().clone();
    if body.len() != 12 {
        return Err(Status::invalid_argument(
            "want a count (u64) and a size (u32)",
        ));
    }
    let (count, size) = (body.get_u64(), body.get_u32() as usize);
    let failure = asked_to_fail(request.metadata()).map(Err);
    // Made when the encoder asks for the next one: `sent` is what tonic has taken.
    let messages = stream::iter(0..count).map(move |i| {
        observed.state.send_modify(|s| s.sent += 1);
        Ok(stream_message(i, size))
    });
    Ok(Response::new(messages.chain(stream::iter(failure)).boxed()))
}

/// Message `index` of a `ServerStream` answer: `size` bytes of `index % 251`.
pub fn stream_message(index: u64, size: usize) -> Bytes {
    // The remainder of a division by 251 fits in a byte.
    Bytes::from(vec![(index % 251) as u8; size])
}

async fn client_stream(request: Request<Streaming<Bytes>>) -> Result<Response<Bytes>, Status> {
    let mut messages = request.into_inner();
    let (mut total, mut sha) = (0u64, Sha::new(&SHA256));
    while let Some(message) = messages.message().await? {
        total += message.len() as u64;
        sha.update(&message);
    }
    Ok(Response::new(summary_of(total, sha)))
}

/// What `ClientStream` answers for `messages`: their total length (8 bytes, big-endian), then
/// the SHA-256 of their concatenation (32 bytes).
pub fn summary(messages: &[Bytes]) -> Bytes {
    let mut sha = Sha::new(&SHA256);
    messages.iter().for_each(|m| sha.update(m));
    summary_of(messages.iter().map(|m| m.len() as u64).sum(), sha)
}

fn summary_of(total: u64, sha: Sha) -> Bytes {
    let mut answer = Vec::with_capacity(40);
    answer.put_u64(total);
    answer.put_slice(sha.finish().as_ref());
    answer.into()
}

async fn bidi(request: Request<Streaming<Bytes>>) -> Result<Response<Streaming<Bytes>>, Status> {
    // The incoming messages are the answer, each sent on as it is decoded.
    Ok(Response::new(request.into_inner()))
}

async fn wait(observed: Observed, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    let grpc_timeout = request.metadata().get("grpc-timeout");
    let grpc_timeout = grpc_timeout
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _guard = WaitGuard::enter(observed, grpc_timeout);
    std::future::pending().await
}

/// Counts a `Wait` call in, and records its end when tonic drops the handler.
struct WaitGuard {
    observed: Observed,
    since: Instant,
    grpc_timeout: Option<String>,
}

impl WaitGuard {
    fn enter(observed: Observed, grpc_timeout: Option<String>) -> WaitGuard {
        observed.state.send_modify(|s| s.waiting += 1);
        let since = Instant::now();
        WaitGuard {
            observed,
            since,
            grpc_timeout,
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let ended = Ended {
            after: self.since.elapsed(),
            grpc_timeout: self.grpc_timeout.take(),
        };
        self.observed.state.send_modify(|s| {
            s.waiting -= 1;
            s.ended.push(ended);
        });
    }
}

/// A running echo service; dropping it stops accepting connections.
#[derive(Debug)]
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub observed: Observed,
    task: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the echo service over h2c (HTTP/2 without TLS) on `listener`.
pub fn serve(listener: TcpListener) -> EchoServer {
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let service = EchoService::default();
    let observed = service.observed.clone();
    let task = tokio::spawn(async move {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let served = Server::builder()
            .serve_with_incoming(service, incoming)
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the gRPC echo service stopped");
        }
    });
    EchoServer {
        addr,
        observed,
        task,
    }
}

#[cfg(test)]
mod tests {
    use http::uri::PathAndQuery;

    use super::*;
    use crate::testkit::ports::tokio_listener;

    async fn direct() -> (EchoServer, EchoClient) {
        let server = serve(tokio_listener().await);
        let url = format!("http://echo.localhost:{}", server.addr.port());
        let client = EchoClient::connect_h2c(&url).await.expect("connects");
        (server, client)
    }

    #[tokio::test]
    async fn unary_echoes_8_mib_and_x_echo_metadata() {
        let (server, client) = direct().await;
        let big = Bytes::from(
            (0..(8u32 << 20))
                .map(|i| (i % 253) as u8)
                .collect::<Vec<_>>(),
        );
        let metadata = [
            ("x-echo-a", "1"),
            ("x-other", "2"),
            ("x-echo-b-bin", "\x01\x02"),
        ];
        let reply = client
            .unary(big.clone(), &metadata, Some(Duration::from_secs(20)))
            .await
            .expect("unary answers");
        assert_eq!(reply.metadata().get("x-echo-a").expect("echoed"), "1");
        let binary = reply.metadata().get_bin("x-echo-b-bin").expect("echoed");
        assert_eq!(binary.to_bytes().expect("base64"), &b"\x01\x02"[..]);
        assert!(reply.metadata().get("x-other").is_none());
        assert!(reply.into_inner() == big, "the same 8 MiB came back");
        let seen = server.observed.last(Method::Unary).expect("the call seen");
        assert_eq!(seen.metadata["grpc-timeout"], "20000000u");
        assert!(seen.metadata.get("authorization").is_none());
        let authority = format!("echo.localhost:{}", server.addr.port());
        assert_eq!(
            seen.authority,
            Some(authority),
            "the URL's, not the address dialed"
        );
    }

    #[tokio::test]
    async fn a_bearer_token_goes_with_every_call() {
        let (server, client) = direct().await;
        let client = client.with_bearer("sesame");
        client.unary(Bytes::new(), &[], None).await.expect("ok");
        let seen = server.observed.last(Method::Unary).expect("the call seen");
        assert_eq!(seen.metadata["authorization"], "Bearer sesame");
    }

    #[tokio::test]
    async fn server_stream_sends_count_messages_of_size() {
        let (server, client) = direct().await;
        let reply = client.server_stream(10, 1024, &[]).await.expect("answers");
        let mut messages = reply.into_inner();
        let mut got = Vec::new();
        while let Some(message) = messages.message().await.expect("a message") {
            got.push(message);
        }
        let want: Vec<Bytes> = (0..10).map(|i| stream_message(i, 1024)).collect();
        assert_eq!(got, want);
        assert_eq!(server.observed.sent(), 10);
    }

    #[tokio::test]
    async fn client_stream_sums_and_hashes() {
        let (_server, client) = direct().await;
        let messages: Vec<Bytes> = ["a", "bc", "", "def"].map(Bytes::from).into();
        let reply = client
            .client_stream(stream::iter(messages.clone()))
            .await
            .expect("answers");
        let reply = reply.into_inner();
        assert_eq!(&reply[..8], &6u64.to_be_bytes());
        assert_eq!(reply, summary(&messages));
        let sha = ring::digest::digest(&SHA256, b"abcdef");
        assert_eq!(&reply[8..], sha.as_ref());
    }

    #[tokio::test]
    async fn bidi_echoes_each_message_as_it_arrives() {
        let (_server, client) = direct().await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let outgoing = stream::unfold(rx, |mut rx| async { rx.recv().await.map(|m| (m, rx)) });
        let mut replies = client.bidi(outgoing).await.expect("answers").into_inner();
        for word in ["one", "two", "three"] {
            tx.send(Bytes::from(word)).await.expect("the call is on");
            let echo = replies.message().await.expect("ok").expect("an echo");
            assert_eq!(echo, word, "echoed before the next is sent");
        }
        drop(tx);
        assert!(replies.message().await.expect("ends ok").is_none());
    }

    #[tokio::test]
    async fn x_fail_with_fails_with_the_code_and_the_trailer() {
        let (_server, client) = direct().await;
        let metadata = [("x-fail-with", "5"), ("x-trailer", "why")];
        let status = client
            .unary(Bytes::from_static(b"x"), &metadata, None)
            .await
            .expect_err("asked to fail");
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "asked to fail");
        assert_eq!(status.metadata().get("x-trailer-echo").expect("set"), "why");
    }

    #[tokio::test]
    async fn server_stream_x_fail_with_ends_the_stream_with_the_status() {
        let (_server, client) = direct().await;
        let metadata = [("x-fail-with", "9"), ("x-trailer", "late")];
        let reply = client
            .server_stream(2, 3, &metadata)
            .await
            .expect("answers");
        let mut messages = reply.into_inner();
        for _ in 0..2 {
            assert!(messages.message().await.expect("a message").is_some());
        }
        let status = messages.message().await.expect_err("then the status");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.metadata().get("x-trailer-echo").expect("set"),
            "late"
        );
    }

    #[tokio::test]
    async fn wait_ends_at_the_deadline_on_both_sides() {
        let (server, client) = direct().await;
        let status = client
            .wait(Some(Duration::from_millis(200)))
            .await
            .expect_err("never answers");
        // tonic's name for an expired deadline (grpcio's is DEADLINE_EXCEEDED).
        assert_eq!(status.code(), Code::Cancelled, "{status:?}");
        assert_eq!(status.message(), "Timeout expired");
        let ended = server.observed.wait_ended().await;
        assert_eq!(ended.grpc_timeout.as_deref(), Some("200000u"));
        assert!(ended.after < Duration::from_secs(5), "{ended:?}");
    }

    #[tokio::test]
    async fn wait_ends_when_the_client_drops_the_call() {
        let (server, client) = direct().await;
        let call = tokio::spawn(async move { client.wait(None).await });
        server.observed.wait_waiting().await;
        call.abort();
        let ended = server.observed.wait_ended().await;
        assert_eq!(ended.grpc_timeout, None);
        assert!(server.observed.ended().len() == 1);
    }

    #[tokio::test]
    async fn unknown_methods_are_unimplemented() {
        let (_server, client) = direct().await;
        let request = Request::new(Bytes::new());
        let path = PathAndQuery::from_static("/burrow.test.Echo/Nope");
        let mut grpc = client.ready().await.expect("ready");
        let status = grpc
            .unary::<_, Bytes, _>(request, path, BytesCodec)
            .await
            .expect_err("no such method");
        assert_eq!(status.code(), Code::Unimplemented);
    }

    /// grpcio's client against tonic's service: the kit's halves agree before any tunnel is
    /// between them.
    #[tokio::test]
    async fn grpcio_calls_the_tonic_service() {
        let server = serve(tokio_listener().await);
        let authority = format!("echo.localhost:{}", server.addr.port());
        let report = python_call(server.addr, &authority, Some("t0k"), None).await;
        assert_eq!(report["unary"], "ok", "{report}");
        assert_eq!(report["echo_header"], "world", "{report}");
        assert_eq!(report["trailer"], serde_json::Value::Null, "{report}");
        let fail = &report["fail"];
        assert_eq!(fail["code"], "NOT_FOUND", "{report}");
        assert_eq!(fail["trailer"], "why", "{report}");
        assert_eq!(report["server_stream"]["ok"], true, "{report}");
        assert_eq!(report["client_stream"]["sha256_ok"], true, "{report}");
        assert_eq!(report["bidi"], serde_json::json!(["one", "two", "three"]));
        // grpcio's own timer, or tonic's answer when that comes first.
        let deadline = report["deadline"]["code"].as_str();
        assert!(
            matches!(deadline, Some("DEADLINE_EXCEEDED" | "CANCELLED")),
            "{report}"
        );
        assert_eq!(report["no_token"], "ok", "{report}");
        let seen = server.observed.last(Method::Unary).expect("seen");
        assert_eq!(seen.authority, Some(authority), "grpc.default_authority");
        let ended = server.observed.wait_ended().await;
        assert!(ended.grpc_timeout.is_some(), "grpcio sends the deadline");
    }

    /// tonic's client against grpcio's service.
    #[tokio::test]
    async fn tonic_calls_the_grpcio_service() {
        let python = python_server().await;
        let url = format!("http://echo.localhost:{}", python.port);
        let client = EchoClient::connect_h2c(&url).await.expect("connects");
        let metadata = [("x-trailer", "t1"), ("x-echo-a", "b")];
        let reply = client
            .unary(Bytes::from_static(b"hi"), &metadata, None)
            .await;
        let reply = reply.expect("grpcio answers");
        // tonic merges the trailers into the response's metadata.
        assert_eq!(
            reply.metadata().get("x-trailer-echo").expect("a trailer"),
            "t1"
        );
        assert_eq!(reply.metadata().get("x-echo-a").expect("a header"), "b");
        assert_eq!(reply.into_inner(), "hi");
        let seen = python.last(Method::Unary).expect("printed");
        assert_eq!(seen["x-echo-a"], "b");
        let mut stream = client
            .server_stream(3, 7, &[])
            .await
            .expect("ok")
            .into_inner();
        for i in 0..3 {
            let message = stream.message().await.expect("ok").expect("a message");
            assert_eq!(message, stream_message(i, 7));
        }
        let call = tokio::spawn(async move { client.wait(None).await });
        python
            .lines
            .wait_for_async("seen /burrow.test.Echo/Wait", WAIT)
            .await;
        call.abort();
        python.lines.wait_for_async("ended cancelled", WAIT).await;
    }
}
