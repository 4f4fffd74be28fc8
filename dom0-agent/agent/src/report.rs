//! `dom0-agent report`: tell a running agent that a transaction, key, handler or client is
//! part of an attack (what an IDS or an operator's tooling does), through the
//! authenticated `POST /v1/reports`. The agent's policy decides what happens.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// Largest answer read from the agent (a report's answer is a small JSON object; a rollback
/// plan lists at most the policy's cap of transactions).
const MAX_RESPONSE_BYTES: u64 = 4 << 20;

/// A report could not be made or its answer not understood.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The token is empty, or holds a character a header cannot carry.
    #[error("the detector token in {path} must be one line of printable ASCII without spaces")]
    Token {
        /// The token file.
        path: PathBuf,
    },
    /// No blank line ends the head.
    #[error("the agent sent no complete HTTP response")]
    NoHead,
    /// The answer is larger than [`MAX_RESPONSE_BYTES`].
    #[error("the agent's answer is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// The status line is not `HTTP/1.x NNN reason`.
    #[error("the agent's status line {line:?} is not `HTTP/1.x NNN reason`")]
    StatusLine {
        /// The line (at most 80 characters of it).
        line: String,
    },
}

/// The status code of an HTTP/1.x response head: `HTTP/1.1 200 OK` gives 200. Anything
/// else (another version, a code that is not three digits in 100..=599) is an error.
fn status_of(head: &str) -> Result<u16, ReportError> {
    let line = head.split("\r\n").next().unwrap_or_default();
    let refuse = || ReportError::StatusLine {
        line: line.chars().take(80).collect(),
    };
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(refuse());
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(refuse());
    }
    match code.parse::<u16>() {
        Ok(code @ 100..=599) => Ok(code),
        _ => Err(refuse()),
    }
}

/// The token of a token file: its one line, trimmed; refused if a header cannot carry it.
fn token_of(text: &str, path: &std::path::Path) -> Result<String, ReportError> {
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ReportError::Token {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// Arguments of `report`.
#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["tx", "key", "handler", "client"]))]
pub struct ReportArgs {
    /// The agent's client API address.
    #[arg(long, default_value = "127.0.0.1:8450")]
    agent: SocketAddr,
    /// File with the detector token (as created by `serve` in its data directory).
    #[arg(long)]
    token_file: PathBuf,
    /// A transaction id (32 hex digits).
    #[arg(long)]
    tx: Option<String>,
    /// A key (the transaction that last wrote it is the suspect).
    #[arg(long)]
    key: Option<String>,
    /// A handler.
    #[arg(long)]
    handler: Option<String>,
    /// A client.
    #[arg(long)]
    client: Option<String>,
    /// Why (matched against the policy's `reasons`).
    #[arg(long)]
    reason: String,
    /// Show what would be rolled back without changing anything.
    #[arg(long)]
    dry_run: bool,
}

/// Sends the report; prints the agent's answer; returns the exit code.
pub fn run(args: &ReportArgs) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
    let token = token_of(&text, &args.token_file)?;
    let mut body = serde_json::json!({"reason": args.reason, "dry_run": args.dry_run});
    for (name, value) in [
        ("tx_id", &args.tx),
        ("key", &args.key),
        ("handler", &args.handler),
        ("client", &args.client),
    ] {
        if let Some(v) = value {
            body[name] = serde_json::json!(v);
        }
    }
    let body = body.to_string();
    let mut s = TcpStream::connect(args.agent)
        .with_context(|| format!("connecting to the agent at {}", args.agent))?;
    // A rollback with replay may take minutes; an agent that never answers does not hang
    // the reporter for ever.
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST /v1/reports HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        args.agent,
        token,
        body.len()
    )?;
    let mut resp = Vec::new();
    s.take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut resp)
        .context("reading the agent's answer")?;
    if u64::try_from(resp.len()).unwrap_or(u64::MAX) > MAX_RESPONSE_BYTES {
        return Err(ReportError::TooLarge.into());
    }
    let text = String::from_utf8_lossy(&resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(ReportError::NoHead.into());
    };
    let status = status_of(head)?;
    println!("{}", body.trim());
    Ok(if status == 200 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_parsed_strictly() {
        assert_eq!(
            status_of("HTTP/1.1 200 OK\r\nContent-Length: 2").unwrap(),
            200
        );
        assert_eq!(status_of("HTTP/1.0 403 Forbidden").unwrap(), 403);
        assert_eq!(status_of("HTTP/1.1 204").unwrap(), 204);
        for bad in [
            "",
            "HTTP/1.1",
            "HTTP/1.1 OK 200",
            "HTTP/1.1 2000 OK",
            "HTTP/1.1 +20 OK",
            "HTTP/1.1 099 Low",
            "HTTP/1.1 600 High",
            "HTTP/2 200 OK",
            "SSH-2.0-OpenSSH_9.2",
            "HTTP/1.1  200 OK",
        ] {
            assert!(
                matches!(status_of(bad), Err(ReportError::StatusLine { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_token_a_header_cannot_carry_is_refused() {
        let p = std::path::Path::new("t");
        assert_eq!(token_of("abc123\n", p).unwrap(), "abc123");
        for bad in ["", "\n", "ab c", "ab\r\nX-Evil: 1", "t\u{e9}"] {
            assert!(token_of(bad, p).is_err(), "{bad:?}");
        }
    }
}
