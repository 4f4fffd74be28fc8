//! The rules an envelope must meet before the agent acts on it, apart from the nonce
//! (which needs the ledger): every signature by an authorized key and valid, the validity
//! window sane and containing "now" (with a clock-skew allowance), and enough distinct
//! signers for the command.
//!
//! Checked in this order, and the first failure is the answer:
//!
//! 1. at least one signature;
//! 2. every signer is an authorized admin key (`UnknownKey`) — a stray signature is not
//!    ignored, it voids the envelope, so what the log records is what was presented;
//! 3. every signature verifies over the body (`BadSignature`);
//! 4. `expires - issued <= max_validity` (`ValidityTooLong`);
//! 5. `issued <= now + skew` (`NotYetValid`, a future-dated command);
//! 6. `now <= expires + skew` (`Expired`);
//! 7. distinct signers `>= required` (`Quorum`).
//!
//! The agent then records the nonce; a nonce already recorded is a replay. Recorded nonces
//! are pruned once `expires + skew` has passed, when rule 6 refuses the command anyway.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::envelope::{Envelope, PublicKey};
use crate::hex;

/// Defaults and the limits of the settings.
pub mod defaults {
    use std::time::Duration;
    /// Clock difference tolerated between the admin's machine and the appliance.
    pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
    /// Longest validity window the agent accepts (long enough to collect co-signatures
    /// offline, short enough that a leaked envelope soon becomes useless).
    pub const MAX_VALIDITY: Duration = Duration::from_secs(3600);
    /// Distinct admins needed for a destructive command.
    pub const QUORUM: usize = 2;
    /// Largest clock-skew allowance accepted in a configuration.
    pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);
    /// Largest validity window accepted in a configuration (a week). Nonces are kept for
    /// as long as their command could still be accepted, and at most
    /// `MAX_LIVE_NONCES` (100,000) at once: windows without bound would let them pile up
    /// until the console refuses every command.
    pub const MAX_MAX_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
}

/// Why an envelope is refused. `code()` is the stable name shown to clients and audited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No signature at all.
    #[error("the command carries no signature")]
    Unsigned,
    /// A signer that is not an authorized admin key.
    #[error("key {} is not an authorized admin key", hex(.key))]
    UnknownKey {
        /// The key.
        key: PublicKey,
    },
    /// A signature that does not verify.
    #[error("the signature by key {} does not verify over this command (forged, or the command was altered after signing)", hex(.key))]
    BadSignature {
        /// The key.
        key: PublicKey,
    },
    /// Validity window longer than allowed.
    #[error("valid for {window_s} s, longer than the {max_s} s the appliance accepts")]
    ValidityTooLong {
        /// Requested window.
        window_s: u64,
        /// Maximum.
        max_s: u64,
    },
    /// Issued in the future (beyond the skew allowance).
    #[error("issued {ahead_s} s in the future (clock skew allowance {skew_s} s)")]
    NotYetValid {
        /// How far ahead of the appliance's clock.
        ahead_s: u64,
        /// Allowance.
        skew_s: u64,
    },
    /// Expired (beyond the skew allowance).
    #[error("expired {ago_s} s ago (clock skew allowance {skew_s} s)")]
    Expired {
        /// How long ago.
        ago_s: u64,
        /// Allowance.
        skew_s: u64,
    },
    /// Not enough distinct authorized signers.
    #[error("{command} needs signatures by {need} distinct admins, it has {have}")]
    Quorum {
        /// The command.
        command: String,
        /// Distinct valid signers.
        have: usize,
        /// Needed.
        need: usize,
    },
}

impl Rejection {
    /// Stable short name (audit field `reason`, JSON `code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::UnknownKey { .. } => "unknown_key",
            Self::BadSignature { .. } => "bad_signature",
            Self::ValidityTooLong { .. } => "validity_too_long",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::Expired { .. } => "expired",
            Self::Quorum { .. } => "insufficient_quorum",
        }
    }
}

/// The authorized admins and the time rules.
#[derive(Debug, Clone)]
pub struct Authorizer {
    keys: BTreeMap<PublicKey, String>,
    skew: Duration,
    max_validity: Duration,
}

impl Authorizer {
    /// Authorizes `keys` (public key → a name for logs), with the given skew allowance and
    /// longest validity window.
    pub fn new(keys: BTreeMap<PublicKey, String>, skew: Duration, max_validity: Duration) -> Self {
        Self {
            keys,
            skew,
            max_validity,
        }
    }

    /// The authorized keys.
    pub fn keys(&self) -> &BTreeMap<PublicKey, String> {
        &self.keys
    }

    /// Clock-skew allowance.
    pub fn skew(&self) -> Duration {
        self.skew
    }

    /// Longest validity window accepted.
    pub fn max_validity(&self) -> Duration {
        self.max_validity
    }

    /// Checks `env` at time `now_ns` for a command that needs `required` distinct signers.
    /// Returns the signers.
    pub fn check(
        &self,
        env: &Envelope,
        now_ns: u64,
        required: usize,
    ) -> Result<Vec<PublicKey>, Rejection> {
        if env.signatures().is_empty() {
            return Err(Rejection::Unsigned);
        }
        for s in env.signatures() {
            if !self.keys.contains_key(&s.key) {
                return Err(Rejection::UnknownKey { key: s.key });
            }
        }
        for s in env.signatures() {
            if !env.signature_valid(s) {
                return Err(Rejection::BadSignature { key: s.key });
            }
        }
        let body = env.body();
        let skew = duration_ns(self.skew);
        let window = body.expires_ns.saturating_sub(body.issued_ns);
        if window > duration_ns(self.max_validity) {
            return Err(Rejection::ValidityTooLong {
                window_s: window / 1_000_000_000,
                max_s: self.max_validity.as_secs(),
            });
        }
        if body.issued_ns > now_ns.saturating_add(skew) {
            return Err(Rejection::NotYetValid {
                ahead_s: body.issued_ns.saturating_sub(now_ns) / 1_000_000_000,
                skew_s: self.skew.as_secs(),
            });
        }
        if now_ns > body.expires_ns.saturating_add(skew) {
            return Err(Rejection::Expired {
                ago_s: now_ns.saturating_sub(body.expires_ns) / 1_000_000_000,
                skew_s: self.skew.as_secs(),
            });
        }
        // Signers are strictly increasing by key (the decoder enforces it): all distinct.
        let signers: Vec<PublicKey> = env.signatures().iter().map(|s| s.key).collect();
        if signers.len() < required {
            return Err(Rejection::Quorum {
                command: body.command.clone(),
                have: signers.len(),
                need: required,
            });
        }
        Ok(signers)
    }

    /// Nonces whose commands expired before this time may be forgotten.
    pub fn prune_before_ns(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(duration_ns(self.skew))
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Body;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 1_700_000_000 * S;

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn public(k: &Ed25519KeyPair) -> PublicKey {
        k.public_key().as_ref().try_into().unwrap()
    }

    fn auth() -> Authorizer {
        let keys = [(public(&key(1)), "a".into()), (public(&key(2)), "b".into())]
            .into_iter()
            .collect();
        Authorizer::new(keys, Duration::from_secs(60), Duration::from_secs(3600))
    }

    fn env(issued: u64, expires: u64, signers: &[u8]) -> Envelope {
        let mut e = Envelope::new(Body {
            nonce: [1; 16],
            issued_ns: issued,
            expires_ns: expires,
            command: "rollback".into(),
            args: [("seq".to_string(), "1".to_string())].into_iter().collect(),
        })
        .unwrap();
        for s in signers {
            e.sign(&key(*s)).unwrap();
        }
        e
    }

    #[test]
    fn the_rules_in_order() {
        let a = auth();
        let ok = env(NOW, NOW + 300 * S, &[1, 2]);
        assert_eq!(a.check(&ok, NOW, 2).unwrap().len(), 2);
        assert_eq!(
            a.check(&env(NOW, NOW + S, &[]), NOW, 1),
            Err(Rejection::Unsigned)
        );
        assert!(matches!(
            a.check(&env(NOW, NOW + S, &[1, 3]), NOW, 1),
            Err(Rejection::UnknownKey { .. })
        ));
        // A signature by key 2's id made with key 1 (forged).
        let mut forged = env(NOW, NOW + S, &[]);
        let mut bad = [0u8; 64];
        bad.copy_from_slice(key(1).sign(forged.body_bytes()).as_ref());
        forged
            .add_signature(crate::envelope::Signature {
                key: public(&key(2)),
                signature: bad,
            })
            .unwrap();
        assert_eq!(
            a.check(&forged, NOW, 1),
            Err(Rejection::BadSignature {
                key: public(&key(2))
            })
        );
        assert!(matches!(
            a.check(&env(NOW, NOW + 3601 * S, &[1]), NOW, 1),
            Err(Rejection::ValidityTooLong { .. })
        ));
        // Skew: 60 s ahead is fine, 61 s is not.
        assert!(a
            .check(&env(NOW + 60 * S, NOW + 100 * S, &[1]), NOW, 1)
            .is_ok());
        assert!(matches!(
            a.check(&env(NOW + 61 * S, NOW + 100 * S, &[1]), NOW, 1),
            Err(Rejection::NotYetValid { ahead_s: 61, .. })
        ));
        // Expired 60 s ago is within the allowance, 61 s is not.
        assert!(a
            .check(&env(NOW - 200 * S, NOW - 60 * S, &[1]), NOW, 1)
            .is_ok());
        assert!(matches!(
            a.check(&env(NOW - 200 * S, NOW - 61 * S, &[1]), NOW, 1),
            Err(Rejection::Expired { ago_s: 61, .. })
        ));
        assert_eq!(
            a.check(&env(NOW, NOW + S, &[1]), NOW, 2),
            Err(Rejection::Quorum {
                command: "rollback".into(),
                have: 1,
                need: 2
            })
        );
    }
}
