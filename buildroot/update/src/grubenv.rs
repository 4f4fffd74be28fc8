//! GRUB's environment block (`EFI/BOOT/grubenv` on the EFI system partition), which holds
//! the A/B boot state that GRUB reads with `load_env` and writes with `save_env`.
//!
//! The file is exactly 1024 bytes: the line `# GRUB Environment Block`, then `name=value`
//! lines, then `#` to the end. GRUB's `save_env` rewrites it in place through the file's
//! block list, so it must keep its size (and, on FAT, its clusters): [`write_in_place`]
//! overwrites the bytes of the existing file, never truncates or replaces it.
//!
//! The variables (docs/formats.md, "A/B boot state"): `mayfly_slot` (`a` or `b`, the
//! committed slot), `mayfly_try` (empty, or the slot on trial), `mayfly_tries` (`0`..`3`,
//! the boots the trial slot has left; GRUB decrements it before each trial boot).

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Size of the block.
pub const SIZE: usize = 1024;
/// First line of the block.
pub const HEADER: &str = "# GRUB Environment Block\n";

/// Why the block could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    /// I/O on the file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// Not a 1024-byte environment block, or a line this code does not accept.
    #[error("{path}: not a GRUB environment block: {why}")]
    Malformed {
        /// File.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// The variables do not fit in 1024 bytes.
    #[error("the variables do not fit in a {SIZE}-byte environment block")]
    TooLong,
}

/// The variables of a block, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

fn name_ok(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

impl GrubEnv {
    /// Parses a block (`path` only names it in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, GrubEnvError> {
        let bad = |why| GrubEnvError::Malformed {
            path: path.to_path_buf(),
            why,
        };
        if bytes.len() != SIZE {
            return Err(bad("not 1024 bytes"));
        }
        let body = bytes
            .strip_prefix(HEADER.as_bytes())
            .ok_or_else(|| bad("no header line"))?;
        let mut vars = Vec::new();
        let mut rest = body;
        while let Some(&first) = rest.first() {
            if first == b'#' {
                if rest.iter().any(|&c| c != b'#') {
                    return Err(bad("text after the padding"));
                }
                break;
            }
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .ok_or_else(|| bad("a line without its newline"))?;
            let (line, tail) = rest.split_at(end);
            rest = tail.get(1..).unwrap_or_default();
            let line = std::str::from_utf8(line).map_err(|_| bad("a line is not UTF-8"))?;
            if line.contains('\\') {
                return Err(bad("an escaped value (backslash)"));
            }
            let (n, v) = line
                .split_once('=')
                .ok_or_else(|| bad("a line without '='"))?;
            if !name_ok(n) {
                return Err(bad("a variable name outside [A-Za-z0-9_]"));
            }
            vars.push((n.to_owned(), v.to_owned()));
        }
        Ok(GrubEnv { vars })
    }

    /// The 1024-byte block.
    pub fn serialize(&self) -> Result<Vec<u8>, GrubEnvError> {
        let mut out = HEADER.as_bytes().to_vec();
        for (n, v) in &self.vars {
            out.extend_from_slice(n.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(b'\n');
        }
        if out.len() > SIZE {
            return Err(GrubEnvError::TooLong);
        }
        out.resize(SIZE, b'#');
        Ok(out)
    }

    /// A variable's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a variable (`name` in `[A-Za-z0-9_]`, `value` without newline or backslash; the
    /// callers pass constants and slot letters).
    pub fn set(&mut self, name: &str, value: &str) {
        debug_assert!(name_ok(name) && !value.contains(['\n', '\\']));
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_owned(),
            None => self.vars.push((name.to_owned(), value.to_owned())),
        }
    }
}

/// Reads and parses the block at `path`.
pub fn read(path: &Path) -> Result<GrubEnv, GrubEnvError> {
    let io = |source| GrubEnvError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::with_capacity(SIZE);
    Read::by_ref(&mut f)
        .take(SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    GrubEnv::parse(&bytes, path)
}

/// Overwrites the existing 1024-byte file at `path` with `env`, in place (same size, same
/// blocks: what GRUB's `save_env` needs), and syncs it.
pub fn write_in_place(path: &Path, env: &GrubEnv) -> Result<(), GrubEnvError> {
    let io = |source| GrubEnvError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = env.serialize()?;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len != SIZE as u64 {
        return Err(GrubEnvError::Malformed {
            path: path.to_path_buf(),
            why: "not 1024 bytes",
        });
    }
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("grubenv")
    }

    #[test]
    fn round_trip_and_the_block_grub_editenv_writes() {
        // What `grub-editenv grubenv create; grub-editenv grubenv set mayfly_slot=a` writes.
        let mut want = HEADER.as_bytes().to_vec();
        want.extend_from_slice(b"mayfly_slot=a\n");
        want.resize(SIZE, b'#');
        let env = GrubEnv::parse(&want, p()).unwrap();
        assert_eq!(env.get("mayfly_slot"), Some("a"));
        assert_eq!(env.serialize().unwrap(), want);
        let mut e2 = env.clone();
        e2.set("mayfly_try", "b");
        e2.set("mayfly_slot", "b");
        let again = GrubEnv::parse(&e2.serialize().unwrap(), p()).unwrap();
        assert_eq!(again.get("mayfly_slot"), Some("b"));
        assert_eq!(again.get("mayfly_try"), Some("b"));
    }

    #[test]
    fn hostile_blocks_are_refused() {
        let mut ok = HEADER.as_bytes().to_vec();
        ok.extend_from_slice(b"a=b\n");
        ok.resize(SIZE, b'#');
        let mut short = ok.clone();
        short.pop();
        assert!(GrubEnv::parse(&short, p()).is_err());
        let mut after = ok.clone();
        after[SIZE - 2] = b'x';
        assert!(GrubEnv::parse(&after, p()).is_err());
        let mut esc = HEADER.as_bytes().to_vec();
        esc.extend_from_slice(b"a=b\\\nc\n");
        esc.resize(SIZE, b'#');
        assert!(GrubEnv::parse(&esc, p()).is_err());
        let mut name = HEADER.as_bytes().to_vec();
        name.extend_from_slice(b"a b=c\n");
        name.resize(SIZE, b'#');
        assert!(GrubEnv::parse(&name, p()).is_err());
        let mut unterminated = HEADER.as_bytes().to_vec();
        unterminated.resize(SIZE, b'x');
        assert!(GrubEnv::parse(&unterminated, p()).is_err());
        let mut full = GrubEnv::default();
        full.set("x", &"y".repeat(SIZE));
        assert!(matches!(full.serialize(), Err(GrubEnvError::TooLong)));
    }

    #[test]
    fn write_in_place_keeps_the_file_and_refuses_another_size() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("grubenv");
        std::fs::write(&f, GrubEnv::default().serialize().unwrap()).unwrap();
        let mut env = read(&f).unwrap();
        env.set("mayfly_tries", "3");
        write_in_place(&f, &env).unwrap();
        assert_eq!(read(&f).unwrap().get("mayfly_tries"), Some("3"));
        assert_eq!(std::fs::metadata(&f).unwrap().len(), SIZE as u64);
        std::fs::write(&f, b"short").unwrap();
        assert!(write_in_place(&f, &env).is_err());
    }
}
