//! Loading the Xen libraries at run time.
//!
//! The agent is one binary for hosts with and without Xen (see
//! `docs/decisions/0003-xen-ffi-loaded-at-run-time.md`): the libraries are `dlopen`ed by
//! soname when the Xen backend starts, and every function this crate calls is resolved and
//! checked then, so a later call cannot find a symbol missing.

use mayfly_xen_sys::{soname, xenctrl::XenCtrl, xenevtchn::XenEvtchn, xengnttab::XenGnttab};

/// A Xen library could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The library is not installed (or not loadable): not a Xen 4.17 dom0.
    #[error(
        "cannot load {soname}: the Xen backend needs a Xen 4.17 dom0 with its toolstack \
         libraries (Debian 12: libxenmisc4.17, libxengnttab1, libxenevtchn1)"
    )]
    Missing {
        /// The soname.
        soname: &'static str,
        /// The loader's error.
        #[source]
        source: libloading::Error,
    },
    /// The library lacks a function this crate calls.
    #[error("{soname} lacks {symbol}")]
    Symbol {
        /// The soname.
        soname: &'static str,
        /// The function.
        symbol: &'static str,
    },
}

/// The loaded libraries. Shared (`Arc`) by every handle, which keeps them loaded.
pub struct Libraries {
    pub(crate) ctrl: XenCtrl,
    pub(crate) gnttab: XenGnttab,
    pub(crate) evtchn: XenEvtchn,
}

impl std::fmt::Debug for Libraries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libraries")
            .field("xenctrl", &soname::XENCTRL)
            .field("xengnttab", &soname::XENGNTTAB)
            .field("xenevtchn", &soname::XENEVTCHN)
            .finish()
    }
}

/// Resolves `$lib.$name` to its function pointer, or `LoadError::Symbol`.
macro_rules! sym {
    ($lib:expr, $soname:expr, $name:ident) => {
        match &$lib.$name {
            Ok(f) => Ok(*f),
            Err(_) => Err($crate::libs::LoadError::Symbol {
                soname: $soname,
                symbol: stringify!($name),
            }),
        }
    };
}
pub(crate) use sym;

impl Libraries {
    /// Loads libxenctrl, libxengnttab and libxenevtchn and checks every function this
    /// crate calls.
    pub fn load() -> Result<std::sync::Arc<Self>, LoadError> {
        // SAFETY: Xen's toolstack libraries run no initialisers with preconditions; loading
        // maps them and resolves symbols. The function pointers are only called through
        // this crate's wrappers, with the arguments their C declarations require.
        let ctrl =
            unsafe { XenCtrl::new(soname::XENCTRL) }.map_err(|source| LoadError::Missing {
                soname: soname::XENCTRL,
                source,
            })?;
        // SAFETY: as above.
        let gnttab =
            unsafe { XenGnttab::new(soname::XENGNTTAB) }.map_err(|source| LoadError::Missing {
                soname: soname::XENGNTTAB,
                source,
            })?;
        // SAFETY: as above.
        let evtchn =
            unsafe { XenEvtchn::new(soname::XENEVTCHN) }.map_err(|source| LoadError::Missing {
                soname: soname::XENEVTCHN,
                source,
            })?;
        let libs = Self {
            ctrl,
            gnttab,
            evtchn,
        };
        libs.check()?;
        Ok(std::sync::Arc::new(libs))
    }

    /// Every function the wrappers call must resolve.
    fn check(&self) -> Result<(), LoadError> {
        let c = &self.ctrl;
        let x = soname::XENCTRL;
        sym!(c, x, xc_interface_open)?;
        sym!(c, x, xc_interface_close)?;
        sym!(c, x, xc_version)?;
        sym!(c, x, xc_domain_getinfolist)?;
        sym!(c, x, xc_domain_pause)?;
        sym!(c, x, xc_domain_unpause)?;
        sym!(c, x, xc_domain_destroy)?;
        sym!(c, x, xc_physinfo)?;
        sym!(c, x, xc_sched_id)?;
        sym!(c, x, xc_sched_credit_domain_get)?;
        sym!(c, x, xc_sched_credit_domain_set)?;
        sym!(c, x, xc_sched_credit2_domain_get)?;
        sym!(c, x, xc_sched_credit2_domain_set)?;
        // The clone-cost measurement (clonecost.rs), not the agent's path.
        sym!(c, x, xc_vcpu_getcontext)?;
        sym!(c, x, xc_domain_populate_physmap_exact)?;
        let g = &self.gnttab;
        let x = soname::XENGNTTAB;
        sym!(g, x, xengntshr_open)?;
        sym!(g, x, xengntshr_close)?;
        sym!(g, x, xengntshr_share_pages)?;
        sym!(g, x, xengntshr_unshare)?;
        let e = &self.evtchn;
        let x = soname::XENEVTCHN;
        sym!(e, x, xenevtchn_open)?;
        sym!(e, x, xenevtchn_close)?;
        sym!(e, x, xenevtchn_fd)?;
        sym!(e, x, xenevtchn_bind_unbound_port)?;
        sym!(e, x, xenevtchn_unbind)?;
        sym!(e, x, xenevtchn_notify)?;
        sym!(e, x, xenevtchn_pending)?;
        sym!(e, x, xenevtchn_unmask)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctrl::{Control, CtrlError};

    #[test]
    fn without_xen_the_error_says_what_is_missing() {
        match Libraries::load() {
            Err(e @ LoadError::Missing { .. }) => {
                assert!(e.to_string().contains(".so."), "{e}");
                assert!(e.to_string().contains("Xen 4.17"), "{e}");
            }
            Err(e) => panic!("unexpected: {e}"),
            Ok(libs) => {
                // The libraries are installed (libxen-dev): every symbol resolved. Without
                // a hypervisor (no privcmd), opening the control interface must fail
                // cleanly instead.
                if !std::path::Path::new("/dev/xen/privcmd").exists() {
                    let err = Control::open(libs).unwrap_err();
                    assert!(matches!(err, CtrlError::Open(_)), "{err}");
                    assert!(err.to_string().contains("dom0"), "{err}");
                }
            }
        }
    }
}
