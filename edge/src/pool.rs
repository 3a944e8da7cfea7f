//! Idle HTTP/1.1 connections to devbox services, kept for the next request. Each is a QUIC
//! stream to the agent, which holds a TCP connection to the service at the other end: reusing it
//! saves the stream's open-and-answer round trip, the agent's dial and the service's accept.
//!
//! A connection enters the pool when its response has been delivered (its body dropped) and
//! hyper says it can take another request; it is keyed by the agent connection and the port, so
//! a reconnected agent never gets a request on its old connection. Idle connections expire.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use crate::body::ToService;
use crate::metrics::CountedBody;

/// The sending half of a connection to a service.
pub type Sender = SendRequest<CountedBody<ToService>>;

/// Which connections can serve a request: the agent connection's id and the port.
pub type Key = (usize, u16);

/// Idle connections, by key.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    max_per_key: usize,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// How long a returned connection may take to become ready for its next request.
const READY_WAIT: Duration = Duration::from_secs(5);

impl Pool {
    /// A pool keeping at most `max_per_key` idle connections per key, each for `idle_timeout`.
    /// A task sweeps expired ones while the pool lives.
    pub fn new(max_per_key: usize, idle_timeout: Duration) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            idle: Mutex::default(),
            max_per_key,
            idle_timeout,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(sweep(weak, idle_timeout));
        pool
    }

    /// An idle connection for `key` that can take a request now, if there is one.
    pub fn checkout(&self, key: Key) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&key)?;
        let found = loop {
            let Some(entry) = list.pop() else { break None };
            if entry.sender.is_ready() && entry.since.elapsed() < self.idle_timeout {
                break Some(entry.sender);
            }
        };
        if list.is_empty() {
            idle.remove(&key);
        }
        found
    }

    /// Gives a connection back once it is ready for another request (its previous response
    /// fully read, its request body fully sent); a connection that closes instead is dropped.
    pub fn checkin(self: &Arc<Self>, key: Key, mut sender: Sender) {
        if self.max_per_key == 0 {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            match tokio::time::timeout(READY_WAIT, sender.ready()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            let Some(pool) = pool.upgrade() else { return };
            let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let list = idle.entry(key).or_default();
            if list.len() < pool.max_per_key {
                list.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        });
    }

    /// Idle connections now, all keys together.
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.values().map(Vec::len).sum()
    }
}

/// Drops expired and closed idle connections every `every`, until the pool is gone.
async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, list| {
            list.retain(|e| !e.sender.is_closed() && e.since.elapsed() < pool.idle_timeout);
            !list.is_empty()
        });
    }
}

/// A response body that gives its connection back to the pool when it is done with (read to
/// the end, or dropped by a client that went away: then the connection closes and is not
/// pooled).
pub struct Returning<B> {
    inner: B,
    back: Option<(Arc<Pool>, Key, Sender)>,
}

impl<B> std::fmt::Debug for Returning<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Returning")
            .field("pooled", &self.back.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> Returning<B> {
    /// Wraps `inner`; `back` is where its connection goes when it is done.
    pub fn new(inner: B, back: Option<(Arc<Pool>, Key, Sender)>) -> Self {
        Returning { inner, back }
    }
}

impl<B> Drop for Returning<B> {
    fn drop(&mut self) {
        if let Some((pool, key, sender)) = self.back.take() {
            pool.checkin(key, sender);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Returning<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
