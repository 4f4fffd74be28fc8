//! Capacity through the real agent (sandbox backend) on a small tmpfs (run as root, as CI
//! does): the map grows past its initial size under load without a restart; the disk
//! fills; the agent is killed with SIGKILL and restarts on the full disk, serves health
//! (with the capacity section), lookups and the console, refuses transactions with 503
//! and the reason, and resumes once space is freed, with no acknowledged transaction lost.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{audit, verify, Agent};
use serde_json::json;

struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(at: &'a Path, size: &str) -> Self {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "this test mounts a small tmpfs and must run as root"
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

fn free_bytes(at: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(at).unwrap();
    #[allow(clippy::useless_conversion)]
    let free = u64::from(s.blocks_available()) * u64::from(s.fragment_size());
    free
}

fn capacity(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.get("/v1/health");
    assert_eq!(code, 200, "{body}");
    body["capacity"].clone()
}

#[test]
fn full_disk_restart_serves_reads_refuses_writes_and_resumes() {
    let outer = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(outer.path(), "96m");
    let data = outer.path().join("data");
    let admin = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[0xa1; 32]).unwrap();
    let admin_hex = mayfly_command::hex(&mayfly_command::keyfile::public_of(&admin));
    let flags = [
        "--map-size-mib",
        "16",
        "--max-map-size-mib",
        "4096",
        "--admin-key",
        &admin_hex,
        "--admin-quorum",
        "1",
    ];
    let agent = Agent::start(&data, &flags);

    // Under load the map grows past its initial 16 MiB, without a restart.
    let value = "v".repeat(16 << 10);
    let mut acked: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut i = 0;
    while capacity(&agent)["map_bytes"].as_u64().unwrap() <= 16 << 20 {
        let key = format!("kv/grow{i:05}");
        let (code, body) = agent.tx("kv", json!({"op": "put", "key": key, "value": value}));
        assert_eq!(code, 200, "{body}");
        acked.insert(key, (body["tx_id"].as_str().unwrap().into(), value.clone()));
        i += 1;
        assert!(i < 4000, "the map never grew");
    }
    let cap = capacity(&agent);
    assert_eq!(cap["writable"], true, "{cap}");
    assert!(cap["used_bytes"].as_u64().unwrap() > 0);

    // Fill the disk: a filler file leaves ~4 MiB, then puts until the agent refuses.
    let filler = outer.path().join("filler");
    let keep = 4u64 << 20;
    let size = free_bytes(outer.path()).saturating_sub(keep);
    std::fs::write(&filler, vec![0u8; usize::try_from(size).unwrap()]).unwrap();
    let mut refused = None;
    for j in 0..2000 {
        let key = format!("kv/fill{j:05}");
        let (code, body) = agent.tx("kv", json!({"op": "put", "key": key, "value": value}));
        if code == 200 {
            acked.insert(key, (body["tx_id"].as_str().unwrap().into(), value.clone()));
        } else {
            refused = Some((code, body));
            break;
        }
    }
    let (code, body) = refused.expect("the disk never filled");
    assert!(code >= 500, "{code} {body}");

    // SIGKILL, then a restart on the full disk.
    let mut agent = agent;
    let mut child = agent.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(agent);
    let agent = Agent::start(&data, &flags);

    // A transaction is refused with 503 and the reason (the first one may still find
    // room in pages LMDB freed; the refusal follows within a few).
    let mut refusal = None;
    for j in 0..50 {
        let key = format!("kv/after-kill{j:03}");
        let (code, body) = agent.tx("kv", json!({"op": "put", "key": key, "value": value}));
        match code {
            200 => {
                acked.insert(key, (body["tx_id"].as_str().unwrap().into(), value.clone()));
            }
            503 => {
                refusal = Some(body);
                break;
            }
            _ => {}
        }
    }
    let body = refusal.expect("transactions were not refused on the full disk");
    let text = body["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("storage full") && text.contains("disk"),
        "{body}"
    );

    // Health says so, lookups are served.
    let cap = capacity(&agent);
    assert_eq!(cap["writable"], false, "{cap}");
    assert!(cap["refusing"].as_str().unwrap().contains("full"), "{cap}");
    for (tx_id, _) in acked.values().take(20) {
        let (code, body) = agent.get(&format!("/v1/transactions/{tx_id}"));
        assert_eq!(code, 200, "lookup of {tx_id}: {body}");
    }
    // The console answers: its identity, and a signed status showing the refusal.
    let sock = data.join("admin.sock");
    let console = |request: &[u8]| -> serde_json::Value {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        mayfly_command::frame::write_request(&mut s, request).unwrap();
        loop {
            let f = mayfly_command::frame::read_response(&mut s).unwrap();
            if f["type"] == "result" || f["command"] == "hello" {
                return f;
            }
        }
    };
    let hello = console(mayfly_command::frame::HELLO);
    assert_eq!(hello["command"], "hello", "{hello}");
    let appliance = hello["result"]["appliance"].as_str().unwrap().to_owned();
    let now = mayfly_command::now_ns();
    let mut status = mayfly_command::Envelope::new(mayfly_command::Body {
        nonce: mayfly_command::random_nonce().unwrap(),
        issued_ns: now,
        expires_ns: now + 300_000_000_000,
        command: "status".into(),
        args: [(mayfly_command::APPLIANCE_ARG.to_owned(), appliance)].into(),
    })
    .unwrap();
    status.sign(&admin).unwrap();
    let r = console(&status.encode());
    assert_eq!(r["ok"], true, "console status on a full disk: {r}");
    assert_eq!(r["result"]["capacity"]["writable"], false, "{r}");
    // Its nonce could not be written, but it is held: the same envelope again is a replay.
    let again = console(&status.encode());
    assert_eq!(again["ok"], false, "{again}");
    assert_eq!(again["code"], "replayed", "{again}");

    // Space returns: the agent resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while capacity(&agent)["writable"] != true {
        assert!(
            Instant::now() < deadline,
            "still refusing after space was freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = agent.tx(
        "kv",
        json!({"op": "put", "key": "kv/resumed", "value": "yes"}),
    );
    assert_eq!(code, 200, "{body}");

    // Nothing acknowledged was lost.
    for (key, (_, value)) in &acked {
        let (code, body) = agent.tx("kv", json!({"op": "get", "key": key}));
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            body["result"]["value"].as_str(),
            Some(value.as_str()),
            "{key} lost"
        );
    }
    let mut agent = agent;
    assert!(agent.stop().success());
    let events: Vec<String> = audit(&data).into_iter().map(|(e, _)| e).collect();
    for e in ["ledger.map_grown", "ledger.storage_full", "agent.started"] {
        assert!(events.iter().any(|x| x == e), "no {e} in the audit chain");
    }
    let (ok, out) = verify(&data);
    assert!(ok, "{out}");
}
