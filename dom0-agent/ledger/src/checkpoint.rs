//! The checkpoint record: what one committed transaction did, in a canonical encoding.
//!
//! A checkpoint is stored under its commit sequence in the `checkpoints` database and is a
//! link of the checkpoint chain: `hash_n = SHA-256(hash_{n-1} || encoding_n)`, with
//! `hash_0` = 32 zero bytes. The encoding carries `hash_{n-1}` itself, so every record names
//! its predecessor.
//!
//! ```text
//! offset size  field
//!      0    4  magic "MFCP"
//!      4    1  format version: 2; 1 in records written before the client field
//!                (and only then: see below)
//!      5    1  kind: 0x01 transaction (other values reserved)
//!      6    8  seq               u64 BE, 1-based commit sequence
//!     14   32  prev_hash         hash of checkpoint seq-1 (zeros for seq 1)
//!     46   16  tx_id
//!     62  1+n  handler           u8 length, 1..=64 bytes of [a-z0-9_.-]
//!      .  1+n  client            version 2 only: u8 length, 0..=128 bytes of 0x20..=0x7e
//!                                (the client API's identity: spki:<hex> or an address;
//!                                length 0: no client)
//!      .  4|8  domain_id         the ledger's domain number, unique for the life of the
//!                                ledger: u32 BE in version 1, u64 BE in version 2
//!      .   32  policy_hash       SHA-256 of the active policy bundle (zeros: none)
//!      .   32  entropy_seed      the guest's RNG seed from Start (zeros: none), for replay
//!      .    8  begin_ns          u64 BE, Unix time in ns when the transaction began
//!      .    8  commit_ns         u64 BE, Unix time in ns when its group was committed
//!      .   32  request_digest    SHA-256(request)
//!      .  4+n  request           u32 length, <= 64 KiB
//!      .    1  outcome           0x01 committed (other values reserved)
//!      .  4+n  result            u32 length, <= 64 KiB
//!      .    4  read count        u32 BE, <= 4096, then per read, sorted by key, unique:
//!                  2+k  key      u16 length, 1..=256 bytes
//!                    8  version  u64 BE: seq that wrote what was read, 0 = never written
//!      .    4  write count       u32 BE, <= 1024, then per write, sorted by key, unique:
//!                  2+k  key      u16 length, 1..=256 bytes
//!                    8  before_version  u64 BE (0 = never written)
//!              1[+4+n] before    presence byte, then u32 length and value (<= 64 KiB)
//!              1[+4+n] after     presence byte, then u32 length and value; absent = delete
//! ```
//! Version 1 (no client field, 32-bit domain number) is what builds before version 2 wrote;
//! it still decodes, to a checkpoint whose `client` is `None`, and re-encodes to the same
//! bytes, so old chains verify unchanged. Each checkpoint has exactly one encoding: version 1
//! when it has no client and its domain number fits in 32 bits, version 2 otherwise (so a
//! version 2 record with an empty client and a domain number below 2^32 is refused).
//!
//! A whole encoding is at most [`MAX_CHECKPOINT_BYTES`]. The decoder rejects anything an
//! encoder would not produce: wrong magic, version or kind, out-of-range lengths, unsorted or
//! duplicate keys, a digest that does not match the request, and trailing bytes.
//!
//! A record format: uses only [`crate::codec`], [`crate::limits`] and the vocabulary.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::codec::{DecodeError, Reader, Writer};
use crate::limits;
use crate::types::{Hash, TxId};

/// Magic of a checkpoint record.
pub const MAGIC: &str = "MFCP";
/// Format version of a checkpoint without a client whose domain number fits in 32 bits (what
/// builds before version 2 wrote), and of rollback records.
pub const VERSION: u8 = 1;
/// Format version of a checkpoint that records its client or whose domain number needs 64
/// bits: a client field after the handler, and `domain_id` as `u64`.
pub const VERSION_2: u8 = 2;
/// Longest client name in a checkpoint, bytes.
pub const MAX_CLIENT: usize = 128;
/// Kind byte of a transaction checkpoint.
pub const KIND_TRANSACTION: u8 = 0x01;
/// Outcome byte of a committed transaction.
pub const OUTCOME_COMMITTED: u8 = 0x01;
/// Cap on one encoded checkpoint.
pub const MAX_CHECKPOINT_BYTES: usize = 8 << 20;

/// One key the transaction read and the version it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEntry {
    /// Key.
    pub key: Vec<u8>,
    /// Sequence of the checkpoint that wrote the version seen; 0 if the key never existed.
    pub version: u64,
}

/// One key the transaction wrote, with its images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteEntry {
    /// Key.
    pub key: Vec<u8>,
    /// Version the key had just before this commit (0: never written).
    pub before_version: u64,
    /// Value before this commit (`None`: absent or deleted).
    pub before: Option<Vec<u8>>,
    /// Value after this commit (`None`: deleted).
    pub after: Option<Vec<u8>>,
}

/// A committed transaction's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Commit sequence (1-based).
    pub seq: u64,
    /// Hash of checkpoint `seq - 1`.
    pub prev_hash: Hash,
    /// Transaction id.
    pub tx_id: TxId,
    /// Handler that ran.
    pub handler: String,
    /// Who asked for it, as the client API named the client (`None` in version 1 records).
    pub client: Option<String>,
    /// The ledger's number of the domain the transaction ran in (unique for the life of
    /// the ledger; the backend's own id — pid, domid — is in the audit log).
    pub domain_id: u64,
    /// Hash of the policy bundle active at commit.
    pub policy_hash: Hash,
    /// The entropy the domain's RNG was seeded with, so a replay can draw the same numbers.
    pub entropy_seed: Hash,
    /// When the transaction began (Unix ns).
    pub begin_ns: u64,
    /// When its group committed (Unix ns).
    pub commit_ns: u64,
    /// The client's request, kept for replay.
    pub request: Vec<u8>,
    /// The handler's result.
    pub result: Vec<u8>,
    /// Read set, sorted by key.
    pub reads: Vec<ReadEntry>,
    /// Write set, sorted by key.
    pub writes: Vec<WriteEntry>,
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Hash {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `SHA-256(prev || encoding)`: the chain rule shared by the checkpoint and audit chains.
pub fn chain_hash(prev: &Hash, encoding: &[u8]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev);
    ctx.update(encoding);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Whether `name` is a client name a checkpoint may hold: 1..=[`MAX_CLIENT`] bytes of
/// printable ASCII (0x20..=0x7e).
pub fn valid_client(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_CLIENT && name.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// The checkpoint's form of a client name: bytes outside 0x20..=0x7e become `_`, cut at
/// [`MAX_CLIENT`] bytes; `None` if empty.
pub fn canonical_client(name: &str) -> Option<String> {
    let clean: String = name
        .bytes()
        .take(MAX_CLIENT)
        .map(|b| {
            if (0x20..=0x7e).contains(&b) {
                char::from(b)
            } else {
                '_'
            }
        })
        .collect();
    (!clean.is_empty()).then_some(clean)
}

impl Checkpoint {
    /// Encoded size, computed without encoding.
    pub fn encoded_len(&self) -> usize {
        // magic, version, kind, seq, prev_hash, tx_id, handler length, domain, policy hash,
        // begin, commit, digest, request length, outcome, result length, two counts.
        const FIXED: usize =
            4 + 1 + 1 + 8 + 32 + 16 + 1 + 4 + 32 + 32 + 8 + 8 + 32 + 4 + 1 + 4 + 4 + 4;
        let image = |v: &Option<Vec<u8>>| v.as_ref().map_or(1, |v| v.len().saturating_add(5));
        // Version 2: the client's length byte and name, and 4 more bytes of domain number.
        let client = if self.is_version_2() {
            self.client
                .as_ref()
                .map_or(0, String::len)
                .saturating_add(1 + 4)
        } else {
            0
        };
        let mut n = FIXED
            .saturating_add(client)
            .saturating_add(self.handler.len())
            .saturating_add(self.request.len())
            .saturating_add(self.result.len());
        for r in &self.reads {
            n = n.saturating_add(r.key.len()).saturating_add(2 + 8);
        }
        for w in &self.writes {
            n = n
                .saturating_add(w.key.len())
                .saturating_add(2 + 8)
                .saturating_add(image(&w.before))
                .saturating_add(image(&w.after));
        }
        n
    }

    /// Whether this checkpoint is written as version 2: it names its client, or its domain
    /// number needs 64 bits.
    fn is_version_2(&self) -> bool {
        self.client.is_some() || self.domain_id > u64::from(u32::MAX)
    }

    /// The canonical encoding. Callers build checkpoints within the limits; `decode` is the
    /// authority on validity.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.encoded_len());
        w.raw(MAGIC.as_bytes());
        let v2 = self.is_version_2();
        w.u8(if v2 { VERSION_2 } else { VERSION });
        w.u8(KIND_TRANSACTION);
        w.u64(self.seq);
        w.raw(&self.prev_hash);
        w.raw(&self.tx_id.0);
        w.bytes8(self.handler.as_bytes());
        match (v2, u32::try_from(self.domain_id)) {
            (false, Ok(narrow)) => w.u32(narrow),
            _ => {
                w.bytes8(self.client.as_deref().unwrap_or("").as_bytes());
                w.u64(self.domain_id);
            }
        }
        w.raw(&self.policy_hash);
        w.raw(&self.entropy_seed);
        w.u64(self.begin_ns);
        w.u64(self.commit_ns);
        w.raw(&sha256(&self.request));
        w.bytes32(&self.request);
        w.u8(OUTCOME_COMMITTED);
        w.bytes32(&self.result);
        w.u32(u32::try_from(self.reads.len()).unwrap_or(u32::MAX));
        for r in &self.reads {
            w.bytes16(&r.key);
            w.u64(r.version);
        }
        encode_writes(&mut w, &self.writes);
        w.finish()
    }

    /// Decodes and validates one stored checkpoint.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_CHECKPOINT_BYTES {
            return Err(DecodeError::TooLarge {
                field: "checkpoint",
                len: bytes.len(),
                max: MAX_CHECKPOINT_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        // Both versions: the version byte is read through `link_fields`' fixed offset.
        let version = bytes.get(4).copied().unwrap_or(0);
        let expected = if version == VERSION_2 {
            VERSION_2
        } else {
            VERSION
        };
        r.header(MAGIC, "checkpoint", expected, KIND_TRANSACTION)?;
        let seq = r.seq()?;
        let prev_hash = r.array("prev_hash")?;
        let tx_id = TxId(r.array("tx_id")?);
        let handler = r.str8(limits::MAX_HANDLER, "handler")?.to_owned();
        if !mayfly_names::is_handler_name(&handler) {
            return Err(DecodeError::NotCanonical {
                field: "handler",
                reason: "empty or outside [a-z0-9_.-]",
            });
        }
        let (client, domain_id) = if version == VERSION_2 {
            let name = r.str8(MAX_CLIENT, "client")?;
            let client = if name.is_empty() {
                None
            } else if valid_client(name) {
                Some(name.to_owned())
            } else {
                return Err(DecodeError::NotCanonical {
                    field: "client",
                    reason: "outside printable ASCII",
                });
            };
            let domain_id = r.u64("domain_id")?;
            if client.is_none() && domain_id <= u64::from(u32::MAX) {
                return Err(DecodeError::NotCanonical {
                    field: "version",
                    reason: "version 2 without a client or a 64-bit domain number",
                });
            }
            (client, domain_id)
        } else {
            (None, u64::from(r.u32("domain_id")?))
        };
        let policy_hash = r.array("policy_hash")?;
        let entropy_seed = r.array("entropy_seed")?;
        let begin_ns = r.u64("begin_ns")?;
        let commit_ns = r.u64("commit_ns")?;
        let digest: Hash = r.array("request_digest")?;
        let request = r.bytes32(limits::MAX_REQUEST, "request")?.to_vec();
        if sha256(&request) != digest {
            return Err(DecodeError::NotCanonical {
                field: "request_digest",
                reason: "does not match the request",
            });
        }
        if r.u8("outcome")? != OUTCOME_COMMITTED {
            return Err(DecodeError::NotCanonical {
                field: "outcome",
                reason: "unknown outcome",
            });
        }
        let result = r.bytes32(limits::MAX_RESULT, "result")?.to_vec();

        let n = r.count32(limits::MAX_READS, 2 + 1 + 8, "read count")?;
        let mut reads: Vec<ReadEntry> = Vec::with_capacity(n);
        for _ in 0..n {
            let key = read_key(&mut r, "read key")?;
            if reads.last().is_some_and(|prev| prev.key >= key) {
                return Err(DecodeError::NotCanonical {
                    field: "read set",
                    reason: "keys not strictly increasing",
                });
            }
            let version = r.u64("read version")?;
            reads.push(ReadEntry { key, version });
        }

        let writes = decode_writes(&mut r, limits::MAX_WRITES)?;
        r.finish()?;
        Ok(Self {
            seq,
            prev_hash,
            tx_id,
            handler,
            client,
            domain_id,
            policy_hash,
            entropy_seed,
            begin_ns,
            commit_ns,
            request,
            result,
            reads,
            writes,
        })
    }
}

/// Encodes a write set: `u32` count, then per entry key, before version, before and after
/// images (see the module docs). Shared by transaction and rollback records.
pub(crate) fn encode_writes(w: &mut Writer, writes: &[WriteEntry]) {
    w.u32(u32::try_from(writes.len()).unwrap_or(u32::MAX));
    for e in writes {
        w.bytes16(&e.key);
        w.u64(e.before_version);
        w.opt_bytes32(e.before.as_deref());
        w.opt_bytes32(e.after.as_deref());
    }
}

/// Decodes a write set of at most `max` entries, strictly increasing by key.
pub(crate) fn decode_writes(
    r: &mut Reader<'_>,
    max: usize,
) -> Result<Vec<WriteEntry>, DecodeError> {
    let n = r.count32(max, 2 + 1 + 8 + 1 + 1, "write count")?;
    let mut writes: Vec<WriteEntry> = Vec::with_capacity(n);
    for _ in 0..n {
        let key = read_key(r, "write key")?;
        if writes.last().is_some_and(|prev| prev.key >= key) {
            return Err(DecodeError::NotCanonical {
                field: "write set",
                reason: "keys not strictly increasing",
            });
        }
        let before_version = r.u64("before_version")?;
        let before = r
            .opt_bytes32(limits::MAX_VALUE, "before image")?
            .map(<[u8]>::to_vec);
        let after = r
            .opt_bytes32(limits::MAX_VALUE, "after image")?
            .map(<[u8]>::to_vec);
        if before_version == 0 && before.is_some() {
            return Err(DecodeError::NotCanonical {
                field: "before image",
                reason: "a never-written key has no before image",
            });
        }
        writes.push(WriteEntry {
            key,
            before_version,
            before,
            after,
        });
    }
    Ok(writes)
}

fn read_key(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u8>, DecodeError> {
    let key = r.bytes16(limits::MAX_KEY, field)?;
    if key.is_empty() {
        return Err(DecodeError::NotCanonical {
            field,
            reason: "empty key",
        });
    }
    Ok(key.to_vec())
}

/// Reads only `(seq, prev_hash)` from a checkpoint or audit record whose header is
/// `magic(4) version(1) kind(1) seq(8) prev_hash(32)`.
pub fn link_fields(bytes: &[u8]) -> Option<(u64, Hash)> {
    let mut r = Reader::new(bytes);
    r.take(6, "header").ok()?;
    let seq = r.u64("seq").ok()?;
    let prev = r.array("prev_hash").ok()?;
    Some((seq, prev))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Checkpoint {
        Checkpoint {
            seq: 1,
            prev_hash: [0; 32],
            tx_id: TxId([0x11; 16]),
            handler: "transfer".into(),
            client: None,
            domain_id: 7,
            policy_hash: [0x22; 32],
            entropy_seed: [0x55; 32],
            begin_ns: 1_000,
            commit_ns: 2_000,
            request: b"{\"from\":\"a\",\"to\":\"b\",\"amount\":5}".to_vec(),
            result: b"ok".to_vec(),
            reads: vec![
                ReadEntry {
                    key: b"acct/a".to_vec(),
                    version: 0,
                },
                ReadEntry {
                    key: b"acct/b".to_vec(),
                    version: 0,
                },
            ],
            writes: vec![
                WriteEntry {
                    key: b"acct/a".to_vec(),
                    before_version: 0,
                    before: None,
                    after: Some(b"95".to_vec()),
                },
                WriteEntry {
                    key: b"acct/b".to_vec(),
                    before_version: 0,
                    before: None,
                    after: Some(b"105".to_vec()),
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_length() {
        let c = sample();
        let enc = c.encode();
        assert_eq!(enc.len(), c.encoded_len());
        assert_eq!(Checkpoint::decode(&enc).unwrap(), c);
        assert_eq!(link_fields(&enc), Some((1, [0; 32])));
    }

    #[test]
    fn a_client_makes_version_2_and_version_1_still_decodes() {
        let v1 = sample();
        let enc1 = v1.encode();
        assert_eq!(enc1[4], VERSION);
        let mut v2 = sample();
        v2.client = Some("spki:00ff".into());
        let enc2 = v2.encode();
        assert_eq!(enc2[4], VERSION_2);
        assert_eq!(enc2.len(), v2.encoded_len());
        assert_eq!(enc2.len(), enc1.len() + 1 + 9 + 4);
        assert_eq!(Checkpoint::decode(&enc2).unwrap(), v2);
        assert_eq!(Checkpoint::decode(&enc1).unwrap(), v1);
        // Version 1 bytes re-encode unchanged (old chains verify).
        assert_eq!(Checkpoint::decode(&enc1).unwrap().encode(), enc1);
        // A version 2 record without a client, or with an unprintable one, is refused.
        let mut bad = enc2.clone();
        let at = enc2.windows(9).position(|w| w == b"spki:00ff").unwrap();
        bad[at] = 0x07;
        assert!(matches!(
            Checkpoint::decode(&bad),
            Err(DecodeError::NotCanonical {
                field: "client",
                ..
            })
        ));
        let mut relabelled = enc1.clone();
        relabelled[4] = VERSION_2;
        assert!(Checkpoint::decode(&relabelled).is_err());
        let mut unknown = enc1.clone();
        unknown[4] = 3;
        assert!(matches!(
            Checkpoint::decode(&unknown),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn a_domain_number_beyond_32_bits_takes_version_2_and_only_then() {
        let narrow = sample();
        let enc = narrow.encode();
        assert_eq!(enc[4], VERSION);
        for domain_id in [u64::from(u32::MAX) + 1, u64::MAX] {
            let wide = Checkpoint {
                domain_id,
                ..sample()
            };
            let e = wide.encode();
            assert_eq!(e[4], VERSION_2);
            // An empty client (one length byte) and four more bytes of domain number.
            assert_eq!(e.len(), enc.len() + 1 + 4);
            assert_eq!(e.len(), wide.encoded_len());
            assert_eq!(Checkpoint::decode(&e).unwrap(), wide);
        }
        assert_eq!(
            Checkpoint {
                domain_id: u64::from(u32::MAX),
                ..sample()
            }
            .encode()[4],
            VERSION
        );
        // A small number written as version 2 without a client is not the canonical encoding.
        let at = 62 + 1 + "transfer".len();
        let mut forged = enc[..at].to_vec();
        forged[4] = VERSION_2;
        forged.push(0);
        forged.extend_from_slice(&7u64.to_be_bytes());
        forged.extend_from_slice(&enc[at + 4..]);
        assert!(matches!(
            Checkpoint::decode(&forged),
            Err(DecodeError::NotCanonical {
                field: "version",
                ..
            })
        ));
    }

    #[test]
    fn client_names_are_made_canonical() {
        assert_eq!(canonical_client(""), None);
        assert_eq!(canonical_client("10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(canonical_client("a\nb\u{e9}").as_deref(), Some("a_b__"));
        let long = "x".repeat(300);
        assert_eq!(canonical_client(&long).unwrap().len(), MAX_CLIENT);
        assert!(valid_client(&canonical_client(&long).unwrap()));
    }

    #[test]
    fn every_truncation_is_rejected() {
        let mut with_client = sample();
        with_client.client = Some("127.0.0.1".into());
        let enc = with_client.encode();
        for cut in 0..enc.len() {
            assert!(
                Checkpoint::decode(&enc[..cut]).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
        let enc = sample().encode();
        for cut in 0..enc.len() {
            assert!(
                Checkpoint::decode(&enc[..cut]).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(matches!(
            Checkpoint::decode(&longer),
            Err(DecodeError::Trailing { count: 1 })
        ));
    }

    #[test]
    fn unsorted_write_set_is_rejected() {
        let mut c = sample();
        c.writes.swap(0, 1);
        assert!(matches!(
            Checkpoint::decode(&c.encode()),
            Err(DecodeError::NotCanonical {
                field: "write set",
                ..
            })
        ));
    }

    #[test]
    fn request_digest_is_checked() {
        let c = sample();
        let mut enc = c.encode();
        let at = enc.windows(4).position(|w| w == b"from").unwrap();
        enc[at] ^= 1;
        assert!(matches!(
            Checkpoint::decode(&enc),
            Err(DecodeError::NotCanonical {
                field: "request_digest",
                ..
            })
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let base = sample().encode();
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..b.len());
                b[i] = rng.u8(..);
            }
            let _ = Checkpoint::decode(&b);
            let junk: Vec<u8> = (0..rng.usize(..300)).map(|_| rng.u8(..)).collect();
            let _ = Checkpoint::decode(&junk);
        }
    }
}
