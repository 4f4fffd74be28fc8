//! One attempt of a transaction in one domain, from `Start` to retirement.
//!
//! ```text
//!  Session::run
//!   ├─ drive: answer Ready with Start, then per request until the end
//!   │     next_request (deadline, demotion) ─▶ admit (op limit, policy, write bytes)
//!   │     ─▶ data (Get/Put/Delete/Scan/Log against the ledger Tx) │ commit │ abort
//!   ├─ how the domain really ended (a failure only: reclassify)
//!   ├─ the policy on a misbehaving domain (quarantine or not)
//!   └─ retirement: inline for a failure (before the answer), else in the background
//! ```
//!
//! The session owns what the old argument list of `drive` carried by `&mut`: the audit
//! records gathered so far, whether the domain is to be kept, and the bytes the guest wrote.

use std::time::{Duration, Instant};

use mayfly_domain::{Domain, DomainExit};
use mayfly_ledger::{AuditEvent, CommitError, Hash, Ledger, Severity, Tx, TxError, TxId};
use mayfly_policy::{Action, Event as PolicyEvent, Op as PolicyOp, Write as PolicyWrite};
use mayfly_ring::wire::{error_code, Envelope, Request, Response, ScanResultBuilder, Start};
use mayfly_ring::RingError;
use slog::{debug, o, warn, Logger};

use crate::policy::{decision_event, ActivePolicy};
use crate::reaper::Reaper;
use crate::retire::{domain_event_kind, reclassify, retire, Ended, Retirement};
use crate::text::truncate;
use crate::types::{
    ExecutorConfig, Failure, Served, TxRequest, LOG_LINES_PER_TX, RELEASE_AFTER_BYTES,
};

/// What a session needs of the executor.
#[derive(Clone, Copy)]
pub(crate) struct Engine<'a> {
    pub(crate) config: &'a ExecutorConfig,
    pub(crate) ledger: &'a Ledger,
    pub(crate) reaper: &'a Reaper,
}

/// One attempt of one transaction.
pub(crate) struct Session<'a> {
    engine: Engine<'a>,
    req: &'a TxRequest,
    policy: &'a ActivePolicy,
    tx_id: TxId,
    domain_id: u64,
    log: Logger,
    /// Audit records so far (cloned, started, decisions): they commit with the checkpoint,
    /// or are appended with the end record.
    events: Vec<AuditEvent>,
    /// The policy asked to keep the domain stopped for forensics.
    quarantine: bool,
    /// Bytes the guest wrote or tried to write (with a refused write).
    written: u64,
    /// The first ledger limit this transaction's operations were refused at, and how many
    /// were refused in all: one `tx.limit_refused` record per transaction, written with its
    /// end ([`Session::take_limit_record`]), however many operations the guest retries.
    limit_hit: Option<LimitHit>,
    /// An operation found no free LMDB reader slot for the fresh snapshot a long
    /// transaction takes: the transaction ends as a conflict (run again in a fresh domain).
    readers_full: bool,
}

/// The first ledger limit a transaction hit (for its `tx.limit_refused` record).
struct LimitHit {
    /// Which limit: `reads`, `rechecks`, `scans`, `writes`, `value_bytes`.
    limit: &'static str,
    /// Its bound.
    max: usize,
    /// The operation refused first (`get`, `scan`, `put`, `delete`).
    op: &'static str,
    /// Operations refused at a limit in this transaction (the first included).
    refused: u64,
}

/// Which ledger limit a refused operation hit, and its bound; `None` for other errors.
fn ledger_limit(e: &TxError) -> Option<(&'static str, usize)> {
    Some(match e {
        TxError::TooManyReads { max } => ("reads", *max),
        TxError::TooManyRechecks { max } => ("rechecks", *max),
        TxError::TooManyScans { max } => ("scans", *max),
        TxError::TooManyWrites { max } => ("writes", *max),
        TxError::ValueTooLarge { max, .. } => ("value_bytes", *max),
        _ => return None,
    })
}

/// The request loop's counters.
struct Progress {
    ops: u32,
    log_lines: u32,
    /// Bytes of the writes admitted so far.
    bytes_written: u64,
    /// The first write this transaction had refused: its `Commit` is then refused too, so a
    /// guest may send `Commit` right behind writes whose answers it has not read.
    refused_write: Option<String>,
    started: Instant,
    deadline: Instant,
    demote_at: Option<Instant>,
}

impl Progress {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        engine: Engine<'a>,
        req: &'a TxRequest,
        policy: &'a ActivePolicy,
        (tx_id, domain_id): (TxId, u64),
        events: Vec<AuditEvent>,
        log: &Logger,
    ) -> Self {
        Self {
            engine,
            req,
            policy,
            tx_id,
            domain_id,
            log: log.new(o!("tx_id" => tx_id.to_string(), "domain" => domain_id)),
            events,
            quarantine: false,
            written: 0,
            limit_hit: None,
            readers_full: false,
        }
    }

    /// Notes an operation the ledger refused: at one of its limits (see [`LimitHit`]), or
    /// for want of a reader slot (audited `tx.readers_full`; the transaction then ends as a
    /// conflict, see [`Session::drive`]).
    fn note_refusal(&mut self, op: &'static str, e: &TxError) {
        if matches!(e, TxError::Busy) && !self.readers_full {
            self.readers_full = true;
            debug!(self.log, "no free ledger reader slot for a long transaction's snapshot";
                "op" => op);
            self.events.push(
                AuditEvent::new("tx.readers_full", Severity::Warning)
                    .field("tx_id", self.tx_id)
                    .field("handler", &self.req.handler)
                    .field("client", truncate(&self.req.client, 256))
                    .field("op", op),
            );
            return;
        }
        let Some((limit, max)) = ledger_limit(e) else {
            return;
        };
        match &mut self.limit_hit {
            Some(hit) => hit.refused = hit.refused.saturating_add(1),
            None => {
                debug!(self.log, "operation refused at a ledger limit";
                    "limit" => limit, "max" => max, "op" => op);
                self.limit_hit = Some(LimitHit {
                    limit,
                    max,
                    op,
                    refused: 1,
                });
            }
        }
    }

    /// Moves the `tx.limit_refused` record (if a limit was hit) to the records of the
    /// transaction; called before the commit and at the end, so it is written exactly once.
    fn take_limit_record(&mut self) {
        if let Some(hit) = self.limit_hit.take() {
            self.events.push(
                AuditEvent::new("tx.limit_refused", Severity::Warning)
                    .field("tx_id", self.tx_id)
                    .field("handler", &self.req.handler)
                    .field("client", truncate(&self.req.client, 256))
                    .field("limit", hit.limit)
                    .field("max", hit.max)
                    .field("op", hit.op)
                    .field("refused", hit.refused),
            );
        }
    }

    /// Serves the domain to the end of its transaction, then retires it. A transaction that
    /// ended normally (committed, aborted by its handler, or conflicting) is answered at once
    /// and its domain destroyed afterwards — by the backend, which calls back when it is gone
    /// ([`Domain::destroy_in_background`], the sandbox), or by a reaper thread that waits
    /// (Xen); a failed one is destroyed first, because how the domain died decides what the
    /// failure was.
    pub(crate) fn run(
        mut self,
        mut domain: Box<dyn Domain>,
        ltx: Tx,
        seed: Option<Hash>,
    ) -> (Served, Option<DomainExit>) {
        let served = self.drive(domain.as_mut(), ltx, seed);
        self.take_limit_record();
        // How the domain really ended decides what the failure was: a guest killed by the
        // seccomp filter or a resource limit makes the ring report its peer gone (or a
        // broken message, or silence until the deadline) before the exit is known.
        let (served, dead) = match served {
            Served::Failed(
                f @ (Failure::DomainDied(_) | Failure::Timeout | Failure::ProtocolViolation(_)),
            ) => {
                let (f, dead) = reclassify(f, domain.as_mut(), &self.log);
                (Served::Failed(f), dead)
            }
            other => (other, None),
        };
        self.release_memory();
        self.decide_on_domain(&served, dead);
        self.retire(domain, served)
    }

    /// The transaction's buffered writes are freed by now (its ledger transaction ended in
    /// `drive`); after a large write set, hand the memory back.
    fn release_memory(&self) {
        if self.written < RELEASE_AFTER_BYTES {
            return;
        }
        if let Some(release) = self.engine.config.release_memory {
            let released = release();
            debug!(self.log, "released free memory after a large write set";
                "bytes_written" => self.written, "released" => released);
        }
    }

    /// A domain that misbehaved may be kept for forensics, if the policy says so; one that
    /// is already dead (`dead`: the kernel killed it) has nothing left to keep, and the audit
    /// trail says the quarantine the policy asked for was not possible.
    fn decide_on_domain(&mut self, served: &Served, dead: Option<DomainExit>) {
        if let Some(kind) = match served {
            Served::Failed(f) => domain_event_kind(f),
            _ => None,
        } {
            let d = self.policy.decide(&PolicyEvent::Domain {
                tx: self.tx_id.0,
                handler: &self.req.handler,
                kind,
            });
            if d.audited() {
                self.events
                    .push(decision_event(&d, Some(self.tx_id), &self.req.handler));
            }
            self.quarantine |= d.action == Action::Quarantine;
        }
        if let (true, Some(exit)) = (self.quarantine, dead) {
            self.events.push(
                AuditEvent::new("domain.quarantine_failed", Severity::Error)
                    .field("domain", self.domain_id)
                    .field("tx_id", self.tx_id)
                    .field(
                        "error",
                        format!("the domain had already ended ({exit}): nothing left to keep"),
                    ),
            );
            self.quarantine = false;
        }
    }

    /// Hands the domain to its retirement: inline for a failure, else in the background.
    fn retire(self, domain: Box<dyn Domain>, served: Served) -> (Served, Option<DomainExit>) {
        let Engine { ledger, reaper, .. } = self.engine;
        let retirement = Retirement {
            domain,
            ended: Ended {
                events: self.events,
                tx_id: self.tx_id,
                domain_id: self.domain_id,
                handler: self.req.handler.clone(),
                log: self.log,
                quarantine: self.quarantine,
            },
        };
        let retirement = if matches!(served, Served::Failed(_)) {
            retirement
        } else if retirement.domain.destroys_in_background() && !retirement.ended.quarantine {
            // The backend tells when the domain is gone: no thread of ours waits for it.
            reaper.retire_in_background(ledger, retirement, served.clone());
            return (served, None);
        } else {
            match reaper.send(retirement, served.clone()) {
                Ok(()) => return (served, None),
                Err(retirement) => *retirement,
            }
        };
        let (served, exit) = retire(ledger, retirement, served);
        (served, Some(exit))
    }

    /// The request loop. Everything the guest sends is already decoded and bounded.
    fn drive(&mut self, domain: &mut dyn Domain, mut ltx: Tx, seed: Option<Hash>) -> Served {
        if let Err(served) = self.start(domain, &mut ltx, seed) {
            return served;
        }
        let config = self.engine.config;
        let now = Instant::now();
        let mut progress = Progress {
            ops: 0,
            log_lines: 0,
            bytes_written: 0,
            refused_write: None,
            started: now,
            deadline: now + config.tx_timeout,
            demote_at: config.demote_after.map(|d| now + d),
        };
        loop {
            // An idle transaction must not keep its ledger snapshot past the hold either
            // (it would keep LMDB from reusing pages): wake up then and give it up.
            let env = match self.next_request(domain, &mut progress, ltx.snapshot_due()) {
                Ok(Some(env)) => env,
                Ok(None) => {
                    ltx.release_snapshot_if_old();
                    continue;
                }
                Err(served) => return served,
            };
            if let Err(served) = self.admit(domain, &mut progress, &env) {
                return served;
            }
            let reply = match env.body {
                Request::Commit { result } => {
                    return self.commit(domain, ltx, &progress, env.id, result)
                }
                Request::Abort { reason } => {
                    let _ = send(domain, env.id, &Response::Aborted);
                    return Served::Aborted { reason };
                }
                Request::Ready { .. } => {
                    return Served::Failed(Failure::ProtocolViolation(
                        "Ready sent again during a transaction".into(),
                    ))
                }
                body => self.data(&mut ltx, &mut progress, body),
            };
            if ltx.is_doomed() || self.readers_full {
                // Something it read changed while it held no snapshot (a long
                // transaction), or no reader slot was free for its fresh snapshot: it
                // cannot go on. The guest has its error (CONFLICT); the transaction ends as
                // a conflict, as a failed commit validation would, and is run again.
                let _ = send(domain, env.id, &reply);
                debug!(self.log, "conflict before commit"; "readers_full" => self.readers_full);
                return Served::Conflict;
            }
            if let Err(e) = send(domain, env.id, &reply) {
                return Served::Failed(Failure::ProtocolViolation(format!(
                    "sending a response: {e}"
                )));
            }
        }
    }

    /// Answers the domain's `Ready` with `Start`, seeded from `seed` (a replay) or fresh
    /// entropy, and records the seed in the checkpoint.
    fn start(
        &self,
        domain: &mut dyn Domain,
        ltx: &mut Tx,
        seed: Option<Hash>,
    ) -> Result<(), Served> {
        let seed = seed.unwrap_or_else(|| {
            let mut seed = random_seed();
            for (s, t) in seed.iter_mut().zip(self.tx_id.0.iter().cycle()) {
                *s ^= t;
            }
            seed
        });
        ltx.set_entropy_seed(seed);
        let start = Response::Start(Start {
            tx_id: self.tx_id.0,
            handler: self.req.handler.clone(),
            payload: self.req.payload.clone(),
            entropy_seed: seed,
        });
        let ready_id = domain.ready_id();
        send(domain, ready_id, &start)
            .map_err(|e| Served::Failed(Failure::ProtocolViolation(format!("sending Start: {e}"))))
    }

    /// The next request, waiting no longer than the deadline, the demotion point (past
    /// it: demote once and return `None`, to wait on) or `wake_at` (the ledger
    /// transaction's snapshot falling due: `None`, for the caller to give it up).
    fn next_request(
        &self,
        domain: &mut dyn Domain,
        progress: &mut Progress,
        wake_at: Option<Instant>,
    ) -> Result<Option<Envelope<Request>>, Served> {
        let left = progress.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Served::Failed(Failure::Timeout));
        }
        let until_demote = progress
            .demote_at
            .map(|at| at.saturating_duration_since(Instant::now()));
        if until_demote.is_some_and(|d| d.is_zero()) {
            progress.demote_at = None;
            if let Err(e) = domain.demote() {
                debug!(self.log, "demoting the domain failed"; "error" => %e);
            }
            return Ok(None);
        }
        let until_wake = wake_at.map(|at| at.saturating_duration_since(Instant::now()));
        let wait = [until_demote, until_wake]
            .into_iter()
            .flatten()
            .fold(left, Duration::min);
        let (ring, notifier) = domain.ring();
        match ring.recv_request(&notifier, Some(wait)) {
            Ok(env) => Ok(Some(env)),
            Err(RingError::Timeout { .. }) if wait < left => Ok(None),
            Err(RingError::Timeout { .. }) => Err(Served::Failed(Failure::Timeout)),
            Err(RingError::PeerGone) => {
                Err(Served::Failed(Failure::DomainDied(DomainExit::Crashed {
                    signal: 0,
                })))
            }
            Err(e) => Err(Served::Failed(Failure::ProtocolViolation(e.to_string()))),
        }
    }

    /// Counts the request against the operation limit; a data operation passes the policy
    /// and the write-set byte bound first. A refusal is answered here and ends the
    /// transaction.
    fn admit(
        &mut self,
        domain: &mut dyn Domain,
        progress: &mut Progress,
        env: &Envelope<Request>,
    ) -> Result<(), Served> {
        let config = self.engine.config;
        progress.ops += 1;
        if progress.ops > config.max_ops {
            let message = format!("more than {} operations", config.max_ops);
            refuse(domain, env.id, error_code::LIMIT_EXCEEDED, message);
            return Err(Served::Failed(Failure::OperationLimit));
        }
        let Some(op) = policy_op(&env.body) else {
            return Ok(());
        };
        let d = self.policy.decide(&PolicyEvent::Op {
            tx: self.tx_id.0,
            handler: &self.req.handler,
            client: &self.req.client,
            op,
            ops_so_far: u64::from(progress.ops.saturating_sub(1)),
            bytes_written_so_far: progress.bytes_written,
            elapsed_ms: progress.elapsed_ms(),
        });
        if d.audited() {
            self.events
                .push(decision_event(&d, Some(self.tx_id), &self.req.handler));
        }
        if !d.action.permits() {
            let rule = d.rule.as_deref().unwrap_or("(none)").to_owned();
            let message = format!("denied by policy rule {rule}");
            refuse(domain, env.id, error_code::DENIED, message);
            self.quarantine = d.action == Action::Quarantine;
            return Err(Served::Failed(Failure::Policy {
                rule,
                action: d.action.as_str(),
            }));
        }
        let next = progress.bytes_written.saturating_add(op.bytes_written());
        self.written = next;
        if next > config.max_write_bytes {
            let message = format!("write set over {} bytes", config.max_write_bytes);
            refuse(domain, env.id, error_code::LIMIT_EXCEEDED, message);
            return Err(Served::Failed(Failure::WriteLimit {
                bytes: next,
                limit: config.max_write_bytes,
            }));
        }
        progress.bytes_written = next;
        Ok(())
    }

    /// Serves a data operation or a log line from the ledger transaction (reads see its
    /// snapshot and its own writes; writes are buffered).
    fn data(&mut self, ltx: &mut Tx, progress: &mut Progress, body: Request) -> Response {
        match body {
            Request::Get { key } => match ltx.get(&key) {
                Ok(v) => Response::Value(v),
                Err(e) => {
                    self.note_refusal("get", &e);
                    error_response(&e)
                }
            },
            Request::Put { key, value } => match ltx.put(&key, &value) {
                Ok(()) => Response::Ok,
                Err(e) => {
                    self.note_refusal("put", &e);
                    let refused = &mut progress.refused_write;
                    refused.get_or_insert_with(|| format!("put refused: {e}"));
                    error_response(&e)
                }
            },
            Request::Delete { key } => match ltx.delete(&key) {
                Ok(()) => Response::Ok,
                Err(e) => {
                    self.note_refusal("delete", &e);
                    let refused = &mut progress.refused_write;
                    refused.get_or_insert_with(|| format!("delete refused: {e}"));
                    error_response(&e)
                }
            },
            Request::Scan { start, end, limit } => match scan(ltx, &start, end.as_deref(), limit) {
                Ok(response) => response,
                Err(e) => {
                    self.note_refusal("scan", &e);
                    error_response(&e)
                }
            },
            Request::Log { level, line } => {
                progress.log_lines += 1;
                if progress.log_lines <= LOG_LINES_PER_TX {
                    debug!(self.log, "guest"; "level" => ?level, "line" => line);
                } else if progress.log_lines == LOG_LINES_PER_TX + 1 {
                    debug!(self.log, "guest log lines beyond the limit are dropped");
                }
                Response::Ok
            }
            // Never reached: `drive` ends the transaction on these before asking for data. If
            // that ever changed, the guest would get an error, not a silent success.
            Request::Commit { .. } | Request::Abort { .. } | Request::Ready { .. } => {
                Response::Error {
                    code: error_code::INTERNAL,
                    message: "not a data operation".into(),
                }
            }
        }
    }

    /// `Commit{result}`: refused behind a refused write or by the policy; otherwise the
    /// ledger commit (OCC validation, checkpoint and the records so far, one group).
    fn commit(
        &mut self,
        domain: &mut dyn Domain,
        ltx: Tx,
        progress: &Progress,
        id: u32,
        result: Vec<u8>,
    ) -> Served {
        if let Some(reason) = &progress.refused_write {
            let _ = send(domain, id, &Response::Aborted);
            return Served::Aborted {
                reason: format!("commit after a refused write ({reason})"),
            };
        }
        if let Err(served) = self.admit_commit(&ltx, progress) {
            let _ = send(domain, id, &Response::Aborted);
            return served;
        }
        self.take_limit_record();
        let committed = AuditEvent::new("tx.committed", Severity::Info)
            .field("tx_id", self.tx_id)
            .field("handler", &self.req.handler);
        // The lifecycle records so far (cloned, started, decisions) commit with the
        // checkpoint; if the commit fails (a conflict, storage), they stay for the end
        // record, so a lost attempt is audited like any other.
        let mut audit = self.events.clone();
        audit.push(committed);
        match ltx.commit_with_audit(result.clone(), audit) {
            Ok(receipt) => {
                self.events.clear();
                let _ = send(domain, id, &Response::Committed);
                Served::Committed {
                    seq: receipt.seq,
                    result,
                }
            }
            Err(e) => {
                let _ = send(domain, id, &Response::Aborted);
                self.commit_failed(e)
            }
        }
    }

    /// The policy's word on the commit, with the write set.
    fn admit_commit(&mut self, ltx: &Tx, progress: &Progress) -> Result<(), Served> {
        let writes: Vec<PolicyWrite<'_>> = ltx
            .writes()
            .map(|(key, value)| PolicyWrite { key, value })
            .collect();
        let d = self.policy.decide(&PolicyEvent::Commit {
            tx: self.tx_id.0,
            handler: &self.req.handler,
            client: &self.req.client,
            ops: u64::from(progress.ops),
            bytes_written: progress.bytes_written,
            elapsed_ms: progress.elapsed_ms(),
            writes: &writes,
        });
        drop(writes);
        if d.audited() {
            self.events
                .push(decision_event(&d, Some(self.tx_id), &self.req.handler));
        }
        if d.action.permits() {
            return Ok(());
        }
        self.quarantine = d.action == Action::Quarantine;
        Err(Served::Failed(Failure::Policy {
            rule: d.rule.as_deref().unwrap_or("(none)").to_owned(),
            action: d.action.as_str(),
        }))
    }

    /// What a failed commit was: a conflict (run again), the transaction's own size, or
    /// storage.
    fn commit_failed(&self, e: CommitError) -> Served {
        if e.is_conflict() {
            debug!(self.log, "conflict at commit"; "error" => %e);
            Served::Conflict
        } else if let CommitError::CheckpointTooLarge { len, max } = e {
            // The transaction's own size, not the storage's fault.
            Served::Failed(Failure::WriteLimit {
                bytes: u64::try_from(len).unwrap_or(u64::MAX),
                limit: u64::try_from(max).unwrap_or(u64::MAX),
            })
        } else {
            warn!(self.log, "commit failed"; "error" => %e);
            Served::Failed(Failure::Storage(e.to_string()))
        }
    }
}

/// The policy's view of a data operation; `None` for the rest.
fn policy_op(body: &Request) -> Option<PolicyOp<'_>> {
    Some(match body {
        Request::Get { key } => PolicyOp::Get { key },
        Request::Put { key, value } => PolicyOp::Put { key, value },
        Request::Delete { key } => PolicyOp::Delete { key },
        Request::Scan { start, end, .. } => PolicyOp::Scan {
            start,
            end: end.as_deref(),
        },
        _ => return None,
    })
}

/// A range scan, cut to what fits one answer (`more` says there is more).
fn scan(ltx: &mut Tx, start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Response, TxError> {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let scan = ltx.scan(start, end, limit_usize)?;
    let mut builder = ScanResultBuilder::new(limit);
    let mut more = scan.more;
    for (k, v) in scan.entries {
        match builder.try_push(k, v) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                more = true;
                break;
            }
        }
    }
    Ok(builder.finish(more))
}

fn send(domain: &mut dyn Domain, id: u32, response: &Response) -> Result<(), RingError> {
    let (ring, notifier) = domain.ring();
    ring.send_response(id, response, &notifier)
}

/// Answers a refused request with an error (the transaction ends right after, so a failure
/// to send changes nothing).
fn refuse(domain: &mut dyn Domain, id: u32, code: u16, message: String) {
    let _ = send(domain, id, &Response::Error { code, message });
}

fn random_seed() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    // The system RNG fails only without any entropy source; the transaction then still
    // runs, with a seed that is unique per transaction through the id mixed in below.
    let _ = ring::rand::SystemRandom::new().fill(&mut seed);
    seed
}

fn tx_error_code(e: &TxError) -> u16 {
    match e {
        TxError::BadKey { .. } | TxError::BadScanLimit { .. } | TxError::BadHandler(_) => {
            error_code::BAD_REQUEST
        }
        TxError::ValueTooLarge { .. }
        | TxError::TooManyReads { .. }
        | TxError::TooManyWrites { .. }
        | TxError::TooManyScans { .. }
        | TxError::RequestTooLarge { .. }
        | TxError::TooManyRechecks { .. } => error_code::LIMIT_EXCEEDED,
        // No reader slot for a long transaction's fresh snapshot: retryable, as a conflict.
        TxError::Conflict(_) | TxError::Busy => error_code::CONFLICT,
        _ => error_code::INTERNAL,
    }
}

fn error_response(e: &TxError) -> Response {
    Response::Error {
        code: tx_error_code(e),
        message: truncate(&e.to_string(), 1000),
    }
}
