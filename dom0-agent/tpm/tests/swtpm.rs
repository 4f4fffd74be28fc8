//! Sealing, unsealing and quoting against Debian's swtpm (one swtpm process per test).

use mayfly_tpm::quote::{qualifying_data, verify_quote, QuoteError};
use mayfly_tpm::swtpm::{expected_after_boot, measure_boot, Swtpm, GOOD_CMDLINE};
use mayfly_tpm::{Tpm, TpmError, DEFAULT_PCRS};

fn booted(state: &std::path::Path, cmdline: &str) -> (Swtpm, Tpm) {
    let sw = Swtpm::start(state).expect("swtpm starts (apt-get install swtpm)");
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    measure_boot(&mut tpm, cmdline).unwrap();
    (sw, tpm)
}

#[test]
fn sealed_seed_unseals_only_on_the_same_tpm_and_boot_chain() {
    let _serial = mayfly_tpm::swtpm::serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tpm");
    let seed = [0x5a; 32];
    let blob = {
        let (_sw, mut tpm) = booted(&state, GOOD_CMDLINE);
        let values = tpm.read_pcrs(DEFAULT_PCRS).unwrap();
        assert_eq!(values, expected_after_boot(DEFAULT_PCRS, GOOD_CMDLINE));
        let blob = tpm.seal(&seed, &values, [1; 32]).unwrap();
        assert_eq!(*tpm.unseal(&blob).unwrap(), seed);
        blob
    };
    // The blob survives its file encoding.
    let blob = mayfly_tpm::SealedBlob::decode(&blob.encode()).unwrap();

    // A restart of the same TPM with the same measured boot: unseals.
    {
        let (_sw, mut tpm) = booted(&state, GOOD_CMDLINE);
        assert_eq!(*tpm.unseal(&blob).unwrap(), seed);
        // The boot chain changes after the fact (a PCR extended again): refused, and the
        // error names PCR 8.
        tpm.extend_pcr(8, &[0xee; 32]).unwrap();
        match tpm.unseal(&blob) {
            Err(TpmError::PcrMismatch { differ }) => {
                assert_eq!(differ.len(), 1);
                assert_eq!(differ[0].0, 8);
            }
            other => panic!("expected a PCR mismatch, got {other:?}"),
        }
    }
    // A different kernel command line at boot: refused.
    {
        let (_sw, mut tpm) = booted(&state, "console=hvc0 ro init=/bin/sh");
        let err = tpm.unseal(&blob).unwrap_err();
        assert!(matches!(err, TpmError::PcrMismatch { .. }), "{err}");
        assert!(err.to_string().contains("PCR 8"), "{err}");
    }
    // A different TPM (fresh state), same measured boot: cannot even load the object.
    {
        let (_sw, mut tpm) = booted(&dir.path().join("other-tpm"), GOOD_CMDLINE);
        let err = tpm.unseal(&blob).unwrap_err();
        assert!(matches!(err, TpmError::ForeignTpm { .. }), "{err}");
    }
}

#[test]
fn the_tpm_enforces_the_policy_even_if_the_recorded_values_lie() {
    let _serial = mayfly_tpm::swtpm::serial();
    let dir = tempfile::tempdir().unwrap();
    let (_sw, mut tpm) = booted(&dir.path().join("tpm"), GOOD_CMDLINE);
    let values = tpm.read_pcrs(DEFAULT_PCRS).unwrap();
    let mut blob = tpm.seal(&[7; 32], &values, [0; 32]).unwrap();
    // Whoever edits the file's recorded values to the current ones gains nothing: the
    // object's policy digest is inside the TPM-protected public part.
    tpm.extend_pcr(9, &[1; 32]).unwrap();
    blob.pcrs = tpm.read_pcrs(DEFAULT_PCRS).unwrap();
    let err = tpm.unseal(&blob).unwrap_err();
    assert!(matches!(err, TpmError::PolicyFailed { .. }), "{err}");
}

#[test]
fn sealed_to_expected_values_of_another_boot() {
    let _serial = mayfly_tpm::swtpm::serial();
    // Re-sealing for an update: sealed on the current boot to the values the next image's
    // boot will produce; unseals on that boot only.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tpm");
    let next = "console=hvc0 ro mayfly.slot=b";
    let blob = {
        let (_sw, mut tpm) = booted(&state, GOOD_CMDLINE);
        let blob = tpm
            .seal(&[9; 32], &expected_after_boot(DEFAULT_PCRS, next), [0; 32])
            .unwrap();
        assert!(tpm.unseal(&blob).is_err(), "not on the current boot");
        blob
    };
    let (_sw, mut tpm) = booted(&state, next);
    assert_eq!(*tpm.unseal(&blob).unwrap(), [9; 32]);
}

#[test]
fn sealed_to_several_boot_states_unseals_in_each_and_nowhere_else() {
    let _serial = mayfly_tpm::swtpm::serial();
    // An A/B update: one blob for the trial boot, the committed boot of the new slot and
    // the fallback to the old one (TPM2_PolicyOR of one TPM2_PolicyPCR per state).
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tpm");
    let boots = [
        "console=hvc0 ro mayfly.trial=b",
        "console=hvc0 ro mayfly.slot=b",
        "console=hvc0 ro mayfly.fallback=a",
    ];
    let states: Vec<_> = boots
        .iter()
        .map(|c| expected_after_boot(DEFAULT_PCRS, c))
        .collect();
    let blob = {
        let (_sw, mut tpm) = booted(&state, GOOD_CMDLINE);
        let blob = tpm.seal_states(&[3; 32], &states, [0; 32]).unwrap();
        assert_eq!(blob.states(), states);
        let err = tpm.unseal(&blob).unwrap_err();
        assert!(matches!(err, TpmError::PcrMismatch { .. }), "{err}");
        // The same states again, and more than a PolicyOR takes, are refused or folded.
        let twice: Vec<_> = states.iter().chain(&states).cloned().collect();
        assert_eq!(
            tpm.seal_states(&[3; 32], &twice, [0; 32])
                .unwrap()
                .states()
                .len(),
            3
        );
        let nine: Vec<_> = (0..9)
            .map(|i| expected_after_boot(DEFAULT_PCRS, &format!("console=hvc0 n={i}")))
            .collect();
        assert!(matches!(
            tpm.seal_states(&[3; 32], &nine, [0; 32]),
            Err(TpmError::Selection(_))
        ));
        blob
    };
    let blob = mayfly_tpm::SealedBlob::decode(&blob.encode()).unwrap();
    for boot in boots {
        let (_sw, mut tpm) = booted(&state, boot);
        assert_eq!(*tpm.unseal(&blob).unwrap(), [3; 32], "boot {boot}");
    }
    // Another boot chain: refused, the error names PCR 8.
    let (_sw, mut tpm) = booted(&state, "console=hvc0 ro init=/bin/sh");
    let err = tpm.unseal(&blob).unwrap_err();
    assert!(matches!(err, TpmError::PcrMismatch { .. }), "{err}");
    assert!(err.to_string().contains("PCR 8"), "{err}");
    // Recorded states edited to the current values gain nothing: the TPM checks the
    // policy (the PolicyOR list then differs from the object's).
    let mut forged = blob.clone();
    forged.more[0] = tpm
        .read_pcrs(DEFAULT_PCRS)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let err = tpm.unseal(&forged).unwrap_err();
    assert!(matches!(err, TpmError::PolicyFailed { .. }), "{err}");
}

#[test]
fn quote_verifies_and_every_tampering_is_refused() {
    let _serial = mayfly_tpm::swtpm::serial();
    let dir = tempfile::tempdir().unwrap();
    let (_sw, mut tpm) = booted(&dir.path().join("tpm"), GOOD_CMDLINE);
    let ak = tpm.attestation_public_key().unwrap();
    assert_eq!(
        ak,
        tpm.attestation_public_key().unwrap(),
        "same AK every time"
    );
    let head = b"signed head bytes";
    let nonce = [0x42u8; 16];
    let q = qualifying_data(head, &nonce);
    let quote = tpm.quote(DEFAULT_PCRS, &q).unwrap();
    assert_eq!(quote.public_key, ak);
    let expected = expected_after_boot(DEFAULT_PCRS, GOOD_CMDLINE);
    let info = verify_quote(&ak, &quote.attest, &quote.signature, &q, &expected).unwrap();
    assert_eq!(info.pcrs, vec![7, 8, 9]);

    for i in 0..quote.attest.len() {
        let mut t = quote.attest.clone();
        t[i] ^= 0x01;
        assert_eq!(
            verify_quote(&ak, &t, &quote.signature, &q, &expected),
            Err(QuoteError::Signature),
            "attest byte {i}"
        );
    }
    for i in 0..64 {
        let mut s = quote.signature;
        s[i] ^= 0x01;
        assert!(verify_quote(&ak, &quote.attest, &s, &q, &expected).is_err());
    }
    let other_nonce = qualifying_data(head, &[0x43; 16]);
    assert!(matches!(
        verify_quote(
            &ak,
            &quote.attest,
            &quote.signature,
            &other_nonce,
            &expected
        ),
        Err(QuoteError::Nonce { .. })
    ));
    let wrong = expected_after_boot(DEFAULT_PCRS, "console=hvc0 ro init=/bin/sh");
    assert!(matches!(
        verify_quote(&ak, &quote.attest, &quote.signature, &q, &wrong),
        Err(QuoteError::Pcrs { .. })
    ));
    let fewer = expected_after_boot(&[8, 9], GOOD_CMDLINE);
    assert!(matches!(
        verify_quote(&ak, &quote.attest, &quote.signature, &q, &fewer),
        Err(QuoteError::Selection { .. })
    ));
    // Another TPM's AK does not verify this TPM's quote.
    let (_sw2, mut other) = booted(&dir.path().join("tpm2"), GOOD_CMDLINE);
    let ak2 = other.attestation_public_key().unwrap();
    assert_ne!(ak, ak2);
    assert_eq!(
        verify_quote(&ak2, &quote.attest, &quote.signature, &q, &expected),
        Err(QuoteError::Signature)
    );
}
