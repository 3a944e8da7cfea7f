//! The faults: what the soak does to the tunnel while the load runs, one at a time, each
//! recorded as a window from its start to the moment the tunnel is whole again.

use std::fmt;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::world::World;

/// After a window ends, operations that were waiting on it may still be finishing: a failure
/// this long after the end still counts as inside it.
pub const GRACE: Duration = Duration::from_secs(10);

/// What the soak breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 the agent, start it again 0.2-1.5 s later (what `Restart=always` does).
    AgentRestart,
    /// SIGSTOP the agent for 0.5-3 s, then SIGCONT.
    AgentPause,
    /// kill -9 the edge, start it again 0.2-1.5 s later on the same addresses and state.
    EdgeKill,
    /// SIGTERM the edge (it drains for 2 s), start it again once it has exited.
    EdgeRestart,
    /// Drop every packet between agent and edge for 0.5-2.5 s: a blip.
    Blip,
    /// Drop every packet between agent and edge for 8-12 s: an outage the agent gives up on.
    Blackhole,
    /// Lose 5-20 % of the packets between agent and edge for 5-10 s.
    Loss,
    /// The agent's packets come from a new address (a NAT rebinding).
    NatRebind,
    /// Rotate the tunnel's bearer token; clients switch to the new one when the call returns.
    TunnelToken,
    /// Rotate the agent token and write it to the agent's token file.
    AgentToken,
}

impl Fault {
    /// Every fault, in report order.
    pub const ALL: [Fault; 10] = [
        Fault::AgentRestart,
        Fault::AgentPause,
        Fault::EdgeKill,
        Fault::EdgeRestart,
        Fault::Blip,
        Fault::Blackhole,
        Fault::Loss,
        Fault::NatRebind,
        Fault::TunnelToken,
        Fault::AgentToken,
    ];

    /// Whether an operation that starts during this fault must succeed all the same: requests
    /// wait at the edge for an absent agent (`agents.wait`, 5 s), which covers an agent
    /// restart and a blip. Others may fail, inside their window.
    pub fn spares_new(self) -> bool {
        matches!(
            self,
            Fault::AgentRestart | Fault::Blip | Fault::NatRebind | Fault::AgentToken
        )
    }

    /// Whether an operation already running when this fault starts must survive it: a blip,
    /// a rebinding and an agent-token rotation leave the connection and its streams alone.
    pub fn spares_running(self) -> bool {
        matches!(self, Fault::Blip | Fault::NatRebind | Fault::AgentToken)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::AgentRestart => "agent kill -9 and restart",
            Fault::AgentPause => "agent SIGSTOP / SIGCONT",
            Fault::EdgeKill => "edge kill -9 and restart",
            Fault::EdgeRestart => "edge graceful restart (SIGTERM)",
            Fault::Blip => "path blackholed 0.5-2.5 s",
            Fault::Blackhole => "path blackholed 8-12 s",
            Fault::Loss => "path loses 5-20 % for 5-10 s",
            Fault::NatRebind => "NAT rebinding",
            Fault::TunnelToken => "tunnel token rotated",
            Fault::AgentToken => "agent token rotated",
        })
    }
}

/// One fault: from its start until the tunnel was whole again.
#[derive(Debug, Clone)]
pub struct Window {
    /// What it was.
    pub fault: Fault,
    /// When it began.
    pub start: Instant,
    /// When it had taken effect (the killed process reaped, the relay dropping packets, the
    /// token rotated): an operation started before this was already running.
    pub effect: Instant,
    /// When the fault was healed and a request through the tunnel succeeded again.
    pub end: Instant,
}

impl Window {
    /// Whether an operation from `start` to `end` overlaps the window (with [`GRACE`]).
    pub fn touches(&self, start: Instant, end: Instant) -> bool {
        start <= self.end + GRACE && end >= self.start
    }
}

/// Injects faults until `stop`: a shuffled round of every kind in `faults`, again and again,
/// `gap` (plus up to as much again at random) apart, each printed with its time since `t0`.
/// The windows, in order.
pub async fn inject(
    world: &mut World,
    faults: &[Fault],
    gap: Duration,
    cycles: Option<usize>,
    stop: &CancellationToken,
    t0: Instant,
) -> anyhow::Result<Vec<Window>> {
    let mut windows = Vec::new();
    let mut cycle = 0;
    while cycles.is_none_or(|n| cycle < n) {
        let mut round = faults.to_vec();
        fastrand::shuffle(&mut round);
        for fault in round {
            let wait = gap + gap.mul_f64(fastrand::f64());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return Ok(windows),
            }
            let start = Instant::now();
            let effect = apply(world, fault).await?;
            windows.push(Window {
                fault,
                start,
                effect,
                end: Instant::now(),
            });
            println!(
                "{:>7.1} s  {fault}: whole again after {} ms",
                (start - t0).as_secs_f64(),
                start.elapsed().as_millis()
            );
        }
        cycle += 1;
    }
    Ok(windows)
}

fn between(lo_ms: u64, hi_ms: u64) -> Duration {
    Duration::from_millis(fastrand::u64(lo_ms..=hi_ms))
}

/// Does `fault` and heals it; returns once a request through the tunnel succeeds again, with
/// the moment the fault had taken effect.
async fn apply(world: &mut World, fault: Fault) -> anyhow::Result<Instant> {
    let effect = match fault {
        Fault::AgentRestart => {
            world.kill_agent().await;
            let effect = Instant::now();
            tokio::time::sleep(between(200, 1500)).await;
            world.start_agent().await?;
            effect
        }
        Fault::AgentPause => {
            world.signal_agent(Signal::SIGSTOP);
            let effect = Instant::now();
            tokio::time::sleep(between(500, 3000)).await;
            world.signal_agent(Signal::SIGCONT);
            effect
        }
        Fault::EdgeKill => {
            world.kill_edge().await;
            let effect = Instant::now();
            tokio::time::sleep(between(200, 1500)).await;
            world.start_edge().await?;
            effect
        }
        Fault::EdgeRestart => {
            world.stop_edge().await?;
            let effect = Instant::now();
            world.start_edge().await?;
            effect
        }
        Fault::Blip | Fault::Blackhole => {
            let hold = if fault == Fault::Blip {
                between(500, 2500)
            } else {
                between(8000, 12000)
            };
            world.relay.set_blackhole(true);
            let effect = Instant::now();
            tokio::time::sleep(hold).await;
            world.relay.set_blackhole(false);
            effect
        }
        Fault::Loss => {
            world.relay.set_loss(0.05 + 0.15 * fastrand::f64());
            let effect = Instant::now();
            tokio::time::sleep(between(5000, 10000)).await;
            world.relay.set_loss(0.0);
            effect
        }
        Fault::NatRebind => {
            world.relay.rebind();
            Instant::now()
        }
        Fault::TunnelToken => {
            world.rotate_tunnel_token().await?;
            Instant::now()
        }
        Fault::AgentToken => {
            world.rotate_agent_token().await?;
            Instant::now()
        }
    };
    world.tunnel_serves().await?;
    Ok(effect)
}
