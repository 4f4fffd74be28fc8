//! Raw access to stored records, for tamper-detection tests only (feature `test-tamper`).
//! Never enabled in a product build.
//!
//! Test-only, above the store: uses only [`crate::store`].

use std::path::Path;

use crate::store::{names, open_read_only, StoreOptions};

/// Which database to touch.
fn db(store: &crate::Store, name: &str) -> heed::Database<heed::types::Bytes, heed::types::Bytes> {
    match name {
        names::CHECKPOINTS => store.dbs.checkpoints,
        names::AUDIT => store.dbs.audit,
        names::HEADS => store.dbs.heads,
        names::DATA => store.dbs.data,
        names::META => store.dbs.meta,
        names::UNDONE => store.dbs.undone.expect("tamper: no undone index"),
        other => panic!("tamper: unknown database {other}"),
    }
}

/// Reads a raw value.
pub fn get(dir: &Path, name: &str, key: &[u8]) -> Option<Vec<u8>> {
    let store = open_read_only(dir, &StoreOptions::default()).expect("open");
    let rtxn = store.read_txn().expect("rtxn");
    db(&store, name)
        .get(&rtxn, key)
        .expect("get")
        .map(<[u8]>::to_vec)
}

/// Overwrites (`Some`) or deletes (`None`) a raw value.
pub fn set(dir: &Path, name: &str, key: &[u8], value: Option<&[u8]>) {
    let store = open_read_only(dir, &StoreOptions::default()).expect("open");
    let mut wtxn = store.env.write_txn().expect("wtxn");
    let d = db(&store, name);
    match value {
        Some(v) => d.put(&mut wtxn, key, v).expect("put"),
        None => {
            d.delete(&mut wtxn, key).expect("delete");
        }
    }
    wtxn.commit().expect("commit");
}

/// Where the live entry of `key` in the `data` database sits in `data.mdb`: the file
/// offsets of its key bytes and of its stored value (`0x01 || u64 version || value`), and
/// the value's length. Found by reading the entry through LMDB and taking the addresses
/// LMDB returns relative to the start of its map, so these are the bytes a reader sees,
/// not a stale copy in a free page.
pub fn live_entry_offsets(dir: &Path, key: &[u8]) -> Option<(usize, usize, usize)> {
    use std::ops::Bound;
    let store = open_read_only(dir, &StoreOptions::default()).expect("open");
    let base = map_base(&dir.join(crate::store::DATA_FILE))?;
    let rtxn = store.read_txn().expect("rtxn");
    let range = (Bound::Included(key), Bound::Included(key));
    let mut it = store.dbs.data.range(&rtxn, &range).expect("range");
    let (k, v) = it.next()?.expect("read");
    Some((
        (k.as_ptr() as usize).checked_sub(base)?,
        (v.as_ptr() as usize).checked_sub(base)?,
        v.len(),
    ))
}

/// Start address of this process's mapping of `file` at file offset 0 (`/proc/self/maps`).
fn map_base(file: &Path) -> Option<usize> {
    let file = std::fs::canonicalize(file).ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let range = f.next()?;
        let _perms = f.next()?;
        let offset = f.next()?;
        let _dev = f.next()?;
        let _inode = f.next()?;
        let path = f.next()?;
        (Path::new(path) == file && usize::from_str_radix(offset, 16).ok()? == 0)
            .then(|| usize::from_str_radix(range.split('-').next()?, 16).ok())
            .flatten()
    })
}
