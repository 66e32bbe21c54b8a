//! Codec negotiation end to end, in memory: str0m clients (RTP mode, full
//! ICE) that speak only some codecs publish and subscribe through the
//! core, which forwards H.264, VP9 and AV1 as it does VP8, answers in its
//! order of preference, and refuses with the reason what it cannot send.

mod common;

use std::time::Duration;

use common::client::Client;
use common::*;
use ridge_sfu::{
    CodecSpec, OfferIntent, Owner, PeerId, SdpError, SfuError, SfuEvent, SpecError, TrackKind,
};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Event, RtcConfig};

const ROOM: &str = "codecs";
const STEP: Duration = Duration::from_millis(1);

/// A node and the str0m clients around it.
struct Net {
    node: Node,
    clients: Vec<Client>,
}

impl Net {
    fn new(configure: impl FnOnce(&mut ridge_sfu::SfuConfig)) -> Self {
        Net {
            node: Node::new(configure),
            clients: Vec::new(),
        }
    }

    fn client(
        &mut self,
        name: &'static str,
        host: u8,
        codecs: impl FnOnce(RtcConfig) -> RtcConfig,
    ) -> usize {
        let c = Client::with_config(
            name,
            remote(host, 1000 + u16::from(host)),
            self.node.now,
            codecs,
        );
        self.clients.push(c);
        self.clients.len() - 1
    }

    /// Offers one video m-line from client `i` in `direction`.
    fn offer_video(
        &mut self,
        i: usize,
        identity: &str,
        intent: OfferIntent,
    ) -> Result<(PeerId, Mid, String), SfuError> {
        let participant = self.node.sfu.join(ROOM, identity, false).unwrap();
        self.offer_video_as(i, participant, intent)
    }

    fn offer_video_as(
        &mut self,
        i: usize,
        participant: ridge_sfu::ParticipantId,
        intent: OfferIntent,
    ) -> Result<(PeerId, Mid, String), SfuError> {
        let direction = match intent {
            OfferIntent::Publish => Direction::SendOnly,
            OfferIntent::Subscribe { .. } => Direction::RecvOnly,
        };
        let now = self.node.now;
        let (peer, mids, answer) = self.clients[i].try_negotiate(
            &mut self.node.sfu,
            now,
            participant,
            intent,
            &[(MediaKind::Video, direction, None)],
        )?;
        Ok((peer, mids[0], answer))
    }

    fn step(&mut self) {
        self.node.now += STEP;
        common::client::fire_timers_and_deliver(&mut self.node, &mut self.clients);
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Net) -> bool) -> bool {
        let until = self.node.now + limit;
        while self.node.now < until {
            self.step();
            if done(self) {
                return true;
            }
        }
        false
    }

    fn connect(&mut self, peers: &[PeerId]) {
        let ok = self.run_until(ms(5000), |n| {
            n.clients.iter().all(|c| c.rtc.is_connected())
                && peers.iter().all(|p| {
                    n.node
                        .events
                        .iter()
                        .any(|e| matches!(e, SfuEvent::PeerConnected { peer, .. } if peer == p))
                })
        });
        assert!(ok, "ICE + DTLS did not complete");
    }

    /// Client `i` writes one video packet on `mid` with payload type `pt`.
    fn write(&mut self, i: usize, mid: Mid, pt: str0m::media::Pt, seq: u64, payload: Vec<u8>) {
        let now = self.node.now;
        let c = &mut self.clients[i];
        let mut api = c.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, None).expect("a send stream");
        tx.write_rtp(
            RtpWrite::new(pt, SeqNo::from(seq), 3000 * seq as u32, now, payload)
                .marker(true)
                .nackable(true),
        );
        c.next_timeout = now;
    }

    /// The media packets client `i` received: payload type and payload.
    fn received(&self, i: usize) -> Vec<(u8, Vec<u8>)> {
        self.clients[i]
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::RtpPacket(p) if !p.payload.is_empty() => {
                    Some((*p.header.payload_type, p.payload.to_vec()))
                }
                _ => None,
            })
            .collect()
    }
}

/// The payload type client `i` negotiated for `codec` whose format
/// parameters satisfy `fits`.
fn pt_where(
    c: &Client,
    codec: Codec,
    fits: impl Fn(&str0m::format::FormatParams) -> bool,
) -> str0m::media::Pt {
    c.rtc
        .codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == codec && fits(&p.spec().format))
        .map(|p| p.pt())
        .unwrap()
}

fn h264_only(c: RtcConfig) -> RtcConfig {
    c.enable_h264(true)
}

/// An IDR slice as a single NAL unit, then non-IDR slices, tagged.
fn h264_idr(tag: u8) -> Vec<u8> {
    vec![0x65, 0x88, 0x84, tag, 0, 0, 0, 0]
}
fn h264_delta(tag: u8) -> Vec<u8> {
    vec![0x41, 0x9a, 0x02, tag, 0, 0, 0, 0]
}

/// The encoding names of the first m=video line's payload types, in the
/// answer's order.
fn answered_video_codecs(answer: &str) -> Vec<String> {
    let mut pts: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut in_video = false;
    for line in answer.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            in_video = m.starts_with("video") && pts.is_empty();
            if in_video {
                pts = m.split_whitespace().skip(3).map(str::to_owned).collect();
            }
        } else if in_video && let Some(map) = line.strip_prefix("a=rtpmap:") {
            let mut w = map.split_whitespace();
            let (pt, enc) = (w.next().unwrap(), w.next().unwrap());
            let enc = enc.split('/').next().unwrap().to_ascii_uppercase();
            if enc != "RTX" {
                names.push((pts.iter().position(|p| p == pt).unwrap(), enc));
            }
        }
    }
    names.sort();
    let mut out: Vec<String> = Vec::new();
    for (_, n) in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

#[test]
fn answers_list_codecs_in_the_nodes_order_and_the_track_names_the_codec_sent() {
    let mut net = Net::new(|c| {
        c.codecs = vec![
            CodecSpec::Opus,
            CodecSpec::H264,
            CodecSpec::Vp8,
            CodecSpec::Av1,
        ];
    });
    // The client prefers VP8, then AV1, then H.264, and offers VP9 too.
    let p = net.client("publisher", 1, |c| {
        c.enable_vp8(true)
            .enable_av1(true)
            .enable_h264(true)
            .enable_vp9(true)
    });
    let (_, _, answer) = net
        .offer_video(p, "alice", OfferIntent::Publish)
        .expect("answered");
    assert_eq!(answered_video_codecs(&answer), ["H264", "VP8", "AV1"]);
    let tracks = net.node.sfu.room_state(ROOM).tracks;
    assert_eq!(tracks.len(), 1);
    assert_eq!(tracks[0].kind, TrackKind::Video);
    assert_eq!(tracks[0].codec, Some(CodecSpec::H264), "the answer's first");
}

#[test]
fn h264_is_forwarded_from_its_first_idr_and_a_vp8_only_subscriber_is_refused_with_the_reason() {
    let mut net = Net::new(|_| {});
    let p = net.client("publisher", 1, h264_only);
    let s = net.client("h264 subscriber", 2, |c| {
        c.enable_vp8(true).enable_h264(true)
    });
    let v = net.client("vp8 subscriber", 3, |c| c.enable_vp8(true));
    let (pub_peer, mid, _) = net.offer_video(p, "alice", OfferIntent::Publish).unwrap();
    let (sub_peer, _, _) = net
        .offer_video(s, "bob", OfferIntent::Subscribe { from: None })
        .unwrap();
    let refused = net
        .offer_video(v, "carol", OfferIntent::Subscribe { from: None })
        .unwrap_err();
    match &refused {
        SfuError::InvalidSdp(SdpError::NoCommonCodec { codec, offered, .. }) => {
            assert_eq!(*codec, "h264");
            assert_eq!(offered, "vp8");
        }
        other => panic!("expected NoCommonCodec, got {other:?}"),
    }
    let text = refused.to_string();
    assert!(text.contains("h264") && text.contains("hwcodec"), "{text}");
    // The refused client is not connected; the others are.
    net.clients.truncate(2);
    net.connect(&[pub_peer, sub_peer]);

    let pt = pt_where(&net.clients[p], Codec::H264, |_| true);
    // A delta before any IDR is held back: a decoder cannot start there.
    net.write(p, mid, pt, 1, h264_delta(1));
    net.run_until(ms(50), |_| false);
    net.write(p, mid, pt, 2, h264_idr(2));
    net.write(p, mid, pt, 3, h264_delta(3));
    net.write(p, mid, pt, 4, h264_delta(4));
    assert!(net.run_until(ms(500), |n| n.received(s).len() >= 3));
    let got = net.received(s);
    let sub_pt = pt_where(&net.clients[s], Codec::H264, |f| {
        f.profile_level_id == Some(0x42001f) && f.packetization_mode == Some(1)
    });
    let tags: Vec<u8> = got
        .iter()
        .map(|(pt, payload)| {
            assert_eq!(
                *pt, *sub_pt,
                "the subscriber's own payload type for the profile sent"
            );
            payload[3]
        })
        .collect();
    assert_eq!(tags, [2, 3, 4], "from the IDR on, payloads intact");
}

#[test]
fn an_h264_profile_the_subscriber_cannot_decode_is_refused() {
    let mut net = Net::new(|_| {});
    // The publisher speaks High only; the subscriber Constrained Baseline.
    let p = net.client("publisher", 1, |mut c| {
        c.codec_config()
            .add_h264(114.into(), Some(115.into()), true, 0x64001f);
        c
    });
    let s = net.client("subscriber", 2, |mut c| {
        c.codec_config()
            .add_h264(108.into(), Some(109.into()), true, 0x42e01f);
        c
    });
    net.offer_video(p, "alice", OfferIntent::Publish).unwrap();
    let err = net
        .offer_video(s, "bob", OfferIntent::Subscribe { from: None })
        .unwrap_err();
    assert!(
        matches!(
            &err,
            SfuError::InvalidSdp(SdpError::NoCommonCodec { codec: "h264", .. })
        ),
        "{err:?}"
    );
}

#[test]
fn vp9_and_av1_are_forwarded_to_subscribers_that_speak_them() {
    for (codec, enable) in [
        (
            Codec::Vp9,
            (|c: RtcConfig| c.enable_vp9(true)) as fn(RtcConfig) -> RtcConfig,
        ),
        (Codec::Av1, |c: RtcConfig| c.enable_av1(true)),
    ] {
        let mut net = Net::new(|_| {});
        let p = net.client("publisher", 1, enable);
        let s = net.client("subscriber", 2, |c| enable(c.enable_vp8(true)));
        let (pub_peer, mid, _) = net.offer_video(p, "alice", OfferIntent::Publish).unwrap();
        let tracks = net.node.sfu.room_state(ROOM).tracks;
        assert_eq!(tracks[0].codec, CodecSpec::from_name(&format!("{codec}")));
        let (sub_peer, _, _) = net
            .offer_video(s, "bob", OfferIntent::Subscribe { from: None })
            .unwrap();
        net.connect(&[pub_peer, sub_peer]);
        let pt = pt_where(&net.clients[p], codec, |f| f.profile_id.unwrap_or(0) == 0);
        let key = match codec {
            // VP9: B=1, P=0, no layer indices; then a 0x82 0x49 0x83 frame.
            Codec::Vp9 => vec![0x08, 0x82, 0x49, 0x83, 0x42, 0x00, 7],
            // AV1: N=1, W=1, one OBU: a sequence header.
            _ => vec![0x18, 0x0a, 0x0b, 0x00, 0x00, 0x00, 7],
        };
        net.write(p, mid, pt, 1, key);
        assert!(
            net.run_until(ms(500), |n| !n.received(s).is_empty()),
            "{codec}: the keyframe reached the subscriber"
        );
        assert_eq!(net.received(s)[0].1.last(), Some(&7));
    }
}

#[test]
fn a_room_or_a_token_that_allows_only_vp8_refuses_h264_with_what_it_allows() {
    let mut net = Net::new(|_| {});
    net.node
        .sfu
        .set_room_codecs(ROOM, Some(vec![CodecSpec::Opus, CodecSpec::Vp8]))
        .unwrap();
    let p = net.client("publisher", 1, h264_only);
    let err = net
        .offer_video(p, "alice", OfferIntent::Publish)
        .unwrap_err();
    match &err {
        SfuError::InvalidSdp(SdpError::CodecNotAllowed {
            offered,
            allowed,
            kind,
            ..
        }) => {
            assert_eq!(offered, "H264");
            assert_eq!(allowed, "vp8");
            assert_eq!(*kind, "video");
        }
        other => panic!("expected CodecNotAllowed, got {other:?}"),
    }
    assert!(
        net.node.sfu.room_state(ROOM).tracks.is_empty(),
        "nothing published"
    );

    // A token's list narrows another room the same way.
    let owner = Owner::identity("dave").with_codecs(Some(vec![CodecSpec::Vp8]));
    let dave = net.node.sfu.join_as("other", &owner, false).unwrap();
    assert_eq!(net.node.sfu.codecs_for(dave).unwrap(), [CodecSpec::Vp8]);
    let d = net.client("token publisher", 4, h264_only);
    let err = net
        .offer_video_as(d, dave, OfferIntent::Publish)
        .unwrap_err();
    assert!(
        matches!(&err, SfuError::InvalidSdp(SdpError::CodecNotAllowed { .. })),
        "{err:?}"
    );

    // Lists are checked against the node's.
    net.node.sfu.set_room_codecs("r", None).unwrap();
    let bad = net.node.sfu.set_room_codecs("r", Some(vec![]));
    assert!(matches!(
        bad,
        Err(SfuError::InvalidSpec(SpecError::NoCodecs))
    ));
    let owner = Owner::identity("eve").with_codecs(Some(vec![CodecSpec::Vp8, CodecSpec::Vp8]));
    assert!(matches!(
        net.node.sfu.join_as(ROOM, &owner, false),
        Err(SfuError::InvalidSpec(SpecError::RepeatedCodec(
            CodecSpec::Vp8
        )))
    ));
}

#[test]
fn a_subscriber_waiting_in_the_room_hears_that_it_cannot_receive_a_new_track() {
    let mut net = Net::new(|_| {});
    let v = net.client("vp8 subscriber", 3, |c| c.enable_vp8(true));
    let (sub_peer, _, _) = net
        .offer_video(v, "carol", OfferIntent::Subscribe { from: None })
        .unwrap();
    let p = net.client("publisher", 1, h264_only);
    net.offer_video(p, "alice", OfferIntent::Publish).unwrap();
    net.node.drain();
    let told: Vec<_> = net
        .node
        .events
        .iter()
        .filter_map(|e| match e {
            SfuEvent::NoCommonCodec {
                peer,
                codec,
                receivable,
                ..
            } => Some((*peer, *codec, receivable.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(told, [(sub_peer, CodecSpec::H264, vec![CodecSpec::Vp8])]);
    // Once: another publish in the room does not repeat it.
    let q = net.client("second publisher", 5, h264_only);
    net.offer_video(q, "frank", OfferIntent::Publish).unwrap();
    net.node.drain();
    let again = net
        .node
        .events
        .iter()
        .filter(|e| matches!(e, SfuEvent::NoCommonCodec { .. }))
        .count();
    assert_eq!(again, 2, "one per track, never repeated");
}

/// The received packets' sequence numbers, markers and tags (the last
/// payload byte).
fn received_detail(c: &Client) -> Vec<(u64, bool, u8)> {
    c.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RtpPacket(p) if !p.payload.is_empty() => {
                Some((*p.seq_no, p.header.marker, *p.payload.last().unwrap()))
            }
            _ => None,
        })
        .collect()
}

fn assert_continuous(got: &[(u64, bool, u8)]) {
    for w in got.windows(2) {
        assert_eq!(
            w[1].0,
            w[0].0 + 1,
            "no gap in the subscriber's numbering: {got:?}"
        );
    }
}

/// A publisher (client 0), a subscriber pinned to `(spatial, temporal)`
/// (client 1) and an unpinned one (client 2), all speaking what `codecs`
/// enables and connected; returns the network and the publisher's mid.
fn pinned_and_unpinned(
    codecs: fn(RtcConfig) -> RtcConfig,
    spatial: Option<u8>,
    temporal: Option<u8>,
) -> (Net, Mid) {
    let mut net = Net::new(|_| {});
    let p = net.client("publisher", 1, codecs);
    let s = net.client("pinned", 2, codecs);
    let a = net.client("all layers", 3, codecs);
    let (pub_peer, mid, _) = net.offer_video(p, "alice", OfferIntent::Publish).unwrap();
    let (pinned, _, _) = net
        .offer_video(s, "bob", OfferIntent::Subscribe { from: None })
        .unwrap();
    let (all, _, _) = net
        .offer_video(a, "carol", OfferIntent::Subscribe { from: None })
        .unwrap();
    net.connect(&[pub_peer, pinned, all]);
    net.node
        .sfu
        .set_svc_layers(pinned, spatial, temporal)
        .unwrap();
    (net, mid)
}

#[test]
fn a_vp8_subscriber_pinned_to_temporal_layer_0_gets_a_quarter_of_the_frames_without_gaps() {
    let (mut net, mid) = pinned_and_unpinned(|c| c.enable_vp8(true), None, Some(0));
    let (p, s, a) = (0, 1, 2);
    let pt = pt_where(&net.clients[p], Codec::Vp8, |_| true);
    // L1T3: TIDs 0,2,1,2 per frame; X=1, T present, Y=1; a keyframe first.
    for i in 0..16u8 {
        let tid = [0u8, 2, 1, 2][usize::from(i % 4)];
        let mut payload = vec![0x90, 0x20, (tid << 6) | 0x20];
        let header = if i == 0 { 0x50 } else { 0x51 };
        payload.extend_from_slice(&[
            header, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01, i,
        ]);
        net.write(p, mid, pt, 100 + u64::from(i), payload);
        net.run_until(ms(33), |_| false);
    }
    net.run_until(ms(300), |_| false);
    let got = received_detail(&net.clients[s]);
    let tags: Vec<u8> = got.iter().map(|g| g.2).collect();
    assert_eq!(tags, [0, 4, 8, 12], "the TID 0 frames only: {got:?}");
    assert!(got.iter().all(|g| g.1), "each frame ends with the marker");
    assert_continuous(&got);
    let everything = received_detail(&net.clients[a]);
    assert_eq!(
        everything.len(),
        16,
        "the unpinned subscriber gets every frame"
    );
    assert_continuous(&everything);
}

#[test]
fn a_vp9_subscriber_pinned_to_spatial_layer_0_gets_that_layer_with_the_marker_on_it() {
    let (mut net, mid) = pinned_and_unpinned(|c| c.enable_vp9(true), Some(0), None);
    let (p, s, a) = (0, 1, 2);
    let pt = pt_where(&net.clients[p], Codec::Vp9, |f| {
        f.profile_id.unwrap_or(0) == 0
    });
    // L3T1: three spatial layers of one packet each per picture (B=1,
    // E=1, L=1, non-flexible), the RTP marker on the top layer only.
    let mut seq = 1000u64;
    for picture in 0..6u8 {
        for sid in 0..3u8 {
            let predicted = if picture == 0 { 0 } else { 0x40 };
            let d = if sid > 0 { 1 } else { 0 };
            let payload = vec![
                0x20 | 0x08 | 0x04 | predicted,
                (sid << 1) | d,
                picture,
                0xaa,
                picture * 3 + sid,
            ];
            let now = net.node.now;
            let c = &mut net.clients[p];
            let mut api = c.rtc.direct_api();
            let tx = api.stream_tx_by_mid(mid, None).unwrap();
            tx.write_rtp(
                RtpWrite::new(
                    pt,
                    SeqNo::from(seq),
                    3000 * u32::from(picture),
                    now,
                    payload,
                )
                .marker(sid == 2)
                .nackable(true),
            );
            c.next_timeout = now;
            seq += 1;
            net.step();
        }
        net.run_until(ms(33), |_| false);
    }
    net.run_until(ms(300), |_| false);
    let got = received_detail(&net.clients[s]);
    let tags: Vec<u8> = got.iter().map(|g| g.2).collect();
    assert_eq!(tags, [0, 3, 6, 9, 12, 15], "spatial layer 0 only: {got:?}");
    assert!(
        got.iter().all(|g| g.1),
        "the marker ends each picture sent: {got:?}"
    );
    assert_continuous(&got);
    let everything = received_detail(&net.clients[a]);
    assert_eq!(everything.len(), 18, "{everything:?}");
    let markers: Vec<bool> = everything.iter().map(|g| g.1).collect();
    assert_eq!(
        markers,
        [false, false, true].repeat(6),
        "the top layer's marker, as sent"
    );
    assert_continuous(&everything);
}

#[test]
fn malformed_payloads_are_counted_and_dropped_and_well_formed_ones_pass() {
    use ridge_sfu::{DropReason, RtpDirection, RtpEndpointSpec};
    let vp8_key = vec![
        0x10, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01, 7,
    ];
    let cases: [(CodecSpec, Vec<u8>, Vec<u8>); 4] = [
        // X set, then nothing: a truncated descriptor.
        (CodecSpec::Vp8, vec![0x80], vp8_key),
        // A FU-A with its start and end bits both set.
        (CodecSpec::H264, vec![0x7c, 0xc5, 0x88], h264_idr(7)),
        // I set, then nothing: no picture id.
        (
            CodecSpec::Vp9,
            vec![0x88],
            vec![0x08, 0x82, 0x49, 0x83, 0x42, 0x00, 7],
        ),
        // W=1 with no element.
        (
            CodecSpec::Av1,
            vec![0x10],
            vec![0x18, 0x0a, 0x0b, 0x00, 0x00, 0x00, 7],
        ),
    ];
    for (codec, bad, good) in cases {
        let mut node = Node::new(|_| {});
        let alice = node.sfu.join(ROOM, "alice", false).unwrap();
        let bob = node.sfu.join(ROOM, "bob", false).unwrap();
        let spec = |direction, remote| RtpEndpointSpec {
            direction,
            kind: TrackKind::Video,
            remote,
            payload_type: 102,
            codec: Some(codec),
            fmtp: None,
            ssrc: Some(0x5eed),
            track: None,
            audio_level_ext: None,
        };
        let now = node.now;
        node.sfu
            .add_rtp_endpoint(now, alice, spec(RtpDirection::Publish, remote(1, 5000)))
            .unwrap();
        node.sfu
            .add_rtp_endpoint(now, bob, spec(RtpDirection::Subscribe, remote(2, 6000)))
            .unwrap();
        node.drain();
        let sent = node.receive(remote(1, 5000), &rtp(102, 1, 3000, 0x5eed, true, &bad));
        assert!(
            to(&sent, remote(2, 6000)).is_empty(),
            "{codec}: the malformed one is not sent"
        );
        assert_eq!(
            node.drops(DropReason::MalformedPayload),
            1,
            "{codec}: and counted"
        );
        let sent = node.receive(remote(1, 5000), &rtp(102, 2, 6000, 0x5eed, true, &good));
        let out = to(&sent, remote(2, 6000));
        assert_eq!(
            out.len(),
            1,
            "{codec}: the well-formed keyframe is forwarded"
        );
        assert_eq!(parse_rtp(&out[0].contents).payload, good);
        assert_eq!(node.drops(DropReason::MalformedPayload), 1);
    }
}
