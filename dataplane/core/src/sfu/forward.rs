//! Fan-out: one publisher packet to every subscriber (and downstream mesh
//! link) that watches its layer, and keyframe requests travelling the
//! other way.

use std::sync::Arc;
use std::time::Instant;

use str0m::media::{KeyframeRequestKind, Mid};

use crate::buf::PacketBuf;
use crate::ids::{PeerId, TrackId};
use crate::packet::rtp::RtpHeader;
use crate::svc::LayerInfo;
use crate::types::{CodecSpec, DropReason, TrackKind};

use super::Sfu;
use super::peer::Transport;

/// A packet being routed from a publisher to its subscribers.
pub(super) struct Forward<'a> {
    pub(super) ssrc: u32,
    pub(super) seq: u16,
    pub(super) timestamp: u32,
    pub(super) marker: bool,
    pub(super) keyframe: bool,
    pub(super) payload: &'a [u8],
    pub(super) shared: Option<&'a Arc<[u8]>>,
    /// The payload as a stored packet view, when it came in as one.
    pub(super) stored: Option<PacketBuf>,
    pub(super) audio_level: Option<(bool, u8)>,
    /// Its place in a scalable stream (VP8 temporal, VP9 spatial and
    /// temporal layers), read once for every subscriber.
    pub(super) svc: Option<LayerInfo>,
}

impl<'a> Forward<'a> {
    /// A received RTP packet, its payload forwarded as a view of the stored
    /// datagram (never copied); `None` when the payload is malformed for
    /// its codec ([`CodecSpec::inspect`]).
    pub(in crate::sfu) fn from_stored(
        header: &RtpHeader,
        packet: &'a PacketBuf,
        codec: CodecSpec,
    ) -> Option<Self> {
        let data = packet.as_slice();
        let payload = header.payload(data);
        let start = payload.as_ptr() as usize - data.as_ptr() as usize;
        let info = codec.inspect(payload, header.marker).ok()?;
        Some(Forward {
            ssrc: header.ssrc,
            seq: header.sequence,
            timestamp: header.timestamp,
            marker: header.marker,
            keyframe: info.keyframe,
            payload,
            shared: None,
            stored: Some(packet.slice(start..start + payload.len())),
            audio_level: None,
            svc: info.layers,
        })
    }
}

impl Sfu {
    /// Sends one publisher packet to every subscriber of its track that
    /// watches this layer, rewriting sequence numbers and timestamps.
    pub(in crate::sfu) fn forward(
        &mut self,
        now: Instant,
        tid: TrackId,
        layer: usize,
        pkt: &Forward<'_>,
    ) {
        let Some(track) = self.reg.tracks.get_mut(&tid) else {
            return;
        };
        let kind = track.kind;
        let codec = track.codec;
        let format = track.format;
        {
            let layer_count = track.layers.len();
            let Some(l) = track.layers.get_mut(layer) else {
                return;
            };
            l.meter.record(now, pkt.payload.len());
            l.last_packet = Some(now);
            l.ssrc = Some(pkt.ssrc);
            if layer_count > 1 && l.watchers == 0 {
                self.out.drop_packet(DropReason::Paused);
                return;
            }
        }
        let mut shared: Option<Arc<[u8]>> = pkt.shared.cloned();
        let mut stored: Option<PacketBuf> = pkt.stored.clone();
        if !track.mesh_out.is_empty() {
            self.mesh
                .forward(&mut self.out, tid, track, now, layer, pkt, &mut stored);
        }
        let mut switched: Option<(TrackId, usize)> = None;
        for i in 0..track.subscribers.len() {
            let sub_id = track.subscribers[i];
            let Some(sub) = self.peers.get_mut(&sub_id) else {
                continue;
            };
            match &mut sub.transport {
                Transport::WebRtc(w) => {
                    let sent = w.send_media(
                        now,
                        sub_id,
                        (tid, layer, kind, codec, format.as_ref()),
                        pkt,
                        &mut shared,
                        &mut sub.counters,
                        &mut self.out,
                        &mut self.index,
                    );
                    if !sent {
                        switched = Some((tid, layer));
                    }
                }
                Transport::Rtp(e) => {
                    // A payload that did not arrive as a stored packet (from
                    // a WebRTC publisher) is stored once, on first use.
                    let sent = e.send_media(
                        now,
                        layer,
                        kind,
                        pkt,
                        &mut stored,
                        &mut sub.counters,
                        &mut self.out,
                    );
                    if !sent {
                        switched = Some((tid, layer));
                    }
                }
                Transport::Mesh(_) => {}
            }
        }
        // A subscriber is waiting for a keyframe on this layer: ask again
        // (throttled) until it comes, since a request can be lost or ignored.
        if let Some((t, l)) = switched {
            self.request_keyframe(now, t, l);
        }
    }

    /// A subscriber asked for a keyframe: pass it to the publisher of the
    /// layer it watches, throttled.
    pub(in crate::sfu) fn on_subscriber_keyframe_request(
        &mut self,
        now: Instant,
        id: PeerId,
        mid: Mid,
    ) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.counters.keyframe_requests_received += 1;
        self.out.counters.keyframe_requests_received += 1;
        let Transport::WebRtc(w) = &peer.transport else {
            return;
        };
        let Some(slot) = w.slots.iter().find(|s| s.mid == mid) else {
            return;
        };
        if let (Some(t), Some(l)) = (slot.track, slot.current.or(slot.target)) {
            self.request_keyframe(now, t, l);
        }
    }

    pub(in crate::sfu) fn request_keyframe(&mut self, now: Instant, tid: TrackId, layer: usize) {
        let Some(track) = self.reg.tracks.get_mut(&tid) else {
            return;
        };
        if track.kind != TrackKind::Video {
            return;
        }
        let Some(l) = track.layers.get_mut(layer) else {
            return;
        };
        if l.last_keyframe_request.is_some_and(|t| {
            now.saturating_duration_since(t) < self.config.keyframe_request_interval
        }) {
            self.out.counters.keyframe_requests_throttled += 1;
            return;
        }
        l.last_keyframe_request = Some(now);
        let rid = l.rid;
        let ssrc = l.ssrc;
        let Some(publisher) = self.peers.get_mut(&track.peer) else {
            return;
        };
        publisher.counters.keyframe_requests_forwarded += 1;
        self.out.counters.keyframe_requests_forwarded += 1;
        match &mut publisher.transport {
            Transport::WebRtc(w) => {
                let Some(mid) = track.mid else { return };
                // The layer's SSRC is the reliable key (str0m's mid/rid index
                // does not always hold simulcast layers); mid/rid is the
                // fallback before the layer's first packet.
                let mut api = w.rtc.direct_api();
                let by_ssrc = ssrc.is_some_and(|s| api.stream_rx(&s.into()).is_some());
                let rx = if by_ssrc {
                    ssrc.and_then(|s| api.stream_rx(&s.into()))
                } else {
                    api.stream_rx_by_mid(mid, rid)
                };
                if let Some(rx) = rx {
                    rx.request_keyframe(KeyframeRequestKind::Pli);
                }
                if !w.drain(
                    now,
                    track.peer,
                    &mut publisher.counters,
                    &mut self.out,
                    &mut self.index,
                ) {
                    w.closing = true;
                }
            }
            Transport::Rtp(e) => {
                e.request_keyframe(&mut publisher.counters, &mut self.out, self.rtcp_ssrc);
            }
            Transport::Mesh(m) => {
                let (room, source) = (track.room.clone(), m.source_node().to_owned());
                self.mesh_keyframe_request(&room, &source, ssrc);
            }
        }
    }
}
