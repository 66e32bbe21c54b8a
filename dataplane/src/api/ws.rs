//! The WebSocket room API (docs/api.md): sessions with sequence-numbered
//! events, heartbeats, detach on silence and resume with replay, so a
//! client that reconnects loses nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use ridge_sfu::{OfferIntent, ParticipantId, PeerId, SfuEvent, TrackInfo};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::auth::{Claims, Grant};
use crate::api::http::{ApiError, AppState, validate_room};
use crate::shard::handle::MediaHandle;

/// Events kept per session for replay after a reconnect.
const HISTORY: usize = 256;
/// A session that sent nothing for this long is detached.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// A detached session is kept this long for a resume.
const RESUME_WINDOW: Duration = Duration::from_secs(60);
/// Outgoing messages queued per socket before it is considered stuck.
const SOCKET_QUEUE: usize = 512;
const MAX_CHAT: usize = 4096;
const MAX_DATA: usize = 16 * 1024;

struct Session {
    room: String,
    identity: String,
    participant: ParticipantId,
    resume: String,
    seq: u64,
    history: VecDeque<(u64, String)>,
    socket: Option<(u64, mpsc::Sender<String>)>,
    detached_at: Option<Instant>,
    peers: Vec<PeerId>,
}

impl Session {
    /// Numbers, records and (if attached) sends one event.
    fn push(&mut self, mut event: Value) {
        self.seq += 1;
        event["seq"] = json!(self.seq);
        let text = event.to_string();
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((self.seq, text.clone()));
        if let Some((_, tx)) = &self.socket
            && tx.try_send(text).is_err()
        {
            // A stuck socket: detach it; the client resumes and the
            // history replays what it missed.
            self.socket = None;
            self.detached_at = Some(Instant::now());
        }
    }
}

/// All WebSocket sessions of the node.
#[derive(Default)]
pub struct RoomHub {
    inner: Mutex<HubInner>,
}

impl std::fmt::Debug for RoomHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomHub").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct HubInner {
    sessions: HashMap<ParticipantId, Session>,
    by_resume: HashMap<String, ParticipantId>,
    next_socket: u64,
}

impl HubInner {
    fn room_sessions(&mut self, room: &str) -> impl Iterator<Item = &mut Session> {
        self.sessions.values_mut().filter(move |s| s.room == room)
    }
}

fn track_json(t: &TrackInfo) -> Value {
    json!({
        "track": t.track.to_string(),
        "participant": t.participant.to_string(),
        "kind": t.kind,
        "rids": t.rids,
    })
}

impl RoomHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
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
            SfuEvent::PeerConnected { .. } | SfuEvent::PeerClosed { .. } => return,
        };
        for s in hub.room_sessions(&room) {
            if only.is_none_or(|p| p == s.participant) && skip != Some(s.participant) {
                s.push(event.clone());
            }
        }
    }

    fn broadcast(&self, room: &str, event: Value) {
        let mut hub = self.lock();
        for s in hub.room_sessions(room) {
            s.push(event.clone());
        }
    }

    /// Tells every client the node is going away.
    pub fn shutdown_notice(&self) {
        let mut hub = self.lock();
        for s in hub.sessions.values_mut() {
            s.push(json!({"type":"shutdown"}));
        }
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

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `GET /v1/rooms/{room}/ws`: authenticates before looking at the upgrade,
/// so a plain GET learns why a connection would be refused.
pub async fn upgrade(
    State(state): State<AppState>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let claims = state.authorize(&headers, query.as_deref(), Some(&room), Grant::Either)?;
    validate_room(&room)?;
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is draining; connect to another node",
        ));
    }
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            format!("this endpoint speaks WebSocket: {e}"),
        )
    })?;
    let resume = query_param(query.as_deref(), "resume").map(str::to_string);
    let last_seq = query_param(query.as_deref(), "last_seq").and_then(|s| s.parse::<u64>().ok());
    Ok(ws
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| run_socket(state, room, claims, resume, last_seq, socket))
        .into_response())
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Publish { sdp: String },
    Subscribe { participant: String, sdp: String },
    Unsubscribe { peer: String },
    Unpublish { peer: String },
    Layer { peer: String, rid: Option<String> },
    Chat { text: String },
    Data { payload: Value },
    Ping,
    Leave,
}

fn request_type(v: &Value) -> String {
    v.get("type")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .chars()
        .take(32)
        .collect()
}

async fn run_socket(
    state: AppState,
    room: String,
    claims: Claims,
    resume: Option<String>,
    last_seq: Option<u64>,
    socket: WebSocket,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(SOCKET_QUEUE);

    // Attach to an existing session or create one.
    let mut resumed = None;
    let mut resume_error = None;
    let socket_id;
    {
        let mut hub = state.hub.lock();
        hub.next_socket += 1;
        socket_id = hub.next_socket;
        if let Some(token) = &resume {
            match hub.by_resume.get(token).copied() {
                Some(p) => {
                    if let Some(s) = hub.sessions.get_mut(&p)
                        && s.identity == claims.sub
                        && s.room == room
                    {
                        s.socket = Some((socket_id, tx.clone()));
                        s.detached_at = None;
                        // The replay is taken under the same lock as the
                        // attach: every later event goes to the new socket
                        // only, so none is lost or sent twice.
                        let from = last_seq.unwrap_or(s.seq);
                        let replay: Vec<String> = s
                            .history
                            .iter()
                            .filter(|(n, _)| *n > from)
                            .map(|(_, t)| t.clone())
                            .collect();
                        resumed = Some((p, s.resume.clone(), s.seq, replay));
                    } else {
                        resume_error = Some(
                            "the resume token belongs to another identity or room; \
                             starting a new session",
                        );
                    }
                }
                None => {
                    resume_error = Some("unknown or expired resume token; starting a new session")
                }
            }
        }
    }
    let was_resumed = resumed.is_some();
    // `seq` of the welcome: what the session had numbered when this socket
    // attached; everything after it comes through `rx`.
    let (participant, resume_token, seq, replay) = match resumed {
        Some((p, token, seq, replay)) => (p, token, seq, replay),
        None => match state.media.join(&room, &claims.sub).await {
            Ok(p) => {
                let token = format!("{:032x}", rand::random::<u128>());
                let mut hub = state.hub.lock();
                hub.by_resume.insert(token.clone(), p);
                hub.sessions.insert(
                    p,
                    Session {
                        room: room.clone(),
                        identity: claims.sub.clone(),
                        participant: p,
                        resume: token.clone(),
                        seq: 0,
                        history: VecDeque::new(),
                        socket: Some((socket_id, tx.clone())),
                        detached_at: None,
                        peers: Vec::new(),
                    },
                );
                (p, token, 0, Vec::new())
            }
            Err(e) => {
                let msg =
                    json!({"type":"error","message":e.to_string(),"request":"join"}).to_string();
                let _ = sink.send(Message::Text(msg.into())).await;
                let _ = sink.close().await;
                return;
            }
        },
    };
    state.metrics.ws_sessions.inc();
    tracing::info!(%room, identity = %claims.sub, %participant, resumed = was_resumed, "room session attached");

    // Welcome, then the replay of missed events.
    let room_state = state.media.room_state(&room).await;
    let welcome = json!({
        "type": "welcome",
        "participant": participant.to_string(),
        "identity": claims.sub,
        "resume": resume_token,
        "participants": room_state.participants.iter()
            .filter(|(p, _)| *p != participant)
            .map(|(p, i)| json!({"participant": p.to_string(), "identity": i}))
            .collect::<Vec<_>>(),
        "tracks": room_state.tracks.iter().map(track_json).collect::<Vec<_>>(),
        "seq": seq,
    });
    let mut outgoing = vec![welcome.to_string()];
    if let Some(m) = resume_error {
        outgoing.push(json!({"type":"error","message":m,"request":"resume"}).to_string());
    }
    outgoing.extend(replay);
    for m in outgoing {
        if sink.send(Message::Text(m.into())).await.is_err() {
            break;
        }
        state.metrics.ws_messages_out.inc();
    }

    let mut last_heard = Instant::now();
    let mut silence = tokio::time::interval(Duration::from_secs(5));
    let mut left = false;
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(text) = out else { break };
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
                state.metrics.ws_messages_out.inc();
            }
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { break };
                last_heard = Instant::now();
                let text = match msg {
                    Message::Text(t) => t.to_string(),
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Binary(_) => {
                        state.metrics.bad_requests.get_or_create(&crate::metrics::ReasonLabels { reason: "ws_message" }).inc();
                        let e = json!({"type":"error","message":"binary frames are not part of the room API; send JSON text","request":"binary"});
                        let _ = tx.try_send(e.to_string());
                        continue;
                    }
                };
                state.metrics.ws_messages_in.inc();
                match handle_message(&state, &room, &claims, participant, &text).await {
                    Ok(Some(reply)) => { let _ = tx.try_send(reply.to_string()); }
                    Ok(None) => {}
                    Err(Leave) => { left = true; break; }
                }
            }
            _ = silence.tick() => {
                if last_heard.elapsed() > SILENCE_LIMIT {
                    tracing::info!(%participant, "room session silent; detaching");
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: 4000, reason: "heartbeat timeout".into() }))).await;
                    break;
                }
            }
        }
    }
    state.metrics.ws_sessions.dec();
    if left {
        {
            let mut hub = state.hub.lock();
            if let Some(s) = hub.sessions.remove(&participant) {
                hub.by_resume.remove(&s.resume);
            }
        }
        let _ = state.media.leave(participant).await;
        let _ = sink.send(Message::Close(None)).await;
        tracing::info!(%participant, "left the room");
    } else {
        // Keep the participant for a resume, unless another socket took over.
        let mut hub = state.hub.lock();
        if let Some(s) = hub.sessions.get_mut(&participant)
            && s.socket.as_ref().is_some_and(|(id, _)| *id == socket_id)
        {
            s.socket = None;
            s.detached_at = Some(Instant::now());
        }
    }
}

struct Leave;

async fn handle_message(
    state: &AppState,
    room: &str,
    claims: &Claims,
    participant: ParticipantId,
    text: &str,
) -> Result<Option<Value>, Leave> {
    let raw: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Ok(Some(ws_error(state, "invalid", &format!("not JSON: {e}")))),
    };
    let request = request_type(&raw);
    let msg: ClientMessage = match serde_json::from_value(raw) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Some(ws_error(
                state,
                &request,
                &format!("bad `{request}` message: {e}"),
            )));
        }
    };
    let refuse = |m: &str| Ok(Some(ws_error(state, &request, m)));
    match msg {
        ClientMessage::Ping => Ok(Some(json!({"type":"pong"}))),
        ClientMessage::Leave => Err(Leave),
        ClientMessage::Publish { sdp } => {
            if !claims.can_publish {
                return refuse("the access token lacks the can_publish grant");
            }
            offer(state, participant, sdp, OfferIntent::Publish, &request).await
        }
        ClientMessage::Subscribe {
            participant: from,
            sdp,
        } => {
            if !claims.can_subscribe {
                return refuse("the access token lacks the can_subscribe grant");
            }
            let Ok(from) = from.parse::<ParticipantId>() else {
                return refuse("participant must be an id like \"p-1\"");
            };
            offer(
                state,
                participant,
                sdp,
                OfferIntent::Subscribe { from: Some(from) },
                &request,
            )
            .await
        }
        ClientMessage::Unsubscribe { peer } | ClientMessage::Unpublish { peer } => {
            let Some(peer) = own_peer(state, participant, &peer) else {
                return refuse("no such peer in this session");
            };
            if let Err(e) = state.media.remove_peer(peer).await {
                return refuse(&e.to_string());
            }
            if let Some(s) = state.hub.lock().sessions.get_mut(&participant) {
                s.peers.retain(|p| *p != peer);
            }
            Ok(None)
        }
        ClientMessage::Layer { peer, rid } => {
            let Some(peer) = own_peer(state, participant, &peer) else {
                return refuse("no such peer in this session");
            };
            match state.media.set_layer(peer, rid).await {
                Ok(()) => Ok(None),
                Err(e) => refuse(&e.to_string()),
            }
        }
        ClientMessage::Chat { text } => {
            if text.is_empty() || text.len() > MAX_CHAT {
                return refuse("chat text must be 1-4096 bytes");
            }
            state.hub.broadcast(
                room,
                json!({"type":"chat","from":participant.to_string(),"identity":claims.sub,"text":text}),
            );
            Ok(None)
        }
        ClientMessage::Data { payload } => {
            if payload.to_string().len() > MAX_DATA {
                return refuse("data payloads are limited to 16 KiB");
            }
            state.hub.broadcast(
                room,
                json!({"type":"data","from":participant.to_string(),"identity":claims.sub,"payload":payload}),
            );
            Ok(None)
        }
    }
}

fn own_peer(state: &AppState, participant: ParticipantId, peer: &str) -> Option<PeerId> {
    let peer: PeerId = peer.parse().ok()?;
    let hub = state.hub.lock();
    hub.sessions
        .get(&participant)
        .filter(|s| s.peers.contains(&peer))
        .map(|_| peer)
}

async fn offer(
    state: &AppState,
    participant: ParticipantId,
    sdp: String,
    intent: OfferIntent,
    request: &str,
) -> Result<Option<Value>, Leave> {
    match state.media.offer(participant, sdp, intent).await {
        Ok((peer, answer)) => {
            if let Some(s) = state.hub.lock().sessions.get_mut(&participant) {
                s.peers.push(peer);
            }
            Ok(Some(
                json!({"type":"answer","peer":peer.to_string(),"sdp":answer}),
            ))
        }
        Err(e) => Ok(Some(ws_error(state, request, &e.to_string()))),
    }
}

fn ws_error(state: &AppState, request: &str, message: &str) -> Value {
    state
        .metrics
        .bad_requests
        .get_or_create(&crate::metrics::ReasonLabels {
            reason: "ws_message",
        })
        .inc();
    json!({"type":"error","message":message,"request":request})
}
