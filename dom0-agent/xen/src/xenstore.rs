//! xenstore: the ring contract a domU reads, domain names, cleanup after a destroy.
//!
//! Reads, writes, listings and removals go through `xenstore-rs` (xenstored's socket or
//! `/dev/xen/xenbus`). `xenstore-rs` 0.8 has no `SET_PERMS`, so this module sends that one
//! message itself on a second connection (`docs/misc/xenstore.txt`; all integers
//! little-endian on x86):
//!
//! ```text
//!  header  u32 type (SET_PERMS = 14, ERROR = 16)  u32 req_id  u32 tx_id (0)  u32 len
//!  payload path NUL perm NUL perm NUL ...          (len <= 4096)
//!          perm = one of r w b n, then a decimal domid; the first names the owner and
//!          what every domain not listed may do
//!  reply   same header, payload "OK\0", or an errno name ("EACCES\0") with type ERROR
//! ```
//!
//! The contract (`docs/formats.md` §2.5, shared with the guest side), written while the domain is
//! still paused, each node owned by dom0 and readable by the domU only (`n0 r<domid>`):
//!
//! ```text
//!  /local/domain/<domid>/data/mayfly/
//!      ring-version   "1"
//!      ring-pages     N, decimal
//!      ring-refs      N decimal grant refs, space separated, in page order
//!      event-channel  dom0's unbound port for <domid>, decimal
//! ```
//!
//! Everything read back (domain ids, names, the `vm` path) is bounded and validated: a
//! value that does not parse is skipped or refused, never trusted.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use mayfly_sync::lock;
use xenstore_rs::unix::XsUnix;
use xenstore_rs::Xs;

use crate::{DomId, DOMID_FIRST_RESERVED};

/// The contract's version (`ring-version`).
pub const RING_VERSION: u32 = 1;
/// Longest domain name accepted from xenstore.
pub const MAX_NAME_LEN: usize = 64;
/// Most entries of `/local/domain` considered.
const MAX_DOMAINS: usize = 4096;
/// xenstore's payload cap.
const PAYLOAD_MAX: usize = 4096;
const XS_SET_PERMS: u32 = 14;
const XS_WATCH_EVENT: u32 = 15;
const XS_ERROR: u32 = 16;
const HEADER_LEN: usize = 16;

/// A xenstore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Neither xenstored's socket nor `/dev/xen/xenbus` could be opened.
    #[error("connecting to xenstore failed (is xenstored running?)")]
    Open(#[source] io::Error),
    /// An operation on a path failed.
    #[error("xenstore {op} {path} failed")]
    Op {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A request would exceed xenstore's payload cap.
    #[error("xenstore {op} {path}: request of {len} bytes exceeds {PAYLOAD_MAX}")]
    TooLong {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// The payload length.
        len: usize,
    },
    /// xenstored answered something malformed.
    #[error("xenstore {op} {path}: malformed reply ({what})")]
    Reply {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// What was wrong.
        what: &'static str,
    },
}

/// What the domU needs to find its ring: the grant refs and the event-channel port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingContract {
    /// Grant refs of the ring pages, in page order.
    pub ring_refs: Vec<u32>,
    /// Dom0's unbound port for the domain.
    pub event_channel: u32,
}

impl RingContract {
    /// The contract directory of `domid`.
    pub fn dir(domid: DomId) -> String {
        format!("/local/domain/{domid}/data/mayfly")
    }

    /// The nodes to write, `(path, value)`, in writing order.
    pub fn entries(&self, domid: DomId) -> Vec<(String, String)> {
        let dir = Self::dir(domid);
        let refs: Vec<String> = self.ring_refs.iter().map(u32::to_string).collect();
        vec![
            (format!("{dir}/ring-version"), RING_VERSION.to_string()),
            (
                format!("{dir}/ring-pages"),
                self.ring_refs.len().to_string(),
            ),
            (format!("{dir}/ring-refs"), refs.join(" ")),
            (
                format!("{dir}/event-channel"),
                self.event_channel.to_string(),
            ),
        ]
    }
}

/// Permissions of a node owned by dom0 that `domid` may read and nobody else may access.
pub fn guest_read_only(domid: DomId) -> [String; 2] {
    ["n0".to_owned(), format!("r{domid}")]
}

/// The `SET_PERMS` payload: `path NUL perm NUL ...`.
fn set_perms_payload(path: &str, perms: &[String]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(path.len().saturating_add(32));
    payload.extend_from_slice(path.as_bytes());
    payload.push(0);
    for p in perms {
        payload.extend_from_slice(p.as_bytes());
        payload.push(0);
    }
    payload
}

/// A `/local/domain` entry as a domain id: plain decimal, below the reserved ids.
pub fn parse_domid(entry: &str) -> Option<DomId> {
    if entry.is_empty() || entry.len() > 5 || !entry.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    entry.parse().ok().filter(|&d| d < DOMID_FIRST_RESERVED)
}

/// Whether a domain name read from xenstore is one this crate will handle.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether a domain's `vm` node names a `/vm/<uuid>` path (the only kind removed).
pub fn valid_vm_path(path: &str) -> bool {
    let Some(uuid) = path.strip_prefix("/vm/") else {
        return false;
    };
    uuid.len() == 36
        && uuid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Where dom0 keeps its backend halves of other domains' devices: `<kind>/<domid>/<devid>`.
const BACKEND_DIR: &str = "/local/domain/0/backend";
/// Most backend kinds (`console`, `vbd`, `vif`, ...) considered.
const MAX_BACKEND_KINDS: usize = 64;

/// Whether a child of [`BACKEND_DIR`] is a device kind whose path may be built on.
fn valid_backend_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 32
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// The xenstore subtrees removed for destroyed domain `domid`: `/local/domain/<domid>`,
/// `/libxl/<domid>`, `/local/domain/0/backend/<kind>/<domid>` for each valid kind listed
/// there (at most [`MAX_BACKEND_KINDS`]), `/local/domain/0/device-model/<domid>`, and its
/// `vm` path if that is a valid `/vm/<uuid>` and, when `uuid` is known, exactly
/// [`vm_path`]`(uuid)`. Nothing for dom0 or a reserved id.
pub fn domain_paths(
    domid: DomId,
    backend_kinds: &[String],
    vm: Option<&str>,
    uuid: Option<[u8; 16]>,
) -> Vec<String> {
    if domid == 0 || domid >= DOMID_FIRST_RESERVED {
        return Vec::new();
    }
    let mut paths = vec![
        format!("/local/domain/{domid}"),
        format!("/libxl/{domid}"),
        format!("/local/domain/0/device-model/{domid}"),
    ];
    paths.extend(
        backend_kinds
            .iter()
            .take(MAX_BACKEND_KINDS)
            .filter(|k| valid_backend_kind(k))
            .map(|k| format!("{BACKEND_DIR}/{k}/{domid}")),
    );
    let expected = uuid.map(vm_path);
    if let Some(vm) = vm
        .filter(|p| valid_vm_path(p))
        .filter(|p| expected.as_deref().is_none_or(|e| e == *p))
    {
        paths.push(vm.to_owned());
    }
    paths
}

/// A uuid as libxl prints it: 8-4-4-4-12 lowercase hex.
pub fn uuid_text(uuid: [u8; 16]) -> String {
    let mut text = String::with_capacity(36);
    for (i, b) in uuid.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        text.push_str(&format!("{b:02x}"));
    }
    text
}

/// The `/vm/<uuid>` node libxl keeps for the domain with `uuid`.
pub fn vm_path(uuid: [u8; 16]) -> String {
    format!("/vm/{}", uuid_text(uuid))
}

/// The second connection, for `SET_PERMS`.
enum RawConn {
    Socket(UnixStream),
    Device(File),
}

impl RawConn {
    fn open() -> io::Result<Self> {
        let socket =
            std::env::var("XENSTORED_PATH").unwrap_or_else(|_| "/run/xenstored/socket".to_owned());
        if let Ok(s) = UnixStream::connect(socket) {
            return Ok(Self::Socket(s));
        }
        File::options()
            .read(true)
            .write(true)
            .open("/dev/xen/xenbus")
            .map(Self::Device)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Socket(s) => s.write_all(buf),
            Self::Device(f) => f.write_all(buf),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Self::Socket(s) => s.read_exact(buf),
            Self::Device(f) => f.read_exact(buf),
        }
    }

    /// Sends one request and returns the reply's type and payload (watch events, which
    /// this connection never asks for, are skipped).
    fn request(&mut self, kind: u32, req_id: u32, payload: &[u8]) -> io::Result<(u32, Vec<u8>)> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l as usize <= PAYLOAD_MAX)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::E2BIG))?;
        let mut msg = Vec::with_capacity(HEADER_LEN.saturating_add(payload.len()));
        for word in [kind, req_id, 0, len] {
            msg.extend_from_slice(&word.to_le_bytes());
        }
        msg.extend_from_slice(payload);
        self.write_all(&msg)?;
        loop {
            let mut header = [0u8; HEADER_LEN];
            self.read_exact(&mut header)?;
            let word = |i: usize| {
                let mut w = [0u8; 4];
                if let Some(b) = header.get(i..i.saturating_add(4)) {
                    w.copy_from_slice(b);
                }
                u32::from_le_bytes(w)
            };
            let (kind, len) = (word(0), word(12));
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > PAYLOAD_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "xenstore reply longer than 4096 bytes",
                ));
            }
            let mut body = vec![0u8; len];
            self.read_exact(&mut body)?;
            if kind != XS_WATCH_EVENT {
                return Ok((kind, body));
            }
        }
    }
}

/// A connection to xenstore. Calls are serialised.
pub struct Store {
    xs: Mutex<XsUnix>,
    raw: Mutex<RawConn>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOENT)
}

impl Store {
    /// Connects (xenstored's socket, else `/dev/xen/xenbus`).
    pub fn open() -> Result<Self, StoreError> {
        let xs = XsUnix::new().map_err(StoreError::Open)?;
        let raw = RawConn::open().map_err(StoreError::Open)?;
        Ok(Self {
            xs: Mutex::new(xs),
            raw: Mutex::new(raw),
        })
    }

    /// Reads a node; `None` if it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<String>, StoreError> {
        match lock(&self.xs).read(path) {
            Ok(v) => Ok(Some(v.into_string())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(StoreError::Op {
                op: "read",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes a node (creating it and its parents).
    pub fn write(&self, path: &str, value: &str) -> Result<(), StoreError> {
        lock(&self.xs)
            .write(path, value)
            .map_err(|source| StoreError::Op {
                op: "write",
                path: path.to_owned(),
                source,
            })
    }

    /// Removes a node and everything below it; a missing node is not an error.
    pub fn remove(&self, path: &str) -> Result<(), StoreError> {
        match lock(&self.xs).rm(path) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(StoreError::Op {
                op: "rm",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The children of a node; empty if it does not exist.
    pub fn list(&self, path: &str) -> Result<Vec<String>, StoreError> {
        match lock(&self.xs).directory(path) {
            Ok(v) => Ok(v.into_iter().map(String::from).collect()),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(source) => Err(StoreError::Op {
                op: "directory",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Sets a node's permissions (`perms` in xenstore's `[rwbn]<domid>` form, owner first).
    pub fn set_perms(&self, path: &str, perms: &[String]) -> Result<(), StoreError> {
        let payload = set_perms_payload(path, perms);
        if payload.len() > PAYLOAD_MAX {
            return Err(StoreError::TooLong {
                op: "set_perms",
                path: path.to_owned(),
                len: payload.len(),
            });
        }
        let op_error = |source| StoreError::Op {
            op: "set_perms",
            path: path.to_owned(),
            source,
        };
        let (kind, body) = lock(&self.raw)
            .request(XS_SET_PERMS, 0, &payload)
            .map_err(op_error)?;
        match kind {
            XS_SET_PERMS if body.as_slice() == b"OK\0" => Ok(()),
            XS_SET_PERMS => Err(StoreError::Reply {
                op: "set_perms",
                path: path.to_owned(),
                what: "not OK",
            }),
            XS_ERROR => Err(op_error(errno_of(&body))),
            _ => Err(StoreError::Reply {
                op: "set_perms",
                path: path.to_owned(),
                what: "unexpected message type",
            }),
        }
    }

    /// Writes the ring contract of `domid` (see the [module docs](self)): the directory
    /// and every node owned by dom0, readable by the domain only. Call it while the
    /// domain is paused, before it first runs.
    pub fn write_contract(&self, domid: DomId, contract: &RingContract) -> Result<(), StoreError> {
        let perms = guest_read_only(domid);
        let dir = RingContract::dir(domid);
        self.write(&dir, "")?;
        self.set_perms(&dir, &perms)?;
        for (path, value) in contract.entries(domid) {
            self.write(&path, &value)?;
            self.set_perms(&path, &perms)?;
        }
        Ok(())
    }

    /// The name of `domid` (its `name` node), if it has a valid one.
    pub fn domain_name(&self, domid: DomId) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(&format!("/local/domain/{domid}/name"))?
            .filter(|n| valid_name(n)))
    }

    /// Domains whose name starts with `prefix`, `(domid, name)`, from `/local/domain`.
    pub fn domains_named(&self, prefix: &str) -> Result<Vec<(DomId, String)>, StoreError> {
        let mut found = Vec::new();
        for entry in self.list("/local/domain")?.iter().take(MAX_DOMAINS) {
            let Some(domid) = parse_domid(entry) else {
                continue;
            };
            if domid == 0 {
                continue;
            }
            if let Some(name) = self.domain_name(domid)? {
                if name.starts_with(prefix) {
                    found.push((domid, name));
                }
            }
        }
        Ok(found)
    }

    /// The domain whose name is exactly `name`, if any.
    pub fn domid_of(&self, name: &str) -> Result<Option<DomId>, StoreError> {
        Ok(self
            .domains_named(name)?
            .into_iter()
            .find(|(_, n)| n == name)
            .map(|(d, _)| d))
    }

    /// Removes what the toolstack kept in xenstore for a destroyed domain (see
    /// [`domain_paths`]): its home, libxl's record, dom0's backend directories for its
    /// devices (libxl writes one for the PV console even without disks or networks) and
    /// its `/vm/<uuid>` (only that of `uuid`, when the caller knows the domain's uuid).
    pub fn remove_domain(&self, domid: DomId, uuid: Option<[u8; 16]>) -> Result<(), StoreError> {
        if domid == 0 || domid >= DOMID_FIRST_RESERVED {
            return Ok(());
        }
        // Every path is tried even if one step fails; the first failure is returned.
        let mut first_error = None;
        let vm = self
            .read(&format!("/local/domain/{domid}/vm"))
            .unwrap_or_else(|e| {
                first_error.get_or_insert(e);
                None
            });
        let kinds = self.list(BACKEND_DIR).unwrap_or_else(|e| {
            first_error.get_or_insert(e);
            Vec::new()
        });
        for path in domain_paths(domid, &kinds, vm.as_deref(), uuid) {
            if let Err(e) = self.remove(&path) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The errno an `ERROR` reply names (`"EACCES\0"`), as an `io::Error`.
fn errno_of(body: &[u8]) -> io::Error {
    let name = body.split(|&b| b == 0).next().unwrap_or_default();
    let code = match name {
        b"EINVAL" => libc::EINVAL,
        b"EACCES" => libc::EACCES,
        b"EEXIST" => libc::EEXIST,
        b"EISDIR" => libc::EISDIR,
        b"ENOENT" => libc::ENOENT,
        b"ENOMEM" => libc::ENOMEM,
        b"ENOSPC" => libc::ENOSPC,
        b"EIO" => libc::EIO,
        b"ENOTEMPTY" => libc::ENOTEMPTY,
        b"ENOSYS" => libc::ENOSYS,
        b"EROFS" => libc::EROFS,
        b"EBUSY" => libc::EBUSY,
        b"EAGAIN" => libc::EAGAIN,
        b"EISCONN" => libc::EISCONN,
        b"E2BIG" => libc::E2BIG,
        b"EPERM" => libc::EPERM,
        _ => libc::EPROTO,
    };
    io::Error::from_raw_os_error(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_entries_follow_the_documented_layout() {
        let c = RingContract {
            ring_refs: vec![8, 9, 10],
            event_channel: 17,
        };
        let e = c.entries(5);
        assert_eq!(
            e,
            vec![
                (
                    "/local/domain/5/data/mayfly/ring-version".into(),
                    "1".into()
                ),
                ("/local/domain/5/data/mayfly/ring-pages".into(), "3".into()),
                (
                    "/local/domain/5/data/mayfly/ring-refs".into(),
                    "8 9 10".into()
                ),
                (
                    "/local/domain/5/data/mayfly/event-channel".into(),
                    "17".into()
                ),
            ]
        );
    }

    #[test]
    fn permissions_make_dom0_the_owner_and_the_guest_a_reader() {
        assert_eq!(guest_read_only(7), ["n0".to_owned(), "r7".to_owned()]);
        assert_eq!(
            set_perms_payload("/a/b", &guest_read_only(7)),
            b"/a/b\0n0\0r7\0".to_vec()
        );
    }

    #[test]
    fn hostile_xenstore_values_are_refused() {
        assert_eq!(parse_domid("12"), Some(12));
        assert_eq!(parse_domid("0"), Some(0));
        for bad in ["", "-1", "+3", "1e3", "99999", "32752", "0x10", "12 ", "１"] {
            assert_eq!(parse_domid(bad), None, "{bad:?}");
        }
        assert!(valid_name("mayfly-3"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("name\n"));
        assert!(!valid_name(&"x".repeat(MAX_NAME_LEN + 1)));
        assert!(valid_vm_path("/vm/0123abcd-0000-4000-8000-00000000beef"));
        assert!(!valid_vm_path("/vm/../local/domain/0"));
        assert!(!valid_vm_path("/local/domain/0"));
        assert!(!valid_vm_path("/vm/0123abcd-0000-4000-8000-00000000beef/x"));
        assert!(!valid_vm_path("/vm/0123abcd00000-4000-8000-00000000beef"));
    }

    /// A fake xenstored on the other end of a socket pair: answers one request with
    /// `replies` (each `(type, payload)`), returns what it received.
    fn fake_xenstored(replies: Vec<(u32, Vec<u8>)>) -> (RawConn, std::thread::JoinHandle<Vec<u8>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut header = [0u8; HEADER_LEN];
            theirs.read_exact(&mut header).unwrap();
            let len = u32::from_le_bytes(header[12..16].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            theirs.read_exact(&mut body).unwrap();
            for (kind, payload) in replies {
                let mut msg = Vec::new();
                for w in [kind, 0, 0, u32::try_from(payload.len()).unwrap()] {
                    msg.extend_from_slice(&w.to_le_bytes());
                }
                msg.extend_from_slice(&payload);
                theirs.write_all(&msg).unwrap();
            }
            let mut request = header.to_vec();
            request.extend_from_slice(&body);
            request
        });
        (RawConn::Socket(ours), server)
    }

    #[test]
    fn set_perms_goes_out_as_documented_and_skips_watch_events() {
        let (mut conn, server) = fake_xenstored(vec![
            (XS_WATCH_EVENT, b"/x\0tok\0".to_vec()),
            (XS_SET_PERMS, b"OK\0".to_vec()),
        ]);
        let payload = set_perms_payload("/local/domain/3/data/mayfly", &guest_read_only(3));
        let (kind, body) = conn.request(XS_SET_PERMS, 0, &payload).unwrap();
        assert_eq!((kind, body.as_slice()), (XS_SET_PERMS, &b"OK\0"[..]));
        let sent = server.join().unwrap();
        let mut want = Vec::new();
        for w in [14u32, 0, 0, u32::try_from(payload.len()).unwrap()] {
            want.extend_from_slice(&w.to_le_bytes());
        }
        want.extend_from_slice(b"/local/domain/3/data/mayfly\0n0\0r3\0");
        assert_eq!(sent, want);
    }

    #[test]
    fn an_oversized_reply_is_refused_not_allocated() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut buf = [0u8; 64];
            let _ = theirs.read(&mut buf).unwrap();
            let mut msg = Vec::new();
            for w in [XS_SET_PERMS, 0, 0, u32::MAX] {
                msg.extend_from_slice(&w.to_le_bytes());
            }
            theirs.write_all(&msg).unwrap();
            theirs
        });
        let mut conn = RawConn::Socket(ours);
        let err = conn.request(XS_SET_PERMS, 0, b"/a\0n0\0").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(server.join().unwrap());
        // A request over the cap is refused before anything is sent.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut conn = RawConn::Socket(ours);
        let err = conn
            .request(XS_SET_PERMS, 0, &vec![b'a'; PAYLOAD_MAX + 1])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::E2BIG));
        drop(conn);
        let mut sent = Vec::new();
        theirs.read_to_end(&mut sent).unwrap();
        assert!(sent.is_empty());
    }

    #[test]
    fn a_destroyed_domains_backend_entries_are_removed_too() {
        let kinds: Vec<String> = ["console", "vbd", "../0", "", "a/b"]
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
        let vm = "/vm/0123abcd-0000-4000-8000-00000000beef";
        let paths = domain_paths(7, &kinds, Some(vm), None);
        assert_eq!(
            paths,
            vec![
                "/local/domain/7".to_owned(),
                "/libxl/7".to_owned(),
                "/local/domain/0/device-model/7".to_owned(),
                "/local/domain/0/backend/console/7".to_owned(),
                "/local/domain/0/backend/vbd/7".to_owned(),
                vm.to_owned(),
            ]
        );
        // A hostile vm path is not followed; dom0 and reserved ids get nothing.
        assert!(!domain_paths(7, &[], Some("/local/domain/0"), None)
            .contains(&"/local/domain/0".to_owned()));
        assert!(domain_paths(0, &kinds, Some(vm), None).is_empty());
        assert!(domain_paths(DOMID_FIRST_RESERVED, &kinds, None, None).is_empty());
        // The number of kinds considered is bounded.
        let many: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        assert_eq!(
            domain_paths(7, &many, None, None).len(),
            3 + MAX_BACKEND_KINDS
        );
    }

    #[test]
    fn only_the_domains_own_vm_node_is_removed_when_its_uuid_is_known() {
        let mut uuid = [0u8; 16];
        uuid[0] = 0x01;
        uuid[1] = 0x23;
        uuid[2] = 0xab;
        uuid[3] = 0xcd;
        uuid[6] = 0x40;
        uuid[8] = 0x80;
        uuid[14] = 0xbe;
        uuid[15] = 0xef;
        let own = "/vm/0123abcd-0000-4000-8000-00000000beef";
        assert_eq!(vm_path(uuid), own);
        assert!(domain_paths(7, &[], Some(own), Some(uuid)).contains(&own.to_owned()));
        // A `vm` node naming another domain's (well-formed) /vm entry is not followed.
        let other = "/vm/ffffffff-0000-4000-8000-00000000beef";
        assert!(!domain_paths(7, &[], Some(other), Some(uuid)).contains(&other.to_owned()));
    }

    #[test]
    fn error_replies_map_to_errnos() {
        assert_eq!(errno_of(b"EACCES\0").raw_os_error(), Some(libc::EACCES));
        assert_eq!(errno_of(b"ENOENT\0").raw_os_error(), Some(libc::ENOENT));
        assert_eq!(errno_of(b"garbage").raw_os_error(), Some(libc::EPROTO));
        assert_eq!(errno_of(b"").raw_os_error(), Some(libc::EPROTO));
    }
}
