//! Who may use an `authenticated` tunnel: a request with the tunnel's token as a bearer token,
//! or a browser holding the tunnel's cookie.
//!
//! A browser cannot add a header to a link, so a person opens the tunnel once with the token in
//! the query (`?burrow_token=...`). The edge checks it and answers with a redirect to the same
//! URL without the token (so it stays out of the address bar, the history and the service's
//! logs) that sets [`COOKIE`]: HttpOnly, SameSite=Lax, Secure over HTTPS, for that host only.
//! The cookie holds `{issued}.{HMAC-SHA256(edge key, tunnel key, hash of the token, issued)}`
//! (issued: Unix seconds), not the token: it is worthless without the edge's key (kept in
//! `state_dir`, not in the store), the edge refuses it once it is older than its Max-Age
//! (a copied value does not outlive the browser's), and it stops working when the token is
//! rotated, because the hash changes. Neither the cookie nor the tunnel's bearer token ever
//! reaches the service.

use std::path::Path;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Uri};
use ring::hmac;

use crate::pages;
use crate::proxy::Body;
use crate::secret::{self, Secret, TokenHash};

/// The query parameter that carries the token on a browser's first visit.
pub const QUERY_PARAM: &str = "burrow_token";
/// The cookie a browser holds after that visit.
pub const COOKIE: &str = "burrow_auth";
/// How long the cookie is good for, in the browser and at the edge (rotating the token ends
/// it sooner).
const COOKIE_MAX_AGE_SECS: u64 = 7 * 24 * 60 * 60;
/// How far in the future an issue time may be (clocks of restarted edges drift a little).
const CLOCK_SKEW_SECS: u64 = 5 * 60;

/// The key the cookie values are signed with, kept in `state_dir` across restarts.
pub struct CookieKey(hmac::Key);

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(***)")
    }
}

impl CookieKey {
    /// A key from 32 bytes of secret.
    pub fn new(secret: &[u8]) -> CookieKey {
        CookieKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// The key in `path` (see [`crate::certs::load_or_create_secret`]).
    pub fn load_or_create(path: &Path) -> Result<CookieKey, crate::certs::CertError> {
        Ok(CookieKey::new(&crate::certs::load_or_create_secret(
            path, 32,
        )?))
    }

    /// The cookie value for the tunnel `key` whose token hashes to `hash`, issued at `now`
    /// (Unix seconds).
    pub fn value(&self, key: &str, hash: &TokenHash, now: u64) -> String {
        let tag = hmac::sign(&self.0, &message(key, hash, now));
        format!("{now}.{}", secret::hex(tag.as_ref()))
    }

    /// Whether `presented` is a cookie value for that tunnel and token, no older than its
    /// Max-Age at `now`; the tag is compared in constant time.
    pub fn verify(&self, key: &str, hash: &TokenHash, presented: &str, now: u64) -> bool {
        let Some((issued, tag)) = presented.split_once('.') else {
            return false;
        };
        let Ok(issued) = issued.parse::<u64>() else {
            return false;
        };
        let fresh = issued <= now.saturating_add(CLOCK_SKEW_SECS)
            && now.saturating_sub(issued) <= COOKIE_MAX_AGE_SECS;
        let Some(tag) = secret::from_hex32(tag) else {
            return false;
        };
        fresh && hmac::verify(&self.0, &message(key, hash, issued), &tag).is_ok()
    }
}

fn message(key: &str, hash: &TokenHash, issued: u64) -> Vec<u8> {
    let mut m = b"burrow-cookie-v2\0".to_vec();
    m.extend_from_slice(key.as_bytes());
    m.push(0);
    m.extend_from_slice(hash.as_bytes());
    m.extend_from_slice(&issued.to_be_bytes());
    m
}

/// The current time in Unix seconds, as cookie values carry it.
pub fn now() -> u64 {
    u64::try_from(crate::store::now_unix()).unwrap_or(0)
}

/// The token in the query (the first `burrow_token`, percent-decoded) and the request's path
/// and query without any `burrow_token`, or `None` when the query has none.
pub fn query_token(uri: &Uri) -> Option<(Secret, String)> {
    let query = uri.query()?;
    let mut token = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == QUERY_PARAM {
            token.get_or_insert_with(|| percent_decode(value));
        } else {
            kept.push(pair);
        }
    }
    let token = Secret::new(token?);
    let mut rest = uri.path().to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Some((token, rest))
}

/// `%XX` and `+` decoded; an invalid escape is kept as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Every value of the [`COOKIE`] cookie in the request. There can be several: a service on
/// another tunnel of the same domain could set one for a parent domain and a longer path,
/// which the browser then sends first; any one that verifies lets the request through.
pub fn cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
}

/// Removes the [`COOKIE`] cookie from the request's `Cookie` headers (and a header left empty),
/// so it never reaches the service.
pub fn strip_cookie(headers: &mut HeaderMap) {
    let values: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    headers.remove(header::COOKIE);
    for value in values {
        let Ok(text) = value.to_str() else {
            headers.append(header::COOKIE, value);
            continue;
        };
        let kept: Vec<&str> = text
            .split(';')
            .map(str::trim)
            .filter(|c| !c.is_empty() && c.split_once('=').map_or(*c, |(n, _)| n) != COOKIE)
            .collect();
        if kept.is_empty() {
            continue;
        }
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            headers.append(header::COOKIE, value);
        }
    }
}

/// The answer to a visit with the right token in the query: 303 to `location` (the same URL
/// without the token, absolute), setting the cookie.
pub fn redirect_with_cookie(location: &str, value: &str, secure: bool) -> Response<Body> {
    let mut response = Response::new(pages::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, location);
    }
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={value}; Path=/; Max-Age={COOKIE_MAX_AGE_SECS}; HttpOnly; SameSite=Lax{secure}"
    );
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_binds_key_tunnel_token_and_time() {
        const T: u64 = 1_800_000_000;
        let key = CookieKey::new(&[7; 32]);
        let hash = Secret::new("token-one").hash();
        let value = key.value("k1", &hash, T);
        assert!(value.starts_with("1800000000."), "{value}");
        assert_eq!(value.len(), 11 + 64);
        assert!(!value.contains("token-one"));
        assert!(key.verify("k1", &hash, &value, T));
        assert!(key.verify("k1", &hash, &value, T + COOKIE_MAX_AGE_SECS));
        assert!(
            !key.verify("k1", &hash, &value, T + COOKIE_MAX_AGE_SECS + 1),
            "too old"
        );
        assert!(
            !key.verify("k1", &hash, &value, T - CLOCK_SKEW_SECS - 1),
            "from the future"
        );
        assert!(!key.verify("k2", &hash, &value, T), "another tunnel");
        assert!(
            !key.verify("k1", &Secret::new("token-two").hash(), &value, T),
            "a rotated token"
        );
        assert!(
            !CookieKey::new(&[8; 32]).verify("k1", &hash, &value, T),
            "another edge's key"
        );
        let (_, tag) = value.split_once('.').unwrap();
        let moved = format!("{}.{tag}", T + 1);
        for bad in [
            "",
            "zz",
            tag,
            &moved,
            &value[..74],
            &format!("{value}0"),
            "token-one",
            ".",
            "x.y",
        ] {
            assert!(!key.verify("k1", &hash, bad, T), "{bad}");
        }
    }

    #[test]
    fn the_token_is_taken_out_of_the_query() {
        let uri: Uri = "/lab/tree?a=1&burrow_token=abc%2Bd&b=2".parse().unwrap();
        let shown = |uri: &Uri| query_token(uri).map(|(t, rest)| (t.expose().to_owned(), rest));
        assert_eq!(
            shown(&uri),
            Some(("abc+d".to_owned(), "/lab/tree?a=1&b=2".to_owned()))
        );
        let uri: Uri = "/?burrow_token=t".parse().unwrap();
        assert_eq!(shown(&uri), Some(("t".to_owned(), "/".to_owned())));
        let uri: Uri = "/?burrow_token=t&burrow_token=u".parse().unwrap();
        assert_eq!(shown(&uri), Some(("t".to_owned(), "/".to_owned())));
        assert!(query_token(&"/?x_burrow_token=t".parse().unwrap()).is_none());
        assert!(query_token(&"/page".parse().unwrap()).is_none());
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%\u{e9}%C3%A9"), "%\u{e9}\u{e9}");
    }

    #[test]
    fn the_cookie_is_found_and_stripped_from_the_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; burrow_auth=xyz; b=2"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("burrow_auth=other"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(cookies(&h).collect::<Vec<_>>(), ["xyz", "other"]);
        strip_cookie(&mut h);
        let left: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(left, ["a=1; b=2", "c=3"]);
        assert_eq!(cookies(&h).count(), 0);
    }

    #[test]
    fn the_redirect_sets_a_host_only_cookie() {
        let r = redirect_with_cookie("https://h.example/x?y=1", "abc", true);
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "https://h.example/x?y=1");
        let c = r.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(c.starts_with("burrow_auth=abc; Path=/;"), "{c}");
        for attr in ["HttpOnly", "SameSite=Lax", "Secure"] {
            assert!(c.contains(attr), "{c}");
        }
        assert!(!c.contains("Domain"), "host-only: {c}");
        let plain = redirect_with_cookie("/", "abc", false);
        assert!(
            !plain.headers()[header::SET_COOKIE]
                .to_str()
                .unwrap()
                .contains("Secure")
        );
    }
}
