//! `[key]`: where the ledger's signing key is kept, and the TPM's other duties (the boot
//! quote exported to the SIEM, `attest` on the console).
//!
//! ```toml
//! [key]
//! source = "tpm"                 # "file" (DATA_DIR/signing.key, the default) or "tpm"
//! tcti = "device:/dev/tpmrm0"    # the TPM (default); tests: "swtpm:host=127.0.0.1,port=2321"
//! pcrs = [7, 8, 9]               # SHA-256 PCRs the key is sealed to and quotes cover (default)
//! ```
//!
//! Each key is also a flag (`--key-source`, `--tpm-tcti`, `--tpm-pcrs 7,8,9`); a flag wins.
//! With `tpm`, `init` seals a new key to the PCRs' current values and `serve` unseals it into
//! memory only; a boot chain or TPM that cannot unseal it stops `serve` with exit code 5
//! ([`crate::exit::KEY_UNAVAILABLE`]) and is audited (`key.unavailable_earlier`) by the next
//! start that can sign. See docs/design.md, "The signing key sealed to the TPM".

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use mayfly_ledger::codec::hex;
use mayfly_ledger::{AuditEvent, FileKeys, KeyStore, Ledger, Severity};
use mayfly_tpm::keystore::SealedKeys;
use mayfly_tpm::quote::qualifying_data;
use mayfly_tpm::{Tpm, DEFAULT_PCRS};
use serde_json::{json, Value};
use slog::{info, warn, Logger};

/// The default TCTI: the kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// The key source in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySettings {
    /// `signing.key` in the data directory.
    File,
    /// The seed sealed to a TPM.
    Tpm {
        /// TCTI configuration.
        tcti: String,
        /// PCR selection, ascending.
        pcrs: Vec<u8>,
    },
}

impl KeySettings {
    /// The key source of the `[key]` section in force (flags over file over defaults,
    /// merged by [`crate::config`]); the checks across its keys.
    pub fn from_config(k: &crate::config::SigningKey) -> anyhow::Result<Self> {
        match k.source.as_str() {
            "file" => {
                if k.tcti.is_some() || k.pcrs.is_some() {
                    bail!("[key] tcti and pcrs (--tpm-tcti, --tpm-pcrs) need source = \"tpm\"");
                }
                Ok(Self::File)
            }
            "tpm" => {
                let pcrs = k.pcrs.clone().unwrap_or_else(|| DEFAULT_PCRS.to_vec());
                let pcrs = mayfly_tpm::check_selection(&pcrs).context("[key] pcrs")?;
                Ok(Self::Tpm {
                    tcti: k.tcti.clone().unwrap_or_else(|| DEFAULT_TCTI.into()),
                    pcrs,
                })
            }
            other => bail!("[key] source {other:?} is unknown; use \"file\" or \"tpm\""),
        }
    }

    /// The ledger's key store.
    pub fn store(&self) -> anyhow::Result<Arc<dyn KeyStore>> {
        Ok(match self {
            Self::File => Arc::new(FileKeys),
            Self::Tpm { tcti, pcrs } => {
                Arc::new(SealedKeys::new(tcti, pcrs).context("[key] pcrs")?)
            }
        })
    }

    /// The console's `attest`, with the TPM source.
    pub fn attestor(&self) -> Option<Arc<dyn mayfly_console::Attestor>> {
        match self {
            Self::File => None,
            Self::Tpm { tcti, pcrs } => Some(Arc::new(TpmAttestor {
                tcti: tcti.clone(),
                pcrs: pcrs.clone(),
                lock: Mutex::new(()),
            })),
        }
    }

    /// At start with the TPM source: a quote over the PCRs and the current signed head,
    /// appended as the audit event `tpm.quote` (and so exported to the SIEM). A failure is
    /// logged and audited as `tpm.quote_failed`; it does not stop the agent, which has
    /// already proven the boot chain by unsealing its key.
    pub fn boot_quote(&self, ledger: &Ledger, log: &Logger) {
        let Some(attestor) = self.attestor() else {
            return;
        };
        let mut nonce = [0u8; 16];
        fastrand::fill(&mut nonce);
        let event = match head_bytes(ledger).and_then(|(group, head)| {
            let q = qualifying_data(&head, &nonce);
            attestor
                .quote(&q)
                .map(|quote| (group, quote))
                .map_err(|e| anyhow::anyhow!("{e}"))
        }) {
            Ok((group, quote)) => {
                info!(log, "boot quote recorded"; "head_group" => group);
                let mut ev = AuditEvent::new("tpm.quote", Severity::Info)
                    .field("nonce", hex(&nonce))
                    .field("head_group", group);
                for name in ["ak", "attest", "signature"] {
                    if let Some(Value::String(v)) = quote.get(name) {
                        ev = ev.field(name, v.clone());
                    }
                }
                // PCR values as `7=<hex> 8=<hex> 9=<hex>`.
                let pcrs: Vec<String> = quote
                    .get("pcrs")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|p| format!("{}={}", p["pcr"], p["sha256"].as_str().unwrap_or("")))
                            .collect()
                    })
                    .unwrap_or_default();
                ev.field("pcrs", pcrs.join(" "))
            }
            Err(e) => {
                warn!(log, "boot quote failed"; "error" => %e);
                AuditEvent::new("tpm.quote_failed", Severity::Warning)
                    .field("error", format!("{e:#}"))
            }
        };
        if let Err(e) = ledger.audit(vec![event]) {
            warn!(log, "recording the boot quote failed"; "error" => %e);
        }
    }
}

/// The latest signed head: its group and canonical bytes.
pub fn head_bytes(ledger: &Ledger) -> anyhow::Result<(u64, Vec<u8>)> {
    let heads = ledger
        .store()
        .last_heads(1)
        .context("reading the latest signed head")?;
    let head = heads
        .into_iter()
        .next()
        .context("the ledger has no signed head yet")?;
    Ok((head.group, head.encode()))
}

/// `attest` through the TPM: one quote at a time (a swtpm serves one connection).
struct TpmAttestor {
    tcti: String,
    pcrs: Vec<u8>,
    lock: Mutex<()>,
}

impl mayfly_console::Attestor for TpmAttestor {
    fn quote(
        &self,
        qualifying: &[u8; 32],
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let _one = self.lock.lock().map_err(|_| "the TPM lock is poisoned")?;
        let mut tpm = Tpm::open(&self.tcti)?;
        let q = tpm.quote(&self.pcrs, qualifying)?;
        Ok(json!({
            "ak": hex(&q.public_key),
            "attest": hex(&q.attest),
            "signature": hex(&q.signature),
            "pcrs": q.pcrs.iter().map(|(p, v)| json!({"pcr": p, "sha256": hex(v)})).collect::<Vec<_>>(),
        }))
    }
}

/// The `key` section of `GET /v1/health`: the source and what it reports (never key
/// material).
pub fn health(ledger: &Ledger) -> mayfly_api::HealthSection {
    let ledger = ledger.clone();
    mayfly_api::HealthSection {
        name: "key",
        report: Arc::new(move || mayfly_console::status::key_json(&ledger)),
    }
}

/// `dom0-agent reseal`: seals the current key also to an expected-PCR file's values. A file
/// the image build writes has one state per A/B boot state: `state` names the one to
/// seal to (its label, e.g. `slot=b try=- tries=0 entry=production-b`). Configured PCRs the
/// file does not predict (PCR 7 with the image's file) are sealed to their current values.
pub fn reseal(
    dir: &Path,
    settings: &KeySettings,
    expected: &Path,
    state: Option<&str>,
) -> anyhow::Result<u8> {
    let KeySettings::Tpm { tcti, pcrs } = settings else {
        bail!("reseal needs the TPM key source ([key] source = \"tpm\" or --key-source tpm)");
    };
    let text = read_bounded(expected, mayfly_tpm::pcrfile::MAX_FILE)?;
    let states = mayfly_tpm::pcrfile::parse_states(&text)
        .with_context(|| format!("in {}", expected.display()))?;
    let chosen = match (state, states.as_slice()) {
        (None, [one]) => one,
        (None, many) => bail!(
            "{} has {} boot states; name one with --state (e.g. {:?})",
            expected.display(),
            many.len(),
            many.first().map(|s| s.label.as_str()).unwrap_or("")
        ),
        (Some(label), all) => all
            .iter()
            .find(|s| s.label == label)
            .with_context(|| format!("{} has no state {label:?}", expected.display()))?,
    };
    let current = Tpm::open(tcti)
        .and_then(|mut t| t.read_pcrs(pcrs))
        .context("reading the current PCRs")?;
    let values = state_values(chosen, &current, pcrs, expected)?;
    let keys = SealedKeys::new(tcti, pcrs)?;
    let path = keys.reseal(dir, &values)?;
    println!("{}", path.display());
    Ok(0)
}

/// The values one expected state gives the configured PCRs: the file's where it predicts
/// them, the current value elsewhere (PCR 7 with the image's file; said on stderr).
fn state_values(
    chosen: &mayfly_tpm::pcrfile::ExpectedState,
    current: &[(u8, mayfly_tpm::PcrValue)],
    pcrs: &[u8],
    file: &Path,
) -> anyhow::Result<Vec<(u8, mayfly_tpm::PcrValue)>> {
    if let Some((p, _)) = chosen.values.iter().find(|(p, _)| !pcrs.contains(p)) {
        bail!(
            "{} predicts PCR {p}, which the key is not sealed to ([key] pcrs = {pcrs:?})",
            file.display()
        );
    }
    Ok(current
        .iter()
        .map(
            |(p, now)| match chosen.values.iter().find(|(q, _)| q == p) {
                Some(v) => (*p, v.1),
                None => {
                    eprintln!(
                        "dom0-agent: PCR {p} is not in {}: sealed to its current value",
                        file.display()
                    );
                    (*p, *now)
                }
            },
        )
        .collect())
}

/// `dom0-agent reseal-switch`: what an A/B switch from one slot to the other needs.
pub struct Switch<'a> {
    /// The running, committed slot (`a` or `b`).
    pub from: &'a str,
    /// The slot the update goes to.
    pub to: &'a str,
    /// Trial boots armed (grubenv's `mayfly_tries`).
    pub tries: u8,
    /// Expected-PCR file of the running image.
    pub current: &'a Path,
    /// Expected-PCR file of the update.
    pub next: &'a Path,
}

impl Switch<'_> {
    /// Every boot state the switch can lead to, as (file, label prefix), in the order GRUB
    /// reaches them (grub.cfg and docs/formats.md, "A/B boot state": grubenv as GRUB loads
    /// it): each trial boot of `to` (the counter as loaded, `tries` down to 1), `to`
    /// committed, and the fallback to `from` once the counter is 0.
    pub fn states(&self) -> Vec<(&Path, String)> {
        let (from, to) = (self.from, self.to);
        let mut out: Vec<(&Path, String)> = (1..=self.tries)
            .rev()
            .map(|k| (self.next, format!("slot={from} try={to} tries={k}")))
            .collect();
        out.push((self.next, format!("slot={to} try=- tries=0")));
        out.push((self.current, format!("slot={from} try={to} tries=0")));
        out
    }
}

/// `dom0-agent reseal-switch`: seals the current key, in one blob, to every boot state an
/// A/B switch can lead to ([`Switch::states`]); PCRs the files do not predict (PCR 7) keep
/// their current values. Nothing to do with the file key source.
pub fn reseal_switch(
    dir: &Path,
    settings: &KeySettings,
    switch: &Switch<'_>,
) -> anyhow::Result<u8> {
    let KeySettings::Tpm { tcti, pcrs } = settings else {
        println!("the signing key source is \"file\": nothing to re-seal");
        return Ok(0);
    };
    if switch.from == switch.to {
        bail!("--from and --to name the same slot {:?}", switch.from);
    }
    let mut files: Vec<(&Path, Vec<mayfly_tpm::pcrfile::ExpectedState>)> = Vec::new();
    for path in [switch.current, switch.next] {
        let text = read_bounded(path, mayfly_tpm::pcrfile::MAX_FILE)?;
        let states = mayfly_tpm::pcrfile::parse_states(&text)
            .with_context(|| format!("in {}", path.display()))?;
        files.push((path, states));
    }
    let current = Tpm::open(tcti)
        .and_then(|mut t| t.read_pcrs(pcrs))
        .context("reading the current PCRs")?;
    let mut sealed_to = Vec::new();
    let mut labels = Vec::new();
    for (file, prefix) in switch.states() {
        let states = files
            .iter()
            .find(|(p, _)| *p == file)
            .map(|(_, s)| s.as_slice())
            .unwrap_or_default();
        let chosen = states
            .iter()
            .find(|s| s.label == prefix || s.label.starts_with(&format!("{prefix} ")))
            .with_context(|| {
                format!(
                    "{} has no boot state {prefix:?} (is it the image build's file?)",
                    file.display()
                )
            })?;
        sealed_to.push(state_values(chosen, &current, pcrs, file)?);
        labels.push(chosen.label.clone());
    }
    let keys = SealedKeys::new(tcti, pcrs)?;
    let path = keys.reseal_states(dir, &sealed_to)?;
    for l in &labels {
        eprintln!("dom0-agent: sealed to boot state {l}");
    }
    println!("{}", path.display());
    Ok(0)
}

fn read_bounded(path: &Path, max: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if buf.len() > max {
        bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(buf)
}
