//! A running API server: its configuration checked, its shared state built, the network
//! edge started; TLS reload and shutdown.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mayfly_executor::Executor;
use mayfly_incident::Incidents;
use slog::{o, Logger};

use crate::config::{ApiConfig, ApiError};
use crate::shared::{LogLimit, Memory, Shared, READ_BLOCKING, REFUSAL_BLOCKING, REPORT_BLOCKING};
use crate::{metrics, net, tls};

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
