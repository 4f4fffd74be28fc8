//! Failover (issue 18) with real processes on loopback: `dom0-agent serve` as a
//! synchronous primary and `dom0-agent standby` following it over mutual TLS with pinned
//! keys. Acknowledged transactions (with idempotency keys) are on the standby's copy; the
//! primary's health says whether it is synchronous or degraded, and why; both ledgers
//! verify. (Promotion and fencing are not built yet.)

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_exe, verify, Agent};
use mayfly_ledger::{store, StoreOptions};
use serde_json::{json, Value};

struct Pem {
    cert: PathBuf,
    key: PathBuf,
    pin: String,
}

fn pem(dir: &Path, name: &str) -> Pem {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let der = rustls::pki_types::CertificateDer::from(c.cert.der().to_vec());
    Pem {
        cert,
        key,
        pin: mayfly_replica::pin_of(&der).unwrap(),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn health(agent: &Agent) -> Value {
    let (code, body) = agent.get("/v1/health");
    assert_eq!(code, 200, "{body}");
    body["replication"].clone()
}

fn wait_state(agent: &Agent, state: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(agent);
        if h["state"] == state || Instant::now() > end {
            assert_eq!(h["state"], state, "{h}");
            return h;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn standby(config: &Path, dir: &Path) -> Child {
    Command::new(agent_exe())
        .args(["standby", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) -> i32 {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    child.wait().unwrap().code().unwrap_or(-1)
}

#[test]
fn a_standby_process_follows_a_synchronous_primary_and_the_primary_degrades_without_it() {
    let root = tempfile::tempdir().unwrap();
    let (pdir, sdir) = (root.path().join("primary"), root.path().join("standby"));
    let (p, s) = (pem(root.path(), "primary"), pem(root.path(), "standby"));
    let port = free_port();
    let pconf = root.path().join("primary.toml");
    std::fs::write(
        &pconf,
        format!(
            "[replication]\nrole = \"primary\"\nlisten = \"127.0.0.1:{port}\"\nmode = \"sync\"\nsync_timeout_ms = 400\n[replication.tls]\ncert = {:?}\nkey = {:?}\npeer_pin = {:?}\n",
            p.cert, p.key, s.pin
        ),
    )
    .unwrap();
    let mut primary = Agent::start(&pdir, &["--config", pconf.to_str().unwrap()]);
    assert_eq!(health(&primary)["mode"], "sync");
    let out = Command::new(agent_exe())
        .args(["export-key", "--data-dir"])
        .arg(&pdir)
        .output()
        .unwrap();
    let identity = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let sconf = root.path().join("standby.toml");
    std::fs::write(
        &sconf,
        format!(
            "[replication]\nrole = \"standby\"\npeer = \"127.0.0.1:{port}\"\nprimary_identity = {identity:?}\n[replication.tls]\ncert = {:?}\nkey = {:?}\npeer_pin = {:?}\n",
            s.cert, s.key, p.pin
        ),
    )
    .unwrap();
    let follower = standby(&sconf, &sdir);
    wait_state(&primary, "synchronous");

    let post = |agent: &Agent, key: &str, name: &str| {
        let body = json!({"handler": "open_account", "payload": {"name": name, "balance": 5}, "idempotency_key": key}).to_string();
        let (code, r) = agent.post(&body);
        assert_eq!(code, 200, "{r}");
        r
    };
    let mut acked = Vec::new();
    for i in 0..8 {
        acked.push(post(&primary, &format!("order-{i}"), &format!("acct{i}")));
    }
    let h = health(&primary);
    assert_eq!(h["state"], "synchronous", "{h}");
    assert_eq!(h["lag_groups"], 0, "{h}");

    // The standby goes away: the primary degrades after sync_timeout_ms, and says why.
    assert_eq!(stop(follower), 0);
    post(&primary, "order-alone", "alone");
    let h = wait_state(&primary, "degraded");
    assert!(
        h["degraded_reason"]
            .as_str()
            .unwrap()
            .contains("did not confirm"),
        "{h}"
    );
    // Back: it catches up, and the primary is synchronous again.
    let follower = standby(&sconf, &sdir);
    wait_state(&primary, "synchronous");
    let last = post(&primary, "order-last", "last");
    assert_eq!(stop(follower), 0);
    primary.stop();

    // Every acknowledged commit is on the copy, with its durable idempotency key; both
    // ledgers verify.
    let copy = store::open_read_only(&sdir, &StoreOptions::default()).unwrap();
    for r in acked.iter().chain([&last]) {
        let id = mayfly_ledger::TxId::parse(r["tx_id"].as_str().unwrap()).unwrap();
        assert_eq!(copy.seq_of(&id).unwrap(), r["seq"].as_u64(), "{r}");
    }
    let cp = copy
        .idempotent_commit("127.0.0.1", "order-3")
        .unwrap()
        .unwrap();
    assert_eq!(Some(cp.seq), acked[3]["seq"].as_u64());
    drop(copy);
    for dir in [&pdir, &sdir] {
        let (ok, out) = verify(dir);
        assert!(ok, "{}: {out}", dir.display());
    }
}
