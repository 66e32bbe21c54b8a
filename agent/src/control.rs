//! Client of the dataplane's local control API (docs/control-api.md):
//! HTTP/1.1 over its Unix socket, one connection per request. What it
//! sends is the scheduler's desired state less what only the agent uses
//! ([`for_dataplane`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use ridge_wire::control::{DesiredState as DataplaneState, MeshLink, TrackRoute};
use ridge_wire::scheduler::DesiredState;

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
    /// The scheduler's desired state has what the dataplane would refuse.
    #[error("the scheduler's desired state cannot go to the dataplane: {0}")]
    BadDesired(String),
}

/// The dataplane's part of the scheduler's desired state: all of it but
/// the probes, which are the agent's business (the control API refuses
/// fields it does not know). A link address that is not `IP:PORT` is
/// refused here, as the dataplane would refuse the document.
pub fn for_dataplane(d: &DesiredState) -> Result<DataplaneState, ControlError> {
    let links = d
        .links
        .iter()
        .map(|l| {
            let address = match l.address.as_deref() {
                None => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    ControlError::BadDesired(format!(
                        "links[{}].address `{a}` is not IP:PORT",
                        l.peer
                    ))
                })?),
            };
            Ok(MeshLink {
                peer: l.peer.clone(),
                address,
                key: l.key.clone(),
                trusted: l.trusted,
                fec: l.fec,
            })
        })
        .collect::<Result<_, ControlError>>()?;
    let routes = d
        .routes
        .iter()
        .map(|r| TrackRoute {
            room: r.room.clone(),
            source: r.source.clone(),
            upstream: r.upstream.clone(),
            downstream: r.downstream.clone(),
        })
        .collect();
    Ok(DataplaneState {
        node_id: d.node_id.clone(),
        version: d.version,
        drain: d.drain,
        dataplane_secret: d.dataplane_secret.clone(),
        links,
        routes,
    })
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

    /// Applies (the dataplane's part of) a desired state; returns the
    /// dataplane's answer.
    pub async fn apply(&self, d: &DesiredState) -> Result<serde_json::Value, ControlError> {
        let body = serde_json::to_vec(&for_dataplane(d)?)
            .map_err(|e| ControlError::BadAnswer(e.to_string()))?;
        let (s, b) = self.request(Method::PUT, "/v1/desired", Some(body)).await?;
        Self::ok(s, &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataplane_gets_the_same_bytes_as_before() {
        let from_scheduler = concat!(
            r#"{"node_id":"n-3f9a0c1b2d4e5f60","version":18,"drain":false,"dataplane_secret":"9b1f","#,
            r#""links":[{"peer":"n-77aa00bb11cc22dd","address":"10.0.0.9:5006","key":"4c0e","trusted":true,"fec":true},"#,
            r#"{"peer":"n-88aa00bb11cc22dd","address":null,"key":"5d1f","trusted":false}],"#,
            r#""routes":[{"room":"demo","source":"n-3f9a0c1b2d4e5f60","upstream":null,"downstream":["n-77aa00bb11cc22dd"]}],"#,
            r#""probes":[{"peer":"n-99aa00bb11cc22dd","address":"10.0.0.10:5006","key":"6e20","trusted":false}]}"#
        );
        // What the agent sent when it forwarded its own copy of the type
        // with `probes` skipped: the same, less the probes.
        let to_dataplane = concat!(
            r#"{"node_id":"n-3f9a0c1b2d4e5f60","version":18,"drain":false,"dataplane_secret":"9b1f","#,
            r#""links":[{"peer":"n-77aa00bb11cc22dd","address":"10.0.0.9:5006","key":"4c0e","trusted":true,"fec":true},"#,
            r#"{"peer":"n-88aa00bb11cc22dd","address":null,"key":"5d1f","trusted":false}],"#,
            r#""routes":[{"room":"demo","source":"n-3f9a0c1b2d4e5f60","upstream":null,"downstream":["n-77aa00bb11cc22dd"]}]}"#
        );
        let d: DesiredState = serde_json::from_str(from_scheduler).unwrap();
        let out = serde_json::to_string(&for_dataplane(&d).unwrap()).unwrap();
        assert_eq!(out, to_dataplane);
        // Without a secret there is none in the document either.
        let d = DesiredState {
            dataplane_secret: None,
            ..d
        };
        let out = serde_json::to_string(&for_dataplane(&d).unwrap()).unwrap();
        assert!(!out.contains("dataplane_secret"), "{out}");
    }

    #[test]
    fn a_link_address_the_dataplane_would_refuse_is_refused() {
        let d: DesiredState = serde_json::from_str(
            r#"{"node_id":"n-1","version":1,"drain":false,
                "links":[{"peer":"n-2","address":"peer.example:5006","key":"k"}]}"#,
        )
        .unwrap();
        let e = for_dataplane(&d).unwrap_err();
        assert!(matches!(e, ControlError::BadDesired(_)), "{e}");
        assert!(e.to_string().contains("links[n-2].address"), "{e}");
    }
}
