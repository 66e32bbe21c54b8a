//! The HTTPS API (docs/scheduler-api.md). Every route but the probes
//! (`/livez`, `/readyz`: a status code, no body) authenticates; bodies
//! are read with a size limit and parsed strictly, so a malformed request
//! gets a JSON error with a precise code.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::api;
use crate::crypto::ct_eq;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::{CodeLabels, HttpLabels, PhaseLabels, RouteLabels};
use crate::service::Scheduler;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest long poll.
pub const MAX_WAIT_SECS: u64 = 60;

/// The OpenAPI document served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route: (method, path template). The OpenAPI test checks that each
/// is documented.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/enroll"),
    ("post", "/v1/nodes/{id}/heartbeat"),
    ("get", "/v1/nodes/{id}/desired"),
    ("get", "/v1/dispatch"),
    ("post", "/v1/tokens"),
    ("get", "/v1/tokens"),
    ("delete", "/v1/tokens/{id}"),
    ("get", "/v1/nodes"),
    ("get", "/v1/nodes/{id}"),
    ("post", "/v1/nodes/{id}/drain"),
    ("get", "/v1/rooms"),
    ("get", "/v1/routes"),
    ("get", "/healthz"),
    ("get", "/livez"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

#[derive(Clone)]
struct AppState {
    sched: Arc<Scheduler>,
    registry: Arc<Registry>,
}

/// Builds the router.
pub fn router(sched: Arc<Scheduler>, registry: Arc<Registry>) -> Router {
    let state = AppState { sched, registry };
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/nodes/{id}/heartbeat", post(heartbeat))
        .route("/v1/nodes/{id}/desired", get(desired))
        .route("/v1/dispatch", get(dispatch))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(show_node))
        .route("/v1/nodes/{id}/drain", post(drain))
        .route("/v1/rooms", get(rooms))
        .route("/v1/routes", get(routes))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts requests by route and status, and errors by code; refuses new
/// requests while shutting down (long polls in flight finish).
async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let resp = if st.sched.shutting_down() && !matches!(route.as_str(), "/healthz" | "/livez") {
        ApiError::ShuttingDown.into_response()
    } else {
        next.run(req).await
    };
    let m = &st.sched.metrics;
    m.http_request_seconds
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&HttpLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    if let Some(ErrorCode(code)) = resp.extensions().get::<ErrorCode>() {
        m.errors.get_or_create(&CodeLabels { code }).inc();
    }
    resp
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get_all(AUTHORIZATION)
        .iter()
        .find_map(|v| {
            let (scheme, token) = v.to_str().ok()?.trim().split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        })
        .ok_or(ApiError::MissingCredential)
}

/// Which static secret a bearer matches.
#[derive(Debug, PartialEq, Eq)]
enum Static {
    Admin,
    Dispatch,
    None,
}

fn static_secret(st: &AppState, token: &str) -> Static {
    let c = &st.sched.config;
    if ct_eq(token.as_bytes(), c.admin_token.expose().as_bytes()) {
        Static::Admin
    } else if c
        .dispatch_token
        .as_ref()
        .is_some_and(|d| ct_eq(token.as_bytes(), d.expose().as_bytes()))
    {
        Static::Dispatch
    } else {
        Static::None
    }
}

/// Node tokens are JWTs (three dot-separated parts); static secrets aren't
/// required to be, so tell them apart by trying the static ones first.
async fn require_admin(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = bearer(headers)?;
    match static_secret(st, token) {
        Static::Admin => Ok(()),
        Static::Dispatch => Err(ApiError::Forbidden(
            "the dispatch token only grants /v1/dispatch".into(),
        )),
        Static::None => match st.sched.authenticate_node(token).await {
            Ok(_) => Err(ApiError::Forbidden(
                "node tokens cannot use operator endpoints".into(),
            )),
            Err(ApiError::InvalidCredential(_)) => Err(ApiError::InvalidCredential(
                "not a valid admin token".into(),
            )),
            Err(e) => Err(e),
        },
    }
}

async fn require_node(st: &AppState, headers: &HeaderMap, id: &str) -> Result<(), ApiError> {
    let token = bearer(headers)?;
    if static_secret(st, token) != Static::None {
        return Err(ApiError::Forbidden(
            "agent endpoints need the node's own token".into(),
        ));
    }
    let node = st.sched.authenticate_node(token).await?;
    if node != id {
        return Err(ApiError::NodeMismatch);
    }
    Ok(())
}

/// Reads and strictly parses a JSON body.
async fn json_body<T: DeserializeOwned>(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .trim()
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return Err(ApiError::MalformedBody(
            "Content-Type must be application/json".into(),
        ));
    }
    let limit = st.sched.config.limits.request_body_timeout;
    let bytes: Bytes = match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(r) => r.map_err(|_| ApiError::BodyTooLarge)?,
        Err(_) => {
            st.sched
                .metrics
                .connection_timeouts
                .get_or_create(&PhaseLabels { phase: "body" })
                .inc();
            return Err(ApiError::BodyTimeout(limit));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde's message names the field and position, never a value we
        // would mind (secrets are strings and serde does not echo them).
        ApiError::MalformedBody(format!("invalid JSON body: {e}"))
    })
}

async fn enroll(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let req: api::EnrollRequest = json_body(&st, &headers, body).await?;
        st.sched.enroll(req).await
    }
    .await;
    match r {
        Ok(resp) => (StatusCode::CREATED, Json(resp)).into_response(),
        Err(e) => {
            if matches!(e, ApiError::MalformedBody(_) | ApiError::BodyTooLarge) {
                st.sched
                    .metrics
                    .enrollments
                    .get_or_create(&CodeLabels { code: e.code() })
                    .inc();
            }
            e.into_response()
        }
    }
}

async fn heartbeat(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<api::HeartbeatResponse>, ApiError> {
    require_node(&st, &headers, &id).await?;
    let hb: api::Heartbeat = json_body(&st, &headers, body).await?;
    Ok(Json(st.sched.heartbeat(&id, hb)?))
}

#[derive(Deserialize)]
struct DesiredQuery {
    since: Option<String>,
    wait: Option<String>,
}

async fn desired(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<DesiredQuery>,
) -> Result<Response, ApiError> {
    require_node(&st, &headers, &id).await?;
    let since = parse_u64("since", q.since.as_deref(), 0)?;
    let wait = parse_u64("wait", q.wait.as_deref(), 30)?;
    if wait > MAX_WAIT_SECS {
        return Err(ApiError::InvalidRequest(format!(
            "wait must be 0 to {MAX_WAIT_SECS} seconds"
        )));
    }
    let _place = if wait > 0 {
        Some(st.sched.begin_long_poll(&id)?)
    } else {
        None
    };
    match st
        .sched
        .watch_desired(&id, since, Duration::from_secs(wait))
        .await
    {
        Some((_, body)) => Ok((
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body.to_string(),
        )
            .into_response()),
        None => {
            let v = st.sched.desired_json(&id).map_or(0, |(v, _)| v);
            Ok((
                StatusCode::NO_CONTENT,
                [("ridge-desired-version", v.to_string())],
            )
                .into_response())
        }
    }
}

fn parse_u64(name: &str, v: Option<&str>, default: u64) -> Result<u64, ApiError> {
    match v {
        None | Some("") => Ok(default),
        Some(s) => s.parse().map_err(|_| {
            ApiError::InvalidRequest(format!("{name} must be a non-negative integer"))
        }),
    }
}

fn parse_bool(name: &str, v: Option<&str>, default: bool) -> Result<bool, ApiError> {
    match v {
        None | Some("") => Ok(default),
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(_) => Err(ApiError::InvalidRequest(format!(
            "{name} must be true or false"
        ))),
    }
}

#[derive(Deserialize)]
struct DispatchQuery {
    room: Option<String>,
    identity: Option<String>,
    publish: Option<String>,
    subscribe: Option<String>,
    region: Option<String>,
    client_ip: Option<String>,
}

async fn dispatch(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<DispatchQuery>,
) -> Result<Json<api::DispatchResponse>, ApiError> {
    let token = bearer(&headers)?;
    if static_secret(&st, token) == Static::None {
        return Err(match st.sched.authenticate_node(token).await {
            Ok(_) => ApiError::Forbidden("node tokens cannot dispatch".into()),
            Err(_) => ApiError::InvalidCredential("not a valid admin or dispatch token".into()),
        });
    }
    let room = q
        .room
        .ok_or_else(|| ApiError::InvalidRequest("room is required".into()))?;
    let client_ip = match q.client_ip.as_deref() {
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| ApiError::InvalidRequest("client_ip is not an IP address".into()))?,
        ),
        None => Some(peer.ip()),
    };
    let region = q.region.filter(|r| !r.is_empty());
    Ok(Json(st.sched.dispatch(
        &room,
        q.identity.as_deref(),
        parse_bool("publish", q.publish.as_deref(), false)?,
        parse_bool("subscribe", q.subscribe.as_deref(), true)?,
        region.as_deref(),
        client_ip,
    )?))
}

async fn create_token(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&st, &headers).await?;
    let req: api::CreateToken = json_body(&st, &headers, body).await?;
    let t = st.sched.create_token(req).await?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

async fn list_tokens(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<api::TokenList>, ApiError> {
    require_admin(&st, &headers).await?;
    Ok(Json(api::TokenList {
        tokens: st.sched.list_tokens().await?,
    }))
}

async fn revoke_token(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<api::TokenInfo>, ApiError> {
    require_admin(&st, &headers).await?;
    Ok(Json(st.sched.revoke_token(&id).await?))
}

async fn list_nodes(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<api::NodeList>, ApiError> {
    require_admin(&st, &headers).await?;
    Ok(Json(api::NodeList {
        nodes: st.sched.list_nodes(),
    }))
}

async fn show_node(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<api::NodeDetail>, ApiError> {
    require_admin(&st, &headers).await?;
    Ok(Json(st.sched.node_detail(&id).await?))
}

async fn drain(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<api::NodeSummary>, ApiError> {
    require_admin(&st, &headers).await?;
    let req: api::DrainRequest = json_body(&st, &headers, body).await?;
    Ok(Json(st.sched.drain(&id, req.drain).await?))
}

async fn rooms(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<api::RoomList>, ApiError> {
    require_admin(&st, &headers).await?;
    Ok(Json(api::RoomList {
        rooms: st.sched.rooms(),
    }))
}

async fn routes(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<api::RouteList>, ApiError> {
    require_admin(&st, &headers).await?;
    Ok(Json(st.sched.routes().await?))
}

async fn healthz(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&st, &headers).await?;
    let s = &st.sched;
    let status = if s.shutting_down() { "draining" } else { "ok" };
    let body = serde_json::json!({
        "status": status,
        "leader": s.is_leader(),
        "storage": s.store.kind(),
        "replica": s.config.replica_id,
    });
    let code = if s.shutting_down() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Ok((code, Json(body)).into_response())
}

/// How long `/readyz` waits for the database.
const READY_PING: Duration = Duration::from_secs(2);

/// Liveness, unauthenticated, no body: 200 while the process serves HTTP
/// (draining included: restarting a draining replica helps nobody).
async fn livez() -> StatusCode {
    StatusCode::OK
}

/// Readiness, unauthenticated, no body: 200 when the database answers a
/// query within 2 s and the scheduler is not draining, else 503.
async fn readyz(State(st): State<AppState>) -> StatusCode {
    if st.sched.shutting_down() {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    match tokio::time::timeout(READY_PING, st.sched.store.ping()).await {
        Ok(Ok(())) => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&st, &headers).await?;
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &st.registry).map_err(|_| {
        ApiError::Internal(crate::store::StoreError::Corrupt("metrics encoding".into()))
    })?;
    Ok((
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        out,
    )
        .into_response())
}

async fn openapi(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let token = bearer(&headers)?;
    match static_secret(&st, token) {
        Static::Admin => {}
        Static::Dispatch => {
            return Err(ApiError::Forbidden(
                "the dispatch token only grants /v1/dispatch".into(),
            ));
        }
        Static::None => {
            st.sched.authenticate_node(token).await?;
        }
    }
    Ok((
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        OPENAPI,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_documents_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in ROUTES {
            let item = paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} missing from openapi.json"));
            assert!(
                item.get(*method).is_some(),
                "{method} {path} missing from openapi.json"
            );
        }
        // And nothing documented that does not exist.
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                if method == "parameters" {
                    continue;
                }
                assert!(
                    ROUTES.contains(&(method.as_str(), path.as_str())),
                    "{method} {path} documented but not routed"
                );
            }
        }
        // Every $ref resolves.
        let text = OPENAPI;
        for part in text.split("\"$ref\": \"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "dangling $ref {name}"
            );
        }
    }
}
