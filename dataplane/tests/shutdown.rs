//! Shutdown behaviour of the real binary: the SIGTERM drain (WebSocket
//! `shutdown` notice, `503` for new work, exit 0 within the drain timeout), a
//! second SIGTERM cutting the drain short, and configuration errors exiting
//! 64 before any socket is bound.
//!
//! Each test starts its own node on ephemeral ports (`--http 127.0.0.1:0
//! --udp 127.0.0.1:0`) and reads the HTTP port from the `ready` log line.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use ridge_dataplane::auth;
use ridge_dataplane::config::{EXIT_CONFIG, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, Message};

const BIN: &str = env!("CARGO_BIN_EXE_ridge-dataplane");
const SECRET: &str = "shutdown-test-secret-0123456789";
const DRAIN: Duration = Duration::from_secs(3);
const ROOM: &str = "drain";

// ----- the node process ---------------------------------------------------------

/// A running `ridge-dataplane`, killed on drop if it is still running.
struct Node {
    child: Child,
    /// Everything it wrote to stdout and stderr, without ANSI colours.
    log: Arc<Mutex<String>>,
    http_port: u16,
}

impl Node {
    /// Starts the node with `--drain-timeout drain` and waits for its `ready`
    /// line.
    fn start(drain: Duration) -> Node {
        let drain = format!("{}ms", drain.as_millis());
        let mut child = command(
            &[
                "--http",
                "127.0.0.1:0",
                "--udp",
                "127.0.0.1:0",
                "--drain-timeout",
                &drain,
            ],
            SECRET,
        )
        .spawn()
        .expect("start ridge-dataplane");
        let log = Arc::new(Mutex::new(String::new()));
        capture(child.stdout.take().expect("piped stdout"), log.clone());
        capture(child.stderr.take().expect("piped stderr"), log.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let http_port = loop {
            if let Some(port) = ready_port(&log.lock().unwrap()) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "ridge-dataplane exited at start ({status}):\n{}",
                    log.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no ready line within 30 s:\n{}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Node {
            child,
            log,
            http_port,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits up to `limit` for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn ws_url(&self, token: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/v1/rooms/{ROOM}/ws?token={token}",
            self.http_port
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The binary with `args`, `secret` as RIDGE_JWT_SECRET, no colours, and
/// piped output.
fn command(args: &[&str], secret: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RIDGE_JWT_SECRET", secret)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Appends a child's output to `log` from a background thread.
fn capture(stream: impl Read + Send + 'static, log: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut log = log.lock().unwrap();
            log.push_str(&strip_ansi(&line));
            log.push('\n');
        }
    });
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (0x40..=0x7e).
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The port of `http=http://127.0.0.1:PORT` in the `ready` log line.
fn ready_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("ridge-dataplane ready"))?;
    let rest = &line[line.find("http=http://127.0.0.1:")? + "http=http://127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn token(identity: &str, admin: bool) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    auth::mint(
        &Secret::new(SECRET),
        ROOM,
        identity,
        true,
        true,
        admin,
        Duration::from_secs(600),
        now,
    )
    .unwrap()
}

// ----- HTTP and WebSocket clients ---------------------------------------------------

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
async fn http(
    port: u16,
    method: &str,
    path: &str,
    bearer: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<Response> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no complete response within 10 s"))??;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end: {raw:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `POST /whip/{ROOM}` with a valid publish token and a (bogus) SDP offer.
async fn whip(port: u16) -> std::io::Result<Response> {
    http(
        port,
        "POST",
        &format!("/whip/{ROOM}"),
        &token("late-publisher", false),
        "application/sdp",
        "v=0\r\n",
    )
    .await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Joins the room over WebSocket and reads the `welcome`.
async fn join(node: &Node, identity: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(node.ws_url(&token(identity, false)))
        .await
        .expect("WebSocket upgrade");
    let welcome = next_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

/// The next JSON text message (pings and pongs skipped).
async fn next_json(ws: &mut Ws, limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a valid frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON text"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads until the `shutdown` notice; fails on anything but room events.
async fn expect_shutdown_notice(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws, Duration::from_secs(5)).await;
        if v["type"] == "shutdown" {
            return v;
        }
        assert_ne!(v["type"], "error", "{v}");
    }
}

/// Whether the server closed the socket (close frame, EOF or reset) within `limit`.
async fn socket_closes(ws: &mut Ws, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

// ----- tests ---------------------------------------------------------------------

/// SIGTERM with a room session open: the client gets `{"type":"shutdown"}`,
/// new sessions (WHIP, WebSocket) get `503` JSON during the drain, the drain
/// waits for the open session until the drain timeout, then the node closes
/// it, stops listening and exits 0 within drain timeout + 3 s.
#[tokio::test]
async fn sigterm_drains_open_sessions_then_exits_zero() {
    let mut node = Node::start(DRAIN);
    let port = node.http_port;
    let mut ws = join(&node, "alice").await;

    // Before the drain a bogus offer is a client error, not a 503.
    let before = whip(port).await.expect("WHIP before the drain");
    assert_eq!(before.status, 400, "{before:?}");

    let sent = Instant::now();
    node.sigterm();
    let notice = expect_shutdown_notice(&mut ws).await;
    assert_eq!(notice["type"], "shutdown", "{notice}");

    // New work is refused while the drain runs (the session stays open, so
    // the drain lasts the full timeout and the server is still listening).
    let refused = whip(port).await.expect("WHIP during the drain");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("content-type"), Some("application/json"));
    let error = refused.json();
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("draining")),
        "{error}"
    );
    match tokio_tungstenite::connect_async(node.ws_url(&token("late", false))).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503, "{r:?}"),
        Err(e) => panic!("WebSocket upgrade during the drain: {e}"),
        Ok(_) => panic!("WebSocket upgrade accepted during the drain"),
    }
    let health = http(
        port,
        "GET",
        "/healthz",
        &token("ops", true),
        "text/plain",
        "",
    )
    .await
    .expect("healthz during the drain");
    assert_eq!(health.status, 503, "{health:?}");
    assert_eq!(health.json()["status"], "draining", "{health:?}");

    let status = node
        .wait_exit(DRAIN + Duration::from_secs(3))
        .await
        .unwrap_or_else(|| {
            panic!(
                "still running {:?} after SIGTERM:\n{}",
                sent.elapsed(),
                node.log()
            )
        });
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "{status}:\n{}", node.log());
    assert!(
        took >= DRAIN - Duration::from_millis(100),
        "exited after {took:?}, before the drain timeout, with a session open:\n{}",
        node.log()
    );
    eprintln!("node with an open session exited 0 {took:?} after SIGTERM");
    let log = node.log();
    assert!(log.contains("drain timeout reached"), "{log}");
    assert!(log.contains("drained"), "{log}");

    // The session's socket is gone and nothing listens any more.
    assert!(socket_closes(&mut ws, Duration::from_secs(2)).await);
    let after = whip(port).await;
    assert!(
        after.is_err(),
        "a request after exit was answered: {after:?}"
    );
}

/// A client that leaves after the notice ends the drain early: the node exits
/// 0 as soon as no session is left, well before the drain timeout.
#[tokio::test]
async fn drain_ends_when_the_last_session_leaves() {
    let mut node = Node::start(DRAIN);
    let mut ws = join(&node, "bob").await;
    let sent = Instant::now();
    node.sigterm();
    expect_shutdown_notice(&mut ws).await;
    ws.send(Message::text(json!({"type":"leave"}).to_string()))
        .await
        .expect("send leave");
    let status = node
        .wait_exit(DRAIN + Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", node.log()));
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "{status}:\n{}", node.log());
    assert!(
        took < DRAIN,
        "took {took:?}: the drain did not end when the session left:\n{}",
        node.log()
    );
    assert!(
        !node.log().contains("drain timeout reached"),
        "{}",
        node.log()
    );
    eprintln!("node whose last session left exited 0 {took:?} after SIGTERM");
}

/// With no session open, SIGTERM exits 0 within 2 s.
#[tokio::test]
async fn sigterm_without_sessions_exits_zero_quickly() {
    let mut node = Node::start(DRAIN);
    let sent = Instant::now();
    node.sigterm();
    let status = node
        .wait_exit(Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("still running 2 s after SIGTERM:\n{}", node.log()));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", node.log());
    assert!(node.log().contains("drained"), "{}", node.log());
    eprintln!("idle node exited {:?} after SIGTERM", sent.elapsed());
}

/// A second SIGTERM during the drain exits at once, without waiting for the
/// open session or the (long) drain timeout.
#[tokio::test]
async fn second_sigterm_cuts_the_drain_short() {
    let long_drain = Duration::from_secs(20);
    let mut node = Node::start(long_drain);
    let mut ws = join(&node, "carol").await;
    let first = Instant::now();
    node.sigterm();
    expect_shutdown_notice(&mut ws).await;
    // The drain is under way (it is waiting for this open session).
    assert!(node.child.try_wait().unwrap().is_none());
    let second = Instant::now();
    node.sigterm();
    let status = node
        .wait_exit(Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("still running 2 s after a second SIGTERM:\n{}", node.log()));
    // It exited by itself (handling the signal), not killed by it.
    assert!(
        status.code().is_some(),
        "terminated by a signal: {status}:\n{}",
        node.log()
    );
    assert!(first.elapsed() < long_drain);
    assert!(
        node.log().contains("second signal"),
        "the second signal was not handled:\n{}",
        node.log()
    );
    eprintln!(
        "second SIGTERM: exit {status} after {:?} (first SIGTERM {:?} ago)",
        second.elapsed(),
        first.elapsed()
    );
}

/// An invalid configuration exits 64 before binding anything. The test holds
/// the UDP (and HTTP) port it passes, so a node that bound first would fail
/// with a bind error (exit 1) instead; the control run shows that it would.
#[test]
fn invalid_config_exits_64_before_binding() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap().to_string();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = tcp.local_addr().unwrap().to_string();

    let run = |args: &[&str], secret: &str| {
        let mut child = command(args, secret)
            .spawn()
            .expect("start ridge-dataplane");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} still running after 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    };
    let cases: [(&str, [&str; 4], &str); 2] = [
        (
            "plain HTTP on a public address",
            ["--http", "0.0.0.0:9", "--udp", &udp_addr],
            SECRET,
        ),
        (
            "secret too short",
            ["--http", &http_addr, "--udp", &udp_addr],
            "short",
        ),
    ];
    for (what, args, secret) in cases {
        let (status, err) = run(&args, secret);
        assert_eq!(status.code(), Some(EXIT_CONFIG), "{what}: {status}: {err}");
        assert!(err.contains("invalid configuration"), "{what}: {err}");
        assert!(!err.contains("cannot bind"), "{what}: {err}");
    }

    // Control: a valid configuration on the held ports fails to bind (exit 1).
    let (status, err) = run(&["--http", &http_addr, "--udp", &udp_addr], SECRET);
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    assert!(err.contains("cannot bind the media socket"), "{err}");

    // And the ports we passed are still ours: no run took them over. (Not
    // checked by binding them again once released: any other process on
    // the machine, such as a test beside this one, may take a freed
    // ephemeral port at once.)
    assert_eq!(udp.local_addr().unwrap().to_string(), udp_addr);
    assert_eq!(tcp.local_addr().unwrap().to_string(), http_addr);
}
