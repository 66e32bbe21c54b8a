//! The codec payload parsers (`ridge_sfu::packet::codec`) allocate
//! nothing: VP8, VP9, H.264 (with its parameter sets and STAP-A writer),
//! AV1 and the dependency descriptor, on valid packets and on every
//! truncation of them, checked with a counting global allocator.
//!
//! This file holds exactly one `#[test]`: the allocator counts only on the
//! thread that opened the window.

use std::hint::black_box;

use ridge_sfu::packet::codec::{
    Av1Packet, DdStructure, DependencyDescriptor, H264Packet, ParameterSets, Vp8Descriptor,
    Vp9Descriptor, av1_is_keyframe, h264_is_keyframe, vp8_is_keyframe, vp9_is_keyframe,
};
use ridge_sfu::packet::fuzz::DD_L1T3_KEYFRAME;

#[global_allocator]
static GLOBAL: ridge_io::CountingAlloc = ridge_io::CountingAlloc;

const VP8: &[u8] = &[
    0x90, 0xf0, 0x92, 0x34, 0x05, 0x20, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a,
];
const VP9: &[&[u8]] = &[
    &[
        0xaa, 0x92, 0x34, 0x00, 0x05, 0x58, 0x01, 0x40, 0x00, 0xb4, 0x02, 0x80, 0x01, 0x68, 0x05,
        0x00, 0x02, 0xd0, 0x04, 0x04, 0x04, 0x54, 0x01, 0x34, 0x02, 0x54, 0x01, 0x82,
    ],
    &[0xfc, 0x09, 0x53, 0x03, 0x04, 0xaa],
];
const H264: &[&[u8]] = &[
    &[0x65, 0x88, 0x84],
    &[
        0x78, 0x00, 0x04, 0x67, 0x42, 0xc0, 0x1f, 0x00, 0x04, 0x68, 0xce, 0x3c, 0x80, 0x00, 0x03,
        0x65, 0x88, 0x84,
    ],
    &[0x7c, 0x85, 0x88, 0x84],
    &[0x7c, 0x45, 0x88],
];
const AV1: &[&[u8]] = &[
    &[
        0x28, 0x0b, 0x08, 0x00, 0x00, 0x00, 0x02, 0xaf, 0xff, 0x9b, 0x5f, 0x30, 0x08, 0x30, 0x10,
        0x00, 0x00, 0xa0, 0x01,
    ],
    &[
        0xc0, 0x02, 0xaa, 0xbb, 0x05, 0x36, 0x48, 0x02, 0x11, 0x22, 0x02, 0x20, 0x33,
    ],
];
const DD: &[&[u8]] = &[
    &[0x81, 0x12, 0x35],
    &[0x82, 0x12, 0x36],
    &[0x83, 0x00, 0x63, 0x7b, 0xc9, 0x0b, 0x1f, 0xf9, 0xf0, 0x44],
];

/// Parses every packet and every prefix of it through every parser and
/// accessor; returns how many parses succeeded.
fn parse_all(structure: &mut DdStructure, ps: &mut ParameterSets, out: &mut [u8]) -> usize {
    let mut ok = 0;
    let all = std::iter::once(VP8)
        .chain(VP9.iter().copied())
        .chain(H264.iter().copied())
        .chain(AV1.iter().copied())
        .chain(std::iter::once(DD_L1T3_KEYFRAME))
        .chain(DD.iter().copied());
    for packet in all {
        for cut in 0..=packet.len() {
            let p = &packet[..cut];
            if let Ok(d) = Vp8Descriptor::parse(p) {
                ok += 1;
                black_box(d.is_keyframe(p));
            }
            black_box(vp8_is_keyframe(p));
            if let Ok(d) = Vp9Descriptor::parse(p) {
                ok += 1;
                black_box((d.p_diffs(), d.ss.map(|ss| ss.resolution(1))));
            }
            black_box(vp9_is_keyframe(p));
            if let Ok(h) = H264Packet::parse(p) {
                ok += 1;
                if let H264Packet::StapA(stap) = h {
                    black_box(stap.nal_units().count());
                }
                black_box((h.is_keyframe(), h.is_idr_start()));
            }
            black_box(h264_is_keyframe(p));
            black_box(ps.observe(p).ok());
            black_box(ps.write_stap_a(out));
            if let Ok(a) = Av1Packet::parse(p) {
                ok += 1;
                for obu in a.obus() {
                    black_box(obu);
                }
            }
            black_box(av1_is_keyframe(p));
            if let Ok(d) = DependencyDescriptor::parse(p, structure) {
                ok += 1;
                black_box((d.dti(0), d.is_switch_point(1), d.fdiffs(), d.chain_fdiffs()));
            }
            black_box(structure.spatial_layer_count());
        }
    }
    ok
}

#[test]
fn codec_parsers_allocate_nothing() {
    let mut structure = DdStructure::new();
    let mut ps = ParameterSets::new();
    let mut out = [0u8; 600];
    // Once outside the window, for a count to compare with.
    let want = parse_all(&mut structure, &mut ps, &mut out);
    assert!(ps.has_both() && structure.is_known());

    let mut structure = DdStructure::new();
    let mut ps = ParameterSets::new();
    let a0 = ridge_io::alloc::thread_allocations();
    let mut got = 0;
    for _ in 0..100 {
        got += parse_all(&mut structure, &mut ps, &mut out);
    }
    let allocations = ridge_io::alloc::thread_allocations() - a0;
    assert_eq!(allocations, 0, "codec parsing allocated");
    assert!(
        got >= 100 * want - 100 && want > 50,
        "parsed {got}, want about 100 x {want}"
    );
}
