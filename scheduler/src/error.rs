//! The scheduler's one error type. Each variant says whose fault it is and
//! maps to an HTTP status and a stable `code` (docs/scheduler-api.md §2).

use axum::http::StatusCode;
use axum::http::header::WWW_AUTHENTICATE;
use axum::response::{IntoResponse, Response};

use crate::api::ErrorBody;

/// An API error. Messages never contain secrets.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    // --- the caller's fault ---
    #[error("{0}")]
    MalformedBody(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidPublicKey(String),
    #[error("{0}")]
    InvalidProof(String),
    #[error("no `Authorization: Bearer` credential")]
    MissingCredential,
    #[error("{0}")]
    InvalidCredential(String),
    #[error("the node token has expired; enroll again")]
    CredentialExpired,
    #[error("node {0} is not registered; enroll again")]
    UnknownNode(String),
    #[error("{0}")]
    BootstrapInvalid(String),
    #[error("bootstrap token {id} expired at {at}")]
    BootstrapExpired { id: String, at: u64 },
    #[error("bootstrap token {0} was revoked")]
    BootstrapRevoked(String),
    #[error("bootstrap token {id} was already used {uses} of {max} times")]
    BootstrapExhausted { id: String, uses: u32, max: u32 },
    #[error("{0}")]
    Forbidden(String),
    #[error("this node token belongs to another node")]
    NodeMismatch,
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("{0}")]
    TooManyLongPolls(String),
    // --- nobody's fault ---
    #[error("{0}")]
    NoNodeAvailable(String),
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    // --- ours ---
    #[error("internal error")]
    Internal(#[source] crate::store::StoreError),
}

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedBody(_) => "malformed_body",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidPublicKey(_) => "invalid_public_key",
            Self::InvalidProof(_) => "invalid_proof",
            Self::MissingCredential => "missing_credential",
            Self::InvalidCredential(_) => "invalid_credential",
            Self::CredentialExpired => "credential_expired",
            Self::UnknownNode(_) => "unknown_node",
            Self::BootstrapInvalid(_) => "bootstrap_token_invalid",
            Self::BootstrapExpired { .. } => "bootstrap_token_expired",
            Self::BootstrapRevoked(_) => "bootstrap_token_revoked",
            Self::BootstrapExhausted { .. } => "bootstrap_token_exhausted",
            Self::Forbidden(_) => "forbidden",
            Self::NodeMismatch => "node_mismatch",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTimeout(_) => "request_timeout",
            Self::TooManyLongPolls(_) => "too_many_long_polls",
            Self::NoNodeAvailable(_) => "no_node_available",
            Self::ShuttingDown => "shutting_down",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedBody(_)
            | Self::InvalidRequest(_)
            | Self::InvalidPublicKey(_)
            | Self::InvalidProof(_) => StatusCode::BAD_REQUEST,
            Self::MissingCredential
            | Self::InvalidCredential(_)
            | Self::CredentialExpired
            | Self::UnknownNode(_)
            | Self::BootstrapInvalid(_)
            | Self::BootstrapExpired { .. }
            | Self::BootstrapRevoked(_)
            | Self::BootstrapExhausted { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::NodeMismatch => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyLongPolls(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NoNodeAvailable(_) | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(e) = &self {
            tracing::error!(error = %e, "internal error");
        }
        let status = self.status();
        let body = ErrorBody {
            code: self.code().to_owned(),
            error: self.to_string(),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still be on its way: do not read it.
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp.extensions_mut().insert(ErrorCode(self.code()));
        resp
    }
}

/// Attached to error responses so the metrics layer can count by code.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);
