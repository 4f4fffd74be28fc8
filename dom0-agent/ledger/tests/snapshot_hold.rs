//! Long transactions give up their read snapshot (`Options::snapshot_hold`): LMDB can
//! reuse pages beside them, their next read re-checks what they read, a change dooms them.

use std::time::Duration;

use mayfly_ledger::{CommitError, Ledger, Options, TxError};

mod common;
use common::{ctx, log};

/// Long enough that no test transaction reaches it: the young fast path, and main's
/// behaviour before the hold existed.
const FOREVER: Duration = Duration::from_secs(3600);

fn open(dir: &std::path::Path, hold: Duration) -> Ledger {
    let opts = Options {
        snapshot_hold: hold,
        ..Options::default()
    };
    Ledger::open(dir, &opts, &log()).expect("open ledger")
}

fn put(ledger: &Ledger, kv: &[(&[u8], &[u8])]) {
    let mut tx = ledger.begin(ctx()).unwrap();
    for (k, v) in kv {
        tx.put(k, v).unwrap();
    }
    tx.commit(b"ok".to_vec()).unwrap();
}

/// Bytes of the data file in use (LMDB's last page number) grown over `groups` commits
/// that each rewrite four 8 KiB values, while one transaction that has read a key stays
/// open (`None`: no transaction open).
fn growth_beside_open_transaction(hold: Option<Duration>, groups: usize) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), hold.unwrap_or(FOREVER));
    let value = vec![0x5a; 8 << 10];
    let keys: Vec<Vec<u8>> = (0..4u8).map(|i| vec![b'k', i]).collect();
    let kv: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (&k[..], &value[..])).collect();
    put(&ledger, &kv);
    put(&ledger, &kv);

    let long = hold.map(|_| {
        let mut long = ledger.begin(ctx()).unwrap();
        assert_eq!(long.get(b"other").unwrap(), None);
        long
    });
    let (_, before) = ledger.store().map_usage().unwrap();
    for _ in 0..groups {
        put(&ledger, &kv);
    }
    let (_, after) = ledger.store().map_usage().unwrap();
    drop(long);
    after.saturating_sub(before)
}

#[test]
fn a_long_transaction_does_not_stop_page_reuse() {
    const GROUPS: usize = 200;
    // The checkpoints (with the values written) are history and grow the file anyway; the
    // data pages each group frees must be reused. Each group rewrites 4 x 8 KiB of
    // overflow pages (plus tree pages): 6.4 MiB more over the run if none of the pages
    // freed beside the open transaction can be reused.
    let alone = growth_beside_open_transaction(None, GROUPS);
    let pinned = growth_beside_open_transaction(Some(FOREVER), GROUPS);
    assert!(
        pinned > alone + (6 << 20),
        "control: a held snapshot pins the freed pages ({pinned} bytes grown, {alone} alone)"
    );
    let released = growth_beside_open_transaction(Some(Duration::ZERO), GROUPS);
    assert!(
        released < alone + (1 << 20),
        "a transaction past its hold must not pin pages: {released} bytes grown \
         ({alone} with no transaction open, {pinned} with the snapshot held)"
    );
}

#[test]
fn a_read_changed_while_released_dooms_the_next_operation() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), Duration::ZERO);
    put(&ledger, &[(b"a", b"1"), (b"b", b"1")]);

    let mut tx = ledger.begin(ctx()).unwrap();
    assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    put(&ledger, &[(b"a", b"2")]);

    let err = tx.get(b"b").unwrap_err();
    assert!(
        matches!(&err, TxError::Conflict(CommitError::Conflict { key, .. }) if key == "61"),
        "{err:?}"
    );
    assert!(tx.is_doomed());
    // Every later operation fails the same way, writes included, and so does the commit.
    assert!(matches!(tx.put(b"c", b"1"), Err(TxError::Conflict(_))));
    assert!(matches!(tx.scan(b"a", None, 10), Err(TxError::Conflict(_))));
    let err = tx.commit(b"r".to_vec()).unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
}

#[test]
fn unchanged_reads_survive_a_fresh_snapshot_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), Duration::ZERO);
    put(&ledger, &[(b"a", b"1")]);

    let mut tx = ledger.begin(ctx()).unwrap();
    assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    // Nothing committed: the next snapshot is the same state.
    assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    // A commit that touches nothing it read: the fresh snapshot shows it, consistently
    // with everything read before.
    put(&ledger, &[(b"c", b"3")]);
    assert_eq!(tx.get(b"c").unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(
        tx.snapshots_taken(),
        3,
        "one snapshot per operation past the hold"
    );
    assert!(!tx.is_doomed());
    tx.put(b"a", b"2").unwrap();
    tx.commit(b"r".to_vec()).unwrap();

    let mut check = ledger.begin(ctx()).unwrap();
    assert_eq!(check.get(b"a").unwrap().as_deref(), Some(&b"2"[..]));
}

#[test]
fn a_young_transaction_reads_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), FOREVER);
    put(&ledger, &[(b"a", b"1")]);

    let mut tx = ledger.begin(ctx()).unwrap();
    assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    put(&ledger, &[(b"a", b"2"), (b"c", b"3")]);
    // Still the first snapshot: neither commit is seen, nothing is doomed yet.
    assert_eq!(tx.get(b"c").unwrap(), None);
    assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(tx.scan(b"a", None, 10).unwrap().entries.len(), 1);
    assert_eq!(tx.snapshots_taken(), 1);
    assert!(!tx.is_doomed());
    // The committer's check still refuses it.
    let err = tx.commit(b"r".to_vec()).unwrap_err();
    assert!(matches!(err, CommitError::Conflict { .. }), "{err:?}");
}

#[test]
fn the_default_hold_keeps_an_honest_transaction_on_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), mayfly_ledger::DEFAULT_SNAPSHOT_HOLD);
    put(&ledger, &[(b"a", b"1")]);
    let mut tx = ledger.begin(ctx()).unwrap();
    let started = std::time::Instant::now();
    tx.get(b"a").unwrap();
    tx.put(b"a", b"2").unwrap();
    tx.get(b"b").unwrap();
    // Only meaningful if the three operations ran within the hold (they take microseconds;
    // a machine that stalled this thread for 50 ms proves nothing either way).
    if started.elapsed() < mayfly_ledger::DEFAULT_SNAPSHOT_HOLD {
        assert_eq!(tx.snapshots_taken(), 1);
    }
    tx.commit(b"r".to_vec()).unwrap();
}

#[test]
fn a_scanned_range_is_rechecked_at_the_next_operation() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), Duration::ZERO);
    put(&ledger, &[(b"a1", b"1"), (b"a5", b"5")]);

    let mut tx = ledger.begin(ctx()).unwrap();
    let seen = tx.scan(b"a", Some(b"b"), 10).unwrap();
    assert_eq!(seen.entries.len(), 2);
    // An insert into the scanned range, by a key the transaction never read itself.
    put(&ledger, &[(b"a3", b"3")]);
    let err = tx.get(b"z").unwrap_err();
    assert!(
        matches!(&err, TxError::Conflict(CommitError::ScanConflict { .. })),
        "{err:?}"
    );

    // An insert outside the range leaves a second transaction's scan valid.
    let mut tx = ledger.begin(ctx()).unwrap();
    tx.scan(b"a", Some(b"b"), 10).unwrap();
    put(&ledger, &[(b"c", b"3")]);
    assert_eq!(tx.get(b"c").unwrap().as_deref(), Some(&b"3"[..]));
    tx.commit(b"r".to_vec()).unwrap();
}

#[test]
fn an_idle_transaction_gives_its_snapshot_up_when_told_it_is_due() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), Duration::ZERO);
    put(&ledger, &[(b"a", b"1")]);
    let mut tx = ledger.begin(ctx()).unwrap();
    assert!(
        tx.snapshot_due().is_some(),
        "holds the snapshot taken at begin"
    );
    tx.release_snapshot_if_old();
    assert_eq!(tx.snapshot_due(), None);
    // It had read nothing: the fresh snapshot shows what was committed meanwhile.
    put(&ledger, &[(b"a", b"2")]);
    assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"2"[..]));
    tx.commit(b"r".to_vec()).unwrap();

    // A young transaction keeps it.
    let ledger_young = open(&dir.path().join("young"), FOREVER);
    let mut young = ledger_young.begin(ctx()).unwrap();
    young.release_snapshot_if_old();
    assert!(young.snapshot_due().is_some());
}

#[test]
fn a_released_transaction_does_not_hold_a_reader_slot() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        snapshot_hold: Duration::ZERO,
        store: mayfly_ledger::StoreOptions {
            max_readers: 4,
            ..mayfly_ledger::StoreOptions::default()
        },
        ..Options::default()
    };
    let ledger = Ledger::open(dir.path(), &opts, &log()).unwrap();
    put(&ledger, &[(b"a", b"1")]);
    // Many more open transactions than reader slots: each gives its slot back after its
    // operation, or idle when told it is due.
    let mut open: Vec<_> = (0..16)
        .map(|i| {
            let mut tx = ledger.begin(ctx()).unwrap();
            if i % 2 == 0 {
                tx.get(b"a").unwrap();
            } else {
                tx.release_snapshot_if_old();
            }
            tx
        })
        .collect();
    for tx in &mut open {
        assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    }
}

#[test]
fn re_checks_are_bounded_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), Duration::ZERO);
    let keys: Vec<Vec<u8>> = (0..1024u32)
        .map(|i| format!("k{i:04}").into_bytes())
        .collect();
    let kv: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (&k[..], &b"v"[..])).collect();
    put(&ledger, &kv);

    // A large read set, read while nothing commits: no re-check yet.
    let mut tx = ledger.begin(ctx()).unwrap();
    for k in &keys {
        assert!(tx.get(k).unwrap().is_some());
    }
    // Then one commit beside it before each further read: each read re-checks the whole
    // set (1,025 entries with the absent key), until the bound (16 x 4,096) is spent.
    let mut reads_allowed = 0;
    let refused = loop {
        assert!(reads_allowed < 200, "re-checks were never bounded");
        put(&ledger, &[(b"other", b"x")]);
        match tx.get(b"absent") {
            Ok(None) => reads_allowed += 1,
            Err(e) => break e,
            Ok(Some(_)) => panic!("absent key has a value"),
        }
    };
    assert!(
        matches!(refused, TxError::TooManyRechecks { max } if max == 16 * 4096),
        "{refused:?}"
    );
    assert_eq!(
        reads_allowed,
        16 * 4096 / 1025,
        "re-checks before the bound"
    );
    // The refusal is not a conflict: nothing it read changed.
    assert!(!tx.is_doomed());
}
