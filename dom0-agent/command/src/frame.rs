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
//! Instead of an envelope, a client may send the 4 bytes [`HELLO`] (`"MFAH"`); the agent
//! answers one result frame `{"type":"result","ok":true,"command":"hello",
//! "result":{"appliance":<hex identity key>}}` and nothing is audited (it is no command).
//! `mayfly admin` asks this over the Unix socket only — where only the agent's user can be
//! listening — to learn what to bind a command to (`APPLIANCE_ARG`).
//!
//! Responses are not signed: the socket is local and restricted, and everything a response
//! reports (chain heads, records) can be checked offline with `dom0-agent verify`.

use std::io::{self, Read, Write};
use std::time::Instant;

use crate::envelope::MAX_ENVELOPE;

/// The request that asks for the appliance's identity instead of running a command.
pub const HELLO: &[u8; 4] = b"MFAH";

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

/// Reads the request frame, giving up with `TimedOut` once `deadline` has passed.
///
/// A socket read timeout alone bounds only the gap between two bytes: a client trickling
/// one byte just inside it would hold a connection slot for hours. With a deadline, a
/// connection costs a slot for at most `deadline` plus one read timeout.
pub fn read_request_by(r: &mut impl Read, deadline: Instant) -> Result<Vec<u8>, FrameError> {
    read_frame(&mut Deadline { inner: r, deadline }, MAX_ENVELOPE)
}

/// A reader that refuses to read once its deadline has passed.
struct Deadline<'a, R> {
    inner: &'a mut R,
    deadline: Instant,
}

impl<R: Read> Read for Deadline<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request took too long to arrive",
            ));
        }
        self.inner.read(buf)
    }
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

    /// Hands out one byte per read, slowly (a slowloris client).
    struct Trickle<'a> {
        bytes: &'a [u8],
        delay: std::time::Duration,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(self.delay);
            match (self.bytes.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.bytes = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn a_trickling_request_is_cut_off_at_the_deadline() {
        use std::time::Duration;
        let mut framed = Vec::new();
        write_request(&mut framed, &[7u8; 64]).unwrap();
        let delay = Duration::from_millis(5);
        // Fast enough: the whole frame arrives before the deadline.
        let mut fast = Trickle {
            bytes: &framed,
            delay,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(read_request_by(&mut fast, deadline).unwrap(), [7u8; 64]);
        // Each byte comes well within any per-read timeout, but the frame as a whole
        // (68 reads, at least 340 ms) does not arrive by the deadline.
        let mut slow = Trickle {
            bytes: &framed,
            delay,
        };
        let started = Instant::now();
        let err = read_request_by(&mut slow, started + Duration::from_millis(100)).unwrap_err();
        assert!(
            matches!(&err, FrameError::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(300));
    }
}
