//! The control messages' encoding, byte by byte as the [crate docs](crate) draw it:
//! [`Msg::encode`] and [`Msg::decode`], which refuses (never trusts) a wrong magic,
//! version, kind, length, field or handler list.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::{
    Limits, Msg, ProtoError, Settings, HEADER_LEN, MAGIC, MAX_HANDLERS, MAX_ROOT_PATH, VERSION,
};

impl Msg {
    /// The message's kind (the table in the [crate docs](crate)).
    pub(crate) fn kind(&self) -> u16 {
        match self {
            Msg::Configure(_) => 0x0001,
            Msg::Clone { .. } => 0x0002,
            Msg::Shutdown => 0x0003,
            Msg::Ready { .. } => 0x0081,
            Msg::InitFailed { .. } => 0x0082,
            Msg::Spawned { .. } => 0x0083,
            Msg::SpawnFailed { .. } => 0x0084,
            Msg::Exited { .. } => 0x0085,
            Msg::Killed { .. } => 0x0086,
            Msg::Stopped { .. } => 0x0087,
        }
    }

    /// How many fds a message of `kind` carries.
    pub(crate) fn fd_count(kind: u16) -> usize {
        match kind {
            0x0002 => 3,
            0x0083 => 1,
            _ => 0,
        }
    }

    /// The message's 24-byte header, which is all of it except for `Configure` (see the
    /// [crate docs](crate)). No allocation: the zygote sends its messages from the stack.
    pub(crate) fn header(&self) -> [u8; HEADER_LEN] {
        let (clone_id, pid, value, aux) = match *self {
            Msg::Configure(_) | Msg::Shutdown => (0, 0, 0, 0),
            Msg::Clone { clone_id, ring_len } => (clone_id, 0, 0, ring_len),
            Msg::Ready { pid, .. } => (0, pid, 0, 0),
            Msg::InitFailed { stage, errno } => (0, 0, errno, stage),
            Msg::Spawned { clone_id, pid } => (clone_id, pid, 0, 0),
            Msg::SpawnFailed {
                clone_id,
                stage,
                errno,
            } => (clone_id, 0, errno, stage),
            Msg::Exited {
                clone_id,
                pid,
                code,
                cpu_ms,
            } => (clone_id, pid, code, cpu_ms),
            Msg::Killed {
                clone_id,
                pid,
                signal,
                cpu_ms,
            } => (clone_id, pid, signal, cpu_ms),
            Msg::Stopped {
                clone_id,
                pid,
                signal,
            } => (clone_id, pid, signal, 0),
        };
        let mut out = [0u8; HEADER_LEN];
        let fields: [&[u8]; 7] = [
            &MAGIC,
            &VERSION.to_le_bytes(),
            &self.kind().to_le_bytes(),
            &clone_id.to_le_bytes(),
            &pid.to_le_bytes(),
            &value.to_le_bytes(),
            &aux.to_le_bytes(),
        ];
        let mut at = 0;
        for field in fields {
            let end = at + field.len();
            out[at..end].copy_from_slice(field);
            at = end;
        }
        out
    }

    /// Encodes the message (see the [crate docs](crate)).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header().to_vec();
        if let Msg::Configure(s) = self {
            let root = s.root.as_os_str().as_bytes();
            out.extend_from_slice(&s.limits.memory_bytes.to_le_bytes());
            out.extend_from_slice(&s.limits.cpu_seconds.to_le_bytes());
            out.extend_from_slice(&s.limits.max_fds.to_le_bytes());
            out.extend_from_slice(&s.first_uid.to_le_bytes());
            out.extend_from_slice(&s.gid.to_le_bytes());
            out.extend_from_slice(&u32::from(s.guest_stderr).to_le_bytes());
            out.extend_from_slice(&s.uid_count.to_le_bytes());
            // Checked by the sender before encoding (`MAX_ROOT_PATH`).
            let len = u32::try_from(root.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(root);
        }
        if let Msg::Ready { handlers, .. } = self {
            // Checked by the sender before encoding (`check_handlers`).
            let count = u16::try_from(handlers.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&count.to_le_bytes());
            for name in handlers {
                out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(name.as_bytes());
            }
        }
        out
    }

    /// Decodes one datagram.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        let len = bytes.len();
        let bad = |what| ProtoError::Malformed { what, len };
        let mut r = Reader { bytes, pos: 0 };
        let Header {
            kind,
            clone_id,
            pid,
            value,
            aux,
        } = decode_header(&mut r).map_err(bad)?;
        let msg = match kind {
            0x0001 => Msg::Configure(decode_configure(&mut r).map_err(bad)?),
            0x0002 => Msg::Clone {
                clone_id,
                ring_len: aux,
            },
            0x0003 => Msg::Shutdown,
            0x0081 => Msg::Ready {
                pid,
                handlers: decode_handlers(&mut r).map_err(bad)?,
            },
            0x0082 => Msg::InitFailed {
                stage: aux,
                errno: value,
            },
            0x0083 => Msg::Spawned { clone_id, pid },
            0x0084 => Msg::SpawnFailed {
                clone_id,
                stage: aux,
                errno: value,
            },
            0x0085 => Msg::Exited {
                clone_id,
                pid,
                code: value,
                cpu_ms: aux,
            },
            0x0086 => Msg::Killed {
                clone_id,
                pid,
                signal: value,
                cpu_ms: aux,
            },
            0x0087 => Msg::Stopped {
                clone_id,
                pid,
                signal: value,
            },
            _ => return Err(bad("unknown kind")),
        };
        if r.pos != len {
            return Err(bad("trailing bytes"));
        }
        Ok(msg)
    }
}

/// The header's fields after the magic and the version, which every kind has.
struct Header {
    kind: u16,
    clone_id: u32,
    pid: i32,
    value: i32,
    aux: u32,
}

/// Reads the 24-byte header: the magic and the version checked, the rest as they are (the
/// kind is judged by the caller). `Err` names what is wrong.
fn decode_header(r: &mut Reader<'_>) -> Result<Header, &'static str> {
    const SHORT: &str = "short header";
    if r.take::<4>().ok_or(SHORT)? != MAGIC {
        return Err("bad magic");
    }
    if u16::from_le_bytes(r.take().ok_or(SHORT)?) != VERSION {
        return Err("unsupported version");
    }
    Ok(Header {
        kind: u16::from_le_bytes(r.take().ok_or(SHORT)?),
        clone_id: u32::from_le_bytes(r.take().ok_or(SHORT)?),
        pid: i32::from_le_bytes(r.take().ok_or(SHORT)?),
        value: i32::from_le_bytes(r.take().ok_or(SHORT)?),
        aux: u32::from_le_bytes(r.take().ok_or(SHORT)?),
    })
}

/// Reads a `Configure` body: the root path at most [`MAX_ROOT_PATH`] bytes, no flag but
/// bit 0, and a uid range that is not empty, does not start at root and ends within `u32`.
/// `Err` names what is wrong.
fn decode_configure(r: &mut Reader<'_>) -> Result<Settings, &'static str> {
    const SHORT: &str = "short Configure body";
    let memory_bytes = u64::from_le_bytes(r.take().ok_or(SHORT)?);
    let cpu_seconds = u64::from_le_bytes(r.take().ok_or(SHORT)?);
    let max_fds = u64::from_le_bytes(r.take().ok_or(SHORT)?);
    let first_uid = u32::from_le_bytes(r.take().ok_or(SHORT)?);
    let gid = u32::from_le_bytes(r.take().ok_or(SHORT)?);
    let flags = u32::from_le_bytes(r.take().ok_or(SHORT)?);
    let uid_count = u32::from_le_bytes(r.take().ok_or(SHORT)?);
    let root_len = u32::from_le_bytes(r.take().ok_or(SHORT)?);
    let root_len = usize::try_from(root_len)
        .ok()
        .filter(|&n| n <= MAX_ROOT_PATH)
        .ok_or("root path too long")?;
    let root = r.take_slice(root_len).ok_or("short root path")?;
    if flags > 1 {
        return Err("unknown Configure flags");
    }
    let last = u64::from(first_uid) + u64::from(uid_count);
    if first_uid == 0 || uid_count == 0 || last > u64::from(u32::MAX) {
        return Err("bad uid range");
    }
    Ok(Settings {
        limits: Limits {
            memory_bytes,
            cpu_seconds,
            max_fds,
        },
        first_uid,
        uid_count,
        gid,
        guest_stderr: flags == 1,
        root: PathBuf::from(OsStr::from_bytes(root)),
    })
}

/// Whether `handlers` can be announced in `Ready`: at most [`MAX_HANDLERS`] valid handler
/// names, strictly increasing. `Err` names what is wrong.
pub fn check_handlers(handlers: &[String]) -> Result<(), &'static str> {
    if handlers.len() > MAX_HANDLERS {
        return Err("more than 1024 handlers");
    }
    if !handlers.iter().all(|h| mayfly_names::is_handler_name(h)) {
        return Err("a handler name that is not 1..=64 bytes of [a-z0-9_.-]");
    }
    if !handlers.windows(2).all(|w| w.first() < w.get(1)) {
        return Err("handler names not sorted or repeated");
    }
    Ok(())
}

/// Reads a `Ready` body: the handler names, checked as [`check_handlers`] does. `Err` names
/// what is wrong.
fn decode_handlers(r: &mut Reader<'_>) -> Result<Vec<String>, &'static str> {
    let count = usize::from(u16::from_le_bytes(r.take().ok_or("short Ready body")?));
    if count > MAX_HANDLERS {
        return Err("more than 1024 handlers");
    }
    let mut handlers = Vec::with_capacity(count);
    for _ in 0..count {
        let [len] = r.take::<1>().ok_or("short Ready body")?;
        let name = r.take_slice(usize::from(len)).ok_or("short handler name")?;
        mayfly_names::check_name(name, mayfly_names::MAX_HANDLER_NAME)
            .map_err(|_| "a handler name that is not 1..=64 bytes of [a-z0-9_.-]")?;
        // Only [a-z0-9_.-] bytes: ASCII, so valid UTF-8.
        let name = std::str::from_utf8(name).map_err(|_| "handler name not UTF-8")?;
        handlers.push(name.to_owned());
    }
    check_handlers(&handlers)?;
    Ok(handlers)
}

/// A cursor over a datagram: each read takes the next bytes, or `None` past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let slice = self.take_slice(N)?;
        slice.try_into().ok()
    }

    fn take_slice(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let slice = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Stage, READY_BUF_LEN, READY_MAX};

    #[test]
    fn every_message_round_trips() {
        let messages = [
            Msg::Configure(Settings {
                limits: Limits::default(),
                first_uid: 1_900_000_000,
                uid_count: 77,
                gid: 65533,
                guest_stderr: true,
                root: PathBuf::from("/run/mayfly/sandbox-root"),
            }),
            Msg::Shutdown,
            Msg::Ready {
                pid: 42,
                handlers: Vec::new(),
            },
            Msg::Ready {
                pid: 43,
                handlers: vec!["kv".into(), "test.crash".into(), "z".repeat(64)],
            },
            Msg::InitFailed {
                stage: Stage::Chroot as u32,
                errno: 1,
            },
            Msg::SpawnFailed {
                clone_id: 7,
                stage: 10,
                errno: 11,
            },
            Msg::Exited {
                clone_id: 7,
                pid: 99,
                code: -3,
                cpu_ms: 12,
            },
            Msg::Killed {
                clone_id: u32::MAX,
                pid: 1,
                signal: 31,
                cpu_ms: 0,
            },
            Msg::Stopped {
                clone_id: 5,
                pid: 6,
                signal: 19,
            },
        ];
        for msg in messages {
            assert_eq!(Msg::decode(&msg.encode()).unwrap(), msg);
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = Msg::Ready {
            pid: 1,
            handlers: Vec::new(),
        }
        .encode();
        assert!(Msg::decode(&good[..10]).is_err());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(Msg::decode(&bad).is_err());
        let mut bad = good.clone();
        bad[6] = 0x77;
        assert!(Msg::decode(&bad).is_err());
        let mut long = good;
        long.push(0);
        assert!(Msg::decode(&long).is_err());
        let mut conf = Msg::Configure(Settings {
            limits: Limits::default(),
            first_uid: 1,
            uid_count: 1,
            gid: 1,
            guest_stderr: false,
            root: PathBuf::from("/x"),
        })
        .encode();
        assert!(Msg::decode(&conf).is_ok());
        // An empty uid range, or one running past the last uid.
        let mut empty = conf.clone();
        empty[60..64].copy_from_slice(&0u32.to_le_bytes());
        assert!(Msg::decode(&empty).is_err());
        let mut past = conf.clone();
        past[48..52].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        past[60..64].copy_from_slice(&2u32.to_le_bytes());
        assert!(Msg::decode(&past).is_err());
        // Claim a root path longer than the cap.
        conf[64..68].copy_from_slice(&5000u32.to_le_bytes());
        assert!(Msg::decode(&conf).is_err());
    }

    /// What a refused datagram is refused for, as the error (and the agent's log) names it.
    fn refusal(bytes: &[u8]) -> &'static str {
        match Msg::decode(bytes) {
            Err(ProtoError::Malformed { what, len }) => {
                assert_eq!(len, bytes.len());
                what
            }
            other => panic!("{other:?} is not a refusal"),
        }
    }

    #[test]
    fn each_malformation_is_refused_for_what_it_is() {
        let shutdown = Msg::Shutdown.encode();
        let conf = Msg::Configure(Settings {
            limits: Limits::default(),
            first_uid: 1000,
            uid_count: 10,
            gid: 1000,
            guest_stderr: true,
            root: PathBuf::from("/run/x"),
        })
        .encode();
        let too_long = u32::try_from(MAX_ROOT_PATH + 1).unwrap().to_le_bytes();
        // The message, where bytes are written into it, those bytes, the length kept, and
        // the reason it is refused for.
        type Case<'a> = (&'a [u8], usize, &'a [u8], usize, &'a str);
        let cases: [Case<'_>; 11] = [
            (&shutdown, 0, b"", 23, "short header"),
            (&shutdown, 3, b"X", 24, "bad magic"),
            (&shutdown, 4, &2u16.to_le_bytes(), 24, "unsupported version"),
            (&shutdown, 6, &4u16.to_le_bytes(), 24, "unknown kind"),
            (&shutdown, 24, &[0], 25, "trailing bytes"),
            (&conf, 0, b"", HEADER_LEN + 43, "short Configure body"),
            (&conf, 0, b"", conf.len() - 1, "short root path"),
            (
                &conf,
                56,
                &2u32.to_le_bytes(),
                conf.len(),
                "unknown Configure flags",
            ),
            (&conf, 48, &0u32.to_le_bytes(), conf.len(), "bad uid range"),
            (&conf, 64, &too_long, conf.len(), "root path too long"),
            // Flags are judged after the whole body is read: a short body with bad flags
            // is short.
            (
                &conf,
                56,
                &2u32.to_le_bytes(),
                conf.len() - 1,
                "short root path",
            ),
        ];
        for (msg, at, patch, keep, reason) in cases {
            let mut bytes = msg.to_vec();
            bytes.resize(bytes.len().max(at + patch.len()), 0);
            bytes[at..at + patch.len()].copy_from_slice(patch);
            bytes.truncate(keep);
            assert_eq!(refusal(&bytes), reason, "{reason}: {bytes:02x?}");
        }
    }

    fn ready(names: &[&[u8]]) -> Vec<u8> {
        let mut out = Msg::Ready {
            pid: 1,
            handlers: Vec::new(),
        }
        .encode();
        out.truncate(HEADER_LEN);
        out.extend_from_slice(&u16::try_from(names.len()).unwrap().to_le_bytes());
        for n in names {
            out.push(u8::try_from(n.len()).unwrap());
            out.extend_from_slice(n);
        }
        out
    }

    #[test]
    fn the_handlers_announced_in_ready_are_checked() {
        let ok = ready(&[b"balance", b"kv", b"test.spin"]);
        assert!(matches!(
            Msg::decode(&ok),
            Ok(Msg::Ready { handlers, .. }) if handlers == ["balance", "kv", "test.spin"]
        ));
        let long = [b'a'; 65];
        for bad in [
            ready(&[b"kv", b"balance"]),                // not sorted
            ready(&[b"kv", b"kv"]),                     // repeated
            ready(&[b"Kv"]),                            // outside the name rule
            ready(&[b""]),                              // empty
            ready(&[&long]),                            // too long
            ready(&[b"kv"])[..HEADER_LEN + 3].to_vec(), // cut inside a name
        ] {
            assert!(
                matches!(Msg::decode(&bad), Err(ProtoError::Malformed { .. })),
                "{bad:?}"
            );
        }
        // A count past the cap is refused before anything is read for it.
        let mut many = ready(&[]);
        many[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&1025u16.to_le_bytes());
        assert!(Msg::decode(&many).is_err());
        // The largest Ready fits the agent's buffer for it.
        let names: Vec<String> = (0..MAX_HANDLERS).map(|i| format!("{i:064}")).collect();
        let largest = Msg::Ready {
            pid: 1,
            handlers: names,
        }
        .encode();
        assert_eq!(largest.len(), READY_MAX);
        assert!(largest.len() < READY_BUF_LEN);
        assert!(Msg::decode(&largest).is_ok());
    }
}
