//! Local (in-process) endpoints: RTP endpoints with no socket. A local
//! publisher's packets are fed by the embedding program
//! ([`Sfu::handle_local_rtp`]); a local subscriber's media comes out as
//! [`Output::Local`](crate::Output::Local) with the received payload shared,
//! never copied. Everything else (tracks, subscriptions, layer choice,
//! keyframe requests, NACKs answered from the retransmission buffer) is
//! what a plain RTP endpoint gets.

use std::time::Instant;

use crate::buf::PacketBuf;
use crate::error::{SfuError, SpecError};
use crate::ids::{ParticipantId, PeerId};
use crate::packet::rtp::RtpHeader;
use crate::types::{DropReason, LocalEndpointInfo, LocalEndpointSpec, RtpDirection};

use super::Sfu;
use super::peer::Transport;
use super::plain::{RtpEndpoint, Sink, check_payload_type};

impl Sfu {
    /// Adds a local (in-process) endpoint to `participant`'s room: a
    /// publisher of `spec.codec`, or a subscriber of a track of that
    /// codec's kind.
    pub fn add_local_endpoint(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        spec: LocalEndpointSpec,
    ) -> Result<LocalEndpointInfo, SfuError> {
        let room = self.room_for_new_session(participant)?;
        let kind = spec.codec.kind();
        if spec.direction == RtpDirection::Subscribe {
            check_payload_type(spec.payload_type)?;
        }
        if let Some(t) = spec.track {
            let track = self.reg.tracks.get(&t).ok_or(SfuError::NoSuchTrack(t))?;
            if track.room != room || track.kind != kind {
                return Err(SpecError::WrongTrack { track: t, kind }.into());
            }
        }
        let ssrc = match (spec.direction, spec.ssrc) {
            (RtpDirection::Publish, _) => 0,
            (RtpDirection::Subscribe, Some(s)) => s,
            (RtpDirection::Subscribe, None) => self.random() as u32 | 1,
        };
        let id = self.new_peer_id();
        let endpoint = self.new_endpoint(
            spec.direction,
            spec.codec,
            Sink::Local(id),
            (spec.payload_type, ssrc),
            None,
        );
        let track = self.attach_endpoint(now, participant, &room, id, endpoint, spec.track);
        self.process_events(now);
        Ok(LocalEndpointInfo {
            peer: id,
            ssrc,
            track,
        })
    }

    /// Routes one RTP packet of the local publisher `peer`, stored in a
    /// buffer from [`Sfu::packet_pool`] (or anywhere else): as for a
    /// received datagram, subscribers are sent views of it, never copies.
    /// A malformed packet is dropped and counted.
    pub fn handle_local_rtp(
        &mut self,
        now: Instant,
        peer: PeerId,
        packet: PacketBuf,
    ) -> Result<(), SfuError> {
        self.local_endpoint(peer, RtpDirection::Publish)?;
        self.out.counters.packets_in += 1;
        self.out.counters.bytes_in += packet.len() as u64;
        match RtpHeader::parse(packet.as_slice()) {
            Ok(header) => self.endpoint_rtp(now, peer, &header, &packet),
            Err(_) => self.out.drop_packet(DropReason::Malformed),
        }
        self.process_events(now);
        Ok(())
    }

    /// The local subscriber `peer` asks for a keyframe of the layer it
    /// receives (or is switching to); the publisher is asked, throttled as
    /// for any subscriber's request.
    pub fn request_local_keyframe(&mut self, now: Instant, peer: PeerId) -> Result<(), SfuError> {
        let e = self.local_endpoint(peer, RtpDirection::Subscribe)?;
        let wanted = e.track.zip(e.current.or(e.target));
        if let Some(p) = self.peers.get_mut(&peer) {
            p.counters.keyframe_requests_received += 1;
        }
        self.out.counters.keyframe_requests_received += 1;
        if let Some((t, l)) = wanted {
            self.request_keyframe(now, t, l);
        }
        self.process_events(now);
        Ok(())
    }

    /// The local subscriber `peer` lost the packets `lost` (its sequence
    /// numbers): those still held are delivered again.
    pub fn handle_local_nack(
        &mut self,
        now: Instant,
        peer: PeerId,
        lost: &[u16],
    ) -> Result<(), SfuError> {
        self.local_endpoint(peer, RtpDirection::Subscribe)?;
        if let Some(p) = self.peers.get_mut(&peer)
            && let Transport::Rtp(e) = &mut p.transport
        {
            e.answer_nack(now, lost.iter().copied(), &mut p.counters, &mut self.out);
        }
        Ok(())
    }

    /// The local endpoint `peer` of `direction`.
    fn local_endpoint(
        &self,
        peer: PeerId,
        direction: RtpDirection,
    ) -> Result<&RtpEndpoint, SfuError> {
        let p = self.peers.get(&peer).ok_or(SfuError::NoSuchPeer(peer))?;
        match &p.transport {
            Transport::Rtp(e) if e.sink == Sink::Local(peer) && e.direction == direction => Ok(e),
            _ => Err(SpecError::NotLocal { peer, direction }.into()),
        }
    }
}
