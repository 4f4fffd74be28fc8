//! `GET /metrics`: counters of the client API in the Prometheus text exposition format
//! (version 0.0.4), plus sections supplied by parts the API does not know.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One block of `GET /metrics` supplied by a part the API does not know (the SIEM
/// exporter's lag, for one): appends complete metric families (`# HELP`, `# TYPE`, samples)
/// to the text.
#[derive(Clone)]
pub struct MetricsSection {
    /// Name, for debugging.
    pub name: &'static str,
    /// Appends the section's families.
    pub render: Arc<dyn Fn(&mut String) + Send + Sync>,
}

impl std::fmt::Debug for MetricsSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSection")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Outcomes of `POST /v1/transactions`, as the `outcome` label.
pub(crate) const OUTCOMES: [&str; 8] = [
    "committed",   // 200
    "aborted",     // 422
    "conflict",    // 409
    "denied",      // 403
    "failed",      // 500
    "unavailable", // 503 from the executor (no domain in time, ledger)
    "refused",     // 503 at admission (in flight / per client)
    "rejected",    // other 4xx: malformed, unknown handler, too large, idempotency
];

/// Upper bounds of the latency histogram, seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The API's own counters; all atomic, updated on the request path.
#[derive(Default)]
pub(crate) struct Metrics {
    pub outcomes: [AtomicU64; OUTCOMES.len()],
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    pub open_connections: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub tls_handshakes_refused: AtomicU64,
    pub tls_handshakes_in_progress: AtomicU64,
    pub tls_stale_connections: AtomicU64,
    pub proxy_headers_refused: AtomicU64,
    pub refused_in_flight: AtomicU64,
    pub refused_per_client: AtomicU64,
    pub refused_penalty: AtomicU64,
    pub body_timeouts: AtomicU64,
    pub write_timeouts: AtomicU64,
    pub body_too_large: AtomicU64,
    pub reads_refused: AtomicU64,
    pub refusal_records_dropped: AtomicU64,
}

impl Metrics {
    /// Counts one transaction request by its status code.
    pub(crate) fn outcome(&self, code: u16, admission_refused: bool) {
        let i = match code {
            200 => 0,
            422 => 1,
            409 => 2,
            403 => 3,
            503 if admission_refused => 6,
            503 => 5,
            c if c >= 500 => 4,
            _ => 7,
        };
        if let Some(c) = self.outcomes.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the latency of one transaction that ran.
    pub(crate) fn latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn render(&self, out: &mut String, gauges: &Gauges) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            out,
            "mayfly_api_transactions_total",
            "counter",
            "POST /v1/transactions answered, by outcome",
        );
        for (name, c) in OUTCOMES.iter().zip(&self.outcomes) {
            let _ = writeln!(
                out,
                "mayfly_api_transactions_total{{outcome=\"{name}\"}} {}",
                get(c)
            );
        }
        family(
            out,
            "mayfly_api_transaction_seconds",
            "histogram",
            "Time from admission to answer of transactions that ran",
        );
        for (bound, c) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "mayfly_api_transaction_seconds_bucket{{le=\"{bound}\"}} {}",
                get(c)
            );
        }
        let count = get(&self.latency_count);
        let _ = writeln!(
            out,
            "mayfly_api_transaction_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        #[allow(clippy::cast_precision_loss)]
        let sum = get(&self.latency_sum_us) as f64 / 1e6;
        let _ = writeln!(out, "mayfly_api_transaction_seconds_sum {sum}");
        let _ = writeln!(out, "mayfly_api_transaction_seconds_count {count}");

        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        };
        gauge(
            out,
            "mayfly_api_in_flight",
            "Transactions admitted and not yet answered",
            gauges.in_flight,
        );
        gauge(
            out,
            "mayfly_api_max_in_flight",
            "Configured limit of transactions at once",
            gauges.max_in_flight,
        );
        family(
            out,
            "mayfly_api_admission_refused_total",
            "counter",
            "Transactions refused with 503 at admission, by limit",
        );
        let _ = writeln!(
            out,
            "mayfly_api_admission_refused_total{{limit=\"in_flight\"}} {}",
            get(&self.refused_in_flight)
        );
        let _ = writeln!(
            out,
            "mayfly_api_admission_refused_total{{limit=\"per_client\"}} {}",
            get(&self.refused_per_client)
        );
        let _ = writeln!(
            out,
            "mayfly_api_admission_refused_total{{limit=\"penalty\"}} {}",
            get(&self.refused_penalty)
        );
        gauge(
            out,
            "mayfly_api_open_connections",
            "Client connections open now",
            get(&self.open_connections),
        );
        gauge(
            out,
            "mayfly_api_max_connections",
            "Configured limit of open client connections",
            gauges.max_connections,
        );
        counter(
            out,
            "mayfly_api_connections_accepted_total",
            "Client connections accepted",
            get(&self.connections_accepted),
        );
        counter(
            out,
            "mayfly_api_connections_refused_total",
            "Client connections refused at the connection limit (503, closed)",
            get(&self.connections_refused),
        );
        counter(
            out,
            "mayfly_api_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out",
            get(&self.tls_handshake_failures),
        );
        counter(
            out,
            "mayfly_api_tls_handshakes_refused_total",
            "TLS connections closed unread because max_handshakes handshakes were in progress",
            get(&self.tls_handshakes_refused),
        );
        counter(
            out,
            "mayfly_api_proxy_headers_refused_total",
            "Connections from a trusted proxy closed for a missing or invalid PROXY v2 header",
            get(&self.proxy_headers_refused),
        );
        counter(
            out,
            "mayfly_api_tls_stale_connections_total",
            "Connections closed (or refused a request, 421) because a TLS reload replaced the configuration they were authenticated under",
            get(&self.tls_stale_connections),
        );
        gauge(
            out,
            "mayfly_api_tls_handshakes_in_progress",
            "TLS handshakes in progress now",
            get(&self.tls_handshakes_in_progress),
        );
        counter(
            out,
            "mayfly_api_body_timeouts_total",
            "Request bodies not received within the body timeout (408)",
            get(&self.body_timeouts),
        );
        counter(
            out,
            "mayfly_api_write_timeouts_total",
            "Connections closed because a response write made no progress within the write timeout",
            get(&self.write_timeouts),
        );
        counter(
            out,
            "mayfly_api_body_too_large_total",
            "Request bodies above the cap (413)",
            get(&self.body_too_large),
        );
        counter(
            out,
            "mayfly_api_reads_refused_total",
            "Ledger reads (lookup, health, metrics) answered 503 because every read thread was busy",
            get(&self.reads_refused),
        );
        counter(
            out,
            "mayfly_api_refusal_records_dropped_total",
            "Refusals counted in memory only (no record of their own) because every refusal writer was busy",
            get(&self.refusal_records_dropped),
        );
        family(
            out,
            "mayfly_pool_domains",
            "gauge",
            "Domains of the backend's pool, by state",
        );
        let _ = writeln!(
            out,
            "mayfly_pool_domains{{state=\"ready\"}} {}",
            gauges.pool_ready
        );
        let _ = writeln!(
            out,
            "mayfly_pool_domains{{state=\"in_use\"}} {}",
            gauges.pool_in_use
        );
        family(
            out,
            "mayfly_pool_domains_total",
            "counter",
            "Domains of the backend's pool since start, by event",
        );
        for (event, v) in [
            ("created", gauges.pool_created),
            ("destroyed", gauges.pool_destroyed),
            ("failed", gauges.pool_failed),
        ] {
            let _ = writeln!(out, "mayfly_pool_domains_total{{event=\"{event}\"}} {v}");
        }
        gauge(
            out,
            "mayfly_ledger_checkpoint_seq",
            "Sequence of the newest checkpoint",
            gauges.checkpoint_seq,
        );
        gauge(
            out,
            "mayfly_ledger_audit_seq",
            "Sequence of the newest audit record",
            gauges.audit_seq,
        );
        gauge(
            out,
            "mayfly_ledger_group_commits",
            "Group commits (one fsync each) since the ledger was created",
            gauges.groups,
        );
    }
}

/// Values read at the time of the scrape.
pub(crate) struct Gauges {
    pub in_flight: u64,
    pub max_in_flight: u64,
    pub max_connections: u64,
    pub pool_ready: u64,
    pub pool_in_use: u64,
    pub pool_created: u64,
    pub pool_destroyed: u64,
    pub pool_failed: u64,
    pub checkpoint_seq: u64,
    pub audit_seq: u64,
    pub groups: u64,
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_and_outcomes_are_labelled() {
        let m = Metrics::default();
        m.latency(Duration::from_micros(1500));
        m.latency(Duration::from_millis(40));
        m.outcome(200, false);
        m.outcome(503, true);
        m.outcome(503, false);
        m.outcome(413, false);
        let mut out = String::new();
        m.render(
            &mut out,
            &Gauges {
                in_flight: 0,
                max_in_flight: 64,
                max_connections: 2048,
                pool_ready: 1,
                pool_in_use: 0,
                pool_created: 1,
                pool_destroyed: 0,
                pool_failed: 0,
                checkpoint_seq: 0,
                audit_seq: 0,
                groups: 0,
            },
        );
        for line in [
            "mayfly_api_transaction_seconds_bucket{le=\"0.001\"} 0",
            "mayfly_api_transaction_seconds_bucket{le=\"0.002\"} 1",
            "mayfly_api_transaction_seconds_bucket{le=\"0.05\"} 2",
            "mayfly_api_transaction_seconds_bucket{le=\"+Inf\"} 2",
            "mayfly_api_transaction_seconds_count 2",
            "mayfly_api_transaction_seconds_sum 0.0415",
            "mayfly_api_transactions_total{outcome=\"committed\"} 1",
            "mayfly_api_transactions_total{outcome=\"refused\"} 1",
            "mayfly_api_transactions_total{outcome=\"unavailable\"} 1",
            "mayfly_api_transactions_total{outcome=\"rejected\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line}:\n{out}");
        }
        // Every family is declared once, before its samples.
        let types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(types.len(), unique.len());
    }
}
