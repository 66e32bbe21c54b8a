//! Errors of the HTTP and WebSocket API, and the validation they share.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ridge_sfu::SfuError;
use serde_json::json;

use crate::shard::handle::ShardError;

/// An error response: `{"error": "..."}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    /// A quota refusal's limit, sent as `"limit"` next to `"error"`.
    pub(super) limit: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            limit: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.limit {
            Some(limit) => json!({ "error": self.message, "limit": limit }),
            None => json!({ "error": self.message }),
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ridge\""),
            );
        }
        r
    }
}

impl From<SfuError> for ApiError {
    fn from(e: SfuError) -> Self {
        let status = match &e {
            SfuError::InvalidSdp(_) | SfuError::InvalidSpec(_) => StatusCode::BAD_REQUEST,
            SfuError::NoSuchParticipant(_) | SfuError::NoSuchPeer(_) | SfuError::NoSuchTrack(_) => {
                StatusCode::NOT_FOUND
            }
            SfuError::Full(_) | SfuError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            SfuError::Quota { .. } => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut api = ApiError::new(status, e.to_string());
        if let SfuError::Quota { limit, .. } = &e {
            api.limit = Some(limit.label());
        }
        api
    }
}

impl From<ShardError> for ApiError {
    fn from(e: ShardError) -> Self {
        match e {
            ShardError::Sfu(e) => e.into(),
            // The shard's rooms are gone until the node restarts; another
            // node can serve the client.
            ShardError::Stopped { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// Room names appear in URLs, metrics labels and logs: keep them tame.
pub fn validate_room(room: &str) -> Result<(), ApiError> {
    let ok = !room.is_empty()
        && room.len() <= 64
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "room names are 1-64 characters of A-Z a-z 0-9 - _ .",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_shard_is_503_naming_it() {
        let e = ApiError::from(ShardError::Stopped { shard: 3 });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.message, "media shard 3 has stopped");
        let e = ApiError::from(ShardError::NoSuchShard { shard: 9 });
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        let e = ApiError::from(ShardError::Sfu(SfuError::Draining));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from(ShardError::Sfu(SfuError::InvalidSdp(
            ridge_sfu::SdpError::Unparsable("x".into()),
        )));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_quota_refusal_is_429_naming_its_limit() {
        let e = ApiError::from(ShardError::Sfu(SfuError::Quota {
            limit: ridge_sfu::QuotaLimit::TokenSessions,
            max: 10,
        }));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.limit, Some("token_sessions"));
        assert_eq!(e.message, "quota exceeded: token_sessions (at most 10)");
        // The node's own limit stays a 503.
        let e = ApiError::from(ShardError::Sfu(SfuError::Full(1000)));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
