//! Many open WebSockets through one system: a fleet of client connections, each its own task,
//! opened with bounded concurrency, then each sends one message at its own moment within a
//! window (paced, so the echo latency is measured with every socket open, not in a burst), and
//! finally all are closed together.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use crate::load::Target;
use crate::stats::Stats;

/// Handshakes in flight at once while opening.
const OPENING: usize = 256;

/// Open WebSockets.
#[derive(Debug)]
pub struct Fleet {
    tasks: JoinSet<()>,
    /// Connections whose handshake completed.
    pub opened: usize,
    /// Connections that failed or timed out opening.
    pub failed: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    go: watch::Sender<Option<(Instant, Duration)>>,
    echoes: mpsc::UnboundedReceiver<Option<Duration>>,
    stop: CancellationToken,
    n: usize,
}

impl Fleet {
    /// Opens `n` WebSockets to `target`; gives up on those not open by `deadline`.
    pub async fn open(target: &Target, n: usize, deadline: Duration) -> Fleet {
        let (go, _) = watch::channel::<Option<(Instant, Duration)>>(None);
        let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let (echo_tx, echoes) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let gate = std::sync::Arc::new(Semaphore::new(OPENING));
        let until = Instant::now() + deadline;
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let target = target.clone();
            let (opened_tx, echo_tx) = (opened_tx.clone(), echo_tx.clone());
            let (mut go, stop, gate) = (go.subscribe(), stop.clone(), gate.clone());
            tasks.spawn(async move {
                let ws = {
                    let Ok(_permit) = gate.acquire().await else {
                        return;
                    };
                    match tokio::time::timeout_at(until, connect(&target)).await {
                        Ok(Ok(ws)) => ws,
                        Ok(Err(e)) => {
                            let _ = opened_tx.send(Err(format!("{e:#}")));
                            return;
                        }
                        Err(_) => {
                            let _ = opened_tx.send(Err("not open in time".into()));
                            return;
                        }
                    }
                };
                let _ = opened_tx.send(Ok(()));
                // The opener counts until every sender is gone.
                drop(opened_tx);
                let mut ws = ws;
                let Ok(start) = go.wait_for(Option::is_some).await.map(|v| *v) else {
                    return;
                };
                let Some((start, window)) = start else { return };
                tokio::time::sleep_until(start + window.mul_f64(i as f64 / n as f64)).await;
                let t = Instant::now();
                let echoed = async {
                    ws.send(Message::text(format!("echo {i}"))).await.ok()?;
                    match ws.next().await {
                        Some(Ok(m)) if m.is_text() => Some(t.elapsed()),
                        _ => None,
                    }
                };
                let latency = tokio::time::timeout(Duration::from_secs(10), echoed)
                    .await
                    .ok()
                    .flatten();
                let _ = echo_tx.send(latency);
                stop.cancelled().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            });
        }
        drop(opened_tx);
        let (mut opened, mut failed, mut first_error) = (0, 0, None);
        while let Some(r) = opened_rx.recv().await {
            match r {
                Ok(()) => opened += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        Fleet {
            tasks,
            opened,
            failed,
            first_error,
            go,
            echoes,
            stop,
            n,
        }
    }

    /// Every open socket sends one message, spread evenly over `window`; the echo latencies.
    pub async fn echo(&mut self, window: Duration) -> Stats {
        let start = Instant::now() + Duration::from_millis(20);
        let _ = self.go.send(Some((start, window)));
        let mut stats = Stats::default();
        for _ in 0..self.opened {
            match tokio::time::timeout(window + Duration::from_secs(15), self.echoes.recv()).await {
                Ok(Some(Some(latency))) => stats.record(latency),
                Ok(Some(None)) => stats.errors += 1,
                _ => {
                    stats.errors += 1;
                    break;
                }
            }
        }
        stats.seconds = start.elapsed().as_secs_f64();
        stats
    }

    /// Closes every socket.
    pub async fn close(mut self) {
        self.stop.cancel();
        let n = self.n;
        if tokio::time::timeout(Duration::from_secs(20), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            eprintln!("  ({n} WebSockets did not all close in 20 s; aborted)");
            self.tasks.abort_all();
        }
    }
}

async fn connect(target: &Target) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>> {
    let tcp = TcpStream::connect(target.addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let request = format!("ws://{}/", target.host).into_client_request()?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(crate::origin::ws_config()))
            .await
            .context("WebSocket handshake")?;
    Ok(ws)
}
