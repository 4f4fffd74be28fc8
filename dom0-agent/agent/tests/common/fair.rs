//! Fair shares under attack through the real agent (issue 15): the load of the must-show,
//! shared by the behaviour test (`tests/fairness.rs`) and the benchmark
//! (`benches/fairness_http.rs`).
//!
//! Honest clients: `HONEST` keep-alive connections from 127.0.0.1, one client identity,
//! each sending `transfer`s back to back. Hostile clients: `HOSTILE` keep-alive connections
//! from another address ([`hostile_ip`]: another identity, a new one per mix), each sending the mix's hostile transaction again as
//! soon as the last one is answered (after a 503, again after [`HOSTILE_RETRY`]: a hostile
//! client ignores `Retry-After`). Every answer is awaited with a read timeout: one that
//! does not come is counted as a hang.
#![allow(dead_code, clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Honest transfer connections (one client identity: 127.0.0.1).
pub const HONEST: usize = 8;
/// Hostile connections (another identity: 127.0.0.2).
pub const HOSTILE: usize = 20;
/// The honest clients' source address.
pub const HONEST_IP: [u8; 4] = [127, 0, 0, 1];
/// The hostile clients' source address (of the first mix; [`hostile_ip`]).
pub const HOSTILE_IP: [u8; 4] = [127, 0, 0, 2];

/// The hostile clients' source address in mix `i` of [`MIXES`]: a new identity per mix
/// (127.0.0.2, .3, …), so that each mix's attacker starts with a clean record (no penalty
/// carried over from the mix before).
pub fn hostile_ip(i: usize) -> [u8; 4] {
    [127, 0, 0, 2 + u8::try_from(i).unwrap_or(0)]
}
/// Accounts seeded for the honest transfers.
pub const ACCOUNTS: u32 = 200;
/// How long a hostile client waits after a 503 before it asks again.
pub const HOSTILE_RETRY: Duration = Duration::from_millis(10);

/// The hostile mixes: name, handler, JSON payload. `none` is the unloaded baseline.
pub const MIXES: [(&str, &str, &str); 5] = [
    ("none", "", ""),
    ("sleep", "test.sleep", "null"),
    ("spin", "test.loop_forever", "null"),
    ("flood", "test.doorbell_flood", "null"),
    ("bigwrite", "test.big_writes", "1024"),
];

/// The shipped policy bundle (`policies/default/`), copied to `dir/policy`, with one
/// change: handlers it does not list run (`unlisted_handler = "allow"`), because the
/// hostile `test.*` handlers cannot be named in a policy (handler names are
/// `[a-z0-9_-]`). Everything else — the shipped handlers' capabilities, rates, honeytokens,
/// domain rules (a protocol violation quarantines), the per-client penalty — is as shipped,
/// unless `penalty` says otherwise: `Some(text)` replaces the shipped `penalty_*` lines
/// of `[engine]` with `text` (empty: no penalty). Without `shipped_rates` the per-client
/// `[[rate]]` rules' `max` is raised to the engine's largest (1,000,000 a window): the
/// shipped 1,000 transfers/s per client would otherwise cap the honest identity's unloaded
/// figure on a fast machine, and the benchmark measures the fairness levers, not the rate
/// limiter. Returns the directory.
pub fn shipped_policy_with_test_handlers(
    dir: &Path,
    penalty: Option<&str>,
    shipped_rates: bool,
) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/default");
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let mut found = false;
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let mut text = std::fs::read_to_string(&path).unwrap();
        if !shipped_rates && text.contains("[[rate]]") {
            let raised: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.starts_with("max = ") {
                        "max = 1_000_000".to_owned()
                    } else {
                        l.to_owned()
                    }
                })
                .collect();
            assert!(raised.iter().any(|l| l == "max = 1_000_000"));
            text = raised.join("\n") + "\n";
        }
        if text.contains("unlisted_handler = \"abort\"") {
            text = text.replace(
                "unlisted_handler = \"abort\"",
                "unlisted_handler = \"allow\"",
            );
            found = true;
            if let Some(penalty) = penalty {
                let kept: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.starts_with("penalty_"))
                    .collect();
                let engine = kept.iter().position(|l| *l == "[engine]").unwrap();
                let mut lines: Vec<&str> = kept[..=engine].to_vec();
                lines.extend(penalty.lines());
                lines.extend(&kept[engine + 1..]);
                text = lines.join("\n") + "\n";
            }
        }
        std::fs::write(policy.join(path.file_name().unwrap()), text).unwrap();
    }
    assert!(
        found,
        "the shipped engine.toml no longer sets unlisted_handler"
    );
    policy
}

/// A keep-alive HTTP/1.1 connection from a chosen loopback address.
pub struct Conn {
    addr: SocketAddr,
    src: [u8; 4],
    stream: Option<TcpStream>,
    timeout: Duration,
}

/// One answer: status, its `Retry-After` (seconds), the body, and whether the agent closes
/// the connection after it.
pub struct Answer {
    pub code: u16,
    pub retry_after: Option<u64>,
    pub body: Vec<u8>,
    pub closes: bool,
}

/// What became of one request.
pub enum Sent {
    Answered(Answer),
    /// No answer within the read timeout.
    Hung,
    /// The connection broke (closed, reset) before an answer.
    Broken,
}

impl Conn {
    pub fn new(addr: SocketAddr, src: [u8; 4], timeout: Duration) -> Self {
        Self {
            addr,
            src,
            stream: None,
            timeout,
        }
    }

    /// `POST /v1/transactions` with `body`; reconnects first when the last answer closed.
    pub fn post(&mut self, body: &str) -> Sent {
        if self.stream.is_none() {
            let s = connect_from(self.src, self.addr);
            s.set_read_timeout(Some(self.timeout)).unwrap();
            s.set_nodelay(true).unwrap();
            self.stream = Some(s);
        }
        let Some(s) = self.stream.as_mut() else {
            return Sent::Broken;
        };
        let request = format!(
            "POST /v1/transactions HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(request.as_bytes()).is_err() {
            self.stream = None;
            return Sent::Broken;
        }
        let sent = read_answer(s);
        if !matches!(&sent, Sent::Answered(a) if !a.closes) {
            self.stream = None;
        }
        sent
    }
}

/// Reads one response (head, then `Content-Length` bytes of body).
fn read_answer(s: &mut TcpStream) -> Sent {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        match s.read(&mut chunk) {
            Ok(0) => return Sent::Broken,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Sent::Hung
            }
            Err(_) => return Sent::Broken,
        }
        if buf.len() > 64 * 1024 {
            return Sent::Broken;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let length = super::common::content_length(&head);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        match s.read(&mut chunk) {
            Ok(0) => return Sent::Broken,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(_) => return Sent::Hung,
        }
    }
    Sent::Answered(Answer {
        code,
        retry_after: head.lines().find_map(|l| {
            l.strip_prefix("retry-after:")
                .and_then(|v| v.trim().parse().ok())
        }),
        body,
        closes: head.contains("\r\nconnection: close"),
    })
}

fn connect_from(src: [u8; 4], addr: SocketAddr) -> TcpStream {
    super::common::connect_from(src, addr)
}

/// Opens the [`ACCOUNTS`] accounts the honest transfers move money between (8 at a
/// time, through the API).
pub fn seed(addr: SocketAddr) {
    std::thread::scope(|scope| {
        for t in 0..8u32 {
            scope.spawn(move || {
                let mut conn = Conn::new(addr, HONEST_IP, Duration::from_secs(60));
                for i in (t..ACCOUNTS).step_by(8) {
                    let body = format!(
                        "{{\"handler\":\"open_account\",\"payload\":{{\"name\":\"a{i}\",\"balance\":1000000000}}}}"
                    );
                    match conn.post(&body) {
                        Sent::Answered(a) if a.code == 200 => {}
                        Sent::Answered(a) => panic!(
                            "seeding a{i}: {} {}",
                            a.code,
                            String::from_utf8_lossy(&a.body)
                        ),
                        _ => panic!("seeding a{i}: no answer"),
                    }
                }
            });
        }
    });
}

/// A transfer of 1 between two different random seeded accounts.
pub fn transfer(rng: &mut fastrand::Rng) -> String {
    let from = rng.u32(..ACCOUNTS);
    let to = (from + rng.u32(1..ACCOUNTS)) % ACCOUNTS;
    format!(
        "{{\"handler\":\"transfer\",\"payload\":{{\"from\":\"a{from}\",\"to\":\"a{to}\",\"amount\":1}}}}"
    )
}

/// What one mix did.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Latencies of the honest transfers that committed (200).
    pub honest_ok: Vec<Duration>,
    /// Honest answers other than 200, by status.
    pub honest_other: BTreeMap<u16, u64>,
    /// Honest requests with no answer within the timeout, or whose connection broke.
    pub honest_hung: u64,
    pub honest_broken: u64,
    /// Hostile answers by status (503: refused at admission or for want of a domain).
    pub hostile: BTreeMap<u16, u64>,
    /// Hostile 503s without `Retry-After`.
    pub hostile_503_no_retry: u64,
    pub hostile_hung: u64,
    pub hostile_broken: u64,
    /// How long the honest clients ran.
    pub elapsed: Duration,
}

impl Load {
    /// Honest commits per second.
    pub fn rate(&self) -> f64 {
        self.honest_ok.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile of the honest commits' latencies.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut l = self.honest_ok.clone();
        l.sort_unstable();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((l.len() as f64 - 1.0) * q) as usize;
        l.get(i).copied().unwrap_or_default()
    }
}

/// Runs one mix against the agent at `addr`: the hostile clients start first (and are
/// given until `settle` for half of them to have an answer or a transaction in flight),
/// then the honest ones run for `secs`; then the hostile ones stop (each finishes the
/// request it has out: bounded by `timeout`).
pub fn run(
    addr: SocketAddr,
    hostile: (&str, &str),
    hostile_ip: [u8; 4],
    secs: Duration,
    timeout: Duration,
    rng_seed: u64,
) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let hostiles: Vec<_> = if hostile.0.is_empty() {
        Vec::new()
    } else {
        let body = format!(
            "{{\"handler\":\"{}\",\"payload\":{}}}",
            hostile.0, hostile.1
        );
        (0..HOSTILE)
            .map(|_| {
                let (stop, load, body) = (stop.clone(), load.clone(), body.clone());
                std::thread::spawn(move || {
                    let mut conn = Conn::new(addr, hostile_ip, timeout);
                    while !stop.load(Ordering::Relaxed) {
                        let sent = conn.post(&body);
                        let mut l = load.lock().unwrap();
                        match sent {
                            Sent::Answered(a) => {
                                *l.hostile.entry(a.code).or_default() += 1;
                                if a.code == 503 && a.retry_after.is_none() {
                                    l.hostile_503_no_retry += 1;
                                }
                                drop(l);
                                if a.code == 503 {
                                    std::thread::sleep(HOSTILE_RETRY);
                                }
                            }
                            Sent::Hung => l.hostile_hung += 1,
                            Sent::Broken => l.hostile_broken += 1,
                        }
                    }
                })
            })
            .collect()
    };
    if !hostiles.is_empty() {
        // Until the hostile clients have had some answers, or up to 3 s: the attack is
        // under way before the honest clients are measured.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && load.lock().unwrap().hostile.values().sum::<u64>() < HOSTILE as u64 / 2
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let start = Instant::now();
    let end = start + secs;
    let honest: Vec<_> = (0..HONEST)
        .map(|c| {
            let load = load.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(rng_seed.wrapping_mul(31) + c as u64);
                let mut conn = Conn::new(addr, HONEST_IP, timeout);
                let mut mine = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    let sent = conn.post(&transfer(&mut rng));
                    match sent {
                        Sent::Answered(a) if a.code == 200 => mine.push(t.elapsed()),
                        Sent::Answered(a) => {
                            *load.lock().unwrap().honest_other.entry(a.code).or_default() += 1;
                        }
                        Sent::Hung => load.lock().unwrap().honest_hung += 1,
                        Sent::Broken => load.lock().unwrap().honest_broken += 1,
                    }
                }
                load.lock().unwrap().honest_ok.extend(mine);
            })
        })
        .collect();
    for h in honest {
        h.join().unwrap();
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in hostiles {
        h.join().unwrap();
    }
    let mut l = load.lock().unwrap().clone();
    l.elapsed = elapsed;
    l
}

/// Resident memory of process `pid`, KiB: `VmRSS` (everything) and `RssAnon` (its
/// anonymous part: heap, stacks, buffers). The difference is mostly file pages of the
/// ledger's LMDB map, which grow with the data committed (the honest transfers), not with
/// what an attack makes the agent hold, and are page cache the kernel reclaims.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// The most anonymous RSS the agent may have after an attack that it had `before_kib`
/// before: 20 % more, or 2 MiB more where that is larger (a debug agent's anonymous memory
/// is about 5 MiB, and its bounded caches — the outcomes of aborted transactions, the
/// refusal table, the allocator's per-thread arenas — take a megabyte or so of that;
/// a leaked write set is 4 MiB and more).
pub fn rss_bound(before_kib: u64) -> u64 {
    (before_kib * 120 / 100).max(before_kib + 2048)
}

/// Polls the anonymous RSS of `pid` (every 250 ms, up to `limit`) until it is within
/// [`rss_bound`] of `before_kib`; returns the last value read and how long it took. Idle
/// threads of the agent's blocking pool (which ran the attack's transactions) end 10 s
/// after their last task, and their stacks go with them.
pub fn settle_rss(pid: u32, before_kib: u64, limit: Duration) -> (u64, Duration) {
    let start = Instant::now();
    loop {
        let (_, anon) = rss_kib(pid);
        if anon <= rss_bound(before_kib) || start.elapsed() >= limit {
            return (anon, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits (up to `limit`) until the agent at `addr` has no transaction in flight.
pub fn wait_idle(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let (code, h) = super::common::request(addr, "GET", "/v1/health", "");
        if code == 200 && h["in_flight"].as_u64() == Some(0) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
