//! Whether the connection is alive, without I/O: when this side pings, how long a pong may take,
//! what silence means, the round trip each answer measured, and the go-away notices both ways.
//!
//! The async shell drives one [`Liveness`] per connection the way quinn-proto's `Connection` is
//! driven: it feeds what happened in (`handle_pong`, `handle_resume`, `handle_go_away`,
//! `start_drain`), sleeps until [`Liveness::poll_timeout`] and then calls
//! [`Liveness::handle_timeout`], and after every call drains [`Liveness::poll`], whose
//! [`Output`]s come in the order they must be acted on. Time is passed in; nothing here reads
//! a clock.
//!
//! The machine sits beside the control stream's order machine ([`crate::machine`]), not inside
//! it. The order machine says whether a message may arrive now and answers the peer's pings
//! (`Reply(Pong)`); it hands this machine the pongs (`Answered { seq }`) and go-aways
//! (`PeerGoingAway`) it accepts. This machine decides when this side pings and what a missing
//! answer means; every `Ping` and `GoAway` it hands out is recorded with the order machine
//! (`sent`) and then written.
//!
//! # Probing
//!
//! A machine built with [`Liveness::new`] probes (the agent does):
//!
//! - A heartbeat is due when the machine is built, then every `interval`. No heartbeat goes
//!   out while a ping waits for its pong; one that came due meanwhile goes out as soon as the
//!   pong arrives, and the schedule restarts from then. A heartbeat sent within 5 ms of its slot
//!   keeps the schedule on its grid. That is tokio's `Interval` with `MissedTickBehavior::Delay`,
//!   which the agent's loop used, so the timing does not change.
//! - Every ping may take `timeout` to be answered. A heartbeat that is not answered makes the
//!   path suspect: [`Output::Rebind`], then at once a second probe with a fresh `timeout`. If
//!   that one goes unanswered too: [`Output::Dead`].
//! - [`Liveness::handle_resume`] (the devbox slept) probes at once, replacing any ping still
//!   outstanding. A resume probe gets no second chance: unanswered, it is [`Output::Dead`].
//! - A pong answers only the outstanding ping: [`Output::Answered`] with its round trip, and the
//!   machine is back to plain heartbeats (the next miss is a first one again). A pong with any
//!   other `seq` (the late answer to a ping given up on, a duplicate, a `seq` never sent) is
//!   ignored, round trip and all.
//! - After [`Output::Dead`] the machine is finished: no more pings, no deadlines.
//!
//! # Nudges
//!
//! A probing machine may also nudge ([`Liveness::with_nudges`]): [`Output::Nudge`] every
//! `every` since this side last sent a ping or a nudge, until it is dead. A nudge is one small
//! packet the peer acknowledges at the transport level and nothing more: no answer, not sent
//! again if lost, so it says nothing about liveness and the machine expects nothing back. It
//! exists for the peer that no longer knows the connection (an edge that restarted, or that
//! timed the connection out while the devbox was frozen with its clocks): such a peer answers
//! any packet with a stateless reset, so the loss is noticed within `every` instead of at the
//! next heartbeat, or after a heartbeat's timeout when a ping went out while the peer was down.
//! Idle, that costs one small packet each way per `every` (the nudge and its ACK); a ping
//! would add the pong and the ACK of the pong.
//!
//! # Silence
//!
//! The shell also knows whether anything at all came from the peer since the last nudge (its
//! acknowledgement would have): when nothing did, it calls [`Liveness::handle_silence`], and the
//! heartbeat goes at once instead of at its slot, with its usual second chance. A peer that
//! died is then noticed within two nudge intervals plus the heartbeat's two timeouts, instead
//! of up to a whole heartbeat interval later; a live peer just gets an early ping.
//!
//! A machine built with [`Liveness::passive`] (the edge, which answers the agent's pings through
//! the order machine) never pings and has no deadlines; it keeps the go-away notices. An edge
//! that wants its own round trip measure builds a probing one instead and ignores
//! [`Output::Rebind`] (a server does not move its socket), so its probes still get two chances.
//!
//! # Go-away
//!
//! [`Liveness::start_drain`] hands out this side's go-away once; [`Liveness::handle_go_away`]
//! reports the peer's once. Neither stops the heartbeats: they go on while streams drain, for as
//! long as the shell drives the machine.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::{ControlMsg, GoAway};

/// A heartbeat sent at most this late keeps the schedule on its grid; a later one (held back by
/// a slow pong, or a wake-up that came late) restarts the schedule from when it went out.
/// tokio's `Interval` uses the same margin.
const SLACK: Duration = Duration::from_millis(5);

/// Stands in for a duration so long that adding it to an `Instant` overflows (only a
/// misconfiguration does that): a year never comes in a connection's life either.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often this side probes and how long an answer may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between heartbeats (the agent's `liveness.heartbeat_interval`).
    pub interval: Duration,
    /// Time a heartbeat or a probe may take to be answered (`liveness.heartbeat_timeout`).
    pub timeout: Duration,
}

/// Why a ping was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A regular heartbeat.
    Heartbeat,
    /// The second chance after a missed heartbeat, sent after [`Output::Rebind`].
    Rebound,
    /// Sent at once after a detected resume.
    Resume,
}

/// Why the path was given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dead {
    /// A heartbeat and the probe after the rebind both went unanswered.
    Unanswered,
    /// The probe sent after a resume went unanswered.
    ResumeUnanswered,
}

impl Dead {
    /// For logs and the close reason: `"heartbeats unanswered"` or `"no answer after resume"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unanswered => "heartbeats unanswered",
            Self::ResumeUnanswered => "no answer after resume",
        }
    }
}

impl fmt::Display for Dead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the shell does next; [`Liveness::poll`] hands these out in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Record this message with the order machine (`sent`), then write it on the control
    /// stream: a `Ping`, or this side's `GoAway`. A failed write needs no report: it shows up
    /// as a missed pong.
    Transmit(ControlMsg),
    /// A heartbeat went unanswered: move the endpoint to a fresh UDP socket (the connection
    /// migrates if the peer still holds it). The probe that follows comes next, so it goes out
    /// on the new socket. A side that cannot rebind ignores this.
    Rebind,
    /// The outstanding ping was answered.
    Answered {
        /// Why that ping was sent.
        probe: Probe,
        /// From the ping's handing out to the pong's arrival.
        rtt: Duration,
    },
    /// The path is gone: close the connection ([`crate::close::DEAD`], with this as the reason)
    /// and dial anew. The machine pings no more.
    Dead(Dead),
    /// The peer said go-away: open no new streams; running ones drain.
    PeerGoingAway(GoAway),
    /// Send one small packet that asks for no answer and is not sent again if lost (the
    /// agent: a QUIC datagram); see "Nudges" in the module docs.
    Nudge,
}

/// One connection's liveness; see the module docs.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// `None`: a passive side, which never pings.
    prober: Option<Prober>,
    /// The round trip of the last answered ping.
    last_rtt: Option<Duration>,
    /// This side said go-away.
    went_away: bool,
    /// The peer said go-away.
    peer_went_away: bool,
    /// Handed out by [`Liveness::poll`], oldest first.
    out: VecDeque<Output>,
}

impl Liveness {
    /// A machine that probes, with its first heartbeat due at `now`.
    pub fn new(now: Instant, heartbeat: Heartbeat) -> Self {
        Self::with(Some(Prober {
            heartbeat,
            next_heartbeat: now,
            next_seq: 1,
            state: State::Idle,
            nudge: None,
        }))
    }

    /// This (probing) machine also nudges every `every`, the first one `every` after it was
    /// built; see "Nudges" in the module docs. A passive machine ignores this; a zero `every`
    /// is taken as a millisecond.
    pub fn with_nudges(mut self, now: Instant, every: Duration) -> Self {
        let every = every.max(Duration::from_millis(1));
        if let Some(prober) = &mut self.prober {
            prober.nudge = Some((every, later(now, every)));
        }
        self
    }

    /// A machine that never pings: it only keeps the go-away notices.
    pub fn passive() -> Self {
        Self::with(None)
    }

    fn with(prober: Option<Prober>) -> Self {
        Self {
            prober,
            last_rtt: None,
            went_away: false,
            peer_went_away: false,
            out: VecDeque::new(),
        }
    }

    /// A pong arrived at `now`. It counts only if it answers the outstanding ping.
    pub fn handle_pong(&mut self, now: Instant, seq: u64) {
        let Some(prober) = &mut self.prober else {
            return;
        };
        match prober.state {
            State::Waiting(o) if o.seq == seq => {
                prober.state = State::Idle;
                let rtt = now.saturating_duration_since(o.sent);
                self.last_rtt = Some(rtt);
                self.out.push_back(Output::Answered {
                    probe: o.probe,
                    rtt,
                });
            }
            State::Idle | State::Waiting(_) | State::Dead => {}
        }
    }

    /// The devbox was found to have slept: probe at once, with the usual `timeout`, in place
    /// of any ping still outstanding. A passive or dead machine ignores it.
    pub fn handle_resume(&mut self, now: Instant) {
        let Some(prober) = &mut self.prober else {
            return;
        };
        if !matches!(prober.state, State::Dead) {
            let ping = prober.send(now, Probe::Resume);
            self.out.push_back(Output::Transmit(ping));
        }
    }

    /// Nothing at all arrived from the peer during the last nudge interval, though a nudge
    /// went out at its start (and a live peer acknowledges it within a round trip): the
    /// heartbeat is due now instead of at its slot, with its usual second chance. A ping
    /// already outstanding goes on; a passive or dead machine ignores it. A peer that died
    /// is noticed a nudge interval or two after it died instead of up to a heartbeat
    /// interval later.
    pub fn handle_silence(&mut self, now: Instant) {
        let Some(prober) = &mut self.prober else {
            return;
        };
        if matches!(prober.state, State::Idle) {
            prober.next_heartbeat = later(now, prober.heartbeat.interval);
            let ping = prober.send(now, Probe::Heartbeat);
            self.out.push_back(Output::Transmit(ping));
        }
    }

    /// The peer said go-away. Reported once; a repeat is ignored here (the order machine
    /// calls it a violation).
    pub fn handle_go_away(&mut self, go_away: GoAway) {
        if !self.peer_went_away {
            self.peer_went_away = true;
            self.out.push_back(Output::PeerGoingAway(go_away));
        }
    }

    /// This side goes away: hands out `go_away` to transmit, the first time only. Returns
    /// whether it did (`false`: a go-away was already said, and the peer must not hear two).
    pub fn start_drain(&mut self, go_away: GoAway) -> bool {
        if self.went_away {
            return false;
        }
        self.went_away = true;
        let msg = ControlMsg::GoAway(go_away);
        self.out.push_back(Output::Transmit(msg));
        true
    }

    /// Time has come to `now`: whatever deadline passed is acted on (a missed pong, or a
    /// heartbeat due). Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(prober) = &mut self.prober else {
            return;
        };
        match prober.state {
            State::Waiting(o) if o.deadline <= now => match o.probe {
                Probe::Heartbeat => {
                    self.out.push_back(Output::Rebind);
                    let ping = prober.send(now, Probe::Rebound);
                    self.out.push_back(Output::Transmit(ping));
                }
                Probe::Rebound => self.out.push_back(prober.die(Dead::Unanswered)),
                Probe::Resume => self.out.push_back(prober.die(Dead::ResumeUnanswered)),
            },
            State::Idle if prober.next_heartbeat <= now => {
                prober.next_heartbeat = prober.slot_after(now);
                let ping = prober.send(now, Probe::Heartbeat);
                self.out.push_back(Output::Transmit(ping));
            }
            State::Idle | State::Waiting(_) | State::Dead => {}
        }
        if let Some((every, next)) = &mut prober.nudge
            && *next <= now
            && !matches!(prober.state, State::Dead)
        {
            *next = later(now, *every);
            self.out.push_back(Output::Nudge);
        }
    }

    /// When [`Liveness::handle_timeout`] next has something to do: the outstanding ping's
    /// deadline, else the next heartbeat (possibly already past: act at once). `None` for a
    /// passive or dead machine.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let prober = self.prober.as_ref()?;
        let probing = match prober.state {
            State::Idle => prober.next_heartbeat,
            State::Waiting(o) => o.deadline,
            State::Dead => return None,
        };
        Some(match prober.nudge {
            Some((_, nudge)) => probing.min(nudge),
            None => probing,
        })
    }

    /// The next thing to do, oldest first; `None` when there is nothing.
    pub fn poll(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The round trip of the last answered ping, if any was.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// Whether either side said go-away.
    pub fn is_draining(&self) -> bool {
        self.went_away || self.peer_went_away
    }

    /// Whether the path was given up on ([`Output::Dead`] was handed out).
    pub fn is_dead(&self) -> bool {
        matches!(
            self.prober,
            Some(Prober {
                state: State::Dead,
                ..
            })
        )
    }
}

/// The probing half of a [`Liveness`].
#[derive(Debug, Clone)]
struct Prober {
    heartbeat: Heartbeat,
    /// When the next heartbeat is due. It stays put while a ping is outstanding.
    next_heartbeat: Instant,
    next_seq: u64,
    state: State,
    /// Nudges: how often, and when the next is due.
    nudge: Option<(Duration, Instant)>,
}

/// Where probing stands.
#[derive(Debug, Clone, Copy)]
enum State {
    /// No ping outstanding; the next heartbeat is due at `next_heartbeat`.
    Idle,
    /// A ping waits for its pong.
    Waiting(Outstanding),
    /// Given up on the path.
    Dead,
}

/// A ping waiting for its pong.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    seq: u64,
    probe: Probe,
    sent: Instant,
    deadline: Instant,
}

impl Prober {
    /// A ping with the next `seq`, handed out at `now`, now the outstanding one.
    fn send(&mut self, now: Instant, probe: Probe) -> ControlMsg {
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        if let Some((every, next)) = &mut self.nudge {
            // A ping provokes the same answer from a peer that lost the connection.
            *next = later(now, *every);
        }
        self.state = State::Waiting(Outstanding {
            seq,
            probe,
            sent: now,
            deadline: later(now, self.heartbeat.timeout),
        });
        ControlMsg::Ping { seq }
    }

    /// When the heartbeat after the one going out at `now` is due: an interval after its slot
    /// when it goes out on time, an interval after `now` when it goes out late.
    fn slot_after(&self, now: Instant) -> Instant {
        let late = now.saturating_duration_since(self.next_heartbeat) > SLACK;
        let from = if late { now } else { self.next_heartbeat };
        later(from, self.heartbeat.interval)
    }

    fn die(&mut self, why: Dead) -> Output {
        self.state = State::Dead;
        Output::Dead(why)
    }
}

/// `at + d`, without overflowing.
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GoAwayReason;

    /// The agent's defaults.
    const HB: Heartbeat = Heartbeat {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(3),
    };

    /// A fake clock: milliseconds after a fixed base.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }

        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn drain(m: &mut Liveness) -> Vec<Output> {
        std::iter::from_fn(|| m.poll()).collect()
    }

    fn ping(seq: u64) -> Output {
        Output::Transmit(ControlMsg::Ping { seq })
    }

    fn answered(probe: Probe, ms: u64) -> Output {
        let rtt = Duration::from_millis(ms);
        Output::Answered { probe, rtt }
    }

    fn go_away() -> GoAway {
        let (reason, message) = (GoAwayReason::Shutdown, "bye".into());
        GoAway { reason, message }
    }

    /// A probing machine that has sent its first heartbeat, `ping(1)`, at 0.
    fn started(clock: &Clock, heartbeat: Heartbeat) -> Liveness {
        let mut m = Liveness::new(clock.at(0), heartbeat);
        assert_eq!(
            m.poll_timeout(),
            Some(clock.at(0)),
            "first heartbeat at once"
        );
        m.handle_timeout(clock.at(0));
        assert_eq!(drain(&mut m), [ping(1)]);
        m
    }

    #[test]
    fn pongs_on_time_keep_the_schedule() {
        let t = Clock::new();
        let mut m = started(&t, HB);
        assert_eq!(m.poll_timeout(), Some(t.at(3000)), "the pong's deadline");
        for seq in 1..=3 {
            let slot = 5000 * (seq - 1);
            // Every heartbeat after the first goes out a millisecond late (below).
            let sent = if seq == 1 { 0 } else { slot + 1 };
            m.handle_pong(t.at(sent + 40), seq);
            assert_eq!(drain(&mut m), [answered(Probe::Heartbeat, 40)]);
            assert_eq!(m.last_rtt(), Some(Duration::from_millis(40)));
            assert_eq!(m.poll_timeout(), Some(t.at(slot + 5000)));
            // A wake-up a millisecond late keeps the grid.
            m.handle_timeout(t.at(slot + 5001));
            assert_eq!(drain(&mut m), [ping(seq + 1)]);
        }
    }

    #[test]
    fn a_missed_heartbeat_rebinds_and_probes_at_once() {
        let t = Clock::new();
        let mut m = started(&t, HB);
        m.handle_timeout(t.at(2999));
        assert_eq!(drain(&mut m), [], "not yet");
        m.handle_timeout(t.at(3000));
        assert_eq!(drain(&mut m), [Output::Rebind, ping(2)], "rebind first");
        assert_eq!(m.poll_timeout(), Some(t.at(6000)), "a full timeout again");
        // The late pong to the heartbeat given up on counts for nothing, RTT included.
        m.handle_pong(t.at(3500), 1);
        assert_eq!(drain(&mut m), []);
        assert_eq!(m.last_rtt(), None);
        assert_eq!(m.poll_timeout(), Some(t.at(6000)));
    }

    #[test]
    fn nudges_fill_the_silence_between_pings_until_dead() {
        let t = Clock::new();
        let mut m = Liveness::new(t.at(0), HB).with_nudges(t.at(0), Duration::from_secs(1));
        m.handle_timeout(t.at(0));
        assert_eq!(drain(&mut m), [ping(1)], "a ping, no nudge with it");
        m.handle_pong(t.at(40), 1);
        drain(&mut m);
        // The ping at 0 counts as a nudge: the next is a second later, then every second.
        for s in 1..5 {
            assert_eq!(m.poll_timeout(), Some(t.at(1000 * s)));
            m.handle_timeout(t.at(1000 * s));
            assert_eq!(drain(&mut m), [Output::Nudge], "at {s} s");
        }
        // The heartbeat at 5 s replaces the nudge due then.
        m.handle_timeout(t.at(5000));
        assert_eq!(drain(&mut m), [ping(2)]);
        // Nudges go on while the ping waits, and after the rebind.
        m.handle_timeout(t.at(6000));
        m.handle_timeout(t.at(7000));
        assert_eq!(drain(&mut m), [Output::Nudge, Output::Nudge]);
        m.handle_timeout(t.at(8000));
        assert_eq!(drain(&mut m), [Output::Rebind, ping(3)]);
        m.handle_timeout(t.at(9000));
        assert_eq!(drain(&mut m), [Output::Nudge]);
        m.handle_timeout(t.at(11_000));
        assert_eq!(drain(&mut m), [Output::Dead(Dead::Unanswered)]);
        assert_eq!(m.poll_timeout(), None, "nothing after dead");
        m.handle_timeout(t.at(20_000));
        assert_eq!(drain(&mut m), []);
    }

    #[test]
    fn silence_brings_the_heartbeat_forward_with_its_second_chance() {
        let t = Clock::new();
        let mut m = Liveness::new(t.at(0), HB).with_nudges(t.at(0), Duration::from_secs(1));
        m.handle_timeout(t.at(0));
        assert_eq!(drain(&mut m), [ping(1)]);
        m.handle_pong(t.at(10), 1);
        drain(&mut m);
        // Silence while a heartbeat is not yet due: it goes now, and the schedule moves.
        m.handle_silence(t.at(2000));
        assert_eq!(drain(&mut m), [ping(2)]);
        assert_eq!(m.poll_timeout(), Some(t.at(3000)), "the next nudge");
        // More silence while that ping waits changes nothing.
        m.handle_silence(t.at(2500));
        assert_eq!(drain(&mut m), []);
        m.handle_timeout(t.at(5000));
        assert_eq!(drain(&mut m), [Output::Rebind, ping(3)]);
        m.handle_timeout(t.at(8000));
        assert_eq!(drain(&mut m), [Output::Dead(Dead::Unanswered)]);
        m.handle_silence(t.at(9000));
        assert_eq!(drain(&mut m), []);
    }

    #[test]
    fn a_passive_machine_never_nudges() {
        let t = Clock::new();
        let mut m = Liveness::passive().with_nudges(t.at(0), Duration::from_secs(1));
        assert_eq!(m.poll_timeout(), None);
        m.handle_timeout(t.at(10_000));
        assert_eq!(drain(&mut m), []);
    }

    #[test]
    fn a_second_miss_is_dead_and_final() {
        let t = Clock::new();
        let mut m = started(&t, HB);
        m.handle_timeout(t.at(3000));
        assert_eq!(drain(&mut m), [Output::Rebind, ping(2)]);
        m.handle_timeout(t.at(6000));
        assert_eq!(drain(&mut m), [Output::Dead(Dead::Unanswered)]);
        assert!(m.is_dead());
        assert_eq!(m.poll_timeout(), None);
        m.handle_pong(t.at(6001), 2);
        m.handle_resume(t.at(6002));
        m.handle_timeout(t.at(60_000));
        assert_eq!(drain(&mut m), [], "nothing after dead");
    }

    #[test]
    fn a_pong_after_a_rebind_restores_the_schedule() {
        let t = Clock::new();
        let mut m = started(&t, HB);
        m.handle_timeout(t.at(3000));
        assert_eq!(drain(&mut m), [Output::Rebind, ping(2)]);
        m.handle_pong(t.at(3100), 2);
        assert_eq!(drain(&mut m), [answered(Probe::Rebound, 100)]);
        assert_eq!(m.poll_timeout(), Some(t.at(5000)), "back on the grid");
        m.handle_timeout(t.at(5000));
        assert_eq!(drain(&mut m), [ping(3)]);
        // The miss count was reset: this miss is a first one again.
        m.handle_timeout(t.at(8000));
        assert_eq!(drain(&mut m), [Output::Rebind, ping(4)]);
    }

    #[test]
    fn a_held_back_heartbeat_goes_at_once_and_restarts_the_schedule() {
        let t = Clock::new();
        let slow = Heartbeat {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
        };
        let mut m = started(&t, slow);
        assert_eq!(
            m.poll_timeout(),
            Some(t.at(3000)),
            "no heartbeat while waiting"
        );
        m.handle_pong(t.at(2000), 1);
        assert_eq!(drain(&mut m), [answered(Probe::Heartbeat, 2000)]);
        assert_eq!(m.poll_timeout(), Some(t.at(1000)), "overdue: at once");
        m.handle_timeout(t.at(2000));
        assert_eq!(drain(&mut m), [ping(2)]);
        m.handle_pong(t.at(2010), 2);
        drain(&mut m);
        assert_eq!(m.poll_timeout(), Some(t.at(3000)), "from when it went out");

        // A wake-up more than 5 ms late restarts the schedule the same way.
        m.handle_timeout(t.at(3100));
        assert_eq!(drain(&mut m), [ping(3)]);
        m.handle_pong(t.at(3110), 3);
        drain(&mut m);
        assert_eq!(m.poll_timeout(), Some(t.at(4100)));
    }

    #[test]
    fn a_resume_probes_at_once_and_gets_no_second_chance() {
        let t = Clock::new();
        let mut m = started(&t, HB);
        m.handle_pong(t.at(10), 1);
        drain(&mut m);
        m.handle_resume(t.at(2000));
        assert_eq!(drain(&mut m), [ping(2)], "at once, between heartbeats");
        assert_eq!(m.poll_timeout(), Some(t.at(5000)), "the usual timeout");
        m.handle_pong(t.at(2100), 2);
        assert_eq!(drain(&mut m), [answered(Probe::Resume, 100)]);
        assert_eq!(
            m.poll_timeout(),
            Some(t.at(5000)),
            "the schedule is unchanged"
        );

        m.handle_timeout(t.at(5000));
        assert_eq!(drain(&mut m), [ping(3)]);
        // A resume while a heartbeat is outstanding replaces it.
        m.handle_resume(t.at(6000));
        assert_eq!(drain(&mut m), [ping(4)]);
        m.handle_pong(t.at(6100), 3);
        assert_eq!(drain(&mut m), [], "the replaced ping's pong");
        m.handle_timeout(t.at(8000));
        assert_eq!(drain(&mut m), [], "the replaced ping's deadline");
        m.handle_timeout(t.at(9000));
        assert_eq!(drain(&mut m), [Output::Dead(Dead::ResumeUnanswered)]);
    }

    #[test]
    fn our_go_away_goes_out_once_and_heartbeats_go_on() {
        let t = Clock::new();
        let mut m = Liveness::new(t.at(0), HB);
        assert!(!m.is_draining());
        assert!(m.start_drain(go_away()));
        let sent = Output::Transmit(ControlMsg::GoAway(go_away()));
        assert_eq!(drain(&mut m), [sent]);
        assert!(m.is_draining());
        assert!(!m.start_drain(go_away()), "the peer must not hear two");
        assert_eq!(drain(&mut m), []);
        m.handle_timeout(t.at(0));
        assert_eq!(drain(&mut m), [ping(1)]);
    }

    #[test]
    fn the_peers_go_away_is_reported_once_and_heartbeats_go_on() {
        let t = Clock::new();
        let mut m = started(&t, HB);
        m.handle_go_away(go_away());
        assert_eq!(drain(&mut m), [Output::PeerGoingAway(go_away())]);
        assert!(m.is_draining());
        m.handle_go_away(go_away());
        assert_eq!(drain(&mut m), []);
        m.handle_pong(t.at(20), 1);
        m.handle_timeout(t.at(5000));
        assert_eq!(drain(&mut m), [answered(Probe::Heartbeat, 20), ping(2)]);
    }

    /// Answers the pings among the outputs 30 ms after `now`, except 3, 6, 9 and 10; returns
    /// how many outputs there were before the answers.
    fn answer(m: &mut Liveness, now: Instant) -> usize {
        let outputs = drain(m);
        for output in &outputs {
            match *output {
                Output::Transmit(ControlMsg::Ping { seq }) if !matches!(seq, 3 | 6 | 9 | 10) => {
                    m.handle_pong(now + Duration::from_millis(30), seq);
                }
                _ => {}
            }
        }
        drain(m); // the answers
        outputs.len()
    }

    #[test]
    fn poll_timeout_is_always_the_next_thing_to_happen() {
        let t = Clock::new();
        let mut m = Liveness::new(t.at(0), HB);
        // Ping 3 goes unanswered and the rebind probe after it is answered; ping 6 goes
        // unanswered too, but a resume at 20 s replaces it; pings 9 and 10 (a heartbeat and its
        // rebind probe) go unanswered, which is the end.
        let (mut wakes, mut resumed) = (0, false);
        while let Some(due) = m.poll_timeout() {
            wakes += 1;
            assert!(wakes < 50, "the machine never settles");
            let mut early = m.clone();
            early.handle_timeout(due - Duration::from_nanos(1));
            assert_eq!(early.poll(), None, "nothing before {due:?}");
            m.handle_timeout(due);
            assert!(answer(&mut m, due) > 0, "something at {due:?}");
            if !resumed && due >= t.at(20_000) {
                resumed = true;
                m.handle_resume(due + Duration::from_millis(50));
                answer(&mut m, due + Duration::from_millis(50));
            }
        }
        assert!(m.is_dead());
        assert_eq!(m.last_rtt(), Some(Duration::from_millis(30)));
    }

    #[test]
    fn pongs_with_unknown_seqs_are_ignored() {
        let t = Clock::new();
        let mut m = Liveness::new(t.at(0), HB);
        for seq in [0, 1, u64::MAX] {
            m.handle_pong(t.at(0), seq); // before any ping
        }
        m.handle_timeout(t.at(0));
        assert_eq!(drain(&mut m), [ping(1)]);
        for seq in [0, 2, u64::MAX] {
            m.handle_pong(t.at(10), seq);
        }
        assert_eq!(drain(&mut m), []);
        assert_eq!(m.poll_timeout(), Some(t.at(3000)), "still waiting for 1");
        m.handle_pong(t.at(20), 1);
        m.handle_pong(t.at(30), 1);
        assert_eq!(drain(&mut m), [answered(Probe::Heartbeat, 20)], "once");
    }

    #[test]
    fn a_passive_side_never_pings() {
        let t = Clock::new();
        let mut m = Liveness::passive();
        assert_eq!(m.poll_timeout(), None);
        m.handle_timeout(t.at(100_000));
        m.handle_resume(t.at(100_000));
        m.handle_pong(t.at(100_000), 1);
        assert_eq!(drain(&mut m), []);
        assert_eq!(m.last_rtt(), None);
        assert!(!m.is_dead());
        m.handle_go_away(go_away());
        assert!(m.start_drain(go_away()));
        let ours = Output::Transmit(ControlMsg::GoAway(go_away()));
        assert_eq!(drain(&mut m), [Output::PeerGoingAway(go_away()), ours]);
    }

    #[test]
    fn absurd_durations_do_not_overflow() {
        let t = Clock::new();
        let forever = Heartbeat {
            interval: Duration::MAX,
            timeout: Duration::MAX,
        };
        let mut m = started(&t, forever);
        assert!(m.poll_timeout() > Some(t.at(0)));
        m.handle_pong(t.at(10), 1);
        assert_eq!(drain(&mut m), [answered(Probe::Heartbeat, 10)]);
        assert!(m.poll_timeout() > Some(t.at(10)));
    }

    #[test]
    fn dead_reasons_read_as_the_close_reason() {
        assert_eq!(Dead::Unanswered.to_string(), "heartbeats unanswered");
        assert_eq!(Dead::ResumeUnanswered.as_str(), "no answer after resume");
    }
}
