//! `ridge-dataplane`: the Ridge edge node. It relays media between WebRTC
//! peers (WHIP, WHEP, WebSocket rooms) and plain RTP endpoints, with the
//! sans-IO routing core in `ridge-sfu` and socket I/O on the media shards.
//!
//! The binary (`src/main.rs`) parses flags, validates the configuration and
//! runs a [`node::Node`] until SIGTERM/SIGINT, then drains.
//!
//! Modules by role:
//! - [`api`]: the public HTTP and WebSocket surface (WHIP, WHEP, plain RTP,
//!   rooms, `/metrics`, `/healthz`), its authentication and shared state;
//! - [`shard`]: the media threads, the handle that runs control calls on
//!   them, and shared-port steering;
//! - [`offload`]: the kernel fast path (XDP guard, kernel forwarding) and
//!   the routing/neighbour tables it needs;
//! - [`control`]: the local control API the node's agent calls;
//! - [`metrics`]: the node's one metrics registry;
//! - [`config`], [`cli`]: configuration and the command line;
//! - [`node`]: assembles and drains a running node.

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod metrics;
pub mod node;
pub mod offload;
pub mod shard;

#[cfg(test)]
mod module_graph;

/// Access tokens; other crates mint and check them by this path.
pub use api::auth;
pub use node::{Node, NodeError};
