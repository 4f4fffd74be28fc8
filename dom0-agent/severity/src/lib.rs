//! Severity, once: the RFC 5424 severity of an audit record (`mayfly-ledger`, stored as one
//! byte, docs/formats.md §1.4), of a policy decision (`mayfly-policy`, a rule's `severity =
//! 0..7` in a bundle) and of the syslog message the SIEM export sends. Both crates re-export
//! this type, so a decision's severity is recorded as is, with no conversion to get wrong.
//!
//! The discriminant is the RFC's numeric code (0 emergency ..= 7 debug); lower is more
//! severe, and the derived order follows the code (`Alert < Warning`), which is what "at
//! least as severe as" tests such as `severity <= Severity::Warning` rely on.
//!
//! `no_std`, no dependencies.

#![no_std]
#![forbid(unsafe_code)]

/// RFC 5424 severity (numeric value = the RFC's code; lower is more severe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Severity {
    /// 0: system is unusable.
    Emergency = 0,
    /// 1: action must be taken immediately (attacks).
    Alert = 1,
    /// 2: critical conditions.
    Critical = 2,
    /// 3: error conditions.
    Error = 3,
    /// 4: warning conditions.
    Warning = 4,
    /// 5: normal but significant (rollbacks, admin actions).
    Notice = 5,
    /// 6: informational (lifecycle).
    Info = 6,
    /// 7: debug-level messages.
    Debug = 7,
}

impl Severity {
    /// Every severity, most severe first.
    pub const ALL: [Severity; 8] = [
        Self::Emergency,
        Self::Alert,
        Self::Critical,
        Self::Error,
        Self::Warning,
        Self::Notice,
        Self::Info,
        Self::Debug,
    ];

    /// The RFC 5424 code (the byte an audit record stores).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// From the RFC 5424 code; `None` above 7.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Emergency,
            1 => Self::Alert,
            2 => Self::Critical,
            3 => Self::Error,
            4 => Self::Warning,
            5 => Self::Notice,
            6 => Self::Info,
            7 => Self::Debug,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Severity;

    /// The codes are the RFC's (they are stored in signed audit records: changing one
    /// would change an encoding), and `from_u8` is their exact inverse.
    #[test]
    fn codes_are_the_rfc_5424_ones_and_round_trip() {
        let expected = [
            (Severity::Emergency, 0),
            (Severity::Alert, 1),
            (Severity::Critical, 2),
            (Severity::Error, 3),
            (Severity::Warning, 4),
            (Severity::Notice, 5),
            (Severity::Info, 6),
            (Severity::Debug, 7),
        ];
        for (s, code) in expected {
            assert_eq!(s.code(), code);
            assert_eq!(Severity::from_u8(code), Some(s));
        }
        for code in 8..=u8::MAX {
            assert_eq!(Severity::from_u8(code), None);
        }
    }

    /// Lower codes order first: "at least as severe as Warning" is `<= Warning`.
    #[test]
    fn more_severe_orders_first() {
        assert!(Severity::ALL.windows(2).all(|w| w[0] < w[1]));
        assert!(Severity::Alert <= Severity::Warning);
        assert!(Severity::Info > Severity::Warning);
    }
}
