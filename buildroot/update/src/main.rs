//! `mayfly-update`: the vendor's bundle tool and the appliance's installer and boot check.
//!
//! Vendor side: `keygen STEM`, `pack`, `inspect`. Appliance side (dom0, root): `install
//! BUNDLE`, `boot-check` (run by `/etc/init.d/S60mayfly-update` at every boot), `status`.
//! Exit codes: 0 done, 1 error, 2 bundle refused (nothing written).
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mayfly_update::mount::Mounted;
use mayfly_update::{bundle, slots, BootCheck, Health, System, UpdateError};

#[derive(Parser)]
#[command(name = "mayfly-update", version, about = "Mayfly's signed A/B update")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the appliance keeps what the installer reads (overridable for tests and hosts).
#[derive(clap::Args)]
struct Paths {
    /// The kernel command line (names the booted slot's root=PARTUUID=).
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline_file: PathBuf,
    /// The running image's description (its image_version= line).
    #[arg(long, default_value = "/etc/mayfly/image-info")]
    image_info: PathBuf,
    /// The vendor's update key (64 hex digits), pinned in the image.
    #[arg(long, default_value = "/etc/mayfly/update-key.pub")]
    update_key: PathBuf,
    /// Version floor and events.log, on the data partition.
    #[arg(long, default_value = "/var/lib/mayfly/update")]
    state_dir: PathBuf,
    /// An already mounted EFI system partition; by default the partition labelled MAYFLY-ESP
    /// is mounted on /run/mayfly-esp for the operation and unmounted after it.
    #[arg(long)]
    esp: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generates the vendor's update key pair: STEM.key (PKCS#8, 0600) and STEM.pub (hex).
    Keygen {
        /// Path without extension.
        stem: PathBuf,
    },
    /// Writes a signed bundle of a new boot chain (docs/formats.md, "Update bundle").
    Pack {
        /// The vendor's private update key (PKCS#8 file, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// The image version (must be above every installed appliance's floor).
        #[arg(long)]
        version: u64,
        /// dom0's root file system (squashfs).
        #[arg(long)]
        rootfs: PathBuf,
        /// The Xen hypervisor (multiboot2 image).
        #[arg(long)]
        xen: PathBuf,
        /// The dom0 kernel.
        #[arg(long)]
        vmlinux: PathBuf,
        /// The expected PCR values of the new boot chain (docs/formats.md, "Expected PCRs").
        #[arg(long)]
        pcrs: PathBuf,
        /// Output file.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Verifies a bundle's signature and hashes and prints its manifest.
    Inspect {
        /// The vendor's public update key (hex or a file holding it).
        #[arg(long)]
        update_key: String,
        /// The bundle.
        bundle: PathBuf,
    },
    /// Verifies BUNDLE, writes it to the inactive slot and arms a trial boot of it.
    Install {
        #[command(flatten)]
        paths: Paths,
        /// Trial boots before GRUB falls back to the running slot (1..=3).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
        tries: u8,
        /// The inactive slot's block device (default: found by its GPT partition GUID).
        #[arg(long)]
        slot_device: Option<PathBuf>,
        /// The bundle (a file, or a block device holding one).
        bundle: PathBuf,
    },
    /// At boot: commits a healthy trial slot, reports a failed trial or a fallback.
    BootCheck {
        #[command(flatten)]
        paths: Paths,
        /// How long a trial slot's agent has to answer /v1/health.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// The agent's API address.
        #[arg(long, default_value = "127.0.0.1:8450")]
        api: SocketAddr,
        /// Reboot when the trial slot failed (GRUB then counts the next try or falls back).
        #[arg(long)]
        reboot: bool,
        /// The agent's pid file: when it names no running process the trial fails at once.
        #[arg(long)]
        agent_pidfile: Option<PathBuf>,
    },
    /// Prints the booted slot and the A/B state.
    Status {
        #[command(flatten)]
        paths: Paths,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mayfly-update: {e:#}");
            // A refused bundle exits 2; a refused moment (a trial pending, a running slot
            // that is not the committed one) is an error like any other (1).
            let refused = e.chain().any(|c| {
                c.downcast_ref::<UpdateError>()
                    .and_then(UpdateError::refusal_code)
                    .is_some_and(|code| !matches!(code, "trial_pending" | "not_committed"))
            });
            ExitCode::from(if refused { 2 } else { 1 })
        }
    }
}

/// The EFI partition for one operation: the given directory, else MAYFLY-ESP mounted on
/// /run/mayfly-esp.
fn esp(given: &Option<PathBuf>, writable: bool) -> Result<Mounted> {
    Ok(match given {
        Some(dir) => Mounted::given(dir),
        None => Mounted::by_label(
            "MAYFLY-ESP",
            Some("vfat"),
            Path::new("/run/mayfly-esp"),
            writable,
        )?,
    })
}

fn system(p: &Paths, esp: &Mounted) -> Result<System> {
    Ok(System::load(
        &p.cmdline_file,
        &p.image_info,
        &p.update_key,
        &p.state_dir,
        esp.dir(),
    )?)
}

/// The agent's health: its process (when a pid file is named) and GET /v1/health.
fn health(api: SocketAddr, pidfile: Option<&Path>) -> Health {
    if let Some(p) = pidfile {
        let running = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !running {
            return Health::Down;
        }
    }
    if healthy(api) {
        Health::Ok
    } else {
        Health::NotYet
    }
}

/// GET /v1/health answers 200 with `"status":"ok"`.
fn healthy(api: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut body = Vec::new();
        s.take(64 << 10).read_to_end(&mut body)?;
        let text = String::from_utf8_lossy(&body);
        Ok(text.starts_with("HTTP/1.1 200") && text.contains("\"status\":\"ok\""))
    };
    probe().unwrap_or(false)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Keygen { stem } => {
            let public = mayfly_command::keyfile::generate(&stem)?;
            println!("{}", bundle::hex(&public));
        }
        Cmd::Pack {
            key,
            version,
            rootfs,
            xen,
            vmlinux,
            pcrs,
            out,
        } => {
            let pair = mayfly_command::keyfile::load_private(&key)?;
            let open = |p: &Path| File::open(p).with_context(|| format!("opening {}", p.display()));
            let mut parts = vec![
                ("rootfs".to_owned(), open(&rootfs)?),
                ("xen".to_owned(), open(&xen)?),
                ("vmlinux".to_owned(), open(&vmlinux)?),
                ("pcrs".to_owned(), open(&pcrs)?),
            ];
            let tmp = out.with_extension("partial");
            let mut w = std::io::BufWriter::new(
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
            );
            let m = bundle::write_bundle(&pair, bundle::PRODUCT, version, &mut parts, &mut w)?;
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &out)
                .with_context(|| format!("renaming to {}", out.display()))?;
            print_manifest(&m);
        }
        Cmd::Inspect {
            update_key,
            bundle: path,
        } => {
            let key = mayfly_command::keyfile::parse_public(&update_key)?;
            let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let len = f.metadata()?.len();
            let v = bundle::open_verified(&mut f, len, true, &key).map_err(UpdateError::from)?;
            bundle::check_parts(&mut f, &v).map_err(UpdateError::from)?;
            print_manifest(&v.manifest);
            println!("signature and hashes verified");
        }
        Cmd::Install {
            paths,
            tries,
            slot_device,
            bundle: path,
        } => {
            let esp = esp(&paths.esp, true)?;
            let sys = system(&paths, &esp)?;
            let i = mayfly_update::install(
                &sys,
                &path,
                |slot| match &slot_device {
                    Some(d) => Ok(d.clone()),
                    None => slots::device(slot, Path::new("/sys/class/block"), Path::new("/dev")),
                },
                tries,
                mayfly_update::reseal_with_agent,
            )?;
            println!(
                "mayfly-update: version {} written to slot {}; it boots next ({} tries before falling back to slot {})",
                i.version,
                i.slot.letter(),
                i.tries,
                i.slot.other().letter()
            );
        }
        Cmd::BootCheck {
            paths,
            timeout,
            api,
            reboot,
            agent_pidfile,
        } => {
            let esp = esp(&paths.esp, true)?;
            let sys = system(&paths, &esp)?;
            let out = mayfly_update::boot_check(
                &sys,
                || health(api, agent_pidfile.as_deref()),
                Duration::from_secs(timeout),
                Duration::from_secs(2),
            )?;
            drop(esp);
            match out {
                BootCheck::Normal(s) => println!("mayfly-update: slot {} (committed)", s.letter()),
                BootCheck::Committed { slot, version } => println!(
                    "mayfly-update: slot {} (version {version}) is healthy and now committed",
                    slot.letter()
                ),
                BootCheck::FellBack { failed, running } => println!(
                    "mayfly-update: UPDATE FAILED: slot {} did not come up healthy in its trial boots; fell back to slot {}",
                    failed.letter(),
                    running.letter()
                ),
                BootCheck::TrialFailed { slot, tries_left } => {
                    println!(
                        "mayfly-update: trial boot of slot {} failed: the agent was not healthy within {timeout} s; {tries_left} tries left",
                        slot.letter()
                    );
                    if reboot {
                        println!("mayfly-update: rebooting");
                        let _ = std::io::stdout().flush();
                        let st = Command::new("reboot").status().context("running reboot")?;
                        if !st.success() {
                            bail!("reboot failed");
                        }
                    }
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Cmd::Status { paths } => {
            let esp = esp(&paths.esp, false)?;
            let st = mayfly_update::status(&system(&paths, &esp)?)?;
            println!("booted_slot={}", st.booted.letter());
            println!("committed_slot={}", st.state.committed.letter());
            println!(
                "trial_slot={}",
                st.state.trial.map(|s| s.letter()).unwrap_or("")
            );
            println!("trial_tries_left={}", st.state.tries);
            println!("image_version={}", st.image_version);
            println!("version_floor={}", st.floor);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_manifest(m: &bundle::Manifest) {
    println!("product={}", m.product);
    println!("version={}", m.version);
    for p in &m.parts {
        println!(
            "part={} size={} sha256={}",
            p.name,
            p.size,
            bundle::hex(&p.sha256)
        );
    }
}
