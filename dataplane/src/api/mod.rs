//! The node's public HTTP surface: WHIP, WHEP, plain RTP endpoints, the
//! WebSocket room API, `/metrics`, `/healthz` and the demo page (see
//! docs/api.md). Every route authenticates ([`auth`]).

pub mod auth;
pub mod http;
pub mod ws;
