//! The platform's side: what the edge tells the platform that runs the devboxes.
//!
//! Something happens (an agent connects, a tunnel changes, a request wants a sleeping devbox
//! woken, tunnel traffic counts as activity), the code where it happens calls
//! [`Events::emit`], and the event goes, without the caller ever waiting, to:
//! - every client of the admin API's `GET /v1/events` (Server-Sent Events), and
//! - `platform.webhook_url`, when it is set: POSTed as JSON, signed with the webhook secret,
//!   in order, retried with backoff.
//!
//! Both get every event type, with the same JSON. An event comes from the edge where it
//! happened: the edge that served the admin call for tunnel changes, the edge holding the
//! agent's connection for `agent.*` (so with several edges, an agent connected to two of them
//! is announced by each).
//!
//! # Layout
//! - [`events`]: [`Event`] and its constructors; [`Events`], the handle that emits them.
//! - [`stream`]: `GET /v1/events`, a subscriber's Server-Sent Events.
//! - [`webhook`]: the bounded queue, the signature, the backoff and the delivery task.
//! - [`client`]: HTTP(S) POSTs to the webhook URL.
//! - [`settings`]: the config's `[platform]` table.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::certs;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::server::StartError;

pub mod client;
pub mod events;
pub mod settings;
pub mod stream;
pub mod webhook;

pub use client::WebhookUrl;
pub use events::{Activity, Event, Events};
pub use settings::PlatformConfig;
pub use webhook::{WebhookMetrics, Webhooks};

/// The generated webhook secret's file in `state_dir` (when `platform.webhook_secret_file`
/// is not set).
pub const WEBHOOK_SECRET_FILE: &str = "webhook.secret";

/// The edge's events, with the webhook task when `platform.webhook_url` is set
/// ([`Events::finish`] stops it). Event streams end when `closed` fires (the edge stops).
pub fn start(
    config: &Config,
    metrics: &Metrics,
    closed: CancellationToken,
) -> Result<Events, StartError> {
    let webhook_metrics = WebhookMetrics::new();
    metrics.register(webhook_metrics.collectors());
    let Some(url) = &config.platform.webhook_url else {
        return Ok(Events::new(closed));
    };
    let secret = webhook_secret(config)?;
    let queue = Arc::new(webhook::Queue::new(
        webhook::QUEUE_CAPACITY,
        webhook_metrics.dropped.clone(),
    ));
    let webhooks = Webhooks::start(
        url.clone(),
        secret.expose().as_bytes(),
        queue.clone(),
        webhook_metrics,
        config.drain_grace,
    );
    info!(%url, "webhooks on");
    Ok(Events::with_webhooks(queue, webhooks, closed))
}

/// The webhook signing secret: the text of `platform.webhook_secret_file` (surrounding
/// whitespace trimmed), or one generated once into `state_dir/webhook.secret` (mode 0600),
/// where the platform reads it. A cluster's was put there from its store at start.
fn webhook_secret(config: &Config) -> Result<Secret, StartError> {
    let (path, key) = match &config.platform.webhook_secret_file {
        Some(path) => (path.clone(), "platform.webhook_secret_file"),
        None => (config.state_dir.join(WEBHOOK_SECRET_FILE), "state_dir"),
    };
    if config.platform.webhook_secret_file.is_none() && !path.exists() {
        let secret = Secret::generate().map_err(|e| StartError::File {
            path: path.clone(),
            message: format!("no randomness for a new webhook secret: {e}"),
        })?;
        certs::write_private(&path, format!("{}\n", secret.expose()).as_bytes())?;
        return Ok(secret);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| StartError::File {
        path: path.clone(),
        message: format!("cannot read the webhook secret (`{key}`): {e}"),
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(StartError::File {
            path,
            message: format!("the webhook secret file is empty (`{key}`)"),
        });
    }
    Ok(Secret::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn config(dir: &Path, platform: &str) -> Config {
        let text = format!(
            "domain = \"a.b\"\nstate_dir = \"{}\"\n[public]\nhttp = \"127.0.0.1:0\"\n\
             [platform]\nwebhook_url = \"http://127.0.0.1:9/hook\"\n{platform}",
            dir.display()
        );
        let file = burrow_runtime::sources::File {
            path: Path::new("/etc/burrow/edge.toml"),
            text: &text,
        };
        Config::load(Some(file), &HashMap::new(), &[]).expect("config")
    }

    #[test]
    fn the_secret_is_generated_once_in_state_dir_or_read_from_its_file() {
        let dir = tempfile::tempdir().expect("dir");
        let generated = webhook_secret(&config(dir.path(), "")).expect("generated");
        let file = dir.path().join(WEBHOOK_SECRET_FILE);
        let written = std::fs::read_to_string(&file).expect("written");
        assert_eq!(written.trim(), generated.expose());
        assert!(generated.expose().len() >= 43, "256 bits of base32");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = webhook_secret(&config(dir.path(), "")).expect("again");
        assert_eq!(again.expose(), generated.expose(), "kept across restarts");

        let own = dir.path().join("mine.secret");
        std::fs::write(&own, "  whsec-mine\n").expect("write");
        let line = format!("webhook_secret_file = \"{}\"\n", own.display());
        let read = webhook_secret(&config(dir.path(), &line)).expect("read");
        assert_eq!(read.expose(), "whsec-mine");

        std::fs::write(&own, "\n").expect("write");
        let err = webhook_secret(&config(dir.path(), &line)).expect_err("empty");
        assert!(
            err.to_string().contains("platform.webhook_secret_file"),
            "{err}"
        );
        let missing = format!(
            "webhook_secret_file = \"{}\"\n",
            dir.path().join("nope").display()
        );
        let err = webhook_secret(&config(dir.path(), &missing)).expect_err("missing");
        assert!(
            err.to_string().contains("platform.webhook_secret_file"),
            "{err}"
        );
    }
}
