//! The client API over TLS and mutual TLS, through the real agent: certificates generated at
//! test time (rcgen), clients named by the SHA-256 of their certificate's public key, and
//! each such client with its own rate limit and concurrency limit (issue 15).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Agent;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }
    fn pem(&self) -> String {
        self.issuer.pem()
    }
    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
    /// A leaf certificate; `expired` puts its validity in 2020.
    fn leaf(&self, name: &str, server: bool, expired: bool) -> Leaf {
        let sans = if server {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 6, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let spki_sha256 =
            ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
            identity: format!(
                "spki:{}",
                spki_sha256
                    .as_ref()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        }
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    identity: String,
}

impl Leaf {
    fn write(&self, dir: &Path, name: &str) -> (String, String) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (
            cert.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
        )
    }
}

fn client_config(server_ca: &Ca, client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.cert.clone()],
                PrivateKeyDer::try_from(leaf.key_der.clone()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// One request over TLS; `Err` if the handshake or the exchange failed.
fn tls_request(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String, Value), String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    match tls.read_to_end(&mut resp) {
        Ok(_) => {}
        // The agent closes without close_notify after Connection: close responses only if
        // hyper does; a whole response read before that is good.
        Err(e) if !resp.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.to_string()),
    }
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {} bytes", resp.len()))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let json = serde_json::from_slice(&resp[split + 4..]).unwrap_or(Value::Null);
    Ok((status, head, json))
}

/// The value of counter `name` on `/metrics`, over TLS with `config`.
fn metrics_counter(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, name: &str) -> u64 {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp);
    common::sample(&String::from_utf8_lossy(&resp), name)
}

struct Pki {
    ca: Ca,
    server_ca: Ca,
    a: Leaf,
    b: Leaf,
    stranger: Leaf,
    expired: Leaf,
}

/// Certificates in `dir`; returns them and the agent's TLS flags.
fn pki(dir: &Path) -> (Pki, Vec<String>) {
    let server_ca = Ca::new("mayfly test server CA");
    let ca = Ca::new("mayfly test client CA");
    let other = Ca::new("someone else's CA");
    let server = server_ca.leaf("localhost", true, false);
    let (cert, key) = server.write(dir, "server");
    let client_ca = dir.join("clients-ca.pem");
    std::fs::write(&client_ca, ca.pem()).unwrap();
    let pki = Pki {
        a: ca.leaf("client a", false, false),
        b: ca.leaf("client b", false, false),
        stranger: other.leaf("client a", false, false),
        expired: ca.leaf("client old", false, true),
        ca,
        server_ca,
    };
    let flags = vec![
        "--tls-cert".to_owned(),
        cert,
        "--tls-key".to_owned(),
        key,
        "--tls-client-ca".to_owned(),
        client_ca.to_string_lossy().into_owned(),
    ];
    (pki, flags)
}

/// A policy with a small per-client rate on `open_account` (3 a minute); everything else
/// allowed, the hostile test handlers included.
fn policy(dir: &Path) -> Vec<String> {
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.toml"),
        "[engine]\nunlisted_handler = \"allow\"\ndomain_default = \"abort\"\n\n\
         [[rate]]\nname = \"rate.test\"\nmax = 3\nwindow_ms = 60_000\nhandlers = [\"open_account\"]\naction = \"abort\"\nseverity = 4\n",
    )
    .unwrap();
    vec!["--policy".to_owned(), policy.to_string_lossy().into_owned()]
}

fn open_account(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>, name: &str) -> (u16, Value) {
    let body = json!({"handler": "open_account", "payload": {"name": name, "balance": 5}});
    let (code, _, v) = tls_request(addr, cfg, "POST", "/v1/transactions", &body.to_string())
        .expect("request over mTLS");
    (code, v)
}

fn start(dir: &Path, extra: &[&str]) -> (Pki, Agent) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (pki, mut flags) = pki(&certs);
    flags.extend(policy(dir));
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(&dir.join("data"), &flags);
    (pki, agent)
}

#[test]
fn mtls_clients_are_named_by_their_key_in_audit_and_rates() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(dir.path(), &[]);
    let a = client_config(&pki.server_ca, Some(&pki.a));
    let b = client_config(&pki.server_ca, Some(&pki.b));
    let (code, body) = open_account(agent.addr, &a, "alice");
    assert_eq!(code, 200, "{body}");
    let id = body["tx_id"].as_str().unwrap().to_owned();
    // The audit record of the transaction names client a by its key.
    let audit = common::audit(&agent.dir);
    let started = audit
        .iter()
        .find(|(e, f)| e == "domain.started" && f.get("tx_id") == Some(&id))
        .expect("domain.started of the transaction");
    assert_eq!(started.1["client"], pki.a.identity);
    // Its rate (3 a minute) is its own: a's fourth is refused, b's first is not.
    for i in 0..2 {
        assert_eq!(open_account(agent.addr, &a, &format!("a{i}")).0, 200);
    }
    let (code, body) = open_account(agent.addr, &a, "a-too-many");
    assert_eq!(code, 403, "{body}");
    let (code, body) = open_account(agent.addr, &b, "bob");
    assert_eq!(code, 200, "{body}");
    let audit = common::audit(&agent.dir);
    assert!(
        audit.iter().any(|(e, f)| e.starts_with("policy.")
            && f.get("rule").map(String::as_str) == Some("rate.test")
            && f.get("client") == Some(&pki.a.identity)),
        "no rate decision naming client a: {audit:?}"
    );
    // The committed transaction is still there over TLS.
    // The checkpoint (signed, hash-chained) names client a too.
    let (code, _, v) =
        tls_request(agent.addr, &a, "GET", &format!("/v1/transactions/{id}"), "").unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["checkpoint"]["client"], pki.a.identity.as_str(), "{v}");
    assert!(agent.stop().success());
    let (ok, out) = common::verify(&agent.dir);
    assert!(ok, "{out}");
}

/// Idempotency keys are per client: client b sending client a's key neither gets a's
/// answer (its transaction runs) nor is refused as a reuse; a's repeat still gets its own.
#[test]
fn idempotency_keys_are_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(dir.path(), &[]);
    let a = client_config(&pki.server_ca, Some(&pki.a));
    let b = client_config(&pki.server_ca, Some(&pki.b));
    let submit = |cfg: &Arc<rustls::ClientConfig>, name: &str| {
        let body = json!({"handler": "open_account", "payload": {"name": name, "balance": 5},
                          "idempotency_key": "order-1"});
        let (code, _, v) = tls_request(
            agent.addr,
            cfg,
            "POST",
            "/v1/transactions",
            &body.to_string(),
        )
        .unwrap();
        (code, v)
    };
    let (code, first) = submit(&a, "alice");
    assert_eq!(code, 200, "{first}");
    // The same key and request from b: b's own transaction runs (the account exists
    // already, so it aborts), not a's answer.
    let (_, same) = submit(&b, "alice");
    assert!(same["tx_id"].is_string(), "{same}");
    assert_ne!(same["tx_id"], first["tx_id"], "{same}");
    // The key is b's own now: another request under it is refused as a reuse.
    let (code, other) = submit(&b, "bob");
    assert_eq!(code, 422, "{other}");
    assert!(
        other["error"]
            .as_str()
            .unwrap()
            .contains("different request"),
        "{other}"
    );
    // a's repeat is answered from memory: its own first outcome.
    let (code, again) = submit(&a, "alice");
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["tx_id"], first["tx_id"], "{again}");
    assert!(agent.stop().success());
}

#[test]
fn mtls_clients_have_their_own_concurrency_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, agent) = start(
        dir.path(),
        &["--max-per-client", "1", "--tx-timeout-ms", "4000"],
    );
    let a = client_config(&pki.server_ca, Some(&pki.a));
    let b = client_config(&pki.server_ca, Some(&pki.b));
    let addr = agent.addr;
    let slow = {
        let a = a.clone();
        std::thread::spawn(move || {
            tls_request(
                addr,
                &a,
                "POST",
                "/v1/transactions",
                r#"{"handler":"test.loop_forever"}"#,
            )
        })
    };
    // Wait, with a deadline, until a's slow transaction is in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, h) = tls_request(addr, &b, "GET", "/v1/health", "").unwrap();
        if h["in_flight"].as_u64() == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow transaction never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, head, body) = tls_request(
        addr,
        &a,
        "POST",
        "/v1/transactions",
        &json!({"handler": "open_account", "payload": {"name": "a2", "balance": 1}}).to_string(),
    )
    .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("per client"),
        "{body}"
    );
    // Answered while a's slow transaction still runs: the refusal did not wait for it.
    let (_, _, h) = tls_request(addr, &b, "GET", "/v1/health", "").unwrap();
    assert_eq!(h["in_flight"], 1, "{h}");
    assert!(!slow.is_finished(), "a's slow transaction already ended");
    // b is not held back by a's slot.
    let (code, body) = open_account(addr, &b, "b-during");
    assert_eq!(code, 200, "{body}");
    let (code, _, _) = slow.join().unwrap().unwrap();
    assert_ne!(code, 503);
    // a's slot is free again once its transaction ended.
    assert_eq!(open_account(addr, &a, "a-after").0, 200);
}

#[test]
fn bad_client_certificates_and_bad_handshakes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, agent) = start(dir.path(), &["--header-timeout-ms", "1500"]);
    let addr = agent.addr;
    for (what, config) in [
        (
            "another CA",
            client_config(&pki.server_ca, Some(&pki.stranger)),
        ),
        ("expired", client_config(&pki.server_ca, Some(&pki.expired))),
        ("no certificate", client_config(&pki.server_ca, None)),
    ] {
        // Refused by the TLS layer (the server's fatal alert), not answered over HTTP.
        let r = tls_request(addr, &config, "GET", "/v1/health", "");
        let err = r.expect_err(what);
        assert!(
            err.contains("alert"),
            "{what}: not a handshake refusal: {err}"
        );
    }
    let good = client_config(&pki.server_ca, Some(&pki.a));
    let failures = || metrics_counter(addr, &good, "mayfly_api_tls_handshake_failures_total");
    assert_eq!(failures(), 3, "the three refused certificates are counted");
    // Plain HTTP, garbage, and a handshake that stalls: closed, the last at the timeout.
    for bytes in [
        &b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"\x16\x03\x01\xff\xff garbage that is no ClientHello",
        b"\x16\x03\x01\x02\x00\x01",
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        // Closed by the agent (end of stream or a reset), not held open until the read
        // timeout (10 s, a bound on the wait only).
        let mut sink = Vec::new();
        let r = s.read_to_end(&mut sink);
        if let Err(e) = &r {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "held open: {e}"
            );
        }
        assert!(!String::from_utf8_lossy(&sink).contains("HTTP/1.1 200"));
    }
    // A good client is still served, and the three failed handshakes are counted too.
    let (code, _, _) = tls_request(addr, &good, "GET", "/v1/health", "").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        failures(),
        6,
        "plain HTTP, garbage and the stalled handshake are counted"
    );
    let _ = pki.ca.pem();
}

#[test]
fn sighup_reloads_the_certificates_and_keeps_them_on_a_bad_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(dir.path(), &[]);
    let addr = agent.addr;
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(agent.child.as_ref().unwrap().id()).unwrap());
    // A new server certificate from a new CA, written over the old files.
    let new_ca = Ca::new("mayfly test server CA 2");
    new_ca
        .leaf("localhost", true, false)
        .write(&dir.path().join("certs"), "server");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let new_client = client_config(&new_ca, Some(&pki.a));
    let deadline = Instant::now() + Duration::from_secs(20);
    while tls_request(addr, &new_client, "GET", "/v1/health", "").is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The old CA no longer works.
    let old_client = client_config(&pki.server_ca, Some(&pki.a));
    assert!(tls_request(addr, &old_client, "GET", "/v1/health", "").is_err());
    // A broken key: refused, audited, and the certificate in force stays.
    std::fs::write(dir.path().join("certs/server.key"), "not a key").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audit = common::audit(&agent.dir);
        if let Some((_, f)) = audit.iter().find(|(e, _)| e == "api.tls_reload_failed") {
            assert!(f["reason"].contains("server key"), "{f:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no api.tls_reload_failed record");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, _) = tls_request(addr, &new_client, "GET", "/v1/health", "").unwrap();
    assert_eq!(code, 200);
    assert!(common::audit(&agent.dir)
        .iter()
        .any(|(e, _)| e == "api.tls_reloaded"));
    assert!(agent.stop().success());
}

/// A kept-alive connection over TLS: requests one after the other on one handshake.
struct KeepAlive {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    pending: Vec<u8>,
}

impl KeepAlive {
    fn open(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> KeepAlive {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let conn = rustls::ClientConnection::new(
            config.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        KeepAlive {
            tls: rustls::StreamOwned::new(conn, tcp),
            pending: Vec::new(),
        }
    }

    /// One `GET` on the connection; `Err` if it failed or ended before a whole answer.
    fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.tls
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.pending[..end]).into_owned();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or("no status")?;
                let len: usize = common::content_length(&head);
                while self.pending.len() < end + 4 + len {
                    match self.tls.read(&mut buf) {
                        Ok(0) => return Err("closed within the body".into()),
                        Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                let body =
                    String::from_utf8_lossy(&self.pending[end + 4..end + 4 + len]).into_owned();
                self.pending.drain(..end + 4 + len);
                return Ok((status, format!("{head}\r\n\r\n{body}")));
            }
            match self.tls.read(&mut buf) {
                Ok(0) => return Err("closed before an answer".into()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// A flood of handshakes left half done (a ClientHello's first bytes, then silence) takes
/// at most `max_handshakes` of them at once: the connections beyond are closed at once and
/// counted, and a client with an established connection is still served meanwhile.
#[test]
fn half_done_handshakes_are_bounded_and_established_clients_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(
        dir.path(),
        &common::with_long_timeouts(&["--max-handshakes", "4"]),
    );
    let addr = agent.addr;
    let good = client_config(&pki.server_ca, Some(&pki.a));
    let mut established = KeepAlive::open(addr, &good);
    assert_eq!(established.get("/v1/health").unwrap().0, 200);
    // 40 connections, each a TLS record header and the first bytes of a ClientHello.
    let flood: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                .unwrap();
            s
        })
        .collect();
    // The agent closes the 36 beyond the limit; wait for it (bounded), then the
    // established client is served and the refusals are counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, text) = established.get("/metrics").unwrap();
        assert_eq!(code, 200);
        let refused = common::sample(&text, "mayfly_api_tls_handshakes_refused_total");
        if refused >= 36 {
            assert!(
                text.lines()
                    .any(|l| l == "mayfly_api_tls_handshakes_in_progress 4"),
                "{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} refused handshakes counted, not 36"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(established.get("/v1/health").unwrap().0, 200);
    // A new client is refused while the four half-done handshakes hold every slot ...
    assert!(tls_request(addr, &good, "GET", "/v1/health", "").is_err());
    // ... and served once they are gone.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tls_request(addr, &good, "GET", "/v1/health", "").is_err() {
        assert!(
            Instant::now() < deadline,
            "no handshake after the flood ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(established);
    assert!(agent.stop().success());
}

/// After the operator replaces the client CA (revoking every certificate of the old one)
/// and sends SIGHUP, a kept-alive connection authenticated under the old CA is no longer
/// served: its next request is refused (421) or finds it closed, and that is audited with
/// the client's identity; a client of the new CA is served, one of the old is refused at
/// the handshake.
#[test]
fn connections_authenticated_before_a_ca_change_are_closed_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(dir.path(), &common::with_long_timeouts(&[]));
    let addr = agent.addr;
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(agent.child.as_ref().unwrap().id()).unwrap());
    let old = client_config(&pki.server_ca, Some(&pki.a));
    let mut kept = KeepAlive::open(addr, &old);
    assert_eq!(kept.get("/v1/health").unwrap().0, 200);
    assert_eq!(kept.get("/v1/health").unwrap().0, 200);
    // Client b's connection stays idle through the change.
    let mut idle = KeepAlive::open(addr, &client_config(&pki.server_ca, Some(&pki.b)));
    assert_eq!(idle.get("/v1/health").unwrap().0, 200);
    // The operator swaps the client CA and reloads.
    let ca2 = Ca::new("mayfly test client CA 2");
    std::fs::write(dir.path().join("certs/clients-ca.pem"), ca2.pem()).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::audit(&agent.dir)
        .iter()
        .any(|(e, _)| e == "api.tls_reloaded")
    {
        assert!(Instant::now() < deadline, "no api.tls_reloaded record");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The old connection: refused or closed, never served again.
    match kept.get("/v1/health") {
        Ok((code, text)) => assert_eq!(code, 421, "{text}"),
        Err(e) => eprintln!("old connection closed: {e}"),
    }
    assert!(kept.get("/v1/health").is_err(), "still open after a 421");
    // Audited, naming the client.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audit = common::audit(&agent.dir);
        if let Some((_, f)) = audit.iter().find(|(e, _)| e == "api.connection_stale") {
            assert_eq!(f["client"], pki.a.identity, "{f:?}");
            assert_eq!(f["generation"], "0", "{f:?}");
            assert_eq!(f["current_generation"], "1", "{f:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no api.connection_stale record: {audit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The idle one is closed by the agent without a request, and that is audited too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::audit(&agent.dir).iter().any(|(e, f)| {
        e == "api.connection_stale"
            && f.get("client") == Some(&pki.b.identity)
            && f.get("action").map(String::as_str) == Some("closed")
    }) {
        assert!(Instant::now() < deadline, "b's idle connection not closed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(idle.get("/v1/health").is_err(), "b's old connection served");
    // New connections: the old CA's client fails the handshake, the new CA's is served
    // and stays served on its connection.
    assert!(tls_request(addr, &old, "GET", "/v1/health", "").is_err());
    let new_leaf = ca2.leaf("client c", false, false);
    let new = client_config(&pki.server_ca, Some(&new_leaf));
    let mut fresh = KeepAlive::open(addr, &new);
    for _ in 0..3 {
        assert_eq!(fresh.get("/v1/health").unwrap().0, 200);
    }
    assert!(metrics_counter(addr, &new, "mayfly_api_tls_stale_connections_total") >= 2);
    drop((kept, idle, fresh));
    assert!(agent.stop().success());
}

/// CPU time (user + system, clock ticks) of the agent's threads named exactly `name`.
fn thread_cpu(pid: u32, name: &str) -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state is field 3, utime field 14, stime field 15.
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    ticks
}

/// The public-key work of handshakes runs on the handshake thread (`api-tls`), not on the
/// network threads (`api`): after many full mutual-TLS handshakes (each with one cheap
/// request), the handshake thread has spent more CPU than the network threads.
#[test]
fn handshakes_run_on_their_own_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(dir.path(), &[]);
    let addr = agent.addr;
    let pid = agent.child.as_ref().unwrap().id();
    let good = client_config(&pki.server_ca, Some(&pki.a));
    let (tls0, net0) = (thread_cpu(pid, "api-tls"), thread_cpu(pid, "api"));
    for _ in 0..300 {
        // 404: answered on the network thread without a read of the ledger.
        let (code, _, _) = tls_request(addr, &good, "GET", "/nowhere", "").unwrap();
        assert_eq!(code, 404);
    }
    let (tls, net) = (
        thread_cpu(pid, "api-tls") - tls0,
        thread_cpu(pid, "api") - net0,
    );
    eprintln!("handshake thread {tls} ticks, network threads {net} ticks");
    assert!(
        tls > net,
        "handshake thread {tls} ticks, network threads {net} ticks"
    );
    assert!(agent.stop().success());
}

/// With mutual TLS behind a trusted load balancer, the certificate's key names the
/// client, not the address of the PROXY header.
#[test]
fn behind_a_proxy_the_certificate_still_names_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(dir.path(), &["--proxy-protocol-from", "127.0.0.2"]);
    let mut tcp = common::connect_from([127, 0, 0, 2], agent.addr);
    tcp.write_all(&common::vector("proxy-v2-tcp4.hex")).unwrap();
    let conn = rustls::ClientConnection::new(
        client_config(&pki.server_ca, Some(&pki.a)),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = json!({"handler": "open_account", "payload": {"name": "proxied", "balance": 5}})
        .to_string();
    write!(
        tls,
        "POST /v1/transactions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (_, json) = resp.split_once("\r\n\r\n").unwrap();
    let id = serde_json::from_str::<Value>(json).unwrap()["tx_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let audit = common::audit(&agent.dir);
    let started = audit
        .iter()
        .find(|(e, f)| e == "domain.started" && f.get("tx_id") == Some(&id))
        .expect("domain.started of the transaction");
    assert_eq!(started.1["client"], pki.a.identity);
    assert!(agent.stop().success());
}

/// Over TLS too, a client that pipelines requests and never reads the answers is closed
/// at the write timeout (the timeout watches the socket under the TLS layer).
#[test]
fn a_tls_client_that_never_reads_is_closed_at_the_write_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut agent) = start(
        dir.path(),
        &common::with_long_timeouts(&["--write-timeout-ms", "1000"]),
    );
    let addr = agent.addr;
    let good = client_config(&pki.server_ca, Some(&pki.a));
    let mut slow = KeepAlive::open(addr, &good);
    common::stop_reading(&slow.tls.sock);
    assert_eq!(slow.get("/v1/health").unwrap().0, 200);
    let _ = slow.tls.write_all(&common::unread_requests());
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics_counter(addr, &good, "mayfly_api_write_timeouts_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "the TLS client that does not read was not closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(slow);
    assert!(agent.stop().success());
}
