//! The agent admits the handlers its backend's guest announced, and refuses to start with a
//! policy written for handlers the guest does not have.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{policy_dir, zygote_exe, Agent};
use serde_json::json;

#[test]
fn a_policy_naming_a_handler_the_guest_lacks_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let [flag, path] = policy_dir(
        dir.path(),
        "policy",
        &[(
            "p.toml",
            "[handler.kv]\nread = [\"kv/\"]\nwrite = [\"kv/\"]\n\n[handler.ghost]\nread = [\"g/\"]\n",
        )],
    );
    let mut child = Command::new(common::agent_exe())
        .args(["serve", "--listen", "127.0.0.1:0", "--pool-size", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--zygote")
        .arg(zygote_exe())
        .args([flag, path])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: the refusal comes once the sandbox has started and announced its handlers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running with a policy for a handler its guest lacks");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("grants capabilities to handlers the sandbox guest does not have: ghost"),
        "{stderr}"
    );
    // The handlers the template does have are listed, so the operator sees the mismatch.
    assert!(stderr.contains("kv"), "{stderr}");
}

#[test]
fn the_agent_admits_what_the_template_announced_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    // `kv` is built into the template; `ghost` is not, so it is refused before any domain
    // is taken, naming the handlers the template announced.
    let (status, body) = agent.tx("kv", json!({"op": "get", "key": "kv/a"}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = agent.tx("ghost", json!({}));
    assert_eq!(status, 404, "{body}");
    let text = body.to_string();
    assert!(text.contains("kv") && text.contains("transfer"), "{text}");
}
