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
//! streams it sends and what they carry) and `UNSUBSCRIBE` (downstream to
//! its previous upstream, once a new upstream delivers after a route
//! change).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ids::TrackId;
use crate::types::TrackKind;

/// How often a downstream node renews its subscription to a room, and an
/// upstream node announces what it sends.
pub const SUBSCRIBE_INTERVAL: Duration = Duration::from_millis(500);
/// A subscription or announced track not renewed for this long is dropped.
pub const MESH_STATE_TIMEOUT: Duration = Duration::from_millis(2500);
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
    pub room: String,
    pub source: String,
    pub upstream: Option<String>,
    pub downstream: Vec<String>,
}

/// Everything the core needs to take part in the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// This node's id (the scheduler's).
    pub node_id: String,
    pub links: Vec<MeshLinkSpec>,
    pub routes: Vec<MeshRouteSpec>,
}

/// Counters of one mesh link, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshLinkSnapshot {
    pub peer: String,
    pub trusted: bool,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Sequence numbers we asked the upstream to resend.
    pub nacks_sent: u64,
    /// Sequence numbers the downstream asked us to resend.
    pub nacks_received: u64,
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
    pub fec_received: u64,
    /// Missing packets rebuilt from a received repair packet.
    pub fec_recovered: u64,
    /// Audio packets sent with the previous one as a RED block.
    pub red_sent: u64,
    /// Missing audio packets rebuilt from a received RED block.
    pub red_recovered: u64,
    /// Smoothed NACK-to-retransmission round trip, when measured.
    pub rtt_us: Option<u64>,
    /// The link's loss-based send budget (`None`: unlimited).
    pub budget_bps: Option<u64>,
    /// Fraction of what we sent that the downstream NACKed, last window.
    pub loss: f64,
    /// Rooms this node sends on the link / receives from it.
    pub rooms_out: u64,
    pub rooms_in: u64,
}

// ----- wire format ---------------------------------------------------------------

/// Why a mesh control message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshWireError {
    #[error("mesh control message truncated")]
    Truncated,
    #[error("not a Ridge mesh APP packet")]
    NotMesh,
    #[error("unsupported mesh wire version {0}")]
    Version(u8),
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
    pub identity: String,
    pub kind: TrackKind,
    /// [`codec_code`] of the codec, 0 when unknown.
    pub codec: u8,
    pub layers: Vec<AnnouncedLayer>,
}

/// One simulcast layer (or the only one) of an announced track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncedLayer {
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
        room: String,
        source: String,
        paused: Vec<u32>,
    },
    /// These are (some of) the streams I send you for `room` from `source`.
    Announce {
        room: String,
        source: String,
        tracks: Vec<AnnouncedTrack>,
    },
    /// Stop sending me `room`'s media from `source`: another upstream
    /// delivers it now.
    Unsubscribe { room: String, source: String },
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

/// Decodes one mesh APP packet (the first RTCP packet of `rtcp`).
pub fn parse_message(rtcp: &[u8]) -> Result<MeshMessage, MeshWireError> {
    if !is_mesh_app(rtcp) || rtcp[0] >> 6 != 2 {
        return Err(MeshWireError::NotMesh);
    }
    let words = usize::from(u16::from_be_bytes([rtcp[2], rtcp[3]]));
    let len = (words + 1) * 4;
    if rtcp.len() < len || len < 16 {
        return Err(MeshWireError::Truncated);
    }
    let mut r = Reader {
        buf: &rtcp[12..len],
    };
    let version = r.u8()?;
    if version != WIRE_VERSION {
        return Err(MeshWireError::Version(version));
    }
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
    pub recovered: u64,
    pub unrecovered: u64,
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

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
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
const LOSS_LOW: f64 = 0.02;

/// A loss-based send budget for one mesh link: the downstream's NACKs say
/// how much of what we send is lost; above 10% the budget drops to 85% of
/// what the link carried, below 2% it grows 8% a window until it no longer
/// binds. Layers that do not fit the budget are not sent on the link (the
/// lowest wanted layer always is), so each link carries the simulcast
/// layers its capacity allows.
#[derive(Debug, Default, Clone)]
pub struct LinkCapacity {
    window_start: Option<Instant>,
    sent_bytes: u64,
    sent_packets: u64,
    nacked: u64,
    cap_bps: Option<u64>,
    /// Loss fraction of the last complete window.
    pub last_loss: f64,
}

impl LinkCapacity {
    pub fn on_sent(&mut self, bytes: usize) {
        self.sent_bytes += bytes as u64;
        self.sent_packets += 1;
    }

    pub fn on_nacked(&mut self, packets: u64) {
        self.nacked += packets;
    }

    /// The current budget; `None`: unlimited.
    pub fn cap_bps(&self) -> Option<u64> {
        self.cap_bps
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
            if loss > LOSS_HIGH {
                let lowered = (rate * 0.85) as u64;
                self.cap_bps = Some(self.cap_bps.map_or(lowered, |c| c.min(lowered)));
            } else if loss < LOSS_LOW
                && let Some(c) = self.cap_bps
            {
                let raised = (c as f64 * 1.08) as u64 + 8_000;
                // Unlimited again once the budget is well above the load.
                self.cap_bps = (raised < (rate * 2.0) as u64).then_some(raised);
            }
        }
        self.window_start = Some(now);
        self.sent_bytes = 0;
        self.sent_packets = 0;
        self.nacked = 0;
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
