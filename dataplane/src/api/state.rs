//! [`AppState`]: what every HTTP and WebSocket handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderMap, StatusCode};
use prometheus_client::registry::Registry;

use super::auth::{AuthError, Authenticator, Claims, Grant};
use super::error::ApiError;
use super::hub::RoomHub;
use crate::metrics::{Metrics, ReasonLabels};
use crate::offload::kernel::KernelPath;
use crate::shard::handle::MediaHandle;

/// Shared state of all handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    pub media: MediaHandle,
    pub auth: Authenticator,
    pub metrics: Metrics,
    pub registry: Arc<Registry>,
    pub draining: Arc<AtomicBool>,
    pub hub: Arc<RoomHub>,
    pub kernel: Arc<KernelPath>,
}

impl AppState {
    /// Authenticates a request and checks its grant for `room`, counting
    /// failures by reason.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        room: Option<&str>,
        grant: Grant,
    ) -> Result<Claims, ApiError> {
        let check = || -> Result<Claims, AuthError> {
            let claims = self.auth.authenticate(headers, query)?;
            Authenticator::authorize(&claims, room, grant)?;
            Ok(claims)
        };
        check().map_err(|e| {
            self.metrics
                .auth_failures
                .get_or_create(&ReasonLabels { reason: e.reason() })
                .inc();
            ApiError::new(e.status(), e.to_string())
        })
    }

    pub fn bad(&self, reason: &'static str, message: impl Into<String>) -> ApiError {
        self.metrics
            .bad_requests
            .get_or_create(&ReasonLabels { reason })
            .inc();
        ApiError::bad_request(message)
    }

    /// Refuses new sessions while the node drains.
    pub fn refuse_if_draining(&self) -> Result<(), ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the node is draining; connect to another node",
            ));
        }
        Ok(())
    }
}
