//! The start-up reconciler: destroys every `mayfly-<n>` domain a previous run left behind.
//!
//! The backend names every domain it builds `mayfly-<n>`, and nothing else on an
//! appliance may use that prefix. So at start-up, before building anything:
//!
//! - list `/local/domain/*/name` in xenstore and keep the names that are exactly
//!   `mayfly-` followed by decimal digits (other names, and values that do not parse, are
//!   left alone);
//! - destroy each such domain that the hypervisor still has (xc_domain_destroy), whatever
//!   its state (running, paused, quarantined, shut down);
//! - remove their xenstore entries, libxl's userdata files for them (`/var/lib/xen`) and
//!   the run directory's `mayfly-*.cfg` files;
//! - destroy every domain whose handle (uuid) starts with `MAYFLYPV`: the Mayfly PV guests
//!   the backend builds in-process have no xenstore entries at all, and that prefix is how
//!   `mayfly_xen::PvBuilder` marks them (`mayfly_xen::pvbuild::tag_of`).

use std::fs;
use std::path::Path;

use mayfly_xen::{Control, CtrlError, DomId, Store, StoreError};
use slog::{info, warn, Logger};

use crate::config::NAME_PREFIX;
use crate::domain::{remove_libxl_userdata, LIBXL_DIR};

/// The reconciler could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Listing the hypervisor's domains failed.
    #[error("reconciler: listing domains")]
    List(#[source] CtrlError),
    /// Listing or cleaning xenstore failed.
    #[error("reconciler: xenstore")]
    Store(#[from] StoreError),
    /// A leftover could not be inspected or destroyed.
    #[error("reconciler: destroying leftover {name} (domain {domid})")]
    Destroy {
        /// Domain id.
        domid: DomId,
        /// Its name.
        name: String,
        /// The failure.
        #[source]
        source: CtrlError,
    },
}

/// What the reconciler did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Leftover domains destroyed, `(domid, name)`.
    pub destroyed: Vec<(DomId, String)>,
    /// Stale xenstore entries removed (the domain itself was gone).
    pub stale_entries: Vec<DomId>,
    /// Configuration files removed.
    pub files_removed: usize,
}

/// Whether `name` is one this backend gives its domains: `mayfly-` and decimal digits.
pub fn is_pool_name(name: &str) -> bool {
    name.strip_prefix(NAME_PREFIX)
        .is_some_and(|n| !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The name the backend gave a Mayfly PV guest with handle tag `tag` (its build sequence
/// number, big-endian): `mayfly-<n>`, as in the logs.
pub fn pv_name(tag: [u8; 8]) -> String {
    format!("{NAME_PREFIX}{}", u64::from_be_bytes(tag))
}

/// Destroys the leftovers (see the [module docs](self)).
pub fn reconcile(
    control: &Control,
    store: &Store,
    run_dir: &Path,
    logger: &Logger,
) -> Result<ReconcileReport, ReconcileError> {
    let mut report = ReconcileReport::default();
    for (domid, name) in store.domains_named(NAME_PREFIX)? {
        if !is_pool_name(&name) {
            continue;
        }
        let destroy_error = |source| ReconcileError::Destroy {
            domid,
            name: name.clone(),
            source,
        };
        let info = control.info(domid).map_err(destroy_error)?;
        let uuid = info.map(|i| i.uuid);
        if let Some(info) = info {
            control.destroy(domid).map_err(destroy_error)?;
            remove_libxl_userdata(Path::new(LIBXL_DIR), domid, info.uuid);
            report.destroyed.push((domid, name.clone()));
        } else {
            report.stale_entries.push(domid);
        }
        store.remove_domain(domid, uuid)?;
    }
    for info in control.list().map_err(ReconcileError::List)? {
        let Some(tag) = mayfly_xen::pvbuild::tag_of(&info.uuid) else {
            continue;
        };
        if info.domid == 0 || report.destroyed.iter().any(|(d, _)| *d == info.domid) {
            continue;
        }
        let name = pv_name(tag);
        control
            .destroy(info.domid)
            .map_err(|source| ReconcileError::Destroy {
                domid: info.domid,
                name: name.clone(),
                source,
            })?;
        report.destroyed.push((info.domid, name));
    }
    if let Ok(entries) = fs::read_dir(run_dir) {
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".cfg")) else {
                continue;
            };
            if is_pool_name(stem) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => report.files_removed = report.files_removed.saturating_add(1),
                    Err(e) => warn!(logger, "removing a stale xl configuration failed";
                        "path" => %entry.path().display(), "error" => %e),
                }
            }
        }
    }
    if report.destroyed.is_empty() && report.stale_entries.is_empty() {
        info!(logger, "no leftover domains from a previous run");
    } else {
        warn!(logger, "destroyed leftover domains of a previous run";
            "domains" => ?report.destroyed, "stale_entries" => ?report.stale_entries);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pv_guests_are_named_by_their_sequence_number() {
        assert_eq!(pv_name(7u64.to_be_bytes()), "mayfly-7");
        assert!(is_pool_name(&pv_name(u64::MAX.to_be_bytes())));
    }

    #[test]
    fn only_exact_pool_names_are_reaped() {
        assert!(is_pool_name("mayfly-0"));
        assert!(is_pool_name("mayfly-12345"));
        for other in [
            "mayfly-",
            "mayfly",
            "mayfly-x",
            "mayfly-1a",
            "mayfly-1-2",
            "Mayfly-1",
            "xmayfly-1",
            "mayfly-123456789012345678901",
            "Domain-0",
        ] {
            assert!(!is_pool_name(other), "{other}");
        }
    }
}
