//! Load measurement, sans-IO: CPU busy fraction from successive `/proc/stat`
//! samples, and packet/byte rates from successive dataplane counter samples.

use std::time::{Duration, Instant};

/// Aggregate CPU time counters (the first `cpu` line of `/proc/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the `cpu ` line: user nice system idle iowait irq softirq steal
/// (guest time is already inside user/nice). Idle and iowait are not busy.
pub fn cpu_times(proc_stat: &str) -> Option<CpuTimes> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Turns successive [`CpuTimes`] into a busy fraction.
#[derive(Debug, Clone, Default)]
pub struct CpuSampler {
    last: Option<CpuTimes>,
}

impl CpuSampler {
    /// Feeds a sample; returns the busy fraction (0.0 – 1.0) since the
    /// previous one, or `None` for the first sample or when no time passed.
    pub fn update(&mut self, now: CpuTimes) -> Option<f64> {
        let prev = self.last.replace(now)?;
        let total = now.total.checked_sub(prev.total)?;
        let busy = now.busy.checked_sub(prev.busy)?;
        if total == 0 {
            return None;
        }
        Some((busy as f64 / total as f64).clamp(0.0, 1.0))
    }
}

/// Per-second rates of monotonically increasing counters.
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    last: Option<(Instant, u64)>,
}

impl RateMeter {
    /// Feeds the counter's value at `now`; returns the rate per second since
    /// the previous sample (`None` at first, and after a counter reset, as
    /// when the dataplane restarted).
    pub fn update(&mut self, now: Instant, value: u64) -> Option<f64> {
        let (t, v) = self.last.replace((now, value))?;
        let dt = now.checked_duration_since(t)?.as_secs_f64();
        if dt <= 0.0 || value < v {
            return None;
        }
        Some((value - v) as f64 / dt)
    }
}

/// An exponentially weighted moving average over irregular samples, with
/// time constant `tau`: the CPU figure the scheduler routes on must not
/// swing with every half-second burst, or routes flap between equal nodes.
#[derive(Debug, Clone)]
pub struct Smoothed {
    tau: Duration,
    last: Option<(Instant, f64)>,
}

impl Smoothed {
    pub fn new(tau: Duration) -> Self {
        Self { tau, last: None }
    }

    /// Feeds `value` observed at `now`; returns the average (the first
    /// sample as is).
    pub fn update(&mut self, now: Instant, value: f64) -> f64 {
        let avg = match self.last {
            Some((t, prev)) if !self.tau.is_zero() => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                let w = 1.0 - (-dt / self.tau.as_secs_f64()).exp();
                prev + w * (value - prev)
            }
            _ => value,
        };
        self.last = Some((now, avg));
        avg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fraction_from_deltas() {
        let a = cpu_times("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 200,
                total: 1000
            }
        );
        let b = cpu_times("cpu  150 0 150 880 20 0 0 0 0 0\n").unwrap();
        let mut s = CpuSampler::default();
        assert_eq!(s.update(a), None);
        // +100 busy of +200 total.
        assert_eq!(s.update(b), Some(0.5));
        assert_eq!(s.update(b), None);
        assert!(cpu_times("intr 1 2 3").is_none());
    }

    #[test]
    fn smoothing_follows_with_its_time_constant() {
        let t0 = Instant::now();
        let mut s = Smoothed::new(Duration::from_secs(5));
        assert_eq!(s.update(t0, 0.2), 0.2);
        // A half-second spike to 1.0 moves the average by about a tenth.
        let spiked = s.update(t0 + Duration::from_millis(500), 1.0);
        assert!((spiked - (0.2 + 0.8 * (1.0 - (-0.1f64).exp()))).abs() < 1e-9);
        assert!(spiked < 0.3);
        // A sustained change arrives: after 5 τ it is within 1 %.
        let mut v = spiked;
        for i in 1..=50 {
            v = s.update(t0 + Duration::from_millis(500 + 500 * i), 1.0);
        }
        assert!(v > 0.99, "{v}");
        // Zero time passed: unchanged.
        assert_eq!(s.update(t0 + Duration::from_millis(25_500), 0.0), v);
    }

    #[test]
    fn rates() {
        let t0 = Instant::now();
        let mut r = RateMeter::default();
        assert_eq!(r.update(t0, 100), None);
        assert_eq!(r.update(t0 + Duration::from_secs(2), 300), Some(100.0));
        assert_eq!(r.update(t0 + Duration::from_secs(3), 5), None); // reset
        assert_eq!(r.update(t0 + Duration::from_secs(4), 15), Some(10.0));
    }
}
