//! Failover (issue 18) with real processes on loopback: `dom0-agent serve` as a
//! synchronous primary and `dom0-agent standby` following it over mutual TLS with pinned
//! keys. Acknowledged transactions (with idempotency keys) are on the standby's copy; the
//! primary's health says whether it is synchronous or degraded, and why; both ledgers
//! verify. A standby is promoted by a co-signed command (`dom0-agent promote`), a former
//! primary that comes back is fenced and re-joins as standby, and the must-show run kills,
//! promotes and re-joins 20 times in sync and in async mode.

mod common;
#[path = "../../siem/tests/support/mod.rs"]
mod rsyslog;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_exe, transfers, verify, Agent};
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

/// The ledger identity key of `dir` (`dom0-agent export-key`).
fn export_key(dir: &Path) -> String {
    let out = Command::new(agent_exe())
        .args(["export-key", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A synchronous primary's configuration (`primary.toml` in `dir`): replication listening on
/// `port`, `me`'s certificate, `peer` pinned.
fn primary_conf(dir: &Path, port: u16, sync_timeout_ms: u64, me: &Pem, peer: &Pem) -> PathBuf {
    let path = dir.join("primary.toml");
    std::fs::write(
        &path,
        format!(
            "[replication]\nrole = \"primary\"\nlisten = \"127.0.0.1:{port}\"\nmode = \"sync\"\nsync_timeout_ms = {sync_timeout_ms}\n[replication.tls]\ncert = {:?}\nkey = {:?}\npeer_pin = {:?}\n",
            me.cert, me.key, peer.pin
        ),
    )
    .unwrap();
    path
}

/// A standby's configuration (`standby.toml` in `dir`, after `extra`): following the primary
/// on `port` whose ledger identity is `identity`, `me`'s certificate, `peer` pinned.
fn standby_conf(
    dir: &Path,
    port: u16,
    identity: &str,
    extra: &str,
    me: &Pem,
    peer: &Pem,
) -> PathBuf {
    let path = dir.join("standby.toml");
    std::fs::write(
        &path,
        format!(
            "{extra}[replication]\nrole = \"standby\"\npeer = \"127.0.0.1:{port}\"\nprimary_identity = {identity:?}\n[replication.tls]\ncert = {:?}\nkey = {:?}\npeer_pin = {:?}\n",
            me.cert, me.key, peer.pin
        ),
    )
    .unwrap();
    path
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

/// A `dom0-agent standby` process; killed on drop (a failing test must not leave it
/// holding the test's output pipe).
struct StandbyProc(Option<Child>);

impl Drop for StandbyProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn standby(config: &Path, dir: &Path) -> StandbyProc {
    StandbyProc(Some(
        Command::new(agent_exe())
            .args(["standby", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    ))
}

/// Stops it with SIGTERM; its exit code.
fn stop(mut p: StandbyProc) -> i32 {
    let mut child = p.0.take().unwrap();
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
    let pconf = primary_conf(root.path(), port, 400, &p, &s);
    let mut primary = Agent::start(&pdir, &["--config", pconf.to_str().unwrap()]);
    assert_eq!(health(&primary)["mode"], "sync");
    let identity = export_key(&pdir);
    let sconf = standby_conf(root.path(), port, &identity, "", &s, &p);
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

/// One POST; `None` if the agent is unreachable or the connection breaks (killed).
fn try_post(addr: std::net::SocketAddr, body: &str) -> Option<(u16, Value)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let json = serde_json::from_slice(&resp[split + 4..]).ok()?;
    Some((status, json))
}

/// Where clients send (`None`: between primaries, they wait and retry).
type Target = std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>;
/// Acknowledged transfers: (client, transaction id, sequence).
type Acked = std::sync::Arc<std::sync::Mutex<Vec<(usize, String, u64)>>>;

/// `n` clients, each sending transfers of 1 from `s{t}` to `c{t}` with idempotency keys
/// `c{t}-{k}` to the current target until `stopping`; an unanswered request (the primary
/// killed, 503, 409) is resent with its key until it is acknowledged (bounded: 180 s).
fn transfer_clients(
    n: usize,
    addr: &Target,
    stopping: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: &Acked,
) -> Vec<std::thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    (0..n)
        .map(|t| {
            let (addr, stopping, acked) = (addr.clone(), stopping.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut k = 0u64;
                while !stopping.load(Ordering::SeqCst) {
                    let body = json!({"handler": "transfer",
                        "payload": {"from": format!("s{t}"), "to": format!("c{t}"), "amount": 1},
                        "idempotency_key": format!("c{t}-{k}")})
                    .to_string();
                    let deadline = Instant::now() + Duration::from_secs(180);
                    loop {
                        assert!(
                            Instant::now() < deadline,
                            "client {t} key {k} never answered"
                        );
                        let Some(a) = *addr.lock().unwrap() else {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        };
                        match try_post(a, &body) {
                            Some((200, r)) => {
                                let id = r["tx_id"].as_str().unwrap().to_string();
                                acked
                                    .lock()
                                    .unwrap()
                                    .push((t, id, r["seq"].as_u64().unwrap()));
                                break;
                            }
                            Some((503 | 409, _)) | None => {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Some((code, r)) => panic!("client {t}: {code} {r}"),
                        }
                    }
                    k += 1;
                }
            })
        })
        .collect()
}

/// Sync mode under SIGKILL (the part of the must-show test that needs no
/// promotion): 8 clients send transfers with idempotency keys to a synchronous primary
/// that is killed with SIGKILL at random points 5 times and restarted on the same data
/// directory; clients resend every unanswered request with its key. After every kill,
/// every acknowledged transaction is already on the standby's copy; at the end each key
/// was executed exactly once (balances), both ledgers verify and the copy is a
/// byte-identical prefix of the primary.
/// The transactions (id → checkpoint sequence) in the groups of a standby's journal
/// (`DATA_DIR/replication.journal`, flushed before each group is acknowledged).
fn journaled_transactions(dir: &Path) -> std::collections::HashMap<[u8; 16], u64> {
    let (entries, _) = mayfly_replica::journal::Journal::read(dir).unwrap();
    let mut out = std::collections::HashMap::new();
    for e in entries {
        if let mayfly_replica::journal::Entry::Group { records, .. } = e {
            for r in &records.checkpoints {
                if let Ok(mayfly_ledger::Record::Transaction(cp)) = mayfly_ledger::Record::decode(r)
                {
                    out.insert(cp.tx_id.0, cp.seq);
                }
            }
        }
    }
    out
}

#[test]
fn a_sigkilled_synchronous_primary_loses_nothing_acknowledged_and_resends_run_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const KILLS: usize = 5;
    const CLIENTS: usize = 8;
    let root = tempfile::tempdir().unwrap();
    let (pdir, sdir) = (root.path().join("primary"), root.path().join("standby"));
    let (p, s) = (pem(root.path(), "primary"), pem(root.path(), "standby"));
    let port = free_port();
    let pconf = primary_conf(root.path(), port, 5000, &p, &s);
    let conf_flag = ["--config", pconf.to_str().unwrap()];
    let primary = Agent::start(&pdir, &conf_flag);
    let identity = export_key(&pdir);
    let sconf = standby_conf(root.path(), port, &identity, "", &s, &p);
    let follower = standby(&sconf, &sdir);
    wait_state(&primary, "synchronous");
    for t in 0..CLIENTS {
        for (name, balance) in [(format!("s{t}"), 1_000_000), (format!("c{t}"), 0)] {
            let (code, r) = primary.tx("open_account", json!({"name": name, "balance": balance}));
            assert_eq!(code, 200, "{r}");
        }
    }

    let addr = Arc::new(Mutex::new(Some(primary.addr)));
    let stopping = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let clients = transfer_clients(CLIENTS, &addr, &stopping, &acked);

    let check_copy = |acked: &[(usize, String, u64)]| {
        // Durable on the standby: in its journal (read first: a group leaves it only
        // once LMDB holds it) or in its LMDB.
        let journaled = journaled_transactions(&sdir);
        let copy = store::open_read_only(&sdir, &StoreOptions::default()).unwrap();
        for (_, id, seq) in acked {
            let tx = mayfly_ledger::TxId::parse(id).unwrap();
            let held = match journaled.get(&tx.0) {
                Some(seq) => Some(*seq),
                None => copy.seq_of(&tx).unwrap(),
            };
            assert_eq!(
                held,
                Some(*seq),
                "acknowledged transaction {id} (seq {seq}) is not on the standby"
            );
        }
    };
    let mut rng = fastrand::Rng::with_seed(18);
    let mut primary = Some(primary);
    for round in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.u64(150..700)));
        let mut victim = primary.take().unwrap();
        let mut child = victim.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        *addr.lock().unwrap() = None;
        let snapshot = acked.lock().unwrap().clone();
        assert!(
            !snapshot.is_empty() || round > 0,
            "no load before the first kill"
        );
        check_copy(&snapshot);
        let restarted = Agent::start(&pdir, &conf_flag);
        *addr.lock().unwrap() = Some(restarted.addr);
        primary = Some(restarted);
    }
    std::thread::sleep(Duration::from_millis(300));
    stopping.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let mut primary = primary.unwrap();
    wait_state(&primary, "synchronous");
    let acked = acked.lock().unwrap().clone();
    check_copy(&acked);
    for t in 0..CLIENTS {
        let (code, r) = primary.tx("balance", json!({"name": format!("c{t}")}));
        assert_eq!(code, 200, "{r}");
        let done = acked.iter().filter(|(c, _, _)| *c == t).count() as u64;
        assert_eq!(
            r["result"]["balance"].as_u64(),
            Some(done),
            "client {t}: a key executed twice or an acknowledged transfer lost"
        );
    }
    assert_eq!(stop(follower), 0);
    primary.stop();
    for dir in [&pdir, &sdir] {
        let (ok, out) = verify(dir);
        assert!(ok, "{}: {out}", dir.display());
    }
    let (a, b) = (
        store::open_read_only(&pdir, &StoreOptions::default()).unwrap(),
        store::open_read_only(&sdir, &StoreOptions::default()).unwrap(),
    );
    let common = b.last_group().unwrap();
    assert!(common <= a.last_group().unwrap());
    for g in 1..=common {
        assert_eq!(
            a.export_group(g).unwrap(),
            b.export_group(g).unwrap(),
            "group {g}"
        );
    }
    println!(
        "{} acknowledged transfers across {KILLS} SIGKILLs, all on the standby",
        acked.len()
    );
}

/// `dom0-agent promote`; (exit code, stdout, stderr).
fn promote(config: &Path, dir: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_exe())
        .args(["promote", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `promote` command for `identity` opening `epoch`, prepared by `first` and co-signed
/// by `rest` (admin key stems).
fn promote_command(
    root: &Path,
    name: &str,
    identity: &str,
    epoch: u64,
    signers: &[&Path],
) -> PathBuf {
    let file = root.join(name);
    let key = |p: &Path| p.with_extension("key").to_str().unwrap().to_string();
    let (code, _, err) = common::mayfly(&[
        "admin",
        "prepare",
        "--out",
        file.to_str().unwrap(),
        "--key",
        &key(signers[0]),
        "--appliance",
        identity,
        "promote",
        "--epoch",
        &epoch.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    for s in &signers[1..] {
        let (code, _, err) =
            common::mayfly(&["admin", "cosign", file.to_str().unwrap(), "--key", &key(s)]);
        assert_eq!(code, 0, "{err}");
    }
    file
}

/// Promotes the stopped standby in `dir` (configuration `config`) to `epoch` with a
/// command prepared and co-signed by both `admins`; the command file and `promote`'s JSON.
fn promote_cosigned(
    root: &Path,
    config: &Path,
    dir: &Path,
    identity: &str,
    epoch: u64,
    admins: &[PathBuf],
) -> (PathBuf, Value) {
    let cmd = promote_command(
        root,
        &format!("promote-{epoch}.cmd"),
        identity,
        epoch,
        &[&admins[0], &admins[1]],
    );
    let (code, out, err) = promote(config, dir, &["--command", cmd.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    (cmd, serde_json::from_str(&out).unwrap())
}

/// Promotion (issue 18, step 1) with real processes: a synchronous primary acknowledges 8
/// keyed transactions and is SIGKILLed; the standby is stopped and promoted by a
/// co-signed `promote` command (a single signature, the wrong epoch and a replay are
/// refused with exit 8 and audited); `serve` opens the copy as the primary of epoch 1,
/// answers every resend with its original outcome and runs new keys; its ledger verifies
/// with the identity and the promotion key pinned (and not with the identity alone), and
/// the former primary's acknowledged history is its byte-identical prefix.
#[test]
fn a_standby_promoted_by_a_cosigned_command_answers_resends_with_their_original_outcome() {
    let root = tempfile::tempdir().unwrap();
    let (pdir, sdir) = (root.path().join("primary"), root.path().join("standby"));
    let (p, s) = (pem(root.path(), "primary"), pem(root.path(), "standby"));
    let port = free_port();
    let pconf = primary_conf(root.path(), port, 5000, &p, &s);
    let mut primary = Agent::start(&pdir, &["--config", pconf.to_str().unwrap()]);
    let identity = export_key(&pdir);
    let (admins, pubs) = two_admins(root.path());
    let sconf = standby_conf(
        root.path(),
        port,
        &identity,
        &format!("[console]\nadmin_keys = {pubs:?}\nquorum = 2\n"),
        &s,
        &p,
    );
    let follower = standby(&sconf, &sdir);
    wait_state(&primary, "synchronous");
    let body = |k: usize| {
        json!({"handler": "open_account", "payload": {"name": format!("acct{k}"), "balance": 5},
               "idempotency_key": format!("order-{k}")})
        .to_string()
    };
    let acked: Vec<Value> = (0..8)
        .map(|k| {
            let (code, r) = primary.post(&body(k));
            assert_eq!(code, 200, "{r}");
            r
        })
        .collect();
    let mut victim = primary.child.take().unwrap();
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    // A running standby holds its data directory: promote refuses to touch it.
    let (code, _, err) = promote(&sconf, &sdir, &["--dry-run"]);
    assert_ne!(code, 0);
    assert!(err.contains("a standby is running"), "{err}");
    assert_eq!(stop(follower), 0);
    let (code, out, err) = promote(&sconf, &sdir, &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["opens_epoch"], 1, "{plan}");

    let refused = [
        ("alone", 1, vec![admins[0].as_path()], "quorum"),
        (
            "later",
            2,
            vec![admins[0].as_path(), admins[1].as_path()],
            "wrong_epoch",
        ),
    ];
    for (name, epoch, signers, code_name) in refused {
        let cmd = promote_command(root.path(), name, &identity, epoch, &signers);
        let (code, _, err) = promote(&sconf, &sdir, &["--command", cmd.to_str().unwrap()]);
        assert_eq!(code, 8, "{name}: {err}");
        assert!(err.contains(code_name), "{name}: {err}");
    }
    let (cmd, promoted) = promote_cosigned(root.path(), &sconf, &sdir, &identity, 1, &admins);
    assert_eq!(promoted["epoch"], 1, "{promoted}");
    let promo_key = promoted["promotion_key"].as_str().unwrap().to_string();
    // The same command again: this standby is at epoch 1 now.
    let (code, _, err) = promote(&sconf, &sdir, &["--command", cmd.to_str().unwrap()]);
    assert_eq!(code, 8, "{err}");
    let local = common::audit(&sdir.join("standby-audit"));
    let rejected: Vec<_> = local
        .iter()
        .filter(|(e, _)| e == "admin.rejected")
        .collect();
    assert_eq!(rejected.len(), 3, "{local:?}");
    assert!(local.iter().any(|(e, _)| e == "failover.promoted"));

    // The promoted copy serves as the primary of epoch 1.
    let nconf = root.path().join("promoted.toml");
    std::fs::write(
        &nconf,
        format!("[console]\nadmin_keys = {pubs:?}\nquorum = 2\n"),
    )
    .unwrap();
    let mut new_primary = Agent::start(&sdir, &["--config", nconf.to_str().unwrap()]);
    // Its console: the promotion command is a replay there (its nonce is in the promotion
    // group), and a new one is refused: a serving agent is not a standby.
    let socket = sdir.join("admin.sock");
    let submit = |file: &Path| {
        common::mayfly(&[
            "admin",
            "submit",
            file.to_str().unwrap(),
            "--json",
            "--socket",
            socket.to_str().unwrap(),
        ])
    };
    let (code, out, err) = submit(&cmd);
    assert_eq!(code, 1, "{out} {err}");
    assert!(format!("{out}{err}").contains("replay"), "{out} {err}");
    let again = promote_command(
        root.path(),
        "again",
        &identity,
        2,
        &[admins[0].as_path(), admins[1].as_path()],
    );
    let (code, out, err) = submit(&again);
    assert_eq!(code, 1, "{out} {err}");
    assert!(
        format!("{out}{err}").contains("not_a_standby"),
        "{out} {err}"
    );
    for (k, original) in acked.iter().enumerate() {
        let (code, r) = new_primary.post(&body(k));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["tx_id"], original["tx_id"], "resend of order-{k}: {r}");
        assert_eq!(r["seq"], original["seq"], "resend of order-{k}: {r}");
    }
    let (code, r) = new_primary.post(&body(8));
    assert_eq!(code, 200, "{r}");
    assert!(r["seq"].as_u64() > acked[7]["seq"].as_u64(), "{r}");
    new_primary.stop();

    let verify_with = |dir: &Path, keys: &[&str]| {
        let mut c = Command::new(agent_exe());
        c.args(["verify", "--quiet", "--data-dir"]).arg(dir);
        for k in keys {
            c.args(["--public-key", k]);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = verify_with(&sdir, &[&identity, &promo_key]);
    assert!(ok, "{out}");
    assert!(out.contains("1 promotion"), "{out}");
    let (ok, out) = verify_with(&sdir, &[&identity]);
    assert!(
        !ok && out.contains("promotion signed by untrusted key"),
        "{out}"
    );
    let (ok, out) = verify(&pdir);
    assert!(ok, "{out}");
    let (a, b) = (
        store::open_read_only(&pdir, &StoreOptions::default()).unwrap(),
        store::open_read_only(&sdir, &StoreOptions::default()).unwrap(),
    );
    let from = promoted["from_group"].as_u64().unwrap();
    for g in 1..=from {
        assert_eq!(
            a.export_group(g).unwrap(),
            b.export_group(g).unwrap(),
            "group {g}"
        );
    }
}

/// Two admin key pairs (alice, bob) under `root`: their stems and public keys.
fn two_admins(root: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let stems: Vec<PathBuf> = ["alice", "bob"].iter().map(|n| root.join(n)).collect();
    for a in &stems {
        let (code, _, err) = common::mayfly(&["admin", "keygen", "--out", a.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
    let pubs = stems
        .iter()
        .map(|a| {
            std::fs::read_to_string(a.with_extension("pub"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    (stems, pubs)
}

/// A `[replication]` file: `role`, its own address setting, the peer, TLS of `me` pinning
/// `other`, and `extra` lines.
fn replication_conf(path: &Path, role: &str, lines: &str, me: &Pem, other: &Pem) {
    std::fs::write(
        path,
        format!(
            "[replication]\nrole = \"{role}\"\n{lines}[replication.tls]\ncert = {:?}\nkey = {:?}\npeer_pin = {:?}\n",
            me.cert, me.key, other.pin
        ),
    )
    .unwrap();
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fencing (issue 18, step 2) with real processes: an asynchronous primary A acknowledges
/// transactions its standby B never received (B was away); A is SIGKILLed; B is promoted
/// and serves as primary of epoch 1, probing A's address. A restarts with its old role and
/// probes B: it is fenced before it serves anything. It refuses transactions with 503
/// naming the epoch, shows `fenced` in /v1/health, audits `replication.fenced` with the
/// range it had not replicated, `dom0-agent unreplicated` lists exactly those records, and
/// a restart stays fenced. Then A re-joins as B's standby from an empty data directory
/// (pinning B's promotion key) and follows B across the promotion group: both ledgers
/// verify and B's ledger is A's new copy byte for byte.
#[test]
fn a_former_primary_that_comes_back_is_fenced_and_can_rejoin_as_standby() {
    let root = tempfile::tempdir().unwrap();
    let (adir, bdir) = (root.path().join("a"), root.path().join("b"));
    let (a_tls, b_tls) = (pem(root.path(), "a"), pem(root.path(), "b"));
    let (a_port, b_port) = (free_port(), free_port());
    let a_conf = root.path().join("a.toml");
    replication_conf(
        &a_conf,
        "primary",
        &format!(
            "listen = \"127.0.0.1:{a_port}\"\npeer = \"127.0.0.1:{b_port}\"\nmode = \"async\"\n"
        ),
        &a_tls,
        &b_tls,
    );
    let a_flags = ["--config", a_conf.to_str().unwrap()];
    let mut a = Agent::start(&adir, &a_flags);
    let identity = export_key(&adir);
    let (admins, pubs) = two_admins(root.path());
    let b_standby_conf = root.path().join("b-standby.toml");
    replication_conf(
        &b_standby_conf,
        "standby",
        &format!("peer = \"127.0.0.1:{a_port}\"\nprimary_identity = {identity:?}\n"),
        &b_tls,
        &a_tls,
    );
    let mut text = std::fs::read_to_string(&b_standby_conf).unwrap();
    text = format!("[console]\nadmin_keys = {pubs:?}\nquorum = 2\n{text}");
    std::fs::write(&b_standby_conf, text).unwrap();
    let body = |k: usize| {
        json!({"handler": "open_account", "payload": {"name": format!("acct{k}"), "balance": 5},
               "idempotency_key": format!("order-{k}")})
        .to_string()
    };
    let follower = standby(&b_standby_conf, &bdir);
    for k in 0..4 {
        let (code, r) = a.post(&body(k));
        assert_eq!(code, 200, "{r}");
    }
    wait_for("the standby to hold every group", || {
        health(&a)["lag_groups"] == 0
    });
    assert_eq!(stop(follower), 0);
    // Acknowledged by the asynchronous primary, never replicated.
    let lost: Vec<Value> = (4..7)
        .map(|k| {
            let (code, r) = a.post(&body(k));
            assert_eq!(code, 200, "{r}");
            r
        })
        .collect();
    let mut victim = a.child.take().unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();

    let (_, promoted) =
        promote_cosigned(root.path(), &b_standby_conf, &bdir, &identity, 1, &admins);
    let promo_key = promoted["promotion_key"].as_str().unwrap().to_string();
    let from_checkpoint = promoted["from_checkpoint"].as_u64().unwrap();
    let b_conf = root.path().join("b.toml");
    replication_conf(
        &b_conf,
        "primary",
        &format!(
            "listen = \"127.0.0.1:{b_port}\"\npeer = \"127.0.0.1:{a_port}\"\nmode = \"async\"\n"
        ),
        &b_tls,
        &a_tls,
    );
    let mut b = Agent::start(&bdir, &["--config", b_conf.to_str().unwrap()]);
    for k in 0..4 {
        let (code, r) = b.post(&body(k));
        assert_eq!(code, 200, "resend of a replicated key: {r}");
    }

    // A comes back with its old role: fenced before it serves.
    let mut a = Agent::start(&adir, &a_flags);
    let (code, r) = a.post(&body(9));
    assert_eq!(code, 503, "{r}");
    let reason = r["error"].as_str().unwrap();
    assert!(
        reason.contains("fenced") && reason.contains("epoch 1"),
        "{r}"
    );
    let (code, h) = a.get("/v1/health");
    assert_eq!(code, 200);
    assert_eq!(h["status"], "fenced", "{h}");
    assert_eq!(h["replication"]["state"], "fenced", "{h}");
    assert_eq!(
        h["replication"]["fenced"]["from_checkpoint"].as_u64(),
        Some(from_checkpoint),
        "{h}"
    );
    a.stop();
    let events = common::audit(&adir);
    let fenced: Vec<_> = events
        .iter()
        .filter(|(e, _)| e == "replication.fenced")
        .collect();
    assert!(!fenced.is_empty(), "no replication.fenced record");
    let last_lost = lost.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(
        fenced[0]
            .1
            .get("unreplicated_checkpoints")
            .map(String::as_str),
        Some(format!("{}..={last_lost}", from_checkpoint + 1).as_str()),
        "{fenced:?}"
    );
    // The records B never received, listed (and still in A's ledger).
    let out = Command::new(agent_exe())
        .args(["unreplicated", "--data-dir"])
        .arg(&adir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let listed: Vec<&Value> = lines.iter().filter(|l| l.get("seq").is_some()).collect();
    assert_eq!(listed.len(), lost.len(), "{lines:?}");
    for (l, r) in listed.iter().zip(&lost) {
        assert_eq!(l["seq"], r["seq"], "{l}");
    }
    // A restart without the peer answering stays fenced (the marker).
    b.stop();
    let mut again = Agent::start(&adir, &a_flags);
    let (code, r) = again.post(&body(10));
    assert_eq!(code, 503, "{r}");
    again.stop();

    // Re-join: A's old directory is kept aside; A follows B from an empty one.
    let mut b = Agent::start(&bdir, &["--config", b_conf.to_str().unwrap()]);
    let (code, r) = b.post(&body(11));
    assert_eq!(code, 200, "{r}");
    let a_new = root.path().join("a-rejoined");
    let a_standby_conf = root.path().join("a-standby.toml");
    replication_conf(
        &a_standby_conf,
        "standby",
        &format!(
            "peer = \"127.0.0.1:{b_port}\"\nprimary_identity = {identity:?}\npromotion_keys = [{promo_key:?}]\n"
        ),
        &a_tls,
        &b_tls,
    );
    let follower = standby(&a_standby_conf, &a_new);
    wait_for("the re-joined standby to catch up", || {
        let h = health(&b);
        h["standby"].is_string() && h["lag_groups"] == 0
    });
    assert_eq!(stop(follower), 0);
    b.stop();
    let verify_with = |dir: &Path| {
        let out = Command::new(agent_exe())
            .args([
                "verify",
                "--quiet",
                "--public-key",
                &identity,
                "--public-key",
                &promo_key,
                "--data-dir",
            ])
            .arg(dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    for dir in [&bdir, &a_new] {
        let (ok, out) = verify_with(dir);
        assert!(ok, "{}: {out}", dir.display());
    }
    let (ok, out) = verify(&adir);
    assert!(ok, "the fenced ledger itself: {out}");
    let (x, y) = (
        store::open_read_only(&bdir, &StoreOptions::default()).unwrap(),
        store::open_read_only(&a_new, &StoreOptions::default()).unwrap(),
    );
    let last = y.last_group().unwrap();
    assert!(last > promoted["group"].as_u64().unwrap());
    for g in 1..=last {
        assert_eq!(
            x.export_group(g).unwrap(),
            y.export_group(g).unwrap(),
            "group {g}"
        );
    }
}

/// What [`kill_promote_rejoin`] saw.
struct Rounds {
    /// Transfers acknowledged.
    acked: usize,
    /// Acknowledged transfers missing from the promoted standby, per kill.
    lost_per_kill: Vec<usize>,
    /// Wall time of the whole run.
    elapsed: Duration,
    /// Promotions that applied a tentative group from the standby's journal (a group the
    /// killed primary shipped before its own commit and never confirmed).
    tentative_applied: usize,
}

/// The must-show run: 8 clients send transfers with idempotency keys to the
/// primary of a pair; `kills` times the primary is SIGKILLed at a random point, the
/// standby is stopped and promoted by a co-signed `promote` command, starts serving as
/// primary of the next epoch, and the former primary re-joins as its standby from an
/// empty data directory; clients resend every unanswered request to the new primary.
/// After each kill it counts the acknowledged transfers missing from the promoted copy;
/// at the end it checks that no key ran twice (balances against acknowledgements minus
/// what was lost), that both final ledgers and every fenced former primary verify, and
/// that every ledger of the run is a byte-identical prefix of the final one up to where
/// it was promoted from.
fn kill_promote_rejoin(mode: &str, kills: usize, seed: u64) -> Rounds {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const CLIENTS: usize = 8;
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let nodes = [pem(root.path(), "x"), pem(root.path(), "y")];
    let ports = [free_port(), free_port()];
    let (admins, pubs) = two_admins(root.path());
    let conf = |node: usize, role: &str, extra: &str| {
        let path = root
            .path()
            .join(format!("{role}-{node}-{}.toml", fastrand::u64(..)));
        let lines = if role == "primary" {
            format!(
                "listen = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\nmode = \"{mode}\"\nsync_timeout_ms = 3000\n",
                ports[node],
                ports[1 - node]
            )
        } else {
            format!("peer = \"127.0.0.1:{}\"\n{extra}", ports[1 - node])
        };
        replication_conf(&path, role, &lines, &nodes[node], &nodes[1 - node]);
        if role == "standby" {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(
                &path,
                format!("[console]\nadmin_keys = {pubs:?}\nquorum = 2\n{text}"),
            )
            .unwrap();
        }
        path
    };
    // Node 0 starts as primary, node 1 as its standby.
    let mut dirs = [root.path().join("x-0"), root.path().join("y-0")];
    let mut primary_node = 0;
    let pconf = conf(0, "primary", "");
    let primary = Agent::start(&dirs[0], &["--config", pconf.to_str().unwrap()]);
    let identity = export_key(&dirs[0]);
    let mut promotion_keys: Vec<String> = Vec::new();
    let standby_extra =
        |keys: &[String]| format!("primary_identity = {identity:?}\npromotion_keys = {keys:?}\n");
    let mut follower = standby(&conf(1, "standby", &standby_extra(&[])), &dirs[1]);
    wait_state(
        &primary,
        if mode == "sync" {
            "synchronous"
        } else {
            "asynchronous"
        },
    );
    wait_for("the first standby", || {
        health(&primary)["standby"].is_string()
    });
    for t in 0..CLIENTS {
        for (name, balance) in [(format!("s{t}"), 1_000_000), (format!("c{t}"), 0)] {
            let (code, r) = primary.tx("open_account", json!({"name": name, "balance": balance}));
            assert_eq!(code, 200, "{r}");
        }
    }
    let addr = Arc::new(Mutex::new(Some(primary.addr)));
    let stopping = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let clients = transfer_clients(CLIENTS, &addr, &stopping, &acked);

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut primary = Some(primary);
    let mut lost_per_kill = Vec::new();
    let mut tentative_applied = 0usize;
    let mut lost_total: Vec<(usize, String)> = Vec::new();
    // (a former primary's directory, the group its successor was promoted from)
    let mut history: Vec<(PathBuf, u64)> = Vec::new();
    for round in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.u64(150..700)));
        let mut victim = primary.take().unwrap();
        let mut child = victim.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        *addr.lock().unwrap() = None;
        let snapshot = acked.lock().unwrap().clone();
        assert!(
            !snapshot.is_empty(),
            "round {round}: no load before the kill"
        );
        let standby_node = 1 - primary_node;
        assert_eq!(stop(follower), 0, "round {round}");
        let epoch = round as u64 + 1;
        let cmd = promote_command(
            root.path(),
            &format!("promote-{epoch}.cmd"),
            &identity,
            epoch,
            &[&admins[0], &admins[1]],
        );
        let sdir = dirs[standby_node].clone();
        let (code, out, err) = promote(
            &conf(standby_node, "standby", &standby_extra(&promotion_keys)),
            &sdir,
            &["--command", cmd.to_str().unwrap()],
        );
        assert_eq!(code, 0, "round {round}: {err}");
        let promoted: Value = serde_json::from_str(&out).unwrap();
        if promoted["tentative_group_applied"].is_u64() {
            tentative_applied += 1;
            assert!(err.contains("including tentative group"), "{err}");
        }
        promotion_keys.push(promoted["promotion_key"].as_str().unwrap().to_string());
        history.push((
            dirs[primary_node].clone(),
            promoted["from_group"].as_u64().unwrap(),
        ));
        // What was acknowledged and is not on the promoted copy is lost.
        {
            let copy = store::open_read_only(&sdir, &StoreOptions::default()).unwrap();
            let lost: Vec<(usize, String)> = snapshot
                .iter()
                .filter(|(_, id, _)| {
                    // Lost at an earlier kill: counted there.
                    !lost_total.iter().any(|(_, l)| l == id)
                        && copy
                            .seq_of(&mayfly_ledger::TxId::parse(id).unwrap())
                            .unwrap()
                            .is_none()
                })
                .map(|(t, id, _)| (*t, id.clone()))
                .collect();
            lost_per_kill.push(lost.len());
            lost_total.extend(lost);
        }
        let pconf = conf(standby_node, "primary", "");
        let new_primary = Agent::start(&sdir, &["--config", pconf.to_str().unwrap()]);
        // The former primary re-joins from an empty directory.
        let fresh = root
            .path()
            .join(format!("{}-{}", ["x", "y"][primary_node], round + 1));
        follower = standby(
            &conf(primary_node, "standby", &standby_extra(&promotion_keys)),
            &fresh,
        );
        dirs[primary_node] = fresh;
        primary_node = standby_node;
        // The next kill comes only once the re-joined standby holds everything (and, in
        // sync mode, the primary is synchronous again after its start).
        *addr.lock().unwrap() = None;
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            let h = health(&new_primary);
            let state = if mode == "sync" {
                "synchronous"
            } else {
                "asynchronous"
            };
            if h["standby"].is_string() && h["lag_groups"] == 0 && h["state"] == state {
                break;
            }
            assert!(
                Instant::now() < end,
                "round {round}: the re-joined standby: {h}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Clients (retrying meanwhile) reach the new primary once it is synchronous: a
        // primary degraded under full load does not catch up (docs/failover.md).
        *addr.lock().unwrap() = Some(new_primary.addr);
        primary = Some(new_primary);
    }
    std::thread::sleep(Duration::from_millis(300));
    stopping.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let mut primary = primary.unwrap();
    let acked = acked.lock().unwrap().clone();
    for t in 0..CLIENTS {
        let (code, r) = primary.tx("balance", json!({"name": format!("c{t}")}));
        assert_eq!(code, 200, "{r}");
        let done = acked.iter().filter(|(c, _, _)| *c == t).count();
        let lost = lost_total.iter().filter(|(c, _)| *c == t).count();
        assert_eq!(
            r["result"]["balance"].as_u64(),
            Some((done - lost) as u64),
            "client {t}: a key executed twice, or an acknowledged transfer lost beyond those counted"
        );
    }
    assert_eq!(stop(follower), 0);
    primary.stop();
    let final_primary = dirs[primary_node].clone();
    let verify_all = |dir: &Path| {
        let mut c = Command::new(agent_exe());
        c.args(["verify", "--quiet", "--public-key", &identity]);
        for k in &promotion_keys {
            c.args(["--public-key", k]);
        }
        let out = c.arg("--data-dir").arg(dir).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let last = store::open_read_only(&final_primary, &StoreOptions::default()).unwrap();
    for dir in [&final_primary, &dirs[1 - primary_node]] {
        let (ok, out) = verify_all(dir);
        assert!(ok, "{}: {out}", dir.display());
    }
    let standby_copy =
        store::open_read_only(&dirs[1 - primary_node], &StoreOptions::default()).unwrap();
    for g in 1..=standby_copy.last_group().unwrap() {
        assert_eq!(
            last.export_group(g).unwrap(),
            standby_copy.export_group(g).unwrap(),
            "group {g}"
        );
    }
    for (dir, from) in &history {
        let (ok, out) = verify_all(dir);
        assert!(ok, "{}: {out}", dir.display());
        let old = store::open_read_only(dir, &StoreOptions::default()).unwrap();
        // The promoted copy may end with one group more than its former primary holds:
        // a group shipped before the primary's own commit, which the SIGKILL beat (the
        // journal's tentative tail, applied by the promotion; docs/failover.md).
        let old_last = old.last_group().unwrap();
        assert!(
            old_last.saturating_add(1) >= *from,
            "{} ends at group {old_last}, the promotion took {from}",
            dir.display()
        );
        for g in 1..=(*from).min(old_last) {
            assert_eq!(
                old.export_group(g).unwrap(),
                last.export_group(g).unwrap(),
                "{} group {g}",
                dir.display()
            );
        }
    }
    Rounds {
        acked: acked.len(),
        lost_per_kill,
        elapsed: started.elapsed(),
        tentative_applied,
    }
}

/// Synchronous mode: 20 kills, 20 promotions, 20 re-joins; nothing acknowledged is lost
/// and nothing runs twice.
#[test]
fn twenty_sigkills_with_promotion_lose_nothing_acknowledged_in_sync_mode() {
    let r = kill_promote_rejoin("sync", 20, 18);
    assert_eq!(
        r.lost_per_kill.iter().sum::<usize>(),
        0,
        "{:?}",
        r.lost_per_kill
    );
    println!(
        "sync: {} acknowledged transfers across 20 SIGKILLs and promotions, 0 lost, in {:.1?}; {} promotions applied a tentative group from the journal",
        r.acked, r.elapsed, r.tentative_applied
    );
}

/// Asynchronous mode: the loss window, measured (acknowledged transfers missing from the
/// promoted standby at each kill); nothing runs twice.
#[test]
fn the_async_loss_window_across_sigkills_and_promotions_is_measured() {
    let r = kill_promote_rejoin("async", 20, 19);
    let lost: usize = r.lost_per_kill.iter().sum();
    println!(
        "async: {} acknowledged transfers across 20 SIGKILLs and promotions, {lost} lost (per kill: {:?}, max {}), in {:.1?}",
        r.acked,
        r.lost_per_kill,
        r.lost_per_kill.iter().max().unwrap_or(&0),
        r.elapsed
    );
}

/// The `[siem]` section the SIEM continuity test gives primary and standby alike: one TCP
/// collector `tcp`, fast confirmation, a cursor kept at most every 1.5 s (so that some
/// records are delivered after the last cursor a failover inherits).
fn siem_section(address: &str) -> String {
    format!(
        "[siem]\npen = 32473\nhostname = \"mayfly-pair\"\nconfirm_ms = 100\nbackoff_min_ms = 20\nbackoff_max_ms = 300\ncursor_flush_ms = 1500\n[[siem.collector]]\nname = \"tcp\"\ntransport = \"tcp\"\naddress = \"{address}\"\n"
    )
}

/// SIEM continuity across a failover (issue 18, must-show): a TCP collector (a private
/// rsyslog) is configured on a synchronous primary and on its standby alike; the primary
/// exports while it runs transactions, ships its exporter cursor to the standby, and is
/// SIGKILLed; the standby is promoted by a co-signed command and serves; its exporter
/// resumes right after the cursor it inherited (not from the start, not from the tip);
/// more transactions. The collector then holds every audit record of the whole history,
/// primary part and promoted part, in order: deduplicated by sequence (a duplicate
/// carries byte-identical structured data), the sequences run from 1 to the final tip
/// without a gap, and each record's hash is the final ledger's.
#[test]
fn siem_export_continues_from_the_replicated_cursor_after_a_promotion() {
    use rsyslog::{assert_complete_in_order, seq_of, wait_until, Input, Rsyslog};
    let root = tempfile::tempdir().unwrap();
    let collector = Rsyslog::start(&root.path().join("rsyslog"), &[Input::Tcp], None);
    let siem = siem_section(&collector.address(Input::Tcp));
    let (p, s) = (pem(root.path(), "primary"), pem(root.path(), "standby"));
    let port = free_port();
    let pconf = primary_conf(root.path(), port, 5000, &p, &s);
    let mut pair = siem_pair(root.path(), &pconf, &siem, port, &p, &s);
    let (primary, sdir) = (&mut pair.primary, pair.sdir.clone());
    wait_state(primary, "synchronous");
    open_accounts(primary);
    transfers(primary, 10);
    // The collector has the primary's records so far and the standby was sent a cursor
    // that covers them ...
    let (_, h) = primary.get("/v1/health");
    let first_part = h["ledger"]["audit_seq"].as_u64().unwrap();
    let shipped = |agent: &Agent| {
        let (_, h) = agent.get("/v1/health");
        h["replication"]["shipped_cursors"]["tcp"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_for("the cursor shipped to the standby", || {
        shipped(primary) >= first_part
    });
    // ... then more records, some of them delivered after the last shipped cursor.
    transfers(primary, 10);
    wait_for("the standby to hold every group", || {
        let h = health(primary);
        h["lag_groups"] == 0 && h["state"] == "synchronous"
    });
    let mut victim = primary.child.take().unwrap();
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    assert_eq!(stop(pair.follower.take().unwrap()), 0);

    // The copy holds the primary's cursor, never past its own audit tip.
    let (inherited, copy_tip) = {
        let copy = store::open_read_only(&sdir, &StoreOptions::default()).unwrap();
        let tip = copy
            .audit_records(1, usize::MAX)
            .unwrap()
            .last()
            .unwrap()
            .seq;
        (copy.cursor("tcp").unwrap(), tip)
    };
    let inherited = inherited.expect("the standby holds the primary's cursor for `tcp`");
    assert!(
        inherited >= first_part && inherited <= copy_tip,
        "{inherited}: not in {first_part}..={copy_tip}"
    );

    let mut promoted = promote_and_serve(root.path(), &pair, &siem);
    let promoted_pid = promoted.child.as_ref().unwrap().id().to_string();
    transfers(&promoted, 10);
    let status = promoted.stop(); // SIGTERM: `agent.stopped` is exported before it exits
    assert!(status.success(), "{status}");

    let recs = audit_records(&sdir);
    let tip = recs.last().unwrap().seq;
    assert_eq!(recs.last().unwrap().event.event, "agent.stopped");
    assert!(
        wait_until(Duration::from_secs(30), || collector
            .received(Input::Tcp)
            .iter()
            .any(|m| seq_of(m) == tip)),
        "the collector never got seq {tip}"
    );
    let got = collector.received(Input::Tcp);
    let seqs: Vec<u64> = got.iter().map(seq_of).collect();
    assert_complete_in_order("tcp", &seqs, tip);
    // The promoted node's exporter started right after the cursor it inherited.
    let first_promoted = got
        .iter()
        .find(|m| m["procid"] == promoted_pid.as_str())
        .map(seq_of)
        .expect("messages from the promoted node");
    assert_eq!(
        first_promoted,
        inherited + 1,
        "the promoted exporter did not resume at the replicated cursor {inherited}"
    );
    // Deduplicated by sequence: the first appearance is kept; a duplicate is the same
    // record (byte-identical structured data); every record of the final ledger, whose
    // prefix is the primary's history, is there with its hash.
    let mut first: std::collections::BTreeMap<u64, String> = std::collections::BTreeMap::new();
    let mut duplicates = 0;
    for m in &got {
        let sd = m["structured-data"].as_str().unwrap().to_string();
        match first.entry(seq_of(m)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(sd);
            }
            std::collections::btree_map::Entry::Occupied(o) => {
                duplicates += 1;
                assert_eq!(o.get(), &sd, "seq {} arrived twice, differently", o.key());
            }
        }
    }
    assert_eq!(
        first.keys().copied().collect::<Vec<_>>(),
        (1..=tip).collect::<Vec<_>>(),
        "gap in the collector's sequence"
    );
    for r in &recs {
        let hash = mayfly_ledger::codec::hex(&mayfly_ledger::checkpoint::chain_hash(
            &r.prev_hash,
            &r.encode(),
        ));
        assert!(
            first[&r.seq].contains(&format!("hash=\"{hash}\"")),
            "seq {}: {}",
            r.seq,
            first[&r.seq]
        );
    }
    eprintln!(
        "siem continuity: {tip} records, inherited cursor {inherited} of the copy's {copy_tip}, {duplicates} duplicates"
    );
}

/// The standby's copy in `sdir` holds at least `durable` groups, each byte-identical to
/// the primary's in `pdir`.
fn copy_holds(pdir: &Path, sdir: &Path, durable: u64) {
    let copy = store::open_read_only(sdir, &StoreOptions::default()).unwrap();
    let original = store::open_read_only(pdir, &StoreOptions::default()).unwrap();
    let mut last = copy.last_group().unwrap();
    for g in 1..=last {
        assert_eq!(
            original.export_group(g).unwrap(),
            copy.export_group(g).unwrap(),
            "group {g}"
        );
    }
    // A last group acknowledged but not yet confirmed when the standby stopped stays in
    // its journal (tentative): it is the primary's too.
    let (entries, _) = mayfly_replica::journal::Journal::read(sdir).unwrap();
    for e in entries {
        if let mayfly_replica::journal::Entry::Group { records, .. } = e {
            let g = mayfly_ledger::SignedHead::decode(&records.head)
                .unwrap()
                .group;
            if g == last + 1 {
                assert_eq!(
                    original.export_group(g).unwrap(),
                    records,
                    "journaled group {g}"
                );
                last = g;
            }
        }
    }
    assert!(
        last >= durable,
        "copy at group {last}, primary acked {durable}"
    );
}

/// A network namespace holding one end of a veth pair whose other end is in the test's
/// namespace: `host` (x.x.x.1) here, `peer_ip` (x.x.x.2) inside. Deleted (with the veth)
/// on drop.
struct Netns {
    name: String,
    link: String,
    host: String,
    peer_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// `None` (and a message saying why) where namespaces cannot be made: no `ip`, not root.
    fn create() -> Option<Self> {
        if !Path::new("/usr/sbin/ip").exists() && !Path::new("/sbin/ip").exists() {
            eprintln!("SKIPPED: `ip` (iproute2) is not installed; scripts/lib.sh installs it");
            return None;
        }
        let tag = std::process::id() % 100_000;
        let subnet = 16 + (tag % 200);
        let ns = Self {
            name: format!("mfly{tag}"),
            link: format!("mfh{tag}"),
            host: format!("10.77.{subnet}.1"),
            peer_ip: format!("10.77.{subnet}.2"),
        };
        let inner = format!("mfs{tag}");
        if let Err(e) = ip(&["netns", "add", &ns.name]) {
            eprintln!("SKIPPED: cannot make a network namespace (root needed): {e}");
            return None;
        }
        let (host_cidr, peer_cidr) = (format!("{}/30", ns.host), format!("{}/30", ns.peer_ip));
        let steps: [&[&str]; 6] = [
            &[
                "link", "add", &ns.link, "type", "veth", "peer", "name", &inner, "netns", &ns.name,
            ],
            &["addr", "add", &host_cidr, "dev", &ns.link],
            &["link", "set", &ns.link, "up"],
            &["-n", &ns.name, "addr", "add", &peer_cidr, "dev", &inner],
            &["-n", &ns.name, "link", "set", &inner, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step).unwrap();
        }
        Some(ns)
    }

    /// Cuts (`false`) or restores (`true`) the link: packets are dropped without a reset.
    fn link(&self, up: bool) {
        ip(&["link", "set", &self.link, if up { "up" } else { "down" }]).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A network partition (issue 18 "Bad input and faults"), in network namespaces: the
/// standby runs in its own namespace, joined to the primary's by a veth pair. The link is
/// cut while the synchronous primary serves: every transaction is still answered (the
/// first within the sync bound), the primary degrades to asynchronous and audits it, and
/// its heartbeat notices the silent standby (`replication.peer_lost`, `peer_lost` in
/// /v1/health). The link comes back: the standby reconnects, catches up, the primary is
/// synchronous again (`replication.synchronous`, `replication.peer_back`), the standby's
/// own audit has `replication.peer_lost`, and it holds every acknowledged group; both
/// ledgers verify.
#[test]
fn a_network_partition_degrades_the_synchronous_primary_and_it_recovers_when_healed() {
    let Some(net) = Netns::create() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (pdir, sdir) = (root.path().join("primary"), root.path().join("standby"));
    let (p, s) = (pem(root.path(), "primary"), pem(root.path(), "standby"));
    let port = free_port();
    let pconf = root.path().join("primary.toml");
    replication_conf(
        &pconf,
        "primary",
        &format!(
            "listen = \"{}:{port}\"\nmode = \"sync\"\nsync_timeout_ms = 1500\nheartbeat_ms = 200\nheartbeat_misses = 5\n",
            net.host
        ),
        &p,
        &s,
    );
    let admin = root.path().join("admin");
    let (code, _, err) = common::mayfly(&["admin", "keygen", "--out", admin.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let admin_pub = admin.with_extension("pub");
    let mut primary = Agent::start(
        &pdir,
        &[
            "--config",
            pconf.to_str().unwrap(),
            "--admin-key",
            admin_pub.to_str().unwrap(),
            "--admin-quorum",
            "1",
        ],
    );
    let identity = export_key(&pdir);
    let sconf = root.path().join("standby.toml");
    replication_conf(
        &sconf,
        "standby",
        &format!(
            "peer = \"{}:{port}\"\nprimary_identity = {identity:?}\nheartbeat_ms = 200\nheartbeat_misses = 5\n",
            net.host
        ),
        &s,
        &p,
    );
    let follower = StandbyProc(Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.name,
                agent_exe(),
                "standby",
                "--config",
            ])
            .arg(&sconf)
            .arg("--data-dir")
            .arg(&sdir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    ));
    wait_state(&primary, "synchronous");
    let open = |agent: &Agent, k: usize| {
        let started = Instant::now();
        let (code, r) = agent.tx(
            "open_account",
            json!({"name": format!("acct{k}"), "balance": 5}),
        );
        assert_eq!(code, 200, "{r}");
        started.elapsed()
    };
    for k in 0..5 {
        open(&primary, k);
    }
    wait_for("the standby to hold every group", || {
        health(&primary)["lag_groups"] == 0
    });
    assert!(health(&primary)["standby"]
        .as_str()
        .unwrap()
        .starts_with(&net.peer_ip));

    net.link(false);
    // The primary keeps serving: the first commit waits at most the sync bound, then the
    // primary is degraded and the rest do not wait.
    let first = open(&primary, 5);
    assert!(
        first < Duration::from_millis(1500 + 3000),
        "first commit took {first:?}"
    );
    let h = wait_state(&primary, "degraded");
    assert!(
        h["degraded_reason"]
            .as_str()
            .unwrap()
            .contains("did not confirm"),
        "{h}"
    );
    for k in 6..15 {
        let took = open(&primary, k);
        assert!(
            took < Duration::from_millis(1500),
            "commit {k} took {took:?}"
        );
    }
    wait_for("the primary to lose the silent standby", || {
        health(&primary)["peer_lost"]
            .as_str()
            .is_some_and(|r| r.contains("nothing from the standby"))
    });
    // The operator sees the same through the signed console's `status`.
    let console_status = |json: bool| {
        let socket = pdir.join("admin.sock");
        let key = admin.with_extension("key");
        let mut args = vec![
            "admin",
            "status",
            "--socket",
            socket.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        let (code, out, err) = common::mayfly(&args);
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let status: Value = serde_json::from_str(&console_status(true)).unwrap();
    let repl = &status["result"]["replication"];
    assert_eq!(repl["state"], "degraded", "{status}");
    assert!(
        repl["peer_lost"]
            .as_str()
            .is_some_and(|r| r.contains("nothing from the standby")),
        "{status}"
    );
    let table = console_status(false);
    assert!(
        table.contains("replication   degraded (sync mode)") && table.contains("peer lost: "),
        "{table}"
    );

    net.link(true);
    let h = wait_state(&primary, "synchronous");
    assert_eq!(h["peer_lost"], Value::Null, "{h}");
    wait_for("the standby to catch up", || {
        health(&primary)["lag_groups"] == 0
    });
    for k in 15..18 {
        open(&primary, k);
    }
    assert_eq!(health(&primary)["state"], "synchronous");
    let durable = health(&primary)["durable_group"].as_u64().unwrap();
    wait_for("the standby to hold every group", || {
        health(&primary)["acked_group"].as_u64() == Some(durable)
    });
    assert_eq!(stop(follower), 0);
    primary.stop();

    let events =
        |dir: &Path| -> Vec<String> { common::audit(dir).into_iter().map(|(e, _)| e).collect() };
    let p_events = events(&pdir);
    let at = |name: &str| p_events.iter().position(|e| e == name);
    let (degraded, lost, back, sync) = (
        at("replication.degraded").expect("replication.degraded"),
        at("replication.peer_lost").expect("replication.peer_lost"),
        at("replication.peer_back").expect("replication.peer_back"),
        p_events
            .iter()
            .rposition(|e| e == "replication.synchronous")
            .expect("replication.synchronous"),
    );
    assert!(degraded < sync && lost < back, "{p_events:?}");
    let s_events = events(&sdir.join("standby-audit"));
    assert!(
        s_events.iter().any(|e| e == "replication.peer_lost"),
        "{s_events:?}"
    );
    copy_holds(&pdir, &sdir, durable);
    let (ok, out) = verify(&pdir);
    assert!(ok, "{out}");
}

/// A small tmpfs mounted for a test; unmounted on drop (after the processes using it,
/// which are declared after it and so dropped first).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (and a message) where it cannot be mounted (not root).
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs (root needed)");
            return None;
        }
        Some(Self(at.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A disk-full standby (issue 18 "Bad input and faults"): the standby's data directory is
/// on a small tmpfs, filled up while a synchronous primary serves. The standby cannot
/// store the next group: it stops applying it (nothing half-written) and tells the primary
/// why; the primary keeps answering every transaction (it degrades within its bound) and
/// audits the standby's reason; nothing it acknowledged is lost. Space returns: the
/// standby catches up and the primary is synchronous again, with the copy identical to
/// the primary's ledger.
#[test]
fn a_disk_full_standby_stops_applying_and_the_synchronous_primary_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&root.path().join("standby-fs"), "8m") else {
        return;
    };
    let (pdir, sdir) = (root.path().join("primary"), fs.0.join("standby"));
    let (p, s) = (pem(root.path(), "primary"), pem(root.path(), "standby"));
    let port = free_port();
    let pconf = primary_conf(root.path(), port, 1000, &p, &s);
    let mut primary = Agent::start(&pdir, &["--config", pconf.to_str().unwrap()]);
    let identity = export_key(&pdir);
    let sconf = standby_conf(root.path(), port, &identity, "", &s, &p);
    let follower = standby(&sconf, &sdir);
    wait_state(&primary, "synchronous");
    let mut acked = Vec::new();
    let mut open = |agent: &Agent, k: usize| {
        let (code, r) = agent.tx(
            "open_account",
            json!({"name": format!("acct{k}-{}", "x".repeat(50)), "balance": 5}),
        );
        assert_eq!(code, 200, "{r}");
        acked.push(r["seq"].as_u64().unwrap());
    };
    for k in 0..3 {
        open(&primary, k);
    }
    wait_for("the standby to hold every group", || {
        health(&primary)["lag_groups"] == 0
    });
    // Fill the standby's filesystem to the last block.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(fs.0.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while filler.write_all(&chunk).is_ok() {}
    }
    // The primary goes on answering; the standby soon cannot store a group.
    let mut k = 3;
    while health(&primary)["state"] == "synchronous" {
        assert!(k < 400, "the standby never ran out of space");
        open(&primary, k);
        k += 1;
    }
    let h = wait_state(&primary, "degraded");
    for j in k..k + 5 {
        open(&primary, j);
    }
    let acked_while_full = health(&primary)["durable_group"].as_u64().unwrap();
    assert!(h["acked_group"].as_u64().unwrap() < acked_while_full, "{h}");

    // Space returns: the standby catches up, the primary is synchronous again.
    fs.resize("64m");
    wait_state(&primary, "synchronous");
    open(&primary, k + 5);
    let durable = health(&primary)["durable_group"].as_u64().unwrap();
    wait_for("the standby to hold every group", || {
        health(&primary)["acked_group"].as_u64() == Some(durable)
    });
    assert_eq!(stop(follower), 0);
    primary.stop();

    let p_audit = common::audit(&pdir);
    let refusal = p_audit
        .iter()
        .find(|(e, f)| {
            e == "replication.standby_disconnected"
                && f.get("reason").is_some_and(|r| r.contains("storing group"))
        })
        .unwrap_or_else(|| panic!("no audited refusal: {p_audit:?}"));
    assert!(
        refusal.1["reason"].contains("space") || refusal.1["reason"].contains("full"),
        "{refusal:?}"
    );
    assert!(p_audit.iter().any(|(e, _)| e == "replication.degraded"));
    // The standby's own audit could not be written while its disk was full; the outage is
    // recorded there once space returned.
    let s_audit = common::audit(&sdir.join("standby-audit"));
    assert!(
        s_audit.iter().any(|(e, _)| e == "ledger.storage_full"),
        "{s_audit:?}"
    );
    // Nothing acknowledged is lost on the primary, and the copy is the primary's ledger.
    let original = store::open_read_only(&pdir, &StoreOptions::default()).unwrap();
    for seq in &acked {
        assert!(
            original.checkpoint(*seq).unwrap().is_some(),
            "acknowledged checkpoint {seq} missing"
        );
    }
    drop(original);
    // (The primary's own stop adds a group or two after the standby stopped.)
    copy_holds(&pdir, &sdir, durable);
    let (ok, out) = verify(&pdir);
    assert!(ok, "{out}");
    eprintln!(
        "disk-full standby: {} acknowledged, refusal: {}",
        acked.len(),
        refusal.1["reason"]
    );
}

/// One message as the collector stored it: (seq, hash, marked `unreplicated="true"`,
/// event, PROCID).
fn chain_element(m: &Value) -> (u64, String, bool, String, String) {
    let chain = rsyslog::chain_element(m);
    (
        rsyslog::seq_of(m),
        chain.param("hash").unwrap().to_string(),
        rsyslog::unreplicated(m),
        chain.param("event").unwrap().to_string(),
        m["procid"].as_str().unwrap_or_default().to_string(),
    )
}

/// A primary and its standby for the SIEM tests: the primary runs `serve` with `pconf`
/// (the `siem` section put in front of it); the standby follows it with the same `siem`
/// section and a console of two admins (for its promotion).
struct SiemPair {
    primary: Agent,
    follower: Option<StandbyProc>,
    pdir: PathBuf,
    sdir: PathBuf,
    identity: String,
    admins: Vec<PathBuf>,
    console: String,
    sconf: PathBuf,
}

fn siem_pair(root: &Path, pconf: &Path, siem: &str, port: u16, p: &Pem, s: &Pem) -> SiemPair {
    let (pdir, sdir) = (root.join("primary"), root.join("standby"));
    let text = std::fs::read_to_string(pconf).unwrap();
    std::fs::write(pconf, format!("{siem}{text}")).unwrap();
    let primary = Agent::start(&pdir, &["--config", pconf.to_str().unwrap()]);
    let identity = export_key(&pdir);
    let (admins, pubs) = two_admins(root);
    let console = format!("[console]\nadmin_keys = {pubs:?}\nquorum = 2\n");
    let sconf = standby_conf(root, port, &identity, &format!("{console}{siem}"), s, p);
    let follower = Some(standby(&sconf, &sdir));
    SiemPair {
        primary,
        follower,
        pdir,
        sdir,
        identity,
        admins,
        console,
        sconf,
    }
}

/// Promotes the pair's (stopped) standby with a co-signed command and serves it with the
/// same `siem` section, without replication.
fn promote_and_serve(root: &Path, pair: &SiemPair, siem: &str) -> Agent {
    promote_cosigned(
        root,
        &pair.sconf,
        &pair.sdir,
        &pair.identity,
        1,
        &pair.admins,
    );
    let nconf = root.join("promoted.toml");
    std::fs::write(&nconf, format!("{}{siem}", pair.console)).unwrap();
    Agent::start(&pair.sdir, &["--config", nconf.to_str().unwrap()])
}

fn open_accounts(agent: &Agent) {
    for (name, balance) in [("alice", 1000), ("bob", 0)] {
        let (code, body) = agent.tx("open_account", json!({"name": name, "balance": balance}));
        assert_eq!(code, 200, "{body}");
    }
}

/// Every audit record of the (closed) ledger in `dir`.
fn audit_records(dir: &Path) -> Vec<mayfly_ledger::AuditRecord> {
    store::open_read_only(dir, &StoreOptions::default())
        .unwrap()
        .audit_records(1, usize::MAX)
        .unwrap()
}

/// The first collector of `agent`'s `siem` health section.
fn siem_health(agent: &Agent) -> Value {
    let (code, body) = agent.get("/v1/health");
    assert_eq!(code, 200, "{body}");
    body["siem"][0].clone()
}

/// SIEM without reused sequence numbers (issue 18, item 5): an **asynchronous** primary
/// with a TCP collector (a private rsyslog) and `unreplicated_hold_ms = 4000`; its standby
/// follows, then is stopped, and the primary goes on committing. Its exporter sends nothing
/// past what the standby holds until the records have waited the hold; then it records
/// `siem.export_unreplicated` and sends them marked `unreplicated="true"`. The primary is
/// SIGKILLed, the standby promoted and serving, and it writes *other* records under the
/// sequences the primary had sent ahead. At the collector: every sequence that arrived
/// with two different hashes arrived marked the first time, every unmarked message is the
/// final ledger's record (same `seq`, same `hash`), every record of the final ledger is
/// there unmarked, and the primary's `siem.export_unreplicated` is there too.
#[test]
fn siem_never_sends_unmarked_records_the_promoted_standby_does_not_hold() {
    let root = tempfile::tempdir().unwrap();
    let collector =
        rsyslog::Rsyslog::start(&root.path().join("rsyslog"), &[rsyslog::Input::Tcp], None);
    let siem = siem_section(&collector.address(rsyslog::Input::Tcp))
        .replace("[siem]\n", "[siem]\nunreplicated_hold_ms = 4000\n");
    let (p, s) = (pem(root.path(), "primary"), pem(root.path(), "standby"));
    let port = free_port();
    let pconf = root.path().join("primary.toml");
    replication_conf(
        &pconf,
        "primary",
        &format!("listen = \"127.0.0.1:{port}\"\nmode = \"async\"\n"),
        &p,
        &s,
    );
    let mut pair = siem_pair(root.path(), &pconf, &siem, port, &p, &s);
    let (primary, pdir, sdir) = (&mut pair.primary, pair.pdir.clone(), pair.sdir.clone());
    wait_for("the standby to connect", || {
        !health(primary)["standby"].is_null()
    });
    open_accounts(primary);
    transfers(primary, 5);
    // With the standby following, what it holds goes out (the hold is not waited for).
    wait_for("the standby and the collector to catch up", || {
        let (r, c) = (health(primary), siem_health(primary));
        r["lag_groups"] == 0
            && c["delivered_seq"] == c["replicated_seq"]
            && c["unreplicated_from"].is_null()
    });
    let (_, metrics) = common::raw_request(primary.addr, "GET", "/metrics", b"");
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("mayfly_siem_unreplicated{collector=\"tcp\"} 0")
            && metrics.contains("# TYPE mayfly_siem_unreplicated gauge")
            && metrics.contains("mayfly_siem_lag_records{collector=\"tcp\"} "),
        "{metrics}"
    );
    let first_part = siem_health(primary)["replicated_seq"].as_u64().unwrap();
    assert_eq!(stop(pair.follower.take().unwrap()), 0);
    wait_for("the primary to see the standby gone", || {
        health(primary)["standby"].is_null()
    });

    // The standby is away: the primary commits on, and exports nothing past what the
    // standby holds while the records are younger than the hold.
    // (What health says is checked after what the collector got, the behaviour a SOC
    // relies on.)
    let appended = Instant::now();
    transfers(primary, 3);
    let early = (appended.elapsed(), siem_health(primary));
    // After the hold: exported anyway, marked, announced.
    let delivered_all = |primary: &Agent| {
        wait_for("the collector to have the primary's tip", || {
            let c = siem_health(primary);
            c["delivered_seq"] == c["head_seq"]
        })
    };
    delivered_all(primary);
    let ahead = (appended.elapsed(), siem_health(primary));
    let (_, metrics) = common::raw_request(primary.addr, "GET", "/metrics", b"");
    let metrics = String::from_utf8(metrics).unwrap();
    transfers(primary, 3);
    delivered_all(primary);
    let mut victim = primary.child.take().unwrap();
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();

    // What the copy holds, and the primary's announcement in its own chain.
    let copy_tip = audit_records(&sdir).last().unwrap().seq;
    let p_audit = common::audit(&pdir);
    // (The last one: the primary's start may have had its own, ended when the standby
    // connected.)
    let notice = p_audit
        .iter()
        .rfind(|(e, _)| e == "siem.export_unreplicated")
        .cloned();

    let mut promoted = promote_and_serve(root.path(), &pair, &siem);
    transfers(&promoted, 8);
    let status = promoted.stop();
    assert!(status.success(), "{status}");

    let recs = audit_records(&sdir);
    let tip = recs.last().unwrap().seq;
    let final_hash: std::collections::BTreeMap<u64, String> = recs
        .iter()
        .map(|r| {
            (
                r.seq,
                mayfly_ledger::codec::hex(&mayfly_ledger::checkpoint::chain_hash(
                    &r.prev_hash,
                    &r.encode(),
                )),
            )
        })
        .collect();
    assert!(
        rsyslog::wait_until(Duration::from_secs(30), || collector
            .received(rsyslog::Input::Tcp)
            .iter()
            .any(|m| chain_element(m).0 == tip)),
        "the collector never got seq {tip}"
    );
    let got: Vec<_> = collector
        .received(rsyslog::Input::Tcp)
        .iter()
        .map(chain_element)
        .collect();
    // Every unmarked message is the final ledger's record.
    for (seq, hash, marked, event, procid) in &got {
        if !marked {
            assert_eq!(
                Some(hash),
                final_hash.get(seq),
                "seq {seq} ({event}, pid {procid}) arrived unmarked with a hash the promoted ledger does not have"
            );
        }
    }
    // A sequence with two different records: the one that is not the final ledger's came
    // marked. And the run did produce such sequences (the promoted node reused them).
    let mut reused = 0;
    let mut by_seq: std::collections::BTreeMap<u64, std::collections::BTreeSet<&str>> =
        std::collections::BTreeMap::new();
    for (seq, hash, ..) in &got {
        by_seq.entry(*seq).or_default().insert(hash);
    }
    for (seq, hashes) in &by_seq {
        if hashes.len() > 1 {
            reused += 1;
            for (s, hash, marked, event, _) in got.iter().filter(|g| g.0 == *seq) {
                assert!(
                    *marked || final_hash.get(s) == Some(hash),
                    "seq {s} ({event}) arrived twice with different records, unmarked"
                );
            }
        }
    }
    assert!(
        reused > 0,
        "no sequence was reused: the test did not export ahead of the standby"
    );
    // Nothing missing: every record of the final ledger arrived (marked if it went out
    // before the standby held it: the records of the primary's start do when the standby
    // connects later than the hold).
    for (seq, hash) in &final_hash {
        assert!(
            got.iter().any(|g| g.0 == *seq && &g.1 == hash),
            "seq {seq} of the final ledger never arrived"
        );
    }
    // The collector got the primary's announcement (itself sent ahead, marked).
    assert!(
        got.iter().any(|g| g.3 == "siem.export_unreplicated" && g.2),
        "the collector never got siem.export_unreplicated"
    );
    // While younger than the hold, nothing past the standby's tip went out; the episode
    // began only after it.
    let (at, c) = early;
    if at < Duration::from_millis(3000) {
        assert!(
            c["head_seq"].as_u64() > c["replicated_seq"].as_u64()
                && c["sent_seq"].as_u64() <= c["replicated_seq"].as_u64()
                && c["unreplicated_from"].is_null(),
            "records past the standby's tip went out before the hold: {c}"
        );
    }
    let notice = notice.expect("siem.export_unreplicated in the primary's chain");
    let from: u64 = notice.1["from"].parse().unwrap();
    assert!(
        from > first_part && from <= copy_tip + 1,
        "{notice:?}: the copy holds {copy_tip}, the standby was stopped after {first_part}"
    );
    assert_eq!(notice.1["collector"], "tcp");
    let (at, c) = ahead;
    assert!(
        at >= Duration::from_millis(4000),
        "sent ahead after {at:?}: {c}"
    );
    assert_eq!(c["unreplicated_from"].as_u64(), Some(from), "{c}");
    assert!(
        metrics.contains("mayfly_siem_unreplicated{collector=\"tcp\"} 1"),
        "{metrics}"
    );
    let marked = got.iter().filter(|g| g.2).count();
    eprintln!(
        "siem without reuse: final tip {tip}, copy tip {copy_tip}, sent ahead from {from}, {marked} marked messages, {reused} sequences reused by the promoted node"
    );
}
