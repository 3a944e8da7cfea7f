//! The gRPC load: tonic's client ([`EchoClient`]) calling the kit's echo service through a
//! system. Unary calls back to back with a fixed number in flight, unary calls at a fixed
//! rate (latency from when each was due), and one long server-streaming or client-streaming
//! call for throughput. Every generator checks what came back, so a proxy that drops or cuts
//! a message shows as an error, not as speed.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use burrow_tests::grpc::EchoClient;
use bytes::Bytes;
use futures_util::stream;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::load::Target;
use crate::stats::Stats;

/// Lateness of the fixed-rate thread's wake-up that is its own (the kernel's timer slack and
/// the thread's wake-up, about 90 µs here): a call started later than this after it was due
/// counts from when it was due.
const WAKE_SLACK: Duration = Duration::from_micros(250);

/// How long one unary call may take before it counts as an error (a lost call must not hold
/// the run up).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one HTTP/2 connection to `target`, with its host as every call's `:authority`.
pub async fn connect(target: &Target) -> Result<EchoClient> {
    let url = format!("http://{}", target.host);
    EchoClient::connect_via(&url, None, target.addr)
        .await
        .with_context(|| format!("gRPC connection to {} ({url})", target.addr))
}

/// One unary call with `message`; an error unless the same bytes come back in time.
pub async fn call(client: &EchoClient, message: &Bytes) -> Result<()> {
    let reply = tokio::time::timeout(CALL_TIMEOUT, client.unary(message.clone(), &[], None))
        .await
        .context("the call took longer than 10 s")?
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
    ensure!(
        reply.get_ref() == message,
        "the echo differs from the request"
    );
    Ok(())
}

/// `conns` HTTP/2 connections with `in_flight` unary calls of `message` on each, every task
/// starting its next call when the last one ends, for `duration`.
pub async fn closed_loop(
    target: &Target,
    conns: usize,
    in_flight: usize,
    message: &Bytes,
    duration: Duration,
) -> Result<Stats> {
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(connect(target).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for client in &clients {
        for _ in 0..in_flight {
            let (client, message) = (client.clone(), message.clone());
            tasks.spawn(async move {
                let mut stats = Stats::default();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match call(&client, &message).await {
                        Ok(()) => stats.record(t.elapsed()),
                        Err(_) => stats.errors += 1,
                    }
                }
                stats
            });
        }
    }
    let mut total = Stats::default();
    while let Some(done) = tasks.join_next().await {
        total.merge(done.context("a calling task")?);
    }
    total.seconds = start.elapsed().as_secs_f64();
    Ok(total)
}

/// Unary calls of `message` at a fixed `rate` a second for `duration`, each started when due
/// on one HTTP/2 connection however many are still running. Latency counts from when a call
/// was due (no coordinated omission), unless it started within [`WAKE_SLACK`] of that. The
/// calls are started from a thread of their own that sleeps with the kernel's high-resolution
/// timer: tokio's timer wakes up to 2 ms late, which would be counted as the system's.
pub async fn fixed_rate(
    target: &Target,
    rate: u32,
    message: &Bytes,
    duration: Duration,
) -> Result<Stats> {
    let client = connect(target).await?;
    let total = (f64::from(rate) * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let (runtime, message) = (Handle::current(), message.clone());
    let (started, mut calls) = mpsc::unbounded_channel();
    let start = std::time::Instant::now() + Duration::from_millis(50);
    std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            let now = std::time::Instant::now();
            let since = if now - due < WAKE_SLACK { now } else { due };
            let (client, message) = (client.clone(), message.clone());
            let call = runtime
                .spawn(async move { call(&client, &message).await.map(|()| since.elapsed()) });
            if started.send(call).is_err() {
                return;
            }
        }
    });
    let mut stats = Stats::default();
    while let Some(call) = calls.recv().await {
        match call.await {
            Ok(Ok(latency)) => stats.record(latency),
            _ => stats.errors += 1,
        }
    }
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

/// One `ServerStream` call answering `bytes` in messages of `size` bytes, on a connection of
/// its own; the time from the call to the last message.
pub async fn download(target: &Target, bytes: u64, size: u32) -> Result<Duration> {
    let client = connect(target).await?;
    let count = bytes / u64::from(size.max(1));
    let start = Instant::now();
    let reply = client
        .server_stream(count, size, &[])
        .await
        .map_err(|s| anyhow::anyhow!("ServerStream: {:?}: {}", s.code(), s.message()))?;
    let mut messages = reply.into_inner();
    let (mut got, mut received) = (0u64, 0u64);
    loop {
        match messages.message().await {
            Ok(Some(message)) => {
                got += 1;
                received += message.len() as u64;
            }
            Ok(None) => break,
            Err(s) => bail!("ServerStream cut after {received} bytes: {s}"),
        }
    }
    let elapsed = start.elapsed();
    ensure!(
        got == count && received == count * u64::from(size),
        "ServerStream answered {got} messages ({received} bytes), not {count} of {size} bytes"
    );
    Ok(elapsed)
}

/// One `ClientStream` call sending `bytes` in messages of `size` bytes, on a connection of its
/// own; the time from the call to the service's answer (which counts what arrived).
pub async fn upload(target: &Target, bytes: u64, size: u32) -> Result<Duration> {
    let client = connect(target).await?;
    let count = bytes / u64::from(size.max(1));
    // One buffer, shared by every message: the client costs as little as it can.
    let message = Bytes::from(vec![0xa5u8; size as usize]);
    let messages = stream::iter((0..count).map(move |_| message.clone()));
    let start = Instant::now();
    let reply = client
        .client_stream(messages)
        .await
        .map_err(|s| anyhow::anyhow!("ClientStream: {:?}: {}", s.code(), s.message()))?;
    let elapsed = start.elapsed();
    // The answer opens with the total length the service read (8 bytes, big-endian).
    let total = reply
        .get_ref()
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .context("ClientStream answered no length")?;
    let sent = count * u64::from(size);
    ensure!(total == sent, "the service read {total} bytes of {sent}");
    Ok(elapsed)
}
