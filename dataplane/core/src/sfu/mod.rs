//! The selective forwarding unit: rooms, participants, peers, tracks and the
//! routing of RTP between them. Sans-IO: every entry point takes `now`, and
//! all network output is queued for [`Sfu::poll_output`].
//!
//! [`Sfu`] is a thin coordinator over parts that own their state:
//!
//! * [`registry`]: rooms, participants and published tracks;
//! * [`peer`]: the session table and the indexes that route datagrams to
//!   sessions ([`webrtc`] holds WebRTC sessions, [`plain`] RTP endpoints
//!   with a socket, [`local`] those in the same process);
//! * [`layers`]: simulcast layer state and the pure selection rules;
//! * [`outbox`]: everything a packet being routed may emit;
//! * [`forward`]: fan-out of one publisher packet to its subscribers;
//! * [`subscribe`]: binding subscribers to tracks and choosing their layers;
//! * [`mesh`]: links to other nodes;
//! * [`quota`]: what each identity and token may hold;
//! * [`consent`]: where plain endpoints may send, and the sessions the
//!   core closes on its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use str0m::bwe::BweKind;
use str0m::media::Rid;
use str0m::{Event, IceConnectionState, Input};

use crate::buf::{BufPool, PacketBuf};
use crate::error::{SfuError, SpecError};
use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::packet::{self, PacketClass};
use crate::types::{
    Counters, DropReason, OfferIntent, Output, RoomState, RtpDirection, SfuConfig, SfuEvent,
};

mod codecs;
mod consent;
mod forward;
mod layers;
mod local;
mod mesh;
mod outbox;
mod peer;
mod plain;
mod quota;
mod registry;
mod scalable;
mod stats;
mod subscribe;
mod webrtc;

pub use codecs::MAX_ROOM_CODEC_POLICIES;
pub use consent::{Cidr, CidrError, ReapReason};
use outbox::Outbox;
use peer::{Peer, PeerIndex, Transport};
use plain::RtpEndpoint;
pub use quota::{Owner, QuotaConfig, QuotaLedger, QuotaLimit, QuotaLimits, SessionSlot};
use registry::Registry;
use webrtc::WebRtcPeer;

/// How often layer selection, speaker detection and demand updates run.
const TICK: Duration = Duration::from_millis(250);

/// The media relay core. See the crate docs for the run loop.
pub struct Sfu {
    config: SfuConfig,
    draining: bool,
    /// Rooms, participants and tracks.
    reg: Registry,
    /// Sessions.
    peers: HashMap<PeerId, Peer>,
    /// Which session a datagram belongs to.
    index: PeerIndex,
    out: Outbox,
    /// Session ids, SSRCs and initial sequence numbers: unpredictable, from
    /// a ChaCha generator seeded by [`SfuConfig::seed`].
    rng: StdRng,
    next_tick: Instant,
    rtcp_ssrc: u32,
    sessions_created: u64,
    sessions_closed: u64,
    /// One DTLS certificate for all peers: generating a key pair per
    /// session costs milliseconds of CPU, and browsers only pin the
    /// fingerprint from the SDP of each session.
    dtls_cert: Option<str0m::config::DtlsCert>,
    mesh: mesh::MeshState,
    /// Whom participants and sessions are charged to.
    quota: quota::QuotaState,
    /// Plain subscribers waiting for consent; sessions reaped.
    consent: consent::ConsentState,
    /// The rooms' and participants' codec lists.
    codec_policy: codecs::CodecPolicy,
}

impl std::fmt::Debug for Sfu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sfu")
            .field("rooms", &self.reg.rooms.len())
            .field("peers", &self.peers.len())
            .field("tracks", &self.reg.tracks.len())
            .finish()
    }
}

impl Sfu {
    /// A core with no rooms, configured by `config`; `now` starts its
    /// clock (timers, the mesh's send-time epoch).
    pub fn new(config: SfuConfig, now: Instant) -> Self {
        let mut rng = StdRng::from_seed(config.seed);
        let rtcp_ssrc = rng.next_u32();
        let (fec_group, red_depth) = (config.mesh_fec_group, config.mesh_red_depth);
        Sfu {
            out: Outbox::new(config.local_addr),
            reg: Registry::new(config.shard),
            config,
            draining: false,
            peers: HashMap::new(),
            index: PeerIndex::default(),
            rng,
            next_tick: now + TICK,
            rtcp_ssrc,
            sessions_created: 0,
            sessions_closed: 0,
            dtls_cert: None,
            mesh: mesh::MeshState::new(now, fec_group, red_depth),
            quota: quota::QuotaState::default(),
            consent: consent::ConsentState::default(),
            codec_policy: codecs::CodecPolicy::default(),
        }
    }

    /// An unpredictable 64-bit value.
    fn random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A new session id (random, so session URLs cannot be guessed).
    fn new_peer_id(&mut self) -> PeerId {
        PeerId(crate::ids::tagged(self.config.shard, self.random()))
    }

    /// Makes `peer` a live session of its participant.
    fn insert_peer(&mut self, id: PeerId, peer: Peer) {
        if let Some(p) = self.reg.participants.get_mut(&peer.participant) {
            p.peers.push(id);
        }
        self.peers.insert(id, peer);
        self.sessions_created += 1;
    }

    /// Adds a participant to a room (creating the room), charged to its
    /// identity alone (see [`Sfu::join_as`]).
    pub fn join(
        &mut self,
        room: &str,
        identity: &str,
        ephemeral: bool,
    ) -> Result<ParticipantId, SfuError> {
        self.join_as(room, &Owner::identity(identity), ephemeral)
    }

    /// Adds a participant to a room (creating the room); its sessions,
    /// rooms and tracks count against `owner`'s quotas (identity and token),
    /// and this join against its room quota. An ephemeral participant
    /// leaves when its last session closes (WHIP, WHEP, plain endpoints).
    pub fn join_as(
        &mut self,
        room: &str,
        owner: &Owner,
        ephemeral: bool,
    ) -> Result<ParticipantId, SfuError> {
        if self.draining {
            return Err(SfuError::Draining);
        }
        if let Some(codecs) = &owner.codecs {
            codecs::check_list(&self.config.codecs, codecs).map_err(SfuError::InvalidSpec)?;
        }
        if let Err(r) = self
            .config
            .ledger
            .try_enter_room(&self.config.quotas, owner, room)
        {
            return Err(self.refuse(r));
        }
        let identity = owner.identity.as_str();
        let id = self.reg.add_participant(room, identity, ephemeral);
        if let Some(codecs) = &owner.codecs {
            self.codec_policy.set_participant(id, codecs.clone());
        }
        self.quota.owners.insert(id, owner.clone());
        self.out.event(SfuEvent::ParticipantJoined {
            room: room.to_string(),
            participant: id,
            identity: identity.to_string(),
        });
        Ok(id)
    }

    /// Removes a participant and closes all its peers.
    pub fn leave(&mut self, now: Instant, participant: ParticipantId) -> Result<(), SfuError> {
        let peers = self
            .reg
            .participants
            .get(&participant)
            .ok_or(SfuError::NoSuchParticipant(participant))?
            .peers
            .clone();
        for p in peers {
            self.close_peer(now, p);
        }
        self.remove_participant(participant);
        Ok(())
    }

    fn remove_participant(&mut self, participant: ParticipantId) {
        self.codec_policy.forget(participant);
        let Some(p) = self.reg.remove_participant(participant) else {
            return;
        };
        self.release_participant(participant, &p.room);
        self.out.event(SfuEvent::ParticipantLeft {
            room: p.room,
            participant,
            identity: p.identity,
        });
    }

    /// The identity a participant joined with.
    pub fn participant_identity(&self, participant: ParticipantId) -> Option<&str> {
        self.reg
            .participants
            .get(&participant)
            .map(|p| p.identity.as_str())
    }

    /// The peer's owning participant and room.
    /// Bytes of per-session state a peer keeps in the core, beyond the
    /// packet buffers it shares: its table entries, transport state and
    /// (for plain RTP) the retransmission index. WebRTC peers also hold
    /// str0m's state, which is not counted here.
    pub fn peer_state_bytes(&self, peer: PeerId) -> Option<usize> {
        let p = self.peers.get(&peer)?;
        let table_entries = std::mem::size_of::<(PeerId, Peer)>()
            + std::mem::size_of::<(SocketAddr, Vec<PeerId>)>()
            + std::mem::size_of::<PeerId>() * 2;
        let transport = match &p.transport {
            Transport::WebRtc(_) => std::mem::size_of::<WebRtcPeer>(),
            Transport::Rtp(e) => std::mem::size_of::<RtpEndpoint>() + e.retransmit.state_bytes(),
            Transport::Mesh(_) => 0,
        };
        Some(table_entries + p.room.capacity() + transport)
    }

    /// The peer's owning participant and room.
    pub fn peer_owner(&self, peer: PeerId) -> Option<(ParticipantId, &str)> {
        self.peers
            .get(&peer)
            .map(|p| (p.participant, p.room.as_str()))
    }

    /// Who is in `room` and what it publishes (empty for an unknown room).
    pub fn room_state(&self, room: &str) -> RoomState {
        self.reg.room_state(room)
    }

    /// The room a new session of `participant` joins, if the node takes
    /// one more session.
    fn room_for_new_session(&mut self, participant: ParticipantId) -> Result<String, SfuError> {
        if self.draining {
            return Err(SfuError::Draining);
        }
        if self.peers.len() >= self.config.max_peers {
            return Err(self.refuse((QuotaLimit::NodeSessions, self.config.max_peers)));
        }
        self.reg
            .room_of(participant)
            .map(str::to_owned)
            .ok_or(SfuError::NoSuchParticipant(participant))
    }

    /// Ends one session.
    pub fn remove_peer(&mut self, now: Instant, peer: PeerId) -> Result<(), SfuError> {
        if !self.peers.contains_key(&peer) {
            return Err(SfuError::NoSuchPeer(peer));
        }
        self.close_peer(now, peer);
        self.process_events(now);
        Ok(())
    }

    /// Pins the simulcast layer a subscriber receives (`None`: automatic).
    pub fn set_layer(
        &mut self,
        now: Instant,
        peer: PeerId,
        rid: Option<&str>,
    ) -> Result<(), SfuError> {
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(SfuError::NoSuchPeer(peer))?;
        match &mut p.transport {
            Transport::WebRtc(w) if matches!(w.intent, OfferIntent::Subscribe { .. }) => {
                w.pinned_rid = rid.map(Rid::from);
            }
            _ => {
                return Err(SpecError::NotLayered.into());
            }
        }
        self.select_layers(now);
        Ok(())
    }

    /// Stops accepting sessions.
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    /// Whether [`Sfu::start_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Closes every session (end of drain).
    pub fn close_all(&mut self, now: Instant) {
        let ids: Vec<ParticipantId> = self.reg.participants.keys().copied().collect();
        for p in ids {
            let _ = self.leave(now, p);
        }
        self.process_events(now);
    }

    /// How many sessions are live (mesh placeholders included).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Every remote address a live session sends from (WebRTC peers once ICE
    /// has seen them, plain-RTP endpoints). A control-path query, e.g. to
    /// expire steering entries of sessions that are gone.
    pub fn remote_addrs(&self) -> Vec<SocketAddr> {
        self.index
            .by_addr
            .keys()
            .chain(self.index.rtp_by_addr.keys())
            .copied()
            .collect()
    }

    /// Feeds one received datagram.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        let packet = self.out.packets.copy_in(data);
        self.handle_packet(now, source, destination, packet);
    }

    /// The pool that received datagrams should be read into, so that
    /// [`Sfu::handle_packet`] can fan them out without copying.
    pub fn packet_pool(&mut self) -> &mut BufPool {
        &mut self.out.packets
    }

    /// Routes one received datagram, stored in a buffer from
    /// [`Sfu::packet_pool`] (or anywhere else): plain-RTP subscribers are
    /// sent views of it, never copies.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        packet: PacketBuf,
    ) {
        let data = packet.as_slice();
        self.out.counters.packets_in += 1;
        self.out.counters.bytes_in += data.len() as u64;
        if let Some(&peer) = self.index.by_addr.get(&source) {
            self.feed_rtc(now, peer, source, destination, data);
        } else if self.index.rtp_by_addr.contains_key(&source) {
            if !self.consent.pending.is_empty() {
                self.latch_plain(now, source, &packet);
            }
            self.handle_plain(now, source, &packet);
        } else if !self.mesh.is_empty() && self.mesh_receive(now, source, &packet) {
            // A mesh link's datagram (or one failing its authentication).
        } else {
            match packet::classify(data) {
                PacketClass::Stun => self.handle_new_stun(now, source, destination, data),
                PacketClass::Unknown => self.out.drop_packet(DropReason::Malformed),
                _ => self.out.drop_packet(DropReason::UnknownSource),
            }
        }
        self.process_events(now);
    }

    /// Advances time: str0m timers, layer selection, speaker detection.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (id, peer) in self.peers.iter_mut() {
            if let Transport::WebRtc(w) = &mut peer.transport
                && w.next_timeout <= now
                && (w.rtc.handle_input(Input::Timeout(now)).is_err()
                    || !w.drain(now, *id, &mut peer.counters, &mut self.out, &mut self.index)
                    || !w.rtc.is_alive())
            {
                w.closing = true;
            }
        }
        self.process_events(now);
        self.mesh_timeout(now);
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.tick(now);
            self.reap_expired(now);
        }
        let any_closing = self
            .peers
            .values()
            .any(|p| matches!(&p.transport, Transport::WebRtc(w) if w.closing));
        let closing: Vec<PeerId> = if any_closing {
            self.peers
                .iter()
                .filter_map(|(id, p)| match &p.transport {
                    Transport::WebRtc(w) if w.closing => Some(*id),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        for id in closing {
            self.close_peer(now, id);
        }
        self.process_events(now);
    }

    /// The next instant [`Sfu::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.next_tick;
        if let Some(m) = self.mesh.next_timeout() {
            t = t.min(m);
        }
        for p in self.peers.values() {
            if let Transport::WebRtc(w) = &p.transport {
                t = t.min(w.next_timeout);
            }
        }
        t
    }

    /// The next output (transmit, event, mesh control message), if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.outputs.pop_front()
    }

    /// Returns a transmitted buffer for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.out.recycle(buf);
    }

    fn process_events(&mut self, now: Instant) {
        while let Some((id, e)) = self.out.rtc_events.pop_front() {
            self.on_rtc_event(now, id, e);
        }
    }

    fn on_rtc_event(&mut self, now: Instant, id: PeerId, e: Event) {
        match e {
            Event::RtpPacket(p) => self.on_webrtc_rtp(now, id, p),
            Event::KeyframeRequest(r) => self.on_subscriber_keyframe_request(now, id, r.mid),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                // str0m's ICE-lite agent gives up on a pair after 15 s
                // without a binding request: consent is lost (or, before
                // the handshake completed, it never came).
                let connected = matches!(
                    self.peers.get(&id).map(|p| &p.transport),
                    Some(Transport::WebRtc(w)) if w.connected
                );
                let reason = if connected {
                    ReapReason::IceConsent
                } else {
                    ReapReason::Handshake
                };
                self.reap(now, id, reason);
            }
            Event::Connected => {
                if let Some(peer) = self.peers.get_mut(&id) {
                    if let Transport::WebRtc(w) = &mut peer.transport {
                        w.connected = true;
                        w.heard_packets = peer.counters.packets_in;
                        w.heard_at = now;
                    }
                    let (room, participant) = (peer.room.clone(), peer.participant);
                    self.out.event(SfuEvent::PeerConnected {
                        room,
                        participant,
                        peer: id,
                    });
                }
                self.select_layers(now);
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                if let Some(Transport::WebRtc(w)) =
                    self.peers.get_mut(&id).map(|p| &mut p.transport)
                {
                    w.bwe_bps = Some(estimate.as_u64());
                }
            }
            Event::PeerStats(s) => {
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.rtt = s.rtt.or(peer.rtt);
                    peer.loss = s
                        .egress_loss_fraction
                        .or(s.ingress_loss_fraction)
                        .or(peer.loss);
                }
            }
            Event::MediaIngressStats(s) => {
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.loss = s.loss.or(peer.loss);
                    peer.rtt = s.rtt.or(peer.rtt);
                }
            }
            _ => {}
        }
    }

    fn close_peer(&mut self, now: Instant, id: PeerId) {
        let Some(mut peer) = self.peers.remove(&id) else {
            return;
        };
        self.sessions_closed += 1;
        self.index.forget(id, &peer.transport);
        self.release_session(id);
        self.consent.pending.remove(&id);
        match &mut peer.transport {
            Transport::WebRtc(w) => {
                w.rtc.disconnect();
                // Flush whatever the disconnect queued (e.g. DTLS close).
                let mut scratch = Counters::default();
                w.drain(now, id, &mut scratch, &mut self.out, &mut self.index);
                for slot in &w.slots {
                    if let Some(t) = slot.track.and_then(|t| self.reg.tracks.get_mut(&t)) {
                        t.subscribers.retain(|s| *s != id);
                    }
                }
            }
            Transport::Rtp(e) => {
                if e.direction == RtpDirection::Subscribe
                    && let Some(t) = e.track.and_then(|t| self.reg.tracks.get_mut(&t))
                {
                    t.subscribers.retain(|s| *s != id);
                }
            }
            Transport::Mesh(_) => {}
        }
        // Unpublish the peer's tracks; their subscribers wait for new ones.
        let owned: Vec<TrackId> = self
            .reg
            .tracks
            .iter()
            .filter(|(_, t)| t.peer == id)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in &owned {
            self.unpublish_track(*tid);
        }
        if let Some(r) = self.reg.rooms.get_mut(&peer.room) {
            r.retired.add(&peer.counters);
        }
        self.out.event(SfuEvent::PeerClosed {
            room: peer.room.clone(),
            participant: peer.participant,
            peer: id,
        });
        let leave = match self.reg.participants.get_mut(&peer.participant) {
            Some(p) => {
                p.peers.retain(|x| *x != id);
                p.ephemeral && p.peers.is_empty()
            }
            None => false,
        };
        if leave {
            self.remove_participant(peer.participant);
        }
        // Subscribers that lost a track may bind to another one.
        if !owned.is_empty() {
            self.bind_waiting_subscribers(now, &peer.room);
        }
        self.select_layers(now);
    }
}

/// xorshift64: the unit tests' deterministic random inputs (the core's own
/// random numbers come from a CSPRNG, see [`Sfu::random`]).
#[cfg(test)]
pub(crate) fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}
