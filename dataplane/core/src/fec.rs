//! FlexFEC (RFC 8627) for mesh links: XOR parity over small groups of a
//! link stream's packets, carried on a repair stream of its own.
//!
//! Only what mesh links need is implemented, written from the RFC:
//!
//! * the flexible-mask form (`R` = 0, `F` = 0) with one protected SSRC,
//!   named by the single CSRC of the repair packet's RTP header;
//! * a repair packet covers up to a group size of packets of one stream
//!   ([`MIN_GROUP_SIZE`] to [`MAX_GROUP_SIZE`], picked per link from its
//!   loss by [`group_size_for_loss`], [`GROUP_SIZE`] until measured) whose
//!   sequence numbers lie within 15 of the group's first (the short,
//!   15-bit mask), so any one lost packet of the group can be rebuilt from
//!   the others and the repair packet. The receiver reads the group from
//!   the mask, so the sender may change the size at any group;
//! * the receiver understands the 46- and 110-bit masks too, but recovers
//!   only from packets it still holds ([`RECEIVE_RING`] per stream).
//!
//! The FEC header after the repair packet's RTP header (and its CSRC):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|F|P|X|  CC   |M| PT recovery |        length recovery        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                          TS recovery                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           SN base             |k|          Mask [0-14]        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |k|                   Mask [15-45] (when the first k is 0)      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                Mask [46-109] (when the second k is 0)         |
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |             repair payload (XOR of the protected bytes)       |
//! ```
//!
//! `P`, `X`, `CC`, `M`, `PT`, the length (of everything after the fixed
//! 12-byte RTP header) and the timestamp are the XOR of those of the
//! protected packets; the repair payload is the XOR of their bytes after
//! the fixed header, each padded with zeros to the longest. Mask bit `i`
//! (the most significant first) set: packet `SN base + i` is protected.
//! A `k` bit of 1 ends the mask.

use std::time::{Duration, Instant};

use crate::buf::PacketBuf;
use crate::packet::rtp::{FIXED_HEADER_LEN, RtpHeader};

/// Media packets one repair packet protects before the link's loss is
/// measured (25 % overhead).
pub const GROUP_SIZE: usize = 4;
/// The smallest group a sender uses (50 % overhead), at high loss.
pub const MIN_GROUP_SIZE: usize = 2;
/// The largest group a sender uses (12.5 % overhead), at low loss; at most
/// the short mask's span.
pub const MAX_GROUP_SIZE: usize = 8;
/// Loss (of the media packets, before FEC) at or above which a link's
/// groups shrink: 8 → 4 at 5 %, 4 → 2 at 15 %.
const SHRINK_AT: [f64; 2] = [0.05, 0.15];
/// Loss below which they grow again: 2 → 4 under 12 %, 4 → 8 under 4 %
/// (below the shrink thresholds, so a loss near one does not flap).
const GROW_BELOW: [f64; 2] = [0.04, 0.12];
/// Bytes of the FEC header with the short (15-bit) mask.
pub const FEC_HEADER_LEN: usize = 12;
/// Packets of a stream a receiver keeps to recover from (a power of two).
pub const RECEIVE_RING: usize = 64;
/// Longest protected packet (everything after the fixed RTP header).
pub const MAX_PROTECTED_LEN: usize = 1400;
/// The span of sequence numbers the short mask covers.
const SHORT_MASK_SPAN: u16 = 15;

/// Why a repair packet could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FecError {
    /// The repair packet is not a valid RTP packet.
    #[error("not a valid RTP packet")]
    Rtp,
    /// The FlexFEC header is shorter than its fields say.
    #[error("FEC header truncated")]
    Truncated,
    /// `R` or `F` set: retransmission or fixed L×D form, not used on links.
    #[error("unsupported FlexFEC form (R or F bit set)")]
    Unsupported,
    /// Not exactly one protected SSRC.
    #[error("repair packet names {0} protected SSRCs (mesh links use one)")]
    SsrcCount(u8),
    /// The mask protects no packet.
    #[error("FEC mask protects no packet")]
    EmptyMask,
    /// The recovered length is longer than the repair payload.
    #[error("recovered length {len} exceeds the repair payload ({have} bytes)")]
    Length {
        /// The recovered length.
        len: usize,
        /// The repair payload's length.
        have: usize,
    },
}

/// A parsed repair packet (borrowing its bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FecPacket<'a> {
    /// The media SSRC it protects (the CSRC of its RTP header).
    pub protected_ssrc: u32,
    /// `P`, `X` and `CC` recovery (low 6 bits).
    pub bits: u8,
    /// `M` and `PT` recovery (the second RTP header byte).
    pub marker_pt: u8,
    /// Length recovery: the XOR of the protected packets' lengths.
    pub length: u16,
    /// Timestamp recovery: the XOR of the protected packets' timestamps.
    pub timestamp: u32,
    /// The first protected sequence number.
    pub base: u16,
    /// Bit `i` set: `base + i` is protected (at most 110 bits).
    pub mask: u128,
    /// The XOR of the protected packets' payloads.
    pub repair: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(*b.get(at..at + 2)?.first_chunk()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(*b.get(at..at + 4)?.first_chunk()?))
}

impl<'a> FecPacket<'a> {
    /// Parses a (plain, authenticated) repair packet: RTP header with one
    /// CSRC, then the FEC header and the repair payload.
    pub fn parse(packet: &'a [u8]) -> Result<Self, FecError> {
        let h = RtpHeader::parse(packet).map_err(|_| FecError::Rtp)?;
        if h.csrc_count != 1 {
            return Err(FecError::SsrcCount(h.csrc_count));
        }
        let protected_ssrc = be32(packet, FIXED_HEADER_LEN).ok_or(FecError::Rtp)?;
        let body = h.payload(packet);
        let first = *body.first().ok_or(FecError::Truncated)?;
        if first & 0xc0 != 0 {
            return Err(FecError::Unsupported);
        }
        let marker_pt = *body.get(1).ok_or(FecError::Truncated)?;
        let length = be16(body, 2).ok_or(FecError::Truncated)?;
        let timestamp = be32(body, 4).ok_or(FecError::Truncated)?;
        let base = be16(body, 8).ok_or(FecError::Truncated)?;
        let m0 = be16(body, 10).ok_or(FecError::Truncated)?;
        // Mask bit i (the most significant first) is packet base + i; in
        // `mask`, bit i.
        let mut mask = 0u128;
        let mut put = |value: u128, bits: u32, offset: u32| {
            for i in 0..bits {
                if (value >> (bits - 1 - i)) & 1 != 0 {
                    mask |= 1u128 << (offset + i);
                }
            }
        };
        put(u128::from(m0 & 0x7fff), 15, 0);
        let mut end = FEC_HEADER_LEN;
        if m0 & 0x8000 == 0 {
            let m1 = be32(body, 12).ok_or(FecError::Truncated)?;
            put(u128::from(m1 & 0x7fff_ffff), 31, 15);
            end += 4;
            if m1 & 0x8000_0000 == 0 {
                let hi = be32(body, 16).ok_or(FecError::Truncated)?;
                let lo = be32(body, 20).ok_or(FecError::Truncated)?;
                put((u128::from(hi) << 32) | u128::from(lo), 64, 46);
                end += 8;
            }
        }
        if mask == 0 {
            return Err(FecError::EmptyMask);
        }
        Ok(FecPacket {
            protected_ssrc,
            bits: first & 0x3f,
            marker_pt,
            length,
            timestamp,
            base,
            mask,
            repair: body.get(end..).unwrap_or_default(),
        })
    }

    /// The protected sequence numbers, lowest first.
    pub fn protected(&self) -> impl Iterator<Item = u16> + '_ {
        (0..110u16)
            .filter(|i| (self.mask >> i) & 1 != 0)
            .map(|i| self.base.wrapping_add(i))
    }

    /// The highest protected sequence number.
    pub fn last(&self) -> u16 {
        let top = 127u16.saturating_sub(self.mask.leading_zeros() as u16);
        self.base.wrapping_add(top)
    }
}

/// The fields of a packet that FEC protects: the first two header bytes,
/// the timestamp, and the bytes after the fixed header.
fn protected_fields(packet: &[u8]) -> Option<(u8, u8, u32, &[u8])> {
    let b0 = *packet.first()?;
    let b1 = *packet.get(1)?;
    let ts = be32(packet, 4)?;
    Some((b0 & 0x3f, b1, ts, packet.get(FIXED_HEADER_LEN..)?))
}

/// The share of media packets that XOR parity over groups of `n` (plus
/// the repair packet) leaves lost at independent loss `p`: a packet is
/// rebuilt unless one of the `n` other packets of its group (the other
/// media packets and the repair packet) is lost too.
pub fn residual_loss(p: f64, n: usize) -> f64 {
    let p = p.clamp(0.0, 1.0);
    p * (1.0 - (1.0 - p).powi(n as i32))
}

/// The loss before FEC that leaves `residual` after it with groups of `n`
/// (the inverse of [`residual_loss`], which grows with `p`): what a sender
/// that only sees the NACKs of what FEC could not rebuild infers.
pub fn loss_before_fec(residual: f64, n: usize) -> f64 {
    if residual <= 0.0 || n == 0 {
        return residual.max(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if residual_loss(mid, n) < residual {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// The group size for a link at `loss` (before FEC), from the `current`
/// one: 8 under 5 %, 4 from 5 % to 15 %, 2 above; growing again only
/// under 4 % and 12 %. With groups of `n` a packet is lost for good (left
/// to NACK) when another of its group is lost too: about `n·p²`, e.g. 0.3 %
/// of the packets at 2 % with 8, 0.9 % at 5 % with 4, 4 % at 15 % with 2.
pub fn group_size_for_loss(loss: f64, current: usize) -> usize {
    let current = current.clamp(MIN_GROUP_SIZE, MAX_GROUP_SIZE);
    let size = |l: f64, t: [f64; 2]| {
        if l >= t[1] {
            MIN_GROUP_SIZE
        } else if l >= t[0] {
            GROUP_SIZE
        } else {
            MAX_GROUP_SIZE
        }
    };
    let shrunk = size(loss, SHRINK_AT);
    if shrunk < current {
        return shrunk;
    }
    size(loss, GROW_BELOW).max(current)
}

/// Sender side of one link stream: XORs the packets of the open group and
/// writes a repair packet when it is complete. Its buffer is allocated
/// once; nothing allocates per packet.
#[derive(Debug)]
pub struct FecEncoder {
    /// SSRC of the repair stream.
    ssrc: u32,
    /// Next repair sequence number.
    seq: u16,
    base: u16,
    mask: u16,
    count: usize,
    /// Packets of the open group before its repair packet.
    group_size: usize,
    /// The group size from the next group on.
    next_group_size: usize,
    /// When the open group's first packet was pushed (with
    /// [`push_at`](Self::push_at)).
    opened: Option<Instant>,
    bits: u8,
    marker_pt: u8,
    length: u16,
    timestamp: u32,
    last_timestamp: u32,
    xor: Vec<u8>,
}

impl FecEncoder {
    /// An encoder whose repair packets go out with `repair_ssrc`.
    pub fn new(repair_ssrc: u32) -> Self {
        FecEncoder {
            ssrc: repair_ssrc,
            seq: (repair_ssrc >> 8) as u16,
            base: 0,
            mask: 0,
            count: 0,
            group_size: GROUP_SIZE,
            next_group_size: GROUP_SIZE,
            opened: None,
            bits: 0,
            marker_pt: 0,
            length: 0,
            timestamp: 0,
            last_timestamp: 0,
            xor: Vec::with_capacity(MAX_PROTECTED_LEN),
        }
    }

    /// The repair stream's SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Packets in the open group.
    pub fn pending(&self) -> usize {
        self.count
    }

    /// Whether the open group is complete (write its repair packet).
    pub fn is_full(&self) -> bool {
        self.count >= self.group_size
    }

    /// Sets the group size (clamped to [`MIN_GROUP_SIZE`]..=
    /// [`MAX_GROUP_SIZE`]) from the next group on: the open one keeps its
    /// own.
    pub fn set_group_size(&mut self, n: usize) {
        self.next_group_size = n.clamp(MIN_GROUP_SIZE, MAX_GROUP_SIZE);
    }

    /// The group size of the next group.
    pub fn next_group_size(&self) -> usize {
        self.next_group_size
    }

    /// Whether a packet with `seq` cannot join the open group because it
    /// lies beyond the mask: the group's repair packet goes first.
    pub fn must_close_before(&self, seq: u16) -> bool {
        self.count > 0 && {
            let ahead = seq.wrapping_sub(self.base);
            (SHORT_MASK_SPAN..0x8000).contains(&ahead)
        }
    }

    /// Whether the open group's first packet went out `max_age` or more
    /// before `now`: its repair packet goes out before the next packet
    /// joins, so a repair never comes later than the receiver's wait
    /// before NACKing (a slow stream gets smaller groups).
    pub fn is_stale(&self, now: Instant, max_age: Duration) -> bool {
        self.count > 0
            && self
                .opened
                .is_some_and(|t| now.saturating_duration_since(t) >= max_age)
    }

    /// [`push`](Self::push), remembering when a group opened (for
    /// [`is_stale`](Self::is_stale)).
    pub fn push_at(&mut self, now: Instant, packet: &[u8]) -> bool {
        let opening = self.count == 0;
        let pushed = self.push(packet);
        if pushed && opening {
            self.opened = Some(now);
        }
        pushed
    }

    /// Forgets the open group (the stream's source changed).
    pub fn reset(&mut self) {
        self.count = 0;
        self.opened = None;
        self.mask = 0;
        self.bits = 0;
        self.marker_pt = 0;
        self.length = 0;
        self.timestamp = 0;
        self.xor.clear();
    }

    /// Adds a packet as sent (plain RTP, before SRTP) to the open group.
    /// Returns false when it is not protected: older than the group's
    /// first, already in it, beyond its mask (call
    /// [`must_close_before`](Self::must_close_before) first), too long or
    /// not RTP.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        let Some((bits, marker_pt, ts, rest)) = protected_fields(packet) else {
            return false;
        };
        let Some(seq) = be16(packet, 2) else {
            return false;
        };
        if rest.len() > MAX_PROTECTED_LEN {
            return false;
        }
        if self.count == 0 {
            self.base = seq;
            self.group_size = self.next_group_size;
        }
        let offset = seq.wrapping_sub(self.base);
        if offset >= SHORT_MASK_SPAN || self.mask & (1 << offset) != 0 {
            return false;
        }
        self.mask |= 1 << offset;
        self.count += 1;
        self.bits ^= bits;
        self.marker_pt ^= marker_pt;
        self.length ^= rest.len() as u16;
        self.timestamp ^= ts;
        self.last_timestamp = ts;
        if self.xor.len() < rest.len() {
            self.xor.resize(rest.len(), 0);
        }
        for (x, b) in self.xor.iter_mut().zip(rest) {
            *x ^= b;
        }
        true
    }

    /// Writes the open group's repair packet (RTP, payload type `pt`,
    /// protecting `protected_ssrc`) into `out` and starts a new group.
    /// A group of fewer than two packets gets none (its repair would be a
    /// copy): returns whether a packet was written.
    pub fn finish(&mut self, pt: u8, protected_ssrc: u32, out: &mut Vec<u8>) -> bool {
        let write = self.count >= 2;
        if write {
            out.clear();
            // RTP header: V=2, CC=1, the protected SSRC as the CSRC.
            out.push(0x81);
            out.push(pt & 0x7f);
            out.extend_from_slice(&self.seq.to_be_bytes());
            out.extend_from_slice(&self.last_timestamp.to_be_bytes());
            out.extend_from_slice(&self.ssrc.to_be_bytes());
            out.extend_from_slice(&protected_ssrc.to_be_bytes());
            // FEC header, short mask (k = 1).
            out.push(self.bits & 0x3f);
            out.push(self.marker_pt);
            out.extend_from_slice(&self.length.to_be_bytes());
            out.extend_from_slice(&self.timestamp.to_be_bytes());
            out.extend_from_slice(&self.base.to_be_bytes());
            let mut m = 0u16;
            for i in 0..SHORT_MASK_SPAN {
                if self.mask & (1 << i) != 0 {
                    m |= 1 << (14 - i);
                }
            }
            out.extend_from_slice(&(0x8000 | m).to_be_bytes());
            out.extend_from_slice(&self.xor);
            self.seq = self.seq.wrapping_add(1);
        }
        self.reset();
        write
    }
}

#[derive(Debug, Default)]
struct RxSlot {
    seq: u16,
    packet: Option<PacketBuf>,
}

/// What a repair packet did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Every protected packet is here: nothing to do.
    Complete,
    /// The one missing packet was rebuilt (in the output buffer).
    Recovered(u16),
    /// More than one is missing (or no longer held): NACKs must do.
    Unrecoverable(usize),
}

/// Receiver side of one link stream: the last [`RECEIVE_RING`] packets
/// (shared views of the received datagrams, not copies), to rebuild a
/// lost one from a repair packet.
#[derive(Debug)]
pub struct FecDecoder {
    slots: Vec<RxSlot>,
}

impl Default for FecDecoder {
    fn default() -> Self {
        FecDecoder {
            slots: (0..RECEIVE_RING).map(|_| RxSlot::default()).collect(),
        }
    }
}

impl FecDecoder {
    fn index(seq: u16) -> usize {
        usize::from(seq) & (RECEIVE_RING - 1)
    }

    /// Remembers a received (or recovered) packet of the stream: the whole
    /// plain RTP packet.
    pub fn store(&mut self, seq: u16, packet: &PacketBuf) {
        let slot = &mut self.slots[Self::index(seq)];
        slot.seq = seq;
        slot.packet = Some(packet.clone());
    }

    fn get(&self, seq: u16) -> Option<&[u8]> {
        let slot = &self.slots[Self::index(seq)];
        match &slot.packet {
            Some(p) if slot.seq == seq => Some(p.as_slice()),
            _ => None,
        }
    }

    /// Whether `seq` is held.
    pub fn has(&self, seq: u16) -> bool {
        self.get(seq).is_some()
    }

    /// Rebuilds the one protected packet of `fec` that is not held, if
    /// exactly one is missing, as a plain RTP packet with SSRC
    /// `fec.protected_ssrc` in `out`. `out` is cleared first and keeps its
    /// capacity.
    pub fn recover(&self, fec: &FecPacket<'_>, out: &mut Vec<u8>) -> Result<Recovery, FecError> {
        let mut missing = None;
        let mut n_missing = 0;
        for seq in fec.protected() {
            if !self.has(seq) {
                n_missing += 1;
                missing = Some(seq);
            }
        }
        let Some(lost) = missing else {
            return Ok(Recovery::Complete);
        };
        if n_missing > 1 {
            return Ok(Recovery::Unrecoverable(n_missing));
        }
        let (mut bits, mut marker_pt, mut length, mut ts) =
            (fec.bits, fec.marker_pt, fec.length, fec.timestamp);
        for seq in fec.protected().filter(|s| *s != lost) {
            let Some((b, m, t, rest)) = self.get(seq).and_then(protected_fields) else {
                return Ok(Recovery::Unrecoverable(1));
            };
            bits ^= b;
            marker_pt ^= m;
            length ^= rest.len() as u16;
            ts ^= t;
        }
        let len = usize::from(length);
        if len > fec.repair.len() {
            return Err(FecError::Length {
                len,
                have: fec.repair.len(),
            });
        }
        out.clear();
        out.push(0x80 | (bits & 0x3f));
        out.push(marker_pt);
        out.extend_from_slice(&lost.to_be_bytes());
        out.extend_from_slice(&ts.to_be_bytes());
        out.extend_from_slice(&fec.protected_ssrc.to_be_bytes());
        out.extend_from_slice(&fec.repair[..len]);
        for seq in fec.protected().filter(|s| *s != lost) {
            if let Some((_, _, _, rest)) = self.get(seq).and_then(protected_fields) {
                for (x, b) in out[FIXED_HEADER_LEN..].iter_mut().zip(rest) {
                    *x ^= b;
                }
            }
        }
        Ok(Recovery::Recovered(lost))
    }

    /// Forgets every packet (the stream's source changed).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.packet = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::rtp::write_header;

    const PT: u8 = 118;

    fn media(seq: u16, len: usize, marker: bool) -> Vec<u8> {
        let mut p = Vec::new();
        write_header(
            &mut p,
            marker,
            96,
            seq,
            1000 + u32::from(seq) * 3000,
            0xabcd,
        );
        p.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seq as u8)));
        p
    }

    /// Encodes `packets` as one group; returns the repair packet.
    fn encode(packets: &[Vec<u8>]) -> Vec<u8> {
        let mut enc = FecEncoder::new(0xfec0_0001);
        for p in packets {
            assert!(enc.push(p));
        }
        let mut out = Vec::new();
        assert!(enc.finish(PT, 0xabcd, &mut out));
        out
    }

    #[test]
    fn recovers_any_single_lost_packet_of_a_group() {
        let packets: Vec<Vec<u8>> = (0..4u16)
            .map(|i| media(100 + i, 200 + 97 * usize::from(i), i == 3))
            .collect();
        let repair = encode(&packets);
        let fec = FecPacket::parse(&repair).expect("parses");
        assert_eq!(fec.protected_ssrc, 0xabcd);
        assert_eq!(fec.protected().collect::<Vec<_>>(), [100, 101, 102, 103]);
        assert_eq!(fec.last(), 103);
        for lost in 0..4 {
            let mut dec = FecDecoder::default();
            for (i, p) in packets.iter().enumerate() {
                if i != lost {
                    dec.store(100 + i as u16, &PacketBuf::copy_from(p));
                }
            }
            let mut out = Vec::new();
            assert_eq!(
                dec.recover(&fec, &mut out),
                Ok(Recovery::Recovered(100 + lost as u16))
            );
            assert_eq!(out, packets[lost], "packet {lost} rebuilt bit for bit");
            let h = RtpHeader::parse(&out).expect("valid RTP");
            assert_eq!(h.marker, lost == 3);
        }
    }

    /// The receiver reads each group from its mask: groups of 2, 4 and 8,
    /// and sizes changed while a group is open (taking effect at the next
    /// group), all rebuild any one lost packet, with no receiver setting.
    #[test]
    fn any_group_size_decodes_and_sizes_change_mid_stream() {
        let mut enc = FecEncoder::new(0xfec0_0002);
        // (size set before packet i) for a stream of 60 packets.
        let sizes = [(0u16, 2usize), (10, 8), (26, 4), (30, 8), (44, 2), (50, 3)];
        let packets: Vec<Vec<u8>> = (0..60u16)
            .map(|i| {
                media(
                    65500u16.wrapping_add(i),
                    100 + usize::from(i) * 7,
                    i % 5 == 0,
                )
            })
            .collect();
        let mut repairs = Vec::new();
        let mut groups = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            if let Some((_, n)) = sizes.iter().find(|(at, _)| usize::from(*at) == i) {
                enc.set_group_size(*n);
            }
            assert!(enc.push(p));
            if enc.is_full() {
                let mut out = Vec::new();
                assert!(enc.finish(PT, 0xabcd, &mut out));
                repairs.push(out);
            }
        }
        for r in &repairs {
            let fec = FecPacket::parse(r).expect("parses");
            let seqs: Vec<u16> = fec.protected().collect();
            groups.push(seqs.len());
            for lost in &seqs {
                let mut dec = FecDecoder::default();
                for (i, p) in packets.iter().enumerate() {
                    let seq = 65500u16.wrapping_add(i as u16);
                    if seq != *lost {
                        dec.store(seq, &PacketBuf::copy_from(p));
                    }
                }
                let mut out = Vec::new();
                assert_eq!(dec.recover(&fec, &mut out), Ok(Recovery::Recovered(*lost)));
                let i = usize::from(lost.wrapping_sub(65500));
                assert_eq!(out, packets[i], "group {seqs:?}, lost {lost}");
            }
        }
        // Sizes set between groups apply at once; 2 set at 44, inside the
        // group of 8 opened at 38, applies from 46 on; 3 is legal too.
        assert_eq!(
            groups,
            [2, 2, 2, 2, 2, 8, 8, 4, 8, 8, 2, 2, 3, 3, 3],
            "group sizes"
        );
    }

    #[test]
    fn group_size_follows_loss_with_hysteresis() {
        let mut n = GROUP_SIZE;
        let mut seen = Vec::new();
        for loss in [
            0.0, 0.03, 0.045, 0.05, 0.10, 0.14, 0.15, 0.30, 0.13, 0.11, 0.05, 0.039,
        ] {
            n = group_size_for_loss(loss, n);
            seen.push(n);
        }
        assert_eq!(seen, [8, 8, 8, 4, 4, 4, 2, 2, 2, 4, 4, 8]);
        // Out-of-range sizes are clamped, and so is the encoder's.
        assert_eq!(group_size_for_loss(0.0, 100), MAX_GROUP_SIZE);
        let mut enc = FecEncoder::new(1);
        enc.set_group_size(1);
        assert_eq!(enc.next_group_size(), MIN_GROUP_SIZE);
        enc.set_group_size(16);
        assert_eq!(enc.next_group_size(), MAX_GROUP_SIZE);
    }

    #[test]
    fn loss_before_fec_inverts_the_residual() {
        for n in [2, 4, 8] {
            for p in [0.0, 0.01, 0.05, 0.2, 0.5] {
                let r = residual_loss(p, n);
                assert!((loss_before_fec(r, n) - p).abs() < 1e-6, "n {n} p {p}");
            }
        }
        // 20 % loss: groups of 4 leave 11.8 %, of 2 7.2 %, of 8 16.6 %.
        assert!((residual_loss(0.2, 4) - 0.1181).abs() < 1e-3);
        assert!((residual_loss(0.2, 2) - 0.072).abs() < 1e-3);
        assert!((residual_loss(0.2, 8) - 0.1664).abs() < 1e-3);
    }

    #[test]
    fn a_group_open_too_long_is_stale() {
        let t0 = Instant::now();
        let mut enc = FecEncoder::new(1);
        assert!(!enc.is_stale(t0, Duration::from_millis(20)));
        assert!(enc.push_at(t0, &media(1, 10, false)));
        assert!(enc.push_at(t0 + Duration::from_millis(15), &media(2, 10, false)));
        assert!(!enc.is_stale(t0 + Duration::from_millis(19), Duration::from_millis(20)));
        assert!(enc.is_stale(t0 + Duration::from_millis(20), Duration::from_millis(20)));
        let mut out = Vec::new();
        assert!(enc.finish(PT, 9, &mut out));
        assert!(!enc.is_stale(t0 + Duration::from_millis(40), Duration::from_millis(20)));
    }

    #[test]
    fn cannot_recover_two_lost_packets() {
        let packets: Vec<Vec<u8>> = (0..4u16).map(|i| media(7 + i, 300, false)).collect();
        let repair = encode(&packets);
        let fec = FecPacket::parse(&repair).expect("parses");
        let mut dec = FecDecoder::default();
        dec.store(7, &PacketBuf::copy_from(&packets[0]));
        dec.store(9, &PacketBuf::copy_from(&packets[2]));
        let mut out = Vec::new();
        assert_eq!(dec.recover(&fec, &mut out), Ok(Recovery::Unrecoverable(2)));
        // With all of them there, nothing to do.
        dec.store(8, &PacketBuf::copy_from(&packets[1]));
        dec.store(10, &PacketBuf::copy_from(&packets[3]));
        assert_eq!(dec.recover(&fec, &mut out), Ok(Recovery::Complete));
    }

    #[test]
    fn groups_close_at_the_mask_edge_and_skip_old_packets() {
        let mut enc = FecEncoder::new(1);
        assert!(enc.push(&media(65530, 50, false)));
        // Across the sequence wrap, with a hole.
        assert!(enc.push(&media(2, 60, false)));
        assert!(!enc.push(&media(65529, 50, false)), "older than the group");
        assert!(!enc.push(&media(2, 60, false)), "already in it");
        assert!(enc.must_close_before(65530u16.wrapping_add(15)));
        assert!(!enc.must_close_before(65530u16.wrapping_add(14)));
        let mut out = Vec::new();
        assert!(enc.finish(PT, 9, &mut out));
        let fec = FecPacket::parse(&out).expect("parses");
        assert_eq!(fec.protected().collect::<Vec<_>>(), [65530, 2]);
        // A lone packet gets no repair packet.
        assert!(enc.push(&media(3, 60, false)));
        assert!(!enc.finish(PT, 9, &mut out));
        assert_eq!(enc.pending(), 0);
    }

    #[test]
    fn long_masks_parse() {
        // A 46-bit mask protecting base + 0 and base + 40.
        let mut p = Vec::new();
        write_header(&mut p, false, PT, 1, 0, 77);
        p[0] |= 1;
        p.extend_from_slice(&5u32.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
        p.extend_from_slice(&0x4000u16.to_be_bytes()); // k = 0, bit 0
        p.extend_from_slice(&(0x8000_0000u32 | (1 << (30 - 25))).to_be_bytes());
        p.extend_from_slice(&[1, 2, 3]);
        let fec = FecPacket::parse(&p).expect("parses");
        assert_eq!(fec.protected().collect::<Vec<_>>(), [10, 50]);
        assert_eq!(fec.repair, &[1, 2, 3]);
        // The 110-bit form.
        let mut q = p[..12 + 4 + 12].to_vec();
        q.extend_from_slice(&0u32.to_be_bytes()); // k = 0, no bits
        q.extend_from_slice(&1u64.to_be_bytes()); // bit 109
        let fec = FecPacket::parse(&q).expect("parses");
        assert_eq!(fec.protected().collect::<Vec<_>>(), [10, 10 + 109]);
    }

    #[test]
    fn malformed_repair_packets_are_typed_errors() {
        let packets: Vec<Vec<u8>> = (0..3u16).map(|i| media(i, 100, false)).collect();
        let good = encode(&packets);
        assert_eq!(FecPacket::parse(&good[..3]), Err(FecError::Rtp));
        assert_eq!(FecPacket::parse(&good[..20]), Err(FecError::Truncated));
        let mut no_csrc = good.clone();
        no_csrc[0] = 0x80;
        assert!(matches!(
            FecPacket::parse(&no_csrc),
            Err(FecError::SsrcCount(0) | FecError::Truncated)
        ));
        let mut r_bit = good.clone();
        r_bit[16] |= 0x80;
        assert_eq!(FecPacket::parse(&r_bit), Err(FecError::Unsupported));
        let mut empty = good.clone();
        empty[26] = 0x80;
        empty[27] = 0;
        assert_eq!(FecPacket::parse(&empty), Err(FecError::EmptyMask));
        // A length recovery that claims more than the repair payload holds.
        let mut long = good.clone();
        long[18] ^= 0x40;
        let fec = FecPacket::parse(&long).expect("parses");
        let mut dec = FecDecoder::default();
        dec.store(0, &PacketBuf::copy_from(&packets[0]));
        dec.store(1, &PacketBuf::copy_from(&packets[1]));
        let mut out = Vec::new();
        assert!(matches!(
            dec.recover(&fec, &mut out),
            Err(FecError::Length { .. })
        ));
        // Every truncation and random bytes fail cleanly.
        for n in 0..good.len() {
            let _ = FecPacket::parse(&good[..n]);
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut dec = FecDecoder::default();
        for i in 0..20u16 {
            dec.store(i, &PacketBuf::copy_from(&media(i, 40, false)));
        }
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let n = (x % 96) as usize;
            let mut buf = Vec::with_capacity(n);
            for _ in 0..n {
                buf.push(crate::sfu::xorshift(&mut x) as u8);
            }
            if let Some(b) = buf.first_mut() {
                *b = 0x81 | (*b & 0x30);
            }
            if buf.len() > 24 {
                buf[16] &= 0x3f;
                buf[24] = 0;
            }
            if let Ok(fec) = FecPacket::parse(&buf) {
                let _ = fec.protected().count();
                let _ = fec.last();
                let _ = dec.recover(&fec, &mut out);
            }
        }
    }
}
