//! `dom0-agent serve`'s configuration through the real binary: a bad file stops it before
//! anything is opened, naming the file, the line, the key and the bound; `--print-config`
//! prints the configuration in force as a file that reads back to the same; `--help` lists
//! every key.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Agent;

/// Runs `dom0-agent serve ARGS` (on a port of its own choosing, data in `data`) to its end:
/// exit code, stdout, stderr. One that keeps running (serving instead of refusing) is
/// killed and fails the test.
fn serve(data: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(common::agent_exe());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(args);
    let out = common::output_within(cmd, Duration::from_secs(20));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `text` as `agent.toml` in `dir`, refused by `serve`: its stderr. Nothing was opened.
fn refused(dir: &Path, text: &str) -> String {
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).unwrap();
    let data = dir.join("data");
    let (code, _, err) = serve(&data, &["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{text}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!data.exists(), "{text}: the data directory was created");
    err
}

/// Each `(file text, what the error must say)`: `{file}` is the file's path.
fn expect_refusals(cases: &[(&str, &[&str])]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml").display().to_string();
    for (text, expected) in cases {
        let err = refused(dir.path(), text);
        for e in *expected {
            let e = e.replace("{file}", &file);
            assert!(err.contains(&e), "{text:?}: {e:?} missing from: {err}");
        }
    }
}

#[test]
fn unknown_keys_are_refused_with_the_file_the_line_and_the_nearest_key() {
    expect_refusals(&[
        (
            "# comment\nmax_in_flight = 7\npool_sise = 2\n",
            &[
                "{file}:3: unknown key `pool_sise` in the top level",
                "did you mean `pool_size`?",
            ],
        ),
        (
            "pool_size = 2\n\n[console]\nclock_skew = 5\n",
            &[
                "{file}:4: unknown key `clock_skew` in [console]",
                "did you mean `clock_skew_secs`?",
            ],
        ),
        // A key of one section written in another is unknown there.
        (
            "[xen]\npool_size = 2\n",
            &["{file}:2: unknown key `pool_size` in [xen]"],
        ),
        // An unknown section, and a section that is not a table.
        (
            "\n[xne]\nkernel = \"k\"\n",
            &["{file}:2: unknown key `xne`", "did you mean `xen`?"],
        ),
        ("tls = \"on\"\n", &["{file}:1: `tls` must be a table"]),
        // The [siem] section, read by the exporter's own reader, names the line too.
        (
            "pool_size = 2\n[siem]\npen = 1\nbogus = 1\n",
            &["{file}:4: in the [siem] section: unknown field `bogus`"],
        ),
    ]);
    // Nothing close: no suggestion.
    let dir = tempfile::tempdir().unwrap();
    let err = refused(dir.path(), "frobnicate = true\n");
    assert!(err.contains("unknown key `frobnicate`"), "{err}");
    assert!(!err.contains("did you mean"), "{err}");
}

#[test]
fn wrong_types_and_values_out_of_bounds_name_the_line_the_key_and_the_bound() {
    expect_refusals(&[
        (
            "pool_size = 2\nmax_in_flight = \"7\"\n",
            &["{file}:2: max_in_flight: expected a non-negative integer"],
        ),
        // Checked even though --listen (given by `serve` here) overrides it.
        (
            "listen = \"localhost\"\n",
            &["{file}:1: listen: expected an address"],
        ),
        (
            "[tls]\ncert = 5\n",
            &["{file}:2: [tls] cert: expected a path"],
        ),
        ("pool_size = -1\n", &["{file}:1: pool_size"]),
        (
            "\nmax_connections = 2000000\n",
            &[
                "{file}:2: max_connections = 2000000 is above its limit of 1000000",
                "flag --max-connections",
            ],
        ),
        (
            "[xen]\nguest = \"linux\"\nready_timeout_ms = 0\n",
            &["{file}:3: [xen] ready_timeout_ms = 0 is below its minimum of 1"],
        ),
        (
            "[xen]\nguest_cap_percent = 101\n",
            &["{file}:2: [xen] guest_cap_percent = 101 is above its limit of 100"],
        ),
        (
            "[xen]\nguest_weight = 65536\n",
            &["{file}:2: [xen] guest_weight = 65536 is above its limit of 65535"],
        ),
        (
            "[xen]\nguest_weight = 0\n",
            &["{file}:2: [xen] guest_weight = 0 is below its minimum of 1"],
        ),
        (
            "[console]\nclock_skew_secs = 86400\n",
            &["{file}:2: [console] clock_skew_secs = 86400 is above its limit of 3600"],
        ),
        (
            "backend = \"kvm\"\n",
            &["{file}:1: unknown backend \"kvm\"; use one of sandbox, xen"],
        ),
        ("pool_size = = 2\n", &["{file}:1: not valid TOML"]),
    ]);

    // A flag out of bounds names the flag; it wins over a valid file value, and is refused.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.toml"), "workers = 4\n").unwrap();
    let (code, _, err) = serve(
        &dir.path().join("data"),
        &[
            "--config",
            dir.path().join("agent.toml").to_str().unwrap(),
            "--workers",
            "0",
        ],
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("flag --workers: workers = 0 is below its minimum of 1"),
        "{err}"
    );
}

#[test]
fn a_file_larger_than_a_mebibyte_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("# {}\n", "x".repeat(1 << 20));
    let err = refused(dir.path(), &text);
    assert!(err.contains("is larger than 1048576 bytes"), "{err}");
}

#[test]
fn print_config_shows_what_is_in_force_and_reads_back_to_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = dir.path().join("agent.toml");
    std::fs::write(
        &first,
        "pool_size = 2\nmax_in_flight = 7\n[xen]\nbuild_threads = 3\nguest_weight = 64\n\
         [console]\nclock_skew_secs = 30\n\
         [[siem.collector]]\nname = \"soc\"\ntransport = \"udp\"\naddress = \"127.0.0.1:514\"\n",
    )
    .unwrap();
    let (code, printed, err) = serve(
        &data,
        &[
            "--config",
            first.to_str().unwrap(),
            "--max-in-flight",
            "3",
            "--console-max-validity-secs",
            "600",
            "--xen-guest-cap-percent",
            "30",
            "--print-config",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(!data.exists(), "--print-config opened the ledger");
    let table: toml::Table = toml::from_str(&printed).unwrap();
    assert_eq!(table["max_in_flight"].as_integer(), Some(3), "{printed}");
    assert_eq!(table["pool_size"].as_integer(), Some(2), "{printed}");
    assert_eq!(table["workers"].as_integer(), Some(2), "{printed}");
    assert_eq!(table["listen"].as_str(), Some("127.0.0.1:0"), "{printed}");
    assert_eq!(table["xen"]["build_threads"].as_integer(), Some(3));
    assert_eq!(table["xen"]["guest_weight"].as_integer(), Some(64));
    assert_eq!(table["xen"]["guest_cap_percent"].as_integer(), Some(30));
    assert_eq!(table["console"]["clock_skew_secs"].as_integer(), Some(30));
    assert_eq!(
        table["console"]["max_validity_secs"].as_integer(),
        Some(600)
    );
    assert_eq!(table["siem"]["collector"][0]["name"].as_str(), Some("soc"));

    // Read back alone (no flags besides the same --listen/--data-dir), it is the same.
    let second = dir.path().join("printed.toml");
    std::fs::write(&second, &printed).unwrap();
    let (code, again, err) = serve(
        &data,
        &["--config", second.to_str().unwrap(), "--print-config"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(again, printed);
}

#[test]
fn help_lists_every_key_of_the_file_with_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (code, printed, err) = serve(&dir.path().join("data"), &["--print-config"]);
    assert_eq!(code, Some(0), "{err}");
    let help = Command::new(common::agent_exe())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let mut keys = 0;
    for line in printed.lines() {
        // `key = value` or `# key is unset: ...`
        let key = line
            .strip_prefix("# ")
            .and_then(|l| l.split_once(" is unset"))
            .map(|(k, _)| k)
            .or_else(|| line.split_once(" = ").map(|(k, _)| k));
        let Some(key) = key else { continue };
        keys += 1;
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{key} "))),
            "{key} is missing from serve --help"
        );
    }
    assert!(keys > 50, "{printed}");
    for flag in [
        "--xen-ready-timeout-ms",
        "--xen-build-threads",
        "--xen-guest-weight",
        "--xen-guest-cap-percent",
        "--console-clock-skew-secs",
        "--detector-token",
    ] {
        assert!(help.contains(flag), "{flag} is missing from serve --help");
    }
}

/// Keys that had only a flag before (`detector_token`) work from the file.
#[test]
fn the_detector_token_file_can_be_set_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("secrets").join("detector.token");
    std::fs::create_dir(token.parent().unwrap()).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("detector_token = {:?}\n", token.to_str().unwrap()),
    )
    .unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    assert!(
        token.is_file(),
        "the token was not created where the file says"
    );
    assert!(!dir.path().join("data").join("detector.token").exists());
    drop(agent);
}

/// The configuration the appliance image ships is read without a complaint (every key
/// known, every value in bounds).
#[test]
fn the_shipped_configuration_reads_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../buildroot/board/mayfly/rootfs-overlay/etc/mayfly/agent.toml");
    let (code, printed, err) = serve(
        &dir.path().join("data"),
        &["--config", shipped.to_str().unwrap(), "--print-config"],
    );
    assert_eq!(code, Some(0), "{err}");
    let table: toml::Table = toml::from_str(&printed).unwrap();
    assert_eq!(table["backend"].as_str(), Some("xen"), "{printed}");
    assert_eq!(table["xen"]["ready_timeout_ms"].as_integer(), Some(120_000));
}
