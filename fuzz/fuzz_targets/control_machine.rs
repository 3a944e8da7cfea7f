//! A random conversation fed to both control-stream machines (`AgentControl`, `EdgeControl`):
//! messages built from structured input or decoded from raw frames, ends of stream, and what the
//! side itself sent (pings, go-aways, rejects). Checks, for each machine:
//!
//! - nothing panics;
//! - the phase only moves forward (handshake, established, draining, closed);
//! - a violation closes the machine, and from then on every message is a violation;
//! - a message is accepted exactly when the rules in `protocol/src/machine.rs` allow it in the
//!   current phase;
//! - a `Ping` once established is answered by a `Pong` with the same `seq`;
//! - a `Pong` once established is passed on with its `seq`, whatever it is (which ping it
//!   answers is the liveness machine's business, `protocol/src/liveness.rs`).

#![no_main]

use arbitrary::Arbitrary;
use burrow_fuzz::{Msg, RawFrame};
use burrow_protocol::machine::{AgentAction, AgentControl, EdgeAction, EdgeControl, Phase};
use burrow_protocol::{AgentToken, ControlMsg, Hello};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Side {
    Agent,
    Edge,
    Both,
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// A message from the peer, built.
    Built(Side, Msg),
    /// A message from the peer, decoded from bytes (skipped when they do not decode).
    Raw(Side, RawFrame),
    /// The peer finished the control stream.
    EndOfStream(Side),
    /// The side wrote this message itself.
    Sent(Side, Msg),
    /// The side pings (a `Ping` with the next sequence number, recorded as sent).
    Ping(Side),
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// The agent's hello version range; `None`: this build's version only.
    versions: Option<(u16, u16)>,
    steps: Vec<Step>,
}

fuzz_target!(|input: Input| {
    let mut hello = Hello::new(AgentToken::new("t"), "fuzz");
    if let Some((min, max)) = input.versions {
        (hello.min_version, hello.max_version) = (min, max);
    }
    let mut agent = Checked::new(Machine::Agent(AgentControl::new(&hello)), hello);
    let mut edge = Checked::new(
        Machine::Edge(EdgeControl::new()),
        Hello::new(AgentToken::new("t"), "x"),
    );
    let mut next_seq = 0u64;
    for step in input.steps {
        let (side, event) = match step {
            Step::Built(side, msg) => (side, Event::Message(msg.build())),
            Step::Raw(side, RawFrame(bytes)) => match ControlMsg::decode(&mut Bytes::from(bytes)) {
                Ok(msg) => (side, Event::Message(msg)),
                Err(_) => continue,
            },
            Step::EndOfStream(side) => (side, Event::EndOfStream),
            Step::Sent(side, msg) => (side, Event::Sent(msg.build())),
            Step::Ping(side) => {
                next_seq += 1;
                (side, Event::Sent(ControlMsg::Ping { seq: next_seq }))
            }
        };
        if matches!(side, Side::Agent | Side::Both) {
            agent.feed(&event);
        }
        if matches!(side, Side::Edge | Side::Both) {
            edge.feed(&event);
        }
    }
});

enum Event {
    Message(ControlMsg),
    EndOfStream,
    Sent(ControlMsg),
}

enum Machine {
    Agent(AgentControl),
    Edge(EdgeControl),
}

/// What a machine's answer to a message came to, side-independently.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Violation,
    Reply(ControlMsg),
    Pong(u64),
    Other,
}

/// A machine and what the harness knows about it.
struct Checked {
    machine: Machine,
    hello: Hello,
    violated: bool,
    peer_went_away: bool,
}

fn rank(phase: Phase) -> u8 {
    match phase {
        Phase::Handshake => 0,
        Phase::Established => 1,
        Phase::Draining => 2,
        Phase::Closed => 3,
    }
}

impl Checked {
    fn new(machine: Machine, hello: Hello) -> Self {
        Checked {
            machine,
            hello,
            violated: false,
            peer_went_away: false,
        }
    }

    fn phase(&self) -> Phase {
        match &self.machine {
            Machine::Agent(m) => m.phase(),
            Machine::Edge(m) => m.phase(),
        }
    }

    fn feed(&mut self, event: &Event) {
        let before = self.phase();
        match event {
            Event::Message(msg) => self.message(msg.clone(), before),
            Event::EndOfStream => {
                let result = match &mut self.machine {
                    Machine::Agent(m) => m.on_end_of_stream(),
                    Machine::Edge(m) => m.on_end_of_stream(),
                };
                let agent = matches!(self.machine, Machine::Agent(_));
                let allowed = match before {
                    Phase::Handshake => false,
                    Phase::Established => !agent,
                    Phase::Draining | Phase::Closed => true,
                };
                assert_eq!(result.is_ok(), allowed, "end of stream in {before:?}");
                if let Err(v) = result {
                    assert!(v.to_string().starts_with("unexpected "));
                    self.violated = true;
                }
                assert_eq!(self.phase(), Phase::Closed);
            }
            Event::Sent(msg) => match &mut self.machine {
                Machine::Agent(m) => m.sent(msg),
                Machine::Edge(m) => m.sent(msg),
            },
        }
        let after = self.phase();
        assert!(
            rank(after) >= rank(before),
            "{before:?} went back to {after:?}"
        );
        if self.violated {
            assert_eq!(after, Phase::Closed, "a violation closes the machine");
        }
    }

    fn message(&mut self, msg: ControlMsg, before: Phase) {
        let allowed = self.allowed(&msg, before);
        let outcome = match &mut self.machine {
            Machine::Agent(m) => match m.on_message(msg.clone()) {
                Err(v) => {
                    assert!(v.to_string().starts_with("unexpected "));
                    Outcome::Violation
                }
                Ok(AgentAction::Reply(reply)) => Outcome::Reply(reply),
                Ok(AgentAction::Pong { seq }) => Outcome::Pong(seq),
                Ok(_) => Outcome::Other,
            },
            Machine::Edge(m) => match m.on_message(msg.clone()) {
                Err(v) => {
                    assert!(v.to_string().starts_with("unexpected "));
                    Outcome::Violation
                }
                Ok(EdgeAction::Reply(reply)) => Outcome::Reply(reply),
                Ok(EdgeAction::Pong { seq }) => Outcome::Pong(seq),
                Ok(_) => Outcome::Other,
            },
        };
        if self.violated {
            assert_eq!(
                outcome,
                Outcome::Violation,
                "after a violation, {} is one too",
                msg.name()
            );
        }
        assert_eq!(
            outcome != Outcome::Violation,
            allowed,
            "{} in {before:?}: {outcome:?}",
            msg.name()
        );
        match (&msg, &outcome) {
            (_, Outcome::Violation) => self.violated = true,
            (ControlMsg::Ping { seq }, _) => {
                assert_eq!(outcome, Outcome::Reply(ControlMsg::Pong { seq: *seq }));
            }
            (ControlMsg::Pong { seq }, _) => assert_eq!(outcome, Outcome::Pong(*seq)),
            (ControlMsg::GoAway(_), _) => self.peer_went_away = true,
            _ => assert!(!matches!(outcome, Outcome::Reply(_) | Outcome::Pong(_))),
        }
    }

    /// The rules, written out once more as a table.
    fn allowed(&self, msg: &ControlMsg, phase: Phase) -> bool {
        let agent = matches!(self.machine, Machine::Agent(_));
        match (phase, msg) {
            (Phase::Closed, _) => false,
            (Phase::Handshake, ControlMsg::Welcome(w)) if agent => self.hello.supports(w.version),
            (Phase::Handshake, ControlMsg::Reject(_)) => agent,
            (Phase::Handshake, ControlMsg::Hello(_)) => !agent,
            (Phase::Handshake, _) => false,
            (_, ControlMsg::Ping { .. } | ControlMsg::Pong { .. }) => true,
            (_, ControlMsg::TunnelUpdate(_) | ControlMsg::Edges(_)) => agent,
            (_, ControlMsg::GoAway(_)) => !self.peer_went_away,
            (_, _) => false,
        }
    }
}
