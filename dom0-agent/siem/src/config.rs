//! The `[siem]` section of the agent's TOML configuration.
//!
//! ```toml
//! [siem]
//! pen = 32473                  # Private Enterprise Number of the SD-IDs (RFC 5612's
//!                              # documentation number by default: use your own)
//! hostname = "mayfly-1"        # HOSTNAME field [default: the kernel's host name]
//! app_name = "mayfly"          # APP-NAME field
//! confirm_ms = 250             # how long a TCP/TLS connection (or a UDP peer) must stay
//!                              # healthy after a write before the events count as delivered
//! backoff_min_ms = 100         # first wait after a failure; doubles up to backoff_max_ms
//! backoff_max_ms = 30000
//! cursor_flush_ms = 1000       # longest time between two durable cursor writes
//! unreplicated_hold_ms = 30000 # with a [replication] primary: longest a record waits for
//!                              # the standby before it is exported anyway (audited)
//!                              # (every *_ms setting: 1..=3600000)
//!
//! [[siem.collector]]
//! name = "soc"                 # 1..=64 of [a-z0-9_.-]; names the cursor in the ledger
//! transport = "tls"            # "udp" | "tcp" (RFC 6587 octet counting) | "tls" (RFC 5425)
//! address = "siem.example.org:6514"
//! server_name = "siem.example.org"  # TLS: name the certificate must carry [default: host of address]
//! ca = "/etc/mayfly/siem-ca.pem"    # TLS: CA certificate(s) the collector's chain must lead to
//! client_cert = "/etc/mayfly/siem-client.pem"  # TLS: optional client certificate chain...
//! client_key = "/etc/mayfly/siem-client.key"   # ...and its PKCS#8, PKCS#1 or SEC1 key
//! facility = "local0"          # kern, user, ..., local0..local7 [default: local0]
//! max_message_bytes = 8192     # longer messages have their longest values cut
//!                              # (2048..=65507 over UDP, ..=262144 over TCP and TLS)
//! start = "oldest"             # first start of this collector: "oldest" audit record, or "newest"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::rfc5424::{DOCUMENTATION_PEN, MAX_APP_NAME, MAX_HOSTNAME, MIN_MESSAGE_BYTES};

/// Why a `[siem]` section is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A collector name is not a valid cursor name.
    #[error("siem collector name {0:?}: 1..=64 bytes of [a-z0-9_.-]")]
    BadName(String),
    /// Two collectors share a name (they would share a cursor).
    #[error("siem collector name {0:?} is used twice")]
    DuplicateName(String),
    /// The facility is not one of the RFC 5424 names.
    #[error("siem collector {collector}: unknown facility {facility:?} (kern, user, mail, daemon, auth, syslog, lpr, news, uucp, cron, authpriv, ftp, ntp, audit, alert, clock, local0..local7)")]
    BadFacility {
        /// Collector.
        collector: String,
        /// What was given.
        facility: String,
    },
    /// The address has no port or no host.
    #[error("siem collector {collector}: address {address:?} is not host:port")]
    BadAddress {
        /// Collector.
        collector: String,
        /// What was given.
        address: String,
    },
    /// TLS without a CA, or TLS files given to a non-TLS collector, or half a client pair.
    #[error("siem collector {collector}: {reason}")]
    Tls {
        /// Collector.
        collector: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The message size limit is below the minimum or above what the transport carries.
    #[error("siem collector {collector}: max_message_bytes {value} is outside {MIN_MESSAGE_BYTES}..={max} for this transport")]
    MessageLimit {
        /// Largest allowed for the transport.
        max: usize,
        /// Collector.
        collector: String,
        /// What was given.
        value: usize,
    },
    /// A timing setting is zero or inverted.
    #[error("siem: {0}")]
    Timing(&'static str),
    /// `hostname` or `app_name` is not printable US-ASCII of the allowed length.
    #[error("siem: {field} {value:?} must be 1..={max} printable US-ASCII characters")]
    BadHeader {
        /// Field.
        field: &'static str,
        /// What was given.
        value: String,
        /// Longest allowed.
        max: usize,
    },
}

/// How messages reach a collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// One datagram per message (RFC 5426).
    Udp,
    /// TCP with octet-counting framing (RFC 6587 §3.4.1).
    Tcp,
    /// TLS with octet-counting framing (RFC 5425).
    Tls,
}

impl TransportKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

/// Where a collector that has no cursor yet starts reading the audit chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// From audit record 1: the collector gets the whole history.
    #[default]
    Oldest,
    /// From the records appended after the exporter starts.
    Newest,
}

/// One `[[siem.collector]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Name; also the key of its cursor in the ledger.
    pub name: String,
    /// Transport.
    pub transport: TransportKind,
    /// `host:port`.
    pub address: String,
    /// TLS: server name to verify [default: the host part of `address`].
    pub server_name: Option<String>,
    /// TLS: PEM file of the CA certificate(s) to trust.
    pub ca: Option<PathBuf>,
    /// TLS: PEM file of the client certificate chain.
    pub client_cert: Option<PathBuf>,
    /// TLS: PEM file of the client private key.
    pub client_key: Option<PathBuf>,
    /// Facility name [default: local0].
    pub facility: Option<String>,
    /// Longest message [default: 8192].
    pub max_message_bytes: Option<usize>,
    /// Where a new collector starts.
    #[serde(default)]
    pub start: Start,
}

/// The `[siem]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiemConfig {
    /// Private Enterprise Number of the SD-IDs.
    #[serde(default = "default_pen")]
    pub pen: u32,
    /// HOSTNAME [default: the kernel's host name].
    pub hostname: Option<String>,
    /// APP-NAME [default: mayfly].
    pub app_name: Option<String>,
    /// Healthy time after a write before its events count as delivered, ms.
    #[serde(default = "default_confirm_ms")]
    pub confirm_ms: u64,
    /// First back-off after a failure, ms.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Longest back-off, ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Longest time between durable cursor writes, ms.
    #[serde(default = "default_cursor_flush_ms")]
    pub cursor_flush_ms: u64,
    /// On a replication primary: longest an audit record waits for the standby to hold it
    /// before it is exported anyway, as `unreplicated="true"` (docs/siem.md), ms.
    #[serde(default = "default_unreplicated_hold_ms")]
    pub unreplicated_hold_ms: u64,
    /// The collectors.
    #[serde(default, rename = "collector")]
    pub collectors: Vec<CollectorConfig>,
}

fn default_pen() -> u32 {
    DOCUMENTATION_PEN
}
fn default_confirm_ms() -> u64 {
    250
}
fn default_backoff_min_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_cursor_flush_ms() -> u64 {
    1000
}
fn default_unreplicated_hold_ms() -> u64 {
    30_000
}

impl Default for SiemConfig {
    fn default() -> Self {
        Self {
            pen: default_pen(),
            hostname: None,
            app_name: None,
            confirm_ms: default_confirm_ms(),
            backoff_min_ms: default_backoff_min_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            cursor_flush_ms: default_cursor_flush_ms(),
            unreplicated_hold_ms: default_unreplicated_hold_ms(),
            collectors: Vec::new(),
        }
    }
}

/// Largest message over UDP: the largest IPv4 UDP payload (RFC 5426 §3.2).
pub const MAX_UDP_MESSAGE_BYTES: usize = 65_507;
/// Largest message over TCP and TLS accepted in the configuration (a full audit record with
/// every value escaped fits).
pub const MAX_STREAM_MESSAGE_BYTES: usize = 256 << 10;

/// The RFC 5424 facility names, by code.
pub const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

/// The code of a facility name.
pub fn facility_code(name: &str) -> Option<u8> {
    FACILITIES
        .iter()
        .position(|f| *f == name)
        .and_then(|i| u8::try_from(i).ok())
}

/// Largest value of every `*_ms` setting: one hour.
pub const MAX_TIMING_MS: u64 = 3_600_000;

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (33..=126).contains(&b))
}

impl SiemConfig {
    /// Checks every collector and setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // The upper bound keeps every `Instant + Duration` in the exporter far from
        // overflow (which would panic the collector's thread) and the back-off bounded.
        let in_range = |ms: u64| (1..=MAX_TIMING_MS).contains(&ms);
        if !in_range(self.confirm_ms)
            || !in_range(self.backoff_min_ms)
            || !in_range(self.cursor_flush_ms)
            || !in_range(self.backoff_max_ms)
            || !in_range(self.unreplicated_hold_ms)
            || self.backoff_max_ms < self.backoff_min_ms
        {
            return Err(ConfigError::Timing(
                "confirm_ms, backoff_min_ms, backoff_max_ms, cursor_flush_ms and unreplicated_hold_ms must be 1..=3600000 (one hour), and backoff_max_ms at least backoff_min_ms",
            ));
        }
        for (field, value, max) in [
            ("hostname", &self.hostname, MAX_HOSTNAME),
            ("app_name", &self.app_name, MAX_APP_NAME),
        ] {
            if let Some(v) = value {
                if !printable(v, max) {
                    return Err(ConfigError::BadHeader {
                        field,
                        value: v.clone(),
                        max,
                    });
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.collectors {
            c.validate()?;
            if !seen.insert(c.name.as_str()) {
                return Err(ConfigError::DuplicateName(c.name.clone()));
            }
        }
        Ok(())
    }

    /// The confirmation delay.
    pub fn confirm(&self) -> Duration {
        Duration::from_millis(self.confirm_ms)
    }

    /// How long a record waits for the standby before it is exported anyway.
    pub fn unreplicated_hold(&self) -> Duration {
        Duration::from_millis(self.unreplicated_hold_ms)
    }
}

impl CollectorConfig {
    /// A collector with defaults for everything optional.
    pub fn new(name: &str, transport: TransportKind, address: &str) -> Self {
        Self {
            name: name.into(),
            transport,
            address: address.into(),
            server_name: None,
            ca: None,
            client_cert: None,
            client_key: None,
            facility: None,
            max_message_bytes: None,
            start: Start::Oldest,
        }
    }

    /// The facility code.
    pub fn facility_code(&self) -> Result<u8, ConfigError> {
        let name = self.facility.as_deref().unwrap_or("local0");
        facility_code(name).ok_or_else(|| ConfigError::BadFacility {
            collector: self.name.clone(),
            facility: name.into(),
        })
    }

    /// The message size limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes.unwrap_or(8192)
    }

    /// The host part of `address` (brackets of an IPv6 literal removed).
    pub fn host(&self) -> Option<&str> {
        let (host, port) = self.address.rsplit_once(':')?;
        if port.parse::<u16>().is_err() || host.is_empty() {
            return None;
        }
        Some(
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host),
        )
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !mayfly_ledger::cursor::valid_name(&self.name) {
            return Err(ConfigError::BadName(self.name.clone()));
        }
        if self.host().is_none() {
            return Err(ConfigError::BadAddress {
                collector: self.name.clone(),
                address: self.address.clone(),
            });
        }
        self.facility_code()?;
        let max = match self.transport {
            TransportKind::Udp => MAX_UDP_MESSAGE_BYTES,
            TransportKind::Tcp | TransportKind::Tls => MAX_STREAM_MESSAGE_BYTES,
        };
        if !(MIN_MESSAGE_BYTES..=max).contains(&self.max_message_bytes()) {
            return Err(ConfigError::MessageLimit {
                collector: self.name.clone(),
                value: self.max_message_bytes(),
                max,
            });
        }
        let tls = |reason| ConfigError::Tls {
            collector: self.name.clone(),
            reason,
        };
        let has_tls_files = self.ca.is_some()
            || self.client_cert.is_some()
            || self.client_key.is_some()
            || self.server_name.is_some();
        match self.transport {
            TransportKind::Tls if self.ca.is_none() => Err(tls(
                "transport \"tls\" needs `ca` (the collector's certificate is always verified)",
            )),
            TransportKind::Tls if self.client_cert.is_some() != self.client_key.is_some() => {
                Err(tls("`client_cert` and `client_key` go together"))
            }
            TransportKind::Udp | TransportKind::Tcp if has_tls_files => Err(tls(
                "ca, client_cert, client_key and server_name are for transport \"tls\" only",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses_and_validates() {
        let text = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| {
                l.strip_prefix("//! ")
                    .or(l.strip_prefix("//!"))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        #[derive(Deserialize)]
        struct File {
            siem: SiemConfig,
        }
        let f: File = toml::from_str(&text).unwrap();
        f.siem.validate().unwrap();
        let c = &f.siem.collectors[0];
        assert_eq!(c.transport, TransportKind::Tls);
        assert_eq!(c.facility_code().unwrap(), 16);
        assert_eq!(c.host(), Some("siem.example.org"));
    }

    #[test]
    fn refusals() {
        let ok = CollectorConfig::new("a", TransportKind::Tcp, "127.0.0.1:514");
        let cfg = |c: CollectorConfig| SiemConfig {
            collectors: vec![c],
            ..SiemConfig::default()
        };
        assert!(cfg(ok.clone()).validate().is_ok());
        let mut c = ok.clone();
        c.name = "A".into();
        assert!(matches!(cfg(c).validate(), Err(ConfigError::BadName(_))));
        let mut c = ok.clone();
        c.address = "host".into();
        assert!(matches!(
            cfg(c).validate(),
            Err(ConfigError::BadAddress { .. })
        ));
        let mut c = ok.clone();
        c.facility = Some("local9".into());
        assert!(matches!(
            cfg(c).validate(),
            Err(ConfigError::BadFacility { .. })
        ));
        let mut c = ok.clone();
        c.transport = TransportKind::Tls;
        assert!(matches!(
            cfg(c.clone()).validate(),
            Err(ConfigError::Tls { .. })
        ));
        c.ca = Some("/ca.pem".into());
        assert!(cfg(c.clone()).validate().is_ok());
        c.client_key = Some("/k.pem".into());
        assert!(matches!(cfg(c).validate(), Err(ConfigError::Tls { .. })));
        let mut c = ok.clone();
        c.ca = Some("/ca.pem".into());
        assert!(matches!(cfg(c).validate(), Err(ConfigError::Tls { .. })));
        let mut c = ok.clone();
        c.max_message_bytes = Some(480);
        assert!(matches!(
            cfg(c).validate(),
            Err(ConfigError::MessageLimit { .. })
        ));
        let mut c = CollectorConfig::new("u", TransportKind::Udp, "127.0.0.1:514");
        c.max_message_bytes = Some(65_508);
        assert!(matches!(
            cfg(c.clone()).validate(),
            Err(ConfigError::MessageLimit { .. })
        ));
        c.transport = TransportKind::Tcp;
        assert!(cfg(c).validate().is_ok());
        let two = SiemConfig {
            collectors: vec![ok.clone(), ok.clone()],
            ..SiemConfig::default()
        };
        assert!(matches!(two.validate(), Err(ConfigError::DuplicateName(_))));
        let bad_host = SiemConfig {
            hostname: Some("a b".into()),
            ..SiemConfig::default()
        };
        assert!(matches!(
            bad_host.validate(),
            Err(ConfigError::BadHeader { .. })
        ));
        // Timings: 0 and absurd values are refused (u64::MAX ms would overflow an Instant
        // in the exporter and panic its thread).
        for set in [
            |s: &mut SiemConfig, v| s.confirm_ms = v,
            |s: &mut SiemConfig, v| s.backoff_min_ms = v,
            |s: &mut SiemConfig, v| s.backoff_max_ms = v,
            |s: &mut SiemConfig, v| s.cursor_flush_ms = v,
            |s: &mut SiemConfig, v| s.unreplicated_hold_ms = v,
        ] {
            for v in [0, MAX_TIMING_MS + 1, u64::MAX] {
                let mut s = cfg(ok.clone());
                set(&mut s, v);
                assert!(
                    matches!(s.validate(), Err(ConfigError::Timing(_))),
                    "{v} accepted"
                );
            }
            let mut s = cfg(ok.clone());
            set(&mut s, MAX_TIMING_MS);
            s.backoff_max_ms = MAX_TIMING_MS;
            assert!(s.validate().is_ok());
        }
        let v6 = CollectorConfig::new("b", TransportKind::Udp, "[::1]:514");
        assert_eq!(v6.host(), Some("::1"));
    }
}
