//! `domu-shim`: the guest runtime's entry point.
//!
//! Runs one transaction over a ring in an inherited, sealed memfd, signalled through two
//! inherited eventfds, with the example handlers (plus the `test.*` handlers when built with
//! the `test-handlers` feature), and exits with [`domu_shim::run`]'s status. It is the
//! `/init`-style entry of the sandbox and the fork+exec baseline of the benchmarks.
//!
//! In **Xen mode** (`--xen`, or started as PID 1 with no arguments: the `/init` of the
//! template domU's initramfs) it prepares the domain, reads the ring's coordinates from
//! xenstore, maps the granted ring and binds the event channel ([`domu_shim::xen`]), runs
//! the same transaction protocol, and powers the domain off.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

use domu_shim::{error_chain, exit};
use mayfly_ring::{EventFdNotifier, MmapMem};

// Output goes through `write!` with errors ignored, never `print!`/`eprintln!`, which panic
// when the stream is unwritable (a closed pipe, a confined domain).

const USAGE: &str = "\
Usage: domu-shim --ring-fd N --ring-len BYTES --signal-fd A --wait-fd B
       domu-shim --xen        (also: as PID 1 with no arguments)

Mayfly's guest runtime: runs exactly one transaction over a shared-memory ring, then exits.
It sends Ready on the ring, waits (without a timeout) for the agent's Start, runs the named
handler, sends Commit or Abort, and exits once the agent has answered.

Xen mode (the /init of a Mayfly domU): mounts /dev and /proc, loads the modules listed in
/etc/mayfly/modules, reads data/mayfly/{ring-version,ring-pages,ring-refs,event-channel}
from xenstore, maps the ring granted by domain 0, binds its event channel, runs the
transaction, then powers the domain off (as PID 1; otherwise it exits with the status).

Options (each required exactly once; `--opt=value` also works):
  --ring-fd N        inherited memfd holding the ring, sealed against shrinking (F_SEAL_SHRINK)
  --ring-len BYTES   length of the ring mapping: a non-zero multiple of 4096
  --signal-fd A      inherited eventfd (EFD_NONBLOCK) this process writes to notify the agent
  --wait-fd B        inherited eventfd (EFD_NONBLOCK) the agent writes to notify this process
  -h, --help         print this help and exit
  -V, --version      print the version and exit

The fds must be distinct and not 0, 1 or 2. They are taken over and re-opened close-on-exec.

Exit status:
  0   the transaction ended (committed, aborted, or commit refused by the agent)
  2   bad command line
  3   an fd could not be claimed or mapped (Xen mode: the Xen setup failed)
  10  the ring header is invalid or the ring is not idle
  11  sending Ready or receiving its answer failed
  12  the answer to Ready was not Start
  13  a database call failed on the ring (timeout, protocol violation, peer gone)
  14  sending Commit/Abort or receiving its answer failed
  15  the answer to Commit/Abort was of the wrong kind
  16  a test.* handler broke the ring and the wait for destruction ended (test builds only)
A handler panic aborts the transaction (status 0) in debug builds; release builds use
panic=abort, so the process dies of SIGABRT instead.
";

/// The command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Args {
    ring_fd: RawFd,
    ring_len: usize,
    signal_fd: RawFd,
    wait_fd: RawFd,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Run(Args),
    Xen,
    Help,
    Version,
}

/// The command line is wrong, or an inherited fd is unusable.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{flag} given twice")]
    Repeated { flag: &'static str },
    #[error("{flag}: {value:?} is not a valid {what}")]
    BadValue {
        flag: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{flag} {fd}: fds 0, 1 and 2 are standard I/O, not a ring")]
    StdioFd { flag: &'static str, fd: RawFd },
    #[error("fd {fd} is given for both {first} and {second}")]
    SameFd {
        fd: RawFd,
        first: &'static str,
        second: &'static str,
    },
    #[error("{flag} {fd} is not an open file descriptor")]
    NotOpen {
        flag: &'static str,
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("re-opening {flag} {fd} close-on-exec failed")]
    Reopen {
        flag: &'static str,
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping the ring from fd {fd} failed")]
    Map {
        fd: RawFd,
        #[source]
        source: mayfly_ring::mem::MapError,
    },
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, CliError> {
    let mut ring_fd = None;
    let mut ring_len = None;
    let mut signal_fd = None;
    let mut wait_fd = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let flag: &'static str = match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--xen" if inline.is_none() => return Ok(Command::Xen),
            "--ring-fd" => "--ring-fd",
            "--ring-len" => "--ring-len",
            "--signal-fd" => "--signal-fd",
            "--wait-fd" => "--wait-fd",
            _ => return Err(CliError::Unknown(arg)),
        };
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or(CliError::MissingValue(flag))?,
        };
        let bad = |what| CliError::BadValue {
            flag,
            value: value.clone(),
            what,
        };
        if flag == "--ring-len" {
            let len = value.parse::<usize>().map_err(|_| bad("length"))?;
            set(&mut ring_len, flag, len)?;
        } else {
            let fd = value
                .parse::<RawFd>()
                .ok()
                .filter(|&fd| fd >= 0)
                .ok_or_else(|| bad("file descriptor"))?;
            if fd <= 2 {
                return Err(CliError::StdioFd { flag, fd });
            }
            let slot = match flag {
                "--ring-fd" => &mut ring_fd,
                "--signal-fd" => &mut signal_fd,
                _ => &mut wait_fd,
            };
            set(slot, flag, fd)?;
        }
    }
    let args = Args {
        ring_fd: ring_fd.ok_or(CliError::Missing("--ring-fd"))?,
        ring_len: ring_len.ok_or(CliError::Missing("--ring-len"))?,
        signal_fd: signal_fd.ok_or(CliError::Missing("--signal-fd"))?,
        wait_fd: wait_fd.ok_or(CliError::Missing("--wait-fd"))?,
    };
    let named = [
        ("--ring-fd", args.ring_fd),
        ("--signal-fd", args.signal_fd),
        ("--wait-fd", args.wait_fd),
    ];
    for (i, &(first, a)) in named.iter().enumerate() {
        for &(second, b) in named.iter().skip(i.saturating_add(1)) {
            if a == b {
                return Err(CliError::SameFd {
                    fd: a,
                    first,
                    second,
                });
            }
        }
    }
    Ok(Command::Run(args))
}

fn set<T>(slot: &mut Option<T>, flag: &'static str, value: T) -> Result<(), CliError> {
    if slot.replace(value).is_some() {
        return Err(CliError::Repeated { flag });
    }
    Ok(())
}

/// Takes ownership of inherited fd `fd` and returns a close-on-exec duplicate of it (the
/// inherited number, which is not close-on-exec, is closed).
fn claim_inherited_fd(flag: &'static str, fd: RawFd) -> Result<OwnedFd, CliError> {
    // SAFETY: `OwnedFd::from_raw_fd` needs `fd` to be open and owned by nobody else in this
    // process. Ownership: the number was inherited across exec and named on the command line
    // for this purpose; `main` claims each number once, before anything else in the process
    // opens or claims a file descriptor, and `parse` refused 0-2 (standard I/O, used by std)
    // and repeated numbers. Openness: checked with `fstat` right below; if the number is not
    // open, the handle is forgotten, never used for I/O nor closed, so no other file can be
    // affected.
    #[allow(unsafe_code)]
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if let Err(source) = file.metadata() {
        std::mem::forget(file);
        return Err(CliError::NotOpen { flag, fd, source });
    }
    // `try_clone_to_owned` duplicates with F_DUPFD_CLOEXEC: nothing a handler spawns
    // inherits the ring. Dropping `file` closes the inherited number.
    file.as_fd()
        .try_clone_to_owned()
        .map_err(|source| CliError::Reopen { flag, fd, source })
}

fn setup(args: Args) -> Result<(MmapMem, EventFdNotifier), CliError> {
    let ring = claim_inherited_fd("--ring-fd", args.ring_fd)?;
    let signal = claim_inherited_fd("--signal-fd", args.signal_fd)?;
    let wait = claim_inherited_fd("--wait-fd", args.wait_fd)?;
    let mem = MmapMem::from_fd(ring.as_fd(), args.ring_len).map_err(|source| CliError::Map {
        fd: args.ring_fd,
        source,
    })?;
    // The mapping does not need the fd: close it, so the ring is reachable only through it.
    drop(ring);
    Ok((mem, EventFdNotifier::from_fds(signal, wait)))
}

fn status(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Xen mode: see the module docs. As PID 1 it never returns normally (it powers off).
fn run_xen() -> ExitCode {
    use domu_shim::xen;
    use domu_shim::xenstore::Xenstore;
    use std::time::{Duration, Instant};

    let started = Instant::now();
    let pid1 = std::process::id() == 1;
    xen::say("xen mode");
    let attached = xen::prepare_system()
        .and_then(|()| Ok(Xenstore::open(Duration::from_secs(10))?))
        .and_then(|mut xs| xen::read_keys(&mut xs))
        .and_then(|keys| {
            xen::say(&format!(
                "ring keys: version 1, {} pages, event channel {}",
                keys.refs.len(),
                keys.port
            ));
            xen::attach(&keys)
        });
    let code = match attached {
        Ok((mem, notifier)) => {
            xen::say(&format!(
                "ring mapped, local port {}, setup {} ms",
                notifier.port(),
                started.elapsed().as_millis()
            ));
            let registry = mayfly_handlers::registry();
            domu_shim::run(mem, &notifier, &registry)
        }
        Err(e) => {
            xen::say(&format!("setup failed: {}", error_chain(&e)));
            exit::SETUP
        }
    };
    xen::say(&format!("exit status {code}"));
    if pid1 {
        let err = xen::power_off();
        xen::say(&format!("power off failed: {err}"));
    }
    status(code)
}

fn main() -> ExitCode {
    if std::process::id() == 1 && std::env::args_os().len() <= 1 {
        return run_xen();
    }
    let command = match parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(io::stderr(), "domu-shim: {e}\n\n{USAGE}");
            return status(exit::USAGE);
        }
    };
    let args = match command {
        Command::Help => {
            let _ = write!(io::stdout(), "{USAGE}");
            return status(exit::OK);
        }
        Command::Version => {
            let _ = writeln!(io::stdout(), "domu-shim {}", env!("CARGO_PKG_VERSION"));
            return status(exit::OK);
        }
        Command::Xen => return run_xen(),
        Command::Run(args) => args,
    };
    let (mem, notifier) = match setup(args) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(io::stderr(), "domu-shim: {}", error_chain(&e));
            return status(exit::SETUP);
        }
    };
    let registry = mayfly_handlers::registry();
    status(domu_shim::run(mem, &notifier, &registry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, CliError> {
        parse(line.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_the_documented_command_line() {
        let expected = Command::Run(Args {
            ring_fd: 3,
            ring_len: 282_624,
            signal_fd: 4,
            wait_fd: 5,
        });
        assert_eq!(
            parse_str("--ring-fd 3 --ring-len 282624 --signal-fd 4 --wait-fd 5").unwrap(),
            expected
        );
        assert_eq!(
            parse_str("--wait-fd=5 --signal-fd=4 --ring-len=282624 --ring-fd=3").unwrap(),
            expected
        );
        assert_eq!(parse_str("--help").unwrap(), Command::Help);
        assert_eq!(parse_str("--ring-fd 3 -h").unwrap(), Command::Help);
        assert_eq!(parse_str("-V").unwrap(), Command::Version);
        assert_eq!(parse_str("--xen").unwrap(), Command::Xen);
        assert!(parse_str("--xen=1").is_err());
    }

    #[test]
    fn refuses_bad_command_lines() {
        for (line, needle) in [
            ("", "--ring-fd is required"),
            (
                "--ring-fd 3 --ring-len 4096 --signal-fd 4",
                "--wait-fd is required",
            ),
            ("--ring-fd", "needs a value"),
            ("--ring-fd x", "not a valid file descriptor"),
            ("--ring-fd -3", "not a valid file descriptor"),
            ("--ring-fd 1", "standard I/O"),
            ("--ring-len -1", "not a valid length"),
            ("--ring-fd 3 --ring-fd 4", "given twice"),
            ("--bogus", "unknown argument"),
            ("ring-fd=3", "unknown argument"),
            (
                "--ring-fd 3 --ring-len 4096 --signal-fd 4 --wait-fd 3",
                "fd 3 is given for both --ring-fd and --wait-fd",
            ),
        ] {
            let err = parse_str(line).unwrap_err().to_string();
            assert!(err.contains(needle), "{line:?}: {err}");
        }
    }

    #[test]
    fn usage_documents_every_exit_status() {
        for code in [
            exit::USAGE,
            exit::SETUP,
            exit::ATTACH,
            exit::HANDSHAKE,
            exit::NOT_START,
            exit::DATABASE,
            exit::FINISH,
            exit::BAD_FINISH_REPLY,
            exit::SABOTAGED,
        ] {
            assert!(
                USAGE.contains(&format!("\n  {code} ")),
                "status {code} missing"
            );
        }
    }
}
