//! `ridge-agent`: runs on every Ridge node next to `ridge-dataplane`. It
//! enrolls the node with the scheduler (docs/scheduler-api.md), heartbeats
//! with capabilities, load and link measurements, probes links to peer
//! agents, and applies the scheduler's desired state to the dataplane over
//! its control socket (docs/control-api.md).
//!
//! Sans-IO cores: [`backoff`], [`load`], [`probe::wire`], [`probe::stats`];
//! the only `unsafe` is dlopen in `discover::ffi`.

#![deny(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod config;
pub mod control;
pub mod discover;
pub mod identity;
pub mod load;
pub mod metrics;
pub mod probe;
pub mod scheduler;

pub use agent::{AgentError, RunningAgent, start};
