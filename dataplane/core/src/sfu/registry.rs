//! Rooms, participants and published tracks: who is where, and what each
//! room offers. The registry hands out participant and track ids.

use std::collections::HashMap;
use std::time::Instant;

use str0m::format::Codec;
use str0m::media::Mid;

use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::speaker::SpeakerDetector;
use crate::types::{CodecSpec, Counters, RoomState, TrackInfo, TrackKind};

use super::layers::Layer;
use super::mesh::MeshOut;

/// A room: its participants (local and remote) and what they publish.
pub(super) struct Room {
    pub(super) participants: Vec<ParticipantId>,
    /// Published tracks in publication order.
    pub(super) tracks: Vec<TrackId>,
    pub(super) speaker: SpeakerDetector,
    /// Counters of peers that have left the room.
    pub(super) retired: Counters,
}

impl Room {
    fn new() -> Self {
        Room {
            participants: Vec::new(),
            tracks: Vec::new(),
            speaker: SpeakerDetector::default(),
            retired: Counters::default(),
        }
    }
}

/// One identity in one room, owning any number of sessions.
pub(super) struct Participant {
    pub(super) room: String,
    pub(super) identity: String,
    pub(super) peers: Vec<PeerId>,
    /// Leaves the room when its last peer closes (WHIP/WHEP/RTP sessions).
    pub(super) ephemeral: bool,
}

/// A published track: one audio or video source, with one layer per
/// simulcast encoding, and who receives it.
pub(super) struct Track {
    pub(super) room: String,
    pub(super) participant: ParticipantId,
    pub(super) peer: PeerId,
    pub(super) kind: TrackKind,
    pub(super) mid: Option<Mid>,
    pub(super) codec: Option<Codec>,
    /// The payload type `codec` was last read from (WebRTC publishers).
    pub(super) codec_pt: Option<u8>,
    /// The codec's format parameters, when known (H.264 profile and
    /// packetization mode, VP9 profile): a subscriber is sent the track
    /// on a payload type whose parameters fit them.
    pub(super) format: Option<str0m::format::FormatParams>,
    pub(super) layers: Vec<Layer>,
    pub(super) subscribers: Vec<PeerId>,
    pub(super) demanded: Vec<String>,
    /// Streams of this track to downstream mesh links.
    pub(super) mesh_out: Vec<MeshOut>,
    /// Where a remote track comes from (`None`: published on this node).
    pub(super) origin: Option<crate::mesh::OriginKey>,
    /// When an upstream last announced a remote track.
    pub(super) announced: Option<Instant>,
}

impl Track {
    /// A track of `peer` with no subscribers yet.
    pub(super) fn new(
        room: &str,
        participant: ParticipantId,
        peer: PeerId,
        kind: TrackKind,
        codec: Option<Codec>,
        layers: Vec<Layer>,
    ) -> Self {
        Track {
            room: room.to_owned(),
            participant,
            peer,
            kind,
            mid: None,
            codec,
            codec_pt: None,
            format: None,
            layers,
            subscribers: Vec::new(),
            demanded: Vec::new(),
            mesh_out: Vec::new(),
            origin: None,
            announced: None,
        }
    }

    /// What the control plane hears of this track.
    pub(super) fn info(&self, id: TrackId) -> TrackInfo {
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
            codec: self.codec.and_then(CodecSpec::from_str0m),
        }
    }
}

/// Rooms, participants and tracks, and the sequence their ids come from.
pub(super) struct Registry {
    pub(super) rooms: HashMap<String, Room>,
    pub(super) participants: HashMap<ParticipantId, Participant>,
    pub(super) tracks: HashMap<TrackId, Track>,
    next_seq_id: u64,
    shard: u8,
}

impl Registry {
    /// An empty registry whose ids name `shard`.
    pub(super) fn new(shard: u8) -> Self {
        Registry {
            rooms: HashMap::new(),
            participants: HashMap::new(),
            tracks: HashMap::new(),
            next_seq_id: 1,
            shard,
        }
    }

    /// The next participant or track id value (sequential: these ids need
    /// not be secret, unlike session ids).
    fn next_id(&mut self) -> u64 {
        let id = crate::ids::tagged(self.shard, self.next_seq_id);
        self.next_seq_id += 1;
        id
    }

    /// Adds a participant (with no sessions yet) to `room`, creating the
    /// room.
    pub(super) fn add_participant(
        &mut self,
        room: &str,
        identity: &str,
        ephemeral: bool,
    ) -> ParticipantId {
        let id = ParticipantId(self.next_id());
        self.rooms
            .entry(room.to_string())
            .or_insert_with(Room::new)
            .participants
            .push(id);
        self.participants.insert(
            id,
            Participant {
                room: room.to_string(),
                identity: identity.to_string(),
                peers: Vec::new(),
                ephemeral,
            },
        );
        id
    }

    /// Removes a participant from its room (and the room once empty).
    pub(super) fn remove_participant(&mut self, participant: ParticipantId) -> Option<Participant> {
        let p = self.participants.remove(&participant)?;
        if let Some(room) = self.rooms.get_mut(&p.room) {
            room.participants.retain(|x| *x != participant);
            room.speaker.forget(participant);
            if room.participants.is_empty() {
                self.rooms.remove(&p.room);
            }
        }
        Some(p)
    }

    /// The room a participant is in.
    pub(super) fn room_of(&self, participant: ParticipantId) -> Option<&str> {
        self.participants.get(&participant).map(|p| p.room.as_str())
    }

    /// Registers a track under a new id; returns the id and its info.
    pub(super) fn add_track(&mut self, track: Track) -> (TrackId, TrackInfo) {
        let id = TrackId(self.next_id());
        let info = track.info(id);
        self.tracks.insert(id, track);
        (id, info)
    }

    /// Who is in `room` and what it publishes.
    pub(super) fn room_state(&self, room: &str) -> RoomState {
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
}

/// Feeds a publisher's audio level (voice flag, attenuation) to its room's
/// active-speaker detection. (A function of the room table alone, so that
/// it can run while a track is borrowed.)
pub(super) fn observe_level(
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
