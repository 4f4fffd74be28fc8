//! `domu_shim::run` against a fake agent over real shared memory and eventfds.

mod common;

use std::time::Duration;

use common::{start, transact, Agent, End};
use domu_shim::{exit, run, run_with, try_run, Config, Outcome, RunError};
use mayfly_ring::wire::{LogLevel as WireLevel, MAX_RESULT_LEN};
use mayfly_ring::{EventFdNotifier, Geometry, MmapMem, Response};
use mayfly_sdk::{Ctx, HandlerError, LogLevel, Registry};
use serde_json::{json, Value};

fn examples() -> Registry {
    mayfly_handlers::registry()
}

/// Runs `handler` with `payload` from `registry` against `agent`; returns the shim's outcome
/// and what the agent saw.
fn tx(
    registry: Registry,
    handler: &str,
    payload: Value,
    agent: Agent,
) -> (Result<Outcome, RunError>, common::Record) {
    tx_seeded(
        registry,
        handler,
        payload.to_string().as_bytes(),
        [7; 32],
        agent,
    )
}

fn tx_seeded(
    registry: Registry,
    handler: &str,
    payload: &[u8],
    seed: [u8; 32],
    agent: Agent,
) -> (Result<Outcome, RunError>, common::Record) {
    transact(start(handler, payload, seed), agent, move |mem, n| {
        try_run(mem, &n, &registry, &Config::default())
    })
}

fn committed_json(end: &End) -> Value {
    match end {
        End::Committed(result) => serde_json::from_slice(result).unwrap(),
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[test]
fn ready_announces_every_handler_the_guest_answers_to() {
    let (_, record) = tx(
        examples(),
        "kv",
        json!({"op":"get","key":"k/1"}),
        Agent::default(),
    );
    #[cfg_attr(not(feature = "test-handlers"), allow(unused_mut))]
    let mut want: Vec<String> = examples().names().map(str::to_owned).collect();
    #[cfg(feature = "test-handlers")]
    {
        want.extend(
            domu_shim::test_handlers::SDK_TEST_HANDLERS
                .iter()
                .chain(
                    domu_shim::test_handlers::TEST_HANDLERS
                        .iter()
                        .map(|(n, _)| n),
                )
                .map(|n| (*n).to_owned()),
        );
        want.sort();
    }
    assert!(want.len() > 1, "{want:?}");
    assert_eq!(record.ready_handlers, want);
    assert_eq!(
        record.ready_handlers,
        domu_shim::announced_handlers(&examples(), &Config::default())
    );
    // Sorted, no duplicates: the wire would have refused it otherwise, but say so here too.
    assert!(record.ready_handlers.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn kv_put_then_get_and_scan() {
    let (outcome, record) = tx(
        examples(),
        "kv",
        json!({"op":"put","key":"k/1","value":"one"}),
        Agent::with_data([("k/0", "zero")]),
    );
    assert_eq!(outcome.unwrap(), Outcome::Committed);
    assert_eq!(committed_json(&record.end), json!({"key":"k/1","ok":true}));
    assert_eq!(record.value("k/1"), Some("one"));
    assert_eq!(record.ops, 1);

    let data = record.data.clone();
    let (outcome, record) = tx(
        examples(),
        "kv",
        json!({"op":"get","key":"k/1"}),
        Agent {
            data: data.clone(),
            ..Agent::default()
        },
    );
    assert_eq!(outcome.unwrap(), Outcome::Committed);
    assert_eq!(
        committed_json(&record.end),
        json!({"key":"k/1","value":"one"})
    );

    let (_, record) = tx(
        examples(),
        "kv",
        json!({"op":"scan","key":"k/","limit":1}),
        Agent {
            data,
            ..Agent::default()
        },
    );
    assert_eq!(
        committed_json(&record.end),
        json!({"entries":[{"key":"k/0","value":"zero"}],"more":true})
    );
}

#[test]
fn transfer_commits_both_balances() {
    let (outcome, record) = tx(
        examples(),
        "transfer",
        json!({"from":"alice","to":"bob","amount":30}),
        Agent::with_data([("acct/alice", "100"), ("acct/bob", "5")]),
    );
    assert_eq!(outcome.unwrap(), Outcome::Committed);
    assert_eq!(
        committed_json(&record.end),
        json!({"amount":30,"from":{"name":"alice","balance":70},"to":{"name":"bob","balance":35}})
    );
    assert_eq!(record.value("acct/alice"), Some("70"));
    assert_eq!(record.value("acct/bob"), Some("35"));
}

#[test]
fn open_account_then_transfer_seeds_through_handlers() {
    let (_, record) = tx(
        examples(),
        "open_account",
        json!({"name":"carol","balance":50}),
        Agent::with_data([("acct/dave", "0")]),
    );
    assert_eq!(record.value("acct/carol"), Some("50"));
    let (outcome, record) = tx(
        examples(),
        "transfer",
        json!({"from":"carol","to":"dave","amount":50}),
        Agent {
            data: record.data,
            ..Agent::default()
        },
    );
    assert_eq!(outcome.unwrap(), Outcome::Committed);
    assert_eq!(record.value("acct/carol"), Some("0"));
    assert_eq!(record.value("acct/dave"), Some("50"));
}

#[test]
fn overdraft_aborts_with_the_reason_and_writes_nothing() {
    let agent = Agent::with_data([("acct/alice", "100"), ("acct/bob", "5")]);
    let before = agent.data.clone();
    let (outcome, record) = tx(
        examples(),
        "transfer",
        json!({"from":"bob","to":"alice","amount":6}),
        agent,
    );
    let reason = "rejected: insufficient funds: bob has 5, needs 6";
    assert_eq!(
        outcome.unwrap(),
        Outcome::Aborted {
            reason: reason.into()
        }
    );
    assert_eq!(record.end, End::Aborted(reason.into()));
    assert_eq!(record.data, before);
}

#[test]
fn notes_exploit_writes_outside_its_range() {
    let (outcome, record) = tx(
        examples(),
        "notes",
        json!({"op":"put","user":"mallory","note_id":"../../acct/mallory","text":"1000000"}),
        Agent::with_data([("acct/mallory", "0")]),
    );
    assert_eq!(outcome.unwrap(), Outcome::Committed);
    assert_eq!(record.value("acct/mallory"), Some("1000000"));
    assert!(record.data.keys().all(|k| !k.starts_with(b"notes/")));
}

#[test]
fn unknown_handler_aborts_without_touching_data() {
    let (outcome, record) = tx(examples(), "no-such-handler", json!({}), Agent::default());
    let reason = "unknown handler \"no-such-handler\"";
    assert_eq!(
        outcome.unwrap(),
        Outcome::Aborted {
            reason: reason.into()
        }
    );
    assert_eq!(record.end, End::Aborted(reason.into()));
    assert_eq!(record.ops, 0);
}

fn draw(ctx: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let mut out = ctx.rng().next_u64().to_be_bytes().to_vec();
    out.extend_from_slice(ctx.tx_id());
    Ok(out)
}

fn rng_registry() -> Registry {
    let mut r = Registry::new();
    r.register("draw", draw).unwrap();
    r
}

#[test]
fn rng_is_seeded_from_start_same_seed_same_draw() {
    let run_with_seed = |seed| {
        let (outcome, record) = tx_seeded(rng_registry(), "draw", b"", seed, Agent::default());
        assert_eq!(outcome.unwrap(), Outcome::Committed);
        match record.end {
            End::Committed(result) => result,
            other => panic!("{other:?}"),
        }
    };
    let a = run_with_seed([1; 32]);
    let b = run_with_seed([1; 32]);
    let mut other_seed = [1; 32];
    other_seed[0] = 2;
    let c = run_with_seed(other_seed);
    assert_eq!(a, b, "same seed, same draw");
    assert_ne!(a[..8], c[..8], "different seeds, different draws");
    // The draw is exactly the seed's ChaCha20 stream, and the tx id arrives.
    let expected = mayfly_sdk::HandlerRng::from_seed([1; 32]).next_u64();
    assert_eq!(a[..8], expected.to_be_bytes());
    assert_eq!(a[8..], [0x42; 16]);
}

fn panics(_: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let index = payload.len() + 10;
    Ok(vec![payload[index]]) // out of bounds: panics
}

fn logs(ctx: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    ctx.log(LogLevel::Warn, "two\nlines")?;
    ctx.db().log(LogLevel::Trace, &"x".repeat(5000))?;
    Ok(Vec::new())
}

fn huge(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    Ok(vec![0; MAX_RESULT_LEN + 1])
}

fn put_secret(ctx: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    ctx.db().put(b"ok/1", b"fine")?;
    ctx.db().put(b"secret/1", b"x")?;
    Ok(b"not reached".to_vec())
}

/// Ignores the error of its write: pipelined, it has not arrived when the handler returns.
fn ignores_write_error(ctx: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let _ = ctx.db().put(b"secret/1", b"x");
    let _ = ctx.db().put(b"ok/1", b"fine");
    Ok(b"must not commit".to_vec())
}

/// Reads after a refused write, and goes on after the read fails.
fn reads_after_write_error(ctx: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    ctx.db().put(b"secret/1", b"x")?;
    let read = ctx.db().get(b"ok/1");
    let again = ctx.db().get(b"ok/1");
    assert_eq!(read, again, "the deferred error is returned again");
    let Err(e) = read else {
        return Ok(b"the read succeeded".to_vec());
    };
    Err(HandlerError::rejected(format!("handler saw: {e}")))
}

fn misc_registry() -> Registry {
    let mut r = Registry::new();
    r.register("panics", panics).unwrap();
    r.register("logs", logs).unwrap();
    r.register("huge", huge).unwrap();
    r.register("put_secret", put_secret).unwrap();
    r.register("ignores_write_error", ignores_write_error)
        .unwrap();
    r.register("reads_after_write_error", reads_after_write_error)
        .unwrap();
    r.register("draw", draw).unwrap();
    r
}

#[test]
fn handler_panic_aborts_and_exits_zero() {
    let registry = misc_registry();
    let (status, record) = transact(
        start("panics", b"", [0; 32]),
        Agent::default(),
        move |mem, n| run(mem, &n, &registry),
    );
    assert_eq!(status, exit::OK);
    assert_eq!(record.end, End::Aborted("handler panicked".into()));
}

#[test]
fn log_lines_are_forwarded_sanitized_and_capped() {
    let (outcome, record) = tx(misc_registry(), "logs", json!(null), Agent::default());
    assert_eq!(outcome.unwrap(), Outcome::Committed);
    assert_eq!(record.logs.len(), 2);
    assert_eq!(
        record.logs[0],
        (WireLevel::Warn, "two\u{fffd}lines".to_string())
    );
    assert_eq!(record.logs[1].0, WireLevel::Trace);
    assert_eq!(record.logs[1].1.len(), 1024);
}

#[test]
fn oversized_result_aborts() {
    let (outcome, record) = tx(misc_registry(), "huge", json!(null), Agent::default());
    let Ok(Outcome::Aborted { reason }) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("exceeds 65536"), "{reason}");
    assert!(matches!(record.end, End::Aborted(_)));
}

#[test]
fn policy_denial_reaches_the_handler_and_aborts() {
    let agent = Agent {
        deny_prefix: Some(b"secret/".to_vec()),
        ..Agent::default()
    };
    let (outcome, record) = tx(misc_registry(), "put_secret", json!(null), agent);
    let reason = "database: denied by policy: policy: secret/1 is off limits";
    assert_eq!(
        outcome.unwrap(),
        Outcome::Aborted {
            reason: reason.into()
        }
    );
    // Both writes pipelined, the handler returned `Ok`: the Commit went right behind
    // them, and the agent refused it (the real agent stops serving at a denial instead).
    assert_eq!(record.end, End::CommitRefused(b"not reached".to_vec()));
    assert!(
        record.data.is_empty(),
        "the earlier write was not committed"
    );
}

#[test]
fn a_refused_write_the_handler_ignored_still_aborts_and_is_never_committed() {
    // The fake agent, like the real one for a ledger error, answers the refused write with
    // an Error and goes on serving, and refuses a Commit after it.
    let agent = Agent {
        deny_prefix: Some(b"secret/".to_vec()),
        ..Agent::default()
    };
    let (outcome, record) = tx(misc_registry(), "ignores_write_error", json!(null), agent);
    let reason = "database: denied by policy: policy: secret/1 is off limits";
    assert_eq!(
        outcome.unwrap(),
        Outcome::Aborted {
            reason: reason.into()
        }
    );
    // The Commit went right behind the writes; the agent refused it (a Commit after a
    // refused write always is) and the shim reports the write's error.
    assert_eq!(record.end, End::CommitRefused(b"must not commit".to_vec()));
    assert_eq!(
        record.ops, 2,
        "both writes were sent before the error was known"
    );
    assert!(record.data.is_empty());
}

#[test]
fn an_agent_that_commits_behind_a_refused_write_breaks_the_protocol() {
    let agent = Agent {
        deny_prefix: Some(b"secret/".to_vec()),
        commit_after_refused_write: true,
        ..Agent::default()
    };
    let (outcome, _) = tx(misc_registry(), "ignores_write_error", json!(null), agent);
    // Never reported as a success: the shim knows one of the writes was refused.
    match outcome {
        Err(RunError::BadFinishReply { sent, reply }) => {
            assert_eq!((sent, reply), ("Commit", "Committed"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refused_write_surfaces_at_the_next_read_which_is_not_sent() {
    let agent = Agent {
        deny_prefix: Some(b"secret/".to_vec()),
        ..Agent::default()
    };
    let (outcome, record) = tx(
        misc_registry(),
        "reads_after_write_error",
        json!(null),
        agent,
    );
    let reason = "rejected: handler saw: denied by policy: policy: secret/1 is off limits";
    assert_eq!(
        outcome.unwrap(),
        Outcome::Aborted {
            reason: reason.into()
        }
    );
    assert_eq!(record.end, End::Aborted(reason.into()));
    assert_eq!(record.ops, 1, "only the write reached the agent");
}

#[test]
fn unexpected_answer_is_a_transport_error_and_still_aborts_cleanly() {
    let agent = Agent {
        get_reply: Some(Response::Ok),
        ..Agent::with_data([("acct/a", "1"), ("acct/b", "1")])
    };
    let (outcome, _) = tx(
        examples(),
        "transfer",
        json!({"from":"a","to":"b","amount":1}),
        agent,
    );
    assert_eq!(
        outcome.unwrap(),
        Outcome::Aborted {
            reason: "database: transport failure: get: the agent answered with Ok".into()
        }
    );
}

#[test]
fn refused_commit_is_reported_and_exits_zero() {
    let agent = Agent {
        refuse_commit: true,
        ..Agent::default()
    };
    let (outcome, record) = tx(misc_registry(), "draw", json!(null), agent.clone());
    assert_eq!(outcome.unwrap(), Outcome::CommitRefused);
    assert!(matches!(record.end, End::CommitRefused(_)));
    let registry = misc_registry();
    let (status, _) = transact(start("draw", b"", [0; 32]), agent, move |mem, n| {
        run(mem, &n, &registry)
    });
    assert_eq!(status, exit::OK);
}

#[test]
fn unanswered_database_call_times_out_and_exits_13() {
    let agent = Agent {
        stall_on_db: true,
        ..Agent::default()
    };
    let registry = examples();
    let (result, record) = transact(
        start("kv", br#"{"op":"get","key":"k"}"#, [0; 32]),
        agent,
        move |mem, n| {
            let config = Config::with_timeouts(Duration::from_millis(200), Duration::from_secs(5));
            try_run(mem, &n, &registry, &config)
        },
    );
    assert_eq!(record.end, End::Stopped("stalled".into()));
    let err = result.unwrap_err();
    assert!(matches!(err, RunError::Database { .. }), "{err:?}");
    assert_eq!(err.exit_code(), exit::DATABASE);
    assert!(
        domu_shim::error_chain(&err).contains("no message within"),
        "{err}"
    );
}

#[test]
fn answer_to_ready_other_than_start_exits_12() {
    let agent = Agent {
        ready_reply: Some(Response::Ok),
        wait: Some(Duration::from_millis(300)),
        ..Agent::default()
    };
    let registry = examples();
    let (status, record) = transact(start("kv", b"", [0; 32]), agent, move |mem, n| {
        run_with(mem, &n, &registry, &Config::default())
    });
    assert_eq!(status, exit::NOT_START);
    // The shim sent nothing more: the agent timed out waiting.
    assert!(matches!(record.end, End::Stopped(_)));
}

#[test]
fn uninitialised_ring_exits_10() {
    let mem = MmapMem::anonymous(Geometry::DEFAULT.total_len()).unwrap();
    let (_agent, shim) = EventFdNotifier::pair().unwrap();
    let err = try_run(mem, &shim, &examples(), &Config::default()).unwrap_err();
    assert!(matches!(err, RunError::Attach(_)), "{err:?}");
    let mem = MmapMem::anonymous(Geometry::DEFAULT.total_len()).unwrap();
    assert_eq!(run(mem, &shim, &examples()), exit::ATTACH);
}
