//! A frontend and a backend on two threads exchange thousands of messages through a real
//! memfd-backed ring (two separate mappings of the same pages) with eventfd notification.
//! Synchronisation is only the ring and the eventfds: no sleeps. Every wait has a deadline.

// Test data is built with deliberate truncating casts.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use mayfly_ring::wire::{LogLevel, ScanResultBuilder, Start, MAX_VALUE_LEN};
use mayfly_ring::{
    Backend, EventFdNotifier, Frontend, Geometry, MmapMem, Notifier, Request, Response, RingError,
    SharedMem,
};

const ROUNDS: u32 = 2_000;
const TIMEOUT: Duration = Duration::from_secs(20);

fn value_for(i: u32) -> Vec<u8> {
    let len = match i % 10 {
        0 => MAX_VALUE_LEN,
        1 => 0,
        _ => (i as usize * 7919) % 9000,
    };
    (0..len).map(|j| (j as u32).wrapping_add(i) as u8).collect()
}

/// The agent: a toy key-value store served over the ring until `Commit`.
fn serve<M: SharedMem>(mut backend: Backend<M>, notifier: impl Notifier) -> Result<u32, RingError> {
    let mut store: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut served = 0;
    loop {
        let request = backend.recv_request(&notifier, Some(TIMEOUT))?;
        served += 1;
        let mut done = false;
        let response = match request.body {
            Request::Ready {
                protocol_version,
                handlers,
            } => {
                assert_eq!(protocol_version, mayfly_ring::wire::PROTOCOL_VERSION);
                assert_eq!(handlers, ["kv_test"]);
                Response::Start(Start {
                    tx_id: [0x11; 16],
                    handler: "kv_test".into(),
                    payload: b"go".to_vec(),
                    entropy_seed: [0x22; 32],
                })
            }
            Request::Get { key } => Response::Value(store.get(&key).cloned()),
            Request::Put { key, value } => {
                store.insert(key, value);
                Response::Ok
            }
            Request::Delete { key } => {
                store.remove(&key);
                Response::Ok
            }
            Request::Scan { start, end, limit } => {
                let mut builder = ScanResultBuilder::new(limit);
                let mut more = false;
                for (k, v) in store.range(start..) {
                    if end.as_ref().is_some_and(|e| k >= e) {
                        break;
                    }
                    if !builder.try_push(k.clone(), v.clone()).unwrap() {
                        more = true;
                        break;
                    }
                }
                builder.finish(more)
            }
            Request::Log { .. } => Response::Ok,
            Request::Commit { .. } => {
                done = true;
                Response::Committed
            }
            Request::Abort { .. } => Response::Aborted,
        };
        backend.send_response(request.id, &response, &notifier)?;
        if done {
            return Ok(served);
        }
    }
}

#[test]
fn thousands_of_messages_cross_a_memfd_ring() {
    let started = Instant::now();
    let geometry = Geometry::DEFAULT;
    let agent_mem = MmapMem::memfd(c"mayfly-ring-exchange", geometry.total_len()).unwrap();
    let guest_mem = MmapMem::from_fd(agent_mem.fd().unwrap(), geometry.total_len()).unwrap();
    let (agent_bell, guest_bell) = EventFdNotifier::pair().unwrap();
    let backend = Backend::new(agent_mem, geometry).unwrap();
    let agent = thread::spawn(move || serve(backend, agent_bell));

    let mut front = Frontend::attach(guest_mem).unwrap();
    assert_eq!(front.geometry(), geometry);
    let sent = std::cell::Cell::new(0u32);
    let call = |front: &mut Frontend<MmapMem>, request: Request| {
        sent.set(sent.get() + 1);
        front.call(&request, &guest_bell, Some(TIMEOUT)).unwrap()
    };

    let start = call(
        &mut front,
        Request::Ready {
            protocol_version: mayfly_ring::wire::PROTOCOL_VERSION,
            handlers: vec!["kv_test".into()],
        },
    );
    assert!(matches!(start, Response::Start(s) if s.handler == "kv_test"));

    for i in 0..ROUNDS {
        let key = format!("key/{i:05}").into_bytes();
        let put = Request::Put {
            key: key.clone(),
            value: value_for(i),
        };
        assert_eq!(call(&mut front, put), Response::Ok);
        let got = call(&mut front, Request::Get { key });
        assert_eq!(got, Response::Value(Some(value_for(i))));
        if i % 3 == 0 {
            let del = Request::Delete {
                key: format!("key/{i:05}").into_bytes(),
            };
            assert_eq!(call(&mut front, del), Response::Ok);
        }

        // Pipeline: fill every slot before collecting the replies, in order.
        if i % 50 == 0 {
            let slots = front.geometry().slot_count();
            let mut ids = Vec::new();
            for j in 0..slots {
                let log = Request::Log {
                    level: LogLevel::Debug,
                    line: format!("round {i} line {j}"),
                };
                ids.push(front.send_request(&log, &guest_bell).unwrap());
                sent.set(sent.get() + 1);
            }
            assert!(matches!(
                front.send_request(&Request::Get { key: b"x".to_vec() }, &guest_bell),
                Err(RingError::Full { .. })
            ));
            for id in ids {
                let reply = front.recv_response(&guest_bell, Some(TIMEOUT)).unwrap();
                assert_eq!((reply.id, reply.body), (id, Response::Ok));
            }
        }
    }

    // Scan everything that was not deleted: 1024 entries per page at most, and the
    // 64 KiB values force short pages with `more` set.
    let mut start_key = Vec::new();
    let mut seen = 0u32;
    loop {
        let scan = Request::Scan {
            start: start_key.clone(),
            end: Some(b"key/~".to_vec()),
            limit: 1024,
        };
        let Response::ScanResult { entries, more } = call(&mut front, scan) else {
            panic!("not a scan result");
        };
        seen += entries.len() as u32;
        if !more {
            break;
        }
        start_key = entries.last().unwrap().key.clone();
        start_key.push(0);
    }
    assert_eq!(seen, ROUNDS - ROUNDS.div_ceil(3));

    assert_eq!(
        call(
            &mut front,
            Request::Commit {
                result: b"done".to_vec()
            }
        ),
        Response::Committed
    );
    let served = agent.join().unwrap().unwrap();
    assert_eq!(served, sent.get());
    assert!(served > 5_000, "only {served} messages");
    assert!(started.elapsed() < Duration::from_secs(120));
}
