//! `burrow_agent::config::Config::load` on arbitrary file text, environment and flags (the input
//! layout is `burrow_fuzz::ConfigInput`). The token comes from `BURROW_AGENT_TOKEN` (set to a
//! marker when the input does not set it), so `token_file` is never read from disk.
//!
//! No input panics; errors are values whose message names something. A loaded configuration
//! has heartbeats shorter than the idle timeout, no zero duration, the metrics port denied to
//! forwarding, and the token nowhere in its `Debug` output; an error message never shows the
//! token either.

#![no_main]

use std::path::Path;

use burrow_agent::config::{Config, SETTINGS, TOKEN_ENV};
use burrow_fuzz::ConfigInput;
use burrow_protocol::Port;
use burrow_runtime::sources::File;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "s3cret-fuzz-token-7f3a";

fuzz_target!(|data: &[u8]| {
    let mut input = ConfigInput::parse(data, SETTINGS);
    let secret_unseen =
        !String::from_utf8_lossy(data).contains(SECRET) && !input.env.contains_key(TOKEN_ENV);
    input
        .env
        .entry(TOKEN_ENV.to_owned())
        .or_insert_with(|| SECRET.to_owned());
    let file = File {
        path: Path::new("/etc/burrow/agent.toml"),
        text: &input.text,
    };
    match Config::load(Some(file), &input.env, &input.flags) {
        Ok(config) => {
            let l = config.liveness;
            assert!(l.idle_timeout > l.heartbeat_interval, "{l:?}");
            for d in [
                l.heartbeat_interval,
                l.heartbeat_timeout,
                l.idle_timeout,
                l.resume_tick,
                config.reconnect.backoff.initial,
                config.reconnect.backoff.max,
                config.reconnect.healthy_after,
                config.reconnect.dial_timeout,
                config.drain_grace,
            ] {
                assert!(!d.is_zero(), "a zero duration in {config:?}");
            }
            assert!(!config.token.expose().is_empty());
            if let Some(port) = config.metrics_listen.and_then(|a| Port::new(a.port())) {
                assert!(
                    !config.policy.allows(port),
                    "metrics port {port} is forwarded"
                );
            }
            if secret_unseen {
                assert!(
                    !format!("{config:?}").contains(SECRET),
                    "the token shows in Debug"
                );
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
            if secret_unseen {
                assert!(!message.contains(SECRET), "the token shows in: {message}");
            }
        }
    }
});
