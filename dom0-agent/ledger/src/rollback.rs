//! Rollback: undoing attack transactions and everything that depended on them, recorded as
//! a new link of the checkpoint chain (history is never rewritten).
//!
//! # What is undone
//! The **affected set** of attack transactions `R` is `R` plus every later commit that read
//! a version written by a member (transitively), from the `deps` index. For every key any
//! affected transaction wrote, the restored value is the after-image of the **latest writer
//! of that key that is not affected** (a blind write by an unaffected transaction, or an
//! earlier rollback, stands), or, if every writer is affected, the before-image of the
//! earliest one. Keys whose current writer is unaffected are left alone. All restored
//! values are written in one LMDB write transaction together with the rollback record:
//! concurrent transactions either commit before it (and are planned for) or see the
//! repaired state; one that read a key the rollback changes fails validation and retries.
//!
//! Without cascade, only `R` is undone, and the rollback is **refused** if any later commit
//! read what `R` wrote: undoing `R` alone would leave those commits' effects built on data
//! that no longer exists.
//!
//! The rollback record's format (checkpoint kind 0x02) and [`RollbackPlan`] are in
//! `record.rs`, re-exported here.
//!
//! Uses the store, the queries ([`crate::read`]), the `undone` index, the record formats
//! and, to apply a plan, the committer's queue ([`crate::Ledger::rollback`]).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::audit::{AuditEvent, Severity};
use crate::checkpoint::{WriteEntry, KIND_TRANSACTION};
use crate::codec::DecodeError;
use crate::job::{Job, Receipt, RollbackJob};
use crate::ledger::{self, Ledger};
use crate::read::ReadError;
use crate::store::{read_u64, u64_key, Store};
use crate::types::{Hash, TxId};
use crate::value::decode_value;

pub use crate::record::{
    Record, RollbackPlan, RollbackRecord, KIND_ROLLBACK, MAX_AFFECTED, MAX_REASON,
    MAX_ROLLBACK_BYTES, MAX_ROOTS,
};

/// Why a rollback cannot be planned or applied.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// No roots, or too many.
    #[error("a rollback names 1..={MAX_ROOTS} transactions, not {0}")]
    BadRoots(usize),
    /// A root is not a committed transaction.
    #[error("commit {seq} is not a committed transaction ({what})")]
    NotATransaction {
        /// The sequence given.
        seq: u64,
        /// What it is instead.
        what: &'static str,
    },
    /// Without cascade, later commits read what the roots wrote.
    #[error("{count} later commits read what the rolled-back transactions wrote (first: {first:?}); roll back with cascade, or not at all")]
    DependentsExist {
        /// How many.
        count: usize,
        /// The first few.
        first: Vec<u64>,
    },
    /// Everything the roots wrote is already superseded or restored.
    #[error("nothing to undo: every key the transactions wrote has already been restored or overwritten")]
    NothingToUndo,
    /// A key's last writer is a rollback record: what was there is already restored.
    #[error("nothing to undo: the key was last written by rollback record {by}")]
    KeyRestored {
        /// The rollback record.
        by: u64,
    },
    /// Every root was already undone by an earlier rollback.
    #[error("nothing to undo: commit {seq} was already rolled back by record {by}")]
    AlreadyRolledBack {
        /// The (first) root.
        seq: u64,
        /// The rollback record that undid it.
        by: u64,
    },
    /// The rollback is too large for one record.
    #[error("rollback of {affected} commits over {keys} keys exceeds the limits of one record")]
    TooLarge {
        /// Affected commits.
        affected: usize,
        /// Keys to restore.
        keys: usize,
    },
    /// Commits kept changing what the plan covers; gave up after several tries.
    #[error("the ledger kept changing under the rollback; tried {attempts} times")]
    Contended {
        /// Attempts made.
        attempts: u32,
    },
    /// Reading the ledger failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Committing the rollback failed.
    #[error("committing the rollback: {0}")]
    Commit(#[from] crate::commit_error::CommitError),
}

impl From<heed::Error> for RollbackError {
    fn from(e: heed::Error) -> Self {
        Self::Read(ReadError::Storage(e))
    }
}

fn corrupt(seq: u64, source: DecodeError) -> RollbackError {
    RollbackError::Read(ReadError::Corrupt {
        what: "checkpoint",
        at: seq.to_string(),
        source,
    })
}

impl Store {
    /// Any record of the checkpoint chain.
    pub fn record(&self, seq: u64) -> Result<Option<Record>, ReadError> {
        let rtxn = self.read_txn()?;
        let Some(bytes) = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))? else {
            return Ok(None);
        };
        Record::decode(bytes)
            .map(Some)
            .map_err(|source| ReadError::Corrupt {
                what: "checkpoint",
                at: seq.to_string(),
                source,
            })
    }

    /// Plans the rollback of `roots` (commit sequences) without changing anything.
    pub fn plan_rollback(
        &self,
        roots: &[u64],
        cascade: bool,
    ) -> Result<RollbackPlan, RollbackError> {
        let roots: Vec<u64> = roots
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if roots.is_empty() || roots.len() > MAX_ROOTS {
            return Err(RollbackError::BadRoots(roots.len()));
        }
        let rtxn = self.read_txn()?;
        let tip = self
            .dbs
            .checkpoints
            .last(&rtxn)?
            .and_then(|(k, _)| read_u64(k))
            .unwrap_or(0);
        // Roots an earlier rollback undid have nothing left to undo; if that is all of
        // them, say so (whatever read them since, they are no dependents any more).
        let mut live_roots = Vec::with_capacity(roots.len());
        let mut first_undone = None;
        for &seq in &roots {
            match self.undone_by_in(&rtxn, seq)? {
                Some(by) => {
                    first_undone.get_or_insert((seq, by));
                }
                None => live_roots.push(seq),
            }
        }
        if let (true, Some((seq, by))) = (live_roots.is_empty(), first_undone) {
            return Err(RollbackError::AlreadyRolledBack { seq, by });
        }
        let roots = live_roots;
        let mut records: BTreeMap<u64, Record> = BTreeMap::new();
        for &seq in &roots {
            let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))?.ok_or(
                RollbackError::NotATransaction {
                    seq,
                    what: "no such commit",
                },
            )?;
            match bytes.get(5) {
                Some(&KIND_TRANSACTION) => {}
                _ => {
                    return Err(RollbackError::NotATransaction {
                        seq,
                        what: "a rollback record",
                    })
                }
            }
            records.insert(seq, Record::decode(bytes).map_err(|e| corrupt(seq, e))?);
        }

        // The affected set: one forward pass over `deps` from the first root.
        let mut affected: BTreeSet<u64> = roots.iter().copied().collect();
        let first = roots.first().copied().unwrap_or(0);
        let start = u64_key(first.saturating_add(1));
        let range = (Bound::Included(&start[..]), Bound::Unbounded);
        let mut dependents = Vec::new();
        for item in self.dbs.deps.range(&rtxn, &range)? {
            let (k, v) = item?;
            let Some(reader) = read_u64(k) else { continue };
            if affected.contains(&reader) {
                continue;
            }
            if v.chunks_exact(8)
                .filter_map(read_u64)
                .any(|w| affected.contains(&w))
            {
                // A reader an earlier rollback undid is no dependent: its effects are gone.
                if self.undone_by_in(&rtxn, reader)?.is_some() {
                    continue;
                }
                dependents.push(reader);
                if cascade {
                    affected.insert(reader);
                }
            }
        }
        if !cascade && !dependents.is_empty() {
            return Err(RollbackError::DependentsExist {
                count: dependents.len(),
                first: dependents.iter().copied().take(10).collect(),
            });
        }
        if affected.len() > MAX_AFFECTED {
            return Err(RollbackError::TooLarge {
                affected: affected.len(),
                keys: 0,
            });
        }

        // Every key an affected transaction wrote.
        let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        for &seq in &affected {
            if let std::collections::btree_map::Entry::Vacant(slot) = records.entry(seq) {
                let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))?.ok_or(
                    RollbackError::NotATransaction {
                        seq,
                        what: "missing from the chain",
                    },
                )?;
                slot.insert(Record::decode(bytes).map_err(|e| corrupt(seq, e))?);
            }
            if let Some(rec) = records.get(&seq) {
                keys.extend(rec.writes().iter().map(|w| w.key.clone()));
            }
        }
        if keys.len() > MAX_AFFECTED {
            return Err(RollbackError::TooLarge {
                affected: affected.len(),
                keys: keys.len(),
            });
        }

        // For each key: walk its writers back from the current version to the latest
        // unaffected one.
        let mut writes = Vec::new();
        for key in keys {
            let (current_version, current) = match self.dbs.data.get(&rtxn, &key)? {
                None => (0, None),
                Some(bytes) => {
                    let s = decode_value(bytes).ok_or_else(|| {
                        RollbackError::Read(ReadError::Corrupt {
                            what: "data value",
                            at: crate::codec::hex(&key),
                            source: DecodeError::NotCanonical {
                                field: "data value",
                                reason: "bad tag or length",
                            },
                        })
                    })?;
                    (s.version, s.value.map(<[u8]>::to_vec))
                }
            };
            if !affected.contains(&current_version) {
                continue; // its current writer stands
            }
            let mut version = current_version;
            let restored = loop {
                if version == 0 {
                    break None;
                }
                if !affected.contains(&version) {
                    // The latest unaffected writer: its after-image stands.
                    let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(version))?.ok_or(
                        RollbackError::NotATransaction {
                            seq: version,
                            what: "missing from the chain",
                        },
                    )?;
                    let rec = Record::decode(bytes).map_err(|e| corrupt(version, e))?;
                    break rec
                        .writes()
                        .iter()
                        .find(|w| w.key == key)
                        .and_then(|w| w.after.clone());
                }
                let rec = match records.get(&version) {
                    Some(r) => r.clone(),
                    None => {
                        let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(version))?.ok_or(
                            RollbackError::NotATransaction {
                                seq: version,
                                what: "missing from the chain",
                            },
                        )?;
                        Record::decode(bytes).map_err(|e| corrupt(version, e))?
                    }
                };
                let entry = rec.writes().iter().find(|w| w.key == key).cloned();
                match entry {
                    Some(w) if w.before_version < version => {
                        if w.before_version == 0 {
                            break w.before;
                        }
                        version = w.before_version;
                    }
                    // A writer that does not list the key, or a link that does not point
                    // back in time: the chain is damaged.
                    _ => {
                        return Err(corrupt(
                            version,
                            DecodeError::NotCanonical {
                                field: "write set",
                                reason: "broken writer chain",
                            },
                        ))
                    }
                }
            };
            writes.push(WriteEntry {
                key,
                before_version: current_version,
                before: current,
                after: restored,
            });
        }
        if writes.is_empty() {
            return Err(RollbackError::NothingToUndo);
        }
        let replay = affected
            .iter()
            .copied()
            .filter(|s| roots.binary_search(s).is_err())
            .collect();
        Ok(RollbackPlan {
            roots,
            affected: affected.into_iter().collect(),
            replay,
            writes,
            tip,
        })
    }
}

/// Up to `max` sequences as a comma-separated list, for an audit field.
fn join_seqs(seqs: &[u64], max: usize) -> String {
    let mut s: Vec<String> = seqs.iter().take(max).map(ToString::to_string).collect();
    if seqs.len() > max {
        s.push(format!("... ({} in all)", seqs.len()));
    }
    s.join(",")
}

impl Ledger {
    /// Rolls back the commits `roots` (and, with `cascade`, every later commit that read what
    /// they wrote, transitively) in one atomic, signed record appended to the checkpoint
    /// chain, with a `rollback.applied` audit record. Re-plans when concurrent commits
    /// change what the plan covers. Returns the plan applied and its receipt.
    /// `policy_hash` is the bundle whose decision the rollback carries out; 32 zero bytes
    /// for a manual (admin console) rollback (formats.md §1.6).
    pub fn rollback(
        &self,
        roots: &[u64],
        cascade: bool,
        reason: &str,
        policy_hash: Hash,
    ) -> Result<(RollbackPlan, Receipt), RollbackError> {
        const ATTEMPTS: u32 = 16;
        let reason: String = reason.chars().take(MAX_REASON / 4).collect();
        for _ in 0..ATTEMPTS {
            let plan = self.store().plan_rollback(roots, cascade)?;
            let rollback_id = TxId::generate();
            let event = AuditEvent::new("rollback.applied", Severity::Notice)
                .field("rollback_id", rollback_id)
                .field("roots", join_seqs(&plan.roots, 64))
                .field("affected", plan.affected.len())
                .field("restored_keys", plan.writes.len())
                .field("cascade", cascade)
                .field("reason", &reason);
            let job = RollbackJob {
                plan: plan.clone(),
                rollback_id,
                reason: reason.clone(),
                policy_hash,
                audit: vec![event],
            };
            match ledger::submit(&self.inner, Job::Rollback(Box::new(job)))?.wait() {
                Ok(receipt) => return Ok((plan, receipt)),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RollbackError::Contended { attempts: ATTEMPTS })
    }
}
