//! Mesh links between nodes: configuration, the control messages carried in
//! RTCP APP packets, and the receive-side loss tracker that drives
//! hop-by-hop NACKs. The routing itself lives in the [`Sfu`](crate::Sfu).
//!
//! The protocol (docs/mesh.md): every datagram on a link is SRTP or SRTCP
//! under the link's per-direction keys; media is RTP with the original
//! sequence numbers of each stream, one SSRC per (track, layer, link);
//! control is single RTCP packets: generic NACK, PLI, and two APP packets
//! (name `RDGM`): `SUBSCRIBE` (downstream to upstream, every
//! [`SUBSCRIBE_INTERVAL`]) and `ANNOUNCE` (upstream to downstream, the
//! streams it sends and what they carry).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ids::TrackId;
use crate::types::TrackKind;

/// How often a downstream node renews its subscription to a room, and an
/// upstream node announces what it sends.
pub const SUBSCRIBE_INTERVAL: Duration = Duration::from_millis(500);
/// A subscription or announced track not renewed for this long is dropped.
pub const MESH_STATE_TIMEOUT: Duration = Duration::from_millis(2500);
/// RTCP APP name of mesh control messages.
pub const APP_NAME: [u8; 4] = *b"RDGM";
const APP_SUBSCRIBE: u8 = 1;
const APP_ANNOUNCE: u8 = 2;
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
    /// Only the last node NACKs, and relays pass NACKs on to the source
    /// node, which alone answers: how cascaded SFUs without per-hop
    /// recovery behave. For comparison (ridge-bench `mesh-loss`).
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Datagrams that failed authentication or replay checks.
    pub auth_failures: u64,
    /// Smoothed NACK-to-retransmission round trip, when measured.
    pub rtt_us: Option<u64>,
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
    /// Per layer: the rid, and the SSRC it is sent with on this link.
    pub layers: Vec<(Option<String>, u32)>,
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
    };
    out.push(0x80 | subtype);
    out.push(crate::packet::rtcp::PT_APP);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.extend_from_slice(&APP_NAME);
    out.push(WIRE_VERSION);
    match msg {
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
                for (rid, ssrc) in &t.layers[..layers] {
                    put_str(out, rid.as_deref().unwrap_or(""));
                    out.extend_from_slice(&ssrc.to_be_bytes());
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
                    ls.push(((!rid.is_empty()).then_some(rid), ssrc));
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
    pub recovered: u64,
    pub unrecovered: u64,
    pub lost: u64,
}

impl Default for LossTracker {
    fn default() -> Self {
        LossTracker {
            highest: None,
            missing: Vec::with_capacity(MAX_MISSING),
            srtt: None,
            recovered: 0,
            unrecovered: 0,
            lost: 0,
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
                                next: now,
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

/// Keys the core uses for a remote track: room, source node and the
/// track's id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct OriginKey {
    pub room: String,
    pub source: String,
    pub track: u64,
}

/// Where a remote track's layer comes from on its current upstream link.
#[derive(Debug, Clone, Copy)]
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
                    layers: vec![(Some("q".into()), 11), (Some("f".into()), 12)],
                },
                AnnouncedTrack {
                    origin_track: 8,
                    origin_participant: 9,
                    identity: "alice".into(),
                    kind: TrackKind::Audio,
                    codec: 1,
                    layers: vec![(None, 13)],
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
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
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
