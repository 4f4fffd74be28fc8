//! The expected-PCR file: the SHA-256 PCR values an image's measured boot produces, computed
//! at image build time and shipped (under the bundle's signature) with the image. The CLI
//! checks quotes against it; the agent re-seals the signing key to it before an update.
//!
//! One format (docs/formats.md §4.2): UTF-8 text, at most [`MAX_FILE`] bytes, `\n` line
//! ends, fields separated by one space. Blank lines and lines starting with `#` are ignored.
//! The first other line is exactly `mayfly-expected-pcrs 1`, then `bank sha256`, then
//! optionally the image build's `grub-cfg <hex>` and `file <path> <hex>` lines (what the
//! values were computed from), then one or more boot states:
//!
//! ```text
//! # mayfly image 2026.12.1
//! mayfly-expected-pcrs 1
//! bank sha256
//! grub-cfg <64 hex>
//! file /xen-a <64 hex>
//! state slot=a try=- tries=0 entry=production-a pcr8=<64 hex> pcr9=<64 hex>
//! state pcr7=<64 hex> pcr8=<64 hex> pcr9=<64 hex>
//! ```
//!
//! A `state` is labelled by its `name=value` fields (none is fine) and predicts the PCRs of
//! its `pcr<N>=` fields (N in 0..=23, ascending, distinct, at least one; they follow the
//! label). The image build (`buildroot/board/mayfly/expected-pcrs.py`) writes one state per
//! A/B boot state predicting PCRs 8 and 9; a file written by hand or by [`render`] has one
//! unlabelled state.

use crate::{check_selection, hex, PcrValue};

/// Largest expected-PCR file accepted.
pub const MAX_FILE: usize = 16 * 1024;
/// The header line.
pub const HEADER: &str = "mayfly-expected-pcrs 1";

/// Why an expected-PCR file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcrFileError {
    /// Larger than [`MAX_FILE`].
    #[error("expected-PCR file is {0} bytes, more than {MAX_FILE}")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("expected-PCR file is not UTF-8 text")]
    NotText,
    /// No `mayfly-expected-pcrs 1` header.
    #[error("expected-PCR file does not start with {HEADER:?}")]
    Header,
    /// A line that is not one of the format's.
    #[error("expected-PCR file line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No `bank sha256`, no state, or (for [`parse`]) more than one state.
    #[error("expected-PCR file: {0}")]
    Selection(String),
}

/// One boot state's expected values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedState {
    /// Its `name=value` fields joined by one space (`slot=b try=- tries=0
    /// entry=production-b`); empty for an unlabelled state.
    pub label: String,
    /// PCR index and value, ascending. PCRs the file does not predict are absent.
    pub values: Vec<(u8, PcrValue)>,
}

fn hex32(text: &str) -> Option<PcrValue> {
    if text.len() != 64
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut v = [0u8; 32];
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(v)
}

/// `pcr<N>=<hex>`: the index and value, or why not.
fn pcr_field(word: &str) -> Option<Result<(u8, PcrValue), &'static str>> {
    let rest = word.strip_prefix("pcr")?;
    let (index, value) = rest.split_once('=')?;
    if index.is_empty() || index.len() > 2 || !index.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Err("a pcr field's index is not a number 0..=23"));
    }
    let Ok(index) = index.parse::<u8>() else {
        return Some(Err("a pcr field's index is not a number 0..=23"));
    };
    Some(
        hex32(value)
            .map(|v| (index, v))
            .ok_or("a pcr value is not 64 lower-case hex digits"),
    )
}

/// Parses an expected-PCR file: every boot state, in file order.
pub fn parse_states(bytes: &[u8]) -> Result<Vec<ExpectedState>, PcrFileError> {
    if bytes.len() > MAX_FILE {
        return Err(PcrFileError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| PcrFileError::NotText)?;
    let mut header = false;
    let mut bank = false;
    let mut states = Vec::new();
    for (n, line) in (1..).zip(text.split('\n')) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| PcrFileError::Line {
            line: n,
            reason: reason.to_string(),
        };
        if !header {
            if line != HEADER {
                return Err(PcrFileError::Header);
            }
            header = true;
            continue;
        }
        let mut words = line.split(' ');
        match words.next() {
            Some("bank") if line == "bank sha256" && !bank => bank = true,
            Some("bank") => return Err(bad("only one `bank sha256` line is supported")),
            Some("grub-cfg") | Some("file") => {
                let digest = line.rsplit(' ').next().unwrap_or("");
                if hex32(digest).is_none() {
                    return Err(bad("the digest is not 64 lower-case hex digits"));
                }
            }
            Some("state") if bank => {
                let (mut label, mut values): (Vec<&str>, Vec<(u8, PcrValue)>) =
                    (Vec::new(), Vec::new());
                for w in words {
                    match pcr_field(w) {
                        Some(Ok(p)) => values.push(p),
                        Some(Err(reason)) => return Err(bad(reason)),
                        None if !values.is_empty() => {
                            return Err(bad("a name=value field after the pcr fields"))
                        }
                        None if w.contains('=')
                            && w.len() <= 64
                            && w.bytes().all(|b| b.is_ascii_graphic()) =>
                        {
                            label.push(w)
                        }
                        None => return Err(bad("a state field is not name=value")),
                    }
                }
                let indices: Vec<u8> = values.iter().map(|p| p.0).collect();
                match check_selection(&indices) {
                    Ok(sorted) if sorted == indices => {}
                    Ok(_) => return Err(bad("the pcr fields are not in ascending order")),
                    Err(e) => return Err(bad(&e.to_string())),
                }
                states.push(ExpectedState {
                    label: label.join(" "),
                    values,
                });
            }
            Some("state") => return Err(bad("a state before `bank sha256`")),
            _ => return Err(bad("expected bank, grub-cfg, file or state")),
        }
    }
    if !header {
        return Err(PcrFileError::Header);
    }
    if !bank || states.is_empty() {
        return Err(PcrFileError::Selection(
            "a file needs `bank sha256` and at least one state".into(),
        ));
    }
    Ok(states)
}

/// Parses a file of exactly one state and returns its values.
pub fn parse(bytes: &[u8]) -> Result<Vec<(u8, PcrValue)>, PcrFileError> {
    let mut states = parse_states(bytes)?;
    match (states.pop(), states.is_empty()) {
        (Some(one), true) => Ok(one.values),
        _ => Err(PcrFileError::Selection(
            "more than one state where one was expected".into(),
        )),
    }
}

/// Writes an expected-PCR file of one unlabelled state (what [`parse`] reads back).
pub fn render(values: &[(u8, PcrValue)], comment: &str) -> String {
    let mut s = String::new();
    for line in comment.lines() {
        s.push_str("# ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(HEADER);
    s.push_str("\nbank sha256\nstate");
    for (pcr, v) in values {
        s.push_str(&format!(" pcr{pcr}={}", hex(v)));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_parses_and_renders_back() {
        let text = include_str!("../../../docs/vectors/expected-pcrs-1.txt");
        let values = parse(text.as_bytes()).unwrap();
        assert_eq!(
            values.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        let digest = include_str!("../../../docs/vectors/expected-pcrs-1.digest");
        assert_eq!(hex(&crate::pcr_digest(&values)), digest.trim());
        assert_eq!(parse(render(&values, "x").as_bytes()).unwrap(), values);
        assert_eq!(parse_states(text.as_bytes()).unwrap()[0].label, "");
    }

    #[test]
    fn the_image_builds_file_gives_one_state_per_line() {
        let text = include_str!("../../../docs/vectors/expected-pcrs-image-1.txt");
        let states = parse_states(text.as_bytes()).unwrap();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].label, "slot=a try=- tries=0 entry=production-a");
        assert_eq!(
            states[1].values.iter().map(|v| v.0).collect::<Vec<_>>(),
            vec![8, 9]
        );
        assert_eq!(states[1].values[0].1, [0x8b; 32]);
        assert!(parse(text.as_bytes()).is_err(), "two states are not one");
        for bad in [
            text.replace("bank sha256", "bank sha1"),
            text.replace("pcr9=", "pcr7="),
            text.replace("slot=a ", "slot a "),
            text.replace("grub-cfg 00", "grub-cfg zz"),
            text.replace(" pcr9=9a9a", " slot=c pcr9=9a9a"),
            format!("{text}unknown line\n"),
            "mayfly-expected-pcrs 1\nbank sha256\n".to_string(),
        ] {
            assert!(parse_states(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn malformed_files_are_refused() {
        let v = "0".repeat(64);
        let ok = format!("{HEADER}\nbank sha256\nstate pcr8={v}\n");
        assert!(parse(ok.as_bytes()).is_ok());
        for bad in [
            format!("bank sha256\nstate pcr8={v}\n"),
            format!("{HEADER}\nbank sha256\n"),
            format!("{HEADER}\nstate pcr8={v}\nbank sha256\n"),
            format!("{HEADER}\nbank sha256\nstate\n"),
            format!("{HEADER}\nbank sha256\nstate pcr24={v}\n"),
            format!("{HEADER}\nbank sha256\nstate pcr9={v} pcr8={v}\n"),
            format!("{HEADER}\nbank sha256\nstate pcr8={v} pcr8={v}\n"),
            format!("{HEADER}\nbank sha256\nstate pcr8={}\n", "A".repeat(64)),
            format!("{HEADER}\nbank sha256\nstate pcr8={}\n", "0".repeat(63)),
            format!("{HEADER}\nbank sha256\nstate  pcr8={v}\n"),
            format!("{HEADER}\nbank sha256\nstate pcr+8={v}\n"),
            format!("{HEADER}\npcr 8 sha256 {v}\n"),
            "mayfly-expected-pcrs 2\n".to_string(),
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
        assert!(matches!(
            parse(&vec![b'#'; MAX_FILE + 1]),
            Err(PcrFileError::TooLarge(_))
        ));
        assert_eq!(parse(&[0xff, 0xfe]), Err(PcrFileError::NotText));
    }
}
