//! The WebSocket room API (docs/api.md), one socket at a time: attach to a
//! session of the [`hub`](super::hub) (or resume one, with replay of its
//! sequence-numbered events, so a client that reconnects loses nothing),
//! heartbeats and detach on silence, and the client's requests.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use ridge_sfu::{OfferIntent, ParticipantId, PeerId};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::auth::{Claims, Grant};
use super::error::{ApiError, validate_room};
use super::hub::{Session, track_json};
use super::state::AppState;
use crate::metrics::ReasonLabels;

/// A session that sent nothing for this long is detached.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// Outgoing messages queued per socket before it is considered stuck.
const SOCKET_QUEUE: usize = 512;
const MAX_CHAT: usize = 4096;
const MAX_DATA: usize = 16 * 1024;

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
    state.refuse_if_draining()?;
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
                        state.metrics.bad_requests.get_or_create(&ReasonLabels { reason: "ws_message" }).inc();
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
        .get_or_create(&ReasonLabels {
            reason: "ws_message",
        })
        .inc();
    json!({"type":"error","message":message,"request":request})
}
