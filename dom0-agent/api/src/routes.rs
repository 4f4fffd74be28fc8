//! The routes: one request in, one response out (transactions, lookups, health, metrics,
//! detector reports), each under the admission and read limits of [`Shared`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;

use hyper::{Method, Request, Response};
use mayfly_executor::{ExecError, Failure, TxOutcome, TxRequest, TxStatus};
use mayfly_incident::{view, ReportError, ReportTarget};
use mayfly_ledger::{codec::hex, TxId};
use serde::Deserialize;
use serde_json::{json, Value};
use slog::warn;

use crate::body::read_body;
use crate::config::MAX_IDEMPOTENCY_KEY;
use crate::metrics;
use crate::response::{error, error_close, respond, Body};
use crate::shared::{audit_refusal, KeyOf, Refusal, Remembered, Shared, READ_BLOCKING};
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitBody {
    pub(crate) handler: String,
    #[serde(default)]
    pub(crate) payload: Value,
    #[serde(default)]
    pub(crate) idempotency_key: Option<String>,
}

/// Serves one request of `client` (its identity: SPKI hash or IP address).
pub(crate) async fn handle(
    request: Request<hyper::body::Incoming>,
    client: Arc<str>,
    shared: Arc<Shared>,
) -> Response<Body> {
    // Framing (duplicate Content-Length, Content-Length beside Transfer-Encoding) is
    // hyper's: see docs/api.md, "Limits".
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match (&method, path.as_str()) {
        (&Method::POST, "/v1/transactions") => post_transaction(request, client, shared).await,
        (&Method::POST, "/v1/reports") => post_report(request, client, shared).await,
        (&Method::GET, "/v1/health") => {
            blocking_read(&shared, |shared| respond(200, &health(shared), &[])).await
        }
        (&Method::GET, "/metrics") => get_metrics(&shared).await,
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

/// `POST /v1/transactions`: the body read under its limits, the transaction admitted (or
/// refused at once), then run on the blocking pool.
async fn post_transaction(
    request: Request<hyper::body::Incoming>,
    client: Arc<str>,
    shared: Arc<Shared>,
) -> Response<Body> {
    if let Some(reason) = shared.config.fence.as_ref().and_then(|f| (f.0)()) {
        shared.metrics.outcome(503, false);
        return respond(503, &json!({ "error": reason, "fenced": true }), &[]);
    }
    let body = match read_body(request, &shared).await {
        Ok(b) => b,
        Err(response) => {
            shared.metrics.outcome(response.status().as_u16(), false);
            return response;
        }
    };
    let admission = match shared.admit(&client) {
        Ok(a) => a,
        Err(refusal) => return refuse_admission(&shared, &client, refusal),
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
            let extra: &[(&'static str, &str)] = if retry { &[("retry-after", "1")] } else { &[] };
            respond(code, &body, extra)
        }
        Err(e) => {
            shared.metrics.outcome(500, false);
            error(500, &format!("transaction task failed: {e}"))
        }
    }
}

/// The 503 for a transaction beyond `max_in_flight` or `max_per_client`: counted, audited
/// without waiting (`tx.refused`), answered with `Retry-After`.
fn refuse_admission(shared: &Arc<Shared>, client: &Arc<str>, refusal: Refusal) -> Response<Body> {
    let limit = match refusal {
        Refusal::InFlight(_) => "max_in_flight",
        Refusal::PerClient(_) => "max_per_client",
        Refusal::Penalty { .. } => "penalty",
    };
    // Retry-After: a second, or what is left of a penalty (whole seconds, rounded up).
    let mut retry_after = 1u64;
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
        Refusal::Penalty { held, share, left } => {
            shared
                .metrics
                .refused_penalty
                .fetch_add(1, Ordering::Relaxed);
            retry_after = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            format!(
                "this client is penalised for transactions ending in hostile domain events: \
                 {held} in flight, at most {share} at once for {retry_after} s more"
            )
        }
    };
    shared.metrics.outcome(503, true);
    let ev = mayfly_ledger::AuditEvent::new("tx.refused", mayfly_ledger::Severity::Warning)
        .field("client", client.to_string())
        .field("limit", limit)
        .field("reason", msg.clone());
    // Not awaited: the 503 goes out at once.
    let _ = audit_refusal(shared, client, "tx.refused", limit, ev);
    let retry_after = retry_after.max(1).to_string();
    respond(
        503,
        &json!({ "error": msg }),
        &[("retry-after", &retry_after)],
    )
}

/// `POST /v1/reports`: the detector's bearer token checked before the body is read, then
/// the report run on the blocking pool under its own permits.
async fn post_report(
    request: Request<hyper::body::Incoming>,
    client: Arc<str>,
    shared: Arc<Shared>,
) -> Response<Body> {
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
        let ev =
            mayfly_ledger::AuditEvent::new("report.rejected", mayfly_ledger::Severity::Warning)
                .field("reason", reason)
                .field("client", client.to_string());
        if let Some(written) = audit_refusal(&shared, &client, "report.rejected", reason, ev) {
            let _ = written.await;
        }
        return error_close(401, "reports need `Authorization: Bearer <detector token>`");
    }
    let body = match read_body(request, &shared).await {
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

/// `GET /metrics`: the Prometheus text, rendered as a ledger read.
async fn get_metrics(shared: &Arc<Shared>) -> Response<Body> {
    blocking_read(shared, |shared| {
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

/// Runs a ledger read (LMDB reads, decoding a checkpoint of up to 8 MiB) on the blocking
/// pool, never on a network thread: at most [`READ_BLOCKING`] at once, and a read beyond
/// them is answered 503 + `Retry-After` at once rather than queued.
pub(crate) async fn blocking_read<F>(shared: &Arc<Shared>, read: F) -> Response<Body>
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

pub(crate) fn render_metrics(shared: &Shared, out: &mut String) {
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

pub(crate) fn result_json(result: &[u8]) -> (&'static str, Value) {
    if let Ok(v) = serde_json::from_slice::<Value>(result) {
        ("result", v)
    } else if let Ok(s) = std::str::from_utf8(result) {
        ("result", Value::String(s.to_owned()))
    } else {
        ("result_hex", Value::String(hex(result)))
    }
}

pub(crate) fn outcome_json(o: &TxOutcome) -> (u16, Value) {
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
pub(crate) fn durable_answer(
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
pub(crate) fn submit(shared: &Shared, raw: &[u8], client: String) -> (u16, Value, bool) {
    let (body, payload) = match parse_submission(shared, raw) {
        Ok(parsed) => parsed,
        Err(answer) => return answer,
    };
    let digest = [body.handler.as_bytes(), &[0], &payload].concat();
    // Keys are per client (its SPKI hash with mTLS, else its IP address).
    let key_of = body
        .idempotency_key
        .as_ref()
        .map(|key| (client.clone(), key.clone()));
    if let Some(key) = &key_of {
        if let Some(answer) = claim_key(shared, key, &body.handler, &payload, &digest) {
            return answer;
        }
    }
    run_submission(shared, body, payload, client, key_of, digest)
}

/// The request body parsed and checked (JSON fields, idempotency key, the executor's
/// handler and size check) before anything is remembered; an error is the answer.
fn parse_submission(
    shared: &Shared,
    raw: &[u8],
) -> Result<(SubmitBody, Vec<u8>), (u16, Value, bool)> {
    let body: SubmitBody = match serde_json::from_slice(raw) {
        Ok(b) => b,
        Err(e) => {
            return Err((
                400,
                json!({ "error": format!("malformed request: {e}") }),
                false,
            ))
        }
    };
    let payload = match serde_json::to_vec(&body.payload) {
        Ok(p) => p,
        Err(e) => return Err((400, json!({ "error": format!("payload: {e}") }), false)),
    };
    if let Some(key) = &body.idempotency_key {
        if !mayfly_ledger::idempotency::valid_key(key) {
            let msg = format!(
                "idempotency_key must be 1..={MAX_IDEMPOTENCY_KEY} bytes without control characters"
            );
            return Err((400, json!({ "error": msg }), false));
        }
    }
    // The executor's check, asked before the idempotency memory is touched (it checks
    // again when it runs the transaction; a refusal here is answered the same way).
    if let Err(e) = shared.executor.check_request(&body.handler, payload.len()) {
        return Err(refused(shared, &e));
    }
    Ok((body, payload))
}

/// Claims an idempotency key for this request: the remembered or durable answer if the
/// key was seen (the original outcome, 409 while it runs, 422 for another request), else
/// `None` and the key is remembered as in progress.
fn claim_key(
    shared: &Shared,
    key: &KeyOf,
    handler: &str,
    payload: &[u8],
    digest: &[u8],
) -> Option<(u16, Value, bool)> {
    let Ok(mem) = shared.memory.lock() else {
        return Some((500, json!({ "error": "internal state poisoned" }), false));
    };
    match mem.by_key.get(key) {
        Some(Remembered::Done {
            digest: d,
            code,
            body,
        }) if *d == digest => Some((*code, body.clone(), false)),
        Some(Remembered::InProgress { digest: d }) if *d == digest => {
            let msg = "a transaction with this idempotency key is still running";
            Some((409, json!({ "error": msg }), true))
        }
        Some(_) => {
            let msg = "idempotency key already used for a different request";
            Some((422, json!({ "error": msg }), false))
        }
        None => {
            // Not in this process's memory: the ledger's durable keys (a restart, or a
            // resend to a promoted standby) answer with the original outcome.
            drop(mem);
            if let Some(answer) = durable_answer(shared, key, handler, payload) {
                return Some(answer);
            }
            let Ok(mut mem) = shared.memory.lock() else {
                return Some((500, json!({ "error": "internal state poisoned" }), false));
            };
            if mem.by_key.contains_key(key) {
                let msg = "a transaction with this idempotency key is still running";
                return Some((409, json!({ "error": msg }), true));
            }
            mem.remember_key(
                key.clone(),
                Remembered::InProgress {
                    digest: digest.to_vec(),
                },
            );
            None
        }
    }
}

/// Runs a parsed, admitted submission through the executor and remembers its outcome
/// (and its idempotency key's).
fn run_submission(
    shared: &Shared,
    body: SubmitBody,
    payload: Vec<u8>,
    client: String,
    key_of: Option<KeyOf>,
    digest: Vec<u8>,
) -> (u16, Value, bool) {
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
pub(crate) fn refused(shared: &Shared, e: &ExecError) -> (u16, Value, bool) {
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
pub(crate) fn authorized(shared: &Shared, header: Option<&str>) -> bool {
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
pub(crate) struct ReportBody {
    pub(crate) tx_id: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) handler: Option<String>,
    pub(crate) client: Option<String>,
    pub(crate) reason: String,
    #[serde(default)]
    pub(crate) dry_run: bool,
}

pub(crate) fn report(shared: &Shared, raw: &[u8]) -> (u16, Value) {
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

pub(crate) fn lookup(shared: &Shared, id: &str) -> (u16, Value) {
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

pub(crate) fn health(shared: &Shared) -> Value {
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
