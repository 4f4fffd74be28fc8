//! Opening a ledger: the top of the crate, which orchestrates every layer below it —
//! the store, the signing key, the `undone` and idempotency indexes, the live-state check,
//! the first (audited) group commit, and the committer thread.
//!
//! Nothing in the crate uses this module; it uses any of them.

use std::path::Path;
use std::sync::{Arc, Mutex};

use slog::{error, info, o, warn, Logger};

use crate::audit::{AuditEvent, Severity};
use crate::capacity;
use crate::codec;
use crate::commit_error::CommitError;
use crate::domains;
use crate::group::Committer;
use crate::group_stats;
use crate::job::{Job, Tips};
use crate::keys::{KeyError, KeyStore, PublicKey, SigningKey};
use crate::ledger::{Inner, Ledger, Options};
use crate::state::{self, StateDigest};
use crate::store::{self, OpenError, Store};

impl Ledger {
    /// Opens the ledger in `dir`, creating it and its signing key on first start when
    /// `opts.create` is set. Appends a durable `ledger.opened` (or `ledger.created`) audit
    /// event before returning.
    pub fn open(dir: &Path, opts: &Options, log: &Logger) -> Result<Self, OpenError> {
        let log = log.new(o!("component" => "ledger"));
        let (mut store, fresh) = match store::Store::open(dir, &opts.store, opts.create)? {
            store::Opened::Created(s) => (s, true),
            store::Opened::Existing(s) => {
                let fresh = opts.create && s.meta_is_empty()?;
                (s, fresh)
            }
        };
        let keys = opts.keys.clone();
        // The key first: a start that cannot sign writes nothing to the ledger. A key its
        // source will not release (a sealed key on another boot chain or TPM) leaves a
        // marker that the next start which can sign audits.
        let loaded = if fresh {
            match keys.load(dir) {
                Ok(k) => Ok((k, None)),
                Err(KeyError::Missing { .. }) => keys
                    .generate(dir)
                    .map(|k| (k, None))
                    .map_err(OpenError::from),
                Err(e) => Err(e.into()),
            }
        } else {
            store.load_meta(true).and_then(|state| {
                Self::current_key(&*keys, dir, &state.signing_key).map(|k| (k, Some(state)))
            })
        };
        let (key, state) = match loaded {
            Ok(loaded) => loaded,
            Err(OpenError::Key(e)) if e.is_unavailable() => {
                error!(log, "the signing key cannot be used: refusing to sign"; "error" => %e);
                key_marker::put(dir, &e.to_string());
                return Err(OpenError::Key(e));
            }
            Err(e) => return Err(e),
        };
        // The rolled-back index is unsigned: it is rebuilt from the signed rollback records
        // at every read-write open (a new ledger has it from its creation, and is marked
        // complete after its first commit below).
        let undone_built = if fresh {
            None
        } else {
            Some(store.ensure_undone_index()?)
        };
        store.ensure_idempotency_db()?;
        let public_key = state
            .as_ref()
            .map_or_else(|| key.public_key(), |s| s.public_key);
        let shared_signing_key = Arc::new(Mutex::new(key.public_key()));
        let tips = state.as_ref().map_or_else(Tips::default, |s| Tips {
            checkpoints: s.checkpoints,
            audit: s.audit,
            group: s.group,
            epoch: s.epoch,
        });
        let shared_tips = Arc::new(Mutex::new(tips));
        let (digest, check, mut events) = Self::open_state(
            &store,
            state.and_then(|s| s.state),
            fresh,
            opts.check_state,
            &log,
        )?;
        if !opts.state_digest && check.outcome != "new" && check.outcome != "created" {
            return Err(OpenError::DigestRequired {
                path: dir.to_path_buf(),
            });
        }
        let (state_entries, state_hash) = (digest.entries(), digest.hash());
        let shared_capacity = Arc::new(Mutex::new(capacity::Shared::default()));
        let observer = Arc::new(std::sync::OnceLock::new());
        let group_stats = Arc::new(group_stats::GroupCounters::default());
        let mut committer = Committer {
            store: store.clone(),
            key,
            keys: keys.clone(),
            checkpoints: tips.checkpoints,
            audit: tips.audit,
            group: tips.group,
            epoch: tips.epoch,
            idempotency: opts.idempotency,
            observer: observer.clone(),
            observed: tips.group,
            state: digest,
            maintain_state: opts.state_digest,
            max_map_size: opts.store.max_map_size.max(opts.store.map_size),
            capacity: shared_capacity.clone(),
            pending: Vec::new(),
            max_group: opts.max_group.max(1),
            track_dependencies: opts.track_dependencies,
            shared_tips: shared_tips.clone(),
            shared_signing_key: shared_signing_key.clone(),
            group_stats: group_stats.clone(),
            log: log.clone(),
        };
        let event = if fresh {
            AuditEvent::new("ledger.created", Severity::Notice)
        } else {
            AuditEvent::new("ledger.opened", Severity::Info)
        }
        .field("public_key", codec::hex(&public_key))
        .field("key_source", keys.source())
        .field("checkpoint_seq", tips.checkpoints.seq)
        .field("state_check", check.outcome)
        .field("state_entries", state_entries)
        .field("state_check_ms", check.ms)
        .field("state_hash", codec::hex(&state_hash));
        let event = match &undone_built {
            Some(built) if built.unreadable > 0 => event
                .field("undone_index_built_from", built.rollbacks)
                .field("undone_index_unreadable", built.unreadable),
            Some(built) => event.field("undone_index_built_from", built.rollbacks),
            None => event,
        };
        events.insert(0, event);
        if let Some(built) = &undone_built {
            if let Some(first) = &built.first_repaired {
                warn!(log, "the stored undone index differed from the rollback records; rebuilt";
                      "entries" => built.repaired, "first" => %first);
                events.push(
                    AuditEvent::new("ledger.undone_index_repaired", Severity::Warning)
                        .field("entries", built.repaired)
                        .field("first_seq", first.seq)
                        .field("first", first.to_string()),
                );
            }
        }
        let key_refused_before = key_marker::take(dir);
        if let Some(detail) = &key_refused_before {
            warn!(log, "an earlier start could not use the signing key"; "detail" => detail);
            events.push(
                AuditEvent::new("key.unavailable_earlier", Severity::Critical)
                    .field("key_source", keys.source())
                    .field("detail", detail),
            );
        }
        let refused_before = state_marker::take(dir);
        if let Some(detail) = &refused_before {
            events.push(
                AuditEvent::new("ledger.state_refused_earlier", Severity::Critical)
                    .field("detail", detail),
            );
        }
        let first = committer
            .write_group(vec![Job::Audit(events.clone())], fresh)
            .and_then(|mut results| results.pop().unwrap_or(Err(CommitError::Closed)));
        match first {
            Ok(_) => {}
            // A full disk (or a map at its bound) must not keep the agent from starting:
            // it serves reads and refuses transactions until space returns; the start is
            // recorded then.
            Err(source @ (CommitError::DiskFull { .. } | CommitError::MapFull { .. }))
                if !fresh =>
            {
                warn!(log, "ledger opened on full storage: read-only until space returns"; "error" => %source);
                // A refusal noted by an earlier start stays in its marker until a start
                // can record it (this process may not live until space returns).
                if let Some(detail) = &refused_before {
                    state_marker::put_back(dir, detail);
                }
                if let Some(detail) = &key_refused_before {
                    key_marker::put(dir, detail);
                }
                events.retain(|e| {
                    e.event != "ledger.state_refused_earlier"
                        && e.event != "key.unavailable_earlier"
                });
                committer.pending = events;
                committer.after_open_failure(&source);
            }
            Err(source) => {
                if let Some(detail) = refused_before {
                    state_marker::put_back(dir, &detail);
                }
                if let Some(detail) = key_refused_before {
                    key_marker::put(dir, &detail);
                }
                return Err(OpenError::FirstCommit {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
        if fresh {
            // After the first commit: a start that stops before it leaves no meta behind.
            store.mark_undone_index()?;
        }
        info!(log, "ledger open"; "dir" => %dir.display(), "created" => fresh,
              "checkpoint_seq" => tips.checkpoints.seq, "public_key" => codec::hex(&public_key));

        let (sender, rx) = std::sync::mpsc::sync_channel(opts.queue_depth.max(1));
        let handle = std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(OpenError::Thread)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                sender: Some(sender),
                committer: Some(handle),
                tips: shared_tips,
                public_key,
                signing_key: shared_signing_key,
                domains: domains::DomainNumbers::new(),
                capacity: shared_capacity,
                max_map: u64::try_from(opts.store.max_map_size.max(opts.store.map_size))
                    .unwrap_or(u64::MAX),
                group_stats,
                keys,
                observer,
                snapshot_hold: opts.snapshot_hold,
            }),
        })
    }

    /// The live-state digest the committer starts from, and the audit events that say how
    /// it was obtained. A ledger from before the digest existed gets it computed once; an
    /// existing one is recomputed from `data` and compared (unless `check` is off), and a
    /// mismatch is refused with the keys that differ from the checkpoint chain (and a marker
    /// file, audited at the next start that succeeds).
    fn open_state(
        store: &Store,
        recorded: Option<StateDigest>,
        fresh: bool,
        check: bool,
        log: &Logger,
    ) -> Result<(StateDigest, StateCheck, Vec<AuditEvent>), OpenError> {
        let scan = || -> Result<(StateDigest, u64), OpenError> {
            let started = std::time::Instant::now();
            let rtxn = store.read_txn().map_err(|e| store.storage_err(e))?;
            let d =
                StateDigest::compute(&rtxn, store.dbs.data).map_err(|e| store.storage_err(e))?;
            Ok((
                d,
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ))
        };
        match recorded {
            _ if fresh => {
                let (d, ms) = scan()?;
                Ok((d, StateCheck { outcome: "new", ms }, Vec::new()))
            }
            None => {
                let (d, ms) = scan()?;
                info!(log, "ledger from before the live-state digest: computed its first digest";
                      "entries" => d.entries(), "ms" => ms);
                Ok((
                    d,
                    StateCheck {
                        outcome: "created",
                        ms,
                    },
                    Vec::new(),
                ))
            }
            Some(recorded) if !check => {
                warn!(log, "LIVE-STATE CHECK SKIPPED (--skip-state-check): the data served has not been checked against the signed state digest";
                      "entries" => recorded.entries());
                let ev = AuditEvent::new("ledger.state_check_skipped", Severity::Warning)
                    .field("entries", recorded.entries());
                Ok((
                    recorded,
                    StateCheck {
                        outcome: "skipped",
                        ms: 0,
                    },
                    vec![ev],
                ))
            }
            Some(recorded) => {
                let (found, ms) = scan()?;
                if found == recorded {
                    info!(log, "live state matches the signed digest"; "entries" => found.entries(), "ms" => ms);
                    return Ok((recorded, StateCheck { outcome: "ok", ms }, Vec::new()));
                }
                let rtxn = store.read_txn().map_err(|e| store.storage_err(e))?;
                let diff = state::diff_against_chain(&rtxn, store.dbs.checkpoints, store.dbs.data)
                    .map_err(|e| store.storage_err(e))?;
                let detail = diff.describe();
                error!(log, "the live data does not match the signed state digest: refusing to serve it";
                       "detail" => &detail, "found_entries" => found.entries(), "expected_entries" => recorded.entries());
                state_marker::put(store.dir(), &detail);
                Err(OpenError::StateMismatch {
                    path: store.dir().to_path_buf(),
                    found: found.entries(),
                    expected: recorded.entries(),
                    detail,
                })
            }
        }
    }

    /// The key in `signing.key` if it is the one the ledger says signs (`expected`). A key
    /// rotation that committed but stopped before installing the new key file is finished
    /// here; a `signing.key.next` left by one that never committed is discarded.
    fn current_key(
        keys: &dyn KeyStore,
        dir: &Path,
        expected: &PublicKey,
    ) -> Result<SigningKey, OpenError> {
        let key = keys.load(dir)?;
        if key.public_key() == *expected {
            keys.discard_next(dir)?;
            return Ok(key);
        }
        if let Ok(next) = keys.load_next(dir) {
            if next.public_key() == *expected {
                keys.install_next(dir)?;
                return Ok(next);
            }
        }
        Err(OpenError::KeyMismatch {
            path: dir.to_path_buf(),
            found: codec::hex(&key.public_key()),
            expected: codec::hex(expected),
        })
    }
}

/// How the live state was checked at open (fields of `ledger.opened`).
struct StateCheck {
    /// `new`, `created` (first digest of an older ledger), `ok` or `skipped`.
    outcome: &'static str,
    /// Time the scan took.
    ms: u64,
}

/// The marker a refused start leaves, so that the next start that succeeds audits it.
/// The marker of a start refused because the key source would not release the key (a
/// sealed key on another boot chain): audited as `key.unavailable_earlier` by the next start
/// that can sign.
mod key_marker {
    use std::path::Path;

    /// File name in the data directory.
    pub const FILE: &str = "key-unavailable.refused";

    /// Adds a refusal to the marker (best effort: the refusal itself is the error
    /// returned). Several refused starts before a good one are all kept (newest last), up
    /// to the marker's bound.
    pub fn put(dir: &Path, detail: &str) {
        let detail = match take(dir) {
            Some(earlier) if !earlier.is_empty() => {
                // The marker is bounded from the front: keep the newest refusals whole.
                let n = earlier.chars().count();
                let kept: String = earlier.chars().skip(n.saturating_sub(500)).collect();
                format!("{kept} | {detail}")
            }
            _ => detail.to_owned(),
        };
        super::state_marker::put_named(dir, FILE, &detail);
    }

    /// Takes the marker if there is one.
    pub fn take(dir: &Path) -> Option<String> {
        super::state_marker::take_named(dir, FILE)
    }
}

mod state_marker {
    use std::path::Path;

    /// File name in the data directory.
    pub const FILE: &str = "state-mismatch.refused";
    /// Most bytes kept (an audit field value).
    const MAX: usize = 4000;

    fn bounded(detail: &str) -> String {
        detail.chars().take(MAX / 4).collect()
    }

    /// Leaves the marker (best effort: the refusal itself is the error returned).
    pub fn put(dir: &Path, detail: &str) {
        put_named(dir, FILE, detail);
    }

    /// Leaves the marker `name`, durably: written to `<name>.tmp`, fsynced, renamed, and the
    /// directory fsynced. A refused start is often followed by a power cut (an operator
    /// pulling a machine that will not serve); an unsynced marker then came back as a file
    /// of NUL bytes and the next good start audited an empty detail.
    pub fn put_named(dir: &Path, name: &str, detail: &str) {
        use std::io::Write;
        let tmp = dir.join(format!("{name}.tmp"));
        let _ = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bounded(detail).as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, dir.join(name))?;
            std::fs::File::open(dir)?.sync_all()
        })();
    }

    /// Restores a marker taken by a start that then failed.
    pub fn put_back(dir: &Path, detail: &str) {
        put(dir, detail);
    }

    /// Takes the marker if there is one: its text, bounded (the file is as hostile as
    /// anything else in the data directory).
    pub fn take(dir: &Path) -> Option<String> {
        take_named(dir, FILE)
    }

    /// Takes the marker `name` if there is one, bounded.
    pub fn take_named(dir: &Path, name: &str) -> Option<String> {
        use std::io::Read;
        let path = dir.join(name);
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .ok()?
            .take(MAX as u64)
            .read_to_end(&mut buf)
            .ok()?;
        let _ = std::fs::remove_file(&path);
        let text: String = String::from_utf8_lossy(&buf)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Some(bounded(&text))
    }
}
