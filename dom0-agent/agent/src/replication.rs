//! Failover (issue 18) in the agent: the primary side of `serve` (a few calls from
//! serve.rs) and the `standby` subcommand. The configuration is the `[replication]`
//! section ([`mayfly_replica::ReplicationSection`], docs/failover.md).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use mayfly_ledger::{Ledger, Options, Replica, StoreOptions};
use mayfly_replica::{End, ReplicationSection, Role, Shipper};
use nix::sys::signal::{SigSet, Signal};
use serde::Deserialize;
use serde_json::json;
use slog::Logger;

/// Starts shipping to the standby when `[replication]` says this node is the primary.
pub fn start_primary(
    section: Option<&ReplicationSection>,
    ledger: &Ledger,
    log: &Logger,
) -> anyhow::Result<Option<Shipper>> {
    let Some(section) = section else {
        return Ok(None);
    };
    if section.role == Role::Standby {
        bail!("[replication] role = \"standby\": a standby runs `dom0-agent standby`, not `serve`");
    }
    let config = section.primary()?;
    let shipper = Shipper::start(ledger, config, log).context("starting replication")?;
    println!(
        "mayfly: replication primary on {} ({})",
        shipper.local_addr(),
        section.primary()?.mode.as_str()
    );
    Ok(Some(shipper))
}

/// The replication state as JSON: the `replication` section of `GET /v1/health` and of
/// the console's `status`.
fn status_json(handle: &mayfly_replica::StatusHandle) -> serde_json::Value {
    let s = handle.status();
    json!({
        "role": "primary",
        "mode": s.mode.as_str(),
        "state": s.state(),
        "degraded_reason": s.degraded,
        "standby": s.standby.map(|a| a.to_string()),
        "durable_group": s.durable_group,
        "acked_group": s.acked_group,
        "lag_groups": s.lag_groups(),
        "peer_lost": s.peer_lost,
        "shipped_cursors": s.shipped_cursors.iter().map(|(n, q)| (n.clone(), json!(q))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "fenced": s.fenced.as_ref().map(|f| json!({
            "reason": f.reason(),
            "peer": f.peer,
            "peer_epoch": f.epoch,
            "epoch": f.own_epoch,
            "from_group": f.from_group,
            "from_checkpoint": f.from_checkpoint,
        })),
    })
}

/// Refuses client transactions once this primary is fenced (docs/failover.md).
pub fn fence(shipper: &Shipper) -> mayfly_api::Fence {
    let handle = shipper.status_handle();
    mayfly_api::Fence(Arc::new(move || handle.status().fenced.map(|f| f.reason())))
}

/// The `replication` section of `GET /v1/health`.
pub fn health(shipper: &Shipper) -> mayfly_api::HealthSection {
    let handle = shipper.status_handle();
    mayfly_api::HealthSection {
        name: "replication",
        report: Arc::new(move || status_json(&handle)),
    }
}

/// The `replication` section of the console's `status`.
pub fn console_status(shipper: &Shipper) -> mayfly_console::ReplicationStatus {
    let handle = shipper.status_handle();
    Arc::new(move || status_json(&handle))
}

/// The SIEM exporters' ceiling on a primary (docs/siem.md "Replication"): the audit tip of
/// the last group the standby acknowledged as durable.
struct StandbyTip {
    status: mayfly_replica::StatusHandle,
    ledger: Ledger,
    /// The last (acknowledged group, its audit tip) looked up: the ledger is read only
    /// when the acknowledged group moves.
    cached: Mutex<(u64, u64)>,
}

impl mayfly_siem::ReplicatedTip for StandbyTip {
    fn replicated_audit_seq(&self) -> u64 {
        let group = self.status.acked_group();
        if group == 0 {
            return 0;
        }
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.0 == group {
            return cached.1;
        }
        match self.ledger.store().audit_tip_of_group(group) {
            Ok(Some(seq)) => {
                *cached = (group, seq);
                seq
            }
            // A group the standby acknowledged is durable here; if its head cannot be
            // read, hold as far as the last one known (never further).
            Ok(None) | Err(_) => cached.1.min(self.ledger.tips().audit.seq),
        }
    }

    fn describe(&self) -> String {
        let s = self.status.status();
        let mut out = match s.standby {
            Some(addr) => format!(
                "standby {addr} connected, acknowledged group {} of {}",
                s.acked_group, s.durable_group
            ),
            None => format!(
                "no standby connected; the last acknowledged group {} of {}",
                s.acked_group, s.durable_group
            ),
        };
        if let Some(lost) = s.peer_lost {
            out.push_str(&format!("; lost: {lost}"));
        }
        if let Some(d) = s.degraded {
            out.push_str(&format!("; degraded: {d}"));
        }
        if let Some(f) = s.fenced {
            out.push_str(&format!("; fenced: {}", f.reason()));
        }
        out
    }
}

/// The ceiling the SIEM exporters of this primary keep to.
pub fn siem_ceiling(shipper: &Shipper, ledger: &Ledger) -> Arc<dyn mayfly_siem::ReplicatedTip> {
    Arc::new(StandbyTip {
        status: shipper.status_handle(),
        ledger: ledger.clone(),
        cached: Mutex::new((0, 0)),
    })
}

/// `dom0-agent standby`.
#[derive(clap::Args)]
pub struct StandbyArgs {
    /// Configuration file with a `[replication]` section of role "standby" (docs/failover.md).
    #[arg(long)]
    config: PathBuf,
    /// Data directory of the copy [default: `data_dir` of the file]. The standby's own
    /// audit log is the ledger in its `standby-audit/` subdirectory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// The settings `standby` reads from the agent's configuration file (others are ignored).
#[derive(Deserialize)]
struct StandbyFile {
    data_dir: Option<PathBuf>,
    replication: Option<ReplicationSection>,
}

/// Follows the primary until SIGINT/SIGTERM (exit 0), a fork (exit 6) or a refusal by the
/// primary (exit 7).
pub fn run_standby(args: &StandbyArgs, log: &Logger) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the configuration {}", args.config.display()))?;
    let file: StandbyFile = toml::from_str(&text)
        .with_context(|| format!("in the configuration {}", args.config.display()))?;
    let Some(section) = file.replication else {
        bail!("{} has no [replication] section", args.config.display());
    };
    if section.role != Role::Standby {
        bail!("[replication] role = \"primary\": a primary runs `dom0-agent serve`");
    }
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir)
        .context("no data directory: --data-dir or data_dir in the file")?;
    let (config, identity) = section.standby()?;
    let promotion_keys = section.promotion_keys()?;
    let _lock = crate::promote::lock_data_dir(&data_dir)?;
    let promotion_key = crate::promote::promotion_key(&data_dir)?.public_key();
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;
    let mut replica = Replica::open(&data_dir, &StoreOptions::default(), identity)
        .with_context(|| format!("opening the standby's copy in {}", data_dir.display()))?;
    replica.trust_promotion_keys(promotion_keys);
    let local = Ledger::open(&data_dir.join("standby-audit"), &Options::default(), log)
        .context("opening the standby's own audit ledger")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = signals.wait();
            // The flag first: the note after it may fail (stderr gone), never the stop.
            flag.store(true, Ordering::SeqCst);
            if let Ok(sig) = sig {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "dom0-agent: {sig:?} received, stopping");
            }
        })
        .context("starting the signal thread")?;
    println!(
        "mayfly: standby of {} following {} from group {} (epoch {}); promotion key {}",
        mayfly_ledger::codec::hex(&identity),
        config.primary,
        replica.held().group + 1,
        replica.held().epoch,
        mayfly_ledger::codec::hex(&promotion_key)
    );
    match mayfly_replica::follow(&mut replica, &config, &local, &stop, log)? {
        End::Stopped => Ok(0),
        End::Fatal(e) => {
            eprintln!("dom0-agent: error: replication stopped for good: {e}");
            Ok(crate::exit::REPLICATION_STOPPED)
        }
        End::Refused(reason) => {
            eprintln!("dom0-agent: error: the primary refuses this standby: {reason}");
            Ok(crate::exit::REPLICATION_REFUSED)
        }
        End::Storage(reason) => {
            eprintln!(
                "dom0-agent: error: the standby's copy cannot be brought up to date: {reason}"
            );
            Ok(crate::exit::REPLICATION_STOPPED)
        }
    }
}
