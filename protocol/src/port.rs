//! [`Port`]: the devbox port a data stream connects to, re-exported from [`crate::stream`].
//!
//! It also parses the `{port}` label of a public host name, so parsing is strict: decimal digits
//! only, in 1..=65535.

use std::fmt;
use std::num::NonZeroU16;
use std::str::FromStr;

/// A TCP port, 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(NonZeroU16);

impl Port {
    /// The port `n`, or `None` for 0.
    pub fn new(n: u16) -> Option<Port> {
        NonZeroU16::new(n).map(Port)
    }

    /// The port number.
    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl From<Port> for u16 {
    fn from(port: Port) -> u16 {
        port.get()
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for Port {
    type Err = String;

    /// Parses decimal digits only (no sign, no spaces) into 1..=65535.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits_only = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        digits_only
            .then(|| s.parse::<u16>().ok().and_then(Port::new))
            .flatten()
            .ok_or_else(|| format!("`{s}` is not a port: expected 1..=65535"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(n: u16) -> Port {
        Port::new(n).expect("test ports are not 0")
    }

    #[test]
    fn port_parses_digits_in_range_only() {
        assert_eq!("1".parse(), Ok(port(1)));
        assert_eq!("3000".parse(), Ok(port(3000)));
        assert_eq!("65535".parse(), Ok(port(65535)));
        for bad in [
            "",
            "0",
            "00",
            "+80",
            "-1",
            " 80",
            "80 ",
            "8o",
            "65536",
            "99999999999",
        ] {
            assert!(bad.parse::<Port>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            "0".parse::<Port>(),
            Err("`0` is not a port: expected 1..=65535".to_owned())
        );
        assert_eq!(port(8080).to_string(), "8080");
        assert_eq!(Port::new(0), None);
    }

    proptest::proptest! {
        #[test]
        fn display_parses_back(n in 1..=u16::MAX) {
            let p = port(n);
            proptest::prop_assert_eq!(p.to_string().parse(), Ok(p));
            proptest::prop_assert_eq!(u16::from(p), n);
        }

        #[test]
        fn parses_exactly_what_u16_parses_minus_signs_and_zero(s in "[+0-9a ]{0,7}") {
            let want = s.bytes().all(|b| b.is_ascii_digit())
                .then(|| s.parse::<u16>().ok()).flatten().filter(|&n| n != 0);
            proptest::prop_assert_eq!(s.parse::<Port>().ok().map(Port::get), want);
        }
    }
}
