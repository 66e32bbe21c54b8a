//! Sliding-window bitrate measurement for simulcast layer selection.

use std::time::{Duration, Instant};

const BUCKETS: usize = 10;
const BUCKET: Duration = Duration::from_millis(100);

/// Bytes seen over the last second, in ten 100 ms buckets.
#[derive(Debug, Clone)]
pub struct BitrateMeter {
    buckets: [u64; BUCKETS],
    head: usize,
    head_start: Option<Instant>,
}

impl Default for BitrateMeter {
    fn default() -> Self {
        BitrateMeter {
            buckets: [0; BUCKETS],
            head: 0,
            head_start: None,
        }
    }
}

impl BitrateMeter {
    fn advance(&mut self, now: Instant) {
        let Some(start) = self.head_start else {
            self.head_start = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        let steps = (elapsed.as_millis() / BUCKET.as_millis()) as usize;
        if steps == 0 {
            return;
        }
        for _ in 0..steps.min(BUCKETS) {
            self.head = (self.head + 1) % BUCKETS;
            self.buckets[self.head] = 0;
        }
        self.head_start = Some(start + BUCKET * steps as u32);
    }

    pub fn record(&mut self, now: Instant, bytes: usize) {
        self.advance(now);
        self.buckets[self.head] += bytes as u64;
    }

    /// Bits per second over the last second.
    pub fn bps(&mut self, now: Instant) -> u64 {
        self.advance(now);
        self.buckets.iter().sum::<u64>() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_steady_rate_and_decays_to_zero() {
        let t0 = Instant::now();
        let mut m = BitrateMeter::default();
        for i in 0..100u32 {
            m.record(t0 + Duration::from_millis(u64::from(i) * 10), 1250); // 1 Mbit/s
        }
        let r = m.bps(t0 + Duration::from_millis(999));
        assert!((900_000..=1_100_000).contains(&r), "{r}");
        assert_eq!(m.bps(t0 + Duration::from_secs(5)), 0);
    }
}
