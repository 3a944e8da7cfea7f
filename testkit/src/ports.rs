//! Loopback ports for tests, without the bind-drop-rebind race.
//!
//! Binding `:0`, reading the port and closing the socket for a server to bind the port again is
//! a race under parallel tests: between the close and the second bind, any socket bound on `:0`
//! (another test of this process, another test binary, another checkout's tests) may be handed
//! the same port. So a test gets its port one of four ways, best first:
//!
//! - An in-process server takes the bound socket itself: [`tcp_listener`], [`tokio_listener`],
//!   [`udp_socket`].
//! - A child process of ours is given `127.0.0.1:0` and reports the port it bound: the edge
//!   logs `edge listening` with its addresses, `python3 -m http.server 0` prints its port,
//!   Prometheus logs `Listening on`. The suites read it from there.
//! - A test that needs a port where nothing listens holds a [`ClosedPort`]: bound, never
//!   listening, so connections are refused and no one else can take it meanwhile.
//! - A server that must be told its port before it binds it gets a [`ReservedPort`]; its doc
//!   says why that is safe enough.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU32, Ordering};

/// `127.0.0.1:0`.
const ANY_LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// A TCP listener on a port of 127.0.0.1 the kernel chose, for an in-process server.
pub fn tcp_listener() -> TcpListener {
    TcpListener::bind(ANY_LOOPBACK).expect("bind a TCP listener on 127.0.0.1:0")
}

/// [`tcp_listener`] for tokio.
pub async fn tokio_listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind(ANY_LOOPBACK)
        .await
        .expect("bind a TCP listener on 127.0.0.1:0")
}

/// A UDP socket on a port of 127.0.0.1 the kernel chose, for an in-process server or relay.
pub fn udp_socket() -> UdpSocket {
    UdpSocket::bind(ANY_LOOPBACK).expect("bind a UDP socket on 127.0.0.1:0")
}

/// A TCP port of 127.0.0.1 that is bound but never listens: a connection to it is refused at
/// once, and while this lives no other socket can take the port (it is bound without
/// `SO_REUSEADDR`). For "nothing listens on that port" tests.
#[derive(Debug)]
pub struct ClosedPort {
    _socket: socket2::Socket,
    port: u16,
}

impl ClosedPort {
    /// Binds a socket on `127.0.0.1:0` and does not listen on it.
    pub fn new() -> ClosedPort {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .expect("create a TCP socket");
        socket
            .bind(&ANY_LOOPBACK.into())
            .expect("bind a TCP socket on 127.0.0.1:0");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("a bound IPv4 socket has an address")
            .port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// A port of 127.0.0.1, free on TCP and UDP, for a server that has to be told its port before
/// it binds it: a third-party server without a `--port 0` (or whose port must appear in its
/// own configuration), or a setting that must name the port, such as the agent's
/// `metrics.listen`, whose port the agent denies to the tunnel when it reads its config.
///
/// The port is free, not held; this is why that is safe enough:
///
/// - It lies outside the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), from
///   which Linux takes the port of every bind on `:0` and the source port of every outgoing
///   connection. No socket bound on `:0`, in this process or any other, is handed it, and no
///   connection starts from it.
/// - Test processes that use the kit take turns: each reserved port is locked by an abstract
///   Unix socket named after it (`burrow-testkit-port-{port}`), bound for as long as the
///   `ReservedPort` lives and released by the kernel when its holder exits, even by a crash.
///   Two tests never hold the same port at once, whichever process they run in. (A child
///   being spawned holds a copy of the lock from its fork to its exec, so a port just
///   released may stay locked for that moment: the next reservation takes another.)
/// - It was free when reserved: it bound on TCP (with `SO_REUSEADDR`, as servers bind) and on
///   UDP, and those sockets were closed for the server to bind.
///
/// What remains is a program outside the kit that binds this very port, chosen by itself, in
/// the moment between the check and the server's bind. Keep the `ReservedPort` until the
/// server has stopped. Where the ephemeral range leaves no room at all (it covers 1024-65535),
/// the port is taken from anywhere and only the lock and the check stand.
#[derive(Debug)]
pub struct ReservedPort {
    port: u16,
    _lock: UnixDatagram,
}

impl ReservedPort {
    /// Reserves a port; panics if none is left (every candidate in use or locked).
    pub fn new() -> ReservedPort {
        let candidates = candidates();
        let start = usize::try_from(random()).unwrap_or(0) % candidates.len();
        let (head, tail) = candidates.split_at(start);
        for &port in tail.iter().chain(head) {
            let Some(lock) = lock(port) else { continue };
            if free(port) {
                return ReservedPort { port, _lock: lock };
            }
        }
        panic!(
            "no free port to reserve among {} candidates outside the ephemeral range",
            candidates.len()
        )
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:{port}`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(ANY_LOOPBACK.ip(), self.port)
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        ReservedPort::new()
    }
}

/// The ports a [`ReservedPort`] is taken from: those above the ephemeral range, else below it
/// (but above the privileged ports), else all unprivileged ones.
fn candidates() -> Vec<u16> {
    let (low, high) = ephemeral_range();
    let above: Vec<u16> = match high.checked_add(1) {
        Some(first) => (first..=u16::MAX).collect(),
        None => Vec::new(),
    };
    if above.len() >= 256 {
        return above;
    }
    let below: Vec<u16> = (1024..low).collect();
    if below.len() >= 256 {
        return below;
    }
    (1024..=u16::MAX).collect()
}

/// `net.ipv4.ip_local_port_range` (it covers IPv6 too); Linux's default if unreadable.
fn ephemeral_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    match (bounds.next(), bounds.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => (low, high),
        _ => (32768, 60999),
    }
}

/// The lock on `port`: an abstract Unix socket named after it, or `None` if another holds it.
fn lock(port: u16) -> Option<UnixDatagram> {
    let name = format!("burrow-testkit-port-{port}");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?;
    UnixDatagram::bind_addr(&addr).ok()
}

/// Whether `port` binds on 127.0.0.1 now, on TCP and on UDP.
fn free(port: u16) -> bool {
    let addr = SocketAddr::new(ANY_LOOPBACK.ip(), port);
    TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok()
}

/// A different number on each call and in each process (the standard library's random hash
/// keys), to spread the processes' reservations over the candidates.
fn random() -> u64 {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    RandomState::new().hash_one((std::process::id(), call))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_refuses_connections() {
        let closed = ClosedPort::new();
        let err = std::net::TcpStream::connect(("127.0.0.1", closed.port()))
            .expect_err("nothing listens on a closed port");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(
            TcpListener::bind(("127.0.0.1", closed.port())).is_err(),
            "no one else takes a closed port"
        );
    }

    #[test]
    fn a_reserved_port_is_outside_the_ephemeral_range_locked_and_bindable() {
        let (low, high) = ephemeral_range();
        let a = ReservedPort::new();
        let b = ReservedPort::new();
        assert_ne!(a.port(), b.port());
        assert!(
            !(low..=high).contains(&a.port()),
            "{} in {low}-{high}",
            a.port()
        );
        assert!(
            lock(a.port()).is_none(),
            "the port is locked while reserved"
        );
        let server = TcpListener::bind(a.addr()).expect("the server binds the reserved port");
        drop(server);
        let port = a.port();
        drop(a);
        assert!(relocks(port), "the lock goes with the reservation");
    }

    /// Whether `port`'s lock can be taken again within a few seconds. Not at once: a child
    /// that another test of this process is spawning holds a copy of every descriptor, the
    /// lock's included, from its fork until its exec closes them (close-on-exec), and there
    /// is no event to wait on for that.
    fn relocks(port: u16) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if lock(port).is_some() {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
