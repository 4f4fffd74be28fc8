//! Mayfly's SIEM export: every audit record, in chain order, as one RFC 5424 syslog
//! message to each configured collector, over UDP (RFC 5426), TCP with octet counting
//! (RFC 6587) or TLS (RFC 5425), at least once.
//!
//! * [`rfc5424`] draws and encodes the message (and parses it back, for tests and tools);
//! * [`transport`] holds the connections and their framing;
//! * [`tls`] builds the rustls client configuration (CA verification, client certificate);
//! * [`exporter`] runs one thread per collector from a cursor kept in the ledger's
//!   `cursors` database, and reports [`CollectorStatus`];
//! * [`hold`] keeps records back until a standby holds them, on a replication primary;
//! * [`config`] is the `[siem]` section of the agent's configuration.
//!
//! Operator documentation: `docs/siem.md`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod exporter;
pub mod hold;
pub mod rfc5424;
pub mod tls;
pub mod transport;

pub use config::{CollectorConfig, ConfigError, SiemConfig, Start, TransportKind};
pub use exporter::{CollectorStatus, Exporter, StartError, StatusHandle};
pub use hold::ReplicatedTip;
