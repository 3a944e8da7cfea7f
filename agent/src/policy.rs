//! Which local ports the agent forwards to.
//!
//! A [`PortPolicy`] is a shared handle: its clones see the same lists, so a reload (SIGHUP)
//! that [`PortPolicy::replace`]s them applies to every stream from then on, without a restart.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use burrow_protocol::Port;

/// An allow list (empty: every port) and a deny list; deny wins.
#[derive(Debug, Clone, Default)]
pub struct PortPolicy {
    lists: Arc<RwLock<Lists>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Lists {
    allow: BTreeSet<Port>,
    deny: BTreeSet<Port>,
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
            })),
        }
    }

    /// Whether a stream to `port` may be forwarded.
    pub fn allows(&self, port: Port) -> bool {
        let lists = self.lists.read().unwrap_or_else(|p| p.into_inner());
        !lists.deny.contains(&port) && (lists.allow.is_empty() || lists.allow.contains(&port))
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

    #[test]
    fn replace_reaches_every_clone() {
        let policy = PortPolicy::default();
        let held_by_a_session = policy.clone();
        assert!(held_by_a_session.allows(p(22)));
        policy.replace(&PortPolicy::new([], [p(22)]));
        assert!(!held_by_a_session.allows(p(22)));
    }
}
