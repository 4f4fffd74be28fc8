//! The exporter on a replication primary, against a real rsyslog: nothing past what the
//! standby holds goes out; it goes out once the standby's tip moves; a record that waited
//! `unreplicated_hold_ms` goes out anyway, marked `unreplicated="true"`, after
//! `siem.export_unreplicated` is durable in the chain; `siem.unreplicated_ended` once the
//! standby holds what went out ahead, and records wait for it again (docs/siem.md
//! "Replication").

#![allow(missing_docs, clippy::indexing_slicing)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_ledger::{AuditEvent, AuditRecord, Ledger, Options, Severity};
use mayfly_siem::{CollectorConfig, Exporter, ReplicatedTip, SiemConfig, TransportKind};
use slog::{o, Logger};
use support::{seq_of, unreplicated as marked, wait_until, Input, Rsyslog};

/// The standby's tip as a test sets it.
struct Standby(AtomicU64);

impl ReplicatedTip for Standby {
    fn replicated_audit_seq(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    /// Longer than an audit field holds (1,024 bytes), with multi-byte characters: the
    /// exporter cuts it, or the ledger would refuse the record and the episode never begin.
    fn describe(&self) -> String {
        format!(
            "test standby at {}; {}",
            self.0.load(Ordering::SeqCst),
            "lost ✓ ".repeat(200)
        )
    }
}

const HOLD_MS: u64 = 1500;

fn records(ledger: &Ledger) -> Vec<AuditRecord> {
    ledger.store().audit_records(1, usize::MAX).unwrap()
}

fn produce(ledger: &Ledger, n: usize, phase: &str) -> u64 {
    let events = (0..n)
        .map(|i| {
            AuditEvent::new("tx.committed", Severity::Info)
                .field("phase", phase)
                .field("i", i)
        })
        .collect();
    ledger.audit(events).unwrap();
    ledger.tips().audit.seq
}

/// Checks, for `limit`, that the collector's highest sequence stays at `at` while the
/// exporter reports itself held there: it has sent exactly `at` and sees the tip above.
fn stays_held(exporter: &Exporter, collector: &Rsyslog, at: u64, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        let s = &exporter.status()[0];
        assert_eq!(s.sent_seq, at, "{s:#?}");
        assert!(s.head_seq > at, "{s:#?}");
        let got = collector.received(Input::Tcp);
        assert!(
            got.iter().all(|m| seq_of(m) <= at),
            "a record past the standby's tip {at} reached the collector"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn records_wait_for_the_standby_and_go_out_marked_after_the_hold() {
    let root = tempfile::tempdir().unwrap();
    let collector = Rsyslog::start(&root.path().join("rsyslog"), &[Input::Tcp], None);
    let ledger = Ledger::open(
        &root.path().join("ledger"),
        &Options::default(),
        &Logger::root(slog::Discard, o!()),
    )
    .unwrap();
    let replicated = produce(&ledger, 10, "replicated");
    let standby = Arc::new(Standby(AtomicU64::new(replicated)));
    let config = SiemConfig {
        confirm_ms: 100,
        backoff_min_ms: 20,
        backoff_max_ms: 200,
        cursor_flush_ms: 100,
        unreplicated_hold_ms: HOLD_MS,
        collectors: vec![CollectorConfig::new(
            "tcp",
            TransportKind::Tcp,
            &collector.address(Input::Tcp),
        )],
        ..SiemConfig::default()
    };
    let exporter = Exporter::start_replicated(
        &ledger,
        &config,
        standby.clone(),
        &slog::Logger::root(slog::Discard, o!()),
    )
    .unwrap();

    // 1. Records past the standby's tip are not sent (for well under the hold).
    let tip = produce(&ledger, 5, "unreplicated");
    assert!(wait_until(Duration::from_secs(20), || exporter.status()[0]
        .delivered_seq
        == replicated));
    assert_eq!(exporter.status()[0].replicated_seq, Some(replicated));
    stays_held(
        &exporter,
        &collector,
        replicated,
        Duration::from_millis(600),
    );

    // 2. The standby's tip moves: they go out, unmarked.
    standby.0.store(tip, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(20), || exporter.status()[0]
        .delivered_seq
        == tip));
    let got = collector.received(Input::Tcp);
    assert!(
        got.iter().all(|m| !marked(m)),
        "a replicated record was marked"
    );

    // 3. The standby stops acknowledging: the new records wait the hold, then go out
    //    anyway, marked, after siem.export_unreplicated is in the chain.
    let appended = Instant::now();
    let ahead_tip = produce(&ledger, 5, "ahead");
    assert!(wait_until(Duration::from_secs(20), || collector
        .received(Input::Tcp)
        .iter()
        .any(|m| seq_of(m) > tip)));
    let waited = appended.elapsed();
    assert!(
        waited >= Duration::from_millis(HOLD_MS),
        "a record went out ahead of the standby after {waited:?}, before the hold"
    );
    let recs = records(&ledger);
    let notice = recs
        .iter()
        .find(|r| r.event.event == "siem.export_unreplicated")
        .expect("siem.export_unreplicated recorded");
    let field = |r: &AuditRecord, k: &str| {
        r.event
            .fields
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(notice.event.severity, Severity::Warning);
    assert_eq!(field(notice, "collector"), "tcp");
    assert_eq!(field(notice, "from"), (tip + 1).to_string());
    assert_eq!(field(notice, "replicated_seq"), tip.to_string());
    let standby_field = field(notice, "standby");
    assert!(standby_field.len() <= 1024 && standby_field.len() > 1000);
    assert!(
        standby.describe().starts_with(&standby_field),
        "{standby_field}"
    );
    assert!(standby_field.starts_with(&format!("test standby at {tip};")));
    assert!(notice.seq > ahead_tip);
    // Everything up to the notice goes out; past the standby's tip, marked.
    assert!(wait_until(Duration::from_secs(20), || exporter.status()[0]
        .delivered_seq
        >= notice.seq));
    assert_eq!(exporter.status()[0].unreplicated_from, Some(tip + 1));
    let got = collector.received(Input::Tcp);
    for m in &got {
        assert_eq!(marked(m), seq_of(m) > tip, "seq {}", seq_of(m));
    }
    // Once per episode: more records go out at once, no second notice.
    let more = produce(&ledger, 3, "still ahead");
    assert!(wait_until(Duration::from_secs(5), || exporter.status()[0]
        .delivered_seq
        == more));
    let count = |ev: &str| {
        records(&ledger)
            .iter()
            .filter(|r| r.event.event == ev)
            .count()
    };
    assert_eq!(count("siem.export_unreplicated"), 1);

    // 4. The standby holds the first record sent ahead: the episode ends (recorded) and
    //    records wait for it again.
    standby.0.store(tip + 1, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(20), || count(
        "siem.unreplicated_ended"
    ) == 1));
    let ended = records(&ledger)
        .into_iter()
        .find(|r| r.event.event == "siem.unreplicated_ended")
        .unwrap();
    assert_eq!(field(&ended, "sent_ahead"), format!("{}..={more}", tip + 1));
    assert_eq!(exporter.status()[0].unreplicated_from, None);
    let sent = exporter.status()[0].sent_seq;
    assert_eq!(sent, more, "{:#?}", exporter.status());
    stays_held(&exporter, &collector, sent, Duration::from_millis(600));
    let last = ledger.tips().audit.seq;
    standby.0.store(last, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(20), || exporter.status()[0]
        .delivered_seq
        == last));
    let got = collector.received(Input::Tcp);
    for m in got.iter().filter(|m| seq_of(m) > more) {
        assert!(!marked(m), "seq {} marked after the episode", seq_of(m));
    }
    exporter.stop();
}
