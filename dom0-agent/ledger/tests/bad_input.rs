//! Bad data directories and full storage: clear errors, no panic, nothing committed lost.
#![allow(unsafe_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use mayfly_ledger::{verify, CommitError, KeyError, Ledger, OpenError, Options, StoreOptions};

mod common;
use common::{ctx, log};

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
    // Later transactions are refused up front, with the reason, never panicking.
    let refused = ledger.begin(ctx()).unwrap_err();
    assert!(
        matches!(refused, mayfly_ledger::TxError::StorageFull { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("disk"), "{refused}");
    let cap = ledger.capacity().unwrap();
    assert!(cap.refusing.is_some(), "{cap:?}");
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

    // A restart on the still-full disk succeeds (reads are served), refuses transactions,
    // and everything acknowledged is there.
    let ledger = open_with(&dir, 256 << 20).expect("opening on a full disk");
    assert_eq!(ledger.store().data_snapshot().unwrap().len(), acked.len());
    // (Pages LMDB freed inside the file may still take a commit or two.)
    let mut refused = false;
    for i in 2000..2100 {
        match ledger.begin(ctx()) {
            Err(mayfly_ledger::TxError::StorageFull { .. }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
            Ok(mut tx) => {
                tx.put(format!("k{i:04}").as_bytes(), &value).unwrap();
                if let Ok(r) = tx.commit(Vec::new()) {
                    acked.push((i, r.seq));
                }
            }
        }
    }
    assert!(refused, "transactions are refused on the full disk");
    assert_eq!(ledger.store().data_snapshot().unwrap().len(), acked.len());
    verify_ok(&ledger);

    // Space returns (the filesystem is enlarged): within a few retries the ledger takes
    // writes again, records its start and the outage, and commits.
    let st = Command::new("mount")
        .args(["-o", "remount,size=32m"])
        .arg(outer.path())
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while ledger.capacity().unwrap().refusing.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "still refusing after space returned"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    put(&ledger, "after", b"space returned").unwrap();
    let events: Vec<String> = ledger
        .store()
        .audit_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| r.event.event)
        .collect();
    assert!(
        events.contains(&"ledger.storage_full".to_string()),
        "{events:?}"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("ledger.storage_full")
    );
    assert_eq!(
        ledger.store().data_snapshot().unwrap().len(),
        acked.len() + 1
    );
    verify_ok(&ledger);
}
