//! The console's commands: what each needs (quorum), how its arguments are read, and what
//! it does. Arguments arrive as signed text (`name → value`); every value is parsed and
//! bounded here before anything acts on it.
//! Every command also carries the signed `appliance` argument; the server checks and
//! removes it before [`parse`] (see `mayfly_command::APPLIANCE_ARG`).
//!
//! | command | quorum | arguments |
//! |---|---|---|
//! | `status` | 1 | — |
//! | `tx.list` / `checkpoint.list` | 1 | `from` (seq, default: the newest `limit`), `limit` (1..=1000, default 20) |
//! | `tx.show` / `checkpoint.show` | 1 | `id`: a commit sequence or a 32-hex-digit transaction id |
//! | `verify` | 1 | — (progress frames) |
//! | `rollback` | quorum; 1 with `dry_run=true` | `id`, `cascade`, `replay`, `dry_run` (`true`/`false`, default false), `reason` |
//! | `policy.load` | quorum | one `file.NAME` per bundle file (its text) |
//! | `quarantine.list` | 1 | — |
//! | `quarantine.release` | quorum | `domain` (id) |
//! | `audit.export` | 1 | `from` (default 1), `to` (default: the tip); at most 1,000,000 records (progress and record frames) |
//! | `key.rotate` | quorum | — |
//! | `attest` | 1 | `nonce`: 32..=128 hex digits (16..=64 bytes) chosen by the operator |
//! | `update.install` | quorum | `bundle` (file name on the update medium, 1..=128 of `[A-Za-z0-9._-]`), `sha256` (64 hex digits: the whole bundle file the admins approve), `tries` (1..=3, default 3) |
//! | `update.status` | 1 | — |
//! | `breakglass.open` | quorum | `token_sha256` (64 hex digits: SHA-256 of the one-time token the admins give the person at the console), `minutes` (1..=60, default 15) |
//! | `promote` | quorum | `epoch`: the epoch the standby opens (its epoch + 1). Accepted only by a standby (`dom0-agent promote`, docs/failover.md); a serving agent refuses it (`not_a_standby`) |

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mayfly_incident::{view, RollbackOrder};
use mayfly_ledger::checkpoint::chain_hash;
use mayfly_ledger::codec::hex;
use mayfly_ledger::{AuditEvent, Record, Severity, TxId};
use serde_json::{json, Value};

use crate::services::{Services, UpdateFailure, UpdateRequest};

/// Longest list answered by `*.list`.
pub const MAX_LIST: usize = 1000;
/// Most audit records one `audit.export` returns.
pub const MAX_EXPORT: u64 = 1_000_000;
/// Most audit records per `records` frame.
const EXPORT_CHUNK: usize = 1000;
/// A `records` frame is sent once its records' JSON reaches this size, so that no frame
/// comes near `MAX_RESPONSE_FRAME` (16 MiB): one record is at most 32 fields of 1,024
/// bytes, about 200 KiB as JSON even if every byte needs a `\u00XX` escape.
const EXPORT_FRAME_BYTES: usize = 4 << 20;
/// Least time between two progress frames.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Why a command that was authorized could not be carried out (or had bad arguments).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No such command.
    #[error("unknown command {0:?}")]
    Unknown(String),
    /// An argument is missing, unknown or malformed.
    #[error("argument {name}: {reason}")]
    BadArgument {
        /// Argument.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The named record, transaction or domain does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Reading the ledger failed.
    #[error("reading the ledger: {0}")]
    Read(#[from] mayfly_ledger::ReadError),
    /// The rollback was refused or failed.
    #[error("rollback: {0}")]
    Rollback(#[from] mayfly_ledger::RollbackError),
    /// Replaying after the rollback failed.
    #[error("replay: {0}")]
    Replay(#[from] mayfly_incident::ReplayError),
    /// The policy bundle was refused (the active one stays).
    #[error("policy bundle refused, the active one stays: {reason}")]
    PolicyRefused {
        /// The engine's reason (file, line).
        reason: String,
    },
    /// A ledger commit (key rotation) failed.
    #[error("ledger: {0}")]
    Commit(#[from] mayfly_ledger::CommitError),
    /// The backend could not release a quarantined domain.
    #[error("backend: {0}")]
    Domain(#[from] mayfly_domain::DomainError),
    /// The TPM could not quote.
    #[error("TPM quote: {0}")]
    Attest(Box<dyn std::error::Error + Send + Sync>),
    /// The update bundle was refused (nothing written) or its install failed.
    #[error("update {}: {}", if .0.refused { "refused" } else { "failed" }, .0.message)]
    Update(UpdateFailure),
    /// The break-glass window could not be opened.
    #[error("break-glass: {0}")]
    BreakGlass(String),
    /// This appliance has no A/B update configured.
    #[error("updates are not configured on this appliance ([update] enabled = false)")]
    NoUpdater,
    /// `promote` sent to an agent that serves (a primary): only a standby is promoted.
    #[error("promote is accepted only by a standby (`dom0-agent promote` on the standby's data directory); this agent serves as primary at epoch {epoch}")]
    NotAStandby {
        /// The agent's epoch.
        epoch: u64,
    },
}

impl CommandError {
    /// Stable short name for clients and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unknown(_) => "unknown_command",
            Self::BadArgument { .. } => "bad_argument",
            Self::NotFound(_) => "not_found",
            Self::Read(_) => "storage",
            Self::Rollback(_) => "rollback_refused",
            Self::Replay(_) => "replay_failed",
            Self::PolicyRefused { .. } => "policy_refused",
            Self::Commit(_) => "storage",
            Self::Domain(_) => "backend",
            Self::Attest(_) => "tpm",
            Self::Update(f) => f.code,
            Self::NoUpdater => "not_configured",
            Self::BreakGlass(_) => "breakglass",
            Self::NotAStandby { .. } => "not_a_standby",
        }
    }
}

/// A command whose arguments have been read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `status`.
    Status,
    /// `tx.list` (transactions only) or `checkpoint.list` (every record).
    List {
        /// Only transactions.
        tx_only: bool,
        /// First sequence (None: the newest `limit`).
        from: Option<u64>,
        /// Most records.
        limit: usize,
    },
    /// `tx.show` / `checkpoint.show`.
    Show {
        /// Which record.
        id: RecordId,
    },
    /// `verify`.
    Verify,
    /// `rollback`.
    Rollback {
        /// The attack transaction.
        id: RecordId,
        /// Also undo every transaction that read its writes (transitively).
        cascade: bool,
        /// Re-run the undone legitimate transactions afterwards.
        replay: bool,
        /// Plan only.
        dry_run: bool,
        /// Recorded in the rollback record.
        reason: String,
    },
    /// `policy.load`.
    PolicyLoad {
        /// `(file name, text)`, sorted by name.
        files: Vec<(String, String)>,
    },
    /// `quarantine.list`.
    QuarantineList,
    /// `quarantine.release`.
    QuarantineRelease {
        /// Domain id.
        domain: u32,
    },
    /// `audit.export`.
    AuditExport {
        /// First sequence.
        from: u64,
        /// Last sequence (None: the tip).
        to: Option<u64>,
    },
    /// `key.rotate`.
    KeyRotate,
    /// `attest`: a TPM quote over the PCRs and the latest signed head.
    Attest {
        /// The operator's nonce (16..=64 bytes).
        nonce: Vec<u8>,
    },
    /// `update.install`.
    UpdateInstall(UpdateRequest),
    /// `update.status`.
    UpdateStatus,
    /// `breakglass.open`.
    BreakGlassOpen {
        /// How long the console accepts the token (and the shell lives).
        minutes: u32,
        /// SHA-256 of the one-time token.
        token_sha256: [u8; 32],
    },
    /// `promote`: a standby opens `epoch` as primary (refused by a serving agent).
    Promote {
        /// The epoch the promotion opens.
        epoch: u64,
    },
}

/// A commit sequence or a transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordId {
    /// Commit sequence.
    Seq(u64),
    /// Transaction id.
    Tx(TxId),
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Seq(s) => write!(f, "commit {s}"),
            Self::Tx(t) => write!(f, "transaction {t}"),
        }
    }
}

/// Whether `command` is destructive (needs the quorum) with these arguments.
pub fn is_destructive(cmd: &Command) -> bool {
    match cmd {
        Command::Rollback { dry_run, .. } => !dry_run,
        Command::PolicyLoad { .. }
        | Command::QuarantineRelease { .. }
        | Command::KeyRotate
        | Command::UpdateInstall(_)
        | Command::BreakGlassOpen { .. }
        | Command::Promote { .. } => true,
        _ => false,
    }
}

struct Args<'a> {
    args: &'a BTreeMap<String, String>,
    used: Vec<&'a str>,
}

impl<'a> Args<'a> {
    fn get(&mut self, name: &'a str) -> Option<&'a str> {
        self.used.push(name);
        self.args.get(name).map(String::as_str)
    }

    fn bad(name: &str, reason: impl Into<String>) -> CommandError {
        CommandError::BadArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }

    fn u64(&mut self, name: &'a str) -> Result<Option<u64>, CommandError> {
        self.get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| Self::bad(name, format!("{v:?} is not a non-negative integer")))
            })
            .transpose()
    }

    fn bool(&mut self, name: &'a str) -> Result<bool, CommandError> {
        match self.get(name) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(Self::bad(name, format!("{v:?} is not true or false"))),
        }
    }

    fn id(&mut self, name: &'a str) -> Result<RecordId, CommandError> {
        let v = self.get(name).ok_or_else(|| Self::bad(name, "missing"))?;
        if let Ok(seq) = v.parse::<u64>() {
            if seq == 0 {
                return Err(Self::bad(name, "commit sequences start at 1"));
            }
            return Ok(RecordId::Seq(seq));
        }
        TxId::parse(v).map(RecordId::Tx).ok_or_else(|| {
            Self::bad(
                name,
                format!("{v:?} is neither a commit sequence nor a 32-hex-digit transaction id"),
            )
        })
    }

    /// A required SHA-256 digest: 64 hex digits.
    fn digest(&mut self, name: &'a str) -> Result<[u8; 32], CommandError> {
        let text = self.get(name).ok_or_else(|| Self::bad(name, "missing"))?;
        mayfly_ledger::codec::unhex(text)
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or_else(|| Self::bad(name, "must be 64 hex digits"))
    }

    /// Refuses any argument the command does not take (a typo must not be ignored).
    fn done(self) -> Result<(), CommandError> {
        for name in self.args.keys() {
            if !self.used.contains(&name.as_str()) {
                return Err(Self::bad(name, "not an argument of this command"));
            }
        }
        Ok(())
    }
}

/// Reads `command` with `args` into a [`Command`].
pub fn parse(command: &str, args: &BTreeMap<String, String>) -> Result<Command, CommandError> {
    let mut a = Args {
        args,
        used: Vec::new(),
    };
    let cmd = match command {
        "status" => Command::Status,
        "tx.list" | "checkpoint.list" => {
            let limit = a.u64("limit")?.unwrap_or(20);
            if limit == 0 || limit > MAX_LIST as u64 {
                return Err(Args::bad("limit", format!("must be 1..={MAX_LIST}")));
            }
            Command::List {
                tx_only: command == "tx.list",
                from: a.u64("from")?,
                limit: usize::try_from(limit).unwrap_or(MAX_LIST),
            }
        }
        "tx.show" | "checkpoint.show" => Command::Show { id: a.id("id")? },
        "verify" => Command::Verify,
        "rollback" => {
            let reason = a.get("reason").unwrap_or("admin console").to_owned();
            if reason.len() > 512 {
                return Err(Args::bad("reason", "longer than 512 bytes"));
            }
            Command::Rollback {
                id: a.id("id")?,
                cascade: a.bool("cascade")?,
                replay: a.bool("replay")?,
                dry_run: a.bool("dry_run")?,
                reason,
            }
        }
        "policy.load" => {
            let files: Vec<(String, String)> = args
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("file.").map(|n| (n.to_owned(), v.clone())))
                .collect();
            for k in args.keys() {
                if !k.starts_with("file.") || k.len() == "file.".len() {
                    return Err(Args::bad(k, "policy.load takes only file.NAME arguments"));
                }
                a.used.push(k);
            }
            if files.is_empty() {
                return Err(Args::bad("file.NAME", "no policy file given"));
            }
            Command::PolicyLoad { files }
        }
        "quarantine.list" => Command::QuarantineList,
        "quarantine.release" => {
            let d = a
                .u64("domain")?
                .ok_or_else(|| Args::bad("domain", "missing"))?;
            Command::QuarantineRelease {
                domain: u32::try_from(d).map_err(|_| Args::bad("domain", "above 2^32 - 1"))?,
            }
        }
        "audit.export" => {
            let from = a.u64("from")?.unwrap_or(1).max(1);
            let to = a.u64("to")?;
            if let Some(to) = to {
                if to < from {
                    return Err(Args::bad("to", "before from"));
                }
                if to - from >= MAX_EXPORT {
                    return Err(Args::bad(
                        "to",
                        format!("at most {MAX_EXPORT} records per export"),
                    ));
                }
            }
            Command::AuditExport { from, to }
        }
        "key.rotate" => Command::KeyRotate,
        "attest" => {
            let text = a
                .get("nonce")
                .ok_or_else(|| Args::bad("nonce", "missing"))?;
            let nonce = mayfly_ledger::codec::unhex(text)
                .filter(|n| (16..=64).contains(&n.len()))
                .ok_or_else(|| Args::bad("nonce", "must be 32..=128 hex digits"))?;
            Command::Attest { nonce }
        }
        "update.install" => {
            let bundle = a
                .get("bundle")
                .ok_or_else(|| Args::bad("bundle", "missing"))?;
            // The updater checks the name again against the medium (plain, regular file);
            // here it is bounded before it reaches any record.
            if bundle.is_empty()
                || bundle.len() > 128
                || bundle.starts_with('.')
                || !bundle
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(Args::bad(
                    "bundle",
                    "must be a file name on the update medium: 1..=128 of [A-Za-z0-9._-], not starting with '.'",
                ));
            }
            let sha256 = a.digest("sha256")?;
            let tries = a.u64("tries")?.unwrap_or(3);
            if !(1..=3).contains(&tries) {
                return Err(Args::bad("tries", "must be 1..=3"));
            }
            Command::UpdateInstall(UpdateRequest {
                bundle: bundle.to_owned(),
                sha256,
                tries: u8::try_from(tries).unwrap_or(3),
            })
        }
        "update.status" => Command::UpdateStatus,
        "breakglass.open" => {
            let token_sha256 = a.digest("token_sha256")?;
            let minutes = a.u64("minutes")?.unwrap_or(15);
            if !(1..=60).contains(&minutes) {
                return Err(Args::bad("minutes", "must be 1..=60"));
            }
            Command::BreakGlassOpen {
                minutes: u32::try_from(minutes).unwrap_or(15),
                token_sha256,
            }
        }
        "promote" => {
            let epoch = a
                .u64("epoch")?
                .ok_or_else(|| Args::bad("epoch", "missing (the standby's epoch + 1)"))?;
            if epoch == 0 {
                return Err(Args::bad("epoch", "a promotion opens epoch 1 or later"));
            }
            Command::Promote { epoch }
        }
        other => return Err(CommandError::Unknown(other.to_owned())),
    };
    a.done()?;
    Ok(cmd)
}

/// Something to tell the client before the result (progress, record chunks).
pub type Emit<'a> = dyn FnMut(Value) + 'a;

fn progress(stage: &str, done: u64, total: u64) -> Value {
    json!({"type": "progress", "stage": stage, "done": done, "total": total})
}

fn resolve(services: &Services, id: RecordId) -> Result<u64, CommandError> {
    match id {
        RecordId::Seq(s) => Ok(s),
        RecordId::Tx(t) => services
            .ledger
            .store()
            .seq_of(&t)?
            .ok_or_else(|| CommandError::NotFound(format!("no committed transaction {t}"))),
    }
}

/// Runs an authorized command. `nonce` ties follow-up audit records to the command.
pub fn execute(
    services: &Services,
    cmd: &Command,
    nonce: &str,
    emit: &mut Emit<'_>,
) -> Result<Value, CommandError> {
    let ledger = &services.ledger;
    let store = ledger.store();
    match cmd {
        Command::Status => Ok(crate::status::status(services)),
        Command::List {
            tx_only,
            from,
            limit,
        } => {
            let tip = ledger.tips().checkpoints.seq;
            let from = from.unwrap_or_else(|| tip.saturating_sub(*limit as u64).saturating_add(1));
            let mut out = Vec::new();
            let mut next = from.max(1);
            // Transactions only: keep reading past rollback records, bounded by the tip.
            while out.len() < *limit && next <= tip {
                let batch = store.records(next, *limit)?;
                let Some(last) = batch.last() else { break };
                next = last.seq().saturating_add(1);
                for r in &batch {
                    if *tx_only && matches!(r, Record::Rollback(_)) {
                        continue;
                    }
                    if out.len() < *limit {
                        out.push(view::record(r, false));
                    }
                }
            }
            Ok(json!({"records": out, "tip": tip}))
        }
        Command::Show { id } => {
            let seq = resolve(services, *id)?;
            let r = store
                .record(seq)?
                .ok_or_else(|| CommandError::NotFound(format!("no commit {seq}")))?;
            let mut shown = view::record(&r, true);
            // A transaction a rollback undid says so, and which record undid it.
            if let (Record::Transaction(_), Some(by)) = (&r, store.undone_by(seq)?) {
                shown["rolled_back_by"] = json!(by);
            }
            Ok(shown)
        }
        Command::Verify => {
            let mut last = Instant::now();
            let started = Instant::now();
            let trusted = [ledger.public_key()];
            let report = mayfly_ledger::verify(store, &trusted, &mut |p| {
                if p.done >= p.total || last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    emit(progress(p.chain, p.done, p.total));
                }
            })?;
            Ok(json!({
                "ok": report.ok(),
                "checkpoints": report.checkpoints,
                "audit": report.audit,
                "heads": report.heads,
                "rotations": report.rotations,
                "trusted_key": hex(&trusted[0]),
                "signing_key": hex(&ledger.signing_key()),
                "elapsed_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "failures": report.failures.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }))
        }
        Command::Rollback {
            id,
            cascade,
            replay,
            dry_run,
            reason,
        } => {
            let root = resolve(services, *id)?;
            let why = format!("admin console (nonce {nonce}): {reason}");
            let done = services.incidents.rollback(&RollbackOrder {
                root,
                cascade: *cascade,
                replay: *replay,
                dry_run: *dry_run,
                why: &why,
                // Admins decided it, not a policy bundle: the record's policy hash is zeros
                // (formats.md §1.6), which is how a reader tells a manual rollback apart.
                policy_hash: [0u8; 32],
            })?;
            let replayed: Vec<Value> = done
                .replayed?
                .into_iter()
                .map(|r| {
                    let (status, seq, error) = match &r.outcome {
                        Ok(o) => (o.status.as_str().to_owned(), o.seq, o.error.clone()),
                        Err(e) => ("failed".to_owned(), None, Some(e.clone())),
                    };
                    json!({"original_seq": r.original_seq, "status": status, "seq": seq,
                           "same_result": r.same_result, "error": error})
                })
                .collect();
            let plan = done.plan;
            Ok(json!({
                "dry_run": dry_run,
                "roots": plan.roots,
                "affected": plan.affected,
                "replay": plan.replay,
                "restored": view::write_set(&plan.writes),
                "rollback_seq": done.rollback_seq,
                "replayed": replayed,
            }))
        }
        Command::PolicyLoad { files } => {
            let hash = services
                .policy
                .load_policy(files)
                .map_err(|reason| CommandError::PolicyRefused { reason })?;
            Ok(
                json!({"policy_hash": hex(&hash), "files": files.iter().map(|(n, _)| n).collect::<Vec<_>>()}),
            )
        }
        Command::QuarantineList => {
            let list: Vec<Value> = services
                .backend
                .quarantined()
                .into_iter()
                .map(|d| json!({"domain": d.id, "backend": d.backend, "handle": d.handle}))
                .collect();
            Ok(json!({"quarantined": list}))
        }
        Command::QuarantineRelease { domain } => {
            let exit = services
                .backend
                .release_quarantined(*domain)?
                .ok_or_else(|| CommandError::NotFound(format!("no quarantined domain {domain}")))?;
            // `domain` here is the backend's id (as `quarantine.list` shows it); the
            // `domain.quarantined` record names it `backend_id` beside the ledger's number.
            ledger.audit(vec![AuditEvent::new("domain.released", Severity::Notice)
                .field("backend_id", domain)
                .field("exit", exit.to_string())
                .field("nonce", nonce)])?;
            Ok(json!({"domain": domain, "released": true, "exit": exit.to_string()}))
        }
        Command::AuditExport { from, to } => {
            let tip = ledger.tips().audit.seq;
            let to = to
                .unwrap_or(tip)
                .min(tip)
                .min(from.saturating_add(MAX_EXPORT - 1));
            let total = if to >= *from { to - *from + 1 } else { 0 };
            let mut next = *from;
            let mut exported: u64 = 0;
            let mut last = Instant::now();
            emit(progress("audit", 0, total));
            while next <= to {
                let batch = store.audit_records(next, EXPORT_CHUNK)?;
                if batch.is_empty() {
                    break;
                }
                let mut chunk = Vec::with_capacity(batch.len());
                let mut chunk_bytes = 0usize;
                let mut sent_any = false;
                for r in batch.iter().take_while(|r| r.seq <= to) {
                    let hash = chain_hash(&r.prev_hash, &r.encode());
                    let record = json!({
                        "seq": r.seq,
                        "time_ns": r.time_ns,
                        "severity": r.event.severity as u8,
                        "event": r.event.event,
                        "fields": r.event.fields,
                        "prev_hash": hex(&r.prev_hash),
                        "hash": hex(&hash),
                    });
                    chunk_bytes = chunk_bytes.saturating_add(record.to_string().len());
                    chunk.push(record);
                    next = r.seq.saturating_add(1);
                    if chunk_bytes >= EXPORT_FRAME_BYTES {
                        exported = exported.saturating_add(chunk.len() as u64);
                        emit(json!({"type": "records", "records": std::mem::take(&mut chunk)}));
                        chunk_bytes = 0;
                        sent_any = true;
                    }
                }
                if chunk.is_empty() && !sent_any {
                    break;
                }
                exported = exported.saturating_add(chunk.len() as u64);
                if !chunk.is_empty() {
                    emit(json!({"type": "records", "records": chunk}));
                }
                if last.elapsed() >= PROGRESS_EVERY || next > to {
                    last = Instant::now();
                    emit(progress("audit", exported, total));
                }
            }
            Ok(json!({"from": from, "to": to, "exported": exported}))
        }
        Command::Attest { nonce } => {
            let attestor = services.attestor.as_ref().ok_or_else(|| {
                CommandError::NotFound(
                    "no TPM is configured (the key source is not \"tpm\")".into(),
                )
            })?;
            let head = store.last_heads(1)?.into_iter().next().ok_or_else(|| {
                CommandError::NotFound("the ledger has no signed head yet".into())
            })?;
            let bytes = head.encode();
            let qualifying = mayfly_tpm::quote::qualifying_data(&bytes, nonce);
            let quote = attestor.quote(&qualifying).map_err(CommandError::Attest)?;
            Ok(
                json!({"head": hex(&bytes), "head_group": head.group, "nonce": hex(nonce),
                      "quote": quote}),
            )
        }
        Command::BreakGlassOpen {
            minutes,
            token_sha256,
        } => {
            let bg = services.breakglass.as_ref().ok_or_else(|| {
                CommandError::BreakGlass(
                    "no break-glass console is configured ([breakglass] tty)".into(),
                )
            })?;
            let opened = bg
                .open(*minutes, *token_sha256, nonce)
                .map_err(CommandError::BreakGlass)?;
            ledger.audit(vec![AuditEvent::new("breakglass.opened", Severity::Alert)
                .field("nonce", nonce)
                .field("minutes", *minutes)
                .field("tty", opened["tty"].as_str().unwrap_or_default())])?;
            Ok(opened)
        }
        Command::UpdateStatus => services
            .updater
            .as_ref()
            .ok_or(CommandError::NoUpdater)?
            .status()
            .map_err(CommandError::Update),
        Command::UpdateInstall(req) => {
            let updater = services.updater.as_ref().ok_or(CommandError::NoUpdater)?;
            let outcome = updater.install(req);
            // The outcome is in the signed chain (and so at the SIEM) before the operator
            // hears of it, whatever it is.
            let base = |name: &str, severity: Severity| {
                AuditEvent::new(name, severity)
                    .field("nonce", nonce)
                    .field("bundle", &req.bundle)
                    .field("sha256", hex(&req.sha256))
            };
            let event = match &outcome {
                Ok(r) => base("update.installed", Severity::Notice)
                    .field("slot", r["slot"].as_str().unwrap_or_default())
                    .field("version", r["version"].as_u64().unwrap_or_default())
                    .field("tries", r["tries"].as_u64().unwrap_or_default()),
                Err(f) => base(
                    if f.refused {
                        "update.refused"
                    } else {
                        "update.failed"
                    },
                    if f.refused {
                        Severity::Warning
                    } else {
                        Severity::Error
                    },
                )
                .field("reason", f.code)
                .field("error", f.message.chars().take(1000).collect::<String>()),
            };
            ledger.audit(vec![event])?;
            outcome.map_err(CommandError::Update)
        }
        Command::Promote { .. } => Err(CommandError::NotAStandby {
            epoch: ledger.tips().epoch,
        }),
        Command::KeyRotate => {
            let old = ledger.signing_key();
            let (new, receipt) = ledger.rotate_key(vec![AuditEvent::new(
                "admin.key_rotation",
                Severity::Notice,
            )
            .field("nonce", nonce)])?;
            Ok(
                json!({"old_key": hex(&old), "new_key": hex(&new), "group": receipt.group,
                      "identity_key": hex(&ledger.public_key())}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn attest_takes_a_bounded_hex_nonce() {
        let n = "ab".repeat(32);
        assert_eq!(
            parse("attest", &args(&[("nonce", &n)])).unwrap(),
            Command::Attest {
                nonce: vec![0xab; 32]
            }
        );
        for bad in [
            "",
            "abc",
            &"ab".repeat(15),
            &"ab".repeat(65),
            &"zz".repeat(16),
        ] {
            assert!(
                parse("attest", &args(&[("nonce", bad)])).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(parse("attest", &args(&[])).is_err());
        assert!(!is_destructive(&Command::Attest { nonce: vec![0; 16] }));
    }

    #[test]
    fn update_install_names_a_plain_bundle_and_its_digest_and_needs_the_quorum() {
        let d = "ab".repeat(32);
        let cmd = parse(
            "update.install",
            &args(&[
                ("bundle", "mayfly-v2.bundle"),
                ("sha256", &d),
                ("tries", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cmd,
            Command::UpdateInstall(UpdateRequest {
                bundle: "mayfly-v2.bundle".into(),
                sha256: [0xab; 32],
                tries: 2
            })
        );
        assert!(is_destructive(&cmd));
        let Command::UpdateInstall(r) =
            parse("update.install", &args(&[("bundle", "b"), ("sha256", &d)])).unwrap()
        else {
            panic!("not an install")
        };
        assert_eq!(r.tries, 3, "three trial boots unless said otherwise");
        for bad in [
            args(&[("sha256", &d)]),
            args(&[("bundle", "b")]),
            args(&[("bundle", "../etc/shadow"), ("sha256", &d)]),
            args(&[("bundle", "/dev/sda"), ("sha256", &d)]),
            args(&[("bundle", ".b"), ("sha256", &d)]),
            args(&[("bundle", &"b".repeat(129)), ("sha256", &d)]),
            args(&[("bundle", "b"), ("sha256", "ab")]),
            args(&[("bundle", "b"), ("sha256", &d), ("tries", "4")]),
            args(&[("bundle", "b"), ("sha256", &d), ("tries", "0")]),
            args(&[("bundle", "b"), ("sha256", &d), ("slot", "a")]),
        ] {
            assert!(parse("update.install", &bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse("update.status", &args(&[])).unwrap(),
            Command::UpdateStatus
        );
        assert!(!is_destructive(&Command::UpdateStatus));
    }

    #[test]
    fn breakglass_open_takes_a_token_digest_and_a_bounded_window_and_needs_the_quorum() {
        let d = "cd".repeat(32);
        let cmd = parse(
            "breakglass.open",
            &args(&[("token_sha256", &d), ("minutes", "5")]),
        )
        .unwrap();
        assert_eq!(
            cmd,
            Command::BreakGlassOpen {
                minutes: 5,
                token_sha256: [0xcd; 32]
            }
        );
        assert!(is_destructive(&cmd));
        for bad in [
            args(&[]),
            args(&[("token_sha256", "cd")]),
            args(&[("token_sha256", &d), ("minutes", "0")]),
            args(&[("token_sha256", &d), ("minutes", "61")]),
            args(&[("token_sha256", &d), ("token", "plain")]),
        ] {
            assert!(parse("breakglass.open", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn promote_needs_the_quorum_and_a_positive_epoch() {
        let p = parse("promote", &args(&[("epoch", "2")])).unwrap();
        assert_eq!(p, Command::Promote { epoch: 2 });
        assert!(is_destructive(&p));
        for bad in [
            args(&[]),
            args(&[("epoch", "0")]),
            args(&[("epoch", "x")]),
            args(&[("epoch", "1"), ("force", "true")]),
        ] {
            assert!(parse("promote", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arguments_are_checked_and_typos_refused() {
        assert_eq!(parse("status", &args(&[])).unwrap(), Command::Status);
        assert!(matches!(
            parse("status", &args(&[("verbose", "1")])),
            Err(CommandError::BadArgument { .. })
        ));
        let rb = parse("rollback", &args(&[("id", "3"), ("cascade", "true")])).unwrap();
        assert!(is_destructive(&rb));
        let dry = parse("rollback", &args(&[("id", "3"), ("dry_run", "true")])).unwrap();
        assert!(!is_destructive(&dry));
        for bad in [
            args(&[("id", "0")]),
            args(&[("id", "x")]),
            args(&[]),
            args(&[("id", "3"), ("cascade", "yes")]),
        ] {
            assert!(parse("rollback", &bad).is_err(), "{bad:?}");
        }
        assert!(parse("rm", &args(&[])).is_err());
        assert!(parse("tx.list", &args(&[("limit", "1001")])).is_err());
        assert!(parse("policy.load", &args(&[])).is_err());
        assert!(parse("policy.load", &args(&[("x", "1")])).is_err());
        assert_eq!(
            parse("policy.load", &args(&[("file.a.toml", "x=1")])).unwrap(),
            Command::PolicyLoad {
                files: vec![("a.toml".into(), "x=1".into())]
            }
        );
        assert!(parse("audit.export", &args(&[("from", "5"), ("to", "4")])).is_err());
        assert!(parse("quarantine.release", &args(&[("domain", "4294967296")])).is_err());
    }
}
