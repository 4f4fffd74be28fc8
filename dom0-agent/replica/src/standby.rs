//! The standby's side: connects to the primary over mutual TLS, says where its copy ends
//! (hello), applies each group it receives with [`Replica::apply`] (every link, signature,
//! the epoch and the live state checked before the group is durable) and acknowledges it.
//!
//! The standby's own audit records (connections, refused groups, a fork) go to a ledger of
//! its own (`local`), never into the copy: the copy holds only what the primary's chain
//! proves. A refused group (forged, damaged, out of order) ends the connection, and the
//! standby reconnects and asks again from its last group; a **fork** (or a copy whose data
//! no longer matches its chain) stops the standby for good: it tells the primary (stop
//! frame), audits it as critical, and returns.
//!
//! Every group is made durable through the copy's journal ([`crate::copy`]): checked on
//! top of the groups staged, appended and flushed, then acknowledged; tentative groups
//! (sent before the primary's commit) are confirmed, replaced or abandoned by the
//! primary's later frames, and confirmed groups are written to LMDB in batches. The hello
//! asks from the last confirmed group.
//!
//! The primary's **SIEM cursors** ([`Frame::Cursors`]) are written into the copy's
//! `cursors` database (outside both chains, as on the primary), so that the exporters of a
//! promoted standby resume from them. A cursor past the copy's audit tip would make a
//! promoted exporter skip records it never sent: the whole frame is refused, audited
//! (`replication.cursor_refused`, error) and the connection ends.
//!
//! **Heartbeats**: the standby sends a [`Frame::Heartbeat`] every `heartbeat.interval` and
//! ends a connection on which nothing arrived for `heartbeat.lost_after()` (a silent
//! partition): `replication.peer_lost` (warning); the first connection after it on which
//! the primary answers is audited `replication.peer_back`.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mayfly_ledger::{ApplyError, AuditEvent, Ledger, Replica, Severity};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use slog::{error, info, warn, Logger};

use crate::copy::{CopyError, JournaledCopy};
use crate::frame::{
    write_frame, Frame, FrameError, KIND_ABANDON, KIND_CONFIRM, KIND_CURSORS, KIND_EPOCH,
    KIND_GROUP, KIND_HEARTBEAT, KIND_STOP, KIND_TENTATIVE,
};
use crate::heartbeat::Heartbeat;
use crate::inbox::{Filled, Inbox};
use crate::tls::{PinnedTls, TlsError};

/// Longest a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a blocked read wakes to look at the stop flag.
pub const POLL: Duration = Duration::from_millis(200);
/// Longest wait between reconnection attempts (below the default `sync_timeout_ms`, so
/// that a synchronous primary that restarts sees its standby back before it degrades).
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Wait before asking again after the copy could not store a group (its disk is full):
/// each attempt is refused and audited by the primary, so they are spaced out.
pub const STORAGE_RETRY: Duration = Duration::from_secs(5);

/// How the standby follows its primary.
#[derive(Debug, Clone)]
pub struct StandbyConfig {
    /// The primary's replication address.
    pub primary: SocketAddr,
    /// This node's certificate and the primary's pin.
    pub tls: PinnedTls,
    /// Heartbeat interval and the silence after which the primary is lost.
    pub heartbeat: Heartbeat,
}

/// How following ended.
#[derive(Debug)]
pub enum End {
    /// The stop flag was set.
    Stopped,
    /// The primary's history and the copy's differ, or the copy is damaged: the standby
    /// must not follow any more (an operator decides).
    Fatal(ApplyError),
    /// The primary refused this standby for a reason that will not change by retrying
    /// (another ledger, another epoch).
    Refused(String),
    /// The copy's journal could not be read or replayed at start (I/O, or LMDB failed
    /// while committing what it holds).
    Storage(String),
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("connecting: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("the primary closed the connection")]
    Closed,
    #[error("the primary stopped the stream at group {group}: {reason}")]
    PrimaryStopped { group: u64, reason: String },
    #[error("refused group: {0}")]
    Refused(ApplyError),
    /// The journal could not be written (the message names the group when it was one).
    #[error("{0}")]
    Journal(String),
    #[error("unexpected frame from the primary")]
    Unexpected,
    #[error("refused cursor {name} = {seq}: past the copy's audit tip {tip} (a promoted exporter would skip records)")]
    CursorPastTip { name: String, seq: u64, tip: u64 },
    #[error("storing the primary's exporter cursors: {0}")]
    Cursors(#[from] mayfly_ledger::CursorError),
    #[error("nothing from the primary for {} ms ({misses} heartbeat intervals of {} ms): it is lost", lost_after.as_millis(), interval.as_millis())]
    PeerLost {
        lost_after: Duration,
        interval: Duration,
        misses: u32,
    },
}

/// Follows the primary until `stop` is set or following must end. Blocking; run it on a
/// thread of its own.
pub fn follow(
    replica: &mut Replica,
    config: &StandbyConfig,
    local: &Ledger,
    stop: &Arc<AtomicBool>,
    log: &Logger,
) -> Result<End, TlsError> {
    let tls = config.tls.client_config()?;
    let log = log.new(slog::o!("component" => "replication"));
    let mut backoff = Duration::from_millis(100);
    let audit = |ev: AuditEvent| {
        if let Err(e) = local.audit(vec![ev]) {
            error!(log, "recording a replication event failed"; "error" => %e);
        }
    };
    let dir = replica.store().dir().to_path_buf();
    let mut copy = match JournaledCopy::open(replica, &dir, &audit) {
        Ok((copy, recovered)) => {
            if recovered.records > 0 {
                info!(log, "replication journal replayed"; "records" => recovered.records,
                      "applied" => recovered.applied, "tentative" => ?recovered.tentative);
                audit(
                    AuditEvent::new("replication.journal_recovered", Severity::Notice)
                        .field("records", recovered.records)
                        .field("applied_groups", recovered.applied)
                        .field("group", replica.held().group)
                        .field(
                            "tentative_group",
                            recovered
                                .tentative
                                .map_or("none".to_string(), |g| g.to_string()),
                        ),
                );
            }
            copy
        }
        Err(CopyError::Apply(e)) if e.is_fatal() => {
            error!(
                log,
                "REPLICATION STOPPED: the journal does not follow the copy: {e}"
            );
            return Ok(End::Fatal(e));
        }
        Err(e) => {
            error!(log, "replaying the replication journal failed"; "error" => %e);
            audit(
                AuditEvent::new("replication.stopped", Severity::Critical)
                    .field("group", replica.held().group)
                    .field("reason", format!("replaying the replication journal: {e}")),
            );
            return Ok(End::Storage(e.to_string()));
        }
    };
    audit(
        AuditEvent::new("replication.started", Severity::Notice)
            .field("role", "standby")
            .field("primary", config.primary)
            .field("group", replica.staged_tip().group),
    );
    // Since when the primary is lost (a connection ended in silence), until it answers.
    let mut lost: Option<std::time::Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let before = replica.staged_tip().group;
        let mut answered = |held: u64| {
            if let Some(since) = lost.take() {
                info!(log, "the primary answers again"; "group" => held);
                audit(
                    AuditEvent::new("replication.peer_back", Severity::Notice)
                        .field("role", "standby")
                        .field("primary", config.primary)
                        .field("group", held)
                        .field("lost_ms", since.elapsed().as_millis()),
                );
            }
        };
        let result = connection(
            replica,
            &mut copy,
            config.primary,
            config.heartbeat,
            &tls,
            stop,
            &log,
            &mut answered,
            &audit,
        );
        // What is confirmed goes to LMDB now (the journal keeps it either way).
        if let Err(e) = copy.flush_due(replica, true) {
            warn!(log, "writing confirmed groups to the copy failed; the journal keeps them"; "error" => %e);
        }
        let progressed = replica.staged_tip().group > before;
        let storage_failed = matches!(
            result,
            Err(ConnError::Refused(ApplyError::Storage { .. }) | ConnError::Journal(_))
        );
        if storage_failed {
            error!(log, "the copy cannot store the next group (is DATA_DIR full?); asking again every few seconds";
                   "group" => replica.held().group, "retry_ms" => STORAGE_RETRY.as_millis());
        }
        match result {
            Ok(()) => return Ok(End::Stopped),
            Err(ConnError::Refused(e)) if e.is_fatal() => {
                error!(log, "REPLICATION STOPPED: {e}"; "group" => replica.held().group);
                audit(
                    AuditEvent::new(
                        if matches!(e, ApplyError::Fork { .. }) {
                            "replication.fork"
                        } else {
                            "replication.stopped"
                        },
                        Severity::Critical,
                    )
                    .field("group", replica.held().group)
                    .field("reason", e.to_string()),
                );
                return Ok(End::Fatal(e));
            }
            Err(ConnError::PrimaryStopped { reason, .. })
                if reason.starts_with("the standby copies ledger")
                    || reason.starts_with("the standby is at epoch")
                    || reason.contains("has another history") =>
            {
                error!(log, "the primary refuses this standby"; "reason" => &reason);
                audit(
                    AuditEvent::new("replication.refused_by_primary", Severity::Critical)
                        .field("reason", &reason),
                );
                return Ok(End::Refused(reason));
            }
            Err(e @ ConnError::PeerLost { .. }) => {
                warn!(log, "the primary is lost"; "error" => %e, "group" => replica.held().group);
                lost.get_or_insert_with(std::time::Instant::now);
                audit(
                    AuditEvent::new("replication.peer_lost", Severity::Warning)
                        .field("role", "standby")
                        .field("primary", config.primary)
                        .field("group", replica.held().group)
                        .field("reason", e.to_string()),
                );
            }
            Err(ConnError::CursorPastTip { name, seq, tip }) => {
                let e = ConnError::CursorPastTip {
                    name: name.clone(),
                    seq,
                    tip,
                };
                error!(log, "refused the primary's cursors"; "error" => %e);
                audit(
                    AuditEvent::new("replication.cursor_refused", Severity::Error)
                        .field("group", replica.held().group)
                        .field("collector", name)
                        .field("seq", seq)
                        .field("audit_tip", tip)
                        .field("reason", e.to_string()),
                );
            }
            Err(e) => {
                warn!(log, "replication connection ended"; "error" => %e, "group" => replica.held().group);
                let severity = if matches!(e, ConnError::Refused(_) | ConnError::Cursors(_)) {
                    Severity::Error
                } else {
                    Severity::Warning
                };
                audit(
                    AuditEvent::new("replication.connection_ended", severity)
                        .field("group", replica.held().group)
                        .field("reason", e.to_string()),
                );
            }
        }
        backoff = if storage_failed {
            STORAGE_RETRY
        } else if progressed {
            Duration::from_millis(100)
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        // Sleep in short steps so that a stop is seen at once.
        let mut slept = Duration::ZERO;
        while slept < backoff && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(POLL.min(backoff));
            slept += POLL.min(backoff);
        }
    }
    Ok(End::Stopped)
}

#[allow(clippy::too_many_arguments)]
fn connection(
    replica: &mut Replica,
    copy: &mut JournaledCopy,
    primary: SocketAddr,
    beat: Heartbeat,
    tls: &Arc<rustls::ClientConfig>,
    stop: &AtomicBool,
    log: &Logger,
    answered: &mut dyn FnMut(u64),
    audit: &dyn Fn(AuditEvent),
) -> Result<(), ConnError> {
    let tcp = TcpStream::connect_timeout(&primary, CONNECT_TIMEOUT)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(POLL.min(beat.interval)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(30).min(beat.lost_after())))?;
    // The pin, not the name, authenticates the primary; the name is only what SNI carries.
    let name = ServerName::try_from("mayfly-primary").map_err(|_| ConnError::Unexpected)?;
    let conn = ClientConnection::new(tls.clone(), name)?;
    let mut stream = StreamOwned::new(conn, tcp);
    let held = replica.staged_tip().clone();
    // A tentative group is asked for again: the primary's answer (the same group, a
    // different one, or none yet) resolves it.
    let next_group = replica.confirmed_group().saturating_add(1);
    copy.connected(replica);
    write_frame(
        &mut stream,
        &Frame::Hello {
            next_group,
            epoch: held.epoch,
            identity: replica_identity(replica),
        },
    )?;
    info!(log, "connected to the primary"; "primary" => %primary, "next_group" => next_group,
          "tentative" => ?replica.tentative());
    let mut inbox = Inbox::default();
    let mut last_heard = std::time::Instant::now();
    let mut last_beat = std::time::Instant::now();
    loop {
        while let Some(frame) = inbox.next_frame_of(&[
            KIND_GROUP,
            KIND_TENTATIVE,
            KIND_CONFIRM,
            KIND_ABANDON,
            KIND_STOP,
            KIND_EPOCH,
            KIND_CURSORS,
            KIND_HEARTBEAT,
        ])? {
            match frame {
                Frame::Heartbeat { .. } => {}
                Frame::Group(ref group) | Frame::Tentative(ref group) => {
                    let tentative = matches!(frame, Frame::Tentative(_));
                    match copy.receive(replica, group, tentative, audit) {
                        Ok(received) => {
                            write_frame(
                                &mut stream,
                                &Frame::Ack {
                                    group: received.ack,
                                },
                            )?;
                        }
                        Err(e) => {
                            let _ = write_frame(
                                &mut stream,
                                &Frame::Stop {
                                    group: replica.confirmed_group(),
                                    reason: e.to_string(),
                                },
                            );
                            return Err(conn_error(e));
                        }
                    }
                }
                Frame::Confirm { group } => copy
                    .confirm(replica, group, audit)
                    .map_err(conn_error)?,
                Frame::Abandon { group } => copy
                    .abandon(replica, group, audit)
                    .map_err(conn_error)?,
                Frame::Cursors(mut cursors) => {
                    // Checked against every group held (staged ones too), written no
                    // further than LMDB's audit tip: a cursor is a lower bound.
                    let tip = replica.staged_tip().audit.seq;
                    if let Some((name, seq)) = cursors.iter().find(|(_, seq)| *seq > tip) {
                        let e = ConnError::CursorPastTip {
                            name: name.clone(),
                            seq: *seq,
                            tip,
                        };
                        let _ = write_frame(
                            &mut stream,
                            &Frame::Stop {
                                group: replica.held().group,
                                reason: e.to_string(),
                            },
                        );
                        return Err(e);
                    }
                    let durable = replica.held().audit.seq;
                    for (_, seq) in &mut cursors {
                        *seq = (*seq).min(durable);
                    }
                    replica.store().set_cursors(&cursors)?;
                }
                Frame::Stop { group, reason } => {
                    return Err(ConnError::PrimaryStopped { group, reason })
                }
                // The primary's epoch: below the copy's, it is a former primary that was
                // replaced (it fences itself when it reads this hello's epoch).
                Frame::Epoch { epoch, .. } if epoch < held.epoch => {
                    return Err(ConnError::PrimaryStopped {
                        group: held.group,
                        reason: format!(
                            "the standby is at epoch {}, the primary at epoch {epoch}: the primary has been replaced",
                            held.epoch
                        ),
                    })
                }
                Frame::Epoch { .. } => answered(replica.held().group),
                Frame::Hello { .. } | Frame::Ack { .. } => return Err(ConnError::Unexpected),
            }
        }
        copy.flush_due(replica, false).map_err(conn_error)?;
        if stop.load(Ordering::SeqCst) {
            let _ = write_frame(
                &mut stream,
                &Frame::Stop {
                    group: replica.held().group,
                    reason: "the standby is stopping".into(),
                },
            );
            return Ok(());
        }
        if last_beat.elapsed() >= beat.interval {
            write_frame(
                &mut stream,
                &Frame::Heartbeat {
                    group: replica.confirmed_group(),
                },
            )?;
            last_beat = std::time::Instant::now();
        }
        match inbox.fill(&mut stream)? {
            Filled::Closed => return Err(ConnError::Closed),
            Filled::Bytes => last_heard = std::time::Instant::now(),
            Filled::Nothing => {}
        }
        if last_heard.elapsed() > beat.lost_after() {
            return Err(ConnError::PeerLost {
                lost_after: beat.lost_after(),
                interval: beat.interval,
                misses: beat.misses,
            });
        }
    }
}

fn conn_error(e: CopyError) -> ConnError {
    match e {
        CopyError::Apply(e) | CopyError::Refused { source: e, .. } => ConnError::Refused(e),
        CopyError::Journal(e) => ConnError::Journal(e.to_string()),
        e @ CopyError::Store { .. } => ConnError::Journal(e.to_string()),
    }
}

/// The identity of the ledger the copy follows: the key pinned at its creation.
fn replica_identity(replica: &Replica) -> mayfly_ledger::PublicKey {
    replica.identity()
}
