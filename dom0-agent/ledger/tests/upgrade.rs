//! A ledger written by the release before the live-state digest (version-1 heads, no
//! `meta/state`; `tests/fixtures/ledger-before-state-digest`, made by commit 7228ae0) opens
//! with this build, gets its first digest computed once, keeps its data, and verifies with
//! the live state checked from then on.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use mayfly_ledger::store::open_read_only;
use mayfly_ledger::{verify, Ledger, Options, StoreOptions, TxContext, TxId};

mod common;
use common::log;

fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ledger-before-state-digest");
    let dst = tempfile::tempdir().unwrap();
    for f in ["data.mdb", "signing.key"] {
        fs::copy(src.join(f), dst.path().join(f)).unwrap();
    }
    fs::set_permissions(
        dst.path().join("signing.key"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let p = dst.path().to_path_buf();
    (dst, p)
}

fn verify_dir(dir: &Path) -> mayfly_ledger::VerifyReport {
    let store = open_read_only(dir, &StoreOptions::default()).unwrap();
    let key = store.public_key().unwrap();
    verify(&store, &[key], &mut |_| {}).unwrap()
}

fn opened_fields(ledger: &Ledger) -> std::collections::BTreeMap<String, String> {
    let tip = ledger.tips().audit.seq;
    let rec = ledger.store().audit_records(tip, 1).unwrap().remove(0);
    assert_eq!(rec.event.event, "ledger.opened");
    rec.event.fields
}

#[test]
fn a_ledger_of_the_previous_release_upgrades_once_and_verifies() {
    let (_keep, dir) = fixture_copy();
    // As written: it verifies, without a state commitment.
    let before = verify_dir(&dir);
    assert!(before.ok(), "{:?}", before.failures);
    assert_eq!(before.checkpoints, 23);
    assert_eq!(before.state_entries, None);

    let ledger = Ledger::open(&dir, &Options::default(), &log()).unwrap();
    let f = opened_fields(&ledger);
    assert_eq!(f["state_check"], "created", "{f:?}");
    assert_eq!(f["state_entries"], "20");
    assert!(f["state_check_ms"].parse::<u64>().is_ok());
    // The data the old release committed is there.
    let mut tx = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: b"r".to_vec(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    assert_eq!(tx.get(b"kv/k3").unwrap().as_deref(), Some(&b"value-3"[..]));
    assert_eq!(tx.get(b"kv/k5").unwrap(), None);
    assert_eq!(
        tx.get(b"kv/k19").unwrap().as_deref(),
        Some(&b"value-19"[..])
    );
    tx.put(b"kv/new", b"after the upgrade").unwrap();
    tx.commit(b"ok".to_vec()).unwrap();
    drop(ledger);

    let after = verify_dir(&dir);
    assert!(after.ok(), "{:?}", after.failures);
    assert_eq!(after.state_entries, Some(21));

    // Computed once: the next start checks against the stored digest.
    let ledger = Ledger::open(&dir, &Options::default(), &log()).unwrap();
    assert_eq!(opened_fields(&ledger)["state_check"], "ok");
    drop(ledger);

    // And from now on, altered live data of the old release is refused.
    #[cfg(feature = "test-tamper")]
    {
        use mayfly_ledger::{store::names, tamper, OpenError};
        let mut v = tamper::get(&dir, names::DATA, b"kv/k7").unwrap();
        *v.last_mut().unwrap() ^= 1;
        tamper::set(&dir, names::DATA, b"kv/k7", Some(&v));
        match Ledger::open(&dir, &Options::default(), &log()) {
            Err(OpenError::StateMismatch { detail, .. }) => {
                assert!(detail.contains("altered: kv/k7"), "{detail}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    }
}

/// A ledger of the release before the epoch (version-2 heads;
/// `tests/fixtures/ledger-before-epoch`, made by commit b69a21e) opens with this build,
/// writes version-3 heads of epoch 0 from then on, verifies across the change of version,
/// and replicates to a standby group by group (its version-2 heads included).
#[test]
fn a_ledger_with_version_2_heads_upgrades_to_the_epoch_and_replicates() {
    use mayfly_ledger::head::{VERSION, VERSION_3};
    use mayfly_ledger::{Replica, SignedHead};

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ledger-before-epoch");
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().to_path_buf();
    for f in ["data.mdb", "signing.key"] {
        fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    fs::set_permissions(dir.join("signing.key"), fs::Permissions::from_mode(0o600)).unwrap();
    let before = verify_dir(&dir);
    assert!(before.ok(), "{:?}", before.failures);
    assert_eq!((before.checkpoints, before.heads), (23, 25));

    let ledger = Ledger::open(&dir, &Options::default(), &log()).unwrap();
    assert_eq!(opened_fields(&ledger)["state_check"], "ok");
    let head = |g: u64| SignedHead::decode(&ledger.store().export_group(g).unwrap().head).unwrap();
    assert_eq!(head(25).version(), VERSION);
    // The start itself committed a group: version 3, epoch 0.
    let first_new = head(26);
    assert_eq!((first_new.version(), first_new.epoch()), (VERSION_3, 0));
    let mut tx = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: b"r".to_vec(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    tx.put(b"kv/new", b"after the upgrade").unwrap();
    tx.commit(b"ok".to_vec()).unwrap();
    assert_eq!(ledger.tips().epoch, 0);

    let standby_dir = tempfile::tempdir().unwrap();
    let mut standby = Replica::open(
        standby_dir.path(),
        &StoreOptions::default(),
        ledger.public_key(),
    )
    .unwrap();
    for g in 1..=ledger.tips().group {
        standby
            .apply(&ledger.store().export_group(g).unwrap())
            .unwrap_or_else(|e| panic!("group {g}: {e}"));
    }
    let key = ledger.public_key();
    let on_standby = verify(standby.store(), &[key], &mut |_| {}).unwrap();
    assert!(on_standby.ok(), "{:?}", on_standby.failures);
    assert_eq!(on_standby.state_entries, Some(21));
    drop(ledger);
    let after = verify_dir(&dir);
    assert!(after.ok(), "{:?}", after.failures);
    assert_eq!(after.heads, on_standby.heads);
}
