//! The expected-PCR file: the SHA-256 PCR values an image's measured boot produces, computed
//! at image build time and shipped (under the bundle's signature) with the image. The CLI
//! checks quotes against it; the agent re-seals the signing key to it before an update.
//!
//! UTF-8 text, at most [`MAX_FILE`] bytes, `\n` line ends. Blank lines and lines starting
//! with `#` are ignored. The first other line is exactly `mayfly-expected-pcrs 1`; every
//! following line is `pcr <index> sha256 <64 lower-case hex digits>` with single spaces,
//! indices ascending, distinct, in 0..=23, at least one:
//!
//! ```text
//! # mayfly image 2026.12.1, slot b
//! mayfly-expected-pcrs 1
//! pcr 7 sha256 0000000000000000000000000000000000000000000000000000000000000000
//! pcr 8 sha256 …
//! pcr 9 sha256 …
//! ```

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
    /// A line that is not `pcr <index> sha256 <hex>`.
    #[error("expected-PCR file line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The selection is empty, not ascending, or names a PCR twice.
    #[error("expected-PCR file: {0}")]
    Selection(String),
}

/// Parses an expected-PCR file.
pub fn parse(bytes: &[u8]) -> Result<Vec<(u8, PcrValue)>, PcrFileError> {
    if bytes.len() > MAX_FILE {
        return Err(PcrFileError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| PcrFileError::NotText)?;
    let mut header = false;
    let mut out: Vec<(u8, PcrValue)> = Vec::new();
    for (n, line) in (1..).zip(text.split('\n')) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !header {
            if line != HEADER {
                return Err(PcrFileError::Header);
            }
            header = true;
            continue;
        }
        let bad = |reason: &str| PcrFileError::Line {
            line: n,
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = line.split(' ').collect();
        let [kw, index, bank, value] = parts.as_slice() else {
            return Err(bad("expected `pcr <index> sha256 <hex>`"));
        };
        if *kw != "pcr" || *bank != "sha256" {
            return Err(bad("expected `pcr <index> sha256 <hex>`"));
        }
        if index.is_empty() || index.len() > 2 || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("PCR index is not a number 0..=23"));
        }
        let index: u8 = index.parse().map_err(|_| bad("PCR index out of range"))?;
        if value.len() != 64
            || !value
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("value is not 64 lower-case hex digits"));
        }
        let mut v = [0u8; 32];
        for (i, slot) in v.iter_mut().enumerate() {
            let pair = value
                .get(i * 2..i * 2 + 2)
                .ok_or_else(|| bad("value is not 64 lower-case hex digits"))?;
            *slot = u8::from_str_radix(pair, 16)
                .map_err(|_| bad("value is not 64 lower-case hex digits"))?;
        }
        out.push((index, v));
    }
    if !header {
        return Err(PcrFileError::Header);
    }
    let indices: Vec<u8> = out.iter().map(|p| p.0).collect();
    let sorted = check_selection(&indices).map_err(|e| PcrFileError::Selection(e.to_string()))?;
    if sorted != indices {
        return Err(PcrFileError::Selection(
            "PCRs are not in ascending order".into(),
        ));
    }
    Ok(out)
}

/// One boot state's expected values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedState {
    /// Which state: `pcr lines` for a file of `pcr` lines, else the image file's state
    /// (`slot=b try=- tries=0 entry=production-b`).
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

/// Parses either form of `mayfly-expected-pcrs 1`: this module's `pcr` lines (one state),
/// or the image build's (`buildroot/board/mayfly/expected-pcrs.py`: `bank sha256`,
/// `grub-cfg`, `file` lines and one `state ... pcr8=<hex> pcr9=<hex>` line per A/B boot
/// state, which predict PCRs 8 and 9 only).
pub fn parse_states(bytes: &[u8]) -> Result<Vec<ExpectedState>, PcrFileError> {
    if bytes.len() > MAX_FILE {
        return Err(PcrFileError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| PcrFileError::NotText)?;
    let image_form = text
        .lines()
        .any(|l| l.starts_with("state ") || l == "bank sha256");
    if !image_form {
        return Ok(vec![ExpectedState {
            label: "pcr lines".into(),
            values: parse(bytes)?,
        }]);
    }
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
            Some("bank") if line == "bank sha256" => bank = true,
            Some("bank") => return Err(bad("only the sha256 bank is supported")),
            Some("grub-cfg") | Some("file") => {
                let digest = line.rsplit(' ').next().unwrap_or("");
                if hex32(digest).is_none() {
                    return Err(bad("the digest is not 64 lower-case hex digits"));
                }
            }
            Some("state") => {
                let (mut pcr8, mut pcr9, mut label) = (None, None, Vec::new());
                for w in words {
                    if let Some(h) = w.strip_prefix("pcr8=") {
                        pcr8 = Some(hex32(h).ok_or_else(|| bad("pcr8 is not 64 hex digits"))?);
                    } else if let Some(h) = w.strip_prefix("pcr9=") {
                        pcr9 = Some(hex32(h).ok_or_else(|| bad("pcr9 is not 64 hex digits"))?);
                    } else if w.contains('=')
                        && w.len() <= 64
                        && w.bytes().all(|b| b.is_ascii_graphic())
                    {
                        label.push(w);
                    } else {
                        return Err(bad("a state field is not name=value"));
                    }
                }
                let (Some(p8), Some(p9)) = (pcr8, pcr9) else {
                    return Err(bad("a state needs pcr8= and pcr9="));
                };
                states.push(ExpectedState {
                    label: label.join(" "),
                    values: vec![(8, p8), (9, p9)],
                });
            }
            _ => return Err(bad("expected bank, grub-cfg, file or state")),
        }
    }
    if !header {
        return Err(PcrFileError::Header);
    }
    if !bank || states.is_empty() {
        return Err(PcrFileError::Selection(
            "the image form needs `bank sha256` and at least one state".into(),
        ));
    }
    Ok(states)
}

/// Writes an expected-PCR file (the canonical form [`parse`] reads).
pub fn render(values: &[(u8, PcrValue)], comment: &str) -> String {
    let mut s = String::new();
    for line in comment.lines() {
        s.push_str("# ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(HEADER);
    s.push('\n');
    for (pcr, v) in values {
        s.push_str(&format!("pcr {pcr} sha256 {}\n", hex(v)));
    }
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
    }

    #[test]
    fn the_image_builds_form_gives_one_state_per_line() {
        let text = include_str!("../../../docs/vectors/expected-pcrs-image-1.txt");
        let states = parse_states(text.as_bytes()).unwrap();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].label, "slot=a try=- tries=0 entry=production-a");
        assert_eq!(
            states[1].values.iter().map(|v| v.0).collect::<Vec<_>>(),
            vec![8, 9]
        );
        assert_eq!(states[1].values[0].1, [0x8b; 32]);
        // The `pcr` form is one state.
        let mine = include_str!("../../../docs/vectors/expected-pcrs-1.txt");
        assert_eq!(parse_states(mine.as_bytes()).unwrap().len(), 1);
        for bad in [
            text.replace("bank sha256", "bank sha1"),
            text.replace("pcr9=", "pcr7="),
            text.replace("slot=a ", "slot a "),
            text.replace("grub-cfg 00", "grub-cfg zz"),
            format!("{text}unknown line\n"),
            "mayfly-expected-pcrs 1\nbank sha256\n".to_string(),
        ] {
            assert!(parse_states(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn malformed_files_are_refused() {
        let v = "0".repeat(64);
        let ok = format!("{HEADER}\npcr 8 sha256 {v}\n");
        assert!(parse(ok.as_bytes()).is_ok());
        for bad in [
            format!("pcr 8 sha256 {v}\n"),
            format!("{HEADER}\n"),
            format!("{HEADER}\npcr 24 sha256 {v}\n"),
            format!("{HEADER}\npcr 9 sha256 {v}\npcr 8 sha256 {v}\n"),
            format!("{HEADER}\npcr 8 sha256 {v}\npcr 8 sha256 {v}\n"),
            format!("{HEADER}\npcr 8 sha1 {v}\n"),
            format!("{HEADER}\npcr 8 sha256 {}\n", "A".repeat(64)),
            format!("{HEADER}\npcr 8 sha256 {}\n", "0".repeat(63)),
            format!("{HEADER}\npcr  8 sha256 {v}\n"),
            format!("{HEADER}\npcr +8 sha256 {v}\n"),
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
