//! A backend with no domains, for tests of the services built on the executor that never
//! run a transaction (console commands, the incident service's rollbacks and reports).
//! Compiled only with the `testing` feature; no test that claims to exercise a backend
//! uses it.

use std::time::Duration;

use mayfly_domain::{
    Domain, DomainBackend, DomainError, DomainExit, DomainId, PoolStats, Quarantined,
};

/// A backend that never has a domain: every `take` fails as a shut-down backend does.
pub struct NoDomains;

impl DomainBackend for NoDomains {
    fn name(&self) -> &'static str {
        "none"
    }
    fn take(&self, _timeout: Duration) -> Result<Box<dyn Domain>, DomainError> {
        Err(DomainError::ShutDown { backend: "none" })
    }
    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    fn quarantined(&self) -> Vec<Quarantined> {
        Vec::new() // no domains, so none kept
    }
    fn release_quarantined(&self, _id: DomainId) -> Result<Option<DomainExit>, DomainError> {
        Ok(None)
    }
    fn shutdown(&self) {}
}
