//! `dom0-agent serve`: the appliance service. Opens the ledger, starts the domain backend,
//! and serves the client API until SIGINT or SIGTERM.
//!
//! Settings come from an optional TOML file (`--config`) and from flags; a flag given on the
//! command line wins. SIGHUP reloads the policy bundle; SIGINT or SIGTERM stop the agent. Every key of the file is also a flag:
//!
//! ```toml
//! backend = "sandbox"        # "sandbox" (process isolation) or "xen" (a PV domU each)
//! data_dir = "/var/lib/mayfly"
//! listen = "127.0.0.1:8450"
//! pool_size = 8              # ready clones kept ahead of demand
//! workers = 16               # HTTP worker threads
//! max_in_flight = 64         # transactions at once; more get 503
//! tx_timeout_ms = 5000       # Start to Commit/Abort
//! take_timeout_ms = 2000     # wait for a ready domain; then 503 (Xen under emulation: longer)
//! map_size_mib = 4096        # largest ledger size
//! memory_mib = 256           # address-space limit of each domain
//! cpu_seconds = 10           # CPU-time limit of each domain
//! zygote = "/usr/libexec/mayfly/mayfly-zygote"  # the template executable; default: beside dom0-agent
//! policy = "/etc/mayfly/policy" # directory of *.toml; default: the built-in bundle
//!
//! [xen]                      # only with backend = "xen"
//! kernel = "/usr/lib/mayfly/domu/vmlinux"             # the template's uncompressed vmlinux
//! ramdisk = "/usr/lib/mayfly/domu/initramfs.cpio.gz"  # its initramfs (/init = domu-shim)
//! cmdline = "console=hvc0 quiet"
//! memory_mib = 128           # memory of each domain (at least 96)
//! xl = "xl"                  # builds the domains (`xl create -p -e`); nothing else uses it
//! ready_timeout_ms = 60000   # build to the shim's Ready
//! build_threads = 1          # domains built in parallel
//! [console]                  # the signed admin console (docs/console.md); off without keys
//! admin_keys = ["<64 hex digits>", "/etc/mayfly/admins/bob.pub"]
//! quorum = 2                 # distinct admins for rollback, policy.load, key.rotate, quarantine.release
//! socket = "/run/mayfly/admin.sock"  # default DATA_DIR/admin.sock; mode 0600
//! tcp = "127.0.0.1:8451"     # optional, loopback only
//! clock_skew_secs = 60
//! max_validity_secs = 3600
//! [siem]                     # optional: export the audit chain as RFC 5424 syslog
//! pen = 32473                # (the whole section is described in docs/siem.md)
//! [[siem.collector]]
//! name = "soc"
//! transport = "tls"          # udp | tcp | tls
//! address = "siem.example.org:6514"
//! ca = "/etc/mayfly/siem-ca.pem"
//! ```
//!
//! The SIEM exporter starts right after the ledger opens (so it exports the agent's own
//! start) and stops last, after `agent.stopped` is recorded, letting each collector catch
//! up for a few seconds; its status is the `siem` section of `GET /v1/health`.
//!
//! With `backend = "xen"` the agent loads Xen 4.17's libraries at start-up; on a host
//! without them (or not a Xen dom0) it stops with a message saying what is missing.

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
use serde::Deserialize;
use slog::{info, Logger};

/// Arguments of `serve`.
#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Domain backend: "sandbox" (process isolation, the default) or "xen" (a Xen PV domU
    /// per transaction; needs a Xen 4.17 dom0 and the guest of --xen-guest: the Mayfly PV
    /// guest kernel, or the --xen-kernel/--xen-ramdisk Linux template).
    #[arg(long)]
    backend: Option<String>,
    /// Ledger data directory [default: ./mayfly-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client API address [default: 127.0.0.1:8450]; port 0 picks a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Ready domains kept ahead of demand [default: 8].
    #[arg(long)]
    pool_size: Option<usize>,
    /// HTTP worker threads [default: 16].
    #[arg(long)]
    workers: Option<usize>,
    /// Transactions running at once; more are refused with 503 [default: 64].
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Per-transaction time limit in ms [default: 5000].
    #[arg(long)]
    tx_timeout_ms: Option<u64>,
    /// How long a transaction waits for a ready domain before it is refused with 503, in ms
    /// [default: 2000].
    #[arg(long)]
    take_timeout_ms: Option<u64>,
    /// Largest ledger size in MiB [default: 4096].
    #[arg(long)]
    map_size_mib: Option<usize>,
    /// Address-space limit of each sandbox domain in MiB [default: 256] (Xen domains: see
    /// --xen-memory-mib).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// CPU-time limit of each sandbox domain in seconds [default: 10].
    #[arg(long)]
    cpu_seconds: Option<u64>,
    /// Sandbox backend: the template executable every domain is forked from [default:
    /// mayfly-zygote in the directory of the dom0-agent executable].
    #[arg(long)]
    zygote: Option<PathBuf>,
    /// Policy bundle: a directory of *.toml files [default: the shipped bundle,
    /// policies/default, built in].
    #[arg(long)]
    policy: Option<PathBuf>,
    /// File holding the bearer token external detectors present to POST /v1/reports
    /// [default: DATA_DIR/detector.token, created (mode 0600) on first start].
    #[arg(long)]
    detector_token: Option<PathBuf>,
    /// Xen backend: the guest kind, `mayfly` (Mayfly's own PV guest kernel, built
    /// in-process: no xl, no xenstore, 4 MiB) or `linux` (the Linux PV guest, for handlers
    /// that need a Linux userland) (`[xen] guest`) [default: mayfly].
    #[arg(long, value_parser = ["mayfly", "linux"])]
    xen_guest: Option<String>,
    /// Xen backend, guest `mayfly`: the Mayfly PV guest kernel (`[xen] mayfly_kernel`)
    /// [default: /usr/share/mayfly/template/mayfly-pv-guest].
    #[arg(long)]
    xen_mayfly_kernel: Option<PathBuf>,
    /// Xen backend, guest `linux`: the template's kernel, an uncompressed ELF vmlinux
    /// (`[xen] kernel`).
    #[arg(long)]
    xen_kernel: Option<PathBuf>,
    /// Xen backend, guest `linux`: the template's initramfs, whose /init is domu-shim
    /// (`[xen] ramdisk`).
    #[arg(long)]
    xen_ramdisk: Option<PathBuf>,
    /// Xen backend: the domains' kernel command line [default: "console=hvc0 quiet"].
    #[arg(long)]
    xen_cmdline: Option<String>,
    /// Xen backend, guest `linux`: memory of each domain in MiB, at least 96 [default: 128]
    /// (guest `mayfly`: `[xen] mayfly_memory_mib`, 4..=64, default 4).
    #[arg(long)]
    xen_memory_mib: Option<u32>,
    /// Xen backend: the `xl` binary that builds domains (`xl create -p -e`; pause, unpause
    /// and destroy go through libxenctrl) [default: xl, from PATH].
    #[arg(long)]
    xl: Option<PathBuf>,
    /// Authorized admin public key (64 hex digits, or a .pub file from `mayfly admin
    /// keygen`); repeat for each admin. Without any, the admin console is off.
    #[arg(long = "admin-key")]
    admin_keys: Vec<String>,
    /// Distinct admins a destructive console command needs [default: 2].
    #[arg(long)]
    admin_quorum: Option<usize>,
    /// Admin console Unix socket [default: DATA_DIR/admin.sock].
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Also serve the admin console on this loopback TCP address.
    #[arg(long)]
    console_tcp: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsoleFileConfig {
    admin_keys: Option<Vec<String>>,
    quorum: Option<usize>,
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    clock_skew_secs: Option<u64>,
    max_validity_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    backend: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    pool_size: Option<usize>,
    workers: Option<usize>,
    max_in_flight: Option<usize>,
    tx_timeout_ms: Option<u64>,
    take_timeout_ms: Option<u64>,
    map_size_mib: Option<usize>,
    memory_mib: Option<u64>,
    cpu_seconds: Option<u64>,
    zygote: Option<PathBuf>,
    policy: Option<PathBuf>,
    xen: Option<XenSection>,
    console: Option<ConsoleFileConfig>,
    siem: Option<mayfly_siem::SiemConfig>,
}

/// The settings in force, after merging file and flags.
struct Settings {
    backend: String,
    data_dir: PathBuf,
    listen: SocketAddr,
    pool_size: usize,
    workers: usize,
    max_in_flight: usize,
    tx_timeout: Duration,
    take_timeout: Duration,
    map_size: usize,
    memory_bytes: u64,
    cpu_seconds: u64,
    /// The sandbox template executable, if set; otherwise beside the agent's own.
    zygote: Option<PathBuf>,
    policy: Option<PathBuf>,
    xen: XenSection,
    console: Option<mayfly_console::ConsoleConfig>,
    siem: mayfly_siem::SiemConfig,
}

fn console_settings(
    args: &ServeArgs,
    file: Option<ConsoleFileConfig>,
    data_dir: &Path,
) -> anyhow::Result<Option<mayfly_console::ConsoleConfig>> {
    use mayfly_command::authorize::defaults;
    let file = file.unwrap_or_default();
    let listed = if args.admin_keys.is_empty() {
        file.admin_keys.unwrap_or_default()
    } else {
        args.admin_keys.clone()
    };
    if listed.is_empty() {
        return Ok(None);
    }
    let mut keys = std::collections::BTreeMap::new();
    for (i, text) in listed.iter().enumerate() {
        let key = mayfly_command::keyfile::parse_public(text)
            .with_context(|| format!("admin key {}", i + 1))?;
        keys.insert(key, format!("admin-{}", i + 1));
    }
    let skew = Duration::from_secs(
        file.clock_skew_secs
            .unwrap_or(defaults::CLOCK_SKEW.as_secs()),
    );
    let max_validity = Duration::from_secs(
        file.max_validity_secs
            .unwrap_or(defaults::MAX_VALIDITY.as_secs()),
    );
    if max_validity.is_zero() {
        bail!("console max_validity_secs must be at least 1");
    }
    let quorum = args
        .admin_quorum
        .or(file.quorum)
        .unwrap_or(defaults::QUORUM);
    if quorum == 0 || quorum > keys.len() {
        bail!(
            "admin quorum {quorum} is impossible with {} distinct admin key(s); add keys or set --admin-quorum",
            keys.len()
        );
    }
    Ok(Some(mayfly_console::ConsoleConfig {
        socket: args
            .console_socket
            .clone()
            .or(file.socket)
            .unwrap_or_else(|| data_dir.join("admin.sock")),
        tcp: args.console_tcp.or(file.tcp),
        authorizer: mayfly_command::Authorizer::new(keys, skew, max_validity),
        quorum,
        max_connections: 8,
        io_timeout: Duration::from_secs(30),
    }))
}

fn load(args: &ServeArgs) -> anyhow::Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the configuration {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("in the configuration {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(|| "./mayfly-data".into());
    let console = console_settings(args, file.console, &data_dir)?;
    let s = Settings {
        console,
        backend: args
            .backend
            .clone()
            .or(file.backend)
            .unwrap_or_else(|| "sandbox".into()),
        data_dir,
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8450))),
        pool_size: args.pool_size.or(file.pool_size).unwrap_or(8),
        workers: args.workers.or(file.workers).unwrap_or(16),
        max_in_flight: args.max_in_flight.or(file.max_in_flight).unwrap_or(64),
        tx_timeout: Duration::from_millis(
            args.tx_timeout_ms.or(file.tx_timeout_ms).unwrap_or(5000),
        ),
        take_timeout: Duration::from_millis(
            args.take_timeout_ms
                .or(file.take_timeout_ms)
                .unwrap_or(2000),
        ),
        map_size: args
            .map_size_mib
            .or(file.map_size_mib)
            .unwrap_or(4096)
            .saturating_mul(1 << 20),
        memory_bytes: args
            .memory_mib
            .or(file.memory_mib)
            .unwrap_or(256)
            .saturating_mul(1 << 20),
        cpu_seconds: args.cpu_seconds.or(file.cpu_seconds).unwrap_or(10),
        zygote: args.zygote.clone().or(file.zygote),
        policy: args.policy.clone().or(file.policy),
        xen: xen_section(args, file.xen.unwrap_or_default()),
        siem: file.siem.unwrap_or_default(),
    };
    match s.backend.as_str() {
        "sandbox" | "xen" => {}
        other => bail!("unknown backend {other:?}; use --backend sandbox or --backend xen"),
    }
    if s.workers == 0 || s.max_in_flight == 0 {
        bail!("workers and max_in_flight must be at least 1");
    }
    if s.tx_timeout.is_zero() || s.take_timeout.is_zero() {
        bail!("tx_timeout_ms and take_timeout_ms must be at least 1");
    }
    if s.map_size < (16 << 20) {
        bail!("map_size_mib must be at least 16");
    }
    s.siem.validate().context("in the [siem] section")?;
    Ok(s)
}

/// The `[xen]` table with the `--xen-*` flags laid over it.
fn xen_section(args: &ServeArgs, file: XenSection) -> XenSection {
    XenSection {
        // Checked by clap's value parser: "mayfly" or "linux".
        guest: args
            .xen_guest
            .as_deref()
            .and_then(|g| g.parse().ok())
            .or(file.guest),
        mayfly_kernel: args.xen_mayfly_kernel.clone().or(file.mayfly_kernel),
        kernel: args.xen_kernel.clone().or(file.kernel),
        ramdisk: args.xen_ramdisk.clone().or(file.ramdisk),
        cmdline: args.xen_cmdline.clone().or(file.cmdline),
        memory_mib: args.xen_memory_mib.or(file.memory_mib),
        xl: args.xl.clone().or(file.xl),
        ..file
    }
}

fn xen(s: &Settings, log: &Logger) -> anyhow::Result<XenBackend> {
    let config = XenConfig::from_section(
        &s.xen,
        s.data_dir.join("run").join("xen"),
        s.pool_size,
        s.max_in_flight.max(s.pool_size),
    )
    .context("configuring the xen backend")?;
    XenBackend::start(config, log.clone()).context("starting the xen backend")
}

/// The configured backend.
fn backend(s: &Settings, log: &Logger) -> anyhow::Result<Arc<dyn DomainBackend>> {
    Ok(match s.backend.as_str() {
        "xen" => Arc::new(xen(s, log)?),
        _ => Arc::new(sandbox(s, log)?),
    })
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

fn sandbox(s: &Settings, log: &Logger) -> anyhow::Result<Sandbox> {
    let mut config = SandboxConfig::new(
        zygote_exe(s)?,
        Vec::<std::ffi::OsString>::new(),
        s.data_dir.join("run"),
    );
    config.pool_size = s.pool_size;
    config.max_in_use = s.max_in_flight.max(s.pool_size);
    config.limits.memory_bytes = s.memory_bytes;
    config.limits.cpu_seconds = s.cpu_seconds;
    Sandbox::start(config, log.clone()).context("starting the sandbox backend")
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
    let s = load(args)?;
    let signals = block_stop_signals()?;
    let options = Options {
        store: StoreOptions {
            map_size: s.map_size,
            ..StoreOptions::default()
        },
        ..Options::default()
    };
    let ledger = Ledger::open(&s.data_dir, &options, log)
        .with_context(|| format!("opening the ledger in {}", s.data_dir.display()))?;
    let siem = mayfly_siem::Exporter::start(&ledger, &s.siem, log)
        .context("starting the SIEM exporter")?;
    let policy_files = crate::policy::files(s.policy.as_deref())?;
    let bundle = mayfly_policy::Bundle::load(&policy_files).context("loading the policy bundle")?;
    let policy_hash = bundle.hash();
    let backend = backend(&s, log)?;
    let names = mayfly_zygote::handler_names();
    let executor = Arc::new(Executor::new(
        ledger.clone(),
        backend.clone(),
        names.clone(),
        ExecutorConfig {
            tx_timeout: s.tx_timeout,
            take_timeout: s.take_timeout,
            ..ExecutorConfig::default()
        },
        bundle,
        log,
    ));
    let token_path = args
        .detector_token
        .clone()
        .unwrap_or_else(|| s.data_dir.join("detector.token"));
    let detector_token = detector_token(&token_path)?;
    let api = ApiConfig {
        detector_token: Some(detector_token),
        listen: s.listen,
        workers: s.workers,
        max_in_flight: s.max_in_flight,
        health_sections: vec![siem_health(siem.status_handle())],
        ..ApiConfig::default()
    };
    let server = match Server::start(api, executor.clone(), log) {
        Ok(server) => server,
        Err(e) => {
            backend.shutdown();
            return Err(e.into());
        }
    };
    let console = match s.console.clone() {
        Some(config) => {
            let services = mayfly_console::Services {
                executor: executor.clone(),
                exporters: (!s.siem.collectors.is_empty()).then(|| {
                    Arc::new(SiemStatus(siem.status_handle()))
                        as Arc<dyn mayfly_console::ExporterStatus>
                }),
                admin_keys: config.authorizer.keys().len(),
                quorum: config.quorum,
            };
            match mayfly_console::ConsoleServer::start(config, services, log) {
                Ok(c) => Some(c),
                Err(e) => {
                    server.shutdown();
                    backend.shutdown();
                    return Err(anyhow::Error::new(e).context("starting the admin console"));
                }
            }
        }
        None => None,
    };
    let addr = server.local_addr();
    ledger.audit(vec![AuditEvent::new("agent.started", Severity::Notice)
        .field("backend", backend.name())
        .field("listen", addr)
        .field("pool_size", s.pool_size)
        .field("policy_hash", hex(&policy_hash))])?;
    info!(log, "serving"; "addr" => %addr, "backend" => backend.name());
    print_banner(addr, backend.name(), &s.data_dir, &ledger, &names);
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
    // active one stays; both audited). SIGINT/SIGTERM stop.
    let signal = loop {
        let signal = signals.wait().context("waiting for signals")?;
        if signal != Signal::SIGHUP {
            break signal;
        }
        let loaded = crate::policy::files(s.policy.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|files| executor.load_policy(&files).map_err(|e| e.to_string()));
        match loaded {
            Ok(hash) => eprintln!("dom0-agent: SIGHUP: policy bundle {} loaded", hex(&hash)),
            Err(e) => {
                eprintln!("dom0-agent: SIGHUP: policy bundle refused, the active one stays: {e}")
            }
        }
    };
    eprintln!("dom0-agent: {signal:?} received, stopping");
    if let Some(c) = console {
        c.shutdown(Duration::from_secs(10));
    }
    server.shutdown();
    let left = executor.wait_for_reapers_within(Duration::from_secs(30));
    if left > 0 {
        slog::warn!(log, "domains still being destroyed after 30 s; shutting the backend down anyway";
            "count" => left);
    }
    drop(executor);
    backend.shutdown();
    ledger.audit(vec![
        AuditEvent::new("agent.stopped", Severity::Notice).field("signal", signal.as_str())
    ])?;
    for c in siem.stop() {
        if c.behind > 0 {
            eprintln!(
                "dom0-agent: siem collector {} is {} audit records behind; they go out at the next start",
                c.name, c.behind
            );
        }
    }
    Ok(0)
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

/// The `siem` section of `GET /v1/health`: one object per collector.
fn siem_health(handle: mayfly_siem::StatusHandle) -> mayfly_api::HealthSection {
    mayfly_api::HealthSection {
        name: "siem",
        report: Arc::new(move || {
            serde_json::to_value(handle.status()).unwrap_or(serde_json::Value::Null)
        }),
    }
}

fn print_banner(addr: SocketAddr, backend: &str, dir: &Path, ledger: &Ledger, handlers: &[String]) {
    let url = format!("http://{addr}");
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
