//! HTTP/1.1 with a service over a data stream, spoken by the request's own task.
//!
//! The edge used to send each request through hyper's client: every connection to a service
//! was a task of its own, so a request went from the public connection's task to it over a
//! channel, its answer came back over another, and a connection re-entered the pool through a
//! third task that waited for it to be ready. Here the public connection's task writes the
//! request head straight onto the QUIC stream and reads the answer from it; the answer's body
//! ([`Reply`]) is read from the stream by whoever polls it (the public connection writing it
//! out) and hands its connection back ([`Reply::on_done`]) the moment it has been read to its
//! end. A request body is the one thing that needs a task of its own, as it must flow while the
//! answer is awaited: it is copied by one only when there is a body.
//!
//! The bytes themselves are [`codec`]'s.

pub mod codec;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::task::JoinHandle;

use codec::{Framing, Invalid, RequestFraming, Step};

use crate::body::BoxError;

/// A connection to a service: a data stream to the agent, which holds the TCP connection to
/// the service at its other end.
#[derive(Debug)]
pub struct Conn {
    send: SendStream,
    recv: RecvStream,
    /// Bytes received and not yet parsed.
    buf: BytesMut,
}

/// Why an exchange brought no answer.
#[derive(Debug)]
pub enum Failed {
    /// The stream failed or closed before a whole response head came: whether the service saw
    /// the request is unknown.
    NoAnswer(String),
    /// The service answered with something that is not HTTP/1.1 the edge can pass on.
    Invalid(Invalid),
}

/// How many of QUIC's received chunks one read of a body takes.
const READ_CHUNKS: usize = 32;

/// Where a connection goes once its answer has been read to the end.
pub type Back = Box<dyn FnOnce(Conn) + Send + Sync>;

impl Conn {
    /// A connection over a freshly opened stream.
    pub fn new(send: SendStream, recv: RecvStream) -> Conn {
        Conn {
            send,
            recv,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can take a request: nothing has come from the service since
    /// its last answer (no close, no reset, no stray byte). Looks without waiting.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let read = self.recv.read_chunk(1, true);
        matches!(std::pin::pin!(read).poll(&mut cx), Poll::Pending)
    }

    /// Sends `req` (as the service should see it) and waits for the response head. The
    /// response's body is read from the stream as it is polled.
    pub async fn exchange<B>(mut self, req: Request<B>) -> Result<Response<Reply>, Failed>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Send,
    {
        let head_request = req.method() == Method::HEAD;
        let (parts, body) = req.into_parts();
        let framing = request_framing(&parts, &body);
        let head = codec::encode_request(&parts, framing);
        let sent = self.send.write_chunk(head).await;
        sent.map_err(|e| Failed::NoAnswer(e.to_string()))?;
        let sending = if body.is_end_stream() {
            Sending::Idle(self.send)
        } else {
            let chunked = framing == RequestFraming::Chunked;
            Sending::Body(tokio::spawn(send_body(self.send, body, chunked)))
        };
        let mut io = Io {
            recv: self.recv,
            buf: self.buf,
            sending,
        };
        let head = match read_head(&mut io, head_request).await {
            Ok(head) => head,
            Err(e) => {
                // No answer to pass on: a request body still being copied stops too.
                io.close();
                return Err(e);
            }
        };
        let mut response = Response::new(Reply {
            io: Some(io),
            framing: head.framing,
            keep_alive: head.keep_alive,
            back: None,
        });
        *response.status_mut() = head.status;
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = head.headers;
        Ok(response)
    }
}

/// Reads the response head (interim 1xx answers skipped) into `io`'s buffer and parses it.
async fn read_head(io: &mut Io, head_request: bool) -> Result<codec::Head, Failed> {
    loop {
        if let Some(head) =
            codec::parse_response(&mut io.buf, head_request).map_err(Failed::Invalid)?
        {
            return Ok(head);
        }
        match io.recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => io.buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(Failed::NoAnswer("the service closed the connection".into())),
            Err(e) => return Err(Failed::NoAnswer(e.to_string())),
        }
    }
}

/// How the request's body goes: none without one, its length when the client gave it (the
/// body's size is then exact), chunked otherwise. A POST, PUT or PATCH without a body says
/// `Content-Length: 0`, as some servers wait for a length on those.
fn request_framing<B: Body>(parts: &http::request::Parts, body: &B) -> RequestFraming {
    if body.is_end_stream() {
        let had_length = parts.headers.contains_key(http::header::CONTENT_LENGTH);
        let sends_body = [Method::POST, Method::PUT, Method::PATCH].contains(&parts.method);
        return if had_length || sends_body {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        };
    }
    match body.size_hint().exact() {
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

/// Copies the client's body onto the stream; the stream comes back when all of it went, or
/// `None` when the client's body or the stream failed (the stream is then reset: the service
/// sees the connection end, not a short body it could take for whole).
async fn send_body<B>(mut send: SendStream, mut body: B, chunked: bool) -> Option<SendStream>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Send,
{
    let mut trailers = None;
    let sent: Result<(), ()> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(drop)?;
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) if chunked => {
                    let mut framed = codec::chunk_frame(&data);
                    send.write_all_chunks(&mut framed).await.map_err(drop)?;
                }
                Ok(data) => send.write_chunk(data).await.map_err(drop)?,
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        if chunked {
            let end = codec::last_chunk(trailers.as_ref());
            send.write_chunk(end).await.map_err(drop)?;
        }
        Ok(())
    }
    .await;
    match sent {
        Ok(()) => Some(send),
        Err(()) => {
            let _ = send.reset(VarInt::from_u32(0));
            None
        }
    }
}

/// The stream of a connection whose answer is being read.
#[derive(Debug)]
struct Io {
    recv: RecvStream,
    buf: BytesMut,
    sending: Sending,
}

/// The sending half: idle once the request has gone, or with the task copying its body.
#[derive(Debug)]
enum Sending {
    Idle(SendStream),
    Body(JoinHandle<Option<SendStream>>),
}

/// A service's response body, read from its stream as it is polled. Read to its end, its
/// connection goes where [`Reply::on_done`] says if it can take another request; dropped
/// before that, the stream is reset, which closes the agent's connection to the service.
pub struct Reply {
    /// `None` once the body has ended and the connection has gone.
    io: Option<Io>,
    framing: Framing,
    keep_alive: bool,
    back: Option<Back>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("framing", &self.framing)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

impl Reply {
    /// Where the connection goes once the body has been read to its end (at once, for a body
    /// that has none left).
    pub fn on_done(&mut self, back: Back) {
        self.back = Some(back);
        if self.framing.is_done() {
            self.finish();
        }
    }

    /// The body has ended: the connection goes back if it can take another request (its
    /// answer marked its end and kept it alive, nothing more came, the request body has gone).
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let Some(io) = self.io.take() else { return };
        let Some(back) = self.back.take() else {
            self.io = Some(io);
            return;
        };
        if !self.keep_alive || !io.buf.is_empty() {
            return io.close();
        }
        let send = match io.sending {
            Sending::Idle(send) => send,
            Sending::Body(mut task) => match (&mut task).now_or_never() {
                Some(Ok(Some(send))) => send,
                // The service answered before the whole request body went: the connection's
                // next bytes would be the rest of it, so it is not reused.
                _ => {
                    task.abort();
                    return;
                }
            },
        };
        back(Conn {
            send,
            recv: io.recv,
            buf: io.buf,
        });
    }

    /// Reads more of the body into the buffer, or a piece of it straight from the stream.
    ///
    /// Whatever QUIC has received goes in one read (one lock of the connection): the chunks
    /// are a packet's payload each, about 1.2 KiB, and a body passed on chunk by chunk paid
    /// the lock, a frame and hyper's write queue for each of them.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BoxError>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        let raw = io.buf.is_empty().then(|| self.framing.raw_data()).flatten();
        let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
        let read = io.recv.read_chunks(&mut chunks);
        let count = match std::task::ready!(std::pin::pin!(read).poll(cx)) {
            Err(e) => return Poll::Ready(Err(e.into())),
            Ok(None) if self.framing == Framing::UntilClose => {
                self.keep_alive = false;
                return Poll::Ready(Ok(None));
            }
            Ok(None) => {
                let e = "the service closed the connection before the end of its answer";
                return Poll::Ready(Err(Invalid(e.into()).into()));
            }
            Ok(Some(count)) => count,
        };
        let chunks = &mut chunks[..count];
        let Some(max) = raw else {
            for chunk in chunks.iter() {
                io.buf.extend_from_slice(chunk);
            }
            return Poll::Ready(Ok(Some(Bytes::new())));
        };
        let mut data = match chunks {
            [one] => std::mem::take(one),
            more => {
                let mut all = BytesMut::with_capacity(more.iter().map(Bytes::len).sum());
                for chunk in more.iter() {
                    all.extend_from_slice(chunk);
                }
                all.freeze()
            }
        };
        if let Ok(max) = usize::try_from(max) {
            if data.len() > max {
                // Past the body's end: what follows is parsed (and keeps the connection from
                // being reused, as nothing should follow).
                io.buf.extend_from_slice(&data.split_off(max));
            }
        }
        self.framing.consumed(data.len() as u64);
        Poll::Ready(Ok(Some(data)))
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let step = match this.io.as_mut() {
                Some(io) => this.framing.decode(&mut io.buf),
                None => Ok(Step::End),
            };
            match step {
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::Trailers(trailers)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
            }
            match std::task::ready!(this.poll_read(cx)) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(None) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Some(data)) if data.is_empty() => {}
                Ok(Some(data)) => {
                    if this.framing.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.framing.is_done() {
            // A body with nothing left that nobody polled to its end (hyper does not poll one
            // whose size is 0): the connection is as good as after a read.
            self.finish();
        }
        if let Some(io) = self.io.take() {
            // Dropped before its end: the rest will never be read, so the connection cannot
            // be reused.
            io.close();
        }
    }
}

impl Io {
    /// Ends a connection that will take no other request: a reset tells the agent to close
    /// the service's connection now; a request body still being copied stops.
    fn close(mut self) {
        let _ = self.recv.stop(VarInt::from_u32(0));
        match self.sending {
            Sending::Idle(mut send) => {
                let _ = send.reset(VarInt::from_u32(0));
            }
            Sending::Body(task) => task.abort(),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A real QUIC connection over loopback, to speak to a [`Conn`] from the agent's side.

    use std::sync::Arc;

    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::Conn;
    use crate::certs::provider;

    /// Two ends of a QUIC connection: the edge's (which opens streams) and the agent's.
    pub struct Link {
        pub edge: quinn::Connection,
        pub agent: quinn::Connection,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
    }

    impl Link {
        /// A connection over loopback, TLS with a self-signed certificate the client trusts.
        pub async fn new() -> Link {
            let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            let cert: CertificateDer<'static> = key.cert.der().clone();
            let der = PrivateKeyDer::try_from(key.signing_key.serialize_der()).unwrap();
            let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
            let mut server = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(tls13)
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.clone()], der)
                .unwrap();
            server.alpn_protocols = vec![b"test".to_vec()];
            let server = QuicServerConfig::try_from(server).unwrap();
            let server = quinn::ServerConfig::with_crypto(Arc::new(server));
            let agent_end = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap())
                .expect("bind a loopback UDP port");
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert).unwrap();
            let mut client = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(tls13)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            client.alpn_protocols = vec![b"test".to_vec()];
            let client = QuicClientConfig::try_from(client).unwrap();
            let mut edge_end = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            edge_end.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
            let to = agent_end.local_addr().unwrap();
            let connecting = edge_end.connect(to, "localhost").unwrap();
            let accepting = async { agent_end.accept().await.expect("incoming").await };
            let (edge, agent) = tokio::join!(connecting, accepting);
            Link {
                edge: edge.expect("connect"),
                agent: agent.expect("accept"),
                _endpoints: (edge_end, agent_end),
            }
        }

        /// A new stream as a connection to a service.
        pub async fn conn(&self) -> Conn {
            let (send, recv) = self.edge.open_bi().await.expect("open a stream");
            Conn::new(send, recv)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::testing::Link;
    use super::*;
    use http_body_util::{Empty, Full};

    /// The agent's side of a stream: reads a request head (and `body_len` body bytes),
    /// answers with `answer`, and returns what it read.
    async fn service(
        recv: &mut RecvStream,
        send: &mut SendStream,
        answer: &[u8],
        body_len: usize,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            recv.read_exact(&mut byte).await.expect("request head");
            got.push(byte[0]);
        }
        let mut body = vec![0u8; body_len];
        recv.read_exact(&mut body).await.expect("request body");
        got.extend_from_slice(&body);
        send.write_all(answer).await.expect("answer");
        got
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header("host", "localhost:3000")
            .body(Empty::new())
            .unwrap()
    }

    async fn read_all(reply: Reply) -> (Vec<u8>, Option<http::HeaderMap>) {
        let collected = reply.collect().await.expect("whole body");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_kept_connection_carries_the_next_request_once_the_answer_is_read() {
        let link = Link::new().await;
        let agent = link.agent.clone();
        let service = tokio::spawn(async move {
            let (mut send, mut recv) = agent.accept_bi().await.expect("stream");
            let first = service(
                &mut recv,
                &mut send,
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                0,
            )
            .await;
            let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n";
            let second = service(&mut recv, &mut send, chunked, 0).await;
            (first, second)
        });
        let back: Arc<Mutex<Option<Conn>>> = Arc::default();
        let mut response = link
            .conn()
            .await
            .exchange(get("/one"))
            .await
            .expect("answer");
        assert_eq!(response.status(), 200);
        let into = back.clone();
        response
            .body_mut()
            .on_done(Box::new(move |c| *into.lock().unwrap() = Some(c)));
        assert_eq!(read_all(response.into_body()).await.0, b"hello");
        let mut conn = back
            .lock()
            .unwrap()
            .take()
            .expect("the connection came back");
        assert!(conn.is_usable());
        let response = conn.exchange(get("/two")).await.expect("second answer");
        let (body, trailers) = read_all(response.into_body()).await;
        assert_eq!(body, b"abc");
        assert_eq!(trailers.expect("trailers")["x-t"], "1");
        let (first, second) = service.await.unwrap();
        assert_eq!(first, b"GET /one HTTP/1.1\r\nhost: localhost:3000\r\n\r\n");
        assert!(second.starts_with(b"GET /two HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_request_body_goes_with_its_length_or_chunked() {
        let link = Link::new().await;
        let agent = link.agent.clone();
        let service = tokio::spawn(async move {
            let (mut send, mut recv) = agent.accept_bi().await.expect("stream");
            let ok = b"HTTP/1.1 204 No Content\r\n\r\n";
            let sized = service(&mut recv, &mut send, ok, 5).await;
            let (mut send, mut recv) = agent.accept_bi().await.expect("stream");
            let chunked = service(&mut recv, &mut send, ok, "5\r\nhello\r\n0\r\n\r\n".len()).await;
            (sized, chunked)
        });
        let req = Request::post("/up")
            .body(Full::new(Bytes::from("hello")))
            .unwrap();
        let response = link.conn().await.exchange(req).await.expect("answer");
        assert_eq!(response.status(), 204);
        let streamed =
            http_body_util::StreamBody::new(futures_util::stream::iter([Ok::<_, BoxError>(
                Frame::data(Bytes::from("hello")),
            )]));
        let req = Request::post("/up").body(streamed).unwrap();
        let response = link.conn().await.exchange(req).await.expect("answer");
        assert_eq!(response.status(), 204);
        let (sized, chunked) = service.await.unwrap();
        let sized = String::from_utf8(sized).unwrap();
        assert!(sized.ends_with("content-length: 5\r\n\r\nhello"), "{sized}");
        let chunked = String::from_utf8(chunked).unwrap();
        assert!(
            chunked.ends_with("transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            "{chunked}"
        );
    }

    #[tokio::test]
    async fn an_answer_read_until_close_or_dropped_early_does_not_come_back() {
        let link = Link::new().await;
        let agent = link.agent.clone();
        let service = tokio::spawn(async move {
            let (mut send, mut recv) = agent.accept_bi().await.expect("stream");
            service(
                &mut recv,
                &mut send,
                b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
                0,
            )
            .await;
            send.finish().unwrap();
            let (mut send, mut recv) = agent.accept_bi().await.expect("stream");
            let long = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part";
            service(&mut recv, &mut send, long, 0).await;
            // The edge gave up on the body: its side of the stream is reset.
            recv.read_to_end(1024).await.expect_err("reset")
        });
        let returned = Arc::new(Mutex::new(0));
        let mut response = link.conn().await.exchange(get("/")).await.expect("answer");
        let count = returned.clone();
        response
            .body_mut()
            .on_done(Box::new(move |_| *count.lock().unwrap() += 1));
        assert_eq!(read_all(response.into_body()).await.0, b"until the end");
        let mut response = link.conn().await.exchange(get("/")).await.expect("answer");
        let count = returned.clone();
        response
            .body_mut()
            .on_done(Box::new(move |_| *count.lock().unwrap() += 1));
        let mut body = response.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().unwrap(), "only part");
        drop(body);
        let reset = service.await.unwrap();
        assert!(
            matches!(
                reset,
                quinn::ReadToEndError::Read(quinn::ReadError::Reset(_))
            ),
            "{reset:?}"
        );
        assert_eq!(*returned.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_stream_closed_before_the_answer_is_no_answer_and_garbage_is_invalid() {
        let link = Link::new().await;
        let agent = link.agent.clone();
        tokio::spawn(async move {
            let (mut send, mut recv) = agent.accept_bi().await.expect("stream");
            service(&mut recv, &mut send, b"", 0).await;
            send.finish().unwrap();
            let (mut send, mut recv) = agent.accept_bi().await.expect("stream");
            service(&mut recv, &mut send, b"SSH-2.0-OpenSSH_9\r\n\r\n", 0).await;
            let mut rest = [0u8; 1];
            let _ = recv.read(&mut rest).await;
        });
        let closed = link
            .conn()
            .await
            .exchange(get("/"))
            .await
            .expect_err("closed");
        assert!(matches!(closed, Failed::NoAnswer(_)), "{closed:?}");
        let garbage = link
            .conn()
            .await
            .exchange(get("/"))
            .await
            .expect_err("garbage");
        let Failed::Invalid(e) = garbage else {
            panic!("{garbage:?}")
        };
        assert!(e.0.contains("malformed"), "{e}");
    }
}
