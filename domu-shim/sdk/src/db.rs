//! The database API a handler sees.
//!
//! Every operation is forwarded to the agent, which checks it against the policy engine and
//! serves it from the ledger: reads see committed data plus this transaction's own writes;
//! writes are buffered and become visible to others only if the transaction commits. The
//! agent may refuse an operation; the refusal arrives as a [`DbError`] carrying the agent's
//! message, and usually means the transaction will be aborted whatever the handler does.
//!
//! # Deferred write errors
//!
//! In a domain, writes ([`Db::put`], [`Db::delete`]) and [`Db::log`] do not wait for the
//! agent's answer: after the local checks (sizes, log line sanitizing), which still fail at
//! once, they return `Ok(())` as soon as the request is sent. If the agent then refuses a
//! write (`Denied`, `LimitExceeded`, `BadRequest`, `Conflict`, `Internal`), the error surfaces at the
//! handler's next operation that waits for an answer ([`Db::get`], [`Db::scan`]), and every
//! later operation returns that same first error. **A transaction in which a write failed
//! never commits**: if the handler returns `Ok` anyway (or returns before waiting again),
//! the runtime aborts it with the write's error as the reason. So: propagate database errors
//! with `?` and don't try to recover from one.

use alloc::string::String;
use alloc::vec::Vec;

/// A database operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// The policy engine denied the operation (a capability the handler does not have, a
    /// honeytoken, ...). The agent treats this as a possible attack.
    #[error("denied by policy: {message}")]
    Denied {
        /// The agent's message.
        message: String,
    },
    /// A limit was exceeded (operations, bytes, rate).
    #[error("limit exceeded: {message}")]
    LimitExceeded {
        /// The agent's message.
        message: String,
    },
    /// The request was malformed: a key or value over its cap, an empty key, a bad scan
    /// limit (checked locally before anything is sent), or refused as such by the agent.
    #[error("bad request: {message}")]
    BadRequest {
        /// What was wrong.
        message: String,
    },
    /// Something the transaction read was changed by another commit before it committed
    /// (the agent found it at this operation, not waiting for the commit), or the agent had
    /// no free reader slot for the fresh snapshot a long transaction takes: the transaction
    /// cannot commit and the agent ends it as a conflict (and may run it again).
    #[error("conflict: {message}")]
    Conflict {
        /// The agent's message.
        message: String,
    },
    /// The agent failed internally, or answered with an error code this SDK does not know.
    #[error("agent error: {message}")]
    Internal {
        /// The agent's message.
        message: String,
    },
    /// The request or its answer did not get through: ring failure, timeout, or an answer
    /// of the wrong kind. The transaction cannot go on.
    #[error("transport failure: {message}")]
    Transport {
        /// What failed.
        message: String,
    },
}

/// The result of [`Db::scan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Key/value pairs in ascending key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether the range holds more entries than were returned (ask again from the key
    /// after the last one).
    pub more: bool,
}

/// Severity of a handler's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Errors.
    Error,
    /// Warnings.
    Warn,
    /// Information.
    Info,
    /// Debugging.
    Debug,
    /// Tracing.
    Trace,
}

/// The data a handler can reach: a key-value store with ordered keys.
///
/// Keys are 1..=[`crate::limits::MAX_KEY_LEN`] bytes, values 0..=[`crate::limits::MAX_VALUE_LEN`] bytes;
/// implementations refuse anything else with [`DbError::BadRequest`] (see
/// [`crate::limits::check_key`]).
pub trait Db {
    /// The value of `key`, or `None` if it is absent.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;

    /// The values of `keys`, in the same order: what [`Db::get`] on each key in turn would
    /// return (the first error is returned), but in a domain the reads travel together —
    /// one round trip for all of them instead of one each. Every key is read, checked by the
    /// policy and recorded in the read set even if an earlier one is absent or refused (so a
    /// later key the policy denies ends the transaction even when an earlier read failed).
    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, DbError> {
        keys.iter().map(|key| self.get(key)).collect()
    }

    /// Sets `key` to `value`. In a domain this may return before the agent has answered;
    /// a refusal then surfaces later (see [Deferred write errors](self#deferred-write-errors)).
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError>;

    /// Removes `key` (no error if it is absent). Like [`Db::put`], a refusal may surface
    /// later.
    fn delete(&mut self, key: &[u8]) -> Result<(), DbError>;

    /// Up to `limit` (1..=[`crate::limits::MAX_SCAN_LIMIT`]) entries with `start <= key < end`
    /// (`end = None`: no upper bound; an empty `start`: from the first key), in key order.
    /// An answer may hold fewer than `limit` entries with `more` set (the agent caps one
    /// answer's size); ask again from the key after the last one.
    fn scan(&mut self, start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Scan, DbError>;

    /// Sends a log line to the agent. Control characters are replaced and the line is cut
    /// to [`crate::limits::MAX_LOG_LINE_LEN`] bytes (see [`crate::limits::sanitize_text`]). The agent may
    /// drop lines beyond a per-transaction allowance. Like [`Db::put`], this does not wait
    /// for the agent's answer.
    fn log(&mut self, level: LogLevel, line: &str) -> Result<(), DbError>;
}
