//! The shape of `mayfly admin`: each subcommand offers (in `--help`) and accepts exactly
//! the options that apply to it.

use std::process::{Command, Output};

fn mayfly(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(args)
        .env_remove("MAYFLY_APPLIANCE")
        .env_remove("MAYFLY_ADMIN_SOCKET")
        .output()
        .expect("run mayfly")
}

fn help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    let out = mayfly(&all);
    assert_eq!(out.status.code(), Some(0), "{all:?}");
    String::from_utf8(out.stdout).unwrap()
}

const SIGN: &[&str] = &["--key"];
const VALIDITY: &[&str] = &["--valid-for"];
const CONN: &[&str] = &["--socket", "--tcp", "--json"];
const BIND: &[&str] = &["--appliance"];

/// Whether the help text has a line defining option `opt`.
fn defines(help: &str, opt: &str) -> bool {
    help.lines()
        .any(|l| l.trim_start().starts_with(&format!("{opt} ")))
}

fn offers(args: &[&str], yes: &[&[&str]], no: &[&[&str]]) {
    let h = help(args);
    for opt in yes.iter().flat_map(|g| g.iter()) {
        assert!(defines(&h, opt), "{args:?} should offer {opt}:\n{h}");
    }
    for opt in no.iter().flat_map(|g| g.iter()) {
        assert!(!defines(&h, opt), "{args:?} must not offer {opt}:\n{h}");
    }
}

#[test]
fn each_subcommand_offers_only_its_options() {
    offers(&["admin", "keygen"], &[], &[SIGN, VALIDITY, BIND, CONN]);
    offers(&["admin", "inspect"], &[], &[SIGN, VALIDITY, BIND, CONN]);
    offers(&["admin", "cosign"], &[SIGN], &[VALIDITY, BIND, CONN]);
    offers(&["admin", "submit"], &[SIGN, CONN], &[VALIDITY, BIND]);
    offers(&["admin", "prepare"], &[SIGN, VALIDITY, BIND], &[CONN]);
    offers(
        &["admin", "prepare", "--out", "f", "rollback"],
        &[SIGN, VALIDITY, BIND],
        &[CONN],
    );
    offers(&["admin", "status"], &[SIGN, VALIDITY, BIND, CONN], &[]);
    offers(&["admin", "tx", "list"], &[SIGN, VALIDITY, BIND, CONN], &[]);
    offers(
        &["admin", "key", "rotate"],
        &[SIGN, VALIDITY, BIND, CONN],
        &[],
    );
}

#[test]
fn options_that_do_not_apply_are_usage_errors() {
    for args in [
        &[
            "admin",
            "keygen",
            "--out",
            "/nonexistent/k",
            "--socket",
            "s",
        ][..],
        &["admin", "inspect", "f", "--key", "k"],
        &["admin", "cosign", "f"],
        &["admin", "prepare", "--out", "f", "--json", "status"],
        &["admin", "status", "--socket", "s", "--tcp", "127.0.0.1:1"],
    ] {
        let out = mayfly(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn options_of_nested_commands_are_read() {
    // `--key` after `tx list` reaches the signer: the missing key file is the error.
    let appliance = "ab".repeat(32);
    let out = mayfly(&[
        "admin",
        "tx",
        "list",
        "--key",
        "/nonexistent/alice.key",
        "--appliance",
        &appliance,
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/alice.key"), "{err}");
    // `--socket` after `key rotate` reaches the connection.
    let keys = tempfile::tempdir().unwrap();
    let stem = keys.path().join("a");
    assert_eq!(
        mayfly(&["admin", "keygen", "--out", stem.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let key = stem.with_extension("key");
    let out = mayfly(&[
        "admin",
        "key",
        "rotate",
        "--key",
        key.to_str().unwrap(),
        "--socket",
        "/nonexistent/admin.sock",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/admin.sock"), "{err}");
}

#[test]
fn a_command_must_name_its_appliance_where_the_agent_cannot_be_asked() {
    // Over TCP (anyone local could be listening) and offline, --appliance is required;
    // a malformed one is refused before anything is signed or sent.
    for args in [
        &["admin", "status", "--tcp", "127.0.0.1:9"][..],
        &["admin", "prepare", "--out", "/nonexistent/x.cmd", "status"],
        &[
            "admin",
            "status",
            "--appliance",
            "xyz",
            "--tcp",
            "127.0.0.1:9",
        ],
    ] {
        let out = mayfly(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("appliance"), "{args:?}: {err}");
    }
}
