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

/// A stand-in for `xl` that prints a recorded `xl info` (or fails like xl without xenstored).
fn fake_xl(dir: &std::path::Path, xl_info: Option<&str>) -> String {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("xl");
    let body = match xl_info {
        Some(name) => {
            let recorded = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../hw/fixtures/xl-info")
                .join(name);
            format!("#!/bin/sh\n[ \"$1\" = info ] || exit 9\ncat '{}'\n", recorded.display())
        }
        None => "#!/bin/sh\necho 'xencall: error: Could not obtain handle on privileged command interface' >&2\necho 'libxl: error: cannot connect to xenstore' >&2\nexit 1\n".to_owned(),
    };
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script.to_string_lossy().into_owned()
}

#[test]
fn xen_dom0_with_xl_info_of_a_production_server_passes() {
    let dir = tempfile::tempdir().unwrap();
    let xl = fake_xl(dir.path(), Some("intel-production.txt"));
    let (code, report) = json_report(&[
        "hw-check",
        "--json",
        "--root",
        &fixture("xen-dom0-intel"),
        "--xl",
        &xl,
    ]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["xen_physinfo"]["nr_cpus"], 64);
    assert_eq!(report["xen_physinfo"]["iommu"], true);
    for id in [
        "hardware_virtualization",
        "hap",
        "iommu",
        "tpm2",
        "memory",
        "logical_cpus",
        "xen_version",
        "xen_cmdline",
        "dom0_cmdline",
    ] {
        assert_eq!(result(&report, id).0, "pass", "{id}");
    }
    assert!(result(&report, "hap")
        .1
        .contains("Xen physinfo reports the hap capability"));
}

#[test]
fn xen_dom0_with_the_xl_info_recorded_under_qemu_fails_with_reasons() {
    // Recorded by hw/scripts/hw-check-in-xen-dom0.sh: Xen 4.17.7 under QEMU TCG, 1 CPU,
    // 2047 MiB, no IOMMU, booted with the test command line, not a profile's.
    let dir = tempfile::tempdir().unwrap();
    let xl = fake_xl(dir.path(), Some("qemu-tcg-xen-4.17.7.txt"));
    let (code, report) = json_report(&[
        "hw-check",
        "--json",
        "--profile",
        "general",
        "--root",
        &fixture("xen-dom0-intel"),
        "--xl",
        &xl,
    ]);
    assert_eq!(code, 1);
    assert_eq!(result(&report, "hap").0, "pass");
    assert_eq!(result(&report, "iommu").0, "warn");
    assert!(result(&report, "memory")
        .1
        .starts_with("Xen physinfo: 2047 MiB of machine memory, below 8192 MiB"));
    assert_eq!(
        result(&report, "logical_cpus").1,
        "Xen physinfo: 1 logical CPUs, fewer than 4"
    );
    let (s, reason) = result(&report, "xen_cmdline");
    assert_eq!(s, "fail");
    assert!(
        reason.starts_with(
            "Xen command line lacks: dom0_mem=2048M,max:2048M dom0_max_vcpus=2 console=com1,vga"
        ),
        "{reason}"
    );
}

#[test]
fn xen_dom0_where_xl_fails_reports_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let xl = fake_xl(dir.path(), None);
    let (code, report) = json_report(&[
        "hw-check",
        "--json",
        "--root",
        &fixture("xen-dom0-intel"),
        "--xl",
        &xl,
    ]);
    assert_eq!(code, 1);
    let error = report["xen_physinfo_error"].as_str().unwrap();
    assert!(
        error.contains("info failed")
            && error.ends_with("libxl: error: cannot connect to xenstore"),
        "{error}"
    );
    let (s, reason) = result(&report, "memory");
    assert_eq!(s, "unknown");
    assert!(reason.contains("cannot connect to xenstore"), "{reason}");
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
        "--xl",
        "/nonexistent/xl",
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
        assert!(
            reason.contains("cannot run /nonexistent/xl"),
            "{id}: {reason}"
        );
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
        "--xl",
        "/nonexistent/xl",
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
        "xl info",
        "--xl <PATH>",
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

#[test]
fn the_key_source_of_the_data_directory_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let root = fixture("intel-vtx-ept-vtd-tpm2");
    let args = |json: bool| {
        let mut a = vec!["hw-check", "--root", &root, "--data-dir", data];
        if json {
            a.push("--json");
        }
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run_json = || {
        let a = args(true);
        json_report(&a.iter().map(String::as_str).collect::<Vec<_>>()).1
    };
    assert_eq!(run_json()["key_source"]["source"], "none");
    std::fs::write(dir.path().join("signing.key"), b"k").unwrap();
    assert_eq!(run_json()["key_source"]["source"], "file");
    std::fs::remove_file(dir.path().join("signing.key")).unwrap();
    // A sealed key (the format of docs/vectors/sealed-key-1.hex).
    let vector = include_str!("../../../docs/vectors/sealed-key-1.hex").trim();
    let bytes: Vec<u8> = (0..vector.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&vector[i..i + 2], 16).unwrap())
        .collect();
    std::fs::write(dir.path().join("signing.sealed"), bytes).unwrap();
    let report = run_json();
    assert_eq!(report["key_source"]["source"], "tpm", "{report}");
    assert!(report["key_source"]["detail"]
        .as_str()
        .unwrap()
        .contains("PCRs 7,8,9"));
    let a = args(false);
    let out = mayfly(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("key source:  tpm ("), "{table}");
}
