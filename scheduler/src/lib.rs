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

/// Threads for `items` pieces of work, at least `per_thread` each: up to the
/// available cores, 1 (run inline) when there is too little to split.
pub(crate) fn worker_threads(items: usize, per_thread: usize) -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items / per_thread)
        .max(1)
}

/// Joins scoped worker threads in order, re-raising a worker's panic here
/// (dropping its share of the results instead would misalign them).
pub(crate) fn join_all<R>(handles: Vec<std::thread::ScopedJoinHandle<'_, Vec<R>>>) -> Vec<R> {
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect()
}

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
