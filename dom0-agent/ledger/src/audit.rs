//! Audit events: the persistent, chained record of every decision and lifecycle event.
//!
//! Stored under their audit sequence in the `audit` database and chained exactly like
//! checkpoints: `hash_n = SHA-256(hash_{n-1} || encoding_n)`, `hash_0` = 32 zero bytes.
//!
//! ```text
//! offset size  field
//!      0    4  magic "MFAU"
//!      4    1  format version = 1
//!      5    1  kind: 0x01 event (other values reserved)
//!      6    8  seq         u64 BE, 1-based audit sequence
//!     14   32  prev_hash   hash of audit record seq-1 (zeros for seq 1)
//!     46    8  time_ns     u64 BE, Unix time in ns
//!     54    1  severity    RFC 5424 severity, 0 (emergency) ..= 7 (debug)
//!     55  1+n  event       u8 length, 1..=64 bytes of [a-z0-9_.-], e.g. "domain.destroyed"
//!      .    2  field count u16 BE, <= 32, then per field, sorted by name, unique:
//!                1+n name  u8 length, 1..=32 bytes, an RFC 5424 SD-NAME
//!                          (printable US-ASCII except '=', ' ', ']', '"')
//!                2+n value u16 length, <= 1024 bytes of UTF-8
//! ```
//!
//! A record format: uses only [`crate::codec`] and the vocabulary ([`crate::Hash`]).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;

use crate::codec::{DecodeError, Reader, Writer};
use crate::Hash;

/// Magic of an audit record.
pub const MAGIC: &str = "MFAU";
/// Format version written by this build.
pub const VERSION: u8 = 1;
/// Kind byte of an audit event.
pub const KIND_EVENT: u8 = 0x01;
/// Cap on the number of fields.
pub const MAX_FIELDS: usize = 32;
/// Cap on a field name.
pub const MAX_FIELD_NAME: usize = 32;
/// Cap on a field value.
pub const MAX_FIELD_VALUE: usize = 1024;
/// Cap on an event name.
pub const MAX_EVENT_NAME: usize = 64;

/// RFC 5424 severity: the one definition, shared with the policy engine's decisions.
pub use mayfly_severity::Severity;

/// Why an audit event cannot be recorded as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The event name is empty, too long, or outside `[a-z0-9_.-]`.
    #[error("invalid audit event name {0:?}")]
    BadEventName(String),
    /// A field name is not a valid RFC 5424 SD-NAME of at most 32 bytes.
    #[error("invalid audit field name {0:?}")]
    BadFieldName(String),
    /// A field value is longer than the cap.
    #[error("audit field {name} is {len} bytes, above the limit of {max}")]
    ValueTooLong {
        /// Field.
        name: String,
        /// Length.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// Too many fields.
    #[error("audit event has {0} fields, above the limit of {MAX_FIELDS}")]
    TooManyFields(usize),
}

/// An audit event before it is sequenced into the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Event type, e.g. `domain.destroyed` or `ledger.opened`.
    pub event: String,
    /// RFC 5424 severity.
    pub severity: Severity,
    /// Structured fields (sorted by name).
    pub fields: BTreeMap<String, String>,
}

impl AuditEvent {
    /// A new event with no fields.
    pub fn new(event: impl Into<String>, severity: Severity) -> Self {
        Self {
            event: event.into(),
            severity,
            fields: BTreeMap::new(),
        }
    }

    /// Adds a field (builder style).
    #[must_use]
    pub fn field(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.fields.insert(name.into(), value.to_string());
        self
    }

    /// Checks names, lengths and counts against the format's caps.
    pub fn validate(&self) -> Result<(), AuditError> {
        if !mayfly_names::is_name(&self.event, MAX_EVENT_NAME) {
            return Err(AuditError::BadEventName(self.event.clone()));
        }
        if self.fields.len() > MAX_FIELDS {
            return Err(AuditError::TooManyFields(self.fields.len()));
        }
        for (name, value) in &self.fields {
            if !valid_sd_name(name) {
                return Err(AuditError::BadFieldName(name.clone()));
            }
            if value.len() > MAX_FIELD_VALUE {
                return Err(AuditError::ValueTooLong {
                    name: name.clone(),
                    len: value.len(),
                    max: MAX_FIELD_VALUE,
                });
            }
        }
        Ok(())
    }
}

/// Whether `name` is an RFC 5424 SD-NAME of at most [`MAX_FIELD_NAME`] bytes.
pub fn valid_sd_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FIELD_NAME
        && name
            .bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"'))
}

/// An audit event as stored: sequenced, timed and linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Audit sequence (1-based).
    pub seq: u64,
    /// Hash of record `seq - 1`.
    pub prev_hash: Hash,
    /// Unix time in ns.
    pub time_ns: u64,
    /// The event.
    pub event: AuditEvent,
}

impl AuditRecord {
    /// Canonical encoding; the event must have passed [`AuditEvent::validate`].
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.raw(MAGIC.as_bytes());
        w.u8(VERSION);
        w.u8(KIND_EVENT);
        w.u64(self.seq);
        w.raw(&self.prev_hash);
        w.u64(self.time_ns);
        w.u8(self.event.severity.code());
        w.bytes8(self.event.event.as_bytes());
        w.u16(u16::try_from(self.event.fields.len()).unwrap_or(u16::MAX));
        for (name, value) in &self.event.fields {
            w.bytes8(name.as_bytes());
            w.bytes16(value.as_bytes());
        }
        w.finish()
    }

    /// Decodes and validates one stored audit record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        r.header(MAGIC, "audit", VERSION, KIND_EVENT)?;
        let seq = r.seq()?;
        let prev_hash = r.array("prev_hash")?;
        let time_ns = r.u64("time_ns")?;
        let severity = Severity::from_u8(r.u8("severity")?).ok_or(DecodeError::NotCanonical {
            field: "severity",
            reason: "above 7",
        })?;
        let event = r.str8(MAX_EVENT_NAME, "event")?.to_owned();
        if !mayfly_names::is_name(&event, MAX_EVENT_NAME) {
            return Err(DecodeError::NotCanonical {
                field: "event",
                reason: "empty or outside [a-z0-9_.-]",
            });
        }
        let n = usize::from(r.u16("field count")?);
        if n > MAX_FIELDS {
            return Err(DecodeError::TooLarge {
                field: "field count",
                len: n,
                max: MAX_FIELDS,
            });
        }
        let mut fields = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..n {
            let name = r.str8(MAX_FIELD_NAME, "field name")?.to_owned();
            if !valid_sd_name(&name) {
                return Err(DecodeError::NotCanonical {
                    field: "field name",
                    reason: "not an SD-NAME",
                });
            }
            if last.as_ref().is_some_and(|l| *l >= name) {
                return Err(DecodeError::NotCanonical {
                    field: "fields",
                    reason: "names not strictly increasing",
                });
            }
            let value = r.str16(MAX_FIELD_VALUE, "field value")?.to_owned();
            last = Some(name.clone());
            fields.insert(name, value);
        }
        r.finish()?;
        Ok(Self {
            seq,
            prev_hash,
            time_ns,
            event: AuditEvent {
                event,
                severity,
                fields,
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn sample() -> AuditRecord {
        AuditRecord {
            seq: 3,
            prev_hash: [9; 32],
            time_ns: 42,
            event: AuditEvent::new("domain.destroyed", Severity::Info)
                .field("tx_id", "00ff")
                .field("domain", 12),
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(AuditRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn validation_rejects_bad_names_and_sizes() {
        assert!(AuditEvent::new("Bad Name", Severity::Info)
            .validate()
            .is_err());
        assert!(AuditEvent::new("ok", Severity::Info)
            .field("a=b", "x")
            .validate()
            .is_err());
        assert!(AuditEvent::new("ok", Severity::Info)
            .field("big", "x".repeat(MAX_FIELD_VALUE + 1))
            .validate()
            .is_err());
        assert!(sample().event.validate().is_ok());
    }

    #[test]
    fn mutations_never_panic() {
        let base = sample().encode();
        let mut rng = fastrand::Rng::with_seed(3);
        for cut in 0..base.len() {
            assert!(AuditRecord::decode(&base[..cut]).is_err());
        }
        for _ in 0..20_000 {
            let mut b = base.clone();
            let i = rng.usize(..b.len());
            b[i] = rng.u8(..);
            let _ = AuditRecord::decode(&b);
        }
    }
}
