//! Plain RTP endpoints (no ICE, no DTLS) for native clients: one stream in
//! one direction, routed by the remote's address and SSRC.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::format::Codec;

use crate::buf::PacketBuf;
use crate::error::{SfuError, SpecError};
use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::packet::{self, PacketClass, rtcp, rtp::RtpHeader};
use crate::retransmit::RetransmitBuffer;
use crate::rewrite::StreamRewriter;
use crate::types::{
    Counters, DropReason, PlainFlow, PlainFlowDestination, RtpDirection, RtpEndpointInfo,
    RtpEndpointSpec, SfuEvent, TrackKind,
};

use super::Sfu;
use super::forward::Forward;
use super::layers::{Layer, admit};
use super::outbox::{Feedback, Outbox, RtcpFeedback};
use super::peer::{Peer, Transport};
use super::quota::Charge;
use super::registry::Track;

/// Largest gap in a plain publisher's sequence numbers that we NACK.
const MAX_NACK_GAP: u16 = 64;

/// A plain RTP endpoint: one stream in one direction with one remote.
pub(super) struct RtpEndpoint {
    pub(super) direction: RtpDirection,
    pub(super) kind: TrackKind,
    pub(super) remote: SocketAddr,
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
}

/// Checks what a plain endpoint request says on its own.
fn check_spec(spec: &RtpEndpointSpec) -> Result<(), SpecError> {
    if spec.payload_type > 127 || (64..96).contains(&spec.payload_type) {
        return Err(SpecError::PayloadType(spec.payload_type));
    }
    if let Some(id) = spec.audio_level_ext
        && (spec.direction != RtpDirection::Publish
            || spec.kind != TrackKind::Audio
            || !(1..=14).contains(&id))
    {
        return Err(SpecError::AudioLevelExt(id));
    }
    if spec.remote.port() == 0 || spec.remote.ip().is_unspecified() {
        return Err(SpecError::RemoteNotConcrete(spec.remote));
    }
    Ok(())
}

impl RtpEndpoint {
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
            out.send(counters, self.remote, buf);
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
                    let mut header = out.header();
                    packet::rtp::write_header(
                        &mut header,
                        sent.marker,
                        self.payload_type,
                        sent.seq,
                        sent.timestamp,
                        self.ssrc,
                    );
                    counters.retransmits += 1;
                    out.counters.retransmits += 1;
                    out.send_shared(counters, self.remote, header, sent.payload);
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
        let rewritten = self.rewriter.rewrite(now, pkt.ssrc, pkt.seq, pkt.timestamp);
        let payload = stored
            .get_or_insert_with(|| out.packets.copy_in(pkt.payload))
            .clone();
        let mut header = out.header();
        packet::rtp::write_header(
            &mut header,
            pkt.marker,
            self.payload_type,
            rewritten.seq as u16,
            rewritten.timestamp,
            self.ssrc,
        );
        self.retransmit.insert(
            now,
            rewritten.seq as u16,
            rewritten.timestamp,
            pkt.marker,
            &payload,
        );
        out.send_shared(counters, self.remote, header, payload);
        true
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
        }
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
        let initial = (self.random() & 0x3fff) as u16;
        if spec.direction == RtpDirection::Subscribe {
            // A receive batch fanned out to this subscriber needs a header
            // buffer and an output slot per packet: provision them now, on
            // the control path, so the packet path never grows a pool.
            self.out.reserve_fanout(crate::buf::MAX_BATCH);
        }
        let mut endpoint = RtpEndpoint {
            direction: spec.direction,
            kind: spec.kind,
            remote: spec.remote,
            payload_type: spec.payload_type,
            ssrc,
            track: None,
            rewriter: StreamRewriter::new(spec.kind.clock_rate(), initial),
            current: None,
            target: None,
            retransmit: RetransmitBuffer::new(
                if spec.direction == RtpDirection::Subscribe {
                    self.config.retransmit_packets
                } else {
                    16
                },
                self.config.retransmit_max_age,
            ),
            highest_in: None,
            simple_pt: None,
            kernel_forwarded: false,
            audio_level_ext: spec.audio_level_ext,
        };
        let mut info = None;
        if spec.direction == RtpDirection::Publish {
            let mut layer = Layer::new(None);
            layer.ssrc = Some(ssrc);
            let codec = match spec.kind {
                TrackKind::Audio => Codec::Opus,
                TrackKind::Video => Codec::Vp8,
            };
            let track = Track::new(&room, participant, id, spec.kind, Some(codec), vec![layer]);
            let (tid, track_info) = self.reg.add_track(track);
            info = Some(track_info);
            endpoint.track = Some(tid);
        }
        let peer = Peer::new(participant, &room, Transport::Rtp(Box::new(endpoint)), now);
        self.insert_peer(id, peer);
        self.index
            .rtp_by_addr
            .entry(spec.remote)
            .or_default()
            .push(id);
        let track = if let Some(info) = info {
            let t = info.track;
            self.publish_track(now, &room, info);
            Some(t)
        } else if self.needs_consent(spec.remote) {
            // Nothing is sent until the remote proves it wants the stream
            // (consent.rs); the requested track is only checked for now.
            let deadline = now + self.config.rtp_consent_timeout;
            self.consent.pending.insert(id, (deadline, spec.track));
            return Ok(RtpEndpointInfo {
                peer: id,
                local: self.config.local_addr,
                ssrc,
                track: spec.track,
            });
        } else {
            self.bind_rtp_subscriber(now, id, spec.track);
            match self.peers.get(&id).map(|p| &p.transport) {
                Some(Transport::Rtp(e)) => e.track,
                _ => None,
            }
        };
        self.out.event(SfuEvent::PeerConnected {
            room,
            participant,
            peer: id,
        });
        Ok(RtpEndpointInfo {
            peer: id,
            local: self.config.local_addr,
            ssrc,
            track,
        })
    }

    /// The plain-RTP streams a kernel fast path could forward exactly as the
    /// core would: tracks of a plain publisher (IPv4 or IPv6, the caller
    /// filters) whose every subscriber (1 ..= `max_destinations`) is a plain
    /// endpoint already receiving the publisher's stream with the payload
    /// type the publisher sends (a kernel rewrite keeps the PT), and whose
    /// last packet had no CSRC, header extension or padding (the core sends
    /// a bare 12-byte header; a kernel rewrite keeps the rest). A track with
    /// a WebRTC subscriber, a subscriber still waiting for its first
    /// keyframe, or too many subscribers stays in userspace.
    ///
    /// The answer changes with subscriptions, layer/source switches and
    /// teardown, so a caller re-queries and diffs.
    pub fn plain_flows(&self, max_destinations: usize) -> Vec<PlainFlow> {
        let mut out = Vec::new();
        for (&tid, track) in &self.reg.tracks {
            let Some(Transport::Rtp(p)) = self.peers.get(&track.peer).map(|p| &p.transport) else {
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
                if e.direction != RtpDirection::Subscribe
                    || e.payload_type != pt
                    || e.current != Some(0)
                    || e.target.is_some_and(|t| t != 0)
                {
                    break;
                }
                let Some((seq_offset, ts_offset)) = e.rewriter.constant_offsets(p.ssrc) else {
                    break;
                };
                destinations.push(PlainFlowDestination {
                    peer: *sub,
                    remote: e.remote,
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
                source: p.remote,
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
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.counters.packets_in += 1;
        peer.counters.bytes_in += data.len() as u64;
        let Transport::Rtp(e) = &mut peer.transport else {
            return;
        };
        let Some(tid) = e.track else { return };
        e.on_publisher_packet(&header, &mut peer.counters, &mut self.out, self.rtcp_ssrc);
        let video = e.kind == TrackKind::Video;
        let audio_level = e
            .audio_level_ext
            .and_then(|id| packet::rtp::audio_level(data, &header, id));
        super::registry::observe_level(
            &mut self.reg.rooms,
            &peer.room,
            peer.participant,
            audio_level,
        );
        let mut fwd = Forward::from_stored(&header, packet, |p| {
            video && packet::codec::vp8_is_keyframe(p)
        });
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
