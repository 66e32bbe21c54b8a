//! The [`Sfu`]'s side of mesh links (crate::mesh has the wire format):
//! which rooms each link carries, remote tracks received from upstream
//! nodes, hop-by-hop NACK and retransmission, keyframe requests and layer
//! demand travelling upstream.
//!
//! [`MeshState`] owns the links, routes and remote-track tables; its parts:
//!
//! * [`control`]: applying the desired state (links, routes), subscriptions
//!   and announcements, remote tracks;
//! * [`receive`]: authenticating and unprotecting link datagrams, loss
//!   tracking, NACKs, FEC and RED recovery, delay feedback;
//! * [`send`]: link media (RED, FEC, SRTP), retransmissions and link RTCP;
//! * [`kernel`]: hand-off of transit streams to a kernel fast path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::fec::{FecDecoder, FecEncoder};
use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::mesh::{
    DelayDetector, InboundRef, LinkCapacity, LossTracker, MeshConfig, MeshLinkSnapshot,
    MeshRouteSpec, OriginKey, RemoteParticipantKey, SUBSCRIPTION_TIMEOUT,
};
use crate::red::{self};
use crate::retransmit::RetransmitBuffer;
use crate::srtp::{SrtpContext, SrtpProfile};

use super::Sfu;

mod control;
mod kernel;
mod receive;
mod send;

/// Receive contexts one link keeps, one per remote socket (each shard of
/// the peer sends from its own).
const MAX_RX_CONTEXTS: usize = 16;

/// Payload types on links (the codec travels in the announcement).
const MESH_PT_AUDIO: u8 = 111;

const MESH_PT_VIDEO: u8 = 96;

/// RED (RFC 2198) audio on links with FEC: the primary and, as a
/// redundant block, the packet before (payload type 111 in the blocks).
const MESH_PT_RED: u8 = 63;

/// The RFC 8285 one-byte header-extension id of the RFC 6464 audio level
/// on links' audio packets (when the publisher's level is known).
const MESH_EXT_AUDIO_LEVEL: u8 = 1;

/// The RFC 8285 one-byte header-extension id of the 24-bit abs-send-time
/// (6.18 fixed-point seconds since the sending core started, wrapping
/// every 64 s) on every link media packet; the downstream's delay detector
/// measures the link's queueing-delay gradient with it. A retransmission
/// carries the original send time (so the same bytes) and the detector
/// leaves it out as older than its current group; FEC repair packets carry
/// none, and packets rebuilt from them are left out too.
const MESH_EXT_SEND_TIME: u8 = 2;

/// FlexFEC (RFC 8627) repair packets, on an SSRC of their own; the
/// protected link SSRC is their CSRC.
const MESH_PT_FLEXFEC: u8 = 118;

/// How long a missing packet of a stream that carries FEC waits for its
/// first NACK (unless a repair packet that cannot rebuild it comes first).
const FEC_NACK_HOLD: Duration = Duration::from_millis(30);

/// A stream carries FEC while a repair packet for it came this recently.
const FEC_ACTIVE: Duration = Duration::from_secs(1);

/// The longest an FEC group stays open: its repair packet then reaches
/// the receiver within [`FEC_NACK_HOLD`] of the group's first packet's
/// loss, link jitter aside (so a slow stream gets smaller groups).
const FEC_GROUP_SPAN: Duration = Duration::from_millis(20);

/// A transit stream is offered to a kernel fast path only when its link
/// lost none of it for this long: the kernel keeps no retransmission
/// buffer, so a loss on either side of an offloaded hop is repaired from
/// further upstream, a longer round trip (docs/mesh.md).
const KERNEL_CLEAN: Duration = Duration::from_secs(10);

/// A kernel-forwarded stream goes back to the core for [`KERNEL_CLEAN`]
/// when more than this share of what the kernel forwarded was NACKed
/// (judged over at least [`KERNEL_LOSS_SAMPLE`] packets).
const KERNEL_MAX_LOSS: f64 = 0.01;

const KERNEL_LOSS_SAMPLE: u64 = 50;

pub(super) struct MeshState {
    node_id: String,
    links: Vec<Link>,
    routes: Vec<Route>,
    /// Remote sockets that authenticated as a link.
    by_addr: HashMap<SocketAddr, usize>,
    remote_tracks: HashMap<OriginKey, TrackId>,
    remote_participants: HashMap<RemoteParticipantKey, (ParticipantId, PeerId)>,
    next_subscribe: Instant,
    /// The layers this node needs of a remote track changed: subscriptions
    /// (which carry the layers not needed) go out at once rather than at
    /// the next period.
    subscribe_due: Option<Instant>,
    /// Subscriptions of routes whose upstream has not announced yet are due.
    next_pending: Option<Instant>,
    /// Announcements are due early: a link stream was added or changed.
    announce_due: Option<Instant>,
    /// The earliest due NACK of any stream.
    next_nack: Option<Instant>,
    scratch: Vec<u8>,
    /// Where a packet rebuilt from FEC is assembled.
    fec_scratch: Vec<u8>,
    /// The configuration applied last.
    config: Option<MeshConfig>,
    /// Send times on links count from here.
    epoch: Instant,
    /// A fixed FEC group size ([`SfuConfig::mesh_fec_group`]); `None`:
    /// each link's follows its loss.
    fec_group: Option<usize>,
    /// A fixed RED depth ([`SfuConfig::mesh_red_depth`]); `None`: each
    /// link's follows its audio loss.
    red_depth: Option<usize>,
}

impl MeshState {
    pub(in crate::sfu) fn new(
        now: Instant,
        fec_group: Option<usize>,
        red_depth: Option<usize>,
    ) -> Self {
        MeshState {
            node_id: String::new(),
            links: Vec::new(),
            routes: Vec::new(),
            by_addr: HashMap::new(),
            remote_tracks: HashMap::new(),
            remote_participants: HashMap::new(),
            next_subscribe: now,
            subscribe_due: None,
            next_pending: None,
            announce_due: None,
            next_nack: None,
            scratch: Vec::with_capacity(1500),
            fec_scratch: Vec::with_capacity(1500),
            config: None,
            epoch: now,
            fec_group,
            red_depth,
        }
    }

    pub(in crate::sfu) fn next_timeout(&self) -> Option<Instant> {
        [
            self.next_nack,
            self.announce_due,
            self.next_pending,
            self.subscribe_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub(in crate::sfu) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

impl MeshOut {
    /// The layers this link wants.
    pub(in crate::sfu) fn watched_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.paused && !l.capped)
            .map(|(i, _)| i)
    }

    pub(in crate::sfu) fn over_budget(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(|l| l.over_budget)
    }
}

impl MeshPeer {
    pub(in crate::sfu) fn source_node(&self) -> &str {
        &self.source
    }
}

struct Link {
    peer: String,
    address: SocketAddr,
    key: [u8; 32],
    trusted: bool,
    /// Send FEC (video) and RED (audio) on it.
    fec: bool,
    /// A link the desired state no longer lists, kept until then for a
    /// route hand-over.
    linger_until: Option<Instant>,
    profile: SrtpProfile,
    tx: SrtpContext,
    rx_key: ([u8; 16], [u8; 14]),
    rx: HashMap<SocketAddr, SrtpContext>,
    /// Streams received on this link, by their link SSRC.
    inbound: HashMap<u32, InStream>,
    /// Streams sent on this link: link SSRC → track and layer.
    outbound: HashMap<u32, (TrackId, usize)>,
    /// The budget (loss- and delay-based) that decides which layers the
    /// link carries.
    capacity: LinkCapacity,
    /// Delay detectors of what the link receives, one per remote socket
    /// (each sending core stamps send times from its own epoch).
    delay: Vec<(SocketAddr, DelayDetector)>,
    stats: MeshLinkSnapshot,
}

struct InStream {
    at: InboundRef,
    loss: LossTracker,
    /// The upstream socket the stream comes from (NACKs go there).
    remote: SocketAddr,
    /// A stream from a previous upstream: it feeds its layer until the
    /// new upstream's stream delivers, or until then.
    draining_until: Option<Instant>,
    /// A packet of it arrived.
    delivered: bool,
    /// Its last packets, to rebuild a lost one from a repair packet: from
    /// the first repair packet of the stream on.
    fec: Option<Box<FecDecoder>>,
    /// When a repair packet for it last came.
    fec_seen: Option<Instant>,
    /// When a loss of it was last seen (it then stays with this hop's
    /// recovery rather than a kernel fast path for [`KERNEL_CLEAN`]).
    lost_at: Option<Instant>,
}

impl InStream {
    pub(in crate::sfu) fn new(at: InboundRef, remote: SocketAddr) -> Self {
        InStream {
            at,
            loss: LossTracker::default(),
            remote,
            draining_until: None,
            delivered: false,
            fec: None,
            fec_seen: None,
            lost_at: None,
        }
    }
}

struct Route {
    spec: MeshRouteSpec,
    upstream: Option<usize>,
    downstream: Vec<usize>,
    /// Downstream subscriptions to this route.
    serving: Vec<Serving>,
    /// The upstream socket that announces this room (its shard's socket).
    upstream_addr: Option<SocketAddr>,
    /// The current upstream announced the room.
    announced: bool,
    /// A route the desired state no longer lists, serving its live
    /// subscriptions until then.
    linger_until: Option<Instant>,
}

struct Serving {
    link: usize,
    dest: SocketAddr,
    renewed: Instant,
    paused: Vec<u32>,
    /// The link is no longer downstream of the route: served until then
    /// (or until it unsubscribes), so the downstream can move first.
    linger_until: Option<Instant>,
}

impl Serving {
    pub(in crate::sfu) fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.renewed) < SUBSCRIPTION_TIMEOUT
            && self.linger_until.is_none_or(|t| now < t)
    }
}

/// A track's stream to one downstream link.
pub(super) struct MeshOut {
    link: usize,
    dest: SocketAddr,
    layers: Vec<OutLayer>,
}

struct OutLayer {
    ssrc: u32,
    /// The SSRC the layer's packets arrive with; a new one starts a new
    /// link stream (sequence numbers restart with the source).
    source_ssrc: Option<u32>,
    retransmit: RetransmitBuffer,
    /// The downstream does not want it.
    paused: bool,
    /// Wanted, but the link's budget does not allow it.
    capped: bool,
    /// Over the link's budget even on its own (and not the lowest layer):
    /// announced as unavailable.
    over_budget: bool,
    /// The open FEC group (video on a link with FEC), from the first
    /// packet sent with FEC on.
    fec: Option<FecEncoder>,
    /// A kernel fast path forwards this layer's upstream stream to the
    /// link ([`Sfu::mesh_flows`]): its retransmission buffer is not fed,
    /// so NACKs for it go on upstream.
    kernel: bool,
    /// The kernel's packet count for it at the last progress report, and
    /// the sequence numbers NACKed (relayed upstream) since.
    kernel_packets: u64,
    kernel_nacked: u64,
    /// Not offered to the kernel before then: too much of what it
    /// forwarded was NACKed (a lossy path wants this hop's own recovery).
    kernel_hold_until: Option<Instant>,
}

/// A remote participant's placeholder peer: where its tracks come from.
pub(super) struct MeshPeer {
    source: String,
}

impl Sfu {
    /// Link `link`'s peer node id, for logs.
    pub(in crate::sfu) fn mesh_peer_name(&self, link: usize) -> &str {
        self.mesh.links.get(link).map_or("?", |l| l.peer.as_str())
    }

    /// Whether this shard owns `room`.
    pub(in crate::sfu) fn owns_room(&self, room: &str) -> bool {
        crate::ids::shard_for_room(room, usize::from(self.config.shards.max(1)))
            == usize::from(self.config.shard)
    }

    /// When this core's send-time clock on links started: a link packet's
    /// abs-send-time counts from here (a kernel fast path that forwards a
    /// transit stream stamps its packets on the same clock).
    pub fn mesh_epoch(&self) -> Instant {
        self.mesh.epoch
    }

    /// Remote sockets that authenticated as one of this core's mesh links
    /// (a control-path query: e.g. to exempt them from a per-source rate
    /// limit meant for clients).
    pub fn mesh_peer_addrs(&self) -> Vec<SocketAddr> {
        self.mesh.by_addr.keys().copied().collect()
    }

    /// Per-link counters, for `/metrics`.
    pub fn mesh_links(&self) -> Vec<MeshLinkSnapshot> {
        self.mesh
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut s = l.stats.clone();
                s.rtt_us = l
                    .inbound
                    .values()
                    .filter_map(|x| x.loss.srtt())
                    .max()
                    .map(|d| d.as_micros() as u64);
                s.unrecovered = l.inbound.values().map(|x| x.loss.unrecovered).sum();
                s.budget_bps = l.capacity.cap_bps();
                s.loss = l.capacity.last_loss;
                s.fec_loss = l.capacity.fec_loss;
                s.fec_group = if l.fec {
                    self.mesh
                        .fec_group
                        .unwrap_or_else(|| l.capacity.fec_group()) as u64
                } else {
                    0
                };
                s.red_loss = l.capacity.red_loss;
                s.red_depth = if l.fec {
                    self.mesh
                        .red_depth
                        .unwrap_or_else(|| l.capacity.red_depth())
                        .clamp(1, red::MAX_DEPTH) as u64
                } else {
                    0
                };
                s.delay_state = l.capacity.delay_state.as_i8();
                // The sender whose trend is furthest from flat.
                s.delay_trend = l
                    .delay
                    .iter()
                    .map(|(_, d)| d.modified_trend())
                    .fold(0.0, |a, b| if b.abs() > a.abs() { b } else { a });
                s.rooms_out = self
                    .mesh
                    .routes
                    .iter()
                    .filter(|r| r.serving.iter().any(|x| x.link == i))
                    .count() as u64;
                s.rooms_in = self
                    .mesh
                    .routes
                    .iter()
                    .filter(|r| r.upstream == Some(i) && r.upstream_addr.is_some())
                    .count() as u64;
                s
            })
            .collect()
    }
}
