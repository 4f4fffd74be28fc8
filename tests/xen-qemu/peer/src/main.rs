//! `xen-ring-peer`: dom0's end of one Mayfly ring, for the Xen-in-QEMU suite — the guest
//! transport proved and measured independently of the agent.
//!
//! ```text
//! xen-ring-peer xen --config CFG --name NAME --handler H --payload P [--pool] [--timeout-s S]
//!     xl create -p CFG name=NAME; grant the ring (gntalloc), allocate an unbound event
//!     channel, write data/mayfly/* under the domain's xenstore home, unpause; wait for
//!     Ready; with --pool: pause, then time unpause -> first request (the pool hand-out);
//!     serve the transaction from an in-memory map; wait for the domain to power off
//!     (destroying it if it does not, or if it broke the ring).
//! xen-ring-peer mayfly --kernel PATH --handler H --payload P [--runs N] [--memory-mib M]
//!                      [--bad-boot-info]   (a boot info the guest must refuse: it crashes)
//!                      [--cap-percent C]   (credit cap set before the first unpause; 0: none)
//!     the Mayfly PV guest kernel, built in-process (mayfly-xen's PvBuilder: libxenguest,
//!     no xl, no xenstore) with the ring's grants, port and entropy in its boot info
//!     (docs/formats.md §2.6); unpause; serve the transaction; wait for the guest to shut
//!     itself down; destroy it. N times, each a fresh domain; then count the domains
//!     tagged MAYFLYPV still present (`leftover_mayfly_pv`). `--cap-percent` (also in
//!     `xen` mode) sets the domain's credit cap before it first runs, keeping the weight
//!     Xen gave it, to measure what a cap costs an honest transaction (`tx_ms`: build
//!     start -> the transaction's end); refused under credit2 (its caps crash Xen 4.17).
//! xen-ring-peer clone-cost --kernel PATH --handler - [--runs N] [--memory-mib M]
//!     issue 21 item 3, measured (not a product path): one Mayfly template domain built as
//!     the agent builds one, run to Ready and paused; then N interleaved runs of (a) a fresh
//!     domain built from the image (PvBuilder, the ring's grants and boot info included;
//!     then destroyed) and (b) the copy path's lower bound (mayfly_xen::clonecost: create,
//!     populate, map both domains' pages, copy every page, unmap; destroyed). Prints
//!     `template=ID pages nr_pt_frames pt_pages pt_entries_own pt_entries_foreign` (what a
//!     real clone would also rewrite), the medians (`build_ms_median`,
//!     `build_boot_info_ms_median`, `build_destroy_ms_median`,
//!     `copy_lower_bound_ms_median`, `copy_<step>_ms`), `ratio_copy_over_build`,
//!     `ratio_copy_plus_boot_info_over_build`, the build's step medians
//!     (`build_<step>_ms`), and `domains_before`/`domains_after`
//!     (must be equal: every domain destroyed); and one `pair=I build_us build_create_us
//!     copy_us copy_create_us copy_unmap_us` line per run.
//! xen-ring-peer cpu-share --handler - [--interval-ms MS]
//!     issue 15 item 3: each MAYFLYPV domain's and dom0's share of one CPU over a measured
//!     interval (`cpu_time` from two `xc_domain_getinfolist` calls against the monotonic
//!     clock) and its credit weight and cap as Xen reads them back
//!     (`xc_sched_credit{,2}_domain_get`): `scheduler=NAME interval_ms=MS`, then one
//!     `cpu domid=ID state=running|paused weight=W cap=C cpu_pct=P` line per domain present
//!     at both ends of the interval.
//! xen-ring-peer count-pv --handler -
//!     prints `mayfly_pv_domids=ID ...`: the domains whose handle starts with MAYFLYPV (the
//!     agent's and this tool's Mayfly PV guests), for the suite's leftover and reconciler
//!     checks.
//! xen-ring-peer sandbox --shim PATH --handler H --payload P [--timeout-s S]
//!     the same service over a sealed memfd and eventfds, to a spawned domu-shim process
//!     (the sandbox transport, measured on the same machine).
//! ```
//!
//! It prints `mayfly-peer: key=value ...` lines: `domid`, `ready_ms` (create or spawn ->
//! Ready), `handout_ms` (--pool: unpause -> first request), `unpause_call_us` (the `xc_domain_unpause`
//! process alone), `first_request_ms` (create ->
//! first request), `rtt_us_median` and `round_trips` (consecutive `Get`s: our response
//! sent -> the next request received), `outcome` (`committed RESULT`, `aborted REASON`,
//! `violation ERROR`), `domain_gone` (powered off by itself) or `destroyed`; in mayfly mode
//! also `build_ms` (the in-process build), `step_<step>_us` (its steps, named by
//! `mayfly_xen::pvbuild::BUILD_STEPS`), `domain_kib` (the built domain's pages),
//! `shutdown=REASON` and `run=I`.
//!
//! Exit status: 0 the transaction ended and the domain is gone; 1 anything else.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mayfly_ring::bootinfo::BootInfo;
use mayfly_ring::wire::{ScanEntry, Start};
use mayfly_ring::xen::{EvtchnNotifier, GntallocMem};
use mayfly_ring::{
    Backend, EventFdNotifier, Geometry, MmapMem, Notifier, Request, Response, SharedMem,
};

use mayfly_xen::{DomainNotifier, EventChannel, GrantedPages, PvBuilder};

const XL: &str = "xl";

struct Opts {
    mode: String,
    config: Option<String>,
    name: Option<String>,
    shim: Option<String>,
    handler: String,
    payload: Vec<u8>,
    pool: bool,
    timeout: Duration,
    kernel: Option<String>,
    runs: u32,
    memory_mib: u32,
    bad_boot_info: bool,
    cap_percent: Option<u16>,
    interval: Duration,
}

fn parse() -> Result<Opts> {
    let mut args = std::env::args().skip(1);
    let mode = args
        .next()
        .ok_or_else(|| anyhow!("usage: xen-ring-peer xen|sandbox ..."))?;
    let mut o = Opts {
        mode,
        config: None,
        name: None,
        shim: None,
        handler: String::new(),
        payload: Vec::new(),
        pool: false,
        timeout: Duration::from_secs(120),
        kernel: None,
        runs: 1,
        memory_mib: 4,
        bad_boot_info: false,
        cap_percent: None,
        interval: Duration::from_secs(4),
    };
    while let Some(flag) = args.next() {
        if flag == "--pool" {
            o.pool = true;
            continue;
        }
        if flag == "--bad-boot-info" {
            o.bad_boot_info = true;
            continue;
        }
        let value = args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => o.config = Some(value),
            "--name" => o.name = Some(value),
            "--shim" => o.shim = Some(value),
            "--handler" => o.handler = value,
            "--payload" => o.payload = value.into_bytes(),
            "--timeout-s" => o.timeout = Duration::from_secs(value.parse()?),
            "--kernel" => o.kernel = Some(value),
            "--runs" => o.runs = value.parse()?,
            "--memory-mib" => o.memory_mib = value.parse()?,
            "--cap-percent" => o.cap_percent = Some(value.parse()?),
            "--interval-ms" => o.interval = Duration::from_millis(value.parse()?),
            _ => bail!("unknown argument {flag}"),
        }
    }
    if o.handler.is_empty() {
        bail!("--handler is required");
    }
    Ok(o)
}

fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "mayfly-peer: {line}");
}

fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn main() {
    match parse().and_then(|o| match o.mode.as_str() {
        "xen" => run_xen(&o),
        "sandbox" => run_sandbox(&o),
        "mayfly" => run_mayfly(&o),
        "count-pv" => count_pv(),
        "cpu-share" => cpu_share(&o),
        "clone-cost" => clone_cost(&o),
        m => Err(anyhow!("unknown mode {m}")),
    }) {
        Ok(()) => {}
        Err(e) => {
            say(&format!("error: {e:#}"));
            std::process::exit(1);
        }
    }
}

/// Runs a command to completion within `limit`, returning its stdout.
fn run(cmd: &mut Command, limit: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let status = wait_child(&mut child, limit).with_context(|| what.clone())?;
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        use std::io::Read;
        s.read_to_string(&mut out)?;
    }
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(out)
}

fn wait_child(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn xl(args: &[&str]) -> Result<String> {
    run(Command::new(XL).args(args), Duration::from_secs(60))
}

/// Whether a domain of this name still exists.
fn domain_exists(name: &str) -> bool {
    Command::new(XL)
        .args(["domid", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_xen(o: &Opts) -> Result<()> {
    let config = o
        .config
        .as_deref()
        .ok_or_else(|| anyhow!("--config is required"))?;
    let name = o
        .name
        .as_deref()
        .ok_or_else(|| anyhow!("--name is required"))?;
    let created_at = Instant::now();
    xl(&["create", "-q", "-p", config, &format!("name=\"{name}\"")])?;
    let domid: u16 = xl(&["domid", name])?.trim().parse().context("xl domid")?;
    say(&format!(
        "domid={domid} create_ms={}",
        millis(created_at.elapsed())
    ));
    let result = match o.cap_percent {
        Some(cap) => mayfly_xen::Control::open(mayfly_xen::Libraries::load()?)
            .map_err(anyhow::Error::from)
            .and_then(|control| set_cap(&control, u32::from(domid), cap)),
        None => Ok(()),
    }
    .and_then(|()| serve_xen(o, name, domid, created_at));
    say(&format!("tx_ms={}", millis(created_at.elapsed())));
    // The domain must end on every path: give a well-behaved one time to power off; destroy
    // one that broke the ring (at once), failed, or overstays.
    let violated = matches!(result, Ok(Ended::Violation));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut gone = false;
    for _ in 0..600 {
        if !domain_exists(name) {
            gone = true;
            break;
        }
        if result.is_err() || violated || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if gone {
        say("domain_gone");
    } else {
        xl(&["destroy", name])?;
        say("destroyed");
        if domain_exists(name) {
            bail!("domain {domid} still exists after xl destroy");
        }
        if result.is_ok() && !violated {
            bail!("domain {domid} did not power off after its transaction");
        }
    }
    result.map(drop)
}

/// How the service of one transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Committed or aborted normally.
    Finished,
    /// The guest broke the ring protocol.
    Violation,
}

fn serve_xen(o: &Opts, name: &str, domid: u16, created_at: Instant) -> Result<Ended> {
    let geometry = Geometry::DEFAULT;
    let mem = GntallocMem::share(domid, geometry.total_pages())?;
    let refs: Vec<String> = mem.refs().iter().map(u32::to_string).collect();
    let mut backend = Backend::new_on_fresh_memory(mem, geometry)?;
    let evtchn = EvtchnNotifier::bind_unbound(domid)?;
    let home = format!("/local/domain/{domid}/data/mayfly");
    let pages = geometry.total_pages().to_string();
    let port = evtchn.port().to_string();
    let refs = refs.join(" ");
    let kv = [
        (format!("{home}/ring-version"), "1"),
        (format!("{home}/ring-pages"), pages.as_str()),
        (format!("{home}/ring-refs"), refs.as_str()),
        (format!("{home}/event-channel"), port.as_str()),
    ];
    let mut cmd = Command::new("xenstore-write");
    for (k, v) in &kv {
        cmd.arg(k).arg(v);
    }
    run(&mut cmd, Duration::from_secs(30))?;
    xl(&["unpause", name])?;
    let ready = backend.recv_request(&evtchn, Some(o.timeout))?;
    if !matches!(ready.body, Request::Ready { .. }) {
        bail!("first request was not Ready");
    }
    say(&format!("ready_ms={}", millis(created_at.elapsed())));
    let handout_from = if o.pool {
        // As the agent's pool does: pause at Ready, then hand out with one unpause
        // hypercall through libxenctrl (mayfly-xen), no `xl` process.
        let control = mayfly_xen::Control::open(mayfly_xen::Libraries::load()?)?;
        control.pause(u32::from(domid))?;
        let t = Instant::now();
        control.unpause(u32::from(domid))?;
        say(&format!("unpause_call_us={}", t.elapsed().as_micros()));
        t
    } else {
        created_at
    };
    serve(&mut backend, &evtchn, ready.id, o, handout_from, domid)
}

fn count_pv() -> Result<()> {
    let control = mayfly_xen::Control::open(mayfly_xen::Libraries::load()?)?;
    let ids: Vec<String> = control
        .list()?
        .iter()
        .filter(|d| mayfly_xen::pvbuild::tag_of(&d.uuid).is_some())
        .map(|d| d.domid.to_string())
        .collect();
    say(&format!("mayfly_pv_domids={}", ids.join(" ")));
    Ok(())
}

/// Sets the credit cap of `domid` (not yet run), keeping the weight Xen gave it. Refused
/// under credit2, whose caps crash Xen 4.17 as capped domains are destroyed (SECURITY.md).
fn set_cap(control: &mayfly_xen::Control, domid: u32, cap: u16) -> Result<()> {
    let sched = control.scheduler()?;
    if sched == mayfly_xen::Scheduler::Credit2 && cap != 0 {
        bail!(
            "--cap-percent {cap} under credit2: its caps crash Xen 4.17 (boot with sched=credit)"
        );
    }
    let now = control.credit(sched, domid)?;
    let params = mayfly_xen::CreditParams {
        weight: now.weight,
        cap_percent: cap,
    };
    control.set_credit(sched, domid, params)?;
    let back = control.credit(sched, domid)?;
    if back != params {
        bail!("domain {domid}: set weight/cap {params:?}, Xen reads back {back:?}");
    }
    say(&format!("cap_percent={cap} weight={}", back.weight));
    Ok(())
}

/// Each MAYFLYPV domain's and dom0's share of one CPU over `--interval-ms`, with the
/// weight and cap Xen reads back for it.
fn cpu_share(o: &Opts) -> Result<()> {
    let control = mayfly_xen::Control::open(mayfly_xen::Libraries::load()?)?;
    let sched = control.scheduler()?;
    let sample = || -> Result<BTreeMap<u32, (u64, mayfly_xen::DomainState)>> {
        Ok(control
            .list()?
            .iter()
            .filter(|d| d.domid == 0 || mayfly_xen::pvbuild::tag_of(&d.uuid).is_some())
            .map(|d| (d.domid, (d.cpu_time_ns, d.state)))
            .collect())
    };
    let before = sample()?;
    let from = Instant::now();
    // The measured interval itself (what is measured is the CPU time in it), not a wait
    // for some event.
    std::thread::sleep(o.interval);
    let after = sample()?;
    let wall_ns = from.elapsed().as_nanos().max(1);
    say(&format!(
        "scheduler={} interval_ms={}",
        sched.name(),
        millis(from.elapsed())
    ));
    for (domid, (t1, state)) in &after {
        let Some((t0, _)) = before.get(domid) else {
            continue;
        };
        let used = u128::from(t1.saturating_sub(*t0));
        // Percent of one CPU, to a tenth: used / wall * 100.
        let tenths = used * 1000 / wall_ns;
        let params = match control.credit(sched, *domid) {
            Ok(p) => format!("weight={} cap={}", p.weight, p.cap_percent),
            Err(e) => format!("weight=? cap=? ({e})"),
        };
        let state = match state {
            mayfly_xen::DomainState::Running => "running".to_string(),
            mayfly_xen::DomainState::Paused => "paused".to_string(),
            other => format!("{other:?}").to_lowercase(),
        };
        say(&format!(
            "cpu domid={domid} state={state} {params} cpu_pct={}.{}",
            tenths / 10,
            tenths % 10
        ));
    }
    Ok(())
}

/// The Xen libraries, the control handle and a builder holding `--kernel`.
fn open_builder(
    o: &Opts,
) -> Result<(
    Arc<mayfly_xen::Libraries>,
    Arc<mayfly_xen::Control>,
    PvBuilder,
)> {
    let path = o
        .kernel
        .as_deref()
        .ok_or_else(|| anyhow!("--kernel is required"))?;
    let kernel = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let libs = mayfly_xen::Libraries::load()?;
    let control = Arc::new(mayfly_xen::Control::open(libs.clone())?);
    let builder = PvBuilder::new(libs.clone(), kernel, o.memory_mib)?;
    Ok((libs, control, builder))
}

fn run_mayfly(o: &Opts) -> Result<()> {
    let (libs, control, builder) = open_builder(o)?;
    let mut result = Ok(());
    for run in 0..o.runs {
        say(&format!("run={run}"));
        if let Err(e) = one_mayfly(o, &libs, &control, &builder, run) {
            say(&format!("error: {e:#}"));
            result = Err(e);
        }
    }
    let left = control
        .list()?
        .iter()
        .filter(|d| mayfly_xen::pvbuild::tag_of(&d.uuid).is_some())
        .count();
    say(&format!("leftover_mayfly_pv={left}"));
    result
}

/// What the agent gives a fresh Mayfly domain before it is built: the ring's pages granted
/// to `domid`, an unbound event channel for it, and the boot info naming both with fresh
/// entropy (docs/formats.md §2.6).
fn ring_and_boot_info(
    libs: &Arc<mayfly_xen::Libraries>,
    domid: u32,
    geometry: Geometry,
) -> Result<(GrantedPages, EventChannel, Vec<u8>)> {
    let mut entropy = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut entropy)?;
    let granted = GrantedPages::share(libs.clone(), domid, geometry.total_pages())?;
    let port = EventChannel::bind_unbound(libs.clone(), domid)?;
    let info = BootInfo {
        backend_domid: 0,
        event_channel: port.port(),
        entropy,
        grant_refs: granted.refs().to_vec(),
    };
    let module = info.encode()?;
    Ok((granted, port, module))
}

/// One transaction in one fresh Mayfly PV guest; the domain is destroyed on every path.
fn one_mayfly(
    o: &Opts,
    libs: &Arc<mayfly_xen::Libraries>,
    control: &Arc<mayfly_xen::Control>,
    builder: &PvBuilder,
    run: u32,
) -> Result<()> {
    let geometry = Geometry::DEFAULT;
    let started = Instant::now();
    let mut pages = None;
    let mut channel = None;
    let built = builder.build(
        control,
        run.to_be_bytes().repeat(2).try_into().unwrap_or([0; 8]),
        |domid| -> Result<Vec<u8>> {
            let (granted, port, mut module) = ring_and_boot_info(libs, domid, geometry)?;
            pages = Some(granted);
            channel = Some(port);
            if o.bad_boot_info {
                // The reserved field (bytes 10..12) non-zero: the guest must refuse the
                // block and crash itself during boot.
                if let Some(b) = module.get_mut(11) {
                    *b = 1;
                }
            }
            Ok(module)
        },
    )?;
    let domid = built.domid;
    let build_ms = millis(started.elapsed());
    let kib = control.info(domid)?.map_or(0, |i| i.tot_pages * 4);
    let steps: String = mayfly_xen::pvbuild::BUILD_STEPS
        .iter()
        .zip(built.steps)
        .map(|(name, took)| format!(" step_{name}_us={}", took.as_micros()))
        .collect();
    say(&format!(
        "domid={domid} build_ms={build_ms} domain_kib={kib}{steps}"
    ));
    // The ring and its channel live until the domain is destroyed (below).
    let mut ring = match (pages.take(), channel.take()) {
        (Some(p), Some(c)) => Some((
            Backend::new_on_fresh_memory(p, geometry),
            DomainNotifier::new(c, control.clone()),
        )),
        _ => None,
    };
    let served = (|| -> Result<Ended> {
        let (backend, notifier) = ring.as_mut().ok_or_else(|| anyhow!("no ring"))?;
        let backend = backend.as_mut().map_err(|e| anyhow!("ring: {e}"))?;
        let notifier = &*notifier;
        if let Some(cap) = o.cap_percent {
            set_cap(control, domid, cap)?;
        }
        control.unpause(domid)?;
        let ready = backend.recv_request(notifier, Some(o.timeout))?;
        if !matches!(ready.body, Request::Ready { .. }) {
            bail!("first request was not Ready");
        }
        say(&format!("ready_ms={}", millis(started.elapsed())));
        serve(
            backend,
            notifier,
            ready.id,
            o,
            started,
            u16::try_from(domid)?,
        )
    })();
    // A guest that finished shuts itself down (poweroff); one that broke the ring or failed
    // is destroyed at once; either way the domain is destroyed here, since no toolstack
    // acts on its shutdown.
    let finished = matches!(served, Ok(Ended::Finished));
    say(&format!("tx_ms={}", millis(started.elapsed())));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reason = None;
    if !finished {
        // Already gone or failing: how it stands now (a guest that crashed shows it).
        if let Some(mayfly_xen::DomainState::Shutdown(r)) = control.info(domid)?.map(|i| i.state) {
            reason = Some(r);
        }
    }
    while finished && Instant::now() < deadline {
        match control.info(domid)? {
            Some(info) => {
                if let mayfly_xen::DomainState::Shutdown(r) = info.state {
                    reason = Some(r);
                    break;
                }
            }
            None => break,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    say(&format!(
        "shutdown={}",
        reason.map_or("none".to_string(), |r| format!("{r:?}").to_lowercase())
    ));
    control.destroy(domid)?;
    if control.info(domid)?.is_some_and(|i| i.domid == domid) {
        bail!("domain {domid} still exists after xc_domain_destroy");
    }
    say("destroyed");
    drop(ring); // unshare the pages and close the port only now
    served.map(drop)
}

fn inheritable(fd: impl AsFd) -> Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let dup = fd.as_fd().try_clone_to_owned()?;
    fcntl(&dup, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(dup)
}

fn run_sandbox(o: &Opts) -> Result<()> {
    let shim = o
        .shim
        .as_deref()
        .ok_or_else(|| anyhow!("--shim is required"))?;
    let geometry = Geometry::DEFAULT;
    let mem = MmapMem::memfd(c"mayfly-peer", geometry.total_len())?;
    let ring_fd = inheritable(mem.fd().ok_or_else(|| anyhow!("memfd has no fd"))?)?;
    let mut backend = Backend::new_on_fresh_memory(mem, geometry)?;
    let (agent, guest) = EventFdNotifier::pair()?;
    let signal = inheritable(guest.signal_fd())?;
    let wait = inheritable(guest.wait_fd())?;
    let started = Instant::now();
    let mut child = Command::new(shim)
        .arg("--ring-fd")
        .arg(ring_fd.as_raw_fd().to_string())
        .arg("--ring-len")
        .arg(geometry.total_len().to_string())
        .arg("--signal-fd")
        .arg(signal.as_raw_fd().to_string())
        .arg("--wait-fd")
        .arg(wait.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()?;
    drop((ring_fd, signal, wait, guest));
    let result = (|| {
        let ready = backend.recv_request(&agent, Some(o.timeout))?;
        if !matches!(ready.body, Request::Ready { .. }) {
            bail!("first request was not Ready");
        }
        say(&format!("ready_ms={}", millis(started.elapsed())));
        serve(&mut backend, &agent, ready.id, o, started, 0)
    })();
    if matches!(result, Ok(Ended::Violation)) {
        let _ = child.kill();
    }
    let status = wait_child(&mut child, Duration::from_secs(30))?;
    say(&format!("shim_exit={status}"));
    result.map(drop)
}

/// Answers Ready with Start, then serves requests until Commit/Abort (or a violation).
fn serve<M: SharedMem>(
    backend: &mut Backend<M>,
    notifier: &impl Notifier,
    ready_id: u32,
    o: &Opts,
    handout_from: Instant,
    domid: u16,
) -> Result<Ended> {
    let mut seed = [0u8; 32];
    seed[..2].copy_from_slice(&domid.to_be_bytes());
    let start = Start {
        tx_id: [7; 16],
        handler: o.handler.clone(),
        payload: o.payload.clone(),
        entropy_seed: seed,
    };
    backend.send_response(ready_id, &Response::Start(start), notifier)?;
    let mut data: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut rtts: Vec<Duration> = Vec::new();
    let mut last_get_answered: Option<Instant> = None;
    let mut first = true;
    let deadline = Instant::now() + o.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let request = match backend.recv_request(notifier, Some(left)) {
            Ok(r) => r,
            Err(e) if e.is_protocol_violation() => {
                say(&format!("outcome=violation {e}"));
                return Ok(Ended::Violation);
            }
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        if first {
            first = false;
            say(&format!(
                "{}={}",
                if o.pool {
                    "handout_ms"
                } else {
                    "first_request_ms"
                },
                millis(now.duration_since(handout_from))
            ));
        }
        if let (Some(t), Request::Get { .. }) = (last_get_answered.take(), &request.body) {
            rtts.push(now.duration_since(t));
        }
        let response = match request.body {
            Request::Get { key } => Response::Value(data.get(&key).cloned()),
            Request::Put { key, value } => {
                data.insert(key, value);
                Response::Ok
            }
            Request::Delete { key } => {
                data.remove(&key);
                Response::Ok
            }
            Request::Scan { start, end, limit } => {
                let entries: Vec<ScanEntry> = data
                    .range(start..)
                    .take_while(|(k, _)| end.as_ref().is_none_or(|e| *k < e))
                    .take(usize::try_from(limit).unwrap_or(usize::MAX))
                    .map(|(k, v)| ScanEntry {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect();
                Response::ScanResult {
                    entries,
                    more: false,
                }
            }
            Request::Log { line, .. } => {
                say(&format!("guest_log={line}"));
                Response::Ok
            }
            Request::Commit { result } => {
                backend.send_response(request.id, &Response::Committed, notifier)?;
                report_rtts(&mut rtts);
                say(&format!(
                    "outcome=committed {}",
                    String::from_utf8_lossy(&result)
                ));
                return Ok(Ended::Finished);
            }
            Request::Abort { reason } => {
                backend.send_response(request.id, &Response::Aborted, notifier)?;
                say(&format!("outcome=aborted {reason}"));
                return Ok(Ended::Finished);
            }
            Request::Ready { .. } => {
                say("outcome=violation second Ready");
                return Ok(Ended::Violation);
            }
        };
        let is_value = matches!(response, Response::Value(_));
        backend.send_response(request.id, &response, notifier)?;
        if is_value {
            last_get_answered = Some(Instant::now());
        }
    }
}

fn report_rtts(rtts: &mut [Duration]) {
    if rtts.is_empty() {
        return;
    }
    rtts.sort_unstable();
    let median = rtts[rtts.len() / 2];
    say(&format!(
        "round_trips={} rtt_us_median={:.1} rtt_us_p90={:.1}",
        rtts.len(),
        median.as_secs_f64() * 1e6,
        rtts[rtts.len() * 9 / 10].as_secs_f64() * 1e6
    ));
}

/// The median of `xs` (the upper one of an even count); zero if empty.
fn median(xs: &[Duration]) -> Duration {
    let mut v = xs.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Issue 21 item 3, measured: building a fresh Mayfly domain from the image against the
/// lower bound of copying a paused template (`mayfly_xen::clonecost`), interleaved.
fn clone_cost(o: &Opts) -> Result<()> {
    use mayfly_xen::clonecost::{copy_once, ForeignMemory, Template, COPY_STEPS};
    use mayfly_xen::pvbuild::BUILD_STEPS;
    let (libs, control, builder) = open_builder(o)?;
    let fmem = ForeignMemory::open()?;
    let domains_before = control.list()?.len();
    let geometry = Geometry::DEFAULT;

    // The template: built as the agent builds a domain, run to Ready, paused.
    let mut ring = None;
    let template = builder.build(&control, *b"TEMPLATE", |domid| -> Result<Vec<u8>> {
        let (pages, port, module) = ring_and_boot_info(&libs, domid, geometry)?;
        ring = Some((pages, port));
        Ok(module)
    })?;
    let tdom = template.domid;
    // The template's ring and channel live until it is destroyed (below).
    let mut tring = ring.take().map(|(pages, port)| {
        (
            Backend::new_on_fresh_memory(pages, geometry),
            DomainNotifier::new(port, control.clone()),
        )
    });
    let measured = (|| -> Result<()> {
        let (backend, notifier) = tring.as_mut().ok_or_else(|| anyhow!("no ring"))?;
        let backend = backend.as_mut().map_err(|e| anyhow!("ring: {e}"))?;
        control.unpause(tdom)?;
        let ready = backend.recv_request(&*notifier, Some(o.timeout))?;
        if !matches!(ready.body, Request::Ready { .. }) {
            bail!("the template's first request was not Ready");
        }
        control.pause(tdom)?;
        let t = Template::inspect(&control, &fmem, tdom)?;
        say(&format!(
            "template={tdom} pages={} nr_pt_frames={} pt_pages={} pt_entries_own={} \
             pt_entries_foreign={}",
            t.frames.len(),
            t.nr_pt_frames,
            t.pt_pages,
            t.pt_entries_own,
            t.pt_entries_foreign
        ));
        let mut build = Vec::new();
        let mut build_boot_info = Vec::new();
        let mut build_steps = Vec::new();
        let mut build_destroy = Vec::new();
        let mut copy: Vec<[Duration; COPY_STEPS.len()]> = Vec::new();
        for run in 0..o.runs {
            let tag: [u8; 8] = run.to_be_bytes().repeat(2).try_into().unwrap_or([0; 8]);
            // (a) build from the image, as the agent does (the ring and boot info included).
            let mut held = None;
            let started = Instant::now();
            let built = builder.build(&control, tag, |domid| -> Result<Vec<u8>> {
                let (pages, port, module) = ring_and_boot_info(&libs, domid, geometry)?;
                held = Some((pages, port));
                Ok(module)
            })?;
            build.push(started.elapsed());
            build_boot_info.push(built.steps[1]);
            build_steps.push(built.steps);
            let destroying = Instant::now();
            control.destroy(built.domid)?;
            build_destroy.push(destroying.elapsed());
            drop(held); // unshare and close only once the domain is gone
                        // (b) the copy path's lower bound.
            let copied = copy_once(&builder, &control, &fmem, &t, tag)?;
            // Each pair too, so that a median hiding a bimodal step shows.
            let us = |d: Duration| d.as_micros();
            say(&format!(
                "pair={run} build_us={} build_create_us={} copy_us={} copy_create_us={} \
                 copy_unmap_us={}",
                us(build.last().copied().unwrap_or_default()),
                us(built.steps[0]),
                us(copied[..COPY_STEPS.len() - 1].iter().sum()),
                us(copied[0]),
                us(copied[4])
            ));
            copy.push(copied);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let b = median(&build);
        let bi = median(&build_boot_info);
        let step = |i: usize| median(&copy.iter().map(|s| s[i]).collect::<Vec<_>>());
        // The clone proper: everything but the destroy, per run, then the median.
        let clone: Vec<Duration> = copy
            .iter()
            .map(|s| s[..COPY_STEPS.len() - 1].iter().sum())
            .collect();
        let c = median(&clone);
        let steps: String = COPY_STEPS
            .iter()
            .enumerate()
            .map(|(i, name)| format!(" copy_{name}_ms={:.2}", ms(step(i))))
            .collect();
        say(&format!(
            "runs={} build_ms_median={:.2} build_boot_info_ms_median={:.2} \
             build_destroy_ms_median={:.2} copy_lower_bound_ms_median={:.2}{steps}",
            o.runs,
            ms(b),
            ms(bi),
            ms(median(&build_destroy)),
            ms(c)
        ));
        // The clone also needs its own ring grants and port (the build's boot_info step),
        // so the fair comparison adds them; both ratios are printed.
        let bsteps: String = BUILD_STEPS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let d = median(&build_steps.iter().map(|s| s[i]).collect::<Vec<_>>());
                format!(" build_{name}_ms={:.2}", ms(d))
            })
            .collect();
        say(&format!(
            "ratio_copy_over_build={:.2} ratio_copy_plus_boot_info_over_build={:.2}{bsteps}",
            ms(c) / ms(b).max(1e-9),
            (ms(c) + ms(bi)) / ms(b).max(1e-9),
        ));
        Ok(())
    })();
    let destroyed = control.destroy(tdom);
    drop(tring);
    let domains_after = control.list()?.len();
    say(&format!(
        "domains_before={domains_before} domains_after={domains_after}"
    ));
    measured?;
    destroyed?;
    if domains_after != domains_before {
        bail!("{domains_before} domains before, {domains_after} after");
    }
    Ok(())
}
