//! `dom0-agent promote`: a standby becomes primary through a co-signed admin command
//! (issue 18, docs/failover.md).
//!
//! The standby must be stopped (its data directory's `standby.lock` is free). The command
//! is a `promote` envelope (`mayfly admin prepare … promote --epoch N`, co-signed with
//! `mayfly admin cosign`), checked like the console checks any command: every signature by
//! an authorized admin key of `[console] admin_keys`, the quorum, the validity window,
//! the appliance (the identity of the ledger the standby copies) and the epoch it opens
//! (the copy's + 1, so that one command promotes once). Then the copy gets its promotion
//! group ([`mayfly_ledger::Replica::promote`]), signed by the standby's promotion key
//! (`DATA_DIR/signing.key`, made by `dom0-agent standby` at its first start), and
//! `dom0-agent serve` opens it as the primary of the new epoch.
//!
//! Before the promotion group, the standby's replication journal is applied, its
//! tentative last group included (`mayfly_replica::copy::replay`): a group the standby
//! acknowledged may exist only there (docs/failover.md, "Promotion with a journal").
//!
//! A refused command is audited as `admin.rejected` in the standby's own audit ledger
//! (`DATA_DIR/standby-audit`) and ends with exit code 8.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use mayfly_command::{hex, Authorizer, Envelope, APPLIANCE_ARG};
use mayfly_ledger::{
    AuditEvent, Ledger, Options, PromotionRequest, Replica, Severity, SigningKey, StoreOptions,
};
use serde::Deserialize;
use serde_json::json;
use slog::Logger;

/// `dom0-agent promote`.
#[derive(clap::Args)]
pub struct PromoteArgs {
    /// The standby's configuration file: its `[replication]` section (role "standby") and
    /// its `[console]` admin keys and quorum, which authorize the command.
    #[arg(long)]
    config: PathBuf,
    /// Data directory of the standby's copy [default: `data_dir` of the file].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The co-signed `promote` command (a file written by `mayfly admin prepare` and
    /// `mayfly admin cosign`).
    #[arg(long, required_unless_present = "dry_run")]
    command: Option<PathBuf>,
    /// Print what a promotion would do (the epoch it opens, the group it promotes from
    /// before the replication journal is applied, the journal's size, the promotion key)
    /// as JSON; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The `[console]` settings `promote` reads (the names and defaults of `serve`'s).
#[derive(Deserialize, Default)]
struct ConsoleKeys {
    #[serde(default)]
    admin_keys: Vec<String>,
    quorum: Option<usize>,
    clock_skew_secs: Option<u64>,
    max_validity_secs: Option<u64>,
}

/// The settings `promote` reads from the configuration file (others are ignored).
#[derive(Deserialize)]
struct PromoteFile {
    data_dir: Option<PathBuf>,
    replication: Option<mayfly_replica::ReplicationSection>,
    console: Option<ConsoleKeys>,
}

/// File in the data directory a running standby holds locked (and `promote` takes).
pub const LOCK_FILE: &str = "standby.lock";

/// Locks `dir/standby.lock` for this process, or says who holds it.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is locked: a standby is running on {} (stop it first)",
            path.display(),
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// The standby's promotion key: `DATA_DIR/signing.key`, made on first use.
pub fn promotion_key(dir: &Path) -> anyhow::Result<SigningKey> {
    if dir.join("signing.key").exists() {
        SigningKey::load(dir).with_context(|| format!("loading {}/signing.key", dir.display()))
    } else {
        SigningKey::generate(dir)
            .with_context(|| format!("creating the promotion key in {}", dir.display()))
    }
}

fn authorizer(console: &ConsoleKeys) -> anyhow::Result<(Authorizer, usize)> {
    use mayfly_command::authorize::defaults;
    if console.admin_keys.is_empty() {
        bail!("[console] admin_keys is empty: no admin could have signed a promotion");
    }
    let mut keys = BTreeMap::new();
    for (i, text) in console.admin_keys.iter().enumerate() {
        let key = mayfly_command::keyfile::parse_public(text)
            .with_context(|| format!("[console] admin key {}", i + 1))?;
        keys.insert(key, format!("admin-{}", i + 1));
    }
    let quorum = console.quorum.unwrap_or(defaults::QUORUM).max(1);
    if quorum > keys.len() {
        bail!(
            "admin quorum {quorum} is impossible with {} distinct admin key(s)",
            keys.len()
        );
    }
    let skew = console
        .clock_skew_secs
        .map_or(defaults::CLOCK_SKEW, Duration::from_secs)
        .min(defaults::MAX_CLOCK_SKEW);
    let validity = console
        .max_validity_secs
        .map_or(defaults::MAX_VALIDITY, Duration::from_secs)
        .min(defaults::MAX_MAX_VALIDITY);
    Ok((Authorizer::new(keys, skew, validity), quorum))
}

/// Why the command itself is refused (audited, exit 8), as (code, message).
type Refusal = (&'static str, String);

/// Checks `env` as the promotion of a copy of `identity` at `epoch` (the copy's) and
/// returns its signers.
fn check(
    env: &Envelope,
    authorizer: &Authorizer,
    quorum: usize,
    identity: &[u8; 32],
    epoch: u64,
) -> Result<Vec<[u8; 32]>, Refusal> {
    let body = env.body();
    if body.command != "promote" {
        return Err((
            "wrong_command",
            format!(
                "the file holds a {:?} command, not \"promote\"",
                body.command
            ),
        ));
    }
    let signers = authorizer
        .check(env, mayfly_command::now_ns(), quorum)
        .map_err(|r| (r.code(), r.to_string()))?;
    let mut args = body.args.clone();
    match args.remove(APPLIANCE_ARG) {
        Some(a) if a == hex(identity) => {}
        Some(a) => {
            return Err((
                "wrong_appliance",
                format!(
                    "the command was signed for appliance {a}, this standby copies {}",
                    hex(identity)
                ),
            ))
        }
        None => {
            return Err((
                "wrong_appliance",
                "the command names no appliance".to_string(),
            ))
        }
    }
    let want = epoch.saturating_add(1);
    let given = args.remove("epoch");
    if given.as_deref() != Some(want.to_string().as_str()) {
        return Err((
            "wrong_epoch",
            format!(
                "the command opens epoch {}, but this standby is at epoch {epoch} (a promotion opens {want})",
                given.as_deref().unwrap_or("(none)")
            ),
        ));
    }
    if let Some(extra) = args.keys().next() {
        return Err((
            "bad_argument",
            format!("promote takes no argument {extra:?}"),
        ));
    }
    Ok(signers)
}

/// Runs `promote`; returns the exit code.
pub fn run(args: &PromoteArgs, log: &Logger) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the configuration {}", args.config.display()))?;
    let file: PromoteFile = toml::from_str(&text)
        .with_context(|| format!("in the configuration {}", args.config.display()))?;
    let Some(section) = file.replication else {
        bail!(
            "{} has no [replication] section: only a standby is promoted",
            args.config.display()
        );
    };
    if section.role != mayfly_replica::Role::Standby {
        bail!("[replication] role = \"primary\": only a standby is promoted");
    }
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir)
        .context("no data directory: --data-dir or data_dir in the file")?;
    let (_, identity) = section.standby()?;
    let promotion_keys = section.promotion_keys()?;
    let _lock = lock_data_dir(&data_dir)?;
    let mut replica = Replica::open(&data_dir, &StoreOptions::default(), identity)
        .with_context(|| format!("opening the standby's copy in {}", data_dir.display()))?;
    // As the running standby does: a journal holding the promotion head of the primary
    // it follows (itself promoted) must replay here too.
    replica.trust_promotion_keys(promotion_keys);
    let key = promotion_key(&data_dir)?;
    let held = replica.held().clone();
    if args.dry_run {
        println!(
            "{}",
            json!({"identity": hex(&identity), "epoch": held.epoch, "opens_epoch": held.epoch + 1,
                   "from_group": held.group, "from_checkpoint": held.checkpoints.seq,
                   "journal_bytes": std::fs::metadata(data_dir.join(mayfly_replica::journal::FILE_NAME)).map_or(0, |m| m.len()),
                   "promotion_key": hex(&key.public_key())})
        );
        return Ok(0);
    }
    let Some(path) = &args.command else {
        bail!("--command FILE is required");
    };
    let local = Ledger::open(&data_dir.join("standby-audit"), &Options::default(), log)
        .context("opening the standby's own audit ledger")?;
    let env = read_envelope(path)?;
    let (authorizer, quorum) = authorizer(&file.console.unwrap_or_default())?;
    let signers = match check(&env, &authorizer, quorum, &identity, held.epoch) {
        Ok(s) => s,
        Err((code, message)) => {
            local
                .audit(vec![AuditEvent::new("admin.rejected", Severity::Warning)
                    .field("command", "promote")
                    .field("reason", code)
                    .field("message", &message)
                    .field("nonce", hex(&env.body().nonce))])
                .context("recording the refusal")?;
            eprintln!("dom0-agent: error: promotion refused ({code}): {message}");
            return Ok(crate::exit::PROMOTE_REFUSED);
        }
    };
    // The journal's groups first, the tentative tail included: a group the standby
    // acknowledged may exist only there (docs/failover.md, "Promotion with a journal").
    let audit_local = |ev: AuditEvent| {
        if let Err(e) = local.audit(vec![ev]) {
            eprintln!("dom0-agent: warning: recording a journal event failed: {e}");
        }
    };
    let (_, recovered) = mayfly_replica::copy::replay(&mut replica, &data_dir, true, &audit_local)
        .context("applying the replication journal before the promotion")?;
    if recovered.records > 0 {
        local
            .audit(vec![AuditEvent::new(
                "replication.journal_applied",
                Severity::Notice,
            )
            .field("records", recovered.records)
            .field("applied_groups", recovered.applied)
            .field(
                "tentative_group",
                recovered
                    .tentative_applied
                    .map_or("none".to_string(), |g| g.to_string()),
            )
            .field("group", replica.held().group)])
            .context("recording the journal's replay")?;
        eprintln!(
            "mayfly: applied {} group(s) from the replication journal ({} records){}; the copy now ends at group {}",
            recovered.applied,
            recovered.records,
            recovered.tentative_applied.map_or(String::new(), |g| format!(
                ", including tentative group {g} (acknowledged by this standby; its primary may have committed it)"
            )),
            replica.held().group
        );
    }
    let held = replica.held().clone();
    let body = env.body();
    let now = mayfly_command::now_ns();
    let signer_list = signers.iter().map(|k| hex(k)).collect::<Vec<_>>().join(",");
    let accepted = AuditEvent::new("admin.accepted", Severity::Notice)
        .field("command", "promote")
        .field("nonce", hex(&body.nonce))
        .field("signers", &signer_list)
        .field("epoch", held.epoch + 1);
    let promoted = match replica.promote(
        &key,
        PromotionRequest {
            command: env.body_hash(),
            nonce: body.nonce,
            expires_ns: body.expires_ns,
            cosigners: signers,
            events: vec![accepted],
            time_ns: now,
        },
    ) {
        Ok(p) => p,
        Err(e @ mayfly_ledger::PromoteError::NonceReused { .. }) => {
            local
                .audit(vec![AuditEvent::new("admin.rejected", Severity::Warning)
                    .field("command", "promote")
                    .field("reason", "replay")
                    .field("message", e.to_string())
                    .field("nonce", hex(&body.nonce))])
                .context("recording the refusal")?;
            eprintln!("dom0-agent: error: promotion refused (replay): {e}");
            return Ok(crate::exit::PROMOTE_REFUSED);
        }
        Err(e) => return Err(e).context("writing the promotion group"),
    };
    local
        .audit(vec![AuditEvent::new(
            "failover.promoted",
            Severity::Warning,
        )
        .field("epoch", promoted.epoch)
        .field("group", promoted.group)
        .field("from_group", promoted.from_group)
        .field("signers", &signer_list)
        .field("promotion_key", hex(&promoted.signer))])
        .context("recording the promotion")?;
    println!(
        "{}",
        json!({"identity": hex(&identity), "epoch": promoted.epoch, "group": promoted.group,
               "from_group": promoted.from_group, "from_head": hex(&promoted.from_head),
               "from_checkpoint": promoted.checkpoints.seq,
               "journal_groups_applied": recovered.applied,
               "tentative_group_applied": recovered.tentative_applied,
               "promotion_key": hex(&promoted.signer), "signers": signer_list})
    );
    eprintln!(
        "mayfly: promoted to primary of epoch {} (group {}); start `dom0-agent serve` on {} with [replication] role = \"primary\"",
        promoted.epoch,
        promoted.group,
        data_dir.display()
    );
    Ok(0)
}

fn read_envelope(path: &Path) -> anyhow::Result<Envelope> {
    use std::io::Read;
    let max = mayfly_command::envelope::MAX_ENVELOPE;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > max {
        bail!("{} is too large to be a command envelope", path.display());
    }
    Envelope::decode(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a command envelope: {e}", path.display()))
}

/// `dom0-agent unreplicated`.
#[derive(clap::Args)]
pub struct UnreplicatedArgs {
    /// Data directory of the fenced former primary.
    #[arg(long)]
    data_dir: PathBuf,
    /// The last checkpoint the promotion kept [default: the one the peer named, kept in
    /// DATA_DIR/fenced when this node was fenced].
    #[arg(long)]
    from_checkpoint: Option<u64>,
}

/// Prints, as JSON lines, the checkpoint records of a fenced former primary that its
/// promoted standby never received (after the last one the promotion kept), then a
/// summary line. Reads only; the records stay in the ledger.
pub fn run_unreplicated(args: &UnreplicatedArgs) -> anyhow::Result<u8> {
    let from = match args.from_checkpoint {
        Some(n) => n,
        None => {
            let f = mayfly_replica::Fenced::load(&args.data_dir).with_context(|| {
                format!(
                    "{} holds no fenced marker: give --from-checkpoint",
                    args.data_dir.display()
                )
            })?;
            if f.from_checkpoint == 0 {
                bail!("the peer did not say where its epoch began: give --from-checkpoint (the promotion's from_checkpoint, in its failover.promoted record)");
            }
            f.from_checkpoint
        }
    };
    let store = mayfly_ledger::store::open_read_only(&args.data_dir, &StoreOptions::default())
        .with_context(|| format!("opening the ledger in {}", args.data_dir.display()))?;
    let mut next = from.saturating_add(1);
    let mut count: u64 = 0;
    let mut tip = from;
    let mut out = std::io::stdout().lock();
    loop {
        let batch = store.records(next, 256).context("reading the ledger")?;
        let Some(last) = batch.last() else { break };
        next = last.seq().saturating_add(1);
        tip = last.seq();
        for r in &batch {
            use std::io::Write;
            writeln!(out, "{}", mayfly_incident::view::record(r, false))?;
            count = count.saturating_add(1);
        }
    }
    {
        use std::io::Write;
        writeln!(
            out,
            "{}",
            json!({"unreplicated_checkpoints": count, "from_checkpoint": from, "tip": tip})
        )?;
    }
    Ok(0)
}
