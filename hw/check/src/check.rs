//! Judging a host's facts against a profile: one result per requirement, each with its
//! status and the reason, and a verdict.
//!
//! Where the facts come from depends on what the checker runs in ([`Environment`]):
//! - **Linux** (bare metal before installation, or any Linux VM): `/proc/cpuinfo` flags,
//!   `MemTotal`, the kernel's IOMMU and TPM devices. Xen settings are "not applicable".
//! - **Xen dom0**: the hardware virtualization flags are hidden from a PV dom0 and its memory
//!   and CPUs are its own allocation, so the physical facts come from Xen: its capabilities
//!   string in sysfs and, when a [`XenPhysInfoSource`] answers, `xc_physinfo`. Without one,
//!   the checks that need it are "unknown" and say so. The running Xen version and both
//!   command lines are checked against the profile.
//! - **Xen guest** (not dom0): the hardware is not visible; hardware checks are "unknown".
//!
//! The verdict passes only if every *required* requirement passes: "unknown" does not pass.

use serde::Serialize;

use crate::host::{CpuFacts, HostFacts};
use crate::profile::{Level, Profile, Version};
use crate::xen::XenPhysInfo;

/// MemTotal is below the installed memory (firmware and kernel reservations, typically 2–4 %),
/// so the memory check accepts MemTotal down to this share of the minimum, in percent.
pub const MEMTOTAL_SLACK_PERCENT: u64 = 95;

/// What the checker runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Environment {
    /// Linux not under Xen: bare metal or a virtual machine of another hypervisor.
    Linux,
    /// Xen's control domain.
    XenDom0,
    /// A Xen guest other than dom0.
    XenGuest,
}

/// The outcome of one requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Met.
    Pass,
    /// A recommended requirement is not met.
    Warn,
    /// A required requirement is not met.
    Fail,
    /// Could not be established here (the reason says why).
    Unknown,
    /// Does not apply in this environment, or the profile ignores it.
    NotApplicable,
}

impl Status {
    /// The label printed in the human table.
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Unknown => "UNKNOWN",
            Status::NotApplicable => "N/A",
        }
    }
}

/// One requirement's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequirementResult {
    /// Stable identifier (`hardware_virtualization`, `hap`, `iommu`, `tpm2`, `memory`,
    /// `logical_cpus`, `xen_version`, `xen_cmdline`, `dom0_cmdline`).
    pub id: &'static str,
    /// What is required, for people.
    pub title: String,
    /// How much the profile cares.
    pub level: Level,
    /// The outcome.
    pub status: Status,
    /// Why: the evidence, or what is missing and where it was looked for.
    pub reason: String,
}

/// The whole check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The profile's name.
    pub profile: String,
    /// The profile's summary.
    pub summary: String,
    /// What the checker ran in.
    pub environment: Environment,
    /// The kernel reports running in a virtual machine (`hypervisor` CPU flag) and is not
    /// a Xen dom0.
    pub virtual_machine: bool,
    /// CPU vendor and model as the kernel reports them.
    pub cpu: Option<String>,
    /// Xen's version, under Xen.
    pub xen_version: Option<String>,
    /// Xen's physical view, when a source answered.
    pub xen_physinfo: Option<XenPhysInfo>,
    /// Why Xen's physical view is missing in dom0, when it is.
    pub xen_physinfo_error: Option<String>,
    /// One result per requirement, in a fixed order.
    pub results: Vec<RequirementResult>,
    /// Every required requirement passed.
    pub passed: bool,
}

/// Whether a fact is met, and why.
enum Finding {
    Met(String),
    NotMet(String),
    Unknown(String),
}

fn judge(
    id: &'static str,
    title: impl Into<String>,
    level: Level,
    finding: impl FnOnce() -> Finding,
) -> RequirementResult {
    let title = title.into();
    if level == Level::Ignored {
        return RequirementResult {
            id,
            title,
            level,
            status: Status::NotApplicable,
            reason: "ignored by this profile".to_owned(),
        };
    }
    let (status, reason) = match finding() {
        Finding::Met(r) => (Status::Pass, r),
        Finding::NotMet(r) if level == Level::Required => (Status::Fail, r),
        Finding::NotMet(r) => (Status::Warn, r),
        Finding::Unknown(r) => (Status::Unknown, r),
    };
    RequirementResult {
        id,
        title,
        level,
        status,
        reason,
    }
}

fn not_applicable(id: &'static str, title: &str, level: Level, reason: &str) -> RequirementResult {
    RequirementResult {
        id,
        title: title.to_owned(),
        level,
        status: Status::NotApplicable,
        reason: reason.to_owned(),
    }
}

const NO_CPUINFO: &str = "/proc/cpuinfo is missing: CPU features cannot be read";
const XEN_GUEST: &str = "running in a Xen guest that is not dom0: the hardware is not visible";
const NOT_UNDER_XEN: &str = "not running under Xen: this run checks the hardware for \
    installation; Xen settings are checked from the appliance's dom0";

fn vm_note(cpu: &CpuFacts) -> &'static str {
    if cpu.in_virtual_machine() {
        "; this host is itself a virtual machine ('hypervisor' CPU flag) and its hypervisor \
         does not pass this feature through"
    } else {
        "; it is absent or disabled in the firmware setup"
    }
}

struct Context<'a> {
    facts: &'a HostFacts,
    env: Environment,
    phys: Option<&'a XenPhysInfo>,
    /// Why Xen's physical view is missing, for the reasons.
    no_phys: String,
}

impl Context<'_> {
    fn virtualization(&self) -> Finding {
        match self.env {
            Environment::XenGuest => Finding::Unknown(XEN_GUEST.to_owned()),
            Environment::XenDom0 => {
                if let Some(phys) = self.phys {
                    return if phys.hvm {
                        Finding::Met("Xen physinfo reports the hvm capability".to_owned())
                    } else {
                        Finding::NotMet(
                            "Xen physinfo lacks the hvm capability: VT-x/AMD-V absent or \
                             disabled in the firmware"
                                .to_owned(),
                        )
                    };
                }
                let xen = self.facts.xen.as_ref();
                let caps = xen.and_then(|x| x.capabilities.clone()).unwrap_or_default();
                match xen.and_then(|x| x.offers_hvm()) {
                    Some(true) => Finding::Met(format!(
                        "Xen offers HVM guests (/sys/hypervisor/properties/capabilities: {caps})"
                    )),
                    Some(false) => Finding::NotMet(format!(
                        "Xen offers no HVM guests (/sys/hypervisor/properties/capabilities: \
                         {caps}): VT-x/AMD-V absent or disabled in the firmware"
                    )),
                    None => Finding::Unknown(format!(
                        "/sys/hypervisor/properties/capabilities is missing and {}",
                        self.no_phys
                    )),
                }
            }
            Environment::Linux => match &self.facts.cpu {
                None => Finding::Unknown(NO_CPUINFO.to_owned()),
                Some(cpu) if cpu.has("vmx") => {
                    Finding::Met("vmx flag (Intel VT-x) in /proc/cpuinfo".to_owned())
                }
                Some(cpu) if cpu.has("svm") => {
                    Finding::Met("svm flag (AMD-V) in /proc/cpuinfo".to_owned())
                }
                Some(cpu) => Finding::NotMet(format!(
                    "neither vmx (VT-x) nor svm (AMD-V) in /proc/cpuinfo{}",
                    vm_note(cpu)
                )),
            },
        }
    }

    fn hap(&self) -> Finding {
        match self.env {
            Environment::XenGuest => Finding::Unknown(XEN_GUEST.to_owned()),
            Environment::XenDom0 => match self.phys {
                Some(phys) if phys.hap => {
                    Finding::Met("Xen physinfo reports the hap capability".to_owned())
                }
                Some(_) => Finding::NotMet(
                    "Xen physinfo lacks the hap capability: no EPT/NPT, the VM-fork clone \
                     path is unavailable"
                        .to_owned(),
                ),
                None => Finding::Unknown(format!(
                    "a PV dom0 cannot see EPT/NPT in /proc/cpuinfo; {}",
                    self.no_phys
                )),
            },
            Environment::Linux => match &self.facts.cpu {
                None => Finding::Unknown(NO_CPUINFO.to_owned()),
                Some(cpu) if cpu.has("ept") => {
                    Finding::Met("ept flag (Intel EPT) in /proc/cpuinfo".to_owned())
                }
                Some(cpu) if cpu.has("npt") => {
                    Finding::Met("npt flag (AMD NPT) in /proc/cpuinfo".to_owned())
                }
                Some(cpu) => Finding::NotMet(format!(
                    "neither ept (Intel EPT) nor npt (AMD NPT) in /proc/cpuinfo{}",
                    vm_note(cpu)
                )),
            },
        }
    }

    fn iommu(&self) -> Finding {
        let iommu = &self.facts.iommu;
        if self.env == Environment::XenGuest {
            return Finding::Unknown(XEN_GUEST.to_owned());
        }
        if let (Environment::XenDom0, Some(phys)) = (self.env, self.phys) {
            return if phys.iommu {
                Finding::Met(
                    "Xen physinfo reports the directio capability (IOMMU in use)".to_owned(),
                )
            } else {
                Finding::NotMet(
                    "Xen physinfo lacks the directio capability: Xen runs without an IOMMU"
                        .to_owned(),
                )
            };
        }
        let mut evidence = Vec::new();
        if !iommu.sysfs_units.is_empty() {
            evidence.push(format!("/sys/class/iommu: {}", iommu.sysfs_units.join(" ")));
        }
        for table in &iommu.acpi_tables {
            evidence.push(match table.as_str() {
                "DMAR" => "ACPI DMAR table (VT-d)".to_owned(),
                "IVRS" => "ACPI IVRS table (AMD-Vi)".to_owned(),
                "XMAR" => "ACPI DMAR table, renamed XMAR by Xen (VT-d)".to_owned(),
                other => format!("ACPI {other} table"),
            });
        }
        if !evidence.is_empty() {
            return Finding::Met(evidence.join("; "));
        }
        let note = match (&self.facts.cpu, self.env) {
            (Some(cpu), Environment::Linux) => vm_note(cpu),
            _ => "; it is absent or disabled in the firmware setup",
        };
        Finding::NotMet(format!(
            "no entry in /sys/class/iommu and no ACPI DMAR (VT-d) or IVRS (AMD-Vi) table{note}"
        ))
    }

    fn tpm2(&self) -> Finding {
        let tpm = &self.facts.tpm;
        if tpm.devices.is_empty() {
            return Finding::NotMet(
                "no device in /sys/class/tpm: no TPM, disabled in the firmware, or no kernel \
                 driver for it"
                    .to_owned(),
            );
        }
        let v2: Vec<&str> = tpm
            .devices
            .iter()
            .filter(|d| d.version_major == Some(2))
            .map(|d| d.name.as_str())
            .collect();
        if v2.is_empty() {
            let seen: Vec<String> = tpm
                .devices
                .iter()
                .map(|d| match d.version_major {
                    Some(v) => format!("{} is TPM {v}.x", d.name),
                    None => format!("{} has no tpm_version_major", d.name),
                })
                .collect();
            return Finding::NotMet(format!("no TPM 2.0: {}", seen.join(", ")));
        }
        if !tpm.resource_manager {
            return Finding::NotMet(format!(
                "{} is TPM 2.0 but /dev/tpmrm0 (the kernel's resource manager) is missing",
                v2.join(" ")
            ));
        }
        Finding::Met(format!(
            "{} reports tpm_version_major 2; /dev/tpmrm0 present",
            v2.join(" ")
        ))
    }

    fn memory(&self, min_mib: u64) -> Finding {
        let needed_kib = min_mib.saturating_mul(1024);
        let floor_kib = needed_kib.saturating_mul(MEMTOTAL_SLACK_PERCENT) / 100;
        match self.env {
            Environment::XenGuest => Finding::Unknown(XEN_GUEST.to_owned()),
            Environment::XenDom0 => match self.phys {
                Some(phys) if phys.total_memory_mib.saturating_mul(1024) >= floor_kib => {
                    Finding::Met(format!(
                        "Xen physinfo: {} MiB of machine memory (needs {min_mib} MiB; accepted \
                         down to {MEMTOTAL_SLACK_PERCENT}% of it)",
                        phys.total_memory_mib
                    ))
                }
                Some(phys) => Finding::NotMet(format!(
                    "Xen physinfo: {} MiB of machine memory, below {min_mib} MiB (accepted down \
                     to {MEMTOTAL_SLACK_PERCENT}%: {} MiB)",
                    phys.total_memory_mib,
                    floor_kib / 1024
                )),
                None => Finding::Unknown(format!(
                    "dom0's MemTotal ({} MiB) is its own allocation, not the machine's; {}",
                    self.facts.mem_total_kib.unwrap_or(0) / 1024,
                    self.no_phys
                )),
            },
            Environment::Linux => match self.facts.mem_total_kib {
                None => Finding::Unknown("no MemTotal in /proc/meminfo".to_owned()),
                Some(kib) if kib >= floor_kib => Finding::Met(format!(
                    "MemTotal {} MiB (needs {min_mib} MiB; MemTotal is accepted down to \
                     {MEMTOTAL_SLACK_PERCENT}% of it)",
                    kib / 1024
                )),
                Some(kib) => Finding::NotMet(format!(
                    "MemTotal {} MiB, below {min_mib} MiB (accepted down to \
                     {MEMTOTAL_SLACK_PERCENT}%: {} MiB)",
                    kib / 1024,
                    floor_kib / 1024
                )),
            },
        }
    }

    fn cpus(&self, min: u32) -> Finding {
        match self.env {
            Environment::XenGuest => Finding::Unknown(XEN_GUEST.to_owned()),
            Environment::XenDom0 => match self.phys {
                Some(phys) if phys.nr_cpus >= min => {
                    Finding::Met(format!("Xen physinfo: {} logical CPUs", phys.nr_cpus))
                }
                Some(phys) => Finding::NotMet(format!(
                    "Xen physinfo: {} logical CPUs, fewer than {min}",
                    phys.nr_cpus
                )),
                None => Finding::Unknown(format!(
                    "dom0 sees only its own vCPUs ({}); {}",
                    self.facts.cpu.as_ref().map_or(0, |c| c.logical_cpus),
                    self.no_phys
                )),
            },
            Environment::Linux => match &self.facts.cpu {
                None => Finding::Unknown(NO_CPUINFO.to_owned()),
                Some(cpu) if cpu.logical_cpus >= min => Finding::Met(format!(
                    "{} logical CPUs in /proc/cpuinfo",
                    cpu.logical_cpus
                )),
                Some(cpu) => Finding::NotMet(format!(
                    "{} logical CPUs in /proc/cpuinfo, fewer than {min}",
                    cpu.logical_cpus
                )),
            },
        }
    }

    fn xen_version(&self, min: Version) -> Finding {
        let Some(xen) = &self.facts.xen else {
            return Finding::Unknown("/sys/hypervisor/type is not xen".to_owned());
        };
        match (xen.version_major_minor, &xen.version) {
            (Some((major, minor)), Some(text)) => {
                if (Version { major, minor }) >= min {
                    Finding::Met(format!("Xen {text} (/sys/hypervisor/version)"))
                } else {
                    Finding::NotMet(format!("Xen {text}, older than {min}"))
                }
            }
            _ => Finding::Unknown("/sys/hypervisor/version/{major,minor} unreadable".to_owned()),
        }
    }

    fn xen_cmdline(&self, wanted: &str) -> Finding {
        match self.phys.and_then(|p| p.xen_cmdline.as_deref()) {
            Some(running) => cmdline_finding("Xen", wanted, running),
            None => Finding::Unknown(format!(
                "the running Xen command line comes from Xen too; {}",
                self.no_phys
            )),
        }
    }

    fn dom0_cmdline(&self, wanted: &str) -> Finding {
        match &self.facts.kernel_cmdline {
            Some(running) => cmdline_finding("dom0 kernel", wanted, running),
            None => Finding::Unknown("/proc/cmdline is missing".to_owned()),
        }
    }
}

/// Every setting of `wanted` must appear verbatim among `running`'s settings.
fn cmdline_finding(whose: &str, wanted: &str, running: &str) -> Finding {
    let have: Vec<&str> = running.split_whitespace().collect();
    let missing: Vec<&str> = wanted
        .split_whitespace()
        .filter(|setting| !have.contains(setting))
        .collect();
    if missing.is_empty() {
        Finding::Met(format!("{whose} command line has every profile setting"))
    } else {
        Finding::NotMet(format!(
            "{whose} command line lacks: {} (running: {running})",
            missing.join(" ")
        ))
    }
}

/// Judges `facts` (and Xen's physical view, if known) against `profile`.
pub fn evaluate(profile: &Profile, facts: &HostFacts, phys: Option<&XenPhysInfo>) -> Report {
    evaluate_with(profile, facts, phys, None)
}

/// [`evaluate`], saying in the reasons why Xen's physical view is missing (`unavailable`, e.g.
/// the error of `xl info`).
pub fn evaluate_with(
    profile: &Profile,
    facts: &HostFacts,
    phys: Option<&XenPhysInfo>,
    unavailable: Option<&str>,
) -> Report {
    let env = match &facts.xen {
        Some(xen) if xen.dom0 => Environment::XenDom0,
        Some(_) => Environment::XenGuest,
        None => Environment::Linux,
    };
    let no_phys = match unavailable {
        Some(why) => format!("needs Xen's physical view (xl info / xc_physinfo): {why}"),
        None => {
            "needs Xen's physical view (xl info / xc_physinfo), which was not asked for".to_owned()
        }
    };
    let ctx = Context {
        facts,
        env,
        phys,
        no_phys,
    };
    let req = &profile.requirements;
    let mut results = vec![
        judge(
            "hardware_virtualization",
            "VT-x (Intel) or AMD-V (AMD)",
            req.hardware_virtualization,
            || ctx.virtualization(),
        ),
        judge(
            "hap",
            "EPT (Intel) or NPT (AMD), for the VM-fork clone path",
            req.hap,
            || ctx.hap(),
        ),
        judge(
            "iommu",
            "IOMMU: VT-d (Intel) or AMD-Vi (AMD)",
            req.iommu,
            || ctx.iommu(),
        ),
        judge("tpm2", "TPM 2.0 with /dev/tpmrm0", req.tpm2, || ctx.tpm2()),
        judge(
            "memory",
            format!("at least {} MiB of memory", req.min_memory_mib),
            Level::Required,
            || ctx.memory(req.min_memory_mib),
        ),
        judge(
            "logical_cpus",
            format!("at least {} logical CPUs", req.min_logical_cpus),
            Level::Required,
            || ctx.cpus(req.min_logical_cpus),
        ),
    ];
    let min_version = profile.xen_min_version();
    let xen_title = format!("Xen {min_version} or newer");
    let xen_cmdline_title = "Xen command line has the profile's settings";
    let dom0_cmdline_title = "dom0 command line has the profile's settings";
    match env {
        Environment::Linux => {
            for (id, title) in [
                ("xen_version", xen_title.as_str()),
                ("xen_cmdline", xen_cmdline_title),
                ("dom0_cmdline", dom0_cmdline_title),
            ] {
                results.push(not_applicable(id, title, Level::Required, NOT_UNDER_XEN));
            }
        }
        Environment::XenGuest => {
            results.push(judge("xen_version", xen_title, Level::Required, || {
                ctx.xen_version(min_version)
            }));
            for (id, title) in [
                ("xen_cmdline", xen_cmdline_title),
                ("dom0_cmdline", dom0_cmdline_title),
            ] {
                results.push(judge(id, title, Level::Required, || {
                    Finding::Unknown(XEN_GUEST.to_owned())
                }));
            }
        }
        Environment::XenDom0 => {
            results.push(judge("xen_version", xen_title, Level::Required, || {
                ctx.xen_version(min_version)
            }));
            results.push(judge(
                "xen_cmdline",
                xen_cmdline_title,
                Level::Required,
                || ctx.xen_cmdline(&profile.xen.cmdline),
            ));
            results.push(judge(
                "dom0_cmdline",
                dom0_cmdline_title,
                Level::Required,
                || ctx.dom0_cmdline(&profile.dom0.cmdline),
            ));
        }
    }
    let passed = results.iter().all(|r| {
        r.level != Level::Required || matches!(r.status, Status::Pass | Status::NotApplicable)
    });
    let cpu = facts.cpu.as_ref().map(|c| match (&c.vendor, &c.model) {
        (Some(v), Some(m)) => format!("{v} {m}"),
        (Some(v), None) => v.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => "unknown".to_owned(),
    });
    Report {
        profile: profile.name.clone(),
        summary: profile.summary.clone(),
        environment: env,
        virtual_machine: env == Environment::Linux
            && facts.cpu.as_ref().is_some_and(CpuFacts::in_virtual_machine),
        cpu,
        xen_version: facts.xen.as_ref().and_then(|x| x.version.clone()),
        xen_physinfo: phys.cloned(),
        xen_physinfo_error: match (env, phys) {
            (Environment::XenDom0, None) => unavailable.map(str::to_owned),
            _ => None,
        },
        results,
        passed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{TpmDevice, XenFacts};
    use crate::profile::shipped_profile;

    fn facts_with_flags(flags: &str) -> HostFacts {
        HostFacts {
            cpu: Some(CpuFacts::parse(&format!(
                "processor : 0\nflags : {flags}\n"
            ))),
            mem_total_kib: Some(64 * 1024 * 1024),
            ..HostFacts::default()
        }
    }

    fn result<'a>(report: &'a Report, id: &str) -> &'a RequirementResult {
        report.results.iter().find(|r| r.id == id).unwrap()
    }

    #[test]
    fn recommended_misses_warn_and_required_misses_fail() {
        let general = shipped_profile("general").unwrap();
        let facts = facts_with_flags("vmx");
        let report = evaluate(&general, &facts, None);
        assert_eq!(
            result(&report, "hardware_virtualization").status,
            Status::Pass
        );
        assert_eq!(result(&report, "hap").status, Status::Warn);
        assert_eq!(result(&report, "iommu").status, Status::Warn);
        // One logical CPU: the required CPU count fails the host.
        assert_eq!(result(&report, "logical_cpus").status, Status::Fail);
        assert!(!report.passed);
    }

    #[test]
    fn memtotal_slack_is_bounded() {
        let general = shipped_profile("general").unwrap();
        let mut facts = facts_with_flags("vmx");
        facts.mem_total_kib = Some(8192 * 1024 * 96 / 100);
        assert_eq!(
            result(&evaluate(&general, &facts, None), "memory").status,
            Status::Pass
        );
        facts.mem_total_kib = Some(8192 * 1024 * 94 / 100);
        let report = evaluate(&general, &facts, None);
        assert_eq!(result(&report, "memory").status, Status::Fail);
        assert!(result(&report, "memory").reason.contains("below 8192 MiB"));
    }

    #[test]
    fn tpm_1_2_and_missing_resource_manager_fail() {
        let production = shipped_profile("production").unwrap();
        let mut facts = facts_with_flags("vmx ept");
        facts.tpm.devices.push(TpmDevice {
            name: "tpm0".into(),
            version_major: Some(1),
        });
        let r = evaluate(&production, &facts, None);
        assert_eq!(result(&r, "tpm2").status, Status::Fail);
        assert!(result(&r, "tpm2").reason.contains("tpm0 is TPM 1.x"));
        facts.tpm.devices[0].version_major = Some(2);
        let r = evaluate(&production, &facts, None);
        assert!(result(&r, "tpm2").reason.contains("/dev/tpmrm0"));
        facts.tpm.resource_manager = true;
        assert_eq!(
            result(&evaluate(&production, &facts, None), "tpm2").status,
            Status::Pass
        );
    }

    #[test]
    fn dom0_without_physinfo_is_unknown_and_does_not_pass() {
        let general = shipped_profile("general").unwrap();
        let mut facts = facts_with_flags("hypervisor");
        facts.xen = Some(XenFacts {
            dom0: true,
            version: Some("4.17.7".into()),
            version_major_minor: Some((4, 17)),
            capabilities: Some("xen-3.0-x86_64 hvm-3.0-x86_64".into()),
            guest_type: Some("PV".into()),
        });
        facts.kernel_cmdline = Some(general.dom0.cmdline.clone());
        let report = evaluate(&general, &facts, None);
        assert_eq!(report.environment, Environment::XenDom0);
        assert_eq!(
            result(&report, "hardware_virtualization").status,
            Status::Pass
        );
        assert_eq!(result(&report, "memory").status, Status::Unknown);
        assert!(result(&report, "memory").reason.contains("xc_physinfo"));
        assert!(result(&report, "memory").reason.contains("not asked for"));
        assert_eq!(result(&report, "xen_version").status, Status::Pass);
        assert_eq!(result(&report, "dom0_cmdline").status, Status::Pass);
        assert_eq!(result(&report, "xen_cmdline").status, Status::Unknown);
        assert!(!report.passed);
    }

    #[test]
    fn cmdline_lists_what_is_missing() {
        match cmdline_finding("Xen", "a=1 b c=2", "a=1 c=3") {
            Finding::NotMet(reason) => assert!(reason.starts_with("Xen command line lacks: b c=2")),
            _ => panic!("expected NotMet"),
        }
        assert!(matches!(
            cmdline_finding("Xen", "a b", "b x a"),
            Finding::Met(_)
        ));
    }
}
