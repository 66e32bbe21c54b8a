//! Mesh links between nodes: configuration, the control messages carried in
//! RTCP APP packets, and the receive-side loss tracker that drives
//! hop-by-hop NACKs. The routing itself lives in the [`Sfu`](crate::Sfu).
//!
//! The protocol (docs/mesh.md): every datagram on a link is SRTP or SRTCP
//! under the link's per-direction keys; media is RTP with the original
//! sequence numbers of each stream, one SSRC per (track, layer, link);
//! control is single RTCP packets: generic NACK, PLI, and two APP packets
//! (name `RDGM`): `SUBSCRIBE` (downstream to upstream, every
//! [`SUBSCRIBE_INTERVAL`]), `ANNOUNCE` (upstream to downstream, the
//! streams it sends and what they carry), `UNSUBSCRIBE` (downstream to
//! its previous upstream, once a new upstream delivers after a route
//! change) and `DELAY` (downstream to upstream: the link's queueing-delay
//! state from the [`DelayDetector`], see [`DelayReport`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ids::TrackId;
use crate::types::TrackKind;

/// How often a downstream node renews its subscription to a room, and an
/// upstream node announces what it sends.
pub const SUBSCRIBE_INTERVAL: Duration = Duration::from_millis(500);
/// An announced track not renewed for this long, and whose media stopped,
/// is dropped.
pub const MESH_STATE_TIMEOUT: Duration = Duration::from_millis(2500);
/// A subscription not renewed for this long is dropped: ten periods, so
/// that a lossy link does not end one by chance (at 20 % loss, five lost in
/// a row happen about every half hour on a link; ten, about once in two
/// months). An UNSUBSCRIBE, or the route moving, ends it at once.
pub const SUBSCRIPTION_TIMEOUT: Duration = Duration::from_millis(5000);
/// How long a route change is make-before-break: a node keeps serving the
/// subscriptions of a route (and keeps the link) the scheduler moved away
/// from it, and a downstream keeps taking media from its previous upstream
/// until the new upstream delivers, for at most this long.
pub const ROUTE_HANDOVER: Duration = Duration::from_millis(3000);
/// How often a route whose (new) upstream has not announced yet subscribes:
/// the upstream may get its own desired state a moment later and refuse
/// the first subscription.
pub const PENDING_SUBSCRIBE_INTERVAL: Duration = Duration::from_millis(100);
/// RTCP APP name of mesh control messages.
pub const APP_NAME: [u8; 4] = *b"RDGM";
const APP_SUBSCRIBE: u8 = 1;
const APP_ANNOUNCE: u8 = 2;
const APP_UNSUBSCRIBE: u8 = 3;
const APP_DELAY: u8 = 4;
const WIRE_VERSION: u8 = 1;
/// Longest room name or node id on the wire.
const MAX_NAME: usize = 128;
/// Announced tracks per APP packet, so one fits a 1200-byte datagram.
pub const ANNOUNCE_TRACKS_PER_PACKET: usize = 8;

/// How a mesh repairs loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeshRecovery {
    /// Every hop NACKs its upstream and answers its downstream from its
    /// own retransmission buffers: a loss costs one link's round trip.
    #[default]
    HopByHop,
    /// End-to-end loss detection: only the last node NACKs; a relay
    /// answers from its buffer what it holds and passes the rest upstream
    /// towards the source. Relays never ask for what they miss themselves,
    /// so a loss is repaired over the path from the last node back to the
    /// hop that holds the packet. For comparison (ridge-bench `mesh-loss`).
    /// (A relay cannot leave answering to the source alone: it would drop
    /// the source's retransmission of a packet it already holds as an SRTP
    /// replay.)
    EndToEnd,
}

/// One link of this node, as the scheduler's desired state gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshLinkSpec {
    /// The peer's node id.
    pub peer: String,
    /// The peer's mesh (media) address.
    pub address: SocketAddr,
    /// The 32-byte key both ends share.
    pub key: [u8; 32],
    /// Trusted: plain RTP, authenticated (SRTP NULL cipher). Untrusted:
    /// encrypted SRTP (AES-CM).
    pub trusted: bool,
    /// Send forward error correction on the link: FlexFEC for video, RED
    /// for audio. Only sending depends on it: FEC and RED arriving on any
    /// link are always used.
    pub fec: bool,
}

/// One route entry: for `room`'s media from node `source`, where it comes
/// from (`None` on the source itself) and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshRouteSpec {
    /// The room.
    pub room: String,
    /// The node the media originates on.
    pub source: String,
    /// The link (peer node id) the media comes from; `None` on the source.
    pub upstream: Option<String>,
    /// The links (peer node ids) the media goes on to.
    pub downstream: Vec<String>,
}

/// Everything the core needs to take part in the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// This node's id (the scheduler's).
    pub node_id: String,
    /// The links to other nodes.
    pub links: Vec<MeshLinkSpec>,
    /// The routes through this node.
    pub routes: Vec<MeshRouteSpec>,
}

/// Counters of one mesh link, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshLinkSnapshot {
    /// The peer node id.
    pub peer: String,
    /// Whether the link is trusted (SipHash tags, kernel offload possible).
    pub trusted: bool,
    /// Datagrams received on the link.
    pub packets_in: u64,
    /// Datagrams sent on the link.
    pub packets_out: u64,
    /// Bytes received on the link.
    pub bytes_in: u64,
    /// Bytes sent on the link.
    pub bytes_out: u64,
    /// Sequence numbers we asked the upstream to resend.
    pub nacks_sent: u64,
    /// Sequence numbers the downstream asked us to resend.
    pub nacks_received: u64,
    /// Packets resent on the downstream's NACKs.
    pub retransmits: u64,
    /// NACKed packets that arrived.
    pub recovered: u64,
    /// Packets given up on after the last NACK attempt.
    pub unrecovered: u64,
    /// Datagrams that failed authentication.
    pub auth_failures: u64,
    /// Authentic datagrams that had already arrived (SRTP replay check):
    /// retransmissions racing a repaired original.
    pub duplicates: u64,
    /// NACKed sequence numbers this hop did not hold (yet).
    pub nack_misses: u64,
    /// FEC and RED are sent on the link.
    pub fec: bool,
    /// FlexFEC repair packets sent / received.
    pub fec_sent: u64,
    /// FlexFEC repair packets received.
    pub fec_received: u64,
    /// Missing packets rebuilt from a received repair packet.
    pub fec_recovered: u64,
    /// Audio packets sent with the previous one as a RED block.
    pub red_sent: u64,
    /// Missing audio packets rebuilt from a received RED block.
    pub red_recovered: u64,
    /// Audio packets sent with two previous ones as RED blocks.
    pub red_deep_sent: u64,
    /// Redundant blocks per RED packet on the link now (0: FEC off).
    pub red_depth: u64,
    /// The audio loss before RED the sender infers from the NACKs.
    pub red_loss: f64,
    /// Smoothed NACK-to-retransmission round trip, when measured.
    pub rtt_us: Option<u64>,
    /// The link's loss-based send budget (`None`: unlimited).
    pub budget_bps: Option<u64>,
    /// Fraction of what we sent that the downstream NACKed, last window.
    pub loss: f64,
    /// The media loss before FEC that `loss` suggests (the same where no
    /// FEC was sent; inferred from the group size where it was).
    pub fec_loss: f64,
    /// Media packets per FEC repair packet on the link now (0: FEC off).
    pub fec_group: u64,
    /// What we send on the link, as the downstream's delay detector last
    /// reported it: 1 overuse (queueing grows), 0 normal, -1 underuse.
    pub delay_state: i8,
    /// What we receive on the link: the delay detector's modified trend
    /// (queueing-delay gradient, ms per ms scaled as GCC's), the largest
    /// of the link's senders.
    pub delay_trend: f64,
    /// Delay reports sent to / received from the peer.
    pub delay_reports_sent: u64,
    /// Delay reports received from the peer.
    pub delay_reports_received: u64,
    /// Rooms this node sends on the link / receives from it.
    pub rooms_out: u64,
    /// Rooms this node receives from the link.
    pub rooms_in: u64,
}

// ----- wire format ---------------------------------------------------------------

/// Why a mesh control message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshWireError {
    /// The message is shorter than its fields say.
    #[error("mesh control message truncated")]
    Truncated,
    /// Not a Ridge mesh APP packet.
    #[error("not a Ridge mesh APP packet")]
    NotMesh,
    /// A wire version this node does not speak.
    #[error("unsupported mesh wire version {0}")]
    Version(u8),
    /// A field that does not decode (its name).
    #[error("bad mesh control field: {0}")]
    Field(&'static str),
}

/// A track as announced on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncedTrack {
    /// The track's id on the source node.
    pub origin_track: u64,
    /// The publishing participant's id on the source node.
    pub origin_participant: u64,
    /// The publishing participant's identity.
    pub identity: String,
    /// Audio or video.
    pub kind: TrackKind,
    /// [`codec_code`] of the codec, 0 when unknown.
    pub codec: u8,
    /// Its layers, in the source's order.
    pub layers: Vec<AnnouncedLayer>,
}

/// One simulcast layer (or the only one) of an announced track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncedLayer {
    /// The layer's rid (`None`: no simulcast).
    pub rid: Option<String>,
    /// The SSRC it is sent with on this link.
    pub ssrc: u32,
    /// Its bitrate at the upstream, in kbit/s.
    pub kbps: u32,
    /// The upstream receives it and the link's budget allows it: the
    /// downstream may ask for it even while it is paused on the link.
    pub available: bool,
}

/// A decoded mesh control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshMessage {
    /// Send me `room`'s media from `source`; streams listed in `paused`
    /// are not needed now.
    Subscribe {
        /// The room.
        room: String,
        /// The node the media originates on.
        source: String,
        /// Link SSRCs of streams the downstream does not need now.
        paused: Vec<u32>,
    },
    /// These are (some of) the streams I send you for `room` from `source`.
    Announce {
        /// The room.
        room: String,
        /// The node the media originates on.
        source: String,
        /// The streams, one entry per track.
        tracks: Vec<AnnouncedTrack>,
    },
    /// Stop sending me `room`'s media from `source`: another upstream
    /// delivers it now.
    Unsubscribe {
        /// The room.
        room: String,
        /// The node the media originates on.
        source: String,
    },
}

impl MeshMessage {
    /// The room the message is about.
    pub fn room(&self) -> &str {
        match self {
            Self::Subscribe { room, .. }
            | Self::Announce { room, .. }
            | Self::Unsubscribe { room, .. } => room,
        }
    }
}

/// Wire code of a codec (0: unknown).
pub fn codec_code(codec: Option<str0m::format::Codec>) -> u8 {
    use str0m::format::Codec::*;
    match codec {
        Some(Opus) => 1,
        Some(Vp8) => 2,
        Some(Vp9) => 3,
        Some(H264) => 4,
        Some(Av1) => 5,
        Some(H265) => 6,
        _ => 0,
    }
}

/// The codec of a wire code.
pub fn codec_from_code(code: u8) -> Option<str0m::format::Codec> {
    use str0m::format::Codec::*;
    Some(match code {
        1 => Opus,
        2 => Vp8,
        3 => Vp9,
        4 => H264,
        5 => Av1,
        6 => H265,
        _ => return None,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

/// Appends one RTCP APP packet carrying `msg`.
pub fn write_message(out: &mut Vec<u8>, sender_ssrc: u32, msg: &MeshMessage) {
    let start = out.len();
    let subtype = match msg {
        MeshMessage::Subscribe { .. } => APP_SUBSCRIBE,
        MeshMessage::Announce { .. } => APP_ANNOUNCE,
        MeshMessage::Unsubscribe { .. } => APP_UNSUBSCRIBE,
    };
    out.push(0x80 | subtype);
    out.push(crate::packet::rtcp::PT_APP);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.extend_from_slice(&APP_NAME);
    out.push(WIRE_VERSION);
    match msg {
        MeshMessage::Unsubscribe { room, source } => {
            put_str(out, room);
            put_str(out, source);
        }
        MeshMessage::Subscribe {
            room,
            source,
            paused,
        } => {
            put_str(out, room);
            put_str(out, source);
            let n = paused.len().min(255);
            out.push(n as u8);
            for s in &paused[..n] {
                out.extend_from_slice(&s.to_be_bytes());
            }
        }
        MeshMessage::Announce {
            room,
            source,
            tracks,
        } => {
            put_str(out, room);
            put_str(out, source);
            let n = tracks.len().min(ANNOUNCE_TRACKS_PER_PACKET);
            out.push(n as u8);
            for t in &tracks[..n] {
                out.extend_from_slice(&t.origin_track.to_be_bytes());
                out.extend_from_slice(&t.origin_participant.to_be_bytes());
                put_str(out, &t.identity);
                out.push(match t.kind {
                    TrackKind::Audio => 0,
                    TrackKind::Video => 1,
                });
                out.push(t.codec);
                let layers = t.layers.len().min(8);
                out.push(layers as u8);
                for l in &t.layers[..layers] {
                    put_str(out, l.rid.as_deref().unwrap_or(""));
                    out.extend_from_slice(&l.ssrc.to_be_bytes());
                    let kbps = l.kbps.min(0x7fff_ffff) | (u32::from(l.available) << 31);
                    out.extend_from_slice(&kbps.to_be_bytes());
                }
            }
        }
    }
    while !(out.len() - start).is_multiple_of(4) {
        out.push(0);
    }
    let words = ((out.len() - start) / 4 - 1) as u16;
    out[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MeshWireError> {
        if self.buf.len() < n {
            return Err(MeshWireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, MeshWireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, MeshWireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, MeshWireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self, what: &'static str) -> Result<String, MeshWireError> {
        let n = usize::from(self.u8()?);
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| MeshWireError::Field(what))?;
        if s.chars().any(char::is_control) {
            return Err(MeshWireError::Field(what));
        }
        Ok(s.to_owned())
    }
}

/// True for an RTCP APP packet with the mesh name (cheap, no decoding).
pub fn is_mesh_app(rtcp: &[u8]) -> bool {
    rtcp.len() >= 12 && rtcp[1] == crate::packet::rtcp::PT_APP && rtcp[8..12] == APP_NAME
}

/// The body of a mesh APP packet (`is_mesh_app` already checked) after its
/// name and wire version: RTP version 2, a length of at least `min_len`
/// bytes that the datagram holds, and our [`WIRE_VERSION`].
fn app_body(rtcp: &[u8], min_len: usize) -> Result<Reader<'_>, MeshWireError> {
    if rtcp[0] >> 6 != 2 {
        return Err(MeshWireError::NotMesh);
    }
    let words = usize::from(u16::from_be_bytes([rtcp[2], rtcp[3]]));
    let len = (words + 1) * 4;
    if len < min_len || rtcp.len() < len {
        return Err(MeshWireError::Truncated);
    }
    let mut r = Reader {
        buf: &rtcp[12..len],
    };
    let version = r.u8()?;
    if version != WIRE_VERSION {
        return Err(MeshWireError::Version(version));
    }
    Ok(r)
}

/// Decodes one mesh APP packet (the first RTCP packet of `rtcp`).
pub fn parse_message(rtcp: &[u8]) -> Result<MeshMessage, MeshWireError> {
    if !is_mesh_app(rtcp) {
        return Err(MeshWireError::NotMesh);
    }
    let mut r = app_body(rtcp, 16)?;
    let room = r.str("room")?;
    let source = r.str("source")?;
    if room.is_empty() || source.is_empty() {
        return Err(MeshWireError::Field("room/source"));
    }
    match rtcp[0] & 0x1f {
        APP_UNSUBSCRIBE => Ok(MeshMessage::Unsubscribe { room, source }),
        APP_SUBSCRIBE => {
            let n = r.u8()?;
            let mut paused = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                paused.push(r.u32()?);
            }
            Ok(MeshMessage::Subscribe {
                room,
                source,
                paused,
            })
        }
        APP_ANNOUNCE => {
            let n = r.u8()?;
            if usize::from(n) > ANNOUNCE_TRACKS_PER_PACKET {
                return Err(MeshWireError::Field("track count"));
            }
            let mut tracks = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let origin_track = r.u64()?;
                let origin_participant = r.u64()?;
                let identity = r.str("identity")?;
                let kind = match r.u8()? {
                    0 => TrackKind::Audio,
                    1 => TrackKind::Video,
                    _ => return Err(MeshWireError::Field("kind")),
                };
                let codec = r.u8()?;
                let layers = r.u8()?;
                if layers == 0 || layers > 8 {
                    return Err(MeshWireError::Field("layer count"));
                }
                let mut ls = Vec::with_capacity(usize::from(layers));
                for _ in 0..layers {
                    let rid = r.str("rid")?;
                    let ssrc = r.u32()?;
                    let kbps = r.u32()?;
                    ls.push(AnnouncedLayer {
                        rid: (!rid.is_empty()).then_some(rid),
                        ssrc,
                        kbps: kbps & 0x7fff_ffff,
                        available: kbps >> 31 == 1,
                    });
                }
                tracks.push(AnnouncedTrack {
                    origin_track,
                    origin_participant,
                    identity,
                    kind,
                    codec,
                    layers: ls,
                });
            }
            Ok(MeshMessage::Announce {
                room,
                source,
                tracks,
            })
        }
        _ => Err(MeshWireError::Field("subtype")),
    }
}

/// The queueing-delay state of a link, as the downstream's
/// [`DelayDetector`] sees it (GCC's over-use detector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DelayState {
    /// The queueing delay is stable.
    #[default]
    Normal,
    /// The queueing delay grows: the link carries more than its bottleneck.
    Overuse,
    /// The queueing delay shrinks: a queue drains.
    Underuse,
}

impl DelayState {
    /// 1 overuse, 0 normal, -1 underuse (the metrics gauge).
    pub fn as_i8(self) -> i8 {
        match self {
            Self::Normal => 0,
            Self::Overuse => 1,
            Self::Underuse => -1,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Normal => 0,
            Self::Overuse => 1,
            Self::Underuse => 2,
        }
    }
}

/// A downstream's word on what one upstream sends it on a link: an RTCP
/// APP packet (name `RDGM`, subtype 4), 24 bytes:
///
/// ```text
///  0: V=2 P=0 subtype=4 | PT=204 | length=5
///  4: sender SSRC
///  8: "RDGM"
/// 12: version (1) | state (0 normal, 1 overuse, 2 underuse) | 0 | 0
/// 16: received rate, kbit/s (u32): media with a send time, last window
/// 20: modified trend × 1000 (i32, saturating)
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayReport {
    /// What the downstream's delay detector concluded.
    pub state: DelayState,
    /// What the downstream received of the upstream's timed media, bit/s,
    /// over its last complete rate window (0: not measured yet).
    pub received_bps: u64,
    /// The detector's modified trend (for metrics).
    pub trend: f64,
}

/// Appends one delay report.
pub fn write_delay_report(out: &mut Vec<u8>, sender_ssrc: u32, r: &DelayReport) {
    out.push(0x80 | APP_DELAY);
    out.push(crate::packet::rtcp::PT_APP);
    out.extend_from_slice(&5u16.to_be_bytes());
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.extend_from_slice(&APP_NAME);
    out.extend_from_slice(&[WIRE_VERSION, r.state.code(), 0, 0]);
    let kbps = (r.received_bps / 1000).min(u64::from(u32::MAX)) as u32;
    out.extend_from_slice(&kbps.to_be_bytes());
    let trend = (r.trend * 1000.0).clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32;
    out.extend_from_slice(&trend.to_be_bytes());
}

/// True for a mesh APP packet of the delay-report subtype (cheap).
pub fn is_delay_report(rtcp: &[u8]) -> bool {
    is_mesh_app(rtcp) && rtcp[0] & 0x1f == APP_DELAY
}

/// Decodes one delay report (the first RTCP packet of `rtcp`).
pub fn parse_delay_report(rtcp: &[u8]) -> Result<DelayReport, MeshWireError> {
    if !is_delay_report(rtcp) {
        return Err(MeshWireError::NotMesh);
    }
    let mut r = app_body(rtcp, 24)?;
    let state = match r.u8()? {
        0 => DelayState::Normal,
        1 => DelayState::Overuse,
        2 => DelayState::Underuse,
        _ => return Err(MeshWireError::Field("delay state")),
    };
    r.take(2)?;
    let kbps = r.u32()?;
    let trend = r.u32()? as i32;
    Ok(DelayReport {
        state,
        received_bps: u64::from(kbps) * 1000,
        trend: f64::from(trend) / 1000.0,
    })
}

// ----- delay-gradient detection -------------------------------------------------------

/// abs-send-time units (6.18 fixed-point seconds) per second.
pub const SEND_TIME_UNITS: u64 = 1 << 18;
/// The 24-bit abs-send-time of `elapsed` (it wraps every 64 s).
pub fn abs_send_time(elapsed: Duration) -> u32 {
    ((elapsed.as_nanos() * u128::from(SEND_TIME_UNITS) / 1_000_000_000) & 0xff_ffff) as u32
}

/// `a - b` of two 24-bit send times, in ms (wrapping; within ±32 s).
fn send_delta_ms(a: u32, b: u32) -> f64 {
    let d = (a.wrapping_sub(b) << 8) as i32 >> 8;
    f64::from(d) * 1000.0 / SEND_TIME_UNITS as f64
}

/// Packets sent within this long of a group's first are one group (a
/// burst: a frame's packets).
const DELAY_BURST_MS: f64 = 5.0;
/// Groups the trendline's least-squares slope is fitted over.
const TREND_WINDOW: usize = 20;
const TREND_SMOOTHING: f64 = 0.9;
const TREND_GAIN: f64 = 4.0;
/// The adaptive threshold: start, bounds, and how fast it follows the
/// trend up and down (GCC §5.4).
const THRESHOLD_START: f64 = 12.5;
const THRESHOLD_MIN: f64 = 6.0;
const THRESHOLD_MAX: f64 = 600.0;
const THRESHOLD_K_UP: f64 = 0.0087;
const THRESHOLD_K_DOWN: f64 = 0.039;
/// The trend must stay above the threshold this long to be over-use.
const OVERUSE_TIME_MS: f64 = 10.0;
/// A gap in arrivals longer than this starts the detector afresh.
const DELAY_GAP: Duration = Duration::from_secs(2);
/// Window of the received rate the reports carry: the last complete one,
/// or the current one once it is [`RATE_WINDOW_MIN`] long if that is
/// higher (a queue that builds up passes the bottleneck's rate at once,
/// while the window before may hold less: a layer just resumed).
const RATE_WINDOW: Duration = Duration::from_millis(250);
const RATE_WINDOW_MIN: Duration = Duration::from_millis(100);
/// A report goes at least this often while media arrives (and at once on a
/// change of state).
pub const DELAY_REPORT_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
struct SendGroup {
    first_send: u32,
    last_send: u32,
    last_arrival: Instant,
}

/// The delay-based half of GCC (draft-ietf-rmcat-gcc §5) for what one
/// upstream sends on a link: packets are grouped by send time (bursts of
/// 5 ms), each group's delay variation against the previous one (arrival
/// gap minus send gap) is accumulated and smoothed, a least-squares slope
/// over the last 20 groups is the trend, and a trend above an adaptive
/// threshold for 10 ms (and still rising) is over-use. Also measures the
/// received rate the reports carry. Sans-IO and of fixed size: nothing
/// allocates per packet. Packets whose send time is older than the current
/// group's (retransmissions, reordering) are left out.
#[derive(Debug, Clone)]
pub struct DelayDetector {
    current: Option<SendGroup>,
    previous: Option<SendGroup>,
    first_arrival: Option<Instant>,
    /// (arrival ms since the first, smoothed accumulated delay ms).
    ring: [(f64, f64); TREND_WINDOW],
    ring_len: usize,
    ring_head: usize,
    accumulated: f64,
    smoothed: f64,
    deltas: u32,
    trend: f64,
    modified: f64,
    prev_trend: f64,
    threshold: f64,
    threshold_at: Option<Instant>,
    /// ms the trend stayed above the threshold (`None`: it is not).
    over_ms: Option<f64>,
    over_count: u32,
    state: DelayState,
    rate_start: Option<Instant>,
    rate_bytes: u64,
    received_bps: u64,
    last_packet: Option<Instant>,
    reported: Option<(Instant, DelayState)>,
}

impl Default for DelayDetector {
    fn default() -> Self {
        DelayDetector {
            current: None,
            previous: None,
            first_arrival: None,
            ring: [(0.0, 0.0); TREND_WINDOW],
            ring_len: 0,
            ring_head: 0,
            accumulated: 0.0,
            smoothed: 0.0,
            deltas: 0,
            trend: 0.0,
            modified: 0.0,
            prev_trend: 0.0,
            threshold: THRESHOLD_START,
            threshold_at: None,
            over_ms: None,
            over_count: 0,
            state: DelayState::Normal,
            rate_start: None,
            rate_bytes: 0,
            received_bps: 0,
            last_packet: None,
            reported: None,
        }
    }
}

impl DelayDetector {
    /// The detector's current conclusion.
    pub fn state(&self) -> DelayState {
        self.state
    }

    /// The modified trend (slope × min(groups, 60) × gain) the threshold
    /// is compared with.
    pub fn modified_trend(&self) -> f64 {
        self.modified
    }

    /// The received rate of the last complete window, bit/s.
    pub fn received_bps(&self) -> u64 {
        self.received_bps
    }

    /// Records a media packet of `bytes` that arrived at `now` with the
    /// 24-bit abs-send-time `send_time`.
    pub fn on_packet(&mut self, now: Instant, send_time: u32, bytes: usize) {
        // The received rate.
        let start = *self.rate_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            self.received_bps = (self.rate_bytes * 8 * 1_000_000) / elapsed.as_micros() as u64;
            self.rate_start = Some(now);
            self.rate_bytes = 0;
        }
        self.rate_bytes += bytes as u64;
        if self
            .last_packet
            .is_some_and(|t| now.saturating_duration_since(t) > DELAY_GAP)
        {
            self.restart();
        }
        self.last_packet = Some(now);
        let Some(cur) = &mut self.current else {
            self.current = Some(SendGroup {
                first_send: send_time,
                last_send: send_time,
                last_arrival: now,
            });
            return;
        };
        let since_first = send_delta_ms(send_time, cur.first_send);
        if since_first < 0.0 {
            // Sent before the current group: a retransmission or reordered.
            return;
        }
        if since_first <= DELAY_BURST_MS {
            if send_delta_ms(send_time, cur.last_send) > 0.0 {
                cur.last_send = send_time;
            }
            cur.last_arrival = now;
            return;
        }
        let done = *cur;
        self.current = Some(SendGroup {
            first_send: send_time,
            last_send: send_time,
            last_arrival: now,
        });
        if let Some(prev) = self.previous.replace(done) {
            let send_ms = send_delta_ms(done.last_send, prev.last_send);
            let arrival_ms = done
                .last_arrival
                .saturating_duration_since(prev.last_arrival)
                .as_secs_f64()
                * 1000.0;
            self.update(done.last_arrival, arrival_ms - send_ms, send_ms);
        }
    }

    fn restart(&mut self) {
        let keep = (self.rate_start, self.rate_bytes, self.received_bps);
        let reported = self.reported;
        *self = DelayDetector::default();
        (self.rate_start, self.rate_bytes, self.received_bps) = keep;
        self.reported = reported;
    }

    /// The trendline filter and over-use detector, once per group.
    fn update(&mut self, arrival: Instant, delay_ms: f64, send_ms: f64) {
        self.deltas = (self.deltas + 1).min(1000);
        let first = *self.first_arrival.get_or_insert(arrival);
        self.accumulated += delay_ms;
        self.smoothed =
            TREND_SMOOTHING * self.smoothed + (1.0 - TREND_SMOOTHING) * self.accumulated;
        let x = arrival.saturating_duration_since(first).as_secs_f64() * 1000.0;
        self.ring[self.ring_head] = (x, self.smoothed);
        self.ring_head = (self.ring_head + 1) % TREND_WINDOW;
        self.ring_len = (self.ring_len + 1).min(TREND_WINDOW);
        if self.ring_len == TREND_WINDOW
            && let Some(slope) = slope(&self.ring)
        {
            self.trend = slope;
        }
        self.detect(arrival, send_ms);
    }

    fn detect(&mut self, now: Instant, send_ms: f64) {
        if self.deltas < 2 {
            self.state = DelayState::Normal;
            return;
        }
        let modified = f64::from(self.deltas.min(60)) * self.trend * TREND_GAIN;
        self.modified = modified;
        if modified > self.threshold {
            let over = match self.over_ms {
                None => send_ms / 2.0,
                Some(t) => t + send_ms,
            };
            self.over_ms = Some(over);
            self.over_count += 1;
            if over > OVERUSE_TIME_MS && self.over_count > 1 && self.trend >= self.prev_trend {
                self.over_ms = Some(0.0);
                self.over_count = 0;
                self.state = DelayState::Overuse;
            }
        } else {
            self.over_ms = None;
            self.over_count = 0;
            self.state = if modified < -self.threshold {
                DelayState::Underuse
            } else {
                DelayState::Normal
            };
        }
        self.prev_trend = self.trend;
        // The adaptive threshold: it follows |trend| slowly up, faster
        // down, and ignores outliers.
        let at = *self.threshold_at.get_or_insert(now);
        let m = modified.abs();
        if m > self.threshold + 15.0 {
            self.threshold_at = Some(now);
            return;
        }
        let k = if m < self.threshold {
            THRESHOLD_K_DOWN
        } else {
            THRESHOLD_K_UP
        };
        let dt = now.saturating_duration_since(at).as_secs_f64().min(0.1) * 1000.0;
        self.threshold =
            (self.threshold + k * (m - self.threshold) * dt).clamp(THRESHOLD_MIN, THRESHOLD_MAX);
        self.threshold_at = Some(now);
    }

    /// A report to send now, if one is due: the state changed since the
    /// last, or [`DELAY_REPORT_INTERVAL`] passed while media arrived.
    pub fn report_due(&mut self, now: Instant) -> Option<DelayReport> {
        let due = match self.reported {
            None => self.received_bps > 0,
            Some((at, state)) => {
                state != self.state
                    || (now.saturating_duration_since(at) >= DELAY_REPORT_INTERVAL
                        && self.last_packet.is_some_and(|t| t > at))
            }
        };
        if !due {
            return None;
        }
        self.reported = Some((now, self.state));
        let current = self
            .rate_start
            .map(|t| now.saturating_duration_since(t))
            .filter(|d| *d >= RATE_WINDOW_MIN)
            .map_or(0, |d| {
                (self.rate_bytes * 8 * 1_000_000) / d.as_micros() as u64
            });
        Some(DelayReport {
            state: self.state,
            received_bps: self.received_bps.max(current),
            trend: self.modified,
        })
    }
}

/// Least-squares slope of the points of `ring` (order does not matter).
fn slope(ring: &[(f64, f64)]) -> Option<f64> {
    let n = ring.len() as f64;
    let (sx, sy) = ring
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = ring.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den != 0.0).then(|| num / den)
}

// ----- loss tracking -----------------------------------------------------------------

/// Most sequence numbers one stream waits for at once; a longer outage is
/// not repaired packet by packet.
const MAX_MISSING: usize = 256;
/// NACK attempts per missing packet.
pub const NACK_ATTEMPTS: u8 = 10;
const NACK_RETRY_MIN: Duration = Duration::from_millis(10);
const NACK_RETRY_MAX: Duration = Duration::from_millis(300);
/// A missing packet older than this is given up (the upstream's
/// retransmission buffer would not have it either).
const NACK_GIVE_UP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Missing {
    seq: u16,
    first_sent: Option<Instant>,
    next: Instant,
    attempts: u8,
    detected: Instant,
}

/// What became of a received packet's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// In order (possibly after a gap, now being NACKed).
    New,
    /// A packet we were missing (a retransmission or a late one).
    Recovered,
    /// Older than anything we wait for: a duplicate or very late.
    Stale,
}

/// Receive-side state of one link stream: the highest sequence number and
/// the packets missing below it, each NACKed until it arrives or
/// [`NACK_ATTEMPTS`] run out. Fixed capacity: nothing allocates per packet.
#[derive(Debug)]
pub struct LossTracker {
    highest: Option<u16>,
    missing: Vec<Missing>,
    /// Smoothed NACK round trip (first attempts only, as Karn's rule).
    srtt: Option<Duration>,
    /// How long a newly missing packet waits before its first NACK: a
    /// repair packet (FEC) may rebuild it first.
    hold: Duration,
    /// NACKed packets that arrived.
    pub recovered: u64,
    /// Packets given up on after the last NACK attempt.
    pub unrecovered: u64,
    /// Packets found missing.
    pub lost: u64,
    /// Missing packets rebuilt from FEC or RED.
    pub repaired: u64,
}

impl Default for LossTracker {
    fn default() -> Self {
        LossTracker {
            highest: None,
            missing: Vec::with_capacity(MAX_MISSING),
            srtt: None,
            hold: Duration::ZERO,
            recovered: 0,
            unrecovered: 0,
            lost: 0,
            repaired: 0,
        }
    }
}

impl LossTracker {
    /// Forgets the stream (its source changed).
    pub fn reset(&mut self) {
        self.highest = None;
        self.unrecovered += self.missing.len() as u64;
        self.missing.clear();
    }

    /// The smoothed NACK round trip, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Moves the highest sequence number on to `seq` without counting the
    /// numbers in between as lost: someone else (a kernel fast path)
    /// received and forwarded them. Nothing happens when `seq` is not
    /// ahead.
    pub fn skip_to(&mut self, seq: u16) {
        match self.highest {
            Some(h) if seq.wrapping_sub(h) == 0 || seq.wrapping_sub(h) >= 0x8000 => {}
            _ => self.highest = Some(seq),
        }
    }

    fn retry_interval(&self) -> Duration {
        match self.srtt {
            Some(rtt) => {
                (rtt + rtt / 2 + Duration::from_millis(5)).clamp(NACK_RETRY_MIN, NACK_RETRY_MAX)
            }
            None => Duration::from_millis(20),
        }
    }

    /// Sets how long newly missing packets wait for their first NACK
    /// (zero: NACKed at once).
    pub fn set_hold(&mut self, hold: Duration) {
        self.hold = hold;
    }

    /// Whether `seq` is missing (waiting for a NACK or its answer).
    pub fn is_missing(&self, seq: u16) -> bool {
        self.missing.iter().any(|m| m.seq == seq)
    }

    /// Ends the hold of missing packets up to `last` that were not NACKed
    /// yet: the repair packet that could have rebuilt them came and could
    /// not.
    pub fn release_through(&mut self, now: Instant, last: u16) {
        for m in self.missing.iter_mut() {
            if m.attempts == 0 && last.wrapping_sub(m.seq) < 0x8000 && m.next > now {
                m.next = now;
            }
        }
    }

    /// Records a sequence number rebuilt from FEC or RED: like an arrival,
    /// but it is no NACK round trip and not counted as recovered.
    pub fn on_repaired(&mut self, now: Instant, seq: u16) -> Arrival {
        match self.missing.iter().position(|m| m.seq == seq) {
            Some(i) => {
                self.missing.remove(i);
                self.repaired += 1;
                Arrival::Recovered
            }
            None => {
                let a = self.on_packet(now, seq);
                if a == Arrival::New {
                    // Rebuilt before anything after it arrived.
                    self.lost += 1;
                    self.repaired += 1;
                }
                a
            }
        }
    }

    /// Records a received sequence number.
    pub fn on_packet(&mut self, now: Instant, seq: u16) -> Arrival {
        let Some(h) = self.highest else {
            self.highest = Some(seq);
            return Arrival::New;
        };
        let ahead = seq.wrapping_sub(h);
        if ahead == 0 {
            return Arrival::Stale;
        }
        if ahead < 0x8000 {
            self.highest = Some(seq);
            let gap = ahead - 1;
            if gap > 0 {
                self.lost += u64::from(gap);
                if usize::from(gap) > MAX_MISSING {
                    // An outage, not loss: start over from here.
                    self.unrecovered += self.missing.len() as u64 + u64::from(gap);
                    self.missing.clear();
                } else {
                    let free = MAX_MISSING - self.missing.len();
                    let overflow = usize::from(gap).saturating_sub(free);
                    if overflow > 0 {
                        self.unrecovered += overflow as u64;
                        self.missing.drain(..overflow.min(self.missing.len()));
                    }
                    for i in 1..=gap {
                        if self.missing.len() < MAX_MISSING {
                            self.missing.push(Missing {
                                seq: h.wrapping_add(i),
                                first_sent: None,
                                next: now + self.hold,
                                attempts: 0,
                                detected: now,
                            });
                        }
                    }
                }
            }
            return Arrival::New;
        }
        // Behind the highest: one we wait for?
        match self.missing.iter().position(|m| m.seq == seq) {
            Some(i) => {
                let m = self.missing.remove(i);
                self.recovered += 1;
                if m.attempts == 1
                    && let Some(sent) = m.first_sent
                {
                    let sample = now.saturating_duration_since(sent);
                    self.srtt = Some(match self.srtt {
                        Some(s) => (s * 7 + sample) / 8,
                        None => sample,
                    });
                }
                Arrival::Recovered
            }
            None => Arrival::Stale,
        }
    }

    /// The earliest instant a NACK is due, if any packet is missing.
    pub fn next_due(&self) -> Option<Instant> {
        self.missing.iter().map(|m| m.next).min()
    }

    /// Collects the sequence numbers due for a NACK now (at most
    /// `out.len()`), advancing their schedules; gives up on exhausted or
    /// too old ones. Returns how many were written.
    pub fn due(&mut self, now: Instant, out: &mut [u16]) -> usize {
        let retry = self.retry_interval();
        let before = self.missing.len();
        self.missing.retain(|m| {
            m.attempts < NACK_ATTEMPTS && now.saturating_duration_since(m.detected) < NACK_GIVE_UP
        });
        self.unrecovered += (before - self.missing.len()) as u64;
        let mut n = 0;
        for m in self.missing.iter_mut() {
            if n == out.len() {
                break;
            }
            if m.next <= now {
                out[n] = m.seq;
                n += 1;
                m.attempts += 1;
                m.first_sent.get_or_insert(now);
                m.next = now + retry;
            }
        }
        n
    }

    /// How many packets are missing now.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }
}

// ----- link capacity ------------------------------------------------------------------

/// Window over which a link's loss is judged.
const CAPACITY_WINDOW: Duration = Duration::from_secs(1);
/// Loss above this lowers the link's budget; below [`LOSS_LOW`] raises it
/// (the loss-based half of GCC, RFC draft-ietf-rmcat-gcc §6).
const LOSS_HIGH: f64 = 0.10;
/// Audio packets (first sends) a link's RED depth is decided on.
const RED_WINDOW_PACKETS: u64 = 200;
const LOSS_LOW: f64 = 0.02;

/// Over-use lowers the budget to this fraction of the received rate.
const DELAY_BACKOFF: f64 = 0.85;
/// At most one delay-based decrease this often (GCC's response time: the
/// decrease must reach the queue before it is judged again).
const DELAY_DECREASE_INTERVAL: Duration = Duration::from_millis(500);

/// A send budget for one mesh link, the two halves of GCC:
///
/// - loss-based: the downstream's NACKs say how much of what we send is
///   lost; above 10% the budget drops to 85% of what the link carried;
/// - delay-based: the downstream's [`DelayReport`]s say whether the link
///   queues; on over-use the budget drops to 85% of the rate the
///   downstream received (at most once per 500 ms).
///
/// In a window with less than 2% loss and neither over-use nor under-use
/// reported, it grows 8% until it no longer binds: twice what the link
/// carries and, after a delay-based decrease, twice what the bottleneck
/// passed then. Layers that do not fit
/// the budget are not sent on the link (the lowest wanted layer always
/// is), so each link carries the simulcast layers its capacity allows. A
/// peer that sends no delay reports (no send times on its links) leaves
/// the budget loss-based.
#[derive(Debug, Default, Clone)]
pub struct LinkCapacity {
    window_start: Option<Instant>,
    sent_bytes: u64,
    sent_packets: u64,
    nacked: u64,
    cap_bps: Option<u64>,
    /// Loss fraction of the last complete window.
    pub last_loss: f64,
    /// FEC repair packets sent this window (counted in `sent_packets`).
    repairs: u64,
    /// The FEC group size in use; 0 before the first window with loss.
    fec_group: usize,
    /// The media loss before FEC the last window suggests: `last_loss`
    /// where no FEC was sent, else inferred from what FEC left to NACK.
    pub fec_loss: f64,
    /// Audio packets sent this window (first sends), those sent as RED,
    /// and audio packets NACKed.
    audio_sent: u64,
    red_sent: u64,
    audio_nacked: u64,
    /// Redundant blocks per RED packet; 0 before the first window with
    /// audio.
    red_depth: usize,
    /// The audio loss before RED the last audio window suggests.
    pub red_loss: f64,
    /// The highest loss before FEC video suggested meanwhile (links with
    /// both: the same path, with many more packets).
    video_loss: f64,
    /// The state the downstream last reported.
    pub delay_state: DelayState,
    /// Over-use or under-use was reported this window: no growth.
    delay_hold: bool,
    last_decrease: Option<Instant>,
    /// The received rate at the last delay-based decrease: what the
    /// bottleneck passed. The budget binds until it is well above it.
    delay_limit: Option<u64>,
}

impl LinkCapacity {
    /// Counts a packet of `bytes` sent on the link.
    pub fn on_sent(&mut self, bytes: usize) {
        self.sent_bytes += bytes as u64;
        self.sent_packets += 1;
    }

    /// Counts `packets` NACKed by the downstream.
    pub fn on_nacked(&mut self, packets: u64) {
        self.nacked += packets;
    }

    /// An FEC repair packet went out (after its [`on_sent`](Self::on_sent)).
    pub fn on_repair_sent(&mut self) {
        self.repairs += 1;
    }

    /// An audio packet went out for the first time (after its
    /// [`on_sent`](Self::on_sent)), `red` with redundant blocks.
    pub fn on_audio_sent(&mut self, red: bool) {
        self.audio_sent += 1;
        self.red_sent += u64::from(red);
    }

    /// An audio packet was NACKed (after [`on_nacked`](Self::on_nacked)).
    pub fn on_audio_nacked(&mut self) {
        self.audio_nacked += 1;
    }

    /// Redundant blocks per RED packet for the link's audio: 2 while the
    /// audio loss before RED is 10 % or more (back to 1 below 8 %), else
    /// 1.
    pub fn red_depth(&self) -> usize {
        self.red_depth.max(1)
    }

    /// The FEC group size for the link's video: from the loss before FEC
    /// of the last window ([`crate::fec::group_size_for_loss`]),
    /// [`crate::fec::GROUP_SIZE`] until one is measured.
    pub fn fec_group(&self) -> usize {
        match self.fec_group {
            0 => crate::fec::GROUP_SIZE,
            n => n,
        }
    }

    /// The current budget; `None`: unlimited.
    pub fn cap_bps(&self) -> Option<u64> {
        self.cap_bps
    }

    /// Takes the downstream's delay report. Returns true if the budget
    /// changed.
    pub fn on_delay_report(&mut self, now: Instant, report: &DelayReport) -> bool {
        self.delay_state = report.state;
        match report.state {
            DelayState::Normal => false,
            DelayState::Underuse => {
                self.delay_hold = true;
                false
            }
            DelayState::Overuse => {
                self.delay_hold = true;
                if self
                    .last_decrease
                    .is_some_and(|t| now.saturating_duration_since(t) < DELAY_DECREASE_INTERVAL)
                {
                    return false;
                }
                // The received rate; what we sent this window if the
                // downstream has not measured one yet.
                let rate = match report.received_bps {
                    0 => {
                        let elapsed = self
                            .window_start
                            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
                        if elapsed < Duration::from_millis(100) {
                            return false;
                        }
                        ((self.sent_bytes * 8) as f64 / elapsed.as_secs_f64()) as u64
                    }
                    r => r,
                };
                let lowered = (rate as f64 * DELAY_BACKOFF) as u64;
                let before = self.cap_bps;
                self.cap_bps = Some(self.cap_bps.map_or(lowered, |c| c.min(lowered)));
                self.last_decrease = Some(now);
                self.delay_limit = Some(rate);
                before != self.cap_bps
            }
        }
    }

    /// Closes a window when one has passed. Returns true if the budget
    /// changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed < CAPACITY_WINDOW {
            return false;
        }
        let rate = (self.sent_bytes * 8) as f64 / elapsed.as_secs_f64();
        let before = self.cap_bps;
        if self.sent_packets >= 20 {
            // A NACKed packet may be asked for more than once: count at
            // most what was sent.
            let loss = self.nacked.min(self.sent_packets) as f64 / self.sent_packets as f64;
            self.last_loss = loss;
            // The downstream NACKs only what FEC could not rebuild: with
            // repair packets sent, infer the loss before FEC from the
            // share of media packets NACKed and the group size in use.
            let media = self.sent_packets.saturating_sub(self.repairs);
            self.fec_loss = if self.repairs > 0 && media > 0 {
                let residual = (self.nacked.min(media) as f64 / media as f64).min(1.0);
                crate::fec::loss_before_fec(residual, self.fec_group())
            } else {
                loss
            };
            self.fec_group = crate::fec::group_size_for_loss(self.fec_loss, self.fec_group());
            if self.repairs > 0 {
                self.video_loss = self.video_loss.max(self.fec_loss);
            }
            if loss > LOSS_HIGH {
                let lowered = (rate * 0.85) as u64;
                self.cap_bps = Some(self.cap_bps.map_or(lowered, |c| c.min(lowered)));
            } else if loss < LOSS_LOW
                && !self.delay_hold
                && let Some(c) = self.cap_bps
            {
                let raised = (c as f64 * 1.08) as u64 + 8_000;
                // Unlimited again once the budget is well above the load
                // and, after a delay-based decrease, above what the
                // bottleneck passed (the load is low because of the
                // budget: layers that do not fit are not sent).
                let floor = (rate * 2.0) as u64;
                let floor = self.delay_limit.map_or(floor, |d| floor.max(d * 2));
                self.cap_bps = (raised < floor).then_some(raised);
                if self.cap_bps.is_none() {
                    self.delay_limit = None;
                }
            }
        }
        if self.audio_sent >= RED_WINDOW_PACKETS {
            // With `d` blocks a packet is NACKed only when it and the `d`
            // after it are all lost (the next packet to arrive carries
            // it): about p^(d + 1) of the audio packets. Few audio packets
            // are NACKed, so the window is longer than a second (4 s of
            // one stream); video's estimate, when there is one, counts too.
            let residual = self.audio_nacked.min(self.audio_sent) as f64 / self.audio_sent as f64;
            let audio = if self.red_sent * 2 >= self.audio_sent {
                residual.powf(1.0 / (self.red_depth() as f64 + 1.0))
            } else {
                residual
            };
            self.red_loss = audio.max(self.video_loss);
            self.red_depth = if self.red_loss >= crate::red::DEPTH_LOSS {
                crate::red::MAX_DEPTH
            } else if self.red_loss < crate::red::DEPTH_LOSS_OFF {
                1
            } else {
                self.red_depth()
            };
            self.audio_sent = 0;
            self.red_sent = 0;
            self.audio_nacked = 0;
            self.video_loss = 0.0;
        }
        self.window_start = Some(now);
        self.sent_bytes = 0;
        self.sent_packets = 0;
        self.nacked = 0;
        self.repairs = 0;
        // Reports come every 250 ms while media flows: a state that holds
        // is reported again within the next window.
        self.delay_hold = false;
        before != self.cap_bps
    }
}

/// Which layers of a track a link may carry: `wanted[i]` says the
/// downstream wants layer `i`, `bps[i]` is its bitrate. The lowest wanted
/// layer always fits; higher ones are added, lowest first, while the sum
/// stays within `cap_bps`.
pub fn layers_within(bps: &[u64], wanted: &[bool], cap_bps: Option<u64>) -> Vec<bool> {
    let mut order: Vec<usize> = (0..bps.len())
        .filter(|&i| wanted.get(i) == Some(&true))
        .collect();
    order.sort_by_key(|&i| bps[i]);
    let mut allowed = vec![false; bps.len()];
    let mut sum = 0u64;
    for (k, i) in order.into_iter().enumerate() {
        sum += bps[i];
        if k == 0 || cap_bps.is_none_or(|c| sum <= c) {
            allowed[i] = true;
        } else {
            break;
        }
    }
    allowed
}

/// Keys the core uses for a remote track: room, source node and the
/// track's id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct OriginKey {
    pub room: String,
    pub source: String,
    pub track: u64,
}

/// Where a remote track's layer comes from on its current upstream link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InboundRef {
    pub track: TrackId,
    pub layer: usize,
}

/// Identity of a remote participant, for events and the room API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RemoteParticipantKey {
    pub room: String,
    pub source: String,
    pub participant: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: MeshMessage) {
        let mut out = Vec::new();
        write_message(&mut out, 0x1234, &m);
        assert_eq!(out.len() % 4, 0);
        assert!(is_mesh_app(&out));
        assert_eq!(parse_message(&out).unwrap(), m);
        // Every truncation fails cleanly.
        for n in 0..out.len() {
            let _ = parse_message(&out[..n]);
        }
        // The core's RTCP walker sees one valid packet.
        let items: Vec<_> = crate::packet::rtcp::iter(&out).collect();
        assert_eq!(items.len(), 1);
        assert!(items[0].is_ok());
    }

    #[test]
    fn messages_round_trip() {
        roundtrip(MeshMessage::Unsubscribe {
            room: "demo".into(),
            source: "n-a".into(),
        });
        roundtrip(MeshMessage::Subscribe {
            room: "demo".into(),
            source: "n-a".into(),
            paused: vec![1, 2, 0xffff_ffff],
        });
        roundtrip(MeshMessage::Announce {
            room: "demo".into(),
            source: "n-a".into(),
            tracks: vec![
                AnnouncedTrack {
                    origin_track: 7,
                    origin_participant: 9,
                    identity: "alice".into(),
                    kind: TrackKind::Video,
                    codec: 2,
                    layers: vec![
                        AnnouncedLayer {
                            rid: Some("q".into()),
                            ssrc: 11,
                            kbps: 150,
                            available: true,
                        },
                        AnnouncedLayer {
                            rid: Some("f".into()),
                            ssrc: 12,
                            kbps: 2500,
                            available: false,
                        },
                    ],
                },
                AnnouncedTrack {
                    origin_track: 8,
                    origin_participant: 9,
                    identity: "alice".into(),
                    kind: TrackKind::Audio,
                    codec: 1,
                    layers: vec![AnnouncedLayer {
                        rid: None,
                        ssrc: 13,
                        kbps: 32,
                        available: true,
                    }],
                },
            ],
        });
    }

    #[test]
    fn random_input_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut buf = vec![0x81, 204, 0, 0, 0, 0, 0, 0, b'R', b'D', b'G', b'M'];
            let n = (x % 64) as usize;
            for _ in 0..n {
                buf.push(crate::sfu::xorshift(&mut x) as u8);
            }
            buf[3] = (x % 20) as u8;
            buf[0] = 0x80 | ((x >> 8) as u8 % 4);
            let _ = parse_message(&buf);
        }
    }

    #[test]
    fn loss_tracker_nacks_until_recovered_and_measures_rtt() {
        let t0 = Instant::now();
        let mut l = LossTracker::default();
        assert_eq!(l.on_packet(t0, 10), Arrival::New);
        assert_eq!(l.on_packet(t0, 13), Arrival::New);
        let mut out = [0u16; 16];
        assert_eq!(l.due(t0, &mut out), 2);
        assert_eq!(&out[..2], &[11, 12]);
        assert_eq!(
            l.due(t0, &mut out),
            0,
            "not again before the retry interval"
        );
        let t1 = t0 + Duration::from_millis(4);
        assert_eq!(l.on_packet(t1, 11), Arrival::Recovered);
        assert_eq!(l.srtt(), Some(Duration::from_millis(4)));
        assert_eq!(l.on_packet(t1, 11), Arrival::Stale);
        // 12 is asked again after the retry interval, up to the attempt limit.
        let mut t = t1;
        let mut asked = 1;
        for _ in 0..100 {
            t += Duration::from_millis(20);
            asked += l.due(t, &mut out);
        }
        assert_eq!(asked, usize::from(NACK_ATTEMPTS));
        assert_eq!(l.missing(), 0);
        assert_eq!((l.recovered, l.unrecovered, l.lost), (1, 1, 2));
    }

    #[test]
    fn loss_tracker_holds_nacks_for_fec_and_forgets_repaired_packets() {
        let t0 = Instant::now();
        let mut l = LossTracker::default();
        l.set_hold(Duration::from_millis(30));
        l.on_packet(t0, 10);
        l.on_packet(t0, 14); // 11, 12, 13 missing
        let mut out = [0u16; 16];
        assert_eq!(l.due(t0, &mut out), 0, "held for a repair packet");
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(30)));
        // FEC rebuilt 11: never NACKed, not counted as a NACK recovery.
        assert_eq!(l.on_repaired(t0, 11), Arrival::Recovered);
        assert!(!l.is_missing(11));
        // The repair packet covering up to 12 could not rebuild 12: NACK it
        // now; 13 stays held.
        l.release_through(t0, 12);
        assert_eq!(l.due(t0, &mut out), 1);
        assert_eq!(out[0], 12);
        // 13 after the hold (and 12 again after the retry interval).
        assert_eq!(l.due(t0 + Duration::from_millis(30), &mut out), 2);
        assert!(out[..2].contains(&13));
        assert_eq!((l.recovered, l.repaired, l.lost), (0, 1, 3));
        assert!(l.srtt().is_none());
        // A packet rebuilt ahead of everything counts as lost and repaired.
        assert_eq!(l.on_repaired(t0, 15), Arrival::New);
        assert_eq!((l.repaired, l.lost), (2, 4));
    }

    /// The FEC group and RED depth follow the loss before FEC/RED that
    /// the sender infers from what the downstream still NACKs.
    #[test]
    fn fec_group_and_red_depth_follow_the_inferred_loss() {
        let t0 = Instant::now();
        let mut c = LinkCapacity::default();
        c.tick(t0);
        assert_eq!((c.fec_group(), c.red_depth()), (crate::fec::GROUP_SIZE, 1));
        // One window at loss `p`: 400 video packets, a repair per group,
        // and the share FEC leaves NACKed; 50 audio packets as RED, p^(d+1)
        // of them NACKed.
        let mut t = t0;
        let mut window = |c: &mut LinkCapacity, p: f64| {
            let group = c.fec_group() as u64;
            for i in 0..400 {
                c.on_sent(1000);
                if i % group == group - 1 {
                    c.on_sent(1000);
                    c.on_repair_sent();
                }
            }
            for _ in 0..50 {
                c.on_sent(100);
                c.on_audio_sent(true);
            }
            let video = (400.0 * crate::fec::residual_loss(p, c.fec_group())).round() as u64;
            let audio = (50.0 * p.powi(c.red_depth() as i32 + 1)).round() as u64;
            c.on_nacked(video + audio);
            for _ in 0..audio {
                c.on_audio_nacked();
            }
            t += Duration::from_secs(1);
            c.tick(t);
        };
        // 20 % loss: groups of 4 leave 11.8 %, which reads as 20 %: groups
        // of 2; the audio (4 % NACKed with one block) goes to two blocks
        // after its 4 s window.
        window(&mut c, 0.2);
        assert!((c.fec_loss - 0.2).abs() < 0.02, "{}", c.fec_loss);
        assert_eq!(c.fec_group(), 2);
        for _ in 0..3 {
            window(&mut c, 0.2);
            // Groups of 2 leave 7.2 %, read as 20 % again, not as a low
            // loss: no flapping back to 8.
            assert_eq!(c.fec_group(), 2, "{}", c.fec_loss);
        }
        assert_eq!(c.red_depth(), 2, "red loss {}", c.red_loss);
        // With two blocks hardly any audio is NACKed; video still says
        // 20 %: two blocks stay.
        for _ in 0..4 {
            window(&mut c, 0.2);
        }
        assert_eq!((c.fec_group(), c.red_depth()), (2, 2), "{}", c.red_loss);
        // Loss gone: groups of 8, one block (after an audio window).
        for _ in 0..4 {
            window(&mut c, 0.0);
        }
        assert_eq!((c.fec_group(), c.red_depth()), (8, 1));
    }

    #[test]
    fn link_capacity_backs_off_on_loss_and_recovers() {
        let t0 = Instant::now();
        let mut c = LinkCapacity::default();
        let mut t = t0;
        // 1 Mbit/s, no loss: no budget.
        for _ in 0..3 {
            for _ in 0..100 {
                c.on_sent(1250);
            }
            t += Duration::from_secs(1);
            c.tick(t);
        }
        assert_eq!(c.cap_bps(), None);
        // 30% NACKed: budget 85% of the rate.
        for _ in 0..100 {
            c.on_sent(1250);
        }
        c.on_nacked(30);
        t += Duration::from_secs(1);
        assert!(c.tick(t));
        let cap = c.cap_bps().expect("a budget");
        assert!((840_000..=860_000).contains(&cap), "{cap}");
        // Clean windows raise it until it no longer binds.
        let mut windows = 0;
        while c.cap_bps().is_some() && windows < 100 {
            for _ in 0..100 {
                c.on_sent(1250);
            }
            t += Duration::from_secs(1);
            c.tick(t);
            windows += 1;
        }
        assert!(c.cap_bps().is_none() && windows > 3, "{windows}");
    }

    /// Feeds a detector 30 frames a second of 3 packets (sent 1 ms apart)
    /// for `secs`, each arriving `delay(sent since start)` after it was
    /// sent. Returns the states seen, one per packet.
    fn run_detector(
        d: &mut DelayDetector,
        secs: u64,
        mut delay: impl FnMut(Duration) -> Duration,
    ) -> Vec<DelayState> {
        let t0 = Instant::now();
        let mut arrivals: Vec<(Instant, u32)> = Vec::new();
        for frame in 0..secs * 30 {
            for p in 0..3 {
                let sent = Duration::from_micros(frame * 33_333 + p * 1000);
                arrivals.push((t0 + sent + delay(sent), abs_send_time(sent)));
            }
        }
        // The network delivers in arrival order.
        arrivals.sort_by_key(|a| a.0);
        arrivals
            .into_iter()
            .map(|(at, send)| {
                d.on_packet(at, send, 1200);
                d.state()
            })
            .collect()
    }

    #[test]
    fn constant_delay_is_normal() {
        let mut d = DelayDetector::default();
        let states = run_detector(&mut d, 10, |_| Duration::from_millis(40));
        assert!(states.iter().all(|s| *s == DelayState::Normal));
        assert!(d.modified_trend().abs() < 1.0, "{}", d.modified_trend());
        // 3 × 1200 bytes × 30 a second.
        let bps = d.received_bps();
        assert!((800_000..=930_000).contains(&bps), "{bps}");
    }

    #[test]
    fn growing_delay_is_overuse() {
        let mut d = DelayDetector::default();
        // Constant first, then the queue grows 100 ms a second.
        let states = run_detector(&mut d, 4, |sent| {
            let over = sent.saturating_sub(Duration::from_secs(2));
            Duration::from_millis(40) + over / 10
        });
        let first_over = states.iter().position(|s| *s == DelayState::Overuse);
        let n = states.len();
        let at = first_over.expect("over-use detected");
        // Not before the queue grows, and within half a second of it.
        assert!(at > n / 2 && at < n / 2 + n / 8, "{at} of {n}");
        assert!(d.modified_trend() > 12.5);
    }

    #[test]
    fn shrinking_delay_is_underuse() {
        let mut d = DelayDetector::default();
        let states = run_detector(&mut d, 4, |sent| {
            Duration::from_millis(2000).saturating_sub(sent / 4)
        });
        assert!(states.contains(&DelayState::Underuse));
        assert!(!states.contains(&DelayState::Overuse));
    }

    #[test]
    fn jitter_without_a_trend_is_not_overuse() {
        let mut d = DelayDetector::default();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        // 20-40 ms, uniformly at random: reordered arrivals included.
        let states = run_detector(&mut d, 30, |_| {
            Duration::from_micros(20_000 + crate::sfu::xorshift(&mut x) % 20_000)
        });
        let over = states.iter().filter(|s| **s == DelayState::Overuse).count();
        assert_eq!(over, 0, "over-use on jitter alone");
    }

    #[test]
    fn retransmissions_and_gaps_do_not_disturb_the_detector() {
        let t0 = Instant::now();
        let mut d = DelayDetector::default();
        let delay = Duration::from_millis(30);
        let mut t = Duration::ZERO;
        for i in 0..200u64 {
            t = Duration::from_millis(i * 10);
            d.on_packet(t0 + t + delay, abs_send_time(t), 1000);
            // Now and then a retransmission of a packet sent 500 ms ago.
            if i % 7 == 0 && t > Duration::from_millis(500) {
                let old = t - Duration::from_millis(500);
                d.on_packet(t0 + t + delay, abs_send_time(old), 1000);
            }
        }
        assert_eq!(d.state(), DelayState::Normal);
        assert!(d.modified_trend().abs() < 1.0, "{}", d.modified_trend());
        // A pause of 5 s, then the delay is higher but constant: a restart,
        // not a gradient.
        let delay = Duration::from_millis(300);
        for i in 0..100u64 {
            let t = t + Duration::from_secs(5) + Duration::from_millis(i * 10);
            d.on_packet(t0 + t + delay, abs_send_time(t), 1000);
            assert_ne!(d.state(), DelayState::Overuse);
        }
    }

    #[test]
    fn send_time_deltas_wrap() {
        let a = abs_send_time(Duration::from_millis(63_990));
        let b = abs_send_time(Duration::from_millis(64_010));
        assert!(b < a, "wrapped");
        assert!((send_delta_ms(b, a) - 20.0).abs() < 0.01);
        assert!((send_delta_ms(a, b) + 20.0).abs() < 0.01);
    }

    #[test]
    fn reports_are_due_on_a_change_and_periodically() {
        let t0 = Instant::now();
        let mut d = DelayDetector::default();
        let mut reports = Vec::new();
        for i in 0..200u64 {
            let t = t0 + Duration::from_millis(i * 10);
            d.on_packet(t, abs_send_time(Duration::from_millis(i * 10)), 1000);
            if let Some(r) = d.report_due(t) {
                reports.push((t, r));
            }
        }
        // From the first rate window on, every 250 ms.
        assert!((6..=8).contains(&reports.len()), "{}", reports.len());
        assert_eq!(reports[0].0, t0 + RATE_WINDOW);
        assert!(reports.iter().all(|(_, r)| r.state == DelayState::Normal));
        assert!((790_000..=810_000).contains(&reports[1].1.received_bps));
        // Nothing arrived since the last report: none due.
        let late = t0 + Duration::from_secs(10);
        d.report_due(late);
        assert!(d.report_due(late + DELAY_REPORT_INTERVAL).is_none());
    }

    fn report(state: DelayState, received_bps: u64) -> DelayReport {
        DelayReport {
            state,
            received_bps,
            trend: 0.0,
        }
    }

    #[test]
    fn delay_reports_round_trip_and_malformed_ones_fail_cleanly() {
        let r = DelayReport {
            state: DelayState::Overuse,
            received_bps: 1_234_000,
            trend: -17.25,
        };
        let mut out = Vec::new();
        write_delay_report(&mut out, 0x1234, &r);
        assert_eq!(out.len(), 24);
        assert!(is_delay_report(&out) && is_mesh_app(&out));
        assert_eq!(parse_delay_report(&out), Ok(r));
        let items: Vec<_> = crate::packet::rtcp::iter(&out).collect();
        assert!(items.len() == 1 && items[0].is_ok());
        // Not a control message either.
        assert!(parse_message(&out).is_err());
        for n in 0..out.len() {
            assert!(parse_delay_report(&out[..n]).is_err(), "{n}");
        }
        let mut bad = out.clone();
        bad[13] = 3;
        assert_eq!(
            parse_delay_report(&bad),
            Err(MeshWireError::Field("delay state"))
        );
        let mut bad = out.clone();
        bad[12] = 9;
        assert_eq!(parse_delay_report(&bad), Err(MeshWireError::Version(9)));
        let mut bad = out.clone();
        bad[3] = 4; // too short a length
        assert_eq!(parse_delay_report(&bad), Err(MeshWireError::Truncated));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut buf = vec![0x84, 204, 0, 0, 0, 0, 0, 0, b'R', b'D', b'G', b'M'];
            for _ in 0..(x % 24) {
                buf.push(crate::sfu::xorshift(&mut x) as u8);
            }
            buf[3] = (x % 8) as u8;
            let _ = parse_delay_report(&buf);
        }
    }

    #[test]
    fn link_capacity_follows_delay_reports() {
        let t0 = Instant::now();
        let mut c = LinkCapacity::default();
        let mut t = t0;
        let window = |c: &mut LinkCapacity, t: &mut Instant| {
            for _ in 0..200 {
                c.on_sent(1250); // 2 Mbit/s
            }
            *t += Duration::from_secs(1);
            c.tick(*t)
        };
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), None, "normal reports or none: no budget");
        assert!(!c.on_delay_report(t, &report(DelayState::Normal, 2_000_000)));
        // Over-use: 85% of what the downstream receives.
        assert!(c.on_delay_report(t, &report(DelayState::Overuse, 1_000_000)));
        assert_eq!(c.cap_bps(), Some(850_000));
        // Not again within the response time, even lower.
        let soon = t + Duration::from_millis(200);
        assert!(!c.on_delay_report(soon, &report(DelayState::Overuse, 500_000)));
        let later = t + Duration::from_millis(600);
        assert!(c.on_delay_report(later, &report(DelayState::Overuse, 900_000)));
        assert_eq!(c.cap_bps(), Some(765_000));
        // A window with over-use or under-use reported does not grow.
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), Some(765_000));
        c.on_delay_report(t, &report(DelayState::Underuse, 900_000));
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), Some(765_000));
        // Normal windows grow it as after loss.
        c.on_delay_report(t, &report(DelayState::Normal, 900_000));
        window(&mut c, &mut t);
        assert_eq!(c.cap_bps(), Some(834_200));
        // With no rate measured yet, what was sent counts.
        let mut c = LinkCapacity::default();
        c.tick(t0);
        for _ in 0..100 {
            c.on_sent(1250);
        }
        let half = t0 + Duration::from_millis(500);
        assert!(c.on_delay_report(half, &report(DelayState::Overuse, 0)));
        assert_eq!(c.cap_bps(), Some(1_700_000));
    }

    #[test]
    fn layers_fit_the_budget_lowest_first() {
        let bps = [150_000, 2_500_000, 600_000];
        let all = [true, true, true];
        assert_eq!(layers_within(&bps, &all, None), [true, true, true]);
        assert_eq!(
            layers_within(&bps, &all, Some(800_000)),
            [true, false, true]
        );
        assert_eq!(
            layers_within(&bps, &all, Some(100_000)),
            [true, false, false]
        );
        // The lowest *wanted* layer always goes.
        assert_eq!(
            layers_within(&bps, &[false, true, false], Some(1)),
            [false, true, false]
        );
        assert_eq!(
            layers_within(&bps, &[false, false, false], None),
            [false, false, false]
        );
    }

    #[test]
    fn loss_tracker_handles_wrap_reorder_and_outages() {
        let t0 = Instant::now();
        let mut l = LossTracker::default();
        l.on_packet(t0, 65534);
        l.on_packet(t0, 1); // 65535 and 0 missing
        assert_eq!(l.missing(), 2);
        assert_eq!(l.on_packet(t0, 0), Arrival::Recovered);
        assert_eq!(l.on_packet(t0, 65535), Arrival::Recovered);
        l.on_packet(t0, 5000); // an outage: not NACKed packet by packet
        assert_eq!(l.missing(), 0);
        assert_eq!(l.on_packet(t0, 4000), Arrival::Stale);
    }
}
