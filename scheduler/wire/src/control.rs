//! The desired state on the dataplane's local control socket
//! (docs/control-api.md, `PUT /v1/desired`): what the agent writes from the
//! scheduler's [`scheduler::DesiredState`](crate::scheduler::DesiredState)
//! and the dataplane applies.
//!
//! The dataplane parses it strictly (`deny_unknown_fields`): a field it does
//! not know is refused rather than ignored, so whoever writes it sends only
//! what is here (the scheduler's `probes`, for one, stay with the agent).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::Redacted;

/// A mesh link the node must keep to a peer node. `Debug` leaves out the
/// key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshLink {
    /// The peer's node id.
    pub peer: String,
    /// The peer's mesh address, `IP:port` (absent while the peer has not
    /// reported one).
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// Per-link authentication key: 32 bytes as 64 hex digits.
    pub key: String,
    /// Plain RTP with per-link authentication is allowed (else SRTP).
    #[serde(default)]
    pub trusted: bool,
    /// Send FEC on the link (FlexFEC for video, RED for audio). Received
    /// FEC is used on every link whatever this says. Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fec: bool,
}

impl std::fmt::Debug for MeshLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshLink")
            .field("peer", &self.peer)
            .field("address", &self.address)
            .field("key", &Redacted(!self.key.is_empty()))
            .field("trusted", &self.trusted)
            .field("fec", &self.fec)
            .finish()
    }
}

/// Where a room's media comes from and goes to on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackRoute {
    /// The room.
    pub room: String,
    /// The node with the room's publisher.
    pub source: String,
    /// `None` on the source node itself.
    #[serde(default)]
    pub upstream: Option<String>,
    /// The nodes to forward the room's media to.
    #[serde(default)]
    pub downstream: Vec<String>,
}

/// `PUT /v1/desired` body: the scheduler's desired state for this node.
/// `Debug` leaves out the secret and the link keys.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// The node this state is for.
    #[serde(default)]
    pub node_id: String,
    /// Increases monotonically; at least 1.
    pub version: u64,
    /// Stop accepting new sessions (one-way until the node restarts).
    #[serde(default)]
    pub drain: bool,
    /// New HS256 key for access tokens, when the scheduler sends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane_secret: Option<String>,
    /// The mesh links to keep.
    #[serde(default)]
    pub links: Vec<MeshLink>,
    /// The routes this node is on.
    #[serde(default)]
    pub routes: Vec<TrackRoute>,
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
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What the agent sends (the scheduler's state less its probes), as
    /// docs/control-api.md shows it.
    const DESIRED: &str = concat!(
        r#"{"node_id":"n-3f9a0c1b2d4e5f60","version":18,"drain":false,"#,
        r#""dataplane_secret":"9b1f","#,
        r#""links":[{"peer":"n-77aa00bb11cc22dd","address":"10.0.0.9:5006","key":"4c0e","trusted":true,"fec":true},"#,
        r#"{"peer":"n-88aa00bb11cc22dd","address":"[fd00::9]:5006","key":"5d1f","trusted":false},"#,
        r#"{"peer":"n-99aa00bb11cc22dd","address":null,"key":"6e20","trusted":false}],"#,
        r#""routes":[{"room":"demo","source":"n-3f9a0c1b2d4e5f60","upstream":null,"downstream":["n-77aa00bb11cc22dd"]}]}"#
    );

    #[test]
    fn json_is_pinned() {
        let d: DesiredState = serde_json::from_str(DESIRED).unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), DESIRED);
        assert_eq!(d.links[1].address, Some("[fd00::9]:5006".parse().unwrap()));
        assert!(d.links[0].fec && !d.links[1].fec);
    }

    #[test]
    fn minimal_document_parses() {
        let d: DesiredState = serde_json::from_str(r#"{"version":1}"#).unwrap();
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"node_id": "", "version": 1, "drain": false, "links": [], "routes": []})
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        for text in [
            r#"{"version":1,"probes":[]}"#,
            r#"{"version":1,"links":[{"peer":"n-1","key":"k","bogus":1}]}"#,
            r#"{"version":1,"routes":[{"room":"r","source":"n-1","bogus":1}]}"#,
            r#"{"version":1,"links":[{"peer":"n-1","key":"k","address":"host:1"}]}"#,
        ] {
            assert!(
                serde_json::from_str::<DesiredState>(text).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let d: DesiredState = serde_json::from_str(DESIRED).unwrap();
        let dbg = format!("{d:?}");
        for secret in ["9b1f", "4c0e", "5d1f", "6e20"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
    }
}
