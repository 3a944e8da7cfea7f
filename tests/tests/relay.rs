//! The fault-injection relay on its own, between two plain UDP sockets: one stands in for the
//! agent (the client), the other for the edge (the upstream).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use burrow_tests::WAIT;
use burrow_tests::relay::{Relay, RelayStats};
use tokio::net::UdpSocket;
use tokio::time::timeout;

/// How long a test listens to show that a packet does not arrive.
const QUIET: Duration = Duration::from_millis(200);

/// A client and an upstream with a relay between them.
struct Path {
    relay: Relay,
    client: UdpSocket,
    upstream: UdpSocket,
}

impl Path {
    async fn start() -> Path {
        burrow_tests::init_tracing();
        let upstream = socket().await;
        let relay = Relay::start(upstream.local_addr().expect("addr")).await;
        Path {
            relay,
            client: socket().await,
            upstream,
        }
    }

    /// Sends `data` from the client and returns the address the upstream saw it come from.
    async fn up(&self, data: &[u8]) -> SocketAddr {
        send(&self.client, data, self.relay.addr()).await;
        let (got, from) = recv(&self.upstream).await;
        assert_eq!(got, data, "the upstream receives what the client sent");
        from
    }

    /// Sends `data` from the upstream to `via` (the relay's upstream side); the client gets it.
    async fn down(&self, via: SocketAddr, data: &[u8]) {
        send(&self.upstream, data, via).await;
        let (got, from) = recv(&self.client).await;
        assert_eq!(got, data, "the client receives what the upstream sent");
        assert_eq!(
            from,
            self.relay.addr(),
            "replies come from the address the client dials"
        );
    }
}

async fn socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind")
}

async fn send(socket: &UdpSocket, data: &[u8], to: SocketAddr) {
    socket.send_to(data, to).await.expect("send");
}

async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0; 65536];
    let (len, from) = timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("a packet arrives in time")
        .expect("recv");
    buf.truncate(len);
    (buf, from)
}

/// Asserts that nothing arrives on `socket` for a while.
async fn quiet(socket: &UdpSocket) {
    let mut buf = vec![0; 65536];
    if let Ok(received) = timeout(QUIET, socket.recv_from(&mut buf)).await {
        let (len, from) = received.expect("recv");
        panic!("unexpected packet from {from}: {:?}", &buf[..len]);
    }
}

/// Waits until the relay has settled `count` packets (forwarded or dropped) in all.
async fn settled(relay: &Relay, count: u64) -> RelayStats {
    let total = |s: &RelayStats| s.up_packets + s.down_packets + s.dropped;
    timeout(WAIT, relay.wait_stats(|s| total(s) >= count))
        .await
        .unwrap_or_else(|_| panic!("relay settles {count} packets: {:?}", relay.stats()))
}

fn number(data: &[u8]) -> u32 {
    u32::from_be_bytes(data.try_into().expect("a numbered packet"))
}

#[tokio::test]
async fn packets_pass_both_ways() {
    let path = Path::start().await;
    let via = path.up(b"ping").await;
    assert_ne!(
        via,
        path.client.local_addr().expect("addr"),
        "the relay is in the path"
    );
    path.down(via, b"pong").await;
    assert_eq!(
        path.up(b"again").await,
        via,
        "one upstream socket until a rebind"
    );
    path.down(via, b"again").await;
}

#[tokio::test]
async fn blackhole_drops_both_ways_then_heals() {
    let path = Path::start().await;
    let via = path.up(b"hello").await;
    path.down(via, b"hello").await;
    path.relay.reset_stats();

    path.relay.set_blackhole(true);
    send(&path.client, b"lost up", path.relay.addr()).await;
    send(&path.upstream, b"lost down", via).await;
    quiet(&path.upstream).await;
    quiet(&path.client).await;
    let stats = settled(&path.relay, 2).await;
    assert_eq!(
        stats,
        RelayStats {
            dropped: 2,
            ..RelayStats::default()
        }
    );

    path.relay.set_blackhole(false);
    assert_eq!(path.up(b"healed").await, via);
    path.down(via, b"healed").await;
}

#[tokio::test]
async fn a_packet_received_in_a_blackhole_stays_lost_after_it() {
    let path = Path::start().await;
    let via = path.up(b"hello").await;
    path.relay.reset_stats();
    path.relay.set_delay(Duration::from_millis(100));

    path.relay.set_blackhole(true);
    send(&path.client, b"during", path.relay.addr()).await;
    send(&path.upstream, b"during", via).await;
    settled(&path.relay, 2).await;
    // Healed before those packets would have been due: they are lost all the same.
    path.relay.set_blackhole(false);
    quiet(&path.upstream).await;
    quiet(&path.client).await;
    assert_eq!(path.up(b"after").await, via);
    path.down(via, b"after").await;
}

#[tokio::test]
async fn loss_of_all_drops_everything_and_loss_of_none_nothing() {
    let path = Path::start().await;
    let via = path.up(b"hello").await;
    path.relay.reset_stats();

    path.relay.set_loss(1.0);
    for i in 0..100u32 {
        send(&path.client, &i.to_be_bytes(), path.relay.addr()).await;
        send(&path.upstream, &i.to_be_bytes(), via).await;
    }
    let stats = settled(&path.relay, 200).await;
    assert_eq!(
        stats,
        RelayStats {
            dropped: 200,
            ..RelayStats::default()
        }
    );
    quiet(&path.upstream).await;
    quiet(&path.client).await;

    path.relay.set_loss(0.0);
    path.relay.reset_stats();
    for i in 0..200u32 {
        assert_eq!(path.up(&i.to_be_bytes()).await, via);
        path.down(via, &i.to_be_bytes()).await;
    }
    assert_eq!(path.relay.stats().dropped, 0);
}

/// Sends 2000 numbered packets from `from` to `to` at a loss of one half, in batches that the
/// relay settles before the next (so no socket buffer overflows), and returns what `receiver`
/// got.
async fn half_lost(
    relay: &Relay,
    from: &UdpSocket,
    to: SocketAddr,
    receiver: &UdpSocket,
) -> (Vec<u32>, RelayStats) {
    relay.reset_stats();
    relay.set_loss(0.5);
    let mut got = Vec::new();
    for batch in 0..20u32 {
        for i in batch * 100..(batch + 1) * 100 {
            send(from, &i.to_be_bytes(), to).await;
        }
        let stats = settled(relay, u64::from(batch + 1) * 100).await;
        let forwarded = stats.up_packets + stats.down_packets;
        // Forwarded packets are already in the receiver's buffer (loopback).
        while (got.len() as u64) < forwarded {
            got.push(number(&recv(receiver).await.0));
        }
    }
    quiet(receiver).await;
    relay.set_loss(0.0);
    (got, relay.stats())
}

#[tokio::test]
async fn loss_of_half_drops_about_half_each_way() {
    let path = Path::start().await;
    let via = path.up(b"hello").await;

    for (direction, from, to, receiver) in [
        ("up", &path.client, path.relay.addr(), &path.upstream),
        ("down", &path.upstream, via, &path.client),
    ] {
        let (got, stats) = half_lost(&path.relay, from, to, receiver).await;
        assert_eq!(
            got.len() as u64 + stats.dropped,
            2000,
            "{direction}: {stats:?}"
        );
        assert!(
            (600..=1400).contains(&stats.dropped),
            "{direction}: about half dropped: {stats:?}"
        );
        assert!(got.is_sorted(), "{direction}: loss keeps the order");
    }
}

/// Sends 20 numbered packets back to back through a relay delaying by 100 ms; checks each.
async fn delayed(from: &UdpSocket, to: SocketAddr, receiver: &UdpSocket) {
    let delay = Duration::from_millis(100);
    let mut sent = Vec::new();
    for i in 0..20u32 {
        sent.push(Instant::now());
        send(from, &i.to_be_bytes(), to).await;
    }
    for (i, at) in sent.iter().enumerate() {
        let (data, _) = recv(receiver).await;
        assert_eq!(number(&data) as usize, i, "delay keeps the order");
        let elapsed = at.elapsed();
        assert!(elapsed >= delay, "packet {i} delayed only {elapsed:?}");
    }
    // One packet after another, 20 delays would take 2 s: the delays must overlap.
    let all = sent[0].elapsed();
    assert!(all < Duration::from_secs(1), "delays add up: {all:?}");
}

#[tokio::test]
async fn delay_holds_each_packet_and_keeps_order() {
    let path = Path::start().await;
    let via = path.up(b"hello").await;
    path.relay.set_delay(Duration::from_millis(100));
    delayed(&path.client, path.relay.addr(), &path.upstream).await;
    delayed(&path.upstream, via, &path.client).await;
}

#[tokio::test]
async fn rebind_changes_the_source_port_and_replies_still_arrive() {
    let path = Path::start().await;
    let before = path.up(b"before").await;
    path.down(before, b"before").await;

    path.relay.rebind();
    let after = path.up(b"after").await;
    assert_ne!(after.port(), before.port(), "a new source port upstream");
    assert_eq!(after.ip(), before.ip());
    path.down(after, b"to the new port").await;

    // The lost mapping: replies to the old port go nowhere.
    send(&path.upstream, b"to the old port", before).await;
    quiet(&path.client).await;
    assert_eq!(path.up(b"still new").await, after);
}

#[tokio::test]
async fn replies_follow_the_clients_latest_port() {
    let path = Path::start().await;
    let via = path.up(b"first socket").await;
    path.down(via, b"to the first").await;

    let second = socket().await;
    send(&second, b"second socket", path.relay.addr()).await;
    let (data, from) = recv(&path.upstream).await;
    assert_eq!((data.as_slice(), from), (&b"second socket"[..], via));
    send(&path.upstream, b"to the second", via).await;
    let (data, from) = recv(&second).await;
    assert_eq!(
        (data.as_slice(), from),
        (&b"to the second"[..], path.relay.addr())
    );
    quiet(&path.client).await;
}

#[tokio::test]
async fn set_upstream_redirects_packets() {
    let path = Path::start().await;
    path.up(b"to the first").await;

    let restarted = socket().await;
    path.relay
        .set_upstream(restarted.local_addr().expect("addr"));
    send(&path.client, b"to the second", path.relay.addr()).await;
    let (data, via) = recv(&restarted).await;
    assert_eq!(data, b"to the second");
    quiet(&path.upstream).await;
    path.down(via, b"from the second").await;
}

#[tokio::test]
async fn stats_count_packets_bytes_and_drops() {
    let path = Path::start().await;
    let via = path.up(b"abc").await;
    path.up(b"defgh").await;
    path.down(via, b"ijklmno").await;
    let stats = settled(&path.relay, 3).await;
    let expected = RelayStats {
        up_packets: 2,
        up_bytes: 8,
        down_packets: 1,
        down_bytes: 7,
        dropped: 0,
    };
    assert_eq!(stats, expected);

    path.relay.set_blackhole(true);
    send(&path.client, b"dropped", path.relay.addr()).await;
    let stats = settled(&path.relay, 4).await;
    assert_eq!(
        stats,
        RelayStats {
            dropped: 1,
            ..expected
        }
    );

    path.relay.reset_stats();
    assert_eq!(path.relay.stats(), RelayStats::default());
    path.relay.set_blackhole(false);
    path.down(via, b"xy").await;
    let stats = settled(&path.relay, 1).await;
    assert_eq!(
        stats,
        RelayStats {
            down_packets: 1,
            down_bytes: 2,
            ..RelayStats::default()
        }
    );
}

#[tokio::test]
async fn dropping_the_relay_stops_it() {
    let Path {
        relay,
        client,
        upstream,
    } = Path::start().await;
    let addr = relay.addr();
    send(&client, b"hello", addr).await;
    let (_, via) = recv(&upstream).await;

    drop(relay);
    send(&client, b"after drop", addr).await;
    send(&upstream, b"after drop", via).await;
    quiet(&upstream).await;
    quiet(&client).await;
}
