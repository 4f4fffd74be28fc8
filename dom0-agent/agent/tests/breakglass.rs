//! The break-glass console through the real agent: `dom0-agent serve` with `[breakglass]
//! tty` on a pseudo-terminal standing in for the serial console, two admins of three for the
//! quorum. Nothing answers on the console until a quorum opens a window; a wrong token is
//! refused and audited; the right one gives a shell on the console; the window's end kills
//! the shell; every step is an audit record in the signed chain naming the command's nonce.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    admin_key as key, audit, console_identity, console_send, signed_command, verify, Agent,
};
use mayfly_command::{hex, keyfile, Envelope};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::Value;

fn send(socket: &Path, env: &Envelope) -> Value {
    console_send(socket, &env.encode())
}

fn signed(appliance: &str, args: &[(&str, &str)], signers: &[u8]) -> Envelope {
    signed_command(appliance, "breakglass.open", args, signers)
}

/// Reads what the console shows until `want` appears (or `limit` passes); returns it all.
fn read_until(master: &mut File, want: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while Instant::now() < deadline && !String::from_utf8_lossy(&seen).contains(want) {
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn events(dir: &Path, prefix: &str) -> Vec<(String, BTreeMap<String, String>)> {
    audit(dir)
        .into_iter()
        .filter(|(e, _)| e.starts_with(prefix))
        .collect()
}

#[test]
fn the_console_opens_only_for_a_quorum_and_the_token_and_closes_when_the_window_ends() {
    let dir = tempfile::tempdir().unwrap();
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = nix::unistd::ttyname(pty.slave.as_fd()).unwrap();
    let mut master = File::from(pty.master);
    let mut flags: Vec<String> = [0xa1u8, 0xa2, 0xa3]
        .iter()
        .flat_map(|s| ["--admin-key".to_owned(), hex(&keyfile::public_of(&key(*s)))])
        .collect();
    flags.extend(["--breakglass-tty".to_owned(), slave.display().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(dir.path(), &flags);
    let sock = dir.path().join("admin.sock");
    let id = console_identity(&sock);
    let token = "correct horse battery staple";
    let token_sha = hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());

    // Nothing answers on the console before a window is opened.
    master.write_all(b"root\n").unwrap();
    let quiet = read_until(&mut master, "token", Duration::from_millis(800));
    assert!(
        !quiet.contains("token"),
        "the console answered unasked: {quiet:?}"
    );

    // One admin is not enough.
    let lone = send(
        &sock,
        &signed(&id, &[("token_sha256", &token_sha)], &[0xa1]),
    );
    assert_eq!(lone["code"], "insufficient_quorum", "{lone}");

    // A quorum opens a one-minute window; a wrong token is refused, the right one logs in.
    let env = signed(
        &id,
        &[("token_sha256", &token_sha), ("minutes", "1")],
        &[0xa1, 0xa2],
    );
    let nonce = hex(&env.body().nonce);
    let opened = send(&sock, &env);
    assert_eq!(opened["ok"], true, "{opened}");
    let prompt = read_until(&mut master, "break-glass token:", Duration::from_secs(10));
    assert!(prompt.contains("break-glass token:"), "{prompt:?}");
    // While one window is open, another is refused.
    let second = send(
        &sock,
        &signed(&id, &[("token_sha256", &token_sha)], &[0xa2, 0xa3]),
    );
    assert_eq!(second["code"], "breakglass", "{second}");
    master.write_all(b"not the token\n").unwrap();
    let again = read_until(&mut master, "break-glass token:", Duration::from_secs(10));
    assert!(again.contains("break-glass token:"), "{again:?}");
    master.write_all(format!("{token}\n").as_bytes()).unwrap();
    master.write_all(b"echo BREAKGLASS-$((6 * 7))\n").unwrap();
    let shell = read_until(&mut master, "BREAKGLASS-42", Duration::from_secs(15));
    assert!(
        shell.contains("BREAKGLASS-42"),
        "no shell on the console: {shell:?}"
    );

    let records = events(dir.path(), "breakglass.");
    let names: Vec<&str> = records.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "breakglass.opened",
            "breakglass.login_failed",
            "breakglass.login"
        ],
        "{records:?}"
    );
    assert!(
        records.iter().all(|(_, f)| f["nonce"] == nonce),
        "{records:?}"
    );
    assert_eq!(records[0].1["minutes"], "1");

    // The window's end kills the shell and closes the console.
    let closed = read_until(&mut master, "closed (expired)", Duration::from_secs(75));
    assert!(closed.contains("closed (expired)"), "{closed:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        let r = events(dir.path(), "breakglass.closed");
        if !r.is_empty() || Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].1["reason"], "expired");
    master.write_all(b"echo STILL-$((6 * 7))\n").unwrap();
    let after = read_until(&mut master, "STILL-42", Duration::from_secs(2));
    assert!(
        !after.contains("STILL-42"),
        "a shell outlived the window: {after:?}"
    );
    drop(agent);
    let (ok, out) = verify(dir.path());
    assert!(ok, "{out}");
}
