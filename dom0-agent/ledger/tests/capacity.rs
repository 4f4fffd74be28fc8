//! The LMDB map grows on demand, under load and with transactions open in other threads,
//! up to the configured bound, without a restart; past the bound a commit fails cleanly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mayfly_ledger::{verify, CommitError, Ledger, Options, StoreOptions};

mod common;
use common::{ctx, log};

fn opts(initial_mib: usize, max_mib: usize) -> Options {
    Options {
        store: StoreOptions {
            map_size: initial_mib << 20,
            max_map_size: max_mib << 20,
            ..StoreOptions::default()
        },
        ..Options::default()
    }
}

#[test]
fn the_map_grows_under_load_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), &opts(16, 512), &log()).unwrap();
    let (initial, _) = ledger.store().map_usage().unwrap();
    assert_eq!(initial, 16 << 20);

    // Readers keep transactions open (and commit small ones) all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let ledger = ledger.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = ledger.begin(ctx()).unwrap();
                    let _ = tx.get(b"big/0000").unwrap();
                    tx.put(format!("small/{t}").as_bytes(), b"x").unwrap();
                    match tx.commit(Vec::new()) {
                        Ok(_) => n += 1,
                        Err(e) if e.is_conflict() => {}
                        Err(e) => panic!("a small commit failed while the map grew: {e}"),
                    }
                }
                n
            })
        })
        .collect();

    // ~48 MiB of 48 KiB values: three times the initial map.
    let value = vec![0x5a; 48 << 10];
    for i in 0..1024 {
        let mut tx = ledger.begin(ctx()).unwrap();
        tx.put(format!("big/{i:04}").as_bytes(), &value).unwrap();
        tx.commit(Vec::new())
            .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    let small: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(small > 0);

    let (map, used) = ledger.store().map_usage().unwrap();
    assert!(used > 48 << 20, "used {used}");
    assert!(map > initial && map <= 512 << 20, "map {map}");
    let grown = ledger
        .store()
        .audit_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|r| r.event.event == "ledger.map_grown")
        .count();
    assert!(grown >= 1, "no ledger.map_grown audit record");
    let report = verify(ledger.store(), &[ledger.public_key()], &mut |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.failures);
}

#[test]
fn past_the_bound_a_commit_fails_cleanly_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let log = log();
    let ledger = Ledger::open(dir.path(), &opts(16, 24), &log).unwrap();
    let value = vec![0x5a; 60 << 10];
    let mut acked = Vec::new();
    let mut failed = None;
    for i in 0..1024 {
        let mut tx = ledger.begin(ctx()).unwrap();
        tx.put(format!("big/{i:04}").as_bytes(), &value).unwrap();
        match tx.commit(Vec::new()) {
            Ok(r) => acked.push((i, r.seq)),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("the bound was never reached");
    assert!(matches!(e, CommitError::MapFull { .. }), "{e}");
    assert!(e.to_string().contains("map full"));
    let (map, _) = ledger.store().map_usage().unwrap();
    assert_eq!(map, 24 << 20, "grown to the bound, not past it");
    drop(ledger);
    let ledger = Ledger::open(dir.path(), &opts(16, 24), &log);
    // Reopening a full map may itself fail to record its start; the data is intact either way.
    drop(ledger);
    let store = mayfly_ledger::store::open_read_only(dir.path(), &StoreOptions::default()).unwrap();
    for (i, seq) in &acked {
        let cp = store.checkpoint(*seq).unwrap().unwrap();
        assert_eq!(cp.writes[0].key, format!("big/{i:04}").into_bytes());
    }
    let report = verify(&store, &[store.public_key().unwrap()], &mut |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.failures);
}

#[test]
fn crossing_80_90_and_95_percent_raises_one_alert_each() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed 16 MiB map: the share in use climbs as values are written.
    let ledger = Ledger::open(dir.path(), &opts(16, 16), &log()).unwrap();
    let value = vec![0x5a; 32 << 10];
    for i in 0..1024 {
        if ledger.capacity().unwrap().used_percent > 95.5 {
            break;
        }
        let mut tx = ledger.begin(ctx()).unwrap();
        tx.put(format!("big/{i:04}").as_bytes(), &value).unwrap();
        tx.commit(Vec::new()).unwrap();
    }
    let cap = ledger.capacity().unwrap();
    assert!(cap.used_percent > 95.0, "{cap:?}");
    assert!(cap.refusing.is_none(), "{cap:?}");
    // The last alert may be pending until the next group: one more small write.
    let _ = ledger.audit(vec![mayfly_ledger::AuditEvent::new(
        "test.probe",
        mayfly_ledger::Severity::Info,
    )]);
    let alerts: Vec<_> = ledger
        .store()
        .audit_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|r| r.event.event == "ledger.capacity")
        .map(|r| {
            (
                r.event.fields["threshold_percent"].clone(),
                r.event.severity,
            )
        })
        .collect();
    use mayfly_ledger::Severity::{Critical, Error, Warning};
    assert_eq!(
        alerts,
        [
            ("80".to_string(), Warning),
            ("90".to_string(), Error),
            ("95".to_string(), Critical)
        ],
        "one alert per threshold, in order"
    );
}
