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
//!         }
//!     }
//!     wait for: datagrams (received into sfu.packet_pool() -> handle_packet),
//!               a control call, or sfu.poll_timeout() (-> handle_timeout)
//! }
//! ```
//!
//! Control calls ([`Sfu::join`], [`Sfu::accept_offer`], [`Sfu::add_rtp_endpoint`],
//! [`Sfu::remove_peer`], [`Sfu::set_layer`], ...) are plain methods on the same
//! thread, so no lock is ever held across packets.
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
mod types;

pub use buf::{BufPool, MAX_BATCH, PacketBuf, PoolStats, SLOT_SIZE};
pub use error::{SdpError, SfuError, SpecError};
pub use ids::{ParticipantId, PeerId, TrackId, shard_for_room, shard_of, shard_ufrag, ufrag_shard};
pub use mesh::{MeshConfig, MeshLinkSnapshot, MeshLinkSpec, MeshRecovery, MeshRouteSpec};
pub use retransmit::{RetransmitBuffer, Sent};
pub use rewrite::{Rewritten, StreamRewriter};
pub use sfu::{
    Cidr, CidrError, Owner, QuotaConfig, QuotaLedger, QuotaLimit, QuotaLimits, ReapReason,
    SessionSlot, Sfu,
};
pub use srtp::{
    SIPHASH_KEY_LEN, SRTCP_TRAILER_LEN, SRTP_AUTH_TAG_LEN, SRTP_MAX_PACKET_LEN, SrtpContext,
    SrtpError, SrtpProfile, Unprotected, mesh_master_key, siphash_tag,
};
pub use types::{
    Counters, DropReason, LayerSnapshot, MeshControl, MeshFlow, MeshFlowProgress, OfferIntent,
    Output, PeerSnapshot, PlainFlow, PlainFlowDestination, RoomSnapshot, RoomState, RtpDirection,
    RtpEndpointInfo, RtpEndpointSpec, SfuConfig, SfuEvent, StatsSnapshot, TrackInfo, TrackKind,
    Trailer, Transmit,
};
