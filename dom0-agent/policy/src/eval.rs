//! Evaluation: events in, decisions out. Pure: the only state is the caller-owned [`State`]
//! for rate limits, and the only clock is the `now_ms` the caller puts in
//! [`Event::Admit`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::bundle::{Bundle, Rule, TargetKind};
use crate::keys::{show_bytes, KeyRange};
pub use crate::verdict::{Action, DomainEventKind, Severity};
use mayfly_hex::encode as hex;

/// One database operation of a handler.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Read `key`.
    Get {
        /// The key.
        key: &'a [u8],
    },
    /// Write `value` at `key`.
    Put {
        /// The key.
        key: &'a [u8],
        /// The value.
        value: &'a [u8],
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: &'a [u8],
    },
    /// Read `start..end` (end exclusive; `None`: unbounded).
    Scan {
        /// First key.
        start: &'a [u8],
        /// End, exclusive.
        end: Option<&'a [u8]>,
    },
}

impl Op<'_> {
    /// Bytes this operation writes, as counted against `max_bytes_written`: key + value for
    /// a put, the key for a delete, 0 for reads.
    pub fn bytes_written(&self) -> u64 {
        let n = match self {
            Op::Put { key, value } => key.len().saturating_add(value.len()),
            Op::Delete { key } => key.len(),
            Op::Get { .. } | Op::Scan { .. } => 0,
        };
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    fn name(&self) -> &'static str {
        match self {
            Op::Get { .. } => "get",
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::Scan { .. } => "scan",
        }
    }
}

/// One entry of a commit's write set.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The after-image; `None` for a delete.
    pub value: Option<&'a [u8]>,
}

/// What an external alert names.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A transaction id.
    Tx([u8; 16]),
    /// A key.
    Key(&'a [u8]),
    /// A handler.
    Handler(&'a str),
    /// A client.
    Client(&'a str),
}

/// An input to the engine. Transaction ids are the ledger's 16-byte ids.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A client asks to run `handler` (checked before a domain is taken).
    Admit {
        /// The client identity.
        client: &'a str,
        /// The handler.
        handler: &'a str,
        /// The caller's clock, in ms (any epoch, monotonic preferred).
        now_ms: u64,
    },
    /// A ring operation, before it is served.
    Op {
        /// The transaction.
        tx: [u8; 16],
        /// Its handler.
        handler: &'a str,
        /// Its client.
        client: &'a str,
        /// The operation.
        op: Op<'a>,
        /// Operations served before this one.
        ops_so_far: u64,
        /// Bytes written before this one (see [`Op::bytes_written`]).
        bytes_written_so_far: u64,
        /// Time since the transaction started.
        elapsed_ms: u64,
    },
    /// COMMIT, before the write transaction.
    Commit {
        /// The transaction.
        tx: [u8; 16],
        /// Its handler.
        handler: &'a str,
        /// Its client.
        client: &'a str,
        /// Operations served in all.
        ops: u64,
        /// Bytes written in all.
        bytes_written: u64,
        /// Time since the transaction started.
        elapsed_ms: u64,
        /// The write set to be committed.
        writes: &'a [Write<'a>],
    },
    /// Something happened to a domain.
    Domain {
        /// The transaction it ran.
        tx: [u8; 16],
        /// Its handler.
        handler: &'a str,
        /// What happened.
        kind: DomainEventKind,
    },
    /// An external detector (IDS, admin tooling) names something as an attack.
    External {
        /// What it names.
        target: Target<'a>,
        /// The detector's reason (matched against `reasons`).
        reason: &'a str,
    },
}

/// A matched input, ready to become an audit field: `name` is a valid RFC 5424 SD-NAME,
/// `value` is printable and at most 1024 bytes. Names are unique within one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The field name.
    pub name: &'static str,
    /// The rendered value.
    pub value: String,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// The rule that decided; `None` only for a plain allow.
    pub rule: Option<Arc<str>>,
    /// RFC 5424 severity for the audit event.
    pub severity: Severity,
    /// The inputs that matched.
    pub matched: Vec<Field>,
    /// Other rules that fired but lost by precedence, in precedence order.
    pub also: Vec<Arc<str>>,
}

impl Decision {
    /// A plain allow.
    pub fn allow() -> Self {
        Self {
            action: Action::Allow,
            rule: None,
            severity: Severity::Info,
            matched: Vec::new(),
            also: Vec::new(),
        }
    }

    /// Whether the decision must be audited (everything but a plain allow).
    pub fn audited(&self) -> bool {
        self.action != Action::Allow
    }
}

/// Rule classes, in tie-break order (earlier wins between equal actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Honeytoken,
    Capability,
    Limit,
    Pattern,
    Rate,
    Domain,
    External,
    Builtin,
}

struct Hit<'r> {
    rule: &'r Rule,
    class: Class,
    fields: Vec<Field>,
}

impl Hit<'_> {
    /// `(rank, class, severity, order)`: greater action first, then earlier class, then more
    /// severe (lower code), then earlier in the bundle.
    fn beats(&self, other: &Hit<'_>) -> bool {
        let key = |h: &Hit<'_>| {
            (
                std::cmp::Reverse(h.rule.action.rank()),
                h.class,
                h.rule.severity,
                h.rule.order,
            )
        };
        key(self) < key(other)
    }
}

/// Collects hits and keeps the winner.
#[derive(Default)]
struct Hits<'r> {
    all: Vec<Hit<'r>>,
}

impl<'r> Hits<'r> {
    /// Records a hit; `fields` is only rendered for a rule that does something.
    fn add(&mut self, rule: &'r Rule, class: Class, fields: impl FnOnce() -> Vec<Field>) {
        if rule.action == Action::Allow {
            return;
        }
        self.all.push(Hit {
            rule,
            class,
            fields: fields(),
        });
    }

    fn decide(mut self) -> Decision {
        if self.all.is_empty() {
            return Decision::allow();
        }
        // Insertion sort by precedence: the lists are tiny.
        self.all.sort_by(|a, b| {
            if a.beats(b) {
                std::cmp::Ordering::Less
            } else if b.beats(a) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        let mut it = self.all.into_iter();
        let Some(win) = it.next() else {
            return Decision::allow();
        };
        let mut also: Vec<Arc<str>> = Vec::new();
        for h in it {
            if !also.contains(&h.rule.name) && h.rule.name != win.rule.name {
                also.push(h.rule.name.clone());
            }
        }
        Decision {
            action: win.rule.action,
            rule: Some(win.rule.name.clone()),
            severity: win.rule.severity,
            matched: win.fields,
            also,
        }
    }
}

fn f(name: &'static str, value: impl Into<String>) -> Field {
    Field {
        name,
        value: value.into(),
    }
}

fn show_str(s: &str) -> String {
    show_bytes(s.as_bytes())
}

fn listed(list: &Option<Vec<Box<str>>>, name: &str) -> bool {
    list.as_ref().is_none_or(|l| l.iter().any(|h| &**h == name))
}

fn first_range<'k>(ranges: &'k [KeyRange], key: &[u8]) -> Option<&'k KeyRange> {
    ranges.iter().find(|r| r.contains(key))
}

/// Rate-limit memory: one GCRA "theoretical arrival time" per (rate rule, client). Owned by
/// the caller; bounded by `max_entries`. It belongs to one bundle: evaluating with another
/// bundle (different hash) starts it afresh.
#[derive(Debug, Clone)]
pub struct State {
    bundle: [u8; 32],
    /// Per rate rule: client → TAT in scaled time (ms × max).
    tat: Vec<HashMap<Box<str>, u128>>,
    entries: usize,
    max_entries: usize,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// Default cap on remembered (rule, client) pairs.
    pub const DEFAULT_MAX_ENTRIES: usize = 65_536;

    /// An empty state with the default cap.
    pub fn new() -> Self {
        Self::with_max_entries(Self::DEFAULT_MAX_ENTRIES)
    }

    /// An empty state remembering at most `max_entries` (rule, client) pairs. When full,
    /// drained entries are dropped; if none is, a new client is refused by the rate rule
    /// (fail closed, with `reason = "rate state full"`).
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self {
            bundle: [0; 32],
            tat: Vec::new(),
            entries: 0,
            max_entries,
        }
    }

    /// Remembered (rule, client) pairs.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn bind(&mut self, bundle: &Bundle) {
        if self.bundle != bundle.hash || self.tat.len() != bundle.rates.len() {
            self.bundle = bundle.hash;
            self.tat = vec![HashMap::new(); bundle.rates.len()];
            self.entries = 0;
        }
    }

    fn prune(&mut self, now_ms: u64, bundle: &Bundle) {
        for (map, rate) in self.tat.iter_mut().zip(&bundle.rates) {
            let now = u128::from(now_ms) * u128::from(rate.max);
            map.retain(|_, tat| *tat > now);
        }
        self.entries = self.tat.iter().map(HashMap::len).sum();
    }
}

impl Bundle {
    /// Decides `event`. Pure apart from `state` (rate limits, touched only by
    /// [`Event::Admit`]). Never panics.
    pub fn evaluate(&self, event: &Event<'_>, state: &mut State) -> Decision {
        match *event {
            Event::Admit {
                client,
                handler,
                now_ms,
            } => self.admit(client, handler, now_ms, state),
            Event::Op {
                tx,
                handler,
                client,
                op,
                ops_so_far,
                bytes_written_so_far,
                elapsed_ms,
            } => {
                let ctx = Ctx {
                    tx: &tx,
                    handler,
                    client,
                };
                let so_far = [ops_so_far, bytes_written_so_far, elapsed_ms];
                self.op(&ctx, op, so_far)
            }
            Event::Commit {
                tx,
                handler,
                client,
                ops,
                bytes_written,
                elapsed_ms,
                writes,
            } => {
                let ctx = Ctx {
                    tx: &tx,
                    handler,
                    client,
                };
                self.commit(&ctx, [ops, bytes_written, elapsed_ms], writes)
            }
            Event::Domain { tx, handler, kind } => self.domain(tx, handler, kind),
            Event::External { target, reason } => self.external(target, reason),
        }
    }

    /// One operation, before it runs: honeytokens, the handler's capabilities and limits
    /// (`so_far`: operations, bytes written, milliseconds before this one), patterns.
    fn op(&self, ctx: &Ctx<'_>, op: Op<'_>, so_far: [u64; 3]) -> Decision {
        let [ops_so_far, bytes_written_so_far, elapsed_ms] = so_far;
        let mut hits = Hits::default();
        self.honeytokens(&mut hits, ctx, op);
        if let Some(h) = self.handlers.get(ctx.handler) {
            capability(&mut hits, ctx, h, op);
            let limits = [
                (&h.max_ops, ops_so_far.saturating_add(1)),
                (
                    &h.max_bytes_written,
                    bytes_written_so_far.saturating_add(op.bytes_written()),
                ),
                (&h.max_duration_ms, elapsed_ms),
            ];
            limit_hits(&mut hits, ctx, limits);
        } else {
            hits.add(&self.unlisted_handler, Class::Builtin, || ctx.fields(None));
        }
        if let Op::Put { key, value } = op {
            self.patterns(&mut hits, ctx, key, value);
        }
        hits.decide()
    }

    /// The commit of a transaction: the handler's limits over the totals (`totals`:
    /// operations, bytes written, milliseconds), then every write of its write set.
    fn commit(&self, ctx: &Ctx<'_>, totals: [u64; 3], writes: &[Write<'_>]) -> Decision {
        let [ops, bytes_written, elapsed_ms] = totals;
        let mut hits = Hits::default();
        let h = self.handlers.get(ctx.handler);
        match h {
            Some(h) => limit_hits(
                &mut hits,
                ctx,
                [
                    (&h.max_ops, ops),
                    (&h.max_bytes_written, bytes_written),
                    (&h.max_duration_ms, elapsed_ms),
                ],
            ),
            None => hits.add(&self.unlisted_handler, Class::Builtin, || ctx.fields(None)),
        }
        for w in writes {
            let op = match w.value {
                Some(value) => Op::Put { key: w.key, value },
                None => Op::Delete { key: w.key },
            };
            self.honeytokens(&mut hits, ctx, op);
            if let Some(h) = h {
                capability(&mut hits, ctx, h, op);
            }
            if let Some(value) = w.value {
                self.patterns(&mut hits, ctx, w.key, value);
            }
        }
        hits.decide()
    }

    /// A domain event (crash, timeout, violation...) of a transaction's domain.
    fn domain(&self, tx: [u8; 16], handler: &str, kind: DomainEventKind) -> Decision {
        let mut hits = Hits::default();
        let fields = || {
            vec![
                f("tx", hex(&tx)),
                f("handler", show_str(handler)),
                f("event", kind.as_str()),
            ]
        };
        let mut any = false;
        for d in &self.domain {
            if d.events.contains(&kind) && listed(&d.handlers, handler) {
                any = true;
                hits.add(&d.rule, Class::Domain, fields);
            }
        }
        if !any {
            hits.add(&self.domain_default, Class::Builtin, fields);
        }
        hits.decide()
    }

    fn admit(&self, client: &str, handler: &str, now_ms: u64, state: &mut State) -> Decision {
        state.bind(self);
        let mut hits = Hits::default();
        let base = || {
            vec![
                f("client", show_str(client)),
                f("handler", show_str(handler)),
            ]
        };
        if !self.handlers.contains_key(handler) {
            hits.add(&self.unlisted_handler, Class::Builtin, base);
        }
        // Phase 1: decide every matching rate rule without changing the state.
        let mut updates: Vec<(usize, u128)> = Vec::new();
        let mut pruned = false;
        for (i, rate) in self.rates.iter().enumerate() {
            if !listed(&rate.handlers, handler) {
                continue;
            }
            let max = u128::from(rate.max);
            let now = u128::from(now_ms) * max;
            let window = u128::from(rate.window_ms);
            let stored = state.tat.get(i).and_then(|m| m.get(client)).copied();
            if stored.is_none() && state.entries >= state.max_entries && !pruned {
                state.prune(now_ms, self);
                pruned = true;
            }
            let fields = || {
                let mut v = base();
                v.push(f("max", rate.max.to_string()));
                v.push(f("window_ms", rate.window_ms.to_string()));
                v
            };
            if stored.is_none() && state.entries >= state.max_entries {
                hits.add(&rate.rule, Class::Rate, || {
                    let mut v = fields();
                    v.push(f("reason", "rate state full"));
                    v
                });
                continue;
            }
            let tat = stored.unwrap_or(0).max(now).saturating_add(window);
            if tat - now > window * max {
                hits.add(&rate.rule, Class::Rate, fields);
            } else {
                updates.push((i, tat));
            }
        }
        let decision = hits.decide();
        // Phase 2: count the admission only if it is admitted.
        if decision.action.permits() {
            for (i, tat) in updates {
                if let Some(map) = state.tat.get_mut(i) {
                    if map.insert(client.into(), tat).is_none() {
                        state.entries += 1;
                    }
                }
            }
        }
        decision
    }

    fn honeytokens<'r>(&'r self, hits: &mut Hits<'r>, ctx: &Ctx<'_>, op: Op<'_>) {
        for h in &self.honeytokens {
            let touched = match op {
                Op::Get { key } | Op::Put { key, .. } | Op::Delete { key } => {
                    first_range(&h.ranges, key)
                }
                Op::Scan { start, end } => h.ranges.iter().find(|r| r.intersects(start, end)),
            };
            if let Some(r) = touched {
                hits.add(&h.rule, Class::Honeytoken, || {
                    let mut v = ctx.fields(Some(op));
                    v.push(f("honeytoken", r.show()));
                    v
                });
            }
        }
    }

    fn patterns<'r>(&'r self, hits: &mut Hits<'r>, ctx: &Ctx<'_>, key: &[u8], value: &[u8]) {
        for p in &self.patterns {
            if !listed(&p.handlers, ctx.handler) {
                continue;
            }
            if first_range(&p.prefixes, key).is_none() {
                continue;
            }
            if p.regex.is_match(value) != p.require {
                hits.add(&p.rule, Class::Pattern, || {
                    let mut v = ctx.fields(Some(Op::Put { key, value }));
                    v.push(f("value", show_bytes(value)));
                    v.push(f(
                        if p.require { "required" } else { "denied" },
                        show_str(p.regex.as_str()),
                    ));
                    v
                });
            }
        }
    }

    fn external(&self, target: Target<'_>, reason: &str) -> Decision {
        let mut hits = Hits::default();
        let (kind, field) = match target {
            Target::Tx(id) => (TargetKind::Tx, f("tx", hex(&id))),
            Target::Key(k) => (TargetKind::Key, f("key", show_bytes(k))),
            Target::Handler(h) => (TargetKind::Handler, f("handler", show_str(h))),
            Target::Client(c) => (TargetKind::Client, f("client", show_str(c))),
        };
        let fields = || vec![field.clone(), f("reason", show_str(reason))];
        let mut any = false;
        for x in &self.external {
            if x.target != kind
                || !x
                    .reasons
                    .as_ref()
                    .is_none_or(|l| l.iter().any(|r| &**r == reason))
            {
                continue;
            }
            let filtered = match target {
                Target::Key(k) => x
                    .prefixes
                    .as_ref()
                    .is_none_or(|p| first_range(p, k).is_some()),
                Target::Handler(n) | Target::Client(n) => listed(&x.names, n),
                Target::Tx(_) => true,
            };
            if filtered {
                any = true;
                hits.add(&x.rule, Class::External, fields);
            }
        }
        if !any {
            hits.add(&self.external_default, Class::Builtin, fields);
        }
        hits.decide()
    }
}

struct Ctx<'a> {
    tx: &'a [u8; 16],
    handler: &'a str,
    client: &'a str,
}

impl Ctx<'_> {
    fn fields(&self, op: Option<Op<'_>>) -> Vec<Field> {
        let mut v = vec![
            f("tx", hex(self.tx)),
            f("handler", show_str(self.handler)),
            f("client", show_str(self.client)),
        ];
        if let Some(op) = op {
            v.push(f("op", op.name()));
            match op {
                Op::Get { key } | Op::Put { key, .. } | Op::Delete { key } => {
                    v.push(f("key", show_bytes(key)));
                }
                Op::Scan { start, end } => {
                    v.push(f("scan_start", show_bytes(start)));
                    v.push(f("scan_end", end.map_or_else(String::new, show_bytes)));
                }
            }
        }
        v
    }
}

fn capability<'r>(hits: &mut Hits<'r>, ctx: &Ctx<'_>, h: &'r crate::bundle::Handler, op: Op<'_>) {
    let (ok, rule) = match op {
        Op::Get { key } => (first_range(&h.read, key).is_some(), &h.read_rule),
        Op::Scan { start, end } => (h.read.iter().any(|r| r.covers(start, end)), &h.read_rule),
        Op::Put { key, .. } | Op::Delete { key } => {
            (first_range(&h.write, key).is_some(), &h.write_rule)
        }
    };
    if !ok {
        hits.add(rule, Class::Capability, || ctx.fields(Some(op)));
    }
}

type Limit<'r> = (&'r Option<(u64, Rule)>, u64);

fn limit_hits<'r>(hits: &mut Hits<'r>, ctx: &Ctx<'_>, limits: [Limit<'r>; 3]) {
    for (limit, observed) in limits {
        if let Some((max, rule)) = limit {
            if observed > *max {
                hits.add(rule, Class::Limit, || {
                    let mut v = ctx.fields(None);
                    v.push(f("limit", max.to_string()));
                    v.push(f("observed", observed.to_string()));
                    v
                });
            }
        }
    }
}
