//! The mesh's control plane: applying the desired state (links and routes,
//! make-before-break), subscriptions and announcements between nodes, and
//! the remote tracks and participants they create.

use std::collections::HashMap;

use rand::RngCore;
use std::net::SocketAddr;
use std::time::Instant;

use str0m::media::Rid;

use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::mesh::{
    AnnouncedLayer, AnnouncedTrack, InboundRef, LinkCapacity, MESH_STATE_TIMEOUT, MeshConfig,
    MeshLinkSnapshot, MeshMessage, OriginKey, PENDING_SUBSCRIBE_INTERVAL, ROUTE_HANDOVER,
    RemoteParticipantKey, SUBSCRIBE_INTERVAL, codec_code, codec_from_code, layers_within,
    parse_message, write_message,
};
use crate::retransmit::RetransmitBuffer;
use crate::srtp::{SrtpContext, SrtpProfile, mesh_master_key};
use crate::types::{DropReason, Output, SfuEvent};

use super::{
    InStream, Link, MAX_RX_CONTEXTS, MeshOut, MeshPeer, MeshState, OutLayer, Route, Serving,
};
use crate::mesh::MeshLinkSpec;
use crate::sfu::Sfu;
use crate::sfu::layers::Layer;
use crate::sfu::peer::{Peer, Transport};
use crate::sfu::registry::Track;

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
    pub(in crate::sfu) fn mesh_apply(&mut self, now: Instant, config: MeshConfig) {
        // Keys derive from both node ids: nothing survives a new identity.
        let same_node = self.mesh.node_id == config.node_id;
        let remap = self.mesh.apply_links(now, &config, same_node);
        // Outgoing streams on links that went.
        for track in self.reg.tracks.values_mut() {
            track.mesh_out.retain_mut(|m| match remap.get(&m.link) {
                Some(n) => {
                    m.link = *n;
                    true
                }
                None => false,
            });
        }
        let moved = self.mesh.apply_routes(now, &config, same_node, &remap);
        self.mesh.node_id = config.node_id.clone();
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
            let tracks = &self.reg.tracks;
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
    pub(in crate::sfu) fn mesh_expire_handover(&mut self, now: Instant) {
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
    pub(in crate::sfu) fn mesh_prune_inbound(&mut self, now: Instant) {
        let routes = &self.mesh.routes;
        let tracks = &self.reg.tracks;
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

    /// Brings every track's outgoing link streams in line with the routes
    /// and live subscriptions.
    pub(in crate::sfu) fn mesh_reconcile(&mut self, now: Instant) {
        let node = self.mesh.node_id.clone();
        let rng = &mut self.rng;
        for (tid, track) in self.reg.tracks.iter_mut() {
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
                    let ssrc = rng.next_u32() | 1;
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
    }

    /// Periodic mesh work: subscriptions and announcements, expiry.
    pub(in crate::sfu) fn mesh_tick(&mut self, now: Instant) {
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
                self.reg.tracks.get(t).is_none_or(|t| {
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
                if let Some(t) = self.reg.tracks.get(&s.at.track)
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
        if announce {
            self.mesh_announcements(now, &mut msgs);
        }
        for (link, dest, msg) in msgs {
            let mut buf = self.out.buffer();
            write_message(&mut buf, self.rtcp_ssrc, &msg);
            self.mesh_send_rtcp(link, dest, buf);
        }
    }

    /// Announcements to every live subscription of what this node sends
    /// it (an empty one still tells the downstream the route is alive).
    fn mesh_announcements(&self, now: Instant, msgs: &mut Vec<(usize, SocketAddr, MeshMessage)>) {
        for r in &self.mesh.routes {
            for s in &r.serving {
                let mut tracks = Vec::new();
                for t in self
                    .reg
                    .rooms
                    .get(&r.spec.room)
                    .map(|x| &x.tracks[..])
                    .unwrap_or(&[])
                {
                    let Some(track) = self.reg.tracks.get(t) else {
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
                            .reg
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
    }

    /// Removes a remote track (and its participant when it has no more).
    pub(in crate::sfu) fn remove_remote_track(&mut self, now: Instant, tid: TrackId) {
        self.mesh.remote_tracks.retain(|_, t| *t != tid);
        for l in &mut self.mesh.links {
            l.inbound.retain(|_, s| s.at.track != tid);
        }
        let Some(participant) = self.reg.tracks.get(&tid).map(|t| t.participant) else {
            return;
        };
        let room = self
            .reg
            .tracks
            .get(&tid)
            .map(|t| t.room.clone())
            .unwrap_or_default();
        self.unpublish_track(tid);
        self.bind_waiting_subscribers(now, &room);
        self.select_layers(now);
        let has_more = self
            .reg
            .tracks
            .values()
            .any(|t| t.participant == participant);
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

    pub(in crate::sfu) fn mesh_message(
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
            self.out
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
                    self.out.drop_packet(DropReason::MeshUnrouted);
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
                    self.out.drop_packet(DropReason::MeshUnrouted);
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
    pub(in crate::sfu) fn mesh_remote_track(
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
            Some(&tid) if self.reg.tracks.contains_key(&tid) => tid,
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
                            self.reg.participants.contains_key(p) && self.peers.contains_key(peer)
                        });
                let (participant, peer) = match known {
                    Some(v) => v,
                    None => {
                        let v = self.add_remote_participant(now, room, origin, &t.identity);
                        self.mesh.remote_participants.insert(pkey, v);
                        v
                    }
                };
                let layers = t
                    .layers
                    .iter()
                    .map(|l| Layer::new(l.rid.as_deref().map(Rid::from)))
                    .collect();
                let mut track = Track::new(
                    room,
                    participant,
                    peer,
                    t.kind,
                    codec_from_code(t.codec),
                    layers,
                );
                track.origin = Some(key.clone());
                track.announced = Some(now);
                let (tid, info) = self.reg.add_track(track);
                self.mesh.remote_tracks.insert(key, tid);
                self.publish_track(now, room, info);
                tid
            }
        };
        let Some(track) = self.reg.tracks.get_mut(&tid) else {
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

    pub(in crate::sfu) fn add_remote_participant(
        &mut self,
        now: Instant,
        room: &str,
        origin: &str,
        identity: &str,
    ) -> (ParticipantId, PeerId) {
        let id = self.reg.add_participant(room, identity, false);
        let peer = self.new_peer_id();
        if let Some(p) = self.reg.participants.get_mut(&id) {
            p.peers.push(peer);
        }
        let source = origin.to_owned();
        let transport = Transport::Mesh(MeshPeer { source });
        self.peers.insert(peer, Peer::new(id, room, transport, now));
        self.out.event(SfuEvent::ParticipantJoined {
            room: room.to_string(),
            participant: id,
            identity: identity.to_string(),
        });
        (id, peer)
    }

    /// The layers this node needs of a remote track changed: its upstream
    /// hears at once (a layer nobody needs any more stops crossing the
    /// link within a round trip, not at the next period).
    pub(in crate::sfu) fn mesh_demand_changed(&mut self, now: Instant) {
        if !self.mesh.is_empty() {
            self.mesh.subscribe_due = Some(now);
        }
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
            _ => self.out.drop_packet(DropReason::Malformed),
        }
        self.process_events(now);
    }
}

impl MeshState {
    /// Rebuilds the links from `config`, keeping the state (contexts,
    /// streams) of unchanged ones and letting those that went linger for a
    /// hand-over. Returns where each kept link's index moved.
    fn apply_links(
        &mut self,
        now: Instant,
        config: &MeshConfig,
        same_node: bool,
    ) -> HashMap<usize, usize> {
        let node = &config.node_id;
        let live = |until: Option<Instant>| until.is_none_or(|t| now < t);
        // Links: keep the state (contexts, streams) of unchanged ones.
        let mut old: Vec<Option<Link>> = std::mem::take(&mut self.links)
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
                None => Link::new(spec, node),
            };
            self.links.push(link);
        }
        // Links that went linger for the hand-over.
        for (j, l) in old.into_iter().enumerate() {
            let Some(mut l) = l else { continue };
            let until = l.linger_until.unwrap_or(now + ROUTE_HANDOVER);
            if !same_node || now >= until {
                continue;
            }
            l.linger_until = Some(until);
            remap.insert(j, self.links.len());
            self.links.push(l);
        }
        self.by_addr.retain(|_, l| match remap.get(l) {
            Some(n) => {
                *l = *n;
                true
            }
            None => false,
        });
        remap
    }

    /// Rebuilds the routes from `config`, keeping the subscriptions and
    /// upstream address of routes that stay (with the same upstream) and
    /// letting those that went serve their live subscriptions. Returns
    /// (room, source, previous upstream link) of routes whose upstream
    /// moved.
    fn apply_routes(
        &mut self,
        now: Instant,
        config: &MeshConfig,
        same_node: bool,
        remap: &HashMap<usize, usize>,
    ) -> Vec<(String, String, usize)> {
        let links = &self.links;
        let link_index = |peer: &str| {
            links
                .iter()
                .position(|l| l.peer == peer && l.linger_until.is_none())
        };
        // Routes: keep the subscriptions and upstream address of routes
        // that stay (with the same upstream).
        let mut old_routes = std::mem::take(&mut self.routes);
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
        self.routes = routes;
        moved
    }
}

impl Link {
    /// A link to `spec.peer` with fresh SRTP contexts, keyed for this node
    /// (`node`) and its peer.
    fn new(spec: &MeshLinkSpec, node: &str) -> Self {
        // Trusted: SipHash tags, which the kernel fast path can
        // check and re-sign on a transit node.
        let profile = if spec.trusted {
            SrtpProfile::NullSipHash24_80
        } else {
            SrtpProfile::Aes128CmHmacSha1_80
        };
        let (tk, ts) = mesh_master_key(&spec.key, node, &spec.peer);
        let rx_key = mesh_master_key(&spec.key, &spec.peer, node);
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
}
