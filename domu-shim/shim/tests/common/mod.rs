//! A fake agent for the shim's tests: the backend end of a real ring in shared memory,
//! serving one transaction from a `BTreeMap`, with knobs to misbehave.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, ExitStatus};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mayfly_ring::wire::{error_code, LogLevel, ScanEntry, Start, PROTOCOL_VERSION};
use mayfly_ring::{
    Backend, EventFdNotifier, Geometry, MmapMem, Notifier, Request, Response, SharedMem,
};

/// How long the fake agent waits for any one request.
pub const AGENT_WAIT: Duration = Duration::from_secs(10);
/// How long a test waits for the shim to finish.
pub const SHIM_WAIT: Duration = Duration::from_secs(30);

/// What the fake agent does.
#[derive(Debug, Clone, Default)]
pub struct Agent {
    /// Committed data.
    pub data: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Operations on keys under this prefix are denied by "policy".
    pub deny_prefix: Option<Vec<u8>>,
    /// Answer Commit with Aborted.
    pub refuse_commit: bool,
    /// Break the protocol: commit even after refusing a write.
    pub commit_after_refused_write: bool,
    /// Answer Ready with this instead of Start.
    pub ready_reply: Option<Response>,
    /// Answer every Get with this instead of the value.
    pub get_reply: Option<Response>,
    /// Stop (without answering) at the first database operation.
    pub stall_on_db: bool,
    /// How long to wait for each request (default [`AGENT_WAIT`]).
    pub wait: Option<Duration>,
}

impl Agent {
    pub fn with_data<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            data: entries
                .into_iter()
                .map(|(k, v)| (k.as_ref().to_vec(), v.as_ref().to_vec()))
                .collect(),
            ..Self::default()
        }
    }
}

/// How the transaction ended, seen from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Committed(Vec<u8>),
    CommitRefused(Vec<u8>),
    Aborted(String),
    /// The agent stopped without a Commit or Abort (a knob, or a failure).
    Stopped(String),
}

/// What the fake agent saw.
#[derive(Debug, Clone)]
pub struct Record {
    pub end: End,
    /// Committed data afterwards.
    pub data: BTreeMap<Vec<u8>, Vec<u8>>,
    pub logs: Vec<(LogLevel, String)>,
    /// Database operations served (Get/Put/Delete/Scan/Log).
    pub ops: usize,
    /// The handler names the guest's `Ready` announced.
    pub ready_handlers: Vec<String>,
}

impl Record {
    pub fn value(&self, key: &str) -> Option<&str> {
        self.data
            .get(key.as_bytes())
            .map(|v| std::str::from_utf8(v).unwrap())
    }
}

pub fn start(handler: &str, payload: &[u8], seed: [u8; 32]) -> Start {
    Start {
        tx_id: [0x42; 16],
        handler: handler.to_string(),
        payload: payload.to_vec(),
        entropy_seed: seed,
    }
}

fn denied(agent: &Agent, key: &[u8]) -> Option<Response> {
    let prefix = agent.deny_prefix.as_ref()?;
    key.starts_with(prefix).then(|| Response::Error {
        code: error_code::DENIED,
        message: format!("policy: {} is off limits", String::from_utf8_lossy(key)),
    })
}

/// Serves one transaction: Ready -> Start, then database operations until Commit or Abort.
pub fn serve<M: SharedMem>(
    backend: &mut Backend<M>,
    notifier: &impl Notifier,
    start: Start,
    agent: Agent,
) -> Record {
    let mut record = Record {
        end: End::Stopped(String::new()),
        data: agent.data.clone(),
        logs: Vec::new(),
        ops: 0,
        ready_handlers: Vec::new(),
    };
    let stop = |mut record: Record, why: String| {
        record.end = End::Stopped(why);
        record
    };
    let wait = agent.wait.unwrap_or(AGENT_WAIT);
    let ready = match backend.recv_request(notifier, Some(wait)) {
        Ok(env) => env,
        Err(e) => return stop(record, format!("waiting for Ready: {e}")),
    };
    match &ready.body {
        Request::Ready {
            protocol_version,
            handlers,
        } => {
            assert_eq!(*protocol_version, PROTOCOL_VERSION);
            record.ready_handlers = handlers.clone();
        }
        other => panic!("first request {other:?}, not Ready"),
    }
    let reply = agent.ready_reply.clone().unwrap_or(Response::Start(start));
    backend.send_response(ready.id, &reply, notifier).unwrap();
    let mut working = agent.data.clone();
    // Like the real agent: a Commit after a refused write is refused.
    let mut refused_write = false;
    loop {
        let env = match backend.recv_request(notifier, Some(wait)) {
            Ok(env) => env,
            Err(e) => return stop(record, format!("waiting for a request: {e}")),
        };
        if agent.stall_on_db && !matches!(env.body, Request::Commit { .. } | Request::Abort { .. })
        {
            return stop(record, "stalled".into());
        }
        let reply = match env.body {
            Request::Ready { .. } => panic!("Ready twice"),
            Request::Get { key } => denied(&agent, &key).unwrap_or_else(|| {
                agent
                    .get_reply
                    .clone()
                    .unwrap_or_else(|| Response::Value(working.get(&key).cloned()))
            }),
            Request::Put { key, value } => denied(&agent, &key)
                .inspect(|_| refused_write = true)
                .unwrap_or_else(|| {
                    working.insert(key, value);
                    Response::Ok
                }),
            Request::Delete { key } => denied(&agent, &key)
                .inspect(|_| refused_write = true)
                .unwrap_or_else(|| {
                    working.remove(&key);
                    Response::Ok
                }),
            Request::Scan { start, end, limit } => {
                let limit = usize::try_from(limit).unwrap();
                let in_range: Vec<_> = working
                    .iter()
                    .filter(|(k, _)| **k >= start && end.as_ref().is_none_or(|e| *k < e))
                    .collect();
                Response::ScanResult {
                    entries: in_range
                        .iter()
                        .take(limit)
                        .map(|(k, v)| ScanEntry {
                            key: k.to_vec(),
                            value: v.to_vec(),
                        })
                        .collect(),
                    more: in_range.len() > limit,
                }
            }
            Request::Log { level, line } => {
                record.logs.push((level, line));
                Response::Ok
            }
            Request::Commit { result } => {
                if agent.refuse_commit || (refused_write && !agent.commit_after_refused_write) {
                    backend
                        .send_response(env.id, &Response::Aborted, notifier)
                        .unwrap();
                    record.end = End::CommitRefused(result);
                } else {
                    backend
                        .send_response(env.id, &Response::Committed, notifier)
                        .unwrap();
                    record.data = working;
                    record.end = End::Committed(result);
                }
                return record;
            }
            Request::Abort { reason } => {
                backend
                    .send_response(env.id, &Response::Aborted, notifier)
                    .unwrap();
                record.end = End::Aborted(reason);
                return record;
            }
        };
        record.ops += 1;
        backend.send_response(env.id, &reply, notifier).unwrap();
    }
}

/// Runs `shim` (the guest side, given the shared memory and its notifier) in one thread and
/// the fake agent in another, over a real anonymous shared mapping and real eventfds.
/// Returns what the shim returned and what the agent saw; fails the test if the shim does
/// not finish within [`SHIM_WAIT`].
pub fn transact<T: Send + 'static>(
    start: Start,
    agent: Agent,
    shim: impl FnOnce(Arc<MmapMem>, EventFdNotifier) -> T + Send + 'static,
) -> (T, Record) {
    let geometry = Geometry::DEFAULT;
    let mem = Arc::new(MmapMem::anonymous(geometry.total_len()).unwrap());
    let mut backend = Backend::new(Arc::clone(&mem), geometry).unwrap();
    let (agent_end, shim_end) = EventFdNotifier::pair().unwrap();
    let agent = thread::spawn(move || serve(&mut backend, &agent_end, start, agent));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(shim(mem, shim_end));
    });
    let shim_result = rx
        .recv_timeout(SHIM_WAIT)
        .expect("the shim finished in time");
    let record = agent.join().expect("the fake agent did not panic");
    (shim_result, record)
}

/// Clears close-on-exec on a duplicate of `fd` so that a spawned child inherits it.
pub fn inheritable(fd: impl AsFd) -> OwnedFd {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let dup = fd.as_fd().try_clone_to_owned().unwrap();
    fcntl(&dup, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    dup
}

/// Waits for `child` to exit, killing it (and failing) after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A `domu-shim` process over a sealed memfd ring and eventfds it inherited.
pub struct Spawned {
    pub child: Child,
    pub backend: Backend<MmapMem>,
    pub notifier: EventFdNotifier,
}

impl Spawned {
    /// Spawns the `domu-shim` binary (`exe`) attached to a fresh ring.
    pub fn new(exe: &str) -> Self {
        let geometry = Geometry::DEFAULT;
        let mem = MmapMem::memfd(c"mayfly-shim-test", geometry.total_len()).unwrap();
        let ring_fd = inheritable(mem.fd().unwrap());
        let backend = Backend::new(mem, geometry).unwrap();
        let (agent_end, shim_end) = EventFdNotifier::pair().unwrap();
        let signal = inheritable(shim_end.signal_fd());
        let wait = inheritable(shim_end.wait_fd());
        use std::os::fd::AsRawFd;
        let child = std::process::Command::new(exe)
            .arg("--ring-fd")
            .arg(ring_fd.as_raw_fd().to_string())
            .arg("--ring-len")
            .arg(geometry.total_len().to_string())
            .arg("--signal-fd")
            .arg(signal.as_raw_fd().to_string())
            .arg("--wait-fd")
            .arg(wait.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The child has its copies; the parent keeps only the agent's end.
        drop((ring_fd, signal, wait, shim_end));
        Self {
            child,
            backend,
            notifier: agent_end,
        }
    }

    /// Serves one transaction to the child.
    pub fn serve(&mut self, start: Start, agent: Agent) -> Record {
        serve(&mut self.backend, &self.notifier, start, agent)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
