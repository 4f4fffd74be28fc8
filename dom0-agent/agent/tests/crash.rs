//! Crash safety: a process committing transfers is killed with SIGKILL at random points,
//! again and again on the same data directory. After every kill, every commit it had
//! acknowledged is present, no transaction is half-visible, and `verify` passes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use mayfly_ledger::{store, StoreOptions, TxId};

const ACCOUNTS: u64 = 20;
const ROUNDS: usize = 24;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dom0-agent"))
}

fn check_invariants(dir: &Path, acked: &BTreeMap<u64, TxId>) {
    let store = match store::open_read_only(dir, &StoreOptions::default()) {
        Ok(s) => s,
        // Killed before its first commit: nothing was promised, and the next start must
        // finish creating the ledger (checked by the next round).
        Err(store::OpenError::NoLedger { .. } | store::OpenError::Foreign { .. })
            if acked.is_empty() =>
        {
            return
        }
        Err(e) => panic!("reopen after kill: {e}"),
    };
    for (seq, id) in acked {
        assert_eq!(
            store.seq_of(id).unwrap(),
            Some(*seq),
            "acknowledged transaction {id} (seq {seq}) lost"
        );
        let cp = store
            .checkpoint(*seq)
            .unwrap()
            .expect("checkpoint of an acknowledged commit");
        assert_eq!(cp.tx_id, *id);
    }
    let data = store.data_snapshot().unwrap();
    if data.is_empty() {
        assert!(acked.is_empty());
        return;
    }
    let total: u64 = data
        .values()
        .map(|v| std::str::from_utf8(v).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        total,
        ACCOUNTS * 1000,
        "money created or destroyed: a partial transaction is visible"
    );
    // Every live value is exactly the after-image of the checkpoint that claims to have
    // written it: data and checkpoints committed together.
    for (key, value) in &data {
        let (version, v) = store.committed(key).unwrap().unwrap();
        assert_eq!(&v, value);
        let cp = store
            .checkpoint(version)
            .unwrap()
            .expect("writer checkpoint");
        let w = cp
            .writes
            .iter()
            .find(|w| &w.key == key)
            .expect("writer lists the key");
        assert_eq!(w.after.as_deref(), Some(value.as_slice()));
    }
    let out = agent()
        .args(["verify", "--quiet", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify after kill: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_commit() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fastrand::u64(..);
    eprintln!("crash test seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut acked: BTreeMap<u64, TxId> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut child = agent()
            .args([
                "demo",
                "--transfers",
                "0",
                "--threads",
                "4",
                "--print-acks",
                "--accounts",
            ])
            .arg(ACCOUNTS.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Round 0 and a few others die during start-up; the rest after a random number of
        // acknowledged commits, while more are in flight.
        let kill_after = if round == 0 || rng.u8(..8) == 0 {
            0
        } else {
            rng.usize(1..300)
        };
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < kill_after {
            match lines.next() {
                Some(line) => {
                    let line = line.unwrap();
                    let mut parts = line.split_whitespace();
                    assert_eq!(parts.next(), Some("ack"), "unexpected output {line:?}");
                    let seq: u64 = parts.next().unwrap().parse().unwrap();
                    let id = TxId::parse(parts.next().unwrap()).unwrap();
                    acked.insert(seq, id);
                    seen += 1;
                }
                None => panic!("demo exited early in round {round}"),
            }
        }
        child.kill().unwrap(); // SIGKILL
                               // Acknowledgements already written before the kill count too.
        for line in lines {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            if let (Some("ack"), Some(seq), Some(id)) = (parts.next(), parts.next(), parts.next()) {
                acked.insert(seq.parse().unwrap(), TxId::parse(id).unwrap());
            }
        }
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the demo must have been killed"
        );
        check_invariants(dir.path(), &acked);
    }
    assert!(
        acked.len() > ROUNDS,
        "too few commits were acknowledged to mean anything: {}",
        acked.len()
    );
}
