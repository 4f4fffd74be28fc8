//! Replication frames: the messages between a primary and its standby, byte by byte
//! (docs/formats.md §6).
//!
//! ```text
//! frame   offset size  field
//!              0    4  magic "MFRP"
//!              4    1  version 1
//!              5    1  kind: 0x01 hello, 0x02 group, 0x03 ack, 0x04 stop, 0x05 epoch,
//!                      0x06 cursors, 0x07 heartbeat, 0x08 tentative group, 0x09 confirm,
//!                      0x0a abandon
//!              6    4  body length, u32 BE, at most the kind's cap
//!             10    n  body
//!
//! hello   (standby -> primary, 48 bytes; also a probe from a peer primary)
//!              0    8  next group the standby needs (its last group + 1); 0: a probe
//!                      (a primary asking its peer's epoch, never served as a standby)
//!              8    8  the standby's epoch
//!             16   32  identity key of the ledger it copies (the primary's first key)
//!
//! group   (primary -> standby, at most MAX_GROUP_BODY bytes)
//!              0    8  group sequence (the head's)
//!              8  2+h  u16 length + the signed head as stored (h <= 567)
//!              .    4  checkpoint record count (<= 1,048,576), then per record
//!                 4+n    u32 length (<= 256 MiB) + the record as stored
//!              .    4  audit record count (<= 1,048,576), then per record
//!                 4+n    u32 length (<= 64 KiB) + the record as stored
//!
//! ack     (standby -> primary, 8 bytes)
//!              0    8  group now durable on the standby
//!
//! epoch   (primary -> standby or probe, 24 bytes, the answer to every hello)
//!              0    8  the primary's epoch
//!              8    8  from_group: the group the promotion that opened the hello's
//!                      epoch + 1 promoted from (0 when the epochs are equal)
//!             16    8  from_checkpoint: the last checkpoint that promotion kept (0 idem)
//!
//! stop    (either way, at most 1,034 bytes)
//!              0    8  group the sender was at
//!              8  2+n  u16 length + UTF-8 reason (<= 1,024 bytes)
//!
//! cursors (primary -> standby, at most 18,690 bytes): the SIEM exporters' persisted
//!         cursors, each at most the audit tip of the last group sent before it
//!              0    2  count (<= 256), then per cursor, names strictly increasing:
//!                 1+n    u8 length + name (1..=64 bytes of [a-z0-9_.-])
//!                   8    u64 last audit sequence the collector was confirmed to have
//!
//! heartbeat (either way, 8 bytes, every `heartbeat_ms`)
//!              0    8  the sender's last group (durable on a primary, held on a standby)
//!
//! tentative (primary -> standby, synchronous mode): a group body exactly as `group`, for
//!         a group written and signed but not yet durable on the primary
//!
//! confirm (primary -> standby, 8 bytes)
//!              0    8  the primary's last durable group: every group up to it sent on
//!                      this connection is durable on the primary
//!
//! abandon (primary -> standby, 8 bytes)
//!              0    8  a tentative group whose commit failed on the primary: drop it
//! ```
//!
//! Integers are big-endian. A decoder refuses an unknown magic, version or kind, a body
//! above its cap, a count or length above its cap, and trailing bytes. [`read_frame`]
//! never allocates more than the bytes that actually arrived (the body is read through a
//! bounded `take`, not into a buffer of the announced length).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io::{self, Read, Write};

use mayfly_ledger::codec::{DecodeError, Reader, Writer};
use mayfly_ledger::head::MAX_HEAD_LEN;
use mayfly_ledger::replication::MAX_GROUP_BYTES;
use mayfly_ledger::{GroupRecords, PublicKey};

/// Magic of every frame.
pub const MAGIC: &[u8; 4] = b"MFRP";
/// Frame format version.
pub const VERSION: u8 = 1;
/// Kind byte of a hello.
pub const KIND_HELLO: u8 = 0x01;
/// Kind byte of a group.
pub const KIND_GROUP: u8 = 0x02;
/// Kind byte of an acknowledgement.
pub const KIND_ACK: u8 = 0x03;
/// Kind byte of a stop.
pub const KIND_STOP: u8 = 0x04;
/// Frame kind: the primary's epoch, answering a hello.
pub const KIND_EPOCH: u8 = 0x05;
/// Frame kind: the primary's exporter cursors.
pub const KIND_CURSORS: u8 = 0x06;
/// Frame kind: a heartbeat (either way).
pub const KIND_HEARTBEAT: u8 = 0x07;
/// Frame kind: a group not yet durable on the primary (synchronous mode).
pub const KIND_TENTATIVE: u8 = 0x08;
/// Frame kind: the primary's commit of the groups sent up to this one is durable.
pub const KIND_CONFIRM: u8 = 0x09;
/// Frame kind: the primary's commit of a tentative group failed; drop it.
pub const KIND_ABANDON: u8 = 0x0a;
/// Length of a heartbeat body.
pub const HEARTBEAT_LEN: usize = 8;
/// Most cursors in one cursors frame.
pub const MAX_CURSORS: usize = 256;
/// Longest cursor name.
pub const MAX_CURSOR_NAME: usize = mayfly_ledger::cursor::MAX_NAME;
/// Longest cursors body: the count, then every cursor at its longest.
pub const MAX_CURSORS_BODY: usize = 2 + MAX_CURSORS * (1 + MAX_CURSOR_NAME + 8);
/// Body length of an epoch frame.
pub const EPOCH_LEN: usize = 24;
/// Length of the frame header.
pub const HEADER_LEN: usize = 10;
/// Length of a hello body.
pub const HELLO_LEN: usize = 48;
/// Length of an ack body.
pub const ACK_LEN: usize = 8;
/// Longest stop reason, bytes.
pub const MAX_REASON: usize = 1024;
/// Longest stop body.
pub const MAX_STOP_BODY: usize = 8 + 2 + MAX_REASON;
/// Most records of one chain in one group.
pub const MAX_RECORDS: usize = 1 << 20;
/// Longest checkpoint-chain record (a rollback record's cap; a commit's is 8 MiB).
pub const MAX_CHECKPOINT_RECORD: usize = mayfly_ledger::rollback::MAX_ROLLBACK_BYTES;
/// Longest audit record (an encoded record is at most 34,010 bytes).
pub const MAX_AUDIT_RECORD: usize = 64 << 10;
/// Longest group body: the records and head of a group ([`MAX_GROUP_BYTES`]) plus their
/// length prefixes (4 bytes per record, both chains at their count cap) and the fixed
/// fields.
pub const MAX_GROUP_BODY: u64 = MAX_GROUP_BYTES + 8 * (MAX_RECORDS as u64) + 8 + 2 + 8;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A standby says where it is and what it copies.
    Hello {
        /// First group it needs.
        next_group: u64,
        /// Its epoch.
        epoch: u64,
        /// Identity of the ledger it copies.
        identity: PublicKey,
    },
    /// One durable group of the primary.
    Group(GroupRecords),
    /// One group written and signed by the primary, whose commit there is not durable yet.
    Tentative(GroupRecords),
    /// Every group up to this one sent on the connection is durable on the primary.
    Confirm {
        /// The primary's last durable group.
        group: u64,
    },
    /// The primary's commit of this tentative group failed: it does not exist.
    Abandon {
        /// Group.
        group: u64,
    },
    /// The standby has this group durable.
    Ack {
        /// Group.
        group: u64,
    },
    /// The sender stops, and says why.
    Stop {
        /// Group the sender was at.
        group: u64,
        /// Why.
        reason: String,
    },
    /// The primary's exporter cursors (name, last confirmed audit sequence), in name
    /// order, each at most the audit tip of the groups sent before it.
    Cursors(Vec<(String, u64)>),
    /// The sender is alive (sent every `heartbeat_ms` by both sides).
    Heartbeat {
        /// The sender's last group: durable on a primary, held on a standby.
        group: u64,
    },
    /// The primary's epoch and where the hello's history ends in it.
    Epoch {
        /// The primary's epoch.
        epoch: u64,
        /// The group the promotion that opened the hello's epoch + 1 promoted from.
        from_group: u64,
        /// The last checkpoint that promotion kept.
        from_checkpoint: u64,
    },
}

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or ended.
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    /// The connection ended inside a frame.
    #[error("the connection ended inside a frame ({got} of {want} bytes of its body)")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        want: u64,
    },
    /// The header is not a replication frame's.
    #[error("not a replication frame: {0}")]
    Header(&'static str),
    /// Unknown frame kind.
    #[error("unknown frame kind {0:#04x}")]
    Kind(u8),
    /// The body is longer than its kind allows.
    #[error("{kind} frame body of {len} bytes is above its limit of {max}")]
    TooLarge {
        /// Frame kind.
        kind: &'static str,
        /// Announced length.
        len: u64,
        /// Cap.
        max: u64,
    },
    /// The body does not decode.
    #[error("{kind} frame: {source}")]
    Body {
        /// Frame kind.
        kind: &'static str,
        /// Decoder's error.
        source: DecodeError,
    },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => KIND_HELLO,
            Self::Group(_) => KIND_GROUP,
            Self::Tentative(_) => KIND_TENTATIVE,
            Self::Confirm { .. } => KIND_CONFIRM,
            Self::Abandon { .. } => KIND_ABANDON,
            Self::Ack { .. } => KIND_ACK,
            Self::Stop { .. } => KIND_STOP,
            Self::Epoch { .. } => KIND_EPOCH,
            Self::Cursors(_) => KIND_CURSORS,
            Self::Heartbeat { .. } => KIND_HEARTBEAT,
        }
    }

    /// The body's encoding. A group above the caps encodes, and is refused by decoders;
    /// the exporter never produces one ([`mayfly_ledger::ExportError::TooLarge`]).
    pub fn encode_body(&self) -> Vec<u8> {
        match self {
            Self::Hello {
                next_group,
                epoch,
                identity,
            } => {
                let mut w = Writer::with_capacity(HELLO_LEN);
                w.u64(*next_group);
                w.u64(*epoch);
                w.raw(identity);
                w.finish()
            }
            Self::Group(g) | Self::Tentative(g) => {
                let size: usize = g
                    .checkpoints
                    .iter()
                    .chain(&g.audit)
                    .map(|r| r.len().saturating_add(4))
                    .fold(g.head.len().saturating_add(18), usize::saturating_add);
                let mut w = Writer::with_capacity(size);
                let group = mayfly_ledger::SignedHead::decode(&g.head)
                    .map(|h| h.group)
                    .unwrap_or(0);
                w.u64(group);
                w.bytes16(&g.head);
                for chain in [&g.checkpoints, &g.audit] {
                    w.u32(u32::try_from(chain.len()).unwrap_or(u32::MAX));
                    for r in chain {
                        w.bytes32(r);
                    }
                }
                w.finish()
            }
            Self::Ack { group }
            | Self::Heartbeat { group }
            | Self::Confirm { group }
            | Self::Abandon { group } => group.to_be_bytes().to_vec(),
            Self::Epoch {
                epoch,
                from_group,
                from_checkpoint,
            } => {
                let mut w = Writer::with_capacity(EPOCH_LEN);
                w.u64(*epoch);
                w.u64(*from_group);
                w.u64(*from_checkpoint);
                w.finish()
            }
            Self::Cursors(cursors) => {
                let mut w = Writer::with_capacity(
                    MAX_CURSORS_BODY.min(
                        cursors
                            .len()
                            .saturating_mul(1 + MAX_CURSOR_NAME + 8)
                            .saturating_add(2),
                    ),
                );
                w.u16(u16::try_from(cursors.len()).unwrap_or(u16::MAX));
                for (name, seq) in cursors {
                    w.bytes8(name.as_bytes());
                    w.u64(*seq);
                }
                w.finish()
            }
            Self::Stop { group, reason } => {
                let reason = bounded_reason(reason);
                let mut w = Writer::with_capacity(MAX_STOP_BODY);
                w.u64(*group);
                w.bytes16(reason.as_bytes());
                w.finish()
            }
        }
    }

    /// The whole frame: header and body.
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = Vec::with_capacity(body.len().saturating_add(HEADER_LEN));
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a body of frame kind `kind`.
    pub fn decode_body(kind: u8, body: &[u8]) -> Result<Self, FrameError> {
        let name = kind_name(kind).ok_or(FrameError::Kind(kind))?;
        let err = |source| FrameError::Body { kind: name, source };
        let mut r = Reader::new(body);
        let frame = match kind {
            KIND_HELLO => Self::Hello {
                next_group: r.u64("next_group").map_err(err)?,
                epoch: r.u64("epoch").map_err(err)?,
                identity: r.array("identity").map_err(err)?,
            },
            KIND_GROUP | KIND_TENTATIVE => {
                let group = r.u64("group").map_err(err)?;
                let head = r.bytes16(MAX_HEAD_LEN, "head").map_err(err)?.to_vec();
                let named = mayfly_ledger::SignedHead::decode(&head)
                    .map(|h| h.group)
                    .map_err(err)?;
                if named != group {
                    return Err(err(DecodeError::NotCanonical {
                        field: "group",
                        reason: "differs from the group its head names",
                    }));
                }
                let mut chains = [Vec::new(), Vec::new()];
                for (records, (max, field)) in chains.iter_mut().zip([
                    (MAX_CHECKPOINT_RECORD, "checkpoint record"),
                    (MAX_AUDIT_RECORD, "audit record"),
                ]) {
                    let count = r.count32(MAX_RECORDS, 4, field).map_err(err)?;
                    for _ in 0..count {
                        records.push(r.bytes32(max, field).map_err(err)?.to_vec());
                    }
                }
                let [checkpoints, audit] = chains;
                let records = GroupRecords {
                    head,
                    checkpoints,
                    audit,
                };
                if kind == KIND_GROUP {
                    Self::Group(records)
                } else {
                    Self::Tentative(records)
                }
            }
            KIND_CONFIRM => Self::Confirm {
                group: r.u64("group").map_err(err)?,
            },
            KIND_ABANDON => Self::Abandon {
                group: r.u64("group").map_err(err)?,
            },
            KIND_ACK => Self::Ack {
                group: r.u64("group").map_err(err)?,
            },
            KIND_EPOCH => Self::Epoch {
                epoch: r.u64("epoch").map_err(err)?,
                from_group: r.u64("from_group").map_err(err)?,
                from_checkpoint: r.u64("from_checkpoint").map_err(err)?,
            },
            KIND_HEARTBEAT => Self::Heartbeat {
                group: r.u64("group").map_err(err)?,
            },
            KIND_CURSORS => {
                let count = usize::from(r.u16("count").map_err(err)?);
                if count > MAX_CURSORS {
                    return Err(err(DecodeError::TooLarge {
                        field: "count",
                        len: count,
                        max: MAX_CURSORS,
                    }));
                }
                let mut cursors: Vec<(String, u64)> = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.str8(MAX_CURSOR_NAME, "name").map_err(err)?;
                    if !mayfly_ledger::cursor::valid_name(name) {
                        return Err(err(DecodeError::NotCanonical {
                            field: "name",
                            reason: "not 1..=64 bytes of [a-z0-9_.-]",
                        }));
                    }
                    if cursors
                        .last()
                        .is_some_and(|(last, _)| last.as_str() >= name)
                    {
                        return Err(err(DecodeError::NotCanonical {
                            field: "name",
                            reason: "names are not strictly increasing",
                        }));
                    }
                    let seq = r.u64("seq").map_err(err)?;
                    cursors.push((name.to_owned(), seq));
                }
                Self::Cursors(cursors)
            }
            _ => {
                let group = r.u64("group").map_err(err)?;
                let reason = r.str16(MAX_REASON, "reason").map_err(err)?.to_string();
                Self::Stop { group, reason }
            }
        };
        r.finish().map_err(err)?;
        Ok(frame)
    }
}

/// A reason cut to at most [`MAX_REASON`] bytes on a character boundary.
fn bounded_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    reason.get(..end).unwrap_or("")
}

fn kind_name(kind: u8) -> Option<&'static str> {
    match kind {
        KIND_HELLO => Some("hello"),
        KIND_GROUP => Some("group"),
        KIND_ACK => Some("ack"),
        KIND_STOP => Some("stop"),
        KIND_EPOCH => Some("epoch"),
        KIND_CURSORS => Some("cursors"),
        KIND_HEARTBEAT => Some("heartbeat"),
        KIND_TENTATIVE => Some("tentative"),
        KIND_CONFIRM => Some("confirm"),
        KIND_ABANDON => Some("abandon"),
        _ => None,
    }
}

fn max_body(kind: u8) -> u64 {
    match kind {
        KIND_HELLO => HELLO_LEN as u64,
        KIND_GROUP | KIND_TENTATIVE => MAX_GROUP_BODY,
        KIND_ACK => ACK_LEN as u64,
        KIND_EPOCH => EPOCH_LEN as u64,
        KIND_CURSORS => MAX_CURSORS_BODY as u64,
        KIND_HEARTBEAT | KIND_CONFIRM | KIND_ABANDON => HEARTBEAT_LEN as u64,
        _ => MAX_STOP_BODY as u64,
    }
}

/// Decodes one whole frame held in `bytes` (header and body, nothing after).
pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    let mut input = bytes;
    let frame = read_frame(&mut input)?;
    if !input.is_empty() {
        return Err(FrameError::Body {
            kind: "frame",
            source: DecodeError::Trailing { count: input.len() },
        });
    }
    Ok(frame)
}

/// Reads one frame from `r`: checks the header, then reads at most the announced body
/// length (within the kind's cap), growing its buffer only as bytes arrive.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    let [m0, m1, m2, m3, version, kind, l0, l1, l2, l3] = header;
    if [m0, m1, m2, m3] != *MAGIC {
        return Err(FrameError::Header("bad magic"));
    }
    if version != VERSION {
        return Err(FrameError::Header("unsupported frame version"));
    }
    let name = kind_name(kind).ok_or(FrameError::Kind(kind))?;
    let len = u64::from(u32::from_be_bytes([l0, l1, l2, l3]));
    let max = max_body(kind);
    if len > max {
        return Err(FrameError::TooLarge {
            kind: name,
            len,
            max,
        });
    }
    let mut body = Vec::with_capacity(usize::try_from(len.min(64 << 10)).unwrap_or(0));
    let got = r.by_ref().take(len).read_to_end(&mut body)?;
    let got = u64::try_from(got).unwrap_or(u64::MAX);
    if got != len {
        return Err(FrameError::Truncated { got, want: len });
    }
    Frame::decode_body(kind, &body)
}

/// Writes one frame to `w` and flushes it.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    w.write_all(&frame.encode())?;
    w.flush()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
pub(crate) mod tests {
    use super::*;

    fn group() -> GroupRecords {
        group_numbered(2)
    }

    /// A well-formed group (signed head, made-up records) numbered `g`, for decoders.
    pub(crate) fn group_numbered(g: u64) -> GroupRecords {
        let key = mayfly_ledger::SigningKey::from_seed(&[1; 32]);
        let head = mayfly_ledger::SignedHead::sign_v3(
            &key,
            g,
            mayfly_ledger::Tip::default(),
            mayfly_ledger::Tip::default(),
            5,
            [3; 32],
            0,
            None,
        );
        GroupRecords {
            head: head.encode(),
            checkpoints: vec![vec![1, 2, 3]],
            audit: vec![vec![4], vec![5, 6]],
        }
    }

    fn all() -> Vec<Frame> {
        vec![
            Frame::Hello {
                next_group: 7,
                epoch: 1,
                identity: [9; 32],
            },
            Frame::Group(group()),
            Frame::Ack { group: 7 },
            Frame::Stop {
                group: 7,
                reason: "fork at checkpoints 3".into(),
            },
            Frame::Epoch {
                epoch: 2,
                from_group: 40,
                from_checkpoint: 97,
            },
            Frame::Cursors(vec![("local-relay".into(), 7), ("soc-tls".into(), 1841)]),
            Frame::Cursors(vec![]),
            Frame::Heartbeat { group: 12 },
            Frame::Tentative(group()),
            Frame::Confirm { group: 2 },
            Frame::Abandon { group: 2 },
        ]
    }

    /// The cursors frame of docs/formats.md §6.1, byte for byte (docs/vectors/
    /// replication-cursors.hex, rebuilt independently by scripts/check-vectors.py).
    #[test]
    fn cursors_frame_vector() {
        let f = Frame::Cursors(vec![("local-relay".into(), 7), ("soc-tls".into(), 1841)]);
        let want = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/vectors/replication-cursors.hex"
        ))
        .unwrap();
        assert_eq!(mayfly_ledger::codec::hex(&f.encode()), want.trim());
    }

    #[test]
    fn heartbeat_frame_vector() {
        // formats.md §6.1: "MFRP", version 1, kind 0x07, body length 8, the sender's last
        // group (here 1,234,567) as a big-endian u64.
        let f = Frame::Heartbeat { group: 1_234_567 };
        let want = "4d465250010700000008000000000012d687";
        assert_eq!(mayfly_ledger::codec::hex(&f.encode()), want);
        assert_eq!(decode(&f.encode()).unwrap(), f);
        let mut long = f.encode();
        long[9] = 9;
        long.push(0);
        assert!(decode(&long).is_err(), "a 9-byte heartbeat body is refused");
    }

    /// The confirm and abandon frames of docs/formats.md §6.1, byte for byte
    /// (docs/vectors/replication-confirm.hex and replication-abandon.hex, rebuilt
    /// independently by scripts/check-vectors.py), and a tentative group differs from a
    /// group by its kind byte only.
    #[test]
    fn confirm_abandon_and_tentative_frame_vectors() {
        for (f, file) in [
            (
                Frame::Confirm { group: 1_234_567 },
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../docs/vectors/replication-confirm.hex"
                ),
            ),
            (
                Frame::Abandon { group: 1_234_568 },
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../docs/vectors/replication-abandon.hex"
                ),
            ),
        ] {
            let want = std::fs::read_to_string(file).unwrap();
            assert_eq!(mayfly_ledger::codec::hex(&f.encode()), want.trim());
            assert_eq!(decode(&f.encode()).unwrap(), f);
            let mut long = f.encode();
            long[9] = 9;
            long.push(0);
            assert!(decode(&long).is_err(), "a 9-byte body is refused");
        }
        let g = Frame::Group(group()).encode();
        let t = Frame::Tentative(group()).encode();
        assert_eq!(t[5], KIND_TENTATIVE);
        assert_eq!((&g[..5], &g[6..]), (&t[..5], &t[6..]));
        assert_eq!(decode(&t).unwrap(), Frame::Tentative(group()));
    }

    #[test]
    fn bad_cursors_frames_are_refused() {
        let body = |cursors: &[(&str, u64)], count: u16| {
            let mut b = count.to_be_bytes().to_vec();
            for (n, s) in cursors {
                b.push(u8::try_from(n.len()).unwrap());
                b.extend_from_slice(n.as_bytes());
                b.extend_from_slice(&s.to_be_bytes());
            }
            b
        };
        assert!(Frame::decode_body(KIND_CURSORS, &body(&[("a", 1), ("b", 2)], 2)).is_ok());
        for (what, b) in [
            ("unsorted", body(&[("b", 1), ("a", 2)], 2)),
            ("repeated", body(&[("a", 1), ("a", 2)], 2)),
            ("upper case", body(&[("A", 1)], 1)),
            ("empty name", body(&[("", 1)], 1)),
            ("long name", body(&[(&"a".repeat(65), 1)], 1)),
            ("count above", body(&[("a", 1)], 2)),
            ("count below", body(&[("a", 1), ("b", 1)], 1)),
            ("too many", body(&[], 257)),
        ] {
            assert!(
                Frame::decode_body(KIND_CURSORS, &b).is_err(),
                "{what} was accepted"
            );
        }
        let mut h = Vec::from(&MAGIC[..]);
        h.extend_from_slice(&[VERSION, KIND_CURSORS]);
        h.extend_from_slice(&(u32::try_from(MAX_CURSORS_BODY).unwrap() + 1).to_be_bytes());
        assert!(matches!(
            read_frame(&mut &h[..]),
            Err(FrameError::TooLarge {
                kind: "cursors",
                ..
            })
        ));
    }

    #[test]
    fn frames_round_trip() {
        for f in all() {
            let e = f.encode();
            assert_eq!(&e[..4], MAGIC);
            assert_eq!(e[4], VERSION);
            assert_eq!(decode(&e).unwrap(), f);
        }
    }

    #[test]
    fn every_cut_and_every_trailing_byte_is_refused() {
        for f in all() {
            let e = f.encode();
            for cut in 0..e.len() {
                assert!(decode(&e[..cut]).is_err(), "{f:?} cut at {cut}");
            }
            let mut longer = e.clone();
            longer.push(0);
            assert!(decode(&longer).is_err());
            // A body length that says one byte more than the body has inside it.
            let mut lied = e.clone();
            let n = u32::from_be_bytes(lied[6..10].try_into().unwrap()) + 1;
            lied[6..10].copy_from_slice(&n.to_be_bytes());
            lied.push(0);
            assert!(decode(&lied).is_err(), "{f:?} with a padded body");
        }
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_before_reading_the_body() {
        // A group frame announcing 4 GiB - 1: refused from the header alone, with a reader
        // that has nothing behind the header.
        let mut h = Vec::from(&MAGIC[..]);
        h.extend_from_slice(&[VERSION, KIND_ACK]);
        h.extend_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            read_frame(&mut &h[..]),
            Err(FrameError::TooLarge { kind: "ack", .. })
        ));
        let mut e = Vec::from(&MAGIC[..]);
        e.extend_from_slice(&[VERSION, KIND_EPOCH]);
        e.extend_from_slice(&25u32.to_be_bytes());
        assert!(matches!(
            read_frame(&mut &e[..]),
            Err(FrameError::TooLarge { kind: "epoch", .. })
        ));
        let mut h2 = h.clone();
        h2[5] = 0x0b;
        assert!(matches!(
            read_frame(&mut &h2[..]),
            Err(FrameError::Kind(0x0b))
        ));
        let mut big = Vec::from(&MAGIC[..]);
        big.extend_from_slice(&[VERSION, KIND_GROUP]);
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(FrameError::TooLarge { kind: "group", .. })
        ));
        let mut h3 = h.clone();
        h3[4] = 2;
        assert!(matches!(
            read_frame(&mut &h3[..]),
            Err(FrameError::Header(_))
        ));
        // A group whose announced length is within the cap but whose body never comes: an
        // error, after allocating only what arrived.
        let mut g = Vec::from(&MAGIC[..]);
        g.extend_from_slice(&[VERSION, KIND_GROUP]);
        g.extend_from_slice(&(1u32 << 20).to_be_bytes());
        g.extend_from_slice(&[0; 100]);
        assert!(matches!(
            read_frame(&mut &g[..]),
            Err(FrameError::Truncated { got: 100, .. })
        ));
    }

    #[test]
    fn a_group_whose_number_is_not_its_heads_is_refused() {
        let mut e = Frame::Group(group()).encode();
        e[HEADER_LEN + 7] ^= 1;
        assert!(matches!(decode(&e), Err(FrameError::Body { .. })));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(18);
        let base = Frame::Group(group()).encode();
        for _ in 0..5000 {
            let mut b = base.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..b.len());
                b[i] = rng.u8(..);
            }
            b.truncate(rng.usize(0..=b.len()));
            let _ = decode(&b);
        }
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let f = Frame::Stop {
            group: 1,
            reason: "é".repeat(1000),
        };
        match decode(&f.encode()).unwrap() {
            Frame::Stop { reason, .. } => {
                assert!(reason.len() <= MAX_REASON);
                assert_eq!(reason, "é".repeat(512));
            }
            other => panic!("{other:?}"),
        }
    }
}
