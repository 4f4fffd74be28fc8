//! `mayfly admin attest`: asks the agent for a TPM quote over its PCRs and its latest signed
//! head, and checks it here, without trusting anything the agent says:
//!
//! 1. the attestation key in the answer is the one the operator pinned (`--ak`);
//! 2. the quote's signature verifies under it (any changed byte of the quote fails here);
//! 3. the quote's qualifying data is SHA-256(head bytes || our nonce): fresh, and about
//!    this head;
//! 4. the quoted PCRs hold the values of one of the expected-PCR file's boot states (a PCR
//!    the file does not predict, such as PCR 7 with the image build's file, takes the value
//!    the agent reports: the signed PCR digest covers it, so it is attested, just not
//!    compared; it is named in the output);
//! 5. the head decodes, its Ed25519 signature verifies, and it is signed by the appliance's
//!    identity key or a `--head-key` (the current key after rotations, as `verify` shows).
//!
//! The trust argument is in docs/design.md ("Attestation").

use mayfly_command::hex;
use mayfly_ledger::SignedHead;
use mayfly_tpm::pcrfile::ExpectedState;
use mayfly_tpm::quote::{check_signature, parse_attest, qualifying_data, verify_quote, QuoteInfo};
use mayfly_tpm::PcrValue;
use serde_json::Value;

/// A checked attestation.
#[derive(Debug)]
pub struct Attested {
    /// The quote's facts.
    pub info: QuoteInfo,
    /// The signed head it covers.
    pub head: SignedHead,
    /// The expected-PCR file's state that matched.
    pub state: String,
    /// Quoted PCRs the file does not predict, with their attested values.
    pub uncompared: Vec<(u8, PcrValue)>,
}

/// Why an attestation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// A field of the answer is missing or not hex of the right length.
    #[error("the agent's answer has no valid {0}")]
    Answer(&'static str),
    /// The answer's attestation key is not the pinned one.
    #[error("the quote is by attestation key {found}, not the pinned {pinned}")]
    WrongKey {
        /// In the answer.
        found: String,
        /// Pinned.
        pinned: String,
    },
    /// The quote failed a check.
    #[error("{0}")]
    Quote(#[from] mayfly_tpm::QuoteError),
    /// The quoted PCRs match none of the expected-PCR file's states.
    #[error("the quoted PCRs match none of the {states} boot state(s) of the expected-PCR file: the machine did not boot the expected image ({detail})")]
    NoState {
        /// States tried.
        states: usize,
        /// The first mismatch.
        detail: String,
    },
    /// The head is malformed or its signature is bad.
    #[error("the signed head is not valid: {0}")]
    Head(String),
    /// The head is signed by a key not accepted.
    #[error("the signed head (group {group}) is signed by {key}, which is neither the appliance's identity key nor a --head-key")]
    HeadKey {
        /// Group.
        group: u64,
        /// Signer.
        key: String,
    },
}

fn field<'a>(v: &'a Value, name: &'static str) -> Result<&'a str, AttestError> {
    v.get(name)
        .and_then(Value::as_str)
        .ok_or(AttestError::Answer(name))
}

fn bytes(v: &Value, name: &'static str, max: usize) -> Result<Vec<u8>, AttestError> {
    let text = field(v, name)?;
    if text.len() > max.saturating_mul(2) {
        return Err(AttestError::Answer(name));
    }
    mayfly_command::unhex(text).ok_or(AttestError::Answer(name))
}

/// Parses a pinned attestation key: 130 hex digits (a 65-byte uncompressed P-256 point).
pub fn parse_ak(text: &str) -> Option<[u8; 65]> {
    let b = mayfly_command::unhex(text.trim())?;
    let ak: [u8; 65] = b.try_into().ok()?;
    (ak[0] == 0x04).then_some(ak)
}

/// The PCR values the agent reported beside the quote (unsigned; used only for PCRs the
/// expected file does not predict, which the quote's signed digest then binds).
fn reported(quote: &Value) -> Vec<(u8, PcrValue)> {
    quote
        .get("pcrs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let pcr = u8::try_from(p.get("pcr")?.as_u64()?).ok()?;
                    let v = mayfly_command::unhex(p.get("sha256")?.as_str()?)?;
                    Some((pcr, v.try_into().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the `attest` result against what the operator knows.
pub fn check(
    result: &Value,
    nonce: &[u8],
    ak: &[u8; 65],
    states: &[ExpectedState],
    head_keys: &[[u8; 32]],
) -> Result<Attested, AttestError> {
    let quote = result.get("quote").ok_or(AttestError::Answer("quote"))?;
    let found: [u8; 65] = bytes(quote, "ak", 65)?
        .try_into()
        .map_err(|_| AttestError::Answer("ak"))?;
    if &found != ak {
        return Err(AttestError::WrongKey {
            found: hex(&found),
            pinned: hex(ak),
        });
    }
    let attest = bytes(quote, "attest", mayfly_tpm::quote::MAX_ATTEST)?;
    let signature: [u8; 64] = bytes(quote, "signature", 64)?
        .try_into()
        .map_err(|_| AttestError::Answer("signature"))?;
    // Nothing in the quote is read before its signature holds.
    check_signature(ak, &attest, &signature)?;
    let (_, quoted) = parse_attest(&attest)?;
    let head_bytes = bytes(result, "head", 1024)?;
    let q = qualifying_data(&head_bytes, nonce);
    let reported = reported(quote);
    let mut first_mismatch = None;
    let mut matched = None;
    for state in states {
        if state.values.iter().any(|(p, _)| !quoted.pcrs.contains(p)) {
            first_mismatch.get_or_insert_with(|| {
                format!(
                    "state {:?} predicts PCRs the quote does not cover",
                    state.label
                )
            });
            continue;
        }
        let mut expected = Vec::new();
        let mut uncompared = Vec::new();
        for p in &quoted.pcrs {
            match state.values.iter().find(|v| v.0 == *p) {
                Some(v) => expected.push(*v),
                None => {
                    let v = reported
                        .iter()
                        .find(|v| v.0 == *p)
                        .ok_or(AttestError::Answer("pcrs"))?;
                    expected.push(*v);
                    uncompared.push(*v);
                }
            }
        }
        match verify_quote(ak, &attest, &signature, &q, &expected) {
            Ok(info) => {
                matched = Some((info, state.label.clone(), uncompared));
                break;
            }
            Err(e @ mayfly_tpm::QuoteError::Pcrs { .. }) => {
                first_mismatch.get_or_insert_with(|| format!("state {:?}: {e}", state.label));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some((info, state, uncompared)) = matched else {
        return Err(AttestError::NoState {
            states: states.len(),
            detail: first_mismatch.unwrap_or_default(),
        });
    };
    let head = SignedHead::decode(&head_bytes).map_err(|e| AttestError::Head(e.to_string()))?;
    if !head.signature_valid() {
        return Err(AttestError::Head(
            "its Ed25519 signature does not verify".into(),
        ));
    }
    if !head_keys.contains(&head.public_key) {
        return Err(AttestError::HeadKey {
            group: head.group,
            key: hex(&head.public_key),
        });
    }
    Ok(Attested {
        info,
        head,
        state,
        uncompared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_ledger::{SigningKey, Tip};
    use mayfly_tpm::swtpm::{expected_after_boot, measure_boot, Swtpm, GOOD_CMDLINE};
    use mayfly_tpm::{Tpm, DEFAULT_PCRS};
    use serde_json::json;

    /// A real answer: a head signed by seed 1, quoted by a swtpm after the test boot.
    fn answer(nonce: &[u8]) -> (Value, [u8; 65], [u8; 32]) {
        let dir = tempfile::tempdir().unwrap();
        let sw = Swtpm::start(dir.path()).expect("swtpm starts (apt-get install swtpm)");
        let mut tpm = Tpm::open(&sw.tcti()).unwrap();
        measure_boot(&mut tpm, GOOD_CMDLINE).unwrap();
        let key = SigningKey::from_seed(&[1; 32]);
        let tip = |seq: u8| Tip {
            seq: u64::from(seq),
            hash: [seq; 32],
        };
        let head = SignedHead::sign(&key, 3, tip(5), tip(9), 1_700_000_000_000_000_000).encode();
        let q = tpm
            .quote(DEFAULT_PCRS, &qualifying_data(&head, nonce))
            .unwrap();
        let pcrs: Vec<Value> = q
            .pcrs
            .iter()
            .map(|(p, v)| json!({"pcr": p, "sha256": hex(v)}))
            .collect();
        let result = json!({"head": hex(&head), "head_group": 3, "nonce": hex(nonce),
            "quote": {"ak": hex(&q.public_key), "attest": hex(&q.attest),
                      "signature": hex(&q.signature), "pcrs": pcrs}});
        (result, q.public_key, key.public_key())
    }

    #[test]
    fn a_genuine_answer_passes_and_every_lie_is_named() {
        let nonce = [0x5a; 32];
        let (good, ak, head_key) = answer(&nonce);
        let state = |label: &str, values: Vec<(u8, PcrValue)>| ExpectedState {
            label: label.into(),
            values,
        };
        let expected = [state(
            "good",
            expected_after_boot(DEFAULT_PCRS, GOOD_CMDLINE),
        )];
        let a = check(&good, &nonce, &ak, &expected, &[head_key]).unwrap();
        assert_eq!(a.head.group, 3);
        assert_eq!(a.info.pcrs, vec![7, 8, 9]);
        assert!(a.uncompared.is_empty());
        // The image build's form predicts PCRs 8 and 9 of several states: the matching one
        // is found, PCR 7 is attested but not compared.
        let other = expected_after_boot(&[8, 9], "console=hvc0 ro init=/bin/sh");
        let image = [
            state("slot=a", other.clone()),
            state("slot=b", expected_after_boot(&[8, 9], GOOD_CMDLINE)),
        ];
        let a = check(&good, &nonce, &ak, &image, &[head_key]).unwrap();
        assert_eq!(a.state, "slot=b");
        assert_eq!(a.uncompared, vec![(7, [0; 32])]);
        let e = check(&good, &nonce, &ak, &image[..1], &[head_key]).unwrap_err();
        assert!(e.to_string().contains("none of the 1 boot state"), "{e}");

        let err = |v: &Value, nonce: &[u8], keys: &[[u8; 32]], exp: &[ExpectedState]| {
            check(v, nonce, &ak, exp, keys).unwrap_err().to_string()
        };
        // Any changed byte of the quote: the signature fails.
        let attest = good["quote"]["attest"].as_str().unwrap().to_owned();
        for i in [0, 10, attest.len() / 2, attest.len() - 1] {
            let mut t = good.clone();
            let mut s = attest.clone().into_bytes();
            s[i] = if s[i] == b'0' { b'1' } else { b'0' };
            t["quote"]["attest"] = Value::from(String::from_utf8(s).unwrap());
            assert!(err(&t, &nonce, &[head_key], &expected).contains("signature"));
        }
        // Another nonce (a replayed quote), or another head: the qualifying data differs.
        assert!(err(&good, &[0x5b; 32], &[head_key], &expected).contains("qualifying data"));
        let mut t = good.clone();
        let mut h = good["head"].as_str().unwrap().to_owned().into_bytes();
        h[40] = if h[40] == b'0' { b'1' } else { b'0' };
        t["head"] = Value::from(String::from_utf8(h).unwrap());
        assert!(err(&t, &nonce, &[head_key], &expected).contains("qualifying data"));
        // Another image's PCRs.
        let other = [state(
            "other",
            expected_after_boot(DEFAULT_PCRS, "console=hvc0 ro init=/bin/sh"),
        )];
        assert!(err(&good, &nonce, &[head_key], &other).contains("did not boot the expected"));
        // A head signed by a key the operator does not accept.
        assert!(err(&good, &nonce, &[[9; 32]], &expected).contains("neither the appliance"));
        // An AK other than the pinned one.
        let e = check(&good, &nonce, &[4; 65], &expected, &[head_key]).unwrap_err();
        assert!(e.to_string().contains("not the pinned"), "{e}");
        // Missing or malformed fields.
        let mut t = good.clone();
        t["quote"]["signature"] = Value::from("zz");
        assert!(err(&t, &nonce, &[head_key], &expected).contains("signature"));
        assert!(check(&json!({}), &nonce, &ak, &expected, &[head_key]).is_err());
    }
}
