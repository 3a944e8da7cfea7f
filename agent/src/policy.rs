//! Which local ports the agent forwards to.
//!
//! A [`PortPolicy`] is a shared handle: its clones see the same lists, so a reload (SIGHUP)
//! that [`PortPolicy::replace`]s them applies to every stream from then on, without a restart.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use burrow_protocol::Port;

/// An allow list (empty: every port) and a deny list, deny winning; and the ports whose
/// services speak HTTP/2 only (h2c), for which the edge is told to speak HTTP/2.
#[derive(Debug, Clone)]
pub struct PortPolicy {
    lists: Arc<RwLock<Lists>>,
    /// Bumped on every replace, so running streams can check their port again.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        PortPolicy::new([], [])
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Lists {
    allow: BTreeSet<Port>,
    deny: BTreeSet<Port>,
    http2: BTreeSet<Port>,
}

impl PortPolicy {
    /// A policy from its two lists.
    pub fn new(
        allow: impl IntoIterator<Item = Port>,
        deny: impl IntoIterator<Item = Port>,
    ) -> Self {
        PortPolicy {
            lists: Arc::new(RwLock::new(Lists {
                allow: allow.into_iter().collect(),
                deny: deny.into_iter().collect(),
                http2: BTreeSet::new(),
            })),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Whether a stream to `port` may be forwarded.
    pub fn allows(&self, port: Port) -> bool {
        let lists = self.lists.read().unwrap_or_else(|p| p.into_inner());
        !lists.deny.contains(&port) && (lists.allow.is_empty() || lists.allow.contains(&port))
    }

    /// Marks `ports` as HTTP/2-only (`forward.http2_ports`).
    pub fn with_http2(self, ports: impl IntoIterator<Item = Port>) -> Self {
        self.lists
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .http2
            .extend(ports);
        self
    }

    /// Whether the service on `port` is marked HTTP/2-only.
    pub fn http2_only(&self, port: Port) -> bool {
        let lists = self.lists.read().unwrap_or_else(|p| p.into_inner());
        lists.http2.contains(&port)
    }

    /// Adds a port to the deny list (the agent's own listeners).
    pub fn deny(&mut self, port: Port) {
        self.lists
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .deny
            .insert(port);
    }

    /// Takes the lists of `other` (a reloaded configuration) for every holder of this handle.
    pub fn replace(&self, other: &PortPolicy) {
        let next = other
            .lists
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *self.lists.write().unwrap_or_else(|p| p.into_inner()) = next;
        self.changes.send_modify(|n| *n += 1);
    }

    /// Resolves once a replaced policy no longer allows `port` (a running stream to it is
    /// then cut: a reload that denies a port denies it now, not at the next connection).
    pub async fn denied(&self, port: Port) {
        let mut changes = self.changes.subscribe();
        loop {
            if !self.allows(port) {
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u16) -> Port {
        Port::new(n).unwrap()
    }

    #[test]
    fn empty_allows_everything_and_deny_wins() {
        let mut policy = PortPolicy::default();
        assert!(policy.allows(p(1)) && policy.allows(p(65535)));
        policy.deny(p(22));
        assert!(!policy.allows(p(22)));
        let policy = PortPolicy::new([p(22), p(80)], [p(22)]);
        assert!(!policy.allows(p(22)));
        assert!(policy.allows(p(80)));
        assert!(!policy.allows(p(81)));
    }

    #[tokio::test]
    async fn a_reload_that_denies_a_port_wakes_its_streams() {
        let policy = PortPolicy::default();
        let waiting = tokio::spawn({
            let policy = policy.clone();
            async move { policy.denied(p(8080)).await }
        });
        policy.replace(&PortPolicy::new([], [p(22)]));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "8080 is still allowed");
        policy.replace(&PortPolicy::new([], [p(8080)]));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("join");
    }

    #[test]
    fn replace_reaches_every_clone() {
        let policy = PortPolicy::default();
        let held_by_a_session = policy.clone();
        assert!(held_by_a_session.allows(p(22)));
        policy.replace(&PortPolicy::new([], [p(22)]));
        assert!(!held_by_a_session.allows(p(22)));
    }
}
