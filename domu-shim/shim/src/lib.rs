//! `domu-shim`: Mayfly's guest runtime, the same code on every backend.
//!
//! One process (or one domain's `/init`) runs exactly one transaction and exits:
//!
//! ```text
//!  guest (this crate)                                   agent
//!  Frontend::attach(mem)         validate the ring header
//!  Ready { protocol_version } ─────────────────────▶   (domain now pooled, paused or
//!                                  no timeout: the       waiting; the agent destroys
//!                                  agent kills unused    pooled domains it no longer
//!                                  domains               needs)
//!        ◀──────────────────────────────────────────   Start { tx_id, handler, payload,
//!                                                              entropy_seed }
//!  seed HandlerRng from entropy_seed; look up handler (unknown: Abort)
//!  handler(ctx, payload)
//!    Get / Put / Delete / Scan / Log ──────────────▶   policy check, ledger
//!        ◀──────────────────────────────── Value / Ok / ScanResult / Error{code,message}
//!    (Put / Delete / Log do not wait: their answers
//!     are collected before the next Get / Scan)
//!  collect the answers still outstanding
//!  Ok(result), no write failed:
//!               Commit { result } ─────────────────▶   validate, commit
//!        ◀────────────────────────────────────────── Committed (or Aborted: refused)
//!  Err(e), or a write failed, or a panic:
//!               Abort { reason } ──────────────────▶
//!        ◀────────────────────────────────────────── Aborted
//!  exit 0
//! ```
//!
//! Writes are pipelined ([`ringdb`]): a write's error reaches the handler at its next
//! `get`/`scan` (and every later operation), and once a write has failed the transaction
//! can no longer commit. When the handler returns, the runtime collects every outstanding
//! answer before it sends `Commit` or `Abort`; if a write failed, it sends `Abort` even if
//! the handler returned `Ok`, with the reason the write's error would have given had the
//! handler propagated it with `?` (a handler's own `Err` stays the reason when it returns
//! one).
//!
//! Each database call's answers are awaited at most [`Config::db_timeout`] (a batch's:
//! until its last answer), and the final
//! `Commit`/`Abort` at most [`Config::finish_timeout`]. A handler panic is caught
//! (`catch_unwind`) and aborts the transaction with the reason `"handler panicked"`, so the
//! agent is never left waiting. **In release builds** the workspace sets `panic = "abort"`:
//! a handler panic then kills the process (`SIGABRT`) before anything is sent, and the agent
//! sees the domain crash (a `PeerGone` wake-up or its timeout) instead of an `Abort`.
//!
//! # Exit status
//!
//! [`run`] returns the process exit status (constants in [`exit`]):
//!
//! | status | constant                    | meaning |
//! |-------:|-----------------------------|---------|
//! | 0      | [`exit::OK`]                | the transaction ended: committed, aborted, or commit refused by the agent |
//! | 10     | [`exit::ATTACH`]            | the ring header is invalid, or the ring is not idle |
//! | 11     | [`exit::HANDSHAKE`]         | sending `Ready` or receiving its answer failed |
//! | 12     | [`exit::NOT_START`]         | the answer to `Ready` was not `Start` |
//! | 13     | [`exit::DATABASE`]          | a database call's ring exchange failed (timeout, protocol violation, peer gone); nothing more was sent |
//! | 14     | [`exit::FINISH`]            | sending `Commit`/`Abort` or receiving its answer failed |
//! | 15     | [`exit::BAD_FINISH_REPLY`]  | the answer to `Commit` was not `Committed`/`Aborted`, or to `Abort` not `Aborted` |
//! | 16     | [`exit::SABOTAGED`]         | (test handlers only) a `test.*` handler broke the ring and the wait for destruction ended |
//!
//! The `domu-shim` binary adds 2 ([`exit::USAGE`]: bad command line) and 3
//! ([`exit::SETUP`]: an fd could not be claimed or mapped). A caught handler panic is 0 (the
//! transaction was aborted); an uncaught one (release builds) is death by `SIGABRT`.
//!
//! # Features
//!
//! `test-handlers` (off by default) compiles in the hostile `test.*` handlers of
//! [`test_handlers`], with raw ring access, for the agent's isolation tests. When compiled
//! in, they are enabled by default ([`Config::test_handlers`]); the example registry's
//! handlers take precedence over them.
//!
//! `std` (default) is the process runtime: the binary, the Linux guest's Xen and xenstore
//! set-up, stderr, and `catch_unwind` around handlers. Without it the transaction loop
//! ([`try_run`]) is `no_std` + `alloc` and runs in the Mayfly PV guest kernel
//! (`domu-shim/pv-guest`); there a handler panic always crashes the domain (the kernel's
//! panic handler shuts it down as crashed), as in release builds everywhere.

#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod ringdb;
#[cfg(feature = "test-handlers")]
pub mod test_handlers;
#[cfg(all(feature = "std", target_os = "linux"))]
pub mod xen;
#[cfg(all(feature = "std", target_os = "linux"))]
pub mod xenstore;

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::time::Duration;
#[cfg(feature = "std")]
use std::io::Write;
#[cfg(feature = "std")]
use std::panic::{self, AssertUnwindSafe};

use mayfly_ring::wire::{Start, PROTOCOL_VERSION};
use mayfly_ring::{Frontend, Notifier, Request, Response, RingError, SharedMem};
use mayfly_sdk::limits::{sanitize_text, MAX_REASON_LEN, MAX_RESULT_LEN};
use mayfly_sdk::{Ctx, Handler, HandlerError, Registry};

pub use ringdb::RingDb;

/// The hostile `test.*` handlers of the Mayfly PV guest kernel's test build
/// (`domu-shim/pv-guest`, feature `test-handlers`, which registers exactly these in its
/// registry, so its `Ready` announces them to the agent). Never present in a production
/// guest.
pub const PV_GUEST_TEST_HANDLERS: [&str; 4] = [
    "test.spin",
    "test.evtchn_flood",
    "test.foreign_ops",
    "test.bad_ring",
];

/// Exit statuses of [`run`] and of the `domu-shim` binary. See the [crate docs](crate).
pub mod exit {
    /// The transaction ended (committed, aborted, or commit refused).
    pub const OK: i32 = 0;
    /// Bad command line (binary only).
    pub const USAGE: i32 = 2;
    /// An inherited fd could not be claimed, mapped or used (binary only).
    pub const SETUP: i32 = 3;
    /// The ring header is invalid, or the ring is not idle.
    pub const ATTACH: i32 = 10;
    /// Sending `Ready` or receiving its answer failed.
    pub const HANDSHAKE: i32 = 11;
    /// The answer to `Ready` was not `Start`.
    pub const NOT_START: i32 = 12;
    /// A database call's ring exchange failed.
    pub const DATABASE: i32 = 13;
    /// Sending `Commit`/`Abort` or receiving its answer failed.
    pub const FINISH: i32 = 14;
    /// The answer to `Commit`/`Abort` was of the wrong kind.
    pub const BAD_FINISH_REPLY: i32 = 15;
    /// A test handler broke the ring on purpose and the wait for destruction ended.
    pub const SABOTAGED: i32 = 16;
}

/// Tunables of [`run_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// How long the guest waits for the answers to one database call (default 30 s): one
    /// request's, or a batch's (a `get_many` chunk, the pipelined writes being collected),
    /// whose last answer must arrive in that time.
    pub db_timeout: Duration,
    /// How long `Commit`/`Abort` waits for the agent's answer (default 60 s: a commit waits
    /// for a group fsync).
    pub finish_timeout: Duration,
    /// Whether the `test.*` handlers are looked up (after the registry). Default: true.
    #[cfg(feature = "test-handlers")]
    pub test_handlers: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            db_timeout: Duration::from_secs(30),
            finish_timeout: Duration::from_secs(60),
            #[cfg(feature = "test-handlers")]
            test_handlers: true,
        }
    }
}

impl Config {
    /// The default configuration with other timeouts.
    pub fn with_timeouts(db_timeout: Duration, finish_timeout: Duration) -> Self {
        Self {
            db_timeout,
            finish_timeout,
            ..Self::default()
        }
    }
}

/// How a transaction ended, from the guest's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded and the agent committed.
    Committed,
    /// The handler succeeded but the agent refused the commit (answered `Aborted`, e.g. a
    /// read-set conflict).
    CommitRefused,
    /// The transaction was aborted with this reason (handler error, unknown handler,
    /// panic, oversized result), and the agent acknowledged it.
    Aborted {
        /// The reason sent.
        reason: String,
    },
}

/// The transaction could not be carried to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `Frontend::attach` refused the ring.
    #[error("attaching to the ring failed")]
    Attach(#[source] RingError),
    /// Sending `Ready` or receiving its answer failed.
    #[error("Ready/Start handshake failed")]
    Handshake(#[source] RingError),
    /// The answer to `Ready` was not `Start`.
    #[error("the agent answered Ready with {reply}, not Start")]
    NotStart {
        /// The kind of answer received.
        reply: &'static str,
    },
    /// A database call's ring exchange failed while handler `handler` ran.
    #[error("handler {handler:?}: a database call failed on the ring")]
    Database {
        /// The handler.
        handler: String,
        /// The ring failure.
        #[source]
        source: RingError,
    },
    /// Sending `Commit`/`Abort` or receiving its answer failed.
    #[error("sending {sent} or receiving its answer failed")]
    Finish {
        /// `"Commit"` or `"Abort"`.
        sent: &'static str,
        /// The ring failure.
        #[source]
        source: RingError,
    },
    /// The answer to `Commit`/`Abort` was of the wrong kind.
    #[error("the agent answered {sent} with {reply}")]
    BadFinishReply {
        /// `"Commit"` or `"Abort"`.
        sent: &'static str,
        /// The kind of answer received.
        reply: &'static str,
    },
    /// A `test.*` handler broke the ring on purpose, and the wait for the agent to destroy
    /// the domain ended (the peer went away, or waiting failed).
    #[error("test handler {handler:?} broke the ring; the wait for destruction ended")]
    Sabotaged {
        /// The handler.
        handler: String,
    },
}

impl RunError {
    /// The exit status for this failure (see [`exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Attach(_) => exit::ATTACH,
            Self::Handshake(_) => exit::HANDSHAKE,
            Self::NotStart { .. } => exit::NOT_START,
            Self::Database { .. } => exit::DATABASE,
            Self::Finish { .. } => exit::FINISH,
            Self::BadFinishReply { .. } => exit::BAD_FINISH_REPLY,
            Self::Sabotaged { .. } => exit::SABOTAGED,
        }
    }
}

/// Runs `f`, catching a panic where unwinding exists (`std`); without `std` a panic never
/// returns here (the guest kernel crashes the domain).
#[cfg(feature = "std")]
fn catch<R>(f: impl FnOnce() -> R) -> Result<R, ()> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| ())
}

#[cfg(not(feature = "std"))]
fn catch<R>(f: impl FnOnce() -> R) -> Result<R, ()> {
    Ok(f())
}

/// Runs one transaction with the default [`Config`] and returns the exit status (see the
/// [crate docs](crate)). A failure is also described on standard error.
#[cfg(feature = "std")]
pub fn run<M: SharedMem>(mem: M, notifier: &impl Notifier, registry: &Registry) -> i32 {
    run_with(mem, notifier, registry, &Config::default())
}

/// [`run`] with a [`Config`].
#[cfg(feature = "std")]
pub fn run_with<M: SharedMem>(
    mem: M,
    notifier: &impl Notifier,
    registry: &Registry,
    config: &Config,
) -> i32 {
    match try_run(mem, notifier, registry, config) {
        Ok(_) => exit::OK,
        Err(e) => {
            // Never `eprintln!`: it panics if stderr is unwritable (a confined domain may
            // refuse the write), and a panic here would turn a clean status into a crash.
            let _ = writeln!(std::io::stderr(), "domu-shim: {}", error_chain(&e));
            e.exit_code()
        }
    }
}

/// Runs one transaction and says how it ended.
pub fn try_run<M: SharedMem>(
    mem: M,
    notifier: &impl Notifier,
    registry: &Registry,
    config: &Config,
) -> Result<Outcome, RunError> {
    let mut frontend = Frontend::attach(mem).map_err(RunError::Attach)?;
    let ready = Request::Ready {
        protocol_version: PROTOCOL_VERSION,
        handlers: announced_handlers(registry, config),
    };
    let start = match frontend.call(&ready, notifier, None) {
        Ok(Response::Start(start)) => start,
        Ok(other) => {
            return Err(RunError::NotStart {
                reply: response_kind(&other),
            })
        }
        Err(e) => return Err(RunError::Handshake(e)),
    };
    let verdict = match lookup(registry, config, &start.handler) {
        Some(Entry::Handler(handler)) => {
            run_handler(&mut frontend, notifier, handler, &start, config)?
        }
        #[cfg(feature = "test-handlers")]
        Some(Entry::Raw(handler)) => {
            let mut raw = test_handlers::RawRing::new(
                frontend.memory(),
                notifier,
                frontend.geometry(),
                start.entropy_seed,
            );
            let outcome = catch(|| handler(&mut raw, &start.payload));
            match outcome {
                Ok(test_handlers::RawOutcome::Commit(result)) => commit_verdict(result),
                Ok(test_handlers::RawOutcome::Abort(reason)) => Verdict::Abort(reason),
                Ok(test_handlers::RawOutcome::AwaitDestruction) => {
                    raw.await_destruction();
                    return Err(RunError::Sabotaged {
                        handler: start.handler,
                    });
                }
                Err(_) => Verdict::Abort("handler panicked".into()),
            }
        }
        None => Verdict::Abort(format!("unknown handler {:?}", start.handler)),
    };
    finish(&mut frontend, notifier, verdict, config)
}

/// What to tell the agent once the handler is done.
enum Verdict {
    Commit(Vec<u8>),
    Abort(String),
    /// Already told the agent (`Commit` sent behind the last writes) and answered.
    Done(Outcome),
}

enum Entry {
    Handler(Handler),
    #[cfg(feature = "test-handlers")]
    Raw(test_handlers::RawHandler),
}

/// Every handler name this guest answers to, as its `Ready` announces them: exactly the names
/// [`lookup`] resolves (the registry's, and with `test-handlers` enabled in `config` the
/// `test.*` ones), sorted bytewise without duplicates, as the wire requires. The agent's
/// sandbox template announces the same list from the same function, so the two cannot drift.
pub fn announced_handlers(registry: &Registry, config: &Config) -> Vec<String> {
    let mut names: Vec<String> = registry.names().map(str::to_owned).collect();
    #[cfg(feature = "test-handlers")]
    if config.test_handlers {
        names.extend(
            test_handlers::SDK_TEST_HANDLERS
                .iter()
                .chain(test_handlers::TEST_HANDLERS.iter().map(|(n, _)| n))
                .map(|n| (*n).to_owned()),
        );
    }
    let _ = config;
    names.sort_unstable();
    names.dedup();
    names
}

fn lookup(registry: &Registry, config: &Config, name: &str) -> Option<Entry> {
    if let Some(handler) = registry.get(name) {
        return Some(Entry::Handler(handler));
    }
    #[cfg(feature = "test-handlers")]
    if config.test_handlers {
        if let Some(handler) = test_handlers::get_sdk(name) {
            return Some(Entry::Handler(handler));
        }
        return test_handlers::get(name).map(Entry::Raw);
    }
    let _ = config;
    None
}

fn commit_verdict(result: Vec<u8>) -> Verdict {
    if result.len() > MAX_RESULT_LEN {
        Verdict::Abort(format!(
            "handler result of {} bytes exceeds {MAX_RESULT_LEN}",
            result.len()
        ))
    } else {
        Verdict::Commit(result)
    }
}

fn run_handler<M: SharedMem, N: Notifier>(
    frontend: &mut Frontend<M>,
    notifier: &N,
    handler: Handler,
    start: &Start,
    config: &Config,
) -> Result<Verdict, RunError> {
    let mut db = RingDb::new(frontend, notifier, config.db_timeout);
    let outcome = {
        let mut ctx = Ctx::new(&mut db, start.tx_id, start.entropy_seed);
        catch(|| handler(&mut ctx, &start.payload))
    };
    // A handler that succeeded, with no write refused so far: Commit right behind the
    // writes still in flight (the agent refuses it if one of them is refused).
    let outcome = match outcome {
        Ok(Ok(result)) if db.deferred_error().is_none() && result.len() <= MAX_RESULT_LEN => {
            return commit_behind(db, result, config).map(Verdict::Done);
        }
        other => other,
    };
    // Collect the answers of the writes still in flight: Abort goes on an idle ring.
    let deferred = db.settle().map_err(|source| RunError::Database {
        handler: start.handler.clone(),
        source,
    })?;
    Ok(match (outcome, deferred) {
        (Ok(Ok(result)), None) => commit_verdict(result),
        // A pipelined write failed: never commit, whatever the handler made of it.
        // The reason reads as if the handler had propagated the error with `?`.
        (Ok(Ok(_)), Some(e)) => Verdict::Abort(HandlerError::from(e).to_string()),
        (Ok(Err(e)), _) => Verdict::Abort(e.to_string()),
        (Err(_), _) => Verdict::Abort("handler panicked".into()),
    })
}

/// Sends `Commit { result }` right behind the writes still in flight and says how the
/// agent answered (see [`RingDb::commit_behind`]).
fn commit_behind<M: SharedMem, N: Notifier>(
    db: RingDb<'_, M, N>,
    result: Vec<u8>,
    config: &Config,
) -> Result<Outcome, RunError> {
    let sent = "Commit";
    let (deferred, answer) = db
        .commit_behind(result, config.finish_timeout)
        .map_err(|source| RunError::Finish { sent, source })?;
    match (answer, deferred) {
        (Response::Committed, None) => Ok(Outcome::Committed),
        // A write the Commit went behind was refused, so the agent aborted: the reason reads
        // as if the handler had propagated the write's error with `?`.
        (Response::Aborted, Some(e)) => Ok(Outcome::Aborted {
            reason: HandlerError::from(e).to_string(),
        }),
        (Response::Aborted, None) => Ok(Outcome::CommitRefused),
        // `Committed` behind a refused write, or another kind of answer: the agent broke
        // the protocol.
        (other, _) => Err(RunError::BadFinishReply {
            sent,
            reply: response_kind(&other),
        }),
    }
}

fn finish<M: SharedMem, N: Notifier>(
    frontend: &mut Frontend<M>,
    notifier: &N,
    verdict: Verdict,
    config: &Config,
) -> Result<Outcome, RunError> {
    let timeout = Some(config.finish_timeout);
    match verdict {
        Verdict::Done(outcome) => Ok(outcome),
        Verdict::Commit(result) => {
            let sent = "Commit";
            match frontend.call(&Request::Commit { result }, notifier, timeout) {
                Ok(Response::Committed) => Ok(Outcome::Committed),
                Ok(Response::Aborted) => Ok(Outcome::CommitRefused),
                Ok(other) => Err(RunError::BadFinishReply {
                    sent,
                    reply: response_kind(&other),
                }),
                Err(source) => Err(RunError::Finish { sent, source }),
            }
        }
        Verdict::Abort(reason) => {
            let sent = "Abort";
            let reason = sanitize_text(&reason, MAX_REASON_LEN);
            let request = Request::Abort {
                reason: reason.clone(),
            };
            match frontend.call(&request, notifier, timeout) {
                Ok(Response::Aborted) => Ok(Outcome::Aborted { reason }),
                Ok(other) => Err(RunError::BadFinishReply {
                    sent,
                    reply: response_kind(&other),
                }),
                Err(source) => Err(RunError::Finish { sent, source }),
            }
        }
    }
}

/// The name of a response's kind, for error messages.
pub(crate) fn response_kind(response: &Response) -> &'static str {
    match response {
        Response::Start(_) => "Start",
        Response::Value(_) => "Value",
        Response::Ok => "Ok",
        Response::ScanResult { .. } => "ScanResult",
        Response::Error { .. } => "Error",
        Response::Committed => "Committed",
        Response::Aborted => "Aborted",
    }
}

/// `error: cause: cause ...` on one line.
pub fn error_chain(error: &dyn core::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_ring::wire;
    use mayfly_sdk::limits;

    #[test]
    fn sdk_limits_match_the_wire_caps() {
        assert_eq!(limits::MAX_KEY_LEN, wire::MAX_KEY_LEN);
        assert_eq!(limits::MAX_VALUE_LEN, wire::MAX_VALUE_LEN);
        assert_eq!(limits::MAX_SCAN_LIMIT, wire::MAX_SCAN_ENTRIES);
        assert_eq!(limits::MAX_LOG_LINE_LEN, wire::MAX_LOG_LINE_LEN);
        assert_eq!(limits::MAX_PAYLOAD_LEN, wire::MAX_PAYLOAD_LEN);
        assert_eq!(limits::MAX_RESULT_LEN, wire::MAX_RESULT_LEN);
        assert_eq!(limits::MAX_REASON_LEN, wire::MAX_REASON_LEN);
        assert_eq!(limits::MAX_HANDLER_NAME_LEN, wire::MAX_HANDLER_LEN);
    }

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        let codes = [
            exit::OK,
            exit::USAGE,
            exit::SETUP,
            exit::ATTACH,
            exit::HANDSHAKE,
            exit::NOT_START,
            exit::DATABASE,
            exit::FINISH,
            exit::BAD_FINISH_REPLY,
            exit::SABOTAGED,
        ];
        let mut sorted = codes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
        let docs = include_str!("lib.rs");
        for code in &codes[3..] {
            assert!(
                docs.contains(&format!("//! | {code} ")),
                "status {code} undocumented"
            );
        }
        let err = RunError::NotStart { reply: "Ok" };
        assert_eq!(err.exit_code(), exit::NOT_START);
        let err = RunError::BadFinishReply {
            sent: "Commit",
            reply: "Value",
        };
        assert_eq!(err.exit_code(), exit::BAD_FINISH_REPLY);
        assert_eq!(err.to_string(), "the agent answered Commit with Value");
    }
}
