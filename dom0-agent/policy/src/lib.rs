//! `mayfly-policy` — Mayfly's policy engine: a **pure** evaluation of declarative policy
//! bundles (no I/O, no clock, no threads, no `unsafe`).
//!
//! The agent loads a bundle once ([`Bundle::load`]), records its [`Bundle::hash`] in every
//! checkpoint, and asks [`Bundle::evaluate`] about each admission, each ring operation, each
//! commit, each domain event and each external alert. Every [`Decision`] other than a plain
//! allow names the rule that made it and is audited by the caller.
//!
//! # Bundle format
//!
//! A bundle is one or more TOML files given as `(name, text)` pairs (the crate reads no
//! files). Files are merged; order does not matter. The full reference is
//! `policies/README.md` and `policies/schema.md`; in short:
//!
//! ```toml
//! [engine]                        # at most once per bundle; every key optional
//! unlisted_handler = "abort"      # handlers without [handler.X] (default "abort")
//! domain_default = "abort"        # domain events no [[domain]] rule matches
//! external_default = "alert"      # external alerts no [[external]] rule matches
//! penalty_after = 8               # per-client penalty: this many hostile domain events…
//! penalty_window_ms = 10_000      # …within this window (default 10 s)…
//! penalty_ms = 30_000             # …cut the client's share for this long (default 30 s)…
//! penalty_share = 1               # …to this many transactions at once (default 1; 0: none)
//!
//! [handler.notes]                 # capabilities; once per handler per bundle
//! read = ["notes/"]               # key prefixes it may get/scan
//! write = ["notes/"]              # key prefixes it may put/delete
//! read_ranges = [{ start = "a", end = "b" }]   # half-open byte ranges (end optional)
//! write_ranges = [{ start = "a", end = "b" }]
//! max_ops = 8                     # operations per transaction
//! max_bytes_written = 8192        # key+value bytes of puts, key bytes of deletes
//! max_duration_ms = 1000
//! on_violation = "quarantine"     # capability breach (default "abort")
//! on_limit = "abort"              # limit breach (default "abort")
//! severity = 2                    # RFC 5424, 0..=7 (default from the action)
//!
//! [[honeytoken]]                  # any get/put/delete of, or scan over, these keys
//! name = "canary.accounts"
//! keys = ["acct/~canary"]         # exact keys …
//! prefixes = ["secret/"]          # … and/or prefixes
//! action = "quarantine"           # default "quarantine"
//!
//! [[pattern]]                     # values written under `prefixes`
//! name = "acct.balance_format"
//! prefixes = ["acct/"]
//! handlers = ["transfer"]         # optional: all handlers
//! require = '\A[0-9]{1,20}\z'     # a value NOT matching fires; or `deny = '…'`: a match fires
//! action = "abort"                # default "abort"
//!
//! [[rate]]                        # admissions per client (GCRA: at most `max` per window)
//! name = "rate.client"
//! max = 50
//! window_ms = 1000
//! handlers = ["transfer"]         # optional: all handlers
//!
//! [[domain]]
//! name = "domain.hostile"
//! events = ["protocol_violation", "forbidden_syscall"]   # also "crash", "timeout", "limit"
//! handlers = ["notes"]            # optional
//! action = "quarantine"
//!
//! [[external]]
//! name = "ids.acct_key"
//! target = "key"                  # tx | key | handler | client
//! prefixes = ["acct/"]            # target = "key" only
//! # names = ["mallory"]           # target = "handler" | "client" only
//! reasons = ["sqli"]              # optional: exact reason strings
//! action = "rollback+cascade+replay"   # default "alert"
//! ```
//!
//! Actions: `allow`, `alert`, `abort`, `quarantine`, `rollback`, `rollback+cascade`,
//! `rollback+replay`, `rollback+cascade+replay`. Rule names are 1..=64 bytes of
//! `[a-z0-9_.-]`, unique in the bundle; `builtin.*` and `handler.*` are reserved: capability
//! and limit rules are named `handler.<name>.{read,write,max_ops,max_bytes_written,
//! max_duration_ms}`, the defaults `builtin.{unlisted_handler,domain_default,
//! external_default}`. Keys are compared bytewise (LMDB order).
//!
//! # Precedence
//!
//! Every rule that applies to an event is checked; the winner is the hit with
//! 1. the most severe action ([`Action::rank`]: allow < alert < abort < quarantine <
//!    rollback < rollback+replay < rollback+cascade < rollback+cascade+replay), then
//! 2. the earlier class: honeytoken > capability > limit > pattern > rate > domain >
//!    external > builtin, then
//! 3. the more severe RFC 5424 severity (lower code), then
//! 4. the earlier rule (files by name, then text order).
//!
//! A bundle can therefore never weaken a decision by adding a rule: the most severe action
//! always wins. The losers' names are kept in [`Decision::also`]. Rules with action `allow`
//! never fire (they only switch a default off).
//!
//! # What each event checks
//!
//! | event | checks |
//! |---|---|
//! | [`Event::Admit`] | unlisted handler; every matching `[[rate]]` (counted only if admitted) |
//! | [`Event::Op`] | honeytokens; unlisted handler or capability + limits (`ops_so_far + 1`, `bytes_written_so_far + op`, `elapsed_ms`); patterns on a put |
//! | [`Event::Commit`] | unlisted handler or limits (totals); per write: honeytokens, write capability, patterns |
//! | [`Event::Domain`] | matching `[[domain]]` rules, else `domain_default` |
//! | [`Event::External`] | matching `[[external]]` rules, else `external_default` |
//!
//! A scan is allowed when one read range covers all of `start..end`; it touches a honeytoken
//! when its range intersects one.
//!
//! # Bundle hash
//!
//! See [`bundle`](crate::bundle#bundle-hash): SHA-256 over the exact texts, files sorted by
//! name, each length-prefixed.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod eval;
mod keys;
pub mod verdict;

pub use bundle::{
    Bundle, Location, Penalty, PolicyError, Problem, PENALTY_MS, PENALTY_SHARE, PENALTY_WINDOW_MS,
};
pub use eval::{
    Action, Decision, DomainEventKind, Event, Field, Op, Severity, State, Target, Write,
};
