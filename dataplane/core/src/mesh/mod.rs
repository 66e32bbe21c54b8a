//! Mesh links between nodes: configuration, the control messages carried in
//! RTCP APP packets, and the receive-side loss tracker that drives
//! hop-by-hop NACKs. The routing itself lives in the [`Sfu`](crate::Sfu).
//!
//! The protocol (docs/mesh.md): every datagram on a link is SRTP or SRTCP
//! under the link's per-direction keys; media is RTP with the original
//! sequence numbers of each stream, one SSRC per (track, layer, link);
//! control is single RTCP packets: generic NACK, PLI, and two APP packets
//! (name `RDGM`): `SUBSCRIBE` (downstream to upstream, every
//! [`SUBSCRIBE_INTERVAL`]), `ANNOUNCE` (upstream to downstream, the
//! streams it sends and what they carry), `UNSUBSCRIBE` (downstream to
//! its previous upstream, once a new upstream delivers after a route
//! change) and `DELAY` (downstream to upstream: the link's queueing-delay
//! state from the [`DelayDetector`], see [`DelayReport`]).
//!
//! The pieces: the configuration, constants and the keys the core shares
//! are here; the wire format is in `wire.rs`, delay-gradient detection in
//! `delay.rs`, loss tracking in `loss.rs` and the link budget in
//! `capacity.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::ids::TrackId;

mod capacity;
mod delay;
mod loss;
mod wire;

pub use capacity::{LinkCapacity, layers_within};
pub use delay::{DELAY_REPORT_INTERVAL, DelayDetector, SEND_TIME_UNITS, abs_send_time};
pub use loss::{Arrival, LossTracker, NACK_ATTEMPTS};
pub use wire::{
    AnnouncedLayer, AnnouncedTrack, DelayReport, DelayState, MeshMessage, MeshWireError,
    codec_code, codec_from_code, is_delay_report, is_mesh_app, parse_delay_report, parse_message,
    write_delay_report, write_message,
};

/// How often a downstream node renews its subscription to a room, and an
/// upstream node announces what it sends.
pub const SUBSCRIBE_INTERVAL: Duration = Duration::from_millis(500);
/// An announced track not renewed for this long, and whose media stopped,
/// is dropped.
pub const MESH_STATE_TIMEOUT: Duration = Duration::from_millis(2500);
/// A subscription not renewed for this long is dropped: ten periods, so
/// that a lossy link does not end one by chance (at 20 % loss, five lost in
/// a row happen about every half hour on a link; ten, about once in two
/// months). An UNSUBSCRIBE, or the route moving, ends it at once.
pub const SUBSCRIPTION_TIMEOUT: Duration = Duration::from_millis(5000);
/// How long a route change is make-before-break: a node keeps serving the
/// subscriptions of a route (and keeps the link) the scheduler moved away
/// from it, and a downstream keeps taking media from its previous upstream
/// until the new upstream delivers, for at most this long.
pub const ROUTE_HANDOVER: Duration = Duration::from_millis(3000);
/// How often a route whose (new) upstream has not announced yet subscribes:
/// the upstream may get its own desired state a moment later and refuse
/// the first subscription.
pub const PENDING_SUBSCRIBE_INTERVAL: Duration = Duration::from_millis(100);
/// RTCP APP name of mesh control messages.
pub const APP_NAME: [u8; 4] = *b"RDGM";
const APP_SUBSCRIBE: u8 = 1;
const APP_ANNOUNCE: u8 = 2;
const APP_UNSUBSCRIBE: u8 = 3;
const APP_DELAY: u8 = 4;
const WIRE_VERSION: u8 = 1;
/// Longest room name or node id on the wire.
const MAX_NAME: usize = 128;
/// Announced tracks per APP packet, so one fits a 1200-byte datagram.
pub const ANNOUNCE_TRACKS_PER_PACKET: usize = 8;

/// How a mesh repairs loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeshRecovery {
    /// Every hop NACKs its upstream and answers its downstream from its
    /// own retransmission buffers: a loss costs one link's round trip.
    #[default]
    HopByHop,
    /// End-to-end loss detection: only the last node NACKs; a relay
    /// answers from its buffer what it holds and passes the rest upstream
    /// towards the source. Relays never ask for what they miss themselves,
    /// so a loss is repaired over the path from the last node back to the
    /// hop that holds the packet. For comparison (ridge-bench `mesh-loss`).
    /// (A relay cannot leave answering to the source alone: it would drop
    /// the source's retransmission of a packet it already holds as an SRTP
    /// replay.)
    EndToEnd,
}

/// One link of this node, as the scheduler's desired state gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshLinkSpec {
    /// The peer's node id.
    pub peer: String,
    /// The peer's mesh (media) address.
    pub address: SocketAddr,
    /// The 32-byte key both ends share.
    pub key: [u8; 32],
    /// Trusted: plain RTP, authenticated (SRTP NULL cipher). Untrusted:
    /// encrypted SRTP (AES-CM).
    pub trusted: bool,
    /// Send forward error correction on the link: FlexFEC for video, RED
    /// for audio. Only sending depends on it: FEC and RED arriving on any
    /// link are always used.
    pub fec: bool,
}

/// One route entry: for `room`'s media from node `source`, where it comes
/// from (`None` on the source itself) and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshRouteSpec {
    /// The room.
    pub room: String,
    /// The node the media originates on.
    pub source: String,
    /// The link (peer node id) the media comes from; `None` on the source.
    pub upstream: Option<String>,
    /// The links (peer node ids) the media goes on to.
    pub downstream: Vec<String>,
}

/// Everything the core needs to take part in the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// This node's id (the scheduler's).
    pub node_id: String,
    /// The links to other nodes.
    pub links: Vec<MeshLinkSpec>,
    /// The routes through this node.
    pub routes: Vec<MeshRouteSpec>,
}

/// Counters of one mesh link, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshLinkSnapshot {
    /// The peer node id.
    pub peer: String,
    /// Whether the link is trusted (SipHash tags, kernel offload possible).
    pub trusted: bool,
    /// Datagrams received on the link.
    pub packets_in: u64,
    /// Datagrams sent on the link.
    pub packets_out: u64,
    /// Bytes received on the link.
    pub bytes_in: u64,
    /// Bytes sent on the link.
    pub bytes_out: u64,
    /// Sequence numbers we asked the upstream to resend.
    pub nacks_sent: u64,
    /// Sequence numbers the downstream asked us to resend.
    pub nacks_received: u64,
    /// Packets resent on the downstream's NACKs.
    pub retransmits: u64,
    /// NACKed packets that arrived.
    pub recovered: u64,
    /// Packets given up on after the last NACK attempt.
    pub unrecovered: u64,
    /// Datagrams that failed authentication.
    pub auth_failures: u64,
    /// Authentic datagrams that had already arrived (SRTP replay check):
    /// retransmissions racing a repaired original.
    pub duplicates: u64,
    /// NACKed sequence numbers this hop did not hold (yet).
    pub nack_misses: u64,
    /// FEC and RED are sent on the link.
    pub fec: bool,
    /// FlexFEC repair packets sent / received.
    pub fec_sent: u64,
    /// FlexFEC repair packets received.
    pub fec_received: u64,
    /// Missing packets rebuilt from a received repair packet.
    pub fec_recovered: u64,
    /// Audio packets sent with the previous one as a RED block.
    pub red_sent: u64,
    /// Missing audio packets rebuilt from a received RED block.
    pub red_recovered: u64,
    /// Audio packets sent with two previous ones as RED blocks.
    pub red_deep_sent: u64,
    /// Redundant blocks per RED packet on the link now (0: FEC off).
    pub red_depth: u64,
    /// The audio loss before RED the sender infers from the NACKs.
    pub red_loss: f64,
    /// Smoothed NACK-to-retransmission round trip, when measured.
    pub rtt_us: Option<u64>,
    /// The link's loss-based send budget (`None`: unlimited).
    pub budget_bps: Option<u64>,
    /// Fraction of what we sent that the downstream NACKed, last window.
    pub loss: f64,
    /// The media loss before FEC that `loss` suggests (the same where no
    /// FEC was sent; inferred from the group size where it was).
    pub fec_loss: f64,
    /// Media packets per FEC repair packet on the link now (0: FEC off).
    pub fec_group: u64,
    /// What we send on the link, as the downstream's delay detector last
    /// reported it: 1 overuse (queueing grows), 0 normal, -1 underuse.
    pub delay_state: i8,
    /// What we receive on the link: the delay detector's modified trend
    /// (queueing-delay gradient, ms per ms scaled as GCC's), the largest
    /// of the link's senders.
    pub delay_trend: f64,
    /// Delay reports sent to / received from the peer.
    pub delay_reports_sent: u64,
    /// Delay reports received from the peer.
    pub delay_reports_received: u64,
    /// Rooms this node sends on the link / receives from it.
    pub rooms_out: u64,
    /// Rooms this node receives from the link.
    pub rooms_in: u64,
}

/// Keys the core uses for a remote track: room, source node and the
/// track's id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct OriginKey {
    pub room: String,
    pub source: String,
    pub track: u64,
}

/// Where a remote track's layer comes from on its current upstream link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InboundRef {
    pub track: TrackId,
    pub layer: usize,
}

/// Identity of a remote participant, for events and the room API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RemoteParticipantKey {
    pub room: String,
    pub source: String,
    pub participant: u64,
}
