//! `[breakglass]`: the appliance's only console login, opened by the signed admin command
//! `breakglass.open` (quorum) for one person at the serial console, for a bounded time
//! (docs/console.md, "Break-glass").
//!
//! ```text
//!  breakglass.open (quorum, token_sha256, minutes) ──▶ window open, audited breakglass.opened
//!      │  the console (tty) shows a prompt; nothing else ever reads it
//!      ▼
//!  a line typed ─▶ SHA-256 == token_sha256? ── no ─▶ breakglass.login_failed (3rd: closed)
//!      │ yes: breakglass.login, the token is spent
//!      ▼
//!  `setsid -c SHELL -l` on the tty (root) ─▶ exits, or killed when the window ends
//!      ▼
//!  breakglass.closed (reason: logged_out, expired, failed_attempts, error)
//! ```
//!
//! One window at a time; every step is in the signed audit chain (severity alert) with the
//! command's nonce. Lines are bounded (256 bytes) and the tty is read only while the window
//! is open and nobody is logged in.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_ledger::{AuditEvent, Ledger, Severity};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};
use slog::{warn, Logger};

/// Longest line read from the console.
const MAX_LINE: usize = 256;
/// Wrong tokens before the window closes.
const MAX_ATTEMPTS: u32 = 3;
/// How often a running shell is checked and the deadline looked at.
const TICK: Duration = Duration::from_millis(200);

/// The break-glass console of one agent.
pub struct ConsoleBreakGlass {
    tty: PathBuf,
    shell: PathBuf,
    ledger: Ledger,
    log: Logger,
    open: Arc<AtomicBool>,
}

impl ConsoleBreakGlass {
    /// The console `tty` (None: break-glass is off), logging in to `shell`.
    pub fn new(
        tty: Option<&Path>,
        shell: &Path,
        ledger: &Ledger,
        log: &Logger,
    ) -> Option<ConsoleBreakGlass> {
        tty.map(|tty| ConsoleBreakGlass {
            tty: tty.to_path_buf(),
            shell: shell.to_path_buf(),
            ledger: ledger.clone(),
            log: log.clone(),
            open: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl mayfly_console::BreakGlass for ConsoleBreakGlass {
    fn open(&self, minutes: u32, token_sha256: [u8; 32], nonce: &str) -> Result<Value, String> {
        if self.open.swap(true, Ordering::SeqCst) {
            return Err("a break-glass window is already open".into());
        }
        let tty = match OpenOptions::new().read(true).write(true).open(&self.tty) {
            Ok(t) => t,
            Err(e) => {
                self.open.store(false, Ordering::SeqCst);
                return Err(format!("opening {}: {e}", self.tty.display()));
            }
        };
        let session = Session {
            tty,
            shell: self.shell.clone(),
            token_sha256,
            nonce: nonce.to_owned(),
            deadline: Instant::now() + Duration::from_secs(u64::from(minutes) * 60),
            ledger: self.ledger.clone(),
            log: self.log.clone(),
        };
        let open = self.open.clone();
        std::thread::Builder::new()
            .name("breakglass".into())
            .spawn(move || {
                session.run();
                open.store(false, Ordering::SeqCst);
            })
            .map_err(|e| {
                self.open.store(false, Ordering::SeqCst);
                format!("starting the console thread: {e}")
            })?;
        Ok(json!({"tty": self.tty.display().to_string(), "minutes": minutes}))
    }
}

struct Session {
    tty: File,
    shell: PathBuf,
    token_sha256: [u8; 32],
    nonce: String,
    deadline: Instant,
    ledger: Ledger,
    log: Logger,
}

enum Line {
    Text(Vec<u8>),
    Expired,
    Error(String),
}

impl Session {
    fn audit(&self, event: &str, fields: &[(&str, String)]) {
        let mut ev = AuditEvent::new(event, Severity::Alert).field("nonce", &self.nonce);
        for (k, v) in fields {
            ev = ev.field(*k, v);
        }
        if let Err(e) = self.ledger.audit(vec![ev]) {
            warn!(self.log, "auditing the break-glass console failed"; "event" => event, "error" => %e);
        }
    }

    fn say(&mut self, text: &str) {
        let _ = self.tty.write_all(text.as_bytes());
    }

    /// One line from the tty, at most [`MAX_LINE`] bytes, before the deadline.
    fn read_line(&mut self) -> Line {
        let mut line = Vec::new();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Line::Expired;
            }
            let wait = PollTimeout::try_from(left.min(TICK)).unwrap_or(PollTimeout::ZERO);
            let mut fds = [PollFd::new(self.tty.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Line::Error(format!("poll: {e}")),
            }
            let mut byte = [0u8; 1];
            match self.tty.read(&mut byte) {
                Ok(0) => return Line::Error("the console closed".into()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Line::Error(format!("read: {e}")),
            }
            match byte[0] {
                b'\n' | b'\r' => return Line::Text(line),
                b => {
                    if line.len() >= MAX_LINE {
                        return Line::Text(Vec::new());
                    }
                    line.push(b);
                }
            }
        }
    }

    fn run(mut self) {
        let reason = self.serve();
        self.say(&format!("\r\nmayfly break-glass: closed ({reason})\r\n"));
        self.audit("breakglass.closed", &[("reason", reason.to_owned())]);
    }

    fn serve(&mut self) -> &'static str {
        // What was typed before the window opened is not an attempt.
        let _ = nix::sys::termios::tcflush(self.tty.as_fd(), nix::sys::termios::FlushArg::TCIFLUSH);
        let mut attempts = 0;
        loop {
            self.say("\r\nmayfly break-glass token: ");
            let line = match self.read_line() {
                Line::Text(l) => l,
                Line::Expired => return "expired",
                Line::Error(e) => {
                    warn!(self.log, "break-glass console"; "error" => %e);
                    return "error";
                }
            };
            let digest = mayfly_ledger::checkpoint::sha256(&line);
            // Compared in constant time (every byte looked at).
            let diff = digest
                .iter()
                .zip(self.token_sha256.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                break;
            }
            attempts += 1;
            self.audit(
                "breakglass.login_failed",
                &[("attempt", attempts.to_string())],
            );
            if attempts >= MAX_ATTEMPTS {
                return "failed_attempts";
            }
        }
        self.audit(
            "breakglass.login",
            &[("shell", self.shell.display().to_string())],
        );
        let child = self.spawn_shell();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                warn!(self.log, "break-glass shell"; "error" => %e);
                return "error";
            }
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return "logged_out",
                Ok(None) => {}
                Err(_) => return "error",
            }
            if Instant::now() >= self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                return "expired";
            }
            std::thread::sleep(TICK);
        }
    }

    /// `setsid -c SHELL -l` with the tty as its terminal (its own session, the tty its
    /// controlling terminal).
    fn spawn_shell(&self) -> std::io::Result<Child> {
        let io = || self.tty.try_clone().map(Stdio::from);
        Command::new("setsid")
            .arg("-c")
            .arg(&self.shell)
            .arg("-l")
            .stdin(io()?)
            .stdout(io()?)
            .stderr(io()?)
            .spawn()
    }
}
