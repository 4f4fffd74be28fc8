//! The console server in-process, against a real ledger on disk, with hostile peers: stalled
//! and truncated frames, too many connections, the loopback TCP listener, and the start-up
//! refusals (bad socket directory, impossible quorum, non-loopback TCP, a non-socket file in
//! the way). The backend is a stand-in that never has a domain: no command here runs a
//! transaction (the real-process tests are in `dom0-agent/tests/console.rs`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mayfly_command::{frame, keyfile, Authorizer, Body, Envelope};
use mayfly_console::{
    CollectorStatus, ConsoleConfig, ConsoleError, ConsoleServer, ExporterStatus, Services,
};
use mayfly_executor::testing::NoDomains;
use mayfly_executor::{Executor, ExecutorConfig};
use mayfly_ledger::{AuditEvent, Ledger, Options, Severity};
use ring::signature::Ed25519KeyPair;
use serde_json::Value;
use slog::{o, Discard, Logger};

struct OneCollector;

impl ExporterStatus for OneCollector {
    fn collectors(&self) -> Vec<CollectorStatus> {
        vec![CollectorStatus {
            name: "siem-1".into(),
            transport: "tls".into(),
            delivered_seq: 1,
            last_error: Some("connection refused".into()),
        }]
    }
}

fn admin(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
}

fn log() -> Logger {
    Logger::root(Discard, o!())
}

fn executor(dir: &Path) -> Arc<Executor> {
    let ledger = Ledger::open(&dir.join("ledger"), &Options::default(), &log()).unwrap();
    let bundle = mayfly_policy::Bundle::load(&[(
        "allow.toml",
        "[engine]\nunlisted_handler = \"allow\"\ndomain_default = \"abort\"\n",
    )])
    .unwrap();
    Arc::new(Executor::new(
        ledger,
        Arc::new(NoDomains),
        Vec::new(),
        ExecutorConfig::default(),
        bundle,
        &log(),
    ))
}

fn config(dir: &Path) -> ConsoleConfig {
    let keys: BTreeMap<_, _> = [1u8, 2]
        .iter()
        .map(|s| (keyfile::public_of(&admin(*s)), format!("admin-{s}")))
        .collect();
    ConsoleConfig {
        socket: dir.join("admin.sock"),
        tcp: None,
        authorizer: Authorizer::new(keys, Duration::from_secs(60), Duration::from_secs(3600)),
        quorum: 2,
        max_connections: 8,
        max_tcp_connections: 8,
        io_timeout: Duration::from_secs(30),
    }
}

fn services(executor: Arc<Executor>, exporters: Option<Arc<dyn ExporterStatus>>) -> Services {
    let incidents = Arc::new(mayfly_incident::Incidents::new(executor.clone(), &log()));
    Services {
        exporters,
        ..Services::new(&executor, incidents, 2, 2)
    }
}

fn status_envelope(exec: &Executor) -> Vec<u8> {
    envelope(exec, "status", &[])
}

fn envelope(exec: &Executor, command: &str, args: &[(&str, &str)]) -> Vec<u8> {
    let now = mayfly_command::now_ns();
    let mut args: BTreeMap<String, String> = args
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    args.insert(
        mayfly_command::APPLIANCE_ARG.to_owned(),
        mayfly_command::hex(&exec.ledger().public_key()),
    );
    let mut e = Envelope::new(Body {
        nonce: mayfly_command::random_nonce().unwrap(),
        issued_ns: now,
        expires_ns: now + 60_000_000_000,
        command: command.into(),
        args,
    })
    .unwrap();
    e.sign(&admin(1)).unwrap();
    e.encode()
}

fn result<S: Read + Write>(s: &mut S, request: &[u8]) -> Value {
    // A server that answers "busy" closes without reading: the write may then fail with
    // EPIPE, and the answer is still there to read.
    let _ = frame::write_request(s, request);
    loop {
        let f = frame::read_response(s).unwrap();
        if f["type"] == "result" {
            return f;
        }
    }
}

fn rejected_reasons(exec: &Executor) -> Vec<String> {
    exec.ledger()
        .store()
        .audit_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|r| r.event.event == "admin.rejected")
        .map(|r| r.event.fields["reason"].clone())
        .collect()
}

#[test]
fn stalled_truncated_and_excess_connections_are_cut_off_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor(dir.path());
    let mut cfg = config(dir.path());
    cfg.io_timeout = Duration::from_millis(300);
    cfg.max_connections = 2;
    let server = ConsoleServer::start(cfg, services(exec.clone(), None), &log()).unwrap();
    let sock = server.socket_path().to_path_buf();

    // Half a length prefix, then silence: the server gives up after its timeout and says
    // why (the read below returns when the server answers or closes, never by our clock).
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(&[0, 0]).unwrap();
    let f = frame::read_response(&mut stalled).unwrap();
    assert_eq!(f["code"], "malformed", "{f}");
    assert!(f["error"].as_str().unwrap().contains("unreadable"), "{f}");

    // A length prefix announcing more than is sent.
    let mut short = UnixStream::connect(&sock).unwrap();
    short.write_all(&100u32.to_be_bytes()).unwrap();
    short.write_all(b"MFAE").unwrap();
    short.shutdown(std::net::Shutdown::Write).unwrap();
    let f = frame::read_response(&mut short).unwrap();
    assert_eq!(f["code"], "malformed", "{f}");

    // A whole, valid request trickled a byte at a time, each byte well inside the
    // timeout: cut off once the request as a whole is late.
    let request = status_envelope(&exec);
    let mut framed = u32::try_from(request.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(&request);
    let mut trickle = UnixStream::connect(&sock).unwrap();
    let started = std::time::Instant::now();
    for b in &framed {
        if trickle.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let f = frame::read_response(&mut trickle).unwrap();
    assert_eq!(f["code"], "malformed", "{f}");
    assert!(f["error"].as_str().unwrap().contains("too long"), "{f}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Two silent connections occupy both slots; the third is told the console is busy.
    let hold1 = UnixStream::connect(&sock).unwrap();
    let hold2 = UnixStream::connect(&sock).unwrap();
    // The holders are counted once the server has accepted them; a request on a third
    // connection either finds both slots taken (busy) or, if it raced ahead of an accept,
    // succeeds — so retry until the server has caught up, then expect busy.
    let mut busy = None;
    for _ in 0..1000 {
        let mut third = UnixStream::connect(&sock).unwrap();
        let f = result(&mut third, &status_envelope(&exec));
        if f["code"] == "busy" {
            busy = Some(f);
            break;
        }
    }
    assert!(busy.is_some(), "never answered busy");
    drop((hold1, hold2));

    // After all that, the server still serves (once the holders' threads have seen them
    // go: until then a request may still be answered busy).
    let mut f = Value::Null;
    for _ in 0..1000 {
        let mut ok = UnixStream::connect(&sock).unwrap();
        f = result(&mut ok, &status_envelope(&exec));
        if f["code"] != "busy" {
            break;
        }
    }
    assert_eq!(f["ok"], true, "{f}");
    assert_eq!(f["result"]["exporters"]["configured"], false);
    assert_eq!(
        f["result"]["replication"],
        Value::Null,
        "no replication configured"
    );
    assert_eq!(f["result"]["chains"]["epoch"], 0);
    server.shutdown(Duration::from_secs(5));
    assert!(!sock.exists(), "the socket is removed at shutdown");
    let reasons = rejected_reasons(&exec);
    assert!(
        reasons.iter().filter(|r| *r == "malformed").count() >= 3,
        "{reasons:?}"
    );
}

#[test]
fn loopback_tcp_serves_the_same_protocol_and_status_reports_exporter_lag() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor(dir.path());
    let mut cfg = config(dir.path());
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    let mut services = services(exec.clone(), Some(Arc::new(OneCollector)));
    services.replication = Some(Arc::new(
        || serde_json::json!({"state": "degraded", "degraded_reason": "no standby"}),
    ));
    let server = ConsoleServer::start(cfg, services, &log()).unwrap();
    let addr = server.tcp_addr().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let f = result(&mut s, &status_envelope(&exec));
    assert_eq!(f["ok"], true, "{f}");
    let c = &f["result"]["exporters"]["collectors"][0];
    assert_eq!(c["name"], "siem-1");
    let tip = f["result"]["chains"]["audit"]["seq"].as_u64().unwrap();
    assert_eq!(c["lag"].as_u64().unwrap(), tip - 1);
    assert_eq!(c["last_error"], "connection refused");
    // The replication provider's report is the `replication` section.
    assert_eq!(f["result"]["replication"]["state"], "degraded");
    // The audit record names the TCP peer.
    let accepted = exec
        .ledger()
        .store()
        .audit_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .find(|r| r.event.event == "admin.accepted")
        .unwrap();
    assert!(accepted.event.fields["peer"].starts_with("tcp 127.0.0.1:"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn unsafe_or_impossible_configurations_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor(dir.path());

    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cfg = config(dir.path());
    cfg.socket = open_dir.join("admin.sock");
    let e = ConsoleServer::start(cfg, services(exec.clone(), None), &log())
        .err()
        .unwrap();
    assert!(matches!(e, ConsoleError::SocketDir { .. }), "{e}");

    let mut cfg = config(dir.path());
    cfg.quorum = 3;
    let e = ConsoleServer::start(cfg, services(exec.clone(), None), &log())
        .err()
        .unwrap();
    assert!(
        matches!(e, ConsoleError::Quorum { quorum: 3, keys: 2 }),
        "{e}"
    );

    let mut cfg = config(dir.path());
    cfg.tcp = Some("0.0.0.0:0".parse().unwrap());
    let e = ConsoleServer::start(cfg, services(exec.clone(), None), &log())
        .err()
        .unwrap();
    assert!(matches!(e, ConsoleError::NotLoopback(_)), "{e}");

    // A skew or validity window without bound is refused, as is a zero window.
    let keys = config(dir.path()).authorizer.keys().clone();
    for (skew, validity) in [
        (3601, 3600),
        (u64::MAX, 3600),
        (60, 7 * 24 * 3600 + 1),
        (60, u64::MAX),
        (60, 0),
    ] {
        let mut cfg = config(dir.path());
        cfg.authorizer = Authorizer::new(
            keys.clone(),
            Duration::from_secs(skew),
            Duration::from_secs(validity),
        );
        let e = ConsoleServer::start(cfg, services(exec.clone(), None), &log())
            .err()
            .unwrap();
        assert!(matches!(e, ConsoleError::Timing { .. }), "{e}");
    }

    let mut cfg = config(dir.path());
    cfg.authorizer = Authorizer::new(BTreeMap::new(), Duration::ZERO, Duration::from_secs(1));
    let e = ConsoleServer::start(cfg, services(exec.clone(), None), &log())
        .err()
        .unwrap();
    assert!(matches!(e, ConsoleError::NoKeys), "{e}");

    // A regular file where the socket should go is not ours to delete...
    let cfg = config(dir.path());
    std::fs::write(&cfg.socket, b"precious").unwrap();
    let e = ConsoleServer::start(cfg.clone(), services(exec.clone(), None), &log())
        .err()
        .unwrap();
    assert!(matches!(e, ConsoleError::Unix { .. }), "{e}");
    assert_eq!(std::fs::read(&cfg.socket).unwrap(), b"precious");
    // ...but a stale socket from an unclean stop is replaced.
    std::fs::remove_file(&cfg.socket).unwrap();
    let stale = std::os::unix::net::UnixListener::bind(&cfg.socket).unwrap();
    drop(stale);
    let server = ConsoleServer::start(cfg, services(exec, None), &log()).unwrap();
    let mode = std::fs::metadata(server.socket_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn an_audit_export_of_huge_records_loses_none() {
    // 100 records of 32 fields of 1,024 control characters: each is about 200 KiB as JSON
    // (every byte escaped as \u00XX), 20 MiB together, more than one response frame may
    // carry. Guest-influenced audit values can look like this.
    let dir = tempfile::tempdir().unwrap();
    let exec = executor(dir.path());
    let value = "\u{1}".repeat(1024);
    let events: Vec<AuditEvent> = (0..100)
        .map(|_| {
            (0..32).fold(AuditEvent::new("test.huge", Severity::Info), |e, i| {
                e.field(format!("f{i:02}"), &value)
            })
        })
        .collect();
    exec.ledger().audit(events).unwrap();
    let tip = exec.ledger().tips().audit.seq;
    let server =
        ConsoleServer::start(config(dir.path()), services(exec.clone(), None), &log()).unwrap();
    let mut s = UnixStream::connect(server.socket_path()).unwrap();
    frame::write_request(&mut s, &envelope(&exec, "audit.export", &[])).unwrap();
    let mut seqs = Vec::new();
    let result = loop {
        let f = frame::read_response(&mut s).unwrap();
        match f["type"].as_str().unwrap() {
            "records" => seqs.extend(
                f["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["seq"].as_u64().unwrap()),
            ),
            "result" => break f,
            _ => {}
        }
    };
    assert_eq!(result["ok"], true, "{result}");
    // Everything up to the tip when the command ran (its own admin.accepted included).
    let to = result["result"]["to"].as_u64().unwrap();
    assert!(to > tip, "{result}");
    assert_eq!(result["result"]["exported"].as_u64(), Some(to));
    assert_eq!(seqs, (1..=to).collect::<Vec<_>>());
    server.shutdown(Duration::from_secs(5));
}
