//! End-to-end tests: a real edge and agent over loopback, real local services, real clients
//! (curl, tokio-tungstenite, hyper). One test binary, one module per area.

mod access;
mod admin;
mod http;
mod streams;
