//! Subscriptions: binding subscribers to the tracks of their room, choosing
//! each one's layer, and the periodic tick that re-evaluates both.

use std::collections::HashMap;
use std::time::Instant;

use str0m::bwe::Bitrate;

use crate::ids::{PeerId, TrackId};
use crate::types::{CodecSpec, OfferIntent, RtpDirection, SfuEvent, TrackInfo, TrackKind};

use super::Sfu;
use super::codecs;
use super::layers::{LAYER_RETRY_AFTER, LAYER_START_GRACE, choose_layer, count_watchers};
use super::peer::Transport;
use super::registry::Track;

impl Sfu {
    pub(in crate::sfu) fn publish_track(&mut self, now: Instant, room: &str, info: TrackInfo) {
        let tid = info.track;
        if let Some(r) = self.reg.rooms.get_mut(room) {
            r.tracks.push(tid);
        }
        self.out.event(SfuEvent::TrackPublished {
            room: room.to_string(),
            track: info,
        });
        self.bind_waiting_subscribers(now, room);
        if !self.mesh.is_empty() {
            self.mesh_reconcile(now);
        }
    }

    /// Offers the room's tracks to every subscription in it that has none.
    pub(in crate::sfu) fn bind_waiting_subscribers(&mut self, now: Instant, room: &str) {
        let waiting: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.room == room)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            match self.peers.get(&id).map(|p| &p.transport) {
                Some(Transport::WebRtc(_)) => self.bind_slots(now, id),
                Some(Transport::Rtp(e))
                    if e.direction == RtpDirection::Subscribe && e.track.is_none() =>
                {
                    self.bind_rtp_subscriber(now, id, None)
                }
                _ => {}
            }
        }
    }

    /// Binds a WebRTC subscriber's free m-lines to tracks of its room, each
    /// to a track in a codec the m-line negotiated. A track it could bind
    /// but for its codec is reported once ([`SfuEvent::NoCommonCodec`]).
    pub(in crate::sfu) fn bind_slots(&mut self, now: Instant, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Transport::WebRtc(w) = &mut peer.transport else {
            return;
        };
        let OfferIntent::Subscribe { from } = w.intent else {
            return;
        };
        let Some(room) = self.reg.rooms.get(&peer.room) else {
            return;
        };
        let w = &mut **w;
        let mut changed = false;
        let mut refused: Vec<(TrackId, CodecSpec, Vec<CodecSpec>)> = Vec::new();
        for slot in w.slots.iter_mut().filter(|s| s.track.is_none()) {
            let accept = codecs::receivable(&w.rtc, slot.mid);
            let mut candidate = None;
            for t in &room.tracks {
                let Some(track) = self.reg.tracks.get(t) else {
                    continue;
                };
                if track.kind != slot.kind
                    || track.participant == peer.participant
                    || from.is_some_and(|f| f != track.participant)
                    || track.subscribers.contains(&id)
                {
                    continue;
                }
                let fits = track.codec.is_none_or(|c| {
                    codecs::negotiated_pt(&w.rtc, slot.mid, c, track.format.as_ref()).is_some()
                });
                match track.codec.and_then(CodecSpec::from_str0m) {
                    Some(c) if !fits => {
                        if !w.refused_tracks.contains(t) && !refused.iter().any(|r| r.0 == *t) {
                            refused.push((*t, c, accept.clone()));
                        }
                    }
                    _ => {
                        candidate = Some(*t);
                        break;
                    }
                }
            }
            if let Some(t) = candidate {
                slot.track = Some(t);
                slot.pt = None;
                slot.current = None;
                slot.target = None;
                if let Some(track) = self.reg.tracks.get_mut(&t) {
                    track.subscribers.push(id);
                }
                changed = true;
            }
        }
        for (track, codec, receivable) in refused {
            if w.refused_tracks.len() >= codecs::MAX_REFUSED {
                break;
            }
            w.refused_tracks.push(track);
            tracing::info!(peer = %id, %track, %codec, "subscriber cannot receive the track's codec");
            self.out.event(SfuEvent::NoCommonCodec {
                room: peer.room.clone(),
                participant: peer.participant,
                peer: id,
                track,
                codec,
                receivable,
            });
        }
        if changed {
            self.select_layers(now);
        }
    }

    pub(in crate::sfu) fn bind_rtp_subscriber(
        &mut self,
        now: Instant,
        id: PeerId,
        wanted: Option<TrackId>,
    ) {
        // Not before its remote has given consent (see consent.rs).
        if self.consent.pending.contains_key(&id) {
            return;
        }
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Transport::Rtp(e) = &mut peer.transport else {
            return;
        };
        let Some(room) = self.reg.rooms.get(&peer.room) else {
            return;
        };
        let candidate = wanted.or_else(|| {
            room.tracks.iter().copied().find(|t| {
                self.reg.tracks.get(t).is_some_and(|tr| {
                    tr.kind == e.kind
                        && tr.participant != peer.participant
                        && e.accepts.is_none_or(|want| {
                            tr.codec
                                .and_then(CodecSpec::from_str0m)
                                .is_none_or(|c| c == want)
                        })
                })
            })
        });
        if let Some(t) = candidate
            && let Some(track) = self.reg.tracks.get_mut(&t)
        {
            e.track = Some(t);
            track.subscribers.push(id);
            self.select_layers(now);
        }
    }

    /// Chooses every subscriber's target layer, requests keyframes for
    /// switches, and tells publishers which layers are watched.
    pub(in crate::sfu) fn select_layers(&mut self, now: Instant) {
        // Target per subscription.
        let mut switches: Vec<(TrackId, usize)> = Vec::new();
        for peer in self.peers.values_mut() {
            match &mut peer.transport {
                Transport::WebRtc(w) => {
                    let video_slots = w
                        .slots
                        .iter()
                        .filter(|s| s.track.is_some() && s.kind == TrackKind::Video)
                        .count()
                        .max(1) as u64;
                    let budget = w.bwe_bps.map(|b| b / video_slots);
                    for slot in &mut w.slots {
                        let Some(track) = slot.track.and_then(|t| self.reg.tracks.get(&t)) else {
                            continue;
                        };
                        let target =
                            choose_layer(&track.layers, now, budget, w.pinned_rid.as_ref());
                        if target != slot.target {
                            slot.target = target;
                            if let (Some(t), Some(l)) = (slot.track, target)
                                && slot.current != target
                            {
                                switches.push((t, l));
                            }
                        }
                    }
                }
                Transport::Rtp(e) if e.direction == RtpDirection::Subscribe => {
                    let Some(track) = e.track.and_then(|t| self.reg.tracks.get(&t)) else {
                        continue;
                    };
                    let target = choose_layer(&track.layers, now, None, None);
                    if target != e.target {
                        e.target = target;
                        if let (Some(t), Some(l)) = (e.track, target)
                            && e.current != target
                        {
                            switches.push((t, l));
                        }
                    }
                }
                Transport::Rtp(_) | Transport::Mesh(_) => {}
            }
        }
        self.count_layer_watchers();
        // Demand changes, and layers that were asked for but never came.
        let mut events = Vec::new();
        let mut remote_demand_changed = false;
        for (tid, track) in self.reg.tracks.iter_mut() {
            if track.kind != TrackKind::Video || track.layers.len() < 2 {
                continue;
            }
            for l in &mut track.layers {
                if l.watchers > 0 && !l.active(now) {
                    let since = *l.demanded_since.get_or_insert(now);
                    if now.saturating_duration_since(since) > LAYER_START_GRACE {
                        l.unavailable_until = Some(now + LAYER_RETRY_AFTER);
                        l.demanded_since = None;
                    }
                } else {
                    l.demanded_since = None;
                }
            }
            let watched = || {
                track
                    .layers
                    .iter()
                    .filter(|l| l.watchers > 0)
                    .filter_map(|l| l.rid.as_ref())
            };
            // Compare before building strings: this runs on every tick.
            let unchanged = watched()
                .map(|r| &**r)
                .eq(track.demanded.iter().map(String::as_str));
            if !unchanged {
                remote_demand_changed |= track.origin.is_some();
                let active: Vec<String> = watched().map(|r| r.to_string()).collect();
                track.demanded = active.clone();
                events.push(SfuEvent::LayerDemand {
                    room: track.room.clone(),
                    participant: track.participant,
                    peer: track.peer,
                    track: *tid,
                    active,
                });
            }
        }
        for e in events {
            self.out.event(e);
        }
        if remote_demand_changed {
            self.mesh_demand_changed(now);
        }
        for (t, l) in switches {
            self.request_keyframe(now, t, l);
        }
    }

    /// Counts, per layer, the subscriptions (current and target layers)
    /// and downstream mesh links that watch it.
    fn count_layer_watchers(&mut self) {
        // Watchers per layer.
        for track in self.reg.tracks.values_mut() {
            for l in &mut track.layers {
                l.watchers = 0;
            }
        }
        for peer in self.peers.values() {
            match &peer.transport {
                Transport::WebRtc(w) => {
                    for s in &w.slots {
                        watch(&mut self.reg.tracks, s.track, s.current, s.target);
                    }
                }
                Transport::Rtp(e) => watch(&mut self.reg.tracks, e.track, e.current, e.target),
                Transport::Mesh(_) => {}
            }
        }
        // Downstream mesh links watch the layers they have not paused.
        for track in self.reg.tracks.values_mut() {
            for m in &track.mesh_out {
                for i in m.watched_layers() {
                    if let Some(l) = track.layers.get_mut(i) {
                        l.watchers += 1;
                    }
                }
            }
        }
    }

    pub(in crate::sfu) fn tick(&mut self, now: Instant) {
        for track in self.reg.tracks.values_mut() {
            for l in &mut track.layers {
                let bps = l.meter.bps(now);
                if bps > 0 {
                    l.bps = bps;
                }
            }
        }
        self.select_layers(now);
        // Let subscriber bandwidth estimation probe up to what the best layers
        // need. (No collected id list: a tick must not allocate.)
        for (&id, peer) in self.peers.iter_mut() {
            let Transport::WebRtc(w) = &mut peer.transport else {
                continue;
            };
            if !matches!(w.intent, OfferIntent::Subscribe { .. }) || !w.connected {
                continue;
            }
            let desired: u64 = w
                .slots
                .iter()
                .filter_map(|s| self.reg.tracks.get(&s.track?))
                .map(|t| t.layers.iter().map(|l| l.bps).max().unwrap_or(0))
                .sum();
            if desired > 0 {
                w.rtc
                    .bwe()
                    .set_bitrate(Bitrate::kbps(100), Bitrate::from(desired + desired / 4));
                if !w.drain(now, id, &mut peer.counters, &mut self.out, &mut self.index) {
                    w.closing = true;
                }
            }
        }
        self.mesh_tick(now);
        for (name, r) in self.reg.rooms.iter_mut() {
            if let Some((participant, level)) = r.speaker.tick() {
                self.out.event(SfuEvent::ActiveSpeaker {
                    room: name.clone(),
                    participant,
                    level,
                });
            }
        }
    }

    /// Removes a track: its subscribers lose it (and wait for another),
    /// its room forgets it.
    pub(in crate::sfu) fn unpublish_track(&mut self, tid: TrackId) {
        let Some(track) = self.reg.tracks.remove(&tid) else {
            return;
        };
        for sub in &track.subscribers {
            let Some(p) = self.peers.get_mut(sub) else {
                continue;
            };
            match &mut p.transport {
                Transport::WebRtc(w) => {
                    for s in w.slots.iter_mut().filter(|s| s.track == Some(tid)) {
                        s.track = None;
                        s.current = None;
                        s.target = None;
                    }
                }
                Transport::Rtp(e) => {
                    e.track = None;
                    e.current = None;
                    e.target = None;
                }
                Transport::Mesh(_) => {}
            }
        }
        if let Some(r) = self.reg.rooms.get_mut(&track.room) {
            r.tracks.retain(|t| *t != tid);
        }
        self.out.event(SfuEvent::TrackUnpublished {
            room: track.room.clone(),
            participant: track.participant,
            track: tid,
        });
    }
}

/// Counts a subscription to `track` as watching its current and target
/// layers.
fn watch(
    tracks: &mut HashMap<TrackId, Track>,
    track: Option<TrackId>,
    current: Option<usize>,
    target: Option<usize>,
) {
    if let Some(t) = track.and_then(|t| tracks.get_mut(&t)) {
        count_watchers(&mut t.layers, current, target);
    }
}
