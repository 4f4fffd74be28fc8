//! Aggregation of repeated identical refusals, so that a client sending junk in a loop
//! cannot fill the ledger with one audit record per request.
//!
//! Two refusals are **identical** when they come from the same client (its address, as the
//! API names it) for the same reason: the same refusing event and the same rule (a policy
//! admission refusal: `policy.decision` with its rule, e.g. `rate.client`) or the same
//! fixed reason (a detector report without the right token: `report.rejected`).
//!
//! ```text
//!  refusal (client, reason) ──▶ not in the table ──▶ recorded at once, in full (durably);
//!                          │                         a window of `interval` opens
//!                          └──▶ in the table ─────▶ counted only
//!  window ends ──▶ counted > 0 ──▶ one `refusal.repeated` record (count, window), and a
//!              │                   new window opens at once (the flood goes on: counted)
//!              └─▶ counted = 0 ──▶ the entry is dropped (the next one is recorded in full)
//! ```
//!
//! So a steady flood from one client writes one record when it starts and one per interval
//! while it lasts; a different refusal (another client, another rule) is recorded at once.
//! The table holds at most `max_keys` entries (client names cut to 256 bytes, reasons to
//! 128): once it is full, refusals of keys it does not hold are counted together in one
//! overflow entry (`client="(table full)"`), never recorded one by one. Windows are closed
//! by a thread of the executor; every count still open is written when the executor stops.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_ledger::{AuditEvent, Ledger, Severity};
use slog::{warn, Logger};

/// Longest client name kept in the table (longer ones are cut: still one key each).
const MAX_CLIENT: usize = 256;
/// Longest reason kept in the table.
const MAX_REASON: usize = 128;

/// How refusals are aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalConfig {
    /// Length of one aggregation window.
    pub interval: Duration,
    /// Most (client, reason) pairs tracked at once.
    pub max_keys: usize,
}

impl Default for RefusalConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            max_keys: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    client: String,
    reason: String,
}

#[derive(Debug)]
struct Entry {
    /// The refusing event's name (`policy.decision`, `report.rejected`).
    event: &'static str,
    severity: Severity,
    window_start: Instant,
    counted: u64,
}

#[derive(Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// Refusals of keys the full table could not hold.
    overflow: Option<Entry>,
    stopping: bool,
}

struct Shared {
    table: Mutex<Table>,
    changed: Condvar,
    config: RefusalConfig,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The aggregation table and the thread that closes its windows.
pub(crate) struct Refusals {
    shared: Arc<Shared>,
    ledger: Ledger,
    log: Logger,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn cut(s: &str, max: usize) -> String {
    crate::text::truncate(s, max)
}

impl Refusals {
    pub(crate) fn start(ledger: &Ledger, config: RefusalConfig, log: &Logger) -> Self {
        let config = RefusalConfig {
            interval: config.interval.max(Duration::from_millis(1)),
            max_keys: config.max_keys.max(1),
        };
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            changed: Condvar::new(),
            config,
        });
        let thread = {
            let (shared, ledger, log) = (Arc::clone(&shared), ledger.clone(), log.clone());
            std::thread::Builder::new()
                .name("refusals".into())
                .spawn(move || closer(&shared, &ledger, &log))
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                // Without the thread, windows close when the executor stops: counts are
                // still written, only later.
                warn!(log, "could not start the refusal aggregation thread"; "error" => %e);
                None
            }
        };
        Self {
            shared,
            ledger: ledger.clone(),
            log: log.clone(),
            thread: Mutex::new(thread),
        }
    }

    /// A refusal of `client` for `reason`, whose full record is `record` (named `event`):
    /// written at once (durably) if it is the first of its kind in a window, else counted.
    pub(crate) fn refused(
        &self,
        client: &str,
        event: &'static str,
        reason: &str,
        record: AuditEvent,
    ) {
        let key = Key {
            client: cut(client, MAX_CLIENT),
            reason: format!("{event}/{}", cut(reason, MAX_REASON)),
        };
        let now = Instant::now();
        {
            let mut table = self.shared.table();
            let max = self.shared.config.max_keys;
            if let Some(entry) = table.entries.get_mut(&key) {
                entry.counted = entry.counted.saturating_add(1);
                return;
            }
            if table.entries.len() >= max {
                let overflow = table.overflow.get_or_insert(Entry {
                    event: "(various)",
                    severity: Severity::Warning,
                    window_start: now,
                    counted: 0,
                });
                overflow.counted = overflow.counted.saturating_add(1);
                return;
            }
            table.entries.insert(
                key,
                Entry {
                    event,
                    severity: record.severity,
                    window_start: now,
                    counted: 0,
                },
            );
        }
        self.shared.changed.notify_all();
        if let Err(e) = self.ledger.audit(vec![record]) {
            warn!(self.log, "auditing a refusal failed"; "error" => %e);
        }
    }

    /// A refusal counted in memory only, never written at once (the caller has no thread
    /// to spare for a durable write): counted in its window if one is open, else a window
    /// is opened with this one counted, and the closing thread writes it as
    /// `refusal.repeated`. Takes only the table's lock.
    pub(crate) fn counted_only(
        &self,
        client: &str,
        event: &'static str,
        reason: &str,
        severity: Severity,
    ) {
        let key = Key {
            client: cut(client, MAX_CLIENT),
            reason: format!("{event}/{}", cut(reason, MAX_REASON)),
        };
        let now = Instant::now();
        {
            let mut table = self.shared.table();
            if let Some(entry) = table.entries.get_mut(&key) {
                entry.counted = entry.counted.saturating_add(1);
                return;
            }
            if table.entries.len() >= self.shared.config.max_keys {
                let overflow = table.overflow.get_or_insert(Entry {
                    event: "(various)",
                    severity: Severity::Warning,
                    window_start: now,
                    counted: 0,
                });
                overflow.counted = overflow.counted.saturating_add(1);
                return;
            }
            table.entries.insert(
                key,
                Entry {
                    event,
                    severity,
                    window_start: now,
                    counted: 1,
                },
            );
        }
        self.shared.changed.notify_all();
    }

    /// Writes every count still open and stops the thread (idempotent).
    pub(crate) fn stop(&self) {
        self.shared.table().stopping = true;
        self.shared.changed.notify_all();
        let thread = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        match thread {
            Some(t) => {
                let _ = t.join();
            }
            None => {
                // No thread (it never started, or it is already stopped): close here.
                let due = take_due(&mut self.shared.table(), &self.shared.config, None);
                write(&self.ledger, &self.log, &self.shared.config, due);
            }
        }
    }
}

/// One closed window with something counted.
struct Due {
    client: String,
    reason: String,
    entry: Entry,
}

/// Takes the windows that ended by `now` (all of them when `now` is `None`): those with a
/// count are returned and reopened; empty ones are dropped.
fn take_due(table: &mut Table, config: &RefusalConfig, now: Option<Instant>) -> Vec<Due> {
    let ended = |e: &Entry| now.is_none_or(|n| n.duration_since(e.window_start) >= config.interval);
    let mut due = Vec::new();
    let reopen = now.unwrap_or_else(Instant::now);
    table.entries.retain(|key, entry| {
        if !ended(entry) {
            return true;
        }
        if entry.counted == 0 {
            return false;
        }
        due.push(Due {
            client: key.client.clone(),
            reason: key.reason.clone(),
            entry: Entry {
                event: entry.event,
                severity: entry.severity,
                window_start: entry.window_start,
                counted: entry.counted,
            },
        });
        entry.counted = 0;
        entry.window_start = reopen;
        true
    });
    if let Some(overflow) = table.overflow.take_if(|o| ended(o)) {
        if overflow.counted > 0 {
            due.push(Due {
                client: "(table full)".into(),
                reason: "(various)".into(),
                entry: overflow,
            });
        }
    }
    due
}

fn write(ledger: &Ledger, log: &Logger, config: &RefusalConfig, due: Vec<Due>) {
    if due.is_empty() {
        return;
    }
    let records = due
        .into_iter()
        .map(|d| {
            let window_ms =
                u64::try_from(d.entry.window_start.elapsed().as_millis()).unwrap_or(u64::MAX);
            let reason = d
                .reason
                .split_once('/')
                .map_or(d.reason.as_str(), |(_, r)| r)
                .to_owned();
            AuditEvent::new("refusal.repeated", d.entry.severity)
                .field("client", d.client)
                .field("refused_event", d.entry.event)
                .field("reason", reason)
                .field("count", d.entry.counted)
                .field("window_ms", window_ms)
                .field("interval_ms", config.interval.as_millis())
        })
        .collect();
    if let Err(e) = ledger.audit(records) {
        warn!(log, "auditing repeated refusals failed"; "error" => %e);
    }
}

/// The thread: sleeps until the earliest window ends, writes what it counted, repeats;
/// writes everything still counted when asked to stop.
fn closer(shared: &Shared, ledger: &Ledger, log: &Logger) {
    let config = shared.config;
    let mut table = shared.table();
    loop {
        if table.stopping {
            let due = take_due(&mut table, &config, None);
            drop(table);
            write(ledger, log, &config, due);
            return;
        }
        let now = Instant::now();
        let due = take_due(&mut table, &config, Some(now));
        if !due.is_empty() {
            drop(table);
            write(ledger, log, &config, due);
            table = shared.table();
            continue;
        }
        let next = table
            .entries
            .values()
            .chain(table.overflow.as_ref())
            .map(|e| (e.window_start + config.interval).saturating_duration_since(now))
            .min();
        table = match next {
            // Nothing tracked: wait for the first refusal.
            None => match shared.changed.wait(table) {
                Ok(t) => t,
                Err(poisoned) => poisoned.into_inner(),
            },
            Some(left) => match shared.changed.wait_timeout(table, left) {
                Ok((t, _)) => t,
                Err(poisoned) => poisoned.into_inner().0,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_ledger::Options;

    fn refusal(client: &str) -> AuditEvent {
        AuditEvent::new("report.rejected", Severity::Warning).field("client", client)
    }

    fn events(ledger: &Ledger) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
        ledger
            .store()
            .audit_records(1, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| (r.event.event, r.event.fields))
            .filter(|(e, _)| e == "report.rejected" || e == "refusal.repeated")
            .collect()
    }

    #[test]
    fn a_full_table_counts_new_keys_together_instead_of_recording_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
        let config = RefusalConfig {
            interval: Duration::from_secs(3600),
            max_keys: 2,
        };
        let refusals = Refusals::start(&ledger, config, &log);
        for client in ["a", "b", "c", "d", "e", "a", "c"] {
            refusals.refused(client, "report.rejected", "bad token", refusal(client));
        }
        // Only the two keys the table holds were recorded in full.
        let recorded: Vec<String> = events(&ledger)
            .into_iter()
            .map(|(_, f)| f["client"].clone())
            .collect();
        assert_eq!(recorded, ["a", "b"]);
        assert_eq!(refusals.shared.table().entries.len(), 2);
        refusals.stop();
        let repeated: Vec<_> = events(&ledger)
            .into_iter()
            .filter(|(e, _)| e == "refusal.repeated")
            .map(|(_, f)| (f["client"].clone(), f["count"].clone()))
            .collect();
        assert_eq!(
            repeated,
            [
                ("a".to_owned(), "1".to_owned()),
                ("(table full)".to_owned(), "4".to_owned())
            ]
        );
    }

    /// A refusal that could not be written at once (no writer free) is counted, never
    /// lost: it comes out in its window's `refusal.repeated`, with or without a first
    /// record of its kind.
    #[test]
    fn a_refusal_counted_only_reaches_the_ledger_in_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
        let config = RefusalConfig {
            interval: Duration::from_secs(3600),
            max_keys: 16,
        };
        let refusals = Refusals::start(&ledger, config, &log);
        refusals.refused("a", "report.rejected", "bad token", refusal("a"));
        for client in ["a", "b", "b", "b"] {
            refusals.counted_only(client, "report.rejected", "bad token", Severity::Warning);
        }
        // Nothing written now but the first record of `a`.
        let now: Vec<_> = events(&ledger).into_iter().map(|(e, _)| e).collect();
        assert_eq!(now, ["report.rejected"]);
        refusals.stop();
        let repeated: Vec<_> = events(&ledger)
            .into_iter()
            .filter(|(e, _)| e == "refusal.repeated")
            .map(|(_, f)| (f["client"].clone(), f["count"].clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            repeated,
            [
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), "3".to_owned())
            ]
        );
    }

    #[test]
    fn a_long_client_name_is_cut_in_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
        let refusals = Refusals::start(&ledger, RefusalConfig::default(), &log);
        let long = "x".repeat(100_000);
        refusals.refused(&long, "report.rejected", &long, refusal("long"));
        let table = refusals.shared.table();
        let key = table.entries.keys().next().unwrap();
        assert_eq!(key.client.len(), MAX_CLIENT);
        assert!(key.reason.len() <= MAX_REASON + "report.rejected/".len());
    }
}
