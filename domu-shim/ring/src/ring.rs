//! The two ends of the ring: [`Frontend`] (guest: pushes requests, consumes responses) and
//! [`Backend`] (agent: consumes requests, pushes responses).
//!
//! The protocol follows Xen's `public/io/ring.h`, with the same barriers:
//!
//! ```text
//!  produce (push and check notify)           consume
//!  ------------------------------            -------
//!  write message into slot window            prod = load_acquire(*_prod)        (rmb)
//!  write descriptor {seq, len}               check prod against private indices
//!  store_release(*_prod, new)        (wmb)   copy descriptor, then message, out
//!  fence(SeqCst)                     (mb)    cons += 1 (private)
//!  event = load(*_event)
//!  notify iff new - event < new - old        final check before sleeping:
//!                                              if unconsumed: go on
//!                                              store(*_event, cons + 1)
//!                                              fence(SeqCst)                    (mb)
//!                                              if unconsumed: go on, else wait
//! ```
//!
//! The two `SeqCst` fences pair up (Dekker): either the producer sees the consumer's new
//! `*_event` and notifies, or the consumer's final check sees the new `*_prod`. No wake-up
//! is lost.
//!
//! **The backend trusts nothing it reads from shared memory.** It keeps its own copy of the
//! geometry and its own `req_cons` and `rsp_prod`; it reads only `req_prod`, `rsp_event` and
//! the slot it consumes. On each read of `req_prod` it checks
//! `req_prod_seen <= req_prod <= rsp_prod + slot_count` (free-running arithmetic, where
//! `req_prod_seen` is the last value it accepted), so a guest can neither claim more
//! requests than slots nor move the index backwards. It copies the
//! descriptor once, checks that its `seq` is the expected index and its `len` fits the
//! window, copies that many bytes out, and only then decodes the private copy. Any violation
//! poisons the backend: every later call fails with [`RingError::Poisoned`], and
//! [`RingError::is_protocol_violation`] tells the caller to end the transaction and raise an
//! attack signal.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};
use core::time::Duration;

use crate::time::Instant;

use crate::layout::{offset, Geometry, LayoutError};
use crate::mem::{MemError, SharedMem};
use crate::notify::{Notifier, NotifyError, Wake};
use crate::wire::{Envelope, Request, Response, WireError};

/// A ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The geometry or the header is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A shared-memory access was refused.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// Signalling or waiting failed.
    #[error(transparent)]
    Notify(#[from] NotifyError),
    /// The frontend's `req_prod` is outside `req_cons ..= rsp_prod + slot_count`.
    #[error(
        "request producer overflow: req_prod {req_prod} with req_cons {req_cons}, \
         rsp_prod {rsp_prod}, {slots} slots"
    )]
    RequestOverflow {
        /// The `req_prod` read from shared memory.
        req_prod: u32,
        /// The backend's private consumer index.
        req_cons: u32,
        /// The backend's private response producer index.
        rsp_prod: u32,
        /// Slot count.
        slots: u32,
    },
    /// The backend's `rsp_prod` is outside `rsp_cons ..= req_prod`.
    #[error("response producer overflow: rsp_prod {rsp_prod} with rsp_cons {rsp_cons}, req_prod {req_prod}")]
    ResponseOverflow {
        /// The `rsp_prod` read from shared memory.
        rsp_prod: u32,
        /// The frontend's private consumer index.
        rsp_cons: u32,
        /// The frontend's private request producer index.
        req_prod: u32,
    },
    /// The peer's producer index went backwards (below a value already seen).
    #[error("{index} went backwards from {previous} to {found}")]
    IndexRegressed {
        /// `"req_prod"` or `"rsp_prod"`.
        index: &'static str,
        /// The value just read.
        found: u32,
        /// The highest value seen before.
        previous: u32,
    },
    /// A slot descriptor does not carry the index of the message expected in it.
    #[error("slot {slot} is labelled message {found}, expected message {index}")]
    SlotSequence {
        /// The expected free-running index.
        index: u32,
        /// The slot.
        slot: u32,
        /// The `seq` found in the descriptor.
        found: u32,
    },
    /// A slot descriptor claims a message longer than the window.
    #[error("message {index} in slot {slot} claims {len} bytes, over the {max}-byte limit")]
    MessageLength {
        /// The free-running index.
        index: u32,
        /// The slot.
        slot: u32,
        /// The length claimed.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// The peer's message does not decode.
    #[error("message {index} is malformed")]
    Decode {
        /// The free-running index of the message.
        index: u32,
        /// Why.
        #[source]
        source: WireError,
    },
    /// A response does not echo the id of the request it answers.
    #[error("response {index} carries id {found}, expected {expected}")]
    IdMismatch {
        /// The free-running index of the response.
        index: u32,
        /// The id of the request.
        expected: u32,
        /// The id in the response.
        found: u32,
    },
    /// Our own message could not be encoded (a local bug, not a peer's fault).
    #[error("cannot encode message")]
    Encode(#[source] WireError),
    /// Our own message is longer than a slot window.
    #[error("message of {len} bytes does not fit the {max}-byte slot limit")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Every slot holds a request that has no response yet (frontend).
    #[error("ring full: {slots} requests await responses")]
    Full {
        /// Slot count.
        slots: u32,
    },
    /// The backend tried to respond with no consumed request left unanswered.
    #[error("no request awaits a response (rsp_prod {rsp_prod}, req_cons {req_cons})")]
    NoRequestOutstanding {
        /// Private response producer index.
        rsp_prod: u32,
        /// Private request consumer index.
        req_cons: u32,
    },
    /// The ring had unanswered requests when the frontend attached.
    #[error("ring not idle at attach: req_prod {req_prod}, rsp_prod {rsp_prod}")]
    NotIdle {
        /// `req_prod` found.
        req_prod: u32,
        /// `rsp_prod` found.
        rsp_prod: u32,
    },
    /// Nothing arrived in time.
    #[error("no message within {timeout:?}")]
    Timeout {
        /// The timeout.
        timeout: Duration,
    },
    /// The peer went away while this end was waiting.
    #[error("the peer is gone")]
    PeerGone,
    /// The guest rang the agent's doorbell far more often than it published requests: more
    /// than [`SPURIOUS_WAKE_SLACK`] wake-ups that found nothing beyond one per request
    /// consumed (backend). A doorbell flood: each wake-up costs the agent a context switch
    /// and a look at the ring, so the number it pays for one transaction is bounded here.
    #[error(
        "doorbell flood: {spurious} wake-ups found no request ({requests} requests consumed; \
         at most one per request plus {slack} are allowed)"
    )]
    DoorbellFlood {
        /// Wake-ups that found nothing new.
        spurious: u32,
        /// Requests consumed so far.
        requests: u32,
        /// The allowance beyond one per request.
        slack: u32,
    },
    /// An earlier protocol violation disabled this end.
    #[error("ring disabled by an earlier protocol violation")]
    Poisoned,
}

/// Wake-ups that find no new request a backend accepts beyond one per request consumed
/// before it calls the guest's notifications a doorbell flood ([`RingError::DoorbellFlood`]).
///
/// An honest guest notifies at most once per request it publishes (§2.2, produce step 5), and
/// one wake-up drains every notification pending (eventfd counter, Xen's pending bit), so its
/// wake-ups that find nothing (the request was already taken after an earlier wake-up) number
/// at most its requests. The slack covers the agent's own spurious wake-ups (signals,
/// timeouts are not counted).
pub const SPURIOUS_WAKE_SLACK: u32 = 64;

impl RingError {
    /// Whether the peer broke the protocol (as opposed to a local failure or a timeout). On
    /// the backend this means: end the transaction, destroy or quarantine the domain, and
    /// raise an attack signal.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            Self::RequestOverflow { .. }
                | Self::ResponseOverflow { .. }
                | Self::IndexRegressed { .. }
                | Self::SlotSequence { .. }
                | Self::MessageLength { .. }
                | Self::Decode { .. }
                | Self::IdMismatch { .. }
                | Self::DoorbellFlood { .. }
                | Self::Poisoned
        )
    }
}

/// Copies message `index` out of its slot (descriptor first, once), checking its label and
/// length. The returned bytes are private: decoding them cannot be raced by the peer.
fn read_slot<M: SharedMem>(mem: &M, geometry: Geometry, index: u32) -> Result<Vec<u8>, RingError> {
    let slot = geometry.slot_of(index);
    let desc = geometry.descriptor_offset(slot);
    let seq = mem.load_u32_relaxed(desc)?;
    let len = mem.load_u32_relaxed(desc.saturating_add(4))?;
    if seq != index {
        return Err(RingError::SlotSequence {
            index,
            slot,
            found: seq,
        });
    }
    let max = geometry.max_message_len();
    let len_bytes =
        usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or(RingError::MessageLength {
                index,
                slot,
                len,
                max,
            })?;
    let mut message = vec![0u8; len_bytes];
    mem.read_bytes(geometry.window_offset(slot), &mut message)?;
    Ok(message)
}

/// Writes message `index` into its slot: the window, then the descriptor.
fn write_slot<M: SharedMem>(
    mem: &M,
    geometry: Geometry,
    index: u32,
    message: &[u8],
) -> Result<(), RingError> {
    let max = geometry.max_message_len();
    let too_large = RingError::TooLarge {
        len: message.len(),
        max,
    };
    if message.len() > max {
        return Err(too_large);
    }
    let len = u32::try_from(message.len()).map_err(|_| too_large)?;
    let slot = geometry.slot_of(index);
    let desc = geometry.descriptor_offset(slot);
    mem.write_bytes(geometry.window_offset(slot), message)?;
    mem.store_u32_relaxed(desc, index)?;
    mem.store_u32_relaxed(desc.saturating_add(4), len)?;
    Ok(())
}

/// `RING_PUSH_*_AND_CHECK_NOTIFY`: publishes `new` (whose previous published value was
/// `old`) and says whether the peer asked to be notified for an index in `old+1 ..= new`.
fn push_and_check_notify<M: SharedMem>(
    mem: &M,
    prod_offset: usize,
    event_offset: usize,
    old: u32,
    new: u32,
) -> Result<bool, RingError> {
    mem.store_u32_release(prod_offset, new)?; // wmb(); prod = new
    fence(Ordering::SeqCst); // mb()
    let event = mem.load_u32_relaxed(event_offset)?;
    Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
}

/// Arms `*_event` for the next message (`cons + 1`) before the final re-check.
fn arm_event<M: SharedMem>(mem: &M, event_offset: usize, cons: u32) -> Result<(), RingError> {
    mem.store_u32_relaxed(event_offset, cons.wrapping_add(1))?;
    fence(Ordering::SeqCst); // mb()
    Ok(())
}

/// The parts of an end that a blocking receive loops over.
trait Consumer {
    type Item;
    fn try_take(&mut self) -> Result<Option<Self::Item>, RingError>;
    fn final_check(&mut self) -> Result<bool, RingError>;
    /// A wake-up by the peer found nothing to take: an end that bounds them says whether
    /// this one is still within its allowance.
    fn spurious_wake(&mut self) -> Result<(), RingError> {
        Ok(())
    }
}

/// What is left of a wait of `timeout` that ends at `deadline` (`None`: forever); a
/// [`RingError::Timeout`] once nothing is.
fn time_left(
    deadline: Option<Instant>,
    timeout: Option<Duration>,
) -> Result<Option<Duration>, RingError> {
    match (deadline, timeout) {
        (Some(d), Some(t)) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RingError::Timeout { timeout: t });
            }
            Ok(Some(left))
        }
        (None, Some(_)) => Ok(Some(Duration::MAX)), // timeout too long to represent
        (_, None) => Ok(None),
    }
}

/// Receives one item, sleeping on `notifier` between final checks, for at most `timeout`.
///
/// The deadline is checked on every iteration, not only before sleeping, so a peer that
/// keeps waking us (or flips an index) cannot hold us past it.
fn recv_blocking<C: Consumer>(
    end: &mut C,
    notifier: &impl Notifier,
    timeout: Option<Duration>,
) -> Result<C::Item, RingError> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    // Whether the last wait ended with a notification (a wake-up that finds nothing new is
    // counted against the end's allowance: a doorbell flood is bounded).
    let mut notified = false;
    loop {
        if let Some(item) = end.try_take()? {
            return Ok(item);
        }
        let remaining = time_left(deadline, timeout)?;
        if end.final_check()? {
            continue;
        }
        if notified {
            end.spurious_wake()?;
        }
        // Notified or TimedOut: re-check either way. PeerGone: one last look, since the
        // peer may have published a message just before it went away.
        match notifier.wait(remaining)? {
            Wake::PeerGone => {
                return match end.try_take()? {
                    Some(item) => Ok(item),
                    None => Err(RingError::PeerGone),
                };
            }
            Wake::Notified => notified = true,
            Wake::TimedOut => notified = false,
        }
    }
}

// ---------------------------------------------------------------------------------------

/// The agent's end: consumes requests, produces responses. See the [module docs](self).
#[derive(Debug)]
pub struct Backend<M: SharedMem> {
    mem: M,
    geometry: Geometry,
    /// Requests consumed.
    req_cons: u32,
    /// Responses produced (and published).
    rsp_prod: u32,
    /// The last `req_prod` read and accepted: it may only move forwards.
    req_prod_seen: u32,
    /// Requests consumed and wake-ups that found no request, since the backend was made
    /// (one backend serves one domain): see [`SPURIOUS_WAKE_SLACK`].
    requests_taken: u32,
    spurious_wakes: u32,
    poisoned: bool,
}

impl<M: SharedMem> Backend<M> {
    /// Initialises the ring in `mem` with `geometry` (zeroing it all, so nothing from an
    /// earlier user of the pages reaches the guest) and returns its backend end.
    pub fn new(mem: M, geometry: Geometry) -> Result<Self, RingError> {
        geometry.initialise(&mem, true)?;
        Ok(Self::over(mem, geometry))
    }

    /// Like [`Backend::new`], for memory that is all zero — freshly allocated (a new memfd
    /// or anonymous mapping) or wiped ([`crate::MmapMem::zero_data`]): writes only the
    /// header, so untouched pages stay unallocated. Using it on recycled memory that was not
    /// wiped would show the guest what the pages held before.
    pub fn new_on_fresh_memory(mem: M, geometry: Geometry) -> Result<Self, RingError> {
        geometry.initialise(&mem, false)?;
        Ok(Self::over(mem, geometry))
    }

    fn over(mem: M, geometry: Geometry) -> Self {
        Self {
            mem,
            geometry,
            req_cons: 0,
            rsp_prod: 0,
            req_prod_seen: 0,
            requests_taken: 0,
            spurious_wakes: 0,
            poisoned: false,
        }
    }

    /// The geometry (the backend's own copy, never re-read from shared memory).
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The backing memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Requests consumed so far (free-running).
    pub fn requests_consumed(&self) -> u32 {
        self.req_cons
    }

    /// Whether a protocol violation has disabled this end.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    fn guard<T>(&mut self, result: Result<T, RingError>) -> Result<T, RingError> {
        if result.as_ref().is_err_and(RingError::is_protocol_violation) {
            self.poisoned = true;
        }
        result
    }

    fn check_poisoned(&self) -> Result<(), RingError> {
        if self.poisoned {
            return Err(RingError::Poisoned);
        }
        Ok(())
    }

    /// Number of requests published but not yet consumed, after checking `req_prod`:
    /// `req_prod_seen <= req_prod <= rsp_prod + slot_count` (free-running; `req_cons` is at
    /// most `req_prod_seen`).
    fn unconsumed(&mut self) -> Result<u32, RingError> {
        let req_prod = self.mem.load_u32_acquire(offset::REQ_PROD)?;
        let in_flight = req_prod.wrapping_sub(self.rsp_prod);
        let unconsumed = req_prod.wrapping_sub(self.req_cons);
        if in_flight > self.geometry.slot_count() || unconsumed > in_flight {
            return self.guard(Err(RingError::RequestOverflow {
                req_prod,
                req_cons: self.req_cons,
                rsp_prod: self.rsp_prod,
                slots: self.geometry.slot_count(),
            }));
        }
        if unconsumed < self.req_prod_seen.wrapping_sub(self.req_cons) {
            return self.guard(Err(RingError::IndexRegressed {
                index: "req_prod",
                found: req_prod,
                previous: self.req_prod_seen,
            }));
        }
        self.req_prod_seen = req_prod;
        Ok(unconsumed)
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`, with the overflow check.
    pub fn has_unconsumed_requests(&mut self) -> Result<bool, RingError> {
        self.check_poisoned()?;
        Ok(self.unconsumed()? > 0)
    }

    /// Copies the next request's bytes out of the ring, if one is published.
    pub fn try_recv(&mut self) -> Result<Option<Vec<u8>>, RingError> {
        self.check_poisoned()?;
        if self.unconsumed()? == 0 {
            return Ok(None);
        }
        let index = self.req_cons;
        let message = read_slot(&self.mem, self.geometry, index);
        let message = self.guard(message)?;
        self.req_cons = index.wrapping_add(1);
        self.requests_taken = self.requests_taken.saturating_add(1);
        Ok(Some(message))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: returns `true` if a request is waiting; otherwise
    /// arms `req_event` so the frontend notifies for the next one, then checks again.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        self.check_poisoned()?;
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        arm_event(&self.mem, offset::REQ_EVENT, self.req_cons)?;
        Ok(self.unconsumed()? > 0)
    }

    /// Writes a response into the slot of the oldest unanswered request and publishes it.
    /// Returns whether the frontend must be notified.
    #[must_use = "the frontend may be asleep: notify it when this returns true"]
    pub fn send(&mut self, message: &[u8]) -> Result<bool, RingError> {
        self.check_poisoned()?;
        if self.rsp_prod == self.req_cons {
            return Err(RingError::NoRequestOutstanding {
                rsp_prod: self.rsp_prod,
                req_cons: self.req_cons,
            });
        }
        let old = self.rsp_prod;
        let new = old.wrapping_add(1);
        write_slot(&self.mem, self.geometry, old, message)?;
        self.rsp_prod = new;
        push_and_check_notify(&self.mem, offset::RSP_PROD, offset::RSP_EVENT, old, new)
    }

    /// Receives and decodes the next request, if one is published.
    pub fn try_recv_request(&mut self) -> Result<Option<Envelope<Request>>, RingError> {
        let index = self.req_cons;
        let Some(message) = self.try_recv()? else {
            return Ok(None);
        };
        let decoded =
            Request::decode(&message).map_err(|source| RingError::Decode { index, source });
        self.guard(decoded).map(Some)
    }

    /// Receives and decodes the next request, waiting on `notifier` for at most `timeout`
    /// (`None`: forever).
    pub fn recv_request(
        &mut self,
        notifier: &impl Notifier,
        timeout: Option<Duration>,
    ) -> Result<Envelope<Request>, RingError> {
        recv_blocking(self, notifier, timeout)
    }

    /// Encodes and sends the response to request `id`, notifying the frontend if it asked.
    pub fn send_response(
        &mut self,
        id: u32,
        response: &Response,
        notifier: &impl Notifier,
    ) -> Result<(), RingError> {
        let message = response.encode(id).map_err(RingError::Encode)?;
        if self.send(&message)? {
            notifier.notify()?;
        }
        Ok(())
    }
}

impl<M: SharedMem> Consumer for Backend<M> {
    type Item = Envelope<Request>;

    fn try_take(&mut self) -> Result<Option<Self::Item>, RingError> {
        self.try_recv_request()
    }

    fn final_check(&mut self) -> Result<bool, RingError> {
        self.final_check_for_requests()
    }

    fn spurious_wake(&mut self) -> Result<(), RingError> {
        self.spurious_wakes = self.spurious_wakes.saturating_add(1);
        if self.spurious_wakes > self.requests_taken.saturating_add(SPURIOUS_WAKE_SLACK) {
            let flood = RingError::DoorbellFlood {
                spurious: self.spurious_wakes,
                requests: self.requests_taken,
                slack: SPURIOUS_WAKE_SLACK,
            };
            return self.guard(Err(flood));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// The guest's end: produces requests, consumes responses.
#[derive(Debug)]
pub struct Frontend<M: SharedMem> {
    mem: M,
    geometry: Geometry,
    /// Requests produced (and published).
    req_prod: u32,
    /// Responses consumed.
    rsp_cons: u32,
    /// The last `rsp_prod` read and accepted: it may only move forwards.
    rsp_prod_seen: u32,
    next_id: u32,
    /// A request was published that the backend asked to be notified of, and the
    /// notification is not sent yet (see [`Frontend::queue_request`]).
    notify_owed: bool,
    poisoned: bool,
}

impl<M: SharedMem> Frontend<M> {
    /// Attaches to a ring the backend initialised: validates the header and requires an idle
    /// ring (`req_prod == rsp_prod`).
    pub fn attach(mem: M) -> Result<Self, RingError> {
        let geometry = Geometry::read_header(&mem)?;
        let req_prod = mem.load_u32_acquire(offset::REQ_PROD)?;
        let rsp_prod = mem.load_u32_acquire(offset::RSP_PROD)?;
        if req_prod != rsp_prod {
            return Err(RingError::NotIdle { req_prod, rsp_prod });
        }
        Ok(Self {
            mem,
            geometry,
            req_prod,
            rsp_cons: rsp_prod,
            rsp_prod_seen: rsp_prod,
            next_id: 1,
            notify_owed: false,
            poisoned: false,
        })
    }

    /// The geometry read from the header at attach time.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The backing memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Requests sent that have no response consumed yet.
    pub fn in_flight(&self) -> u32 {
        self.req_prod.wrapping_sub(self.rsp_cons)
    }

    fn guard<T>(&mut self, result: Result<T, RingError>) -> Result<T, RingError> {
        if result.as_ref().is_err_and(RingError::is_protocol_violation) {
            self.poisoned = true;
        }
        result
    }

    fn check_poisoned(&self) -> Result<(), RingError> {
        if self.poisoned {
            return Err(RingError::Poisoned);
        }
        Ok(())
    }

    fn unconsumed(&mut self) -> Result<u32, RingError> {
        let rsp_prod = self.mem.load_u32_acquire(offset::RSP_PROD)?;
        let unconsumed = rsp_prod.wrapping_sub(self.rsp_cons);
        if unconsumed > self.in_flight() {
            return self.guard(Err(RingError::ResponseOverflow {
                rsp_prod,
                rsp_cons: self.rsp_cons,
                req_prod: self.req_prod,
            }));
        }
        if unconsumed < self.rsp_prod_seen.wrapping_sub(self.rsp_cons) {
            return self.guard(Err(RingError::IndexRegressed {
                index: "rsp_prod",
                found: rsp_prod,
                previous: self.rsp_prod_seen,
            }));
        }
        self.rsp_prod_seen = rsp_prod;
        Ok(unconsumed)
    }

    /// Writes a request into the next free slot and publishes it. Returns whether the
    /// backend must be notified. Fails with [`RingError::Full`] if every slot awaits a
    /// response.
    #[must_use = "the backend may be asleep: notify it when this returns true"]
    pub fn send(&mut self, message: &[u8]) -> Result<bool, RingError> {
        self.check_poisoned()?;
        if self.in_flight() >= self.geometry.slot_count() {
            return Err(RingError::Full {
                slots: self.geometry.slot_count(),
            });
        }
        let old = self.req_prod;
        let new = old.wrapping_add(1);
        write_slot(&self.mem, self.geometry, old, message)?;
        self.req_prod = new;
        push_and_check_notify(&self.mem, offset::REQ_PROD, offset::REQ_EVENT, old, new)
    }

    /// Copies the next response's bytes out of the ring, if one is published.
    pub fn try_recv(&mut self) -> Result<Option<Vec<u8>>, RingError> {
        self.check_poisoned()?;
        if self.unconsumed()? == 0 {
            return Ok(None);
        }
        let index = self.rsp_cons;
        let message = read_slot(&self.mem, self.geometry, index);
        let message = self.guard(message)?;
        self.rsp_cons = index.wrapping_add(1);
        Ok(Some(message))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        self.check_poisoned()?;
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        arm_event(&self.mem, offset::RSP_EVENT, self.rsp_cons)?;
        Ok(self.unconsumed()? > 0)
    }

    /// Encodes and sends `request` with a fresh id, notifying the backend if it asked (and
    /// sending any notification still owed for requests queued before). Returns the id.
    pub fn send_request(
        &mut self,
        request: &Request,
        notifier: &impl Notifier,
    ) -> Result<u32, RingError> {
        let id = self.queue_request(request)?;
        self.flush(notifier)?;
        Ok(id)
    }

    /// Encodes and publishes `request` with a fresh id **without notifying**: if the backend
    /// asked to be notified, the notification is owed and goes out with the next
    /// [`flush`](Self::flush), [`send_request`](Self::send_request) or wait for a response.
    /// A guest that publishes several requests before it waits wakes the backend once, for
    /// all of them, instead of once per request. Returns the id.
    pub fn queue_request(&mut self, request: &Request) -> Result<u32, RingError> {
        let id = self.next_id;
        let message = request.encode(id).map_err(RingError::Encode)?;
        if self.send(&message)? {
            self.notify_owed = true;
        }
        self.next_id = id.wrapping_add(1);
        Ok(id)
    }

    /// Sends the notification owed for queued requests, if any.
    pub fn flush(&mut self, notifier: &impl Notifier) -> Result<(), RingError> {
        if core::mem::take(&mut self.notify_owed) {
            notifier.notify()?;
        }
        Ok(())
    }

    /// Waits until the response of every request in flight is published, for at most
    /// `timeout` (`None`: forever), without consuming any: they are then taken with
    /// [`try_recv_response`](Self::try_recv_response) without waiting.
    ///
    /// Owed notifications are sent first. Before sleeping it arms `rsp_event` for the
    /// **last** response in flight (`rsp_event = req_prod`), not the next one, so the
    /// backend's answers to the earlier requests wake nobody: one wake-up for the batch.
    /// (`ring.h` leaves the consumer free to ask for a later index; the backend reads
    /// `rsp_event` only to decide whether to notify.) `PeerGone`: the responses published
    /// before the peer went are left to take, and the error says the rest never comes.
    pub fn await_responses(
        &mut self,
        notifier: &impl Notifier,
        timeout: Option<Duration>,
    ) -> Result<(), RingError> {
        self.flush(notifier)?;
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            self.check_poisoned()?;
            if self.unconsumed()? == self.in_flight() {
                return Ok(());
            }
            let remaining = time_left(deadline, timeout)?;
            // Arm for the last response in flight, then look again (the Dekker pairing of
            // the module docs, with a later index).
            arm_event(&self.mem, offset::RSP_EVENT, self.req_prod.wrapping_sub(1))?;
            if self.unconsumed()? == self.in_flight() {
                return Ok(());
            }
            if notifier.wait(remaining)? == Wake::PeerGone {
                if self.unconsumed()? == self.in_flight() {
                    return Ok(());
                }
                return Err(RingError::PeerGone);
            }
        }
    }

    /// Receives and decodes the next response, if one is published.
    pub fn try_recv_response(&mut self) -> Result<Option<Envelope<Response>>, RingError> {
        let index = self.rsp_cons;
        let Some(message) = self.try_recv()? else {
            return Ok(None);
        };
        let decoded =
            Response::decode(&message).map_err(|source| RingError::Decode { index, source });
        self.guard(decoded).map(Some)
    }

    /// Receives and decodes the next response, waiting on `notifier` for at most `timeout`
    /// (`None`: forever).
    pub fn recv_response(
        &mut self,
        notifier: &impl Notifier,
        timeout: Option<Duration>,
    ) -> Result<Envelope<Response>, RingError> {
        self.flush(notifier)?;
        recv_blocking(self, notifier, timeout)
    }

    /// Receives the next response, which must answer request `id` (responses come in
    /// request order, so this is the oldest request in flight). A response with another id
    /// is a protocol violation ([`RingError::IdMismatch`]).
    pub fn recv_response_to(
        &mut self,
        id: u32,
        notifier: &impl Notifier,
        timeout: Option<Duration>,
    ) -> Result<Response, RingError> {
        let index = self.rsp_cons;
        let reply = self.recv_response(notifier, timeout)?;
        if reply.id != id {
            return self.guard(Err(RingError::IdMismatch {
                index,
                expected: id,
                found: reply.id,
            }));
        }
        Ok(reply.body)
    }

    /// Sends `request` and waits for its response (which must echo its id). Use with no
    /// other request in flight.
    pub fn call(
        &mut self,
        request: &Request,
        notifier: &impl Notifier,
        timeout: Option<Duration>,
    ) -> Result<Response, RingError> {
        let id = self.send_request(request, notifier)?;
        self.recv_response_to(id, notifier, timeout)
    }
}

impl<M: SharedMem> Consumer for Frontend<M> {
    type Item = Envelope<Response>;

    fn try_take(&mut self) -> Result<Option<Self::Item>, RingError> {
        self.try_recv_response()
    }

    fn final_check(&mut self) -> Result<bool, RingError> {
        self.final_check_for_responses()
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]
mod tests;
