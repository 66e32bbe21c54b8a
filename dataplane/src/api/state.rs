//! [`AppState`]: what every HTTP and WebSocket handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderMap, StatusCode};
use prometheus_client::registry::Registry;

use super::auth::{AuthError, Authenticator, Claims, Grant};
use super::error::ApiError;
use super::hub::RoomHub;
use super::limits::WsLimits;
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
    /// The last answer of the shards to `/readyz`.
    pub ready: Arc<ReadyCache>,
    /// WebSocket limits and the session admission.
    pub ws: Arc<WsLimits>,
}

/// Caches the shards' liveness for `/readyz`, so an unauthenticated probe
/// flood costs the shards one command a second.
#[derive(Debug, Default)]
pub struct ReadyCache {
    last: tokio::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

impl ReadyCache {
    const FRESH: std::time::Duration = std::time::Duration::from_secs(1);

    pub async fn check<F, Fut>(&self, probe: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < Self::FRESH
        {
            return ok;
        }
        let ok = probe().await;
        *last = Some((std::time::Instant::now(), ok));
        ok
    }
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
        check().map_err(|e| self.auth_failed(e))
    }

    /// Like [`AppState::authorize`], except that an admin token passes
    /// whatever its room and media grants: operators end any session.
    pub fn authorize_or_admin(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        room: &str,
        grant: Grant,
    ) -> Result<Claims, ApiError> {
        let check = || -> Result<Claims, AuthError> {
            let claims = self.auth.authenticate(headers, query)?;
            if !claims.admin {
                Authenticator::authorize(&claims, Some(room), grant)?;
            }
            Ok(claims)
        };
        check().map_err(|e| self.auth_failed(e))
    }

    fn auth_failed(&self, e: AuthError) -> ApiError {
        self.metrics
            .auth_failures
            .get_or_create(&ReasonLabels { reason: e.reason() })
            .inc();
        ApiError::new(e.status(), e.to_string())
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
