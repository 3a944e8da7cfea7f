//! What the agent reports about itself: its connection state, devbox, tunnel, streams.
//! Published on a `watch` channel so tests, logs, metrics and the systemd status line read one
//! source; `burrow-agent status` prints it for a person.

use std::time::Duration;

use burrow_protocol::TunnelState;

/// Where the reconnect state machine stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum State {
    /// Waiting before the next dial.
    #[default]
    Disconnected,
    /// Dialing.
    Connecting,
    /// A session is up.
    Connected,
    /// Another agent with the same token took over; waiting for it to leave.
    Standby,
    /// Shutting down: running streams finish.
    Draining,
}

impl State {
    /// A short word for logs and status lines.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Disconnected => "disconnected",
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Standby => "standby",
            State::Draining => "draining",
        }
    }
}

/// The agent's state as others see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The reconnect state.
    pub state: State,
    /// Whether a session with the edge is up.
    pub connected: bool,
    /// The devbox the edge says this agent serves (after the first welcome).
    pub devbox_id: Option<String>,
    /// The tunnel, if enabled.
    pub tunnel: Option<TunnelState>,
    /// Sessions established since start.
    pub sessions: u64,
    /// Data streams open now.
    pub streams: u64,
    /// Resumes detected since start.
    pub resumes: u64,
    /// The last heartbeat round trip.
    pub rtt: Option<Duration>,
    /// The last error that ended a session or a dial, for the log and the status line.
    pub last_error: Option<String>,
}

/// The agent's status as one line (systemd's `STATUS=`), e.g. `connected, tunnel https://{port}-k3v9.example.com
/// (open), 2 streams open`.
pub fn status_line(status: &Status) -> String {
    let mut line = match status.state {
        State::Connected => "connected to the edge".to_owned(),
        State::Standby => "standby: another agent with this token is connected".to_owned(),
        State::Draining => "draining".to_owned(),
        State::Connecting | State::Disconnected => {
            let mut s = format!("{}, not connected to the edge", status.state.as_str());
            if let Some(error) = &status.last_error {
                s.push_str(&format!(" (last error: {error})"));
            }
            s
        }
    };
    match &status.tunnel {
        Some(tunnel) => line.push_str(&format!(
            ", tunnel {} ({})",
            tunnel.url_template,
            tunnel.auth_mode.as_str()
        )),
        None if status.devbox_id.is_some() => line.push_str(", tunnel disabled"),
        None => {}
    }
    let plural = if status.streams == 1 { "" } else { "s" };
    line.push_str(&format!(", {} stream{plural} open", status.streams));
    line
}

/// `burrow-agent status`: asks a running agent's metrics listener for its `/status` and prints
/// it for a person (or as JSON). Exit 0 when the agent is connected, 1 when it runs but is not,
/// 2 when it cannot be asked (no listener configured, nothing answering).
pub fn command(
    metrics: Option<&str>,
    config: Option<&std::path::Path>,
    json: bool,
    env: &std::collections::HashMap<String, String>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let addr = match listener_address(metrics, config, env) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("burrow-agent status: {e}");
            return ExitCode::from(2);
        }
    };
    let body = match fetch(addr) {
        Ok(body) => body,
        Err(e) => {
            eprintln!(
                "burrow-agent status: no agent answers on {addr} ({e}); is burrow-agent running with metrics.listen = \"{addr}\"?"
            );
            return ExitCode::from(2);
        }
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        eprintln!("burrow-agent status: {addr} did not answer with a status (is it an agent?)");
        return ExitCode::from(2);
    };
    if json {
        println!("{v:#}");
    } else {
        print!("{}", render(&v));
    }
    if v["connected"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Where the agent's metrics listener is, as a dialable loopback address.
fn listener_address(
    metrics: Option<&str>,
    config: Option<&std::path::Path>,
    env: &std::collections::HashMap<String, String>,
) -> Result<std::net::SocketAddr, String> {
    let configured = match metrics {
        Some(m) => Some(m.to_owned()),
        None => {
            let path = config
                .map(std::path::Path::to_path_buf)
                .or_else(|| env.get("BURROW_CONFIG").map(std::path::PathBuf::from));
            let text = path
                .as_deref()
                .map(burrow_runtime::sources::read_file)
                .transpose()
                .map_err(|e| e.to_string())?;
            let file = path
                .as_deref()
                .zip(text.as_deref())
                .map(|(path, text)| burrow_runtime::sources::File { path, text });
            let table = burrow_runtime::sources::layer(crate::config::SETTINGS, file, env, &[])
                .map_err(|e| e.to_string())?;
            table
                .get("metrics")
                .and_then(|m| m.get("listen"))
                .and_then(|l| l.as_str())
                .map(str::to_owned)
        }
    };
    let listen = configured.ok_or_else(|| {
        "the agent's metrics listener is not known: pass --metrics ADDR:PORT, or --config with metrics.listen set".to_owned()
    })?;
    let mut addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| format!("`{listen}` is not an address:port"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(addr)
}

fn fetch(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(5);
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.write_all(b"GET /status HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")?;
    let mut response = String::new();
    tcp.take(1 << 20).read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            head.lines().next().unwrap_or("bad answer").to_owned(),
        ));
    }
    Ok(body.to_owned())
}

/// The status for a person.
fn render(v: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let mut out = String::new();
    let uptime = v["uptime_secs"].as_u64().unwrap_or(0);
    out += &format!("edge:          {}\n", text(&v["edge"]));
    out += &format!(
        "state:         {} ({} sessions, {} resumes, up {}h{:02}m{:02}s)\n",
        text(&v["state"]),
        v["sessions"],
        v["resumes"],
        uptime / 3600,
        uptime / 60 % 60,
        uptime % 60
    );
    out += &format!("devbox:        {}\n", text(&v["devbox"]));
    match v["tunnel"].as_object() {
        Some(t) => {
            out += &format!(
                "tunnel:        {} ({}, key {})\n",
                text(&t["url_template"]),
                text(&t["auth_mode"]),
                text(&t["key"])
            );
        }
        None => out += "tunnel:        not enabled\n",
    }
    let rtt = v["rtt_ms"]
        .as_f64()
        .map_or_else(|| "-".to_owned(), |r| format!("{r:.1} ms"));
    let age = v["heartbeat_age_secs"]
        .as_f64()
        .map_or_else(|| "never".to_owned(), |a| format!("{a:.0} s ago"));
    out += &format!("rtt:           {rtt} (last heartbeat answer {age})\n");
    out += &format!("streams open:  {}\n", v["streams_open"]);
    out += &format!("last error:    {}\n", text(&v["last_error"]));
    out += "busiest ports:";
    match v["busiest_ports"].as_array().filter(|p| !p.is_empty()) {
        None => out += " none yet\n",
        Some(ports) => {
            out += "\n";
            for p in ports {
                out += &format!(
                    "  {:>5}  {} streams, {} refused, {} bytes\n",
                    p["port"], p["streams"], p["refused"], p["bytes"]
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use burrow_protocol::AuthMode;

    use super::*;

    fn connected(streams: u64) -> Status {
        Status {
            state: State::Connected,
            connected: true,
            devbox_id: Some("db1".into()),
            tunnel: Some(TunnelState {
                key: "k3v9x2q7ma".into(),
                auth_mode: AuthMode::Open,
                url_template: "https://{port}-k3v9x2q7ma.tunnel.example.com".into(),
            }),
            sessions: 1,
            streams,
            ..Status::default()
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status_line(&connected(1)),
            "connected to the edge, tunnel https://{port}-k3v9x2q7ma.tunnel.example.com (open), \
             1 stream open"
        );
        let disabled = Status {
            tunnel: None,
            ..connected(0)
        };
        assert_eq!(
            status_line(&disabled),
            "connected to the edge, tunnel disabled, 0 streams open"
        );
        let draining = Status {
            state: State::Draining,
            ..connected(3)
        };
        assert!(status_line(&draining).starts_with("draining, tunnel https://"));
        let connecting = Status {
            state: State::Connecting,
            ..Status::default()
        };
        assert_eq!(
            status_line(&connecting),
            "connecting, not connected to the edge, 0 streams open"
        );
    }
}
