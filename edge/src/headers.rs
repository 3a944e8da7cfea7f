//! Header helpers the request's steps share: reading comma-separated lists, and what the edge
//! takes out of a request before the service sees it (hop-by-hop headers, client-sent
//! forwarding headers) or out of a response before the client does.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that apply to one connection only and are never forwarded (RFC 9110, 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether a comma-separated header (every line of it) has an element `wanted` accepts
/// (elements trimmed; lines that are not ASCII are skipped).
pub fn list_has(headers: &HeaderMap, name: &HeaderName, wanted: impl Fn(&str) -> bool) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|element| wanted(element.trim()))
}

/// The client's headers as the service may see them: no hop-by-hop header (nor any the
/// `Connection` header names), no client-sent forwarding header (the edge writes its own), and
/// cookies in one field.
pub fn filter_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let n = name.as_str();
            n.starts_with("x-forwarded-") || n == "forwarded" || n == "x-real-ip"
        })
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
    join_cookies(headers);
}

/// Removes hop-by-hop headers, `Upgrade`, and any header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Split the bytes, not a string: a value with one non-ASCII byte still names the rest.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// HTTP/2 may split cookies into several fields; HTTP/1.1 needs one (RFC 9113, 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_elements_are_found_on_every_line() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x, Upgrade "));
        assert!(list_has(&h, &header::CONNECTION, |t| t
            .eq_ignore_ascii_case("upgrade")));
        assert!(!list_has(&h, &header::CONNECTION, |t| t == "close"));
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn split_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

    /// Found by the `header_filter` fuzz target: a non-ASCII byte hid the named headers.
    #[test]
    fn connection_names_survive_a_non_ascii_byte() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-a, \x80").expect("obs-text is a valid value"),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        filter_headers(&mut h);
        assert!(!h.contains_key("x-a"));
    }

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-secret, close"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-secret"));
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarding_headers_from_the_client_are_dropped() {
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-for",
            "x-forwarded-host",
            "forwarded",
            "x-real-ip",
        ] {
            h.insert(name, HeaderValue::from_static("203.0.113.9"));
        }
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        filter_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }
}
