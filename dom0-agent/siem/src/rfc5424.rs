//! One audit record as one RFC 5424 syslog message, and a strict parser of such messages
//! (for tests and for tools that read what a collector stored).
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [mayfly@PEN event=".." seq=".." hash=".."][mayfly.fields@PEN name="value" ...] MSG
//!
//! PRI        facility * 8 + severity                        the record's severity (0..=7)
//! TIMESTAMP  YYYY-MM-DDThh:mm:ss.ffffffZ                    the record's time, UTC, microseconds
//! HOSTNAME   1..=255 PRINTUSASCII, or "-"                   configured, else the kernel's host name
//! APP-NAME   1..=48 PRINTUSASCII                            configured, default "mayfly"
//! PROCID     1..=128 PRINTUSASCII                           the agent's process id
//! MSGID      1..=32 PRINTUSASCII                            the event name (cut to 32 bytes)
//! SD         [mayfly@PEN ...]                               the chain: event name, audit seq,
//!                                                           hex SHA-256 chain hash of the record,
//!                                                           truncated="true" if values were cut,
//!                                                           unreplicated="true" if the record was
//!                                                           sent before a standby held it
//!            [mayfly.fields@PEN ...]                        the record's fields, in name order,
//!                                                           names verbatim (they are SD-NAMEs);
//!                                                           left out when there are none
//! MSG        "<event> seq=<seq>"                            ASCII, so no BOM
//! ```
//!
//! Inside a PARAM-VALUE the three characters `"`, `\` and `]` are escaped with a backslash
//! (RFC 5424 §6.3.3); every other UTF-8 character, control characters included, is sent as
//! it is. `PEN` is the IANA Private Enterprise Number of the SD-IDs, configurable; the
//! default 32473 is the one RFC 5612 reserves for documentation.
//!
//! When a message would be longer than the collector's limit, the longest field values are
//! cut (at a character boundary) until it fits, and the chain element says
//! `truncated="true"`: the chain hash still lets the SIEM fetch the whole record from the
//! appliance.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fmt::Write as _;

use mayfly_ledger::codec::hex;
use mayfly_ledger::{AuditRecord, Hash};

/// SD-ID name part of the chain element.
pub const CHAIN_SD_NAME: &str = "mayfly";
/// SD-ID name part of the fields element.
pub const FIELDS_SD_NAME: &str = "mayfly.fields";
/// The documentation Private Enterprise Number of RFC 5612, used when none is configured.
pub const DOCUMENTATION_PEN: u32 = 32473;
/// Smallest message size limit accepted: every receiver SHOULD take 2048 octets (§6.1),
/// and 32 field names of 32 bytes with empty values still fit.
pub const MIN_MESSAGE_BYTES: usize = 2048;
/// Longest HOSTNAME, APP-NAME, PROCID and MSGID (§6).
pub const MAX_HOSTNAME: usize = 255;
/// Longest APP-NAME.
pub const MAX_APP_NAME: usize = 48;
/// Longest PROCID.
pub const MAX_PROCID: usize = 128;
/// Longest MSGID.
pub const MAX_MSGID: usize = 32;
/// Longest SD-NAME (param names and the name part of SD-IDs).
pub const MAX_SD_NAME: usize = 32;

/// The parts of every message that do not come from the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Syslog facility, 0..=23.
    pub facility: u8,
    /// HOSTNAME field (already valid: see [`header_field`]).
    pub hostname: String,
    /// APP-NAME field.
    pub app_name: String,
    /// PROCID field.
    pub procid: String,
    /// Private Enterprise Number of the SD-IDs.
    pub pen: u32,
    /// Longest message produced, bytes (at least [`MIN_MESSAGE_BYTES`]).
    pub max_bytes: usize,
}

/// Makes `value` a valid header field: PRINTUSASCII only (others become `_`), at most
/// `max` bytes, `-` when empty.
pub fn header_field(value: &str, max: usize) -> String {
    let out: String = value
        .chars()
        .map(|c| if ('!'..='~').contains(&c) { c } else { '_' })
        .take(max)
        .collect();
    if out.is_empty() {
        "-".into()
    } else {
        out
    }
}

/// Whether `name` is an SD-NAME: 1..=32 PRINTUSASCII except `=`, space, `]`, `"`.
pub fn valid_sd_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SD_NAME
        && name
            .bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"'))
}

/// Appends `value` escaped as a PARAM-VALUE (without the quotes).
pub fn escape_param_value(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

fn escaped_len(value: &str) -> usize {
    value
        .bytes()
        .map(|b| {
            if matches!(b, b'"' | b'\\' | b']') {
                2
            } else {
                1
            }
        })
        .fold(0usize, usize::saturating_add)
}

/// RFC 3339 / RFC 5424 timestamp of Unix nanoseconds: `YYYY-MM-DDThh:mm:ss.ffffffZ`.
pub fn timestamp(time_ns: u64) -> String {
    let secs = time_ns / 1_000_000_000;
    let micros = (time_ns % 1_000_000_000) / 1_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a count of days since 1970-01-01 (H. Hinnant's algorithm,
/// for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted so that the era starts on 0000-03-01; all terms stay non-negative.
    let z = days.saturating_add(719_468);
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe
        .saturating_sub(doe / 1460)
        .saturating_add(doe / 36_524)
        .saturating_sub(doe / 146_096))
        / 365;
    let doy = doe.saturating_sub(
        (365u64.saturating_mul(yoe))
            .saturating_add(yoe / 4)
            .saturating_sub(yoe / 100),
    );
    let mp = (5u64.saturating_mul(doy).saturating_add(2)) / 153;
    let d = doy
        .saturating_sub((153u64.saturating_mul(mp).saturating_add(2)) / 5)
        .saturating_add(1);
    let m = if mp < 10 {
        mp.saturating_add(3)
    } else {
        mp.saturating_sub(9)
    };
    let y = yoe
        .saturating_add(era.saturating_mul(400))
        .saturating_add(u64::from(m <= 2));
    (y, m, d)
}

/// Encodes `record` (whose chain hash is `hash`) as one message.
pub fn encode(record: &AuditRecord, hash: &Hash, env: &Envelope) -> String {
    encode_marked(record, hash, env, false)
}

/// [`encode`], with `unreplicated="true"` in the chain element when `unreplicated`: the
/// record was exported before the standby held it, so a promoted standby may hold another
/// record under the same `seq` (docs/siem.md "Replication").
pub fn encode_marked(
    record: &AuditRecord,
    hash: &Hash,
    env: &Envelope,
    unreplicated: bool,
) -> String {
    let marks = Marks {
        truncated: false,
        unreplicated,
    };
    let borrowed: Vec<(&str, &str)> = record
        .event
        .fields
        .iter()
        .filter(|(name, _)| valid_sd_name(name))
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let full = render(record, hash, env, &borrowed, marks);
    if full.len() <= env.max_bytes {
        return full;
    }
    // Too long: cut the longest values until it fits. Each round removes at least the
    // excess from one value or empties it, so 2 * fields + 1 rounds always suffice.
    let mut fields: Vec<(&str, String)> = borrowed
        .iter()
        .map(|&(name, value)| (name, value.to_owned()))
        .collect();
    let marks = Marks {
        truncated: true,
        ..marks
    };
    let mut msg = render(record, hash, env, &view(&fields), marks);
    for _ in 0..fields.len().saturating_mul(2).saturating_add(1) {
        let excess = msg.len().saturating_sub(env.max_bytes);
        if excess == 0 {
            break;
        }
        let Some(longest) = fields.iter_mut().max_by_key(|(_, v)| escaped_len(v)) else {
            break;
        };
        let value = &mut longest.1;
        let mut keep = escaped_len(value).saturating_sub(excess);
        let mut cut = 0usize;
        for (i, c) in value.char_indices() {
            let w = if matches!(c, '"' | '\\' | ']') {
                2
            } else {
                c.len_utf8()
            };
            if w > keep {
                break;
            }
            keep = keep.saturating_sub(w);
            cut = i.saturating_add(c.len_utf8());
        }
        value.truncate(cut);
        msg = render(record, hash, env, &view(&fields), marks);
    }
    msg
}

/// The optional parameters of the chain element.
#[derive(Clone, Copy)]
struct Marks {
    truncated: bool,
    unreplicated: bool,
}

fn render(
    record: &AuditRecord,
    hash: &Hash,
    env: &Envelope,
    fields: &[(&str, &str)],
    marks: Marks,
) -> String {
    let pri = u16::from(env.facility.min(23))
        .saturating_mul(8)
        .saturating_add(u16::from(record.event.severity as u8));
    let event = &record.event.event;
    let msgid = header_field(event, MAX_MSGID);
    let mut s = String::with_capacity(256);
    let _ = write!(
        s,
        "<{pri}>1 {} {} {} {} {msgid} [{CHAIN_SD_NAME}@{} event=\"",
        timestamp(record.time_ns),
        env.hostname,
        env.app_name,
        env.procid,
        env.pen
    );
    escape_param_value(&mut s, event);
    let _ = write!(s, "\" seq=\"{}\" hash=\"{}\"", record.seq, hex(hash));
    if marks.truncated {
        s.push_str(" truncated=\"true\"");
    }
    if marks.unreplicated {
        s.push_str(" unreplicated=\"true\"");
    }
    s.push(']');
    if !fields.is_empty() {
        let _ = write!(s, "[{FIELDS_SD_NAME}@{}", env.pen);
        for (name, value) in fields {
            s.push(' ');
            s.push_str(name);
            s.push_str("=\"");
            escape_param_value(&mut s, value);
            s.push('"');
        }
        s.push(']');
    }
    let _ = write!(s, " {event} seq={}", record.seq);
    s
}

fn view<'a>(fields: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    fields.iter().map(|(n, v)| (*n, v.as_str())).collect()
}

/// Why a message does not parse as RFC 5424.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The PRI part is missing or out of range.
    #[error("bad PRI")]
    Pri,
    /// The version is not `1`.
    #[error("version is not 1")]
    Version,
    /// A header field is missing, too long or not PRINTUSASCII.
    #[error("bad header field {0}")]
    Header(&'static str),
    /// The structured data is malformed.
    #[error("bad structured data at byte {at}: {reason}")]
    StructuredData {
        /// Byte offset inside the SD part.
        at: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One SD-ELEMENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdElement {
    /// SD-ID, e.g. `mayfly@32473`.
    pub id: String,
    /// Parameters in message order, values unescaped.
    pub params: Vec<(String, String)>,
}

impl SdElement {
    /// The value of parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Facility.
    pub facility: u8,
    /// Severity.
    pub severity: u8,
    /// TIMESTAMP as sent.
    pub timestamp: String,
    /// HOSTNAME.
    pub hostname: String,
    /// APP-NAME.
    pub app_name: String,
    /// PROCID.
    pub procid: String,
    /// MSGID.
    pub msgid: String,
    /// STRUCTURED-DATA.
    pub sd: Vec<SdElement>,
    /// MSG, if any.
    pub msg: String,
}

impl Message {
    /// The element whose SD-ID is `id`.
    pub fn element(&self, id: &str) -> Option<&SdElement> {
        self.sd.iter().find(|e| e.id == id)
    }
}

/// Parses one RFC 5424 message (without transport framing).
pub fn parse(text: &str) -> Result<Message, ParseError> {
    let rest = text.strip_prefix('<').ok_or(ParseError::Pri)?;
    let close = rest.find('>').ok_or(ParseError::Pri)?;
    let (pri, rest) = rest.split_at(close);
    if pri.is_empty() || pri.len() > 3 || (pri.len() > 1 && pri.starts_with('0')) {
        return Err(ParseError::Pri);
    }
    let pri: u8 = pri.parse().map_err(|_| ParseError::Pri)?;
    if pri > 191 {
        return Err(ParseError::Pri);
    }
    let rest = rest.strip_prefix(">1 ").ok_or(ParseError::Version)?;
    let mut header = rest.splitn(6, ' ');
    let mut field = |name: &'static str, max: usize| -> Result<String, ParseError> {
        let f = header.next().ok_or(ParseError::Header(name))?;
        if f.is_empty() || f.len() > max || !f.bytes().all(|b| (33..=126).contains(&b)) {
            return Err(ParseError::Header(name));
        }
        Ok(f.to_owned())
    };
    let timestamp = field("TIMESTAMP", 32)?;
    let hostname = field("HOSTNAME", MAX_HOSTNAME)?;
    let app_name = field("APP-NAME", MAX_APP_NAME)?;
    let procid = field("PROCID", MAX_PROCID)?;
    let msgid = field("MSGID", MAX_MSGID)?;
    let rest = header.next().ok_or(ParseError::Header("STRUCTURED-DATA"))?;
    let (sd, used) = parse_structured_data(rest)?;
    let msg = rest.get(used..).unwrap_or_default();
    let msg = match msg.strip_prefix(' ') {
        Some(m) => m.strip_prefix('\u{feff}').unwrap_or(m).to_owned(),
        None if msg.is_empty() => String::new(),
        None => {
            return Err(ParseError::StructuredData {
                at: used,
                reason: "no space after the structured data",
            })
        }
    };
    Ok(Message {
        facility: pri / 8,
        severity: pri % 8,
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
        sd,
        msg,
    })
}

/// Parses the STRUCTURED-DATA at the start of `text` (`-` or one or more elements);
/// returns the elements and the bytes used.
pub fn parse_structured_data(text: &str) -> Result<(Vec<SdElement>, usize), ParseError> {
    if text.starts_with('-') {
        return Ok((Vec::new(), 1));
    }
    let bytes = text.as_bytes();
    let err = |at: usize, reason: &'static str| ParseError::StructuredData { at, reason };
    let mut out = Vec::new();
    let mut i = 0usize;
    // Each round consumes at least one byte, so the input length bounds every loop.
    while bytes.get(i) == Some(&b'[') {
        i = i.saturating_add(1);
        let id_start = i;
        while bytes
            .get(i)
            .is_some_and(|b| (33..=126).contains(b) && !matches!(b, b'=' | b']' | b'"'))
        {
            i = i.saturating_add(1);
        }
        let id = text.get(id_start..i).unwrap_or_default();
        if id.is_empty() || id.len() > MAX_SD_NAME.saturating_add(20) {
            return Err(err(id_start, "bad SD-ID"));
        }
        let mut params = Vec::new();
        loop {
            match bytes.get(i) {
                Some(b']') => {
                    i = i.saturating_add(1);
                    break;
                }
                Some(b' ') => i = i.saturating_add(1),
                _ => return Err(err(i, "expected ' ' or ']'")),
            }
            let name_start = i;
            while bytes
                .get(i)
                .is_some_and(|b| (33..=126).contains(b) && !matches!(b, b'=' | b']' | b'"'))
            {
                i = i.saturating_add(1);
            }
            let name = text.get(name_start..i).unwrap_or_default();
            if !valid_sd_name(name) {
                return Err(err(name_start, "bad PARAM-NAME"));
            }
            if bytes.get(i) != Some(&b'=') || bytes.get(i.saturating_add(1)) != Some(&b'"') {
                return Err(err(i, "expected '=\"'"));
            }
            i = i.saturating_add(2);
            let mut value = Vec::new();
            loop {
                match bytes.get(i) {
                    None => return Err(err(i, "unterminated PARAM-VALUE")),
                    Some(b'"') => {
                        i = i.saturating_add(1);
                        break;
                    }
                    Some(b'\\')
                        if matches!(bytes.get(i.saturating_add(1)), Some(b'"' | b'\\' | b']')) =>
                    {
                        value.push(bytes.get(i.saturating_add(1)).copied().unwrap_or(b'\\'));
                        i = i.saturating_add(2);
                    }
                    Some(b']') => return Err(err(i, "unescaped ']' in PARAM-VALUE")),
                    Some(&b) => {
                        value.push(b);
                        i = i.saturating_add(1);
                    }
                }
            }
            let value = String::from_utf8(value).map_err(|_| err(i, "PARAM-VALUE is not UTF-8"))?;
            params.push((name.to_owned(), value));
        }
        out.push(SdElement {
            id: id.to_owned(),
            params,
        });
    }
    if out.is_empty() {
        return Err(err(0, "neither '-' nor '['"));
    }
    Ok((out, i))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use mayfly_ledger::{AuditEvent, Severity};

    fn env() -> Envelope {
        Envelope {
            facility: 16,
            hostname: "mayfly-1".into(),
            app_name: "mayfly".into(),
            procid: "4242".into(),
            pen: DOCUMENTATION_PEN,
            max_bytes: 8192,
        }
    }

    /// The test vector of docs/siem.md.
    fn vector_record() -> AuditRecord {
        AuditRecord {
            seq: 42,
            prev_hash: [0x11; 32],
            time_ns: 1_795_824_000_123_456_789,
            event: AuditEvent::new("policy.decision", Severity::Alert)
                .field("action", "abort")
                .field("handler", "transfer")
                .field("rule", "honeytoken \"vault\" [k]\\x")
                .field("tx_id", "0123456789abcdef0123456789abcdef"),
        }
    }

    /// The message of [`vector_record`] with chain hash 32 bytes of `0xab` (docs/siem.md).
    const VECTOR: &str = concat!(
        "<129>1 2026-11-28T00:00:00.123456Z mayfly-1 mayfly 4242 policy.decision ",
        "[mayfly@32473 event=\"policy.decision\" seq=\"42\" ",
        "hash=\"abababababababababababababababababababababababababababababababab\"]",
        "[mayfly.fields@32473 action=\"abort\" handler=\"transfer\" ",
        "rule=\"honeytoken \\\"vault\\\" [k\\]\\\\x\" ",
        "tx_id=\"0123456789abcdef0123456789abcdef\"] policy.decision seq=42"
    );

    #[test]
    fn documented_vector() {
        let msg = encode(&vector_record(), &[0xab; 32], &env());
        let expected = VECTOR;
        assert_eq!(msg, expected);
        let doc = include_str!("../../../docs/siem.md");
        assert!(
            doc.contains(expected),
            "docs/siem.md must show the vector verbatim"
        );
    }

    /// The same record sent ahead of the standby (docs/siem.md "Replication"): only the
    /// chain element differs, by one parameter after `hash` (and after `truncated`).
    #[test]
    fn unreplicated_records_are_marked() {
        let msg = encode_marked(&vector_record(), &[0xab; 32], &env(), true);
        let expected = VECTOR.replacen(
            "ab\"][mayfly.fields",
            "ab\" unreplicated=\"true\"][mayfly.fields",
            1,
        );
        assert_ne!(expected, VECTOR);
        assert_eq!(msg, expected);
        let doc = include_str!("../../../docs/siem.md");
        assert!(
            doc.contains(&expected),
            "docs/siem.md must show the marked vector verbatim"
        );
        let chain = |m: &str| parse(m).unwrap().element("mayfly@32473").unwrap().clone();
        assert_eq!(chain(&msg).param("unreplicated"), Some("true"));
        assert_eq!(
            chain(&encode(&vector_record(), &[0xab; 32], &env())).param("unreplicated"),
            None
        );
        // Cut to fit and marked: both parameters, in that order.
        let small = Envelope {
            max_bytes: MIN_MESSAGE_BYTES,
            ..env()
        };
        let mut long = vector_record();
        for k in 0..4 {
            long.event = long.event.field(format!("r{k}"), "y".repeat(1000));
        }
        let cut = encode_marked(&long, &[0xab; 32], &small, true);
        assert!(cut.len() <= MIN_MESSAGE_BYTES, "{}", cut.len());
        assert!(
            cut.contains("\" truncated=\"true\" unreplicated=\"true\"]"),
            "{cut}"
        );
    }

    #[test]
    fn parse_round_trip() {
        let rec = vector_record();
        let m = parse(&encode(&rec, &[1; 32], &env())).unwrap();
        assert_eq!((m.facility, m.severity), (16, 1));
        assert_eq!(m.msgid, "policy.decision");
        let chain = m.element("mayfly@32473").unwrap();
        assert_eq!(chain.param("seq"), Some("42"));
        assert_eq!(chain.param("hash"), Some(hex(&[1; 32]).as_str()));
        let fields = m.element("mayfly.fields@32473").unwrap();
        let got: Vec<(String, String)> = fields.params.clone();
        let want: Vec<(String, String)> = rec.event.fields.clone().into_iter().collect();
        assert_eq!(got, want);
        assert_eq!(m.msg, "policy.decision seq=42");
    }

    #[test]
    fn escaping_survives_random_values() {
        let mut rng = fastrand::Rng::with_seed(5424);
        let alphabet = ['"', '\\', ']', '[', '=', ' ', 'a', 'é', '\n', '€', '😀'];
        for _ in 0..2000 {
            let v: String = (0..rng.usize(0..40))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let rec = AuditRecord {
                seq: 1,
                prev_hash: [0; 32],
                time_ns: 0,
                event: AuditEvent::new("x", Severity::Info).field("v", &v),
            };
            let m = parse(&encode(&rec, &[0; 32], &env())).unwrap();
            assert_eq!(
                m.element("mayfly.fields@32473").unwrap().param("v"),
                Some(v.as_str())
            );
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            timestamp(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            timestamp(4_102_444_799_999_999_999),
            "2099-12-31T23:59:59.999999Z"
        );
        assert_eq!(
            timestamp(1_709_164_800_000_001_000),
            "2024-02-29T00:00:00.000001Z"
        );
    }

    #[test]
    fn header_fields_are_sanitised() {
        assert_eq!(header_field("", 10), "-");
        assert_eq!(header_field("a b\tc", 10), "a_b_c");
        assert_eq!(header_field("é", 10), "_");
        assert_eq!(header_field(&"x".repeat(300), MAX_HOSTNAME).len(), 255);
    }

    #[test]
    fn long_events_are_cut_to_the_limit_and_flagged() {
        let mut ev = AuditEvent::new("ledger.big", Severity::Info);
        for i in 0..32 {
            ev = ev.field(format!("f{i:02}_{}", "n".repeat(26)), "]\"\\é".repeat(150));
        }
        ev.validate().unwrap();
        let rec = AuditRecord {
            seq: 9,
            prev_hash: [0; 32],
            time_ns: 0,
            event: ev,
        };
        for max in [MIN_MESSAGE_BYTES, 4000, 8192] {
            let e = Envelope {
                max_bytes: max,
                hostname: "h".repeat(255),
                ..env()
            };
            let msg = encode(&rec, &[0; 32], &e);
            assert!(msg.len() <= max, "{} > {max}", msg.len());
            let m = parse(&msg).unwrap();
            assert_eq!(
                m.element("mayfly@32473").unwrap().param("truncated"),
                Some("true")
            );
            let fields = m.element("mayfly.fields@32473").unwrap();
            assert_eq!(fields.params.len(), 32, "no field is dropped");
            for (name, value) in &fields.params {
                assert!(rec.event.fields[name].starts_with(value.as_str()));
            }
        }
        let short = encode(&vector_record(), &[0; 32], &env());
        assert!(!short.contains("truncated"));
    }

    #[test]
    fn parser_rejects_malformed() {
        for bad in [
            "",
            "<>1 - - - - - -",
            "<192>1 - - - - - -",
            "<13>2 - - - - - -",
            "<13>1 - - - - -",
            "<13>1 - - - - - [",
            "<13>1 - - - - - [a b]",
            "<13>1 - - - - - [a b=\"x]",
            "<13>1 - - - - - [a b=\"x\"",
            "<13>1 - - - - - [a b=\"x]\"]",
            "<13>1 - - - - - [a b=\"x\"]msg",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse("<13>1 - - - - - - hello").is_ok());
        assert!(parse("<13>1 - - - - - [a@1 b=\"x\\]\"][c@2]").is_ok());
    }
}
