//! Raw access to stored records, for tamper-detection tests only (feature `test-tamper`).
//! Never enabled in a product build.

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
