//! Sockets, one thread per connection, and the path every request takes from bytes to an
//! audited answer (see the crate docs).
//!
//! Each listener has its own connection slots: at most `max_connections` on the Unix socket
//! and at most `max_tcp_connections` on the TCP listener; past its own limit a listener
//! answers "busy" and closes. The slots are separate because the TCP listener is open to
//! every local user while the Unix socket is root's: a user holding every TCP slot must not
//! be able to make the root-only socket answer "busy".
//!
//! The Unix socket is created in an existing directory that must not be writable by group
//! or others (so nobody can swap the socket), with mode 0600 (only the agent's user — root
//! on the appliance — can connect). The optional TCP listener must be a loopback address:
//! any local user can connect to it, so it is off by default; signatures still decide what
//! runs, but responses (ledger contents) are readable by whoever connects.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mayfly_command::frame::{self, FrameError};
use mayfly_command::{hex, Authorizer, Envelope, APPLIANCE_ARG};
use mayfly_ledger::{AuditEvent, CommitError, Severity};
use serde_json::{json, Value};
use slog::{info, o, warn, Logger};

use crate::commands;
use crate::services::Services;

/// How the console listens and whom it obeys.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Optional TCP listener; must be a loopback address.
    pub tcp: Option<SocketAddr>,
    /// Authorized keys and the time rules.
    pub authorizer: Authorizer,
    /// Distinct admins a destructive command needs (1..=number of keys).
    pub quorum: usize,
    /// Connections served at once on the Unix socket; more are answered "busy".
    pub max_connections: usize,
    /// Connections served at once on the TCP listener, counted apart from the Unix socket's
    /// (so TCP clients cannot take the Unix socket's slots); more are answered "busy".
    pub max_tcp_connections: usize,
    /// Read/write timeout on a connection (a client that stalls is dropped), and the time
    /// the whole request frame may take to arrive (a client that trickles is dropped).
    pub io_timeout: Duration,
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No admin key configured.
    #[error("no admin keys are configured; the console would obey nobody")]
    NoKeys,
    /// The quorum is 0 or more than the number of keys.
    #[error("quorum {quorum} is impossible with {keys} admin key(s)")]
    Quorum {
        /// Configured quorum.
        quorum: usize,
        /// Keys.
        keys: usize,
    },
    /// The socket's directory is missing or writable by others.
    #[error("socket directory {path}: {reason}")]
    SocketDir {
        /// Directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Binding or configuring the Unix socket failed.
    #[error("unix socket {path}: {source}")]
    Unix {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The TCP address is not loopback.
    #[error("console TCP address {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    /// Binding the TCP listener failed.
    #[error("console TCP {addr}: {source}")]
    Tcp {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// A clock-skew allowance or validity window of zero or above its limit.
    #[error("console {what} of {secs} s is outside 1..={max} s")]
    Timing {
        /// `clock_skew_secs` or `max_validity_secs`.
        what: &'static str,
        /// Configured.
        secs: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A thread could not be started.
    #[error("starting a console thread: {0}")]
    Thread(std::io::Error),
}

struct Shared {
    services: Services,
    config: ConsoleConfig,
    log: Logger,
    stop: AtomicBool,
    /// Connections being served, both listeners (shutdown waits for 0).
    active: AtomicUsize,
    /// Slots taken on the Unix socket and on the TCP listener.
    unix_active: AtomicUsize,
    tcp_active: AtomicUsize,
    idle: (Mutex<()>, Condvar),
    /// Nonces of read-only commands accepted while storage was full (nonce → expiry, ns):
    /// kept in memory until they expire, so such a command cannot be replayed either.
    outage_nonces: Mutex<HashMap<[u8; 16], u64>>,
}

/// Most read-only commands accepted while storage is full whose nonces are held in memory
/// at once; beyond it they are refused like destructive ones.
pub const MAX_OUTAGE_NONCES: usize = 4096;

/// Which listener a connection came through (each has its own slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Unix,
    Tcp,
}

impl Shared {
    fn slots(&self, via: Via) -> (&AtomicUsize, usize) {
        match via {
            Via::Unix => (&self.unix_active, self.config.max_connections),
            Via::Tcp => (&self.tcp_active, self.config.max_tcp_connections),
        }
    }
}

/// A running console. [`ConsoleServer::shutdown`] stops it.
pub struct ConsoleServer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    socket: PathBuf,
    tcp: Option<SocketAddr>,
}

fn check_socket_dir(path: &Path) -> Result<(), ConsoleError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let md = std::fs::metadata(dir).map_err(|e| ConsoleError::SocketDir {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !md.is_dir() {
        return Err(ConsoleError::SocketDir {
            path: dir.to_path_buf(),
            reason: "not a directory".into(),
        });
    }
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(ConsoleError::SocketDir {
            path: dir.to_path_buf(),
            reason: format!("mode {mode:o} lets others replace the socket; use 0700 or 0755"),
        });
    }
    Ok(())
}

fn bind_unix(path: &Path) -> Result<UnixListener, ConsoleError> {
    check_socket_dir(path)?;
    let err = |source| ConsoleError::Unix {
        path: path.to_path_buf(),
        source,
    };
    // A socket left by an agent that did not stop cleanly; anything else is not ours.
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            std::fs::remove_file(path).map_err(err)?;
        } else {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // The directory is not writable by others, so nobody can connect through a path they
    // control between bind and chmod; the mode keeps other users out from here on.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

impl ConsoleServer {
    /// Binds the sockets and starts serving.
    pub fn start(
        config: ConsoleConfig,
        services: Services,
        log: &Logger,
    ) -> Result<Self, ConsoleError> {
        let keys = config.authorizer.keys().len();
        if keys == 0 {
            return Err(ConsoleError::NoKeys);
        }
        if config.quorum == 0 || config.quorum > keys {
            return Err(ConsoleError::Quorum {
                quorum: config.quorum,
                keys,
            });
        }
        // Without bounds a huge skew voids every expiry (and keeps every nonce forever); a
        // huge window lets live nonces reach their cap and lock every admin out.
        use mayfly_command::authorize::defaults::{MAX_CLOCK_SKEW, MAX_MAX_VALIDITY};
        for (what, d, max, min_secs) in [
            (
                "clock_skew_secs",
                config.authorizer.skew(),
                MAX_CLOCK_SKEW,
                0,
            ),
            (
                "max_validity_secs",
                config.authorizer.max_validity(),
                MAX_MAX_VALIDITY,
                1,
            ),
        ] {
            if d > max || d.as_secs() < min_secs {
                return Err(ConsoleError::Timing {
                    what,
                    secs: d.as_secs(),
                    max: max.as_secs(),
                });
            }
        }
        if let Some(addr) = config.tcp {
            if !addr.ip().is_loopback() {
                return Err(ConsoleError::NotLoopback(addr));
            }
        }
        let unix = bind_unix(&config.socket)?;
        let tcp = match config.tcp {
            Some(addr) => {
                Some(TcpListener::bind(addr).map_err(|source| ConsoleError::Tcp { addr, source })?)
            }
            None => None,
        };
        let tcp_addr = match &tcp {
            Some(l) => Some(l.local_addr().map_err(|source| {
                ConsoleError::Tcp {
                    addr: config
                        .tcp
                        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                    source,
                }
            })?),
            None => None,
        };
        let socket = config.socket.clone();
        let shared = Arc::new(Shared {
            services,
            log: log.new(o!("component" => "console")),
            config,
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            outage_nonces: Mutex::new(HashMap::new()),
            unix_active: AtomicUsize::new(0),
            tcp_active: AtomicUsize::new(0),
            idle: (Mutex::new(()), Condvar::new()),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("console-unix".into())
                .spawn(move || accept_unix(&s, &unix))
                .map_err(ConsoleError::Thread)?,
        );
        if let Some(listener) = tcp {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("console-tcp".into())
                    .spawn(move || accept_tcp(&s, &listener))
                    .map_err(ConsoleError::Thread)?,
            );
        }
        info!(shared.log, "console listening"; "socket" => %socket.display(),
              "tcp" => tcp_addr.map(|a| a.to_string()).unwrap_or_default(),
              "admin_keys" => keys, "quorum" => shared.config.quorum);
        Ok(Self {
            shared,
            threads,
            socket,
            tcp: tcp_addr,
        })
    }

    /// The Unix socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The TCP address, if listening on one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Stops accepting, waits (at most `grace`) for commands in progress, removes the
    /// socket.
    pub fn shutdown(self, grace: Duration) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loops: each sees `stop` on its next connection.
        let _ = UnixStream::connect(&self.socket);
        if let Some(addr) = self.tcp {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        for t in self.threads {
            let _ = t.join();
        }
        let (lock, cv) = &self.shared.idle;
        if let Ok(guard) = lock.lock() {
            let _ = cv.wait_timeout_while(guard, grace, |_| {
                self.shared.active.load(Ordering::SeqCst) > 0
            });
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn accept_unix(shared: &Arc<Shared>, listener: &UnixListener) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(shared.log, "accept failed"; "error" => %e);
                continue;
            }
        };
        let peer =
            match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            {
                Ok(c) => format!("unix uid={} pid={}", c.uid(), c.pid()),
                Err(_) => "unix".to_owned(),
            };
        let _ = stream.set_read_timeout(Some(shared.config.io_timeout));
        let _ = stream.set_write_timeout(Some(shared.config.io_timeout));
        spawn_connection(shared, stream, peer, Via::Unix);
    }
}

fn accept_tcp(shared: &Arc<Shared>, listener: &TcpListener) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(shared.log, "accept failed"; "error" => %e);
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "tcp".to_owned(), |a| format!("tcp {a}"));
        let _ = stream.set_read_timeout(Some(shared.config.io_timeout));
        let _ = stream.set_write_timeout(Some(shared.config.io_timeout));
        let _ = stream.set_nodelay(true);
        spawn_connection(shared, stream, peer, Via::Tcp);
    }
}

/// Frees the connection's slot and decrements the connection count (and wakes `shutdown`)
/// however the thread ends.
struct ActiveGuard(Arc<Shared>, Via);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.slots(self.1).0.fetch_sub(1, Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        let (lock, cv) = &self.0.idle;
        let _guard = lock.lock();
        cv.notify_all();
    }
}

fn spawn_connection<S: Read + Write + Send + 'static>(
    shared: &Arc<Shared>,
    mut stream: S,
    peer: String,
    via: Via,
) {
    shared.active.fetch_add(1, Ordering::SeqCst);
    let (taken, max) = shared.slots(via);
    let n = taken.fetch_add(1, Ordering::SeqCst);
    let guard = ActiveGuard(shared.clone(), via);
    if n >= max {
        warn!(shared.log, "console busy, connection refused"; "peer" => &peer,
              "listener" => ?via, "max_connections" => max);
        let _ = frame::write_response(
            &mut stream,
            &result_error("busy", "the console is serving too many connections; retry"),
        );
        return;
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("console-conn".into())
        .spawn(move || {
            let _guard = guard;
            serve_connection(&s, &mut stream, &peer);
        });
    if let Err(e) = spawned {
        warn!(shared.log, "could not start a connection thread"; "error" => %e);
    }
}

fn result_error(code: &str, message: &str) -> Value {
    json!({"type": "result", "ok": false, "code": code, "error": message})
}

/// What is known about a request when it is rejected.
#[derive(Default)]
struct Known {
    command: Option<String>,
    nonce: Option<String>,
    signers: Option<String>,
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default().to_owned()
}

fn reject(
    shared: &Shared,
    stream: &mut impl Write,
    peer: &str,
    known: &Known,
    code: &str,
    message: &str,
) {
    let mut ev = AuditEvent::new("admin.rejected", Severity::Warning)
        .field("reason", code)
        .field("error", truncate(message, 1000))
        .field("peer", truncate(peer, 200));
    if let Some(c) = &known.command {
        ev = ev.field("command", c);
    }
    if let Some(n) = &known.nonce {
        ev = ev.field("nonce", n);
    }
    if let Some(s) = &known.signers {
        ev = ev.field("signers", s);
    }
    // Durable before the client hears back: a refusal that is not on record did not
    // happen as far as an auditor is concerned.
    if let Err(e) = shared.services.ledger.audit(vec![ev]) {
        warn!(shared.log, "auditing a rejected admin command failed"; "error" => %e);
    }
    warn!(shared.log, "admin command rejected"; "reason" => code, "error" => message, "peer" => peer);
    let _ = frame::write_response(stream, &result_error(code, message));
}

fn serve_connection<S: Read + Write>(shared: &Shared, stream: &mut S, peer: &str) {
    // The whole request must arrive within one I/O timeout (not just each byte).
    let deadline = std::time::Instant::now() + shared.config.io_timeout;
    let bytes = match frame::read_request_by(stream, deadline) {
        Ok(b) => b,
        Err(FrameError::Closed) => return,
        Err(e) => {
            let msg = format!("unreadable request frame: {e}");
            reject(shared, stream, peer, &Known::default(), "malformed", &msg);
            return;
        }
    };
    let identity = hex(&shared.services.ledger.public_key());
    if bytes == frame::HELLO {
        let _ = frame::write_response(
            stream,
            &json!({"type": "result", "ok": true, "command": "hello",
                    "result": {"appliance": identity}}),
        );
        return;
    }
    let env = match Envelope::decode(&bytes) {
        Ok(e) => e,
        Err(e) => {
            let msg = format!("not a canonical command envelope: {e}");
            reject(shared, stream, peer, &Known::default(), "malformed", &msg);
            return;
        }
    };
    let body = env.body();
    let known = Known {
        command: Some(body.command.clone()),
        nonce: Some(hex(&body.nonce)),
        signers: Some(
            env.signatures()
                .iter()
                .map(|s| hex(&s.key))
                .collect::<Vec<_>>()
                .join(","),
        ),
    };
    // The binding to this appliance is checked below, after the signatures; the commands
    // themselves never see it.
    let mut args = body.args.clone();
    let bound_to = args.remove(APPLIANCE_ARG);
    let parsed = commands::parse(&body.command, &args);
    let required = match &parsed {
        Ok(cmd) if commands::is_destructive(cmd) => shared.config.quorum,
        _ => 1,
    };
    let now = mayfly_command::now_ns();
    if let Err(r) = shared.config.authorizer.check(&env, now, required) {
        reject(shared, stream, peer, &known, r.code(), &r.to_string());
        return;
    }
    if bound_to.as_deref() != Some(identity.as_str()) {
        let msg = match &bound_to {
            Some(other) => format!(
                "the command was signed for appliance {}, this is appliance {identity}",
                truncate(other, 64)
            ),
            None => format!(
                "the command names no appliance (argument {APPLIANCE_ARG:?}); this is appliance {identity}"
            ),
        };
        reject(shared, stream, peer, &known, "wrong_appliance", &msg);
        return;
    }
    let cmd = match parsed {
        Ok(c) => c,
        Err(e) => {
            reject(shared, stream, peer, &known, e.code(), &e.to_string());
            return;
        }
    };
    let destructive = commands::is_destructive(&cmd);
    let nonce = known.nonce.clone().unwrap_or_default();
    let accepted = AuditEvent::new("admin.accepted", Severity::Notice)
        .field("command", &body.command)
        .field("nonce", &nonce)
        .field("signers", known.signers.clone().unwrap_or_default())
        .field("args", truncate(&summarize_args(&body.args), 1000))
        .field("body_sha256", hex(&env.body_hash()))
        .field("destructive", destructive)
        .field("peer", truncate(peer, 200));
    let replayed = |stream: &mut S| {
        let msg = format!("nonce {nonce} was already used: this command was replayed");
        reject(shared, stream, peer, &known, "replayed", &msg);
    };
    if held_in_memory(shared, &body.nonce, now) {
        replayed(stream);
        return;
    }
    match shared.services.ledger.record_admin_nonce(
        body.nonce,
        body.expires_ns,
        env.body_hash(),
        shared.config.authorizer.prune_before_ns(now),
        vec![accepted.clone()],
    ) {
        Ok(_) => {}
        Err(CommitError::NonceReused { .. }) => {
            replayed(stream);
            return;
        }
        // Storage is full: a read-only command (status, show, verify...) still runs, its
        // nonce held in memory until it expires and its acceptance recorded when space
        // returns, so the operator can see what is wrong. A destructive one must be durable
        // before it acts: refused below.
        Err(e @ (CommitError::DiskFull { .. } | CommitError::MapFull { .. })) if !destructive => {
            match hold_in_memory(shared, body.nonce, body.expires_ns, now) {
                Hold::Held => {
                    let deferred = accepted.field("nonce_held_in_memory", "storage full");
                    if let Err(err) = shared.services.ledger.audit_deferred(vec![deferred]) {
                        warn!(shared.log, "could not queue an admin record"; "error" => %err);
                    }
                    warn!(shared.log, "storage full: a read-only admin command runs with its nonce held in memory";
                        "command" => &body.command, "error" => %e);
                }
                Hold::Known => {
                    replayed(stream);
                    return;
                }
                Hold::Full => {
                    let msg = format!("could not record the command's nonce: {e} (and {MAX_OUTAGE_NONCES} nonces are already held in memory)");
                    reject(shared, stream, peer, &known, "storage", &msg);
                    return;
                }
            }
        }
        Err(e) => {
            let msg = format!("could not record the command's nonce: {e}");
            reject(shared, stream, peer, &known, "storage", &msg);
            return;
        }
    }
    info!(shared.log, "admin command accepted"; "command" => &body.command, "nonce" => &nonce, "peer" => peer);

    let mut emit = |frame_value: Value| {
        // A client that went away does not stop the command: it is authorized, recorded,
        // and its outcome is audited either way.
        let _ = frame::write_response(stream, &frame_value);
    };
    let outcome = commands::execute(&shared.services, &cmd, &nonce, &mut emit);
    let (reply, completed) = match outcome {
        Ok(result) => (
            json!({"type": "result", "ok": true, "command": body.command, "result": result}),
            AuditEvent::new("admin.completed", Severity::Info)
                .field("command", &body.command)
                .field("nonce", &nonce)
                .field("outcome", "ok"),
        ),
        Err(e) => (
            result_error(e.code(), &e.to_string()),
            AuditEvent::new("admin.completed", Severity::Warning)
                .field("command", &body.command)
                .field("nonce", &nonce)
                .field("outcome", "failed")
                .field("reason", e.code())
                .field("error", truncate(&e.to_string(), 1000)),
        ),
    };
    let ledger = &shared.services.ledger;
    let audited = if destructive || completed.severity <= Severity::Warning {
        ledger.audit(vec![completed]).map(drop)
    } else {
        ledger.audit_lazily(vec![completed])
    };
    if let Err(e) = audited {
        warn!(shared.log, "auditing an admin command's completion failed"; "error" => %e);
    }
    let _ = frame::write_response(stream, &reply);
}

/// Whether `nonce` was accepted while storage was full (and has not expired yet).
fn held_in_memory(shared: &Shared, nonce: &[u8; 16], now: u64) -> bool {
    let Ok(mut held) = shared.outage_nonces.lock() else {
        return false;
    };
    held.retain(|_, expires| *expires >= now);
    held.contains_key(nonce)
}

enum Hold {
    Held,
    Known,
    Full,
}

/// Holds the nonce of a read-only command accepted while storage is full, unless the ledger
/// already has it (a replay) or the bounded set is full.
fn hold_in_memory(shared: &Shared, nonce: [u8; 16], expires_ns: u64, now: u64) -> Hold {
    let store = shared.services.ledger.store();
    // Unreadable storage cannot tell a replay apart: treat it as one.
    if store.admin_nonce_known(&nonce).unwrap_or(true) {
        return Hold::Known;
    }
    let Ok(mut held) = shared.outage_nonces.lock() else {
        return Hold::Full;
    };
    held.retain(|_, expires| *expires >= now);
    if held.contains_key(&nonce) {
        return Hold::Known;
    }
    if held.len() >= MAX_OUTAGE_NONCES {
        return Hold::Full;
    }
    held.insert(nonce, expires_ns);
    Hold::Held
}

/// Arguments for the audit record: values in full when short and plain; long ones (policy
/// files) and any with a comma or a control character appear as their size and SHA-256.
fn summarize_args(args: &std::collections::BTreeMap<String, String>) -> String {
    args.iter()
        .map(|(k, v)| {
            if v.len() <= 64 && !v.contains(',') && !v.chars().any(char::is_control) {
                format!("{k}={v}")
            } else {
                let d = ring_sha256(v.as_bytes());
                format!("{k}=<{} bytes, sha256 {}>", v.len(), hex(&d))
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn ring_sha256(bytes: &[u8]) -> [u8; 32] {
    mayfly_ledger::checkpoint::sha256(bytes)
}
