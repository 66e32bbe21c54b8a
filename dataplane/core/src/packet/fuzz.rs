//! Fuzzing entry points, shared by the cargo-fuzz targets in `dataplane/fuzz`
//! and by a seeded random-input unit test, so that the no-panic guarantee is
//! checked on every `cargo test` and not only when someone runs a fuzzer.
//!
//! Each function drives every accessor and iterator of one parser over
//! arbitrary bytes and asserts invariants that must hold for any input (a
//! panic here is a bug, either in the parser or in the invariant). These
//! functions allocate freely; they are test harnesses, not hot paths.

use std::hint::black_box;

use super::codec::dd::{self, DdStructure, DependencyDescriptor, Dti};
use super::codec::h264::{self, H264Packet, ParameterSets};
use super::codec::vp9::{self, Vp9Descriptor};
use super::codec::{
    Av1Packet, ObuType, Vp8Descriptor, av1_is_keyframe, h264_is_keyframe, vp8_is_keyframe,
    vp9_is_keyframe,
};
use super::rtcp::{self, ReportBlock, RtcpPacket};
use super::rtp::{self, RtpHeader};
use super::stun::{self, StunMessage};
use super::{PacketClass, classify};

/// RTP: header parse, payload, every extension id, audio level, in-place
/// rewrite, and `write_packet` -> `parse` round trip. Also applies the parsed
/// header (and a header forged from the input) to mismatched buffers, since
/// callers may keep a header next to a buffer that changed.
pub fn fuzz_rtp(data: &[u8]) {
    if let Ok(h) = RtpHeader::parse(data) {
        assert!(h.header_len >= rtp::FIXED_HEADER_LEN);
        assert!(h.header_len + h.padding_len <= data.len());
        assert!(h.payload_type < 128);
        let payload = h.payload(data);
        assert_eq!(
            payload.len(),
            data.len() - h.header_len - h.padding_len,
            "payload bounds"
        );
        for id in 0..=u8::MAX {
            if let Some(value) = rtp::find_extension(data, &h, id) {
                assert!(h.has_extension && id != 0);
                assert!(value.len() <= h.header_len);
            }
        }
        for id in 0..16 {
            if let Some((_, level)) = rtp::audio_level(data, &h, id) {
                assert!(level <= 127);
            }
        }

        let mut out = Vec::with_capacity(rtp::FIXED_HEADER_LEN + payload.len());
        rtp::write_packet(
            &mut out,
            h.marker,
            h.payload_type,
            h.sequence,
            h.timestamp,
            h.ssrc,
            payload,
        );
        let back = RtpHeader::parse(&out).expect("written RTP packet parses");
        assert_eq!(
            (
                back.marker,
                back.payload_type,
                back.sequence,
                back.timestamp,
                back.ssrc
            ),
            (h.marker, h.payload_type, h.sequence, h.timestamp, h.ssrc)
        );
        assert_eq!(back.header_len, rtp::FIXED_HEADER_LEN);
        assert_eq!(back.payload(&out), payload);

        let mut copy = data.to_vec();
        let (pt, seq, ts, ssrc) = (
            h.payload_type ^ 0x55,
            !h.sequence,
            h.timestamp.rotate_left(7),
            !h.ssrc,
        );
        rtp::rewrite_header(&mut copy, pt, seq, ts, ssrc).expect("parsed packet is >= 12 bytes");
        let re = RtpHeader::parse(&copy).expect("rewritten packet still parses");
        assert_eq!(
            re,
            RtpHeader {
                payload_type: pt & 0x7f,
                sequence: seq,
                timestamp: ts,
                ssrc,
                ..h
            }
        );
        assert_eq!(re.payload(&copy), payload);

        // The header applied to shorter buffers must not panic.
        for cut in [0, data.len() / 2, data.len().saturating_sub(1)] {
            let part = data.get(..cut).unwrap_or_default();
            black_box(h.payload(part));
            black_box(rtp::find_extension(part, &h, 1));
        }
    }

    let mut copy = data.to_vec();
    let rewritten = rtp::rewrite_header(&mut copy, 1, 2, 3, 4);
    assert_eq!(rewritten.is_ok(), data.len() >= rtp::FIXED_HEADER_LEN);
    if rewritten.is_err() {
        assert_eq!(copy, data, "failed rewrite must not modify");
    }

    // A header with arbitrary field values against arbitrary bytes.
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let forged = RtpHeader {
        marker: byte(0) & 1 == 1,
        payload_type: byte(1),
        sequence: 0,
        timestamp: 0,
        ssrc: 0,
        csrc_count: byte(2),
        has_extension: true,
        header_len: usize::from(byte(3))
            .checked_shl(u32::from(byte(4) % 64))
            .unwrap_or(usize::MAX),
        padding_len: usize::from(byte(5))
            .checked_shl(u32::from(byte(6) % 64))
            .unwrap_or(usize::MAX),
    };
    black_box(forged.payload(data));
    for id in [0, 1, 2, 14, 15, 200, 255] {
        black_box(rtp::find_extension(data, &forged, id));
        black_box(rtp::audio_level(data, &forged, id));
    }
}

/// RTCP: walks the compound packet and every iterator inside it, then checks
/// that the writers round-trip values derived from the input (NACK loss sets
/// including wrap-around, SR/RR report blocks).
pub fn fuzz_rtcp(data: &[u8]) {
    let mut errored = false;
    let mut consumed_items = 0usize;
    for item in rtcp::iter(data) {
        assert!(!errored, "RTCP iterator continued after an error");
        consumed_items += 1;
        match item {
            Ok(packet) => exercise_rtcp(&packet),
            Err(e) => {
                errored = true;
                black_box(e.to_string());
            }
        }
    }
    // Each packet is at least 4 bytes.
    assert!(consumed_items <= data.len() / 4 + 1);

    // NACK writer: the parsed loss set equals the input set.
    let lost: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let mut out = Vec::new();
    rtcp::write_nack(&mut out, 1, 2, &lost);
    if lost.is_empty() {
        assert!(out.is_empty());
    } else {
        let mut want = vec![false; 1 << 16];
        for &s in &lost {
            want[usize::from(s)] = true;
        }
        let mut got = vec![false; 1 << 16];
        let mut packets = 0;
        for item in rtcp::iter(&out) {
            match item.expect("written NACK parses") {
                RtcpPacket::Nack {
                    sender_ssrc: 1,
                    media_ssrc: 2,
                    lost: seqs,
                } => {
                    for s in seqs {
                        assert!(!got[usize::from(s)], "NACK writer repeated {s}");
                        got[usize::from(s)] = true;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
            packets += 1;
        }
        assert_eq!(packets, 1);
        assert!(
            want == got,
            "NACK round trip lost or invented sequence numbers"
        );
        assert!(out.len() <= 12 + 4 * lost.len());
    }

    // Report writers.
    let blocks: Vec<ReportBlock> = data
        .chunks_exact(24)
        .map(|c| {
            let word = |i: usize| u32::from_be_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
            ReportBlock {
                ssrc: word(0),
                fraction_lost: c[4],
                cumulative_lost: word(4) as i32,
                highest_seq: word(8),
                jitter: word(12),
                last_sr: word(16),
                delay_since_last_sr: word(20),
            }
        })
        .collect();
    let expect: Vec<ReportBlock> = blocks
        .iter()
        .map(|b| ReportBlock {
            cumulative_lost: b.cumulative_lost.clamp(-0x80_0000, 0x7f_ffff),
            ..*b
        })
        .collect();
    let mut out = Vec::new();
    rtcp::write_receiver_report(&mut out, 9, &blocks);
    assert_eq!(report_blocks(&out), expect);
    out.clear();
    rtcp::write_sender_report(&mut out, 9, 1, 2, 3, 4, &blocks);
    assert_eq!(report_blocks(&out), expect);
}

fn report_blocks(buf: &[u8]) -> Vec<ReportBlock> {
    let mut blocks = Vec::new();
    for item in rtcp::iter(buf) {
        match item.expect("written report parses") {
            RtcpPacket::SenderReport { reports, .. }
            | RtcpPacket::ReceiverReport { reports, .. } => {
                blocks.extend(reports);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    blocks
}

fn exercise_rtcp(packet: &RtcpPacket<'_>) {
    black_box(format!("{packet:?}"));
    match packet.clone() {
        RtcpPacket::SenderReport { reports, .. } | RtcpPacket::ReceiverReport { reports, .. } => {
            let n = reports.len();
            assert!(n <= 31);
            assert_eq!(reports.map(black_box).count(), n);
        }
        RtcpPacket::Nack { lost, .. } => {
            let (lo, hi) = lost.size_hint();
            let n = lost.map(black_box).count();
            assert!(lo <= n && Some(n) <= hi);
        }
        RtcpPacket::Fir { entries, .. } => {
            let n = entries.len();
            assert_eq!(entries.map(black_box).count(), n);
        }
        RtcpPacket::Remb { ssrcs, .. } => {
            let n = ssrcs.len();
            assert!(n <= 255);
            assert_eq!(ssrcs.map(black_box).count(), n);
        }
        RtcpPacket::Bye { ssrcs } => {
            let n = ssrcs.len();
            assert!(n <= 31);
            assert_eq!(ssrcs.map(black_box).count(), n);
        }
        RtcpPacket::Pli { .. } | RtcpPacket::Other { .. } => {}
    }
}

/// STUN: header and attribute validation, every visible attribute, USERNAME
/// splitting, and that no proper prefix of a valid message also parses.
pub fn fuzz_stun(data: &[u8]) {
    let Ok(msg) = StunMessage::parse(data) else {
        return;
    };
    assert!(msg.method <= 0x0fff);
    assert_eq!(data.len() % 4, 0);
    let mut visible = 0usize;
    for (typ, value) in msg.attributes() {
        visible += 1;
        assert!(value.len() <= data.len() - stun::HEADER_LEN);
        assert!(msg.attribute(typ).is_some());
    }
    assert!(visible <= (data.len() - stun::HEADER_LEN) / 4);
    if let Some((local, remote)) = msg.username() {
        let whole = msg.attribute(stun::ATTR_USERNAME).expect("USERNAME exists");
        assert_eq!(local.len() + 1 + remote.len(), whole.len());
        assert!(!local.contains(&b':'));
    }
    black_box(msg.is_binding_request());
    if let Some(prefix) = data.get(..data.len() - 1) {
        assert!(StunMessage::parse(prefix).is_err());
    }
}

/// Demultiplexing: `classify` plus the parser it routes to, and agreement
/// between the two where the RFCs imply it.
pub fn fuzz_classify(data: &[u8]) {
    let class = classify(data);
    match class {
        PacketClass::Stun => {
            black_box(StunMessage::parse(data).ok());
        }
        PacketClass::Rtp => {
            black_box(RtpHeader::parse(data).ok());
        }
        PacketClass::Rtcp => {
            black_box(rtcp::iter(data).count());
        }
        PacketClass::Dtls | PacketClass::Unknown => {}
    }
    if RtpHeader::parse(data).is_ok() {
        assert!(matches!(class, PacketClass::Rtp | PacketClass::Rtcp));
    }
    if StunMessage::parse(data).is_ok() && data.first().is_some_and(|&b| b <= 3) {
        assert_eq!(class, PacketClass::Stun);
    }
    if data.is_empty() {
        assert_eq!(class, PacketClass::Unknown);
    }
}

/// Codec keyframe detectors and payload parsers (VP8, VP9, H.264, AV1)
/// on the raw bytes, on the bytes after the first, and, when the input is
/// an RTP packet, on its payload.
pub fn fuzz_codec(data: &[u8]) {
    let vp8 = vp8_is_keyframe(data);
    if vp8 {
        assert!(data.first().is_some_and(|&d| d & 0x17 == 0x10));
    }
    let h264 = h264_is_keyframe(data);
    if h264 {
        assert!(!data.is_empty());
    }
    let mut views = [Some(data), data.get(1..), None];
    if let Ok(h) = RtpHeader::parse(data) {
        views[2] = Some(h.payload(data));
    }
    for view in views.into_iter().flatten() {
        fuzz_vp8(view);
        fuzz_vp9(view);
        fuzz_h264(view);
        fuzz_av1(view);
    }
}

/// VP8: the payload descriptor's bounds and its agreement with
/// `vp8_is_keyframe`.
pub fn fuzz_vp8(data: &[u8]) {
    match Vp8Descriptor::parse(data) {
        Ok(d) => {
            assert!((1..=6).contains(&d.header_len) && d.header_len <= data.len());
            assert_eq!(d.vp8_payload(data).len(), data.len() - d.header_len);
            assert!(d.picture_id.is_none_or(|p| p < 0x8000));
            assert!(d.picture_id.is_some() || !d.long_picture_id);
            assert!(d.tid.is_none_or(|t| t < 4) && d.key_idx.is_none_or(|k| k < 32));
            assert!(d.tid.is_some() || !d.layer_sync);
            assert!(d.partition_index < 8);
            assert_eq!(d.is_keyframe(data), vp8_is_keyframe(data));
            // The descriptor alone parses the same.
            assert_eq!(Vp8Descriptor::parse(&data[..d.header_len]), Ok(d));
        }
        Err(e) => {
            assert!(!vp8_is_keyframe(data));
            black_box(e.to_string());
        }
    }
}

/// VP9: the payload descriptor and scalability structure, their bounds,
/// and agreement with `vp9_is_keyframe`.
pub fn fuzz_vp9(data: &[u8]) {
    match Vp9Descriptor::parse(data) {
        Ok(d) => {
            assert!(d.header_len >= 1 && d.header_len <= data.len());
            assert_eq!(d.vp9_payload(data).len(), data.len() - d.header_len);
            assert!(d.picture_id.is_none_or(|p| p < 0x8000));
            assert!(!d.flexible || d.picture_id.is_some());
            assert_eq!(d.tl0_pic_idx.is_some(), d.layer.is_some() && !d.flexible);
            assert!(d.p_diffs().len() <= vp9::MAX_P_DIFFS);
            assert!(d.p_diffs().iter().all(|&p| (1..128).contains(&p)));
            assert!(d.p_diffs().is_empty() || (d.flexible && d.inter_picture_predicted));
            if let Some(l) = d.layer {
                assert!(l.tid < 8 && l.sid < 8);
            }
            if let Some(ss) = d.ss {
                assert!((1..=vp9::MAX_SPATIAL_LAYERS).contains(&ss.spatial_layers()));
                for sid in 0..=vp9::MAX_SPATIAL_LAYERS {
                    let res = ss.resolution(sid);
                    assert_eq!(
                        res.is_some(),
                        ss.has_resolutions() && sid < ss.spatial_layers()
                    );
                }
                black_box(ss.picture_group_len());
            }
            assert_eq!(d.is_keyframe(), vp9_is_keyframe(data));
            assert_eq!(Vp9Descriptor::parse(&data[..d.header_len]), Ok(d));
        }
        Err(e) => {
            assert!(!vp9_is_keyframe(data));
            black_box(e.to_string());
        }
    }
}

/// H.264: classification, STAP-A iteration, FU-A accessors, agreement with
/// `h264_is_keyframe`, and the parameter sets' STAP-A round trip.
pub fn fuzz_h264(data: &[u8]) {
    let Ok(packet) = H264Packet::parse(data) else {
        assert!(!h264_is_keyframe(data));
        let mut ps = ParameterSets::new();
        assert!(ps.observe(data).is_err());
        assert!(!ps.has_both());
        return;
    };
    assert_eq!(packet.is_keyframe(), h264_is_keyframe(data));
    if packet.is_idr_start() {
        assert!(packet.is_keyframe());
    }
    match packet {
        H264Packet::Single { nal_type, nal } => {
            assert!((1..=23).contains(&nal_type));
            assert_eq!(nal, data);
        }
        H264Packet::StapA(stap) => {
            assert!(!stap.is_empty());
            let mut covered = 1;
            let mut n = 0;
            for nal in stap.nal_units() {
                covered += 2 + nal.len();
                n += 1;
            }
            assert_eq!((covered, n), (data.len(), stap.len()));
        }
        H264Packet::FuA(fu) => {
            assert!(!(fu.is_start() && fu.is_end()));
            assert_eq!(fu.nal_header() & 0x1f, fu.nal_type());
            assert!((1..=23).contains(&fu.nal_type()));
            assert_eq!(fu.fragment().len(), data.len() - 2);
        }
    }
    let mut ps = ParameterSets::new();
    let observed = ps.observe(data);
    if let Ok(changed) = observed {
        assert_eq!(changed, ps.sps().is_some() || ps.pps().is_some());
    }
    for set in [ps.sps(), ps.pps()].into_iter().flatten() {
        assert!(!set.is_empty() && set.len() <= h264::MAX_PARAMETER_SET_LEN);
    }
    let mut out = [0u8; 1 + 2 * (2 + h264::MAX_PARAMETER_SET_LEN)];
    match ps.write_stap_a(&mut out) {
        Some(n) => {
            assert!(ps.has_both());
            let mut back = ParameterSets::new();
            assert_eq!(back.observe(&out[..n]), Ok(true));
            assert_eq!(back, ps);
            assert_eq!(ps.write_stap_a(&mut out[..n - 1]), None);
        }
        None => assert!(!ps.has_both()),
    }
}

/// AV1: the aggregation header and every OBU element, their bounds, and
/// agreement with `av1_is_keyframe`.
pub fn fuzz_av1(data: &[u8]) {
    let Ok(p) = Av1Packet::parse(data) else {
        assert!(!av1_is_keyframe(data));
        return;
    };
    assert!(p.w <= 3);
    assert!(!(p.new_coded_video_sequence && p.first_is_continuation));
    let n = p.obu_count();
    assert!(n >= 1 && n < data.len());
    if p.w != 0 {
        assert_eq!(n, usize::from(p.w));
    }
    let mut seen = 0;
    let mut bytes = 0;
    for (i, obu) in p.obus().enumerate() {
        seen += 1;
        bytes += obu.data.len();
        assert_eq!(obu.obu_type.is_none(), i == 0 && p.first_is_continuation);
        assert!(!obu.continues || (i + 1 == n && p.last_continues));
        assert!(obu.temporal_id < 8 && obu.spatial_id < 4);
        assert!(obu.has_extension || (obu.temporal_id, obu.spatial_id) == (0, 0));
        if let Some(ObuType::Reserved(v)) = obu.obu_type {
            assert!(v == 0 || (9..=14).contains(&v));
        }
    }
    assert_eq!(seen, n);
    assert!(bytes < data.len());
    assert_eq!(p.is_keyframe(), av1_is_keyframe(data));
}

/// The L1T3 keyframe dependency descriptor (structure attached, template
/// id offset 0, one 640x360 layer) that [`fuzz_dd`] loads first.
pub const DD_L1T3_KEYFRAME: &[u8] = &[
    0xc0, 0x12, 0x34, 0x80, 0x02, 0x14, 0xea, 0xa8, 0x60, 0x41, 0x4d, 0x14, 0x10, 0x20, 0x84, 0x27,
    0x02, 0x7f, 0x01, 0x67,
];

/// Dependency descriptor: the whole input with no structure known, and
/// the input as a stream of descriptors (each prefixed by its length byte)
/// against one structure, starting from a known L1T3 one. Checks the
/// descriptor against its structure and that failures leave the structure
/// unchanged.
pub fn fuzz_dd(data: &[u8]) {
    let mut fresh = DdStructure::new();
    check_dd(data, &mut fresh);

    let mut s = DdStructure::new();
    DependencyDescriptor::parse(DD_L1T3_KEYFRAME, &mut s).expect("the L1T3 seed parses");
    check_dd(data, &mut s);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (one, tail) = tail.split_at(len);
        check_dd(one, &mut s);
        rest = tail;
    }
}

fn check_dd(data: &[u8], s: &mut DdStructure) {
    let before = s.clone();
    match DependencyDescriptor::parse(data, s) {
        Ok(d) => {
            assert!(data.len() >= 3 && s.is_known());
            if !d.structure_attached && d.active_decode_targets.is_none() {
                assert!(*s == before, "a descriptor without structure changed it");
            }
            assert!(usize::from(d.spatial_id) < s.spatial_layer_count());
            assert!(usize::from(d.temporal_id) < s.temporal_layer_count());
            assert!(s.spatial_layer_count() <= dd::MAX_SPATIAL_LAYERS);
            assert!(s.temporal_layer_count() <= dd::MAX_TEMPORAL_LAYERS);
            assert!(s.template_count() >= 1 && s.template_count() <= dd::MAX_TEMPLATES);
            let dts = s.decode_target_count();
            assert!((1..=dd::MAX_DECODE_TARGETS).contains(&dts));
            assert_eq!(d.decode_target_count(), dts);
            assert!(s.chain_count() <= dts);
            assert_eq!(d.chain_fdiffs().len(), s.chain_count());
            assert!(d.fdiffs().len() <= dd::MAX_FDIFFS && d.fdiffs().iter().all(|&f| f >= 1));
            if let Some(adt) = d.active_decode_targets {
                assert_eq!(s.active_decode_targets(), adt);
                assert!(dts == 32 || adt >> dts == 0);
            }
            for dt in 0..=dd::MAX_DECODE_TARGETS {
                let dti = d.dti(dt);
                if dt >= dts {
                    assert_eq!(dti, Dti::NotPresent);
                    assert_eq!(s.decode_target_layers(dt), None);
                    assert!(!s.is_decode_target_active(dt));
                }
                assert_eq!(d.is_switch_point(dt), dti == Dti::Switch);
                if let Some((sid, tid)) = s.decode_target_layers(dt) {
                    assert!(usize::from(sid) < s.spatial_layer_count());
                    assert!(usize::from(tid) < s.temporal_layer_count());
                }
                if let Some(chain) = s.decode_target_protected_by(dt) {
                    assert!(usize::from(chain) < s.chain_count());
                }
            }
            for sid in 0..=dd::MAX_SPATIAL_LAYERS {
                if let Some((w, h)) = s.render_resolution(sid) {
                    assert!(sid < s.spatial_layer_count());
                    assert!((1..=65_536).contains(&w) && (1..=65_536).contains(&h));
                }
            }
            if !d.structure_attached {
                assert_eq!(s.template_id_offset(), before.template_id_offset());
                assert_eq!(s.template_count(), before.template_count());
            }
            black_box(format!("{s:?} {d:?}"));
        }
        Err(e) => {
            assert!(*s == before, "a failed parse changed the structure");
            black_box(e.to_string());
        }
    }
}

/// Known-good packets used as unit-test fixtures and as random-test seeds.
#[cfg(test)]
pub(crate) mod samples {
    /// A Chrome-style ICE Binding request: USERNAME "abcd:efgh",
    /// GOOG-NETWORK-INFO, ICE-CONTROLLING, USE-CANDIDATE, PRIORITY,
    /// MESSAGE-INTEGRITY (HMAC-SHA1, key "ridgeRidgeRidgeRidge1234") and a
    /// correct FINGERPRINT.
    pub const STUN_BINDING_REQUEST: &[u8] = &[
        0x00, 0x01, 0x00, 0x50, 0x21, 0x12, 0xa4, 0x42, // type, length 80, cookie
        0x6b, 0x4c, 0x51, 0x6a, 0x71, 0x55, 0x39, 0x61, 0x6d, 0x2b, 0x65, 0x47, // txid
        0x00, 0x06, 0x00, 0x09, b'a', b'b', b'c', b'd', b':', b'e', b'f', b'g', b'h', 0, 0, 0,
        0xc0, 0x57, 0x00, 0x04, 0x00, 0x01, 0x00, 0x0a, // GOOG-NETWORK-INFO
        0x80, 0x2a, 0x00, 0x08, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f, 0x70,
        0x81, // ICE-CONTROLLING
        0x00, 0x25, 0x00, 0x00, // USE-CANDIDATE
        0x00, 0x24, 0x00, 0x04, 0x6e, 0x7f, 0x1e, 0xff, // PRIORITY
        0x00, 0x08, 0x00, 0x14, 0x90, 0x20, 0x09, 0x3d, 0x09, 0x47, 0x90, 0xe5, 0xa5, 0xec, 0x99,
        0x16, 0x59, 0x9d, 0x87, 0x83, 0xfa, 0x2f, 0xe9, 0xe0, // MESSAGE-INTEGRITY
        0x80, 0x28, 0x00, 0x04, 0xe8, 0x0c, 0xb9, 0x04, // FINGERPRINT
    ];

    /// Opus packet, marker set, PT 111, with a one-byte extension block:
    /// id 1 audio level (V=1, -5 dBov), id 2 abs-send-time, 2 padding bytes.
    pub const RTP_AUDIO_LEVEL: &[u8] = &[
        0x90, 0xef, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef, 0x11, 0x22, 0x33, 0x44, // fixed
        0xbe, 0xde, 0x00, 0x02, // one-byte profile, 2 words
        0x10, 0x85, 0x22, 0x12, 0x34, 0x56, 0x00, 0x00, // elements
        0xfc, 0xff, 0xfe, 0x01, 0x02, // payload
    ];

    /// VP8 packet with P, X and one CSRC; two-byte extension block (id 1 =
    /// "0", a padding byte, id 200 empty, id 17 = aa bb); 3 bytes of padding.
    pub const RTP_PADDED_TWO_BYTE_EXT: &[u8] = &[
        0xb1, 0x60, 0xff, 0xff, 0x00, 0x01, 0x5f, 0x90, 0xca, 0xfe, 0xba, 0xbe, // fixed
        0x01, 0x02, 0x03, 0x04, // CSRC
        0x10, 0x00, 0x00, 0x03, // two-byte profile, 3 words
        0x01, 0x01, 0x30, 0x00, 0xc8, 0x00, 0x11, 0x02, 0xaa, 0xbb, 0x00, 0x00, // elements
        0x90, 0x80, 0x00, // payload
        0x00, 0x00, 0x03, // padding
    ];

    /// Compound SR (one report block, cumulative lost -3) + SDES CNAME.
    pub const RTCP_SR_SDES: &[u8] = &[
        0x81, 0xc8, 0x00, 0x0c, 0x11, 0x22, 0x33, 0x44, // header, SSRC
        0xe5, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, // NTP
        0x00, 0x01, 0x02, 0x03, 0x00, 0x00, 0x00, 0x64, 0x00, 0x00, 0x3e, 0x80, // ts, pc, oc
        0x55, 0x66, 0x77, 0x88, 0x40, 0xff, 0xff, 0xfd, // block: ssrc, fraction, lost
        0x00, 0x01, 0x00, 0x05, 0x00, 0x00, 0x00, 0x25, // highest seq, jitter
        0xb2, 0xc3, 0xd4, 0xe5, 0x00, 0x01, 0x00, 0x00, // LSR, DLSR
        0x81, 0xca, 0x00, 0x04, 0x11, 0x22, 0x33, 0x44, // SDES header, chunk SSRC
        0x01, 0x08, b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h', 0x00, 0x00, // CNAME, end
    ];

    /// Generic NACK: PID 1000, BLP 0x8005 (lost 1000, 1001, 1003, 1016).
    pub const RTCP_NACK: &[u8] = &[
        0x81, 0xcd, 0x00, 0x03, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x03, 0xe8, 0x80,
        0x05,
    ];

    /// Picture loss indication.
    pub const RTCP_PLI: &[u8] = &[
        0x81, 0xce, 0x00, 0x02, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    ];

    /// Full intra request for 0x0a0b0c0d, sequence number 7.
    pub const RTCP_FIR: &[u8] = &[
        0x84, 0xce, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x0b, 0x0c,
        0x0d, 0x07, 0x00, 0x00, 0x00,
    ];

    /// REMB: 1 Mbit/s (mantissa 250000, exp 2) for one SSRC.
    pub const RTCP_REMB: &[u8] = &[
        0x8f, 0xce, 0x00, 0x05, 0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x00, b'R', b'E', b'M',
        b'B', 0x01, 0x0b, 0xd0, 0x90, 0x0a, 0x0b, 0x0c, 0x0d,
    ];

    /// BYE for one SSRC, no reason.
    pub const RTCP_BYE: &[u8] = &[0x81, 0xcb, 0x00, 0x01, 0x11, 0x22, 0x33, 0x44];

    /// Every RTCP sample.
    pub const RTCP_ALL: &[&[u8]] = &[
        RTCP_SR_SDES,
        RTCP_NACK,
        RTCP_PLI,
        RTCP_FIR,
        RTCP_REMB,
        RTCP_BYE,
    ];

    /// Codec payloads: VP8 keyframe start, H.264 STAP-A SPS+PPS, FU-A IDR start.
    pub const CODEC: &[&[u8]] = &[
        &[
            0x90, 0xe0, 0x92, 0x34, 0x05, 0x20, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a,
        ],
        &[
            0x78, 0x00, 0x04, 0x67, 0x42, 0xc0, 0x1f, 0x00, 0x04, 0x68, 0xce, 0x3c, 0x80,
        ],
        &[0x7c, 0x85, 0x88, 0x84],
        // VP9: keyframe with a scalability structure (3 layers, sizes, a
        // 4-frame picture group); a flexible-mode inter frame.
        &[
            0xaa, 0x92, 0x34, 0x00, 0x05, 0x58, 0x01, 0x40, 0x00, 0xb4, 0x02, 0x80, 0x01, 0x68,
            0x05, 0x00, 0x02, 0xd0, 0x04, 0x04, 0x04, 0x54, 0x01, 0x34, 0x02, 0x54, 0x01, 0x82,
        ],
        &[0xfc, 0x09, 0x53, 0x03, 0x04, 0xaa],
        // AV1: keyframe (N=1, W=2, sequence header, frame); W=0 with a
        // continuation, an OBU with extension and size field, a fragment.
        &[
            0x28, 0x0b, 0x08, 0x00, 0x00, 0x00, 0x02, 0xaf, 0xff, 0x9b, 0x5f, 0x30, 0x08, 0x30,
            0x10, 0x00, 0x00, 0xa0, 0x01,
        ],
        &[
            0xc0, 0x02, 0xaa, 0xbb, 0x05, 0x36, 0x48, 0x02, 0x11, 0x22, 0x02, 0x20, 0x33,
        ],
        // H.264: STAP-A with a larger SPS, a PPS and an IDR slice start.
        &[
            0x78, 0x00, 0x0a, 0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x16, 0xec, 0x04, 0x00,
            0x04, 0x68, 0xce, 0x3c, 0x80, 0x00, 0x03, 0x65, 0x88, 0x84,
        ],
    ];

    /// Dependency descriptors: the L1T3 keyframe with its structure, then
    /// mandatory-only descriptors of templates 1-4, and one with custom
    /// DTIs, fdiffs and chains.
    pub const DD: &[&[u8]] = &[
        super::DD_L1T3_KEYFRAME,
        &[0x81, 0x12, 0x35],
        &[0x82, 0x12, 0x36],
        &[0xc3, 0x12, 0x37],
        &[0x44, 0x12, 0x38],
        &[0x83, 0x00, 0x63, 0x7b, 0xc9, 0x0b, 0x1f, 0xf9, 0xf0, 0x44],
    ];
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn seeds() -> Vec<&'static [u8]> {
        let mut v: Vec<&'static [u8]> = vec![
            samples::STUN_BINDING_REQUEST,
            samples::RTP_AUDIO_LEVEL,
            samples::RTP_PADDED_TWO_BYTE_EXT,
        ];
        v.extend_from_slice(samples::RTCP_ALL);
        // The first three codec samples only, so that the packet parsers'
        // seeds keep their share; `random_codec_inputs_reach_the_valid_paths`
        // mutates all of them.
        v.extend_from_slice(&samples::CODEC[..3]);
        v
    }

    fn codec_seeds() -> Vec<&'static [u8]> {
        let mut v: Vec<&'static [u8]> = samples::CODEC.to_vec();
        v.extend_from_slice(samples::DD);
        v
    }

    #[test]
    fn dd_seeds_parse_in_order() {
        let mut s = DdStructure::new();
        let frames: Vec<(u8, u16)> = samples::DD
            .iter()
            .map(|seed| {
                let d = DependencyDescriptor::parse(seed, &mut s).expect("DD seed parses");
                (d.temporal_id, d.frame_number)
            })
            .collect();
        assert_eq!(
            frames,
            [
                (0, 0x1234),
                (0, 0x1235),
                (1, 0x1236),
                (2, 0x1237),
                (2, 0x1238),
                (2, 99)
            ]
        );
        assert_eq!(s.active_decode_targets(), 0b011);
    }

    #[test]
    fn dd_seed_is_the_written_l1t3_keyframe() {
        assert_eq!(
            DD_L1T3_KEYFRAME,
            &super::super::codec::dd::writer::l1t3_keyframe(0)[..]
        );
    }

    fn mutate(rng: &mut StdRng, seeds: &[&[u8]]) -> Vec<u8> {
        if rng.random_bool(0.25) {
            let len = rng.random_range(0..=96);
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf[..]);
            return buf;
        }
        let mut buf = seeds[rng.random_range(0..seeds.len())].to_vec();
        if rng.random_bool(0.2) {
            // Splice: a compound of two seeds.
            buf.extend_from_slice(seeds[rng.random_range(0..seeds.len())]);
        }
        for _ in 0..rng.random_range(1..=4) {
            match rng.random_range(0..6) {
                0 if !buf.is_empty() => {
                    let i = rng.random_range(0..buf.len());
                    buf[i] ^= 1 << rng.random_range(0..8);
                }
                1 if !buf.is_empty() => {
                    let i = rng.random_range(0..buf.len());
                    buf[i] = [0, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)];
                }
                2 => {
                    let cut = rng.random_range(0..=buf.len());
                    buf.truncate(cut);
                }
                3 => {
                    let i = rng.random_range(0..=buf.len());
                    buf.insert(i, rng.random());
                }
                4 if buf.len() >= 4 => {
                    // Corrupt a length-like 16-bit field.
                    let i = rng.random_range(0..buf.len() - 1);
                    let v: u16 = rng.random();
                    buf[i..i + 2].copy_from_slice(&v.to_be_bytes());
                }
                _ => {
                    let n = rng.random_range(0..8);
                    buf.extend((0..n).map(|_| rng.random::<u8>()));
                }
            }
        }
        buf
    }

    #[test]
    fn seeds_pass_every_harness() {
        for seed in seeds().into_iter().chain(codec_seeds()) {
            fuzz_rtp(seed);
            fuzz_rtcp(seed);
            fuzz_stun(seed);
            fuzz_classify(seed);
            fuzz_codec(seed);
            fuzz_dd(seed);
        }
        // The DD seeds as one length-prefixed stream.
        let mut stream = Vec::new();
        for seed in samples::DD {
            stream.push(seed.len() as u8);
            stream.extend_from_slice(seed);
        }
        fuzz_dd(&stream);
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let seeds = seeds();
        let mut rng = StdRng::seed_from_u64(0x5eed_fa11);
        let mut parsed = [0usize; 3];
        for _ in 0..20_000 {
            let buf = mutate(&mut rng, &seeds);
            fuzz_rtp(&buf);
            fuzz_rtcp(&buf);
            fuzz_stun(&buf);
            fuzz_classify(&buf);
            fuzz_codec(&buf);
            fuzz_dd(&buf);
            parsed[0] += usize::from(RtpHeader::parse(&buf).is_ok());
            parsed[1] += usize::from(rtcp::iter(&buf).all(|r| r.is_ok()) && !buf.is_empty());
            parsed[2] += usize::from(StunMessage::parse(&buf).is_ok());
        }
        // The mutator must reach the valid paths, not only the error paths.
        assert!(
            parsed.iter().all(|&n| n > 100),
            "valid inputs per parser: {parsed:?}"
        );
    }

    #[test]
    fn random_codec_inputs_reach_the_valid_paths() {
        let seeds = codec_seeds();
        let mut rng = StdRng::seed_from_u64(0xc0de_c0de);
        let mut parsed = [0usize; 5];
        for _ in 0..20_000 {
            let buf = mutate(&mut rng, &seeds);
            fuzz_codec(&buf);
            fuzz_dd(&buf);
            parsed[0] += usize::from(Vp8Descriptor::parse(&buf).is_ok());
            parsed[1] += usize::from(Vp9Descriptor::parse(&buf).is_ok());
            parsed[2] += usize::from(H264Packet::parse(&buf).is_ok());
            parsed[3] += usize::from(Av1Packet::parse(&buf).is_ok());
            let mut s = DdStructure::new();
            parsed[4] += usize::from(DependencyDescriptor::parse(&buf, &mut s).is_ok());
        }
        assert!(
            parsed.iter().all(|&n| n > 100),
            "valid inputs per codec parser (VP8, VP9, H.264, AV1, DD): {parsed:?}"
        );
    }
}
