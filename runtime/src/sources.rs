//! Configuration sources, layered: the TOML file, then `BURROW_*` environment variables, then
//! command-line flags. Flags win over the environment, which wins over the file.
//!
//! Each binary lists its settings once (a [`Setting`] per key: the dotted TOML key, the
//! environment variable, the kind of value). [`layer`] merges the three sources into one TOML
//! table, which the binary's `RawConfig` then deserializes with `deny_unknown_fields`, so a typo
//! in any source names the key it came from. The burrow-edge binary uses this module too.
//! Durations are read by [`parse_duration`] (humantime's forms, plus a bare number of seconds).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One configuration key and where it can come from besides the file.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The dotted TOML key, e.g. `forward.allow_ports`.
    pub key: &'static str,
    /// The environment variable, e.g. `BURROW_FORWARD_ALLOW_PORTS`.
    pub env: &'static str,
    /// How a string from the environment or a flag becomes a TOML value.
    pub kind: Kind,
}

/// The kind of a setting's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Taken as it is.
    Str,
    /// An integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// A comma-separated list of ports, e.g. `3000,8080`; empty means an empty list.
    Ports,
}

/// A configuration problem, naming the key or file to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    File {
        /// The file, or `<flags and environment>` when there was none.
        path: String,
        /// The parser's message, which names the key.
        message: String,
    },
    /// An environment variable or flag holds a value of the wrong kind.
    #[error("{origin}: {message}")]
    Value {
        /// `environment variable BURROW_X` or `flag --x`.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A required key has no value in any source.
    #[error("`{key}` is not set: {hint}")]
    Missing {
        /// The dotted key.
        key: &'static str,
        /// Where to set it.
        hint: String,
    },
    /// A key's value is well-formed but not acceptable.
    #[error("`{key}`: {message}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
}

/// The file source: its path (for messages and relative paths) and its text.
#[derive(Debug, Clone, Copy)]
pub struct File<'a> {
    /// Where the text came from.
    pub path: &'a Path,
    /// The TOML text.
    pub text: &'a str,
}

/// Reads a config file, naming it in the error.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Merges file, environment and flags (in rising precedence) into one TOML table.
///
/// `flags` are `(key, value)` pairs for the flags that were given on the command line.
pub fn layer(
    settings: &[Setting],
    file: Option<File<'_>>,
    env: &HashMap<String, String>,
    flags: &[(&'static str, String)],
) -> Result<toml::Table, ConfigError> {
    let mut table = match file {
        Some(file) => file
            .text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::File {
                path: file.path.display().to_string(),
                message: e.to_string().trim_end().to_owned(),
            })?,
        None => toml::Table::new(),
    };
    for setting in settings {
        if let Some(raw) = env.get(setting.env) {
            let origin = format!("environment variable {}", setting.env);
            set(
                &mut table,
                setting.key,
                convert(setting.kind, raw, &origin)?,
            );
        }
    }
    for (key, raw) in flags {
        let setting = settings.iter().find(|s| s.key == *key);
        let kind = setting.map_or(Kind::Str, |s| s.kind);
        let origin = format!("flag --{}", key.replace(['.', '_'], "-"));
        set(&mut table, key, convert(kind, raw, &origin)?);
    }
    Ok(table)
}

/// Deserializes a merged table, naming the source in the message.
pub fn deserialize<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    file: Option<File<'_>>,
) -> Result<T, ConfigError> {
    table
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::File {
            path: file.map_or_else(
                || "<flags and environment>".to_owned(),
                |f| f.path.display().to_string(),
            ),
            message: e.to_string().trim_end().to_owned(),
        })
}

fn convert(kind: Kind, raw: &str, origin: &str) -> Result<toml::Value, ConfigError> {
    let bad = |message: String| ConfigError::Value {
        origin: origin.to_owned(),
        message,
    };
    Ok(match kind {
        Kind::Str => toml::Value::String(raw.to_owned()),
        Kind::Int => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| bad(format!("`{raw}` is not an integer")))?,
        ),
        Kind::Bool => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(bad(format!("`{raw}` is not true or false"))),
        }),
        Kind::Ports => {
            let mut ports = Vec::new();
            for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let port: u16 = part
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("`{part}` is not a port (1-65535)")))?;
                ports.push(toml::Value::Integer(i64::from(port)));
            }
            toml::Value::Array(ports)
        }
    })
}

/// Sets a dotted key, creating tables on the way; a non-table in the way is replaced.
fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts = key.split('.').peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_owned(), value);
            return;
        }
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            // Invariant: replaced by a table just above.
            return;
        };
        current = next;
    }
}

/// An integer setting within `range`, or its default.
pub fn int<T: TryFrom<i64> + Copy>(
    key: &'static str,
    value: Option<i64>,
    default: T,
    range: std::ops::RangeInclusive<i64>,
) -> Result<T, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    range
        .contains(&v)
        .then(|| T::try_from(v).ok())
        .flatten()
        .ok_or_else(|| ConfigError::Invalid {
            key,
            message: format!(
                "{v} is out of range: use {}..={}",
                range.start(),
                range.end()
            ),
        })
}

/// Parses a duration the way [`humantime::parse_duration`] does: `250ms`, `5s`, `1.5s`, `2m`,
/// `1h`, `1h 30m`, `3 sec`. Two forms that burrow accepted before it used humantime still work,
/// so that existing configs keep loading: a bare number is seconds (`5`, `1.5`), and a number
/// may start or end with its decimal point (`.5s`, `5.s`). The error names `key`.
pub fn parse_duration(key: &'static str, text: &str) -> Result<std::time::Duration, ConfigError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, rest) = t.split_at(split);
    let mut number = number.to_owned();
    // humantime wants digits on both sides of a decimal point.
    if number.len() > 1 && number.matches('.').count() == 1 {
        if number.starts_with('.') {
            number.insert(0, '0');
        }
        if number.ends_with('.') {
            number.pop();
        }
    }
    let unit = if rest.trim().is_empty() { "s" } else { rest };
    humantime::parse_duration(&format!("{number}{unit}")).map_err(|e| ConfigError::Invalid {
        key,
        message: format!("`{text}` is not a duration like 250ms, 5s or 2m ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SETTINGS: &[Setting] = &[
        Setting {
            key: "edge",
            env: "BURROW_EDGE",
            kind: Kind::Str,
        },
        Setting {
            key: "forward.allow_ports",
            env: "BURROW_FORWARD_ALLOW_PORTS",
            kind: Kind::Ports,
        },
    ];

    fn file(text: &str) -> Option<File<'_>> {
        Some(File {
            path: Path::new("agent.toml"),
            text,
        })
    }

    #[test]
    fn flags_win_over_environment_over_file() {
        let env = HashMap::from([("BURROW_EDGE".to_owned(), "env:1".to_owned())]);
        let t = layer(SETTINGS, file("edge = \"file:1\""), &env, &[]).unwrap();
        assert_eq!(t["edge"].as_str(), Some("env:1"));
        let t = layer(
            SETTINGS,
            file("edge = \"file:1\""),
            &env,
            &[("edge", "flag:1".into())],
        )
        .unwrap();
        assert_eq!(t["edge"].as_str(), Some("flag:1"));
    }

    #[test]
    fn ports_from_environment_become_a_nested_list() {
        let env = HashMap::from([(
            "BURROW_FORWARD_ALLOW_PORTS".to_owned(),
            "3000, 8080".to_owned(),
        )]);
        let t = layer(SETTINGS, None, &env, &[]).unwrap();
        let ports = t["forward"]["allow_ports"].as_array().unwrap();
        assert_eq!(ports.len(), 2);
        let err = layer(
            SETTINGS,
            None,
            &HashMap::from([("BURROW_FORWARD_ALLOW_PORTS".to_owned(), "0".to_owned())]),
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("BURROW_FORWARD_ALLOW_PORTS"),
            "{err}"
        );
    }

    #[test]
    fn bad_toml_names_the_file() {
        let err = layer(SETTINGS, file("edge = "), &HashMap::new(), &[]).unwrap_err();
        assert!(err.to_string().contains("agent.toml"), "{err}");
    }

    #[test]
    fn durations_parse_with_units_and_name_the_key() {
        assert_eq!(
            parse_duration("k", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("k", "5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("k", "5").unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_duration("k", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("k", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("k", "1h").unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_duration("k", " 0.5m ").unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(parse_duration("k", "5 s").unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_duration("k", "1.5").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_duration("k", ".5s").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("k", "5.s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("k", "0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("k", "1h 30m").unwrap(),
            Duration::from_secs(5400)
        );
        let err = parse_duration("liveness.heartbeat_interval", "5 parsecs").unwrap_err();
        assert!(
            err.to_string().contains("liveness.heartbeat_interval"),
            "{err}"
        );
        assert!(parse_duration("k", "").is_err());
        assert!(parse_duration("k", "-1s").is_err());
        for bad in [
            ".",
            "1.2.3s",
            "5S",
            "1e3s",
            "5 s 3",
            "99999999999999999999s",
        ] {
            assert!(parse_duration("k", bad).is_err(), "{bad:?}");
        }
    }
}
