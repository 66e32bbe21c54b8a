//! The node tried as an attacker would, on loopback, against the real
//! binary: WebSocket session caps, slow readers under a data flood (the
//! node's RSS read from /proc), chat rate limits, sessions that outlive
//! their token, idle and half-sent HTTP connections under a lowered
//! descriptor limit, the control socket path, admin session deletion,
//! secret files' modes and the unauthenticated probes.
//!
//! Each test starts its own node on ephemeral ports and reads the HTTP port
//! from the `ready` log line.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use ridge_dataplane::auth;
use ridge_dataplane::config::Secret;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, Message};

const BIN: &str = env!("CARGO_BIN_EXE_ridge-dataplane");
const SECRET: &str = "abuse-test-secret-0123456789abcdef";
const ROOM: &str = "abuse";

// ----- the node process ---------------------------------------------------------

/// A running `ridge-dataplane`, killed on drop if it is still running.
struct Node {
    child: Child,
    log: Arc<Mutex<String>>,
    port: u16,
}

impl Node {
    /// Starts the node with `args` (after the test defaults), under a
    /// descriptor limit of `nofile` when given, and waits for `ready`.
    fn start(args: &[&str], nofile: Option<u64>) -> Node {
        let mut all = vec![
            "--http",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--xdp",
            "off",
            "--drain-timeout",
            "3s",
        ];
        all.extend_from_slice(args);
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let socket = scratch(&format!(
            "node-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ))
        .join("dp.sock");
        let socket = socket.to_str().unwrap().to_owned();
        if !args.contains(&"--control-socket") {
            all.extend_from_slice(&["--control-socket", &socket]);
        }
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(&all)
            .env("RIDGE_JWT_SECRET", SECRET)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start ridge-dataplane");
        let log = Arc::new(Mutex::new(String::new()));
        capture(child.stdout.take().expect("stdout"), log.clone());
        capture(child.stderr.take().expect("stderr"), log.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
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
        Node { child, log, port }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The node's resident set in bytes (VmRSS of /proc/<pid>/status).
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        kb * 1024
    }

    fn ws_url(&self, token: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/v1/rooms/{ROOM}/ws?token={token}",
            self.port
        )
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// The value of one sample of `/metrics`; 0 when absent.
    async fn metric(&self, sample: &str) -> f64 {
        let r = http(self.port, "GET", "/metrics", Some(&admin_token()), "", "")
            .await
            .expect("GET /metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
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

fn capture(stream: impl Read + Send + 'static, log: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

fn ready_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("ridge-dataplane ready"))?;
    let key = "http=http://127.0.0.1:";
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Runs the binary to completion with `args` and returns its status and
/// output.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RIDGE_JWT_SECRET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run ridge-dataplane");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mint(
    room: &str,
    identity: &str,
    publish: bool,
    subscribe: bool,
    admin: bool,
    ttl: u64,
) -> String {
    auth::mint(
        &Secret::new(SECRET),
        room,
        identity,
        publish,
        subscribe,
        admin,
        Duration::from_secs(ttl),
        now_unix(),
    )
    .unwrap()
}

fn token(identity: &str) -> String {
    mint(ROOM, identity, true, true, false, 600)
}

fn admin_token() -> String {
    mint("*", "operator", false, false, true, 600)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ridge-abuse-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ----- HTTP and WebSocket clients ---------------------------------------------------

#[derive(Debug)]
struct Response {
    status: u16,
    body: String,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
async fn http(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    content_type: &str,
    body: &str,
) -> std::io::Result<Response> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    request_on(stream, port, method, path, bearer, content_type, body).await
}

async fn request_on(
    mut stream: tokio::net::TcpStream,
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    content_type: &str,
    body: &str,
) -> std::io::Result<Response> {
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\
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
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a room socket and reads its `welcome`; the HTTP refusal otherwise.
async fn try_join(node: &Node, token: &str) -> Result<(Ws, Value), (u16, String)> {
    match tokio_tungstenite::connect_async(node.ws_url(token)).await {
        Ok((mut ws, _)) => {
            let welcome = next_json(&mut ws, Duration::from_secs(10)).await;
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            Ok((ws, welcome))
        }
        Err(tungstenite::Error::Http(r)) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Err((r.status().as_u16(), body))
        }
        Err(e) => panic!("WebSocket connect failed: {e}"),
    }
}

async fn join(node: &Node, token: &str) -> Ws {
    match try_join(node, token).await {
        Ok((ws, _)) => ws,
        Err((status, body)) => panic!("upgrade refused: {status} {body}"),
    }
}

async fn next_json(ws: &mut Ws, limit: Duration) -> Value {
    try_next_json(ws, limit)
        .await
        .unwrap_or_else(|| panic!("no message within {limit:?}"))
}

/// The next JSON text message within `limit`, `None` on timeout; panics if
/// the socket ends.
async fn try_next_json(ws: &mut Ws, limit: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(m) => m.expect("the socket is open").expect("a valid frame"),
        };
        match msg {
            Message::Text(t) => return Some(serde_json::from_str(&t).expect("JSON text")),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads until the socket closes within `limit`; the close frame, if any,
/// and every JSON message read on the way.
async fn read_until_closed(
    ws: &mut Ws,
    limit: Duration,
) -> Option<(Option<(u16, String)>, Vec<Value>)> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(None | Some(Err(_))) => return Some((None, seen)),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Some((
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    seen,
                ));
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                seen.push(serde_json::from_str(&t).expect("JSON text"));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

// ----- WebSocket sessions --------------------------------------------------------

/// One identity may hold `ws_max_sessions_per_identity` (default 16) room
/// sessions; the next upgrade is refused with 429 naming the limit, and
/// counted; a session that leaves frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_sessions_past_the_per_identity_cap_are_refused() {
    let node = Node::start(&[], None);
    let t = token("mallory");
    let mut held = Vec::new();
    for i in 0..16 {
        match try_join(&node, &t).await {
            Ok((ws, _)) => held.push(ws),
            Err((s, b)) => panic!("session {i} refused below the cap: {s} {b}"),
        }
    }
    for _ in 0..4 {
        match try_join(&node, &t).await {
            Ok(_) => panic!("a 17th session of one identity was admitted"),
            Err((status, body)) => {
                assert_eq!(status, 429, "{body}");
                assert!(body.contains("ws_max_sessions_per_identity"), "{body}");
            }
        }
    }
    // Another identity is not affected.
    let _other = join(&node, &token("alice")).await;
    assert_eq!(
        node.metric("ridge_ws_sessions_refused_total{limit=\"per_identity\"}")
            .await,
        4.0
    );
    // Leaving frees a place.
    let mut first = held.remove(0);
    first
        .send(Message::text(json!({"type":"leave"}).to_string()))
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut first, Duration::from_secs(5))
            .await
            .is_some()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match try_join(&node, &t).await {
            Ok(_) => break,
            Err((s, b)) => assert!(
                Instant::now() < deadline,
                "still refused after a leave: {s} {b}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node-wide cap (`--ws-max-sessions`) refuses past its value, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_sessions_past_the_node_cap_are_refused() {
    let node = Node::start(&["--ws-max-sessions", "5"], None);
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(join(&node, &token(&format!("user-{i}"))).await);
    }
    match try_join(&node, &token("user-5")).await {
        Ok(_) => panic!("a sixth session was admitted past ws_max_sessions = 5"),
        Err((status, body)) => {
            assert_eq!(status, 429, "{body}");
            assert!(body.contains("ws_max_sessions"), "{body}");
        }
    }
    assert_eq!(
        node.metric("ridge_ws_sessions_refused_total{limit=\"total\"}")
            .await,
        1.0
    );
}

/// 100 sessions that never read while 10 senders flood 16 KB data
/// messages: the node's RSS stays under a stated bound, slow readers are
/// disconnected and counted, and the idle cost per session is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout, reason = "the RSS figures are the report")]
async fn slow_readers_under_a_data_flood_keep_rss_bounded() {
    const READERS: usize = 100;
    const SENDERS: usize = 10;
    /// The node's growth over its idle baseline may not pass this.
    const BOUND: u64 = 200 * 1024 * 1024;
    let node = Node::start(&[], None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = node.rss();
    let mut readers = Vec::new();
    for i in 0..READERS {
        readers.push(join(&node, &token(&format!("reader-{i}"))).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = node.rss();
    println!(
        "RSS: {} MiB at start, {} MiB with {READERS} idle sessions: {} KiB per idle session",
        base >> 20,
        idle >> 20,
        idle.saturating_sub(base) / READERS as u64 / 1024
    );
    let payload = "x".repeat(16_000);
    let msg = json!({"type":"data","payload":payload}).to_string();
    let mut tasks = Vec::new();
    for i in 0..SENDERS {
        let ws = join(&node, &token(&format!("sender-{i}"))).await;
        let msg = msg.clone();
        tasks.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(6);
            let (mut sink, mut stream) = ws.split();
            // Drain what the node sends the sender (its errors, the others'
            // data), so that only the readers are slow.
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            while Instant::now() < until {
                if sink.send(Message::text(msg.clone())).await.is_err() {
                    break;
                }
            }
            drain.abort();
        }));
    }
    let mut peak = idle;
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        peak = peak.max(node.rss());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    peak = peak.max(node.rss());
    println!(
        "RSS under the flood: peak {} MiB ({} MiB over the idle sessions)",
        peak >> 20,
        peak.saturating_sub(idle) >> 20
    );
    assert!(
        peak.saturating_sub(base) < BOUND,
        "RSS grew by {} MiB under the flood (bound {} MiB)",
        peak.saturating_sub(base) >> 20,
        BOUND >> 20
    );
    drop(readers);
}

/// A chat flood from one participant is cut to the token bucket (default
/// 20/s, burst 40): the sender gets `rate_limited` errors and the room sees
/// at most the burst plus the refill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_floods_are_rate_limited() {
    let node = Node::start(&[], None);
    let mut flooder = join(&node, &token("flooder")).await;
    let mut listener = join(&node, &token("listener")).await;
    let started = Instant::now();
    for i in 0..1000 {
        flooder
            .send(Message::text(
                json!({"type":"chat","text":format!("m{i}")}).to_string(),
            ))
            .await
            .unwrap();
    }
    let mut chats = 0;
    while let Some(v) = try_next_json(&mut listener, Duration::from_millis(800)).await {
        if v["type"] == "chat" {
            chats += 1;
        }
    }
    let allowed = 40 + 20 * (started.elapsed().as_secs() as usize + 1);
    assert!(
        chats <= allowed,
        "{chats} of 1000 flooded chats were relayed (allowed {allowed})"
    );
    let mut limited = 0;
    while let Some(v) = try_next_json(&mut flooder, Duration::from_millis(300)).await {
        if v["type"] == "error" && v["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited > 0, "the flooder was never told it is rate limited");
    assert!(
        node.metric("ridge_ws_rate_limited_total{kind=\"chat\"}")
            .await
            >= 900.0
    );
}

// ----- token expiry ---------------------------------------------------------------

/// A session whose token expires gets `token_expiring` first and is closed
/// at expiry (plus the 5 s leeway) with a reason; it accepts nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_session_ends_when_its_token_expires() {
    let node = Node::start(&[], None);
    let short = mint(ROOM, "shortlived", true, true, false, 2);
    let (mut ws, welcome) = try_join(&node, &short).await.expect("join");
    let exp = welcome["token_exp"].as_u64();
    let warn = next_json(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(warn["type"], "token_expiring", "{warn}");
    assert!(exp.is_some(), "welcome carries token_exp: {welcome}");
    let (close, _) = read_until_closed(&mut ws, Duration::from_secs(12))
        .await
        .expect("the session is closed at expiry");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
}

/// A fresh token of the same identity and room, with no wider grants, keeps
/// the session past the first token's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_refresh_extends_the_session_and_refuses_wider_tokens() {
    let node = Node::start(&[], None);
    let first = mint(ROOM, "refresher", false, true, false, 2);
    let (mut ws, _) = try_join(&node, &first).await.expect("join");
    let warn = next_json(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(warn["type"], "token_expiring", "{warn}");
    // Wider grants, another identity, another room: refused.
    for (bad, what) in [
        (mint(ROOM, "refresher", true, true, false, 600), "publish"),
        (
            mint(ROOM, "someone-else", false, true, false, 600),
            "identity",
        ),
        (
            mint("other-room", "refresher", false, true, false, 600),
            "room",
        ),
        ("not-a-token".to_string(), "invalid"),
    ] {
        ws.send(Message::text(
            json!({"type":"refresh","token":bad}).to_string(),
        ))
        .await
        .unwrap();
        let r = next_json(&mut ws, Duration::from_secs(3)).await;
        assert_eq!(r["type"], "error", "{what}: {r}");
        assert_eq!(r["request"], "refresh", "{what}: {r}");
    }
    let fresh = mint(ROOM, "refresher", false, true, false, 600);
    ws.send(Message::text(
        json!({"type":"refresh","token":fresh}).to_string(),
    ))
    .await
    .unwrap();
    let r = next_json(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(r["type"], "refreshed", "{r}");
    // Past the first token's expiry and leeway the session still answers.
    tokio::time::sleep(Duration::from_secs(9)).await;
    ws.send(Message::text(json!({"type":"ping"}).to_string()))
        .await
        .unwrap();
    let pong = next_json(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

// ----- HTTP connections -------------------------------------------------------------

/// 500 idle or half-sent connections from one address against a node whose
/// descriptor limit is 64: a request from another address is still
/// answered at once, the connections past the per-source cap are refused
/// and counted, and the idle ones are closed by the header timeout (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_and_the_node_answers() {
    // Default limits: a 10 s header timeout, and caps derived from the
    // descriptor limit (half of it in all, half of that per source).
    let node = Node::start(&[], Some(64));
    let addr: SocketAddr = format!("127.0.0.1:{}", node.port).parse().unwrap();
    let mut conns = Vec::new();
    let mut unaccepted = 0;
    for i in 0..500 {
        // A connect that does not complete at once sits past the listen
        // backlog: the node is not accepting.
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await
        else {
            unaccepted += 1;
            if unaccepted == 10 {
                break;
            }
            continue;
        };
        if i % 2 == 1 {
            let _ = s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n").await;
        }
        conns.push(s);
    }
    let opened = Instant::now();
    assert!(
        unaccepted < 10,
        "{unaccepted} of 500 connects never completed"
    );
    // A request from another source address is answered.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(3), sock.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        request_on(stream, node.port, "GET", "/livez", None, "", ""),
    )
    .await
    .expect("an answer within 3 s while 500 connections are open")
    .expect("a response");
    assert_eq!(r.status, 200);
    // Every one of the 500 is closed by the node, on time.
    let mut buf = [0u8; 256];
    for (i, s) in conns.iter_mut().enumerate() {
        let left = Duration::from_secs(14).saturating_sub(opened.elapsed());
        match tokio::time::timeout(left, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await
        {
            Ok(()) => {}
            Err(_) => panic!(
                "connection {i} still open {:?} after it was opened",
                opened.elapsed()
            ),
        }
    }
    let refused = node
        .metric("ridge_http_connections_refused_total{limit=\"per_source\"}")
        .await;
    assert!(refused > 0.0, "no refusal counted");
    assert!(node.log().contains("connection limit"), "{}", node.log());
}

/// A request whose body stops half-way is ended by the body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_off() {
    let node = Node::start(&["--http-body-timeout", "1s"], None);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .unwrap();
    let head = format!(
        "POST /whip/{ROOM} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/sdp\r\nContent-Length: 5000\r\n\r\nv=0\r\n",
        token("slow-poster")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    assert!(
        r.is_ok(),
        "the half-sent body is still waited for after 5 s"
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut off before the timeout: {text}"
    );
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4"),
        "answered with {text}"
    );
}

/// The accept loop survives running out of descriptors: it logs (once per
/// second at most), counts, backs off and serves again once the idle
/// connections are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_survives_running_out_of_descriptors() {
    let node = Node::start(
        &[
            "--http-header-timeout",
            "2s",
            "--http-max-connections",
            "1000",
            "--http-max-connections-per-source",
            "1000",
        ],
        Some(64),
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", node.port).parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..120 {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            conns.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(conns);
    // Served again once the idle ones are gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(3),
            http(node.port, "GET", "/livez", None, "", ""),
        )
        .await
            && r.status == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never answered again:\n{}",
            node.log()
        );
    }
    let log = node.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("out of file descriptors"))
        .count();
    assert!(lines >= 1, "EMFILE never logged:\n{log}");
    assert!(lines <= 30, "EMFILE logged {lines} times: not rate limited");
    assert!(
        node.metric("ridge_http_accept_errors_total{kind=\"emfile\"}")
            .await
            > 0.0
    );
}

// ----- control socket, admin, secrets, probes ------------------------------------------

/// `--control-socket` at a regular file: the node refuses to start and the
/// file is untouched.
#[test]
fn control_socket_refuses_to_replace_a_regular_file() {
    let dir = scratch("ctl");
    let path = dir.join("precious.txt");
    std::fs::write(&path, "keep me").unwrap();
    let out = Command::new(BIN)
        .args([
            "--http",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--xdp",
            "off",
            "--control-socket",
        ])
        .arg(&path)
        .env("RIDGE_JWT_SECRET", SECRET)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let out = wait_with_limit(out, Duration::from_secs(10));
    assert_eq!(
        std::fs::read_to_string(&path).ok().as_deref(),
        Some("keep me"),
        "the regular file was replaced"
    );
    let (status, text) = out.expect("the node refused to start");
    assert!(!status.success(), "{text}");
    assert!(text.contains("not a socket"), "{text}");
    // A directory is refused too.
    let sub = dir.join("a-dir");
    std::fs::create_dir(&sub).unwrap();
    let (status, text) = wait_with_limit(
        Command::new(BIN)
            .args([
                "--http",
                "127.0.0.1:0",
                "--udp",
                "127.0.0.1:0",
                "--shards",
                "1",
                "--xdp",
                "off",
                "--control-socket",
            ])
            .arg(&sub)
            .env("RIDGE_JWT_SECRET", SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(10),
    )
    .expect("the node refused to start");
    assert!(!status.success() && text.contains("not a socket"), "{text}");
    assert!(sub.is_dir());
}

/// A stale socket is replaced and the new one is mode 0600; a live one is
/// refused as "another node is serving".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_replaces_only_a_stale_socket() {
    let dir = scratch("ctl-stale");
    let path = dir.join("dp.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let p = path.to_str().unwrap().to_owned();
    let node = Node::start(&["--control-socket", &p], None);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = Command::new(BIN)
        .args([
            "--http",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--xdp",
            "off",
            "--control-socket",
            &p,
        ])
        .env("RIDGE_JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, text) = wait_with_limit(second, Duration::from_secs(10)).expect("exits");
    assert!(!status.success(), "{text}");
    assert!(text.contains("another node is serving"), "{text}");
    drop(node);
}

fn wait_with_limit(mut child: Child, limit: Duration) -> Option<(ExitStatus, String)> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut text = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut text);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut text);
            }
            return Some((status, text));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An admin token (room "*", no media grants) ends another identity's
/// session, as docs/api.md says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_ends_another_identitys_session() {
    let node = Node::start(&[], None);
    let body =
        json!({"direction":"publish","kind":"video","remote":"127.0.0.1:9","payload_type":96})
            .to_string();
    let r = http(
        node.port,
        "POST",
        &format!("/v1/rooms/{ROOM}/rtp"),
        Some(&token("alice")),
        "application/json",
        &body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let id = serde_json::from_str::<Value>(&r.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/rooms/{ROOM}/rtp/{id}");
    // Another ordinary identity may not.
    let r = http(node.port, "DELETE", &path, Some(&token("bob")), "", "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http(node.port, "DELETE", &path, Some(&admin_token()), "", "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "admin DELETE: {}", r.body);
    let r = http(node.port, "DELETE", &path, Some(&admin_token()), "", "")
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

/// A config file holding `jwt_secret` and a TLS key file must not be
/// readable by group or others: the node refuses them before binding.
#[test]
fn secret_files_readable_by_others_are_refused() {
    let dir = scratch("secrets");
    let cfg = dir.join("node.toml");
    std::fs::write(&cfg, format!("jwt_secret = \"{SECRET}\"\n")).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = cfg.to_str().unwrap();
    let (status, text) = run_to_exit(&["check-config", "--config", c]);
    assert_eq!(status.code(), Some(64), "{text}");
    assert!(text.contains("readable by group or others"), "{text}");
    assert!(!text.contains(SECRET), "the secret leaked: {text}");
    // The token subcommand reads the same file and refuses it too.
    let (status, text) = run_to_exit(&["token", "--room", "r", "--identity", "i", "--config", c]);
    assert_eq!(status.code(), Some(64), "{text}");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, text) = run_to_exit(&["check-config", "--config", c]);
    assert!(status.success(), "{text}");
    // A config file without a secret may be world-readable.
    let plain = dir.join("plain.toml");
    std::fs::write(&plain, "max_sessions = 10\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, text) = run_to_exit(&[
        "check-config",
        "--dev-no-auth",
        "--config",
        plain.to_str().unwrap(),
    ]);
    assert!(status.success(), "{text}");
    // The TLS key.
    let key = dir.join("key.pem");
    let cert = dir.join("cert.pem");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n").unwrap();
    std::fs::write(&cert, "not checked before the key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (status, text) = run_to_exit(&[
        "check-config",
        "--dev-no-auth",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(64), "{text}");
    assert!(
        text.contains("tls_key") && text.contains("readable by group or others"),
        "{text}"
    );
    assert_file_kept(&key);
}

fn assert_file_kept(p: &Path) {
    let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the node changed the key's mode");
}

/// `/livez` and `/readyz` answer without a token, status codes only;
/// `/readyz` turns 503 while the node drains; `/healthz` stays admin-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_need_no_token_and_readyz_is_503_while_draining() {
    let node = Node::start(&[], None);
    let live = http(node.port, "GET", "/livez", None, "", "")
        .await
        .unwrap();
    assert_eq!(live.status, 200, "{}", live.body);
    assert!(
        live.body.is_empty(),
        "probe bodies carry no detail: {}",
        live.body
    );
    let ready = http(node.port, "GET", "/readyz", None, "", "")
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(ready.body.is_empty(), "{}", ready.body);
    let health = http(node.port, "GET", "/healthz", None, "", "")
        .await
        .unwrap();
    assert_eq!(health.status, 401, "{}", health.body);
    // A room session keeps the drain going (3 s) while /readyz is watched.
    let _ws = join(&node, &token("stayer")).await;
    node.sigterm();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = http(node.port, "GET", "/readyz", None, "", "")
            .await
            .unwrap();
        if r.status == 503 {
            assert!(r.body.is_empty(), "{}", r.body);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never turned 503 while draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = http(node.port, "GET", "/livez", None, "", "")
        .await
        .unwrap();
    assert_eq!(live.status, 200);
}

/// A WebSocket room session is a session of the node like a WHIP one: it
/// holds a place in the cores' quota ledger, so one identity's room
/// sessions count toward its share of `max_sessions` (a quarter by default:
/// 2 of 8 here), and the next one is refused with 429 naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_sessions_count_toward_the_session_quotas() {
    let node = Node::start(&["--max-sessions", "8"], None);
    let t = token("mallory");
    let _first = join(&node, &t).await;
    let _second = join(&node, &t).await;
    match try_join(&node, &t).await {
        Ok(_) => panic!("a third room session of one identity was admitted past its quota of 2"),
        Err((status, body)) => {
            assert_eq!(status, 429, "{body}");
            assert!(body.contains("quota exceeded"), "{body}");
            assert!(body.contains("_sessions"), "{body}");
        }
    }
    // Another identity still gets in.
    let _other = join(&node, &token("alice")).await;
}
