//! The crate's shared vocabulary: [`Hash`], [`TxId`] and the clock.
//!
//! A leaf module: it uses only [`crate::codec`] (hex).

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// A transaction id: 16 bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub [u8; 16]);

impl TxId {
    /// A new, time-ordered id: 8 bytes of Unix time in ns, then 8 random bytes from the
    /// system RNG. Ordered ids make the `tx_index` an append, not a random insert.
    pub fn generate() -> Self {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&now_ns().to_be_bytes());
        // The system RNG only fails when the OS has no entropy source at all; a repeated
        // id would then be refused as a duplicate at commit rather than go unnoticed.
        let _ = ring::rand::SystemRandom::new().fill(&mut b[8..]);
        Self(b)
    }

    /// Parses 32 hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        crate::codec::unhex(s)?.try_into().ok().map(Self)
    }
}

impl std::fmt::Display for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::codec::hex(&self.0))
    }
}

impl std::fmt::Debug for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TxId({self})")
    }
}

/// Unix time in ns (0 before the epoch, `u64::MAX` past 2554).
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
