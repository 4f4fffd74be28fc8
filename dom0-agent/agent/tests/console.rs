//! The signed admin console end to end, with real processes: `dom0-agent serve` (sandbox
//! backend) with three authorized admins and a quorum of two, driven through its Unix
//! socket with envelopes built by `mayfly-command`, and through the `mayfly` CLI.
//!
//! Every refusal must come back with its reason and leave an `admin.rejected` audit record
//! naming it, and change nothing; the accepted path must work (status, rollback with a
//! quorum, key rotation, after which `dom0-agent verify` still passes).

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{audit, mayfly, verify, Agent};
use mayfly_command::{frame, hex, keyfile, Body, Envelope};
use ring::signature::Ed25519KeyPair;
use serde_json::{json, Value};

const S: u64 = 1_000_000_000;

fn admin(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
}

fn admin_flags(seeds: &[u8]) -> Vec<String> {
    seeds
        .iter()
        .flat_map(|s| {
            [
                "--admin-key".to_owned(),
                hex(&keyfile::public_of(&admin(*s))),
            ]
        })
        .collect()
}

thread_local! {
    /// The identity key of the agent this test drives, which `body` binds commands to.
    static APPLIANCE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Asks the agent for its identity (the `MFAH` request).
fn hello(socket: &Path) -> String {
    let r = send_raw(socket, mayfly_command::frame::HELLO)
        .pop()
        .unwrap();
    assert_eq!(r["command"], "hello", "{r}");
    r["result"]["appliance"].as_str().unwrap().to_owned()
}

fn start(dir: &Path) -> Agent {
    let flags = admin_flags(&[0xa1, 0xa2, 0xa3]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(dir, &flags);
    let id = hello(&dir.join("admin.sock"));
    APPLIANCE.with(|a| *a.borrow_mut() = Some(id));
    agent
}

/// A command body bound to the agent `start` started.
fn body(command: &str, args: &[(&str, &str)], issued: u64, expires: u64) -> Body {
    let mut args: BTreeMap<String, String> = args
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if let Some(id) = APPLIANCE.with(|a| a.borrow().clone()) {
        args.entry(mayfly_command::APPLIANCE_ARG.to_owned())
            .or_insert(id);
    }
    Body {
        nonce: mayfly_command::random_nonce().unwrap(),
        issued_ns: issued,
        expires_ns: expires,
        command: command.into(),
        args,
    }
}

fn signed(command: &str, args: &[(&str, &str)], signers: &[u8]) -> Envelope {
    let now = mayfly_command::now_ns();
    let mut e = Envelope::new(body(command, args, now, now + 300 * S)).unwrap();
    for s in signers {
        e.sign(&admin(*s)).unwrap();
    }
    e
}

/// Sends raw request bytes; returns every frame, the result last.
fn send_raw(socket: &Path, bytes: &[u8]) -> Vec<Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    frame::write_request(&mut s, bytes).unwrap();
    let mut frames = Vec::new();
    loop {
        let f = frame::read_response(&mut s).unwrap();
        let last = f["type"] == "result";
        frames.push(f);
        if last {
            return frames;
        }
    }
}

fn send(socket: &Path, env: &Envelope) -> Value {
    send_raw(socket, &env.encode()).pop().unwrap()
}

fn ok(socket: &Path, env: &Envelope) -> Value {
    let r = send(socket, env);
    assert_eq!(r["ok"], true, "{r}");
    r["result"].clone()
}

fn rejections(dir: &Path) -> Vec<BTreeMap<String, String>> {
    audit(dir)
        .into_iter()
        .filter(|(e, _)| e == "admin.rejected")
        .map(|(_, f)| f)
        .collect()
}

fn open(agent: &Agent, name: &str, balance: u64) -> String {
    let (code, body) = agent.tx("open_account", json!({"name": name, "balance": balance}));
    assert_eq!(code, 200, "{body}");
    body["tx_id"].as_str().unwrap().to_owned()
}

fn balance(agent: &Agent, name: &str) -> Option<u64> {
    let (_, body) = agent.tx("balance", json!({"name": name}));
    body["result"]["balance"].as_u64()
}

#[test]
fn every_bad_command_is_refused_with_its_reason_audited_and_without_effect() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path());
    let sock = dir.path().join("admin.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the console socket is owner-only");
    open(&agent, "alice", 100);
    let now = mayfly_command::now_ns();

    // Forged: key a1's id with a signature that is not a1's over this body.
    let mut forged = signed("status", &[], &[]);
    let mut sig = [0u8; 64];
    sig.copy_from_slice(admin(0xa2).sign(forged.body_bytes()).as_ref());
    forged
        .add_signature(mayfly_command::Signature {
            key: keyfile::public_of(&admin(0xa1)),
            signature: sig,
        })
        .unwrap();
    // Wrong key: a well-formed signature by a key the appliance does not know.
    let wrong = signed("status", &[], &[0xee]);
    // Expired an hour ago (validity window itself acceptable).
    let mut expired = Envelope::new(body("status", &[], now - 7200 * S, now - 3600 * S)).unwrap();
    expired.sign(&admin(0xa1)).unwrap();
    // Future-dated by ten minutes (the allowance is 60 s).
    let mut future = Envelope::new(body("status", &[], now + 600 * S, now + 900 * S)).unwrap();
    future.sign(&admin(0xa1)).unwrap();
    // Valid for two hours (the maximum is one).
    let mut too_long = Envelope::new(body("status", &[], now, now + 7200 * S)).unwrap();
    too_long.sign(&admin(0xa1)).unwrap();
    // Insufficient quorum: a destructive command with one admin.
    let lone = signed("rollback", &[("id", "1")], &[0xa1]);
    // Tampered argument: signed by two admins for commit 1, then the id byte changed to 2
    // in transit.
    let honest = signed("rollback", &[("id", "1")], &[0xa1, 0xa2]);
    let mut tampered = honest.encode();
    let needle = b"\x02id\x00\x00\x00\x011";
    let at = tampered
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    tampered[at + needle.len() - 1] = b'2';
    // A typo'd argument, properly signed.
    let typo = signed("tx.list", &[("limt", "5")], &[0xa1]);
    // Properly signed, but for another appliance (one with the same admins), or for none.
    let elsewhere = signed("status", &[("appliance", &"5a".repeat(32))], &[0xa1]);
    let mut unbound = Envelope::new(Body {
        args: BTreeMap::new(),
        ..body("status", &[], now, now + 60 * S)
    })
    .unwrap();
    unbound.sign(&admin(0xa1)).unwrap();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("forged signature", forged.encode(), "bad_signature"),
        ("wrong key", wrong.encode(), "unknown_key"),
        ("expired", expired.encode(), "expired"),
        ("future-dated", future.encode(), "not_yet_valid"),
        ("validity too long", too_long.encode(), "validity_too_long"),
        ("insufficient quorum", lone.encode(), "insufficient_quorum"),
        ("tampered argument", tampered, "bad_signature"),
        ("unsigned", signed("status", &[], &[]).encode(), "unsigned"),
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "malformed"),
        ("unknown argument", typo.encode(), "bad_argument"),
        ("another appliance", elsewhere.encode(), "wrong_appliance"),
        ("no appliance", unbound.encode(), "wrong_appliance"),
        (
            "unknown command",
            signed("rm.rf", &[], &[0xa1]).encode(),
            "unknown_command",
        ),
    ];
    for (what, bytes, code) in &cases {
        let r = send_raw(&sock, bytes).pop().unwrap();
        assert_eq!(r["ok"], false, "{what}: {r}");
        assert_eq!(r["code"], *code, "{what}: {r}");
        assert!(
            !r["error"].as_str().unwrap().is_empty(),
            "{what}: no message"
        );
    }
    // Replay: accepted once, refused the second time.
    let status = signed("status", &[], &[0xa1]);
    ok(&sock, &status);
    let r = send(&sock, &status);
    assert_eq!(
        (r["ok"].as_bool(), r["code"].as_str()),
        (Some(false), Some("replayed")),
        "{r}"
    );
    assert!(r["error"].as_str().unwrap().contains("replayed"), "{r}");

    // A frame whose length prefix is over the cap is refused before anything is read.
    let mut s = UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut s, &u32::MAX.to_be_bytes()).unwrap();
    let r = frame::read_response(&mut s).unwrap();
    assert_eq!(r["code"], "malformed", "{r}");

    // Each refusal is on record with its reason, the wrong key named.
    let rej = rejections(dir.path());
    let mut reasons: Vec<&str> = rej.iter().map(|f| f["reason"].as_str()).collect();
    reasons.sort_unstable();
    let mut want: Vec<&str> = cases
        .iter()
        .map(|c| c.2)
        .chain(["replayed", "malformed"])
        .collect();
    want.sort_unstable();
    assert_eq!(reasons, want);
    let wrong_rec = rej.iter().find(|f| f["reason"] == "unknown_key").unwrap();
    assert!(wrong_rec["error"].contains(&hex(&keyfile::public_of(&admin(0xee)))));
    assert_eq!(wrong_rec["command"], "status");
    assert!(wrong_rec["peer"].starts_with("unix uid="), "{wrong_rec:?}");
    let quorum_rec = rej
        .iter()
        .find(|f| f["reason"] == "insufficient_quorum")
        .unwrap();
    assert!(quorum_rec["error"].contains("needs signatures by 2 distinct admins, it has 1"));
    let elsewhere_rec = rej
        .iter()
        .find(|f| f["reason"] == "wrong_appliance" && f["error"].contains("signed for"))
        .unwrap();
    assert!(
        elsewhere_rec["error"].contains(&"5a".repeat(32)),
        "{elsewhere_rec:?}"
    );
    // Nothing was rolled back, and only the one status was accepted.
    assert_eq!(balance(&agent, "alice"), Some(100));
    let accepted: Vec<_> = audit(dir.path())
        .into_iter()
        .filter(|(e, _)| e == "admin.accepted")
        .collect();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].1["command"], "status");
    drop(agent);
    let (ok_, out) = verify(dir.path());
    assert!(ok_, "{out}");
}

#[test]
fn status_rollback_with_quorum_and_key_rotation_work_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(dir.path());
    let sock = dir.path().join("admin.sock");
    open(&agent, "alice", 100);
    let attack = open(&agent, "mallory", 1_000_000);
    open(&agent, "bob", 5);

    let first_status = signed("status", &[], &[0xa3]);
    let st = ok(&sock, &first_status);
    assert_eq!(st["backend"], "sandbox");
    assert_eq!(st["chains"]["checkpoints"]["seq"], 3);
    assert_eq!(st["exporters"]["configured"], false);
    assert_eq!(st["admin"]["quorum"], 2);
    assert_eq!(st["admin"]["keys"], 3);
    assert_eq!(st["identity_key"], st["signing_key"]);
    assert_eq!(st["policy_hash"].as_str().unwrap().len(), 64);

    let list = ok(&sock, &signed("tx.list", &[], &[0xa1]));
    assert_eq!(list["records"].as_array().unwrap().len(), 3);
    let shown = ok(&sock, &signed("tx.show", &[("id", &attack)], &[0xa1]));
    assert_eq!(shown["seq"], 2);
    assert_eq!(shown["handler"], "open_account");
    // The checkpoint names who asked (the API's identity of a loopback client).
    assert_eq!(shown["client"], "127.0.0.1");

    // Dry run needs one admin and changes nothing.
    let dry = ok(
        &sock,
        &signed("rollback", &[("id", &attack), ("dry_run", "true")], &[0xa2]),
    );
    assert_eq!(dry["affected"], json!([2]));
    assert_eq!(balance(&agent, "mallory"), Some(1_000_000));
    // The real thing, co-signed by two admins. The balance query above read mallory's
    // account, so it is a dependent: without cascade the rollback is refused.
    let r = send(
        &sock,
        &signed("rollback", &[("id", &attack)], &[0xa1, 0xa3]),
    );
    assert_eq!(r["code"], "rollback_refused", "{r}");
    let rb = ok(
        &sock,
        &signed(
            "rollback",
            &[
                ("id", &attack),
                ("cascade", "true"),
                ("reason", "minted money"),
            ],
            &[0xa1, 0xa3],
        ),
    );
    assert_eq!(rb["roots"], json!([2]));
    assert_eq!(rb["affected"], json!([2, 4]));
    let rollback_seq = rb["rollback_seq"].as_u64().unwrap();
    assert_eq!(balance(&agent, "mallory"), None);
    assert_eq!(balance(&agent, "alice"), Some(100));
    // tx.show of the undone transaction names the rollback record.
    let shown = ok(&sock, &signed("tx.show", &[("id", &attack)], &[0xa1]));
    assert_eq!(shown["rolled_back_by"], rollback_seq, "{shown}");
    let rec = ok(
        &sock,
        &signed(
            "checkpoint.show",
            &[("id", &rollback_seq.to_string())],
            &[0xa1],
        ),
    );
    assert_eq!(rec["kind"], "rollback");
    assert!(
        rec["reason"].as_str().unwrap().contains("minted money"),
        "{rec}"
    );
    // Admins decided it, no policy: the record says so with a zero policy hash.
    assert_eq!(rec["policy_hash"], "0".repeat(64), "{rec}");

    // Verify on the appliance, with progress frames before the result.
    let frames = send_raw(&sock, &signed("verify", &[], &[0xa2]).encode());
    assert!(frames.iter().any(|f| f["type"] == "progress"), "{frames:?}");
    let v = &frames.last().unwrap()["result"];
    assert_eq!(v["ok"], true, "{v}");

    // Export: record frames carry every audit record with its chain hash.
    let frames = send_raw(
        &sock,
        &signed("audit.export", &[("from", "1")], &[0xa2]).encode(),
    );
    let records: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "records")
        .flat_map(|f| f["records"].as_array().unwrap())
        .collect();
    let result = &frames.last().unwrap()["result"];
    assert_eq!(records.len() as u64, result["exported"].as_u64().unwrap());
    assert!(records.iter().any(|r| r["event"] == "rollback.applied"));
    for pair in records.windows(2) {
        assert_eq!(
            pair[1]["prev_hash"], pair[0]["hash"],
            "export is one unbroken chain"
        );
    }

    // Key rotation with the quorum; the hand-over is signed by the old key.
    let before = st["signing_key"].as_str().unwrap().to_owned();
    let rot = ok(&sock, &signed("key.rotate", &[], &[0xa2, 0xa3]));
    assert_eq!(rot["old_key"], before.as_str());
    assert_ne!(rot["new_key"], before.as_str());
    assert_eq!(rot["identity_key"], before.as_str());
    open(&agent, "carol", 7);
    let st2 = ok(&sock, &signed("status", &[], &[0xa1]));
    assert_eq!(st2["signing_key"], rot["new_key"]);
    let q = ok(&sock, &signed("quarantine.list", &[], &[0xa1]));
    assert_eq!(q["quarantined"], json!([]));

    let events: Vec<String> = audit(dir.path()).into_iter().map(|(e, _)| e).collect();
    for e in [
        "admin.accepted",
        "admin.completed",
        "rollback.applied",
        "key.rotated",
    ] {
        assert!(events.iter().any(|x| x == e), "no {e} in {events:?}");
    }
    assert!(agent.stop().success());
    // The chain verifies across the rotation, pinned to the identity key...
    let (verified, out) = verify(dir.path());
    assert!(verified, "{out}");
    assert!(
        out.contains("OK") && out.contains("across 1 key rotation(s)"),
        "{out}"
    );
    let pinned = std::process::Command::new(common::agent_exe())
        .args(["verify", "--quiet", "--public-key", &before, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        pinned.status.success(),
        "{}",
        String::from_utf8_lossy(&pinned.stdout)
    );
    // ...and the agent restarts signing with the new key, and still remembers the nonces
    // of commands that have not expired.
    let agent = start(dir.path());
    let r = send(&sock, &first_status);
    assert_eq!(r["code"], "replayed", "{r}");
    open(&agent, "dave", 1);
    let st3 = ok(&sock, &signed("status", &[], &[0xa1]));
    assert_eq!(st3["signing_key"], rot["new_key"]);
    drop(agent);
    let (verified, out) = verify(dir.path());
    assert!(verified, "{out}");

    // Someone with write access to the files but not the key appends a rotation to their
    // own key, signed by their own key: `dom0-agent verify` names it.
    use mayfly_ledger::{tamper, SignedHead, SigningKey};
    let store = mayfly_ledger::store::open_read_only(dir.path(), &Default::default()).unwrap();
    let last = store.last_heads(1).unwrap().remove(0);
    drop(store);
    let attacker = SigningKey::from_seed(&[0x66; 32]);
    let forged = SignedHead::sign_rotation(
        &attacker,
        last.group + 1,
        last.checkpoints,
        last.audit,
        last.time_ns + 1,
        attacker.public_key(),
    );
    tamper::set(
        dir.path(),
        "heads",
        &forged.group.to_be_bytes(),
        Some(&forged.encode()),
    );
    tamper::set(
        dir.path(),
        "meta",
        b"group",
        Some(&forged.group.to_be_bytes()),
    );
    let (verified, out) = verify(dir.path());
    assert!(!verified, "a forged rotation must not verify");
    assert!(
        out.contains(&format!("signed head, group {}", forged.group))
            && out.contains(&hex(&attacker.public_key())),
        "{out}"
    );
}

/// The `mayfly` binary, brought up to date once per test run (`cargo build -p mayfly`
/// is a no-op when it is): this package's tests do not build another package's binary.
#[test]
fn the_cli_generates_keys_and_collects_co_signatures_offline() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let k = |n: &str| keys.path().join(n).to_string_lossy().into_owned();
    for n in ["alice", "bob"] {
        let (code, out, err) = mayfly(&["admin", "keygen", "--out", &k(n)]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim().len(), 64);
    }
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let agent = Agent::start(
        &data,
        &["--admin-key", &k("alice.pub"), "--admin-key", &k("bob.pub")],
    );
    let sock = data.join("admin.sock");
    let sock = sock.to_str().unwrap();
    let id = open(&agent, "mallory", 500);

    let (code, out, err) = mayfly(&[
        "admin",
        "status",
        "--socket",
        sock,
        "--key",
        &k("alice.key"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("sandbox") && out.contains("no exporters configured"),
        "{out}"
    );
    let (code, out, _) = mayfly(&[
        "admin",
        "tx",
        "list",
        "--socket",
        sock,
        "--key",
        &k("alice.key"),
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["result"]["records"][0]["tx_id"], id.as_str());
    let identity = hello(&data.join("admin.sock"));

    // Offline (prepare) and over TCP the CLI cannot ask the agent which appliance it is.
    let (code, _, err) = mayfly(&[
        "admin",
        "prepare",
        "--out",
        dir.path().join("x.cmd").to_str().unwrap(),
        "status",
    ]);
    assert_eq!(code, 3);
    assert!(err.contains("--appliance"), "{err}");

    // One admin is not enough for a rollback: exit 1 with the reason.
    let (code, _, err) = mayfly(&[
        "admin",
        "rollback",
        &id,
        "--socket",
        sock,
        "--key",
        &k("alice.key"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("insufficient_quorum"), "{err}");
    // Prepared by alice, co-signed by bob, submitted by anyone.
    let cmd = dir.path().join("rb.cmd");
    let cmd = cmd.to_str().unwrap();
    let (code, _, err) = mayfly(&[
        "admin",
        "prepare",
        "--key",
        &k("alice.key"),
        "--appliance",
        &identity,
        "--out",
        cmd,
        "rollback",
        &id,
        "--reason",
        "cli",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("command     rollback"), "{err}");
    let (code, _, err) = mayfly(&["admin", "cosign", cmd, "--key", &k("bob.key")]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 signature(s)"), "{err}");
    let (code, out, _) = mayfly(&["admin", "inspect", cmd]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("(valid)").count(), 2, "{out}");
    let (code, out, err) = mayfly(&["admin", "submit", cmd, "--socket", sock]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied"), "{out}");
    assert_eq!(balance(&agent, "mallory"), None);
    // The same file again is a replay.
    let (code, _, err) = mayfly(&["admin", "submit", cmd, "--socket", sock]);
    assert_eq!(code, 1);
    assert!(err.contains("replayed"), "{err}");

    // Key rotation from the CLI, then verify with progress.
    let (code, out, err) = mayfly(&[
        "admin",
        "key",
        "rotate",
        "--socket",
        sock,
        "--key",
        &k("alice.key"),
        "--key",
        &k("bob.key"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("new signing key"), "{out}");
    let (code, out, err) = mayfly(&["admin", "verify", "--socket", sock, "--key", &k("bob.key")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("OK:") && out.contains("1 key rotation"),
        "{out}"
    );
    assert!(
        err.contains("verify: checkpoints"),
        "progress on stderr: {err}"
    );
    let export = dir.path().join("audit.jsonl");
    let (code, _, err) = mayfly(&[
        "admin",
        "audit",
        "export",
        "--socket",
        sock,
        "--key",
        &k("bob.key"),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let lines = std::fs::read_to_string(&export).unwrap();
    assert!(lines.lines().any(|l| l.contains("\"key.rotated\"")));
    drop(agent);
    let (verified, out) = verify(&data);
    assert!(verified, "{out}");
}

#[test]
fn quarantine_release_and_policy_load_go_through_the_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path());
    let sock = dir.path().join("admin.sock");
    open(&agent, "mallory", 0);
    // The shipped policy quarantines the notes path-traversal exploit.
    let (code, body) = agent.tx(
        "notes",
        json!({"user": "mallory", "note_id": "../../acct/mallory", "text": "1000000"}),
    );
    assert_eq!(code, 403, "{body}");
    let q = ok(&sock, &signed("quarantine.list", &[], &[0xa1]));
    let list = q["quarantined"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{q}");
    let domain = list[0]["domain"].as_u64().unwrap().to_string();
    let pid: u32 = list[0]["handle"].as_str().unwrap().parse().unwrap();
    assert!(common::process_alive(pid));
    // One admin cannot release it; two can, and the stopped clone is gone.
    let r = send(
        &sock,
        &signed("quarantine.release", &[("domain", &domain)], &[0xa1]),
    );
    assert_eq!(r["code"], "insufficient_quorum", "{r}");
    assert!(common::process_alive(pid));
    let rel = ok(
        &sock,
        &signed("quarantine.release", &[("domain", &domain)], &[0xa1, 0xa2]),
    );
    assert_eq!(rel["released"], true);
    assert!(
        !common::process_alive(pid),
        "released clone must be destroyed"
    );
    let r = send(
        &sock,
        &signed("quarantine.release", &[("domain", &domain)], &[0xa1, 0xa2]),
    );
    assert_eq!(r["code"], "not_found", "{r}");

    // Policy: a malformed bundle is refused and the active one stays; a good one loads.
    let before = ok(&sock, &signed("status", &[], &[0xa1]))["policy_hash"].clone();
    let bad = send(
        &sock,
        &signed("policy.load", &[("file.x.toml", "[engine")], &[0xa1, 0xa3]),
    );
    assert_eq!(bad["code"], "policy_refused", "{bad}");
    assert_eq!(
        ok(&sock, &signed("status", &[], &[0xa1]))["policy_hash"],
        before
    );
    let permissive = "[engine]\nunlisted_handler = \"allow\"\ndomain_default = \"abort\"\n";
    let lone = send(
        &sock,
        &signed("policy.load", &[("file.allow.toml", permissive)], &[0xa3]),
    );
    assert_eq!(lone["code"], "insufficient_quorum", "{lone}");
    let loaded = ok(
        &sock,
        &signed(
            "policy.load",
            &[("file.allow.toml", permissive)],
            &[0xa2, 0xa3],
        ),
    );
    let after = ok(&sock, &signed("status", &[], &[0xa1]))["policy_hash"].clone();
    assert_eq!(after, loaded["policy_hash"]);
    assert_ne!(after, before);
    // The permissive bundle has no notes rule: the same exploit is no longer stopped.
    let (code, body) = agent.tx(
        "notes",
        json!({"user": "mallory", "note_id": "../../acct/mallory", "text": "1000000"}),
    );
    assert_eq!(code, 200, "{body}");
    let events: Vec<(String, BTreeMap<String, String>)> = audit(dir.path());
    let accepted = events
        .iter()
        .find(|(e, f)| e == "admin.accepted" && f["args"].contains(",file.allow.toml"))
        .unwrap();
    assert!(
        accepted.1["args"].starts_with("appliance=")
            && accepted.1["args"].contains(",file.allow.toml=<"),
        "long arguments are recorded by size and hash: {:?}",
        accepted.1
    );
    assert!(events.iter().any(|(e, _)| e == "policy.loaded"));
    assert!(events.iter().any(|(e, _)| e == "domain.released"));
}

/// `policies/examples/quorum-rollback.toml` in place of the shipped engine file: a detector
/// report alerts and rolls back nothing; the rollback needs the admin quorum.
#[test]
fn with_the_quorum_rollback_example_a_report_alerts_and_only_the_quorum_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let policy = common::policy_dir(
        dir.path(),
        "policy",
        &[
            (
                "engine.toml",
                &common::shipped_policy("examples/quorum-rollback.toml"),
            ),
            (
                "handlers.toml",
                &common::shipped_policy("default/handlers.toml"),
            ),
            (
                "detection.toml",
                &common::shipped_policy("default/detection.toml"),
            ),
        ],
    );
    let data = dir.path().join("data");
    let mut flags = admin_flags(&[0xa1, 0xa2, 0xa3]);
    flags.extend(policy);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(&data, &flags);
    let sock = data.join("admin.sock");
    let id = hello(&sock);
    APPLIANCE.with(|a| *a.borrow_mut() = Some(id));
    let token = common::detector_token(&data);

    let attack = open(&agent, "mallory", 1_000_000);
    for report in [
        json!({"tx_id": attack, "reason": "ids sig 7"}),
        json!({"key": "acct/mallory", "reason": "tampered"}),
    ] {
        let (code, body) = common::report(agent.addr, &token, &report);
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["action"], "alert", "{body}");
        assert!(body["rollback"].is_null(), "{body}");
    }
    assert_eq!(
        balance(&agent, "mallory"),
        Some(1_000_000),
        "the token alone undid nothing"
    );
    let records = audit(&data);
    for rule in ["ids.tx", "ids.acct_key"] {
        assert!(
            records.iter().any(|(e, f)| e == "policy.decision"
                && f["rule"] == rule
                && f["action"] == "alert"),
            "{rule}: {records:?}"
        );
    }
    assert!(!records.iter().any(|(e, _)| e == "rollback.applied"));

    // One admin is not enough; two are.
    let r = send(
        &sock,
        &signed("rollback", &[("id", &attack), ("cascade", "true")], &[0xa1]),
    );
    assert_eq!(r["code"], "insufficient_quorum", "{r}");
    assert_eq!(balance(&agent, "mallory"), Some(1_000_000));
    let rb = ok(
        &sock,
        &signed(
            "rollback",
            &[("id", &attack), ("cascade", "true")],
            &[0xa1, 0xa2],
        ),
    );
    assert!(rb["rollback_seq"].as_u64().is_some(), "{rb}");
    assert_eq!(balance(&agent, "mallory"), None);
    // Domain misbehaviour still quarantines under this bundle: its rule is unchanged.
    let (code, body) = agent.tx(
        "notes",
        json!({"user": "mallory", "note_id": "../../acct/~canary", "text": "1"}),
    );
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["error"],
        "denied by policy rule canary.accounts (quarantine)"
    );
}

/// The TCP listener is open to every local user; the Unix socket only to root. A user who
/// holds every TCP slot gets "busy" for one more TCP connection, but must not lock the
/// Unix socket out: the two listeners have separate slots.
#[test]
fn tcp_clients_holding_every_tcp_slot_do_not_lock_out_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    // A free loopback port for the console's TCP listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut flags = admin_flags(&[0xa1, 0xa2, 0xa3]);
    flags.extend(["--console-tcp".to_owned(), tcp.to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _agent = Agent::start(dir.path(), &flags);
    let socket = dir.path().join("admin.sock");

    // Eight silent TCP connections: each holds a slot until the console's 30 s request
    // timeout. A ninth is answered "busy" once all eight are being served (accepting is
    // asynchronous, so ask until it is; bounded).
    let held: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(tcp).unwrap())
        .collect();
    let mut busy = None;
    for _ in 0..50 {
        let mut extra = std::net::TcpStream::connect(tcp).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match frame::read_response(&mut extra) {
            Ok(f) if f["code"] == "busy" => {
                busy = Some(f);
                break;
            }
            Ok(f) => panic!("a ninth TCP connection got {f}"),
            // Served (a slot was still free when it arrived): it waits for a request;
            // we give it none and try again.
            Err(_) => continue,
        }
    }
    let busy = busy.expect("the ninth TCP connection was never answered busy");
    assert_eq!(busy["ok"], false, "{busy}");

    // The root-only socket still answers, with the TCP slots all taken.
    let id = hello(&socket);
    APPLIANCE.with(|a| *a.borrow_mut() = Some(id));
    let status = send(&socket, &signed("status", &[], &[0xa1]));
    assert_eq!(status["ok"], true, "{status}");
    drop(held);
}
