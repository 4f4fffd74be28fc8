//! Boot info: how a Mayfly PV guest finds its ring without xenstore.
//!
//! The agent builds a Mayfly PV guest itself (libxenguest's `xc_dom_*`, no xl, no
//! xenstore) and hands it this block as the domain's boot module (`start_info.mod_start`,
//! `mod_len`), written into the domain's memory before it first runs. Canonical, big-endian,
//! every field checked; specified with test vectors in `docs/formats.md` §2.6:
//!
//! ```text
//!  off  size  field
//!    0     4  magic "MFBI"
//!    4     2  version 1
//!    6     2  ring pages N, 1..=256
//!    8     2  backend domid: the domain that granted the pages and holds the
//!             unbound port (0 for dom0), below 0x7ff0 (DOMID_FIRST_RESERVED)
//!   10     2  reserved, 0
//!   12     4  event channel: the backend's unbound port for this domain, 1..2^17
//!   16    32  entropy: fresh random bytes for this domain only (the guest's own seed;
//!             handlers are seeded by `Start`'s per-transaction seed)
//!   48  4xN   grant refs, one per ring page, in page order
//! ```
//!
//! The total length is exactly `48 + 4N`; anything else is refused.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

use alloc::vec::Vec;

/// Magic at the start of a boot-info block.
pub const MAGIC: [u8; 4] = *b"MFBI";
/// The version this crate writes and reads.
pub const VERSION: u16 = 1;
/// Length of the fixed part, before the grant refs.
pub const HEADER_LEN: usize = 48;
/// The most ring pages a block may name (the Xen transport's cap, [`crate::layout`]'s
/// geometry uses 69 by default).
pub const MAX_PAGES: usize = 256;
/// The longest block: 48 + 4 x 256 bytes.
pub const MAX_LEN: usize = HEADER_LEN + 4 * MAX_PAGES;
/// Length of the entropy field.
pub const ENTROPY_LEN: usize = 32;
/// Event-channel ports are below 2^17 (FIFO ABI).
pub const MAX_PORT: u32 = 1 << 17;
/// `DOMID_FIRST_RESERVED`: domids from here on are not domains.
pub const DOMID_FIRST_RESERVED: u16 = 0x7ff0;

/// A boot-info block was refused (or could not be written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootInfoError {
    /// Shorter than its header, or its length is not 48 + 4 x pages.
    #[error("boot info of {len} bytes, expected {expected}")]
    Length {
        /// Bytes given.
        len: usize,
        /// Bytes the header calls for (48 if the header itself is cut).
        expected: usize,
    },
    /// The magic is not "MFBI".
    #[error("boot info magic {found:02x?} is not \"MFBI\"")]
    Magic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// Another version.
    #[error("boot info version {found}, expected {VERSION}")]
    Version {
        /// The version found.
        found: u16,
    },
    /// The page count is 0 or above [`MAX_PAGES`].
    #[error("boot info names {pages} ring pages, expected 1..={MAX_PAGES}")]
    Pages {
        /// The count found.
        pages: usize,
    },
    /// The backend domid is reserved.
    #[error("boot info backend domid {domid:#x} is reserved")]
    Domid {
        /// The domid found.
        domid: u16,
    },
    /// The reserved field is not zero.
    #[error("boot info reserved field is {found:#x}, expected 0")]
    Reserved {
        /// The value found.
        found: u16,
    },
    /// The port is 0 or not below 2^17.
    #[error("boot info event channel {port} is not in 1..{MAX_PORT}")]
    Port {
        /// The port found.
        port: u32,
    },
}

/// What the agent tells a Mayfly PV guest before it first runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// The domain that granted the ring pages and holds the unbound port (0: dom0).
    pub backend_domid: u16,
    /// The backend's unbound event-channel port for this domain.
    pub event_channel: u32,
    /// Fresh random bytes for this domain only.
    pub entropy: [u8; ENTROPY_LEN],
    /// One grant reference per ring page, in page order.
    pub grant_refs: Vec<u32>,
}

impl BootInfo {
    fn check(&self) -> Result<(), BootInfoError> {
        let pages = self.grant_refs.len();
        if pages == 0 || pages > MAX_PAGES {
            return Err(BootInfoError::Pages { pages });
        }
        if self.backend_domid >= DOMID_FIRST_RESERVED {
            return Err(BootInfoError::Domid {
                domid: self.backend_domid,
            });
        }
        if self.event_channel == 0 || self.event_channel >= MAX_PORT {
            return Err(BootInfoError::Port {
                port: self.event_channel,
            });
        }
        Ok(())
    }

    /// The canonical encoding (refused if a field is out of range).
    pub fn encode(&self) -> Result<Vec<u8>, BootInfoError> {
        self.check()?;
        let pages = u16::try_from(self.grant_refs.len()).map_err(|_| BootInfoError::Pages {
            pages: self.grant_refs.len(),
        })?;
        let mut out = Vec::with_capacity(MAX_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&pages.to_be_bytes());
        out.extend_from_slice(&self.backend_domid.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.event_channel.to_be_bytes());
        out.extend_from_slice(&self.entropy);
        for r in &self.grant_refs {
            out.extend_from_slice(&r.to_be_bytes());
        }
        Ok(out)
    }

    /// Decodes and checks a block (a private copy: the caller copied it out of guest or
    /// shared memory first).
    pub fn decode(bytes: &[u8]) -> Result<Self, BootInfoError> {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(BootInfoError::Length {
                len: bytes.len(),
                expected: HEADER_LEN,
            })?;
        let [m0, m1, m2, m3, v0, v1, p0, p1, d0, d1, r0, r1, e0, e1, e2, e3, entropy @ ..] =
            *header;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(BootInfoError::Magic {
                found: [m0, m1, m2, m3],
            });
        }
        let version = u16::from_be_bytes([v0, v1]);
        if version != VERSION {
            return Err(BootInfoError::Version { found: version });
        }
        let pages = usize::from(u16::from_be_bytes([p0, p1]));
        if pages == 0 || pages > MAX_PAGES {
            return Err(BootInfoError::Pages { pages });
        }
        // pages <= 256: no overflow.
        let expected = HEADER_LEN.saturating_add(pages.saturating_mul(4));
        if bytes.len() != expected {
            return Err(BootInfoError::Length {
                len: bytes.len(),
                expected,
            });
        }
        let reserved = u16::from_be_bytes([r0, r1]);
        if reserved != 0 {
            return Err(BootInfoError::Reserved { found: reserved });
        }
        let grant_refs = bytes
            .get(HEADER_LEN..)
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|c| <[u8; 4]>::try_from(c).map_or(0, u32::from_be_bytes))
            .collect();
        let info = Self {
            backend_domid: u16::from_be_bytes([d0, d1]),
            event_channel: u32::from_be_bytes([e0, e1, e2, e3]),
            entropy,
            grant_refs,
        };
        info.check()?;
        Ok(info)
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]
mod tests;
