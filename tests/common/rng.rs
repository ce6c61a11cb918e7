//! A small deterministic pseudo-random sequence (xorshift) for the fault tests: seeded per
//! run and printed, so that a failing run can be repeated with `QMQPD_FAULT_SEED`.

use std::time::SystemTime;

/// Xorshift state; never 0.
pub struct Rng(u64);

impl Rng {
    /// Seeded from QMQPD_FAULT_SEED, else from the clock; prints the seed.
    pub fn new() -> Rng {
        let seed = std::env::var("QMQPD_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        eprintln!("QMQPD_FAULT_SEED={seed}");
        Rng(seed.max(1))
    }

    /// A sequence of its own (for another thread), derived from this one and `salt`.
    pub fn fork(&mut self, salt: u64) -> Rng {
        self.step();
        Rng((self.0 ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.step();
        lo + self.0 % (hi - lo)
    }

    fn step(&mut self) {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
    }
}
