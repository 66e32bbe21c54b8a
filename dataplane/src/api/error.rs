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
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
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
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
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
}
