//! The wire format of mesh control: the RTCP APP packets (`RDGM`) that
//! carry SUBSCRIBE, ANNOUNCE, UNSUBSCRIBE and DELAY, and the codec codes.

use super::{
    ANNOUNCE_TRACKS_PER_PACKET, APP_ANNOUNCE, APP_DELAY, APP_NAME, APP_SUBSCRIBE, APP_UNSUBSCRIBE,
    MAX_NAME, WIRE_VERSION,
};
use crate::types::TrackKind;

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
/// [`DelayDetector`](super::DelayDetector) sees it (GCC's over-use detector).
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
}
