//! Sequence number and timestamp rewriting, so that one subscriber sees a
//! single continuous RTP stream while the source under it changes (simulcast
//! layer switches, a publisher reconnecting).

use std::time::Instant;

/// Per-subscriber, per-track output stream state.
///
/// Within one source the rewrite is a constant offset, so reordering and gaps
/// are preserved exactly (a receiver's NACKs stay meaningful). When the source
/// changes, the offsets are rebased so the output continues at the next
/// sequence number and at a timestamp advanced by the wall-clock time that
/// passed since the last forwarded packet.
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
    /// `ssrc` has been rewritten (the offsets are only chosen then).
    pub fn constant_offsets(&self, ssrc: u32) -> Option<(u16, u32)> {
        (self.source == Some(ssrc)).then_some((self.seq_offset, self.ts_offset))
    }

    /// Rewrites one packet of `ssrc`. A packet of a different SSRC than the
    /// current source makes it the new source (the caller decides when a
    /// switch is allowed, normally on a keyframe).
    pub fn rewrite(&mut self, now: Instant, ssrc: u32, seq: u16, timestamp: u32) -> Rewritten {
        if self.source != Some(ssrc) {
            self.rebase(now, seq, timestamp);
            self.source = Some(ssrc);
        }
        let out16 = seq.wrapping_add(self.seq_offset);
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
        Rewritten {
            seq: ext,
            timestamp: out_ts,
        }
    }

    fn rebase(&mut self, now: Instant, seq: u16, timestamp: u32) {
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

    #[test]
    fn constant_offset_within_one_source_keeps_gaps_and_reordering() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 100);
        assert_eq!(r.rewrite(t0, 1, 5000, 1000).seq, 100);
        assert_eq!(r.rewrite(t0, 1, 5002, 1000).seq, 102);
        // A late packet fills the gap with the number the receiver NACKed.
        assert_eq!(r.rewrite(t0, 1, 5001, 1000).seq, 101);
        assert_eq!(r.rewrite(t0, 1, 5003, 4000).timestamp, 4000);
    }

    #[test]
    fn source_switch_continues_sequence_and_advances_time() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 10);
        r.rewrite(t0, 1, 65_535, 50_000);
        let a = r.rewrite(t0, 1, 0, 53_000); // wraps on the input side
        assert_eq!(a.seq, 11);
        let b = r.rewrite(t0 + Duration::from_millis(100), 2, 777, 9_999_999);
        assert_eq!(b.seq, 12, "the new layer continues at the next number");
        assert_eq!(b.timestamp, 53_000 + 9_000, "100 ms at 90 kHz later");
        let c = r.rewrite(t0 + Duration::from_millis(133), 2, 778, 9_999_999 + 3000);
        assert_eq!((c.seq, c.timestamp), (13, 65_000));
    }

    #[test]
    fn constant_offsets_match_the_rewrite_of_the_current_source_only() {
        let t0 = Instant::now();
        let mut r = StreamRewriter::new(90_000, 10);
        assert_eq!(r.constant_offsets(1), None, "no source yet");
        r.rewrite(t0, 1, 60_000, 5);
        let (seq_off, ts_off) = r.constant_offsets(1).unwrap();
        for (seq, ts) in [(60_001u16, 3005u32), (65_535, u32::MAX), (0, 0), (7, 9)] {
            let out = r.rewrite(t0, 1, seq, ts);
            assert_eq!(out.seq as u16, seq.wrapping_add(seq_off));
            assert_eq!(out.timestamp, ts.wrapping_add(ts_off));
        }
        assert_eq!(
            r.constant_offsets(2),
            None,
            "another SSRC is not the source"
        );
        r.rewrite(t0 + Duration::from_millis(50), 2, 100, 100);
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
        let seqs: Vec<u64> = (0..4u16).map(|i| r.rewrite(t0, 9, i, 0).seq).collect();
        assert_eq!(seqs, vec![65_534, 65_535, 65_536, 65_537]);
    }
}
