//! The send budget of a mesh link (loss- and delay-based, as GCC) and
//! the simulcast layers that fit it.

use std::time::{Duration, Instant};

use super::wire::{DelayReport, DelayState};

/// Window over which a link's loss is judged.
const CAPACITY_WINDOW: Duration = Duration::from_secs(1);
/// Loss above this lowers the link's budget; below [`LOSS_LOW`] raises it
/// (the loss-based half of GCC, RFC draft-ietf-rmcat-gcc §6).
const LOSS_HIGH: f64 = 0.10;
/// Audio packets (first sends) a link's RED depth is decided on.
const RED_WINDOW_PACKETS: u64 = 200;
const LOSS_LOW: f64 = 0.02;

/// Over-use lowers the budget to this fraction of the received rate.
const DELAY_BACKOFF: f64 = 0.85;
/// At most one delay-based decrease this often (GCC's response time: the
/// decrease must reach the queue before it is judged again).
const DELAY_DECREASE_INTERVAL: Duration = Duration::from_millis(500);

/// A send budget for one mesh link, the two halves of GCC:
///
/// - loss-based: the downstream's NACKs say how much of what we send is
///   lost; above 10% the budget drops to 85% of what the link carried;
/// - delay-based: the downstream's [`DelayReport`]s say whether the link
///   queues; on over-use the budget drops to 85% of the rate the
///   downstream received (at most once per 500 ms).
///
/// In a window with less than 2% loss and neither over-use nor under-use
/// reported, it grows 8% until it no longer binds: twice what the link
/// carries and, after a delay-based decrease, twice what the bottleneck
/// passed then. Layers that do not fit
/// the budget are not sent on the link (the lowest wanted layer always
/// is), so each link carries the simulcast layers its capacity allows. A
/// peer that sends no delay reports (no send times on its links) leaves
/// the budget loss-based.
#[derive(Debug, Default, Clone)]
pub struct LinkCapacity {
    window_start: Option<Instant>,
    sent_bytes: u64,
    sent_packets: u64,
    nacked: u64,
    cap_bps: Option<u64>,
    /// Loss fraction of the last complete window.
    pub last_loss: f64,
    /// FEC repair packets sent this window (counted in `sent_packets`).
    repairs: u64,
    /// The FEC group size in use; 0 before the first window with loss.
    fec_group: usize,
    /// The media loss before FEC the last window suggests: `last_loss`
    /// where no FEC was sent, else inferred from what FEC left to NACK.
    pub fec_loss: f64,
    /// Audio packets sent this window (first sends), those sent as RED,
    /// and audio packets NACKed.
    audio_sent: u64,
    red_sent: u64,
    audio_nacked: u64,
    /// Redundant blocks per RED packet; 0 before the first window with
    /// audio.
    red_depth: usize,
    /// The audio loss before RED the last audio window suggests.
    pub red_loss: f64,
    /// The highest loss before FEC video suggested meanwhile (links with
    /// both: the same path, with many more packets).
    video_loss: f64,
    /// The state the downstream last reported.
    pub delay_state: DelayState,
    /// Over-use or under-use was reported this window: no growth.
    delay_hold: bool,
    last_decrease: Option<Instant>,
    /// The received rate at the last delay-based decrease: what the
    /// bottleneck passed. The budget binds until it is well above it.
    delay_limit: Option<u64>,
}

impl LinkCapacity {
    /// Counts a packet of `bytes` sent on the link.
    pub fn on_sent(&mut self, bytes: usize) {
        self.sent_bytes += bytes as u64;
        self.sent_packets += 1;
    }

    /// Counts `packets` NACKed by the downstream.
    pub fn on_nacked(&mut self, packets: u64) {
        self.nacked += packets;
    }

    /// An FEC repair packet went out (after its [`on_sent`](Self::on_sent)).
    pub fn on_repair_sent(&mut self) {
        self.repairs += 1;
    }

    /// An audio packet went out for the first time (after its
    /// [`on_sent`](Self::on_sent)), `red` with redundant blocks.
    pub fn on_audio_sent(&mut self, red: bool) {
        self.audio_sent += 1;
        self.red_sent += u64::from(red);
    }

    /// An audio packet was NACKed (after [`on_nacked`](Self::on_nacked)).
    pub fn on_audio_nacked(&mut self) {
        self.audio_nacked += 1;
    }

    /// Redundant blocks per RED packet for the link's audio: 2 while the
    /// audio loss before RED is 10 % or more (back to 1 below 8 %), else
    /// 1.
    pub fn red_depth(&self) -> usize {
        self.red_depth.max(1)
    }

    /// The FEC group size for the link's video: from the loss before FEC
    /// of the last window ([`crate::fec::group_size_for_loss`]),
    /// [`crate::fec::GROUP_SIZE`] until one is measured.
    pub fn fec_group(&self) -> usize {
        match self.fec_group {
            0 => crate::fec::GROUP_SIZE,
            n => n,
        }
    }

    /// The current budget; `None`: unlimited.
    pub fn cap_bps(&self) -> Option<u64> {
        self.cap_bps
    }

    /// Takes the downstream's delay report. Returns true if the budget
    /// changed.
    pub fn on_delay_report(&mut self, now: Instant, report: &DelayReport) -> bool {
        self.delay_state = report.state;
        match report.state {
            DelayState::Normal => false,
            DelayState::Underuse => {
                self.delay_hold = true;
                false
            }
            DelayState::Overuse => {
                self.delay_hold = true;
                if self
                    .last_decrease
                    .is_some_and(|t| now.saturating_duration_since(t) < DELAY_DECREASE_INTERVAL)
                {
                    return false;
                }
                // The received rate; what we sent this window if the
                // downstream has not measured one yet.
                let rate = match report.received_bps {
                    0 => {
                        let elapsed = self
                            .window_start
                            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
                        if elapsed < Duration::from_millis(100) {
                            return false;
                        }
                        ((self.sent_bytes * 8) as f64 / elapsed.as_secs_f64()) as u64
                    }
                    r => r,
                };
                let lowered = (rate as f64 * DELAY_BACKOFF) as u64;
                let before = self.cap_bps;
                self.cap_bps = Some(self.cap_bps.map_or(lowered, |c| c.min(lowered)));
                self.last_decrease = Some(now);
                self.delay_limit = Some(rate);
                before != self.cap_bps
            }
        }
    }

    /// Closes a window when one has passed. Returns true if the budget
    /// changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed < CAPACITY_WINDOW {
            return false;
        }
        let rate = (self.sent_bytes * 8) as f64 / elapsed.as_secs_f64();
        let before = self.cap_bps;
        if self.sent_packets >= 20 {
            // A NACKed packet may be asked for more than once: count at
            // most what was sent.
            let loss = self.nacked.min(self.sent_packets) as f64 / self.sent_packets as f64;
            self.last_loss = loss;
            // The downstream NACKs only what FEC could not rebuild: with
            // repair packets sent, infer the loss before FEC from the
            // share of media packets NACKed and the group size in use.
            let media = self.sent_packets.saturating_sub(self.repairs);
            self.fec_loss = if self.repairs > 0 && media > 0 {
                let residual = (self.nacked.min(media) as f64 / media as f64).min(1.0);
                crate::fec::loss_before_fec(residual, self.fec_group())
            } else {
                loss
            };
            self.fec_group = crate::fec::group_size_for_loss(self.fec_loss, self.fec_group());
            if self.repairs > 0 {
                self.video_loss = self.video_loss.max(self.fec_loss);
            }
            if loss > LOSS_HIGH {
                let lowered = (rate * 0.85) as u64;
                self.cap_bps = Some(self.cap_bps.map_or(lowered, |c| c.min(lowered)));
            } else if loss < LOSS_LOW
                && !self.delay_hold
                && let Some(c) = self.cap_bps
            {
                let raised = (c as f64 * 1.08) as u64 + 8_000;
                // Unlimited again once the budget is well above the load
                // and, after a delay-based decrease, above what the
                // bottleneck passed (the load is low because of the
                // budget: layers that do not fit are not sent).
                let floor = (rate * 2.0) as u64;
                let floor = self.delay_limit.map_or(floor, |d| floor.max(d * 2));
                self.cap_bps = (raised < floor).then_some(raised);
                if self.cap_bps.is_none() {
                    self.delay_limit = None;
                }
            }
        }
        if self.audio_sent >= RED_WINDOW_PACKETS {
            // With `d` blocks a packet is NACKed only when it and the `d`
            // after it are all lost (the next packet to arrive carries
            // it): about p^(d + 1) of the audio packets. Few audio packets
            // are NACKed, so the window is longer than a second (4 s of
            // one stream); video's estimate, when there is one, counts too.
            let residual = self.audio_nacked.min(self.audio_sent) as f64 / self.audio_sent as f64;
            let audio = if self.red_sent * 2 >= self.audio_sent {
                residual.powf(1.0 / (self.red_depth() as f64 + 1.0))
            } else {
                residual
            };
            self.red_loss = audio.max(self.video_loss);
            self.red_depth = if self.red_loss >= crate::red::DEPTH_LOSS {
                crate::red::MAX_DEPTH
            } else if self.red_loss < crate::red::DEPTH_LOSS_OFF {
                1
            } else {
                self.red_depth()
            };
            self.audio_sent = 0;
            self.red_sent = 0;
            self.audio_nacked = 0;
            self.video_loss = 0.0;
        }
        self.window_start = Some(now);
        self.sent_bytes = 0;
        self.sent_packets = 0;
        self.nacked = 0;
        self.repairs = 0;
        // Reports come every 250 ms while media flows: a state that holds
        // is reported again within the next window.
        self.delay_hold = false;
        before != self.cap_bps
    }
}

/// Which layers of a track a link may carry: `wanted[i]` says the
/// downstream wants layer `i`, `bps[i]` is its bitrate. The lowest wanted
/// layer always fits; higher ones are added, lowest first, while the sum
/// stays within `cap_bps`.
pub fn layers_within(bps: &[u64], wanted: &[bool], cap_bps: Option<u64>) -> Vec<bool> {
    let mut order: Vec<usize> = (0..bps.len())
        .filter(|&i| wanted.get(i) == Some(&true))
        .collect();
    order.sort_by_key(|&i| bps[i]);
    let mut allowed = vec![false; bps.len()];
    let mut sum = 0u64;
    for (k, i) in order.into_iter().enumerate() {
        sum += bps[i];
        if k == 0 || cap_bps.is_none_or(|c| sum <= c) {
            allowed[i] = true;
        } else {
            break;
        }
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FEC group and RED depth follow the loss before FEC/RED that
    /// the sender infers from what the downstream still NACKs.
    #[test]
    fn fec_group_and_red_depth_follow_the_inferred_loss() {
        let t0 = Instant::now();
        let mut c = LinkCapacity::default();
        c.tick(t0);
        assert_eq!((c.fec_group(), c.red_depth()), (crate::fec::GROUP_SIZE, 1));
        // One window at loss `p`: 400 video packets, a repair per group,
        // and the share FEC leaves NACKed; 50 audio packets as RED, p^(d+1)
        // of them NACKed.
        let mut t = t0;
        let mut window = |c: &mut LinkCapacity, p: f64| {
            let group = c.fec_group() as u64;
            for i in 0..400 {
                c.on_sent(1000);
                if i % group == group - 1 {
                    c.on_sent(1000);
                    c.on_repair_sent();
                }
            }
            for _ in 0..50 {
                c.on_sent(100);
                c.on_audio_sent(true);
            }
            let video = (400.0 * crate::fec::residual_loss(p, c.fec_group())).round() as u64;
            let audio = (50.0 * p.powi(c.red_depth() as i32 + 1)).round() as u64;
            c.on_nacked(video + audio);
            for _ in 0..audio {
                c.on_audio_nacked();
            }
            t += Duration::from_secs(1);
            c.tick(t);
        };
        // 20 % loss: groups of 4 leave 11.8 %, which reads as 20 %: groups
        // of 2; the audio (4 % NACKed with one block) goes to two blocks
        // after its 4 s window.
        window(&mut c, 0.2);
        assert!((c.fec_loss - 0.2).abs() < 0.02, "{}", c.fec_loss);
        assert_eq!(c.fec_group(), 2);
        for _ in 0..3 {
            window(&mut c, 0.2);
            // Groups of 2 leave 7.2 %, read as 20 % again, not as a low
            // loss: no flapping back to 8.
            assert_eq!(c.fec_group(), 2, "{}", c.fec_loss);
        }
        assert_eq!(c.red_depth(), 2, "red loss {}", c.red_loss);
        // With two blocks hardly any audio is NACKed; video still says
        // 20 %: two blocks stay.
        for _ in 0..4 {
            window(&mut c, 0.2);
        }
        assert_eq!((c.fec_group(), c.red_depth()), (2, 2), "{}", c.red_loss);
        // Loss gone: groups of 8, one block (after an audio window).
        for _ in 0..4 {
            window(&mut c, 0.0);
        }
        assert_eq!((c.fec_group(), c.red_depth()), (8, 1));
    }

    #[test]
    fn link_capacity_backs_off_on_loss_and_recovers() {
        let t0 = Instant::now();
        let mut c = LinkCapacity::default();
        let mut t = t0;
        // 1 Mbit/s, no loss: no budget.
        for _ in 0..3 {
            for _ in 0..100 {
                c.on_sent(1250);
            }
            t += Duration::from_secs(1);
            c.tick(t);
        }
        assert_eq!(c.cap_bps(), None);
        // 30% NACKed: budget 85% of the rate.
        for _ in 0..100 {
            c.on_sent(1250);
        }
        c.on_nacked(30);
        t += Duration::from_secs(1);
        assert!(c.tick(t));
        let cap = c.cap_bps().expect("a budget");
        assert!((840_000..=860_000).contains(&cap), "{cap}");
        // Clean windows raise it until it no longer binds.
        let mut windows = 0;
        while c.cap_bps().is_some() && windows < 100 {
            for _ in 0..100 {
                c.on_sent(1250);
            }
            t += Duration::from_secs(1);
            c.tick(t);
            windows += 1;
        }
        assert!(c.cap_bps().is_none() && windows > 3, "{windows}");
    }

    fn report(state: DelayState, received_bps: u64) -> DelayReport {
        DelayReport {
            state,
            received_bps,
            trend: 0.0,
        }
    }

    #[test]
    fn link_capacity_follows_delay_reports() {
        let t0 = Instant::now();
        let mut c = LinkCapacity::default();
        let mut t = t0;
        let window = |c: &mut LinkCapacity, t: &mut Instant| {
            for _ in 0..200 {
                c.on_sent(1250); // 2 Mbit/s
            }
            *t += Duration::from_secs(1);
            c.tick(*t)
        };
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), None, "normal reports or none: no budget");
        assert!(!c.on_delay_report(t, &report(DelayState::Normal, 2_000_000)));
        // Over-use: 85% of what the downstream receives.
        assert!(c.on_delay_report(t, &report(DelayState::Overuse, 1_000_000)));
        assert_eq!(c.cap_bps(), Some(850_000));
        // Not again within the response time, even lower.
        let soon = t + Duration::from_millis(200);
        assert!(!c.on_delay_report(soon, &report(DelayState::Overuse, 500_000)));
        let later = t + Duration::from_millis(600);
        assert!(c.on_delay_report(later, &report(DelayState::Overuse, 900_000)));
        assert_eq!(c.cap_bps(), Some(765_000));
        // A window with over-use or under-use reported does not grow.
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), Some(765_000));
        c.on_delay_report(t, &report(DelayState::Underuse, 900_000));
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), Some(765_000));
        // Normal windows grow it as after loss.
        c.on_delay_report(t, &report(DelayState::Normal, 900_000));
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), Some(834_200));
        // With no rate measured yet, what was sent counts.
        let mut c = LinkCapacity::default();
        c.tick(t0);
        for _ in 0..100 {
            c.on_sent(1250);
        }
        let half = t0 + Duration::from_millis(500);
        assert!(c.on_delay_report(half, &report(DelayState::Overuse, 0)));
        assert_eq!(c.cap_bps(), Some(1_700_000));
    }

    #[test]
    fn layers_fit_the_budget_lowest_first() {
        let bps = [150_000, 2_500_000, 600_000];
        let all = [true, true, true];
        assert_eq!(layers_within(&bps, &all, None), [true, true, true]);
        assert_eq!(
            layers_within(&bps, &all, Some(800_000)),
            [true, false, true]
        );
        assert_eq!(
            layers_within(&bps, &all, Some(100_000)),
            [true, false, false]
        );
        // The lowest *wanted* layer always goes.
        assert_eq!(
            layers_within(&bps, &[false, true, false], Some(1)),
            [false, true, false]
        );
        assert_eq!(
            layers_within(&bps, &[false, false, false], None),
            [false, false, false]
        );
    }
}
