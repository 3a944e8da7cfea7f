//! Which local ports the agent forwards to.

use std::collections::BTreeSet;

use burrow_protocol::Port;

/// An allow list (empty: every port) and a deny list; deny wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
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
            allow: allow.into_iter().collect(),
            deny: deny.into_iter().collect(),
        }
    }

    /// Whether a stream to `port` may be forwarded.
    pub fn allows(&self, port: Port) -> bool {
        !self.deny.contains(&port) && (self.allow.is_empty() || self.allow.contains(&port))
    }

    /// Adds a port to the deny list (the agent's own listeners).
    pub fn deny(&mut self, port: Port) {
        self.deny.insert(port);
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
