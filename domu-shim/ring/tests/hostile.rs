//! A hostile frontend writes garbage indices, descriptors, lengths and encodings straight
//! into the shared pages (through its own mapping of the agent's memfd). The backend must
//! answer with clear errors: never panic, never read out of bounds, never wait forever.

// Test data is built with deliberate truncating casts.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mayfly_ring::layout::{offset, DATA_OFFSET};
use mayfly_ring::wire::{Request, WireError};
use mayfly_ring::{Backend, EventFdNotifier, Geometry, MmapMem, Notifier, RingError, SharedMem};
use proptest::prelude::*;

/// The agent's backend and the guest's own mapping of the same pages.
fn ring(geometry: Geometry) -> (Backend<MmapMem>, MmapMem) {
    let agent = MmapMem::memfd(c"mayfly-ring-hostile", geometry.total_len()).unwrap();
    let guest = MmapMem::from_fd(agent.fd().unwrap(), geometry.total_len()).unwrap();
    (Backend::new(agent, geometry).unwrap(), guest)
}

fn descriptor(slot: usize) -> usize {
    offset::DESCRIPTORS + 8 * slot
}

/// Publishes message `index` with raw contents, as a (possibly lying) guest.
fn publish(guest: &MmapMem, geometry: Geometry, index: u32, seq: u32, len: u32, bytes: &[u8]) {
    let slot = (index % geometry.slot_count()) as usize;
    guest
        .write_bytes(DATA_OFFSET + slot * geometry.window_size(), bytes)
        .unwrap();
    guest.store_u32_relaxed(descriptor(slot), seq).unwrap();
    guest.store_u32_relaxed(descriptor(slot) + 4, len).unwrap();
    guest
        .store_u32_release(offset::REQ_PROD, index + 1)
        .unwrap();
}

fn expect_violation(result: Result<impl std::fmt::Debug, RingError>) -> RingError {
    let err = result.expect_err("the backend accepted garbage");
    assert!(err.is_protocol_violation(), "{err}");
    // The message names what was wrong.
    assert!(!err.to_string().is_empty());
    err
}

#[test]
fn garbage_indices() {
    let g = Geometry::DEFAULT;
    for req_prod in [5, 1000, u32::MAX, 0x8000_0000] {
        let (mut back, guest) = ring(g);
        guest.store_u32_release(offset::REQ_PROD, req_prod).unwrap();
        let err = expect_violation(back.try_recv_request());
        assert!(matches!(err, RingError::RequestOverflow { req_prod: p, .. } if p == req_prod));
        // Poisoned for good, whatever the guest writes next.
        guest.store_u32_release(offset::REQ_PROD, 0).unwrap();
        assert!(matches!(back.try_recv_request(), Err(RingError::Poisoned)));
    }
}

#[test]
fn garbage_descriptors() {
    let g = Geometry::DEFAULT;
    let valid = Request::Get { key: b"k".to_vec() }.encode(1).unwrap();
    let n = valid.len() as u32;

    let (mut back, guest) = ring(g);
    publish(&guest, g, 0, 0xdead_beef, n, &valid);
    let err = expect_violation(back.try_recv_request());
    assert!(matches!(
        err,
        RingError::SlotSequence {
            index: 0,
            slot: 0,
            found: 0xdead_beef
        }
    ));

    for len in [u32::MAX, 69_633, 0x1000_0000] {
        let (mut back, guest) = ring(g);
        publish(&guest, g, 0, 0, len, &valid);
        let err = expect_violation(back.try_recv_request());
        assert!(matches!(err, RingError::MessageLength { len: l, .. } if l == len));
    }

    // A short length cuts a valid message: a decode error, not an over-read.
    let (mut back, guest) = ring(g);
    publish(&guest, g, 0, 0, n - 1, &valid);
    assert!(matches!(
        expect_violation(back.try_recv_request()),
        RingError::Decode { index: 0, .. }
    ));
    // Zero length.
    let (mut back, guest) = ring(g);
    publish(&guest, g, 0, 0, 0, &[]);
    assert!(matches!(
        expect_violation(back.try_recv_request()),
        RingError::Decode {
            source: WireError::Truncated { field: "magic", .. },
            ..
        }
    ));
}

#[test]
fn garbage_encodings() {
    let g = Geometry::DEFAULT;
    let put = Request::Put {
        key: b"key".to_vec(),
        value: b"value".to_vec(),
    }
    .encode(3)
    .unwrap();
    type Check = fn(&WireError) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        // Body length lies (says 1 GiB).
        (
            {
                let mut m = put.clone();
                m[12..16].copy_from_slice(&0x4000_0000u32.to_be_bytes());
                m
            },
            |e| {
                matches!(
                    e,
                    WireError::BodyLength {
                        declared: 0x4000_0000,
                        ..
                    }
                )
            },
        ),
        // Key length prefix far past the end and over the cap.
        (
            {
                let mut m = put.clone();
                m[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
                m
            },
            |e| matches!(e, WireError::FieldTooLong { field: "key", .. }),
        ),
        // Value length within its cap but past the end of the message.
        (
            {
                let mut m = put.clone();
                m[23..27].copy_from_slice(&60_000u32.to_be_bytes());
                m
            },
            |e| matches!(e, WireError::Truncated { field: "value", .. }),
        ),
        // Unknown type.
        (
            {
                let mut m = put.clone();
                m[6..8].copy_from_slice(&0x7777u16.to_be_bytes());
                m
            },
            |e| matches!(e, WireError::BadType { tag: 0x7777, .. }),
        ),
        // Random junk.
        (vec![0xa5; 300], |e| matches!(e, WireError::BadMagic { .. })),
    ];
    for (bytes, check) in cases {
        let (mut back, guest) = ring(g);
        publish(&guest, g, 0, 0, bytes.len() as u32, &bytes);
        match expect_violation(back.try_recv_request()) {
            RingError::Decode { index: 0, source } => assert!(check(&source), "{source}"),
            other => panic!("unexpected {other}"),
        }
    }
}

#[test]
fn a_guest_cannot_make_the_backend_wait_forever() {
    let g = Geometry::new(2, 1).unwrap();
    let (mut back, _guest) = ring(g);
    let (agent_bell, guest_bell) = EventFdNotifier::pair().unwrap();
    // The guest rings the doorbell in a tight loop without publishing anything: the backend
    // wakes and re-checks, and after a bounded number of wake-ups that find nothing (well
    // before its deadline, however long) calls it a doorbell flood: a protocol violation.
    let stop = Arc::new(AtomicBool::new(false));
    let spammer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut rings = 0u64;
            while !stop.load(Ordering::Relaxed) {
                guest_bell.notify().unwrap();
                rings += 1;
            }
            rings
        })
    };
    let start = Instant::now();
    let err = back
        .recv_request(&agent_bell, Some(Duration::from_secs(60)))
        .unwrap_err();
    stop.store(true, Ordering::Relaxed);
    spammer.join().unwrap();
    assert!(matches!(err, RingError::DoorbellFlood { .. }), "{err}");
    assert!(err.is_protocol_violation());
    assert!(back.is_poisoned());
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_guest_racing_the_backend_gets_errors_not_panics() {
    let g = Geometry::new(4, 1).unwrap();
    let agent = Arc::new(MmapMem::memfd(c"mayfly-ring-race", g.total_len()).unwrap());
    let guest = MmapMem::from_fd(agent.fd().unwrap(), g.total_len()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let valid = Request::Get { key: b"k".to_vec() }.encode(1).unwrap();

    let scribbler = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let r = x as u32;
                match x >> 61 {
                    0 => guest.store_u32_release(offset::REQ_PROD, r % 8).unwrap(),
                    1 => guest
                        .store_u32_relaxed(descriptor((r % 4) as usize), r % 8)
                        .unwrap(),
                    2 => guest
                        .store_u32_relaxed(descriptor((r % 4) as usize) + 4, r % 5000)
                        .unwrap(),
                    3 => guest
                        .write_bytes(DATA_OFFSET + (r as usize % 4) * 4096, &valid)
                        .unwrap(),
                    _ => guest
                        .write_bytes(DATA_OFFSET + (r as usize % 16_000), &x.to_ne_bytes())
                        .unwrap(),
                }
                writes += 1;
            }
            writes
        })
    };

    let (mut accepted, mut refused) = (0u32, 0u32);
    // Bounded by count and by time; under heavy load the scribbler may barely run, so the
    // test asserts only that nothing panicked and every refusal was a clean violation.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && accepted + refused < 20_000 {
        let mut back = Backend::new(Arc::clone(&agent), g).unwrap();
        for _ in 0..8 {
            match back.try_recv_request() {
                Ok(Some(req)) => {
                    // Whatever was accepted is a well-formed request.
                    assert!(req.body.encode(req.id).is_ok());
                    accepted += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    assert!(e.is_protocol_violation(), "{e}");
                    refused += 1;
                    break;
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = scribbler.join().unwrap();
    eprintln!("racing guest: {writes} writes, {accepted} accepted, {refused} refused");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary writes by the guest anywhere in the ring, interleaved with backend calls.
    #[test]
    fn arbitrary_guest_writes_never_panic_the_backend(
        writes in prop::collection::vec((0usize..(4096 + 4 * 4096) / 4, any::<u32>()), 0..64),
        ops in prop::collection::vec(0u8..4, 1..16),
    ) {
        let g = Geometry::new(4, 1).unwrap();
        let (mut back, guest) = ring(g);
        for (word, value) in writes {
            guest.store_u32_relaxed(word * 4, value).unwrap();
        }
        for op in ops {
            let result = match op {
                0 => back.try_recv_request().map(|_| ()),
                1 => back.try_recv().map(|m| {
                    assert!(m.is_none_or(|m| m.len() <= g.max_message_len()));
                }),
                2 => back.final_check_for_requests().map(|_| ()),
                _ => back.send(b"reply").map(|_| ()),
            };
            if let Err(e) = result {
                let expected = e.is_protocol_violation()
                    || matches!(e, RingError::NoRequestOutstanding { .. });
                prop_assert!(expected, "unexpected error: {}", e);
            }
        }
    }
}
