//! Bounds on agent connections before their hello is accepted. Until then a connection is
//! anyone's: it costs the edge a handshake and the connection's state, so the edge holds only so
//! many at once, overall and per source address, and makes a crowd prove its addresses first.
//!
//! - Each handshake, from the `Incoming` to the accepted hello (or its failure, or the hello
//!   deadline), holds a [`Place`]: one of `limits.agent_handshakes` (4096) overall and one of
//!   `limits.agent_handshakes_per_source` (512) for the source address (per /64 for IPv6, as
//!   client connections are counted).
//! - Once a quarter of the places overall are taken, a source that has not proved its address
//!   gets a stateless QUIC retry first (one round trip, nothing kept): a flood from spoofed
//!   addresses then takes no places at all.
//! - Past either bound the Initial packet is ignored: nothing is sent back (an attacker learns
//!   nothing and reflects nothing), and a real agent's QUIC stack sends it again after its
//!   probe timeout, a few hundred milliseconds, by when places are usually free again. During
//!   a reconnect storm (an edge restart with thousands of agents behind one NAT address) this
//!   spreads the handshakes out instead of failing them.
//!
//! What a connection may send before its hello is accepted is bounded by its transport
//! settings ([`crate::certs::agents_server_config`]): one stream and a small connection window,
//! raised when the hello is accepted.

use std::net::IpAddr;

use crate::limits::{self, PerKey, Slot};

/// The handshakes in progress.
#[derive(Debug)]
pub struct Handshakes {
    max: usize,
    overall: PerKey<()>,
    per_source: PerKey<IpAddr>,
}

/// A handshake's place among those in progress, given back on drop.
#[derive(Debug)]
pub struct Place {
    _overall: Slot<()>,
    _source: Slot<IpAddr>,
}

/// What to do with a new connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Go on with the handshake, holding this place until the hello is accepted.
    Admitted(Place),
    /// Ask the source to prove its address (a QUIC retry) before it gets a place.
    Retry,
    /// Drop the packet: too many handshakes overall (`"handshakes"`) or from this source
    /// (`"handshakes_per_source"`), as counted in `burrow_edge_limited_total`.
    Ignore(&'static str),
}

impl Handshakes {
    /// At most `max` handshakes at once, `per_source` of them from one source address.
    pub fn new(max: usize, per_source: usize) -> Handshakes {
        Handshakes {
            max,
            overall: PerKey::new(max),
            per_source: PerKey::new(per_source),
        }
    }

    /// Decides on a connection attempt from `source`; `validated` when QUIC has already proved
    /// the address (a retry token came back).
    pub fn admit(&self, source: IpAddr, validated: bool) -> Admission {
        if !validated && self.overall.count(&()) >= self.max / 4 {
            return Admission::Retry;
        }
        let Some(overall) = self.overall.acquire(&()) else {
            return Admission::Ignore("handshakes");
        };
        let Some(source) = self.per_source.acquire(&limits::client_key(source)) else {
            return Admission::Ignore("handshakes_per_source");
        };
        Admission::Admitted(Place {
            _overall: overall,
            _source: source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn places_are_bounded_per_source_and_overall_and_given_back() {
        let h = Handshakes::new(8, 2);
        let a1 = h.admit(ip("192.0.2.1"), true);
        let a2 = h.admit(ip("192.0.2.1"), true);
        assert!(matches!(a1, Admission::Admitted(_)) && matches!(a2, Admission::Admitted(_)));
        assert!(matches!(
            h.admit(ip("192.0.2.1"), true),
            Admission::Ignore("handshakes_per_source")
        ));
        // Another source is not held back by the first.
        let b = h.admit(ip("192.0.2.2"), true);
        assert!(matches!(b, Admission::Admitted(_)));
        drop(a1);
        assert!(matches!(
            h.admit(ip("192.0.2.1"), true),
            Admission::Admitted(_)
        ));
    }

    #[test]
    fn a_crowd_must_prove_its_addresses_and_the_total_holds() {
        let h = Handshakes::new(8, 100);
        let held: Vec<_> = (0..2)
            .map(|i| h.admit(ip(&format!("192.0.2.{i}")), false))
            .collect();
        assert!(held.iter().all(|a| matches!(a, Admission::Admitted(_))));
        // A quarter taken: unproved addresses are asked to retry, proved ones go on.
        assert!(matches!(
            h.admit(ip("198.51.100.1"), false),
            Admission::Retry
        ));
        let more: Vec<_> = (0..6)
            .map(|i| h.admit(ip(&format!("198.51.100.{i}")), true))
            .collect();
        assert!(more.iter().all(|a| matches!(a, Admission::Admitted(_))));
        assert!(matches!(
            h.admit(ip("203.0.113.1"), true),
            Admission::Ignore("handshakes")
        ));
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let h = Handshakes::new(100, 1);
        let _a = h.admit(ip("2001:db8::1"), true);
        assert!(matches!(
            h.admit(ip("2001:db8::2"), true),
            Admission::Ignore("handshakes_per_source")
        ));
        assert!(matches!(
            h.admit(ip("2001:db8:0:1::1"), true),
            Admission::Admitted(_)
        ));
    }
}
