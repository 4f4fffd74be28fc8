//! `mayfly admin`: the signed admin console's client.
//!
//! Every command is a signed envelope (`mayfly-command`): built here, signed with one or
//! more admin keys (`--key`, repeatable), sent to the agent's console socket, answered with
//! progress frames and one result. Destructive commands need a quorum of distinct admins;
//! they can sign together (`--key a.key --key b.key`) or apart:
//!
//! ```text
//! alice$ mayfly admin prepare --out rb.cmd --key alice.key --appliance ID rollback 12 --cascade
//! bob$   mayfly admin cosign rb.cmd --key bob.key      # shows what he signs first
//! any$   mayfly admin submit rb.cmd
//! ```
//!
//! Output is a table by default, JSON with `--json`. Exit codes: 0 done; 1 the agent
//! refused or the command failed (or verify found damage); 3 no answer (I/O).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mayfly_command::frame;
use mayfly_command::{hex, keyfile, Body, Envelope, APPLIANCE_ARG};
use serde_json::Value;

/// Exit code: the agent refused the command or it failed.
const EXIT_REFUSED: u8 = 1;

/// Arguments of `mayfly admin`. Each subcommand takes only the options that apply to it
/// (so `keygen --help` does not offer a socket): signing options where something is
/// signed, connection options where something is sent.
#[derive(Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    cmd: AdminCmd,
}

/// Keys to sign with.
#[derive(Args, Clone, Default)]
struct SignOpts {
    /// Admin private key to sign with (from `keygen`); repeat for co-signers.
    #[arg(long = "key", global = true)]
    keys: Vec<PathBuf>,
}

/// How long a new command stays valid.
#[derive(Args, Clone)]
struct ValidityOpts {
    /// Seconds the command stays valid [the agent accepts at most its max_validity_secs,
    /// 3600 by default].
    #[arg(long, global = true, default_value_t = 300)]
    valid_for: u64,
}

/// Which appliance a new command is for.
#[derive(Args, Clone, Default)]
struct BindOpts {
    /// The appliance the command is for: its identity key, 64 hex digits (`status` shows
    /// it as identity_key) [default: $MAYFLY_APPLIANCE, else asked of the agent over the
    /// Unix socket; required with --tcp and for prepare]. The agent refuses a command
    /// signed for another appliance.
    #[arg(long, global = true)]
    appliance: Option<String>,
}

/// Where the agent is and how to show its answer.
#[derive(Args, Clone, Default)]
struct ConnOpts {
    /// Console Unix socket of the agent [default: $MAYFLY_ADMIN_SOCKET, else
    /// ./mayfly-data/admin.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Use the agent's loopback TCP console instead of the socket.
    #[arg(long, global = true, conflicts_with = "socket")]
    tcp: Option<SocketAddr>,
    /// Print the agent's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
}

/// The options of a command built, signed and sent at once.
#[derive(Args, Clone)]
struct SendOpts {
    #[command(flatten)]
    sign: SignOpts,
    #[command(flatten)]
    validity: ValidityOpts,
    #[command(flatten)]
    bind: BindOpts,
    #[command(flatten)]
    conn: ConnOpts,
}

/// No options: a command being prepared takes its options from `prepare`.
#[derive(Args, Clone, Default)]
struct NoOpts {}

#[derive(Subcommand)]
enum AdminCmd {
    /// Generate an admin key pair: STEM.key (private, 0600) and STEM.pub (give it to the
    /// appliance's `admin_keys`).
    Keygen {
        /// Path without extension, e.g. /home/alice/.mayfly/alice
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a command into a file without sending it (signed by any --key given), for
    /// co-signers to `cosign` and anyone to `submit`.
    Prepare {
        /// Envelope file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        sign: SignOpts,
        #[command(flatten)]
        validity: ValidityOpts,
        #[command(flatten)]
        bind: BindOpts,
        #[command(subcommand)]
        op: Op<NoOpts>,
    },
    /// Show a prepared command, then add the signature of every --key to it.
    Cosign {
        /// Envelope file (rewritten in place).
        file: PathBuf,
        /// Admin private key to sign with; repeat for several co-signers.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Print the appliance's identity key (64 hex digits, what commands are bound to), as
    /// the agent answers on its Unix socket; nothing is signed or audited.
    Identity {
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Show a prepared command and who has signed it.
    Inspect {
        /// Envelope file.
        file: PathBuf,
    },
    /// Send a prepared (and co-signed) command, adding the signature of any --key.
    Submit {
        /// Envelope file.
        file: PathBuf,
        #[command(flatten)]
        sign: SignOpts,
        #[command(flatten)]
        conn: ConnOpts,
    },
    #[command(flatten)]
    Op(Op<SendOpts>),
}

/// The console's commands; `O` are the options each takes (sending options when run at
/// once, none under `prepare`).
#[derive(Subcommand, Clone)]
enum Op<O: Args + Clone + Send + Sync + 'static> {
    /// Backend, pool, chain heads, keys, policy hash, quarantine, SIEM exporter lag.
    Status {
        #[command(flatten)]
        opts: O,
    },
    /// Transactions.
    Tx {
        #[command(flatten)]
        opts: O,
        #[command(subcommand)]
        what: ListShow,
    },
    /// Records of the checkpoint chain (transactions and rollbacks).
    Checkpoint {
        #[command(flatten)]
        opts: O,
        #[command(subcommand)]
        what: ListShow,
    },
    /// Verify both chains and every signed head on the appliance (with progress).
    Verify {
        #[command(flatten)]
        opts: O,
    },
    /// Roll back a transaction (and with --cascade its dependents); needs the quorum
    /// unless --dry-run.
    Rollback {
        #[command(flatten)]
        opts: O,
        /// Commit sequence or transaction id of the attack.
        id: String,
        /// Also undo every transaction that read what it wrote, transitively.
        #[arg(long)]
        cascade: bool,
        /// Re-run the undone legitimate transactions in fresh domains afterwards.
        #[arg(long)]
        replay: bool,
        /// Only show what would be undone and restored.
        #[arg(long)]
        dry_run: bool,
        /// Recorded in the rollback record.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Policy bundle.
    Policy {
        #[command(flatten)]
        opts: O,
        #[command(subcommand)]
        what: PolicyOp,
    },
    /// Quarantined domains.
    Quarantine {
        #[command(flatten)]
        opts: O,
        #[command(subcommand)]
        what: QuarantineOp,
    },
    /// Audit log.
    Audit {
        #[command(flatten)]
        opts: O,
        #[command(subcommand)]
        what: AuditOp,
    },
    /// Appliance signing key.
    Key {
        #[command(flatten)]
        opts: O,
        #[command(subcommand)]
        what: KeyOp,
    },
    /// The signed A/B update: install a bundle from the update medium into the inactive
    /// slot (needs the quorum), or show the slots.
    Update {
        #[command(flatten)]
        opts: O,
        #[command(subcommand)]
        what: UpdateOp,
    },
    /// Break-glass: open the serial console for one root login, for --minutes, by a one-time
    /// token (printed here, on stderr, to give to the person at the console; the command
    /// carries only its SHA-256); needs the quorum. Audited at every step.
    Breakglass {
        #[command(flatten)]
        opts: O,
        /// How long the console accepts the token, and the shell lives (1..=60).
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=60))]
        minutes: u32,
        /// The token [default: 32 random hex digits].
        #[arg(long)]
        token: Option<String>,
    },
    /// Promote a standby to primary (needs the quorum): the standby opens EPOCH (its
    /// epoch + 1) under its own key. Only a standby accepts it: `prepare` it, have it
    /// co-signed, and give the file to `dom0-agent promote --command FILE` on the standby
    /// (docs/failover.md); a serving agent refuses it. The appliance is the identity key
    /// of the ledger the standby copies.
    Promote {
        #[command(flatten)]
        opts: O,
        /// The epoch the promotion opens: the standby's epoch + 1 (its `dom0-agent
        /// standby` start line and `promote --dry-run` show it).
        #[arg(long)]
        epoch: u64,
    },
    /// TPM attestation: a quote over the appliance's PCRs and its latest signed head,
    /// checked here against the pinned attestation key and the expected-PCR file of the
    /// image it should run. Exit 0 only if every check holds.
    Attest {
        #[command(flatten)]
        opts: O,
        /// Expected-PCR file of the image (docs/formats.md §4.2).
        #[arg(long)]
        expected_pcrs: PathBuf,
        /// The appliance's attestation key, 130 hex digits, pinned at provisioning (the `ak`
        /// of its first `tpm.quote` audit record). Without it nothing is trusted: the key
        /// in the answer is shown and the command fails.
        #[arg(long)]
        ak: Option<String>,
        /// Also accept a head signed by this key (64 hex digits; repeatable): the current
        /// signing key after a rotation, as `verify` shows it. The identity key is always
        /// accepted.
        #[arg(long = "head-key")]
        head_keys: Vec<String>,
        /// The nonce, 32..=128 hex digits [default: 32 random bytes; required with prepare].
        #[arg(long)]
        nonce: Option<String>,
    },
}

impl<O: Args + Clone + Send + Sync + 'static> Op<O> {
    fn opts(&self) -> &O {
        match self {
            Self::Status { opts }
            | Self::Tx { opts, .. }
            | Self::Checkpoint { opts, .. }
            | Self::Verify { opts }
            | Self::Rollback { opts, .. }
            | Self::Policy { opts, .. }
            | Self::Quarantine { opts, .. }
            | Self::Audit { opts, .. }
            | Self::Key { opts, .. }
            | Self::Update { opts, .. }
            | Self::Breakglass { opts, .. }
            | Self::Promote { opts, .. }
            | Self::Attest { opts, .. } => opts,
        }
    }
}

#[derive(Subcommand, Clone)]
enum ListShow {
    /// The newest records (or from --from).
    List {
        /// First commit sequence.
        #[arg(long)]
        from: Option<u64>,
        /// Most records (1..=1000).
        #[arg(long, default_value_t = 20)]
        limit: u64,
    },
    /// One record in full.
    Show {
        /// Commit sequence or transaction id.
        id: String,
    },
}

#[derive(Subcommand, Clone)]
enum PolicyOp {
    /// Load a policy bundle (a directory of *.toml, or files); needs the quorum.
    Load {
        /// Directory or files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Clone)]
enum QuarantineOp {
    /// Domains kept stopped for forensics.
    List,
    /// Destroy a quarantined domain; needs the quorum.
    Release {
        /// Domain id.
        domain: u32,
    },
}

#[derive(Subcommand, Clone)]
enum AuditOp {
    /// Audit records with their chain hashes (with progress).
    Export {
        /// First sequence [default: 1].
        #[arg(long)]
        from: Option<u64>,
        /// Last sequence [default: the tip].
        #[arg(long)]
        to: Option<u64>,
        /// Write the records as JSON lines to this file instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Clone)]
enum UpdateOp {
    /// Install BUNDLE, a copy of the file on the appliance's update medium (the partition
    /// labelled MAYFLY-MEDIA): the command names its file name and the SHA-256 computed here,
    /// so the quorum approves exactly these bytes; the appliance also checks the vendor's
    /// signature, the version floor and every part before it writes the inactive slot.
    Install {
        /// The bundle (read here to compute its SHA-256).
        bundle: PathBuf,
        /// Its file name on the medium [default: BUNDLE's file name].
        #[arg(long)]
        name: Option<String>,
        /// Trial boots before GRUB falls back to the running slot (1..=3).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
        tries: u8,
    },
    /// The booted, committed and trial slots, trial boots left, image version and floor.
    Status,
}

#[derive(Subcommand, Clone)]
enum KeyOp {
    /// Rotate the appliance signing key (the hand-over is signed by the old key); needs
    /// the quorum.
    Rotate,
}

/// Runs `mayfly admin`.
pub fn run(args: &AdminArgs) -> anyhow::Result<u8> {
    match &args.cmd {
        AdminCmd::Keygen { out } => {
            let public = keyfile::generate(out)?;
            println!("{}", hex(&public));
            eprintln!(
                "mayfly: private key {} (mode 0600, keep it offline), public key {}",
                out.with_extension("key").display(),
                out.with_extension("pub").display()
            );
            Ok(0)
        }
        AdminCmd::Prepare {
            out,
            sign,
            validity,
            bind,
            op,
        } => {
            let appliance = appliance_of(bind, None)?;
            let env = build(sign, validity, &appliance, op)?;
            write_envelope(out, &env)?;
            describe(&env, &mut std::io::stderr().lock())?;
            eprintln!("mayfly: written to {}", out.display());
            Ok(0)
        }
        AdminCmd::Cosign { file, keys } => {
            let mut env = read_envelope(file)?;
            describe(&env, &mut std::io::stderr().lock())?;
            sign_all(&mut env, keys)?;
            write_envelope(file, &env)?;
            eprintln!(
                "mayfly: {} signature(s) now on {}",
                env.signatures().len(),
                file.display()
            );
            Ok(0)
        }
        AdminCmd::Identity { conn } => {
            if conn.tcp.is_some() {
                bail!("the identity is asked only over the Unix socket (on loopback TCP any local user could answer)");
            }
            println!("{}", hello(conn)?);
            Ok(0)
        }
        AdminCmd::Inspect { file } => {
            let env = read_envelope(file)?;
            describe(&env, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        AdminCmd::Submit { file, sign, conn } => {
            let mut env = read_envelope(file)?;
            sign_all(&mut env, &sign.keys)?;
            send(conn, &env, None)
        }
        AdminCmd::Op(Op::Attest {
            opts,
            expected_pcrs,
            ak,
            head_keys,
            nonce,
        }) => {
            let appliance = appliance_of(&opts.bind, Some(&opts.conn))?;
            let nonce = match nonce {
                Some(n) => n.clone(),
                None => {
                    let a = mayfly_command::random_nonce()
                        .map_err(|_| anyhow::anyhow!("system randomness unavailable"))?;
                    let b = mayfly_command::random_nonce()
                        .map_err(|_| anyhow::anyhow!("system randomness unavailable"))?;
                    hex(&[a, b].concat())
                }
            };
            let op = Op::Attest {
                opts: opts.clone(),
                expected_pcrs: expected_pcrs.clone(),
                ak: ak.clone(),
                head_keys: head_keys.clone(),
                nonce: Some(nonce.clone()),
            };
            let env = build(&opts.sign, &opts.validity, &appliance, &op)?;
            attest(
                opts,
                &env,
                &appliance,
                expected_pcrs,
                ak.as_deref(),
                head_keys,
                &nonce,
            )
        }
        AdminCmd::Op(op) => {
            let o = op.opts();
            let appliance = appliance_of(&o.bind, Some(&o.conn))?;
            let env = build(&o.sign, &o.validity, &appliance, op)?;
            let out = match op {
                Op::Audit {
                    what: AuditOp::Export { out, .. },
                    ..
                } => out.clone(),
                _ => None,
            };
            send(&o.conn, &env, out.as_deref())
        }
    }
}

fn command_of<O: Args + Clone + Send + Sync + 'static>(
    op: &Op<O>,
) -> anyhow::Result<(String, BTreeMap<String, String>)> {
    let mut a = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        a.insert(k.to_owned(), v);
    };
    let name = match op {
        Op::Status { .. } => "status",
        Op::Tx { what: ls, .. } | Op::Checkpoint { what: ls, .. } => {
            let prefix = if matches!(op, Op::Tx { .. }) {
                "tx"
            } else {
                "checkpoint"
            };
            match ls {
                ListShow::List { from, limit } => {
                    if let Some(f) = from {
                        set("from", f.to_string());
                    }
                    set("limit", limit.to_string());
                    if prefix == "tx" {
                        "tx.list"
                    } else {
                        "checkpoint.list"
                    }
                }
                ListShow::Show { id } => {
                    set("id", id.clone());
                    if prefix == "tx" {
                        "tx.show"
                    } else {
                        "checkpoint.show"
                    }
                }
            }
        }
        Op::Verify { .. } => "verify",
        Op::Rollback {
            opts: _,
            id,
            cascade,
            replay,
            dry_run,
            reason,
        } => {
            set("id", id.clone());
            if *cascade {
                set("cascade", "true".into());
            }
            if *replay {
                set("replay", "true".into());
            }
            if *dry_run {
                set("dry_run", "true".into());
            }
            if let Some(r) = reason {
                set("reason", r.clone());
            }
            "rollback"
        }
        Op::Policy {
            what: PolicyOp::Load { paths },
            ..
        } => {
            for (name, text) in policy_files(paths)? {
                set(&format!("file.{name}"), text);
            }
            "policy.load"
        }
        Op::Quarantine {
            what: QuarantineOp::List,
            ..
        } => "quarantine.list",
        Op::Quarantine {
            what: QuarantineOp::Release { domain },
            ..
        } => {
            set("domain", domain.to_string());
            "quarantine.release"
        }
        Op::Audit {
            what: AuditOp::Export { from, to, .. },
            ..
        } => {
            if let Some(f) = from {
                set("from", f.to_string());
            }
            if let Some(t) = to {
                set("to", t.to_string());
            }
            "audit.export"
        }
        Op::Key {
            what: KeyOp::Rotate,
            ..
        } => "key.rotate",
        Op::Update {
            what: UpdateOp::Status,
            ..
        } => "update.status",
        Op::Update {
            what:
                UpdateOp::Install {
                    bundle,
                    name,
                    tries,
                },
            ..
        } => {
            let name = match name {
                Some(n) => n.clone(),
                None => bundle
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .with_context(|| format!("{} names no file", bundle.display()))?,
            };
            set("bundle", name);
            set("sha256", bundle_sha256(bundle)?);
            set("tries", tries.to_string());
            "update.install"
        }
        Op::Breakglass { minutes, token, .. } => {
            let token = match token {
                Some(t) => t.clone(),
                None => hex(&mayfly_command::random_nonce()
                    .map_err(|_| anyhow::anyhow!("system randomness unavailable"))?),
            };
            if token.is_empty() || token.len() > 200 || token.contains(['\n', '\r']) {
                bail!("the token must be 1..=200 characters on one line");
            }
            eprintln!("mayfly: break-glass token (type it at the console prompt): {token}");
            set(
                "token_sha256",
                hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref()),
            );
            set("minutes", minutes.to_string());
            "breakglass.open"
        }
        Op::Promote { epoch, .. } => {
            set("epoch", epoch.to_string());
            "promote"
        }
        Op::Attest { nonce, .. } => {
            let nonce = nonce
                .clone()
                .context("attest needs --nonce when prepared (the checker must know it)")?;
            set("nonce", nonce);
            "attest"
        }
    };
    Ok((name.to_owned(), a))
}

/// SHA-256 of the whole bundle file, hex.
fn bundle_sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex(ctx.finish().as_ref()))
}

fn policy_files(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            for entry in std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()))? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    files.push(path);
                }
            }
        } else {
            files.push(p.clone());
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !mayfly_command::envelope::valid_name(&format!("file.{name}"), 64) {
            bail!("policy file name {name:?} must be 1..=59 characters of [a-z0-9._-] to be sent");
        }
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        out.push((name, text));
    }
    if out.is_empty() {
        bail!("no policy file (*.toml) found");
    }
    Ok(out)
}

fn build<O: Args + Clone + Send + Sync + 'static>(
    sign: &SignOpts,
    validity: &ValidityOpts,
    appliance: &str,
    op: &Op<O>,
) -> anyhow::Result<Envelope> {
    let (command, mut a) = command_of(op)?;
    a.insert(APPLIANCE_ARG.to_owned(), appliance.to_owned());
    if validity.valid_for == 0 {
        bail!("--valid-for must be at least 1 second");
    }
    let issued_ns = mayfly_command::now_ns();
    let body = Body {
        nonce: mayfly_command::random_nonce()
            .map_err(|_| anyhow::anyhow!("system randomness unavailable"))?,
        issued_ns,
        expires_ns: issued_ns.saturating_add(validity.valid_for.saturating_mul(1_000_000_000)),
        command,
        args: a,
    };
    let mut env = Envelope::new(body).context("building the command")?;
    sign_all(&mut env, &sign.keys)?;
    Ok(env)
}

/// The appliance to bind a new command to: `--appliance`, else `$MAYFLY_APPLIANCE`, else
/// (when the command is sent at once over the Unix socket) the agent's own answer.
fn appliance_of(bind: &BindOpts, conn: Option<&ConnOpts>) -> anyhow::Result<String> {
    let given = bind
        .appliance
        .clone()
        .or_else(|| std::env::var("MAYFLY_APPLIANCE").ok());
    let id = match (given, conn) {
        (Some(id), _) => id,
        (None, Some(conn)) if conn.tcp.is_none() => hello(conn)?,
        (None, _) => bail!(
            "say which appliance the command is for: --appliance <identity key> or \
             $MAYFLY_APPLIANCE (`mayfly admin status` over the socket shows identity_key)"
        ),
    };
    let id = id.trim().to_ascii_lowercase();
    if id.len() != 64 || mayfly_command::unhex(&id).is_none() {
        bail!("appliance {id:?} is not an identity key (64 hex digits)");
    }
    Ok(id)
}

/// Asks the agent on the Unix socket for its identity key. Only over the socket: its
/// directory is writable by the agent's user alone, so nobody else can be answering
/// (on loopback TCP any local user could, and name another appliance).
fn hello(conn: &ConnOpts) -> anyhow::Result<String> {
    let mut c = connect(conn)?;
    frame::write_request(&mut c, frame::HELLO).context("asking the agent for its identity")?;
    let f = frame::read_response(&mut c).context("reading the agent's identity")?;
    f["result"]["appliance"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the agent did not say which appliance it is: {f}"))
}

fn sign_all(env: &mut Envelope, keys: &[PathBuf]) -> anyhow::Result<()> {
    for k in keys {
        let pair = keyfile::load_private(k)?;
        env.sign(&pair)
            .with_context(|| format!("signing with {}", k.display()))?;
    }
    Ok(())
}

/// Writes the envelope through a temporary file created exclusively beside it (never
/// following a planted file or symlink), then renamed over `path`.
fn write_envelope(path: &Path, env: &Envelope) -> anyhow::Result<()> {
    use std::io::Write as _;
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{nanos}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&env.encode())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn read_envelope(path: &Path) -> anyhow::Result<Envelope> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > mayfly_command::envelope::MAX_ENVELOPE as u64 {
        bail!("{} is too large to be a command envelope", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Envelope::decode(&bytes)
        .with_context(|| format!("{} is not a command envelope", path.display()))
}

fn fmt_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn describe(env: &Envelope, out: &mut dyn Write) -> anyhow::Result<()> {
    let b = env.body();
    writeln!(out, "command     {}", b.command)?;
    for (k, v) in &b.args {
        let shown = if v.len() > 80 || v.contains('\n') {
            format!("<{} bytes>", v.len())
        } else {
            v.clone()
        };
        writeln!(out, "  {k:<10} {shown}")?;
    }
    writeln!(out, "nonce       {}", hex(&b.nonce))?;
    writeln!(out, "issued      {}", fmt_time(b.issued_ns))?;
    writeln!(out, "expires     {}", fmt_time(b.expires_ns))?;
    writeln!(out, "body sha256 {}", hex(&env.body_hash()))?;
    for s in env.signatures() {
        let ok = if env.signature_valid(s) {
            "valid"
        } else {
            "INVALID"
        };
        writeln!(out, "signed by   {} ({ok})", hex(&s.key))?;
    }
    if env.signatures().is_empty() {
        writeln!(out, "signed by   nobody yet")?;
    }
    Ok(())
}

trait Conn: std::io::Read + Write {}
impl<T: std::io::Read + Write> Conn for T {}

fn connect(args: &ConnOpts) -> anyhow::Result<Box<dyn Conn>> {
    let timeout = Some(Duration::from_secs(600));
    if let Some(addr) = args.tcp {
        let s = std::net::TcpStream::connect(addr)
            .with_context(|| format!("connecting to the console at tcp {addr}"))?;
        s.set_read_timeout(timeout)?;
        return Ok(Box::new(s));
    }
    let path = args
        .socket
        .clone()
        .or_else(|| std::env::var_os("MAYFLY_ADMIN_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("./mayfly-data/admin.sock"));
    let s = UnixStream::connect(&path)
        .with_context(|| format!("connecting to the console at {}", path.display()))?;
    s.set_read_timeout(timeout)?;
    Ok(Box::new(s))
}

fn send(args: &ConnOpts, env: &Envelope, export_to: Option<&Path>) -> anyhow::Result<u8> {
    if env.signatures().is_empty() {
        bail!("the command is not signed: give --key");
    }
    let mut conn = connect(args)?;
    frame::write_request(&mut conn, &env.encode()).context("sending the command")?;
    let tty = std::io::stderr().is_terminal();
    let mut export: Option<std::io::BufWriter<std::fs::File>> = match export_to {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut printed_header = false;
    loop {
        let f = frame::read_response(&mut conn).context("reading the agent's answer")?;
        match f["type"].as_str().unwrap_or_default() {
            "progress" => {
                let (done, total) = (
                    f["done"].as_u64().unwrap_or(0),
                    f["total"].as_u64().unwrap_or(0),
                );
                let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
                let end = if tty && done < total { "\r" } else { "\n" };
                eprint!(
                    "{}: {:<11} {done:>10}/{total:<10} ({pct:>3}%){end}",
                    env.body().command,
                    f["stage"].as_str().unwrap_or("")
                );
            }
            "records" => {
                let records = f["records"].as_array().cloned().unwrap_or_default();
                match &mut export {
                    Some(w) => {
                        for r in &records {
                            writeln!(w, "{r}")?;
                        }
                    }
                    None if args.json => {
                        let mut out = std::io::stdout().lock();
                        for r in &records {
                            writeln!(out, "{r}")?;
                        }
                    }
                    None => {
                        let mut out = std::io::stdout().lock();
                        if !printed_header {
                            writeln!(
                                out,
                                "{:>8}  {:<20}  {:>3}  {:<24}  fields",
                                "seq", "time", "sev", "event"
                            )?;
                            printed_header = true;
                        }
                        for r in &records {
                            let fields = r["fields"]
                                .as_object()
                                .map(|m| {
                                    m.iter()
                                        .map(|(k, v)| {
                                            format!("{k}={}", v.as_str().unwrap_or_default())
                                        })
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                })
                                .unwrap_or_default();
                            writeln!(
                                out,
                                "{:>8}  {:<20}  {:>3}  {:<24}  {}",
                                r["seq"],
                                fmt_time(r["time_ns"].as_u64().unwrap_or(0)),
                                r["severity"],
                                r["event"].as_str().unwrap_or_default(),
                                fields
                            )?;
                        }
                    }
                }
            }
            "result" => {
                if let Some(w) = &mut export {
                    w.flush()?;
                }
                return Ok(render_result(args, &f));
            }
            other => bail!("unexpected frame type {other:?} from the agent"),
        }
    }
}

/// Sends `attest` and checks the answer (crate::attest).
fn attest(
    opts: &SendOpts,
    env: &Envelope,
    appliance: &str,
    expected_pcrs: &Path,
    ak: Option<&str>,
    head_keys: &[String],
    nonce: &str,
) -> anyhow::Result<u8> {
    let text = std::fs::read(expected_pcrs)
        .with_context(|| format!("reading {}", expected_pcrs.display()))?;
    let expected = mayfly_tpm::pcrfile::parse_states(&text)
        .with_context(|| format!("in {}", expected_pcrs.display()))?;
    let mut keys = vec![appliance];
    keys.extend(head_keys.iter().map(String::as_str));
    let keys = keys
        .iter()
        .map(|k| {
            mayfly_command::unhex(k.trim())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .with_context(|| format!("--head-key {k:?} is not 64 hex digits"))
        })
        .collect::<anyhow::Result<Vec<[u8; 32]>>>()?;
    let pinned = match ak {
        Some(a) => Some(
            crate::attest::parse_ak(a)
                .with_context(|| "--ak is not a 65-byte uncompressed P-256 key (130 hex digits)")?,
        ),
        None => None,
    };
    if env.signatures().is_empty() {
        bail!("the command is not signed: give --key");
    }
    let mut conn = connect(&opts.conn)?;
    frame::write_request(&mut conn, &env.encode()).context("sending the command")?;
    let f = loop {
        let f = frame::read_response(&mut conn).context("reading the agent's answer")?;
        if f["type"] == "result" {
            break f;
        }
    };
    if f["ok"] != Value::Bool(true) {
        return Ok(render_result(&opts.conn, &f));
    }
    let nonce_bytes = mayfly_command::unhex(nonce).context("--nonce is not hex")?;
    let Some(pinned) = pinned else {
        eprintln!(
            "mayfly: NOT ATTESTED: no --ak pinned; the agent's attestation key is {} \
             (pin it only if it matches the `ak` recorded at provisioning)",
            f["result"]["quote"]["ak"].as_str().unwrap_or("?")
        );
        return Ok(EXIT_REFUSED);
    };
    match crate::attest::check(&f["result"], &nonce_bytes, &pinned, &expected, &keys) {
        Ok(a) => {
            if opts.conn.json {
                println!("{f}");
            }
            let pcrs: Vec<String> = a.info.pcrs.iter().map(ToString::to_string).collect();
            let state = if a.state.is_empty() {
                "unlabelled"
            } else {
                a.state.as_str()
            };
            println!(
                "attested: PCRs {} match {} (state {state}); TPM resets {}, clock {} ms",
                pcrs.join(","),
                expected_pcrs.display(),
                a.info.reset_count,
                a.info.clock
            );
            for (pcr, value) in &a.uncompared {
                println!(
                    "  PCR {pcr} = {} (attested; the file does not predict it)",
                    hex(value)
                );
            }
            println!(
                "signed head: group {}, checkpoint {} {}, audit {} {}, signed by {}",
                a.head.group,
                a.head.checkpoints.seq,
                hex(&a.head.checkpoints.hash),
                a.head.audit.seq,
                hex(&a.head.audit.hash),
                hex(&a.head.public_key)
            );
            Ok(0)
        }
        Err(e) => {
            eprintln!("mayfly: NOT ATTESTED: {e}");
            Ok(EXIT_REFUSED)
        }
    }
}

fn render_result(args: &ConnOpts, f: &Value) -> u8 {
    let ok = f["ok"].as_bool().unwrap_or(false);
    if args.json {
        println!("{f}");
    } else if !ok {
        eprintln!(
            "mayfly: refused ({}): {}",
            f["code"].as_str().unwrap_or("?"),
            f["error"].as_str().unwrap_or("")
        );
    } else {
        crate::admin_table::print(f["command"].as_str().unwrap_or(""), &f["result"]);
    }
    let verify_failed = f["command"] == "verify" && f["result"]["ok"] == Value::Bool(false);
    if ok && !verify_failed {
        0
    } else {
        EXIT_REFUSED
    }
}
