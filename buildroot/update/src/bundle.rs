//! The update bundle: one file carrying a new boot chain for the inactive slot, signed by the
//! vendor's update key (Ed25519). Specified byte by byte in docs/formats.md ("Update bundle");
//! the vector is docs/vectors/update-bundle.hex.
//!
//! ```text
//! offset      size  field
//! 0           8     magic "MAYFLYUP"
//! 8           2     format, u16 big-endian = 1
//! 10          4     M = manifest length, u32 big-endian, 1..=4096
//! 14          M     manifest (below)
//! 14+M        64    Ed25519 signature over "mayfly-update-manifest-v1\0" || manifest
//! 78+M        ...   the parts' bytes, concatenated in manifest order, nothing between them
//!
//! manifest:
//! 1     P = product length, 1..=64          then P bytes of product (ASCII, e.g. "mayfly-x86_64")
//! 8     image version, u64 big-endian
//! 1     number of parts = 4
//! per part, in this order: rootfs, xen, vmlinux, pcrs
//!   1   name length N, then N bytes of name (ASCII)
//!   8   size in bytes, u64 big-endian (at most the part's limit, PART_LIMITS)
//!   32  SHA-256 of the part's bytes
//! ```
//!
//! A reader verifies the signature before it believes any other field, bounds every length
//! before it allocates, and checks every part's hash before anything is written.

use std::io::{self, Read, Seek, SeekFrom, Write};

use ring::digest::{Context, SHA256};
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};

/// The file's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"MAYFLYUP";
/// The only format this code reads and writes.
pub const FORMAT: u16 = 1;
/// Prefix of the signed message (domain separation from every other Mayfly signature).
pub const SIGN_DOMAIN: &[u8] = b"mayfly-update-manifest-v1\0";
/// Largest manifest accepted.
pub const MAX_MANIFEST: u32 = 4096;
/// Bytes before the manifest (the array in open_verified has this length).
pub const HEADER_LEN: u64 = 14;
/// Length of the signature.
pub const SIG_LEN: usize = 64;
/// The product this build installs; a bundle for another product is refused.
pub const PRODUCT: &str = "mayfly-x86_64";
/// The parts, in bundle order, and the largest size each may have.
pub const PART_LIMITS: [(&str, u64); 4] = [
    ("rootfs", 512 << 20),
    ("xen", 64 << 20),
    ("vmlinux", 256 << 20),
    ("pcrs", 64 << 10),
];

/// Why a bundle was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// I/O on the bundle or a part.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// OS error.
        source: io::Error,
    },
    /// Not a bundle of this format.
    #[error("not a Mayfly update bundle (bad magic or format {format})")]
    NotABundle {
        /// The format field read (0 when the magic was wrong).
        format: u16,
    },
    /// The manifest's encoding is wrong.
    #[error("malformed manifest: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with the update key.
    #[error("the bundle's signature does not verify with the update key")]
    BadSignature,
    /// Fewer bytes than the manifest declares.
    #[error("the bundle is truncated: {have} bytes, the manifest declares {need}")]
    Truncated {
        /// File length.
        have: u64,
        /// Header, manifest, signature and parts.
        need: u64,
    },
    /// More bytes than the manifest declares (in a regular file).
    #[error("the bundle has {extra} bytes after its last part")]
    TrailingData {
        /// Extra bytes.
        extra: u64,
    },
    /// A part's bytes do not hash to the manifest's digest.
    #[error("part {part}: SHA-256 {actual} differs from the manifest's {expected}")]
    HashMismatch {
        /// Part name.
        part: String,
        /// Hex digest in the manifest.
        expected: String,
        /// Hex digest of the bytes read.
        actual: String,
    },
    /// A part larger than its limit.
    #[error("part {part}: {size} bytes is more than its limit of {limit}")]
    TooLarge {
        /// Part name.
        part: String,
        /// Declared size.
        size: u64,
        /// Limit.
        limit: u64,
    },
}

/// One part named in the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// `rootfs`, `xen`, `vmlinux` or `pcrs`.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
}

/// The signed manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Product name; [`PRODUCT`] for this build.
    pub product: String,
    /// Image version (compared with the running image's and the floor).
    pub version: u64,
    /// The four parts, in [`PART_LIMITS`] order.
    pub parts: Vec<Part>,
}

impl Manifest {
    /// The canonical encoding (module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(u8::try_from(self.product.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.product.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(u8::try_from(self.parts.len()).unwrap_or(u8::MAX));
        for p in &self.parts {
            out.push(u8::try_from(p.name.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(p.name.as_bytes());
            out.extend_from_slice(&p.size.to_be_bytes());
            out.extend_from_slice(&p.sha256);
        }
        out
    }

    /// Decodes a manifest; every field is checked, nothing may follow it.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        let mut r = Cursor { bytes, at: 0 };
        let plen = usize::from(r.u8()?);
        if plen == 0 || plen > 64 {
            return Err(BundleError::Malformed("product length not in 1..=64"));
        }
        let product = r.ascii(plen)?;
        let version = r.u64()?;
        if usize::from(r.u8()?) != PART_LIMITS.len() {
            return Err(BundleError::Malformed("not exactly 4 parts"));
        }
        let mut parts = Vec::with_capacity(PART_LIMITS.len());
        for (want, limit) in PART_LIMITS {
            let nlen = usize::from(r.u8()?);
            let name = r.ascii(nlen)?;
            if name != want {
                return Err(BundleError::Malformed(
                    "parts not rootfs, xen, vmlinux, pcrs in this order",
                ));
            }
            let size = r.u64()?;
            if size > limit {
                return Err(BundleError::TooLarge {
                    part: name,
                    size,
                    limit,
                });
            }
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(r.take(32)?);
            parts.push(Part { name, size, sha256 });
        }
        if r.at != bytes.len() {
            return Err(BundleError::Malformed("bytes after the last part"));
        }
        Ok(Manifest {
            product,
            version,
            parts,
        })
    }

    /// Header, manifest, signature and all parts.
    pub fn bundle_len(&self) -> u64 {
        let parts: u64 = self.parts.iter().map(|p| p.size).sum();
        HEADER_LEN + self.encode().len() as u64 + SIG_LEN as u64 + parts
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BundleError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(BundleError::Malformed("ends early"))?;
        let s = self
            .bytes
            .get(self.at..end)
            .ok_or(BundleError::Malformed("ends early"))?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, BundleError> {
        Ok(self.take(1)?.first().copied().unwrap_or_default())
    }
    fn u64(&mut self) -> Result<u64, BundleError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn ascii(&mut self, n: usize) -> Result<String, BundleError> {
        let s = self.take(n)?;
        if !s.iter().all(|c| c.is_ascii_graphic()) {
            return Err(BundleError::Malformed("a name is not printable ASCII"));
        }
        Ok(String::from_utf8_lossy(s).into_owned())
    }
}

/// The message the signature covers.
pub fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGN_DOMAIN.len() + manifest.len());
    m.extend_from_slice(SIGN_DOMAIN);
    m.extend_from_slice(manifest);
    m
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BundleError {
    let what = what.into();
    move |source| BundleError::Io { what, source }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    mayfly_command::hex(bytes)
}

/// SHA-256 of a whole bundle file (what admins approve), at most `limit` bytes.
pub fn file_sha256(r: &mut impl Read, limit: u64) -> Result<[u8; 32], BundleError> {
    digest_reader(r, "the bundle", limit, |_| Ok(())).map(|(_, d)| d)
}

/// SHA-256 of everything `r` yields, at most `limit` bytes (more is [`BundleError::TooLarge`]).
fn digest_reader(
    r: &mut impl Read,
    name: &str,
    limit: u64,
    mut sink: impl FnMut(&[u8]) -> Result<(), BundleError>,
) -> Result<(u64, [u8; 32]), BundleError> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .map_err(io_err(format!("reading {name}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(BundleError::TooLarge {
                part: name.to_owned(),
                size: total,
                limit,
            });
        }
        let chunk = buf.get(..n).unwrap_or_default();
        ctx.update(chunk);
        sink(chunk)?;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((total, out))
}

/// Writes a bundle of the four part files (`(name, reader)` in [`PART_LIMITS`] order),
/// signed with `key`. Each reader is read twice (hashing, then copying), so both passes
/// must yield the same bytes: the copy is hashed again and a difference is an error.
pub fn write_bundle<R: Read + Seek>(
    key: &Ed25519KeyPair,
    product: &str,
    version: u64,
    parts: &mut [(String, R)],
    out: &mut impl Write,
) -> Result<Manifest, BundleError> {
    if parts.len() != PART_LIMITS.len() {
        return Err(BundleError::Malformed("not exactly 4 parts"));
    }
    let mut listed = Vec::new();
    for ((name, r), (want, limit)) in parts.iter_mut().zip(PART_LIMITS) {
        if name != want {
            return Err(BundleError::Malformed(
                "parts not rootfs, xen, vmlinux, pcrs in this order",
            ));
        }
        let (size, sha256) = digest_reader(r, name, limit, |_| Ok(()))?;
        listed.push(Part {
            name: name.clone(),
            size,
            sha256,
        });
    }
    let manifest = Manifest {
        product: product.to_owned(),
        version,
        parts: listed,
    };
    let encoded = manifest.encode();
    // Round trip: what is signed is exactly what a reader accepts.
    Manifest::decode(&encoded)?;
    let sig = key.sign(&signed_message(&encoded));
    let w = |e| BundleError::Io {
        what: "writing the bundle".into(),
        source: e,
    };
    out.write_all(MAGIC).map_err(w)?;
    out.write_all(&FORMAT.to_be_bytes()).map_err(w)?;
    // decode() above bounds the manifest far below u32::MAX.
    let mlen =
        u32::try_from(encoded.len()).map_err(|_| BundleError::Malformed("manifest too long"))?;
    out.write_all(&mlen.to_be_bytes()).map_err(w)?;
    out.write_all(&encoded).map_err(w)?;
    out.write_all(sig.as_ref()).map_err(w)?;
    for ((name, r), part) in parts.iter_mut().zip(&manifest.parts) {
        r.seek(SeekFrom::Start(0))
            .map_err(io_err(format!("rewinding {name}")))?;
        let (_, again) = digest_reader(r, name, part.size, |c| {
            out.write_all(c).map_err(|e| BundleError::Io {
                what: "writing the bundle".into(),
                source: e,
            })
        })?;
        if again != part.sha256 {
            return Err(BundleError::HashMismatch {
                part: name.clone(),
                expected: hex(&part.sha256),
                actual: hex(&again),
            });
        }
    }
    Ok(manifest)
}

/// A bundle whose header was read and whose signature verified.
#[derive(Debug)]
pub struct Verified {
    /// The signed manifest.
    pub manifest: Manifest,
    /// Offset of the first part's bytes.
    pub parts_offset: u64,
}

impl Verified {
    /// Offset of part `i`'s bytes.
    pub fn part_offset(&self, i: usize) -> u64 {
        self.parts_offset
            + self
                .manifest
                .parts
                .iter()
                .take(i)
                .map(|p| p.size)
                .sum::<u64>()
    }
}

/// Reads the header and manifest of a bundle of `len` bytes and verifies the signature with
/// `public`. `exact`: the file must end after its last part (a regular file); otherwise
/// (a block device holding the bundle) bytes after it are ignored. Nothing but the header,
/// at most [`MAX_MANIFEST`] bytes and the signature is read.
pub fn open_verified(
    r: &mut impl Read,
    len: u64,
    exact: bool,
    public: &[u8; 32],
) -> Result<Verified, BundleError> {
    let mut head = [0u8; 14];
    read_full(r, &mut head, len)?;
    let (magic, rest) = head.split_at(8);
    let mut f = [0u8; 2];
    f.copy_from_slice(rest.get(..2).unwrap_or_default());
    let format = u16::from_be_bytes(f);
    if magic != MAGIC {
        return Err(BundleError::NotABundle { format: 0 });
    }
    if format != FORMAT {
        return Err(BundleError::NotABundle { format });
    }
    let mut m = [0u8; 4];
    m.copy_from_slice(rest.get(2..6).unwrap_or_default());
    let mlen = u32::from_be_bytes(m);
    if mlen == 0 || mlen > MAX_MANIFEST {
        return Err(BundleError::Malformed("manifest length not in 1..=4096"));
    }
    let mut manifest = vec![0u8; mlen as usize];
    read_full(r, &mut manifest, len)?;
    let mut sig = [0u8; SIG_LEN];
    read_full(r, &mut sig, len)?;
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&signed_message(&manifest), &sig)
        .map_err(|_| BundleError::BadSignature)?;
    let manifest = Manifest::decode(&manifest)?;
    let need = manifest.bundle_len();
    if len < need {
        return Err(BundleError::Truncated { have: len, need });
    }
    if exact && len > need {
        return Err(BundleError::TrailingData { extra: len - need });
    }
    Ok(Verified {
        manifest,
        parts_offset: HEADER_LEN + u64::from(mlen) + SIG_LEN as u64,
    })
}

fn read_full(r: &mut impl Read, buf: &mut [u8], len: u64) -> Result<(), BundleError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            BundleError::Truncated {
                have: len,
                need: HEADER_LEN + MAX_MANIFEST as u64,
            }
        } else {
            BundleError::Io {
                what: "reading the bundle".into(),
                source: e,
            }
        }
    })
}

/// Streams part `i` of a verified bundle into `sink`, hashing it; a digest different from
/// the manifest's (or fewer bytes than declared) is an error, reported after the last byte.
pub fn stream_part<R: Read + Seek>(
    r: &mut R,
    v: &Verified,
    i: usize,
    sink: impl FnMut(&[u8]) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    let part = v
        .manifest
        .parts
        .get(i)
        .ok_or(BundleError::Malformed("no such part"))?;
    r.seek(SeekFrom::Start(v.part_offset(i)))
        .map_err(io_err(format!("seeking to {}", part.name)))?;
    let mut limited = r.take(part.size);
    let (n, sha) = digest_reader(&mut limited, &part.name, part.size, sink)?;
    if n != part.size {
        return Err(BundleError::Truncated {
            have: v.part_offset(i) + n,
            need: v.manifest.bundle_len(),
        });
    }
    if sha != part.sha256 {
        return Err(BundleError::HashMismatch {
            part: part.name.clone(),
            expected: hex(&part.sha256),
            actual: hex(&sha),
        });
    }
    Ok(())
}

/// Checks every part's hash (nothing is written).
pub fn check_parts<R: Read + Seek>(r: &mut R, v: &Verified) -> Result<(), BundleError> {
    for i in 0..v.manifest.parts.len() {
        stream_part(r, v, i, |_| Ok(()))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::signature::KeyPair;
    use std::io::Cursor as IoCursor;

    /// The vector's fixed key: the Ed25519 key of seed 0x17 (32 times).
    pub(crate) fn key() -> Ed25519KeyPair {
        let seed = [0x17u8; 32];
        Ed25519KeyPair::from_seed_unchecked(&seed).unwrap()
    }

    pub(crate) fn parts(root: &[u8]) -> Vec<(String, IoCursor<Vec<u8>>)> {
        vec![
            ("rootfs".into(), IoCursor::new(root.to_vec())),
            ("xen".into(), IoCursor::new(b"XEN".to_vec())),
            ("vmlinux".into(), IoCursor::new(b"LINUX".to_vec())),
            ("pcrs".into(), IoCursor::new(b"PCRS\n".to_vec())),
        ]
    }

    pub(crate) fn bundle(version: u64, root: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_bundle(&key(), PRODUCT, version, &mut parts(root), &mut out).unwrap();
        out
    }

    fn public() -> [u8; 32] {
        let mut p = [0u8; 32];
        p.copy_from_slice(key().public_key().as_ref());
        p
    }

    fn open(b: &[u8]) -> Result<Verified, BundleError> {
        let v = open_verified(&mut IoCursor::new(b), b.len() as u64, true, &public())?;
        check_parts(&mut IoCursor::new(b), &v)?;
        Ok(v)
    }

    #[test]
    fn a_written_bundle_verifies_and_streams_its_parts() {
        let b = bundle(7, b"hsqs-root");
        let v = open(&b).unwrap();
        assert_eq!(v.manifest.version, 7);
        assert_eq!(v.manifest.product, PRODUCT);
        let mut xen = Vec::new();
        stream_part(&mut IoCursor::new(&b), &v, 1, |c| {
            xen.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(xen, b"XEN");
    }

    #[test]
    fn the_vector_in_docs_matches() {
        // docs/vectors/update-bundle.hex: the bundle of these parts, version 2, with the key of
        // seed 0x17 (checked independently by scripts/check-vectors.py). Ed25519 signatures
        // are deterministic, so the bytes are fixed.
        let b = bundle(2, b"hsqs");
        let want = include_str!("../../../docs/vectors/update-bundle.hex");
        assert_eq!(hex(&b), want.trim());
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_signed_bytes_is_a_bad_signature() {
        let b = bundle(3, b"hsqs-root");
        let m = u32::from_be_bytes(b[10..14].try_into().unwrap()) as usize;
        // The manifest and the signature.
        let head = usize::from(u8::try_from(HEADER_LEN).unwrap());
        for at in head..head + m + SIG_LEN {
            let mut t = b.clone();
            t[at] ^= 0x01;
            assert!(
                matches!(open(&t), Err(BundleError::BadSignature)),
                "byte {at}"
            );
        }
    }

    #[test]
    fn a_changed_part_is_a_hash_mismatch() {
        let mut b = bundle(3, b"hsqs-root");
        let n = b.len();
        b[n - 6] ^= 0x20; // in vmlinux
        assert!(
            matches!(open(&b), Err(BundleError::HashMismatch { part, .. }) if part == "vmlinux")
        );
    }

    #[test]
    fn truncated_and_padded_bundles_are_refused() {
        let b = bundle(3, b"hsqs-root");
        for cut in [1, 5, b.len() - 100, b.len() - 1] {
            let t = &b[..cut];
            assert!(
                matches!(open(t), Err(BundleError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        let mut padded = b.clone();
        padded.extend_from_slice(&[0; 512]);
        assert!(matches!(
            open(&padded),
            Err(BundleError::TrailingData { extra: 512 })
        ));
        // On a block device the padding after the bundle is ignored.
        open_verified(
            &mut IoCursor::new(&padded),
            padded.len() as u64,
            false,
            &public(),
        )
        .unwrap();
    }

    #[test]
    fn another_key_or_garbage_is_refused() {
        let b = bundle(3, b"hsqs-root");
        let other = [7u8; 32];
        assert!(open_verified(&mut IoCursor::new(&b), b.len() as u64, true, &other).is_err());
        let mut junk = b.clone();
        junk[0] = b'X';
        assert!(matches!(
            open(&junk),
            Err(BundleError::NotABundle { format: 0 })
        ));
        let mut huge = b.clone();
        huge[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(open(&huge), Err(BundleError::Malformed(_))));
    }

    #[test]
    fn manifests_out_of_bounds_do_not_decode() {
        let m = Manifest::decode(
            &Manifest {
                product: PRODUCT.into(),
                version: 1,
                parts: PART_LIMITS
                    .iter()
                    .map(|(n, _)| Part {
                        name: (*n).into(),
                        size: 1,
                        sha256: [0; 32],
                    })
                    .collect(),
            }
            .encode(),
        )
        .unwrap();
        let mut big = m.clone();
        big.parts[3].size = (64 << 10) + 1;
        assert!(matches!(
            Manifest::decode(&big.encode()),
            Err(BundleError::TooLarge { .. })
        ));
        let mut swapped = m.clone();
        swapped.parts.swap(1, 2);
        assert!(Manifest::decode(&swapped.encode()).is_err());
        let mut extra = m.encode();
        extra.push(0);
        assert!(Manifest::decode(&extra).is_err());
        assert!(Manifest::decode(&m.encode()[..20]).is_err());
    }
}
