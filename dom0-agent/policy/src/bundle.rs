//! Loading a bundle: TOML text → validated, compiled rules, and the bundle hash.
//!
//! Every error names the file, the 1-based line and column (in characters) and the reason.
//! Syntax and type errors come from the TOML parser's spans; semantic errors (an unknown
//! action, an empty list, a duplicate rule, a bad regex…) carry the span of the offending
//! value, kept with [`toml::Spanned`].
//!
//! # Bundle hash
//!
//! ```text
//! hash = SHA-256( u32 BE file count
//!                 || for each file, sorted by name (bytewise):
//!                      u32 BE name length || name (UTF-8)
//!                      || u64 BE text length || text (UTF-8, exactly as given) )
//! ```
//!
//! Test vectors (also in the tests below):
//! - no files: SHA-256(`00 00 00 00`) =
//!   `df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119`
//! - one file `a.toml` with text `[engine]\n`: the hashed bytes are
//!   `00000001 00000006 612e746f6d6c 0000000000000009 5b656e67696e655d0a`, and the hash is
//!   `4b3ac88c61623e5d8533ede3da0ae2ed2a6975b9b288a1ad7a2f2146bf3d9d9f`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::keys::KeyRange;
use crate::verdict::{Action, DomainEventKind, Severity};

/// Most files in one bundle.
pub const MAX_FILES: usize = 64;
/// Largest file text, in bytes.
pub const MAX_FILE_BYTES: usize = 256 * 1024;
/// Longest file name, in bytes.
pub const MAX_FILE_NAME: usize = 255;
/// Most rules (of all kinds, handler capabilities counted once per handler) in one bundle.
pub const MAX_RULES: usize = 4096;
/// Longest rule name, in bytes (`[a-z0-9_.-]`, so it fits an audit field as is).
pub const MAX_RULE_NAME: usize = 64;
/// Longest handler name, in bytes (`[a-z0-9_-]`).
pub const MAX_HANDLER_NAME: usize = 32;
/// Longest key, prefix or range bound in a rule, in bytes (the ring's key cap).
pub const MAX_KEY: usize = 256;
/// Cap on the compiled size of one value pattern, in bytes.
pub const MAX_REGEX_SIZE: usize = 256 * 1024;
/// Largest `max` of a rate rule.
pub const MAX_RATE: u64 = 1_000_000;
/// Longest `window_ms` of a rate rule (one week).
pub const MAX_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;

/// Where in a bundle something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file name as given to [`Bundle::load`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// What is wrong with a well-formed TOML value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A list that must not be empty is.
    #[error("`{0}` must not be an empty list")]
    EmptyList(&'static str),
    /// A penalty key without `penalty_after`, which switches the penalty on.
    #[error("`{0}` needs `penalty_after` (which switches the per-client penalty on)")]
    PenaltyWithoutAfter(&'static str),
    /// A prefix or key is the empty string.
    #[error("empty key or prefix (use a range with start = \"\" to mean every key)")]
    EmptyKey,
    /// A key, prefix or bound is longer than [`MAX_KEY`].
    #[error("key or prefix of {0} bytes is longer than {MAX_KEY}")]
    KeyTooLong(usize),
    /// A range whose end is not after its start.
    #[error("range end must be greater than its start")]
    EmptyRange,
    /// A rule name outside `[a-z0-9_.-]{1,64}`, or starting with the reserved `builtin.`/`handler.`.
    #[error("rule name {0:?} must be 1..=64 bytes of [a-z0-9_.-] and not start with `builtin.` or `handler.`")]
    BadRuleName(String),
    /// Two rules with the same name.
    #[error("rule name {name:?} is already used at {first}")]
    DuplicateRule {
        /// The name.
        name: String,
        /// Where it was first defined.
        first: Location,
    },
    /// A handler name outside `[a-z0-9_-]{1,32}`.
    #[error("handler name {0:?} must be 1..=32 bytes of [a-z0-9_-]")]
    BadHandlerName(String),
    /// A handler defined twice (possibly in two files).
    #[error("handler {name:?} is already defined at {first}")]
    DuplicateHandler {
        /// The handler.
        name: String,
        /// Where it was first defined.
        first: Location,
    },
    /// `[engine]` given twice.
    #[error("[engine] is already given at {0}")]
    DuplicateEngine(Location),
    /// Not one of the action words.
    #[error("unknown action {0:?} (allow, alert, abort, quarantine, rollback, rollback+cascade, rollback+replay, rollback+cascade+replay)")]
    BadAction(String),
    /// A severity outside 0..=7.
    #[error("severity {0} is not an RFC 5424 severity (0..=7)")]
    BadSeverity(i64),
    /// A value pattern that does not compile.
    #[error("bad pattern: {0}")]
    BadRegex(String),
    /// A `[[pattern]]` needs exactly one of `require` and `deny`.
    #[error("a [[pattern]] needs exactly one of `require` and `deny`")]
    PatternMode,
    /// A `[[honeytoken]]` needs `keys`, `prefixes` or both.
    #[error("a [[honeytoken]] needs `keys` or `prefixes`")]
    HoneytokenEmpty,
    /// A number outside its allowed range.
    #[error("`{key}` must be in {min}..={max}")]
    OutOfRange {
        /// The key.
        key: &'static str,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A filter key that does not apply to this `target`.
    #[error("`{key}` does not apply to target {target:?}")]
    FilterNotForTarget {
        /// The key.
        key: &'static str,
        /// The target kind.
        target: &'static str,
    },
    /// More rules than [`MAX_RULES`].
    #[error("more than {MAX_RULES} rules in the bundle")]
    TooManyRules,
}

/// Why a bundle was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The TOML parser refused the text (syntax, a wrong type, an unknown key).
    #[error("{at}: {message}")]
    Parse {
        /// Where.
        at: Location,
        /// The parser's reason.
        message: String,
    },
    /// A well-formed value that the policy language refuses.
    #[error("{at}: {problem}")]
    Invalid {
        /// Where.
        at: Location,
        /// What.
        problem: Problem,
    },
    /// More files than [`MAX_FILES`].
    #[error("{count} files in the bundle, at most {MAX_FILES}")]
    TooManyFiles {
        /// How many were given.
        count: usize,
    },
    /// A file name that is empty or longer than [`MAX_FILE_NAME`].
    #[error("bad file name {0:?}")]
    BadFileName(String),
    /// Two files with one name.
    #[error("file {0:?} given twice")]
    DuplicateFile(String),
    /// A file larger than [`MAX_FILE_BYTES`].
    #[error("file {file:?} is {len} bytes, at most {MAX_FILE_BYTES}")]
    FileTooLarge {
        /// The file.
        file: String,
        /// Its size.
        len: usize,
    },
}

/// One rule's identity and reaction, as a decision reports it.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub name: Arc<str>,
    pub action: Action,
    pub severity: Severity,
    /// Position in the bundle (files by name, then text order): the last tie-break.
    pub order: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Handler {
    pub read: Vec<KeyRange>,
    pub write: Vec<KeyRange>,
    pub read_rule: Rule,
    pub write_rule: Rule,
    pub max_ops: Option<(u64, Rule)>,
    pub max_bytes_written: Option<(u64, Rule)>,
    pub max_duration_ms: Option<(u64, Rule)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Honeytoken {
    pub rule: Rule,
    /// Exact keys as one-key ranges, and prefixes as prefix ranges.
    pub ranges: Vec<KeyRange>,
}

#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    pub rule: Rule,
    pub prefixes: Vec<KeyRange>,
    pub handlers: Option<Vec<Box<str>>>,
    pub regex: regex::bytes::Regex,
    /// `true`: a value that does NOT match fires (`require`); `false`: a match fires (`deny`).
    pub require: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Rate {
    pub rule: Rule,
    pub max: u64,
    pub window_ms: u64,
    pub handlers: Option<Vec<Box<str>>>,
}

#[derive(Debug, Clone)]
pub(crate) struct DomainRule {
    pub rule: Rule,
    pub events: Vec<DomainEventKind>,
    pub handlers: Option<Vec<Box<str>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetKind {
    Tx,
    Key,
    Handler,
    Client,
}

#[derive(Debug, Clone)]
pub(crate) struct ExternalRule {
    pub rule: Rule,
    pub target: TargetKind,
    /// For `target = "key"`.
    pub prefixes: Option<Vec<KeyRange>>,
    /// For `target = "handler"` or `"client"`.
    pub names: Option<Vec<Box<str>>>,
    pub reasons: Option<Vec<Box<str>>>,
}

/// A loaded, validated policy bundle. Immutable; evaluate with [`Bundle::evaluate`].
#[derive(Debug, Clone)]
pub struct Bundle {
    pub(crate) hash: [u8; 32],
    pub(crate) unlisted_handler: Rule,
    pub(crate) domain_default: Rule,
    pub(crate) external_default: Rule,
    pub(crate) handlers: HashMap<Box<str>, Handler>,
    pub(crate) honeytokens: Vec<Honeytoken>,
    pub(crate) patterns: Vec<Pattern>,
    pub(crate) rates: Vec<Rate>,
    pub(crate) domain: Vec<DomainRule>,
    pub(crate) external: Vec<ExternalRule>,
    pub(crate) penalty: Option<Penalty>,
}

/// The per-client penalty of `[engine]` (`penalty_after` and the keys beside it): a client
/// whose transactions end in `after` hostile domain events (protocol violation, forbidden
/// system call, crash, timeout, limit) within `window_ms` may have at most `share`
/// transactions admitted at once for `duration_ms` (0: none). The engine only carries the
/// setting; the executor counts the events and the client API enforces the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalty {
    /// Hostile domain events within the window that start a penalty.
    pub after: u32,
    /// The window, ms.
    pub window_ms: u64,
    /// How long a penalty lasts, ms (from the event that started it).
    pub duration_ms: u64,
    /// Transactions of a penalised client admitted at once.
    pub share: u32,
}

/// `penalty_window_ms` when not given.
pub const PENALTY_WINDOW_MS: u64 = 10_000;
/// `penalty_ms` when not given.
pub const PENALTY_MS: u64 = 30_000;
/// `penalty_share` when not given.
pub const PENALTY_SHARE: u32 = 1;

// ---- the raw TOML shape -------------------------------------------------------------------

type SList = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    engine: Option<Spanned<RawEngine>>,
    #[serde(default)]
    handler: BTreeMap<Spanned<String>, RawHandler>,
    #[serde(default)]
    honeytoken: Vec<Spanned<RawHoneytoken>>,
    #[serde(default)]
    pattern: Vec<Spanned<RawPattern>>,
    #[serde(default)]
    rate: Vec<Spanned<RawRate>>,
    #[serde(default)]
    domain: Vec<Spanned<RawDomain>>,
    #[serde(default)]
    external: Vec<Spanned<RawExternal>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    unlisted_handler: Option<Spanned<String>>,
    domain_default: Option<Spanned<String>>,
    external_default: Option<Spanned<String>>,
    penalty_after: Option<Spanned<i64>>,
    penalty_window_ms: Option<Spanned<i64>>,
    penalty_ms: Option<Spanned<i64>>,
    penalty_share: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    start: Spanned<String>,
    end: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    read: Option<SList>,
    write: Option<SList>,
    read_ranges: Option<Spanned<Vec<Spanned<RawRange>>>>,
    write_ranges: Option<Spanned<Vec<Spanned<RawRange>>>>,
    max_ops: Option<Spanned<i64>>,
    max_bytes_written: Option<Spanned<i64>>,
    max_duration_ms: Option<Spanned<i64>>,
    on_violation: Option<Spanned<String>>,
    on_limit: Option<Spanned<String>>,
    severity: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHoneytoken {
    name: Spanned<String>,
    keys: Option<SList>,
    prefixes: Option<SList>,
    action: Option<Spanned<String>>,
    severity: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPattern {
    name: Spanned<String>,
    prefixes: SList,
    handlers: Option<SList>,
    require: Option<Spanned<String>>,
    deny: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    severity: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    name: Spanned<String>,
    max: Spanned<i64>,
    window_ms: Spanned<i64>,
    handlers: Option<SList>,
    action: Option<Spanned<String>>,
    severity: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    name: Spanned<String>,
    events: Spanned<Vec<DomainEventKind>>,
    handlers: Option<SList>,
    action: Option<Spanned<String>>,
    severity: Option<Spanned<i64>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawTarget {
    Tx,
    Key,
    Handler,
    Client,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExternal {
    name: Spanned<String>,
    target: Spanned<RawTarget>,
    prefixes: Option<SList>,
    names: Option<SList>,
    reasons: Option<SList>,
    action: Option<Spanned<String>>,
    severity: Option<Spanned<i64>>,
}

// ---- loading ------------------------------------------------------------------------------

/// One file being compiled: its name and text, to turn spans into locations.
struct Src<'a> {
    name: &'a str,
    text: &'a str,
}

impl Src<'_> {
    fn at(&self, span: Range<usize>) -> Location {
        let offset = span.start.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        Location {
            file: self.name.to_owned(),
            line,
            column,
        }
    }

    fn err(&self, span: Range<usize>, problem: Problem) -> PolicyError {
        PolicyError::Invalid {
            at: self.at(span),
            problem,
        }
    }
}

/// Accumulates rules across files, checking names for uniqueness.
struct Builder {
    order: u32,
    names: HashMap<String, Location>,
    handler_at: HashMap<String, Location>,
    engine_at: Option<Location>,
    bundle: Bundle,
}

fn valid_rule_name(name: &str) -> bool {
    mayfly_names::is_name(name, MAX_RULE_NAME)
        && !name.starts_with("builtin.")
        && !name.starts_with("handler.")
}

/// A handler the policy names: a word (no dots, so `handler.<name>.<kind>` parses back) of
/// at most [`MAX_HANDLER_NAME`] bytes (so that rule name fits [`MAX_RULE_NAME`]).
fn valid_handler_name(name: &str) -> bool {
    mayfly_names::is_word(name, MAX_HANDLER_NAME)
}

fn builtin(name: &str, action: Action, order: u32) -> Rule {
    Rule {
        name: Arc::from(name),
        action,
        severity: action.default_severity(),
        order,
    }
}

impl Builder {
    fn new() -> Self {
        Self {
            order: 0,
            names: HashMap::new(),
            handler_at: HashMap::new(),
            engine_at: None,
            bundle: Bundle {
                hash: [0; 32],
                unlisted_handler: builtin("builtin.unlisted_handler", Action::Abort, 0),
                domain_default: builtin("builtin.domain_default", Action::Abort, 0),
                external_default: builtin("builtin.external_default", Action::Alert, 0),
                handlers: HashMap::new(),
                honeytokens: Vec::new(),
                patterns: Vec::new(),
                rates: Vec::new(),
                domain: Vec::new(),
                external: Vec::new(),
                penalty: None,
            },
        }
    }

    fn next_order(&mut self, src: &Src<'_>, span: Range<usize>) -> Result<u32, PolicyError> {
        self.order += 1;
        if self.order as usize > MAX_RULES {
            return Err(src.err(span, Problem::TooManyRules));
        }
        Ok(self.order)
    }

    /// Registers a user-named rule and returns it.
    fn rule(
        &mut self,
        src: &Src<'_>,
        name: &Spanned<String>,
        action: &Option<Spanned<String>>,
        default_action: Action,
        severity: &Option<Spanned<i64>>,
    ) -> Result<Rule, PolicyError> {
        let n = name.get_ref();
        if !valid_rule_name(n) {
            return Err(src.err(name.span(), Problem::BadRuleName(n.clone())));
        }
        let at = src.at(name.span());
        if let Some(first) = self.names.get(n) {
            return Err(PolicyError::Invalid {
                at,
                problem: Problem::DuplicateRule {
                    name: n.clone(),
                    first: first.clone(),
                },
            });
        }
        self.names.insert(n.clone(), at);
        let action = parse_action(src, action)?.unwrap_or(default_action);
        let severity = parse_severity(src, severity)?.unwrap_or(action.default_severity());
        Ok(Rule {
            name: Arc::from(n.as_str()),
            action,
            severity,
            order: self.next_order(src, name.span())?,
        })
    }

    fn file(&mut self, src: &Src<'_>) -> Result<(), PolicyError> {
        let raw: RawFile = toml::from_str(src.text).map_err(|e| PolicyError::Parse {
            at: src.at(e.span().unwrap_or(0..0)),
            message: e.message().trim_end().to_owned(),
        })?;
        if let Some(engine) = &raw.engine {
            self.engine(src, engine)?;
        }
        for (name, h) in &raw.handler {
            self.handler(src, name, h)?;
        }
        for h in &raw.honeytoken {
            self.honeytoken(src, h)?;
        }
        for p in &raw.pattern {
            self.pattern(src, p)?;
        }
        for r in &raw.rate {
            self.rate(src, r)?;
        }
        for d in &raw.domain {
            self.domain(src, d)?;
        }
        for x in &raw.external {
            self.external(src, x)?;
        }
        Ok(())
    }

    fn engine(&mut self, src: &Src<'_>, e: &Spanned<RawEngine>) -> Result<(), PolicyError> {
        let at = src.at(e.span());
        if let Some(first) = &self.engine_at {
            return Err(PolicyError::Invalid {
                at,
                problem: Problem::DuplicateEngine(first.clone()),
            });
        }
        self.engine_at = Some(at);
        let e = e.get_ref();
        let b = &mut self.bundle;
        for (raw, rule) in [
            (&e.unlisted_handler, &mut b.unlisted_handler),
            (&e.domain_default, &mut b.domain_default),
            (&e.external_default, &mut b.external_default),
        ] {
            if let Some(action) = parse_action(src, raw)? {
                rule.action = action;
                rule.severity = action.default_severity();
            }
        }
        let opt = |v: &Option<Spanned<i64>>, key, min, max, default: u64| {
            v.as_ref()
                .map_or(Ok(default), |v| number(src, v, key, min, max))
        };
        match &e.penalty_after {
            Some(after) => {
                let after = number(src, after, "penalty_after", 1, 1_000)?;
                b.penalty = Some(Penalty {
                    after: u32::try_from(after).unwrap_or(u32::MAX),
                    window_ms: opt(
                        &e.penalty_window_ms,
                        "penalty_window_ms",
                        1,
                        MAX_WINDOW_MS,
                        PENALTY_WINDOW_MS,
                    )?,
                    duration_ms: opt(&e.penalty_ms, "penalty_ms", 1, MAX_WINDOW_MS, PENALTY_MS)?,
                    share: u32::try_from(opt(
                        &e.penalty_share,
                        "penalty_share",
                        0,
                        4_096,
                        PENALTY_SHARE.into(),
                    )?)
                    .unwrap_or(u32::MAX),
                });
            }
            None => {
                // The other keys say nothing without `penalty_after`: refused, not ignored.
                for (v, key) in [
                    (&e.penalty_window_ms, "penalty_window_ms"),
                    (&e.penalty_ms, "penalty_ms"),
                    (&e.penalty_share, "penalty_share"),
                ] {
                    if let Some(v) = v {
                        return Err(src.err(v.span(), Problem::PenaltyWithoutAfter(key)));
                    }
                }
            }
        }
        Ok(())
    }

    fn handler(
        &mut self,
        src: &Src<'_>,
        name: &Spanned<String>,
        h: &RawHandler,
    ) -> Result<(), PolicyError> {
        let n = name.get_ref();
        if !valid_handler_name(n) {
            return Err(src.err(name.span(), Problem::BadHandlerName(n.clone())));
        }
        let at = src.at(name.span());
        if let Some(first) = self.handler_at.get(n) {
            return Err(PolicyError::Invalid {
                at,
                problem: Problem::DuplicateHandler {
                    name: n.clone(),
                    first: first.clone(),
                },
            });
        }
        self.handler_at.insert(n.clone(), at);
        let mut read = prefixes(src, &h.read, "read")?.unwrap_or_default();
        read.extend(ranges(src, &h.read_ranges, "read_ranges")?);
        let mut write = prefixes(src, &h.write, "write")?.unwrap_or_default();
        write.extend(ranges(src, &h.write_ranges, "write_ranges")?);
        let on_violation = parse_action(src, &h.on_violation)?.unwrap_or(Action::Abort);
        let on_limit = parse_action(src, &h.on_limit)?.unwrap_or(Action::Abort);
        let severity = parse_severity(src, &h.severity)?;
        let order = self.next_order(src, name.span())?;
        let mk = |kind: &str, action: Action| Rule {
            name: Arc::from(format!("handler.{n}.{kind}")),
            action,
            severity: severity.unwrap_or(action.default_severity()),
            order,
        };
        let limit = |raw: &Option<Spanned<i64>>, key: &'static str| -> Result<_, PolicyError> {
            raw.as_ref()
                .map(|v| Ok((number(src, v, key, 0, u64::MAX)?, mk(key, on_limit))))
                .transpose()
        };
        let handler = Handler {
            read,
            write,
            read_rule: mk("read", on_violation),
            write_rule: mk("write", on_violation),
            max_ops: limit(&h.max_ops, "max_ops")?,
            max_bytes_written: limit(&h.max_bytes_written, "max_bytes_written")?,
            max_duration_ms: limit(&h.max_duration_ms, "max_duration_ms")?,
        };
        self.bundle.handlers.insert(n.as_str().into(), handler);
        Ok(())
    }

    fn honeytoken(&mut self, src: &Src<'_>, h: &Spanned<RawHoneytoken>) -> Result<(), PolicyError> {
        let r = h.get_ref();
        let rule = self.rule(src, &r.name, &r.action, Action::Quarantine, &r.severity)?;
        let mut set = Vec::new();
        if let Some(keys) = &r.keys {
            check_list(src, keys, "keys")?;
            for k in keys.get_ref() {
                set.push(KeyRange::exact(key_bytes(src, k)?));
            }
        }
        set.extend(prefixes(src, &r.prefixes, "prefixes")?.unwrap_or_default());
        if set.is_empty() {
            return Err(src.err(h.span(), Problem::HoneytokenEmpty));
        }
        self.bundle
            .honeytokens
            .push(Honeytoken { rule, ranges: set });
        Ok(())
    }

    fn pattern(&mut self, src: &Src<'_>, p: &Spanned<RawPattern>) -> Result<(), PolicyError> {
        let r = p.get_ref();
        let rule = self.rule(src, &r.name, &r.action, Action::Abort, &r.severity)?;
        let prefixes = prefixes(src, &Some(r.prefixes.clone()), "prefixes")?.unwrap_or_default();
        let handlers = handler_list(src, &r.handlers, "handlers")?;
        let (text, require) = match (&r.require, &r.deny) {
            (Some(t), None) => (t, true),
            (None, Some(t)) => (t, false),
            _ => return Err(src.err(p.span(), Problem::PatternMode)),
        };
        let regex = regex::bytes::RegexBuilder::new(text.get_ref())
            .size_limit(MAX_REGEX_SIZE)
            .dfa_size_limit(MAX_REGEX_SIZE)
            .build()
            .map_err(|e| src.err(text.span(), Problem::BadRegex(e.to_string())))?;
        self.bundle.patterns.push(Pattern {
            rule,
            prefixes,
            handlers,
            regex,
            require,
        });
        Ok(())
    }

    fn rate(&mut self, src: &Src<'_>, r: &Spanned<RawRate>) -> Result<(), PolicyError> {
        let r = r.get_ref();
        let rule = self.rule(src, &r.name, &r.action, Action::Abort, &r.severity)?;
        let max = number(src, &r.max, "max", 1, MAX_RATE)?;
        let window_ms = number(src, &r.window_ms, "window_ms", 1, MAX_WINDOW_MS)?;
        let handlers = handler_list(src, &r.handlers, "handlers")?;
        self.bundle.rates.push(Rate {
            rule,
            max,
            window_ms,
            handlers,
        });
        Ok(())
    }

    fn domain(&mut self, src: &Src<'_>, d: &Spanned<RawDomain>) -> Result<(), PolicyError> {
        let r = d.get_ref();
        let rule = self.rule(src, &r.name, &r.action, Action::Abort, &r.severity)?;
        if r.events.get_ref().is_empty() {
            return Err(src.err(r.events.span(), Problem::EmptyList("events")));
        }
        let handlers = handler_list(src, &r.handlers, "handlers")?;
        self.bundle.domain.push(DomainRule {
            rule,
            events: r.events.get_ref().clone(),
            handlers,
        });
        Ok(())
    }

    fn external(&mut self, src: &Src<'_>, x: &Spanned<RawExternal>) -> Result<(), PolicyError> {
        let r = x.get_ref();
        let target = match r.target.get_ref() {
            RawTarget::Tx => TargetKind::Tx,
            RawTarget::Key => TargetKind::Key,
            RawTarget::Handler => TargetKind::Handler,
            RawTarget::Client => TargetKind::Client,
        };
        let target_name = match target {
            TargetKind::Tx => "tx",
            TargetKind::Key => "key",
            TargetKind::Handler => "handler",
            TargetKind::Client => "client",
        };
        let rule = self.rule(src, &r.name, &r.action, Action::Alert, &r.severity)?;
        if let (Some(p), false) = (&r.prefixes, target == TargetKind::Key) {
            return Err(src.err(
                p.span(),
                Problem::FilterNotForTarget {
                    key: "prefixes",
                    target: target_name,
                },
            ));
        }
        if let (Some(p), false) = (
            &r.names,
            matches!(target, TargetKind::Handler | TargetKind::Client),
        ) {
            return Err(src.err(
                p.span(),
                Problem::FilterNotForTarget {
                    key: "names",
                    target: target_name,
                },
            ));
        }
        let prefixes = prefixes(src, &r.prefixes, "prefixes")?;
        let names = string_list(src, &r.names, "names")?;
        let reasons = string_list(src, &r.reasons, "reasons")?;
        self.bundle.external.push(ExternalRule {
            rule,
            target,
            prefixes,
            names,
            reasons,
        });
        Ok(())
    }
}

fn parse_action(
    src: &Src<'_>,
    raw: &Option<Spanned<String>>,
) -> Result<Option<Action>, PolicyError> {
    raw.as_ref()
        .map(|s| {
            Action::parse(s.get_ref())
                .ok_or_else(|| src.err(s.span(), Problem::BadAction(s.get_ref().clone())))
        })
        .transpose()
}

fn parse_severity(
    src: &Src<'_>,
    raw: &Option<Spanned<i64>>,
) -> Result<Option<Severity>, PolicyError> {
    raw.as_ref()
        .map(|s| {
            u8::try_from(*s.get_ref())
                .ok()
                .and_then(Severity::from_u8)
                .ok_or_else(|| src.err(s.span(), Problem::BadSeverity(*s.get_ref())))
        })
        .transpose()
}

fn number(
    src: &Src<'_>,
    v: &Spanned<i64>,
    key: &'static str,
    min: u64,
    max: u64,
) -> Result<u64, PolicyError> {
    u64::try_from(*v.get_ref())
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| src.err(v.span(), Problem::OutOfRange { key, min, max }))
}

fn check_list(src: &Src<'_>, list: &SList, key: &'static str) -> Result<(), PolicyError> {
    if list.get_ref().is_empty() {
        return Err(src.err(list.span(), Problem::EmptyList(key)));
    }
    Ok(())
}

fn key_bytes(src: &Src<'_>, k: &Spanned<String>) -> Result<Vec<u8>, PolicyError> {
    let b = k.get_ref().as_bytes();
    if b.is_empty() {
        return Err(src.err(k.span(), Problem::EmptyKey));
    }
    if b.len() > MAX_KEY {
        return Err(src.err(k.span(), Problem::KeyTooLong(b.len())));
    }
    Ok(b.to_vec())
}

fn prefixes(
    src: &Src<'_>,
    list: &Option<SList>,
    key: &'static str,
) -> Result<Option<Vec<KeyRange>>, PolicyError> {
    let Some(list) = list else { return Ok(None) };
    check_list(src, list, key)?;
    list.get_ref()
        .iter()
        .map(|k| Ok(KeyRange::prefix(&key_bytes(src, k)?)))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn ranges(
    src: &Src<'_>,
    list: &Option<Spanned<Vec<Spanned<RawRange>>>>,
    key: &'static str,
) -> Result<Vec<KeyRange>, PolicyError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if list.get_ref().is_empty() {
        return Err(src.err(list.span(), Problem::EmptyList(key)));
    }
    let mut out = Vec::new();
    for r in list.get_ref() {
        let raw = r.get_ref();
        let start = raw.start.get_ref().as_bytes().to_vec();
        if start.len() > MAX_KEY {
            return Err(src.err(raw.start.span(), Problem::KeyTooLong(start.len())));
        }
        let end = match &raw.end {
            Some(e) => {
                let e = key_bytes(src, e)?;
                Some(e)
            }
            None => None,
        };
        if end.as_ref().is_some_and(|e| *e <= start) {
            return Err(src.err(r.span(), Problem::EmptyRange));
        }
        out.push(KeyRange { start, end });
    }
    Ok(out)
}

fn string_list(
    src: &Src<'_>,
    list: &Option<SList>,
    key: &'static str,
) -> Result<Option<Vec<Box<str>>>, PolicyError> {
    let Some(list) = list else { return Ok(None) };
    check_list(src, list, key)?;
    Ok(Some(
        list.get_ref()
            .iter()
            .map(|s| s.get_ref().as_str().into())
            .collect(),
    ))
}

fn handler_list(
    src: &Src<'_>,
    list: &Option<SList>,
    key: &'static str,
) -> Result<Option<Vec<Box<str>>>, PolicyError> {
    if let Some(l) = list {
        for h in l.get_ref() {
            if !valid_handler_name(h.get_ref()) {
                return Err(src.err(h.span(), Problem::BadHandlerName(h.get_ref().clone())));
            }
        }
    }
    string_list(src, list, key)
}

/// SHA-256 over the canonical serialization described in the [module docs](self).
fn bundle_hash(sorted: &[(&str, &str)]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // Counts and lengths are bounded by MAX_FILES / MAX_FILE_NAME / MAX_FILE_BYTES.
    ctx.update(
        &u32::try_from(sorted.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for (name, text) in sorted {
        ctx.update(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
        ctx.update(name.as_bytes());
        ctx.update(&u64::try_from(text.len()).unwrap_or(u64::MAX).to_be_bytes());
        ctx.update(text.as_bytes());
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl Bundle {
    /// Loads a bundle from `(file name, text)` pairs, in any order. Files are compiled in
    /// name order, so rule order (the last tie-break) does not depend on the caller's order.
    pub fn load<N, T>(files: &[(N, T)]) -> Result<Bundle, PolicyError>
    where
        N: AsRef<str>,
        T: AsRef<str>,
    {
        if files.len() > MAX_FILES {
            return Err(PolicyError::TooManyFiles { count: files.len() });
        }
        let mut sorted: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_ref(), t.as_ref()))
            .collect();
        sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (i, (name, text)) in sorted.iter().enumerate() {
            if name.is_empty() || name.len() > MAX_FILE_NAME {
                return Err(PolicyError::BadFileName((*name).to_owned()));
            }
            if i > 0 && sorted.get(i - 1).is_some_and(|p| p.0 == *name) {
                return Err(PolicyError::DuplicateFile((*name).to_owned()));
            }
            if text.len() > MAX_FILE_BYTES {
                return Err(PolicyError::FileTooLarge {
                    file: (*name).to_owned(),
                    len: text.len(),
                });
            }
        }
        let mut b = Builder::new();
        for (name, text) in &sorted {
            b.file(&Src { name, text })?;
        }
        let mut bundle = b.bundle;
        bundle.hash = bundle_hash(&sorted);
        Ok(bundle)
    }

    /// The bundle hash (see the [module docs](self)): what checkpoints record as `policy_hash`.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The per-client penalty of `[engine]`, if the bundle sets one (`penalty_after`).
    pub fn penalty(&self) -> Option<Penalty> {
        self.penalty
    }

    /// Names of the handlers the bundle grants capabilities to, sorted.
    pub fn handlers(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.handlers.keys().map(|k| &**k).collect();
        v.sort_unstable();
        v
    }

    /// The handlers the bundle grants capabilities to that are not among `available` (the
    /// guest's), sorted: a policy written for another guest image, or a misspelt handler.
    /// Handlers the guest has and the bundle does not name are not listed: the bundle's
    /// `unlisted_handler` rule decides for them.
    pub fn handlers_missing_from<S: AsRef<str>>(&self, available: &[S]) -> Vec<&str> {
        self.handlers()
            .into_iter()
            .filter(|h| !available.iter().any(|a| a.as_ref() == *h))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use mayfly_hex::encode as hex;

    #[test]
    fn handlers_missing_from_the_guest_are_named_and_extra_guest_handlers_are_not() {
        let b = Bundle::load(&[(
            "h.toml",
            "[handler.kv]\nread = [\"kv/\"]\n\n[handler.ghost]\nread = [\"g/\"]\n",
        )])
        .unwrap();
        assert_eq!(b.handlers_missing_from(&["kv", "transfer"]), ["ghost"]);
        assert!(b
            .handlers_missing_from(&["ghost", "kv", "test.crash"])
            .is_empty());
        assert_eq!(b.handlers_missing_from::<&str>(&[]), ["ghost", "kv"]);
    }

    #[test]
    fn hash_vector_empty() {
        let b = Bundle::load::<&str, &str>(&[]).unwrap();
        assert_eq!(
            hex(&b.hash()),
            "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
        );
    }

    #[test]
    fn hash_vector_one_file() {
        let b = Bundle::load(&[("a.toml", "[engine]\n")]).unwrap();
        let mut expect = Vec::new();
        expect.extend_from_slice(&1u32.to_be_bytes());
        expect.extend_from_slice(&6u32.to_be_bytes());
        expect.extend_from_slice(b"a.toml");
        expect.extend_from_slice(&9u64.to_be_bytes());
        expect.extend_from_slice(b"[engine]\n");
        let d = ring::digest::digest(&ring::digest::SHA256, &expect);
        assert_eq!(b.hash(), d.as_ref());
        assert_eq!(
            hex(&b.hash()),
            "4b3ac88c61623e5d8533ede3da0ae2ed2a6975b9b288a1ad7a2f2146bf3d9d9f",
            "vector documented in policies/schema.md"
        );
    }

    #[test]
    fn locations_count_chars() {
        let src = Src {
            name: "f",
            text: "ab\nçd = x\n",
        };
        let at = src.at(9..10);
        assert_eq!((at.line, at.column), (2, 6));
    }
}
