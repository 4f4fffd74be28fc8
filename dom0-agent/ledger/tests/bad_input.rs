//! Bad data directories and full storage: clear errors, no panic, nothing committed lost.
#![allow(unsafe_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use mayfly_ledger::{
    verify, CommitError, KeyError, Ledger, OpenError, Options, StoreOptions, TxContext, TxId,
};
use slog::{o, Discard, Logger};

fn log() -> Logger {
    Logger::root(Discard, o!())
}

fn ctx() -> TxContext {
    TxContext {
        tx_id: TxId::generate(),
        handler: "kv".into(),
        request: Vec::new(),
        domain_id: 1,
        policy_hash: [0; 32],
    }
}

fn put(ledger: &Ledger, key: &str, value: &[u8]) -> Result<u64, CommitError> {
    let mut tx = ledger.begin(ctx()).expect("begin");
    tx.put(key.as_bytes(), value).expect("put");
    tx.commit(Vec::new()).map(|r| r.seq)
}

/// Opens with a fixed map of `map_size` bytes (no growth: the bound is the initial size).
fn open_with(dir: &Path, map_size: usize) -> Result<Ledger, OpenError> {
    let opts = Options {
        store: StoreOptions {
            map_size,
            max_map_size: map_size,
            ..StoreOptions::default()
        },
        ..Options::default()
    };
    Ledger::open(dir, &opts, &log())
}

fn verify_ok(ledger: &Ledger) {
    let report = verify(ledger.store(), &[ledger.public_key()], &mut |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.failures);
}

#[test]
fn garbage_data_file_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("data.mdb"), vec![0xA5u8; 64 * 1024]).unwrap();
    let err = Ledger::open(dir.path(), &Options::default(), &log()).unwrap_err();
    assert!(matches!(err, OpenError::NotLmdb { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("corrupted or is not a Mayfly ledger"),
        "{err}"
    );
    assert!(
        !dir.path().join("signing.key").exists(),
        "no key is generated for a bad directory"
    );
}

#[test]
fn foreign_lmdb_environment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut opts = heed::EnvOpenOptions::new();
        opts.max_dbs(4);
        // SAFETY: a fresh directory, opened once by this test, no unsafe flags.
        let env = unsafe { opts.open(dir.path()) }.unwrap();
        let mut wtxn = env.write_txn().unwrap();
        let db: heed::Database<heed::types::Bytes, heed::types::Bytes> = env
            .create_database(&mut wtxn, Some("someone-else"))
            .unwrap();
        db.put(&mut wtxn, b"k", b"v").unwrap();
        wtxn.commit().unwrap();
        env.prepare_for_closing().wait();
    }
    let err = Ledger::open(dir.path(), &Options::default(), &log()).unwrap_err();
    assert!(matches!(err, OpenError::Foreign { .. }), "{err:?}");
    assert!(err.to_string().contains("not a Mayfly ledger"), "{err}");
}

#[test]
fn missing_or_wrong_key_is_refused_and_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("signing.key");
    {
        let ledger = Ledger::open(dir.path(), &Options::default(), &log()).unwrap();
        put(&ledger, "precious", b"1").unwrap();
    }
    let saved = fs::read(&key_path).unwrap();

    fs::remove_file(&key_path).unwrap();
    let err = Ledger::open(dir.path(), &Options::default(), &log()).unwrap_err();
    assert!(
        matches!(err, OpenError::Key(KeyError::Missing { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("Restore it from backup"), "{err}");
    assert!(
        !key_path.exists(),
        "a missing key is never silently regenerated"
    );

    // Another appliance's key.
    let other = tempfile::tempdir().unwrap();
    drop(Ledger::open(other.path(), &Options::default(), &log()).unwrap());
    fs::copy(other.path().join("signing.key"), &key_path).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    let err = Ledger::open(dir.path(), &Options::default(), &log()).unwrap_err();
    assert!(matches!(err, OpenError::KeyMismatch { .. }), "{err:?}");

    // A world-readable key.
    fs::write(&key_path, &saved).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ledger::open(dir.path(), &Options::default(), &log()).unwrap_err();
    assert!(
        matches!(err, OpenError::Key(KeyError::Permissions { .. })),
        "{err:?}"
    );

    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    let ledger = Ledger::open(dir.path(), &Options::default(), &log()).unwrap();
    assert_eq!(
        ledger.store().committed(b"precious").unwrap().unwrap().1,
        b"1"
    );
    verify_ok(&ledger);
}

#[test]
fn data_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    let err = Ledger::open(&file, &Options::default(), &log()).unwrap_err();
    assert!(matches!(err, OpenError::Directory { .. }), "{err:?}");
}

#[test]
fn map_full_fails_the_group_and_keeps_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let small = 1 << 20;
    let ledger = open_with(dir.path(), small).unwrap();
    let value = vec![0x5Au8; 16 * 1024];
    let mut acked = Vec::new();
    let mut full = None;
    for i in 0..1000 {
        match put(&ledger, &format!("k{i:04}"), &value) {
            Ok(seq) => acked.push((i, seq)),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("a 1 MiB map must fill up");
    assert!(matches!(err, CommitError::MapFull { .. }), "{err:?}");
    assert!(
        err.to_string().contains("raise --max-map-size-mib"),
        "{err}"
    );
    for (i, seq) in &acked {
        assert_eq!(
            ledger
                .store()
                .committed(format!("k{i:04}").as_bytes())
                .unwrap()
                .unwrap()
                .0,
            *seq
        );
    }
    verify_ok(&ledger);
    drop(ledger);
    // Reopened with a larger map, it carries on.
    let ledger = open_with(dir.path(), 64 << 20).unwrap();
    put(&ledger, "after", b"ok").unwrap();
    assert_eq!(
        ledger.store().data_snapshot().unwrap().len(),
        acked.len() + 1
    );
    verify_ok(&ledger);
}

struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(at: &'a Path, size: &str) -> Self {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "this test mounts a small tmpfs and must run as root"
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn full_disk_fails_cleanly_and_keeps_everything_acknowledged() {
    let outer = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(outer.path(), "2m");
    let dir = outer.path().join("ledger");
    // Map far larger than the filesystem: the disk fills before the map.
    let ledger = open_with(&dir, 256 << 20).unwrap();
    let value = vec![0xC3u8; 8 * 1024];
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..2000 {
        match put(&ledger, &format!("k{i:04}"), &value) {
            Ok(seq) => acked.push((i, seq)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let err = failure.expect("a 2 MiB filesystem must fill up");
    assert!(matches!(err, CommitError::DiskFull { .. }), "{err:?}");
    // Later commits keep failing cleanly, never panicking.
    assert!(put(&ledger, "more", &value).is_err());
    for (i, seq) in &acked {
        assert_eq!(
            ledger
                .store()
                .committed(format!("k{i:04}").as_bytes())
                .unwrap()
                .unwrap()
                .0,
            *seq,
            "acknowledged commit {seq} lost"
        );
    }
    verify_ok(&ledger);
    drop(ledger);

    // After a restart on the still-full disk everything acknowledged is there.
    match open_with(&dir, 256 << 20) {
        Ok(ledger) => {
            assert_eq!(ledger.store().data_snapshot().unwrap().len(), acked.len());
            verify_ok(&ledger);
        }
        Err(e) => {
            // The start-up audit record may not fit; the error must say so, and a
            // read-only verification must still pass.
            assert!(e.to_string().contains("could not record its start"), "{e}");
            let store =
                mayfly_ledger::store::open_read_only(&dir, &StoreOptions::default()).unwrap();
            let key = store.public_key().unwrap();
            let report = verify(&store, &[key], &mut |_| {}).unwrap();
            assert!(report.ok(), "{:?}", report.failures);
            assert_eq!(store.data_snapshot().unwrap().len(), acked.len());
        }
    }
}
