//! SIEM export throughput to a real rsyslog, over TCP and TLS, against baselines measured
//! in the same run; and what a running exporter costs the transaction path.
//!
//! Throughput (records/s), for `BENCH_EVENTS` audit records already in the ledger:
//!
//! * `encode`     — read the records from the ledger and encode them as RFC 5424 messages,
//!   no I/O: the exporter's CPU work alone.
//! * `raw-tcp`    — the same messages, pre-encoded and octet-counted, written in batches of
//!   256 with `write_all` on a plain `TcpStream` to the same rsyslog: what the collector
//!   and the socket allow.
//! * `export-tcp` — the exporter from cursor 0 until it has written (and flushed) the last
//!   record (delivery confirmation follows `confirm_ms` later and is not counted).
//! * `raw-tls`, `export-tls` — the same over TLS (rustls, ring provider, to rsyslog's gtls
//!   driver); `raw-tls` writes the pre-encoded batches through the crate's own connection.
//! * `export-tcp-ceiling` — `export-tcp` on a replication primary whose standby holds the
//!   whole chain ([`Exporter::start_replicated`]; the ceiling read under a mutex, as the
//!   agent's is): what the ceiling costs when nothing waits.
//!
//! rsyslog parses every message (RFC 5424 parser) and then discards it, so the collector
//! side costs the same in every configuration.
//!
//! Transaction path (commits/s): one thread keeps 256 ledger transactions in flight (one
//! put, two audit events each, as a committed transaction records) for `BENCH_SECS`, with
//! no exporter, then with a TCP and a TLS collector exporting concurrently.
//!
//! Repeated `BENCH_REPS` times, interleaved; medians reported.
//!
//! Run: `cargo bench -p mayfly-siem --bench export` (env `BENCH_EVENTS`, `BENCH_SECS`,
//! `BENCH_REPS`). `cargo test --benches` runs one short smoke pass instead.

#![allow(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mayfly_ledger::{AuditEvent, Ledger, Options, Severity, TxContext, TxId};
use mayfly_siem::rfc5424::{self, Envelope};
use mayfly_siem::transport::{octet_count, Connection};
use mayfly_siem::{CollectorConfig, Exporter, ReplicatedTip, SiemConfig, TransportKind};
use slog::{o, Discard, Logger};
use support::{Input, Pki, Rsyslog};

fn log() -> Logger {
    Logger::root(Discard, o!())
}

fn envelope() -> Envelope {
    Envelope {
        facility: 16,
        hostname: "mayfly-bench".into(),
        app_name: "mayfly".into(),
        procid: std::process::id().to_string(),
        pen: 32473,
        max_bytes: 8192,
    }
}

/// Audit records like the agent writes per transaction.
fn fill(ledger: &Ledger, n: usize) {
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let tx = format!("{:032x}", i as u128 * 7919);
        let ev = match i % 3 {
            0 => AuditEvent::new("domain.started", Severity::Info)
                .field("backend", "sandbox")
                .field("domain", i)
                .field("tx_id", &tx)
                .field("handler", "transfer")
                .field("client", "127.0.0.1")
                .field("attempt", 1),
            1 => AuditEvent::new("tx.committed", Severity::Info)
                .field("tx_id", &tx)
                .field("handler", "transfer"),
            _ => AuditEvent::new("domain.destroyed", Severity::Info)
                .field("domain", i)
                .field("tx_id", &tx)
                .field("exit", "exited(0)"),
        };
        batch.push(ev);
        if batch.len() == 1000 {
            ledger.audit(std::mem::take(&mut batch)).unwrap();
        }
    }
    if !batch.is_empty() {
        ledger.audit(batch).unwrap();
    }
}

fn encode_all(ledger: &Ledger) -> Vec<String> {
    let env = envelope();
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let recs = ledger.store().audit_records_with_hash(from, 256).unwrap();
        let Some((last, _)) = recs.last() else { break };
        from = last.seq + 1;
        for (r, hash) in &recs {
            out.push(rfc5424::encode(r, hash, &env));
        }
    }
    out
}

fn raw_tcp(address: &str, messages: &[String]) -> Duration {
    let mut s = TcpStream::connect(address).unwrap();
    s.set_nodelay(true).unwrap();
    let mut frames = Vec::new();
    let t = Instant::now();
    for chunk in messages.chunks(256) {
        octet_count(chunk, &mut frames);
        s.write_all(&frames).unwrap();
        s.flush().unwrap();
    }
    t.elapsed()
}

fn raw_tls(collector: &CollectorConfig, messages: &[String]) -> Duration {
    let config = mayfly_siem::tls::client_config(collector).unwrap();
    let mut c = Connection::open(collector, Some(&config)).unwrap();
    let mut frames = Vec::new();
    let t = Instant::now();
    for chunk in messages.chunks(256) {
        c.send(chunk, &mut frames).unwrap();
    }
    t.elapsed()
}

fn siem_config(collectors: Vec<CollectorConfig>) -> SiemConfig {
    SiemConfig {
        hostname: Some("mayfly-bench".into()),
        collectors,
        ..SiemConfig::default()
    }
}

/// A standby that holds the whole chain.
struct CaughtUp(std::sync::Mutex<u64>);

impl ReplicatedTip for CaughtUp {
    fn replicated_audit_seq(&self) -> u64 {
        *self.0.lock().unwrap()
    }
    fn describe(&self) -> String {
        "caught up".into()
    }
}

/// Time for a fresh collector (cursor 0) to write the whole chain; with `ceiling`, as on a
/// replication primary whose standby holds all of it.
fn export(ledger: &Ledger, collector: CollectorConfig, ceiling: bool) -> Duration {
    let tip = ledger.tips().audit.seq;
    let config = siem_config(vec![collector]);
    let t = Instant::now();
    let exporter = if ceiling {
        let standby = std::sync::Arc::new(CaughtUp(std::sync::Mutex::new(tip)));
        Exporter::start_replicated(ledger, &config, standby, &log()).unwrap()
    } else {
        Exporter::start(ledger, &config, &log()).unwrap()
    };
    let deadline = t + Duration::from_secs(600);
    let took = loop {
        if exporter.status()[0].sent_seq >= tip {
            break t.elapsed();
        }
        assert!(Instant::now() < deadline, "{:?}", exporter.status());
        std::thread::sleep(Duration::from_millis(1)); // polling interval of the measurement
    };
    drop(exporter);
    took
}

/// Commits per second for `secs`, 256 in flight, with `collectors` exporting meanwhile.
fn commits(dir: &Path, secs: f64, collectors: Vec<CollectorConfig>) -> (f64, u64) {
    let ledger = Ledger::open(dir, &Options::default(), &log()).unwrap();
    let exporter = Exporter::start(&ledger, &siem_config(collectors), &log()).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut inflight = VecDeque::new();
    let mut done = 0u64;
    let t = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    while t.elapsed() < limit {
        while inflight.len() < 256 {
            let id = TxId::generate();
            let mut tx = ledger
                .begin(TxContext {
                    tx_id: id,
                    handler: "bench".into(),
                    request: vec![0; 64],
                    domain_id: 1,
                    policy_hash: [0; 32],
                })
                .unwrap();
            let key = format!("k{}", rng.u32(..10_000));
            tx.put(key.as_bytes(), &[1; 100]).unwrap();
            let audit = vec![
                AuditEvent::new("domain.started", Severity::Info)
                    .field("tx_id", id)
                    .field("handler", "bench"),
                AuditEvent::new("tx.committed", Severity::Info)
                    .field("tx_id", id)
                    .field("handler", "bench"),
            ];
            inflight.push_back(tx.submit(Vec::new(), audit).unwrap());
        }
        if let Some(ticket) = inflight.pop_front() {
            if ticket.wait().is_ok() {
                done += 1;
            }
        }
    }
    let rate = done as f64 / t.elapsed().as_secs_f64();
    for ticket in inflight {
        let _ = ticket.wait();
    }
    let lag = exporter
        .status()
        .iter()
        .map(|s| s.behind)
        .max()
        .unwrap_or(0);
    drop(exporter);
    (rate, lag)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let env_or = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let events = if measuring {
        env_or("BENCH_EVENTS", 200_000.0) as usize
    } else {
        2_000
    };
    let secs = if measuring {
        env_or("BENCH_SECS", 3.0)
    } else {
        0.3
    };
    let reps = if measuring {
        env_or("BENCH_REPS", 5.0) as usize
    } else {
        1
    };
    let root = tempfile::Builder::new()
        .prefix("mayfly-siem-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let pki = Pki::create(&root.path().join("pki"));
    let rsyslog = Rsyslog::start_with(
        &root.path().join("rsyslog"),
        &[Input::Tcp, Input::TlsAnon],
        Some(&pki),
        "discard",
    );
    let tcp = CollectorConfig::new(
        "bench-tcp",
        TransportKind::Tcp,
        &rsyslog.address(Input::Tcp),
    );
    let mut tls = CollectorConfig::new(
        "bench-tls",
        TransportKind::Tls,
        &rsyslog.address(Input::TlsAnon),
    );
    tls.ca = Some(pki.ca.clone());
    tls.server_name = Some("localhost".into());

    let ledger = Ledger::open(&root.path().join("ledger"), &Options::default(), &log()).unwrap();
    fill(&ledger, events);
    let tip = ledger.tips().audit.seq;
    let messages = encode_all(&ledger);
    let bytes: usize = messages.iter().map(String::len).sum();
    println!(
        "siem export bench: {tip} audit records ({} bytes/message on average), {reps} interleaved repetitions, rsyslog {} parsing and discarding",
        bytes / messages.len(),
        support::RSYSLOGD
    );

    let names = [
        "encode",
        "raw-tcp",
        "export-tcp",
        "raw-tls",
        "export-tls",
        "export-tcp-ceiling",
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for rep in 0..reps {
        let rate = |d: Duration| tip as f64 / d.as_secs_f64();
        let t = Instant::now();
        assert_eq!(encode_all(&ledger).len() as u64, tip);
        rates[0].push(rate(t.elapsed()));
        rates[1].push(rate(raw_tcp(&rsyslog.address(Input::Tcp), &messages)));
        let mut c = tcp.clone();
        c.name = format!("bench-tcp-{rep}");
        rates[2].push(rate(export(&ledger, c, false)));
        rates[3].push(rate(raw_tls(&tls, &messages)));
        let mut c = tls.clone();
        c.name = format!("bench-tls-{rep}");
        rates[4].push(rate(export(&ledger, c, false)));
        let mut c = tcp.clone();
        c.name = format!("bench-tcp-ceiling-{rep}");
        rates[5].push(rate(export(&ledger, c, true)));
        println!(
            "  rep {rep}: {}",
            names
                .iter()
                .zip(&rates)
                .map(|(n, r)| format!("{n} {:.0}/s", r[rep]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("| configuration | records/s (median) | vs raw |");
    println!("|---|---|---|");
    let med: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    for (i, n) in names.iter().enumerate() {
        let vs = match i {
            2 => format!("{:.2}× raw-tcp time", med[1] / med[2]),
            4 => format!("{:.2}× raw-tls time", med[3] / med[4]),
            5 => format!("{:.2}× export-tcp time", med[2] / med[5]),
            _ => "".into(),
        };
        println!("| {n} | {:.0} | {vs} |", med[i]);
    }

    // The transaction path with and without exporters draining the chain.
    let mut plain = Vec::new();
    let mut exporting = Vec::new();
    let mut lags = Vec::new();
    for rep in 0..reps {
        let (r, _) = commits(
            &root.path().join(format!("tx-plain-{rep}")),
            secs,
            Vec::new(),
        );
        plain.push(r);
        let (r, lag) = commits(
            &root.path().join(format!("tx-export-{rep}")),
            secs,
            vec![tcp.clone(), tls.clone()],
        );
        exporting.push(r);
        lags.push(lag as f64);
        println!("  rep {rep}: commits/s without exporter {:.0}, with tcp+tls exporting {r:.0} (lag at the end {lag} records)", plain[rep]);
    }
    let (p, e) = (median(&mut plain), median(&mut exporting));
    println!(
        "commits/s median: without exporter {p:.0}, with 2 collectors exporting {e:.0} ({:+.1} %); median lag at the end {:.0} records",
        (e / p - 1.0) * 100.0,
        median(&mut lags)
    );
}
