//! Framing on the console socket (Unix stream socket, or TCP on loopback).
//!
//! ```text
//! client → agent   one request frame:   u32 BE length (1..=MAX_ENVELOPE) || envelope
//! agent → client   one or more frames:  u32 BE length (1..=MAX_RESPONSE_FRAME) || JSON
//! ```
//!
//! Each response frame is one JSON object with a `type`:
//!
//! * `{"type":"progress","stage":…,"done":n,"total":m}` while a long command runs;
//! * `{"type":"records","records":[…]}` chunks of an audit export;
//! * `{"type":"result","ok":true,"command":…,"result":{…}}` or
//!   `{"type":"result","ok":false,"code":…,"error":…}` — always last.
//!
//! Responses are not signed: the socket is local and restricted, and everything a response
//! reports (chain heads, records) can be checked offline with `dom0-agent verify`.

use std::io::{self, Read, Write};

use crate::envelope::MAX_ENVELOPE;

/// Largest response frame.
pub const MAX_RESPONSE_FRAME: usize = 16 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection before a frame started.
    #[error("connection closed")]
    Closed,
    /// A length prefix of 0 or above the cap.
    #[error("frame of {len} bytes is outside 1..={max}")]
    Length {
        /// Announced length.
        len: u64,
        /// Cap.
        max: usize,
    },
    /// A response frame that is not a JSON object with a `type`.
    #[error("malformed response frame: {0}")]
    Json(String),
    /// I/O (including a read timeout: `WouldBlock`/`TimedOut`).
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

fn read_frame(r: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let rest = len.get_mut(got..).unwrap_or(&mut []);
        match r.read(rest) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got = got.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n = u32::from_be_bytes(len);
    let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
    if n == 0 || n_usize > max {
        return Err(FrameError::Length {
            len: u64::from(n),
            max,
        });
    }
    // The length is within the cap, so this allocation is bounded.
    let mut buf = vec![0u8; n_usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_frame(w: &mut impl Write, bytes: &[u8], max: usize) -> Result<(), FrameError> {
    if bytes.is_empty() || bytes.len() > max {
        return Err(FrameError::Length {
            len: bytes.len() as u64,
            max,
        });
    }
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::Length {
        len: bytes.len() as u64,
        max,
    })?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads the request frame (an encoded envelope, not yet decoded).
pub fn read_request(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    read_frame(r, MAX_ENVELOPE)
}

/// Writes the request frame.
pub fn write_request(w: &mut impl Write, envelope: &[u8]) -> Result<(), FrameError> {
    write_frame(w, envelope, MAX_ENVELOPE)
}

/// Writes one response frame.
pub fn write_response(w: &mut impl Write, frame: &serde_json::Value) -> Result<(), FrameError> {
    let bytes = serde_json::to_vec(frame).map_err(|e| FrameError::Json(e.to_string()))?;
    write_frame(w, &bytes, MAX_RESPONSE_FRAME)
}

/// Reads one response frame.
pub fn read_response(r: &mut impl Read) -> Result<serde_json::Value, FrameError> {
    let bytes = read_frame(r, MAX_RESPONSE_FRAME)?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| FrameError::Json(e.to_string()))?;
    if v.get("type").and_then(|t| t.as_str()).is_none() {
        return Err(FrameError::Json("no \"type\"".into()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_bounded_both_ways() {
        let mut buf = Vec::new();
        write_request(&mut buf, b"abc").unwrap();
        assert_eq!(read_request(&mut buf.as_slice()).unwrap(), b"abc");
        let huge = (u32::try_from(MAX_ENVELOPE).unwrap() + 1).to_be_bytes();
        assert!(matches!(
            read_request(&mut huge.as_slice()),
            Err(FrameError::Length { .. })
        ));
        assert!(matches!(
            read_request(&mut [0u8, 0, 0, 0].as_slice()),
            Err(FrameError::Length { len: 0, .. })
        ));
        assert!(matches!(
            read_request(&mut [].as_slice()),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_request(&mut [0u8, 0, 0, 9, 1].as_slice()),
            Err(FrameError::Io(_))
        ));
        let mut out = Vec::new();
        write_response(&mut out, &serde_json::json!({"type": "result", "ok": true})).unwrap();
        assert_eq!(read_response(&mut out.as_slice()).unwrap()["ok"], true);
    }
}
