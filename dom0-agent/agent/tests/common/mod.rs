//! Helpers for end-to-end tests: a `dom0-agent serve` process on loopback and a minimal
//! HTTP/1.1 client (one request per connection).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub fn agent_exe() -> &'static str {
    env!("CARGO_BIN_EXE_dom0-agent")
}

/// The sandbox template the agents under test fork their domains from: the one named by
/// `MAYFLY_TEST_ZYGOTE` (`scripts/test.sh` runs the serve suites again against the
/// statically linked build `scripts/run.sh` uses), else `mayfly-zygote` beside the agent.
pub fn zygote_exe() -> PathBuf {
    match std::env::var_os("MAYFLY_TEST_ZYGOTE") {
        Some(path) => PathBuf::from(path),
        None => Path::new(agent_exe()).with_file_name("mayfly-zygote"),
    }
}

/// A running `dom0-agent serve`; stopped with SIGTERM on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, extra: &[&str]) -> Agent {
        let mut command = Command::new(agent_exe());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir);
        if !extra.contains(&"--pool-size") {
            command.args(["--pool-size", "4"]);
        }
        // Without the override, the agent's own default (beside itself) is what is tested.
        if std::env::var_os("MAYFLY_TEST_ZYGOTE").is_some() {
            command.arg("--zygote").arg(zygote_exe());
        }
        let mut child = command
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dom0-agent serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("agent exited before serving")
                .expect("read agent stdout");
            if let Some(rest) = line
                .strip_prefix("mayfly: serving on http://")
                .or_else(|| line.strip_prefix("mayfly: serving on https://"))
            {
                let addr = rest.split_whitespace().next().unwrap();
                break addr.parse().unwrap();
            }
        };
        // Keep draining stdout so the agent never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Agent {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
        }
    }

    pub fn post(&self, body: &str) -> (u16, Value) {
        request(self.addr, "POST", "/v1/transactions", body)
    }

    pub fn tx(&self, handler: &str, payload: Value) -> (u16, Value) {
        self.post(&serde_json::json!({"handler": handler, "payload": payload}).to_string())
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        request(self.addr, "GET", path, "")
    }

    /// Stops the agent with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Writes a permissive policy bundle (every handler allowed, domain misbehaviour aborts and
/// destroys) into `dir/policy` and returns the flag pair selecting it: for tests of the
/// hostile `test.*` handlers, which the shipped bundle does not list.
pub fn permissive_policy(dir: &Path) -> [String; 2] {
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("allow.toml"),
        "[engine]\nunlisted_handler = \"allow\"\ndomain_default = \"abort\"\n",
    )
    .unwrap();
    ["--policy".to_owned(), policy.to_string_lossy().into_owned()]
}

/// One HTTP/1.1 request; returns the status and the JSON body.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, raw) = raw_request(addr, method, path, body.as_bytes());
    let json = serde_json::from_slice(&raw)
        .unwrap_or_else(|e| panic!("non-JSON body ({e}): {}", String::from_utf8_lossy(&raw)));
    (status, json)
}

pub fn raw_request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + size]);
        b = &b[end + 2 + size + 2..];
    }
}

/// Every audit record's event name and fields, read from the ledger (also while the agent
/// runs: LMDB readers in another process are safe).
pub fn audit(dir: &Path) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    let store =
        mayfly_ledger::store::open_read_only(dir, &mayfly_ledger::StoreOptions::default()).unwrap();
    store
        .audit_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.event.event, r.event.fields))
        .collect()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn verify(dir: &Path) -> (bool, String) {
    let out = Command::new(agent_exe())
        .args(["verify", "--quiet", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The `mayfly` operator CLI, built once per test binary (it is another package's binary).
pub fn mayfly_exe() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut cmd = std::process::Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "mayfly"]);
            if !cfg!(debug_assertions) {
                cmd.arg("--release");
            }
            let status = cmd.status().unwrap();
            assert!(status.success(), "cargo build -p mayfly failed");
            let exe = Path::new(agent_exe()).with_file_name("mayfly");
            assert!(exe.exists(), "{} was not built", exe.display());
            exe
        })
        .clone()
}

/// Runs the operator CLI; returns (exit code, stdout, stderr).
pub fn mayfly(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(mayfly_exe())
        .args(args)
        .env_remove("MAYFLY_APPLIANCE")
        .env_remove("MAYFLY_ADMIN_SOCKET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `POST /v1/reports` with `Authorization: Bearer <token>`; the status and the JSON body.
pub fn report(addr: SocketAddr, token: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let code: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap())
}

/// The detector token of an agent whose data directory is `dir` (created at its start).
pub fn detector_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("detector.token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Writes `files` (name, TOML text) as a policy bundle directory `dir/name` and returns
/// the flag pair selecting it.
pub fn policy_dir(dir: &Path, name: &str, files: &[(&str, &str)]) -> [String; 2] {
    let policy = dir.join(name);
    std::fs::create_dir_all(&policy).unwrap();
    for (file, text) in files {
        std::fs::write(policy.join(file), text).unwrap();
    }
    ["--policy".to_owned(), policy.to_string_lossy().into_owned()]
}

/// A shipped policy file, `policies/<path>`.
pub fn shipped_policy(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../policies")
            .join(path),
    )
    .unwrap()
}

/// Runs `cmd` to its end with stdout and stderr captured (each well under a pipe's 64 KiB:
/// nothing drains them while it runs). One still running after `limit` is killed and fails
/// the test: a command that should stop by itself must not hang the suite.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} kept running past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The `Content-Length` of a response head (0 without one).
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// The value of the unlabelled sample `name` in `/metrics` text.
pub fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A TCP connection to `addr` from the loopback address `src` (127.0.0.0/8 is all
/// loopback on Linux), so a test can be a trusted load balancer and an ordinary client.
pub fn connect_from(src: [u8; 4], addr: SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = addr else {
        panic!("the agent listens on IPv4 loopback")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(src.into(), 0)),
    )
    .unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A test vector of docs/vectors/ (hex) as bytes.
pub fn vector(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(format!(
        "{}/../../docs/vectors/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// `extra`, then idle and header timeouts of ten minutes: the flags of a test in which
/// only another limit may close a connection.
pub fn with_long_timeouts<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = extra.to_vec();
    flags.extend([
        "--idle-timeout-ms",
        "600000",
        "--header-timeout-ms",
        "600000",
    ]);
    flags
}

/// Makes `s` the socket of a client that will not read: a 4 KiB receive buffer (so the
/// agent's answers fill it at once), and writes that give up after 5 s.
pub fn stop_reading(s: &TcpStream) {
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
}

/// 2,000 pipelined requests for /metrics (several KiB of answer each): far more answer
/// bytes than two sockets' buffers hold.
pub fn unread_requests() -> Vec<u8> {
    b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(2000)
}

/// The admin key of a test seed.
pub fn admin_key(seed: u8) -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
}

/// `command` with `args`, bound to `appliance`, valid for five minutes, signed by the admin
/// keys of `signers` (seeds).
pub fn signed_command(
    appliance: &str,
    command: &str,
    args: &[(&str, &str)],
    signers: &[u8],
) -> mayfly_command::Envelope {
    let now = mayfly_command::now_ns();
    let mut a: std::collections::BTreeMap<String, String> = args
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    a.insert(
        mayfly_command::APPLIANCE_ARG.to_owned(),
        appliance.to_owned(),
    );
    let mut e = mayfly_command::Envelope::new(mayfly_command::Body {
        nonce: mayfly_command::random_nonce().unwrap(),
        issued_ns: now,
        expires_ns: now + 300 * 1_000_000_000,
        command: command.into(),
        args: a,
    })
    .unwrap();
    for s in signers {
        e.sign(&admin_key(*s)).unwrap();
    }
    e
}

/// Sends request bytes to the console socket; returns the result frame (progress frames
/// skipped).
pub fn console_send(socket: &Path, bytes: &[u8]) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    mayfly_command::frame::write_request(&mut s, bytes).unwrap();
    loop {
        let f = mayfly_command::frame::read_response(&mut s).unwrap();
        if f["type"] == "result" {
            return f;
        }
    }
}

/// The appliance identity the console answers (`MFAH`).
pub fn console_identity(socket: &Path) -> String {
    console_send(socket, mayfly_command::frame::HELLO)["result"]["appliance"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `n` transfers of 1 from alice to bob (accounts the test opened), each acknowledged.
pub fn transfers(agent: &Agent, n: usize) {
    for _ in 0..n {
        let (code, body) = agent.tx(
            "transfer",
            serde_json::json!({"from": "alice", "to": "bob", "amount": 1}),
        );
        assert_eq!(code, 200, "{body}");
    }
}
