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

mod body;
mod config;
mod metrics;
mod net;
pub mod proxy;
mod response;
mod routes;
mod server;
mod shared;
pub mod tls;

pub use config::{ApiConfig, ApiError, Fence, HealthSection, Limits, MAX_IDEMPOTENCY_KEY};
pub use metrics::{family as metrics_family, MetricsSection};
pub use server::Server;
pub use tls::{TlsError, TlsFiles};
