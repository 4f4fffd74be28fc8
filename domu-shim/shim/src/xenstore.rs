//! A small, bounded xenstore reader for the guest: `XS_READ` over `/dev/xen/xenbus`.
//!
//! The shim only ever reads a handful of keys dom0 wrote before unpausing it, so instead of
//! a full client this module speaks the one request it needs. Wire format (xenstore's
//! `struct xsd_sockmsg`, native-endian, then `len` payload bytes):
//!
//! ```text
//!  0  u32 type     XS_READ = 2 (request and reply), XS_ERROR = 16 (reply)
//!  4  u32 req_id   echoed in the reply
//!  8  u32 tx_id    0: no transaction
//! 12  u32 len      payload length, at most 4096 (XENSTORE_PAYLOAD_MAX)
//! 16  payload      request: the path, NUL-terminated; reply: the value (no NUL) or the
//!                  error name ("ENOENT\0")
//! ```
//!
//! Relative paths are relative to the domain's home, `/local/domain/<domid>/`.
//!
//! Everything read is treated as hostile: the reply header is checked (type, request id,
//! transaction id, length cap) before the payload is read, every read waits at most until
//! a deadline, and values are returned as bytes for the caller to validate.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The guest's xenbus device node.
pub const XENBUS_PATH: &str = "/dev/xen/xenbus";

/// Largest payload xenstore sends or accepts (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;

const HEADER_LEN: usize = 16;
const XS_READ: u32 = 2;
const XS_ERROR: u32 = 16;

/// A xenstore read failed.
#[derive(Debug, thiserror::Error)]
pub enum XenstoreError {
    /// Opening the xenbus device failed.
    #[error("opening {XENBUS_PATH} failed")]
    Open(#[source] io::Error),
    /// The path is empty, too long, or contains a NUL.
    #[error("xenstore path {path:?} is not valid")]
    BadPath {
        /// The path.
        path: String,
    },
    /// Writing the request failed.
    #[error("sending XS_READ {path} failed")]
    Send {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading the reply failed.
    #[error("reading the reply to XS_READ {path} failed")]
    Receive {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No (complete) reply arrived in time.
    #[error("no reply to XS_READ {path} within {timeout:?}")]
    Timeout {
        /// The path.
        path: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The reply's header is not a reply to our request.
    #[error("malformed reply to XS_READ {path}: {what}")]
    BadReply {
        /// The path.
        path: String,
        /// What was wrong.
        what: &'static str,
    },
    /// xenstored answered with an error (e.g. `ENOENT`, `EACCES`).
    #[error("XS_READ {path}: {error}")]
    Refused {
        /// The path.
        path: String,
        /// The error name, sanitized.
        error: String,
    },
}

impl XenstoreError {
    /// Whether the key does not exist (yet).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { error, .. } if error == "ENOENT")
    }
}

/// A connection to xenstore that reads keys, one request at a time.
#[derive(Debug)]
pub struct Xenstore<T> {
    conn: T,
    next_req_id: u32,
    timeout: Duration,
}

impl Xenstore<std::fs::File> {
    /// Opens `/dev/xen/xenbus` (non-blocking; reads wait with `poll` up to `timeout`).
    pub fn open(timeout: Duration) -> Result<Self, XenstoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(XENBUS_PATH)
            .map_err(XenstoreError::Open)?;
        Ok(Self::new(file, timeout))
    }
}

impl<T: Read + Write + AsFd> Xenstore<T> {
    /// Talks xenstore over `conn`, which must be non-blocking.
    pub fn new(conn: T, timeout: Duration) -> Self {
        Self {
            conn,
            next_req_id: 1,
            timeout,
        }
    }

    /// Reads the value at `path` (at most [`PAYLOAD_MAX`] bytes).
    pub fn read(&mut self, path: &str) -> Result<Vec<u8>, XenstoreError> {
        let owned = || path.to_string();
        if path.is_empty() || path.len() >= PAYLOAD_MAX || path.contains('\0') {
            return Err(XenstoreError::BadPath { path: owned() });
        }
        let req_id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1);
        let payload_len = path.len().saturating_add(1);
        let mut msg = Vec::with_capacity(HEADER_LEN.saturating_add(payload_len));
        msg.extend_from_slice(&XS_READ.to_ne_bytes());
        msg.extend_from_slice(&req_id.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        let len32 =
            u32::try_from(payload_len).map_err(|_| XenstoreError::BadPath { path: owned() })?;
        msg.extend_from_slice(&len32.to_ne_bytes());
        msg.extend_from_slice(path.as_bytes());
        msg.push(0);
        self.conn
            .write_all(&msg)
            .map_err(|source| XenstoreError::Send {
                path: owned(),
                source,
            })?;

        let deadline = Instant::now().checked_add(self.timeout);
        let mut header = [0u8; HEADER_LEN];
        self.read_exact_by(&mut header, deadline, path)?;
        let field = |i: usize| {
            let mut b = [0u8; 4];
            if let Some(src) = header.get(i..i.saturating_add(4)) {
                b.copy_from_slice(src);
            }
            u32::from_ne_bytes(b)
        };
        let (kind, got_req, tx, len) = (field(0), field(4), field(8), field(12));
        let bad = |what| XenstoreError::BadReply {
            path: owned(),
            what,
        };
        if got_req != req_id {
            return Err(bad("request id does not match"));
        }
        if tx != 0 {
            return Err(bad("reply names a transaction"));
        }
        let len = usize::try_from(len).map_err(|_| bad("length too large"))?;
        if len > PAYLOAD_MAX {
            return Err(bad("length exceeds XENSTORE_PAYLOAD_MAX"));
        }
        let mut payload = vec![0u8; len];
        self.read_exact_by(&mut payload, deadline, path)?;
        match kind {
            XS_READ => Ok(payload),
            XS_ERROR => {
                let name: String = payload
                    .iter()
                    .take_while(|&&b| b != 0)
                    .take(32)
                    .map(|&b| {
                        if b.is_ascii_alphanumeric() {
                            char::from(b)
                        } else {
                            '?'
                        }
                    })
                    .collect();
                Err(XenstoreError::Refused {
                    path: owned(),
                    error: name,
                })
            }
            _ => Err(bad("unexpected message type")),
        }
    }

    /// Fills `buf` from the connection, waiting (poll) at most until `deadline`.
    fn read_exact_by(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
        path: &str,
    ) -> Result<(), XenstoreError> {
        let mut filled = 0usize;
        // Each pass either makes progress or waits; a peer trickling bytes is still held to
        // the deadline.
        while filled < buf.len() {
            let Some(rest) = buf.get_mut(filled..) else {
                break;
            };
            match self.conn.read(rest) {
                Ok(0) => {
                    return Err(XenstoreError::Receive {
                        path: path.to_string(),
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => {
                    filled = filled.saturating_add(n);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(source) => {
                    return Err(XenstoreError::Receive {
                        path: path.to_string(),
                        source,
                    })
                }
            }
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Err(XenstoreError::Timeout {
                    path: path.to_string(),
                    timeout: self.timeout,
                });
            }
            let ms = u16::try_from(left.as_millis().saturating_add(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.conn.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(XenstoreError::Receive {
                        path: path.to_string(),
                        source: io::Error::from(e),
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    /// A fake xenstored on the other end of a socket pair: answers each request with what
    /// `reply` returns for (type, req_id, path).
    fn fake(reply: impl Fn(u32, u32, &str) -> Vec<u8> + Send + 'static) -> Xenstore<UnixStream> {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        thread::spawn(move || loop {
            let mut h = [0u8; 16];
            if theirs.read_exact(&mut h).is_err() {
                return;
            }
            let f = |i: usize| u32::from_ne_bytes(h[i..i + 4].try_into().unwrap());
            let mut p = vec![0u8; f(12) as usize];
            theirs.read_exact(&mut p).unwrap();
            let path = String::from_utf8(p[..p.len() - 1].to_vec()).unwrap();
            let out = reply(f(0), f(4), &path);
            if theirs.write_all(&out).is_err() {
                return;
            }
        });
        Xenstore::new(ours, Duration::from_secs(2))
    }

    fn msg(kind: u32, req: u32, tx: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [kind, req, tx, u32::try_from(payload.len()).unwrap()] {
            m.extend_from_slice(&v.to_ne_bytes());
        }
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn reads_values_and_errors() {
        let mut xs = fake(|kind, req, path| {
            assert_eq!(kind, XS_READ);
            match path {
                "data/mayfly/ring-pages" => msg(XS_READ, req, 0, b"69"),
                _ => msg(XS_ERROR, req, 0, b"ENOENT\0"),
            }
        });
        assert_eq!(xs.read("data/mayfly/ring-pages").unwrap(), b"69");
        let err = xs.read("data/mayfly/nope").unwrap_err();
        assert!(err.is_not_found(), "{err}");
        // Request ids advance.
        assert_eq!(xs.read("data/mayfly/ring-pages").unwrap(), b"69");
    }

    #[test]
    fn refuses_hostile_replies() {
        for (reply, needle) in [
            (msg(XS_READ, 999, 0, b"x"), "request id"),
            (msg(XS_READ, 1, 7, b"x"), "transaction"),
            (
                msg(XS_READ, 1, 0, &[b'a'; PAYLOAD_MAX + 1]),
                "XENSTORE_PAYLOAD_MAX",
            ),
            (msg(5, 1, 0, b"x"), "unexpected message type"),
        ] {
            let mut xs = fake(move |_, _, _| reply.clone());
            let err = xs.read("k").unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let mut xs = fake(|_, req, _| msg(XS_ERROR, req, 0, b"E\x1b[31mVIL\0"));
        match xs.read("k").unwrap_err() {
            XenstoreError::Refused { error, .. } => assert_eq!(error, "E??31mVIL"),
            other => panic!("{other}"),
        }
    }

    /// Random replies (random header words, random payload) never panic; whatever is
    /// accepted as a value is at most PAYLOAD_MAX bytes.
    #[test]
    #[allow(clippy::cast_possible_truncation)] // truncating random words is the point
    fn random_replies_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let words: [u32; 4] = [
                [2, 16, 5, next() as u32][(next() % 4) as usize],
                [1, 0, next() as u32][(next() % 3) as usize],
                [0, 0, 1][(next() % 3) as usize],
                [0, 3, 4096, 4097, next() as u32][(next() % 5) as usize],
            ];
            let body_len = (next() % 64) as usize;
            let body: Vec<u8> = (0..body_len).map(|_| next() as u8).collect();
            let mut reply = Vec::new();
            for w in words {
                reply.extend_from_slice(&w.to_ne_bytes());
            }
            reply.extend_from_slice(&body);
            let mut xs = fake(move |_, _, _| reply.clone());
            xs.timeout = Duration::from_millis(50);
            if let Ok(value) = xs.read("k") {
                assert!(value.len() <= PAYLOAD_MAX);
            }
        }
    }

    #[test]
    fn a_silent_or_short_peer_times_out() {
        // Header promises 10 bytes, sends 3, then nothing.
        let mut xs = fake(|_, req, _| {
            let mut m = msg(XS_READ, req, 0, b"abcdefghij");
            m.truncate(16 + 3);
            m
        });
        xs.timeout = Duration::from_millis(200);
        let start = Instant::now();
        assert!(matches!(
            xs.read("k").unwrap_err(),
            XenstoreError::Timeout { .. }
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
        for bad in ["", "a\0b"] {
            assert!(matches!(
                xs.read(bad).unwrap_err(),
                XenstoreError::BadPath { .. }
            ));
        }
    }
}
