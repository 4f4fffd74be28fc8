//! The handler RNG: deterministic given the transaction's entropy seed.
//!
//! Every domain is cloned from one template, so any RNG state the template had would be
//! shared by all clones. The guest runtime therefore seeds no RNG before the transaction
//! arrives: [`HandlerRng`] is created from the 32-byte entropy seed the agent sends, fresh
//! for every transaction, in `Start`.
//!
//! The generator is ChaCha20 (20 rounds; RustCrypto's `chacha20::ChaCha20Rng`) keyed by the
//! seed, stream (nonce) 0, block counter from 0: the output is the ChaCha20 keystream of that
//! key, read as little-endian words. Hence:
//!
//! - the same seed gives the same stream (a transaction can be re-run bit for bit if its
//!   seed is kept);
//! - different seeds give independent streams (clones never share RNG state);
//! - nothing else feeds it: no OS entropy, no time.
//!
//! It is a CSPRNG as good as its seed; the agent draws the seed from the OS.

use chacha20::ChaCha20Rng;
use rand_core::{Infallible, Rng, SeedableRng, TryCryptoRng, TryRng};

/// A ChaCha20 RNG seeded from a transaction's entropy seed. See the [module docs](self).
#[derive(Debug, PartialEq, Eq)]
pub struct HandlerRng {
    inner: ChaCha20Rng,
}

impl HandlerRng {
    /// The RNG for entropy seed `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            inner: ChaCha20Rng::from_seed(seed),
        }
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// Fills `dst` with random bytes.
    pub fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.inner.fill_bytes(dst);
    }

    /// A uniformly distributed number in `0..bound`, or `None` if `bound` is 0. Unbiased
    /// (rejection sampling).
    pub fn below(&mut self, bound: u64) -> Option<u64> {
        if bound == 0 {
            return None;
        }
        // Reject draws from the incomplete last copy of 0..bound in 0..2^64.
        let zone = u64::MAX - (u64::MAX - bound + 1) % bound;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return Some(x % bound);
            }
        }
    }
}

impl TryRng for HandlerRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill_bytes(dst);
        Ok(())
    }
}

impl TryCryptoRng for HandlerRng {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_the_chacha20_keystream_of_the_seed() {
        // RFC 8439 §2.4.2-style known answer: ChaCha20 with an all-zero key, nonce and
        // counter starts 76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd 28.
        let mut rng = HandlerRng::from_seed([0; 32]);
        let mut first = [0u8; 16];
        rng.fill_bytes(&mut first);
        assert_eq!(
            first,
            [
                0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90, 0x40, 0x5d, 0x6a, 0xe5, 0x53, 0x86,
                0xbd, 0x28
            ]
        );
        assert_eq!(HandlerRng::from_seed([0; 32]).next_u32(), 0xade0_b876);
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let draw = |seed: [u8; 32]| {
            let mut rng = HandlerRng::from_seed(seed);
            (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw([1; 32]), draw([1; 32]));
        let mut other = [1; 32];
        other[31] ^= 1;
        assert_ne!(draw([1; 32]), draw(other));
    }

    #[test]
    fn below_stays_in_range_and_reaches_every_value() {
        let mut rng = HandlerRng::from_seed([3; 32]);
        assert_eq!(rng.below(0), None);
        assert_eq!(rng.below(1), Some(0));
        let mut seen = [false; 6];
        for _ in 0..600 {
            let v = rng.below(6).unwrap();
            assert!(v < 6);
            seen[usize::try_from(v).unwrap()] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert!(rng.below(u64::MAX).unwrap() < u64::MAX);
    }

    #[test]
    fn rand_core_traits_forward_to_the_same_stream() {
        let mut a = HandlerRng::from_seed([5; 32]);
        let mut b = HandlerRng::from_seed([5; 32]);
        assert_eq!(a.try_next_u64(), Ok(b.next_u64()));
        assert_eq!(a.try_next_u32(), Ok(b.next_u32()));
    }
}
