//! Receive-side loss tracking of a link stream: the missing sequence
//! numbers and when each is NACKed (hop-by-hop repair).

use std::time::{Duration, Instant};

/// Most sequence numbers one stream waits for at once; a longer outage is
/// not repaired packet by packet.
const MAX_MISSING: usize = 256;
/// NACK attempts per missing packet.
pub const NACK_ATTEMPTS: u8 = 10;
const NACK_RETRY_MIN: Duration = Duration::from_millis(10);
const NACK_RETRY_MAX: Duration = Duration::from_millis(300);
/// A missing packet older than this is given up (the upstream's
/// retransmission buffer would not have it either).
const NACK_GIVE_UP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Missing {
    seq: u16,
    first_sent: Option<Instant>,
    next: Instant,
    attempts: u8,
    detected: Instant,
}

/// What became of a received packet's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// In order (possibly after a gap, now being NACKed).
    New,
    /// A packet we were missing (a retransmission or a late one).
    Recovered,
    /// Older than anything we wait for: a duplicate or very late.
    Stale,
}

/// Receive-side state of one link stream: the highest sequence number and
/// the packets missing below it, each NACKed until it arrives or
/// [`NACK_ATTEMPTS`] run out. Fixed capacity: nothing allocates per packet.
#[derive(Debug)]
pub struct LossTracker {
    highest: Option<u16>,
    missing: Vec<Missing>,
    /// Smoothed NACK round trip (first attempts only, as Karn's rule).
    srtt: Option<Duration>,
    /// How long a newly missing packet waits before its first NACK: a
    /// repair packet (FEC) may rebuild it first.
    hold: Duration,
    /// NACKed packets that arrived.
    pub recovered: u64,
    /// Packets given up on after the last NACK attempt.
    pub unrecovered: u64,
    /// Packets found missing.
    pub lost: u64,
    /// Missing packets rebuilt from FEC or RED.
    pub repaired: u64,
}

impl Default for LossTracker {
    fn default() -> Self {
        LossTracker {
            highest: None,
            missing: Vec::with_capacity(MAX_MISSING),
            srtt: None,
            hold: Duration::ZERO,
            recovered: 0,
            unrecovered: 0,
            lost: 0,
            repaired: 0,
        }
    }
}

impl LossTracker {
    /// Forgets the stream (its source changed).
    pub fn reset(&mut self) {
        self.highest = None;
        self.unrecovered += self.missing.len() as u64;
        self.missing.clear();
    }

    /// The smoothed NACK round trip, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Moves the highest sequence number on to `seq` without counting the
    /// numbers in between as lost: someone else (a kernel fast path)
    /// received and forwarded them. Nothing happens when `seq` is not
    /// ahead.
    pub fn skip_to(&mut self, seq: u16) {
        match self.highest {
            Some(h) if seq.wrapping_sub(h) == 0 || seq.wrapping_sub(h) >= 0x8000 => {}
            _ => self.highest = Some(seq),
        }
    }

    fn retry_interval(&self) -> Duration {
        match self.srtt {
            Some(rtt) => {
                (rtt + rtt / 2 + Duration::from_millis(5)).clamp(NACK_RETRY_MIN, NACK_RETRY_MAX)
            }
            None => Duration::from_millis(20),
        }
    }

    /// Sets how long newly missing packets wait for their first NACK
    /// (zero: NACKed at once).
    pub fn set_hold(&mut self, hold: Duration) {
        self.hold = hold;
    }

    /// Whether `seq` is missing (waiting for a NACK or its answer).
    pub fn is_missing(&self, seq: u16) -> bool {
        self.missing.iter().any(|m| m.seq == seq)
    }

    /// Ends the hold of missing packets up to `last` that were not NACKed
    /// yet: the repair packet that could have rebuilt them came and could
    /// not.
    pub fn release_through(&mut self, now: Instant, last: u16) {
        for m in self.missing.iter_mut() {
            if m.attempts == 0 && last.wrapping_sub(m.seq) < 0x8000 && m.next > now {
                m.next = now;
            }
        }
    }

    /// Records a sequence number rebuilt from FEC or RED: like an arrival,
    /// but it is no NACK round trip and not counted as recovered.
    pub fn on_repaired(&mut self, now: Instant, seq: u16) -> Arrival {
        match self.missing.iter().position(|m| m.seq == seq) {
            Some(i) => {
                self.missing.remove(i);
                self.repaired += 1;
                Arrival::Recovered
            }
            None => {
                let a = self.on_packet(now, seq);
                if a == Arrival::New {
                    // Rebuilt before anything after it arrived.
                    self.lost += 1;
                    self.repaired += 1;
                }
                a
            }
        }
    }

    /// Records a received sequence number.
    pub fn on_packet(&mut self, now: Instant, seq: u16) -> Arrival {
        let Some(h) = self.highest else {
            self.highest = Some(seq);
            return Arrival::New;
        };
        let ahead = seq.wrapping_sub(h);
        if ahead == 0 {
            return Arrival::Stale;
        }
        if ahead < 0x8000 {
            self.highest = Some(seq);
            let gap = ahead - 1;
            if gap > 0 {
                self.lost += u64::from(gap);
                if usize::from(gap) > MAX_MISSING {
                    // An outage, not loss: start over from here.
                    self.unrecovered += self.missing.len() as u64 + u64::from(gap);
                    self.missing.clear();
                } else {
                    let free = MAX_MISSING - self.missing.len();
                    let overflow = usize::from(gap).saturating_sub(free);
                    if overflow > 0 {
                        self.unrecovered += overflow as u64;
                        self.missing.drain(..overflow.min(self.missing.len()));
                    }
                    for i in 1..=gap {
                        if self.missing.len() < MAX_MISSING {
                            self.missing.push(Missing {
                                seq: h.wrapping_add(i),
                                first_sent: None,
                                next: now + self.hold,
                                attempts: 0,
                                detected: now,
                            });
                        }
                    }
                }
            }
            return Arrival::New;
        }
        // Behind the highest: one we wait for?
        match self.missing.iter().position(|m| m.seq == seq) {
            Some(i) => {
                let m = self.missing.remove(i);
                self.recovered += 1;
                if m.attempts == 1
                    && let Some(sent) = m.first_sent
                {
                    let sample = now.saturating_duration_since(sent);
                    self.srtt = Some(match self.srtt {
                        Some(s) => (s * 7 + sample) / 8,
                        None => sample,
                    });
                }
                Arrival::Recovered
            }
            None => Arrival::Stale,
        }
    }

    /// The earliest instant a NACK is due, if any packet is missing.
    pub fn next_due(&self) -> Option<Instant> {
        self.missing.iter().map(|m| m.next).min()
    }

    /// Collects the sequence numbers due for a NACK now (at most
    /// `out.len()`), advancing their schedules; gives up on exhausted or
    /// too old ones. Returns how many were written.
    pub fn due(&mut self, now: Instant, out: &mut [u16]) -> usize {
        let retry = self.retry_interval();
        let before = self.missing.len();
        self.missing.retain(|m| {
            m.attempts < NACK_ATTEMPTS && now.saturating_duration_since(m.detected) < NACK_GIVE_UP
        });
        self.unrecovered += (before - self.missing.len()) as u64;
        let mut n = 0;
        for m in self.missing.iter_mut() {
            if n == out.len() {
                break;
            }
            if m.next <= now {
                out[n] = m.seq;
                n += 1;
                m.attempts += 1;
                m.first_sent.get_or_insert(now);
                m.next = now + retry;
            }
        }
        n
    }

    /// How many packets are missing now.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_tracker_nacks_until_recovered_and_measures_rtt() {
        let t0 = Instant::now();
        let mut l = LossTracker::default();
        assert_eq!(l.on_packet(t0, 10), Arrival::New);
        assert_eq!(l.on_packet(t0, 13), Arrival::New);
        let mut out = [0u16; 16];
        assert_eq!(l.due(t0, &mut out), 2);
        assert_eq!(&out[..2], &[11, 12]);
        assert_eq!(
            l.due(t0, &mut out),
            0,
            "not again before the retry interval"
        );
        let t1 = t0 + Duration::from_millis(4);
        assert_eq!(l.on_packet(t1, 11), Arrival::Recovered);
        assert_eq!(l.srtt(), Some(Duration::from_millis(4)));
        assert_eq!(l.on_packet(t1, 11), Arrival::Stale);
        // 12 is asked again after the retry interval, up to the attempt limit.
        let mut t = t1;
        let mut asked = 1;
        for _ in 0..100 {
            t += Duration::from_millis(20);
            asked += l.due(t, &mut out);
        }
        assert_eq!(asked, usize::from(NACK_ATTEMPTS));
        assert_eq!(l.missing(), 0);
        assert_eq!((l.recovered, l.unrecovered, l.lost), (1, 1, 2));
    }

    #[test]
    fn loss_tracker_holds_nacks_for_fec_and_forgets_repaired_packets() {
        let t0 = Instant::now();
        let mut l = LossTracker::default();
        l.set_hold(Duration::from_millis(30));
        l.on_packet(t0, 10);
        l.on_packet(t0, 14); // 11, 12, 13 missing
        let mut out = [0u16; 16];
        assert_eq!(l.due(t0, &mut out), 0, "held for a repair packet");
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(30)));
        // FEC rebuilt 11: never NACKed, not counted as a NACK recovery.
        assert_eq!(l.on_repaired(t0, 11), Arrival::Recovered);
        assert!(!l.is_missing(11));
        // The repair packet covering up to 12 could not rebuild 12: NACK it
        // now; 13 stays held.
        l.release_through(t0, 12);
        assert_eq!(l.due(t0, &mut out), 1);
        assert_eq!(out[0], 12);
        // 13 after the hold (and 12 again after the retry interval).
        assert_eq!(l.due(t0 + Duration::from_millis(30), &mut out), 2);
        assert!(out[..2].contains(&13));
        assert_eq!((l.recovered, l.repaired, l.lost), (0, 1, 3));
        assert!(l.srtt().is_none());
        // A packet rebuilt ahead of everything counts as lost and repaired.
        assert_eq!(l.on_repaired(t0, 15), Arrival::New);
        assert_eq!((l.repaired, l.lost), (2, 4));
    }

    #[test]
    fn loss_tracker_handles_wrap_reorder_and_outages() {
        let t0 = Instant::now();
        let mut l = LossTracker::default();
        l.on_packet(t0, 65534);
        l.on_packet(t0, 1); // 65535 and 0 missing
        assert_eq!(l.missing(), 2);
        assert_eq!(l.on_packet(t0, 0), Arrival::Recovered);
        assert_eq!(l.on_packet(t0, 65535), Arrival::Recovered);
        l.on_packet(t0, 5000); // an outage: not NACKed packet by packet
        assert_eq!(l.missing(), 0);
        assert_eq!(l.on_packet(t0, 4000), Arrival::Stale);
    }
}
