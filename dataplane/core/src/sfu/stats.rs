//! Statistics and diagnostics views of the core.

use std::collections::HashMap;

use crate::ids::PeerId;
use crate::types::{LayerSnapshot, PeerSnapshot, RoomSnapshot, StatsSnapshot, TrackKind};

use super::Sfu;
use super::peer::Transport;

impl Sfu {
    /// A snapshot of every counter, room, session, layer and mesh link.
    pub fn stats(&self) -> StatsSnapshot {
        let mut rooms: HashMap<&str, RoomSnapshot> = self
            .reg
            .rooms
            .iter()
            .map(|(name, r)| {
                (
                    name.as_str(),
                    RoomSnapshot {
                        room: name.clone(),
                        participants: r.participants.len(),
                        tracks: r
                            .tracks
                            .iter()
                            .filter(|t| self.reg.tracks.get(t).is_some_and(|t| t.origin.is_none()))
                            .count(),
                        remote_participants: 0,
                        remote_tracks: r
                            .tracks
                            .iter()
                            .filter(|t| self.reg.tracks.get(t).is_some_and(|t| t.origin.is_some()))
                            .count(),
                        counters: r.retired,
                    },
                )
            })
            .collect();
        let mut peers = Vec::with_capacity(self.peers.len());
        for (id, p) in &self.peers {
            if let Some(r) = rooms.get_mut(p.room.as_str()) {
                r.counters.add(&p.counters);
            }
            let (transport, bwe, connected) = match &p.transport {
                Transport::WebRtc(w) => ("webrtc", w.bwe_bps, w.connected),
                Transport::Rtp(e) if e.remote().is_none() => ("local", None, true),
                Transport::Rtp(_) => ("rtp", None, true),
                Transport::Mesh(_) => {
                    if let Some(r) = rooms.get_mut(p.room.as_str()) {
                        r.participants = r.participants.saturating_sub(1);
                        r.remote_participants += 1;
                    }
                    continue;
                }
            };
            peers.push(PeerSnapshot {
                peer: *id,
                room: p.room.clone(),
                participant: p.participant,
                identity: self
                    .reg
                    .participants
                    .get(&p.participant)
                    .map(|x| x.identity.clone())
                    .unwrap_or_default(),
                transport,
                counters: p.counters,
                loss: p.loss,
                rtt: p.rtt,
                bwe_bps: bwe,
                connected,
                created: p.created,
            });
        }
        StatsSnapshot {
            counters: self.out.counters,
            drops: self.out.drops,
            sessions_created: self.sessions_created,
            sessions_closed: self.sessions_closed,
            sessions_reaped: self.consent.reaped,
            quota_refusals: self.quota.refusals,
            rooms: rooms.into_values().collect(),
            peers,
            layers: self
                .reg
                .tracks
                .iter()
                .filter(|(_, t)| t.kind == TrackKind::Video)
                .flat_map(|(id, t)| {
                    t.layers.iter().map(move |l| LayerSnapshot {
                        room: t.room.clone(),
                        track: *id,
                        rid: l.rid.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                        bps: l.bps,
                        watchers: l.watchers,
                    })
                })
                .collect(),
            mesh_links: self.mesh_links(),
        }
    }

    /// Test and diagnostics view: the layer a subscriber currently receives.
    pub fn current_layer(&self, peer: PeerId) -> Option<Option<String>> {
        let p = self.peers.get(&peer)?;
        let (track, current) = match &p.transport {
            Transport::WebRtc(w) => {
                let s = w
                    .slots
                    .iter()
                    .find(|s| s.kind == TrackKind::Video && s.track.is_some())?;
                (s.track?, s.current?)
            }
            Transport::Rtp(e) => (e.track?, e.current?),
            Transport::Mesh(_) => return None,
        };
        let layer = self.reg.tracks.get(&track)?.layers.get(current)?;
        Some(layer.rid.as_ref().map(|r| r.to_string()))
    }
}
