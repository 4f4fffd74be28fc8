//! The `domu-shim` binary, spawned with an inherited sealed memfd and eventfds.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{start, wait_exit, Agent, End, Spawned};
use serde_json::json;

const EXE: &str = env!("CARGO_BIN_EXE_domu-shim");

#[test]
fn transfer_end_to_end_through_the_binary() {
    let mut shim = Spawned::new(EXE);
    let payload = json!({"from":"alice","to":"bob","amount":25}).to_string();
    let record = shim.serve(
        start("transfer", payload.as_bytes(), [3; 32]),
        Agent::with_data([("acct/alice", "100"), ("acct/bob", "0")]),
    );
    let End::Committed(result) = &record.end else {
        panic!("{:?}", record.end)
    };
    let result: serde_json::Value = serde_json::from_slice(result).unwrap();
    assert_eq!(result["from"]["balance"], 75);
    assert_eq!(result["to"]["balance"], 25);
    assert_eq!(record.value("acct/alice"), Some("75"));
    assert_eq!(record.value("acct/bob"), Some("25"));
    let status = wait_exit(&mut shim.child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn overdraft_through_the_binary_aborts_and_exits_zero() {
    let mut shim = Spawned::new(EXE);
    let payload = json!({"from":"bob","to":"alice","amount":1}).to_string();
    let record = shim.serve(
        start("transfer", payload.as_bytes(), [3; 32]),
        Agent::with_data([("acct/alice", "100"), ("acct/bob", "0")]),
    );
    assert_eq!(
        record.end,
        End::Aborted("rejected: insufficient funds: bob has 0, needs 1".into())
    );
    let status = wait_exit(&mut shim.child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn help_is_printed_and_exits_zero() {
    let out = Command::new(EXE).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--ring-fd N",
        "--ring-len BYTES",
        "--signal-fd A",
        "--wait-fd B",
        "Exit status",
    ] {
        assert!(text.contains(needle), "{needle} missing from --help");
    }
    let out = Command::new(EXE).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("domu-shim "));
}

#[test]
fn bad_command_line_exits_2_and_unusable_fds_exit_3() {
    let out = Command::new(EXE).arg("--ring-fd").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ring-fd needs a value"));

    // Fds that are not open in the child.
    let out = Command::new(EXE)
        .args([
            "--ring-fd",
            "900",
            "--ring-len",
            "282624",
            "--signal-fd",
            "901",
            "--wait-fd",
            "902",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--ring-fd 900 is not an open file descriptor"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
