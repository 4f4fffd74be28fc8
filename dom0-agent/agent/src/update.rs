//! `[update]`: the A/B update behind the console's `update.install` and `update.status`
//! (docs/console.md, "Updates"; the bundle and the slots are `mayfly-update`'s).
//!
//! ```toml
//! [update]
//! enabled = true                       # off by default; the appliance image turns it on
//! # medium = "/run/media"              # default: LABEL=MAYFLY-MEDIA mounted read-only per install
//! # esp = "/boot/efi"                  # default: LABEL=MAYFLY-ESP mounted per operation
//! max_bundle_mib = 1024
//! ```
//!
//! An install, once the console has checked the admins' quorum: the bundle is a plain file
//! name on the update medium (no path, no symbolic link, a regular file), at most
//! `max_bundle_mib`; its whole SHA-256 must be the one the admins signed; then
//! `mayfly_update::install_with` checks the vendor's signature with the key pinned in the
//! image, the product, the version floor and every part's SHA-256 before it writes the
//! inactive slot and arms its trial boots. Operations are serialized: one at a time.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mayfly_console::{UpdateFailure, UpdateRequest, Updater};
use mayfly_update::mount::Mounted;
use mayfly_update::slots::{self, Slot};
use mayfly_update::{InstallOptions, System, UpdateError};
use serde_json::{json, Value};

use crate::config::Update;
use crate::keysource::KeySettings;

/// Where the medium and the EFI partition are mounted when the configuration names no
/// directory for them.
const MEDIUM_MOUNT: &str = "/run/mayfly-media";
const ESP_MOUNT: &str = "/run/mayfly-esp";
/// The labels the image's partitions and the operator's medium carry.
const MEDIUM_LABEL: &str = "MAYFLY-MEDIA";
const ESP_LABEL: &str = "MAYFLY-ESP";

/// The updater of one agent.
pub struct AgentUpdater {
    cfg: Update,
    /// The data directory and key source: an install re-seals a TPM-sealed key to every boot
    /// the switch can lead to before it arms the trial (`keysource::reseal_switch`).
    data_dir: PathBuf,
    key: KeySettings,
    /// One operation at a time (two installs would race for the inactive slot).
    busy: Mutex<()>,
}

fn failure(e: &UpdateError) -> UpdateFailure {
    match e.refusal_code() {
        Some(code) => UpdateFailure {
            code,
            refused: true,
            message: e.to_string(),
        },
        None => UpdateFailure {
            code: "failed",
            refused: false,
            message: e.to_string(),
        },
    }
}

fn mount_failure(what: &str, e: &mayfly_update::mount::MountError) -> UpdateFailure {
    UpdateFailure {
        code: "failed",
        refused: false,
        message: format!("{what}: {e}"),
    }
}

impl AgentUpdater {
    /// The updater of `cfg`, or `None` when `[update]` is off.
    pub fn from_config(cfg: &Update, data_dir: &Path, key: &KeySettings) -> Option<AgentUpdater> {
        cfg.enabled.then(|| AgentUpdater {
            cfg: cfg.clone(),
            data_dir: data_dir.to_path_buf(),
            key: key.clone(),
            busy: Mutex::new(()),
        })
    }

    fn esp(&self, writable: bool) -> Result<Mounted, UpdateFailure> {
        match &self.cfg.esp {
            Some(dir) => Ok(Mounted::given(dir)),
            None => Mounted::by_label(ESP_LABEL, Some("vfat"), Path::new(ESP_MOUNT), writable)
                .map_err(|e| mount_failure("the EFI partition", &e)),
        }
    }

    fn medium(&self) -> Result<Mounted, UpdateFailure> {
        match &self.cfg.medium {
            Some(dir) => Ok(Mounted::given(dir)),
            None => {
                Mounted::by_label(MEDIUM_LABEL, None, Path::new(MEDIUM_MOUNT), false).map_err(|e| {
                    UpdateFailure {
                        code: "no_medium",
                        refused: true,
                        message: format!("the update medium: {e}"),
                    }
                })
            }
        }
    }

    fn system(&self, esp: &Mounted) -> Result<System, UpdateFailure> {
        System::load(
            &self.cfg.cmdline_file,
            &self.cfg.image_info,
            &self.cfg.key,
            &self.cfg.state_dir,
            esp.dir(),
        )
        .map_err(|e| failure(&e))
    }

    fn slot_device(&self, slot: Slot) -> Result<PathBuf, slots::SlotError> {
        let given = match slot {
            Slot::A => &self.cfg.slot_a_device,
            Slot::B => &self.cfg.slot_b_device,
        };
        match given {
            Some(p) => Ok(p.clone()),
            None => slots::device(slot, Path::new("/sys/class/block"), Path::new("/dev")),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ()>, UpdateFailure> {
        self.busy.try_lock().map_err(|_| UpdateFailure {
            code: "busy",
            refused: true,
            message: "another update operation is running".into(),
        })
    }
}

impl Updater for AgentUpdater {
    fn install(&self, req: &UpdateRequest) -> Result<Value, UpdateFailure> {
        let _one = self.lock()?;
        let medium = self.medium()?;
        let path =
            mayfly_update::medium_file(medium.dir(), &req.bundle).map_err(|e| failure(&e))?;
        let esp = self.esp(true)?;
        let sys = self.system(&esp)?;
        let max = self.cfg.max_bundle_mib.saturating_mul(1 << 20);
        let opts = InstallOptions {
            tries: req.tries,
            approved_sha256: Some(req.sha256),
            max_bundle_bytes: max,
        };
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        // The TPM-sealed key (issue 19) is re-sealed to every boot the switch leads to
        // between writing the slot and arming its trial; a failed re-seal leaves it unarmed.
        let reseal = |sw: &mayfly_update::Switch| {
            let switch = crate::keysource::Switch {
                from: sw.from.letter(),
                to: sw.to.letter(),
                tries: sw.tries,
                current: &sw.current_pcrs,
                next: &sw.next_pcrs,
            };
            crate::keysource::reseal_switch(&self.data_dir, &self.key, &switch)
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        };
        let done = mayfly_update::install_with(&sys, &path, |s| self.slot_device(s), &opts, reseal)
            .map_err(|e| failure(&e))?;
        Ok(json!({
            "slot": done.slot.letter(),
            "version": done.version,
            "tries": done.tries,
            "bundle_bytes": bytes,
            "fallback_slot": done.slot.other().letter(),
        }))
    }

    fn status(&self) -> Result<Value, UpdateFailure> {
        let _one = self.lock()?;
        let esp = self.esp(false)?;
        let sys = self.system(&esp)?;
        let st = mayfly_update::status(&sys).map_err(|e| failure(&e))?;
        Ok(json!({
            "booted_slot": st.booted.letter(),
            "committed_slot": st.state.committed.letter(),
            "trial_slot": st.state.trial.map(Slot::letter),
            "trial_tries_left": st.state.tries,
            "image_version": st.image_version,
            "version_floor": st.floor,
        }))
    }
}
