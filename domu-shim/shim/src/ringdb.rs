//! [`RingDb`]: the handler's [`Db`], forwarded over the ring to the agent.
//!
//! Each operation is one `Frontend::call` (request, then its answer, id checked) with a
//! timeout. Answers map as follows:
//!
//! ```text
//!  Get     -> Value(v)                     Ok(v)
//!  Put     -> Ok                           Ok(())
//!  Delete  -> Ok                           Ok(())
//!  Scan    -> ScanResult{entries, more}    Ok(Scan)  (more entries than `limit`: Transport)
//!  Log     -> Ok                           Ok(())
//!  any     -> Error{code, message}         BAD_REQUEST -> DbError::BadRequest
//!                                          DENIED      -> DbError::Denied
//!                                          LIMIT_EXCEEDED -> DbError::LimitExceeded
//!                                          INTERNAL, unknown code -> DbError::Internal
//!  any     -> another kind of answer       DbError::Transport
//!  ring failure (timeout, violation, ...)  DbError::Transport, and the ring is given up
//! ```
//!
//! Sizes are checked before anything is sent ([`mayfly_sdk::limits`]), so an oversized key
//! is a [`DbError::BadRequest`] and costs no round trip. After a ring failure the ring is
//! out of step (a late answer would be taken for the next request's), so every later
//! operation fails at once without touching it, and [`RingDb::into_failure`] hands the
//! failure to the runtime, which ends the process without sending anything more.

use std::time::Duration;

use mayfly_ring::wire::{error_code, LogLevel as WireLogLevel};
use mayfly_ring::{Frontend, Notifier, Request, Response, RingError, SharedMem};
use mayfly_sdk::limits::{self, sanitize_text, MAX_LOG_LINE_LEN};
use mayfly_sdk::{Db, DbError, LogLevel, Scan};

use crate::response_kind;

/// A [`Db`] over the guest's end of the ring. See the [module docs](self).
#[derive(Debug)]
pub struct RingDb<'f, M: SharedMem, N: Notifier> {
    frontend: &'f mut Frontend<M>,
    notifier: &'f N,
    timeout: Duration,
    failure: Option<RingError>,
}

impl<'f, M: SharedMem, N: Notifier> RingDb<'f, M, N> {
    /// A database over `frontend`, waiting at most `timeout` for each answer.
    pub fn new(frontend: &'f mut Frontend<M>, notifier: &'f N, timeout: Duration) -> Self {
        Self {
            frontend,
            notifier,
            timeout,
            failure: None,
        }
    }

    /// The ring failure that made this database unusable, if any.
    pub fn failure(&self) -> Option<&RingError> {
        self.failure.as_ref()
    }

    /// Consumes the database and returns its ring failure, if any.
    pub fn into_failure(self) -> Option<RingError> {
        self.failure
    }

    /// Sends `request` (named `what` in errors) and returns the answer, mapping
    /// `Response::Error` and ring failures to [`DbError`].
    fn call(&mut self, what: &'static str, request: &Request) -> Result<Response, DbError> {
        if let Some(failure) = &self.failure {
            return Err(DbError::Transport {
                message: format!("{what}: ring unusable after an earlier failure ({failure})"),
            });
        }
        match self
            .frontend
            .call(request, self.notifier, Some(self.timeout))
        {
            Ok(Response::Error { code, message }) => Err(agent_error(code, message)),
            Ok(response) => Ok(response),
            // Refused before anything was published: the ring is still in step.
            Err(e @ (RingError::Encode(_) | RingError::TooLarge { .. })) => {
                Err(DbError::BadRequest {
                    message: format!("{what}: {e}"),
                })
            }
            Err(e) => {
                let message = format!("{what}: {}", crate::error_chain(&e));
                self.failure = Some(e);
                Err(DbError::Transport { message })
            }
        }
    }

    fn expect_ok(&mut self, what: &'static str, request: &Request) -> Result<(), DbError> {
        match self.call(what, request)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(what, &other)),
        }
    }
}

/// Maps an agent's `Error { code, message }`.
fn agent_error(code: u16, message: String) -> DbError {
    match code {
        error_code::BAD_REQUEST => DbError::BadRequest { message },
        error_code::DENIED => DbError::Denied { message },
        error_code::LIMIT_EXCEEDED => DbError::LimitExceeded { message },
        error_code::INTERNAL => DbError::Internal { message },
        other => DbError::Internal {
            message: format!("error code {other}: {message}"),
        },
    }
}

fn unexpected(what: &'static str, response: &Response) -> DbError {
    DbError::Transport {
        message: format!(
            "{what}: the agent answered with {}",
            response_kind(response)
        ),
    }
}

fn wire_level(level: LogLevel) -> WireLogLevel {
    match level {
        LogLevel::Error => WireLogLevel::Error,
        LogLevel::Warn => WireLogLevel::Warn,
        LogLevel::Info => WireLogLevel::Info,
        LogLevel::Debug => WireLogLevel::Debug,
        LogLevel::Trace => WireLogLevel::Trace,
    }
}

impl<M: SharedMem, N: Notifier> Db for RingDb<'_, M, N> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        limits::check_key(key)?;
        let request = Request::Get { key: key.to_vec() };
        match self.call("get", &request)? {
            Response::Value(value) => Ok(value),
            other => Err(unexpected("get", &other)),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        limits::check_key(key)?;
        limits::check_value(value)?;
        let request = Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        };
        self.expect_ok("put", &request)
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), DbError> {
        limits::check_key(key)?;
        self.expect_ok("delete", &Request::Delete { key: key.to_vec() })
    }

    fn scan(&mut self, start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Scan, DbError> {
        limits::check_scan(start, end, limit)?;
        let request = Request::Scan {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit,
        };
        match self.call("scan", &request)? {
            Response::ScanResult { entries, more } => {
                let max = usize::try_from(limit).unwrap_or(usize::MAX);
                if entries.len() > max {
                    return Err(DbError::Transport {
                        message: format!(
                            "scan: the agent returned {} entries for a limit of {limit}",
                            entries.len()
                        ),
                    });
                }
                Ok(Scan {
                    entries: entries.into_iter().map(|e| (e.key, e.value)).collect(),
                    more,
                })
            }
            other => Err(unexpected("scan", &other)),
        }
    }

    fn log(&mut self, level: LogLevel, line: &str) -> Result<(), DbError> {
        let request = Request::Log {
            level: wire_level(level),
            line: sanitize_text(line, MAX_LOG_LINE_LEN),
        };
        self.expect_ok("log", &request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_error_codes_map_to_typed_errors() {
        let m = || "why".to_string();
        assert_eq!(
            agent_error(error_code::BAD_REQUEST, m()),
            DbError::BadRequest { message: m() }
        );
        assert_eq!(
            agent_error(error_code::DENIED, m()),
            DbError::Denied { message: m() }
        );
        assert_eq!(
            agent_error(error_code::LIMIT_EXCEEDED, m()),
            DbError::LimitExceeded { message: m() }
        );
        assert_eq!(
            agent_error(error_code::INTERNAL, m()),
            DbError::Internal { message: m() }
        );
        assert_eq!(
            agent_error(999, m()),
            DbError::Internal {
                message: "error code 999: why".into()
            }
        );
    }

    #[test]
    fn log_levels_map_one_to_one() {
        let all = [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ];
        let mapped: Vec<u8> = all.iter().map(|&l| wire_level(l) as u8).collect();
        assert_eq!(mapped, [1, 2, 3, 4, 5]);
    }
}
