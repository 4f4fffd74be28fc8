//! `dom0-agent serve`: the appliance service. Opens the ledger, starts the domain backend,
//! and serves the client API until SIGINT or SIGTERM.
//!
//! Settings come from an optional TOML file (`--config`) and from flags; a flag given on the
//! command line wins. SIGHUP reloads the policy bundle and the TLS certificates; SIGINT or
//! SIGTERM stop the agent. Every key of the file is also a flag. Values above a key's upper
//! bound ([`UPPER_BOUNDS`]: `max_connections` 1,000,000, `max_header_bytes` 1 MiB,
//! `max_headers` 1024, `max_body_bytes` 64 MiB, `max_per_client` and `pool_size` 4096, the
//! `*_timeout_ms` 1 h, `refusal_interval_ms` 1 day, `cpu_seconds` 86,400; `workers` 64,
//! `max_in_flight` 4096) are refused at start with an error naming the key:
//!
//! ```toml
//! backend = "sandbox"        # "sandbox" (process isolation) or "xen" (a PV domU each)
//! data_dir = "/var/lib/mayfly"
//! listen = "127.0.0.1:8450"  # not loopback: needs [tls] (or --insecure-plaintext-listen)
//! insecure_plaintext_listen = false  # plain HTTP on a non-loopback address (trusted front end)
//! pool_size = 8              # ready clones kept ahead of demand
//! workers = 2                # network threads of the client API (transactions run elsewhere)
//! max_in_flight = 64         # transactions at once; more get 503
//! max_per_client = 8         # transactions of one client at once; more get 503
//! max_connections = 2048     # open client connections; more get 503 and are closed
//! max_header_bytes = 16384   # request line + headers; more get 431
//! max_headers = 64           # header fields; more get 431
//! header_timeout_ms = 10000  # a request head (or TLS handshake) must arrive within; else closed
//! body_timeout_ms = 10000    # a request body must arrive within; else 408
//! idle_timeout_ms = 5000     # an idle kept-alive connection is closed after
//! max_body_bytes = 262144    # request body; more get 413
//! tx_timeout_ms = 5000       # Start to Commit/Abort
//! max_write_bytes = 4194304  # bytes one transaction may write (keys + values); past it the
//!                            # transaction ends as `tx.write_limit` (Warning)
//! take_timeout_ms = 2000     # wait for a ready domain; then 503 (Xen under emulation: longer)
//! map_size_mib = 4096        # initial LMDB map size; grown on demand (doubling) up to:
//! max_map_size_mib = 65536   # the largest the ledger may grow to
//! memory_mib = 256           # address-space limit of each domain
//! cpu_seconds = 10           # CPU-time limit of each domain
//! refusal_interval_ms = 10000  # repeated identical refusals: one counted audit record per interval
//! cgroups = true             # sandbox: all clones in one control group (false: none, loudly)
//! clones_cpu_weight = 25     # its CPU weight (the agent's is 100)
//! clones_cpu_max_percent = 180  # its CPU quota, % of one CPU [default: 90 % of the host's CPUs]
//! clones_memory_mib = 4096   # memory of all clones together [default: a quarter of the host's]
//! clones_pids_max = 200      # processes [default: twice the clones that can be alive, + 16]
//! zygote = "/usr/libexec/mayfly/mayfly-zygote"  # the template executable; default: beside dom0-agent
//! policy = "/etc/mayfly/policy" # directory of *.toml; default: the built-in bundle
//!
//! [tls]                      # HTTPS on the client API; files reread on SIGHUP
//! cert = "/etc/mayfly/api.crt"        # PEM chain, leaf first
//! key = "/etc/mayfly/api.key"         # PEM private key
//! client_ca = "/etc/mayfly/clients-ca.pem"  # optional: mutual TLS, clients named by key
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
//! [replication]              # optional: ship every durable group to a standby
//! role = "primary"           # (the whole section is described in docs/failover.md)
//! listen = "0.0.0.0:7400"
//! mode = "sync"              # async | sync
//! [replication.tls]
//! cert = "/etc/mayfly/replication.pem"
//! key = "/etc/mayfly/replication.key"
//! peer_pin = "spki:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//!
//! The SIEM exporter starts right after the ledger opens (so it exports the agent's own
//! start) and stops last, after `agent.stopped` is recorded, letting each collector catch
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
    /// Client API address [default: 127.0.0.1:8450]; port 0 picks a free port. A
    /// non-loopback address needs --tls-cert/--tls-key (or --insecure-plaintext-listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve plain HTTP on a non-loopback --listen address. Only behind a trusted front end
    /// that terminates TLS: clients are then named by the front end's address.
    #[arg(long)]
    insecure_plaintext_listen: bool,
    /// Client API over TLS: the server's PEM certificate chain, leaf first (`[tls] cert`).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Client API over TLS: the server's PEM private key (`[tls] key`).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: PEM CA certificate(s) client certificates must chain to; clients are then
    /// named `spki:<SHA-256 of their certificate's public key>` (`[tls] client_ca`).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Ready domains kept ahead of demand [default: 8; at most 4096].
    #[arg(long)]
    pool_size: Option<usize>,
    /// Network threads of the client API [default: 2]; transactions run on a separate pool
    /// of --max-in-flight threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Transactions running at once; more are refused with 503 [default: 64].
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Transactions of one client (certificate key with mutual TLS, else IP address) running
    /// at once; more are refused with 503 [default: 8; at most 4096].
    #[arg(long)]
    max_per_client: Option<usize>,
    /// Open client connections; a connection beyond is answered 503 and closed [default: 2048; at most
    /// 1000000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Largest request head (request line and headers) in bytes; more get 431 [default: 16384; at
    /// most 1048576].
    #[arg(long)]
    max_header_bytes: Option<usize>,
    /// Most header fields in a request; more get 431 [default: 64; at most 1024].
    #[arg(long)]
    max_headers: Option<usize>,
    /// Time for a request head (and a TLS handshake) to arrive, in ms; then the connection is
    /// closed [default: 10000; at most 3600000].
    #[arg(long)]
    header_timeout_ms: Option<u64>,
    /// Time for a request body to arrive once its head is in, in ms; then 408 [default: 10000;
    /// at most 3600000].
    #[arg(long)]
    body_timeout_ms: Option<u64>,
    /// Idle time after which a kept-alive connection is closed, in ms [default: 5000; at most
    /// 3600000].
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Largest request body in bytes; more get 413 [default: 262144; at most 67108864].
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Per-transaction time limit in ms [default: 5000; at most 3600000].
    #[arg(long)]
    tx_timeout_ms: Option<u64>,
    /// How long a transaction waits for a ready domain before it is refused with 503, in ms
    /// [default: 2000; at most 3600000].
    #[arg(long)]
    take_timeout_ms: Option<u64>,
    /// Most bytes one transaction may write (keys and values of its puts, keys of its
    /// deletes, as they arrive); the write crossing it ends the transaction, audited as
    /// `tx.write_limit` [default: 4194304 = 4 MiB; at most 8 MiB, the checkpoint cap].
    #[arg(long)]
    max_write_bytes: Option<u64>,
    /// Initial LMDB map size in MiB [default: 4096]; the committer doubles it on demand, up
    /// to --max-map-size-mib, without a restart.
    #[arg(long)]
    map_size_mib: Option<usize>,
    /// Largest size the ledger may grow to, in MiB [default: 65536]; past it commits fail
    /// with "ledger map full".
    #[arg(long)]
    max_map_size_mib: Option<usize>,
    /// Do not recompute the live-state digest from the data at start-up (a full scan of the
    /// `data` database) and serve the data even if it was altered. For ledgers too large to
    /// scan at every start; logged as a warning and audited (`ledger.state_check_skipped`).
    /// Without it, altered live data stops the agent with exit code 4.
    #[arg(long)]
    skip_state_check: bool,
    /// Address-space limit of each sandbox domain in MiB [default: 256] (Xen domains: see
    /// --xen-memory-mib).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// CPU-time limit of each sandbox domain in seconds [default: 10; at most 86400].
    #[arg(long)]
    cpu_seconds: Option<u64>,
    /// Repeated identical refusals (same client, same rule or reason) are audited once
    /// when the first comes, then as one counted `refusal.repeated` record per interval of
    /// this many ms [default: 10000; at most 86400000].
    #[arg(long)]
    refusal_interval_ms: Option<u64>,
    /// Sandbox: run clones WITHOUT a control group (no CPU weight or quota, no memory or
    /// pids limit for all clones together). Only for hosts without cgroups: spinning or
    /// allocating guests can then starve the agent. Without it, the agent refuses to start
    /// where the limits cannot be applied.
    #[arg(long)]
    no_cgroups: bool,
    /// Sandbox: CPU weight of all clones together, 1..=10000 (the agent's is 100; v1:
    /// cpu.shares = weight × 4096 / 100, against four agent threads) [default: 25].
    #[arg(long)]
    clones_cpu_weight: Option<u32>,
    /// Sandbox: CPU quota of all clones together, in percent of one CPU (per 10 ms period)
    /// [default: 90 % of the host's online CPUs].
    #[arg(long)]
    clones_cpu_max_percent: Option<u32>,
    /// Sandbox: memory of all clones together (and the zygote), MiB [default: a quarter of
    /// the host's memory].
    #[arg(long)]
    clones_memory_mib: Option<u64>,
    /// Sandbox: processes of the clones' group [default: twice the clones that can be
    /// alive at once, plus 16].
    #[arg(long)]
    clones_pids_max: Option<u64>,
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
struct TlsFileConfig {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    backend: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    insecure_plaintext_listen: Option<bool>,
    pool_size: Option<usize>,
    workers: Option<usize>,
    max_in_flight: Option<usize>,
    max_per_client: Option<usize>,
    max_connections: Option<usize>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_body_bytes: Option<usize>,
    tls: Option<TlsFileConfig>,
    tx_timeout_ms: Option<u64>,
    take_timeout_ms: Option<u64>,
    max_write_bytes: Option<u64>,
    map_size_mib: Option<usize>,
    max_map_size_mib: Option<usize>,
    memory_mib: Option<u64>,
    cpu_seconds: Option<u64>,
    refusal_interval_ms: Option<u64>,
    cgroups: Option<bool>,
    clones_cpu_weight: Option<u32>,
    clones_cpu_max_percent: Option<u32>,
    clones_memory_mib: Option<u64>,
    clones_pids_max: Option<u64>,
    zygote: Option<PathBuf>,
    policy: Option<PathBuf>,
    xen: Option<XenSection>,
    console: Option<ConsoleFileConfig>,
    siem: Option<mayfly_siem::SiemConfig>,
    replication: Option<mayfly_replica::ReplicationSection>,
}

/// The settings in force, after merging file and flags.
struct Settings {
    backend: String,
    data_dir: PathBuf,
    listen: SocketAddr,
    pool_size: usize,
    workers: usize,
    max_in_flight: usize,
    max_per_client: usize,
    limits: mayfly_api::Limits,
    tls: Option<mayfly_api::TlsFiles>,
    tx_timeout: Duration,
    take_timeout: Duration,
    max_write_bytes: u64,
    map_size: usize,
    max_map_size: usize,
    memory_bytes: u64,
    cpu_seconds: u64,
    refusal_interval: Duration,
    /// The clones' cgroup limits; `None`: cgroups off.
    cgroups: Option<mayfly_sandbox::cgroup::CgroupLimits>,
    /// The sandbox template executable, if set; otherwise beside the agent's own.
    zygote: Option<PathBuf>,
    policy: Option<PathBuf>,
    xen: XenSection,
    console: Option<mayfly_console::ConsoleConfig>,
    siem: mayfly_siem::SiemConfig,
    replication: Option<mayfly_replica::ReplicationSection>,
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
        max_tcp_connections: 8,
        io_timeout: Duration::from_secs(30),
    }))
}

/// Upper bounds of the settings (documented in docs/api.md §Limits and the module docs):
/// beyond them a value would overflow a deadline (`Instant` + a huge duration aborts), a
/// semaphore (tokio's `MAX_PERMITS`) or a buffer size, or allocate per request without
/// reason.
const UPPER_BOUNDS: &[(&str, u64)] = &[
    ("max_connections", 1_000_000),
    ("max_header_bytes", 1 << 20),
    ("max_headers", 1024),
    ("max_body_bytes", 64 << 20),
    ("max_per_client", 4096),
    ("header_timeout_ms", 3_600_000),
    ("body_timeout_ms", 3_600_000),
    ("idle_timeout_ms", 3_600_000),
    ("tx_timeout_ms", 3_600_000),
    ("take_timeout_ms", 3_600_000),
    ("refusal_interval_ms", 86_400_000),
    ("cpu_seconds", 86_400),
    ("pool_size", 4096),
];

/// Refuses a setting above its upper bound, naming the key.
fn check_upper_bounds(s: &Settings) -> anyhow::Result<()> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    for &(key, max) in UPPER_BOUNDS {
        let value = match key {
            "max_connections" => n(s.limits.max_connections),
            "max_header_bytes" => n(s.limits.max_header_bytes),
            "max_headers" => n(s.limits.max_headers),
            "max_body_bytes" => n(s.limits.max_body),
            "max_per_client" => n(s.max_per_client),
            "header_timeout_ms" => ms(s.limits.header_timeout),
            "body_timeout_ms" => ms(s.limits.body_timeout),
            "idle_timeout_ms" => ms(s.limits.idle_timeout),
            "tx_timeout_ms" => ms(s.tx_timeout),
            "take_timeout_ms" => ms(s.take_timeout),
            "refusal_interval_ms" => ms(s.refusal_interval),
            "cpu_seconds" => s.cpu_seconds,
            "pool_size" => n(s.pool_size),
            _ => continue,
        };
        if value > max {
            bail!(
                "{key} = {value} is above its limit of {max} (flag --{}, configuration key {key})",
                key.replace('_', "-")
            );
        }
    }
    Ok(())
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
    let tls = tls_settings(args, file.tls)?;
    let d = mayfly_api::Limits::default();
    let ms = |flag: Option<u64>, key: Option<u64>, default: Duration| {
        flag.or(key).map_or(default, Duration::from_millis)
    };
    let limits = mayfly_api::Limits {
        max_header_bytes: args
            .max_header_bytes
            .or(file.max_header_bytes)
            .unwrap_or(d.max_header_bytes),
        max_headers: args
            .max_headers
            .or(file.max_headers)
            .unwrap_or(d.max_headers),
        header_timeout: ms(
            args.header_timeout_ms,
            file.header_timeout_ms,
            d.header_timeout,
        ),
        body_timeout: ms(args.body_timeout_ms, file.body_timeout_ms, d.body_timeout),
        idle_timeout: ms(args.idle_timeout_ms, file.idle_timeout_ms, d.idle_timeout),
        max_connections: args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(d.max_connections),
        max_body: args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(d.max_body),
    };
    let insecure = args.insecure_plaintext_listen || file.insecure_plaintext_listen == Some(true);
    let s = Settings {
        limits,
        tls,
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
        workers: args.workers.or(file.workers).unwrap_or(2),
        max_in_flight: args.max_in_flight.or(file.max_in_flight).unwrap_or(64),
        max_per_client: args.max_per_client.or(file.max_per_client).unwrap_or(8),
        tx_timeout: Duration::from_millis(
            args.tx_timeout_ms.or(file.tx_timeout_ms).unwrap_or(5000),
        ),
        take_timeout: Duration::from_millis(
            args.take_timeout_ms
                .or(file.take_timeout_ms)
                .unwrap_or(2000),
        ),
        max_write_bytes: args
            .max_write_bytes
            .or(file.max_write_bytes)
            .unwrap_or(mayfly_executor::DEFAULT_MAX_WRITE_BYTES),
        map_size: args
            .map_size_mib
            .or(file.map_size_mib)
            .unwrap_or(4096)
            .saturating_mul(1 << 20),
        max_map_size: args
            .max_map_size_mib
            .or(file.max_map_size_mib)
            .unwrap_or(65536)
            .saturating_mul(1 << 20),
        memory_bytes: args
            .memory_mib
            .or(file.memory_mib)
            .unwrap_or(256)
            .saturating_mul(1 << 20),
        cpu_seconds: args.cpu_seconds.or(file.cpu_seconds).unwrap_or(10),
        refusal_interval: Duration::from_millis(
            args.refusal_interval_ms
                .or(file.refusal_interval_ms)
                .unwrap_or(10_000),
        ),
        cgroups: if args.no_cgroups || file.cgroups == Some(false) {
            None
        } else {
            let defaults = mayfly_sandbox::cgroup::CgroupLimits::host_defaults();
            Some(mayfly_sandbox::cgroup::CgroupLimits {
                cpu_weight: args
                    .clones_cpu_weight
                    .or(file.clones_cpu_weight)
                    .unwrap_or(defaults.cpu_weight),
                cpu_max_percent: args
                    .clones_cpu_max_percent
                    .or(file.clones_cpu_max_percent)
                    .or(defaults.cpu_max_percent),
                memory_max: args
                    .clones_memory_mib
                    .or(file.clones_memory_mib)
                    .map_or(defaults.memory_max, |m| m.saturating_mul(1 << 20)),
                pids_max: args.clones_pids_max.or(file.clones_pids_max),
            })
        },
        zygote: args.zygote.clone().or(file.zygote),
        policy: args.policy.clone().or(file.policy),
        xen: xen_section(args, file.xen.unwrap_or_default()),
        siem: file.siem.unwrap_or_default(),
        replication: file.replication,
    };
    match s.backend.as_str() {
        "sandbox" | "xen" => {}
        other => bail!("unknown backend {other:?}; use --backend sandbox or --backend xen"),
    }
    if s.workers == 0 || s.max_in_flight == 0 || s.max_per_client == 0 {
        bail!("workers, max_in_flight and max_per_client must be at least 1");
    }
    if s.workers > 64 || s.max_in_flight > 4096 {
        bail!("workers is limited to 64 and max_in_flight to 4096");
    }
    if !s.listen.ip().is_loopback() && s.tls.is_none() && !insecure {
        bail!(
            "refusing to serve plain HTTP on the non-loopback address {}: clients and their \
             transactions would travel unauthenticated and in clear. Give --tls-cert and \
             --tls-key (and --tls-client-ca for client certificates), or, only behind a \
             trusted front end that terminates TLS, --insecure-plaintext-listen",
            s.listen
        );
    }
    if s.tx_timeout.is_zero() || s.take_timeout.is_zero() {
        bail!("tx_timeout_ms and take_timeout_ms must be at least 1");
    }
    check_upper_bounds(&s)?;
    if s.refusal_interval.is_zero() {
        bail!("refusal_interval_ms must be at least 1");
    }
    let checkpoint_cap =
        u64::try_from(mayfly_ledger::checkpoint::MAX_CHECKPOINT_BYTES).unwrap_or(u64::MAX);
    if s.max_write_bytes == 0 || s.max_write_bytes > checkpoint_cap {
        bail!(
            "max_write_bytes must be 1..={checkpoint_cap} (a larger write set cannot fit in one checkpoint)"
        );
    }
    if s.map_size < (16 << 20) {
        bail!("map_size_mib must be at least 16");
    }
    if s.max_map_size < s.map_size {
        bail!("max_map_size_mib must be at least map_size_mib");
    }
    if let Some(limits) = &s.cgroups {
        limits.validate().context("clones' cgroup limits")?;
    }
    s.siem.validate().context("in the [siem] section")?;
    Ok(s)
}

/// The `[tls]` table with the `--tls-*` flags laid over it; `None` without certificate.
fn tls_settings(
    args: &ServeArgs,
    file: Option<TlsFileConfig>,
) -> anyhow::Result<Option<mayfly_api::TlsFiles>> {
    let file = file.unwrap_or_default();
    let cert = args.tls_cert.clone().or(file.cert);
    let key = args.tls_key.clone().or(file.key);
    let client_ca = args.tls_client_ca.clone().or(file.client_ca);
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(mayfly_api::TlsFiles {
            cert,
            key,
            client_ca,
        })),
        (None, None) if client_ca.is_none() => Ok(None),
        (None, None) => bail!("--tls-client-ca needs --tls-cert and --tls-key"),
        _ => bail!("TLS needs both --tls-cert and --tls-key"),
    }
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

/// The configured backend, and the `cgroups` section of `GET /v1/health` for the sandbox.
fn backend(
    s: &Settings,
    log: &Logger,
) -> anyhow::Result<(Arc<dyn DomainBackend>, Option<mayfly_api::HealthSection>)> {
    Ok(match s.backend.as_str() {
        "xen" => (Arc::new(xen(s, log)?), None),
        _ => {
            let sandbox = Arc::new(sandbox(s, log)?);
            print_cgroups(&sandbox);
            let section = cgroups_health(Arc::clone(&sandbox));
            (sandbox, Some(section))
        }
    })
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
            }),
        }),
    }
}

fn print_cgroups(sandbox: &Sandbox) {
    match sandbox.cgroup_status() {
        Some(st) => println!(
            "mayfly: sandbox clones in cgroup {} {} (cpu weight {} against the agent's 100, quota {}, memory {} MiB, pids {})",
            st.version.as_str(),
            st.paths.first().map(|p| p.display().to_string()).unwrap_or_default(),
            st.limits.cpu_weight,
            st.limits
                .cpu_max_percent
                .map_or_else(|| "none".to_owned(), |p| format!("{p} % of a CPU")),
            st.limits.memory_max >> 20,
            st.limits.pids_max.unwrap_or(0),
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
    config.cgroups = s.cgroups;
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
            max_map_size: s.max_map_size,
            ..StoreOptions::default()
        },
        check_state: !args.skip_state_check,
        ..Options::default()
    };
    let ledger = match Ledger::open(&s.data_dir, &options, log) {
        Ok(l) => l,
        Err(e @ mayfly_ledger::OpenError::StateMismatch { .. }) => {
            eprintln!("dom0-agent: error: {e}");
            return Ok(crate::EXIT_STATE_MISMATCH);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the ledger in {}", s.data_dir.display()))
        }
    };
    let siem = mayfly_siem::Exporter::start(&ledger, &s.siem, log)
        .context("starting the SIEM exporter")?;
    let replication = crate::replication::start_primary(s.replication.as_ref(), &ledger, log)?;
    let policy_files = crate::policy::files(s.policy.as_deref())?;
    let bundle = mayfly_policy::Bundle::load(&policy_files).context("loading the policy bundle")?;
    let policy_hash = bundle.hash();
    let (backend, cgroups_section) = backend(&s, log)?;
    let names = mayfly_zygote::handler_names();
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
        max_per_client: s.max_per_client,
        limits: s.limits.clone(),
        tls: s.tls.clone(),
        health_sections: [siem_health(siem.status_handle()), capacity_health(&ledger)]
            .into_iter()
            .chain(cgroups_section)
            .chain(replication.as_ref().map(crate::replication::health))
            .collect(),
        metrics_sections: vec![
            siem_metrics(siem.status_handle(), ledger.clone()),
            ledger_metrics(ledger.clone()),
        ],
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
                replication: replication.as_ref().map(crate::replication::console_status),
                admin_keys: config.authorizer.keys().len(),
                quorum: config.quorum,
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
            use std::fmt::Write as _;
            let collectors = handle.status();
            if collectors.is_empty() {
                return;
            }
            let tip = ledger.tips().audit.seq;
            mayfly_api::metrics_family(
                out,
                "mayfly_siem_lag_records",
                "gauge",
                "Audit records not yet delivered to the collector",
            );
            for c in &collectors {
                let _ = writeln!(
                    out,
                    "mayfly_siem_lag_records{{collector=\"{}\"}} {}",
                    c.name.replace(['\\', '"', '\n'], "_"),
                    tip.saturating_sub(c.delivered_seq)
                );
            }
        }),
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
