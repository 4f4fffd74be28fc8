//! The exporter: one thread per collector, reading the committed audit chain from the
//! collector's cursor and sending each record as one RFC 5424 message.
//!
//! ```text
//!   ledger `audit` db ──read (short LMDB read txns)──► encode ──send batch──► collector
//!        ▲                                                        │
//!        └── `cursors` db: delivered seq ◄── confirmed ◄──────────┘ written, flushed, and
//!            (written at most every cursor_flush_ms)                connection still healthy
//!                                                                   confirm_ms later
//! ```
//!
//! Per collector the thread keeps three positions, `persisted <= delivered <= sent`:
//! `sent` is the last record written on the current connection; a batch becomes
//! `delivered` once it was written and flushed (TCP/TLS) or handed to the kernel (UDP) and
//! the connection still shows no sign of failure (no FIN, RST, TLS alert, or ICMP error)
//! `confirm_ms` after the write; `persisted` is what the `cursors` database holds. Any
//! failure drops the connection and rewinds `sent` to `delivered`, so what was in flight is
//! sent again on the next connection: duplicates are possible, gaps are not (within what a
//! transport without acknowledgements can tell; see docs/siem.md). A restart resumes from
//! `persisted`. Reconnection waits back off exponentially from `backoff_min_ms` to
//! `backoff_max_ms`, and are reset by the next delivery.
//!
//! The transaction path never waits for the exporter: it only reads committed records
//! (the ledger's tips tell it how far to read; LMDB readers do not block the writer) and
//! writes its cursor in a tiny transaction of its own, at most once per `cursor_flush_ms`.
//! What it does take is CPU, a few microseconds per record and collector (BENCHMARKS.md).
//!
//! On a replication primary ([`Exporter::start_replicated`]) each collector also has a
//! ceiling, the audit sequence the standby holds: [`crate::hold`] says what waits for it
//! and for how long.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mayfly_ledger::{AuditEvent, CursorError, Ledger, Severity};
use rustls::ClientConfig;
use serde::Serialize;
use slog::{debug, info, o, warn, Logger};

use crate::config::{CollectorConfig, ConfigError, SiemConfig, Start, TransportKind};
use crate::hold::{standby_field, Episode, Hold, ReplicatedTip};
use crate::rfc5424::{self, Envelope, MAX_APP_NAME, MAX_HOSTNAME, MAX_PROCID};
use crate::tls::{self, TlsConfigError};
use crate::transport::{Connection, TransportError};

/// Records read and sent per batch.
pub const BATCH: usize = 256;
/// How often an idle exporter looks for new audit records.
pub const POLL: Duration = Duration::from_millis(50);
/// Most batches awaiting confirmation before the exporter waits for them.
const MAX_PENDING: usize = 4096;
/// How long [`Exporter::stop`] lets each collector catch up before giving up.
pub const STOP_DRAIN: Duration = Duration::from_secs(3);
/// After a failure to record the start of an episode (crate::hold), the next attempt.
const EPISODE_RETRY: Duration = Duration::from_secs(1);

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A TLS collector's certificates or key could not be loaded.
    #[error("siem collector {collector}: {source}")]
    Tls {
        /// Collector.
        collector: String,
        /// What failed.
        source: TlsConfigError,
    },
    /// A cursor could not be read or initialised.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// A thread could not be started.
    #[error("starting the exporter thread of {collector}: {source}")]
    Thread {
        /// Collector.
        collector: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where one collector stands; what `status` and `GET /v1/health` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CollectorStatus {
    /// Collector name.
    pub name: String,
    /// Transport.
    pub transport: TransportKind,
    /// Address as configured.
    pub address: String,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Last audit sequence delivered (confirmed).
    pub delivered_seq: u64,
    /// Last audit sequence written on the current connection.
    pub sent_seq: u64,
    /// Last audit sequence recorded durably as the cursor.
    pub persisted_seq: u64,
    /// Audit chain tip when the status was taken.
    pub head_seq: u64,
    /// Records not yet delivered: `head_seq - delivered_seq`.
    pub behind: u64,
    /// Unix time (ms) of the last delivery.
    pub last_success_unix_ms: Option<u64>,
    /// The last failure.
    pub last_error: Option<String>,
    /// Unix time (ms) of the last failure.
    pub last_error_unix_ms: Option<u64>,
    /// Failures since the last delivery.
    pub consecutive_failures: u32,
    /// On a replication primary: the last audit sequence the standby holds, the ceiling
    /// of what is sent without waiting (`None`: no replication).
    pub replicated_seq: Option<u64>,
    /// On a replication primary: set while records are exported ahead of the standby
    /// (marked `unreplicated="true"`), the first of them.
    pub unreplicated_from: Option<u64>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A cheap, cloneable view of every collector's status.
#[derive(Clone)]
pub struct StatusHandle {
    ledger: Ledger,
    entries: Arc<Vec<Arc<Mutex<CollectorStatus>>>>,
}

impl std::fmt::Debug for StatusHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.status()).finish()
    }
}

impl StatusHandle {
    /// One entry per configured collector, in configuration order.
    pub fn status(&self) -> Vec<CollectorStatus> {
        let head = self.ledger.tips().audit.seq;
        self.entries
            .iter()
            .map(|e| {
                let mut s = match e.lock() {
                    Ok(s) => s.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                s.head_seq = head;
                s.behind = head.saturating_sub(s.delivered_seq);
                s
            })
            .collect()
    }
}

struct Worker {
    status: Arc<Mutex<CollectorStatus>>,
    stop: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The running exporter. [`Exporter::stop`] (or dropping it) lets every collector catch up
/// for at most [`STOP_DRAIN`], records the cursors and joins the threads.
pub struct Exporter {
    workers: Vec<Worker>,
    handle: StatusHandle,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("collectors", &self.workers.len())
            .finish()
    }
}

/// The kernel's host name, for the HOSTNAME field.
fn kernel_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Exporter {
    /// Validates `config`, loads TLS material, reads (or initialises) every cursor and
    /// starts one thread per collector.
    pub fn start(ledger: &Ledger, config: &SiemConfig, log: &Logger) -> Result<Self, StartError> {
        Self::start_with(ledger, config, None, log)
    }

    /// [`Exporter::start`] on a replication primary: no collector gets a record past
    /// `replicated` (what the standby holds) until it has waited `unreplicated_hold_ms`
    /// (crate::hold, docs/siem.md "Replication").
    pub fn start_replicated(
        ledger: &Ledger,
        config: &SiemConfig,
        replicated: Arc<dyn ReplicatedTip>,
        log: &Logger,
    ) -> Result<Self, StartError> {
        Self::start_with(ledger, config, Some(replicated), log)
    }

    fn start_with(
        ledger: &Ledger,
        config: &SiemConfig,
        replicated: Option<Arc<dyn ReplicatedTip>>,
        log: &Logger,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let log = log.new(o!("component" => "siem"));
        let hostname = rfc5424::header_field(
            &config.hostname.clone().unwrap_or_else(kernel_hostname),
            MAX_HOSTNAME,
        );
        let app_name =
            rfc5424::header_field(config.app_name.as_deref().unwrap_or("mayfly"), MAX_APP_NAME);
        let procid = rfc5424::header_field(&std::process::id().to_string(), MAX_PROCID);
        // Everything that can fail is done before any thread starts.
        let mut prepared = Vec::with_capacity(config.collectors.len());
        for c in &config.collectors {
            let tls = match c.transport {
                TransportKind::Tls => {
                    Some(tls::client_config(c).map_err(|source| StartError::Tls {
                        collector: c.name.clone(),
                        source,
                    })?)
                }
                _ => None,
            };
            let cursor = match ledger.store().cursor(&c.name)? {
                Some(seq) => seq,
                None => {
                    let seq = match c.start {
                        Start::Oldest => 0,
                        Start::Newest => ledger.tips().audit.seq,
                    };
                    ledger.store().set_cursor(&c.name, seq)?;
                    seq
                }
            };
            let envelope = Envelope {
                facility: c.facility_code()?,
                hostname: hostname.clone(),
                app_name: app_name.clone(),
                procid: procid.clone(),
                pen: config.pen,
                max_bytes: c.max_message_bytes(),
            };
            prepared.push((c.clone(), tls, cursor, envelope));
        }
        let timing = Timing {
            confirm: config.confirm(),
            backoff_min: Duration::from_millis(config.backoff_min_ms),
            backoff_max: Duration::from_millis(config.backoff_max_ms),
            cursor_flush: Duration::from_millis(config.cursor_flush_ms),
        };
        let mut exporter = Exporter {
            workers: Vec::new(),
            handle: StatusHandle {
                ledger: ledger.clone(),
                entries: Arc::new(Vec::new()),
            },
        };
        let mut entries = Vec::new();
        for (c, tls, cursor, envelope) in prepared {
            let status = Arc::new(Mutex::new(CollectorStatus {
                name: c.name.clone(),
                transport: c.transport,
                address: c.address.clone(),
                connected: false,
                delivered_seq: cursor,
                sent_seq: cursor,
                persisted_seq: cursor,
                head_seq: 0,
                behind: 0,
                last_success_unix_ms: None,
                last_error: None,
                last_error_unix_ms: None,
                consecutive_failures: 0,
                replicated_seq: replicated.as_ref().map(|r| r.replicated_audit_seq()),
                unreplicated_from: None,
            }));
            entries.push(status.clone());
            let (stop_tx, stop_rx) = std::sync::mpsc::sync_channel(1);
            let name = c.name.clone();
            let run = Run {
                log: log
                    .new(o!("collector" => c.name.clone(), "transport" => c.transport.as_str())),
                collector: c,
                tls,
                envelope,
                ledger: ledger.clone(),
                status: status.clone(),
                stop: stop_rx,
                timing,
                delivered: cursor,
                sent: cursor,
                persisted: cursor,
                hold: replicated
                    .clone()
                    .map(|r| Hold::new(r, config.unreplicated_hold())),
            };
            let thread = std::thread::Builder::new()
                .name(format!("siem-{name}"))
                .spawn(move || run.run())
                .map_err(|source| StartError::Thread {
                    collector: name,
                    source,
                })?;
            exporter.workers.push(Worker {
                status,
                stop: Some(stop_tx),
                thread: Some(thread),
            });
        }
        exporter.handle.entries = Arc::new(entries);
        info!(log, "siem exporter started"; "collectors" => exporter.workers.len(),
              "hostname" => hostname, "pen" => config.pen,
              "held_for_standby" => replicated.is_some());
        Ok(exporter)
    }

    /// Where every collector stands.
    pub fn status(&self) -> Vec<CollectorStatus> {
        self.handle.status()
    }

    /// A handle that reads the status after the exporter has moved elsewhere.
    pub fn status_handle(&self) -> StatusHandle {
        self.handle.clone()
    }

    /// Lets every collector catch up with the chain for at most [`STOP_DRAIN`], records
    /// every cursor and joins the threads.
    pub fn stop(mut self) -> Vec<CollectorStatus> {
        self.stop_all();
        self.status()
    }

    fn stop_all(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.try_send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
            if let Ok(mut s) = w.status.lock() {
                s.connected = false;
            }
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[derive(Clone, Copy)]
struct Timing {
    confirm: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    cursor_flush: Duration,
}

/// One collector's thread.
struct Run {
    log: Logger,
    collector: CollectorConfig,
    tls: Option<Arc<ClientConfig>>,
    envelope: Envelope,
    ledger: Ledger,
    status: Arc<Mutex<CollectorStatus>>,
    stop: Receiver<()>,
    timing: Timing,
    delivered: u64,
    sent: u64,
    persisted: u64,
    /// On a replication primary: what waits for the standby.
    hold: Option<Hold>,
}

/// What may be sent now: up to `limit`, records after `replicated` marked.
#[derive(Clone, Copy)]
struct Allowed {
    limit: u64,
    replicated: u64,
}

enum Wake {
    Timeout,
    Stop,
}

impl Run {
    fn update(&self, f: impl FnOnce(&mut CollectorStatus)) {
        match self.status.lock() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Waits up to `d`, returning early when asked to stop.
    fn wait(&self, d: Duration) -> Wake {
        match self.stop.recv_timeout(d) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => Wake::Stop,
            Err(RecvTimeoutError::Timeout) => Wake::Timeout,
        }
    }

    fn persist(&mut self) {
        if self.persisted == self.delivered {
            return;
        }
        match self
            .ledger
            .store()
            .set_cursor(&self.collector.name, self.delivered)
        {
            Ok(()) => {
                self.persisted = self.delivered;
                let p = self.persisted;
                self.update(|s| s.persisted_seq = p);
            }
            Err(e) => {
                warn!(self.log, "recording the cursor failed"; "error" => %e);
                let msg = e.to_string();
                self.update(|s| {
                    s.last_error = Some(msg);
                    s.last_error_unix_ms = Some(unix_ms(SystemTime::now()));
                });
            }
        }
    }

    fn run(mut self) {
        let mut conn: Option<Connection> = None;
        let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut frames = Vec::new();
        let mut backoff = self.timing.backoff_min;
        let mut next_attempt = Instant::now();
        let mut last_persist = Instant::now();
        // Set once stopping: the chain tip to reach, and the time limit for it.
        let mut stopping: Option<(u64, Instant)> = None;
        let tip = self.ledger.tips().audit.seq;
        if self.delivered > tip {
            warn!(self.log, "the cursor is past the audit chain's tip; was the ledger replaced?";
                  "cursor" => self.delivered, "tip" => tip);
        }
        loop {
            // A busy exporter never waits: look for a stop request on every round too.
            if stopping.is_none() {
                match self.stop.try_recv() {
                    Ok(()) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        stopping = self.stop_target();
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => {}
                }
            }
            let now = Instant::now();
            if let Some((target, deadline)) = stopping {
                if self.delivered >= target || now >= deadline {
                    break;
                }
            }

            let Some(c) = conn.as_mut() else {
                if now < next_attempt {
                    let until = stopping.map_or(next_attempt, |(_, d)| d.min(next_attempt));
                    if let Wake::Stop = self.wait(until.saturating_duration_since(now)) {
                        stopping = stopping.or_else(|| self.stop_target());
                    }
                    continue;
                }
                match Connection::open(&self.collector, self.tls.as_ref()) {
                    Ok(c) => {
                        info!(self.log, "connected"; "address" => &self.collector.address,
                              "resume_after" => self.delivered);
                        conn = Some(c);
                        self.update(|s| s.connected = true);
                    }
                    Err(e) => {
                        self.failure(&e, &mut backoff, &mut next_attempt);
                    }
                }
                continue;
            };

            // Anything the collector did since the last look (close, reset, ICMP error)?
            if let Err(e) = c.check_open() {
                conn = None;
                pending.clear();
                self.sent = self.delivered;
                self.failure(&e, &mut backoff, &mut next_attempt);
                continue;
            }

            // Batches written at least `confirm` ago on a connection that is still healthy
            // count as delivered.
            let mut advanced = false;
            while let Some(&(seq, at)) = pending.front() {
                if now.saturating_duration_since(at) < self.timing.confirm {
                    break;
                }
                self.delivered = seq;
                advanced = true;
                pending.pop_front();
            }
            if advanced {
                backoff = self.timing.backoff_min;
                let (d, now_ms) = (self.delivered, unix_ms(SystemTime::now()));
                self.update(|s| {
                    s.delivered_seq = d;
                    s.last_success_unix_ms = Some(now_ms);
                    s.consecutive_failures = 0;
                });
            }
            if self.delivered != self.persisted
                && (stopping.is_some()
                    || now.saturating_duration_since(last_persist) >= self.timing.cursor_flush)
            {
                self.persist();
                last_persist = now;
            }

            let allowed = self.allowed(now);
            if self.sent < allowed.limit && pending.len() < MAX_PENDING {
                match self.send_batch(c, &mut frames, allowed) {
                    Ok(last) => {
                        self.sent = last;
                        pending.push_back((last, Instant::now()));
                        self.update(|s| s.sent_seq = last);
                    }
                    Err(Failure::Transport(e)) => {
                        conn = None;
                        pending.clear();
                        self.sent = self.delivered;
                        self.failure(&e, &mut backoff, &mut next_attempt);
                    }
                    Err(Failure::Read(msg)) => {
                        warn!(self.log, "reading the audit chain failed"; "error" => &msg);
                        self.record_error(msg);
                        if let Wake::Stop = self.wait(self.timing.backoff_max) {
                            stopping = stopping.or_else(|| self.stop_target());
                        }
                    }
                }
                continue;
            }

            // Nothing to send now: sleep until the next confirmation is due, new records
            // may have arrived, or we are told to stop.
            let mut wait = POLL;
            if let Some(&(_, at)) = pending.front() {
                wait = wait.min((at + self.timing.confirm).saturating_duration_since(now));
            }
            if let Some((_, deadline)) = stopping {
                wait = wait.min(deadline.saturating_duration_since(now));
            }
            if let Wake::Stop = self.wait(wait.max(Duration::from_millis(1))) {
                stopping = stopping.or_else(|| self.stop_target());
            }
        }
        self.persist();
        let (d, p) = (self.delivered, self.persisted);
        self.update(|s| {
            s.connected = false;
            s.delivered_seq = d;
            s.persisted_seq = p;
        });
        info!(self.log, "stopped"; "delivered" => d, "persisted" => p);
    }

    /// How far the next batch may go: the chain's tip, or on a replication primary what
    /// the standby holds, unless the oldest record waiting for it has waited the hold
    /// (then an episode begins, crate::hold).
    fn allowed(&mut self, now: Instant) -> Allowed {
        let tip = self.ledger.tips().audit.seq;
        let sent = self.sent;
        let Some(h) = self.hold.as_mut() else {
            return Allowed {
                limit: tip,
                replicated: u64::MAX,
            };
        };
        let replicated = h.tip.replicated_audit_seq();
        h.observe(tip, sent, now);
        let mut ended = None;
        if let Some(ep) = h.episode {
            if replicated >= ep.from {
                h.episode = None;
                ended = Some(ep);
            }
        }
        let mut limit = if h.episode.is_some() {
            tip
        } else {
            replicated.max(sent).min(tip)
        };
        let begin = h.episode.is_none()
            && limit == sent
            && sent < tip
            && h.waited(sent, now) >= h.hold
            && h.retry_at.is_none_or(|t| now >= t);
        let waited = h.waited(sent, now);
        let hold_ms = h.hold.as_millis();
        self.update(|s| s.replicated_seq = Some(replicated));
        if let Some(ep) = ended {
            self.episode_ended(ep, replicated, now);
        }
        if begin {
            let from = sent.saturating_add(1);
            let standby = self
                .hold
                .as_ref()
                .map(|h| standby_field(h.tip.as_ref()))
                .unwrap_or_default();
            warn!(self.log, "exporting records the standby does not hold"; "from" => from,
                  "replicated" => replicated, "waited_ms" => waited.as_millis(), "standby" => &standby);
            let ev = AuditEvent::new("siem.export_unreplicated", Severity::Warning)
                .field("collector", &self.collector.name)
                .field("from", from)
                .field("tip", tip)
                .field("replicated_seq", replicated)
                .field("waited_ms", waited.as_millis())
                .field("unreplicated_hold_ms", hold_ms)
                .field("standby", standby);
            // Recorded (durable) before the first record goes out ahead.
            match self.ledger.audit(vec![ev]) {
                Ok(_) => {
                    if let Some(h) = self.hold.as_mut() {
                        h.episode = Some(Episode {
                            from,
                            to: sent,
                            since: now,
                        });
                        h.retry_at = None;
                    }
                    self.update(|s| s.unreplicated_from = Some(from));
                    limit = self.ledger.tips().audit.seq;
                }
                Err(e) => {
                    warn!(self.log, "recording siem.export_unreplicated failed; still holding"; "error" => %e);
                    self.record_error(format!("recording siem.export_unreplicated: {e}"));
                    if let Some(h) = self.hold.as_mut() {
                        h.retry_at = Some(now + EPISODE_RETRY);
                    }
                }
            }
        }
        Allowed { limit, replicated }
    }

    /// The standby holds the first record sent ahead of it: records wait for it again.
    fn episode_ended(&mut self, ep: Episode, replicated: u64, now: Instant) {
        let ahead = if ep.to >= ep.from {
            format!("{}..={}", ep.from, ep.to)
        } else {
            "none".to_string()
        };
        info!(self.log, "the standby is back: it holds the first record exported ahead of it"; "sent_ahead" => &ahead,
              "replicated" => replicated);
        let standby = self
            .hold
            .as_ref()
            .map(|h| standby_field(h.tip.as_ref()))
            .unwrap_or_default();
        let ev = AuditEvent::new("siem.unreplicated_ended", Severity::Notice)
            .field("collector", &self.collector.name)
            .field("sent_ahead", ahead)
            .field("replicated_seq", replicated)
            .field(
                "duration_ms",
                now.saturating_duration_since(ep.since).as_millis(),
            )
            .field("standby", standby);
        if let Err(e) = self.ledger.audit(vec![ev]) {
            warn!(self.log, "recording siem.unreplicated_ended failed"; "error" => %e);
            self.record_error(format!("recording siem.unreplicated_ended: {e}"));
        }
        self.update(|s| s.unreplicated_from = None);
    }

    fn stop_target(&self) -> Option<(u64, Instant)> {
        Some((self.ledger.tips().audit.seq, Instant::now() + STOP_DRAIN))
    }

    fn record_error(&self, msg: String) {
        let now_ms = unix_ms(SystemTime::now());
        self.update(|s| {
            s.last_error = Some(msg);
            s.last_error_unix_ms = Some(now_ms);
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        });
    }

    fn failure(&self, e: &TransportError, backoff: &mut Duration, next_attempt: &mut Instant) {
        warn!(self.log, "collector unavailable"; "address" => &self.collector.address,
              "error" => %e, "retry_in_ms" => u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
              "resume_after" => self.delivered);
        self.record_error(e.to_string());
        self.update(|s| {
            s.connected = false;
            s.sent_seq = s.delivered_seq;
        });
        *next_attempt = Instant::now() + *backoff;
        *backoff = (*backoff * 2).min(self.timing.backoff_max);
    }

    /// Reads and sends the records after `sent` up to `allowed.limit`, marking those past
    /// `allowed.replicated`; returns the last sequence sent.
    fn send_batch(
        &mut self,
        c: &mut Connection,
        frames: &mut Vec<u8>,
        allowed: Allowed,
    ) -> Result<u64, Failure> {
        let from = self.sent.saturating_add(1);
        let count = usize::try_from(allowed.limit.saturating_sub(self.sent))
            .unwrap_or(BATCH)
            .min(BATCH);
        let records = self
            .ledger
            .store()
            .audit_records_with_hash(from, count)
            .map_err(|e| Failure::Read(e.to_string()))?;
        let Some(last) = records.last().map(|(r, _)| r.seq) else {
            return Err(Failure::Read(format!("audit record {from} is missing")));
        };
        let mut expected = from;
        let mut messages = Vec::with_capacity(records.len());
        for (r, hash) in &records {
            if r.seq != expected {
                return Err(Failure::Read(format!(
                    "the audit chain jumps from {} to {}",
                    expected.saturating_sub(1),
                    r.seq
                )));
            }
            expected = expected.saturating_add(1);
            messages.push(rfc5424::encode_marked(
                r,
                hash,
                &self.envelope,
                r.seq > allowed.replicated,
            ));
        }
        c.send(&messages, frames).map_err(Failure::Transport)?;
        if last > allowed.replicated {
            if let Some(ep) = self.hold.as_mut().and_then(|h| h.episode.as_mut()) {
                ep.to = ep.to.max(last);
            }
        }
        debug!(self.log, "sent"; "from" => from, "to" => last);
        Ok(last)
    }
}

enum Failure {
    Transport(TransportError),
    Read(String),
}
