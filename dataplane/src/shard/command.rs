//! What travels down a shard's command queue: control calls from the
//! [`MediaHandle`](super::handle::MediaHandle), and mesh control messages
//! from the other shards.

use std::time::Instant;

use ridge_sfu::{
    LocalEndpointInfo, LocalEndpointSpec, LocalOutput, MeshControl, PacketBuf, PeerId, Sfu,
    SfuError,
};
use tokio::sync::{mpsc, oneshot};

/// A control call: runs once on the shard's thread, with its core and the
/// time the shard took the call. It sends its own result back (see
/// `MediaHandle::on_shard`).
pub(super) type Call = Box<dyn FnOnce(&mut Sfu, Instant) + Send>;

pub(super) enum Command {
    Call(Call),
    /// A mesh control message another shard received for a room of this
    /// one. Not a [`Call`]: it is sent from a shard thread, in the middle of
    /// its flush, where boxing a closure would be a heap allocation on the
    /// packet path (which `ridge_shard_allocations` shows to be 0), and
    /// with `try_send`, since a shard never waits on another's queue.
    MeshControl(MeshControl),
    /// For the shard's local-endpoint table (adding an endpoint registers
    /// its queue with the shard; a publisher's packets), which a closure on
    /// the core alone cannot reach. Run by the shard itself.
    Local(LocalCommand),
}

/// A request for the shard's local-endpoint table (`super::local`) (it needs the shard, not
/// only its core, so it is not an `on_shard` closure).
pub(super) enum LocalCommand {
    /// Join `room` as `identity`, add the endpoint, register its queue.
    Add {
        room: String,
        identity: String,
        spec: LocalEndpointSpec,
        outputs: mpsc::Sender<LocalOutput>,
        reply: oneshot::Sender<Result<LocalEndpointInfo, SfuError>>,
    },
    /// One RTP packet of a local publisher.
    Rtp { peer: PeerId, packet: PacketBuf },
    /// The endpoint is gone: leave the room.
    Remove { peer: PeerId },
}
