//! The shim's Xen mode: `domu-shim` as `/init` (PID 1) of a PV domU built from the template.
//!
//! ```text
//!  mount devtmpfs /dev, proc /proc
//!  load the modules listed in /etc/mayfly/modules (finit_module; xen-evtchn, xen-gntdev)
//!  read /local/domain/<domid>/data/mayfly/{ring-version,ring-pages,ring-refs,event-channel}
//!  map ring-refs from domain 0 (/dev/xen/gntdev); bind event-channel of domain 0
//!  run the transaction (the same protocol as every backend: Ready, Start, ...)
//!  power the domain off
//! ```
//!
//! The xenstore keys (written only by dom0, before it unpauses the domain; see
//! `docs/formats.md` §2.5) are still validated as if hostile: each value is at most a few bytes
//! per field, decimal, in range, and the refs are exactly `ring-pages` in number.
//!
//! Progress goes to the console as `mayfly-shim: ...` lines (the Xen-in-QEMU suite reads
//! them from xenconsoled's log).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use mayfly_ring::xen::{EvtchnNotifier, GntdevMem, MAX_RING_PAGES};

use crate::xenstore::{Xenstore, XenstoreError};

/// Where the ring's keys live, relative to the domain's xenstore home.
pub const KEY_DIR: &str = "data/mayfly";
/// The only ring version this shim speaks.
pub const RING_VERSION: &str = "1";
/// The list of kernel modules to load, one path per line, in order.
pub const MODULE_LIST: &str = "/etc/mayfly/modules";
/// The domain that grants the ring and owns the other end of the event channel.
pub const BACKEND_DOMID: u16 = 0;

/// Highest event channel port number (the FIFO ABI's limit, 2^17).
const MAX_PORT: u32 = 1 << 17;
const MAX_MODULES: usize = 16;
const MAX_MODULE_LIST_LEN: usize = 4096;
/// How long to wait for the keys and device nodes to appear.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Setting up the Xen transport failed.
#[derive(Debug, thiserror::Error)]
pub enum XenSetupError {
    /// Mounting a filesystem failed.
    #[error("mounting {fstype} on {target} failed")]
    Mount {
        /// The filesystem type.
        fstype: &'static str,
        /// The mount point.
        target: &'static str,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The module list could not be read or is malformed.
    #[error("module list {MODULE_LIST}: {what}")]
    ModuleList {
        /// What was wrong.
        what: String,
    },
    /// Loading a module failed.
    #[error("loading module {path} failed")]
    Module {
        /// The module file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A device node did not appear in time.
    #[error("{path} did not appear within {SETUP_TIMEOUT:?}")]
    NoDevice {
        /// The node.
        path: &'static str,
    },
    /// Reading a key failed.
    #[error("reading the ring keys failed")]
    Xenstore(#[from] XenstoreError),
    /// A key's value is malformed.
    #[error("xenstore key {key}: {what}")]
    BadKey {
        /// The key (relative to [`KEY_DIR`]).
        key: &'static str,
        /// What was wrong.
        what: String,
    },
    /// Mapping the ring failed.
    #[error("mapping the ring failed")]
    Map(#[from] mayfly_ring::xen::GntdevError),
    /// Binding the event channel failed.
    #[error("binding the event channel failed")]
    Bind(#[from] mayfly_ring::xen::EvtchnError),
}

/// The ring's coordinates, as validated from xenstore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingKeys {
    /// Grant references, in page order (as many as the ring has pages).
    pub refs: Vec<u32>,
    /// dom0's unbound port.
    pub port: u32,
}

/// Validates the four key values (raw bytes from xenstore).
pub fn parse_keys(
    version: &[u8],
    pages: &[u8],
    refs: &[u8],
    port: &[u8],
) -> Result<RingKeys, XenSetupError> {
    let bad = |key: &'static str, what: &str| XenSetupError::BadKey {
        key,
        what: what.to_string(),
    };
    if version != RING_VERSION.as_bytes() {
        return Err(bad("ring-version", "not \"1\""));
    }
    let pages = decimal(pages, 3).ok_or_else(|| bad("ring-pages", "not a decimal number"))?;
    let pages = usize::try_from(pages).map_err(|_| bad("ring-pages", "out of range"))?;
    if pages == 0 || pages > MAX_RING_PAGES {
        return Err(bad("ring-pages", "out of range"));
    }
    let mut list = Vec::with_capacity(pages);
    for word in refs.split(|&b| b == b' ') {
        if list.len() >= pages {
            return Err(bad("ring-refs", "more refs than ring-pages"));
        }
        list.push(
            decimal(word, 10)
                .ok_or_else(|| bad("ring-refs", "not decimal refs separated by single spaces"))?,
        );
    }
    if list.len() != pages {
        return Err(bad("ring-refs", "fewer refs than ring-pages"));
    }
    let port = decimal(port, 6).ok_or_else(|| bad("event-channel", "not a decimal number"))?;
    if port == 0 || port >= MAX_PORT {
        return Err(bad("event-channel", "out of range"));
    }
    Ok(RingKeys { refs: list, port })
}

/// A canonical ASCII decimal (1 ..= `max_digits` digits, no leading zero except "0" itself)
/// that fits a `u32`: one spelling per value.
fn decimal(bytes: &[u8], max_digits: usize) -> Option<u32> {
    if bytes.is_empty() || bytes.len() > max_digits || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes.first() == Some(&b'0') {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Writes one progress line to the console (errors ignored: nothing to report them to).
pub fn say(line: &str) {
    let _ = writeln!(io::stdout(), "mayfly-shim: {line}");
    let _ = io::stdout().flush();
}

/// Mounts what the shim needs and loads the modules in [`MODULE_LIST`].
pub fn prepare_system() -> Result<(), XenSetupError> {
    use nix::mount::{mount, MsFlags};
    for (fstype, target) in [("devtmpfs", "/dev"), ("proc", "/proc")] {
        let _ = std::fs::create_dir_all(target);
        match mount(
            Some(fstype),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(source) => {
                return Err(XenSetupError::Mount {
                    fstype,
                    target,
                    source,
                })
            }
        }
    }
    for path in module_list()? {
        load_module(&path)?;
    }
    for node in ["/dev/xen/xenbus", "/dev/xen/evtchn", "/dev/xen/gntdev"] {
        wait_for(node)?;
    }
    Ok(())
}

fn module_list() -> Result<Vec<String>, XenSetupError> {
    let mut text = String::new();
    let file = match File::open(MODULE_LIST) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(XenSetupError::ModuleList {
                what: e.to_string(),
            })
        }
    };
    let limit = u64::try_from(MAX_MODULE_LIST_LEN).unwrap_or(u64::MAX);
    file.take(limit.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(|e| XenSetupError::ModuleList {
            what: e.to_string(),
        })?;
    if text.len() > MAX_MODULE_LIST_LEN {
        return Err(XenSetupError::ModuleList {
            what: "too long".into(),
        });
    }
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if list.len() > MAX_MODULES {
        return Err(XenSetupError::ModuleList {
            what: format!("more than {MAX_MODULES} modules"),
        });
    }
    Ok(list)
}

fn load_module(path: &str) -> Result<(), XenSetupError> {
    use nix::kmod::{finit_module, ModuleInitFlags};
    let err = |source| XenSetupError::Module {
        path: path.to_string(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(err(io::Error::from(e))),
    }
}

/// Polls for `path` to exist, up to [`SETUP_TIMEOUT`] (bounded in time and in count).
fn wait_for(path: &'static str) -> Result<(), XenSetupError> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    for _ in 0..3000 {
        if Path::new(path).exists() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(XenSetupError::NoDevice { path })
}

/// Reads and validates the ring keys. A missing key is waited for (dom0 writes them before
/// unpausing, so this only matters if that order is ever broken), up to [`SETUP_TIMEOUT`].
pub fn read_keys(xs: &mut Xenstore<File>) -> Result<RingKeys, XenSetupError> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut read = |key: &str| -> Result<Vec<u8>, XenSetupError> {
        let path = format!("{KEY_DIR}/{key}");
        for _ in 0..3000 {
            match xs.read(&path) {
                Err(e) if e.is_not_found() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return Ok(other?),
            }
        }
        Ok(xs.read(&path)?)
    };
    let version = read("ring-version")?;
    let pages = read("ring-pages")?;
    let refs = read("ring-refs")?;
    let port = read("event-channel")?;
    parse_keys(&version, &pages, &refs, &port)
}

/// Maps the ring and binds the event channel named by `keys`.
pub fn attach(keys: &RingKeys) -> Result<(GntdevMem, EvtchnNotifier), XenSetupError> {
    let mem = GntdevMem::map(BACKEND_DOMID, &keys.refs)?;
    let notifier = EvtchnNotifier::bind_interdomain(BACKEND_DOMID, keys.port)?;
    Ok((mem, notifier))
}

/// Powers the domain off (PID 1 only). Returns only if that failed.
pub fn power_off() -> nix::Error {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_keys() {
        let keys = parse_keys(b"1", b"3", b"8 9 4294967295", b"17").unwrap();
        assert_eq!(keys.refs, vec![8, 9, u32::MAX]);
        assert_eq!(keys.port, 17);
    }

    /// Hostile values: random bytes (biased towards digits and spaces) never panic, and
    /// whatever is accepted satisfies every documented bound.
    #[test]
    #[allow(clippy::cast_possible_truncation)] // truncating random words is the point
    fn random_values_never_panic_and_accepted_ones_are_in_bounds() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"0123456789 0123456789 \n-+x";
        let mut value = |max: usize| -> Vec<u8> {
            let len = (next() as usize) % (max + 1);
            (0..len)
                .map(|_| alphabet[(next() as usize) % alphabet.len()])
                .collect()
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let version = if value(1).is_empty() {
                b"1".to_vec()
            } else {
                value(2)
            };
            let (pages, refs, port) = (value(3), value(40), value(7));
            if let Ok(keys) = parse_keys(&version, &pages, &refs, &port) {
                accepted += 1;
                assert!((1..=MAX_RING_PAGES).contains(&keys.refs.len()));
                assert_eq!(keys.refs.len().to_string().as_bytes(), &pages[..]);
                assert!(keys.port > 0 && keys.port < MAX_PORT);
            }
        }
        assert!(accepted > 0, "the generator never produced a valid set");
    }

    #[test]
    fn refuses_malformed_keys() {
        for (v, p, r, e, needle) in [
            (&b"2"[..], &b"1"[..], &b"1"[..], &b"5"[..], "ring-version"),
            (b"1 ", b"1", b"1", b"5", "ring-version"),
            (b"1", b"0", b"", b"5", "ring-pages"),
            (b"1", b"257", b"1", b"5", "ring-pages"),
            (b"1", b"+1", b"1", b"5", "ring-pages"),
            (b"1", b"9999", b"1", b"5", "ring-pages"),
            (b"1", b"2", b"1", b"5", "fewer refs"),
            (b"1", b"1", b"1 2", b"5", "more refs"),
            (b"1", b"2", b"1  2", b"5", "ring-refs"),
            (b"1", b"1", b"4294967296", b"5", "ring-refs"),
            (b"1", b"1", b"-1", b"5", "ring-refs"),
            (b"1", b"1", b"1", b"0", "event-channel"),
            (b"1", b"1", b"1", b"131072", "event-channel"),
            (b"1", b"1", b"1", b"5\n", "event-channel"),
            (b"1", b"01", b"1", b"5", "ring-pages"),
            (b"1", b"1", b"07", b"5", "ring-refs"),
            (b"1", b"1", b"1", b"05", "event-channel"),
        ] {
            let err = parse_keys(v, p, r, e).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
    }
}
