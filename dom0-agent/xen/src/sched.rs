//! Scheduler parameters of a domain: the credit (`credit`) and credit2 (`credit2`)
//! schedulers' weight and cap, through libxenctrl.
//!
//! Both schedulers take the same two numbers (`xen_domctl_sched_credit{,2}`):
//!
//! ```text
//!  weight  u16  relative share of CPU time under contention (1..=65535; Xen's default 256,
//!               dom0's too unless `dom0_weight`/`xl sched-credit` changed it)
//!  cap     u16  most CPU time the domain may use, in % of one physical CPU, even when CPUs
//!               are idle (0 = no cap; a 1-vCPU domain can use at most 100)
//! ```
//!
//! Other schedulers (rtds, arinc653, null) have no weight or cap: [`Control::scheduler`]
//! names them and [`Control::set_credit`] refuses them. Xen's scheduler is chosen at boot
//! (`sched=` on Xen's command line; Xen 4.17's default is credit2).

use std::io;

use mayfly_xen_sys::soname;
use mayfly_xen_sys::types::{
    xen_domctl_sched_credit, xen_domctl_sched_credit2, XEN_SCHEDULER_ARINC653,
    XEN_SCHEDULER_CREDIT, XEN_SCHEDULER_CREDIT2, XEN_SCHEDULER_NULL, XEN_SCHEDULER_RTDS,
};

use crate::ctrl::Control;
use crate::libs::{sym, LoadError};
use crate::{DomId, DOMID_FIRST_RESERVED};

/// The hypervisor's scheduler (`xc_sched_id`, `XEN_SCHEDULER_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// `credit`: weights and caps.
    Credit,
    /// `credit2`: weights and caps (Xen 4.17's default).
    Credit2,
    /// A scheduler without weights and caps (rtds, arinc653, null, or unknown): its id.
    Other(u32),
}

impl Scheduler {
    /// The scheduler with `XEN_SCHEDULER_*` id `id`.
    pub fn from_id(id: u32) -> Self {
        match id {
            XEN_SCHEDULER_CREDIT => Self::Credit,
            XEN_SCHEDULER_CREDIT2 => Self::Credit2,
            other => Self::Other(other),
        }
    }

    /// Its name as Xen's `sched=` option spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Credit => "credit",
            Self::Credit2 => "credit2",
            Self::Other(XEN_SCHEDULER_RTDS) => "rtds",
            Self::Other(XEN_SCHEDULER_ARINC653) => "arinc653",
            Self::Other(XEN_SCHEDULER_NULL) => "null",
            Self::Other(_) => "unknown",
        }
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Other(id) => write!(f, "{} (id {id})", self.name()),
            _ => f.write_str(self.name()),
        }
    }
}

/// A domain's weight and cap under the credit or credit2 scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditParams {
    /// Relative share under contention, 1..=65535.
    pub weight: u16,
    /// Most CPU time in % of one physical CPU; 0 is no cap.
    pub cap_percent: u16,
}

/// Reading or setting scheduler parameters failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// A function could not be resolved.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xc_sched_id` failed.
    #[error("xc_sched_id failed")]
    Id(#[source] io::Error),
    /// The scheduler has no weights or caps.
    #[error("Xen runs the {found} scheduler, which has no weights or caps (boot Xen with sched=credit2 or sched=credit)")]
    Unsupported {
        /// The scheduler found.
        found: Scheduler,
    },
    /// Parameters may be set on guest domains only.
    #[error("refusing to set scheduler parameters of domain {domid} (dom0 or a reserved id)")]
    NotAGuest {
        /// The domain.
        domid: DomId,
    },
    /// A weight of 0 (Xen reads it as "unchanged").
    #[error("weight 0 for domain {domid}: a weight is 1..=65535")]
    ZeroWeight {
        /// The domain.
        domid: DomId,
    },
    /// The call about one domain failed.
    #[error("{call}(domain {domid}) failed")]
    Domain {
        /// The libxenctrl function.
        call: &'static str,
        /// The domain.
        domid: DomId,
        /// errno.
        #[source]
        source: io::Error,
    },
}

impl Control {
    /// The hypervisor's scheduler (that of cpupool 0, where every domain of Mayfly runs).
    pub fn scheduler(&self) -> Result<Scheduler, SchedError> {
        let f = sym!(self.libs().ctrl, soname::XENCTRL, xc_sched_id)?;
        let mut id: std::os::raw::c_int = -1;
        // SAFETY: a live handle (held for the call) and one writable int.
        let rc = self.with_handle(|xch| unsafe { f(xch, &mut id) });
        if rc < 0 {
            return Err(SchedError::Id(io::Error::last_os_error()));
        }
        Ok(Scheduler::from_id(u32::try_from(id).unwrap_or(u32::MAX)))
    }

    /// The weight and cap of `domid` under `sched` (which [`Control::scheduler`] returned).
    pub fn credit(&self, sched: Scheduler, domid: DomId) -> Result<CreditParams, SchedError> {
        let mut params = CreditParams {
            weight: 0,
            cap_percent: 0,
        };
        self.credit_call(sched, domid, false, &mut params)?;
        Ok(params)
    }

    /// Sets the weight and cap of guest `domid` under `sched`. Refuses dom0, reserved ids
    /// and a weight of 0 (which Xen would read as "leave the weight unchanged").
    pub fn set_credit(
        &self,
        sched: Scheduler,
        domid: DomId,
        params: CreditParams,
    ) -> Result<(), SchedError> {
        if domid == 0 || domid >= DOMID_FIRST_RESERVED {
            return Err(SchedError::NotAGuest { domid });
        }
        if params.weight == 0 {
            return Err(SchedError::ZeroWeight { domid });
        }
        let mut params = params;
        self.credit_call(sched, domid, true, &mut params)
    }

    /// `xc_sched_credit{,2}_domain_{get,set}` of `domid` with `params` (read by a set,
    /// written by a get): both schedulers' structs are `{weight u16, cap u16}`.
    fn credit_call(
        &self,
        sched: Scheduler,
        domid: DomId,
        set: bool,
        params: &mut CreditParams,
    ) -> Result<(), SchedError> {
        let (c, x) = (&self.libs().ctrl, soname::XENCTRL);
        let (call, rc) = match sched {
            Scheduler::Credit => {
                let (call, f) = if set {
                    (
                        "xc_sched_credit_domain_set",
                        sym!(c, x, xc_sched_credit_domain_set)?,
                    )
                } else {
                    (
                        "xc_sched_credit_domain_get",
                        sym!(c, x, xc_sched_credit_domain_get)?,
                    )
                };
                let mut p = xen_domctl_sched_credit {
                    weight: params.weight,
                    cap: params.cap_percent,
                };
                // SAFETY: a live handle (held for the call) and one struct it reads or
                // writes, on our stack.
                let rc = self.with_handle(|xch| unsafe { f(xch, domid, &mut p) });
                (params.weight, params.cap_percent) = (p.weight, p.cap);
                (call, rc)
            }
            Scheduler::Credit2 => {
                let (call, f) = if set {
                    (
                        "xc_sched_credit2_domain_set",
                        sym!(c, x, xc_sched_credit2_domain_set)?,
                    )
                } else {
                    (
                        "xc_sched_credit2_domain_get",
                        sym!(c, x, xc_sched_credit2_domain_get)?,
                    )
                };
                let mut p = xen_domctl_sched_credit2 {
                    weight: params.weight,
                    cap: params.cap_percent,
                };
                // SAFETY: as above.
                let rc = self.with_handle(|xch| unsafe { f(xch, domid, &mut p) });
                (params.weight, params.cap_percent) = (p.weight, p.cap);
                (call, rc)
            }
            found @ Scheduler::Other(_) => return Err(SchedError::Unsupported { found }),
        };
        if rc < 0 {
            return Err(SchedError::Domain {
                call,
                domid,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_ids_are_named_and_only_credit_kinds_have_caps() {
        assert_eq!(Scheduler::from_id(5), Scheduler::Credit);
        assert_eq!(Scheduler::from_id(6), Scheduler::Credit2);
        assert_eq!(Scheduler::from_id(8).to_string(), "rtds (id 8)");
        assert_eq!(Scheduler::from_id(9).name(), "null");
        assert_eq!(Scheduler::from_id(77).to_string(), "unknown (id 77)");
        let e = SchedError::Unsupported {
            found: Scheduler::from_id(9),
        };
        assert!(e.to_string().contains("null (id 9)"), "{e}");
        assert!(e.to_string().contains("sched=credit2"), "{e}");
    }
}
