//! `ridge-dataplane`: the Ridge edge node. It relays media between WebRTC
//! peers (WHIP, WHEP, WebSocket rooms) and plain RTP endpoints, with the
//! sans-IO routing core in `ridge-sfu` and socket I/O on one media thread.
//!
//! The binary (`src/main.rs`) parses flags, validates the configuration and
//! runs a [`node::Node`] until SIGTERM/SIGINT, then drains.

pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod http;
pub mod kernel;
pub mod media;
pub mod metrics;
pub mod netinfo;
pub mod node;
pub mod steering;
pub mod ws;

pub use node::{Node, NodeError};
