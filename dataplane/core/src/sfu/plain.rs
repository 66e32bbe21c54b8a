//! Plain RTP endpoints (no ICE, no DTLS) for native clients: one stream in
//! one direction, routed by the remote's address and SSRC.

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::PacketBuf;
use crate::error::{SfuError, SpecError};
use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::packet::{self, PacketClass, rtcp, rtp::RtpHeader};
use crate::retransmit::RetransmitBuffer;
use crate::rewrite::StreamRewriter;
use crate::types::{
    CodecSpec, Counters, DropReason, LocalHeader, LocalMedia, LocalOutput, Output, PlainFlow,
    PlainFlowDestination, RtpDirection, RtpEndpointInfo, RtpEndpointSpec, SfuEvent, TrackKind,
};

use super::Sfu;
use super::forward::Forward;
use super::layers::{Layer, admit};
use super::outbox::{Feedback, Outbox, RtcpFeedback};
use super::peer::{Peer, Transport};
use super::quota::Charge;
use super::registry::Track;
use super::scalable::{Decision, Scalable};

/// Largest gap in a plain publisher's sequence numbers that we NACK.
const MAX_NACK_GAP: u16 = 64;

/// Where an RTP endpoint's packets go (and, for a publisher, come from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sink {
    /// A remote socket (plain RTP).
    Remote(SocketAddr),
    /// In-process: [`Output::Local`] for the endpoint `PeerId`, and
    /// [`Sfu::handle_local_rtp`] in.
    Local(PeerId),
}

/// An RTP endpoint: one stream in one direction, with a remote socket
/// (plain RTP) or in-process (a local endpoint).
pub(super) struct RtpEndpoint {
    pub(super) direction: RtpDirection,
    pub(super) kind: TrackKind,
    pub(super) codec: CodecSpec,
    pub(super) sink: Sink,
    pub(super) payload_type: u8,
    pub(super) ssrc: u32,
    pub(super) track: Option<TrackId>,
    pub(super) rewriter: StreamRewriter,
    pub(super) current: Option<usize>,
    pub(super) target: Option<usize>,
    pub(super) retransmit: RetransmitBuffer,
    /// Highest sequence number received from a plain publisher.
    highest_in: Option<u16>,
    /// A plain publisher's last packet, when it carried no CSRC, no header
    /// extension and no padding (so the core's rewrite changes only SSRC,
    /// PT, sequence number and timestamp): its payload type.
    simple_pt: Option<u8>,
    /// A plain publisher whose stream a kernel fast path forwards: the core
    /// sees only samples, so sequence gaps are not loss.
    kernel_forwarded: bool,
    /// A plain audio publisher's RFC 6464 audio-level extension id.
    audio_level_ext: Option<u8>,
    /// A subscriber that named its codec is bound only to tracks in it
    /// (`None`: to a track in any codec).
    pub(super) accepts: Option<CodecSpec>,
    /// A publisher's format parameters (its `fmtp`), for its track.
    pub(super) format: Option<str0m::format::FormatParams>,
    /// A subscriber's layer selection within a scalable stream.
    pub(super) svc: Scalable,
}

/// Checks that `pt` is a static (0-63) or dynamic (96-127) RTP payload
/// type.
pub(super) fn check_payload_type(pt: u8) -> Result<(), SpecError> {
    if pt > 127 || (64..96).contains(&pt) {
        return Err(SpecError::PayloadType(pt));
    }
    Ok(())
}

/// Checks what a plain endpoint request says on its own.
fn check_spec(spec: &RtpEndpointSpec) -> Result<(), SpecError> {
    check_payload_type(spec.payload_type)?;
    if let Some(id) = spec.audio_level_ext
        && (spec.direction != RtpDirection::Publish
            || spec.kind != TrackKind::Audio
            || !(1..=14).contains(&id))
    {
        return Err(SpecError::AudioLevelExt(id));
    }
    if let Some(codec) = spec.codec
        && codec.kind() != spec.kind
    {
        return Err(SpecError::CodecKind {
            codec,
            kind: spec.kind,
        });
    }
    if spec.remote.port() == 0 || spec.remote.ip().is_unspecified() {
        return Err(SpecError::RemoteNotConcrete(spec.remote));
    }
    Ok(())
}

impl RtpEndpoint {
    /// An endpoint with nothing received or sent yet. `initial` is its
    /// first output sequence number (a subscriber's).
    pub(super) fn new(
        direction: RtpDirection,
        codec: CodecSpec,
        sink: Sink,
        (payload_type, ssrc, initial): (u8, u32, u16),
        retransmit: RetransmitBuffer,
        audio_level_ext: Option<u8>,
    ) -> Self {
        let kind = codec.kind();
        RtpEndpoint {
            direction,
            kind,
            codec,
            sink,
            payload_type,
            ssrc,
            track: None,
            rewriter: StreamRewriter::new(kind.clock_rate(), initial),
            current: None,
            target: None,
            retransmit,
            highest_in: None,
            simple_pt: None,
            kernel_forwarded: false,
            audio_level_ext,
            accepts: None,
            format: None,
            svc: Scalable::default(),
        }
    }

    /// The remote socket, for a plain endpoint.
    pub(super) fn remote(&self) -> Option<SocketAddr> {
        match self.sink {
            Sink::Remote(r) => Some(r),
            Sink::Local(_) => None,
        }
    }

    /// Sends one packet to this subscriber: a header of its own in front
    /// of the shared payload (to a socket), or the header's fields with the
    /// payload (to a local subscriber).
    fn deliver(
        &self,
        (marker, sequence, timestamp): (bool, u16, u32),
        payload: PacketBuf,
        counters: &mut Counters,
        out: &mut Outbox,
    ) {
        let header = LocalHeader {
            marker,
            payload_type: self.payload_type,
            sequence,
            timestamp,
            ssrc: self.ssrc,
        };
        match self.sink {
            Sink::Remote(remote) => {
                let mut buf = out.header();
                header.write(&mut buf);
                out.send_shared(counters, remote, buf, payload);
            }
            Sink::Local(peer) => out.deliver_local(
                counters,
                LocalMedia {
                    peer,
                    header,
                    payload,
                },
            ),
        }
    }

    /// Asks this publisher for a keyframe: a PLI to a remote, an output
    /// for a local one.
    pub(super) fn request_keyframe(
        &self,
        counters: &mut Counters,
        out: &mut Outbox,
        rtcp_ssrc: u32,
    ) {
        match self.sink {
            Sink::Remote(remote) => {
                let mut buf = out.buffer();
                rtcp::write_pli(&mut buf, rtcp_ssrc, self.ssrc);
                out.send(counters, remote, buf);
            }
            Sink::Local(peer) => out
                .outputs
                .push_back(Output::Local(LocalOutput::KeyframeRequest { peer })),
        }
    }

    /// Notes a plain publisher's packet: its payload type for the kernel
    /// fast path, and loss, NACKed back to the publisher (video, gaps up to
    /// [`MAX_NACK_GAP`]) unless a kernel fast path forwards the stream.
    pub(in crate::sfu) fn on_publisher_packet(
        &mut self,
        header: &RtpHeader,
        counters: &mut Counters,
        out: &mut Outbox,
        rtcp_ssrc: u32,
    ) {
        self.simple_pt =
            (header.csrc_count == 0 && !header.has_extension && header.padding_len == 0)
                .then_some(header.payload_type);
        // While the kernel forwards this stream only samples arrive here:
        // their gaps are not loss.
        let Some(h) = self.highest_in else {
            self.highest_in = Some(header.sequence);
            return;
        };
        let gap = header.sequence.wrapping_sub(h);
        if gap == 0 || gap >= 0x8000 {
            return;
        }
        self.highest_in = Some(header.sequence);
        if self.kernel_forwarded || gap == 1 {
            return;
        }
        let missing = gap - 1;
        counters.packets_lost += u64::from(missing);
        out.counters.packets_lost += u64::from(missing);
        // An in-process publisher has nobody to resend.
        let Sink::Remote(remote) = self.sink else {
            return;
        };
        if missing <= MAX_NACK_GAP && self.kind == TrackKind::Video {
            let mut lost = [0u16; MAX_NACK_GAP as usize];
            for (i, slot) in lost.iter_mut().enumerate().take(usize::from(missing)) {
                *slot = h.wrapping_add(1 + i as u16);
            }
            let mut buf = out.buffer();
            rtcp::write_nack(
                &mut buf,
                rtcp_ssrc,
                self.ssrc,
                &lost[..usize::from(missing)],
            );
            counters.nacks_sent += u64::from(missing);
            out.counters.nacks_sent += u64::from(missing);
            out.send(counters, remote, buf);
        }
    }

    /// Answers a subscriber's NACK from the retransmission buffer.
    pub(in crate::sfu) fn answer_nack(
        &mut self,
        now: Instant,
        lost: impl Iterator<Item = u16>,
        counters: &mut Counters,
        out: &mut Outbox,
    ) {
        for seq in lost {
            counters.nacks_received += 1;
            out.counters.nacks_received += 1;
            match self.retransmit.get(now, seq) {
                Some(sent) => {
                    counters.retransmits += 1;
                    out.counters.retransmits += 1;
                    let fields = (sent.marker, sent.seq, sent.timestamp);
                    self.deliver(fields, sent.payload, counters, out);
                }
                None => {
                    counters.retransmit_misses += 1;
                    out.counters.retransmit_misses += 1;
                }
            }
        }
    }

    /// Sends a packet of `layer` to this subscriber if it watches that
    /// layer: a header of its own in front of the shared payload (stored
    /// once, on first use, when it did not arrive as a stored packet).
    /// Returns false when it waits for a keyframe of `layer`.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::sfu) fn send_media(
        &mut self,
        now: Instant,
        layer: usize,
        kind: TrackKind,
        pkt: &Forward<'_>,
        stored: &mut Option<PacketBuf>,
        counters: &mut Counters,
        out: &mut Outbox,
    ) -> bool {
        if !admit(&mut self.current, self.target, layer, pkt.keyframe, kind) {
            return self.target != Some(layer);
        }
        let marker = match self.svc.decide(pkt.ssrc, pkt.seq, pkt.svc.as_ref()) {
            Decision::Pass => pkt.marker,
            Decision::Forward { marker } => marker,
            Decision::Drop => {
                // Left out of this subscriber's stream, without a gap.
                self.rewriter.skip(pkt.ssrc, pkt.seq);
                return !self.svc.take_keyframe_request();
            }
        };
        let wants_keyframe = self.svc.take_keyframe_request();
        let Some(rewritten) = self.rewriter.rewrite(now, pkt.ssrc, pkt.seq, pkt.timestamp) else {
            // A copy of a packet left out of this stream: not forwarded.
            return !wants_keyframe;
        };
        let payload = stored
            .get_or_insert_with(|| out.packets.copy_in(pkt.payload))
            .clone();
        self.retransmit.insert(
            now,
            rewritten.seq as u16,
            rewritten.timestamp,
            marker,
            &payload,
        );
        let fields = (marker, rewritten.seq as u16, rewritten.timestamp);
        self.deliver(fields, payload, counters, out);
        !wants_keyframe
    }
}

impl Sfu {
    /// Adds a plain RTP endpoint (no ICE, no DTLS) for native clients.
    pub fn add_rtp_endpoint(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        spec: RtpEndpointSpec,
    ) -> Result<RtpEndpointInfo, SfuError> {
        let room = self.room_for_new_session(participant)?;
        check_spec(&spec)?;
        super::consent::check_remote(
            spec.remote,
            self.config.local_addr,
            &self.config.rtp_allow_networks,
            &self.config.rtp_trusted_networks,
        )?;
        if self.index.by_addr.contains_key(&spec.remote) {
            return Err(SpecError::RemoteIsWebRtc(spec.remote).into());
        }
        let taken = self.index.rtp_by_addr.get(&spec.remote).is_some_and(|ids| {
            ids.iter().any(|other| {
                matches!(self.peers.get(other).map(|p| &p.transport),
                    Some(Transport::Rtp(e)) if e.direction == spec.direction)
            })
        });
        if taken {
            return Err(SpecError::RemoteTaken {
                remote: spec.remote,
                direction: spec.direction,
            }
            .into());
        }
        if let Some(t) = spec.track {
            let track = self.reg.tracks.get(&t).ok_or(SfuError::NoSuchTrack(t))?;
            if track.room != room || track.kind != spec.kind {
                return Err(SpecError::WrongTrack {
                    track: t,
                    kind: spec.kind,
                }
                .into());
            }
            let track_codec = track.codec.and_then(CodecSpec::from_str0m);
            if spec.direction == RtpDirection::Subscribe
                && let (Some(codec), Some(track_codec)) = (spec.codec, track_codec)
                && codec != track_codec
            {
                return Err(SpecError::CodecMismatch {
                    track: t.to_string(),
                    track_codec,
                    codec,
                }
                .into());
            }
        }
        // Checked before anything is charged.
        let codec = spec.codec.unwrap_or(CodecSpec::for_kind(spec.kind));
        let format = match (&spec.fmtp, spec.direction) {
            (Some(f), RtpDirection::Publish) => Some(super::codecs::parse_fmtp(codec, f)?),
            _ => None,
        };
        let charged = self.charge_session(
            participant,
            Charge {
                sessions: 1,
                rtp_endpoints: 1,
                tracks: usize::from(spec.direction == RtpDirection::Publish),
            },
        )?;
        let ssrc = match spec.ssrc {
            Some(s) => s,
            None => self.random() as u32 | 1,
        };
        let id = self.new_peer_id();
        self.keep_charge(id, charged);
        let mut endpoint = self.new_endpoint(
            spec.direction,
            codec,
            Sink::Remote(spec.remote),
            (spec.payload_type, ssrc),
            spec.audio_level_ext,
        );
        if spec.direction == RtpDirection::Subscribe {
            endpoint.accepts = spec.codec;
        }
        endpoint.format = format;
        self.index
            .rtp_by_addr
            .entry(spec.remote)
            .or_default()
            .push(id);
        if spec.direction == RtpDirection::Subscribe && self.needs_consent(spec.remote) {
            // Nothing is sent until the remote proves it wants the stream
            // (consent.rs); the requested track is only checked for now.
            let peer = Peer::new(participant, &room, Transport::Rtp(Box::new(endpoint)), now);
            self.insert_peer(id, peer);
            let deadline = now + self.config.rtp_consent_timeout;
            self.consent.pending.insert(id, (deadline, spec.track));
            return Ok(RtpEndpointInfo {
                peer: id,
                local: self.config.local_addr,
                ssrc,
                track: spec.track,
            });
        }
        let track = self.attach_endpoint(now, participant, &room, id, endpoint, spec.track);
        Ok(RtpEndpointInfo {
            peer: id,
            local: self.config.local_addr,
            ssrc,
            track,
        })
    }

    /// An endpoint (plain or local) with a fresh rewriter and a
    /// retransmission buffer sized for its direction. For a subscriber, it
    /// provisions the fan-out pools first: a receive batch fanned out to it
    /// needs a header buffer and an output slot per packet, and the packet
    /// path must never grow a pool.
    pub(super) fn new_endpoint(
        &mut self,
        direction: RtpDirection,
        codec: CodecSpec,
        sink: Sink,
        (payload_type, ssrc): (u8, u32),
        audio_level_ext: Option<u8>,
    ) -> RtpEndpoint {
        let initial = (self.random() & 0x3fff) as u16;
        let held = if direction == RtpDirection::Subscribe {
            self.out.reserve_fanout(crate::buf::MAX_BATCH);
            self.config.retransmit_packets
        } else {
            16
        };
        let retransmit = RetransmitBuffer::new(held, self.config.retransmit_max_age);
        RtpEndpoint::new(
            direction,
            codec,
            sink,
            (payload_type, ssrc, initial),
            retransmit,
            audio_level_ext,
        )
    }

    /// Makes `endpoint` session `id` of `participant`: a publisher's track
    /// is published, a subscriber is bound to `wanted` (or the room's first
    /// track of its kind). Returns that track.
    pub(super) fn attach_endpoint(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        room: &str,
        id: PeerId,
        mut endpoint: RtpEndpoint,
        wanted: Option<TrackId>,
    ) -> Option<TrackId> {
        let mut info = None;
        if endpoint.direction == RtpDirection::Publish {
            let mut layer = Layer::new(None);
            // A plain publisher is known by its SSRC; a local one's comes
            // with its first packet.
            layer.ssrc = endpoint.remote().map(|_| endpoint.ssrc);
            let codec = Some(endpoint.codec.to_str0m());
            let mut track = Track::new(room, participant, id, endpoint.kind, codec, vec![layer]);
            track.format = endpoint.format;
            let (tid, track_info) = self.reg.add_track(track);
            info = Some(track_info);
            endpoint.track = Some(tid);
        }
        let peer = Peer::new(participant, room, Transport::Rtp(Box::new(endpoint)), now);
        self.insert_peer(id, peer);
        let track = if let Some(info) = info {
            let t = info.track;
            self.publish_track(now, room, info);
            Some(t)
        } else {
            self.bind_rtp_subscriber(now, id, wanted);
            match self.peers.get(&id).map(|p| &p.transport) {
                Some(Transport::Rtp(e)) => e.track,
                _ => None,
            }
        };
        self.out.event(SfuEvent::PeerConnected {
            room: room.to_owned(),
            participant,
            peer: id,
        });
        track
    }

    /// The plain-RTP streams a kernel fast path could forward exactly as the
    /// core would: tracks of a plain publisher (IPv4 or IPv6, the caller
    /// filters) whose every subscriber (1 ..= `max_destinations`) is a plain
    /// endpoint already receiving the publisher's stream with the payload
    /// type the publisher sends (a kernel rewrite keeps the PT), and whose
    /// last packet had no CSRC, header extension or padding (the core sends
    /// a bare 12-byte header; a kernel rewrite keeps the rest). A track with
    /// a WebRTC subscriber, a subscriber still waiting for its first
    /// keyframe, a subscriber that pins scalable layers, one with packets
    /// left out of its stream, or too many subscribers stays in userspace.
    ///
    /// The answer changes with subscriptions, layer/source switches and
    /// teardown, so a caller re-queries and diffs.
    pub fn plain_flows(&self, max_destinations: usize) -> Vec<PlainFlow> {
        let mut out = Vec::new();
        for (&tid, track) in &self.reg.tracks {
            let Some(Transport::Rtp(p)) = self.peers.get(&track.peer).map(|p| &p.transport) else {
                continue;
            };
            let Some(source) = p.remote() else {
                continue;
            };
            if p.direction != RtpDirection::Publish || track.layers.len() != 1 {
                continue;
            }
            let Some(pt) = p.simple_pt else { continue };
            let n = track.subscribers.len();
            if n == 0 || n > max_destinations {
                continue;
            }
            let mut destinations = Vec::with_capacity(n);
            for sub in &track.subscribers {
                let Some(Transport::Rtp(e)) = self.peers.get(sub).map(|p| &p.transport) else {
                    break;
                };
                let Some(remote) = e.remote() else {
                    break;
                };
                if e.direction != RtpDirection::Subscribe
                    || e.payload_type != pt
                    || e.current != Some(0)
                    || e.target.is_some_and(|t| t != 0)
                    // The kernel forwards every layer; a pin needs the core.
                    || e.svc.pinned().is_some()
                {
                    break;
                }
                let Some((seq_offset, ts_offset)) = e.rewriter.constant_offsets(p.ssrc) else {
                    break;
                };
                destinations.push(PlainFlowDestination {
                    peer: *sub,
                    remote,
                    ssrc: e.ssrc,
                    seq_offset,
                    ts_offset,
                });
            }
            if destinations.len() != n {
                continue;
            }
            out.push(PlainFlow {
                publisher: track.peer,
                track: tid,
                source,
                local: self.config.local_addr,
                ssrc: p.ssrc,
                destinations,
            });
        }
        out.sort_by_key(|f| f.track);
        out
    }

    /// Marks exactly `publishers` as forwarded by a kernel fast path (and
    /// every other plain publisher as not): their sequence gaps are then not
    /// counted as loss nor NACKed, since the core only sees samples.
    pub fn set_kernel_forwarded(&mut self, publishers: &[PeerId]) {
        for (id, peer) in self.peers.iter_mut() {
            if let Transport::Rtp(e) = &mut peer.transport
                && e.direction == RtpDirection::Publish
            {
                e.kernel_forwarded = publishers.contains(id);
            }
        }
    }

    pub(in crate::sfu) fn handle_plain(
        &mut self,
        now: Instant,
        source: SocketAddr,
        packet: &PacketBuf,
    ) {
        let data = packet.as_slice();
        match packet::classify(data) {
            PacketClass::Rtp => self.on_plain_rtp(now, source, packet),
            PacketClass::Rtcp => self.on_plain_rtcp(now, source, data),
            _ => self.out.drop_packet(DropReason::Malformed),
        }
    }

    pub(in crate::sfu) fn on_plain_rtp(
        &mut self,
        now: Instant,
        source: SocketAddr,
        packet: &PacketBuf,
    ) {
        let data = packet.as_slice();
        let header = match RtpHeader::parse(data) {
            Ok(h) => h,
            Err(_) => {
                self.out.drop_packet(DropReason::Malformed);
                return;
            }
        };
        let Some(ids) = self.index.rtp_by_addr.get(&source) else {
            return;
        };
        let found = ids.iter().copied().find(|id| {
            matches!(self.peers.get(id).map(|p| &p.transport),
                Some(Transport::Rtp(e)) if e.direction == RtpDirection::Publish && e.ssrc == header.ssrc)
        });
        let Some(id) = found else {
            self.out.drop_packet(DropReason::UnknownSsrc);
            return;
        };
        self.endpoint_rtp(now, id, &header, packet);
    }

    /// A packet of the RTP endpoint (plain or local) publisher `id`: its
    /// loss is noted, its audio level heard, and it is forwarded.
    pub(super) fn endpoint_rtp(
        &mut self,
        now: Instant,
        id: PeerId,
        header: &RtpHeader,
        packet: &PacketBuf,
    ) {
        let data = packet.as_slice();
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.counters.packets_in += 1;
        peer.counters.bytes_in += data.len() as u64;
        let Transport::Rtp(e) = &mut peer.transport else {
            return;
        };
        let Some(tid) = e.track else { return };
        e.on_publisher_packet(header, &mut peer.counters, &mut self.out, self.rtcp_ssrc);
        let audio_level = e
            .audio_level_ext
            .and_then(|id| packet::rtp::audio_level(data, header, id));
        super::registry::observe_level(
            &mut self.reg.rooms,
            &peer.room,
            peer.participant,
            audio_level,
        );
        let codec = e.codec;
        let Some(mut fwd) = Forward::from_stored(header, packet, codec) else {
            self.out.drop_packet(DropReason::MalformedPayload);
            return;
        };
        fwd.audio_level = audio_level;
        self.forward(now, tid, 0, &fwd);
    }

    pub(in crate::sfu) fn on_plain_rtcp(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        // The remote's endpoints are looked up per item rather than copied
        // out once: this path must not allocate.
        if !self.index.rtp_by_addr.contains_key(&source) {
            return;
        }
        let mut feedback = RtcpFeedback::new(data);
        for fb in &mut feedback {
            match fb {
                Feedback::Nack { media_ssrc, lost } => {
                    if let Some(id) = self.plain_subscriber(source, media_ssrc)
                        && let Some(peer) = self.peers.get_mut(&id)
                        && let Transport::Rtp(e) = &mut peer.transport
                    {
                        e.answer_nack(now, lost, &mut peer.counters, &mut self.out);
                    }
                }
                Feedback::Keyframe { media_ssrc, .. } => {
                    self.plain_keyframe_request(now, source, media_ssrc);
                }
                Feedback::Reports(reports) => {
                    for block in reports {
                        if let Some(id) = self.plain_subscriber(source, block.ssrc)
                            && let Some(peer) = self.peers.get_mut(&id)
                        {
                            peer.loss = Some(f32::from(block.fraction_lost) / 256.0);
                        }
                    }
                }
            }
        }
        feedback.finish(&mut self.out);
    }

    /// The plain subscriber at `remote` that sends with `ssrc`.
    pub(in crate::sfu) fn plain_subscriber(&self, remote: SocketAddr, ssrc: u32) -> Option<PeerId> {
        let ids = self.index.rtp_by_addr.get(&remote)?;
        ids.iter().copied().find(|id| {
            matches!(self.peers.get(id).map(|p| &p.transport),
                Some(Transport::Rtp(e)) if e.direction == RtpDirection::Subscribe && e.ssrc == ssrc)
        })
    }

    pub(in crate::sfu) fn plain_keyframe_request(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        ssrc: u32,
    ) {
        let Some(id) = self.plain_subscriber(remote, ssrc) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.counters.keyframe_requests_received += 1;
        self.out.counters.keyframe_requests_received += 1;
        if let Transport::Rtp(e) = &peer.transport
            && let (Some(t), Some(l)) = (e.track, e.current.or(e.target))
        {
            self.request_keyframe(now, t, l);
        }
    }
}
