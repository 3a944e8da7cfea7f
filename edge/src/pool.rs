//! Idle HTTP/1.1 connections to devbox services, kept for the next request. Each is a QUIC
//! stream to the agent, which holds a TCP connection to the service at the other end: reusing it
//! saves the stream's open-and-answer round trip, the agent's dial and the service's accept.
//!
//! A connection enters the pool when its answer has been read to its end and it can take
//! another request ([`Reply::on_done`](crate::h1::Reply::on_done)); it is keyed by the agent
//! connection and the port, so a reconnected agent never gets a request on its old
//! connection. Idle connections expire.
//!
//! An idle connection still holds what a request holds: one of the agent's streams
//! (`forward.max_streams`) and one of its devbox's places (`limits.streams_per_devbox`, the
//! [`Slot`] it keeps). So the pool gives them up before a request would be refused for them:
//! past `agents.pool_max_idle_total` a returned connection closes the oldest idle one (rather
//! than being dropped itself: its port is in use now, while the oldest is the likeliest to sit
//! unused until it expires, or to have been closed by the service's own keep-alive timeout); a
//! devbox at its limit closes its oldest ([`Pool::evict_for_devbox`]); an agent out of streams
//! has its idle ones closed ([`Pool::evict_conn`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::h1::Conn;
use crate::limits::Slot;
use crate::metrics::Metrics;

/// Which connections can serve a request: the agent connection's id and the port.
pub type Key = (usize, u16);

/// Idle connections, by key.
#[derive(Debug)]
pub struct Pool {
    shelf: Mutex<Shelf<Idle>>,
    /// Whether any connection is kept (neither maximum is 0).
    keeps: bool,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
    /// The devbox's place among its streams (`limits.streams_per_devbox`), kept while idle.
    slot: Slot<String>,
}

/// Why idle connections left the pool unused (`burrow_edge_pool_evictions_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eviction {
    /// The oldest, for a returned connection past `agents.pool_max_idle_total`.
    TotalCap,
    /// The devbox's oldest, for a request of a devbox at `limits.streams_per_devbox`.
    DevboxLimit,
    /// All on an agent connection whose agent refused a stream for lack of them.
    AgentStreams,
    /// Idle for `agents.pool_idle`.
    Expired,
    /// Closed by the service or the agent.
    Closed,
}

impl Eviction {
    /// The metric label.
    fn as_str(self) -> &'static str {
        match self {
            Eviction::TotalCap => "total_cap",
            Eviction::DevboxLimit => "devbox_limit",
            Eviction::AgentStreams => "agent_streams",
            Eviction::Expired => "expired",
            Eviction::Closed => "closed",
        }
    }
}

impl Pool {
    /// A pool keeping at most `max_per_key` idle connections per key and `max_total` in all,
    /// each for `idle_timeout`. A task sweeps expired ones while the pool lives.
    pub fn new(
        max_per_key: usize,
        max_total: usize,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        let shelf = Shelf::new(max_per_key, max_total);
        let pool = Arc::new(Pool {
            keeps: shelf.keeps_any(),
            shelf: Mutex::new(shelf),
            idle_timeout,
            metrics,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(sweep(weak, idle_timeout));
        pool
    }

    /// An idle connection for `key` that can take a request now, if there is one. The
    /// request holds a place of its own, so the connection's is given back.
    pub fn checkout(&self, key: Key) -> Option<Conn> {
        let mut dropped = Vec::new();
        let found = {
            let mut shelf = self.lock();
            let found = loop {
                let Some(mut idle) = shelf.take_newest(key) else {
                    break None;
                };
                if idle.since.elapsed() < self.idle_timeout && idle.conn.is_usable() {
                    break Some(idle);
                }
                dropped.push(idle);
            };
            self.counted(&shelf);
            found
        };
        for idle in dropped {
            self.evicted(self.expired_or_closed(&idle), 1);
        }
        found.map(|idle| idle.conn)
    }

    /// Gives back a connection whose answer has been read to its end, with the devbox's `slot`
    /// its request held.
    pub fn checkin(&self, key: Key, conn: Conn, slot: Slot<String>) {
        if !self.keeps {
            return;
        }
        let devbox = slot.key().clone();
        let idle = Idle {
            conn,
            since: Instant::now(),
            slot,
        };
        // Whatever leaves the pool is dropped after the lock: a dropped slot and connection
        // touch other locks.
        let shelved = {
            let mut shelf = self.lock();
            let shelved = shelf.insert(key, &devbox, idle);
            self.counted(&shelf);
            shelved
        };
        if let Ok(Some(_oldest)) = shelved {
            self.evicted(Eviction::TotalCap, 1);
        }
    }

    /// Closes the oldest idle connection of `devbox` and hands over the place it held, for a
    /// request of a devbox at its `limits.streams_per_devbox`; `None` when it has none idle.
    pub fn evict_for_devbox(&self, devbox: &str) -> Option<Slot<String>> {
        let idle = {
            let mut shelf = self.lock();
            let idle = shelf.take_oldest_of(devbox);
            self.counted(&shelf);
            idle?
        };
        self.evicted(Eviction::DevboxLimit, 1);
        Some(idle.slot)
    }

    /// Closes every idle connection on the agent connection `conn_id`, each holding one of the
    /// agent's streams; how many there were.
    pub fn evict_conn(&self, conn_id: usize) -> usize {
        let gone = {
            let mut shelf = self.lock();
            let gone = shelf.take_conn(conn_id);
            self.counted(&shelf);
            gone
        };
        self.evicted(Eviction::AgentStreams, gone.len());
        gone.len()
    }

    /// Idle connections now, all keys together.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shelf<Idle>> {
        self.shelf.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets `burrow_edge_pool_idle` from the shelf, under its lock.
    fn counted(&self, shelf: &Shelf<Idle>) {
        self.metrics
            .pool_idle
            .set(i64::try_from(shelf.len()).unwrap_or(i64::MAX));
    }

    fn evicted(&self, reason: Eviction, n: usize) {
        if n > 0 {
            self.metrics
                .pool_evictions
                .with_label_values(&[reason.as_str()])
                .inc_by(n as u64);
        }
    }

    fn expired_or_closed(&self, idle: &Idle) -> Eviction {
        if idle.since.elapsed() < self.idle_timeout {
            Eviction::Closed
        } else {
            Eviction::Expired
        }
    }
}

/// Drops expired and closed idle connections every `every`, until the pool is gone.
async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let gone = {
            let mut shelf = pool.lock();
            let gone =
                shelf.remove_if(|e| e.since.elapsed() >= pool.idle_timeout || !e.conn.is_usable());
            pool.counted(&shelf);
            gone
        };
        for idle in gone {
            pool.evicted(pool.expired_or_closed(&idle), 1);
        }
    }
}

/// Idle entries, found three ways: by age (past the total cap the oldest goes), by key (a
/// request takes the newest of its key, the one least likely closed by the service's own
/// keep-alive timeout), by devbox (a devbox at its limit gives up its oldest). No clock, no
/// I/O: every operation is a few ordered-map steps, whatever the number of entries.
#[derive(Debug)]
struct Shelf<T> {
    max_per_key: usize,
    max_total: usize,
    /// The next entry's number: entries are numbered in the order they came in.
    next: u64,
    entries: BTreeMap<u64, Entry<T>>,
    by_key: BTreeMap<Key, BTreeSet<u64>>,
    by_devbox: BTreeMap<String, BTreeSet<u64>>,
}

#[derive(Debug)]
struct Entry<T> {
    key: Key,
    devbox: String,
    item: T,
}

impl<T> Shelf<T> {
    fn new(max_per_key: usize, max_total: usize) -> Self {
        Shelf {
            max_per_key,
            max_total,
            next: 0,
            entries: BTreeMap::new(),
            by_key: BTreeMap::new(),
            by_devbox: BTreeMap::new(),
        }
    }

    /// Whether anything would be kept at all.
    fn keeps_any(&self) -> bool {
        self.max_per_key > 0 && self.max_total > 0
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keeps `item` for `key` and `devbox`: `Ok(Some(oldest))` when the total cap made room by
    /// taking out the oldest entry, `Err(item)` when `key` has its maximum already (the
    /// returned connection goes, not one of the others: they are as fresh, and as useful).
    fn insert(&mut self, key: Key, devbox: &str, item: T) -> Result<Option<T>, T> {
        let per_key = self.by_key.get(&key).map_or(0, BTreeSet::len);
        if !self.keeps_any() || per_key >= self.max_per_key {
            return Err(item);
        }
        let oldest = if self.len() >= self.max_total {
            self.take_oldest()
        } else {
            None
        };
        let n = self.next;
        self.next += 1;
        self.by_key.entry(key).or_default().insert(n);
        match self.by_devbox.get_mut(devbox) {
            Some(set) => {
                set.insert(n);
            }
            None => {
                self.by_devbox
                    .insert(devbox.to_owned(), BTreeSet::from([n]));
            }
        }
        let devbox = devbox.to_owned();
        self.entries.insert(n, Entry { key, devbox, item });
        Ok(oldest)
    }

    /// The newest entry of `key`.
    fn take_newest(&mut self, key: Key) -> Option<T> {
        let n = *self.by_key.get(&key)?.last()?;
        self.remove(n)
    }

    /// The oldest entry of all.
    fn take_oldest(&mut self) -> Option<T> {
        let n = *self.entries.keys().next()?;
        self.remove(n)
    }

    /// The oldest entry of `devbox`.
    fn take_oldest_of(&mut self, devbox: &str) -> Option<T> {
        let n = *self.by_devbox.get(devbox)?.first()?;
        self.remove(n)
    }

    /// Every entry on the agent connection `conn_id`, all ports.
    fn take_conn(&mut self, conn_id: usize) -> Vec<T> {
        let numbers: Vec<u64> = self
            .by_key
            .range((conn_id, 0)..=(conn_id, u16::MAX))
            .flat_map(|(_, set)| set.iter().copied())
            .collect();
        numbers.into_iter().filter_map(|n| self.remove(n)).collect()
    }

    /// Takes out every entry `gone` says so of.
    fn remove_if(&mut self, mut gone: impl FnMut(&mut T) -> bool) -> Vec<T> {
        let numbers: Vec<u64> = self
            .entries
            .iter_mut()
            .filter_map(|(n, e)| gone(&mut e.item).then_some(*n))
            .collect();
        numbers.into_iter().filter_map(|n| self.remove(n)).collect()
    }

    fn remove(&mut self, n: u64) -> Option<T> {
        let entry = self.entries.remove(&n)?;
        unlink(&mut self.by_key, &entry.key, n);
        unlink(&mut self.by_devbox, entry.devbox.as_str(), n);
        Some(entry.item)
    }
}

/// Takes `n` out of `map[k]`, and `k` out of `map` once it has none left.
fn unlink<K, Q>(map: &mut BTreeMap<K, BTreeSet<u64>>, k: &Q, n: u64)
where
    K: Ord + std::borrow::Borrow<Q>,
    Q: Ord + ?Sized,
{
    if let Some(set) = map.get_mut(k) {
        set.remove(&n);
        if set.is_empty() {
            map.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Key = (1, 3000);
    const B: Key = (1, 4000);
    const C: Key = (2, 3000);

    #[test]
    fn a_request_takes_the_newest_of_its_key() {
        let mut shelf = Shelf::new(4, 10);
        for (key, item) in [(A, "a1"), (B, "b1"), (A, "a2")] {
            assert_eq!(shelf.insert(key, "d1", item), Ok(None));
        }
        assert_eq!(shelf.take_newest(A), Some("a2"));
        assert_eq!(shelf.take_newest(A), Some("a1"));
        assert_eq!(shelf.take_newest(A), None);
        assert_eq!(shelf.len(), 1);
    }

    #[test]
    fn past_the_total_cap_the_oldest_of_all_keys_goes() {
        let mut shelf = Shelf::new(4, 3);
        for (key, item) in [(A, "a1"), (B, "b1"), (C, "c1")] {
            assert_eq!(shelf.insert(key, "d1", item), Ok(None));
        }
        assert_eq!(
            shelf.insert(B, "d2", "b2"),
            Ok(Some("a1")),
            "a1 is the oldest"
        );
        assert_eq!(shelf.insert(C, "d2", "c2"), Ok(Some("b1")));
        assert_eq!(shelf.len(), 3, "the cap holds");
        assert_eq!(shelf.take_newest(A), None, "A's only entry went first");
        assert!(!shelf.by_key.contains_key(&A), "no empty index is left");
    }

    #[test]
    fn past_the_key_cap_the_returned_one_goes() {
        let mut shelf = Shelf::new(2, 10);
        assert_eq!(shelf.insert(A, "d1", "a1"), Ok(None));
        assert_eq!(shelf.insert(A, "d1", "a2"), Ok(None));
        assert_eq!(shelf.insert(A, "d1", "a3"), Err("a3"));
        assert_eq!(
            shelf.insert(B, "d1", "b1"),
            Ok(None),
            "another key has room"
        );
    }

    #[test]
    fn zero_keeps_nothing() {
        assert_eq!(Shelf::new(0, 10).insert(A, "d1", 1), Err(1));
        assert_eq!(Shelf::new(10, 0).insert(A, "d1", 1), Err(1));
        assert!(!Shelf::<u8>::new(10, 0).keeps_any());
    }

    #[test]
    fn a_devbox_gives_up_its_oldest() {
        let mut shelf = Shelf::new(4, 10);
        for (key, devbox, item) in [(A, "d1", "a1"), (C, "d2", "c1"), (B, "d1", "b1")] {
            assert_eq!(shelf.insert(key, devbox, item), Ok(None));
        }
        assert_eq!(shelf.take_oldest_of("d1"), Some("a1"));
        assert_eq!(shelf.take_oldest_of("d1"), Some("b1"));
        assert_eq!(shelf.take_oldest_of("d1"), None);
        assert_eq!(shelf.take_oldest_of("d3"), None, "unknown devbox");
        assert_eq!(shelf.len(), 1, "the other devbox keeps its own");
        assert!(!shelf.by_devbox.contains_key("d1"));
    }

    #[test]
    fn an_agent_connection_gives_up_all_its_ports() {
        let mut shelf = Shelf::new(4, 10);
        for (key, item) in [
            (A, "a1"),
            (C, "c1"),
            (B, "b1"),
            (A, "a2"),
            ((1, u16::MAX), "z"),
        ] {
            assert_eq!(shelf.insert(key, "d1", item), Ok(None));
        }
        let mut gone = shelf.take_conn(1);
        gone.sort_unstable();
        assert_eq!(gone, ["a1", "a2", "b1", "z"]);
        assert_eq!(shelf.take_conn(1), Vec::<&str>::new());
        assert_eq!(
            shelf.take_newest(C),
            Some("c1"),
            "connection 2 keeps its own"
        );
        assert_eq!(shelf.len(), 0);
        assert!(shelf.by_key.is_empty() && shelf.by_devbox.is_empty());
    }

    #[test]
    fn remove_if_takes_out_of_every_index() {
        let mut shelf = Shelf::new(4, 10);
        for (key, item) in [(A, 1), (B, 2), (A, 3), (C, 4)] {
            assert_eq!(shelf.insert(key, "d1", item), Ok(None));
        }
        let gone = shelf.remove_if(|item| *item % 2 == 1);
        assert_eq!(gone, [1, 3]);
        assert_eq!(shelf.take_newest(A), None);
        assert_eq!(shelf.take_oldest_of("d1"), Some(2));
        assert_eq!(shelf.take_oldest(), Some(4));
        assert!(shelf.entries.is_empty() && shelf.by_key.is_empty() && shelf.by_devbox.is_empty());
    }
}
