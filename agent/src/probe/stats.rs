//! Per-link probe statistics, sans-IO: the caller passes the time.
//!
//! Two views of a link: the window (mean RTT, loss and jitter over the last
//! `window` probes, a probe counting as lost once it is `timeout` old) and
//! whether the link is **down** right now. The window reacts slowly (a probe
//! is lost only after the timeout, and the loss of a dead link climbs one
//! probe at a time); the down state reacts within `down_after`, so routes can
//! leave a dead peer long before its heartbeat lease expires.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Probes that must go unanswered, besides the time, before a link is down:
/// a prober that stalled (a loaded machine) and sent nothing for a while has
/// not learnt that the peer is gone.
pub const MIN_UNANSWERED: u32 = 3;

/// What a heartbeat reports about one link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkMeasure {
    /// Mean round-trip time of the answered probes in the window (0 when
    /// none was answered).
    pub rtt_ms: f64,
    /// Fraction of the window's probes that got no (valid) answer in time;
    /// 1.0 while the link is down, whatever the window says.
    pub loss: f64,
    /// RFC 3550-style smoothed mean deviation of consecutive RTTs.
    pub jitter_ms: f64,
    /// Probes the window holds.
    pub samples: usize,
}

/// A link's state as [`LinkStats::update`] reports its changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    Down,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Probes in flight and the outcome of the last `window` probes to one peer.
#[derive(Debug, Clone)]
pub struct LinkStats {
    window: usize,
    timeout: Duration,
    down_after: Duration,
    outstanding: VecDeque<(u64, Instant)>,
    /// `Some(rtt)` answered, `None` lost.
    results: VecDeque<Option<Duration>>,
    last_rtt: Option<Duration>,
    jitter_ms: f64,
    /// When the last probe was answered in time.
    last_reply: Option<Instant>,
    /// When the first probe was sent (the reference while none was answered).
    first_sent: Option<Instant>,
    /// Probes sent since the last reply (since the first probe if none).
    unanswered: u32,
    /// The state as of the last [`LinkStats::update`].
    state: LinkState,
}

impl LinkStats {
    /// `window` probes are remembered; a probe unanswered after `timeout`
    /// counts as lost. The link is down once probes have gone unanswered for
    /// `down_after` (see [`LinkStats::is_down`]).
    pub fn new(window: usize, timeout: Duration, down_after: Duration) -> Self {
        Self {
            window: window.max(1),
            timeout,
            down_after,
            outstanding: VecDeque::new(),
            results: VecDeque::new(),
            last_rtt: None,
            jitter_ms: 0.0,
            last_reply: None,
            first_sent: None,
            unanswered: 0,
            state: LinkState::Up,
        }
    }

    pub fn on_sent(&mut self, seq: u64, now: Instant) {
        self.expire(now);
        self.outstanding.push_back((seq, now));
        self.first_sent.get_or_insert(now);
        self.unanswered = self.unanswered.saturating_add(1);
    }

    /// A verified reply. Returns its RTT, or `None` for a reply to a probe
    /// that is not outstanding (duplicate, late, or never sent). A late
    /// reply (after the timeout) counts as lost and does not bring a down
    /// link back up.
    pub fn on_reply(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        let i = self.outstanding.iter().position(|(s, _)| *s == seq)?;
        let (_, sent) = self.outstanding.remove(i)?;
        let rtt = now.saturating_duration_since(sent);
        if rtt > self.timeout {
            self.push(None);
            return None;
        }
        if self.last_reply.is_none() {
            // The peer's first answer ever. What went unanswered before was
            // sent while it was not listening yet (it was starting), which
            // says nothing of the link: the window starts here, so that a
            // new node's links do not look lossy (and routes do not move
            // off them) for the first `window` probes.
            self.results.clear();
            self.outstanding.retain(|(_, t)| *t >= sent);
        }
        if let Some(prev) = self.last_rtt {
            let d = (rtt.as_secs_f64() - prev.as_secs_f64()).abs() * 1000.0;
            self.jitter_ms += (d - self.jitter_ms) / 16.0;
        }
        self.last_rtt = Some(rtt);
        self.last_reply = Some(now);
        self.unanswered = 0;
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

    /// Whether the link is down at `now`: the last answered probe (the first
    /// probe, if none was answered) is at least `down_after` old, and at
    /// least [`MIN_UNANSWERED`] probes were sent since without an answer.
    /// The first reply in time brings it up again.
    pub fn is_down(&self, now: Instant) -> bool {
        let Some(since) = self.last_reply.or(self.first_sent) else {
            return false;
        };
        self.unanswered >= MIN_UNANSWERED && now.saturating_duration_since(since) >= self.down_after
    }

    /// Re-evaluates the state at `now`; returns the new one when it changed
    /// since the previous call.
    pub fn update(&mut self, now: Instant) -> Option<LinkState> {
        let state = if self.is_down(now) {
            LinkState::Down
        } else {
            LinkState::Up
        };
        (state != self.state).then(|| {
            self.state = state;
            state
        })
    }

    /// The measurement at `now`; `None` before any probe was resolved
    /// (unless the link is already down). While the link is down, `loss`
    /// is 1.0; RTT and jitter stay those of the window.
    pub fn measure(&self, now: Instant) -> Option<LinkMeasure> {
        let down = self.is_down(now);
        if self.results.is_empty() && !down {
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
        let loss = if down {
            1.0
        } else {
            lost as f64 / self.results.len() as f64
        };
        Some(LinkMeasure {
            rtt_ms,
            loss,
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
        let mut s = LinkStats::new(10, 500 * MS, 300 * MS);
        assert!(s.measure(t0).is_none());
        // Probes every 100 ms; odd ones are lost; RTT alternates 10/20 ms.
        for i in 0..10u64 {
            let t = t0 + 100 * MS * i as u32;
            s.on_sent(i, t);
            if i % 2 == 0 {
                let rtt = if i % 4 == 0 { 10 * MS } else { 20 * MS };
                assert_eq!(s.on_reply(i, t + rtt), Some(rtt));
            }
        }
        let end = t0 + 100 * MS * 9 + 501 * MS;
        s.expire(end);
        let m = s.measure(end).unwrap();
        assert_eq!(m.samples, 10);
        assert!((m.loss - 0.5).abs() < 1e-9, "{m:?}");
        assert!((m.rtt_ms - 14.0).abs() < 1e-6, "{m:?}"); // 10,20,10,20,10
        assert!(m.jitter_ms > 0.0 && m.jitter_ms < 10.0, "{m:?}");
    }

    #[test]
    fn late_duplicate_and_unknown_replies() {
        let t0 = Instant::now();
        let mut s = LinkStats::new(4, 100 * MS, 300 * MS);
        s.on_sent(1, t0);
        assert_eq!(s.on_reply(1, t0 + 200 * MS), None); // late: lost
        assert_eq!(s.on_reply(1, t0 + 201 * MS), None); // duplicate
        assert_eq!(s.on_reply(99, t0), None); // never sent
        assert_eq!(s.measure(t0 + 201 * MS).unwrap().loss, 1.0);
        // The window forgets old results.
        for i in 2..6 {
            s.on_sent(i, t0);
            s.on_reply(i, t0 + MS);
        }
        let m = s.measure(t0 + MS).unwrap();
        assert_eq!((m.samples, m.loss), (4, 0.0));
    }

    #[test]
    fn probes_lost_before_the_first_answer_do_not_count() {
        let t0 = Instant::now();
        let mut s = LinkStats::new(20, 500 * MS, 300 * MS);
        // The peer starts listening after 5 probes (every 100 ms); the
        // sixth is answered, and so are all after it.
        for i in 0..5u64 {
            s.on_sent(i, t0 + 100 * MS * i as u32);
        }
        s.expire(t0 + 1000 * MS);
        assert_eq!(s.measure(t0 + 1000 * MS).unwrap().loss, 1.0);
        for i in 5..10u64 {
            let t = t0 + 100 * MS * i as u32 + 600 * MS;
            s.on_sent(i, t);
            s.on_reply(i, t + 5 * MS);
        }
        let m = s.measure(t0 + 2000 * MS).unwrap();
        assert_eq!((m.samples, m.loss), (5, 0.0));
        // Losses once the peer has answered count, outage or not.
        for i in 10..15u64 {
            s.on_sent(i, t0 + 100 * MS * i as u32 + 600 * MS);
        }
        s.on_sent(15, t0 + 2200 * MS);
        s.on_reply(15, t0 + 2205 * MS);
        s.expire(t0 + 2800 * MS);
        let m = s.measure(t0 + 2800 * MS).unwrap();
        assert_eq!(m.samples, 11);
        assert!((m.loss - 5.0 / 11.0).abs() < 1e-9, "{m:?}");
    }

    /// Probes every 100 ms with 5 ms RTT; `down_after` 300 ms; the timeout
    /// (500 ms) is longer, as in the agent.
    fn answered_until(s: &mut LinkStats, t0: Instant, n: u64) {
        for i in 0..n {
            let t = t0 + 100 * MS * i as u32;
            s.on_sent(i, t);
            assert_eq!(s.on_reply(i, t + 5 * MS), Some(5 * MS));
            assert_eq!(s.update(t + 5 * MS), None);
        }
    }

    #[test]
    fn a_silent_peer_is_down_after_down_after_and_up_at_the_first_reply() {
        let t0 = Instant::now();
        let mut s = LinkStats::new(20, 500 * MS, 300 * MS);
        // Answered 0..=4; the last reply arrives at 405 ms. Then silence.
        answered_until(&mut s, t0, 5);
        for i in 5..=7u64 {
            let t = t0 + 100 * MS * i as u32;
            s.on_sent(i, t);
            assert_eq!(s.update(t), None, "down too early at probe {i}");
        }
        // Three probes unanswered, but the last reply is 295 ms old.
        assert!(!s.is_down(t0 + 704 * MS));
        let m = s.measure(t0 + 704 * MS).unwrap();
        assert_eq!(m.loss, 0.0, "{m:?}"); // nothing timed out yet
        // 300 ms after the last reply: down.
        assert!(s.is_down(t0 + 705 * MS));
        assert_eq!(s.update(t0 + 705 * MS), Some(LinkState::Down));
        assert_eq!(s.update(t0 + 750 * MS), None); // reported once
        let m = s.measure(t0 + 705 * MS).unwrap();
        assert_eq!(m.loss, 1.0, "{m:?}");
        assert!((m.rtt_ms - 5.0).abs() < 1e-6, "{m:?}"); // the window's RTT
        assert_eq!(m.samples, 5);
        for i in 8..=12u64 {
            let t = t0 + 100 * MS * i as u32;
            s.on_sent(i, t);
            assert_eq!(s.update(t), None);
            assert_eq!(s.measure(t).unwrap().loss, 1.0);
        }
        // A reply after the timeout does not count...
        assert_eq!(s.on_reply(7, t0 + 1201 * MS), None);
        assert_eq!(s.update(t0 + 1201 * MS), None);
        // ...the first reply in time does: up at once, the window's figure.
        assert_eq!(s.on_reply(12, t0 + 1205 * MS), Some(5 * MS));
        assert_eq!(s.update(t0 + 1205 * MS), Some(LinkState::Up));
        let m = s.measure(t0 + 1205 * MS).unwrap();
        assert!(m.loss > 0.0 && m.loss < 1.0, "{m:?}");
        assert!((m.rtt_ms - 5.0).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn a_peer_that_never_answers_is_down_before_its_first_probe_times_out() {
        let t0 = Instant::now();
        let mut s = LinkStats::new(20, 1000 * MS, 300 * MS);
        for i in 0..=3u64 {
            let t = t0 + 100 * MS * i as u32;
            s.on_sent(i, t);
            let changed = s.update(t);
            if i < 3 {
                assert_eq!(changed, None, "probe {i}");
                assert!(s.measure(t).is_none());
            } else {
                assert_eq!(changed, Some(LinkState::Down));
            }
        }
        let m = s.measure(t0 + 300 * MS).unwrap();
        assert_eq!((m.loss, m.rtt_ms, m.samples), (1.0, 0.0, 0), "{m:?}");
    }

    #[test]
    fn single_losses_and_a_stalled_prober_do_not_make_a_link_down() {
        let t0 = Instant::now();
        let mut s = LinkStats::new(20, 500 * MS, 300 * MS);
        // Every third probe lost, checked every 5 ms for 3 s.
        let mut next = 0u64;
        for ms in (0..3000u32).step_by(5) {
            let t = t0 + ms * MS;
            if ms % 100 == 0 {
                s.on_sent(next, t);
                next += 1;
            }
            if ms % 100 == 5 && !(next - 1).is_multiple_of(3) {
                assert!(s.on_reply(next - 1, t).is_some());
            }
            assert_eq!(s.update(t), None, "at {ms} ms");
            assert!(s.measure(t).is_none_or(|m| m.loss < 1.0));
        }
        s.expire(t0 + 3000 * MS);
        let loss = s.measure(t0 + 3000 * MS).unwrap().loss;
        assert!(loss > 0.2 && loss < 0.5, "{loss}");

        // The prober stalls for 2 s after a reply (a loaded machine): the
        // first two probes after it are not enough to call the link down.
        let mut s = LinkStats::new(20, 500 * MS, 300 * MS);
        answered_until(&mut s, t0, 3); // last reply at 205 ms
        s.on_sent(3, t0 + 2200 * MS);
        assert_eq!(s.update(t0 + 2250 * MS), None);
        s.on_sent(4, t0 + 2300 * MS);
        assert_eq!(s.update(t0 + 2300 * MS), None);
        assert_eq!(s.on_reply(4, t0 + 2305 * MS), Some(5 * MS));
        assert_eq!(s.update(t0 + 2305 * MS), None);
    }
}
