//! Fencing (issue 18): a primary that learns that its peer is at a higher epoch (a standby
//! was promoted while it was away) stops serving clients.
//!
//! It learns it two ways, both over the authenticated replication channel:
//!
//! * it **probes** its peer (`[replication] peer` on a primary): at start and every
//!   [`PROBE_INTERVAL`], a hello with next group 0 (a probe, never served as a standby)
//!   and its epoch; the peer answers with an epoch frame (formats.md §6.1). A higher epoch
//!   fences this node, and the epoch frame says where the promotion left its history;
//! * a peer's hello (a probe or a standby) brings an epoch above its own.
//!
//! A fenced node keeps the fact in `DATA_DIR/fenced` (so a restart stays fenced until an
//! operator re-joins it as a standby, docs/failover.md), refuses client transactions with
//! 503 naming the epoch, shows `fenced` in its health and console status, and audits
//! `replication.fenced` (critical) with the records it had not replicated: its groups and
//! checkpoints after the ones the promotion kept. Nothing is deleted.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use crate::frame::{write_frame, Frame, KIND_EPOCH, KIND_STOP};
use crate::inbox::{Filled, Inbox};

/// How often a primary asks its peer's epoch.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest one probe may take (connection, TLS, answer).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// File in the data directory that keeps a node fenced across restarts.
pub const MARKER: &str = "fenced";

/// Why this node is fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// The peer's (higher) epoch.
    pub epoch: u64,
    /// This node's epoch.
    pub own_epoch: u64,
    /// Who said so.
    pub peer: String,
    /// The last group of this node the promotion kept (0: unknown, the peer's hello did
    /// not say).
    pub from_group: u64,
    /// The last checkpoint of this node the promotion kept (0: unknown).
    pub from_checkpoint: u64,
}

impl Fenced {
    /// The reason given to clients and in logs.
    pub fn reason(&self) -> String {
        format!(
            "fenced: the peer {} is at epoch {}, this node at epoch {} (a standby was promoted); this node no longer serves transactions",
            self.peer, self.epoch, self.own_epoch
        )
    }

    /// The marker's text: `key=value` lines.
    pub fn encode(&self) -> String {
        format!(
            "epoch={}\nown_epoch={}\npeer={}\nfrom_group={}\nfrom_checkpoint={}\n",
            self.epoch, self.own_epoch, self.peer, self.from_group, self.from_checkpoint
        )
    }

    /// Reads a marker (bounded; the file is as hostile as anything in the data directory).
    pub fn decode(text: &str) -> Option<Self> {
        let mut f = Self {
            epoch: 0,
            own_epoch: 0,
            peer: String::new(),
            from_group: 0,
            from_checkpoint: 0,
        };
        for line in text.lines().take(16) {
            let (k, v) = line.split_once('=')?;
            match k {
                "epoch" => f.epoch = v.parse().ok()?,
                "own_epoch" => f.own_epoch = v.parse().ok()?,
                "peer" => f.peer = v.chars().take(128).filter(|c| !c.is_control()).collect(),
                "from_group" => f.from_group = v.parse().ok()?,
                "from_checkpoint" => f.from_checkpoint = v.parse().ok()?,
                _ => return None,
            }
        }
        (f.epoch > f.own_epoch).then_some(f)
    }

    /// Reads the marker of `dir`, if any.
    pub fn load(dir: &Path) -> Option<Self> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(dir.join(MARKER))
            .ok()?
            .take(4096)
            .read_to_string(&mut text)
            .ok()?;
        Self::decode(&text)
    }

    /// Writes the marker of `dir` durably.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = dir.join(format!("{MARKER}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(self.encode().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(MARKER))
    }
}

/// What a probe learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEpoch {
    /// The peer's epoch.
    pub epoch: u64,
    /// Where the promotion that opened our epoch + 1 left our history (0 if none).
    pub from_group: u64,
    /// Its last checkpoint kept (0 if none).
    pub from_checkpoint: u64,
}

/// Why a probe gave no answer (the peer down, not a primary, or not answering in time).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Connecting, TLS or reading.
    #[error("probing {peer}: {reason}")]
    Failed {
        /// The peer.
        peer: SocketAddr,
        /// What happened.
        reason: String,
    },
}

/// Asks the primary at `peer` its epoch: a hello with next group 0 carrying ours.
pub fn probe(
    peer: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    epoch: u64,
    identity: mayfly_ledger::PublicKey,
) -> Result<PeerEpoch, ProbeError> {
    let fail = |reason: String| ProbeError::Failed { peer, reason };
    let started = Instant::now();
    let tcp = TcpStream::connect_timeout(&peer, PROBE_TIMEOUT).map_err(|e| fail(e.to_string()))?;
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .and_then(|()| tcp.set_write_timeout(Some(PROBE_TIMEOUT)))
        .map_err(|e| fail(e.to_string()))?;
    let name = ServerName::try_from("mayfly-primary").map_err(|e| fail(e.to_string()))?;
    let conn = ClientConnection::new(tls.clone(), name).map_err(|e| fail(e.to_string()))?;
    let mut stream = StreamOwned::new(conn, tcp);
    write_frame(
        &mut stream,
        &Frame::Hello {
            next_group: 0,
            epoch,
            identity,
        },
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut inbox = Inbox::default();
    loop {
        match inbox
            .next_frame_of(&[KIND_EPOCH, KIND_STOP])
            .map_err(|e| fail(e.to_string()))?
        {
            Some(Frame::Epoch {
                epoch,
                from_group,
                from_checkpoint,
            }) => {
                return Ok(PeerEpoch {
                    epoch,
                    from_group,
                    from_checkpoint,
                })
            }
            Some(Frame::Stop { reason, .. }) => return Err(fail(format!("refused: {reason}"))),
            Some(_) => return Err(fail("unexpected frame".into())),
            None => {}
        }
        if started.elapsed() > PROBE_TIMEOUT {
            return Err(fail("no answer in time".into()));
        }
        if inbox.fill(&mut stream).map_err(|e| fail(e.to_string()))? == Filled::Closed {
            return Err(fail("closed without an answer".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_round_trips_and_refuses_garbage() {
        let f = Fenced {
            epoch: 3,
            own_epoch: 2,
            peer: "10.0.0.2:7400".into(),
            from_group: 40,
            from_checkpoint: 97,
        };
        assert_eq!(Fenced::decode(&f.encode()), Some(f.clone()));
        for bad in [
            "",
            "epoch=x\n",
            "epoch=2\nown_epoch=2\n",
            "epoch=3\nshell=rm\n",
            "no equals sign",
        ] {
            assert_eq!(Fenced::decode(bad), None, "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Fenced::load(dir.path()), None);
        f.save(dir.path()).unwrap();
        assert_eq!(Fenced::load(dir.path()), Some(f));
    }
}
