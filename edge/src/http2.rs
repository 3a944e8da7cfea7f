//! HTTP/2 connections to devbox services (h2c, prior knowledge), for gRPC and for ports the
//! agent marks HTTP/2-only. One data stream carries one HTTP/2 connection, and that connection
//! carries every request to its port on its agent connection at once, each an HTTP/2 stream of
//! its own with its own flow control, so nothing waits for a free connection; a request the
//! client cancels is reset on it (`RST_STREAM`), which is how the service learns of it.
//!
//! Connections are kept by agent connection and port, like the HTTP/1.1 [`Pool`]'s, so a
//! reconnected agent never gets a request on its old connection, and dropped after
//! `agents.pool_idle` without a new request: requests still running on a dropped one finish
//! first (the connection closes when its last stream ends), so a long call is never cut by
//! this.
//!
//! [`Pool`]: crate::pool::Pool

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::body::ToService;
use crate::dial::Opened;
use crate::metrics::CountedBody;
use crate::pool::Key;

/// The sending half of an HTTP/2 connection to a service; clones share the connection.
pub type Sender = SendRequest<CountedBody<ToService>>;

/// Open HTTP/2 connections to services, by agent connection and port.
#[derive(Debug)]
pub struct Http2Conns {
    conns: Mutex<HashMap<Key, Conn>>,
    /// Keys a request is opening a connection for; the others wait for it rather than open
    /// one each (a client starting with many calls at once). The sender goes when it is done.
    connecting: Mutex<HashMap<Key, watch::Sender<()>>>,
}

/// What a gRPC request finds for its key.
#[derive(Debug)]
pub enum Claim {
    /// An open connection.
    Open(Sender),
    /// Another request is opening one: wait for it (`changed` resolves when it is done).
    Busy(watch::Receiver<()>),
    /// None: this request opens it, and holds the key until it did (or gave up).
    Mine(Connecting),
}

/// A request opening the connection for a key; the requests waiting for it go on when this
/// drops (after [`Http2Conns::put`], or on a failure).
#[derive(Debug)]
pub struct Connecting {
    conns: Weak<Http2Conns>,
    key: Key,
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if let Some(conns) = self.conns.upgrade() {
            // Dropping the sender wakes every waiter.
            let done = conns.connecting_lock().remove(&self.key);
            drop(done);
        }
    }
}

#[derive(Debug)]
struct Conn {
    sender: Sender,
    /// The agent said its port speaks only HTTP/2: every request to it goes here, not only
    /// gRPC's.
    http2_only: bool,
    last_used: Instant,
}

impl Http2Conns {
    /// Keeps connections while they take a request at least every `idle_timeout`; a task
    /// drops the others while this lives.
    pub fn new(idle_timeout: Duration) -> Arc<Http2Conns> {
        let conns = Arc::new(Http2Conns {
            conns: Mutex::default(),
            connecting: Mutex::default(),
        });
        tokio::spawn(sweep(Arc::downgrade(&conns), idle_timeout));
        conns
    }

    /// The open connection for `key`, if there is one and the request may use it: a gRPC
    /// request (`grpc`) any, another only one to a port the agent marks HTTP/2-only.
    pub fn get(&self, key: Key, grpc: bool) -> Option<Sender> {
        let mut conns = self.lock();
        let conn = conns.get_mut(&key)?;
        if conn.sender.is_closed() {
            conns.remove(&key);
            return None;
        }
        if !grpc && !conn.http2_only {
            return None;
        }
        conn.last_used = Instant::now();
        Some(conn.sender.clone())
    }

    /// For a gRPC request: the open connection for `key`, or the one another request is
    /// opening, or the right to open it.
    pub fn claim(self: &Arc<Self>, key: Key) -> Claim {
        if let Some(sender) = self.get(key, true) {
            return Claim::Open(sender);
        }
        let mut connecting = self.connecting_lock();
        if let Some(opening) = connecting.get(&key) {
            return Claim::Busy(opening.subscribe());
        }
        connecting.insert(key, watch::Sender::new(()));
        Claim::Mine(Connecting {
            conns: Arc::downgrade(self),
            key,
        })
    }

    /// Keeps `sender` for the next requests to `key`, unless another request opened one
    /// meanwhile that is still open (this one then serves its own request and closes).
    pub fn put(&self, key: Key, sender: &Sender, http2_only: bool) {
        let mut conns = self.lock();
        if conns.get(&key).is_some_and(|c| !c.sender.is_closed()) {
            return;
        }
        conns.insert(
            key,
            Conn {
                sender: sender.clone(),
                http2_only,
                last_used: Instant::now(),
            },
        );
    }

    /// Open connections now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn connecting_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, watch::Sender<()>>> {
        self.connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts HTTP/2 on an accepted data stream: the client preface goes out, and a task drives
/// the connection until its last sender and stream are gone. Large windows keep a stream of
/// big messages moving over the agent's round trip; the service's own flow control still
/// holds back a writer whose reader is slow.
pub async fn handshake(opened: Opened) -> Result<Sender, hyper::Error> {
    let io = TokioIo::new(tokio::io::join(opened.recv, opened.send));
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, CountedBody<ToService>>(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "HTTP/2 connection to a service ended with an error");
        }
    });
    Ok(sender)
}

/// Receive window of one request's response (the service may send this much ahead).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Receive window of the connection, all its requests together.
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Largest frame the service may send: fewer, larger DATA frames for big messages.
const MAX_FRAME: u32 = 64 * 1024;

/// Drops closed connections, and those without a new request for `idle`, every `idle`,
/// until the connections are gone.
async fn sweep(conns: Weak<Http2Conns>, idle: Duration) {
    let mut tick = tokio::time::interval(idle.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(conns) = conns.upgrade() else { return };
        // Dropped after the lock: a sender's drop may wake the connection's task.
        let gone: Vec<Conn> = {
            let mut map = conns.lock();
            let keys: Vec<Key> = map
                .iter()
                .filter(|(_, c)| c.sender.is_closed() || c.last_used.elapsed() >= idle)
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        drop(gone);
    }
}
