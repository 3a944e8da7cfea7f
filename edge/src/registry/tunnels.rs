//! What an admin call asks of a tunnel ([`TunnelSpec`]), and a tunnel record made from it.

use burrow_protocol::AuthMode;

use super::IssuedTunnel;
use crate::secret::{self, Secret, TokenHash};
use crate::store::{TunnelRecord, now_unix_ms};

/// What an admin call asks of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelSpec {
    /// Who may use it.
    pub auth_mode: AuthMode,
    /// Send `Host: localhost:{port}` to services; `None` keeps the current setting.
    pub rewrite_host: Option<bool>,
    /// Let `burrow connect` reach raw TCP ports through an open tunnel; `None` keeps the
    /// current setting.
    pub raw_tcp: Option<bool>,
    /// Traffic counts as the devbox's activity (default on); `None` keeps the current setting.
    pub http_keep_alive: Option<bool>,
    /// Wake an absent agent's devbox on a request (default off); `None` keeps the current
    /// setting.
    pub wake_on_http: Option<bool>,
}

impl TunnelSpec {
    /// A tunnel in `mode` with the default options.
    pub fn new(auth_mode: AuthMode) -> TunnelSpec {
        TunnelSpec {
            auth_mode,
            rewrite_host: None,
            raw_tcp: None,
            http_keep_alive: None,
            wake_on_http: None,
        }
    }

    /// This spec, with the options it leaves out taken from `existing`.
    pub(super) fn or(self, existing: Option<&TunnelRecord>) -> TunnelSpec {
        let keep = |asked: Option<bool>, current: fn(&TunnelRecord) -> bool| {
            asked.or(existing.map(current))
        };
        TunnelSpec {
            auth_mode: self.auth_mode,
            rewrite_host: keep(self.rewrite_host, |t| t.rewrite_host),
            raw_tcp: keep(self.raw_tcp, |t| t.raw_tcp),
            http_keep_alive: keep(self.http_keep_alive, |t| t.http_keep_alive),
            wake_on_http: keep(self.wake_on_http, |t| t.wake_on_http),
        }
    }
}

/// A tunnel record of `spec` at `key`, its options defaulted where `spec` leaves them out.
pub(super) fn issue_record(
    spec: TunnelSpec,
    key: String,
    auth_token: Option<TokenHash>,
) -> TunnelRecord {
    TunnelRecord {
        key,
        auth_mode: spec.auth_mode,
        auth_token,
        rewrite_host: spec.rewrite_host.unwrap_or(false),
        raw_tcp: spec.raw_tcp.unwrap_or(false),
        http_keep_alive: spec.http_keep_alive.unwrap_or(true),
        wake_on_http: spec.wake_on_http.unwrap_or(false),
        created_ms: now_unix_ms(),
    }
}

pub(super) fn issue_tunnel(spec: TunnelSpec) -> Result<IssuedTunnel, getrandom::Error> {
    let auth_token = match spec.auth_mode {
        AuthMode::Open => None,
        AuthMode::Authenticated => Some(Secret::generate()?),
    };
    let hash = auth_token.as_ref().map(Secret::hash);
    Ok(IssuedTunnel {
        record: issue_record(spec, secret::tunnel_key()?, hash),
        auth_token,
    })
}
