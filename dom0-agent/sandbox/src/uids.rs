//! Claiming the uids a sandbox's clones run as, exclusively on the host.
//!
//! Each live clone runs as a uid no other process holds: that is what makes the kernel
//! refuse a clone's signals to any other clone (see the seccomp allowlist in `mayfly-sandbox-zygote`). Within one sandbox
//! the zygote hands out distinct uids; *between* sandboxes (several agents on one host, or
//! several sandboxes in one process) the ranges must not overlap, so each sandbox claims
//! blocks of the configured range before its zygote starts:
//!
//! ```text
//!  uid space:   ... | block b | block b+1024 | block b+2048 | ...   (aligned to BLOCK)
//!  lock files:  <lock_dir>/uids-<first uid of the block>, flock(LOCK_EX) held for the
//!               sandbox's life (released by the kernel when the process dies)
//! ```
//!
//! A sandbox needs `ceil(needed / BLOCK)` consecutive blocks; it takes the first run of
//! free ones inside `first_uid .. first_uid + uid_count`. Because blocks are aligned in the
//! whole uid space, two sandboxes configured with different but overlapping ranges still
//! contend for the same lock files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Uids are claimed in aligned blocks of this many.
pub const BLOCK: u32 = 1024;

/// The uids one sandbox holds, and the locks that keep them its own.
#[derive(Debug)]
pub struct UidClaim {
    first: u32,
    count: u32,
    _locks: Vec<Flock<File>>,
}

impl UidClaim {
    /// The first uid.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// How many uids, from [`UidClaim::first`].
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// No uids could be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The lock directory or a lock file could not be created or opened.
    #[error("uid lock {path:?}")]
    Lock {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Every run of free blocks in the range is too short: other sandboxes hold the rest.
    #[error(
        "no {blocks} free block(s) of {BLOCK} uids in {first_uid} + {uid_count}: other \
         sandboxes on this host hold them (give this one another first_uid / uid_count)"
    )]
    Exhausted {
        /// Configured first uid.
        first_uid: u32,
        /// Configured count.
        uid_count: u32,
        /// Blocks needed.
        blocks: u32,
    },
}

/// Blocks needed for `needed` uids.
pub fn blocks_for(needed: u64) -> u32 {
    u32::try_from(needed.div_ceil(u64::from(BLOCK)).max(1)).unwrap_or(u32::MAX)
}

/// The aligned block starts inside `first .. first + count` (whole blocks only).
fn aligned_blocks(first: u32, count: u32) -> impl Iterator<Item = u32> {
    let end = u64::from(first) + u64::from(count);
    let start = u64::from(first).div_ceil(u64::from(BLOCK)) * u64::from(BLOCK);
    (0..)
        .map(move |i: u64| start + i * u64::from(BLOCK))
        .take_while(move |&b| b + u64::from(BLOCK) <= end)
        .filter_map(|b| u32::try_from(b).ok())
}

/// How many whole aligned blocks `first .. first + count` holds.
pub fn whole_blocks(first: u32, count: u32) -> u32 {
    u32::try_from(aligned_blocks(first, count).count()).unwrap_or(u32::MAX)
}

fn try_lock(dir: &Path, block: u32) -> Result<Option<Flock<File>>, ClaimError> {
    let path = dir.join(format!("uids-{block}"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| ClaimError::Lock {
            path: path.clone(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(ClaimError::Lock {
            path,
            source: e.into(),
        }),
    }
}

/// Claims `blocks` consecutive free blocks of `first .. first + count`, with lock files in
/// `dir` (created, mode 0700, if missing).
pub fn claim(dir: &Path, first: u32, count: u32, blocks: u32) -> Result<UidClaim, ClaimError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ClaimError::Lock {
            path: dir.to_path_buf(),
            source,
        })?;
    let starts: Vec<u32> = aligned_blocks(first, count).collect();
    let want = usize::try_from(blocks).unwrap_or(usize::MAX);
    'runs: for run in starts.windows(want.max(1)) {
        let mut locks = Vec::with_capacity(run.len());
        for &block in run {
            match try_lock(dir, block)? {
                Some(lock) => locks.push(lock),
                None => continue 'runs, // held by another sandbox: the next run
            }
        }
        let (Some(&first_block), Some(n)) = (run.first(), u32::try_from(run.len()).ok()) else {
            continue;
        };
        return Ok(UidClaim {
            first: first_block,
            count: n.saturating_mul(BLOCK),
            _locks: locks,
        });
    }
    Err(ClaimError::Exhausted {
        first_uid: first,
        uid_count: count,
        blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_whole() {
        let starts: Vec<u32> = aligned_blocks(1000, 3 * BLOCK).collect();
        assert_eq!(starts, [1024, 2048]);
        assert_eq!(whole_blocks(1000, 3 * BLOCK), 2);
        assert_eq!(whole_blocks(1024, 3 * BLOCK), 3);
        assert_eq!(whole_blocks(1024, BLOCK - 1), 0);
        // The last uid below u32::MAX: no block may end past it.
        assert_eq!(whole_blocks(u32::MAX - BLOCK, BLOCK), 0);
        assert_eq!(blocks_for(1), 1);
        assert_eq!(blocks_for(u64::from(BLOCK)), 1);
        assert_eq!(blocks_for(u64::from(BLOCK) + 1), 2);
    }

    #[test]
    fn claims_exclude_each_other_and_end_with_their_holder() {
        let dir = tempfile::tempdir().unwrap();
        let a = claim(dir.path(), 4096, 3 * BLOCK, 1).unwrap();
        let b = claim(dir.path(), 4096, 3 * BLOCK, 2).unwrap();
        assert_eq!((a.first(), a.count()), (4096, BLOCK));
        assert_eq!((b.first(), b.count()), (4096 + BLOCK, 2 * BLOCK));
        // A range that overlaps them differently still sees the held blocks.
        assert!(matches!(
            claim(dir.path(), 4096 + BLOCK, 2 * BLOCK, 1),
            Err(ClaimError::Exhausted { .. })
        ));
        drop(a);
        let c = claim(dir.path(), 4096, 8 * BLOCK, 1).unwrap();
        assert_eq!(c.first(), 4096, "the freed block is taken again");
    }
}
