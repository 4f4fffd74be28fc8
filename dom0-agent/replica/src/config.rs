//! The `[replication]` section of the agent's configuration file (docs/failover.md).
//!
//! ```toml
//! [replication]
//! role = "primary"                # or "standby"
//! listen = "0.0.0.0:7400"         # primary: where the standby connects
//! mode = "sync"                   # primary: "async" (default) or "sync"
//! sync_timeout_ms = 2000          # primary, sync mode: wait at most this, then degrade
//! peer = "10.0.0.1:7400"          # standby: the primary's replication address; primary
//!                                 # (optional): the other node's, probed for its epoch
//! primary_identity = "3b6a…"      # standby: the primary ledger's identity key (64 hex)
//! promotion_keys = ["9c1e…"]      # standby: keys a promotion in the stream may sign with
//!                                 # (the other node's promotion key, for a rejoined primary)
//! heartbeat_ms = 1000             # both: a heartbeat frame each way this often
//! heartbeat_misses = 5            # both: this many intervals of silence: the peer is lost
//! [replication.tls]
//! cert = "/etc/mayfly/replication.pem"   # this node's certificate (self-signed is fine)
//! key = "/etc/mayfly/replication.key"
//! peer_pin = "spki:9f86…"                # SHA-256 of the peer certificate's SubjectPublicKeyInfo
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::heartbeat::{
    Heartbeat, DEFAULT_HEARTBEAT_MISSES, DEFAULT_HEARTBEAT_MS, HEARTBEAT_MISSES, HEARTBEAT_MS,
};
use crate::primary::PrimaryConfig;
use crate::standby::StandbyConfig;
use crate::tls::{PinnedTls, TlsError};
use crate::Mode;

/// Shortest `sync_timeout_ms` accepted.
pub const MIN_SYNC_TIMEOUT_MS: u64 = 10;
/// Longest `sync_timeout_ms` accepted (a commit never waits longer for the standby).
pub const MAX_SYNC_TIMEOUT_MS: u64 = 60_000;
/// Default `sync_timeout_ms`.
pub const DEFAULT_SYNC_TIMEOUT_MS: u64 = 2_000;
/// Which side this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves clients and ships its groups (`dom0-agent serve`).
    Primary,
    /// Follows a primary (`dom0-agent standby`).
    Standby,
}

/// `mode` as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    /// Asynchronous.
    #[default]
    Async,
    /// Synchronous.
    Sync,
}

/// `[replication.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The one peer accepted: `spki:` + hex SHA-256 of its certificate's SPKI.
    pub peer_pin: String,
}

/// `[replication]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// Primary or standby.
    pub role: Role,
    /// Primary: the replication listener.
    pub listen: Option<SocketAddr>,
    /// Standby: the primary's replication address. Primary (optional): the other node's
    /// replication address, probed for a higher epoch (fencing).
    pub peer: Option<SocketAddr>,
    /// Primary: async or sync.
    #[serde(default)]
    pub mode: ModeName,
    /// Primary, sync mode: longest wait for the standby before degrading.
    pub sync_timeout_ms: Option<u64>,
    /// Standby: the identity key (hex) of the primary ledger it copies.
    pub primary_identity: Option<String>,
    /// Standby: the keys (hex) a promotion head in the stream may hand signing to: the
    /// promotion key of the node that was promoted (`dom0-agent standby` prints its own at
    /// start). Without them a promotion in the stream is refused.
    #[serde(default)]
    pub promotion_keys: Vec<String>,
    /// Both: interval between heartbeats, ms.
    pub heartbeat_ms: Option<u64>,
    /// Both: intervals of silence after which the peer is lost.
    pub heartbeat_misses: Option<u32>,
    /// Mutual TLS.
    pub tls: TlsSection,
}

/// A `[replication]` section that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting the role needs is missing.
    #[error("[replication] role = \"{role}\" needs `{setting}`")]
    Missing {
        /// The role.
        role: &'static str,
        /// The setting.
        setting: &'static str,
    },
    /// A setting out of its range or malformed.
    #[error("[replication] {setting}: {reason}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// Why.
        reason: String,
    },
    /// The TLS files or the pin.
    #[error("[replication.tls] {0}")]
    Tls(#[from] TlsError),
}

impl ReplicationSection {
    /// The primary's configuration.
    pub fn primary(&self) -> Result<PrimaryConfig, ConfigError> {
        let listen = self.listen.ok_or(ConfigError::Missing {
            role: "primary",
            setting: "listen",
        })?;
        let ms = self.sync_timeout_ms.unwrap_or(DEFAULT_SYNC_TIMEOUT_MS);
        if !(MIN_SYNC_TIMEOUT_MS..=MAX_SYNC_TIMEOUT_MS).contains(&ms) {
            return Err(ConfigError::Invalid {
                setting: "sync_timeout_ms",
                reason: format!("{ms} is outside {MIN_SYNC_TIMEOUT_MS}..={MAX_SYNC_TIMEOUT_MS}"),
            });
        }
        Ok(PrimaryConfig {
            listen,
            mode: match self.mode {
                ModeName::Async => Mode::Async,
                ModeName::Sync => Mode::Sync,
            },
            sync_timeout: Duration::from_millis(ms),
            tls: self.pinned_tls()?,
            peer: self.peer,
            heartbeat: self.heartbeat()?,
        })
    }

    /// `heartbeat_ms` and `heartbeat_misses`, checked.
    pub fn heartbeat(&self) -> Result<Heartbeat, ConfigError> {
        fn within<T: PartialOrd + std::fmt::Display>(
            setting: &'static str,
            value: T,
            range: &std::ops::RangeInclusive<T>,
        ) -> Result<T, ConfigError> {
            if range.contains(&value) {
                return Ok(value);
            }
            Err(ConfigError::Invalid {
                setting,
                reason: format!("{value} is outside {}..={}", range.start(), range.end()),
            })
        }
        let ms = within(
            "heartbeat_ms",
            self.heartbeat_ms.unwrap_or(DEFAULT_HEARTBEAT_MS),
            &HEARTBEAT_MS,
        )?;
        let misses = within(
            "heartbeat_misses",
            self.heartbeat_misses.unwrap_or(DEFAULT_HEARTBEAT_MISSES),
            &HEARTBEAT_MISSES,
        )?;
        Ok(Heartbeat {
            interval: Duration::from_millis(ms),
            misses,
        })
    }

    /// The standby's configuration and the identity of the ledger it copies.
    pub fn standby(&self) -> Result<(StandbyConfig, mayfly_ledger::PublicKey), ConfigError> {
        let primary = self.peer.ok_or(ConfigError::Missing {
            role: "standby",
            setting: "peer",
        })?;
        let identity = self
            .primary_identity
            .as_deref()
            .ok_or(ConfigError::Missing {
                role: "standby",
                setting: "primary_identity",
            })?;
        let identity = mayfly_ledger::codec::unhex(identity)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| ConfigError::Invalid {
                setting: "primary_identity",
                reason: "not 64 hex digits (`dom0-agent export-key` on the primary prints it)"
                    .into(),
            })?;
        Ok((
            StandbyConfig {
                primary,
                tls: self.pinned_tls()?,
                heartbeat: self.heartbeat()?,
            },
            identity,
        ))
    }

    /// The promotion keys a standby trusts (`promotion_keys`), at most 64.
    pub fn promotion_keys(&self) -> Result<Vec<mayfly_ledger::PublicKey>, ConfigError> {
        if self.promotion_keys.len() > 64 {
            return Err(ConfigError::Invalid {
                setting: "promotion_keys",
                reason: format!("{} keys, at most 64", self.promotion_keys.len()),
            });
        }
        self.promotion_keys
            .iter()
            .map(|k| {
                mayfly_ledger::codec::unhex(k)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| ConfigError::Invalid {
                        setting: "promotion_keys",
                        reason: format!("{k:?} is not 64 hex digits"),
                    })
            })
            .collect()
    }

    fn pinned_tls(&self) -> Result<PinnedTls, ConfigError> {
        Ok(PinnedTls::load(
            &self.tls.cert,
            &self.tls.key,
            &self.tls.peer_pin,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(ms: Option<u64>, misses: Option<u32>) -> ReplicationSection {
        ReplicationSection {
            role: Role::Primary,
            listen: None,
            peer: None,
            mode: ModeName::Async,
            sync_timeout_ms: None,
            primary_identity: None,
            promotion_keys: Vec::new(),
            heartbeat_ms: ms,
            heartbeat_misses: misses,
            tls: TlsSection {
                cert: PathBuf::new(),
                key: PathBuf::new(),
                peer_pin: String::new(),
            },
        }
    }

    #[test]
    fn heartbeat_defaults_and_bounds() {
        let d = section(None, None).heartbeat().unwrap();
        assert_eq!(d, Heartbeat::default());
        assert_eq!(d.lost_after(), Duration::from_secs(5));
        let h = section(Some(50), Some(100)).heartbeat().unwrap();
        assert_eq!(h.lost_after(), Duration::from_millis(5000));
        for (ms, misses, setting) in [
            (Some(49), None, "heartbeat_ms"),
            (Some(60_001), None, "heartbeat_ms"),
            (None, Some(1), "heartbeat_misses"),
            (None, Some(101), "heartbeat_misses"),
        ] {
            match section(ms, misses).heartbeat() {
                Err(ConfigError::Invalid { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{ms:?} {misses:?}: {other:?}"),
            }
        }
    }
}
