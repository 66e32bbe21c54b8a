//! Local (in-process) endpoints beside network peers: a local VP8
//! publisher feeds a room with a local subscriber, a plain-RTP subscriber
//! and a WebRTC subscriber (a real str0m client). Each receives the
//! payloads unchanged, in one continuous stream of its own (sequence
//! numbers one by one, timestamps as the source's, across a source change);
//! the local subscriber's payloads are views of the very packets fed in.
//! Keyframe requests of every subscriber reach the local publisher as
//! outputs, and a local subscriber's NACK is answered from the
//! retransmission buffer.

mod common;

use std::collections::VecDeque;

use common::client::{self, Client, Datagram};
use common::*;
use ridge_sfu::packet::rtcp;
use ridge_sfu::{
    CodecSpec, LocalMedia, LocalOutput, OfferIntent, PacketBuf, PeerId, RtpDirection, SfuError,
    SfuEvent, SpecError, TrackKind,
};
use str0m::Event;
use str0m::media::{Direction, MediaKind};

const ROOM: &str = "r";
const PLAIN: u8 = 3;
const LOCAL_SSRC: u32 = 0x1111;
const PLAIN_SSRC: u32 = 0x2222;
/// 25 frames a second: 40 ms, on the 90 kHz clock.
const FRAME_MS: u64 = 40;
const FRAME_TICKS: u32 = 3600;

/// The node, the WebRTC subscriber's client, and what the plain
/// subscriber received.
struct Room {
    node: Node,
    client: Client,
    plain: Vec<Rtp>,
}

impl Room {
    /// One millisecond: timers fire, then datagrams are delivered until
    /// the network is quiet.
    fn step(&mut self) {
        self.node.now += ms(1);
        let now = self.node.now;
        let mut to_node = VecDeque::new();
        self.client.timeout(now, &mut to_node);
        if self.node.sfu.poll_timeout() <= now {
            self.node.sfu.handle_timeout(now);
        }
        self.deliver(to_node);
    }

    fn deliver(&mut self, to_node: VecDeque<Datagram>) {
        let clients = std::slice::from_mut(&mut self.client);
        client::deliver(&mut self.node, clients, to_node, |s| {
            assert_eq!(s.destination, remote(PLAIN, 3000), "sent to a stranger");
            self.plain.push(parse_rtp(&s.contents));
        });
    }

    /// Feeds one packet of the local publisher, and delivers what follows.
    fn feed(&mut self, publisher: PeerId, packet: &PacketBuf) {
        let now = self.node.now;
        self.node
            .sfu
            .handle_local_rtp(now, publisher, packet.clone())
            .expect("a local publisher");
        self.deliver(VecDeque::new());
    }

    fn keyframe_requests(&self, publisher: PeerId) -> usize {
        self.node
            .local
            .iter()
            .filter(|o| matches!(o, LocalOutput::KeyframeRequest { peer } if *peer == publisher))
            .count()
    }

    fn local_media(&self, subscriber: PeerId) -> Vec<&LocalMedia> {
        self.node
            .local
            .iter()
            .filter_map(|o| match o {
                LocalOutput::Media(m) if m.peer == subscriber => Some(m),
                _ => None,
            })
            .collect()
    }

    /// The WebRTC subscriber's video: (sequence number, timestamp, payload).
    fn webrtc_media(&self) -> Vec<(u64, u32, Vec<u8>)> {
        self.client
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::RtpPacket(p) if !p.payload.is_empty() => {
                    Some((*p.seq_no, p.header.timestamp, p.payload.to_vec()))
                }
                _ => None,
            })
            .collect()
    }
}

/// One source's packets: `n` frames from `seq0`/`ts0`, the first a
/// keyframe, each payload tagged with `source` and its index.
fn source_packets(source: u8, ssrc: u32, seq0: u16, ts0: u32, n: usize) -> Vec<PacketBuf> {
    (0..n)
        .map(|i| {
            let payload = vp8_payload(i == 0, 640, 360, &[source, i as u8], 300);
            let seq = seq0.wrapping_add(i as u16);
            let ts = ts0.wrapping_add(i as u32 * FRAME_TICKS);
            PacketBuf::copy_from(&rtp(96, seq, ts, ssrc, true, &payload))
        })
        .collect()
}

fn payload_of(packet: &PacketBuf) -> &[u8] {
    &packet.as_slice()[12..]
}

/// Sequence numbers one by one, timestamps advancing by the source's
/// frame interval.
fn assert_continuous(what: &str, numbering: &[(u64, u32)]) {
    for w in numbering.windows(2) {
        let ((s0, t0), (s1, t1)) = (w[0], w[1]);
        assert_eq!(s1, s0 + 1, "{what}: sequence numbers {numbering:?}");
        assert_eq!(
            t1.wrapping_sub(t0),
            FRAME_TICKS,
            "{what}: timestamps {numbering:?}"
        );
    }
}

#[test]
fn local_endpoints_exchange_media_with_webrtc_and_plain_peers() {
    let mut node = Node::new(|c| c.keyframe_request_interval = ms(100));
    let now = node.now;
    let alice = node.sfu.join(ROOM, "local-publisher", false).unwrap();
    let publisher = node.local_endpoint(alice, RtpDirection::Publish, CodecSpec::Vp8, 96, None);
    let track = publisher
        .track
        .expect("a local publisher publishes a track");
    let tracks = node.sfu.room_state(ROOM).tracks;
    assert_eq!(tracks.len(), 1);
    assert_eq!(
        (tracks[0].kind, tracks[0].codec),
        (TrackKind::Video, Some(CodecSpec::Vp8))
    );

    let bob = node.sfu.join(ROOM, "local-subscriber", false).unwrap();
    let local_sub = node.local_endpoint(
        bob,
        RtpDirection::Subscribe,
        CodecSpec::Vp8,
        100,
        Some(LOCAL_SSRC),
    );
    assert_eq!(local_sub.track, Some(track));
    assert_eq!(local_sub.ssrc, LOCAL_SSRC);

    let carol = node.sfu.join(ROOM, "plain-subscriber", false).unwrap();
    let plain = node.plain_video_endpoint(
        carol,
        RtpDirection::Subscribe,
        remote(PLAIN, 3000),
        97,
        Some(PLAIN_SSRC),
    );
    assert_eq!(plain.track, Some(track));

    let mut client = Client::new("webrtc-subscriber", remote(2, 2222), now);
    let dave = node.sfu.join(ROOM, "webrtc-subscriber", false).unwrap();
    let (webrtc_sub, mids) = client.negotiate(
        &mut node.sfu,
        now,
        dave,
        OfferIntent::Subscribe { from: None },
        &[(MediaKind::Video, Direction::RecvOnly, None)],
    );
    let mut room = Room {
        node,
        client,
        plain: Vec::new(),
    };
    for _ in 0..5000 {
        room.step();
        let connected = room
            .node
            .events
            .iter()
            .any(|e| matches!(e, SfuEvent::PeerConnected { peer, .. } if *peer == webrtc_sub));
        if room.client.rtc.is_connected() && connected {
            break;
        }
    }
    assert!(
        room.client.rtc.is_connected(),
        "ICE + DTLS did not complete"
    );

    // The subscribers wait for a keyframe: the local publisher is asked.
    assert!(
        room.keyframe_requests(publisher.peer) >= 1,
        "{:?}",
        room.node.local
    );
    let stats = room.node.stats();
    let transport = |peer| {
        stats
            .peers
            .iter()
            .find(|p| p.peer == peer)
            .map(|p| p.transport)
    };
    assert_eq!(transport(publisher.peer), Some("local"));
    assert_eq!(transport(local_sub.peer), Some("local"));
    assert_eq!(transport(plain.peer), Some("rtp"));

    // Two sources one after the other (a restarted encoder: a new SSRC,
    // other numbering), each starting on a keyframe.
    let mut fed = source_packets(1, 0xaaaa, 40_000, 1_000_000, 10);
    fed.extend(source_packets(2, 0xbbbb, 7, 5, 10));
    for p in &fed {
        room.feed(publisher.peer, p);
        for _ in 0..FRAME_MS {
            room.step();
        }
    }

    // The local subscriber: every payload, as a view of the packet fed in.
    let got = room.local_media(local_sub.peer);
    assert_eq!(got.len(), fed.len());
    for (m, p) in got.iter().zip(&fed) {
        assert_eq!(m.payload.as_slice(), payload_of(p));
        assert_eq!(
            m.payload.as_slice().as_ptr(),
            payload_of(p).as_ptr(),
            "the local subscriber's payload is the fed packet's, not a copy"
        );
        assert_eq!((m.header.ssrc, m.header.payload_type), (LOCAL_SSRC, 100));
        assert!(m.header.marker);
    }
    let numbering: Vec<(u64, u32)> = got
        .iter()
        .map(|m| (u64::from(m.header.sequence), m.header.timestamp))
        .collect();
    assert_continuous("local subscriber", &numbering);

    // The plain subscriber: the same, in datagrams with its own header.
    assert_eq!(room.plain.len(), fed.len());
    for (r, p) in room.plain.iter().zip(&fed) {
        assert_eq!(r.payload, payload_of(p));
        assert_eq!((r.ssrc, r.pt), (PLAIN_SSRC, 97));
    }
    let numbering: Vec<(u64, u32)> = room
        .plain
        .iter()
        .map(|r| (u64::from(r.seq), r.ts))
        .collect();
    assert_continuous("plain subscriber", &numbering);

    // The WebRTC subscriber, through str0m (SRTP, its own numbering).
    let web = room.webrtc_media();
    assert_eq!(web.len(), fed.len(), "the WebRTC subscriber's video");
    for ((_, _, payload), p) in web.iter().zip(&fed) {
        assert_eq!(payload.as_slice(), payload_of(p));
    }
    let numbering: Vec<(u64, u32)> = web.iter().map(|(s, t, _)| (*s, *t)).collect();
    assert_continuous("WebRTC subscriber", &numbering);

    // A NACK of the local subscriber is answered with the same packet.
    let lost = got[3].header;
    let before = room.local_media(local_sub.peer).len();
    let now = room.node.now;
    room.node
        .sfu
        .handle_local_nack(now, local_sub.peer, &[lost.sequence])
        .unwrap();
    room.deliver(VecDeque::new());
    let again = room.local_media(local_sub.peer);
    assert_eq!(again.len(), before + 1);
    let resent = again[before];
    assert_eq!(resent.header, lost);
    assert_eq!(resent.payload.as_slice(), payload_of(&fed[3]));

    // Keyframe requests of each subscriber reach the local publisher,
    // one per throttle interval.
    let mut asked = room.keyframe_requests(publisher.peer);
    let now = room.node.now;
    room.node
        .sfu
        .request_local_keyframe(now, local_sub.peer)
        .unwrap();
    room.deliver(VecDeque::new());
    assert_eq!(room.keyframe_requests(publisher.peer), asked + 1, "local");
    asked += 1;
    for _ in 0..150 {
        room.step();
    }
    let mut pli = Vec::new();
    rtcp::write_pli(&mut pli, 0x5555, PLAIN_SSRC);
    let sent = room.node.receive(remote(PLAIN, 3000), &pli);
    assert!(sent.is_empty());
    assert_eq!(room.keyframe_requests(publisher.peer), asked + 1, "plain");
    asked += 1;
    for _ in 0..150 {
        room.step();
    }
    {
        let mut api = room.client.rtc.direct_api();
        let rx = api
            .stream_rx_by_mid(mids[0], None)
            .expect("the WebRTC subscriber's receive stream");
        rx.request_keyframe(str0m::media::KeyframeRequestKind::Pli);
    }
    // str0m sends it with its next RTCP.
    for _ in 0..1500 {
        room.step();
        if room.keyframe_requests(publisher.peer) > asked {
            break;
        }
    }
    assert_eq!(room.keyframe_requests(publisher.peer), asked + 1, "WebRTC");

    // Local calls on the wrong sessions say so.
    let now = room.node.now;
    let packet = fed[0].clone();
    assert!(matches!(
        room.node
            .sfu
            .handle_local_rtp(now, local_sub.peer, packet.clone()),
        Err(SfuError::InvalidSpec(SpecError::NotLocal { .. }))
    ));
    assert!(matches!(
        room.node.sfu.handle_local_rtp(now, plain.peer, packet),
        Err(SfuError::InvalidSpec(SpecError::NotLocal { .. }))
    ));
    assert!(matches!(
        room.node.sfu.request_local_keyframe(now, publisher.peer),
        Err(SfuError::InvalidSpec(SpecError::NotLocal { .. }))
    ));
}
