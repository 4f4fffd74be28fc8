//! [`XenBackend`] (a [`DomainBackend`]) and [`XenDomain`] (a [`Domain`]).
//!
//! ```text
//!  start:    load libraries → Control (Xen 4.17?) → scheduler credit/credit2, dom0's
//!            weight above the guests'? → xenstore → reconciler → pool threads
//!  refill:   XenProvisioner builds mayfly-<n>, boots it to Ready, pauses it → ready
//!  take():   pops a ready domain still alive, xc_domain_unpause → XenDomain
//!  XenDomain: destroy() / Drop → xc_domain_destroy, cleanup; quarantine() → paused, kept
//!  shutdown: pool stops (ready ones destroyed), in-use ones destroyed (holders see
//!            PeerGone, then Destroyed), quarantined ones destroyed
//! ```
//!
//! Threads: one per refill (blocking `xl` and hypercalls); callers' threads for take,
//! destroy and quarantine. No async runtime; cleanup is synchronous.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mayfly_domain::{
    Domain, DomainBackend, DomainError, DomainExit, DomainId, PoolStats, Quarantine, Quarantined,
    Refused, Ring, MAX_QUARANTINED,
};
use mayfly_ring::Notifier;
use mayfly_sync::lock;
use mayfly_xen::{Control, CtrlError, Libraries, LoadError, PvBuilder, Store, StoreError};
use slog::{info, warn, Logger};

use crate::config::{gntalloc_limit, ConfigError, GuestKind, XenConfig, GNTALLOC_LIMIT_PATH};
use crate::domain::{BuildFailureSink, DomainOpError, Hyp, LiveDomain, XenProvisioner};
use crate::phases::{Phase, PhaseTotal, Phases};
use crate::pool::{Pool, PoolConfig, Slot, TakeError};
use crate::reconcile::{self, ReconcileError};

pub use crate::config::BACKEND;

/// The Xen backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration was refused.
    #[error("xen backend configuration")]
    Config(#[from] ConfigError),
    /// The Xen libraries are missing.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// libxenctrl could not be opened, or the hypervisor is not Xen 4.17.
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    /// xenstore could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run directory could not be created.
    #[error("creating the run directory {path:?} failed")]
    RunDir {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The reconciler failed.
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    /// A refill thread could not be started.
    #[error("starting the refill threads failed")]
    Thread(#[source] std::io::Error),
    /// The Mayfly PV guest kernel could not be read.
    #[error("reading the Mayfly PV guest kernel {path:?} failed")]
    Kernel {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The in-process builder could not be set up (libxenguest, the image, the memory).
    #[error("setting up the Mayfly PV guest builder")]
    Builder(#[from] mayfly_xen::BuildError),
    /// The scheduler has no weights and caps, or dom0's could not be read.
    #[error("the guests' CPU weight and cap cannot be set")]
    Sched(#[from] mayfly_xen::SchedError),
    /// A cap was asked of the credit2 scheduler. Xen 4.17's credit2 cap code crashes the
    /// hypervisor as capped domains come and go (seen in the Xen-in-QEMU suite with Debian's
    /// 4.17.7: a page fault in `unpark_parked_units` from `replenish_domain_budget`), so
    /// the agent refuses to set one.
    #[error("guest_cap_percent {cap_percent} under the credit2 scheduler: Xen 4.17's credit2 caps crash the hypervisor as capped domains are destroyed (unpark_parked_units); set guest_cap_percent = 0, or boot Xen with sched=credit")]
    Credit2Cap {
        /// The cap asked.
        cap_percent: u16,
    },
    /// The guests' weight is not below dom0's: a guest would compete with the agent as an
    /// equal.
    #[error("guest_weight {guest} is not below dom0's weight {dom0} under the {scheduler} scheduler (lower guest_weight, or raise dom0's: xl sched-{scheduler} -d 0 -w N)")]
    WeightNotBelowDom0 {
        /// Configured for guests.
        guest: u16,
        /// dom0's.
        dom0: u16,
        /// The scheduler.
        scheduler: mayfly_xen::Scheduler,
    },
}

/// The hypervisor's scheduler, if it has weights and caps, dom0's weight is above the
/// guests' and no cap is asked of credit2.
fn check_scheduler(
    control: &Control,
    sched: mayfly_xen::CreditParams,
) -> Result<mayfly_xen::Scheduler, StartError> {
    let scheduler = control.scheduler()?;
    refuse_credit2_cap(scheduler, sched)?;
    let dom0 = control.credit(scheduler, 0)?;
    check_weight_below_dom0(scheduler, sched, dom0)?;
    Ok(scheduler)
}

/// Refuses a nonzero cap under credit2 (whose cap code crashes Xen 4.17).
fn refuse_credit2_cap(
    scheduler: mayfly_xen::Scheduler,
    sched: mayfly_xen::CreditParams,
) -> Result<(), StartError> {
    if scheduler == mayfly_xen::Scheduler::Credit2 && sched.cap_percent != 0 {
        return Err(StartError::Credit2Cap {
            cap_percent: sched.cap_percent,
        });
    }
    Ok(())
}

/// Refuses a guest weight that is not below dom0's.
fn check_weight_below_dom0(
    scheduler: mayfly_xen::Scheduler,
    sched: mayfly_xen::CreditParams,
    dom0: mayfly_xen::CreditParams,
) -> Result<(), StartError> {
    if sched.weight >= dom0.weight {
        return Err(StartError::WeightNotBelowDom0 {
            guest: sched.weight,
            dom0: dom0.weight,
            scheduler,
        });
    }
    Ok(())
}

/// Reads the Mayfly PV guest kernel, refusing a file larger than the builder accepts
/// before reading it.
fn read_kernel(path: &std::path::Path) -> Result<Vec<u8>, StartError> {
    let err = |source| StartError::Kernel {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(err)?.len();
    if len > mayfly_xen::pvbuild::MAX_KERNEL_LEN as u64 {
        return Err(StartError::Builder(mayfly_xen::BuildError::Image {
            len: usize::try_from(len).unwrap_or(usize::MAX),
        }));
    }
    std::fs::read(path).map_err(err)
}

/// Logs the host as Xen describes it (CPUs, memory, capabilities, Xen's command line).
fn log_host(control: &Control, logger: &Logger) {
    match (control.physinfo(), control.xen_cmdline()) {
        (Ok(p), Ok(cmdline)) => info!(logger, "xen host";
            "nr_cpus" => p.nr_cpus, "total_memory_mib" => p.total_memory_mib(),
            "free_memory_mib" => p.free_pages / 256, "hvm" => p.hvm, "hap" => p.hap,
            "iommu" => p.iommu, "xen_cmdline" => cmdline),
        (Err(e), _) | (_, Err(e)) => {
            warn!(logger, "reading the host's physinfo failed"; "error" => %e);
        }
    }
}

type QuarantineList = Mutex<Quarantine<LiveDomain>>;

/// The Xen domain backend: PV domUs of the template, built ahead and paused at the shim's
/// ready point.
pub struct XenBackend {
    pool: Pool<XenProvisioner>,
    hyp: Arc<Hyp>,
    quarantined: Arc<QuarantineList>,
}

impl std::fmt::Debug for XenBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenBackend")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl XenBackend {
    /// Loads the Xen libraries, checks the hypervisor, destroys leftovers of a previous run
    /// and starts filling the pool (in the background: see [`XenBackend::wait_ready`]).
    pub fn start(config: XenConfig, logger: Logger) -> Result<Self, StartError> {
        Self::start_reporting(config, logger, mayfly_domain::handlers::ignore_violations())
    }

    /// [`XenBackend::start`], reporting to `violations` every guest whose `Ready` announces
    /// other handlers than the pool's first guest did (it is destroyed; the agent audits
    /// the report as a protocol violation).
    pub fn start_reporting(
        config: XenConfig,
        logger: Logger,
        violations: mayfly_domain::ViolationSink,
    ) -> Result<Self, StartError> {
        Self::start_audited(config, logger, violations, Arc::new(|_| {}))
    }

    /// [`XenBackend::start_reporting`], also reporting to `build_failures` every pool build
    /// that failed (its domain destroyed): a guest that crashed, spun or hung before its
    /// Ready, a scheduler parameter Xen refused, a build step that failed.
    pub fn start_audited(
        config: XenConfig,
        logger: Logger,
        violations: mayfly_domain::ViolationSink,
        build_failures: BuildFailureSink,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let libs = Libraries::load()?;
        let control = Arc::new(Control::open(Arc::clone(&libs))?);
        let scheduler = check_scheduler(&control, config.sched)?;
        let store = Store::open()?;
        std::fs::create_dir_all(&config.run_dir).map_err(|source| StartError::RunDir {
            path: config.run_dir.clone(),
            source,
        })?;
        reconcile::reconcile(&control, &store, &config.run_dir, &logger)?;
        let pv = match config.guest {
            GuestKind::Mayfly => Some(PvBuilder::new(
                Arc::clone(&libs),
                read_kernel(&config.mayfly_kernel)?,
                config.mayfly_memory_mib,
            )?),
            GuestKind::Linux => None,
        };
        let pages = config.pages_at_most();
        let limit = gntalloc_limit();
        if pages > limit {
            warn!(logger, "the backend may share more ring pages than gntalloc's limit allows; builds fail with ENOSPC past it: raise it (write at least this to the parameter)";
                "pages" => pages, "limit" => limit, "parameter" => GNTALLOC_LIMIT_PATH);
        }
        let pool_config = PoolConfig {
            pool_size: config.pool_size,
            max_in_use: config.max_in_use,
            refill_threads: config.build_threads,
        };
        let (major, minor) = control.version();
        info!(logger, "guest domains' CPU share";
            "scheduler" => %scheduler, "weight" => config.sched.weight,
            "cap_percent" => config.sched.cap_percent);
        match config.guest {
            GuestKind::Mayfly => info!(logger, "xen backend starting";
                "xen" => format!("{major}.{minor}"), "pool_size" => config.pool_size,
                "guest" => %config.guest, "kernel" => %config.mayfly_kernel.display(),
                "memory_mib" => config.mayfly_memory_mib),
            GuestKind::Linux => info!(logger, "xen backend starting";
                "xen" => format!("{major}.{minor}"), "pool_size" => config.pool_size,
                "guest" => %config.guest,
                "kernel" => %config.kernel.display(), "ramdisk" => %config.ramdisk.display(),
                "memory_mib" => config.memory_mib),
        }
        log_host(&control, &logger);
        let hyp = Arc::new(Hyp {
            libs,
            control,
            store,
            config,
            pv,
            logger: logger.clone(),
            in_use: Mutex::new(HashMap::new()),
            destroyed: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            handlers: mayfly_domain::LearnedHandlers::new(),
            violations,
            phases: Arc::new(Phases::default()),
            scheduler,
            build_failures,
        });
        let provisioner = XenProvisioner {
            hyp: Arc::clone(&hyp),
        };
        let pool =
            Pool::start(provisioner, pool_config, "xen", logger).map_err(StartError::Thread)?;
        Ok(Self {
            pool,
            hyp,
            quarantined: Arc::new(Mutex::new(Quarantine::new(MAX_QUARANTINED, "destroyed"))),
        })
    }

    /// Waits up to `timeout` until `count` domains are ready. Returns whether they are.
    pub fn wait_ready(&self, count: usize, timeout: Duration) -> bool {
        self.pool.wait_ready(count, timeout)
    }

    /// Waits up to `timeout` until the first domain has announced its handlers in its
    /// `Ready` (the pool's first build, retried with back-off if it fails); returns them,
    /// or `None` if no domain became ready in time.
    pub fn wait_handlers(&self, timeout: Duration) -> Option<Vec<String>> {
        self.hyp.handlers.wait(timeout)
    }

    /// The time spent in each phase of the domains' lives since the start
    /// ([`crate::phases`]).
    pub fn phases(&self) -> Vec<PhaseTotal> {
        self.hyp.phases.totals()
    }

    /// The in-process builds (Mayfly guest) since the start, and the time of each of
    /// their steps summed, in microseconds ([`Phases::steps`]).
    pub fn build_steps(
        &self,
    ) -> (
        u64,
        [(&'static str, u64); mayfly_xen::pvbuild::BUILD_STEPS.len()],
    ) {
        self.hyp.phases.steps()
    }

    /// The CPU time dom0 has used since it booted, in nanoseconds, as Xen counts it (every
    /// vCPU of dom0: the agent, its kernel work, xenstored, ...); `None` if Xen does not
    /// answer. Beside the wall time of a load run, it says how busy dom0 was.
    pub fn dom0_cpu_ns(&self) -> Option<u64> {
        self.hyp
            .control
            .info(0)
            .ok()
            .flatten()
            .map(|i| i.cpu_time_ns)
    }

    /// Like [`DomainBackend::take`], returning the concrete type.
    pub fn take_domain(&self, timeout: Duration) -> Result<XenDomain, DomainError> {
        let asked = Instant::now();
        let taken = self.pool.take(timeout);
        self.hyp.phases.record(Phase::Wait, asked.elapsed());
        match taken {
            Ok((live, slot)) => Ok(XenDomain {
                live: Some(live),
                slot: Some(slot),
                quarantined: Arc::clone(&self.quarantined),
                logger: self.hyp.logger.clone(),
                phases: Arc::clone(&self.hyp.phases),
                handed_out: Instant::now(),
            }),
            Err(TakeError::Exhausted { waited }) => Err(DomainError::Exhausted {
                backend: BACKEND,
                waited,
            }),
            Err(TakeError::ShutDown) => Err(DomainError::ShutDown { backend: BACKEND }),
            Err(TakeError::Activate(source)) => Err(DomainError::Create {
                backend: BACKEND,
                source,
            }),
        }
    }
}

impl DomainBackend for XenBackend {
    /// The quarantined domains, kept paused for forensics.
    fn quarantined(&self) -> Vec<Quarantined> {
        lock(&self.quarantined).list()
    }

    /// Destroys a quarantined domain (after forensics). `Ok(None)`: no such domain.
    fn release_quarantined(&self, id: DomainId) -> Result<Option<DomainExit>, DomainError> {
        let entry = lock(&self.quarantined).release(id);
        let Some(mut live) = entry else {
            return Ok(None);
        };
        live.end()
            .map(Some)
            .map_err(|e| DomainError::control(BACKEND, id, e))
    }

    fn name(&self) -> &'static str {
        BACKEND
    }

    /// The handler names the pool's first ready guest announced in its `Ready` (every
    /// later guest is held to the same list); empty until one did
    /// ([`XenBackend::wait_handlers`] waits for it).
    fn handlers(&self) -> Vec<String> {
        self.hyp.handlers.get().unwrap_or_default()
    }

    fn take(&self, timeout: Duration) -> Result<Box<dyn Domain>, DomainError> {
        self.take_domain(timeout)
            .map(|d| Box::new(d) as Box<dyn Domain>)
    }

    fn stats(&self) -> PoolStats {
        let counts = self.pool.counts();
        PoolStats {
            ready: counts.ready,
            in_use: counts.in_use,
            created: counts.created,
            destroyed: self.hyp.destroyed.load(Ordering::Relaxed),
            failed: counts.failed,
        }
    }

    /// Destroys every domain: ready (with the pool), in use (their holders see
    /// [`mayfly_ring::Wake::PeerGone`], then `Destroyed`) and quarantined.
    fn shutdown(&self) {
        // Builds under way give up within STOP_CHECK instead of waiting out a boot.
        self.hyp.stopping.store(true, Ordering::SeqCst);
        self.pool.shutdown();
        self.hyp.kill_in_use();
        let quarantined = lock(&self.quarantined).close();
        drop(quarantined);
        info!(self.hyp.logger, "xen backend shut down"; "stats" => ?self.stats());
    }
}

impl Drop for XenBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One domain handed out for one transaction. Dropping it without [`Domain::destroy`]
/// destroys it too.
pub struct XenDomain {
    // Field order matters: the domain is destroyed before its pool slot is freed.
    live: Option<LiveDomain>,
    slot: Option<Slot<XenProvisioner>>,
    quarantined: Arc<QuarantineList>,
    logger: Logger,
    phases: Arc<Phases>,
    handed_out: Instant,
}

impl std::fmt::Debug for XenDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenDomain")
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl XenDomain {
    fn error(&self, e: impl std::error::Error + Send + Sync + 'static) -> DomainError {
        self.error_for(self.id(), e)
    }

    fn error_for(
        &self,
        id: DomainId,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> DomainError {
        DomainError::control(BACKEND, id, e)
    }

    /// The domain's name (`mayfly-<n>`).
    pub fn name(&self) -> &str {
        self.live.as_ref().map_or("", LiveDomain::name)
    }
}

impl Domain for XenDomain {
    fn id(&self) -> DomainId {
        self.live.as_ref().map_or(0, LiveDomain::domid)
    }

    /// The Xen domid.
    fn handle(&self) -> String {
        self.id().to_string()
    }

    fn ready_id(&self) -> u32 {
        self.live.as_ref().map_or(0, LiveDomain::ready_id)
    }

    fn ring(&mut self) -> (&mut Ring, &dyn Notifier) {
        let live = self
            .live
            .as_mut()
            .unwrap_or_else(|| unreachable!("a XenDomain holds its domain until consumed"));
        let (ring, notifier) = live.ring();
        (ring, notifier)
    }

    fn try_exit(&mut self) -> Result<Option<DomainExit>, DomainError> {
        let Some(live) = self.live.as_ref() else {
            return Ok(None);
        };
        live.try_exit().map_err(|e| self.error(e))
    }

    fn destroy(mut self: Box<Self>) -> Result<DomainExit, DomainError> {
        let Some(mut live) = self.live.take() else {
            return Ok(DomainExit::Destroyed);
        };
        let id = live.domid();
        self.phases.record(Phase::InUse, self.handed_out.elapsed());
        let ending = Instant::now();
        let result = live.end().map_err(|e| DomainError::control(BACKEND, id, e));
        drop(live);
        self.phases.record(Phase::Destroy, ending.elapsed());
        drop(self.slot.take());
        result
    }

    fn quarantine(mut self: Box<Self>) -> Result<Quarantined, DomainError> {
        let Some(live) = self.live.take() else {
            return Err(self.error(DomainOpError::Ended {
                name: String::new(),
                domid: 0,
                exit: DomainExit::Destroyed,
            }));
        };
        let id = live.domid();
        if let Err(e) = live.pause() {
            // Not stopped: destroyed (by dropping it) rather than kept running.
            drop(live);
            return Err(DomainError::control(BACKEND, id, e));
        }
        let quarantined = Quarantined {
            backend: BACKEND,
            id,
            handle: id.to_string(),
        };
        let name = live.name().to_owned();
        // The pool's shutdown comes before the quarantine's sweep: a domain quarantined in
        // between is destroyed now, like one that comes after the sweep.
        let shut_down = self.slot.as_ref().is_some_and(Slot::pool_shut_down);
        let admitted = if shut_down {
            Err(Refused::Closed(live))
        } else {
            lock(&self.quarantined).admit(quarantined.clone(), live)
        };
        match admitted {
            Ok(()) => {}
            Err(Refused::Closed(live)) => drop(live), // shutdown swept the list: destroy it now
            Err(Refused::Full(live, full)) => {
                drop(live); // the quarantine is full: destroyed, not kept
                drop(self.slot.take());
                warn!(self.logger, "quarantine full: domain destroyed instead";
                    "domid" => id, "name" => &name, "max" => full.max);
                return Err(self.error_for(id, full));
            }
        }
        warn!(self.logger, "domain quarantined (paused, kept for forensics)";
            "domid" => id, "name" => &name);
        drop(self.slot.take());
        Ok(quarantined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_xen::{CreditParams, Scheduler};

    fn params(weight: u16, cap_percent: u16) -> CreditParams {
        CreditParams {
            weight,
            cap_percent,
        }
    }

    #[test]
    fn a_cap_is_refused_under_credit2_and_allowed_under_credit() {
        let e = refuse_credit2_cap(Scheduler::Credit2, params(128, 25)).unwrap_err();
        assert!(
            matches!(e, StartError::Credit2Cap { cap_percent: 25 }),
            "{e:?}"
        );
        let text = e.to_string();
        for part in [
            "guest_cap_percent 25",
            "credit2 caps crash the hypervisor",
            "guest_cap_percent = 0",
            "sched=credit",
        ] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
        refuse_credit2_cap(Scheduler::Credit2, params(128, 0)).unwrap();
        refuse_credit2_cap(Scheduler::Credit, params(128, 25)).unwrap();
        refuse_credit2_cap(Scheduler::Credit, params(128, 100)).unwrap();
    }

    #[test]
    fn a_guest_weight_must_be_below_dom0s() {
        check_weight_below_dom0(Scheduler::Credit, params(255, 25), params(256, 0)).unwrap();
        for guest in [256, 300] {
            let e = check_weight_below_dom0(Scheduler::Credit, params(guest, 0), params(256, 0))
                .unwrap_err();
            assert!(
                matches!(e, StartError::WeightNotBelowDom0 { dom0: 256, .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains("xl sched-credit -d 0"), "{e}");
        }
    }
}
