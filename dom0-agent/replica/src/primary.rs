//! The primary's side: ships every durable group to one standby over mutual TLS, and in
//! synchronous mode holds each group's acknowledgements until the standby has it durable.
//!
//! One thread accepts the standby (one at a time) and serves it: it sends every group from
//! the one the standby asks for (its hello) up to the primary's last, at most [`WINDOW`]
//! unacknowledged, and reads the standby's acks. It sleeps in `poll(2)` on the socket and
//! on a wake-up pipe the committer writes to when a group becomes durable. A second thread
//! writes the audit records of state changes (the committer must never wait for itself).
//!
//! **The hook** is [`mayfly_ledger::GroupObserver`]: the committer calls it after each
//! durable group, before the group's commits are acknowledged. Without replication no
//! observer is set, and the committer's only cost is one atomic load per group. In
//! synchronous mode the observer waits until the standby acknowledged the group, at most
//! `sync_timeout`; then the primary **degrades** to asynchronous (audited
//! `replication.degraded`, shown in [`Status`]) and goes back (`replication.synchronous`)
//! once the standby has acknowledged every durable group. A primary **starts
//! synchronous**: after a restart its first commits wait for the standby like any other (so
//! a primary killed and restarted does not acknowledge anything the standby lacks while the
//! standby reconnects), and degrade only if it does not come within `sync_timeout`.
//!
//! **Tentative groups** (synchronous mode, docs/failover.md "The standby's journal"): the
//! committer hands the observer each group before its LMDB commit
//! ([`GroupObserver::tentative`]); the shipping thread sends it at once as a
//! [`Frame::Tentative`] when it is the next group the standby needs, a [`Frame::Confirm`]
//! once it is durable here, or a [`Frame::Abandon`] if its commit failed
//! ([`GroupObserver::abandoned`]). Acks are matched, in order, to the group frames sent
//! (`State::inflight`): an ack of an abandoned group does not count.
//!
//! **SIEM cursors** travel too: at most every [`CURSOR_INTERVAL`] the shipping thread reads
//! the exporters' persisted cursors (the `cursors` database) and, when they changed, sends
//! them as a [`Frame::Cursors`], each cut down to the audit tip of the last group already
//! sent on this connection. A cursor is a lower bound of what its collector confirmed, and
//! the standby holds every record up to it before it reads it, so a promoted standby's
//! exporter that resumes from it sends duplicates, never leaves a gap (docs/siem.md).
//!
//! **Heartbeats**: the shipping thread sends a [`Frame::Heartbeat`] every
//! `heartbeat.interval` and expects some frame from the standby at least every
//! `heartbeat.lost_after()`; a silent standby (a network partition that drops packets
//! without a reset) ends the connection as `replication.peer_lost` (shown in [`Status`])
//! and the next standby that connects is audited `replication.peer_back`. Writes to the
//! standby time out after the same silence.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use mayfly_ledger::{AuditEvent, GroupObserver, GroupRecords, Ledger, Severity};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::{ServerConnection, StreamOwned};
use slog::{error, info, warn, Logger};

use crate::frame::{
    write_frame, Frame, FrameError, KIND_ACK, KIND_HEARTBEAT, KIND_HELLO, KIND_STOP,
};
use crate::heartbeat::Heartbeat;
use crate::inbox::{Filled, Inbox};
use crate::tls::{PinnedTls, TlsError};
use crate::Mode;

/// Most groups sent and not yet acknowledged.
pub const WINDOW: u64 = 256;
/// Longest a hello may take after the connection is accepted (TLS handshake included).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a write to the standby may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the exporters' cursors are read to be shipped (when they changed).
pub const CURSOR_INTERVAL: Duration = Duration::from_millis(250);

/// How the primary replicates.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// Address the standby connects to.
    pub listen: SocketAddr,
    /// Asynchronous or synchronous.
    pub mode: Mode,
    /// Synchronous mode: longest a commit waits for the standby before the primary degrades
    /// to asynchronous.
    pub sync_timeout: Duration,
    /// This node's certificate and the standby's pin.
    pub tls: PinnedTls,
    /// The other node's replication address, probed for a higher epoch (fencing,
    /// [`crate::fence`]); `None`: only a peer's hello can fence this node.
    pub peer: Option<SocketAddr>,
    /// Heartbeat interval and the silence after which the standby is lost.
    pub heartbeat: Heartbeat,
}

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding the listener or making the wake-up pipe.
    #[error("replication listener on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another observer is already set on the ledger.
    #[error("the ledger already has a group observer (replication started twice?)")]
    ObserverTaken,
    /// A thread could not be started.
    #[error("starting a replication thread: {0}")]
    Thread(std::io::Error),
}

/// Why one standby connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
    #[error("the standby stopped at group {group}: {reason}")]
    StandbyStopped { group: u64, reason: String },
    #[error("exporting group {0}")]
    Export(#[from] mayfly_ledger::ExportError),
    #[error("reading the heads: {0}")]
    Read(#[from] mayfly_ledger::ReadError),
    #[error("the standby closed the connection")]
    Closed,
    #[error("a probe from a peer primary, answered")]
    Probe,
    #[error("nothing from the standby for {} ms ({misses} heartbeat intervals of {} ms): it is lost", lost_after.as_millis(), interval.as_millis())]
    PeerLost {
        lost_after: Duration,
        interval: Duration,
        misses: u32,
    },
}

/// What `GET /v1/health` and the console show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// `async` or `sync`, as configured.
    pub mode: Mode,
    /// Degraded to asynchronous (synchronous mode only), and why.
    pub degraded: Option<String>,
    /// The standby connected now, if one is.
    pub standby: Option<SocketAddr>,
    /// Last durable group of the primary.
    pub durable_group: u64,
    /// Last group the standby acknowledged as durable.
    pub acked_group: u64,
    /// Set once this node is fenced: a peer is at a higher epoch.
    pub fenced: Option<crate::fence::Fenced>,
    /// The exporter cursors last sent to the connected standby (name, audit sequence):
    /// where a promoted standby's collectors would resume.
    pub shipped_cursors: Vec<(String, u64)>,
    /// Set when the last standby went silent (no frame for `heartbeat_ms ×
    /// heartbeat_misses`), until a standby connects again: why.
    pub peer_lost: Option<String>,
}

impl Status {
    /// `synchronous`, `degraded` or `asynchronous`.
    pub fn state(&self) -> &'static str {
        if self.fenced.is_some() {
            return "fenced";
        }
        match (self.mode, &self.degraded) {
            (Mode::Sync, None) => "synchronous",
            (Mode::Sync, Some(_)) => "degraded",
            (Mode::Async, _) => "asynchronous",
        }
    }

    /// Groups durable here and not yet acknowledged by the standby.
    pub fn lag_groups(&self) -> u64 {
        self.durable_group.saturating_sub(self.acked_group)
    }
}

struct State {
    durable: u64,
    acked: u64,
    standby: Option<SocketAddr>,
    degraded: Option<String>,
    fenced: Option<crate::fence::Fenced>,
    shipped_cursors: Vec<(String, u64)>,
    peer_lost: Option<(String, Instant)>,
    events: Vec<AuditEvent>,
    /// Synchronous mode: the group written and signed by the committer, not yet durable
    /// here, to ship at once (docs/failover.md, "Tentative groups").
    tentative: Option<Arc<(u64, GroupRecords)>>,
    /// A tentative group whose commit failed, for the shipping thread to abandon.
    abandoned: Option<u64>,
    /// The groups sent on the connection and not yet acknowledged, in order, each with
    /// whether its acknowledgement still counts (not for an abandoned tentative group).
    inflight: VecDeque<(u64, bool)>,
}

struct Shared {
    ledger: Ledger,
    mode: Mode,
    heartbeat: Heartbeat,
    sync_timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
    wake: UnixStream,
    stop: AtomicBool,
    log: Logger,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn audit(&self, st: &mut State, event: AuditEvent) {
        st.events.push(event);
        self.changed.notify_all();
    }

    /// Fences this node (once): keeps the marker, audits what it had not replicated.
    fn fence(&self, peer: String, peer_epoch: u64, from_group: u64, from_checkpoint: u64) {
        let tips = self.ledger.tips();
        let mut st = self.lock();
        if st.fenced.is_some() || peer_epoch <= tips.epoch {
            return;
        }
        let f = crate::fence::Fenced {
            epoch: peer_epoch,
            own_epoch: tips.epoch,
            peer,
            from_group,
            from_checkpoint,
        };
        error!(self.log, "FENCED: {}", f.reason(); "from_group" => from_group, "from_checkpoint" => from_checkpoint);
        if let Err(e) = f.save(self.ledger.store().dir()) {
            error!(self.log, "keeping the fenced marker failed"; "error" => %e);
        }
        let range = |from: u64, to: u64| {
            if from == 0 {
                "unknown (the peer did not say where its epoch began)".to_string()
            } else if to <= from {
                "none".to_string()
            } else {
                format!("{}..={to}", from.saturating_add(1))
            }
        };
        let ev = AuditEvent::new("replication.fenced", Severity::Critical)
            .field("peer", &f.peer)
            .field("peer_epoch", peer_epoch)
            .field("epoch", tips.epoch)
            .field("from_group", from_group)
            .field("from_checkpoint", from_checkpoint)
            .field("unreplicated_groups", range(from_group, tips.group))
            .field(
                "unreplicated_checkpoints",
                range(from_checkpoint, tips.checkpoints.seq),
            )
            .field("reason", f.reason());
        st.fenced = Some(f);
        self.audit(&mut st, ev);
    }

    fn acked(&self, group: u64) {
        let mut st = self.lock();
        self.acked_locked(&mut st, group);
    }

    /// The standby's acknowledgement of the next group sent: it must be that group; it
    /// counts unless the group was an abandoned tentative one. Checked and counted under
    /// one lock, so that an abandon cannot fall between.
    fn ack_next(&self, group: u64) -> Result<(), String> {
        let mut st = self.lock();
        match st.inflight.pop_front() {
            Some((sent, live)) if sent == group => {
                if live {
                    self.acked_locked(&mut st, group);
                }
                Ok(())
            }
            Some((sent, _)) => Err(format!(
                "the standby acknowledged group {group}, but the next group sent is {sent}"
            )),
            None => Err(format!(
                "the standby acknowledged group {group}, which was never sent"
            )),
        }
    }

    fn acked_locked(&self, st: &mut State, group: u64) {
        if group > st.acked {
            st.acked = group;
        }
        if st.degraded.is_some() && self.mode == Mode::Sync && st.acked >= st.durable {
            st.degraded = None;
            info!(self.log, "replication synchronous again: the standby has every durable group"; "group" => st.acked);
            let ev = AuditEvent::new("replication.synchronous", Severity::Notice)
                .field("group", st.acked);
            self.audit(st, ev);
        }
        self.changed.notify_all();
    }
}

/// The ledger's observer: holds the shared state weakly (the shared state holds the
/// ledger, which holds the observer), and the mode (synchronous: groups ship before
/// their commit here).
struct Observer(Weak<Shared>, Mode);

impl GroupObserver for Observer {
    fn wants_tentative(&self) -> bool {
        self.1 == Mode::Sync
    }

    fn tentative(&self, group: u64, records: GroupRecords) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        shared.lock().tentative = Some(Arc::new((group, records)));
        let _ = (&shared.wake).write(&[1]);
    }

    fn abandoned(&self, group: u64) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let mut st = shared.lock();
        if st.tentative.as_ref().is_some_and(|t| t.0 == group) {
            st.tentative = None;
        }
        st.abandoned = Some(group);
        // An acknowledgement of it, received or to come, no longer counts: a group built
        // again at this number must be acknowledged for itself.
        for sent in st.inflight.iter_mut().filter(|(g, _)| *g == group) {
            sent.1 = false;
        }
        st.acked = st.acked.min(group.saturating_sub(1));
        warn!(shared.log, "a group shipped before its commit was abandoned: the commit failed"; "group" => group);
        drop(st);
        let _ = (&shared.wake).write(&[1]);
    }

    fn durable(&self, group: u64, acknowledging: bool) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let mut st = shared.lock();
        st.durable = st.durable.max(group);
        if st.tentative.as_ref().is_some_and(|t| t.0 <= group) {
            st.tentative = None;
        }
        // Wake the shipping thread; a full pipe already holds a wake-up.
        let _ = (&shared.wake).write(&[1]);
        if shared.mode != Mode::Sync || !acknowledging || st.degraded.is_some() {
            return;
        }
        let deadline = Instant::now() + shared.sync_timeout;
        while st.acked < group {
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "the standby did not confirm group {group} within {} ms",
                    shared.sync_timeout.as_millis()
                );
                warn!(shared.log, "REPLICATION DEGRADED to asynchronous"; "reason" => &reason);
                let ev = AuditEvent::new("replication.degraded", Severity::Warning)
                    .field("group", group)
                    .field("acked_group", st.acked)
                    .field("reason", &reason);
                st.degraded = Some(reason);
                shared.audit(&mut st, ev);
                return;
            }
            st = shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// A running primary-side replication.
pub struct Shipper {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

/// Reads the status of a running [`Shipper`] (for health sections).
#[derive(Clone)]
pub struct StatusHandle(Arc<Shared>);

impl StatusHandle {
    /// The status now.
    pub fn status(&self) -> Status {
        status_of(&self.0)
    }

    /// The last group the standby acknowledged as durable (0 until a standby has said
    /// what it holds since this start): cheap enough to poll (the SIEM exporters' ceiling).
    pub fn acked_group(&self) -> u64 {
        self.0.lock().acked
    }
}

fn status_of(shared: &Shared) -> Status {
    let st = shared.lock();
    Status {
        mode: shared.mode,
        degraded: st.degraded.clone(),
        standby: st.standby,
        durable_group: st.durable,
        acked_group: st.acked,
        fenced: st.fenced.clone(),
        shipped_cursors: st.shipped_cursors.clone(),
        peer_lost: st.peer_lost.as_ref().map(|(r, _)| r.clone()),
    }
}

impl Shipper {
    /// Binds the listener, installs the group observer on `ledger` and starts shipping.
    pub fn start(ledger: &Ledger, config: PrimaryConfig, log: &Logger) -> Result<Self, StartError> {
        let tls = config.tls.server_config()?;
        let listen_err = |source| StartError::Listen {
            addr: config.listen,
            source,
        };
        let listener = TcpListener::bind(config.listen).map_err(listen_err)?;
        let local_addr = listener.local_addr().map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(listen_err)?;
        wake.set_nonblocking(true).map_err(listen_err)?;
        wake_rx.set_nonblocking(true).map_err(listen_err)?;
        let degraded: Option<String> = None;
        let mut events = vec![AuditEvent::new("replication.started", Severity::Notice)
            .field("role", "primary")
            .field("mode", config.mode.as_str())
            .field("listen", local_addr)
            .field("sync_timeout_ms", config.sync_timeout.as_millis())];
        if let Some(f) = crate::fence::Fenced::load(ledger.store().dir()) {
            events.push(
                AuditEvent::new("replication.fenced", Severity::Critical)
                    .field("peer", &f.peer)
                    .field("peer_epoch", f.epoch)
                    .field("epoch", f.own_epoch)
                    .field("from_group", f.from_group)
                    .field("from_checkpoint", f.from_checkpoint)
                    .field(
                        "reason",
                        format!("{} (since before this start)", f.reason()),
                    ),
            );
        }
        if let Some(reason) = &degraded {
            events.push(
                AuditEvent::new("replication.degraded", Severity::Warning)
                    .field("group", ledger.tips().group)
                    .field("reason", reason),
            );
        }
        let shared = Arc::new(Shared {
            ledger: ledger.clone(),
            mode: config.mode,
            heartbeat: config.heartbeat,
            sync_timeout: config.sync_timeout,
            state: Mutex::new(State {
                durable: ledger.tips().group,
                acked: 0,
                standby: None,
                degraded,
                fenced: crate::fence::Fenced::load(ledger.store().dir()),
                shipped_cursors: Vec::new(),
                peer_lost: None,
                events,
                tentative: None,
                abandoned: None,
                inflight: VecDeque::new(),
            }),
            changed: Condvar::new(),
            wake,
            stop: AtomicBool::new(false),
            log: log.new(slog::o!("component" => "replication")),
        });
        if !ledger.set_group_observer(Arc::new(Observer(Arc::downgrade(&shared), config.mode))) {
            return Err(StartError::ObserverTaken);
        }
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("repl-audit".into())
                .spawn(move || audit_loop(&s))
                .map_err(StartError::Thread)?,
        );
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("repl-ship".into())
                .spawn(move || accept_loop(&s, &listener, &wake_rx, &tls))
                .map_err(StartError::Thread)?,
        );
        if let Some(peer) = config.peer {
            let client = config.tls.client_config()?;
            // The first probe before anything is served: a former primary that restarts
            // learns at once that it has been replaced.
            probe_once(&shared, peer, &client);
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("repl-probe".into())
                    .spawn(move || probe_loop(&s, peer, &client))
                    .map_err(StartError::Thread)?,
            );
        }
        info!(shared.log, "replication: primary"; "listen" => %local_addr, "mode" => config.mode.as_str());
        Ok(Self {
            shared,
            local_addr,
            threads,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The status now.
    pub fn status(&self) -> Status {
        status_of(&self.shared)
    }

    /// A handle that reads the status.
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle(self.shared.clone())
    }

    /// Stops shipping (the standby is told) and waits for the threads. The observer stays
    /// set on the ledger but does nothing once this is dropped.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = (&self.shared.wake).write(&[1]);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = (&self.shared.wake).write(&[1]);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn probe_once(shared: &Shared, peer: SocketAddr, tls: &Arc<rustls::ClientConfig>) {
    let tips = shared.ledger.tips();
    match crate::fence::probe(peer, tls, tips.epoch, shared.ledger.public_key()) {
        Ok(answer) => shared.fence(
            peer.to_string(),
            answer.epoch,
            answer.from_group,
            answer.from_checkpoint,
        ),
        Err(e) => slog::debug!(shared.log, "peer probe: no answer"; "error" => %e),
    }
}

fn probe_loop(shared: &Shared, peer: SocketAddr, tls: &Arc<rustls::ClientConfig>) {
    let mut last = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.lock().fenced.is_some() {
            return;
        }
        if last.elapsed() >= crate::fence::PROBE_INTERVAL {
            probe_once(shared, peer, tls);
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn audit_loop(shared: &Shared) {
    loop {
        let events = {
            let mut st = shared.lock();
            while st.events.is_empty() && !shared.stop.load(Ordering::SeqCst) {
                st = shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            std::mem::take(&mut st.events)
        };
        if !events.is_empty() {
            if let Err(e) = shared.ledger.audit(events) {
                error!(shared.log, "recording a replication event failed"; "error" => %e);
            }
        }
        if shared.stop.load(Ordering::SeqCst) && shared.lock().events.is_empty() {
            return;
        }
    }
}

fn drain(wake: &UnixStream) {
    let mut buf = [0u8; 64];
    while matches!(std::io::Read::read(&mut &*wake, &mut buf), Ok(n) if n > 0) {}
}

fn accept_loop(
    shared: &Shared,
    listener: &TcpListener,
    wake: &UnixStream,
    tls: &Arc<rustls::ServerConfig>,
) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                let result = serve_standby(shared, tcp, peer, wake, tls);
                if matches!(result, Err(ConnError::Probe)) {
                    continue;
                }
                let mut st = shared.lock();
                st.standby = None;
                let reason = match &result {
                    Ok(()) => "the primary is stopping".to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(shared.log, "standby connection ended"; "peer" => %peer, "reason" => &reason);
                if matches!(result, Err(ConnError::PeerLost { .. })) {
                    let ev = AuditEvent::new("replication.peer_lost", Severity::Warning)
                        .field("peer", peer)
                        .field("role", "primary")
                        .field("acked_group", st.acked)
                        .field("durable_group", st.durable)
                        .field("reason", &reason);
                    st.peer_lost = Some((reason, Instant::now()));
                    shared.audit(&mut st, ev);
                    continue;
                }
                let ev = AuditEvent::new(
                    "replication.standby_disconnected",
                    if matches!(result, Err(ConnError::StandbyStopped { .. })) {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                )
                .field("peer", peer)
                .field("acked_group", st.acked)
                .field("reason", &reason);
                shared.audit(&mut st, ev);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let fds = [
                    PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                    PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                ];
                let mut fds = fds;
                let _ = poll(&mut fds, PollTimeout::from(500u16));
                drain(wake);
            }
            Err(e) => {
                error!(shared.log, "accepting a standby failed"; "error" => %e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_standby(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
    wake: &UnixStream,
    tls: &Arc<rustls::ServerConfig>,
) -> Result<(), ConnError> {
    tcp.set_nonblocking(false)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(HELLO_TIMEOUT))?;
    tcp.set_write_timeout(Some(WRITE_TIMEOUT.min(shared.heartbeat.lost_after())))?;
    let conn = ServerConnection::new(tls.clone())?;
    let mut stream = StreamOwned::new(conn, tcp);
    let mut inbox = Inbox::default();
    let started = Instant::now();
    let hello = loop {
        if let Some(f) = inbox.next_frame_of(&[KIND_HELLO])? {
            break f;
        }
        if started.elapsed() > HELLO_TIMEOUT {
            return Err(ConnError::Refused(
                "no hello within the time allowed".into(),
            ));
        }
        if inbox.fill(&mut stream)? == Filled::Closed {
            return Err(ConnError::Closed);
        }
    };
    let ledger = &shared.ledger;
    let tips = ledger.tips();
    let refuse = |stream: &mut StreamOwned<ServerConnection, TcpStream>, reason: String| {
        let _ = write_frame(
            stream,
            &Frame::Stop {
                group: tips.group,
                reason: reason.clone(),
            },
        );
        Err(ConnError::Refused(reason))
    };
    let Frame::Hello {
        next_group,
        epoch,
        identity,
    } = hello
    else {
        return refuse(&mut stream, "the first frame must be a hello".into());
    };
    if identity != ledger.public_key() {
        return refuse(
            &mut stream,
            format!(
                "the standby copies ledger {}, this primary is ledger {}",
                mayfly_ledger::codec::hex(&identity),
                mayfly_ledger::codec::hex(&ledger.public_key())
            ),
        );
    }
    if epoch > tips.epoch {
        // The peer has been promoted past this node: this node is fenced.
        shared.fence(peer.to_string(), epoch, 0, 0);
        return refuse(
            &mut stream,
            format!(
                "this primary is at epoch {}, below the peer's {epoch}: it is fenced",
                tips.epoch
            ),
        );
    }
    // Every hello is answered with this primary's epoch, and where the promotion that
    // opened the hello's epoch + 1 left the peer's history.
    let start = if epoch < tips.epoch {
        ledger
            .store()
            .epoch_start(epoch.saturating_add(1))
            .map_err(|e| ConnError::Refused(format!("reading the heads: {e}")))?
    } else {
        None
    };
    write_frame(
        &mut stream,
        &Frame::Epoch {
            epoch: tips.epoch,
            from_group: start.map_or(0, |s| s.from_group),
            from_checkpoint: start.map_or(0, |s| s.from_checkpoint),
        },
    )?;
    if next_group == 0 {
        return Err(ConnError::Probe);
    }
    if epoch < tips.epoch {
        // A standby of an older epoch follows only if what it holds is a prefix of this
        // primary's history: at most the group the promotion kept, of its own epoch here.
        let held = next_group.saturating_sub(1);
        let same = held == 0
            || ledger
                .store()
                .epoch_of_group(held)
                .map_err(|e| ConnError::Refused(format!("reading the heads: {e}")))?
                == Some(epoch);
        if !same || start.is_some_and(|s| held > s.from_group) {
            return refuse(
                &mut stream,
                format!(
                    "the standby is at epoch {epoch} with groups after group {} that this primary (epoch {}) does not hold: it has another history (a former primary re-joins from an empty data directory)",
                    start.map_or(0, |s| s.from_group),
                    tips.epoch
                ),
            );
        }
    }
    if next_group > tips.group.saturating_add(1) {
        return refuse(
            &mut stream,
            format!(
                "the standby asks for group {next_group}, but this primary's last group is {} (a standby ahead of its primary has another history)",
                tips.group
            ),
        );
    }
    {
        let mut st = shared.lock();
        st.standby = Some(peer);
        st.shipped_cursors.clear();
        if let Some((was, since)) = st.peer_lost.take() {
            let ev = AuditEvent::new("replication.peer_back", Severity::Notice)
                .field("peer", peer)
                .field("role", "primary")
                .field("lost_ms", since.elapsed().as_millis())
                .field("lost_reason", was);
            shared.audit(&mut st, ev);
        }
        // What the standby has is what it has acknowledged, whatever an earlier
        // connection said.
        st.acked = next_group.saturating_sub(1);
        st.inflight.clear();
        st.abandoned = None;
        let ev = AuditEvent::new("replication.standby_connected", Severity::Notice)
            .field("peer", peer)
            .field("next_group", next_group);
        shared.audit(&mut st, ev);
    }
    shared.acked(next_group.saturating_sub(1));
    info!(shared.log, "standby connected"; "peer" => %peer, "next_group" => next_group);
    let mut next = next_group;
    // The audit tip of the last group the standby has or was sent: no cursor it gets is
    // past it.
    let mut sent_audit = match next_group.saturating_sub(1) {
        0 => 0,
        held => ledger.store().audit_tip_of_group(held)?.unwrap_or(0),
    };
    let mut cursors = CursorShipping::default();
    let beat = shared.heartbeat;
    let mut last_heard = Instant::now();
    let mut last_beat: Option<Instant> = None;
    let poll_ms = u16::try_from(beat.interval.as_millis().min(500)).unwrap_or(500);
    // The tentative group sent on this connection and not yet durable here, and whether a
    // confirm is owed for one that became durable.
    let mut sent_tentative: Option<u64> = None;
    let mut confirm_due = false;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            let _ = write_frame(
                &mut stream,
                &Frame::Stop {
                    group: next.saturating_sub(1),
                    reason: "the primary is stopping".into(),
                },
            );
            return Ok(());
        }
        let (durable, acked, tentative, abandon) = {
            let mut st = shared.lock();
            (
                st.durable,
                st.acked,
                st.tentative.clone(),
                st.abandoned.take(),
            )
        };
        stream.sock.set_nonblocking(false)?;
        if let Some(g) = abandon.filter(|g| sent_tentative == Some(*g)) {
            // Before anything else: the standby drops it before a group at its number.
            write_frame(&mut stream, &Frame::Abandon { group: g })?;
            sent_tentative = None;
        }
        while next <= durable && next.saturating_sub(acked) <= WINDOW {
            if sent_tentative == Some(next) {
                // Sent before its commit here, the same bytes: now it is durable.
                sent_tentative = None;
                confirm_due = true;
                next = next.saturating_add(1);
                continue;
            }
            let group = ledger.store().export_group(next)?;
            if let Ok(head) = mayfly_ledger::SignedHead::decode(&group.head) {
                sent_audit = head.audit.seq;
            }
            shared.lock().inflight.push_back((next, true));
            write_frame(&mut stream, &Frame::Group(group))?;
            next = next.saturating_add(1);
        }
        if confirm_due {
            write_frame(
                &mut stream,
                &Frame::Confirm {
                    group: next.saturating_sub(1),
                },
            )?;
            confirm_due = false;
        }
        if let Some(t) = tentative {
            if t.0 == next && sent_tentative.is_none() && next.saturating_sub(acked) <= WINDOW {
                // Registered only if it is still the committer's tentative group (not
                // abandoned meanwhile), under the lock an abandon takes.
                let current = {
                    let mut st = shared.lock();
                    let current = st.tentative.as_ref().is_some_and(|c| Arc::ptr_eq(c, &t));
                    if current {
                        st.inflight.push_back((next, true));
                    }
                    current
                };
                if current {
                    if let Ok(head) = mayfly_ledger::SignedHead::decode(&t.1.head) {
                        sent_audit = head.audit.seq;
                    }
                    write_frame(&mut stream, &Frame::Tentative(t.1.clone()))?;
                    sent_tentative = Some(next);
                }
            }
        }
        if let Some(frame) = cursors.due(shared, sent_audit) {
            write_frame(&mut stream, &frame)?;
        }
        if last_beat.is_none_or(|t| t.elapsed() >= beat.interval) {
            write_frame(&mut stream, &Frame::Heartbeat { group: durable })?;
            last_beat = Some(Instant::now());
        }
        // Wait for an ack, a new group, or the stop flag.
        stream.sock.set_nonblocking(true)?;
        if !stream.conn.wants_write() {
            let mut fds = [
                PollFd::new(stream.sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            let _ = poll(&mut fds, PollTimeout::from(poll_ms));
        }
        drain(wake);
        // A connection that ended is reported after the frames that came before its end:
        // a standby's stop frame (why it stopped) arrives just before it closes.
        let mut ended: Option<ConnError> = None;
        loop {
            match inbox.fill(&mut stream) {
                Ok(Filled::Bytes) => {
                    last_heard = Instant::now();
                    continue;
                }
                Ok(Filled::Nothing) => break,
                Ok(Filled::Closed) => ended = Some(ConnError::Closed),
                Err(e) => ended = Some(e.into()),
            }
            break;
        }
        if ended.is_none() && last_heard.elapsed() > beat.lost_after() {
            return Err(ConnError::PeerLost {
                lost_after: beat.lost_after(),
                interval: beat.interval,
                misses: beat.misses,
            });
        }
        while let Some(frame) = inbox.next_frame_of(&[KIND_ACK, KIND_STOP, KIND_HEARTBEAT])? {
            match frame {
                Frame::Heartbeat { .. } => {}
                Frame::Ack { group } => shared.ack_next(group).map_err(ConnError::Refused)?,
                Frame::Stop { group, reason } => {
                    return Err(ConnError::StandbyStopped { group, reason })
                }
                other => {
                    return Err(ConnError::Refused(format!(
                        "unexpected frame from the standby: {}",
                        frame_name(&other)
                    )))
                }
            }
        }
        if let Some(e) = ended {
            return Err(e);
        }
    }
}

/// When and what to ship of the exporters' cursors on one connection.
#[derive(Default)]
struct CursorShipping {
    last_read: Option<Instant>,
    sent: Option<Vec<(String, u64)>>,
}

impl CursorShipping {
    /// A cursors frame to send now: at most every [`CURSOR_INTERVAL`], when the cursors,
    /// each cut down to `sent_audit`, differ from what this connection sent last.
    fn due(&mut self, shared: &Shared, sent_audit: u64) -> Option<Frame> {
        if self
            .last_read
            .is_some_and(|t| t.elapsed() < CURSOR_INTERVAL)
        {
            return None;
        }
        self.last_read = Some(Instant::now());
        let read = match shared.ledger.store().cursors(crate::frame::MAX_CURSORS) {
            Ok(read) => read,
            Err(e) => {
                warn!(shared.log, "reading the exporter cursors to ship failed"; "error" => %e);
                return None;
            }
        };
        let now: Vec<(String, u64)> = read
            .into_iter()
            .map(|(name, seq)| (name, seq.min(sent_audit)))
            .collect();
        if self.sent.as_ref() == Some(&now) {
            return None;
        }
        shared.lock().shipped_cursors.clone_from(&now);
        self.sent = Some(now.clone());
        Some(Frame::Cursors(now))
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Group(_) => "group",
        Frame::Tentative(_) => "tentative",
        Frame::Confirm { .. } => "confirm",
        Frame::Abandon { .. } => "abandon",
        Frame::Ack { .. } => "ack",
        Frame::Stop { .. } => "stop",
        Frame::Epoch { .. } => "epoch",
        Frame::Cursors(_) => "cursors",
        Frame::Heartbeat { .. } => "heartbeat",
    }
}
