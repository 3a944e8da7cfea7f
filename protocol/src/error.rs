//! The one error every decoder returns.
//!
//! A reader on a stream needs to tell two failures apart: "the frame is not all here yet" (read
//! more and try again) and "the peer sent something wrong" (close the stream or the connection).
//! [`DecodeError::is_incomplete`] is that test.

use crate::frame::MAX_BODY;

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// More bytes are needed to complete the frame.
    #[error("incomplete frame")]
    Incomplete,
    /// The frame declares a body larger than MAX_BODY.
    #[error("frame body of {0} bytes exceeds the limit of {max}", max = MAX_BODY)]
    TooLarge(usize),
    /// The frame type is not one this decoder reads.
    #[error("unexpected frame type {0:#04x}")]
    UnexpectedType(u8),
    /// The body is malformed.
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

impl DecodeError {
    /// True when the bytes so far are a valid start of a frame and more are needed: read more
    /// and decode again. Every other error means the peer sent something wrong.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_incomplete_is_incomplete() {
        assert!(DecodeError::Incomplete.is_incomplete());
        assert!(!DecodeError::TooLarge(MAX_BODY + 1).is_incomplete());
        assert!(!DecodeError::UnexpectedType(0x40).is_incomplete());
        assert!(!DecodeError::Invalid("trailing bytes").is_incomplete());
    }

    #[test]
    fn messages_name_the_problem() {
        assert_eq!(DecodeError::Incomplete.to_string(), "incomplete frame");
        assert_eq!(
            DecodeError::TooLarge(20_000).to_string(),
            "frame body of 20000 bytes exceeds the limit of 16384"
        );
        assert_eq!(
            DecodeError::UnexpectedType(0x40).to_string(),
            "unexpected frame type 0x40"
        );
        assert_eq!(
            DecodeError::UnexpectedType(7).to_string(),
            "unexpected frame type 0x07"
        );
        assert_eq!(
            DecodeError::Invalid("trailing bytes").to_string(),
            "invalid frame: trailing bytes"
        );
    }
}
