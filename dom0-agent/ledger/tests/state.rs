//! The live-state digest against real LMDB files: every altered byte of a live key, value
//! or version in `data.mdb` is found by `verify` (naming the key) and refused at open;
//! stale page copies in LMDB's free list are not; added, deleted and swapped entries are
//! named; the skip flag and the audit trail of a refusal.
#![cfg(feature = "test-tamper")]

use std::fs;
use std::path::{Path, PathBuf};

use mayfly_ledger::store::{names, open_read_only};
use mayfly_ledger::{tamper, verify, Failure, Ledger, OpenError, Options, StoreOptions};

mod common;
use common::{ctx, log};

fn put(ledger: &Ledger, key: &str, value: Option<&str>) -> u64 {
    let mut tx = ledger.begin(ctx()).unwrap();
    match value {
        Some(v) => tx.put(key.as_bytes(), v.as_bytes()).unwrap(),
        None => tx.delete(key.as_bytes()).unwrap(),
    }
    tx.commit(b"ok".to_vec()).unwrap().seq
}

/// 16 keys `key/00..15` with distinct values; `key/03` overwritten after the others were
/// written (so stale copies of its page exist), `key/09` deleted (a tombstone), and a
/// rollback of an overwrite of `key/12` (a restoration the digest must follow).
fn pristine() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), &Options::default(), &log()).unwrap();
    for i in 0..16 {
        put(
            &ledger,
            &format!("key/{i:02}"),
            Some(&format!("value number {i:02} XYZ")),
        );
    }
    put(&ledger, "key/03", Some("value number 03 REWRITTEN"));
    for i in [4, 5, 6, 7] {
        put(
            &ledger,
            &format!("key/{i:02}"),
            Some(&format!("second value {i:02} QRS")),
        );
    }
    put(&ledger, "key/09", None);
    let bad = put(&ledger, "key/12", Some("attacker value"));
    ledger.rollback(&[bad], false, "test", [0; 32]).unwrap();
    drop(ledger);
    dir
}

fn copy_of(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let dst = tempfile::tempdir().unwrap();
    for f in ["data.mdb", "signing.key"] {
        fs::copy(src.join(f), dst.path().join(f)).unwrap();
    }
    let p = dst.path().to_path_buf();
    (dst, p)
}

fn flip(dir: &Path, offset: usize, mask: u8) {
    let path = dir.join("data.mdb");
    let mut bytes = fs::read(&path).unwrap();
    bytes[offset] ^= mask;
    fs::write(&path, bytes).unwrap();
}

/// Runs verify; returns the state failure's text (None: verify passed entirely).
fn verify_state(dir: &Path) -> Option<String> {
    let store = open_read_only(dir, &StoreOptions::default()).unwrap();
    let key = store.public_key().unwrap();
    let report = verify(&store, &[key], &mut |_| {}).unwrap();
    if report.ok() {
        assert!(
            report.state_entries.is_some(),
            "a v2 ledger's state is checked"
        );
        return None;
    }
    let state: Vec<_> = report
        .failures
        .iter()
        .filter_map(|f| match f {
            Failure::State { problem, .. } => Some(problem.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        state.len(),
        report.failures.len(),
        "only the live state may fail, got {:?}",
        report.failures
    );
    Some(state.concat())
}

fn open_err(dir: &Path) -> String {
    match Ledger::open(dir, &Options::default(), &log()) {
        Ok(_) => panic!("the ledger opened on altered live data"),
        Err(e @ OpenError::StateMismatch { .. }) => e.to_string(),
        Err(e) => panic!("expected a state mismatch, got: {e}"),
    }
}

#[test]
fn a_clean_ledger_verifies_and_reopens() {
    let dir = pristine();
    assert_eq!(verify_state(dir.path()), None);
    let ledger = Ledger::open(dir.path(), &Options::default(), &log()).unwrap();
    put(&ledger, "key/99", Some("after restart"));
    drop(ledger);
    assert_eq!(verify_state(dir.path()), None);
}

#[test]
fn every_changed_byte_of_a_live_key_version_or_value_is_named() {
    let dir = pristine();
    let original = fs::read(dir.path().join("data.mdb")).unwrap();
    let mut cases = 0;
    for key in ["key/03", "key/09", "key/12", "key/14"] {
        let (key_off, val_off, val_len) =
            tamper::live_entry_offsets(dir.path(), key.as_bytes()).unwrap();
        assert_eq!(&original[key_off..key_off + key.len()], key.as_bytes());
        let stored = tamper::get(dir.path(), names::DATA, key.as_bytes()).unwrap();
        assert_eq!(&original[val_off..val_off + val_len], &stored[..]);
        // Every byte of the key, of the tag and version, and of the value.
        let positions = (key_off..key_off + key.len())
            .map(|o| ("key", o))
            .chain((val_off..val_off + 9).map(|o| ("version", o)))
            .chain((val_off + 9..val_off + val_len).map(|o| ("value", o)));
        for (i, (what, offset)) in positions.enumerate() {
            let mask = [0x01, 0x80, 0xff, 0x20][i % 4];
            let (_keep, copy) = copy_of(dir.path());
            flip(&copy, offset, mask);
            let case = format!("{key}: {what} byte at file offset {offset} ^ {mask:#04x}");
            let found = verify_state(&copy).unwrap_or_else(|| panic!("{case}: verify passed"));
            assert!(
                found.contains(key),
                "{case}: verify does not name the key: {found}"
            );
            let refused = open_err(&copy);
            assert!(
                refused.contains(key),
                "{case}: open does not name the key: {refused}"
            );
            cases += 1;
        }
    }
    assert!(cases > 100, "only {cases} positions tried");
}

#[test]
fn stale_copies_in_free_pages_do_not_fail() {
    let dir = pristine();
    let original = fs::read(dir.path().join("data.mdb")).unwrap();
    let (_, live, len) = tamper::live_entry_offsets(dir.path(), b"key/05").unwrap();
    // key/05 was rewritten: the pages that held it before (its first value and the page
    // versions copied on write since) are stale. Find every copy of the entry's bytes and
    // of the first value's.
    let needles: [&[u8]; 2] = [&original[live..live + len], b"value number 05 XYZ"];
    let mut stale = Vec::new();
    for needle in needles {
        let mut from = 0;
        while let Some(pos) = original[from..]
            .windows(needle.len())
            .position(|w| w == needle)
        {
            let at = from + pos;
            if at != live && at + needle.len() <= original.len() {
                stale.push(at);
            }
            from = at + 1;
        }
    }
    let mut tried = 0;
    for at in stale {
        let (_keep, copy) = copy_of(dir.path());
        flip(&copy, at + 2, 0xff);
        let store = open_read_only(&copy, &StoreOptions::default()).unwrap();
        let key = store.public_key().unwrap();
        let report = verify(&store, &[key], &mut |_| {}).unwrap();
        drop(store);
        if report
            .failures
            .iter()
            .any(|f| matches!(f, Failure::Checkpoint { .. }))
        {
            // This copy is a checkpoint's after-image (covered by the chain and found as
            // such), not a free page.
            continue;
        }
        assert!(
            report.ok(),
            "altering a stale copy at {at} failed verify: {:?}",
            report.failures
        );
        Ledger::open(&copy, &Options::default(), &log())
            .unwrap_or_else(|e| panic!("altering a stale copy at {at} refused the start: {e}"));
        tried += 1;
    }
    eprintln!("stale copies altered: {tried}");
    assert!(tried > 0, "no stale copy of key/05 found to alter");
}

#[test]
fn added_deleted_and_swapped_entries_are_named() {
    let dir = pristine();
    let stored = |k: &str| tamper::get(dir.path(), names::DATA, k.as_bytes()).unwrap();

    // Added: a key no checkpoint wrote, with a plausible stored value.
    let (_a, added) = copy_of(dir.path());
    let mut v = vec![0x01];
    v.extend_from_slice(&5u64.to_be_bytes());
    v.extend_from_slice(b"free money");
    tamper::set(&added, names::DATA, b"key/77", Some(&v));
    let found = verify_state(&added).unwrap();
    assert!(found.contains("added: key/77"), "{found}");
    assert!(open_err(&added).contains("key/77"));

    // Deleted: a live key removed from `data`.
    let (_d, deleted) = copy_of(dir.path());
    tamper::set(&deleted, names::DATA, b"key/08", None);
    let found = verify_state(&deleted).unwrap();
    assert!(found.contains("missing: key/08"), "{found}");
    assert!(open_err(&deleted).contains("key/08"));

    // Swapped: two keys' stored values (versions included) exchanged.
    let (_s, swapped) = copy_of(dir.path());
    let (a, b) = (stored("key/10"), stored("key/11"));
    tamper::set(&swapped, names::DATA, b"key/10", Some(&b));
    tamper::set(&swapped, names::DATA, b"key/11", Some(&a));
    let found = verify_state(&swapped).unwrap();
    assert!(found.contains("altered: key/10, key/11"), "{found}");
    let refused = open_err(&swapped);
    assert!(refused.contains("key/10") && refused.contains("key/11"));

    // Values swapped but the versions kept: still found.
    let (_s2, swapped2) = copy_of(dir.path());
    let mut a2 = a[..9].to_vec();
    a2.extend_from_slice(&b[9..]);
    let mut b2 = b[..9].to_vec();
    b2.extend_from_slice(&a[9..]);
    tamper::set(&swapped2, names::DATA, b"key/10", Some(&a2));
    tamper::set(&swapped2, names::DATA, b"key/11", Some(&b2));
    assert!(verify_state(&swapped2)
        .unwrap()
        .contains("altered: key/10, key/11"));
}

#[test]
fn the_stored_digest_is_bound_to_the_signed_head() {
    let dir = pristine();
    // meta/state altered: it no longer matches the head that signs it.
    let (_a, altered) = copy_of(dir.path());
    let mut st = tamper::get(&altered, names::META, b"state").unwrap();
    st[100] ^= 1;
    tamper::set(&altered, names::META, b"state", Some(&st));
    match Ledger::open(&altered, &Options::default(), &log()) {
        Err(OpenError::Corrupt { reason, .. }) => {
            assert!(reason.contains("meta/state"), "{reason}")
        }
        other => panic!("expected corruption, got {:?}", other.map(|_| ())),
    }
    // meta/state removed: not mistaken for a ledger from before the digest.
    let (_r, removed) = copy_of(dir.path());
    tamper::set(&removed, names::META, b"state", None);
    match Ledger::open(&removed, &Options::default(), &log()) {
        Err(OpenError::Corrupt { reason, .. }) => {
            assert!(reason.contains("meta/state is gone"), "{reason}")
        }
        other => panic!("expected corruption, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn skipping_the_check_is_audited_and_a_refusal_is_audited_at_the_next_start() {
    let dir = pristine();
    let (_t, copy) = copy_of(dir.path());
    let clean = fs::read(copy.join("data.mdb")).unwrap();
    tamper::set(&copy, names::DATA, b"key/02", None);
    let tampered = fs::read(copy.join("data.mdb")).unwrap();

    // Refused, then the data is restored: the next start records the refusal.
    assert!(open_err(&copy).contains("key/02"));
    fs::write(copy.join("data.mdb"), &clean).unwrap();
    let ledger = Ledger::open(&copy, &Options::default(), &log()).unwrap();
    let tip = ledger.tips().audit.seq;
    let recs = ledger.store().audit_records(tip - 1, 2).unwrap();
    let events: Vec<_> = recs.iter().map(|r| r.event.event.as_str()).collect();
    assert_eq!(events, ["ledger.opened", "ledger.state_refused_earlier"]);
    let detail = &recs[1].event.fields;
    assert!(
        detail
            .iter()
            .any(|(k, v)| k == "detail" && v.contains("missing: key/02")),
        "{detail:?}"
    );
    drop(ledger);
    // Recorded once only.
    let ledger = Ledger::open(&copy, &Options::default(), &log()).unwrap();
    let last = ledger
        .store()
        .audit_records(ledger.tips().audit.seq, 1)
        .unwrap();
    assert_eq!(last[0].event.event, "ledger.opened");
    drop(ledger);

    // With the check skipped, the altered data is served, with a warning in the audit log.
    fs::write(copy.join("data.mdb"), &tampered).unwrap();
    let opts = Options {
        check_state: false,
        ..Options::default()
    };
    let ledger = Ledger::open(&copy, &opts, &log()).unwrap();
    let tip = ledger.tips().audit.seq;
    let recs = ledger.store().audit_records(tip - 1, 2).unwrap();
    assert_eq!(recs[0].event.event, "ledger.opened");
    assert!(recs[0]
        .event
        .fields
        .iter()
        .any(|(k, v)| k == "state_check" && v == "skipped"));
    assert_eq!(recs[1].event.event, "ledger.state_check_skipped");
}
