//! Reading and writing burrow frames on QUIC streams: the thin async shell around the sans-IO
//! codec in `burrow-protocol`. The edge uses it too.
//!
//! A frame is read exactly (header, then the body it declares), never more, so the bytes that
//! follow a stream header belong untouched to whatever the stream carries next.

use burrow_protocol::DecodeError;
use burrow_protocol::frame::{HEADER_LEN, body_len};
use bytes::{Bytes, BytesMut};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The peer reset the stream or the connection failed.
    #[error("stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The frame is malformed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads one whole frame (header and body). `Ok(None)`: the stream ended cleanly before it.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Bytes>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = body_len(&header)?;
    let mut frame = BytesMut::zeroed(HEADER_LEN + len);
    frame[..HEADER_LEN].copy_from_slice(&header);
    match recv.read_exact(&mut frame[HEADER_LEN..]).await {
        Ok(()) => Ok(Some(frame.freeze())),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(WireError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads one frame and decodes it with `decode`; a clean end before it is `Ok(None)`.
pub async fn read_msg<T>(
    recv: &mut quinn::RecvStream,
    decode: impl FnOnce(&mut Bytes) -> Result<T, DecodeError>,
) -> Result<Option<T>, WireError> {
    match read_frame(recv).await? {
        None => Ok(None),
        Some(mut frame) => Ok(Some(decode(&mut frame)?)),
    }
}

/// Writes one encoded frame.
pub async fn write_frame(send: &mut quinn::SendStream, frame: Bytes) -> Result<(), WireError> {
    send.write_all(&frame).await?;
    Ok(())
}

/// The channel [`spawn_control_reader`] hands messages to. Each is boxed: a channel allocates
/// its first block of 32 slots when it is made, and with messages inline that was 2.6 KiB per
/// connection (a control message is rare: a heartbeat every 5 s); boxed, 256 bytes.
pub type ControlRx =
    tokio::sync::mpsc::Receiver<Box<Result<burrow_protocol::ControlMsg, WireError>>>;

/// Reads control messages in a task of its own and hands each to the returned channel.
///
/// A frame read is not cancel-safe (it awaits the header, then the body), so it must never sit
/// in a `select!` next to other branches: a partial frame would be lost when another branch
/// wins. The channel ends after an error (sent as `Err`) or after the peer finished the stream
/// cleanly (no message). Dropping the receiver stops the task at its next message.
pub fn spawn_control_reader(mut recv: quinn::RecvStream) -> ControlRx {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let msg = read_msg(&mut recv, burrow_protocol::ControlMsg::decode).await;
            let stop = !matches!(msg, Ok(Some(_)));
            let item = match msg {
                Ok(Some(msg)) => Ok(msg),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            if tx.send(Box::new(item)).await.is_err() || stop {
                return;
            }
        }
    });
    rx
}
