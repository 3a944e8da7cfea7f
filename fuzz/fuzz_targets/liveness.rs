//! The liveness machine (`protocol/src/liveness.rs`) driven by a random run: pongs with any
//! `seq` (a peer chooses them), resumes, go-aways both ways, and a clock moved by arbitrary
//! steps, the timer fired only when the machine asked for it, as the shells do. Checks:
//!
//! - nothing panics, whatever the seqs and however far the clock jumps;
//! - every `Ping` handed out carries a new, increasing `seq`;
//! - a round trip is reported only for the seq of the last ping, and never exceeds the time
//!   since that ping went out;
//! - `Rebind` is followed at once by a probe (`Ping`);
//! - after `Dead`, nothing more is sent and no deadline is left;
//! - each side's go-away is handed out or reported at most once.

#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use burrow_protocol::liveness::{Heartbeat, Liveness, Output};
use burrow_protocol::{ControlMsg, GoAway, GoAwayReason};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Step {
    /// The clock moves on by this many milliseconds; a due deadline fires.
    Advance(u16),
    /// The clock jumps far (a long suspend).
    Jump(u32),
    /// A pong with this seq arrives.
    Pong(u64),
    /// A pong for the last ping sent arrives.
    PongLast,
    /// The devbox was seen to resume.
    Resume,
    /// The peer says go-away.
    PeerGoAway,
    /// This side starts draining.
    Drain,
}

#[derive(Debug, Arbitrary)]
struct Input {
    passive: bool,
    interval_ms: u16,
    timeout_ms: u16,
    steps: Vec<Step>,
}

fn go_away() -> GoAway {
    GoAway {
        reason: GoAwayReason::Shutdown,
        message: "bye".into(),
    }
}

struct Run {
    live: Liveness,
    now: Instant,
    last_ping: Option<(u64, Instant)>,
    dead: bool,
    drains_sent: u32,
    peer_reports: u32,
}

impl Run {
    fn drain(&mut self) {
        let mut expect_probe = false;
        while let Some(out) = self.live.poll() {
            if expect_probe {
                assert!(
                    matches!(out, Output::Transmit(ControlMsg::Ping { .. })),
                    "a probe follows Rebind, got {out:?}"
                );
                expect_probe = false;
            }
            match out {
                Output::Transmit(ControlMsg::Ping { seq }) => {
                    assert!(!self.dead, "a ping after Dead");
                    if let Some((last, _)) = self.last_ping {
                        assert!(seq > last, "seq {seq} after {last}");
                    }
                    self.last_ping = Some((seq, self.now));
                }
                Output::Transmit(ControlMsg::GoAway(_)) => self.drains_sent += 1,
                Output::Transmit(other) => panic!("unexpected transmit {other:?}"),
                Output::Rebind => {
                    assert!(!self.dead, "Rebind after Dead");
                    expect_probe = true;
                }
                Output::Answered { rtt, .. } => {
                    let (_, sent) = self.last_ping.expect("an answer without a ping");
                    assert!(rtt <= self.now - sent, "rtt {rtt:?} longer than waited");
                }
                Output::Dead(_) => {
                    assert!(!self.dead, "Dead twice");
                    self.dead = true;
                }
                Output::PeerGoingAway(_) => self.peer_reports += 1,
                Output::Nudge => assert!(!self.dead, "a nudge after Dead"),
            }
        }
        assert!(!expect_probe, "Rebind without a probe");
        if self.dead {
            assert_eq!(self.live.poll_timeout(), None, "a deadline after Dead");
        }
        assert!(self.drains_sent <= 1 && self.peer_reports <= 1);
    }

    /// Moves the clock to `to`, firing every deadline on the way as a shell would.
    fn advance(&mut self, to: Instant) {
        while let Some(deadline) = self.live.poll_timeout() {
            if deadline > to {
                break;
            }
            self.now = self.now.max(deadline);
            self.live.handle_timeout(self.now);
            self.drain();
            if self.live.poll_timeout() == Some(deadline) {
                break; // not moved on: a bug the next checks will show, not a hang
            }
        }
        self.now = to;
    }
}

fuzz_target!(|input: Input| {
    let start = Instant::now();
    let heartbeat = Heartbeat {
        interval: Duration::from_millis(u64::from(input.interval_ms.max(1))),
        timeout: Duration::from_millis(u64::from(input.timeout_ms.max(1))),
    };
    let live = if input.passive {
        Liveness::passive()
    } else {
        // Nudges at a third of the heartbeat interval: they must never disturb the pings.
        Liveness::new(start, heartbeat).with_nudges(start, heartbeat.interval / 3)
    };
    let mut run = Run {
        live,
        now: start,
        last_ping: None,
        dead: false,
        drains_sent: 0,
        peer_reports: 0,
    };
    run.drain();
    for step in input.steps.into_iter().take(512) {
        match step {
            Step::Advance(ms) => run.advance(run.now + Duration::from_millis(u64::from(ms))),
            Step::Jump(s) => run.advance(run.now + Duration::from_secs(u64::from(s))),
            Step::Pong(seq) => run.live.handle_pong(run.now, seq),
            Step::PongLast => {
                if let Some((seq, _)) = run.last_ping {
                    run.live.handle_pong(run.now, seq);
                }
            }
            Step::Resume => run.live.handle_resume(run.now),
            Step::PeerGoAway => run.live.handle_go_away(go_away()),
            Step::Drain => {
                run.live.start_drain(go_away());
            }
        }
        run.drain();
        if input.passive {
            assert_eq!(run.last_ping, None, "a passive machine pinged");
        }
    }
});
