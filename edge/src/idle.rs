//! Copying an upgraded connection both ways, closed when no byte has moved either way for a
//! while: a WebSocket whose client vanished must not hold a devbox stream forever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::activity::{self, Activity};
use tokio::time::Instant;

/// Copies `a` to `b` and back until both directions end, or until nothing has moved for
/// `idle`; bytes that move touch the devbox's `activity`. Returns `Ok(true)` when it stopped
/// for idleness, `Ok(false)` when both ended, and the error of the side that failed.
pub async fn copy_bidirectional<A, B>(
    a: A,
    b: B,
    idle: Duration,
    activity: Option<Activity>,
) -> io::Result<bool>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Watched {
        inner: a,
        start,
        last: last.clone(),
        activity: activity.clone(),
    };
    let mut b = Watched {
        inner: b,
        start,
        last: last.clone(),
        activity,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let moved = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = start + moved + idle;
        tokio::select! {
            copied = &mut copy => return copied.map(|_| false),
            () = tokio::time::sleep_until(deadline) => {
                if Duration::from_millis(last.load(Ordering::Relaxed)) == moved {
                    return Ok(true);
                }
            }
        }
    }
}

/// Records when bytes last arrived.
struct Watched<T> {
    inner: T,
    start: Instant,
    last: Arc<AtomicU64>,
    activity: Option<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, Ordering::Relaxed);
            activity::touch(self.activity.as_ref());
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_and_busy_ones_do_not() {
        let (mut client, a) = tokio::io::duplex(64);
        let (b, mut service) = tokio::io::duplex(64);
        let copy = tokio::spawn(copy_bidirectional(a, b, Duration::from_secs(10), None));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.expect("write");
            let mut byte = [0u8; 1];
            service.read_exact(&mut byte).await.expect("read");
        }
        assert!(!copy.is_finished(), "traffic every 6 s keeps it open");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(
            copy.await.expect("join").expect("no error"),
            "closed for idleness"
        );
    }
}
