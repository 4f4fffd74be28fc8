//! The backend's index and slot handling against a hostile guest.
//!
//! The input is a script. Its first part fills the ring's shared memory (after the backend
//! initialised it), the rest is a sequence of operations: the guest writing words or bytes
//! anywhere in the ring, and the backend receiving, final-checking and responding. The
//! backend must never panic, never hand out a message longer than a slot allows, and, once it
//! reports a protocol violation, refuse everything after.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly_ring::{Backend, Geometry, MockMem, RingError, SharedMem};

/// Small geometry so that the fuzzer reaches every slot and wraps indices quickly.
const SLOTS: u32 = 4;

fuzz_target!(|data: &[u8]| {
    let geometry = Geometry::new(SLOTS, 1).expect("valid geometry");
    let mem = MockMem::new(geometry.total_len()).expect("allocation");
    let mut backend = Backend::new(&mem, geometry).expect("ring fits");

    let (prefill_len, script) = match data.split_first() {
        Some((&n, rest)) => (usize::from(n) * 16, rest),
        None => return,
    };
    let (prefill, script) = script.split_at(prefill_len.min(script.len()));
    // The guest overwrites the start of the ring (header, indices, descriptors).
    mem.write_bytes(0, prefill)
        .expect("prefill is within page 0");

    let mut ops = script;
    let mut violated = false;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let result: Result<(), RingError> = match op % 8 {
            // Guest: store a word at a word offset (anywhere in the ring).
            0 | 1 => {
                let Some((arg, rest)) = ops.split_first_chunk::<6>() else {
                    break;
                };
                ops = rest;
                let word = usize::from(u16::from_le_bytes([arg[0], arg[1]]));
                let offset = (word * 4) % geometry.total_len();
                let value = u32::from_le_bytes([arg[2], arg[3], arg[4], arg[5]]);
                mem.store_u32_release(offset, value).expect("in bounds");
                Ok(())
            }
            // Guest: copy a short byte string into a window.
            2 => {
                let Some((&[slot, len], rest)) = ops.split_first_chunk::<2>() else {
                    break;
                };
                let len = usize::from(len).min(rest.len());
                let (bytes, rest) = rest.split_at(len);
                ops = rest;
                let window = 4096 + usize::from(slot % SLOTS as u8) * 4096;
                mem.write_bytes(window, bytes).expect("in bounds");
                Ok(())
            }
            // Guest: publish the next message honestly-looking (seq and len in range).
            3 => {
                let Some((&[len_lo, len_hi], rest)) = ops.split_first_chunk::<2>() else {
                    break;
                };
                ops = rest;
                let index = mem.load_u32_relaxed(0x40).expect("in bounds");
                let slot = (index % SLOTS) as usize;
                let len = u32::from(u16::from_le_bytes([len_lo, len_hi])) % 4200;
                mem.store_u32_relaxed(0x100 + slot * 8, index)
                    .expect("in bounds");
                mem.store_u32_relaxed(0x104 + slot * 8, len)
                    .expect("in bounds");
                mem.store_u32_release(0x40, index.wrapping_add(1))
                    .expect("in bounds");
                Ok(())
            }
            4 => backend.try_recv().map(|message| {
                if let Some(message) = message {
                    assert!(message.len() <= geometry.max_message_len());
                }
            }),
            5 => backend.try_recv_request().map(|request| {
                if let Some(request) = request {
                    let again = request.body.encode(request.id).expect("re-encodes");
                    assert!(again.len() <= geometry.max_message_len());
                }
            }),
            6 => backend.final_check_for_requests().map(|_| ()),
            _ => backend.send(b"reply").map(|_| ()),
        };
        match result {
            Ok(()) => assert!(
                !violated || op % 8 < 4,
                "a poisoned backend accepted a call"
            ),
            Err(e) if e.is_protocol_violation() => {
                violated = true;
                assert!(backend.is_poisoned());
            }
            Err(RingError::NoRequestOutstanding { .. }) => assert!(!violated),
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
});
