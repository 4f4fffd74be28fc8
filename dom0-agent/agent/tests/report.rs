//! `dom0-agent report` against an agent that answers badly: a garbled status line, an
//! answer without end, a huge answer. Each ends the command with a named error (never a
//! silent "status 0", a hang or unbounded memory).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

/// Runs `dom0-agent report` against a one-connection server that sends `answer` after
/// reading the request head; exit code, stdout, stderr.
fn report_against(answer: Vec<u8>) -> (Option<i32>, String, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
            if s.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        // The body too: closing with unread bytes would reset the connection.
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        std::io::copy(&mut (&mut s).take(length), &mut std::io::sink()).unwrap();
        // The client may stop reading (and close) before all of a huge answer is sent.
        let _ = s.write_all(&answer);
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("detector.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let mut cmd = Command::new(common::agent_exe());
    cmd.args(["report", "--agent", &addr.to_string(), "--token-file"])
        .arg(&token)
        .args(["--handler", "notes", "--reason", "test"]);
    let out = common::output_within(cmd, Duration::from_secs(30));
    server.join().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn response(status_line: &str, body: &str) -> Vec<u8> {
    format!(
        "{status_line}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn the_answer_decides_the_exit_code() {
    let (code, out, err) = report_against(response("HTTP/1.1 200 OK", "{\"ok\":true}"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("{\"ok\":true}"), "{out}");
    let (code, out, err) = report_against(response("HTTP/1.1 403 Forbidden", "{\"error\":\"no\"}"));
    assert_eq!(code, Some(1), "{err}");
    assert!(out.contains("no"), "{out}");
}

#[test]
fn a_garbled_or_missing_status_is_a_named_error() {
    for line in [
        "HTTP/1.1 OK 200",
        "HTTP/1.1 2000 OK",
        "SSH-2.0-OpenSSH_9.2",
        "HTTP/1.1",
    ] {
        let (code, _, err) = report_against(response(line, "{}"));
        assert_eq!(code, Some(3), "{line}: {err}");
        assert!(err.contains("status line"), "{line}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = report_against(b"HTTP/1.1 200 OK\r\nX: y".to_vec());
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("no complete HTTP response"), "{err}");
}

#[test]
fn a_huge_answer_is_refused_not_buffered() {
    let body = "x".repeat(5 << 20);
    let (code, _, err) = report_against(response("HTTP/1.1 200 OK", &body));
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("larger than"), "{err}");
}
