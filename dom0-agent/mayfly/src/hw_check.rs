//! `mayfly hw-check`: checks this host against a supported server profile (`hw/profiles`).
//!
//! Prints one line per requirement with its status and the reason (a table, or JSON with
//! `--json`) and exits 0 if every required requirement passed, 1 if one failed or could not
//! be established, 2 for an unknown profile, 3 if the host's files could not be read.
//! The facts and judgements come from `mayfly-hw`; this module only chooses the profile,
//! renders the report and maps the verdict to the exit status.
//!
//! In a Xen dom0 the physical facts come from Xen through a [`XenPhysInfoSource`]:
//! [`LibxenctrlSource`] first (`xc_physinfo` and `XENVER_commandline` through the run-time
//! loaded bindings of `mayfly-xen`; no xenstored needed), then [`XlInfoSource`] (`xl info`)
//! if libxenctrl cannot be loaded or opened. Against a fixture tree (`--root` other than `/`)
//! only `xl` is asked, since the running hypervisor says nothing about the fixture. If every
//! source fails, the checks that need Xen's facts say "unknown" with the errors.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use mayfly_hw::check::{self, Report, Status};
use mayfly_hw::host::{HostFacts, HostFs};
use mayfly_hw::profile::{self, ProfileError};
use mayfly_hw::xen::{XenInfoError, XenPhysInfo, XenPhysInfoSource, XlInfoSource};

/// Exit status: every required requirement passed.
const EXIT_PASS: u8 = 0;
/// Exit status: a required requirement failed or is unknown.
const EXIT_FAIL: u8 = 1;
/// Exit status: unknown profile.
const EXIT_USAGE: u8 = 2;

/// Arguments of `mayfly hw-check`.
#[derive(clap::Args)]
#[command(after_help = "\
Profiles are compiled in from hw/profiles/*.toml (list them with --list-profiles).

Where the facts come from: on Linux without Xen (bare metal before installation, or any VM),
/proc/cpuinfo flags (vmx/svm, ept/npt), /proc/meminfo MemTotal, /sys/class/iommu and the ACPI
DMAR/IVRS tables, /sys/class/tpm and /dev/tpmrm0; the Xen checks are N/A. In a Xen dom0 the
CPU flags, memory and CPU count are dom0's own, so the physical facts come from Xen:
/sys/hypervisor, /proc/xen/capabilities, and Xen's physinfo and command line, asked through
libxenctrl (loaded at run time), or through `xl info` (needs xenstored running) when
libxenctrl is unavailable. If both fail, EPT/NPT, memory, CPU count and the Xen command line
are UNKNOWN, with the errors.

Exit status:
  0  every required requirement passed (recommended ones may warn)
  1  a required requirement failed or could not be established (UNKNOWN)
  2  usage error, including an unknown profile
  3  the host's files could not be read")]
pub struct HwCheckArgs {
    /// The profile to check against (see --list-profiles).
    #[arg(long, value_name = "NAME", default_value = "production")]
    profile: String,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// List the known profiles and exit.
    #[arg(long)]
    list_profiles: bool,
    /// Read /proc, /sys and /dev under DIR instead of / (for checking a copy of a host's
    /// files, and for tests).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// The xl program asked for Xen's physical view (`xl info`) when running in a Xen dom0.
    #[arg(long, value_name = "PATH", default_value = "xl")]
    xl: PathBuf,
    /// The agent's data directory, whose files say which key source signs the ledger
    /// (reported, not judged): `tpm` (signing.sealed) or `file` (signing.key).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/mayfly")]
    data_dir: PathBuf,
}

/// Where Xen's physical facts come from in this build (see the module docs).
fn phys_info_source(args: &HwCheckArgs) -> impl XenPhysInfoSource {
    FirstAnswer {
        libxenctrl: (args.root == std::path::Path::new("/")).then_some(LibxenctrlSource),
        xl: XlInfoSource::new(&args.xl),
    }
}

/// Xen's physical facts through libxenctrl (`xc_physinfo`, `XENVER_commandline`).
pub struct LibxenctrlSource;

impl XenPhysInfoSource for LibxenctrlSource {
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError> {
        let libs = mayfly_xen::Libraries::load().map_err(|e| XenInfoError::LibraryMissing {
            library: e.to_string(),
        })?;
        let failed = |e: mayfly_xen::CtrlError| XenInfoError::Libxenctrl(chain(&e));
        let control = mayfly_xen::Control::open(libs).map_err(failed)?;
        let phys = control.physinfo().map_err(failed)?;
        let cmdline = control.xen_cmdline().map_err(failed)?;
        Ok(Some(XenPhysInfo {
            hvm: phys.hvm,
            hap: phys.hap,
            iommu: phys.iommu,
            nr_cpus: phys.nr_cpus,
            total_memory_mib: phys.total_memory_mib(),
            xen_cmdline: Some(cmdline),
        }))
    }
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// libxenctrl when it answers, else `xl info`; both errors when neither does.
struct FirstAnswer {
    libxenctrl: Option<LibxenctrlSource>,
    xl: XlInfoSource,
}

impl XenPhysInfoSource for FirstAnswer {
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError> {
        let first = match &self.libxenctrl {
            Some(lib) => match lib.phys_info() {
                Ok(Some(phys)) => return Ok(Some(phys)),
                Ok(None) => None,
                Err(e) => Some(e),
            },
            None => None,
        };
        match (self.xl.phys_info(), first) {
            (Err(xl), Some(lib)) => Err(XenInfoError::Both {
                libxenctrl: Box::new(lib),
                xl: Box::new(xl),
            }),
            (answer, _) => answer,
        }
    }
}

/// Runs the command; the `u8` is the exit status.
pub fn run(args: &HwCheckArgs) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    if args.list_profiles {
        for p in profile::shipped().context("a shipped profile is malformed")? {
            writeln!(out, "{:<12} {}", p.name, p.summary)?;
        }
        return Ok(EXIT_PASS);
    }
    let profile = match profile::shipped_profile(&args.profile) {
        Ok(p) => p,
        Err(e @ ProfileError::Unknown { .. }) => {
            eprintln!("mayfly hw-check: {e}");
            return Ok(EXIT_USAGE);
        }
        Err(e) => return Err(e).context("a shipped profile is malformed"),
    };
    let fs = HostFs::new(&args.root);
    let facts = HostFacts::gather(&fs).context("cannot inspect the host")?;
    let (phys, unavailable) = if facts.xen.as_ref().is_some_and(|x| x.dom0) {
        match phys_info_source(args).phys_info() {
            Ok(Some(phys)) => (Some(phys), None),
            Ok(None) => (None, Some("the source has no answer".to_owned())),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };
    let report = check::evaluate_with(&profile, &facts, phys.as_ref(), unavailable.as_deref());
    let key = mayfly_hw::keysource::key_source(&args.data_dir);
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("key_source".into(), serde_json::to_value(&key)?);
        }
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
    } else {
        write_table(&mut out, &report)?;
        writeln!(out, "key source:  {} ({})", key.source, key.detail)?;
    }
    Ok(if report.passed { EXIT_PASS } else { EXIT_FAIL })
}

fn write_table(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    writeln!(out, "profile:     {} ({})", report.profile, report.summary)?;
    let env = match report.environment {
        check::Environment::Linux if report.virtual_machine => "Linux in a virtual machine",
        check::Environment::Linux => "Linux, not under Xen",
        check::Environment::XenDom0 => "Xen dom0",
        check::Environment::XenGuest => "Xen guest (not dom0)",
    };
    writeln!(out, "environment: {env}")?;
    if let Some(cpu) = &report.cpu {
        writeln!(out, "cpu:         {cpu}")?;
    }
    if let Some(xen) = &report.xen_version {
        writeln!(out, "xen:         {xen}")?;
    }
    if let Some(phys) = &report.xen_physinfo {
        writeln!(
            out,
            "xen physinfo: {} logical CPUs, {} MiB, hvm {}, hap {}, iommu {}",
            phys.nr_cpus, phys.total_memory_mib, phys.hvm, phys.hap, phys.iommu
        )?;
    } else if let Some(why) = &report.xen_physinfo_error {
        writeln!(out, "xen physinfo: unavailable: {why}")?;
    }
    writeln!(out)?;
    let width = report
        .results
        .iter()
        .map(|r| r.title.len())
        .max()
        .unwrap_or(0);
    writeln!(
        out,
        "{:<8} {:<12} {:<width$}  REASON",
        "STATUS", "LEVEL", "REQUIREMENT"
    )?;
    for r in &report.results {
        let level = match r.level {
            profile::Level::Required => "required",
            profile::Level::Recommended => "recommended",
            profile::Level::Ignored => "ignored",
        };
        writeln!(
            out,
            "{:<8} {:<12} {:<width$}  {}",
            r.status.label(),
            level,
            r.title,
            r.reason
        )?;
    }
    let blocking = report
        .results
        .iter()
        .filter(|r| {
            r.level == profile::Level::Required
                && matches!(r.status, Status::Fail | Status::Unknown)
        })
        .count();
    writeln!(out)?;
    if report.passed {
        writeln!(out, "result: PASS (profile {})", report.profile)
    } else {
        writeln!(
            out,
            "result: FAIL (profile {}): {blocking} required requirement(s) failed or unknown",
            report.profile
        )
    }
}
