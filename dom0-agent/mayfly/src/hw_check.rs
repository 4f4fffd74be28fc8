//! `mayfly hw-check`: checks this host against a supported server profile (`hw/profiles`).
//!
//! Prints one line per requirement with its status and the reason (a table, or JSON with
//! `--json`) and exits 0 if every required requirement passed, 1 if one failed or could not
//! be established, 2 for an unknown profile, 3 if the host's files could not be read.
//! The facts and judgements come from `mayfly-hw`; this module only chooses the profile,
//! renders the report and maps the verdict to the exit status.
//!
//! In a Xen dom0 the physical facts come from Xen through a [`XenPhysInfoSource`]: today
//! [`XlInfoSource`], which runs `xl info` (needs xenstored). When the libxenctrl bindings
//! (`mayfly-xen`) are merged, [`phys_info_source`] can return a source over `xc_physinfo` and
//! `xc_version` instead, with no dependency on xenstored; nothing else changes. If the source
//! fails, the checks that need it say "unknown" with its error.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use mayfly_hw::check::{self, Report, Status};
use mayfly_hw::host::{HostFacts, HostFs};
use mayfly_hw::profile::{self, ProfileError};
use mayfly_hw::xen::{XenPhysInfoSource, XlInfoSource};

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
/sys/hypervisor, /proc/xen/capabilities, and `xl info` (Xen's physinfo and command line; xl
needs xenstored running). If `xl info` fails, EPT/NPT, memory, CPU count and the Xen command
line are UNKNOWN, with its error.

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
}

/// Where Xen's physical facts come from in this build (see the module docs).
fn phys_info_source(args: &HwCheckArgs) -> impl XenPhysInfoSource {
    XlInfoSource::new(&args.xl)
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
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write_table(&mut out, &report)?;
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
