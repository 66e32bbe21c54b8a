//! RTCP: compound-packet iteration (RFC 3550 §6), the feedback messages the
//! relay acts on (RFC 4585 NACK/PLI, RFC 5104 FIR, REMB), and writers for the
//! packets it originates.
//!
//! Parsing is zero-copy: variable-length parts (report blocks, NACK pairs, FIR
//! entries, SSRC lists) are exposed as iterators over the borrowed bytes.
//! RFC 5506 reduced-size RTCP is accepted, so a compound packet need not start
//! with SR/RR.

use std::iter::FusedIterator;

use super::PacketError;

/// Sender report.
pub const PT_SR: u8 = 200;
/// Receiver report.
pub const PT_RR: u8 = 201;
/// Source description.
pub const PT_SDES: u8 = 202;
/// Goodbye.
pub const PT_BYE: u8 = 203;
/// Application-defined.
pub const PT_APP: u8 = 204;
/// Transport-layer feedback (RFC 4585): NACK, TWCC.
pub const PT_RTPFB: u8 = 205;
/// Payload-specific feedback (RFC 4585): PLI, FIR, REMB.
pub const PT_PSFB: u8 = 206;
/// Extended reports (RFC 3611).
pub const PT_XR: u8 = 207;

/// FMT of a generic NACK in an RTPFB packet.
pub const FMT_NACK: u8 = 1;
/// FMT of transport-wide congestion control feedback in an RTPFB packet.
pub const FMT_TWCC: u8 = 15;
/// FMT of a picture loss indication in a PSFB packet.
pub const FMT_PLI: u8 = 1;
/// FMT of a full intra request in a PSFB packet.
pub const FMT_FIR: u8 = 4;
/// FMT of application-layer feedback (REMB) in a PSFB packet.
pub const FMT_AFB: u8 = 15;

/// Size of one reception report block.
const REPORT_BLOCK_LEN: usize = 24;
/// Report blocks one SR/RR can carry (5-bit count).
const MAX_BLOCKS: usize = 31;

/// One reception report (RFC 3550 §6.4.1): how a receiver saw one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReportBlock {
    /// The source this block reports on.
    pub ssrc: u32,
    /// Fraction lost since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// Cumulative packets lost (24-bit signed; negative with duplicates).
    /// Writers clamp it to the 24-bit range.
    pub cumulative_lost: i32,
    /// Extended highest sequence number received (cycles in the top 16 bits).
    pub highest_seq: u32,
    /// Interarrival jitter in timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the NTP timestamp of the last SR received (LSR).
    pub last_sr: u32,
    /// Delay since that SR, in 1/65536 s (DLSR).
    pub delay_since_last_sr: u32,
}

impl ReportBlock {
    fn from_bytes(b: &[u8; REPORT_BLOCK_LEN]) -> Self {
        ReportBlock {
            ssrc: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            fraction_lost: b[4],
            // Place the 24 bits high, then an arithmetic shift sign-extends.
            cumulative_lost: i32::from_be_bytes([b[5], b[6], b[7], 0]) >> 8,
            highest_seq: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            jitter: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
            last_sr: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
            delay_since_last_sr: u32::from_be_bytes([b[20], b[21], b[22], b[23]]),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        let lost = self.cumulative_lost.clamp(-0x80_0000, 0x7f_ffff);
        let [l0, l1, l2, _] = (lost << 8).to_be_bytes();
        out.extend_from_slice(&[self.fraction_lost, l0, l1, l2]);
        out.extend_from_slice(&self.highest_seq.to_be_bytes());
        out.extend_from_slice(&self.jitter.to_be_bytes());
        out.extend_from_slice(&self.last_sr.to_be_bytes());
        out.extend_from_slice(&self.delay_since_last_sr.to_be_bytes());
    }
}

/// The report blocks of an SR or RR, decoded lazily from the packet bytes.
#[derive(Debug, Clone)]
pub struct ReportBlocks<'a> {
    bytes: &'a [u8],
}

impl<'a> ReportBlocks<'a> {
    /// Takes exactly `count` blocks from the front of `body`.
    fn take(body: &'a [u8], count: u8, what: &'static str) -> Result<Self, PacketError> {
        let need = REPORT_BLOCK_LEN * usize::from(count);
        match body.get(..need) {
            Some(bytes) => Ok(ReportBlocks { bytes }),
            None => Err(PacketError::Truncated {
                what,
                need,
                have: body.len(),
            }),
        }
    }
}

impl Iterator for ReportBlocks<'_> {
    type Item = ReportBlock;

    fn next(&mut self) -> Option<ReportBlock> {
        let (block, rest) = self.bytes.split_first_chunk::<REPORT_BLOCK_LEN>()?;
        self.bytes = rest;
        Some(ReportBlock::from_bytes(block))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.bytes.len() / REPORT_BLOCK_LEN;
        (n, Some(n))
    }
}

impl ExactSizeIterator for ReportBlocks<'_> {}
impl FusedIterator for ReportBlocks<'_> {}

/// Lost sequence numbers of a generic NACK, expanded from its PID+BLP pairs
/// (RFC 4585 §6.2.1) in wire order. Overlapping pairs may repeat a number.
#[derive(Debug, Clone)]
pub struct NackSeqs<'a> {
    fci: &'a [u8],
    pid: u16,
    /// Bit 0: the PID itself; bit i (1..=16): PID + i. Cleared as yielded.
    pending: u32,
}

impl<'a> NackSeqs<'a> {
    fn new(fci: &'a [u8]) -> Self {
        NackSeqs {
            fci,
            pid: 0,
            pending: 0,
        }
    }
}

impl Iterator for NackSeqs<'_> {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        while self.pending == 0 {
            let (pair, rest) = self.fci.split_first_chunk::<4>()?;
            self.fci = rest;
            self.pid = u16::from_be_bytes([pair[0], pair[1]]);
            let blp = u16::from_be_bytes([pair[2], pair[3]]);
            self.pending = 1 | (u32::from(blp) << 1);
        }
        let bit = self.pending.trailing_zeros();
        self.pending &= self.pending - 1;
        // bit <= 16, so the cast is lossless.
        Some(self.pid.wrapping_add(bit as u16))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let pending = self.pending.count_ones() as usize;
        let pairs = self.fci.len() / 4;
        (pending + pairs, Some(pending + pairs * 17))
    }
}

impl FusedIterator for NackSeqs<'_> {}

/// `(ssrc, sequence number)` requests of a FIR (RFC 5104 §4.3.1); the relay
/// answers each new sequence number for a source it forwards.
#[derive(Debug, Clone)]
pub struct FirEntries<'a> {
    fci: &'a [u8],
}

impl Iterator for FirEntries<'_> {
    type Item = (u32, u8);

    fn next(&mut self) -> Option<(u32, u8)> {
        let (entry, rest) = self.fci.split_first_chunk::<8>()?;
        self.fci = rest;
        Some((
            u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]),
            entry[4],
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.fci.len() / 8;
        (n, Some(n))
    }
}

impl ExactSizeIterator for FirEntries<'_> {}
impl FusedIterator for FirEntries<'_> {}

/// A list of SSRCs (BYE sources, REMB feedback targets).
#[derive(Debug, Clone)]
pub struct SsrcList<'a> {
    bytes: &'a [u8],
}

impl<'a> SsrcList<'a> {
    /// Takes exactly `count` SSRCs from the front of `body`.
    fn take(body: &'a [u8], count: usize, what: &'static str) -> Result<Self, PacketError> {
        let need = 4 * count;
        match body.get(..need) {
            Some(bytes) => Ok(SsrcList { bytes }),
            None => Err(PacketError::Truncated {
                what,
                need,
                have: body.len(),
            }),
        }
    }
}

impl Iterator for SsrcList<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let (ssrc, rest) = self.bytes.split_first_chunk::<4>()?;
        self.bytes = rest;
        Some(u32::from_be_bytes(*ssrc))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.bytes.len() / 4;
        (n, Some(n))
    }
}

impl ExactSizeIterator for SsrcList<'_> {}
impl FusedIterator for SsrcList<'_> {}

/// One packet of a compound RTCP packet, decoded only as far as the relay
/// needs; everything else is [`RtcpPacket::Other`] so it can be dropped or
/// forwarded without being understood.
#[derive(Debug, Clone)]
pub enum RtcpPacket<'a> {
    /// Sender report (PT 200).
    SenderReport {
        /// Sender SSRC.
        ssrc: u32,
        /// 64-bit NTP wallclock timestamp.
        ntp: u64,
        /// RTP timestamp matching `ntp`.
        rtp_timestamp: u32,
        /// Packets sent.
        packet_count: u32,
        /// Payload octets sent.
        octet_count: u32,
        /// Reception reports carried by the SR.
        reports: ReportBlocks<'a>,
    },
    /// Receiver report (PT 201).
    ReceiverReport {
        /// Reporter SSRC.
        ssrc: u32,
        /// Reception reports.
        reports: ReportBlocks<'a>,
    },
    /// Generic NACK (PT 205, FMT 1).
    Nack {
        /// SSRC of the receiver asking.
        sender_ssrc: u32,
        /// SSRC of the stream with losses.
        media_ssrc: u32,
        /// Lost sequence numbers.
        lost: NackSeqs<'a>,
    },
    /// Picture loss indication (PT 206, FMT 1).
    Pli {
        /// SSRC of the receiver asking.
        sender_ssrc: u32,
        /// SSRC of the stream that needs a keyframe.
        media_ssrc: u32,
    },
    /// Full intra request (PT 206, FMT 4); targets are in the entries because
    /// the header's media SSRC is 0.
    Fir {
        /// SSRC of the receiver asking.
        sender_ssrc: u32,
        /// `(media ssrc, command sequence number)` pairs.
        entries: FirEntries<'a>,
    },
    /// Receiver estimated maximum bitrate (PT 206, FMT 15, "REMB").
    Remb {
        /// SSRC of the estimating receiver.
        sender_ssrc: u32,
        /// Estimated bitrate; saturates at `u64::MAX` on absurd exponents.
        bitrate_bps: u64,
        /// Streams the estimate applies to.
        ssrcs: SsrcList<'a>,
    },
    /// Goodbye (PT 203); the optional reason is ignored.
    Bye {
        /// Sources leaving.
        ssrcs: SsrcList<'a>,
    },
    /// Anything else: SDES, APP, XR, TWCC (205/15), non-REMB AFB, unknown types.
    Other {
        /// The packet type byte.
        packet_type: u8,
        /// The 5-bit count/FMT field.
        fmt: u8,
    },
}

/// Iterator over a compound RTCP packet; see [`iter`].
#[derive(Debug, Clone)]
pub struct RtcpIter<'a> {
    rest: &'a [u8],
}

/// Walks a (possibly compound) RTCP packet one sub-packet at a time, so a
/// malformed tail does not hide the valid packets in front of it.
///
/// Each item is a `Result`; after the first `Err` the iterator ends. An empty
/// buffer yields nothing.
pub fn iter(buf: &[u8]) -> RtcpIter<'_> {
    RtcpIter { rest: buf }
}

impl<'a> Iterator for RtcpIter<'a> {
    type Item = Result<RtcpPacket<'a>, PacketError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match parse_one(self.rest) {
            Ok((packet, rest)) => {
                self.rest = rest;
                Some(Ok(packet))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

impl FusedIterator for RtcpIter<'_> {}

/// Parses the first packet of `buf`, returning it and the remainder.
fn parse_one(buf: &[u8]) -> Result<(RtcpPacket<'_>, &[u8]), PacketError> {
    let Some(header) = buf.first_chunk::<4>() else {
        return Err(PacketError::Truncated {
            what: "RTCP header",
            need: 4,
            have: buf.len(),
        });
    };
    let version = header[0] >> 6;
    if version != 2 {
        return Err(PacketError::BadVersion(version));
    }
    let padded = header[0] & 0x20 != 0;
    let count = header[0] & 0x1f;
    let packet_type = header[1];
    let total = (usize::from(u16::from_be_bytes([header[2], header[3]])) + 1) * 4;
    let Some((packet, rest)) = buf.split_at_checked(total) else {
        return Err(PacketError::Truncated {
            what: "RTCP packet",
            need: total,
            have: buf.len(),
        });
    };
    let mut body = packet.get(4..).unwrap_or_default();
    if padded {
        let padding = usize::from(packet.last().copied().unwrap_or(0));
        if padding == 0 || padding > body.len() {
            return Err(PacketError::BadPadding {
                what: "RTCP packet",
                padding,
                available: body.len(),
            });
        }
        body = body
            .get(..body.len().saturating_sub(padding))
            .unwrap_or_default();
    }
    Ok((parse_body(packet_type, count, body)?, rest))
}

/// Decodes a packet body (after the 4-byte header, padding removed).
fn parse_body(packet_type: u8, count: u8, body: &[u8]) -> Result<RtcpPacket<'_>, PacketError> {
    match (packet_type, count) {
        (PT_SR, _) => {
            let Some((info, blocks)) = body.split_first_chunk::<24>() else {
                return Err(PacketError::Truncated {
                    what: "RTCP SR sender info",
                    need: 24,
                    have: body.len(),
                });
            };
            Ok(RtcpPacket::SenderReport {
                ssrc: u32::from_be_bytes([info[0], info[1], info[2], info[3]]),
                ntp: u64::from_be_bytes([
                    info[4], info[5], info[6], info[7], info[8], info[9], info[10], info[11],
                ]),
                rtp_timestamp: u32::from_be_bytes([info[12], info[13], info[14], info[15]]),
                packet_count: u32::from_be_bytes([info[16], info[17], info[18], info[19]]),
                octet_count: u32::from_be_bytes([info[20], info[21], info[22], info[23]]),
                reports: ReportBlocks::take(blocks, count, "RTCP SR report blocks")?,
            })
        }
        (PT_RR, _) => {
            let Some((ssrc, blocks)) = body.split_first_chunk::<4>() else {
                return Err(PacketError::Truncated {
                    what: "RTCP RR reporter SSRC",
                    need: 4,
                    have: body.len(),
                });
            };
            Ok(RtcpPacket::ReceiverReport {
                ssrc: u32::from_be_bytes(*ssrc),
                reports: ReportBlocks::take(blocks, count, "RTCP RR report blocks")?,
            })
        }
        (PT_BYE, _) => Ok(RtcpPacket::Bye {
            ssrcs: SsrcList::take(body, usize::from(count), "RTCP BYE SSRC list")?,
        }),
        (PT_RTPFB, FMT_NACK) => {
            let (sender_ssrc, media_ssrc, fci) = feedback_ids(body, "RTCP NACK")?;
            Ok(RtcpPacket::Nack {
                sender_ssrc,
                media_ssrc,
                lost: NackSeqs::new(fci),
            })
        }
        (PT_PSFB, FMT_PLI) => {
            let (sender_ssrc, media_ssrc, _) = feedback_ids(body, "RTCP PLI")?;
            Ok(RtcpPacket::Pli {
                sender_ssrc,
                media_ssrc,
            })
        }
        (PT_PSFB, FMT_FIR) => {
            let (sender_ssrc, _, fci) = feedback_ids(body, "RTCP FIR")?;
            Ok(RtcpPacket::Fir {
                sender_ssrc,
                entries: FirEntries { fci },
            })
        }
        (PT_PSFB, FMT_AFB) => {
            let (sender_ssrc, _, fci) = feedback_ids(body, "RTCP AFB")?;
            parse_remb(sender_ssrc, fci)
        }
        _ => Ok(RtcpPacket::Other {
            packet_type,
            fmt: count,
        }),
    }
}

/// Splits the sender and media SSRC common to all RFC 4585 feedback packets
/// from the feedback control information.
fn feedback_ids<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<(u32, u32, &'a [u8]), PacketError> {
    let Some((ids, fci)) = body.split_first_chunk::<8>() else {
        return Err(PacketError::Truncated {
            what,
            need: 8,
            have: body.len(),
        });
    };
    Ok((
        u32::from_be_bytes([ids[0], ids[1], ids[2], ids[3]]),
        u32::from_be_bytes([ids[4], ids[5], ids[6], ids[7]]),
        fci,
    ))
}

/// Decodes draft-alvestrand-rmcat-remb; other AFB payloads are `Other`.
fn parse_remb(sender_ssrc: u32, fci: &[u8]) -> Result<RtcpPacket<'_>, PacketError> {
    let Some((fixed, list)) = fci.split_first_chunk::<8>() else {
        return Ok(RtcpPacket::Other {
            packet_type: PT_PSFB,
            fmt: FMT_AFB,
        });
    };
    if fixed[..4] != *b"REMB" {
        return Ok(RtcpPacket::Other {
            packet_type: PT_PSFB,
            fmt: FMT_AFB,
        });
    }
    let num_ssrc = usize::from(fixed[4]);
    let exp = u32::from(fixed[5] >> 2);
    let mantissa = u64::from(u32::from_be_bytes([0, fixed[5] & 0x03, fixed[6], fixed[7]]));
    // exp < 64, so the shift itself is defined; detect bits shifted out.
    let shifted = mantissa << exp;
    let bitrate_bps = if shifted >> exp == mantissa {
        shifted
    } else {
        u64::MAX
    };
    Ok(RtcpPacket::Remb {
        sender_ssrc,
        bitrate_bps,
        ssrcs: SsrcList::take(list, num_ssrc, "RTCP REMB SSRC list")?,
    })
}

/// Appends the 4-byte common header for a packet of `total_len` bytes.
fn push_header(out: &mut Vec<u8>, count: u8, packet_type: u8, total_len: usize) {
    let words = u16::try_from((total_len / 4).saturating_sub(1)).unwrap_or(u16::MAX);
    out.push(0x80 | (count & 0x1f));
    out.push(packet_type);
    out.extend_from_slice(&words.to_be_bytes());
}

/// Appends a generic NACK asking `media_ssrc` to resend `lost`.
///
/// `lost` may be unsorted, contain duplicates and span the 16-bit wrap: the
/// numbers are ordered from the start of the smallest circular window that
/// holds them all (so 65534, 65535, 0, 3 is one PID+BLP pair with PID 65534)
/// and packed greedily into as few pairs as that order allows. Uses an 8 KiB
/// on-stack bitmap, no heap beyond `out`. Writes nothing if `lost` is empty,
/// since a NACK without FCI is meaningless.
pub fn write_nack(out: &mut Vec<u8>, sender_ssrc: u32, media_ssrc: u32, lost: &[u16]) {
    if lost.is_empty() {
        return;
    }
    let mut set = SeqSet::new();
    for &seq in lost {
        set.insert(seq);
    }
    let start = set.start_after_largest_gap();

    let header_at = out.len();
    push_header(out, FMT_NACK, PT_RTPFB, 12); // length patched below
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.extend_from_slice(&media_ssrc.to_be_bytes());
    let mut pairs = 0usize;
    let mut from = 0u32;
    while let Some(offset) = set.next_from(start, from) {
        let pid = start.wrapping_add(offset as u16);
        let mut blp = 0u16;
        for i in 1..=16u16 {
            if offset + u32::from(i) < SEQ_SPACE && set.contains(pid.wrapping_add(i)) {
                blp |= 1 << (i - 1);
            }
        }
        out.extend_from_slice(&pid.to_be_bytes());
        out.extend_from_slice(&blp.to_be_bytes());
        pairs += 1;
        from = offset + 17;
    }
    // At most 65536 / 17 + 1 pairs, far below the 16-bit length limit.
    let words = u16::try_from(2 + pairs).unwrap_or(u16::MAX);
    if let Some(len) = out.get_mut(header_at + 2..header_at + 4) {
        len.copy_from_slice(&words.to_be_bytes());
    }
}

/// Number of distinct RTP sequence numbers.
const SEQ_SPACE: u32 = 1 << 16;

/// A set of sequence numbers as a fixed bitmap, for allocation-free sorting.
struct SeqSet([u64; 1024]);

impl SeqSet {
    fn new() -> Self {
        SeqSet([0; 1024])
    }

    fn insert(&mut self, seq: u16) {
        if let Some(word) = self.0.get_mut(usize::from(seq >> 6)) {
            *word |= 1 << (seq & 63);
        }
    }

    fn contains(&self, seq: u16) -> bool {
        self.0
            .get(usize::from(seq >> 6))
            .is_some_and(|word| word >> (seq & 63) & 1 == 1)
    }

    /// Smallest `d >= from` (and `< 65536`) with `start + d` (wrapping) in the set.
    fn next_from(&self, start: u16, mut from: u32) -> Option<u32> {
        while from < SEQ_SPACE {
            let seq = start.wrapping_add(from as u16);
            let bit = u32::from(seq & 63);
            let word = self.0.get(usize::from(seq >> 6)).copied().unwrap_or(0) >> bit;
            if word != 0 {
                let found = from + word.trailing_zeros();
                return (found < SEQ_SPACE).then_some(found);
            }
            from += 64 - bit;
        }
        None
    }

    /// The member that follows the largest circular gap: where a sorted,
    /// wrap-aware listing of the set starts. Ties prefer numeric order.
    fn start_after_largest_gap(&self) -> u16 {
        let Some(first) = self.next_from(0, 0) else {
            return 0;
        };
        let (mut prev, mut best_gap, mut best_start) = (first, 0, first);
        while let Some(seq) = self.next_from(0, prev + 1) {
            if seq - prev > best_gap {
                best_gap = seq - prev;
                best_start = seq;
            }
            prev = seq;
        }
        if first + SEQ_SPACE - prev >= best_gap {
            best_start = first;
        }
        best_start as u16
    }
}

/// Appends a picture loss indication asking `media_ssrc` for a keyframe.
pub fn write_pli(out: &mut Vec<u8>, sender_ssrc: u32, media_ssrc: u32) {
    push_header(out, FMT_PLI, PT_PSFB, 12);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.extend_from_slice(&media_ssrc.to_be_bytes());
}

/// Appends a full intra request for `media_ssrc`. The header's media SSRC is
/// 0 as RFC 5104 §4.3.1.2 requires; the target goes in the FCI entry. Bump
/// `seq_nr` for each new request so the sender does not treat it as a repeat.
pub fn write_fir(out: &mut Vec<u8>, sender_ssrc: u32, media_ssrc: u32, seq_nr: u8) {
    push_header(out, FMT_FIR, PT_PSFB, 20);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&media_ssrc.to_be_bytes());
    out.extend_from_slice(&[seq_nr, 0, 0, 0]);
}

fn write_rr_packet(out: &mut Vec<u8>, ssrc: u32, blocks: &[ReportBlock]) {
    let count = u8::try_from(blocks.len()).unwrap_or(0);
    push_header(out, count, PT_RR, 8 + REPORT_BLOCK_LEN * blocks.len());
    out.extend_from_slice(&ssrc.to_be_bytes());
    for block in blocks {
        block.write(out);
    }
}

/// Appends a receiver report. More than 31 blocks do not fit one RR, so the
/// rest go into further RR packets, forming a compound packet.
pub fn write_receiver_report(out: &mut Vec<u8>, ssrc: u32, blocks: &[ReportBlock]) {
    let mut chunks = blocks.chunks(MAX_BLOCKS);
    write_rr_packet(out, ssrc, chunks.next().unwrap_or(&[]));
    for chunk in chunks {
        write_rr_packet(out, ssrc, chunk);
    }
}

/// Appends a sender report. Blocks beyond the 31 an SR can hold follow in
/// RR packets from the same SSRC (RFC 3550 §6.4.2).
pub fn write_sender_report(
    out: &mut Vec<u8>,
    ssrc: u32,
    ntp: u64,
    rtp_timestamp: u32,
    packet_count: u32,
    octet_count: u32,
    blocks: &[ReportBlock],
) {
    let mut chunks = blocks.chunks(MAX_BLOCKS);
    let first = chunks.next().unwrap_or(&[]);
    let count = u8::try_from(first.len()).unwrap_or(0);
    push_header(out, count, PT_SR, 28 + REPORT_BLOCK_LEN * first.len());
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.extend_from_slice(&ntp.to_be_bytes());
    out.extend_from_slice(&rtp_timestamp.to_be_bytes());
    out.extend_from_slice(&packet_count.to_be_bytes());
    out.extend_from_slice(&octet_count.to_be_bytes());
    for block in first {
        block.write(out);
    }
    for chunk in chunks {
        write_rr_packet(out, ssrc, chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::super::fuzz::samples;
    use super::*;

    fn one(buf: &[u8]) -> RtcpPacket<'_> {
        let mut it = iter(buf);
        let p = it.next().expect("one packet").expect("valid packet");
        assert!(it.next().is_none());
        p
    }

    /// Packet boundaries of a valid compound packet.
    fn boundaries(buf: &[u8]) -> Vec<usize> {
        let mut at = 0;
        let mut out = vec![0];
        while at < buf.len() {
            at += (usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]])) + 1) * 4;
            out.push(at);
        }
        out
    }

    #[test]
    fn compound_sr_sdes() {
        let buf = samples::RTCP_SR_SDES;
        let mut it = iter(buf);
        match it.next().unwrap().unwrap() {
            RtcpPacket::SenderReport {
                ssrc,
                ntp,
                rtp_timestamp,
                packet_count,
                octet_count,
                reports,
            } => {
                assert_eq!(ssrc, 0x1122_3344);
                assert_eq!(ntp, 0xe5a1_b2c3_d4e5_f607);
                assert_eq!(rtp_timestamp, 0x0001_0203);
                assert_eq!(packet_count, 100);
                assert_eq!(octet_count, 16_000);
                assert_eq!(reports.len(), 1);
                let blocks: Vec<_> = reports.collect();
                assert_eq!(
                    blocks,
                    [ReportBlock {
                        ssrc: 0x5566_7788,
                        fraction_lost: 0x40,
                        cumulative_lost: -3,
                        highest_seq: 0x0001_0005,
                        jitter: 37,
                        last_sr: 0xb2c3_d4e5,
                        delay_since_last_sr: 0x0001_0000,
                    }]
                );
            }
            other => panic!("expected SR, got {other:?}"),
        }
        assert!(matches!(
            it.next(),
            Some(Ok(RtcpPacket::Other {
                packet_type: PT_SDES,
                fmt: 1
            }))
        ));
        assert!(it.next().is_none());
        assert!(it.next().is_none());
    }

    #[test]
    fn nack_with_blp() {
        match one(samples::RTCP_NACK) {
            RtcpPacket::Nack {
                sender_ssrc,
                media_ssrc,
                lost,
            } => {
                assert_eq!(sender_ssrc, 0x0102_0304);
                assert_eq!(media_ssrc, 0x0506_0708);
                assert_eq!(lost.collect::<Vec<_>>(), [1000, 1001, 1003, 1016]);
            }
            other => panic!("expected NACK, got {other:?}"),
        }
    }

    #[test]
    fn pli_fir_remb_bye() {
        assert!(matches!(
            one(samples::RTCP_PLI),
            RtcpPacket::Pli {
                sender_ssrc: 0x0102_0304,
                media_ssrc: 0x0506_0708
            }
        ));
        match one(samples::RTCP_FIR) {
            RtcpPacket::Fir {
                sender_ssrc,
                entries,
            } => {
                assert_eq!(sender_ssrc, 0x0102_0304);
                assert_eq!(entries.collect::<Vec<_>>(), [(0x0a0b_0c0d, 7)]);
            }
            other => panic!("expected FIR, got {other:?}"),
        }
        match one(samples::RTCP_REMB) {
            RtcpPacket::Remb {
                sender_ssrc,
                bitrate_bps,
                ssrcs,
            } => {
                assert_eq!(sender_ssrc, 0x0102_0304);
                assert_eq!(bitrate_bps, 1_000_000);
                assert_eq!(ssrcs.collect::<Vec<_>>(), [0x0a0b_0c0d]);
            }
            other => panic!("expected REMB, got {other:?}"),
        }
        match one(samples::RTCP_BYE) {
            RtcpPacket::Bye { ssrcs } => assert_eq!(ssrcs.collect::<Vec<_>>(), [0x1122_3344]),
            other => panic!("expected BYE, got {other:?}"),
        }
    }

    #[test]
    fn remb_saturates_and_non_remb_afb_is_other() {
        let mut buf = samples::RTCP_REMB.to_vec();
        buf[17] = 0xff; // exp 63, mantissa high bits set
        assert!(matches!(
            one(&buf),
            RtcpPacket::Remb {
                bitrate_bps: u64::MAX,
                ..
            }
        ));
        buf[12] = b'X';
        assert!(matches!(
            one(&buf),
            RtcpPacket::Other {
                packet_type: PT_PSFB,
                fmt: FMT_AFB
            }
        ));
    }

    #[test]
    fn every_truncation_errors_except_at_packet_boundaries() {
        for sample in samples::RTCP_ALL {
            let bounds = boundaries(sample);
            for cut in 0..=sample.len() {
                let items: Vec<_> = iter(&sample[..cut]).collect();
                let ok = items.iter().filter(|r| r.is_ok()).count();
                let whole = bounds.iter().filter(|&&b| b > 0 && b <= cut).count();
                assert_eq!(ok, whole, "cut {cut} of {sample:02x?}");
                if bounds.contains(&cut) {
                    assert!(items.iter().all(Result::is_ok), "cut {cut}");
                } else {
                    assert_eq!(items.len(), whole + 1, "cut {cut}");
                    assert!(
                        matches!(items.last(), Some(Err(PacketError::Truncated { .. }))),
                        "cut {cut}: {:?}",
                        items.last()
                    );
                }
            }
        }
    }

    #[test]
    fn bad_version_padding_and_counts() {
        let mut buf = samples::RTCP_PLI.to_vec();
        buf[0] = 0x41;
        let items: Vec<_> = iter(&buf).collect();
        assert_eq!(items.len(), 1);
        assert!(matches!(items[0], Err(PacketError::BadVersion(1))));

        // Padding bit with a zero count byte.
        let mut buf = samples::RTCP_PLI.to_vec();
        buf[0] |= 0x20;
        buf[11] = 0;
        assert!(matches!(
            iter(&buf).next(),
            Some(Err(PacketError::BadPadding { padding: 0, .. }))
        ));
        // Padding that eats the SSRCs leaves a truncated PLI.
        buf[11] = 4;
        assert!(matches!(
            iter(&buf).next(),
            Some(Err(PacketError::Truncated {
                what: "RTCP PLI",
                need: 8,
                have: 4
            }))
        ));
        buf[11] = 9;
        assert!(matches!(
            iter(&buf).next(),
            Some(Err(PacketError::BadPadding {
                padding: 9,
                available: 8,
                ..
            }))
        ));

        // RR announcing more blocks than it holds.
        let mut buf = Vec::new();
        write_receiver_report(&mut buf, 1, &[ReportBlock::default()]);
        buf[0] = 0x82;
        assert!(matches!(
            iter(&buf).next(),
            Some(Err(PacketError::Truncated {
                what: "RTCP RR report blocks",
                need: 48,
                have: 24
            }))
        ));

        // Errors end the iteration even if more bytes follow.
        let mut buf = vec![0x00, 0, 0, 0];
        buf.extend_from_slice(samples::RTCP_PLI);
        assert_eq!(iter(&buf).count(), 1);
        assert_eq!(iter(&[]).count(), 0);
    }

    fn nack_lost(buf: &[u8]) -> Vec<u16> {
        let mut out = Vec::new();
        for item in iter(buf) {
            match item.unwrap() {
                RtcpPacket::Nack { lost, .. } => out.extend(lost),
                other => panic!("expected NACK, got {other:?}"),
            }
        }
        out
    }

    #[test]
    fn nack_round_trip_with_wrap() {
        let mut buf = Vec::new();
        write_nack(&mut buf, 1, 2, &[3, 0, 65535, 65534]);
        assert_eq!(buf.len(), 16, "one PID+BLP pair");
        assert_eq!(&buf[12..14], &65534u16.to_be_bytes());
        assert_eq!(nack_lost(&buf), [65534, 65535, 0, 3]);
        match one(&buf) {
            RtcpPacket::Nack {
                sender_ssrc: 1,
                media_ssrc: 2,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nack_round_trip_spread_losses() {
        // 40 losses, 20 apart: every one needs its own pair, across the wrap.
        let lost: Vec<u16> = (0..40u16).map(|i| 65000u16.wrapping_add(i * 20)).collect();
        let mut shuffled = lost.clone();
        shuffled.reverse();
        shuffled.swap(3, 17);
        shuffled.push(lost[5]); // duplicate
        let mut buf = Vec::new();
        write_nack(&mut buf, 7, 8, &shuffled);
        assert_eq!(buf.len(), 12 + 4 * 40);
        assert_eq!(nack_lost(&buf), lost);

        // Dense run longer than 17: packs 17 per pair.
        let dense: Vec<u16> = (0..40u16).map(|i| 65520u16.wrapping_add(i)).collect();
        let mut buf = Vec::new();
        write_nack(&mut buf, 7, 8, &dense);
        assert_eq!(buf.len(), 12 + 4 * 3);
        assert_eq!(nack_lost(&buf), dense);

        // Writers append and never emit an empty NACK.
        let mut buf = vec![0xaa];
        write_nack(&mut buf, 7, 8, &[]);
        assert_eq!(buf, [0xaa]);
    }

    #[test]
    fn nack_every_sequence_number() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut buf = Vec::new();
        write_nack(&mut buf, 1, 2, &all);
        let got = nack_lost(&buf);
        assert_eq!(got.len(), 65536);
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, all);
    }

    #[test]
    fn pli_fir_writers_round_trip() {
        let mut buf = Vec::new();
        write_pli(&mut buf, 11, 22);
        write_fir(&mut buf, 11, 33, 9);
        assert_eq!(buf.len(), 32);
        let items: Vec<_> = iter(&buf).map(Result::unwrap).collect();
        assert!(matches!(
            items[0],
            RtcpPacket::Pli {
                sender_ssrc: 11,
                media_ssrc: 22
            }
        ));
        match &items[1] {
            RtcpPacket::Fir {
                sender_ssrc: 11,
                entries,
            } => assert_eq!(entries.clone().collect::<Vec<_>>(), [(33, 9)]),
            other => panic!("{other:?}"),
        }
        assert_eq!(&buf[12 + 8..12 + 12], &[0, 0, 0, 0], "FIR media SSRC is 0");
    }

    fn blocks(n: u32) -> Vec<ReportBlock> {
        (0..n)
            .map(|i| ReportBlock {
                ssrc: 1000 + i,
                fraction_lost: i as u8,
                cumulative_lost: if i % 2 == 0 {
                    -(i as i32)
                } else {
                    i as i32 * 1000
                },
                highest_seq: 0x0003_0000 + i,
                jitter: i * 3,
                last_sr: i * 5,
                delay_since_last_sr: i * 7,
            })
            .collect()
    }

    fn collect_reports(buf: &[u8]) -> Vec<ReportBlock> {
        let mut out = Vec::new();
        for item in iter(buf) {
            match item.unwrap() {
                RtcpPacket::SenderReport { reports, .. }
                | RtcpPacket::ReceiverReport { reports, .. } => out.extend(reports),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[test]
    fn receiver_report_round_trip() {
        for n in [0, 1, 31, 32, 70] {
            let want = blocks(n);
            let mut buf = Vec::new();
            write_receiver_report(&mut buf, 0xabcd, &want);
            assert_eq!(collect_reports(&buf), want, "{n} blocks");
            assert!(
                iter(&buf)
                    .all(|p| matches!(p, Ok(RtcpPacket::ReceiverReport { ssrc: 0xabcd, .. })))
            );
        }
    }

    #[test]
    fn sender_report_round_trip() {
        for n in [0, 2, 31, 40] {
            let want = blocks(n);
            let mut buf = Vec::new();
            write_sender_report(&mut buf, 5, 0x0102_0304_0506_0708, 9, 10, 11, &want);
            assert_eq!(collect_reports(&buf), want, "{n} blocks");
            match iter(&buf).next().unwrap().unwrap() {
                RtcpPacket::SenderReport {
                    ssrc: 5,
                    ntp: 0x0102_0304_0506_0708,
                    rtp_timestamp: 9,
                    packet_count: 10,
                    octet_count: 11,
                    reports,
                } => assert_eq!(reports.len(), n.min(31) as usize),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn cumulative_lost_is_clamped_to_24_bits() {
        let mut buf = Vec::new();
        let huge = ReportBlock {
            cumulative_lost: i32::MAX,
            ..ReportBlock::default()
        };
        let tiny = ReportBlock {
            cumulative_lost: i32::MIN,
            ..ReportBlock::default()
        };
        write_receiver_report(&mut buf, 1, &[huge, tiny]);
        let got = collect_reports(&buf);
        assert_eq!(got[0].cumulative_lost, 0x7f_ffff);
        assert_eq!(got[1].cumulative_lost, -0x80_0000);
    }
}
