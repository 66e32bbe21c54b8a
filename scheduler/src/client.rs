//! A small HTTPS client for the v1 API (used by `ridgectl`, the tests and
//! the benchmark). TLS is rustls with aws-lc-rs; the server is trusted
//! through the given CA certificate (PEM), or the certificate itself.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;

/// A client failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("bad CA certificate: {0}")]
    Ca(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `code` of an error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// An API client bound to one scheduler URL.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// `base` is `https://host:port`; `ca_pem` the certificate(s) to trust.
    pub fn new(base: &str, ca_pem: &[u8], pool_idle: usize) -> Result<Self, ClientError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| ClientError::Ca(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Ca(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Ca("no certificate in the PEM data".into()));
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .pool_max_idle_per_host(pool_idle)
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Sends a request; `body` is serialized as JSON when given.
    pub async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<&B>,
    ) -> Result<Reply, ClientError> {
        let url = format!("{}{path}", self.base);
        let build = || {
            let mut req = self.http.request(method.clone(), &url);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            req
        };
        let resp = match build().send().await {
            // A pooled connection the server had already closed: the request
            // never reached it, so send it again on a fresh connection.
            Err(e) if closed_before_response(&e) => build().send().await,
            r => r,
        }
        .map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .text()
            .await
            .map_err(|source| ClientError::Http { url, source })?;
        Ok(Reply {
            status,
            body,
            headers,
        })
    }

    /// Sends raw bytes with a content type (tests of malformed bodies).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header("content-type", content_type)
            .body(body);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .text()
            .await
            .map_err(|source| ClientError::Http { url, source })?;
        Ok(Reply {
            status,
            body,
            headers,
        })
    }

    /// GET.
    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Result<Reply, ClientError> {
        self.call::<()>(Method::GET, path, bearer, None).await
    }

    /// POST with a JSON body.
    pub async fn post<B: Serialize + ?Sized>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &B,
    ) -> Result<Reply, ClientError> {
        self.call(Method::POST, path, bearer, Some(body)).await
    }
}

/// Whether a request failed because its (reused) connection was closed
/// before any response arrived: hyper's "incomplete message" or a reset
/// while writing, as opposed to a timeout, a TLS or a DNS failure.
fn closed_before_response(e: &reqwest::Error) -> bool {
    if !e.is_request() || e.is_timeout() || e.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message() || h.is_canceled();
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
        }
        source = s.source();
    }
    false
}
