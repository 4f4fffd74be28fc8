//! The ledger with its signing key sealed to a (software) TPM: signs and verifies across
//! restarts of the TPM, refuses to sign on a changed boot chain or another TPM without
//! writing anything, audits the refusal on the next good boot, rotates to a new sealed key,
//! and moves to an update's boot chain through a re-seal.

use std::path::Path;
use std::sync::Arc;

use mayfly_ledger::keys::{KEY_FILE, SEALED_KEY_FILE};
use mayfly_ledger::{verify, KeyError, Ledger, OpenError, Options, TxContext, TxId};
use mayfly_tpm::keystore::{SealedKeys, ALT_FILE, NEXT_FILE};
use mayfly_tpm::swtpm::{expected_after_boot, measure_boot, Swtpm, GOOD_CMDLINE};
use mayfly_tpm::{Tpm, DEFAULT_PCRS};
use slog::{o, Discard, Logger};

fn boot(state: &Path, cmdline: &str) -> Swtpm {
    let sw = Swtpm::start(state).expect("swtpm starts (apt-get install swtpm)");
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    measure_boot(&mut tpm, cmdline).unwrap();
    sw
}

fn options(sw: &Swtpm) -> Options {
    Options {
        keys: Arc::new(SealedKeys::new(&sw.tcti(), DEFAULT_PCRS).unwrap()),
        ..Options::default()
    }
}

fn open(dir: &Path, sw: &Swtpm) -> Result<Ledger, OpenError> {
    Ledger::open(dir, &options(sw), &Logger::root(Discard, o!()))
}

fn put(ledger: &Ledger, k: &str) {
    let mut t = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: b"r".to_vec(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    t.put(k.as_bytes(), b"v").unwrap();
    t.commit(Vec::new()).unwrap();
}

fn verified(dir: &Path, root: [u8; 32]) -> mayfly_ledger::VerifyReport {
    let store = mayfly_ledger::store::open_read_only(dir, &Default::default()).unwrap();
    let r = verify(&store, &[root], &mut |_| {}).unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    r
}

fn events(dir: &Path) -> Vec<mayfly_ledger::AuditEvent> {
    let store = mayfly_ledger::store::open_read_only(dir, &Default::default()).unwrap();
    store
        .audit_records(1, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect()
}

fn data_digest(dir: &Path) -> Vec<u8> {
    let bytes = std::fs::read(dir.join("data.mdb")).unwrap();
    ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .to_vec()
}

#[test]
fn sealed_key_signs_refuses_on_a_changed_boot_and_another_tpm_and_recovers() {
    let _serial = mayfly_tpm::swtpm::serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let state = tmp.path().join("tpm");

    // First boot: the ledger is created with a sealed key; no key file exists.
    let root = {
        let sw = boot(&state, GOOD_CMDLINE);
        let l = open(&data, &sw).unwrap();
        assert_eq!(l.key_source().0, "tpm");
        put(&l, "a");
        l.public_key()
    };
    assert!(data.join(SEALED_KEY_FILE).exists());
    assert!(
        !data.join(KEY_FILE).exists(),
        "the seed never lands in a file"
    );

    // The same TPM after a power cycle and the same measured boot: signs again.
    {
        let sw = boot(&state, GOOD_CMDLINE);
        let l = open(&data, &sw).unwrap();
        assert_eq!(l.signing_key(), root);
        put(&l, "b");
    }
    assert_eq!(verified(&data, root).checkpoints, 2);

    // A changed kernel command line (PCR 8): refused, names the PCR, writes nothing.
    let before = data_digest(&data);
    {
        let sw = boot(&state, "console=hvc0 ro init=/bin/sh");
        let err = open(&data, &sw).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, OpenError::Key(e) if e.is_unavailable()),
            "{text}"
        );
        assert!(text.contains("PCR 8"), "{text}");
        assert!(text.contains("boot chain"), "{text}");
    }
    assert_eq!(
        data_digest(&data),
        before,
        "a refused start wrote to the ledger"
    );

    // The data directory on another machine (a fresh TPM, the same boot): refused.
    {
        let sw = boot(&tmp.path().join("other-tpm"), GOOD_CMDLINE);
        let err = open(&data, &sw).unwrap_err().to_string();
        assert!(err.contains("does not belong to this TPM"), "{err}");
    }
    assert_eq!(data_digest(&data), before);
    // The refusals wait in a marker written whole (tmp, fsync, rename): a power cut after a
    // refused start must not leave a torn one.
    let marker = std::fs::read_to_string(data.join("key-unavailable.refused")).unwrap();
    assert!(
        marker.contains("PCR 8") && marker.contains("does not belong to this TPM"),
        "{marker}"
    );
    assert!(!data.join("key-unavailable.refused.tmp").exists());

    // The original TPM and image again: signs, and audits the refused starts.
    {
        let sw = boot(&state, GOOD_CMDLINE);
        let l = open(&data, &sw).unwrap();
        put(&l, "c");
    }
    let refused: Vec<_> = events(&data)
        .into_iter()
        .filter(|e| e.event == "key.unavailable_earlier")
        .collect();
    assert_eq!(refused.len(), 1, "one marker, audited once");
    let detail = &refused[0].fields["detail"];
    assert!(
        detail.contains("PCR 8"),
        "the first refusal is kept: {detail}"
    );
    assert!(detail.contains("does not belong to this TPM"), "{detail}");
    assert_eq!(refused[0].fields["key_source"], "tpm");
    assert!(events(&data)
        .iter()
        .any(|e| e.event == "ledger.opened" && e.fields["key_source"] == "tpm"));
    verified(&data, root);
}

#[test]
fn rotation_moves_to_a_new_sealed_key_and_reseal_follows_an_update() {
    let _serial = mayfly_tpm::swtpm::serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let state = tmp.path().join("tpm");
    let slot_b = "console=hvc0 ro mayfly.slot=b";

    let (root, new_key) = {
        let sw = boot(&state, GOOD_CMDLINE);
        let l = open(&data, &sw).unwrap();
        put(&l, "a");
        let keys = SealedKeys::new(&sw.tcti(), DEFAULT_PCRS).unwrap();
        // Re-seal for slot b's expected values before "updating".
        let alt = keys
            .reseal(&data, &expected_after_boot(DEFAULT_PCRS, slot_b))
            .unwrap();
        assert_eq!(alt, data.join(ALT_FILE));
        let (new_key, _) = l.rotate_key(Vec::new()).unwrap();
        assert!(!data.join(NEXT_FILE).exists());
        assert!(
            !data.join(ALT_FILE).exists(),
            "the outgoing key's re-seal is gone with it"
        );
        put(&l, "b");
        // Re-seal the new key for slot b.
        keys.reseal(&data, &expected_after_boot(DEFAULT_PCRS, slot_b))
            .unwrap();
        (l.public_key(), new_key)
    };
    assert_ne!(root, new_key);

    // Slot b boots: the .alt blob unseals, the new key signs.
    {
        let sw = boot(&state, slot_b);
        let l = open(&data, &sw).unwrap();
        assert_eq!(l.signing_key(), new_key);
        assert!(l
            .key_source()
            .1
            .contains(&("sealed_file", ALT_FILE.to_string())));
        put(&l, "c");
        // On slot b, a re-seal for slot c replaces signing.sealed (not the one in use).
        let keys = SealedKeys::new(&sw.tcti(), DEFAULT_PCRS).unwrap();
        let path = keys
            .reseal(&data, &expected_after_boot(DEFAULT_PCRS, "slot c"))
            .unwrap();
        assert_eq!(path, data.join(SEALED_KEY_FILE));
    }
    // The old slot's seal was replaced: slot a cannot sign any more, slot b still can.
    {
        let sw = boot(&state, GOOD_CMDLINE);
        assert!(matches!(
            open(&data, &sw),
            Err(OpenError::Key(KeyError::Unavailable { .. }))
        ));
    }
    {
        let sw = boot(&state, slot_b);
        open(&data, &sw).unwrap();
    }
    verified(&data, root);
}

#[test]
fn sources_are_not_mixed_up() {
    let _serial = mayfly_tpm::swtpm::serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // A file-key ledger opened with the TPM source: refused, the key file untouched.
    drop(Ledger::open(&data, &Options::default(), &Logger::root(Discard, o!())).unwrap());
    let sw = boot(&tmp.path().join("tpm"), GOOD_CMDLINE);
    let err = open(&data, &sw).unwrap_err().to_string();
    assert!(err.contains("source \"file\""), "{err}");
    assert!(data.join(KEY_FILE).exists());
    assert!(!data.join(SEALED_KEY_FILE).exists());
    // And the other way round.
    let data2 = tmp.path().join("data2");
    std::fs::create_dir(&data2).unwrap();
    drop(open(&data2, &sw).unwrap());
    let err = Ledger::open(&data2, &Options::default(), &Logger::root(Discard, o!()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("source \"tpm\""), "{err}");
}
