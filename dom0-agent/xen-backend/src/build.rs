//! Building one pool domain ([`XenProvisioner`]'s steps; the drawing is in module
//! `domain`): through `xl` (its config written, `xl create -p -e` run, the domain claimed
//! in a [`BuildGuard`], its ring attached), or in-process for a Mayfly PV guest; then the
//! guest's Ready awaited and the domain paused for the pool. Every error destroys the
//! half-built domain.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_domain::{DomainExit, Ring};
use mayfly_ring::wire::PROTOCOL_VERSION;
use mayfly_ring::{Backend, Envelope, Request, RingError, SharedMem};
use mayfly_xen::{DomId, EventChannel, GrantedPages, PvBuilder, RingContract};
use slog::{debug, warn};

use crate::config::NAME_PREFIX;
use crate::domain::{CreateError, Hyp, LiveDomain, XenProvisioner};
use crate::phases::Phase;
use crate::pool::{BoxError, Provisioner};

/// How often a build waiting for Ready checks whether the backend is stopping.
const STOP_CHECK: Duration = Duration::from_millis(500);
/// Most bytes of `xl`'s output kept in an error.
const XL_OUTPUT_KEPT: usize = 2048;

/// A half-built domain: destroyed on drop unless disarmed (`armed` cleared). Holds the
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

impl XenProvisioner {
    /// Builds domain number `seq` and brings it to Ready, paused for the pool: in-process
    /// for a Mayfly PV guest, else through `xl` (the config written, `xl create` run, the
    /// domain claimed, its ring attached).
    fn build(&self, seq: u64) -> Result<LiveDomain, CreateError> {
        let started = Instant::now();
        let name = format!("{NAME_PREFIX}{seq}");
        if self.hyp.stopping.load(Ordering::SeqCst) {
            return Err(CreateError::Stopping { name });
        }
        if let Some(builder) = &self.hyp.pv {
            return self.build_mayfly(builder, seq, name, started);
        }
        let cfg = self.write_xl_config(&name)?;
        let output = self.run_xl_create(&name, &cfg);
        let guard = self.claim_created(&name, cfg, output)?;
        let live = self.attach_ring(guard)?;
        self.await_ready(live, started)
    }

    /// Writes the domain's xl config file into the run directory; returns its path.
    fn write_xl_config(&self, name: &str) -> Result<PathBuf, CreateError> {
        let config = &self.hyp.config;
        let cfg = config.run_dir.join(format!("{name}.cfg"));
        let text = config
            .xl_config(name)
            .map_err(|source| CreateError::Config {
                name: name.to_owned(),
                source,
            })?;
        fs::write(&cfg, text).map_err(|source| CreateError::Io {
            name: name.to_owned(),
            what: "writing",
            path: cfg.clone(),
            source,
        })?;
        Ok(cfg)
    }

    /// Runs `xl create -p -e` on the config: the domain is created paused. Bounded by the
    /// whole build's budget: a hung `xl` must not hold a refill thread (and the backend's
    /// shutdown, which joins it) for ever. Its failure is only judged once the caller has
    /// looked for a domain of this name, which is ours to destroy whatever xl did.
    fn run_xl_create(&self, name: &str, cfg: &Path) -> Result<Output, CreateError> {
        let config = &self.hyp.config;
        let mut xl = Command::new(&config.xl);
        xl.args(["create", "-p", "-e"]).arg(cfg);
        output_within(xl, config.ready_timeout, &self.hyp.stopping).map_err(|source| {
            CreateError::Io {
                name: name.to_owned(),
                what: "running xl for",
                path: cfg.to_path_buf(),
                source,
            }
        })
    }

    /// Claims the domain `xl` created under `name`: its domid from xenstore and its uuid
    /// from Xen, in an armed [`BuildGuard`] (any later error destroys it), then judges xl's
    /// `output`. No domain of the name: the config file is removed and xl's failure (or
    /// [`CreateError::NotFound`]) returned. A domain whose info cannot be read is destroyed
    /// at once, without the uuid check (found by its name moments ago: ours).
    fn claim_created(
        &self,
        name: &str,
        cfg: PathBuf,
        output: Result<Output, CreateError>,
    ) -> Result<BuildGuard<'_>, CreateError> {
        let hyp = &self.hyp;
        let domid = hyp
            .store
            .domid_of(name)
            .map_err(|source| CreateError::Store {
                name: name.to_owned(),
                source,
            })?;
        let uuid = match domid {
            Some(d) => match hyp.control.info(d) {
                Ok(info) => info.map(|i| i.uuid),
                Err(source) => {
                    if let Err(e) = hyp.control.destroy(d) {
                        warn!(hyp.logger, "destroying a half-built domain failed (the reconciler will at the next start)";
                            "domid" => d, "name" => name, "error" => %e);
                    }
                    let _ = hyp.store.remove_domain(d, None);
                    let _ = fs::remove_file(&cfg);
                    return Err(CreateError::Ctrl {
                        name: name.to_owned(),
                        source,
                    });
                }
            },
            None => None,
        };
        let (Some(domid), Some(uuid)) = (domid, uuid) else {
            let _ = fs::remove_file(&cfg);
            xl_succeeded(name, output?)?;
            return Err(CreateError::NotFound {
                name: name.to_owned(),
            });
        };
        let guard = BuildGuard {
            hyp,
            name: name.to_owned(),
            domid,
            uuid,
            cfg,
            ring: None,
            channel: None,
            armed: true,
        };
        xl_succeeded(name, output?)?;
        Ok(guard)
    }

    /// A ring (zeroed) on fresh pages granted to `domid`, and the grant references the
    /// guest maps them by. Dropping the ring ends the grants: the caller keeps it until the
    /// domain is gone.
    fn granted_ring(&self, name: &str, domid: DomId) -> Result<(Ring, Vec<u32>), CreateError> {
        let hyp = &self.hyp;
        let geometry = hyp.config.geometry;
        let pages = GrantedPages::share(Arc::clone(&hyp.libs), domid, geometry.total_pages())
            .map_err(|source| CreateError::Grant {
                name: name.to_owned(),
                source,
            })?;
        let refs = pages.refs().to_vec();
        let mem: Arc<dyn SharedMem> = Arc::new(pages);
        let ring = Backend::new(mem, geometry).map_err(|source| CreateError::Ring {
            name: name.to_owned(),
            domid,
            source,
        })?;
        Ok((ring, refs))
    }

    /// An event-channel port allocated unbound for `domid` to bind.
    fn unbound_channel(&self, name: &str, domid: DomId) -> Result<EventChannel, CreateError> {
        EventChannel::bind_unbound(Arc::clone(&self.hyp.libs), domid).map_err(|source| {
            CreateError::Evtchn {
                name: name.to_owned(),
                source,
            }
        })
    }

    /// Gives the claimed domain its ring: the ring's pages granted to it, an unbound event
    /// channel for it, and both published in xenstore (the [`RingContract`]). The resources
    /// are then handed from the guard to the returned [`LiveDomain`], which destroys the
    /// domain on every path from here.
    fn attach_ring(&self, mut guard: BuildGuard<'_>) -> Result<LiveDomain, CreateError> {
        let hyp = &self.hyp;
        let name = guard.name.clone();
        let domid = guard.domid;
        let (ring, ring_refs) = self.granted_ring(&name, domid)?;
        guard.ring = Some(ring);
        let channel = self.unbound_channel(&name, domid)?;
        let contract = RingContract {
            ring_refs,
            event_channel: channel.port(),
        };
        guard.channel = Some(channel);
        hyp.store
            .write_contract(domid, &contract)
            .map_err(|source| CreateError::Store {
                name: name.clone(),
                source,
            })?;
        let (Some(ring), Some(channel)) = (guard.ring.take(), guard.channel.take()) else {
            unreachable!("set above");
        };
        guard.armed = false;
        Ok(LiveDomain::booting(
            Arc::clone(hyp),
            name,
            domid,
            guard.uuid,
            guard.cfg.clone(),
            ring,
            channel,
        ))
    }

    /// Sets a freshly built domain's scheduler weight and cap (before it ever runs),
    /// unpauses it, waits for the guest's `Ready` on the ring (within
    /// the build's budget, giving up if the backend stops) and pauses it for the pool.
    fn await_ready(
        &self,
        mut live: LiveDomain,
        started: Instant,
    ) -> Result<LiveDomain, CreateError> {
        let hyp = &self.hyp;
        hyp.phases.record(Phase::Build, started.elapsed());
        let unpaused = Instant::now();
        hyp.control
            .set_credit(hyp.scheduler, live.domid, hyp.config.sched)
            .map_err(|source| CreateError::Sched {
                name: live.name.clone(),
                domid: live.domid,
                source,
            })?;
        hyp.control
            .unpause(live.domid)
            .map_err(|source| CreateError::Ctrl {
                name: live.name.clone(),
                source,
            })?;
        let envelope = self.first_request(&mut live, started)?;
        self.accept_ready(&mut live, envelope)?;
        hyp.control
            .pause(live.domid)
            .map_err(|source| CreateError::Ctrl {
                name: live.name.clone(),
                source,
            })?;
        hyp.phases.record(Phase::Boot, unpaused.elapsed());
        live.keep_log = false;
        debug!(hyp.logger, "domain ready and paused";
            "domid" => live.domid, "name" => &live.name, "millis" => started.elapsed().as_millis());
        Ok(live)
    }

    /// The guest's first request on the ring, waited for until the build's budget (counted
    /// from `started`) runs out. Waited for in slices, so that a backend shutting down does
    /// not wait out a slow boot. A guest that dies first is ended and reported as such.
    fn first_request(
        &self,
        live: &mut LiveDomain,
        started: Instant,
    ) -> Result<Envelope<Request>, CreateError> {
        let hyp = &self.hyp;
        let waited = hyp.config.ready_timeout;
        loop {
            let left = waited.saturating_sub(started.elapsed());
            if hyp.stopping.load(Ordering::SeqCst) {
                return Err(CreateError::Stopping {
                    name: live.name.clone(),
                });
            }
            match live
                .ring
                .recv_request(&live.notifier, Some(left.min(STOP_CHECK)))
            {
                Ok(envelope) => return Ok(envelope),
                Err(RingError::PeerGone) => {
                    let exit = live.end().unwrap_or(DomainExit::Crashed { signal: 0 });
                    return Err(CreateError::Died {
                        name: live.name.clone(),
                        domid: live.domid,
                        exit,
                    });
                }
                Err(RingError::Timeout { .. }) if started.elapsed() < waited => {}
                Err(RingError::Timeout { .. }) => {
                    return Err(CreateError::ReadyTimeout {
                        name: live.name.clone(),
                        domid: live.domid,
                        waited,
                    })
                }
                Err(source) => {
                    return Err(CreateError::Ring {
                        name: live.name.clone(),
                        domid: live.domid,
                        source,
                    })
                }
            }
        }
    }

    /// Accepts the guest's first request if it is a `Ready` of this protocol version whose
    /// handler list the pool admits. The first guest's list is the pool's; a later guest
    /// announcing another is broken or hostile: refused (the caller destroys it) and
    /// reported as a violation.
    fn accept_ready(
        &self,
        live: &mut LiveDomain,
        envelope: Envelope<Request>,
    ) -> Result<(), CreateError> {
        let hyp = &self.hyp;
        let (name, domid) = (live.name.clone(), live.domid);
        match envelope.body {
            Request::Ready {
                protocol_version,
                handlers,
            } if protocol_version == PROTOCOL_VERSION => {
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
                Ok(())
            }
            other => Err(CreateError::NotReady {
                name,
                domid,
                what: format!("{other:?}").chars().take(200).collect(),
            }),
        }
    }

    /// The ring of a Mayfly PV guest being built as `domid`, and its boot module: the
    /// ring's pages granted to the domid, an unbound port for it, and the [`BootInfo`]
    /// (both, and the fresh `entropy`) encoded.
    ///
    /// [`BootInfo`]: mayfly_ring::bootinfo::BootInfo
    fn pv_boot_module(
        &self,
        name: &str,
        domid: DomId,
        entropy: [u8; mayfly_ring::bootinfo::ENTROPY_LEN],
    ) -> Result<(Ring, EventChannel, Vec<u8>), CreateError> {
        let (ring, grant_refs) = self.granted_ring(name, domid)?;
        let channel = self.unbound_channel(name, domid)?;
        let info = mayfly_ring::bootinfo::BootInfo {
            backend_domid: 0,
            event_channel: channel.port(),
            entropy,
            grant_refs,
        };
        let module = info.encode().map_err(|source| CreateError::BootInfo {
            name: name.to_owned(),
            source,
        })?;
        Ok((ring, channel, module))
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
        let mut entropy = [0u8; mayfly_ring::bootinfo::ENTROPY_LEN];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
            .map_err(|source| CreateError::Entropy {
                name: name.clone(),
                source,
            })?;
        let tag = seq.to_be_bytes();
        let mut parts: Option<(Ring, EventChannel)> = None;
        let built = builder
            .build(&hyp.control, tag, |domid| -> Result<Vec<u8>, CreateError> {
                let (ring, channel, module) = self.pv_boot_module(&name, domid, entropy)?;
                parts = Some((ring, channel));
                Ok(module)
            })
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
        let live = LiveDomain::booting(
            Arc::clone(hyp),
            name,
            built.domid,
            mayfly_xen::pvbuild::handle(tag),
            PathBuf::new(),
            ring,
            channel,
        );
        self.await_ready(live, started)
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

/// `Ok` if `xl` exited successfully, else its status and the tail of its output.
fn xl_succeeded(name: &str, output: Output) -> Result<(), CreateError> {
    if output.status.success() {
        return Ok(());
    }
    Err(CreateError::Xl {
        name: name.to_owned(),
        status: output.status,
        output: tail(&output.stderr, &output.stdout),
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

    /// Builds domain `seq`; a failure (but for the backend stopping) is reported to the
    /// backend's [`BuildFailureSink`](crate::domain::BuildFailureSink) once the half-built
    /// domain is gone.
    fn create(&self, seq: u64) -> Result<LiveDomain, BoxError> {
        self.build(seq).map_err(|e| {
            if let Some(failure) = crate::domain::BuildFailure::of(&e) {
                (self.hyp.build_failures)(failure);
            }
            Box::new(e) as BoxError
        })
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
