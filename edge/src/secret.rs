//! Secrets and identifiers: generation from the OS RNG, hashing for storage, constant-time
//! comparison. A secret's `Debug` prints `***`; only its hash is ever stored.

use std::fmt;

use data_encoding::{BASE32_NOPAD, HEXLOWER, HEXLOWER_PERMISSIVE};
use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;

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
        let mut hash = [0u8; 32];
        // Invariant: a SHA-256 digest is 32 bytes, so the lengths match.
        hash.copy_from_slice(digest(&SHA256, self.0.as_bytes()).as_ref());
        TokenHash(hash)
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
    HEXLOWER.encode(bytes)
}

/// 32 bytes from exactly 64 hex digits (nothing else: no sign, no space), in either case.
pub fn from_hex32(s: &str) -> Option<[u8; 32]> {
    HEXLOWER_PERMISSIVE
        .decode(s.as_bytes())
        .ok()?
        .try_into()
        .ok()
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

/// `bytes` random bytes as base32 (see [`base32`]).
fn random_base32(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(base32(&buf))
}

/// Lowercase RFC 4648 base32 without padding: letters `a`-`z` and digits `2`-`7`, DNS-label
/// safe, unambiguous, 5 bits a character.
fn base32(bytes: &[u8]) -> String {
    let mut out = BASE32_NOPAD.encode(bytes);
    out.make_ascii_lowercase();
    out
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
    fn hashes_are_sha256_in_lowercase_hex() {
        // The store keeps these: they must stay byte-identical (FIPS 180-2's "abc" vector).
        let hash = Secret::new("abc").hash();
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hash.to_hex(), hex);
        assert_eq!(TokenHash::from_hex(&hex.to_ascii_uppercase()), Some(hash));
        for bad in [
            "",
            &hex[1..],
            &format!("{hex}00"),
            &format!(" {}", &hex[1..]),
        ] {
            assert_eq!(from_hex32(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn base32_is_rfc4648_lowercase_unpadded() {
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32(b"f"), "my");
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
