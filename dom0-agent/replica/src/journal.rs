//! The standby's journal (`DATA_DIR/replication.journal`): how a synchronous standby makes
//! a checked group durable with ONE `fdatasync` before it acknowledges it, instead of an
//! LMDB commit (two flushes) per group (docs/failover.md, "The standby's journal";
//! docs/formats.md §6.4).
//!
//! ```text
//! record  offset size  field
//!              0    4  magic "MFRJ"
//!              4    1  version 1
//!              5    1  kind: 0x01 group (durable on the primary when received),
//!                      0x02 tentative group, 0x03 confirm, 0x04 abandon
//!              6    4  body length, u32 BE: a group kind at most MAX_GROUP_BODY,
//!                      confirm and abandon exactly 8
//!             10    n  body: a group kind the group body of a replication frame (§6.2);
//!                      confirm: u64 the primary's last durable group; abandon: u64 the
//!                      tentative group dropped
//!           10+n   32  SHA-256 of bytes 0 .. 10+n
//! ```
//!
//! A group record is appended and `fdatasync`ed before the group is acknowledged; confirm
//! records are appended without a flush (a lost one leaves a tentative group that the
//! primary's next hello answer resolves), abandon records with one. Once LMDB holds every
//! confirmed group durably, the journal is cut (truncated), or rewritten to the one
//! tentative group staged ([`Journal::rewrite`]).
//!
//! Reading is hostile-input reading: a length is checked against its kind's cap before
//! anything is allocated, a body is read only as far as the file has bytes, and the first
//! record that is torn (the file ends inside it), damaged (digest), or malformed ends the
//! usable journal: [`Journal::open`] says where and why, and the file is cut there.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use mayfly_ledger::GroupRecords;

use crate::frame::{Frame, KIND_GROUP, MAX_GROUP_BODY};

/// The journal's file name in the data directory.
pub const FILE_NAME: &str = "replication.journal";
/// Magic of every record.
pub const MAGIC: &[u8; 4] = b"MFRJ";
/// Record format version.
pub const VERSION: u8 = 1;
/// A group durable on the primary when it was received.
pub const KIND_GROUP_RECORD: u8 = 0x01;
/// A group received before the primary's commit of it was durable.
pub const KIND_TENTATIVE_RECORD: u8 = 0x02;
/// Every group up to this one is durable on the primary.
pub const KIND_CONFIRM_RECORD: u8 = 0x03;
/// This tentative group was abandoned by the primary.
pub const KIND_ABANDON_RECORD: u8 = 0x04;
/// Header length.
pub const HEADER_LEN: usize = 10;
/// Digest length.
pub const DIGEST_LEN: usize = 32;

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A checked group, and whether it was tentative when received.
    Group {
        /// Its records.
        records: GroupRecords,
        /// Received before the primary's commit of it was durable.
        tentative: bool,
    },
    /// Every group up to this one is durable on the primary.
    Confirm(u64),
    /// The primary abandoned this tentative group.
    Abandon(u64),
}

/// Why the journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Opening, reading, writing, flushing or cutting the file failed.
    #[error("replication journal {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Where a journal's usable records end, and why (a torn or damaged tail, dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Offset of the first record not used (the file is cut there).
    pub offset: u64,
    /// Bytes dropped from there to the end.
    pub dropped_bytes: u64,
    /// Why.
    pub reason: String,
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Entry {
    fn kind(&self) -> u8 {
        match self {
            Self::Group {
                tentative: false, ..
            } => KIND_GROUP_RECORD,
            Self::Group {
                tentative: true, ..
            } => KIND_TENTATIVE_RECORD,
            Self::Confirm(_) => KIND_CONFIRM_RECORD,
            Self::Abandon(_) => KIND_ABANDON_RECORD,
        }
    }

    /// The record's bytes: header, body, digest.
    pub fn encode(&self) -> Vec<u8> {
        let body = match self {
            Self::Group { records, .. } => Frame::Group(records.clone()).encode_body(),
            Self::Confirm(g) | Self::Abandon(g) => g.to_be_bytes().to_vec(),
        };
        let mut out = Vec::with_capacity(body.len().saturating_add(HEADER_LEN).saturating_add(32));
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        let digest = mayfly_ledger::checkpoint::sha256(&out);
        out.extend_from_slice(&digest);
        out
    }
}

/// Reads the next record from `r`. `Ok(None)` at a clean end; `Err(reason)` for a torn,
/// damaged or malformed record.
fn read_entry(r: &mut impl Read) -> Result<Option<(Entry, u64)>, String> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_up_to(r, &mut header).map_err(|e| format!("reading: {e}"))?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(format!(
            "torn record: the file ends {got} bytes into a record header"
        ));
    }
    let [m0, m1, m2, m3, version, kind, l0, l1, l2, l3] = header;
    if [m0, m1, m2, m3] != *MAGIC {
        return Err("not a journal record (bad magic)".into());
    }
    if version != VERSION {
        return Err(format!("unsupported record version {version}"));
    }
    let len = u64::from(u32::from_be_bytes([l0, l1, l2, l3]));
    let max = match kind {
        KIND_GROUP_RECORD | KIND_TENTATIVE_RECORD => MAX_GROUP_BODY,
        KIND_CONFIRM_RECORD | KIND_ABANDON_RECORD => 8,
        other => return Err(format!("unknown record kind {other:#04x}")),
    };
    if len > max {
        return Err(format!(
            "record body of {len} bytes is above its kind's limit of {max}"
        ));
    }
    let mut whole = Vec::with_capacity(usize::try_from(len.min(64 << 10)).unwrap_or(0));
    whole.extend_from_slice(&header);
    let got = r
        .by_ref()
        .take(len)
        .read_to_end(&mut whole)
        .map_err(|e| format!("reading: {e}"))?;
    if u64::try_from(got).unwrap_or(u64::MAX) != len {
        return Err(format!(
            "torn record: the file ends {got} bytes into a body of {len}"
        ));
    }
    let mut digest = [0u8; DIGEST_LEN];
    let got = read_up_to(r, &mut digest).map_err(|e| format!("reading: {e}"))?;
    if got < DIGEST_LEN {
        return Err("torn record: the file ends inside its digest".into());
    }
    if mayfly_ledger::checkpoint::sha256(&whole) != digest {
        return Err("damaged record: its SHA-256 does not match".into());
    }
    let body = whole.get(HEADER_LEN..).unwrap_or(&[]);
    let entry = match kind {
        KIND_CONFIRM_RECORD | KIND_ABANDON_RECORD => {
            let g = u64::from_be_bytes(
                <[u8; 8]>::try_from(body).map_err(|_| "a marker body is not 8 bytes")?,
            );
            if kind == KIND_CONFIRM_RECORD {
                Entry::Confirm(g)
            } else {
                Entry::Abandon(g)
            }
        }
        _ => match Frame::decode_body(KIND_GROUP, body) {
            Ok(Frame::Group(records)) => Entry::Group {
                records,
                tentative: kind == KIND_TENTATIVE_RECORD,
            },
            Ok(_) => return Err("a group record holds no group".into()),
            Err(e) => return Err(format!("a group record does not decode: {e}")),
        },
    };
    let size = len
        .saturating_add(HEADER_LEN as u64)
        .saturating_add(DIGEST_LEN as u64);
    Ok(Some((entry, size)))
}

/// Every usable record of `file` (of `size` bytes) with its offset, the damage that ends
/// them if any, and the offset where they end.
fn read_all(file: &File, size: u64) -> (Vec<(u64, Entry)>, Option<Damage>, u64) {
    let mut reader = io::BufReader::new(file);
    let mut entries = Vec::new();
    let mut offset = 0u64;
    loop {
        match read_entry(&mut reader) {
            Ok(None) => return (entries, None, offset),
            Ok(Some((entry, n))) => {
                entries.push((offset, entry));
                offset = offset.saturating_add(n);
            }
            Err(reason) => {
                let damage = Damage {
                    offset,
                    dropped_bytes: size.saturating_sub(offset),
                    reason,
                };
                return (entries, Some(damage), offset);
            }
        }
    }
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0usize;
    while n < buf.len() {
        let Some(rest) = buf.get_mut(n..) else { break };
        match r.read(rest) {
            Ok(0) => break,
            Ok(k) => n = n.saturating_add(k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads its records, each with its
    /// offset. A torn or damaged tail is cut off the file (and described in the returned
    /// [`Damage`]).
    #[allow(clippy::type_complexity)]
    pub fn open(dir: &Path) -> Result<(Self, Vec<(u64, Entry)>, Option<Damage>), JournalError> {
        let path = dir.join(FILE_NAME);
        let io = |op, source| JournalError::Io {
            path: path.clone(),
            op,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("opening", e))?;
        let size = file
            .metadata()
            .map_err(|e| io("reading its size", e))?
            .len();
        // The file's name must be durable too, or a power loss could take a new journal
        // and every record flushed into it.
        sync_dir(dir).map_err(|e| io("flushing its directory", e))?;
        let (entries, damage, offset) = read_all(&file, size);
        let mut journal = Self {
            file,
            path: path.clone(),
            len: offset,
        };
        if damage.is_some() {
            journal.cut_at(offset)?;
        }
        journal
            .file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| io("seeking", e))?;
        Ok((journal, entries, damage))
    }

    /// Reads the journal in `dir` without changing it (a missing file is empty): its
    /// records, and where its usable part ends if a record is torn or damaged. For
    /// inspection (tests, tools); the standby itself uses [`Journal::open`].
    pub fn read(dir: &Path) -> Result<(Vec<Entry>, Option<Damage>), JournalError> {
        let path = dir.join(FILE_NAME);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
            Err(source) => {
                return Err(JournalError::Io {
                    path,
                    op: "opening",
                    source,
                })
            }
        };
        let size = file
            .metadata()
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                op: "reading its size",
                source,
            })?
            .len();
        let (entries, damage, _) = read_all(&file, size);
        Ok((entries.into_iter().map(|(_, e)| e).collect(), damage))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of records held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `entry`; with `sync`, flushes it to the disk (`fdatasync`) before returning.
    /// A record whose write or flush failed is cut off again: after a failed `fdatasync`
    /// Linux may have dropped its pages while a later flush succeeds, and a damaged record
    /// would end the usable journal at replay, taking the later (acknowledged) ones with it.
    pub fn append(&mut self, entry: &Entry, sync: bool) -> Result<(), JournalError> {
        let bytes = entry.encode();
        let before = self.len;
        if let Err(e) = self.file.write_all(&bytes) {
            // A partial write would leave a torn record before the next one: cut it off.
            let _ = self.cut_at(before);
            return Err(JournalError::Io {
                path: self.path.clone(),
                op: "appending",
                source: e,
            });
        }
        self.len = self
            .len
            .saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        if sync {
            if let Err(source) = self.file.sync_data() {
                let _ = self.cut_at(before);
                return Err(JournalError::Io {
                    path: self.path.clone(),
                    op: "flushing (fdatasync)",
                    source,
                });
            }
        }
        Ok(())
    }

    /// Replaces the journal's records with `entries`, durably: written to a new file,
    /// flushed, renamed over the journal, the directory flushed. What keeps the journal
    /// bounded while a tentative group waits (it cannot simply be cut: the group may be
    /// acknowledged and exist nowhere else here).
    pub fn rewrite(&mut self, entries: &[Entry]) -> Result<(), JournalError> {
        let io = |op, source| JournalError::Io {
            path: self.path.clone(),
            op,
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let tmp = dir.join(format!("{FILE_NAME}.new"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io("creating its replacement", e))?;
        let mut len = 0u64;
        for entry in entries {
            let bytes = entry.encode();
            file.write_all(&bytes)
                .map_err(|e| io("writing its replacement", e))?;
            len = len.saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        }
        file.sync_data()
            .map_err(|e| io("flushing its replacement (fdatasync)", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("renaming its replacement", e))?;
        // The name now leads to the new file: later appends must go there even if the
        // directory's flush below fails (the old handle is to an unlinked file).
        self.file = file;
        self.len = len;
        sync_dir(&dir).map_err(|e| io("flushing its directory", e))?;
        Ok(())
    }

    /// Empties the journal (every group in it is durable in LMDB).
    pub fn cut(&mut self) -> Result<(), JournalError> {
        self.cut_at(0)
    }

    /// Cuts the journal at `offset`: the records from there on are dropped.
    pub fn cut_at(&mut self, offset: u64) -> Result<(), JournalError> {
        let io = |op, source| JournalError::Io {
            path: self.path.clone(),
            op,
            source,
        };
        self.file.set_len(offset).map_err(|e| io("cutting", e))?;
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| io("seeking", e))?;
        self.len = offset;
        Ok(())
    }
}

/// Flushes a directory (a created or renamed file's name).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    use crate::frame::tests::group_numbered as group;

    fn entries() -> Vec<Entry> {
        vec![
            Entry::Group {
                records: group(7),
                tentative: false,
            },
            Entry::Group {
                records: group(8),
                tentative: true,
            },
            Entry::Confirm(8),
            Entry::Group {
                records: group(9),
                tentative: true,
            },
            Entry::Abandon(9),
        ]
    }

    fn write(dir: &Path, entries: &[Entry]) -> Vec<u8> {
        let (mut j, read, damage) = Journal::open(dir).unwrap();
        assert!(read.is_empty() && damage.is_none());
        for (i, e) in entries.iter().enumerate() {
            j.append(e, i % 2 == 0).unwrap();
        }
        std::fs::read(dir.join(FILE_NAME)).unwrap()
    }

    #[test]
    fn records_round_trip_and_reopen_appends_after_them() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &entries());
        let (mut j, read, damage) = Journal::open(d.path()).unwrap();
        assert!(damage.is_none());
        assert_eq!(
            read.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            entries()
        );
        j.append(&Entry::Confirm(10), true).unwrap();
        drop(j);
        let (entries_after, _) = Journal::read(d.path()).unwrap();
        assert_eq!(entries_after.len(), 6);
        assert_eq!(entries_after[5], Entry::Confirm(10));
        let (mut j, _, _) = Journal::open(d.path()).unwrap();
        j.cut().unwrap();
        assert!(j.is_empty());
        assert_eq!(
            std::fs::metadata(d.path().join(FILE_NAME)).unwrap().len(),
            0
        );
    }

    /// The journal vector of docs/formats.md §6.4 (docs/vectors/replication-journal-
    /// confirm.hex, rebuilt independently by scripts/check-vectors.py).
    #[test]
    fn confirm_record_vector() {
        let want = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/vectors/replication-journal-confirm.hex"
        ))
        .unwrap();
        assert_eq!(
            mayfly_ledger::codec::hex(&Entry::Confirm(1_234_567).encode()),
            want.trim()
        );
    }

    #[test]
    fn a_torn_tail_at_every_cut_is_dropped_and_cut_off_the_file() {
        let d = tempfile::tempdir().unwrap();
        let whole = write(d.path(), &entries());
        let ends: Vec<u64> = {
            let (_, read, _) = Journal::open(d.path()).unwrap();
            read.iter()
                .map(|(o, _)| *o)
                .skip(1)
                .chain([whole.len() as u64])
                .collect()
        };
        for cut in 0..whole.len() {
            let t = tempfile::tempdir().unwrap();
            std::fs::write(t.path().join(FILE_NAME), &whole[..cut]).unwrap();
            let (j, read, damage) = Journal::open(t.path()).unwrap();
            let whole_records = ends.iter().filter(|e| **e <= cut as u64).count();
            assert_eq!(read.len(), whole_records, "cut at {cut}");
            let kept = read.last().map_or(0, |_| ends[whole_records - 1]);
            assert_eq!(j.len(), kept);
            if kept == cut as u64 {
                assert!(damage.is_none(), "cut at {cut}");
            } else {
                let d = damage.expect("a torn record is reported");
                assert!(d.reason.contains("torn"), "{}", d.reason);
                assert_eq!(d.dropped_bytes, cut as u64 - kept);
            }
            assert_eq!(
                std::fs::metadata(t.path().join(FILE_NAME)).unwrap().len(),
                kept,
                "the torn tail is cut off the file"
            );
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_ends_the_journal_at_its_record() {
        let d = tempfile::tempdir().unwrap();
        let whole = write(d.path(), &entries());
        let starts: Vec<u64> = {
            let (_, read, _) = Journal::open(d.path()).unwrap();
            read.iter().map(|(o, _)| *o).collect()
        };
        for i in (0..whole.len()).step_by(7) {
            let mut bad = whole.clone();
            bad[i] ^= 0x40;
            let (read, damage) = {
                let t = tempfile::tempdir().unwrap();
                std::fs::write(t.path().join(FILE_NAME), &bad).unwrap();
                let (_, read, damage) = Journal::open(t.path()).unwrap();
                (read, damage)
            };
            let record = starts.iter().filter(|s| **s <= i as u64).count() - 1;
            assert_eq!(read.len(), record, "flip at {i}");
            let d = damage.expect("a damaged record is reported");
            assert_eq!(d.offset, starts[record]);
        }
    }

    #[test]
    fn an_oversized_or_unknown_record_is_refused_before_its_body() {
        for (kind, len, what) in [
            (KIND_GROUP_RECORD, u32::MAX, "above its kind's limit"),
            (KIND_CONFIRM_RECORD, 9, "above its kind's limit"),
            (0x05, 8, "unknown record kind"),
        ] {
            let t = tempfile::tempdir().unwrap();
            let mut h = MAGIC.to_vec();
            h.extend_from_slice(&[VERSION, kind]);
            h.extend_from_slice(&len.to_be_bytes());
            std::fs::write(t.path().join(FILE_NAME), &h).unwrap();
            let (_, read, damage) = Journal::open(t.path()).unwrap();
            assert!(read.is_empty());
            let d = damage.unwrap();
            assert!(d.reason.contains(what), "{}", d.reason);
        }
        // A group record whose body is not a group (a valid digest over garbage).
        let t = tempfile::tempdir().unwrap();
        let mut rec = MAGIC.to_vec();
        rec.extend_from_slice(&[VERSION, KIND_TENTATIVE_RECORD, 0, 0, 0, 3, 1, 2, 3]);
        let digest = mayfly_ledger::checkpoint::sha256(&rec);
        rec.extend_from_slice(&digest);
        std::fs::write(t.path().join(FILE_NAME), &rec).unwrap();
        let (_, read, damage) = Journal::open(t.path()).unwrap();
        assert!(read.is_empty());
        assert!(damage.unwrap().reason.contains("does not decode"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let d = tempfile::tempdir().unwrap();
        let whole = write(d.path(), &entries());
        let mut rng = fastrand::Rng::with_seed(18);
        for _ in 0..300 {
            let mut b = whole.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..b.len());
                b[i] = rng.u8(..);
            }
            b.truncate(rng.usize(0..=b.len()));
            let t = tempfile::tempdir().unwrap();
            std::fs::write(t.path().join(FILE_NAME), &b).unwrap();
            let _ = Journal::open(t.path()).unwrap();
        }
    }
}
