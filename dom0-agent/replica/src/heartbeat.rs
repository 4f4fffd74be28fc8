//! The replication channel's heartbeat (formats.md §6.1, frame 0x07): how often each side
//! sends one, and how long a silence means the peer is lost. A leaf: the `[replication]`
//! settings (`config`) and both ends of the channel (`primary`, `standby`) use it.

use std::time::Duration;

/// Accepted `heartbeat_ms`.
pub const HEARTBEAT_MS: std::ops::RangeInclusive<u64> = 50..=60_000;
/// Default `heartbeat_ms`.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1_000;
/// Accepted `heartbeat_misses`.
pub const HEARTBEAT_MISSES: std::ops::RangeInclusive<u32> = 2..=100;
/// Default `heartbeat_misses`.
pub const DEFAULT_HEARTBEAT_MISSES: u32 = 5;

/// How often each side sends a heartbeat, and how much silence means the peer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Interval between two heartbeats a side sends.
    pub interval: Duration,
    /// Intervals without any frame from the peer after which it is lost.
    pub misses: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            misses: DEFAULT_HEARTBEAT_MISSES,
        }
    }
}

impl Heartbeat {
    /// Silence after which the peer is lost: `interval × misses`.
    pub fn lost_after(&self) -> Duration {
        self.interval.saturating_mul(self.misses)
    }
}
