//! The selective forwarding unit: rooms, participants, peers, tracks and the
//! routing of RTP between them. Sans-IO: every entry point takes `now`, and
//! all network output is queued for [`Sfu::poll_output`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Rid, Rids};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Rtc, RtcConfig};

use crate::buf::{BufPool, PacketBuf};
use crate::error::SfuError;
use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::meter::BitrateMeter;
use crate::packet::{self, PacketClass, rtcp, rtp::RtpHeader, stun::StunMessage};
use crate::retransmit::RetransmitBuffer;
use crate::rewrite::StreamRewriter;
use crate::speaker::SpeakerDetector;
use crate::types::*;

mod links;

/// How often layer selection, speaker detection and demand updates run.
const TICK: Duration = Duration::from_millis(250);
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
/// A layer with no packet for this long is considered stopped.
const LAYER_ACTIVE_WINDOW: Duration = Duration::from_millis(1500);
/// A demanded layer that does not start within this time is skipped for a while.
const LAYER_START_GRACE: Duration = Duration::from_secs(3);
const LAYER_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Recycled transmit buffers kept for reuse.
const POOL_MAX: usize = 8192;
/// Capacity of a header buffer: an RTP header with room to spare.
const HEADER_CAPACITY: usize = 32;
/// Header buffers kept for reuse: enough for a fan-out burst of a receive
/// batch to thousands of subscribers (32 bytes each).
const HEADER_POOL_MAX: usize = 1 << 16;
/// Largest gap in a plain publisher's sequence numbers that we NACK.
const MAX_NACK_GAP: u16 = 64;

struct Room {
    participants: Vec<ParticipantId>,
    /// Published tracks in publication order.
    tracks: Vec<TrackId>,
    speaker: SpeakerDetector,
    /// Counters of peers that have left the room.
    retired: Counters,
}

struct Participant {
    room: String,
    identity: String,
    peers: Vec<PeerId>,
    /// Leaves the room when its last peer closes (WHIP/WHEP/RTP sessions).
    ephemeral: bool,
}

struct Peer {
    participant: ParticipantId,
    room: String,
    transport: Transport,
    counters: Counters,
    created: Instant,
    loss: Option<f32>,
    rtt: Option<Duration>,
}

enum Transport {
    WebRtc(Box<WebRtcPeer>),
    Rtp(Box<RtpEndpoint>),
    /// A placeholder for a participant on another node whose tracks reach
    /// this one over a mesh link.
    Mesh(links::MeshPeer),
}

struct WebRtcPeer {
    rtc: Rtc,
    intent: OfferIntent,
    ufrag: String,
    addrs: Vec<SocketAddr>,
    next_timeout: Instant,
    connected: bool,
    /// Media this peer sends us: mid -> track.
    published: Vec<(Mid, TrackId)>,
    /// Media we send this peer.
    slots: Vec<Slot>,
    bwe_bps: Option<u64>,
    pinned_rid: Option<Rid>,
    closing: bool,
}

/// One outgoing m-line of a subscriber and the track bound to it.
struct Slot {
    mid: Mid,
    kind: TrackKind,
    track: Option<TrackId>,
    /// Payload type negotiated with the subscriber for the track's codec.
    pt: Option<(Codec, str0m::format::PayloadParams)>,
    rewriter: StreamRewriter,
    current: Option<usize>,
    target: Option<usize>,
}

struct RtpEndpoint {
    direction: RtpDirection,
    kind: TrackKind,
    remote: SocketAddr,
    payload_type: u8,
    ssrc: u32,
    track: Option<TrackId>,
    rewriter: StreamRewriter,
    current: Option<usize>,
    target: Option<usize>,
    retransmit: RetransmitBuffer,
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

struct Layer {
    rid: Option<Rid>,
    ssrc: Option<u32>,
    meter: BitrateMeter,
    /// Last measured non-zero bitrate, used to rank layers even while paused.
    bps: u64,
    last_packet: Option<Instant>,
    last_keyframe_request: Option<Instant>,
    /// Subscribers currently receiving or switching to this layer.
    watchers: u32,
    demanded_since: Option<Instant>,
    unavailable_until: Option<Instant>,
    /// A remote track's layer its upstream announced as unavailable (over
    /// the link's budget): not chosen, even while its packets still come.
    withheld: bool,
}

impl Layer {
    fn new(rid: Option<Rid>) -> Self {
        Layer {
            rid,
            ssrc: None,
            meter: BitrateMeter::default(),
            bps: 0,
            last_packet: None,
            last_keyframe_request: None,
            watchers: 0,
            demanded_since: None,
            unavailable_until: None,
            withheld: false,
        }
    }

    fn active(&self, now: Instant) -> bool {
        self.last_packet
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_ACTIVE_WINDOW)
    }

    /// Ordering key: bitrate first, then the conventional rid names.
    fn rank(&self) -> (u64, u8) {
        let name = match self.rid.as_deref() {
            Some("q") | Some("l") | Some("low") => 1,
            Some("h") | Some("m") | Some("mid") => 2,
            Some("f") | Some("high") => 3,
            _ => 0,
        };
        (self.bps, name)
    }
}

struct Track {
    room: String,
    participant: ParticipantId,
    peer: PeerId,
    kind: TrackKind,
    mid: Option<Mid>,
    codec: Option<Codec>,
    layers: Vec<Layer>,
    subscribers: Vec<PeerId>,
    demanded: Vec<String>,
    /// Streams of this track to downstream mesh links.
    mesh_out: Vec<links::MeshOut>,
    /// Where a remote track comes from (`None`: published on this node).
    origin: Option<crate::mesh::OriginKey>,
    /// When an upstream last announced a remote track.
    announced: Option<Instant>,
}

impl Track {
    fn info(&self, id: TrackId) -> TrackInfo {
        TrackInfo {
            track: id,
            participant: self.participant,
            peer: self.peer,
            kind: self.kind,
            rids: self
                .layers
                .iter()
                .filter_map(|l| l.rid.as_ref().map(|r| r.to_string()))
                .collect(),
        }
    }
}

/// Everything a packet being routed may write to, kept apart from the
/// peer and track tables so both can be borrowed at once.
struct Io {
    outputs: VecDeque<Output>,
    rtc_events: VecDeque<(PeerId, Event)>,
    by_addr: HashMap<SocketAddr, PeerId>,
    pool: Vec<Vec<u8>>,
    /// Small buffers for per-subscriber headers in front of shared payloads.
    headers: Vec<Vec<u8>>,
    /// Received packets, stored once and shared by every transmit of them.
    packets: BufPool,
    counters: Counters,
    drops: [u64; DropReason::ALL.len()],
    local_addr: SocketAddr,
}

impl Io {
    /// Makes room for `packets` more header-plus-payload transmits in
    /// flight at once: header buffers in the pool and output queue slots.
    fn reserve_fanout(&mut self, packets: usize) {
        let add = packets.min(HEADER_POOL_MAX.saturating_sub(self.headers.len()));
        self.headers
            .extend((0..add).map(|_| Vec::with_capacity(HEADER_CAPACITY)));
        // Capacity grows by `packets` for every subscriber added (exactly:
        // `reserve` would double it every time).
        let want = self.outputs.capacity() + packets;
        self.outputs.reserve_exact(want - self.outputs.len());
    }

    /// A buffer for a header of up to [`HEADER_CAPACITY`] bytes.
    fn header(&mut self) -> Vec<u8> {
        let mut b = self
            .headers
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(HEADER_CAPACITY));
        b.clear();
        b
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(1500));
        b.clear();
        b
    }

    fn send(&mut self, counters: &mut Counters, destination: SocketAddr, contents: Vec<u8>) {
        counters.packets_out += 1;
        counters.bytes_out += contents.len() as u64;
        self.counters.packets_out += 1;
        self.counters.bytes_out += contents.len() as u64;
        self.outputs.push_back(Output::Transmit(Transmit {
            source: self.local_addr,
            destination,
            contents,
            payload: None,
            trailer: Trailer::default(),
        }));
    }

    /// Sends `header` followed by a shared payload, without copying it.
    fn send_shared(
        &mut self,
        counters: &mut Counters,
        destination: SocketAddr,
        header: Vec<u8>,
        payload: PacketBuf,
    ) {
        self.send_parts(counters, destination, header, payload, Trailer::default());
    }

    /// Sends `header`, a shared payload (not copied) and `trailer`.
    fn send_parts(
        &mut self,
        counters: &mut Counters,
        destination: SocketAddr,
        header: Vec<u8>,
        payload: PacketBuf,
        trailer: Trailer,
    ) {
        let len = (header.len() + payload.len() + trailer.as_slice().len()) as u64;
        counters.packets_out += 1;
        counters.bytes_out += len;
        self.counters.packets_out += 1;
        self.counters.bytes_out += len;
        self.outputs.push_back(Output::Transmit(Transmit {
            source: self.local_addr,
            destination,
            contents: header,
            payload: Some(payload),
            trailer,
        }));
    }

    fn drop_packet(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    fn event(&mut self, e: SfuEvent) {
        self.outputs.push_back(Output::Event(e));
    }

    /// Drains one `Rtc` until it asks for a timeout (str0m's single-mutation
    /// invariant). Returns false if the peer failed and must be closed.
    ///
    /// A timeout due within [`IMMEDIATE_TIMEOUT`] of `now` is handled here
    /// and draining goes on, up to [`IMMEDIATE_ROUNDS`] times: str0m's pacer
    /// releases one packet per timeout and asks for the next a microsecond
    /// later, and the shard's timer (1 ms resolution) would otherwise send
    /// at most one paced packet per millisecond per session.
    fn drain(
        &mut self,
        now: Instant,
        id: PeerId,
        w: &mut WebRtcPeer,
        counters: &mut Counters,
    ) -> bool {
        let mut rounds = 0;
        loop {
            match w.rtc.poll_output() {
                Ok(str0m::Output::Timeout(t)) => {
                    if rounds < IMMEDIATE_ROUNDS && t <= now + IMMEDIATE_TIMEOUT {
                        rounds += 1;
                        if let Err(e) = w.rtc.handle_input(Input::Timeout(t.max(now))) {
                            tracing::warn!(peer = %id, error = %e, "WebRTC session failed");
                            return false;
                        }
                        continue;
                    }
                    w.next_timeout = t;
                    return true;
                }
                Ok(str0m::Output::Transmit(t)) => {
                    // str0m only answers addresses that passed ICE, so this is
                    // where a remote address becomes routable to the peer.
                    if !w.addrs.contains(&t.destination) && w.addrs.len() < 8 {
                        w.addrs.push(t.destination);
                        self.by_addr.insert(t.destination, id);
                    }
                    let contents: Vec<u8> = t.contents.into();
                    counters.packets_out += 1;
                    counters.bytes_out += contents.len() as u64;
                    self.counters.packets_out += 1;
                    self.counters.bytes_out += contents.len() as u64;
                    self.outputs.push_back(Output::Transmit(Transmit {
                        source: t.source,
                        destination: t.destination,
                        contents,
                        payload: None,
                        trailer: Trailer::default(),
                    }));
                }
                Ok(str0m::Output::Event(e)) => self.rtc_events.push_back((id, e)),
                Err(e) => {
                    tracing::warn!(peer = %id, error = %e, "WebRTC session failed");
                    return false;
                }
            }
        }
    }
}

/// A packet being routed from a publisher to its subscribers.
struct Forward<'a> {
    ssrc: u32,
    seq: u16,
    timestamp: u32,
    marker: bool,
    keyframe: bool,
    payload: &'a [u8],
    shared: Option<&'a Arc<[u8]>>,
    /// The payload as a stored packet view, when it came in as one.
    stored: Option<PacketBuf>,
    audio_level: Option<(bool, u8)>,
}

impl<'a> Forward<'a> {
    /// A received RTP packet, its payload forwarded as a view of the stored
    /// datagram (never copied).
    fn from_stored(
        header: &RtpHeader,
        packet: &'a PacketBuf,
        is_keyframe: impl FnOnce(&[u8]) -> bool,
    ) -> Self {
        let data = packet.as_slice();
        let payload = header.payload(data);
        let start = payload.as_ptr() as usize - data.as_ptr() as usize;
        Forward {
            ssrc: header.ssrc,
            seq: header.sequence,
            timestamp: header.timestamp,
            marker: header.marker,
            keyframe: is_keyframe(payload),
            payload,
            shared: None,
            stored: Some(packet.slice(start..start + payload.len())),
            audio_level: None,
        }
    }
}

/// The media relay core. See the crate docs for the run loop.
pub struct Sfu {
    config: SfuConfig,
    draining: bool,
    rooms: HashMap<String, Room>,
    participants: HashMap<ParticipantId, Participant>,
    peers: HashMap<PeerId, Peer>,
    tracks: HashMap<TrackId, Track>,
    by_ufrag: HashMap<String, PeerId>,
    /// Plain RTP endpoints by remote address (a remote may publish and
    /// subscribe on one port).
    rtp_by_addr: HashMap<SocketAddr, Vec<PeerId>>,
    io: Io,
    rng: u64,
    next_seq_id: u64,
    next_tick: Instant,
    rtcp_ssrc: u32,
    sessions_created: u64,
    sessions_closed: u64,
    /// One DTLS certificate for all peers: generating a key pair per
    /// session costs milliseconds of CPU, and browsers only pin the
    /// fingerprint from the SDP of each session.
    dtls_cert: Option<str0m::config::DtlsCert>,
    mesh: links::MeshState,
}

impl std::fmt::Debug for Sfu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sfu")
            .field("rooms", &self.rooms.len())
            .field("peers", &self.peers.len())
            .field("tracks", &self.tracks.len())
            .finish()
    }
}

impl Sfu {
    pub fn new(config: SfuConfig, now: Instant) -> Self {
        let mut rng = config.seed | 1;
        let rtcp_ssrc = xorshift(&mut rng) as u32;
        let (fec_group, red_depth) = (config.mesh_fec_group, config.mesh_red_depth);
        Sfu {
            io: Io {
                outputs: VecDeque::with_capacity(1024),
                rtc_events: VecDeque::with_capacity(256),
                by_addr: HashMap::new(),
                pool: Vec::new(),
                headers: Vec::new(),
                packets: BufPool::new(1024),
                counters: Counters::default(),
                drops: [0; DropReason::ALL.len()],
                local_addr: config.local_addr,
            },
            config,
            draining: false,
            rooms: HashMap::new(),
            participants: HashMap::new(),
            peers: HashMap::new(),
            tracks: HashMap::new(),
            by_ufrag: HashMap::new(),
            rtp_by_addr: HashMap::new(),
            rng,
            next_seq_id: 1,
            next_tick: now + TICK,
            rtcp_ssrc,
            sessions_created: 0,
            sessions_closed: 0,
            dtls_cert: None,
            mesh: links::MeshState::new(now, fec_group, red_depth),
        }
    }

    fn random(&mut self) -> u64 {
        xorshift(&mut self.rng)
    }

    // ----- control operations ------------------------------------------------

    /// Adds a participant to a room (creating the room).
    pub fn join(
        &mut self,
        room: &str,
        identity: &str,
        ephemeral: bool,
    ) -> Result<ParticipantId, SfuError> {
        if self.draining {
            return Err(SfuError::Draining);
        }
        let id = ParticipantId(crate::ids::tagged(self.config.shard, self.next_seq_id));
        self.next_seq_id += 1;
        let r = self.rooms.entry(room.to_string()).or_insert_with(|| Room {
            participants: Vec::new(),
            tracks: Vec::new(),
            speaker: SpeakerDetector::default(),
            retired: Counters::default(),
        });
        r.participants.push(id);
        self.participants.insert(
            id,
            Participant {
                room: room.to_string(),
                identity: identity.to_string(),
                peers: Vec::new(),
                ephemeral,
            },
        );
        self.io.event(SfuEvent::ParticipantJoined {
            room: room.to_string(),
            participant: id,
            identity: identity.to_string(),
        });
        Ok(id)
    }

    /// Removes a participant and closes all its peers.
    pub fn leave(&mut self, now: Instant, participant: ParticipantId) -> Result<(), SfuError> {
        let peers = self
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
        let Some(p) = self.participants.remove(&participant) else {
            return;
        };
        if let Some(room) = self.rooms.get_mut(&p.room) {
            room.participants.retain(|x| *x != participant);
            room.speaker.forget(participant);
            if room.participants.is_empty() {
                self.rooms.remove(&p.room);
            }
        }
        self.io.event(SfuEvent::ParticipantLeft {
            room: p.room,
            participant,
            identity: p.identity,
        });
    }

    pub fn participant_identity(&self, participant: ParticipantId) -> Option<&str> {
        self.participants
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

    pub fn peer_owner(&self, peer: PeerId) -> Option<(ParticipantId, &str)> {
        self.peers
            .get(&peer)
            .map(|p| (p.participant, p.room.as_str()))
    }

    pub fn room_state(&self, room: &str) -> RoomState {
        let Some(r) = self.rooms.get(room) else {
            return RoomState::default();
        };
        RoomState {
            participants: r
                .participants
                .iter()
                .filter_map(|p| Some((*p, self.participants.get(p)?.identity.clone())))
                .collect(),
            tracks: r
                .tracks
                .iter()
                .filter_map(|t| Some(self.tracks.get(t)?.info(*t)))
                .collect(),
        }
    }

    fn check_capacity(&self) -> Result<(), SfuError> {
        if self.draining {
            return Err(SfuError::Draining);
        }
        if self.peers.len() >= self.config.max_peers {
            return Err(SfuError::Full(self.config.max_peers));
        }
        Ok(())
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
        self.check_capacity()?;
        let room = self
            .participants
            .get(&participant)
            .ok_or(SfuError::NoSuchParticipant(participant))?
            .room
            .clone();
        let offer = SdpOffer::from_sdp_string(offer)
            .map_err(|e| SfuError::BadSdp(sdp_error(&e.to_string())))?;
        let mut config = RtcConfig::new()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .set_stats_interval(Some(Duration::from_secs(1)));
        if self.dtls_cert.is_none() {
            self.dtls_cert = str0m::crypto::from_feature_flags()
                .dtls_provider
                .generate_certificate();
        }
        if let Some(cert) = &self.dtls_cert {
            config = config.set_dtls_cert(cert.clone());
        }
        if matches!(intent, OfferIntent::Subscribe { .. }) {
            config = config.enable_bwe(Some(Bitrate::from(self.config.initial_bwe_bps)));
        }
        // Our ufrag names our shard, so the kernel can steer a session's
        // first STUN request on a port shared by every shard.
        let mut creds = IceCreds::new();
        creds.ufrag = crate::ids::shard_ufrag(self.config.shard, &creds.ufrag);
        config = config.set_local_ice_credentials(creds);
        let mut rtc = config.build(now);
        for addr in &self.config.candidates {
            let c = Candidate::host(*addr, "udp")
                .map_err(|e| SfuError::Internal(format!("candidate {addr}: {e}")))?;
            rtc.add_local_candidate(c);
        }
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        // Collect the negotiated m-lines before the peer goes live, so a bad
        // offer leaves no trace.
        let mut published = Vec::new();
        let mut slots = Vec::new();
        let mut early_events = Vec::new();
        let mut transmits = Vec::new();
        // str0m announces m-lines (MediaAdded) only once DTLS is up, so read
        // the negotiated ones from the answer itself; a bad offer must leave
        // no trace.
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
                    published.push((mid, kind, rids));
                }
                OfferIntent::Subscribe { .. } if sends => {
                    let initial = (self.random() & 0x3fff) as u16;
                    slots.push(Slot {
                        mid,
                        kind,
                        track: None,
                        pt: None,
                        rewriter: StreamRewriter::new(kind.clock_rate(), initial),
                        current: None,
                        target: None,
                    });
                }
                OfferIntent::Subscribe { .. } => {
                    return Err(SfuError::BadSdp(format!(
                        "subscribe offers must be recvonly; m-line {mid} sends media"
                    )));
                }
                OfferIntent::Publish => {
                    return Err(SfuError::BadSdp(format!(
                        "publish offers must send media; m-line {mid} is recvonly"
                    )));
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
            return Err(SfuError::BadSdp(
                "the offer has no usable audio or video m-line (supported: Opus, VP8)".into(),
            ));
        }
        let id = PeerId(crate::ids::tagged(self.config.shard, self.random()));
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let mut w = WebRtcPeer {
            rtc,
            intent,
            ufrag: ufrag.clone(),
            addrs: Vec::new(),
            next_timeout,
            connected: false,
            published: Vec::new(),
            slots,
            bwe_bps: None,
            pinned_rid: None,
            closing: false,
        };
        let mut infos = Vec::new();
        for (mid, kind, rids) in published {
            let tid = TrackId(crate::ids::tagged(self.config.shard, self.next_seq_id));
            self.next_seq_id += 1;
            let layers = if rids.is_empty() {
                vec![Layer::new(None)]
            } else {
                rids.into_iter().map(|r| Layer::new(Some(r))).collect()
            };
            let track = Track {
                room: room.clone(),
                participant,
                peer: id,
                kind,
                mid: Some(mid),
                codec: None,
                layers,
                subscribers: Vec::new(),
                demanded: Vec::new(),
                mesh_out: Vec::new(),
                origin: None,
                announced: None,
            };
            infos.push(track.info(tid));
            self.tracks.insert(tid, track);
            w.published.push((mid, tid));
        }
        self.by_ufrag.insert(ufrag, id);
        for e in early_events {
            self.io.rtc_events.push_back((id, e));
        }
        // An ICE-lite answerer normally sends nothing before the first
        // binding request, but pass on whatever str0m queued.
        for t in transmits {
            self.io.outputs.push_back(Output::Transmit(Transmit {
                source: t.source,
                destination: t.destination,
                contents: t.contents.into(),
                payload: None,
                trailer: Trailer::default(),
            }));
        }
        self.peers.insert(
            id,
            Peer {
                participant,
                room: room.clone(),
                transport: Transport::WebRtc(Box::new(w)),
                counters: Counters::default(),
                created: now,
                loss: None,
                rtt: None,
            },
        );
        self.sessions_created += 1;
        if let Some(p) = self.participants.get_mut(&participant) {
            p.peers.push(id);
        }
        for info in infos {
            self.publish_track(now, &room, info);
        }
        self.bind_slots(now, id);
        Ok((id, answer.to_sdp_string()))
    }

    /// Adds a plain RTP endpoint (no ICE, no DTLS) for native clients.
    pub fn add_rtp_endpoint(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        spec: RtpEndpointSpec,
    ) -> Result<RtpEndpointInfo, SfuError> {
        self.check_capacity()?;
        let room = self
            .participants
            .get(&participant)
            .ok_or(SfuError::NoSuchParticipant(participant))?
            .room
            .clone();
        if spec.payload_type > 127 || (64..96).contains(&spec.payload_type) {
            return Err(SfuError::BadRequest(format!(
                "payload_type {} is not a valid dynamic or static RTP payload type (0-63, 96-127)",
                spec.payload_type
            )));
        }
        if let Some(id) = spec.audio_level_ext
            && (spec.direction != RtpDirection::Publish
                || spec.kind != TrackKind::Audio
                || !(1..=14).contains(&id))
        {
            return Err(SfuError::BadRequest(format!(
                "audio_level_ext {id}: only an audio publisher has one, and it is a one-byte \
                 header-extension id (1-14)"
            )));
        }
        if spec.remote.port() == 0 || spec.remote.ip().is_unspecified() {
            return Err(SfuError::BadRequest(format!(
                "remote {} must be a concrete IP:PORT",
                spec.remote
            )));
        }
        if self.io.by_addr.contains_key(&spec.remote) {
            return Err(SfuError::BadRequest(format!(
                "remote {} already belongs to a WebRTC session",
                spec.remote
            )));
        }
        let existing = self
            .rtp_by_addr
            .get(&spec.remote)
            .cloned()
            .unwrap_or_default();
        for other in &existing {
            if let Some(Transport::Rtp(e)) = self.peers.get(other).map(|p| &p.transport)
                && e.direction == spec.direction
            {
                return Err(SfuError::BadRequest(format!(
                    "remote {} already has a {:?} endpoint",
                    spec.remote, spec.direction
                )));
            }
        }
        if let Some(t) = spec.track {
            let track = self.tracks.get(&t).ok_or(SfuError::NoSuchTrack(t))?;
            if track.room != room || track.kind != spec.kind {
                return Err(SfuError::BadRequest(format!(
                    "track {t} is not a {} track of this room",
                    spec.kind.as_str()
                )));
            }
        }
        let ssrc = match spec.ssrc {
            Some(s) => s,
            None => self.random() as u32 | 1,
        };
        let id = PeerId(crate::ids::tagged(self.config.shard, self.random()));
        let initial = (self.random() & 0x3fff) as u16;
        if spec.direction == RtpDirection::Subscribe {
            // A receive batch fanned out to this subscriber needs a header
            // buffer and an output slot per packet: provision them now, on
            // the control path, so the packet path never grows a pool.
            self.io.reserve_fanout(crate::buf::MAX_BATCH);
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
            let tid = TrackId(crate::ids::tagged(self.config.shard, self.next_seq_id));
            self.next_seq_id += 1;
            let mut layer = Layer::new(None);
            layer.ssrc = Some(ssrc);
            let track = Track {
                room: room.clone(),
                participant,
                peer: id,
                kind: spec.kind,
                mid: None,
                codec: Some(match spec.kind {
                    TrackKind::Audio => Codec::Opus,
                    TrackKind::Video => Codec::Vp8,
                }),
                layers: vec![layer],
                subscribers: Vec::new(),
                demanded: Vec::new(),
                mesh_out: Vec::new(),
                origin: None,
                announced: None,
            };
            info = Some(track.info(tid));
            self.tracks.insert(tid, track);
            endpoint.track = Some(tid);
        }
        self.peers.insert(
            id,
            Peer {
                participant,
                room: room.clone(),
                transport: Transport::Rtp(Box::new(endpoint)),
                counters: Counters::default(),
                created: now,
                loss: None,
                rtt: None,
            },
        );
        self.sessions_created += 1;
        self.rtp_by_addr.entry(spec.remote).or_default().push(id);
        if let Some(p) = self.participants.get_mut(&participant) {
            p.peers.push(id);
        }
        let track = if let Some(info) = info {
            let t = info.track;
            self.publish_track(now, &room, info);
            Some(t)
        } else {
            self.bind_rtp_subscriber(now, id, spec.track);
            match self.peers.get(&id).map(|p| &p.transport) {
                Some(Transport::Rtp(e)) => e.track,
                _ => None,
            }
        };
        self.io.event(SfuEvent::PeerConnected {
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
        for (&tid, track) in &self.tracks {
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
                return Err(SfuError::BadRequest(
                    "layers can only be chosen for WebRTC subscribers".into(),
                ));
            }
        }
        self.select_layers(now);
        Ok(())
    }

    /// Stops accepting sessions.
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Closes every session (end of drain).
    pub fn close_all(&mut self, now: Instant) {
        let ids: Vec<ParticipantId> = self.participants.keys().copied().collect();
        for p in ids {
            let _ = self.leave(now, p);
        }
        self.process_events(now);
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Every remote address a live session sends from (WebRTC peers once ICE
    /// has seen them, plain-RTP endpoints). A control-path query, e.g. to
    /// expire steering entries of sessions that are gone.
    pub fn remote_addrs(&self) -> Vec<SocketAddr> {
        self.io
            .by_addr
            .keys()
            .chain(self.rtp_by_addr.keys())
            .copied()
            .collect()
    }

    // ----- the run loop ------------------------------------------------------

    /// Feeds one received datagram.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        let packet = self.io.packets.copy_in(data);
        self.handle_packet(now, source, destination, packet);
    }

    /// The pool that received datagrams should be read into, so that
    /// [`Sfu::handle_packet`] can fan them out without copying.
    pub fn packet_pool(&mut self) -> &mut BufPool {
        &mut self.io.packets
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
        self.io.counters.packets_in += 1;
        self.io.counters.bytes_in += data.len() as u64;
        if let Some(&peer) = self.io.by_addr.get(&source) {
            self.feed_rtc(now, peer, source, destination, data);
        } else if self.rtp_by_addr.contains_key(&source) {
            self.handle_plain(now, source, &packet);
        } else if !self.mesh.is_empty() && self.mesh_receive(now, source, &packet) {
            // A mesh link's datagram (or one failing its authentication).
        } else {
            match packet::classify(data) {
                PacketClass::Stun => self.handle_new_stun(now, source, destination, data),
                PacketClass::Unknown => self.io.drop_packet(DropReason::Malformed),
                _ => self.io.drop_packet(DropReason::UnknownSource),
            }
        }
        self.process_events(now);
    }

    fn handle_new_stun(
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
                .and_then(|u| self.by_ufrag.get(u).copied()),
            Ok(_) => None,
            Err(_) => {
                self.io.drop_packet(DropReason::Malformed);
                return;
            }
        };
        match peer {
            Some(peer) => self.feed_rtc(now, peer, source, destination, data),
            None => self.io.drop_packet(DropReason::UnknownUfrag),
        }
    }

    fn feed_rtc(
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
            self.io.drop_packet(DropReason::Malformed);
            return;
        };
        if let Err(e) = w.rtc.handle_input(Input::Receive(now, recv)) {
            tracing::debug!(peer = %id, error = %e, "datagram rejected");
            self.io.drop_packet(DropReason::Rejected);
        }
        if !self.io.drain(now, id, w, &mut peer.counters) {
            w.closing = true;
        }
    }

    /// Advances time: str0m timers, layer selection, speaker detection.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (id, peer) in self.peers.iter_mut() {
            if let Transport::WebRtc(w) = &mut peer.transport
                && w.next_timeout <= now
                && (w.rtc.handle_input(Input::Timeout(now)).is_err()
                    || !self.io.drain(now, *id, w, &mut peer.counters)
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

    pub fn poll_output(&mut self) -> Option<Output> {
        self.io.outputs.pop_front()
    }

    /// Returns a transmitted buffer for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= 1200 {
            if self.io.pool.len() < POOL_MAX {
                self.io.pool.push(buf);
            }
        } else if buf.capacity() >= HEADER_CAPACITY && self.io.headers.len() < HEADER_POOL_MAX {
            self.io.headers.push(buf);
        }
    }

    // ----- str0m events --------------------------------------------------------

    fn process_events(&mut self, now: Instant) {
        while let Some((id, e)) = self.io.rtc_events.pop_front() {
            self.on_rtc_event(now, id, e);
        }
    }

    fn on_rtc_event(&mut self, now: Instant, id: PeerId, e: Event) {
        match e {
            Event::RtpPacket(p) => self.on_webrtc_rtp(now, id, p),
            Event::KeyframeRequest(r) => self.on_subscriber_keyframe_request(now, id, r.mid),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.close_peer(now, id);
            }
            Event::Connected => {
                if let Some(peer) = self.peers.get_mut(&id) {
                    if let Transport::WebRtc(w) = &mut peer.transport {
                        w.connected = true;
                    }
                    let (room, participant) = (peer.room.clone(), peer.participant);
                    self.io.event(SfuEvent::PeerConnected {
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

    fn on_webrtc_rtp(&mut self, now: Instant, id: PeerId, p: RtpPacket) {
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
            let track = self.tracks.get(tid)?;
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
                let Some(track) = self.tracks.get_mut(&tid) else {
                    return;
                };
                let i = match track.layers.iter().position(|l| l.rid == rid) {
                    Some(i) => i,
                    // A simulcast track's new SSRC must name its layer; one
                    // that does not is not guessed at (a wrong guess would
                    // feed a layer nobody can select).
                    None if rid.is_none() && track.layers.iter().any(|l| l.rid.is_some()) => {
                        self.io.drop_packet(DropReason::UnknownSsrc);
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
        let Some(track) = self.tracks.get_mut(&tid) else {
            return;
        };
        if track.codec.is_none() {
            let pt = p.header.payload_type;
            track.codec = w
                .rtc
                .codec_config()
                .params()
                .iter()
                .find(|x| x.pt() == pt)
                .map(|x| x.spec().codec);
        }
        let keyframe = track.kind == TrackKind::Video
            && track.codec == Some(Codec::Vp8)
            && packet::codec::vp8_is_keyframe(&p.payload);
        let audio_level = p.header.ext_vals.audio_level.map(|l| {
            (
                p.header.ext_vals.voice_activity.unwrap_or(true),
                l.unsigned_abs(),
            )
        });
        observe_level(&mut self.rooms, &track.room, participant, audio_level);
        let fwd = Forward {
            ssrc: *ssrc,
            seq: p.header.sequence_number,
            timestamp: p.header.timestamp,
            marker: p.header.marker,
            keyframe,
            payload: &p.payload,
            shared: Some(&p.payload),
            stored: None,
            audio_level,
        };
        self.forward(now, tid, layer, &fwd);
    }

    /// A subscriber asked for a keyframe: pass it to the publisher of the
    /// layer it watches, throttled.
    fn on_subscriber_keyframe_request(&mut self, now: Instant, id: PeerId, mid: Mid) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.counters.keyframe_requests_received += 1;
        self.io.counters.keyframe_requests_received += 1;
        let Transport::WebRtc(w) = &peer.transport else {
            return;
        };
        let Some(slot) = w.slots.iter().find(|s| s.mid == mid) else {
            return;
        };
        if let (Some(t), Some(l)) = (slot.track, slot.current.or(slot.target)) {
            self.request_keyframe(now, t, l);
        }
    }

    fn request_keyframe(&mut self, now: Instant, tid: TrackId, layer: usize) {
        let Some(track) = self.tracks.get_mut(&tid) else {
            return;
        };
        if track.kind != TrackKind::Video {
            return;
        }
        let Some(l) = track.layers.get_mut(layer) else {
            return;
        };
        if l.last_keyframe_request.is_some_and(|t| {
            now.saturating_duration_since(t) < self.config.keyframe_request_interval
        }) {
            self.io.counters.keyframe_requests_throttled += 1;
            return;
        }
        l.last_keyframe_request = Some(now);
        let rid = l.rid;
        let ssrc = l.ssrc;
        let Some(publisher) = self.peers.get_mut(&track.peer) else {
            return;
        };
        publisher.counters.keyframe_requests_forwarded += 1;
        self.io.counters.keyframe_requests_forwarded += 1;
        match &mut publisher.transport {
            Transport::WebRtc(w) => {
                let Some(mid) = track.mid else { return };
                // The layer's SSRC is the reliable key (str0m's mid/rid index
                // does not always hold simulcast layers); mid/rid is the
                // fallback before the layer's first packet.
                let mut api = w.rtc.direct_api();
                let by_ssrc = ssrc.is_some_and(|s| api.stream_rx(&s.into()).is_some());
                let rx = if by_ssrc {
                    ssrc.and_then(|s| api.stream_rx(&s.into()))
                } else {
                    api.stream_rx_by_mid(mid, rid)
                };
                if let Some(rx) = rx {
                    rx.request_keyframe(KeyframeRequestKind::Pli);
                }
                if !self.io.drain(now, track.peer, w, &mut publisher.counters) {
                    w.closing = true;
                }
            }
            Transport::Rtp(e) => {
                let mut buf = self.io.buffer();
                rtcp::write_pli(&mut buf, self.rtcp_ssrc, e.ssrc);
                self.io.send(&mut publisher.counters, e.remote, buf);
            }
            Transport::Mesh(m) => {
                let (room, source) = (track.room.clone(), m.source_node().to_owned());
                self.mesh_keyframe_request(&room, &source, ssrc);
            }
        }
    }

    // ----- plain RTP -----------------------------------------------------------

    fn handle_plain(&mut self, now: Instant, source: SocketAddr, packet: &PacketBuf) {
        let data = packet.as_slice();
        match packet::classify(data) {
            PacketClass::Rtp => self.on_plain_rtp(now, source, packet),
            PacketClass::Rtcp => self.on_plain_rtcp(now, source, data),
            _ => self.io.drop_packet(DropReason::Malformed),
        }
    }

    fn on_plain_rtp(&mut self, now: Instant, source: SocketAddr, packet: &PacketBuf) {
        let data = packet.as_slice();
        let header = match RtpHeader::parse(data) {
            Ok(h) => h,
            Err(_) => {
                self.io.drop_packet(DropReason::Malformed);
                return;
            }
        };
        let Some(ids) = self.rtp_by_addr.get(&source) else {
            return;
        };
        let found = ids.iter().copied().find(|id| {
            matches!(self.peers.get(id).map(|p| &p.transport),
                Some(Transport::Rtp(e)) if e.direction == RtpDirection::Publish && e.ssrc == header.ssrc)
        });
        let Some(id) = found else {
            self.io.drop_packet(DropReason::UnknownSsrc);
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
        e.simple_pt = (header.csrc_count == 0 && !header.has_extension && header.padding_len == 0)
            .then_some(header.payload_type);
        // Loss detection and NACKs towards the plain publisher. While the
        // kernel forwards this stream only samples arrive here: their gaps
        // are not loss.
        match e.highest_in {
            None => e.highest_in = Some(header.sequence),
            Some(h) if e.kernel_forwarded => {
                let gap = header.sequence.wrapping_sub(h);
                if gap > 0 && gap < 0x8000 {
                    e.highest_in = Some(header.sequence);
                }
            }
            Some(h) => {
                let gap = header.sequence.wrapping_sub(h);
                if gap > 0 && gap < 0x8000 {
                    e.highest_in = Some(header.sequence);
                    if gap > 1 {
                        let missing = gap - 1;
                        peer.counters.packets_lost += u64::from(missing);
                        self.io.counters.packets_lost += u64::from(missing);
                        if missing <= MAX_NACK_GAP && e.kind == TrackKind::Video {
                            let mut lost = [0u16; MAX_NACK_GAP as usize];
                            for (i, slot) in lost.iter_mut().enumerate().take(usize::from(missing))
                            {
                                *slot = h.wrapping_add(1 + i as u16);
                            }
                            let mut buf = self.io.buffer();
                            rtcp::write_nack(
                                &mut buf,
                                self.rtcp_ssrc,
                                e.ssrc,
                                &lost[..usize::from(missing)],
                            );
                            peer.counters.nacks_sent += u64::from(missing);
                            self.io.counters.nacks_sent += u64::from(missing);
                            self.io.send(&mut peer.counters, e.remote, buf);
                        }
                    }
                }
            }
        }
        let video = e.kind == TrackKind::Video;
        let audio_level = e
            .audio_level_ext
            .and_then(|id| packet::rtp::audio_level(data, &header, id));
        observe_level(&mut self.rooms, &peer.room, peer.participant, audio_level);
        let mut fwd = Forward::from_stored(&header, packet, |p| {
            video && packet::codec::vp8_is_keyframe(p)
        });
        fwd.audio_level = audio_level;
        self.forward(now, tid, 0, &fwd);
    }

    fn on_plain_rtcp(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        // The remote's endpoints are looked up per item rather than copied
        // out once: this path must not allocate.
        if !self.rtp_by_addr.contains_key(&source) {
            return;
        }
        for item in rtcp::iter(data) {
            let Ok(item) = item else {
                self.io.drop_packet(DropReason::Malformed);
                return;
            };
            match item {
                rtcp::RtcpPacket::Nack {
                    media_ssrc, lost, ..
                } => {
                    let Some(id) = self.plain_subscriber(source, media_ssrc) else {
                        continue;
                    };
                    let Some(peer) = self.peers.get_mut(&id) else {
                        continue;
                    };
                    let Transport::Rtp(e) = &mut peer.transport else {
                        continue;
                    };
                    for seq in lost {
                        peer.counters.nacks_received += 1;
                        self.io.counters.nacks_received += 1;
                        match e.retransmit.get(now, seq) {
                            Some(sent) => {
                                let mut header = self.io.header();
                                packet::rtp::write_header(
                                    &mut header,
                                    sent.marker,
                                    e.payload_type,
                                    sent.seq,
                                    sent.timestamp,
                                    e.ssrc,
                                );
                                peer.counters.retransmits += 1;
                                self.io.counters.retransmits += 1;
                                self.io.send_shared(
                                    &mut peer.counters,
                                    e.remote,
                                    header,
                                    sent.payload,
                                );
                            }
                            None => {
                                peer.counters.retransmit_misses += 1;
                                self.io.counters.retransmit_misses += 1;
                            }
                        }
                    }
                }
                rtcp::RtcpPacket::Pli { media_ssrc, .. } => {
                    self.plain_keyframe_request(now, source, media_ssrc);
                }
                rtcp::RtcpPacket::Fir { entries, .. } => {
                    for (ssrc, _) in entries {
                        self.plain_keyframe_request(now, source, ssrc);
                    }
                }
                rtcp::RtcpPacket::ReceiverReport { reports, .. }
                | rtcp::RtcpPacket::SenderReport { reports, .. } => {
                    for block in reports {
                        if let Some(id) = self.plain_subscriber(source, block.ssrc)
                            && let Some(peer) = self.peers.get_mut(&id)
                        {
                            peer.loss = Some(f32::from(block.fraction_lost) / 256.0);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The plain subscriber at `remote` that sends with `ssrc`.
    fn plain_subscriber(&self, remote: SocketAddr, ssrc: u32) -> Option<PeerId> {
        let ids = self.rtp_by_addr.get(&remote)?;
        ids.iter().copied().find(|id| {
            matches!(self.peers.get(id).map(|p| &p.transport),
                Some(Transport::Rtp(e)) if e.direction == RtpDirection::Subscribe && e.ssrc == ssrc)
        })
    }

    fn plain_keyframe_request(&mut self, now: Instant, remote: SocketAddr, ssrc: u32) {
        let Some(id) = self.plain_subscriber(remote, ssrc) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.counters.keyframe_requests_received += 1;
        self.io.counters.keyframe_requests_received += 1;
        if let Transport::Rtp(e) = &peer.transport
            && let (Some(t), Some(l)) = (e.track, e.current.or(e.target))
        {
            self.request_keyframe(now, t, l);
        }
    }

    // ----- routing ---------------------------------------------------------------

    /// Sends one publisher packet to every subscriber of its track that
    /// watches this layer, rewriting sequence numbers and timestamps.
    fn forward(&mut self, now: Instant, tid: TrackId, layer: usize, pkt: &Forward<'_>) {
        let Some(track) = self.tracks.get_mut(&tid) else {
            return;
        };
        let kind = track.kind;
        let codec = track.codec;
        {
            let layer_count = track.layers.len();
            let Some(l) = track.layers.get_mut(layer) else {
                return;
            };
            l.meter.record(now, pkt.payload.len());
            l.last_packet = Some(now);
            l.ssrc = Some(pkt.ssrc);
            if layer_count > 1 && l.watchers == 0 {
                self.io.drop_packet(DropReason::Paused);
                return;
            }
        }
        let mut shared: Option<Arc<[u8]>> = pkt.shared.cloned();
        let mut stored: Option<PacketBuf> = pkt.stored.clone();
        if !track.mesh_out.is_empty() {
            self.mesh
                .forward(&mut self.io, tid, track, now, layer, pkt, &mut stored);
        }
        let mut switched: Option<(TrackId, usize)> = None;
        for i in 0..track.subscribers.len() {
            let sub_id = track.subscribers[i];
            let Some(sub) = self.peers.get_mut(&sub_id) else {
                continue;
            };
            match &mut sub.transport {
                Transport::WebRtc(w) => {
                    if !w.connected {
                        continue;
                    }
                    let Some(slot) = w.slots.iter_mut().find(|s| s.track == Some(tid)) else {
                        continue;
                    };
                    if !admit(&mut slot.current, slot.target, layer, pkt.keyframe, kind) {
                        if slot.target == Some(layer) {
                            switched = Some((tid, layer));
                        }
                        continue;
                    }
                    if slot.current == Some(layer)
                        && slot.rewriter.source() != Some(pkt.ssrc)
                        && slot.rewriter.source().is_some()
                    {
                        sub.counters.layer_switches += 1;
                        self.io.counters.layer_switches += 1;
                    }
                    if slot.pt.is_none() {
                        slot.pt = codec.and_then(|c| negotiated_pt(&w.rtc, slot.mid, c));
                    }
                    let Some((_, params)) = &slot.pt else {
                        continue;
                    };
                    let pt = params.pt();
                    let out = slot.rewriter.rewrite(now, pkt.ssrc, pkt.seq, pkt.timestamp);
                    let payload = shared.get_or_insert_with(|| Arc::from(pkt.payload)).clone();
                    let mut ext = ExtensionValues::default();
                    if let Some((voice, level)) = pkt.audio_level {
                        ext.audio_level = Some(-(level.min(127) as i8));
                        ext.voice_activity = Some(voice);
                    }
                    let mut api = w.rtc.direct_api();
                    let Some(tx) = api.stream_tx_by_mid(slot.mid, None) else {
                        continue;
                    };
                    tx.write_rtp(
                        RtpWrite::new(pt, SeqNo::from(out.seq), out.timestamp, now, payload)
                            .marker(pkt.marker)
                            .nackable(kind == TrackKind::Video)
                            .ext_vals(ext),
                    );
                    if !self.io.drain(now, sub_id, w, &mut sub.counters) {
                        w.closing = true;
                    }
                }
                Transport::Rtp(e) => {
                    if !admit(&mut e.current, e.target, layer, pkt.keyframe, kind) {
                        if e.target == Some(layer) {
                            switched = Some((tid, layer));
                        }
                        continue;
                    }
                    let out = e.rewriter.rewrite(now, pkt.ssrc, pkt.seq, pkt.timestamp);
                    // A payload that did not arrive as a stored packet (from
                    // a WebRTC publisher) is stored once, on first use.
                    let payload = stored
                        .get_or_insert_with(|| self.io.packets.copy_in(pkt.payload))
                        .clone();
                    let mut header = self.io.header();
                    packet::rtp::write_header(
                        &mut header,
                        pkt.marker,
                        e.payload_type,
                        out.seq as u16,
                        out.timestamp,
                        e.ssrc,
                    );
                    e.retransmit
                        .insert(now, out.seq as u16, out.timestamp, pkt.marker, &payload);
                    self.io
                        .send_shared(&mut sub.counters, e.remote, header, payload);
                }
                Transport::Mesh(_) => {}
            }
        }
        // A subscriber is waiting for a keyframe on this layer: ask again
        // (throttled) until it comes, since a request can be lost or ignored.
        if let Some((t, l)) = switched {
            self.request_keyframe(now, t, l);
        }
    }

    // ----- subscriptions ---------------------------------------------------------

    fn publish_track(&mut self, now: Instant, room: &str, info: TrackInfo) {
        let tid = info.track;
        if let Some(r) = self.rooms.get_mut(room) {
            r.tracks.push(tid);
        }
        self.io.event(SfuEvent::TrackPublished {
            room: room.to_string(),
            track: info,
        });
        self.bind_waiting_subscribers(now, room);
        if !self.mesh.is_empty() {
            self.mesh_reconcile(now);
        }
    }

    /// Offers the room's tracks to every subscription in it that has none.
    fn bind_waiting_subscribers(&mut self, now: Instant, room: &str) {
        let waiting: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.room == room)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            match self.peers.get(&id).map(|p| &p.transport) {
                Some(Transport::WebRtc(_)) => self.bind_slots(now, id),
                Some(Transport::Rtp(e))
                    if e.direction == RtpDirection::Subscribe && e.track.is_none() =>
                {
                    self.bind_rtp_subscriber(now, id, None)
                }
                _ => {}
            }
        }
    }

    /// Binds a WebRTC subscriber's free m-lines to tracks of its room.
    fn bind_slots(&mut self, now: Instant, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Transport::WebRtc(w) = &mut peer.transport else {
            return;
        };
        let OfferIntent::Subscribe { from } = w.intent else {
            return;
        };
        let Some(room) = self.rooms.get(&peer.room) else {
            return;
        };
        let mut changed = false;
        for slot in w.slots.iter_mut().filter(|s| s.track.is_none()) {
            let candidate = room.tracks.iter().copied().find(|t| {
                let Some(track) = self.tracks.get(t) else {
                    return false;
                };
                track.kind == slot.kind
                    && track.participant != peer.participant
                    && from.is_none_or(|f| f == track.participant)
                    && !track.subscribers.contains(&id)
            });
            if let Some(t) = candidate {
                slot.track = Some(t);
                slot.pt = None;
                slot.current = None;
                slot.target = None;
                if let Some(track) = self.tracks.get_mut(&t) {
                    track.subscribers.push(id);
                }
                changed = true;
            }
        }
        if changed {
            self.select_layers(now);
        }
    }

    fn bind_rtp_subscriber(&mut self, now: Instant, id: PeerId, wanted: Option<TrackId>) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Transport::Rtp(e) = &mut peer.transport else {
            return;
        };
        let Some(room) = self.rooms.get(&peer.room) else {
            return;
        };
        let candidate = wanted.or_else(|| {
            room.tracks.iter().copied().find(|t| {
                self.tracks
                    .get(t)
                    .is_some_and(|tr| tr.kind == e.kind && tr.participant != peer.participant)
            })
        });
        if let Some(t) = candidate
            && let Some(track) = self.tracks.get_mut(&t)
        {
            e.track = Some(t);
            track.subscribers.push(id);
            self.select_layers(now);
        }
    }

    /// Chooses every subscriber's target layer, requests keyframes for
    /// switches, and tells publishers which layers are watched.
    fn select_layers(&mut self, now: Instant) {
        // Target per subscription.
        let mut switches: Vec<(TrackId, usize)> = Vec::new();
        for peer in self.peers.values_mut() {
            match &mut peer.transport {
                Transport::WebRtc(w) => {
                    let video_slots = w
                        .slots
                        .iter()
                        .filter(|s| s.track.is_some() && s.kind == TrackKind::Video)
                        .count()
                        .max(1) as u64;
                    let budget = w.bwe_bps.map(|b| b / video_slots);
                    for slot in &mut w.slots {
                        let Some(track) = slot.track.and_then(|t| self.tracks.get(&t)) else {
                            continue;
                        };
                        let target =
                            choose_layer(&track.layers, now, budget, w.pinned_rid.as_ref());
                        if target != slot.target {
                            slot.target = target;
                            if let (Some(t), Some(l)) = (slot.track, target)
                                && slot.current != target
                            {
                                switches.push((t, l));
                            }
                        }
                    }
                }
                Transport::Rtp(e) if e.direction == RtpDirection::Subscribe => {
                    let Some(track) = e.track.and_then(|t| self.tracks.get(&t)) else {
                        continue;
                    };
                    let target = choose_layer(&track.layers, now, None, None);
                    if target != e.target {
                        e.target = target;
                        if let (Some(t), Some(l)) = (e.track, target)
                            && e.current != target
                        {
                            switches.push((t, l));
                        }
                    }
                }
                Transport::Rtp(_) | Transport::Mesh(_) => {}
            }
        }
        // Watchers per layer.
        for track in self.tracks.values_mut() {
            for l in &mut track.layers {
                l.watchers = 0;
            }
        }
        for peer in self.peers.values() {
            match &peer.transport {
                Transport::WebRtc(w) => {
                    for s in &w.slots {
                        count_watchers(&mut self.tracks, s.track, s.current, s.target);
                    }
                }
                Transport::Rtp(e) => count_watchers(&mut self.tracks, e.track, e.current, e.target),
                Transport::Mesh(_) => {}
            }
        }
        // Downstream mesh links watch the layers they have not paused.
        for track in self.tracks.values_mut() {
            for m in &track.mesh_out {
                for i in m.watched_layers() {
                    if let Some(l) = track.layers.get_mut(i) {
                        l.watchers += 1;
                    }
                }
            }
        }
        // Demand changes, and layers that were asked for but never came.
        let mut events = Vec::new();
        let mut remote_demand_changed = false;
        for (tid, track) in self.tracks.iter_mut() {
            if track.kind != TrackKind::Video || track.layers.len() < 2 {
                continue;
            }
            for l in &mut track.layers {
                if l.watchers > 0 && !l.active(now) {
                    let since = *l.demanded_since.get_or_insert(now);
                    if now.saturating_duration_since(since) > LAYER_START_GRACE {
                        l.unavailable_until = Some(now + LAYER_RETRY_AFTER);
                        l.demanded_since = None;
                    }
                } else {
                    l.demanded_since = None;
                }
            }
            let watched = || {
                track
                    .layers
                    .iter()
                    .filter(|l| l.watchers > 0)
                    .filter_map(|l| l.rid.as_ref())
            };
            // Compare before building strings: this runs on every tick.
            let unchanged = watched()
                .map(|r| &**r)
                .eq(track.demanded.iter().map(String::as_str));
            if !unchanged {
                remote_demand_changed |= track.origin.is_some();
                let active: Vec<String> = watched().map(|r| r.to_string()).collect();
                track.demanded = active.clone();
                events.push(SfuEvent::LayerDemand {
                    room: track.room.clone(),
                    participant: track.participant,
                    peer: track.peer,
                    track: *tid,
                    active,
                });
            }
        }
        for e in events {
            self.io.event(e);
        }
        if remote_demand_changed {
            self.mesh_demand_changed(now);
        }
        for (t, l) in switches {
            self.request_keyframe(now, t, l);
        }
    }

    fn tick(&mut self, now: Instant) {
        for track in self.tracks.values_mut() {
            for l in &mut track.layers {
                let bps = l.meter.bps(now);
                if bps > 0 {
                    l.bps = bps;
                }
            }
        }
        self.select_layers(now);
        // Let subscriber bandwidth estimation probe up to what the best layers
        // need. (No collected id list: a tick must not allocate.)
        for (&id, peer) in self.peers.iter_mut() {
            let Transport::WebRtc(w) = &mut peer.transport else {
                continue;
            };
            if !matches!(w.intent, OfferIntent::Subscribe { .. }) || !w.connected {
                continue;
            }
            let desired: u64 = w
                .slots
                .iter()
                .filter_map(|s| self.tracks.get(&s.track?))
                .map(|t| t.layers.iter().map(|l| l.bps).max().unwrap_or(0))
                .sum();
            if desired > 0 {
                w.rtc
                    .bwe()
                    .set_bitrate(Bitrate::kbps(100), Bitrate::from(desired + desired / 4));
                if !self.io.drain(now, id, w, &mut peer.counters) {
                    w.closing = true;
                }
            }
        }
        self.mesh_tick(now);
        for (name, r) in self.rooms.iter_mut() {
            if let Some((participant, level)) = r.speaker.tick() {
                self.io.event(SfuEvent::ActiveSpeaker {
                    room: name.clone(),
                    participant,
                    level,
                });
            }
        }
    }

    fn close_peer(&mut self, now: Instant, id: PeerId) {
        let Some(mut peer) = self.peers.remove(&id) else {
            return;
        };
        self.sessions_closed += 1;
        match &mut peer.transport {
            Transport::WebRtc(w) => {
                self.by_ufrag.remove(&w.ufrag);
                for a in &w.addrs {
                    self.io.by_addr.remove(a);
                }
                w.rtc.disconnect();
                // Flush whatever the disconnect queued (e.g. DTLS close).
                let mut scratch = Counters::default();
                self.io.drain(now, id, w, &mut scratch);
                for slot in &w.slots {
                    if let Some(t) = slot.track.and_then(|t| self.tracks.get_mut(&t)) {
                        t.subscribers.retain(|s| *s != id);
                    }
                }
            }
            Transport::Rtp(e) => {
                if let Some(v) = self.rtp_by_addr.get_mut(&e.remote) {
                    v.retain(|x| *x != id);
                    if v.is_empty() {
                        self.rtp_by_addr.remove(&e.remote);
                    }
                }
                if e.direction == RtpDirection::Subscribe
                    && let Some(t) = e.track.and_then(|t| self.tracks.get_mut(&t))
                {
                    t.subscribers.retain(|s| *s != id);
                }
            }
            Transport::Mesh(_) => {}
        }
        // Unpublish the peer's tracks; their subscribers wait for new ones.
        let owned: Vec<TrackId> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.peer == id)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in &owned {
            self.unpublish_track(*tid);
        }
        if let Some(r) = self.rooms.get_mut(&peer.room) {
            r.retired.add(&peer.counters);
        }
        self.io.event(SfuEvent::PeerClosed {
            room: peer.room.clone(),
            participant: peer.participant,
            peer: id,
        });
        let leave = match self.participants.get_mut(&peer.participant) {
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

    /// Removes a track: its subscribers lose it (and wait for another),
    /// its room forgets it.
    fn unpublish_track(&mut self, tid: TrackId) {
        let Some(track) = self.tracks.remove(&tid) else {
            return;
        };
        for sub in &track.subscribers {
            let Some(p) = self.peers.get_mut(sub) else {
                continue;
            };
            match &mut p.transport {
                Transport::WebRtc(w) => {
                    for s in w.slots.iter_mut().filter(|s| s.track == Some(tid)) {
                        s.track = None;
                        s.current = None;
                        s.target = None;
                    }
                }
                Transport::Rtp(e) => {
                    e.track = None;
                    e.current = None;
                    e.target = None;
                }
                Transport::Mesh(_) => {}
            }
        }
        if let Some(r) = self.rooms.get_mut(&track.room) {
            r.tracks.retain(|t| *t != tid);
        }
        self.io.event(SfuEvent::TrackUnpublished {
            room: track.room.clone(),
            participant: track.participant,
            track: tid,
        });
    }

    // ----- statistics --------------------------------------------------------------

    pub fn stats(&self) -> StatsSnapshot {
        let mut rooms: HashMap<&str, RoomSnapshot> = self
            .rooms
            .iter()
            .map(|(name, r)| {
                (
                    name.as_str(),
                    RoomSnapshot {
                        room: name.clone(),
                        participants: r.participants.len(),
                        tracks: r
                            .tracks
                            .iter()
                            .filter(|t| self.tracks.get(t).is_some_and(|t| t.origin.is_none()))
                            .count(),
                        remote_participants: 0,
                        remote_tracks: r
                            .tracks
                            .iter()
                            .filter(|t| self.tracks.get(t).is_some_and(|t| t.origin.is_some()))
                            .count(),
                        counters: r.retired,
                    },
                )
            })
            .collect();
        let mut peers = Vec::with_capacity(self.peers.len());
        for (id, p) in &self.peers {
            if let Some(r) = rooms.get_mut(p.room.as_str()) {
                r.counters.add(&p.counters);
            }
            let (transport, bwe, connected) = match &p.transport {
                Transport::WebRtc(w) => ("webrtc", w.bwe_bps, w.connected),
                Transport::Rtp(_) => ("rtp", None, true),
                Transport::Mesh(_) => {
                    if let Some(r) = rooms.get_mut(p.room.as_str()) {
                        r.participants = r.participants.saturating_sub(1);
                        r.remote_participants += 1;
                    }
                    continue;
                }
            };
            peers.push(PeerSnapshot {
                peer: *id,
                room: p.room.clone(),
                participant: p.participant,
                identity: self
                    .participants
                    .get(&p.participant)
                    .map(|x| x.identity.clone())
                    .unwrap_or_default(),
                transport,
                counters: p.counters,
                loss: p.loss,
                rtt: p.rtt,
                bwe_bps: bwe,
                connected,
                created: p.created,
            });
        }
        StatsSnapshot {
            counters: self.io.counters,
            drops: self.io.drops,
            sessions_created: self.sessions_created,
            sessions_closed: self.sessions_closed,
            rooms: rooms.into_values().collect(),
            peers,
            layers: self
                .tracks
                .iter()
                .filter(|(_, t)| t.kind == TrackKind::Video)
                .flat_map(|(id, t)| {
                    t.layers.iter().map(move |l| LayerSnapshot {
                        room: t.room.clone(),
                        track: *id,
                        rid: l.rid.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                        bps: l.bps,
                        watchers: l.watchers,
                    })
                })
                .collect(),
            mesh_links: self.mesh_links(),
        }
    }

    /// Test and diagnostics view: the layer a subscriber currently receives.
    pub fn current_layer(&self, peer: PeerId) -> Option<Option<String>> {
        let p = self.peers.get(&peer)?;
        let (track, current) = match &p.transport {
            Transport::WebRtc(w) => {
                let s = w
                    .slots
                    .iter()
                    .find(|s| s.kind == TrackKind::Video && s.track.is_some())?;
                (s.track?, s.current?)
            }
            Transport::Rtp(e) => (e.track?, e.current?),
            Transport::Mesh(_) => return None,
        };
        let layer = self.tracks.get(&track)?.layers.get(current)?;
        Some(layer.rid.as_ref().map(|r| r.to_string()))
    }
}

/// Counts a subscription as watching its current and target layers.
fn count_watchers(
    tracks: &mut HashMap<TrackId, Track>,
    track: Option<TrackId>,
    current: Option<usize>,
    target: Option<usize>,
) {
    let Some(track) = track.and_then(|t| tracks.get_mut(&t)) else {
        return;
    };
    for l in [current, target].into_iter().flatten() {
        if let Some(layer) = track.layers.get_mut(l) {
            layer.watchers += 1;
        }
    }
}

/// Whether a packet of `layer` goes to a subscriber whose layer state is
/// (`current`, `target`); switches `current` to the target on a keyframe.
fn admit(
    current: &mut Option<usize>,
    target: Option<usize>,
    layer: usize,
    keyframe: bool,
    kind: TrackKind,
) -> bool {
    if kind == TrackKind::Audio {
        *current = Some(layer);
        return true;
    }
    if target == Some(layer) && *current != Some(layer) {
        if keyframe {
            *current = Some(layer);
            return true;
        }
        return false;
    }
    *current == Some(layer)
}

/// Picks the best layer for a budget: the highest-ranked available layer
/// whose bitrate fits, else the lowest. A pinned rid wins when it exists.
fn choose_layer(
    layers: &[Layer],
    now: Instant,
    budget_bps: Option<u64>,
    pinned: Option<&Rid>,
) -> Option<usize> {
    if layers.len() == 1 {
        return Some(0);
    }
    if let Some(rid) = pinned
        && let Some(i) = layers.iter().position(|l| l.rid.as_ref() == Some(rid))
    {
        return Some(i);
    }
    let mut available: Vec<usize> = (0..layers.len())
        .filter(|&i| {
            let l = &layers[i];
            l.ssrc.is_some()
                && !l.withheld
                && (l.active(now) || l.unavailable_until.is_none_or(|u| now >= u))
        })
        .collect();
    if available.is_empty() {
        return None;
    }
    available.sort_by_key(|&i| layers[i].rank());

    match budget_bps {
        None => available.last().copied(),
        Some(b) => available
            .iter()
            .rev()
            .copied()
            .find(|&i| layers[i].bps <= b * 9 / 10)
            .or_else(|| available.first().copied()),
    }
}

/// The subscriber's payload type for a codec on one m-line.
fn negotiated_pt(
    rtc: &Rtc,
    mid: Mid,
    codec: Codec,
) -> Option<(Codec, str0m::format::PayloadParams)> {
    let media = rtc.media(mid)?;
    let remote = media.remote_pts();
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == codec && remote.contains(&p.pt()))
        .map(|p| (codec, *p))
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

/// Feeds a publisher's audio level (voice flag, attenuation) to its room's
/// active-speaker detection.
fn observe_level(
    rooms: &mut HashMap<String, Room>,
    room: &str,
    participant: ParticipantId,
    level: Option<(bool, u8)>,
) {
    if let Some((voice, level)) = level
        && let Some(room) = rooms.get_mut(room)
    {
        room.speaker.observe(participant, level, voice);
    }
}

/// xorshift64: the core's deterministic pseudo-random numbers (seeded
/// from the config; also the unit tests' random inputs).
pub(crate) fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}
