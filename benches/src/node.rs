//! A real `ridge-dataplane` node as a child process, and a minimal HTTP/1.1
//! client for its plain-RTP endpoint API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use crate::mmsg;
use crate::placement::Placement;

/// How to start the node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `--shards`.
    pub shards: usize,
    /// `--io-backend` (auto, uring, mmsg).
    pub io_backend: String,
    /// UDP GSO for runs to one destination (`false`: `--no-udp-gso`).
    pub gso: bool,
    /// The CPUs it runs on (`--node-cpus`).
    pub placement: Placement,
}

/// The default node binary: `ridge-dataplane` next to this executable (both
/// land in the same `target/<profile>` directory).
pub fn default_node_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ridge-bench executable")?;
    let dir = exe
        .parent()
        .context("the ridge-bench executable has no parent directory")?;
    Ok(dir.join("ridge-dataplane"))
}

/// Per-shard counters from the node's /metrics, summed over its shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// `ridge_shard_allocations_total`: heap allocations on the packet path.
    pub allocations: u64,
    /// `ridge_shard_gso_sends_total`.
    pub gso_sends: u64,
    /// `ridge_shard_gso_datagrams_total`.
    pub gso_datagrams: u64,
}

impl ShardCounters {
    /// Sums the counters over every `shard` label; `None` without any
    /// allocation counter (not a Ridge node, or no shard yet).
    pub fn parse(metrics: &str) -> Option<ShardCounters> {
        let mut c = ShardCounters::default();
        let mut seen = false;
        for line in metrics.lines() {
            let Some((name, rest)) = line.split_once('{') else {
                continue;
            };
            let field = match name {
                "ridge_shard_allocations_total" => &mut c.allocations,
                "ridge_shard_gso_sends_total" => &mut c.gso_sends,
                "ridge_shard_gso_datagrams_total" => &mut c.gso_datagrams,
                _ => continue,
            };
            let (_, v) = rest.rsplit_once(' ')?;
            *field += v.trim().parse::<f64>().ok()? as u64;
            seen |= name == "ridge_shard_allocations_total";
        }
        seen.then_some(c)
    }

    /// What changed from `before` to `self`.
    pub fn since(&self, before: &ShardCounters) -> ShardCounters {
        ShardCounters {
            allocations: self.allocations.saturating_sub(before.allocations),
            gso_sends: self.gso_sends.saturating_sub(before.gso_sends),
            gso_datagrams: self.gso_datagrams.saturating_sub(before.gso_datagrams),
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeProcess {
    /// `None` for an external node (`--node URL`).
    child: Option<Child>,
    http: SocketAddr,
    token: String,
}

/// A free loopback port: bind port 0, note what the kernel picked, drop it.
fn free_tcp_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn make_secret() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("ridge-bench-{}-{nanos:x}", std::process::id())
}

impl NodeProcess {
    /// Starts `bin` on free loopback ports, waits until its HTTP port
    /// answers, and mints a publish+subscribe token with its `token`
    /// subcommand.
    pub fn start(bin: &Path, opts: &NodeOptions) -> Result<NodeProcess> {
        if !bin.is_file() {
            bail!(
                "node binary {} not found; build it with cargo build --release -p ridge-dataplane \
                 (or pass --node-bin PATH)",
                bin.display()
            );
        }
        let secret = make_secret();
        let http = free_tcp_port()?;
        // Port 0: each shard picks its own free port (shard i would
        // otherwise need port + i free too).
        let udp = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut cmd = Command::new(bin);
        cmd.env("RIDGE_JWT_SECRET", &secret)
            .args(["--http", &http.to_string(), "--udp", &udp.to_string()])
            .args(["--shards", &opts.shards.to_string()])
            // The bench's receivers are loopback sockets that never send:
            // they receive without first proving consent.
            .args(["--rtp-trusted-network", "127.0.0.0/8"])
            .args(["--io-backend", &opts.io_backend])
            .args((!opts.gso).then_some("--no-udp-gso"))
            .args(["--log", "warn", "--drain-timeout", "1s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = opts
            .placement
            .spawn_node(&mut cmd)
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut node = NodeProcess {
            child: Some(child),
            http,
            token: String::new(),
        };
        node.wait_ready(Duration::from_secs(15))?;
        let out = Command::new(bin)
            .env("RIDGE_JWT_SECRET", &secret)
            .args(["token", "--room", "*", "--identity", "ridge-bench"])
            .args(["--publish", "--subscribe", "--admin", "--ttl", "1h"])
            .stderr(Stdio::inherit())
            .output()
            .context("running `ridge-dataplane token`")?;
        ensure!(
            out.status.success(),
            "`ridge-dataplane token` failed: {}",
            out.status
        );
        node.token = String::from_utf8(out.stdout)
            .context("token is not UTF-8")?
            .trim()
            .to_string();
        ensure!(
            !node.token.is_empty(),
            "`ridge-dataplane token` printed nothing"
        );
        Ok(node)
    }

    /// An already running node at `http`, used with `token`.
    pub fn attach(http: SocketAddr, token: String) -> NodeProcess {
        NodeProcess {
            child: None,
            http,
            token,
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the node exited during start-up: {status}");
            }
            if TcpStream::connect_timeout(&self.http, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the node did not open {} within {timeout:?}", self.http);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/proc/<pid>/stat` of the node (its CPU time); `None` for an
    /// external node.
    pub fn stat_path(&self) -> Option<PathBuf> {
        let pid = self.child.as_ref()?.id();
        Some(PathBuf::from(format!("/proc/{pid}/stat")))
    }

    /// Creates a plain-RTP endpoint (`direction` "publish" or "subscribe")
    /// for video in `codec` from `remote`; returns the node's media address
    /// (`local`).
    pub fn create_endpoint(
        &self,
        room: &str,
        direction: &str,
        remote: SocketAddr,
        codec: crate::packet::Codec,
    ) -> Result<SocketAddr> {
        let body = serde_json::json!({
            "direction": direction,
            "kind": "video",
            "codec": codec.name(),
            "remote": remote.to_string(),
            "payload_type": crate::packet::PAYLOAD_TYPE,
            "ssrc": crate::packet::SSRC,
        })
        .to_string();
        let path = format!("/v1/rooms/{room}/rtp");
        let r = http_request(self.http, "POST", &path, Some(&self.token), &body)?;
        endpoint_local(&path, direction, &r)
    }

    pub fn http(&self) -> SocketAddr {
        self.http
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The shards' counters so far, summed over shards; `None` when
    /// /metrics is not readable with this token.
    pub fn shard_counters(&self) -> Option<ShardCounters> {
        let r = http_request(self.http, "GET", "/metrics", Some(&self.token), "").ok()?;
        if r.status != 200 {
            return None;
        }
        ShardCounters::parse(&r.body)
    }

    /// SIGTERM, then wait up to 5 s for the node to drain and exit (then
    /// SIGKILL).
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        match self.child.as_mut() {
            Some(child) => stop_child(child),
            None => Ok(()),
        }
    }
}

/// SIGTERM, then wait up to 5 s for a node process to drain and exit (then
/// SIGKILL, reported as an error). Nothing to do if it already exited.
pub fn stop_child(child: &mut Child) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    mmsg::sigterm(child.id()).context("sending SIGTERM to the node")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    bail!("the node did not exit within 5 s of SIGTERM; killed it")
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// The address of an `http://HOST:PORT[/]` URL (numeric host only).
pub fn parse_http_url(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--node {url:?}: only http:// URLs are supported"))?;
    let hostport = rest.trim_end_matches('/');
    hostport
        .parse()
        .with_context(|| format!("--node {url:?}: expected http://IP:PORT"))
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole response.
/// The node's media address from a `POST /v1/rooms/{room}/rtp` answer.
pub fn endpoint_local(path: &str, direction: &str, r: &HttpResponse) -> Result<SocketAddr> {
    ensure!(
        r.status == 201,
        "POST {path} ({direction}) answered {}: {}",
        r.status,
        r.body
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).context("endpoint response")?;
    let local = v["local"]
        .as_str()
        .context("endpoint response without `local`")?;
    local
        .parse()
        .with_context(|| format!("`local` {local:?} is not an address"))
}

pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<HttpResponse> {
    http_request_with(addr, method, path, token, "application/json", body)
}

/// [`http_request`] with a body of another content type (SDP for WHIP/WHEP).
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &str,
) -> Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let host = addr.to_string();
    exchange(&mut s, &host, method, path, token, content_type, body)
}

/// [`http_request`] over a Unix stream socket (the node's control API),
/// JSON body, no token.
pub fn http_request_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<HttpResponse> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    exchange(
        &mut s,
        "localhost",
        method,
        path,
        None,
        "application/json",
        body,
    )
}

/// Writes one `Connection: close` request on `s` and reads the whole
/// response.
fn exchange(
    s: &mut (impl Read + Write),
    host: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &str,
) -> Result<HttpResponse> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the response to {method} {path}"))?;
    parse_response(&raw)
}

/// Parses a complete HTTP/1.1 response (identity or chunked body).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("HTTP response without a header terminator")?;
    let head = std::str::from_utf8(&raw[..split]).context("HTTP head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = &raw[split + 4..];
    let decoded;
    if chunked {
        let mut out = Vec::new();
        loop {
            let eol = body
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("truncated chunk size")?;
            let size_text = std::str::from_utf8(&body[..eol])?;
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            body = &body[eol + 2..];
            if size == 0 {
                break;
            }
            ensure!(body.len() >= size, "truncated chunk");
            out.extend_from_slice(&body[..size]);
            body = body.get(size + 2..).unwrap_or_default();
        }
        decoded = out;
        body = &decoded;
    }
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_identity_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}")
            .expect("identity");
        assert_eq!((r.status, r.body.as_str()), (201, "{}"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn sums_shard_counters() {
        let m = "# HELP ridge_shard_allocations Heap allocations\n\
                 ridge_shard_allocations_total{shard=\"0\"} 5\n\
                 ridge_shard_allocations_total{shard=\"1\"} 7\n\
                 ridge_shard_gso_sends_total{shard=\"0\"} 10\n\
                 ridge_shard_gso_datagrams_total{shard=\"0\"} 80\n\
                 ridge_shard_gso_datagrams_total{shard=\"1\"} 4\n\
                 ridge_shard_send_dropped_total{shard=\"0\"} 99\n";
        let c = ShardCounters::parse(m).expect("counters");
        assert_eq!(
            c,
            ShardCounters {
                allocations: 12,
                gso_sends: 10,
                gso_datagrams: 84
            }
        );
        let d = c.since(&ShardCounters {
            allocations: 2,
            gso_sends: 4,
            gso_datagrams: 100,
        });
        assert_eq!((d.allocations, d.gso_sends, d.gso_datagrams), (10, 6, 0));
        assert_eq!(ShardCounters::parse("up 1\n"), None);
    }

    #[test]
    fn node_urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/").expect("url"),
            "127.0.0.1:8080".parse::<SocketAddr>().expect("addr")
        );
        assert!(parse_http_url("https://127.0.0.1:8080").is_err());
        assert!(parse_http_url("http://localhost:8080").is_err());
    }
}
