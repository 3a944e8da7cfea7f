//! What the edge logged, as an operator reads it: every event of `burrow_edge` at info and
//! above, kept in memory as JSON lines with their spans, whatever `RUST_LOG` says. The edge logs
//! an agent's session in a span with its `devbox`, so [`edge_log`] finds one devbox's lines
//! among those of every test running in the process. [`crate::init_tracing`] installs it.

use std::io::Write;
use std::sync::Mutex;

use tracing::{Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// Every line kept so far, of every test in the process.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The layer that keeps the edge's lines. JSON, so its span fields are formatted apart from
/// those of the readable layer (and never carry its colours).
pub(crate) fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .with_writer(|| Line(Vec::new()))
        .with_filter(Targets::new().with_target("burrow_edge", Level::INFO))
}

/// The lines the edge logged so far in a span of `devbox` (JSON, one event each).
pub fn edge_log(devbox: &str) -> Vec<String> {
    let tag = format!("\"devbox\":\"{devbox}\"");
    LINES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|line| line.contains(&tag))
        .cloned()
        .collect()
}

/// One event's text, kept when the formatter is done with it.
struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.0).trim_end().to_owned();
        if !line.is_empty() {
            LINES.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    }
}
