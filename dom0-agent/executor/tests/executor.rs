//! Executor logic against a test double backend: each "domain" is a thread speaking the
//! real ring over real shared memory, scripted per handler. This checks the executor's
//! protocol handling, retries, limits and audit records; the sandbox and Xen backends are
//! exercised by the agent's end-to-end tests, not here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mayfly_domain::{
    Domain, DomainBackend, DomainError, DomainExit, DomainId, PoolStats, Quarantined, Ring,
};
use mayfly_executor::{Executor, ExecutorConfig, TxRequest, TxStatus};
use mayfly_ledger::{Ledger, Options};
use mayfly_ring::notify::NotifyError;
use mayfly_ring::wire::{Request, Response};
use mayfly_ring::{Frontend, Geometry, MmapMem, Notifier, SharedMem, Wake};
use slog::{o, Discard, Logger};

/// One direction's doorbell plus the guest's liveness, on a mutex and condvar.
#[derive(Default)]
struct Bell {
    state: Mutex<(u64, bool)>, // (rings, peer gone)
    cv: Condvar,
}

struct Side {
    mine: Arc<Bell>,
    theirs: Arc<Bell>,
    watch_peer: bool,
}

impl Notifier for Side {
    fn notify(&self) -> Result<(), NotifyError> {
        let mut s = self.theirs.state.lock().unwrap();
        s.0 += 1;
        self.theirs.cv.notify_all();
        Ok(())
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        let mut s = self.mine.state.lock().unwrap();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if s.0 > 0 {
                s.0 = 0;
                return Ok(Wake::Notified);
            }
            if self.watch_peer && s.1 {
                return Ok(Wake::PeerGone);
            }
            match deadline {
                None => s = self.mine.cv.wait(s).unwrap(),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(Wake::TimedOut);
                    }
                    s = self.mine.cv.wait_timeout(s, left).unwrap().0;
                }
            }
        }
    }
}

type Guest = Arc<dyn Fn(&mut Frontend<Arc<MmapMem>>, &Side, &[u8], &AtomicBool) + Send + Sync>;

struct ThreadDomain {
    id: DomainId,
    ready_id: u32,
    ring: Ring,
    notifier: Side,
    thread: Option<JoinHandle<()>>,
    killed: Arc<AtomicBool>,
}

impl Domain for ThreadDomain {
    fn id(&self) -> DomainId {
        self.id
    }
    fn ready_id(&self) -> u32 {
        self.ready_id
    }
    fn ring(&mut self) -> (&mut Ring, &dyn Notifier) {
        (&mut self.ring, &self.notifier)
    }
    fn try_exit(&mut self) -> Result<Option<DomainExit>, DomainError> {
        Ok(None)
    }
    fn destroy(mut self: Box<Self>) -> Result<DomainExit, DomainError> {
        self.killed.store(true, Ordering::SeqCst);
        let t = self.thread.take().unwrap();
        Ok(match t.join() {
            Ok(()) => DomainExit::Exited { code: 0 },
            Err(_) => DomainExit::Crashed { signal: 6 },
        })
    }
    fn quarantine(self: Box<Self>) -> Result<Quarantined, DomainError> {
        Ok(Quarantined {
            backend: "test-threads",
            id: self.id,
            handle: "thread".into(),
        })
    }
}

struct ThreadBackend {
    guests: HashMap<&'static str, Guest>,
    next: AtomicU32,
}

impl DomainBackend for ThreadBackend {
    fn name(&self) -> &'static str {
        "test-threads"
    }
    fn take(&self, timeout: Duration) -> Result<Box<dyn Domain>, DomainError> {
        let geometry = Geometry::DEFAULT;
        let mem = Arc::new(MmapMem::anonymous(geometry.total_len()).unwrap());
        let shared: Arc<dyn SharedMem> = mem.clone();
        let mut ring = Ring::new(shared, geometry).unwrap();
        let (to_agent, to_guest) = (Arc::new(Bell::default()), Arc::new(Bell::default()));
        let agent_side = Side {
            mine: to_agent.clone(),
            theirs: to_guest.clone(),
            watch_peer: true,
        };
        let guest_side = Side {
            mine: to_guest,
            theirs: to_agent.clone(),
            watch_peer: false,
        };
        let killed = Arc::new(AtomicBool::new(false));
        let guests = self.guests.clone();
        let k = killed.clone();
        let thread = std::thread::spawn(move || {
            struct Gone(Arc<Bell>);
            impl Drop for Gone {
                fn drop(&mut self) {
                    self.0.state.lock().unwrap().1 = true;
                    self.0.cv.notify_all();
                }
            }
            let _gone = Gone(to_agent);
            let mut front = Frontend::attach(mem).unwrap();
            let start = match front.call(
                &Request::Ready {
                    protocol_version: mayfly_ring::wire::PROTOCOL_VERSION,
                    handlers: Vec::new(),
                },
                &guest_side,
                None,
            ) {
                Ok(Response::Start(s)) => s,
                _ => return,
            };
            let guest = guests.get(start.handler.as_str()).unwrap().clone();
            // The `rand` guest is handed its entropy seed as its payload.
            let payload = if start.handler == "rand" {
                start.entropy_seed.to_vec()
            } else {
                start.payload
            };
            guest(&mut front, &guest_side, &payload, &k);
        });
        let env = ring.recv_request(&agent_side, Some(timeout)).unwrap();
        Ok(Box::new(ThreadDomain {
            id: self.next.fetch_add(1, Ordering::SeqCst),
            ready_id: env.id,
            ring,
            notifier: agent_side,
            thread: Some(thread),
            killed,
        }))
    }
    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    fn quarantined(&self) -> Vec<mayfly_domain::Quarantined> {
        Vec::new() // this double keeps no quarantined domains: it drops what it quarantines
    }
    fn release_quarantined(
        &self,
        _id: mayfly_domain::DomainId,
    ) -> Result<Option<mayfly_domain::DomainExit>, DomainError> {
        Ok(None)
    }
    fn shutdown(&self) {}
}

fn call(front: &mut Frontend<Arc<MmapMem>>, n: &Side, r: Request) -> Response {
    front.call(&r, n, Some(Duration::from_secs(10))).unwrap()
}

/// Reads the counter, hands off to the test (step 1; it acts beside the transaction) and
/// waits for it (step 2), then reads another key: the error code of that answer (0 for a
/// value).
fn read_handoff_read(f: &mut Frontend<Arc<MmapMem>>, n: &Side, handoff: &Handoff) -> u16 {
    let _ = call(
        f,
        n,
        Request::Get {
            key: b"counter".to_vec(),
        },
    );
    handoff.advance_to(1);
    handoff.wait_for(2);
    match call(
        f,
        n,
        Request::Get {
            key: b"other".to_vec(),
        },
    ) {
        Response::Error { code, .. } => code,
        _ => 0,
    }
}

fn guests() -> HashMap<&'static str, Guest> {
    let mut g: HashMap<&'static str, Guest> = HashMap::new();
    // Increment a counter key; commit the new value.
    g.insert(
        "inc",
        Arc::new(|f, n, _p, _k| {
            let v = match call(
                f,
                n,
                Request::Get {
                    key: b"counter".to_vec(),
                },
            ) {
                Response::Value(v) => {
                    v.map_or(0, |v| String::from_utf8(v).unwrap().parse::<u64>().unwrap())
                }
                other => panic!("{other:?}"),
            };
            let next = (v + 1).to_string().into_bytes();
            assert_eq!(
                call(
                    f,
                    n,
                    Request::Put {
                        key: b"counter".to_vec(),
                        value: next.clone()
                    }
                ),
                Response::Ok
            );
            let _ = call(f, n, Request::Commit { result: next });
        }),
    );
    g.insert(
        "write_then_abort",
        Arc::new(|f, n, _p, _k| {
            assert_eq!(
                call(
                    f,
                    n,
                    Request::Put {
                        key: b"junk".to_vec(),
                        value: b"x".to_vec()
                    }
                ),
                Response::Ok
            );
            assert_eq!(
                call(
                    f,
                    n,
                    Request::Abort {
                        reason: "insufficient funds".into()
                    }
                ),
                Response::Aborted
            );
        }),
    );
    // Pipelines 1,025 distinct puts (the ledger refuses the one past its 1,024-write limit)
    // and sends Commit right behind the last one, reading answers only when the ring is
    // full, as the shim does.
    g.insert(
        "commit_behind_refused",
        Arc::new(|f, n, _p, _k| {
            let wait = Some(Duration::from_secs(10));
            let slots = usize::try_from(f.geometry().slot_count()).unwrap();
            let mut pending = std::collections::VecDeque::new();
            let mut answers = Vec::new();
            let puts = (0..1025).map(|i| Request::Put {
                key: format!("kv/{i:04}").into_bytes(),
                value: b"1".to_vec(),
            });
            let commit = Request::Commit {
                result: b"done".to_vec(),
            };
            for request in puts.chain(std::iter::once(commit)) {
                if pending.len() == slots {
                    let id = pending.pop_front().unwrap();
                    answers.push(f.recv_response_to(id, n, wait).unwrap());
                }
                pending.push_back(f.send_request(&request, n).unwrap());
            }
            for id in pending {
                answers.push(f.recv_response_to(id, n, wait).unwrap());
            }
            assert!(answers[..1024].iter().all(|a| *a == Response::Ok));
            assert!(
                matches!(answers[1024], Response::Error { .. }),
                "{:?}",
                answers[1024]
            );
            assert_eq!(answers[1025], Response::Aborted);
        }),
    );
    // Writes a key, then touches a honeytoken.
    g.insert(
        "probe",
        Arc::new(|f, n, _p, _k| {
            let _ = call(
                f,
                n,
                Request::Put {
                    key: b"kv/a".to_vec(),
                    value: b"1".to_vec(),
                },
            );
            // After the denial the agent stops answering: short waits keep the test quick.
            let _ = f.call(
                &Request::Get {
                    key: b"kv/~canary".to_vec(),
                },
                n,
                Some(Duration::from_millis(200)),
            );
            let _ = f.call(
                &Request::Commit { result: Vec::new() },
                n,
                Some(Duration::from_millis(200)),
            );
        }),
    );
    // Reads the counter (so it depends on whoever wrote it), commits its entropy seed.
    g.insert(
        "rand",
        Arc::new(|f, n, seed, _k| {
            let _ = call(
                f,
                n,
                Request::Get {
                    key: b"counter".to_vec(),
                },
            );
            let _ = call(
                f,
                n,
                Request::Commit {
                    result: seed.to_vec(),
                },
            );
        }),
    );
    g.insert(
        "spin",
        Arc::new(|_f, _n, _p, killed| {
            while !killed.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
        }),
    );
    g.insert("die", Arc::new(|_f, _n, _p, _k| panic!("guest crashed")));
    // Waits for the test without any operation (an idle transaction), then increments the
    // counter.
    g.insert(
        "wait_then_inc",
        Arc::new(|f, n, _p, _k| {
            IDLE_HANDOFF.advance_to(1);
            IDLE_HANDOFF.wait_for(2);
            let v = match call(
                f,
                n,
                Request::Get {
                    key: b"counter".to_vec(),
                },
            ) {
                Response::Value(v) => {
                    v.map_or(0, |v| String::from_utf8(v).unwrap().parse::<u64>().unwrap())
                }
                _ => return,
            };
            let next = (v + 1).to_string().into_bytes();
            let _ = call(
                f,
                n,
                Request::Put {
                    key: b"counter".to_vec(),
                    value: next.clone(),
                },
            );
            let _ = call(f, n, Request::Commit { result: next });
        }),
    );
    // Reads the counter, lets the test commit beside it (a long transaction: the ledger
    // under test holds no snapshot past its first operation), then reads another key and
    // keeps the answer's error code (0 for a value) in `GUEST_GOT`.
    g.insert(
        "read_wait_read",
        Arc::new(|f, n, _p, _k| {
            let code = read_handoff_read(f, n, &HANDOFF);
            GUEST_GOT.store(u32::from(code), Ordering::SeqCst);
            // Ignoring the error: the agent must have ended the transaction already.
            let answered = f
                .call(
                    &Request::Get {
                        key: b"more".to_vec(),
                    },
                    n,
                    Some(Duration::from_millis(500)),
                )
                .is_ok();
            GUEST_ANSWERED_AFTER.store(answered, Ordering::SeqCst);
        }),
    );
    g.insert(
        "chatty",
        Arc::new(|f, n, _p, _k| loop {
            match f.call(
                &Request::Get { key: b"k".to_vec() },
                n,
                Some(Duration::from_secs(10)),
            ) {
                Ok(Response::Value(_)) => continue,
                _ => return,
            }
        }),
    );
    // Reads 4,096 distinct keys (the ledger's read-set limit) and three more, counting the
    // reads refused as a limit in `MANY_READS_REFUSED`, then commits.
    g.insert(
        "many_reads",
        Arc::new(|f, n, _p, _k| {
            let mut refused = 0;
            for i in 0..4099 {
                let key = format!("many/{i:05}").into_bytes();
                match call(f, n, Request::Get { key }) {
                    Response::Value(_) => {}
                    Response::Error { code, .. }
                        if code == mayfly_ring::wire::error_code::LIMIT_EXCEEDED =>
                    {
                        refused += 1
                    }
                    other => panic!("{other:?}"),
                }
            }
            MANY_READS_REFUSED.store(refused, Ordering::SeqCst);
            let _ = call(f, n, Request::Commit { result: Vec::new() });
        }),
    );
    // Reads 1,024 keys, then reads an absent key after each commit the test makes beside it
    // (hand-offs on `RECHECK_HANDOFF`), until a read is refused (at most 200 rounds); the
    // code of that answer goes to `RECHECK_GOT`. Then it commits.
    g.insert(
        "many_rechecks",
        Arc::new(|f, n, _p, _k| {
            for i in 0..1024 {
                let key = format!("r/{i:04}").into_bytes();
                let _ = call(f, n, Request::Get { key });
            }
            for round in 0..200u32 {
                RECHECK_HANDOFF.advance_to(2 * round + 1);
                RECHECK_HANDOFF.wait_for(2 * round + 2);
                let key = b"absent".to_vec();
                if let Response::Error { code, .. } = call(f, n, Request::Get { key }) {
                    RECHECK_GOT.store(u32::from(code), Ordering::SeqCst);
                    break;
                }
            }
            RECHECK_HANDOFF.advance_to(u32::MAX);
            let _ = call(f, n, Request::Commit { result: Vec::new() });
        }),
    );
    // Reads the counter, lets the test take the ledger's only reader slot (the ledger under
    // test holds no snapshot past the first operation), then reads another key and keeps
    // the answer's error code in `BUSY_GOT`.
    g.insert(
        "read_busy_read",
        Arc::new(|f, n, _p, _k| {
            let code = read_handoff_read(f, n, &BUSY_HANDOFF);
            BUSY_GOT.store(u32::from(code), Ordering::SeqCst);
            // Unanswered: the agent must have ended the transaction already.
            let _ = f.call(
                &Request::Commit { result: Vec::new() },
                n,
                Some(Duration::from_millis(500)),
            );
        }),
    );
    g
}

/// A step counter the test and a guest thread hand off on (each wait bounded).
struct Handoff {
    step: Mutex<u32>,
    cv: Condvar,
}

/// The error code `read_wait_read` got at its second read (0: a value, `u32::MAX`: not yet).
static GUEST_GOT: AtomicU32 = AtomicU32::new(u32::MAX);

/// Whether `read_wait_read` got any answer after its conflict.
static GUEST_ANSWERED_AFTER: AtomicBool = AtomicBool::new(true);

static HANDOFF: Handoff = Handoff {
    step: Mutex::new(0),
    cv: Condvar::new(),
};

/// Reads `many_reads` had refused as a limit (`u32::MAX`: not yet).
static MANY_READS_REFUSED: AtomicU32 = AtomicU32::new(u32::MAX);

/// The error code of the read `many_rechecks` had refused (`u32::MAX`: none).
static RECHECK_GOT: AtomicU32 = AtomicU32::new(u32::MAX);

/// `many_rechecks`'s hand-off.
static RECHECK_HANDOFF: Handoff = Handoff {
    step: Mutex::new(0),
    cv: Condvar::new(),
};

/// The error code `read_busy_read` got at its second read (`u32::MAX`: not yet).
static BUSY_GOT: AtomicU32 = AtomicU32::new(u32::MAX);

/// `read_busy_read`'s hand-off.
static BUSY_HANDOFF: Handoff = Handoff {
    step: Mutex::new(0),
    cv: Condvar::new(),
};

/// `wait_then_inc`'s (tests run in parallel: one hand-off per test).
static IDLE_HANDOFF: Handoff = Handoff {
    step: Mutex::new(0),
    cv: Condvar::new(),
};

impl Handoff {
    fn advance_to(&self, step: u32) {
        *self.step.lock().unwrap() = step;
        self.cv.notify_all();
    }

    fn wait_for(&self, step: u32) {
        let guard = self.step.lock().unwrap();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, Duration::from_secs(10), |s| *s < step)
            .unwrap();
        assert!(*guard >= step, "step {step} not reached in 10 s");
    }
}

/// A transaction beside the executor's, begun as soon as a reader slot is free (polled for
/// 10 s at most: the guest's transaction must give its slot up when its snapshot is due).
fn begin_beside_when_free(ex: &Executor) -> mayfly_ledger::Tx {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ex.ledger().begin(beside()) {
            Ok(tx) => return tx,
            Err(mayfly_ledger::TxError::Busy) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the guest's transaction kept its reader slot"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The context of a transaction the test runs on the ledger beside the executor's.
fn beside() -> mayfly_ledger::TxContext {
    mayfly_ledger::TxContext {
        tx_id: mayfly_ledger::TxId::generate(),
        handler: "beside".into(),
        request: Vec::new(),
        domain_id: 0,
        policy_hash: [0; 32],
    }
}

fn allow_all() -> mayfly_policy::Bundle {
    mayfly_policy::Bundle::load(&[("allow.toml", "[engine]\nunlisted_handler = \"allow\"\n")])
        .unwrap()
}

fn setup(config: ExecutorConfig) -> (tempfile::TempDir, Executor) {
    setup_with(config, &Options::default())
}

fn setup_with(config: ExecutorConfig, options: &Options) -> (tempfile::TempDir, Executor) {
    let dir = tempfile::tempdir().unwrap();
    let log = Logger::root(Discard, o!());
    let ledger = Ledger::open(dir.path(), options, &log).unwrap();
    let backend = Arc::new(ThreadBackend {
        guests: guests(),
        next: AtomicU32::new(1),
    });
    let names = [
        "inc",
        "write_then_abort",
        "spin",
        "die",
        "chatty",
        "probe",
        "rand",
        "commit_behind_refused",
        "read_wait_read",
        "wait_then_inc",
        "many_reads",
        "many_rechecks",
        "read_busy_read",
    ]
    .map(String::from);
    (
        dir,
        Executor::new(ledger, backend, names, config, allow_all(), &log),
    )
}

/// Runs `handler` in a thread, once (no retry), on a ledger that gives a transaction's
/// snapshot up after its first operation (every later read takes a fresh one), with at
/// most `max_readers` reader slots.
fn run_long(
    handler: &'static str,
    max_readers: Option<u32>,
) -> (
    tempfile::TempDir,
    Arc<Executor>,
    JoinHandle<mayfly_executor::TxOutcome>,
) {
    let defaults = mayfly_ledger::StoreOptions::default();
    let (dir, ex) = setup_with(
        ExecutorConfig {
            max_attempts: 1,
            ..Default::default()
        },
        &Options {
            snapshot_hold: Duration::ZERO,
            store: mayfly_ledger::StoreOptions {
                max_readers: max_readers.unwrap_or(defaults.max_readers),
                ..defaults
            },
            ..Options::default()
        },
    );
    let ex = Arc::new(ex);
    let runner = {
        let ex = ex.clone();
        std::thread::spawn(move || run(&ex, handler))
    };
    (dir, ex, runner)
}

fn run(ex: &Executor, handler: &str) -> mayfly_executor::TxOutcome {
    ex.execute(&TxRequest {
        handler: handler.into(),
        payload: b"{}".to_vec(),
        client: "test".into(),
    })
    .unwrap()
}

fn audit_events(ex: &Executor) -> Vec<String> {
    ex.wait_for_reapers();
    // Groups are FIFO: once this append is durable, everything queued before it is too.
    ex.ledger()
        .audit(vec![mayfly_ledger::AuditEvent::new(
            "test.marker",
            mayfly_ledger::Severity::Debug,
        )])
        .unwrap();
    ex.ledger()
        .store()
        .audit_records(1, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| r.event.event)
        .collect()
}

/// The audit records (name and fields), once everything queued is durable.
fn audit_records(ex: &Executor) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    audit_events(ex);
    ex.ledger()
        .store()
        .audit_records(1, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| (r.event.event, r.event.fields))
        .collect()
}

/// The `tx.limit_refused` records of a transaction.
fn limit_records(
    ex: &Executor,
    tx_id: mayfly_ledger::TxId,
) -> Vec<std::collections::BTreeMap<String, String>> {
    audit_records(ex)
        .into_iter()
        .filter(|(e, f)| e == "tx.limit_refused" && f["tx_id"] == tx_id.to_string())
        .map(|(_, f)| f)
        .collect()
}

/// Reads past the ledger's read-set limit reach the guest as LIMIT_EXCEEDED, and the audit
/// trail says so: one `tx.limit_refused` record for the transaction (which limit, its bound,
/// the first refused operation, how many were refused, the client), not one per read.
#[test]
fn reads_past_the_read_limit_are_audited_once_per_transaction() {
    let (_d, ex) = setup(ExecutorConfig::default());
    let o = run(&ex, "many_reads");
    assert_eq!(MANY_READS_REFUSED.load(Ordering::SeqCst), 3);
    // The refused reads are not in its read set: it may still commit.
    assert_eq!(o.status, TxStatus::Committed, "{o:?}");
    let records = limit_records(&ex, o.tx_id);
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["limit"], "reads");
    assert_eq!(r["max"], mayfly_ledger::limits::MAX_READS.to_string());
    assert_eq!(r["op"], "get");
    assert_eq!(r["refused"], "3");
    assert_eq!(r["client"], "test");
    assert_eq!(r["handler"], "many_reads");
    let severity = ex
        .ledger()
        .store()
        .audit_records(1, 10_000)
        .unwrap()
        .into_iter()
        .find(|rec| rec.event.event == "tx.limit_refused")
        .unwrap()
        .event
        .severity;
    assert_eq!(severity, mayfly_ledger::Severity::Warning);
}

/// A long transaction whose re-checks pass `limits::MAX_RECHECKED` gets LIMIT_EXCEEDED at
/// its read, audited as `tx.limit_refused` with `limit=rechecks`.
#[test]
fn re_checks_past_their_bound_are_audited() {
    let (_d, ex, runner) = run_long("many_rechecks", None);
    // One commit beside it before each of its reads, until it is refused.
    for round in 0..200u32 {
        RECHECK_HANDOFF.wait_for(2 * round + 1);
        if *RECHECK_HANDOFF.step.lock().unwrap() == u32::MAX {
            break;
        }
        let mut tx = ex.ledger().begin(beside()).unwrap();
        tx.put(b"other", round.to_string().as_bytes()).unwrap();
        tx.commit(Vec::new()).unwrap();
        RECHECK_HANDOFF.advance_to(2 * round + 2);
    }
    let o = runner.join().unwrap();
    assert_eq!(
        RECHECK_GOT.load(Ordering::SeqCst),
        u32::from(mayfly_ring::wire::error_code::LIMIT_EXCEEDED)
    );
    assert_eq!(o.status, TxStatus::Committed, "{o:?}");
    let records = limit_records(&ex, o.tx_id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["limit"], "rechecks");
    assert_eq!(
        records[0]["max"],
        mayfly_ledger::limits::MAX_RECHECKED.to_string()
    );
    assert_eq!(records[0]["refused"], "1");
}

#[test]
fn commit_writes_a_checkpoint_and_audits_the_domain_life() {
    let (_d, ex) = setup(ExecutorConfig::default());
    let o = run(&ex, "inc");
    assert_eq!(o.status, TxStatus::Committed);
    assert_eq!(o.result, b"1");
    let cp = ex
        .ledger()
        .store()
        .checkpoint(o.seq.unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        (cp.tx_id, cp.domain_id, cp.handler.as_str()),
        (o.tx_id, o.domain_id, "inc")
    );
    let events = audit_events(&ex);
    for e in [
        "domain.cloned",
        "domain.started",
        "tx.committed",
        "domain.destroyed",
    ] {
        assert!(events.iter().any(|x| x == e), "missing {e} in {events:?}");
    }
}

#[test]
fn abort_writes_nothing_and_reports_the_reason() {
    let (_d, ex) = setup(ExecutorConfig::default());
    let o = run(&ex, "write_then_abort");
    assert_eq!(o.status, TxStatus::Aborted);
    assert_eq!(o.error.as_deref(), Some("insufficient funds"));
    assert_eq!(ex.ledger().store().committed(b"junk").unwrap(), None);
    assert!(audit_events(&ex).iter().any(|e| e == "tx.aborted"));
}

/// A guest may send `Commit` right behind writes whose answers it has not read (the shim
/// does): a `Commit` behind a refused write is refused, and nothing of the transaction is
/// written, so a refused write can never be silently left out of a committed transaction.
#[test]
fn a_commit_behind_a_refused_write_is_refused() {
    let (_d, ex) = setup(ExecutorConfig::default());
    let o = run(&ex, "commit_behind_refused");
    assert_eq!(o.status, TxStatus::Aborted, "{o:?}");
    let reason = o.error.unwrap_or_default();
    assert!(reason.contains("refused write"), "{reason}");
    assert_eq!(ex.ledger().store().committed(b"kv/0000").unwrap(), None);
    assert!(audit_events(&ex).iter().any(|e| e == "tx.aborted"));
}

#[test]
fn a_spinning_guest_times_out_and_is_destroyed() {
    let (_d, ex) = setup(ExecutorConfig {
        tx_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let o = run(&ex, "spin");
    assert_eq!(o.status, TxStatus::Failed);
    assert_eq!(o.error.as_deref(), Some("transaction timed out"));
    assert!(audit_events(&ex).iter().any(|e| e == "domain.timeout"));
}

#[test]
fn a_dying_guest_is_noticed_before_the_timeout() {
    let (_d, ex) = setup(ExecutorConfig {
        tx_timeout: Duration::from_secs(60),
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let o = run(&ex, "die");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "crash noticed only at the timeout"
    );
    assert_eq!(o.status, TxStatus::Failed);
    assert_eq!(o.domain_exit, Some(DomainExit::Crashed { signal: 6 }));
    assert!(audit_events(&ex).iter().any(|e| e == "domain.crashed"));
}

#[test]
fn operation_limit_ends_the_transaction() {
    let (_d, ex) = setup(ExecutorConfig {
        max_ops: 50,
        ..Default::default()
    });
    let o = run(&ex, "chatty");
    assert_eq!(o.status, TxStatus::Failed);
    assert_eq!(o.error.as_deref(), Some("operation limit exceeded"));
}

#[test]
fn conflicting_transactions_are_retried_in_fresh_domains_and_none_is_lost() {
    let (_d, ex) = setup(ExecutorConfig {
        max_attempts: 50,
        ..Default::default()
    });
    let ex = Arc::new(ex);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let ex = ex.clone();
            std::thread::spawn(move || (0..25).map(|_| run(&ex, "inc")).collect::<Vec<_>>())
        })
        .collect();
    let outcomes: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        outcomes.iter().all(|o| o.status == TxStatus::Committed),
        "{outcomes:?}"
    );
    let (_, v) = ex.ledger().store().committed(b"counter").unwrap().unwrap();
    assert_eq!(v, b"100", "every increment counted exactly once");
    let mut domains: Vec<_> = outcomes.iter().map(|o| o.domain_id).collect();
    domains.sort_unstable();
    domains.dedup();
    assert_eq!(domains.len(), 100, "each committed run had its own domain");
}

#[test]
fn a_long_transaction_whose_read_changed_ends_as_a_conflict_at_its_next_read() {
    let (_d, ex, runner) = run_long("read_wait_read", None);
    HANDOFF.wait_for(1);
    let mut tx = ex.ledger().begin(beside()).unwrap();
    tx.put(b"counter", b"7").unwrap();
    tx.commit(Vec::new()).unwrap();
    HANDOFF.advance_to(2);
    let o = runner.join().unwrap();
    assert_eq!(o.status, TxStatus::Failed, "{o:?}");
    assert_eq!(
        o.failure,
        Some(mayfly_executor::Failure::Conflicts),
        "{o:?}"
    );
    assert_eq!(o.seq, None);
    // Waits for the domain's retirement (its thread joined) too.
    let events = audit_events(&ex);
    assert_eq!(
        GUEST_GOT.load(Ordering::SeqCst),
        u32::from(mayfly_ring::wire::error_code::CONFLICT),
        "the guest learns of the conflict at its read"
    );
    assert!(
        !GUEST_ANSWERED_AFTER.load(Ordering::SeqCst),
        "the transaction ends at the conflict: nothing after it is served"
    );
    assert!(events.iter().any(|e| e == "tx.conflict"), "{events:?}");
    assert!(
        !events.iter().any(|e| e == "tx.storage_failed"),
        "{events:?}"
    );
    let (_, v) = ex.ledger().store().committed(b"counter").unwrap().unwrap();
    assert_eq!(v, b"7", "only the commit beside it is there");
}

#[test]
fn an_idle_transaction_gives_its_snapshot_up_while_the_guest_waits() {
    // One reader slot: while the guest's transaction holds its snapshot, nobody else can
    // begin one.
    let (_d, ex) = setup_with(
        ExecutorConfig {
            max_attempts: 1,
            ..Default::default()
        },
        &Options {
            snapshot_hold: Duration::from_millis(20),
            store: mayfly_ledger::StoreOptions {
                max_readers: 1,
                ..mayfly_ledger::StoreOptions::default()
            },
            ..Options::default()
        },
    );
    let ex = Arc::new(ex);
    let runner = {
        let ex = ex.clone();
        std::thread::spawn(move || run(&ex, "wait_then_inc"))
    };
    IDLE_HANDOFF.wait_for(1);
    // The guest sends nothing while it waits; the executor gives the snapshot up once the
    // hold is over, so a transaction of ours can begin (polled, bounded).
    let mut tx = begin_beside_when_free(&ex);
    tx.put(b"counter", b"7").unwrap();
    tx.commit(Vec::new()).unwrap();
    IDLE_HANDOFF.advance_to(2);
    let o = runner.join().unwrap();
    // It had read nothing before: its read sees the commit beside it, and it commits.
    assert_eq!(o.status, TxStatus::Committed, "{o:?}");
    assert_eq!(o.result, b"8");
}

/// A long transaction whose fresh snapshot finds no free LMDB reader slot is told so as a
/// retryable conflict (error code 5, not INTERNAL), ends as a conflict (run again while
/// attempts remain), and the audit trail says why (`tx.readers_full`), not a storage failure.
#[test]
fn a_reader_slot_shortage_mid_transaction_is_a_retryable_conflict() {
    let (_d, ex, runner) = run_long("read_busy_read", Some(1));
    BUSY_HANDOFF.wait_for(1);
    // Take the only reader slot once the guest's transaction has given its snapshot up
    // (polled, bounded), and keep it while the guest reads again.
    let beside_tx = begin_beside_when_free(&ex);
    BUSY_HANDOFF.advance_to(2);
    let o = runner.join().unwrap();
    drop(beside_tx);
    assert_eq!(
        BUSY_GOT.load(Ordering::SeqCst),
        u32::from(mayfly_ring::wire::error_code::CONFLICT),
        "the guest is told to run again, not of an internal error"
    );
    assert_eq!(o.status, TxStatus::Failed, "{o:?}");
    assert_eq!(
        o.failure,
        Some(mayfly_executor::Failure::Conflicts),
        "{o:?}"
    );
    let records = audit_records(&ex);
    let busy: Vec<_> = records
        .iter()
        .filter(|(e, _)| e == "tx.readers_full")
        .map(|(_, f)| f)
        .collect();
    assert_eq!(busy.len(), 1, "{records:?}");
    assert_eq!(busy[0]["tx_id"], o.tx_id.to_string());
    assert_eq!(busy[0]["op"], "get");
    assert_eq!(busy[0]["client"], "test");
    assert!(records.iter().any(|(e, _)| e == "tx.conflict"));
    assert!(!records.iter().any(|(e, _)| e == "tx.storage_failed"));
}

#[test]
fn unknown_handler_and_oversized_payload_are_refused_before_any_domain() {
    let (_d, ex) = setup(ExecutorConfig::default());
    let err = ex
        .execute(&TxRequest {
            handler: "nope".into(),
            payload: vec![],
            client: "t".into(),
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "unknown handler \"nope\"");
    let err = ex
        .execute(&TxRequest {
            handler: "inc".into(),
            payload: vec![0; 70_000],
            client: "t".into(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("above the limit"), "{err}");
}

#[test]
fn a_honeytoken_touch_aborts_at_once_and_leaves_no_trace() {
    let (_d, ex) = setup(ExecutorConfig::default());
    let bundle = [(
        "minimal.toml".to_owned(),
        "[handler.probe]\nread = [\"kv/\"]\nwrite = [\"kv/\"]\n\n[[honeytoken]]\nname = \"kv.canary\"\nkeys = [\"kv/~canary\"]\naction = \"abort\"\n"
            .to_owned(),
    )];
    ex.load_policy(&bundle).unwrap();
    let o = run(&ex, "probe");
    assert_eq!(o.status, TxStatus::Failed);
    assert_eq!(
        o.error.as_deref(),
        Some("denied by policy rule kv.canary (abort)")
    );
    assert_eq!(
        ex.ledger().store().committed(b"kv/a").unwrap(),
        None,
        "nothing it wrote survives"
    );
    let events = audit_events(&ex);
    assert!(events.iter().any(|e| e == "policy.decision"), "{events:?}");
    assert!(events.iter().any(|e| e == "policy.loaded"), "{events:?}");
    // Handlers the bundle does not list are refused at admission (fail closed).
    let err = ex
        .execute(&TxRequest {
            handler: "inc".into(),
            payload: vec![],
            client: "t".into(),
        })
        .unwrap_err();
    assert!(
        err.to_string().starts_with("refused by policy rule"),
        "{err}"
    );
}

#[test]
fn policy_reload_under_load_and_a_malformed_bundle_is_refused() {
    let (_d, ex) = setup(ExecutorConfig {
        max_attempts: 100,
        ..Default::default()
    });
    let ex = Arc::new(ex);
    let first = ex.policy_hash();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let ex = ex.clone();
            std::thread::spawn(move || (0..30).map(|_| run(&ex, "inc").status).collect::<Vec<_>>())
        })
        .collect();
    let second = [(
        "allow.toml".to_owned(),
        "[engine]\nunlisted_handler = \"allow\"\n# v2\n".to_owned(),
    )];
    let mut loaded = Vec::new();
    for i in 0..10 {
        let text = format!("[engine]\nunlisted_handler = \"allow\"\n# version {i}\n");
        loaded.push(ex.load_policy(&[("allow.toml".to_owned(), text)]).unwrap());
        let bad = ex.load_policy(&[(
            "bad.toml".to_owned(),
            "[engine]\nunlisted_handler = \"allow\"\n[handler.x]\nmax_ops = \"many\"\n".to_owned(),
        )]);
        let err = bad.unwrap_err().to_string();
        assert!(err.starts_with("bad.toml:4:"), "{err}");
        assert_eq!(
            ex.policy_hash(),
            *loaded.last().unwrap(),
            "a refused bundle leaves the active one"
        );
    }
    let last = ex.load_policy(&second).unwrap();
    for w in workers {
        assert!(w.join().unwrap().iter().all(|s| *s == TxStatus::Committed));
    }
    assert_ne!(first, last);
    // Every checkpoint names one of the bundles that were active, and the last ones the last.
    let o = run(&ex, "inc");
    let cp = ex
        .ledger()
        .store()
        .checkpoint(o.seq.unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(cp.policy_hash, last);
    let tips = ex.ledger().tips().checkpoints.seq;
    let known: std::collections::BTreeSet<_> = loaded.iter().chain([&first, &last]).collect();
    for seq in 1..=tips {
        if let Some(cp) = ex.ledger().store().checkpoint(seq).unwrap() {
            assert!(
                known.contains(&cp.policy_hash),
                "checkpoint {seq} names an unknown bundle"
            );
        }
    }
    let events = audit_events(&ex);
    assert_eq!(
        events.iter().filter(|e| *e == "policy.rejected").count(),
        10
    );
}

#[test]
fn a_replay_draws_the_same_randomness_as_the_original() {
    let (_d, ex) = setup(ExecutorConfig::default());
    let root = run(&ex, "inc");
    let original = run(&ex, "rand");
    assert_eq!(original.result.len(), 32);
    let cp = ex
        .ledger()
        .store()
        .checkpoint(original.seq.unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        cp.entropy_seed.to_vec(),
        original.result,
        "the seed is kept in the checkpoint"
    );
    let (plan, _) = ex
        .ledger()
        .rollback(&[root.seq.unwrap()], true, "test", [0; 32])
        .unwrap();
    assert_eq!(plan.replay, vec![original.seq.unwrap()]);
    // A replay (the incident service's) runs the original's request seeded from its
    // checkpoint.
    let replayed = ex
        .execute_seeded(
            &TxRequest {
                handler: cp.handler.clone(),
                payload: cp.request.clone(),
                client: "replay:test".into(),
            },
            cp.entropy_seed,
        )
        .unwrap();
    assert_eq!(
        replayed.result, original.result,
        "the replay's domain got the original seed"
    );
    // A fresh run of the same handler gets fresh entropy.
    assert_ne!(run(&ex, "rand").result, original.result);
}
