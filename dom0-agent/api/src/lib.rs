//! The client API: HTTP/1.1 with JSON bodies, loopback by default, TLS and mutual TLS
//! optional.
//!
//! ```text
//! POST /v1/transactions        {"handler": "transfer", "payload": {...}, "idempotency_key": "k1"}
//!   200 committed   {"tx_id", "status": "committed", "result", "seq", "domain_id", "attempts"}
//!   422 aborted     {"tx_id", "status": "aborted", "error": <handler's reason>, ...}
//!   403 refused or stopped by a policy rule (named in "error"); nothing written
//!   409 failed      serialization conflicts on every attempt (contention): retry later
//!   500 failed      {"tx_id", "status": "failed", "error": <what the domain did>, ...}
//!   400 malformed JSON or fields · 404 unknown handler · 413 body too large
//!   503 overloaded (too many in flight, too many of this client's, or no domain in time),
//!       with Retry-After
//! GET  /v1/transactions/{id}   outcome and checkpoint summary; 404 if unknown
//! GET  /v1/health              backend, pool, ledger tips, load (+ SIEM export status)
//! GET  /metrics                Prometheus text format
//! POST /v1/reports             an external detector names a tx/key/handler/client as an
//!                              attack (Authorization: Bearer <detector token>); the policy
//!                              decides; rollback decisions are carried out (or dry-run)
//! ```
//!
//! The handler receives the compact JSON serialization of `payload` as its bytes. A result
//! that is valid JSON is returned as JSON; valid UTF-8 otherwise as a string; anything else
//! as `result_hex`. Errors are `{"error": "..."}` with a status that says what went wrong.
//!
//! Concurrency: async at the network edge only. A small tokio runtime (`workers` threads)
//! accepts connections and parses HTTP with hyper under explicit limits ([`Limits`]); a
//! transaction is admitted against `max_in_flight` and `max_per_client` (503 + Retry-After
//! beyond them, at once) and then runs, blocking, on the runtime's blocking pool, which is
//! sized from `max_in_flight`: a waiting or running transaction holds no network thread.

#![forbid(unsafe_code)]

mod metrics;
mod net;
pub mod proxy;
pub mod tls;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use mayfly_executor::{ExecError, Executor, Failure, TxOutcome, TxRequest, TxStatus};
use mayfly_incident::{view, Incidents, ReportError, ReportTarget};
use mayfly_ledger::{codec::hex, TxId};
use serde::Deserialize;
use serde_json::{json, Value};
use slog::{o, warn, Logger};

pub use metrics::{family as metrics_family, MetricsSection};
pub use tls::{TlsError, TlsFiles};

/// Limits of the HTTP layer; every one is a `serve` flag and configuration key.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes; beyond: 431, closed.
    pub max_header_bytes: usize,
    /// Most header fields in a request; beyond: 431, closed.
    pub max_headers: usize,
    /// Time to receive a whole request head, from the moment the connection waits for it
    /// (so also the longest idle time of a kept-alive connection); beyond: closed.
    pub header_timeout: Duration,
    /// Time to receive a whole request body once its head is in; beyond: 408, closed.
    pub body_timeout: Duration,
    /// Time a connection may stay open without a request in progress, after a response.
    pub idle_timeout: Duration,
    /// Most client connections open at once; beyond: answered 503 and closed at once.
    pub max_connections: usize,
    /// Largest request body, bytes; beyond (declared or received): 413, closed.
    pub max_body: usize,
    /// Longest time a response write may make no progress (the client reads nothing, its
    /// window is full); beyond: the connection is closed, whatever it holds.
    pub write_timeout: Duration,
    /// Most TLS handshakes in progress at once; a TLS connection accepted beyond them is
    /// closed at once, without a handshake.
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            max_connections: 2048,
            max_body: 256 * 1024,
            max_handshakes: 64,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Configuration of the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Address to listen on (loopback by default).
    pub listen: SocketAddr,
    /// Network threads (the async runtime's workers); transactions do not run on them.
    pub workers: usize,
    /// Limits of the HTTP layer.
    pub limits: Limits,
    /// Most transactions admitted at once; more are refused with 503. Also the size of the
    /// blocking pool they run on.
    pub max_in_flight: usize,
    /// Most transactions of one client (see [`ApiConfig::tls`] for what names a client)
    /// admitted at once; more are refused with 503.
    pub max_per_client: usize,
    /// Transactions remembered for idempotency keys and for the status of aborted ones.
    pub remember: usize,
    /// Bearer token external detectors must present to `POST /v1/reports`; `None`
    /// disables the endpoint.
    pub detector_token: Option<String>,
    /// Extra sections of `GET /v1/health`, each a JSON value computed per request (the SIEM
    /// exporter's status, for one).
    pub health_sections: Vec<HealthSection>,
    /// Extra families of `GET /metrics`.
    pub metrics_sections: Vec<MetricsSection>,
    /// TLS: `None` serves plain HTTP. With a client CA, clients are named by the SHA-256
    /// of their certificate's SubjectPublicKeyInfo (`spki:<hex>`); otherwise by their IP
    /// address.
    pub tls: Option<TlsFiles>,
    /// Peers whose connections start with a PROXY protocol v2 header naming the client's
    /// address (a TCP load balancer); empty: no header is read from anyone. A peer in the
    /// list must send one, a peer not in it is served as itself (a header from it is
    /// garbage to HTTP or TLS and refused as such).
    pub proxy_from: Vec<proxy::ProxyNet>,
    /// While this says why, client transactions are refused with 503 and that reason,
    /// and `GET /v1/health` reports `"status": "fenced"` (a former primary whose standby
    /// was promoted, docs/failover.md). `None`: never refused this way.
    pub fence: Option<Fence>,
}

/// Says why transactions must be refused now (`None`: they are served).
#[derive(Clone)]
pub struct Fence(pub Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fence")
    }
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
            workers: 2,
            limits: Limits::default(),
            max_in_flight: 64,
            max_per_client: 8,
            remember: 100_000,
            detector_token: None,
            health_sections: Vec::new(),
            metrics_sections: Vec::new(),
            tls: None,
            proxy_from: Vec::new(),
            fence: None,
        }
    }
}

/// Why the server could not start, or could not reload.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// What the system reported.
        source: std::io::Error,
    },
    /// The network runtime could not be started.
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
    /// A limit is out of range.
    #[error("invalid limit: {0}")]
    Limit(String),
    /// The TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A TLS reload was asked of a server without TLS.
    #[error("TLS is not configured")]
    NoTls,
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

/// Blocking threads for valid detector reports ([`Shared::reports`]).
const REPORT_BLOCKING: usize = 2;
/// Blocking threads for the audit records of refused requests (rejected reports, admission
/// 503s: [`Shared::refusal_writers`]); when all are busy a refusal is counted in memory only.
const REFUSAL_BLOCKING: usize = 2;
/// Blocking threads for ledger reads (`GET /v1/transactions/{id}`, `/v1/health`,
/// `/metrics`: [`Shared::reads`]); when all are busy the read is answered 503 at once.
const READ_BLOCKING: usize = 4;
/// Blocking threads beyond `max_in_flight`.
const AUX_BLOCKING: usize = REPORT_BLOCKING + REFUSAL_BLOCKING + READ_BLOCKING;

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

/// An idempotency key as remembered: the client's identity and the key it sent, so one
/// client can neither read nor squat another's keys.
type KeyOf = (String, String);

/// Bounded FIFO memory of recent transactions.
struct Memory {
    by_key: HashMap<KeyOf, Remembered>,
    key_order: VecDeque<KeyOf>,
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
    fn remember_key(&mut self, key: KeyOf, value: Remembered) {
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

/// A rate limit on a log line a client can trigger: at most [`LogLimit::PER_SECOND`] lines
/// a second; the lines dropped are counted into the next one that is written.
struct LogLimit {
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimit {
    const PER_SECOND: u32 = 5;

    fn new() -> Self {
        Self {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(lines dropped since the last one written)` if this line may be written now.
    fn allow(&self, now: Instant) -> Option<u64> {
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        let (window, written, dropped) = &mut *state;
        if now.saturating_duration_since(*window) >= Duration::from_secs(1) {
            *window = now;
            *written = 0;
        }
        if *written >= Self::PER_SECOND {
            *dropped = dropped.saturating_add(1);
            return None;
        }
        *written += 1;
        Some(std::mem::take(dropped))
    }
}

struct Shared {
    executor: Arc<Executor>,
    /// Reports and the checkpoint view.
    incidents: Arc<Incidents>,
    /// Rate limit of the per-request "refusing a transaction" warning.
    refusal_log: LogLimit,
    config: ApiConfig,
    in_flight: AtomicUsize,
    /// Transactions admitted per client; an entry is removed when it reaches 0, so the map
    /// holds at most `max_in_flight` entries.
    per_client: Mutex<HashMap<Arc<str>, usize>>,
    /// Permits for valid detector reports on the blocking pool (awaited: authenticated).
    reports: Arc<tokio::sync::Semaphore>,
    /// Permits for the durable audit records of refusals (never awaited: a refused client
    /// must not make others wait).
    refusal_writers: Arc<tokio::sync::Semaphore>,
    /// Permits for ledger reads on the blocking pool (never awaited: 503 when none is free).
    reads: Arc<tokio::sync::Semaphore>,
    memory: Mutex<Memory>,
    metrics: metrics::Metrics,
    tls: Option<tls::Current>,
    log: Logger,
}

/// A transaction's place among those admitted; released on drop.
struct Admission {
    shared: Arc<Shared>,
    client: Arc<str>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Ok(mut map) = self.shared.per_client.lock() {
            if let Some(n) = map.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.client);
                }
            }
        }
    }
}

/// Why a transaction was not admitted.
enum Refusal {
    InFlight(usize),
    PerClient(usize),
}

impl Shared {
    fn admit(self: &Arc<Self>, client: &Arc<str>) -> Result<Admission, Refusal> {
        let running = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if running >= self.config.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::InFlight(running));
        }
        let Ok(mut map) = self.per_client.lock() else {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::InFlight(running));
        };
        let n = map.entry(client.clone()).or_insert(0);
        if *n >= self.config.max_per_client {
            let held = *n;
            drop(map);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerClient(held));
        }
        *n += 1;
        Ok(Admission {
            shared: self.clone(),
            client: client.clone(),
        })
    }
}

/// A running API server.
pub struct Server {
    net: net::Net,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds and starts serving: transactions through `executor`, reports and checkpoint
    /// lookups through `incidents`.
    pub fn start(
        config: ApiConfig,
        executor: Arc<Executor>,
        incidents: Arc<Incidents>,
        log: &Logger,
    ) -> Result<Self, ApiError> {
        let log = log.new(o!("component" => "api"));
        let l = &config.limits;
        if l.max_header_bytes < 1024 || l.max_headers == 0 || l.max_connections == 0 {
            return Err(ApiError::Limit(
                "max_header_bytes must be at least 1024, max_headers and max_connections at least 1"
                    .into(),
            ));
        }
        if l.header_timeout.is_zero() || l.body_timeout.is_zero() || l.idle_timeout.is_zero() {
            return Err(ApiError::Limit(
                "header, body and idle timeouts must be above 0".into(),
            ));
        }
        if config.max_in_flight == 0 || config.max_per_client == 0 || config.workers == 0 {
            return Err(ApiError::Limit(
                "workers, max_in_flight and max_per_client must be at least 1".into(),
            ));
        }
        let tls = config.tls.clone().map(tls::Current::new).transpose()?;
        let shared = Arc::new(Shared {
            executor,
            incidents,
            refusal_log: LogLimit::new(),
            memory: Mutex::new(Memory {
                by_key: HashMap::new(),
                key_order: VecDeque::new(),
                outcomes: HashMap::new(),
                outcome_order: VecDeque::new(),
                cap: config.remember.max(1),
            }),
            in_flight: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            reports: Arc::new(tokio::sync::Semaphore::new(REPORT_BLOCKING)),
            refusal_writers: Arc::new(tokio::sync::Semaphore::new(REFUSAL_BLOCKING)),
            reads: Arc::new(tokio::sync::Semaphore::new(READ_BLOCKING)),
            metrics: metrics::Metrics::default(),
            tls,
            config,
            log,
        });
        let net = net::Net::start(shared.clone())?;
        Ok(Self { net, shared })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.net.addr
    }

    /// Whether the server speaks TLS.
    pub fn tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    /// Whether clients must present a certificate.
    pub fn mutual_tls(&self) -> bool {
        self.shared.tls.as_ref().is_some_and(tls::Current::mutual)
    }

    /// Reads the certificate, key and client CA files again and uses them for new
    /// connections; on any error the ones in force stay and the error says why.
    pub fn reload_tls(&self) -> Result<(), ApiError> {
        match &self.shared.tls {
            Some(t) => Ok(t.reload()?),
            None => Err(ApiError::NoTls),
        }
    }

    /// Stops accepting connections, lets the requests in progress finish (up to `grace`),
    /// then stops the runtime.
    pub fn shutdown(self, grace: Duration) {
        self.net.shutdown(&self.shared, grace);
    }
}

type Body = Full<Bytes>;

fn respond(code: u16, body: &Value, extra: &[(&'static str, &str)]) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    for (name, value) in extra {
        if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
            headers.insert(*name, v);
        }
    }
    response
}

fn error(code: u16, message: &str) -> Response<Body> {
    respond(code, &json!({ "error": message }), &[])
}

/// An error after which the connection is closed (the rest of the request is not read).
fn error_close(code: u16, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({ "error": message }),
        &[("connection", "close")],
    )
}

/// Serves one request of `client` (its identity: SPKI hash or IP address).
async fn handle(
    request: Request<hyper::body::Incoming>,
    client: Arc<str>,
    shared: Arc<Shared>,
) -> Response<Body> {
    // Framing (duplicate Content-Length, Content-Length beside Transfer-Encoding) is
    // hyper's: see docs/api.md, "Limits".
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match (&method, path.as_str()) {
        (&Method::POST, "/v1/transactions") => {
            if let Some(reason) = shared.config.fence.as_ref().and_then(|f| (f.0)()) {
                shared.metrics.outcome(503, false);
                return respond(503, &json!({ "error": reason, "fenced": true }), &[]);
            }
            let body = match net::read_body(request, &shared).await {
                Ok(b) => b,
                Err(response) => {
                    shared.metrics.outcome(response.status().as_u16(), false);
                    return response;
                }
            };
            let admission = match shared.admit(&client) {
                Ok(a) => a,
                Err(refusal) => {
                    let limit = match refusal {
                        Refusal::InFlight(_) => "max_in_flight",
                        Refusal::PerClient(_) => "max_per_client",
                    };
                    let msg = match refusal {
                        Refusal::InFlight(n) => {
                            shared
                                .metrics
                                .refused_in_flight
                                .fetch_add(1, Ordering::Relaxed);
                            format!(
                                "overloaded: {n} transactions in flight (limit {})",
                                shared.config.max_in_flight
                            )
                        }
                        Refusal::PerClient(n) => {
                            shared
                                .metrics
                                .refused_per_client
                                .fetch_add(1, Ordering::Relaxed);
                            format!(
                                "this client has {n} transactions in flight (limit {} per client)",
                                shared.config.max_per_client
                            )
                        }
                    };
                    shared.metrics.outcome(503, true);
                    let ev = mayfly_ledger::AuditEvent::new(
                        "tx.refused",
                        mayfly_ledger::Severity::Warning,
                    )
                    .field("client", client.to_string())
                    .field("limit", limit)
                    .field("reason", msg.clone());
                    // Not awaited: the 503 goes out at once.
                    let _ = audit_refusal(&shared, &client, "tx.refused", limit, ev);
                    return respond(503, &json!({ "error": msg }), &[("retry-after", "1")]);
                }
            };
            let started = Instant::now();
            let task_shared = shared.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let _admission = admission;
                submit(&task_shared, &body, client.to_string())
            })
            .await;
            match joined {
                Ok((code, body, retry)) => {
                    shared.metrics.outcome(code, false);
                    if matches!(code, 200 | 422 | 409 | 403 | 500) {
                        shared.metrics.latency(started.elapsed());
                    }
                    let extra: &[(&'static str, &str)] =
                        if retry { &[("retry-after", "1")] } else { &[] };
                    respond(code, &body, extra)
                }
                Err(e) => {
                    shared.metrics.outcome(500, false);
                    error(500, &format!("transaction task failed: {e}"))
                }
            }
        }
        (&Method::POST, "/v1/reports") => {
            let auth = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if !authorized(&shared, auth.as_deref()) {
                // The unread body is not drained (the connection closes). The audit record
                // is written before the answer when a refusal writer is free (repeats from
                // one client are counted, not recorded one by one); when none is, the
                // refusal is counted in memory only and the answer goes out at once, so a
                // flood of bad reports neither queues without bound nor holds the
                // permits valid reports use.
                let reason = "missing or wrong bearer token";
                let ev = mayfly_ledger::AuditEvent::new(
                    "report.rejected",
                    mayfly_ledger::Severity::Warning,
                )
                .field("reason", reason)
                .field("client", client.to_string());
                if let Some(written) =
                    audit_refusal(&shared, &client, "report.rejected", reason, ev)
                {
                    let _ = written.await;
                }
                return error_close(401, "reports need `Authorization: Bearer <detector token>`");
            }
            let body = match net::read_body(request, &shared).await {
                Ok(b) => b,
                Err(response) => return response,
            };
            let Ok(permit) = shared.reports.clone().acquire_owned().await else {
                return error(503, "shutting down");
            };
            let task_shared = shared.clone();
            match tokio::task::spawn_blocking(move || {
                let _permit = permit;
                report(&task_shared, &body)
            })
            .await
            {
                Ok((code, body)) => respond(code, &body, &[]),
                Err(e) => error(500, &format!("report task failed: {e}")),
            }
        }
        (&Method::GET, "/v1/health") => {
            blocking_read(&shared, |shared| respond(200, &health(shared), &[])).await
        }
        (&Method::GET, "/metrics") => {
            blocking_read(&shared, |shared| {
                let mut text = String::with_capacity(8192);
                render_metrics(shared, &mut text);
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            })
            .await
        }
        (&Method::GET, p) if p.starts_with("/v1/transactions/") => {
            let id = p["/v1/transactions/".len()..].to_owned();
            blocking_read(&shared, move |shared| {
                let (code, body) = lookup(shared, &id);
                respond(code, &body, &[])
            })
            .await
        }
        (_, "/v1/transactions" | "/v1/health" | "/v1/reports" | "/metrics") => {
            error_close(405, "method not allowed")
        }
        _ => error_close(
            404,
            "no such endpoint; see /v1/transactions, /v1/health and /metrics",
        ),
    }
}

/// Runs a ledger read (LMDB reads, decoding a checkpoint of up to 8 MiB) on the blocking
/// pool, never on a network thread: at most [`READ_BLOCKING`] at once, and a read beyond
/// them is answered 503 + `Retry-After` at once rather than queued.
async fn blocking_read<F>(shared: &Arc<Shared>, read: F) -> Response<Body>
where
    F: FnOnce(&Shared) -> Response<Body> + Send + 'static,
{
    let Ok(permit) = shared.reads.clone().try_acquire_owned() else {
        shared.metrics.reads_refused.fetch_add(1, Ordering::Relaxed);
        return respond(
            503,
            &json!({ "error": format!("busy: {READ_BLOCKING} reads in progress") }),
            &[("retry-after", "1")],
        );
    };
    let task_shared = shared.clone();
    match tokio::task::spawn_blocking(move || {
        let _permit = permit;
        read(&task_shared)
    })
    .await
    {
        Ok(response) => response,
        Err(e) => error(500, &format!("read task failed: {e}")),
    }
}

/// Sends a refusal through the executor's aggregation table on the blocking pool when a
/// refusal writer is free (the handle says when it is done); otherwise counts it in the
/// table only (no durable record now; it is in the window's `refusal.repeated`) and
/// counts the dropped record in the metrics.
fn audit_refusal(
    shared: &Arc<Shared>,
    client: &Arc<str>,
    event: &'static str,
    reason: &'static str,
    record: mayfly_ledger::AuditEvent,
) -> Option<tokio::task::JoinHandle<()>> {
    let Ok(permit) = shared.refusal_writers.clone().try_acquire_owned() else {
        shared
            .metrics
            .refusal_records_dropped
            .fetch_add(1, Ordering::Relaxed);
        shared
            .executor
            .count_refusal(client, event, reason, record.severity);
        return None;
    };
    let task_shared = shared.clone();
    let client = client.clone();
    Some(tokio::task::spawn_blocking(move || {
        let _permit = permit;
        task_shared
            .executor
            .audit_refusal(&client, event, reason, record);
    }))
}

fn render_metrics(shared: &Shared, out: &mut String) {
    let stats = shared.executor.backend().stats();
    let tips = shared.executor.ledger().tips();
    let to64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let gauges = metrics::Gauges {
        in_flight: to64(shared.in_flight.load(Ordering::Acquire)),
        max_in_flight: to64(shared.config.max_in_flight),
        max_connections: to64(shared.config.limits.max_connections),
        pool_ready: to64(stats.ready),
        pool_in_use: to64(stats.in_use),
        pool_created: stats.created,
        pool_destroyed: stats.destroyed,
        pool_failed: stats.failed,
        checkpoint_seq: tips.checkpoints.seq,
        audit_seq: tips.audit.seq,
        groups: tips.group,
    };
    shared.metrics.render(out, &gauges);
    for section in &shared.config.metrics_sections {
        (section.render)(out);
    }
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

/// The answer to a request whose idempotency key the ledger holds durably: the original
/// commit's outcome if the request is the same (handler and payload), 422 if the key was
/// used for another request; `None` if the ledger holds no such key for this client.
fn durable_answer(
    shared: &Shared,
    (client, key): &KeyOf,
    handler: &str,
    payload: &[u8],
) -> Option<(u16, Value, bool)> {
    let store = shared.executor.ledger().store();
    match store.idempotent_commit(client, key) {
        Ok(Some(cp)) if cp.handler == handler && cp.request == payload => {
            let (name, value) = result_json(&cp.result);
            let mut body = json!({
                "tx_id": cp.tx_id.to_string(),
                "status": TxStatus::Committed.as_str(),
                "domain_id": cp.domain_id,
                "seq": cp.seq,
                "answered_from": "ledger",
            });
            if let Some(map) = body.as_object_mut() {
                map.insert(name.into(), value);
            }
            Some((200, body, false))
        }
        Ok(Some(_)) => {
            let msg = "idempotency key already used for a different request";
            Some((422, json!({ "error": msg }), false))
        }
        Ok(None) => None,
        Err(e) => Some((503, json!({ "error": e.to_string() }), true)),
    }
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
        if !mayfly_ledger::idempotency::valid_key(key) {
            let msg = format!(
                "idempotency_key must be 1..={MAX_IDEMPOTENCY_KEY} bytes without control characters"
            );
            return (400, json!({ "error": msg }), false);
        }
    }
    // The executor's check, asked before the idempotency memory is touched (it checks
    // again when it runs the transaction; a refusal here is answered the same way).
    if let Err(e) = shared.executor.check_request(&body.handler, payload.len()) {
        return refused(shared, &e);
    }
    let digest = [body.handler.as_bytes(), &[0], &payload].concat();
    // Keys are per client (its SPKI hash with mTLS, else its IP address).
    let key_of = body
        .idempotency_key
        .as_ref()
        .map(|key| (client.clone(), key.clone()));
    if let Some(key) = &key_of {
        let Ok(mem) = shared.memory.lock() else {
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
            None => {
                // Not in this process's memory: the ledger's durable keys (a restart, or a
                // resend to a promoted standby) answer with the original outcome.
                drop(mem);
                if let Some(answer) = durable_answer(shared, key, &body.handler, &payload) {
                    return answer;
                }
                let Ok(mut mem) = shared.memory.lock() else {
                    return (500, json!({ "error": "internal state poisoned" }), false);
                };
                if mem.by_key.contains_key(key) {
                    let msg = "a transaction with this idempotency key is still running";
                    return (409, json!({ "error": msg }), true);
                }
                mem.remember_key(
                    key.clone(),
                    Remembered::InProgress {
                        digest: digest.clone(),
                    },
                );
            }
        }
    }
    let forget_key = |shared: &Shared| {
        if let (Some(key), Ok(mut mem)) = (&key_of, shared.memory.lock()) {
            mem.by_key.remove(key);
        }
    };

    let request = TxRequest {
        handler: body.handler.clone(),
        payload,
        client,
    };
    let result = match &body.idempotency_key {
        Some(key) => shared.executor.execute_with_idempotency_key(&request, key),
        None => shared.executor.execute(&request),
    };
    match result {
        Ok(outcome) => {
            if let (TxStatus::Failed, Some(key)) = (outcome.status, &key_of) {
                // The commit may have met the same key committed meanwhile (a resend that
                // raced its original across a failover): answer with the original.
                if let Some(answer) =
                    durable_answer(shared, key, &request.handler, &request.payload)
                {
                    forget_key(shared);
                    return answer;
                }
            }
            let (code, json_body) = outcome_json(&outcome);
            let retry = code == 409;
            if retry {
                // Nothing committed (contention on every attempt): a resend with the same
                // key must run again (issue 18: "otherwise it runs"), not get this 409.
                forget_key(shared);
            }
            if let Ok(mut mem) = shared.memory.lock() {
                if outcome.status != TxStatus::Committed {
                    mem.remember_outcome(outcome.tx_id, json_body.clone());
                }
                if let (Some(key), false) = (key_of.clone(), retry) {
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
            refused(shared, &e)
        }
    }
}

/// The answer to a transaction the executor would not run: status, body, Retry-After.
fn refused(shared: &Shared, e: &ExecError) -> (u16, Value, bool) {
    match e {
        ExecError::UnknownHandler(_) => {
            let known: Vec<&str> = shared.executor.handlers().collect();
            let msg = format!("{e}; known: {}", known.join(", "));
            (404, json!({ "error": msg }), false)
        }
        ExecError::PayloadTooLarge { .. } => (413, json!({ "error": e.to_string() }), false),
        ExecError::Unavailable(_) => {
            // A client can cause this line at will: at most a few a second.
            if let Some(suppressed) = shared.refusal_log.allow(Instant::now()) {
                warn!(shared.log, "refusing a transaction";
                      "reason" => %e, "suppressed_before" => suppressed);
            }
            (503, json!({ "error": e.to_string() }), true)
        }
        ExecError::Ledger(_) | ExecError::DomainNumber(_) => {
            (503, json!({ "error": e.to_string() }), true)
        }
        ExecError::Denied { .. } => (403, json!({ "error": e.to_string() }), false),
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
    match shared.incidents.report(&target, &body.reason, body.dry_run) {
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
            let mut answer = json!({ "action": o.action, "rule": o.rule, "rollback": rollback, "replayed": replayed });
            if let (Some(warning), Some(map)) = (&o.warning, answer.as_object_mut()) {
                map.insert("warning".into(), json!(warning));
            }
            (200, answer)
        }
        Err(ReportError::NotFound(what)) => (404, json!({ "error": what })),
        Err(ReportError::Rollback(e)) => (409, json!({ "error": e.to_string() })),
        Err(e @ ReportError::Unsupported { .. }) => (422, json!({ "error": e.to_string() })),
        Err(e) => (500, json!({ "error": e.to_string() })),
    }
}

fn lookup(shared: &Shared, id: &str) -> (u16, Value) {
    let Some(tx_id) = TxId::parse(id) else {
        return (400, json!({ "error": "a transaction id is 32 hex digits" }));
    };
    let store = shared.incidents.ledger().store();
    match store.seq_of(&tx_id) {
        Ok(Some(seq)) => match store.checkpoint(seq) {
            Ok(Some(cp)) => {
                let (name, result) = result_json(&cp.result);
                let mut body = json!({
                    "tx_id": tx_id.to_string(),
                    "status": "committed",
                    "checkpoint": view::checkpoint_summary(&cp),
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
        "max_per_client": shared.config.max_per_client,
    });
    if let Some(obj) = health.as_object_mut() {
        if let Some(reason) = shared.config.fence.as_ref().and_then(|f| (f.0)()) {
            obj.insert("status".into(), json!("fenced"));
            obj.insert("fenced".into(), json!(reason));
        }
        for section in &shared.config.health_sections {
            obj.insert(section.name.to_owned(), (section.report)());
        }
    }
    health
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_triggered_log_line_is_rate_limited_and_the_dropped_ones_counted() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        let first: Vec<_> = (0..20).map(|_| limit.allow(t0)).collect();
        assert_eq!(
            first.iter().filter(|a| a.is_some()).count(),
            LogLimit::PER_SECOND as usize
        );
        assert!(first.iter().flatten().all(|&d| d == 0));
        // The next second: written again, saying how many were dropped.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            limit.allow(later),
            Some(20 - u64::from(LogLimit::PER_SECOND))
        );
        assert_eq!(limit.allow(later), Some(0));
    }
}
