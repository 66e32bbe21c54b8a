//! The codec policy: which codecs a session may negotiate, in what order,
//! and the checks that turn a codec mismatch into a clear error instead of
//! a silent black video.
//!
//! Three levels narrow one another: the node's list
//! ([`SfuConfig::codecs`](crate::SfuConfig::codecs)), a room's
//! ([`Sfu::set_room_codecs`]) and a participant's
//! ([`Sfu::set_participant_codecs`], from its token). The most specific
//! list that is set gives the order; the broader ones only remove codecs
//! from it. The order matters: an answer lists codecs in it, and a browser
//! sends the first codec of the answer.

use std::collections::HashMap;
use std::time::Instant;

use str0m::RtcConfig;
use str0m::format::{Codec, FormatParams, PayloadParams};
use str0m::media::Mid;

use crate::error::{SdpError, SfuError, SpecError};
use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::types::{CodecSpec, OfferIntent, SfuEvent, TrackKind};

use super::Sfu;
use super::peer::Transport;
use super::webrtc::WebRtcPeer;

/// A subscriber is told of at most this many tracks it cannot receive.
pub(super) const MAX_REFUSED: usize = 64;

/// At most this many rooms carry a codec list of their own.
pub const MAX_ROOM_CODEC_POLICIES: usize = 10_000;

/// The room and participant lists; the node's is in the configuration.
#[derive(Debug, Default)]
pub(super) struct CodecPolicy {
    rooms: HashMap<String, Vec<CodecSpec>>,
    participants: HashMap<ParticipantId, Vec<CodecSpec>>,
}

impl CodecPolicy {
    /// The codecs a session of `participant` in `room` may negotiate, in
    /// order.
    pub(super) fn effective(
        &self,
        node: &[CodecSpec],
        room: &str,
        participant: ParticipantId,
    ) -> Vec<CodecSpec> {
        let room_list = self.rooms.get(room);
        let mine = self.participants.get(&participant);
        let order = mine.or(room_list).map_or(node, Vec::as_slice);
        order
            .iter()
            .copied()
            .filter(|c| node.contains(c))
            .filter(|c| room_list.is_none_or(|r| r.contains(c)))
            .collect()
    }

    /// Sets a participant's list (checked by the caller).
    pub(super) fn set_participant(&mut self, participant: ParticipantId, codecs: Vec<CodecSpec>) {
        self.participants.insert(participant, codecs);
    }

    /// Forgets a participant that left.
    pub(super) fn forget(&mut self, participant: ParticipantId) {
        self.participants.remove(&participant);
    }
}

/// Checks a codec list against the node's: not empty, no repeats, and
/// every codec one the node allows.
pub(super) fn check_list(node: &[CodecSpec], codecs: &[CodecSpec]) -> Result<(), SpecError> {
    if codecs.is_empty() {
        return Err(SpecError::NoCodecs);
    }
    for (i, c) in codecs.iter().enumerate() {
        if codecs[..i].contains(c) {
            return Err(SpecError::RepeatedCodec(*c));
        }
        if !node.contains(c) {
            return Err(SpecError::CodecNotOnNode {
                codec: *c,
                node: names(node.iter().copied()),
            });
        }
    }
    Ok(())
}

/// Codec names joined with commas, `"none"` for none.
pub(super) fn names(codecs: impl Iterator<Item = CodecSpec>) -> String {
    let list: Vec<&str> = codecs.map(CodecSpec::as_str).collect();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

/// Enables `codecs` in str0m, in order (each with RTX; for H.264 the
/// profiles and packetization modes str0m knows, matched by the rules of
/// RFC 6184 §8.1; for VP9 profiles 0 and 2).
pub(super) fn enable(mut config: RtcConfig, codecs: &[CodecSpec]) -> RtcConfig {
    for c in codecs {
        config = match c {
            CodecSpec::Opus => config.enable_opus(true, false),
            CodecSpec::Vp8 => config.enable_vp8(true),
            CodecSpec::H264 => config.enable_h264(true),
            CodecSpec::Vp9 => config.enable_vp9(true),
            CodecSpec::Av1 => config.enable_av1(true),
        };
    }
    config
}

/// One audio or video m-line of an offer, read from its text: what str0m's
/// answer does not say when it drops a codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OfferedLine {
    pub(super) mid: String,
    pub(super) kind: TrackKind,
    /// Port 0: the offerer itself rejects the m-line.
    pub(super) rejected: bool,
    /// The media encodings of its `a=rtpmap` lines, upper case, in order,
    /// without retransmission, redundancy and FEC formats.
    pub(super) codecs: Vec<String>,
}

impl OfferedLine {
    pub(super) fn codec_names(&self) -> String {
        if self.codecs.is_empty() {
            "no codec".to_owned()
        } else {
            self.codecs.join(", ")
        }
    }
}

/// Encodings that ride along with a media codec rather than being one.
const HELPER_ENCODINGS: [&str; 7] = [
    "RTX",
    "RED",
    "ULPFEC",
    "FLEXFEC-03",
    "CN",
    "TELEPHONE-EVENT",
    "FLEXFEC",
];

/// At most this many m-lines and encodings per m-line are kept.
const MAX_LINES: usize = 64;
const MAX_ENCODINGS: usize = 64;

/// The audio and video m-lines of an SDP offer (str0m has parsed it
/// already; this only reads what the answer leaves out).
pub(super) fn offered_lines(sdp: &str) -> Vec<OfferedLine> {
    let mut lines: Vec<OfferedLine> = Vec::new();
    let mut in_media = false;
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            let mut words = m.split_ascii_whitespace();
            let kind = match words.next() {
                Some("audio") => Some(TrackKind::Audio),
                Some("video") => Some(TrackKind::Video),
                _ => None,
            };
            in_media = false;
            if let Some(kind) = kind
                && lines.len() < MAX_LINES
            {
                lines.push(OfferedLine {
                    mid: String::new(),
                    kind,
                    rejected: words.next() == Some("0"),
                    codecs: Vec::new(),
                });
                in_media = true;
            }
            continue;
        }
        if !in_media {
            continue;
        }
        let Some(current) = lines.last_mut() else {
            continue;
        };
        if let Some(mid) = line.strip_prefix("a=mid:") {
            current.mid = mid.trim().to_owned();
        } else if let Some(map) = line.strip_prefix("a=rtpmap:") {
            let encoding = map
                .split_ascii_whitespace()
                .nth(1)
                .and_then(|e| e.split('/').next())
                .unwrap_or_default()
                .to_ascii_uppercase();
            if !encoding.is_empty()
                && !HELPER_ENCODINGS.contains(&encoding.as_str())
                && !current.codecs.contains(&encoding)
                && current.codecs.len() < MAX_ENCODINGS
            {
                current.codecs.push(encoding);
            }
        }
    }
    lines
}

/// The error for an offered m-line that negotiated no codec.
pub(super) fn not_allowed(line: &OfferedLine, allowed: &[CodecSpec]) -> SfuError {
    SfuError::InvalidSdp(SdpError::CodecNotAllowed {
        mid: line.mid.clone(),
        kind: line.kind.as_str(),
        offered: line.codec_names(),
        allowed: names(allowed.iter().copied().filter(|c| c.kind() == line.kind)),
    })
}

/// The codec (with its format parameters) a publisher will send on
/// `mid`: the first of the answer's (the node's order) that the offer
/// accepted. A browser sends the first codec of the answer.
pub(super) fn expected(rtc: &str0m::Rtc, mid: Mid) -> Option<str0m::format::CodecSpec> {
    let media = rtc.media(mid)?;
    let remote = media.remote_pts();
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| remote.contains(&p.pt()))
        .map(|p| p.spec())
}

/// The codec (with its format parameters) of payload type `pt` in a
/// session's negotiated codecs.
pub(super) fn spec_of_pt(
    rtc: &str0m::Rtc,
    pt: str0m::media::Pt,
) -> Option<str0m::format::CodecSpec> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.pt() == pt)
        .map(|p| p.spec())
}

/// Whether a stream in `codec` with `sent` format parameters can be sent on
/// a payload type with `offered` ones: for H.264 the same packetization
/// mode and the same profile (RFC 6184 §8.1: the level may differ where
/// level asymmetry is allowed, which every browser allows), for VP9 the
/// same profile; for the others, always.
pub(super) fn compatible(codec: Codec, sent: &FormatParams, offered: &FormatParams) -> bool {
    match codec {
        Codec::H264 => {
            sent.packetization_mode.unwrap_or(0) == offered.packetization_mode.unwrap_or(0)
                && h264_profile(sent.profile_level_id) == h264_profile(offered.profile_level_id)
        }
        Codec::Vp9 => sent.profile_id.unwrap_or(0) == offered.profile_id.unwrap_or(0),
        _ => true,
    }
}

/// The H.264 profile of a `profile-level-id` (RFC 6184 §8.1; absent, it
/// is 42000a, Baseline): its `profile_idc`, with Constrained Baseline told
/// apart from Baseline by the constraint flags, as libwebrtc does.
fn h264_profile(profile_level_id: Option<u32>) -> (u8, bool) {
    let id = profile_level_id.unwrap_or(0x42_00_0a);
    let idc = ((id >> 16) & 0xff) as u8;
    let iop = ((id >> 8) & 0xff) as u8;
    let constrained_baseline = match idc {
        0x42 => iop & 0x40 != 0,
        0x4d => iop & 0x80 != 0,
        0x58 => iop & 0xc0 == 0xc0,
        _ => false,
    };
    // Constrained Baseline is one profile whatever idc says it with.
    if constrained_baseline {
        (0x42, true)
    } else {
        (idc, false)
    }
}

/// The subscriber's payload type for a track in `codec` on one m-line:
/// the first, in the node's order, that the subscriber accepted and whose
/// format parameters fit the track's (`format`, when known).
pub(super) fn negotiated_pt(
    rtc: &str0m::Rtc,
    mid: Mid,
    codec: Codec,
    format: Option<&FormatParams>,
) -> Option<(Codec, PayloadParams)> {
    let media = rtc.media(mid)?;
    let remote = media.remote_pts();
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| {
            p.spec().codec == codec
                && remote.contains(&p.pt())
                && format.is_none_or(|f| compatible(codec, f, &p.spec().format))
        })
        .map(|p| (codec, *p))
}

/// The format parameters a plain endpoint's `fmtp` names (the value of an
/// SDP `a=fmtp` line after the payload type, e.g.
/// `"profile-level-id=42e01f;packetization-mode=1"`). Checked: an H.264
/// `profile-level-id` is six hex digits, a packetization mode 0 or 1 (the
/// interleaved mode 2 is not forwarded), a VP9 profile 0 to 3.
pub(super) fn parse_fmtp(codec: CodecSpec, fmtp: &str) -> Result<FormatParams, SpecError> {
    let bad = |why: &str| SpecError::Fmtp {
        fmtp: fmtp.chars().take(200).collect(),
        reason: why.to_owned(),
    };
    if fmtp.len() > 1024 {
        return Err(bad("longer than 1024 bytes"));
    }
    for pair in fmtp.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad("each parameter is key=value"))?;
        let v = v.trim();
        let problem = match (codec, k.trim()) {
            (CodecSpec::H264, "profile-level-id")
                if v.len() != 6 || u32::from_str_radix(v, 16).is_err() =>
            {
                Some("profile-level-id is six hex digits, e.g. 42e01f")
            }
            (CodecSpec::H264, "packetization-mode") if !matches!(v, "0" | "1") => {
                Some("packetization-mode is 0 or 1")
            }
            (CodecSpec::Vp9, "profile-id") if !matches!(v, "0" | "1" | "2" | "3") => {
                Some("profile-id is 0 to 3")
            }
            _ => None,
        };
        if let Some(why) = problem {
            return Err(bad(why));
        }
    }
    Ok(FormatParams::parse_line(fmtp))
}

/// The codecs a subscriber's m-line can receive.
pub(super) fn receivable(rtc: &str0m::Rtc, mid: Mid) -> Vec<CodecSpec> {
    let Some(media) = rtc.media(mid) else {
        return Vec::new();
    };
    let remote = media.remote_pts();
    let mut out = Vec::new();
    for p in rtc.codec_config().params() {
        if remote.contains(&p.pt())
            && let Some(c) = CodecSpec::from_str0m(p.spec().codec)
            && !out.contains(&c)
        {
            out.push(c);
        }
    }
    out
}

impl Sfu {
    /// A subscribe offer must be able to receive at least one of the
    /// tracks it would be bound to, per kind: an offer that can receive
    /// none of the room's video tracks' codecs is refused with the reason,
    /// rather than answered and left black.
    pub(super) fn check_receivable(
        &self,
        room: &str,
        participant: ParticipantId,
        intent: OfferIntent,
        peer: &WebRtcPeer,
    ) -> Result<(), SfuError> {
        let OfferIntent::Subscribe { from } = intent else {
            return Ok(());
        };
        let Some(r) = self.reg.rooms.get(room) else {
            return Ok(());
        };
        for kind in [TrackKind::Audio, TrackKind::Video] {
            let lines: Vec<Mid> = peer
                .slots
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| s.mid)
                .collect();
            if lines.is_empty() {
                continue;
            }
            let mut accept: Vec<CodecSpec> = Vec::new();
            for mid in &lines {
                for c in receivable(&peer.rtc, *mid) {
                    if !accept.contains(&c) {
                        accept.push(c);
                    }
                }
            }
            let tracks = r.tracks.iter().filter_map(|t| {
                let track = self.reg.tracks.get(t)?;
                (track.kind == kind
                    && track.participant != participant
                    && from.is_none_or(|f| f == track.participant))
                .then_some((*t, track.codec?, track.format))
            });
            let mut first_refused = None;
            let mut any_ok = false;
            for (t, codec, format) in tracks {
                let Some(spec) = CodecSpec::from_str0m(codec) else {
                    continue;
                };
                let fits = lines
                    .iter()
                    .any(|mid| negotiated_pt(&peer.rtc, *mid, codec, format.as_ref()).is_some());
                if fits {
                    any_ok = true;
                } else if first_refused.is_none() {
                    first_refused = Some((t, spec));
                }
            }
            if let (false, Some((t, codec))) = (any_ok, first_refused) {
                return Err(SfuError::InvalidSdp(SdpError::NoCommonCodec {
                    track: t.to_string(),
                    codec: codec.as_str(),
                    kind: kind.as_str(),
                    offered: names(accept.into_iter()),
                }));
            }
        }
        Ok(())
    }

    /// A track's codec changed: its subscribers look up their payload type
    /// again, and one that cannot receive the new codec is unbound from
    /// the track and told so ([`SfuEvent::NoCommonCodec`]).
    pub(super) fn codec_changed(&mut self, now: Instant, track: TrackId, subscribers: &[PeerId]) {
        let Some((raw, format)) = self
            .reg
            .tracks
            .get(&track)
            .and_then(|t| Some((t.codec?, t.format)))
        else {
            return;
        };
        let Some(codec) = CodecSpec::from_str0m(raw) else {
            return;
        };
        let mut unbound = Vec::new();
        for id in subscribers {
            let Some(peer) = self.peers.get_mut(id) else {
                continue;
            };
            let Transport::WebRtc(w) = &mut peer.transport else {
                continue;
            };
            let w = &mut **w;
            for slot in w.slots.iter_mut().filter(|s| s.track == Some(track)) {
                slot.pt = None;
                if negotiated_pt(&w.rtc, slot.mid, raw, format.as_ref()).is_some() {
                    continue;
                }
                let accept = receivable(&w.rtc, slot.mid);
                slot.track = None;
                slot.current = None;
                slot.target = None;
                unbound.push(*id);
                if !w.refused_tracks.contains(&track) && w.refused_tracks.len() < MAX_REFUSED {
                    w.refused_tracks.push(track);
                }
                self.out.event(SfuEvent::NoCommonCodec {
                    room: peer.room.clone(),
                    participant: peer.participant,
                    peer: *id,
                    track,
                    codec,
                    receivable: accept,
                });
            }
        }
        if let Some(t) = self.reg.tracks.get_mut(&track) {
            t.subscribers.retain(|s| !unbound.contains(s));
        }
        for id in unbound {
            self.bind_slots(now, id);
        }
    }

    /// Sets the codecs a room allows and their order, or (`None`) lets the
    /// room follow the node's list again. Sessions negotiated before keep
    /// what they negotiated. Each codec must be one the node allows; at
    /// most [`MAX_ROOM_CODEC_POLICIES`] rooms carry a list.
    pub fn set_room_codecs(
        &mut self,
        room: &str,
        codecs: Option<Vec<CodecSpec>>,
    ) -> Result<(), SfuError> {
        let Some(codecs) = codecs else {
            self.codec_policy.rooms.remove(room);
            return Ok(());
        };
        check_list(&self.config.codecs, &codecs).map_err(SfuError::InvalidSpec)?;
        if !self.codec_policy.rooms.contains_key(room)
            && self.codec_policy.rooms.len() >= MAX_ROOM_CODEC_POLICIES
        {
            return Err(SfuError::InvalidSpec(SpecError::TooManyRoomCodecLists(
                MAX_ROOM_CODEC_POLICIES,
            )));
        }
        self.codec_policy.rooms.insert(room.to_owned(), codecs);
        Ok(())
    }

    /// The codec list a room carries of its own, if any.
    pub fn room_codecs(&self, room: &str) -> Option<&[CodecSpec]> {
        self.codec_policy.rooms.get(room).map(Vec::as_slice)
    }

    /// Narrows the codecs `participant`'s sessions negotiate, in this order
    /// (a token's `codecs` claim); the room's and the node's lists still
    /// apply. `None` clears it.
    pub fn set_participant_codecs(
        &mut self,
        participant: ParticipantId,
        codecs: Option<Vec<CodecSpec>>,
    ) -> Result<(), SfuError> {
        if !self.reg.participants.contains_key(&participant) {
            return Err(SfuError::NoSuchParticipant(participant));
        }
        match codecs {
            None => {
                self.codec_policy.participants.remove(&participant);
            }
            Some(codecs) => {
                check_list(&self.config.codecs, &codecs).map_err(SfuError::InvalidSpec)?;
                self.codec_policy.participants.insert(participant, codecs);
            }
        }
        Ok(())
    }

    /// The codecs a new session of `participant` may negotiate, in order.
    pub fn codecs_for(&self, participant: ParticipantId) -> Result<Vec<CodecSpec>, SfuError> {
        let room = self
            .reg
            .room_of(participant)
            .ok_or(SfuError::NoSuchParticipant(participant))?;
        Ok(self
            .codec_policy
            .effective(&self.config.codecs, room, participant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME_LIKE: &str = "v=0\r\n\
        o=- 1 2 IN IP4 127.0.0.1\r\n\
        s=-\r\n\
        t=0 0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\n\
        a=mid:0\r\n\
        a=rtpmap:111 opus/48000/2\r\n\
        a=rtpmap:63 red/48000/2\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 102 103 45\r\n\
        a=mid:1\r\n\
        a=rtpmap:102 H264/90000\r\n\
        a=rtpmap:103 rtx/90000\r\n\
        a=rtpmap:45 AV1/90000\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
        a=mid:2\r\n\
        m=video 0 UDP/TLS/RTP/SAVPF 96\r\n\
        a=mid:3\r\n\
        a=rtpmap:96 VP8/90000\r\n";

    #[test]
    fn offered_lines_read_media_encodings_only() {
        let lines = offered_lines(CHROME_LIKE);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].mid, "0");
        assert_eq!(lines[0].kind, TrackKind::Audio);
        assert_eq!(lines[0].codecs, ["OPUS"]);
        assert_eq!(lines[1].codecs, ["H264", "AV1"]);
        assert!(!lines[1].rejected);
        assert_eq!(lines[2].mid, "3");
        assert!(lines[2].rejected);
    }

    #[test]
    fn offered_lines_survive_garbage() {
        for sdp in [
            "",
            "m=",
            "m=video",
            "a=rtpmap:",
            "m=video 9\na=rtpmap:96\na=mid:",
        ] {
            let _ = offered_lines(sdp);
        }
        let many = "m=video 9 X 1\n".repeat(500);
        assert_eq!(offered_lines(&many).len(), MAX_LINES);
    }

    #[test]
    fn the_most_specific_list_orders_and_the_broader_ones_filter() {
        use CodecSpec::*;
        let node = [Opus, Vp8, H264, Vp9];
        let mut p = CodecPolicy::default();
        let who = ParticipantId(7);
        assert_eq!(p.effective(&node, "r", who), node);
        p.rooms.insert("r".into(), vec![H264, Opus, Av1]);
        // AV1 is not on the node: filtered out.
        assert_eq!(p.effective(&node, "r", who), [H264, Opus]);
        p.participants.insert(who, vec![Vp8, Opus, H264]);
        // The participant orders; the room removes VP8.
        assert_eq!(p.effective(&node, "r", who), [Opus, H264]);
        assert_eq!(p.effective(&node, "other", who), [Vp8, Opus, H264]);
        p.forget(who);
        assert_eq!(p.effective(&node, "other", who), node);
    }

    fn h264(profile_level_id: u32, mode: u8) -> FormatParams {
        FormatParams {
            profile_level_id: Some(profile_level_id),
            packetization_mode: Some(mode),
            ..FormatParams::default()
        }
    }

    #[test]
    fn h264_matches_by_profile_and_packetization_mode_not_level() {
        let cb31 = h264(0x42e01f, 1);
        assert!(compatible(Codec::H264, &cb31, &h264(0x42e01f, 1)));
        // Another level of the same profile.
        assert!(compatible(Codec::H264, &cb31, &h264(0x42e034, 1)));
        // Constrained Baseline, said with other constraint flags or as Main
        // with constraint_set0.
        assert!(compatible(Codec::H264, &cb31, &h264(0x42c01f, 1)));
        assert!(compatible(Codec::H264, &cb31, &h264(0x4d801f, 1)));
        assert!(
            !compatible(Codec::H264, &cb31, &h264(0x42001f, 1)),
            "Baseline"
        );
        assert!(!compatible(Codec::H264, &cb31, &h264(0x4d001f, 1)), "Main");
        assert!(!compatible(Codec::H264, &cb31, &h264(0x64001f, 1)), "High");
        assert!(
            !compatible(Codec::H264, &cb31, &h264(0x42e01f, 0)),
            "mode 0"
        );
        // Absent: Baseline, mode 0.
        let none = FormatParams::default();
        assert!(compatible(Codec::H264, &none, &h264(0x42000a, 0)));
        assert!(!compatible(Codec::H264, &none, &cb31));
    }

    #[test]
    fn vp9_matches_by_profile() {
        let p = |id| FormatParams {
            profile_id: Some(id),
            ..FormatParams::default()
        };
        assert!(compatible(Codec::Vp9, &p(0), &p(0)));
        assert!(compatible(Codec::Vp9, &FormatParams::default(), &p(0)));
        assert!(!compatible(Codec::Vp9, &p(2), &p(0)));
        assert!(
            compatible(Codec::Vp8, &p(2), &p(0)),
            "other codecs ignore it"
        );
    }

    #[test]
    fn fmtp_is_checked() {
        let f = parse_fmtp(
            CodecSpec::H264,
            "profile-level-id=42e01f;packetization-mode=1;level-asymmetry-allowed=1",
        )
        .unwrap();
        assert_eq!(f.profile_level_id, Some(0x42e01f));
        assert_eq!(f.packetization_mode, Some(1));
        for bad in [
            "profile-level-id=42e0",
            "profile-level-id=zzzzzz",
            "packetization-mode=2",
            "packetization-mode",
        ] {
            assert!(parse_fmtp(CodecSpec::H264, bad).is_err(), "{bad}");
        }
        assert!(parse_fmtp(CodecSpec::Vp9, "profile-id=4").is_err());
        assert_eq!(
            parse_fmtp(CodecSpec::Vp9, "profile-id=2")
                .unwrap()
                .profile_id,
            Some(2)
        );
        assert!(parse_fmtp(CodecSpec::H264, &"a=b;".repeat(400)).is_err());
    }

    #[test]
    fn lists_are_checked_against_the_node() {
        use CodecSpec::*;
        let node = [Opus, Vp8];
        assert_eq!(check_list(&node, &[]), Err(SpecError::NoCodecs));
        assert_eq!(
            check_list(&node, &[Vp8, Vp8]),
            Err(SpecError::RepeatedCodec(Vp8))
        );
        assert_eq!(
            check_list(&node, &[Vp8, H264]),
            Err(SpecError::CodecNotOnNode {
                codec: H264,
                node: "opus, vp8".into()
            })
        );
        assert_eq!(check_list(&node, &[Vp8]), Ok(()));
    }
}
