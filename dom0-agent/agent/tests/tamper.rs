//! Tamper detection through `dom0-agent verify`: any single flipped byte inside a stored
//! checkpoint, a deleted or reordered record, a forged head: verify exits 1 and names the
//! record. Altered live data: verify names the key and `serve` refuses to start (exit 4).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use mayfly_ledger::store::names;
use mayfly_ledger::{tamper, AuditEvent, Ledger, Options, Severity, TxContext, TxId};
use slog::{o, Discard, Logger};

const CHECKPOINTS: u64 = 12;

/// A pristine ledger: 12 checkpoints (each its own group) and a few audit events.
fn pristine() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(
        dir.path(),
        &Options::default(),
        &Logger::root(Discard, o!()),
    )
    .unwrap();
    for i in 0..CHECKPOINTS {
        let mut tx = ledger
            .begin(TxContext {
                tx_id: TxId::generate(),
                handler: "kv".into(),
                request: format!("request {i}").into_bytes(),
                domain_id: 100 + i,
                policy_hash: [3; 32],
            })
            .unwrap();
        if i > 0 {
            tx.get(format!("key/{}", i - 1).as_bytes()).unwrap();
        }
        tx.put(
            format!("key/{i}").as_bytes(),
            format!("value {i}").as_bytes(),
        )
        .unwrap();
        tx.commit(format!("result {i}").into_bytes()).unwrap();
        ledger
            .audit(vec![
                AuditEvent::new("domain.destroyed", Severity::Info).field("domain", 100 + i)
            ])
            .unwrap();
    }
    dir
}

fn copy_of(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let dst = tempfile::tempdir().unwrap();
    for f in ["data.mdb", "signing.key"] {
        fs::copy(src.join(f), dst.path().join(f)).unwrap();
    }
    let p = dst.path().to_path_buf();
    (dst, p)
}

fn verify(dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dom0-agent"))
        .args(["verify", "--quiet", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn assert_names(dir: &Path, what: &str, case: &str) {
    let (code, out) = verify(dir);
    assert_eq!(
        code, 1,
        "{case}: verify must fail with exit code 1, printed {out}"
    );
    let first = out.lines().next().unwrap_or("");
    assert!(
        first.contains(what),
        "{case}: expected the first failure to name {what:?}, got {out}"
    );
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

#[test]
fn pristine_ledger_verifies() {
    let dir = pristine();
    let (code, out) = verify(dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK: 12 checkpoints"), "{out}");
}

#[test]
fn any_flipped_checkpoint_byte_is_found_and_named() {
    let base = pristine();
    for target in [1, 5, CHECKPOINTS] {
        let len = tamper::get(base.path(), names::CHECKPOINTS, &key(target))
            .unwrap()
            .len();
        // Header, seq, link, tx id, handler, domain, policy, times, digest, request,
        // result, read and write sets, and the last byte.
        let mut positions: Vec<usize> = vec![
            0,
            4,
            5,
            6,
            13,
            14,
            45,
            46,
            62,
            64,
            70,
            100,
            140,
            170,
            len / 2,
            len - 10,
            len - 1,
        ];
        positions.retain(|p| *p < len);
        for pos in positions {
            let (_guard, dir) = copy_of(base.path());
            let mut v = tamper::get(&dir, names::CHECKPOINTS, &key(target)).unwrap();
            v[pos] ^= 0x01;
            tamper::set(&dir, names::CHECKPOINTS, &key(target), Some(&v));
            assert_names(
                &dir,
                &format!("checkpoint chain, record {target}:"),
                &format!("byte {pos} of checkpoint {target}"),
            );
        }
    }
}

#[test]
fn deleted_and_reordered_records_are_named() {
    let base = pristine();

    let (_g, dir) = copy_of(base.path());
    tamper::set(&dir, names::CHECKPOINTS, &key(5), None);
    assert_names(
        &dir,
        "checkpoint chain, record 5: missing",
        "delete a middle checkpoint",
    );

    let (_g, dir) = copy_of(base.path());
    tamper::set(&dir, names::CHECKPOINTS, &key(CHECKPOINTS), None);
    assert_names(
        &dir,
        &format!("checkpoint chain, record {CHECKPOINTS}: missing"),
        "delete the last checkpoint",
    );

    let (_g, dir) = copy_of(base.path());
    let a = tamper::get(&dir, names::CHECKPOINTS, &key(4)).unwrap();
    let b = tamper::get(&dir, names::CHECKPOINTS, &key(5)).unwrap();
    tamper::set(&dir, names::CHECKPOINTS, &key(4), Some(&b));
    tamper::set(&dir, names::CHECKPOINTS, &key(5), Some(&a));
    assert_names(
        &dir,
        "checkpoint chain, record 4: stored under 4 but its content says 5",
        "swap two checkpoints",
    );

    let (_g, dir) = copy_of(base.path());
    tamper::set(&dir, names::AUDIT, &key(3), None);
    assert_names(
        &dir,
        "audit chain, record 3: missing",
        "delete an audit record",
    );
}

#[test]
fn altered_audit_records_and_heads_are_named() {
    let base = pristine();
    let (_g, dir) = copy_of(base.path());
    let mut v = tamper::get(&dir, names::AUDIT, &key(4)).unwrap();
    let last = v.len() - 1;
    v[last] ^= 0x01; // the field value's last character
    tamper::set(&dir, names::AUDIT, &key(4), Some(&v));
    assert_names(
        &dir,
        "audit chain, record 4:",
        "flip a byte in an audit record",
    );

    let (_g, dir) = copy_of(base.path());
    let mut v = tamper::get(&dir, names::HEADS, &key(3)).unwrap();
    v[150] ^= 0x01; // inside the signature
    tamper::set(&dir, names::HEADS, &key(3), Some(&v));
    assert_names(
        &dir,
        "signed head, group 3: signature does not verify",
        "forge a head signature",
    );
}

#[test]
fn a_ledger_signed_by_another_key_fails_against_the_pinned_key() {
    let base = pristine();
    let other = pristine();
    let key_out = Command::new(env!("CARGO_BIN_EXE_dom0-agent"))
        .args(["export-key", "--data-dir"])
        .arg(other.path())
        .output()
        .unwrap();
    let other_key = String::from_utf8(key_out.stdout).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dom0-agent"))
        .args([
            "verify",
            "--quiet",
            "--public-key",
            other_key.trim(),
            "--data-dir",
        ])
        .arg(base.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("signed by untrusted key"));
}

fn verify_json(dir: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dom0-agent"))
        .args(["verify", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "verify must fail");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn verify_json_counts_the_chain_alike_after_a_decode_and_a_link_failure() {
    let base = pristine();
    let original = tamper::get(base.path(), names::CHECKPOINTS, &key(5)).unwrap();
    // Checkpoint 5 cut short: it no longer decodes.
    let (_undecodable, cut) = copy_of(base.path());
    tamper::set(&cut, names::CHECKPOINTS, &key(5), Some(&original[..40]));
    // Checkpoint 5 with one byte of its link flipped: it decodes, the link breaks.
    let (_unlinked, flipped) = copy_of(base.path());
    let mut bad = original.clone();
    bad[20] ^= 0x01;
    tamper::set(&flipped, names::CHECKPOINTS, &key(5), Some(&bad));
    let (a, b) = (verify_json(&cut), verify_json(&flipped));
    assert_eq!(a["checkpoints"], CHECKPOINTS, "{a}");
    assert_eq!(b["checkpoints"], CHECKPOINTS, "{b}");
    assert_eq!(a["audit"], b["audit"], "{a} {b}");
    for report in [&a, &b] {
        let first = &report["failures"][0];
        assert_eq!(first["chain"], "checkpoints", "{report}");
        assert_eq!(first["seq"], 5, "{report}");
    }
}

/// Issue 16's reproduction through the real agent: `kv` puts through the API, the agent
/// stopped, bytes of the live entry of `kv/k7` changed in `data.mdb` (the copy in the
/// `data` database, found through LMDB). `verify` fails naming the key; `serve` refuses to
/// start with exit code 4 naming it; once the data is restored the next start records the
/// refusal; `--skip-state-check` serves the altered data with a warning in the audit log.
#[test]
fn altered_live_data_is_named_by_verify_and_refused_by_serve() {
    use std::io::Read;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    {
        let agent = common::Agent::start(dir.path(), &[]);
        for i in 0..20 {
            let (status, body) = agent.tx(
                "kv",
                serde_json::json!({"op": "put", "key": format!("kv/k{i}"), "value": format!("value-{i}")}),
            );
            assert_eq!(status, 200, "{body}");
        }
    }
    let (ok, out) = common::verify(dir.path());
    assert!(ok, "{out}");
    let (key_off, val_off, val_len) = tamper::live_entry_offsets(dir.path(), b"kv/k7").unwrap();
    let original = fs::read(dir.path().join("data.mdb")).unwrap();
    assert_eq!(&original[val_off + 9..val_off + val_len], b"value-7");

    /// `serve` on `dir`: its exit code and stderr, bounded in time.
    fn serve_refusal(dir: &Path) -> (i32, String) {
        let mut child = Command::new(common::agent_exe())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--pool-size",
                "1",
                "--data-dir",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve kept running on altered live data");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code().unwrap_or(-1), err)
    }

    // Positions: a key byte, the tag, a version byte, value bytes (first, middle, last).
    let positions = [
        ("key", key_off + 4),
        ("tag", val_off),
        ("version", val_off + 8),
        ("value", val_off + 9),
        ("value", val_off + 12),
        ("value", val_off + val_len - 1),
    ];
    for (what, offset) in positions {
        let (_keep, copy) = copy_of(dir.path());
        fs::copy(
            dir.path().join("detector.token"),
            copy.join("detector.token"),
        )
        .unwrap();
        let mut bytes = original.clone();
        bytes[offset] ^= 0x01;
        fs::write(copy.join("data.mdb"), &bytes).unwrap();
        let case = format!("{what} byte at {offset}");
        let (code, out) = verify(&copy);
        assert_eq!(code, 1, "{case}: verify printed {out}");
        assert!(
            out.contains("live state") && out.contains("kv/k7"),
            "{case}: {out}"
        );
        let (code, err) = serve_refusal(&copy);
        assert_eq!(code, 4, "{case}: serve exited {code}: {err}");
        assert!(
            err.contains("kv/k7") && err.contains("--skip-state-check"),
            "{case}: {err}"
        );
    }

    // The last refused copy, with the value altered: skip the check, then restore.
    let (_keep, copy) = copy_of(dir.path());
    fs::copy(
        dir.path().join("detector.token"),
        copy.join("detector.token"),
    )
    .unwrap();
    let mut bytes = original.clone();
    bytes[val_off + val_len - 1] = b'X';
    fs::write(copy.join("data.mdb"), &bytes).unwrap();
    assert_eq!(serve_refusal(&copy).0, 4);
    {
        let agent = common::Agent::start(&copy, &["--skip-state-check"]);
        let (status, body) = agent.tx("kv", serde_json::json!({"op": "get", "key": "kv/k7"}));
        assert_eq!(status, 200, "{body}");
        assert!(body.to_string().contains("value-X"), "{body}");
    }
    let events: Vec<String> = common::audit(&copy).into_iter().map(|(e, _)| e).collect();
    assert!(events.contains(&"ledger.state_check_skipped".to_string()));
    assert!(
        events.contains(&"ledger.state_refused_earlier".to_string()),
        "the refusals are recorded by the next start that succeeds: {events:?}"
    );
}
