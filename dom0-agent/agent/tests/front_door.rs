//! The client API's front door under hostile HTTP, through the real agent (`dom0-agent
//! serve` on loopback): each case gets its clear status (or a prompt close where hyper has
//! none), and afterwards the agent still serves and every transaction committed before is
//! still there (issue 15).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Agent;
use serde_json::json;

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads one response head and its Content-Length body; `None` if the connection ended
/// (closed or reset) before a whole head.
fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<(u16, String, Vec<u8>)> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
            let len: usize = common::content_length(&head);
            while pending.len() < end + 4 + len {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
            let body = pending[end + 4..end + 4 + len].to_vec();
            pending.drain(..end + 4 + len);
            return Some((status, head, body));
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(s: &mut TcpStream) -> Option<u16> {
    read_response(s, &mut Vec::new()).map(|(code, _, _)| code)
}

/// Whether the agent closes (or resets) the connection within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn rss_kib(agent: &Agent) -> u64 {
    let pid = agent.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

static ACCOUNT: AtomicUsize = AtomicUsize::new(0);

/// Commits one transaction; returns its id.
fn commit_one(agent: &Agent) -> String {
    let n = ACCOUNT.fetch_add(1, Ordering::Relaxed);
    let (code, body) = agent.tx(
        "open_account",
        json!({"name": format!("acct-{}-{n}", std::process::id()), "balance": 10}),
    );
    assert_eq!(code, 200, "{body}");
    body["tx_id"].as_str().unwrap().to_owned()
}

/// The agent still answers health and commits, and every earlier commit is still there.
fn still_serving(agent: &Agent, committed: &[String]) {
    let pid = agent.child.as_ref().unwrap().id();
    assert!(common::process_alive(pid), "the agent died");
    let (code, body) = agent.get("/v1/health");
    assert_eq!(code, 200, "{body}");
    commit_one(agent);
    for id in committed {
        let (code, body) = agent.get(&format!("/v1/transactions/{id}"));
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "committed");
    }
}

fn start(extra: &[&str]) -> (tempfile::TempDir, Agent, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), extra);
    let committed = vec![commit_one(&agent)];
    (dir, agent, committed)
}

fn finish(dir: &tempfile::TempDir, mut agent: Agent, committed: &[String]) {
    still_serving(&agent, committed);
    assert!(agent.stop().success());
    let (ok, out) = common::verify(dir.path());
    assert!(ok, "{out}");
}

#[test]
fn absurd_content_length_is_answered_on_every_path_and_the_agent_lives() {
    let (dir, agent, committed) = start(&[]);
    for (method, path, extra, want) in [
        ("POST", "/v1/transactions", "", 413),
        ("POST", "/v1/reports", "", 401),
        (
            "POST",
            "/v1/reports",
            "Authorization: Bearer wrong\r\n",
            401,
        ),
        ("POST", "/v1/health", "", 405),
        ("POST", "/metrics", "", 405),
        ("PUT", "/nowhere", "", 404),
        ("GET", "/v1/health", "", 200),
    ] {
        let mut s = connect(agent.addr);
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 99999999999999\r\n\r\n{{\"handler\":"
        )
        .unwrap();
        assert_eq!(status_of(&mut s), Some(want), "{method} {path}");
        if want != 200 {
            assert!(
                closed_within(&mut s, Duration::from_secs(5)),
                "{method} {path}: the rest of the body is waited for"
            );
        }
        still_serving(&agent, &committed);
    }
    let audit = common::audit(&agent.dir);
    assert!(audit.iter().any(|(e, _)| e == "report.rejected"));
    finish(&dir, agent, &committed);
}

#[test]
fn a_declared_gigabyte_gets_413_at_once_without_being_read() {
    let (dir, agent, committed) = start(&[]);
    let mut s = connect(agent.addr);
    s.write_all(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        .unwrap();
    // Answered without a byte of the body sent (the body is never read).
    assert_eq!(status_of(&mut s), Some(413));
    // The agent closes instead of draining a gigabyte: writing on soon fails.
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0usize;
    while written < 1_000_000_000 {
        match s.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    assert!(
        written < 16 << 20,
        "{written} bytes were accepted after the 413"
    );
    finish(&dir, agent, &committed);
}

#[test]
fn trickled_bodies_do_not_hold_the_api() {
    let (dir, agent, committed) = start(&["--body-timeout-ms", "60000"]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tricklers = Vec::new();
    for _ in 0..20 {
        let (addr, stop) = (agent.addr, stop.clone());
        tricklers.push(std::thread::spawn(move || {
            let mut s = connect(addr);
            s.write_all(
                b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{",
            )
            .unwrap();
            // At most 5,000 bytes, one every 50 ms, until told to stop.
            for _ in 0..4000 {
                if stop.load(Ordering::Relaxed) || s.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    // Every trickler connected (polled on /metrics, bounded): the agent serves anyway.
    let open_now = || {
        let (code, metrics) = common::raw_request(agent.addr, "GET", "/metrics", b"");
        assert_eq!(code, 200);
        String::from_utf8(metrics)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("mayfly_api_open_connections "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_now() < 21 {
        assert!(
            Instant::now() < deadline,
            "the tricklers never all connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _) = agent.get("/v1/health");
    assert_eq!(code, 200);
    let a = commit_one(&agent);
    let (code, body) = agent.tx(
        "transfer",
        json!({"from": format!("acct-{}-0", std::process::id()), "to": "nobody", "amount": 1}),
    );
    assert!(code == 200 || code == 422, "{code} {body}");
    let open = open_now();
    assert!(open >= 21, "{open} connections open while 20 trickle");
    stop.store(true, Ordering::Relaxed);
    for t in tricklers {
        t.join().unwrap();
    }
    finish(&dir, agent, &[committed, vec![a]].concat());
}

#[test]
fn huge_headers_get_431_and_memory_stays_bounded() {
    let (dir, agent, committed) = start(&[]);
    let before = rss_kib(&agent);
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut s = connect(agent.addr);
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            .unwrap();
        // Up to 256 MiB of one header, until the agent stops taking it.
        let chunk = vec![b'a'; 64 * 1024];
        let mut written = 0usize;
        while written < 256 << 20 {
            match s.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        assert!(written < 64 << 20, "{written} bytes of header were taken");
        conns.push(s);
    }
    for mut s in conns {
        // The 431 precedes the close; a reset may overtake it, never a 200.
        let code = status_of(&mut s);
        assert!(code.is_none() || code == Some(431), "{code:?}");
    }
    let after = rss_kib(&agent);
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The same with a single 1 MiB line, answered before it ends.
    let mut s = connect(agent.addr);
    let mut req = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'b', 1 << 20));
    req.extend_from_slice(b"\r\n\r\n");
    let _ = s.write_all(&req);
    let code = status_of(&mut s);
    assert!(code.is_none() || code == Some(431), "{code:?}");
    finish(&dir, agent, &committed);
}

#[test]
fn a_head_just_over_the_limit_gets_431() {
    let (dir, agent, committed) = start(&["--max-header-bytes", "4096"]);
    let mut s = connect(agent.addr);
    let big = "c".repeat(5000);
    write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(status_of(&mut s), Some(431));
    // Just under passes.
    let mut s = connect(agent.addr);
    let fits = "c".repeat(3000);
    write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: {fits}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(status_of(&mut s), Some(200));
    finish(&dir, agent, &committed);
}

#[test]
fn ten_thousand_headers_get_431() {
    let (dir, agent, committed) = start(&["--max-header-bytes", "1048576"]);
    let mut req = String::from("GET /v1/health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..10_000 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let mut s = connect(agent.addr);
    let _ = s.write_all(req.as_bytes());
    let code = status_of(&mut s);
    assert!(code.is_none() || code == Some(431), "{code:?}");
    // 65 headers: one over the default count of 64, with room in bytes.
    let mut req = String::from("GET /v1/health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..64 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let mut s = connect(agent.addr);
    s.write_all(req.as_bytes()).unwrap();
    assert_eq!(status_of(&mut s), Some(431));
    finish(&dir, agent, &committed);
}

/// What hyper does with the framing headers request smugglers play with, shown with a
/// *valid* transaction body (so a 400 can only come from the framing): two different
/// Content-Length values are refused (400, connection closed); two equal ones are one
/// length and the request is served; Content-Length beside `Transfer-Encoding: chunked`
/// is dropped, the body is read chunked and served, and the connection is closed after the
/// answer (RFC 9112 §6.1), so nothing after that body can be read as a next request.
#[test]
fn duplicate_content_lengths_and_cl_with_te_are_what_hyper_makes_them() {
    let (dir, agent, mut committed) = start(&[]);
    let tx = |name: &str| {
        json!({"handler": "open_account",
               "payload": {"name": format!("{name}-{}", std::process::id()), "balance": 1}})
        .to_string()
    };
    // (a) Two different lengths: hyper's parser refuses the request.
    let body = tx("different");
    let mut s = connect(agent.addr);
    write!(
        s,
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        body.len() + 1
    )
    .unwrap();
    assert_eq!(status_of(&mut s), Some(400));
    assert!(closed_within(&mut s, Duration::from_secs(20)));

    // (b) Two equal lengths: folded into one, served.
    let body = tx("equal");
    let mut s = connect(agent.addr);
    write!(
        s,
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: {0}\r\nContent-Length: {0}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let (code, _, answer) = read_response(&mut s, &mut Vec::new()).expect("an answer");
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(code, 200, "{answer}");
    committed.push(answer["tx_id"].as_str().unwrap().to_owned());

    // (c) Content-Length (a wrong one) beside chunked: the chunked body counts, the request
    // is served, and the connection is closed after the answer even though a smuggled
    // second request follows on it.
    let body = tx("chunked");
    let mut s = connect(agent.addr);
    write!(
        s,
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\nGET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut pending = Vec::new();
    let (code, head, answer) = read_response(&mut s, &mut pending).expect("an answer");
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(code, 200, "{answer}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    committed.push(answer["tx_id"].as_str().unwrap().to_owned());
    assert!(
        read_response(&mut s, &mut pending).is_none(),
        "the request after the chunked body was served"
    );
    finish(&dir, agent, &committed);
}

#[test]
fn garbage_request_lines_and_raw_bytes_get_400() {
    let (dir, agent, committed) = start(&[]);
    for raw in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET /v1/\xffhealth HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHo\xffst: x\r\n\r\n",
        b"NOT A REQUEST LINE AT ALL\r\n\r\n",
    ] {
        let mut s = connect(agent.addr);
        s.write_all(raw).unwrap();
        assert_eq!(
            status_of(&mut s),
            Some(400),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    // Invalid UTF-8 in a body and in a header value: 400 and 401, answered.
    let (code, body) = common::raw_request(
        agent.addr,
        "POST",
        "/v1/transactions",
        b"{\"handler\":\"\xff\xfe\"}",
    );
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    let mut s = connect(agent.addr);
    s.write_all(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nContent-Length: 2\r\n\r\n{}").unwrap();
    assert_eq!(status_of(&mut s), Some(401));
    finish(&dir, agent, &committed);
}

#[test]
fn an_http2_preface_is_refused_at_once() {
    let (dir, agent, committed) = start(&["--header-timeout-ms", "60000"]);
    let mut s = connect(agent.addr);
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "an HTTP/2 preface is held open"
    );
    finish(&dir, agent, &committed);
}

#[test]
fn slowloris_connections_are_closed_at_the_header_timeout() {
    let (dir, agent, committed) = start(&["--header-timeout-ms", "2000"]);
    let mut conns: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = connect(agent.addr);
            s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    // Trickle one header byte per connection every 200 ms; all must be closed by the
    // header timeout (plus a margin), while others are still served.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut served = false;
    let mut open = conns.len();
    while open > 0 && Instant::now() < deadline {
        open = 0;
        for s in &mut conns {
            let mut b = [0u8; 512];
            let gone = match s.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(_) => true,
            };
            if !gone && s.write_all(b"X").is_ok() {
                open += 1;
            }
        }
        if !served {
            assert_eq!(agent.get("/v1/health").0, 200);
            served = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        open, 0,
        "{open} slowloris connections still open after 15 s"
    );
    finish(&dir, agent, &committed);
}

#[test]
fn a_body_that_never_finishes_gets_408() {
    let (dir, agent, committed) = start(&["--body-timeout-ms", "1000"]);
    let mut s = connect(agent.addr);
    s.write_all(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"hand")
        .unwrap();
    assert_eq!(status_of(&mut s), Some(408));
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    finish(&dir, agent, &committed);
}

#[test]
fn pipelined_requests_and_http10_are_served() {
    let (dir, agent, committed) = start(&[]);
    let mut s = connect(agent.addr);
    let id = &committed[0];
    write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/transactions/{id} HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut pending = Vec::new();
    for _ in 0..3 {
        let (code, _, body) = read_response(&mut s, &mut pending).expect("a response");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    }
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    let mut s = connect(agent.addr);
    s.write_all(b"GET /v1/health HTTP/1.0\r\n\r\n").unwrap();
    let (code, head, _) = read_response(&mut s, &mut Vec::new()).unwrap();
    assert_eq!(code, 200);
    assert!(
        head.starts_with("HTTP/1.0") || head.starts_with("HTTP/1.1"),
        "{head}"
    );
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    finish(&dir, agent, &committed);
}

#[test]
fn chunked_bodies_over_the_cap_get_413() {
    let (dir, agent, committed) = start(&["--max-body-bytes", "1024"]);
    let mut s = connect(agent.addr);
    s.write_all(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for _ in 0..4 {
        let _ = s.write_all(b"400\r\n");
        let _ = s.write_all(&[b' '; 1024]);
        let _ = s.write_all(b"\r\n");
    }
    assert_eq!(status_of(&mut s), Some(413));
    // Under the cap, chunked is fine.
    let mut s = connect(agent.addr);
    let body = json!({"handler": "open_account", "payload": {"name": format!("chunky-{}", std::process::id()), "balance": 1}}).to_string();
    write!(
        s,
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
    .unwrap();
    assert_eq!(status_of(&mut s), Some(200));
    finish(&dir, agent, &committed);
}

#[test]
fn connections_beyond_the_limit_get_503_and_are_closed() {
    let (dir, agent, committed) = start(&["--max-connections", "8"]);
    let held: Vec<TcpStream> = (0..8).map(|_| connect(agent.addr)).collect();
    // The accept loop counts them once accepted: wait for 8 open, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        let mut s = connect(agent.addr);
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        match status_of(&mut s) {
            Some(503) => break s,
            other => {
                assert!(Instant::now() < deadline, "never refused: {other:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    drop(held);
    // Slots come back as the held connections close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect(agent.addr);
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        if status_of(&mut s) == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "slots never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(&dir, agent, &committed);
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let (dir, agent, committed) =
        start(&["--idle-timeout-ms", "500", "--header-timeout-ms", "60000"]);
    let mut s = connect(agent.addr);
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(status_of(&mut s), Some(200));
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    finish(&dir, agent, &committed);
}

/// The value of the unlabelled sample `name` on `/metrics`.
fn metric(agent: &Agent, name: &str) -> u64 {
    let (code, text) = common::raw_request(agent.addr, "GET", "/metrics", b"");
    assert_eq!(code, 200);
    common::sample(&String::from_utf8_lossy(&text), name)
}

/// A client that pipelines requests and never reads the answers (its receive window
/// full) is closed at the write timeout and counted, and others are served meanwhile —
/// with idle and header timeouts far longer, so only the write timeout can close it.
#[test]
fn a_client_that_never_reads_is_closed_at_the_write_timeout() {
    let (dir, agent, committed) =
        start(&common::with_long_timeouts(&["--write-timeout-ms", "1000"]));
    let mut slow = TcpStream::connect(agent.addr).unwrap();
    common::stop_reading(&slow);
    // The agent stops reading the requests once its writes block, so ours may block too;
    // they give up after 5 s.
    let _ = slow.write_all(&common::unread_requests());
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&agent, "mayfly_api_write_timeouts_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "the client that does not read was not closed"
        );
        // Others are served meanwhile.
        assert_eq!(agent.get("/v1/health").0, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Closed: what was sent before the close can be read, then the end (or a reset).
    assert!(closed_within(&mut slow, Duration::from_secs(20)));
    // Only the scrape's own connection stays open (the others end as their answers go out).
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&agent, "mayfly_api_open_connections") != 1 {
        assert!(Instant::now() < deadline, "connections left open");
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(&dir, agent, &committed);
}

/// Checks the histogram family `name` in exposition text: `# HELP` and `# TYPE ... histogram`
/// before its samples, buckets with increasing `le` ending at `+Inf`, cumulative
/// (non-decreasing) counts, `+Inf` == `_count`, and a `_sum`. Returns (count, sum).
fn histogram(text: &str, name: &str) -> (u64, f64) {
    let lines: Vec<&str> = text.lines().collect();
    let help = lines
        .iter()
        .position(|l| l.starts_with(&format!("# HELP {name} ")))
        .unwrap_or_else(|| panic!("no HELP for {name}:\n{text}"));
    assert_eq!(
        lines.get(help + 1).copied(),
        Some(format!("# TYPE {name} histogram").as_str()),
        "{text}"
    );
    let prefix = format!("{name}_bucket{{le=\"");
    let mut last_le = f64::NEG_INFINITY;
    let mut last_n = 0u64;
    let mut inf = None;
    let mut i = help + 2;
    while let Some(rest) = lines.get(i).and_then(|l| l.strip_prefix(&prefix)) {
        assert!(inf.is_none(), "a bucket after +Inf: {text}");
        let (le, n) = rest.split_once("\"} ").unwrap();
        let n: u64 = n.parse().unwrap();
        assert!(n >= last_n, "buckets of {name} are not cumulative:\n{text}");
        last_n = n;
        if le == "+Inf" {
            inf = Some(n);
        } else {
            let le: f64 = le.parse().unwrap();
            assert!(le > last_le, "bounds of {name} do not increase:\n{text}");
            last_le = le;
        }
        i += 1;
    }
    let inf = inf.unwrap_or_else(|| panic!("{name} has no +Inf bucket:\n{text}"));
    let sum: f64 = lines[i]
        .strip_prefix(&format!("{name}_sum "))
        .unwrap_or_else(|| panic!("{name}_sum missing:\n{text}"))
        .parse()
        .unwrap();
    let count: u64 = lines[i + 1]
        .strip_prefix(&format!("{name}_count "))
        .unwrap_or_else(|| panic!("{name}_count missing:\n{text}"))
        .parse()
        .unwrap();
    assert_eq!(inf, count, "+Inf != _count for {name}");
    (count, sum)
}

#[test]
fn metrics_speak_prometheus_text() {
    let (dir, agent, mut committed) = start(&[]);
    committed.push(commit_one(&agent));
    committed.push(commit_one(&agent));
    let mut s = connect(agent.addr);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (code, head, body) = read_response(&mut s, &mut Vec::new()).unwrap();
    assert_eq!(code, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    let text = String::from_utf8(body).unwrap();
    for line in text.lines() {
        assert!(
            line.starts_with("# HELP ")
                || line.starts_with("# TYPE ")
                || line.starts_with("mayfly_"),
            "{line}"
        );
    }
    assert!(
        text.contains("mayfly_api_transactions_total{outcome=\"committed\"} 3\n"),
        "{text}"
    );
    assert_eq!(histogram(&text, "mayfly_api_transaction_seconds").0, 3);
    // The ledger's group committer: the three transactions (and the agent's own audit
    // records) were committed in durable groups, each timed.
    let (groups, jobs) = histogram(&text, "mayfly_ledger_group_jobs");
    assert!(groups > 0, "{text}");
    assert!(jobs >= 3.0 && jobs >= groups as f64, "{text}");
    let (commits, seconds) = histogram(&text, "mayfly_ledger_commit_seconds");
    assert!(commits > 0, "{text}");
    assert!(seconds > 0.0, "{text}");
    assert!(
        text.contains("mayfly_ledger_commit_seconds_bucket{le=\"0.0005\"} "),
        "{text}"
    );
    assert!(
        text.contains(
            "# TYPE mayfly_ledger_groups_failed_total counter\nmayfly_ledger_groups_failed_total 0\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("mayfly_pool_domains{state=\"ready\"}"),
        "{text}"
    );
    // Without TLS the client is its address, and the checkpoint names it.
    let (code, body) = agent.get(&format!("/v1/transactions/{}", committed[0]));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["checkpoint"]["client"], "127.0.0.1", "{body}");
    finish(&dir, agent, &committed);
}

#[test]
fn plain_http_on_a_public_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::agent_exe())
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-plaintext-listen"), "{err}");
    assert!(err.contains("non-loopback"), "{err}");
}

#[test]
fn unknown_log_levels_and_formats_are_refused() {
    for args in [["--log-level", "verbose"], ["--log-format", "xml"]] {
        let out = std::process::Command::new(common::agent_exe())
            .args(args)
            .args(["export-key", "--data-dir", "/nonexistent"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[1]), "{err}");
    }
}

#[test]
fn the_json_log_is_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(common::agent_exe())
        .args([
            "--log-format",
            "json",
            "--log-level",
            "info",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool-size",
            "2",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0);
        if line.starts_with("mayfly: serving on") {
            break;
        }
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let mut records = 0;
    for line in err.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["msg"].is_string() && v["level"].is_string(), "{line}");
        records += 1;
    }
    assert!(err.contains("\"msg\":\"client API listening\""), "{err}");
    assert!(records >= 2, "{err}");
}

#[test]
fn the_appliance_configuration_passes_the_listen_check() {
    // The image's agent.toml listens on 0.0.0.0 in plain HTTP for the Xen-in-QEMU suite,
    // with the explicit override; it must not be refused for it (it stops later, on the
    // missing Xen host).
    let dir = tempfile::tempdir().unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../buildroot/board/mayfly/rootfs-overlay/etc/mayfly/agent.toml");
    let out = std::process::Command::new(common::agent_exe())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("non-loopback"), "{err}");
    // Without the override the same file is refused for its plain public listener.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("insecure_plaintext_listen = true", "");
    let stripped = dir.path().join("agent.toml");
    std::fs::write(&stripped, text).unwrap();
    let out = std::process::Command::new(common::agent_exe())
        .args(["serve", "--config"])
        .arg(&stripped)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("non-loopback"), "{err}");
}

/// Ledger reads (a transaction's lookup, health, metrics) run on a few blocking threads,
/// never on the network thread: under a burst on one network thread every read is either
/// answered or refused at once with 503 + Retry-After (never queued without bound), each
/// refusal is counted in `mayfly_api_reads_refused_total`, and the agent keeps serving.
#[test]
fn a_burst_of_reads_is_answered_or_refused_at_once_and_counted() {
    let (dir, agent, committed) = start(&["--workers", "1"]);
    let addr = agent.addr;
    let id = committed[0].clone();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let id = id.clone();
            std::thread::spawn(move || {
                let mut refused = 0u64;
                for i in 0..25 {
                    let path = match (t + i) % 3 {
                        0 => format!("/v1/transactions/{id}"),
                        1 => "/v1/health".to_owned(),
                        _ => "/metrics".to_owned(),
                    };
                    let mut s = connect(addr);
                    write!(
                        s,
                        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    )
                    .unwrap();
                    let (code, head, _) =
                        read_response(&mut s, &mut Vec::new()).expect("an answer");
                    match code {
                        200 => {}
                        503 => {
                            assert!(
                                head.to_ascii_lowercase().contains("retry-after: 1"),
                                "{head}"
                            );
                            refused += 1;
                        }
                        other => panic!("{path}: {other} {head}"),
                    }
                }
                refused
            })
        })
        .collect();
    let refused: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    // Every refusal is counted (the counter is read by a request that is not refused).
    let deadline = Instant::now() + Duration::from_secs(20);
    let counted = loop {
        let (code, metrics) = common::raw_request(addr, "GET", "/metrics", b"");
        if code == 200 {
            break String::from_utf8(metrics)
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("mayfly_api_reads_refused_total "))
                .expect("the reads_refused counter")
                .parse::<u64>()
                .unwrap();
        }
        assert!(Instant::now() < deadline, "metrics never answered");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(counted, refused);
    finish(&dir, agent, &committed);
}

/// Behind a trusted TCP load balancer (PROXY protocol v2, `--proxy-protocol-from`), the
/// client is the address the header names — in the audit and the checkpoint —; the
/// balancer without a valid header is refused (closed, audited, counted); a header from an
/// untrusted peer is not believed.
#[test]
fn proxy_protocol_headers_name_the_client_only_from_trusted_proxies() {
    let (dir, agent, committed) = start(&["--proxy-protocol-from", "127.0.0.2/32"]);
    let body = json!({"handler": "open_account", "payload": {"name": "behind-lb", "balance": 3}})
        .to_string();
    let request = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The balancer (127.0.0.2) relays client 203.0.113.7.
    let mut lb = common::connect_from([127, 0, 0, 2], agent.addr);
    lb.write_all(&common::vector("proxy-v2-tcp4.hex")).unwrap();
    lb.write_all(request.as_bytes()).unwrap();
    let (code, _, answer) = read_response(&mut lb, &mut Vec::new()).expect("an answer");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    let id = answer["tx_id"].as_str().unwrap().to_owned();
    let audit = common::audit(&agent.dir);
    let started = audit
        .iter()
        .find(|(e, f)| e == "domain.started" && f.get("tx_id") == Some(&id))
        .expect("domain.started of the transaction");
    assert_eq!(started.1["client"], "203.0.113.7");
    let (code, v) = agent.get(&format!("/v1/transactions/{id}"));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["checkpoint"]["client"], "203.0.113.7", "{v}");
    // A LOCAL header (the balancer's own health check) is served as the balancer.
    let mut check = common::connect_from([127, 0, 0, 2], agent.addr);
    check
        .write_all(&common::vector("proxy-v2-local.hex"))
        .unwrap();
    check
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(status_of(&mut check), Some(200));
    // The balancer without a header, or with a broken one: closed without an answer.
    let mut broken = common::vector("proxy-v2-tcp4.hex");
    broken[14] = 0xff; // 65,292 bytes declared
    for first in [
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        broken,
    ] {
        let mut s = common::connect_from([127, 0, 0, 2], agent.addr);
        s.write_all(&first).unwrap();
        assert_eq!(status_of(&mut s), None);
    }
    assert_eq!(metric(&agent, "mayfly_api_proxy_headers_refused_total"), 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::audit(&agent.dir)
        .iter()
        .any(|(e, f)| e == "api.proxy_refused" && f["client"] == "127.0.0.2")
    {
        assert!(Instant::now() < deadline, "no api.proxy_refused record");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A header from a peer not trusted is not believed: it is garbage to HTTP.
    let mut s = common::connect_from([127, 0, 0, 3], agent.addr);
    s.write_all(&common::vector("proxy-v2-tcp4.hex")).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    assert_eq!(status_of(&mut s), Some(400));
    finish(&dir, agent, &committed);
}
