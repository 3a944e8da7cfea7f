//! Parsing the public host: `{port}-{key}.{domain}`, with an optional `:port` suffix and an
//! optional trailing dot, case-insensitive.

use burrow_protocol::Port;

/// Where a public request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The devbox port.
    pub port: Port,
    /// The tunnel key (lowercase).
    pub key: String,
}

/// Why a host is not a tunnel host; the message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// No Host header or authority.
    #[error("the request names no host")]
    Missing,
    /// The host is not under the tunnel domain.
    #[error("`{0}` is not a tunnel host: expected {{port}}-{{key}}.{1}")]
    NotOurs(String, String),
    /// The first label is not `{port}-{key}`.
    #[error(
        "`{0}` is not a tunnel host: the first label must be {{port}}-{{key}}, e.g. 3000-k3v9x2q7ma"
    )]
    BadLabel(String),
    /// The port is out of range.
    #[error("`{0}` is not a port: expected 1-65535")]
    BadPort(String),
}

/// Longest tunnel key accepted (a DNS label is at most 63 characters).
const MAX_KEY: usize = 57;

/// Parses a Host header value (or URI authority) against the tunnel domain (lowercase, no
/// trailing dot).
pub fn parse(host: &str, domain: &str) -> Result<Target, HostError> {
    let shown = || host.chars().take(100).collect::<String>();
    let name = strip_port(host).ok_or_else(|| HostError::BadLabel(shown()))?;
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let label = name
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
        .ok_or_else(|| HostError::NotOurs(shown(), domain.to_owned()))?;
    let (port, key) = label
        .split_once('-')
        .ok_or_else(|| HostError::BadLabel(shown()))?;
    let key_ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if !key_ok || !port_ok {
        return Err(HostError::BadLabel(shown()));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|_| !port.starts_with('0'))
        .and_then(Port::new)
        .ok_or_else(|| HostError::BadPort(port.to_owned()))?;
    Ok(Target {
        port,
        key: key.to_owned(),
    })
}

/// Whether a Host value names the same host as a TLS server name (SNI): case and a trailing
/// dot aside, with the Host's `:port` ignored. No server name never matches.
pub fn same_name(host: &str, sni: Option<&str>) -> bool {
    let Some(sni) = sni else { return false };
    let Some(name) = strip_port(host) else {
        return false;
    };
    let trim = |s: &str| s.strip_suffix('.').unwrap_or(s).to_owned();
    trim(name).eq_ignore_ascii_case(&trim(sni))
}

/// Removes a `:port` suffix; `None` if the suffix is not a port.
fn strip_port(host: &str) -> Option<&str> {
    match host.rsplit_once(':') {
        None => Some(host),
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            Some(name)
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "tunnel.example.com";

    fn ok(host: &str) -> (u16, String) {
        let t = parse(host, D).unwrap_or_else(|e| panic!("{host}: {e}"));
        (t.port.get(), t.key)
    }

    #[test]
    fn accepts_tunnel_hosts() {
        assert_eq!(
            ok("3000-k3v9x2q7ma.tunnel.example.com"),
            (3000, "k3v9x2q7ma".into())
        );
        assert_eq!(
            ok("3000-K3V9X2Q7MA.Tunnel.Example.COM."),
            (3000, "k3v9x2q7ma".into())
        );
        assert_eq!(ok("1-a.tunnel.example.com:8080"), (1, "a".into()));
        assert_eq!(ok("65535-a.tunnel.example.com"), (65535, "a".into()));
    }

    #[test]
    fn host_and_server_name_agree() {
        let sni = Some("3000-k.tunnel.example.com");
        assert!(same_name("3000-k.tunnel.example.com", sni));
        assert!(same_name("3000-K.Tunnel.Example.com.:443", sni));
        assert!(!same_name("3001-k.tunnel.example.com", sni));
        assert!(!same_name("3000-k.tunnel.example.com", None));
    }

    #[test]
    fn rejects_everything_else() {
        for host in [
            "",
            "tunnel.example.com",
            "example.com",
            "3000-k.other.com",
            "3000-k.eviltunnel.example.com",
            "a.3000-k.tunnel.example.com",
            "3000k.tunnel.example.com",
            "-k.tunnel.example.com",
            "3000-.tunnel.example.com",
            "0-k.tunnel.example.com",
            "65536-k.tunnel.example.com",
            "03000-k.tunnel.example.com",
            "+300-k.tunnel.example.com",
            "3000-k_x.tunnel.example.com",
            "3000-k-x.tunnel.example.com",
            "3000-k.tunnel.example.com:abc",
            "[::1]:80",
            "127.0.0.1",
        ] {
            assert!(parse(host, D).is_err(), "{host:?} was accepted");
        }
        assert!(matches!(
            parse("0-k.tunnel.example.com", D),
            Err(HostError::BadPort(_))
        ));
    }
}
