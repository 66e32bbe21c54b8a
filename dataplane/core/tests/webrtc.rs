//! WebRTC end to end, in memory: str0m clients (RTP mode, full ICE) publish
//! and subscribe through the core's `accept_offer`, with every datagram handed
//! over by the test and a simulated clock advanced 1 ms at a time.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::client::{Client, Datagram};
use common::*;
use ridge_sfu::packet::codec::vp8_is_keyframe;
use ridge_sfu::{
    DropReason, OfferIntent, ParticipantId, PeerId, SfuConfig, SfuEvent, TrackId, TrackKind,
};
use str0m::Event;
use str0m::format::Codec;
use str0m::media::{
    Direction, KeyframeRequestKind, MediaKind, Mid, Rid, Simulcast, SimulcastLayer,
};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo};

const ROOM: &str = "webrtc";
const STEP: Duration = Duration::from_millis(1);
const FRAME: Duration = Duration::from_millis(33);
/// Every layer sends a keyframe every this many frames, at its own phase.
const KEY_EVERY: u32 = 10;

/// The publisher's simulcast layers: rid, payload size (distinct bitrates),
/// resolution, first sequence number (f wraps within the test), first RTP
/// timestamp (unrelated bases, as separate encoders have), keyframe phase.
struct LayerSpec {
    rid: &'static str,
    size: usize,
    dims: (u16, u16),
    seq0: u64,
    ts0: u32,
    key_phase: u32,
}

const LAYERS: [LayerSpec; 3] = [
    LayerSpec {
        rid: "q",
        size: 150,
        dims: (160, 120),
        seq0: 100,
        ts0: 10_000,
        key_phase: 3,
    },
    LayerSpec {
        rid: "h",
        size: 400,
        dims: (320, 240),
        seq0: 30_000,
        ts0: 2_000_000_000,
        key_phase: 6,
    },
    LayerSpec {
        rid: "f",
        size: 900,
        dims: (640, 480),
        seq0: 65_500,
        ts0: 1_000_000,
        key_phase: 9,
    },
];
const Q: usize = 0;
const H: usize = 1;
const F: usize = 2;

fn is_key(layer: usize, frame: u32) -> bool {
    frame % KEY_EVERY == LAYERS[layer].key_phase
}

/// One video packet as the subscriber received it.
#[derive(Debug, Clone)]
struct Got {
    at: Instant,
    seq_no: u64,
    ts: u32,
    ssrc: u32,
    marker: bool,
    layer: usize,
    frame: u32,
    key: bool,
}

/// One packet as the publisher wrote it (and, its stack not pacing, sent
/// to the node at once).
#[derive(Debug, Clone, Copy)]
struct Written {
    at: Instant,
    layer: Option<usize>, // None: audio
    frame: u32,
}

/// A publisher (video simulcast q/h/f + audio) and a subscriber connected
/// through one node.
struct Call {
    node: Node,
    clients: [Client; 2],
    publisher: ParticipantId,
    pub_peer: PeerId,
    video_mid: Mid,
    audio_mid: Mid,
    sub_peer: PeerId,
    sub_video_mid: Mid,
    video_track: TrackId,
    /// What the publisher writes each frame.
    send_video: bool,
    audio: Option<(i8, bool)>,
    frame: u32,
    next_frame: Instant,
    written: Vec<Written>,
}

const PUB: usize = 0;
const SUB: usize = 1;

impl Call {
    fn new(subscribe_audio: bool) -> Self {
        Self::with_config(subscribe_audio, |_| {})
    }

    fn with_config(subscribe_audio: bool, configure: impl FnOnce(&mut SfuConfig)) -> Self {
        let mut node = Node::new(|c| {
            c.keyframe_request_interval = ms(500);
            configure(c);
        });
        let now = node.now;
        let mut publisher_client = Client::new("publisher", remote(1, 1111), now);
        let mut subscriber_client = Client::new("subscriber", remote(2, 2222), now);

        let publisher = node.sfu.join(ROOM, "alice", false).unwrap();
        let mut simulcast = Simulcast::new();
        for l in &LAYERS {
            simulcast.add_send_layer(SimulcastLayer::new(l.rid));
        }
        let (pub_peer, mids) = publisher_client.negotiate(
            &mut node.sfu,
            node.now,
            publisher,
            OfferIntent::Publish,
            &[
                (MediaKind::Video, Direction::SendOnly, Some(simulcast)),
                (MediaKind::Audio, Direction::SendOnly, None),
            ],
        );
        let (video_mid, audio_mid) = (mids[0], mids[1]);
        let tracks = node.sfu.room_state(ROOM).tracks;
        assert_eq!(tracks.len(), 2, "{tracks:?}");
        let video = tracks.iter().find(|t| t.kind == TrackKind::Video).unwrap();
        let audio = tracks.iter().find(|t| t.kind == TrackKind::Audio).unwrap();
        assert_eq!(video.rids, vec!["q", "h", "f"]);
        assert!(audio.rids.is_empty());
        assert_eq!((video.participant, video.peer), (publisher, pub_peer));
        let video_track = video.track;

        let subscriber = node.sfu.join(ROOM, "bob", false).unwrap();
        let mut wanted = vec![(MediaKind::Video, Direction::RecvOnly, None)];
        if subscribe_audio {
            wanted.push((MediaKind::Audio, Direction::RecvOnly, None));
        }
        let (sub_peer, sub_mids) = subscriber_client.negotiate(
            &mut node.sfu,
            node.now,
            subscriber,
            OfferIntent::Subscribe { from: None },
            &wanted,
        );

        let mut call = Call {
            node,
            clients: [publisher_client, subscriber_client],
            publisher,
            pub_peer,
            video_mid,
            audio_mid,
            sub_peer,
            sub_video_mid: sub_mids[0],
            video_track,
            send_video: false,
            audio: None,
            frame: 0,
            next_frame: now,
            written: Vec::new(),
        };
        let connected = call.run_until(ms(5000), |c| {
            c.clients.iter().all(|x| x.rtc.is_connected())
                && [pub_peer, sub_peer].iter().all(|p| {
                    c.node
                        .events
                        .iter()
                        .any(|e| matches!(e, SfuEvent::PeerConnected { peer, .. } if peer == p))
                })
        });
        assert!(connected, "ICE + DTLS did not complete");
        call.next_frame = call.node.now;
        call
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Call) -> bool) -> bool {
        let until = self.node.now + limit;
        while self.node.now < until {
            self.step();
            if done(self) {
                return true;
            }
        }
        false
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    /// One millisecond: the publisher writes a frame when one is due, then
    /// timers fire and datagrams are delivered until the network is quiet.
    fn step(&mut self) {
        self.node.now += STEP;
        if (self.send_video || self.audio.is_some()) && self.node.now >= self.next_frame {
            self.write_frame();
            self.next_frame += FRAME;
        }
        client::fire_timers_and_deliver(&mut self.node, &mut self.clients);
    }

    /// Hands datagrams to the node and the node's to the clients, at the
    /// current instant, until nobody has anything left to send.
    fn deliver(&mut self, to_node: VecDeque<Datagram>) {
        client::deliver(&mut self.node, &mut self.clients, to_node, |s| {
            panic!("sent to a stranger: {}", s.destination)
        });
    }

    /// Pins the subscriber's layer, delivering what that sends at once.
    fn set_layer(&mut self, rid: &str) {
        let now = self.node.now;
        self.node
            .sfu
            .set_layer(now, self.sub_peer, Some(rid))
            .unwrap();
        self.deliver(VecDeque::new());
    }

    fn write_frame(&mut self) {
        let now = self.node.now;
        let frame = self.frame;
        self.frame += 1;
        let client = &mut self.clients[PUB];
        if self.send_video {
            for (i, l) in LAYERS.iter().enumerate() {
                let ts = l.ts0.wrapping_add(3000 * frame);
                write_video(
                    client,
                    self.video_mid,
                    now,
                    i,
                    frame,
                    ts,
                    is_key(i, frame),
                    true,
                );
                self.written.push(Written {
                    at: now,
                    layer: Some(i),
                    frame,
                });
            }
        }
        if let Some((level, voice)) = self.audio {
            let pt = client.pt(Codec::Opus);
            let mut api = client.rtc.direct_api();
            let tx = api.stream_tx_by_mid(self.audio_mid, None).unwrap();
            let ext = ExtensionValues {
                audio_level: Some(level),
                voice_activity: Some(voice),
                ..Default::default()
            };
            tx.write_rtp(
                RtpWrite::new(
                    pt,
                    SeqNo::from(5000 + u64::from(frame)),
                    1600 * frame,
                    now,
                    vec![0xf8, 0xff, 0xfe, frame as u8],
                )
                .marker(frame == 0)
                .ext_vals(ext),
            );
            self.written.push(Written {
                at: now,
                layer: None,
                frame,
            });
        }
        // str0m sends what was written when it is next driven.
        client.next_timeout = now;
    }

    /// Video packets the subscriber has received, in order.
    fn received_video(&self) -> Vec<Got> {
        let c = &self.clients[SUB];
        let vp8 = c.pt(Codec::Vp8);
        c.events
            .iter()
            .filter_map(|(at, e)| match e {
                Event::RtpPacket(p) if p.header.payload_type == vp8 && !p.payload.is_empty() => {
                    let key = vp8_is_keyframe(&p.payload);
                    let tag = if key { 11 } else { 4 };
                    let layer = usize::from(p.payload[tag]);
                    let frame = u32::from_be_bytes(p.payload[tag + 1..tag + 5].try_into().unwrap());
                    assert_eq!(p.payload.len(), LAYERS[layer].size, "payload intact");
                    Some(Got {
                        at: *at,
                        seq_no: *p.seq_no,
                        ts: p.header.timestamp,
                        ssrc: *p.header.ssrc,
                        marker: p.header.marker,
                        layer,
                        frame,
                        key,
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// Keyframe requests the publisher received, with when.
    fn keyframe_requests(&self) -> Vec<(Instant, Option<Rid>)> {
        self.clients[PUB]
            .events
            .iter()
            .filter_map(|(at, e)| match e {
                Event::KeyframeRequest(r) => {
                    assert_eq!(r.mid, self.video_mid);
                    assert_eq!(r.kind, KeyframeRequestKind::Pli);
                    Some((*at, r.rid))
                }
                _ => None,
            })
            .collect()
    }

    fn layer_demands(&self) -> Vec<Vec<String>> {
        self.node
            .events
            .iter()
            .filter_map(|e| match e {
                SfuEvent::LayerDemand {
                    room,
                    participant,
                    peer,
                    track,
                    active,
                } => {
                    assert_eq!(room, ROOM);
                    assert_eq!(
                        (*participant, *peer, *track),
                        (self.publisher, self.pub_peer, self.video_track)
                    );
                    Some(active.clone())
                }
                _ => None,
            })
            .collect()
    }
}

/// The publisher writes one packet of simulcast layer `layer`: sequence
/// number `seq0 + frame`, payload tagged with the layer and `frame` (what
/// `Call::received_video` reads back).
#[allow(clippy::too_many_arguments)]
fn write_video(
    client: &mut Client,
    mid: Mid,
    now: Instant,
    layer: usize,
    frame: u32,
    ts: u32,
    key: bool,
    marker: bool,
) {
    let l = &LAYERS[layer];
    let pt = client.pt(Codec::Vp8);
    let mut tag = vec![layer as u8];
    tag.extend_from_slice(&frame.to_be_bytes());
    let payload = vp8_payload(key, l.dims.0, l.dims.1, &tag, l.size);
    let mut api = client.rtc.direct_api();
    let tx = api
        .stream_tx_by_mid(mid, Some(Rid::from(l.rid)))
        .expect("a send stream per rid");
    tx.write_rtp(
        RtpWrite::new(pt, SeqNo::from(l.seq0 + u64::from(frame)), ts, now, payload)
            .marker(marker)
            .nackable(true),
    );
}

/// Sequence numbers continue one by one, timestamps only grow, one SSRC.
fn assert_continuous(got: &[Got]) {
    for w in got.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert_eq!(b.seq_no, a.seq_no + 1, "no gap, no repeat: {a:?} -> {b:?}");
        assert!(ts_diff(b.ts, a.ts) > 0, "timestamp grows: {a:?} -> {b:?}");
        assert_eq!(b.ssrc, a.ssrc, "one SSRC for the subscriber");
        assert!(b.marker);
    }
}

/// Checks one layer switch in `got` (everything received so far): packets
/// after `since` move from layer `from` to layer `to` exactly once, at a
/// keyframe of `to` (the first one the publisher sent after the switch was
/// asked for), frames stay consecutive, and the timestamp step at the
/// switch is the wall-clock time between the two packets.
fn assert_switch(
    got: &[Got],
    written: &[Written],
    since: Instant,
    from: usize,
    to: usize,
    asked_at_frame: u32,
) {
    let tail: Vec<&Got> = got.iter().filter(|g| g.at >= since).collect();
    let at = tail
        .iter()
        .position(|g| g.layer == to)
        .expect("the new layer arrived");
    assert!(at > 0, "the old layer kept flowing until the switch");
    assert!(
        tail[..at].iter().all(|g| g.layer == from),
        "only {from} before"
    );
    assert!(tail[at..].iter().all(|g| g.layer == to), "only {to} after");
    let (last_old, first_new) = (tail[at - 1], tail[at]);
    assert!(first_new.key, "switched at a keyframe: {first_new:?}");
    let expected_key = (asked_at_frame..).find(|f| is_key(to, *f)).unwrap();
    assert_eq!(
        first_new.frame, expected_key,
        "at the first keyframe after the request"
    );
    // The layers' packets of one frame arrive back to back, in an order the
    // publisher's stack picks: the old layer's copy of the switching frame
    // may or may not have gone out first. No frame is lost either way.
    assert!(
        first_new.frame == last_old.frame + 1 || first_new.frame == last_old.frame,
        "no frame lost: {last_old:?} -> {first_new:?}"
    );
    assert_eq!(first_new.seq_no, last_old.seq_no + 1);
    // The timestamp advances by the time between the two packets' arrivals
    // at the node (the publisher's send times; the subscriber's leg may be
    // paced) in 90 kHz ticks, and by at least one tick.
    let sent_at = |g: &Got| {
        written
            .iter()
            .find(|w| w.layer == Some(g.layer) && w.frame == g.frame)
            .expect("received what was written")
            .at
    };
    let wall = (sent_at(first_new) - sent_at(last_old)).as_millis() as i64;
    assert_eq!(ts_diff(first_new.ts, last_old.ts), (wall * 90).max(1));
    // Within a layer the publisher's own spacing is kept.
    for w in tail[at..].windows(2) {
        assert_eq!(ts_diff(w[1].ts, w[0].ts), 3000);
    }
}

#[test]
fn simulcast_layer_switches_on_keyframes_with_continuous_numbering() {
    let mut call = Call::new(false);
    call.send_video = true;

    // Unpinned, with a generous estimate, the subscriber gets the best layer.
    let got_f = call.run_until(ms(3000), |c| c.received_video().len() >= 20);
    assert!(got_f, "subscriber received no video");
    call.run_for(ms(500));
    let got = call.received_video();
    assert!(got.iter().all(|g| g.layer == F), "one layer only: {got:?}");
    assert!(got[0].key, "starts at a keyframe");
    assert_continuous(&got);
    for w in got.windows(2) {
        assert_eq!(w[1].frame, w[0].frame + 1, "every frame of the layer");
        assert_eq!(ts_diff(w[1].ts, w[0].ts), 3000, "the publisher's spacing");
    }
    assert_eq!(
        call.node.sfu.current_layer(call.sub_peer),
        Some(Some("f".into()))
    );
    assert_eq!(call.node.stats().counters.layer_switches, 0);
    assert_eq!(call.layer_demands().last(), Some(&vec!["f".to_string()]));
    assert!(
        call.keyframe_requests()
            .iter()
            .any(|(_, rid)| *rid == Some(Rid::from("f"))),
        "the subscriber's first layer was asked for a keyframe"
    );

    // Pin "q": the switch waits for q's next keyframe.
    let asked = call.node.now;
    let asked_frame = call.frame;
    call.set_layer("q");
    assert_eq!(
        call.layer_demands().last(),
        Some(&vec!["q".to_string(), "f".to_string()]),
        "both layers are watched during the switch"
    );
    let switched = call.run_until(ms(1000), |c| {
        c.received_video().last().is_some_and(|g| g.layer == Q)
    });
    assert!(switched, "never switched to q");
    assert!(
        call.keyframe_requests()
            .iter()
            .any(|(at, rid)| *at >= asked && *rid == Some(Rid::from("q"))),
        "a PLI for q reached the publisher: {:?}",
        call.keyframe_requests()
    );
    assert_eq!(call.node.stats().counters.layer_switches, 1);
    assert_eq!(
        call.node.sfu.current_layer(call.sub_peer),
        Some(Some("q".into()))
    );

    // Once the switch is done, only q is demanded and the others are paused.
    let demanded = call.run_until(ms(300), |c| {
        c.layer_demands().last() == Some(&vec!["q".to_string()])
    });
    assert!(demanded, "demand: {:?}", call.layer_demands());
    let paused_before = call.node.drops(DropReason::Paused);
    let written_before = call.written.len();
    call.run_for(ms(700));
    let not_watched = call.written[written_before..]
        .iter()
        .filter(|w| matches!(w.layer, Some(H) | Some(F)))
        .count() as u64;
    assert!(not_watched >= 2 * 20, "{not_watched}");
    assert_eq!(
        call.node.drops(DropReason::Paused) - paused_before,
        not_watched,
        "every h and f packet is dropped as paused"
    );
    let got = call.received_video();
    assert_continuous(&got);
    assert_switch(&got, &call.written, asked, F, Q, asked_frame);

    // Back to "f": it is resumed, asked for a keyframe, switched to on it.
    let asked = call.node.now;
    let asked_frame = call.frame;
    call.set_layer("f");
    assert_eq!(
        call.layer_demands().last(),
        Some(&vec!["q".to_string(), "f".to_string()])
    );
    let switched = call.run_until(ms(1000), |c| {
        c.received_video().last().is_some_and(|g| g.layer == F)
    });
    assert!(switched, "never switched back to f");
    call.run_for(ms(500));
    let got = call.received_video();
    assert_continuous(&got);
    assert_switch(&got, &call.written, asked, Q, F, asked_frame);
    // f's input sequence numbers wrapped at frame 36 (65_500 + 36 = 65_536).
    assert!(got.iter().any(|g| g.layer == F && g.frame > 36));
    assert!(
        call.keyframe_requests()
            .iter()
            .any(|(at, rid)| *at >= asked && *rid == Some(Rid::from("f"))),
        "a PLI for f reached the publisher"
    );
    assert_eq!(call.node.stats().counters.layer_switches, 2);
    assert_eq!(call.layer_demands().last(), Some(&vec!["f".to_string()]));

    // The subscriber's own PLI reaches the publisher, for the layer it
    // watches, once the last request for that layer is 500 ms old.
    call.run_for(ms(600));
    let before = call.node.stats().counters;
    let asked = call.node.now;
    let sub = &mut call.clients[SUB];
    sub.rtc
        .direct_api()
        .stream_rx_by_mid(call.sub_video_mid, None)
        .expect("the subscriber's receive stream")
        .request_keyframe(KeyframeRequestKind::Pli);
    sub.next_timeout = asked;
    call.run_for(ms(20));
    let after = call.node.stats().counters;
    assert_eq!(
        after.keyframe_requests_received,
        before.keyframe_requests_received + 1
    );
    assert_eq!(
        after.keyframe_requests_forwarded,
        before.keyframe_requests_forwarded + 1
    );
    let forwarded: Vec<Option<Rid>> = call
        .keyframe_requests()
        .into_iter()
        .filter(|(at, _)| *at >= asked)
        .map(|(_, rid)| rid)
        .collect();
    assert_eq!(forwarded, vec![Some(Rid::from("f"))]);

    // Everything else the clients sent was accepted.
    for reason in DropReason::ALL {
        if reason != DropReason::Paused {
            assert_eq!(call.node.drops(reason), 0, "{}", reason.label());
        }
    }
}

#[test]
fn audio_levels_elect_the_active_speaker() {
    let mut call = Call::new(true);
    call.audio = Some((-20, true));
    let first_audio = call.node.now;
    let spoke = call.run_until(ms(1000), |c| {
        c.node
            .events
            .iter()
            .any(|e| matches!(e, SfuEvent::ActiveSpeaker { .. }))
    });
    assert!(spoke, "no ActiveSpeaker event");
    assert!(
        call.node.now - first_audio <= ms(250) + STEP,
        "on the first tick"
    );
    let speakers: Vec<&SfuEvent> = call
        .node
        .events
        .iter()
        .filter(|e| matches!(e, SfuEvent::ActiveSpeaker { .. }))
        .collect();
    assert_eq!(
        speakers,
        vec![&SfuEvent::ActiveSpeaker {
            room: ROOM.into(),
            participant: Some(call.publisher),
            level: -20,
        }]
    );

    // The subscriber's audio carries the level on.
    call.run_for(ms(200));
    let opus = call.clients[SUB].pt(Codec::Opus);
    let levels: Vec<(Option<i8>, Option<bool>)> = call.clients[SUB]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RtpPacket(p) if p.header.payload_type == opus => Some((
                p.header.ext_vals.audio_level,
                p.header.ext_vals.voice_activity,
            )),
            _ => None,
        })
        .collect();
    assert!(levels.len() >= 5, "{levels:?}");
    assert!(
        levels.iter().all(|l| *l == (Some(-20), Some(true))),
        "{levels:?}"
    );

    // Silence ends it.
    call.audio = Some((-127, false));
    let quiet = call.run_until(ms(2000), |c| {
        c.node.events.iter().any(|e| {
            matches!(
                e,
                SfuEvent::ActiveSpeaker {
                    participant: None,
                    ..
                }
            )
        })
    });
    assert!(quiet, "the speaker never went quiet");
    assert_eq!(
        call.node.events.last(),
        Some(&SfuEvent::ActiveSpeaker {
            room: ROOM.into(),
            participant: None,
            level: -127,
        })
    );
}

/// str0m's pacer releases one packet per timeout and asks for the next a
/// microsecond later. A subscriber must get more than one paced packet per
/// millisecond (the shard's timer tick): here 2 000 packets/s of the full
/// layer, 14.4 Mbit/s, well inside the estimate.
#[test]
fn paced_sends_are_not_one_per_timer_tick() {
    let mut call = Call::with_config(false, |c| c.initial_bwe_bps = 50_000_000);
    call.send_video = true;
    let got_f = call.run_until(ms(3000), |c| {
        c.received_video().iter().filter(|g| g.layer == F).count() >= 10
    });
    assert!(got_f, "subscriber received no video of the full layer");
    call.send_video = false;
    call.run_for(ms(100));
    let before = call.received_video().len();

    // Two packets of layer f every millisecond for 2 s.
    const PER_MS: u32 = 2;
    const MILLIS: u32 = 2000;
    let first = call.frame;
    let l = &LAYERS[F];
    for m in 0..MILLIS {
        let now = call.node.now;
        let ts = l.ts0.wrapping_add(90 * (first + m));
        for i in 0..PER_MS {
            let frame = first + m * PER_MS + i;
            let client = &mut call.clients[PUB];
            write_video(
                client,
                call.video_mid,
                now,
                F,
                frame,
                ts,
                false,
                i + 1 == PER_MS,
            );
        }
        call.clients[PUB].next_timeout = now;
        call.step();
    }
    call.frame += MILLIS * PER_MS;
    call.run_for(ms(200));
    let got = call.received_video();
    let burst: Vec<&Got> = got[before..].iter().filter(|g| g.frame >= first).collect();
    let sent = (MILLIS * PER_MS) as usize;
    // One packet per tick would deliver about half, ever later.
    assert!(
        burst.len() * 100 >= sent * 98,
        "{} of {sent} packets reached the subscriber",
        burst.len()
    );
    // The estimate starts from what the call carried before and ramps up
    // over the first second or so; in the last half second the pacer keeps
    // nothing back.
    let written_at = |g: &Got| {
        let m = (g.frame - first) / PER_MS;
        call.node.now - ms(200) - ms(u64::from(MILLIS - m))
    };
    let late = burst
        .iter()
        .filter(|g| (g.frame - first) / PER_MS >= MILLIS * 3 / 4)
        .map(|g| g.at - written_at(g))
        .max()
        .expect("packets of the last half second");
    assert!(late <= ms(5), "last half second: a packet took {late:?}");
}
