//! Ridge integration-test support: a headless-Chromium driver (over the
//! Chrome DevTools Protocol), in-process nodes, a whole mesh in network
//! namespaces ([`mesh::MeshLab`]) and skip/require helpers for tests that
//! need privileges or a browser.

pub mod cdp;
pub mod chromium;
pub mod mesh;
pub mod node;
pub mod skip;

pub use chromium::{Chromium, Page};
