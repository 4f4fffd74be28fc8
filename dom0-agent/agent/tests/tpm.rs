//! The signing key sealed to a TPM, end to end with real processes: Debian's swtpm, a
//! "boot loader" extending PCRs 8/9 as GRUB would, `dom0-agent init/serve/verify/reseal`
//! and the `mayfly` CLI's `admin attest`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{agent_exe, audit, mayfly, verify, Agent};
use mayfly_tpm::swtpm::{expected_after_boot, measure_boot, Swtpm, GOOD_CMDLINE};
use mayfly_tpm::{Tpm, DEFAULT_PCRS};
use serde_json::json;

fn boot(state: &Path, cmdline: &str) -> Swtpm {
    let sw = Swtpm::start(state).expect("swtpm starts (apt-get install swtpm)");
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    measure_boot(&mut tpm, cmdline).unwrap();
    sw
}

/// An expected-PCR file in the image build's form (buildroot/board/mayfly/expected-pcrs.py):
/// one `state` line per command line, labelled `slot=s<i>`, predicting PCRs 8 and 9.
fn image_file(dir: &Path, cmdlines: &[&str]) -> PathBuf {
    let mut text = String::from("mayfly-expected-pcrs 1\nbank sha256\n");
    for (i, c) in cmdlines.iter().enumerate() {
        let v = expected_after_boot(&[8, 9], c);
        text.push_str(&format!(
            "state slot=s{i} pcr8={} pcr9={}\n",
            mayfly_ledger::codec::hex(&v[0].1),
            mayfly_ledger::codec::hex(&v[1].1)
        ));
    }
    let path = dir.join("image.pcrs");
    std::fs::write(&path, text).unwrap();
    path
}

fn expected_file(dir: &Path, name: &str, cmdline: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        mayfly_tpm::pcrfile::render(&expected_after_boot(DEFAULT_PCRS, cmdline), name),
    )
    .unwrap();
    path
}

/// `dom0-agent SUBCOMMAND --key-source tpm --tpm-tcti TCTI --data-dir DATA EXTRA...`:
/// (exit code, stdout, stderr).
fn run_agent(sub: &str, tcti: &str, data: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_exe())
        .args([sub, "--key-source", "tpm", "--tpm-tcti", tcti])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `dom0-agent serve` that is expected to stop at start: (exit code, stderr).
fn serve_refused(data: &Path, tcti: &str) -> (i32, String) {
    let (code, _, err) = run_agent("serve", tcti, data, &["--listen", "127.0.0.1:0"]);
    (code, err)
}

#[test]
fn sealed_key_end_to_end_with_attestation() {
    let _serial = mayfly_tpm::swtpm::serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = dir.path().join("tpm");
    let k = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let (code, _, err) = mayfly(&["admin", "keygen", "--out", &k("alice")]);
    assert_eq!(code, 0, "{err}");
    let good = expected_file(dir.path(), "good.pcrs", GOOD_CMDLINE);
    let other = expected_file(dir.path(), "other.pcrs", "console=hvc0 ro init=/bin/sh");

    // Provisioning: init seals a new key to this boot's PCRs.
    let sw = boot(&state, GOOD_CMDLINE);
    let (code, out, err) = run_agent("init", &sw.tcti(), &data, &[]);
    assert_eq!(code, 0, "{err}");
    let identity = out.trim().to_owned();
    assert!(data.join("signing.sealed").exists());
    assert!(!data.join("signing.key").exists());
    // The attestation key enters the signed chain at provisioning.
    let ak = audit(&data)
        .into_iter()
        .find(|(e, _)| e == "tpm.quote")
        .map(|(_, f)| f["ak"].clone())
        .expect("a tpm.quote record at provisioning");
    assert_eq!(ak.len(), 130);
    drop(sw);

    // A good boot: serve signs with the sealed key and says so.
    let sw = boot(&state, GOOD_CMDLINE);
    {
        let agent = Agent::start(
            &data,
            &[
                "--key-source",
                "tpm",
                "--tpm-tcti",
                &sw.tcti(),
                "--admin-key",
                &k("alice.pub"),
                "--admin-quorum",
                "1",
            ],
        );
        let (code, body) = agent.tx("open_account", json!({"name": "a", "balance": 5}));
        assert_eq!(code, 200, "{body}");
        let (_, health) = agent.get("/v1/health");
        assert_eq!(health["key"]["source"], "tpm", "{health}");
        assert_eq!(health["key"]["pcrs"], "7,8,9", "{health}");
        let sock = data.join("admin.sock");
        let sock = sock.to_str().unwrap();
        // Every console command as alice on this agent's socket.
        let admin = |args: &[&str]| {
            let mut all = vec!["admin", args[0], "--socket", sock, "--key"];
            let key = k("alice.key");
            all.push(&key);
            all.extend(&args[1..]);
            mayfly(&all)
        };
        let (code, out, err) = admin(&["status"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("key source") && out.contains("tpm ("), "{out}");

        // Attestation against the expected PCRs and the pinned AK.
        let attest = |pcrs: &Path, ak: Option<&str>| {
            let mut a = vec!["attest", "--expected-pcrs", pcrs.to_str().unwrap()];
            if let Some(ak) = ak {
                a.extend(["--ak", ak]);
            }
            admin(&a)
        };
        let (code, out, err) = attest(&good, Some(&ak));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("attested: PCRs 7,8,9"), "{out}");
        assert!(out.contains(&format!("signed by {identity}")), "{out}");
        let (code, _, err) = attest(&other, Some(&ak));
        assert_eq!(code, 1);
        assert!(err.contains("did not boot the expected image"), "{err}");
        let wrong_ak = format!("04{}", "11".repeat(64));
        let (code, _, err) = attest(&good, Some(&wrong_ak));
        assert_eq!(code, 1);
        assert!(err.contains("not the pinned"), "{err}");
        // The image build's form: PCRs 8 and 9 per A/B state; PCR 7 attested, not compared.
        let image = image_file(dir.path(), &["console=hvc0 ro mayfly.slot=b", GOOD_CMDLINE]);
        let (code, out, err) = attest(&image, Some(&ak));
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("(state slot=s1)") && out.contains("PCR 7 = "),
            "{out}"
        );
        let (code, out, err) = attest(&good, None);
        assert!(out.is_empty(), "{out}");
        assert_eq!(code, 1);
        assert!(err.contains("no --ak pinned") && err.contains(&ak), "{err}");
    }
    drop(sw);
    assert!(verify(&data).0, "verify after signing with the sealed key");

    // A changed kernel command line: serve refuses to sign, exit 5, says why.
    let before = std::fs::read(data.join("data.mdb")).unwrap();
    {
        let sw = boot(&state, "console=hvc0 ro init=/bin/sh");
        let (code, err) = serve_refused(&data, &sw.tcti());
        assert_eq!(code, 5, "{err}");
        assert!(
            err.contains("refusing to sign") && err.contains("PCR 8"),
            "{err}"
        );
    }
    // The data partition on another machine (a fresh TPM): cannot sign either.
    {
        let sw = boot(&dir.path().join("other-tpm"), GOOD_CMDLINE);
        let (code, err) = serve_refused(&data, &sw.tcti());
        assert_eq!(code, 5, "{err}");
        assert!(err.contains("does not belong to this TPM"), "{err}");
    }
    assert!(
        std::fs::read(data.join("data.mdb")).unwrap() == before,
        "nothing written"
    );

    // Re-sealed for an update's expected PCRs, the update's boot signs; the refusals
    // above are audited on that first good boot.
    let update = expected_file(dir.path(), "update.pcrs", "console=hvc0 ro mayfly.slot=b");
    {
        let sw = boot(&state, GOOD_CMDLINE);
        // The image's form has several states: reseal wants the one to seal to.
        let image = image_file(dir.path(), &[GOOD_CMDLINE, "console=hvc0 ro mayfly.slot=b"]);
        let image = image.to_str().unwrap();
        let (code, _, err) = run_agent("reseal", &sw.tcti(), &data, &["--expected-pcrs", image]);
        assert_ne!(code, 0);
        assert!(
            err.contains("2 boot states") && err.contains("--state"),
            "{err}"
        );
        let chosen = ["--expected-pcrs", image, "--state", "slot=s1"];
        let (code, out, err) = run_agent("reseal", &sw.tcti(), &data, &chosen);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("signing.sealed.alt"), "{out}");
        assert!(err.contains("PCR 7 is not in"), "{err}");
        let update = update.to_str().unwrap();
        let (code, out, err) = run_agent("reseal", &sw.tcti(), &data, &["--expected-pcrs", update]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("signing.sealed.alt"), "{out}");
    }
    {
        let sw = boot(&state, "console=hvc0 ro mayfly.slot=b");
        let agent = Agent::start(&data, &["--key-source", "tpm", "--tpm-tcti", &sw.tcti()]);
        let (code, body) = agent.tx("open_account", json!({"name": "b", "balance": 5}));
        assert_eq!(code, 200, "{body}");
        let (_, health) = agent.get("/v1/health");
        assert_eq!(
            health["key"]["sealed_file"], "signing.sealed.alt",
            "{health}"
        );
    }
    let events = audit(&data);
    let refused = events
        .iter()
        .find(|(e, _)| e == "key.unavailable_earlier")
        .expect("the refused start is audited");
    assert!(refused.1["detail"].contains("does not belong to this TPM"));
    assert!(events.iter().filter(|(e, _)| e == "tpm.quote").count() >= 3);
    assert!(verify(&data).0);

    // The boot quotes sent to the SIEM verify on their own: the provisioning one against the
    // good boot's PCRs, the slot-b one against the update's, each over the head it names.
    let store = mayfly_ledger::store::open_read_only(&data, &Default::default()).unwrap();
    let heads = store.last_heads(usize::MAX).unwrap();
    let quotes: Vec<_> = events.iter().filter(|(e, _)| e == "tpm.quote").collect();
    let unhex = |t: &str| mayfly_ledger::codec::unhex(t).unwrap();
    for (fields, cmdline) in [
        (&quotes[0].1, GOOD_CMDLINE),
        (&quotes[quotes.len() - 1].1, "console=hvc0 ro mayfly.slot=b"),
    ] {
        let group: u64 = fields["head_group"].parse().unwrap();
        let head = heads.iter().find(|h| h.group == group).unwrap();
        let ak: [u8; 65] = unhex(&fields["ak"]).try_into().unwrap();
        let sig: [u8; 64] = unhex(&fields["signature"]).try_into().unwrap();
        let q = mayfly_tpm::quote::qualifying_data(&head.encode(), &unhex(&fields["nonce"]));
        let expected = expected_after_boot(DEFAULT_PCRS, cmdline);
        mayfly_tpm::quote::verify_quote(&ak, &unhex(&fields["attest"]), &sig, &q, &expected)
            .unwrap_or_else(|e| panic!("boot quote of group {group}: {e}"));
        assert_eq!(ak, unhex(&quotes[0].1["ak"]).as_slice(), "one AK per TPM");
    }
}

/// An expected-PCR file in the image build's form with these labels (grubenv as GRUB loads
/// it) and, for each, the command line whose boot gives its PCRs 8 and 9.
fn labelled_file(path: &Path, states: &[(&str, &str)]) -> PathBuf {
    let mut text = String::from("mayfly-expected-pcrs 1\nbank sha256\n");
    for (label, cmdline) in states {
        let v = expected_after_boot(&[8, 9], cmdline);
        text.push_str(&format!(
            "state {label} entry=general-x pcr8={} pcr9={}\n",
            mayfly_ledger::codec::hex(&v[0].1),
            mayfly_ledger::codec::hex(&v[1].1)
        ));
    }
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

#[test]
fn reseal_switch_covers_every_boot_an_update_leads_to() {
    let _serial = mayfly_tpm::swtpm::serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = dir.path().join("tpm");
    // Each boot state of an update from slot a to slot b with 2 trial boots, as a distinct
    // command line (GRUB's measurements differ between them in the same way).
    let current = labelled_file(
        &dir.path().join("current.pcrs"),
        &[
            ("slot=a try=- tries=0", GOOD_CMDLINE),
            ("slot=a try=b tries=0", "fallback to a"),
            ("slot=a try=b tries=2", "the old image as b"),
        ],
    );
    let next = labelled_file(
        &dir.path().join("next.pcrs"),
        &[
            ("slot=a try=- tries=0", "the new image as a"),
            ("slot=a try=b tries=2", "trial of b, 2 left"),
            ("slot=a try=b tries=1", "trial of b, 1 left"),
            ("slot=b try=- tries=0", "b committed"),
            ("slot=a try=b tries=0", "the new image's fallback"),
        ],
    );
    let (cur, nxt) = (current.to_str().unwrap(), next.to_str().unwrap());
    let switch = |to, tries| {
        [
            "--from",
            "a",
            "--to",
            to,
            "--tries",
            tries,
            "--current-pcrs",
            cur,
            "--next-pcrs",
            nxt,
        ]
    };
    {
        let sw = boot(&state, GOOD_CMDLINE);
        let (code, _, err) = run_agent("init", &sw.tcti(), &data, &[]);
        assert_eq!(code, 0, "{err}");
        // A trial count the next file has no state for, or the same slot: refused.
        let (code, _, err) = run_agent("reseal-switch", &sw.tcti(), &data, &switch("b", "3"));
        assert_ne!(code, 0);
        assert!(
            err.contains("no boot state \"slot=a try=b tries=3\""),
            "{err}"
        );
        let (code, _, err) = run_agent("reseal-switch", &sw.tcti(), &data, &switch("a", "2"));
        assert_ne!(code, 0);
        assert!(err.contains("same slot"), "{err}");
        let (code, out, err) = run_agent("reseal-switch", &sw.tcti(), &data, &switch("b", "2"));
        assert_eq!(code, 0, "{err}");
        assert!(out.trim().ends_with("signing.sealed.alt"), "{out}");
        for label in [
            "slot=a try=b tries=2",
            "slot=a try=b tries=1",
            "slot=b try=- tries=0",
            "slot=a try=b tries=0",
        ] {
            assert!(
                err.contains(&format!("sealed to boot state {label} ")),
                "{err}"
            );
        }
        let blob = mayfly_tpm::SealedBlob::read(&data.join("signing.sealed.alt")).unwrap();
        assert_eq!(blob.states().len(), 4);
    }
    // Every boot of the switch unseals the key (through `init`, which opens the ledger with
    // it) from the switch's blob; the running image's own boot still does from its own.
    for (cmdline, blob) in [
        ("trial of b, 2 left", "signing.sealed.alt"),
        ("trial of b, 1 left", "signing.sealed.alt"),
        ("b committed", "signing.sealed.alt"),
        ("fallback to a", "signing.sealed.alt"),
        (GOOD_CMDLINE, "signing.sealed"),
    ] {
        let sw = boot(&state, cmdline);
        let (code, out, err) = run_agent("init", &sw.tcti(), &data, &[]);
        assert_eq!(code, 0, "boot {cmdline:?}: {err}");
        assert_eq!(out.trim().len(), 64, "{out}");
        // The blob named unseals on this boot by itself.
        let only = mayfly_tpm::SealedBlob::read(&data.join(blob)).unwrap();
        let mut tpm = Tpm::open(&sw.tcti()).unwrap();
        assert!(tpm.unseal(&only).is_ok(), "boot {cmdline:?} from {blob}");
    }
    for cmdline in [
        "the new image as a",
        "the old image as b",
        "console=hvc0 ro init=/bin/sh",
    ] {
        let sw = boot(&state, cmdline);
        let (code, _, err) = run_agent("init", &sw.tcti(), &data, &[]);
        assert_ne!(code, 0, "boot {cmdline:?} must not unseal");
        assert!(err.contains("boot chain differs"), "{err}");
    }
    // With the file key source there is nothing to re-seal.
    let out = Command::new(agent_exe())
        .args(["reseal-switch", "--data-dir"])
        .arg(dir.path().join("file-data"))
        .args(switch("b", "2"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to re-seal"));
}

#[test]
fn without_a_tpm_the_file_key_is_used_and_reported() {
    let _serial = mayfly_tpm::swtpm::serial();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    let (_, health) = agent.get("/v1/health");
    assert_eq!(health["key"]["source"], "file", "{health}");
    assert!(dir.path().join("signing.key").exists());
    let opened = audit(dir.path())
        .into_iter()
        .find(|(e, _)| e == "ledger.opened" || e == "ledger.created")
        .unwrap();
    assert_eq!(opened.1["key_source"], "file");
}
