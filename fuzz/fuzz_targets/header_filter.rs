//! `burrow_edge::headers::filter_headers`: what the edge does to a public request's headers before
//! they go to the service. The input is a header block, one `name: value` per line (spaces and
//! tabs around the value and a `\r` at the end are dropped); lines that are not a valid header
//! are skipped, so any bytes make some `HeaderMap`.
//!
//! No input panics. Afterwards:
//! - no hop-by-hop header is left (connection, keep-alive, proxy-connection, proxy-authenticate,
//!   proxy-authorization, te, trailer, transfer-encoding, upgrade: the edge writes its own
//!   `Upgrade` and `Connection` for a WebSocket after filtering);
//! - no header named in the request's `Connection` values is left, the values read as bytes;
//! - no client-sent forwarding header is left (`x-forwarded-*`, `forwarded`, `x-real-ip`);
//! - the cookies are in one `cookie` field, the request's cookie fields joined with `; `;
//! - every other header is kept, with its values in order (`authorization` included: the access
//!   check, not this filter, removes a tunnel's own bearer token).

#![no_main]

use burrow_edge::headers::filter_headers;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fuzz_target!(|data: &[u8]| {
    let original = header_map(data);
    let mut headers = original.clone();
    filter_headers(&mut headers);

    for name in HOP_BY_HOP {
        assert!(
            !headers.contains_key(name),
            "hop-by-hop {name} left: {headers:?} (from {original:?})"
        );
    }
    let named = connection_options(&original);
    for name in &named {
        assert!(
            !headers.contains_key(name),
            "{name}, named in Connection, left: {headers:?} (from {original:?})"
        );
    }
    for name in headers.keys() {
        assert!(!is_forwarding(name), "client-sent {name} left: {headers:?}");
    }

    let cookies: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
    if named.contains(&header::COOKIE) {
        assert!(cookies.is_empty());
    } else {
        let sent: Vec<_> = original
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let joined = sent.join(&b"; "[..]);
        match cookies[..] {
            [] => assert!(sent.is_empty(), "cookies dropped: {original:?}"),
            [one] => assert_eq!(one.as_bytes(), joined, "cookies from {original:?}"),
            _ => panic!("{} cookie fields left: {headers:?}", cookies.len()),
        }
    }

    for name in original.keys() {
        let n = name.as_str();
        let may_change =
            HOP_BY_HOP.contains(&n) || named.contains(name) || n == "cookie" || is_forwarding(name);
        if !may_change {
            assert!(
                headers
                    .get_all(name)
                    .iter()
                    .eq(original.get_all(name).iter()),
                "{name} changed: {headers:?} (from {original:?})"
            );
        }
    }
});

/// Parses `name: value` lines, skipping the invalid ones.
fn header_map(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        let value = value.trim_ascii_start().trim_ascii_end();
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    headers
}

/// Every header name listed in the `Connection` values, read as bytes (a value need not be
/// ASCII to name headers).
fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect()
}

/// A forwarding header: the edge writes its own, so a client's never gets through.
fn is_forwarding(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("x-forwarded-") || n == "forwarded" || n == "x-real-ip"
}
