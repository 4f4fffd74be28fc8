//! `mayfly hw-check` as a process: against fixture trees (Intel, AMD, Xen dom0), against
//! this machine, and its usage errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn mayfly(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(args)
        .output()
        .expect("run mayfly")
}

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../hw/fixtures")
        .join(name);
    assert!(dir.is_dir(), "{}", dir.display());
    dir.to_string_lossy().into_owned()
}

fn json_report(args: &[&str]) -> (i32, Value) {
    let out = mayfly(args);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), report)
}

fn result<'a>(report: &'a Value, id: &str) -> (&'a str, &'a str) {
    let r = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no result {id}"));
    (r["status"].as_str().unwrap(), r["reason"].as_str().unwrap())
}

#[test]
fn intel_and_amd_servers_pass_production_with_exit_0() {
    for name in ["intel-vtx-ept-vtd-tpm2", "amd-svm-npt-amdvi-tpm2"] {
        let (code, report) = json_report(&["hw-check", "--json", "--root", &fixture(name)]);
        assert_eq!(code, 0, "{name}: {report:#}");
        assert_eq!(report["profile"], "production");
        assert_eq!(report["passed"], true);
        for id in [
            "hardware_virtualization",
            "hap",
            "iommu",
            "tpm2",
            "memory",
            "logical_cpus",
        ] {
            assert_eq!(result(&report, id).0, "pass", "{name} {id}");
        }
    }
}

#[test]
fn xen_dom0_fixture_reads_xen_and_names_what_needs_physinfo() {
    let (code, report) = json_report(&[
        "hw-check",
        "--json",
        "--profile",
        "general",
        "--root",
        &fixture("xen-dom0-intel"),
    ]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["environment"], "xen-dom0");
    assert_eq!(report["xen_version"], "4.17.7");
    assert_eq!(report["xen_physinfo"], Value::Null);
    let (s, reason) = result(&report, "hardware_virtualization");
    assert_eq!(s, "pass");
    assert!(reason.contains("hvm-3.0-x86_64"));
    assert_eq!(result(&report, "xen_version").0, "pass");
    assert_eq!(result(&report, "dom0_cmdline").0, "pass");
    for id in ["hap", "memory", "logical_cpus", "xen_cmdline"] {
        let (s, reason) = result(&report, id);
        assert_eq!(s, "unknown", "{id}");
        assert!(reason.contains("xc_physinfo"), "{id}: {reason}");
    }
}

/// This machine, as it is: the test derives what must be reported from the host's own files
/// and checks that the binary says it, with the reasons.
#[test]
fn this_host_is_judged_with_reasons() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let (code, report) = json_report(&["hw-check", "--json"]);
    let under_xen = std::path::Path::new("/sys/hypervisor/type").exists()
        && std::fs::read_to_string("/sys/hypervisor/type")
            .unwrap()
            .trim()
            == "xen";
    if under_xen {
        assert_ne!(report["environment"], "linux");
        return;
    }
    assert_eq!(report["environment"], "linux");
    let (s, reason) = result(&report, "hardware_virtualization");
    if flags.contains(&"vmx") || flags.contains(&"svm") {
        assert_eq!(s, "pass");
    } else {
        assert_eq!(s, "fail");
        assert!(
            reason.starts_with("neither vmx (VT-x) nor svm (AMD-V) in /proc/cpuinfo"),
            "{reason}"
        );
        if flags.contains(&"hypervisor") {
            assert_eq!(report["virtual_machine"], true);
            assert!(
                reason.contains("virtual machine ('hypervisor' CPU flag)"),
                "{reason}"
            );
        }
        assert_eq!(code, 1, "a required requirement failed");
    }
    if !std::path::Path::new("/sys/class/tpm").exists() {
        let (s, reason) = result(&report, "tpm2");
        assert_eq!(s, "fail");
        assert!(
            reason.starts_with("no device in /sys/class/tpm"),
            "{reason}"
        );
    }
    let (s, reason) = result(&report, "xen_version");
    assert_eq!(s, "not_applicable");
    assert!(reason.starts_with("not running under Xen"));
    assert_eq!(code == 0, report["passed"] == true);
}

#[test]
fn table_output_names_every_requirement_and_the_result() {
    let out = mayfly(&["hw-check", "--root", &fixture("intel-vtx-ept-vtd-tpm2")]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "STATUS   LEVEL        REQUIREMENT",
        "PASS     required     VT-x (Intel) or AMD-V (AMD)",
        "N/A      required     Xen 4.17 or newer",
        "result: PASS (profile production)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let out = mayfly(&[
        "hw-check",
        "--profile",
        "general",
        "--root",
        &fixture("xen-dom0-intel"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("environment: Xen dom0"), "{text}");
    assert!(
        text.contains("UNKNOWN  required     at least 8192 MiB of memory"),
        "{text}"
    );
    assert!(
        text.contains("required requirement(s) failed or unknown"),
        "{text}"
    );
}

#[test]
fn unknown_profile_is_a_usage_error_listing_the_known_ones() {
    let out = mayfly(&["hw-check", "--profile", "gaming"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("unknown profile \"gaming\"; known profiles: general, production"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn help_and_profile_list_tell_the_truth() {
    let out = mayfly(&["hw-check", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--profile <NAME>",
        "--json",
        "--root <DIR>",
        "[default: production]",
        "Exit status:",
        "physinfo",
    ] {
        assert!(help.contains(needle), "missing {needle:?} in\n{help}");
    }
    let out = mayfly(&["hw-check", "--list-profiles"]);
    assert_eq!(out.status.code(), Some(0));
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(
        list.starts_with("general ") && list.contains("\nproduction "),
        "{list}"
    );
}

#[test]
fn an_unreadable_host_is_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("proc/cpuinfo")).unwrap();
    let out = mayfly(&["hw-check", "--root", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot inspect the host"));
}
