//! [`RingDb`]: the handler's [`Db`], forwarded over the ring to the agent.
//!
//! # Pipelined writes
//!
//! `put`, `delete` and `log` do not wait for their answers: each checks its arguments
//! locally (size caps, log line sanitizing), publishes its request **without notifying**
//! the agent ([`Frontend::queue_request`]) and returns `Ok(())`. The ids of the requests
//! whose answers are outstanding are kept, oldest first; there are at most `slot_count` of
//! them, and a write that finds the ring full first collects every outstanding answer.
//!
//! # One wake-up per wait, each way
//!
//! The guest notifies the agent only when it is about to wait (a notification a queued
//! request earned is owed until then), and when it waits for several answers it asks to be
//! woken for the **last** of them only ([`Frontend::await_responses`]). A `transfer` (two
//! reads, two writes, `Commit`) thus wakes the agent twice and is woken twice, where a
//! notification per message and a wake-up per answer could cost five of each; on Xen each
//! is an event-channel hypercall and an interrupt.
//!
//! Every operation that needs an answer (`get`, `scan`) first collects the outstanding
//! answers in order, then makes its own request and waits for its answer; `get_many`
//! publishes its `Get`s together and waits once. When the handler
//! succeeded and no write was refused so far, the runtime sends `Commit` right behind the
//! writes still in flight ([`RingDb::commit_behind`]) and then reads their answers and the
//! `Commit`'s: one wait instead of two. That is safe because the agent answers `Aborted` to a
//! `Commit` behind a write it refused (it answers a write refused by the ledger — a limit, a
//! bad key — with an `Error` and goes on serving, but never commits that transaction).
//! Before `Abort` the runtime collects first ([`RingDb::settle`]).
//!
//! ```text
//!  put, put, log        ──Put──Put──Log──▶          (no wait)
//!  get                  ◀──Ok───Ok───Ok──   collect, in order, ids checked
//!                       ──Get──▶ ◀──Value──           then the get itself
//!  put                  ──Put──▶                      (no wait)
//!  (handler returns Ok) ──Commit──▶ ◀──Ok──Committed   commit_behind
//! ```
//!
//! **Deferred errors.** A write's error surfaces at the next operation that waits: the
//! first deferred error (mapped as below) is kept and returned by that operation and by
//! every later one, without sending anything more, and [`RingDb::settle`] returns it, so the
//! runtime aborts instead of committing. After a `Denied` answer the agent stops serving and
//! destroys the domain, so waiting for the answers behind it ends with the domain.
//!
//! # Answers
//!
//! Each answer must carry the id of the oldest outstanding request (otherwise: a protocol
//! violation, the ring is given up) and be of the right kind:
//!
//! ```text
//!  Get     -> Value(v)                     Ok(v)
//!  Put     -> Ok                           Ok(())   (collected later)
//!  Delete  -> Ok                           Ok(())   (collected later)
//!  Scan    -> ScanResult{entries, more}    Ok(Scan)  (more entries than `limit`: Transport)
//!  Log     -> Ok                           Ok(())   (collected later)
//!  any     -> Error{code, message}         BAD_REQUEST -> DbError::BadRequest
//!                                          DENIED      -> DbError::Denied
//!                                          LIMIT_EXCEEDED -> DbError::LimitExceeded
//!                                          CONFLICT    -> DbError::Conflict
//!                                          INTERNAL, unknown code -> DbError::Internal
//!  any     -> another kind of answer       DbError::Transport
//!  ring failure (timeout, violation, ...)  DbError::Transport, and the ring is given up
//! ```
//!
//! For a write these errors are deferred as described above.
//!
//! Sizes are checked before anything is sent ([`mayfly_sdk::limits`]), so an oversized key
//! is a [`DbError::BadRequest`] at once and costs no round trip. After a ring failure the
//! ring is out of step (a late answer would be taken for the next request's), so every
//! later operation fails at once without touching it, and [`RingDb::settle`] hands the
//! failure to the runtime, which ends the process without sending anything more.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

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
    /// Writes sent whose answers are not collected yet: `(id, what)`, oldest first.
    pending: VecDeque<(u32, &'static str)>,
    /// The first error a collected write answer carried.
    deferred: Option<DbError>,
    failure: Option<RingError>,
}

impl<'f, M: SharedMem, N: Notifier> RingDb<'f, M, N> {
    /// A database over `frontend` (with no request in flight), waiting at most `timeout`
    /// for the answers of each call (for a batch: until its last answer; the `Commit` behind
    /// the writes waits under [`RingDb::commit_behind`]'s own timeout).
    pub fn new(frontend: &'f mut Frontend<M>, notifier: &'f N, timeout: Duration) -> Self {
        Self {
            frontend,
            notifier,
            timeout,
            pending: VecDeque::new(),
            deferred: None,
            failure: None,
        }
    }

    /// The ring failure that made this database unusable, if any.
    pub fn failure(&self) -> Option<&RingError> {
        self.failure.as_ref()
    }

    /// The first error a pipelined write received, once collected.
    pub fn deferred_error(&self) -> Option<&DbError> {
        self.deferred.as_ref()
    }

    /// Collects every outstanding answer and consumes the database; the runtime calls this
    /// when the handler is done, before `Commit` or `Abort`. `Err`: the ring failed (now or
    /// earlier) and the runtime must send nothing more. Otherwise the first deferred write
    /// error, if any: the transaction must not commit.
    pub fn settle(mut self) -> Result<Option<DbError>, RingError> {
        // A ring failure is recorded in `self.failure`; its `DbError` is not needed here.
        let _ = self.collect();
        match self.failure {
            Some(failure) => Err(failure),
            None => Ok(self.deferred),
        }
    }

    /// Sends `Commit { result }` right behind the writes still in flight, then collects
    /// their answers and the `Commit`'s, and consumes the database: one wait instead of
    /// two. The agent answers `Aborted` to a `Commit` behind a refused write (it never
    /// commits a transaction one of whose writes it refused), so the order is safe. `Err`:
    /// the ring failed (now or earlier) and the runtime must send nothing more. Otherwise
    /// the first deferred write error, if any, and the `Commit`'s answer.
    pub fn commit_behind(
        mut self,
        result: Vec<u8>,
        timeout: Duration,
    ) -> Result<(Option<DbError>, Response), RingError> {
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        if self.frontend.in_flight() >= self.frontend.geometry().slot_count() {
            let _ = self.collect(); // a slot for the Commit
            if let Some(failure) = self.failure.take() {
                return Err(failure);
            }
        }
        let id = self.frontend.queue_request(&Request::Commit { result })?;
        // One wait, for the Commit's answer: the writes' answers come before it.
        self.frontend
            .await_responses(self.notifier, Some(timeout))?;
        let _ = self.collect();
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        let answer = self
            .frontend
            .recv_response_to(id, self.notifier, Some(timeout))?;
        Ok((self.deferred, answer))
    }

    /// Fails if an earlier ring failure or deferred write error makes the database unusable.
    fn usable(&self, what: &'static str) -> Result<(), DbError> {
        if let Some(failure) = &self.failure {
            return Err(DbError::Transport {
                message: format!("{what}: ring unusable after an earlier failure ({failure})"),
            });
        }
        match &self.deferred {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Records a ring failure (the ring is given up) and returns it as a [`DbError`].
    fn give_up(&mut self, what: &'static str, error: RingError) -> DbError {
        let message = format!("{what}: {}", crate::error_chain(&error));
        self.failure = Some(error);
        self.pending.clear();
        DbError::Transport { message }
    }

    /// Collects the answers of every pending write, in order, and returns the first
    /// deferred error if there is one. Waits once, for the last of them (see
    /// [`Frontend::await_responses`]).
    fn collect(&mut self) -> Result<(), DbError> {
        if let Some(&(_, what)) = self.pending.front() {
            if let Err(e) = self
                .frontend
                .await_responses(self.notifier, Some(self.timeout))
            {
                return Err(self.give_up(what, e));
            }
        }
        while let Some(&(id, what)) = self.pending.front() {
            let answer = self
                .frontend
                .recv_response_to(id, self.notifier, Some(self.timeout));
            self.pending.pop_front();
            let error = match answer {
                Ok(Response::Ok) => continue,
                Ok(Response::Error { code, message }) => agent_error(code, message),
                Ok(other) => unexpected(what, &other),
                Err(e) => return Err(self.give_up(what, e)),
            };
            self.deferred.get_or_insert(error);
        }
        match &self.deferred {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Collects pending answers, sends `request` (named `what` in errors) and returns its
    /// answer, mapping `Response::Error` and ring failures to [`DbError`].
    fn call(&mut self, what: &'static str, request: &Request) -> Result<Response, DbError> {
        self.usable(what)?;
        self.collect()?;
        match self
            .frontend
            .call(request, self.notifier, Some(self.timeout))
        {
            Ok(Response::Error { code, message }) => Err(agent_error(code, message)),
            Ok(response) => Ok(response),
            Err(e) => Err(self.refused_or_give_up(what, e)),
        }
    }

    /// Sends the write `request` without waiting for its answer (collecting every pending
    /// answer first if the ring is full).
    fn send(&mut self, what: &'static str, request: &Request) -> Result<(), DbError> {
        self.usable(what)?;
        if self.frontend.in_flight() >= self.frontend.geometry().slot_count() {
            self.collect()?;
        }
        match self.frontend.queue_request(request) {
            Ok(id) => {
                self.pending.push_back((id, what));
                Ok(())
            }
            Err(e) => Err(self.refused_or_give_up(what, e)),
        }
    }

    fn refused_or_give_up(&mut self, what: &'static str, error: RingError) -> DbError {
        match error {
            // Refused before anything was published: the ring is still in step.
            e @ (RingError::Encode(_) | RingError::TooLarge { .. }) => DbError::BadRequest {
                message: format!("{what}: {e}"),
            },
            e => self.give_up(what, e),
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
        error_code::CONFLICT => DbError::Conflict { message },
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

    /// Pipelined reads: after the outstanding write answers are collected, up to
    /// `slot_count` `Get`s are published together and their answers collected in order.
    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, DbError> {
        for key in keys {
            limits::check_key(key)?;
        }
        self.usable("get")?;
        self.collect()?;
        let slots = usize::try_from(self.frontend.geometry().slot_count())
            .unwrap_or(1)
            .max(1);
        let mut values = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(slots) {
            let mut ids = Vec::with_capacity(chunk.len());
            for key in chunk {
                let request = Request::Get { key: key.to_vec() };
                match self.frontend.queue_request(&request) {
                    Ok(id) => ids.push(id),
                    // Nothing of this chunk published yet: refused, the ring still in step.
                    Err(e) if ids.is_empty() => return Err(self.refused_or_give_up("get", e)),
                    // Answers are owed for the ones already sent: out of step, given up.
                    Err(e) => return Err(self.give_up("get", e)),
                }
            }
            // One wait, for the chunk's last answer; then every answer of the chunk is
            // read, whatever it is, to stay in step.
            if let Err(e) = self
                .frontend
                .await_responses(self.notifier, Some(self.timeout))
            {
                return Err(self.give_up("get", e));
            }
            let mut first_error = None;
            for id in ids {
                match self
                    .frontend
                    .recv_response_to(id, self.notifier, Some(self.timeout))
                {
                    Ok(Response::Value(value)) => values.push(value),
                    Ok(Response::Error { code, message }) => {
                        first_error.get_or_insert(agent_error(code, message));
                    }
                    Ok(other) => {
                        first_error.get_or_insert(unexpected("get", &other));
                    }
                    Err(e) => return Err(self.give_up("get", e)),
                }
            }
            if let Some(error) = first_error {
                return Err(error);
            }
        }
        Ok(values)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        limits::check_key(key)?;
        limits::check_value(value)?;
        let request = Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        };
        self.send("put", &request)
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), DbError> {
        limits::check_key(key)?;
        self.send("delete", &Request::Delete { key: key.to_vec() })
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
        self.send("log", &request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{mpsc, Arc};
    use std::thread::{self, JoinHandle};

    use mayfly_ring::wire::Envelope;
    use mayfly_ring::{Backend, EventFdNotifier, Geometry, MockMem};

    /// How long either side waits for one message.
    const WAIT: Duration = Duration::from_secs(10);

    type Mem = Arc<MockMem>;

    /// The guest's end of a ring in heap memory, and a scripted agent serving its other end
    /// in a thread.
    struct Guest {
        frontend: Frontend<Mem>,
        notifier: EventFdNotifier,
        /// Sending anything lets the agent start serving.
        go: mpsc::Sender<()>,
        /// Every request the agent received, in order.
        agent: JoinHandle<Vec<Envelope<Request>>>,
    }

    impl Guest {
        fn db(&mut self) -> RingDb<'_, Mem, EventFdNotifier> {
            RingDb::new(&mut self.frontend, &self.notifier, WAIT)
        }

        fn requests(self) -> Vec<Request> {
            drop(self.go);
            let seen = self.agent.join().expect("the agent did not panic");
            seen.into_iter().map(|env| env.body).collect()
        }
    }

    /// A ring of `slots` slots. Once released through `go`, the agent answers each of at
    /// most `serve` requests with `answer(request)` (`None`: stop without answering) and,
    /// like the real agent, stops after answering `Commit`, `Abort` or with
    /// `Error { DENIED }`.
    fn guest(
        slots: u32,
        serve: usize,
        answer: impl FnMut(&Envelope<Request>) -> Option<Envelope<Response>> + Send + 'static,
    ) -> Guest {
        guest_with(slots, serve, false, answer)
    }

    /// [`guest`], but with `hold` the agent answers nothing until it has read a `Commit` or
    /// `Abort`, then answers everything in order: a guest that waits for an answer before
    /// sending its `Commit` waits in vain.
    fn guest_with(
        slots: u32,
        serve: usize,
        hold: bool,
        mut answer: impl FnMut(&Envelope<Request>) -> Option<Envelope<Response>> + Send + 'static,
    ) -> Guest {
        let geometry = Geometry::new(slots, 1).unwrap();
        let mem = Arc::new(MockMem::new(geometry.total_len()).unwrap());
        let mut backend = Backend::new(Arc::clone(&mem), geometry).unwrap();
        let frontend = Frontend::attach(mem).unwrap();
        let (agent_end, notifier) = EventFdNotifier::pair().unwrap();
        let (go, gate) = mpsc::channel();
        let agent = thread::spawn(move || {
            let _ = gate.recv();
            let mut seen = Vec::new();
            let mut held = Vec::new();
            while seen.len() < serve {
                let Ok(env) = backend.recv_request(&agent_end, Some(WAIT)) else {
                    break;
                };
                let reply = answer(&env);
                let last = matches!(env.body, Request::Commit { .. } | Request::Abort { .. });
                seen.push(env);
                let Some(reply) = reply else { break };
                let denied = matches!(
                    reply.body,
                    Response::Error {
                        code: error_code::DENIED,
                        ..
                    }
                );
                held.push(reply);
                if hold && !last {
                    continue;
                }
                for reply in held.drain(..) {
                    backend
                        .send_response(reply.id, &reply.body, &agent_end)
                        .unwrap();
                }
                if last || denied {
                    break;
                }
            }
            seen
        });
        Guest {
            frontend,
            notifier,
            go,
            agent,
        }
    }

    /// The honest answer: `Ok` to writes, `Value(None)` to gets, `Committed`, `Aborted`.
    fn honest(env: &Envelope<Request>) -> Option<Envelope<Response>> {
        let body = match env.body {
            Request::Get { .. } => Response::Value(None),
            Request::Commit { .. } => Response::Committed,
            Request::Abort { .. } => Response::Aborted,
            _ => Response::Ok,
        };
        Some(Envelope { id: env.id, body })
    }

    fn put(key: &str) -> Request {
        Request::Put {
            key: key.into(),
            value: b"v".to_vec(),
        }
    }

    fn get(key: &str) -> Request {
        Request::Get { key: key.into() }
    }

    #[test]
    fn writes_return_unanswered_and_are_collected_in_order_before_a_get() {
        let mut guest = guest(4, 5, honest);
        {
            let go = guest.go.clone();
            let mut db = guest.db();
            db.put(b"a", b"v").unwrap();
            db.delete(b"b").unwrap();
            db.log(LogLevel::Info, "line\n").unwrap();
            assert_eq!(db.pending.len(), 3, "three answers outstanding");
            assert_eq!(db.frontend.in_flight(), 3);
            // Released only now: the writes above returned before any was consumed.
            go.send(()).unwrap();
            assert_eq!(db.get(b"c").unwrap(), None);
            assert!(db.pending.is_empty());
            assert_eq!(db.frontend.in_flight(), 0);
            db.put(b"d", b"v").unwrap();
            assert_eq!(db.settle().unwrap(), None);
        }
        assert_eq!(guest.frontend.in_flight(), 0);
        let requests = guest.requests();
        assert_eq!(
            requests,
            [
                put("a"),
                Request::Delete { key: b"b".to_vec() },
                Request::Log {
                    level: WireLogLevel::Info,
                    line: "line\u{FFFD}".into()
                },
                get("c"),
                put("d"),
            ]
        );
    }

    /// `Value(key)` for every get, `Ok` to writes.
    fn echo_keys(env: &Envelope<Request>) -> Option<Envelope<Response>> {
        let body = match &env.body {
            Request::Get { key } => Response::Value(Some(key.clone())),
            _ => Response::Ok,
        };
        Some(Envelope { id: env.id, body })
    }

    #[test]
    fn get_many_returns_values_in_order_across_more_keys_than_slots() {
        let mut guest = guest(2, 9, echo_keys);
        guest.go.send(()).unwrap();
        {
            let mut db = guest.db();
            db.put(b"w", b"v").unwrap();
            let keys: Vec<Vec<u8>> = (0..7u8).map(|i| vec![b'k', b'0' + i]).collect();
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let values = db.get_many(&refs).unwrap();
            assert_eq!(values, keys.iter().cloned().map(Some).collect::<Vec<_>>());
            assert!(
                db.pending.is_empty(),
                "the write's answer was collected first"
            );
            assert_eq!(db.frontend.in_flight(), 0);
            assert_eq!(db.get_many(&[]).unwrap(), Vec::<Option<Vec<u8>>>::new());
            assert_eq!(db.get(b"z").unwrap(), Some(b"z".to_vec()));
        }
        let requests = guest.requests();
        assert_eq!(requests.first(), Some(&put("w")));
        assert_eq!(requests.len(), 9);
        assert_eq!(requests.get(1), Some(&get("k0")));
        assert_eq!(requests.get(7), Some(&get("k6")));
    }

    #[test]
    fn get_many_reads_every_answer_of_a_batch_and_returns_the_first_error() {
        // The agent refuses the second key (not a denial: it goes on serving).
        let mut guest = guest(4, 4, |env| {
            let body = match &env.body {
                Request::Get { key } if key == b"bad" => Response::Error {
                    code: error_code::LIMIT_EXCEEDED,
                    message: "too many".into(),
                },
                Request::Get { key } => Response::Value(Some(key.clone())),
                _ => Response::Ok,
            };
            Some(Envelope { id: env.id, body })
        });
        guest.go.send(()).unwrap();
        {
            let mut db = guest.db();
            let err = db.get_many(&[b"a", b"bad", b"c"]).unwrap_err();
            assert!(matches!(err, DbError::LimitExceeded { .. }), "{err:?}");
            // Every answer of the batch was read: the ring is in step for the next call.
            assert_eq!(db.frontend.in_flight(), 0);
            assert_eq!(db.get(b"d").unwrap(), Some(b"d".to_vec()));
            // Checked locally before anything is sent.
            let long = vec![b'x'; limits::MAX_KEY_LEN + 1];
            let err = db.get_many(&[b"e", &long]).unwrap_err();
            assert!(matches!(err, DbError::BadRequest { .. }), "{err:?}");
            assert_eq!(db.settle().unwrap(), None);
        }
        assert_eq!(guest.requests(), [get("a"), get("bad"), get("c"), get("d")]);
    }

    #[test]
    fn a_deferred_denial_is_returned_by_every_later_operation_and_by_settle() {
        let mut guest = guest(4, 3, |env| {
            let body = match &env.body {
                Request::Put { key, .. } if key == b"secret" => Response::Error {
                    code: error_code::DENIED,
                    message: "rule r".into(),
                },
                _ => honest(env)?.body,
            };
            Some(Envelope { id: env.id, body })
        });
        guest.go.send(()).unwrap();
        let denied = DbError::Denied {
            message: "rule r".into(),
        };
        {
            let mut db = guest.db();
            db.put(b"a", b"v").unwrap();
            db.put(b"secret", b"v").unwrap();
            assert_eq!(db.get(b"a"), Err(denied.clone()));
            assert_eq!(db.deferred_error(), Some(&denied));
            assert_eq!(db.put(b"b", b"v"), Err(denied.clone()));
            assert_eq!(db.scan(b"", None, 1), Err(denied.clone()));
            assert_eq!(db.log(LogLevel::Info, "x"), Err(denied.clone()));
            assert_eq!(db.settle().unwrap(), Some(denied));
        }
        // Nothing was sent after the denied put (the agent would have recorded it).
        assert_eq!(guest.frontend.in_flight(), 0);
        assert_eq!(guest.requests(), [put("a"), put("secret")]);
    }

    #[test]
    fn a_deferred_ledger_error_is_kept_while_the_agent_goes_on_serving() {
        let mut guest = guest(4, 4, |env| {
            let body = match &env.body {
                Request::Delete { .. } => Response::Error {
                    code: error_code::LIMIT_EXCEEDED,
                    message: "write set".into(),
                },
                _ => honest(env)?.body,
            };
            Some(Envelope { id: env.id, body })
        });
        guest.go.send(()).unwrap();
        let limit = DbError::LimitExceeded {
            message: "write set".into(),
        };
        {
            let mut db = guest.db();
            db.delete(b"a").unwrap();
            db.delete(b"b").unwrap(); // also refused: the first error is the one kept
            db.put(b"c", b"v").unwrap();
            assert_eq!(db.settle().unwrap(), Some(limit));
        }
        // Every answer was collected: the ring is idle, ready for the runtime's Abort.
        assert_eq!(guest.frontend.in_flight(), 0);
        let abort = Request::Abort { reason: "r".into() };
        let reply = guest.frontend.call(&abort, &guest.notifier, Some(WAIT));
        assert_eq!(reply.unwrap(), Response::Aborted);
        let requests = guest.requests();
        assert_eq!(requests.len(), 4);
        assert_eq!(requests[3], abort);
    }

    /// Counts notifications.
    #[derive(Default)]
    struct Bell(std::cell::Cell<u32>);

    impl Notifier for Bell {
        fn notify(&self) -> Result<(), mayfly_ring::notify::NotifyError> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }

        fn wait(
            &self,
            _: Option<Duration>,
        ) -> Result<mayfly_ring::Wake, mayfly_ring::notify::NotifyError> {
            Ok(mayfly_ring::Wake::TimedOut)
        }
    }

    /// The guest's notifier, playing the agent synchronously: each `wait` answers **one**
    /// published request honestly (the guest looks again between any two answers); it
    /// counts the guest's notifications and those the agent's answers call for.
    struct Stepping {
        backend: std::cell::RefCell<Backend<Mem>>,
        agent_woken: Bell,
        guest_woken: Bell,
    }

    impl Notifier for Stepping {
        fn notify(&self) -> Result<(), mayfly_ring::notify::NotifyError> {
            self.agent_woken.notify()
        }

        fn wait(
            &self,
            _: Option<Duration>,
        ) -> Result<mayfly_ring::Wake, mayfly_ring::notify::NotifyError> {
            let mut backend = self.backend.borrow_mut();
            if let Some(env) = backend.try_recv_request().unwrap() {
                let reply = honest(&env).unwrap();
                backend
                    .send_response(reply.id, &reply.body, &self.guest_woken)
                    .unwrap();
            }
            // Nothing left to serve: the agent goes to sleep, asking to be notified.
            let _ = backend.final_check_for_requests().unwrap();
            Ok(mayfly_ring::Wake::Notified)
        }
    }

    #[test]
    fn a_transfer_wakes_the_agent_twice_and_is_woken_twice() {
        let geometry = Geometry::new(8, 1).unwrap();
        let mem = Arc::new(MockMem::new(geometry.total_len()).unwrap());
        let agent = Stepping {
            backend: Backend::new(Arc::clone(&mem), geometry).unwrap().into(),
            agent_woken: Bell::default(),
            guest_woken: Bell::default(),
        };
        let mut frontend = Frontend::attach(mem).unwrap();
        let mut db = RingDb::new(&mut frontend, &agent, WAIT);
        assert_eq!(db.get_many(&[b"from", b"to"]).unwrap(), [None, None]);
        db.put(b"from", b"1").unwrap();
        db.put(b"to", b"2").unwrap();
        db.log(LogLevel::Info, "moved").unwrap();
        let (deferred, answer) = db.commit_behind(b"ok".to_vec(), WAIT).unwrap();
        assert!(deferred.is_none());
        assert_eq!(answer, Response::Committed);
        // Six requests: one notification for the two Gets, one for the writes and Commit;
        // one wake-up for the two Values, one for the four answers ending in Committed.
        assert_eq!(agent.agent_woken.0.get(), 2, "notifications to the agent");
        assert_eq!(agent.guest_woken.0.get(), 2, "wake-ups of the guest");
    }

    #[test]
    fn commit_goes_right_behind_unanswered_writes() {
        // The agent holds its answers until it has read the Commit.
        let mut guest = guest_with(4, 3, true, honest);
        {
            let go = guest.go.clone();
            let mut db = guest.db();
            db.put(b"a", b"v").unwrap();
            db.put(b"b", b"v").unwrap();
            // The agent starts only now: Commit was queued behind two unread writes.
            go.send(()).unwrap();
            let (deferred, answer) = db.commit_behind(b"r".to_vec(), WAIT).unwrap();
            assert_eq!((deferred, answer), (None, Response::Committed));
        }
        assert_eq!(guest.frontend.in_flight(), 0);
        let commit = Request::Commit {
            result: b"r".to_vec(),
        };
        assert_eq!(guest.requests(), [put("a"), put("b"), commit]);
    }

    #[test]
    fn a_commit_behind_a_refused_write_reports_the_write_error_and_the_refusal() {
        // Like the agent: a write refused by the ledger, then `Aborted` to the Commit.
        let mut refused = false;
        let mut guest = guest(2, 3, move |env| {
            let body = match &env.body {
                Request::Put { key, .. } if key == b"a" => {
                    refused = true;
                    Response::Error {
                        code: error_code::LIMIT_EXCEEDED,
                        message: "write set".into(),
                    }
                }
                Request::Commit { .. } if refused => Response::Aborted,
                _ => honest(env)?.body,
            };
            Some(Envelope { id: env.id, body })
        });
        guest.go.send(()).unwrap();
        {
            let mut db = guest.db();
            db.put(b"a", b"v").unwrap();
            db.put(b"b", b"v").unwrap(); // the ring (2 slots) is now full
            let (deferred, answer) = db.commit_behind(b"r".to_vec(), WAIT).unwrap();
            let limit = DbError::LimitExceeded {
                message: "write set".into(),
            };
            assert_eq!((deferred, answer), (Some(limit), Response::Aborted));
        }
        // A full ring made room first: the Commit still went last.
        let requests = guest.requests();
        assert_eq!(requests.len(), 3);
        assert!(matches!(requests[2], Request::Commit { .. }));
    }

    #[test]
    fn a_full_ring_collects_answers_before_the_next_write() {
        let mut guest = guest(2, 8, honest);
        {
            let go = guest.go.clone();
            let mut db = guest.db();
            db.put(b"k1", b"v").unwrap();
            db.put(b"k2", b"v").unwrap();
            // Both slots hold unanswered writes, and the agent has not started.
            assert_eq!(db.pending.len(), 2);
            go.send(()).unwrap();
            for i in 3..=7 {
                db.put(format!("k{i}").as_bytes(), b"v").unwrap();
                assert!(db.pending.len() <= 2);
            }
            assert_eq!(db.get(b"k1").unwrap(), None);
            assert_eq!(db.settle().unwrap(), None);
        }
        let requests = guest.requests();
        let expected: Vec<Request> = (1..=7)
            .map(|i| put(&format!("k{i}")))
            .chain([get("k1")])
            .collect();
        assert_eq!(requests, expected);
    }

    #[test]
    fn local_checks_refuse_a_write_synchronously_without_sending_it() {
        let mut guest = guest(4, 1, honest);
        {
            let go = guest.go.clone();
            let mut db = guest.db();
            let long_key = vec![b'k'; limits::MAX_KEY_LEN + 1];
            assert!(matches!(
                db.put(&long_key, b"v"),
                Err(DbError::BadRequest { .. })
            ));
            assert!(matches!(db.delete(b""), Err(DbError::BadRequest { .. })));
            assert!(db.pending.is_empty());
            // Not a deferred error: the transaction goes on.
            db.put(b"a", b"v").unwrap();
            go.send(()).unwrap();
            assert_eq!(db.settle().unwrap(), None);
        }
        assert_eq!(guest.requests(), [put("a")]);
    }

    #[test]
    fn a_wrong_id_for_a_deferred_write_gives_the_ring_up() {
        let mut guest = guest(4, 1, |env| {
            Some(Envelope {
                id: env.id.wrapping_add(7),
                body: Response::Ok,
            })
        });
        guest.go.send(()).unwrap();
        {
            let mut db = guest.db();
            db.put(b"a", b"v").unwrap();
            assert!(matches!(db.get(b"a"), Err(DbError::Transport { .. })));
            assert!(matches!(db.failure(), Some(RingError::IdMismatch { .. })));
            // Later operations fail at once, without sending anything.
            assert!(matches!(db.put(b"b", b"v"), Err(DbError::Transport { .. })));
            assert!(matches!(
                db.settle(),
                Err(RingError::IdMismatch { expected: 1, .. })
            ));
        }
        assert_eq!(guest.requests(), [put("a")]);
    }

    #[test]
    fn a_wrong_kind_of_answer_to_a_deferred_write_is_a_transport_error() {
        let mut guest = guest(4, 1, |env| {
            Some(Envelope {
                id: env.id,
                body: Response::Value(None),
            })
        });
        guest.go.send(()).unwrap();
        let wrong = DbError::Transport {
            message: "log: the agent answered with Value".into(),
        };
        {
            let mut db = guest.db();
            db.log(LogLevel::Info, "x").unwrap();
            assert_eq!(db.scan(b"", None, 1), Err(wrong.clone()));
            assert!(db.failure().is_none(), "the ring is still in step");
            assert_eq!(db.settle().unwrap(), Some(wrong));
        }
        assert_eq!(guest.requests().len(), 1);
    }

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
            agent_error(error_code::CONFLICT, m()),
            DbError::Conflict { message: m() }
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
