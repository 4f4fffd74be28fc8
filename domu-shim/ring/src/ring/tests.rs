use super::*;
use crate::layout::DATA_OFFSET;
use crate::mem::MockMem;
use crate::notify::Wake;
use crate::wire::{LogLevel, Start};
use std::cell::Cell;

/// A notifier that counts notifications and never sleeps.
#[derive(Default)]
struct Counter {
    notified: Cell<u32>,
}

impl Notifier for Counter {
    fn notify(&self) -> Result<(), NotifyError> {
        self.notified.set(self.notified.get() + 1);
        Ok(())
    }

    fn wait(&self, _timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        Ok(Wake::TimedOut)
    }
}

fn small() -> Geometry {
    Geometry::new(4, 1).unwrap()
}

fn ring(geometry: Geometry) -> MockMem {
    MockMem::new(geometry.total_len()).unwrap()
}

fn get(key: &[u8]) -> Request {
    Request::Get { key: key.to_vec() }
}

#[test]
fn request_and_response_round_trip() {
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    assert_eq!(front.geometry(), small());
    let n = Counter::default();

    let id = front
        .send_request(
            &Request::Ready {
                protocol_version: crate::wire::PROTOCOL_VERSION,
                handlers: vec!["kv_get".into()],
            },
            &n,
        )
        .unwrap();
    let req = back.try_recv_request().unwrap().unwrap();
    assert_eq!(req.id, id);
    assert_eq!(
        req.body,
        Request::Ready {
            protocol_version: crate::wire::PROTOCOL_VERSION,
            handlers: vec!["kv_get".into()],
        }
    );
    assert!(back.try_recv_request().unwrap().is_none());

    let start = Response::Start(Start {
        tx_id: [7; 16],
        handler: "transfer".into(),
        payload: b"{}".to_vec(),
        entropy_seed: [9; 32],
    });
    back.send_response(req.id, &start, &n).unwrap();
    let rsp = front.try_recv_response().unwrap().unwrap();
    assert_eq!(rsp, Envelope { id, body: start });
    assert!(front.try_recv_response().unwrap().is_none());
    assert_eq!(front.in_flight(), 0);
}

/// A notifier whose `wait` plays the backend: it answers every pending request with `Ok`,
/// echoing the request id plus `id_skew`.
struct Answering<'a> {
    back: std::cell::RefCell<Backend<&'a MockMem>>,
    id_skew: u32,
}

impl Notifier for Answering<'_> {
    fn notify(&self) -> Result<(), NotifyError> {
        Ok(())
    }

    fn wait(&self, _timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        let mut back = self.back.borrow_mut();
        while let Some(req) = back.try_recv_request().unwrap() {
            let id = req.id.wrapping_add(self.id_skew);
            back.send_response(id, &Response::Ok, &Counter::default())
                .unwrap();
        }
        Ok(Wake::Notified)
    }
}

#[test]
fn call_checks_the_echoed_id() {
    let mem = ring(small());
    let honest = Answering {
        back: Backend::new(&mem, small()).unwrap().into(),
        id_skew: 0,
    };
    let mut front = Frontend::attach(&mem).unwrap();
    for _ in 0..10 {
        let reply = front.call(&get(b"a"), &honest, Some(Duration::from_secs(5)));
        assert_eq!(reply.unwrap(), Response::Ok);
    }

    let mem = ring(small());
    let skewed = Answering {
        back: Backend::new(&mem, small()).unwrap().into(),
        id_skew: 5,
    };
    let mut front = Frontend::attach(&mem).unwrap();
    let err = front.call(&get(b"a"), &skewed, None).unwrap_err();
    assert!(matches!(
        err,
        RingError::IdMismatch {
            index: 0,
            expected: 1,
            found: 6
        }
    ));
    assert!(matches!(
        front.call(&get(b"a"), &skewed, None),
        Err(RingError::Poisoned)
    ));
}

#[test]
fn notifications_follow_the_event_indices() {
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    // req_event starts at 1: the first request notifies.
    assert!(front.send(&get(b"1").encode(1).unwrap()).unwrap());
    // The backend has not re-armed: the second does not.
    assert!(!front.send(&get(b"2").encode(2).unwrap()).unwrap());
    assert!(back.try_recv().unwrap().is_some());
    assert!(back.try_recv().unwrap().is_some());
    // Final check with nothing pending arms req_event = req_cons + 1 = 3.
    assert!(!back.final_check_for_requests().unwrap());
    assert_eq!(mem.load_u32_relaxed(offset::REQ_EVENT).unwrap(), 3);
    assert!(front.send(&get(b"3").encode(3).unwrap()).unwrap());
    // A final check with work pending reports it without sleeping.
    assert!(back.final_check_for_requests().unwrap());

    // Responses: rsp_event starts at 1.
    assert!(back.send(&Response::Ok.encode(1).unwrap()).unwrap());
    assert!(!back.send(&Response::Ok.encode(2).unwrap()).unwrap());
    assert!(front.final_check_for_responses().unwrap());
    assert!(front.try_recv().unwrap().is_some());
    assert!(front.try_recv().unwrap().is_some());
    assert!(!front.final_check_for_responses().unwrap());
    assert!(back.try_recv().unwrap().is_some());
    assert!(back.send(&Response::Ok.encode(3).unwrap()).unwrap());
}

#[test]
fn typed_send_notifies_through_the_notifier() {
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    let n = Counter::default();
    front.send_request(&get(b"k"), &n).unwrap();
    assert_eq!(n.notified.get(), 1);
    front.send_request(&get(b"k"), &n).unwrap();
    assert_eq!(n.notified.get(), 1);
    back.recv_request(&n, Some(Duration::ZERO)).unwrap();
    back.send_response(1, &Response::Value(None), &n).unwrap();
    assert_eq!(n.notified.get(), 2);
}

/// The two directions' notifications of a synchronous exchange: `notify` counts the
/// frontend's; each `wait` plays the backend and answers **one** pending request (the
/// worst interleaving for wake-ups: the guest looks between any two answers), counting the
/// notifications the backend's pushes call for.
struct OneAnswerPerWait<'a> {
    back: std::cell::RefCell<Backend<&'a MockMem>>,
    front_rang: Cell<u32>,
    back_rang: Counter,
}

impl<'a> OneAnswerPerWait<'a> {
    fn new(mem: &'a MockMem) -> Self {
        Self {
            back: Backend::new(mem, small()).unwrap().into(),
            front_rang: Cell::new(0),
            back_rang: Counter::default(),
        }
    }
}

impl Notifier for OneAnswerPerWait<'_> {
    fn notify(&self) -> Result<(), NotifyError> {
        self.front_rang.set(self.front_rang.get() + 1);
        Ok(())
    }

    fn wait(&self, _timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        let mut back = self.back.borrow_mut();
        if let Some(req) = back.try_recv_request().unwrap() {
            back.send_response(req.id, &Response::Ok, &self.back_rang)
                .unwrap();
        }
        Ok(Wake::Notified)
    }
}

#[test]
fn queued_requests_owe_one_notification_until_the_guest_waits() {
    let mem = ring(small());
    let _back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    let n = Counter::default();
    // req_event starts at 1: the first request earns a notification, which is owed.
    assert_eq!(front.queue_request(&get(b"1")).unwrap(), 1);
    assert_eq!(front.queue_request(&get(b"2")).unwrap(), 2);
    assert_eq!(n.notified.get(), 0);
    front.flush(&n).unwrap();
    front.flush(&n).unwrap();
    assert_eq!(n.notified.get(), 1, "one notification for the batch, once");
    // A receive sends what is owed before it looks.
    let mem2 = ring(small());
    let mut back2 = Backend::new(&mem2, small()).unwrap();
    let mut front2 = Frontend::attach(&mem2).unwrap();
    front2.queue_request(&get(b"x")).unwrap();
    assert!(back2.try_recv_request().unwrap().is_some());
    let err = front2.recv_response(&n, Some(Duration::ZERO)).unwrap_err();
    assert!(matches!(err, RingError::Timeout { .. }));
    assert_eq!(
        n.notified.get(),
        2,
        "the owed notification went before the wait"
    );
}

#[test]
fn awaiting_a_batch_is_woken_by_its_last_answer_only() {
    let mem = ring(small());
    let agent = OneAnswerPerWait::new(&mem);
    let mut front = Frontend::attach(&mem).unwrap();
    for key in [b"1", b"2", b"3"] {
        front.queue_request(&get(key)).unwrap();
    }
    front
        .await_responses(&agent, Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(agent.front_rang.get(), 1, "the agent is woken once");
    assert_eq!(agent.back_rang.notified.get(), 1, "the guest is woken once");
    assert_eq!(mem.load_u32_relaxed(offset::RSP_EVENT).unwrap(), 3);
    for id in 1..=3 {
        assert_eq!(front.try_recv_response().unwrap().unwrap().id, id);
    }
    assert!(front.try_recv_response().unwrap().is_none());
    // Nothing in flight: no wait, no notification.
    front.await_responses(&agent, Some(Duration::ZERO)).unwrap();
    assert_eq!(agent.front_rang.get(), 1);

    // The same batch received answer by answer: a wake-up per answer.
    let mem = ring(small());
    let agent = OneAnswerPerWait::new(&mem);
    let mut front = Frontend::attach(&mem).unwrap();
    for key in [b"1", b"2", b"3"] {
        front.send_request(&get(key), &agent).unwrap();
    }
    for _ in 0..3 {
        front
            .recv_response(&agent, Some(Duration::from_secs(5)))
            .unwrap();
    }
    assert_eq!(agent.back_rang.notified.get(), 3);
}

#[test]
fn awaiting_a_batch_times_out_and_reports_a_gone_peer() {
    struct Silent(Wake);
    impl Notifier for Silent {
        fn notify(&self) -> Result<(), NotifyError> {
            Ok(())
        }
        fn wait(&self, _timeout: Option<Duration>) -> Result<Wake, NotifyError> {
            Ok(self.0)
        }
    }
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    front.queue_request(&get(b"1")).unwrap();
    front.queue_request(&get(b"2")).unwrap();
    let err = front
        .await_responses(&Silent(Wake::TimedOut), Some(Duration::from_millis(20)))
        .unwrap_err();
    assert!(matches!(err, RingError::Timeout { .. }));
    // One answer published, then the peer goes: the answer stays to take, the rest never
    // comes.
    back.try_recv_request().unwrap().unwrap();
    back.send_response(1, &Response::Ok, &Counter::default())
        .unwrap();
    let err = front
        .await_responses(&Silent(Wake::PeerGone), None)
        .unwrap_err();
    assert!(matches!(err, RingError::PeerGone));
    assert_eq!(front.try_recv_response().unwrap().unwrap().id, 1);
}

#[test]
fn full_ring_and_unsolicited_responses_are_refused() {
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    assert!(matches!(
        back.send(b"x"),
        Err(RingError::NoRequestOutstanding {
            rsp_prod: 0,
            req_cons: 0
        })
    ));
    for i in 0..4 {
        let _ = front.send(&get(b"k").encode(i).unwrap()).unwrap();
    }
    assert!(matches!(
        front.send(b"x"),
        Err(RingError::Full { slots: 4 })
    ));
    // Consuming a request does not free its slot: the response does.
    back.try_recv().unwrap().unwrap();
    assert!(matches!(front.send(b"x"), Err(RingError::Full { .. })));
    let _ = back.send(b"reply").unwrap();
    assert!(matches!(front.send(b"x"), Err(RingError::Full { .. })));
    assert_eq!(front.try_recv().unwrap().unwrap(), b"reply");
    let _ = front.send(b"fits now").unwrap();
    // Neither side is poisoned by its own mistakes.
    assert!(!back.is_poisoned());
    assert!(!RingError::Full { slots: 4 }.is_protocol_violation());
}

#[test]
fn oversized_messages_are_refused_locally() {
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    let big = vec![0u8; 4097];
    assert!(matches!(
        front.send(&big),
        Err(RingError::TooLarge {
            len: 4097,
            max: 4096
        })
    ));
    let n = Counter::default();
    let err = front
        .send_request(
            &Request::Put {
                key: b"k".to_vec(),
                value: vec![0; 5000],
            },
            &n,
        )
        .unwrap_err();
    assert!(matches!(err, RingError::TooLarge { .. }));
    let err = front.send_request(&get(b""), &n).unwrap_err();
    assert!(matches!(err, RingError::Encode(_)));
    assert!(!err.is_protocol_violation());
    let _ = front.send(&[1; 4096]).unwrap();
    assert_eq!(back.try_recv().unwrap().unwrap(), vec![1; 4096]);
}

#[test]
fn indices_wrap_around_u32() {
    let geometry = small();
    let mem = ring(geometry);
    let mut back = Backend::new(&mem, geometry).unwrap();
    // Move both ends to just below the wrap point, as if 2^32 - 3 messages had passed.
    let start = u32::MAX - 2;
    back.req_cons = start;
    back.rsp_prod = start;
    back.req_prod_seen = start;
    mem.store_u32_relaxed(offset::REQ_PROD, start).unwrap();
    mem.store_u32_relaxed(offset::RSP_PROD, start).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    let n = Counter::default();
    for i in 0..20u32 {
        let id = front
            .send_request(
                &Request::Log {
                    level: LogLevel::Info,
                    line: format!("line {i}"),
                },
                &n,
            )
            .unwrap();
        let req = back.try_recv_request().unwrap().unwrap();
        assert_eq!(req.id, id);
        back.send_response(id, &Response::Ok, &n).unwrap();
        assert_eq!(front.try_recv_response().unwrap().unwrap().id, id);
    }
    assert_eq!(back.requests_consumed(), start.wrapping_add(20));
}

// --- a hostile frontend --------------------------------------------------------------

/// A backend whose frontend published `count` well-formed `Get` requests by hand.
fn with_requests(count: u32) -> (MockMem, Geometry) {
    let geometry = small();
    let mem = ring(geometry);
    let mut front = {
        // Initialise through a throw-away backend; the test builds its own below.
        Backend::new(&mem, geometry).unwrap();
        Frontend::attach(&mem).unwrap()
    };
    for i in 0..count {
        let _ = front.send(&get(b"k").encode(i).unwrap()).unwrap();
    }
    (mem, geometry)
}

/// A backend over already initialised memory (skips `initialise`, which would zero it).
fn backend_over(mem: &MockMem, geometry: Geometry) -> Backend<&MockMem> {
    Backend::over(mem, geometry)
}

#[test]
fn producer_overflow_is_a_violation_and_poisons() {
    let (mem, geometry) = with_requests(0);
    let mut back = backend_over(&mem, geometry);
    mem.store_u32_release(offset::REQ_PROD, 5).unwrap();
    let err = back.try_recv().unwrap_err();
    assert!(matches!(
        err,
        RingError::RequestOverflow {
            req_prod: 5,
            req_cons: 0,
            rsp_prod: 0,
            slots: 4
        }
    ));
    assert!(err.is_protocol_violation());
    assert!(back.is_poisoned());
    // Even a repaired index is not trusted again.
    mem.store_u32_release(offset::REQ_PROD, 0).unwrap();
    assert!(matches!(back.try_recv(), Err(RingError::Poisoned)));
    assert!(matches!(back.send(b"x"), Err(RingError::Poisoned)));
    assert!(matches!(
        back.final_check_for_requests(),
        Err(RingError::Poisoned)
    ));
}

#[test]
fn producer_index_moving_backwards_is_a_violation() {
    let (mem, geometry) = with_requests(3);
    let mut back = backend_over(&mem, geometry);
    back.try_recv().unwrap().unwrap();
    back.try_recv().unwrap().unwrap();
    // req_prod goes from 3 to 1, behind req_cons = 2.
    mem.store_u32_release(offset::REQ_PROD, 1).unwrap();
    assert!(matches!(
        back.has_unconsumed_requests(),
        Err(RingError::RequestOverflow { req_prod: 1, .. })
    ));
    // Back to exactly req_cons: not below the consumer, but below a value already seen.
    let (mem, geometry) = with_requests(3);
    let mut back = backend_over(&mem, geometry);
    back.try_recv().unwrap().unwrap();
    back.try_recv().unwrap().unwrap();
    mem.store_u32_release(offset::REQ_PROD, 2).unwrap();
    let err = back.try_recv().unwrap_err();
    assert!(matches!(
        err,
        RingError::IndexRegressed {
            index: "req_prod",
            found: 2,
            previous: 3
        }
    ));
    assert!(err.is_protocol_violation());
    // A guest flipping req_prod between req_cons and req_cons + 1 (so that the final check
    // and the receive disagree forever) is caught the first time it goes back.
    let (mem, geometry) = with_requests(0);
    let mut back = backend_over(&mem, geometry);
    mem.store_u32_release(offset::REQ_PROD, 1).unwrap();
    assert!(back.final_check_for_requests().unwrap());
    mem.store_u32_release(offset::REQ_PROD, 0).unwrap();
    assert!(matches!(
        back.try_recv(),
        Err(RingError::IndexRegressed { .. })
    ));
    // And the maximal wrap-around lie.
    let (mem, geometry) = with_requests(0);
    let mut back = backend_over(&mem, geometry);
    mem.store_u32_release(offset::REQ_PROD, u32::MAX).unwrap();
    assert!(matches!(
        back.final_check_for_requests(),
        Err(RingError::RequestOverflow { .. })
    ));
}

#[test]
fn slot_descriptors_are_checked() {
    let (mem, geometry) = with_requests(1);
    let desc = geometry.descriptor_offset(0);
    mem.store_u32_relaxed(desc, 9).unwrap();
    let mut back = backend_over(&mem, geometry);
    assert!(matches!(
        back.try_recv(),
        Err(RingError::SlotSequence {
            index: 0,
            slot: 0,
            found: 9
        })
    ));

    let (mem, geometry) = with_requests(1);
    mem.store_u32_relaxed(desc + 4, u32::MAX).unwrap();
    let mut back = backend_over(&mem, geometry);
    let err = back.try_recv().unwrap_err();
    assert!(matches!(
        err,
        RingError::MessageLength {
            index: 0,
            slot: 0,
            len: u32::MAX,
            max: 4096
        }
    ));
    assert!(back.is_poisoned());

    // Exactly the window is fine at the ring level (the decoder judges the bytes).
    let (mem, geometry) = with_requests(1);
    mem.store_u32_relaxed(desc + 4, 4096).unwrap();
    let mut back = backend_over(&mem, geometry);
    assert_eq!(back.try_recv().unwrap().unwrap().len(), 4096);
}

#[test]
fn garbage_messages_are_decode_violations() {
    let (mem, geometry) = with_requests(2);
    mem.write_bytes(DATA_OFFSET, b"XXXX").unwrap();
    let mut back = backend_over(&mem, geometry);
    let err = back.try_recv_request().unwrap_err();
    assert!(matches!(
        err,
        RingError::Decode {
            index: 0,
            source: WireError::BadMagic { .. }
        }
    ));
    assert!(err.is_protocol_violation());
    assert!(matches!(back.try_recv_request(), Err(RingError::Poisoned)));
    // A response-typed message from the guest is also refused.
    let (mem, geometry) = with_requests(1);
    let fake = Response::Ok.encode(0).unwrap();
    mem.write_bytes(DATA_OFFSET, &fake).unwrap();
    mem.store_u32_relaxed(geometry.descriptor_offset(0) + 4, fake.len() as u32)
        .unwrap();
    let mut back = backend_over(&mem, geometry);
    assert!(matches!(
        back.try_recv_request(),
        Err(RingError::Decode {
            source: WireError::BadType { tag: 0x8003, .. },
            ..
        })
    ));
}

#[test]
fn the_backend_never_reads_the_header_back() {
    let (mem, geometry) = with_requests(1);
    let mut back = backend_over(&mem, geometry);
    // The guest rewrites the geometry to claim huge windows: ignored by the backend.
    mem.store_u32_relaxed(offset::SLOT_COUNT, 256).unwrap();
    mem.store_u32_relaxed(offset::WINDOW_SIZE, 17 * 4096)
        .unwrap();
    mem.store_u32_relaxed(offset::MAGIC, 0).unwrap();
    let req = back.try_recv_request().unwrap().unwrap();
    assert_eq!(req.body, get(b"k"));
    let n = Counter::default();
    back.send_response(req.id, &Response::Value(Some(vec![1; 100])), &n)
        .unwrap();
}

#[test]
fn frontend_checks_response_indices() {
    let geometry = small();
    let mem = ring(geometry);
    let _back = Backend::new(&mem, geometry).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    mem.store_u32_release(offset::RSP_PROD, 1).unwrap();
    assert!(matches!(
        front.try_recv(),
        Err(RingError::ResponseOverflow {
            rsp_prod: 1,
            rsp_cons: 0,
            req_prod: 0
        })
    ));
    assert!(matches!(front.try_recv(), Err(RingError::Poisoned)));

    // rsp_prod may not go back either.
    let mem = ring(geometry);
    let mut back = Backend::new(&mem, geometry).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    let _ = front.send(b"a").unwrap();
    back.try_recv().unwrap().unwrap();
    let _ = back.send(b"b").unwrap();
    assert!(front.final_check_for_responses().unwrap());
    mem.store_u32_release(offset::RSP_PROD, 0).unwrap();
    assert!(matches!(
        front.try_recv(),
        Err(RingError::IndexRegressed {
            index: "rsp_prod",
            found: 0,
            previous: 1
        })
    ));
}

#[test]
fn attach_requires_an_initialised_idle_ring() {
    let geometry = small();
    let mem = ring(geometry);
    assert!(matches!(
        Frontend::attach(&mem),
        Err(RingError::Layout(LayoutError::BadMagic { found: 0 }))
    ));
    let _back = Backend::new(&mem, geometry).unwrap();
    mem.store_u32_relaxed(offset::REQ_PROD, 2).unwrap();
    assert!(matches!(
        Frontend::attach(&mem),
        Err(RingError::NotIdle {
            req_prod: 2,
            rsp_prod: 0
        })
    ));
    // The backend refuses a mapping too small for its geometry.
    let tiny = MockMem::new(4096).unwrap();
    assert!(matches!(
        Backend::new(&tiny, geometry),
        Err(RingError::Layout(LayoutError::MappingTooSmall { .. }))
    ));
}

#[test]
fn blocking_receive_times_out() {
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let n = Counter::default();
    let err = back
        .recv_request(&n, Some(Duration::from_millis(5)))
        .unwrap_err();
    assert!(matches!(err, RingError::Timeout { .. }));
    assert!(!err.is_protocol_violation());
}

/// A guest that rings the doorbell in a loop without publishing requests: each `wait` of
/// the agent returns at once. The agent pays for a bounded number of wake-ups per domain
/// (one per request it consumed plus the slack) and then calls it a protocol violation.
#[test]
fn a_doorbell_flood_costs_a_bounded_number_of_wake_ups() {
    /// Always "notified", counting the agent's waits (its wake-ups).
    #[derive(Default)]
    struct Flood {
        waits: Cell<u32>,
    }
    impl Notifier for Flood {
        fn notify(&self) -> Result<(), NotifyError> {
            Ok(())
        }
        fn wait(&self, _timeout: Option<Duration>) -> Result<Wake, NotifyError> {
            self.waits.set(self.waits.get() + 1);
            // Without a bound the receive would loop until its deadline: end it here so
            // that a missing bound fails the test instead of hanging it.
            if self.waits.get() > 100_000 {
                return Ok(Wake::PeerGone);
            }
            Ok(Wake::Notified)
        }
    }
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    // Three honest requests first: they raise the allowance by one each.
    for key in [b"1", b"2", b"3"] {
        front.send_request(&get(key), &Counter::default()).unwrap();
        let flood = Flood::default();
        let req = back
            .recv_request(&flood, Some(Duration::from_secs(5)))
            .unwrap();
        back.send_response(req.id, &Response::Ok, &Counter::default())
            .unwrap();
        front.try_recv_response().unwrap().unwrap();
        assert_eq!(flood.waits.get(), 0, "a published request needs no wait");
    }
    let flood = Flood::default();
    let err = back
        .recv_request(&flood, Some(Duration::from_secs(3600)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            RingError::DoorbellFlood {
                spurious,
                requests: 3,
                slack: SPURIOUS_WAKE_SLACK,
            } if spurious == 3 + SPURIOUS_WAKE_SLACK + 1
        ),
        "{err}"
    );
    assert!(err.is_protocol_violation());
    // Wake-ups paid for: the allowance plus the one that crossed it.
    assert_eq!(flood.waits.get(), 3 + SPURIOUS_WAKE_SLACK + 1);
    // The end is disabled, as after any violation.
    assert!(matches!(back.try_recv_request(), Err(RingError::Poisoned)));
}

/// The honest worst case: every request notified on its own and taken after an earlier
/// wake-up already found it, so each request's notification costs one wake-up that finds
/// nothing. However many requests there are, that stays within the allowance.
#[test]
fn one_spurious_wake_up_per_request_is_allowed() {
    let mem = ring(small());
    let mut back = Backend::new(&mem, small()).unwrap();
    let mut front = Frontend::attach(&mem).unwrap();
    for _ in 0..1000 {
        front.send_request(&get(b"k"), &Counter::default()).unwrap();
        let req = back.try_recv_request().unwrap().unwrap();
        back.send_response(req.id, &Response::Ok, &Counter::default())
            .unwrap();
        front.try_recv_response().unwrap().unwrap();
        back.spurious_wake().unwrap();
    }
    // And the slack on top.
    for _ in 0..SPURIOUS_WAKE_SLACK {
        back.spurious_wake().unwrap();
    }
    assert!(matches!(
        back.spurious_wake(),
        Err(RingError::DoorbellFlood { .. })
    ));
}
