//! The node's public HTTP surface: WHIP, WHEP, plain RTP endpoints, the
//! WebSocket room API, `/metrics`, `/healthz` and the demo page (see
//! docs/api.md). Every route authenticates ([`auth`]).
//!
//! - [`http`]: the router and the HTTP handlers;
//! - [`ws`]: the WebSocket room protocol, one socket at a time;
//! - [`hub`]: every room session of the node, fed by the cores' events;
//! - [`state`]: [`AppState`], what every handler shares;
//! - [`error`]: [`ApiError`] and the validation the handlers share;
//! - [`auth`]: access tokens.

pub mod auth;
pub mod error;
pub mod http;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod state;
pub mod ws;

pub use error::{ApiError, validate_room};
pub use http::router;
pub use hub::{RoomHub, run_hub};
pub use state::AppState;
