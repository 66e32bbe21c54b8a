//! `Sfu::plain_flows`: which plain-RTP streams a kernel fast path may
//! forward, with offsets that reproduce the core's own rewrite, and how the
//! answer follows subscriptions, payload types and teardown. Simulated time.

mod common;

use std::net::SocketAddr;

use common::*;
use ridge_sfu::{PlainFlow, RtpDirection};

const ROOM: &str = "offload";
const PT: u8 = 96;
const PUB_SSRC: u32 = 0x5eed_0001;

fn a() -> SocketAddr {
    remote(10, 4000)
}

fn key(seq: u16) -> bool {
    seq == 1000
}

fn send(node: &mut Node, seq: u16) -> Vec<Sent> {
    let mut sent = node.advance(ms(20));
    let payload = vp8_payload(key(seq), 640, 480, &seq.to_be_bytes(), 60);
    let ts = 90_000 + 3000 * u32::from(seq.wrapping_sub(1000));
    sent.extend(node.receive(a(), &rtp(PT, seq, ts, PUB_SSRC, false, &payload)));
    sent
}

fn subscribe(
    node: &mut Node,
    name: &str,
    remote: SocketAddr,
    pt: u8,
    ssrc: u32,
) -> ridge_sfu::PeerId {
    let p = node.sfu.join(ROOM, name, true).unwrap();
    node.plain_video_endpoint(p, RtpDirection::Subscribe, remote, pt, Some(ssrc))
        .peer
}

fn only(flows: Vec<PlainFlow>) -> PlainFlow {
    assert_eq!(flows.len(), 1, "{flows:?}");
    flows.into_iter().next().unwrap()
}

#[test]
fn offsets_reproduce_the_cores_rewrite_and_follow_subscriptions() {
    let mut node = Node::new(|_| {});
    let publisher = node.sfu.join(ROOM, "pub", true).unwrap();
    let info = node.plain_video_endpoint(publisher, RtpDirection::Publish, a(), PT, Some(PUB_SSRC));
    let track = info.track.unwrap();
    let b = subscribe(&mut node, "b", remote(20, 4002), PT, 0xb0b0);
    let c = subscribe(&mut node, "c", remote(30, 4004), PT, 0xc0c0);
    node.drain();
    assert!(
        node.sfu.plain_flows(8).is_empty(),
        "no packet yet: the offsets are not chosen"
    );

    let mut out = Vec::new();
    for seq in 1000..1010u16 {
        out.extend(send(&mut node, seq));
    }
    let flow = only(node.sfu.plain_flows(8));
    assert_eq!(
        (
            flow.publisher,
            flow.track,
            flow.source,
            flow.local,
            flow.ssrc
        ),
        (info.peer, track, a(), LOCAL, PUB_SSRC)
    );
    assert_eq!(flow.destinations.len(), 2);
    for d in &flow.destinations {
        let got = to(&out, d.remote);
        assert_eq!(got.len(), 10);
        for (i, s) in got.iter().enumerate() {
            let r = parse_rtp(&s.contents);
            let seq = 1000 + i as u16;
            assert_eq!(r.ssrc, d.ssrc);
            assert_eq!(r.pt, PT);
            assert_eq!(r.seq, seq.wrapping_add(d.seq_offset), "seq of packet {i}");
            assert_eq!(
                r.ts,
                (90_000 + 3000 * u32::from(seq - 1000)).wrapping_add(d.ts_offset),
                "ts of packet {i}"
            );
        }
    }
    let peers: Vec<_> = flow.destinations.iter().map(|d| d.peer).collect();
    assert_eq!(peers, vec![b, c]);

    // Too many destinations for the caller: none.
    assert!(node.sfu.plain_flows(1).is_empty());

    // A subscriber that needs another payload type keeps the track in
    // userspace (a kernel rewrite keeps the PT) ...
    let d = subscribe(&mut node, "d", remote(40, 4006), 100, 0xd0d0);
    assert!(node.sfu.plain_flows(8).is_empty());
    // ... and once it is gone, the flow is back with the same offsets.
    let now = node.now;
    node.sfu.remove_peer(now, d).unwrap();
    let again = only(node.sfu.plain_flows(8));
    assert_eq!(again, flow);

    // A new subscriber of the same PT waits for a keyframe: not yet.
    let e = subscribe(&mut node, "e", remote(50, 4008), PT, 0xe0e0);
    send(&mut node, 1010);
    assert!(node.sfu.plain_flows(8).is_empty(), "e waits for a keyframe");
    let now = node.now;
    node.sfu.remove_peer(now, e).unwrap();

    // Removing a subscriber shrinks the flow; the publisher gone ends it.
    let now = node.now;
    node.sfu.remove_peer(now, c).unwrap();
    assert_eq!(only(node.sfu.plain_flows(8)).destinations.len(), 1);
    node.sfu.remove_peer(now, info.peer).unwrap();
    assert!(node.sfu.plain_flows(8).is_empty());
    let _ = b;
}

#[test]
fn a_header_extension_keeps_the_track_in_userspace() {
    let mut node = Node::new(|_| {});
    let publisher = node.sfu.join(ROOM, "pub", true).unwrap();
    node.plain_video_endpoint(publisher, RtpDirection::Publish, a(), PT, Some(PUB_SSRC));
    subscribe(&mut node, "b", remote(20, 4002), PT, 0xb0b0);
    send(&mut node, 1000);
    assert_eq!(node.sfu.plain_flows(8).len(), 1);
    // The same packet with a one-byte header extension: the core would
    // strip it, a kernel rewrite would not.
    node.advance(ms(20));
    let mut pkt = rtp(PT, 1001, 93_000, PUB_SSRC, false, &[0x90, 0, 0, 0]);
    pkt[0] |= 0x10;
    pkt.splice(12..12, [0xbe, 0xde, 0, 1, 0x10, 0xff, 0, 0]);
    node.receive(a(), &pkt);
    assert!(node.sfu.plain_flows(8).is_empty());
    send(&mut node, 1002);
    assert_eq!(node.sfu.plain_flows(8).len(), 1);
}

#[test]
fn kernel_forwarded_gaps_are_not_loss() {
    let mut node = Node::new(|_| {});
    let publisher = node.sfu.join(ROOM, "pub", true).unwrap();
    let info = node.plain_video_endpoint(publisher, RtpDirection::Publish, a(), PT, Some(PUB_SSRC));
    subscribe(&mut node, "b", remote(20, 4002), PT, 0xb0b0);
    send(&mut node, 1000);
    node.drain();
    node.sfu.set_kernel_forwarded(&[info.peer]);
    // Samples: 1 in 10 reach the core.
    let mut sent = Vec::new();
    for seq in (1010..1100u16).step_by(10) {
        sent.extend(send(&mut node, seq));
    }
    assert_eq!(node.stats().counters.packets_lost, 0);
    assert!(
        to(&sent, a()).is_empty(),
        "no NACK upstream: {:?}",
        to(&sent, a())
    );
    // Back to userspace: a gap is loss again and is NACKed.
    node.sfu.set_kernel_forwarded(&[]);
    let sent = send(&mut node, 1105);
    assert_eq!(node.stats().counters.packets_lost, 14, "1091 ..= 1104");
    assert_eq!(to(&sent, a()).len(), 1, "one NACK");
}
