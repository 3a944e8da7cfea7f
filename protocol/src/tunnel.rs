//! What the control stream says about a devbox's tunnel, and the agent's secret: the values
//! [`crate::control`] messages carry, re-exported from there.
//!
//! On the wire a [`TunnelState`] is key str, auth_mode u8 (1 open, 2 authenticated),
//! url_template str (see [`crate::frame`] for strings).

use std::fmt;
use std::str::FromStr;

use crate::DecodeError;
use crate::frame::{MAX_STR_LEN, Reader, Writer};

/// A secret agent token. Debug prints `AgentToken(***)`. No Display.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(String);

impl AgentToken {
    /// Wraps a token. On the wire a token is at most 512 bytes; a longer one is cut on encode.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for hashing or comparing; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(***)")
    }
}

/// Who may use a tunnel's URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMode {
    /// Anyone with the URL gets in.
    Open,
    /// Every request must carry `Authorization: Bearer <auth_token>`.
    Authenticated,
}

impl AuthMode {
    /// The name used in the admin API and config: `"open"` or `"authenticated"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Authenticated => "authenticated",
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthMode {
    type Err = String;

    /// Parses `"open"` or `"authenticated"` (exactly, lowercase).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "authenticated" => Ok(Self::Authenticated),
            _ => Err(format!(
                "`{s}` is not an auth mode: expected \"open\" or \"authenticated\""
            )),
        }
    }
}

/// A devbox's tunnel as the edge sees it: enabled, with this key and access mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelState {
    /// The tunnel key in `{port}-{key}.{domain}`.
    pub key: String,
    /// Who may use the tunnel's URL.
    pub auth_mode: AuthMode,
    /// The public URL with a `{port}` placeholder, e.g. `https://{port}-k3v9x2q7ma.example.com`.
    pub url_template: String,
}

pub(crate) fn put_tunnel(w: &mut Writer<'_>, t: &TunnelState) {
    w.put_str(&t.key, MAX_STR_LEN);
    w.put_u8(match t.auth_mode {
        AuthMode::Open => 1,
        AuthMode::Authenticated => 2,
    });
    w.put_str(&t.url_template, MAX_STR_LEN);
}

pub(crate) fn get_tunnel(r: &mut Reader<'_>) -> Result<TunnelState, DecodeError> {
    Ok(TunnelState {
        key: r.get_str(MAX_STR_LEN)?,
        auth_mode: match r.get_u8()? {
            1 => AuthMode::Open,
            2 => AuthMode::Authenticated,
            _ => return Err(DecodeError::Invalid("unknown auth mode")),
        },
        url_template: r.get_str(MAX_STR_LEN)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_debug_hides_the_secret() {
        let token = AgentToken::new("s3cret");
        assert_eq!(format!("{token:?}"), "AgentToken(***)");
        assert_eq!(token.expose(), "s3cret");
    }

    #[test]
    fn auth_mode_parses_its_two_names_only() {
        for mode in [AuthMode::Open, AuthMode::Authenticated] {
            assert_eq!(mode.as_str().parse::<AuthMode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        let err = "Open".parse::<AuthMode>().expect_err("case matters");
        assert!(err.contains("\"open\" or \"authenticated\""), "{err}");
        assert!("".parse::<AuthMode>().is_err());
    }
}
