//! One pool domain, seen from the agent: how it is built (through `xl`) and wired to its
//! ring, how its end is read from the hypervisor, and how it is destroyed on every path.
//! This module holds the domain ([`LiveDomain`]), the hypervisor handles its backend shares
//! ([`Hyp`]), their errors and how a domain's end is read and cleaned up; the steps of a
//! build ([`XenProvisioner`]'s) are in module `build`.
//!
//! ```text
//!  XenProvisioner::create(seq)
//!    write <run_dir>/mayfly-<seq>.cfg; `xl create -p -e` it       (builds, leaves it paused)
//!    domid ← xenstore name; uuid ← xc getinfo                      BuildGuard armed from here:
//!    GrantedPages::share(domid, ring pages) → Backend::new (zeroed)   any error destroys it
//!    EventChannel::bind_unbound(domid)
//!    xenstore data/mayfly/* (dom0-owned, guest read-only)
//!    xc_domain_unpause ─▶ shim boots, maps the ring, sends Ready ─▶ xc_domain_pause
//!    → LiveDomain (pooled; Drop destroys)
//!
//!  LiveDomain::end(): xc getinfo (same uuid?) → exit; xc_domain_destroy; then the grant
//!    pages are unshared and the port unbound (field drops), xenstore and the .cfg removed.
//! ```
//!
//! A domain is recognised by domid **and** uuid: a domid that was freed and reused by
//! another domain is never paused, destroyed or cleaned up in its name.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mayfly_domain::{DomainExit, Ring};
use mayfly_ring::RingError;
use mayfly_xen::xenstore::uuid_text;
use mayfly_xen::{
    Control, CtrlError, DomId, DomainNotifier, DomainState, EventChannel, EvtchnError, GntshrError,
    Libraries, PvBuilder, ShutdownReason, Store, StoreError,
};
use slog::{debug, warn, Logger};

use crate::config::{ConfigError, XenConfig};
use crate::phases::Phases;

/// Building a domain failed. The half-built domain has been destroyed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The in-process build of a Mayfly PV guest failed (the builder destroyed it).
    #[error("{name}: building the Mayfly PV guest failed")]
    PvBuild {
        /// Domain name.
        name: String,
        /// Why.
        #[source]
        source: mayfly_xen::BuildError,
    },
    /// The boot info could not be encoded.
    #[error("{name}: encoding the boot info failed")]
    BootInfo {
        /// Domain name.
        name: String,
        /// Why.
        #[source]
        source: mayfly_ring::bootinfo::BootInfoError,
    },
    /// No entropy for the boot info.
    #[error("{name}: reading entropy for the boot info failed")]
    Entropy {
        /// Domain name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration could not be rendered.
    #[error("{name}: rendering the xl configuration failed")]
    Config {
        /// Domain name.
        name: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// The configuration file could not be written or `xl` not started.
    #[error("{name}: {what} {path:?} failed")]
    Io {
        /// Domain name.
        name: String,
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `xl create` failed.
    #[error("{name}: `xl create -p -e` exited with {status}: {output}")]
    Xl {
        /// Domain name.
        name: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// The end of its output.
        output: String,
    },
    /// `xl create` succeeded but no domain of that name is in xenstore.
    #[error("{name}: built, but not found in xenstore")]
    NotFound {
        /// Domain name.
        name: String,
    },
    /// A libxenctrl call failed.
    #[error("{name}: domain control")]
    Ctrl {
        /// Domain name.
        name: String,
        /// The failure.
        #[source]
        source: CtrlError,
    },
    /// Granting the ring pages failed.
    #[error("{name}: granting the ring pages")]
    Grant {
        /// Domain name.
        name: String,
        /// The failure.
        #[source]
        source: GntshrError,
    },
    /// Allocating the event channel failed.
    #[error("{name}: allocating the event channel")]
    Evtchn {
        /// Domain name.
        name: String,
        /// The failure.
        #[source]
        source: EvtchnError,
    },
    /// Writing the xenstore contract failed.
    #[error("{name}: writing the xenstore contract")]
    Store {
        /// Domain name.
        name: String,
        /// The failure.
        #[source]
        source: StoreError,
    },
    /// The ring could not be initialised, or failed while waiting for Ready.
    #[error("{name} (domain {domid}): ring")]
    Ring {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// The failure.
        #[source]
        source: RingError,
    },
    /// No Ready within the wait.
    #[error("{name} (domain {domid}): no Ready within {waited:?} (guest console: /var/log/xen/console/guest-{name}.log)")]
    ReadyTimeout {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// The wait.
        waited: Duration,
    },
    /// The guest's first request was not a valid Ready.
    #[error("{name} (domain {domid}): bad first request: {what}")]
    NotReady {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// What arrived.
        what: String,
    },
    /// The guest's Ready announced other handlers than the pool's first guest did (a
    /// broken or hostile guest; reported as a protocol violation).
    #[error("{name} (domain {domid}): its Ready differs from the pool's first guest's: {differs}")]
    HandlersDiffer {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// How its list differs from the first guest's.
        differs: mayfly_domain::handlers::ListDiffers,
    },
    /// The backend is shutting down (the half-built domain has been destroyed).
    #[error("{name}: the backend is shutting down")]
    Stopping {
        /// Domain name.
        name: String,
    },
    /// The domain ended before Ready.
    #[error("{name} (domain {domid}) ended before Ready: {exit} (guest console: /var/log/xen/console/guest-{name}.log)")]
    Died {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// How.
        exit: DomainExit,
    },
    /// The domain's credit-scheduler weight and cap could not be set (before its first
    /// unpause: it never ran).
    #[error("{name} (domain {domid}): setting its scheduler weight and cap")]
    Sched {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// The failure.
        #[source]
        source: mayfly_xen::SchedError,
    },
}

impl CreateError {
    /// The build step that failed, one word for the audit record's `stage`.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::PvBuild { .. } => "pv_build",
            Self::BootInfo { .. } => "boot_info",
            Self::Entropy { .. } => "entropy",
            Self::Config { .. } => "config",
            Self::Io { .. } | Self::Xl { .. } | Self::NotFound { .. } => "xl",
            Self::Ctrl { .. } => "control",
            Self::Grant { .. } => "grant",
            Self::Evtchn { .. } => "event_channel",
            Self::Store { .. } => "xenstore",
            Self::Ring { .. } => "ring",
            Self::ReadyTimeout { .. } => "ready_timeout",
            Self::NotReady { .. } | Self::HandlersDiffer { .. } => "bad_ready",
            Self::Stopping { .. } => "stopping",
            Self::Died { .. } => "died_before_ready",
            Self::Sched { .. } => "sched",
        }
    }

    /// The domain id, if the domain had been created.
    pub fn domid(&self) -> Option<DomId> {
        match self {
            Self::Ring { domid, .. }
            | Self::ReadyTimeout { domid, .. }
            | Self::NotReady { domid, .. }
            | Self::HandlersDiffer { domid, .. }
            | Self::Died { domid, .. }
            | Self::Sched { domid, .. } => Some(*domid),
            _ => None,
        }
    }
}

/// A pool build that failed (the half-built domain destroyed), as the backend reports it
/// for the agent to audit (`domain.build_failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFailure {
    /// The domain's name (`mayfly-<seq>`).
    pub name: String,
    /// Its domain id, if it had been created.
    pub domid: Option<DomId>,
    /// The step that failed ([`CreateError::stage`]).
    pub stage: &'static str,
    /// The error chain, at most [`BuildFailure::MAX_REASON`] characters.
    pub reason: String,
}

impl BuildFailure {
    /// Most characters of `reason`.
    pub const MAX_REASON: usize = 512;

    /// The report of `err`; `None` for a build given up because the backend stops.
    pub fn of(err: &CreateError) -> Option<Self> {
        if matches!(err, CreateError::Stopping { .. }) {
            return None;
        }
        let name = match err {
            CreateError::PvBuild { name, .. }
            | CreateError::BootInfo { name, .. }
            | CreateError::Entropy { name, .. }
            | CreateError::Config { name, .. }
            | CreateError::Io { name, .. }
            | CreateError::Xl { name, .. }
            | CreateError::NotFound { name }
            | CreateError::Ctrl { name, .. }
            | CreateError::Grant { name, .. }
            | CreateError::Evtchn { name, .. }
            | CreateError::Store { name, .. }
            | CreateError::Ring { name, .. }
            | CreateError::ReadyTimeout { name, .. }
            | CreateError::NotReady { name, .. }
            | CreateError::HandlersDiffer { name, .. }
            | CreateError::Stopping { name }
            | CreateError::Died { name, .. }
            | CreateError::Sched { name, .. } => name.clone(),
        };
        Some(Self {
            name,
            domid: err.domid(),
            stage: err.stage(),
            reason: mayfly_domain::ErrorChain(err)
                .to_string()
                .chars()
                .take(Self::MAX_REASON)
                .collect(),
        })
    }
}

/// Where the backend reports every failed pool build (the agent audits it).
pub type BuildFailureSink = Arc<dyn Fn(BuildFailure) + Send + Sync>;

/// Managing a built domain failed.
#[derive(Debug, thiserror::Error)]
pub enum DomainOpError {
    /// A libxenctrl call failed.
    #[error("{name} (domain {domid})")]
    Ctrl {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// The failure.
        #[source]
        source: CtrlError,
    },
    /// The domain is gone (it cannot be paused for quarantine).
    #[error("{name} (domain {domid}) has already ended: {exit}")]
    Ended {
        /// Domain name.
        name: String,
        /// Domain id.
        domid: DomId,
        /// How.
        exit: DomainExit,
    },
}

/// How a domain ended, from its state (`None`: no such domain any more).
///
/// - running or paused → not ended (`None`);
/// - shut down with reason poweroff (domu-shim's normal end) → `Exited { code: 0 }`;
/// - any other shutdown reason (crash, reboot, watchdog, ...) → `Crashed { signal: 0 }`;
/// - dying or gone: `Destroyed` if the agent destroyed it, else `Crashed { signal: 0 }`.
pub fn exit_of(state: Option<DomainState>, killed_by_agent: bool) -> Option<DomainExit> {
    match state {
        Some(DomainState::Running | DomainState::Paused) => None,
        Some(DomainState::Shutdown(ShutdownReason::Poweroff)) => {
            Some(DomainExit::Exited { code: 0 })
        }
        Some(DomainState::Shutdown(_)) => Some(DomainExit::Crashed { signal: 0 }),
        Some(DomainState::Dying) | None if killed_by_agent => Some(DomainExit::Destroyed),
        Some(DomainState::Dying) | None => Some(DomainExit::Crashed { signal: 0 }),
    }
}

/// A handed-out domain's uuid and its "destroyed by the agent" flag.
pub(crate) type InUse = ([u8; 16], Arc<AtomicBool>);

/// The hypervisor handles and bookkeeping every domain of one backend shares.
pub struct Hyp {
    pub(crate) libs: Arc<Libraries>,
    pub(crate) control: Arc<Control>,
    pub(crate) store: Store,
    pub(crate) config: XenConfig,
    /// The in-process builder (guest `mayfly`).
    pub(crate) pv: Option<PvBuilder>,
    pub(crate) logger: Logger,
    /// Domains handed out, by domid: their "destroyed by the agent" flag.
    pub(crate) in_use: Mutex<HashMap<DomId, InUse>>,
    pub(crate) destroyed: AtomicU64,
    /// Set when the backend shuts down: builds under way give up.
    pub(crate) stopping: AtomicBool,
    /// The handlers of the guests, learned from the first ready domain's `Ready`.
    pub(crate) handlers: mayfly_domain::LearnedHandlers,
    /// Where a guest announcing another list is reported (the agent audits it).
    pub(crate) violations: mayfly_domain::ViolationSink,
    /// Where the time of each domain's phases goes ([`crate::phases`]).
    pub(crate) phases: Arc<Phases>,
    /// The hypervisor's scheduler (credit or credit2), under which each guest's weight and
    /// cap ([`XenConfig::sched`]) are set before its first unpause.
    pub(crate) scheduler: mayfly_xen::Scheduler,
    /// Where failed builds are reported (the agent audits them).
    pub(crate) build_failures: BuildFailureSink,
}

impl Hyp {
    /// The state of `domid` if it is still the domain with `uuid`.
    fn state_of(&self, domid: DomId, uuid: [u8; 16]) -> Result<Option<DomainState>, CtrlError> {
        Ok(self
            .control
            .info(domid)?
            .filter(|i| i.uuid == uuid)
            .map(|i| i.state))
    }

    /// Destroys `domid` if it is still the domain with `uuid`, then removes its xenstore
    /// entries, libxl's files and its console log (unless the domid now belongs to another
    /// domain; the log only unless [`keep_console_log`]) and its configuration file. A
    /// domain built in-process ([`built_by_xl`] false) has no xenstore entries, libxl files
    /// or configuration file, so none are looked for.
    /// Returns the state it had (`None`: it was already gone).
    pub(crate) fn destroy(
        &self,
        domid: DomId,
        uuid: [u8; 16],
        name: &str,
        cfg: &PathBuf,
        build_failed: bool,
    ) -> Result<Option<DomainState>, CtrlError> {
        let info = self.control.info(domid)?;
        let ours = info.filter(|i| i.uuid == uuid).map(|i| i.state);
        if ours.is_some() {
            self.control.destroy(domid)?;
            self.destroyed.fetch_add(1, Ordering::Relaxed);
        }
        let via_xl = built_by_xl(cfg);
        if ours.is_some() || info.is_none() {
            if via_xl {
                if let Err(e) = self.store.remove_domain(domid, Some(uuid)) {
                    warn!(self.logger, "removing a destroyed domain's xenstore entries failed";
                        "domid" => domid, "error" => %e);
                }
                remove_libxl_userdata(Path::new(LIBXL_DIR), domid, uuid);
            }
            if !keep_console_log(ours, build_failed) {
                let _ = fs::remove_file(console_log(name));
            }
        }
        if via_xl {
            let _ = fs::remove_file(cfg);
        }
        Ok(ours)
    }

    /// Destroys a domain handed out to a caller (at shutdown): marks it destroyed by the
    /// agent, so its holder sees `Destroyed`; the holder's drop cleans up.
    pub(crate) fn kill_in_use(&self) {
        let in_use: Vec<(DomId, [u8; 16], Arc<AtomicBool>)> = mayfly_sync::lock(&self.in_use)
            .iter()
            .map(|(d, (u, k))| (*d, *u, Arc::clone(k)))
            .collect();
        for (domid, uuid, killed) in in_use {
            killed.store(true, Ordering::SeqCst);
            match self.state_of(domid, uuid) {
                Ok(Some(_)) => match self.control.destroy(domid) {
                    Ok(()) => {
                        self.destroyed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => warn!(self.logger, "destroying an in-use domain at shutdown failed";
                        "domid" => domid, "error" => %e),
                },
                Ok(None) => {}
                Err(e) => warn!(self.logger, "inspecting an in-use domain at shutdown failed";
                    "domid" => domid, "error" => %e),
            }
        }
    }
}

/// A built domain the agent owns. Dropping it destroys the domain.
pub struct LiveDomain {
    hyp: Arc<Hyp>,
    pub(crate) name: String,
    pub(crate) domid: DomId,
    uuid: [u8; 16],
    cfg: PathBuf,
    pub(crate) ring: Ring,
    pub(crate) notifier: DomainNotifier,
    /// Request id of the guest's Ready (0 until it is read).
    pub(crate) ready_id: u32,
    killed: Arc<AtomicBool>,
    ended: Option<DomainExit>,
    /// Keep the guest's console log when destroyed: set while it boots to Ready (a failed
    /// build's error names the log).
    pub(crate) keep_log: bool,
}

impl std::fmt::Debug for LiveDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveDomain")
            .field("name", &self.name)
            .field("domid", &self.domid)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl LiveDomain {
    /// A domain just built and wired to its ring, before its Ready: destroyed (its console
    /// log kept) if dropped now. `cfg` is its xl config file (empty for a PV guest).
    pub(crate) fn booting(
        hyp: Arc<Hyp>,
        name: String,
        domid: DomId,
        uuid: [u8; 16],
        cfg: PathBuf,
        ring: Ring,
        channel: EventChannel,
    ) -> LiveDomain {
        let notifier = DomainNotifier::new(channel, Arc::clone(&hyp.control));
        LiveDomain {
            hyp,
            name,
            domid,
            uuid,
            cfg,
            ring,
            notifier,
            ready_id: 0,
            killed: Arc::new(AtomicBool::new(false)),
            ended: None,
            keep_log: true,
        }
    }

    /// Domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Domain name (`mayfly-<n>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Request id of the guest's Ready.
    pub fn ready_id(&self) -> u32 {
        self.ready_id
    }

    /// The ring and its notifier.
    pub fn ring(&mut self) -> (&mut Ring, &DomainNotifier) {
        (&mut self.ring, &self.notifier)
    }

    fn op_error(&self, source: CtrlError) -> DomainOpError {
        DomainOpError::Ctrl {
            name: self.name.clone(),
            domid: self.domid,
            source,
        }
    }

    /// Whether it is still this domain and paused or running.
    pub fn alive(&self) -> bool {
        matches!(
            self.hyp.state_of(self.domid, self.uuid),
            Ok(Some(DomainState::Running | DomainState::Paused))
        )
    }

    /// Unpauses it.
    pub fn unpause(&self) -> Result<(), DomainOpError> {
        self.hyp
            .control
            .unpause(self.domid)
            .map_err(|e| self.op_error(e))
    }

    /// Pauses it (for the pool or for quarantine). Fails if it has ended.
    pub fn pause(&self) -> Result<(), DomainOpError> {
        if let Some(exit) = self.try_exit()? {
            return Err(DomainOpError::Ended {
                name: self.name.clone(),
                domid: self.domid,
                exit,
            });
        }
        self.hyp
            .control
            .pause(self.domid)
            .map_err(|e| self.op_error(e))
    }

    /// The exit if it has ended; never blocks.
    pub fn try_exit(&self) -> Result<Option<DomainExit>, DomainOpError> {
        if let Some(exit) = self.ended {
            return Ok(Some(exit));
        }
        let state = self
            .hyp
            .state_of(self.domid, self.uuid)
            .map_err(|e| self.op_error(e))?;
        Ok(exit_of(state, self.killed.load(Ordering::SeqCst)))
    }

    /// Records it as handed out (the backend's shutdown can then destroy it).
    pub(crate) fn register_in_use(&self) {
        mayfly_sync::lock(&self.hyp.in_use)
            .insert(self.domid, (self.uuid, Arc::clone(&self.killed)));
    }

    /// Destroys it (if it still exists) and cleans up; returns how it ended. Idempotent.
    pub fn end(&mut self) -> Result<DomainExit, DomainOpError> {
        if let Some(exit) = self.ended {
            return Ok(exit);
        }
        let state = self
            .hyp
            .destroy(self.domid, self.uuid, &self.name, &self.cfg, self.keep_log)
            .map_err(|e| self.op_error(e))?;
        let exit =
            exit_of(state, self.killed.load(Ordering::SeqCst)).unwrap_or(DomainExit::Destroyed);
        self.ended = Some(exit);
        mayfly_sync::lock(&self.hyp.in_use).remove(&self.domid);
        debug!(self.hyp.logger, "domain destroyed";
            "domid" => self.domid, "name" => &self.name, "exit" => %exit);
        Ok(exit)
    }
}

impl Drop for LiveDomain {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            warn!(self.hyp.logger, "destroying a domain failed (the reconciler will at the next start)";
                "domid" => self.domid, "name" => &self.name, "error" => %e);
        }
        // The ring's grant pages and the event channel are released after this, with the
        // fields: the domain no longer runs.
    }
}

/// Builds Xen domains for the pool.
pub struct XenProvisioner {
    pub(crate) hyp: Arc<Hyp>,
}

/// Whether a domain was created by `xl` (its configuration file `cfg` is named), and so has
/// xenstore entries and libxl files to remove when it is destroyed. A Mayfly PV guest is
/// built in-process (`PathBuf::new()`): nothing of it is ever written to xenstore (it is not
/// introduced to xenstored, so it cannot write there either), and skipping the xenstore
/// round trips takes dom0 work off every transaction (issue 21).
pub(crate) fn built_by_xl(cfg: &Path) -> bool {
    !cfg.as_os_str().is_empty()
}

/// Where xenconsoled (started with `--log=guest`) logs each domain's console.
pub(crate) const CONSOLE_LOG_DIR: &str = "/var/log/xen/console";

/// The console log of domain `name` (`guest-<name>.log`).
pub(crate) fn console_log(name: &str) -> PathBuf {
    Path::new(CONSOLE_LOG_DIR).join(format!("guest-{name}.log"))
}

/// Whether a destroyed domain's console log is kept, for diagnosis: when its build failed
/// (the error names the log) or it crashed (shut down for any reason but poweroff). Every
/// other log is removed with the domain: xenconsoled writes one file per domain, so one per
/// transaction would otherwise pile up in dom0 for ever.
pub fn keep_console_log(state: Option<DomainState>, build_failed: bool) -> bool {
    build_failed
        || matches!(state, Some(DomainState::Shutdown(reason)) if reason != ShutdownReason::Poweroff)
}

/// Where libxl keeps per-domain files (`userdata-<kind>.<domid>.<uuid>.<key>`).
pub(crate) const LIBXL_DIR: &str = "/var/lib/xen";

/// Whether `file` is one of libxl's userdata files for exactly this domain.
fn is_libxl_userdata(file: &str, domid: DomId, uuid: &str) -> bool {
    let Some(rest) = file.strip_prefix("userdata-") else {
        return false;
    };
    let mut parts = rest.splitn(4, '.');
    let (Some(_kind), Some(id), Some(u), Some(_key)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    id == domid.to_string() && u == uuid
}

/// Removes libxl's userdata files of a domain the agent destroyed behind libxl's back
/// (xl would have removed them in `libxl_domain_destroy`). Best effort.
pub(crate) fn remove_libxl_userdata(dir: &Path, domid: DomId, uuid: [u8; 16]) {
    let uuid = uuid_text(uuid);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| is_libxl_userdata(n, domid, &uuid))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_follow_the_documented_mapping() {
        assert_eq!(exit_of(Some(DomainState::Running), false), None);
        assert_eq!(exit_of(Some(DomainState::Paused), true), None);
        assert_eq!(
            exit_of(Some(DomainState::Shutdown(ShutdownReason::Poweroff)), false),
            Some(DomainExit::Exited { code: 0 })
        );
        for reason in [
            ShutdownReason::Crash,
            ShutdownReason::Reboot,
            ShutdownReason::Watchdog,
            ShutdownReason::Other(9),
        ] {
            assert_eq!(
                exit_of(Some(DomainState::Shutdown(reason)), true),
                Some(DomainExit::Crashed { signal: 0 })
            );
        }
        assert_eq!(exit_of(None, true), Some(DomainExit::Destroyed));
        assert_eq!(
            exit_of(Some(DomainState::Dying), false),
            Some(DomainExit::Crashed { signal: 0 })
        );
    }

    #[test]
    fn only_this_domains_libxl_userdata_is_removed() {
        let mut uuid = [0u8; 16];
        uuid[0] = 0xab;
        uuid[15] = 0x01;
        let text = uuid_text(uuid);
        assert_eq!(text, "ab000000-0000-0000-0000-000000000001");
        let dir = tempfile::tempdir().unwrap();
        let ours = [
            format!("userdata-d.5.{text}.xl"),
            format!("userdata-d.5.{text}.libxl-json"),
        ];
        let others = [
            format!("userdata-d.15.{text}.xl"),
            "userdata-d.5.00000000-0000-0000-0000-000000000000.xl".to_owned(),
            format!("bootloader.5.{text}"),
            format!("userdata-d.5.{text}"),
        ];
        for f in ours.iter().chain(&others) {
            fs::write(dir.path().join(f), b"").unwrap();
        }
        remove_libxl_userdata(dir.path(), 5, uuid);
        for f in &ours {
            assert!(!dir.path().join(f).exists(), "{f}");
        }
        for f in &others {
            assert!(dir.path().join(f).exists(), "{f}");
        }
    }

    #[test]
    fn only_domains_xl_created_are_cleaned_from_xenstore() {
        assert!(built_by_xl(Path::new("/run/mayfly/mayfly-7.cfg")));
        assert!(!built_by_xl(&PathBuf::new()));
    }

    #[test]
    fn console_logs_are_kept_only_for_failed_builds_and_crashes() {
        assert_eq!(
            console_log("mayfly-7"),
            Path::new("/var/log/xen/console/guest-mayfly-7.log")
        );
        // A transaction's domain destroyed by the agent, powered off, or already gone.
        for state in [
            Some(DomainState::Running),
            Some(DomainState::Paused),
            Some(DomainState::Dying),
            Some(DomainState::Shutdown(ShutdownReason::Poweroff)),
            None,
        ] {
            assert!(!keep_console_log(state, false), "{state:?}");
            assert!(keep_console_log(state, true), "{state:?}");
        }
        for reason in [
            ShutdownReason::Crash,
            ShutdownReason::Reboot,
            ShutdownReason::Watchdog,
            ShutdownReason::Other(9),
        ] {
            assert!(keep_console_log(Some(DomainState::Shutdown(reason)), false));
        }
    }

    #[test]
    fn failed_builds_are_reported_with_stage_and_domid_but_not_when_stopping() {
        let timeout = CreateError::ReadyTimeout {
            name: "mayfly-9".into(),
            domid: 14,
            waited: Duration::from_secs(2),
        };
        let f = BuildFailure::of(&timeout).unwrap();
        assert_eq!(
            (f.name.as_str(), f.domid, f.stage),
            ("mayfly-9", Some(14), "ready_timeout")
        );
        assert!(f.reason.contains("no Ready within 2s"), "{}", f.reason);
        let died = CreateError::Died {
            name: "mayfly-10".into(),
            domid: 15,
            exit: DomainExit::Crashed { signal: 0 },
        };
        assert_eq!(BuildFailure::of(&died).unwrap().stage, "died_before_ready");
        let long = CreateError::NotReady {
            name: "mayfly-11".into(),
            domid: 16,
            what: "x".repeat(10_000),
        };
        let f = BuildFailure::of(&long).unwrap();
        assert_eq!(f.reason.chars().count(), BuildFailure::MAX_REASON);
        let stopping = CreateError::Stopping {
            name: "mayfly-12".into(),
        };
        assert_eq!(BuildFailure::of(&stopping), None);
    }
}
