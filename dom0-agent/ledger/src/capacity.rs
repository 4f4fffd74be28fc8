//! How full the ledger is, how fast it fills, and whether it can take writes.
//!
//! The committer samples the space in use after its groups for the growth rate (at most
//! every [`SAMPLE_EVERY`], keeping [`SAMPLES`] samples: a 15-minute window), raises a
//! `ledger.capacity` audit event (the SIEM alert) when the share of the space in use
//! crosses 80 %, 90 % or 95 % upwards (checked after every group), and records when a group fails for lack of space
//! (disk full, or the map at its bound). While it does, [`crate::Ledger::begin`] refuses
//! transactions with [`crate::TxError::StorageFull`] (the API answers 503 with the reason)
//! and the committer looks for room every [`RETRY_EVERY`] (retrying the audit records it
//! holds); the outage ends once the ledger can grow by [`RESUME_LEFT`] again (a small
//! write may fit in pages LMDB freed inside the file while the disk is still full).
//!
//! Read-only transactions are refused too: their checkpoint is the record of what a client
//! was told (forensics, and the clients to notify when a rollback undoes what they read),
//! so none is answered unrecorded.
//!
//! A table above the store: uses [`crate::store`] and the audit record format; the
//! committer (`group.rs`, [`crate::commit`]) and [`crate::Ledger::capacity`] use it.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

/// Least time between two samples of the space in use.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept (with [`SAMPLE_EVERY`]: a 15-minute window for the rate).
pub const SAMPLES: usize = 90;
/// How often the committer retries writing (and looks for room) while storage is full.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Room (bytes the ledger can grow by) needed before a storage outage ends.
pub const RESUME_LEFT: u64 = 8 << 20;
/// Shares of the space in use (percent) that raise a `ledger.capacity` alert when crossed.
pub const THRESHOLDS: [(u8, crate::Severity); 3] = [
    (80, crate::Severity::Warning),
    (90, crate::Severity::Error),
    (95, crate::Severity::Critical),
];

/// What [`crate::Ledger::capacity`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// Bytes of the map in use (LMDB's last page, free pages inside included).
    pub used_bytes: u64,
    /// Current map size.
    pub map_bytes: u64,
    /// The bound the map may grow to.
    pub max_map_bytes: u64,
    /// Bytes free on the data directory's filesystem (for unprivileged users).
    pub fs_free_bytes: Option<u64>,
    /// Bytes the ledger can still grow by: the lesser of the bound's room and the
    /// filesystem's.
    pub left_bytes: u64,
    /// `used / (used + left)`, percent.
    pub used_percent: f64,
    /// Growth over the sampling window, bytes per hour (`None`: not enough samples yet).
    pub bytes_per_hour: Option<f64>,
    /// Projected time until `left_bytes` is used at that rate (`None`: no growth measured).
    pub seconds_to_full: Option<u64>,
    /// Why writes are refused (`None`: the ledger takes writes).
    pub refusing: Option<String>,
}

/// State shared between the committer and the ledger handles.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Since when (Unix ns) and why writes fail for lack of space.
    pub full: Option<(u64, String)>,
    /// (Unix ns, bytes used), oldest first.
    pub samples: VecDeque<(u64, u64)>,
    /// Index+1 of the highest threshold alerted (0: none).
    pub level: usize,
}

fn fs_free(dir: &Path) -> Option<u64> {
    // fsblkcnt_t and c_ulong are narrower than u64 on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    nix::sys::statvfs::statvfs(dir)
        .map(|s| u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
        .ok()
}

/// Computes the report for `store` with the committer's `shared` state.
pub(crate) fn report(store: &crate::Store, max_map: u64, shared: &Shared) -> Option<Capacity> {
    let (map, used) = store.map_usage().ok()?;
    let file_len = std::fs::metadata(store.dir().join(crate::store::DATA_FILE))
        .map(|m| m.len())
        .unwrap_or(used);
    let fs_free_bytes = fs_free(store.dir());
    let bound_left = max_map.max(map).saturating_sub(used);
    let fs_left = fs_free_bytes.map(|f| f.saturating_add(file_len.saturating_sub(used)));
    let left_bytes = fs_left.map_or(bound_left, |f| f.min(bound_left));
    let total = used.saturating_add(left_bytes);
    #[allow(clippy::cast_precision_loss)]
    let used_percent = if total == 0 {
        100.0
    } else {
        used as f64 * 100.0 / total as f64
    };
    let rate = match (shared.samples.front(), shared.samples.back()) {
        (Some(&(t0, u0)), Some(&(t1, u1))) if t1 > t0 => {
            #[allow(clippy::cast_precision_loss)]
            let per_ns = u1.saturating_sub(u0) as f64 / (t1 - t0) as f64;
            Some(per_ns * 3.6e12)
        }
        _ => None,
    };
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let seconds_to_full = rate
        .filter(|r| *r > 0.0)
        .map(|r| (left_bytes as f64 / r * 3600.0) as u64);
    Some(Capacity {
        used_bytes: used,
        map_bytes: map,
        max_map_bytes: max_map.max(map),
        fs_free_bytes,
        left_bytes,
        used_percent,
        bytes_per_hour: rate,
        seconds_to_full,
        refusing: shared.full.as_ref().map(|(_, r)| r.clone()),
    })
}

/// Records a sample for the rate (at most every [`SAMPLE_EVERY`]) and returns the alert
/// to raise if a threshold was crossed upwards.
pub(crate) fn sample(
    store: &crate::Store,
    max_map: u64,
    shared: &mut Shared,
    now_ns: u64,
) -> Option<crate::AuditEvent> {
    let every = u64::try_from(SAMPLE_EVERY.as_nanos()).unwrap_or(u64::MAX);
    let due = shared
        .samples
        .back()
        .is_none_or(|&(last, _)| now_ns.saturating_sub(last) >= every);
    if due {
        let (_, used) = store.map_usage().ok()?;
        shared.samples.push_back((now_ns, used));
        while shared.samples.len() > SAMPLES {
            shared.samples.pop_front();
        }
    }
    // The thresholds are checked after every group (a statvfs and a stat: microseconds).
    let cap = report(store, max_map, shared)?;
    let reached = THRESHOLDS
        .iter()
        .filter(|(pct, _)| cap.used_percent >= f64::from(*pct))
        .count();
    if reached <= shared.level {
        // Hysteresis: the level falls back once 5 points below its threshold.
        if let Some((pct, _)) = shared.level.checked_sub(1).and_then(|i| THRESHOLDS.get(i)) {
            if cap.used_percent < f64::from(*pct) - 5.0 {
                shared.level = reached;
            }
        }
        return None;
    }
    shared.level = reached;
    let (pct, severity) = *THRESHOLDS.get(reached.checked_sub(1)?)?;
    Some(
        crate::AuditEvent::new("ledger.capacity", severity)
            .field("threshold_percent", pct)
            .field("used_percent", format!("{:.1}", cap.used_percent))
            .field("used_bytes", cap.used_bytes)
            .field("left_bytes", cap.left_bytes)
            .field(
                "seconds_to_full",
                cap.seconds_to_full
                    .map_or_else(|| "unknown".to_string(), |s| s.to_string()),
            ),
    )
}
