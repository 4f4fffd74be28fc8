//! One pool domain, seen from the agent: how it is built (through `xl`) and wired to its
//! ring, how its end is read from the hypervisor, and how it is destroyed on every path.
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
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mayfly_domain::{DomainExit, Ring};
use mayfly_ring::wire::PROTOCOL_VERSION;
use mayfly_ring::{Backend, Request, RingError, SharedMem};
use mayfly_xen::xenstore::uuid_text;
use mayfly_xen::{
    Control, CtrlError, DomId, DomainNotifier, DomainState, EventChannel, EvtchnError, GntshrError,
    GrantedPages, Libraries, PvBuilder, RingContract, ShutdownReason, Store, StoreError,
};
use slog::{debug, warn, Logger};

use crate::build_handles::BuildHandles;
use crate::config::{ConfigError, XenConfig, NAME_PREFIX};
use crate::phases::{Phase, Phases};
use crate::pool::{BoxError, Provisioner};

/// How often a build waiting for Ready checks whether the backend is stopping.
const STOP_CHECK: Duration = Duration::from_millis(500);
/// Most bytes of `xl`'s output kept in an error.
const XL_OUTPUT_KEPT: usize = 2048;

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
}

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
    /// The libxenctrl handles its builds use, not `control` ([`crate::build_handles`]).
    pub(crate) build_handles: BuildHandles,
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
    /// domain; the log only unless [`keep_console_log`]) and its configuration file.
    /// Returns the state it had (`None`: it was already gone).
    fn destroy(
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
        if ours.is_some() || info.is_none() {
            if let Err(e) = self.store.remove_domain(domid, Some(uuid)) {
                warn!(self.logger, "removing a destroyed domain's xenstore entries failed";
                    "domid" => domid, "error" => %e);
            }
            remove_libxl_userdata(Path::new(LIBXL_DIR), domid, uuid);
            if !keep_console_log(ours, build_failed) {
                let _ = fs::remove_file(console_log(name));
            }
        }
        let _ = fs::remove_file(cfg);
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

/// A half-built domain: destroyed on drop unless [`BuildGuard::finish`]ed. Holds the
/// resources granted to it so they are released only after the domain is gone.
struct BuildGuard<'h> {
    hyp: &'h Arc<Hyp>,
    name: String,
    domid: DomId,
    uuid: [u8; 16],
    cfg: PathBuf,
    ring: Option<Ring>,
    channel: Option<EventChannel>,
    armed: bool,
}

impl Drop for BuildGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = self
            .hyp
            .destroy(self.domid, self.uuid, &self.name, &self.cfg, false)
        {
            warn!(self.hyp.logger, "destroying a half-built domain failed (the reconciler will at the next start)";
                "domid" => self.domid, "name" => &self.name, "error" => %e);
        }
        // `ring` (the grant pages) and `channel` drop after this: the domain is gone.
    }
}

/// A built domain the agent owns. Dropping it destroys the domain.
pub struct LiveDomain {
    hyp: Arc<Hyp>,
    name: String,
    domid: DomId,
    uuid: [u8; 16],
    cfg: PathBuf,
    ring: Ring,
    notifier: DomainNotifier,
    ready_id: u32,
    killed: Arc<AtomicBool>,
    ended: Option<DomainExit>,
    /// Keep the guest's console log when destroyed: set while it boots to Ready (a failed
    /// build's error names the log).
    keep_log: bool,
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

impl XenProvisioner {
    fn build(&self, seq: u64) -> Result<LiveDomain, CreateError> {
        let hyp = &self.hyp;
        let config = &hyp.config;
        let started = Instant::now();
        let name = format!("{NAME_PREFIX}{seq}");
        if hyp.stopping.load(Ordering::SeqCst) {
            return Err(CreateError::Stopping { name });
        }
        if let Some(builder) = &hyp.pv {
            return self.build_mayfly(builder, seq, name, started);
        }
        let cfg = config.run_dir.join(format!("{name}.cfg"));
        let text = config
            .xl_config(&name)
            .map_err(|source| CreateError::Config {
                name: name.clone(),
                source,
            })?;
        fs::write(&cfg, text).map_err(|source| CreateError::Io {
            name: name.clone(),
            what: "writing",
            path: cfg.clone(),
            source,
        })?;
        let mut xl = Command::new(&config.xl);
        xl.args(["create", "-p", "-e"]).arg(&cfg);
        // Bounded by the whole build's budget: a hung `xl` must not hold a refill thread (and
        // the backend's shutdown, which joins it) for ever.
        let output = output_within(xl, config.ready_timeout, &hyp.stopping).map_err(|source| {
            CreateError::Io {
                name: name.clone(),
                what: "running xl for",
                path: cfg.clone(),
                source,
            }
        });
        let ctrl = |source| CreateError::Ctrl {
            name: name.clone(),
            source,
        };
        let store = |source| CreateError::Store {
            name: name.clone(),
            source,
        };
        // Whatever xl did, a domain of this name is ours to destroy on failure.
        let domid = hyp.store.domid_of(&name).map_err(store)?;
        let uuid = match domid {
            Some(d) => match hyp.control.info(d) {
                Ok(info) => info.map(|i| i.uuid),
                Err(source) => {
                    // Found by its name moments ago: ours, destroyed without the uuid check.
                    if let Err(e) = hyp.control.destroy(d) {
                        warn!(hyp.logger, "destroying a half-built domain failed (the reconciler will at the next start)";
                            "domid" => d, "name" => &name, "error" => %e);
                    }
                    let _ = hyp.store.remove_domain(d, None);
                    let _ = fs::remove_file(&cfg);
                    return Err(ctrl(source));
                }
            },
            None => None,
        };
        let mut guard = match (domid, uuid) {
            (Some(domid), Some(uuid)) => BuildGuard {
                hyp,
                name: name.clone(),
                domid,
                uuid,
                cfg: cfg.clone(),
                ring: None,
                channel: None,
                armed: true,
            },
            _ => {
                let _ = fs::remove_file(&cfg);
                let output = output?;
                if !output.status.success() {
                    return Err(CreateError::Xl {
                        name,
                        status: output.status,
                        output: tail(&output.stderr, &output.stdout),
                    });
                }
                return Err(CreateError::NotFound { name });
            }
        };
        let output = output?;
        if !output.status.success() {
            return Err(CreateError::Xl {
                name,
                status: output.status,
                output: tail(&output.stderr, &output.stdout),
            });
        }
        let domid = guard.domid;
        let pages =
            GrantedPages::share(Arc::clone(&hyp.libs), domid, config.geometry.total_pages())
                .map_err(|source| CreateError::Grant {
                    name: name.clone(),
                    source,
                })?;
        let ring_refs = pages.refs().to_vec();
        let mem: Arc<dyn SharedMem> = Arc::new(pages);
        let ring_error = |source| CreateError::Ring {
            name: name.clone(),
            domid,
            source,
        };
        guard.ring = Some(Backend::new(mem, config.geometry).map_err(ring_error)?);
        let channel =
            EventChannel::bind_unbound(Arc::clone(&hyp.libs), domid).map_err(|source| {
                CreateError::Evtchn {
                    name: name.clone(),
                    source,
                }
            })?;
        let contract = RingContract {
            ring_refs,
            event_channel: channel.port(),
        };
        guard.channel = Some(channel);
        hyp.store.write_contract(domid, &contract).map_err(store)?;
        // Hand the resources over: from here the LiveDomain destroys on every path.
        let (Some(ring), Some(channel)) = (guard.ring.take(), guard.channel.take()) else {
            unreachable!("set above");
        };
        guard.armed = false;
        let live = LiveDomain {
            hyp: Arc::clone(hyp),
            name: name.clone(),
            domid,
            uuid: guard.uuid,
            cfg: cfg.clone(),
            ring,
            notifier: DomainNotifier::new(channel, Arc::clone(&hyp.control)),
            ready_id: 0,
            killed: Arc::new(AtomicBool::new(false)),
            ended: None,
            keep_log: true,
        };
        drop(guard);
        self.await_ready(live, started)
    }

    /// Unpauses a freshly built domain, waits for the guest's `Ready` on the ring (within
    /// the build's budget, giving up if the backend stops) and pauses it for the pool.
    fn await_ready(
        &self,
        mut live: LiveDomain,
        started: Instant,
    ) -> Result<LiveDomain, CreateError> {
        let hyp = &self.hyp;
        let config = &hyp.config;
        let name = live.name.clone();
        let domid = live.domid;
        let ctrl = |source| CreateError::Ctrl {
            name: name.clone(),
            source,
        };
        let ring_error = |source| CreateError::Ring {
            name: name.clone(),
            domid,
            source,
        };
        hyp.phases.record(Phase::Build, started.elapsed());
        let unpaused = Instant::now();
        hyp.control.unpause(domid).map_err(ctrl)?;
        let waited = config.ready_timeout;
        // Waited for in slices, so that a backend shutting down does not wait out a slow boot.
        let envelope = loop {
            let left = waited.saturating_sub(started.elapsed());
            if hyp.stopping.load(Ordering::SeqCst) {
                return Err(CreateError::Stopping { name });
            }
            match live
                .ring
                .recv_request(&live.notifier, Some(left.min(STOP_CHECK)))
            {
                Ok(envelope) => break envelope,
                Err(RingError::PeerGone) => {
                    let exit = live.end().unwrap_or(DomainExit::Crashed { signal: 0 });
                    return Err(CreateError::Died { name, domid, exit });
                }
                Err(RingError::Timeout { .. }) if started.elapsed() < waited => {}
                Err(RingError::Timeout { .. }) => {
                    return Err(CreateError::ReadyTimeout {
                        name,
                        domid,
                        waited,
                    })
                }
                Err(source) => return Err(ring_error(source)),
            }
        };
        match envelope.body {
            Request::Ready {
                protocol_version,
                handlers,
            } if protocol_version == PROTOCOL_VERSION => {
                // The first guest's list is the pool's; a later guest announcing another
                // is broken or hostile: refused (`live` is destroyed on return) and reported.
                if let Err(differs) = hyp.handlers.admit(&handlers) {
                    (hyp.violations)(mayfly_domain::Violation {
                        backend: crate::config::BACKEND,
                        domain: domid,
                        what: format!("its Ready {differs}"),
                    });
                    return Err(CreateError::HandlersDiffer {
                        name,
                        domid,
                        differs,
                    });
                }
                live.ready_id = envelope.id;
            }
            other => {
                return Err(CreateError::NotReady {
                    name,
                    domid,
                    what: format!("{other:?}").chars().take(200).collect(),
                })
            }
        }
        hyp.control.pause(domid).map_err(ctrl)?;
        hyp.phases.record(Phase::Boot, unpaused.elapsed());
        live.keep_log = false;
        debug!(hyp.logger, "domain ready and paused";
            "domid" => domid, "name" => &live.name, "millis" => started.elapsed().as_millis());
        Ok(live)
    }

    /// Builds a Mayfly PV guest in-process ([`PvBuilder`]): the ring's pages granted to the
    /// new domid, its unbound port and fresh entropy in the boot info (the boot module), no
    /// xl, no xenstore. The domain handle carries `MAYFLYPV` and the sequence number, which
    /// is how the reconciler finds it after an agent crash.
    fn build_mayfly(
        &self,
        builder: &PvBuilder,
        seq: u64,
        name: String,
        started: Instant,
    ) -> Result<LiveDomain, CreateError> {
        let hyp = &self.hyp;
        let config = &hyp.config;
        let mut entropy = [0u8; mayfly_ring::bootinfo::ENTROPY_LEN];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
            .map_err(|source| CreateError::Entropy {
                name: name.clone(),
                source,
            })?;
        let tag = seq.to_be_bytes();
        let mut parts: Option<(Ring, EventChannel)> = None;
        let built = hyp
            .build_handles
            .with(|control| {
                builder.build(control, tag, |domid| -> Result<Vec<u8>, CreateError> {
                    let pages = GrantedPages::share(
                        Arc::clone(&hyp.libs),
                        domid,
                        config.geometry.total_pages(),
                    )
                    .map_err(|source| CreateError::Grant {
                        name: name.clone(),
                        source,
                    })?;
                    let grant_refs = pages.refs().to_vec();
                    let mem: Arc<dyn SharedMem> = Arc::new(pages);
                    let ring =
                        Backend::new(mem, config.geometry).map_err(|source| CreateError::Ring {
                            name: name.clone(),
                            domid,
                            source,
                        })?;
                    let channel = EventChannel::bind_unbound(Arc::clone(&hyp.libs), domid)
                        .map_err(|source| CreateError::Evtchn {
                            name: name.clone(),
                            source,
                        })?;
                    let info = mayfly_ring::bootinfo::BootInfo {
                        backend_domid: 0,
                        event_channel: channel.port(),
                        entropy,
                        grant_refs,
                    };
                    let module = info.encode().map_err(|source| CreateError::BootInfo {
                        name: name.clone(),
                        source,
                    })?;
                    parts = Some((ring, channel));
                    Ok(module)
                })
            })
            .map_err(|source| CreateError::Ctrl {
                name: name.clone(),
                source,
            })?
            .map_err(|source| CreateError::PvBuild {
                name: name.clone(),
                source,
            })?;
        hyp.phases.record_steps(&built.steps);
        // The builder destroyed the domain on failure; the ring's pages and port (if they
        // were made) are released with `parts` after that.
        let Some((ring, channel)) = parts else {
            return Err(CreateError::NotFound { name });
        };
        let live = LiveDomain {
            hyp: Arc::clone(hyp),
            name,
            domid: built.domid,
            uuid: mayfly_xen::pvbuild::handle(tag),
            cfg: PathBuf::new(),
            ring,
            notifier: DomainNotifier::new(channel, Arc::clone(&hyp.control)),
            ready_id: 0,
            killed: Arc::new(AtomicBool::new(false)),
            ended: None,
            keep_log: true,
        };
        self.await_ready(live, started)
    }
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

/// Runs `command` (stdin null, stdout and stderr captured) like [`Command::output`], but
/// kills it if it has not exited within `timeout` or once `stop` is set (`TimedOut` /
/// `Interrupted`). The child is always reaped.
fn output_within(
    mut command: Command,
    timeout: Duration,
    stop: &AtomicBool,
) -> std::io::Result<std::process::Output> {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Ok(status);
        }
        let cause = if stop.load(Ordering::SeqCst) {
            Some(std::io::ErrorKind::Interrupted)
        } else if started.elapsed() >= timeout {
            Some(std::io::ErrorKind::TimedOut)
        } else {
            None
        };
        if let Some(kind) = cause {
            let _ = child.kill();
            let _ = child.wait();
            break Err(std::io::Error::new(
                kind,
                format!("killed after {:?}", started.elapsed()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The pipes close when the child (and anything it left holding them) is gone.
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(std::process::Output {
        status: status?,
        stdout,
        stderr,
    })
}

/// The last [`XL_OUTPUT_KEPT`] bytes of `xl`'s stderr (or stdout), lossily decoded.
fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    let text = if stderr.is_empty() { stdout } else { stderr };
    let start = text.len().saturating_sub(XL_OUTPUT_KEPT);
    String::from_utf8_lossy(text.get(start..).unwrap_or_default())
        .trim()
        .to_owned()
}

impl Provisioner for XenProvisioner {
    type Member = LiveDomain;

    fn create(&self, seq: u64) -> Result<LiveDomain, BoxError> {
        self.build(seq).map_err(|e| Box::new(e) as BoxError)
    }

    fn usable(&self, member: &LiveDomain) -> bool {
        member.alive()
    }

    fn activate(&self, member: &mut LiveDomain) -> Result<(), BoxError> {
        member.register_in_use();
        member.unpause().map_err(|e| Box::new(e) as BoxError)
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
    fn a_hung_xl_is_killed_and_reaped() {
        let stop = AtomicBool::new(false);
        let mut sh = Command::new("sh");
        sh.args(["-c", "echo out; echo err >&2"]);
        let done = output_within(sh, Duration::from_secs(10), &stop).unwrap();
        assert!(done.status.success());
        assert_eq!(
            (&done.stdout[..], &done.stderr[..]),
            (&b"out\n"[..], &b"err\n"[..])
        );
        let started = Instant::now();
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let err = output_within(sleep, Duration::from_millis(100), &stop).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        stop.store(true, Ordering::SeqCst);
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let err = output_within(sleep, Duration::from_secs(30), &stop).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn xl_output_is_bounded() {
        let long = vec![b'x'; 10_000];
        assert_eq!(tail(&long, b"").len(), XL_OUTPUT_KEPT);
        assert_eq!(tail(b"", b" out \n"), "out");
        assert_eq!(tail(b"err\xff", b"out"), "err\u{fffd}");
    }
}
