//! Scalable streams on the forwarding path: one subscriber's
//! [`LayerSelector`] for one track, fed in packet order, and the pin that
//! sets its target.
//!
//! A stream goes through it while the subscriber pins layers; without a
//! pin every layer is sent as it came (markers included), so an unpinned
//! subscriber costs nothing more than before. VP8 (temporal layers) and
//! VP9 (spatial and temporal layers) say where each packet sits; other
//! codecs (H.264, AV1 without its dependency descriptor) pass untouched.
//! Choosing the layers from the bandwidth estimate is not built yet: only
//! explicit pins select.

use crate::error::{SfuError, SpecError};
use crate::ids::PeerId;
use crate::svc::{LayerInfo, LayerSelector, Layers, Verdict};
use crate::types::{OfferIntent, RtpDirection, TrackKind};

use super::Sfu;
use super::peer::Transport;

/// What the selector says of one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Not a scalable packet (or not selected for): send as it is.
    Pass,
    /// Send it, with this RTP marker.
    Forward {
        /// The marker bit of the copy sent.
        marker: bool,
    },
    /// Do not send it (skip it in the rewriter).
    Drop,
}

/// One subscriber's selection within one scalable track.
#[derive(Debug, Clone, Default)]
pub(super) struct Scalable {
    selector: LayerSelector,
    /// The subscriber's explicit target; `None`: every layer.
    pinned: Option<Layers>,
    /// The source and newest sequence number decided.
    last: Option<(u32, u16)>,
    /// The selector wants a keyframe from the publisher.
    keyframe: bool,
}

impl Scalable {
    /// Pins (or, `None`, unpins) the layers this subscriber receives.
    pub(super) fn pin(&mut self, layers: Option<Layers>) {
        self.pinned = layers;
        self.selector.set_target(layers.unwrap_or(Layers::ALL));
    }

    /// The pinned layers.
    pub(super) fn pinned(&self) -> Option<Layers> {
        self.pinned
    }

    /// Decides one packet of source `ssrc`.
    pub(super) fn decide(&mut self, ssrc: u32, seq: u16, info: Option<&LayerInfo>) -> Decision {
        let Some(info) = info else {
            return Decision::Pass;
        };
        if self.pinned.is_none() {
            self.last = None;
            return Decision::Pass;
        }
        // Another source (a simulcast switch, a publisher that came back):
        // its layers start afresh at its keyframe.
        if self.last.is_some_and(|(s, _)| s != ssrc) {
            self.selector = LayerSelector::new();
            self.selector.set_target(self.pinned.unwrap_or(Layers::ALL));
            self.last = None;
        }
        let newer = self.last.is_none_or(|(_, l)| {
            let d = seq.wrapping_sub(l);
            d != 0 && d < 0x8000
        });
        let verdict = if newer {
            if self.last.is_some_and(|(_, l)| seq.wrapping_sub(l) > 1) {
                self.selector.note_loss();
            }
            self.last = Some((ssrc, seq));
            self.selector.select(info)
        } else {
            self.selector.select_late(info)
        };
        self.keyframe |= self.selector.take_keyframe_request();
        match verdict {
            Verdict::Forward { .. } => Decision::Forward {
                marker: verdict.marker(),
            },
            Verdict::Drop => Decision::Drop,
        }
    }

    /// Takes the selector's keyframe request: true once per request.
    pub(super) fn take_keyframe_request(&mut self) -> bool {
        std::mem::take(&mut self.keyframe)
    }
}

impl Sfu {
    /// Pins the spatial and temporal layers a subscriber receives of its
    /// scalable video (VP9 SVC, VP8 temporal layers): each `None` is every
    /// layer; both `None` unpins. Applies to every video track the
    /// subscriber receives, from the next frame or switch point on (SVC
    /// rules: `svc` module docs). A WebRTC or plain-RTP subscriber only.
    pub fn set_svc_layers(
        &mut self,
        peer: PeerId,
        spatial: Option<u8>,
        temporal: Option<u8>,
    ) -> Result<(), SfuError> {
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(SfuError::NoSuchPeer(peer))?;
        let layers = (spatial.is_some() || temporal.is_some()).then(|| Layers {
            spatial: spatial.unwrap_or(u8::MAX),
            temporal: temporal.unwrap_or(u8::MAX),
        });
        match &mut p.transport {
            Transport::WebRtc(w) if matches!(w.intent, OfferIntent::Subscribe { .. }) => {
                for slot in w.slots.iter_mut().filter(|s| s.kind == TrackKind::Video) {
                    slot.svc.pin(layers);
                }
            }
            Transport::Rtp(e)
                if e.direction == RtpDirection::Subscribe && e.kind == TrackKind::Video =>
            {
                e.svc.pin(layers);
            }
            _ => return Err(SpecError::NotLayered.into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(temporal: u8, start: bool, end: bool, keyframe: bool) -> LayerInfo {
        LayerInfo {
            temporal,
            start_of_frame: start,
            end_of_frame: end,
            keyframe,
            temporal_switch: true,
            ..LayerInfo::default()
        }
    }

    #[test]
    fn an_unpinned_subscriber_passes_everything_untouched() {
        let mut s = Scalable::default();
        for seq in 0..10 {
            let i = info((seq % 3) as u8, true, true, seq == 0);
            assert_eq!(s.decide(1, seq, Some(&i)), Decision::Pass);
        }
        assert_eq!(s.decide(1, 10, None), Decision::Pass, "no layer info");
    }

    #[test]
    fn a_temporal_pin_drops_the_upper_layers_from_a_keyframe_on() {
        let mut s = Scalable::default();
        s.pin(Some(Layers {
            spatial: u8::MAX,
            temporal: 0,
        }));
        // T pattern 0,2,1,2 per frame, one packet each, keyframe first.
        let tids = [0u8, 2, 1, 2, 0, 2, 1, 2];
        let got: Vec<Decision> = tids
            .iter()
            .enumerate()
            .map(|(i, &t)| s.decide(7, i as u16, Some(&info(t, true, true, i == 0))))
            .collect();
        let forwarded = got
            .iter()
            .filter(|d| matches!(d, Decision::Forward { marker: true }))
            .count();
        assert_eq!(forwarded, 2, "a quarter of the frames: {got:?}");
        // A new source starts afresh: nothing before its keyframe.
        assert_eq!(
            s.decide(8, 100, Some(&info(0, true, true, false))),
            Decision::Drop
        );
        assert!(s.take_keyframe_request(), "and asks for one");
    }
}
