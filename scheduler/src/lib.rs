//! `ridge-scheduler`: the control plane of the Ridge mesh.
//!
//! - [`route`] and [`desired`] and [`dispatch`] are pure (sans-IO): the route
//!   plan, desired states and node choice are functions of a snapshot.
//! - [`store`] is the storage layer (SQLite or PostgreSQL) with migrations
//!   and leader election.
//! - [`service`] holds the registry and the operations; [`http`] exposes them
//!   as the v1 HTTPS API (docs/scheduler-api.md); [`server`] runs it all.
//! - [`client`] is the HTTPS client `ridgectl`, the tests and the benchmark use.

#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod config;
pub mod crypto;
pub mod desired;
pub mod dispatch;
pub mod error;
pub mod http;
pub mod metrics;
pub mod route;
pub mod server;
pub mod service;
pub mod store;

/// A deterministic xorshift64 generator for the unit tests' random meshes.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
