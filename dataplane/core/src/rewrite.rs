//! Sequence number and timestamp rewriting, so that one subscriber sees a
//! single continuous RTP stream while the source under it changes (simulcast
//! layer switches, a publisher reconnecting) and while packets of the source
//! are left out (SVC layers a subscriber does not receive).
//!
//! ## Skips
//!
//! [`StreamRewriter::skip`] removes one packet of the current source from
//! the output: the packets after it shift down by one, so the receiver sees
//! no gap and sends no NACK for it. The rewriter remembers the last
//! [`SKIP_HISTORY`] runs of skipped input sequence numbers (consecutive
//! skipped numbers share one entry, so a dropped layer frame of many
//! packets takes one), so that
//!
//! * a packet that arrives late (reordered, or retransmitted by the
//!   publisher) after later packets is numbered as it would have been in
//!   order: only the skips before it shift it;
//! * a late copy of a skipped packet is skipped again
//!   ([`StreamRewriter::rewrite`] returns `None`).
//!
//! When the history overflows, the oldest run leaves it and its end
//! becomes the *horizon*: a packet of the current source at or before the
//! horizon that arrives after that is dropped (`None`), since it can no
//! longer be numbered consistently. Nothing is ever given a number that
//! another packet already had because of a forgotten skip. A skip of a
//! packet not newer than every packet seen (a late packet the caller does
//! not forward) shifts nothing: the packets after it are already numbered, so
//! its output number stays unused, a gap the receiver may NACK.

use std::time::Instant;

/// How many runs of skipped input sequence numbers a [`StreamRewriter`]
/// remembers for the current source.
pub const SKIP_HISTORY: usize = 64;

/// One run of consecutive skipped input sequence numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SkipRun {
    /// First skipped extended input sequence number.
    start: u64,
    /// How many numbers from `start` on were skipped (at least 1 when used).
    len: u16,
    /// Whether the packets after the run were shifted down by `len` (the
    /// run was newer than every packet seen when it was skipped).
    shifts: bool,
}

impl SkipRun {
    fn end(&self) -> u64 {
        self.start + u64::from(self.len) - 1
    }

    fn contains(&self, ext: u64) -> bool {
        self.len > 0 && ext >= self.start && ext <= self.end()
    }
}

/// Per-subscriber, per-track output stream state.
///
/// Within one source the rewrite is a constant offset, less the packets
/// skipped before it, so reordering and real gaps are preserved exactly (a
/// receiver's NACKs stay meaningful). When the source changes, the offsets
/// are rebased so the output continues at the next sequence number and at a
/// timestamp advanced by the wall-clock time that passed since the last
/// forwarded packet; the skip history starts afresh.
#[derive(Debug, Clone)]
pub struct StreamRewriter {
    clock_rate: u32,
    initial_seq: u16,
    source: Option<u32>,
    seq_offset: u16,
    ts_offset: u32,
    /// Extended (64-bit) highest output sequence number.
    highest_out: Option<u64>,
    last_out_ts: u32,
    last_out_at: Option<Instant>,
    /// Extended highest input sequence number of the current source, among
    /// the packets rewritten or skipped (starts at 2^16 + the first seq).
    highest_in: Option<u64>,
    /// Ring of the last skip runs of the current source, oldest at `head`.
    skips: [SkipRun; SKIP_HISTORY],
    head: usize,
    len: usize,
    /// Shifting skips that left the history: every later packet shifts by them.
    forgotten_shift: u64,
    /// Every shifting skip of the current source: what a newest packet shifts by.
    shift_total: u64,
    /// End of the newest run that left the history: older packets are dropped.
    horizon: Option<u64>,
    /// Whether a packet of the current source was skipped.
    skipped: bool,
}

/// One rewritten packet's output numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Extended output sequence number (its low 16 bits go on the wire).
    pub seq: u64,
    /// Output timestamp.
    pub timestamp: u32,
}

impl StreamRewriter {
    /// `initial_seq` is where the output stream starts; keep it below 2^15 so
    /// receivers that assume a zero rollover counter are safe.
    pub fn new(clock_rate: u32, initial_seq: u16) -> Self {
        StreamRewriter {
            clock_rate: clock_rate.max(1),
            initial_seq,
            source: None,
            seq_offset: 0,
            ts_offset: 0,
            highest_out: None,
            last_out_ts: 0,
            last_out_at: None,
            highest_in: None,
            skips: [SkipRun::default(); SKIP_HISTORY],
            head: 0,
            len: 0,
            forgotten_shift: 0,
            shift_total: 0,
            horizon: None,
            skipped: false,
        }
    }

    /// The SSRC of the source currently mapped onto the output.
    pub fn source(&self) -> Option<u32> {
        self.source
    }

    /// The constant (sequence, timestamp) offsets that map packets of
    /// `ssrc` onto the output, when `ssrc` is the current source: then every
    /// further packet of it is rewritten as `seq + offset` (mod 2^16) and
    /// `ts + offset` (mod 2^32), which is what a kernel fast path needs to
    /// forward it without this rewriter. `None` before the first packet of
    /// `ssrc` has been rewritten (the offsets are only chosen then), and
    /// once a packet of it has been skipped (the mapping then depends on
    /// where a packet falls among the skips, until the source changes).
    pub fn constant_offsets(&self, ssrc: u32) -> Option<(u16, u32)> {
        (self.source == Some(ssrc) && !self.skipped).then_some((self.seq_offset, self.ts_offset))
    }

    /// Rewrites one packet of `ssrc`. A packet of a different SSRC than the
    /// current source makes it the new source (the caller decides when a
    /// switch is allowed, normally on a keyframe). `None` when the packet
    /// must not be forwarded: it is a copy of a skipped packet of the
    /// current source, or older than the skip history remembers (see the
    /// module docs).
    pub fn rewrite(
        &mut self,
        now: Instant,
        ssrc: u32,
        seq: u16,
        timestamp: u32,
    ) -> Option<Rewritten> {
        if self.source != Some(ssrc) {
            self.rebase(now, seq, timestamp);
            self.source = Some(ssrc);
        }
        let ext_in = self.extend_in(seq);
        let shift = if self.highest_in.is_none_or(|h| ext_in > h) {
            // Newer than every packet seen: every skip so far lies before it.
            self.highest_in = Some(ext_in);
            self.shift_total
        } else {
            self.shift_before(ext_in)?
        };
        let out16 = seq.wrapping_add(self.seq_offset).wrapping_sub(shift as u16);
        let ext = match self.highest_out {
            None => u64::from(out16),
            Some(h) => {
                let diff = i64::from(out16.wrapping_sub(h as u16) as i16);
                (h as i64 + diff).max(0) as u64
            }
        };
        let out_ts = timestamp.wrapping_add(self.ts_offset);
        if self.highest_out.is_none_or(|h| ext > h) {
            self.highest_out = Some(ext);
            self.last_out_ts = out_ts;
            self.last_out_at = Some(now);
        }
        Some(Rewritten {
            seq: ext,
            timestamp: out_ts,
        })
    }

    /// Leaves packet `seq` of `ssrc` out of the output. When it is the
    /// newest packet of the current source seen so far, the packets after
    /// it shift down by one, so the output has no gap; either way a later
    /// copy of it is not forwarded ([`Self::rewrite`] returns `None`) while
    /// the history remembers it. A packet of another SSRC than the current
    /// source is ignored: nothing of it was forwarded, and a switch to it
    /// continues the output at the next number anyway. Allocates nothing.
    pub fn skip(&mut self, ssrc: u32, seq: u16) {
        if self.source != Some(ssrc) {
            return;
        }
        let ext = self.extend_in(seq);
        if self.horizon.is_some_and(|h| ext <= h) || self.runs().any(|r| r.contains(ext)) {
            return;
        }
        self.skipped = true;
        if self.highest_in.is_some_and(|h| ext <= h) {
            // Late: the packets after it are numbered already.
            self.push(SkipRun {
                start: ext,
                len: 1,
                shifts: false,
            });
            return;
        }
        self.highest_in = Some(ext);
        self.shift_total += 1;
        if self.len > 0 {
            let last = (self.head + self.len - 1) % SKIP_HISTORY;
            let run = &mut self.skips[last];
            if run.shifts && run.end() + 1 == ext && run.len < u16::MAX {
                run.len += 1;
                return;
            }
        }
        self.push(SkipRun {
            start: ext,
            len: 1,
            shifts: true,
        });
    }

    /// Extends `seq` of the current source to 64 bits around the newest
    /// input seen (the first one is placed at 2^16, so late packets before
    /// it stay positive).
    fn extend_in(&self, seq: u16) -> u64 {
        match self.highest_in {
            None => (1 << 16) + u64::from(seq),
            Some(h) => {
                let diff = i64::from(seq.wrapping_sub(h as u16) as i16);
                (h as i64 + diff).max(0) as u64
            }
        }
    }

    fn runs(&self) -> impl Iterator<Item = &SkipRun> {
        (0..self.len).map(|i| &self.skips[(self.head + i) % SKIP_HISTORY])
    }

    /// How far a late packet at `ext` shifts down: the skips before it.
    /// `None` when it was skipped itself, or lies at or before the horizon.
    fn shift_before(&self, ext: u64) -> Option<u64> {
        if self.horizon.is_some_and(|h| ext <= h) {
            return None;
        }
        let mut shift = self.forgotten_shift;
        for run in self.runs() {
            if run.contains(ext) {
                return None;
            }
            if run.shifts && run.end() < ext {
                shift += u64::from(run.len);
            }
        }
        Some(shift)
    }

    /// Appends a run, forgetting the oldest one when the history is full.
    fn push(&mut self, run: SkipRun) {
        if self.len == SKIP_HISTORY {
            let old = self.skips[self.head];
            if old.shifts {
                self.forgotten_shift += u64::from(old.len);
            }
            self.horizon = Some(self.horizon.map_or(old.end(), |h| h.max(old.end())));
            self.head = (self.head + 1) % SKIP_HISTORY;
            self.len -= 1;
        }
        self.skips[(self.head + self.len) % SKIP_HISTORY] = run;
        self.len += 1;
    }

    fn rebase(&mut self, now: Instant, seq: u16, timestamp: u32) {
        self.highest_in = None;
        self.head = 0;
        self.len = 0;
        self.forgotten_shift = 0;
        self.shift_total = 0;
        self.horizon = None;
        self.skipped = false;
        match (self.highest_out, self.last_out_at) {
            (Some(h), Some(at)) => {
                let next = (h as u16).wrapping_add(1);
                self.seq_offset = next.wrapping_sub(seq);
                let elapsed = now.saturating_duration_since(at);
                let ticks = (elapsed.as_secs_f64() * f64::from(self.clock_rate)) as u64;
                let ticks = ticks.clamp(1, u64::from(u32::MAX / 2)) as u32;
                self.ts_offset = self.last_out_ts.wrapping_add(ticks).wrapping_sub(timestamp);
            }
            _ => {
                self.seq_offset = self.initial_seq.wrapping_sub(seq);
                self.ts_offset = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Rewrites a packet that must be forwarded.
    fn fwd(r: &mut StreamRewriter, now: Instant, ssrc: u32, seq: u16, ts: u32) -> Rewritten {
        r.rewrite(now, ssrc, seq, ts).expect("forwarded")
    }

    /// The wire sequence number of a packet, `None` when it is not forwarded.
    fn out(r: &mut StreamRewriter, now: Instant, seq: u16) -> Option<u16> {
        r.rewrite(now, 1, seq, 0).map(|w| w.seq as u16)
    }

    #[test]
    fn constant_offset_within_one_source_keeps_gaps_and_reordering() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 100);
        assert_eq!(fwd(&mut r, t0, 1, 5000, 1000).seq, 100);
        assert_eq!(fwd(&mut r, t0, 1, 5002, 1000).seq, 102);
        // A late packet fills the gap with the number the receiver NACKed.
        assert_eq!(fwd(&mut r, t0, 1, 5001, 1000).seq, 101);
        assert_eq!(fwd(&mut r, t0, 1, 5003, 4000).timestamp, 4000);
    }

    #[test]
    fn source_switch_continues_sequence_and_advances_time() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 10);
        fwd(&mut r, t0, 1, 65_535, 50_000);
        let a = fwd(&mut r, t0, 1, 0, 53_000); // wraps on the input side
        assert_eq!(a.seq, 11);
        let b = fwd(&mut r, t0 + Duration::from_millis(100), 2, 777, 9_999_999);
        assert_eq!(b.seq, 12, "the new layer continues at the next number");
        assert_eq!(b.timestamp, 53_000 + 9_000, "100 ms at 90 kHz later");
        let c = fwd(
            &mut r,
            t0 + Duration::from_millis(133),
            2,
            778,
            9_999_999 + 3000,
        );
        assert_eq!((c.seq, c.timestamp), (13, 65_000));
    }

    #[test]
    fn constant_offsets_match_the_rewrite_of_the_current_source_only() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 10);
        assert_eq!(r.constant_offsets(1), None, "no source yet");
        fwd(&mut r, t0, 1, 60_000, 5);
        let (seq_off, ts_off) = r.constant_offsets(1).unwrap();
        for (seq, ts) in [(60_001u16, 3005u32), (65_535, u32::MAX), (0, 0), (7, 9)] {
            let out = fwd(&mut r, t0, 1, seq, ts);
            assert_eq!(out.seq as u16, seq.wrapping_add(seq_off));
            assert_eq!(out.timestamp, ts.wrapping_add(ts_off));
        }
        assert_eq!(
            r.constant_offsets(2),
            None,
            "another SSRC is not the source"
        );
        fwd(&mut r, t0 + Duration::from_millis(50), 2, 100, 100);
        assert_eq!(
            r.constant_offsets(1),
            None,
            "the old source lost its offsets"
        );
        assert!(r.constant_offsets(2).is_some());
    }

    #[test]
    fn extended_sequence_survives_output_wrap() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(48_000, 65_534);
        let seqs: Vec<u64> = (0..4u16).map(|i| fwd(&mut r, t0, 9, i, 0).seq).collect();
        assert_eq!(seqs, vec![65_534, 65_535, 65_536, 65_537]);
    }

    #[test]
    fn skip_then_continue_gives_continuous_output() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 100);
        assert_eq!(out(&mut r, t0, 5000), Some(100));
        r.skip(1, 5001);
        r.skip(1, 5002);
        assert_eq!(out(&mut r, t0, 5003), Some(101), "no gap for the skips");
        r.skip(1, 5004);
        assert_eq!(out(&mut r, t0, 5005), Some(102));
        assert_eq!(out(&mut r, t0, 5006), Some(103));
        // A real gap (5007 lost) stays a gap, so the receiver NACKs it.
        assert_eq!(out(&mut r, t0, 5008), Some(105));
        assert_eq!(out(&mut r, t0, 5007), Some(104), "the NACKed number");
        assert_eq!(r.constant_offsets(1), None, "not one offset any more");
        // Skips of another SSRC than the source change nothing.
        r.skip(2, 5009);
        assert_eq!(out(&mut r, t0, 5009), Some(106));
    }

    #[test]
    fn reordering_around_a_skip_keeps_each_packets_number() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 10);
        assert_eq!(out(&mut r, t0, 200), Some(10));
        // 201 is late; 202 is skipped; 203 comes first.
        r.skip(1, 202);
        assert_eq!(out(&mut r, t0, 203), Some(11 + 1));
        assert_eq!(out(&mut r, t0, 201), Some(11), "before the skip: unshifted");
        assert_eq!(out(&mut r, t0, 204), Some(13));
        // A late packet after the skip shifts like its neighbours.
        r.skip(1, 206);
        assert_eq!(out(&mut r, t0, 207), Some(15));
        assert_eq!(out(&mut r, t0, 205), Some(14));
        // A retransmission of a forwarded packet gets its number again.
        assert_eq!(out(&mut r, t0, 203), Some(12));
        assert_eq!(out(&mut r, t0, 201), Some(11));
    }

    #[test]
    fn a_late_copy_of_a_skipped_packet_is_dropped() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 10);
        assert_eq!(out(&mut r, t0, 1), Some(10));
        r.skip(1, 2);
        r.skip(1, 3);
        assert_eq!(out(&mut r, t0, 4), Some(11));
        assert_eq!(out(&mut r, t0, 2), None, "retransmitted, still skipped");
        assert_eq!(out(&mut r, t0, 3), None);
        r.skip(1, 3);
        assert_eq!(out(&mut r, t0, 5), Some(12), "a repeated skip shifts once");
        // A late packet the caller skips shifts nothing (the later ones
        // are numbered already) and its copies are dropped too.
        assert_eq!(out(&mut r, t0, 7), Some(14));
        r.skip(1, 6);
        assert_eq!(out(&mut r, t0, 6), None);
        assert_eq!(out(&mut r, t0, 8), Some(15));
        // A new source starts a new history: its numbers are its own.
        let w = r.rewrite(t0 + Duration::from_millis(10), 2, 3, 0);
        assert_eq!(w.map(|w| w.seq), Some(16));
        assert_eq!(r.constant_offsets(2).map(|o| o.0), Some(13));
    }

    #[test]
    fn skips_across_the_input_and_output_wrap() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 65_534);
        assert_eq!(fwd(&mut r, t0, 1, 65_533, 0).seq, 65_534);
        r.skip(1, 65_534);
        r.skip(1, 65_535);
        r.skip(1, 0);
        assert_eq!(fwd(&mut r, t0, 1, 1, 0).seq, 65_535);
        r.skip(1, 2);
        assert_eq!(fwd(&mut r, t0, 1, 3, 0).seq, 65_536, "the output wraps");
        assert_eq!(fwd(&mut r, t0, 1, 4, 0).seq, 65_537);
        for seq in [65_534, 65_535, 0, 2] {
            assert_eq!(r.rewrite(t0, 1, seq, 0), None, "{seq} stays skipped");
        }
        assert_eq!(fwd(&mut r, t0, 1, 1, 0).seq, 65_535, "a copy, same number");
    }

    #[test]
    fn skip_history_overflow_drops_what_it_can_no_longer_number() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 0);
        // Packet 0 forwarded, then runs of one forwarded and one skipped:
        // odd numbers skipped, one run each.
        assert_eq!(out(&mut r, t0, 0), Some(0));
        let runs = SKIP_HISTORY as u16 + 3;
        for i in 1..=runs {
            r.skip(1, 2 * i - 1);
            assert_eq!(out(&mut r, t0, 2 * i), Some(i));
        }
        // The three oldest runs left the history: copies at or before the
        // horizon (seq 5) are dropped, skipped or not.
        for seq in [0, 1, 2, 3, 4, 5] {
            assert_eq!(out(&mut r, t0, seq), None, "{seq} is past the horizon");
        }
        // After it, forwarded packets keep their numbers, skipped ones stay
        // skipped, and new packets continue without a gap.
        assert_eq!(out(&mut r, t0, 6), Some(3));
        assert_eq!(out(&mut r, t0, 7), None);
        assert_eq!(out(&mut r, t0, 2 * runs), Some(runs));
        assert_eq!(out(&mut r, t0, 2 * runs + 1), Some(runs + 1));
        // A long run of consecutive skips is one entry.
        for seq in 2 * runs + 2..2 * runs + 1000 {
            r.skip(1, seq);
        }
        assert_eq!(out(&mut r, t0, 2 * runs + 1000), Some(runs + 2));
        // That new run pushed the run of 7 out: the horizon moved to 7.
        assert_eq!(out(&mut r, t0, 8), Some(4));
        assert_eq!(out(&mut r, t0, 6), None, "now past the horizon");
    }
}
