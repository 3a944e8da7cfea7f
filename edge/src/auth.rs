//! The access step: who may use a tunnel. An open tunnel lets everyone through; an
//! `authenticated` one, a request with the tunnel's token as a bearer token, or a browser
//! holding the tunnel's cookie.
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
//! reaches the service, on any tunnel.
//!
//! [`bearer`] reads `Authorization: Bearer` for the admin API too.

use std::path::Path;
use std::sync::Arc;

use burrow_protocol::AuthMode;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use ring::hmac;

use crate::body::{self, Body};
use crate::metrics::Metrics;
use crate::pages::{self, Answer};
use crate::route::{Routed, Scheme};
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

/// The access step: the key browsers' cookies are signed with, and the metric of refusals.
#[derive(Debug)]
pub struct Access {
    cookie_key: CookieKey,
    metrics: Arc<Metrics>,
}

impl Access {
    /// Checks requests; browsers' cookies are signed with `cookie_key`.
    pub fn new(cookie_key: CookieKey, metrics: Arc<Metrics>) -> Access {
        Access {
            cookie_key,
            metrics,
        }
    }

    /// Lets a request through to its tunnel (`Ok`), or answers it here: a browser's first
    /// visit with the token in the query, or a refusal (401). The tunnel's token and the
    /// edge's cookie are taken out of a request that passes: they never reach the service.
    pub fn check<B>(&self, req: &mut Request<B>, routed: &Routed) -> Result<(), Answer> {
        if routed.route.auth_mode == AuthMode::Authenticated {
            self.authenticate(req, routed)?;
        }
        // On every tunnel: one that was authenticated keeps getting the cookie from browsers
        // for a while after it turned open.
        strip_cookie(req.headers_mut());
        Ok(())
    }

    /// The check of an authenticated tunnel.
    fn authenticate<B>(&self, req: &mut Request<B>, routed: &Routed) -> Result<(), Answer> {
        let key = routed.target.key.as_str();
        let refuse = |detail: &str| {
            self.metrics.auth_failures.inc();
            pages::error(StatusCode::UNAUTHORIZED, detail, routed.form)
        };
        // No token hash means the tunnel cannot be opened at all.
        let Some(hash) = routed.route.auth_token else {
            return Err(refuse(
                "this tunnel has no token; rotate it through the admin API",
            ));
        };
        if let Some((token, rest)) = query_token(req.uri()) {
            if !hash.matches(token.expose()) {
                return Err(refuse(
                    "the burrow_token in the URL is not this tunnel's token",
                ));
            }
            let value = self.cookie_key.value(key, &hash, now());
            // Absolute, on this host: a path like `//elsewhere.example/` must not turn the
            // redirect into one to another site, nor one without a leading `/` (an HTTP/2
            // `:path` can lack it) into `http://host@elsewhere`.
            let slash = if rest.starts_with('/') { "" } else { "/" };
            let location = format!("{}://{}{slash}{rest}", routed.scheme.as_str(), routed.host);
            return Err(Box::new(redirect_with_cookie(
                &location,
                &value,
                routed.scheme == Scheme::Https,
            )));
        }
        // The tunnel's token, or a browser's cookie. A request may carry both the cookie and
        // an `Authorization` of the application's own (a single-page app's bearer token):
        // that header then goes to the service untouched.
        let presented = bearer(req.headers());
        let by_token = presented.is_some_and(|token| hash.matches(token));
        let now = now();
        let by_cookie =
            !by_token && cookies(req.headers()).any(|c| self.cookie_key.verify(key, &hash, c, now));
        if !(by_token || by_cookie) {
            let detail = if presented.is_some() {
                "the bearer token is not this tunnel's token"
            } else if cookies(req.headers()).next().is_some() {
                "this browser's tunnel cookie is not valid here (expired, the token was rotated, or it is another tunnel's); open the URL with ?burrow_token=<token> again"
            } else {
                "this tunnel needs `Authorization: Bearer <token>`, or, in a browser, the URL opened once with ?burrow_token=<token>"
            };
            return Err(refuse(detail));
        }
        if by_token {
            // The tunnel's own token never reaches the service.
            req.headers_mut().remove(header::AUTHORIZATION);
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer <token>` header, surrounding spaces trimmed. The
/// scheme name is case-insensitive (RFC 9110, 11.1; RFC 6750, 2.1).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

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

/// The token in the query (the first `burrow_token`, decoded as a form value) and the
/// request's path and query without any `burrow_token`, or `None` when the query has none.
/// The other parameters are kept as they were written.
pub fn query_token(uri: &Uri) -> Option<(Secret, String)> {
    let query = uri.query()?;
    let mut token = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        // One pair at a time, so the others can be kept byte for byte.
        match form_urlencoded::parse(pair.as_bytes()).next() {
            Some((name, value)) if name == QUERY_PARAM => {
                token.get_or_insert(value);
            }
            _ => kept.push(pair),
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
    let mut response = Response::new(body::empty());
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
        let uri: Uri = "/?burrow_token=%zz%4&x=%20+".parse().unwrap();
        assert_eq!(
            shown(&uri),
            Some(("%zz%4".to_owned(), "/?x=%20+".to_owned())),
            "an invalid escape stays as it is; the other parameters are untouched"
        );
        let uri: Uri = "/?burrow_token=%C3%A9+x".parse().unwrap();
        assert_eq!(shown(&uri), Some(("\u{e9} x".to_owned(), "/".to_owned())));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            bearer(&h).map(str::to_owned)
        };
        assert_eq!(with("Bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(with("bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("BEARER abc").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearerabc"), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
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
