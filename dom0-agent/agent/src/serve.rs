//! `dom0-agent serve`: the appliance service. Opens the ledger, starts the domain backend,
//! and serves the client API until SIGINT or SIGTERM.
//!
//! Settings come from flags, an optional TOML file (`--config`) and defaults, in that order
//! of precedence: every key is declared once in [`crate::config`] (its type, default, bound,
//! flag and file key), `serve --help` lists them all, and `serve --print-config` prints the
//! configuration in force as a file that reads back to the same settings. Unknown keys,
//! values of the wrong type and values outside their bound stop `serve` before anything is
//! opened, naming the file and line (or the flag), the key and the bound. SIGHUP reloads
//! the policy bundle and the TLS certificates; SIGINT or SIGTERM stop the agent.
//!
//! The SIEM exporter starts right after the ledger opens and replication (if any) starts
//! (so it exports the agent's own start, and on a replication primary keeps to what the
//! standby holds) and stops last, after `agent.stopped` is recorded, letting each collector catch
//! up for a few seconds; its status is the `siem` section of `GET /v1/health`.
//!
//! With `backend = "xen"` the agent loads Xen 4.17's libraries at start-up; on a host
//! without them (or not a Xen dom0) it stops with a message saying what is missing.

/// A line on stderr while serving: a failed write (EPIPE once nobody reads the log) is
/// dropped, where `eprintln!` would panic.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use mayfly_api::{ApiConfig, Server};
use mayfly_domain::DomainBackend;
use mayfly_executor::{Executor, ExecutorConfig};
use mayfly_ledger::{codec::hex, AuditEvent, Ledger, Options, Severity, StoreOptions};
use mayfly_sandbox::{Sandbox, SandboxConfig};
use mayfly_xen_backend::{XenBackend, XenConfig, XenSection};
use nix::sys::signal::{SigSet, Signal};
use slog::{info, Logger};

use crate::config::Config;

/// Arguments of `serve`: the configuration file, and a flag for every key of it.
#[derive(clap::Args, Default)]
#[command(after_long_help = crate::config::file_keys_help())]
pub struct ServeArgs {
    /// TOML configuration file; a flag given on the command line wins over its value, and
    /// its value over the default. Its keys are listed at the end of `serve --help`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the configuration in force (flags over file over defaults) as TOML and exit,
    /// without opening the ledger or starting anything. The output is itself a valid
    /// --config file. Nothing secret is printed: keys and tokens are only named by their
    /// files.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    flags: crate::config::Flags,
}

/// The settings in force, after merging flags, file and defaults.
struct Settings {
    backend: String,
    data_dir: PathBuf,
    listen: SocketAddr,
    pool_size: usize,
    workers: usize,
    max_in_flight: usize,
    max_per_client: usize,
    limits: mayfly_api::Limits,
    proxy_from: Vec<mayfly_api::proxy::ProxyNet>,
    tls: Option<mayfly_api::TlsFiles>,
    tx_timeout: Duration,
    take_timeout: Duration,
    max_write_bytes: u64,
    map_size: usize,
    max_map_size: usize,
    check_state: bool,
    memory_bytes: u64,
    cpu_seconds: u64,
    refusal_interval: Duration,
    /// The clones' cgroup limits; `None`: cgroups off.
    cgroups: Option<mayfly_sandbox::cgroup::CgroupLimits>,
    /// The sandbox template executable, if set; otherwise beside the agent's own.
    zygote: Option<PathBuf>,
    policy: Option<PathBuf>,
    detector_token: PathBuf,
    xen: XenSection,
    console: Option<mayfly_console::ConsoleConfig>,
    siem: mayfly_siem::SiemConfig,
    key: crate::keysource::KeySettings,
    replication: Option<mayfly_replica::ReplicationSection>,
    /// `[update]` (None: off).
    updater: Option<Arc<crate::update::AgentUpdater>>,
    /// `[breakglass]`: the console and the shell.
    breakglass: (Option<PathBuf>, PathBuf),
}

/// The `[console]` section as the console server takes it; `None` without admin keys.
fn console_settings(
    c: &crate::config::Console,
    data_dir: &Path,
) -> anyhow::Result<Option<mayfly_console::ConsoleConfig>> {
    if c.admin_keys.is_empty() {
        return Ok(None);
    }
    let mut keys = std::collections::BTreeMap::new();
    for (i, text) in c.admin_keys.iter().enumerate() {
        let key = mayfly_command::keyfile::parse_public(text)
            .with_context(|| format!("admin key {}", i + 1))?;
        keys.insert(key, format!("admin-{}", i + 1));
    }
    if c.quorum > keys.len() {
        bail!(
            "admin quorum {} is impossible with {} distinct admin key(s); add keys or set --admin-quorum",
            c.quorum,
            keys.len()
        );
    }
    Ok(Some(mayfly_console::ConsoleConfig {
        socket: c
            .socket
            .clone()
            .unwrap_or_else(|| data_dir.join("admin.sock")),
        tcp: c.tcp,
        authorizer: mayfly_command::Authorizer::new(
            keys,
            Duration::from_secs(c.clock_skew_secs),
            Duration::from_secs(c.max_validity_secs),
        ),
        quorum: c.quorum,
        max_connections: 8,
        max_tcp_connections: 8,
        io_timeout: Duration::from_secs(30),
    }))
}

/// The configuration from the flags and the `--config` file.
fn config(args: &ServeArgs) -> anyhow::Result<Config> {
    Ok(Config::load(&args.flags, args.config.as_deref())?)
}

/// The settings of a configuration whose keys have been checked one by one: what is left
/// are the checks across keys.
fn settings(c: &Config) -> anyhow::Result<Settings> {
    let v = &c.service;
    let mib = |m: usize| m.saturating_mul(1 << 20);
    let key = crate::keysource::KeySettings::from_config(&c.key)?;
    let s = Settings {
        backend: v.backend.clone(),
        data_dir: v.data_dir.clone(),
        listen: v.listen,
        pool_size: v.pool_size,
        workers: v.workers,
        max_in_flight: v.max_in_flight,
        max_per_client: v.max_per_client,
        limits: mayfly_api::Limits {
            max_header_bytes: v.max_header_bytes,
            max_headers: v.max_headers,
            header_timeout: Duration::from_millis(v.header_timeout_ms),
            body_timeout: Duration::from_millis(v.body_timeout_ms),
            idle_timeout: Duration::from_millis(v.idle_timeout_ms),
            max_connections: v.max_connections,
            max_body: v.max_body_bytes,
            max_handshakes: v.max_handshakes,
            write_timeout: Duration::from_millis(v.write_timeout_ms),
        },
        tls: tls_settings(&c.tls)?,
        proxy_from: mayfly_api::proxy::ProxyNet::parse_all(&v.proxy_protocol_from)
            .context("proxy_protocol_from")?,
        tx_timeout: Duration::from_millis(v.tx_timeout_ms),
        take_timeout: Duration::from_millis(v.take_timeout_ms),
        max_write_bytes: v.max_write_bytes,
        map_size: mib(v.map_size_mib),
        max_map_size: mib(v.max_map_size_mib),
        check_state: !v.skip_state_check,
        memory_bytes: v.memory_mib.saturating_mul(1 << 20),
        cpu_seconds: v.cpu_seconds,
        refusal_interval: Duration::from_millis(v.refusal_interval_ms),
        cgroups: v.cgroups.then(|| {
            let host = mayfly_sandbox::cgroup::CgroupLimits::host_defaults();
            mayfly_sandbox::cgroup::CgroupLimits {
                cpu_weight: v.clones_cpu_weight,
                cpu_max_percent: v.clones_cpu_max_percent.or(host.cpu_max_percent),
                memory_max: v
                    .clones_memory_mib
                    .map_or(host.memory_max, |m| m.saturating_mul(1 << 20)),
                pids_max: v.clones_pids_max,
                demoted_cpu_max_percent: (v.demoted_cpu_max_percent > 0)
                    .then_some(v.demoted_cpu_max_percent),
            }
        }),
        zygote: v.zygote.clone(),
        policy: v.policy.clone(),
        detector_token: v
            .detector_token
            .clone()
            .unwrap_or_else(|| v.data_dir.join("detector.token")),
        xen: xen_section(&c.xen),
        console: console_settings(&c.console, &v.data_dir)?,
        siem: c.siem.config.clone(),
        key: key.clone(),
        replication: c.replication.config.clone(),
        updater: crate::update::AgentUpdater::from_config(&c.update, &v.data_dir, &key)
            .map(Arc::new),
        breakglass: (c.breakglass.tty.clone(), c.breakglass.shell.clone()),
    };
    if !s.listen.ip().is_loopback() && s.tls.is_none() && !v.insecure_plaintext_listen {
        bail!(
            "refusing to serve plain HTTP on the non-loopback address {}: clients and their \
             transactions would travel unauthenticated and in clear. Give --tls-cert and \
             --tls-key (and --tls-client-ca for client certificates), or, only behind a \
             trusted front end that terminates TLS, --insecure-plaintext-listen",
            s.listen
        );
    }
    if v.max_map_size_mib < v.map_size_mib {
        bail!("max_map_size_mib must be at least map_size_mib");
    }
    if let Some(limits) = &s.cgroups {
        limits.validate().context("clones' cgroup limits")?;
    }
    s.siem.validate().context("in the [siem] section")?;
    Ok(s)
}

/// The `[tls]` section; `None` without certificate.
fn tls_settings(t: &crate::config::Tls) -> anyhow::Result<Option<mayfly_api::TlsFiles>> {
    match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => Ok(Some(mayfly_api::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: t.client_ca.clone(),
        })),
        (None, None) if t.client_ca.is_none() => Ok(None),
        (None, None) => bail!("--tls-client-ca needs --tls-cert and --tls-key"),
        _ => bail!("TLS needs both --tls-cert and --tls-key"),
    }
}

/// The `[xen]` section as the Xen backend takes it (its defaults filled in there).
fn xen_section(x: &crate::config::Xen) -> XenSection {
    XenSection {
        guest: x.guest,
        mayfly_kernel: x.mayfly_kernel.clone(),
        mayfly_memory_mib: x.mayfly_memory_mib,
        kernel: x.kernel.clone(),
        ramdisk: x.ramdisk.clone(),
        cmdline: x.cmdline.clone(),
        memory_mib: x.memory_mib,
        xl: x.xl.clone(),
        ready_timeout_ms: x.ready_timeout_ms,
        build_threads: x.build_threads,
        guest_weight: x.guest_weight,
        guest_cap_percent: x.guest_cap_percent,
    }
}

/// How many `ready_timeout`s `serve` waits for the Xen pool's first guest to announce its
/// handlers (a failed first build is retried after a back-off).
const FIRST_READY_TIMEOUTS: u32 = 3;

/// Starts the Xen backend and waits for its first ready domain: the handlers its guests
/// answer to are the ones that guest announced in its `Ready`.
fn xen(s: &Settings, log: &Logger, ledger: &Ledger) -> anyhow::Result<XenBackend> {
    let config = XenConfig::from_section(
        &s.xen,
        s.data_dir.join("run").join("xen"),
        s.pool_size,
        s.max_in_flight.max(s.pool_size),
    )
    .context("configuring the xen backend")?;
    let wait = config.ready_timeout.saturating_mul(FIRST_READY_TIMEOUTS);
    let backend = XenBackend::start_audited(
        config,
        log.clone(),
        audit_violations(ledger),
        audit_build_failures(ledger, log),
    )
    .context("starting the xen backend")?;
    if backend.wait_handlers(wait).is_none() {
        backend.shutdown();
        bail!(
            "no Xen guest became ready within {wait:?}, so the handlers the guest image \
             answers to are unknown (the agent's log says why its builds failed)"
        );
    }
    Ok(backend)
}

/// Audits a guest the backend refused at its ready point (a `Ready` announcing other
/// handlers than the pool's first guest) as `domain.protocol_violation`, like a guest that
/// breaks the protocol during a transaction.
fn audit_violations(ledger: &Ledger) -> mayfly_domain::ViolationSink {
    let ledger = ledger.clone();
    Arc::new(move |v: mayfly_domain::Violation| {
        let event = AuditEvent::new("domain.protocol_violation", Severity::Alert)
            .field("backend", v.backend)
            .field("domain", v.domain)
            .field("reason", &v.what);
        if let Err(e) = ledger.audit_lazily(vec![event]) {
            eprintln!(
                "dom0-agent: auditing a protocol violation of {} domain {} failed: {e}",
                v.backend, v.domain
            );
        }
    })
}

/// Audits every failed Xen pool build (its domain destroyed) as `domain.build_failed`
/// (Error): a guest that crashed, spun or hung before its Ready, a scheduler parameter Xen
/// refused, a failed build step. Builds back off while they keep failing (pool::BACKOFF),
/// which bounds the records' rate.
fn audit_build_failures(ledger: &Ledger, log: &Logger) -> mayfly_xen_backend::BuildFailureSink {
    let ledger = ledger.clone();
    let log = log.clone();
    Arc::new(move |f: mayfly_xen_backend::BuildFailure| {
        let mut event = AuditEvent::new("domain.build_failed", Severity::Error)
            .field("backend", mayfly_xen_backend::BACKEND)
            .field("name", &f.name)
            .field("stage", f.stage)
            .field("reason", &f.reason);
        if let Some(domid) = f.domid {
            event = event.field("domain", domid);
        }
        slog::warn!(log, "a failed domain build is audited"; "event" => "domain.build_failed",
            "name" => &f.name, "domain" => f.domid, "stage" => f.stage);
        if let Err(e) = ledger.audit_lazily(vec![event]) {
            eprintln!(
                "dom0-agent: auditing the failed build of {} failed: {e}",
                f.name
            );
        }
    })
}

/// The configured backend, with its own sections: the `cgroups` section of
/// `GET /v1/health` for the sandbox, the phase times of `GET /metrics` for Xen.
type BackendParts = (
    Arc<dyn DomainBackend>,
    Option<mayfly_api::HealthSection>,
    Option<mayfly_api::MetricsSection>,
);

/// The configured backend and its sections ([`BackendParts`]).
fn backend(s: &Settings, log: &Logger, ledger: &Ledger) -> anyhow::Result<BackendParts> {
    Ok(match s.backend.as_str() {
        "xen" => {
            let xen = Arc::new(xen(s, log, ledger)?);
            let section = xen_metrics(Arc::clone(&xen));
            (xen, None, Some(section))
        }
        _ => {
            let sandbox = Arc::new(sandbox(s, log, ledger)?);
            print_cgroups(&sandbox);
            let section = cgroups_health(Arc::clone(&sandbox));
            (sandbox, Some(section), None)
        }
    })
}

/// The Xen backend's section of `GET /metrics`: the time each phase of the domains' lives
/// took, summed since start (`mayfly_xen_backend::phases`), and dom0's CPU time as Xen
/// counts it. The difference of two scrapes is a load run's breakdown.
fn xen_metrics(xen: Arc<XenBackend>) -> mayfly_api::MetricsSection {
    mayfly_api::MetricsSection {
        name: "xen",
        render: Arc::new(move |out: &mut String| {
            use std::fmt::Write as _;
            #[allow(clippy::cast_precision_loss)]
            let secs = |us: u64| us as f64 / 1e6;
            mayfly_api::metrics_family(
                out,
                "mayfly_xen_phase_seconds",
                "summary",
                "Time spent in each phase of the Xen domains' lives since start: build, boot (unpause to Ready), wait (take until hand-out), in_use (hand-out to destroy), destroy",
            );
            let phases = xen.phases();
            for t in &phases {
                let phase = t.phase.name();
                let _ = writeln!(
                    out,
                    "mayfly_xen_phase_seconds_sum{{phase=\"{phase}\"}} {}",
                    secs(t.sum_us)
                );
            }
            for t in &phases {
                let phase = t.phase.name();
                let _ = writeln!(
                    out,
                    "mayfly_xen_phase_seconds_count{{phase=\"{phase}\"}} {}",
                    t.count
                );
            }
            let (builds, steps) = xen.build_steps();
            if builds > 0 {
                mayfly_api::metrics_family(
                    out,
                    "mayfly_xen_build_step_seconds",
                    "summary",
                    "Time of each step of the in-process builds (Mayfly guest) since start",
                );
                for (step, us) in steps {
                    let _ = writeln!(
                        out,
                        "mayfly_xen_build_step_seconds_sum{{step=\"{step}\"}} {}",
                        secs(us)
                    );
                }
                let _ = writeln!(out, "mayfly_xen_build_step_seconds_count {builds}");
            }
            if let Some(ns) = xen.dom0_cpu_ns() {
                mayfly_api::metrics_family(
                    out,
                    "mayfly_xen_dom0_cpu_seconds_total",
                    "counter",
                    "CPU time of dom0 (all its vCPUs) since it booted, as Xen counts it",
                );
                #[allow(clippy::cast_precision_loss)]
                let _ = writeln!(out, "mayfly_xen_dom0_cpu_seconds_total {}", ns as f64 / 1e9);
            }
        }),
    }
}

/// The clones' cgroup as `GET /v1/health` shows it: the hierarchy in use (`v2`, `v1`, or
/// `off`), its paths, limits and usage.
fn cgroups_health(sandbox: Arc<Sandbox>) -> mayfly_api::HealthSection {
    mayfly_api::HealthSection {
        name: "cgroups",
        report: Arc::new(move || match sandbox.cgroup_status() {
            None => serde_json::json!({"version": "off"}),
            Some(st) => serde_json::json!({
                "version": st.version.as_str(),
                "paths": st.paths,
                "cpu_weight": st.limits.cpu_weight,
                "cpu_max_percent": st.limits.cpu_max_percent,
                "memory_max": st.limits.memory_max,
                "pids_max": st.limits.pids_max,
                "memory_bytes": st.memory_bytes,
                "pids": st.pids,
                "throttled_periods": st.throttled_periods,
                "demoted_cpu_max_percent": st.limits.demoted_cpu_max_percent,
                "demoted_throttled_periods": st.demoted_throttled_periods,
            }),
        }),
    }
}

fn print_cgroups(sandbox: &Sandbox) {
    match sandbox.cgroup_status() {
        Some(st) => println!(
            "mayfly: sandbox clones in cgroup {} {} (cpu weight {} against the agent's 100, quota {}, memory {} MiB, pids {}, demoted clones' quota {})",
            st.version.as_str(),
            st.paths.first().map(|p| p.display().to_string()).unwrap_or_default(),
            st.limits.cpu_weight,
            st.limits
                .cpu_max_percent
                .map_or_else(|| "none".to_owned(), |p| format!("{p} % of a CPU")),
            st.limits.memory_max >> 20,
            st.limits.pids_max.unwrap_or(0),
            st.limits
                .demoted_cpu_max_percent
                .map_or_else(|| "none".to_owned(), |p| format!("{p} % of a CPU")),
        ),
        None => println!(
            "mayfly: WARNING: sandbox clones run WITHOUT cgroup limits (--no-cgroups): \
             spinning or allocating guests can starve the agent and honest clones"
        ),
    }
}

/// File name of the sandbox template executable, looked for beside `dom0-agent`.
const ZYGOTE_EXE: &str = "mayfly-zygote";

/// The zygote executable: the configured one, or `mayfly-zygote` beside the agent's own.
fn zygote_exe(s: &Settings) -> anyhow::Result<PathBuf> {
    let (path, hint) = match &s.zygote {
        Some(path) => (path.clone(), "as configured (--zygote / zygote =)"),
        None => (
            std::env::current_exe()
                .context("locating the agent's own executable (the zygote is beside it)")?
                .with_file_name(ZYGOTE_EXE),
            "beside dom0-agent; `cargo build --release -p dom0-agent` builds both, and \
             scripts/build-zygote.sh a statically linked one (set it with --zygote)",
        ),
    };
    match std::fs::metadata(&path) {
        Ok(md) if md.is_file() => Ok(path),
        Ok(_) => bail!(
            "the sandbox zygote {} is not a file ({hint})",
            path.display()
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "the sandbox zygote {} is missing ({hint})",
            path.display()
        ))),
    }
}

fn sandbox(s: &Settings, log: &Logger, ledger: &Ledger) -> anyhow::Result<Sandbox> {
    let mut config = SandboxConfig::new(
        zygote_exe(s)?,
        Vec::<std::ffi::OsString>::new(),
        s.data_dir.join("run"),
    );
    config.pool_size = s.pool_size;
    config.max_in_use = s.max_in_flight.max(s.pool_size);
    config.limits.memory_bytes = s.memory_bytes;
    config.limits.cpu_seconds = s.cpu_seconds;
    config.cgroups = s.cgroups;
    Sandbox::start_reporting(config, log.clone(), audit_violations(ledger))
        .context("starting the sandbox backend")
}

/// Reads the detector token, creating it (32 random bytes, hex, mode 0600) if missing.
/// A token file readable by others is refused, like the signing key.
fn detector_token(path: &Path) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(md) => {
            let mode = md.permissions().mode() & 0o777;
            anyhow::ensure!(
                mode & 0o077 == 0,
                "detector token {} has mode {mode:o}; it must be 0600",
                path.display()
            );
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let token = token.trim().to_owned();
            anyhow::ensure!(
                token.len() >= 32,
                "detector token in {} is too short (32+ characters)",
                path.display()
            );
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .context("reading /dev/urandom for the detector token")?;
            let token = hex(&bytes);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{token}")?;
            f.sync_all()?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn block_stop_signals() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    // Blocked before any thread starts, so every thread inherits the mask and the main
    // thread alone takes the signal in `wait`.
    set.thread_block()
        .context("blocking SIGINT/SIGTERM/SIGHUP")?;
    Ok(set)
}

/// Runs the service until SIGINT or SIGTERM; returns the exit code.
pub fn run(args: &ServeArgs, log: &Logger) -> anyhow::Result<u8> {
    let config = config(args)?;
    let s = settings(&config)?;
    if args.print_config {
        print!("{}", config.to_toml()?);
        use std::io::Write as _;
        std::io::stdout()
            .flush()
            .context("writing the configuration")?;
        return Ok(0);
    }
    let signals = block_stop_signals()?;
    let options = Options {
        store: StoreOptions {
            map_size: s.map_size,
            max_map_size: s.max_map_size,
            ..StoreOptions::default()
        },
        check_state: s.check_state,
        keys: s.key.store()?,
        ..Options::default()
    };
    let ledger = match Ledger::open(&s.data_dir, &options, log) {
        Ok(l) => l,
        Err(e @ mayfly_ledger::OpenError::StateMismatch { .. }) => {
            eprintln!("dom0-agent: error: {e}");
            return Ok(crate::exit::STATE_MISMATCH);
        }
        Err(mayfly_ledger::OpenError::Key(e)) if e.is_unavailable() => {
            eprintln!("dom0-agent: error: refusing to sign: {e}");
            return Ok(crate::exit::KEY_UNAVAILABLE);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the ledger in {}", s.data_dir.display()))
        }
    };
    // Replication first: on a primary the exporters send nothing the standby does not hold
    // (docs/siem.md "Replication").
    let replication = crate::replication::start_primary(s.replication.as_ref(), &ledger, log)?;
    let siem = match &replication {
        Some(shipper) => mayfly_siem::Exporter::start_replicated(
            &ledger,
            &s.siem,
            crate::replication::siem_ceiling(shipper, &ledger),
            log,
        ),
        None => mayfly_siem::Exporter::start(&ledger, &s.siem, log),
    }
    .context("starting the SIEM exporter")?;
    s.key.boot_quote(&ledger, log);
    let policy_files = crate::policy::files(s.policy.as_deref())?;
    let bundle = mayfly_policy::Bundle::load(&policy_files).context("loading the policy bundle")?;
    let policy_hash = bundle.hash();
    let (backend, cgroups_section, backend_metrics) = backend(&s, log, &ledger)?;
    // The handlers the guest side announced (the sandbox's template; the Xen pool's first
    // guest, in its ring `Ready`); a policy granting capabilities to one the guest lacks is
    // refused here.
    let names = backend.handlers();
    let missing = bundle.handlers_missing_from(&names);
    if !missing.is_empty() {
        let refused = anyhow::anyhow!(
            "the policy grants capabilities to handlers the {} guest does not have: {} (it has: {})",
            backend.name(),
            missing.join(", "),
            names.join(", ")
        );
        backend.shutdown();
        return Err(refused);
    }
    let executor = Arc::new(Executor::new(
        ledger.clone(),
        backend.clone(),
        names.clone(),
        ExecutorConfig {
            tx_timeout: s.tx_timeout,
            take_timeout: s.take_timeout,
            refusals: mayfly_executor::RefusalConfig {
                interval: s.refusal_interval,
                ..mayfly_executor::RefusalConfig::default()
            },
            max_write_bytes: s.max_write_bytes,
            release_memory: Some(mayfly_sandbox::release_free_heap),
            ..ExecutorConfig::default()
        },
        bundle,
        log,
    ));
    let token_path = s.detector_token.clone();
    let detector_token = detector_token(&token_path)?;
    let api = ApiConfig {
        detector_token: Some(detector_token),
        listen: s.listen,
        workers: s.workers,
        max_in_flight: s.max_in_flight,
        max_per_client: s.max_per_client,
        limits: s.limits.clone(),
        tls: s.tls.clone(),
        proxy_from: s.proxy_from.clone(),
        fence: replication.as_ref().map(crate::replication::fence),
        health_sections: [
            siem_health(siem.status_handle()),
            capacity_health(&ledger),
            crate::keysource::health(&ledger),
        ]
        .into_iter()
        .chain(cgroups_section)
        .chain(replication.as_ref().map(crate::replication::health))
        .collect(),
        metrics_sections: [
            siem_metrics(siem.status_handle(), ledger.clone()),
            ledger_metrics(ledger.clone()),
        ]
        .into_iter()
        .chain(backend_metrics)
        .collect(),
        ..ApiConfig::default()
    };
    let incidents = Arc::new(mayfly_incident::Incidents::new(executor.clone(), log));
    let server = match Server::start(api, executor.clone(), incidents.clone(), log) {
        Ok(server) => server,
        Err(e) => {
            backend.shutdown();
            return Err(e.into());
        }
    };
    let console = match s.console.clone() {
        Some(config) => {
            let services = mayfly_console::Services {
                exporters: (!s.siem.collectors.is_empty()).then(|| {
                    Arc::new(SiemStatus(siem.status_handle()))
                        as Arc<dyn mayfly_console::ExporterStatus>
                }),
                attestor: s.key.attestor(),
                updater: s
                    .updater
                    .clone()
                    .map(|u| u as Arc<dyn mayfly_console::Updater>),
                breakglass: crate::breakglass::ConsoleBreakGlass::new(
                    s.breakglass.0.as_deref(),
                    &s.breakglass.1,
                    executor.ledger(),
                    log,
                )
                .map(|b| Arc::new(b) as Arc<dyn mayfly_console::BreakGlass>),
                replication: replication.as_ref().map(crate::replication::console_status),
                ..mayfly_console::Services::new(
                    &executor,
                    incidents.clone(),
                    config.authorizer.keys().len(),
                    config.quorum,
                )
            };
            match mayfly_console::ConsoleServer::start(config, services, log) {
                Ok(c) => Some(c),
                Err(e) => {
                    server.shutdown(Duration::from_secs(5));
                    backend.shutdown();
                    return Err(anyhow::Error::new(e).context("starting the admin console"));
                }
            }
        }
        None => None,
    };
    let addr = server.local_addr();
    audit_or_defer(
        &ledger,
        AuditEvent::new("agent.started", Severity::Notice)
            .field("backend", backend.name())
            .field("listen", addr)
            .field("pool_size", s.pool_size)
            .field("policy_hash", hex(&policy_hash)),
    )?;
    if let Some(reason) = ledger.capacity().and_then(|c| c.refusing) {
        println!("mayfly: STORAGE FULL: serving reads, health and the console; transactions are refused (503) until space returns: {reason}");
    }
    info!(log, "serving"; "addr" => %addr, "backend" => backend.name());
    print_banner(
        addr,
        server.tls(),
        backend.name(),
        &s.data_dir,
        &ledger,
        &names,
    );
    if server.tls() {
        println!(
            "mayfly: client API over TLS{}",
            if server.mutual_tls() {
                " with client certificates (clients named spki:<sha-256 of their public key>)"
            } else {
                ""
            }
        );
    }
    match &console {
        Some(c) => println!(
            "mayfly: admin console on {}{} ({} admin key(s), quorum {})",
            c.socket_path().display(),
            c.tcp_addr()
                .map(|a| format!(" and tcp {a}"))
                .unwrap_or_default(),
            s.console.as_ref().map_or(0, |c| c.authorizer.keys().len()),
            s.console.as_ref().map_or(0, |c| c.quorum),
        ),
        None => println!("mayfly: admin console off (no --admin-key configured)"),
    }
    println!(
        "mayfly: detector reports (POST /v1/reports) need the bearer token in {}",
        token_path.display()
    );

    // SIGHUP reloads the policy bundle (atomically; a malformed one is refused and the
    // active one stays; both audited) and the TLS files (the same way). SIGINT/SIGTERM stop.
    let signal = loop {
        let signal = signals.wait().context("waiting for signals")?;
        if signal != Signal::SIGHUP {
            break signal;
        }
        let loaded = crate::policy::files(s.policy.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|files| executor.load_policy(&files).map_err(|e| e.to_string()));
        match loaded {
            Ok(hash) => note!("dom0-agent: SIGHUP: policy bundle {} loaded", hex(&hash)),
            Err(e) => {
                note!("dom0-agent: SIGHUP: policy bundle refused, the active one stays: {e}")
            }
        }
        if server.tls() {
            reload_tls(&server, &ledger);
        }
    };
    note!("dom0-agent: {signal:?} received, stopping");
    if let Some(c) = console {
        c.shutdown(Duration::from_secs(10));
    }
    server.shutdown(s.tx_timeout + s.take_timeout + Duration::from_secs(5));
    let left = executor.wait_for_reapers_within(Duration::from_secs(30));
    if left > 0 {
        slog::warn!(log, "domains still being destroyed after 30 s; shutting the backend down anyway";
            "count" => left);
    }
    // The counts of repeated refusals still open go out before the stop is recorded.
    executor.close_refusal_windows();
    drop(executor);
    backend.shutdown();
    audit_or_defer(
        &ledger,
        AuditEvent::new("agent.stopped", Severity::Notice).field("signal", signal.as_str()),
    )?;
    for c in siem.stop() {
        if c.behind > 0 {
            note!(
                "dom0-agent: siem collector {} is {} audit records behind; they go out at the next start",
                c.name, c.behind
            );
        }
    }
    Ok(0)
}

/// Rereads the TLS certificate, key and client CA; on failure the ones in force stay. Both
/// outcomes are said on stderr and audited.
fn reload_tls(server: &Server, ledger: &Ledger) {
    let event = match server.reload_tls() {
        Ok(()) => {
            note!("dom0-agent: SIGHUP: TLS certificate and key reloaded");
            AuditEvent::new("api.tls_reloaded", Severity::Notice)
        }
        Err(e) => {
            note!("dom0-agent: SIGHUP: TLS files refused, the ones in force stay: {e}");
            AuditEvent::new("api.tls_reload_failed", Severity::Warning)
                .field("reason", e.to_string())
        }
    };
    let _ = ledger.audit(vec![event]);
}

/// Records `event` durably, or, when the disk or the map is full, keeps it for the moment
/// storage takes writes again (the agent must start and stop on a full disk).
fn audit_or_defer(ledger: &Ledger, event: AuditEvent) -> anyhow::Result<()> {
    use mayfly_ledger::CommitError;
    match ledger.audit(vec![event.clone()]) {
        Ok(_) => Ok(()),
        Err(CommitError::DiskFull { .. } | CommitError::MapFull { .. }) => {
            eprintln!(
                "dom0-agent: storage full: {} is recorded when space returns",
                event.event
            );
            ledger
                .audit_deferred(vec![event])
                .context("queueing an audit record")
        }
        Err(e) => Err(e).context("recording an audit record"),
    }
}

/// The `capacity` section of `GET /v1/health`: the ledger's space used and left, its
/// growth rate and projected time to full, and whether transactions are refused.
fn capacity_health(ledger: &Ledger) -> mayfly_api::HealthSection {
    let ledger = ledger.clone();
    mayfly_api::HealthSection {
        name: "capacity",
        report: Arc::new(move || {
            ledger.capacity().as_ref().map_or(
                serde_json::Value::Null,
                mayfly_console::status::capacity_json,
            )
        }),
    }
}

/// The SIEM exporter's per-collector delivery state, for the console's `status`.
struct SiemStatus(mayfly_siem::StatusHandle);

impl mayfly_console::ExporterStatus for SiemStatus {
    fn collectors(&self) -> Vec<mayfly_console::CollectorStatus> {
        self.0
            .status()
            .into_iter()
            .map(|c| mayfly_console::CollectorStatus {
                name: c.name,
                transport: c.transport.as_str().to_owned(),
                delivered_seq: c.delivered_seq,
                last_error: c.last_error,
            })
            .collect()
    }
}

/// The SIEM section of `GET /metrics`: per collector, the audit records not yet delivered.
fn siem_metrics(handle: mayfly_siem::StatusHandle, ledger: Ledger) -> mayfly_api::MetricsSection {
    mayfly_api::MetricsSection {
        name: "siem",
        render: Arc::new(move |out: &mut String| {
            let collectors = handle.status();
            if collectors.is_empty() {
                return;
            }
            let tip = ledger.tips().audit.seq;
            per_collector(
                out,
                &collectors,
                (
                    "mayfly_siem_lag_records",
                    "Audit records not yet delivered to the collector",
                ),
                |c| tip.saturating_sub(c.delivered_seq),
            );
            // On a replication primary: whether records go out ahead of the standby.
            if collectors.iter().any(|c| c.replicated_seq.is_some()) {
                per_collector(
                    out,
                    &collectors,
                    (
                        "mayfly_siem_unreplicated",
                        "1 while records go out to the collector before the standby holds them",
                    ),
                    |c| u64::from(c.unreplicated_from.is_some()),
                );
            }
        }),
    }
}

/// One gauge family (name, help) with a sample per collector.
fn per_collector(
    out: &mut String,
    collectors: &[mayfly_siem::CollectorStatus],
    (name, help): (&str, &str),
    value: impl Fn(&mayfly_siem::CollectorStatus) -> u64,
) {
    use std::fmt::Write as _;
    mayfly_api::metrics_family(out, name, "gauge", help);
    for c in collectors {
        let _ = writeln!(
            out,
            "{name}{{collector=\"{}\"}} {}",
            c.name.replace(['\\', '"', '\n'], "_"),
            value(c)
        );
    }
}

/// The ledger's section of `GET /metrics`: the group committer's statistics since the
/// agent opened the ledger (jobs per group, the LMDB commit = fsync time, failed groups).
fn ledger_metrics(ledger: Ledger) -> mayfly_api::MetricsSection {
    mayfly_api::MetricsSection {
        name: "ledger",
        render: Arc::new(move |out: &mut String| {
            use std::fmt::Write as _;
            let stats = ledger.group_stats();
            mayfly_api::metrics_family(
                out,
                "mayfly_ledger_group_jobs",
                "histogram",
                "Jobs (transactions, rollbacks, admin nonces, audit batches) per durable group commit since start",
            );
            let jobs = &stats.jobs;
            for (bound, n) in jobs.bounds.iter().zip(&jobs.cumulative) {
                let _ = writeln!(out, "mayfly_ledger_group_jobs_bucket{{le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "mayfly_ledger_group_jobs_bucket{{le=\"+Inf\"}} {}",
                jobs.count
            );
            let _ = writeln!(out, "mayfly_ledger_group_jobs_sum {}", jobs.sum);
            let _ = writeln!(out, "mayfly_ledger_group_jobs_count {}", jobs.count);

            mayfly_api::metrics_family(
                out,
                "mayfly_ledger_commit_seconds",
                "histogram",
                "Time of each durable group's LMDB commit (page writes and fsyncs) since start",
            );
            #[allow(clippy::cast_precision_loss)]
            let secs = |ns: u64| ns as f64 / 1e9;
            let commit = &stats.commit_ns;
            for (bound, n) in commit.bounds.iter().zip(&commit.cumulative) {
                let _ = writeln!(
                    out,
                    "mayfly_ledger_commit_seconds_bucket{{le=\"{}\"}} {n}",
                    secs(*bound)
                );
            }
            let _ = writeln!(
                out,
                "mayfly_ledger_commit_seconds_bucket{{le=\"+Inf\"}} {}",
                commit.count
            );
            let _ = writeln!(out, "mayfly_ledger_commit_seconds_sum {}", secs(commit.sum));
            let _ = writeln!(out, "mayfly_ledger_commit_seconds_count {}", commit.count);

            mayfly_api::metrics_family(
                out,
                "mayfly_ledger_groups_failed_total",
                "counter",
                "Group commits abandoned for a storage failure (disk or map full, I/O error) since start",
            );
            let _ = writeln!(out, "mayfly_ledger_groups_failed_total {}", stats.failed);
        }),
    }
}

/// The `siem` section of `GET /v1/health`: one object per collector.
fn siem_health(handle: mayfly_siem::StatusHandle) -> mayfly_api::HealthSection {
    mayfly_api::HealthSection {
        name: "siem",
        report: Arc::new(move || {
            serde_json::to_value(handle.status()).unwrap_or(serde_json::Value::Null)
        }),
    }
}

fn print_banner(
    addr: SocketAddr,
    tls: bool,
    backend: &str,
    dir: &Path,
    ledger: &Ledger,
    handlers: &[String],
) {
    let url = format!("{}://{addr}", if tls { "https" } else { "http" });
    let isolation = match backend {
        "xen" => "xen backend: a Xen PV domU per transaction",
        _ => "sandbox backend: process isolation, not a VM",
    };
    println!("mayfly: serving on {url} ({isolation})");
    println!(
        "mayfly: ledger {} (public key {})",
        dir.display(),
        hex(&ledger.public_key())
    );
    println!("mayfly: handlers: {}", handlers.join(", "));
    println!("Try it:");
    println!(
        "  curl -s -X POST {url}/v1/transactions -d '{{\"handler\":\"open_account\",\"payload\":{{\"name\":\"alice\",\"balance\":100}}}}'"
    );
    println!(
        "  curl -s -X POST {url}/v1/transactions -d '{{\"handler\":\"open_account\",\"payload\":{{\"name\":\"bob\",\"balance\":0}}}}'"
    );
    println!(
        "  curl -s -X POST {url}/v1/transactions -d '{{\"handler\":\"transfer\",\"payload\":{{\"from\":\"alice\",\"to\":\"bob\",\"amount\":5}}}}'"
    );
    println!("  curl -s {url}/v1/health");
    println!(
        "Stop with Ctrl-C; then `dom0-agent verify --data-dir {}`.",
        dir.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest a backend refused at its ready point is in the audit trail as a protocol
    /// violation, with the backend, the domain and the reason.
    #[test]
    fn refused_guests_are_audited_as_protocol_violations() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
        let report = audit_violations(&ledger);
        report(mayfly_domain::Violation {
            backend: "xen",
            domain: 7,
            what: "its Ready announces handlers the others lack: [zz]; lacks: []".into(),
        });
        // Lazily audited: joins the next commit within 50 ms. Poll with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let found = loop {
            let records = ledger.store().audit_records(1, 1000).unwrap();
            if let Some(r) = records
                .into_iter()
                .find(|r| r.event.event == "domain.protocol_violation")
            {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "never audited");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(found.event.severity, Severity::Alert);
        let f = &found.event.fields;
        assert_eq!(f["backend"], "xen");
        assert_eq!(f["domain"], "7");
        assert!(f["reason"].contains("[zz]"), "{f:?}");
    }

    /// A failed Xen pool build is in the audit trail as `domain.build_failed` (Error), with
    /// the domain's name and id, the failed step and the reason.
    #[test]
    fn failed_xen_builds_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
        let report = audit_build_failures(&ledger, &log);
        report(mayfly_xen_backend::BuildFailure {
            name: "mayfly-3".into(),
            domid: Some(12),
            stage: "ready_timeout",
            reason: "mayfly-3 (domain 12): no Ready within 2s".into(),
        });
        report(mayfly_xen_backend::BuildFailure {
            name: "mayfly-4".into(),
            domid: None,
            stage: "pv_build",
            reason: "mayfly-4: building the Mayfly PV guest failed".into(),
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let found = loop {
            let records: Vec<_> = ledger
                .store()
                .audit_records(1, 1000)
                .unwrap()
                .into_iter()
                .filter(|r| r.event.event == "domain.build_failed")
                .collect();
            if records.len() == 2 {
                break records;
            }
            assert!(std::time::Instant::now() < deadline, "never audited");
            std::thread::sleep(Duration::from_millis(10));
        };
        let f = &found[0].event.fields;
        assert_eq!(found[0].event.severity, Severity::Error);
        assert_eq!(f["backend"], "xen");
        assert_eq!(f["name"], "mayfly-3");
        assert_eq!(f["domain"], "12");
        assert_eq!(f["stage"], "ready_timeout");
        assert!(f["reason"].contains("no Ready"), "{f:?}");
        let f = &found[1].event.fields;
        assert_eq!(f["stage"], "pv_build");
        assert!(!f.contains_key("domain"), "{f:?}");
    }
}
