//! Hostile and malformed input against a live node: bad SDP, bad tokens,
//! garbage UDP and a STUN flood, bad plain-RTP requests, CORS preflights.
//! Every case asserts the exact status, the JSON error body and the
//! counters the node keeps for it.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ridge_dataplane::auth::{self, Claims};
use ridge_dataplane::config::Secret;
use ridge_tests::node::{HttpResponse, SECRET, TestNode, http, metric_value};
use serde_json::{Value, json};
use tokio::net::UdpSocket;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Asserts an error response: JSON content type and a non-empty
/// `{"error": "..."}`; returns the message.
fn json_error(r: &HttpResponse, what: &str) -> String {
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: content-type {ct:?}, body {:?}",
        r.body
    );
    let v: Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", r.body));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no string `error` in {v}"));
    assert!(!msg.trim().is_empty(), "{what}: empty error message");
    msg.to_string()
}

async fn request(
    node: &TestNode,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    http(&node.base_url(), method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
}

/// A WHIP/WHEP POST with a bearer token (or none) and a content type.
async fn post_sdp(
    node: &TestNode,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &str,
) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", content_type)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    request(node, "POST", path, &headers, body).await
}

async fn metric(node: &TestNode, sample: &str) -> f64 {
    node.metric(sample)
        .await
        .unwrap_or_else(|e| panic!("reading {sample}: {e:#}"))
}

const BAD_SDP: &str = r#"ridge_bad_requests_total{reason="sdp"}"#;

/// An offer that parses as SDP but has no m-line at all.
const SDP_NO_MEDIA: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:0123456789abcdef0123456789\r\n\
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
a=setup:actpass\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sdp_is_400_with_json_error() {
    init_tracing();
    let node = TestNode::start().await.expect("node");
    let token = node.token("sdp-room", "alice", true, true);
    let bodies: [(&str, &str); 4] = [
        (
            "garbage",
            "hello, this is certainly not an SDP offer \u{1f600}",
        ),
        ("empty", ""),
        (
            "v=0 then junk",
            "v=0\r\nthis is junk\r\n%%%% more junk ====\r\nm=nonsense\r\n",
        ),
        ("no media", SDP_NO_MEDIA),
    ];
    for path in ["/whip/sdp-room", "/whep/sdp-room"] {
        for (what, body) in bodies {
            let before = metric(&node, BAD_SDP).await;
            let r = post_sdp(&node, path, Some(&token), "application/sdp", body).await;
            let what = format!("{path} with {what}");
            assert_eq!(r.status, 400, "{what}: {}", r.body);
            json_error(&r, &what);
            assert!(r.header("location").is_none(), "{what}: has a Location");
            let after = metric(&node, BAD_SDP).await;
            assert_eq!(after, before + 1.0, "{what}: bad_requests{{sdp}} counter");
        }
    }
    assert_eq!(metric(&node, BAD_SDP).await, 8.0);

    // A bad offer leaves no session or participant behind.
    let text = node.metrics().await.expect("metrics");
    assert_eq!(
        metric_value(&text, r#"ridge_sessions{transport="webrtc"}"#),
        0.0,
        "{text}"
    );
    assert_eq!(metric_value(&text, "ridge_rooms"), 0.0, "{text}");

    // The wrong content type is 415, whatever the body.
    for path in ["/whip/sdp-room", "/whep/sdp-room"] {
        for ct in ["text/plain", "application/json", "multipart/form-data"] {
            let r = post_sdp(&node, path, Some(&token), ct, SDP_NO_MEDIA).await;
            let what = format!("{path} as {ct}");
            assert_eq!(r.status, 415, "{what}: {}", r.body);
            let msg = json_error(&r, &what);
            assert!(msg.contains("application/sdp"), "{what}: {msg}");
        }
        // No Content-Type at all.
        let auth = format!("Bearer {token}");
        let r = request(
            &node,
            "POST",
            path,
            &[("Authorization", &auth)],
            SDP_NO_MEDIA,
        )
        .await;
        assert_eq!(r.status, 415, "{path} without content type: {}", r.body);
        json_error(&r, "no content type");
    }
}

/// Base64url without padding, for hand-made tokens.
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn claims(room: &str, publish: bool, subscribe: bool, admin: bool, exp: u64) -> Claims {
    Claims {
        room: room.into(),
        sub: "mallory".into(),
        can_publish: publish,
        can_subscribe: subscribe,
        admin,
        exp,
        iat: now_unix().saturating_sub(7200),
        jti: None,
        limits: None,
        codecs: None,
    }
}

fn auth_failures(text: &str, reason: &str) -> f64 {
    metric_value(
        text,
        &format!("ridge_auth_failures_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_counted() {
    init_tracing();
    let node = TestNode::start().await.expect("node");
    let secret = Secret::new(SECRET);
    let in_an_hour = now_unix() + 3600;
    let expired = auth::sign(
        &secret,
        &claims("tok-room", true, true, true, now_unix() - 3600),
    )
    .unwrap();
    let forged = auth::sign(
        &Secret::new("some-other-secret-0123456789abcdef"),
        &claims("tok-room", true, true, true, in_an_hour),
    )
    .unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(
            serde_json::to_string(&claims("tok-room", true, true, true, in_an_hour))
                .unwrap()
                .as_bytes()
        )
    );
    // The same claims, signed properly, are accepted: the refusals below are
    // about the signature and algorithm, not the claims.
    let good = auth::sign(&secret, &claims("tok-room", true, true, false, in_an_hour)).unwrap();
    let other_room = node.token("another-room", "mallory", true, true);
    let subscribe_only = node.token("tok-room", "mallory", false, true);

    struct Case<'a> {
        what: &'a str,
        token: Option<&'a str>,
        status: u16,
        reason: &'a str,
    }
    let cases = [
        Case {
            what: "missing",
            token: None,
            status: 401,
            reason: "missing",
        },
        Case {
            what: "expired",
            token: Some(&expired),
            status: 401,
            reason: "expired",
        },
        Case {
            what: "forged",
            token: Some(&forged),
            status: 401,
            reason: "invalid",
        },
        Case {
            what: "alg none",
            token: Some(&alg_none),
            status: 401,
            reason: "invalid",
        },
        Case {
            what: "wrong room",
            token: Some(&other_room),
            status: 403,
            reason: "wrong_room",
        },
        Case {
            what: "subscribe-only on WHIP",
            token: Some(&subscribe_only),
            status: 403,
            reason: "forbidden",
        },
    ];
    let reasons = ["missing", "expired", "invalid", "wrong_room", "forbidden"];
    for case in &cases {
        let before = node.metrics().await.unwrap();
        let r = post_sdp(
            &node,
            "/whip/tok-room",
            case.token,
            "application/sdp",
            SDP_NO_MEDIA,
        )
        .await;
        assert_eq!(r.status, case.status, "{}: {}", case.what, r.body);
        let msg = json_error(&r, case.what);
        assert!(
            !case.token.is_some_and(|t| msg.contains(t)),
            "{}: the error echoes the token",
            case.what
        );
        let challenge = r.header("www-authenticate");
        if case.status == 401 {
            let challenge =
                challenge.unwrap_or_else(|| panic!("{}: 401 without WWW-Authenticate", case.what));
            assert!(
                challenge.starts_with("Bearer"),
                "{}: challenge {challenge:?}",
                case.what
            );
        }
        let after = node.metrics().await.unwrap();
        for reason in reasons {
            let want = auth_failures(&before, reason) + f64::from(reason == case.reason);
            assert_eq!(
                auth_failures(&after, reason),
                want,
                "{}: ridge_auth_failures_total{{reason={reason:?}}}",
                case.what
            );
        }
    }

    // The good token passes authentication (the empty offer is then a 400).
    let r = post_sdp(&node, "/whip/tok-room", Some(&good), "application/sdp", "").await;
    assert_eq!(r.status, 400, "good token: {}", r.body);

    // The token in the query string is checked the same way.
    let r = request(
        &node,
        "POST",
        &format!("/whip/tok-room?token={forged}"),
        &[("Content-Type", "application/sdp")],
        SDP_NO_MEDIA,
    )
    .await;
    assert_eq!(r.status, 401, "forged token in the query: {}", r.body);
    assert!(r.header("www-authenticate").is_some());

    // Operations endpoints: no token is 401, a non-admin token 403, an
    // expired admin token 401.
    let user = format!("Bearer {good}");
    let expired_admin = format!("Bearer {expired}");
    for path in ["/metrics", "/healthz"] {
        let r = request(&node, "GET", path, &[], "").await;
        assert_eq!(r.status, 401, "{path} without a token: {}", r.body);
        json_error(&r, path);
        assert!(
            r.header("www-authenticate").is_some(),
            "{path}: no challenge"
        );
        let r = request(&node, "GET", path, &[("Authorization", &user)], "").await;
        assert_eq!(r.status, 403, "{path} with a user token: {}", r.body);
        let msg = json_error(&r, path);
        assert!(msg.contains("admin"), "{path}: {msg}");
        let r = request(&node, "GET", path, &[("Authorization", &expired_admin)], "").await;
        assert_eq!(
            r.status, 401,
            "{path} with an expired admin token: {}",
            r.body
        );
    }
    let admin = format!("Bearer {}", node.admin_token());
    let r = request(&node, "GET", "/healthz", &[("Authorization", &admin)], "").await;
    assert_eq!(r.status, 200, "{}", r.body);

    let text = node.metrics().await.unwrap();
    // missing: WHIP + /metrics + /healthz; expired: WHIP + 2 ops;
    // invalid: forged, alg none, forged in the query; forbidden: WHIP + 2 ops.
    for (reason, want) in [
        ("missing", 3.0),
        ("expired", 3.0),
        ("invalid", 3.0),
        ("wrong_room", 1.0),
        ("forbidden", 3.0),
    ] {
        assert_eq!(auth_failures(&text, reason), want, "{reason}");
    }
}

/// A STUN binding request with a USERNAME attribute and nothing else.
fn stun_binding(rng: &mut StdRng) -> Vec<u8> {
    let ufrag = |rng: &mut StdRng| -> String {
        let n = rng.random_range(4..=32);
        (0..n)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789+/"[rng.random_range(0..38)]))
            .collect()
    };
    let username = format!("{}:{}", ufrag(rng), ufrag(rng));
    let padded = username.len().div_ceil(4) * 4;
    let mut p = Vec::with_capacity(20 + 4 + padded);
    p.extend_from_slice(&0x0001u16.to_be_bytes()); // Binding request
    p.extend_from_slice(&((4 + padded) as u16).to_be_bytes());
    p.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    let txid: [u8; 12] = rng.random();
    p.extend_from_slice(&txid);
    p.extend_from_slice(&0x0006u16.to_be_bytes()); // USERNAME
    p.extend_from_slice(&(username.len() as u16).to_be_bytes());
    p.extend_from_slice(username.as_bytes());
    p.resize(20 + 4 + padded, 0);
    p
}

/// An RTP header with two CSRCs and a one-byte-header extension, then a
/// payload: 12 + 8 + 4 + 4 + 6 bytes.
fn rtp_with_csrc_and_extension() -> Vec<u8> {
    let mut p = vec![0x80 | 0x10 | 2, 96, 0x12, 0x34];
    p.extend_from_slice(&0xdead_beefu32.to_be_bytes()); // timestamp
    p.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // ssrc
    p.extend_from_slice(&1u32.to_be_bytes()); // csrc
    p.extend_from_slice(&2u32.to_be_bytes()); // csrc
    p.extend_from_slice(&[0xbe, 0xde, 0, 1]); // extension, 1 word
    p.extend_from_slice(&[0x10, 0xff, 0, 0]);
    p.extend_from_slice(&[0x10, 0x01, 0, 0, 0, 0]);
    p
}

/// Polls `/metrics` until `sample` reaches `want` (or the deadline passes)
/// and returns the last exposition.
async fn wait_for_metric(node: &TestNode, sample: &str, want: f64, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = node.metrics().await.expect("metrics");
        let v = metric_value(&text, sample);
        if v >= want || Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_rtp(
    node: &TestNode,
    room: &str,
    token: &str,
    spec: &Value,
) -> Result<(u16, Value, HttpResponse)> {
    let auth = format!("Bearer {token}");
    let r = http(
        &node.base_url(),
        "POST",
        &format!("/v1/rooms/{room}/rtp"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &spec.to_string(),
    )
    .await?;
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    Ok((r.status, v, r))
}

async fn recv_timeout(sock: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(timeout, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_and_stun_flood_are_dropped_and_counted() {
    init_tracing();
    udp_garbage_inner()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn udp_garbage_inner() -> Result<()> {
    let node = TestNode::start().await?;
    let media: SocketAddr = node.node.udp_addr();
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let mut rng = StdRng::seed_from_u64(0x05ee_d0f2_ab1e);

    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    // Random datagrams of random length; none may be a well-formed STUN
    // message (the magic cookie makes that a 2^-32 event, excluded anyway).
    while datagrams.len() < 2000 {
        let len = rng.random_range(0..1500);
        let mut d = vec![0u8; len];
        rng.fill(&mut d[..]);
        if d.len() >= 8 && d[4..8] == 0x2112_A442u32.to_be_bytes() {
            continue;
        }
        datagrams.push(d);
    }
    // Every truncation of valid RTP headers (plain, and with CSRCs and an
    // extension), including the empty datagram.
    let plain_rtp: Vec<u8> = {
        let mut p = vec![0x80, 0x60, 0x00, 0x01];
        p.extend_from_slice(&1000u32.to_be_bytes());
        p.extend_from_slice(&0x4242_4242u32.to_be_bytes());
        p
    };
    for full in [plain_rtp.clone(), rtp_with_csrc_and_extension()] {
        for n in 0..full.len() {
            datagrams.push(full[..n].to_vec());
        }
    }
    // RTCP-looking garbage: every RTCP packet type with random bodies,
    // lying lengths and truncated headers.
    for pt in 192..=223u8 {
        for len in [1usize, 2, 4, 7, 8, 12, 28, 100] {
            let mut d = vec![0u8; len];
            rng.fill(&mut d[..]);
            d[0] = 0x80 | rng.random_range(0..32);
            if len > 1 {
                d[1] = pt;
            }
            datagrams.push(d);
        }
    }
    let garbage = datagrams.len();
    for _ in 0..5000 {
        datagrams.push(stun_binding(&mut rng));
    }
    // Interleave the STUN flood with the garbage.
    let total = datagrams.len();
    for i in (1..total).rev() {
        let j = rng.random_range(0..=i);
        datagrams.swap(i, j);
    }

    // Send in small batches and let the node catch up after each, so the
    // socket buffer never overflows however slow the media thread is (a
    // debug build under a parallel test run is): the counts below are then
    // exact, not "about".
    let mut sent = 0usize;
    let mut text = String::new();
    for batch in datagrams.chunks(50) {
        for d in batch {
            sock.send_to(d, media).await?;
        }
        sent += batch.len();
        text = wait_for_metric(
            &node,
            "ridge_packets_received_total",
            sent as f64,
            Duration::from_secs(10),
        )
        .await;
        let seen = metric_value(&text, "ridge_packets_received_total");
        ensure!(
            seen == sent as f64,
            "the node saw {seen} of the {sent} datagrams sent so far"
        );
    }
    let received = metric_value(&text, "ridge_packets_received_total");
    let drop = |reason: &str| {
        metric_value(
            &text,
            &format!("ridge_packets_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    ensure!(
        received == total as f64,
        "the node saw {received} of {total} datagrams"
    );
    ensure!(
        drop("unknown_ufrag") == 5000.0,
        "unknown_ufrag = {}",
        drop("unknown_ufrag")
    );
    let malformed = drop("malformed");
    let unknown_source = drop("unknown_source");
    ensure!(
        malformed + unknown_source == garbage as f64,
        "malformed {malformed} + unknown_source {unknown_source} != {garbage} garbage datagrams"
    );
    // Both classes occur: short or unclassifiable bytes are malformed,
    // RTP/RTCP/DTLS-shaped ones from a stranger are unknown_source.
    ensure!(malformed > 0.0 && unknown_source > 0.0, "{text}");
    for reason in ["rejected", "unknown_ssrc", "paused"] {
        ensure!(drop(reason) == 0.0, "{reason} = {}", drop(reason));
    }
    // The node answers nobody.
    ensure!(
        recv_timeout(&sock, Duration::from_millis(200))
            .await
            .is_none(),
        "the node answered garbage"
    );

    // The media thread is alive: health is ok and a new RTP endpoint pair
    // relays a packet.
    let admin = format!("Bearer {}", node.admin_token());
    let r = http(
        &node.base_url(),
        "GET",
        "/healthz",
        &[("Authorization", &admin)],
        "",
    )
    .await?;
    ensure!(r.status == 200, "healthz {}: {}", r.status, r.body);
    let health: Value = serde_json::from_str(&r.body)?;
    ensure!(health["status"] == "ok", "{health}");

    let token = node.token("after-flood", "carol", true, true);
    let publisher = UdpSocket::bind("127.0.0.1:0").await?;
    let receiver = UdpSocket::bind("127.0.0.1:0").await?;
    let (status, body, r) = create_rtp(
        &node,
        "after-flood",
        &token,
        &json!({"direction":"publish","kind":"video","remote":publisher.local_addr()?.to_string(),
                "payload_type":96,"ssrc":0x0a0b_0c0d_u32}),
    )
    .await?;
    ensure!(status == 201, "publish endpoint: {status} {}", r.body);
    ensure!(body["local"] == media.to_string(), "{body}");
    let (status, _, r) = create_rtp(
        &node,
        "after-flood",
        &token,
        &json!({"direction":"subscribe","kind":"video","remote":receiver.local_addr()?.to_string(),
                "payload_type":100,"ssrc":77}),
    )
    .await?;
    ensure!(status == 201, "subscribe endpoint: {status} {}", r.body);
    let mut pkt = vec![0x80, 96, 0, 1, 0, 0, 0, 9];
    pkt.extend_from_slice(&0x0a0b_0c0d_u32.to_be_bytes());
    pkt.extend_from_slice(b"\x10\x00\x00\x00\x9d\x01\x2a\x80\x02\xe0\x01keyframe");
    publisher.send_to(&pkt, media).await?;
    let got = recv_timeout(&receiver, Duration::from_secs(5))
        .await
        .context("no packet relayed after the flood")?;
    ensure!(got[1] & 0x7f == 100, "relayed with PT {}", got[1] & 0x7f);
    ensure!(
        got[8..12] == 77u32.to_be_bytes(),
        "relayed with another SSRC"
    );
    ensure!(got[12..] == pkt[12..], "payload changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rtp_endpoint_requests_are_400() {
    init_tracing();
    let node = TestNode::start().await.expect("node");
    let token = node.token("rtp-bad", "dave", true, true);
    let cases: [(&str, String, &str, &str); 7] = [
        ("bad JSON", "{not json".into(), "json", "key must be a string"),
        ("not an object", "[1,2,3]".into(), "json", "expected"),
        (
            "unknown direction",
            json!({"direction":"sideways","kind":"video","remote":"127.0.0.1:4000","payload_type":96})
                .to_string(),
            "json",
            "unknown variant `sideways`",
        ),
        (
            "PT 200",
            json!({"direction":"publish","kind":"video","remote":"127.0.0.1:4000","payload_type":200})
                .to_string(),
            "rtp",
            "payload_type 200",
        ),
        (
            "remote nonsense",
            json!({"direction":"publish","kind":"video","remote":"nonsense","payload_type":96})
                .to_string(),
            "json",
            "socket address",
        ),
        (
            "remote 0.0.0.0:0",
            json!({"direction":"publish","kind":"video","remote":"0.0.0.0:0","payload_type":96})
                .to_string(),
            "rtp",
            "0.0.0.0:0",
        ),
        (
            "unknown field",
            json!({"direction":"publish","kind":"video","remote":"127.0.0.1:4000","payload_type":96,"colour":"red"})
                .to_string(),
            "json",
            "colour",
        ),
    ];
    let auth = format!("Bearer {token}");
    let mut want_json = 0.0;
    let mut want_rtp = 0.0;
    for (what, body, reason, needle) in &cases {
        let r = request(
            &node,
            "POST",
            "/v1/rooms/rtp-bad/rtp",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .await;
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let msg = json_error(&r, what);
        assert!(msg.contains(needle), "{what}: {needle:?} not in {msg:?}");
        match *reason {
            "json" => want_json += 1.0,
            _ => want_rtp += 1.0,
        }
    }
    let text = node.metrics().await.unwrap();
    assert_eq!(
        metric_value(&text, r#"ridge_bad_requests_total{reason="json"}"#),
        want_json,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, r#"ridge_bad_requests_total{reason="rtp"}"#),
        want_rtp,
        "{text}"
    );
    // Refused endpoints leave nothing behind.
    assert_eq!(
        metric_value(&text, r#"ridge_sessions{transport="rtp"}"#),
        0.0
    );
    assert_eq!(metric_value(&text, "ridge_rooms"), 0.0, "{text}");
    // Without a token the body is not even looked at.
    let r = request(&node, "POST", "/v1/rooms/rtp-bad/rtp", &[], "{not json").await;
    assert_eq!(r.status, 401, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_exposed_headers() {
    init_tracing();
    cors_inner().await.unwrap_or_else(|e| panic!("{e:#}"));
}

fn header_list_contains(value: Option<&str>, name: &str) -> bool {
    value.is_some_and(|v| {
        v.split(',')
            .any(|h| h.trim().eq_ignore_ascii_case(name) || h.trim() == "*")
    })
}

async fn cors_inner() -> Result<()> {
    let node = TestNode::start().await?;
    let origin = "http://example.test";
    for path in [
        "/whip/cors-room",
        "/whep/cors-room",
        "/v1/rooms/cors-room/rtp",
    ] {
        let r = http(
            &node.base_url(),
            "OPTIONS",
            path,
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization,content-type",
                ),
            ],
            "",
        )
        .await?;
        ensure!(
            (200..300).contains(&r.status),
            "preflight {path}: {}",
            r.status
        );
        ensure!(
            r.header("access-control-allow-origin") == Some(origin),
            "preflight {path}: allow-origin {:?}",
            r.header("access-control-allow-origin")
        );
        let allow = r.header("access-control-allow-headers");
        ensure!(
            header_list_contains(allow, "authorization")
                && header_list_contains(allow, "content-type"),
            "preflight {path}: allow-headers {allow:?}"
        );
        let methods = r.header("access-control-allow-methods");
        ensure!(
            header_list_contains(methods, "POST") && header_list_contains(methods, "DELETE"),
            "preflight {path}: allow-methods {methods:?}"
        );
    }

    // An actual cross-origin POST: the 201 exposes Location.
    let token = node.token("cors-room", "erin", true, true);
    let auth = format!("Bearer {token}");
    let peer = UdpSocket::bind("127.0.0.1:0").await?;
    let r = http(
        &node.base_url(),
        "POST",
        "/v1/rooms/cors-room/rtp",
        &[
            ("Origin", origin),
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &json!({"direction":"publish","kind":"audio","remote":peer.local_addr()?.to_string(),
                "payload_type":111,"ssrc":5})
        .to_string(),
    )
    .await?;
    ensure!(r.status == 201, "POST: {} {}", r.status, r.body);
    ensure!(
        r.header("location")
            .is_some_and(|l| l.starts_with("/v1/rooms/cors-room/rtp/")),
        "Location {:?}",
        r.header("location")
    );
    ensure!(
        r.header("access-control-allow-origin") == Some(origin),
        "POST allow-origin {:?}",
        r.header("access-control-allow-origin")
    );
    let expose = r.header("access-control-expose-headers");
    ensure!(
        header_list_contains(expose, "location"),
        "POST expose-headers {expose:?}"
    );
    // An error response carries the CORS headers too, or a browser could
    // not read the error message.
    let r = http(
        &node.base_url(),
        "POST",
        "/whip/cors-room",
        &[("Origin", origin), ("Content-Type", "application/sdp")],
        "v=0\r\n",
    )
    .await?;
    ensure!(r.status == 401, "{}", r.status);
    ensure!(
        r.header("access-control-allow-origin") == Some(origin),
        "401 allow-origin {:?}",
        r.header("access-control-allow-origin")
    );
    Ok(())
}
