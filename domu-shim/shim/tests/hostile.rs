//! The hostile `test.*` handlers (feature `test-handlers`): each really attempts its misdeed,
//! and a real backend sees each ring violation.

#![cfg(feature = "test-handlers")]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use common::{start, transact, wait_exit, Agent, End, Spawned};
use domu_shim::test_handlers::{self, RawOutcome, RawRing};
use domu_shim::{try_run, Config, Outcome};
use mayfly_ring::layout::{offset, RING_MAGIC};
use mayfly_ring::wire::{Start, PROTOCOL_VERSION};
use mayfly_ring::{
    Backend, EventFdNotifier, Frontend, Geometry, MmapMem, Notifier, Request, Response, RingError,
    SharedMem, Wake,
};

const EXE: &str = env!("CARGO_BIN_EXE_domu-shim");
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

/// A ring after the Ready/Start handshake, both ends in this thread.
struct Handshaken {
    mem: Arc<MmapMem>,
    backend: Backend<Arc<MmapMem>>,
    agent: EventFdNotifier,
    guest: EventFdNotifier,
    geometry: Geometry,
}

fn handshaken() -> Handshaken {
    let geometry = Geometry::DEFAULT;
    let mem = Arc::new(MmapMem::anonymous(geometry.total_len()).unwrap());
    let mut backend = Backend::new(Arc::clone(&mem), geometry).unwrap();
    let (agent, guest) = EventFdNotifier::pair().unwrap();
    let mut frontend = Frontend::attach(Arc::clone(&mem)).unwrap();
    frontend
        .send_request(
            &Request::Ready {
                protocol_version: PROTOCOL_VERSION,
                handlers: Vec::new(),
            },
            &guest,
        )
        .unwrap();
    let ready = backend.try_recv_request().unwrap().unwrap();
    let start = Start {
        tx_id: [0; 16],
        handler: "test.x".into(),
        payload: Vec::new(),
        entropy_seed: [5; 32],
    };
    backend
        .send_response(ready.id, &Response::Start(start), &agent)
        .unwrap();
    assert!(matches!(
        frontend.try_recv_response().unwrap().unwrap().body,
        Response::Start(_)
    ));
    // Drain the Ready notification so that a later wake-up is the handler's.
    agent.wait(Some(Duration::ZERO)).unwrap();
    Handshaken {
        mem,
        backend,
        agent,
        guest,
        geometry,
    }
}

/// Runs raw handler `name` on a handshaken ring; checks that it asks to await destruction
/// and notified the agent; returns the backend's error on its next receive.
fn sabotage(name: &str) -> (RingError, Handshaken) {
    let mut h = handshaken();
    let handler = test_handlers::get(name).unwrap();
    let outcome = {
        let mut raw = RawRing::new(&*h.mem, &h.guest, h.geometry, [9; 32]);
        handler(&mut raw, b"")
    };
    assert_eq!(outcome, RawOutcome::AwaitDestruction, "{name}");
    assert_eq!(
        h.agent.wait(Some(Duration::ZERO)).unwrap(),
        Wake::Notified,
        "{name} notified the agent"
    );
    let err = h.backend.try_recv_request().unwrap_err();
    assert!(err.is_protocol_violation(), "{name}: {err}");
    assert!(h.backend.is_poisoned());
    (err, h)
}

#[test]
fn ring_garbage_overwrites_the_header_and_is_a_violation() {
    let (_err, h) = sabotage("test.ring_garbage");
    assert_ne!(h.mem.load_u32_relaxed(offset::MAGIC).unwrap(), RING_MAGIC);
    let mut tail = vec![0u8; 4096];
    h.mem.read_bytes(h.mem.len() - 4096, &mut tail).unwrap();
    assert!(
        tail.iter().any(|&b| b != 0),
        "the last page was overwritten too"
    );
}

#[test]
fn bad_index_is_a_request_overflow() {
    let (err, _) = sabotage("test.bad_index");
    assert!(
        matches!(err, RingError::RequestOverflow { req_prod, .. } if req_prod == 0x8000_0001),
        "{err}"
    );
}

#[test]
fn overflow_claims_more_requests_than_slots() {
    let (err, h) = sabotage("test.overflow");
    let slots = h.geometry.slot_count();
    assert!(
        matches!(err, RingError::RequestOverflow { req_prod, .. } if req_prod == 1 + slots + 1),
        "{err}"
    );
}

#[test]
fn huge_length_is_refused_before_copying() {
    let (err, _) = sabotage("test.huge_length");
    assert!(
        matches!(
            err,
            RingError::MessageLength {
                index: 1,
                len: u32::MAX,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_encoding_is_a_decode_error_in_a_well_indexed_slot() {
    let (err, _) = sabotage("test.bad_encoding");
    assert!(matches!(err, RingError::Decode { index: 1, .. }), "{err}");
}

fn in_thread(handler: &str, seed: [u8; 32], config: Config) -> (Outcome, common::Record) {
    let (outcome, record) = transact(
        start(handler, b"", seed),
        Agent::default(),
        move |mem, n| try_run(mem, &n, &mayfly_handlers::registry(), &config),
    );
    (outcome.unwrap(), record)
}

#[test]
fn random_differs_across_seeds_and_repeats_for_one_seed() {
    let draw = |seed| match in_thread("test.random", seed, Config::default()).1.end {
        End::Committed(bytes) => bytes,
        other => panic!("{other:?}"),
    };
    let a = draw([1; 32]);
    assert_eq!(a.len(), 32);
    assert_eq!(a, draw([1; 32]));
    assert_ne!(a, draw([2; 32]));
}

#[test]
fn panic_is_caught_and_aborts() {
    let (outcome, record) = in_thread("test.panic", [0; 32], Config::default());
    assert_eq!(
        outcome,
        Outcome::Aborted {
            reason: "handler panicked".into()
        }
    );
    assert_eq!(record.end, End::Aborted("handler panicked".into()));
}

#[test]
fn test_handlers_can_be_switched_off() {
    let mut config = Config::default();
    config.test_handlers = false;
    let (outcome, _) = in_thread("test.random", [0; 32], config);
    assert_eq!(
        outcome,
        Outcome::Aborted {
            reason: "unknown handler \"test.random\"".into()
        }
    );
}

/// Spawns the binary and serves `handler`, waiting at most `wait` for each request.
fn spawned(handler: &str, wait: Duration) -> (Spawned, common::Record) {
    let mut shim = Spawned::new(EXE);
    let agent = Agent {
        wait: Some(wait),
        ..Agent::default()
    };
    let record = shim.serve(start(handler, b"", [4; 32]), agent);
    (shim, record)
}

#[test]
fn crash_kills_the_process_with_sigabrt() {
    let (mut shim, record) = spawned("test.crash", Duration::from_millis(300));
    assert!(matches!(record.end, End::Stopped(_)), "{:?}", record.end);
    let status = wait_exit(&mut shim.child, Duration::from_secs(10));
    assert_eq!(status.signal(), Some(SIGABRT), "{status:?}");
}

#[test]
fn loop_forever_keeps_running_until_killed() {
    let (mut shim, record) = spawned("test.loop_forever", Duration::from_millis(300));
    let End::Stopped(why) = &record.end else {
        panic!("{:?}", record.end)
    };
    assert!(why.contains("no message within"), "{why}");
    assert!(shim.child.try_wait().unwrap().is_none(), "still spinning");
    shim.child.kill().unwrap();
    let status = wait_exit(&mut shim.child, Duration::from_secs(10));
    assert_eq!(status.signal(), Some(SIGKILL));
}

#[test]
fn ring_garbage_from_a_process_is_seen_and_the_process_waits_to_be_destroyed() {
    let (mut shim, record) = spawned("test.ring_garbage", Duration::from_secs(10));
    let End::Stopped(why) = &record.end else {
        panic!("{:?}", record.end)
    };
    assert!(shim.backend.is_poisoned(), "{why}");
    assert!(
        shim.child.try_wait().unwrap().is_none(),
        "awaiting destruction"
    );
}

#[test]
fn open_file_really_opens_it_when_unconfined() {
    let (mut shim, record) = spawned("test.open_file", Duration::from_secs(10));
    let End::Committed(bytes) = &record.end else {
        panic!("{:?}", record.end)
    };
    let expected = std::fs::read("/etc/passwd").unwrap();
    assert_eq!(bytes[..], expected[..bytes.len()]);
    assert!(!bytes.is_empty());
    assert_eq!(
        wait_exit(&mut shim.child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[test]
fn spawn_really_runs_a_shell_when_unconfined() {
    let (mut shim, record) = spawned("test.spawn", Duration::from_secs(10));
    let End::Committed(bytes) = &record.end else {
        panic!("{:?}", record.end)
    };
    let text = String::from_utf8_lossy(bytes);
    assert!(text.ends_with("escaped\n"), "{text}");
    assert_eq!(
        wait_exit(&mut shim.child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[test]
fn socket_attempts_both_protocols_and_reports() {
    let (mut shim, record) = spawned("test.socket", Duration::from_secs(10));
    let report = match &record.end {
        End::Committed(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        End::Aborted(reason) => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert!(report.contains("tcp") && report.contains("udp"), "{report}");
    // Unconfined, binding a loopback UDP socket works: the handler reports an escape.
    assert!(report.contains("udp: bound 127.0.0.1:"), "{report}");
    assert!(matches!(record.end, End::Committed(_)));
    assert_eq!(
        wait_exit(&mut shim.child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[test]
fn raw_ring_exposes_its_state() {
    let h = handshaken();
    let raw = RawRing::new(&*h.mem, &h.guest, h.geometry, [0; 32]);
    assert_eq!(raw.geometry(), Geometry::DEFAULT);
    assert_eq!(raw.req_prod().unwrap(), 1);
    raw.notifier().notify().unwrap();
    assert_eq!(h.agent.wait(Some(Duration::ZERO)).unwrap(), Wake::Notified);
}

#[test]
fn ping_makes_exactly_n_round_trips_and_refuses_bad_counts() {
    let (outcome, record) = transact(
        start("test.ping", b"25", [0; 32]),
        Agent::default(),
        move |mem, n| try_run(mem, &n, &mayfly_handlers::registry(), &Config::default()),
    );
    assert_eq!(outcome.unwrap(), Outcome::Committed);
    assert_eq!(record.end, End::Committed(b"25".to_vec()));
    assert_eq!(record.ops, 25);
    for bad in [&b""[..], b"0", b"-1", b"100001", b"1e3", b" 5"] {
        let (outcome, record) = transact(
            start("test.ping", bad, [0; 32]),
            Agent::default(),
            move |mem, n| try_run(mem, &n, &mayfly_handlers::registry(), &Config::default()),
        );
        assert!(
            matches!(outcome.unwrap(), Outcome::Aborted { .. }),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        assert_eq!(record.ops, 0);
    }
}
