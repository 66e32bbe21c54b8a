//! The media shards: pinned threads that each own a socket and a core
//! ([`handle`]), and shared-port steering ([`steering`]).

pub mod handle;
pub mod steering;

pub use handle::{MediaError, MediaHandle, ShardOptions, ShardStats, shard_for_room, spawn};
