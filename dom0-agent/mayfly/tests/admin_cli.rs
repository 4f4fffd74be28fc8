//! The shape of `mayfly admin`: each subcommand offers (in `--help`) and accepts exactly
//! the options that apply to it.

use std::process::{Command, Output};

fn mayfly(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(args)
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

fn offers(args: &[&str], yes: &[&[&str]], no: &[&[&str]]) {
    let h = help(args);
    for opt in yes.iter().flat_map(|g| g.iter()) {
        assert!(
            h.contains(&format!("{opt} ")),
            "{args:?} should offer {opt}:\n{h}"
        );
    }
    for opt in no.iter().flat_map(|g| g.iter()) {
        assert!(
            !h.contains(&format!("{opt} ")),
            "{args:?} must not offer {opt}:\n{h}"
        );
    }
}

#[test]
fn each_subcommand_offers_only_its_options() {
    offers(&["admin", "keygen"], &[], &[SIGN, VALIDITY, CONN]);
    offers(&["admin", "inspect"], &[], &[SIGN, VALIDITY, CONN]);
    offers(&["admin", "cosign"], &[SIGN], &[VALIDITY, CONN]);
    offers(&["admin", "submit"], &[SIGN, CONN], &[VALIDITY]);
    offers(&["admin", "prepare"], &[SIGN, VALIDITY], &[CONN]);
    offers(
        &["admin", "prepare", "--out", "f", "rollback"],
        &[SIGN, VALIDITY],
        &[CONN],
    );
    offers(&["admin", "status"], &[SIGN, VALIDITY, CONN], &[]);
    offers(&["admin", "tx", "list"], &[SIGN, VALIDITY, CONN], &[]);
    offers(&["admin", "key", "rotate"], &[SIGN, VALIDITY, CONN], &[]);
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
    let out = mayfly(&["admin", "tx", "list", "--key", "/nonexistent/alice.key"]);
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
