//! Groups a standby has checked but not yet committed to its LMDB: the *staged* groups
//! of synchronous replication with a journal (docs/failover.md, "The standby's journal").
//!
//! [`Replica::stage`] runs every check of [`Replica::apply`] (signature, order, epoch,
//! links, tips, before-versions, live-state digest) on top of the groups already staged,
//! inside an LMDB write transaction it then **aborts**: nothing reaches LMDB, and the
//! standby's caller makes the group durable elsewhere (its journal, one `fdatasync`)
//! before it acknowledges it. A staged group is **tentative** when the primary shipped it
//! before its own commit, and **confirmed** once the primary says that commit is durable
//! (or for a group shipped after it). [`Replica::commit_staged`] writes the confirmed
//! groups to LMDB in ONE write transaction (one commit for many groups), checking each
//! again on the way (the same checks, now against LMDB's own view, but the signature: it
//! was verified on the same bytes, held in memory since, when the group was staged).
//!
//! Only the last staged group may be tentative: a primary builds group `g + 1` only once
//! its commit of `g` is durable, so a group staged behind a tentative one confirms it. A
//! tentative group replaced by a different group at the same number is dropped
//! ([`Staging::Replaced`]: the primary's commit of it never became durable); a different
//! group at a number held confirmed is a fork.
//!
//! Why the checks run in a write transaction that is aborted rather than one kept open
//! until the group is confirmed: LMDB has one writer per environment, and a transaction
//! kept open across frames would have to live beside the environment it borrows; the
//! checks' writes are cheap next to the flushes they replace, and the batched commit runs
//! them again against LMDB itself, so nothing is committed on the strength of an overlay
//! alone.
//!
//! The engine layer, a part of `replication` (whose checks it reuses).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::{Applied, ApplyError, Base, GroupRecords, Held, Overlay, Replica};
use crate::codec::hex;
use crate::head::SignedHead;
use crate::state::StateDigest;

/// A group checked on top of the ones before it, held in memory until committed.
#[derive(Debug)]
pub(crate) struct Staged {
    pub records: GroupRecords,
    pub tentative: bool,
    /// The tips and key after it.
    pub held: Held,
    /// The live state after it.
    pub state: StateDigest,
    /// What it wrote.
    pub writes: Overlay,
    /// Its size in bytes (head and records).
    pub bytes: u64,
}

/// What [`Replica::stage`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staging {
    /// Checked and staged.
    Staged(Applied),
    /// The same group is already held (in LMDB or staged): a replay, harmless.
    Replayed {
        /// Group.
        group: u64,
    },
    /// The same group was staged tentative and is now confirmed (it arrived as durable).
    Confirmed {
        /// Group.
        group: u64,
    },
    /// A tentative group at this number held other bytes: it was dropped, and this one
    /// checked and staged instead.
    Replaced {
        /// What staging the new group did.
        applied: Applied,
        /// SHA-256 of the dropped group's head.
        dropped_head: String,
    },
}

impl Replica {
    /// The tips after every staged group (what the next group must follow); [`Replica::held`]
    /// without staged groups.
    pub fn staged_tip(&self) -> &Held {
        self.staged.last().map_or(&self.held, |s| &s.held)
    }

    /// The last group known durable on the primary: the last confirmed staged group, or
    /// the last group in LMDB.
    pub fn confirmed_group(&self) -> u64 {
        self.staged
            .iter()
            .rev()
            .find(|s| !s.tentative)
            .map_or(self.held.group, |s| s.held.group)
    }

    /// The tentative group staged, if any (always the last one).
    pub fn tentative(&self) -> Option<u64> {
        self.staged
            .last()
            .filter(|s| s.tentative)
            .map(|s| s.held.group)
    }

    /// The records of the tentative group staged, if any: what the standby's journal must
    /// keep once everything before it is in LMDB.
    pub fn tentative_records(&self) -> Option<&GroupRecords> {
        self.staged
            .last()
            .filter(|s| s.tentative)
            .map(|s| &s.records)
    }

    /// Confirmed groups staged and their bytes: what [`Replica::commit_staged`] would write.
    pub fn staged_confirmed(&self) -> (u64, u64) {
        self.staged
            .iter()
            .filter(|s| !s.tentative)
            .fold((0u64, 0u64), |(n, b), s| {
                (n.saturating_add(1), b.saturating_add(s.bytes))
            })
    }

    /// Checks `group` on top of the staged groups (every check of [`Replica::apply`]) and
    /// stages it, tentative unless `confirmed`. Nothing is written to LMDB. A group after a
    /// tentative one confirms it. Errors as [`Replica::apply`]'s; a different group at a
    /// number held confirmed (staged or in LMDB) is a fork.
    pub fn stage(&mut self, group: &GroupRecords, confirmed: bool) -> Result<Staging, ApplyError> {
        let head = SignedHead::decode(&group.head).map_err(|e| ApplyError::BadHead {
            reason: e.to_string(),
        })?;
        let g = head.group;
        match self.stage_inner(group, confirmed, g) {
            Err(ApplyError::Replayed { group }) => Ok(Staging::Replayed { group }),
            other => other,
        }
    }

    fn stage_inner(
        &mut self,
        group: &GroupRecords,
        confirmed: bool,
        g: u64,
    ) -> Result<Staging, ApplyError> {
        let mut dropped_head = None;
        if let Some(i) = self.staged.iter().position(|s| s.held.group == g) {
            let last = self.staged.len().saturating_sub(1);
            let (same, tentative) = match self.staged.get(i) {
                Some(s) => (s.records.head == group.head, s.tentative),
                None => return Err(ApplyError::Replayed { group: g }),
            };
            if same {
                if tentative && confirmed {
                    self.confirm(g);
                    return Ok(Staging::Confirmed { group: g });
                }
                return Ok(Staging::Replayed { group: g });
            }
            if !tentative || i != last {
                return Err(ApplyError::Fork {
                    chain: "group",
                    seq: g,
                    detail: format!(
                        "the primary's head of group {g} differs from the confirmed one this standby staged ({} vs {})",
                        hex(&crate::checkpoint::sha256(&group.head)),
                        hex(&crate::checkpoint::sha256(
                            self.staged.get(i).map_or(&[][..], |s| &s.records.head)
                        ))
                    ),
                });
            }
            // Checked first against the groups before it; only then is the tentative
            // one dropped.
            let kept = self.staged.len().saturating_sub(1);
            let outcome = self.check_on(group, kept)?;
            let old = self.staged.pop();
            self.rebuild_overlay();
            dropped_head = old.map(|o| hex(&crate::checkpoint::sha256(&o.records.head)));
            return Ok(self.push(group, outcome, confirmed, dropped_head));
        }
        // A group after the staged ones: the one before it is durable on the primary.
        if let Some(last) = self.staged.last_mut() {
            if g > last.held.group {
                last.tentative = false;
            }
        }
        let outcome = self.check_on(group, self.staged.len())?;
        Ok(self.push(group, outcome, confirmed, dropped_head.take()))
    }

    fn push(
        &mut self,
        group: &GroupRecords,
        outcome: crate::replication::Outcome,
        confirmed: bool,
        dropped_head: Option<String>,
    ) -> Staging {
        for (k, v) in &outcome.writes.data {
            self.overlay.data.insert(k.clone(), v.clone());
        }
        self.overlay
            .tx_ids
            .extend(outcome.writes.tx_ids.iter().copied());
        let bytes = group
            .checkpoints
            .iter()
            .chain(&group.audit)
            .fold(group.head.len(), |n, r| n.saturating_add(r.len()));
        let applied = outcome.applied;
        self.staged.push(Staged {
            records: group.clone(),
            tentative: !confirmed,
            held: outcome.held,
            state: outcome.state,
            writes: outcome.writes,
            bytes: u64::try_from(bytes).unwrap_or(u64::MAX),
        });
        match dropped_head {
            Some(dropped_head) => Staging::Replaced {
                applied,
                dropped_head,
            },
            None => Staging::Staged(applied),
        }
    }

    /// Checks `group` on top of LMDB and the first `n` staged groups, in a write
    /// transaction that is aborted.
    fn check_on(
        &self,
        group: &GroupRecords,
        n: usize,
    ) -> Result<crate::replication::Outcome, ApplyError> {
        let g = SignedHead::decode(&group.head).map_or(0, |h| h.group);
        let before = self.staged.get(..n).unwrap_or(&[]);
        let overlay = if before.len() == self.staged.len() {
            None
        } else {
            Some(overlay_of(before))
        };
        let (held, state, prev_head) = match before.last() {
            Some(s) => (&s.held, &s.state, Some(s.records.head.as_slice())),
            None => (&self.held, &self.state, None),
        };
        let env = self.store.env.clone();
        let mut wtxn = env
            .write_txn()
            .map_err(|source| ApplyError::Storage { group: g, source })?;
        let base = Base {
            held,
            state,
            overlay: Some(overlay.as_ref().unwrap_or(&self.overlay)),
            prev_head,
            signature_verified: false,
        };
        let outcome = self.apply_in(&mut wtxn, group, &base);
        wtxn.abort();
        outcome
    }

    /// Marks every staged group up to `group` confirmed (durable on the primary). Returns
    /// how many were tentative.
    pub fn confirm(&mut self, group: u64) -> u64 {
        let mut n = 0u64;
        for s in self.staged.iter_mut().filter(|s| s.held.group <= group) {
            if s.tentative {
                s.tentative = false;
                n = n.saturating_add(1);
            }
        }
        n
    }

    /// Drops the staged tentative group `group` (the primary's commit of it failed).
    /// Returns whether it was there: only the last staged group, and only if tentative.
    pub fn drop_tentative(&mut self, group: u64) -> bool {
        if self.tentative() != Some(group) {
            return false;
        }
        self.staged.pop();
        self.rebuild_overlay();
        true
    }

    /// Drops the last staged group, whatever it is (it could not be made durable where
    /// the caller keeps staged groups, so it must not be acknowledged or committed).
    pub fn unstage_last(&mut self) {
        self.staged.pop();
        self.rebuild_overlay();
    }

    /// Commits the confirmed staged groups (and with `with_tentative`, the tentative one
    /// too: a promotion) to LMDB in one write transaction, each checked again against
    /// LMDB (all but its signature, verified on the same bytes when it was staged). Returns the groups committed. On an error nothing is committed and every
    /// group stays staged.
    pub fn commit_staged(&mut self, with_tentative: bool) -> Result<u64, ApplyError> {
        let n = self
            .staged
            .iter()
            .take_while(|s| with_tentative || !s.tentative)
            .count();
        let Some(last) = n.checked_sub(1).and_then(|i| self.staged.get(i)) else {
            return Ok(0);
        };
        let g = last.held.group;
        let storage = |source| ApplyError::Storage { group: g, source };
        let env = self.store.env.clone();
        let mut wtxn = env.write_txn().map_err(storage)?;
        let mut held = self.held.clone();
        let mut state = self.state.clone();
        let mut prev_head: Option<&[u8]> = None;
        for s in self.staged.get(..n).unwrap_or(&[]) {
            let out = self.apply_in(
                &mut wtxn,
                &s.records,
                &Base {
                    held: &held,
                    state: &state,
                    overlay: None,
                    prev_head,
                    signature_verified: true,
                },
            )?;
            held = out.held;
            state = out.state;
            prev_head = Some(&s.records.head);
        }
        wtxn.commit().map_err(storage)?;
        self.held = held;
        self.state = state;
        self.staged.drain(..n);
        self.rebuild_overlay();
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn rebuild_overlay(&mut self) {
        self.overlay = overlay_of(&self.staged);
    }
}

/// The writes of `staged`, newest last.
fn overlay_of(staged: &[Staged]) -> Overlay {
    let mut o = Overlay::default();
    for s in staged {
        for (k, v) in &s.writes.data {
            o.data.insert(k.clone(), v.clone());
        }
        o.tx_ids.extend(s.writes.tx_ids.iter().copied());
    }
    o
}
