//! The scheduler's agent protocol (docs/scheduler-api.md §3): what an agent
//! sends (`POST /v1/enroll`, `POST /v1/nodes/{id}/heartbeat`) and what the
//! scheduler answers (`GET /v1/nodes/{id}/desired` included).
//!
//! Requests are parsed strictly (`deny_unknown_fields`): a typo in an
//! agent's report is an error, not a silently missing value. Answers may
//! gain fields, so the agent's parse of them tolerates unknown ones and
//! defaults what older schedulers leave out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Redacted;

/// `POST /v1/enroll` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The bootstrap token the node was provisioned with.
    pub bootstrap_token: String,
    /// The key the node signs its proof with, and will be known by.
    pub public_key: PublicKey,
    /// Signature of the enrollment message (`crypto::enroll_message` on the
    /// scheduler) with the private half of `public_key`, standard base64.
    pub proof: String,
    /// The machine's host name; informational.
    #[serde(default)]
    pub hostname: String,
    /// The agent's version; informational.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The node's id from now on (`n-` and 16 hex digits).
    pub node_id: String,
    /// Bearer token for the node's own endpoints.
    pub node_token: String,
    /// When `node_token` expires, Unix seconds.
    pub node_token_expires_at: u64,
    /// The region the bootstrap token put the node in.
    pub region: String,
    /// Labels from the bootstrap token (absent: none).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How often to send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats after which the node counts as down.
    pub lease_misses: u32,
}

/// A node's addresses. Each is left out when unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addresses {
    /// Where clients send media, `IP:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    /// Where peer nodes send mesh traffic, `IP:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// The dataplane's HTTP(S) base URL for clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

/// A network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// Interface name (`eth0`).
    pub name: String,
    /// Link speed; 0 when the driver does not say.
    #[serde(default)]
    pub speed_mbps: u64,
    /// `aa:bb:cc:dd:ee:ff`; empty (and left out) when the interface has
    /// none (e.g. `lo`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// MTU; 0 (and left out) when unknown.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub mtu: u32,
    /// `ADDR/PREFIX`, IPv4 and IPv6; left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// A GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Model name as the driver reports it.
    pub model: String,
    /// Has a hardware video encoder.
    #[serde(default)]
    pub nvenc: bool,
    /// Has a hardware video decoder.
    #[serde(default)]
    pub nvdec: bool,
}

/// What a node can do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// CPU cores.
    #[serde(default)]
    pub cores: u32,
    /// Total memory (MemTotal of /proc/meminfo); 0 (and left out) when
    /// unknown.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub memory_bytes: u64,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// `"native"`, `"generic"` or `"none"`: the XDP mode the dataplane could
    /// attach in; `null` when the agent does not know.
    #[serde(default)]
    pub xdp_mode: Option<String>,
    /// The kernel offers io_uring.
    #[serde(default)]
    pub io_uring: bool,
    /// GPUs.
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    /// VA-API is available.
    #[serde(default)]
    pub vaapi: bool,
    /// The dataplane's session capacity; 0 when unknown.
    #[serde(default)]
    pub max_sessions: u64,
}

/// A node's current load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// 0.0 – 1.0, whole machine.
    #[serde(default)]
    pub cpu: f64,
    /// 0.0 – 1.0: used memory (1 − MemAvailable/MemTotal).
    #[serde(default)]
    pub memory: f64,
    /// Media packets per second, in and out.
    #[serde(default)]
    pub pps: u64,
    /// Media sessions.
    #[serde(default)]
    pub sessions: u64,
    /// Media bits per second, in and out.
    #[serde(default)]
    pub bandwidth_bps: u64,
}

/// A link measurement to a peer node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkReport {
    /// The peer's node id.
    pub peer: String,
    /// Round-trip time.
    pub rtt_ms: f64,
    /// 0.0 – 1.0: lost probes (1.0: the peer does not answer).
    #[serde(default)]
    pub loss: f64,
    /// RTT variation.
    #[serde(default)]
    pub jitter_ms: f64,
}

/// A room's presence on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomReport {
    /// The room's name.
    pub room: String,
    /// Local publishers.
    #[serde(default)]
    pub publishers: u32,
    /// Local subscribers.
    #[serde(default)]
    pub subscribers: u32,
}

/// `POST /v1/nodes/{id}/heartbeat` body: the node's full report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// Where the node can be reached.
    #[serde(default)]
    pub addresses: Addresses,
    /// What it can do.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// How busy it is.
    #[serde(default)]
    pub load: Load,
    /// Its measurements of links to peers.
    #[serde(default)]
    pub links: Vec<LinkReport>,
    /// The rooms it has participants in.
    #[serde(default)]
    pub rooms: Vec<RoomReport>,
}

/// Heartbeat answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// When the node's lease runs out unless it sends another heartbeat,
    /// Unix milliseconds.
    pub lease_expires_at_ms: u64,
    /// How often to send a heartbeat from now on.
    pub heartbeat_interval_ms: u64,
    /// The version of the node's current desired state.
    pub desired_version: u64,
    /// The node is draining.
    pub drain: bool,
}

/// A mesh link (or a peer to probe) in the desired state. `Debug` leaves
/// out the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredLink {
    /// The peer's node id.
    pub peer: String,
    /// The peer's `addresses.mesh`; `null` while it has not reported one.
    #[serde(default)]
    pub address: Option<String>,
    /// Per-link authentication key: 32 bytes as 64 hex digits.
    pub key: String,
    /// Plain RTP with per-link authentication is allowed (else SRTP).
    #[serde(default)]
    pub trusted: bool,
    /// Send FEC on the link (FlexFEC for video, RED for audio): its
    /// measured loss is high. Left out when false, so states without FEC
    /// keep their bytes (and a dataplane that predates the field, whose
    /// control API refuses unknown fields, keeps taking them).
    #[serde(default, skip_serializing_if = "is_false")]
    pub fec: bool,
}

impl std::fmt::Debug for DesiredLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredLink")
            .field("peer", &self.peer)
            .field("address", &self.address)
            .field("key", &Redacted(!self.key.is_empty()))
            .field("trusted", &self.trusted)
            .field("fec", &self.fec)
            .finish()
    }
}

/// A route entry in the desired state: where one room's media from one
/// source node comes from and goes to on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRoute {
    /// The room.
    pub room: String,
    /// The node with the room's publisher.
    pub source: String,
    /// Where the media comes from; `null` on the source itself.
    #[serde(default)]
    pub upstream: Option<String>,
    /// The nodes to forward it to.
    #[serde(default)]
    pub downstream: Vec<String>,
}

/// The desired state of one node (§3.3), as the scheduler computes and
/// serves it. The agent hands the dataplane its
/// [`control::DesiredState`](crate::control::DesiredState) part. `Debug`
/// leaves out the secret and the link keys.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The node this state is for.
    pub node_id: String,
    /// Increases monotonically per node; at least 1.
    pub version: u64,
    /// Stop accepting new sessions and move existing ones away.
    pub drain: bool,
    /// The HS256 key the node's dataplane verifies access tokens with. The
    /// scheduler always sends one; `None` (left out) only in a state from
    /// elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane_secret: Option<String>,
    /// Mesh links the node must keep (sorted by `peer`).
    #[serde(default)]
    pub links: Vec<DesiredLink>,
    /// Routes the node is on (sorted by `room`, then `source`).
    #[serde(default)]
    pub routes: Vec<DesiredRoute>,
    /// Peers to measure (link probes) besides `links`: how the scheduler
    /// learns the link qualities routes are computed from. Not mesh links:
    /// the agent's business only, never forwarded to the dataplane.
    #[serde(default)]
    pub probes: Vec<DesiredLink>,
}

impl std::fmt::Debug for DesiredState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredState")
            .field("node_id", &self.node_id)
            .field("version", &self.version)
            .field("drain", &self.drain)
            .field(
                "dataplane_secret",
                &Redacted(self.dataplane_secret.is_some()),
            )
            .field("links", &self.links)
            .field("routes", &self.routes)
            .field("probes", &self.probes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn roundtrip<T>(text: &str) -> T
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let v: T = serde_json::from_str(text).unwrap();
        let back = serde_json::to_string(&v).unwrap();
        assert_eq!(back, text, "serialized form changed");
        assert_eq!(serde_json::from_str::<T>(&back).unwrap(), v);
        v
    }

    /// The bytes the scheduler stores and serves for a desired state: the
    /// leader compares new states with these byte for byte, so a change
    /// here rewrites every node's state.
    const DESIRED: &str = concat!(
        r#"{"node_id":"n-3f9a0c1b2d4e5f60","version":18,"drain":false,"#,
        r#""dataplane_secret":"9b1f","#,
        r#""links":[{"peer":"n-77aa00bb11cc22dd","address":"10.0.0.9:5006","key":"4c0e","trusted":true,"fec":true},"#,
        r#"{"peer":"n-88aa00bb11cc22dd","address":null,"key":"5d1f","trusted":false}],"#,
        r#""routes":[{"room":"demo","source":"n-3f9a0c1b2d4e5f60","upstream":null,"downstream":["n-77aa00bb11cc22dd"]},"#,
        r#"{"room":"talk","source":"n-0102030405060708","upstream":"n-77aa00bb11cc22dd","downstream":[]}],"#,
        r#""probes":[{"peer":"n-99aa00bb11cc22dd","address":"10.0.0.10:5006","key":"6e20","trusted":false}]}"#
    );

    #[test]
    fn desired_state_json_is_pinned() {
        let d: DesiredState = roundtrip(DESIRED);
        assert_eq!(d.dataplane_secret.as_deref(), Some("9b1f"));
        assert!(d.links[0].fec && !d.links[1].fec);
        assert_eq!(d.links[1].address, None);
        assert_eq!(d.routes[1].upstream.as_deref(), Some("n-77aa00bb11cc22dd"));
        assert_eq!(d.probes.len(), 1);
    }

    #[test]
    fn desired_state_agent_side_fields_parse() {
        // What the agent accepted: everything but the node id, version and
        // drain may be missing (an older scheduler, or one without probes).
        let d: DesiredState = serde_json::from_value(json!({
            "node_id": "n-1", "version": 2, "drain": true,
            "links": [{"peer": "n-2", "key": "aa"}],
            "routes": [{"room": "r", "source": "n-1"}],
            "some_future_field": 1,
        }))
        .unwrap();
        assert_eq!(d.dataplane_secret, None);
        assert_eq!(d.links[0].address, None);
        assert!(!d.links[0].trusted && !d.links[0].fec);
        assert_eq!(d.routes[0].upstream, None);
        assert!(d.routes[0].downstream.is_empty());
        assert!(d.probes.is_empty());
        // Nothing the scheduler did not send is written back.
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({
                "node_id": "n-1", "version": 2, "drain": true,
                "links": [{"peer": "n-2", "address": null, "key": "aa", "trusted": false}],
                "routes": [{"room": "r", "source": "n-1", "upstream": null, "downstream": []}],
                "probes": [],
            })
        );
        let d: DesiredState = serde_json::from_str(
            r#"{"node_id":"n-1","version":1,"drain":false,"dataplane_secret":null}"#,
        )
        .unwrap();
        assert_eq!(d.dataplane_secret, None);
    }

    #[test]
    fn desired_state_debug_hides_secrets() {
        let d: DesiredState = serde_json::from_str(DESIRED).unwrap();
        let dbg = format!("{d:?}");
        for secret in ["9b1f", "4c0e", "5d1f", "6e20"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(dbg.contains("n-77aa00bb11cc22dd"), "{dbg}");
    }

    /// A heartbeat as the scheduler stores and serves its parts, and as the
    /// agent sends it.
    const HEARTBEAT: &str = concat!(
        r#"{"version":"0.1.0","addresses":{"media":"203.0.113.7:5004","mesh":"10.0.0.7:5006","http":"https://n7.example"},"#,
        r#""capabilities":{"cores":32,"memory_bytes":67108864000,"#,
        r#""nics":[{"name":"eth0","speed_mbps":25000,"mac":"0c:42:a1:00:00:07","mtu":1500,"addresses":["203.0.113.7/24"]},"#,
        r#"{"name":"lo","speed_mbps":0}],"#,
        r#""xdp_mode":"native","io_uring":true,"gpus":[{"model":"L4","nvenc":true,"nvdec":true}],"vaapi":false,"max_sessions":1000},"#,
        r#""load":{"cpu":0.25,"memory":0.5,"pps":1200,"sessions":10,"bandwidth_bps":8000000},"#,
        r#""links":[{"peer":"n-77aa00bb11cc22dd","rtt_ms":1.5,"loss":0.0,"jitter_ms":0.25}],"#,
        r#""rooms":[{"room":"demo","publishers":1,"subscribers":3}]}"#
    );

    #[test]
    fn heartbeat_json_is_pinned() {
        let hb: Heartbeat = roundtrip(HEARTBEAT);
        assert_eq!(hb.capabilities.nics[1].mtu, 0);
        assert_eq!(hb.capabilities.xdp_mode.as_deref(), Some("native"));
    }

    #[test]
    fn heartbeat_agent_side_fields_parse() {
        // The agent always wrote every field, `mtu` and `addresses` of a NIC
        // included, and `xdp_mode` as a string.
        let hb: Heartbeat = serde_json::from_value(json!({
            "version": "0.1.0",
            "addresses": {"media": "203.0.113.7:5004"},
            "capabilities": {"cores": 2, "memory_bytes": 0,
                "nics": [{"name": "lo", "speed_mbps": 0, "mtu": 65536, "addresses": []}],
                "xdp_mode": "none", "io_uring": false, "gpus": [], "vaapi": false, "max_sessions": 0},
            "load": {"cpu": 0.0, "memory": 0.0, "pps": 0, "sessions": 0, "bandwidth_bps": 0},
            "links": [], "rooms": [],
        }))
        .unwrap();
        assert_eq!(hb.capabilities.nics[0].mtu, 65536);
        // The scheduler's minimal form: only what is required.
        let hb: Heartbeat = serde_json::from_str("{}").unwrap();
        assert_eq!(hb, Heartbeat::default());
        assert_eq!(
            serde_json::to_string(&Capabilities::default()).unwrap(),
            r#"{"cores":0,"nics":[],"xdp_mode":null,"io_uring":false,"gpus":[],"vaapi":false,"max_sessions":0}"#
        );
    }

    #[test]
    fn reports_refuse_unknown_fields() {
        for text in [
            r#"{"bogus":1}"#,
            r#"{"load":{"cpu":0.1,"bogus":1}}"#,
            r#"{"capabilities":{"nics":[{"name":"eth0","bogus":1}]}}"#,
            r#"{"links":[{"peer":"n-1","rtt_ms":1,"bogus":1}]}"#,
        ] {
            assert!(serde_json::from_str::<Heartbeat>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn enroll_json_is_pinned() {
        let req: EnrollRequest = roundtrip(concat!(
            r#"{"bootstrap_token":"rbt_x","public_key":{"alg":"ed25519","key":"AAAA"},"#,
            r#""proof":"sig","hostname":"edge-7","version":"0.1.0"}"#
        ));
        assert_eq!(req.public_key.alg, "ed25519");
        let req: EnrollRequest = serde_json::from_str(
            r#"{"bootstrap_token":"t","public_key":{"alg":"p256","key":"k"},"proof":"p"}"#,
        )
        .unwrap();
        assert!(req.hostname.is_empty() && req.version.is_empty());
        assert!(
            serde_json::from_str::<EnrollRequest>(
                r#"{"bootstrap_token":"t","public_key":{"alg":"p256","key":"k"},"proof":"p","x":1}"#
            )
            .is_err()
        );

        let resp: EnrollResponse = roundtrip(concat!(
            r#"{"node_id":"n-1","node_token":"nt","node_token_expires_at":1700000000,"#,
            r#""region":"eu","labels":{"trust_domain":"dc1"},"heartbeat_interval_ms":2000,"lease_misses":3}"#
        ));
        assert_eq!(resp.labels["trust_domain"], "dc1");
        // The agent took an answer without labels, and one with more fields.
        let resp: EnrollResponse = serde_json::from_str(concat!(
            r#"{"node_id":"n-1","node_token":"nt","node_token_expires_at":1,"#,
            r#""region":"eu","heartbeat_interval_ms":2000,"lease_misses":3,"new":true}"#
        ))
        .unwrap();
        assert!(resp.labels.is_empty());
    }

    #[test]
    fn heartbeat_response_json_is_pinned() {
        let r: HeartbeatResponse = roundtrip(
            r#"{"lease_expires_at_ms":1700000000000,"heartbeat_interval_ms":2000,"desired_version":7,"drain":false}"#,
        );
        assert_eq!(r.desired_version, 7);
    }
}
