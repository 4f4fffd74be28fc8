//! The ring's geometry and the byte layout of its shared pages.
//!
//! Ring header fields and slot descriptors are `u32` in the **native byte order** of the
//! host (little-endian on x86_64, the only supported architecture), as in Xen's
//! `public/io/ring.h`: both sides run on the same machine and access them as atomics.
//!
//! ```text
//!  page 0 (4096 bytes): header and slot descriptors
//!  0x000  u32  magic        "MFRG" in memory (0x4752464D as a little-endian u32)  agent
//!  0x004  u32  version      LAYOUT_VERSION (1)                                      agent
//!  0x008  u32  slot_count   power of two, 1..=256                                   agent
//!  0x00C  u32  window_size  bytes per slot window, 1..=17 pages                     agent
//!  0x010  u32  data_offset  4096: offset of window 0                                agent
//!  0x014  u32  total_len    data_offset + slot_count * window_size                  agent
//!  0x018  ...  reserved, zero, up to 0x040
//!  0x040  u32  req_prod     requests produced (free-running)                  guest writes
//!  0x044  u32  rsp_event    "notify me when rsp_prod reaches this"            guest writes
//!  0x048  ...  reserved, zero, up to 0x080 (own cache line)
//!  0x080  u32  rsp_prod     responses produced (free-running)                 agent writes
//!  0x084  u32  req_event    "notify me when req_prod reaches this"            agent writes
//!  0x088  ...  reserved, zero, up to 0x100
//!  0x100  slot descriptors, slot_count x 8 bytes:
//!           +0 u32 seq   free-running index of the message in the slot
//!           +4 u32 len   length of the message in the slot's window
//!  ...    reserved, zero, up to 0x1000
//!
//!  data_offset + k * window_size: window of slot k (window_size bytes)
//! ```
//!
//! One slot array is shared by both directions, as in Xen: request `i` and response `i` both
//! use slot `i mod slot_count` and its window. The backend writes response `i` only after it
//! has copied request `i` out, and the frontend writes request `i + slot_count` only after it
//! has copied response `i` out, so a window is never used by two live messages.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

use crate::mem::{MemError, SharedMem, PAGE_SIZE};
use crate::wire::MAX_MESSAGE_LEN;

/// Magic at offset 0 of the ring: the bytes "MFRG" in memory.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"MFRG");
/// The layout version this crate implements.
pub const LAYOUT_VERSION: u32 = 1;
/// Most slots a ring may have (the descriptors must fit in page 0).
pub const MAX_SLOT_COUNT: u32 = 256;
/// Most pages in one slot window (one window holds a [`MAX_MESSAGE_LEN`]-byte message).
pub const MAX_WINDOW_PAGES: u32 = 17;
/// Offset of the first window (the header and descriptors take page 0).
pub const DATA_OFFSET: usize = PAGE_SIZE;
/// Size of one slot descriptor.
pub const DESCRIPTOR_SIZE: usize = 8;

/// Byte offsets of the header fields.
pub mod offset {
    /// `magic`.
    pub const MAGIC: usize = 0x000;
    /// `version`.
    pub const VERSION: usize = 0x004;
    /// `slot_count`.
    pub const SLOT_COUNT: usize = 0x008;
    /// `window_size`.
    pub const WINDOW_SIZE: usize = 0x00C;
    /// `data_offset`.
    pub const DATA_OFFSET: usize = 0x010;
    /// `total_len`.
    pub const TOTAL_LEN: usize = 0x014;
    /// `req_prod` (written by the frontend).
    pub const REQ_PROD: usize = 0x040;
    /// `rsp_event` (written by the frontend).
    pub const RSP_EVENT: usize = 0x044;
    /// `rsp_prod` (written by the backend).
    pub const RSP_PROD: usize = 0x080;
    /// `req_event` (written by the backend).
    pub const REQ_EVENT: usize = 0x084;
    /// First slot descriptor.
    pub const DESCRIPTORS: usize = 0x100;
}

/// A ring geometry was invalid, or a ring header did not describe a valid ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Slot count not a power of two in `1..=MAX_SLOT_COUNT`.
    #[error("slot count {found} is not a power of two in 1..={MAX_SLOT_COUNT}")]
    BadSlotCount {
        /// The count found.
        found: u32,
    },
    /// Window size not a multiple of the page size in `1..=MAX_WINDOW_PAGES` pages.
    #[error("window size {found} is not 1..={MAX_WINDOW_PAGES} pages of {PAGE_SIZE} bytes")]
    BadWindowSize {
        /// The size found, in bytes.
        found: u32,
    },
    /// The header's magic is wrong (ring not initialised, or not a ring).
    #[error("bad ring magic {found:#010x}")]
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// The header's layout version is not [`LAYOUT_VERSION`].
    #[error("unsupported ring layout version {found} (supported: {LAYOUT_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The header's data offset is not [`DATA_OFFSET`].
    #[error("ring data offset {found} is not {DATA_OFFSET}")]
    BadDataOffset {
        /// The value found.
        found: u32,
    },
    /// The header's total length disagrees with its geometry.
    #[error("ring header total length {found} disagrees with its geometry ({expected})")]
    TotalLenMismatch {
        /// The value found.
        found: u32,
        /// The value the geometry implies.
        expected: usize,
    },
    /// The mapping is smaller than the ring.
    #[error("ring needs {needed} bytes but the mapping has {available}")]
    MappingTooSmall {
        /// Bytes the ring needs.
        needed: usize,
        /// Bytes mapped.
        available: usize,
    },
    /// A shared-memory access was refused.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// The shape of a ring: how many slots and how large each slot's data window is.
///
/// The agent chooses it, writes it into the header and keeps its own copy; the guest reads
/// and validates it once when it attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    slot_count: u32,
    window_pages: u32,
}

impl Geometry {
    /// 4 slots of 17-page windows: 1 + 4 x 17 = 69 pages (282,624 bytes). Each window holds
    /// any message up to [`MAX_MESSAGE_LEN`] (a `Put` of a 256-byte key and a 64 KiB value
    /// takes 65,816 bytes), and up to 4 requests can be in flight.
    pub const DEFAULT: Geometry = Geometry {
        slot_count: 4,
        window_pages: MAX_WINDOW_PAGES,
    };

    /// A geometry of `slot_count` slots (a power of two, `1..=256`) with windows of
    /// `window_pages` pages (`1..=17`). Smaller windows cap messages below
    /// [`MAX_MESSAGE_LEN`]; see [`Geometry::max_message_len`].
    pub fn new(slot_count: u32, window_pages: u32) -> Result<Self, LayoutError> {
        if !slot_count.is_power_of_two() || slot_count > MAX_SLOT_COUNT {
            return Err(LayoutError::BadSlotCount { found: slot_count });
        }
        if window_pages == 0 || window_pages > MAX_WINDOW_PAGES {
            return Err(LayoutError::BadWindowSize {
                found: window_pages.saturating_mul(page_size_u32()),
            });
        }
        Ok(Self {
            slot_count,
            window_pages,
        })
    }

    /// Number of slots (a power of two).
    pub fn slot_count(self) -> u32 {
        self.slot_count
    }

    /// Bytes in one slot's data window.
    pub fn window_size(self) -> usize {
        // At most 17 * 4096: cannot overflow.
        usize::try_from(self.window_pages)
            .unwrap_or(0)
            .saturating_mul(PAGE_SIZE)
    }

    /// Bytes the ring occupies: `DATA_OFFSET + slot_count * window_size`.
    pub fn total_len(self) -> usize {
        // At most 4096 + 256 * 17 * 4096 (< 18 MiB): cannot overflow.
        usize::try_from(self.slot_count)
            .unwrap_or(0)
            .saturating_mul(self.window_size())
            .saturating_add(DATA_OFFSET)
    }

    /// Pages the ring occupies.
    pub fn total_pages(self) -> usize {
        self.total_len() / PAGE_SIZE
    }

    /// Largest message one slot carries: `min(window_size, MAX_MESSAGE_LEN)`.
    pub fn max_message_len(self) -> usize {
        self.window_size().min(MAX_MESSAGE_LEN)
    }

    /// The slot that free-running index `index` uses.
    pub(crate) fn slot_of(self, index: u32) -> u32 {
        index & self.slot_count.wrapping_sub(1)
    }

    /// Offset of the descriptor of `slot` (`slot < slot_count`).
    pub(crate) fn descriptor_offset(self, slot: u32) -> usize {
        // slot < 256, so at most 0x100 + 255 * 8: cannot overflow.
        usize::try_from(slot)
            .unwrap_or(usize::MAX)
            .saturating_mul(DESCRIPTOR_SIZE)
            .saturating_add(offset::DESCRIPTORS)
    }

    /// Offset of the window of `slot` (`slot < slot_count`).
    pub(crate) fn window_offset(self, slot: u32) -> usize {
        // slot < 256: at most total_len - window_size; cannot overflow.
        usize::try_from(slot)
            .unwrap_or(usize::MAX)
            .saturating_mul(self.window_size())
            .saturating_add(DATA_OFFSET)
    }

    /// Checks that `mem` is large enough for this geometry.
    pub(crate) fn check_fits<M: SharedMem + ?Sized>(self, mem: &M) -> Result<(), LayoutError> {
        if mem.len() < self.total_len() {
            return Err(LayoutError::MappingTooSmall {
                needed: self.total_len(),
                available: mem.len(),
            });
        }
        Ok(())
    }

    /// Agent side: zeroes the ring (so nothing from a previous user of the pages leaks into
    /// the guest), writes the header with indices 0 and event indices 1, and publishes the
    /// magic last with release ordering.
    pub(crate) fn initialise<M: SharedMem + ?Sized>(
        self,
        mem: &M,
        zero: bool,
    ) -> Result<(), LayoutError> {
        self.check_fits(mem)?;
        mem.store_u32_release(offset::MAGIC, 0)?;
        if zero {
            mem.fill_bytes(0, self.total_len(), 0)?;
        }
        mem.store_u32_relaxed(offset::VERSION, LAYOUT_VERSION)?;
        mem.store_u32_relaxed(offset::SLOT_COUNT, self.slot_count)?;
        mem.store_u32_relaxed(offset::WINDOW_SIZE, self.window_size_u32())?;
        mem.store_u32_relaxed(offset::DATA_OFFSET, page_size_u32())?;
        mem.store_u32_relaxed(offset::TOTAL_LEN, self.total_len_u32())?;
        mem.store_u32_relaxed(offset::REQ_PROD, 0)?;
        mem.store_u32_relaxed(offset::RSP_PROD, 0)?;
        mem.store_u32_relaxed(offset::REQ_EVENT, 1)?;
        mem.store_u32_relaxed(offset::RSP_EVENT, 1)?;
        mem.store_u32_release(offset::MAGIC, RING_MAGIC)?;
        Ok(())
    }

    /// Guest side: reads and validates the header the agent wrote.
    pub(crate) fn read_header<M: SharedMem + ?Sized>(mem: &M) -> Result<Self, LayoutError> {
        let magic = mem.load_u32_acquire(offset::MAGIC)?;
        if magic != RING_MAGIC {
            return Err(LayoutError::BadMagic { found: magic });
        }
        let version = mem.load_u32_relaxed(offset::VERSION)?;
        if version != LAYOUT_VERSION {
            return Err(LayoutError::UnsupportedVersion { found: version });
        }
        let slot_count = mem.load_u32_relaxed(offset::SLOT_COUNT)?;
        let window_size = mem.load_u32_relaxed(offset::WINDOW_SIZE)?;
        let window_pages = window_size
            .checked_div(page_size_u32())
            .filter(|_| window_size.is_multiple_of(page_size_u32()))
            .ok_or(LayoutError::BadWindowSize { found: window_size })?;
        let geometry = Self::new(slot_count, window_pages)?;
        let data_offset = mem.load_u32_relaxed(offset::DATA_OFFSET)?;
        if data_offset != page_size_u32() {
            return Err(LayoutError::BadDataOffset { found: data_offset });
        }
        let total_len = mem.load_u32_relaxed(offset::TOTAL_LEN)?;
        if total_len != geometry.total_len_u32() {
            return Err(LayoutError::TotalLenMismatch {
                found: total_len,
                expected: geometry.total_len(),
            });
        }
        geometry.check_fits(mem)?;
        Ok(geometry)
    }

    fn window_size_u32(self) -> u32 {
        self.window_pages.saturating_mul(page_size_u32())
    }

    fn total_len_u32(self) -> u32 {
        u32::try_from(self.total_len()).unwrap_or(u32::MAX)
    }
}

impl Default for Geometry {
    fn default() -> Self {
        Self::DEFAULT
    }
}

const fn page_size_u32() -> u32 {
    // 4096 fits in u32.
    #[allow(clippy::cast_possible_truncation)]
    let size = PAGE_SIZE as u32;
    size
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::mem::MockMem;

    #[test]
    fn default_geometry_matches_the_documentation() {
        let g = Geometry::DEFAULT;
        assert_eq!(g.slot_count(), 4);
        assert_eq!(g.window_size(), 69_632);
        assert_eq!(g.total_len(), 282_624);
        assert_eq!(g.total_pages(), 69);
        assert_eq!(g.max_message_len(), MAX_MESSAGE_LEN);
        assert_eq!(g.descriptor_offset(3), 0x118);
        assert_eq!(g.window_offset(3), 4096 + 3 * 69_632);
        assert_eq!(g.slot_of(5), 1);
        assert_eq!(g.slot_of(u32::MAX), 3);
        // The largest descriptor array fits in page 0.
        let big = Geometry::new(MAX_SLOT_COUNT, 1).unwrap();
        assert!(big.descriptor_offset(MAX_SLOT_COUNT - 1) + DESCRIPTOR_SIZE <= PAGE_SIZE);
        assert_eq!(&RING_MAGIC.to_le_bytes(), b"MFRG");
    }

    #[test]
    fn bad_geometries_are_refused() {
        for n in [0, 3, 6, 512, u32::MAX] {
            assert_eq!(
                Geometry::new(n, 1),
                Err(LayoutError::BadSlotCount { found: n })
            );
        }
        assert!(Geometry::new(4, 0).is_err());
        assert!(Geometry::new(4, 18).is_err());
        assert!(Geometry::new(1, 1).is_ok());
    }

    #[test]
    fn header_round_trips_and_is_validated() {
        let g = Geometry::new(8, 2).unwrap();
        let mem = MockMem::new(g.total_len()).unwrap();
        mem.fill_bytes(0, g.total_len(), 0xEE).unwrap();
        g.initialise(&mem, true).unwrap();
        assert_eq!(Geometry::read_header(&mem), Ok(g));
        let snap = mem.snapshot();
        assert_eq!(&snap[..4], b"MFRG");
        assert!(snap[DATA_OFFSET..].iter().all(|&b| b == 0));

        let corrupt = |off: usize, v: u32| {
            let m = MockMem::from_bytes(&snap, snap.len()).unwrap();
            m.store_u32_relaxed(off, v).unwrap();
            Geometry::read_header(&m)
        };
        assert_eq!(
            corrupt(offset::MAGIC, 7),
            Err(LayoutError::BadMagic { found: 7 })
        );
        assert_eq!(
            corrupt(offset::VERSION, 2),
            Err(LayoutError::UnsupportedVersion { found: 2 })
        );
        assert_eq!(
            corrupt(offset::SLOT_COUNT, 3),
            Err(LayoutError::BadSlotCount { found: 3 })
        );
        assert_eq!(
            corrupt(offset::WINDOW_SIZE, 4097),
            Err(LayoutError::BadWindowSize { found: 4097 })
        );
        assert_eq!(
            corrupt(offset::DATA_OFFSET, 0),
            Err(LayoutError::BadDataOffset { found: 0 })
        );
        assert!(matches!(
            corrupt(offset::TOTAL_LEN, 1),
            Err(LayoutError::TotalLenMismatch { found: 1, .. })
        ));
        // A header claiming more slots than the mapping holds.
        let m = MockMem::from_bytes(&snap, snap.len()).unwrap();
        m.store_u32_relaxed(offset::SLOT_COUNT, 16).unwrap();
        m.store_u32_relaxed(offset::TOTAL_LEN, 4096 + 16 * 8192)
            .unwrap();
        assert!(matches!(
            Geometry::read_header(&m),
            Err(LayoutError::MappingTooSmall { .. })
        ));
    }
}
