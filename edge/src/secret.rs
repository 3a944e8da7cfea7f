//! Secrets and identifiers: generation from the OS RNG, hashing for storage, constant-time
//! comparison. A secret's `Debug` prints `***`; only its hash is ever stored.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Lowercase RFC 4648 base32: DNS-label safe, unambiguous, 5 bits a character.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A token handed out once (agent, tunnel or admin token). 256 bits of randomness.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A fresh token from the OS RNG.
    pub fn generate() -> Result<Secret, getrandom::Error> {
        Ok(Secret(random_base32(32)?))
    }

    /// Wraps a token received from a client or read from a file.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The token itself, to hand out once or to send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The hash under which the token is stored.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// SHA-256 of a token: what the store keeps. Compared in constant time.
#[derive(Clone, Copy, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Whether `token` hashes to this, in constant time.
    pub fn matches(&self, token: &str) -> bool {
        *self == Secret::new(token).hash()
    }

    /// The hash's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Hex form for the store.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses the store's hex form.
    pub fn from_hex(s: &str) -> Option<TokenHash> {
        from_hex32(s).map(TokenHash)
    }
}

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from exactly 64 hex digits (nothing else: no sign, no space).
pub fn from_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl PartialEq for TokenHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(***)")
    }
}

/// A fresh tunnel key: 26 base32 characters, 130 bits, lowercase letters and digits.
pub fn tunnel_key() -> Result<String, getrandom::Error> {
    random_base32(26 * 5 / 8 + 1).map(|mut s| {
        s.truncate(26);
        s
    })
}

/// `bytes` random bytes as base32 (no padding).
fn random_base32(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    let mut out = String::with_capacity(bytes * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in buf {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hidden() {
        let a = Secret::generate().unwrap();
        let b = Secret::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 52, "256 bits in base32");
        assert_eq!(format!("{a:?}"), "Secret(***)");
        assert!(a.hash().matches(a.expose()));
        assert!(!a.hash().matches(b.expose()));
        let hex = a.hash().to_hex();
        assert_eq!(TokenHash::from_hex(&hex), Some(a.hash()));
        assert_eq!(TokenHash::from_hex("zz"), None);
    }

    #[test]
    fn tunnel_keys_are_dns_safe() {
        let k = tunnel_key().unwrap();
        assert_eq!(k.len(), 26);
        assert!(
            k.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(k, tunnel_key().unwrap());
    }
}
