//! Layer selection within one scalable (SVC) video stream: which packets
//! of a VP9 or AV1 stream with spatial and temporal layers (or of a VP8
//! stream with temporal layers) one subscriber receives.
//!
//! Simulcast, where each layer is a stream of its own, is chosen per
//! packet by the SFU's `admit` and per tick by `choose_layer`; this module
//! is the same idea inside one stream, where every layer shares one SSRC
//! and one sequence space. It is codec-agnostic and sans-IO: a codec
//! parser describes each packet as a [`LayerInfo`], a [`LayerSelector`]
//! (one per subscriber and track) answers [`Verdict::Forward`] or
//! [`Verdict::Drop`], and reads no clock and allocates nothing. The
//! subscriber's [`StreamRewriter`](crate::StreamRewriter) then rewrites a
//! forwarded packet and [skips](crate::StreamRewriter::skip) a dropped one,
//! so the receiver sees one stream without gaps:
//!
//! ```
//! use ridge_sfu::StreamRewriter;
//! use ridge_sfu::svc::{LayerInfo, LayerSelector, Layers, Verdict};
//! # let now = std::time::Instant::now();
//! let mut selector = LayerSelector::new();
//! let mut rewriter = StreamRewriter::new(90_000, 1000);
//! selector.set_target(Layers { spatial: 0, temporal: 1 });
//! let info = LayerInfo {
//!     start_of_frame: true,
//!     end_of_frame: true,
//!     keyframe: true,
//!     ..LayerInfo::default()
//! };
//! let (ssrc, seq, timestamp) = (0x1234, 7, 3000);
//! match selector.select(&info) {
//!     Verdict::Forward { end_of_frame_for_target: marker } => {
//!         let out = rewriter.rewrite(now, ssrc, seq, timestamp);
//!         assert_eq!(out.map(|o| o.seq), Some(1000));
//!         assert!(marker); // set the RTP marker bit of the copy sent
//!     }
//!     Verdict::Drop => rewriter.skip(ssrc, seq),
//! }
//! if selector.take_keyframe_request() {
//!     // ask the publisher for a keyframe (a PLI), throttled per layer
//! }
//! ```
//!
//! ## Rules
//!
//! These are the rules LiveKit, mediasoup and Jitsi follow, in one place:
//!
//! * **Nothing before the first keyframe.** Until a keyframe starts (its
//!   first packet at spatial layer 0, with `start_of_frame`) every packet
//!   is dropped, and a keyframe is wanted from the first picture start on. The keyframe sets the current
//!   layers to the target (every reference is fresh after it).
//! * **Filter.** A packet is forwarded only if its spatial layer ≤ the
//!   current spatial layer and its temporal layer ≤ the current temporal
//!   layer.
//! * **Decisions at frame starts, never inside a frame.** A *picture* (all
//!   the layer frames of one instant) starts at a packet with
//!   `start_of_frame` whose spatial layer is not above the spatial layer of
//!   the previous frame start seen (spatial layer 0 normally; a higher one
//!   when the lower ones were lost). [`LayerSelector::set_target`] only
//!   records the target; it takes effect at these points, so a target
//!   changed in the middle of a frame or picture never splits it.
//! * **Down at the next picture start.** Spatial and temporal layers above
//!   the target stop at the next picture start (lower layers' references
//!   are intact, so no keyframe is needed, also in K-SVC).
//! * **Temporal up at a switch point.** The temporal layer rises only at a
//!   picture start whose packet has `temporal_switch` (VP9 U, VP8 Y, an AV1
//!   switch indication), to that packet's temporal layer (at most the
//!   target).
//! * **Spatial up at a keyframe or a switch point.** The spatial layer
//!   rises at a keyframe (to the target), or by one layer at the start of a
//!   frame with `spatial_switch` of the next layer up (towards the target,
//!   one step per switch point), when the current layer's frame of the same
//!   picture was forwarded. When no such point
//!   comes within [`KEYFRAME_WAIT_PICTURES`] pictures a keyframe is wanted,
//!   and again every [`KEYFRAME_RETRY_PICTURES`] pictures while the switch
//!   waits.
//! * **Marker.** [`Verdict::Forward::end_of_frame_for_target`] is set on
//!   the packet with `end_of_frame` of the highest spatial layer forwarded:
//!   its spatial layer is the current one, or it is the highest layer of
//!   the stream as announced by `spatial_layers`. The caller sets the RTP
//!   marker bit from it (for VP9 and AV1 the marker means end of picture).
//! * **Loss.** [`LayerSelector::note_loss`] reports a gap. A switch whose
//!   first picture has not ended yet (the packet with the marker not
//!   forwarded) is undone, since the receiver lacks part of the new layer's
//!   first frame. After a keyframe, the spatial layer falls to the highest
//!   one whose frame of the key picture was forwarded whole (none: back to
//!   waiting for a keyframe), and a keyframe is wanted. After a switch
//!   point, the layers fall back to those before it (and a keyframe is
//!   wanted when the spatial layer had risen). The rest of that picture
//!   above the layers kept is dropped. A gap inside a
//!   forwarded frame of temporal layer 0 breaks the current layers'
//!   references: a keyframe is wanted. Other gaps are left to the
//!   receiver's own NACKs and keyframe requests (the rewriter keeps them
//!   visible to it).
//!
//! Packets are decided in order: [`LayerSelector::select`] takes each
//! packet newer than all before it, [`LayerSelector::select_late`] a
//! reordered or retransmitted one (by the current layers, switching
//! nothing).
//!
//! Limits, as the per-packet information allows: the spatial layers
//! present are those announced by `spatial_layers` (a VP9 scalability
//! structure, an AV1 dependency descriptor's template structure), or else
//! every layer seen so far; a picture that lacks the current spatial layer
//! (a layer at a lower frame rate) has no marker; in the rare up-switch at
//! a switch point in the middle of a picture, the lower layer's end of
//! that picture was already sent with the marker, so that one picture has
//! two.

#[cfg(test)]
mod tests;

/// Pictures a spatial up-switch waits for a switch point before it wants a
/// keyframe.
pub const KEYFRAME_WAIT_PICTURES: u32 = 2;

/// Pictures between repeated keyframe requests while a keyframe is still
/// needed (the first keyframe, or a spatial up-switch).
pub const KEYFRAME_RETRY_PICTURES: u32 = 30;

/// What a codec parser knows of one packet's place in a scalable stream.
/// A stream without scalability is spatial and temporal layer 0 throughout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerInfo {
    /// Spatial layer (VP9 SID, AV1 spatial id), 0 without spatial layers.
    pub spatial: u8,
    /// Temporal layer (VP9 TID, VP8 TID, AV1 temporal id).
    pub temporal: u8,
    /// The first packet of a frame of this layer (VP9 B, VP8 S with
    /// partition 0, AV1 DD start of frame).
    pub start_of_frame: bool,
    /// The last packet of a frame of this layer (VP9 E, AV1 DD end of
    /// frame, the RTP marker without spatial layers).
    pub end_of_frame: bool,
    /// Part of a keyframe: decoding can start at the keyframe's first packet
    /// at spatial layer 0.
    pub keyframe: bool,
    /// A point where a receiver may move up to this spatial layer (VP9
    /// non-inter-layer-predicted start, AV1 DD switch DTI).
    pub spatial_switch: bool,
    /// A point where a receiver may move up to this temporal layer (VP9 U
    /// bit, VP8 Y bit, AV1 DD switch).
    pub temporal_switch: bool,
    /// How many spatial layers the stream has, from a VP9 scalability
    /// structure or an AV1 dependency descriptor structure when the packet
    /// carries one.
    pub spatial_layers: Option<u8>,
}

impl LayerInfo {
    /// The layer description of a VP8 packet (RFC 7741) of `payload`,
    /// whose descriptor is `d`: temporal layer from its TID (0 without
    /// one), a switch point at Y=1, the start of a frame at S=1 with
    /// partition 0, its end at the RTP `marker`.
    pub fn from_vp8(
        d: &crate::packet::codec::Vp8Descriptor,
        payload: &[u8],
        marker: bool,
    ) -> LayerInfo {
        LayerInfo {
            spatial: 0,
            temporal: d.tid.unwrap_or(0),
            start_of_frame: d.starts_frame,
            end_of_frame: marker,
            keyframe: d.is_keyframe(payload),
            spatial_switch: false,
            temporal_switch: d.tid.is_none() || d.layer_sync,
            spatial_layers: None,
        }
    }

    /// The layer description of a VP9 packet (RFC 9628) with descriptor
    /// `d`: spatial and temporal layer from its layer indices (0 without
    /// them), frame start and end from B and E, a temporal switch point at
    /// U=1, a spatial one at the start of a frame predicted from no earlier
    /// picture (P=0: it may use the layer below, which the receiver has),
    /// and the layer count of a scalability structure.
    pub fn from_vp9(d: &crate::packet::codec::Vp9Descriptor) -> LayerInfo {
        let layer = d.layer.unwrap_or_default();
        LayerInfo {
            spatial: layer.sid,
            temporal: layer.tid,
            start_of_frame: d.start_of_frame,
            end_of_frame: d.end_of_frame,
            keyframe: d.is_keyframe(),
            spatial_switch: d.start_of_frame && !d.inter_picture_predicted,
            temporal_switch: d.layer.is_none() || layer.switching_up,
            spatial_layers: d.ss.and_then(|ss| u8::try_from(ss.spatial_layers()).ok()),
        }
    }
}

/// A spatial and temporal layer pair: a subscriber's target, or the layers
/// it currently receives (each layer with every layer below it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layers {
    /// Highest spatial layer.
    pub spatial: u8,
    /// Highest temporal layer.
    pub temporal: u8,
}

impl Layers {
    /// Every layer the stream has (the default target).
    pub const ALL: Layers = Layers {
        spatial: u8::MAX,
        temporal: u8::MAX,
    };

    /// Only the base layer.
    pub const BASE: Layers = Layers {
        spatial: 0,
        temporal: 0,
    };
}

impl Default for Layers {
    fn default() -> Self {
        Layers::ALL
    }
}

/// What to do with one packet, from [`LayerSelector::select`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it (rewritten by the subscriber's stream rewriter).
    Forward {
        /// Set the RTP marker: the last packet of the highest layer sent
        /// for this picture.
        end_of_frame_for_target: bool,
    },
    /// Leave it out (and skip it in the subscriber's stream rewriter).
    Drop,
}

impl Verdict {
    /// Whether the packet is forwarded.
    pub fn is_forward(self) -> bool {
        matches!(self, Verdict::Forward { .. })
    }

    /// Whether the forwarded copy carries the RTP marker (false for a drop).
    pub fn marker(self) -> bool {
        matches!(
            self,
            Verdict::Forward {
                end_of_frame_for_target: true
            }
        )
    }
}

/// A switch whose first picture has not ended yet: undone on a loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unsettled {
    /// Started at a keyframe.
    Keyframe,
    /// Rose at a switch point, from these layers.
    Switch { from: Layers },
}

/// One subscriber's layer state for one scalable track. See the module
/// docs for the rules.
#[derive(Debug, Clone)]
pub struct LayerSelector {
    target: Layers,
    /// `None` until the first keyframe.
    current: Option<Layers>,
    unsettled: Option<Unsettled>,
    keyframe_wanted: bool,
    /// Picture starts seen while a keyframe or a spatial switch point is
    /// awaited.
    waited: u32,
    /// Spatial layer of the last frame start seen (forwarded or not).
    last_frame_spatial: Option<u8>,
    /// The stream's spatial layer count, when announced.
    spatial_layers: Option<u8>,
    /// Highest spatial layer seen in the stream.
    seen_spatial: u8,
    /// Highest spatial layer whose frame start was forwarded in this picture.
    picture_top: Option<u8>,
    /// Temporal layer of the forwarded frame in progress (start forwarded,
    /// end not yet).
    open_frame: Option<u8>,
}

impl Default for LayerSelector {
    fn default() -> Self {
        LayerSelector::new()
    }
}

impl LayerSelector {
    /// A selector that waits for a keyframe, with every layer as its target.
    pub fn new() -> Self {
        LayerSelector {
            target: Layers::ALL,
            current: None,
            unsettled: None,
            keyframe_wanted: false,
            waited: 0,
            last_frame_spatial: None,
            spatial_layers: None,
            seen_spatial: 0,
            picture_top: None,
            open_frame: None,
        }
    }

    /// Sets the layers to aim for (from the bandwidth estimate, or a pin).
    /// It takes effect at the next frame or picture start, or switch point.
    pub fn set_target(&mut self, target: Layers) {
        self.target = target;
    }

    /// The layers aimed for.
    pub fn target(&self) -> Layers {
        self.target
    }

    /// The layers forwarded now; `None` before the first keyframe. Its
    /// spatial layer is never above the stream's highest layer (as
    /// announced, or seen); its temporal layer may be [`u8::MAX`] for
    /// "every temporal layer" when that is the target.
    pub fn current(&self) -> Option<Layers> {
        self.current
    }

    /// Whether a keyframe is wanted from the publisher (kept until taken).
    pub fn wants_keyframe(&self) -> bool {
        self.keyframe_wanted
    }

    /// Takes the keyframe request: true once per request.
    pub fn take_keyframe_request(&mut self) -> bool {
        std::mem::take(&mut self.keyframe_wanted)
    }

    /// Decides one packet, newer than every packet decided before (a late
    /// one goes to [`Self::select_late`]). Call [`Self::note_loss`] first
    /// when this packet reveals a gap before it.
    pub fn select(&mut self, info: &LayerInfo) -> Verdict {
        if let Some(n) = info.spatial_layers.filter(|&n| n > 0) {
            self.spatial_layers = Some(n);
        }
        self.seen_spatial = self.seen_spatial.max(info.spatial);
        let picture_start =
            info.start_of_frame && self.last_frame_spatial.is_none_or(|s| info.spatial <= s);
        if info.start_of_frame {
            self.last_frame_spatial = Some(info.spatial);
        }
        if picture_start {
            self.start_picture();
        }
        let top = self.top();
        let keyframe = info.keyframe && info.start_of_frame && info.spatial == 0;
        if keyframe {
            self.current = Some(Layers {
                spatial: top,
                temporal: self.target.temporal,
            });
            self.unsettled = Some(Unsettled::Keyframe);
            self.keyframe_wanted = false;
            self.waited = 0;
        }
        let Some(mut cur) = self.current else {
            return Verdict::Drop;
        };
        if picture_start && !keyframe {
            cur.spatial = cur.spatial.min(top);
            cur.temporal = cur.temporal.min(self.target.temporal);
            if info.temporal_switch
                && info.temporal > cur.temporal
                && info.temporal <= self.target.temporal
            {
                self.begin_switch(cur);
                cur.temporal = info.temporal;
            }
        }
        if info.start_of_frame
            && info.spatial_switch
            && !keyframe
            && cur.spatial < top
            && info.spatial == cur.spatial.saturating_add(1)
            && info.temporal <= cur.temporal
            && self.picture_top == Some(cur.spatial)
        {
            self.begin_switch(cur);
            cur.spatial = info.spatial;
        }
        self.current = Some(cur);
        if info.spatial > cur.spatial || info.temporal > cur.temporal {
            return Verdict::Drop;
        }
        if info.start_of_frame {
            self.open_frame = Some(info.temporal);
            self.picture_top = Some(
                self.picture_top
                    .map_or(info.spatial, |t| t.max(info.spatial)),
            );
        }
        let marker = self.ends_picture(info, cur);
        if info.end_of_frame {
            self.open_frame = None;
        }
        if marker {
            self.unsettled = None;
        }
        Verdict::Forward {
            end_of_frame_for_target: marker,
        }
    }

    /// Decides a packet older than the newest one given to [`Self::select`]
    /// (reordered, or retransmitted by the publisher), by the current
    /// layers alone: it changes nothing, since a late frame start is no
    /// point to switch at (a late keyframe start would otherwise restart
    /// the stream). A late copy of a dropped packet is also dropped by the
    /// rewriter, whatever this says.
    pub fn select_late(&self, info: &LayerInfo) -> Verdict {
        let Some(cur) = self.current else {
            return Verdict::Drop;
        };
        if info.spatial > cur.spatial || info.temporal > cur.temporal {
            return Verdict::Drop;
        }
        Verdict::Forward {
            end_of_frame_for_target: self.ends_picture(info, cur),
        }
    }

    /// Reports a gap in the packets of this track before the next one to
    /// [`Self::select`] (lost and not recovered, as the caller judges it).
    /// Undoes a switch in progress and wants a keyframe when a reference of
    /// the layers forwarded is broken (see the module docs).
    pub fn note_loss(&mut self) {
        let Some(cur) = self.current else {
            return;
        };
        match self.unsettled.take() {
            Some(Unsettled::Keyframe) => {
                // Packets come in order, so the layer frames of the key
                // picture below the one the gap interrupted are whole.
                let whole = match (self.picture_top, self.open_frame) {
                    (Some(top), None) => Some(top),
                    (Some(top), Some(_)) => top.checked_sub(1),
                    (None, _) => None,
                };
                self.current = whole.map(|spatial| Layers {
                    spatial: spatial.min(cur.spatial),
                    temporal: cur.temporal,
                });
                self.keyframe_wanted = true;
                self.waited = 0;
            }
            Some(Unsettled::Switch { from }) => {
                if from.spatial < cur.spatial {
                    self.keyframe_wanted = true;
                }
                self.current = Some(from);
            }
            None => {
                if self.open_frame == Some(0) {
                    self.keyframe_wanted = true;
                }
            }
        }
        self.open_frame = None;
        // The picture is incomplete: no spatial switch point within it.
        self.picture_top = None;
    }

    /// Whether a forwarded packet is the last of its picture to be sent:
    /// the end of a frame of the current spatial layer, or of the stream's
    /// highest one.
    fn ends_picture(&self, info: &LayerInfo, cur: Layers) -> bool {
        info.end_of_frame
            && (info.spatial == cur.spatial
                || self
                    .spatial_layers
                    .is_some_and(|n| u16::from(info.spatial) + 1 >= u16::from(n)))
    }

    /// The highest spatial layer to forward: the target's, at most the
    /// stream's highest.
    fn top(&self) -> u8 {
        let highest = self
            .spatial_layers
            .map_or(self.seen_spatial, |n| n.saturating_sub(1));
        self.target.spatial.min(highest)
    }

    /// Remembers the layers before the first up-switch of this picture.
    fn begin_switch(&mut self, from: Layers) {
        if self.unsettled.is_none() {
            self.unsettled = Some(Unsettled::Switch { from });
        }
    }

    /// A new picture: the previous one ended without a loss report, and a
    /// keyframe is wanted when one has been awaited long enough.
    fn start_picture(&mut self) {
        self.unsettled = None;
        self.picture_top = None;
        self.open_frame = None;
        let first_after = match self.current {
            None => Some(0),
            Some(cur) if cur.spatial < self.top() => Some(KEYFRAME_WAIT_PICTURES),
            Some(_) => None,
        };
        let Some(first) = first_after else {
            self.waited = 0;
            return;
        };
        if self.waited >= first && (self.waited - first).is_multiple_of(KEYFRAME_RETRY_PICTURES) {
            self.keyframe_wanted = true;
        }
        self.waited = self.waited.saturating_add(1);
    }
}
