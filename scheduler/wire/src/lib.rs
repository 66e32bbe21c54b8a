//! Types that cross a process boundary between Ridge's programs, written
//! once:
//!
//! - [`scheduler`]: the scheduler's agent protocol (docs/scheduler-api.md
//!   §3): enrollment, heartbeats and the desired state, as the scheduler
//!   serves them and the agent reads them;
//! - [`control`]: the desired state on the dataplane's local control socket
//!   (docs/control-api.md, `PUT /v1/desired`), which the agent writes from
//!   the scheduler's;
//! - [`config`]: what the three programs' configuration loaders share (the
//!   configuration error, a secret string, duration settings).
//!
//! Serde attributes here are the wire format: a change to one changes the
//! bytes the other programs read. The tests pin the JSON.

#![deny(missing_docs)]

pub mod config;
pub mod control;
pub mod scheduler;

/// Redacts a secret in `Debug` output: says whether one is set, never what.
struct Redacted(bool);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0 { "<redacted>" } else { "<none>" })
    }
}
