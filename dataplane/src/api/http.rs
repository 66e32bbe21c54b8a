//! The router and the HTTP handlers: WHIP, WHEP, plain RTP endpoints,
//! `/metrics`, `/healthz` and the demo page; the WebSocket room API's
//! upgrade is routed here and served by [`super::ws`]. Every route
//! authenticates (see docs/api.md).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use ridge_sfu::{
    CodecSpec, OfferIntent, PeerId, RtpDirection, RtpEndpointSpec, SfuError, TrackId, TrackKind,
};
use serde::Deserialize;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::auth::Grant;
use super::error::{ApiError, validate_room};
use super::state::AppState;
use super::ws;
use crate::metrics::{HttpLabels, ReasonLabels};
use crate::shard::handle::ShardError;

/// Largest request body accepted (an SDP offer with simulcast is ~10 KiB).
const MAX_BODY: usize = 128 * 1024;

pub fn router(state: AppState) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
        ])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([header::LOCATION, header::LINK, header::ETAG]);
    Router::new()
        .route("/", get(demo_page))
        .route("/ridge.js", get(demo_script))
        .route("/whip/{room}", post(whip))
        .route("/whip/{room}/{session}", delete(end_session))
        .route("/whep/{room}", post(whep))
        .route("/whep/{room}/{session}", delete(end_session))
        .route("/whep/{room}/{session}/layer", post(whep_layer))
        .route("/v1/rooms/{room}/rtp", post(rtp_create))
        .route("/v1/rooms/{room}/rtp/{session}", delete(end_session))
        .route("/v1/rooms/{room}/ws", get(ws::upgrade))
        .route(
            "/v1/rooms/{room}/codecs",
            get(room_codecs_get).put(room_codecs_put),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        // SDP offers and JSON bodies are a few KiB; refuse anything larger.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(cors)
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(req).await;
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route; see docs/api.md")
}

fn require_sdp(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<String, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .trim()
        .to_ascii_lowercase()
        .starts_with("application/sdp")
    {
        state
            .metrics
            .bad_requests
            .get_or_create(&ReasonLabels {
                reason: "content_type",
            })
            .inc();
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the offer must be sent with Content-Type: application/sdp",
        ));
    }
    let sdp =
        std::str::from_utf8(body).map_err(|_| state.bad("sdp", "the SDP offer is not UTF-8"))?;
    if !sdp.trim_start().starts_with("v=0") {
        return Err(state.bad("sdp", "malformed SDP offer: it must start with \"v=0\""));
    }
    Ok(sdp.to_string())
}

/// A session the core refused: a quota is `429` naming the limit, another
/// client error a `400` counted under `reason`, anything else the node's.
fn refusal(state: &AppState, reason: &'static str, e: ShardError) -> ApiError {
    match e {
        ShardError::Sfu(e @ SfuError::Quota { .. }) => e.into(),
        e if e.is_client_error() => state.bad(reason, e.to_string()),
        e => e.into(),
    }
}

fn sdp_created(location: String, answer: String) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_string()),
            (header::LOCATION, location),
        ],
        answer,
    )
        .into_response()
}

async fn negotiate(
    state: &AppState,
    kind: &'static str,
    room: String,
    headers: HeaderMap,
    query: Option<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let grant = if kind == "whip" {
        Grant::Publish
    } else {
        Grant::Subscribe
    };
    let claims = state.authorize(&headers, query.as_deref(), Some(&room), grant)?;
    validate_room(&room)?;
    state.refuse_if_draining()?;
    let sdp = require_sdp(state, &headers, &body)?;
    let intent = if kind == "whip" {
        OfferIntent::Publish
    } else {
        OfferIntent::Subscribe { from: None }
    };
    let (peer, answer) = state
        .media
        .session_as(&room, claims.owner(), sdp, intent)
        .await
        .map_err(|e| refusal(state, "sdp", e))?;
    tracing::info!(%room, identity = %claims.sub, %peer, kind, "session created");
    Ok(sdp_created(format!("/{kind}/{room}/{peer}"), answer))
}

async fn whip(
    State(state): State<AppState>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    negotiate(&state, "whip", room, headers, query, body).await
}

async fn whep(
    State(state): State<AppState>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    negotiate(&state, "whep", room, headers, query, body).await
}

/// Resolves a session id from a URL and checks the caller may act on it:
/// its own session, or any session with an admin token.
async fn owned_session(
    state: &AppState,
    room: &str,
    session: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<PeerId, ApiError> {
    // An admin token ends any session, in any room, without media grants;
    // any other token must admit to the room and carry a media grant.
    let claims = state.authorize_or_admin(headers, query, room, Grant::Either)?;
    let peer: PeerId = session
        .parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("no session {session}")))?;
    let Some((_, peer_room, identity)) = state.media.peer_owner(peer).await else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no session {session}"),
        ));
    };
    if peer_room != room {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no session {session}"),
        ));
    }
    if identity != claims.sub && !claims.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this session belongs to another identity",
        ));
    }
    Ok(peer)
}

async fn end_session(
    State(state): State<AppState>,
    Path((room, session)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let peer = owned_session(&state, &room, &session, &headers, query.as_deref()).await?;
    state.media.remove_peer(peer).await?;
    tracing::info!(%room, %peer, "session ended by client");
    Ok((StatusCode::OK, axum::Json(json!({ "status": "ended" }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerRequest {
    rid: Option<String>,
    /// The highest spatial layer of scalable video (VP9 SVC) to receive.
    spatial: Option<u8>,
    /// The highest temporal layer of scalable video (VP9 SVC, VP8
    /// temporal layers) to receive.
    temporal: Option<u8>,
}

async fn whep_layer(
    State(state): State<AppState>,
    Path((room, session)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let peer = owned_session(&state, &room, &session, &headers, query.as_deref()).await?;
    let expected = |e: serde_json::Error| {
        state.bad(
            "json",
            format!(
                "expected {{\"rid\": \"q\"|\"h\"|\"f\"|null}} or \
                 {{\"spatial\": N|null, \"temporal\": N|null}}: {e}"
            ),
        )
    };
    let raw: serde_json::Value = serde_json::from_slice(&body).map_err(expected)?;
    // Which pins the body names: a simulcast rid, scalable layers, or
    // (`{}`) the rid, unpinned, as before layers existed.
    let names = |k: &str| raw.get(k).is_some();
    let (simulcast, scalable) = (names("rid"), names("spatial") || names("temporal"));
    let req: LayerRequest = serde_json::from_value(raw).map_err(expected)?;
    if let Some(r) = &req.rid
        && (r.is_empty() || r.len() > 16 || !r.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err(state.bad("json", "rid must be 1-16 alphanumeric characters"));
    }
    if simulcast || !scalable {
        state.media.set_layer(peer, req.rid).await?;
    }
    if scalable {
        state
            .media
            .set_svc_layers(peer, req.spatial, req.temporal)
            .await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RtpRequest {
    direction: RtpDirection,
    kind: TrackKind,
    remote: SocketAddr,
    payload_type: u8,
    ssrc: Option<u32>,
    track: Option<String>,
    /// Publish, audio: the one-byte header-extension id of the RFC 6464
    /// audio level the remote sends.
    audio_level_ext: Option<u8>,
    /// The stream's codec: publish, what the remote sends (default: the
    /// kind's, Opus or VP8); subscribe, the only codec the remote takes
    /// (default: any).
    codec: Option<CodecSpec>,
    /// Publish: the codec's format parameters, as in an SDP `a=fmtp` line.
    fmtp: Option<String>,
}

async fn rtp_create(
    State(state): State<AppState>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = serde_json::from_slice::<RtpRequest>(&body);
    // Authenticate before reporting body errors, so strangers learn nothing.
    let grant = match &req {
        Ok(r) if r.direction == RtpDirection::Subscribe => Grant::Subscribe,
        Ok(_) => Grant::Publish,
        Err(_) => Grant::Either,
    };
    let claims = state.authorize(&headers, query.as_deref(), Some(&room), grant)?;
    validate_room(&room)?;
    let req = req.map_err(|e| {
        state.bad(
            "json",
            format!(
                "expected {{\"direction\":\"publish\"|\"subscribe\",\"kind\":\"audio\"|\"video\",\
                 \"remote\":\"IP:PORT\",\"payload_type\":N,\"ssrc\":N,\
                 \"codec\":\"opus\"|\"vp8\"|\"h264\"|\"vp9\"|\"av1\",\"fmtp\":\"...\"}}: {e}"
            ),
        )
    })?;
    state.refuse_if_draining()?;
    let track = match &req.track {
        Some(t) => Some(t.parse::<TrackId>().map_err(|_| {
            state.bad(
                "json",
                format!("track {t:?} is not a track id like \"t-3\""),
            )
        })?),
        None => None,
    };
    let spec = RtpEndpointSpec {
        codec: req.codec,
        fmtp: req.fmtp,
        audio_level_ext: req.audio_level_ext,
        direction: req.direction,
        kind: req.kind,
        remote: req.remote,
        payload_type: req.payload_type,
        ssrc: req.ssrc,
        track,
    };
    let info = state
        .media
        .rtp_endpoint_as(&room, claims.owner(), spec)
        .await
        .map_err(|e| refusal(&state, "rtp", e))?;
    let location = format!("/v1/rooms/{room}/rtp/{}", info.peer);
    let body = json!({
        "id": info.peer.to_string(),
        "local": info.local.to_string(),
        "ssrc": info.ssrc,
        "track": info.track.map(|t| t.to_string()),
    });
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(body),
    )
        .into_response())
}

/// `PUT /v1/rooms/{room}/codecs` (admin): the room's own codec list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomCodecs {
    /// In order of preference; `null` follows the node's list again.
    codecs: Option<Vec<CodecSpec>>,
}

async fn room_codecs_put(
    State(state): State<AppState>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.authorize(&headers, query.as_deref(), None, Grant::Admin)?;
    validate_room(&room)?;
    let req: RoomCodecs = serde_json::from_slice(&body).map_err(|e| {
        state.bad(
            "json",
            format!(
                "expected {{\"codecs\": [\"opus\"|\"vp8\"|\"h264\"|\"vp9\"|\"av1\", ...] | null}}: {e}"
            ),
        )
    })?;
    state
        .media
        .set_room_codecs(&room, req.codecs.clone())
        .await?;
    tracing::info!(%room, codecs = ?req.codecs, "room codec list set");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn room_codecs_get(
    State(state): State<AppState>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, query.as_deref(), None, Grant::Admin)?;
    validate_room(&room)?;
    let own = state.media.room_codecs(&room).await?;
    Ok(axum::Json(json!({ "room": room, "codecs": own })).into_response())
}

async fn metrics(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, query.as_deref(), None, Grant::Admin)?;
    if let Some((snapshot, _)) = state.media.stats().await {
        state.metrics.set_snapshot(snapshot);
    }
    let body = crate::metrics::encode(&state.registry);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// `GET /livez`, unauthenticated: the process is up and serving HTTP.
/// Status code only.
async fn livez() -> StatusCode {
    StatusCode::OK
}

/// `GET /readyz`, unauthenticated: 200 while every media shard answers and
/// the node is not draining, 503 otherwise. Status code only. The shards
/// are asked at most once a second, however often the probe is called.
async fn readyz(State(state): State<AppState>) -> StatusCode {
    if state.draining.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let ok = state
        .ready
        .check(|| async { state.media.stats().await.is_some() })
        .await;
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn healthz(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, query.as_deref(), None, Grant::Admin)?;
    let draining = state.draining.load(Ordering::Relaxed);
    let sessions = state.media.stats().await.map(|(_, n)| n);
    let (status, text) = match (draining, sessions) {
        (_, None) => (StatusCode::SERVICE_UNAVAILABLE, "media_thread_down"),
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (false, Some(_)) => (StatusCode::OK, "ok"),
    };
    Ok((
        status,
        axum::Json(json!({
            "status": text,
            "sessions": sessions,
            "media": state.media.local_addr().to_string(),
            "media_shards": state.media.local_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "shard_ports": state.media.shard_ports(),
            "io_backend": match state.media.backend() {
                ridge_io::Backend::Uring => "io_uring",
                ridge_io::Backend::Mmsg => "mmsg",
            },
            "xdp": state.kernel.mode().as_str(),
            "kernel_forwarding": state.kernel.forwarding(),
            "kernel_flows": state.kernel.flow_count(),
            "version": env!("CARGO_PKG_VERSION"),
        })),
    )
        .into_response())
}

const INDEX_HTML: &str = include_str!("../../static/index.html");
const RIDGE_JS: &str = include_str!("../../static/ridge.js");

async fn demo_page(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state
        .authorize(&headers, query.as_deref(), None, Grant::Either)
        .map_err(|e| {
            ApiError::new(
                e.status,
                format!(
                    "{}; open the URL that `ridge-dataplane` printed at start-up \
                 (it carries ?token=...), or mint one with `ridge-dataplane token`",
                    e.message
                ),
            )
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        INDEX_HTML,
    )
        .into_response())
}

async fn demo_script(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, query.as_deref(), None, Grant::Either)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        RIDGE_JS,
    )
        .into_response())
}
