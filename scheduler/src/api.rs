//! Wire types of the v1 protocol (docs/scheduler-api.md). Requests are
//! parsed strictly (`deny_unknown_fields`); responses may gain fields. The
//! agent protocol's types (enrollment, heartbeat, desired state) are
//! `ridge-wire`'s, shared with the agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use ridge_wire::scheduler::{
    Addresses, Capabilities, DesiredLink, DesiredRoute, DesiredState, EnrollRequest,
    EnrollResponse, Gpu, Heartbeat, HeartbeatResponse, LinkReport, Load, Nic, PublicKey,
    RoomReport,
};

/// The scheduler's checks and score of a node's report.
pub trait HeartbeatExt {
    /// Checks value ranges; the message names the field.
    fn validate(&self) -> Result<(), String>;
    /// 0.0 – 1.0: the larger of CPU and session load.
    fn load_score(&self) -> f64;
}

impl HeartbeatExt for Heartbeat {
    fn validate(&self) -> Result<(), String> {
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

    fn load_score(&self) -> f64 {
        let sessions = if self.capabilities.max_sessions > 0 {
            self.load.sessions as f64 / self.capabilities.max_sessions as f64
        } else {
            0.0
        };
        self.load.cpu.max(sessions).clamp(0.0, 1.0)
    }
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
