//! What the shards count: their own counters, read by `/metrics` without
//! asking the shard, and the node-wide counters they are handed at start.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;

/// Counters a shard publishes for `/metrics` without being asked.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Heap allocations made on the shard thread outside control commands
    /// (joins, offers, stats snapshots): the packet path and timers. The
    /// counting allocator must be installed, as in the `ridge-dataplane`
    /// binary; otherwise this stays 0.
    pub allocations: AtomicU64,
    /// Received datagrams that did not fit a packet buffer.
    pub truncated: AtomicU64,
    /// Outputs for local (in-process) endpoints that did not fit their
    /// endpoint's queue, or whose endpoint was gone, dropped; and fed
    /// packets whose endpoint was gone.
    pub local_dropped: AtomicU64,
    /// Datagrams given up on because the socket stayed full.
    pub send_dropped: AtomicU64,
    /// Times the socket was full and sends had to wait.
    pub send_blocked: AtomicU64,
    /// Slots in the shard's packet pool.
    pub pool_slots: AtomicU64,
    /// Times the packet pool had to grow.
    pub pool_grown: AtomicU64,
    /// io_uring: times the provided buffer ring ran dry.
    pub ring_exhausted: AtomicU64,
    /// Pending socket errors (ICMP) seen by receives.
    pub socket_errors: AtomicU64,
    /// Sends that carried several datagrams with UDP GSO.
    pub gso_sends: AtomicU64,
    /// Datagrams those sends carried.
    pub gso_datagrams: AtomicU64,
    /// Control calls refused because the shard had stopped (its thread
    /// gone, its command queue closed). Counted by the handle, not the
    /// shard.
    pub stopped_calls: AtomicU64,
}

/// Node-wide counters every shard bumps, handed to [`super::spawn`] (the
/// node passes the ones registered in its metrics registry).
#[derive(Debug, Clone, Default)]
pub struct ShardCounters {
    /// Datagrams a socket failed to send (`ridge_udp_send_errors`).
    pub udp_send_errors: Counter,
    /// Errors reading a socket (`ridge_udp_receive_errors`).
    pub udp_recv_errors: Counter,
}
