//! The WebSocket room API (docs/api.md), one socket at a time: attach to a
//! session of the [`hub`](super::hub) (or resume one, with replay of its
//! sequence-numbered events, so a client that reconnects loses nothing),
//! heartbeats and detach on silence, and the client's requests.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use ridge_sfu::{OfferIntent, ParticipantId, PeerId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{ANY_ROOM, Claims, Grant, LEEWAY_SECS};
use super::error::{ApiError, validate_room};
use super::hub::{Session, track_json};
use super::limits::WsPermit;
use super::state::AppState;
use crate::metrics::ReasonLabels;

/// A session that sent nothing for this long is detached.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// A socket whose reader takes longer than this to accept one message is
/// dropped as a slow reader.
const SEND_STALL: Duration = Duration::from_secs(10);
/// The longest wait for a close frame to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
const MAX_CHAT: usize = 4096;
const MAX_DATA: usize = 16 * 1024;
/// Largest message a client may send (an SDP offer with simulcast is ~10 KiB).
const MAX_MESSAGE: usize = 64 * 1024;
/// Close codes of the room API (docs/api.md).
const CLOSE_HEARTBEAT: u16 = 4000;
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
const CLOSE_SLOW_READER: u16 = 4008;
const CLOSE_LIMIT: u16 = 4029;

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `GET /v1/rooms/{room}/ws`: authenticates before looking at the upgrade,
/// so a plain GET learns why a connection would be refused; a session past
/// a WebSocket limit is refused here with 429 naming the limit.
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
    // A resume takes over its session's place; anything else needs one.
    let resumable = resume
        .as_deref()
        .is_some_and(|t| state.hub.can_resume(t, &claims.sub, &room));
    let permit = if resumable {
        None
    } else {
        Some(admit(&state, &claims)?)
    };
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        // Small buffers per idle socket; writes go straight to the socket
        // (every send is flushed anyway) and never pile up past one message.
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .on_upgrade(move |socket| run_socket(state, room, claims, resume, last_seq, permit, socket))
        .into_response())
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Publish {
        sdp: String,
    },
    Subscribe {
        participant: String,
        sdp: String,
    },
    Unsubscribe {
        peer: String,
    },
    Unpublish {
        peer: String,
    },
    Layer {
        peer: String,
        rid: Option<String>,
    },
    SvcLayers {
        peer: String,
        spatial: Option<u8>,
        temporal: Option<u8>,
    },
    Chat {
        text: String,
    },
    Data {
        payload: Value,
    },
    Refresh {
        token: String,
    },
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

/// How long from now until the unix time `t` (zero if past), at most a year
/// (a development token expires in 2100).
fn until_unix(t: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(t)
        .saturating_sub(now)
        .min(Duration::from_secs(365 * 24 * 3600))
}

/// When the session of a token with `exp` gets `token_expiring`, and when
/// it is closed (`exp` plus the leeway tokens are checked with).
fn expiry_deadlines(exp: u64, warning: Duration) -> (tokio::time::Instant, tokio::time::Instant) {
    let now = tokio::time::Instant::now();
    let end = now + until_unix(exp.saturating_add(LEEWAY_SECS));
    let warn = now + until_unix(exp).saturating_sub(warning);
    (warn, end)
}

/// Sends a close frame if the socket takes it within [`CLOSE_WAIT`].
/// A new room session's places: one in the WebSocket caps, and one among
/// the node's sessions in the cores' quota ledger, under the same
/// per-identity, per-token and node-wide limits as WHIP, WHEP and RTP
/// sessions (refused with 429 naming the limit, or 503 when the node is
/// full).
fn admit(state: &AppState, claims: &Claims) -> Result<WsPermit, ApiError> {
    let permit = state
        .ws
        .admit(&claims.sub)
        .map_err(|r| ApiError::new(StatusCode::TOO_MANY_REQUESTS, r.to_string()))?;
    let (ledger, quotas) = state.media.quotas();
    let slot = ledger.reserve_session(quotas, &claims.owner())?;
    Ok(permit.with_slot(slot))
}

async fn close_with(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    code: u16,
    reason: &str,
) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }));
    let _ = tokio::time::timeout(CLOSE_WAIT, sink.send(frame)).await;
}

/// Why a socket's loop ended.
#[derive(PartialEq, Eq)]
enum End {
    /// The client left, or its token expired: the session goes.
    Leave,
    /// The socket went away: the session waits for a resume.
    Detach,
}

async fn run_socket(
    state: AppState,
    room: String,
    mut claims: Claims,
    resume: Option<String>,
    last_seq: Option<u64>,
    mut permit: Option<WsPermit>,
    socket: WebSocket,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = state.ws.queue();
    let kick = rx.kick_watch();

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
                        let complete = from >= s.oldest_kept();
                        let replay: Vec<Arc<str>> = s
                            .history
                            .iter()
                            .filter(|(n, _)| *n > from)
                            .map(|(_, t)| t.clone())
                            .collect();
                        resumed = Some((p, s.resume.clone(), s.seq, replay, complete));
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
    if was_resumed {
        // The resumed session holds its own place.
        permit = None;
    } else if permit.is_none() {
        // The session to resume went between the upgrade and now.
        match admit(&state, &claims) {
            Ok(p) => permit = Some(p),
            Err(e) => {
                let msg =
                    json!({"type":"error","message":e.message,"request":"join","code":"limit"});
                let _ = tokio::time::timeout(
                    CLOSE_WAIT,
                    sink.send(Message::Text(msg.to_string().into())),
                )
                .await;
                close_with(&mut sink, CLOSE_LIMIT, e.limit.unwrap_or("limit")).await;
                return;
            }
        }
    }
    // `seq` of the welcome: what the session had numbered when this socket
    // attached; everything after it comes through `rx`.
    let (participant, resume_token, seq, replay, complete) = match resumed {
        Some(r) => r,
        None => match state.media.join_as(&room, claims.owner()).await {
            Ok(p) => {
                let token = format!("{:032x}", rand::random::<u128>());
                let Some(permit) = permit.take() else {
                    return;
                };
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
                        history_bytes: 0,
                        resume_limit: state.ws.config.resume_buffer_bytes,
                        socket: Some((socket_id, tx.clone())),
                        detached_at: None,
                        peers: Vec::new(),
                        bucket: state.ws.bucket(Instant::now()),
                        _permit: permit,
                    },
                );
                (p, token, 0, Vec::new(), true)
            }
            Err(e) => {
                let msg =
                    json!({"type":"error","message":e.to_string(),"request":"join"}).to_string();
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, sink.send(Message::Text(msg.into()))).await;
                let _ = tokio::time::timeout(CLOSE_WAIT, sink.close()).await;
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
        "token_exp": claims.exp,
    });
    let mut outgoing: Vec<Arc<str>> = vec![Arc::from(welcome.to_string())];
    if let Some(m) = resume_error {
        outgoing.push(Arc::from(
            json!({"type":"error","message":m,"request":"resume"}).to_string(),
        ));
    }
    if !complete {
        outgoing.push(Arc::from(
            json!({"type":"error","code":"replay_incomplete","request":"resume",
                "message":"some events since last_seq were dropped from the resume buffer \
                           (ws_resume_buffer_bytes); the welcome carries the room's current state"})
            .to_string(),
        ));
    }
    outgoing.extend(replay);
    let mut end = End::Detach;
    let mut healthy = true;
    for m in outgoing {
        match tokio::time::timeout(SEND_STALL, sink.send(Message::Text((*m).into()))).await {
            Ok(Ok(())) => {
                state.metrics.ws_messages_out.inc();
            }
            _ => {
                healthy = false;
                break;
            }
        }
    }

    let mut last_heard = Instant::now();
    let mut silence = tokio::time::interval(Duration::from_secs(5));
    let (mut warn_at, mut expire_at) = expiry_deadlines(claims.exp, state.ws.config.token_warning);
    let mut warned = false;
    loop {
        if !healthy {
            break;
        }
        tokio::select! {
            out = rx.recv() => {
                let Some(text) = out else { break };
                let sent = tokio::select! {
                    r = sink.send(Message::Text((*text).into())) => r.is_ok(),
                    () = kick.kicked() => false,
                    () = tokio::time::sleep(SEND_STALL) => {
                        // Counted like a queue overflow: the reader stalls.
                        state.metrics.ws_slow_consumers.inc();
                        false
                    }
                };
                if !sent {
                    break;
                }
                state.metrics.ws_messages_out.inc();
            }
            () = kick.kicked() => {
                tracing::info!(%participant, "room socket too slow for its send queue; closing");
                close_with(&mut sink, CLOSE_SLOW_READER, "slow reader: send queue full; resume to catch up").await;
                break;
            }
            () = tokio::time::sleep_until(warn_at), if !warned => {
                warned = true;
                let m = json!({"type":"token_expiring","exp":claims.exp,
                    "in_secs": until_unix(claims.exp).as_secs()});
                if !tx.send(Arc::from(m.to_string())) {
                    break;
                }
            }
            () = tokio::time::sleep_until(expire_at) => {
                tracing::info!(%participant, identity = %claims.sub, "room session's token expired; closing");
                state.metrics.ws_token_expired.inc();
                close_with(&mut sink, CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a fresh token").await;
                end = End::Leave;
                break;
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
                        let _ = tx.send(Arc::from(e.to_string()));
                        continue;
                    }
                };
                state.metrics.ws_messages_in.inc();
                let reply = match handle_message(&state, &room, &claims, participant, &text).await {
                    Ok(reply) => reply,
                    Err(Control::Leave) => { end = End::Leave; break; }
                    Err(Control::Refresh(token)) => match refresh(&state, &room, &claims, &token) {
                        Ok(fresh) => {
                            claims = fresh;
                            (warn_at, expire_at) = expiry_deadlines(claims.exp, state.ws.config.token_warning);
                            warned = false;
                            tracing::info!(%participant, "room session's token refreshed");
                            Some(json!({"type":"refreshed","exp":claims.exp}))
                        }
                        Err(m) => Some(ws_error(&state, "refresh", &m)),
                    },
                };
                if let Some(reply) = reply
                    && !tx.send(Arc::from(reply.to_string()))
                {
                    break;
                }
            }
            _ = silence.tick() => {
                if last_heard.elapsed() > SILENCE_LIMIT {
                    tracing::info!(%participant, "room session silent; detaching");
                    close_with(&mut sink, CLOSE_HEARTBEAT, "heartbeat timeout").await;
                    break;
                }
            }
        }
    }
    state.metrics.ws_sessions.dec();
    if end == End::Leave {
        {
            let mut hub = state.hub.lock();
            if let Some(s) = hub.sessions.remove(&participant) {
                hub.by_resume.remove(&s.resume);
            }
        }
        let _ = state.media.leave(participant).await;
        let _ = tokio::time::timeout(CLOSE_WAIT, sink.send(Message::Close(None))).await;
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

/// Checks a fresh token presented with `refresh`: valid, the same identity,
/// a room the session's token also admitted to, no grant the session lacks.
fn refresh(state: &AppState, room: &str, old: &Claims, token: &str) -> Result<Claims, String> {
    let fresh = state.auth.verify(token).map_err(|e| {
        state
            .metrics
            .auth_failures
            .get_or_create(&ReasonLabels { reason: e.reason() })
            .inc();
        format!("the fresh token is refused: {e}")
    })?;
    if fresh.sub != old.sub {
        return Err("the fresh token names another identity".into());
    }
    if !fresh.admits_room(room) || (old.room != ANY_ROOM && fresh.room != old.room) {
        return Err("the fresh token is for another room".into());
    }
    if (fresh.can_publish && !old.can_publish)
        || (fresh.can_subscribe && !old.can_subscribe)
        || (fresh.admin && !old.admin)
    {
        return Err("the fresh token carries grants the session's token lacks".into());
    }
    Ok(fresh)
}

/// What a client message asks of the socket loop itself.
enum Control {
    Leave,
    Refresh(String),
}

async fn handle_message(
    state: &AppState,
    room: &str,
    claims: &Claims,
    participant: ParticipantId,
    text: &str,
) -> Result<Option<Value>, Control> {
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
        ClientMessage::Leave => Err(Control::Leave),
        ClientMessage::Refresh { token } => Err(Control::Refresh(token)),
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
        ClientMessage::SvcLayers {
            peer,
            spatial,
            temporal,
        } => {
            let Some(peer) = own_peer(state, participant, &peer) else {
                return refuse("no such peer in this session");
            };
            match state.media.set_svc_layers(peer, spatial, temporal).await {
                Ok(()) => Ok(None),
                Err(e) => refuse(&e.to_string()),
            }
        }
        ClientMessage::Chat { text } => {
            if text.is_empty() || text.len() > MAX_CHAT {
                return refuse("chat text must be 1-4096 bytes");
            }
            if !take_token(state, participant) {
                return Ok(Some(rate_limited(state, "chat")));
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
            if !take_token(state, participant) {
                return Ok(Some(rate_limited(state, "data")));
            }
            state.hub.broadcast(
                room,
                json!({"type":"data","from":participant.to_string(),"identity":claims.sub,"payload":payload}),
            );
            Ok(None)
        }
    }
}

/// Takes one chat/data token of the participant's bucket.
fn take_token(state: &AppState, participant: ParticipantId) -> bool {
    state
        .hub
        .lock()
        .sessions
        .get_mut(&participant)
        .is_some_and(|s| s.bucket.take(Instant::now()))
}

fn rate_limited(state: &AppState, kind: &'static str) -> Value {
    state.ws.rate_limited(kind);
    let c = &state.ws.config;
    json!({
        "type": "error",
        "request": kind,
        "code": "rate_limited",
        "message": format!(
            "chat and data messages are limited to {} a second with bursts of {} per \
             participant (ws_message_rate, ws_message_burst); this one was dropped",
            c.message_rate, c.message_burst
        ),
    })
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
) -> Result<Option<Value>, Control> {
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
