//! `burrow_edge::config::Config::load` on arbitrary file text, environment and flags (the input
//! layout is `burrow_fuzz::ConfigInput`). The edge's loader reads no other file.
//!
//! No input panics; errors are values whose message names something. A loaded configuration
//! has a domain that is lowercase, without a trailing dot, and that routing accepts
//! (`80-abc.{domain}` parses to port 80, key `abc`), and at least one public listener.

#![no_main]

use std::path::Path;

use burrow_edge::config::{Config, SETTINGS};
use burrow_edge::route;
use burrow_fuzz::ConfigInput;
use burrow_runtime::sources::File;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = ConfigInput::parse(data, SETTINGS);
    let file = File {
        path: Path::new("/etc/burrow/edge.toml"),
        text: &input.text,
    };
    match Config::load(Some(file), &input.env, &input.flags) {
        Ok(config) => {
            let domain = &config.domain;
            assert!(!domain.is_empty() && !domain.ends_with('.'), "{domain:?}");
            assert_eq!(*domain, domain.to_ascii_lowercase());
            let target = route::parse(&format!("80-abc.{domain}"), domain)
                .unwrap_or_else(|e| panic!("domain {domain:?} does not route: {e}"));
            assert_eq!((target.port.get(), target.key.as_str()), (80, "abc"));
            assert!(config.http.is_some() || config.https.is_some());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
