//! A byte stream carried in WebSocket binary messages: how `burrow connect` reaches a raw TCP
//! port of a devbox through the edge (subprotocol [`SUBPROTOCOL`]).
//!
//! The convention, the same both ways:
//! - a non-empty binary message carries the next bytes of the stream;
//! - an empty binary message ends that direction (TCP's half-close, `shutdown(SHUT_WR)`): the
//!   other direction goes on;
//! - a close frame ends the connection. Before both directions ended it means the connection
//!   broke (the service reset it, the agent went away), and the reader gets an error;
//! - text messages are a protocol error; pings and pongs are WebSocket's own.
//!
//! [`WsBytes`] turns a [`WebSocketStream`] into [`AsyncRead`] + [`AsyncWrite`] under that
//! convention, so both ends copy bytes with the same `copy_bidirectional` as everything else.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

/// The WebSocket subprotocol that asks the edge for a raw TCP stream to the devbox port.
pub const SUBPROTOCOL: &str = "burrow-tcp.v1";

/// The largest message either end sends; bigger writes are cut.
pub const MAX_CHUNK: usize = 64 * 1024;

/// WebSocket settings for both ends: a peer's message may be at most twice [`MAX_CHUNK`] (a
/// larger one is cut off instead of being buffered whole); each message is written at once
/// (an interactive session's keystroke must not wait for a buffer to fill).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_CHUNK * 2))
        .max_frame_size(Some(MAX_CHUNK * 2))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

/// How long [`WsBytes::close`] may take, sending ours and waiting for the peer's close frame: a
/// peer that stopped reading must not hold the connection (and the devbox stream) forever.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The read buffer, allocated up front for each connection (it grows for a larger frame).
const READ_BUFFER: usize = 16 * 1024;

/// The longest reason a close frame can carry (RFC 6455, 5.5: 125 bytes of payload).
const MAX_REASON: usize = 123;

/// A [`WebSocketStream`] read and written as a byte stream (see the module docs).
#[derive(Debug)]
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// The peer ended its direction (an empty message) or the connection (a close frame).
    read_done: bool,
    /// Our direction is ended: the empty message was sent.
    write_done: bool,
}

impl<S> WsBytes<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    /// Wraps a WebSocket that agreed on [`SUBPROTOCOL`].
    pub fn new(ws: WebSocketStream<S>) -> WsBytes<S> {
        WsBytes {
            ws,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
        }
    }

    /// Ends the connection: a close frame with `code` and `reason` (cut to what a close frame
    /// holds), then the peer's, so the last bytes are not lost to a reset; all within two
    /// seconds.
    pub async fn close(mut self, code: CloseCode, reason: &str) {
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code,
            reason: reason[..end].into(),
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if self.ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }
}

/// An I/O error for a WebSocket failure.
fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the tunnel's WebSocket is closed",
        ),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S> AsyncRead for WsBytes<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.read_done {
                return Poll::Ready(Ok(()));
            }
            let message = match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the tunnel's WebSocket ended without closing",
                    )));
                }
            };
            match message {
                Message::Binary(bytes) if bytes.is_empty() => self.read_done = true,
                Message::Binary(bytes) => self.pending = bytes,
                Message::Close(frame) => {
                    self.read_done = true;
                    let why = frame.map_or_else(
                        || "no reason given".to_owned(),
                        |f| format!("{} ({})", f.reason, u16::from(f.code)),
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("the tunnel closed the connection: {why}"),
                    )));
                }
                Message::Text(_) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a text message on a {SUBPROTOCOL} WebSocket"),
                    )));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }
}

impl<S> AsyncWrite for WsBytes<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        let n = buf.len().min(MAX_CHUNK);
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_done {
            ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
            Pin::new(&mut self.ws)
                .start_send(Message::Binary(Bytes::new()))
                .map_err(io_error)?;
            self.write_done = true;
        }
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WsBytes<tokio::io::DuplexStream>,
        WsBytes<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, Some(config())).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(config())).await;
        (WsBytes::new(client), WsBytes::new(server))
    }

    #[tokio::test]
    async fn bytes_cross_in_order_and_half_close_keeps_the_other_way_open() {
        let (mut client, mut server) = pair().await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            // Half-closed: the answer still arrives.
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            client.close(CloseCode::Normal, "done").await;
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        server.write_all(b"thanks").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"thanks");
    }

    #[tokio::test]
    async fn a_close_before_the_end_is_an_error_naming_the_reason() {
        let (mut client, server) = pair().await;
        let closer = tokio::spawn(server.close(CloseCode::Error, "the service reset it"));
        let mut buf = [0u8; 16];
        let e = client.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(e.to_string().contains("the service reset it"), "{e}");
        drop(client);
        closer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn closing_a_peer_that_stopped_reading_ends_in_bounded_time() {
        // A tiny pipe the peer never reads: our close frame cannot even be written.
        let (a, _b) = tokio::io::duplex(8);
        let ws = WebSocketStream::from_raw_socket(a, Role::Server, Some(config())).await;
        let mut ours = WsBytes::new(ws);
        let _ = tokio::time::timeout(Duration::from_millis(10), ours.write_all(&[1; 4096])).await;
        let long = "\u{e9}".repeat(100);
        tokio::time::timeout(CLOSE_WAIT * 2, ours.close(CloseCode::Error, &long))
            .await
            .expect("close gives up after CLOSE_WAIT");
    }

    #[tokio::test]
    async fn a_long_close_reason_is_cut_at_a_character() {
        let (client, mut server) = pair().await;
        let long = "\u{e9}".repeat(100);
        let closer = tokio::spawn(async move { client.close(CloseCode::Error, &long).await });
        let mut buf = [0u8; 16];
        let e = server.read(&mut buf).await.unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains(&"\u{e9}".repeat(61)), "{shown}");
        assert!(!shown.contains(&"\u{e9}".repeat(62)), "{shown}");
        drop(server);
        closer.await.unwrap();
    }

    #[tokio::test]
    async fn a_text_message_is_refused() {
        let (mut client, mut server) = pair().await;
        server.ws.send(Message::text("hello")).await.unwrap();
        let mut buf = [0u8; 16];
        let e = client.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
