//! Logging for both binaries: human-readable lines by default, JSON lines for collectors
//! (`log.format = "json"`), and a level that a reload (SIGHUP) can change while running.
//!
//! `RUST_LOG`, when set, is the default level; `log.level` (file, `BURROW_LOG_LEVEL`,
//! `--log-level`) wins over it.

use std::collections::HashMap;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::sources::ConfigError;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// The log settings of a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// An `EnvFilter` directive: `info`, `debug`, `burrow_agent=debug,info`, ...
    pub level: String,
    /// Text or JSON.
    pub format: Format,
}

impl LogSettings {
    /// Checks raw values (`log.level`, `log.format`); `None` takes the defaults (`RUST_LOG`
    /// from `env`, then info; text).
    pub fn parse(
        level: Option<String>,
        format: Option<String>,
        env: &std::collections::HashMap<String, String>,
    ) -> Result<LogSettings, ConfigError> {
        let level = level
            .or_else(|| env.get("RUST_LOG").cloned())
            .unwrap_or_else(|| "info".to_owned());
        filter(&level).map_err(|e| ConfigError::Invalid {
            key: "log.level",
            message: format!("`{level}` is not a log level or filter (e.g. info, debug): {e}"),
        })?;
        let format = match format.as_deref().map(str::trim) {
            None | Some("text") => Format::Text,
            Some("json") => Format::Json,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "log.format",
                    message: format!("`{other}` is not a log format: use text or json"),
                });
            }
        };
        Ok(LogSettings { level, format })
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".to_owned(),
            format: Format::Text,
        }
    }
}

/// Changes the level of the installed logger.
#[derive(Debug, Clone)]
pub struct LevelHandle(Option<reload::Handle<EnvFilter, Registry>>);

impl LevelHandle {
    /// Sets a new level (already checked by [`LogSettings::parse`]).
    pub fn set(&self, level: &str) {
        if let (Some(handle), Ok(filter)) = (&self.0, filter(level)) {
            let _ = handle.reload(filter);
        }
    }
}

/// Installs the process's logger, to stderr. A second call (tests) keeps the first logger.
pub fn init(settings: &LogSettings) -> LevelHandle {
    let filter = filter(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match settings.format {
        Format::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        Format::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    LevelHandle(installed.is_ok().then_some(handle))
}

/// Parses a level or filter. Field values match literally, not as regular expressions (a
/// crafted regex takes exponential time to build), and each directive is trimmed first
/// (tracing-subscriber 0.3 panics on whitespace before a non-ASCII directive).
fn filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let directives = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    EnvFilter::builder().with_regex(false).parse(directives)
}

/// Installs a plain logger (`RUST_LOG` or info), for callers without a configuration.
pub fn init_from_env() {
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = LogSettings::parse(None, None, &env).unwrap_or_default();
    init(&settings);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `agent_config` and `edge_config` fuzz targets.
    #[test]
    fn hostile_levels_are_answered_quickly_and_without_panics() {
        let started = std::time::Instant::now();
        let _ = filter("[{=x........................oc}]");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        for level in [" é=info", "info, é=debug", " , ,info"] {
            let _ = filter(level);
        }
        assert!(filter("info, burrow_agent=debug").is_ok());
    }

    #[test]
    fn bad_values_name_their_key() {
        let env = std::collections::HashMap::new();
        let err = LogSettings::parse(Some("x=what".into()), None, &env).unwrap_err();
        assert!(err.to_string().contains("log.level"), "{err}");
        let err = LogSettings::parse(Some("info".into()), Some("xml".into()), &env).unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
        let ok = LogSettings::parse(Some("debug".into()), Some("json".into()), &env).unwrap();
        assert_eq!(ok.format, Format::Json);
        let rust_log = std::collections::HashMap::from([("RUST_LOG".into(), "warn".into())]);
        assert_eq!(
            LogSettings::parse(None, None, &rust_log).unwrap().level,
            "warn"
        );
    }
}
