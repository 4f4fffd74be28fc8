//! Mayfly's signed A/B update (issue 17): the bundle format ([`bundle`]), GRUB's environment
//! block that carries the boot state ([`grubenv`]), the two root slots ([`slots`]), and the
//! two operations on the appliance:
//!
//! * [`install`]: verifies a bundle (signature with the vendor's update key pinned in the
//!   image, product, version above the floor, every part's SHA-256) **before** anything is
//!   written, then writes the inactive slot (root partition, `xen-<slot>`, `vmlinux-<slot>`,
//!   `expected-pcrs-<slot>` on the EFI partition) and arms a one-shot trial of it:
//!   `mayfly_try=<slot>`, `mayfly_tries=<n>` in grubenv.
//! * [`boot_check`], run at every boot after the agent's start: on a trial boot it waits for
//!   the agent's health and then commits the slot (`mayfly_slot=<slot>`), or reports the
//!   failure so that the caller reboots; GRUB decrements `mayfly_tries` before each trial boot
//!   and boots the committed slot once it reaches 0, which the next boot check reports as a
//!   fallback.
//!
//! Events (installs, refusals, commits, fallbacks) are appended to `events.log` in the state
//! directory on the data partition and printed on the console by the callers.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod grubenv;
pub mod mount;
pub mod slots;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bundle::BundleError;
use grubenv::{GrubEnv, GrubEnvError};
use slots::{Slot, SlotError};

/// grubenv: the committed slot (`a` or `b`).
pub const VAR_SLOT: &str = "mayfly_slot";
/// grubenv: the slot on trial (empty when none).
pub const VAR_TRY: &str = "mayfly_try";
/// grubenv: trial boots left (`0`..`3`).
pub const VAR_TRIES: &str = "mayfly_tries";
/// Most trial boots an install may arm (grub.cfg counts down from at most 3).
pub const MAX_TRIES: u8 = 3;
/// grubenv's path on the EFI partition.
pub const GRUBENV: &str = "EFI/BOOT/grubenv";
/// The squashfs magic a root part must start with.
pub const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
/// events.log is moved to events.log.1 when it passes this size.
pub const EVENTS_MAX: u64 = 256 << 10;

/// Why an install or a boot check failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The bundle was refused.
    #[error("bundle refused: {0}")]
    Bundle(#[from] BundleError),
    /// grubenv.
    #[error(transparent)]
    GrubEnv(#[from] GrubEnvError),
    /// Slots.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The signing key could not be re-sealed for the switch: the slot is written, not armed.
    #[error("re-sealing the signing key for the new slot failed (the update is not armed): {0}")]
    Reseal(String),
    /// A trial is armed or running: the other slot is the fallback and is not overwritten.
    #[error("slot {0} is on trial (not yet committed): install again after it is committed or has fallen back")]
    TrialPending(&'static str),
    /// The running slot is not the committed one.
    #[error("running slot {booted} is not the committed slot {committed}: refusing to overwrite the committed slot")]
    NotCommitted {
        /// Booted slot.
        booted: &'static str,
        /// Committed slot.
        committed: &'static str,
    },
    /// A bundle for another product.
    #[error("bundle refused: it is for product {0:?}, this is {p:?}", p = bundle::PRODUCT)]
    WrongProduct(String),
    /// Rollback protection.
    #[error("bundle refused: version {version} is not newer than {floor} (running image {running}, floor {stored})")]
    NotNewer {
        /// The bundle's version.
        version: u64,
        /// max(running, stored floor).
        floor: u64,
        /// The running image's version.
        running: u64,
        /// The floor kept on the data partition.
        stored: u64,
    },
    /// The root part does not fit the slot's partition.
    #[error("bundle refused: the root file system ({size} bytes) does not fit slot {slot}'s partition ({capacity} bytes)")]
    TooBigForSlot {
        /// Slot.
        slot: &'static str,
        /// Root part size.
        size: u64,
        /// Partition size.
        capacity: u64,
    },
    /// The root part is not a squashfs.
    #[error("bundle refused: its root file system is not a squashfs")]
    NotSquashfs,
    /// A malformed state file.
    #[error("{0}: malformed (one decimal number expected)")]
    Malformed(PathBuf),
    /// The image names no version.
    #[error("{0}: no image_version= line")]
    NoImageVersion(PathBuf),
    /// The bundle file is larger than the configured bound (nothing of it was read).
    #[error("bundle refused: {size} bytes is more than the limit of {max}")]
    BundleTooLarge {
        /// The file's size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The bundle's SHA-256 is not the one the admins signed for.
    #[error("bundle refused: its SHA-256 {actual} is not the approved {approved}")]
    NotApproved {
        /// Hex digest the signed command names.
        approved: String,
        /// Hex digest of the file.
        actual: String,
    },
    /// A bundle name that is not a plain file name.
    #[error("bundle name {0:?} is not 1..=128 characters of [A-Za-z0-9._-] not starting with '.'")]
    BadName(String),
    /// The pinned update key is not 64 hex digits.
    #[error("{0}: not an Ed25519 public key (64 hex digits)")]
    BadUpdateKey(PathBuf),
    /// The named bundle is not a regular file (a symbolic link, a directory, a device).
    #[error("bundle refused: {0} is not a regular file")]
    NotAFile(PathBuf),
}

impl UpdateError {
    /// A stable short name when the bundle (or the moment) was refused before anything was
    /// written; `None` for failures (I/O, a broken grubenv).
    pub fn refusal_code(&self) -> Option<&'static str> {
        Some(match self {
            Self::Bundle(b) => match b {
                BundleError::NotABundle { .. } | BundleError::Malformed(_) => "not_a_bundle",
                BundleError::BadSignature => "bad_signature",
                BundleError::Truncated { .. } => "truncated",
                BundleError::TrailingData { .. } | BundleError::HashMismatch { .. } => "tampered",
                BundleError::TooLarge { .. } => "too_large",
                BundleError::Io { .. } => return None,
            },
            Self::WrongProduct(_) => "wrong_product",
            Self::NotNewer { .. } => "downgrade",
            Self::TooBigForSlot { .. } | Self::BundleTooLarge { .. } => "too_large",
            Self::NotSquashfs => "not_squashfs",
            Self::NotApproved { .. } => "not_approved",
            Self::BadName(_) => "bad_name",
            Self::NotAFile(_) => "not_a_file",
            Self::TrialPending(_) => "trial_pending",
            Self::NotCommitted { .. } => "not_committed",
            Self::GrubEnv(_)
            | Self::Slot(_)
            | Self::Io { .. }
            | Self::Malformed(_)
            | Self::BadUpdateKey(_)
            | Self::NoImageVersion(_)
            | Self::Reseal(_) => return None,
        })
    }
}

/// Most characters of a bundle's file name on the update medium.
pub const MAX_BUNDLE_NAME: usize = 128;

/// The bundle `name` in the medium directory `dir`: a plain file name (no path), and a regular
/// file (not a symbolic link or a device a hostile medium could point elsewhere).
pub fn medium_file(dir: &Path, name: &str) -> Result<PathBuf, UpdateError> {
    let plain = !name.is_empty()
        && name.len() <= MAX_BUNDLE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !plain {
        return Err(UpdateError::BadName(
            name.chars().take(MAX_BUNDLE_NAME).collect(),
        ));
    }
    let path = dir.join(name);
    let md = fs::symlink_metadata(&path).map_err(io_err(&path))?;
    if !md.file_type().is_file() {
        return Err(UpdateError::NotAFile(path));
    }
    Ok(path)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> UpdateError {
    let path = path.to_path_buf();
    move |source| UpdateError::Io { path, source }
}

/// What an operation needs of the running system (the appliance's paths by default; tests
/// point them at temporary files).
#[derive(Clone, Debug)]
pub struct System {
    /// The kernel command line (`/proc/cmdline`'s contents).
    pub cmdline: String,
    /// The running image's version (`image_version=` of `/etc/mayfly/image-info`).
    pub image_version: u64,
    /// The vendor's update key (`/etc/mayfly/update-key.pub`).
    pub update_key: [u8; 32],
    /// Floor and events (`/var/lib/mayfly/update`).
    pub state_dir: PathBuf,
    /// The mounted EFI system partition.
    pub esp: PathBuf,
}

/// `image_version=N` of an image-info file.
pub fn image_version(path: &Path) -> Result<u64, UpdateError> {
    let text = read_small(path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("image_version="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| UpdateError::NoImageVersion(path.to_path_buf()))
}

fn read_small(path: &Path) -> Result<String, UpdateError> {
    let mut s = String::new();
    File::open(path)
        .map_err(io_err(path))?
        .take(64 << 10)
        .read_to_string(&mut s)
        .map_err(io_err(path))?;
    Ok(s)
}

impl System {
    /// The running system as its files describe it: the kernel command line, the image's
    /// `image_version=`, the pinned vendor key (64 hex digits), the state directory and the
    /// (mounted) EFI partition.
    pub fn load(
        cmdline_file: &Path,
        image_info: &Path,
        update_key: &Path,
        state_dir: &Path,
        esp: &Path,
    ) -> Result<System, UpdateError> {
        let cmdline = read_small(cmdline_file)?;
        let key_text = read_small(update_key)?;
        let update_key = mayfly_command::unhex(key_text.trim())
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| UpdateError::BadUpdateKey(update_key.to_path_buf()))?;
        Ok(System {
            cmdline,
            image_version: image_version(image_info)?,
            update_key,
            state_dir: state_dir.to_path_buf(),
            esp: esp.to_path_buf(),
        })
    }

    fn grubenv(&self) -> PathBuf {
        self.esp.join(GRUBENV)
    }
    fn floor_path(&self) -> PathBuf {
        self.state_dir.join("version-floor")
    }

    /// The stored version floor (0 when none was stored yet).
    pub fn stored_floor(&self) -> Result<u64, UpdateError> {
        let p = self.floor_path();
        match fs::metadata(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err(&p)(e)),
            Ok(_) => read_small(&p)?
                .trim()
                .parse()
                .map_err(|_| UpdateError::Malformed(p)),
        }
    }

    fn raise_floor(&self, version: u64) -> Result<(), UpdateError> {
        if self.stored_floor()? >= version {
            return Ok(());
        }
        fs::create_dir_all(&self.state_dir).map_err(io_err(&self.state_dir))?;
        let p = self.floor_path();
        let tmp = self.state_dir.join("version-floor.new");
        write_synced(&tmp, format!("{version}\n").as_bytes())?;
        fs::rename(&tmp, &p).map_err(io_err(&p))?;
        sync_dir(&self.state_dir)
    }

    /// Appends `event key=value…` to events.log (bounded: one older file is kept).
    pub fn record(&self, event: &str, fields: &[(&str, String)]) -> Result<(), UpdateError> {
        fs::create_dir_all(&self.state_dir).map_err(io_err(&self.state_dir))?;
        let p = self.state_dir.join("events.log");
        if fs::metadata(&p)
            .map(|m| m.len() > EVENTS_MAX)
            .unwrap_or(false)
        {
            fs::rename(&p, self.state_dir.join("events.log.1")).map_err(io_err(&p))?;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut line = format!("time={now} event={event}");
        for (k, v) in fields {
            // Values are ours (numbers, slot letters, error texts): keep them on one line.
            let v: String = v
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            line.push_str(&format!(" {k}={v:?}"));
        }
        line.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io_err(&p))?;
        f.write_all(line.as_bytes()).map_err(io_err(&p))?;
        f.sync_all().map_err(io_err(&p))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The A/B state read from grubenv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootState {
    /// The committed slot (`a` when grubenv names none or garbage, as grub.cfg does).
    pub committed: Slot,
    /// The slot on trial, if any.
    pub trial: Option<Slot>,
    /// Trial boots left.
    pub tries: u8,
}

impl BootState {
    /// Reads the state as grub.cfg interprets it.
    pub fn of(env: &GrubEnv) -> BootState {
        BootState {
            committed: env
                .get(VAR_SLOT)
                .and_then(Slot::from_letter)
                .unwrap_or(Slot::A),
            trial: env.get(VAR_TRY).and_then(Slot::from_letter),
            tries: env
                .get(VAR_TRIES)
                .and_then(|t| t.parse().ok())
                .filter(|t| *t <= MAX_TRIES)
                .unwrap_or(0),
        }
    }
}

/// The A/B state as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The slot this system booted from.
    pub booted: Slot,
    /// grubenv's state.
    pub state: BootState,
    /// The running image's version.
    pub image_version: u64,
    /// The stored version floor.
    pub floor: u64,
}

/// Reads the booted slot, grubenv and the floor.
pub fn status(sys: &System) -> Result<Status, UpdateError> {
    Ok(Status {
        booted: slots::booted(&sys.cmdline)?,
        state: BootState::of(&grubenv::read(&sys.grubenv())?),
        image_version: sys.image_version,
        floor: sys.stored_floor()?,
    })
}

/// What [`install`] wrote.
#[derive(Debug)]
pub struct Installed {
    /// The slot written and armed for trial.
    pub slot: Slot,
    /// The bundle's version.
    pub version: u64,
    /// Trial boots armed.
    pub tries: u8,
}

/// The switch an install is about to arm, for re-sealing the TPM-sealed signing key to every
/// boot it can lead to (issue 19; `dom0-agent reseal-switch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    /// The running, committed slot.
    pub from: Slot,
    /// The slot just written.
    pub to: Slot,
    /// Trial boots about to be armed.
    pub tries: u8,
    /// The running image's expected-PCR file (`expected-pcrs-<from>` on the EFI partition).
    pub current_pcrs: PathBuf,
    /// The update's expected-PCR file, as just written (`expected-pcrs-<to>`).
    pub next_pcrs: PathBuf,
}

/// The agent's program, configuration and data directory on the appliance, for
/// [`reseal_with_agent`].
pub const AGENT: &str = "dom0-agent";
/// The agent's configuration (its `[key]` section says whether the key is sealed).
pub const AGENT_CONFIG: &str = "/etc/mayfly/agent.toml";
/// The agent's data directory (the sealed key files).
pub const AGENT_DATA_DIR: &str = "/var/lib/mayfly";

/// The re-seal [`install`] runs on the appliance before it arms a trial: `dom0-agent
/// reseal-switch` seals the signing key to the trial boots, the committed new slot and the
/// fallback (with the file key source it has nothing to do). Its output is returned as the
/// error when it fails.
pub fn reseal_with_agent(sw: &Switch) -> Result<(), String> {
    let out = std::process::Command::new(AGENT)
        .args([
            "reseal-switch",
            "--config",
            AGENT_CONFIG,
            "--data-dir",
            AGENT_DATA_DIR,
        ])
        .args(["--from", sw.from.letter(), "--to", sw.to.letter()])
        .args(["--tries", &sw.tries.to_string()])
        .arg("--current-pcrs")
        .arg(&sw.current_pcrs)
        .arg("--next-pcrs")
        .arg(&sw.next_pcrs)
        .output()
        .map_err(|e| format!("running {AGENT} reseal-switch: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{AGENT} reseal-switch exited with {}: {}",
        out.status,
        err.trim().chars().take(2000).collect::<String>()
    ))
}

/// How an install is bounded and what it must match beyond the vendor's signature.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Trial boots to arm (clamped to 1..=[`MAX_TRIES`]).
    pub tries: u8,
    /// The SHA-256 of the whole bundle file that the admins approved (their signed
    /// `update.install` names it); `None` for the root tool, where root is the authority.
    pub approved_sha256: Option<[u8; 32]>,
    /// A bundle file larger than this is refused before any of it is read.
    pub max_bundle_bytes: u64,
}

/// Verifies `bundle_path` and, only if everything checks out, writes it to the inactive slot
/// (`slot_device` gives a slot's block device), has `reseal` seal the signing key for the
/// switch ([`reseal_with_agent`] on the appliance), and arms `tries` trial boots of it. A
/// failed re-seal leaves the slot written but not armed (the running slot keeps booting).
pub fn install(
    sys: &System,
    bundle_path: &Path,
    slot_device: impl Fn(Slot) -> Result<PathBuf, SlotError>,
    tries: u8,
    reseal: impl FnOnce(&Switch) -> Result<(), String>,
) -> Result<Installed, UpdateError> {
    let opts = InstallOptions {
        tries,
        approved_sha256: None,
        max_bundle_bytes: u64::MAX,
    };
    install_with(sys, bundle_path, slot_device, &opts, reseal)
}

/// [`install`] with an approval digest and a size bound ([`InstallOptions`]).
pub fn install_with(
    sys: &System,
    bundle_path: &Path,
    slot_device: impl Fn(Slot) -> Result<PathBuf, SlotError>,
    opts: &InstallOptions,
    reseal: impl FnOnce(&Switch) -> Result<(), String>,
) -> Result<Installed, UpdateError> {
    let result = install_inner(sys, bundle_path, slot_device, opts, reseal);
    let bundle = bundle_path.display().to_string();
    // The event is best effort: a full data partition must not hide the install's outcome.
    let _ = match &result {
        Ok(i) => sys.record(
            "update_installed",
            &[
                ("bundle", bundle),
                ("slot", i.slot.letter().into()),
                ("version", i.version.to_string()),
                ("tries", i.tries.to_string()),
            ],
        ),
        Err(e) => sys.record(
            "update_refused",
            &[("bundle", bundle), ("reason", e.to_string())],
        ),
    };
    result
}

fn install_inner(
    sys: &System,
    bundle_path: &Path,
    slot_device: impl Fn(Slot) -> Result<PathBuf, SlotError>,
    opts: &InstallOptions,
    reseal: impl FnOnce(&Switch) -> Result<(), String>,
) -> Result<Installed, UpdateError> {
    let tries = opts.tries.clamp(1, MAX_TRIES);
    let booted = slots::booted(&sys.cmdline)?;
    let env_path = sys.grubenv();
    let mut env = grubenv::read(&env_path)?;
    let state = BootState::of(&env);
    if let Some(t) = state.trial {
        return Err(UpdateError::TrialPending(t.letter()));
    }
    if booted != state.committed {
        return Err(UpdateError::NotCommitted {
            booted: booted.letter(),
            committed: state.committed.letter(),
        });
    }
    let target = booted.other();

    // 1. The bundle: signature first, then what the signed manifest says, then every hash.
    let mut f = File::open(bundle_path).map_err(io_err(bundle_path))?;
    let md = f.metadata().map_err(io_err(bundle_path))?;
    let len = if md.file_type().is_file() {
        md.len()
    } else {
        device_len(&mut f, bundle_path)?
    };
    if len > opts.max_bundle_bytes {
        return Err(UpdateError::BundleTooLarge {
            size: len,
            max: opts.max_bundle_bytes,
        });
    }
    // The admins' approval covers these exact bytes; the vendor's signature is checked next,
    // and every part is hashed again while it is copied.
    if let Some(approved) = opts.approved_sha256 {
        let actual = bundle::file_sha256(&mut (&mut f).take(len), len)?;
        if actual != approved {
            return Err(UpdateError::NotApproved {
                approved: bundle::hex(&approved),
                actual: bundle::hex(&actual),
            });
        }
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(0))
            .map_err(io_err(bundle_path))?;
    }
    let v = bundle::open_verified(&mut f, len, md.file_type().is_file(), &sys.update_key)?;
    if v.manifest.product != bundle::PRODUCT {
        return Err(UpdateError::WrongProduct(v.manifest.product.clone()));
    }
    let stored = sys.stored_floor()?;
    let floor = stored.max(sys.image_version);
    if v.manifest.version <= floor {
        return Err(UpdateError::NotNewer {
            version: v.manifest.version,
            floor,
            running: sys.image_version,
            stored,
        });
    }
    bundle::check_parts(&mut f, &v)?;
    let mut magic = [0u8; 4];
    {
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(v.part_offset(0)))
            .map_err(io_err(bundle_path))?;
        f.read_exact(&mut magic).map_err(io_err(bundle_path))?;
    }
    if &magic != SQUASHFS_MAGIC {
        return Err(UpdateError::NotSquashfs);
    }
    let dev = slot_device(target)?;
    let mut out = OpenOptions::new()
        .write(true)
        .open(&dev)
        .map_err(io_err(&dev))?;
    let capacity = device_len(&mut out, &dev)?;
    let root_size = v.manifest.parts.first().map(|p| p.size).unwrap_or(0);
    if root_size > capacity {
        return Err(UpdateError::TooBigForSlot {
            slot: target.letter(),
            size: root_size,
            capacity,
        });
    }

    // 2. Write the inactive slot. Each part is hashed again as it is copied; a bundle that
    //    changed since the check leaves the slot written but not armed (the running slot
    //    and grubenv are untouched until step 3).
    let write_err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| BundleError::Io {
            what: format!("writing {}", p.display()),
            source: e,
        }
    };
    bundle::stream_part(&mut f, &v, 0, |c| out.write_all(c).map_err(write_err(&dev)))?;
    out.sync_all().map_err(io_err(&dev))?;
    for (i, name) in [(1, "xen"), (2, "vmlinux"), (3, "expected-pcrs")] {
        let dst = sys.esp.join(format!("{name}-{}", target.letter()));
        let tmp = sys.esp.join(format!("{name}-{}.new", target.letter()));
        let mut w = File::create(&tmp).map_err(io_err(&tmp))?;
        bundle::stream_part(&mut f, &v, i, |c| w.write_all(c).map_err(write_err(&tmp)))?;
        w.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    }
    sync_dir(&sys.esp)?;

    // 2b. The signing key, if sealed to the TPM, is sealed to the boots the switch leads to.
    let switch = Switch {
        from: state.committed,
        to: target,
        tries,
        current_pcrs: sys
            .esp
            .join(format!("expected-pcrs-{}", state.committed.letter())),
        next_pcrs: sys.esp.join(format!("expected-pcrs-{}", target.letter())),
    };
    reseal(&switch).map_err(UpdateError::Reseal)?;

    // 3. Arm the one-shot trial.
    env.set(VAR_SLOT, state.committed.letter());
    env.set(VAR_TRY, target.letter());
    env.set(VAR_TRIES, &tries.to_string());
    grubenv::write_in_place(&env_path, &env)?;
    Ok(Installed {
        slot: target,
        version: v.manifest.version,
        tries,
    })
}

fn device_len(f: &mut File, path: &Path) -> Result<u64, UpdateError> {
    use std::io::{Seek, SeekFrom};
    let len = f.seek(SeekFrom::End(0)).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    Ok(len)
}

/// The outcome of a boot check.
#[derive(Debug, PartialEq, Eq)]
pub enum BootCheck {
    /// No trial: the committed slot runs.
    Normal(Slot),
    /// The trial slot came up healthy and is now the committed slot.
    Committed {
        /// Slot.
        slot: Slot,
        /// The running image's version (the new floor).
        version: u64,
    },
    /// The trial slot did not become healthy in time; the caller reboots (GRUB counts).
    TrialFailed {
        /// Slot.
        slot: Slot,
        /// Trial boots left.
        tries_left: u8,
    },
    /// GRUB used up the trial's boots and booted the committed slot; the trial is cleared.
    FellBack {
        /// The slot whose update failed.
        failed: Slot,
        /// The slot running (the committed one).
        running: Slot,
    },
}

/// What a health probe of the trial slot's agent found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Healthy: commit the slot.
    Ok,
    /// Not (yet) answering: probe again until the timeout.
    NotYet,
    /// The agent is not running: the trial failed, no need to wait.
    Down,
}

/// The boot check (module docs). `healthy` is polled every `poll` until `timeout` passes.
pub fn boot_check(
    sys: &System,
    mut healthy: impl FnMut() -> Health,
    timeout: Duration,
    poll: Duration,
) -> Result<BootCheck, UpdateError> {
    let booted = slots::booted(&sys.cmdline)?;
    let env_path = sys.grubenv();
    let mut env = grubenv::read(&env_path)?;
    let state = BootState::of(&env);
    match state.trial {
        None => Ok(BootCheck::Normal(booted)),
        Some(t) if t == booted => {
            let deadline = Instant::now() + timeout;
            let ok = loop {
                match healthy() {
                    Health::Ok => break true,
                    Health::Down => break false,
                    Health::NotYet => {}
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(poll.min(deadline.saturating_duration_since(Instant::now())));
            };
            if !ok {
                sys.record(
                    "update_trial_failed",
                    &[
                        ("slot", t.letter().into()),
                        ("tries_left", state.tries.to_string()),
                        ("version", sys.image_version.to_string()),
                    ],
                )?;
                return Ok(BootCheck::TrialFailed {
                    slot: t,
                    tries_left: state.tries,
                });
            }
            env.set(VAR_SLOT, t.letter());
            env.set(VAR_TRY, "");
            env.set(VAR_TRIES, "0");
            grubenv::write_in_place(&env_path, &env)?;
            sys.raise_floor(sys.image_version)?;
            sys.record(
                "update_committed",
                &[
                    ("slot", t.letter().into()),
                    ("version", sys.image_version.to_string()),
                ],
            )?;
            Ok(BootCheck::Committed {
                slot: t,
                version: sys.image_version,
            })
        }
        Some(t) => {
            env.set(VAR_TRY, "");
            env.set(VAR_TRIES, "0");
            grubenv::write_in_place(&env_path, &env)?;
            sys.record(
                "update_fell_back",
                &[
                    ("failed_slot", t.letter().into()),
                    ("running_slot", booted.letter().into()),
                    ("version", sys.image_version.to_string()),
                ],
            )?;
            Ok(BootCheck::FellBack {
                failed: t,
                running: booted,
            })
        }
    }
}

#[cfg(test)]
mod tests;
