//! The scheduler's agent API (docs/scheduler-api.md §3): an HTTPS client.
//! The wire types are `ridge-wire`'s, the ones the scheduler serves.

use std::time::Duration;

use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

/// Failure talking to the scheduler.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("bad scheduler CA file: {0}")]
    Ca(String),
    /// Network or TLS failure: retry with backoff.
    #[error("cannot reach the scheduler at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The scheduler refused the credential or token: retrying will not help.
    #[error("the scheduler refused: {code} ({message})")]
    Refused { code: String, message: String },
    /// Any other error answer (5xx, 503 shutting_down, ...): retry.
    #[error("scheduler error {status}: {code} ({message})")]
    Failed {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the scheduler: {0}")]
    BadAnswer(String),
}

impl SchedulerError {
    /// Whether a retry can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Refused { .. } | Self::Ca(_))
    }
}

pub use ridge_wire::scheduler::{
    Addresses, Capabilities, DesiredLink, DesiredRoute, DesiredState, EnrollRequest,
    EnrollResponse, Gpu, Heartbeat, HeartbeatResponse, LinkReport, Load, Nic, PublicKey,
    RoomReport,
};

/// The outcome of one watch poll.
#[derive(Debug)]
pub enum Watch {
    Changed(Box<DesiredState>),
    /// 204: nothing new within `wait`; the scheduler's current version.
    Unchanged(u64),
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    error: String,
}

/// HTTPS client for one scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerClient {
    http: reqwest::Client,
    base: String,
}

impl SchedulerClient {
    /// Trusts the certificates in `ca_pem` only.
    pub fn new(base: &str, ca_pem: &[u8]) -> Result<Self, SchedulerError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| SchedulerError::Ca(e.to_string()))?;
            // A system bundle holds a few certificates rustls cannot parse.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(SchedulerError::Ca(
                "no usable certificate in the PEM file".into(),
            ));
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| SchedulerError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| SchedulerError::Ca(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, SchedulerError> {
        let resp = req
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| SchedulerError::Unreachable {
                url: self.base.clone(),
                message: error_chain(&e),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: ErrorBody = resp.json().await.unwrap_or(ErrorBody {
            code: String::new(),
            error: String::new(),
        });
        if status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN
            || status == StatusCode::BAD_REQUEST
        {
            Err(SchedulerError::Refused {
                code: body.code,
                message: body.error,
            })
        } else {
            Err(SchedulerError::Failed {
                status: status.as_u16(),
                code: body.code,
                message: body.error,
            })
        }
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, SchedulerError> {
        let r = self
            .send(
                self.http.post(format!("{}/v1/enroll", self.base)).json(req),
                Duration::from_secs(15),
            )
            .await?;
        r.json()
            .await
            .map_err(|e| SchedulerError::BadAnswer(e.to_string()))
    }

    pub async fn heartbeat(
        &self,
        node_id: &str,
        token: &str,
        hb: &Heartbeat,
    ) -> Result<HeartbeatResponse, SchedulerError> {
        let r = self
            .send(
                self.http
                    .post(format!("{}/v1/nodes/{node_id}/heartbeat", self.base))
                    .bearer_auth(token)
                    .json(hb),
                Duration::from_secs(10),
            )
            .await?;
        r.json()
            .await
            .map_err(|e| SchedulerError::BadAnswer(e.to_string()))
    }

    /// One long poll of the desired-state watch.
    pub async fn watch(
        &self,
        node_id: &str,
        token: &str,
        since: u64,
        wait: Duration,
    ) -> Result<Watch, SchedulerError> {
        let url = format!(
            "{}/v1/nodes/{node_id}/desired?since={since}&wait={}",
            self.base,
            wait.as_secs()
        );
        let r = self
            .send(
                self.http.get(url).bearer_auth(token),
                wait + Duration::from_secs(10),
            )
            .await?;
        if r.status() == StatusCode::NO_CONTENT {
            let v = r
                .headers()
                .get("ridge-desired-version")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(since);
            return Ok(Watch::Unchanged(v));
        }
        let d: DesiredState = r
            .json()
            .await
            .map_err(|e| SchedulerError::BadAnswer(e.to_string()))?;
        Ok(Watch::Changed(Box::new(d)))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
