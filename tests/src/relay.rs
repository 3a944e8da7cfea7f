//! A UDP relay between one client (the agent) and one upstream (the edge) on loopback, for fault
//! injection: the test blackholes the path, drops a share of packets, delays them, points the
//! relay at a restarted edge, or rebinds it like a NAT that lost its mapping, while traffic flows.
//!
//! Data flow, the same in each direction: a reader task receives a datagram, decides at once
//! whether the network loses it (blackhole, loss), and queues the rest with their due time; the
//! direction's queue task waits until each is due, in order, and sends it on.
//!
//! - Up (client to upstream): read on the listening socket, which also learns the client's
//!   address; sent from the current upstream socket to the current upstream address.
//! - Down (upstream to client): read on the current upstream socket (from any sender); sent from
//!   the listening socket to the client's latest address.
//!
//! Settings are read per packet, so a change applies to the next packet the relay receives.
//! Every task stops when the [`Relay`] is dropped.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The largest datagram the relay forwards.
const BUF: usize = 65536;

/// What the relay has forwarded and dropped since it started (or since [`Relay::reset_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Packets sent on from the client to the upstream.
    pub up_packets: u64,
    /// Bytes (UDP payload) sent on from the client to the upstream.
    pub up_bytes: u64,
    /// Packets sent on from the upstream to the client.
    pub down_packets: u64,
    /// Bytes (UDP payload) sent on from the upstream to the client.
    pub down_bytes: u64,
    /// Packets dropped, both directions: blackhole, loss, no client yet, send errors.
    pub dropped: u64,
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Where `rebind` spawns the new upstream socket's reader.
    runtime: Handle,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// The down queue, fed by whichever upstream socket is current.
    down: mpsc::UnboundedSender<Queued>,
}

impl Relay {
    /// Binds `127.0.0.1:0` and forwards to `upstream`.
    ///
    /// Panics if it cannot bind a loopback socket (the test cannot run without one).
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = Arc::new(
            UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .expect("bind relay socket"),
        );
        let addr = listener.local_addr().expect("relay socket address");
        let outbound = Arc::new(bind_loopback().expect("bind relay upstream socket"));
        let shutdown = CancellationToken::new();
        let out_stop = shutdown.child_token();
        let port = u64::from(addr.port());
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            client: Mutex::new(None),
            out: Mutex::new(Outbound {
                socket: outbound.clone(),
                stop: out_stop.clone(),
            }),
            blackhole: AtomicBool::new(false),
            loss: AtomicU64::new(0f64.to_bits()),
            delay_nanos: AtomicU64::new(0),
            rng: [
                Mutex::new(XorShift::new(port)),
                Mutex::new(XorShift::new(port | 1 << 32)),
            ],
            packets: [AtomicU64::new(0), AtomicU64::new(0)],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            dropped: AtomicU64::new(0),
            changed: Notify::new(),
        });
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let relay = Relay {
            addr,
            shared: shared.clone(),
            runtime: Handle::current(),
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
            down: down_tx,
        };
        relay.spawn(
            shutdown.clone(),
            read_client(shared.clone(), listener.clone(), up_tx),
        );
        relay.spawn(
            shutdown.clone(),
            deliver(shared.clone(), Direction::Up, up_rx, listener.clone()),
        );
        relay.spawn(
            shutdown,
            deliver(shared.clone(), Direction::Down, down_rx, listener),
        );
        relay.spawn(
            out_stop,
            read_upstream(shared, outbound, relay.down.clone()),
        );
        tracing::debug!(relay = %addr, %upstream, "relay started");
        relay
    }

    /// The address the client (agent) dials.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes where packets go (an edge restarted on another port), from the next one sent.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }

    /// Drops every packet both ways while true, including those already queued by a delay.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }

    /// Drops this share (clamped to `0.0..=1.0`) of the packets received from now on, each
    /// direction independently, with a per-relay pseudo-random sequence.
    pub fn set_loss(&self, share: f64) {
        let share = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self.shared.loss.store(share.to_bits(), Ordering::Relaxed);
    }

    /// Delays every packet received from now on by `delay` (one way), keeping the order.
    pub fn set_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// NAT rebinding: from now on, client packets go upstream from a new socket (a new source
    /// port), and replies to the old socket are lost, as with a NAT that lost its mapping.
    /// Replies to the new socket reach the client as before.
    pub fn rebind(&self) {
        // `from_std` registers the socket with the reactor of the relay's runtime.
        let _runtime = self.runtime.enter();
        let socket = match bind_loopback() {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                tracing::warn!(relay = %self.addr, %error, "relay cannot rebind; keeps its socket");
                return;
            }
        };
        let stop = self.shutdown.child_token();
        let next = Outbound {
            socket: socket.clone(),
            stop: stop.clone(),
        };
        let old = std::mem::replace(&mut *lock(&self.shared.out), next);
        old.stop.cancel();
        tracing::debug!(
            relay = %self.addr,
            from = ?old.socket.local_addr().ok(),
            to = ?socket.local_addr().ok(),
            "relay rebound",
        );
        self.spawn(
            stop,
            read_upstream(self.shared.clone(), socket, self.down.clone()),
        );
    }

    /// Packets and bytes forwarded per direction, packets dropped.
    pub fn stats(&self) -> RelayStats {
        self.shared.stats()
    }

    /// Resets the counters to zero.
    pub fn reset_stats(&self) {
        let s = &self.shared;
        for counter in s.packets.iter().chain(&s.bytes).chain([&s.dropped]) {
            counter.store(0, Ordering::Relaxed);
        }
        s.changed.notify_waiters();
    }

    /// Waits until the counters satisfy `until` and returns them; wrap it in a timeout.
    pub async fn wait_stats(&self, until: impl Fn(&RelayStats) -> bool) -> RelayStats {
        loop {
            // Register before reading, so a change between the read and the wait is not missed.
            let mut changed = pin!(self.shared.changed.notified());
            changed.as_mut().enable();
            let stats = self.stats();
            if until(&stats) {
                return stats;
            }
            changed.await;
        }
    }

    /// Spawns a relay task that ends when `stop` is cancelled.
    fn spawn(&self, stop: CancellationToken, task: impl Future<Output = ()> + Send + 'static) {
        let span = tracing::debug_span!("relay", addr = %self.addr);
        self.tasks.spawn_on(
            async move {
                // Stop first: a packet that arrives after a rebind or a drop is not forwarded
                // (`run_until_cancelled` would favour the task).
                tokio::select! {
                    biased;
                    () = stop.cancelled() => {}
                    () = task => {}
                }
            }
            .instrument(span),
            &self.runtime,
        );
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.tasks.close();
    }
}

/// A packet direction; indexes the per-direction state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to upstream.
    Up = 0,
    /// Upstream to client.
    Down = 1,
}

/// What the relay's tasks and its handle share.
#[derive(Debug)]
struct Shared {
    upstream: Mutex<SocketAddr>,
    /// The client's latest source address; none until it sends.
    client: Mutex<Option<SocketAddr>>,
    out: Mutex<Outbound>,
    blackhole: AtomicBool,
    /// An `f64` in `0.0..=1.0`, as bits.
    loss: AtomicU64,
    delay_nanos: AtomicU64,
    rng: [Mutex<XorShift>; 2],
    packets: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    dropped: AtomicU64,
    /// Wakes `wait_stats` whenever a counter changes.
    changed: Notify,
}

/// The current upstream socket and the token that stops its reader.
#[derive(Debug)]
struct Outbound {
    socket: Arc<UdpSocket>,
    stop: CancellationToken,
}

/// A packet waiting in a direction's queue.
#[derive(Debug)]
struct Queued {
    due: Instant,
    data: Bytes,
}

impl Shared {
    /// Applies blackhole and loss to a received packet, then queues it with its delay.
    fn receive(&self, direction: Direction, data: &[u8], queue: &mpsc::UnboundedSender<Queued>) {
        if self.blackhole.load(Ordering::Relaxed) || self.lose(direction) {
            tracing::trace!(?direction, len = data.len(), "relay drops a packet");
            self.count_drop();
            return;
        }
        let delay = Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed));
        let packet = Queued {
            due: Instant::now() + delay,
            data: Bytes::copy_from_slice(data),
        };
        // The queue task only ends when the relay stops, and this task with it.
        let _ = queue.send(packet);
    }

    /// Whether the loss setting takes this packet.
    fn lose(&self, direction: Direction) -> bool {
        let share = f64::from_bits(self.loss.load(Ordering::Relaxed));
        share > 0.0 && lock(&self.rng[direction as usize]).next_f64() < share
    }

    fn count_send(&self, direction: Direction, len: usize) {
        self.packets[direction as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[direction as usize].fetch_add(len as u64, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn stats(&self) -> RelayStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RelayStats {
            up_packets: load(&self.packets[Direction::Up as usize]),
            up_bytes: load(&self.bytes[Direction::Up as usize]),
            down_packets: load(&self.packets[Direction::Down as usize]),
            down_bytes: load(&self.bytes[Direction::Down as usize]),
            dropped: load(&self.dropped),
        }
    }
}

/// Reads client packets on the listening socket, learning the client's latest address.
async fn read_client(
    shared: Arc<Shared>,
    listener: Arc<UdpSocket>,
    queue: mpsc::UnboundedSender<Queued>,
) {
    let mut buf = vec![0u8; BUF];
    loop {
        let (len, from) = match listener.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "relay cannot read from the client");
                continue;
            }
        };
        let mut client = lock(&shared.client);
        if *client != Some(from) {
            tracing::debug!(client = %from, "relay client address");
            *client = Some(from);
        }
        drop(client);
        shared.receive(Direction::Up, &buf[..len], &queue);
    }
}

/// Reads replies on one upstream socket, until a rebind replaces it.
async fn read_upstream(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    queue: mpsc::UnboundedSender<Queued>,
) {
    let mut buf = vec![0u8; BUF];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, _)) => shared.receive(Direction::Down, &buf[..len], &queue),
            Err(error) => tracing::debug!(%error, "relay cannot read from the upstream"),
        }
    }
}

/// Sends one direction's queued packets on, each when it is due, in order.
async fn deliver(
    shared: Arc<Shared>,
    direction: Direction,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    listener: Arc<UdpSocket>,
) {
    while let Some(Queued { due, data }) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        if shared.blackhole.load(Ordering::Relaxed) {
            shared.count_drop();
            continue;
        }
        let (socket, to) = match direction {
            Direction::Up => (lock(&shared.out).socket.clone(), *lock(&shared.upstream)),
            Direction::Down => match *lock(&shared.client) {
                Some(client) => (listener.clone(), client),
                // Unreachable in practice: a reply needs a client packet first.
                None => {
                    shared.count_drop();
                    continue;
                }
            },
        };
        match socket.send_to(&data, to).await {
            Ok(_) => shared.count_send(direction, data.len()),
            Err(error) => {
                tracing::debug!(?direction, %to, %error, "relay cannot send");
                shared.count_drop();
            }
        }
    }
}

/// A new UDP socket on `127.0.0.1:0`, without awaiting (for `rebind`, which is not async).
fn bind_loopback() -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Locks a mutex, ignoring poison: the data behind these locks is valid after any panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// xorshift64*: a small fast generator, plenty for deciding packet loss.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    /// Spreads `seed` with splitmix64; the state is never zero.
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    /// A uniform value in `0.0..1.0`.
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        // The top 53 bits make an exact f64 fraction.
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}
