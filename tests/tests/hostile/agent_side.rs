//! A hostile edge against a real agent: the test opens data streams on the edge's live QUIC
//! connection to the agent and writes what it likes, then checks the agent's answer, that no
//! local service was dialed that should not be, and that the agent is still connected (the same
//! connection) and serving. And agents that say hello with tokens the edge must refuse.
//!
//! Frames are written by hand from the documented layout (`protocol/src/stream.rs`):
//! `0x40 | len u16 | version u16 | port u16 | kind u8 | client option`, answered by
//! `0x41 | len u16 | 0` (accept) or `0x41 | len u16 | 1 | reason u8` (refuse).

use std::collections::HashMap;
use std::time::Duration;

use burrow_tests::testkit::ports::ReservedPort;
use burrow_tests::{Devbox, TestAgent, WAIT};
use tokio_util::sync::CancellationToken;

use crate::assert_status;
use crate::raw::Answer;
use crate::shared::{Shared, Tunnel, on_shared, shared};

use burrow_protocol::{RefuseReason, StreamAnswer, VERSION};

/// A stream header for `port` without a client address, written by hand: the hostile cases
/// need versions and kinds that `StreamHeader` cannot hold. `kind_and_version_match_the_crate`
/// checks it against the protocol crate's encoding.
fn header(version: u16, port: u16, kind: u8) -> Vec<u8> {
    let mut frame = vec![0x40, 0, 6];
    frame.extend_from_slice(&version.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&[kind, 0]);
    frame
}

/// The agent's refusal with `reason`.
fn refuse(reason: RefuseReason) -> Vec<u8> {
    StreamAnswer::Refuse(reason).encoded().to_vec()
}

/// The agent's answer that accepts a stream.
fn accept() -> Vec<u8> {
    StreamAnswer::Accept.encoded().to_vec()
}

#[test]
fn kind_and_version_match_the_crate() {
    use burrow_protocol::{Port, StreamHeader, StreamKind};
    let port = Port::new(8080).expect("a port");
    let http = StreamHeader::new(port, StreamKind::Http, None).encoded();
    assert_eq!(header(VERSION, 8080, 1), http.to_vec());
    let raw = StreamHeader::new(port, StreamKind::Raw, None).encoded();
    assert_eq!(header(VERSION, 8080, 2), raw.to_vec());
}

/// How a stream the test opened ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The agent finished its side after these bytes.
    Bytes(Vec<u8>),
    /// The agent reset the stream (or stopped it).
    Reset(String),
}

/// How long the agent gets to end a stream by itself: less than its own 10 s header timeout,
/// so only a deliberate refusal counts.
const ENDS_WITHIN: Duration = Duration::from_secs(8);

/// The stable id of the edge's connection to `tunnel`'s agent.
fn agent_conn(s: &Shared, tunnel: &Tunnel) -> usize {
    s.edge
        .edge()
        .registry
        .route(&tunnel.key)
        .expect("a route")
        .conn
        .expect("the agent is connected")
        .stable_id()
}

/// Opens a data stream to `tunnel`'s agent, writes `bytes` (then finishes, if `finish`), and
/// reads until the agent ends the stream.
async fn hostile_stream(s: &Shared, tunnel: &Tunnel, bytes: &[u8], finish: bool) -> End {
    let conn = s
        .edge
        .edge()
        .registry
        .route(&tunnel.key)
        .expect("a route")
        .conn
        .expect("the agent is connected");
    let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
    // The agent may stop reading once it has seen enough.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let read = tokio::time::timeout(ENDS_WITHIN, recv.read_to_end(64 * 1024))
        .await
        .unwrap_or_else(|_| panic!("the agent left the stream open for {ENDS_WITHIN:?}"));
    drop(send);
    match read {
        Ok(bytes) => End::Bytes(bytes),
        Err(e) => End::Reset(e.to_string()),
    }
}

/// Asserts the agent is still on the same connection, and serving.
async fn assert_agent_serving(s: &Shared, tunnel: &Tunnel, before: usize, case: &str) {
    assert_eq!(
        agent_conn(s, tunnel),
        before,
        "{case}: the agent's connection changed"
    );
    let status = tunnel.agent.status();
    assert!(
        status.connected && status.sessions == 1,
        "{case}: agent status {status:?}"
    );
    let echo = s.echo_service().await;
    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            tunnel.host(echo.addr.port())
        ))
        .await;
    assert_status(&answer, 200, &format!("{case}: a request afterwards"));
    s.assert_serving(case).await;
}

/// A malformed stream opening: the agent ends the stream without accepting it, dials nothing,
/// and stays connected.
async fn rejected(case: &str, make: impl Fn(u16) -> Vec<u8>, finish: bool) {
    let s = shared().await;
    let tunnel = s.tunnel("open", vec![]).await;
    let backend = s.raw_backend().await;
    let before = agent_conn(s, &tunnel);
    let end = hostile_stream(s, &tunnel, &make(backend.port), finish).await;
    match &end {
        End::Bytes(bytes) => assert!(
            bytes.is_empty() || bytes.starts_with(&[0x41, 0, 2, 1]),
            "{case}: the agent answered {bytes:?}"
        ),
        End::Reset(_) => {}
    }
    backend.assert_untouched(case);
    assert_agent_serving(s, &tunnel, before, case).await;
}

/// A header for port 0 (a valid header with its port bytes patched to 0).
#[tokio::test]
async fn agent_port_zero() {
    rejected("agent_port_zero", |_| header(VERSION, 0, 1), false).await;
}

/// An HTTP request where the stream header should be (its first bytes declare a 17 KB frame).
#[tokio::test]
async fn agent_http_instead_of_header() {
    rejected(
        "agent_http_instead_of_header",
        |port| format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").into_bytes(),
        false,
    )
    .await;
}

/// A frame of a type that is not a stream header.
#[tokio::test]
async fn agent_unknown_frame_type() {
    rejected(
        "agent_unknown_frame_type",
        |_| b"\x07\x00\x04abcd".to_vec(),
        false,
    )
    .await;
}

/// A stream header declaring a 65535-byte body (over the 16 KiB frame limit), never sent:
/// the agent must not wait for it.
#[tokio::test]
async fn agent_huge_frame_length() {
    rejected(
        "agent_huge_frame_length",
        |port| {
            let mut frame = vec![0x40, 0xff, 0xff];
            frame.extend_from_slice(&header(VERSION, port, 1)[3..]);
            frame
        },
        false,
    )
    .await;
}

/// The first five bytes of a valid header, then the end of the stream.
#[tokio::test]
async fn agent_truncated_header() {
    rejected(
        "agent_truncated_header",
        |port| header(VERSION, port, 1)[..5].to_vec(),
        true,
    )
    .await;
}

/// A header with an unknown stream kind (4: 1 is HTTP, 2 raw TCP, 3 HTTP/2).
#[tokio::test]
async fn agent_unknown_stream_kind() {
    rejected(
        "agent_unknown_stream_kind",
        |port| header(VERSION, port, 4),
        false,
    )
    .await;
}

/// A header whose client address has an unknown family tag.
#[tokio::test]
async fn agent_unknown_address_family() {
    rejected(
        "agent_unknown_address_family",
        |port| {
            let mut frame = header(VERSION, port, 1);
            frame[2] = 8;
            frame.truncate(8);
            frame.extend_from_slice(&[1, 5, 0]);
            frame
        },
        false,
    )
    .await;
}

/// A valid header with trailing garbage inside the declared body.
#[tokio::test]
async fn agent_header_trailing_bytes() {
    rejected(
        "agent_header_trailing_bytes",
        |port| {
            let mut frame = header(VERSION, port, 1);
            frame[2] = 7;
            frame.push(0xee);
            frame
        },
        false,
    )
    .await;
}

/// A header of a protocol version the agent does not speak: refused as such, nothing dialed.
#[tokio::test]
async fn agent_unsupported_version() {
    const CASE: &str = "agent_unsupported_version";
    let s = shared().await;
    let tunnel = s.tunnel("open", vec![]).await;
    let backend = s.raw_backend().await;
    let before = agent_conn(s, &tunnel);
    let end = hostile_stream(s, &tunnel, &header(99, backend.port, 1), false).await;
    assert_eq!(
        end,
        End::Bytes(refuse(RefuseReason::UnsupportedVersion)),
        "{CASE}"
    );
    backend.assert_untouched(CASE);
    assert_agent_serving(s, &tunnel, before, CASE).await;
}

/// A header for a port on the agent's deny list.
#[tokio::test]
async fn agent_denied_port() {
    const CASE: &str = "agent_denied_port";
    let s = shared().await;
    let backend = s.raw_backend().await;
    let tunnel = s
        .tunnel(
            "open",
            vec![("forward.deny_ports", backend.port.to_string())],
        )
        .await;
    let before = agent_conn(s, &tunnel);
    let end = hostile_stream(s, &tunnel, &header(VERSION, backend.port, 1), false).await;
    assert_eq!(
        end,
        End::Bytes(refuse(RefuseReason::PortNotAllowed)),
        "{CASE}"
    );
    // The same through the edge: 403.
    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            tunnel.host(backend.port)
        ))
        .await;
    assert_status(&answer, 403, CASE);
    backend.assert_untouched(CASE);
    assert_agent_serving(s, &tunnel, before, CASE).await;
}

/// A header for the agent's own metrics port, which is listening.
#[tokio::test]
async fn agent_metrics_port() {
    const CASE: &str = "agent_metrics_port";
    let s = shared().await;
    // Named in the agent's config, which is how the agent knows to deny it: reserved, not
    // bound on `:0`.
    let reserved = ReservedPort::new();
    let port = reserved.port();
    let tunnel = s
        .tunnel(
            "open",
            vec![("metrics.listen", format!("127.0.0.1:{port}"))],
        )
        .await;
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the agent's metrics listener is up");
    let before = agent_conn(s, &tunnel);
    let end = hostile_stream(s, &tunnel, &header(VERSION, port, 1), false).await;
    assert_eq!(
        end,
        End::Bytes(refuse(RefuseReason::PortNotAllowed)),
        "{CASE}"
    );
    assert_agent_serving(s, &tunnel, before, CASE).await;
}

/// More streams than the agent's cap (4): held streams to a service that never answers, then
/// a fifth is refused as too many; once they end, a new one is accepted.
#[tokio::test]
async fn agent_stream_cap() {
    const CASE: &str = "agent_stream_cap";
    let s = shared().await;
    let devbox = s.edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("a tunnel key");
    let vars = HashMap::from([(
        burrow_agent::config::TOKEN_ENV.to_owned(),
        devbox.agent_token.clone(),
    )]);
    let mut flags = s.edge.agent_flags(None);
    flags.push(("state_dir", s.edge.agent_state_dir().display().to_string()));
    let mut config = burrow_agent::Config::load(None, &vars, &flags).expect("agent config");
    // No flag sets it: the cap is a field of the checked config.
    config.max_streams = 4;
    let stop = CancellationToken::new();
    let token = stop.clone();
    let agent = on_shared(async move { burrow_agent::Agent::spawn(config, token) }).await;
    let _stop = stop.drop_guard();
    let mut status = agent.status.clone();
    tokio::time::timeout(WAIT, status.wait_for(|st| st.connected))
        .await
        .expect("the agent connects")
        .expect("agent running");
    let route = s.edge.edge().registry.route(&key).expect("a route");
    let conn = route.conn.expect("connected");
    let before = conn.stable_id();
    let backend = s.raw_backend().await;

    let mut held = Vec::new();
    for i in 0..4 {
        let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
        send.write_all(&header(VERSION, backend.port, 1))
            .await
            .expect("write a header");
        let mut answer = [0u8; 4];
        tokio::time::timeout(WAIT, recv.read_exact(&mut answer))
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(answer.to_vec(), accept(), "{CASE}: stream {i}");
        held.push((send, recv));
    }
    backend.wait_accepted(4).await;

    let tunnel_host = crate::shared::host(backend.port, &key);
    let fifth = {
        let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
        send.write_all(&header(VERSION, backend.port, 1))
            .await
            .expect("write a header");
        tokio::time::timeout(ENDS_WITHIN, recv.read_to_end(1024))
            .await
            .expect("the fifth is answered")
    };
    assert_eq!(
        fifth.as_deref().ok(),
        Some(&refuse(RefuseReason::TooManyStreams)[..]),
        "{CASE}: the fifth stream"
    );
    // Through the edge: 503 while the agent is at its cap.
    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {tunnel_host}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_status(&answer, 503, CASE);
    assert_eq!(backend.accepted(), 4, "{CASE}: a refused stream was dialed");

    for (mut send, mut recv) in held {
        send.finish().expect("finish");
        let _ = tokio::time::timeout(WAIT, recv.read_to_end(1024))
            .await
            .expect("the held stream ends");
    }
    tokio::time::timeout(WAIT, status.wait_for(|st| st.streams == 0))
        .await
        .expect("the agent's streams end")
        .expect("agent running");

    let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
    send.write_all(&header(VERSION, backend.port, 1))
        .await
        .expect("write a header");
    let mut answer = [0u8; 4];
    tokio::time::timeout(WAIT, recv.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(
        answer.to_vec(),
        accept(),
        "{CASE}: a stream after the others ended"
    );
    drop((send, recv));

    let echo = s.echo_service().await;
    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            crate::shared::host(echo.addr.port(), &key)
        ))
        .await;
    assert_status(&answer, 200, CASE);
    let after = s
        .edge
        .edge()
        .registry
        .route(&key)
        .and_then(|r| r.conn)
        .map(|c| c.stable_id());
    assert_eq!(after, Some(before), "{CASE}: the agent reconnected");
    s.assert_serving(CASE).await;
}

/// The edge's count of hellos refused for their token.
fn bad_token_hellos(s: &Shared) -> u64 {
    s.edge
        .edge()
        .metrics
        .agent_hellos
        .with_label_values(&["bad_token"])
        .get()
}

/// Starts an agent with `devbox`'s token and waits until the edge has refused it.
async fn assert_refused(s: &'static Shared, devbox: Devbox, case: &str) {
    let before = bad_token_hellos(s);
    let agent = on_shared(async move { TestAgent::spawn(&s.edge, &devbox, &[]) }).await;
    agent
        .wait_for("refused by the edge", |st| {
            st.last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused"))
        })
        .await;
    let status = agent.status();
    assert!(
        !status.connected && status.sessions == 0,
        "{case}: agent status {status:?}"
    );
    assert!(
        bad_token_hellos(s) > before,
        "{case}: the edge counted no bad-token hello"
    );
}

/// A hello with a made-up agent token.
#[tokio::test]
async fn agent_hello_wrong_token() {
    const CASE: &str = "agent_hello_wrong_token";
    let s = shared().await;
    let devbox = Devbox {
        id: "nobody".into(),
        agent_token: "made-up-agent-token".into(),
        key: None,
        auth_token: None,
    };
    assert_refused(s, devbox, CASE).await;
    s.assert_serving(CASE).await;
}

/// A hello with the token of a deleted (revoked) devbox; the connected agent is cut off too.
#[tokio::test]
async fn agent_hello_revoked_token() {
    const CASE: &str = "agent_hello_revoked_token";
    let s = shared().await;
    let tunnel = s.tunnel("open", vec![]).await;
    let echo = s.echo_service().await;
    let (status, _) = s
        .edge
        .admin(
            "DELETE",
            &format!("/v1/devboxes/{}", tunnel.devbox.id),
            None,
        )
        .await;
    assert_eq!(status, 204, "{CASE}: delete");
    tunnel.agent.wait_for("cut off", |st| !st.connected).await;
    let (answer, _): (Answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            tunnel.host(echo.addr.port())
        ))
        .await;
    assert_status(&answer, 404, CASE);
    assert_refused(s, tunnel.devbox.clone(), CASE).await;
    assert_eq!(echo.seen.lock().expect("lock").requests.len(), 0, "{CASE}");
    s.assert_serving(CASE).await;
}
