//! A small seeded generator (xorshift64*) for simulations and randomized tests: the same
//! seed makes the same sequence, so a failing run can be repeated.

#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Any seed; zero (which xorshift cannot leave) is replaced.
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed with this mean.
    pub fn exp(&mut self, mean: u64) -> u64 {
        (-(1.0 - self.unit()).ln() * mean as f64) as u64
    }

    /// One occurrence of a stated duration: 0.75× to 1.5× of it.
    pub fn vary(&mut self, ms: u64) -> u64 {
        (ms as f64 * (0.75 + 0.75 * self.unit())) as u64
    }
}
