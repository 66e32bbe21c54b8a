//! Wire types of the v1 protocol (docs/scheduler-api.md). Requests are
//! parsed strictly (`deny_unknown_fields`); responses may gain fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v1/enroll` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub bootstrap_token: String,
    pub public_key: PublicKey,
    pub proof: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub version: String,
}

/// An agent's public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// `ed25519` or `p256`.
    pub alg: String,
    /// Standard base64 of the raw key.
    pub key: String,
}

/// `POST /v1/enroll` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub node_id: String,
    pub node_token: String,
    pub node_token_expires_at: u64,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub heartbeat_interval_ms: u64,
    pub lease_misses: u32,
}

/// Node addresses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addresses {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

/// A NIC.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    #[serde(default)]
    pub speed_mbps: u64,
    /// `aa:bb:cc:dd:ee:ff`; empty when the interface has none (e.g. `lo`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub mtu: u32,
    /// `ADDR/PREFIX`, IPv4 and IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// A GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub model: String,
    #[serde(default)]
    pub nvenc: bool,
    #[serde(default)]
    pub nvdec: bool,
}

/// What a node can do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub cores: u32,
    /// Total memory (MemTotal of /proc/meminfo).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub memory_bytes: u64,
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub xdp_mode: Option<String>,
    #[serde(default)]
    pub io_uring: bool,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    #[serde(default)]
    pub vaapi: bool,
    #[serde(default)]
    pub max_sessions: u64,
}

/// Current load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    #[serde(default)]
    pub cpu: f64,
    /// 0.0 – 1.0: used memory (1 − MemAvailable/MemTotal).
    #[serde(default)]
    pub memory: f64,
    #[serde(default)]
    pub pps: u64,
    #[serde(default)]
    pub sessions: u64,
    #[serde(default)]
    pub bandwidth_bps: u64,
}

/// A link measurement to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkReport {
    pub peer: String,
    pub rtt_ms: f64,
    #[serde(default)]
    pub loss: f64,
    #[serde(default)]
    pub jitter_ms: f64,
}

/// A room's presence on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomReport {
    pub room: String,
    #[serde(default)]
    pub publishers: u32,
    #[serde(default)]
    pub subscribers: u32,
}

/// `POST /v1/nodes/{id}/heartbeat` body: the node's full report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub addresses: Addresses,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default)]
    pub load: Load,
    #[serde(default)]
    pub links: Vec<LinkReport>,
    #[serde(default)]
    pub rooms: Vec<RoomReport>,
}

impl Heartbeat {
    /// Checks value ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.load.cpu) {
            return Err("load.cpu must be between 0 and 1".into());
        }
        if !(0.0..=1.0).contains(&self.load.memory) {
            return Err("load.memory must be between 0 and 1".into());
        }
        for (name, a) in [
            ("media", &self.addresses.media),
            ("mesh", &self.addresses.mesh),
        ] {
            if let Some(a) = a
                && a.parse::<std::net::SocketAddr>().is_err()
            {
                return Err(format!("addresses.{name} must be IP:PORT"));
            }
        }
        if self.links.len() > 10_000 || self.rooms.len() > 100_000 {
            return Err("too many links or rooms".into());
        }
        for l in &self.links {
            if !(l.rtt_ms.is_finite() && l.rtt_ms >= 0.0) {
                return Err(format!("links[{}].rtt_ms must be >= 0", l.peer));
            }
            if !(0.0..=1.0).contains(&l.loss) {
                return Err(format!("links[{}].loss must be between 0 and 1", l.peer));
            }
            if !(l.jitter_ms.is_finite() && l.jitter_ms >= 0.0) {
                return Err(format!("links[{}].jitter_ms must be >= 0", l.peer));
            }
        }
        for r in &self.rooms {
            if r.room.is_empty() || r.room.len() > 128 {
                return Err("rooms[].room must be 1 to 128 bytes".into());
            }
        }
        Ok(())
    }

    /// 0.0 – 1.0: the larger of CPU and session load.
    pub fn load_score(&self) -> f64 {
        let sessions = if self.capabilities.max_sessions > 0 {
            self.load.sessions as f64 / self.capabilities.max_sessions as f64
        } else {
            0.0
        };
        self.load.cpu.max(sessions).clamp(0.0, 1.0)
    }
}

/// Heartbeat answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub lease_expires_at_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub desired_version: u64,
    pub drain: bool,
}

/// A mesh link in the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredLink {
    pub peer: String,
    pub address: Option<String>,
    pub key: String,
    pub trusted: bool,
    /// Send FEC on the link (FlexFEC for video, RED for audio): its
    /// measured loss is at least [`crate::desired::FEC_LOSS_THRESHOLD`].
    /// Left out when false, so states without FEC keep their bytes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fec: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// A route entry in the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRoute {
    pub room: String,
    pub source: String,
    pub upstream: Option<String>,
    pub downstream: Vec<String>,
}

/// The desired state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub node_id: String,
    pub version: u64,
    pub drain: bool,
    pub dataplane_secret: String,
    pub links: Vec<DesiredLink>,
    pub routes: Vec<DesiredRoute>,
    /// Peers to measure (link probes) besides `links`: how the scheduler
    /// learns the link qualities routes are computed from. Not a mesh link.
    pub probes: Vec<DesiredLink>,
}

/// `POST /v1/tokens` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub max_uses: Option<u32>,
    pub region: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
}

/// A bootstrap token as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub max_uses: u32,
    pub uses: u32,
    pub revoked: bool,
    pub state: String,
}

/// `{"tokens": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// A node as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub id: String,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub hostname: String,
    pub version: String,
    pub state: String,
    pub drain: bool,
    pub enrolled_at: u64,
    pub last_heartbeat_ms: Option<u64>,
    pub load: f64,
    pub sessions: u64,
    pub addresses: Addresses,
    pub desired_version: u64,
}

/// `GET /v1/nodes/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub summary: NodeSummary,
    pub public_key: PublicKey,
    pub capabilities: Capabilities,
    pub load_report: Load,
    pub links: Vec<LinkReport>,
    pub rooms: Vec<RoomReport>,
    pub desired: Option<serde_json::Value>,
}

/// `{"nodes": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeSummary>,
}

/// `POST /v1/nodes/{id}/drain` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    pub drain: bool,
}

/// A room and where it lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomInfo {
    pub room: String,
    pub publishers: Vec<String>,
    pub subscribers: Vec<String>,
}

/// `{"rooms": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomList {
    pub rooms: Vec<RoomInfo>,
}

/// `GET /v1/routes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteList {
    pub computed_at_ms: u64,
    pub leader: String,
    pub routes: Vec<crate::route::RoomRoute>,
}

/// `GET /v1/dispatch` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DispatchResponse {
    pub node_id: String,
    pub region: String,
    pub media_address: String,
    pub url: Option<String>,
    pub token: String,
    pub expires_at: u64,
}

/// The error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub error: String,
}
