//! Frames assembled from whatever bytes a connection delivers: a read that times out or
//! would block, or that stops inside a frame, loses nothing (the partial frame waits for
//! the rest). The header's cap is checked as soon as the header is complete, and the
//! buffer never holds more than one frame's bytes beyond what arrived.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io::{self, Read};

use crate::frame::{self, Frame, FrameError, HEADER_LEN};

/// Bytes read per call.
const CHUNK: usize = 64 << 10;

/// The bytes received and not yet decoded.
#[derive(Debug, Default)]
pub struct Inbox {
    buf: Vec<u8>,
}

/// What one read did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// Some bytes arrived.
    Bytes,
    /// Nothing now (a timeout, or it would block).
    Nothing,
    /// The peer closed the connection.
    Closed,
}

impl Inbox {
    /// Reads once from `r`. Timeouts and would-block are [`Filled::Nothing`].
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<Filled> {
        let mut chunk = [0u8; CHUNK];
        match r.read(&mut chunk) {
            Ok(0) => Ok(Filled::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                Ok(Filled::Bytes)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Filled::Nothing)
            }
            Err(e) => Err(e),
        }
    }

    /// The next complete frame, if the bytes for one have arrived. A header that is not a
    /// replication frame's, or announces a body above its kind's cap, is an error at once.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        self.next_frame_of(&[
            frame::KIND_HELLO,
            frame::KIND_GROUP,
            frame::KIND_ACK,
            frame::KIND_STOP,
        ])
    }

    /// [`Inbox::next_frame`], refusing at the header any kind not in `kinds`: a peer that
    /// may only send small frames (the standby: acks and stops) cannot make its reader
    /// buffer a group-sized body.
    pub fn next_frame_of(&mut self, kinds: &[u8]) -> Result<Option<Frame>, FrameError> {
        let Some(header) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        if let Some(kind) = header.get(5) {
            if header.get(..4) == Some(&frame::MAGIC[..]) && !kinds.contains(kind) {
                return Err(FrameError::Kind(*kind));
            }
        }
        // Checks magic, version, kind and cap without needing the body.
        let mut probe = header;
        let len = match frame::read_frame(&mut probe) {
            Err(FrameError::Truncated { want, .. }) => want,
            Err(e) => return Err(e),
            // A frame with an empty body can be complete already (none is valid, but the
            // decoder says why).
            Ok(_) => 0,
        };
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(HEADER_LEN))
            .ok_or(FrameError::Header("length"))?;
        if self.buf.len() < total {
            return Ok(None);
        }
        let rest = self.buf.split_off(total);
        let whole = std::mem::replace(&mut self.buf, rest);
        frame::decode(&whole).map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let frames = [
            Frame::Ack { group: 1 },
            Frame::Stop {
                group: 2,
                reason: "why".into(),
            },
            Frame::Ack { group: 3 },
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        for step in [1, 3, 7, 100] {
            let mut inbox = Inbox::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(step) {
                inbox.fill(&mut &chunk[..]).unwrap();
                while let Some(f) = inbox.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "step {step}");
        }
    }

    #[test]
    fn a_kind_the_reader_does_not_take_is_refused_at_its_header() {
        let mut inbox = Inbox::default();
        let mut h = Vec::from(&frame::MAGIC[..]);
        h.extend_from_slice(&[frame::VERSION, frame::KIND_GROUP, 0x10, 0, 0, 0]);
        inbox.fill(&mut &h[..]).unwrap();
        assert!(matches!(
            inbox.next_frame_of(&[frame::KIND_ACK, frame::KIND_STOP]),
            Err(FrameError::Kind(frame::KIND_GROUP))
        ));
        // The same header is only incomplete for a reader that takes groups.
        assert!(matches!(inbox.next_frame(), Ok(None)));
    }

    #[test]
    fn a_bad_header_is_refused_before_its_body() {
        let mut inbox = Inbox::default();
        let mut h = Vec::from(&frame::MAGIC[..]);
        h.extend_from_slice(&[frame::VERSION, frame::KIND_ACK, 0, 0, 1, 0]);
        inbox.fill(&mut &h[..]).unwrap();
        assert!(matches!(
            inbox.next_frame(),
            Err(FrameError::TooLarge { .. })
        ));
        let mut inbox = Inbox::default();
        inbox.fill(&mut &b"GET / HTTP/1.1\r\n"[..]).unwrap();
        assert!(inbox.next_frame().is_err());
    }
}
