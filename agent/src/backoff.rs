//! Exponential backoff with full jitter, sans-IO: the caller supplies the
//! random draw, so tests are deterministic.

use std::time::Duration;

/// Delays for retrying a failed call: the `n`-th consecutive failure waits a
/// uniformly random time in `[base·2ⁿ / 2, base·2ⁿ]`, capped at `max`.
/// Half of the delay is kept so that a fleet that lost its scheduler at the
/// same moment spreads out without any agent retrying immediately.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The delay before the next attempt; `unit` is a random number in
    /// `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.base.saturating_mul(1u32 << exp).min(self.max);
        let unit = unit.clamp(0.0, 1.0);
        ceiling.mul_f64(0.5 + 0.5 * unit)
    }

    /// The delay with a random draw from `rand`.
    pub fn next_random(&mut self) -> Duration {
        self.next_delay(rand::random::<f64>())
    }

    /// A success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(800));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
        for _ in 0..100 {
            assert!(b.next_delay(0.99) <= Duration::from_secs(1));
        }
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..10 {
            let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(60));
            let d = b.next_delay(f64::from(i) / 10.0);
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000));
            seen.insert(d);
        }
        assert_eq!(seen.len(), 10);
    }
}
