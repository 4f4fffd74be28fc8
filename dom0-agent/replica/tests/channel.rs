//! The channel on loopback, with real mutual TLS and pinned keys: a standby follows a
//! primary ledger; in synchronous mode every acknowledged commit is already durable on the
//! standby; a standby that goes away makes the primary degrade (audited, in its status)
//! and come back to synchronous once the standby has caught up; asynchronous mode catches
//! up; a peer whose key is not the pinned one gets nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_ledger::{Ledger, Options, Replica, Store, StoreOptions, TxContext, TxId};
use mayfly_replica::{follow, pin_of, End, Mode, PinnedTls, PrimaryConfig, Shipper, StandbyConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use slog::{o, Discard, Logger};

fn log() -> Logger {
    Logger::root(Discard, o!())
}

struct Identity {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Identity {
    fn new() -> Self {
        let c = rcgen::generate_simple_self_signed(vec!["mayfly".into()]).unwrap();
        Self {
            cert: c.cert.der().clone(),
            key: c.signing_key.serialize_der(),
        }
    }
    fn pin(&self) -> String {
        pin_of(&self.cert).unwrap()
    }
    fn tls(&self, peer_pin: &str) -> PinnedTls {
        PinnedTls::from_parts(
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone())),
            peer_pin,
        )
        .unwrap()
    }
}

fn put(ledger: &Ledger, k: &str) -> (TxId, u64) {
    try_put(ledger, k, b"v").unwrap()
}

struct Standby {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<End>>,
    store: Store,
    local: Ledger,
}

impl Standby {
    fn start(dir: &std::path::Path, primary: &Ledger, config: StandbyConfig) -> Self {
        let mut replica = Replica::open(
            &dir.join("copy"),
            &StoreOptions::default(),
            primary.public_key(),
        )
        .unwrap();
        let local = Ledger::open(&dir.join("local"), &Options::default(), &log()).unwrap();
        let store = replica.store().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, l) = (stop.clone(), local.clone());
        let thread =
            std::thread::spawn(move || follow(&mut replica, &config, &l, &s, &log()).unwrap());
        Self {
            stop,
            thread: Some(thread),
            store,
            local,
        }
    }
    fn stop(&mut self) -> End {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
    fn events(&self) -> Vec<String> {
        self.local
            .store()
            .audit_records(1, 10_000)
            .unwrap()
            .into_iter()
            .map(|r| r.event.event)
            .collect()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// The sequence of transaction `id` where the standby holds it durably: in its LMDB, or
/// in a group of its journal (flushed before the group was acknowledged).
fn durable_on_standby(copy: &Store, id: &TxId) -> Option<u64> {
    if let Some(seq) = copy.seq_of(id).unwrap() {
        return Some(seq);
    }
    let (entries, _) = mayfly_replica::journal::Journal::read(copy.dir()).unwrap();
    entries.iter().find_map(|e| match e {
        mayfly_replica::journal::Entry::Group { records, .. } => records
            .checkpoints
            .iter()
            .find_map(|r| match mayfly_ledger::Record::decode(r).ok()? {
                mayfly_ledger::Record::Transaction(cp) if cp.tx_id == *id => Some(cp.seq),
                _ => None,
            }),
        _ => None,
    })
}

fn events(ledger: &Ledger) -> Vec<String> {
    ledger
        .store()
        .audit_records(1, 100_000)
        .unwrap()
        .into_iter()
        .map(|r| r.event.event)
        .collect()
}

#[test]
fn synchronous_mode_acknowledges_only_what_the_standby_holds_and_degrades_without_it() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let (pid, sid) = (Identity::new(), Identity::new());
    let primary = Ledger::open(p.path(), &Options::default(), &log()).unwrap();
    let shipper = Shipper::start(
        &primary,
        PrimaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            mode: Mode::Sync,
            sync_timeout: Duration::from_millis(300),
            tls: pid.tls(&sid.pin()),
            peer: None,
            heartbeat: Default::default(),
        },
        &log(),
    )
    .unwrap();
    assert_eq!(
        shipper.status().state(),
        "synchronous",
        "sync until a commit finds no standby"
    );
    let config = StandbyConfig {
        primary: shipper.local_addr(),
        tls: sid.tls(&pid.pin()),
        heartbeat: Default::default(),
    };
    let mut standby = Standby::start(s.path(), &primary, config.clone());
    assert_eq!(standby.store.last_group().unwrap(), 0);
    assert!(
        eventually(Duration::from_secs(20), || shipper.status().state()
            == "synchronous"),
        "{:?}",
        shipper.status()
    );
    // Every acknowledged commit is on the standby already, from several threads at once.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (primary, copy) = (primary.clone(), standby.store.clone());
            std::thread::spawn(move || {
                for i in 0..15 {
                    let (id, seq) = put(&primary, &format!("t{t}/k{i}"));
                    assert_eq!(
                        durable_on_standby(&copy, &id),
                        Some(seq),
                        "commit {seq} acknowledged before the standby had it"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(shipper.status().state(), "synchronous");

    // The standby goes away: the next commit waits at most the timeout, then the primary
    // degrades, says so, and commits go on.
    assert!(matches!(standby.stop(), End::Stopped));
    drop(standby);
    let started = Instant::now();
    put(&primary, "alone/1");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let st = shipper.status();
    assert_eq!(st.state(), "degraded", "{st:?}");
    assert!(st.degraded.unwrap().contains("did not confirm"));
    let started = Instant::now();
    put(&primary, "alone/2");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "a degraded primary does not wait"
    );
    assert!(eventually(Duration::from_secs(5), || events(&primary)
        .iter()
        .filter(|e| *e == "replication.degraded")
        .count()
        == 1));

    // Back: the standby catches up and the primary is synchronous again.
    let standby = Standby::start(s.path(), &primary, config);
    assert!(
        eventually(Duration::from_secs(20), || shipper.status().state()
            == "synchronous"),
        "{:?}",
        shipper.status()
    );
    assert!(eventually(Duration::from_secs(5), || events(&primary)
        .contains(&"replication.synchronous".to_string())));
    let (id, seq) = put(&primary, "back");
    assert_eq!(durable_on_standby(&standby.store, &id), Some(seq));
    assert!(standby
        .events()
        .contains(&"replication.started".to_string()));
    drop(standby);
    shipper.stop();
}

#[test]
fn asynchronous_mode_catches_up_and_a_wrong_pin_gets_nothing() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let bad = tempfile::tempdir().unwrap();
    let (pid, sid, stranger) = (Identity::new(), Identity::new(), Identity::new());
    let primary = Ledger::open(p.path(), &Options::default(), &log()).unwrap();
    for i in 0..20 {
        put(&primary, &format!("before/{i}"));
    }
    let shipper = Shipper::start(
        &primary,
        PrimaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            mode: Mode::Async,
            sync_timeout: Duration::from_millis(300),
            tls: pid.tls(&sid.pin()),
            peer: None,
            heartbeat: Default::default(),
        },
        &log(),
    )
    .unwrap();
    assert_eq!(shipper.status().state(), "asynchronous");
    // A peer with another key (pinning the primary correctly) is refused by the primary.
    let intruder = Standby::start(
        bad.path(),
        &primary,
        StandbyConfig {
            primary: shipper.local_addr(),
            tls: stranger.tls(&pid.pin()),
            heartbeat: Default::default(),
        },
    );
    // A standby that pins another primary key refuses this primary.
    let misled = tempfile::tempdir().unwrap();
    let wrong_pin = Standby::start(
        misled.path(),
        &primary,
        StandbyConfig {
            primary: shipper.local_addr(),
            tls: sid.tls(&stranger.pin()),
            heartbeat: Default::default(),
        },
    );
    let standby = Standby::start(
        s.path(),
        &primary,
        StandbyConfig {
            primary: shipper.local_addr(),
            tls: sid.tls(&pid.pin()),
            heartbeat: Default::default(),
        },
    );
    for i in 0..20 {
        put(&primary, &format!("after/{i}"));
    }
    let last = primary.tips();
    assert!(
        eventually(Duration::from_secs(20), || standby
            .store
            .last_group()
            .unwrap()
            >= last.group),
        "{:?}",
        shipper.status()
    );
    assert!(standby.store.last_group().unwrap() >= last.group);
    assert_eq!(intruder.store.last_group().unwrap(), 0);
    assert_eq!(wrong_pin.store.last_group().unwrap(), 0);
    assert!(eventually(Duration::from_secs(5), || intruder
        .events()
        .contains(&"replication.connection_ended".to_string())));
    let report =
        mayfly_ledger::verify(&standby.store, &[primary.public_key()], &mut |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.failures);
    drop((intruder, wrong_pin, standby));
    shipper.stop();
}

/// An asynchronous primary shipping `primary` on a loopback port, `pid`'s key pinning
/// `sid`'s.
fn async_shipper(
    primary: &Ledger,
    pid: &Identity,
    sid: &Identity,
    heartbeat: mayfly_replica::Heartbeat,
) -> Shipper {
    Shipper::start(
        primary,
        PrimaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            mode: Mode::Async,
            sync_timeout: Duration::from_millis(300),
            tls: pid.tls(&sid.pin()),
            peer: None,
            heartbeat,
        },
        &log(),
    )
    .unwrap()
}

/// What a forged primary needs: both identities, a primary ledger in `dir` (for its
/// identity key), a loopback listener and the server TLS of the primary's key.
fn forged_setup(
    dir: &std::path::Path,
) -> (
    Identity,
    Identity,
    Ledger,
    std::net::TcpListener,
    Arc<rustls::ServerConfig>,
) {
    let (pid, sid) = (Identity::new(), Identity::new());
    let primary = Ledger::open(dir, &Options::default(), &log()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = pid.tls(&sid.pin()).server_config().unwrap();
    (pid, sid, primary, listener, server)
}

/// A forged primary (with the right TLS key): accepts one connection on `listener`,
/// reads the hello and answers with epoch 0; the stream, for the test to go on.
fn forged_primary_accepts(
    listener: &std::net::TcpListener,
    server: &Arc<rustls::ServerConfig>,
) -> rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream> {
    use mayfly_replica::frame::{read_frame, write_frame, Frame};
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn = rustls::ServerConnection::new(server.clone()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let hello = read_frame(&mut stream).unwrap();
    assert!(
        matches!(hello, Frame::Hello { next_group: 1, .. }),
        "{hello:?}"
    );
    write_frame(
        &mut stream,
        &Frame::Epoch {
            epoch: 0,
            from_group: 0,
            from_checkpoint: 0,
        },
    )
    .unwrap();
    stream
}

/// SIEM continuity: the primary ships its exporters' persisted cursors, each cut down to
/// the audit tip of what it has sent, and the standby keeps them in its copy's `cursors`
/// database (where a promoted node's exporter reads them).
#[test]
fn exporter_cursors_reach_the_standby_cut_to_what_it_holds() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let (pid, sid) = (Identity::new(), Identity::new());
    let primary = Ledger::open(p.path(), &Options::default(), &log()).unwrap();
    for i in 0..5 {
        put(&primary, &format!("k/{i}"));
    }
    primary.store().set_cursor("relay", 1).unwrap();
    // A cursor past everything (a bogus value): never shipped past what the standby holds.
    primary.store().set_cursor("soc", u64::MAX).unwrap();
    let shipper = async_shipper(&primary, &pid, &sid, Default::default());
    let mut standby = Standby::start(
        s.path(),
        &primary,
        StandbyConfig {
            primary: shipper.local_addr(),
            tls: sid.tls(&pid.pin()),
            heartbeat: Default::default(),
        },
    );
    let held_tip = || {
        standby
            .store
            .audit_records(1, 100_000)
            .unwrap()
            .last()
            .map_or(0, |r| r.seq)
    };
    assert!(
        eventually(Duration::from_secs(20), || {
            let tip = held_tip();
            tip > 1
                && standby.store.cursor("relay").unwrap() == Some(1)
                && standby.store.cursor("soc").unwrap() == Some(tip)
        }),
        "{:?} {:?}",
        standby.store.cursors(10),
        shipper.status()
    );
    // A cursor that moves on the primary moves on the standby.
    let tip = primary.tips().audit.seq;
    primary.store().set_cursor("relay", tip).unwrap();
    assert!(eventually(Duration::from_secs(10), || standby
        .store
        .cursor("relay")
        .unwrap()
        == Some(tip)));
    assert!(shipper
        .status()
        .shipped_cursors
        .contains(&("relay".to_string(), tip)));
    assert!(!standby
        .events()
        .contains(&"replication.cursor_refused".to_string()));
    standby.stop();
    shipper.stop();
}

/// A primary (here a forged one speaking the frames itself, with the right TLS key) that
/// sends a cursor past the standby's audit tip: the standby writes nothing of the frame,
/// audits `replication.cursor_refused` and ends the connection.
#[test]
fn a_cursor_past_the_standbys_audit_tip_is_refused_and_audited() {
    use mayfly_replica::frame::{read_frame, write_frame, Frame};
    let (p, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pid, sid, primary, listener, server) = forged_setup(p.path());
    let addr = listener.local_addr().unwrap();
    let forger = std::thread::spawn(move || {
        let mut stream = forged_primary_accepts(&listener, &server);
        write_frame(
            &mut stream,
            &Frame::Cursors(vec![("relay".into(), 0), ("soc".into(), 1)]),
        )
        .unwrap();
        // The standby answers with a stop naming the refused cursor.
        read_frame(&mut stream).unwrap()
    });
    let mut standby = Standby::start(
        s.path(),
        &primary,
        StandbyConfig {
            primary: addr,
            tls: sid.tls(&pid.pin()),
            heartbeat: Default::default(),
        },
    );
    let stop = forger.join().unwrap();
    match &stop {
        Frame::Stop { reason, .. } => {
            assert!(reason.contains("refused cursor soc = 1"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(eventually(Duration::from_secs(10), || standby
        .events()
        .contains(&"replication.cursor_refused".to_string())));
    // Nothing of the frame was written, not even the acceptable cursor.
    assert_eq!(standby.store.cursors(10).unwrap(), []);
    let rec = standby
        .local
        .store()
        .audit_records(1, 1000)
        .unwrap()
        .into_iter()
        .find(|r| r.event.event == "replication.cursor_refused")
        .unwrap();
    assert_eq!(rec.event.fields["collector"], "soc");
    assert_eq!(rec.event.fields["audit_tip"], "0");
    standby.stop();
}

fn quick_beats() -> mayfly_replica::Heartbeat {
    mayfly_replica::Heartbeat {
        interval: Duration::from_millis(100),
        misses: 3,
    }
}

/// A standby that goes silent (connected, hello sent, then nothing: what a partition that
/// drops packets looks like) is noticed by the primary's heartbeat bound: its status says
/// the peer is lost and `replication.peer_lost` is audited; a standby that connects again
/// is audited `replication.peer_back` and the status clears.
#[test]
fn a_silent_standby_is_lost_by_heartbeat_and_back_when_it_reconnects() {
    use mayfly_replica::frame::{write_frame, Frame};
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let (pid, sid) = (Identity::new(), Identity::new());
    let primary = Ledger::open(p.path(), &Options::default(), &log()).unwrap();
    put(&primary, "k");
    let shipper = async_shipper(&primary, &pid, &sid, quick_beats());
    let client = sid.tls(&pid.pin()).client_config().unwrap();
    let tcp = std::net::TcpStream::connect(shipper.local_addr()).unwrap();
    let name = rustls::pki_types::ServerName::try_from("mayfly-primary").unwrap();
    let conn = rustls::ClientConnection::new(client, name).unwrap();
    let mut silent = rustls::StreamOwned::new(conn, tcp);
    write_frame(
        &mut silent,
        &Frame::Hello {
            next_group: primary.tips().group + 1,
            epoch: 0,
            identity: primary.public_key(),
        },
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || shipper
            .status()
            .peer_lost
            .is_some_and(|r| r.contains("nothing from the standby for 300 ms"))),
        "{:?}",
        shipper.status()
    );
    assert!(eventually(Duration::from_secs(5), || events(&primary)
        .contains(&"replication.peer_lost".to_string())));
    let mut standby = Standby::start(
        s.path(),
        &primary,
        StandbyConfig {
            primary: shipper.local_addr(),
            tls: sid.tls(&pid.pin()),
            heartbeat: quick_beats(),
        },
    );
    assert!(eventually(Duration::from_secs(10), || events(&primary)
        .contains(&"replication.peer_back".to_string())));
    assert_eq!(shipper.status().peer_lost, None);
    // A live standby on an idle primary is not lost: heartbeats keep it.
    std::thread::sleep(Duration::from_millis(1000)); // a span of 10 heartbeat intervals
    let lost = events(&primary)
        .iter()
        .filter(|e| *e == "replication.peer_lost")
        .count();
    assert_eq!(lost, 1, "{:?}", events(&primary));
    assert!(shipper.status().standby.is_some());
    assert!(
        !standby
            .events()
            .contains(&"replication.peer_lost".to_string()),
        "{:?}",
        standby.events()
    );
    drop(silent);
    standby.stop();
    shipper.stop();
}

/// A primary that goes silent after answering the hello is noticed by the standby's
/// heartbeat bound (`replication.peer_lost` in its own audit); when a primary answers
/// again it is `replication.peer_back`.
#[test]
fn a_silent_primary_is_lost_by_the_standby_and_back_when_it_answers() {
    use mayfly_replica::frame::{read_frame, write_frame, Frame};
    let (p, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pid, sid, primary, listener, server) = forged_setup(p.path());
    let addr = listener.local_addr().unwrap();
    let forger = std::thread::spawn(move || {
        for round in 0..2 {
            let mut stream = forged_primary_accepts(&listener, &server);
            if round == 0 {
                // Silent: read (and drop) what the standby sends until it gives up.
                while read_frame(&mut stream).is_ok() {}
            } else {
                for _ in 0..20 {
                    if write_frame(&mut stream, &Frame::Heartbeat { group: 0 }).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    let mut standby = Standby::start(
        s.path(),
        &primary,
        StandbyConfig {
            primary: addr,
            tls: sid.tls(&pid.pin()),
            heartbeat: quick_beats(),
        },
    );
    assert!(
        eventually(Duration::from_secs(15), || {
            let ev = standby.events();
            let lost = ev.iter().position(|e| e == "replication.peer_lost");
            let back = ev.iter().position(|e| e == "replication.peer_back");
            matches!((lost, back), (Some(l), Some(b)) if l < b)
        }),
        "{:?}",
        standby.events()
    );
    let rec = standby
        .local
        .store()
        .audit_records(1, 1000)
        .unwrap()
        .into_iter()
        .find(|r| r.event.event == "replication.peer_lost")
        .unwrap();
    assert!(
        rec.event.fields["reason"].contains("nothing from the primary for 300 ms"),
        "{:?}",
        rec.event.fields
    );
    standby.stop();
    forger.join().unwrap();
}

/// A small tmpfs for a test (root needed: `None` and a note otherwise); unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs (root needed)");
            return None;
        }
        Some(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Groups 1 to `last` of both stores are the same, byte for byte.
fn same_groups_up_to(a: &Store, b: &Store, last: u64) {
    for g in 1..=last {
        assert_eq!(
            a.export_group(g).unwrap(),
            b.export_group(g).unwrap(),
            "group {g}"
        );
    }
}

/// A synchronous primary (`sync_timeout` 5 s) shipping `primary`, and a standby in `dir`
/// following it, with fresh identities.
fn sync_pair(primary: &Ledger, dir: &std::path::Path) -> (Shipper, Standby) {
    let (pid, sid) = (Identity::new(), Identity::new());
    let shipper = Shipper::start(
        primary,
        PrimaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            mode: Mode::Sync,
            sync_timeout: Duration::from_secs(5),
            tls: pid.tls(&sid.pin()),
            peer: None,
            heartbeat: Default::default(),
        },
        &log(),
    )
    .unwrap();
    let config = StandbyConfig {
        primary: shipper.local_addr(),
        tls: sid.tls(&pid.pin()),
        heartbeat: Default::default(),
    };
    let standby = Standby::start(dir, primary, config);
    (shipper, standby)
}

fn try_put(ledger: &Ledger, k: &str, value: &[u8]) -> Result<(TxId, u64), String> {
    let id = TxId::generate();
    let mut t = ledger
        .begin(TxContext {
            tx_id: id,
            handler: "kv".into(),
            request: k.as_bytes().to_vec(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .map_err(|e| e.to_string())?;
    t.put(k.as_bytes(), value).map_err(|e| e.to_string())?;
    t.commit(b"ok".to_vec())
        .map(|r| (id, r.seq))
        .map_err(|e| e.to_string())
}

/// Synchronous mode ships a group before the primary's own commit. When that commit fails
/// (the primary's disk is full), the primary abandons the group: the standby drops it if
/// it got it (audited, not a fork), no client is acknowledged for it, and once space
/// returns the group built anew at that number is taken. Every acknowledged commit is on
/// the standby, and its copy ends identical to the primary's ledger.
#[test]
fn a_group_whose_commit_fails_on_the_primary_is_abandoned_on_the_standby() {
    let root = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&root.path().join("primary-fs"), "24m") else {
        return;
    };
    let pdir = fs.0.join("ledger");
    std::fs::create_dir_all(&pdir).unwrap();
    let primary = Ledger::open(&pdir, &Options::default(), &log()).unwrap();
    let (shipper, mut standby) = sync_pair(&primary, s.path());
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push(try_put(&primary, &format!("before/{i}"), &[7; 2000]).unwrap());
    }
    assert_eq!(shipper.status().state(), "synchronous");
    // Fill the primary's disk: its next commits fail in LMDB's commit, after the group
    // was shipped.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(fs.0.join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while filler.write_all(&chunk).is_ok() {}
        let _ = filler.sync_all();
    }
    let mut failed = 0;
    for i in 0..200 {
        match try_put(&primary, &format!("full/{i}"), &[7; 2000]) {
            Ok(r) => acked.push(r),
            Err(_) => {
                failed += 1;
                break;
            }
        }
    }
    assert_eq!(failed, 1, "the disk never filled");
    let abandoned_at = primary.tips().group + 1;
    // Whether the group went out before its commit failed is a race (a full tmpfs fails
    // the commit within microseconds); when it did, the standby dropped it (the
    // deterministic case is `primary::tests`).
    let dropped = standby
        .events()
        .iter()
        .filter(|e| *e == "replication.tentative_dropped")
        .count();
    assert!(dropped <= 1, "{:?}", standby.events());
    eprintln!(
        "the abandoned group reached the standby and was dropped: {}",
        dropped == 1
    );
    assert!(!standby.events().iter().any(|e| e.contains("fork")));
    // Space returns: commits go on, synchronously, at the abandoned group's number.
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let mut back = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            back = try_put(&primary, "after", &[7; 2000]).ok();
            back.is_some()
        }),
        "commits never resumed"
    );
    acked.push(back.unwrap());
    for i in 0..5 {
        acked.push(try_put(&primary, &format!("after/{i}"), &[7; 2000]).unwrap());
    }
    assert_eq!(
        shipper.status().state(),
        "synchronous",
        "{:?}",
        shipper.status()
    );
    for (id, seq) in &acked {
        assert_eq!(
            durable_on_standby(&standby.store, id),
            Some(*seq),
            "acknowledged commit {seq} is not on the standby"
        );
    }
    assert!(matches!(standby.stop(), End::Stopped));
    // Stopped, the standby wrote what it holds confirmed to LMDB (a last tentative group
    // stays in its journal): the primary's ledger, past the abandoned group's number.
    let last = standby.store.last_group().unwrap();
    assert!(last > abandoned_at, "{last} {abandoned_at}");
    same_groups_up_to(&standby.store, primary.store(), last);
    drop(standby);
    shipper.stop();
    drop(primary);
}

/// The abandon path, deterministically: the primary's observer is driven as the committer
/// drives it when its LMDB commit fails after shipping (tentative, then abandoned). The
/// standby holds the group (journaled, acknowledged), then drops it (audited, no fork);
/// the primary no longer counts the standby's acknowledgement of it, so the group built
/// next at that number waits for its own; commits then go on synchronously and the copy
/// is the primary's ledger.
#[test]
fn an_abandoned_tentative_group_is_dropped_by_the_standby_and_its_ack_no_longer_counts() {
    let p = tempfile::tempdir().unwrap();
    let twin = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = Ledger::open(p.path(), &Options::default(), &log()).unwrap();
    put(&primary, "a");
    let (shipper, mut standby) = sync_pair(&primary, s.path());
    // Connected, and the primary's audit of it written and acknowledged: it is idle.
    assert!(eventually(Duration::from_secs(20), || {
        let st = shipper.status();
        st.standby.is_some()
            && st.acked_group == primary.tips().group
            && events(&primary).contains(&"replication.standby_connected".to_string())
    }));
    // A validly signed group at the primary's next number that the primary never commits:
    // the next group of a copy of it taken while it is idle.
    for f in ["data.mdb", "signing.key"] {
        std::fs::copy(p.path().join(f), twin.path().join(f)).unwrap();
    }
    let g = primary.tips().group + 1;
    let other = Ledger::open(twin.path(), &Options::default(), &log()).unwrap();
    let lost = other.store().export_group(g).unwrap();
    drop(other);
    let observer = primary.group_observer().expect("the shipper's observer");
    observer.tentative(g, lost.clone());
    assert!(
        eventually(Duration::from_secs(10), || shipper.status().acked_group
            == g),
        "the standby never acknowledged the tentative group: {:?}",
        shipper.status()
    );
    let journaled = |dir: &std::path::Path| {
        mayfly_replica::journal::Journal::read(dir)
            .unwrap()
            .0
            .into_iter()
            .any(|e| matches!(e, mayfly_replica::journal::Entry::Group { records, tentative: true } if records == lost))
    };
    assert!(journaled(&s.path().join("copy")));
    observer.abandoned(g);
    assert_eq!(
        shipper.status().acked_group,
        g - 1,
        "an abandoned group's acknowledgement does not count"
    );
    assert!(
        eventually(Duration::from_secs(10), || standby
            .events()
            .contains(&"replication.tentative_dropped".to_string())),
        "{:?}",
        standby.events()
    );
    // The group built at that number now is the primary's own; it waits for its ack.
    let (id, seq) = put(&primary, "b");
    assert_eq!(durable_on_standby(&standby.store, &id), Some(seq));
    assert_eq!(shipper.status().state(), "synchronous");
    assert!(!standby.events().iter().any(|e| e.contains("fork")));
    assert!(matches!(standby.stop(), End::Stopped));
    let last = standby.store.last_group().unwrap();
    assert!(last >= g);
    same_groups_up_to(&standby.store, primary.store(), last);
    drop(standby);
    shipper.stop();
}
