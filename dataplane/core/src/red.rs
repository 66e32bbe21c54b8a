//! RED (RFC 2198) for audio on mesh links: each packet carries the
//! previous packet of its stream as a redundant block, so a single loss is
//! repaired by the next packet, with no round trip and no repair stream.
//!
//! The RED payload, written from the RFC: one 4-byte header per redundant
//! block, a 1-byte header for the primary, then the blocks' data in the
//! same order and the primary's last:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |1| block PT    |  timestamp offset         |   block length    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |0| primary PT  |  redundant data ... primary data ...
//! +-+-+-+-+-+-+-+-+
//! ```
//!
//! A redundant block's timestamp is the packet's minus its offset. RED
//! carries no sequence numbers: Ridge sends up to [`MAX_DEPTH`] redundant
//! blocks, always the packets right before (oldest first, the last one
//! sequence number − 1), so a receiver reads block `i` of `n` as sequence
//! number − (`n` − `i`). A receiver that reads only the last block (as
//! Ridge did before sending two) still reads it right.

/// Redundant blocks a receiver accepts in one packet.
pub const MAX_BLOCKS: usize = 4;
/// Redundant blocks Ridge sends at most (on lossy links; one otherwise).
pub const MAX_DEPTH: usize = 2;
/// Audio loss (before RED) from which a link's RED packets carry
/// [`MAX_DEPTH`] blocks: with one, a loss of two in a row (p², 1 % of the
/// packets at 10 %) needs a NACK; with two, only three in a row (p³).
pub const DEPTH_LOSS: f64 = 0.10;
/// Audio loss below which they carry one again (below [`DEPTH_LOSS`], so
/// a loss near it does not flip the depth every window).
pub const DEPTH_LOSS_OFF: f64 = 0.08;
/// Largest timestamp offset (14 bits).
pub const MAX_TS_OFFSET: u32 = (1 << 14) - 1;
/// Longest redundant block (10 bits).
pub const MAX_BLOCK_LEN: usize = (1 << 10) - 1;

/// Why a RED payload could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedError {
    /// The RED header or a block is shorter than it says.
    #[error("RED payload truncated")]
    Truncated,
    /// More redundant blocks than a packet may carry.
    #[error("more than {MAX_BLOCKS} redundant blocks")]
    TooManyBlocks,
}

/// One block of a RED payload: its payload type, timestamp offset and
/// where its data lies (byte offsets into the RED payload).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedBlock {
    /// The block's payload type.
    pub pt: u8,
    /// How much earlier than the packet's timestamp the block's is.
    pub ts_offset: u16,
    /// Where the block's data starts in the RED payload.
    pub start: usize,
    /// Where the block's data ends in the RED payload.
    pub end: usize,
}

/// A decoded RED payload (offsets only; nothing is copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedPayload {
    /// The primary encoding.
    pub primary: RedBlock,
    blocks: [RedBlock; MAX_BLOCKS],
    count: usize,
}

impl RedPayload {
    /// Decodes the headers of a RED payload and checks that every block
    /// lies within it.
    pub fn parse(payload: &[u8]) -> Result<Self, RedError> {
        let mut blocks = [RedBlock::default(); MAX_BLOCKS];
        let mut count = 0;
        let mut at = 0;
        loop {
            let b = *payload.get(at).ok_or(RedError::Truncated)?;
            if b & 0x80 == 0 {
                at += 1;
                break;
            }
            let h = payload.get(at..at + 4).ok_or(RedError::Truncated)?;
            if count == MAX_BLOCKS {
                return Err(RedError::TooManyBlocks);
            }
            let word = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            blocks[count] = RedBlock {
                pt: h[0] & 0x7f,
                ts_offset: ((word >> 10) & 0x3fff) as u16,
                start: 0,
                end: (word & 0x3ff) as usize,
            };
            count += 1;
            at += 4;
        }
        let primary_pt = payload[at - 1] & 0x7f;
        for b in &mut blocks[..count] {
            let len = b.end;
            b.start = at;
            b.end = at.checked_add(len).ok_or(RedError::Truncated)?;
            if b.end > payload.len() {
                return Err(RedError::Truncated);
            }
            at = b.end;
        }
        Ok(RedPayload {
            primary: RedBlock {
                pt: primary_pt,
                ts_offset: 0,
                start: at,
                end: payload.len(),
            },
            blocks,
            count,
        })
    }

    /// The redundant blocks, oldest first.
    pub fn redundant(&self) -> &[RedBlock] {
        &self.blocks[..self.count]
    }

    /// The most recent redundant block (the one before the primary).
    pub fn latest(&self) -> Option<RedBlock> {
        self.redundant().last().copied()
    }
}

/// Whether a previous packet fits a RED block: a timestamp offset of 1 to
/// [`MAX_TS_OFFSET`] and at most [`MAX_BLOCK_LEN`] bytes.
pub fn fits(ts_offset: u32, len: usize) -> bool {
    (1..=MAX_TS_OFFSET).contains(&ts_offset) && len <= MAX_BLOCK_LEN
}

/// Appends a RED payload: the primary of payload type `pt`, after the
/// redundant blocks given (timestamp offset, data; of the same payload
/// type, oldest first, the last being the packet right before), as many
/// of the most recent ones as all [`fits`] (a block that does not fit
/// leaves out the older ones too, so block `i` of `n` stays sequence
/// number − (`n` − `i`)). Returns how many blocks went in.
pub fn write(out: &mut Vec<u8>, pt: u8, redundant: &[(u32, &[u8])], primary: &[u8]) -> usize {
    let fitting = redundant
        .iter()
        .rev()
        .take_while(|(off, data)| fits(*off, data.len()))
        .count();
    let blocks = &redundant[redundant.len() - fitting..];
    for (off, data) in blocks {
        let word = (1u32 << 31) | (u32::from(pt & 0x7f) << 24) | (off << 10) | data.len() as u32;
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.push(pt & 0x7f);
    for (_, data) in blocks {
        out.extend_from_slice(data);
    }
    out.extend_from_slice(primary);
    blocks.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwrap_recovers_the_previous_frame() {
        let prev = [7u8; 80];
        let cur = [9u8; 90];
        let mut out = Vec::new();
        assert_eq!(write(&mut out, 111, &[(960, &prev)], &cur), 1);
        assert_eq!(out.len(), 4 + 1 + 80 + 90);
        let red = RedPayload::parse(&out).expect("parses");
        assert_eq!(red.primary.pt, 111);
        assert_eq!(&out[red.primary.start..red.primary.end], &cur);
        let b = red.latest().expect("a redundant block");
        assert_eq!((b.pt, b.ts_offset), (111, 960));
        assert_eq!(&out[b.start..b.end], &prev);
    }

    #[test]
    fn primary_only_when_the_previous_does_not_fit() {
        let cur = [1u8, 2, 3];
        for (off, len) in [(0, 10), (1 << 14, 10), (960, 1024)] {
            let prev = vec![5u8; len];
            let mut out = Vec::new();
            assert_eq!(write(&mut out, 111, &[(off, &prev)], &cur), 0);
            let red = RedPayload::parse(&out).expect("parses");
            assert!(red.latest().is_none());
            assert_eq!(&out[red.primary.start..], &cur);
        }
        // Empty primary (a DTX frame) is fine.
        let red = RedPayload::parse(&[111]).expect("parses");
        assert_eq!(red.primary.start, red.primary.end);
    }

    #[test]
    fn several_blocks_parse_oldest_first() {
        let mut out = Vec::new();
        for (off, len) in [(1920u32, 2u32), (960, 3)] {
            out.extend_from_slice(&((1 << 31) | (111 << 24) | (off << 10) | len).to_be_bytes());
        }
        out.push(111);
        out.extend_from_slice(&[1, 1, 2, 2, 2, 3]);
        let red = RedPayload::parse(&out).expect("parses");
        assert_eq!(red.redundant().len(), 2);
        let b = red.latest().expect("block");
        assert_eq!((b.ts_offset, &out[b.start..b.end]), (960, &[2u8, 2, 2][..]));
        assert_eq!(&out[red.primary.start..], &[3]);
    }

    #[test]
    fn two_blocks_are_written_oldest_first_and_only_a_fitting_suffix() {
        let (p2, p1, cur) = ([2u8; 40], [1u8; 50], [0u8; 60]);
        let mut out = Vec::new();
        assert_eq!(write(&mut out, 111, &[(1920, &p2), (960, &p1)], &cur), 2);
        let red = RedPayload::parse(&out).expect("parses");
        let got: Vec<(u16, &[u8])> = red
            .redundant()
            .iter()
            .map(|b| (b.ts_offset, &out[b.start..b.end]))
            .collect();
        assert_eq!(got, [(1920, &p2[..]), (960, &p1[..])]);
        assert_eq!(&out[red.primary.start..], &cur);
        // The older block does not fit: only the packet before goes in.
        let long = [3u8; 1024];
        let mut out = Vec::new();
        assert_eq!(write(&mut out, 111, &[(1920, &long), (960, &p1)], &cur), 1);
        let red = RedPayload::parse(&out).expect("parses");
        assert_eq!(red.redundant().len(), 1);
        assert_eq!(red.latest().map(|b| b.ts_offset), Some(960));
        // The packet before does not fit: none goes in (the older one
        // would be read as the packet before).
        let mut out = Vec::new();
        assert_eq!(write(&mut out, 111, &[(1920, &p2), (960, &long)], &cur), 0);
        assert!(RedPayload::parse(&out).expect("parses").latest().is_none());
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        assert_eq!(RedPayload::parse(&[]), Err(RedError::Truncated));
        // A block header cut short.
        assert_eq!(
            RedPayload::parse(&[0x80 | 111, 0]),
            Err(RedError::Truncated)
        );
        // No primary header after the block headers.
        let hdr = ((1u32 << 31) | (111 << 24) | (960 << 10) | 5).to_be_bytes();
        assert_eq!(RedPayload::parse(&hdr), Err(RedError::Truncated));
        // A block longer than what follows.
        let mut p = hdr.to_vec();
        p.push(111);
        p.extend_from_slice(&[0; 4]);
        assert_eq!(RedPayload::parse(&p), Err(RedError::Truncated));
        // Too many blocks.
        let mut many = Vec::new();
        for _ in 0..=MAX_BLOCKS {
            many.extend_from_slice(&((1u32 << 31) | (111 << 24)).to_be_bytes());
        }
        many.push(111);
        assert_eq!(RedPayload::parse(&many), Err(RedError::TooManyBlocks));
    }

    #[test]
    fn random_input_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let n = (x % 48) as usize;
            let mut buf = Vec::with_capacity(n);
            for _ in 0..n {
                buf.push(crate::sfu::xorshift(&mut x) as u8);
            }
            if let Ok(red) = RedPayload::parse(&buf) {
                for b in red.redundant().iter().chain([&red.primary]) {
                    assert!(b.start <= b.end && b.end <= buf.len());
                }
            }
        }
    }
}
