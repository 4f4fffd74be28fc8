//! Behaviour of the engine against the shipped default bundle and small bundles per rule kind.

use mayfly_policy::*;

const DEFAULT: [(&str, &str); 3] = [
    (
        "engine.toml",
        include_str!("../../../policies/default/engine.toml"),
    ),
    (
        "handlers.toml",
        include_str!("../../../policies/default/handlers.toml"),
    ),
    (
        "detection.toml",
        include_str!("../../../policies/default/detection.toml"),
    ),
];

const EXAMPLES: [(&str, &str); 1] = [(
    "minimal.toml",
    include_str!("../../../policies/examples/minimal.toml"),
)];

const TX: [u8; 16] = [0xab; 16];

fn default_bundle() -> Bundle {
    Bundle::load(&DEFAULT).expect("the shipped bundle loads")
}

/// The shipped bundle with small rate limits (50 admissions/s per client, 5 transfers/s),
/// so the rate tests stay short whatever the shipped limits are.
fn small_rates_bundle() -> Bundle {
    let files: Vec<(String, String)> = DEFAULT
        .iter()
        .map(|(n, t)| {
            let t = t
                .replace(
                    "name = \"rate.client\"\nmax = 2_000",
                    "name = \"rate.client\"\nmax = 50",
                )
                .replace(
                    "name = \"rate.transfer\"\nmax = 1_000",
                    "name = \"rate.transfer\"\nmax = 5",
                );
            ((*n).to_owned(), t)
        })
        .collect();
    Bundle::load(&files).expect("the shipped bundle with small rates loads")
}

fn one(text: &str) -> Bundle {
    Bundle::load(&[("t.toml", text)]).unwrap_or_else(|e| panic!("{e}"))
}

fn op<'a>(handler: &'a str, op: Op<'a>) -> Event<'a> {
    Event::Op {
        tx: TX,
        handler,
        client: "client-1",
        op,
        ops_so_far: 0,
        bytes_written_so_far: 0,
        elapsed_ms: 1,
    }
}

fn get(key: &[u8]) -> Op<'_> {
    Op::Get { key }
}

fn put<'a>(key: &'a [u8], value: &'a [u8]) -> Op<'a> {
    Op::Put { key, value }
}

fn eval(b: &Bundle, e: Event<'_>) -> Decision {
    let d = b.evaluate(&e, &mut State::new());
    check_fields(&d);
    d
}

fn field<'d>(d: &'d Decision, name: &str) -> Option<&'d str> {
    d.matched
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.value.as_str())
}

fn rule(d: &Decision) -> &str {
    d.rule.as_deref().unwrap_or("")
}

/// Audit rules: names are SD-NAMEs of at most 32 bytes and unique, values at most 1024 bytes.
fn check_fields(d: &Decision) {
    let mut names: Vec<&str> = d.matched.iter().map(|f| f.name).collect();
    for f in &d.matched {
        assert!(!f.name.is_empty() && f.name.len() <= 32, "{}", f.name);
        assert!(f
            .name
            .bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"')));
        assert!(f.value.len() <= 1024);
    }
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(n, names.len(), "duplicate field names in {d:?}");
    if let Some(r) = &d.rule {
        assert!(r.len() <= 64);
    }
    assert_eq!(d.rule.is_none(), d.action == Action::Allow, "{d:?}");
}

// ---- the shipped bundle -------------------------------------------------------------------

#[test]
fn default_bundle_lists_the_shipped_handlers() {
    assert_eq!(
        default_bundle().handlers(),
        [
            "balance",
            "kv",
            "notes",
            "open_account",
            "token",
            "transfer"
        ]
    );
}

#[test]
fn default_bundle_allows_legitimate_work() {
    let b = default_bundle();
    for (h, o) in [
        ("notes", put(b"notes/alice/n1", b"hi")),
        ("notes", get(b"notes/alice/n1")),
        ("transfer", get(b"acct/alice")),
        ("transfer", put(b"acct/alice", b"70")),
        ("open_account", put(b"acct/carol", b"0")),
        ("balance", get(b"acct/bob")),
        ("kv", put(b"kv/a", b"x")),
        ("kv", Op::Delete { key: b"kv/a" }),
        (
            "kv",
            Op::Scan {
                start: b"kv/",
                end: Some(b"kv0"),
            },
        ),
    ] {
        let d = eval(&b, op(h, o));
        assert_eq!(d, Decision::allow(), "{h} {o:?}");
    }
}

#[test]
fn default_bundle_catches_the_notes_exploit() {
    let b = default_bundle();
    // user "mallory", note_id "../../acct/mallory" normalises to acct/mallory.
    let d = eval(&b, op("notes", put(b"acct/mallory", b"1000000")));
    assert_eq!(d.action, Action::Quarantine);
    assert_eq!(rule(&d), "handler.notes.write");
    assert_eq!(d.severity, Severity::Alert);
    assert_eq!(field(&d, "key"), Some("acct/mallory"));
    assert_eq!(field(&d, "handler"), Some("notes"));
    assert_eq!(field(&d, "op"), Some("put"));
    assert_eq!(field(&d, "tx"), Some("abababababababababababababababab"));
    // Reading someone's account through the same hole is refused too.
    let d = eval(&b, op("notes", get(b"acct/alice")));
    assert_eq!(rule(&d), "handler.notes.read");
    // And the commit's write set is checked again.
    let writes = [Write {
        key: b"acct/mallory",
        value: Some(b"1000000"),
    }];
    let d = eval(
        &b,
        Event::Commit {
            tx: TX,
            handler: "notes",
            client: "mallory",
            ops: 1,
            bytes_written: 19,
            elapsed_ms: 3,
            writes: &writes,
        },
    );
    assert_eq!(d.action, Action::Quarantine);
    assert_eq!(rule(&d), "handler.notes.write");
}

#[test]
fn example_bundle_loads() {
    let b = Bundle::load(&EXAMPLES).unwrap();
    assert_eq!(b.handlers(), ["kv"]);
}

// ---- rule kinds ---------------------------------------------------------------------------

#[test]
fn honeytoken_touch_names_rule_and_key() {
    let b = default_bundle();
    let d = eval(&b, op("kv", get(b"secret/db-password")));
    assert_eq!(d.action, Action::Quarantine);
    assert_eq!(rule(&d), "canary.secrets");
    assert_eq!(field(&d, "key"), Some("secret/db-password"));
    assert_eq!(field(&d, "honeytoken"), Some("secret/*"));
    // Inside the handler's own range (the example bundle): only the honeytoken fires, and a
    // scan of the whole range trips it.
    let ex = Bundle::load(&EXAMPLES).unwrap();
    let d = eval(&ex, op("kv", put(b"kv/~canary", b"x")));
    assert_eq!((d.action, rule(&d)), (Action::Abort, "kv.canary"));
    assert!(d.also.is_empty());
    let d = eval(
        &ex,
        op(
            "kv",
            Op::Scan {
                start: b"kv/",
                end: Some(b"kv0"),
            },
        ),
    );
    assert_eq!(rule(&d), "kv.canary");
    assert_eq!(field(&d, "scan_end"), Some("kv0"));
    // A scan of every account covers acct/~canary.
    let scan = Op::Scan {
        start: b"acct/",
        end: Some(b"acct0"),
    };
    let d = eval(&b, op("balance", scan));
    assert_eq!(rule(&d), "canary.accounts");
    assert_eq!(field(&d, "scan_start"), Some("acct/"));
    assert_eq!(field(&d, "honeytoken"), Some("acct/~canary"));
    // A delete of the canary by its exact key.
    let d = eval(
        &b,
        op(
            "transfer",
            Op::Delete {
                key: b"acct/~canary",
            },
        ),
    );
    assert_eq!(rule(&d), "canary.accounts");

    // The bundle chooses the reaction.
    let b = one("[engine]\nunlisted_handler = \"allow\"\n[[honeytoken]]\nname = \"h\"\nkeys = [\"k\"]\naction = \"abort\"\n");
    let d = eval(&b, op("any", get(b"k")));
    assert_eq!((d.action, rule(&d)), (Action::Abort, "h"));
    assert_eq!(d.severity, Severity::Critical);
    assert_eq!(eval(&b, op("any", get(b"k2"))), Decision::allow());
}

#[test]
fn capabilities_read_write_and_ranges() {
    let b = one(
        "[handler.h]\nread = [\"r/\"]\nread_ranges = [{ start = \"m\", end = \"n\" }, { start = \"z\" }]\n\
         write_ranges = [{ start = \"w/a\", end = \"w/c\" }]\n",
    );
    let allowed = [
        get(b"r/1"),
        get(b"m"),
        get(b"mzzz"),
        get(b"zebra"),
        put(b"w/a", b""),
        put(b"w/bzz", b""),
        Op::Scan {
            start: b"r/a",
            end: Some(b"r/b"),
        },
        Op::Scan {
            start: b"z",
            end: None,
        },
    ];
    for o in allowed {
        assert_eq!(eval(&b, op("h", o)), Decision::allow(), "{o:?}");
    }
    let denied = [
        (get(b"n"), "handler.h.read"),
        (get(b"r"), "handler.h.read"),
        (put(b"r/1", b""), "handler.h.write"),
        (put(b"w/c", b""), "handler.h.write"),
        (Op::Delete { key: b"w/" }, "handler.h.write"),
        (
            Op::Scan {
                start: b"r/",
                end: None,
            },
            "handler.h.read",
        ),
        (
            Op::Scan {
                start: b"q",
                end: Some(b"r/x"),
            },
            "handler.h.read",
        ),
    ];
    for (o, r) in denied {
        let d = eval(&b, op("h", o));
        assert_eq!((d.action, rule(&d)), (Action::Abort, r), "{o:?}");
    }
}

#[test]
fn limits_at_op_and_commit() {
    let b = one(
        "[handler.h]\nwrite = [\"k\"]\nmax_ops = 3\nmax_bytes_written = 10\nmax_duration_ms = 100\non_limit = \"quarantine\"\n",
    );
    let at = |ops, bytes, ms, o| Event::Op {
        tx: TX,
        handler: "h",
        client: "c",
        op: o,
        ops_so_far: ops,
        bytes_written_so_far: bytes,
        elapsed_ms: ms,
    };
    assert!(eval(&b, at(2, 0, 0, put(b"k", b"123456789"))).action == Action::Allow);
    let d = eval(&b, at(3, 0, 0, put(b"k", b"")));
    assert_eq!(
        (d.action, rule(&d)),
        (Action::Quarantine, "handler.h.max_ops")
    );
    assert_eq!(field(&d, "limit"), Some("3"));
    assert_eq!(field(&d, "observed"), Some("4"));
    let d = eval(&b, at(0, 1, 0, put(b"k", b"123456789")));
    assert_eq!(rule(&d), "handler.h.max_bytes_written");
    assert_eq!(field(&d, "observed"), Some("11"));
    let d = eval(&b, at(0, 0, 101, put(b"k", b"")));
    assert_eq!(rule(&d), "handler.h.max_duration_ms");

    let commit = |ops, bytes, ms| Event::Commit {
        tx: TX,
        handler: "h",
        client: "c",
        ops,
        bytes_written: bytes,
        elapsed_ms: ms,
        writes: &[],
    };
    assert_eq!(eval(&b, commit(3, 10, 100)), Decision::allow());
    assert_eq!(rule(&eval(&b, commit(4, 0, 0))), "handler.h.max_ops");
    let d = eval(&b, commit(4, 11, 101));
    assert_eq!(d.also.len(), 2, "{d:?}");
}

#[test]
fn value_patterns_require_and_deny() {
    let b = default_bundle();
    let d = eval(&b, op("transfer", put(b"acct/alice", b"lots")));
    assert_eq!((d.action, rule(&d)), (Action::Abort, "acct.balance_format"));
    assert_eq!(field(&d, "value"), Some("lots"));
    assert_eq!(field(&d, "required"), Some("\\\\A[0-9]{1,20}\\\\z"));
    let d = eval(&b, op("transfer", put(b"acct/alice", b"123\n")));
    assert_eq!(rule(&d), "acct.balance_format");
    // A denied pattern with action alert: allowed, but audited.
    let d = eval(&b, op("notes", put(b"notes/eve/1", b"<SCRIPT>x")));
    assert_eq!((d.action, rule(&d)), (Action::Alert, "notes.script"));
    assert!(d.action.permits() && d.audited());
    // Handler filter, and patterns on commit write sets.
    let b = one("[engine]\nunlisted_handler = \"allow\"\n[[pattern]]\nname = \"p\"\nprefixes = [\"x/\"]\nhandlers = [\"a\"]\ndeny = \"evil\"\n");
    assert_eq!(rule(&eval(&b, op("a", put(b"x/1", b"so evil")))), "p");
    assert_eq!(
        eval(&b, op("b", put(b"x/1", b"so evil"))),
        Decision::allow()
    );
    assert_eq!(
        eval(&b, op("a", put(b"y/1", b"so evil"))),
        Decision::allow()
    );
    let writes = [
        Write {
            key: b"x/0",
            value: None,
        },
        Write {
            key: b"x/1",
            value: Some(b"evil"),
        },
    ];
    let d = eval(
        &b,
        Event::Commit {
            tx: TX,
            handler: "a",
            client: "c",
            ops: 2,
            bytes_written: 8,
            elapsed_ms: 1,
            writes: &writes,
        },
    );
    assert_eq!((rule(&d), field(&d, "key")), ("p", Some("x/1")));
}

#[test]
fn rates_per_client_with_window() {
    let b = small_rates_bundle();
    let mut st = State::new();
    let admit = |st: &mut State, client, handler, now_ms| {
        b.evaluate(
            &Event::Admit {
                client,
                handler,
                now_ms,
            },
            st,
        )
    };
    for i in 0..50 {
        assert_eq!(admit(&mut st, "a", "kv", 1_000), Decision::allow(), "{i}");
    }
    let d = admit(&mut st, "a", "kv", 1_000);
    assert_eq!((d.action, rule(&d)), (Action::Abort, "rate.client"));
    assert_eq!(field(&d, "client"), Some("a"));
    assert_eq!(field(&d, "max"), Some("50"));
    // Another client is not affected; a window later the first may go on.
    assert_eq!(admit(&mut st, "b", "kv", 1_000), Decision::allow());
    // Refill at the steady rate: one admission per 20 ms.
    assert_eq!(rule(&admit(&mut st, "a", "kv", 1_019)), "rate.client");
    assert_eq!(admit(&mut st, "a", "kv", 1_020), Decision::allow());
    assert_eq!(rule(&admit(&mut st, "a", "kv", 1_020)), "rate.client");
    for _ in 0..50 {
        assert_eq!(admit(&mut st, "a", "kv", 2_100), Decision::allow());
    }
    // A per-handler rate: 5 transfers, then refused; refusals are not counted.
    for i in 0..5 {
        assert_eq!(
            admit(&mut st, "t", "transfer", 10_000 + i),
            Decision::allow()
        );
    }
    for _ in 0..100 {
        assert_eq!(
            rule(&admit(&mut st, "t", "transfer", 10_010)),
            "rate.transfer"
        );
    }
    // Steady rate: one transfer per 200 ms is fine once the burst has drained.
    for i in 0..20 {
        assert_eq!(
            admit(&mut st, "t", "transfer", 11_000 + 200 * i),
            Decision::allow()
        );
    }
    // Unlisted handlers are refused at admission and not counted.
    let d = admit(&mut st, "z", "nope", 0);
    assert_eq!(rule(&d), "builtin.unlisted_handler");
}

#[test]
fn rate_state_is_bounded_and_bound_to_its_bundle() {
    let b = one("[engine]\nunlisted_handler = \"allow\"\n[[rate]]\nname = \"r\"\nmax = 1\nwindow_ms = 1000\n");
    let mut st = State::with_max_entries(2);
    let adm = |st: &mut State, client, now_ms| {
        b.evaluate(
            &Event::Admit {
                client,
                handler: "h",
                now_ms,
            },
            st,
        )
    };
    assert!(adm(&mut st, "a", 0).action.permits());
    assert!(adm(&mut st, "b", 0).action.permits());
    let d = adm(&mut st, "c", 0);
    assert_eq!(field(&d, "reason"), Some("rate state full"));
    assert_eq!(st.len(), 2);
    // Once drained, old entries make room.
    assert!(adm(&mut st, "c", 5_000).action.permits());
    assert_eq!(st.len(), 1);
    // Another bundle starts afresh.
    let other = one("[engine]\nunlisted_handler = \"allow\"\n[[rate]]\nname = \"r\"\nmax = 1\nwindow_ms = 999\n");
    let d = other.evaluate(
        &Event::Admit {
            client: "c",
            handler: "h",
            now_ms: 5_001,
        },
        &mut st,
    );
    assert!(d.action.permits());
}

#[test]
fn domain_events() {
    let b = default_bundle();
    let dom = |kind| Event::Domain {
        tx: TX,
        handler: "kv",
        kind,
    };
    for (kind, action, r) in [
        (
            DomainEventKind::ProtocolViolation,
            Action::Quarantine,
            "domain.hostile",
        ),
        (
            DomainEventKind::ForbiddenSyscall,
            Action::Quarantine,
            "domain.hostile",
        ),
        (DomainEventKind::Crash, Action::Abort, "domain.failed"),
        (DomainEventKind::Timeout, Action::Abort, "domain.failed"),
        (DomainEventKind::Limit, Action::Abort, "domain.failed"),
    ] {
        let d = eval(&b, dom(kind));
        assert_eq!((d.action, rule(&d)), (action, r));
        assert_eq!(field(&d, "event"), Some(kind.as_str()));
    }
    let b = one("[engine]\ndomain_default = \"alert\"\n[[domain]]\nname = \"d\"\nevents = [\"crash\"]\nhandlers = [\"notes\"]\naction = \"quarantine\"\n");
    assert_eq!(
        rule(&eval(&b, dom(DomainEventKind::Crash))),
        "builtin.domain_default"
    );
    let d = eval(
        &b,
        Event::Domain {
            tx: TX,
            handler: "notes",
            kind: DomainEventKind::Crash,
        },
    );
    assert_eq!((d.action, rule(&d)), (Action::Quarantine, "d"));
}

#[test]
fn external_alerts() {
    let b = default_bundle();
    let ext = |target, reason| Event::External { target, reason };
    let d = eval(&b, ext(Target::Tx(TX), "ids: sqli"));
    assert_eq!(
        d.action,
        Action::Rollback {
            cascade: true,
            replay: true
        }
    );
    assert_eq!(rule(&d), "ids.tx");
    assert_eq!(field(&d, "reason"), Some("ids: sqli"));
    assert_eq!(
        rule(&eval(&b, ext(Target::Key(b"acct/bob"), "x"))),
        "ids.acct_key"
    );
    let d = eval(&b, ext(Target::Key(b"kv/bob"), "x"));
    assert_eq!(
        (d.action, rule(&d)),
        (Action::Alert, "builtin.external_default")
    );
    assert_eq!(
        rule(&eval(&b, ext(Target::Client("eve"), "x"))),
        "ids.client"
    );
    assert_eq!(
        rule(&eval(&b, ext(Target::Handler("notes"), "x"))),
        "builtin.external_default"
    );
    let b = one("[[external]]\nname = \"e\"\ntarget = \"handler\"\nnames = [\"notes\"]\nreasons = [\"traversal\"]\naction = \"quarantine\"\n");
    assert_eq!(
        rule(&eval(&b, ext(Target::Handler("notes"), "traversal"))),
        "e"
    );
    assert_eq!(
        rule(&eval(&b, ext(Target::Handler("notes"), "other"))),
        "builtin.external_default"
    );
    assert_eq!(
        rule(&eval(&b, ext(Target::Handler("kv"), "traversal"))),
        "builtin.external_default"
    );
}

#[test]
fn unlisted_handlers_fail_closed_by_default() {
    let b = one("");
    let d = eval(&b, op("kv", get(b"kv/a")));
    assert_eq!(
        (d.action, rule(&d)),
        (Action::Abort, "builtin.unlisted_handler")
    );
    let b = one("[engine]\nunlisted_handler = \"allow\"\n");
    assert_eq!(eval(&b, op("kv", get(b"kv/a"))), Decision::allow());
}

// ---- precedence ---------------------------------------------------------------------------

#[test]
fn precedence_most_severe_action_then_class() {
    let b = default_bundle();
    // kv writing acct/~canary: honeytoken (quarantine) > capability (abort) > pattern (abort).
    let d = eval(&b, op("kv", put(b"acct/~canary", b"x")));
    assert_eq!(
        (d.action, rule(&d)),
        (Action::Quarantine, "canary.accounts")
    );
    assert_eq!(
        d.also.iter().map(|s| &**s).collect::<Vec<_>>(),
        ["handler.kv.write", "acct.balance_format"]
    );
    // Capability (abort) beats a pattern alert.
    let d = eval(&b, op("kv", put(b"notes/x/1", b"<script>")));
    assert_eq!((d.action, rule(&d)), (Action::Abort, "handler.kv.write"));
    assert_eq!(
        d.also.iter().map(|s| &**s).collect::<Vec<_>>(),
        ["notes.script"]
    );

    // Equal actions: class order decides (honeytoken > capability > limit > pattern).
    let b = one("[handler.h]\nwrite = [\"w/\"]\nmax_ops = 0\n\
         [[honeytoken]]\nname = \"ht\"\nkeys = [\"x\"]\naction = \"abort\"\nseverity = 7\n\
         [[pattern]]\nname = \"pat\"\nprefixes = [\"x\", \"w/\"]\ndeny = \"bad\"\nseverity = 0\n");
    let d = eval(&b, op("h", put(b"x", b"bad")));
    assert_eq!(rule(&d), "ht");
    assert_eq!(d.severity, Severity::Debug);
    assert_eq!(d.also.len(), 3);
    let d = eval(&b, op("h", put(b"w/1", b"bad")));
    assert_eq!(rule(&d), "handler.h.max_ops");
    // A more severe action wins over class: an alerting honeytoken loses to an abort.
    let b = one(
        "[handler.h]\nwrite = [\"w/\"]\n[[honeytoken]]\nname = \"ht\"\nkeys = [\"x\"]\naction = \"alert\"\n",
    );
    assert_eq!(rule(&eval(&b, op("h", put(b"x", b"")))), "handler.h.write");
    // Same class and action: lower severity code, then bundle order.
    let b = one("[engine]\nunlisted_handler = \"allow\"\n\
         [[pattern]]\nname = \"p1\"\nprefixes = [\"k\"]\ndeny = \"a\"\nseverity = 3\n\
         [[pattern]]\nname = \"p2\"\nprefixes = [\"k\"]\ndeny = \"a\"\nseverity = 1\n\
         [[pattern]]\nname = \"p3\"\nprefixes = [\"k\"]\ndeny = \"a\"\nseverity = 1\n");
    let d = eval(&b, op("h", put(b"k", b"a")));
    assert_eq!(rule(&d), "p2");
    assert_eq!(
        d.also.iter().map(|s| &**s).collect::<Vec<_>>(),
        ["p3", "p1"]
    );
}

#[test]
fn action_order_and_spelling() {
    let all = [
        "allow",
        "alert",
        "abort",
        "quarantine",
        "rollback",
        "rollback+replay",
        "rollback+cascade",
        "rollback+cascade+replay",
    ];
    for (i, s) in all.iter().enumerate() {
        let a = Action::parse(s).unwrap();
        assert_eq!(a.as_str(), *s);
        assert_eq!(usize::from(a.rank()), i);
    }
    assert_eq!(Action::parse("Abort"), None);
}

// ---- loading errors -----------------------------------------------------------------------

fn load_err(files: &[(&str, &str)]) -> (String, usize, usize, String) {
    match Bundle::load(files).expect_err("must be rejected") {
        PolicyError::Parse { at, message } => (at.file, at.line, at.column, message),
        PolicyError::Invalid { at, problem } => (at.file, at.line, at.column, problem.to_string()),
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn malformed_bundles_point_at_the_line() {
    let cases: &[(&str, usize, usize, &str)] = &[
        (
            "[handler.kv]\nread = [\"kv/\"]\nbogus = 1\n",
            3,
            1,
            "unknown field `bogus`",
        ),
        (
            "[handler.kv]\nread = []\n",
            2,
            8,
            "`read` must not be an empty list",
        ),
        (
            "\n\n[handler.kv]\nread = [\"kv/\", \"\"]\n",
            4,
            16,
            "empty key",
        ),
        ("[handler.kv]\n[handler.kv]\n", 2, 10, "duplicate key"),
        ("[handler.KV]\n", 1, 10, "handler name"),
        (
            "[[pattern]]\nname = \"p\"\nprefixes = [\"a\"]\nrequire = \"(\"\n",
            4,
            11,
            "bad pattern",
        ),
        (
            "[[pattern]]\nname = \"p\"\nprefixes = [\"a\"]\n",
            1,
            1,
            "exactly one of",
        ),
        (
            "[[rate]]\nname = \"p\"\nmax = 0\nwindow_ms = 5\n",
            3,
            7,
            "`max` must be in",
        ),
        (
            "[[domain]]\nname = \"p\"\nevents = [\"boom\"]\n",
            3,
            11,
            "unknown variant `boom`",
        ),
        (
            "[[honeytoken]]\nname = \"h\"\naction = \"nuke\"\nkeys=[\"a\"]\n",
            3,
            10,
            "unknown action",
        ),
        (
            "[[honeytoken]]\nname = \"h\"\nseverity = 8\nkeys=[\"a\"]\n",
            3,
            12,
            "severity 8",
        ),
        (
            "[[honeytoken]]\nname = \"Bad Name\"\nkeys=[\"a\"]\n",
            2,
            8,
            "rule name",
        ),
        (
            "[[honeytoken]]\nname = \"builtin.x\"\nkeys=[\"a\"]\n",
            2,
            8,
            "rule name",
        ),
        (
            "[[external]]\nname = \"x\"\ntarget = \"tx\"\nprefixes = [\"a\"]\n",
            4,
            12,
            "does not apply",
        ),
        (
            "[handler.h]\nread_ranges = [{ start = \"b\", end = \"a\" }]\n",
            2,
            16,
            "range end",
        ),
        ("[engine]\nx = 1", 2, 1, "unknown field `x`"),
        ("a = ", 1, 5, "string values must be quoted"),
        ("[handler.h]\nmax_ops = -1\n", 2, 11, "`max_ops` must be in"),
        ("[handler.h]\nmax_ops = \"ten\"\n", 2, 11, "invalid type"),
    ];
    for (text, line, column, reason) in cases {
        let (file, l, c, msg) = load_err(&[("x.toml", text)]);
        assert_eq!(file, "x.toml");
        assert_eq!((l, c), (*line, *column), "{text:?}: {msg}");
        assert!(msg.contains(reason), "{text:?}: {msg}");
    }
}

#[test]
fn cross_file_errors_name_both_places() {
    let (file, l, _, msg) = load_err(&[
        (
            "b.toml",
            "\n[[rate]]\nname = \"h\"\nmax = 1\nwindow_ms = 1\n",
        ),
        ("a.toml", "[[honeytoken]]\nname = \"h\"\nkeys = [\"a\"]\n"),
    ]);
    assert_eq!((file.as_str(), l), ("b.toml", 3));
    assert!(msg.contains("a.toml:2:8"), "{msg}");
    let (file, l, _, msg) = load_err(&[
        ("a.toml", "[handler.kv]\n"),
        ("b.toml", "# x\n[handler.kv]\n"),
    ]);
    assert_eq!((file.as_str(), l), ("b.toml", 2));
    assert!(msg.contains("a.toml:1:10"), "{msg}");
    let (file, l, _, msg) = load_err(&[("a.toml", "[engine]\n"), ("b.toml", "[engine]\n")]);
    assert_eq!((file.as_str(), l), ("b.toml", 1));
    assert!(msg.contains("a.toml:1:1"), "{msg}");
    assert!(matches!(
        Bundle::load(&[("a", ""), ("a", "")]),
        Err(PolicyError::DuplicateFile(_))
    ));
    assert!(matches!(
        Bundle::load(&[("", "")]),
        Err(PolicyError::BadFileName(_))
    ));
    let big = "#".repeat(bundle::MAX_FILE_BYTES + 1);
    assert!(matches!(
        Bundle::load(&[("a", big.as_str())]),
        Err(PolicyError::FileTooLarge { .. })
    ));
}

// ---- hash ---------------------------------------------------------------------------------

#[test]
fn hash_is_stable_order_free_and_byte_sensitive() {
    let a = default_bundle().hash();
    assert_eq!(a, default_bundle().hash());
    let mut rev = DEFAULT;
    rev.reverse();
    assert_eq!(a, Bundle::load(&rev).unwrap().hash());
    let changed = DEFAULT[1].1.replacen("max_ops = 8", "max_ops = 9", 1);
    let mut files: Vec<(&str, &str)> = DEFAULT.to_vec();
    files[1].1 = &changed;
    assert_ne!(a, Bundle::load(&files).unwrap().hash());
    let comment = format!("{} ", DEFAULT[0].1);
    files = DEFAULT.to_vec();
    files[0].1 = &comment;
    assert_ne!(a, Bundle::load(&files).unwrap().hash());
    files = DEFAULT.to_vec();
    files[2].0 = "detection2.toml";
    assert_ne!(a, Bundle::load(&files).unwrap().hash());
    // Moving bytes from one file's end to the next file's start changes the hash.
    let x = Bundle::load(&[("a", "#a\n#"), ("b", "\n")]).unwrap().hash();
    let y = Bundle::load(&[("a", "#a\n"), ("b", "#\n")]).unwrap().hash();
    assert_ne!(x, y);
}

// ---- robustness ---------------------------------------------------------------------------

/// xorshift64*: a deterministic generator for the mutation test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }
}

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    const TOKENS: &[&[u8]] = &[
        b"[",
        b"]",
        b"\"",
        b"'",
        b"=",
        b"\n",
        b"[[",
        b"{",
        b"}",
        b",",
        b"\\",
        b"-1",
        b"99999999999999999999",
        b"\"\"",
        b"[]",
        b"(",
        b"*",
        b"\xff",
        b"\\u0000",
        b"rollback+cascade",
        b"[engine]\n",
        b"[handler.notes]\n",
    ];
    for _ in 0..=rng.below(8) {
        let at = rng.below(b.len() + 1);
        match rng.below(4) {
            0 if !b.is_empty() => {
                let end = (at + rng.below(16)).min(b.len());
                b.drain(at.min(end)..end);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                b.splice(at..at, t.iter().copied());
            }
            2 if at < b.len() => b[at] = u8::try_from(rng.below(256)).unwrap(),
            _ => {
                // Duplicate a chunk (duplicate keys, tables, rules).
                let end = (at + rng.below(200)).min(b.len());
                let chunk = b[at..end].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, chunk);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn mutated_bundles_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut loaded = 0;
    let mut rejected = 0;
    for _ in 0..3_000 {
        let base: &[(&str, &str)] = if rng.below(4) == 0 {
            &EXAMPLES
        } else {
            &DEFAULT
        };
        let mut files: Vec<(String, String)> = base
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        let i = rng.below(files.len());
        files[i].1 = mutate(&mut rng, &files[i].1);
        match Bundle::load(&files) {
            Ok(b) => {
                loaded += 1;
                let mut st = State::new();
                for e in [
                    op("notes", put(b"acct/mallory", b"1")),
                    op(
                        "kv",
                        Op::Scan {
                            start: b"",
                            end: None,
                        },
                    ),
                    Event::Admit {
                        client: "c",
                        handler: "kv",
                        now_ms: 0,
                    },
                    Event::Domain {
                        tx: TX,
                        handler: "kv",
                        kind: DomainEventKind::Crash,
                    },
                    Event::External {
                        target: Target::Key(b"acct/x"),
                        reason: "r",
                    },
                ] {
                    check_fields(&b.evaluate(&e, &mut st));
                }
            }
            Err(e) => {
                rejected += 1;
                // Every error renders, and located errors point inside the file.
                let _ = e.to_string();
                if let PolicyError::Parse { at, .. } | PolicyError::Invalid { at, .. } = &e {
                    let text = &files.iter().find(|f| f.0 == at.file).unwrap().1;
                    assert!(at.line >= 1 && at.line <= text.lines().count() + 1, "{e}");
                }
            }
        }
    }
    assert!(
        loaded > 100 && rejected > 100,
        "{loaded} loaded, {rejected} rejected"
    );
}

#[test]
fn hostile_inputs_render_within_audit_limits() {
    let b = default_bundle();
    let key = vec![0xffu8; 4096];
    let value = vec![b'\\'; 70_000];
    let client = "é".repeat(2000);
    let d = b.evaluate(
        &Event::Op {
            tx: TX,
            handler: "transfer",
            client: &client,
            op: put(&key, &value),
            ops_so_far: u64::MAX,
            bytes_written_so_far: u64::MAX,
            elapsed_ms: u64::MAX,
        },
        &mut State::new(),
    );
    check_fields(&d);
    assert_eq!(d.action, Action::Abort);
    let d = b.evaluate(
        &Event::Admit {
            client: &client,
            handler: "kv",
            now_ms: u64::MAX,
        },
        &mut State::new(),
    );
    check_fields(&d);
}

#[test]
fn documented_examples_load() {
    let readme = include_str!("../../../policies/README.md");
    let start = readme.find("```toml\n").expect("a toml block") + 8;
    let len = readme[start..].find("```").expect("closed");
    let b = Bundle::load(&[("README.md", &readme[start..start + len])])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.handlers(), ["transfer"]);
    let lib = include_str!("../src/lib.rs");
    let block: String = lib
        .lines()
        .skip_while(|l| *l != "//! ```toml")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| format!("{}\n", l.strip_prefix("//!").unwrap_or(l).trim_start()))
        .collect();
    Bundle::load(&[("lib.rs", block.as_str())]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn pathological_texts_are_refused_not_fatal() {
    let deep_array = format!("a = {}", "[".repeat(100_000));
    let deep_table = format!("a = {}", "{ b = ".repeat(50_000));
    let dotted = format!("{} = 1", "a.".repeat(60_000));
    let huge_regex =
        "[[pattern]]\nname = \"p\"\nprefixes = [\"a\"]\ndeny = '((a{100}){100}){100}'\n";
    let big_count = "[[rate]]\nname = \"r\"\nmax = 9223372036854775807\nwindow_ms = 1\n";
    for text in [
        deep_array.as_str(),
        deep_table.as_str(),
        dotted.as_str(),
        huge_regex,
        big_count,
    ] {
        assert!(Bundle::load(&[("x.toml", text)]).is_err());
    }
}

/// The per-client penalty: on in the shipped bundle; the keys' defaults and bounds; the
/// other keys refused without `penalty_after` (a typo must not switch it off silently).
#[test]
fn the_per_client_penalty_is_on_in_the_shipped_bundle_and_checked() {
    let shipped = default_bundle()
        .penalty()
        .expect("the shipped bundle sets a penalty");
    assert_eq!(
        shipped,
        mayfly_policy::Penalty {
            after: 8,
            window_ms: 10_000,
            duration_ms: 30_000,
            share: 1
        }
    );
    assert_eq!(
        one("[engine]\nunlisted_handler = \"abort\"\n").penalty(),
        None
    );
    let defaults = one("[engine]\npenalty_after = 3\n").penalty().unwrap();
    assert_eq!(
        defaults,
        mayfly_policy::Penalty {
            after: 3,
            window_ms: mayfly_policy::PENALTY_WINDOW_MS,
            duration_ms: mayfly_policy::PENALTY_MS,
            share: mayfly_policy::PENALTY_SHARE
        }
    );
    assert_eq!(
        one("[engine]\npenalty_after = 1\npenalty_share = 0\n")
            .penalty()
            .unwrap()
            .share,
        0
    );
    for bad in [
        "[engine]\npenalty_after = 0\n",
        "[engine]\npenalty_after = 1001\n",
        "[engine]\npenalty_after = 2\npenalty_ms = 0\n",
        "[engine]\npenalty_after = 2\npenalty_share = 5000\n",
        "[engine]\npenalty_after = 2\npenalty_window_ms = -1\n",
    ] {
        let e = Bundle::load(&[("t.toml", bad)]).unwrap_err().to_string();
        assert!(e.contains("penalty_"), "{bad}: {e}");
    }
    let e = Bundle::load(&[("t.toml", "[engine]\npenalty_ms = 5000\n")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("penalty_ms") && e.contains("penalty_after"),
        "{e}"
    );
}
