//! What sealing to every boot of an A/B switch costs, two ways, against one state in the same
//! run (swtpm on loopback; docs/decisions/0006-reseal-for-every-boot-of-a-switch.md):
//!
//! * `seal`   — sealing the seed: to 1 state (baseline); to the 5 states of a switch with 3
//!   trial boots in one `TPM2_PolicyOR` blob; as 5 blobs of one state each.
//! * `unseal` — releasing it on a boot in the last of those states: the 1-state blob
//!   (baseline); the 5-state blob; the 5 one-state blobs tried in turn (4 refused first, as
//!   a start that tries each file would).
//!
//! Run: `cargo bench -p mayfly-tpm --bench reseal` (env `BENCH_REPS`, default 5;
//! `BENCH_OPS` per rep and variant, default 10). Interleaved: every variant in every
//! repetition, in rotating order. Medians in ms.

#![allow(missing_docs, clippy::cast_possible_truncation)]

use std::time::Instant;

use mayfly_tpm::swtpm::{expected_after_boot, measure_boot, Swtpm, GOOD_CMDLINE};
use mayfly_tpm::{PcrValue, Tpm, DEFAULT_PCRS};

type State = Vec<(u8, PcrValue)>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (reps, ops) = if measuring {
        (env("BENCH_REPS", 5), env("BENCH_OPS", 10))
    } else {
        (1, 1)
    };
    let root = tempfile::Builder::new()
        .prefix("mayfly-tpm-reseal-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let sw = Swtpm::start(&root.path().join("tpm")).expect("swtpm (apt-get install swtpm)");
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    measure_boot(&mut tpm, GOOD_CMDLINE).unwrap();
    // Four other boots, then this one last: the state the PCRs hold now.
    let mut states: Vec<State> = (0..4)
        .map(|i| expected_after_boot(DEFAULT_PCRS, &format!("console=hvc0 ro state={i}")))
        .collect();
    let now = tpm.read_pcrs(DEFAULT_PCRS).unwrap();
    states.push(now.clone());
    let seed = [0x5a; 32];
    let one = tpm.seal(&seed, &now, [0; 32]).unwrap();
    let or5 = tpm.seal_states(&seed, &states, [0; 32]).unwrap();
    let each: Vec<_> = states
        .iter()
        .map(|s| tpm.seal(&seed, s, [0; 32]).unwrap())
        .collect();
    println!(
        "reseal bench: {reps} interleaved reps, {ops} ops per variant, swtpm {}",
        sw.tcti()
    );

    let names = [
        "seal 1 state",
        "seal 5 states, one PolicyOR blob",
        "seal 5 states, 5 blobs",
        "unseal 1-state blob",
        "unseal 5-state PolicyOR blob",
        "unseal 5 blobs tried in turn",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for rep in 0..reps {
        for k in 0..names.len() {
            let v = (k + rep) % names.len();
            for _ in 0..ops {
                let t = match v {
                    0 => ms(|| drop(tpm.seal(&seed, &now, [0; 32]).unwrap())),
                    1 => ms(|| drop(tpm.seal_states(&seed, &states, [0; 32]).unwrap())),
                    2 => ms(|| {
                        for s in &states {
                            drop(tpm.seal(&seed, s, [0; 32]).unwrap());
                        }
                    }),
                    3 => ms(|| assert_eq!(*tpm.unseal(&one).unwrap(), seed)),
                    4 => ms(|| assert_eq!(*tpm.unseal(&or5).unwrap(), seed)),
                    _ => ms(|| {
                        let got = each.iter().find_map(|b| tpm.unseal(b).ok());
                        assert_eq!(*got.unwrap(), seed);
                    }),
                };
                if let Some(s) = samples.get_mut(v) {
                    s.push(t);
                }
            }
        }
    }
    let medians: Vec<f64> = samples.into_iter().map(median).collect();
    for (i, name) in names.iter().enumerate() {
        let base = if i < 3 { medians[0] } else { medians[3] };
        println!(
            "{name:<34} {:>8.1} ms   {:.2}x the 1-state baseline (median)",
            medians[i],
            medians[i] / base
        );
    }
}
