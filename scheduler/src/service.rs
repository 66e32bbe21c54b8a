//! The scheduler's state and operations, independent of HTTP.
//!
//! Source of truth is the database. Each replica keeps:
//! - heartbeats received since the last flush (written in one transaction
//!   per tick, so 10,000 agents cost one write batch per tick, not 5,000
//!   transactions a second);
//! - a snapshot of all nodes ([`View`]), reloaded every tick, which answers
//!   dispatch and the operator's listings;
//! - the desired states, refreshed incrementally by version, which answer
//!   the long polls.
//!
//! Every tick the leader (see [`crate::store::LeaderLock`]) recomputes the
//! route plan and desired states and writes those that changed. A heartbeat
//! that reports a link dead (loss 1.0) which the node's previous report did
//! not, or alive again, asks for a tick at once ([`Scheduler::tick_requested`]):
//! routes leave a dead transit node when its neighbours stop hearing it, not
//! when its lease expires.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::api::{self, DesiredState, Heartbeat, HeartbeatExt, NodeSummary, TokenInfo};
use crate::config::{Config, valid_region};
use crate::crypto::{self, NodeTokenError, NodeTokenKey};
use crate::desired::{self, NodeFacts};
use crate::dispatch::{self, Candidate};
use crate::error::ApiError;
use crate::metrics::{CodeLabels, Metrics, StateLabels};
use crate::route::{self, CostModel, LinkInput, MeshView, NodeInput, RoomInput, RoutePlan};
use crate::store::{
    self, EnrollRefusal, HeartbeatWrite, LeaderLock, NodeRow, Store, StoreError, TokenRow, now_ms,
    now_secs,
};

/// One node in the snapshot. `row.report` is not kept: `report` is its
/// parsed form (or a newer heartbeat this replica received).
#[derive(Debug, Clone)]
pub struct NodeView {
    pub row: NodeRow,
    pub labels: BTreeMap<String, String>,
    pub report: Arc<Heartbeat>,
}

impl NodeView {
    fn up(&self, now_ms: u64, lease_ms: u64) -> bool {
        self.row
            .last_heartbeat_ms
            .is_some_and(|t| now_ms.saturating_sub(t) <= lease_ms)
    }

    fn state(&self, now_ms: u64, lease_ms: u64) -> &'static str {
        if self.row.drain {
            "draining"
        } else if self.row.last_heartbeat_ms.is_none() {
            "pending"
        } else if self.up(now_ms, lease_ms) {
            "up"
        } else {
            "down"
        }
    }
}

/// All nodes, as of the last tick (plus local heartbeats since). A reload
/// shares the entries that did not change with the previous snapshot.
#[derive(Debug, Default)]
pub struct View {
    pub nodes: BTreeMap<String, Arc<NodeView>>,
}

/// A heartbeat as this replica received it: when, and the parsed report.
type LocalReport = (u64, Arc<Heartbeat>);

/// A stored desired state: version and JSON.
type DesiredEntry = (u64, Arc<str>);

/// The scheduler. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Scheduler {
    pub config: Config,
    pub store: Store,
    pub metrics: Metrics,
    node_key: NodeTokenKey,
    mesh_key: String,
    /// Heartbeats received since the last flush.
    pending: Mutex<HashMap<String, LocalReport>>,
    /// The newest heartbeat this replica received from each node: a reload
    /// uses it instead of reading and parsing the stored report again.
    latest: Mutex<HashMap<String, LocalReport>>,
    view: RwLock<Arc<View>>,
    desired: RwLock<HashMap<String, DesiredEntry>>,
    desired_seq: Mutex<u64>,
    changed: watch::Sender<u64>,
    leader: AtomicBool,
    plan: Mutex<Option<RoutePlan>>,
    shutting_down: AtomicBool,
    /// Per node, the peers its last heartbeat reported dead (loss 1.0).
    dead_links: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Wakes the ticker (see [`Scheduler::tick_requested`]).
    tick_now: Notify,
    /// The leader's last full computation: the mesh structure it saw
    /// ([`structure_fingerprint`]) and when.
    last_computed: Mutex<Option<(u64, u64)>>,
    /// Open desired-state long polls per node (entries removed at 0, so
    /// at most one per authenticated node).
    long_polls: Mutex<HashMap<String, usize>>,
}

/// One open long poll; gives its place back on drop.
#[derive(Debug)]
pub struct LongPoll<'a> {
    sched: &'a Scheduler,
    node: String,
}

impl Drop for LongPoll<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.sched.long_polls.lock()
            && let Some(n) = m.get_mut(&self.node)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.node);
            }
        }
    }
}

/// How often the leader recomputes routes when only measurements (RTT,
/// loss below "dead", jitter, load) changed, in heartbeat intervals (5 s at
/// the default 2 s). A change of structure (a node up or down, a link dead
/// or alive, room membership, addresses, drain) recomputes at the next
/// tick, which a dead link brings forward.
pub const METRIC_REFRESH_INTERVALS: f64 = 2.5;

/// Errors mapped for the enrollment metric.
fn count<T>(m: &Metrics, r: &Result<T, ApiError>) {
    let code = match r {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    m.enrollments.get_or_create(&CodeLabels { code }).inc();
}

impl Scheduler {
    /// Opens the database, loads keys and the first snapshot.
    pub async fn open(config: Config, metrics: Metrics) -> Result<Arc<Self>, StoreError> {
        let store = Store::open(&config.database).await?;
        let node_key = store
            .setting("node_token_key", || crypto::random_hex(32))
            .await?;
        let mesh_key = store.setting("mesh_key", || crypto::random_hex(32)).await?;
        let (changed, _) = watch::channel(0);
        let s = Arc::new(Self {
            config,
            store,
            metrics,
            node_key: NodeTokenKey::new(&node_key),
            mesh_key,
            pending: Mutex::new(HashMap::new()),
            latest: Mutex::new(HashMap::new()),
            view: RwLock::new(Arc::new(View::default())),
            desired: RwLock::new(HashMap::new()),
            desired_seq: Mutex::new(0),
            changed,
            leader: AtomicBool::new(false),
            plan: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            dead_links: Mutex::new(HashMap::new()),
            tick_now: Notify::new(),
            last_computed: Mutex::new(None),
            long_polls: Mutex::new(HashMap::new()),
        });
        s.reload().await?;
        s.refresh_desired().await?;
        Ok(s)
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.config.lease().as_millis()).unwrap_or(u64::MAX)
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this replica currently runs the scheduling jobs.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Whether the scheduler is draining before exit.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Starts draining: long polls return at once, new requests get 503.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
        self.changed.send_modify(|v| *v += 1);
    }

    /// The current snapshot.
    pub fn view(&self) -> Arc<View> {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    // ---------------------------------------------------------------- tokens

    /// Mints a bootstrap token; the answer carries the secret once.
    pub async fn create_token(&self, req: api::CreateToken) -> Result<TokenInfo, ApiError> {
        let ttl = req.ttl_secs.unwrap_or(3600);
        if !(1..=31_536_000).contains(&ttl) {
            return Err(ApiError::InvalidRequest(
                "ttl_secs must be between 1 and 31536000".into(),
            ));
        }
        let max_uses = req.max_uses.unwrap_or(1);
        if !(1..=1_000_000).contains(&max_uses) {
            return Err(ApiError::InvalidRequest(
                "max_uses must be between 1 and 1000000".into(),
            ));
        }
        if !valid_region(&req.region) {
            return Err(ApiError::InvalidRequest(
                "region must be 1-64 bytes of [A-Za-z0-9._-]".into(),
            ));
        }
        if req.labels.len() > 64
            || req
                .labels
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 256)
        {
            return Err(ApiError::InvalidRequest(
                "labels: at most 64, keys 1-64 bytes, values up to 256 bytes".into(),
            ));
        }
        if req.description.len() > 1024 {
            return Err(ApiError::InvalidRequest(
                "description over 1024 bytes".into(),
            ));
        }
        let id = format!("bt-{}", crypto::random_hex(8));
        let secret = crypto::random_b64(32);
        let token = format!("{}{id}.{secret}", crypto::BOOTSTRAP_PREFIX);
        let now = now_secs();
        let row = TokenRow {
            id,
            secret_hash: crypto::sha256_hex(secret.as_bytes()),
            region: req.region,
            labels: serde_json::to_string(&req.labels).unwrap_or_else(|_| "{}".into()),
            description: req.description,
            created_at: now,
            expires_at: now + ttl,
            max_uses,
            uses: 0,
            revoked_at: None,
        };
        self.store.insert_token(&row).await?;
        tracing::info!(token_id = %row.id, region = %row.region, ttl, max_uses, "bootstrap token minted");
        let mut info = token_info(&row, now);
        info.token = Some(token);
        Ok(info)
    }

    /// All tokens, without secrets.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ApiError> {
        let now = now_secs();
        Ok(self
            .store
            .list_tokens()
            .await?
            .iter()
            .map(|t| token_info(t, now))
            .collect())
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo, ApiError> {
        let now = now_secs();
        let row = self
            .store
            .revoke_token(id, now)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no bootstrap token {id}")))?;
        tracing::info!(token_id = %id, "bootstrap token revoked");
        Ok(token_info(&row, now))
    }

    // ------------------------------------------------------------ enrollment

    /// Enrolls an agent (docs/scheduler-api.md §3.1).
    pub async fn enroll(&self, req: api::EnrollRequest) -> Result<api::EnrollResponse, ApiError> {
        let r = self.enroll_inner(req).await;
        count(&self.metrics, &r);
        r
    }

    async fn enroll_inner(&self, req: api::EnrollRequest) -> Result<api::EnrollResponse, ApiError> {
        if req.hostname.len() > 255 || req.version.len() > 64 {
            return Err(ApiError::InvalidRequest(
                "hostname (255) or version (64) too long".into(),
            ));
        }
        crypto::verify_proof(
            &req.public_key.alg,
            &req.public_key.key,
            &crypto::enroll_message(&req.bootstrap_token, &req.public_key.key),
            &req.proof,
        )
        .map_err(|e| match e {
            crypto::KeyError::BadKey(m) => ApiError::InvalidPublicKey(m),
            crypto::KeyError::BadProof(m) => ApiError::InvalidProof(m),
        })?;
        let invalid = || ApiError::BootstrapInvalid("bootstrap token is not valid".to_owned());
        let (token_id, secret) =
            crypto::split_bootstrap(&req.bootstrap_token).ok_or_else(invalid)?;
        let token = self.store.get_token(token_id).await?.ok_or_else(invalid)?;
        if !crypto::ct_eq(
            crypto::sha256_hex(secret.as_bytes()).as_bytes(),
            token.secret_hash.as_bytes(),
        ) {
            return Err(invalid());
        }
        let now = now_secs();
        let node = NodeRow {
            id: format!("n-{}", crypto::random_hex(8)),
            token_id: token.id.clone(),
            key_alg: req.public_key.alg.clone(),
            public_key: req.public_key.key.trim().to_owned(),
            region: token.region.clone(),
            labels: token.labels.clone(),
            hostname: req.hostname,
            agent_version: req.version,
            dataplane_secret: crypto::random_hex(32),
            enrolled_at: now,
            drain: false,
            last_heartbeat_ms: None,
            report: None,
            desired_version: 0,
            desired: None,
        };
        match self.store.enroll(&node, now).await? {
            Ok(()) => {}
            Err(EnrollRefusal::Unknown) => return Err(invalid()),
            Err(EnrollRefusal::Expired { at }) => {
                return Err(ApiError::BootstrapExpired { id: token.id, at });
            }
            Err(EnrollRefusal::Revoked) => return Err(ApiError::BootstrapRevoked(token.id)),
            Err(EnrollRefusal::Exhausted { uses, max }) => {
                return Err(ApiError::BootstrapExhausted {
                    id: token.id,
                    uses,
                    max,
                });
            }
        }
        tracing::info!(node_id = %node.id, token_id = %token.id, region = %node.region, "node enrolled");
        let ttl = self.config.node_token_ttl.as_secs();
        Ok(api::EnrollResponse {
            node_token: self.node_key.sign(&node.id, now, ttl),
            node_token_expires_at: now + ttl,
            region: node.region,
            labels: parse_labels(&node.labels),
            heartbeat_interval_ms: self.interval_ms(),
            lease_misses: self.config.lease_misses,
            node_id: node.id,
        })
    }

    /// Verifies a node token and that its node is registered; returns the id.
    pub async fn authenticate_node(&self, token: &str) -> Result<String, ApiError> {
        let id = self.node_key.verify(token).map_err(|e| match e {
            NodeTokenError::Expired => ApiError::CredentialExpired,
            NodeTokenError::Invalid(m) => ApiError::InvalidCredential(m.to_owned()),
        })?;
        let known = self
            .view
            .read()
            .map(|v| v.nodes.contains_key(&id))
            .unwrap_or(false);
        if !known && self.store.get_node(&id).await?.is_none() {
            return Err(ApiError::UnknownNode(id));
        }
        Ok(id)
    }

    // -------------------------------------------------------------- registry

    /// Records a heartbeat (persisted at the next tick, which comes at once
    /// when the set of links the node reports dead changed).
    pub fn heartbeat(
        &self,
        id: &str,
        mut hb: Heartbeat,
    ) -> Result<api::HeartbeatResponse, ApiError> {
        hb.validate().map_err(ApiError::InvalidRequest)?;
        if let Err(reason) = check_http_url(&hb.addresses, &self.config.node_url_domains) {
            // Leave the URL out rather than refuse the heartbeat: the node
            // stays in the mesh, dispatch answers name no URL for it.
            hb.addresses.http = None;
            self.metrics
                .node_urls_rejected
                .get_or_create(&crate::metrics::ReasonLabels { reason })
                .inc();
            tracing::warn!(
                node_id = %id,
                reason,
                "left out the node's reported HTTP URL: it must be http(s)://, without \
                 credentials, on the host of its media or mesh address"
            );
        }
        let now = now_ms();
        let dead_changed = self.dead_links_changed(id, &hb);
        let hb = Arc::new(hb);
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id.to_owned(), (now, hb.clone()));
        }
        if let Ok(mut l) = self.latest.lock() {
            l.insert(id.to_owned(), (now, hb));
        }
        self.metrics.heartbeats.inc();
        if dead_changed {
            self.metrics.link_state_changes.inc();
            tracing::debug!(node_id = %id, "a link went down or came back up: scheduling now");
            self.tick_now.notify_one();
        }
        let desired_version = self
            .desired
            .read()
            .ok()
            .and_then(|d| d.get(id).map(|(v, _)| *v))
            .unwrap_or(0);
        let drain = self
            .view
            .read()
            .ok()
            .and_then(|v| v.nodes.get(id).map(|n| n.row.drain))
            .unwrap_or(false);
        Ok(api::HeartbeatResponse {
            lease_expires_at_ms: now + self.lease_ms(),
            heartbeat_interval_ms: self.interval_ms(),
            desired_version,
            drain,
        })
    }

    /// Whether the links `hb` reports dead differ from those the node's
    /// previous heartbeat did (the stored report when this replica has seen
    /// none from it yet); remembers them.
    fn dead_links_changed(&self, id: &str, hb: &Heartbeat) -> bool {
        let dead: BTreeSet<String> = hb
            .links
            .iter()
            .filter(|l| l.loss >= 1.0)
            .map(|l| l.peer.clone())
            .collect();
        let Ok(mut known) = self.dead_links.lock() else {
            return false;
        };
        let changed = match known.get(id) {
            Some(before) => *before != dead,
            None => {
                let v = self.view();
                let before = v.nodes.get(id).map(|n| {
                    n.report
                        .links
                        .iter()
                        .filter(|l| l.loss >= 1.0)
                        .map(|l| l.peer.as_str())
                        .collect::<BTreeSet<&str>>()
                });
                before.unwrap_or_default() != dead.iter().map(String::as_str).collect()
            }
        };
        known.insert(id.to_owned(), dead);
        changed
    }

    /// Resolves when a heartbeat asked for a tick before the next one is
    /// due (a link went down or came back up). One request is kept if the
    /// ticker was busy; the caller bounds how often it acts on them.
    pub async fn tick_requested(&self) {
        self.tick_now.notified().await;
    }

    /// Node summaries, sorted by id.
    pub fn list_nodes(&self) -> Vec<NodeSummary> {
        let v = self.view();
        let now = now_ms();
        v.nodes.values().map(|n| self.summary(n, now)).collect()
    }

    fn summary(&self, n: &NodeView, now: u64) -> NodeSummary {
        NodeSummary {
            id: n.row.id.clone(),
            region: n.row.region.clone(),
            labels: n.labels.clone(),
            hostname: n.row.hostname.clone(),
            version: if n.report.version.is_empty() {
                n.row.agent_version.clone()
            } else {
                n.report.version.clone()
            },
            state: n.state(now, self.lease_ms()).to_owned(),
            drain: n.row.drain,
            enrolled_at: n.row.enrolled_at,
            last_heartbeat_ms: n.row.last_heartbeat_ms,
            load: n.report.load_score(),
            sessions: n.report.load.sessions,
            addresses: n.report.addresses.clone(),
            desired_version: self
                .desired
                .read()
                .ok()
                .and_then(|d| d.get(&n.row.id).map(|(v, _)| *v))
                .unwrap_or(n.row.desired_version),
        }
    }

    /// One node in detail (desired state without secrets).
    pub async fn node_detail(&self, id: &str) -> Result<api::NodeDetail, ApiError> {
        let v = self.view();
        let n = match v.nodes.get(id) {
            Some(n) => n.clone(),
            None => {
                let row = self
                    .store
                    .get_node(id)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("no node {id}")))?;
                Arc::new(node_view(row, &self.config.node_url_domains))
            }
        };
        let desired = self.desired_json(id).and_then(|(_, body)| {
            let mut d: serde_json::Value = serde_json::from_str(&body).ok()?;
            let obj = d.as_object_mut()?;
            obj.remove("dataplane_secret");
            for field in ["links", "probes"] {
                if let Some(links) = obj.get_mut(field).and_then(|l| l.as_array_mut()) {
                    for l in links {
                        if let Some(l) = l.as_object_mut() {
                            l.remove("key");
                        }
                    }
                }
            }
            Some(d)
        });
        Ok(api::NodeDetail {
            summary: self.summary(&n, now_ms()),
            public_key: api::PublicKey {
                alg: n.row.key_alg.clone(),
                key: n.row.public_key.clone(),
            },
            capabilities: n.report.capabilities.clone(),
            load_report: n.report.load.clone(),
            links: n.report.links.clone(),
            rooms: n.report.rooms.clone(),
            desired,
        })
    }

    /// Sets or clears drain.
    pub async fn drain(&self, id: &str, drain: bool) -> Result<NodeSummary, ApiError> {
        if !self.store.set_drain(id, drain).await? {
            return Err(ApiError::NotFound(format!("no node {id}")));
        }
        tracing::info!(node_id = %id, drain, "drain set");
        // Reflect it at once in this replica's snapshot.
        self.reload().await?;
        let v = self.view();
        let n = v
            .nodes
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("no node {id}")))?;
        Ok(self.summary(n, now_ms()))
    }

    /// Rooms of up nodes.
    pub fn rooms(&self) -> Vec<api::RoomInfo> {
        mesh_view(&self.view(), now_ms(), self.lease_ms())
            .rooms
            .into_iter()
            .map(|r| api::RoomInfo {
                room: r.room,
                publishers: r.publishers.into_iter().collect(),
                subscribers: r.subscribers.into_iter().collect(),
            })
            .collect()
    }

    /// The last plan the leader stored.
    pub async fn routes(&self) -> Result<api::RouteList, ApiError> {
        Ok(match self.store.load_plan().await? {
            Some((at, leader, plan)) => {
                let plan: RoutePlan = serde_json::from_str(&plan)
                    .map_err(|e| StoreError::Corrupt(format!("route plan: {e}")))?;
                api::RouteList {
                    computed_at_ms: at,
                    leader,
                    routes: plan.routes,
                }
            }
            None => api::RouteList {
                computed_at_ms: 0,
                leader: String::new(),
                routes: Vec::new(),
            },
        })
    }

    // -------------------------------------------------------------- dispatch

    /// Picks a node for a client and signs it an access token.
    pub fn dispatch(
        &self,
        room: &str,
        identity: Option<&str>,
        publish: bool,
        subscribe: bool,
        region: Option<&str>,
        client_ip: Option<IpAddr>,
    ) -> Result<api::DispatchResponse, ApiError> {
        let r = self.dispatch_inner(room, identity, publish, subscribe, region, client_ip);
        let code = match &r {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.metrics
            .dispatches
            .get_or_create(&CodeLabels { code })
            .inc();
        r
    }

    fn dispatch_inner(
        &self,
        room: &str,
        identity: Option<&str>,
        publish: bool,
        subscribe: bool,
        region: Option<&str>,
        client_ip: Option<IpAddr>,
    ) -> Result<api::DispatchResponse, ApiError> {
        if room.is_empty() || room.len() > 128 {
            return Err(ApiError::InvalidRequest(
                "room must be 1 to 128 bytes".into(),
            ));
        }
        if identity.is_some_and(|i| i.is_empty() || i.len() > 128) {
            return Err(ApiError::InvalidRequest(
                "identity must be 1 to 128 bytes".into(),
            ));
        }
        let region = region
            .map(str::to_owned)
            .or_else(|| client_ip.and_then(|ip| self.config.region_for(ip).map(str::to_owned)));
        let v = self.view();
        let now = now_ms();
        let lease = self.lease_ms();
        let eligible: Vec<&NodeView> = v
            .nodes
            .values()
            .map(|n| &**n)
            .filter(|n| !n.row.drain && n.up(now, lease) && n.report.addresses.media.is_some())
            .collect();
        let cands: Vec<Candidate<'_>> = eligible
            .iter()
            .map(|n| Candidate {
                id: &n.row.id,
                region: &n.row.region,
                load: n.report.load_score(),
                has_room: n.report.rooms.iter().any(|r| r.room == room),
            })
            .collect();
        let i = dispatch::choose(&cands, region.as_deref()).ok_or_else(|| {
            ApiError::NoNodeAvailable("no node is up, reachable and not draining".into())
        })?;
        let n = eligible[i];
        let now_s = now_secs();
        let exp = now_s + self.config.access_token_ttl.as_secs();
        let sub = identity
            .map(str::to_owned)
            .unwrap_or_else(|| format!("c-{}", crypto::random_hex(6)));
        let token = crypto::sign_access(
            &n.row.dataplane_secret,
            &crypto::AccessClaims {
                room: room.to_owned(),
                sub,
                can_publish: publish,
                can_subscribe: subscribe,
                admin: false,
                exp,
                iat: now_s,
            },
        );
        Ok(api::DispatchResponse {
            node_id: n.row.id.clone(),
            region: n.row.region.clone(),
            media_address: n.report.addresses.media.clone().unwrap_or_default(),
            url: n.report.addresses.http.clone(),
            token,
            expires_at: exp,
        })
    }

    // --------------------------------------------------------- desired state

    /// The node's current desired state: (version, JSON).
    pub fn desired_json(&self, id: &str) -> Option<(u64, Arc<str>)> {
        self.desired.read().ok()?.get(id).cloned()
    }

    /// Takes one of the node's `max_long_polls_per_node` long-poll places,
    /// or refuses with [`ApiError::TooManyLongPolls`].
    pub fn begin_long_poll(&self, node: &str) -> Result<LongPoll<'_>, ApiError> {
        let max = self.config.limits.max_long_polls_per_node;
        let mut m = self
            .long_polls
            .lock()
            .map_err(|_| ApiError::Internal(StoreError::Corrupt("long-poll table".into())))?;
        let n = m.entry(node.to_owned()).or_insert(0);
        if *n >= max {
            drop(m);
            self.metrics.long_polls_refused.inc();
            return Err(ApiError::TooManyLongPolls(format!(
                "node {node} already has {max} desired-state long polls open \
                 (max_long_polls_per_node); wait for one to return"
            )));
        }
        *n += 1;
        Ok(LongPoll {
            sched: self,
            node: node.to_owned(),
        })
    }

    /// Long poll: a desired state whose version differs from `since`, or
    /// `None` after `wait` (or at shutdown).
    pub async fn watch_desired(
        &self,
        id: &str,
        since: u64,
        wait: Duration,
    ) -> Option<(u64, Arc<str>)> {
        let mut rx = self.changed.subscribe();
        let check = || self.desired_json(id).filter(|(v, _)| *v != since);
        if let Some(d) = check() {
            return Some(d);
        }
        self.metrics.watchers.inc();
        let deadline = tokio::time::Instant::now() + wait;
        let out = loop {
            if self.shutting_down() {
                break None;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {
                    if let Some(d) = check() {
                        break Some(d);
                    }
                }
                _ => break None,
            }
        };
        self.metrics.watchers.dec();
        out
    }

    // ------------------------------------------------------------ background

    /// One scheduling tick: flush heartbeats, reload the snapshot, run the
    /// leader's jobs, refresh desired states.
    pub async fn tick(&self, lock: &mut LeaderLock) -> Result<(), StoreError> {
        self.flush().await?;
        self.reload().await?;
        let leader = !self.shutting_down() && lock.ensure(&self.store, &self.config.database).await;
        if leader != self.leader.swap(leader, Ordering::Relaxed) {
            tracing::info!(replica = %self.config.replica_id, leader, "leadership changed");
            if !leader && let Ok(mut p) = self.plan.lock() {
                *p = None;
            }
            if let Ok(mut c) = self.last_computed.lock() {
                *c = None;
            }
        }
        self.metrics.leader.set(i64::from(leader));
        if leader {
            self.schedule().await?;
        }
        self.refresh_desired().await?;
        Ok(())
    }

    /// Writes pending heartbeats.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let taken: Vec<(String, LocalReport)> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => Vec::new(),
        };
        if taken.is_empty() {
            return Ok(());
        }
        // Serializing thousands of reports is CPU work: keep it off the
        // threads that answer heartbeats.
        let (taken, batch) = tokio::task::spawn_blocking(move || {
            let batch: Vec<HeartbeatWrite> = taken
                .iter()
                .map(|(id, (at_ms, hb))| HeartbeatWrite {
                    id: id.clone(),
                    at_ms: *at_ms,
                    report: serde_json::to_string(&**hb).unwrap_or_default(),
                })
                .collect();
            (taken, batch)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("flush task: {e}")))?;
        if let Err(e) = self.store.write_heartbeats(&batch).await {
            // Put them back unless newer ones arrived meanwhile.
            if let Ok(mut p) = self.pending.lock() {
                for (id, hb) in taken {
                    p.entry(id).or_insert(hb);
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Reloads the snapshot from the database, overlaying the heartbeats
    /// this replica received.
    ///
    /// Reads the changing columns of every node, then full rows only for
    /// nodes that are new, whose desired state changed, or whose stored
    /// heartbeat is newer than any this replica has (another replica took
    /// it). With one replica and 10,000 nodes a tick reads 10,000 short
    /// rows and parses no report.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let heads = self.store.load_node_heads().await?;
        let prev = self.view();
        let latest: HashMap<String, LocalReport> =
            self.latest.lock().map(|l| l.clone()).unwrap_or_default();
        let (mut nodes, fetch, latest) = tokio::task::spawn_blocking(move || {
            let mut nodes = BTreeMap::new();
            let mut fetch = Vec::new();
            for head in heads {
                match reuse(prev.nodes.get(&head.id), &head, latest.get(&head.id)) {
                    Some(n) => {
                        nodes.insert(head.id, n);
                    }
                    None => fetch.push(head.id),
                }
            }
            (nodes, fetch, latest)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("snapshot task: {e}")))?;
        if !fetch.is_empty() {
            let rows = self.store.load_nodes_by_id(&fetch).await?;
            let domains = self.config.node_url_domains.clone();
            let fetched = tokio::task::spawn_blocking(move || {
                rows.into_iter()
                    .map(|row| {
                        let mut n = node_view(row, &domains);
                        if let Some((at, hb)) = latest.get(&n.row.id)
                            && n.row.last_heartbeat_ms.is_none_or(|t| t <= *at)
                        {
                            n.row.last_heartbeat_ms = Some(*at);
                            n.report = hb.clone();
                        }
                        Arc::new(n)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| StoreError::Corrupt(format!("snapshot task: {e}")))?;
            for n in fetched {
                nodes.insert(n.row.id.clone(), n);
            }
        }
        let now = now_ms();
        let lease = self.lease_ms();
        let mut counts: BTreeMap<&'static str, i64> =
            ["pending", "up", "down", "draining"].map(|s| (s, 0)).into();
        for n in nodes.values() {
            *counts.entry(n.state(now, lease)).or_default() += 1;
        }
        for (state, c) in counts {
            self.metrics
                .nodes
                .get_or_create(&StateLabels { state })
                .set(c);
        }
        if let Ok(mut v) = self.view.write() {
            *v = Arc::new(View { nodes });
        }
        Ok(())
    }

    /// The leader's job: route plan and desired states, when the mesh's
    /// structure changed or the last ones are [`METRIC_REFRESH_INTERVALS`]
    /// heartbeat intervals old.
    async fn schedule(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let view = self.view();
        let now = now_ms();
        let structure = structure_fingerprint(&view, now, self.lease_ms());
        let refresh_ms = (self.interval_ms() as f64 * METRIC_REFRESH_INTERVALS) as u64;
        let last = self.last_computed.lock().ok().and_then(|c| *c);
        if last.is_some_and(|(fp, at)| fp == structure && now.saturating_sub(at) < refresh_ms) {
            self.metrics.route_computations_skipped.inc();
            return Ok(());
        }
        let model = CostModel {
            max_hops: self.config.max_hops,
            ..CostModel::default()
        };
        let previous = self.plan.lock().ok().and_then(|p| p.clone());
        let lease = self.lease_ms();
        let mesh_key = self.mesh_key.clone();
        let prev = previous.clone();
        let v = view.clone();
        // Route computation and desired-state derivation are CPU work: run
        // them off the request threads.
        let (plan, writes, next) = tokio::task::spawn_blocking(move || {
            compute_desired(&v, now, lease, &model, prev.as_ref(), &mesh_key)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("scheduling task: {e}")))?;
        self.store.write_desired(&writes).await?;
        self.metrics.desired_updates.inc_by(writes.len() as u64);
        if previous.as_ref() != Some(&plan) || !writes.is_empty() {
            let body = serde_json::to_string(&plan).unwrap_or_default();
            self.store
                .save_plan(now, &self.config.replica_id, &body)
                .await?;
        }
        if !writes.is_empty() {
            tracing::debug!(
                changed = writes.len(),
                version = next,
                "desired states updated"
            );
            // Keep the snapshot's versions current for the next comparison.
            self.reload().await?;
        }
        if let Ok(mut p) = self.plan.lock() {
            *p = Some(plan);
        }
        if let Ok(mut c) = self.last_computed.lock() {
            *c = Some((structure, now));
        }
        self.metrics.route_computations.inc();
        self.metrics
            .route_computation_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Loads desired states newer than the last seen version.
    pub async fn refresh_desired(&self) -> Result<(), StoreError> {
        let since = self.desired_seq.lock().map(|s| *s).unwrap_or(0);
        let rows = self.store.desired_since(since).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut top = since;
        if let Ok(mut d) = self.desired.write() {
            for (id, v, body) in rows {
                top = top.max(v);
                d.insert(id, (v, Arc::from(body)));
            }
        }
        if let Ok(mut s) = self.desired_seq.lock() {
            *s = top;
        }
        self.changed.send_replace(top);
        Ok(())
    }

    /// Final flush at shutdown.
    pub async fn close(&self, lock: &mut LeaderLock) {
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "final heartbeat flush failed");
        }
        lock.release().await;
        self.store.close().await;
    }
}

/// The route plan and the desired states that differ from the stored ones,
/// with the version they get.
fn compute_desired(
    view: &View,
    now: u64,
    lease: u64,
    model: &CostModel,
    previous: Option<&RoutePlan>,
    mesh_key: &str,
) -> (RoutePlan, Vec<(String, u64, String)>, u64) {
    let mesh = mesh_view(view, now, lease);
    let mut plan = route::compute(&mesh, model, previous);
    let facts: Vec<NodeFacts<'_>> = view
        .nodes
        .values()
        .map(|n| NodeFacts {
            id: &n.row.id,
            drain: n.row.drain,
            dataplane_secret: &n.row.dataplane_secret,
            mesh_address: n.report.addresses.mesh.as_deref().or(n
                .report
                .addresses
                .media
                .as_deref()),
            trust_domain: n.labels.get("trust_domain").map(String::as_str),
            up: n.up(now, lease) && !n.row.drain,
        })
        .collect();
    let mut states = desired::derive(&facts, &plan, mesh_key);
    let fec_links =
        desired::mark_lossy_links(&mut states, &mesh.links, previous.map(|p| &p.fec_links));
    let max_version = view
        .nodes
        .values()
        .map(|n| n.row.desired_version)
        .max()
        .unwrap_or(0);
    let next = max_version + 1;
    let mut writes = Vec::new();
    for mut st in states {
        let Some(n) = view.nodes.get(&st.node_id) else {
            continue;
        };
        st.version = n.row.desired_version;
        let same = n
            .row
            .desired
            .as_deref()
            .is_some_and(|old| desired::same_json(&st, old));
        if same {
            continue;
        }
        st.version = next;
        writes.push((st.node_id.clone(), next, desired_json(&st)));
    }
    plan.fec_links = fec_links;
    (plan, writes, next)
}

fn desired_json(st: &DesiredState) -> String {
    serde_json::to_string(st).unwrap_or_default()
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    serde_json::from_str(s).unwrap_or_default()
}

/// Whether a node's reported `addresses.http` may be handed to clients:
/// absent, or an `http`/`https` URL without credentials whose host is the
/// host of its media or mesh address, or a DNS name `domains` allows
/// (`name` exactly, `*.suffix` any name under it). `Err` names the reason
/// (a metric label).
pub fn check_http_url(a: &api::Addresses, domains: &[String]) -> Result<(), &'static str> {
    let Some(raw) = a.http.as_deref() else {
        return Ok(());
    };
    let u = url::Url::parse(raw).map_err(|_| "unparsable")?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("scheme");
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("credentials");
    }
    let host = u.host().ok_or("host")?;
    let matches = |addr: &str| {
        let addr_host = match addr.parse::<std::net::SocketAddr>() {
            Ok(sa) => return matches_ip(&host, sa.ip()),
            Err(_) => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
        };
        let addr_host = addr_host.trim_start_matches('[').trim_end_matches(']');
        match addr_host.parse::<std::net::IpAddr>() {
            Ok(ip) => matches_ip(&host, ip),
            Err(_) => {
                matches!(&host, url::Host::Domain(d) if d.eq_ignore_ascii_case(addr_host))
            }
        }
    };
    let allowed = |d: &str| {
        domains.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => d.len().checked_sub(suffix.len() + 1).is_some_and(|i| {
                d.as_bytes()[i] == b'.'
                    && d.get(i + 1..)
                        .is_some_and(|s| s.eq_ignore_ascii_case(suffix))
            }),
            None => d.eq_ignore_ascii_case(p),
        })
    };
    if matches!(&host, url::Host::Domain(d) if allowed(d))
        || [a.media.as_deref(), a.mesh.as_deref()]
            .into_iter()
            .flatten()
            .any(matches)
    {
        Ok(())
    } else {
        Err("host")
    }
}

fn matches_ip(host: &url::Host<&str>, ip: std::net::IpAddr) -> bool {
    match (host, ip.to_canonical()) {
        (url::Host::Ipv4(h), std::net::IpAddr::V4(i)) => *h == i,
        (url::Host::Ipv6(h), std::net::IpAddr::V6(i)) => *h == i,
        _ => false,
    }
}

fn node_view(mut row: NodeRow, url_domains: &[String]) -> NodeView {
    let mut report: Heartbeat = row
        .report
        .take()
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or_default();
    // Reports stored before URLs were checked.
    if check_http_url(&report.addresses, url_domains).is_err() {
        report.addresses.http = None;
    }
    NodeView {
        labels: parse_labels(&row.labels),
        row,
        report: Arc::new(report),
    }
}

/// The snapshot entry for `head` built from the previous one without
/// reading the row, or `None` when the row must be read: the node is new,
/// its desired state changed, or the database holds a heartbeat newer than
/// any this replica parsed.
fn reuse(
    prev: Option<&Arc<NodeView>>,
    head: &store::NodeHead,
    local: Option<&LocalReport>,
) -> Option<Arc<NodeView>> {
    let prev = prev?;
    if prev.row.desired_version != head.desired_version {
        return None;
    }
    let (at, report) = match (local, head.last_heartbeat_ms) {
        (Some((at, hb)), stored) if stored.is_none_or(|t| t <= *at) => (Some(*at), hb),
        (_, stored) if stored == prev.row.last_heartbeat_ms => (stored, &prev.report),
        _ => return None,
    };
    if at == prev.row.last_heartbeat_ms
        && head.drain == prev.row.drain
        && Arc::ptr_eq(report, &prev.report)
    {
        return Some(prev.clone());
    }
    let mut n = NodeView::clone(prev);
    n.row.last_heartbeat_ms = at;
    n.row.drain = head.drain;
    n.report = report.clone();
    Some(Arc::new(n))
}

/// A hash of what makes the mesh's shape, as opposed to its measurements:
/// per node (in id order) whether it is up, drained, its addresses, labels
/// and which rooms it publishes or watches, and per reported link the peer
/// and whether it is dead (loss 1.0). Equal fingerprints mean a new route
/// computation could differ from the last only through RTT, loss, jitter or
/// load.
fn structure_fingerprint(v: &View, now_ms: u64, lease_ms: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (id, n) in &v.nodes {
        id.hash(&mut h);
        n.up(now_ms, lease_ms).hash(&mut h);
        n.row.drain.hash(&mut h);
        n.labels.hash(&mut h);
        let a = &n.report.addresses;
        (&a.media, &a.mesh, &a.http).hash(&mut h);
        n.report.links.len().hash(&mut h);
        for l in &n.report.links {
            l.peer.hash(&mut h);
            (l.loss >= 1.0).hash(&mut h);
        }
        n.report.rooms.len().hash(&mut h);
        for r in &n.report.rooms {
            r.room.hash(&mut h);
            (r.publishers > 0, r.subscribers > 0).hash(&mut h);
        }
    }
    h.finish()
}

/// The routing input from a snapshot.
pub fn mesh_view(v: &View, now_ms: u64, lease_ms: u64) -> MeshView {
    let mut rooms: BTreeMap<&str, RoomInput> = BTreeMap::new();
    let mut nodes = Vec::with_capacity(v.nodes.len());
    let mut links = Vec::new();
    for n in v.nodes.values() {
        let up = n.up(now_ms, lease_ms);
        nodes.push(NodeInput {
            id: n.row.id.clone(),
            up,
            transit: up && !n.row.drain,
            load: n.report.load_score(),
        });
        if !up {
            continue;
        }
        for l in &n.report.links {
            links.push(LinkInput {
                from: n.row.id.clone(),
                to: l.peer.clone(),
                rtt_ms: l.rtt_ms,
                loss: l.loss,
                jitter_ms: l.jitter_ms,
            });
        }
        for r in &n.report.rooms {
            let e = rooms.entry(&r.room).or_insert_with(|| RoomInput {
                room: r.room.clone(),
                publishers: BTreeSet::new(),
                subscribers: BTreeSet::new(),
            });
            if r.publishers > 0 {
                e.publishers.insert(n.row.id.clone());
            }
            if r.subscribers > 0 {
                e.subscribers.insert(n.row.id.clone());
            }
        }
    }
    MeshView {
        nodes,
        links,
        rooms: rooms.into_values().collect(),
    }
}

fn token_info(t: &TokenRow, now: u64) -> TokenInfo {
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at <= now {
        "expired"
    } else if t.uses >= t.max_uses {
        "exhausted"
    } else {
        "active"
    };
    TokenInfo {
        id: t.id.clone(),
        token: None,
        region: t.region.clone(),
        labels: parse_labels(&t.labels),
        description: t.description.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        max_uses: t.max_uses,
        uses: t.uses,
        revoked: t.revoked_at.is_some(),
        state: state.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(http: &str) -> api::Addresses {
        api::Addresses {
            media: Some("192.0.2.7:443".into()),
            mesh: Some("[2001:db8::1]:5000".into()),
            http: Some(http.into()),
        }
    }

    #[test]
    fn node_urls() {
        for ok in [
            "https://192.0.2.7",
            "http://192.0.2.7:8080/x?y",
            "https://[2001:db8::1]:8443/",
        ] {
            assert_eq!(check_http_url(&addrs(ok), &[]), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("javascript:alert(1)//", "scheme"),
            ("data:text/html,x", "scheme"),
            ("ftp://192.0.2.7/", "scheme"),
            ("https://evil.example/", "host"),
            ("https://192.0.2.8/", "host"),
            ("https://u:p@192.0.2.7/", "credentials"),
            ("not a url", "unparsable"),
        ] {
            assert_eq!(check_http_url(&addrs(bad), &[]), Err(why), "{bad}");
        }
        let mut named = addrs("https://Node1.example:8443");
        named.media = Some("node1.example:443".into());
        assert_eq!(check_http_url(&named, &[]), Ok(()));
        assert_eq!(check_http_url(&api::Addresses::default(), &[]), Ok(()));
        let domains = ["edge.example.net".to_owned(), "*.cdn.example".to_owned()];
        for ok in [
            "https://EDGE.example.net/",
            "https://fra-1.cdn.example:8443",
            "https://a.b.cdn.example",
        ] {
            assert_eq!(check_http_url(&addrs(ok), &domains), Ok(()), "{ok}");
        }
        for bad in [
            "https://cdn.example/",
            "https://xcdn.example/",
            "https://edge.example.net.evil/",
            "https://other.example.net/",
        ] {
            assert_eq!(check_http_url(&addrs(bad), &domains), Err("host"), "{bad}");
        }
    }
}
