//! The agent's TPM connection is close-on-exec: a process the agent starts while the
//! connection is open does not inherit it.
//!
//! The appliance talks to the kernel's resource manager through libtss2's `device` TCTI,
//! which opens the device itself and keeps it open for the life of the context. No TPM
//! device exists here, so the test points the `device` TCTI at a FIFO: opened read-write,
//! it echoes the TCTI's start-up probe back as a "response", which is all the open needs.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use mayfly_tpm::Tpm;

/// The descriptors of this process that point at `target`.
fn fds_at(target: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read_link(e.path()).ok()? == target).then_some(fd)
        })
        .collect()
}

#[test]
fn a_child_process_does_not_inherit_the_tpm_device() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("tpmrm0");
    let made = std::process::Command::new("mkfifo")
        .arg(&device)
        .status()
        .unwrap();
    assert!(made.success());
    assert!(std::fs::metadata(&device).unwrap().file_type().is_fifo());

    let tpm = Tpm::open(&format!("device:{}", device.display())).unwrap();
    let fds = fds_at(&device);
    assert_eq!(
        fds.len(),
        1,
        "the context holds one descriptor of the device: {fds:?}"
    );
    let fd = fds[0];
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    // O_CLOEXEC, as fdinfo shows it.
    assert_ne!(
        flags & 0o2_000_000,
        0,
        "fd {fd} is not close-on-exec: {fdinfo}"
    );

    // What a child really gets: its own descriptor table, listed by itself.
    let out = std::process::Command::new("ls")
        .arg("-l")
        .arg("/proc/self/fd/")
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains(device.to_str().unwrap()),
        "the child inherited the TPM device (fd {fd}):\n{listing}"
    );
    drop(tpm);
    assert!(
        fds_at(&device).is_empty(),
        "dropping the context closes the device"
    );
}
