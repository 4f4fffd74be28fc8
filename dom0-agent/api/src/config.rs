//! The API's configuration and its error type: the HTTP limits ([`Limits`]), what `serve`
//! passes in ([`ApiConfig`]), extra `/v1/health` sections ([`HealthSection`]) and
//! [`ApiError`]. A leaf of the crate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::metrics::MetricsSection;
use crate::proxy;
use crate::tls::{TlsError, TlsFiles};

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

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
