//! Runs one transaction in one fresh domain.
//!
//! ```text
//!  take a ready domain ─▶ answer its Ready with Start{tx id, handler, payload, seed}
//!        │
//!        ▼   serve requests until Commit / Abort / deadline / death / violation
//!  Get, Put, Delete, Scan ─▶ mayfly-ledger Tx (snapshot reads, buffered writes)
//!  Log ─▶ debug log, at most LOG_LINES_PER_TX lines
//!  Commit{result} ─▶ ledger commit (group commit, checkpoint, audit) ─▶ Committed
//!  Abort{reason}  ─▶ Aborted
//!        │
//!        ▼
//!  destroy the domain (every path), audit its end, answer the caller
//! ```
//!
//! The guest is hostile: anything it sends is decoded by the ring crate (bounded, copied
//! out first); a protocol violation, a forbidden system call, a crash or a timeout ends the
//! transaction, destroys the domain and is audited with the reason. A serialization
//! conflict at commit re-runs the transaction from the start in a fresh domain, at most
//! `max_attempts` times.
//!
//! Modules, each with one job; their uses point one way (top to bottom):
//!
//! ```text
//!  lib       Executor: admission, attempts, the public face
//!  session   one attempt in one domain: Start, the request loop, commit, hand-off
//!  reaper    the pool that retires domains after the answer
//!  retire    destroy or quarantine a domain, settle its failure, audit its end
//!  policy    the bundle in force, its reload, the audit record of a decision
//!  types     limits, request, outcome, failure, errors
//!  refusals  aggregation of repeated refusals in the audit log
//!  text      cutting audit fields to size
//!  testing   a backend with no domains (feature `testing`, for other crates' tests)
//! ```
//!
//! Reports, rollbacks and replays (the incident service) are built on this crate in
//! `mayfly-incident`; the executor knows nothing of them.

#![forbid(unsafe_code)]

mod penalty;
mod policy;
mod reaper;
mod refusals;
mod retire;
mod session;
#[cfg(feature = "testing")]
pub mod testing;
mod text;
mod types;

pub use policy::{decision_event, ActivePolicy};
pub use refusals::RefusalConfig;
pub use text::truncate;
pub use types::{
    ExecError, ExecutorConfig, Failure, TxOutcome, TxRequest, TxStatus, DEFAULT_DEMOTE_AFTER,
    DEFAULT_MAX_WRITE_BYTES, LOG_LINES_PER_TX, MAX_PAYLOAD, RELEASE_AFTER_BYTES,
};

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_domain::{Domain, DomainBackend};
use mayfly_ledger::{AuditEvent, Hash, Ledger, Severity, TxContext, TxId};
use mayfly_policy::{Bundle, Event as PolicyEvent, PolicyError};
use slog::{o, warn, Logger};

use policy::PolicyHolder;
use reaper::Reaper;
use session::{Engine, Session};
use types::Served;

/// Runs transactions in fresh domains from one backend against one ledger.
pub struct Executor {
    ledger: Ledger,
    backend: Arc<dyn DomainBackend>,
    handlers: BTreeSet<String>,
    config: ExecutorConfig,
    log: Logger,
    reaper: Reaper,
    refusals: refusals::Refusals,
    policy: PolicyHolder,
    started: Instant,
}

impl Executor {
    /// An executor over `ledger` and `backend`; `handlers` are the handler names the
    /// template knows.
    pub fn new(
        ledger: Ledger,
        backend: Arc<dyn DomainBackend>,
        handlers: impl IntoIterator<Item = String>,
        config: ExecutorConfig,
        policy: Bundle,
        log: &Logger,
    ) -> Self {
        let reaper = Reaper::start(&ledger);
        let log = log.new(o!("component" => "executor"));
        let refusals = refusals::Refusals::start(&ledger, config.refusals, &log);
        let policy = PolicyHolder::new(policy, ledger.clone(), log.clone());
        Self {
            ledger,
            backend,
            handlers: handlers.into_iter().collect(),
            config,
            log,
            reaper,
            refusals,
            policy,
            started: Instant::now(),
        }
    }

    /// The policy in force now (a transaction keeps the one it started with).
    pub fn policy(&self) -> Arc<ActivePolicy> {
        self.policy.current()
    }

    /// Hash of the active policy bundle (recorded in every checkpoint).
    pub fn policy_hash(&self) -> Hash {
        self.policy.current().hash()
    }

    /// Loads a new policy bundle, atomically: transactions already running finish under
    /// the bundle they started with, new ones use the new one. A malformed bundle is
    /// refused (with file, line and reason) and the active one stays. Both outcomes are
    /// audited durably.
    pub fn load_policy(&self, files: &[(String, String)]) -> Result<Hash, PolicyError> {
        self.policy.load(files)
    }

    /// Blocks until every domain of an answered transaction has been destroyed and its
    /// audit records queued (used by tests).
    pub fn wait_for_reapers(&self) {
        self.reaper.wait_idle(None);
    }

    /// [`Executor::wait_for_reapers`], for at most `limit`; the number of domains still
    /// being destroyed when it returns (at shutdown: a backend that never reports a killed
    /// domain gone must not hang the agent).
    pub fn wait_for_reapers_within(&self, limit: Duration) -> usize {
        self.reaper.wait_idle(Some(limit))
    }

    /// Audits a refusal of `client` for `reason` (`record`, named `event`, is its full
    /// record): the first of a kind within the aggregation interval is written at once
    /// (durably), identical ones after it are counted into one `refusal.repeated` record
    /// per interval ([`RefusalConfig`]; the module docs of `refusals` say what is
    /// identical).
    pub fn audit_refusal(
        &self,
        client: &str,
        event: &'static str,
        reason: &str,
        record: AuditEvent,
    ) {
        self.refusals.refused(client, event, reason, record);
    }

    /// Counts a refusal of `client` for `reason` in the aggregation table without writing
    /// anything now (for callers that cannot wait for a durable write, e.g. when every
    /// audit writer is busy): it reaches the ledger in its window's `refusal.repeated`.
    pub fn count_refusal(
        &self,
        client: &str,
        event: &'static str,
        reason: &str,
        severity: Severity,
    ) {
        self.refusals.counted_only(client, event, reason, severity);
    }

    /// Writes the counts of every open aggregation window now (at shutdown, before the
    /// agent's stop is recorded); later refusals are still counted, and written when the
    /// executor is dropped.
    pub fn close_refusal_windows(&self) {
        self.refusals.stop();
    }

    /// Handler names known to the template.
    pub fn handlers(&self) -> impl Iterator<Item = &str> {
        self.handlers.iter().map(String::as_str)
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn DomainBackend> {
        &self.backend
    }

    /// Whether a request names a handler the template knows and carries a payload within
    /// [`MAX_PAYLOAD`]: the one check of both, made by [`Executor::execute`] before anything
    /// else. Callers that must refuse early (the client API, before its idempotency memory)
    /// ask it directly; it touches nothing.
    pub fn check_request(&self, handler: &str, payload_len: usize) -> Result<(), ExecError> {
        if !self.handlers.contains(handler) {
            return Err(ExecError::UnknownHandler(handler.to_owned()));
        }
        if payload_len > MAX_PAYLOAD {
            return Err(ExecError::PayloadTooLarge {
                len: payload_len,
                max: MAX_PAYLOAD,
            });
        }
        Ok(())
    }

    /// Runs `req` to its end in fresh domains (more than one only after conflicts).
    pub fn execute(&self, req: &TxRequest) -> Result<TxOutcome, ExecError> {
        self.run(req, None, None)
    }

    /// [`Executor::execute`] with the client's idempotency key, recorded durably in the
    /// same commit as the transaction ([`mayfly_ledger::Tx::set_idempotency_key`]); a key
    /// the client already committed with makes the commit fail (the caller answers with
    /// the original outcome, [`mayfly_ledger::Store::idempotent_commit`]).
    pub fn execute_with_idempotency_key(
        &self,
        req: &TxRequest,
        key: &str,
    ) -> Result<TxOutcome, ExecError> {
        self.run(req, None, Some(key))
    }

    /// [`Executor::execute`] with the domain's RNG seeded from `seed`: a replay gives the
    /// handler the numbers the original drew (the seed is kept in its checkpoint).
    pub fn execute_seeded(&self, req: &TxRequest, seed: Hash) -> Result<TxOutcome, ExecError> {
        self.run(req, Some(seed), None)
    }

    fn run(
        &self,
        req: &TxRequest,
        seed: Option<Hash>,
        idempotency_key: Option<&str>,
    ) -> Result<TxOutcome, ExecError> {
        self.check_request(&req.handler, req.payload.len())?;
        let policy = self.policy.current();
        self.admit(req, &policy)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.attempt(req, &policy, (seed, idempotency_key), attempt)?;
            if outcome.status == TxStatus::Failed
                && outcome.failure == Some(Failure::Conflicts)
                && attempt < self.config.max_attempts
            {
                continue;
            }
            self.count_hostile_end(req, &policy, &outcome);
            return Ok(outcome);
        }
    }

    /// Counts a transaction that ended in a hostile domain event against its client (the
    /// policy's per-client penalty); the start of a penalty is audited durably
    /// (`client.penalized`, Warning).
    fn count_hostile_end(&self, req: &TxRequest, policy: &ActivePolicy, outcome: &TxOutcome) {
        let Some(kind) = outcome.failure.as_ref().and_then(retire::domain_event_kind) else {
            return;
        };
        let Some(p) = policy.hostile_end(&req.client, self.now_ms()) else {
            return;
        };
        let ev = AuditEvent::new("client.penalized", Severity::Warning)
            .field("client", truncate(&req.client, 256))
            .field("rule", "engine.penalty")
            .field("event", kind.as_str())
            .field("tx_id", outcome.tx_id)
            .field("events", p.after)
            .field("window_ms", p.window_ms)
            .field("penalty_ms", p.duration_ms)
            .field("share", p.share);
        warn!(self.log, "client penalized: its transactions keep ending in hostile domain events";
            "client" => truncate(&req.client, 256), "share" => p.share, "penalty_ms" => p.duration_ms);
        if let Err(e) = self.ledger.audit(vec![ev]) {
            warn!(self.log, "auditing a client penalty failed"; "error" => %e);
        }
    }

    /// While `client` is penalised (the policy's `[engine] penalty_after`): the most
    /// transactions it may have admitted at once, and how long the penalty still lasts.
    pub fn penalty_share(&self, client: &str) -> Option<(usize, Duration)> {
        self.policy
            .current()
            .penalty_share(client, self.now_ms())
            .map(|(share, left)| {
                (
                    usize::try_from(share).unwrap_or(usize::MAX),
                    Duration::from_millis(left),
                )
            })
    }

    /// Milliseconds since the executor started (the clock of rates and penalties).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The policy's admission decision (rates, unlisted handler), audited when it is not a
    /// plain allow: a refusal through the aggregation table, other decisions lazily.
    fn admit(&self, req: &TxRequest, policy: &ActivePolicy) -> Result<(), ExecError> {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let admit = policy.decide(&PolicyEvent::Admit {
            client: &req.client,
            handler: &req.handler,
            now_ms,
        });
        let rule = admit.rule.as_deref().unwrap_or("(none)");
        if admit.audited() {
            let ev = decision_event(&admit, None, &req.handler)
                .field("client", truncate(&req.client, 256));
            if admit.action.permits() {
                if let Err(e) = self.ledger.audit_lazily(vec![ev]) {
                    warn!(self.log, "auditing an admission decision failed"; "error" => %e);
                }
            } else {
                // A refusal: the first of its kind is written at once, repeats are counted.
                self.refusals
                    .refused(&req.client, "policy.decision", rule, ev);
            }
        }
        if !admit.action.permits() {
            return Err(ExecError::Denied {
                rule: rule.to_owned(),
                action: admit.action.as_str(),
            });
        }
        Ok(())
    }

    /// One attempt in one fresh domain. A conflict comes back as `Failed` with
    /// [`Failure::Conflicts`] (the caller decides whether to run again).
    fn attempt(
        &self,
        req: &TxRequest,
        policy: &ActivePolicy,
        (seed, idempotency_key): (Option<Hash>, Option<&str>),
        attempt: u32,
    ) -> Result<TxOutcome, ExecError> {
        // The ledger's number for this domain: the backend's own id (a clone number, a
        // domid) repeats across restarts; this one never does. Reserved before the domain
        // is taken, so a failure to reserve leaves no domain untracked (a number reserved
        // for a take that then fails is a gap, never a repeat).
        let domain_id = self.ledger.next_domain_number()?;
        let domain = self.backend.take(self.config.take_timeout)?;
        let tx_id = TxId::generate();
        let mut ltx = self.ledger.begin(TxContext {
            tx_id,
            handler: req.handler.clone(),
            request: req.payload.clone(),
            domain_id,
            policy_hash: policy.hash(),
        })?;
        // The checkpoint names who asked (version 2 records).
        ltx.set_client(&req.client);
        if let Some(key) = idempotency_key {
            ltx.set_idempotency_key(key)?;
        }
        let events = self.started_events(req, tx_id, domain.as_ref(), domain_id, attempt);
        let engine = Engine {
            config: &self.config,
            ledger: &self.ledger,
            reaper: &self.reaper,
        };
        let session = Session::new(engine, req, policy, (tx_id, domain_id), events, &self.log);
        let (served, exit) = session.run(domain, ltx, seed);
        let (status, result, failure, seq, error) = match served {
            Served::Committed { seq, result } => {
                (TxStatus::Committed, result, None, Some(seq), None)
            }
            Served::Aborted { reason } => (TxStatus::Aborted, Vec::new(), None, None, Some(reason)),
            Served::Conflict => (
                TxStatus::Failed,
                Vec::new(),
                Some(Failure::Conflicts),
                None,
                None,
            ),
            Served::Failed(f) => (TxStatus::Failed, Vec::new(), Some(f), None, None),
        };
        Ok(TxOutcome {
            tx_id,
            status,
            result,
            error: error.or_else(|| failure.as_ref().map(ToString::to_string)),
            failure,
            seq,
            domain_id,
            attempts: attempt,
            domain_exit: exit,
        })
    }

    fn started_events(
        &self,
        req: &TxRequest,
        tx_id: TxId,
        domain: &dyn Domain,
        domain_id: u64,
        attempt: u32,
    ) -> Vec<AuditEvent> {
        let backend = self.backend.name();
        vec![
            AuditEvent::new("domain.cloned", Severity::Info)
                .field("backend", backend)
                .field("domain", domain_id)
                .field("backend_id", domain.id())
                .field("handle", truncate(&domain.handle(), 64)),
            AuditEvent::new("domain.started", Severity::Info)
                .field("backend", backend)
                .field("domain", domain_id)
                .field("tx_id", tx_id)
                .field("handler", &req.handler)
                .field("client", truncate(&req.client, 256))
                .field("attempt", attempt),
        ]
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.reaper.stop();
        self.refusals.stop();
    }
}
