//! The room hub: every WebSocket room session of the node, with its
//! sequence-numbered event history, fed by the cores' events; sessions
//! detached for longer than the resume window leave their room.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use ridge_sfu::{ParticipantId, PeerId, SfuEvent, TrackInfo};
use serde_json::{Value, json};

use super::limits::{SocketTx, TokenBucket, WsPermit};
use crate::shard::handle::MediaHandle;

/// Events kept per session for replay after a reconnect, at most (the
/// byte bound, `ws_resume_buffer_bytes`, usually binds first).
const HISTORY: usize = 256;
/// A detached session is kept this long for a resume.
const RESUME_WINDOW: Duration = Duration::from_secs(60);

/// One room session: a participant of the core, and the socket attached
/// to it, if any.
pub(super) struct Session {
    pub(super) room: String,
    pub(super) identity: String,
    pub(super) participant: ParticipantId,
    pub(super) resume: String,
    pub(super) seq: u64,
    /// Numbered events for a resume, at most `resume_limit` bytes of text.
    pub(super) history: VecDeque<(u64, Arc<str>)>,
    pub(super) history_bytes: usize,
    pub(super) resume_limit: usize,
    pub(super) socket: Option<(u64, SocketTx)>,
    pub(super) detached_at: Option<Instant>,
    pub(super) peers: Vec<PeerId>,
    /// Chat and data messages of this participant.
    pub(super) bucket: TokenBucket,
    /// The session's place in the WebSocket quota, given back with it.
    pub(super) _permit: WsPermit,
}

impl Session {
    /// Numbers, records and (if attached) sends one event.
    fn push(&mut self, mut event: Value, evicted: &Counter) {
        self.seq += 1;
        event["seq"] = json!(self.seq);
        let text: Arc<str> = Arc::from(event.to_string());
        self.history_bytes += text.len();
        self.history.push_back((self.seq, text.clone()));
        while self.history.len() > HISTORY
            || (self.history_bytes > self.resume_limit && self.history.len() > 1)
        {
            if let Some((_, old)) = self.history.pop_front() {
                self.history_bytes -= old.len();
                evicted.inc();
            }
        }
        if let Some((_, tx)) = &self.socket
            && !tx.send(text)
        {
            // A reader too slow for its queue: the socket task closes it;
            // the client resumes and the history replays what it can.
            self.socket = None;
            self.detached_at = Some(Instant::now());
        }
    }

    /// The oldest `seq` a resume can replay from without a gap.
    pub(super) fn oldest_kept(&self) -> u64 {
        self.history.front().map_or(self.seq, |(n, _)| n - 1)
    }
}

/// All WebSocket sessions of the node.
#[derive(Default)]
pub struct RoomHub {
    inner: Mutex<HubInner>,
    /// `ridge_ws_resume_evicted_total`.
    evicted: Counter,
}

impl std::fmt::Debug for RoomHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomHub").finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(super) struct HubInner {
    pub(super) sessions: HashMap<ParticipantId, Session>,
    pub(super) by_resume: HashMap<String, ParticipantId>,
    pub(super) next_socket: u64,
}

impl HubInner {
    fn room_sessions(&mut self, room: &str) -> impl Iterator<Item = &mut Session> {
        self.sessions.values_mut().filter(move |s| s.room == room)
    }
}

pub(super) fn track_json(t: &TrackInfo) -> Value {
    json!({
        "track": t.track.to_string(),
        "participant": t.participant.to_string(),
        "kind": t.kind,
        "rids": t.rids,
        "codec": t.codec,
    })
}

impl RoomHub {
    /// A hub that counts resume-buffer evictions in `evicted`.
    pub fn new(evicted: Counter) -> Self {
        Self {
            inner: Mutex::default(),
            evicted,
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Routes one core event to the sessions of its room.
    pub fn dispatch(&self, e: &SfuEvent) {
        let mut hub = self.lock();
        let room = e.room().to_string();
        // The joiner learns of its own join from `welcome`; whether the core
        // event reaches its session before or after the session exists is a
        // race, so it never gets one (`skip`).
        let mut skip = None;
        let (event, only) = match e {
            SfuEvent::ParticipantJoined {
                participant,
                identity,
                ..
            } => {
                skip = Some(*participant);
                (
                    json!({"type":"participant_joined","participant":participant.to_string(),"identity":identity}),
                    None,
                )
            }
            SfuEvent::ParticipantLeft {
                participant,
                identity,
                ..
            } => (
                json!({"type":"participant_left","participant":participant.to_string(),"identity":identity}),
                None,
            ),
            SfuEvent::TrackPublished { track, .. } => {
                let mut v = track_json(track);
                v["type"] = json!("track_published");
                (v, None)
            }
            SfuEvent::TrackUnpublished {
                participant, track, ..
            } => (
                json!({"type":"track_unpublished","track":track.to_string(),"participant":participant.to_string()}),
                None,
            ),
            SfuEvent::ActiveSpeaker {
                participant, level, ..
            } => (
                json!({"type":"active_speaker","participant":participant.map(|p| p.to_string()),"level":level}),
                None,
            ),
            SfuEvent::LayerDemand {
                participant,
                peer,
                track,
                active,
                ..
            } => (
                json!({"type":"layers","peer":peer.to_string(),"track":track.to_string(),"active":active}),
                Some(*participant),
            ),
            SfuEvent::NoCommonCodec {
                participant,
                peer,
                track,
                codec,
                receivable,
                ..
            } => (
                json!({"type":"codec_unsupported","peer":peer.to_string(),"track":track.to_string(),
                    "codec":codec,"receivable":receivable,
                    "message":format!("track {track} is {codec}, which this session did not negotiate \
                        (it receives {}); it is not sent to you. Subscribe again offering {codec}: \
                        codec bridging needs a transcoding node (hwcodec)",
                        receivable.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", "))}),
                Some(*participant),
            ),
            SfuEvent::PeerConnected { .. }
            | SfuEvent::PeerClosed { .. }
            | SfuEvent::SessionReaped { .. } => return,
        };
        for s in hub.room_sessions(&room) {
            if only.is_none_or(|p| p == s.participant) && skip != Some(s.participant) {
                s.push(event.clone(), &self.evicted);
            }
        }
    }

    pub(super) fn broadcast(&self, room: &str, event: Value) {
        let mut hub = self.lock();
        for s in hub.room_sessions(room) {
            s.push(event.clone(), &self.evicted);
        }
    }

    /// Tells every client the node is going away.
    pub fn shutdown_notice(&self) {
        let mut hub = self.lock();
        for s in hub.sessions.values_mut() {
            s.push(json!({"type":"shutdown"}), &self.evicted);
        }
    }

    /// Whether `token` resumes a session of `identity` in `room`.
    pub(super) fn can_resume(&self, token: &str, identity: &str, room: &str) -> bool {
        let hub = self.lock();
        hub.by_resume
            .get(token)
            .and_then(|p| hub.sessions.get(p))
            .is_some_and(|s| s.identity == identity && s.room == room)
    }

    pub fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Removes sessions detached for longer than the resume window and
    /// returns their participants, which the caller makes leave the core.
    fn reap(&self, now: Instant) -> Vec<ParticipantId> {
        let mut hub = self.lock();
        let expired: Vec<ParticipantId> = hub
            .sessions
            .values()
            .filter(|s| {
                s.detached_at
                    .is_some_and(|t| now.saturating_duration_since(t) > RESUME_WINDOW)
            })
            .map(|s| s.participant)
            .collect();
        for p in &expired {
            if let Some(s) = hub.sessions.remove(p) {
                hub.by_resume.remove(&s.resume);
            }
        }
        expired
    }
}

/// Feeds core events to the hub and reaps abandoned sessions.
pub async fn run_hub(hub: Arc<RoomHub>, media: MediaHandle) {
    let mut events = media.subscribe_events();
    let mut reap = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(e) => hub.dispatch(&e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "room hub lagged behind core events");
                }
                Err(_) => return,
            },
            _ = reap.tick() => {
                for p in hub.reap(Instant::now()) {
                    tracing::info!(participant = %p, "resume window expired; leaving room");
                    let _ = media.leave(p).await;
                }
            }
        }
    }
}
