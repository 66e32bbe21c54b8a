//! # ridge-sfu: the sans-IO core of the Ridge media relay
//!
//! [`Sfu`] owns rooms, participants, peers (WebRTC sessions through str0m,
//! and plain RTP endpoints), published tracks and subscriptions, and routes
//! RTP between them. It never touches a socket or a clock: every input
//! carries `now`, and output is pulled.
//!
//! ## Run loop
//!
//! ```text
//! loop {
//!     while let Some(out) = sfu.poll_output() {
//!         match out {
//!             // One datagram: `contents`, then the shared `payload` if any
//!             // (send both as two iovecs of one sendmsg; nothing is copied).
//!             Output::Transmit(t) => { sendmsg(t.destination, [&t.contents, t.payload]); sfu.recycle(t.contents) }
//!             Output::Event(e) => control_plane.publish(e),
//!             Output::MeshControl(m) => shards[m.shard].handle_mesh_control(..),
//!             // Media for an in-process subscriber, or a keyframe request
//!             // for an in-process publisher (see "Local endpoints").
//!             Output::Local(l) => local_consumer.take(l),
//!         }
//!     }
//!     wait for: datagrams (received into sfu.packet_pool() -> handle_packet),
//!               a control call, or sfu.poll_timeout() (-> handle_timeout)
//! }
//! ```
//!
//! Control calls ([`Sfu::join`], [`Sfu::accept_offer`], [`Sfu::add_rtp_endpoint`],
//! [`Sfu::add_local_endpoint`], [`Sfu::remove_peer`], [`Sfu::set_layer`], ...)
//! are plain methods on the same thread, so no lock is ever held across
//! packets. They fail with [`SfuError`], whose variants say whose fault it
//! was ([`SfuError::is_client_error`]); a request's own faults are typed
//! ([`SpecError`], [`SdpError`]).
//!
//! ## Local endpoints
//!
//! Besides WebRTC sessions and plain RTP endpoints, which the core reaches
//! through socket addresses, a room can have **local** endpoints: RTP
//! endpoints in the same process (a recorder, a mixer, a transcoder, a
//! synthetic source), with no socket and no address.
//!
//! ```text
//! let p = sfu.join("room", "recorder", true)?;
//! // A publisher of VP8 (the codec names the kind: video).
//! let cam = sfu.add_local_endpoint(now, p, LocalEndpointSpec {
//!     direction: RtpDirection::Publish, codec: CodecSpec::Vp8,
//!     payload_type: 96, ssrc: None, track: None })?;
//! let packet = sfu.packet_pool().copy_in(&rtp_bytes);   // or a pool slot filled in place
//! sfu.handle_local_rtp(now, cam.peer, packet)?;          // routed like a received datagram
//!
//! // A subscriber: its media comes out of poll_output.
//! let rec = sfu.add_local_endpoint(now, p, LocalEndpointSpec {
//!     direction: RtpDirection::Subscribe, codec: CodecSpec::Vp8,
//!     payload_type: 96, ssrc: None, track: None })?;
//! match sfu.poll_output() {
//!     Some(Output::Local(LocalOutput::Media(m))) => {
//!         // m.peer == rec.peer; m.header: its own continuous numbering;
//!         // m.payload: a view of the packet received, shared, not copied.
//!     }
//!     Some(Output::Local(LocalOutput::KeyframeRequest { peer })) => {
//!         // a subscriber of local publisher `peer` needs a keyframe
//!     }
//!     ...
//! }
//! sfu.request_local_keyframe(now, rec.peer)?;   // as a PLI would
//! sfu.handle_local_nack(now, rec.peer, &[seq])?; // resent from the retransmission buffer
//! ```
//!
//! A local endpoint is otherwise what a plain RTP endpoint is: its
//! publisher's track is offered to every subscriber of the room (WebRTC,
//! plain, local, mesh links), keyframe requests are throttled per layer,
//! and a local subscriber's layer is chosen as a plain subscriber's. A
//! local publisher's stream may change SSRC (a restarted source):
//! subscribers still see one continuous stream. In-process delivery has no
//! loss, so nothing is NACKed towards a local publisher.
//!
//! ## Codecs
//!
//! A track's codec is a [`CodecSpec`] (Opus and VP8 today), a field of the
//! endpoint specs ([`RtpEndpointSpec::codec`], [`LocalEndpointSpec::codec`])
//! and of [`TrackInfo`]: it gives the kind, the RTP clock and how a
//! keyframe is recognised (simulcast and source switches wait for one).
//!
//! ## Scalable video
//!
//! [`svc`] selects layers within one scalable stream (VP9/AV1 SVC, VP8
//! temporal layers): a per-subscriber [`svc::LayerSelector`] decides each
//! packet from the [`svc::LayerInfo`] a codec parser gives, and a dropped
//! packet is [skipped](StreamRewriter::skip) in the subscriber's rewriter
//! so the output has no gap. The forwarding path does not call it yet.
//!
//! ## Invariants
//!
//! * Nothing a network peer sends can panic the core: every parser returns
//!   errors, and malformed input is counted in [`StatsSnapshot::drops`].
//! * In steady state the plain-RTP path allocates nothing per packet:
//!   transmit buffers come from a pool refilled by [`Sfu::recycle`], and
//!   retransmission buffers reuse their slots. A received packet is stored
//!   once ([`BufPool`], [`PacketBuf`]); plain-RTP subscribers get a header of
//!   their own in front of the shared payload, never a copy. WebRTC legs
//!   share the received payload (`Arc<[u8]>`) among all subscribers.
//! * Simulcast switches happen on keyframes only, with sequence numbers and
//!   timestamps rewritten so each subscriber sees one continuous stream.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod buf;
mod error;
pub mod fec;
#[doc(hidden)]
pub mod fuzzing;
mod ids;
pub mod mesh;
mod meter;
pub mod packet;
pub mod red;
mod retransmit;
mod rewrite;
mod sfu;
mod speaker;
mod srtp;
pub mod svc;
mod types;

pub use buf::{BufPool, MAX_BATCH, PacketBuf, PoolStats, SLOT_SIZE};
pub use error::{SdpError, SfuError, SpecError};
pub use ids::{ParticipantId, PeerId, TrackId, shard_for_room, shard_of, shard_ufrag, ufrag_shard};
pub use mesh::{MeshConfig, MeshLinkSnapshot, MeshLinkSpec, MeshRecovery, MeshRouteSpec};
pub use retransmit::{RetransmitBuffer, Sent};
pub use rewrite::{Rewritten, SKIP_HISTORY, StreamRewriter};
pub use sfu::{
    Cidr, CidrError, MAX_ROOM_CODEC_POLICIES, Owner, QuotaConfig, QuotaLedger, QuotaLimit,
    QuotaLimits, ReapReason, SessionSlot, Sfu,
};
pub use srtp::{
    SIPHASH_KEY_LEN, SRTCP_TRAILER_LEN, SRTP_AUTH_TAG_LEN, SRTP_MAX_PACKET_LEN, SrtpContext,
    SrtpError, SrtpProfile, Unprotected, mesh_master_key, siphash_tag,
};
pub use types::{
    CodecSpec, Counters, DropReason, LayerSnapshot, LocalEndpointInfo, LocalEndpointSpec,
    LocalHeader, LocalMedia, LocalOutput, MeshControl, MeshFlow, MeshFlowProgress, OfferIntent,
    Output, PayloadInfo, PeerSnapshot, PlainFlow, PlainFlowDestination, RoomSnapshot, RoomState,
    RtpDirection, RtpEndpointInfo, RtpEndpointSpec, SfuConfig, SfuEvent, StatsSnapshot, TrackInfo,
    TrackKind, Trailer, Transmit,
};
