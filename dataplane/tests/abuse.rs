//! A real node against an attacker with a valid token, over HTTP and UDP
//! on loopback: a flood of WHIP sessions that never do ICE, and plain-RTP
//! subscribers aimed at ports that never asked for media.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ridge_dataplane::Node;
use ridge_dataplane::auth;
use ridge_dataplane::config::{self, FileConfig, Overrides, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const SECRET: &str = "abuse-test-secret-0123456789";
/// A WHIP publish offer (audio, video) without candidates: str0m's ICE
/// agent has no pair to time out, so only the node's handshake timeout
/// ends such a session.
const OFFER: &str = include_str!("data/whip_offer_no_candidates.sdp");

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn token(identity: &str, admin: bool) -> String {
    auth::mint(
        &Secret::new(SECRET),
        "*",
        identity,
        true,
        true,
        admin,
        Duration::from_secs(3600),
        now_unix(),
    )
    .unwrap()
}

async fn start(configure: impl FnOnce(&mut Overrides)) -> Node {
    let mut overrides = Overrides {
        http: Some("127.0.0.1:0".parse().unwrap()),
        udp: Some("127.0.0.1:0".parse().unwrap()),
        shards: Some(1),
        pin_cores: Some(false),
        jwt_secret: Some(Secret::new(SECRET)),
        control_socket: Some("".into()),
        ..Overrides::default()
    };
    configure(&mut overrides);
    let cfg = config::build(FileConfig::default(), &overrides, None).expect("config");
    Node::start(cfg).await.expect("node")
}

/// One HTTP/1.1 request; returns the status and the body.
async fn http(
    node: &Node,
    method: &str,
    path: &str,
    token: &str,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(node.http_addr()).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: ridge\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn whip(node: &Node, token: &str) -> (u16, String) {
    http(node, "POST", "/whip/flood", token, "application/sdp", OFFER).await
}

async fn metric(node: &Node, series: &str) -> f64 {
    let (_, text) = http(
        node,
        "GET",
        "/metrics",
        &token("ops", true),
        "text/plain",
        "",
    )
    .await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whip_flood_from_one_token_is_refused_with_429_others_are_served_and_reaped() {
    // 40 sessions in all; one identity gets a quarter of them by default.
    let node = start(|o| {
        o.max_sessions = Some(40);
        o.handshake_timeout = Some(Duration::from_secs(3));
    })
    .await;
    let mallory = token("mallory", false);
    let mut created = 0;
    let mut refused = Vec::new();
    for _ in 0..100 {
        match whip(&node, &mallory).await {
            (201, _) => created += 1,
            (status, body) => refused.push((status, body)),
        }
    }
    assert_eq!(created, 10, "the identity's default quota (40 / 4)");
    assert_eq!(refused.len(), 90);
    for (status, body) in &refused {
        assert_eq!(*status, 429, "{body}");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["limit"], "identity_sessions", "{body}");
        assert_eq!(v["error"], "quota exceeded: identity_sessions (at most 10)");
    }
    // Everybody else is still served, on WHIP and on plain RTP.
    let alice = token("alice", false);
    let (status, body) = whip(&node, &alice).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(
        &node,
        "POST",
        "/v1/rooms/flood/rtp",
        &alice,
        "application/json",
        &json!({"direction":"publish","kind":"audio","remote":"127.0.0.1:40000",
                "payload_type":111,"ssrc":1234})
        .to_string(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        metric(
            &node,
            "ridge_quota_refusals_total{limit=\"identity_sessions\"}"
        )
        .await,
        90.0
    );

    // Nobody does ICE: the WHIP sessions are reaped after the handshake
    // timeout, and the token can open sessions again.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(
        metric(&node, "ridge_sessions_reaped_total{reason=\"handshake\"}").await,
        11.0
    );
    assert_eq!(
        metric(&node, "ridge_sessions{transport=\"webrtc\"}").await,
        0.0
    );
    let (status, body) = whip(&node, &mallory).await;
    assert_eq!(status, 201, "{body}");
    node.shutdown();
    node.wait().await.unwrap();
}

/// A plain VP8 keyframe packet.
fn key_packet(seq: u16) -> Vec<u8> {
    common::vp8_rtp(0x5151_0001, seq, true, 200)
}

async fn received(sock: &UdpSocket, wait: Duration) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 2048];
    while tokio::time::timeout(wait, sock.recv(&mut buf))
        .await
        .is_ok()
    {
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_subscribers_of_a_real_node_wait_for_their_remote() {
    let node = start(|o| o.rtp_consent_timeout = Some(Duration::from_secs(2))).await;
    let t = token("mallory", false);
    let endpoint = |direction: &str, remote: SocketAddr, ssrc: Option<u32>| {
        let body = json!({"direction":direction,"kind":"video","remote":remote.to_string(),
                          "payload_type":common::PT,"ssrc":ssrc});
        body.to_string()
    };
    let rtp = |body: String| {
        let t = t.clone();
        let node = &node;
        async move {
            let (status, body) = http(
                node,
                "POST",
                "/v1/rooms/consent/rtp",
                &t,
                "application/json",
                &body,
            )
            .await;
            (
                status,
                serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let publisher = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (status, info) = rtp(endpoint(
        "publish",
        publisher.local_addr().unwrap(),
        Some(0x5151_0001),
    ))
    .await;
    assert_eq!(status, 201, "{info}");
    let local: SocketAddr = info["local"].as_str().unwrap().parse().unwrap();
    let wanting = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for s in [&wanting, &silent] {
        let (status, info) = rtp(endpoint("subscribe", s.local_addr().unwrap(), None)).await;
        assert_eq!(status, 201, "{info}");
    }
    // Broadcast and multicast remotes are refused outright.
    for bad in ["255.255.255.255:5004", "224.0.0.1:5004"] {
        let (status, body) = rtp(endpoint("subscribe", bad.parse().unwrap(), None)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("not a unicast"),
            "{body}"
        );
    }

    for seq in 0..20 {
        publisher.send_to(&key_packet(seq), local).await.unwrap();
    }
    assert_eq!(received(&wanting, Duration::from_millis(300)).await, 0);
    assert_eq!(received(&silent, Duration::from_millis(10)).await, 0);

    // The remote that wants the stream sends one RTCP packet first.
    let mut rr = vec![0x80, 201, 0x00, 0x01];
    rr.extend_from_slice(&0x7777u32.to_be_bytes());
    wanting.send_to(&rr, local).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for seq in 20..40 {
        publisher.send_to(&key_packet(seq), local).await.unwrap();
    }
    assert_eq!(received(&wanting, Duration::from_millis(300)).await, 20);
    assert_eq!(received(&silent, Duration::from_millis(10)).await, 0);

    // The silent one is reaped after the consent timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        metric(&node, "ridge_sessions_reaped_total{reason=\"rtp_consent\"}").await,
        1.0
    );
    assert_eq!(
        metric(&node, "ridge_sessions{transport=\"rtp\"}").await,
        2.0
    );
    node.shutdown();
    node.wait().await.unwrap();
}
