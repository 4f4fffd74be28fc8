//! A software TPM for tests: Debian's `swtpm` started as a child process on loopback, and a
//! stand-in for a measuring boot loader that extends PCRs 8 and 9 with fixed digests.
//!
//! Readiness is a connect to the TPM port polled against a deadline; [`Swtpm`] kills and
//! reaps its process when dropped.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{PcrValue, Tpm, TpmError};

/// How long to wait for a started swtpm to accept connections.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Serialises tests that use swtpm from parallel threads of one process: hold the guard for
/// the whole test. libtss2's swtpm TCTI opens a socket per command, not close-on-exec (and
/// after [`Tpm::open`], which can only mark what is open when the context is made), so a
/// process spawned by one thread (a swtpm, an agent) while another thread's TPM command is
/// under way inherits that connection and keeps it open after the context is dropped; swtpm serves one
/// connection at a time, so the next client of that swtpm (an agent's `init`) then waits for
/// ever (seen: `agent/tests/tpm.rs` hung 11 minutes). Poison-tolerant: a failed test does not
/// fail the others.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running `swtpm socket --tpm2` process.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    port: u16,
    state: PathBuf,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Swtpm {
    /// Starts swtpm with its state in `state_dir` (created if missing; an existing state is
    /// the same TPM again, with its PCRs reset as at a power cycle).
    pub fn start(state_dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let mut last = io::Error::other("swtpm did not start");
        // The swtpm TCTI talks to the control channel on the TPM port + 1. A free port is
        // found by binding port 0; another process may take it (or its neighbour) before
        // swtpm does, so a failed start is retried with a new port a bounded number of times.
        for _ in 0..5 {
            let port = free_port()?;
            let Some(ctrl) = port.checked_add(1) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", ctrl)).is_err() {
                continue;
            }
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"),
                ])
                .args(["--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state_dir.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let started = Instant::now();
            loop {
                if let Some(status) = child.try_wait()? {
                    last = io::Error::other(format!("swtpm exited with {status}"));
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Self {
                        child,
                        port,
                        state: state_dir.to_path_buf(),
                    });
                }
                if started.elapsed() > READY_DEADLINE {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "swtpm did not accept connections in time",
                    ));
                }
                std::thread::yield_now();
                std::thread::park_timeout(Duration::from_millis(5));
            }
        }
        Err(last)
    }

    /// The TCTI string for this swtpm.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Stops swtpm (its state stays in the directory).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The measurements the test "boot loader" extends, as GRUB would for a given image: PCR 8
/// gets the digest of a kernel command line, PCR 9 the digest of a kernel file.
pub fn boot_measurements(cmdline: &str) -> Vec<(u8, PcrValue)> {
    let d = |b: &[u8]| {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
        out
    };
    vec![
        (8, d(format!("linux /boot/Image {cmdline}").as_bytes())),
        (9, d(b"mayfly test dom0 kernel image")),
    ]
}

/// The good boot of the tests: the command line the key is sealed under.
pub const GOOD_CMDLINE: &str = "console=hvc0 ro";

/// Extends the PCRs as a boot with `cmdline` would (see [`boot_measurements`]).
pub fn measure_boot(tpm: &mut Tpm, cmdline: &str) -> Result<(), TpmError> {
    for (pcr, digest) in boot_measurements(cmdline) {
        tpm.extend_pcr(pcr, &digest)?;
    }
    Ok(())
}

/// The SHA-256 PCR values after a fresh TPM start followed by `measure_boot(cmdline)`
/// (PCRs 0..=15 start at zero): what an image build computes as the expected values.
pub fn expected_after_boot(pcrs: &[u8], cmdline: &str) -> Vec<(u8, PcrValue)> {
    let m = boot_measurements(cmdline);
    pcrs.iter()
        .map(|p| {
            let mut v = [0u8; 32];
            for (_, d) in m.iter().filter(|(q, _)| q == p) {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                ctx.update(&v);
                ctx.update(d);
                v.copy_from_slice(ctx.finish().as_ref());
            }
            (*p, v)
        })
        .collect()
}
