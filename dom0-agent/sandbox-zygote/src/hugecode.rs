//! The template's read-only image on transparent huge pages, so that clones neither fault it
//! in nor tear down its page-table entries.
//!
//! `fork` copies no page-table entries for a file mapping that was never written: each clone
//! faults in the zygote's code and read-only data again (16 pages per fault with the kernel's
//! fault-around), and its `exit` unmaps them again — on the VM the benchmarks run on, about
//! 14 faults and a few hundred entries per transaction. An *anonymous* mapping is copied at
//! `fork`, and a 2 MiB transparent huge page is one entry: copied once, unmapped once, never
//! faulted.
//!
//! So, once, before the first clone, the zygote moves each non-writable segment of its own
//! executable that sits alone in a 2 MiB-aligned window (the static template is linked with
//! `-z max-page-size=2M -z separate-code`, see `scripts/build-zygote.sh`) onto an anonymous
//! huge page, with the same protection:
//!
//! ```text
//!  window [w, w+2M) holds only the segment [w, end) (r-x or r--), nothing else mapped
//!  1. reserve 4 MiB anonymous (read-write), take the 2 MiB-aligned half: h
//!  2. madvise(h, 2M, MADV_HUGEPAGE), write one byte: is it one huge page? (smaps) else undo
//!  3. copy [w, end) to h; the tail of h stays zero
//!  4. mprotect(h, 2M, the segment's protection)   (never writable and executable at once)
//!  5. mremap(h → w, MREMAP_FIXED): atomically replaces the segment, same bytes, same place
//! ```
//!
//! Step 5 may replace the very code that calls it: the bytes at every address stay the
//! same, and nothing executes in between (one system call). Any step that does not apply
//! (segments not aligned, a neighbour in the window, transparent huge pages off, the
//! kernel giving small pages) leaves the executable as it is: this is an optimisation,
//! never a requirement. It happens before the `chroot` (it reads `/proc/self/maps`) and
//! before the seccomp filter, which forbids `mprotect` and executable mappings.
//!
//! Cost: 2 MiB of memory per segment moved, once per zygote (the copies are shared by every
//! clone); tools that read code from the executable file by address (`perf`) see anonymous
//! memory there.

use std::fs;
use std::io;

/// Size and alignment of a transparent huge page on x86-64.
const HUGE: usize = 2 << 20;

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: [u8; 4],
    path: String,
}

/// Parses `/proc/<pid>/maps` text; lines that do not parse are skipped. The path is the
/// rest of the line after the five fixed fields (it may hold spaces).
fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut rest = line;
            let mut field = || {
                let trimmed = rest.trim_start();
                let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
                let (head, tail) = trimmed.split_at(end);
                rest = tail;
                Some(head).filter(|h| !h.is_empty())
            };
            let (start, end) = field()?.split_once('-')?;
            let perms: [u8; 4] = field()?.as_bytes().try_into().ok()?;
            let (_offset, _device, _inode) = (field()?, field()?, field()?);
            let path = rest.trim().to_owned();
            Some(Mapping {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
                perms,
                path,
            })
        })
        .collect()
}

/// The executable's segments that can move: not writable, private, alone in their 2 MiB
/// window.
fn movable(maps: &[Mapping], exe: &str) -> Vec<Mapping> {
    maps.iter()
        .filter(|m| {
            m.path == exe
                && m.perms[0] == b'r' // it is read for the copy
                && m.perms[1] == b'-'
                && m.perms[3] == b'p'
                && m.start.is_multiple_of(HUGE)
                && m.end > m.start
                && m.end - m.start <= HUGE
        })
        .filter(|m| {
            let window_end = m.start + HUGE;
            // Nothing else may be mapped in [start, start + 2M).
            maps.iter()
                .filter(|o| *o != *m)
                .all(|o| o.end <= m.start || o.start >= window_end)
        })
        .cloned()
        .collect()
}

/// `AnonHugePages` of the mapping starting at `start`, in KiB, from `/proc/self/smaps`.
fn anon_huge_kib(start: usize) -> Option<u64> {
    let smaps = fs::read_to_string("/proc/self/smaps").ok()?;
    // /proc pads addresses to at least 8 hex digits.
    let header = format!("{start:08x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&header));
    lines.next()?;
    // The mapping's fields ("Key:   value"), up to the next mapping's header line.
    lines
        .take_while(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|k| k.ends_with(':'))
        })
        .find_map(|l| l.strip_prefix("AnonHugePages:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Moves the executable's movable segments onto transparent huge pages (module docs).
/// Errors are system-call failures after which the image may be partly moved.
///
/// # Safety
///
/// The process must be single-threaded: `mremap(MREMAP_FIXED)` replaces whole 2 MiB
/// windows checked against a snapshot of `/proc/self/maps`; a mapping another thread made
/// meanwhile in a window would be silently replaced. And if the kernel fails the `mremap`
/// after it unmapped the destination (`ENOMEM` in `move_vma`), the segment is *gone*: a moved
/// code segment then faults on return. Only for start-up, where a crash fails loudly.
#[allow(unsafe_code)]
pub(crate) unsafe fn move_image_to_huge_pages() -> io::Result<()> {
    let enabled =
        fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if enabled.contains("[never]") || enabled.is_empty() {
        return Ok(());
    }
    let exe = fs::read_link("/proc/self/exe")?;
    let Some(exe) = exe.to_str() else {
        return Ok(());
    };
    let maps = parse_maps(&fs::read_to_string("/proc/self/maps")?);
    for segment in movable(&maps, exe) {
        move_to_huge_page(segment.start, segment.end, segment.perms[2] == b'x')?;
    }
    Ok(())
}

/// Whether the mapping at `addr` is backed by a whole huge page.
fn is_one_huge_page(addr: usize) -> bool {
    anon_huge_kib(addr).is_some_and(|kib| kib >= (HUGE as u64) / 1024)
}

/// Moves the read-only segment `[start, end)` of this process's executable, alone in the
/// 2 MiB window at `start`, onto one anonymous transparent huge page with the same bytes and
/// protection (module docs). Where the kernel gives no huge page, nothing changes.
/// The caller checked the window (aligned, nothing else mapped in it, not writable) and that
/// the process is single-threaded.
fn move_to_huge_page(start: usize, end: usize, exec: bool) -> io::Result<()> {
    let len = end.saturating_sub(start);
    if !start.is_multiple_of(HUGE) || len == 0 || len > HUGE {
        return Ok(());
    }
    let reserve = 2 * HUGE;
    // SAFETY: a new private anonymous mapping at an address of the kernel's choosing; it
    // overlaps nothing of ours.
    #[allow(unsafe_code)]
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let huge = base.next_multiple_of(HUGE);
    let unmap = |from: usize, to: usize| {
        if to > from {
            // SAFETY: `[from, to)` lies in the reservation made above, which nothing else
            // uses; unmapping part of it touches no other mapping.
            #[allow(unsafe_code)]
            unsafe {
                libc::munmap(from as *mut libc::c_void, to - from);
            }
        }
    };
    // Keep only the aligned half.
    unmap(base, huge);
    unmap(huge + HUGE, base + reserve);
    // SAFETY: `[huge, huge + 2M)` is our own read-write anonymous mapping (above); advising
    // it and writing its first byte touch nothing else.
    #[allow(unsafe_code)]
    let faulted = unsafe {
        libc::madvise(huge as *mut libc::c_void, HUGE, libc::MADV_HUGEPAGE) == 0 && {
            std::ptr::write_volatile(huge as *mut u8, 0);
            true
        }
    };
    if !faulted || !is_one_huge_page(huge) {
        unmap(huge, huge + HUGE);
        return Ok(());
    }
    let prot = if exec {
        libc::PROT_READ | libc::PROT_EXEC
    } else {
        libc::PROT_READ
    };
    // SAFETY: the source `[start, end)` is a readable mapping of the executable (the caller
    // read it from /proc/self/maps, and a single-threaded process cannot have changed it
    // since); the destination is the first `len` bytes of our 2 MiB mapping; they do not
    // overlap. mprotect and mremap act on our mapping only; MREMAP_FIXED replaces (in one
    // call, but not transactionally: a failure after the kernel's unmap leaves a hole, see
    // `move_image_to_huge_pages`) whatever was mapped in `[start, start + 2M)` — the segment itself and, as the caller
    // checked, nothing else — with a copy holding the same bytes at the same addresses, so
    // code running from the segment (this function's caller included) goes on unchanged.
    #[allow(unsafe_code)]
    unsafe {
        std::ptr::copy_nonoverlapping(start as *const u8, huge as *mut u8, len);
        if libc::mprotect(huge as *mut libc::c_void, HUGE, prot) != 0 {
            let e = io::Error::last_os_error();
            unmap(huge, huge + HUGE);
            return Err(e);
        }
        let moved = libc::mremap(
            huge as *mut libc::c_void,
            HUGE,
            HUGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        );
        if moved == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            unmap(huge, huge + HUGE);
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
00200000-0026f000 r--p 00000000 fe:00 42   /usr/sbin/mayfly-zygote
00400000-0052b000 r-xp 00200000 fe:00 42   /usr/sbin/mayfly-zygote
00600000-0060d000 r--p 00400000 fe:00 42   /usr/sbin/mayfly-zygote
0080c000-0080f000 rw-p 0040c000 fe:00 42   /usr/sbin/mayfly-zygote
0080f000-00816000 rw-p 00000000 00:00 0
00a00000-00a01000 r--p 00000000 fe:00 43   /usr/lib/other.so
00a01000-00b00000 r-xp 00001000 fe:00 43   /usr/lib/other.so
7fff0000-7fff1000 rw-p 00000000 00:00 0    [stack]
";

    #[test]
    fn only_read_only_segments_alone_in_an_aligned_window_move() {
        let maps = parse_maps(MAPS);
        assert_eq!(maps.len(), 8);
        let starts: Vec<usize> = movable(&maps, "/usr/sbin/mayfly-zygote")
            .iter()
            .map(|m| m.start)
            .collect();
        // r-- at 0x200000 and r-x at 0x400000 and r-- at 0x600000 are alone in their
        // windows; the writable ones never move; other files never move.
        assert_eq!(starts, [0x20_0000, 0x40_0000, 0x60_0000]);
    }

    #[test]
    fn a_neighbour_in_the_window_or_a_misaligned_segment_stays() {
        let text = "\
00400000-0052b000 r-xp 00200000 fe:00 42   /z
0052b000-0052c000 r--p 0032b000 fe:00 42   /z
00601000-00700000 r-xp 00400000 fe:00 42   /z
";
        let maps = parse_maps(text);
        assert!(
            movable(&maps, "/z").is_empty(),
            "{:?}",
            movable(&maps, "/z")
        );
    }

    #[test]
    fn a_path_with_spaces_is_whole() {
        let maps = parse_maps("00400000-00500000 r-xp 00200000 fe:00 42   /opt/my dir/z\n");
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].path, "/opt/my dir/z");
        assert_eq!(movable(&maps, "/opt/my dir/z").len(), 1);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_maps("not a maps line\n\nzz-yy r-xp 0 0 0 /z\n").is_empty());
    }
}
