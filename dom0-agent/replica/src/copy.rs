//! The standby's copy with its journal: how a received group becomes durable (checked,
//! staged, journaled with one `fdatasync`, then acknowledged), how tentative groups are
//! confirmed, replaced or abandoned, when confirmed groups are written to LMDB behind the
//! journal (many per LMDB commit), and how the journal is replayed at start and by
//! `dom0-agent promote` (docs/failover.md, "The standby's journal").
//!
//! Between the channel (`standby`) and the two stores it keeps in step
//! ([`mayfly_ledger::Replica`]'s staging and [`crate::journal`]).

use std::path::Path;
use std::time::{Duration, Instant};

use mayfly_ledger::{ApplyError, AuditEvent, GroupRecords, Replica, Severity, SignedHead, Staging};

use crate::journal::{Damage, Entry, Journal, JournalError};

/// Confirmed groups staged that force an LMDB commit.
pub const FLUSH_GROUPS: u64 = 256;
/// Bytes of confirmed groups staged that force an LMDB commit.
pub const FLUSH_BYTES: u64 = 16 << 20;
/// Longest a confirmed group waits for its LMDB commit (the journal holds it meanwhile),
/// when no tentative group is staged.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Longest a confirmed group waits for its LMDB commit however steadily tentative groups
/// keep coming (the journal is then rewritten to the tentative one).
pub const FLUSH_TENTATIVE_AFTER: Duration = Duration::from_millis(500);

/// Why a group could not be made durable, or the copy could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The chain refused the group (or LMDB failed while checking or committing).
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The journal could not be written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A group in the journal does not follow the copy's chain (another chain, a fork,
    /// an untrusted key): the standby stops, and the journal is kept as it is for the
    /// operator (it may hold acknowledged groups the copy cannot yet take).
    #[error("the journal's group {group} (at byte {offset}) is refused: {source}; the journal is kept unchanged")]
    Refused {
        /// The group.
        group: u64,
        /// Where its record starts in the journal.
        offset: u64,
        /// Why the chain refused it.
        source: ApplyError,
    },
    /// A group could not be journaled (disk full, I/O error): it is neither kept nor
    /// acknowledged.
    #[error("storing group {group}: {source}")]
    Store {
        /// The group.
        group: u64,
        /// The journal's error.
        source: JournalError,
    },
}

/// What receiving a group did: the group to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The group now durable here (journaled or in LMDB).
    pub ack: u64,
}

/// What replaying the journal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Journal records read.
    pub records: u64,
    /// Groups committed to LMDB from it (confirmed ones; with a promotion, all).
    pub applied: u64,
    /// The tentative group left staged (resolved by the primary), if any.
    pub tentative: Option<u64>,
    /// With a promotion: the tentative group applied.
    pub tentative_applied: Option<u64>,
}

/// The copy and its journal, as the standby's connection drives them.
pub struct JournaledCopy {
    journal: Journal,
    last_flush: Instant,
    /// A tentative group staged before this connection: only a group frame at its number
    /// resolves it (a confirm or abandon on this connection is about the groups sent on it).
    carried: Option<u64>,
}

impl JournaledCopy {
    /// Opens the journal in `dir` and replays it into `replica` (every record checked
    /// again), committing the confirmed groups to LMDB; the tentative tail stays staged.
    /// A torn or damaged tail is cut off and audited through `audit`; a whole group the
    /// chain refuses stops it ([`CopyError::Refused`]) with the journal kept.
    pub fn open(
        replica: &mut Replica,
        dir: &Path,
        audit: &dyn Fn(AuditEvent),
    ) -> Result<(Self, Recovered), CopyError> {
        let (journal, recovered) = replay(replica, dir, false, audit)?;
        Ok((
            Self {
                journal,
                last_flush: Instant::now(),
                carried: None,
            },
            recovered,
        ))
    }

    /// A new connection: the tentative group staged now (if any) is carried over.
    pub fn connected(&mut self, replica: &Replica) {
        self.carried = replica.tentative();
    }

    /// Checks `records`, stages them, journals them (one `fdatasync`) and says what to
    /// acknowledge. Nothing is acknowledged that is not durable here.
    pub fn receive(
        &mut self,
        replica: &mut Replica,
        records: &GroupRecords,
        tentative: bool,
        audit: &dyn Fn(AuditEvent),
    ) -> Result<Received, CopyError> {
        let outcome = replica.stage(records, !tentative)?;
        let g = match &outcome {
            Staging::Staged(a) => a.group,
            Staging::Replaced { applied, .. } => applied.group,
            Staging::Confirmed { group } | Staging::Replayed { group } => *group,
        };
        if self.carried == Some(g) {
            self.carried = None;
        }
        match outcome {
            Staging::Replayed { .. } => Ok(Received { ack: g }),
            Staging::Confirmed { group } => {
                self.journal.append(&Entry::Confirm(group), false)?;
                Ok(Received { ack: group })
            }
            Staging::Staged(_) | Staging::Replaced { .. } => {
                if let Staging::Replaced { dropped_head, .. } = &outcome {
                    audit(
                        AuditEvent::new("replication.tentative_dropped", Severity::Warning)
                            .field("group", g)
                            .field("dropped_head_sha256", dropped_head)
                            .field(
                                "reason",
                                "the primary sent a different group at this number: its commit of the tentative one never became durable (no client was acknowledged for it)",
                            ),
                    );
                }
                let entry = Entry::Group {
                    records: records.clone(),
                    tentative,
                };
                if let Err(source) = self.journal.append(&entry, true) {
                    // Not durable: neither acknowledged nor kept.
                    replica.unstage_last();
                    return Err(CopyError::Store { group: g, source });
                }
                Ok(Received { ack: g })
            }
        }
    }

    /// The primary's commit is durable up to `group`: the tentative group(s) sent on this
    /// connection up to it are confirmed. A confirm about nothing staged, or about a group
    /// carried from before this connection, is ignored and audited.
    pub fn confirm(
        &mut self,
        replica: &mut Replica,
        group: u64,
        audit: &dyn Fn(AuditEvent),
    ) -> Result<(), CopyError> {
        let upto = match self.carried {
            Some(c) if c <= group => c.saturating_sub(1),
            _ => group,
        };
        let n = replica.confirm(upto);
        if n > 0 {
            self.journal.append(&Entry::Confirm(upto), false)?;
        }
        if n == 0 || upto != group {
            audit(
                AuditEvent::new("replication.frame_ignored", Severity::Warning)
                    .field("frame", "confirm")
                    .field("group", group)
                    .field("held_group", replica.staged_tip().group)
                    .field(
                        "reason",
                        if group > replica.staged_tip().group {
                            "a confirm for a group this standby does not hold"
                        } else if upto != group {
                            "a confirm covering a tentative group from before this connection (only a group frame at its number resolves it)"
                        } else {
                            "a confirm for groups already confirmed (replayed or out of order)"
                        },
                    ),
            );
        }
        Ok(())
    }

    /// The primary's commit of tentative `group` failed: drop it. An abandon for any other
    /// group (not held, not tentative, confirmed, or carried from before this connection)
    /// is ignored and audited.
    pub fn abandon(
        &mut self,
        replica: &mut Replica,
        group: u64,
        audit: &dyn Fn(AuditEvent),
    ) -> Result<(), CopyError> {
        if self.carried != Some(group) && replica.drop_tentative(group) {
            // Flushed: a group the primary abandoned must not come back at a replay (a
            // promotion would commit it, and its clients were told it failed).
            self.journal.append(&Entry::Abandon(group), true)?;
            audit(
                AuditEvent::new("replication.tentative_dropped", Severity::Warning)
                    .field("group", group)
                    .field(
                        "reason",
                        "the primary abandoned it: its own commit of it failed (no client was acknowledged for it)",
                    ),
            );
            return Ok(());
        }
        audit(
            AuditEvent::new("replication.frame_ignored", Severity::Warning)
                .field("frame", "abandon")
                .field("group", group)
                .field("held_group", replica.staged_tip().group)
                .field(
                    "reason",
                    "an abandon for a group that is not this connection's tentative group",
                ),
        );
        Ok(())
    }

    /// Writes the confirmed staged groups to LMDB (one commit) when enough of them wait,
    /// or they waited long enough, or `force`; then empties the journal, or, with a
    /// tentative group staged, rewrites it to hold only that group (it may be acknowledged
    /// and exist nowhere else here). So the journal and the staged groups stay bounded
    /// (about [`FLUSH_BYTES`] and a group) however steadily groups arrive. Returns the
    /// groups written.
    pub fn flush_due(&mut self, replica: &mut Replica, force: bool) -> Result<u64, CopyError> {
        let (n, bytes) = replica.staged_confirmed();
        if n == 0 {
            return Ok(0);
        }
        let waited = self.last_flush.elapsed();
        let due = n >= FLUSH_GROUPS || bytes >= FLUSH_BYTES || waited >= FLUSH_AFTER;
        // With a tentative group staged the journal can only be rewritten (two more
        // flushes), not cut: wait for a moment without one, unless that never comes.
        let overdue = bytes >= FLUSH_BYTES || waited >= FLUSH_TENTATIVE_AFTER;
        if !force && (!due || (replica.tentative().is_some() && !overdue)) {
            return Ok(0);
        }
        let written = replica.commit_staged(false)?;
        self.last_flush = Instant::now();
        self.compact(replica)?;
        Ok(written)
    }

    fn compact(&mut self, replica: &Replica) -> Result<(), CopyError> {
        compact(&mut self.journal, replica)
    }
}

/// Replays the journal in `dir` into `replica`: every group record is checked again and
/// staged (a refused one is audited and stops the replay, the journal kept), markers confirm
/// or drop, and the confirmed groups are committed to LMDB. With `promote`, the tentative
/// tail is committed too (`dom0-agent promote`: an acknowledged group may exist only
/// here) and the journal is emptied.
pub fn replay(
    replica: &mut Replica,
    dir: &Path,
    promote: bool,
    audit: &dyn Fn(AuditEvent),
) -> Result<(Journal, Recovered), CopyError> {
    let (mut journal, entries, damage) = Journal::open(dir)?;
    if let Some(d) = &damage {
        audit_damage(audit, &journal, d);
    }
    let mut rec = Recovered {
        records: u64::try_from(entries.len()).unwrap_or(u64::MAX),
        ..Recovered::default()
    };
    for (offset, entry) in entries {
        match entry {
            Entry::Group { records, tentative } => match replica.stage(&records, !tentative) {
                Ok(Staging::Replaced { dropped_head, .. }) => audit(
                    AuditEvent::new("replication.tentative_dropped", Severity::Warning)
                        .field("group", replica.staged_tip().group)
                        .field("dropped_head_sha256", dropped_head)
                        .field("reason", "the journal holds a later group at its number"),
                ),
                Ok(_) => {
                    // Bounded work per LMDB commit however long the journal is.
                    if replica.staged_confirmed().1 >= FLUSH_BYTES {
                        rec.applied = rec.applied.saturating_add(replica.commit_staged(false)?);
                    }
                }
                Err(e @ ApplyError::Storage { .. }) => return Err(e.into()),
                Err(e) => {
                    // Not cut: the records from here on may be acknowledged groups this
                    // copy cannot take yet (an untrusted promotion key, another data
                    // directory): the operator decides, with the file intact.
                    let group = SignedHead::decode(&records.head).map_or(0, |h| h.group);
                    audit(
                        AuditEvent::new("replication.journal_refused", Severity::Critical)
                            .field("path", journal.path().display())
                            .field("offset", offset)
                            .field("group", group)
                            .field("kept_bytes", journal.len().saturating_sub(offset))
                            .field(
                                "reason",
                                format!("a journaled group does not follow this copy's chain: {e}; the journal is kept unchanged and the standby stops"),
                            ),
                    );
                    return Err(CopyError::Refused {
                        group,
                        offset,
                        source: e,
                    });
                }
            },
            Entry::Confirm(g) => {
                replica.confirm(g);
            }
            Entry::Abandon(g) => {
                replica.drop_tentative(g);
            }
        }
    }
    rec.applied = rec.applied.saturating_add(replica.commit_staged(false)?);
    rec.tentative = replica.tentative();
    if promote {
        let t = replica.commit_staged(true)?;
        rec.applied = rec.applied.saturating_add(t);
        rec.tentative_applied = rec.tentative.take();
    }
    compact(&mut journal, replica)?;
    Ok((journal, rec))
}

/// With every confirmed group in LMDB: the journal emptied, or reduced to the tentative
/// group staged (durably: it may be acknowledged and exist nowhere else here).
fn compact(journal: &mut Journal, replica: &Replica) -> Result<(), CopyError> {
    if replica.staged_confirmed().0 != 0 {
        return Ok(());
    }
    match replica.tentative_records() {
        None => journal.cut()?,
        Some(records) => journal.rewrite(&[Entry::Group {
            records: records.clone(),
            tentative: true,
        }])?,
    }
    Ok(())
}

fn audit_damage(audit: &dyn Fn(AuditEvent), journal: &Journal, d: &Damage) {
    audit(
        AuditEvent::new("replication.journal_damaged", Severity::Warning)
            .field("path", journal.path().display())
            .field("offset", d.offset)
            .field("dropped_bytes", d.dropped_bytes)
            .field(
                "reason",
                format!(
                    "{}; the journal from there was dropped (a torn record was never acknowledged: the write a crash interrupted; a damaged one is disk corruption, and the groups from it on are asked from the primary again)",
                    d.reason
                ),
            ),
    );
}
