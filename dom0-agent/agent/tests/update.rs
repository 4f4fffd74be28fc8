//! The A/B update installed by a signed admin command, through the real agent: `dom0-agent
//! serve` (sandbox backend) with three admins and a quorum of two and `[update]` pointed at
//! stand-ins (slots are files, the EFI partition and the update medium are directories, the
//! kernel command line says slot a booted), and a TCP collector standing in for the SIEM.
//!
//! Every refusal (quorum missing, unsigned, another vendor key, tampered, downgrade, too
//! large, a bundle the admins did not approve, a path instead of a name, a trial already
//! armed) must leave slot b, the EFI partition and grubenv as they were and be an audit
//! record in the signed chain saying why; the good bundle is written to slot b and armed,
//! audited as `update.installed`, and every one of those records reaches the collector.

mod common;

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    admin_key as key, audit, console_identity, console_send as send_raw, mayfly,
    signed_command as signed, verify, Agent,
};
use mayfly_command::{hex, keyfile};
use mayfly_update::bundle;
use mayfly_update::grubenv::{self, GrubEnv};
use mayfly_update::slots::Slot;
use serde_json::Value;

const SLOT_BYTES: usize = 2 << 20;

fn sha256(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A bundle of `version` signed by the vendor key `vendor`, its root part `root_bytes` long.
fn make_bundle(vendor: u8, version: u64, root_bytes: usize) -> Vec<u8> {
    let mut root = b"hsqs".to_vec();
    root.resize(root_bytes, 0x5a);
    root.extend_from_slice(&version.to_be_bytes());
    let mut parts = vec![
        ("rootfs".to_owned(), Cursor::new(root)),
        ("xen".to_owned(), Cursor::new(b"XEN v2".to_vec())),
        ("vmlinux".to_owned(), Cursor::new(b"LINUX v2".to_vec())),
        ("pcrs".to_owned(), Cursor::new(b"PCRS\n".to_vec())),
    ];
    let mut out = Vec::new();
    bundle::write_bundle(&key(vendor), bundle::PRODUCT, version, &mut parts, &mut out).unwrap();
    out
}

/// The appliance's stand-ins.
struct Rig {
    esp: PathBuf,
    medium: PathBuf,
    slot_b: PathBuf,
    flags: Vec<String>,
}

const VENDOR: u8 = 0x70;

fn rig(root: &Path, collector: &str) -> Rig {
    // Two admins with key files, for the CLI (`keygen`'s files), beside three by seed.
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let files: Vec<String> = ["alice", "bob"]
        .iter()
        .map(|n| hex(&keyfile::generate(&keys.join(n)).unwrap()))
        .collect();
    let esp = root.join("esp");
    std::fs::create_dir_all(esp.join("EFI/BOOT")).unwrap();
    let mut env = GrubEnv::default();
    env.set("mayfly_slot", "a");
    std::fs::write(esp.join(mayfly_update::GRUBENV), env.serialize().unwrap()).unwrap();
    let medium = root.join("medium");
    std::fs::create_dir_all(&medium).unwrap();
    let slot_a = root.join("root-a");
    let slot_b = root.join("root-b");
    std::fs::write(&slot_a, vec![0xaa; SLOT_BYTES]).unwrap();
    std::fs::write(&slot_b, vec![0xee; SLOT_BYTES]).unwrap();
    let cmdline = root.join("cmdline");
    std::fs::write(&cmdline, format!("root=PARTUUID={} ro\n", Slot::A.uuid())).unwrap();
    let info = root.join("image-info");
    std::fs::write(&info, "image_version=1\n").unwrap();
    let vendor_pub = root.join("update-key.pub");
    std::fs::write(
        &vendor_pub,
        format!("{}\n", hex(&keyfile::public_of(&key(VENDOR)))),
    )
    .unwrap();
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[siem]\nhostname = \"mayfly-update-test\"\n\n[[siem.collector]]\nname = \"soc\"\ntransport = \"tcp\"\naddress = \"{collector}\"\n"
        ),
    )
    .unwrap();
    let p = |p: &Path| p.display().to_string();
    let mut flags: Vec<String> = [0xa1u8, 0xa2, 0xa3]
        .iter()
        .map(|s| hex(&keyfile::public_of(&key(*s))))
        .chain(files)
        .flat_map(|k| ["--admin-key".to_owned(), k])
        .collect();
    flags.extend(
        [
            ("--config", p(&config)),
            ("--update-medium", p(&medium)),
            ("--update-esp", p(&esp)),
            ("--update-slot-a-device", p(&slot_a)),
            ("--update-slot-b-device", p(&slot_b)),
            ("--update-key", p(&vendor_pub)),
            ("--update-image-info", p(&info)),
            ("--update-cmdline-file", p(&cmdline)),
            ("--update-state-dir", p(&root.join("update-state"))),
            ("--update-max-bundle-mib", "1".to_owned()),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_owned(), v]),
    );
    flags.push("--update".to_owned());
    Rig {
        esp,
        medium,
        slot_b,
        flags,
    }
}

impl Rig {
    fn grubenv(&self) -> GrubEnv {
        grubenv::read(&self.esp.join(mayfly_update::GRUBENV)).unwrap()
    }

    /// Slot b, the EFI partition and grubenv are as they were.
    fn untouched(&self) -> bool {
        std::fs::read(&self.slot_b)
            .unwrap()
            .iter()
            .all(|&b| b == 0xee)
            && !self.esp.join("xen-b").exists()
            && self
                .grubenv()
                .get("mayfly_try")
                .unwrap_or_default()
                .is_empty()
    }
}

/// A loopback TCP collector keeping every byte it receives.
fn collector() -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, got)
}

/// The audit records of `event` (oldest first).
fn records(dir: &Path, event: &str) -> Vec<BTreeMap<String, String>> {
    audit(dir)
        .into_iter()
        .filter(|(e, _)| e == event)
        .map(|(_, f)| f)
        .collect()
}

#[test]
fn update_install_refuses_every_bad_bundle_audited_and_installs_the_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (soc, received) = collector();
    let r = rig(dir.path(), &soc);
    let flags: Vec<&str> = r.flags.iter().map(String::as_str).collect();
    let agent = Agent::start(&data, &flags);
    let sock = data.join("admin.sock");
    let id = console_identity(&sock);

    let good = make_bundle(VENDOR, 2, 64 << 10);
    let write = |name: &str, bytes: &[u8]| std::fs::write(r.medium.join(name), bytes).unwrap();
    write("good-v2.bundle", &good);
    write(
        "unsigned.bundle",
        b"not a bundle at all, just bytes on the medium",
    );
    write("otherkey-v2.bundle", &make_bundle(0x71, 2, 64 << 10));
    let mut tampered = good.clone();
    let at = tampered.len() - 200;
    tampered[at] ^= 1;
    write("tampered-v2.bundle", &tampered);
    write("old-v1.bundle", &make_bundle(VENDOR, 1, 64 << 10));
    let big = make_bundle(VENDOR, 2, 1 << 20);
    write("big-v2.bundle", &big);

    let install = |name: &str, bytes: &[u8], signers: &[u8]| {
        let env = signed(
            &id,
            "update.install",
            &[("bundle", name), ("sha256", &sha256(bytes)), ("tries", "2")],
            signers,
        );
        send_raw(&sock, &env.encode())
    };

    // One admin alone: the console refuses it before the updater sees it.
    let lone = install("good-v2.bundle", &good, &[0xa1]);
    assert_eq!(lone["code"], "insufficient_quorum", "{lone}");
    assert!(r.untouched());
    let rejected = records(&data, "admin.rejected");
    assert!(
        rejected.iter().any(
            |f| f.get("command").map(String::as_str) == Some("update.install")
                && f["reason"] == "insufficient_quorum"
        ),
        "{rejected:?}"
    );

    // Refused by the updater: nothing written, each an `update.refused` naming its reason.
    let unsigned: &[u8] = b"not a bundle at all, just bytes on the medium";
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "unsigned.bundle",
            unsigned.to_vec(),
            "not_a_bundle",
            "not a Mayfly update bundle",
        ),
        (
            "otherkey-v2.bundle",
            make_bundle(0x71, 2, 64 << 10),
            "bad_signature",
            "signature does not verify",
        ),
        (
            "tampered-v2.bundle",
            tampered.clone(),
            "tampered",
            "differs from the manifest",
        ),
        (
            "old-v1.bundle",
            make_bundle(VENDOR, 1, 64 << 10),
            "downgrade",
            "version 1 is not newer than 1",
        ),
        (
            "big-v2.bundle",
            big.clone(),
            "too_large",
            "is more than the limit of 1048576",
        ),
        // Validly signed by the vendor, but not the bytes the admins approved.
        (
            "good-v2.bundle",
            b"another bundle".to_vec(),
            "not_approved",
            "is not the approved",
        ),
        ("missing.bundle", good.clone(), "failed", "missing.bundle"),
    ];
    for (name, approved, code, text) in &cases {
        let out = install(name, approved, &[0xa1, 0xa2]);
        assert_eq!(out["ok"], false, "{name}: {out}");
        assert_eq!(out["code"], *code, "{name}: {out}");
        assert!(r.untouched(), "{name}: the slot or grubenv changed");
        let last = records(
            &data,
            if *code == "failed" {
                "update.failed"
            } else {
                "update.refused"
            },
        )
        .pop()
        .unwrap_or_else(|| panic!("{name}: no audit record"));
        assert_eq!(last["bundle"], *name, "{last:?}");
        assert_eq!(last["reason"], *code, "{last:?}");
        assert_eq!(last["sha256"], sha256(approved), "{last:?}");
        assert!(last["error"].contains(text), "{name}: {last:?}");
    }
    // A path instead of a name never reaches the medium: refused as a bad argument.
    let out = install("../root-b", &good, &[0xa1, 0xa2]);
    assert_eq!(out["code"], "bad_argument", "{out}");
    assert!(r.untouched());

    // The good bundle, through the operator's CLI (the quorum signs together).
    let keys = dir.path().join("keys");
    let copy = dir.path().join("good-v2.bundle");
    std::fs::write(&copy, &good).unwrap();
    let (code, stdout, stderr) = mayfly(&[
        "admin",
        "update",
        "--socket",
        sock.to_str().unwrap(),
        "--key",
        keys.join("alice.key").to_str().unwrap(),
        "--key",
        keys.join("bob.key").to_str().unwrap(),
        "install",
        "--tries",
        "2",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("written to slot") && stdout.contains(" b"),
        "{stdout}"
    );
    let slot_b = std::fs::read(&r.slot_b).unwrap();
    assert!(
        slot_b.starts_with(b"hsqs\x5a\x5a"),
        "slot b holds the new root"
    );
    assert_eq!(std::fs::read(r.esp.join("xen-b")).unwrap(), b"XEN v2");
    let env = r.grubenv();
    assert_eq!(
        (
            env.get("mayfly_slot"),
            env.get("mayfly_try"),
            env.get("mayfly_tries")
        ),
        (Some("a"), Some("b"), Some("2"))
    );
    let installed = records(&data, "update.installed");
    assert_eq!(installed.len(), 1, "{installed:?}");
    assert_eq!(installed[0]["slot"], "b");
    assert_eq!(installed[0]["version"], "2");
    assert_eq!(installed[0]["sha256"], sha256(&good));
    assert_eq!(installed[0]["bundle"], "good-v2.bundle");

    // A second install while slot b's trial is armed would overwrite the fallback's twin:
    // refused.
    let again = install("good-v2.bundle", &good, &[0xa1, 0xa2]);
    assert_eq!(again["code"], "trial_pending", "{again}");

    // Status (one admin is enough) shows the armed trial.
    let st = send_raw(&sock, &signed(&id, "update.status", &[], &[0xa3]).encode());
    assert_eq!(st["ok"], true, "{st}");
    let st = &st["result"];
    assert_eq!(
        (&st["booted_slot"], &st["committed_slot"], &st["trial_slot"]),
        (&Value::from("a"), &Value::from("a"), &Value::from("b"))
    );
    assert_eq!(st["trial_tries_left"], 2);
    assert_eq!(st["image_version"], 1);

    // Every outcome went to the SIEM.
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = [
        "update.installed",
        "not_approved",
        "bad_signature",
        "downgrade",
        "too_large",
    ];
    let missing = loop {
        let text = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
        let missing: Vec<&str> = want.iter().copied().filter(|w| !text.contains(w)).collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        missing.is_empty(),
        "the collector did not receive {missing:?}"
    );
    drop(agent);
    let (ok, out) = verify(&data);
    assert!(ok, "{out}");
}
