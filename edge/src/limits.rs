//! Bounds that keep one client, one tunnel or one devbox from starving the others: connections
//! per client address, requests in flight per devbox, a request rate per tunnel, and failed
//! admin calls per client. Each is a small counter behind a mutex; a map entry exists only
//! while it is in use (connections, streams) or for tunnels and clients that exist (rates).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The public listeners' bounds (`[limits]` in the edge config).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Request line and headers, in bytes (HTTP/1.1; it is also the connection's read buffer,
    /// so at least 8 KiB), or the header list (HTTP/2); 431 past it.
    pub max_head_bytes: usize,
    /// Header lines in a request head; 431 past it.
    pub max_headers: usize,
    /// Time to receive a request head, an idle keep-alive connection included.
    pub head_timeout: Duration,
    /// An upgraded connection (WebSocket) with no bytes either way for this long is closed.
    pub upgrade_idle: Duration,
    /// Open connections per client IP address; more are closed at once.
    pub connections_per_client: usize,
    /// Requests in flight per devbox (open streams to its agent); more get 503.
    pub streams_per_devbox: usize,
    /// Requests per second per tunnel, on average; 0: unlimited. More get 429.
    pub rate: u32,
    /// Requests a tunnel may make at once above `rate`.
    pub burst: u32,
    /// Failed admin calls (bad or missing token) per client IP address per minute; more get 429.
    pub admin_failures: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 32 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(10),
            upgrade_idle: Duration::from_secs(3600),
            connections_per_client: 256,
            streams_per_devbox: 1024,
            rate: 1000,
            burst: 2000,
            admin_failures: 10,
        }
    }
}

/// Counts something per key, up to a maximum each; a [`Slot`] gives its unit back on drop.
#[derive(Debug)]
pub struct PerKey<K: Eq + Hash> {
    max: usize,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash + Clone> PerKey<K> {
    /// At most `max` units per key.
    pub fn new(max: usize) -> Self {
        PerKey {
            max,
            counts: Arc::default(),
        }
    }

    /// Takes a unit for `key`, or `None` if it has `max` already.
    pub fn acquire(&self, key: &K) -> Option<Slot<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            key: key.clone(),
            counts: self.counts.clone(),
        })
    }

    /// Units taken for `key` now.
    pub fn count(&self, key: &K) -> usize {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(key).copied().unwrap_or(0)
    }
}

/// One unit of a [`PerKey`] count, returned on drop.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash> {
    key: K,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Token buckets per key: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub struct Rate<K: Eq + Hash> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets untouched this long are full again and are dropped from the map.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// The map is swept of full buckets when it grows past this.
const SWEEP_AT: usize = 4096;

impl<K: Eq + Hash + Clone> Rate<K> {
    /// `rate` per second with bursts up to `burst`; a rate of 0 lets everything through.
    pub fn new(rate: f64, burst: f64) -> Self {
        Rate {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token for `key`; `Err(wait)` says how long until one is available.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, b| now.duration_since(b.at) < FORGET_AFTER);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let earned = now.duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + earned).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    /// Whether `key` has a token, without taking one.
    pub fn has(&self, key: &K) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        buckets
            .get(key)
            .is_none_or(|b| b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate >= 1.0)
    }
}

/// Per client address: IPv6 clients are counted per /64, the block one host usually holds.
pub fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_and_give_back() {
        let per = PerKey::new(2);
        let a = per.acquire(&"a").expect("first");
        let _b = per.acquire(&"a").expect("second");
        assert!(per.acquire(&"a").is_none(), "third is over the limit");
        assert!(per.acquire(&"b").is_some(), "other keys are apart");
        drop(a);
        assert_eq!(per.count(&"a"), 1);
        assert!(per.acquire(&"a").is_some());
    }

    #[test]
    fn empty_keys_leave_the_map() {
        let per = PerKey::new(1);
        drop(per.acquire(&1u8));
        assert!(per.counts.lock().expect("lock").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_allows_bursts_then_refills() {
        let rate = Rate::new(10.0, 3.0);
        for _ in 0..3 {
            assert!(rate.take(&"t").is_ok());
        }
        let wait = rate.take(&"t").expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(!rate.has(&"t"));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(rate.has(&"t"));
        assert!(rate.take(&"t").is_ok());
        assert!(rate.take(&"u").is_ok(), "other keys have their own bucket");
        assert!(Rate::new(0.0, 0.0).take(&"t").is_ok(), "0 is unlimited");
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("addr");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("addr");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("addr");
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("addr");
        assert_eq!(
            client_key(mapped),
            "192.0.2.1".parse::<IpAddr>().expect("addr")
        );
    }
}
