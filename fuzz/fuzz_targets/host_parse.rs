//! `burrow_edge::route::parse(host, domain)` on arbitrary hosts. The input is the host (UTF-8,
//! invalid bytes replaced); a line break followed by a valid lowercase DNS name adds that name
//! to the fixed domains the host is parsed against.
//!
//! No input panics. When a host parses, the port is in 1..=65535, the key is 1 to 57 lowercase
//! ASCII letters and digits, the host is exactly `{port}-{key}.{domain}` once a `:port` suffix
//! and one trailing dot are removed and ASCII is lowercased, and `{port}-{key}.{domain}` parses
//! back to the same target, also in uppercase, with a trailing dot, with a `:port` suffix, and
//! with all three.

#![no_main]

use burrow_edge::route::{Target, parse};
use libfuzzer_sys::fuzz_target;

const DOMAINS: [&str; 4] = [
    "tunnel.example.com",
    "example.com",
    "xn--bcher-kva.example",
    "a",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (host, extra) = match text.split_once('\n') {
        Some((host, domain)) => (
            host,
            Some(domain).filter(|d| burrow_edge::config::is_domain(d)),
        ),
        None => (&*text, None),
    };
    for domain in DOMAINS.into_iter().chain(extra) {
        let Ok(target) = parse(host, domain) else {
            continue;
        };
        check(host, domain, &target);
    }
});

fn check(host: &str, domain: &str, target: &Target) {
    let port = target.port.get();
    assert!(port >= 1, "port 0 parsed from {host:?}");
    let key = &target.key;
    assert!(
        !key.is_empty()
            && key.len() <= 57
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "bad key {key:?} from {host:?}"
    );
    let canonical = format!("{port}-{key}.{domain}");
    assert_eq!(normalize(host), canonical, "{host:?} parsed as {target:?}");
    for variant in [
        canonical.clone(),
        canonical.to_ascii_uppercase(),
        format!("{canonical}."),
        format!("{canonical}:443"),
        format!("{}.:8080", canonical.to_ascii_uppercase()),
    ] {
        assert_eq!(
            parse(&variant, domain).as_ref(),
            Ok(target),
            "{variant:?} from {host:?}"
        );
    }
}

/// The host without a `:digits` suffix and one trailing dot, ASCII-lowercased.
fn normalize(host: &str) -> String {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}
