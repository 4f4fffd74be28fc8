//! The server's shared state ([`Shared`]): the executor and incident service, the
//! admission counters, the bounded idempotency/outcome memory, the blocking-pool permits,
//! the metrics and TLS; and [`audit_refusal`], how a refused request is audited without
//! making anyone wait. Used by the routes, the network edge and the server.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mayfly_executor::Executor;
use mayfly_incident::Incidents;
use mayfly_ledger::TxId;
use serde_json::Value;
use slog::Logger;

use crate::config::ApiConfig;
use crate::{metrics, tls};

/// Blocking threads for valid detector reports ([`Shared::reports`]).
pub(crate) const REPORT_BLOCKING: usize = 2;
/// Blocking threads for the audit records of refused requests (rejected reports, admission
/// 503s: [`Shared::refusal_writers`]); when all are busy a refusal is counted in memory only.
pub(crate) const REFUSAL_BLOCKING: usize = 2;
/// Blocking threads for ledger reads (`GET /v1/transactions/{id}`, `/v1/health`,
/// `/metrics`: [`Shared::reads`]); when all are busy the read is answered 503 at once.
pub(crate) const READ_BLOCKING: usize = 4;
/// Blocking threads beyond `max_in_flight`.
pub(crate) const AUX_BLOCKING: usize = REPORT_BLOCKING + REFUSAL_BLOCKING + READ_BLOCKING;
pub(crate) enum Remembered {
    InProgress {
        digest: Vec<u8>,
    },
    Done {
        digest: Vec<u8>,
        code: u16,
        body: Value,
    },
}

/// An idempotency key as remembered: the client's identity and the key it sent, so one
/// client can neither read nor squat another's keys.
pub(crate) type KeyOf = (String, String);

/// Bounded FIFO memory of recent transactions.
pub(crate) struct Memory {
    pub(crate) by_key: HashMap<KeyOf, Remembered>,
    pub(crate) key_order: VecDeque<KeyOf>,
    pub(crate) outcomes: HashMap<TxId, Value>,
    pub(crate) outcome_order: VecDeque<TxId>,
    pub(crate) cap: usize,
}

impl Memory {
    pub(crate) fn remember_outcome(&mut self, id: TxId, body: Value) {
        if self.outcomes.insert(id, body).is_none() {
            self.outcome_order.push_back(id);
            while self.outcome_order.len() > self.cap {
                if let Some(old) = self.outcome_order.pop_front() {
                    self.outcomes.remove(&old);
                }
            }
        }
    }
    pub(crate) fn remember_key(&mut self, key: KeyOf, value: Remembered) {
        if self.by_key.insert(key.clone(), value).is_none() {
            self.key_order.push_back(key);
            while self.key_order.len() > self.cap {
                if let Some(old) = self.key_order.pop_front() {
                    self.by_key.remove(&old);
                }
            }
        }
    }
}

/// A rate limit on a log line a client can trigger: at most [`LogLimit::PER_SECOND`] lines
/// a second; the lines dropped are counted into the next one that is written.
pub(crate) struct LogLimit {
    pub(crate) state: Mutex<(Instant, u32, u64)>,
}

impl LogLimit {
    pub(crate) const PER_SECOND: u32 = 5;

    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(lines dropped since the last one written)` if this line may be written now.
    pub(crate) fn allow(&self, now: Instant) -> Option<u64> {
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        let (window, written, dropped) = &mut *state;
        if now.saturating_duration_since(*window) >= Duration::from_secs(1) {
            *window = now;
            *written = 0;
        }
        if *written >= Self::PER_SECOND {
            *dropped = dropped.saturating_add(1);
            return None;
        }
        *written += 1;
        Some(std::mem::take(dropped))
    }
}

pub(crate) struct Shared {
    pub(crate) executor: Arc<Executor>,
    /// Reports and the checkpoint view.
    pub(crate) incidents: Arc<Incidents>,
    /// Rate limit of the per-request "refusing a transaction" warning.
    pub(crate) refusal_log: LogLimit,
    pub(crate) config: ApiConfig,
    pub(crate) in_flight: AtomicUsize,
    /// Transactions admitted per client; an entry is removed when it reaches 0, so the map
    /// holds at most `max_in_flight` entries.
    pub(crate) per_client: Mutex<HashMap<Arc<str>, usize>>,
    /// Permits for valid detector reports on the blocking pool (awaited: authenticated).
    pub(crate) reports: Arc<tokio::sync::Semaphore>,
    /// Permits for the durable audit records of refusals (never awaited: a refused client
    /// must not make others wait).
    pub(crate) refusal_writers: Arc<tokio::sync::Semaphore>,
    /// Permits for ledger reads on the blocking pool (never awaited: 503 when none is free).
    pub(crate) reads: Arc<tokio::sync::Semaphore>,
    pub(crate) memory: Mutex<Memory>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) tls: Option<tls::Current>,
    pub(crate) log: Logger,
}

/// A transaction's place among those admitted; released on drop.
pub(crate) struct Admission {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client: Arc<str>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Ok(mut map) = self.shared.per_client.lock() {
            if let Some(n) = map.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.client);
                }
            }
        }
    }
}

/// Why a transaction was not admitted.
pub(crate) enum Refusal {
    InFlight(usize),
    PerClient(usize),
    /// The client is penalised (the policy's `[engine] penalty_after`): it holds `held`
    /// transactions, its share is `share` for `left` more.
    Penalty {
        held: usize,
        share: usize,
        left: Duration,
    },
}

impl Shared {
    pub(crate) fn admit(self: &Arc<Self>, client: &Arc<str>) -> Result<Admission, Refusal> {
        let running = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if running >= self.config.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::InFlight(running));
        }
        let Ok(mut map) = self.per_client.lock() else {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::InFlight(running));
        };
        // A penalised client's share (asked before the entry is made: a refused client
        // leaves no entry behind).
        let penalty = self.executor.penalty_share(client);
        let n = map.entry(client.clone()).or_insert(0);
        let refusal = match penalty {
            Some((share, left)) if *n >= share.min(self.config.max_per_client) => {
                Some(Refusal::Penalty {
                    held: *n,
                    share,
                    left,
                })
            }
            _ if *n >= self.config.max_per_client => Some(Refusal::PerClient(*n)),
            _ => None,
        };
        if let Some(refusal) = refusal {
            if *n == 0 {
                map.remove(client);
            }
            drop(map);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(refusal);
        }
        *n += 1;
        Ok(Admission {
            shared: self.clone(),
            client: client.clone(),
        })
    }
}

/// Sends a refusal through the executor's aggregation table on the blocking pool when a
/// refusal writer is free (the handle says when it is done); otherwise counts it in the
/// table only (no durable record now; it is in the window's `refusal.repeated`) and
/// counts the dropped record in the metrics.
pub(crate) fn audit_refusal(
    shared: &Arc<Shared>,
    client: &Arc<str>,
    event: &'static str,
    reason: &'static str,
    record: mayfly_ledger::AuditEvent,
) -> Option<tokio::task::JoinHandle<()>> {
    let Ok(permit) = shared.refusal_writers.clone().try_acquire_owned() else {
        shared
            .metrics
            .refusal_records_dropped
            .fetch_add(1, Ordering::Relaxed);
        shared
            .executor
            .count_refusal(client, event, reason, record.severity);
        return None;
    };
    let task_shared = shared.clone();
    let client = client.clone();
    Some(tokio::task::spawn_blocking(move || {
        let _permit = permit;
        task_shared
            .executor
            .audit_refusal(&client, event, reason, record);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_client_triggered_log_line_is_rate_limited_and_the_dropped_ones_counted() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        let first: Vec<_> = (0..20).map(|_| limit.allow(t0)).collect();
        assert_eq!(
            first.iter().filter(|a| a.is_some()).count(),
            LogLimit::PER_SECOND as usize
        );
        assert!(first.iter().flatten().all(|&d| d == 0));
        // The next second: written again, saying how many were dropped.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            limit.allow(later),
            Some(20 - u64::from(LogLimit::PER_SECOND))
        );
        assert_eq!(limit.allow(later), Some(0));
    }
}
