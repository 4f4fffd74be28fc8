//! The two root slots: which one booted (the kernel's `root=PARTUUID=`), and the block device
//! of each (found by its GPT unique partition GUID, which genimage.cfg fixes).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// GPT unique GUID of partition `root-a` (genimage.cfg; "mayflyLy" "root-a" in ASCII).
pub const UUID_A: &str = "6d61796c-7966-4c79-8000-726f6f742d61";
/// GPT unique GUID of partition `root-b`.
pub const UUID_B: &str = "6d61796c-7966-4c79-8000-726f6f742d62";

/// A root slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// `root-a`, with `xen-a` and `vmlinux-a` on the EFI partition.
    A,
    /// `root-b`, with `xen-b` and `vmlinux-b`.
    B,
}

impl Slot {
    /// `a` or `b`, as in grubenv and file names.
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
    /// The slot named by `a` or `b`.
    pub fn from_letter(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    /// The partition's GPT unique GUID.
    pub fn uuid(self) -> &'static str {
        match self {
            Slot::A => UUID_A,
            Slot::B => UUID_B,
        }
    }
}

/// Why a slot could not be determined or found.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The command line names no slot's partition.
    #[error("the kernel command line has no root=PARTUUID= of a slot ({UUID_A} or {UUID_B})")]
    NoSlotRoot,
    /// I/O while scanning the partitions.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// No partition with the GUID.
    #[error("no partition with GPT unique GUID {0}")]
    NotFound(&'static str),
    /// A disk whose GPT cannot be read.
    #[error("{0}: no GPT header at LBA 1")]
    NoGpt(PathBuf),
}

/// The slot the kernel's command line mounts as root.
pub fn booted(cmdline: &str) -> Result<Slot, SlotError> {
    cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("root=PARTUUID="))
        .find_map(|u| {
            let u = u.to_ascii_lowercase();
            [Slot::A, Slot::B].into_iter().find(|s| s.uuid() == u)
        })
        .ok_or(SlotError::NoSlotRoot)
}

/// The unique GUID of partition number `partno` (1-based) of a GPT disk with `block`-byte
/// logical blocks, as the usual mixed-endian text.
pub fn gpt_guid<R: Read + Seek>(
    disk: &mut R,
    name: &Path,
    block: u64,
    partno: u32,
) -> Result<String, SlotError> {
    let io = |source| SlotError::Io {
        path: name.to_path_buf(),
        source,
    };
    let mut hdr = [0u8; 92];
    disk.seek(SeekFrom::Start(block)).map_err(io)?;
    disk.read_exact(&mut hdr).map_err(io)?;
    if hdr.get(..8) != Some(b"EFI PART".as_slice()) {
        return Err(SlotError::NoGpt(name.to_path_buf()));
    }
    let le64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(hdr.get(at..at + 8).unwrap_or(&[0; 8]));
        u64::from_le_bytes(b)
    };
    let le32 = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(hdr.get(at..at + 4).unwrap_or(&[0; 4]));
        u32::from_le_bytes(b)
    };
    let (entries, count, size) = (le64(72), le32(80), le32(84));
    if partno == 0 || partno > count || !(128..=4096).contains(&size) {
        return Err(SlotError::NoGpt(name.to_path_buf()));
    }
    let at = entries
        .checked_mul(block)
        .and_then(|o| o.checked_add(u64::from(partno - 1) * u64::from(size)))
        .ok_or_else(|| SlotError::NoGpt(name.to_path_buf()))?;
    let mut e = [0u8; 32];
    disk.seek(SeekFrom::Start(at)).map_err(io)?;
    disk.read_exact(&mut e).map_err(io)?;
    let g = e.get(16..32).unwrap_or(&[0; 16]);
    let h = |r: &[usize]| {
        r.iter()
            .map(|&i| format!("{:02x}", g.get(i).copied().unwrap_or_default()))
            .collect::<String>()
    };
    Ok(format!(
        "{}-{}-{}-{}-{}",
        h(&[3, 2, 1, 0]),
        h(&[5, 4]),
        h(&[7, 6]),
        h(&[8, 9]),
        h(&[10, 11, 12, 13, 14, 15])
    ))
}

/// The block device (`/dev/<name>`) of the partition with the slot's GUID, found through
/// `sys_block` (`/sys/class/block`): each partition's disk's GPT is read.
pub fn device(slot: Slot, sys_block: &Path, dev: &Path) -> Result<PathBuf, SlotError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SlotError::Io { path, source }
    };
    let mut names: Vec<_> = std::fs::read_dir(sys_block)
        .map_err(io(sys_block))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for part in names {
        let Ok(n) = std::fs::read_to_string(part.join("partition")) else {
            continue;
        };
        let Ok(partno) = n.trim().parse::<u32>() else {
            continue;
        };
        let real = std::fs::canonicalize(&part).map_err(io(&part))?;
        let Some(disk) = real.parent().and_then(Path::file_name) else {
            continue;
        };
        let block = std::fs::read_to_string(
            real.parent()
                .unwrap_or(&real)
                .join("queue/logical_block_size"),
        )
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(512);
        let disk_dev = dev.join(disk);
        let Ok(mut f) = File::open(&disk_dev) else {
            continue;
        };
        if gpt_guid(&mut f, &disk_dev, block, partno).ok().as_deref() == Some(slot.uuid()) {
            if let Some(name) = part.file_name() {
                return Ok(dev.join(name));
            }
        }
    }
    Err(SlotError::NotFound(slot.uuid()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn the_booted_slot_comes_from_root_partuuid() {
        let a = format!("console=hvc0 root=PARTUUID={UUID_A} rootfstype=squashfs ro");
        assert_eq!(booted(&a).unwrap(), Slot::A);
        let b = format!("root=PARTUUID={} ro", UUID_B.to_uppercase());
        assert_eq!(booted(&b).unwrap(), Slot::B);
        assert!(booted("root=/dev/sda1").is_err());
        assert!(booted("root=PARTUUID=6d61796c-7966-4c79-8000-726f6f742d63").is_err());
    }

    #[test]
    fn gpt_guid_reads_the_mixed_endian_unique_guid() {
        // LBA 1: the header; entries at LBA 2, 128 bytes each; partition 2's GUID is B's.
        let mut disk = vec![0u8; 512 * 4];
        disk[512..520].copy_from_slice(b"EFI PART");
        disk[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let guid = [
            0x6c, 0x79, 0x61, 0x6d, 0x66, 0x79, 0x79, 0x4c, 0x80, 0x00, 0x72, 0x6f, 0x6f, 0x74,
            0x2d, 0x62,
        ];
        disk[1024 + 128 + 16..1024 + 128 + 32].copy_from_slice(&guid);
        let name = Path::new("disk");
        assert_eq!(
            gpt_guid(&mut Cursor::new(&disk), name, 512, 2).unwrap(),
            UUID_B
        );
        assert!(gpt_guid(&mut Cursor::new(&disk), name, 512, 200).is_err());
        disk[512] = b'X';
        assert!(gpt_guid(&mut Cursor::new(&disk), name, 512, 2).is_err());
    }
}
