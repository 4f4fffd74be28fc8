//! Test support: a private rsyslog instance on loopback (own config, work directory, pid
//! file; never the system's), test certificates made with the openssl CLI, and readers of
//! what rsyslog wrote. Shared by the siem tests, the agent's siem test and the bench
//! (`#[path]`-included).
#![allow(dead_code, missing_docs)]

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// rsyslogd, from the Debian package `rsyslog` (`rsyslog-gnutls` for TLS).
pub const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// Test PKI: a CA, a server certificate for `localhost`/127.0.0.1, a client certificate,
/// and a second, unrelated CA.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca = |name: &str, cn: &str| {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        };
        ca("ca", "mayfly test CA");
        ca("other-ca", "unrelated CA");
        let leaf = |name: &str, cn: &str, ext: &str| {
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        };
        leaf(
            "server",
            "localhost",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        );
        leaf(
            "client",
            "mayfly-appliance",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:mayfly-appliance\n",
        );
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
        }
    }
}

/// A free loopback port (TCP and UDP both free at the time of asking).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port");
}

/// The inputs of one rsyslog instance; each writes `<name>.jsonl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    Udp,
    Tcp,
    /// TLS, any client.
    TlsAnon,
    /// TLS, client certificate signed by the test CA required.
    TlsMutual,
}

impl Input {
    pub fn name(self) -> &'static str {
        match self {
            Input::Udp => "udp",
            Input::Tcp => "tcp",
            Input::TlsAnon => "tls",
            Input::TlsMutual => "mtls",
        }
    }
}

/// A private rsyslogd on loopback.
pub struct Rsyslog {
    child: Option<Child>,
    pub dir: PathBuf,
    pub ports: Vec<(Input, u16)>,
    conf: PathBuf,
    pid: PathBuf,
    /// Where output goes: "file" (one JSON line per message) or "discard" (for benches).
    output: &'static str,
}

impl Rsyslog {
    /// Writes the configuration and starts rsyslogd; returns once every TCP input accepts
    /// connections.
    pub fn start(dir: &Path, inputs: &[Input], pki: Option<&Pki>) -> Rsyslog {
        Self::start_with(dir, inputs, pki, "file")
    }

    pub fn start_with(
        dir: &Path,
        inputs: &[Input],
        pki: Option<&Pki>,
        output: &'static str,
    ) -> Rsyslog {
        assert!(
            Path::new(RSYSLOGD).exists(),
            "{RSYSLOGD} missing: install the Debian packages rsyslog and rsyslog-gnutls (scripts/test.sh does)"
        );
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let ports: Vec<(Input, u16)> = inputs.iter().map(|&i| (i, free_port())).collect();
        let mut conf = String::new();
        conf.push_str(&format!(
            "global(workDirectory=\"{}\" maxMessageSize=\"64k\" parser.escapeControlCharactersOnReceive=\"off\")\n",
            dir.join("work").display()
        ));
        conf.push_str("template(name=\"jsonline\" type=\"string\" string=\"%jsonmesg%\\n\")\n");
        conf.push_str("template(name=\"msgonly\" type=\"string\" string=\"%msg%\\n\")\n");
        if inputs.contains(&Input::Udp) {
            conf.push_str("module(load=\"imudp\")\n");
        }
        conf.push_str("module(load=\"imtcp\" maxSessions=\"200\")\n");
        for &(input, port) in &ports {
            let name = input.name();
            let common = format!(
                "address=\"127.0.0.1\" port=\"{port}\" ruleset=\"r_{name}\" name=\"{name}\""
            );
            let line = match input {
                Input::Udp => format!("input(type=\"imudp\" {common} rcvbufSize=\"8m\")\n"),
                Input::Tcp => format!("input(type=\"imtcp\" {common})\n"),
                Input::TlsAnon | Input::TlsMutual => {
                    let pki = pki.expect("TLS inputs need the test PKI");
                    let auth = if input == Input::TlsMutual {
                        "x509/certvalid"
                    } else {
                        "anon"
                    };
                    format!(
                        "input(type=\"imtcp\" {common} streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"{auth}\" streamDriver.CAFile=\"{}\" streamDriver.CertFile=\"{}\" streamDriver.KeyFile=\"{}\")\n",
                        pki.ca.display(),
                        pki.server_cert.display(),
                        pki.server_key.display()
                    )
                }
            };
            conf.push_str(&line);
            let action = match output {
                // rsyslog refuses a configuration without an action.
                "discard" => {
                    "action(type=\"omfile\" file=\"/dev/null\" template=\"msgonly\")".to_owned()
                }
                _ => format!(
                    "action(type=\"omfile\" file=\"{}\" template=\"jsonline\")",
                    dir.join(format!("{name}.jsonl")).display()
                ),
            };
            conf.push_str(&format!("ruleset(name=\"r_{name}\") {{ {action} }}\n"));
        }
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut r = Rsyslog {
            child: None,
            dir: dir.to_path_buf(),
            ports,
            conf: conf_path,
            pid: dir.join("rsyslogd.pid"),
            output,
        };
        r.spawn();
        r
    }

    pub fn port(&self, input: Input) -> u16 {
        self.ports.iter().find(|(i, _)| *i == input).unwrap().1
    }

    pub fn address(&self, input: Input) -> String {
        format!("127.0.0.1:{}", self.port(input))
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        let _ = std::fs::remove_file(&self.pid);
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(&self.pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("rsyslogd.stderr"))
                    .unwrap(),
            )
            .spawn()
            .expect("spawn rsyslogd");
        self.child = Some(child);
        // Ready when every TCP input accepts; a UDP input is opened in the same start-up.
        let deadline = Instant::now() + Duration::from_secs(30);
        for &(input, port) in &self.ports {
            if input == Input::Udp {
                continue;
            }
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "rsyslogd exited at start-up: {status}: {}",
                        std::fs::read_to_string(self.dir.join("rsyslogd.stderr"))
                            .unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "rsyslogd did not open port {port}"
                );
                std::thread::sleep(Duration::from_millis(20)); // polling interval, bounded above
            }
        }
        // UDP: poll until the socket is bound (a bind of the same port then fails).
        if let Some(&(_, port)) = self.ports.iter().find(|(i, _)| *i == Input::Udp) {
            loop {
                if UdpSocket::bind(("127.0.0.1", port)).is_err() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "rsyslogd did not bind UDP {port}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops rsyslogd (SIGTERM: it drains its queues) and waits for it to exit.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Kills rsyslogd (SIGKILL: whatever it had received but not yet written is lost) and
    /// waits for it to exit.
    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    fn signal(&mut self, signal: nix::sys::signal::Signal) {
        let mut child = self.child.take().expect("rsyslogd not running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again with the same configuration and ports.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Every message the input wrote so far, as rsyslog's JSON objects. A line that is not
    /// JSON (the tail rsyslog was writing when it was killed, with the next start's first
    /// line appended) is left out: see [`Rsyslog::damaged_lines`].
    pub fn received(&self, input: Input) -> Vec<serde_json::Value> {
        self.lines(input).0
    }

    /// How many lines of the input's file are not JSON.
    pub fn damaged_lines(&self, input: Input) -> usize {
        self.lines(input).1
    }

    fn lines(&self, input: Input) -> (Vec<serde_json::Value>, usize) {
        let path = self.dir.join(format!("{}.jsonl", input.name()));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A line being written may be incomplete: only complete lines count.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        let mut damaged = 0;
        let good = complete
            .lines()
            .filter_map(|l| {
                let v = serde_json::from_str(l).ok();
                damaged += usize::from(v.is_none());
                v
            })
            .collect();
        (good, damaged)
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// The chain element (`mayfly@...`) of a received message.
pub fn chain_element(msg: &serde_json::Value) -> mayfly_siem::rfc5424::SdElement {
    let sd = msg["structured-data"].as_str().expect("structured-data");
    let (elements, _) = mayfly_siem::rfc5424::parse_structured_data(sd).expect("parse SD");
    elements
        .into_iter()
        .find(|e| e.id.starts_with("mayfly@"))
        .expect("a mayfly@ element")
}

/// The audit sequence a received message carries (from its `mayfly@...` element).
pub fn seq_of(msg: &serde_json::Value) -> u64 {
    chain_element(msg)
        .param("seq")
        .expect("seq param")
        .parse()
        .unwrap()
}

/// Whether a received message is marked `unreplicated="true"` (any other value fails).
pub fn unreplicated(msg: &serde_json::Value) -> bool {
    match chain_element(msg).param("unreplicated") {
        None => false,
        Some("true") => true,
        Some(other) => panic!("unreplicated={other:?}"),
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that `seqs` (what one collector received, in arrival order) holds every
/// sequence 1..=tip, in order: duplicates allowed (a resend after an outage restarts
/// at or before the last delivered record), gaps not.
pub fn assert_complete_in_order(name: &str, seqs: &[u64], tip: u64) {
    let mut highest = 0u64;
    for (i, &s) in seqs.iter().enumerate() {
        assert!(
            s <= highest + 1,
            "{name}: message {i} carries seq {s} after seq {highest} had been the highest: gap"
        );
        highest = highest.max(s);
    }
    assert_eq!(
        highest, tip,
        "{name}: received up to {highest}, chain tip {tip}"
    );
}
