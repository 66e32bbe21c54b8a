//! An in-process `ridge-dataplane` node on ephemeral loopback ports, with
//! token minting and a minimal HTTP client for the tests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ridge_dataplane::Node;
use ridge_dataplane::auth;
use ridge_dataplane::config::{self, IoBackend, Overrides, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The secret every test node signs with.
pub const SECRET: &str = "ridge-test-secret-0123456789abcdef";

/// A running node plus what tests need to talk to it.
#[derive(Debug)]
pub struct TestNode {
    pub node: Node,
    secret: Secret,
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TestNode {
    /// Starts a node on 127.0.0.1 with ephemeral HTTP and UDP ports.
    pub async fn start() -> Result<TestNode> {
        Self::start_with(Overrides::default()).await
    }

    pub async fn start_with(mut overrides: Overrides) -> Result<TestNode> {
        let secret = Secret::new(SECRET);
        overrides.http.get_or_insert("127.0.0.1:0".parse()?);
        overrides.udp.get_or_insert("127.0.0.1:0".parse()?);
        overrides
            .drain_timeout
            .get_or_insert(Duration::from_secs(2));
        overrides.jwt_secret = Some(secret.clone());
        // The tests' loopback sockets receive plain RTP without first
        // sending a consent packet (tests that check consent set their own).
        if overrides.rtp_trusted_networks.is_empty() {
            overrides.rtp_trusted_networks = vec!["127.0.0.0/8".parse()?];
        }
        // tests/run.sh runs the suite once per I/O backend.
        if overrides.io_backend.is_none()
            && let Ok(b) = std::env::var("RIDGE_TEST_IO_BACKEND")
        {
            overrides.io_backend = Some(match b.as_str() {
                "uring" => IoBackend::Uring,
                "mmsg" => IoBackend::Mmsg,
                "auto" | "" => IoBackend::Auto,
                other => anyhow::bail!("RIDGE_TEST_IO_BACKEND={other}: use auto, uring or mmsg"),
            });
        }
        let config = config::from_toml_str("", &overrides, None).context("test config")?;
        let node = Node::start(config).await.context("starting the node")?;
        Ok(TestNode { node, secret })
    }

    pub fn base_url(&self) -> String {
        self.node.base_url()
    }

    /// A token for `room` with the given grants, valid for an hour.
    pub fn token(&self, room: &str, identity: &str, publish: bool, subscribe: bool) -> String {
        auth::mint(
            &self.secret,
            room,
            identity,
            publish,
            subscribe,
            false,
            Duration::from_secs(3600),
            now_unix(),
        )
        .expect("mint token")
    }

    pub fn admin_token(&self) -> String {
        auth::mint(
            &self.secret,
            "*",
            "operator",
            false,
            false,
            true,
            Duration::from_secs(3600),
            now_unix(),
        )
        .expect("mint token")
    }

    /// `method path` with a JSON `body`, authenticated by `token`.
    pub async fn json_request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> Result<HttpResponse> {
        let auth = format!("Bearer {token}");
        http(
            &self.base_url(),
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            &body.to_string(),
        )
        .await
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let auth = format!("Bearer {}", self.admin_token());
        let r = http(
            &self.base_url(),
            "GET",
            "/metrics",
            &[("Authorization", &auth)],
            "",
        )
        .await?;
        if r.status != 200 {
            bail!("/metrics answered {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `ridge_packets_dropped_total{reason="malformed"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics().await?, sample))
    }
}

/// Reads one sample's value out of a text exposition.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.1 client (plain HTTP, `Connection: close`).
pub async fn http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpResponse> {
    let host = base
        .strip_prefix("http://")
        .context("only http:// bases are supported")?;
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(host))
        .await
        .context("connect timeout")??;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .context("response timeout")??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// The body of a chunked HTTP/1.1 answer.
pub(crate) fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
