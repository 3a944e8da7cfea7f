//! The bad-input table: one named case per hostile input, each asserting (1) the answer the
//! attacker gets, (2) that nothing reached the devbox's service that should not have, and (3)
//! that the edge and the agent still serve others afterwards.
//!
//! Cases that need no special limits share one edge (plain HTTP and HTTPS, `max_head_bytes =
//! 8192`, `max_headers = 20`, `admin_failures = 3`) and its agents ([`shared`]); the limit cases
//! (slow clients, floods) start an edge of their own. Modules, by what the attacker aims at:
//!
//! - [`heads`]: request lines, headers, framing (smuggling), slow clients.
//! - [`hosts`]: the `{port}-{key}.{domain}` host, HTTPS server names.
//! - [`websocket`]: upgrade handshakes.
//! - [`tokens`]: tunnel bearer tokens, agent tokens, the admin token.
//! - [`cookies`]: a browser's way in: the token in the query once, then the tunnel's cookie.
//! - [`agent_side`]: a hostile edge speaking to a real agent over its live QUIC connection.
//! - [`floods`]: connections, request rate, requests in flight.
//! - [`handshakes`]: agent connections before their hello is accepted.
//! - [`raw`]: the raw HTTP/1.1 client and backend the cases use.

mod agent_side;
mod cookies;
mod floods;
mod handshakes;
mod heads;
mod hosts;
mod kept;
mod raw;
mod shared;
mod tokens;
mod websocket;

use raw::Answer;

/// Asserts the status of an answer, naming the case.
#[track_caller]
fn assert_status(answer: &Answer, status: u16, case: &str) {
    assert_eq!(
        answer.status(),
        status,
        "{case}: expected {status}, got {answer:?}"
    );
}

/// Asserts a 400 or a closed connection, naming the case.
#[track_caller]
fn assert_bad_or_closed(answer: &Answer, case: &str) {
    assert!(
        matches!(answer.status(), 400 | 0),
        "{case}: expected 400 or a close, got {answer:?}"
    );
}
