//! Plain data types exchanged with the core: configuration, requests,
//! outputs, events and statistics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::buf::PacketBuf;
use crate::ids::{ParticipantId, PeerId, TrackId};

/// Static configuration of the core.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// The address of the media socket (the destination of received datagrams
    /// and the source of transmitted ones).
    pub local_addr: SocketAddr,
    /// Host candidates advertised to WebRTC peers.
    pub candidates: Vec<SocketAddr>,
    /// Minimum interval between keyframe requests sent to one publisher layer.
    pub keyframe_request_interval: Duration,
    /// Maximum number of concurrent peers (sessions).
    pub max_peers: usize,
    /// Packets held per plain-RTP subscriber for NACK answers.
    pub retransmit_packets: usize,
    /// Oldest packet the retransmission buffer will resend.
    pub retransmit_max_age: Duration,
    /// Starting bandwidth estimate for WebRTC subscribers.
    pub initial_bwe_bps: u64,
    /// The codecs WebRTC peers may negotiate, in order of preference (the
    /// answer lists them in this order, so a browser that offers several
    /// sends the first). A room can narrow it ([`Sfu::set_room_codecs`]),
    /// and so can a participant ([`Sfu::set_participant_codecs`]). Default:
    /// [`CodecSpec::ALL`].
    ///
    /// [`Sfu::set_room_codecs`]: crate::Sfu::set_room_codecs
    /// [`Sfu::set_participant_codecs`]: crate::Sfu::set_participant_codecs
    pub codecs: Vec<CodecSpec>,
    /// How many shards the process runs (rooms are placed by
    /// [`shard_for_room`](crate::shard_for_room)); 1 for a single core.
    pub shards: u8,
    /// How mesh links repair loss.
    pub mesh_recovery: crate::mesh::MeshRecovery,
    /// A fixed FEC group size on mesh links with FEC (clamped to 2..=8);
    /// `None` (the default): each link's follows its measured loss.
    pub mesh_fec_group: Option<usize>,
    /// A fixed number of RED blocks (1 or 2) on mesh links with FEC;
    /// `None` (the default): 2 while a link's audio loss is 10 % or more.
    pub mesh_red_depth: Option<usize>,
    /// Seed of the core's ChaCha generator, which draws session ids,
    /// SSRCs and initial sequence numbers (the core reads no entropy
    /// itself). Fill it from the operating system's randomness in a
    /// server: session ids are bearer secrets in session URLs. Tests use
    /// fixed seeds for repeatable runs.
    pub seed: [u8; 32],
    /// Which core (shard) of a process this is, 0 to 255. It is written into
    /// the top byte of every identifier this core hands out, so that ids
    /// from several cores never collide and name the core that owns them
    /// ([`shard_of`](crate::shard_of)).
    pub shard: u8,
    /// A WebRTC session that has not completed ICE and DTLS this long
    /// after its offer was answered is closed
    /// ([`ReapReason::Handshake`](crate::ReapReason::Handshake)).
    pub handshake_timeout: Duration,
    /// A connected WebRTC session from which no datagram at all (media,
    /// RTCP, STUN consent checks) arrived for this long is closed
    /// ([`ReapReason::IceConsent`](crate::ReapReason::IceConsent)); str0m
    /// itself gives up after 15 s without a binding request.
    pub ice_consent_timeout: Duration,
    /// A plain-RTP subscriber whose remote sent no RTP or RTCP from its
    /// address this long after the endpoint was created is closed
    /// ([`ReapReason::RtpConsent`](crate::ReapReason::RtpConsent)); until
    /// then it receives nothing.
    pub rtp_consent_timeout: Duration,
    /// Loopback and link-local networks a plain endpoint's remote may be in
    /// (refused otherwise, but for loopback on a loopback media socket).
    pub rtp_allow_networks: Vec<crate::Cidr>,
    /// Networks whose plain subscribers receive at once, without first
    /// proving consent (allowed even where loopback or link-local).
    pub rtp_trusted_networks: Vec<crate::Cidr>,
    /// Per-identity, per-token and node-wide limits.
    pub quotas: crate::QuotaConfig,
    /// Where quotas are counted; clones of this configuration share it, so
    /// the cores of one node count together.
    pub ledger: crate::QuotaLedger,
}

impl SfuConfig {
    /// A configuration with defaults for everything but the media socket's address.
    pub fn new(local_addr: SocketAddr) -> Self {
        SfuConfig {
            local_addr,
            candidates: vec![local_addr],
            keyframe_request_interval: Duration::from_millis(500),
            max_peers: 1000,
            retransmit_packets: 256,
            retransmit_max_age: Duration::from_secs(2),
            initial_bwe_bps: 1_000_000,
            codecs: CodecSpec::ALL.to_vec(),
            seed: [0x5e; 32],
            shard: 0,
            shards: 1,
            mesh_recovery: crate::mesh::MeshRecovery::HopByHop,
            mesh_fec_group: None,
            mesh_red_depth: None,
            handshake_timeout: Duration::from_secs(15),
            ice_consent_timeout: Duration::from_secs(30),
            rtp_consent_timeout: Duration::from_secs(15),
            rtp_allow_networks: Vec::new(),
            rtp_trusted_networks: Vec::new(),
            quotas: crate::QuotaConfig::default(),
            ledger: crate::QuotaLedger::new(),
        }
    }
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    /// An audio track.
    Audio,
    /// A video track.
    Video,
}

impl TrackKind {
    /// The lowercase name (`"audio"`, `"video"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TrackKind::Audio => "audio",
            TrackKind::Video => "video",
        }
    }

    pub(crate) fn clock_rate(self) -> u32 {
        match self {
            TrackKind::Audio => 48_000,
            TrackKind::Video => 90_000,
        }
    }
}

/// A media codec the core routes: what a track carries, whatever the
/// transport. The kind ([`CodecSpec::kind`]) follows from it; so do its RTP
/// clock rate and how a keyframe is recognised (layer switches happen on
/// keyframes only).
///
/// The core forwards each without decoding it: it only reads what the RTP
/// payload formats put in front of the media (RFC 7741 for VP8, RFC 6184
/// for H.264, RFC 9628 for VP9, the AV1 RTP specification). A subscriber
/// receives a track only in the track's own codec; bridging between codecs
/// is transcoding, which the core does not do.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecSpec {
    /// Opus audio (48 kHz RTP clock).
    Opus,
    /// VP8 video (90 kHz RTP clock).
    Vp8,
    /// H.264 video (90 kHz RTP clock), packetization mode 1 or 0.
    H264,
    /// VP9 video (90 kHz RTP clock), profile 0 or 2.
    Vp9,
    /// AV1 video (90 kHz RTP clock).
    Av1,
}

impl CodecSpec {
    /// Every codec the core routes, in the default order of preference:
    /// Opus, then VP8 (what every WebRTC client sends), H.264, VP9 and AV1.
    pub const ALL: [CodecSpec; 5] = [
        CodecSpec::Opus,
        CodecSpec::Vp8,
        CodecSpec::H264,
        CodecSpec::Vp9,
        CodecSpec::Av1,
    ];

    /// The codec a track of `kind` has when nothing says otherwise: Opus
    /// for audio, VP8 for video (what plain RTP endpoints assumed before
    /// codecs were named).
    pub fn for_kind(kind: TrackKind) -> Self {
        match kind {
            TrackKind::Audio => CodecSpec::Opus,
            TrackKind::Video => CodecSpec::Vp8,
        }
    }

    /// Audio or video.
    pub fn kind(self) -> TrackKind {
        match self {
            CodecSpec::Opus => TrackKind::Audio,
            CodecSpec::Vp8 | CodecSpec::H264 | CodecSpec::Vp9 | CodecSpec::Av1 => TrackKind::Video,
        }
    }

    /// The lowercase name (`"opus"`, `"vp8"`, `"h264"`, `"vp9"`, `"av1"`),
    /// as in the JSON API and the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            CodecSpec::Opus => "opus",
            CodecSpec::Vp8 => "vp8",
            CodecSpec::H264 => "h264",
            CodecSpec::Vp9 => "vp9",
            CodecSpec::Av1 => "av1",
        }
    }

    /// The codec named `name` (case-insensitive, as in SDP's `a=rtpmap`
    /// encoding names: `"H264"`, `"VP9"`, `"AV1"`; `"AV1X"` is an older
    /// name of AV1), if the core routes it.
    pub fn from_name(name: &str) -> Option<Self> {
        CodecSpec::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(name))
            .or_else(|| name.eq_ignore_ascii_case("av1x").then_some(CodecSpec::Av1))
    }

    /// Whether an RTP payload of this codec starts a keyframe (never for
    /// audio).
    pub fn is_keyframe(self, payload: &[u8]) -> bool {
        use crate::packet::codec;
        match self {
            CodecSpec::Opus => false,
            CodecSpec::Vp8 => codec::vp8_is_keyframe(payload),
            CodecSpec::H264 => codec::h264_is_keyframe(payload),
            CodecSpec::Vp9 => codec::vp9_is_keyframe(payload),
            CodecSpec::Av1 => codec::av1_is_keyframe(payload),
        }
    }

    /// Checks an RTP payload of this codec against its payload format
    /// (without decoding, without copying), with one parse: whether it
    /// starts a keyframe (as [`CodecSpec::is_keyframe`]) and its place in a
    /// scalable stream where the format says (VP8, VP9). An empty payload
    /// (padding only) and Opus are not checked. The error says what is
    /// malformed; the core drops such packets
    /// ([`DropReason::MalformedPayload`]).
    pub fn inspect(
        self,
        payload: &[u8],
        marker: bool,
    ) -> Result<PayloadInfo, crate::packet::codec::CodecError> {
        use crate::packet::codec::{Av1Packet, H264Packet, Vp8Descriptor, Vp9Descriptor};
        use crate::svc::LayerInfo;
        let scalable = |layers: LayerInfo| PayloadInfo {
            keyframe: layers.keyframe,
            layers: Some(layers),
        };
        let plain = |keyframe| PayloadInfo {
            keyframe,
            layers: None,
        };
        if payload.is_empty() {
            return Ok(plain(false));
        }
        match self {
            CodecSpec::Opus => Ok(plain(false)),
            CodecSpec::Vp8 => Vp8Descriptor::parse(payload)
                .map(|d| scalable(LayerInfo::from_vp8(&d, payload, marker))),
            CodecSpec::Vp9 => {
                Vp9Descriptor::parse(payload).map(|d| scalable(LayerInfo::from_vp9(&d)))
            }
            CodecSpec::H264 => H264Packet::parse(payload).map(|p| plain(p.is_keyframe())),
            CodecSpec::Av1 => Av1Packet::parse(payload).map(|p| plain(p.is_keyframe())),
        }
    }

    /// The str0m codec (WebRTC negotiation, mesh announcements).
    pub(crate) fn to_str0m(self) -> str0m::format::Codec {
        use str0m::format::Codec;
        match self {
            CodecSpec::Opus => Codec::Opus,
            CodecSpec::Vp8 => Codec::Vp8,
            CodecSpec::H264 => Codec::H264,
            CodecSpec::Vp9 => Codec::Vp9,
            CodecSpec::Av1 => Codec::Av1,
        }
    }

    /// The codec for a str0m codec, if the core routes it.
    pub(crate) fn from_str0m(codec: str0m::format::Codec) -> Option<Self> {
        use str0m::format::Codec;
        match codec {
            Codec::Opus => Some(CodecSpec::Opus),
            Codec::Vp8 => Some(CodecSpec::Vp8),
            Codec::H264 => Some(CodecSpec::H264),
            Codec::Vp9 => Some(CodecSpec::Vp9),
            Codec::Av1 => Some(CodecSpec::Av1),
            _ => None,
        }
    }
}

impl std::fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`CodecSpec::inspect`] read of one well-formed RTP payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PayloadInfo {
    /// It starts a keyframe.
    pub keyframe: bool,
    /// Its place in a scalable stream (VP8, VP9).
    pub layers: Option<crate::svc::LayerInfo>,
}

/// What an SDP offer is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferIntent {
    /// WHIP / WS `publish`: the offer sends media to the node.
    Publish,
    /// WHEP / WS `subscribe`: the offer only receives; its m-lines are bound
    /// to tracks of the room, optionally of one participant only.
    Subscribe {
        /// Only this participant's tracks (`None`: anyone's).
        from: Option<ParticipantId>,
    },
}

/// Which way a plain RTP endpoint's media flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtpDirection {
    /// The remote sends media to the node.
    Publish,
    /// The node sends media to the remote.
    Subscribe,
}

/// A plain (non-WebRTC) RTP endpoint request.
#[derive(Debug, Clone)]
pub struct RtpEndpointSpec {
    /// Whether the remote publishes or subscribes.
    pub direction: RtpDirection,
    /// Audio or video.
    pub kind: TrackKind,
    /// The remote's address (IP and port, concrete).
    pub remote: SocketAddr,
    /// The RTP payload type on the wire (0-63, 96-127).
    pub payload_type: u8,
    /// The codec of the stream (of `kind`); `None`: the kind's default
    /// ([`CodecSpec::for_kind`]).
    pub codec: Option<CodecSpec>,
    /// The codec's format parameters, as after the payload type in an SDP
    /// `a=fmtp` line (`"profile-level-id=42e01f;packetization-mode=1"`).
    /// Publish: what the stream is, so that WebRTC subscribers get it on a
    /// payload type that can decode it (H.264 profile and packetization
    /// mode, VP9 profile); absent, any payload type of the codec.
    pub fmtp: Option<String>,
    /// Publish: the SSRC the remote sends. Subscribe: the SSRC the node sends
    /// with (chosen by the node when `None`).
    pub ssrc: Option<u32>,
    /// Subscribe only: the track to receive (default: the room's first track
    /// of `kind`, and the next one published when there is none yet).
    pub track: Option<TrackId>,
    /// Publish, audio only: the RFC 8285 one-byte header-extension id
    /// (1-14) under which the remote sends its RFC 6464 audio level. The
    /// level then feeds active-speaker detection and travels with the
    /// packets to WebRTC subscribers and over mesh links.
    pub audio_level_ext: Option<u8>,
}

/// What a new plain RTP endpoint needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpEndpointInfo {
    /// The new session.
    pub peer: PeerId,
    /// The node's address to send to (or receive from).
    pub local: SocketAddr,
    /// The endpoint's SSRC (the remote's for a publisher, the node's for a subscriber).
    pub ssrc: u32,
    /// The track published or received (a subscriber may have none yet).
    pub track: Option<TrackId>,
}

/// A plain-RTP publisher's stream that the core would forward unchanged
/// apart from a constant per-subscriber rewrite, so a kernel fast path may
/// forward it instead (see [`crate::Sfu::plain_flows`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainFlow {
    /// The publishing endpoint.
    pub publisher: PeerId,
    /// The publisher's track.
    pub track: TrackId,
    /// Where the publisher sends from.
    pub source: SocketAddr,
    /// The shard address it sends to.
    pub local: SocketAddr,
    /// The publisher's SSRC.
    pub ssrc: u32,
    /// Every subscriber of the track; never empty.
    pub destinations: Vec<PlainFlowDestination>,
}

/// One subscriber of a [`PlainFlow`] and its rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainFlowDestination {
    /// The subscribing endpoint.
    pub peer: PeerId,
    /// Where the subscriber receives.
    pub remote: SocketAddr,
    /// The subscriber's SSRC.
    pub ssrc: u32,
    /// Added to the publisher's sequence number (mod 2^16).
    pub seq_offset: u16,
    /// Added to the publisher's timestamp (mod 2^32).
    pub ts_offset: u32,
}

/// A mesh transit stream the core forwards from one link to exactly one
/// other unchanged but for the link SSRC and the SRTP tag (both links
/// trusted, with SipHash tags, and without FEC; no local subscriber), so a
/// kernel fast path may verify, re-sign and forward it instead (see
/// [`crate::Sfu::mesh_flows`]).
#[derive(Clone, PartialEq, Eq)]
pub struct MeshFlow {
    /// The transit stream's track.
    pub track: TrackId,
    /// The upstream socket the stream comes from.
    pub source: SocketAddr,
    /// The shard address it is sent to.
    pub local: SocketAddr,
    /// The upstream link's SSRC of the stream.
    pub ssrc: u32,
    /// The SipHash key the upstream signs with.
    pub in_key: [u8; crate::SIPHASH_KEY_LEN],
    /// Highest SRTP index received on it so far.
    pub in_highest: Option<u64>,
    /// The downstream socket it goes to.
    pub dest: SocketAddr,
    /// The downstream link's SSRC of the stream.
    pub out_ssrc: u32,
    /// The SipHash key to sign with towards `dest`.
    pub out_key: [u8; crate::SIPHASH_KEY_LEN],
    /// Highest SRTP index sent on `out_ssrc` so far.
    pub out_highest: Option<u64>,
    /// The clock this core's link send times count from
    /// ([`crate::Sfu::mesh_epoch`]): the kernel stamps forwarded packets
    /// on it, as the core would.
    pub send_epoch: std::time::Instant,
}

impl std::fmt::Debug for MeshFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("MeshFlow")
            .field("track", &self.track)
            .field("source", &self.source)
            .field("local", &self.local)
            .field("ssrc", &self.ssrc)
            .field("in_highest", &self.in_highest)
            .field("dest", &self.dest)
            .field("out_ssrc", &self.out_ssrc)
            .field("out_highest", &self.out_highest)
            .field("send_epoch", &self.send_epoch)
            .finish_non_exhaustive()
    }
}

/// Where a kernel fast path stands with one [`MeshFlow`] (see
/// [`crate::Sfu::set_kernel_mesh_forwarded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshFlowProgress {
    /// The flow's upstream socket and link SSRC.
    pub source: SocketAddr,
    /// The upstream link SSRC.
    pub ssrc: u32,
    /// The flow's downstream link SSRC.
    pub out_ssrc: u32,
    /// Highest SRTP index the kernel accepted from upstream / sent
    /// downstream.
    pub in_highest: Option<u64>,
    /// Highest SRTP index the kernel sent downstream.
    pub out_highest: Option<u64>,
    /// Packets the kernel forwarded of it so far.
    pub packets: u64,
    /// The kernel forwards it now (`false`: it did until now, the entry is
    /// gone).
    pub forwarded: bool,
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    /// The local address to send from.
    pub source: SocketAddr,
    /// The remote address to send to.
    pub destination: SocketAddr,
    /// The datagram, or with `payload` its first bytes (a header written
    /// for this destination). Give it back with [`crate::Sfu::recycle`] once
    /// sent.
    pub contents: Vec<u8>,
    /// Bytes that follow `contents` on the wire, shared with every other
    /// destination of the same packet (zero-copy fan-out). Send both as one
    /// datagram (two iovecs), then drop it.
    pub payload: Option<PacketBuf>,
    /// Bytes that follow the payload on the wire, written for this
    /// destination (a mesh link's SRTP tag over a shared payload): a third
    /// iovec. Usually empty.
    pub trailer: Trailer,
}

/// A few bytes sent after a shared payload, held inline (no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trailer {
    bytes: [u8; Trailer::MAX],
    len: u8,
}

impl Trailer {
    /// The most a trailer holds.
    pub const MAX: usize = 16;

    /// A trailer of `bytes`; `None` when longer than [`Trailer::MAX`].
    pub fn new(bytes: &[u8]) -> Option<Self> {
        let mut t = Trailer::default();
        t.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        t.len = bytes.len() as u8;
        Some(t)
    }

    /// The trailer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Transmit {
    /// Datagram length on the wire.
    pub fn len(&self) -> usize {
        self.contents.len()
            + self.payload.as_ref().map_or(0, PacketBuf::len)
            + self.trailer.as_slice().len()
    }

    /// Whether the datagram has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole datagram as one buffer (tests, cold paths).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = self.contents.clone();
        if let Some(p) = &self.payload {
            v.extend_from_slice(p.as_slice());
        }
        v.extend_from_slice(self.trailer.as_slice());
        v
    }
}

/// What the control plane hears of a published track.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackInfo {
    /// The track.
    pub track: TrackId,
    /// Its publishing participant.
    pub participant: ParticipantId,
    /// Its publishing session.
    pub peer: PeerId,
    /// Audio or video.
    pub kind: TrackKind,
    /// Its simulcast rids (empty without simulcast).
    pub rids: Vec<String>,
    /// Its codec: a WebRTC publisher's is the first of the answer that its
    /// offer accepted (a browser sends that one), corrected by the payload
    /// type of what it sends; a plain or local publisher's is its spec's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<CodecSpec>,
}

/// Something the control plane (WebSocket sessions, logs) should know.
#[derive(Debug, Clone, PartialEq)]
pub enum SfuEvent {
    /// A participant joined a room (locally, or a remote one via the mesh).
    ParticipantJoined {
        /// The room.
        room: String,
        /// The participant.
        participant: ParticipantId,
        /// Its identity.
        identity: String,
    },
    /// A participant left its room.
    ParticipantLeft {
        /// The room.
        room: String,
        /// The participant.
        participant: ParticipantId,
        /// Its identity.
        identity: String,
    },
    /// A session is connected (WebRTC: ICE and DTLS done; plain RTP: at once).
    PeerConnected {
        /// The room.
        room: String,
        /// The owning participant.
        participant: ParticipantId,
        /// The session.
        peer: PeerId,
    },
    /// A session closed.
    PeerClosed {
        /// The room.
        room: String,
        /// The owning participant.
        participant: ParticipantId,
        /// The session.
        peer: PeerId,
    },
    /// The core closed a session on its own (a [`SfuEvent::PeerClosed`]
    /// follows).
    SessionReaped {
        /// The room.
        room: String,
        /// The owning participant.
        participant: ParticipantId,
        /// The session.
        peer: PeerId,
        /// Why.
        reason: crate::ReapReason,
    },
    /// A track was published in a room.
    TrackPublished {
        /// The room.
        room: String,
        /// The track.
        track: TrackInfo,
    },
    /// A track was unpublished.
    TrackUnpublished {
        /// The room.
        room: String,
        /// Its publishing participant.
        participant: ParticipantId,
        /// The track.
        track: TrackId,
    },
    /// The room's loudest speaker changed.
    ActiveSpeaker {
        /// The room.
        room: String,
        /// The speaker (`None`: silence).
        participant: Option<ParticipantId>,
        /// Level in dBov (0 loudest, -127 silence).
        level: i8,
    },
    /// The simulcast layers of a track somebody watches changed; the
    /// publisher may stop encoding the others.
    LayerDemand {
        /// The room.
        room: String,
        /// The track's publishing participant.
        participant: ParticipantId,
        /// The track's publishing session.
        peer: PeerId,
        /// The track.
        track: TrackId,
        /// The rids now watched.
        active: Vec<String>,
    },
    /// A subscriber cannot receive a track of its room: the track's codec
    /// is none its session negotiated, and the core does not transcode.
    /// It receives nothing of that track (rather than a black video).
    NoCommonCodec {
        /// The room.
        room: String,
        /// The subscribing participant.
        participant: ParticipantId,
        /// Its session.
        peer: PeerId,
        /// The track it cannot receive.
        track: TrackId,
        /// The track's codec.
        codec: CodecSpec,
        /// What the session can receive for that kind.
        receivable: Vec<CodecSpec>,
    },
}

impl SfuEvent {
    /// The room the event is about.
    pub fn room(&self) -> &str {
        match self {
            SfuEvent::ParticipantJoined { room, .. }
            | SfuEvent::ParticipantLeft { room, .. }
            | SfuEvent::PeerConnected { room, .. }
            | SfuEvent::PeerClosed { room, .. }
            | SfuEvent::SessionReaped { room, .. }
            | SfuEvent::TrackPublished { room, .. }
            | SfuEvent::TrackUnpublished { room, .. }
            | SfuEvent::ActiveSpeaker { room, .. }
            | SfuEvent::LayerDemand { room, .. }
            | SfuEvent::NoCommonCodec { room, .. } => room,
        }
    }
}

/// Output of [`crate::Sfu::poll_output`].
#[derive(Debug)]
pub enum Output {
    /// A datagram to send.
    Transmit(Transmit),
    /// An event for the control plane.
    Event(SfuEvent),
    /// A mesh control message for a room of another shard: deliver it to
    /// that shard's [`Sfu::handle_mesh_control`](crate::Sfu::handle_mesh_control).
    MeshControl(MeshControl),
    /// For a local (in-process) endpoint: media for a local subscriber, or
    /// a keyframe request for a local publisher (see
    /// [`Sfu::add_local_endpoint`](crate::Sfu::add_local_endpoint)).
    Local(LocalOutput),
}

/// A local (in-process) endpoint: a publisher whose RTP is fed with
/// [`Sfu::handle_local_rtp`](crate::Sfu::handle_local_rtp), or a subscriber
/// whose media comes out as [`Output::Local`]. No socket, no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpointSpec {
    /// Whether the endpoint publishes or subscribes.
    pub direction: RtpDirection,
    /// The codec it publishes, or the codec of the track it takes.
    pub codec: CodecSpec,
    /// Subscribe: the payload type written into the headers it receives.
    /// Publish: unused (the fed packets carry their own).
    pub payload_type: u8,
    /// Subscribe: the SSRC of the stream it receives (chosen by the node
    /// when `None`). Publish: unused; the fed packets may carry any SSRC,
    /// and a new one is a new source (subscribers still see one stream).
    pub ssrc: Option<u32>,
    /// Subscribe only: the track to receive (default: the room's first
    /// track of the codec's kind, and the next one published when there is
    /// none yet).
    pub track: Option<TrackId>,
}

/// What a new local endpoint needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalEndpointInfo {
    /// The new session.
    pub peer: PeerId,
    /// The SSRC a subscriber receives with (0 for a publisher).
    pub ssrc: u32,
    /// The track published or received (a subscriber may have none yet).
    pub track: Option<TrackId>,
}

/// See [`Output::Local`].
#[derive(Debug, Clone)]
pub enum LocalOutput {
    /// One RTP packet for a local subscriber.
    Media(LocalMedia),
    /// A subscriber of the local publisher `peer`'s track needs a keyframe
    /// (throttled as for any publisher).
    KeyframeRequest {
        /// The local publisher.
        peer: PeerId,
    },
}

/// One RTP packet for a local subscriber: the header fields rewritten for
/// it (one continuous stream across source and layer switches), and the
/// payload as a view of the packet the node received, shared with every
/// other subscriber (never copied).
#[derive(Debug, Clone)]
pub struct LocalMedia {
    /// The local subscriber.
    pub peer: PeerId,
    /// Its rewritten header.
    pub header: LocalHeader,
    /// The payload (shared).
    pub payload: PacketBuf,
}

/// The RTP header of a [`LocalMedia`] packet, as fields (no CSRC, no
/// extension, no padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalHeader {
    /// The marker bit.
    pub marker: bool,
    /// The subscriber's payload type.
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// The subscriber's SSRC.
    pub ssrc: u32,
}

impl LocalHeader {
    /// Writes the header as RTP (12 bytes) into `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        crate::packet::rtp::write_header(
            out,
            self.marker,
            self.payload_type,
            self.sequence,
            self.timestamp,
            self.ssrc,
        );
    }
}

/// See [`Output::MeshControl`].
#[derive(Debug, Clone)]
pub struct MeshControl {
    /// The shard that owns the message's room.
    pub shard: u8,
    /// The link's peer node id.
    pub link: String,
    /// The socket it came from.
    pub source: SocketAddr,
    /// The authenticated RTCP APP packet.
    pub rtcp: Vec<u8>,
}

/// Why a received datagram was dropped. Each reason is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Not parseable as STUN/DTLS/RTP/RTCP, or truncated.
    Malformed = 0,
    /// From an address no session owns, and not a STUN request for one.
    UnknownSource,
    /// A STUN request whose username names no session.
    UnknownUfrag,
    /// The WebRTC stack refused it (bad integrity, bad SRTP, ...).
    Rejected,
    /// RTP with an SSRC the endpoint did not announce.
    UnknownSsrc,
    /// A simulcast layer that nobody watches.
    Paused,
    /// From a mesh link's address, failing authentication or replay checks.
    MeshAuth,
    /// A mesh control message for a room/source with no matching route.
    MeshUnrouted,
    /// An authentic mesh datagram that had already arrived.
    MeshDuplicate,
    /// An authentic mesh datagram whose FEC (FlexFEC) or RED payload is
    /// malformed.
    MeshFec,
    /// An authentic mesh delay report that is malformed or of an unknown
    /// version.
    MeshFeedback,
    /// Media whose payload format (a VP8 or VP9 payload descriptor, an
    /// H.264 FU-A or STAP-A, an AV1 aggregation header) is malformed: it is
    /// not forwarded, since no receiver could decode it.
    MalformedPayload,
}

impl DropReason {
    /// Every reason, in metric order.
    pub const ALL: [DropReason; 12] = [
        DropReason::Malformed,
        DropReason::UnknownSource,
        DropReason::UnknownUfrag,
        DropReason::Rejected,
        DropReason::UnknownSsrc,
        DropReason::Paused,
        DropReason::MeshAuth,
        DropReason::MeshUnrouted,
        DropReason::MeshDuplicate,
        DropReason::MeshFec,
        DropReason::MeshFeedback,
        DropReason::MalformedPayload,
    ];

    /// The reason's metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownSource => "unknown_source",
            DropReason::UnknownUfrag => "unknown_ufrag",
            DropReason::Rejected => "rejected",
            DropReason::UnknownSsrc => "unknown_ssrc",
            DropReason::Paused => "paused",
            DropReason::MeshAuth => "mesh_auth",
            DropReason::MeshUnrouted => "mesh_unrouted",
            DropReason::MeshDuplicate => "mesh_duplicate",
            DropReason::MeshFec => "mesh_fec",
            DropReason::MeshFeedback => "mesh_feedback",
            DropReason::MalformedPayload => "malformed_payload",
        }
    }
}

/// Monotonic counters of one peer, room or the whole node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams received.
    pub packets_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Datagrams sent.
    pub packets_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// NACKed packets requested by receivers.
    pub nacks_received: u64,
    /// NACKed packets we requested from senders.
    pub nacks_sent: u64,
    /// Packets resent on NACKs.
    pub retransmits: u64,
    /// NACKed packets no longer held.
    pub retransmit_misses: u64,
    /// Keyframe requests (PLI, FIR) received from subscribers.
    pub keyframe_requests_received: u64,
    /// Keyframe requests passed on to publishers.
    pub keyframe_requests_forwarded: u64,
    /// Keyframe requests held back by the per-layer interval.
    pub keyframe_requests_throttled: u64,
    /// Simulcast layer switches of subscribers.
    pub layer_switches: u64,
    /// Packets that a sender's sequence numbers say were lost on the way in.
    pub packets_lost: u64,
}

impl Counters {
    /// Adds `o` to these counters.
    pub fn add(&mut self, o: &Counters) {
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
        self.nacks_received += o.nacks_received;
        self.nacks_sent += o.nacks_sent;
        self.retransmits += o.retransmits;
        self.retransmit_misses += o.retransmit_misses;
        self.keyframe_requests_received += o.keyframe_requests_received;
        self.keyframe_requests_forwarded += o.keyframe_requests_forwarded;
        self.keyframe_requests_throttled += o.keyframe_requests_throttled;
        self.layer_switches += o.layer_switches;
        self.packets_lost += o.packets_lost;
    }
}

/// One live session, for `/stats`.
#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    /// The session.
    pub peer: PeerId,
    /// Its room.
    pub room: String,
    /// Its participant.
    pub participant: ParticipantId,
    /// The participant's identity.
    pub identity: String,
    /// "webrtc", "rtp" or "local".
    pub transport: &'static str,
    /// Its counters.
    pub counters: Counters,
    /// Fraction of packets lost, as reported by the remote or measured.
    pub loss: Option<f32>,
    /// Round-trip time, when known.
    pub rtt: Option<Duration>,
    /// The bandwidth estimate towards a WebRTC subscriber.
    pub bwe_bps: Option<u64>,
    /// Whether the session is connected.
    pub connected: bool,
    /// When the session was created.
    pub created: Instant,
}

/// One simulcast layer (or the single layer) of a published video track.
#[derive(Debug, Clone)]
pub struct LayerSnapshot {
    /// The track's room.
    pub room: String,
    /// The track.
    pub track: TrackId,
    /// The rid, or "" for a track without simulcast.
    pub rid: String,
    /// Bitrate over the last second, in bits/s.
    pub bps: u64,
    /// Subscribers receiving, or switching to, this layer.
    pub watchers: u32,
}

/// One room, for `/stats`.
#[derive(Debug, Clone)]
pub struct RoomSnapshot {
    /// The room.
    pub room: String,
    /// Local participants (remote ones, placeholders for publishers on
    /// other nodes, are in `remote_participants`).
    pub participants: usize,
    /// Tracks published on this node.
    pub tracks: usize,
    /// Placeholders for participants on other nodes.
    pub remote_participants: usize,
    /// Tracks received from other nodes.
    pub remote_tracks: usize,
    /// Includes peers that have left.
    pub counters: Counters,
}

/// Everything the core counts, for `/stats` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    /// The node's totals.
    pub counters: Counters,
    /// Dropped datagrams by [`DropReason`] (index: `reason as usize`).
    pub drops: [u64; DropReason::ALL.len()],
    /// Sessions created since start.
    pub sessions_created: u64,
    /// Sessions closed since start.
    pub sessions_closed: u64,
    /// Sessions the core closed on its own, by
    /// [`ReapReason`](crate::ReapReason) (index: `reason as usize`).
    pub sessions_reaped: [u64; crate::ReapReason::ALL.len()],
    /// Requests refused by [`QuotaLimit`](crate::QuotaLimit) (index:
    /// `limit as usize`).
    pub quota_refusals: [u64; crate::QuotaLimit::ALL.len()],
    /// Every room.
    pub rooms: Vec<RoomSnapshot>,
    /// Every live session (mesh placeholders aside).
    pub peers: Vec<PeerSnapshot>,
    /// Every video layer.
    pub layers: Vec<LayerSnapshot>,
    /// Every mesh link.
    pub mesh_links: Vec<crate::mesh::MeshLinkSnapshot>,
}

impl StatsSnapshot {
    /// Adds another core's snapshot to this one (a node with several shards).
    pub fn merge(&mut self, other: StatsSnapshot) {
        self.counters.add(&other.counters);
        for (d, o) in self.drops.iter_mut().zip(other.drops) {
            *d += o;
        }
        self.sessions_created += other.sessions_created;
        self.sessions_closed += other.sessions_closed;
        for (d, o) in self.sessions_reaped.iter_mut().zip(other.sessions_reaped) {
            *d += o;
        }
        for (d, o) in self.quota_refusals.iter_mut().zip(other.quota_refusals) {
            *d += o;
        }
        self.rooms.extend(other.rooms);
        self.peers.extend(other.peers);
        self.layers.extend(other.layers);
        for l in other.mesh_links {
            match self.mesh_links.iter_mut().find(|x| x.peer == l.peer) {
                Some(x) => {
                    x.packets_in += l.packets_in;
                    x.packets_out += l.packets_out;
                    x.bytes_in += l.bytes_in;
                    x.bytes_out += l.bytes_out;
                    x.nacks_sent += l.nacks_sent;
                    x.nacks_received += l.nacks_received;
                    x.retransmits += l.retransmits;
                    x.recovered += l.recovered;
                    x.unrecovered += l.unrecovered;
                    x.auth_failures += l.auth_failures;
                    x.duplicates += l.duplicates;
                    x.nack_misses += l.nack_misses;
                    x.fec |= l.fec;
                    x.fec_sent += l.fec_sent;
                    x.fec_received += l.fec_received;
                    x.fec_recovered += l.fec_recovered;
                    x.red_sent += l.red_sent;
                    x.red_recovered += l.red_recovered;
                    x.red_deep_sent += l.red_deep_sent;
                    x.red_loss = x.red_loss.max(l.red_loss);
                    x.red_depth = x.red_depth.max(l.red_depth);
                    x.rtt_us = x.rtt_us.max(l.rtt_us);
                    x.budget_bps = match (x.budget_bps, l.budget_bps) {
                        (Some(a), Some(b)) => Some(a + b),
                        (a, b) => a.or(b),
                    };
                    x.loss = x.loss.max(l.loss);
                    x.fec_loss = x.fec_loss.max(l.fec_loss);
                    // The smallest group a shard uses (the most lossy
                    // shard's view); 0 only where no shard sends FEC.
                    x.fec_group = match (x.fec_group, l.fec_group) {
                        (0, b) => b,
                        (a, 0) => a,
                        (a, b) => a.min(b),
                    };
                    // The most alarming shard's word: over-use, then
                    // under-use, then normal.
                    let rank = |s: i8| [1, 0, 2].get((s + 1) as usize).copied();
                    if rank(l.delay_state) > rank(x.delay_state) {
                        x.delay_state = l.delay_state;
                    }
                    x.delay_trend = x.delay_trend.max(l.delay_trend);
                    x.delay_reports_sent += l.delay_reports_sent;
                    x.delay_reports_received += l.delay_reports_received;
                    x.rooms_out += l.rooms_out;
                    x.rooms_in += l.rooms_in;
                }
                None => self.mesh_links.push(l),
            }
        }
    }
}

/// Rooms and tracks as a newly joined client needs to see them.
#[derive(Debug, Clone, Default)]
pub struct RoomState {
    /// The participants and their identities.
    pub participants: Vec<(ParticipantId, String)>,
    /// The published tracks.
    pub tracks: Vec<TrackInfo>,
}
