//! Plain RTP endpoints (no ICE, no DTLS) through the sans-IO core, with a
//! simulated clock: routing and rewriting, drop accounting, NACK answers from
//! the retransmission buffer, upstream NACKs, and keyframe-request throttling.

mod common;

use std::net::SocketAddr;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ridge_sfu::packet::{self, PacketClass};
use ridge_sfu::{
    DropReason, ParticipantId, PeerId, RtpDirection, SfuConfig, SfuError, SfuEvent, SpecError,
    TrackId, TrackKind,
};

const ROOM: &str = "plain";
const A: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(192, 0, 2, 10),
    4000,
));
const PUB_SSRC: u32 = 0x1111_2222;
const PUB_PT: u8 = 96;
const B_SSRC: u32 = 0xb0b0_0001;
const B_PT: u8 = 100;
const C_SSRC: u32 = 0xc0c0_0002;
const C_PT: u8 = 111;

fn b_addr() -> SocketAddr {
    remote(20, 4002)
}

fn c_addr() -> SocketAddr {
    remote(30, 4004)
}

/// A room with one plain video publisher (A) and two plain subscribers (B, C).
struct Fixture {
    node: Node,
    publisher: ParticipantId,
    pub_peer: PeerId,
    track: TrackId,
    b_part: ParticipantId,
    b_peer: PeerId,
    c_part: ParticipantId,
    c_peer: PeerId,
}

impl Fixture {
    fn new(configure: impl FnOnce(&mut SfuConfig)) -> Self {
        let mut node = Node::new(configure);
        let publisher = node.sfu.join(ROOM, "alice", true).unwrap();
        let info =
            node.plain_video_endpoint(publisher, RtpDirection::Publish, A, PUB_PT, Some(PUB_SSRC));
        assert_eq!(info.ssrc, PUB_SSRC);
        assert_eq!(info.local, LOCAL);
        let track = info.track.expect("publishing creates a track");
        let mut sub = |identity: &str, remote: SocketAddr, pt: u8, ssrc: u32| {
            let p = node.sfu.join(ROOM, identity, true).unwrap();
            let info =
                node.plain_video_endpoint(p, RtpDirection::Subscribe, remote, pt, Some(ssrc));
            assert_eq!(info.ssrc, ssrc);
            assert_eq!(info.track, Some(track), "bound to the room's video track");
            (p, info.peer)
        };
        let (b_part, b_peer) = sub("bob", b_addr(), B_PT, B_SSRC);
        let (c_part, c_peer) = sub("carol", c_addr(), C_PT, C_SSRC);
        let (sent, events) = node.drain();
        // The first subscriber to bind asks the publisher for a keyframe to
        // start on; the second one, at the same instant, is throttled.
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].destination, A);
        assert_eq!(
            parse_rtcp(&sent[0].contents),
            vec![Rtcp::Pli {
                media_ssrc: PUB_SSRC
            }]
        );
        let c = node.sfu.stats().counters;
        assert_eq!(
            (c.keyframe_requests_forwarded, c.keyframe_requests_throttled),
            (1, 1)
        );
        assert!(events.iter().any(|e| matches!(e,
            SfuEvent::TrackPublished { room, track: t } if room == ROOM && t.track == track
                && t.participant == publisher && t.kind == TrackKind::Video && t.rids.is_empty())));
        Fixture {
            node,
            publisher,
            pub_peer: info.peer,
            track,
            b_part,
            b_peer,
            c_part,
            c_peer,
        }
    }

    /// Sends the publisher's packet `i` of a 30 fps stream starting at seq
    /// 1000 / ts 90000 (keyframe when `key`), advancing the clock 33 ms first.
    fn send(&mut self, seq: u16, key: bool) -> (Vec<u8>, Vec<Sent>) {
        let mut sent = self.node.advance(ms(33));
        let payload = payload_for(seq, key);
        let ts = ts_for(seq);
        let datagram = rtp(PUB_PT, seq, ts, PUB_SSRC, seq.is_multiple_of(3), &payload);
        sent.extend(self.node.receive(A, &datagram));
        (datagram, sent)
    }
}

fn payload_for(seq: u16, key: bool) -> Vec<u8> {
    vp8_payload(
        key,
        640,
        480,
        &seq.to_be_bytes(),
        40 + usize::from(seq % 50),
    )
}

fn ts_for(seq: u16) -> u32 {
    90_000 + 3000 * u32::from(seq.wrapping_sub(1000))
}

/// Checks that `got` are `sent` (publisher datagrams) rewritten for one
/// subscriber: its SSRC and PT, consecutive sequence numbers, one constant
/// timestamp offset, same marker and payload. Returns the first output seq.
fn assert_rewritten(got: &[&Sent], sent: &[Vec<u8>], pt: u8, ssrc: u32) -> u16 {
    assert_eq!(got.len(), sent.len(), "one output per input packet");
    let first = parse_rtp(&got[0].contents);
    let first_in = parse_rtp(&sent[0]);
    let ts_offset = first.ts.wrapping_sub(first_in.ts);
    for (i, (out, input)) in got.iter().zip(sent).enumerate() {
        assert_eq!(out.source, LOCAL);
        let out = parse_rtp(&out.contents);
        let input = parse_rtp(input);
        assert_eq!(out.ssrc, ssrc, "packet {i}: subscriber SSRC");
        assert_eq!(out.pt, pt, "packet {i}: subscriber payload type");
        assert_eq!(
            out.seq,
            first.seq.wrapping_add(i as u16),
            "packet {i}: consecutive"
        );
        assert_eq!(
            out.ts,
            input.ts.wrapping_add(ts_offset),
            "packet {i}: same ts offset"
        );
        assert_eq!(out.marker, input.marker, "packet {i}: marker");
        assert_eq!(out.payload, input.payload, "packet {i}: payload");
    }
    first.seq
}

fn assert_only_rtcp_to_publisher(sent: &[Sent]) {
    for s in to(sent, A) {
        assert_eq!(
            packet::classify(&s.contents),
            PacketClass::Rtcp,
            "{:02x?}",
            s.contents
        );
    }
}

#[test]
fn routes_every_packet_to_each_subscriber_with_its_own_numbering() {
    let mut f = Fixture::new(|_| {});
    let mut inputs = Vec::new();
    let mut all = Vec::new();
    for seq in 1000..1030u16 {
        let (d, sent) = f.send(seq, seq % 10 == 0);
        inputs.push(d);
        all.extend(sent);
    }
    assert_only_rtcp_to_publisher(&all);
    assert!(
        to(&all, A).is_empty(),
        "no loss and a keyframe first: no feedback"
    );
    let b_first = assert_rewritten(&to(&all, b_addr()), &inputs, B_PT, B_SSRC);
    let c_first = assert_rewritten(&to(&all, c_addr()), &inputs, C_PT, C_SSRC);
    assert!(
        b_first < 0x4000 && c_first < 0x4000,
        "output starts low: {b_first} {c_first}"
    );
    assert_eq!(all.len(), 60, "nothing else was sent: {all:?}");

    let stats = f.node.stats();
    assert_eq!(stats.counters.packets_in, 30);
    assert_eq!(
        stats.counters.packets_out,
        60 + 1,
        "+ the PLI sent at setup"
    );
    assert_eq!(stats.drops, [0; DropReason::ALL.len()]);
    let peer = |id| stats.peers.iter().find(|p| p.peer == id).unwrap().counters;
    assert_eq!(peer(f.pub_peer).packets_in, 30);
    assert_eq!(peer(f.b_peer).packets_out, 30);
    assert_eq!(peer(f.c_peer).packets_out, 30);
    assert_eq!(f.node.sfu.current_layer(f.b_peer), Some(None));
}

#[test]
fn subscribers_start_at_a_keyframe_and_ask_for_one() {
    // Setting up sent the first PLI (see Fixture::new).
    let mut f = Fixture::new(|c| c.keyframe_request_interval = ms(500));
    let mut all = Vec::new();
    for seq in 1000..1003u16 {
        all.extend(f.send(seq, false).1);
    }
    assert!(
        all.is_empty(),
        "interframes wait, and the request repeats are throttled: {all:?}"
    );
    let c = f.node.stats().counters;
    assert_eq!(
        (c.keyframe_requests_forwarded, c.keyframe_requests_throttled),
        (1, 4)
    );
    // Still waiting once the interval has passed: one more PLI.
    f.node.advance(ms(500));
    let (_, sent) = f.send(1003, false);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].destination, A);
    assert_eq!(
        parse_rtcp(&sent[0].contents),
        vec![Rtcp::Pli {
            media_ssrc: PUB_SSRC
        }]
    );
    let c = f.node.stats().counters;
    assert_eq!(
        (c.keyframe_requests_forwarded, c.keyframe_requests_throttled),
        (2, 4)
    );

    let (key, sent) = f.send(1004, true);
    assert_rewritten(
        &to(&sent, b_addr()),
        std::slice::from_ref(&key),
        B_PT,
        B_SSRC,
    );
    assert_rewritten(&to(&sent, c_addr()), &[key], C_PT, C_SSRC);
    let (next, sent) = f.send(1005, false);
    assert_eq!(to(&sent, b_addr()).len(), 1);
    assert_eq!(
        parse_rtp(&to(&sent, b_addr())[0].contents).payload,
        parse_rtp(&next).payload
    );
}

#[test]
fn bad_datagrams_are_dropped_by_reason_without_panicking() {
    let mut f = Fixture::new(|_| {});
    let stranger = remote(99, 9999);
    let mut sent = Vec::new();
    let good_rtp = rtp(PUB_PT, 1, 2, PUB_SSRC, false, &[1, 2, 3]);

    // Unknown source: RTP, RTCP and DTLS from an address nobody owns.
    sent.extend(f.node.receive(stranger, &good_rtp));
    sent.extend(f.node.receive(stranger, &pli(1, B_SSRC)));
    sent.extend(
        f.node
            .receive(stranger, &[22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]),
    );
    // Garbage from a stranger and from the publisher.
    sent.extend(f.node.receive(stranger, &[]));
    sent.extend(f.node.receive(stranger, &[0xff; 40]));
    sent.extend(f.node.receive(A, &[0x42; 3]));
    // STUN with a bad magic cookie, and a binding request for no session.
    let mut bad_cookie = stun_binding_request(b"nobody:x");
    bad_cookie[4] ^= 0xff;
    sent.extend(f.node.receive(stranger, &bad_cookie));
    sent.extend(f.node.receive(stranger, &stun_binding_request(b"nobody:x")));
    // RTP whose header announces an extension block that is not there.
    let mut truncated = rtp(PUB_PT, 7, 7, PUB_SSRC, false, &[]);
    truncated[0] |= 0x10;
    truncated.extend_from_slice(&[0xbe, 0xde, 0x00, 0x05, 0x10]);
    sent.extend(f.node.receive(A, &truncated));
    // RTCP whose length field overruns the datagram.
    let mut long_rtcp = pli(1, PUB_SSRC);
    long_rtcp[3] = 40;
    sent.extend(f.node.receive(A, &long_rtcp));
    // RTP with an SSRC the publisher did not announce, and RTP from a
    // subscriber's address (subscribers publish nothing).
    sent.extend(
        f.node
            .receive(A, &rtp(PUB_PT, 1, 2, 0xdead_beef, false, &[1])),
    );
    sent.extend(
        f.node
            .receive(b_addr(), &rtp(B_PT, 1, 2, B_SSRC, false, &[1])),
    );

    assert!(sent.is_empty(), "nothing answers garbage: {sent:?}");
    let drops = f.node.stats().drops;
    let by = |r: DropReason| drops[r as usize];
    assert_eq!(by(DropReason::UnknownSource), 3);
    assert_eq!(by(DropReason::Malformed), 6);
    assert_eq!(by(DropReason::UnknownUfrag), 1);
    assert_eq!(by(DropReason::UnknownSsrc), 2);
    assert_eq!(by(DropReason::Rejected), 0);
    assert_eq!(by(DropReason::Paused), 0);
    assert_eq!(f.node.stats().counters.packets_in, 12);

    // Random and mutated datagrams from every kind of address: no panic, and
    // the routing state survives (a keyframe afterwards still flows).
    let mut rng = StdRng::seed_from_u64(0x0d0d_f00d);
    let sources = [A, b_addr(), c_addr(), stranger];
    for i in 0..3000u32 {
        let mut d = match i % 3 {
            0 => good_rtp.clone(),
            1 => nack(1, B_SSRC, &[1, 2, 40]),
            _ => stun_binding_request(b"nobody:x"),
        };
        let len = rng.random_range(0..=d.len() + 8);
        d.resize(len, 0);
        for _ in 0..rng.random_range(0..4) {
            if !d.is_empty() {
                let at = rng.random_range(0..d.len());
                d[at] = rng.random();
            }
        }
        let from = sources[rng.random_range(0..sources.len())];
        f.node.receive(from, &d);
        if i % 100 == 0 {
            f.node.advance(ms(7));
        }
    }
    let (key, sent) = f.send(5000, true);
    assert_eq!(
        parse_rtp(&to(&sent, b_addr())[0].contents).payload,
        parse_rtp(&key).payload
    );
}

/// A STUN binding request carrying only a USERNAME attribute.
fn stun_binding_request(username: &[u8]) -> Vec<u8> {
    let padded = username.len().div_ceil(4) * 4;
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&((4 + padded) as u16).to_be_bytes());
    m.extend_from_slice(&0x2112_a442u32.to_be_bytes());
    m.extend_from_slice(&[7; 12]);
    m.extend_from_slice(&0x0006u16.to_be_bytes());
    m.extend_from_slice(&(username.len() as u16).to_be_bytes());
    m.extend_from_slice(username);
    m.resize(20 + 4 + padded, 0);
    m
}

#[test]
fn removing_a_subscriber_stops_its_flow_and_removing_the_publisher_unpublishes() {
    let mut f = Fixture::new(|_| {});
    for seq in 1000..1005u16 {
        let (_, sent) = f.send(seq, seq == 1000);
        assert_eq!(to(&sent, c_addr()).len(), 1);
    }
    f.node.drain();
    let now = f.node.now;
    f.node.sfu.remove_peer(now, f.c_peer).unwrap();
    let (sent, events) = f.node.drain();
    assert!(sent.is_empty());
    assert_eq!(
        events,
        vec![
            SfuEvent::PeerClosed {
                room: ROOM.into(),
                participant: f.c_part,
                peer: f.c_peer
            },
            SfuEvent::ParticipantLeft {
                room: ROOM.into(),
                participant: f.c_part,
                identity: "carol".into()
            },
        ]
    );
    assert!(matches!(
        f.node.sfu.remove_peer(now, f.c_peer),
        Err(SfuError::NoSuchPeer(p)) if p == f.c_peer
    ));
    let mut inputs = Vec::new();
    let mut all = Vec::new();
    for seq in 1005..1010u16 {
        let (d, sent) = f.send(seq, false);
        inputs.push(d);
        all.extend(sent);
    }
    assert!(to(&all, c_addr()).is_empty(), "C is gone");
    assert_rewritten(&to(&all, b_addr()), &inputs, B_PT, B_SSRC);
    // C's address is no longer routable: its RTCP is an unknown source now.
    let before = f.node.drops(DropReason::UnknownSource);
    f.node.receive(c_addr(), &pli(1, C_SSRC));
    assert_eq!(f.node.drops(DropReason::UnknownSource), before + 1);

    let now = f.node.now;
    f.node.sfu.remove_peer(now, f.pub_peer).unwrap();
    let (sent, events) = f.node.drain();
    assert!(sent.is_empty());
    assert_eq!(
        events,
        vec![
            SfuEvent::TrackUnpublished {
                room: ROOM.into(),
                participant: f.publisher,
                track: f.track
            },
            SfuEvent::PeerClosed {
                room: ROOM.into(),
                participant: f.publisher,
                peer: f.pub_peer
            },
            SfuEvent::ParticipantLeft {
                room: ROOM.into(),
                participant: f.publisher,
                identity: "alice".into()
            },
        ]
    );
    assert!(f.node.sfu.room_state(ROOM).tracks.is_empty());
    let (_, sent) = f.send(1010, true);
    assert!(sent.is_empty(), "the publisher's address is gone: {sent:?}");
    assert_eq!(f.node.drops(DropReason::UnknownSource), before + 2);
    let stats = f.node.stats();
    assert_eq!((stats.sessions_created, stats.sessions_closed), (3, 2));
    assert_eq!(
        f.node.sfu.room_state(ROOM).participants,
        vec![(f.b_part, "bob".to_string())]
    );
}

#[test]
fn nacks_are_answered_from_the_retransmit_buffer() {
    // A 16-packet buffer, so eviction is easy to reach.
    let mut f = Fixture::new(|c| c.retransmit_packets = 16);
    let mut to_b = Vec::new();
    for seq in 1000..1040u16 {
        let (_, sent) = f.send(seq, seq == 1000);
        to_b.extend(to(&sent, b_addr()).into_iter().cloned());
    }
    assert_eq!(to_b.len(), 40);
    let s0 = parse_rtp(&to_b[0].contents).seq;
    let wanted = [s0 + 30, s0 + 33, s0 + 39];

    let sent = f.node.receive(b_addr(), &nack(B_SSRC, B_SSRC, &wanted));
    assert_eq!(sent.len(), 3, "{sent:?}");
    for (s, seq) in sent.iter().zip(wanted) {
        assert_eq!(s.destination, b_addr());
        let original = &to_b[usize::from(seq - s0)].contents;
        assert_eq!(&s.contents, original, "seq {seq} resent byte for byte");
    }
    let c = f.node.stats().counters;
    assert_eq!(
        (c.nacks_received, c.retransmits, c.retransmit_misses),
        (3, 3, 0)
    );

    // Evicted (overwritten by s0+21 in a 16-slot ring) and never sent.
    let sent = f
        .node
        .receive(b_addr(), &nack(B_SSRC, B_SSRC, &[s0 + 5, s0 + 100]));
    assert!(sent.is_empty(), "{sent:?}");
    let c = f.node.stats().counters;
    assert_eq!(
        (c.nacks_received, c.retransmits, c.retransmit_misses),
        (5, 3, 2)
    );

    // A NACK from C's address for B's stream is not C's to make.
    let sent = f.node.receive(c_addr(), &nack(C_SSRC, B_SSRC, &[s0 + 39]));
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(f.node.stats().counters.nacks_received, 5);

    // Older than retransmit_max_age (2 s).
    f.node.advance(ms(2100));
    let sent = f.node.receive(b_addr(), &nack(B_SSRC, B_SSRC, &[s0 + 39]));
    assert!(sent.is_empty(), "{sent:?}");
    let c = f.node.stats().counters;
    assert_eq!(
        (c.nacks_received, c.retransmits, c.retransmit_misses),
        (6, 3, 3)
    );
    let b = f
        .node
        .stats()
        .peers
        .into_iter()
        .find(|p| p.peer == f.b_peer)
        .unwrap();
    assert_eq!((b.counters.nacks_received, b.counters.retransmits), (6, 3));
    assert_eq!(b.counters.packets_out, 43);
}

#[test]
fn a_gap_from_the_publisher_is_nacked_upstream() {
    let mut f = Fixture::new(|_| {});
    let mut to_b = Vec::new();
    let mut to_a = Vec::new();
    for seq in [1000u16, 1001, 1005] {
        let (_, sent) = f.send(seq, seq == 1000);
        to_b.extend(to(&sent, b_addr()).into_iter().cloned());
        to_a.extend(to(&sent, A).into_iter().cloned());
    }
    assert_eq!(to_a.len(), 1, "{to_a:?}");
    assert_eq!(
        parse_rtcp(&to_a[0].contents),
        vec![Rtcp::Nack {
            media_ssrc: PUB_SSRC,
            lost: vec![1002, 1003, 1004]
        }]
    );
    let c = f.node.stats().counters;
    assert_eq!((c.nacks_sent, c.packets_lost), (3, 3));
    // The gap is passed on as a gap: receivers NACK the same numbers.
    let out: Vec<u16> = to_b.iter().map(|s| parse_rtp(&s.contents).seq).collect();
    let s0 = out[0];
    assert_eq!(out, vec![s0, s0 + 1, s0 + 5]);

    // The retransmissions fill it, at the numbers the receivers expect.
    for seq in [1003u16, 1002, 1004] {
        let (d, sent) = f.send(seq, false);
        assert!(to(&sent, A).is_empty(), "late packets are no new loss");
        let got = to(&sent, b_addr());
        assert_eq!(got.len(), 1);
        let got = parse_rtp(&got[0].contents);
        assert_eq!(got.seq, s0 + (seq - 1000));
        assert_eq!(got.payload, parse_rtp(&d).payload);
    }
    // A gap too large to NACK is only counted.
    let (_, sent) = f.send(1106, false);
    assert!(to(&sent, A).is_empty(), "{sent:?}");
    let c = f.node.stats().counters;
    assert_eq!((c.nacks_sent, c.packets_lost), (3, 3 + 100));
}

#[test]
fn keyframe_requests_are_throttled_per_layer() {
    let mut f = Fixture::new(|c| c.keyframe_request_interval = ms(500));
    f.send(1000, true);
    // Out of the interval of the PLI sent when the subscribers joined.
    f.node.advance(ms(600));
    let c = f.node.stats().counters;
    assert_eq!(
        (c.keyframe_requests_forwarded, c.keyframe_requests_throttled),
        (1, 1)
    );
    let start = f.node.now;
    let mut plis_at_a = Vec::new();
    // (ms after start, from, request)
    let script: [(u64, SocketAddr, Vec<u8>); 9] = [
        (0, b_addr(), pli(B_SSRC, B_SSRC)),       // forwarded
        (10, c_addr(), pli(C_SSRC, C_SSRC)),      // throttled
        (100, b_addr(), pli(B_SSRC, B_SSRC)),     // throttled
        (250, c_addr(), fir(C_SSRC, C_SSRC, 1)),  // throttled
        (499, b_addr(), pli(B_SSRC, B_SSRC)),     // throttled
        (600, c_addr(), pli(C_SSRC, C_SSRC)),     // forwarded
        (700, b_addr(), pli(B_SSRC, B_SSRC)),     // throttled
        (1099, c_addr(), pli(C_SSRC, C_SSRC)),    // throttled
        (1200, b_addr(), fir(B_SSRC, B_SSRC, 2)), // forwarded
    ];
    for (at, from, request) in &script {
        let target = start + ms(*at);
        let sent = f.node.advance(target - f.node.now);
        plis_at_a.extend(
            to(&sent, A)
                .into_iter()
                .map(|s| (f.node.now, s.contents.clone())),
        );
        let sent = f.node.receive(*from, request);
        assert!(to(&sent, b_addr()).is_empty() && to(&sent, c_addr()).is_empty());
        plis_at_a.extend(
            to(&sent, A)
                .into_iter()
                .map(|s| (f.node.now, s.contents.clone())),
        );
    }
    // A PLI for a stream nobody here receives is not a request.
    f.node.receive(b_addr(), &pli(B_SSRC, 0x5555_5555));

    let when: Vec<u128> = plis_at_a
        .iter()
        .map(|(t, _)| (*t - start).as_millis())
        .collect();
    assert_eq!(when, vec![0, 600, 1200], "PLIs reaching A");
    for (_, d) in &plis_at_a {
        assert_eq!(
            parse_rtcp(d),
            vec![Rtcp::Pli {
                media_ssrc: PUB_SSRC
            }]
        );
    }
    let c = f.node.stats().counters;
    assert_eq!(c.keyframe_requests_received, 9);
    assert_eq!(c.keyframe_requests_forwarded, 1 + 3);
    assert_eq!(c.keyframe_requests_throttled, 1 + 6);
    let publisher = f
        .node
        .stats()
        .peers
        .into_iter()
        .find(|p| p.peer == f.pub_peer)
        .unwrap();
    assert_eq!(publisher.counters.keyframe_requests_forwarded, 1 + 3);
}

#[test]
fn a_new_publisher_continues_the_subscribers_stream() {
    let mut f = Fixture::new(|_| {});
    let mut last_b = None;
    for seq in 1000..1010u16 {
        let (_, sent) = f.send(seq, seq == 1000);
        last_b = Some(parse_rtp(&to(&sent, b_addr())[0].contents));
    }
    let last_b = last_b.unwrap();
    let last_at = f.node.now;
    let now = f.node.now;
    f.node.sfu.remove_peer(now, f.pub_peer).unwrap();
    f.node.drain();

    // Another participant publishes video from another address and SSRC.
    f.node.advance(ms(100));
    let dave = f.node.sfu.join(ROOM, "dave", true).unwrap();
    let a2 = remote(11, 4000);
    let info = f
        .node
        .plain_video_endpoint(dave, RtpDirection::Publish, a2, 98, Some(0x3333_4444));
    // The waiting subscribers bind to it and ask it for a keyframe.
    let (sent, _) = f.node.drain();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].destination, a2);
    assert_eq!(
        parse_rtcp(&sent[0].contents),
        vec![Rtcp::Pli {
            media_ssrc: 0x3333_4444
        }]
    );

    f.node.advance(ms(50));
    let key = vp8_payload(true, 320, 240, b"dave", 60);
    let sent = f
        .node
        .receive(a2, &rtp(98, 40_000, 777, 0x3333_4444, true, &key));
    let got = parse_rtp(&to(&sent, b_addr())[0].contents);
    assert_eq!(
        (got.ssrc, got.pt),
        (B_SSRC, B_PT),
        "the subscriber's stream identity is kept"
    );
    assert_eq!(got.seq, last_b.seq.wrapping_add(1), "numbering continues");
    let elapsed = (f.node.now - last_at).as_millis() as u32;
    assert_eq!(
        got.ts,
        last_b.ts.wrapping_add(elapsed * 90),
        "time continues"
    );
    assert_eq!(got.payload, key);
    let sent = f.node.receive(
        a2,
        &rtp(98, 40_001, 3777, 0x3333_4444, true, b"\x10\x51\x42\x00x"),
    );
    let next = parse_rtp(&to(&sent, b_addr())[0].contents);
    assert_eq!(
        (next.seq, next.ts),
        (got.seq.wrapping_add(1), got.ts.wrapping_add(3000))
    );
    assert_eq!(
        info.track,
        f.node.sfu.room_state(ROOM).tracks.first().map(|t| t.track)
    );
}

/// `audio_level_ext` belongs to audio publishers and is a one-byte
/// extension id; anything else is refused with a message.
#[test]
fn audio_level_ext_is_only_for_audio_publishers_with_a_valid_id() {
    let mut node = Node::new(|_| {});
    let p = node.sfu.join(ROOM, "alice", true).unwrap();
    let spec = |direction, kind, ext| ridge_sfu::RtpEndpointSpec {
        fmtp: None,
        codec: None,
        direction,
        kind,
        remote: A,
        payload_type: PUB_PT,
        ssrc: Some(PUB_SSRC),
        track: None,
        audio_level_ext: ext,
    };
    for (direction, kind, ext) in [
        (RtpDirection::Publish, TrackKind::Video, Some(1)),
        (RtpDirection::Subscribe, TrackKind::Audio, Some(1)),
        (RtpDirection::Publish, TrackKind::Audio, Some(0)),
        (RtpDirection::Publish, TrackKind::Audio, Some(15)),
    ] {
        let now = node.now;
        match node
            .sfu
            .add_rtp_endpoint(now, p, spec(direction, kind, ext))
        {
            Err(e @ SfuError::InvalidSpec(SpecError::AudioLevelExt(_))) => {
                assert!(e.to_string().contains("audio_level_ext"), "{e}")
            }
            other => panic!("{direction:?} {kind:?} {ext:?}: {other:?}"),
        }
    }
    let now = node.now;
    node.sfu
        .add_rtp_endpoint(
            now,
            p,
            spec(RtpDirection::Publish, TrackKind::Audio, Some(14)),
        )
        .expect("an audio publisher with id 14");
}
