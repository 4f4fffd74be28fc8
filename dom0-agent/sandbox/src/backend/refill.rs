//! The refill: keeps `pool_size` clones forked or requested, making (or reusing) each
//! clone's ring and sending the zygote its request, and expires requests it does not answer.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_domain::Ring;
use mayfly_ring::{Backend, EventFdNotifier, MmapMem, Notifier, SharedMem};
use mayfly_sync::{lock, wait_timeout};

use crate::clone::SpareRing;
use mayfly_sandbox_proto::{self as proto, Msg};

use super::error::CreateError;
use super::pool::{PendingClone, Shared};

/// The refill thread: keeps `pool_size` clones forked or on their way (with the takers'
/// `top_up`), without waiting for any of them, and gives up on requests the zygote does not
/// answer in time. It sends the zygote a request and goes on; the supervisor thread, which
/// reads the zygote's answer anyway, puts the clone in the pool; `take` reads its `Ready`.
pub(super) fn refill(shared: Arc<Shared>) {
    loop {
        {
            let mut state = shared.pool();
            loop {
                if state.shut_down || state.zygote_gone {
                    return;
                }
                let now = Instant::now();
                let backing_off = state.backoff_until.filter(|&t| t > now);
                if let Some(until) = backing_off {
                    // A retry delay, woken early by shutdown.
                    state = wait_timeout(
                        &shared.refill_wanted,
                        state,
                        until.saturating_duration_since(now),
                    )
                    .0;
                    continue;
                }
                if state.ready.len() + state.creating < shared.config.pool_size {
                    break;
                }
                // Always a timed wait, even with no request out now: a taker may send one
                // (`top_up`) without waking this thread, and a request the zygote never
                // answers must still be given up on — within twice `ready_timeout`.
                state = wait_timeout(&shared.refill_wanted, state, shared.config.ready_timeout).0;
                drop(state);
                expire_requests(&shared);
                state = shared.pool();
            }
            state.creating += 1;
        }
        if let Err(e) = request(&shared) {
            shared.pool().creating -= 1;
            shared.creation_failed(&e);
        }
    }
}

/// Forgets requests the zygote did not answer within `ready_timeout`.
pub(super) fn expire_requests(shared: &Shared) {
    let waited = shared.config.ready_timeout;
    let stale: Vec<u32> = lock(&shared.pending)
        .iter()
        .filter(|(_, p)| p.requested.elapsed() >= waited)
        .map(|(&id, _)| id)
        .collect();
    for clone_id in stale {
        if lock(&shared.pending).remove(&clone_id).is_some() {
            shared.pool().creating -= 1;
            shared.creation_failed(&CreateError::SpawnTimeout { clone_id, waited });
        }
    }
}

/// Most bytes of a reaped clone's ring that may hold data for the ring to be reused (wiped):
/// a normal transaction leaves a few pages; a ring a guest scribbled over is dropped instead.
pub(super) const MAX_RECYCLED_DATA: usize = 64 * 1024;

/// A ring for a new clone: a reaped clone's, wiped, if one is kept; else a new one.
pub(super) fn ring_parts(shared: &Shared, clone_id: u32) -> Result<SpareRing, CreateError> {
    let spare = lock(&shared.ctx.spares).pop();
    if let Some(spare) = spare {
        // Its clone is reaped: nothing else maps the memfd or holds the eventfds. The memory
        // must read as zero again (it held another transaction's payload and reads), and
        // wake-ups the old clone left in the eventfds must not reach the new one: a wait
        // that does not sleep empties each eventfd (a broken one drops the ring).
        let wiped = matches!(spare.mem.zero_data(MAX_RECYCLED_DATA), Ok(Some(_)));
        if wiped
            && spare.agent.wait(Some(Duration::ZERO)).is_ok()
            && spare.guest.wait(Some(Duration::ZERO)).is_ok()
        {
            shared.rings_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(spare);
        }
    }
    let len = shared.config.geometry.total_len();
    let mem = Arc::new(
        MmapMem::memfd(c"mayfly-sandbox-ring", len)
            .map_err(|source| CreateError::Memfd { clone_id, source })?,
    );
    let (agent, guest) =
        EventFdNotifier::pair().map_err(|source| CreateError::Eventfd { clone_id, source })?;
    Ok(SpareRing {
        mem,
        agent: Arc::new(agent),
        guest: Arc::new(guest),
    })
}

/// Asks the zygote for one clone: its ring and eventfds are made (or reused) here, the
/// agent's end kept in `pending` until the zygote reports the fork.
pub(super) fn request(shared: &Shared) -> Result<(), CreateError> {
    let clone_id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let geometry = shared.config.geometry;
    let len = geometry.total_len();
    let parts = ring_parts(shared, clone_id)?;
    // All zero (new, or wiped): only the header is written, so the pages a clone never
    // touches are never allocated.
    let ring: Ring =
        Backend::new_on_fresh_memory(Arc::clone(&parts.mem) as Arc<dyn SharedMem>, geometry)
            .map_err(|source| CreateError::Ring { clone_id, source })?;
    let ring_len = u32::try_from(len).map_err(|_| CreateError::Memfd {
        clone_id,
        source: mayfly_ring::mem::MapError::BadLength { len },
    })?;
    let (mem, guest) = (Arc::clone(&parts.mem), Arc::clone(&parts.guest));
    // `mem` and `guest` keep the fds open while they are sent, whatever happens to the
    // pending entry meanwhile. Fetched before the entry exists: every error return below
    // this point leaves nothing pending (the caller counts the failure once).
    let memfd = mem.fd().ok_or(CreateError::Memfd {
        clone_id,
        source: mayfly_ring::mem::MapError::BadLength { len },
    })?;
    // Pending before the request goes out: the zygote's `Spawned` may come back at once.
    lock(&shared.pending).insert(
        clone_id,
        PendingClone {
            ring,
            bell: Arc::clone(&parts.agent),
            spare: parts,
            requested: Instant::now(),
        },
    );
    let request = Msg::Clone { clone_id, ring_len };
    let sent = proto::send(
        shared.control.as_fd(),
        &request,
        &[memfd, guest.signal_fd(), guest.wait_fd()],
    );
    if let Err(source) = sent {
        // Counted as failed here only if the request was still pending (an expiry may have
        // taken it, and counted it, while the send blocked).
        if lock(&shared.pending).remove(&clone_id).is_some() {
            return Err(CreateError::Send { clone_id, source });
        }
    }
    Ok(())
}
