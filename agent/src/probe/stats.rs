//! Per-link probe statistics, sans-IO: the caller passes the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What a heartbeat reports about one link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkMeasure {
    /// Mean round-trip time of the answered probes in the window.
    pub rtt_ms: f64,
    /// Fraction of the window's probes that got no (valid) answer in time.
    pub loss: f64,
    /// RFC 3550-style smoothed mean deviation of consecutive RTTs.
    pub jitter_ms: f64,
    /// Probes the window holds.
    pub samples: usize,
}

/// Probes in flight and the outcome of the last `window` probes to one peer.
#[derive(Debug, Clone)]
pub struct LinkStats {
    window: usize,
    timeout: Duration,
    outstanding: VecDeque<(u64, Instant)>,
    /// `Some(rtt)` answered, `None` lost.
    results: VecDeque<Option<Duration>>,
    last_rtt: Option<Duration>,
    jitter_ms: f64,
}

impl LinkStats {
    /// `window` probes are remembered; a probe unanswered after `timeout`
    /// counts as lost.
    pub fn new(window: usize, timeout: Duration) -> Self {
        Self {
            window: window.max(1),
            timeout,
            outstanding: VecDeque::new(),
            results: VecDeque::new(),
            last_rtt: None,
            jitter_ms: 0.0,
        }
    }

    pub fn on_sent(&mut self, seq: u64, now: Instant) {
        self.expire(now);
        self.outstanding.push_back((seq, now));
    }

    /// A verified reply. Returns its RTT, or `None` for a reply to a probe
    /// that is not outstanding (duplicate, late, or never sent).
    pub fn on_reply(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        let i = self.outstanding.iter().position(|(s, _)| *s == seq)?;
        let (_, sent) = self.outstanding.remove(i)?;
        let rtt = now.saturating_duration_since(sent);
        if rtt > self.timeout {
            self.push(None);
            return None;
        }
        if let Some(prev) = self.last_rtt {
            let d = (rtt.as_secs_f64() - prev.as_secs_f64()).abs() * 1000.0;
            self.jitter_ms += (d - self.jitter_ms) / 16.0;
        }
        self.last_rtt = Some(rtt);
        self.push(Some(rtt));
        Some(rtt)
    }

    /// Counts probes older than the timeout as lost.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(_, sent)) = self.outstanding.front() {
            if now.saturating_duration_since(sent) <= self.timeout {
                break;
            }
            self.outstanding.pop_front();
            self.push(None);
        }
    }

    fn push(&mut self, r: Option<Duration>) {
        if self.results.len() == self.window {
            self.results.pop_front();
        }
        self.results.push_back(r);
    }

    /// The measurement so far; `None` before any probe was resolved.
    pub fn measure(&self) -> Option<LinkMeasure> {
        if self.results.is_empty() {
            return None;
        }
        let answered: Vec<f64> = self
            .results
            .iter()
            .flatten()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        let lost = self.results.len() - answered.len();
        let rtt_ms = if answered.is_empty() {
            0.0
        } else {
            answered.iter().sum::<f64>() / answered.len() as f64
        };
        Some(LinkMeasure {
            rtt_ms,
            loss: lost as f64 / self.results.len() as f64,
            jitter_ms: self.jitter_ms,
            samples: self.results.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rtt_loss_and_jitter_with_simulated_time() {
        let t0 = Instant::now();
        let mut s = LinkStats::new(10, 500 * MS);
        assert!(s.measure().is_none());
        // Probes every 100 ms; odd ones are lost; RTT alternates 10/20 ms.
        for i in 0..10u64 {
            let t = t0 + 100 * MS * i as u32;
            s.on_sent(i, t);
            if i % 2 == 0 {
                let rtt = if i % 4 == 0 { 10 * MS } else { 20 * MS };
                assert_eq!(s.on_reply(i, t + rtt), Some(rtt));
            }
        }
        s.expire(t0 + 100 * MS * 9 + 501 * MS);
        let m = s.measure().unwrap();
        assert_eq!(m.samples, 10);
        assert!((m.loss - 0.5).abs() < 1e-9, "{m:?}");
        assert!((m.rtt_ms - 14.0).abs() < 1e-6, "{m:?}"); // 10,20,10,20,10
        assert!(m.jitter_ms > 0.0 && m.jitter_ms < 10.0, "{m:?}");
    }

    #[test]
    fn late_duplicate_and_unknown_replies() {
        let t0 = Instant::now();
        let mut s = LinkStats::new(4, 100 * MS);
        s.on_sent(1, t0);
        assert_eq!(s.on_reply(1, t0 + 200 * MS), None); // late: lost
        assert_eq!(s.on_reply(1, t0 + 201 * MS), None); // duplicate
        assert_eq!(s.on_reply(99, t0), None); // never sent
        assert_eq!(s.measure().unwrap().loss, 1.0);
        // The window forgets old results.
        for i in 2..6 {
            s.on_sent(i, t0);
            s.on_reply(i, t0 + MS);
        }
        let m = s.measure().unwrap();
        assert_eq!((m.samples, m.loss), (4, 0.0));
    }
}
