//! The `edge` setting: one edge's QUIC listener (`host:port`), or several (a TOML array, or a
//! comma-separated list in a flag or the environment), each checked; and the TLS name to
//! verify, by default the first edge's host.

use burrow_runtime::sources::ConfigError;
use serde::Deserialize;

/// `edge`: one `host:port`, a comma-separated list (flags, environment), or a TOML array.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawEdges {
    /// One, or several comma-separated.
    One(String),
    /// A TOML array.
    Many(Vec<String>),
}

/// `edge` (required: one or more `host:port`) and the TLS name to verify (`server_name`, by
/// default the first edge's host).
pub fn edge(
    edge: Option<RawEdges>,
    server_name: Option<String>,
) -> Result<(Vec<String>, String), ConfigError> {
    let edges: Vec<String> = match edge {
        Some(RawEdges::One(list)) => list.split(',').map(|e| e.trim().to_owned()).collect(),
        Some(RawEdges::Many(list)) => list.into_iter().map(|e| e.trim().to_owned()).collect(),
        None => Vec::new(),
    };
    let edges: Vec<String> = edges.into_iter().filter(|e| !e.is_empty()).collect();
    let Some(first) = edges.first() else {
        return Err(ConfigError::Missing {
            key: "edge",
            hint: "set `edge = \"host:port\"` (or a list) in the file, BURROW_EDGE, or --edge"
                .into(),
        });
    };
    for edge in &edges {
        edge_host(edge).ok_or_else(|| ConfigError::Invalid {
            key: "edge",
            message: format!("`{edge}` is not host:port (e.g. edge.example.com:443)"),
        })?;
    }
    let server_name = match server_name {
        Some(name) => name,
        None => edge_host(first).unwrap_or_default().to_owned(),
    };
    Ok((edges, server_name))
}

/// Whether `edge` is a `host:port` the agent can dial.
pub fn is_host_port(edge: &str) -> bool {
    edge_host(edge).is_some()
}

/// The host part of `host:port` (brackets removed for IPv6), if the port is valid.
fn edge_host(edge: &str) -> Option<&str> {
    let (host, port) = edge.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_a_list_or_an_array_and_the_first_names_the_tls_name() {
        let one = edge(Some(RawEdges::One("edge.example.com:443".into())), None).unwrap();
        assert_eq!(
            one,
            (
                vec!["edge.example.com:443".to_owned()],
                "edge.example.com".into()
            )
        );
        let list = RawEdges::One(" a.example.com:443, b.example.com:7443 ,".into());
        let (edges, name) = edge(Some(list), None).unwrap();
        assert_eq!(edges, ["a.example.com:443", "b.example.com:7443"]);
        assert_eq!(name, "a.example.com");
        let array = RawEdges::Many(vec!["[::1]:443".into(), "10.0.0.2:443".into()]);
        let (edges, name) = edge(Some(array), Some("edge.internal".into())).unwrap();
        assert_eq!(edges.len(), 2);
        assert_eq!(name, "edge.internal");
    }

    #[test]
    fn a_bad_entry_is_named_and_none_is_missing() {
        let bad = RawEdges::Many(vec!["a.example.com:443".into(), "b.example.com".into()]);
        let message = edge(Some(bad), None).unwrap_err().to_string();
        assert!(
            message.contains("`b.example.com` is not host:port"),
            "{message}"
        );
        let empty = edge(Some(RawEdges::One(" , ".into())), None)
            .unwrap_err()
            .to_string();
        assert!(empty.contains("edge"), "{empty}");
        assert!(edge(None, None).is_err());
    }
}
