//! The local control API: versioned HTTP/1.1 (`/v1/...`) over a Unix socket,
//! served to the node's `ridge-agent` (docs/control-api.md).
//!
//! Who may call it: the socket file is mode 0600 inside a directory of mode
//! 0750, and every accepted connection's peer credentials (`SO_PEERCRED`,
//! through tokio's `UnixStream::peer_cred`) must name root or the uid this
//! process runs as; other connections are closed before a byte is read and
//! counted in `ridge_control_rejected_connections_total`.
//!
//! What it does: `GET /v1/status` reports sessions, rooms, shard addresses and
//! traffic counters; `PUT /v1/desired` validates and stores the desired-state
//! document the agent got from the scheduler and applies it (`drain`,
//! `dataplane_secret`, and the mesh `links` and `routes`, which go to every
//! media shard's core); `GET /v1/desired` returns what the node holds
//! (without secrets) so a restarted agent can resume.

use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};

use crate::api::auth::Authenticator;
use crate::api::hub::RoomHub;
use crate::config::{MIN_SECRET_LEN, Secret};
use crate::metrics::Metrics;
use crate::shard::handle::MediaHandle;

/// Largest desired-state document accepted.
const MAX_BODY: usize = 1024 * 1024;
/// More links or routes than this is not a desired state but a mistake.
const MAX_ENTRIES: usize = 100_000;

/// Failure to set up the control socket.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: cannot create its directory: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "control socket {}: another node is serving on it (a second ridge-dataplane?); \
         set control_socket to another path or stop the other node",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "control socket {}: a {kind} is there, not a socket; the node replaces only a \
         stale socket it left behind: move it away or set control_socket to another path",
        path.display()
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot bind the control socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The desired-state document (`PUT /v1/desired`), shared with the agent.
pub use ridge_wire::control::{DesiredState, MeshLink, TrackRoute};

/// What the node checks and shows of a desired-state document.
trait DesiredStateExt {
    fn validate(&self) -> Result<(), String>;
    fn redacted(&self) -> serde_json::Value;
}

impl DesiredStateExt for DesiredState {
    /// Checks a document before it is stored; the message names the field.
    fn validate(&self) -> Result<(), String> {
        if self.version == 0 {
            return Err("version must be at least 1".into());
        }
        if self.node_id.len() > 64 {
            return Err("node_id is longer than 64 bytes".into());
        }
        if let Some(s) = &self.dataplane_secret
            && s.len() < MIN_SECRET_LEN
        {
            return Err(format!(
                "dataplane_secret is shorter than {MIN_SECRET_LEN} bytes"
            ));
        }
        if self.links.len() > MAX_ENTRIES || self.routes.len() > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} links or routes"));
        }
        let mut peers = BTreeSet::new();
        for l in &self.links {
            check_node_id("links[].peer", &l.peer)?;
            if !peers.insert(l.peer.as_str()) {
                return Err(format!("links: peer {} appears twice", l.peer));
            }
            if l.key.len() != 64 || !l.key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "links[{}].key must be 32 bytes as 64 hex digits",
                    l.peer
                ));
            }
        }
        for r in &self.routes {
            if r.room.is_empty() || r.room.len() > 128 || r.room.chars().any(char::is_control) {
                return Err(
                    "routes[].room must be 1 to 128 bytes without control characters".into(),
                );
            }
            check_node_id("routes[].source", &r.source)?;
            for hop in r.upstream.iter().chain(&r.downstream) {
                check_node_id("routes[] upstream/downstream", hop)?;
                if !peers.contains(hop.as_str()) {
                    return Err(format!(
                        "routes[{}]: neighbour {hop} has no entry in links",
                        r.room
                    ));
                }
            }
        }
        Ok(())
    }

    /// The document as `GET /v1/desired` shows it: no secret, no link keys.
    fn redacted(&self) -> serde_json::Value {
        json!({
            "node_id": self.node_id,
            "version": self.version,
            "drain": self.drain,
            "dataplane_secret_set": self.dataplane_secret.is_some(),
            "links": self.links.iter().map(|l| json!({
                "peer": l.peer,
                "address": l.address,
                "trusted": l.trusted,
            })).collect::<Vec<_>>(),
            "routes": self.routes,
        })
    }
}

fn check_node_id(field: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: `{id}` is not a node id (1-64 of A-Z a-z 0-9 - _ .)"
        ))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The control API's own series in the node's registry.
#[derive(Debug, Clone, Default)]
pub struct ControlMetrics {
    rejected_connections: Counter,
    desired_updates: Family<ResultLabels, Counter>,
    desired_version: Gauge,
}

impl ControlMetrics {
    /// Registers under the node's `ridge` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("ridge");
        r.register(
            "control_rejected_connections",
            "Control-socket connections closed because the peer's uid is not allowed",
            m.rejected_connections.clone(),
        );
        r.register(
            "control_desired_updates",
            "PUT /v1/desired by result (applied, unchanged, stale, invalid)",
            m.desired_updates.clone(),
        );
        r.register(
            "control_desired_version",
            "Version of the desired state the node holds (0: none)",
            m.desired_version.clone(),
        );
        m
    }
}

/// What the control API needs from the node.
#[derive(Debug, Clone)]
pub struct ControlState {
    pub media: MediaHandle,
    pub auth: Authenticator,
    pub metrics: Metrics,
    pub control_metrics: ControlMetrics,
    pub draining: Arc<AtomicBool>,
    pub hub: Arc<RoomHub>,
    pub desired: Arc<Mutex<Option<DesiredState>>>,
    /// The node's session capacity (`max_sessions`).
    pub max_sessions: usize,
}

/// A bound control socket; [`ControlSocket::serve`] runs it.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    listener: UnixListener,
}

/// Only a stale socket may be replaced: never a live one, a file, a
/// directory or a link someone put there (symlink_metadata: a link is not
/// followed).
fn check_replaceable(path: &Path) -> Result<(), ControlError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                Err(ControlError::InUse {
                    path: path.to_owned(),
                })
            } else {
                // Left by a node that died.
                Ok(())
            }
        }
        Ok(meta) => {
            let t = meta.file_type();
            let kind = if t.is_file() {
                "regular file"
            } else if t.is_dir() {
                "directory"
            } else if t.is_symlink() {
                "symbolic link"
            } else {
                "special file"
            };
            Err(ControlError::NotASocket {
                path: path.to_owned(),
                kind,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ControlError::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}

impl ControlSocket {
    /// Creates the directory (0750) if needed and binds a socket of mode
    /// 0600 at `path`, replacing a stale socket. A socket that still answers
    /// is [`ControlError::InUse`]; anything else at `path` (a regular file, a
    /// directory, a link) is [`ControlError::NotASocket`] and is left alone.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|source| ControlError::Dir {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        let file_name = path.file_name().map_or_else(
            || "dataplane.sock".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        // Nodes starting at once (several in one test process, or two
        // services) take turns: the check and the placing below are one
        // step under an exclusive lock on a file beside the socket.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path.with_file_name(format!(".{file_name}.lock")))
            .map_err(bind_err)?;
        lock.lock().map_err(bind_err)?;
        check_replaceable(path)?;
        // Bound under a temporary name, made 0600, then renamed into place:
        // the socket is never reachable with a wider mode, and the rename
        // replaces a stale socket in one step.
        static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
        let tmp = path.with_file_name(format!(
            ".{file_name}.{}.{}.tmp",
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(bind_err(e));
        }
        drop(lock);
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` resolves, then removes the socket file.
    pub async fn serve(
        self,
        state: ControlState,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let allowed = allowed_uids();
        let listener = PeerCheckedListener {
            inner: self.listener,
            allowed,
            rejected: state.control_metrics.rejected_connections.clone(),
        };
        let app = router(state);
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "control socket server failed");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Root and the uid this process runs as (read from `/proc/self`, which the
/// kernel owns by the process's effective uid: no libc call needed).
fn allowed_uids() -> Vec<u32> {
    let mut uids = vec![0];
    if let Ok(meta) = std::fs::metadata("/proc/self")
        && meta.uid() != 0
    {
        uids.push(meta.uid());
    }
    uids
}

/// Accepts only peers whose `SO_PEERCRED` uid is allowed.
struct PeerCheckedListener {
    inner: UnixListener,
    allowed: Vec<u32>,
    rejected: Counter,
}

impl axum::serve::Listener for PeerCheckedListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if self.allowed.contains(&cred.uid()) => return (stream, addr),
                    Ok(cred) => {
                        self.rejected.inc();
                        tracing::warn!(
                            uid = cred.uid(),
                            pid = ?cred.pid(),
                            "control socket: refused a connection from a uid that is not allowed"
                        );
                    }
                    Err(e) => {
                        self.rejected.inc();
                        tracing::warn!(error = %e, "control socket: no peer credentials; refused");
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn router(state: ControlState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/desired", get(get_desired).put(put_desired))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see docs/control-api.md",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"code": code, "error": message.into()})),
    )
        .into_response()
}

fn held(state: &ControlState) -> Option<DesiredState> {
    state
        .desired
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

async fn status(State(state): State<ControlState>) -> Response {
    let Some((snapshot, sessions)) = state.media.stats().await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "media_thread_down",
            "the media shards stopped answering",
        );
    };
    let c = &snapshot.counters;
    let rooms: Vec<_> = snapshot
        .rooms
        .iter()
        .map(|r| {
            json!({
                "room": r.room,
                "participants": r.participants,
                "tracks": r.tracks,
                "remote_participants": r.remote_participants,
                "remote_tracks": r.remote_tracks,
            })
        })
        .collect();
    let desired_version = held(&state).map(|d| d.version);
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "api": "v1",
        "draining": state.draining.load(Ordering::Relaxed),
        "sessions": sessions,
        "max_sessions": state.max_sessions,
        "ws_sessions": state.hub.session_count(),
        "rooms": rooms,
        "media": state.media.local_addr().to_string(),
        "media_shards": state.media.local_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "io_backend": match state.media.backend() {
            ridge_io::Backend::Uring => "io_uring",
            ridge_io::Backend::Mmsg => "mmsg",
        },
        "packets_in": c.packets_in,
        "packets_out": c.packets_out,
        "bytes_in": c.bytes_in,
        "bytes_out": c.bytes_out,
        "mesh_links": snapshot.mesh_links.iter().map(|l| json!({
            "peer": l.peer,
            "trusted": l.trusted,
            "fec": l.fec,
            "fec_group": l.fec_group,
            "red_depth": l.red_depth,
            "packets_in": l.packets_in,
            "packets_out": l.packets_out,
            "rooms_in": l.rooms_in,
            "rooms_out": l.rooms_out,
            "nacks_sent": l.nacks_sent,
            "retransmits": l.retransmits,
            "recovered": l.recovered,
            "unrecovered": l.unrecovered,
            "auth_failures": l.auth_failures,
            "fec_recovered": l.fec_recovered,
            "red_recovered": l.red_recovered,
        })).collect::<Vec<_>>(),
        "desired_version": desired_version,
    }))
    .into_response()
}

async fn get_desired(State(state): State<ControlState>) -> Response {
    match held(&state) {
        Some(d) => axum::Json(d.redacted()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no_desired_state",
            "no desired state has been applied since the node started",
        ),
    }
}

async fn put_desired(
    State(state): State<ControlState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let count = |result: &'static str| {
        state
            .control_metrics
            .desired_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    };
    let json_ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json_ct {
        count("invalid");
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "malformed_body",
            "send the desired state with Content-Type: application/json",
        );
    }
    let doc: DesiredState = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            count("invalid");
            return error(StatusCode::BAD_REQUEST, "malformed_body", e.to_string());
        }
    };
    if let Err(e) = doc.validate() {
        count("invalid");
        return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_desired_state", e);
    }
    // Decide under the lock, apply after it (applying awaits the shards).
    let previous = {
        let mut slot = state.desired.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(cur) if doc.version < cur.version => {
                let held = cur.version;
                drop(slot);
                count("stale");
                return error(
                    StatusCode::CONFLICT,
                    "stale_version",
                    format!(
                        "version {} is older than the held version {held}",
                        doc.version
                    ),
                );
            }
            Some(cur) if doc.version == cur.version && *cur != doc => {
                drop(slot);
                count("stale");
                return error(
                    StatusCode::CONFLICT,
                    "version_conflict",
                    format!(
                        "version {} is already held with different contents",
                        doc.version
                    ),
                );
            }
            Some(cur) if *cur == doc => {
                drop(slot);
                count("unchanged");
                return axum::Json(outcome(&state, &doc, false)).into_response();
            }
            _ => slot.replace(doc.clone()),
        }
    };
    state
        .control_metrics
        .desired_version
        .set(doc.version as i64);
    if doc.drain && !state.draining.swap(true, Ordering::Relaxed) {
        tracing::info!(version = doc.version, "desired state: draining");
        state.metrics.draining.set(1);
        state.media.drain().await;
        state.hub.shutdown_notice();
    }
    if let Some(secret) = &doc.dataplane_secret {
        let changed = previous
            .as_ref()
            .and_then(|p| p.dataplane_secret.as_ref())
            .is_none_or(|p| p != secret);
        if changed && state.auth.rotate(&Secret::new(secret.clone())) {
            tracing::info!(
                version = doc.version,
                "desired state: access-token key replaced"
            );
        }
    }
    if mesh_supported(&state) {
        let mesh = mesh_config(&doc);
        let changed = previous.as_ref().is_none_or(|p| mesh_config(p) != mesh);
        if changed {
            state.media.set_mesh(mesh).await;
        }
    }
    tracing::info!(
        version = doc.version,
        links = doc.links.len(),
        routes = doc.routes.len(),
        "desired state applied"
    );
    count("applied");
    axum::Json(outcome(&state, &doc, true)).into_response()
}

/// Mesh traffic of a room must reach the room's shard: with one port per
/// shard the upstream answers the socket a subscription came from; behind
/// one shared port nothing steers it.
fn mesh_supported(state: &ControlState) -> bool {
    state.media.shard_count() == 1 || state.media.shard_ports() == "per-shard"
}

/// The core's view of a desired state's links and routes. Links without
/// an address are left out, and so are routes through them.
pub fn mesh_config(doc: &DesiredState) -> ridge_sfu::MeshConfig {
    let links: Vec<ridge_sfu::MeshLinkSpec> = doc
        .links
        .iter()
        .filter_map(|l| {
            Some(ridge_sfu::MeshLinkSpec {
                peer: l.peer.clone(),
                address: l.address?,
                key: decode_key(&l.key)?,
                trusted: l.trusted,
                fec: l.fec,
            })
        })
        .collect();
    let has = |p: &str| links.iter().any(|l| l.peer == p);
    let routes = doc
        .routes
        .iter()
        .filter(|r| r.upstream.as_deref().is_none_or(has))
        .map(|r| ridge_sfu::MeshRouteSpec {
            room: r.room.clone(),
            source: r.source.clone(),
            upstream: r.upstream.clone(),
            downstream: r.downstream.iter().filter(|d| has(d)).cloned().collect(),
        })
        .collect();
    ridge_sfu::MeshConfig {
        node_id: doc.node_id.clone(),
        links,
        routes,
    }
}

/// 64 hex digits (checked by `validate`) as 32 bytes.
fn decode_key(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&b[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The answer to a PUT: what the node did with each part.
fn outcome(state: &ControlState, doc: &DesiredState, changed: bool) -> serde_json::Value {
    let draining = state.draining.load(Ordering::Relaxed);
    let mut not_applied = Vec::new();
    if !doc.drain && draining {
        not_applied.push(
            "drain=false: the media core's drain is one-way; the node keeps refusing new \
             sessions until it restarts",
        );
    }
    if (!doc.links.is_empty() || !doc.routes.is_empty()) && !mesh_supported(state) {
        not_applied.push(
            "links, routes: mesh links need one media port per shard (shard_ports = \"per-shard\") \
             or a single shard",
        );
    }
    if doc.links.iter().any(|l| l.address.is_none()) {
        not_applied.push("links without an address: the peer has not reported one yet");
    }
    if doc.dataplane_secret.is_some() && state.auth.disabled() {
        not_applied.push("dataplane_secret: authentication is off (dev_no_auth)");
    }
    json!({
        "version": doc.version,
        "changed": changed,
        "draining": draining,
        "not_applied": not_applied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> DesiredState {
        DesiredState {
            node_id: "n-0000000000000001".into(),
            version: 3,
            drain: false,
            dataplane_secret: Some("9b".repeat(32)),
            links: vec![MeshLink {
                peer: "n-0000000000000002".into(),
                address: Some("10.0.0.9:5006".parse().unwrap()),
                key: "4c".repeat(32),
                trusted: true,
                fec: false,
            }],
            routes: vec![TrackRoute {
                room: "demo".into(),
                source: "n-0000000000000001".into(),
                upstream: None,
                downstream: vec!["n-0000000000000002".into()],
            }],
        }
    }

    #[test]
    fn valid_document() {
        doc().validate().unwrap();
    }

    #[test]
    fn invalid_documents_name_the_field() {
        type Mutation = fn(&mut DesiredState);
        let cases: Vec<(Mutation, &str)> = vec![
            (|d| d.version = 0, "version"),
            (
                |d| d.dataplane_secret = Some("short".into()),
                "dataplane_secret",
            ),
            (|d| d.links[0].key = "xyz".into(), "key"),
            (|d| d.links[0].peer = "bad id!".into(), "links[].peer"),
            (|d| d.links.push(d.links[0].clone()), "twice"),
            (
                |d| d.routes[0].downstream.push("n-0000000000000009".into()),
                "no entry in links",
            ),
            (|d| d.routes[0].room = String::new(), "room"),
        ];
        for (mutate, needle) in cases {
            let mut d = doc();
            mutate(&mut d);
            let e = d.validate().unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn redacted_view_has_no_secrets() {
        let d = doc();
        let text = d.redacted().to_string();
        assert!(!text.contains(&"9b".repeat(32)));
        assert!(!text.contains(&"4c".repeat(32)));
        assert!(text.contains("\"dataplane_secret_set\":true"));
    }

    #[test]
    fn scheduler_document_parses() {
        // The shape of docs/scheduler-api.md §3.3.
        let text = r#"{"node_id":"n-3f9a0c1b2d4e5f60","version":18,"drain":false,
            "dataplane_secret":"9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f9b1f",
            "links":[{"peer":"n-77aa00bb11cc22dd","address":"10.0.0.9:5006",
                      "key":"4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e4c0e","trusted":true}],
            "routes":[{"room":"demo","source":"n-3f9a0c1b2d4e5f60","upstream":null,
                       "downstream":["n-77aa00bb11cc22dd"]}]}"#;
        let d: DesiredState = serde_json::from_str(text).unwrap();
        d.validate().unwrap();
        assert_eq!(d.version, 18);
    }

    /// Nodes started at once in one process (as a test binary does) race
    /// for one path: exactly one binds it, the others are told it is in
    /// use, and no temporary socket is left behind (only the lock file).
    #[test]
    fn concurrent_binds_on_one_path_leave_one_owner() {
        let dir = std::env::temp_dir().join(format!("ridge-ctl-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dp.sock");
        // The listener is tokio's: each thread binds inside the runtime.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        for round in 0..20 {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let results: Vec<_> = (0..6)
                .map(|_| {
                    let (barrier, path) = (barrier.clone(), path.clone());
                    let handle = rt.handle().clone();
                    std::thread::spawn(move || {
                        let _rt = handle.enter();
                        barrier.wait();
                        ControlSocket::bind(&path)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let owners = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(owners, 1, "round {round}: {results:?}");
            for r in &results {
                if let Err(e) = r {
                    assert!(
                        matches!(e, ControlError::InUse { .. }),
                        "round {round}: {e}"
                    );
                }
            }
            std::os::unix::net::UnixStream::connect(&path).expect("the owner answers");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let names: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(
                names.iter().all(|n| n == "dp.sock" || n == ".dp.sock.lock"),
                "round {round}: {names:?}"
            );
            // The owner goes away and leaves a stale socket for the next round.
            let _rt = rt.enter();
            drop(results);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
