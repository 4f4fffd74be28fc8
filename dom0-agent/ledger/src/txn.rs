//! A ledger transaction: snapshot reads that record what they saw, buffered writes.
//!
//! A [`Tx`] reads from an LMDB snapshot taken at [`crate::Ledger::begin`], records the
//! version of every key it reads, and buffers its writes. At commit the committer
//! re-checks, inside the group's write transaction, that every version read (and every
//! scanned range) is still current; if so the transaction is equivalent to running alone
//! at its commit point (serializable), otherwise it fails with
//! [`crate::CommitError::Conflict`] and writes nothing.
//!
//! **No transaction pins a snapshot for long.** An LMDB read snapshot keeps every page
//! freed after it from being reused: while one is open, every commit beside it grows the
//! data file (and the agent's resident file pages). So a transaction keeps its snapshot
//! only while it is young: once it is older than the ledger's
//! [`crate::Options::snapshot_hold`] (default [`limits::DEFAULT_SNAPSHOT_HOLD`]) it gives the
//! snapshot up — with its reader slot and its ticket of the map-resize gate — at the end
//! of each operation, or when its owner, waiting for the next operation, finds it due
//! ([`Tx::snapshot_due`], [`Tx::release_snapshot_if_old`]: the executor does this while it
//! waits for the guest, so a transaction that sleeps without operating holds nothing
//! either), and its next read takes a fresh one. If anything was committed in
//! between (LMDB's transaction id of the fresh snapshot differs), everything the
//! transaction has read and scanned so far is re-checked against the fresh snapshot with
//! the committer's own check (`recheck`). Unchanged: the fresh snapshot is a state the
//! handler's reads were all consistent with, so it still never sees a mix of states.
//! Changed: the transaction is doomed — the operation, and every later one including the
//! commit, fails at once with [`TxError::Conflict`] (the executor ends it as a conflict,
//! as it would at commit). The re-check costs at most the read and scan limits
//! ([`crate::limits`]) per operation, and only for a transaction past the hold; in all, a
//! transaction may have [`limits::MAX_RECHECKED`] entries re-checked, beyond which its
//! reads fail with [`TxError::TooManyRechecks`] (so a guest cannot make the agent walk a
//! full read set at each of its operations). A young transaction (honest ones take about
//! a millisecond) reads one snapshot as before.
//!
//! Stored data values are encoded by [`crate::value`].
//!
//! The engine layer: above the committer's queue (`job.rs`) and the [`crate::Ledger`]
//! handle it submits through; uses the store's snapshot gate, the data-value encoding and
//! the idempotency key rule.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heed::{RoTxn, WithoutTls};

use crate::commit_error::CommitError;
use crate::job::{CommitTicket, Job, PreparedTx, Receipt, ScanRecord, TxContext};
use crate::ledger::{self, Inner, Ledger};
use crate::recheck::{self, Stale};
use crate::types::now_ns;
use crate::types::{Hash, TxId};
use crate::value::decode_value;
use crate::{audit::AuditEvent, checkpoint, limits};

/// Why a transaction operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// An idempotency key must be 1..=128 bytes without control characters.
    #[error(
        "idempotency key of {len} bytes: it must be 1..={max} bytes without control characters"
    )]
    BadIdempotencyKey {
        /// Length given.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// Keys must be 1 to 256 bytes.
    #[error("key of {len} bytes: keys must be 1..={max} bytes")]
    BadKey {
        /// Length given.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// Value above the cap.
    #[error("value of {len} bytes is above the limit of {max}")]
    ValueTooLarge {
        /// Length given.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// Handler name empty, too long or outside `[a-z0-9_.-]`.
    #[error("invalid handler name {0:?}")]
    BadHandler(String),
    /// Request above the cap.
    #[error("request of {len} bytes is above the limit of {max}")]
    RequestTooLarge {
        /// Length given.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// The transaction read more keys than a checkpoint may record.
    #[error("transaction read more than {max} keys")]
    TooManyReads {
        /// Cap.
        max: usize,
    },
    /// The transaction wrote more keys than a checkpoint may record.
    #[error("transaction wrote more than {max} keys")]
    TooManyWrites {
        /// Cap.
        max: usize,
    },
    /// Scan limit outside `1..=1024`.
    #[error("scan limit {limit} is outside 1..={max}")]
    BadScanLimit {
        /// Limit given.
        limit: usize,
        /// Cap.
        max: usize,
    },
    /// Too many scans in one transaction.
    #[error("transaction issued more than {max} scans")]
    TooManyScans {
        /// Cap.
        max: usize,
    },
    /// The ledger cannot take writes (disk full, or the map at its bound): no transaction
    /// is started until space returns.
    #[error("storage full, transactions are refused until space returns: {reason}")]
    StorageFull {
        /// What is full.
        reason: String,
    },
    /// A stored data value is malformed.
    #[error("stored value of key {key} is malformed")]
    Corrupt {
        /// Hex of the key.
        key: String,
    },
    /// Something the transaction read or scanned was changed by a commit while it held no
    /// snapshot (it was older than the snapshot hold): it cannot commit, and this and every
    /// later operation fail. Run it again.
    #[error(
        "transaction conflict: {0} (changed while the transaction held no snapshot; run it again)"
    )]
    Conflict(CommitError),
    /// A transaction past its snapshot hold had its reads re-checked more than the bound
    /// allows ([`limits::MAX_RECHECKED`] entries in all): its reads fail from then on.
    #[error("transaction re-checked more than {max} read entries while it held no snapshot")]
    TooManyRechecks {
        /// Cap.
        max: usize,
    },
    /// Too many transactions are open at once (LMDB reader slots exhausted).
    #[error("too many concurrent transactions (reader slots exhausted)")]
    Busy,
    /// LMDB failed.
    #[error("storage: {0}")]
    Storage(heed::Error),
}

impl From<heed::Error> for TxError {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(heed::MdbError::ReadersFull) => TxError::Busy,
            e => TxError::Storage(e),
        }
    }
}

/// Result of [`Tx::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    /// Visible `(key, value)` pairs in key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// The limit stopped the scan; resume after the last key.
    pub more: bool,
}

/// A read snapshot and the map-resize gate's ticket it needs while it lives.
pub(crate) struct Snapshot {
    txn: RoTxn<'static, WithoutTls>,
    /// Declared after the snapshot: dropped after it.
    _ticket: crate::store::Ticket,
}

/// An open transaction. Dropping it aborts it.
pub struct Tx {
    pub(crate) inner: Arc<Inner>,
    /// The snapshot it reads from; `None` once given up (past the hold), until the next read.
    pub(crate) snapshot: Option<Snapshot>,
    /// LMDB's id of the last snapshot its reads were found current in.
    pub(crate) snapshot_id: usize,
    /// Snapshots taken so far (1 for a transaction that never gave its first up).
    pub(crate) snapshots: u32,
    /// Begun at; past `started + hold` the snapshot is given up after each operation.
    pub(crate) started: Instant,
    pub(crate) hold: Duration,
    /// Set when a re-check found a read changed: every later operation fails with it.
    pub(crate) doomed: Option<CommitError>,
    /// Read-set entries re-checked so far (bounded by [`limits::MAX_RECHECKED`]).
    pub(crate) rechecked: usize,
    pub(crate) ctx: TxContext,
    pub(crate) begin_ns: u64,
    pub(crate) entropy_seed: Hash,
    pub(crate) client: Option<String>,
    /// The client's idempotency key, recorded durably with the commit.
    pub(crate) idempotency_key: Option<String>,
    pub(crate) reads: BTreeMap<Vec<u8>, u64>,
    pub(crate) writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub(crate) scans: Vec<ScanRecord>,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("tx_id", &self.ctx.tx_id)
            .field("reads", &self.reads.len())
            .field("writes", &self.writes.len())
            .finish()
    }
}

pub(crate) fn check_key(key: &[u8]) -> Result<(), TxError> {
    if key.is_empty() || key.len() > limits::MAX_KEY {
        return Err(TxError::BadKey {
            len: key.len(),
            max: limits::MAX_KEY,
        });
    }
    Ok(())
}

impl Tx {
    /// The transaction's id.
    pub fn id(&self) -> TxId {
        self.ctx.tx_id
    }

    /// Records the entropy the domain's RNG was seeded with (kept in the checkpoint, so a
    /// replay can give the handler the same numbers).
    pub fn set_entropy_seed(&mut self, seed: Hash) {
        self.entropy_seed = seed;
    }

    /// Records who asked for the transaction (the client API's identity of the client: a
    /// certificate's `spki:<hex>` or an address), kept in the checkpoint (format version 2).
    /// Bytes outside printable ASCII become `_` and the name is cut at
    /// [`checkpoint::MAX_CLIENT`] bytes; an empty name records none.
    pub fn set_client(&mut self, client: &str) {
        self.client = checkpoint::canonical_client(client);
    }

    /// Records the client's idempotency key: the commit appends a `tx.idempotency_key`
    /// audit record and indexes (client, key) → this commit, in the same group, so a
    /// resend of the request (here or on a promoted standby) finds the outcome
    /// ([`crate::Store::idempotent_commit`]). The commit is refused
    /// ([`crate::CommitError::IdempotencyKeyUsed`]) if the client's key is already indexed.
    pub fn set_idempotency_key(&mut self, key: &str) -> Result<(), TxError> {
        if !crate::idempotency::valid_key(key) {
            return Err(TxError::BadIdempotencyKey {
                len: key.len(),
                max: crate::idempotency::MAX_KEY,
            });
        }
        self.idempotency_key = Some(key.to_string());
        Ok(())
    }

    fn record_read(&mut self, key: &[u8], version: u64) -> Result<(), TxError> {
        if !self.reads.contains_key(key) {
            if self.reads.len() >= limits::MAX_READS {
                return Err(TxError::TooManyReads {
                    max: limits::MAX_READS,
                });
            }
            self.reads.insert(key.to_vec(), version);
        }
        Ok(())
    }

    /// The buffered writes, by key (`None`: delete), as they would be committed.
    pub fn writes(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.writes
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    /// Whether a re-check found something it read changed (see [`TxError::Conflict`]).
    pub fn is_doomed(&self) -> bool {
        self.doomed.is_some()
    }

    /// How many read snapshots the transaction has taken: 1 while it keeps its first.
    pub fn snapshots_taken(&self) -> u32 {
        self.snapshots
    }

    /// When the snapshot it holds is due to be given up (`None`: it holds none). A caller
    /// that waits between operations (the executor, for its guest) calls
    /// [`Tx::release_snapshot_if_old`] then, so that an idle transaction does not keep its
    /// snapshot either.
    pub fn snapshot_due(&self) -> Option<Instant> {
        self.snapshot.as_ref()?;
        // A hold too long to add is never due.
        self.started.checked_add(self.hold)
    }

    /// Gives the snapshot up if the transaction is older than the hold (its next read
    /// takes a fresh one, re-checking what it read); keeps it otherwise.
    pub fn release_snapshot_if_old(&mut self) {
        let snap = self.snapshot.take();
        self.put_back(snap);
    }

    fn check_doomed(&self) -> Result<(), TxError> {
        match &self.doomed {
            Some(e) => Err(TxError::Conflict(e.clone())),
            None => Ok(()),
        }
    }

    /// The snapshot to read from: the one held, or a fresh one in which everything read so
    /// far is re-checked if anything was committed since (a change dooms the transaction).
    fn take_snapshot(&mut self) -> Result<Snapshot, TxError> {
        if let Some(snap) = self.snapshot.take() {
            return Ok(snap);
        }
        let ticket = self.inner.store.gate.enter();
        let txn = self.inner.store.env.clone().static_read_txn()?;
        let id = txn.id();
        if id != self.snapshot_id {
            let cost = self
                .scans
                .iter()
                .fold(self.reads.len(), |n, s| n.saturating_add(s.seen.len() + 1));
            let total = self.rechecked.saturating_add(cost);
            if total > limits::MAX_RECHECKED {
                return Err(TxError::TooManyRechecks {
                    max: limits::MAX_RECHECKED,
                });
            }
            self.rechecked = total;
            let data = self.inner.store.dbs.data;
            match recheck::reads_current(data, &txn, &self.reads, &self.scans) {
                Ok(()) => {}
                Err(Stale::Changed(CommitError::Corrupt { key })) => {
                    return Err(TxError::Corrupt { key })
                }
                Err(Stale::Changed(e)) => {
                    self.doomed = Some(e.clone());
                    return Err(TxError::Conflict(e));
                }
                Err(Stale::Storage(e)) => return Err(e.into()),
            }
            self.snapshot_id = id;
        }
        self.snapshots = self.snapshots.saturating_add(1);
        Ok(Snapshot {
            txn,
            _ticket: ticket,
        })
    }

    /// After an operation: keeps the snapshot while the transaction is young, else gives
    /// it up (its pages, reader slot and gate ticket) until the next read.
    fn put_back(&mut self, snap: Option<Snapshot>) {
        if self.started.elapsed() < self.hold {
            if let Some(snap) = snap {
                self.snapshot = Some(snap);
            }
        } else {
            self.snapshot = None;
        }
    }

    /// Reads `key`: the transaction's own write if it made one, else the snapshot's value.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, TxError> {
        self.check_doomed()?;
        check_key(key)?;
        if let Some(own) = self.writes.get(key) {
            let own = own.clone();
            self.release_snapshot_if_old();
            return Ok(own);
        }
        let snap = self.take_snapshot()?;
        let read = self.get_stored(&snap.txn, key);
        self.put_back(Some(snap));
        read
    }

    fn get_stored(
        &mut self,
        snapshot: &RoTxn<'static, WithoutTls>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, TxError> {
        let stored = self.inner.store.dbs.data.get(snapshot, key)?;
        let (version, value) = match stored {
            None => (0, None),
            Some(bytes) => {
                let s = decode_value(bytes).ok_or_else(|| TxError::Corrupt {
                    key: crate::codec::hex(key),
                })?;
                (s.version, s.value.map(<[u8]>::to_vec))
            }
        };
        self.record_read(key, version)?;
        Ok(value)
    }

    /// Buffers a write of `value` to `key`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), TxError> {
        self.check_doomed()?;
        check_key(key)?;
        if value.len() > limits::MAX_VALUE {
            return Err(TxError::ValueTooLarge {
                len: value.len(),
                max: limits::MAX_VALUE,
            });
        }
        self.buffer(key, Some(value.to_vec()))
    }

    /// Buffers a delete of `key`.
    pub fn delete(&mut self, key: &[u8]) -> Result<(), TxError> {
        self.check_doomed()?;
        check_key(key)?;
        self.buffer(key, None)
    }

    fn buffer(&mut self, key: &[u8], value: Option<Vec<u8>>) -> Result<(), TxError> {
        self.release_snapshot_if_old();
        if !self.writes.contains_key(key) && self.writes.len() >= limits::MAX_WRITES {
            return Err(TxError::TooManyWrites {
                max: limits::MAX_WRITES,
            });
        }
        self.writes.insert(key.to_vec(), value);
        Ok(())
    }

    /// Returns up to `limit` visible entries with `start <= key < end` (`end = None`: no
    /// upper bound), merging the snapshot with the transaction's own writes. The keys
    /// examined, deleted ones included, join the read set, and the covered range is
    /// re-checked at commit, so an insert into it by another transaction is a conflict.
    pub fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<ScanResult, TxError> {
        self.check_doomed()?;
        self.check_scan(start, end, limit)?;
        let snap = self.take_snapshot()?;
        let scanned = self.scan_in(&snap.txn, start, end, limit);
        self.put_back(Some(snap));
        scanned
    }

    fn scan_in(
        &mut self,
        snapshot: &RoTxn<'static, WithoutTls>,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<ScanResult, TxError> {
        let upper: Bound<&[u8]> = end.map_or(Bound::Unbounded, Bound::Excluded);
        let range = (Bound::Included(start), upper);

        let mut committed = self
            .inner
            .store
            .dbs
            .data
            .range(snapshot, &range)?
            .peekable();
        let mut own = self.writes.range::<[u8], _>(range).peekable();
        let mut seen: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut entries = Vec::new();
        let mut more = false;
        let mut last_key: Option<Vec<u8>> = None;
        loop {
            let c_key: Option<Vec<u8>> = match committed.peek() {
                Some(Ok((k, _))) => Some(k.to_vec()),
                Some(Err(_)) => {
                    // Surface the error by consuming it.
                    if let Some(Err(e)) = committed.next() {
                        return Err(e.into());
                    }
                    None
                }
                None => None,
            };
            let o_key: Option<Vec<u8>> = own.peek().map(|(k, _)| (*k).clone());
            let next = match (&c_key, &o_key) {
                (None, None) => break,
                (Some(c), Some(o)) => std::cmp::min(c, o).clone(),
                (Some(c), None) => c.clone(),
                (None, Some(o)) => o.clone(),
            };
            if entries.len() == limit {
                more = true;
                break;
            }
            let mut visible: Option<Vec<u8>> = None;
            if c_key.as_deref() == Some(next.as_slice()) {
                if let Some(Ok((k, v))) = committed.next() {
                    let s = decode_value(v).ok_or_else(|| TxError::Corrupt {
                        key: crate::codec::hex(k),
                    })?;
                    if seen.len() >= limits::MAX_READS {
                        return Err(TxError::TooManyReads {
                            max: limits::MAX_READS,
                        });
                    }
                    seen.push((k.to_vec(), s.version));
                    visible = s.value.map(<[u8]>::to_vec);
                }
            }
            if o_key.as_deref() == Some(next.as_slice()) {
                if let Some((_, v)) = own.next() {
                    visible = v.clone();
                }
            }
            if let Some(v) = visible {
                entries.push((next.clone(), v));
            }
            last_key = Some(next);
        }
        drop(committed);
        self.record_scan(start, end, more, last_key, seen)?;
        Ok(ScanResult { entries, more })
    }

    /// A scan's arguments within the limits: `limit` in 1..=MAX_SCAN, at most MAX_SCANS
    /// scans per transaction, valid bounds.
    fn check_scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<(), TxError> {
        if limit == 0 || limit > limits::MAX_SCAN {
            return Err(TxError::BadScanLimit {
                limit,
                max: limits::MAX_SCAN,
            });
        }
        if self.scans.len() >= limits::MAX_SCANS {
            return Err(TxError::TooManyScans {
                max: limits::MAX_SCANS,
            });
        }
        if !start.is_empty() {
            check_key(start)?;
        }
        if let Some(e) = end {
            check_key(e)?;
        }
        Ok(())
    }

    /// A finished scan joins the read set: the keys it examined and the range it covered
    /// (up to its last key when it stopped at its limit), re-checked at commit.
    fn record_scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        more: bool,
        last_key: Option<Vec<u8>>,
        seen: Vec<(Vec<u8>, u64)>,
    ) -> Result<(), TxError> {
        let covered_end = match (more, last_key) {
            (true, Some(k)) => Bound::Included(k),
            _ => end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec())),
        };
        for (k, v) in &seen {
            self.record_read(k, *v)?;
        }
        self.scans.push(ScanRecord {
            start: start.to_vec(),
            end: covered_end,
            seen,
        });
        Ok(())
    }

    /// Commits with the handler's `result` and waits until it is durable.
    pub fn commit(self, result: Vec<u8>) -> Result<Receipt, CommitError> {
        self.submit(result, Vec::new())?.wait()
    }

    /// Commits with audit events recorded atomically with the checkpoint; waits until
    /// durable.
    pub fn commit_with_audit(
        self,
        result: Vec<u8>,
        audit: Vec<AuditEvent>,
    ) -> Result<Receipt, CommitError> {
        self.submit(result, audit)?.wait()
    }

    /// Queues the commit and returns at once; [`CommitTicket::wait`] returns when the
    /// group holding it is durable (or failed). Lets one thread keep many commits in
    /// flight, as the agent does with many domains.
    pub fn submit(
        self,
        result: Vec<u8>,
        audit: Vec<AuditEvent>,
    ) -> Result<CommitTicket, CommitError> {
        if result.len() > limits::MAX_RESULT {
            return Err(CommitError::ResultTooLarge {
                len: result.len(),
                max: limits::MAX_RESULT,
            });
        }
        for ev in &audit {
            ev.validate()?;
        }
        if let Some(e) = self.doomed {
            return Err(e);
        }
        let Tx {
            inner,
            snapshot,
            ctx,
            begin_ns,
            entropy_seed,
            client,
            idempotency_key,
            reads,
            writes,
            scans,
            ..
        } = self;
        // The snapshot is released before queueing so the reader slot is not held while
        // waiting for the group.
        drop(snapshot);
        let prepared = PreparedTx {
            ctx,
            begin_ns,
            entropy_seed,
            client,
            idempotency_key,
            reads,
            writes,
            scans,
            result,
            audit,
        };
        ledger::submit(&inner, Job::Commit(Box::new(prepared)))
    }

    /// Abandons the transaction; nothing it buffered is written.
    pub fn abort(self) {}
}

impl Ledger {
    /// Begins a transaction reading from the current committed state.
    pub fn begin(&self, ctx: TxContext) -> Result<Tx, TxError> {
        if !mayfly_names::is_handler_name(&ctx.handler) {
            return Err(TxError::BadHandler(ctx.handler));
        }
        if ctx.request.len() > limits::MAX_REQUEST {
            return Err(TxError::RequestTooLarge {
                len: ctx.request.len(),
                max: limits::MAX_REQUEST,
            });
        }
        if let Some((_, reason)) = &self.capacity_shared().full {
            return Err(TxError::StorageFull {
                reason: reason.clone(),
            });
        }
        let ticket = self.inner.store.gate.enter();
        let txn = self.inner.store.env.clone().static_read_txn()?;
        Ok(Tx {
            inner: self.inner.clone(),
            snapshot_id: txn.id(),
            snapshot: Some(Snapshot {
                txn,
                _ticket: ticket,
            }),
            snapshots: 1,
            started: Instant::now(),
            hold: self.inner.snapshot_hold,
            doomed: None,
            rechecked: 0,
            ctx,
            begin_ns: now_ns(),
            entropy_seed: [0; 32],
            client: None,
            idempotency_key: None,
            reads: Default::default(),
            writes: Default::default(),
            scans: Vec::new(),
        })
    }
}
