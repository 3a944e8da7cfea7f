//! Hostile credentials: tunnel bearer tokens that are missing, wrong, someone else's, in the
//! wrong place or the wrong scheme, rotated; agent tokens rotated; admin token guessing. (The
//! browser's way in, `?burrow_token=` and the cookie, is [`crate::cookies`].)

use std::net::{IpAddr, Ipv4Addr};

use burrow_tests::TestAgent;
use serde_json::Value;

use crate::assert_status;
use crate::raw::{Answer, Raw};
use crate::shared::{Shared, Tunnel, on_shared, shared};

/// A GET of `path` with header `lines` through `tunnel` that must get 401 with the bearer
/// challenge, set no cookie and reach nothing; the answer.
pub(crate) async fn refused(
    s: &Shared,
    tunnel: &Tunnel,
    case: &str,
    path: &str,
    lines: &str,
) -> Answer {
    let (answer, reached) = s.get_through(tunnel, path, lines).await;
    assert_status(&answer, 401, case);
    let challenge = answer.response().header("www-authenticate").unwrap_or("");
    assert!(
        challenge.starts_with("Bearer"),
        "{case}: WWW-Authenticate: {challenge:?}"
    );
    let cookie = answer.response().header("set-cookie");
    assert_eq!(cookie, None, "{case}: a refusal set a cookie");
    assert_eq!(reached.len(), 0, "{case}: the request reached the service");
    answer
}

/// A request to the shared authenticated tunnel that must be refused (see [`refused`]).
async fn unauthorized(case: &str, path: &str, lines: impl Fn(&Shared) -> String) {
    let s = shared().await;
    refused(s, &s.auth, case, path, &lines(s)).await;
    s.assert_serving(case).await;
}

/// No `Authorization` header.
#[tokio::test]
async fn token_missing() {
    unauthorized("token_missing", "/", |_| String::new()).await;
}

/// A made-up bearer token.
#[tokio::test]
async fn token_wrong() {
    unauthorized("token_wrong", "/", |_| {
        "Authorization: Bearer not-the-token\r\n".into()
    })
    .await;
}

/// `Bearer` with nothing after it.
#[tokio::test]
async fn token_empty() {
    unauthorized("token_empty", "/", |_| "Authorization: Bearer \r\n".into()).await;
}

/// The right token with one more character (a prefix comparison would take it).
#[tokio::test]
async fn token_with_suffix() {
    unauthorized("token_with_suffix", "/", |s| {
        format!("Authorization: Bearer {}x\r\n", s.auth.token())
    })
    .await;
}

/// The valid token of another authenticated tunnel.
#[tokio::test]
async fn token_of_another_tunnel() {
    unauthorized("token_of_another_tunnel", "/", |s| {
        format!("Authorization: Bearer {}\r\n", s.auth2.token())
    })
    .await;
}

/// The right token in the query string as `access_token`.
#[tokio::test]
async fn token_in_query_access_token() {
    let s = shared().await;
    let path = format!("/?access_token={}", s.auth.token());
    unauthorized("token_in_query_access_token", &path, |_| String::new()).await;
}

/// The right token under the `Basic` scheme.
#[tokio::test]
async fn token_basic_scheme() {
    unauthorized("token_basic_scheme", "/", |s| {
        format!("Authorization: Basic {}\r\n", s.auth.token())
    })
    .await;
}

/// The right token: served, and the token reaches the service nowhere.
#[tokio::test]
async fn token_right() {
    const CASE: &str = "token_right";
    let s = shared().await;
    let token = s.auth.token();
    let (answer, requests) = s
        .get_through(
            &s.auth,
            "/private",
            &format!("Authorization: Bearer {token}\r\n"),
        )
        .await;
    assert_status(&answer, 200, CASE);
    assert_eq!(requests.len(), 1, "{CASE}");
    for (name, value) in &requests[0] {
        assert!(
            !value.contains(token),
            "{CASE}: the token reached the service in `{name}`"
        );
    }
    s.assert_serving(CASE).await;
}

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

/// After `rotate-token`, the old tunnel token is refused and the new one served, on the same
/// agent connection.
#[tokio::test]
async fn token_rotated() {
    const CASE: &str = "token_rotated";
    let s = shared().await;
    let tunnel = s.tunnel("authenticated", vec![]).await;
    let before = agent_conn(s, &tunnel);
    let old = tunnel.token().to_owned();
    let new = s.rotate_token(&tunnel, CASE).await;
    refused(
        s,
        &tunnel,
        CASE,
        "/",
        &format!("Authorization: Bearer {old}\r\n"),
    )
    .await;
    let (answer, reached) = s
        .get_through(&tunnel, "/", &format!("Authorization: Bearer {new}\r\n"))
        .await;
    assert_status(&answer, 200, CASE);
    assert_eq!(reached.len(), 1, "{CASE}");
    assert_eq!(
        agent_conn(s, &tunnel),
        before,
        "{CASE}: the agent reconnected"
    );
    assert_eq!(
        tunnel.agent.status().sessions,
        1,
        "{CASE}: the agent reconnected"
    );
    s.assert_serving(CASE).await;
}

/// After `rotate-agent-token`, the running agent keeps serving; an agent that dials with the
/// old token is refused, one with the new token connects.
#[tokio::test]
async fn agent_token_rotated() {
    const CASE: &str = "agent_token_rotated";
    let s = shared().await;
    let tunnel = s.tunnel("open", vec![]).await;
    let echo = s.echo_service().await;
    let before = agent_conn(s, &tunnel);
    let (status, json) = s
        .edge
        .admin(
            "POST",
            &format!("/v1/devboxes/{}/rotate-agent-token", tunnel.devbox.id),
            None,
        )
        .await;
    assert_eq!(status, 200, "{CASE}: rotate: {json}");
    let new = json["agent_token"]
        .as_str()
        .expect("a new agent token")
        .to_owned();
    assert_ne!(new, tunnel.devbox.agent_token, "{CASE}");

    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            tunnel.host(echo.addr.port())
        ))
        .await;
    assert_status(&answer, 200, CASE);
    assert_eq!(
        agent_conn(s, &tunnel),
        before,
        "{CASE}: the agent reconnected"
    );

    let bad_tokens = || {
        s.edge
            .edge()
            .metrics
            .agent_hellos
            .with_label_values(&["bad_token"])
            .get()
    };
    let refused_before = bad_tokens();
    let old_devbox = tunnel.devbox.clone();
    let old = on_shared(async move { TestAgent::spawn(&s.edge, &old_devbox, &[]) }).await;
    old.wait_for("refused with the old token", |st| {
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused"))
    })
    .await;
    let status = old.status();
    assert!(
        !status.connected && status.sessions == 0,
        "{CASE}: {status:?}"
    );
    assert!(
        bad_tokens() > refused_before,
        "{CASE}: no bad_token hello counted"
    );

    let mut new_devbox = tunnel.devbox.clone();
    new_devbox.agent_token = new;
    let fresh = on_shared(async move { TestAgent::start(&s.edge, &new_devbox).await }).await;
    assert_eq!(fresh.status().sessions, 1, "{CASE}");
    let (answer, _) = s
        .raw(format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            tunnel.host(echo.addr.port())
        ))
        .await;
    assert_status(&answer, 200, CASE);
    assert_ne!(
        agent_conn(s, &tunnel),
        before,
        "{CASE}: the new agent serves"
    );
    s.assert_serving(CASE).await;
}

/// An admin call from `from` with `token`.
async fn admin_from(s: &Shared, from: IpAddr, token: &str) -> Answer {
    let mut conn = Raw::connect_from(from, s.edge.edge().admin_addr).await;
    conn.exchange(format!(
        "GET /v1/devboxes HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    ))
    .await
}

/// Admin token guessing from one address (`admin_failures = 3`): after three failures even
/// the right token gets 429 there, while another address is unaffected.
#[tokio::test]
async fn admin_token_guessing() {
    const CASE: &str = "admin_token_guessing";
    let s = shared().await;
    let guesser = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    for i in 1..=3 {
        let answer = admin_from(s, guesser, &format!("guess-{i}")).await;
        assert_status(&answer, 401, &format!("{CASE}: guess {i}"));
    }
    let answer = admin_from(s, guesser, "guess-4").await;
    assert_status(&answer, 429, &format!("{CASE}: guess 4"));
    let retry = answer.response().header("retry-after").unwrap_or("");
    assert!(
        retry.parse::<u32>().is_ok_and(|r| r > 0),
        "{CASE}: Retry-After {retry:?}"
    );

    let right = s.edge.edge().admin_token.expose().to_owned();
    let answer = admin_from(s, guesser, &right).await;
    assert_status(
        &answer,
        429,
        &format!("{CASE}: the right token from the guesser"),
    );
    let body: Value = serde_json::from_slice(&answer.response().body).expect("JSON");
    assert!(body["error"].is_string(), "{CASE}: {body}");

    let (status, _) = s.edge.admin("GET", "/v1/devboxes", None).await;
    assert_eq!(status, 200, "{CASE}: another address");
    s.assert_serving(CASE).await;
}
