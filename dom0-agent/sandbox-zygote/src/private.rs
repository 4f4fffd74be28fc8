//! The zygote's private memory: one anonymous mapping that `fork` leaves out
//! (`MADV_DONTFORK`), for everything the zygote writes per clone.
//!
//! After each `fork` every page the zygote shares with its live clones is copy-on-write, so
//! the zygote's next write to one costs a page fault and a page copy (~3 µs on the machine
//! `BENCHMARKS.md` describes). Its bookkeeping per clone — which uids live clones hold, which
//! clone a pid is, the buffer a request is received into — wrote to six such pages per
//! clone (the hash tables, glibc's allocator state, the receive buffer on the stack). Here
//! it writes only to memory no clone has: no fault after the first touch of each page.
//!
//! A clone never has this mapping. It never reads it either: `fork` returns in the child
//! inside the zygote's `spawn`, which hands the clone its own ids and fds by value and
//! never returns into code that touches the tables (the clone `_exit`s; its copy of the
//! [`Private`] value is never used or dropped).
//!
//! ```text
//!  one mapping, page-aligned parts, only touched pages are ever allocated:
//!  ┌──────────────────────┬──────────────────────────┬──────────────────────────────────┐
//!  │ receive buffer       │ uid bitmap               │ pid table: open addressing,      │
//!  │ (RECV_BUF_LEN bytes) │ one bit per uid of the   │ linear probing, 2^k slots ≥ 2 ×  │
//!  │                      │ range, set = held        │ uid_count of {pid, clone_id, uid}│
//!  └──────────────────────┴──────────────────────────┴──────────────────────────────────┘
//! ```
//!
//! A live clone holds a uid, so there are never more live children than `uid_count`: the
//! pid table is at most half full, and a probe always ends.

use std::io;
use std::ptr::NonNull;

/// A live child of the zygote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Child {
    pub clone_id: u32,
    pub uid: u32,
}

/// One pid table slot; `pid == 0` is empty (no child has pid 0).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Slot {
    pid: i32,
    clone_id: u32,
    uid: u32,
}

const PAGE: usize = 4096;

fn page_up(n: usize) -> Option<usize> {
    n.checked_add(PAGE - 1).map(|n| n & !(PAGE - 1))
}

/// The zygote's private memory. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Private {
    base: NonNull<u8>,
    len: usize,
    recv_len: usize,
    bitmap_off: usize,
    bitmap_words: usize,
    table_off: usize,
    /// Slots in the table: a power of two.
    slots: usize,
    first_uid: u32,
    uid_count: u32,
    /// Offset of the next uid to try (round robin: a uid is reused as late as possible).
    next_uid: u32,
    uids_held: u32,
    children: usize,
}

impl Private {
    /// Maps the memory for a receive buffer of `recv_len` bytes and `uid_count` uids from
    /// `first_uid`, and excludes it from every later `fork`.
    pub(crate) fn new(recv_len: usize, first_uid: u32, uid_count: u32) -> io::Result<Self> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "uid range too large");
        let count = usize::try_from(uid_count).map_err(|_| too_big())?;
        // Every uid of the range is below u32::MAX (which is `(uid_t)-1`, "no change", to
        // `setresuid`).
        first_uid.checked_add(uid_count).ok_or_else(too_big)?;
        let bitmap_words = count.div_ceil(64);
        let slots = count
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .ok_or_else(too_big)?
            .max(16);
        let bitmap_off = page_up(recv_len).ok_or_else(too_big)?;
        let table_off = bitmap_words
            .checked_mul(8)
            .and_then(|b| b.checked_add(bitmap_off))
            .and_then(page_up)
            .ok_or_else(too_big)?;
        let len = slots
            .checked_mul(std::mem::size_of::<Slot>())
            .and_then(|t| t.checked_add(table_off))
            .and_then(page_up)
            .ok_or_else(too_big)?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        #[allow(unsafe_code)]
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        let private = Self {
            base,
            len,
            recv_len,
            bitmap_off,
            bitmap_words,
            table_off,
            slots,
            first_uid,
            uid_count,
            next_uid: 0,
            uids_held: 0,
            children: 0,
        };
        // SAFETY: advice on the mapping just made, which `private` owns (and unmaps on drop).
        #[allow(unsafe_code)]
        if unsafe { libc::madvise(ptr, len, libc::MADV_DONTFORK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(private)
    }

    /// The receive buffer.
    pub(crate) fn recv_buf(&mut self) -> &mut [u8] {
        // SAFETY: bytes `0..recv_len` of the mapping (zero-initialised, so valid `u8`s),
        // borrowed mutably through `&mut self`, which owns the mapping.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.base.as_ptr(), self.recv_len)
        }
    }

    fn bitmap(&mut self) -> &mut [u64] {
        // SAFETY: `bitmap_off` is page-aligned (so 8-aligned) and `bitmap_words` words fit
        // before `table_off`; zeroed memory is a valid `u64`; borrowed through `&mut self`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(self.bitmap_off).cast::<u64>(),
                self.bitmap_words,
            )
        }
    }

    fn table(&mut self) -> &mut [Slot] {
        // SAFETY: `table_off` is page-aligned and `slots` slots fit before `len`; zeroed
        // memory is a valid (empty) `Slot`; borrowed through `&mut self`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(self.table_off).cast::<Slot>(),
                self.slots,
            )
        }
    }

    /// A uid no live clone holds, round robin; `None` if all are held.
    pub(crate) fn take_uid(&mut self) -> Option<u32> {
        if self.uids_held >= self.uid_count {
            return None;
        }
        // At most `held + 1` tries: among that many consecutive uids one is free.
        for _ in 0..=self.uids_held {
            let offset = self.next_uid;
            self.next_uid = (offset + 1) % self.uid_count;
            let (word, bit) = (offset as usize / 64, 1u64 << (offset % 64));
            // The uid first: one that would overflow is never marked held.
            let uid = self.first_uid.checked_add(offset)?;
            let bitmap = self.bitmap();
            if let Some(w) = bitmap.get_mut(word) {
                if *w & bit == 0 {
                    *w |= bit;
                    self.uids_held += 1;
                    return Some(uid);
                }
            }
        }
        None
    }

    /// Gives a uid back (no-op for one not held or outside the range).
    pub(crate) fn free_uid(&mut self, uid: u32) {
        let Some(offset) = uid.checked_sub(self.first_uid) else {
            return;
        };
        if offset >= self.uid_count {
            return;
        }
        let (word, bit) = (offset as usize / 64, 1u64 << (offset % 64));
        let mut freed = false;
        if let Some(w) = self.bitmap().get_mut(word) {
            freed = *w & bit != 0;
            *w &= !bit;
        }
        if freed {
            self.uids_held -= 1;
        }
    }

    fn home(&self, pid: i32) -> usize {
        // Fibonacci hashing of the pid onto the table's power-of-two size.
        let h = (pid as u32 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // Below `slots`, which is a `usize`.
        usize::try_from(h >> (64 - self.slots.trailing_zeros())).unwrap_or(0)
    }

    fn find(&mut self, pid: i32) -> Option<usize> {
        if pid <= 0 {
            return None; // 0 marks an empty slot; no child has a pid below 1
        }
        let mask = self.slots - 1;
        let mut i = self.home(pid);
        let table = self.table();
        loop {
            let slot = table.get(i)?;
            if slot.pid == pid {
                return Some(i);
            }
            if slot.pid == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Records a live child. Fails only if the table is full (more children than uids).
    pub(crate) fn insert(&mut self, pid: i32, child: Child) -> bool {
        if pid <= 0 || self.children >= self.slots / 2 {
            return false;
        }
        let mask = self.slots - 1;
        let mut i = self.home(pid);
        let table = self.table();
        loop {
            let Some(slot) = table.get_mut(i) else {
                return false;
            };
            if slot.pid == 0 || slot.pid == pid {
                let new = slot.pid == 0;
                *slot = Slot {
                    pid,
                    clone_id: child.clone_id,
                    uid: child.uid,
                };
                if new {
                    self.children += 1;
                }
                return true;
            }
            i = (i + 1) & mask;
        }
    }

    /// The live child with this pid.
    pub(crate) fn get(&mut self, pid: i32) -> Option<Child> {
        let i = self.find(pid)?;
        self.table().get(i).map(|s| Child {
            clone_id: s.clone_id,
            uid: s.uid,
        })
    }

    /// Forgets the child with this pid (backward-shift deletion: no tombstones).
    pub(crate) fn remove(&mut self, pid: i32) -> Option<Child> {
        let mut hole = self.find(pid)?;
        let mask = self.slots - 1;
        let removed = self.table().get(hole).copied()?;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let next = self.table().get(j).copied()?;
            if next.pid == 0 {
                break;
            }
            // `next` may move into the hole unless its home lies cyclically in (hole, j].
            let home = self.home(next.pid);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                if let Some(h) = self.table().get_mut(hole) {
                    *h = next;
                }
                hole = j;
            }
        }
        if let Some(h) = self.table().get_mut(hole) {
            *h = Slot {
                pid: 0,
                clone_id: 0,
                uid: 0,
            };
        }
        self.children -= 1;
        Some(Child {
            clone_id: removed.clone_id,
            uid: removed.uid,
        })
    }

    /// The pids of every live child.
    pub(crate) fn pids(&mut self) -> impl Iterator<Item = i32> + '_ {
        self.table().iter().map(|s| s.pid).filter(|&p| p != 0)
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; nothing borrows it any more.
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(n: u32) -> Child {
        Child {
            clone_id: n,
            uid: 1000 + n,
        }
    }

    #[test]
    fn uids_are_unique_among_live_clones_and_reused_last() {
        let mut uids = Private::new(100, 1000, 3).unwrap();
        let (a, b, c) = (uids.take_uid(), uids.take_uid(), uids.take_uid());
        assert_eq!((a, b, c), (Some(1000), Some(1001), Some(1002)));
        assert_eq!(uids.take_uid(), None, "all three are held");
        uids.free_uid(1001);
        assert_eq!(uids.take_uid(), Some(1001));
        uids.free_uid(1000);
        uids.free_uid(1002);
        // Round robin: after 1001 comes 1002, even though 1000 was freed first.
        assert_eq!(uids.take_uid(), Some(1002));
        assert_eq!(uids.take_uid(), Some(1000));
        assert_eq!(uids.take_uid(), None);
        // Freeing one not held, or outside the range, changes nothing; twice counts once.
        uids.free_uid(999);
        uids.free_uid(1003);
        assert_eq!(uids.take_uid(), None);
        uids.free_uid(1001);
        uids.free_uid(1001);
        assert_eq!(uids.take_uid(), Some(1001));
        assert_eq!(uids.take_uid(), None);
        // The last uid of the range is usable and nothing past it is produced.
        let mut top = Private::new(100, u32::MAX - 2, 2).unwrap();
        assert_eq!(top.take_uid(), Some(u32::MAX - 2));
        assert_eq!(top.take_uid(), Some(u32::MAX - 1));
        assert_eq!(top.take_uid(), None);
        // A range reaching u32::MAX (`(uid_t)-1`) or past it is refused.
        assert!(Private::new(100, u32::MAX - 1, 2).is_err());
        assert!(Private::new(100, u32::MAX, 1).is_err());
        // Across a bitmap word.
        let mut wide = Private::new(100, 1, 130).unwrap();
        let all: Vec<u32> = std::iter::from_fn(|| wide.take_uid()).collect();
        assert_eq!(all, (1..=130).collect::<Vec<u32>>());
    }

    #[test]
    fn the_pid_table_behaves_like_a_map_under_churn() {
        let mut p = Private::new(100, 1, 64).unwrap();
        let mut model = std::collections::HashMap::new();
        // Pids from a small range (some scaled up, spread wider), kept up to the table's limit
        // of 64 live children (64 of its 128 slots): probe runs and backward-shift deletions
        // happen throughout.
        let mut x: u32 = 12345;
        for round in 0..20_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let pid =
                i32::try_from((x >> 16) % 200 + 1).unwrap() * if round % 3 == 0 { 128 } else { 1 };
            if model.contains_key(&pid) {
                assert_eq!(p.remove(pid), model.remove(&pid));
            } else if model.len() < 64 {
                assert!(p.insert(pid, child(round)));
                model.insert(pid, child(round));
            }
            assert_eq!(p.get(pid), model.get(&pid).copied());
        }
        for (&pid, &c) in &model {
            assert_eq!(p.get(pid), Some(c));
        }
        let mut pids: Vec<i32> = p.pids().collect();
        let mut expected: Vec<i32> = model.keys().copied().collect();
        pids.sort_unstable();
        expected.sort_unstable();
        assert_eq!(pids, expected);
        assert_eq!(p.get(99_999), None);
        assert_eq!(p.remove(99_999), None);
        // 0 marks an empty slot: never found, never removed.
        assert_eq!(p.get(0), None);
        assert_eq!(p.remove(0), None);
        assert_eq!(p.pids().count(), model.len());
    }

    #[test]
    fn the_table_refuses_more_children_than_it_has_room_for() {
        // Room for as many children as uids (a live child holds one), at most half full.
        let mut p = Private::new(100, 1, 8).unwrap();
        for pid in 1..=8 {
            assert!(p.insert(pid, child(0)), "pid {pid}");
        }
        assert!(!p.insert(9, child(0)));
        assert!(!p.insert(0, child(0)));
        assert!(p.remove(3).is_some());
        assert!(p.insert(9, child(0)));
    }

    #[test]
    fn the_memory_is_left_out_of_every_fork() {
        let mut p = Private::new(100, 1, 8).unwrap();
        p.recv_buf()[0] = 7;
        // The area containing the mapping (it may have merged with a neighbour).
        let addr = p.base.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let mut flags = None;
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((lo, hi)) = range.split_once('-') else {
                continue;
            };
            let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            else {
                continue;
            };
            if (lo..hi).contains(&addr) {
                flags = lines.find(|l| l.starts_with("VmFlags:"));
                break;
            }
        }
        let flags = flags.expect("the mapping and its VmFlags are listed");
        // `dc`: do not copy this area on fork.
        assert!(flags.split_whitespace().any(|f| f == "dc"), "{flags}");
    }
}
