//! Client of the dataplane's local control API (docs/control-api.md):
//! HTTP/1.1 over its Unix socket, one connection per request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::scheduler::DesiredState;

/// A control API failure.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the dataplane's control socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control API request failed: {0}")]
    Http(String),
    #[error("control API timed out")]
    Timeout,
    #[error("the dataplane answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected control API answer: {0}")]
    BadAnswer(String),
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub version: String,
    pub draining: bool,
    pub sessions: u64,
    #[serde(default)]
    pub max_sessions: u64,
    pub rooms: Vec<RoomStatus>,
    pub media: String,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub desired_version: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RoomStatus {
    pub room: String,
    pub participants: u64,
    pub tracks: u64,
}

/// The parts of `GET /v1/desired` the agent uses.
#[derive(Debug, Clone, Deserialize)]
pub struct HeldDesired {
    pub version: u64,
    pub drain: bool,
}

/// Talks to one dataplane.
#[derive(Debug, Clone)]
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
}

impl ControlClient {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            timeout: Duration::from_secs(5),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ControlError> {
        let fut = async {
            let stream = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|source| ControlError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ControlError::Http(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(uri)
                .header(hyper::header::HOST, "dataplane");
            if body.is_some() {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ControlError::Http(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ControlError::Http(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ControlError::Http(e.to_string()))?
                .to_bytes();
            conn.abort();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ControlError::Timeout)?
    }

    fn ok<T: for<'de> Deserialize<'de>>(
        status: StatusCode,
        body: &[u8],
    ) -> Result<T, ControlError> {
        if !status.is_success() {
            return Err(ControlError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(body).chars().take(500).collect(),
            });
        }
        serde_json::from_slice(body).map_err(|e| ControlError::BadAnswer(e.to_string()))
    }

    pub async fn status(&self) -> Result<Status, ControlError> {
        let (s, b) = self.request(Method::GET, "/v1/status", None).await?;
        Self::ok(s, &b)
    }

    /// What the dataplane holds; `None` when it holds nothing (404).
    pub async fn held(&self) -> Result<Option<HeldDesired>, ControlError> {
        let (s, b) = self.request(Method::GET, "/v1/desired", None).await?;
        if s == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Self::ok(s, &b).map(Some)
    }

    /// Applies a desired state; returns the dataplane's answer.
    pub async fn apply(&self, d: &DesiredState) -> Result<serde_json::Value, ControlError> {
        let body = serde_json::to_vec(d).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
        let (s, b) = self.request(Method::PUT, "/v1/desired", Some(body)).await?;
        Self::ok(s, &b)
    }
}
