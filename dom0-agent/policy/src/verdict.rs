//! The verdict vocabulary shared by the bundle (which names them in rules) and evaluation
//! (which produces them): what the agent must do ([`Action`]), how bad it is ([`Severity`]),
//! and the kinds of domain events rules can name ([`DomainEventKind`]). A leaf: it uses no
//! other module of the crate.

use serde::Deserialize;

/// What the agent must do.
///
/// Ordered by [`Action::rank`], least to most severe: `Allow` < `Alert` < `Abort` <
/// `Quarantine` < `Rollback{false,false}` < `Rollback{false,true}` < `Rollback{true,false}` <
/// `Rollback{true,true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Go on.
    Allow,
    /// Go on, but audit the decision.
    Alert,
    /// End the transaction without committing; destroy the domain.
    Abort,
    /// Abort, and keep the domain paused (not destroyed) for forensics.
    Quarantine,
    /// Undo a committed transaction (for an uncommitted one: abort).
    Rollback {
        /// Also roll back every transaction that read its writes, transitively.
        cascade: bool,
        /// Re-run the legitimate rolled-back transactions in fresh domains.
        replay: bool,
    },
}

impl Action {
    /// Severity order (higher wins).
    pub fn rank(self) -> u8 {
        match self {
            Self::Allow => 0,
            Self::Alert => 1,
            Self::Abort => 2,
            Self::Quarantine => 3,
            Self::Rollback { cascade, replay } => 4 + 2 * u8::from(cascade) + u8::from(replay),
        }
    }

    /// Whether the transaction may go on (`Allow` or `Alert`).
    pub fn permits(self) -> bool {
        matches!(self, Self::Allow | Self::Alert)
    }

    /// The bundle spelling: `allow`, `alert`, `abort`, `quarantine`, `rollback`,
    /// `rollback+cascade`, `rollback+replay`, `rollback+cascade+replay`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Alert => "alert",
            Self::Abort => "abort",
            Self::Quarantine => "quarantine",
            Self::Rollback {
                cascade: false,
                replay: false,
            } => "rollback",
            Self::Rollback {
                cascade: true,
                replay: false,
            } => "rollback+cascade",
            Self::Rollback {
                cascade: false,
                replay: true,
            } => "rollback+replay",
            Self::Rollback {
                cascade: true,
                replay: true,
            } => "rollback+cascade+replay",
        }
    }

    /// Parses the bundle spelling ([`Action::as_str`]).
    pub fn parse(s: &str) -> Option<Self> {
        let (cascade, replay) = match s {
            "allow" => return Some(Self::Allow),
            "alert" => return Some(Self::Alert),
            "abort" => return Some(Self::Abort),
            "quarantine" => return Some(Self::Quarantine),
            "rollback" => (false, false),
            "rollback+cascade" => (true, false),
            "rollback+replay" => (false, true),
            "rollback+cascade+replay" => (true, true),
            _ => return None,
        };
        Some(Self::Rollback { cascade, replay })
    }

    /// The severity a rule with this action gets when the bundle names none.
    pub fn default_severity(self) -> Severity {
        match self {
            Self::Allow => Severity::Info,
            Self::Alert => Severity::Warning,
            Self::Abort => Severity::Critical,
            Self::Quarantine | Self::Rollback { .. } => Severity::Alert,
        }
    }
}

/// RFC 5424 severity: the one definition, shared with the ledger's audit records.
pub use mayfly_severity::Severity;

/// A domain event the agent observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainEventKind {
    /// A malformed ring message or protocol misuse.
    ProtocolViolation,
    /// The domain died.
    Crash,
    /// The transaction ran past its deadline.
    Timeout,
    /// The sandbox's seccomp filter (or Xen's equivalent) refused a call.
    ForbiddenSyscall,
    /// The domain ran over a resource limit (CPU time, file size) and was killed for it,
    /// or sent more ring operations than the agent serves per transaction.
    Limit,
}

impl DomainEventKind {
    /// The bundle spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProtocolViolation => "protocol_violation",
            Self::Crash => "crash",
            Self::Timeout => "timeout",
            Self::ForbiddenSyscall => "forbidden_syscall",
            Self::Limit => "limit",
        }
    }
}
