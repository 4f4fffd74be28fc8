//! The checks against fixture trees of real server layouts (`hw/fixtures/`): an Intel
//! VT-x/EPT/VT-d/TPM 2.0 host, an AMD-V/NPT/AMD-Vi/TPM 2.0 host, and a Xen 4.17 PV dom0.

use std::path::PathBuf;

use mayfly_hw::check::{evaluate, Environment, Report, Status};
use mayfly_hw::host::{HostFacts, HostFs};
use mayfly_hw::profile::shipped_profile;
use mayfly_hw::xen::{FixedXenPhysInfo, XenPhysInfo, XenPhysInfoSource};

fn facts(name: &str) -> HostFacts {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name);
    assert!(root.is_dir(), "fixture {name} missing");
    HostFacts::gather(&HostFs::new(root)).unwrap()
}

fn status(report: &Report, id: &str) -> (Status, String) {
    let r = report.results.iter().find(|r| r.id == id).unwrap();
    (r.status, r.reason.clone())
}

#[test]
fn intel_server_passes_production() {
    let report = evaluate(
        &shipped_profile("production").unwrap(),
        &facts("intel-vtx-ept-vtd-tpm2"),
        None,
    );
    assert_eq!(report.environment, Environment::Linux);
    assert!(!report.virtual_machine);
    assert!(report.passed, "{report:#?}");
    assert_eq!(
        status(&report, "hardware_virtualization"),
        (
            Status::Pass,
            "vmx flag (Intel VT-x) in /proc/cpuinfo".into()
        )
    );
    assert_eq!(
        status(&report, "hap"),
        (Status::Pass, "ept flag (Intel EPT) in /proc/cpuinfo".into())
    );
    let (s, reason) = status(&report, "iommu");
    assert_eq!(s, Status::Pass);
    assert!(
        reason.contains("/sys/class/iommu: dmar0 dmar1") && reason.contains("DMAR"),
        "{reason}"
    );
    assert_eq!(status(&report, "tpm2").0, Status::Pass);
    assert_eq!(
        status(&report, "logical_cpus"),
        (Status::Pass, "16 logical CPUs in /proc/cpuinfo".into())
    );
    for id in ["xen_version", "xen_cmdline", "dom0_cmdline"] {
        assert_eq!(status(&report, id).0, Status::NotApplicable);
    }
}

#[test]
fn amd_server_passes_production() {
    let report = evaluate(
        &shipped_profile("production").unwrap(),
        &facts("amd-svm-npt-amdvi-tpm2"),
        None,
    );
    assert!(report.passed, "{report:#?}");
    assert_eq!(
        status(&report, "hardware_virtualization").1,
        "svm flag (AMD-V) in /proc/cpuinfo"
    );
    assert_eq!(
        status(&report, "hap").1,
        "npt flag (AMD NPT) in /proc/cpuinfo"
    );
    assert!(status(&report, "iommu").1.contains("ivhd0"));
    assert_eq!(
        report.cpu.as_deref(),
        Some("AuthenticAMD AMD EPYC 7313P 16-Core Processor")
    );
}

fn production_physinfo() -> XenPhysInfo {
    XenPhysInfo {
        hvm: true,
        hap: true,
        iommu: true,
        nr_cpus: 64,
        total_memory_mib: 262_144,
        xen_cmdline: Some(format!(
            "{} loglvl=warning",
            shipped_profile("production").unwrap().xen.cmdline
        )),
    }
}

#[test]
fn xen_dom0_passes_production_with_physinfo() {
    let profile = shipped_profile("production").unwrap();
    let facts = facts("xen-dom0-intel");
    let phys = FixedXenPhysInfo(production_physinfo()).phys_info().unwrap();
    let report = evaluate(&profile, &facts, phys.as_ref());
    assert_eq!(report.environment, Environment::XenDom0);
    assert_eq!(report.xen_version.as_deref(), Some("4.17.7"));
    assert!(report.passed, "{report:#?}");
    assert!(status(&report, "memory").1.contains("262144 MiB"));
    assert!(status(&report, "logical_cpus")
        .1
        .contains("64 logical CPUs"));
}

#[test]
fn xen_dom0_fails_on_physinfo_without_hap_or_iommu_and_on_a_wrong_cmdline() {
    let profile = shipped_profile("production").unwrap();
    let facts = facts("xen-dom0-intel");
    let mut phys = production_physinfo();
    phys.hap = false;
    phys.iommu = false;
    phys.xen_cmdline = Some("dom0_mem=1024M console=com1".into());
    let report = evaluate(&profile, &facts, Some(&phys));
    assert!(!report.passed);
    assert_eq!(status(&report, "hap").0, Status::Fail);
    assert!(status(&report, "iommu").1.contains("directio"));
    let (s, reason) = status(&report, "xen_cmdline");
    assert_eq!(s, Status::Fail);
    assert!(
        reason.contains("lacks: dom0_mem=4096M,max:4096M") && reason.contains("iommu=required"),
        "{reason}"
    );
}

#[test]
fn xen_dom0_without_physinfo_uses_sysfs_and_says_what_it_cannot_know() {
    let general = shipped_profile("general").unwrap();
    let report = evaluate(&general, &facts("xen-dom0-intel"), None);
    let (s, reason) = status(&report, "hardware_virtualization");
    assert_eq!(s, Status::Pass);
    assert!(reason.contains("hvm-3.0-x86_64"), "{reason}");
    // The XMAR table (the DMAR Xen hid from dom0) is evidence of VT-d.
    assert!(status(&report, "iommu").1.contains("renamed XMAR by Xen"));
    for id in ["hap", "memory", "logical_cpus", "xen_cmdline"] {
        let (s, reason) = status(&report, id);
        assert!(matches!(s, Status::Unknown), "{id}: {s:?}");
        assert!(reason.contains("xc_physinfo"), "{id}: {reason}");
    }
    // The general profile's dom0 settings are a subset of what this dom0 booted with.
    assert_eq!(status(&report, "dom0_cmdline").0, Status::Pass);
    assert!(!report.passed);
}
