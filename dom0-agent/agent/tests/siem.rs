//! SIEM export through the real agent: `dom0-agent serve` configured with `[[siem.collector]]`
//! sections sends its audit chain to a real rsyslog (TCP, and TLS with a client
//! certificate); rsyslog goes down while transactions run, the agent is restarted during
//! the outage, rsyslog comes back, and every audit record arrives, in order, field by field.

#![allow(missing_docs, clippy::indexing_slicing)]

mod common;
#[path = "../../siem/tests/support/mod.rs"]
mod rsyslog;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{transfers, Agent};
use mayfly_ledger::checkpoint::chain_hash;
use mayfly_ledger::codec::hex;
use mayfly_ledger::AuditRecord;
use mayfly_siem::rfc5424;
use rsyslog::{assert_complete_in_order, seq_of, wait_until, Input, Pki, Rsyslog};
use serde_json::json;

fn write_config(dir: &Path, rsyslog: &Rsyslog, pki: &Pki) -> std::path::PathBuf {
    let text = format!(
        r#"
[siem]
pen = 32473
hostname = "mayfly-agent-test"
confirm_ms = 100
backoff_min_ms = 20
backoff_max_ms = 500
cursor_flush_ms = 100

[[siem.collector]]
name = "tcp"
transport = "tcp"
address = "{tcp}"

[[siem.collector]]
name = "tls"
transport = "tls"
address = "{tls}"
server_name = "localhost"
ca = "{ca}"
client_cert = "{cert}"
client_key = "{key}"
facility = "local5"
"#,
        tcp = rsyslog.address(Input::Tcp),
        tls = rsyslog.address(Input::TlsMutual),
        ca = pki.ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits until `GET /v1/health` shows every collector caught up with the audit tip.
fn caught_up(agent: &Agent) -> bool {
    wait_until(Duration::from_secs(60), || {
        let (_, h) = agent.get("/v1/health");
        let tip = h["ledger"]["audit_seq"].as_u64().unwrap();
        let siem = h["siem"].as_array().unwrap();
        siem.len() == 2
            && siem
                .iter()
                .all(|c| c["delivered_seq"].as_u64() == Some(tip) && c["behind"] == 0)
    })
}

#[test]
fn agent_exports_its_audit_chain_through_an_outage_and_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::create(&root.path().join("pki"));
    let mut rsyslog = Rsyslog::start(
        &root.path().join("rsyslog"),
        &[Input::Tcp, Input::TlsMutual],
        Some(&pki),
    );
    let data = root.path().join("data");
    let config = write_config(root.path(), &rsyslog, &pki);
    let config_flag = ["--config", config.to_str().unwrap()];
    let key = root.path().join("admin");
    let (code, _, err) = common::mayfly(&["admin", "keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let public = key.with_extension("pub");
    let with_console = [
        config_flag[0],
        config_flag[1],
        "--admin-key",
        public.to_str().unwrap(),
        "--admin-quorum",
        "1",
    ];

    let mut agent = Agent::start(&data, &with_console);
    for (name, balance) in [("alice", 1000), ("bob", 0)] {
        let (code, body) = agent.tx("open_account", json!({"name": name, "balance": balance}));
        assert_eq!(code, 200, "{body}");
    }
    transfers(&agent, 5);
    assert!(caught_up(&agent), "{}", agent.get("/v1/health").1);
    let (_, health) = agent.get("/v1/health");
    for c in health["siem"].as_array().unwrap() {
        assert_eq!(c["connected"], true, "{c}");
        assert!(c["last_success_unix_ms"].as_u64().is_some(), "{c}");
        assert!(c["persisted_seq"].as_u64().is_some(), "{c}");
    }

    // The collector goes down while transactions go on.
    rsyslog.stop();
    transfers(&agent, 10);
    let down_seen = wait_until(Duration::from_secs(30), || {
        let (_, h) = agent.get("/v1/health");
        h["siem"].as_array().unwrap().iter().all(|c| {
            c["connected"] == false && c["last_error"].is_string() && c["behind"].as_u64() > Some(0)
        })
    });
    assert!(down_seen, "{}", agent.get("/v1/health").1);
    // The operator sees the same lag through the signed console.
    let socket = data.join("admin.sock");
    let (code, out, err) = common::mayfly(&[
        "admin",
        "status",
        "--json",
        "--socket",
        socket.to_str().unwrap(),
        "--key",
        key.with_extension("key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exporters = &status["result"]["exporters"];
    assert_eq!(exporters["configured"], true, "{status}");
    let names: Vec<&str> = exporters["collectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["lag"].as_u64() > Some(0), "{c}");
            assert!(c["last_error"].is_string(), "{c}");
            c["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(names, ["tcp", "tls"], "{status}");

    // The agent restarts during the outage, and works on.
    let status = agent.stop();
    assert!(status.success(), "{status}");
    let agent = Agent::start(&data, &config_flag);
    transfers(&agent, 10);
    rsyslog.restart();
    transfers(&agent, 5);
    assert!(caught_up(&agent), "{}", agent.get("/v1/health").1);
    drop(agent); // SIGTERM: `agent.stopped` is recorded and exported before exit
    rsyslog.stop();

    let store =
        mayfly_ledger::store::open_read_only(&data, &mayfly_ledger::StoreOptions::default())
            .unwrap();
    let recs: BTreeMap<u64, AuditRecord> = store
        .audit_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r))
        .collect();
    let tip = *recs.keys().last().unwrap();
    assert_eq!(recs[&tip].event.event, "agent.stopped");
    assert_eq!(
        recs.values()
            .filter(|r| r.event.event == "agent.started")
            .count(),
        2
    );
    for (input, facility) in [(Input::Tcp, "16"), (Input::TlsMutual, "21")] {
        let got = rsyslog.received(input);
        let seqs: Vec<u64> = got.iter().map(seq_of).collect();
        assert_complete_in_order(input.name(), &seqs, tip);
        for msg in &got {
            let rec = &recs[&seq_of(msg)];
            let ctx = format!("{} seq {}", input.name(), rec.seq);
            assert_eq!(msg["hostname"], "mayfly-agent-test", "{ctx}");
            assert_eq!(msg["app-name"], "mayfly", "{ctx}");
            assert_eq!(msg["msgid"], rec.event.event.as_str(), "{ctx}");
            assert_eq!(msg["syslogfacility"], facility, "{ctx}");
            assert_eq!(
                msg["syslogseverity"],
                (rec.event.severity as u8).to_string(),
                "{ctx}"
            );
            let (sd, _) =
                rfc5424::parse_structured_data(msg["structured-data"].as_str().unwrap()).unwrap();
            let chain = sd.iter().find(|e| e.id == "mayfly@32473").unwrap();
            assert_eq!(
                chain.param("event"),
                Some(rec.event.event.as_str()),
                "{ctx}"
            );
            assert_eq!(
                chain.param("hash"),
                Some(hex(&chain_hash(&rec.prev_hash, &rec.encode())).as_str()),
                "{ctx}"
            );
            let fields: BTreeMap<String, String> = sd
                .iter()
                .find(|e| e.id == "mayfly.fields@32473")
                .map(|e| e.params.iter().cloned().collect())
                .unwrap_or_default();
            assert_eq!(fields, rec.event.fields, "{ctx}");
        }
    }
}

#[test]
fn a_bad_siem_section_stops_serve_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[siem.collector]]\nname = \"soc\"\ntransport = \"tls\"\naddress = \"127.0.0.1:6514\"\n",
            "needs `ca`",
        ),
        (
            "[[siem.collector]]\nname = \"soc\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:514\"\nfacility = \"local9\"\n",
            "unknown facility \"local9\"",
        ),
        (
            "[[siem.collector]]\nname = \"soc\"\ntransport = \"tls\"\naddress = \"127.0.0.1:6514\"\nca = \"/nonexistent/ca.pem\"\n",
            "/nonexistent/ca.pem",
        ),
        ("[siem]\nbogus = 1\n", "bogus"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("agent-{i}.toml"));
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(common::agent_exe())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join(format!("data-{i}")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} started");
        assert!(err.contains(expected), "case {i}: {err}");
    }
}
