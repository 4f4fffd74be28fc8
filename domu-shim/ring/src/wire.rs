//! Canonical, versioned wire messages carried in ring slots.
//!
//! Every message is a 16-byte header followed by a body. All integers are **big-endian**.
//!
//! ```text
//!  offset  width  field
//!  0       4      magic        "MFWM" (4D 46 57 4D)
//!  4       2      version      u16, = WIRE_VERSION (1)
//!  6       2      type         u16 message tag (table below)
//!  8       4      request id   u32, chosen by the guest, echoed in the agent's reply
//!  12      4      body length  u32, = total length - 16 exactly
//!  16      n      body         fields of the message type, in order, nothing after them
//! ```
//!
//! Body field encodings:
//!
//! ```text
//!  bytes<min..=max>  u32 length L (min <= L <= max), then L bytes
//!  text<max>         bytes<0..=max> holding UTF-8 with no control character (Cc)
//!  option<T>         u8 presence: 0 = absent (nothing follows), 1 = present (T follows)
//!  bool              u8: 0 = false, 1 = true
//!  key               bytes<1..=256>
//! ```
//!
//! Guest → agent (requests):
//!
//! ```text
//!  0x0001 Ready   version u16 (= PROTOCOL_VERSION, 2), count u32 (0..=1024),
//!                  count x handler bytes<1..=64> of [a-z0-9_.-], strictly ascending
//!  0x0002 Get     key
//!  0x0003 Put     key, value bytes<0..=65536>
//!  0x0004 Delete  key
//!  0x0005 Scan    start bytes<0..=256>, end option<key>, limit u32 (1..=1024)
//!  0x0006 Log     level u8 (1 error, 2 warn, 3 info, 4 debug, 5 trace), line text<1024>
//!  0x0007 Commit  result bytes<0..=65536>
//!  0x0008 Abort   reason text<1024>
//! ```
//!
//! Agent → guest (the reply to each request; `Start` is the reply to `Ready`):
//!
//! ```text
//!  0x8001 Start       tx id [16], handler bytes<1..=64> of [a-z0-9_.-],
//!                     payload bytes<0..=65536>, entropy seed [32]
//!  0x8002 Value       option<bytes<0..=65536>>
//!  0x8003 Ok          (empty)
//!  0x8004 ScanResult  count u32 (0..=1024), count x (key, value bytes<0..=65536>), more bool
//!  0x8005 Error       code u16, message text<1024>
//!  0x8006 Committed   (empty)
//!  0x8007 Aborted     (empty)
//! ```
//!
//! A whole message is at most [`MAX_MESSAGE_LEN`] bytes (this caps `ScanResult`; see
//! [`ScanResultBuilder`]). The decoder accepts exactly the encoder's output: wrong magic,
//! version, tag or body length, a field over its cap, a presence or bool byte other than 0
//! or 1, invalid UTF-8, a control character, or trailing bytes are all errors. Hence
//! `encode(decode(b)) == b` for every accepted `b`.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

use alloc::string::String;
use alloc::vec::Vec;

/// Magic at the start of every message.
pub const WIRE_MAGIC: [u8; 4] = *b"MFWM";
/// The message encoding version this crate speaks.
pub const WIRE_VERSION: u16 = 1;
/// The protocol version a guest announces in [`Request::Ready`], the only one decoded:
/// version 2 added the handler list (version 1 had none; every guest that speaks the ring is
/// built from this tree together with the agent, so nothing still sends version 1).
pub const PROTOCOL_VERSION: u16 = 2;
/// Cap on the handler names a guest announces in [`Request::Ready`].
pub const MAX_HANDLERS: u32 = 1024;
/// Length of the message header.
pub const HEADER_LEN: usize = 16;
/// Cap on a whole encoded message (17 pages; one ring slot window holds one message).
pub const MAX_MESSAGE_LEN: usize = 17 * 4096;
/// Cap on a key.
pub const MAX_KEY_LEN: usize = 256;
/// Cap on a value.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Cap on a handler name.
pub const MAX_HANDLER_LEN: usize = mayfly_names::MAX_HANDLER_NAME;
/// Cap on a transaction payload.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// Cap on a commit result.
pub const MAX_RESULT_LEN: usize = 64 * 1024;
/// Cap on a log line.
pub const MAX_LOG_LINE_LEN: usize = 1024;
/// Cap on an abort reason.
pub const MAX_REASON_LEN: usize = 1024;
/// Cap on an error message.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;
/// Cap on a scan's `limit` and on the entries of one `ScanResult`.
pub const MAX_SCAN_ENTRIES: u32 = 1024;

/// Error codes for [`Response::Error`] (the wire accepts any `u16`).
pub mod error_code {
    /// The request was malformed or not allowed in this state.
    pub const BAD_REQUEST: u16 = 1;
    /// The policy engine denied the operation.
    pub const DENIED: u16 = 2;
    /// A limit (operations, bytes, rate) was exceeded.
    pub const LIMIT_EXCEEDED: u16 = 3;
    /// The agent failed internally.
    pub const INTERNAL: u16 = 4;
    /// Something the transaction read was changed by another commit (found before its
    /// commit), or the agent had no free reader slot for the transaction's fresh snapshot;
    /// the transaction cannot commit and ends. Running it again may succeed.
    pub const CONFLICT: u16 = 5;
}

/// Message type tags.
mod tag {
    pub const READY: u16 = 0x0001;
    pub const GET: u16 = 0x0002;
    pub const PUT: u16 = 0x0003;
    pub const DELETE: u16 = 0x0004;
    pub const SCAN: u16 = 0x0005;
    pub const LOG: u16 = 0x0006;
    pub const COMMIT: u16 = 0x0007;
    pub const ABORT: u16 = 0x0008;
    pub const START: u16 = 0x8001;
    pub const VALUE: u16 = 0x8002;
    pub const OK: u16 = 0x8003;
    pub const SCAN_RESULT: u16 = 0x8004;
    pub const ERROR: u16 = 0x8005;
    pub const COMMITTED: u16 = 0x8006;
    pub const ABORTED: u16 = 0x8007;
}

/// A message was refused by the encoder or the decoder. Offsets count from the start of the
/// message (header included).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The whole message is longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {len} bytes exceeds the {max}-byte cap")]
    MessageTooLarge {
        /// Length of the message.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The input ended inside a field.
    #[error("truncated {field} at offset {offset}: need {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// The magic is not [`WIRE_MAGIC`].
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The version is not [`WIRE_VERSION`].
    #[error("unsupported wire version {found} (supported: {supported})")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
        /// The version this crate speaks.
        supported: u16,
    },
    /// The type tag is unknown or belongs to the other direction.
    #[error("message type {tag:#06x} is not a valid {expected}")]
    BadType {
        /// The tag found.
        tag: u16,
        /// `"request"` or `"response"`.
        expected: &'static str,
    },
    /// The header's body length does not match the bytes that follow it.
    #[error("header declares a {declared}-byte body but {actual} bytes follow")]
    BodyLength {
        /// Body length from the header.
        declared: u32,
        /// Bytes actually present after the header.
        actual: usize,
    },
    /// A length-prefixed field is longer than its cap.
    #[error("{field} at offset {offset} is {len} bytes long, over the {max}-byte cap")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Offset of its length prefix.
        offset: usize,
        /// The length found.
        len: u64,
        /// The cap.
        max: usize,
    },
    /// A length-prefixed field is shorter than its minimum (e.g. an empty key).
    #[error("{field} at offset {offset} is {len} bytes long, under the {min}-byte minimum")]
    FieldTooShort {
        /// The field.
        field: &'static str,
        /// Offset of its length prefix.
        offset: usize,
        /// The length found.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A presence or bool byte is neither 0 nor 1.
    #[error("{field} flag at offset {offset} is {value}, not 0 or 1")]
    BadFlag {
        /// The field.
        field: &'static str,
        /// Its offset.
        offset: usize,
        /// The byte found.
        value: u8,
    },
    /// A log level outside 1..=5.
    #[error("log level {value} at offset {offset} is not in 1..=5")]
    BadLogLevel {
        /// Its offset.
        offset: usize,
        /// The byte found.
        value: u8,
    },
    /// A text field is not valid UTF-8.
    #[error("{field} is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// A text field contains a control character.
    #[error("{field} contains a control character at offset {offset}")]
    ControlCharacter {
        /// The field.
        field: &'static str,
        /// Offset of the character.
        offset: usize,
    },
    /// A handler name byte outside `[a-z0-9_.-]`.
    #[error("handler name byte {byte:#04x} at offset {offset} is not in [a-z0-9_.-]")]
    BadHandlerName {
        /// Offset of the byte.
        offset: usize,
        /// The byte found.
        byte: u8,
    },
    /// A scan limit outside `1..=MAX_SCAN_ENTRIES`.
    #[error("scan limit {value} at offset {offset} is not in 1..={max}")]
    BadScanLimit {
        /// Its offset.
        offset: usize,
        /// The limit found.
        value: u32,
        /// The cap.
        max: u32,
    },
    /// A `Ready` of another protocol version than [`PROTOCOL_VERSION`].
    #[error("Ready announces protocol version {found} (supported: {supported})")]
    UnsupportedProtocol {
        /// The version found.
        found: u16,
        /// The version this crate speaks.
        supported: u16,
    },
    /// A `Ready` announcing more than [`MAX_HANDLERS`] handlers.
    #[error("Ready at offset {offset} announces {count} handlers, over the {max} cap")]
    TooManyHandlers {
        /// Offset of the count.
        offset: usize,
        /// The count found.
        count: u64,
        /// The cap.
        max: u32,
    },
    /// A handler name of a `Ready` that is not strictly greater than the one before it.
    #[error("handler name at offset {offset} is {}the one before it (the list must be sorted)", if *.duplicate { "the same as " } else { "not after " })]
    HandlersOutOfOrder {
        /// Offset of the name's length prefix.
        offset: usize,
        /// Whether it equals the one before (a duplicate) rather than sorting before it.
        duplicate: bool,
    },
    /// A scan result with more than `MAX_SCAN_ENTRIES` entries.
    #[error("scan result at offset {offset} has {count} entries, over the {max} cap")]
    TooManyEntries {
        /// Offset of the count.
        offset: usize,
        /// The count found.
        count: u64,
        /// The cap.
        max: u32,
    },
    /// Bytes left over after the last field.
    #[error("{count} trailing bytes at offset {offset}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// How many extra bytes.
        count: usize,
    },
}

/// A message with its request id (the guest picks it; the agent echoes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<T> {
    /// The request id.
    pub id: u32,
    /// The message.
    pub body: T,
}

/// Severity of a guest log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum LogLevel {
    /// Errors.
    Error = 1,
    /// Warnings.
    Warn = 2,
    /// Information.
    Info = 3,
    /// Debugging.
    Debug = 4,
    /// Tracing.
    Trace = 5,
}

impl LogLevel {
    fn from_wire(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Error,
            2 => Self::Warn,
            3 => Self::Info,
            4 => Self::Debug,
            5 => Self::Trace,
            _ => return None,
        })
    }
}

/// A message from the guest (frontend) to the agent (backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The shim is booted and waits for its transaction; answered by [`Response::Start`].
    Ready {
        /// The protocol version the shim speaks ([`PROTOCOL_VERSION`]).
        protocol_version: u16,
        /// Every handler name the guest answers to: strictly ascending (sorted, no
        /// duplicates), at most [`MAX_HANDLERS`], each 1..=64 bytes of `[a-z0-9_.-]`.
        handlers: Vec<String>,
    },
    /// Read a key.
    Get {
        /// The key (1..=256 bytes).
        key: Vec<u8>,
    },
    /// Write a key.
    Put {
        /// The key (1..=256 bytes).
        key: Vec<u8>,
        /// The value (0..=64 KiB).
        value: Vec<u8>,
    },
    /// Delete a key.
    Delete {
        /// The key (1..=256 bytes).
        key: Vec<u8>,
    },
    /// Read keys in `start..end` (end exclusive, unbounded if absent) in key order.
    Scan {
        /// First key (0..=256 bytes; empty = from the beginning).
        start: Vec<u8>,
        /// End key, exclusive (1..=256 bytes).
        end: Option<Vec<u8>>,
        /// Most entries wanted (1..=1024).
        limit: u32,
    },
    /// A log line from the handler.
    Log {
        /// Severity.
        level: LogLevel,
        /// The line (UTF-8, no control characters, at most 1 KiB).
        line: String,
    },
    /// The handler finished: commit its writes and return `result` to the client.
    Commit {
        /// The result for the client (0..=64 KiB).
        result: Vec<u8>,
    },
    /// The handler gave up: discard its writes.
    Abort {
        /// Why (UTF-8, no control characters, at most 1 KiB).
        reason: String,
    },
}

/// The transaction handed to a guest: the reply to [`Request::Ready`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The transaction id.
    pub tx_id: [u8; 16],
    /// The handler to run (1..=64 bytes of `[a-z0-9_.-]`).
    pub handler: String,
    /// The client's payload (0..=64 KiB).
    pub payload: Vec<u8>,
    /// Fresh entropy for the guest's RNG.
    pub entropy_seed: [u8; 32],
}

/// One key/value pair of a scan result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEntry {
    /// The key (1..=256 bytes).
    pub key: Vec<u8>,
    /// The value (0..=64 KiB).
    pub value: Vec<u8>,
}

/// A message from the agent (backend) to the guest (frontend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Run this transaction (reply to `Ready`).
    Start(Start),
    /// Reply to `Get`: the value, or `None` if the key is absent.
    Value(Option<Vec<u8>>),
    /// Reply to `Put`, `Delete`, `Log`.
    Ok,
    /// Reply to `Scan`.
    ScanResult {
        /// Entries in key order.
        entries: Vec<ScanEntry>,
        /// Whether more entries were in range than returned.
        more: bool,
    },
    /// The request failed; see [`error_code`].
    Error {
        /// The error code.
        code: u16,
        /// Human-readable text (UTF-8, no control characters, at most 1 KiB).
        message: String,
    },
    /// Reply to `Commit`: the transaction is durable.
    Committed,
    /// Reply to `Abort` (or to a `Commit` that failed validation).
    Aborted,
}

// ---------------------------------------------------------------------------------------
// Field rules, shared by the encoder and the decoder so that they accept the same set.

/// How a length-prefixed field is checked.
#[derive(Clone, Copy)]
enum Rule {
    /// Any bytes.
    Bytes,
    /// UTF-8 without control characters.
    Text,
    /// `[a-z0-9_.-]`.
    Handler,
}

#[derive(Clone, Copy)]
struct FieldSpec {
    name: &'static str,
    min: usize,
    max: usize,
    rule: Rule,
}

const fn spec(name: &'static str, min: usize, max: usize, rule: Rule) -> FieldSpec {
    FieldSpec {
        name,
        min,
        max,
        rule,
    }
}

const KEY: FieldSpec = spec("key", 1, MAX_KEY_LEN, Rule::Bytes);
const SCAN_START: FieldSpec = spec("scan start", 0, MAX_KEY_LEN, Rule::Bytes);
const SCAN_END: FieldSpec = spec("scan end", 1, MAX_KEY_LEN, Rule::Bytes);
const VALUE: FieldSpec = spec("value", 0, MAX_VALUE_LEN, Rule::Bytes);
const HANDLER: FieldSpec = spec("handler name", 1, MAX_HANDLER_LEN, Rule::Handler);
const PAYLOAD: FieldSpec = spec("payload", 0, MAX_PAYLOAD_LEN, Rule::Bytes);
const RESULT: FieldSpec = spec("result", 0, MAX_RESULT_LEN, Rule::Bytes);
const LOG_LINE: FieldSpec = spec("log line", 0, MAX_LOG_LINE_LEN, Rule::Text);
const REASON: FieldSpec = spec("abort reason", 0, MAX_REASON_LEN, Rule::Text);
const ERROR_MESSAGE: FieldSpec = spec("error message", 0, MAX_ERROR_MESSAGE_LEN, Rule::Text);

/// Checks `data` (whose length prefix is at `offset`) against `spec`.
fn check_field(spec: FieldSpec, offset: usize, data: &[u8]) -> Result<(), WireError> {
    let len = data.len();
    if len > spec.max {
        return Err(WireError::FieldTooLong {
            field: spec.name,
            offset,
            len: u64::try_from(len).unwrap_or(u64::MAX),
            max: spec.max,
        });
    }
    if len < spec.min {
        return Err(WireError::FieldTooShort {
            field: spec.name,
            offset,
            len,
            min: spec.min,
        });
    }
    let data_offset = offset.saturating_add(4);
    match spec.rule {
        Rule::Bytes => Ok(()),
        Rule::Handler => match data.iter().position(|&b| !mayfly_names::is_name_byte(b)) {
            None => Ok(()),
            Some(i) => Err(WireError::BadHandlerName {
                offset: data_offset.saturating_add(i),
                byte: data.get(i).copied().unwrap_or(0),
            }),
        },
        Rule::Text => {
            let text = core::str::from_utf8(data).map_err(|e| WireError::InvalidUtf8 {
                field: spec.name,
                offset: data_offset.saturating_add(e.valid_up_to()),
            })?;
            match text.char_indices().find(|(_, c)| c.is_control()) {
                None => Ok(()),
                Some((i, _)) => Err(WireError::ControlCharacter {
                    field: spec.name,
                    offset: data_offset.saturating_add(i),
                }),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoder.

/// Builds a message body, checking each field as it goes. Offsets in errors are message
/// offsets (header included).
struct Writer {
    body: Vec<u8>,
}

impl Writer {
    fn new() -> Self {
        Self { body: Vec::new() }
    }

    fn offset(&self) -> usize {
        HEADER_LEN.saturating_add(self.body.len())
    }

    fn u8(&mut self, v: u8) {
        self.body.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.body.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.body.extend_from_slice(&v.to_be_bytes());
    }

    fn array(&mut self, v: &[u8]) {
        self.body.extend_from_slice(v);
    }

    fn field(&mut self, spec: FieldSpec, data: &[u8]) -> Result<(), WireError> {
        check_field(spec, self.offset(), data)?;
        // Every cap is far below u32::MAX, so the conversion cannot fail after the check.
        let len = u32::try_from(data.len()).map_err(|_| WireError::FieldTooLong {
            field: spec.name,
            offset: self.offset(),
            len: u64::MAX,
            max: spec.max,
        })?;
        self.u32(len);
        self.body.extend_from_slice(data);
        Ok(())
    }

    fn option(&mut self, spec: FieldSpec, data: Option<&[u8]>) -> Result<(), WireError> {
        match data {
            None => {
                self.u8(0);
                Ok(())
            }
            Some(d) => {
                self.u8(1);
                self.field(spec, d)
            }
        }
    }

    /// Prepends the header and checks the total cap.
    fn finish(self, tag: u16, id: u32) -> Result<Vec<u8>, WireError> {
        let too_large = WireError::MessageTooLarge {
            len: HEADER_LEN.saturating_add(self.body.len()),
            max: MAX_MESSAGE_LEN,
        };
        if self.body.len() > MAX_MESSAGE_LEN.saturating_sub(HEADER_LEN) {
            return Err(too_large);
        }
        let body_len = u32::try_from(self.body.len()).map_err(|_| too_large)?;
        let mut out = Vec::with_capacity(HEADER_LEN.saturating_add(self.body.len()));
        out.extend_from_slice(&WIRE_MAGIC);
        out.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&body_len.to_be_bytes());
        out.extend_from_slice(&self.body);
        Ok(out)
    }
}

fn check_protocol(found: u16) -> Result<(), WireError> {
    if found != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedProtocol {
            found,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// A `Ready`'s handler names must be strictly ascending (bytewise: the name rule is ASCII).
fn check_order(offset: usize, previous: Option<&str>, name: &str) -> Result<(), WireError> {
    match previous.map(|p| p.cmp(name)) {
        None | Some(core::cmp::Ordering::Less) => Ok(()),
        Some(order) => Err(WireError::HandlersOutOfOrder {
            offset,
            duplicate: order == core::cmp::Ordering::Equal,
        }),
    }
}

fn check_scan_limit(offset: usize, limit: u32) -> Result<(), WireError> {
    if limit == 0 || limit > MAX_SCAN_ENTRIES {
        return Err(WireError::BadScanLimit {
            offset,
            value: limit,
            max: MAX_SCAN_ENTRIES,
        });
    }
    Ok(())
}

impl Request {
    /// Encodes the request with request id `id`, checking every cap.
    pub fn encode(&self, id: u32) -> Result<Vec<u8>, WireError> {
        let mut w = Writer::new();
        let tag = match self {
            Self::Ready {
                protocol_version,
                handlers,
            } => {
                check_protocol(*protocol_version)?;
                w.u16(*protocol_version);
                let count = u32::try_from(handlers.len())
                    .ok()
                    .filter(|&c| c <= MAX_HANDLERS)
                    .ok_or(WireError::TooManyHandlers {
                        offset: w.offset(),
                        count: u64::try_from(handlers.len()).unwrap_or(u64::MAX),
                        max: MAX_HANDLERS,
                    })?;
                w.u32(count);
                let mut previous: Option<&str> = None;
                for name in handlers {
                    check_order(w.offset(), previous, name)?;
                    w.field(HANDLER, name.as_bytes())?;
                    previous = Some(name);
                }
                tag::READY
            }
            Self::Get { key } => {
                w.field(KEY, key)?;
                tag::GET
            }
            Self::Put { key, value } => {
                w.field(KEY, key)?;
                w.field(VALUE, value)?;
                tag::PUT
            }
            Self::Delete { key } => {
                w.field(KEY, key)?;
                tag::DELETE
            }
            Self::Scan { start, end, limit } => {
                w.field(SCAN_START, start)?;
                w.option(SCAN_END, end.as_deref())?;
                check_scan_limit(w.offset(), *limit)?;
                w.u32(*limit);
                tag::SCAN
            }
            Self::Log { level, line } => {
                w.u8(*level as u8);
                w.field(LOG_LINE, line.as_bytes())?;
                tag::LOG
            }
            Self::Commit { result } => {
                w.field(RESULT, result)?;
                tag::COMMIT
            }
            Self::Abort { reason } => {
                w.field(REASON, reason.as_bytes())?;
                tag::ABORT
            }
        };
        w.finish(tag, id)
    }

    /// Decodes one request, accepting only the canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Envelope<Self>, WireError> {
        let (tag, id, mut r) = Reader::message(bytes)?;
        let body = match tag {
            tag::READY => r.ready()?,
            tag::GET => Self::Get { key: r.field(KEY)? },
            tag::PUT => Self::Put {
                key: r.field(KEY)?,
                value: r.field(VALUE)?,
            },
            tag::DELETE => Self::Delete { key: r.field(KEY)? },
            tag::SCAN => {
                let start = r.field(SCAN_START)?;
                let end = r.option(SCAN_END)?;
                let offset = r.pos;
                let limit = r.u32("scan limit")?;
                check_scan_limit(offset, limit)?;
                Self::Scan { start, end, limit }
            }
            tag::LOG => {
                let offset = r.pos;
                let value = r.u8("log level")?;
                let level =
                    LogLevel::from_wire(value).ok_or(WireError::BadLogLevel { offset, value })?;
                Self::Log {
                    level,
                    line: r.text(LOG_LINE)?,
                }
            }
            tag::COMMIT => Self::Commit {
                result: r.field(RESULT)?,
            },
            tag::ABORT => Self::Abort {
                reason: r.text(REASON)?,
            },
            _ => {
                return Err(WireError::BadType {
                    tag,
                    expected: "request",
                })
            }
        };
        r.finish()?;
        Ok(Envelope { id, body })
    }
}

impl Response {
    /// Encodes the response to request `id`, checking every cap.
    pub fn encode(&self, id: u32) -> Result<Vec<u8>, WireError> {
        let mut w = Writer::new();
        let tag = match self {
            Self::Start(start) => {
                w.array(&start.tx_id);
                w.field(HANDLER, start.handler.as_bytes())?;
                w.field(PAYLOAD, &start.payload)?;
                w.array(&start.entropy_seed);
                tag::START
            }
            Self::Value(value) => {
                w.option(VALUE, value.as_deref())?;
                tag::VALUE
            }
            Self::Ok => tag::OK,
            Self::ScanResult { entries, more } => {
                let count = u32::try_from(entries.len())
                    .ok()
                    .filter(|&c| c <= MAX_SCAN_ENTRIES)
                    .ok_or(WireError::TooManyEntries {
                        offset: w.offset(),
                        count: u64::try_from(entries.len()).unwrap_or(u64::MAX),
                        max: MAX_SCAN_ENTRIES,
                    })?;
                w.u32(count);
                for entry in entries {
                    w.field(KEY, &entry.key)?;
                    w.field(VALUE, &entry.value)?;
                    if w.body.len() > MAX_MESSAGE_LEN {
                        break; // `finish` reports the overflow; stop copying early.
                    }
                }
                w.u8(u8::from(*more));
                tag::SCAN_RESULT
            }
            Self::Error { code, message } => {
                w.u16(*code);
                w.field(ERROR_MESSAGE, message.as_bytes())?;
                tag::ERROR
            }
            Self::Committed => tag::COMMITTED,
            Self::Aborted => tag::ABORTED,
        };
        w.finish(tag, id)
    }

    /// Decodes one response, accepting only the canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Envelope<Self>, WireError> {
        let (tag, id, mut r) = Reader::message(bytes)?;
        let body = match tag {
            tag::START => {
                let tx_id = r.array::<16>("tx id")?;
                let handler = r.field(HANDLER)?;
                let payload = r.field(PAYLOAD)?;
                let entropy_seed = r.array::<32>("entropy seed")?;
                Self::Start(Start {
                    tx_id,
                    // `HANDLER` admits ASCII only, so this conversion cannot fail.
                    handler: String::from_utf8(handler).map_err(|_| WireError::InvalidUtf8 {
                        field: HANDLER.name,
                        offset: 0,
                    })?,
                    payload,
                    entropy_seed,
                })
            }
            tag::VALUE => Self::Value(r.option(VALUE)?),
            tag::OK => Self::Ok,
            tag::SCAN_RESULT => {
                let offset = r.pos;
                let count = r.u32("scan entry count")?;
                if count > MAX_SCAN_ENTRIES {
                    return Err(WireError::TooManyEntries {
                        offset,
                        count: u64::from(count),
                        max: MAX_SCAN_ENTRIES,
                    });
                }
                let mut entries = Vec::new();
                for _ in 0..count {
                    entries.push(ScanEntry {
                        key: r.field(KEY)?,
                        value: r.field(VALUE)?,
                    });
                }
                let more = r.flag("more")?;
                Self::ScanResult { entries, more }
            }
            tag::ERROR => Self::Error {
                code: r.u16("error code")?,
                message: r.text(ERROR_MESSAGE)?,
            },
            tag::COMMITTED => Self::Committed,
            tag::ABORTED => Self::Aborted,
            _ => {
                return Err(WireError::BadType {
                    tag,
                    expected: "response",
                })
            }
        };
        r.finish()?;
        Ok(Envelope { id, body })
    }
}

/// Collects scan entries while the encoded `ScanResult` stays within [`MAX_MESSAGE_LEN`] and
/// [`MAX_SCAN_ENTRIES`], so the agent can stop and set `more`.
#[derive(Debug, Clone)]
pub struct ScanResultBuilder {
    entries: Vec<ScanEntry>,
    encoded_len: usize,
    max_entries: u32,
}

impl ScanResultBuilder {
    /// A builder returning at most `limit` entries (clamped to `1..=MAX_SCAN_ENTRIES`).
    pub fn new(limit: u32) -> Self {
        Self {
            entries: Vec::new(),
            // header + count + more flag
            encoded_len: HEADER_LEN.saturating_add(5),
            max_entries: limit.clamp(1, MAX_SCAN_ENTRIES),
        }
    }

    /// Adds an entry if it fits. `Ok(false)` means the result is full: send it with
    /// `more = true`. Errors if the key or value breaks its cap.
    pub fn try_push(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<bool, WireError> {
        check_field(KEY, 0, &key)?;
        check_field(VALUE, 0, &value)?;
        let entry_len = key.len().saturating_add(value.len()).saturating_add(8);
        let new_len = self.encoded_len.saturating_add(entry_len);
        let count = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        if count >= self.max_entries || new_len > MAX_MESSAGE_LEN {
            return Ok(false);
        }
        self.encoded_len = new_len;
        self.entries.push(ScanEntry { key, value });
        Ok(true)
    }

    /// Number of entries collected.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry was collected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The response.
    pub fn finish(self, more: bool) -> Response {
        Response::ScanResult {
            entries: self.entries,
            more,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decoder.

/// A cursor over a message. It never indexes: every read is a checked split.
struct Reader<'a> {
    /// The whole message.
    buf: &'a [u8],
    /// Offset of the next unread byte (always `<= buf.len()`).
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks the header and returns the tag, the id and a reader positioned on the body.
    fn message(buf: &'a [u8]) -> Result<(u16, u32, Self), WireError> {
        if buf.len() > MAX_MESSAGE_LEN {
            return Err(WireError::MessageTooLarge {
                len: buf.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let mut r = Self { buf, pos: 0 };
        let magic = r.array::<4>("magic")?;
        if magic != WIRE_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let version = r.u16("version")?;
        if version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion {
                found: version,
                supported: WIRE_VERSION,
            });
        }
        let tag = r.u16("type")?;
        let id = r.u32("request id")?;
        let declared = r.u32("body length")?;
        let actual = r.remaining();
        if usize::try_from(declared).ok() != Some(actual) {
            return Err(WireError::BodyLength { declared, actual });
        }
        Ok((tag, id, r))
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let (head, _) = rest.split_at_checked(n).ok_or(WireError::Truncated {
            field,
            offset: self.pos,
            needed: n,
            available: rest.len(),
        })?;
        self.pos = self.pos.saturating_add(n);
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let bytes = self.take(field, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    /// A `0`/`1` byte.
    fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        let offset = self.pos;
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::BadFlag {
                field,
                offset,
                value,
            }),
        }
    }

    /// A length-prefixed field; the cap is checked before any byte is copied.
    fn field(&mut self, spec: FieldSpec) -> Result<Vec<u8>, WireError> {
        let offset = self.pos;
        let len = self.u32(spec.name)?;
        let len = usize::try_from(len).ok().filter(|&l| l <= spec.max).ok_or(
            WireError::FieldTooLong {
                field: spec.name,
                offset,
                len: u64::from(len),
                max: spec.max,
            },
        )?;
        let data = self.take(spec.name, len)?;
        check_field(spec, offset, data)?;
        Ok(data.to_vec())
    }

    fn option(&mut self, spec: FieldSpec) -> Result<Option<Vec<u8>>, WireError> {
        if self.flag(spec.name)? {
            Ok(Some(self.field(spec)?))
        } else {
            Ok(None)
        }
    }

    fn text(&mut self, spec: FieldSpec) -> Result<String, WireError> {
        let offset = self.pos;
        let bytes = self.field(spec)?;
        // `check_field` already proved the bytes are UTF-8.
        String::from_utf8(bytes).map_err(|e| WireError::InvalidUtf8 {
            field: spec.name,
            offset: offset
                .saturating_add(4)
                .saturating_add(e.utf8_error().valid_up_to()),
        })
    }

    /// The body of a `Ready`: version, then the bounded, strictly ascending handler list.
    /// The count is checked before anything is allocated, and each name as it is read, so a
    /// hostile list costs at most one message's worth of memory.
    fn ready(&mut self) -> Result<Request, WireError> {
        check_protocol(self.u16("protocol version")?)?;
        let offset = self.pos;
        let count = self.u32("handler count")?;
        if count > MAX_HANDLERS {
            return Err(WireError::TooManyHandlers {
                offset,
                count: u64::from(count),
                max: MAX_HANDLERS,
            });
        }
        let mut handlers: Vec<String> = Vec::new();
        for _ in 0..count {
            let offset = self.pos;
            let name = self.text(HANDLER)?;
            check_order(offset, handlers.last().map(String::as_str), &name)?;
            handlers.push(name);
        }
        Ok(Request::Ready {
            protocol_version: PROTOCOL_VERSION,
            handlers,
        })
    }

    fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(WireError::TrailingBytes {
                offset: self.pos,
                count,
            }),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]
mod tests;
