//! The group committer's statistics (`Ledger::group_stats`, exported on `GET /metrics`)
//! add up: every durable group is counted once, with the jobs it carried and its commit
//! time, and a group that storage refused is counted as failed.

use mayfly_ledger::{
    AuditEvent, CommitError, GroupStats, Histogram, Ledger, Options, Severity, StoreOptions,
};

mod common;
use common::{ctx, log};

/// A histogram is well formed: cumulative buckets never decrease and `+Inf` holds them all.
fn well_formed<const N: usize>(h: &Histogram<N>) {
    assert!(h.cumulative.windows(2).all(|w| w[0] <= w[1]), "{h:?}");
    assert!(h.count >= h.cumulative[N - 1], "{h:?}");
    assert!(h.bounds.windows(2).all(|w| w[0] < w[1]), "{h:?}");
}

/// `after - before`, bucket by bucket.
fn delta<const N: usize>(after: &Histogram<N>, before: &Histogram<N>) -> ([u64; N], u64, u64) {
    let mut d = [0; N];
    for (i, slot) in d.iter_mut().enumerate() {
        *slot = after.cumulative[i] - before.cumulative[i];
    }
    (d, after.count - before.count, after.sum - before.sum)
}

#[test]
fn groups_jobs_and_commit_times_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), &Options::default(), &log()).unwrap();
    let s0: GroupStats = ledger.group_stats();
    // Opening committed its start record: one group of one job.
    assert_eq!(s0.jobs.count, 1, "{s0:?}");
    assert_eq!(s0.jobs.sum, 1, "{s0:?}");
    assert_eq!(s0.commit_ns.count, 1, "{s0:?}");
    assert_eq!(s0.failed, 0);
    let g0 = ledger.tips().group;

    // Ten commits one after the other: ten groups of one job each.
    for i in 0..10u32 {
        let mut tx = ledger.begin(ctx()).unwrap();
        tx.put(format!("seq/{i}").as_bytes(), b"v").unwrap();
        tx.commit(Vec::new()).unwrap();
    }
    let s1 = ledger.group_stats();
    let (jobs, groups, sum) = delta(&s1.jobs, &s0.jobs);
    assert_eq!(groups, 10, "{s1:?}");
    assert_eq!(sum, 10, "{s1:?}");
    assert_eq!(
        jobs, [10; 8],
        "every one of them is a group of 1 job: {s1:?}"
    );
    assert_eq!(s1.commit_ns.count - s0.commit_ns.count, 10);
    assert!(s1.commit_ns.sum > s0.commit_ns.sum, "an fsync takes time");
    assert_eq!(ledger.tips().group - g0, 10);

    // 300 transactions and 20 audit batches kept in flight at once: the committer groups
    // them; whatever the grouping, the groups are the ledger's groups and the jobs are all
    // there.
    let mut tickets = Vec::new();
    for i in 0..300u32 {
        let mut tx = ledger.begin(ctx()).unwrap();
        tx.put(format!("burst/{i}").as_bytes(), b"v").unwrap();
        tickets.push(tx.submit(Vec::new(), Vec::new()).unwrap());
        if i % 15 == 0 {
            let ev = AuditEvent::new("test.note", Severity::Info).field("i", i);
            tickets.push(ledger.submit_audit(vec![ev]).unwrap());
        }
    }
    assert_eq!(tickets.len(), 320);
    let mut distinct: Vec<u64> = tickets
        .into_iter()
        .map(|t| t.wait().unwrap().group)
        .collect();
    let s2 = ledger.group_stats();
    well_formed(&s2.jobs);
    well_formed(&s2.commit_ns);
    let (_, groups, sum) = delta(&s2.jobs, &s1.jobs);
    assert_eq!(sum, 320, "jobs counted == jobs submitted: {s2:?}");
    assert_eq!(groups, ledger.tips().group - g0 - 10, "{s2:?}");
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(groups, distinct.len() as u64, "one count per durable group");
    assert!(groups <= 320);
    // Sum of the bucket counts (the last bound, then the overflow) == groups committed.
    assert_eq!(s2.jobs.count, s0.jobs.count + 10 + groups);
    assert_eq!(s2.commit_ns.count, s2.jobs.count);
    assert_eq!(s2.failed, 0);
}

#[test]
fn a_group_storage_refuses_is_counted_as_failed_not_as_committed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        store: StoreOptions {
            map_size: 16 << 20,
            max_map_size: 24 << 20,
            ..StoreOptions::default()
        },
        ..Options::default()
    };
    let ledger = Ledger::open(dir.path(), &opts, &log()).unwrap();
    let value = vec![0x5a; 60 << 10];
    let mut committed = 0u64;
    let mut failure = None;
    for i in 0..1024 {
        let mut tx = ledger.begin(ctx()).unwrap();
        tx.put(format!("big/{i:04}").as_bytes(), &value).unwrap();
        match tx.commit(Vec::new()) {
            Ok(_) => committed += 1,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("the bound was never reached");
    assert!(matches!(e, CommitError::MapFull { .. }), "{e}");
    let s = ledger.group_stats();
    assert!(s.failed >= 1, "{s:?}");
    // The start record and the acknowledged commits; the refused group is not among them
    // (later groups may be the committer retrying its storage-full alert).
    assert!(s.jobs.count > committed, "{s:?}");
    assert!(s.jobs.sum > committed, "{s:?}");
    well_formed(&s.jobs);
    well_formed(&s.commit_ns);
}
