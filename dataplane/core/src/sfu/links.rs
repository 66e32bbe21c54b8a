//! The [`Sfu`]'s side of mesh links (crate::mesh has the wire format):
//! which rooms each link carries, remote tracks received from upstream
//! nodes, hop-by-hop NACK and retransmission, keyframe requests and layer
//! demand travelling upstream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::fec::{FecDecoder, FecEncoder, FecPacket, Recovery};
use crate::mesh::{
    AnnouncedLayer, AnnouncedTrack, DelayDetector, InboundRef, LinkCapacity, LossTracker,
    MESH_STATE_TIMEOUT, MeshConfig, MeshLinkSnapshot, MeshMessage, MeshRecovery, MeshRouteSpec,
    OriginKey, PENDING_SUBSCRIBE_INTERVAL, ROUTE_HANDOVER, RemoteParticipantKey,
    SUBSCRIBE_INTERVAL, SUBSCRIPTION_TIMEOUT, abs_send_time, codec_code, codec_from_code,
    is_delay_report, is_mesh_app, layers_within, parse_delay_report, parse_message,
    write_delay_report, write_message,
};
use crate::red::{self, RedPayload};
use crate::retransmit::Sent;
use crate::srtp::{SrtpContext, SrtpError, SrtpProfile, Unprotected, mesh_master_key};

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
    pub(super) fn new(now: Instant, fec_group: Option<usize>, red_depth: Option<usize>) -> Self {
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

    pub(super) fn next_timeout(&self) -> Option<Instant> {
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

    pub(super) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Sends a packet of a track's layer on every link stream of it.
    /// Called from [`Sfu::forward`] once the layer is known to be wanted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        io: &mut Io,
        tid: TrackId,
        track: &mut Track,
        now: Instant,
        layer: usize,
        pkt: &Forward<'_>,
        stored: &mut Option<PacketBuf>,
    ) {
        let kind = track.kind;
        for m in &mut track.mesh_out {
            let Some(ol) = m.layers.get_mut(layer) else {
                continue;
            };
            if ol.paused || ol.capped {
                continue;
            }
            let Some(l) = self.links.get_mut(m.link) else {
                continue;
            };
            if ol.source_ssrc != Some(pkt.ssrc) {
                if ol.source_ssrc.is_some() {
                    // New source, new link stream: the downstream learns its
                    // SSRC from the next announcement.
                    l.outbound.remove(&ol.ssrc);
                    ol.ssrc = ol.ssrc.wrapping_mul(0x9e37_79b9).rotate_left(7) | 1;
                    l.outbound.insert(ol.ssrc, (tid, layer));
                    ol.retransmit.clear();
                    if let Some(enc) = &mut ol.fec {
                        enc.reset();
                    }
                    self.announce_due = Some(now);
                }
                ol.source_ssrc = Some(pkt.ssrc);
            }
            let payload = stored.get_or_insert_with(|| io.packets.copy_in(pkt.payload));
            // Audio on a link with FEC: RED, the packets right before as
            // redundant blocks (1, or 2 on a lossy link), as many as this
            // link sent and fit, the packet before first.
            let depth = if l.fec && kind == TrackKind::Audio {
                self.red_depth
                    .unwrap_or_else(|| l.capacity.red_depth())
                    .clamp(1, red::MAX_DEPTH)
            } else {
                0
            };
            let mut prevs: [Option<Sent>; red::MAX_DEPTH] = Default::default();
            for (k, slot) in prevs.iter_mut().enumerate().take(depth) {
                let Some(p) = ol
                    .retransmit
                    .get(now, pkt.seq.wrapping_sub(k as u16 + 1))
                    .filter(|p| {
                        red::fits(pkt.timestamp.wrapping_sub(p.timestamp), p.payload.len())
                    })
                else {
                    break;
                };
                *slot = Some(p);
            }
            let (blocks, n_blocks) = red_blocks(&prevs);
            ol.retransmit
                .insert(now, pkt.seq, pkt.timestamp, pkt.marker, payload);
            let mut buf = io.buffer();
            if n_blocks > 0 {
                ol.retransmit.set_redundant(pkt.seq, n_blocks as u8);
                l.stats.red_sent += 1;
                if n_blocks > 1 {
                    l.stats.red_deep_sent += 1;
                }
            }
            let level = pkt.audio_level.filter(|_| kind == TrackKind::Audio);
            ol.retransmit.set_audio_level(pkt.seq, level);
            let send_time = abs_send_time(now.saturating_duration_since(self.epoch));
            ol.retransmit.set_send_time(pkt.seq, Some(send_time));
            let fields = (pkt.marker, pkt.seq, pkt.timestamp, level, Some(send_time));
            let fec_video = l.fec && kind == TrackKind::Video;
            if n_blocks == 0 && !fec_video && !l.tx.profile().encrypts() {
                // The payload stays where it was received: the header and
                // the tag go around it (no copy).
                write_link_media(&mut buf, kind, ol.ssrc, fields, &[], &[]);
                if send_link_parts(io, l, m.dest, buf, payload) && kind == TrackKind::Audio {
                    l.capacity.on_audio_sent(false);
                }
                continue;
            }
            write_link_media(
                &mut buf,
                kind,
                ol.ssrc,
                fields,
                payload.as_slice(),
                &blocks[..n_blocks],
            );
            // Video on a link with FEC: the packet joins its FEC group.
            let fec = if fec_video {
                let enc = ol
                    .fec
                    .get_or_insert_with(|| FecEncoder::new(repair_ssrc(ol.ssrc)));
                enc.set_group_size(self.fec_group.unwrap_or_else(|| l.capacity.fec_group()));
                if enc.must_close_before(pkt.seq) || enc.is_stale(now, FEC_GROUP_SPAN) {
                    send_repair(io, l, enc, ol.ssrc, m.dest);
                }
                enc.push_at(now, &buf);
                Some(enc)
            } else {
                None
            };
            if l.tx.protect_rtp(&mut buf).is_err() {
                io.pool.push(buf);
                continue;
            }
            l.stats.packets_out += 1;
            l.stats.bytes_out += buf.len() as u64;
            l.capacity.on_sent(buf.len());
            if kind == TrackKind::Audio {
                l.capacity.on_audio_sent(n_blocks > 0);
            }
            let mut scratch = Counters::default();
            io.send(&mut scratch, m.dest, buf);
            if let Some(enc) = fec
                && enc.is_full()
            {
                send_repair(io, l, enc, ol.ssrc, m.dest);
            }
        }
    }
}

/// Sends a link media packet whose `header` is written and whose payload
/// is shared (not copied): the SRTP tag over both goes after them as the
/// transmit's trailer. Only for a link whose profile does not encrypt.
/// Returns whether it was sent.
fn send_link_parts(
    io: &mut Io,
    l: &mut Link,
    dest: SocketAddr,
    header: Vec<u8>,
    payload: &PacketBuf,
) -> bool {
    let Ok(tag) = l.tx.protect_rtp_parts(&header, payload.as_slice()) else {
        io.pool.push(header);
        return false;
    };
    let len = header.len() + payload.len() + tag.len();
    l.stats.packets_out += 1;
    l.stats.bytes_out += len as u64;
    l.capacity.on_sent(len);
    let mut scratch = Counters::default();
    io.send_parts(
        &mut scratch,
        dest,
        header,
        payload.clone(),
        Trailer::new(&tag).unwrap_or_default(),
    );
    true
}

/// RED blocks from the packets before one (`prevs[k]`: sequence number
/// − 1 − k, as many as present from the first): (timestamp, payload),
/// oldest first, and how many.
fn red_blocks(prevs: &[Option<Sent>; red::MAX_DEPTH]) -> ([(u32, &[u8]); red::MAX_DEPTH], usize) {
    let mut out: [(u32, &[u8]); red::MAX_DEPTH] = [(0, &[]); red::MAX_DEPTH];
    let n = prevs.iter().take_while(|p| p.is_some()).count();
    for (slot, p) in out.iter_mut().zip(prevs[..n].iter().rev().flatten()) {
        *slot = (p.timestamp, p.payload.as_slice());
    }
    (out, n)
}

/// The repair stream's SSRC for a link stream (any SSRC not otherwise used
/// on the link would do: receivers find repair packets by payload type).
fn repair_ssrc(ssrc: u32) -> u32 {
    (ssrc.rotate_left(16) ^ 0x0fec_0fec) | 1
}

/// Sends the repair packet of an FEC group (none for a group of one).
fn send_repair(io: &mut Io, l: &mut Link, enc: &mut FecEncoder, protected: u32, dest: SocketAddr) {
    if enc.pending() < 2 {
        enc.reset();
        return;
    }
    let mut buf = io.buffer();
    if !enc.finish(MESH_PT_FLEXFEC, protected, &mut buf) || l.tx.protect_rtp(&mut buf).is_err() {
        io.pool.push(buf);
        return;
    }
    l.stats.fec_sent += 1;
    l.stats.packets_out += 1;
    l.stats.bytes_out += buf.len() as u64;
    l.capacity.on_sent(buf.len());
    l.capacity.on_repair_sent();
    let mut scratch = Counters::default();
    io.send(&mut scratch, dest, buf);
}

impl MeshOut {
    /// The layers this link wants.
    pub(super) fn watched_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.paused && !l.capped)
            .map(|(i, _)| i)
    }

    fn over_budget(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(|l| l.over_budget)
    }
}

impl MeshPeer {
    pub(super) fn source_node(&self) -> &str {
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
    fn new(at: InboundRef, remote: SocketAddr) -> Self {
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
    fn live(&self, now: Instant) -> bool {
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
    /// Applies the mesh part of a desired state: links, and the routes
    /// through this node. Idempotent. A route change is make-before-break
    /// for [`ROUTE_HANDOVER`]: links and routes that went keep serving the
    /// subscriptions they had, and a room whose upstream moved keeps taking
    /// its previous upstream's media until the new upstream's arrives.
    pub fn set_mesh(&mut self, now: Instant, config: MeshConfig) {
        if self.mesh.config.as_ref() == Some(&config) {
            return;
        }
        self.mesh_apply(now, config);
        self.mesh.next_subscribe = now;
        self.mesh_reconcile(now);
        self.mesh_tick(now);
    }

    /// Rebuilds links and routes from `config` and what of the previous
    /// state is still handing over.
    fn mesh_apply(&mut self, now: Instant, config: MeshConfig) {
        let node = config.node_id.clone();
        // Keys derive from both node ids: nothing survives a new identity.
        let same_node = self.mesh.node_id == node;
        let live = |until: Option<Instant>| until.is_none_or(|t| now < t);
        // Links: keep the state (contexts, streams) of unchanged ones.
        let mut old: Vec<Option<Link>> = std::mem::take(&mut self.mesh.links)
            .into_iter()
            .map(Some)
            .collect();
        let mut remap: HashMap<usize, usize> = HashMap::new();
        for (i, spec) in config.links.iter().enumerate() {
            let kept = old.iter_mut().enumerate().find_map(|(j, l)| {
                let same = same_node
                    && l.as_ref().is_some_and(|l| {
                        l.peer == spec.peer
                            && l.address == spec.address
                            && l.trusted == spec.trusted
                            && l.key == spec.key
                            && live(l.linger_until)
                    });
                if same { l.take().map(|l| (j, l)) } else { None }
            });
            let link = match kept {
                Some((j, mut l)) => {
                    remap.insert(j, i);
                    l.linger_until = None;
                    l.fec = spec.fec;
                    l.stats.fec = spec.fec;
                    l
                }
                None => {
                    // Trusted: SipHash tags, which the kernel fast path can
                    // check and re-sign on a transit node.
                    let profile = if spec.trusted {
                        SrtpProfile::NullSipHash24_80
                    } else {
                        SrtpProfile::Aes128CmHmacSha1_80
                    };
                    let (tk, ts) = mesh_master_key(&spec.key, &node, &spec.peer);
                    let rx_key = mesh_master_key(&spec.key, &spec.peer, &node);
                    Link {
                        peer: spec.peer.clone(),
                        address: spec.address,
                        key: spec.key,
                        trusted: spec.trusted,
                        fec: spec.fec,
                        linger_until: None,
                        profile,
                        tx: SrtpContext::new(profile, &tk, &ts),
                        rx_key,
                        rx: HashMap::new(),
                        inbound: HashMap::new(),
                        outbound: HashMap::new(),
                        capacity: LinkCapacity::default(),
                        delay: Vec::with_capacity(MAX_RX_CONTEXTS),
                        stats: MeshLinkSnapshot {
                            peer: spec.peer.clone(),
                            trusted: spec.trusted,
                            fec: spec.fec,
                            ..Default::default()
                        },
                    }
                }
            };
            self.mesh.links.push(link);
        }
        // Links that went linger for the hand-over.
        for (j, l) in old.into_iter().enumerate() {
            let Some(mut l) = l else { continue };
            let until = l.linger_until.unwrap_or(now + ROUTE_HANDOVER);
            if !same_node || now >= until {
                continue;
            }
            l.linger_until = Some(until);
            remap.insert(j, self.mesh.links.len());
            self.mesh.links.push(l);
        }
        self.mesh.by_addr.retain(|_, l| match remap.get(l) {
            Some(n) => {
                *l = *n;
                true
            }
            None => false,
        });
        // Outgoing streams on links that went.
        for track in self.tracks.values_mut() {
            track.mesh_out.retain_mut(|m| match remap.get(&m.link) {
                Some(n) => {
                    m.link = *n;
                    true
                }
                None => false,
            });
        }
        let links = &self.mesh.links;
        let link_index = |peer: &str| {
            links
                .iter()
                .position(|l| l.peer == peer && l.linger_until.is_none())
        };
        // Routes: keep the subscriptions and upstream address of routes
        // that stay (with the same upstream).
        let mut old_routes = std::mem::take(&mut self.mesh.routes);
        let mut routes = Vec::with_capacity(config.routes.len());
        // (room, source, previous upstream link) of routes whose upstream moved.
        let mut moved: Vec<(String, String, usize)> = Vec::new();
        for spec in &config.routes {
            let upstream = spec.upstream.as_deref().and_then(link_index);
            let downstream: Vec<usize> = spec
                .downstream
                .iter()
                .filter_map(|d| link_index(d))
                .collect();
            let prev = old_routes
                .iter()
                .position(|r| r.spec.room == spec.room && r.spec.source == spec.source)
                .map(|i| old_routes.swap_remove(i));
            let (serving, upstream_addr, announced) = match prev {
                Some(p) => {
                    let serving = p
                        .serving
                        .into_iter()
                        .filter_map(|mut s| {
                            s.link = *remap.get(&s.link)?;
                            s.linger_until = if downstream.contains(&s.link) {
                                None
                            } else {
                                Some(s.linger_until.unwrap_or(now + ROUTE_HANDOVER))
                            };
                            s.live(now).then_some(s)
                        })
                        .collect();
                    let old_up = p.upstream.and_then(|u| remap.get(&u).copied());
                    let same_upstream = old_up == upstream && p.spec.upstream == spec.upstream;
                    if !same_upstream && let Some(u) = old_up {
                        moved.push((spec.room.clone(), spec.source.clone(), u));
                    }
                    if same_upstream {
                        (serving, p.upstream_addr, p.announced)
                    } else {
                        (serving, None, false)
                    }
                }
                None => (Vec::new(), None, false),
            };
            routes.push(Route {
                spec: spec.clone(),
                upstream,
                downstream,
                serving,
                upstream_addr,
                announced,
                linger_until: None,
            });
        }
        // Routes that went keep serving their live subscriptions.
        for p in old_routes.into_iter().filter(|_| same_node) {
            let until = p.linger_until.unwrap_or(now + ROUTE_HANDOVER);
            let serving: Vec<Serving> = p
                .serving
                .into_iter()
                .filter_map(|mut s| {
                    s.link = *remap.get(&s.link)?;
                    s.linger_until = Some(s.linger_until.map_or(until, |t| t.min(until)));
                    s.live(now).then_some(s)
                })
                .collect();
            if serving.is_empty() {
                continue;
            }
            routes.push(Route {
                upstream: p.upstream.and_then(|u| remap.get(&u).copied()),
                spec: p.spec,
                downstream: Vec::new(),
                serving,
                upstream_addr: p.upstream_addr,
                announced: p.announced,
                linger_until: Some(until),
            });
        }
        self.mesh.routes = routes;
        self.mesh.node_id = node;
        self.mesh.config = Some(config);
        // The previous upstream's streams of a moved route feed their
        // layers until the new upstream's arrive.
        for (room, source, link) in moved {
            tracing::debug!(
                %room,
                %source,
                previous = %self.mesh_peer_name(link),
                "mesh route's upstream moved: the previous upstream feeds it until the new one delivers"
            );
            let tracks = &self.tracks;
            if let Some(l) = self.mesh.links.get_mut(link) {
                for s in l.inbound.values_mut() {
                    let ours = tracks
                        .get(&s.at.track)
                        .and_then(|t| t.origin.as_ref())
                        .is_some_and(|o| o.room == room && o.source == source);
                    if ours && s.draining_until.is_none() {
                        s.draining_until = Some(now + ROUTE_HANDOVER);
                    }
                }
            }
        }
        self.mesh_prune_inbound(now);
        // Remote tracks of routes that went away.
        let gone: Vec<TrackId> = self
            .mesh
            .remote_tracks
            .iter()
            .filter(|(k, _)| {
                !self.mesh.routes.iter().any(|r| {
                    r.spec.room == k.room && r.spec.source == k.source && r.upstream.is_some()
                })
            })
            .map(|(_, t)| *t)
            .collect();
        for t in gone {
            self.remove_remote_track(now, t);
        }
    }

    /// Re-applies the current desired state once a hand-over ends: a
    /// lingering link, route or subscription expired, or a lingering route
    /// has nobody left to serve.
    fn mesh_expire_handover(&mut self, now: Instant) {
        let expired = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        let due = self.mesh.links.iter().any(|l| expired(l.linger_until))
            || self.mesh.routes.iter().any(|r| {
                expired(r.linger_until)
                    || (r.linger_until.is_some() && !r.serving.iter().any(|s| s.live(now)))
            })
            || self
                .mesh
                .links
                .iter()
                .flat_map(|l| l.inbound.values())
                .any(|s| expired(s.draining_until));
        if !due {
            return;
        }
        tracing::debug!(
            "mesh hand-over over (expired or nobody left to serve): desired state re-applied"
        );
        if let Some(config) = self.mesh.config.clone() {
            self.mesh_apply(now, config);
            self.mesh_reconcile(now);
        }
    }

    /// Drops inbound stream entries that no longer match a route's
    /// upstream or a live track; those of a previous upstream stay until
    /// their hand-over ends.
    fn mesh_prune_inbound(&mut self, now: Instant) {
        let routes = &self.mesh.routes;
        let tracks = &self.tracks;
        for (li, link) in self.mesh.links.iter_mut().enumerate() {
            link.inbound.retain(|_, s| {
                let Some(t) = tracks.get(&s.at.track) else {
                    return false;
                };
                let Some(o) = &t.origin else { return false };
                if let Some(d) = s.draining_until {
                    return now < d;
                }
                routes.iter().any(|r| {
                    r.spec.room == o.room && r.spec.source == o.source && r.upstream == Some(li)
                })
            });
        }
    }

    /// Link `link`'s peer node id, for logs.
    fn mesh_peer_name(&self, link: usize) -> &str {
        self.mesh.links.get(link).map_or("?", |l| l.peer.as_str())
    }

    /// Whether this shard owns `room`.
    fn owns_room(&self, room: &str) -> bool {
        crate::ids::shard_for_room(room, usize::from(self.config.shards.max(1)))
            == usize::from(self.config.shard)
    }

    /// Brings every track's outgoing link streams in line with the routes
    /// and live subscriptions.
    pub(super) fn mesh_reconcile(&mut self, now: Instant) {
        let node = self.mesh.node_id.clone();
        let mut rng = self.rng;
        for (tid, track) in self.tracks.iter_mut() {
            let source = match &track.origin {
                Some(o) => o.source.as_str(),
                None => node.as_str(),
            };
            // (link, destination, paused) wanted for this track.
            let mut want: Vec<(usize, SocketAddr, &[u32])> = Vec::new();
            for r in &self.mesh.routes {
                if r.spec.room != track.room || r.spec.source != source {
                    continue;
                }
                for s in &r.serving {
                    // Downstream links, and those handing over.
                    if s.live(now) {
                        want.push((s.link, s.dest, &s.paused));
                    }
                }
            }
            let links = &mut self.mesh.links;
            track.mesh_out.retain(|m| {
                let keep = want.iter().any(|w| w.0 == m.link);
                if !keep && let Some(l) = links.get_mut(m.link) {
                    for ol in &m.layers {
                        l.outbound.remove(&ol.ssrc);
                    }
                }
                keep
            });
            for (link, dest, paused) in want {
                let i = match track.mesh_out.iter().position(|m| m.link == link) {
                    Some(i) => i,
                    None => {
                        self.mesh.announce_due = Some(now);
                        track.mesh_out.push(MeshOut {
                            link,
                            dest,
                            layers: Vec::new(),
                        });
                        track.mesh_out.len() - 1
                    }
                };
                let m = &mut track.mesh_out[i];
                m.dest = dest;
                if m.layers.len() < track.layers.len() {
                    self.mesh.announce_due = Some(now);
                }
                while m.layers.len() < track.layers.len() {
                    let ssrc = (xorshift(&mut rng) as u32) | 1;
                    if let Some(l) = links.get_mut(link) {
                        l.outbound.insert(ssrc, (*tid, m.layers.len()));
                    }
                    m.layers.push(OutLayer {
                        ssrc,
                        source_ssrc: None,
                        retransmit: RetransmitBuffer::new(
                            self.config.retransmit_packets.max(512),
                            self.config.retransmit_max_age,
                        ),
                        paused: false,
                        capped: false,
                        over_budget: false,
                        fec: None,
                        kernel: false,
                        kernel_packets: 0,
                        kernel_nacked: 0,
                        kernel_hold_until: None,
                    });
                }
                // A single layer always goes; of several, those the
                // downstream wants and the link's budget allows.
                let multi = track.layers.len() > 1;
                let wanted: Vec<bool> = m
                    .layers
                    .iter()
                    .map(|ol| !paused.contains(&ol.ssrc))
                    .collect();
                let bps: Vec<u64> = track.layers.iter().map(|l| l.bps).collect();
                let cap = links.get(link).and_then(|l| l.capacity.cap_bps());
                let allowed = layers_within(&bps, &wanted, cap);
                let lowest = (0..bps.len()).min_by_key(|&i| bps[i]);
                for (i, ol) in m.layers.iter_mut().enumerate() {
                    let want = wanted.get(i).copied().unwrap_or(false);
                    ol.paused = multi && !want;
                    ol.capped = multi && want && !allowed.get(i).copied().unwrap_or(false);
                    ol.over_budget = multi
                        && Some(i) != lowest
                        && cap.is_some_and(|c| bps.get(i).is_some_and(|b| *b > c));
                }
            }
        }
        self.rng = rng;
    }

    /// Periodic mesh work: subscriptions and announcements, expiry.
    pub(super) fn mesh_tick(&mut self, now: Instant) {
        if self.mesh.links.is_empty() {
            self.mesh.next_pending = None;
            self.mesh.announce_due = None;
            return;
        }
        // Expire remote tracks nobody announced lately and whose media
        // stopped: media still arriving is the upstream sending it, whatever
        // happened to its announcements on a lossy link.
        let stale: Vec<TrackId> = self
            .mesh
            .remote_tracks
            .values()
            .copied()
            .filter(|t| {
                self.tracks.get(t).is_none_or(|t| {
                    t.announced
                        .is_none_or(|a| now.saturating_duration_since(a) > MESH_STATE_TIMEOUT)
                        && !t.layers.iter().any(|l| l.active(now))
                })
            })
            .collect();
        for t in stale {
            self.remove_remote_track(now, t);
        }
        for r in &mut self.mesh.routes {
            r.serving.retain(|s| s.live(now));
        }
        self.mesh_expire_handover(now);
        let mut budget_changed = false;
        for l in &mut self.mesh.links {
            budget_changed |= l.capacity.tick(now);
        }
        self.mesh_reconcile(now);
        if budget_changed {
            self.select_layers(now);
        }
        let periodic = now >= self.mesh.next_subscribe;
        let pending = self.mesh.next_pending.is_some_and(|t| t <= now);
        let announce = periodic || self.mesh.announce_due.is_some_and(|t| t <= now);
        // Layer demand changed: every subscription now, announcements as
        // usual.
        let subscribe = periodic || self.mesh.subscribe_due.is_some_and(|t| t <= now);
        if !announce && !pending && !subscribe {
            return;
        }
        if subscribe {
            self.mesh.subscribe_due = None;
            self.mesh.next_subscribe = now + SUBSCRIBE_INTERVAL;
        }
        // Routes whose upstream has not announced yet subscribe often.
        let waiting = |r: &Route| r.upstream.is_some() && r.linger_until.is_none() && !r.announced;
        self.mesh.next_pending = self
            .mesh
            .routes
            .iter()
            .any(|r| waiting(r) && self.owns_room(&r.spec.room))
            .then(|| now + PENDING_SUBSCRIBE_INTERVAL);
        // Subscribe upstream for every route of ours that has an upstream
        // (and a room on this shard), listing the layers nobody here needs.
        // Lingering routes do not: they only finish a hand-over.
        let mut msgs: Vec<(usize, SocketAddr, MeshMessage)> = Vec::new();
        for r in self
            .mesh
            .routes
            .iter()
            .filter(|r| r.linger_until.is_none() && (subscribe || (pending && waiting(r))))
        {
            let Some(up) = r.upstream else { continue };
            if !self.owns_room(&r.spec.room) {
                continue;
            }
            let Some(link) = self.mesh.links.get(up) else {
                continue;
            };
            let mut paused = Vec::new();
            for (ssrc, s) in &link.inbound {
                if let Some(t) = self.tracks.get(&s.at.track)
                    && t.room == r.spec.room
                    && t.layers.len() > 1
                    && t.layers.get(s.at.layer).is_some_and(|l| l.watchers == 0)
                {
                    paused.push(*ssrc);
                }
            }
            paused.sort_unstable();
            let dest = r.upstream_addr.unwrap_or(link.address);
            msgs.push((
                up,
                dest,
                MeshMessage::Subscribe {
                    room: r.spec.room.clone(),
                    source: r.spec.source.clone(),
                    paused,
                },
            ));
        }
        // Announce to every live subscription what we send it.
        if announce {
            self.mesh.announce_due = None;
        }
        for r in self.mesh.routes.iter().filter(|_| announce) {
            for s in &r.serving {
                let mut tracks = Vec::new();
                for t in self
                    .rooms
                    .get(&r.spec.room)
                    .map(|x| &x.tracks[..])
                    .unwrap_or(&[])
                {
                    let Some(track) = self.tracks.get(t) else {
                        continue;
                    };
                    let Some(m) = track.mesh_out.iter().find(|m| m.link == s.link) else {
                        continue;
                    };
                    let (origin_track, origin_participant) = match &track.origin {
                        Some(o) => (
                            o.track,
                            self.mesh
                                .remote_participants
                                .iter()
                                .find(|(_, v)| v.0 == track.participant)
                                .map(|(k, _)| k.participant)
                                .unwrap_or(track.participant.0),
                        ),
                        None => (t.0, track.participant.0),
                    };
                    tracks.push(AnnouncedTrack {
                        origin_track,
                        origin_participant,
                        identity: self
                            .participants
                            .get(&track.participant)
                            .map(|p| p.identity.clone())
                            .unwrap_or_default(),
                        kind: track.kind,
                        codec: codec_code(track.codec),
                        layers: track
                            .layers
                            .iter()
                            .zip(&m.layers)
                            .enumerate()
                            .map(|(i, (l, o))| AnnouncedLayer {
                                rid: l.rid.as_ref().map(|r| r.to_string()),
                                ssrc: o.ssrc,
                                kbps: (l.bps / 1000).min(u64::from(u32::MAX)) as u32,
                                available: l.active(now) && !m.over_budget(i),
                            })
                            .collect(),
                    });
                }
                // An empty announcement still tells the downstream the
                // route is alive.
                let mut chunks: Vec<Vec<AnnouncedTrack>> = tracks
                    .chunks(crate::mesh::ANNOUNCE_TRACKS_PER_PACKET)
                    .map(<[_]>::to_vec)
                    .collect();
                if chunks.is_empty() {
                    chunks.push(Vec::new());
                }
                for c in chunks {
                    msgs.push((
                        s.link,
                        s.dest,
                        MeshMessage::Announce {
                            room: r.spec.room.clone(),
                            source: r.spec.source.clone(),
                            tracks: c,
                        },
                    ));
                }
            }
        }
        for (link, dest, msg) in msgs {
            let mut buf = self.io.buffer();
            write_message(&mut buf, self.rtcp_ssrc, &msg);
            self.mesh_send_rtcp(link, dest, buf);
        }
    }

    fn mesh_send_rtcp(&mut self, link: usize, dest: SocketAddr, mut buf: Vec<u8>) {
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        if l.tx.protect_rtcp(&mut buf).is_err() {
            return;
        }
        l.stats.packets_out += 1;
        l.stats.bytes_out += buf.len() as u64;
        let mut scratch = Counters::default();
        self.io.send(&mut scratch, dest, buf);
    }

    /// Removes a remote track (and its participant when it has no more).
    fn remove_remote_track(&mut self, now: Instant, tid: TrackId) {
        self.mesh.remote_tracks.retain(|_, t| *t != tid);
        for l in &mut self.mesh.links {
            l.inbound.retain(|_, s| s.at.track != tid);
        }
        let Some(participant) = self.tracks.get(&tid).map(|t| t.participant) else {
            return;
        };
        let room = self
            .tracks
            .get(&tid)
            .map(|t| t.room.clone())
            .unwrap_or_default();
        self.unpublish_track(tid);
        self.bind_waiting_subscribers(now, &room);
        self.select_layers(now);
        let has_more = self.tracks.values().any(|t| t.participant == participant);
        if !has_more {
            let key = self
                .mesh
                .remote_participants
                .iter()
                .find(|(_, v)| v.0 == participant)
                .map(|(k, v)| (k.clone(), v.1));
            if let Some((k, peer)) = key {
                self.mesh.remote_participants.remove(&k);
                self.peers.remove(&peer);
                self.remove_participant(participant);
            }
        }
    }

    /// Handles a datagram that may come from a mesh link. Returns false if
    /// it does not (no link authenticates it).
    pub(super) fn mesh_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        packet: &PacketBuf,
    ) -> bool {
        let data = packet.as_slice();
        let class = packet::classify(data);
        let rtcp = match class {
            PacketClass::Rtp => false,
            PacketClass::Rtcp => true,
            _ => return false,
        };
        let link = match self.mesh.by_addr.get(&source) {
            Some(&l) => l,
            None => match self.mesh_authenticate_new(source, data, rtcp) {
                Some(l) => l,
                None => return false,
            },
        };
        let mut scratch = std::mem::take(&mut self.mesh.scratch);
        let Some(l) = self.mesh.links.get_mut(link) else {
            self.mesh.scratch = scratch;
            return false;
        };
        let Some(ctx) = l.rx.get_mut(&source) else {
            self.mesh.scratch = scratch;
            return false;
        };
        let result = if rtcp {
            ctx.unprotect_rtcp(data, &mut scratch)
        } else {
            ctx.unprotect_rtp(data, &mut scratch)
        };
        let plain = match result {
            Ok(Unprotected::InPlace(len)) => packet.slice(0..len),
            Ok(Unprotected::Decrypted) => self.io.packets.copy_in(&scratch),
            // An authentic copy of what already arrived: a retransmission
            // racing the repaired original, not an attack.
            Err(SrtpError::Replayed | SrtpError::TooOld) => {
                l.stats.duplicates += 1;
                self.io.drop_packet(DropReason::MeshDuplicate);
                self.mesh.scratch = scratch;
                return true;
            }
            Err(_) => {
                l.stats.auth_failures += 1;
                self.io.drop_packet(DropReason::MeshAuth);
                self.mesh.scratch = scratch;
                return true;
            }
        };
        self.mesh.scratch = scratch;
        l.stats.packets_in += 1;
        l.stats.bytes_in += data.len() as u64;
        if rtcp {
            self.mesh_rtcp(now, link, source, plain.as_slice());
        } else {
            self.mesh_rtp(now, link, source, &plain);
        }
        true
    }

    /// Finds the link whose keys authenticate a datagram from a socket not
    /// seen before, trying links at that IP first.
    fn mesh_authenticate_new(
        &mut self,
        source: SocketAddr,
        data: &[u8],
        rtcp: bool,
    ) -> Option<usize> {
        let mut order: Vec<usize> = (0..self.mesh.links.len()).collect();
        order.sort_by_key(|&i| self.mesh.links[i].address.ip() != source.ip());
        let mut scratch = std::mem::take(&mut self.mesh.scratch);
        let mut found = None;
        for i in order {
            let l = &mut self.mesh.links[i];
            if l.rx.len() >= MAX_RX_CONTEXTS {
                continue;
            }
            let mut ctx = SrtpContext::new(l.profile, &l.rx_key.0, &l.rx_key.1);
            // Verify without consuming: the caller unprotects again through
            // the stored context (fresh contexts accept any first index).
            let ok = if rtcp {
                ctx.unprotect_rtcp(data, &mut scratch).is_ok()
            } else {
                ctx.unprotect_rtp(data, &mut scratch).is_ok()
            };
            if ok {
                let fresh = SrtpContext::new(l.profile, &l.rx_key.0, &l.rx_key.1);
                l.rx.insert(source, fresh);
                found = Some(i);
                break;
            }
        }
        self.mesh.scratch = scratch;
        match found {
            Some(i) => {
                self.mesh.by_addr.insert(source, i);
                Some(i)
            }
            None => {
                if self
                    .mesh
                    .links
                    .iter()
                    .any(|l| l.address.ip() == source.ip())
                {
                    self.io.drop_packet(DropReason::MeshAuth);
                    if let Some(l) = self
                        .mesh
                        .links
                        .iter_mut()
                        .find(|l| l.address.ip() == source.ip())
                    {
                        l.stats.auth_failures += 1;
                    }
                }
                None
            }
        }
    }

    fn mesh_rtp(&mut self, now: Instant, link: usize, source: SocketAddr, packet: &PacketBuf) {
        let Ok(header) = RtpHeader::parse(packet.as_slice()) else {
            self.io.drop_packet(DropReason::Malformed);
            return;
        };
        if header.payload_type == MESH_PT_FLEXFEC {
            self.mesh_fec(now, link, source, packet);
        } else {
            self.mesh_media(now, link, source, packet, &header, false);
        }
    }

    /// A media packet of a link stream: received, or rebuilt from a repair
    /// packet (`repaired`, already marked received in the SRTP replay
    /// window). Tracks loss (and NACKs), unwraps RED (rebuilding the
    /// packet before when it is missing) and forwards.
    fn mesh_media(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        packet: &PacketBuf,
        header: &RtpHeader,
        repaired: bool,
    ) {
        let data = packet.as_slice();
        // The media payload (the primary of a RED packet), and a RED block.
        let payload_at = header.header_len;
        let payload_end = data.len().saturating_sub(header.padding_len);
        let (range, red_block) = if header.payload_type == MESH_PT_RED {
            match RedPayload::parse(header.payload(data)) {
                Ok(r) => (
                    payload_at + r.primary.start..payload_at + r.primary.end,
                    Some(r),
                ),
                Err(e) => {
                    tracing::debug!(error = %e, "bad RED payload on a mesh link");
                    self.io.drop_packet(DropReason::MeshFec);
                    return;
                }
            }
        } else {
            (payload_at..payload_end, None)
        };
        let Some(at) = self
            .mesh
            .links
            .get(link)
            .and_then(|l| l.inbound.get(&header.ssrc))
            .map(|s| s.at)
        else {
            self.io.drop_packet(DropReason::UnknownSsrc);
            return;
        };
        if !repaired && let Some(t) = packet::rtp::abs_send_time(data, header, MESH_EXT_SEND_TIME) {
            self.mesh_delay(now, link, source, t, data.len());
        }
        let Some(track) = self.tracks.get(&at.track) else {
            return;
        };
        // End-to-end recovery: relays leave loss to the last node.
        let relay_only =
            self.config.mesh_recovery == MeshRecovery::EndToEnd && !track.mesh_out.is_empty();
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        let Some(s) = l.inbound.get_mut(&header.ssrc) else {
            return;
        };
        s.remote = source;
        let mut first = false;
        match s.draining_until {
            // A previous upstream past its hand-over.
            Some(d) if now >= d => {
                self.io.drop_packet(DropReason::MeshUnrouted);
                return;
            }
            Some(_) => {}
            None => {
                first = !s.delivered;
                s.delivered = true;
            }
        }
        if let Some(dec) = &mut s.fec {
            dec.store(header.sequence, packet);
        }
        if !relay_only {
            let (lost, recovered) = (s.loss.lost, s.loss.recovered);
            let fec_active = s
                .fec_seen
                .is_some_and(|t| now.saturating_duration_since(t) < FEC_ACTIVE);
            s.loss.set_hold(if fec_active {
                FEC_NACK_HOLD
            } else {
                Duration::ZERO
            });
            // Whatever `on_packet` says, the packet is forwarded: one older
            // than this hop waits for still passed SRTP's replay check, so
            // nobody downstream has it either.
            if repaired {
                s.loss.on_repaired(now, header.sequence);
            } else {
                s.loss.on_packet(now, header.sequence);
            }
            self.io.counters.packets_lost += s.loss.lost - lost;
            if s.loss.lost > lost {
                s.lost_at = Some(now);
            }
            l.stats.recovered += s.loss.recovered - recovered;
        }
        // RED: block `i` of `n` (oldest first) is the packet `n - i` before;
        // rebuild those that never came (the replay window says so, and
        // from then on refuses them).
        let mut rebuilt: [Option<(u16, u32, PacketBuf)>; red::MAX_BLOCKS] = Default::default();
        if let Some(r) = red_block {
            let n = r.redundant().len();
            for (i, (b, slot)) in r.redundant().iter().zip(&mut rebuilt).enumerate() {
                let seq = header.sequence.wrapping_sub((n - i) as u16);
                let fresh =
                    l.rx.get_mut(&source)
                        .is_some_and(|ctx| ctx.mark_received(header.ssrc, seq).is_ok());
                if fresh {
                    if !relay_only {
                        s.loss.on_repaired(now, seq);
                    }
                    l.stats.red_recovered += 1;
                    *slot = Some((
                        seq,
                        header.timestamp.wrapping_sub(u32::from(b.ts_offset)),
                        packet.slice(payload_at + b.start..payload_at + b.end),
                    ));
                }
            }
        }
        if !relay_only {
            match s.loss.next_due() {
                Some(d) if d <= now => self.mesh_nack_stream(now, link, header.ssrc),
                Some(d) => {
                    self.mesh.next_nack = Some(self.mesh.next_nack.map_or(d, |n| n.min(d)));
                }
                None => {}
            }
        }
        if first {
            self.mesh_end_handover(at);
        }
        let Some(track) = self.tracks.get(&at.track) else {
            return;
        };
        let vp8 = track.kind == TrackKind::Video && track.codec == Some(Codec::Vp8);
        // The publisher's audio level, carried by the upstream: it counts
        // in this node's active-speaker detection for the remote
        // participant, and goes on with the packet.
        let audio_level = (track.kind == TrackKind::Audio)
            .then(|| packet::rtp::audio_level(data, header, MESH_EXT_AUDIO_LEVEL))
            .flatten();
        super::observe_level(&mut self.rooms, &track.room, track.participant, audio_level);
        for (seq, timestamp, view) in rebuilt.into_iter().flatten() {
            let fwd = Forward {
                ssrc: header.ssrc,
                seq,
                timestamp,
                marker: false,
                keyframe: false,
                payload: view.as_slice(),
                shared: None,
                stored: Some(view.clone()),
                audio_level: None,
            };
            self.forward(now, at.track, at.layer, &fwd);
        }
        let stored = packet.slice(range);
        let payload = stored.as_slice();
        let fwd = Forward {
            ssrc: header.ssrc,
            seq: header.sequence,
            timestamp: header.timestamp,
            marker: header.marker,
            keyframe: vp8 && packet::codec::vp8_is_keyframe(payload),
            payload,
            shared: None,
            stored: Some(stored.clone()),
            audio_level,
        };
        self.forward(now, at.track, at.layer, &fwd);
    }

    /// A FlexFEC repair packet: rebuilds the one missing packet of its
    /// group if it can (and forwards it as if it had arrived); missing
    /// packets up to the group's last that it cannot rebuild are NACKed at
    /// once instead of after the hold.
    fn mesh_fec(&mut self, now: Instant, link: usize, source: SocketAddr, packet: &PacketBuf) {
        let fec = match FecPacket::parse(packet.as_slice()) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "bad FEC packet on a mesh link");
                self.io.drop_packet(DropReason::MeshFec);
                return;
            }
        };
        let ssrc = fec.protected_ssrc;
        let mut scratch = std::mem::take(&mut self.mesh.fec_scratch);
        let Some(l) = self.mesh.links.get_mut(link) else {
            self.mesh.fec_scratch = scratch;
            return;
        };
        l.stats.fec_received += 1;
        let Some(s) = l.inbound.get_mut(&ssrc) else {
            self.mesh.fec_scratch = scratch;
            self.io.drop_packet(DropReason::UnknownSsrc);
            return;
        };
        s.fec_seen = Some(now);
        let dec = s.fec.get_or_insert_with(Box::default);
        let mut rebuilt = None;
        match dec.recover(&fec, &mut scratch) {
            Ok(Recovery::Recovered(seq)) => {
                // Only what never came: the replay window knows.
                let fresh =
                    l.rx.get_mut(&source)
                        .is_some_and(|ctx| ctx.mark_received(ssrc, seq).is_ok());
                if fresh {
                    l.stats.fec_recovered += 1;
                    rebuilt = Some(self.io.packets.copy_in(&scratch));
                }
            }
            Ok(Recovery::Complete | Recovery::Unrecoverable(_)) => {}
            Err(e) => {
                tracing::debug!(error = %e, "unusable FEC packet on a mesh link");
                self.io.drop_packet(DropReason::MeshFec);
            }
        }
        self.mesh.fec_scratch = scratch;
        if let Some(buf) = rebuilt {
            match RtpHeader::parse(buf.as_slice()) {
                Ok(h) if h.ssrc == ssrc => self.mesh_media(now, link, source, &buf, &h, true),
                _ => self.io.drop_packet(DropReason::MeshFec),
            }
        }
        // What this group could not rebuild is NACKed now.
        let Some(s) = self
            .mesh
            .links
            .get_mut(link)
            .and_then(|l| l.inbound.get_mut(&ssrc))
        else {
            return;
        };
        s.loss.release_through(now, fec.last());
        if s.loss.next_due().is_some_and(|d| d <= now) {
            self.mesh_nack_stream(now, link, ssrc);
        }
    }

    /// The current upstream's stream of a layer delivered its first
    /// packet: the previous upstream's stream of that layer stops feeding
    /// it, and a previous upstream left with no stream of the room is told
    /// to stop sending.
    fn mesh_end_handover(&mut self, at: InboundRef) {
        let Some(origin) = self.tracks.get(&at.track).and_then(|t| t.origin.clone()) else {
            return;
        };
        let mut done: Vec<(usize, SocketAddr)> = Vec::new();
        for (li, l) in self.mesh.links.iter_mut().enumerate() {
            let mut remote = None;
            l.inbound.retain(|_, s| {
                let old = s.draining_until.is_some() && s.at == at;
                if old {
                    remote = Some(s.remote);
                }
                !old
            });
            let Some(remote) = remote else { continue };
            tracing::debug!(
                room = %origin.room,
                source = %origin.source,
                previous = %l.peer,
                "mesh hand-over: the new upstream's stream delivered; the previous one's stops feeding"
            );
            let tracks = &self.tracks;
            let more = l.inbound.values().any(|s| {
                s.draining_until.is_some()
                    && tracks
                        .get(&s.at.track)
                        .and_then(|t| t.origin.as_ref())
                        .is_some_and(|o| o.room == origin.room && o.source == origin.source)
            });
            if !more {
                done.push((li, remote));
            }
        }
        for (link, dest) in done {
            let mut buf = self.io.buffer();
            write_message(
                &mut buf,
                self.rtcp_ssrc,
                &MeshMessage::Unsubscribe {
                    room: origin.room.clone(),
                    source: origin.source.clone(),
                },
            );
            self.mesh_send_rtcp(link, dest, buf);
        }
    }

    /// Sends one NACK with every due sequence number of a stream.
    fn mesh_nack_stream(&mut self, now: Instant, link: usize, ssrc: u32) {
        let mut lost = [0u16; 64];
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        let Some(s) = l.inbound.get_mut(&ssrc) else {
            return;
        };
        let n = s.loss.due(now, &mut lost);
        let dest = s.remote;
        if n == 0 {
            return;
        }
        l.stats.nacks_sent += n as u64;
        self.io.counters.nacks_sent += n as u64;
        let mut buf = self.io.buffer();
        rtcp::write_nack(&mut buf, self.rtcp_ssrc, ssrc, &lost[..n]);
        self.mesh_send_rtcp(link, dest, buf);
        self.mesh_schedule_nacks();
    }

    fn mesh_schedule_nacks(&mut self) {
        self.mesh.next_nack = self
            .mesh
            .links
            .iter()
            .flat_map(|l| l.inbound.values())
            .filter_map(|s| s.loss.next_due())
            .min();
    }

    /// Due NACK retries (from `handle_timeout`).
    pub(super) fn mesh_timeout(&mut self, now: Instant) {
        if self.mesh.announce_due.is_some_and(|t| t <= now)
            || self.mesh.next_pending.is_some_and(|t| t <= now)
            || self.mesh.subscribe_due.is_some_and(|t| t <= now)
        {
            self.mesh_tick(now);
        }
        if self.mesh.next_nack.is_none_or(|t| t > now) {
            return;
        }
        let due: Vec<(usize, u32)> = self
            .mesh
            .links
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.inbound
                    .iter()
                    .filter(|(_, s)| s.loss.next_due().is_some_and(|d| d <= now))
                    .map(move |(ssrc, _)| (i, *ssrc))
            })
            .collect();
        for (link, ssrc) in due {
            self.mesh_nack_stream(now, link, ssrc);
        }
        // Streams whose missing packets all expired.
        for l in &mut self.mesh.links {
            for s in l.inbound.values_mut() {
                let mut none = [0u16; 0];
                s.loss.due(now, &mut none);
            }
            l.stats.unrecovered = l.inbound.values().map(|s| s.loss.unrecovered).sum::<u64>();
        }
        self.mesh_schedule_nacks();
    }

    /// A timed media packet from `source` on a link: feeds that sender's
    /// delay detector, and sends it a delay report when one is due.
    fn mesh_delay(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        send_time: u32,
        bytes: usize,
    ) {
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        let i = match l.delay.iter().position(|(a, _)| *a == source) {
            Some(i) => i,
            // One per receive context, so bounded as those are.
            None if l.delay.len() < MAX_RX_CONTEXTS => {
                l.delay.push((source, DelayDetector::default()));
                l.delay.len() - 1
            }
            None => return,
        };
        let d = &mut l.delay[i].1;
        d.on_packet(now, send_time, bytes);
        let Some(report) = d.report_due(now) else {
            return;
        };
        l.stats.delay_reports_sent += 1;
        let mut buf = self.io.buffer();
        write_delay_report(&mut buf, self.rtcp_ssrc, &report);
        self.mesh_send_rtcp(link, source, buf);
    }

    /// A delay report from the downstream of a link: the budget follows it
    /// (a lower one takes effect and is announced at once).
    fn mesh_delay_report(&mut self, now: Instant, link: usize, data: &[u8]) {
        let report = match parse_delay_report(data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "bad mesh delay report");
                self.io.drop_packet(DropReason::MeshFeedback);
                return;
            }
        };
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        l.stats.delay_reports_received += 1;
        if l.capacity.on_delay_report(now, &report) {
            self.mesh.announce_due = Some(now);
            self.mesh_reconcile(now);
            self.select_layers(now);
        }
    }

    fn mesh_rtcp(&mut self, now: Instant, link: usize, source: SocketAddr, data: &[u8]) {
        if is_delay_report(data) {
            self.mesh_delay_report(now, link, data);
            return;
        }
        if is_mesh_app(data) {
            match parse_message(data) {
                Ok(msg) => self.mesh_message(now, link, source, msg, data),
                Err(e) => {
                    tracing::debug!(error = %e, "bad mesh control message");
                    self.io.drop_packet(DropReason::Malformed);
                }
            }
            return;
        }
        for item in rtcp::iter(data) {
            let Ok(item) = item else {
                self.io.drop_packet(DropReason::Malformed);
                return;
            };
            match item {
                rtcp::RtcpPacket::Nack {
                    media_ssrc, lost, ..
                } => {
                    // End-to-end recovery, or a stream the kernel forwards
                    // (this hop holds none of it): what a relay does not
                    // hold goes on upstream, towards the source.
                    let relay = self
                        .mesh
                        .links
                        .get(link)
                        .and_then(|l| l.outbound.get(&media_ssrc))
                        .and_then(|(t, layer)| Some((self.tracks.get(t)?, *layer)))
                        .is_some_and(|(t, layer)| {
                            (self.config.mesh_recovery == MeshRecovery::EndToEnd
                                && t.origin.is_some())
                                || t.mesh_out.iter().any(|m| {
                                    m.link == link
                                        && m.layers.get(layer).is_some_and(|ol| ol.kernel)
                                })
                        });
                    let mut misses = [0u16; 64];
                    let mut n = 0;
                    for seq in lost {
                        if !self.mesh_retransmit(now, link, media_ssrc, seq) && relay && n < 64 {
                            misses[n] = seq;
                            n += 1;
                        }
                    }
                    if n > 0 {
                        self.mesh_kernel_nacked(link, media_ssrc, n as u64);
                        self.mesh_relay_nack(link, media_ssrc, &misses[..n]);
                    }
                }
                rtcp::RtcpPacket::Pli { media_ssrc, .. } => {
                    if let Some(&(t, layer)) = self
                        .mesh
                        .links
                        .get(link)
                        .and_then(|l| l.outbound.get(&media_ssrc))
                    {
                        self.io.counters.keyframe_requests_received += 1;
                        self.request_keyframe(now, t, layer);
                    }
                }
                _ => {}
            }
        }
    }

    /// Counts `n` NACKed sequence numbers against a kernel-forwarded layer
    /// (its loss decides whether it stays in the kernel).
    fn mesh_kernel_nacked(&mut self, link: usize, ssrc: u32, n: u64) {
        let Some(&(tid, layer)) = self
            .mesh
            .links
            .get(link)
            .and_then(|l| l.outbound.get(&ssrc))
        else {
            return;
        };
        let Some(track) = self.tracks.get_mut(&tid) else {
            return;
        };
        for m in track.mesh_out.iter_mut().filter(|m| m.link == link) {
            if let Some(ol) = m.layers.get_mut(layer).filter(|ol| ol.kernel) {
                ol.kernel_nacked += n;
            }
        }
    }

    /// End-to-end recovery on a relay, or a stream the kernel forwards:
    /// passes a downstream NACK for one of our link streams to the
    /// upstream stream that feeds it.
    fn mesh_relay_nack(&mut self, link: usize, ssrc: u32, seqs: &[u16]) {
        let Some(l) = self.mesh.links.get(link) else {
            return;
        };
        let Some(&(tid, layer)) = l.outbound.get(&ssrc) else {
            return;
        };
        let upstream = self.mesh.links.iter().enumerate().find_map(|(i, l)| {
            l.inbound
                .iter()
                .find(|(_, s)| s.at.track == tid && s.at.layer == layer)
                .map(|(up_ssrc, s)| (i, *up_ssrc, s.remote))
        });
        let Some((up, up_ssrc, dest)) = upstream else {
            return;
        };
        if let Some(u) = self.mesh.links.get_mut(up) {
            u.stats.nacks_sent += seqs.len() as u64;
        }
        self.io.counters.nacks_sent += seqs.len() as u64;
        let mut buf = self.io.buffer();
        rtcp::write_nack(&mut buf, self.rtcp_ssrc, up_ssrc, seqs);
        self.mesh_send_rtcp(up, dest, buf);
    }

    fn mesh_retransmit(&mut self, now: Instant, link: usize, ssrc: u32, seq: u16) -> bool {
        let Some(l) = self.mesh.links.get_mut(link) else {
            return false;
        };
        l.stats.nacks_received += 1;
        self.io.counters.nacks_received += 1;
        let Some(&(tid, layer)) = l.outbound.get(&ssrc) else {
            return false;
        };
        let Some(track) = self.tracks.get(&tid) else {
            return false;
        };
        let kind = track.kind;
        let found = track
            .mesh_out
            .iter()
            .find(|m| m.link == link)
            .and_then(|m| {
                let rtx = &m.layers.get(layer)?.retransmit;
                let sent = rtx.get(now, seq)?;
                // Sent as RED: the same bytes again (under SRTP's AES-CM, other
                // bytes with the same index would reuse its keystream).
                let mut prevs: [Option<Sent>; red::MAX_DEPTH] = Default::default();
                for (k, slot) in prevs
                    .iter_mut()
                    .enumerate()
                    .take(usize::from(sent.redundant))
                {
                    *slot = Some(rtx.get(now, seq.wrapping_sub(k as u16 + 1))?);
                }
                Some((m.dest, sent, prevs))
            });
        let Some((dest, sent, prevs)) = found else {
            // Not (yet) here: on a relay, usually a packet this hop is
            // itself still waiting for.
            l.stats.nack_misses += 1;
            return false;
        };
        // Loss of this link: only what it carried counts (a gap in a
        // stream that was paused or over the budget here is no loss, nor
        // is what a relay misses itself).
        l.capacity.on_nacked(1);
        if kind == TrackKind::Audio {
            l.capacity.on_audio_nacked();
        }
        let (blocks, n_blocks) = red_blocks(&prevs);
        let mut buf = self.io.buffer();
        let fields = (
            sent.marker,
            sent.seq,
            sent.timestamp,
            sent.audio_level,
            sent.send_time,
        );
        if n_blocks == 0 && !l.tx.profile().encrypts() {
            // The same bytes as the original: header, the stored payload
            // (not copied), the tag.
            write_link_media(&mut buf, kind, ssrc, fields, &[], &[]);
            if !send_link_parts(&mut self.io, l, dest, buf, &sent.payload) {
                return false;
            }
            l.stats.retransmits += 1;
            self.io.counters.retransmits += 1;
            return true;
        }
        write_link_media(
            &mut buf,
            kind,
            ssrc,
            fields,
            sent.payload.as_slice(),
            &blocks[..n_blocks],
        );
        if l.tx.protect_rtp(&mut buf).is_err() {
            return false;
        }
        l.stats.retransmits += 1;
        l.capacity.on_sent(buf.len());
        l.stats.packets_out += 1;
        l.stats.bytes_out += buf.len() as u64;
        self.io.counters.retransmits += 1;
        let mut scratch = Counters::default();
        self.io.send(&mut scratch, dest, buf);
        true
    }

    fn mesh_message(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        msg: MeshMessage,
        raw: &[u8],
    ) {
        let room = msg.room();
        if !self.owns_room(room) {
            // Another shard serves the room: hand it the (authenticated)
            // message; it answers from its own socket.
            let shard = crate::ids::shard_for_room(room, usize::from(self.config.shards.max(1)));
            let peer = self
                .mesh
                .links
                .get(link)
                .map(|l| l.peer.clone())
                .unwrap_or_default();
            self.io
                .outputs
                .push_back(Output::MeshControl(crate::types::MeshControl {
                    shard: shard as u8,
                    link: peer,
                    source,
                    rtcp: raw.to_vec(),
                }));
            return;
        }
        match msg {
            MeshMessage::Subscribe {
                room,
                source: origin,
                paused,
            } => {
                // A downstream of the route, or one still handing over
                // (its own desired state may not have moved it yet).
                let Some(r) = self.mesh.routes.iter_mut().find(|r| {
                    r.spec.room == room
                        && r.spec.source == origin
                        && (r.downstream.contains(&link)
                            || r.serving.iter().any(|s| s.link == link && s.live(now)))
                }) else {
                    tracing::debug!(
                        peer = %self.mesh_peer_name(link),
                        %room,
                        source = %origin,
                        "mesh SUBSCRIBE refused: that peer is no downstream of this route"
                    );
                    self.io.drop_packet(DropReason::MeshUnrouted);
                    return;
                };
                match r.serving.iter_mut().find(|s| s.link == link) {
                    Some(s) => {
                        s.dest = source;
                        s.renewed = now;
                        s.paused = paused;
                    }
                    None => {
                        r.serving.push(Serving {
                            link,
                            dest: source,
                            renewed: now,
                            paused,
                            linger_until: None,
                        });
                        tracing::debug!(
                            peer = %self.mesh_peer_name(link),
                            %room,
                            source = %origin,
                            "mesh downstream subscribed"
                        );
                    }
                }
                self.mesh_reconcile(now);
                self.select_layers(now);
            }
            MeshMessage::Unsubscribe {
                room,
                source: origin,
            } => {
                let mut found = false;
                for r in &mut self.mesh.routes {
                    if r.spec.room == room && r.spec.source == origin {
                        let before = r.serving.len();
                        r.serving.retain(|s| s.link != link);
                        found |= r.serving.len() != before;
                    }
                }
                if found {
                    self.mesh_reconcile(now);
                    self.select_layers(now);
                }
            }
            MeshMessage::Announce {
                room,
                source: origin,
                tracks,
            } => {
                let Some(ri) = self.mesh.routes.iter().position(|r| {
                    r.spec.room == room && r.spec.source == origin && r.upstream == Some(link)
                }) else {
                    tracing::debug!(
                        peer = %self.mesh_peer_name(link),
                        %room,
                        source = %origin,
                        "mesh ANNOUNCE refused: that peer is not this route's upstream"
                    );
                    self.io.drop_packet(DropReason::MeshUnrouted);
                    return;
                };
                let r = &mut self.mesh.routes[ri];
                r.upstream_addr = Some(source);
                r.announced = true;
                for t in tracks {
                    self.mesh_remote_track(now, link, source, &room, &origin, t);
                }
            }
        }
    }

    /// Creates or refreshes a remote track from an announcement, and
    /// points its layers at the announced link streams.
    fn mesh_remote_track(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        room: &str,
        origin: &str,
        t: AnnouncedTrack,
    ) {
        let key = OriginKey {
            room: room.to_owned(),
            source: origin.to_owned(),
            track: t.origin_track,
        };
        let tid = match self.mesh.remote_tracks.get(&key) {
            Some(&tid) if self.tracks.contains_key(&tid) => tid,
            _ => {
                let pkey = RemoteParticipantKey {
                    room: room.to_owned(),
                    source: origin.to_owned(),
                    participant: t.origin_participant,
                };
                let known =
                    self.mesh
                        .remote_participants
                        .get(&pkey)
                        .copied()
                        .filter(|(p, peer)| {
                            self.participants.contains_key(p) && self.peers.contains_key(peer)
                        });
                let (participant, peer) = match known {
                    Some(v) => v,
                    None => {
                        let v = self.add_remote_participant(now, room, origin, &t.identity);
                        self.mesh.remote_participants.insert(pkey, v);
                        v
                    }
                };
                let tid = TrackId(crate::ids::tagged(self.config.shard, self.next_seq_id));
                self.next_seq_id += 1;
                let track = Track {
                    room: room.to_owned(),
                    participant,
                    peer,
                    kind: t.kind,
                    mid: None,
                    codec: codec_from_code(t.codec),
                    layers: t
                        .layers
                        .iter()
                        .map(|l| Layer::new(l.rid.as_deref().map(Rid::from)))
                        .collect(),
                    subscribers: Vec::new(),
                    demanded: Vec::new(),
                    mesh_out: Vec::new(),
                    origin: Some(key.clone()),
                    announced: Some(now),
                };
                let info = track.info(tid);
                self.tracks.insert(tid, track);
                self.mesh.remote_tracks.insert(key, tid);
                self.publish_track(now, room, info);
                tid
            }
        };
        let Some(track) = self.tracks.get_mut(&tid) else {
            return;
        };
        track.announced = Some(now);
        let mut repointed: Vec<usize> = Vec::new();
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        for (i, al) in t.layers.into_iter().enumerate() {
            let ssrc = al.ssrc;
            if i >= track.layers.len() {
                track
                    .layers
                    .push(Layer::new(al.rid.as_deref().map(Rid::from)));
            }
            // A layer the upstream has (and may send us) stays selectable
            // while it is paused on the link: otherwise a viewer could
            // never move to a layer nobody here watched before.
            let layer = &mut track.layers[i];
            // An unavailable layer is not chosen even while it still
            // comes: the link's budget cannot carry it, and the viewers
            // that watch it must move off for it to stop.
            layer.withheld = !al.available;
            if al.available {
                if layer.last_packet.is_none_or(|t| t < now) {
                    layer.last_packet = Some(now);
                }
                // Not receiving it: take the upstream's measurement.
                if layer.meter.bps(now) == 0 {
                    layer.bps = u64::from(al.kbps) * 1000;
                }
            }
            if !l.inbound.contains_key(&ssrc) {
                // A new stream for this layer (new upstream, or the
                // upstream's source changed): forget the old one.
                l.inbound
                    .retain(|_, s| !(s.at.track == tid && s.at.layer == i));
                if track.layers[i].last_packet.is_some() {
                    repointed.push(i);
                }
                l.inbound.insert(
                    ssrc,
                    InStream::new(
                        InboundRef {
                            track: tid,
                            layer: i,
                        },
                        source,
                    ),
                );
            }
        }
        // The same layers must not also be fed from another link: a
        // previous upstream's streams feed them only until this link's
        // deliver (make-before-break), and others not at all.
        for (j, other) in self.mesh.links.iter_mut().enumerate() {
            if j != link {
                other
                    .inbound
                    .retain(|_, s| s.at.track != tid || s.draining_until.is_some());
            }
        }
        // A stream that moved to a new upstream starts decoding afresh.
        for i in repointed {
            self.request_keyframe(now, tid, i);
        }
    }

    fn add_remote_participant(
        &mut self,
        now: Instant,
        room: &str,
        origin: &str,
        identity: &str,
    ) -> (ParticipantId, PeerId) {
        let id = ParticipantId(crate::ids::tagged(self.config.shard, self.next_seq_id));
        self.next_seq_id += 1;
        let r = self.rooms.entry(room.to_string()).or_insert_with(|| Room {
            participants: Vec::new(),
            tracks: Vec::new(),
            speaker: SpeakerDetector::default(),
            retired: Counters::default(),
        });
        r.participants.push(id);
        let peer = PeerId(crate::ids::tagged(self.config.shard, self.random()));
        self.participants.insert(
            id,
            Participant {
                room: room.to_string(),
                identity: identity.to_string(),
                peers: vec![peer],
                ephemeral: false,
            },
        );
        self.peers.insert(
            peer,
            Peer {
                participant: id,
                room: room.to_string(),
                transport: Transport::Mesh(MeshPeer {
                    source: origin.to_owned(),
                }),
                counters: Counters::default(),
                created: now,
                loss: None,
                rtt: None,
            },
        );
        self.io.event(SfuEvent::ParticipantJoined {
            room: room.to_string(),
            participant: id,
            identity: identity.to_string(),
        });
        (id, peer)
    }

    /// Asks the upstream of a remote track's layer for a keyframe.
    pub(super) fn mesh_keyframe_request(&mut self, room: &str, source: &str, ssrc: Option<u32>) {
        let Some(ssrc) = ssrc else { return };
        let Some((link, dest)) = self.mesh.routes.iter().find_map(|r| {
            (r.spec.room == room && r.spec.source == source)
                .then_some(())
                .and(r.upstream)
                .map(|u| (u, r.upstream_addr))
        }) else {
            return;
        };
        let Some(l) = self.mesh.links.get(link) else {
            return;
        };
        let dest = dest.unwrap_or(l.address);
        let mut buf = self.io.buffer();
        rtcp::write_pli(&mut buf, self.rtcp_ssrc, ssrc);
        self.mesh_send_rtcp(link, dest, buf);
    }

    /// The layers this node needs of a remote track changed: its upstream
    /// hears at once (a layer nobody needs any more stops crossing the
    /// link within a round trip, not at the next period).
    pub(super) fn mesh_demand_changed(&mut self, now: Instant) {
        if !self.mesh.is_empty() {
            self.mesh.subscribe_due = Some(now);
        }
    }

    /// When this core's send-time clock on links started: a link packet's
    /// abs-send-time counts from here (a kernel fast path that forwards a
    /// transit stream stamps its packets on the same clock).
    pub fn mesh_epoch(&self) -> Instant {
        self.mesh.epoch
    }

    /// Mesh transit streams a kernel fast path may forward instead of the
    /// core: a remote track's layer received on a trusted link with SipHash
    /// tags and no FEC, whose track has no local subscriber and exactly one
    /// downstream link (trusted, SipHash, no FEC) that carries the layer
    /// now from this very upstream stream. The kernel then does what the
    /// core would: check the tag, swap the link SSRC, re-sign, send; the
    /// bytes are otherwise the upstream's (sequence number, timestamp,
    /// audio level), but for the send time, which the kernel stamps on this
    /// core's clock ([`MeshFlow::send_epoch`]).
    ///
    /// The answer changes with subscriptions, layer demand and budget,
    /// routes and links, so a caller re-queries and diffs.
    pub fn mesh_flows(&self, now: Instant) -> Vec<MeshFlow> {
        let mut out = Vec::new();
        let siphash = |l: &Link| l.profile.siphash() && !l.fec && l.linger_until.is_none();
        for l in self.mesh.links.iter().filter(|l| siphash(l)) {
            for (&ssrc, s) in &l.inbound {
                let lossy = s
                    .lost_at
                    .is_some_and(|t| now.saturating_duration_since(t) < KERNEL_CLEAN);
                if s.draining_until.is_some() || !s.delivered || s.fec_seen.is_some() || lossy {
                    continue;
                }
                let Some(track) = self.tracks.get(&s.at.track) else {
                    continue;
                };
                let [m] = track.mesh_out.as_slice() else {
                    continue;
                };
                if !track.subscribers.is_empty() {
                    continue;
                }
                let Some(ol) = m.layers.get(s.at.layer) else {
                    continue;
                };
                if ol.paused
                    || ol.capped
                    || ol.source_ssrc != Some(ssrc)
                    || ol.kernel_hold_until.is_some_and(|t| now < t)
                {
                    continue;
                }
                let Some(down) = self
                    .mesh
                    .links
                    .get(m.link)
                    .filter(|d| siphash(d) && d.capacity.last_loss <= KERNEL_MAX_LOSS)
                else {
                    continue;
                };
                let Some(rx) = l.rx.get(&s.remote) else {
                    continue;
                };
                let (Some(in_key), Some(out_key)) =
                    (rx.rtp_siphash_key(), down.tx.rtp_siphash_key())
                else {
                    continue;
                };
                out.push(MeshFlow {
                    track: s.at.track,
                    source: s.remote,
                    local: self.config.local_addr,
                    ssrc,
                    in_key,
                    in_highest: rx.highest_received(ssrc),
                    dest: m.dest,
                    out_ssrc: ol.ssrc,
                    out_key,
                    out_highest: down.tx.highest_sent(ol.ssrc),
                    send_epoch: self.mesh.epoch,
                });
            }
        }
        out.sort_by_key(|f| (f.track, f.ssrc));
        out
    }

    /// What a kernel fast path did with the [`Sfu::mesh_flows`] it took:
    /// exactly the layers of `progress` marked `forwarded` are kernel
    /// forwarded from now on (their downstream NACKs go upstream), and
    /// every flow's SRTP contexts move on to the indices the kernel
    /// accepted and sent, so the core places later packets (after a
    /// sequence-number wrap, too) where the kernel did when it takes a
    /// stream back. A stream of which more than 1 % of what the kernel
    /// forwarded was NACKed is not offered again for 10 s.
    pub fn set_kernel_mesh_forwarded(&mut self, now: Instant, progress: &[MeshFlowProgress]) {
        for p in progress {
            for l in &mut self.mesh.links {
                if let Some(s) = l.inbound.get_mut(&p.ssrc)
                    && let Some(rx) = l.rx.get_mut(&p.source)
                    && let Some(index) = p.in_highest
                {
                    rx.advance_received(p.ssrc, index);
                    // What the kernel forwarded is no gap of this hop's.
                    s.loss.skip_to(index as u16);
                }
                if l.outbound.contains_key(&p.out_ssrc)
                    && let Some(index) = p.out_highest
                {
                    l.tx.advance_sent(p.out_ssrc, index);
                }
            }
        }
        for (tid, track) in self.tracks.iter_mut() {
            for m in &mut track.mesh_out {
                for ol in &mut m.layers {
                    let p = progress.iter().find(|p| {
                        p.out_ssrc == ol.ssrc
                            && self
                                .mesh
                                .links
                                .get(m.link)
                                .and_then(|l| l.outbound.get(&p.out_ssrc))
                                .is_some_and(|(t, _)| t == tid)
                    });
                    let Some(p) = p.filter(|p| p.forwarded) else {
                        ol.kernel = false;
                        continue;
                    };
                    if !ol.kernel {
                        ol.kernel = true;
                        ol.kernel_packets = p.packets;
                        ol.kernel_nacked = 0;
                        continue;
                    }
                    let forwarded = p.packets.saturating_sub(ol.kernel_packets);
                    if forwarded >= KERNEL_LOSS_SAMPLE {
                        let loss = ol.kernel_nacked.min(forwarded) as f64 / forwarded as f64;
                        if loss > KERNEL_MAX_LOSS {
                            ol.kernel_hold_until = Some(now + KERNEL_CLEAN);
                        }
                        ol.kernel_packets = p.packets;
                        ol.kernel_nacked = 0;
                    }
                }
            }
        }
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

    /// Handles a mesh control message that another shard received and
    /// authenticated for a room of this shard.
    pub fn handle_mesh_control(
        &mut self,
        now: Instant,
        link_peer: &str,
        source: SocketAddr,
        rtcp: &[u8],
    ) {
        let Some(link) = self.mesh.links.iter().position(|l| l.peer == link_peer) else {
            return;
        };
        match parse_message(rtcp) {
            Ok(msg) if self.owns_room(msg.room()) => {
                self.mesh_message(now, link, source, msg, rtcp)
            }
            _ => self.io.drop_packet(DropReason::Malformed),
        }
        self.process_events(now);
    }
}

/// A link stream's media packet: the RTP header under the link SSRC (with
/// the audio level, when known, and the send time as header extensions),
/// then the payload,
/// or RED (audio on a link with FEC) with `prev` (the packet before:
/// timestamp and payload) as its redundant block. A retransmission
/// calls this with what was sent, so it writes the same bytes again (under
/// SRTP's AES-CM, other bytes with the same index would reuse its
/// keystream).
fn write_link_media(
    buf: &mut Vec<u8>,
    kind: TrackKind,
    ssrc: u32,
    (marker, seq, timestamp, level, send_time): (bool, u16, u32, Option<(bool, u8)>, Option<u32>),
    payload: &[u8],
    prev: &[(u32, &[u8])],
) {
    let pt = if !prev.is_empty() {
        MESH_PT_RED
    } else {
        mesh_pt(kind)
    };
    let level = level.map(|(voice, attenuation)| [(u8::from(voice) << 7) | attenuation.min(127)]);
    let send_time = send_time.map(|t| {
        let [_, a, b, c] = t.to_be_bytes();
        [a, b, c]
    });
    packet::rtp::write_header_with_extensions(
        buf,
        marker,
        pt,
        seq,
        timestamp,
        ssrc,
        &[
            (MESH_EXT_AUDIO_LEVEL, level.as_ref().map(|l| &l[..])),
            (MESH_EXT_SEND_TIME, send_time.as_ref().map(|t| &t[..])),
        ],
    );
    if prev.is_empty() {
        buf.extend_from_slice(payload);
    } else {
        // Timestamps to offsets, the most recent blocks if more are given.
        let prev = &prev[prev.len().saturating_sub(red::MAX_DEPTH)..];
        let mut blocks: [(u32, &[u8]); red::MAX_DEPTH] = [(0, &[]); red::MAX_DEPTH];
        for (b, (ts, data)) in blocks.iter_mut().zip(prev) {
            *b = (timestamp.wrapping_sub(*ts), data);
        }
        red::write(buf, MESH_PT_AUDIO, &blocks[..prev.len()], payload);
    }
}

fn mesh_pt(kind: TrackKind) -> u8 {
    match kind {
        TrackKind::Audio => MESH_PT_AUDIO,
        TrackKind::Video => MESH_PT_VIDEO,
    }
}
