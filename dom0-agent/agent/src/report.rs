//! `dom0-agent report`: tell a running agent that a transaction, key, handler or client is
//! part of an attack (what an IDS or an operator's tooling does), through the
//! authenticated `POST /v1/reports`. The agent's policy decides what happens.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

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
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
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
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "POST /v1/reports HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        args.agent,
        token.trim(),
        body.len()
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("the agent sent no HTTP response");
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    println!("{}", body.trim());
    Ok(if status == 200 { 0 } else { 1 })
}
