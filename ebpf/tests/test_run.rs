//! BPF_PROG_TEST_RUN tests: every verdict of the XDP and TC programs on
//! crafted packets, and the rewritten bytes. Loading the object in each test
//! also proves that the verifier accepts every program.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use common::{Frame4, Netns, checksums_valid, dtls, load, require, root, rtcp_sr, rtp, stun, v4};
use ridge_ebpf::{
    Destination, FlowEntry, FlowKey, MAX_RATE_EXEMPT_SOURCES, RateLimit, RidgeBpf, TestProgram,
    tc_verdict, xdp_verdict,
};

const MEDIA_PORT: u16 = 5004;
/// An egress ifindex other than test_run's lo (bpf_redirect does not check it).
const OTHER_IFINDEX: u32 = 7777;

fn media_frame() -> Frame4 {
    Frame4::new(
        v4([10, 99, 0, 1], 4000),
        v4([10, 99, 0, 2], MEDIA_PORT),
        rtp(96, 1000, 90_000, 0x1111_2222, 160),
    )
}

fn guard_bpf() -> RidgeBpf {
    let mut bpf = load();
    bpf.guard()
        .set_media_ports(&[MEDIA_PORT, 5006])
        .expect("media ports");
    bpf
}

fn run(bpf: &RidgeBpf, prog: TestProgram, frame: &[u8]) -> u32 {
    bpf.test_run(prog, frame, None, 1)
        .expect("test_run")
        .verdict
}

#[test]
fn all_programs_pass_the_verifier() {
    if require("all_programs_pass_the_verifier", root()).is_err() {
        return;
    }
    let _ = load();
}

#[test]
fn guard_passes_other_ports_and_valid_media() {
    if require("guard_passes_other_ports_and_valid_media", root()).is_err() {
        return;
    }
    let bpf = guard_bpf();
    let mut other = media_frame();
    other.dst.set_port(53);
    for prog in [TestProgram::Guard, TestProgram::Xdp] {
        assert_eq!(run(&bpf, prog, &other.build()), xdp_verdict::PASS);
        assert_eq!(run(&bpf, prog, &media_frame().build()), xdp_verdict::PASS);
    }
    let c = bpf.counters().unwrap();
    assert_eq!(
        (c.guard_not_media, c.guard_media_ok, c.drops_total()),
        (2, 2, 0)
    );
}

#[test]
fn guard_handles_truncation_at_every_offset() {
    if require("guard_handles_truncation_at_every_offset", root()).is_err() {
        return;
    }
    let bpf = guard_bpf();
    // Untagged IPv4, IPv4 behind QinQ, IPv4 with options, IPv6.
    let mut qinq = media_frame();
    qinq.vlans = vec![0x88a8, 0x8100];
    let mut options = media_frame();
    options.options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL
    let v6 = common::frame6(
        "fd00::1".parse::<Ipv6Addr>().unwrap(),
        "fd00::2".parse::<Ipv6Addr>().unwrap(),
        4000,
        MEDIA_PORT,
        &[],
        &rtp(96, 1, 2, 3, 100),
    );
    let cases: [(&str, Vec<u8>, usize); 4] = [
        ("ipv4", media_frame().build(), 14 + 20),
        ("qinq", qinq.build(), 14 + 8 + 20),
        ("options", options.build(), 14 + 24),
        ("ipv6", v6, 14 + 40),
    ];
    for (name, frame, l4) in cases {
        let mut expected_drops = 0;
        // test_run needs at least an Ethernet header.
        for cut in 14..frame.len() {
            let verdict = run(&bpf, TestProgram::Guard, &frame[..cut]);
            // Until the UDP destination port is readable the packet cannot
            // be attributed to a media port and passes; after that, a frame
            // shorter than the IP length says is a truncated media packet.
            let want = if cut < l4 + 4 {
                xdp_verdict::PASS
            } else {
                xdp_verdict::DROP
            };
            assert_eq!(verdict, want, "{name} cut at {cut} of {}", frame.len());
            if want == xdp_verdict::DROP {
                expected_drops += 1;
            }
        }
        assert_eq!(
            run(&bpf, TestProgram::Guard, &frame),
            xdp_verdict::PASS,
            "{name} whole"
        );
        let c = bpf.counters().unwrap();
        assert!(c.drop_truncated >= expected_drops, "{name}: {c:?}");
    }
    let c = bpf.counters().unwrap();
    assert_eq!(
        c.drops_total(),
        c.drop_truncated,
        "only truncation drops: {c:?}"
    );
}

#[test]
fn guard_drops_bad_lengths_and_fragments() {
    if require("guard_drops_bad_lengths_and_fragments", root()).is_err() {
        return;
    }
    let bpf = guard_bpf();

    // IP total length too small for a UDP header.
    let mut frame = media_frame().build();
    frame[16..18].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(run(&bpf, TestProgram::Guard, &frame), xdp_verdict::DROP);
    assert_eq!(bpf.counters().unwrap().drop_bad_ip_length, 1);

    // UDP length larger, then smaller, than the IP payload.
    for udp_len in [300u16, 20, 4] {
        let mut frame = media_frame().build();
        frame[38..40].copy_from_slice(&udp_len.to_be_bytes());
        assert_eq!(
            run(&bpf, TestProgram::Guard, &frame),
            xdp_verdict::DROP,
            "udp len {udp_len}"
        );
    }
    assert_eq!(bpf.counters().unwrap().drop_bad_udp_length, 3);

    // Ethernet padding after the IP datagram is fine.
    let mut small = media_frame();
    small.payload = rtp(96, 1, 2, 3, 0);
    let mut padded = small.build();
    padded.resize(60, 0);
    assert_eq!(run(&bpf, TestProgram::Guard, &padded), xdp_verdict::PASS);

    // First fragment to a media port: dropped. Later fragments carry no
    // port: passed. Fragments to other ports: passed.
    let mut first = media_frame();
    first.frag = 0x2000; // MF
    assert_eq!(
        run(&bpf, TestProgram::Guard, &first.build()),
        xdp_verdict::DROP
    );
    let mut later = media_frame();
    later.frag = 0x0010; // offset 128 bytes, last
    assert_eq!(
        run(&bpf, TestProgram::Guard, &later.build()),
        xdp_verdict::PASS
    );
    let mut other = first.clone();
    other.dst.set_port(53);
    assert_eq!(
        run(&bpf, TestProgram::Guard, &other.build()),
        xdp_verdict::PASS
    );
    // DF alone is not a fragment.
    let mut df = media_frame();
    df.frag = 0x4000;
    assert_eq!(
        run(&bpf, TestProgram::Guard, &df.build()),
        xdp_verdict::PASS
    );

    // IPv6: a first fragment (fragment header) to a media port is dropped;
    // hop-by-hop options before UDP are parsed through.
    let src: Ipv6Addr = "fd00::1".parse().unwrap();
    let dst: Ipv6Addr = "fd00::2".parse().unwrap();
    let frag_hdr = vec![0, 0, 0x00, 0x01, 0, 0, 0, 42]; // offset 0, M=1
    let f = common::frame6(
        src,
        dst,
        4000,
        MEDIA_PORT,
        &[(44, frag_hdr)],
        &rtp(96, 1, 2, 3, 40),
    );
    assert_eq!(run(&bpf, TestProgram::Guard, &f), xdp_verdict::DROP);
    let later6 = vec![0, 0, 0x00, 0x50, 0, 0, 0, 42]; // offset 80
    let f = common::frame6(
        src,
        dst,
        4000,
        MEDIA_PORT,
        &[(44, later6)],
        &rtp(96, 1, 2, 3, 40),
    );
    assert_eq!(run(&bpf, TestProgram::Guard, &f), xdp_verdict::PASS);
    let hbh = vec![0, 0, 1, 4, 0, 0, 0, 0]; // PadN
    let f = common::frame6(
        src,
        dst,
        4000,
        MEDIA_PORT,
        &[(0, hbh)],
        &rtp(96, 1, 2, 3, 40),
    );
    assert_eq!(run(&bpf, TestProgram::Guard, &f), xdp_verdict::PASS);

    let c = bpf.counters().unwrap();
    assert_eq!(c.drop_fragment, 2, "{c:?}");
    assert_eq!(c.drops_total(), 1 + 3 + 2, "{c:?}");
}

#[test]
fn guard_rate_limits_per_source() {
    if require("guard_rate_limits_per_source", root()).is_err() {
        return;
    }
    let mut bpf = guard_bpf();
    bpf.guard()
        .set_rate_limit(Some(RateLimit {
            packets_per_second: 1,
            burst: 5,
        }))
        .unwrap();
    let frame = media_frame().build();
    for i in 0..5 {
        assert_eq!(
            run(&bpf, TestProgram::Guard, &frame),
            xdp_verdict::PASS,
            "packet {i}"
        );
    }
    assert_eq!(run(&bpf, TestProgram::Guard, &frame), xdp_verdict::DROP);
    // Another source has its own bucket; other ports are not limited.
    let mut other_src = media_frame();
    other_src.src = v4([10, 99, 0, 9], 4000);
    assert_eq!(
        run(&bpf, TestProgram::Guard, &other_src.build()),
        xdp_verdict::PASS
    );
    let mut other_port = media_frame();
    other_port.dst.set_port(53);
    assert_eq!(
        run(&bpf, TestProgram::Guard, &other_port.build()),
        xdp_verdict::PASS
    );
    assert_eq!(bpf.counters().unwrap().drop_rate_limited, 1);
    // Disabling the limit lets the source through again.
    bpf.guard().set_rate_limit(None).unwrap();
    assert_eq!(run(&bpf, TestProgram::Guard, &frame), xdp_verdict::PASS);
    assert!(
        bpf.guard()
            .set_rate_limit(Some(RateLimit {
                packets_per_second: 0,
                burst: 1
            }))
            .is_err()
    );
}

/// Runs `frame` through the guard `n` times; returns how many passed.
fn passed_of(bpf: &RidgeBpf, frame: &[u8], n: usize) -> usize {
    (0..n)
        .filter(|_| run(bpf, TestProgram::Guard, frame) == xdp_verdict::PASS)
        .count()
}

#[test]
fn guard_never_rate_limits_exempt_sources() {
    if require("guard_never_rate_limits_exempt_sources", root()).is_err() {
        return;
    }
    let mut bpf = guard_bpf();
    bpf.guard()
        .set_rate_limit(Some(RateLimit {
            packets_per_second: 1,
            burst: 5,
        }))
        .unwrap();
    let peer = media_frame().build(); // from 10.99.0.1
    let mut client = media_frame();
    client.src = v4([10, 99, 0, 9], 4000);
    let client = client.build();
    let peer6: Ipv6Addr = "fd00::1".parse().unwrap();
    let frame6 = |src: Ipv6Addr| {
        common::frame6(
            src,
            "fd00::2".parse().unwrap(),
            4000,
            MEDIA_PORT,
            &[],
            &rtp(96, 1, 2, 3, 100),
        )
    };

    // The IPv4 peer given as an IPv4-mapped IPv6 address and again as IPv4:
    // one source.
    let mapped: IpAddr = "::ffff:10.99.0.1".parse().unwrap();
    let v4_peer: IpAddr = "10.99.0.1".parse().unwrap();
    bpf.guard()
        .set_rate_exempt(&[mapped, IpAddr::V6(peer6), v4_peer])
        .unwrap();
    assert_eq!(bpf.guard().rate_exempt(), vec![v4_peer, IpAddr::V6(peer6)]);

    // The same flood from a peer and from a client: the peer's all passes,
    // the client gets its burst.
    assert_eq!(passed_of(&bpf, &peer, 500), 500);
    assert_eq!(passed_of(&bpf, &frame6(peer6), 500), 500);
    assert_eq!(passed_of(&bpf, &client, 500), 5);
    let c = bpf.counters().unwrap();
    assert_eq!(c.drop_rate_limited, 495, "{c:?}");
    assert_eq!(c.guard_rate_exempt, 1000, "{c:?}");
    assert_eq!(c.guard_media_ok, 1005, "{c:?}");
    // Many repetitions in the kernel: still nothing dropped.
    let out = bpf
        .test_run(TestProgram::Guard, &peer, None, 100_000)
        .unwrap();
    assert_eq!(out.verdict, xdp_verdict::PASS);
    let c = bpf.counters().unwrap();
    assert_eq!((c.drop_rate_limited, c.guard_rate_exempt), (495, 101_000));
    // ridge_xdp runs the same guard.
    assert_eq!(run(&bpf, TestProgram::Xdp, &peer), xdp_verdict::PASS);

    // Exempt from the rate only: a malformed packet from a peer still drops.
    let mut bad = peer.clone();
    bad[38..40].copy_from_slice(&300u16.to_be_bytes());
    assert_eq!(run(&bpf, TestProgram::Guard, &bad), xdp_verdict::DROP);
    let mut frag = media_frame();
    frag.frag = 0x2000;
    assert_eq!(
        run(&bpf, TestProgram::Guard, &frag.build()),
        xdp_verdict::DROP
    );
    let c = bpf.counters().unwrap();
    assert_eq!((c.drop_bad_udp_length, c.drop_fragment), (1, 1), "{c:?}");

    // Removing the IPv4 peer restores its limit (a fresh bucket: exempt
    // packets took no rate state); the IPv6 one stays exempt.
    bpf.guard().set_rate_exempt(&[IpAddr::V6(peer6)]).unwrap();
    assert_eq!(bpf.guard().rate_exempt(), vec![IpAddr::V6(peer6)]);
    assert_eq!(passed_of(&bpf, &peer, 50), 5);
    assert_eq!(passed_of(&bpf, &frame6(peer6), 50), 50);
    // An IPv6 neighbour of the peer is not exempt.
    assert_eq!(passed_of(&bpf, &frame6("fd00::3".parse().unwrap()), 50), 5);
    bpf.guard().set_rate_exempt(&[]).unwrap();
    assert!(bpf.guard().rate_exempt().is_empty());
    assert_eq!(passed_of(&bpf, &frame6(peer6), 50), 5);

    // Without a rate limit there is nothing to be exempt from: the
    // exemption counter stays.
    bpf.guard().set_rate_exempt(&[v4_peer]).unwrap();
    bpf.guard().set_rate_limit(None).unwrap();
    let before = bpf.counters().unwrap().guard_rate_exempt;
    assert_eq!(passed_of(&bpf, &peer, 10), 10);
    assert_eq!(bpf.counters().unwrap().guard_rate_exempt, before);
    // Setting a limit again keeps the exemption.
    bpf.guard()
        .set_rate_limit(Some(RateLimit {
            packets_per_second: 1,
            burst: 1,
        }))
        .unwrap();
    assert_eq!(passed_of(&bpf, &peer, 10), 10);
    assert_eq!(bpf.counters().unwrap().guard_rate_exempt, before + 10);
}

#[test]
fn rate_exempt_set_is_bounded() {
    if require("rate_exempt_set_is_bounded", root()).is_err() {
        return;
    }
    let mut bpf = load();
    let addrs = |n: usize, base: u32| -> Vec<IpAddr> {
        (0..n as u32)
            .map(|i| IpAddr::V4((0x0a00_0000 + base + i).into()))
            .collect()
    };
    // The map holds the whole bound.
    let full = addrs(MAX_RATE_EXEMPT_SOURCES, 0);
    bpf.guard().set_rate_exempt(&full).unwrap();
    assert_eq!(bpf.guard().rate_exempt(), full);
    // One more is refused and changes nothing.
    let over = addrs(MAX_RATE_EXEMPT_SOURCES + 1, 0);
    assert!(bpf.guard().set_rate_exempt(&over).is_err());
    assert_eq!(bpf.guard().rate_exempt().len(), MAX_RATE_EXEMPT_SOURCES);
    // Replacing a full set with another full set fits: removals go first.
    let other = addrs(MAX_RATE_EXEMPT_SOURCES, 100_000);
    bpf.guard().set_rate_exempt(&other).unwrap();
    assert_eq!(bpf.guard().rate_exempt(), other);
    bpf.guard().set_rate_exempt(&[]).unwrap();
    assert!(bpf.guard().rate_exempt().is_empty());
}

fn flow_key() -> FlowKey {
    FlowKey {
        src: v4([10, 99, 0, 1], 4000),
        dst: v4([10, 99, 0, 2], MEDIA_PORT),
        ssrc: 0x1111_2222,
    }
}

fn dest(i: u8, ifindex: u32) -> Destination {
    Destination {
        dst: v4([10, 98, 0, 10 + i], 6000 + u16::from(i)),
        src: v4([10, 98, 0, 1], 5006),
        ssrc: 0xabcd_0000 + u32::from(i),
        seq_offset: 60_000 + u16::from(i),
        ts_offset: 0xffff_f000 + u32::from(i),
        ifindex,
        dst_mac: [0x02, 1, 2, 3, 4, 10 + i],
        src_mac: [0x02, 9, 9, 9, 9, 9],
    }
}

/// Checks that `out` is `input` rewritten for `d`.
fn assert_rewritten(input: &[u8], out: &[u8], d: &Destination) {
    assert_eq!(out.len(), input.len());
    assert_eq!(&out[0..6], &d.dst_mac);
    assert_eq!(&out[6..12], &d.src_mac);
    assert_eq!(out[22], 64, "fresh TTL");
    assert_eq!(&out[26..30], &d.src.ip().octets());
    assert_eq!(&out[30..34], &d.dst.ip().octets());
    assert_eq!(&out[34..36], &d.src.port().to_be_bytes());
    assert_eq!(&out[36..38], &d.dst.port().to_be_bytes());
    let seq = u16::from_be_bytes([input[44], input[45]]).wrapping_add(d.seq_offset);
    assert_eq!(&out[44..46], &seq.to_be_bytes());
    let ts = u32::from_be_bytes(input[46..50].try_into().unwrap()).wrapping_add(d.ts_offset);
    assert_eq!(&out[46..50], &ts.to_be_bytes());
    assert_eq!(&out[50..54], &d.ssrc.to_be_bytes());
    assert_eq!(&out[54..], &input[54..], "payload untouched");
    assert_eq!(
        &out[12..22],
        &input[12..22],
        "ethertype, IP version..id, flags"
    );
    checksums_valid(out).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn xdp_forwards_installed_flows_with_valid_checksums() {
    if require("xdp_forwards_installed_flows_with_valid_checksums", root()).is_err() {
        return;
    }
    let mut bpf = guard_bpf();
    // test_run's packets arrive on lo (ifindex 1, in every namespace).
    let d = dest(0, 1);
    bpf.flows()
        .insert(
            flow_key(),
            &FlowEntry {
                destinations: vec![d],
                sample_every: 0,
            },
        )
        .unwrap();
    let input = media_frame().build();

    // Egress interface == ingress interface: XDP_TX.
    let out = bpf.test_run(TestProgram::Xdp, &input, Some(1), 1).unwrap();
    assert_eq!(out.verdict, xdp_verdict::TX);
    assert_rewritten(&input, &out.data, &d);
    // Another egress interface: XDP_REDIRECT.
    let d = dest(0, OTHER_IFINDEX);
    bpf.flows()
        .insert(
            flow_key(),
            &FlowEntry {
                destinations: vec![d],
                sample_every: 0,
            },
        )
        .unwrap();
    let out = bpf.test_run(TestProgram::Xdp, &input, Some(1), 1).unwrap();
    assert_eq!(out.verdict, xdp_verdict::REDIRECT);
    assert_rewritten(&input, &out.data, &d);
    // The guard-only program never forwards.
    assert_eq!(run(&bpf, TestProgram::Guard, &input), xdp_verdict::PASS);

    let counters = bpf.flows().counters(flow_key()).unwrap().unwrap();
    assert_eq!((counters.packets, counters.copies), (2, 2));
    assert_eq!(counters.bytes, 2 * input.len() as u64);
    let c = bpf.counters().unwrap();
    assert_eq!((c.forward_xdp_tx, c.forward_xdp_redirect), (1, 1));

    // Many rewrites with varied header values keep both checksums valid
    // (incremental updates, end-around carries).
    for i in 0..2000u32 {
        let mut f = media_frame();
        f.payload = rtp(
            96,
            (i * 7919) as u16,
            i.wrapping_mul(2_654_435_761),
            0x1111_2222,
            (i % 50) as usize,
        );
        f.src = v4([10, 99, 0, 1], 4000);
        f.ttl = (i % 255) as u8 + 1;
        let mut d = dest((i % 200) as u8, OTHER_IFINDEX);
        d.seq_offset = (i * 31) as u16;
        d.ts_offset = i.wrapping_mul(0x9e37_79b9);
        d.ssrc = i.wrapping_mul(0x85eb_ca6b);
        bpf.flows()
            .insert(
                flow_key(),
                &FlowEntry {
                    destinations: vec![d],
                    sample_every: 0,
                },
            )
            .unwrap();
        let input = f.build();
        let out = bpf.test_run(TestProgram::Xdp, &input, None, 1).unwrap();
        assert_eq!(out.verdict, xdp_verdict::REDIRECT);
        assert_rewritten(&input, &out.data, &d);
    }

    // Removing the entry sends the flow back to userspace.
    assert!(bpf.flows().remove(flow_key()).unwrap().is_some());
    assert_eq!(run(&bpf, TestProgram::Xdp, &input), xdp_verdict::PASS);
    assert!(bpf.flows().list().unwrap().is_empty());
}

#[test]
fn xdp_keeps_zero_udp_checksum() {
    if require("xdp_keeps_zero_udp_checksum", root()).is_err() {
        return;
    }
    let mut bpf = guard_bpf();
    let d = dest(1, OTHER_IFINDEX);
    bpf.flows()
        .insert(
            flow_key(),
            &FlowEntry {
                destinations: vec![d],
                sample_every: 0,
            },
        )
        .unwrap();
    let mut f = media_frame();
    f.zero_checksum = true;
    let input = f.build();
    let out = bpf.test_run(TestProgram::Xdp, &input, None, 1).unwrap();
    assert_eq!(out.verdict, xdp_verdict::REDIRECT);
    assert_eq!(&out.data[40..42], &[0, 0], "UDP checksum stays 0");
    assert_rewritten(&input, &out.data, &d);
}

#[test]
fn xdp_hands_rtcp_stun_dtls_and_others_to_userspace() {
    if require("xdp_hands_rtcp_stun_dtls_and_others_to_userspace", root()).is_err() {
        return;
    }
    let mut bpf = guard_bpf();
    bpf.flows()
        .insert(
            flow_key(),
            &FlowEntry {
                destinations: vec![dest(0, 1)],
                sample_every: 0,
            },
        )
        .unwrap();
    let key = flow_key();
    let mut cases: Vec<(&str, Frame4)> = Vec::new();
    // RTCP whose first SSRC equals the flow's SSRC bytes at RTP's offset.
    let mut sr = rtcp_sr(0x1111_2222);
    sr[8..12].copy_from_slice(&0x1111_2222u32.to_be_bytes());
    for pt in [200u8, 201, 202, 203, 204] {
        let mut p = sr.clone();
        p[1] = pt;
        cases.push(("rtcp", Frame4::new(key.src, key.dst, p)));
    }
    cases.push(("stun", Frame4::new(key.src, key.dst, stun())));
    cases.push(("dtls", Frame4::new(key.src, key.dst, dtls())));
    cases.push((
        "other ssrc",
        Frame4::new(key.src, key.dst, rtp(96, 1, 2, 0x9999, 20)),
    ));
    cases.push((
        "short rtp",
        Frame4::new(
            key.src,
            key.dst,
            rtp(96, 1, 2, 0x1111_2222, 0)[..11].to_vec(),
        ),
    ));
    let mut opts = Frame4::new(key.src, key.dst, rtp(96, 1, 2, 0x1111_2222, 20));
    opts.options = vec![1, 1, 1, 0];
    cases.push(("ip options", opts));
    let mut vlan = Frame4::new(key.src, key.dst, rtp(96, 1, 2, 0x1111_2222, 20));
    vlan.vlans = vec![0x8100];
    cases.push(("vlan", vlan));
    for (name, f) in cases {
        let input = f.build();
        let out = bpf.test_run(TestProgram::Xdp, &input, Some(1), 1).unwrap();
        assert_eq!(out.verdict, xdp_verdict::PASS, "{name}");
        assert_eq!(out.data, input, "{name} untouched");
    }
    assert_eq!(bpf.flows().counters(key).unwrap().unwrap().packets, 0);
}

#[test]
fn xdp_samples_one_in_n_to_userspace() {
    if require("xdp_samples_one_in_n_to_userspace", root()).is_err() {
        return;
    }
    // Sampling counts per CPU: stay on one.
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();

    let mut bpf = guard_bpf();
    bpf.flows()
        .insert(
            flow_key(),
            &FlowEntry {
                destinations: vec![dest(0, 1)],
                sample_every: 4,
            },
        )
        .unwrap();
    let input = media_frame().build();
    let verdicts: Vec<u32> = (0..12)
        .map(|_| run(&bpf, TestProgram::Xdp, &input))
        .collect();
    let p = xdp_verdict::PASS;
    let r = xdp_verdict::TX;
    assert_eq!(verdicts, [p, r, r, r, p, r, r, r, p, r, r, r]);
    let c = bpf.flows().counters(flow_key()).unwrap().unwrap();
    assert_eq!((c.sampled, c.packets), (3, 9));
}

#[test]
fn xdp_leaves_fan_out_to_tc_and_tc_fans_out() {
    if require(
        "xdp_leaves_fan_out_to_tc_and_tc_fans_out",
        common::ip_tool(),
    )
    .is_err()
    {
        return;
    }
    let mut bpf = guard_bpf();
    let dests: Vec<Destination> = (0..3).map(|i| dest(i, 1)).collect();
    bpf.flows()
        .insert(
            flow_key(),
            &FlowEntry {
                destinations: dests.clone(),
                sample_every: 0,
            },
        )
        .unwrap();
    let input = media_frame().build();
    assert_eq!(run(&bpf, TestProgram::Xdp, &input), xdp_verdict::PASS);

    // The TC program really sends its clones: do it in a private namespace.
    let ns = Netns::new("tc-run");
    let (out, zero) = ns.enter(|| {
        let out = bpf.test_run(TestProgram::Fanout, &input, None, 1).unwrap();
        let mut f = media_frame();
        f.zero_checksum = true;
        let zero = bpf
            .test_run(TestProgram::Fanout, &f.build(), None, 1)
            .unwrap();
        (out, zero)
    });
    assert_eq!(out.verdict, tc_verdict::REDIRECT);
    assert_rewritten(&input, &out.data, &dests[2]);
    assert_eq!(zero.verdict, tc_verdict::REDIRECT);
    assert_eq!(&zero.data[40..42], &[0, 0], "UDP checksum stays 0");
    let c = bpf.flows().counters(flow_key()).unwrap().unwrap();
    assert_eq!((c.packets, c.copies, c.errors), (2, 6, 0), "{c:?}");

    // Not installed, RTCP: untouched.
    let ns2 = Netns::new("tc-run2");
    let mut other = media_frame();
    other.payload = rtcp_sr(0x1111_2222);
    let rtcp = ns2.enter(|| {
        bpf.test_run(TestProgram::Fanout, &other.build(), None, 1)
            .unwrap()
    });
    assert_eq!(rtcp.verdict, tc_verdict::OK);

    // A single-destination flow belongs to XDP: what XDP passed (a sample)
    // goes up to userspace, TC leaves it alone.
    bpf.flows()
        .insert(
            flow_key(),
            &FlowEntry {
                destinations: vec![dests[0]],
                sample_every: 0,
            },
        )
        .unwrap();
    let ns3 = Netns::new("tc-run3");
    let single = ns3.enter(|| bpf.test_run(TestProgram::Fanout, &input, None, 1).unwrap());
    assert_eq!(single.verdict, tc_verdict::OK);
    assert_eq!(single.data, input, "untouched");
}

#[test]
fn flow_table_rejects_bad_entries() {
    if require("flow_table_rejects_bad_entries", root()).is_err() {
        return;
    }
    let mut bpf = load();
    let none = FlowEntry {
        destinations: vec![],
        sample_every: 0,
    };
    assert!(bpf.flows().insert(flow_key(), &none).is_err());
    let nine = FlowEntry {
        destinations: (0..9).map(|i| dest(i, 1)).collect(),
        sample_every: 0,
    };
    assert!(bpf.flows().insert(flow_key(), &nine).is_err());
    let eight = FlowEntry {
        destinations: (0..8).map(|i| dest(i, 1)).collect(),
        sample_every: 0,
    };
    bpf.flows().insert(flow_key(), &eight).unwrap();
    assert_eq!(bpf.flows().get(flow_key()).unwrap(), Some(eight));
    assert_eq!(bpf.flows().list().unwrap().len(), 1);
    bpf.flows().clear().unwrap();
    assert_eq!(bpf.flows().get(flow_key()).unwrap(), None);
    assert_eq!(bpf.flows().remove(flow_key()).unwrap(), None);
}
