//! The client API: HTTP/1.1 with JSON bodies, loopback by default.
//!
//! ```text
//! POST /v1/transactions        {"handler": "transfer", "payload": {...}, "idempotency_key": "k1"}
//!   200 committed   {"tx_id", "status": "committed", "result", "seq", "domain_id", "attempts"}
//!   422 aborted     {"tx_id", "status": "aborted", "error": <handler's reason>, ...}
//!   403 refused or stopped by a policy rule (named in "error"); nothing written
//!   409 failed      serialization conflicts on every attempt (contention): retry later
//!   500 failed      {"tx_id", "status": "failed", "error": <what the domain did>, ...}
//!   400 malformed JSON or fields · 404 unknown handler · 413 body too large
//!   503 overloaded (too many in flight, or no domain in time), with Retry-After
//! GET  /v1/transactions/{id}   outcome and checkpoint summary; 404 if unknown
//! GET  /v1/health              backend, pool, ledger tips, load (+ SIEM export status)
//! POST /v1/reports             an external detector names a tx/key/handler/client as an
//!                              attack (Authorization: Bearer <detector token>); the policy
//!                              decides; rollback decisions are carried out (or dry-run)
//! ```
//!
//! The handler receives the compact JSON serialization of `payload` as its bytes. A result
//! that is valid JSON is returned as JSON; valid UTF-8 otherwise as a string; anything else
//! as `result_hex`. Errors are `{"error": "..."}` with a status that says what went wrong.
//!
//! Concurrency: a fixed set of worker threads, each blocking on the listener and running one
//! transaction at a time; `max_in_flight` bounds transactions across workers.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mayfly_executor::{ExecError, Executor, Failure, TxOutcome, TxRequest, TxStatus};
use mayfly_ledger::{codec::hex, TxId};
use serde::Deserialize;
use serde_json::{json, Value};
use slog::{info, o, warn, Logger};

/// Configuration of the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Address to listen on (loopback by default).
    pub listen: SocketAddr,
    /// Worker threads.
    pub workers: usize,
    /// Largest request body accepted, bytes.
    pub max_body: usize,
    /// Most transactions running at once; more are refused with 503.
    pub max_in_flight: usize,
    /// Transactions remembered for idempotency keys and for the status of aborted ones.
    pub remember: usize,
    /// Bearer token external detectors must present to `POST /v1/reports`; `None`
    /// disables the endpoint.
    pub detector_token: Option<String>,
    /// Extra sections of `GET /v1/health`, each a JSON value computed per request (the SIEM
    /// exporter's status, for one).
    pub health_sections: Vec<HealthSection>,
}

/// One named section of `GET /v1/health`, supplied by a part the API does not know.
#[derive(Clone)]
pub struct HealthSection {
    /// Key of the section in the health object.
    pub name: &'static str,
    /// Computes the section's value.
    pub report: Arc<dyn Fn() -> Value + Send + Sync>,
}

impl std::fmt::Debug for HealthSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthSection")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8450)),
            workers: 16,
            max_body: 256 * 1024,
            max_in_flight: 64,
            remember: 100_000,
            detector_token: None,
            health_sections: Vec::new(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// What the HTTP server reported.
        reason: String,
    },
    /// A worker thread could not be started.
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    handler: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

enum Remembered {
    InProgress {
        digest: Vec<u8>,
    },
    Done {
        digest: Vec<u8>,
        code: u16,
        body: Value,
    },
}

/// Bounded FIFO memory of recent transactions.
struct Memory {
    by_key: HashMap<String, Remembered>,
    key_order: VecDeque<String>,
    outcomes: HashMap<TxId, Value>,
    outcome_order: VecDeque<TxId>,
    cap: usize,
}

impl Memory {
    fn remember_outcome(&mut self, id: TxId, body: Value) {
        if self.outcomes.insert(id, body).is_none() {
            self.outcome_order.push_back(id);
            while self.outcome_order.len() > self.cap {
                if let Some(old) = self.outcome_order.pop_front() {
                    self.outcomes.remove(&old);
                }
            }
        }
    }
    fn remember_key(&mut self, key: String, value: Remembered) {
        if self.by_key.insert(key.clone(), value).is_none() {
            self.key_order.push_back(key);
            while self.key_order.len() > self.cap {
                if let Some(old) = self.key_order.pop_front() {
                    self.by_key.remove(&old);
                }
            }
        }
    }
}

struct Shared {
    executor: Arc<Executor>,
    config: ApiConfig,
    in_flight: AtomicUsize,
    memory: Mutex<Memory>,
    log: Logger,
}

/// A running API server.
pub struct Server {
    http: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Server {
    /// Binds and starts the workers.
    pub fn start(
        config: ApiConfig,
        executor: Arc<Executor>,
        log: &Logger,
    ) -> Result<Self, ApiError> {
        let log = log.new(o!("component" => "api"));
        let http = tiny_http::Server::http(config.listen).map_err(|e| ApiError::Bind {
            addr: config.listen,
            reason: e.to_string(),
        })?;
        let addr = http.server_addr().to_ip().unwrap_or(config.listen);
        let http = Arc::new(http);
        let shared = Arc::new(Shared {
            executor,
            memory: Mutex::new(Memory {
                by_key: HashMap::new(),
                key_order: VecDeque::new(),
                outcomes: HashMap::new(),
                outcome_order: VecDeque::new(),
                cap: config.remember.max(1),
            }),
            in_flight: AtomicUsize::new(0),
            config: config.clone(),
            log: log.clone(),
        });
        let mut workers = Vec::new();
        for i in 0..config.workers.max(1) {
            let (http, shared) = (http.clone(), shared.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("api-{i}"))
                    .spawn(move || worker(&http, &shared))
                    .map_err(ApiError::Thread)?,
            );
        }
        info!(log, "client API listening"; "addr" => %addr, "workers" => config.workers);
        Ok(Self {
            http,
            workers,
            addr,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting requests and waits for the workers to finish theirs.
    pub fn shutdown(self) {
        for _ in &self.workers {
            self.http.unblock();
        }
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn worker(http: &tiny_http::Server, shared: &Shared) {
    while let Ok(request) = http.recv() {
        handle(request, shared);
    }
}

fn respond(request: tiny_http::Request, code: u16, body: &Value, extra: Option<(&str, &str)>) {
    let mut response =
        tiny_http::Response::from_data(body.to_string().into_bytes()).with_status_code(code);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
        response.add_header(h);
    }
    if let Some((name, value)) = extra {
        if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    let _ = request.respond(response);
}

fn error(request: tiny_http::Request, code: u16, message: &str) {
    respond(request, code, &json!({ "error": message }), None);
}

fn handle(mut request: tiny_http::Request, shared: &Shared) {
    let method = request.method().clone();
    let url = request.url().to_owned();
    let path = url.split('?').next().unwrap_or("");
    match (&method, path) {
        (tiny_http::Method::Post, "/v1/transactions") => {
            let body = match read_body(&mut request, shared.config.max_body) {
                Ok(b) => b,
                Err((code, msg)) => return error(request, code, &msg),
            };
            // The client is its address, without the port: rates apply per host.
            let client = request
                .remote_addr()
                .map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
            let (code, body, retry) = submit(shared, &body, client);
            let extra = retry.then_some(("Retry-After", "1"));
            respond(request, code, &body, extra);
        }
        (tiny_http::Method::Post, "/v1/reports") => {
            let auth = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.as_str().to_owned());
            if !authorized(shared, auth.as_deref()) {
                let client = request
                    .remote_addr()
                    .map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
                let reason = "missing or wrong bearer token";
                let ev = mayfly_ledger::AuditEvent::new(
                    "report.rejected",
                    mayfly_ledger::Severity::Warning,
                )
                .field("reason", reason)
                .field("client", &client);
                // Repeats from one client are counted, not recorded one by one.
                shared
                    .executor
                    .audit_refusal(&client, "report.rejected", reason, ev);
                return error(
                    request,
                    401,
                    "reports need `Authorization: Bearer <detector token>`",
                );
            }
            let body = match read_body(&mut request, shared.config.max_body) {
                Ok(b) => b,
                Err((code, msg)) => return error(request, code, &msg),
            };
            let (code, body) = report(shared, &body);
            respond(request, code, &body, None);
        }
        (tiny_http::Method::Get, "/v1/health") => {
            let body = health(shared);
            respond(request, 200, &body, None);
        }
        (tiny_http::Method::Get, p) if p.starts_with("/v1/transactions/") => {
            let id = &p["/v1/transactions/".len()..];
            let (code, body) = lookup(shared, id);
            respond(request, code, &body, None);
        }
        (_, "/v1/transactions" | "/v1/health" | "/v1/reports") => {
            error(request, 405, "method not allowed")
        }
        _ => error(
            request,
            404,
            "no such endpoint; see /v1/transactions and /v1/health",
        ),
    }
}

fn read_body(request: &mut tiny_http::Request, max: usize) -> Result<Vec<u8>, (u16, String)> {
    if request.body_length().is_some_and(|n| n > max) {
        return Err((413, format!("request body above the limit of {max} bytes")));
    }
    let mut body = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    request
        .as_reader()
        .take(limit)
        .read_to_end(&mut body)
        .map_err(|e| (400, format!("reading the request body: {e}")))?;
    if body.len() > max {
        return Err((413, format!("request body above the limit of {max} bytes")));
    }
    Ok(body)
}

fn result_json(result: &[u8]) -> (&'static str, Value) {
    if let Ok(v) = serde_json::from_slice::<Value>(result) {
        ("result", v)
    } else if let Ok(s) = std::str::from_utf8(result) {
        ("result", Value::String(s.to_owned()))
    } else {
        ("result_hex", Value::String(hex(result)))
    }
}

fn outcome_json(o: &TxOutcome) -> (u16, Value) {
    let mut body = json!({
        "tx_id": o.tx_id.to_string(),
        "status": o.status.as_str(),
        "domain_id": o.domain_id,
        "attempts": o.attempts,
    });
    if let Some(map) = body.as_object_mut() {
        match o.status {
            TxStatus::Committed => {
                let (name, value) = result_json(&o.result);
                map.insert(name.into(), value);
                if let Some(seq) = o.seq {
                    map.insert("seq".into(), json!(seq));
                }
            }
            TxStatus::Aborted | TxStatus::Failed => {
                map.insert("error".into(), json!(o.error.clone().unwrap_or_default()));
            }
        }
    }
    let code = match (o.status, &o.failure) {
        (TxStatus::Committed, _) => 200,
        (TxStatus::Aborted, _) => 422,
        // Contention, not a fault: the client may retry.
        (TxStatus::Failed, Some(Failure::Conflicts)) => 409,
        (TxStatus::Failed, Some(Failure::Policy { .. })) => 403,
        (TxStatus::Failed, _) => 500,
    };
    (code, body)
}

/// Runs one submission; returns status, body, and whether to send Retry-After.
fn submit(shared: &Shared, raw: &[u8], client: String) -> (u16, Value, bool) {
    let body: SubmitBody = match serde_json::from_slice(raw) {
        Ok(b) => b,
        Err(e) => {
            return (
                400,
                json!({ "error": format!("malformed request: {e}") }),
                false,
            )
        }
    };
    let payload = match serde_json::to_vec(&body.payload) {
        Ok(p) => p,
        Err(e) => return (400, json!({ "error": format!("payload: {e}") }), false),
    };
    if let Some(key) = &body.idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            let msg = format!("idempotency_key must be 1..={MAX_IDEMPOTENCY_KEY} bytes");
            return (400, json!({ "error": msg }), false);
        }
    }
    if !shared.executor.handlers().any(|h| h == body.handler) {
        let known: Vec<&str> = shared.executor.handlers().collect();
        let msg = format!(
            "unknown handler {:?}; known: {}",
            body.handler,
            known.join(", ")
        );
        return (404, json!({ "error": msg }), false);
    }
    if payload.len() > mayfly_executor::MAX_PAYLOAD {
        let msg = format!(
            "payload of {} bytes is above the limit of {}",
            payload.len(),
            mayfly_executor::MAX_PAYLOAD
        );
        return (413, json!({ "error": msg }), false);
    }
    let digest = [body.handler.as_bytes(), &[0], &payload].concat();
    if let Some(key) = &body.idempotency_key {
        let Ok(mut mem) = shared.memory.lock() else {
            return (500, json!({ "error": "internal state poisoned" }), false);
        };
        match mem.by_key.get(key) {
            Some(Remembered::Done {
                digest: d,
                code,
                body,
            }) if *d == digest => return (*code, body.clone(), false),
            Some(Remembered::InProgress { digest: d }) if *d == digest => {
                let msg = "a transaction with this idempotency key is still running";
                return (409, json!({ "error": msg }), true);
            }
            Some(_) => {
                let msg = "idempotency key already used for a different request";
                return (422, json!({ "error": msg }), false);
            }
            None => mem.remember_key(
                key.clone(),
                Remembered::InProgress {
                    digest: digest.clone(),
                },
            ),
        }
    }
    let forget_key = |shared: &Shared| {
        if let (Some(key), Ok(mut mem)) = (&body.idempotency_key, shared.memory.lock()) {
            mem.by_key.remove(key);
        }
    };

    let running = shared.in_flight.fetch_add(1, Ordering::AcqRel);
    if running >= shared.config.max_in_flight {
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        forget_key(shared);
        let msg = format!(
            "overloaded: {running} transactions in flight (limit {})",
            shared.config.max_in_flight
        );
        return (503, json!({ "error": msg }), true);
    }
    let result = shared.executor.execute(&TxRequest {
        handler: body.handler.clone(),
        payload,
        client,
    });
    shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    match result {
        Ok(outcome) => {
            let (code, json_body) = outcome_json(&outcome);
            let retry = code == 409;
            if let Ok(mut mem) = shared.memory.lock() {
                if outcome.status != TxStatus::Committed {
                    mem.remember_outcome(outcome.tx_id, json_body.clone());
                }
                if let Some(key) = body.idempotency_key {
                    mem.remember_key(
                        key,
                        Remembered::Done {
                            digest,
                            code,
                            body: json_body.clone(),
                        },
                    );
                }
            }
            (code, json_body, retry)
        }
        Err(e) => {
            forget_key(shared);
            match e {
                ExecError::UnknownHandler(_) => (404, json!({ "error": e.to_string() }), false),
                ExecError::PayloadTooLarge { .. } => {
                    (413, json!({ "error": e.to_string() }), false)
                }
                ExecError::Unavailable(_) => {
                    warn!(shared.log, "refusing a transaction"; "reason" => %e);
                    (503, json!({ "error": e.to_string() }), true)
                }
                ExecError::Ledger(_) | ExecError::DomainNumber(_) => {
                    (503, json!({ "error": e.to_string() }), true)
                }
                ExecError::Denied { .. } => (403, json!({ "error": e.to_string() }), false),
            }
        }
    }
}

/// Whether `header` carries the detector token (compared through digests, so the time
/// taken does not depend on how much of a guess was right).
fn authorized(shared: &Shared, header: Option<&str>) -> bool {
    let (Some(token), Some(header)) = (shared.config.detector_token.as_deref(), header) else {
        return false;
    };
    let Some(given) = header.strip_prefix("Bearer ") else {
        return false;
    };
    mayfly_ledger::checkpoint::sha256(given.trim().as_bytes())
        == mayfly_ledger::checkpoint::sha256(token.as_bytes())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportBody {
    tx_id: Option<String>,
    key: Option<String>,
    handler: Option<String>,
    client: Option<String>,
    reason: String,
    #[serde(default)]
    dry_run: bool,
}

fn report(shared: &Shared, raw: &[u8]) -> (u16, Value) {
    use mayfly_executor::ReportTarget;
    let body: ReportBody = match serde_json::from_slice(raw) {
        Ok(b) => b,
        Err(e) => return (400, json!({ "error": format!("malformed report: {e}") })),
    };
    let targets = [&body.tx_id, &body.key, &body.handler, &body.client];
    if targets.iter().filter(|t| t.is_some()).count() != 1 {
        return (
            400,
            json!({ "error": "name exactly one of tx_id, key, handler, client" }),
        );
    }
    if body.reason.len() > 1000 {
        return (400, json!({ "error": "reason is limited to 1000 bytes" }));
    }
    let target = if let Some(id) = &body.tx_id {
        match TxId::parse(id) {
            Some(id) => ReportTarget::Tx(id),
            None => return (400, json!({ "error": "tx_id is 32 hex digits" })),
        }
    } else if let Some(k) = &body.key {
        if k.is_empty() || k.len() > mayfly_ledger::limits::MAX_KEY {
            let msg = format!("key must be 1..={} bytes", mayfly_ledger::limits::MAX_KEY);
            return (400, json!({ "error": msg }));
        }
        ReportTarget::Key(k.as_bytes().to_vec())
    } else if let Some(h) = &body.handler {
        ReportTarget::Handler(h.clone())
    } else {
        ReportTarget::Client(body.client.clone().unwrap_or_default())
    };
    match shared.executor.report(&target, &body.reason, body.dry_run) {
        Ok(o) => {
            let rollback = o.plan.as_ref().map(|p| {
                json!({
                    "dry_run": body.dry_run,
                    "seq": o.rollback_seq,
                    "roots": p.roots,
                    "affected": p.affected,
                    "replay": p.replay,
                    "restored_keys": p.writes.iter().map(|w| String::from_utf8_lossy(&w.key).into_owned()).collect::<Vec<_>>(),
                })
            });
            let replayed: Vec<Value> = o
                .replayed
                .iter()
                .map(|r| {
                    json!({
                        "original_seq": r.original_seq,
                        "original_tx": r.original_tx.to_string(),
                        "same_result": r.same_result,
                        "status": r.outcome.as_ref().map_or("not run", |x| x.status.as_str()),
                        "error": r.outcome.as_ref().map_or_else(|e| Some(e.clone()), |x| x.error.clone()),
                    })
                })
                .collect();
            (
                200,
                json!({ "action": o.action, "rule": o.rule, "rollback": rollback, "replayed": replayed }),
            )
        }
        Err(mayfly_executor::ReportError::NotFound(what)) => (404, json!({ "error": what })),
        Err(mayfly_executor::ReportError::Rollback(e)) => (409, json!({ "error": e.to_string() })),
        Err(e) => (500, json!({ "error": e.to_string() })),
    }
}

fn lookup(shared: &Shared, id: &str) -> (u16, Value) {
    let Some(tx_id) = TxId::parse(id) else {
        return (400, json!({ "error": "a transaction id is 32 hex digits" }));
    };
    let store = shared.executor.ledger().store();
    match store.seq_of(&tx_id) {
        Ok(Some(seq)) => match store.checkpoint(seq) {
            Ok(Some(cp)) => {
                let (name, result) = result_json(&cp.result);
                let mut body = json!({
                    "tx_id": tx_id.to_string(),
                    "status": "committed",
                    "checkpoint": {
                        "seq": cp.seq,
                        "handler": cp.handler,
                        "domain_id": cp.domain_id,
                        "begin_ns": cp.begin_ns,
                        "commit_ns": cp.commit_ns,
                        "policy_hash": hex(&cp.policy_hash),
                        "request_digest": hex(&mayfly_ledger::checkpoint::sha256(&cp.request)),
                        "reads": cp.reads.len(),
                        "writes": cp.writes.len(),
                        "written_keys": cp.writes.iter().map(|w| String::from_utf8_lossy(&w.key).into_owned()).collect::<Vec<_>>(),
                    },
                });
                if let Some(map) = body.as_object_mut() {
                    map.insert(name.into(), result);
                    // Undone by a rollback: say so, and by which record of the chain.
                    match store.undone_by(seq) {
                        Ok(Some(by)) => {
                            map.insert("status".into(), json!("rolled_back"));
                            map.insert("rolled_back_by".into(), json!({ "seq": by }));
                        }
                        Ok(None) => {}
                        Err(e) => return (500, json!({ "error": e.to_string() })),
                    }
                }
                (200, body)
            }
            Ok(None) => (
                500,
                json!({ "error": format!("checkpoint {seq} is missing") }),
            ),
            Err(e) => (500, json!({ "error": e.to_string() })),
        },
        Ok(None) => match shared
            .memory
            .lock()
            .ok()
            .and_then(|m| m.outcomes.get(&tx_id).cloned())
        {
            Some(body) => (200, body),
            None => (404, json!({ "error": format!("no transaction {tx_id}") })),
        },
        Err(e) => (500, json!({ "error": e.to_string() })),
    }
}

fn health(shared: &Shared) -> Value {
    let stats = shared.executor.backend().stats();
    let tips = shared.executor.ledger().tips();
    let mut health = json!({
        "status": "ok",
        "backend": shared.executor.backend().name(),
        "pool": {
            "ready": stats.ready,
            "in_use": stats.in_use,
            "created": stats.created,
            "destroyed": stats.destroyed,
            "failed": stats.failed,
        },
        "ledger": {
            "checkpoint_seq": tips.checkpoints.seq,
            "checkpoint_hash": hex(&tips.checkpoints.hash),
            "audit_seq": tips.audit.seq,
            "group": tips.group,
            "public_key": hex(&shared.executor.ledger().public_key()),
        },
        "in_flight": shared.in_flight.load(Ordering::Acquire),
        "max_in_flight": shared.config.max_in_flight,
    });
    if let Some(obj) = health.as_object_mut() {
        for section in &shared.config.health_sections {
            obj.insert(section.name.to_owned(), (section.report)());
        }
    }
    health
}
