//! The benchmark's datagrams: a valid RTP packet (12-byte header, no CSRCs or
//! extensions) carrying a payload that looks like VP8 (or, with `--codec`,
//! H.264, VP9 or AV1: a well-formed payload format the node parses), with
//! the benchmark's own fields (magic, run id, sequence number, send
//! timestamp) at a fixed offset.
//!
//! Layout (offsets into the datagram):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 12 | RTP header: V=2, PT, sequence, timestamp, SSRC |
//! | 12 | 12 | codec payload header (keyframe or interframe), zero padded |
//! | 24 | 4 | magic `RBEN` |
//! | 28 | 4 | run id |
//! | 32 | 8 | benchmark sequence number (big endian) |
//! | 40 | 8 | send time, ns since the process-wide `Instant` base (big endian) |
//! | 48 | .. | filler up to the requested size |
//!
//! The node rewrites the RTP header (SSRC, sequence, payload type) but
//! forwards the payload unchanged, so the benchmark fields survive the relay.

/// RTP header length.
pub const RTP_HEADER: usize = 12;
/// Offset of the benchmark fields.
pub const BENCH_OFFSET: usize = RTP_HEADER + 12;
/// Smallest datagram the benchmark can build.
pub const MIN_SIZE: usize = BENCH_OFFSET + 24;
/// Largest datagram (receive buffers are this big).
pub const MAX_SIZE: usize = 1500;
/// Identifies the benchmark's payloads.
pub const MAGIC: [u8; 4] = *b"RBEN";
/// The payload type the publisher sends with.
pub const PAYLOAD_TYPE: u8 = 96;
/// The publisher's SSRC.
pub const SSRC: u32 = 0x5244_4745;
/// A keyframe is sent every this many packets (the first packet is always
/// one), so a subscriber that missed the first still starts receiving.
pub const KEYFRAME_INTERVAL: u64 = 10_000;

/// VP8 payload descriptor (S bit set, partition 0) and a keyframe header:
/// P bit 0, then the keyframe start code 9d 01 2a and a 640x480 size.
const VP8_KEYFRAME: [u8; 11] = [
    0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01,
];
/// VP8 payload descriptor (S bit set) and an interframe header (P bit 1).
const VP8_INTERFRAME: [u8; 4] = [0x10, 0x01, 0x00, 0x00];

/// The codec the publisher's payloads look like (the node checks each
/// packet's payload format and finds keyframes by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Codec {
    /// RFC 7741 payload descriptor, keyframe by the P bit.
    #[default]
    Vp8,
    /// RFC 6184 single NAL units: IDR (type 5) or non-IDR slices (type 1).
    H264,
    /// RFC 9628 descriptor with B and E (and P on interframes).
    Vp9,
    /// The AV1 aggregation header with one OBU: a sequence header starting
    /// a coded video sequence, or a frame.
    Av1,
}

impl Codec {
    /// Every codec, as the node names it.
    #[cfg(test)]
    pub const ALL: [Codec; 4] = [Codec::Vp8, Codec::H264, Codec::Vp9, Codec::Av1];

    /// The name in the node's JSON API.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Vp8 => "vp8",
            Codec::H264 => "h264",
            Codec::Vp9 => "vp9",
            Codec::Av1 => "av1",
        }
    }

    /// The first bytes of a payload (at most 12).
    fn header(self, keyframe: bool) -> &'static [u8] {
        match (self, keyframe) {
            (Codec::Vp8, true) => &VP8_KEYFRAME,
            (Codec::Vp8, false) => &VP8_INTERFRAME,
            (Codec::H264, true) => &[0x65, 0x88, 0x84],
            (Codec::H264, false) => &[0x41, 0x9a, 0x02],
            (Codec::Vp9, true) => &[0x0c, 0x82, 0x49, 0x83, 0x42],
            (Codec::Vp9, false) => &[0x4c, 0x01],
            (Codec::Av1, true) => &[0x18, 0x08, 0x00],
            (Codec::Av1, false) => &[0x10, 0x30],
        }
    }
}

/// The benchmark fields decoded from a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub run: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// Whether packet `seq` of a stream is a keyframe.
pub fn is_keyframe(seq: u64) -> bool {
    is_keyframe_every(seq, KEYFRAME_INTERVAL)
}

/// Whether packet `seq` of a stream with a keyframe every `interval`
/// packets is a keyframe (`interval` 0 counts as 1).
pub fn is_keyframe_every(seq: u64, interval: u64) -> bool {
    seq.is_multiple_of(interval.max(1))
}

/// Writes a complete packet of `buf.len()` bytes (at least [`MIN_SIZE`]):
/// RTP header with sequence number `rtp_seq`, the payload header of `codec`
/// (a keyframe when `keyframe`), and the stamp fields. The filler after the
/// stamp is left as it is (callers reuse buffers).
pub fn build(buf: &mut [u8], codec: Codec, rtp_seq: u16, keyframe: bool, stamp: Stamp) {
    assert!(
        buf.len() >= MIN_SIZE,
        "packet shorter than {MIN_SIZE} bytes"
    );
    buf[0] = 0x80;
    buf[1] = PAYLOAD_TYPE;
    buf[2..4].copy_from_slice(&rtp_seq.to_be_bytes());
    // 90 kHz clock, one "frame" per 10 packets at 3000 ticks a frame.
    let ts = (stamp.seq / 10).wrapping_mul(3000) as u32;
    buf[4..8].copy_from_slice(&ts.to_be_bytes());
    buf[8..12].copy_from_slice(&SSRC.to_be_bytes());
    let header = &mut buf[RTP_HEADER..BENCH_OFFSET];
    header.fill(0);
    let bytes = codec.header(keyframe);
    header[..bytes.len()].copy_from_slice(bytes);
    buf[BENCH_OFFSET..BENCH_OFFSET + 4].copy_from_slice(&MAGIC);
    buf[BENCH_OFFSET + 4..BENCH_OFFSET + 8].copy_from_slice(&stamp.run.to_be_bytes());
    buf[BENCH_OFFSET + 8..BENCH_OFFSET + 16].copy_from_slice(&stamp.seq.to_be_bytes());
    write_time(buf, stamp.sent_ns);
}

/// Overwrites the send timestamp of a built packet (done just before the
/// batch goes out).
pub fn write_time(buf: &mut [u8], sent_ns: u64) {
    buf[BENCH_OFFSET + 16..BENCH_OFFSET + 24].copy_from_slice(&sent_ns.to_be_bytes());
}

/// Decodes the benchmark fields of a received datagram; `None` for anything
/// that is not a benchmark RTP packet (e.g. RTCP from the node).
pub fn parse(d: &[u8]) -> Option<Stamp> {
    if d.len() < MIN_SIZE || d[0] >> 6 != 2 {
        return None;
    }
    // RTCP packet types 200..=206 read as RTP payload types 72..=78.
    if (64..96).contains(&(d[1] & 0x7f)) {
        return None;
    }
    parse_payload(&d[RTP_HEADER..])
}

/// Decodes the benchmark fields from an RTP payload (what a WebRTC stack
/// hands up after SRTP): the VP8 header, then the stamp.
pub fn parse_payload(p: &[u8]) -> Option<Stamp> {
    const AT: usize = BENCH_OFFSET - RTP_HEADER;
    if p.len() < AT + 24 {
        return None;
    }
    let f = &p[AT..AT + 24];
    if f[..4] != MAGIC {
        return None;
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&f[o..o + 8]);
        u64::from_be_bytes(b)
    };
    Some(Stamp {
        run: u32::from_be_bytes([f[4], f[5], f[6], f[7]]),
        seq: u64_at(8),
        sent_ns: u64_at(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_valid_rtp() {
        let mut b = vec![0xaau8; 200];
        build(
            &mut b,
            Codec::Vp8,
            65_535,
            false,
            Stamp {
                run: 1,
                seq: 25,
                sent_ns: 7,
            },
        );
        assert_eq!(b[0], 0x80, "V=2, no padding, extension or CSRCs");
        assert_eq!(b[1], PAYLOAD_TYPE, "PT 96, no marker");
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 65_535);
        assert_eq!(u32::from_be_bytes([b[4], b[5], b[6], b[7]]), 6000);
        assert_eq!(u32::from_be_bytes([b[8], b[9], b[10], b[11]]), SSRC);
        assert_eq!(b.len(), 200);
        assert_eq!(b[199], 0xaa, "filler untouched");
    }

    #[test]
    fn vp8_keyframe_and_interframe() {
        let stamp = Stamp {
            run: 0,
            seq: 0,
            sent_ns: 0,
        };
        let mut k = vec![0u8; MIN_SIZE];
        build(&mut k, Codec::Vp8, 0, true, stamp);
        assert_eq!(k[12], 0x10, "S bit, partition 0");
        assert_eq!(k[13] & 0x01, 0, "P bit 0: keyframe");
        assert_eq!(&k[16..19], &[0x9d, 0x01, 0x2a], "keyframe start code");
        let mut i = vec![0u8; MIN_SIZE];
        build(&mut i, Codec::Vp8, 1, false, stamp);
        assert_eq!(&i[12..14], &[0x10, 0x01], "P bit 1: interframe");
        assert!(is_keyframe(0));
        assert!(!is_keyframe(1));
        assert!(is_keyframe(KEYFRAME_INTERVAL));
        assert!(is_keyframe_every(60, 30));
        assert!(!is_keyframe_every(61, 30));
        assert!(is_keyframe_every(7, 0), "interval 0 counts as 1");
    }

    #[test]
    fn every_codec_builds_well_formed_keyframes_and_interframes() {
        let stamp = Stamp {
            run: 0,
            seq: 0,
            sent_ns: 0,
        };
        for codec in Codec::ALL {
            let node = ridge_sfu::CodecSpec::from_name(codec.name()).expect("a codec of the node");
            for key in [true, false] {
                let mut b = vec![0u8; 200];
                build(&mut b, codec, 1, key, stamp);
                let payload = &b[RTP_HEADER..];
                assert!(node.inspect(payload, true).is_ok(), "{codec:?} key={key}");
                assert_eq!(node.is_keyframe(payload), key, "{codec:?} key={key}");
                assert_eq!(parse(&b), Some(stamp));
            }
        }
    }

    #[test]
    fn stamp_round_trip() {
        let stamp = Stamp {
            run: 0xdead_beef,
            seq: 0x0123_4567_89ab_cdef,
            sent_ns: 42,
        };
        let mut b = vec![0u8; 120];
        build(&mut b, Codec::Vp8, 9, true, stamp);
        assert_eq!(parse(&b), Some(stamp));
        write_time(&mut b, u64::MAX - 1);
        assert_eq!(
            parse(&b),
            Some(Stamp {
                sent_ns: u64::MAX - 1,
                ..stamp
            })
        );
        // The node rewrites the header; the stamp must survive that.
        b[1] = 100;
        b[8..12].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse(&b).map(|s| s.seq), Some(stamp.seq));
    }

    #[test]
    fn parse_rejects_foreign_datagrams() {
        let stamp = Stamp {
            run: 1,
            seq: 1,
            sent_ns: 1,
        };
        let mut b = vec![0u8; 64];
        build(&mut b, Codec::Vp8, 1, false, stamp);
        assert!(parse(&b[..MIN_SIZE - 1]).is_none(), "too short");
        let mut rtcp = b.clone();
        rtcp[1] = 201; // receiver report
        assert!(parse(&rtcp).is_none(), "RTCP");
        let mut v1 = b.clone();
        v1[0] = 0x40;
        assert!(parse(&v1).is_none(), "not version 2");
        let mut other = b.clone();
        other[BENCH_OFFSET] = b'X';
        assert!(parse(&other).is_none(), "no magic");
    }
}
