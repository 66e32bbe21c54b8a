//! The media shards: N threads, each pinned to a core and owning one UDP
//! socket (io_uring or recvmmsg/sendmmsg, see `ridge-io`), one packet pool
//! and one [`Sfu`](ridge_sfu::Sfu). A shard's loop is the only code that
//! touches its core, so the packet path takes no lock.
//!
//! Steering is by port (`shard_ports = "per-shard"`, the default): shard
//! `i` listens on the configured UDP port + `i` and advertises exactly that
//! port in its ICE candidates and plain-RTP endpoint answers, so every
//! packet of a session arrives on the socket of the shard that owns it.
//! With `shard_ports = "shared"` every shard binds the one port and a BPF
//! program steers each datagram to its shard (see [`steering`]). Rooms are
//! placed on shards by a stable hash of their name, so the peers of a room
//! share a shard and a packet never crosses threads. (docs/decisions.md:
//! "Shards".)
//!
//! HTTP and WebSocket handlers, the control API and the kernel path reach
//! the cores through [`MediaHandle`], which runs each control call as a
//! closure on the owning shard ([`MediaHandle::on_shard`]) and awaits its
//! result.
//!
//! - [`startup`]: binds the sockets and starts the threads;
//! - `thread`: one shard's loop (receive, timers, control calls, flush);
//! - `send`: the send side, batched and grouped for UDP GSO;
//! - `command`: what travels down a shard's command queue;
//! - [`handle`]: [`MediaHandle`] and its control calls;
//! - [`local`]: local (in-process) endpoints and their bounded queues;
//! - [`stats`]: the shards' counters;
//! - [`steering`]: shared-port steering.

mod command;
pub mod handle;
pub mod local;
mod send;
pub mod startup;
pub mod stats;
pub mod steering;
mod thread;

#[cfg(test)]
mod tests;

pub use handle::{MediaHandle, ShardError, shard_for_room};
pub use local::{LOCAL_QUEUE, LocalEndpoint, LocalSendError, MAX_LOCAL_ENDPOINTS};
pub use startup::{MediaError, ShardOptions, spawn};
pub use stats::{ShardCounters, ShardStats};
