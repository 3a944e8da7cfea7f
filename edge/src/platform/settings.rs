//! The edge config's `[platform]` table: its keys as read (`RawPlatform`, part of the
//! config's raw form) and checked ([`PlatformConfig`], `config.platform`). The flags and
//! variables are declared with every other key in [`crate::config::SETTINGS`].

use std::path::PathBuf;
use std::time::Duration;

use burrow_runtime::sources::{self, ConfigError};
use serde::Deserialize;

use super::client::WebhookUrl;

/// `[platform]` as the file, the environment and the flags give it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlatform {
    webhook_url: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    activity_interval: Option<String>,
    wake_wait: Option<String>,
}

/// `[platform]`: what the edge tells the platform (webhooks) and waits for (a woken devbox).
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Where events are POSTed; `None`: no webhooks (the events stream still runs).
    pub webhook_url: Option<WebhookUrl>,
    /// The webhooks' signing secret; `None`: generated once in `state_dir/webhook.secret` (a
    /// cluster's is shared through its store).
    pub webhook_secret_file: Option<PathBuf>,
    /// At most one activity event per devbox per this interval (default 30 s).
    pub activity_interval: Duration,
    /// How long a request to a devbox being woken waits for its agent (default 60 s).
    pub wake_wait: Duration,
}

impl PlatformConfig {
    /// Checks `[platform]`: the webhook URL parsed, `activity_interval` longer than 0, paths
    /// resolved with `path` (relative to the config file).
    pub(crate) fn parse(
        raw: RawPlatform,
        path: impl Fn(PathBuf) -> PathBuf,
    ) -> Result<PlatformConfig, ConfigError> {
        let webhook_url = raw
            .webhook_url
            .map(|url| {
                url.parse().map_err(|message| ConfigError::Invalid {
                    key: "platform.webhook_url",
                    message,
                })
            })
            .transpose()?;
        let activity_interval = duration(
            "platform.activity_interval",
            raw.activity_interval,
            Duration::from_secs(30),
        )?;
        if activity_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "platform.activity_interval",
                message: "must be longer than 0, e.g. 30s".into(),
            });
        }
        Ok(PlatformConfig {
            webhook_url,
            webhook_secret_file: raw.webhook_secret_file.map(path),
            activity_interval,
            wake_wait: duration("platform.wake_wait", raw.wake_wait, Duration::from_secs(60))?,
        })
    }
}

/// A duration key: its value parsed, or the default.
fn duration(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.map_or(Ok(default), |v| sources::parse_duration(key, &v))
}
