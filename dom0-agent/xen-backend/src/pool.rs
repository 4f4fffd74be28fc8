//! The pool: domains built ahead of demand, handed out one per transaction, refilled in
//! the background. Generic over a [`Provisioner`], so its logic is tested here against a
//! fake one; the Xen backend's provisioner builds real domains.
//!
//! ```text
//!  refill threads ── create() ──▶ ready (FIFO) ── take(): usable()? activate() ──▶ caller
//!       ▲  back off on failure          │ dead while pooled: dropped (destroyed)      │
//!       └──── woken by take/slot release, shutdown ◀──── Slot dropped: in_use - 1 ◀────┘
//! ```
//!
//! Invariants: at most `pool_size` members ready or being created; at most `max_in_use`
//! handed out (a [`Slot`] each); after [`Pool::shutdown`] nothing is created or handed out
//! and the ready members have been dropped. Members destroy their domain when dropped, so
//! every path that loses one (shutdown, a dead pooled member, a failed activation) destroys
//! it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_domain::{Backoff, ErrorChain};
use mayfly_sync::{lock, wait, wait_timeout};
use slog::{debug, error, Logger};

/// Back-off of each refill thread after failed builds: a Xen build costs seconds of dom0
/// CPU and boots a kernel, so retries start at 100 ms and slow to one every 10 s while
/// builds keep failing (a missing kernel, gntalloc's page limit, xl refusing).
pub const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// A boxed error from a provisioner.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Makes the pool's members: Xen domains in production, a fake in tests.
pub trait Provisioner: Send + Sync + 'static {
    /// A domain at its ready point, stopped. Dropping it destroys it.
    type Member: Send + 'static;
    /// Creates one member (`seq` counts creations from 0).
    fn create(&self, seq: u64) -> Result<Self::Member, BoxError>;
    /// Whether a pooled member can still be handed out (it did not die meanwhile).
    fn usable(&self, member: &Self::Member) -> bool;
    /// Lets a member run before it is handed out.
    fn activate(&self, member: &mut Self::Member) -> Result<(), BoxError>;
}

/// Sizes of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Members kept ready.
    pub pool_size: usize,
    /// Members handed out at once.
    pub max_in_use: usize,
    /// Threads creating members in parallel.
    pub refill_threads: usize,
}

/// Why [`Pool::take`] returned no member.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// None ready within the wait (or `max_in_use` reached).
    #[error("no ready domain within {waited:?}")]
    Exhausted {
        /// The wait.
        waited: Duration,
    },
    /// The pool was shut down.
    #[error("the pool is shut down")]
    ShutDown,
    /// Letting the member run failed (it has been destroyed).
    #[error("starting a pooled domain failed")]
    Activate(#[source] BoxError),
}

struct State<M> {
    ready: VecDeque<M>,
    creating: usize,
    in_use: usize,
    shut_down: bool,
}

struct Shared<P: Provisioner> {
    provisioner: P,
    config: PoolConfig,
    logger: Logger,
    state: Mutex<State<P::Member>>,
    changed: Condvar,
    next_seq: AtomicU64,
    created: AtomicU64,
    failed: AtomicU64,
}

impl<P: Provisioner> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, State<P::Member>> {
        lock(&self.state)
    }
}

/// Counters of a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Members ready.
    pub ready: usize,
    /// Members handed out (slots held).
    pub in_use: usize,
    /// Members created since start.
    pub created: u64,
    /// Creations that failed.
    pub failed: u64,
}

/// A pool of members of `P`.
pub struct Pool<P: Provisioner> {
    shared: Arc<Shared<P>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A handed-out member's place in the pool: dropping it frees the place.
pub struct Slot<P: Provisioner> {
    shared: Arc<Shared<P>>,
}

impl<P: Provisioner> Drop for Slot<P> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.in_use = state.in_use.saturating_sub(1);
        drop(state);
        self.shared.changed.notify_all();
    }
}

impl<P: Provisioner> Slot<P> {
    /// Whether the pool has been shut down.
    pub fn pool_shut_down(&self) -> bool {
        self.shared.lock().shut_down
    }
}

impl<P: Provisioner> Pool<P> {
    /// Starts the refill threads (named `<name>-refill-<i>`).
    pub fn start(
        provisioner: P,
        config: PoolConfig,
        name: &str,
        logger: Logger,
    ) -> Result<Self, std::io::Error> {
        let shared = Arc::new(Shared {
            provisioner,
            config,
            logger,
            state: Mutex::new(State {
                ready: VecDeque::new(),
                creating: 0,
                in_use: 0,
                shut_down: false,
            }),
            changed: Condvar::new(),
            next_seq: AtomicU64::new(0),
            created: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let pool = Self {
            shared,
            threads: Mutex::new(Vec::new()),
        };
        for i in 0..config.refill_threads.max(1) {
            let shared = Arc::clone(&pool.shared);
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-refill-{i}"))
                .spawn(move || refill(&shared));
            match spawned {
                Ok(handle) => lock(&pool.threads).push(handle),
                Err(e) => {
                    pool.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    /// The provisioner.
    pub fn provisioner(&self) -> &P {
        &self.shared.provisioner
    }

    /// Waits up to `timeout` until `count` members are ready. Returns whether they are.
    pub fn wait_ready(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.shared.lock();
        loop {
            if state.ready.len() >= count {
                return true;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if state.shut_down || left.is_zero() {
                return false;
            }
            state = wait_timeout(&self.shared.changed, state, left).0;
        }
    }

    /// A ready member, activated, with its slot; waits up to `timeout`.
    pub fn take(&self, timeout: Duration) -> Result<(P::Member, Slot<P>), TakeError> {
        let deadline = Instant::now().checked_add(timeout);
        let shared = &self.shared;
        let mut state = shared.lock();
        loop {
            if state.shut_down {
                return Err(TakeError::ShutDown);
            }
            if state.in_use < shared.config.max_in_use {
                if let Some(mut member) = state.ready.pop_front() {
                    state.in_use = state.in_use.saturating_add(1);
                    drop(state);
                    shared.changed.notify_all(); // refill tops up
                    let slot = Slot {
                        shared: Arc::clone(shared),
                    };
                    if !shared.provisioner.usable(&member) {
                        debug!(shared.logger, "a pooled domain died while ready; discarded");
                        drop(member);
                        drop(slot);
                        state = shared.lock();
                        continue;
                    }
                    return match shared.provisioner.activate(&mut member) {
                        Ok(()) => Ok((member, slot)),
                        Err(e) => Err(TakeError::Activate(e)),
                    };
                }
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Err(TakeError::Exhausted { waited: timeout });
            }
            state = wait_timeout(&shared.changed, state, left).0;
        }
    }

    /// Counters.
    pub fn counts(&self) -> Counts {
        let state = self.shared.lock();
        Counts {
            ready: state.ready.len(),
            in_use: state.in_use,
            created: self.shared.created.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops refilling, waits for the refill threads (a creation under way finishes and
    /// its member is dropped), and drops every ready member. Idempotent.
    pub fn shutdown(&self) {
        let ready = {
            let mut state = self.shared.lock();
            state.shut_down = true;
            std::mem::take(&mut state.ready)
        };
        self.shared.changed.notify_all();
        drop(ready);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
        // A member a refill thread finished after the first sweep.
        let late = std::mem::take(&mut self.shared.lock().ready);
        drop(late);
    }
}

impl<P: Provisioner> Drop for Pool<P> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn refill<P: Provisioner>(shared: &Shared<P>) {
    let mut backoff = BACKOFF;
    loop {
        {
            let mut state = shared.lock();
            while !state.shut_down
                && state.ready.len().saturating_add(state.creating) >= shared.config.pool_size
            {
                state = wait(&shared.changed, state);
            }
            if state.shut_down {
                return;
            }
            state.creating = state.creating.saturating_add(1);
        }
        let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let created = shared.provisioner.create(seq);
        let mut state = shared.lock();
        state.creating = state.creating.saturating_sub(1);
        match created {
            Ok(member) => {
                shared.created.fetch_add(1, Ordering::Relaxed);
                if state.shut_down {
                    drop(state);
                    drop(member);
                    return;
                }
                state.ready.push_back(member);
                drop(state);
                shared.changed.notify_all();
                backoff.succeeded();
            }
            Err(e) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                if state.shut_down {
                    return;
                }
                let delay = backoff.failed();
                error!(shared.logger, "creating a domain failed"; "error" => %ErrorChain(&*e),
                    "retry_in_ms" => delay.as_millis());
                // A retry delay, cut short by shutdown.
                drop(wait_timeout(&shared.changed, state, delay));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A member that records its drop (= its destruction).
    struct FakeMember {
        seq: u64,
        dropped: Arc<AtomicU64>,
        dead: Arc<AtomicBool>,
        active: bool,
    }

    impl Drop for FakeMember {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Default)]
    struct Fake {
        dropped: Arc<AtomicU64>,
        /// Creations with these seq numbers fail.
        fail: Mutex<Vec<u64>>,
        /// Members created from now on are born dead.
        dead: Arc<AtomicBool>,
        refuse_activate: AtomicBool,
    }

    impl Provisioner for Fake {
        type Member = FakeMember;
        fn create(&self, seq: u64) -> Result<FakeMember, BoxError> {
            if self.fail.lock().unwrap().contains(&seq) {
                return Err(format!("creation {seq} fails").into());
            }
            Ok(FakeMember {
                seq,
                dropped: Arc::clone(&self.dropped),
                dead: Arc::new(AtomicBool::new(self.dead.load(Ordering::SeqCst))),
                active: false,
            })
        }
        fn usable(&self, m: &FakeMember) -> bool {
            !m.dead.load(Ordering::SeqCst)
        }
        fn activate(&self, m: &mut FakeMember) -> Result<(), BoxError> {
            if self.refuse_activate.load(Ordering::SeqCst) {
                return Err("activate refused".into());
            }
            m.active = true;
            Ok(())
        }
    }

    fn logger() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    fn pool(fake: Fake, pool_size: usize, max_in_use: usize) -> Pool<Fake> {
        let config = PoolConfig {
            pool_size,
            max_in_use,
            refill_threads: 2,
        };
        Pool::start(fake, config, "test", logger()).unwrap()
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn fills_hands_out_activated_members_and_refills() {
        let pool = pool(Fake::default(), 3, 10);
        assert!(pool.wait_ready(3, WAIT));
        let (a, slot_a) = pool.take(WAIT).unwrap();
        assert!(a.active);
        // Refilled back to 3 while `a` is out.
        assert!(pool.wait_ready(3, WAIT));
        let c = pool.counts();
        assert_eq!((c.ready, c.in_use), (3, 1));
        assert!(c.created >= 4);
        drop(slot_a);
        assert_eq!(pool.counts().in_use, 0);
        drop(a);
    }

    #[test]
    fn max_in_use_bounds_what_is_handed_out() {
        let pool = pool(Fake::default(), 2, 1);
        let (_a, slot) = pool.take(WAIT).unwrap();
        assert!(matches!(
            pool.take(Duration::from_millis(20)),
            Err(TakeError::Exhausted { .. })
        ));
        drop(slot);
        assert!(pool.take(WAIT).is_ok());
    }

    #[test]
    fn failed_creations_are_counted_and_retried() {
        let fake = Fake::default();
        fake.fail.lock().unwrap().extend([0, 1]);
        let pool = pool(fake, 1, 1);
        let (m, _slot) = pool.take(WAIT).unwrap();
        assert!(m.seq >= 2);
        assert!(pool.counts().failed >= 2);
    }

    #[test]
    fn dead_pooled_members_are_destroyed_not_handed_out() {
        let fake = Fake::default();
        fake.dead.store(true, Ordering::SeqCst);
        let dropped = Arc::clone(&fake.dropped);
        let pool = pool(fake, 1, 1);
        assert!(pool.wait_ready(1, WAIT));
        // Every ready member is dead: take discards them (dropping = destroying) and times out.
        assert!(matches!(
            pool.take(Duration::from_millis(50)),
            Err(TakeError::Exhausted { .. })
        ));
        assert!(dropped.load(Ordering::SeqCst) >= 1);
        assert_eq!(pool.counts().in_use, 0);
        pool.provisioner().dead.store(false, Ordering::SeqCst);
        assert!(pool.take(WAIT).is_ok());
    }

    #[test]
    fn a_failed_activation_destroys_the_member_and_frees_the_slot() {
        let fake = Fake::default();
        fake.refuse_activate.store(true, Ordering::SeqCst);
        let dropped = Arc::clone(&fake.dropped);
        let pool = pool(fake, 1, 1);
        assert!(matches!(pool.take(WAIT), Err(TakeError::Activate(_))));
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert_eq!(pool.counts().in_use, 0);
    }

    #[test]
    fn shutdown_destroys_the_ready_members_and_refuses_takes() {
        let fake = Fake::default();
        let dropped = Arc::clone(&fake.dropped);
        let pool = pool(fake, 4, 4);
        assert!(pool.wait_ready(4, WAIT));
        let (held, slot) = pool.take(WAIT).unwrap();
        pool.shutdown();
        assert!(matches!(pool.take(WAIT), Err(TakeError::ShutDown)));
        assert!(slot.pool_shut_down());
        let created = pool.counts().created;
        // Everything created except the held member is gone.
        assert_eq!(dropped.load(Ordering::SeqCst), created - 1);
        assert_eq!(pool.counts().ready, 0);
        drop(held);
        assert_eq!(dropped.load(Ordering::SeqCst), created);
        pool.shutdown(); // idempotent
    }
}
