//! Delay-gradient detection on a link (the delay-based half of GCC): the
//! abs-send-time of mesh media and the [`DelayDetector`] that turns send
//! and arrival times into a [`DelayState`] and the reports that carry it.

use std::time::{Duration, Instant};

use super::wire::{DelayReport, DelayState};

/// abs-send-time units (6.18 fixed-point seconds) per second.
pub const SEND_TIME_UNITS: u64 = 1 << 18;
/// The 24-bit abs-send-time of `elapsed` (it wraps every 64 s).
pub fn abs_send_time(elapsed: Duration) -> u32 {
    ((elapsed.as_nanos() * u128::from(SEND_TIME_UNITS) / 1_000_000_000) & 0xff_ffff) as u32
}

/// `a - b` of two 24-bit send times, in ms (wrapping; within ±32 s).
fn send_delta_ms(a: u32, b: u32) -> f64 {
    let d = (a.wrapping_sub(b) << 8) as i32 >> 8;
    f64::from(d) * 1000.0 / SEND_TIME_UNITS as f64
}

/// Packets sent within this long of a group's first are one group (a
/// burst: a frame's packets).
const DELAY_BURST_MS: f64 = 5.0;
/// Groups the trendline's least-squares slope is fitted over.
const TREND_WINDOW: usize = 20;
const TREND_SMOOTHING: f64 = 0.9;
const TREND_GAIN: f64 = 4.0;
/// The adaptive threshold: start, bounds, and how fast it follows the
/// trend up and down (GCC §5.4).
const THRESHOLD_START: f64 = 12.5;
const THRESHOLD_MIN: f64 = 6.0;
const THRESHOLD_MAX: f64 = 600.0;
const THRESHOLD_K_UP: f64 = 0.0087;
const THRESHOLD_K_DOWN: f64 = 0.039;
/// The trend must stay above the threshold this long to be over-use.
const OVERUSE_TIME_MS: f64 = 10.0;
/// A gap in arrivals longer than this starts the detector afresh.
const DELAY_GAP: Duration = Duration::from_secs(2);
/// Window of the received rate the reports carry: the last complete one,
/// or the current one once it is [`RATE_WINDOW_MIN`] long if that is
/// higher (a queue that builds up passes the bottleneck's rate at once,
/// while the window before may hold less: a layer just resumed).
const RATE_WINDOW: Duration = Duration::from_millis(250);
const RATE_WINDOW_MIN: Duration = Duration::from_millis(100);
/// A report goes at least this often while media arrives (and at once on a
/// change of state).
pub const DELAY_REPORT_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
struct SendGroup {
    first_send: u32,
    last_send: u32,
    last_arrival: Instant,
}

/// The delay-based half of GCC (draft-ietf-rmcat-gcc §5) for what one
/// upstream sends on a link: packets are grouped by send time (bursts of
/// 5 ms), each group's delay variation against the previous one (arrival
/// gap minus send gap) is accumulated and smoothed, a least-squares slope
/// over the last 20 groups is the trend, and a trend above an adaptive
/// threshold for 10 ms (and still rising) is over-use. Also measures the
/// received rate the reports carry. Sans-IO and of fixed size: nothing
/// allocates per packet. Packets whose send time is older than the current
/// group's (retransmissions, reordering) are left out.
#[derive(Debug, Clone)]
pub struct DelayDetector {
    current: Option<SendGroup>,
    previous: Option<SendGroup>,
    first_arrival: Option<Instant>,
    /// (arrival ms since the first, smoothed accumulated delay ms).
    ring: [(f64, f64); TREND_WINDOW],
    ring_len: usize,
    ring_head: usize,
    accumulated: f64,
    smoothed: f64,
    deltas: u32,
    trend: f64,
    modified: f64,
    prev_trend: f64,
    threshold: f64,
    threshold_at: Option<Instant>,
    /// ms the trend stayed above the threshold (`None`: it is not).
    over_ms: Option<f64>,
    over_count: u32,
    state: DelayState,
    rate_start: Option<Instant>,
    rate_bytes: u64,
    received_bps: u64,
    last_packet: Option<Instant>,
    reported: Option<(Instant, DelayState)>,
}

impl Default for DelayDetector {
    fn default() -> Self {
        DelayDetector {
            current: None,
            previous: None,
            first_arrival: None,
            ring: [(0.0, 0.0); TREND_WINDOW],
            ring_len: 0,
            ring_head: 0,
            accumulated: 0.0,
            smoothed: 0.0,
            deltas: 0,
            trend: 0.0,
            modified: 0.0,
            prev_trend: 0.0,
            threshold: THRESHOLD_START,
            threshold_at: None,
            over_ms: None,
            over_count: 0,
            state: DelayState::Normal,
            rate_start: None,
            rate_bytes: 0,
            received_bps: 0,
            last_packet: None,
            reported: None,
        }
    }
}

impl DelayDetector {
    /// The detector's current conclusion.
    pub fn state(&self) -> DelayState {
        self.state
    }

    /// The modified trend (slope × min(groups, 60) × gain) the threshold
    /// is compared with.
    pub fn modified_trend(&self) -> f64 {
        self.modified
    }

    /// The received rate of the last complete window, bit/s.
    pub fn received_bps(&self) -> u64 {
        self.received_bps
    }

    /// Records a media packet of `bytes` that arrived at `now` with the
    /// 24-bit abs-send-time `send_time`.
    pub fn on_packet(&mut self, now: Instant, send_time: u32, bytes: usize) {
        // The received rate.
        let start = *self.rate_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            self.received_bps = (self.rate_bytes * 8 * 1_000_000) / elapsed.as_micros() as u64;
            self.rate_start = Some(now);
            self.rate_bytes = 0;
        }
        self.rate_bytes += bytes as u64;
        if self
            .last_packet
            .is_some_and(|t| now.saturating_duration_since(t) > DELAY_GAP)
        {
            self.restart();
        }
        self.last_packet = Some(now);
        let Some(cur) = &mut self.current else {
            self.current = Some(SendGroup {
                first_send: send_time,
                last_send: send_time,
                last_arrival: now,
            });
            return;
        };
        let since_first = send_delta_ms(send_time, cur.first_send);
        if since_first < 0.0 {
            // Sent before the current group: a retransmission or reordered.
            return;
        }
        if since_first <= DELAY_BURST_MS {
            if send_delta_ms(send_time, cur.last_send) > 0.0 {
                cur.last_send = send_time;
            }
            cur.last_arrival = now;
            return;
        }
        let done = *cur;
        self.current = Some(SendGroup {
            first_send: send_time,
            last_send: send_time,
            last_arrival: now,
        });
        if let Some(prev) = self.previous.replace(done) {
            let send_ms = send_delta_ms(done.last_send, prev.last_send);
            let arrival_ms = done
                .last_arrival
                .saturating_duration_since(prev.last_arrival)
                .as_secs_f64()
                * 1000.0;
            self.update(done.last_arrival, arrival_ms - send_ms, send_ms);
        }
    }

    fn restart(&mut self) {
        let keep = (self.rate_start, self.rate_bytes, self.received_bps);
        let reported = self.reported;
        *self = DelayDetector::default();
        (self.rate_start, self.rate_bytes, self.received_bps) = keep;
        self.reported = reported;
    }

    /// The trendline filter and over-use detector, once per group.
    fn update(&mut self, arrival: Instant, delay_ms: f64, send_ms: f64) {
        self.deltas = (self.deltas + 1).min(1000);
        let first = *self.first_arrival.get_or_insert(arrival);
        self.accumulated += delay_ms;
        self.smoothed =
            TREND_SMOOTHING * self.smoothed + (1.0 - TREND_SMOOTHING) * self.accumulated;
        let x = arrival.saturating_duration_since(first).as_secs_f64() * 1000.0;
        self.ring[self.ring_head] = (x, self.smoothed);
        self.ring_head = (self.ring_head + 1) % TREND_WINDOW;
        self.ring_len = (self.ring_len + 1).min(TREND_WINDOW);
        if self.ring_len == TREND_WINDOW
            && let Some(slope) = slope(&self.ring)
        {
            self.trend = slope;
        }
        self.detect(arrival, send_ms);
    }

    fn detect(&mut self, now: Instant, send_ms: f64) {
        if self.deltas < 2 {
            self.state = DelayState::Normal;
            return;
        }
        let modified = f64::from(self.deltas.min(60)) * self.trend * TREND_GAIN;
        self.modified = modified;
        if modified > self.threshold {
            let over = match self.over_ms {
                None => send_ms / 2.0,
                Some(t) => t + send_ms,
            };
            self.over_ms = Some(over);
            self.over_count += 1;
            if over > OVERUSE_TIME_MS && self.over_count > 1 && self.trend >= self.prev_trend {
                self.over_ms = Some(0.0);
                self.over_count = 0;
                self.state = DelayState::Overuse;
            }
        } else {
            self.over_ms = None;
            self.over_count = 0;
            self.state = if modified < -self.threshold {
                DelayState::Underuse
            } else {
                DelayState::Normal
            };
        }
        self.prev_trend = self.trend;
        // The adaptive threshold: it follows |trend| slowly up, faster
        // down, and ignores outliers.
        let at = *self.threshold_at.get_or_insert(now);
        let m = modified.abs();
        if m > self.threshold + 15.0 {
            self.threshold_at = Some(now);
            return;
        }
        let k = if m < self.threshold {
            THRESHOLD_K_DOWN
        } else {
            THRESHOLD_K_UP
        };
        let dt = now.saturating_duration_since(at).as_secs_f64().min(0.1) * 1000.0;
        self.threshold =
            (self.threshold + k * (m - self.threshold) * dt).clamp(THRESHOLD_MIN, THRESHOLD_MAX);
        self.threshold_at = Some(now);
    }

    /// A report to send now, if one is due: the state changed since the
    /// last, or [`DELAY_REPORT_INTERVAL`] passed while media arrived.
    pub fn report_due(&mut self, now: Instant) -> Option<DelayReport> {
        let due = match self.reported {
            None => self.received_bps > 0,
            Some((at, state)) => {
                state != self.state
                    || (now.saturating_duration_since(at) >= DELAY_REPORT_INTERVAL
                        && self.last_packet.is_some_and(|t| t > at))
            }
        };
        if !due {
            return None;
        }
        self.reported = Some((now, self.state));
        let current = self
            .rate_start
            .map(|t| now.saturating_duration_since(t))
            .filter(|d| *d >= RATE_WINDOW_MIN)
            .map_or(0, |d| {
                (self.rate_bytes * 8 * 1_000_000) / d.as_micros() as u64
            });
        Some(DelayReport {
            state: self.state,
            received_bps: self.received_bps.max(current),
            trend: self.modified,
        })
    }
}

/// Least-squares slope of the points of `ring` (order does not matter).
fn slope(ring: &[(f64, f64)]) -> Option<f64> {
    let n = ring.len() as f64;
    let (sx, sy) = ring
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = ring.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den != 0.0).then(|| num / den)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a detector 30 frames a second of 3 packets (sent 1 ms apart)
    /// for `secs`, each arriving `delay(sent since start)` after it was
    /// sent. Returns the states seen, one per packet.
    fn run_detector(
        d: &mut DelayDetector,
        secs: u64,
        mut delay: impl FnMut(Duration) -> Duration,
    ) -> Vec<DelayState> {
        let t0 = Instant::now();
        let mut arrivals: Vec<(Instant, u32)> = Vec::new();
        for frame in 0..secs * 30 {
            for p in 0..3 {
                let sent = Duration::from_micros(frame * 33_333 + p * 1000);
                arrivals.push((t0 + sent + delay(sent), abs_send_time(sent)));
            }
        }
        // The network delivers in arrival order.
        arrivals.sort_by_key(|a| a.0);
        arrivals
            .into_iter()
            .map(|(at, send)| {
                d.on_packet(at, send, 1200);
                d.state()
            })
            .collect()
    }

    #[test]
    fn constant_delay_is_normal() {
        let mut d = DelayDetector::default();
        let states = run_detector(&mut d, 10, |_| Duration::from_millis(40));
        assert!(states.iter().all(|s| *s == DelayState::Normal));
        assert!(d.modified_trend().abs() < 1.0, "{}", d.modified_trend());
        // 3 × 1200 bytes × 30 a second.
        let bps = d.received_bps();
        assert!((800_000..=930_000).contains(&bps), "{bps}");
    }

    #[test]
    fn growing_delay_is_overuse() {
        let mut d = DelayDetector::default();
        // Constant first, then the queue grows 100 ms a second.
        let states = run_detector(&mut d, 4, |sent| {
            let over = sent.saturating_sub(Duration::from_secs(2));
            Duration::from_millis(40) + over / 10
        });
        let first_over = states.iter().position(|s| *s == DelayState::Overuse);
        let n = states.len();
        let at = first_over.expect("over-use detected");
        // Not before the queue grows, and within half a second of it.
        assert!(at > n / 2 && at < n / 2 + n / 8, "{at} of {n}");
        assert!(d.modified_trend() > 12.5);
    }

    #[test]
    fn shrinking_delay_is_underuse() {
        let mut d = DelayDetector::default();
        let states = run_detector(&mut d, 4, |sent| {
            Duration::from_millis(2000).saturating_sub(sent / 4)
        });
        assert!(states.contains(&DelayState::Underuse));
        assert!(!states.contains(&DelayState::Overuse));
    }

    #[test]
    fn jitter_without_a_trend_is_not_overuse() {
        let mut d = DelayDetector::default();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        // 20-40 ms, uniformly at random: reordered arrivals included.
        let states = run_detector(&mut d, 30, |_| {
            Duration::from_micros(20_000 + crate::sfu::xorshift(&mut x) % 20_000)
        });
        let over = states.iter().filter(|s| **s == DelayState::Overuse).count();
        assert_eq!(over, 0, "over-use on jitter alone");
    }

    #[test]
    fn retransmissions_and_gaps_do_not_disturb_the_detector() {
        let t0 = Instant::now();
        let mut d = DelayDetector::default();
        let delay = Duration::from_millis(30);
        let mut t = Duration::ZERO;
        for i in 0..200u64 {
            t = Duration::from_millis(i * 10);
            d.on_packet(t0 + t + delay, abs_send_time(t), 1000);
            // Now and then a retransmission of a packet sent 500 ms ago.
            if i % 7 == 0 && t > Duration::from_millis(500) {
                let old = t - Duration::from_millis(500);
                d.on_packet(t0 + t + delay, abs_send_time(old), 1000);
            }
        }
        assert_eq!(d.state(), DelayState::Normal);
        assert!(d.modified_trend().abs() < 1.0, "{}", d.modified_trend());
        // A pause of 5 s, then the delay is higher but constant: a restart,
        // not a gradient.
        let delay = Duration::from_millis(300);
        for i in 0..100u64 {
            let t = t + Duration::from_secs(5) + Duration::from_millis(i * 10);
            d.on_packet(t0 + t + delay, abs_send_time(t), 1000);
            assert_ne!(d.state(), DelayState::Overuse);
        }
    }

    #[test]
    fn send_time_deltas_wrap() {
        let a = abs_send_time(Duration::from_millis(63_990));
        let b = abs_send_time(Duration::from_millis(64_010));
        assert!(b < a, "wrapped");
        assert!((send_delta_ms(b, a) - 20.0).abs() < 0.01);
        assert!((send_delta_ms(a, b) + 20.0).abs() < 0.01);
    }

    #[test]
    fn reports_are_due_on_a_change_and_periodically() {
        let t0 = Instant::now();
        let mut d = DelayDetector::default();
        let mut reports = Vec::new();
        for i in 0..200u64 {
            let t = t0 + Duration::from_millis(i * 10);
            d.on_packet(t, abs_send_time(Duration::from_millis(i * 10)), 1000);
            if let Some(r) = d.report_due(t) {
                reports.push((t, r));
            }
        }
        // From the first rate window on, every 250 ms.
        assert!((6..=8).contains(&reports.len()), "{}", reports.len());
        assert_eq!(reports[0].0, t0 + RATE_WINDOW);
        assert!(reports.iter().all(|(_, r)| r.state == DelayState::Normal));
        assert!((790_000..=810_000).contains(&reports[1].1.received_bps));
        // Nothing arrived since the last report: none due.
        let late = t0 + Duration::from_secs(10);
        d.report_due(late);
        assert!(d.report_due(late + DELAY_REPORT_INTERVAL).is_none());
    }
}
