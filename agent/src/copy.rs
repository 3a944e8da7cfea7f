//! Copying one stream's bytes both ways with no copy buffer held by the stream. The edge's bytes
//! reach the service as the chunks quinn received them, up to [`CHUNKS`] in one vectored write;
//! the service's bytes are read into a buffer taken only once its socket is readable, and handed
//! to quinn, which keeps it until the edge has acknowledged it.
//!
//! Why not `tokio::io::copy_bidirectional`: it gives each stream two heap buffers for its whole
//! life (they were 64 KiB and 16 KiB), and a kept-alive stream spends most of its life idle in
//! the edge's pool. Freed after load in the middle of glibc's heaps, below its mmap threshold,
//! those buffers stayed with the allocator: the agent's RSS rose with every round of load
//! (issue 11, `bench/memory.py`). Here an idle stream holds no buffer at all.
//!
//! The semantics are `copy_bidirectional`'s: when one side's reading ends, the other side's
//! writing is shut down (the QUIC stream finished, the TCP socket's write half shut) and the
//! other direction goes on; the copy ends when both have; the first error ends both.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;

/// How much one read from the service takes: QUIC cuts what it sends into packets anyway, so a
/// larger buffer costs memory and no download speed (423 MB/s with 64 KiB, 427 with 16 KiB).
pub const FROM_SERVICE_BUF: usize = 16 * 1024;
/// A read from the service shorter than this is copied into a buffer of its own size, so the
/// [`FROM_SERVICE_BUF`] one goes back to the allocator at once instead of waiting in quinn
/// for the edge's acknowledgement (a small response, an interactive session's keystrokes).
const SHORT_READ: usize = FROM_SERVICE_BUF / 4;
/// How many of quinn's received chunks (a packet's worth each, about 1.2 KiB) one write to the
/// service takes: an upload reaches the service in writes of up to ~40 KiB.
pub const CHUNKS: usize = 32;

/// Copies between the service's socket and the edge's stream until both directions end.
/// Returns the bytes copied (from the service, to the service).
pub async fn both_ways(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> io::Result<(u64, u64)> {
    let (tcp_read, tcp_write) = tcp.split();
    tokio::try_join!(from_service(tcp_read, send), to_service(recv, tcp_write))
}

/// The service's bytes to the edge; finishes the QUIC stream when the service stops sending.
async fn from_service(mut tcp: ReadHalf<'_>, send: &mut SendStream) -> io::Result<u64> {
    let mut total = 0;
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(FROM_SERVICE_BUF);
        // A read through tokio's `AsyncRead`, not `try_read_buf`: a read that leaves the buffer
        // part empty has drained the socket, and tokio then forgets its readiness, so the next
        // round waits for the next bytes instead of trying a read that can only say
        // `EAGAIN` (`strace` at 1,000 req/s: two `recvfrom` a response, one of them `EAGAIN`).
        let read = match tcp.read_buf(&mut buf).await? {
            0 => break,
            read => read,
        };
        total += read as u64;
        let chunk = if read < SHORT_READ {
            Bytes::copy_from_slice(&buf)
        } else {
            buf.freeze()
        };
        send.write_chunk(chunk).await?;
    }
    send.finish()?;
    Ok(total)
}

/// The edge's bytes to the service; shuts the socket's write half when the edge stops sending.
async fn to_service<W: AsyncWrite + Unpin>(recv: &mut RecvStream, mut tcp: W) -> io::Result<u64> {
    let mut chunks: [Bytes; CHUNKS] = std::array::from_fn(|_| Bytes::new());
    let mut total = 0;
    while let Some(count) = recv.read_chunks(&mut chunks).await? {
        total += write_chunks(&mut tcp, &mut chunks[..count]).await?;
    }
    tcp.shutdown().await?;
    Ok(total)
}

/// Writes all of `chunks`, as few vectored writes as the writer allows, and empties each as it
/// goes: a chunk written is dropped at once, not kept (with the packet it came in) while the
/// stream waits for more.
async fn write_chunks<W: AsyncWrite + Unpin>(w: &mut W, chunks: &mut [Bytes]) -> io::Result<u64> {
    let total = chunks.iter().map(|c| c.len() as u64).sum();
    let mut first = 0;
    while first < chunks.len() {
        let mut written = {
            let mut slices = [IoSlice::new(&[]); CHUNKS];
            let count = slices
                .iter_mut()
                .zip(&chunks[first..])
                .map(|(slice, chunk)| *slice = IoSlice::new(chunk))
                .count();
            w.write_vectored(&slices[..count]).await?
        };
        if written == 0 && chunks[first..].iter().any(|c| !c.is_empty()) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        for chunk in &mut chunks[first..] {
            if written < chunk.len() {
                chunk.advance(written);
                break;
            }
            written -= chunk.len();
            *chunk = Bytes::new();
            first += 1;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most `max` bytes a write, across slices.
    struct Trickle {
        max: usize,
        got: Vec<u8>,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.max - n);
                self.got.extend_from_slice(&buf[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_writes_deliver_every_byte_in_order_and_drop_the_chunks() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for max in [1, 7, 700, 1200, 5000] {
            let mut chunks: Vec<Bytes> = data
                .chunks(1200)
                .map(Bytes::copy_from_slice)
                .chain([Bytes::new()])
                .collect();
            let mut w = Trickle {
                max,
                got: Vec::new(),
            };
            let n = write_chunks(&mut w, &mut chunks).await.expect("write");
            assert_eq!(n, 5000, "max {max}");
            assert_eq!(w.got, data, "max {max}");
            assert!(chunks.iter().all(Bytes::is_empty), "max {max}");
        }
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error() {
        let mut w = Trickle {
            max: 0,
            got: Vec::new(),
        };
        let err = write_chunks(&mut w, &mut [Bytes::from_static(b"x")])
            .await
            .expect_err("nothing taken");
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}
