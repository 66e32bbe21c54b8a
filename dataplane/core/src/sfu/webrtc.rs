//! WebRTC peers: sessions negotiated from an SDP offer and run by str0m.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use str0m::bwe::Bitrate;
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Rid, Rids};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo};
use str0m::{Candidate, IceCreds, Input, Rtc, RtcConfig};

use crate::error::{SdpError, SfuError};
use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::packet::stun::StunMessage;
use crate::rewrite::StreamRewriter;
use crate::types::{
    CodecSpec, Counters, DropReason, OfferIntent, Output, PayloadInfo, TrackKind, Trailer, Transmit,
};

use super::Sfu;
use super::codecs;
use super::forward::Forward;
use super::layers::{Layer, admit};
use super::outbox::Outbox;
use super::peer::{Peer, PeerIndex, Transport};
use super::quota::Charge;
use super::registry::Track;
use super::scalable::{Decision, Scalable};

/// A str0m timeout due this close to `now` is handled while draining (see
/// `Io::drain`): str0m's pacer asks for its next turn 1 µs after its last,
/// and each turn handled at its own instant moves str0m's clock on by that
/// microsecond, so this must cover [`IMMEDIATE_ROUNDS`] of them. A timer due
/// a little later fires early by at most this much, against up to a
/// millisecond late on the shard's timer.
const IMMEDIATE_TIMEOUT: Duration = Duration::from_micros(100);

/// At most this many such timeouts per drain, so that a session whose
/// timer keeps falling due cannot hold the shard.
const IMMEDIATE_ROUNDS: u32 = 64;

/// A WebRTC session (str0m), publishing or subscribing.
pub(super) struct WebRtcPeer {
    pub(super) rtc: Rtc,
    pub(super) intent: OfferIntent,
    pub(super) ufrag: String,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) next_timeout: Instant,
    pub(super) connected: bool,
    /// Media this peer sends us: mid -> track.
    pub(super) published: Vec<(Mid, TrackId)>,
    /// Media we send this peer.
    pub(super) slots: Vec<Slot>,
    pub(super) bwe_bps: Option<u64>,
    pub(super) pinned_rid: Option<Rid>,
    pub(super) closing: bool,
    /// Tracks this subscriber was told it cannot receive (their codec).
    pub(super) refused_tracks: Vec<TrackId>,
    /// The session's `packets_in` when the tick last saw it change, and
    /// when: how long a connected remote has been silent (consent.rs).
    pub(super) heard_packets: u64,
    pub(super) heard_at: Instant,
}

/// One outgoing m-line of a subscriber and the track bound to it.
pub(super) struct Slot {
    pub(super) mid: Mid,
    pub(super) kind: TrackKind,
    pub(super) track: Option<TrackId>,
    /// Payload type negotiated with the subscriber for the track's codec.
    pub(super) pt: Option<(Codec, str0m::format::PayloadParams)>,
    pub(super) rewriter: StreamRewriter,
    /// Layer selection within a scalable stream (VP9 SVC, VP8 temporal
    /// layers).
    pub(super) svc: Scalable,
    pub(super) current: Option<usize>,
    pub(super) target: Option<usize>,
}

/// An offer negotiated into a session that is not live yet: nothing of it
/// is registered, so a bad offer leaves no trace.
struct Negotiated {
    peer: WebRtcPeer,
    answer: String,
    /// The m-lines the peer publishes: mid, kind, simulcast rids, and the
    /// codec the answer makes the publisher send.
    published: Vec<PublishedLine>,
    early_events: Vec<str0m::Event>,
    transmits: Vec<str0m::net::Transmit>,
}

/// A published m-line: mid, kind, simulcast rids, and the codec (with its
/// format parameters) the answer makes the publisher send.
type PublishedLine = (Mid, TrackKind, Vec<Rid>, Option<str0m::format::CodecSpec>);

/// What [`negotiate`] needs of the core's configuration.
struct NegotiateWith<'a> {
    shard: u8,
    initial_bwe_bps: u64,
    candidates: &'a [SocketAddr],
    dtls_cert: Option<&'a str0m::config::DtlsCert>,
    /// What the session may negotiate, in order ([`super::codecs`]).
    codecs: &'a [CodecSpec],
}

/// Builds a str0m session for `offer` and reads the negotiated m-lines
/// from the answer. `initial_seq` gives each subscriber m-line's first
/// sequence number.
fn negotiate(
    now: Instant,
    offer: &str,
    intent: OfferIntent,
    with: NegotiateWith<'_>,
    mut initial_seq: impl FnMut() -> u16,
) -> Result<Negotiated, SfuError> {
    let offered = codecs::offered_lines(offer);
    let offer = SdpOffer::from_sdp_string(offer)
        .map_err(|e| SfuError::InvalidSdp(SdpError::Unparsable(sdp_error(&e.to_string()))))?;
    let config = RtcConfig::new()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .set_stats_interval(Some(Duration::from_secs(1)));
    let mut config = codecs::enable(config, with.codecs);
    if let Some(cert) = with.dtls_cert {
        config = config.set_dtls_cert(cert.clone());
    }
    if matches!(intent, OfferIntent::Subscribe { .. }) {
        config = config.enable_bwe(Some(Bitrate::from(with.initial_bwe_bps)));
    }
    // Our ufrag names our shard, so the kernel can steer a session's
    // first STUN request on a port shared by every shard.
    let mut creds = IceCreds::new();
    creds.ufrag = crate::ids::shard_ufrag(with.shard, &creds.ufrag);
    config = config.set_local_ice_credentials(creds);
    let mut rtc = config.build(now);
    for addr in with.candidates {
        let c = Candidate::host(*addr, "udp")
            .map_err(|e| SfuError::Internal(format!("candidate {addr}: {e}")))?;
        rtc.add_local_candidate(c);
    }
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| SfuError::InvalidSdp(SdpError::NotNegotiable(e.to_string())))?;
    // An m-line with no codec in common is left out of the answer (or
    // answered with none): say which, and what the room allows.
    for line in offered.iter().filter(|l| !l.rejected) {
        let answered = answer.media_lines.iter().any(|l| {
            !l.disabled
                && l.mid().to_string() == line.mid
                && rtc
                    .media(l.mid())
                    .is_some_and(|m| !m.remote_pts().is_empty())
        });
        if !answered {
            return Err(codecs::not_allowed(line, with.codecs));
        }
    }
    let mut published = Vec::new();
    let mut slots = Vec::new();
    let mut early_events = Vec::new();
    let mut transmits = Vec::new();
    // str0m announces m-lines (MediaAdded) only once DTLS is up, so read
    // the negotiated ones from the answer itself.
    for line in answer.media_lines.iter().filter(|l| !l.disabled) {
        let mid = line.mid();
        let Some(media) = rtc.media(mid) else {
            continue; // the data channel m-line
        };
        let kind = match media.kind() {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        };
        let direction = media.direction();
        let receives = matches!(direction, Direction::RecvOnly | Direction::SendRecv);
        let sends = matches!(direction, Direction::SendOnly | Direction::SendRecv);
        match intent {
            OfferIntent::Publish if receives => {
                let rids = match media.rids_rx() {
                    Rids::Specific(r) => r.clone(),
                    _ => Vec::new(),
                };
                published.push((mid, kind, rids, codecs::expected(&rtc, mid)));
            }
            OfferIntent::Subscribe { .. } if sends => {
                slots.push(Slot {
                    mid,
                    kind,
                    track: None,
                    pt: None,
                    rewriter: StreamRewriter::new(kind.clock_rate(), initial_seq()),
                    svc: Scalable::default(),
                    current: None,
                    target: None,
                });
            }
            OfferIntent::Subscribe { .. } => {
                return Err(SfuError::InvalidSdp(SdpError::SubscribeSendsMedia {
                    mid: mid.to_string(),
                }));
            }
            OfferIntent::Publish => {
                return Err(SfuError::InvalidSdp(SdpError::PublishReceivesOnly {
                    mid: mid.to_string(),
                }));
            }
        }
    }
    let next_timeout = loop {
        match rtc.poll_output() {
            Ok(str0m::Output::Timeout(t)) => break t,
            Ok(str0m::Output::Event(e)) => early_events.push(e),
            Ok(str0m::Output::Transmit(t)) => transmits.push(t),
            Err(e) => return Err(SfuError::Internal(e.to_string())),
        }
    };
    if published.is_empty() && slots.is_empty() {
        return Err(SfuError::InvalidSdp(SdpError::NoUsableMedia));
    }
    let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
    Ok(Negotiated {
        peer: WebRtcPeer {
            rtc,
            intent,
            ufrag,
            addrs: Vec::new(),
            next_timeout,
            connected: false,
            published: Vec::new(),
            slots,
            bwe_bps: None,
            pinned_rid: None,
            closing: false,
            refused_tracks: Vec::new(),
            heard_packets: 0,
            heard_at: now,
        },
        answer: answer.to_sdp_string(),
        published,
        early_events,
        transmits,
    })
}

impl Sfu {
    /// Builds the str0m session for an offer (nothing registered yet).
    fn negotiate_offer(
        &mut self,
        now: Instant,
        offer: &str,
        intent: OfferIntent,
        codecs: &[CodecSpec],
    ) -> Result<Negotiated, SfuError> {
        if self.dtls_cert.is_none() {
            self.dtls_cert = str0m::crypto::from_feature_flags()
                .dtls_provider
                .generate_certificate();
        }
        let with = NegotiateWith {
            shard: self.config.shard,
            initial_bwe_bps: self.config.initial_bwe_bps,
            candidates: &self.config.candidates,
            dtls_cert: self.dtls_cert.as_ref(),
            codecs,
        };
        let rng = &mut self.rng;
        negotiate(now, offer, intent, with, || {
            (rng.next_u64() & 0x3fff) as u16
        })
    }

    /// Negotiates a WebRTC peer from a client's SDP offer (WHIP, WHEP, WS).
    /// Returns the new peer and the SDP answer.
    pub fn accept_offer(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        offer: &str,
        intent: OfferIntent,
    ) -> Result<(PeerId, String), SfuError> {
        let room = self.room_for_new_session(participant)?;
        // The session first (cheap, before any negotiation work), then its
        // tracks once the answer says how many it publishes.
        let session = self.charge_session(
            participant,
            Charge {
                sessions: 1,
                ..Charge::default()
            },
        )?;
        let codecs = self
            .codec_policy
            .effective(&self.config.codecs, &room, participant);
        let negotiated = self
            .negotiate_offer(now, offer, intent, &codecs)
            .and_then(|n| {
                self.check_receivable(&room, participant, intent, &n.peer)?;
                Ok(n)
            });
        let tracks = match &negotiated {
            Ok(n) if !n.published.is_empty() => self.charge_session(
                participant,
                Charge {
                    tracks: n.published.len(),
                    ..Charge::default()
                },
            ),
            _ => Ok(None),
        };
        let (negotiated, tracks) = match (negotiated, tracks) {
            (Ok(n), Ok(t)) => (n, t),
            (Err(e), _) | (_, Err(e)) => {
                self.uncharge(session);
                return Err(e);
            }
        };
        let charged = match (session, tracks) {
            (Some((owner, a)), Some((_, b))) => Some((
                owner,
                Charge {
                    tracks: b.tracks,
                    ..a
                },
            )),
            (s, _) => s,
        };
        let Negotiated {
            peer: mut w,
            answer,
            published,
            early_events,
            transmits,
        } = negotiated;
        let id = self.new_peer_id();
        self.keep_charge(id, charged);
        let mut infos = Vec::new();
        for (mid, kind, rids, spec) in published {
            let layers = if rids.is_empty() {
                vec![Layer::new(None)]
            } else {
                rids.into_iter().map(|r| Layer::new(Some(r))).collect()
            };
            let mut track = Track::new(&room, participant, id, kind, spec.map(|s| s.codec), layers);
            track.mid = Some(mid);
            track.format = spec.map(|s| s.format);
            let (tid, info) = self.reg.add_track(track);
            infos.push(info);
            w.published.push((mid, tid));
        }
        self.index.by_ufrag.insert(w.ufrag.clone(), id);
        for e in early_events {
            self.out.rtc_events.push_back((id, e));
        }
        // An ICE-lite answerer normally sends nothing before the first
        // binding request, but pass on whatever str0m queued.
        for t in transmits {
            self.out.outputs.push_back(Output::Transmit(Transmit {
                source: t.source,
                destination: t.destination,
                contents: t.contents.into(),
                payload: None,
                trailer: Trailer::default(),
            }));
        }
        let peer = Peer::new(participant, &room, Transport::WebRtc(Box::new(w)), now);
        self.insert_peer(id, peer);
        for info in infos {
            self.publish_track(now, &room, info);
        }
        self.bind_slots(now, id);
        Ok((id, answer))
    }

    pub(in crate::sfu) fn handle_new_stun(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        let peer = match StunMessage::parse(data) {
            Ok(m) if m.is_binding_request() => m
                .username()
                .and_then(|(local, _)| std::str::from_utf8(local).ok())
                .and_then(|u| self.index.by_ufrag.get(u).copied()),
            Ok(_) => None,
            Err(_) => {
                self.out.drop_packet(DropReason::Malformed);
                return;
            }
        };
        match peer {
            Some(peer) => self.feed_rtc(now, peer, source, destination, data),
            None => self.out.drop_packet(DropReason::UnknownUfrag),
        }
    }

    pub(in crate::sfu) fn feed_rtc(
        &mut self,
        now: Instant,
        id: PeerId,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Transport::WebRtc(w) = &mut peer.transport else {
            return;
        };
        peer.counters.packets_in += 1;
        peer.counters.bytes_in += data.len() as u64;
        let Ok(recv) = Receive::new(Protocol::Udp, source, destination, data) else {
            self.out.drop_packet(DropReason::Malformed);
            return;
        };
        if let Err(e) = w.rtc.handle_input(Input::Receive(now, recv)) {
            tracing::debug!(peer = %id, error = %e, "datagram rejected");
            self.out.drop_packet(DropReason::Rejected);
        }
        if !w.drain(now, id, &mut peer.counters, &mut self.out, &mut self.index) {
            w.closing = true;
        }
    }

    pub(in crate::sfu) fn on_webrtc_rtp(&mut self, now: Instant, id: PeerId, p: RtpPacket) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let participant = peer.participant;
        let Transport::WebRtc(w) = &mut peer.transport else {
            return;
        };
        let ssrc = p.header.ssrc;
        // A layer seen before is found by its SSRC; str0m's mid/rid only
        // names the layer of an SSRC seen for the first time.
        let known = w.published.iter().find_map(|(_, tid)| {
            let track = self.reg.tracks.get(tid)?;
            let i = track.layers.iter().position(|l| l.ssrc == Some(*ssrc))?;
            Some((*tid, i))
        });
        let (tid, layer) = match known {
            Some(found) => found,
            None => {
                let (mid, rid) = match w.rtc.direct_api().stream_rx(&ssrc) {
                    Some(rx) => (rx.mid(), rx.rid()),
                    None => match p.header.ext_vals.mid {
                        Some(mid) => (mid, p.header.ext_vals.rid),
                        None => return,
                    },
                };
                let Some(&(_, tid)) = w.published.iter().find(|(m, _)| *m == mid) else {
                    return;
                };
                let Some(track) = self.reg.tracks.get_mut(&tid) else {
                    return;
                };
                let i = match track.layers.iter().position(|l| l.rid == rid) {
                    Some(i) => i,
                    // A simulcast track's new SSRC must name its layer; one
                    // that does not is not guessed at (a wrong guess would
                    // feed a layer nobody can select).
                    None if rid.is_none() && track.layers.iter().any(|l| l.rid.is_some()) => {
                        self.out.drop_packet(DropReason::UnknownSsrc);
                        return;
                    }
                    None => {
                        track.layers.push(Layer::new(rid));
                        track.layers.len() - 1
                    }
                };
                (tid, i)
            }
        };
        let Some(track) = self.reg.tracks.get_mut(&tid) else {
            return;
        };
        // The answer predicts the codec; the payload type tells. A
        // publisher may move to another negotiated codec at any time.
        let pt = p.header.payload_type;
        if track.codec_pt != Some(*pt)
            && let Some(spec) = codecs::spec_of_pt(&w.rtc, pt)
        {
            track.codec_pt = Some(*pt);
            let (codec, format) = (spec.codec, Some(spec.format));
            if track.codec != Some(codec) || track.format != format {
                track.format = format;
                tracing::debug!(track = %tid, ?codec, "track codec set by its payload type");
                track.codec = Some(codec);
                let subscribers = track.subscribers.clone();
                self.codec_changed(now, tid, &subscribers);
            }
        }
        let Some(track) = self.reg.tracks.get_mut(&tid) else {
            return;
        };
        let codec = track.codec.and_then(CodecSpec::from_str0m);
        let info = match codec.map(|c| c.inspect(&p.payload, p.header.marker)) {
            Some(Err(e)) => {
                tracing::debug!(track = %tid, error = %e, "malformed media payload dropped");
                self.out.drop_packet(DropReason::MalformedPayload);
                return;
            }
            Some(Ok(info)) => info,
            None => PayloadInfo::default(),
        };
        let audio_level = p.header.ext_vals.audio_level.map(|l| {
            (
                p.header.ext_vals.voice_activity.unwrap_or(true),
                l.unsigned_abs(),
            )
        });
        super::registry::observe_level(&mut self.reg.rooms, &track.room, participant, audio_level);
        let fwd = Forward {
            ssrc: *ssrc,
            seq: p.header.sequence_number,
            timestamp: p.header.timestamp,
            marker: p.header.marker,
            keyframe: info.keyframe,
            payload: &p.payload,
            shared: Some(&p.payload),
            stored: None,
            audio_level,
            svc: info.layers,
        };
        self.forward(now, tid, layer, &fwd);
    }
}

/// str0m's parser errors carry a pointer offset; keep only the human part.
fn sdp_error(raw: &str) -> String {
    let text: Vec<&str> = raw
        .lines()
        .map(|l| match l.find("Parse error at") {
            Some(_) => "parse error",
            None => l.trim(),
        })
        .filter(|l| !l.is_empty())
        .collect();
    text.join("; ")
}

impl WebRtcPeer {
    /// Drains one `Rtc` until it asks for a timeout (str0m's single-mutation
    /// invariant). Returns false if the peer failed and must be closed.
    ///
    /// A timeout due within [`IMMEDIATE_TIMEOUT`] of `now` is handled here
    /// and draining goes on, up to [`IMMEDIATE_ROUNDS`] times: str0m's pacer
    /// releases one packet per timeout and asks for the next a microsecond
    /// later, and the shard's timer (1 ms resolution) would otherwise send
    /// at most one paced packet per millisecond per session.
    pub(in crate::sfu) fn drain(
        &mut self,
        now: Instant,
        id: PeerId,
        counters: &mut Counters,
        out: &mut Outbox,
        index: &mut PeerIndex,
    ) -> bool {
        let mut rounds = 0;
        loop {
            match self.rtc.poll_output() {
                Ok(str0m::Output::Timeout(t)) => {
                    if rounds < IMMEDIATE_ROUNDS && t <= now + IMMEDIATE_TIMEOUT {
                        rounds += 1;
                        if let Err(e) = self.rtc.handle_input(Input::Timeout(t.max(now))) {
                            tracing::warn!(peer = %id, error = %e, "WebRTC session failed");
                            return false;
                        }
                        continue;
                    }
                    self.next_timeout = t;
                    return true;
                }
                Ok(str0m::Output::Transmit(t)) => {
                    // str0m only answers addresses that passed ICE, so this is
                    // where a remote address becomes routable to the peer.
                    if !self.addrs.contains(&t.destination) && self.addrs.len() < 8 {
                        self.addrs.push(t.destination);
                        index.by_addr.insert(t.destination, id);
                    }
                    out.send_from(counters, t.source, t.destination, t.contents.into());
                }
                Ok(str0m::Output::Event(e)) => out.rtc_events.push_back((id, e)),
                Err(e) => {
                    tracing::warn!(peer = %id, error = %e, "WebRTC session failed");
                    return false;
                }
            }
        }
    }

    /// Sends a packet of `layer` of track `tid` on the m-line bound to it,
    /// if this subscriber is connected and watches that layer. Returns false
    /// when it waits for a keyframe of `layer`.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::sfu) fn send_media(
        &mut self,
        now: Instant,
        id: PeerId,
        (tid, layer, kind, codec, format): (
            TrackId,
            usize,
            TrackKind,
            Option<Codec>,
            Option<&str0m::format::FormatParams>,
        ),
        pkt: &Forward<'_>,
        shared: &mut Option<Arc<[u8]>>,
        counters: &mut Counters,
        out: &mut Outbox,
        index: &mut PeerIndex,
    ) -> bool {
        if !self.connected {
            return true;
        }
        let Some(slot) = self.slots.iter_mut().find(|s| s.track == Some(tid)) else {
            return true;
        };
        if !admit(&mut slot.current, slot.target, layer, pkt.keyframe, kind) {
            return slot.target != Some(layer);
        }
        if slot.current == Some(layer)
            && slot.rewriter.source() != Some(pkt.ssrc)
            && slot.rewriter.source().is_some()
        {
            counters.layer_switches += 1;
            out.counters.layer_switches += 1;
        }
        if slot.pt.is_none() {
            slot.pt = codec.and_then(|c| codecs::negotiated_pt(&self.rtc, slot.mid, c, format));
        }
        let Some((_, params)) = &slot.pt else {
            return true;
        };
        let pt = params.pt();
        let marker = match slot.svc.decide(pkt.ssrc, pkt.seq, pkt.svc.as_ref()) {
            Decision::Pass => pkt.marker,
            Decision::Forward { marker } => marker,
            Decision::Drop => {
                // Left out of this subscriber's stream, without a gap.
                slot.rewriter.skip(pkt.ssrc, pkt.seq);
                return !slot.svc.take_keyframe_request();
            }
        };
        let wants_keyframe = slot.svc.take_keyframe_request();
        let Some(rewritten) = slot.rewriter.rewrite(now, pkt.ssrc, pkt.seq, pkt.timestamp) else {
            // A copy of a packet left out of this stream: not forwarded.
            return !wants_keyframe;
        };
        let payload = shared.get_or_insert_with(|| Arc::from(pkt.payload)).clone();
        let mut ext = ExtensionValues::default();
        if let Some((voice, level)) = pkt.audio_level {
            ext.audio_level = Some(-(level.min(127) as i8));
            ext.voice_activity = Some(voice);
        }
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(slot.mid, None) else {
            return true;
        };
        tx.write_rtp(
            RtpWrite::new(
                pt,
                SeqNo::from(rewritten.seq),
                rewritten.timestamp,
                now,
                payload,
            )
            .marker(marker)
            .nackable(kind == TrackKind::Video)
            .ext_vals(ext),
        );
        if !self.drain(now, id, counters, out, index) {
            self.closing = true;
        }
        !wants_keyframe
    }
}
