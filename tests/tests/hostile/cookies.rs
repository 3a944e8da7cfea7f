//! The browser's way into an authenticated tunnel: the token once in the query
//! (`?burrow_token=`), answered by the edge with a redirect that sets the `burrow_auth` cookie,
//! then the cookie alone. Query tokens and cookies that are wrong, forged, not hex, another
//! tunnel's or from before a rotation are refused; an open tunnel ignores the parameter.

use std::hash::{BuildHasher, RandomState};

use serde_json::Value;

use crate::assert_status;
use crate::raw::{Answer, connect_tls};
use crate::shared::{Shared, Tunnel, shared};
use crate::tokens::refused;

/// The `Set-Cookie` attributes after the value, over plain HTTP (HTTPS adds `Secure`).
const ATTRIBUTES: [&str; 4] = ["Path=/", "Max-Age=604800", "HttpOnly", "SameSite=Lax"];

/// Asserts that `answer` is the edge's answer to a first visit of `tunnel`: 303 to `path` on
/// the same host (an absolute URL: scheme, the tunnel's host, then `path`), not cached, no
/// referrer, exactly one `Set-Cookie` with the attributes above (and `Secure` if `secure`,
/// never `Domain`); returns the cookie's value.
#[track_caller]
fn redirect_cookie(
    answer: &Answer,
    tunnel: &Tunnel,
    path: &str,
    secure: bool,
    case: &str,
) -> String {
    assert_status(answer, 303, case);
    let r = answer.response();
    let location = r.header("location").unwrap_or_default();
    let scheme = if secure { "https://" } else { "http://" };
    let (authority, rest) = location
        .strip_prefix(scheme)
        .and_then(|l| l.split_at_checked(l.find('/')?))
        .unwrap_or_else(|| {
            panic!("{case}: Location is not an absolute {scheme} URL: {location:?}")
        });
    assert!(
        authority.contains(&format!("-{}.", tunnel.key)),
        "{case}: Location leaves the tunnel's host: {location:?}"
    );
    assert_eq!(rest, path, "{case}: Location {location:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{case}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{case}");
    let cookies: Vec<&str> = r
        .headers
        .iter()
        .filter(|(name, _)| name == "set-cookie")
        .map(|(_, value)| value.as_str())
        .collect();
    let [cookie] = cookies[..] else {
        panic!("{case}: expected one Set-Cookie, got {cookies:?}");
    };
    let mut parts = cookie.split("; ");
    let value = parts
        .next()
        .and_then(|first| first.strip_prefix("burrow_auth="))
        .unwrap_or_else(|| panic!("{case}: Set-Cookie: {cookie}"));
    assert!(
        value.split_once('.').is_some_and(|(issued, tag)| {
            issued.parse::<u64>().is_ok()
                && tag.len() == 64
                && tag.bytes().all(|b| b.is_ascii_hexdigit())
        }),
        "{case}: the cookie's value is not `{{issued}}.{{64 hex}}`: {value:?}"
    );
    let mut expected = ATTRIBUTES.to_vec();
    if secure {
        expected.push("Secure");
    }
    let attributes: Vec<&str> = parts.collect();
    assert_eq!(attributes, expected, "{case}: Set-Cookie: {cookie}");
    value.to_owned()
}

/// A browser's first visit to `tunnel` with `token` in the query; the cookie it is given.
async fn visit(s: &Shared, tunnel: &Tunnel, token: &str, case: &str) -> String {
    let (answer, reached) = s
        .get_through(tunnel, &format!("/?burrow_token={token}"), "")
        .await;
    assert_eq!(reached.len(), 0, "{case}: the visit reached the service");
    redirect_cookie(&answer, tunnel, "/", false, case)
}

/// The `Cookie` header line carrying `value` as the tunnel's cookie.
fn cookie_line(value: &str) -> String {
    format!("Cookie: burrow_auth={value}\r\n")
}

/// The right token in the query as `burrow_token`: 303 to the same URL without it (other
/// parameters kept, in order), setting the cookie; the service is not reached. Then the cookie
/// alone, among other cookies, is served: neither it nor the token reaches the service, the
/// other cookies do.
#[tokio::test]
async fn token_in_query_burrow_token() {
    const CASE: &str = "token_in_query_burrow_token";
    let s = shared().await;
    let token = s.auth.token();
    let path = format!("/page?a=1&burrow_token={token}&b=2");
    let (answer, reached) = s.get_through(&s.auth, &path, "").await;
    let cookie = redirect_cookie(&answer, &s.auth, "/page?a=1&b=2", false, CASE);
    assert_eq!(reached.len(), 0, "{CASE}: the visit reached the service");

    let (answer, requests) = s
        .get_through(
            &s.auth,
            "/page?a=1&b=2",
            &format!("Cookie: theme=dark; burrow_auth={cookie}; lang=en\r\n"),
        )
        .await;
    assert_status(&answer, 200, CASE);
    assert_eq!(requests.len(), 1, "{CASE}");
    for (name, value) in &requests[0] {
        assert!(
            !value.contains(&cookie) && !value.contains(token) && !value.contains("burrow_auth"),
            "{CASE}: the cookie or the token reached the service in `{name}: {value}`"
        );
    }
    let cookies: Vec<&str> = requests[0]
        .iter()
        .filter(|(name, _)| name == "cookie")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(
        cookies,
        ["theme=dark; lang=en"],
        "{CASE}: the other cookies"
    );
    let json: Value = serde_json::from_slice(&answer.response().body).expect("echo JSON");
    assert_eq!(json["query"], "a=1&b=2", "{CASE}: {json}");
    s.assert_serving(CASE).await;
}

/// A first visit whose path starts with `//`: the redirect stays on the tunnel's host (a
/// relative `//elsewhere.example/` would send the browser to another site).
#[tokio::test]
async fn query_token_redirect_stays_on_the_host() {
    const CASE: &str = "query_token_redirect_stays_on_the_host";
    let s = shared().await;
    let path = format!("//elsewhere.example/x?burrow_token={}", s.auth.token());
    let (answer, reached) = s.get_through(&s.auth, &path, "").await;
    redirect_cookie(&answer, &s.auth, "//elsewhere.example/x", false, CASE);
    assert_eq!(reached.len(), 0, "{CASE}: the visit reached the service");
    s.assert_serving(CASE).await;
}

/// The first visit over HTTPS: the cookie is also `Secure`.
#[tokio::test]
async fn query_token_over_https() {
    const CASE: &str = "query_token_over_https";
    let s = shared().await;
    let echo = s.echo_service().await;
    let ca = s.edge.public_ca.as_deref().expect("HTTPS on");
    let https = s.edge.edge().https_addr.expect("HTTPS listener");
    let host = s.auth.host(echo.addr.port());
    let mut conn = connect_tls(https, ca, &host).await;
    let answer = conn
        .exchange(format!(
            "GET /?burrow_token={} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            s.auth.token()
        ))
        .await;
    redirect_cookie(&answer, &s.auth, "/", true, CASE);
    let reached = echo.seen.lock().expect("lock").requests.len();
    assert_eq!(reached, 0, "{CASE}: the visit reached the service");
    s.assert_serving(CASE).await;
}

/// A wrong `burrow_token`: made up, empty, the right one with one more character, another
/// tunnel's. 401, no cookie.
#[tokio::test]
async fn query_token_wrong() {
    const CASE: &str = "query_token_wrong";
    let s = shared().await;
    let wrong = [
        "not-the-token".to_owned(),
        String::new(),
        format!("{}x", s.auth.token()),
        s.auth2.token().to_owned(),
    ];
    for token in wrong {
        let case = format!("{CASE} ({token:?})");
        let path = format!("/page?a=1&burrow_token={token}");
        refused(s, &s.auth, &case, &path, "").await;
    }
    s.assert_serving(CASE).await;
}

/// 64 random hex characters as the cookie, and a real cookie with its last digit changed.
#[tokio::test]
async fn cookie_forged() {
    const CASE: &str = "cookie_forged";
    let s = shared().await;
    let random = RandomState::new();
    let tag: String = (0..4u8)
        .map(|i| format!("{:016x}", random.hash_one(i)))
        .collect();
    let real = visit(s, &s.auth, s.auth.token(), CASE).await;
    let (issued, real_tag) = real.split_once('.').expect("issued.tag");
    let forged = format!("{issued}.{tag}");
    let mut changed = real.clone();
    let last = changed.pop();
    changed.push(if last == Some('0') { '1' } else { '0' });
    // The real tag with another issue time: a later one would outlive the cookie's Max-Age.
    let later = issued.parse::<u64>().expect("seconds") + 3600;
    let moved = format!("{later}.{real_tag}");
    for value in [forged, changed, moved, tag] {
        let case = format!("{CASE} ({value})");
        refused(s, &s.auth, &case, "/", &cookie_line(&value)).await;
    }
    s.assert_serving(CASE).await;
}

/// Cookie values that are not 64 hex characters: 64 `z`s, the tunnel's token itself, empty.
#[tokio::test]
async fn cookie_not_hex() {
    const CASE: &str = "cookie_not_hex";
    let s = shared().await;
    for value in ["z".repeat(64), s.auth.token().to_owned(), String::new()] {
        let case = format!("{CASE} ({value:?})");
        refused(s, &s.auth, &case, "/", &cookie_line(&value)).await;
    }
    s.assert_serving(CASE).await;
}

/// The cookie another authenticated tunnel gave (it works there): 401 here.
#[tokio::test]
async fn cookie_of_another_tunnel() {
    const CASE: &str = "cookie_of_another_tunnel";
    let s = shared().await;
    let theirs = visit(s, &s.auth2, s.auth2.token(), CASE).await;
    let (answer, reached) = s.get_through(&s.auth2, "/", &cookie_line(&theirs)).await;
    assert_status(&answer, 200, &format!("{CASE}: on its own tunnel"));
    assert_eq!(reached.len(), 1, "{CASE}: on its own tunnel");
    refused(s, &s.auth, CASE, "/", &cookie_line(&theirs)).await;
    s.assert_serving(CASE).await;
}

/// A `burrow_auth` cookie another tunnel's service set for the parent domain and a longer
/// path comes first in the browser's `Cookie` header: the tunnel's own cookie after it still
/// lets the request through, and neither reaches the service.
#[tokio::test]
async fn cookie_shadowed_by_another() {
    const CASE: &str = "cookie_shadowed_by_another";
    let s = shared().await;
    let ours = visit(s, &s.auth, s.auth.token(), CASE).await;
    let lines = format!(
        "Cookie: burrow_auth={}; burrow_auth={ours}\r\n",
        "ab".repeat(32)
    );
    let (answer, reached) = s.get_through(&s.auth, "/", &lines).await;
    assert_status(&answer, 200, CASE);
    assert_eq!(reached.len(), 1, "{CASE}");
    for (name, value) in &reached[0] {
        assert!(
            !value.contains("burrow_auth"),
            "{CASE}: a tunnel cookie reached the service in `{name}`"
        );
    }
    s.assert_serving(CASE).await;
}

/// A cookie from before `rotate-token`: 401 saying the token was rotated, and the old token
/// in the query is refused too; a visit with the new token gives a new cookie that works.
#[tokio::test]
async fn cookie_after_rotation() {
    const CASE: &str = "cookie_after_rotation";
    let s = shared().await;
    let tunnel = s.tunnel("authenticated", vec![]).await;
    let old_token = tunnel.token().to_owned();
    let old = visit(s, &tunnel, &old_token, CASE).await;
    let (answer, _) = s.get_through(&tunnel, "/", &cookie_line(&old)).await;
    assert_status(&answer, 200, &format!("{CASE}: before the rotation"));

    let new_token = s.rotate_token(&tunnel, CASE).await;
    let answer = refused(s, &tunnel, CASE, "/", &cookie_line(&old)).await;
    let body = String::from_utf8_lossy(&answer.response().body);
    assert!(body.contains("rotated"), "{CASE}: the 401 says {body:?}");
    let path = format!("/?burrow_token={old_token}");
    refused(s, &tunnel, &format!("{CASE}: the old token"), &path, "").await;

    let new = visit(s, &tunnel, &new_token, CASE).await;
    assert_ne!(new, old, "{CASE}: the same cookie after the rotation");
    let (answer, reached) = s.get_through(&tunnel, "/", &cookie_line(&new)).await;
    assert_status(&answer, 200, &format!("{CASE}: the new cookie"));
    assert_eq!(reached.len(), 1, "{CASE}");
    s.assert_serving(CASE).await;
}

/// `burrow_token` on an open tunnel: an open tunnel does not look at it, so the request is
/// forwarded as it came, the parameter included, and no cookie is set.
#[tokio::test]
async fn query_token_on_open_tunnel() {
    const CASE: &str = "query_token_on_open_tunnel";
    let s = shared().await;
    let (answer, reached) = s
        .get_through(&s.open, "/page?a=1&burrow_token=anything&b=2", "")
        .await;
    assert_status(&answer, 200, CASE);
    assert_eq!(reached.len(), 1, "{CASE}");
    let cookie = answer.response().header("set-cookie");
    assert_eq!(cookie, None, "{CASE}: an open tunnel set a cookie");
    let json: Value = serde_json::from_slice(&answer.response().body).expect("echo JSON");
    assert_eq!(
        json["query"], "a=1&burrow_token=anything&b=2",
        "{CASE}: {json}"
    );
    s.assert_serving(CASE).await;
}
