//! The sections of `serve`'s configuration: every key, declared once.
//!
//! Per key: `name: Type = default, flag, bound;` under its doc comment, which is also the
//! flag's `--help` (followed by the default, the bound and the file key).

use std::net::SocketAddr;
use std::path::PathBuf;

use mayfly_command::authorize::defaults as console_defaults;
use mayfly_sandbox::cgroup::CgroupLimits;
use mayfly_xen_backend::GuestKind;

use super::{section, Bound, Flag, Value};

/// Milliseconds of a default duration.
fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One hour in ms: the longest of the `*_timeout_ms` (beyond, a deadline would overflow).
const HOUR_MS: u64 = 3_600_000;

section! {
    /// The top-level keys.
    pub struct Service / ServiceFlags, table "", heading "Top-level keys" {
        /// Domain backend: "sandbox" (process isolation) or "xen" (a Xen PV domU per
        /// transaction; needs a Xen 4.17 dom0 and the guest of [xen] guest: the Mayfly PV
        /// guest kernel, or the Linux template of [xen] kernel/ramdisk).
        backend: String = "sandbox".to_owned(), Flag::Value("backend"), Bound::OneOf(&["sandbox", "xen"]);
        /// Ledger data directory.
        data_dir: PathBuf = PathBuf::from("./mayfly-data"), Flag::Value("data-dir"), Bound::Any;
        /// Client API address; port 0 picks a free port. A non-loopback address needs [tls]
        /// cert and key (or insecure_plaintext_listen).
        listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8450)), Flag::Value("listen"), Bound::Any;
        /// Serve plain HTTP on a non-loopback listen address. Only behind a trusted front
        /// end that terminates TLS: clients are then named by the front end's address.
        insecure_plaintext_listen: bool = false, Flag::Set("insecure-plaintext-listen"), Bound::Any;
        /// Ready domains kept ahead of demand.
        pool_size: usize = 8, Flag::Value("pool-size"), Bound::range(0, 4096);
        /// Network threads of the client API; transactions run on a separate pool of
        /// max_in_flight threads.
        workers: usize = 2, Flag::Value("workers"), Bound::range(1, 64);
        /// Transactions running at once; more are refused with 503.
        max_in_flight: usize = 64, Flag::Value("max-in-flight"), Bound::range(1, 4096);
        /// Transactions of one client (certificate key with mutual TLS, else IP address)
        /// running at once; more are refused with 503.
        max_per_client: usize = 8, Flag::Value("max-per-client"), Bound::range(1, 4096);
        /// Open client connections; a connection beyond is answered 503 and closed.
        max_connections: usize = mayfly_api::Limits::default().max_connections, Flag::Value("max-connections"), Bound::range(0, 1_000_000);
        /// TLS handshakes in progress at once; a TLS connection beyond them is closed at
        /// once, without a handshake (counted in /metrics).
        max_handshakes: usize = mayfly_api::Limits::default().max_handshakes, Flag::Value("max-handshakes"), Bound::range(1, 65_536);
        /// Addresses or networks (ADDR or ADDR/PREFIX, at most 256) of TCP load balancers
        /// whose connections start with a PROXY protocol v2 header naming the client; a
        /// connection from them without a valid header is closed. Empty: none read.
        proxy_protocol_from: Vec<String> = Vec::new(), Flag::Many("proxy-protocol-from"), Bound::Any;
        /// Largest request head (request line and headers) in bytes; more get 431.
        max_header_bytes: usize = mayfly_api::Limits::default().max_header_bytes, Flag::Value("max-header-bytes"), Bound::range(0, 1 << 20);
        /// Most header fields in a request; more get 431.
        max_headers: usize = mayfly_api::Limits::default().max_headers, Flag::Value("max-headers"), Bound::range(0, 1024);
        /// Time for a request head (and a TLS handshake) to arrive, in ms; then the
        /// connection is closed.
        header_timeout_ms: u64 = ms(mayfly_api::Limits::default().header_timeout), Flag::Value("header-timeout-ms"), Bound::range(0, HOUR_MS);
        /// Time for a request body to arrive once its head is in, in ms; then 408.
        body_timeout_ms: u64 = ms(mayfly_api::Limits::default().body_timeout), Flag::Value("body-timeout-ms"), Bound::range(0, HOUR_MS);
        /// Idle time after which a kept-alive connection is closed, in ms.
        idle_timeout_ms: u64 = ms(mayfly_api::Limits::default().idle_timeout), Flag::Value("idle-timeout-ms"), Bound::range(0, HOUR_MS);
        /// Longest time a response write may make no progress (a client that does not
        /// read), in ms; then the connection is closed (counted in /metrics).
        write_timeout_ms: u64 = ms(mayfly_api::Limits::default().write_timeout), Flag::Value("write-timeout-ms"), Bound::range(1, HOUR_MS);
        /// Largest request body in bytes; more get 413.
        max_body_bytes: usize = mayfly_api::Limits::default().max_body, Flag::Value("max-body-bytes"), Bound::range(0, 64 << 20);
        /// Per-transaction time limit (Start to Commit or Abort), in ms.
        tx_timeout_ms: u64 = 5000, Flag::Value("tx-timeout-ms"), Bound::range(1, HOUR_MS);
        /// How long a transaction waits for a ready domain before it is refused with 503,
        /// in ms (Xen under emulation: longer).
        take_timeout_ms: u64 = 2000, Flag::Value("take-timeout-ms"), Bound::range(1, HOUR_MS);
        /// Most bytes one transaction may write (keys and values of its puts, keys of its
        /// deletes, as they arrive); the write crossing it ends the transaction, audited as
        /// `tx.write_limit`. At most the checkpoint cap, 8 MiB.
        max_write_bytes: u64 = mayfly_executor::DEFAULT_MAX_WRITE_BYTES, Flag::Value("max-write-bytes"), Bound::range(1, mayfly_ledger::checkpoint::MAX_CHECKPOINT_BYTES as u64);
        /// Initial LMDB map size in MiB; the committer doubles it on demand, up to
        /// max_map_size_mib, without a restart.
        map_size_mib: usize = 4096, Flag::Value("map-size-mib"), Bound::at_least(16);
        /// Largest size the ledger may grow to, in MiB (at least map_size_mib); past it
        /// commits fail with "ledger map full".
        max_map_size_mib: usize = 65536, Flag::Value("max-map-size-mib"), Bound::at_least(16);
        /// Do not recompute the live-state digest from the data at start-up (a full scan of
        /// the `data` database) and serve the data even if it was altered. For ledgers too
        /// large to scan at every start; logged as a warning and audited
        /// (`ledger.state_check_skipped`). Without it, altered live data stops the agent
        /// with exit code 4.
        skip_state_check: bool = false, Flag::Set("skip-state-check"), Bound::Any;
        /// Address-space limit of each sandbox domain in MiB (Xen domains: [xen] memory_mib).
        memory_mib: u64 = 256, Flag::Value("memory-mib"), Bound::Any;
        /// CPU-time limit of each sandbox domain in seconds.
        cpu_seconds: u64 = 10, Flag::Value("cpu-seconds"), Bound::range(0, 86_400);
        /// Repeated identical refusals (same client, same rule or reason) are audited once
        /// when the first comes, then as one counted `refusal.repeated` record per interval
        /// of this many ms.
        refusal_interval_ms: u64 = 10_000, Flag::Value("refusal-interval-ms"), Bound::range(1, 86_400_000);
        /// Sandbox: all clones in one control group (CPU weight and quota, memory and pids
        /// limits). false (flag --no-cgroups) only for hosts without cgroups: spinning or
        /// allocating guests can then starve the agent. With true, the agent refuses to
        /// start where the limits cannot be applied.
        cgroups: bool = true, Flag::Clear("no-cgroups"), Bound::Any;
        /// Sandbox: CPU weight of all clones together (the agent's is 100; v1: cpu.shares =
        /// weight × 4096 / 100, against four agent threads).
        clones_cpu_weight: u32 = CgroupLimits::defaults_for(1, 0).cpu_weight, Flag::Value("clones-cpu-weight"), Bound::range(1, 10_000);
        /// Sandbox: CPU quota of all clones together, in percent of one CPU (per 10 ms
        /// period) [default: 90 % of the host's online CPUs].
        clones_cpu_max_percent: Option<u32> = None, Flag::Value("clones-cpu-max-percent"), Bound::at_least(1);
        /// Sandbox: CPU quota of all demoted clones together (transactions running past
        /// 100 ms are moved once into a child group with this quota and the least weight),
        /// in percent of one CPU per 10 ms period; 0: no such group (nice 19 only).
        demoted_cpu_max_percent: u32 = mayfly_sandbox::cgroup::DEMOTED_CPU_MAX_PERCENT, Flag::Value("demoted-cpu-max-percent"), Bound::range(0, 100_000);
        /// Sandbox: memory of all clones together (and the zygote), MiB [default: a quarter
        /// of the host's memory, at least 256].
        clones_memory_mib: Option<u64> = None, Flag::Value("clones-memory-mib"), Bound::at_least(64);
        /// Sandbox: processes of the clones' group [default: twice the clones that can be
        /// alive at once, plus 16].
        clones_pids_max: Option<u64> = None, Flag::Value("clones-pids-max"), Bound::at_least(2);
        /// Sandbox backend: the template executable every domain is forked from [default:
        /// mayfly-zygote in the directory of the dom0-agent executable].
        zygote: Option<PathBuf> = None, Flag::Value("zygote"), Bound::Any;
        /// Policy bundle: a directory of *.toml files [default: the shipped bundle,
        /// policies/default, built in].
        policy: Option<PathBuf> = None, Flag::Value("policy"), Bound::Any;
        /// File holding the bearer token external detectors present to POST /v1/reports
        /// [default: DATA_DIR/detector.token, created (mode 0600) on first start].
        detector_token: Option<PathBuf> = None, Flag::Value("detector-token"), Bound::Any;
    }
}

section! {
    /// `[tls]`: HTTPS on the client API; the files are reread on SIGHUP.
    pub struct Tls / TlsFlags, table "tls", heading "Client API over TLS ([tls])" {
        /// The server's PEM certificate chain, leaf first.
        cert: Option<PathBuf> = None, Flag::Value("tls-cert"), Bound::Any;
        /// The server's PEM private key.
        key: Option<PathBuf> = None, Flag::Value("tls-key"), Bound::Any;
        /// Mutual TLS: PEM CA certificate(s) client certificates must chain to; clients are
        /// then named `spki:<SHA-256 of their certificate's public key>`.
        client_ca: Option<PathBuf> = None, Flag::Value("tls-client-ca"), Bound::Any;
    }
}

section! {
    /// `[xen]`: the Xen backend (only with backend = "xen"). Its defaults and the checks
    /// that need the files are the backend's (`mayfly_xen_backend::XenConfig`).
    pub struct Xen / XenFlags, table "xen", heading "Xen backend ([xen])" {
        /// The guest kind: `mayfly` (Mayfly's own PV guest kernel, built in-process: no xl,
        /// no xenstore, 4 MiB) or `linux` (the Linux PV guest, for handlers that need a
        /// Linux userland) [default: mayfly].
        guest: Option<GuestKind> = None, Flag::Value("xen-guest"), Bound::Any;
        /// Guest `mayfly`: the Mayfly PV guest kernel [default:
        /// /usr/share/mayfly/template/mayfly-pv-guest].
        mayfly_kernel: Option<PathBuf> = None, Flag::Value("xen-mayfly-kernel"), Bound::Any;
        /// Guest `mayfly`: memory of each domain in MiB, 4..=64 (checked by the backend)
        /// [default: 4].
        mayfly_memory_mib: Option<u32> = None, Flag::Value("xen-mayfly-memory-mib"), Bound::Any;
        /// Guest `linux`: the template's kernel, an uncompressed ELF vmlinux.
        kernel: Option<PathBuf> = None, Flag::Value("xen-kernel"), Bound::Any;
        /// Guest `linux`: the template's initramfs, whose /init is domu-shim.
        ramdisk: Option<PathBuf> = None, Flag::Value("xen-ramdisk"), Bound::Any;
        /// The domains' kernel command line [default: "console=hvc0 quiet"].
        cmdline: Option<String> = None, Flag::Value("xen-cmdline"), Bound::Any;
        /// Guest `linux`: memory of each domain in MiB, at least 96 (checked by the
        /// backend) [default: 128].
        memory_mib: Option<u32> = None, Flag::Value("xen-memory-mib"), Bound::Any;
        /// Guest `linux`: the `xl` binary that builds domains (`xl create -p -e`; pause,
        /// unpause and destroy go through libxenctrl) [default: xl, from PATH].
        xl: Option<PathBuf> = None, Flag::Value("xl"), Bound::Any;
        /// Longest a domain build may take until the guest's Ready, in ms [default: 60000].
        ready_timeout_ms: Option<u64> = None, Flag::Value("xen-ready-timeout-ms"), Bound::range(1, HOUR_MS);
        /// Domains built in parallel [default: 1].
        build_threads: Option<usize> = None, Flag::Value("xen-build-threads"), Bound::range(1, 64);
        /// Credit-scheduler weight of each guest domain, set before it first runs; must be
        /// below dom0's (checked at start) so the agent wins a contended CPU
        /// [default: 128, Xen's default being 256].
        guest_weight: Option<u32> = None, Flag::Value("xen-guest-weight"), Bound::range(1, 65_535);
        /// CPU cap of each guest domain in % of one CPU (a guest has one vCPU), 0 for none:
        /// a spinning guest uses at most this much CPU, even on an idle host. Needs Xen's
        /// credit scheduler (sched=credit, as the appliance boots): the agent refuses to
        /// start with a cap under credit2, whose caps crash Xen 4.17 as capped domains are
        /// destroyed; set 0 there [default: 50].
        guest_cap_percent: Option<u32> = None, Flag::Value("xen-guest-cap-percent"), Bound::range(0, 100);
    }
}

section! {
    /// `[console]`: the signed admin console (docs/console.md); off without admin keys.
    pub struct Console / ConsoleFlags, table "console", heading "Admin console ([console])" {
        /// Authorized admin public keys: 64 hex digits, or a .pub file from `mayfly admin
        /// keygen`; the flag is repeated for each admin, and replaces the file's list.
        /// Without any, the admin console is off.
        admin_keys: Vec<String> = Vec::new(), Flag::Many("admin-key"), Bound::Any;
        /// Distinct admins a destructive console command needs (rollback, policy.load,
        /// key.rotate, quarantine.release); at most the number of admin keys.
        quorum: usize = console_defaults::QUORUM, Flag::Value("admin-quorum"), Bound::at_least(1);
        /// Admin console Unix socket (mode 0600) [default: DATA_DIR/admin.sock].
        socket: Option<PathBuf> = None, Flag::Value("console-socket"), Bound::Any;
        /// Also serve the admin console on this loopback TCP address.
        tcp: Option<SocketAddr> = None, Flag::Value("console-tcp"), Bound::Any;
        /// Clock difference tolerated between an admin's machine and the appliance, in
        /// seconds.
        clock_skew_secs: u64 = console_defaults::CLOCK_SKEW.as_secs(), Flag::Value("console-clock-skew-secs"), Bound::range(0, console_defaults::MAX_CLOCK_SKEW.as_secs());
        /// Longest window between a command's issue and expiry, in seconds.
        max_validity_secs: u64 = console_defaults::MAX_VALIDITY.as_secs(), Flag::Value("console-max-validity-secs"), Bound::range(1, console_defaults::MAX_MAX_VALIDITY.as_secs());
    }
}

section! {
    /// `[key]`: where the ledger's signing key is kept (`keysource.rs`; docs/design.md, "The
    /// signing key sealed to the TPM").
    pub struct SigningKey / SigningKeyFlags, table "key", heading "Signing key ([key])" {
        /// Where the ledger's signing key is kept: "file" (DATA_DIR/signing.key) or "tpm"
        /// (sealed to the TPM's PCRs, unsealed into memory only; a boot chain or TPM that
        /// cannot unseal it stops `serve` with exit code 5).
        source: String = "file".to_owned(), Flag::Value("key-source"), Bound::OneOf(&["file", "tpm"]);
        /// With source "tpm": the TPM's TCTI [default: device:/dev/tpmrm0], e.g.
        /// swtpm:host=127.0.0.1,port=2321.
        tcti: Option<String> = None, Flag::Value("tpm-tcti"), Bound::Any;
        /// With source "tpm": the SHA-256 PCRs the key is sealed to and quotes cover, e.g.
        /// `--tpm-pcrs 7,8,9` [default: 7, 8, 9].
        pcrs: Option<Vec<u8>> = None, Flag::Value("tpm-pcrs"), Bound::Any;
    }
}

section! {
    /// `[update]`: the signed A/B update installed by `update.install` on the admin console
    /// (`update.rs`; docs/console.md, "Updates"). Off by default; the appliance image turns it
    /// on. Every path has the appliance's default.
    pub struct Update / UpdateFlags, table "update", heading "A/B update ([update])" {
        /// Serve `update.install` and `update.status` on the admin console.
        enabled: bool = false, Flag::Set("update"), Bound::Any;
        /// The update medium: a directory holding the bundles [default: the partition
        /// labelled MAYFLY-MEDIA, mounted read-only on /run/mayfly-media for each install].
        medium: Option<PathBuf> = None, Flag::Value("update-medium"), Bound::Any;
        /// The EFI system partition (grubenv, xen-<slot>, vmlinux-<slot>) [default: the
        /// partition labelled MAYFLY-ESP, mounted on /run/mayfly-esp for each operation].
        esp: Option<PathBuf> = None, Flag::Value("update-esp"), Bound::Any;
        /// Slot a's root block device [default: found by its GPT partition GUID under
        /// /sys/class/block].
        slot_a_device: Option<PathBuf> = None, Flag::Value("update-slot-a-device"), Bound::Any;
        /// Slot b's root block device [default: found by its GPT partition GUID].
        slot_b_device: Option<PathBuf> = None, Flag::Value("update-slot-b-device"), Bound::Any;
        /// The vendor's update public key (64 hex digits), pinned in the image.
        key: PathBuf = PathBuf::from("/etc/mayfly/update-key.pub"), Flag::Value("update-key"), Bound::Any;
        /// The running image's description (its image_version= line).
        image_info: PathBuf = PathBuf::from("/etc/mayfly/image-info"), Flag::Value("update-image-info"), Bound::Any;
        /// The kernel command line (its root=PARTUUID= names the booted slot).
        cmdline_file: PathBuf = PathBuf::from("/proc/cmdline"), Flag::Value("update-cmdline-file"), Bound::Any;
        /// The version floor and events.log, on the data partition.
        state_dir: PathBuf = PathBuf::from("/var/lib/mayfly/update"), Flag::Value("update-state-dir"), Bound::Any;
        /// Largest bundle file in MiB; a larger one is refused before it is read (the parts'
        /// own limits add up to 832 MiB).
        max_bundle_mib: u64 = 1024, Flag::Value("update-max-bundle-mib"), Bound::range(1, 4096);
    }
}

section! {
    /// `[breakglass]`: the console's only login, opened by the signed `breakglass.open`
    /// (`breakglass.rs`; docs/console.md, "Break-glass"). Off without a tty.
    pub struct BreakGlass / BreakGlassFlags, table "breakglass", heading "Break-glass console ([breakglass])" {
        /// The console the break-glass login is offered on, e.g. /dev/hvc0 (nothing reads it
        /// unless an admin quorum opened a window) [default: none, break-glass off].
        tty: Option<PathBuf> = None, Flag::Value("breakglass-tty"), Bound::Any;
        /// The shell a correct token starts (as `setsid -c SHELL -l`, as the agent's user).
        shell: PathBuf = PathBuf::from("/bin/sh"), Flag::Value("breakglass-shell"), Bound::Any;
    }
}

impl Value for GuestKind {
    const KIND: &'static str = "\"mayfly\" or \"linux\"";
    const PLACEHOLDER: &'static str = "GUEST";
    fn value_parser() -> clap::builder::ValueParser {
        use clap::builder::TypedValueParser as _;
        clap::builder::ValueParser::new(
            clap::builder::PossibleValuesParser::new(["mayfly", "linux"])
                .try_map(|s| s.parse::<GuestKind>()),
        )
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        Ok(Some(toml::Value::String(self.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_ones_serve_always_had() {
        let s = Service::default();
        assert_eq!(s.backend, "sandbox");
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 8450)));
        assert_eq!(
            (s.pool_size, s.workers, s.max_in_flight, s.max_per_client),
            (8, 2, 64, 8)
        );
        assert_eq!(
            (s.max_connections, s.max_header_bytes, s.max_headers),
            (2048, 16384, 64)
        );
        assert_eq!(
            (s.header_timeout_ms, s.body_timeout_ms, s.idle_timeout_ms),
            (10_000, 10_000, 5000)
        );
        assert_eq!(
            (s.max_body_bytes, s.tx_timeout_ms, s.take_timeout_ms),
            (262_144, 5000, 2000)
        );
        assert_eq!(
            (s.max_write_bytes, s.map_size_mib, s.max_map_size_mib),
            (4 << 20, 4096, 65536)
        );
        assert_eq!(
            (s.memory_mib, s.cpu_seconds, s.refusal_interval_ms),
            (256, 10, 10_000)
        );
        assert!(s.cgroups && !s.skip_state_check && !s.insecure_plaintext_listen);
        assert_eq!(s.clones_cpu_weight, 25);
        let c = Console::default();
        assert_eq!(
            (c.quorum, c.clock_skew_secs, c.max_validity_secs),
            (2, 60, 3600)
        );
    }
}
