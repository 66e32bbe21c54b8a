//! Mesh transit offload (`ridge_mesh_fwd`): `BPF_PROG_TEST_RUN` of
//! `ridge_xdp` on SRTP packets (NULL cipher, `NULL_SIPHASH24_80`) of
//! installed flows. Every tag is computed and checked with the `siphasher`
//! crate, an implementation independent of the BPF one.

mod common;

use std::time::Duration;

use common::{Frame4, checksums_valid, load, require, root, rtcp_sr, rtp, stun, v4};
use ridge_ebpf::{
    Destination, Error, FlowEntry, FlowKey, MAX_MESH_FLOWS, MeshEntryError, MeshFlowCounters,
    MeshFlowEntry, MeshFlowState, RidgeBpf, TestProgram, xdp_verdict,
};
use siphasher::sip128::SipHasher24;

const MEDIA_PORT: u16 = 5004;
/// An egress ifindex other than test_run's lo (bpf_redirect does not check it).
const OTHER_IFINDEX: u32 = 7777;
/// test_run's packets arrive on lo: ifindex 1 in every namespace.
const LO: u32 = 1;
const SSRC: u32 = 0x1111_2222;
const IN_KEY: [u8; 16] = *b"upstream-key-A>B";
const OUT_KEY: [u8; 16] = *b"downstrm-key-B>C";
const TAG_LEN: usize = 10;
/// Where the RTP header starts in an untagged IPv4 frame without options.
const RTP: usize = 42;

// ---- the tag, with siphasher -------------------------------------------------

/// SipHash-2-4-128 as the reference `siphash(.., outlen = 16)` writes it:
/// h1 little-endian, then h2 little-endian.
fn sip128(key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
    let h = SipHasher24::new_with_key(key).hash(msg);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&h.h1.to_le_bytes());
    out[8..].copy_from_slice(&h.h2.to_le_bytes());
    out
}

/// The `NULL_SIPHASH24_80` tag of `body` (an RTP packet) at rollover
/// counter `roc`.
fn tag(key: &[u8; 16], roc: u32, body: &[u8]) -> [u8; TAG_LEN] {
    let mut msg = Vec::with_capacity(8 + body.len());
    msg.extend_from_slice(&roc.to_be_bytes());
    msg.extend_from_slice(&[0; 4]);
    msg.extend_from_slice(body);
    let full = sip128(key, &msg);
    full[..TAG_LEN].try_into().unwrap()
}

/// An SRTP packet: RTP (version 2, PT 96) with `payload_len` bytes, signed.
fn srtp(key: &[u8; 16], roc: u32, seq: u16, ssrc: u32, payload_len: usize) -> Vec<u8> {
    let mut p = rtp(96, seq, 0x0102_0304 ^ u32::from(seq), ssrc, payload_len);
    let t = tag(key, roc, &p);
    p.extend_from_slice(&t);
    p
}

#[test]
fn siphasher_128_matches_the_reference_vectors() {
    // veorq/SipHash vectors.h, vectors_sip128[0] and [1]: key 00..0f,
    // messages of length 0 and 1 (00).
    let key: [u8; 16] = core::array::from_fn(|i| i as u8);
    assert_eq!(
        sip128(&key, &[]),
        [
            0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
            0x02, 0x93
        ]
    );
    assert_eq!(
        sip128(&key, &[0]),
        [
            0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76, 0x59, 0x11, 0x9b, 0x22,
            0xfc, 0x45
        ]
    );
    // The tag is the first ten of those bytes, ROC block first.
    let t = tag(&key, 0x0102_0304, b"body");
    let mut msg = vec![1, 2, 3, 4, 0, 0, 0, 0];
    msg.extend_from_slice(b"body");
    assert_eq!(t[..], sip128(&key, &msg)[..10]);
}

// ---- set-up --------------------------------------------------------------------

fn key() -> FlowKey {
    FlowKey {
        src: v4([10, 99, 0, 1], 4000),
        dst: v4([10, 99, 0, 2], MEDIA_PORT),
        ssrc: SSRC,
    }
}

fn dest(ifindex: u32) -> Destination {
    Destination {
        dst: v4([10, 98, 0, 30], 6030),
        src: v4([10, 98, 0, 1], 5006),
        ssrc: 0xabcd_0042,
        seq_offset: 0,
        ts_offset: 0,
        ifindex,
        dst_mac: [0x02, 1, 2, 3, 4, 5],
        src_mac: [0x02, 9, 9, 9, 9, 9],
    }
}

fn entry(ifindex: u32, in_highest: Option<u64>, out_highest: Option<u64>) -> MeshFlowEntry {
    MeshFlowEntry {
        in_key: IN_KEY,
        out_key: OUT_KEY,
        dest: dest(ifindex),
        in_highest,
        out_highest,
        send_epoch_ns: None,
    }
}

fn mesh_bpf(e: &MeshFlowEntry) -> RidgeBpf {
    let mut bpf = load();
    bpf.guard()
        .set_media_ports(&[MEDIA_PORT])
        .expect("media ports");
    bpf.mesh_flows().insert(key(), e).expect("insert");
    bpf
}

fn frame(payload: Vec<u8>) -> Vec<u8> {
    Frame4::new(key().src, key().dst, payload).build()
}

fn run(bpf: &RidgeBpf, frame: &[u8]) -> (u32, Vec<u8>) {
    let out = bpf
        .test_run(TestProgram::Xdp, frame, Some(LO), 1)
        .expect("test_run");
    (out.verdict, out.data)
}

fn state(bpf: &mut RidgeBpf) -> MeshFlowState {
    bpf.mesh_flows().state(key()).unwrap().expect("installed")
}

fn counters(bpf: &mut RidgeBpf) -> MeshFlowCounters {
    state(bpf).counters
}

/// Checks that `out` is `input` (whose RTP packet has `rtp_len` bytes, tag
/// included) forwarded to `d`: headers rewritten, RTP unchanged but for the
/// SSRC, signed with `out_key` at `out_roc`. Bytes after the datagram
/// (Ethernet padding) are unchanged.
fn assert_forwarded(input: &[u8], out: &[u8], rtp_len: usize, d: &Destination, out_roc: u32) {
    assert_eq!(out.len(), input.len());
    assert_eq!(&out[0..6], &d.dst_mac);
    assert_eq!(&out[6..12], &d.src_mac);
    assert_eq!(&out[12..22], &input[12..22], "ethertype .. IP flags");
    assert_eq!(out[22], 64, "fresh TTL");
    assert_eq!(out[23], 17, "protocol");
    assert_eq!(&out[26..30], &d.src.ip().octets());
    assert_eq!(&out[30..34], &d.dst.ip().octets());
    assert_eq!(&out[34..36], &d.src.port().to_be_bytes());
    assert_eq!(&out[36..38], &d.dst.port().to_be_bytes());
    assert_eq!(&out[38..40], &input[38..40], "UDP length");
    assert_eq!(&out[40..42], &[0, 0], "UDP checksum 0");
    checksums_valid(out).unwrap_or_else(|e| panic!("{e}"));
    let body = rtp_len - TAG_LEN;
    assert_eq!(
        &out[RTP..RTP + 8],
        &input[RTP..RTP + 8],
        "RTP flags, seq, ts"
    );
    assert_eq!(&out[RTP + 8..RTP + 12], &d.ssrc.to_be_bytes(), "SSRC");
    assert_eq!(
        &out[RTP + 12..RTP + body],
        &input[RTP + 12..RTP + body],
        "payload"
    );
    let want = tag(&OUT_KEY, out_roc, &out[RTP..RTP + body]);
    assert_eq!(
        &out[RTP + body..RTP + rtp_len],
        &want,
        "tag under out_key at ROC {out_roc}"
    );
    assert_eq!(&out[RTP + rtp_len..], &input[RTP + rtp_len..], "padding");
}

// ---- forwarding ----------------------------------------------------------------

#[test]
fn mesh_flow_is_verified_rewritten_and_resigned() {
    if require("mesh_flow_is_verified_rewritten_and_resigned", root()).is_err() {
        return;
    }
    let in_seed = (3 << 16) | 1000;
    let out_seed = (9 << 16) | 990;
    let mut bpf = mesh_bpf(&entry(LO, Some(in_seed), Some(out_seed)));
    let input = frame(srtp(&IN_KEY, 3, 1001, SSRC, 160));
    let rtp_len = 12 + 160 + TAG_LEN;

    // Egress interface == ingress interface: XDP_TX.
    let (verdict, out) = run(&bpf, &input);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_forwarded(&input, &out, rtp_len, &dest(LO), 9);
    // The tag is not the one a plain copy of the old tag would give.
    assert_ne!(&out[out.len() - TAG_LEN..], &input[input.len() - TAG_LEN..]);
    let s = state(&mut bpf);
    assert_eq!(
        (s.in_highest, s.out_highest),
        (Some((3 << 16) | 1001), Some((9 << 16) | 1001))
    );
    assert_eq!(
        s.counters,
        MeshFlowCounters {
            packets: 1,
            bytes: input.len() as u64,
            ..MeshFlowCounters::default()
        }
    );
    let c = bpf.counters().unwrap();
    assert_eq!(
        (c.mesh_forwarded, c.forward_xdp_tx, c.forward_xdp_redirect),
        (1, 1, 0)
    );

    // Another egress interface: XDP_REDIRECT (the replacement re-seeds).
    bpf.mesh_flows()
        .insert(key(), &entry(OTHER_IFINDEX, Some(in_seed), Some(out_seed)))
        .unwrap();
    let (verdict, out) = run(&bpf, &input);
    assert_eq!(verdict, xdp_verdict::REDIRECT);
    assert_forwarded(&input, &out, rtp_len, &dest(OTHER_IFINDEX), 9);
    let c = bpf.counters().unwrap();
    assert_eq!(
        (c.mesh_forwarded, c.forward_xdp_tx, c.forward_xdp_redirect),
        (2, 1, 1)
    );
    assert_eq!(c.mesh_bad_tag + c.mesh_too_old + c.forward_errors, 0);

    // Every tail length (body length mod 8), up to the largest RTP packet
    // (1472 bytes with its tag), and Ethernet padding after the datagram.
    let mut seq = 1002u16;
    let mut sent = 2u64;
    for payload_len in (0..=24).chain([1000, 1178, 1449, 1450]) {
        for padding in [0usize, 7] {
            let mut input = frame(srtp(&IN_KEY, 3, seq, SSRC, payload_len));
            input.extend(std::iter::repeat_n(0xee, padding));
            let (verdict, out) = run(&bpf, &input);
            assert_eq!(verdict, xdp_verdict::REDIRECT, "payload {payload_len}");
            assert_forwarded(
                &input,
                &out,
                12 + payload_len + TAG_LEN,
                &dest(OTHER_IFINDEX),
                9,
            );
            seq += 1;
            sent += 1;
        }
    }
    let s = state(&mut bpf);
    assert_eq!(s.in_highest, Some((3 << 16) | u64::from(seq - 1)));
    assert_eq!(s.out_highest, Some((9 << 16) | u64::from(seq - 1)));
    assert_eq!(
        s.counters.packets,
        sent - 1,
        "counters restarted on replace"
    );
    assert_eq!(bpf.counters().unwrap().mesh_forwarded, sent);
}

#[test]
fn bad_tags_pass_untouched() {
    if require("bad_tags_pass_untouched", root()).is_err() {
        return;
    }
    let seed = entry(LO, Some(5000), Some(7000));
    let mut bpf = mesh_bpf(&seed);
    let good = srtp(&IN_KEY, 0, 5001, SSRC, 100);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut flipped = good.clone();
    flipped[12 + 50] ^= 0x10;
    cases.push(("payload bit", flipped));
    let mut header = good.clone();
    header[1] ^= 0x01; // payload type 97
    cases.push(("header bit", header));
    cases.push(("wrong key", srtp(&OUT_KEY, 0, 5001, SSRC, 100)));
    let mut last = good.clone();
    *last.last_mut().unwrap() ^= 0x80; // h2's second byte
    cases.push(("last tag bit", last));
    let mut first = good.clone();
    let at = first.len() - TAG_LEN;
    first[at] ^= 1;
    cases.push(("first tag bit", first));
    let mut shorter_tag = good.clone(); // the tag of the body minus a byte
    shorter_tag.truncate(good.len() - TAG_LEN - 1);
    let t = tag(&IN_KEY, 0, &shorter_tag);
    shorter_tag.push(0);
    shorter_tag.extend_from_slice(&t);
    cases.push(("length", shorter_tag));
    let n = cases.len() as u64;
    for (name, payload) in cases {
        let input = frame(payload);
        let (verdict, out) = run(&bpf, &input);
        assert_eq!(verdict, xdp_verdict::PASS, "{name}");
        assert_eq!(out, input, "{name}: untouched");
    }
    let s = state(&mut bpf);
    assert_eq!((s.in_highest, s.out_highest), (Some(5000), Some(7000)));
    assert_eq!(
        s.counters,
        MeshFlowCounters {
            bad_tag: n,
            ..MeshFlowCounters::default()
        }
    );
    let c = bpf.counters().unwrap();
    assert_eq!((c.mesh_bad_tag, c.mesh_forwarded), (n, 0));

    // The good one still goes through afterwards.
    let (verdict, _) = run(&bpf, &frame(good));
    assert_eq!(verdict, xdp_verdict::TX);
}

#[test]
fn rollover_counters_follow_rfc_3711() {
    if require("rollover_counters_follow_rfc_3711", root()).is_err() {
        return;
    }
    let mut bpf = mesh_bpf(&entry(
        OTHER_IFINDEX,
        Some((5 << 16) | 65530),
        Some((2 << 16) | 65530),
    ));
    let d = dest(OTHER_IFINDEX);
    let send = |bpf: &RidgeBpf, roc: u32, seq: u16| {
        let input = frame(srtp(&IN_KEY, roc, seq, SSRC, 40));
        let (verdict, out) = run(bpf, &input);
        (verdict, input, out)
    };

    // Before the wrap: ROC 5 in, ROC 2 out.
    let (verdict, input, out) = send(&bpf, 5, 65535);
    assert_eq!(verdict, xdp_verdict::REDIRECT);
    assert_forwarded(&input, &out, 12 + 40 + TAG_LEN, &d, 2);
    // After: ROC 6 in, ROC 3 out.
    let (verdict, input, out) = send(&bpf, 6, 3);
    assert_eq!(verdict, xdp_verdict::REDIRECT);
    assert_forwarded(&input, &out, 12 + 40 + TAG_LEN, &d, 3);
    let s = state(&mut bpf);
    assert_eq!(
        (s.in_highest, s.out_highest),
        (Some((6 << 16) | 3), Some((3 << 16) | 3))
    );
    // A late packet from before the wrap: ROC 5 in, ROC 2 out, and the
    // highest indices stay.
    let (verdict, input, out) = send(&bpf, 5, 65534);
    assert_eq!(verdict, xdp_verdict::REDIRECT);
    assert_forwarded(&input, &out, 12 + 40 + TAG_LEN, &d, 2);
    let s = state(&mut bpf);
    assert_eq!(
        (s.in_highest, s.out_highest),
        (Some((6 << 16) | 3), Some((3 << 16) | 3))
    );
    assert_eq!(s.counters.packets, 3);

    // Signed with the wrong ROC: not verified.
    for roc in [5, 7, 0] {
        let (verdict, input, out) = send(&bpf, roc, 4);
        assert_eq!(verdict, xdp_verdict::PASS, "ROC {roc}");
        assert_eq!(out, input);
    }
    assert_eq!(counters(&mut bpf).bad_tag, 3);

    // ROC 0 stays 0 for a packet "before" the first one (no underflow).
    bpf.mesh_flows()
        .insert(key(), &entry(OTHER_IFINDEX, Some(10), None))
        .unwrap();
    let (verdict, input, out) = send(&bpf, 0, 65000);
    assert_eq!(verdict, xdp_verdict::REDIRECT);
    // No out_highest yet: the out index is the sequence number.
    assert_forwarded(&input, &out, 12 + 40 + TAG_LEN, &d, 0);
    let s = state(&mut bpf);
    assert_eq!((s.in_highest, s.out_highest), (Some(65000), Some(65000)));
}

#[test]
fn too_old_packets_drop_and_duplicates_are_forwarded_again() {
    if require(
        "too_old_packets_drop_and_duplicates_are_forwarded_again",
        root(),
    )
    .is_err()
    {
        return;
    }
    let mut bpf = mesh_bpf(&entry(LO, Some(5000), Some(5000)));
    let send = |bpf: &RidgeBpf, seq: u16| run(bpf, &frame(srtp(&IN_KEY, 0, seq, SSRC, 60)));

    // 1025 behind the highest: dropped; 1024 behind: forwarded.
    assert_eq!(send(&bpf, 5000 - 1025).0, xdp_verdict::DROP);
    assert_eq!(send(&bpf, 5000 - 1024).0, xdp_verdict::TX);
    // A too-old packet with a bad tag is a bad tag (passed), not dropped.
    let mut forged = srtp(&IN_KEY, 0, 100, SSRC, 60);
    forged[20] ^= 1;
    let input = frame(forged);
    assert_eq!(run(&bpf, &input), (xdp_verdict::PASS, input.clone()));
    // The highest one twice, and an older one twice: each time forwarded,
    // with the same output.
    let (v1, first) = send(&bpf, 5000);
    let (v2, second) = send(&bpf, 5000);
    assert_eq!((v1, v2), (xdp_verdict::TX, xdp_verdict::TX));
    assert_eq!(first, second);
    assert_eq!(send(&bpf, 4500).0, xdp_verdict::TX);
    assert_eq!(send(&bpf, 4500).0, xdp_verdict::TX);

    let s = state(&mut bpf);
    assert_eq!((s.in_highest, s.out_highest), (Some(5000), Some(5000)));
    assert_eq!(
        (
            s.counters.packets,
            s.counters.too_old,
            s.counters.bad_tag,
            s.counters.passed
        ),
        (5, 1, 1, 0)
    );
    let c = bpf.counters().unwrap();
    assert_eq!((c.mesh_too_old, c.mesh_forwarded), (1, 5));
}

#[test]
fn unseeded_short_and_long_packets_pass() {
    if require("unseeded_short_and_long_packets_pass", root()).is_err() {
        return;
    }
    // No in_highest: every packet goes up, counted as passed.
    let mut bpf = mesh_bpf(&entry(LO, None, None));
    let input = frame(srtp(&IN_KEY, 0, 1, SSRC, 100));
    assert_eq!(run(&bpf, &input), (xdp_verdict::PASS, input.clone()));
    let s = state(&mut bpf);
    assert_eq!((s.in_highest, s.out_highest), (None, None));
    assert_eq!(s.counters.passed, 1);

    // Seeded: RTP packets of 21 (no room for header and tag) and 1473
    // bytes pass; 22 and 1472 are forwarded.
    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some(0), None))
        .unwrap();
    let short = frame(rtp(96, 1, 2, SSRC, 9)); // 21 bytes
    assert_eq!(run(&bpf, &short), (xdp_verdict::PASS, short.clone()));
    let long = frame(srtp(&IN_KEY, 0, 2, SSRC, 1451)); // 1473 bytes
    assert_eq!(run(&bpf, &long), (xdp_verdict::PASS, long.clone()));
    assert_eq!(counters(&mut bpf).passed, 2);
    let min = frame(srtp(&IN_KEY, 0, 3, SSRC, 0)); // 22 bytes
    let (verdict, out) = run(&bpf, &min);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_forwarded(&min, &out, 22, &dest(LO), 0);
    let max = frame(srtp(&IN_KEY, 0, 4, SSRC, 1450)); // 1472 bytes
    let (verdict, out) = run(&bpf, &max);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_forwarded(&max, &out, 1472, &dest(LO), 0);
    let c = counters(&mut bpf);
    assert_eq!((c.passed, c.packets, c.bad_tag), (2, 2, 0));
}

#[test]
fn other_traffic_passes_and_plain_flows_still_forward() {
    if require("other_traffic_passes_and_plain_flows_still_forward", root()).is_err() {
        return;
    }
    let mut bpf = mesh_bpf(&entry(LO, Some(0), None));
    let k = key();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // RTCP from the same 5-tuple, with the flow's SSRC where RTP's is.
    let mut sr = rtcp_sr(SSRC);
    sr[8..12].copy_from_slice(&SSRC.to_be_bytes());
    cases.push(("rtcp", frame(sr)));
    cases.push(("stun", frame(stun())));
    cases.push(("other ssrc", frame(srtp(&IN_KEY, 0, 1, 0x9999, 40))));
    let mut other_port = Frame4::new(
        v4([10, 99, 0, 1], 4001),
        k.dst,
        srtp(&IN_KEY, 0, 1, SSRC, 40),
    );
    cases.push(("other source port", other_port.build()));
    other_port.vlans = vec![0x8100];
    other_port.src = k.src;
    cases.push(("vlan", other_port.build()));
    let mut options = Frame4::new(k.src, k.dst, srtp(&IN_KEY, 0, 1, SSRC, 40));
    options.options = vec![1, 1, 1, 0];
    cases.push(("ip options", options.build()));
    for (name, input) in cases {
        assert_eq!(
            run(&bpf, &input),
            (xdp_verdict::PASS, input.clone()),
            "{name}"
        );
    }
    assert_eq!(counters(&mut bpf), MeshFlowCounters::default());

    // A plain-RTP flow next to it still forwards as before.
    let plain_key = FlowKey {
        ssrc: 0x5555_6666,
        ..k
    };
    let plain_dest = Destination {
        seq_offset: 100,
        ts_offset: 1000,
        ..dest(LO)
    };
    bpf.flows()
        .insert(
            plain_key,
            &FlowEntry {
                destinations: vec![plain_dest],
                sample_every: 0,
            },
        )
        .unwrap();
    let input = frame(rtp(96, 7, 70, 0x5555_6666, 100));
    let (verdict, out) = run(&bpf, &input);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_eq!(&out[44..46], &107u16.to_be_bytes());
    assert_eq!(&out[50..54], &plain_dest.ssrc.to_be_bytes());
    checksums_valid(&out).unwrap();
    assert_ne!(&out[40..42], &[0, 0], "plain flows keep a UDP checksum");
    assert_eq!(bpf.flows().counters(plain_key).unwrap().unwrap().packets, 1);

    // The same key in both tables: the mesh entry decides.
    bpf.flows()
        .insert(
            k,
            &FlowEntry {
                destinations: vec![plain_dest],
                sample_every: 0,
            },
        )
        .unwrap();
    let input = frame(srtp(&IN_KEY, 0, 9, SSRC, 40));
    let (verdict, out) = run(&bpf, &input);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_forwarded(&input, &out, 12 + 40 + TAG_LEN, &dest(LO), 0);
    assert_eq!(bpf.flows().counters(k).unwrap().unwrap().packets, 0);
    assert_eq!(counters(&mut bpf).packets, 1);
    let c = bpf.counters().unwrap();
    assert_eq!((c.mesh_forwarded, c.forward_xdp_tx), (1, 2));
}

#[test]
fn state_and_remove_report_progress_and_insert_reseeds() {
    if require(
        "state_and_remove_report_progress_and_insert_reseeds",
        root(),
    )
    .is_err()
    {
        return;
    }
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    assert!(bpf.mesh_flows().is_empty());
    assert_eq!(bpf.mesh_flows().state(key()).unwrap(), None);
    assert_eq!(bpf.mesh_flows().remove(key()).unwrap(), None);
    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some((1 << 16) | 10), Some(20)))
        .unwrap();
    assert_eq!(bpf.mesh_flows().len(), 1);
    assert_eq!(bpf.mesh_flows().keys(), vec![key()]);
    assert_eq!(
        state(&mut bpf),
        MeshFlowState {
            in_highest: Some((1 << 16) | 10),
            out_highest: Some(20),
            counters: MeshFlowCounters::default(),
        }
    );

    let mut bytes = 0;
    for seq in 11..=30u16 {
        let input = frame(srtp(&IN_KEY, 1, seq, SSRC, usize::from(seq)));
        bytes += input.len() as u64;
        assert_eq!(run(&bpf, &input).0, xdp_verdict::TX);
    }
    let input = frame(srtp(&IN_KEY, 1, 31, SSRC, 0)[..21].to_vec());
    assert_eq!(run(&bpf, &input).0, xdp_verdict::PASS);
    let progressed = MeshFlowState {
        in_highest: Some((1 << 16) | 30),
        out_highest: Some(30),
        counters: MeshFlowCounters {
            packets: 20,
            bytes,
            passed: 1,
            ..MeshFlowCounters::default()
        },
    };
    assert_eq!(state(&mut bpf), progressed);

    // Replacing re-seeds and restarts the counters.
    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some(100), None))
        .unwrap();
    assert_eq!(
        state(&mut bpf),
        MeshFlowState {
            in_highest: Some(100),
            out_highest: None,
            counters: MeshFlowCounters::default(),
        }
    );
    assert_eq!(bpf.mesh_flows().len(), 1);
    let input = frame(srtp(&IN_KEY, 0, 101, SSRC, 10));
    assert_eq!(run(&bpf, &input).0, xdp_verdict::TX);

    // Removing returns the final state; the flow then goes to userspace.
    let last = bpf.mesh_flows().remove(key()).unwrap().expect("installed");
    assert_eq!(
        (last.in_highest, last.out_highest, last.counters.packets),
        (Some(101), Some(101), 1)
    );
    assert!(bpf.mesh_flows().is_empty());
    assert!(bpf.mesh_flows().keys().is_empty());
    assert_eq!(bpf.mesh_flows().remove(key()).unwrap(), None);
    assert_eq!(bpf.mesh_flows().state(key()).unwrap(), None);
    let input = frame(srtp(&IN_KEY, 0, 102, SSRC, 10));
    assert_eq!(run(&bpf, &input), (xdp_verdict::PASS, input.clone()));
    assert_eq!(bpf.counters().unwrap().mesh_forwarded, 21);
}

#[test]
fn table_rejects_bad_entries_and_is_bounded() {
    if require("table_rejects_bad_entries_and_is_bounded", root()).is_err() {
        return;
    }
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let mut e = entry(LO, Some(1), None);
    e.dest.seq_offset = 1;
    assert!(matches!(
        bpf.mesh_flows().insert(key(), &e),
        Err(Error::InvalidMeshEntry(MeshEntryError::NonZeroOffsets {
            seq_offset: 1,
            ts_offset: 0
        }))
    ));
    let mut e = entry(LO, Some(1), None);
    e.dest.ts_offset = 3000;
    assert!(matches!(
        bpf.mesh_flows().insert(key(), &e),
        Err(Error::InvalidMeshEntry(MeshEntryError::NonZeroOffsets {
            ts_offset: 3000,
            ..
        }))
    ));
    let e = entry(LO, Some(1 << 48), None);
    assert!(matches!(
        bpf.mesh_flows().insert(key(), &e),
        Err(Error::InvalidMeshEntry(MeshEntryError::IndexOutOfRange {
            field: "in_highest",
            ..
        }))
    ));
    assert!(bpf.mesh_flows().is_empty());
    // The largest index is fine.
    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some((1 << 48) - 1), Some((1 << 48) - 1)))
        .unwrap();
    // Debug never shows the keys.
    let text = format!("{:?}", entry(LO, None, None));
    assert!(
        text.contains("<redacted>") && !text.contains("117, 112"),
        "{text}"
    );

    // Fill the table: the first flow forwards a packet, so its slot has
    // counters and state to clear when it is reused.
    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some(0), None))
        .unwrap();
    assert_eq!(
        run(&bpf, &frame(srtp(&IN_KEY, 0, 1, SSRC, 10))).0,
        xdp_verdict::TX
    );
    let other = |i: u32| FlowKey {
        ssrc: 0x7000_0000 + i,
        ..key()
    };
    for i in 1..MAX_MESH_FLOWS as u32 {
        bpf.mesh_flows()
            .insert(other(i), &entry(LO, Some(0), None))
            .unwrap();
    }
    assert_eq!(bpf.mesh_flows().len(), MAX_MESH_FLOWS);
    let full = bpf.mesh_flows().insert(other(0), &entry(LO, Some(0), None));
    assert!(
        matches!(full, Err(Error::TableFull { capacity, .. }) if capacity == MAX_MESH_FLOWS),
        "{full:?}"
    );
    assert_eq!(bpf.mesh_flows().len(), MAX_MESH_FLOWS);
    assert_eq!(
        bpf.mesh_flows().kernel_flow_count().unwrap(),
        MAX_MESH_FLOWS as u32
    );
    // Replacing an installed flow still works when full.
    bpf.mesh_flows()
        .insert(other(5), &entry(LO, Some(7), None))
        .unwrap();

    // Freeing one slot makes room; the new flow starts from its own seed
    // and zero counters, not the old flow's.
    let old = bpf.mesh_flows().remove(key()).unwrap().unwrap();
    assert_eq!(old.counters.packets, 1);
    let seed = entry(LO, None, Some(42));
    bpf.mesh_flows().insert(other(0), &seed).unwrap();
    assert_eq!(
        bpf.mesh_flows().state(other(0)).unwrap(),
        Some(MeshFlowState {
            in_highest: None,
            out_highest: Some(42),
            counters: MeshFlowCounters::default(),
        })
    );
    assert!(matches!(
        bpf.mesh_flows().insert(key(), &entry(LO, Some(0), None)),
        Err(Error::TableFull { .. })
    ));
    bpf.mesh_flows().clear().unwrap();
    assert!(bpf.mesh_flows().is_empty());
    assert_eq!(bpf.mesh_flows().kernel_flow_count().unwrap(), 0);
}

// ---- abs-send-time -------------------------------------------------------------

/// RFC 8285 one-byte header extension profile.
const ONE_BYTE: u16 = 0xBEDE;
/// Where the extension block's data starts in a frame whose RTP header has
/// no CSRC.
const EXT_DATA: usize = RTP + 12 + 4;
const NS_PER_SEC: u64 = 1_000_000_000;

/// `CLOCK_MONOTONIC` now, in ns (`bpf_ktime_get_ns`'s clock).
fn monotonic_ns() -> u64 {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC exists.
    let rc = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(ts.tv_sec).unwrap() * NS_PER_SEC + u64::try_from(ts.tv_nsec).unwrap()
}

/// The 24-bit abs-send-time of `ns`, as the core computes it
/// (dataplane/core/src/mesh/delay.rs `abs_send_time`, in 128 bits).
fn abs_send_time(ns: u64) -> u32 {
    ((u128::from(ns) * (1 << 18) / u128::from(NS_PER_SEC)) & 0xff_ffff) as u32
}

/// An SRTP packet (ROC 0, signed with `IN_KEY`, PT 96, SSRC `SSRC`) with
/// CSRCs `csrcs` and, if `ext` is some, the X bit and a header extension
/// block `(profile, data)`, the data zero-padded to 32-bit words.
fn srtp_ext(seq: u16, csrcs: &[u32], ext: Option<(u16, &[u8])>, payload_len: usize) -> Vec<u8> {
    let plain = rtp(96, seq, 0x0102_0304 ^ u32::from(seq), SSRC, payload_len);
    let mut p = plain[..12].to_vec();
    p[0] |= u8::try_from(csrcs.len()).unwrap();
    for c in csrcs {
        p.extend_from_slice(&c.to_be_bytes());
    }
    if let Some((profile, data)) = ext {
        p[0] |= 0x10;
        let words = data.len().div_ceil(4);
        p.extend_from_slice(&profile.to_be_bytes());
        p.extend_from_slice(&u16::try_from(words).unwrap().to_be_bytes());
        p.extend_from_slice(data);
        p.resize(p.len() + words * 4 - data.len(), 0);
    }
    p.extend_from_slice(&plain[12..]);
    let t = tag(&IN_KEY, 0, &p);
    p.extend_from_slice(&t);
    p
}

/// Runs `input` with the clock read just before and just after.
fn run_timed(bpf: &RidgeBpf, input: &[u8]) -> (u32, Vec<u8>, u64, u64) {
    let before = monotonic_ns();
    let (verdict, out) = run(bpf, input);
    let after = monotonic_ns();
    (verdict, out, before, after)
}

/// Checks that `out` is `input` forwarded (as [`assert_forwarded`]) with
/// the three bytes at `at` (a frame offset) restamped: the abs-send-time of
/// the kernel's clock minus `epoch` at some point between `before` and
/// `after` (mod 2^24), or 0 when `epoch` is ahead. The tag must verify over
/// the restamped packet.
fn assert_restamped(input: &[u8], out: &[u8], at: usize, epoch: u64, before: u64, after: u64) {
    let got = u32::from_be_bytes([0, out[at], out[at + 1], out[at + 2]]);
    let lo = abs_send_time(before.saturating_sub(epoch));
    let hi = abs_send_time(after.saturating_sub(epoch));
    assert!(
        got.wrapping_sub(lo) & 0xff_ffff <= hi.wrapping_sub(lo) & 0xff_ffff,
        "send time {got:#08x} not in [{lo:#08x}, {hi:#08x}]"
    );
    let mut expected = input.to_vec();
    expected[at..at + 3].copy_from_slice(&out[at..at + 3]);
    let rtp_len = usize::from(u16::from_be_bytes([input[38], input[39]])) - 8;
    assert_forwarded(&expected, out, rtp_len, &dest(LO), 0);
}

/// The element data of an extension whose send time, if the kernel leaves
/// it, is far from any time it could write (half a wrap from now).
fn stale_send_time(epoch: u64) -> [u8; 3] {
    let t = abs_send_time(monotonic_ns().saturating_sub(epoch)) ^ 0x80_0000;
    let b = t.to_be_bytes();
    [b[1], b[2], b[3]]
}

#[test]
fn abs_send_time_is_restamped_with_the_transit_clock() {
    if require("abs_send_time_is_restamped_with_the_transit_clock", root()).is_err() {
        return;
    }
    // The transit core started 10 s ago.
    let epoch = monotonic_ns() - 10 * NS_PER_SEC;
    let mut bpf = mesh_bpf(&MeshFlowEntry {
        send_epoch_ns: Some(epoch),
        ..entry(LO, Some(0), None)
    });
    let [a, b, c] = stale_send_time(epoch);
    // (name, extension data, offset of the send time in it)
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("level, send time", vec![0x10, 0x85, 0x22, a, b, c], 3),
        ("send time only", vec![0x22, a, b, c], 1),
        ("padding first", vec![0x00, 0x00, 0x22, a, b, c], 3),
        ("level, padding", vec![0x10, 0x85, 0x00, 0x22, a, b, c], 4),
        // An id 2 of another length is skipped (the core would not read
        // it either).
        ("id 2 of 2 bytes", vec![0x21, 9, 9, 0x22, a, b, c], 4),
        (
            "fourth element",
            vec![0x10, 1, 0x30, 2, 0x40, 3, 0x22, a, b, c],
            7,
        ),
    ];
    let mut seq = 1;
    for (name, ext, at) in &cases {
        for payload_len in [0usize, 1, 160, 1200] {
            let input = frame(srtp_ext(seq, &[], Some((ONE_BYTE, ext)), payload_len));
            let (verdict, out, before, after) = run_timed(&bpf, &input);
            assert_eq!(verdict, xdp_verdict::TX, "{name}");
            assert_restamped(&input, &out, EXT_DATA + at, epoch, before, after);
            seq += 1;
        }
    }

    // An epoch ahead of the clock: 0.
    bpf.mesh_flows()
        .insert(
            key(),
            &MeshFlowEntry {
                send_epoch_ns: Some(monotonic_ns() + 3600 * NS_PER_SEC),
                ..entry(LO, Some(0), None)
            },
        )
        .unwrap();
    let input = frame(srtp_ext(seq, &[], Some((ONE_BYTE, &[0x22, a, b, c])), 40));
    let (verdict, out) = run(&bpf, &input);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_eq!(&out[EXT_DATA + 1..EXT_DATA + 4], &[0, 0, 0]);
    assert_restamped(&input, &out, EXT_DATA + 1, u64::MAX, 0, 0);

    // An epoch at boot: the time since boot, wrapped.
    bpf.mesh_flows()
        .insert(
            key(),
            &MeshFlowEntry {
                send_epoch_ns: Some(1),
                ..entry(LO, Some(0), None)
            },
        )
        .unwrap();
    let input = frame(srtp_ext(
        seq + 1,
        &[],
        Some((ONE_BYTE, &[0x22, 0, 0, 0])),
        40,
    ));
    let (verdict, out, before, after) = run_timed(&bpf, &input);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_restamped(&input, &out, EXT_DATA + 1, 1, before, after);
    assert_eq!(bpf.counters().unwrap().mesh_forwarded, 4 * 6 + 2);
}

#[test]
fn abs_send_time_is_left_alone_where_it_should_be() {
    if require("abs_send_time_is_left_alone_where_it_should_be", root()).is_err() {
        return;
    }
    let epoch = monotonic_ns() - 10 * NS_PER_SEC;
    let [a, b, c] = stale_send_time(epoch);
    let level_and_time = [0x10, 0x85, 0x22, a, b, c];

    // No epoch: the extension crosses as it is.
    let mut bpf = mesh_bpf(&entry(LO, Some(0), None));
    for (seq, ext) in [
        (1, &level_and_time[..]),
        (2, &[0x22, a, b, c][..]),
        (3, &[0x00, 0x22, a, b, c][..]),
    ] {
        let input = frame(srtp_ext(seq, &[], Some((ONE_BYTE, ext)), 100));
        let (verdict, out) = run(&bpf, &input);
        assert_eq!(verdict, xdp_verdict::TX);
        assert_forwarded(&input, &out, input.len() - RTP, &dest(LO), 0);
    }

    // With an epoch, packets whose send time the core would not read (or
    // that this path does not walk to) are left alone too.
    bpf.mesh_flows()
        .insert(
            key(),
            &MeshFlowEntry {
                send_epoch_ns: Some(epoch),
                ..entry(LO, Some(0), None)
            },
        )
        .unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // No X bit, with what looks like a block where one would start.
    let mut no_x = srtp_ext(10, &[], Some((ONE_BYTE, &level_and_time)), 100);
    no_x[0] &= !0x10;
    let t = tag(&IN_KEY, 0, &no_x[..no_x.len() - TAG_LEN]);
    let at = no_x.len() - TAG_LEN;
    no_x[at..].copy_from_slice(&t);
    cases.push(("no X bit", no_x));
    // One CSRC that looks like a block header, then a real block.
    cases.push((
        "CC 1",
        srtp_ext(11, &[0xBEDE_0001], Some((ONE_BYTE, &[0x22, a, b, c])), 100),
    ));
    // Two CSRCs that read as a block with a send time in it.
    let csrc_time = u32::from_be_bytes([0x22, a, b, c]);
    cases.push((
        "CC 2",
        srtp_ext(
            18,
            &[0xBEDE_0001, csrc_time],
            Some((ONE_BYTE, &[0x22, a, b, c])),
            100,
        ),
    ));
    cases.push((
        "two-byte profile",
        srtp_ext(12, &[], Some((0x1000, &[0x02, 3, a, b, c])), 100),
    ));
    cases.push((
        "id 15 first",
        srtp_ext(13, &[], Some((ONE_BYTE, &[0xF0, 0, 0x22, a, b, c])), 100),
    ));
    // Malformed for the core's parser (only 0x00 is padding), which then
    // reads no send time: skipping it as 1 or as 1 + 2 bytes would both
    // reach the id 2.
    cases.push((
        "id 0 with a length",
        srtp_ext(14, &[], Some((ONE_BYTE, &[0x01, 0, 0, 0x22, a, b, c])), 100),
    ));
    cases.push((
        "fifth element",
        srtp_ext(
            15,
            &[],
            Some((
                ONE_BYTE,
                &[0x10, 1, 0x30, 2, 0x40, 3, 0x50, 4, 0x22, a, b, c],
            )),
            100,
        ),
    ));
    // The element runs past its one-word block (into the payload).
    cases.push((
        "past the block",
        srtp_ext(16, &[], Some((ONE_BYTE, &[0x00, 0x00, 0x00, 0x22])), 100),
    ));
    // A block longer than the packet.
    let mut long_block = srtp_ext(17, &[], Some((ONE_BYTE, &[0x22, a, b, c])), 20);
    long_block[15] = 10; // 10 words: 40 bytes, 20 + 0 left
    let at = long_block.len() - TAG_LEN;
    let t = tag(&IN_KEY, 0, &long_block[..at]);
    long_block[at..].copy_from_slice(&t);
    cases.push(("block past the packet", long_block));
    for (name, payload) in cases {
        let input = frame(payload);
        let (verdict, out) = run(&bpf, &input);
        assert_eq!(verdict, xdp_verdict::TX, "{name}");
        assert_forwarded(&input, &out, input.len() - RTP, &dest(LO), 0);
    }
    assert_eq!(counters(&mut bpf).packets, 9);
}

// ---- the flow count ---------------------------------------------------------------

#[test]
fn flow_count_follows_the_table_and_gates_the_lookup() {
    if require("flow_count_follows_the_table_and_gates_the_lookup", root()).is_err() {
        return;
    }
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let count = |bpf: &mut RidgeBpf| bpf.mesh_flows().kernel_flow_count().unwrap();
    let input = frame(srtp(&IN_KEY, 0, 1, SSRC, 40));
    assert_eq!(count(&mut bpf), 0);
    assert_eq!(run(&bpf, &input), (xdp_verdict::PASS, input.clone()));

    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some(0), None))
        .unwrap();
    assert_eq!(count(&mut bpf), 1);
    let (verdict, out) = run(&bpf, &input);
    assert_eq!(verdict, xdp_verdict::TX);
    assert_forwarded(&input, &out, 12 + 40 + TAG_LEN, &dest(LO), 0);

    // Replacing keeps the count; a refused entry changes nothing.
    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some(1), None))
        .unwrap();
    assert_eq!(count(&mut bpf), 1);
    let other = FlowKey {
        ssrc: 0x3333,
        ..key()
    };
    let mut bad = entry(LO, Some(0), None);
    bad.dest.ts_offset = 1;
    assert!(bpf.mesh_flows().insert(other, &bad).is_err());
    assert_eq!(count(&mut bpf), 1);
    bpf.mesh_flows()
        .insert(other, &entry(LO, Some(0), None))
        .unwrap();
    assert_eq!(count(&mut bpf), 2);

    // Removing counts down; the removed flow goes to userspace, the other
    // still forwards.
    bpf.mesh_flows().remove(key()).unwrap().unwrap();
    assert_eq!(count(&mut bpf), 1);
    assert_eq!(bpf.mesh_flows().remove(key()).unwrap(), None);
    assert_eq!(count(&mut bpf), 1);
    let input2 = frame(srtp(&IN_KEY, 0, 2, SSRC, 40));
    assert_eq!(run(&bpf, &input2), (xdp_verdict::PASS, input2.clone()));
    let theirs = frame(srtp(&IN_KEY, 0, 2, 0x3333, 40));
    assert_eq!(run(&bpf, &theirs).0, xdp_verdict::TX);
    bpf.mesh_flows().remove(other).unwrap().unwrap();
    assert_eq!(count(&mut bpf), 0);
    assert_eq!(run(&bpf, &theirs), (xdp_verdict::PASS, theirs.clone()));

    bpf.mesh_flows()
        .insert(key(), &entry(LO, Some(0), None))
        .unwrap();
    bpf.mesh_flows()
        .insert(other, &entry(LO, Some(0), None))
        .unwrap();
    assert_eq!(count(&mut bpf), 2);
    bpf.mesh_flows().clear().unwrap();
    assert_eq!(count(&mut bpf), 0);
    assert_eq!(bpf.counters().unwrap().mesh_forwarded, 2);
}

// ---- cost ------------------------------------------------------------------------

/// Median kernel-measured time per run of `repeat` runs, over `rounds`;
/// every run must end in `verdict`.
fn median_per_run(
    bpf: &RidgeBpf,
    frame: &[u8],
    verdict: u32,
    repeat: u32,
    rounds: usize,
) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let out = bpf
                .test_run(TestProgram::Xdp, frame, Some(LO), repeat)
                .unwrap();
            assert_eq!(out.verdict, verdict);
            out.per_run
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

/// Per-packet cost of the mesh path (a 1200-byte RTP packet: two SipHash
/// passes) next to the plain forward path on the same size; and what the
/// mesh table costs the other packets: a plain forwarded flow and an
/// unknown SSRC on a media port, with the mesh table empty and with one
/// flow installed. Figures, not assertions: `cargo test -p ridge-ebpf
/// --test mesh_offload -- --nocapture cost`. Each flow maps the packet onto
/// itself (same addresses, SSRC and key), so that every repetition, which
/// sees the previous one's output, takes the same path.
#[test]
fn cost_per_packet_mesh_vs_plain() {
    if require("cost_per_packet_mesh_vs_plain", root()).is_err() {
        return;
    }
    const REPEAT: u32 = 100_000;
    const ROUNDS: usize = 5;
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let k = key();
    let same = Destination {
        dst: k.dst,
        src: k.src,
        ssrc: SSRC,
        seq_offset: 0,
        ts_offset: 0,
        ifindex: LO,
        dst_mac: common::DST_MAC,
        src_mac: common::SRC_MAC,
    };
    let plain_key = FlowKey { ssrc: 0x5555, ..k };
    bpf.flows()
        .insert(
            plain_key,
            &FlowEntry {
                destinations: vec![Destination {
                    ssrc: 0x5555,
                    ..same
                }],
                sample_every: 0,
            },
        )
        .unwrap();
    let small_plain = frame(rtp(96, 100, 0, 0x5555, 200 - 12));
    let unknown = frame(rtp(96, 100, 0, 0x7777, 200 - 12));
    let others = |bpf: &RidgeBpf, table: &str| {
        let p = median_per_run(bpf, &small_plain, xdp_verdict::TX, REPEAT, ROUNDS);
        let u = median_per_run(bpf, &unknown, xdp_verdict::PASS, REPEAT, ROUNDS);
        format!(
            "mesh table {table}: 200-byte plain forward {} ns/packet, unknown SSRC {} ns/packet",
            p.as_nanos(),
            u.as_nanos()
        )
    };
    let mut report = vec![others(&bpf, "empty")];
    // Signed and re-signed with one key, sent back where it came from: the
    // same frame takes the mesh path on every repetition.
    let cost_entry = |send_epoch_ns: Option<u64>| MeshFlowEntry {
        in_key: IN_KEY,
        out_key: IN_KEY,
        dest: same,
        in_highest: Some(100),
        out_highest: Some(100),
        send_epoch_ns,
    };

    bpf.mesh_flows().insert(k, &cost_entry(None)).unwrap();
    report.push(others(&bpf, "with 1 flow"));
    for rtp_len in [1200usize, 200] {
        let mesh = frame(srtp(&IN_KEY, 0, 100, SSRC, rtp_len - 12 - TAG_LEN));
        let plain = frame(rtp(96, 100, 0, 0x5555, rtp_len - 12));
        let before = counters(&mut bpf).packets;
        let m = median_per_run(&bpf, &mesh, xdp_verdict::TX, REPEAT, ROUNDS);
        let p = median_per_run(&bpf, &plain, xdp_verdict::TX, REPEAT, ROUNDS);
        assert_eq!(
            counters(&mut bpf).packets - before,
            u64::from(REPEAT) * ROUNDS as u64,
            "every repetition took the mesh path"
        );
        report.push(format!(
            "{rtp_len}-byte RTP: mesh {} ns/packet, plain forward {} ns/packet",
            m.as_nanos(),
            p.as_nanos()
        ));
    }

    // The same 200-byte mesh packet with [audio level, send time]
    // extensions, without and with the restamp.
    let ext = [0x10, 0x85, 0x22, 1, 2, 3];
    let with_ext = frame(srtp_ext(
        100,
        &[],
        Some((ONE_BYTE, &ext)),
        200 - 20 - TAG_LEN,
    ));
    for epoch in [None, Some(monotonic_ns() - 10 * NS_PER_SEC)] {
        bpf.mesh_flows().insert(k, &cost_entry(epoch)).unwrap();
        let m = median_per_run(&bpf, &with_ext, xdp_verdict::TX, REPEAT, ROUNDS);
        assert_eq!(
            counters(&mut bpf).packets,
            u64::from(REPEAT) * ROUNDS as u64,
            "every repetition took the mesh path"
        );
        report.push(format!(
            "200-byte RTP with abs-send-time, {}: mesh {} ns/packet",
            if epoch.is_some() {
                "restamped"
            } else {
                "left alone"
            },
            m.as_nanos()
        ));
    }
    eprintln!(
        "BPF_PROG_TEST_RUN ridge_xdp, median of {ROUNDS} x {REPEAT}:\n  {}",
        report.join("\n  ")
    );
}
