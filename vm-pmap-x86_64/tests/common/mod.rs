//! Helpers the pmap's red-team tests share.

/// A small xorshift generator: seeded tests that replay the same steps.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True `p` percent of the time.
    #[allow(dead_code)] // not every test file uses it
    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}
