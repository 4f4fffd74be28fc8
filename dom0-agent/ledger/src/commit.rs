//! Group commit: one thread owns every LMDB write transaction.
//!
//! Callers queue jobs (a transaction to commit, or audit events to append) and wait on a
//! ticket. The committer takes the first queued job and everything queued behind it (up to
//! `max_group`), validates and applies each transaction in turn inside ONE LMDB write
//! transaction, appends the checkpoints and audit records, signs the new chain head, and
//! commits: one fsync for the whole group. Only then are the tickets answered, so a commit
//! call returns only after its data is durable. A conflicting transaction is rejected
//! before it writes anything, and does not affect the others in its group. If LMDB fails
//! (disk full, map full, I/O error), the whole group is abandoned and every ticket in it
//! gets the error; nothing of the group is visible and the in-memory tips stay at the last
//! durable group.

//!
//! With an observer that takes tentative groups (synchronous replication), the group is
//! handed over once written and signed in the write transaction, before LMDB commits it
//! (`GroupObserver::tentative`), and a commit that then fails is reported
//! (`GroupObserver::abandoned`) before any caller is answered.
//!
//! This module is the committer's thread: it takes groups off the queue (`job.rs`),
//! has them written by `group.rs` (below it), retries audit events while storage is full,
//! grows the map, and tells the group observer. Nothing in the crate but `open` uses it.

use std::sync::mpsc::Receiver;

use slog::{debug, error};

use crate::audit::AuditEvent;
use crate::group::Committer;
use crate::job::{Envelope, Job, Receipt};
use crate::types::now_ns;

pub use crate::commit_error::CommitError;
pub use crate::group::MAX_LIVE_NONCES;
pub use crate::job::{CommitTicket, GroupObserver};
pub use crate::value::encode_deps;

/// Least room kept free in the map before it is grown.
pub const GROW_HEADROOM: u64 = 64 << 20;
/// Longest time the committer waits for open transactions to end before growing the map
/// (it retries at the next group otherwise).
pub const GROW_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Longest time lazily appended audit events wait for a group to join.
pub const LAZY_AUDIT_DELAY: std::time::Duration = std::time::Duration::from_millis(50);
/// Lazily appended audit events that force a commit of their own when reached.
const LAZY_AUDIT_MAX: usize = 4096;

/// Where a job's outcome goes.
type Reply = std::sync::mpsc::SyncSender<Result<Receipt, CommitError>>;

/// What the committer's wait for work gave.
enum Batch {
    /// Jobs to commit (and lazy or deferred events to sort).
    Jobs(Vec<Envelope>),
    /// Nothing arrived in time; due work was done.
    Idle,
    /// Every sender is gone.
    Closed,
}

impl Committer {
    /// Serves the queue until every sender is gone.
    pub fn run(mut self, rx: Receiver<Envelope>) {
        let mut lazy: Vec<AuditEvent> = Vec::new();
        loop {
            let batch = match self.next_batch(&rx, &mut lazy) {
                Batch::Jobs(batch) => batch,
                Batch::Idle => continue,
                Batch::Closed => break,
            };
            let (jobs, replies) = self.sort_batch(batch, &mut lazy);
            if jobs.is_empty() {
                if lazy.len() >= LAZY_AUDIT_MAX {
                    self.flush_lazy(&mut lazy);
                }
                continue;
            }
            self.commit_batch(jobs, replies, &mut lazy);
        }
        self.flush_lazy(&mut lazy);
        if !self.pending.is_empty() {
            error!(self.log, "stopping with audit events that storage never took";
                "events" => self.pending.len(),
                "names" => self.pending.iter().map(|e| e.event.as_str()).collect::<Vec<_>>().join(","));
        }
        debug!(self.log, "committer stopped");
    }

    /// Waits for the next job (at most until lazy audit events are due or full storage is
    /// to be retried: then it does that and says `Idle`), then takes what else is queued,
    /// up to a group's worth.
    fn next_batch(&mut self, rx: &Receiver<Envelope>, lazy: &mut Vec<AuditEvent>) -> Batch {
        let wait = if !lazy.is_empty() {
            Some(LAZY_AUDIT_DELAY)
        } else if !self.pending.is_empty() || self.storage_full() {
            Some(crate::capacity::RETRY_EVERY)
        } else {
            None
        };
        let first = match wait {
            None => match rx.recv() {
                Ok(e) => e,
                Err(_) => return Batch::Closed,
            },
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(e) => e,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if lazy.is_empty() && self.pending.is_empty() {
                        self.after_success(false);
                    } else {
                        self.flush_lazy(lazy);
                    }
                    return Batch::Idle;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Batch::Closed,
            },
        };
        let mut batch = vec![first];
        while batch.len() < self.max_group {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        Batch::Jobs(batch)
    }

    /// The batch's jobs that go into the group and their replies; lazy audit events join
    /// `lazy`, deferred ones the pending list (answered at once).
    fn sort_batch(
        &mut self,
        batch: Vec<Envelope>,
        lazy: &mut Vec<AuditEvent>,
    ) -> (Vec<Job>, Vec<Reply>) {
        let mut jobs = Vec::with_capacity(batch.len().saturating_add(2));
        let mut replies = Vec::with_capacity(batch.len().saturating_add(2));
        for e in batch {
            match e.job {
                Job::LazyAudit(events) => lazy.extend(events),
                Job::Deferred(events) => {
                    self.pending.extend(events);
                    let _ = e.reply.send(Ok(Receipt {
                        seq: 0,
                        hash: self.audit.hash,
                        audit_seq: self.audit.seq,
                        group: self.group,
                    }));
                }
                job => {
                    jobs.push(job);
                    replies.push(e.reply);
                }
            }
        }
        (jobs, replies)
    }

    /// One group: the map grown if needed, lazy and pending audit events first, the group
    /// written, the observer told (a synchronous standby has it before any reply), then
    /// every job answered.
    fn commit_batch(
        &mut self,
        mut jobs: Vec<Job>,
        mut replies: Vec<Reply>,
        lazy: &mut Vec<AuditEvent>,
    ) {
        if let Some(ev) = self.grow_map_if_needed() {
            lazy.push(ev);
        }
        let mut own = std::mem::take(lazy);
        let with_pending = !self.pending.is_empty();
        if with_pending {
            own.splice(0..0, self.pending.iter().cloned());
        }
        if !own.is_empty() {
            // Nobody waits for lazy or pending events: their reply goes nowhere.
            let (reply, _) = std::sync::mpsc::sync_channel(1);
            jobs.insert(0, Job::Audit(own));
            replies.insert(0, reply);
        }
        let n = jobs.len();
        match self.write_group(jobs, false) {
            Ok(results) => {
                self.after_success(with_pending);
                // Before any commit of the group is acknowledged: a synchronous standby
                // must have it too.
                self.observe(true);
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                error!(self.log, "group commit failed"; "jobs" => n, "error" => %e);
                self.after_failure(&e);
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Tells the group observer (if one is set: replication) about a new durable group.
    /// Without one this is a single atomic load.
    fn observe(&mut self, acknowledging: bool) {
        if let Some(observer) = self.observer.get() {
            if self.group > self.observed {
                self.observed = self.group;
                observer.durable(self.group, acknowledging);
            }
        }
    }

    /// After a group committed: the pending events it carried are durable, a storage
    /// outage (if any) is over, and the space in use is sampled.
    fn after_success(&mut self, wrote_pending: bool) {
        if wrote_pending {
            self.pending.clear();
        }
        let max = u64::try_from(self.max_map_size).unwrap_or(u64::MAX);
        let mut shared = self
            .capacity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A small group may fit in pages LMDB freed inside the file while the disk is
        // still full: the outage ends only once there is room again.
        let room = crate::capacity::report(&self.store, max, &shared)
            .is_some_and(|c| c.left_bytes >= crate::capacity::RESUME_LEFT);
        if room {
            if let Some((since, reason)) = shared.full.take() {
                slog::warn!(self.log, "storage takes writes again; transactions are accepted";
                    "full_since_ns" => since, "reason" => reason);
            }
        }
        if let Some(alert) = crate::capacity::sample(&self.store, max, &mut shared, now_ns()) {
            slog::warn!(self.log, "ledger space threshold crossed"; "event" => ?alert.fields);
            self.pending.push(alert);
        }
    }

    fn storage_full(&self) -> bool {
        self.capacity
            .lock()
            .map(|s| s.full.is_some())
            .unwrap_or(false)
    }

    /// The first commit at open failed for lack of space.
    pub(crate) fn after_open_failure(&mut self, e: &CommitError) {
        self.after_failure(e);
    }

    /// After a group failed: a full disk or map starts (or continues) an outage during
    /// which transactions are refused and the committer retries.
    fn after_failure(&mut self, e: &CommitError) {
        if !matches!(
            e,
            CommitError::DiskFull { .. } | CommitError::MapFull { .. }
        ) {
            return;
        }
        let mut shared = self
            .capacity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shared.full.is_none() {
            let now = now_ns();
            let reason = match e {
                CommitError::MapFull { .. } => {
                    let map = self.store.map_usage().map_or(0, |(m, _)| m);
                    if map >= u64::try_from(self.max_map_size).unwrap_or(u64::MAX) {
                        format!(
                            "the ledger reached its size bound ({} MiB, --max-map-size-mib)",
                            self.max_map_size >> 20
                        )
                    } else {
                        format!(
                            "the ledger map ({} MiB) is full and could not grow yet (transactions stayed open); retrying",
                            map >> 20
                        )
                    }
                }
                CommitError::DiskFull { free, .. } => {
                    format!("the disk holding the ledger is full ({free} bytes free)")
                }
                _ => e.to_string(),
            };
            error!(self.log, "storage full: refusing transactions until space returns"; "reason" => &reason);
            self.pending.push(
                AuditEvent::new("ledger.storage_full", crate::Severity::Critical)
                    .field("reason", &reason)
                    .field("since_ns", now),
            );
            shared.full = Some((now, reason));
        }
    }

    /// Enlarges the LMDB map (doubling, up to `max_map_size`) when the room left in it is
    /// below a quarter of it or [`GROW_HEADROOM`], whichever is more: a group commit must
    /// never find the map full while the bound allows more. Returns the audit event
    /// recording a growth.
    fn grow_map_if_needed(&mut self) -> Option<AuditEvent> {
        let (map, used) = self.store.map_usage().ok()?;
        let headroom = (map / 4).max(GROW_HEADROOM);
        let max = u64::try_from(self.max_map_size).unwrap_or(u64::MAX);
        if used.saturating_add(headroom) <= map || map >= max {
            return None;
        }
        let target = map
            .saturating_mul(2)
            .max(used.saturating_add(headroom))
            .min(max);
        let target_usize = usize::try_from(target).ok()?;
        let started = std::time::Instant::now();
        match self.store.grow_map(target_usize, GROW_WAIT) {
            Ok(true) => {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                slog::info!(self.log, "ledger map grown"; "from" => map, "to" => target, "used" => used, "ms" => ms);
                Some(
                    AuditEvent::new("ledger.map_grown", crate::Severity::Notice)
                        .field("from_bytes", map)
                        .field("to_bytes", target)
                        .field("used_bytes", used)
                        .field("max_bytes", max)
                        .field("ms", ms),
                )
            }
            Ok(false) => {
                slog::warn!(self.log, "ledger map not grown: transactions stayed open; retrying at the next group";
                    "map" => map, "used" => used);
                None
            }
            Err(e) => {
                error!(self.log, "growing the ledger map failed"; "error" => %e, "map" => map, "target" => target);
                None
            }
        }
    }

    /// Commits the lazily appended audit events, and the pending ones, as a group of their
    /// own (also the retry while storage is full).
    fn flush_lazy(&mut self, lazy: &mut Vec<AuditEvent>) {
        if lazy.is_empty() && self.pending.is_empty() {
            return;
        }
        let mut events = std::mem::take(lazy);
        let with_pending = !self.pending.is_empty();
        events.splice(0..0, self.pending.iter().cloned());
        let n = events.len();
        match self.write_group(vec![Job::Audit(events)], false) {
            Ok(_) => {
                self.after_success(with_pending);
                self.observe(false);
            }
            Err(e) => {
                if !matches!(
                    e,
                    CommitError::DiskFull { .. } | CommitError::MapFull { .. }
                ) {
                    error!(self.log, "committing lazily appended audit events failed"; "events" => n, "error" => %e);
                }
                self.after_failure(&e);
            }
        }
    }
}
