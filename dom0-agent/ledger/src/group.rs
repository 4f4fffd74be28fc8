//! One group commit: the committer's state ([`Committer`]: the durable tips and the key
//! that signs them) and how it applies a group of jobs in ONE LMDB write transaction —
//! validating each transaction, writing data, checkpoints, rollback records, audit
//! records, admin nonces and idempotency keys, then signing the new head — and commits it
//! with one fsync.
//!
//! The thread that feeds it groups from the queue (and handles full storage) is
//! [`crate::commit`], above it. Uses the store, the tables it writes (idempotency, the
//! `undone` index, capacity), the record formats, the queue's job types and the vocabulary.

use std::ops::Bound;
use std::sync::{Arc, Mutex};

use heed::RwTxn;
use slog::{error, Logger};

use crate::audit::{AuditEvent, AuditRecord};
use crate::checkpoint::{chain_hash, Checkpoint, ReadEntry, WriteEntry, MAX_CHECKPOINT_BYTES};
use crate::codec::hex;
use crate::commit_error::CommitError;
use crate::head::{SignedHead, Tip};
use crate::job::{GroupObserver, Job, NonceJob, PreparedTx, Receipt, RollbackJob, Tips};
use crate::keys::{KeyStore, SigningKey};
use crate::state::StateDigest;
use crate::store::{encode_tip, meta_keys, u64_key, Store, FORMAT_MARKER, FORMAT_VERSION};
use crate::types::{now_ns, Hash};
use crate::value::{decode_value, encode_deps, encode_value};

/// Most unexpired nonces kept; commands beyond it are refused until some expire.
pub const MAX_LIVE_NONCES: u64 = 100_000;

enum Step {
    Reject(CommitError),
    Fatal(heed::Error),
}

/// An idempotency key a transaction claims: its index, the key's hash, and the client and
/// key for the audit record.
struct KeyClaim {
    db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
    hash: [u8; 32],
    client: String,
    key: String,
}

/// What a group has done so far in its write transaction: the chain tips, the live-state
/// digest and a rotation's incoming key (applied to the committer once it is durable).
struct Tally {
    ckpt: Tip,
    audit: Tip,
    state: StateDigest,
    incoming: Option<SigningKey>,
}

impl From<crate::recheck::Stale> for Step {
    fn from(e: crate::recheck::Stale) -> Self {
        match e {
            crate::recheck::Stale::Changed(e) => Step::Reject(e),
            crate::recheck::Stale::Storage(e) => Step::Fatal(e),
        }
    }
}

impl From<heed::Error> for Step {
    fn from(e: heed::Error) -> Self {
        Step::Fatal(e)
    }
}

/// The committer's state: the durable tips and the key that signs them.
pub(crate) struct Committer {
    pub store: Store,
    pub key: SigningKey,
    /// Where the key is kept (a rotation's incoming key goes there too).
    pub keys: Arc<dyn KeyStore>,
    pub checkpoints: Tip,
    pub audit: Tip,
    pub group: u64,
    /// The epoch signed in every head (version 3): the last head's, 0 for a new ledger.
    pub epoch: u64,
    /// Retention of durable idempotency keys.
    pub idempotency: crate::idempotency::Retention,
    /// Told about every durable group (replication); unset on a standalone appliance.
    pub observer: Arc<std::sync::OnceLock<Arc<dyn GroupObserver>>>,
    /// Last group the observer was told about.
    pub observed: u64,
    /// The live-state digest after the last durable group.
    pub state: StateDigest,
    /// Whether to maintain the digest and write version-2 heads (off: measurement only).
    pub maintain_state: bool,
    /// Largest map size the committer grows the map to.
    pub max_map_size: usize,
    /// Space in use over time, alerts raised, and whether storage is full.
    pub capacity: Arc<Mutex<crate::capacity::Shared>>,
    /// Audit events that must be written, kept while storage is full and retried.
    pub pending: Vec<AuditEvent>,
    pub max_group: usize,
    pub track_dependencies: bool,
    pub shared_tips: Arc<Mutex<Tips>>,
    pub shared_signing_key: Arc<Mutex<crate::PublicKey>>,
    /// Jobs per group, commit times and failed groups, for `Ledger::group_stats`.
    pub group_stats: Arc<crate::group_stats::GroupCounters>,
    pub log: Logger,
}

impl Committer {
    /// Applies `jobs` in one LMDB write transaction and commits it. `genesis` also writes
    /// the format marker and identity. Returns one result per job, or the group's failure
    /// (counted in the group statistics).
    pub fn write_group(
        &mut self,
        jobs: Vec<Job>,
        genesis: bool,
    ) -> Result<Vec<Result<Receipt, CommitError>>, CommitError> {
        let result = self.write_group_inner(jobs, genesis);
        if result.is_err() {
            self.group_stats.failed();
        }
        result
    }

    fn write_group_inner(
        &mut self,
        jobs: Vec<Job>,
        genesis: bool,
    ) -> Result<Vec<Result<Receipt, CommitError>>, CommitError> {
        let n = jobs.len();
        let dir = self.store.dir.clone();
        let fail = |e: heed::Error| CommitError::from_storage(e, n, &dir);
        let now = now_ns();
        let env = self.store.env.clone();
        let mut wtxn = env.write_txn().map_err(fail)?;
        if genesis {
            self.write_identity(&mut wtxn).map_err(fail)?;
        }
        let mut tally = Tally {
            ckpt: self.checkpoints,
            audit: self.audit,
            state: self.state.clone(),
            incoming: None,
        };
        let mut results = Vec::with_capacity(n);
        for job in jobs {
            match self.apply_job(&mut wtxn, &mut tally, job, now) {
                Ok(r) => results.push(Ok(r)),
                Err(Step::Reject(e)) => results.push(Err(e)),
                Err(Step::Fatal(e)) => return Err(fail(e)),
            }
        }
        if tally.ckpt == self.checkpoints && tally.audit == self.audit && !genesis {
            wtxn.abort();
            return Ok(results);
        }
        let group = self.group.saturating_add(1);
        self.write_head(&mut wtxn, &tally, group, now)
            .map_err(fail)?;
        // A synchronous standby gets the group now, while LMDB commits it here.
        let shipped = self.ship_tentative(&wtxn, group);
        // LMDB's commit writes the pages and fsyncs: the group's durable cost.
        let started = std::time::Instant::now();
        if let Err(e) = wtxn.commit() {
            if tally.incoming.is_some() {
                let _ = self.keys.discard_next(&self.store.dir);
            }
            if let Some(observer) = shipped {
                observer.abandoned(group);
            }
            return Err(fail(e));
        }
        self.group_stats.committed(n, started.elapsed());
        self.after_durable(tally, group);
        for r in results.iter_mut().flatten() {
            r.group = group;
        }
        Ok(results)
    }

    /// Hands group `group`, final in `wtxn`, to an observer that takes tentative groups
    /// (synchronous replication). Returns that observer, which must hear whether the
    /// commit failed. Without an observer: one atomic load.
    fn ship_tentative(&self, wtxn: &RwTxn<'_>, group: u64) -> Option<Arc<dyn GroupObserver>> {
        let observer = self.observer.get()?;
        if !observer.wants_tentative() {
            return None;
        }
        match self.store.export_group_in(wtxn, group) {
            Ok(records) => {
                observer.tentative(group, records);
                Some(observer.clone())
            }
            Err(e) => {
                // It ships once durable instead, as in asynchronous mode.
                slog::warn!(self.log, "exporting a group before its commit failed; it ships after"; "group" => group, "error" => %e);
                None
            }
        }
    }

    /// A new ledger's format marker and public key (the genesis group).
    fn write_identity(&self, wtxn: &mut RwTxn<'_>) -> Result<(), heed::Error> {
        let dbs = self.store.dbs;
        let mut format = FORMAT_MARKER.to_vec();
        format.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        dbs.meta.put(wtxn, meta_keys::FORMAT, &format)?;
        dbs.meta
            .put(wtxn, meta_keys::PUBLIC_KEY, &self.key.public_key())
    }

    /// One job of the group, applied to the write transaction and to the group's tally.
    fn apply_job(
        &mut self,
        wtxn: &mut RwTxn<'_>,
        t: &mut Tally,
        job: Job,
        now: u64,
    ) -> Result<Receipt, Step> {
        match job {
            Job::AdminNonce(job) => self.apply_nonce(wtxn, &mut t.audit, *job, now),
            Job::RotateKey(events) => {
                self.apply_rotation(wtxn, &mut t.audit, &mut t.incoming, events, now)
            }
            Job::Commit(tx) => {
                self.apply_tx(wtxn, &mut t.ckpt, &mut t.audit, &mut t.state, *tx, now)
            }
            Job::Audit(events) | Job::LazyAudit(events) | Job::Deferred(events) => {
                self.apply_audit(wtxn, &mut t.audit, events, now)
            }
            Job::Rollback(job) => {
                self.apply_rollback(wtxn, &mut t.ckpt, &mut t.audit, &mut t.state, *job, now)
            }
        }
    }

    /// The group's signed head (version 3 with the live-state digest and the epoch; a
    /// rotation names the incoming key) and the tips it signs, in the write transaction.
    fn write_head(
        &self,
        wtxn: &mut RwTxn<'_>,
        t: &Tally,
        group: u64,
        now: u64,
    ) -> Result<(), heed::Error> {
        let dbs = self.store.dbs;
        let (ckpt, audit) = (t.ckpt, t.audit);
        let next_key = t.incoming.as_ref().map(SigningKey::public_key);
        if let Some(next) = &next_key {
            dbs.meta.put(wtxn, meta_keys::SIGNING_KEY, next)?;
        }
        let head = if self.maintain_state {
            let encoded_state = t.state.encode();
            let state_hash = crate::state::hash_encoding(&encoded_state);
            dbs.meta.put(wtxn, meta_keys::STATE, &encoded_state)?;
            SignedHead::sign_v3(
                &self.key, group, ckpt, audit, now, state_hash, self.epoch, next_key,
            )
        } else {
            match next_key {
                Some(next) => SignedHead::sign_rotation(&self.key, group, ckpt, audit, now, next),
                None => SignedHead::sign(&self.key, group, ckpt, audit, now),
            }
        };
        dbs.heads.put(wtxn, &u64_key(group), &head.encode())?;
        dbs.meta
            .put(wtxn, meta_keys::CKPT_TIP, &encode_tip(&ckpt))?;
        dbs.meta
            .put(wtxn, meta_keys::AUDIT_TIP, &encode_tip(&audit))?;
        dbs.meta.put(wtxn, meta_keys::GROUP, &u64_key(group))
    }

    /// After the group is durable: a rotation's key installed and in use, the committer's
    /// tips, digest and the shared tips moved to the group's.
    fn after_durable(&mut self, t: Tally, group: u64) {
        if let Some(next) = t.incoming {
            // The rotation head is durable: from now on only the new key may sign. If the
            // rename fails, the next start finds signing.key.next matching the ledger and
            // finishes it (Ledger::open).
            if let Err(e) = self.keys.install_next(&self.store.dir) {
                error!(self.log, "installing the rotated signing key failed; it will be installed at the next start"; "error" => %e);
            }
            if let Ok(mut k) = self.shared_signing_key.lock() {
                *k = next.public_key();
            }
            self.key = next;
        }
        self.checkpoints = t.ckpt;
        self.audit = t.audit;
        self.group = group;
        self.state = t.state;
        if let Ok(mut tips) = self.shared_tips.lock() {
            *tips = Tips {
                checkpoints: t.ckpt,
                audit: t.audit,
                group,
                epoch: self.epoch,
            };
        }
    }

    fn current(&self, wtxn: &RwTxn<'_>, key: &[u8]) -> Result<(u64, Option<Vec<u8>>), Step> {
        match self.store.dbs.data.get(wtxn, key)? {
            None => Ok((0, None)),
            Some(bytes) => {
                let s = decode_value(bytes)
                    .ok_or_else(|| Step::Reject(CommitError::Corrupt { key: hex(key) }))?;
                Ok((s.version, s.value.map(<[u8]>::to_vec)))
            }
        }
    }

    /// Writes `new` under `key` in `data`, replacing `old` (the bytes stored there now), and
    /// moves the live-state digest along.
    fn put_data(
        &self,
        wtxn: &mut RwTxn<'_>,
        state: &mut StateDigest,
        key: &[u8],
        old: Option<&[u8]>,
        new: &[u8],
    ) -> Result<(), heed::Error> {
        if self.maintain_state {
            state.replace(key, old, new);
        }
        self.store.dbs.data.put(wtxn, key, new)
    }

    fn apply_tx(
        &self,
        wtxn: &mut RwTxn<'_>,
        ckpt: &mut Tip,
        audit: &mut Tip,
        state: &mut StateDigest,
        tx: PreparedTx,
        now: u64,
    ) -> Result<Receipt, Step> {
        let idempotency = self.validate_tx(wtxn, &tx)?;
        let seq = ckpt.seq.saturating_add(1);
        let (writes, stored) = self.before_images(wtxn, tx.writes)?;
        let dbs = self.store.dbs;
        let cp = Checkpoint {
            seq,
            prev_hash: ckpt.hash,
            tx_id: tx.ctx.tx_id,
            handler: tx.ctx.handler,
            client: tx.client,
            domain_id: tx.ctx.domain_id,
            policy_hash: tx.ctx.policy_hash,
            entropy_seed: tx.entropy_seed,
            begin_ns: tx.begin_ns,
            commit_ns: now,
            request: tx.ctx.request,
            result: tx.result,
            reads: if self.track_dependencies {
                tx.reads
                    .into_iter()
                    .map(|(key, version)| ReadEntry { key, version })
                    .collect()
            } else {
                Vec::new()
            },
            writes,
        };
        let len = cp.encoded_len();
        if len > MAX_CHECKPOINT_BYTES {
            return Err(Step::Reject(CommitError::CheckpointTooLarge {
                len,
                max: MAX_CHECKPOINT_BYTES,
            }));
        }
        let enc = cp.encode();
        let hash: Hash = chain_hash(&ckpt.hash, &enc);

        let seq_key = u64_key(seq);
        for (w, old) in cp.writes.iter().zip(&stored) {
            let new = encode_value(seq, w.after.as_deref());
            self.put_data(wtxn, state, &w.key, old.as_deref(), &new)?;
        }
        let deps = encode_deps(&cp.reads);
        if !deps.is_empty() {
            dbs.deps.put(wtxn, &seq_key, &deps)?;
        }
        dbs.checkpoints.put(wtxn, &seq_key, &enc)?;
        dbs.tx_index.put(wtxn, &cp.tx_id.0, &seq_key)?;
        *ckpt = Tip { seq, hash };
        for ev in tx.audit {
            self.append_audit(wtxn, audit, ev, now)?;
        }
        if let Some(claim) = idempotency {
            self.record_idempotency(wtxn, audit, claim, seq, cp.tx_id, now)?;
        }
        Ok(Receipt {
            seq,
            hash,
            audit_seq: audit.seq,
            group: 0,
        })
    }

    /// Whether a prepared transaction may commit: a new tx id, an unused idempotency key
    /// (the key's claim is returned), every read and scan still current.
    fn validate_tx(&self, wtxn: &RwTxn<'_>, tx: &PreparedTx) -> Result<Option<KeyClaim>, Step> {
        let dbs = self.store.dbs;
        if dbs.tx_index.get(wtxn, &tx.ctx.tx_id.0)?.is_some() {
            return Err(Step::Reject(CommitError::DuplicateTxId(tx.ctx.tx_id)));
        }
        let idempotency = match (&tx.idempotency_key, dbs.idempotency) {
            (Some(key), Some(db)) => {
                let client = tx.client.as_deref().unwrap_or("");
                let hash = crate::idempotency::key_hash(client, key);
                if let Some(seq) = crate::idempotency::lookup(db, wtxn, &hash)? {
                    return Err(Step::Reject(CommitError::IdempotencyKeyUsed { seq }));
                }
                Some(KeyClaim {
                    db,
                    hash,
                    client: client.to_string(),
                    key: key.clone(),
                })
            }
            _ => None,
        };
        crate::recheck::reads_current(self.store.dbs.data, wtxn, &tx.reads, &tx.scans)?;

        Ok(idempotency)
    }

    /// Each write's entry with the value and version it replaces, and the stored bytes it
    /// replaces (for the live-state digest).
    #[allow(clippy::type_complexity)]
    fn before_images(
        &self,
        wtxn: &RwTxn<'_>,
        tx_writes: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<(Vec<WriteEntry>, Vec<Option<Vec<u8>>>), Step> {
        let dbs = self.store.dbs;
        let mut writes = Vec::with_capacity(tx_writes.len());
        let mut stored = Vec::with_capacity(tx_writes.len());
        for (key, after) in tx_writes {
            let raw = dbs.data.get(wtxn, &key)?.map(<[u8]>::to_vec);
            let (before_version, before) = match &raw {
                None => (0, None),
                Some(bytes) => {
                    let s = decode_value(bytes)
                        .ok_or_else(|| Step::Reject(CommitError::Corrupt { key: hex(&key) }))?;
                    (s.version, s.value.map(<[u8]>::to_vec))
                }
            };
            stored.push(raw);
            writes.push(WriteEntry {
                key,
                before_version,
                before,
                after,
            });
        }
        Ok((writes, stored))
    }

    /// An idempotency key's record: its audit record and its index entry (pruned to the
    /// retention), in the transaction's group.
    fn record_idempotency(
        &self,
        wtxn: &mut RwTxn<'_>,
        audit: &mut Tip,
        claim: KeyClaim,
        seq: u64,
        tx_id: crate::types::TxId,
        now: u64,
    ) -> Result<(), Step> {
        let KeyClaim {
            db,
            hash: key_hash,
            client,
            key,
        } = claim;
        let ev = AuditEvent::new(crate::idempotency::EVENT, crate::Severity::Info)
            .field("client", client)
            .field("key", key)
            .field("seq", seq)
            .field("tx_id", tx_id);
        self.append_audit(wtxn, audit, ev, now)?;
        crate::idempotency::insert(db, wtxn, &key_hash, seq, now)?;
        crate::idempotency::prune(db, wtxn, now, self.idempotency)?;
        Ok(())
    }

    /// A rollback plan still holds: nothing it restores has changed since it was made, and
    /// no commit since has read what it undoes (else the plan is stale: refused).
    fn check_plan_current(
        &self,
        wtxn: &RwTxn<'_>,
        plan: &crate::record::RollbackPlan,
    ) -> Result<(), Step> {
        let dbs = self.store.dbs;
        let stale = |reason: String| Step::Reject(CommitError::StaleRollback { reason });
        // Nothing the plan restores may have changed since it was made...
        for w in &plan.writes {
            let (current, _) = self.current(wtxn, &w.key)?;
            if current != w.before_version {
                return Err(stale(format!(
                    "key {} is now at version {current}, planned at {}",
                    hex(&w.key),
                    w.before_version
                )));
            }
        }
        // ...and no commit since may have read what it undoes.
        let start = u64_key(plan.tip.saturating_add(1));
        let range = (Bound::Included(&start[..]), Bound::Unbounded);
        for item in dbs.deps.range(wtxn, &range)? {
            let (k, v) = item?;
            let reads_affected = v
                .chunks_exact(8)
                .filter_map(crate::store::read_u64)
                .any(|w| plan.affected.binary_search(&w).is_ok());
            if reads_affected {
                let reader = crate::store::read_u64(k).unwrap_or(0);
                return Err(stale(format!(
                    "commit {reader} read undone data after planning"
                )));
            }
        }
        Ok(())
    }

    fn apply_rollback(
        &self,
        wtxn: &mut RwTxn<'_>,
        ckpt: &mut Tip,
        audit: &mut Tip,
        state: &mut StateDigest,
        job: RollbackJob,
        now: u64,
    ) -> Result<Receipt, Step> {
        let dbs = self.store.dbs;
        self.check_plan_current(wtxn, &job.plan)?;
        let seq = ckpt.seq.saturating_add(1);
        let record = crate::record::RollbackRecord {
            seq,
            prev_hash: ckpt.hash,
            rollback_id: job.rollback_id,
            reason: job.reason,
            policy_hash: job.policy_hash,
            time_ns: now,
            roots: job.plan.roots,
            affected: job.plan.affected,
            writes: job.plan.writes,
        };
        let enc = record.encode();
        if enc.len() > crate::record::MAX_ROLLBACK_BYTES {
            return Err(Step::Reject(CommitError::CheckpointTooLarge {
                len: enc.len(),
                max: crate::record::MAX_ROLLBACK_BYTES,
            }));
        }
        let hash = chain_hash(&ckpt.hash, &enc);
        let seq_key = u64_key(seq);
        for w in &record.writes {
            let old = dbs.data.get(wtxn, &w.key)?.map(<[u8]>::to_vec);
            let new = encode_value(seq, w.after.as_deref());
            self.put_data(wtxn, state, &w.key, old.as_deref(), &new)?;
        }
        dbs.checkpoints.put(wtxn, &seq_key, &enc)?;
        // The first rollback that undid a commit is the one named for it.
        if let Some(undone) = dbs.undone {
            for a in &record.affected {
                let key = u64_key(*a);
                if undone.get(wtxn, &key)?.is_none() {
                    undone.put(wtxn, &key, &seq_key)?;
                }
            }
        }
        *ckpt = Tip { seq, hash };
        for ev in job.audit {
            self.append_audit(wtxn, audit, ev, now)?;
        }
        Ok(Receipt {
            seq,
            hash,
            audit_seq: audit.seq,
            group: 0,
        })
    }

    fn apply_audit(
        &self,
        wtxn: &mut RwTxn<'_>,
        audit: &mut Tip,
        events: Vec<AuditEvent>,
        now: u64,
    ) -> Result<Receipt, Step> {
        for ev in &events {
            ev.validate().map_err(|e| Step::Reject(e.into()))?;
        }
        for ev in events {
            self.append_audit(wtxn, audit, ev, now)?;
        }
        Ok(Receipt {
            seq: 0,
            hash: audit.hash,
            audit_seq: audit.seq,
            group: 0,
        })
    }

    fn apply_nonce(
        &self,
        wtxn: &mut RwTxn<'_>,
        audit: &mut Tip,
        job: NonceJob,
        now: u64,
    ) -> Result<Receipt, Step> {
        let db = self.store.dbs.nonces;
        let mut expired = Vec::new();
        let mut live: u64 = 0;
        for item in db.iter(wtxn)? {
            let (k, v) = item?;
            let expires = v.get(..8).and_then(crate::store::read_u64).unwrap_or(0);
            if expires < job.prune_before_ns {
                expired.push(k.to_vec());
            } else {
                live = live.saturating_add(1);
            }
        }
        for k in expired {
            db.delete(wtxn, &k)?;
        }
        if db.get(wtxn, &job.nonce)?.is_some() {
            return Err(Step::Reject(CommitError::NonceReused {
                nonce: hex(&job.nonce),
            }));
        }
        if live >= MAX_LIVE_NONCES {
            return Err(Step::Reject(CommitError::TooManyNonces { live }));
        }
        for ev in &job.audit {
            ev.validate().map_err(|e| Step::Reject(e.into()))?;
        }
        let mut value = Vec::with_capacity(40);
        value.extend_from_slice(&job.expires_ns.to_be_bytes());
        value.extend_from_slice(&job.body_hash);
        db.put(wtxn, &job.nonce, &value)?;
        self.apply_audit(wtxn, audit, job.audit, now)
    }

    fn apply_rotation(
        &self,
        wtxn: &mut RwTxn<'_>,
        audit: &mut Tip,
        incoming: &mut Option<SigningKey>,
        events: Vec<AuditEvent>,
        now: u64,
    ) -> Result<Receipt, Step> {
        if incoming.is_some() {
            return Err(Step::Reject(CommitError::KeyRotation {
                reason: "another rotation is already in this group commit".into(),
            }));
        }
        for ev in &events {
            ev.validate().map_err(|e| Step::Reject(e.into()))?;
        }
        let next = self.keys.generate_next(&self.store.dir).map_err(|e| {
            Step::Reject(CommitError::KeyRotation {
                reason: e.to_string(),
            })
        })?;
        let rotated = AuditEvent::new("key.rotated", crate::Severity::Notice)
            .field("old_key", hex(&self.key.public_key()))
            .field("new_key", hex(&next.public_key()))
            .field("group", self.group.saturating_add(1));
        let receipt = self.apply_audit(
            wtxn,
            audit,
            std::iter::once(rotated).chain(events).collect(),
            now,
        )?;
        *incoming = Some(next);
        Ok(receipt)
    }

    fn append_audit(
        &self,
        wtxn: &mut RwTxn<'_>,
        tip: &mut Tip,
        event: AuditEvent,
        now: u64,
    ) -> Result<(), heed::Error> {
        let seq = tip.seq.saturating_add(1);
        let rec = AuditRecord {
            seq,
            prev_hash: tip.hash,
            time_ns: now,
            event,
        };
        let enc = rec.encode();
        let hash = chain_hash(&tip.hash, &enc);
        self.store.dbs.audit.put(wtxn, &u64_key(seq), &enc)?;
        *tip = Tip { seq, hash };
        Ok(())
    }
}
