//! The WebSocket room API (docs/api.md) driven with tokio-tungstenite:
//! welcome, presence events, chat/data relay, ping, errors, resume with
//! replay, leave, and the HTTP answers of the upgrade route.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use ridge_tests::node::{TestNode, http};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(400);

/// One room participant's socket, with the last `seq` it has seen.
struct Client {
    name: &'static str,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    last_seq: u64,
}

impl Client {
    async fn connect(node: &TestNode, room: &str, token: &str, extra: &str) -> Result<Client> {
        Self::connect_named("client", node, room, token, extra).await
    }

    async fn connect_named(
        name: &'static str,
        node: &TestNode,
        room: &str,
        token: &str,
        extra: &str,
    ) -> Result<Client> {
        let url = format!(
            "ws://{}/v1/rooms/{room}/ws?token={token}{extra}",
            node.node.http_addr()
        );
        let (ws, response) = tokio::time::timeout(WAIT, connect_async(url.as_str()))
            .await
            .context("connect timeout")?
            .with_context(|| format!("{name}: connecting"))?;
        ensure!(response.status().as_u16() == 101, "{name}: upgrade status");
        Ok(Client {
            name,
            ws,
            last_seq: 0,
        })
    }

    async fn send(&mut self, v: Value) -> Result<()> {
        self.ws.send(Message::text(v.to_string())).await?;
        Ok(())
    }

    async fn send_text(&mut self, t: &str) -> Result<()> {
        self.ws.send(Message::text(t)).await?;
        Ok(())
    }

    /// The next JSON message within `timeout`, or `None`. Checks the `seq`
    /// rule: every message except welcome, pong, answer and error carries
    /// the next number.
    async fn next_within(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("{}: socket ended", self.name),
                Ok(Some(m)) => m.with_context(|| format!("{}: socket error", self.name))?,
            };
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                Message::Close(c) => bail!("{}: closed by the server: {c:?}", self.name),
                Message::Binary(b) => bail!("{}: binary frame {b:?}", self.name),
            };
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON: {text}", self.name))?;
            let ty = v["type"].as_str().unwrap_or_default().to_string();
            match ty.as_str() {
                "welcome" => {
                    self.last_seq = v["seq"].as_u64().context("welcome without seq")?;
                }
                "pong" | "answer" | "error" => {
                    ensure!(
                        v.get("seq").is_none(),
                        "{}: {ty} carries seq: {v}",
                        self.name
                    )
                }
                _ => {
                    let seq = v["seq"]
                        .as_u64()
                        .with_context(|| format!("{}: no seq in {v}", self.name))?;
                    ensure!(
                        seq == self.last_seq + 1,
                        "{}: seq {seq} after {}: {v}",
                        self.name,
                        self.last_seq
                    );
                    self.last_seq = seq;
                }
            }
            return Ok(Some(v));
        }
    }

    async fn next(&mut self) -> Result<Value> {
        self.next_within(WAIT)
            .await?
            .with_context(|| format!("{}: no message within {WAIT:?}", self.name))
    }

    /// The next message, which must be of type `ty`.
    async fn expect(&mut self, ty: &str) -> Result<Value> {
        let v = self.next().await?;
        ensure!(v["type"] == ty, "{}: expected {ty}, got {v}", self.name);
        Ok(v)
    }

    /// Asserts that nothing arrives for a while.
    async fn quiet(&mut self) -> Result<()> {
        if let Some(v) = self.next_within(QUIET).await? {
            bail!("{}: unexpected message {v}", self.name);
        }
        Ok(())
    }

    /// The server closes the socket (after `leave`).
    async fn expect_close(&mut self) -> Result<()> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Err(_) => bail!("{}: the server did not close the socket", self.name),
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return Ok(()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(m))) => bail!("{}: {m:?} instead of a close", self.name),
            }
        }
    }
}

fn check_welcome(v: &Value, identity: &str, others: &[(&str, &str)]) -> Result<String> {
    ensure!(v["type"] == "welcome", "not a welcome: {v}");
    let p = v["participant"].as_str().context("participant")?;
    ensure!(p.starts_with("p-"), "participant id {p}");
    ensure!(v["identity"] == identity, "{v}");
    ensure!(
        v["resume"].as_str().is_some_and(|r| r.len() >= 16),
        "resume token: {v}"
    );
    ensure!(v["seq"].is_u64(), "{v}");
    let want: Vec<Value> = others
        .iter()
        .map(|(p, i)| json!({"participant": p, "identity": i}))
        .collect();
    ensure!(
        v["participants"] == Value::Array(want),
        "participants {} (want {others:?})",
        v["participants"]
    );
    ensure!(v["tracks"] == json!([]), "{v}");
    Ok(p.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_relay_ping_and_errors() {
    init_tracing();
    join_relay_inner().await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn join_relay_inner() -> Result<()> {
    let node = TestNode::start().await?;
    let room = "ws-room";
    let mut a =
        Client::connect_named("A", &node, room, &node.token(room, "alice", true, true), "").await?;
    let welcome_a = a.next().await?;
    let pa = check_welcome(&welcome_a, "alice", &[])?;
    ensure!(welcome_a["seq"] == 0, "{welcome_a}");
    a.quiet().await?;

    let mut b =
        Client::connect_named("B", &node, room, &node.token(room, "bob", false, true), "").await?;
    let welcome_b = b.next().await?;
    let pb = check_welcome(&welcome_b, "bob", &[(&pa, "alice")])?;
    ensure!(welcome_b["seq"] == 0, "{welcome_b}");
    ensure!(pa != pb);
    let joined = a.expect("participant_joined").await?;
    ensure!(joined["participant"] == pb.as_str(), "{joined}");
    ensure!(joined["identity"] == "bob", "{joined}");
    ensure!(joined["seq"] == 1, "{joined}");
    b.quiet().await?;

    // chat and data reach everyone, with the sender's id and identity.
    a.send(json!({"type":"chat","text":"hello room"})).await?;
    for c in [&mut a, &mut b] {
        let m = c.expect("chat").await?;
        ensure!(
            m["from"] == pa.as_str() && m["identity"] == "alice" && m["text"] == "hello room",
            "{m}"
        );
    }
    let payload = json!({"x":[1,2,3],"nested":{"ok":true},"s":"\u{e9}"});
    b.send(json!({"type":"data","payload":payload})).await?;
    for c in [&mut a, &mut b] {
        let m = c.expect("data").await?;
        ensure!(
            m["from"] == pb.as_str() && m["identity"] == "bob" && m["payload"] == payload,
            "{m}"
        );
    }

    // ping → pong, for the sender only.
    b.send(json!({"type":"ping"})).await?;
    let pong = b.expect("pong").await?;
    ensure!(pong == json!({"type":"pong"}), "{pong}");
    a.quiet().await?;

    // Errors name the request and go to the sender only.
    a.send(json!({"type":"dance","steps":3})).await?;
    let e = a.expect("error").await?;
    ensure!(e["request"] == "dance", "{e}");
    ensure!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    a.send_text("this is not JSON {").await?;
    let e = a.expect("error").await?;
    ensure!(e["request"].is_string(), "{e}");
    ensure!(
        e["message"].as_str().is_some_and(|m| m.contains("JSON")),
        "{e}"
    );
    a.send(json!({"type":"chat"})).await?;
    let e = a.expect("error").await?;
    ensure!(e["request"] == "chat", "{e}");
    a.send(json!({"type":"publish","sdp":"v=0\r\nthis is no offer\r\n"}))
        .await?;
    let e = a.expect("error").await?;
    ensure!(e["request"] == "publish", "{e}");
    ensure!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    // B's token is subscribe-only.
    b.send(json!({"type":"publish","sdp":"v=0\r\n"})).await?;
    let e = b.expect("error").await?;
    ensure!(e["request"] == "publish", "{e}");
    ensure!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("can_publish")),
        "{e}"
    );
    a.send(json!({"type":"unsubscribe","peer":"r-123"})).await?;
    let e = a.expect("error").await?;
    ensure!(e["request"] == "unsubscribe", "{e}");
    a.quiet().await?;
    b.quiet().await?;

    // The sessions still work after the errors.
    b.send(json!({"type":"chat","text":"still here"})).await?;
    for c in [&mut a, &mut b] {
        let m = c.expect("chat").await?;
        ensure!(m["from"] == pb.as_str() && m["text"] == "still here", "{m}");
    }

    // leave: the server closes B's socket, A sees participant_left.
    b.send(json!({"type":"leave"})).await?;
    b.expect_close().await?;
    let left = a.expect("participant_left").await?;
    ensure!(
        left["participant"] == pb.as_str() && left["identity"] == "bob",
        "{left}"
    );
    a.quiet().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_missed_events() {
    init_tracing();
    resume_inner().await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn resume_inner() -> Result<()> {
    let node = TestNode::start().await?;
    let room = "resume-room";
    let token_a = node.token(room, "alice", true, true);
    let token_b = node.token(room, "bob", true, true);
    let mut a = Client::connect_named("A", &node, room, &token_a, "").await?;
    let pa = check_welcome(&a.next().await?, "alice", &[])?;
    let mut b = Client::connect_named("B", &node, room, &token_b, "").await?;
    let welcome_b = b.next().await?;
    let pb = check_welcome(&welcome_b, "bob", &[(&pa, "alice")])?;
    let resume = welcome_b["resume"].as_str().context("resume")?.to_string();
    a.expect("participant_joined").await?;

    // Some traffic B sees, so its last_seq is not 0.
    a.send(json!({"type":"chat","text":"before"})).await?;
    a.expect("chat").await?;
    b.expect("chat").await?;
    let seen = b.last_seq;
    ensure!(seen == 1, "B's last seq {seen}");

    // B's connection drops without `leave`.
    drop(b);
    // Give the server a moment to notice, so the chats below find B
    // detached rather than racing the close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        a.send(json!({"type":"chat","text":format!("missed {i}")}))
            .await?;
        let m = a.expect("chat").await?;
        ensure!(m["text"] == format!("missed {i}"), "{m}");
    }

    // B comes back with its resume token and the last seq it saw.
    let mut b = Client::connect_named(
        "B'",
        &node,
        room,
        &token_b,
        &format!("&resume={resume}&last_seq={seen}"),
    )
    .await?;
    let welcome = b.next().await?;
    ensure!(welcome["type"] == "welcome", "{welcome}");
    ensure!(
        welcome["participant"] == pb.as_str(),
        "resumed as {} instead of {pb}",
        welcome["participant"]
    );
    ensure!(welcome["resume"] == resume.as_str(), "{welcome}");
    ensure!(welcome["seq"] == seen + 3, "{welcome}");
    // The replay continues from `seen`, whatever the welcome says.
    b.last_seq = seen;
    for i in 0..3 {
        let m = b.expect("chat").await?;
        ensure!(
            m["text"] == format!("missed {i}")
                && m["from"] == pa.as_str()
                && m["seq"] == seen + 1 + i,
            "replay {i}: {m}"
        );
    }
    b.quiet().await?;
    // A saw B neither leave nor join again.
    a.quiet().await?;

    // The resumed session is live: traffic flows both ways with the next seq.
    b.send(json!({"type":"chat","text":"back"})).await?;
    let m = b.expect("chat").await?;
    ensure!(m["from"] == pb.as_str() && m["seq"] == seen + 4, "{m}");
    let m = a.expect("chat").await?;
    ensure!(m["from"] == pb.as_str(), "{m}");

    // An unknown resume token: a fresh session and an error about it.
    let token_c = node.token(room, "carol", false, true);
    let mut c = Client::connect_named(
        "C",
        &node,
        room,
        &token_c,
        "&resume=00000000000000000000000000000000&last_seq=5",
    )
    .await?;
    let welcome_c = c.next().await?;
    let pc = check_welcome(&welcome_c, "carol", &[(&pa, "alice"), (&pb, "bob")])
        .or_else(|_| check_welcome(&welcome_c, "carol", &[(&pb, "bob"), (&pa, "alice")]))?;
    ensure!(pc != pa && pc != pb, "fresh id {pc}");
    ensure!(welcome_c["resume"] != resume.as_str());
    let e = c.expect("error").await?;
    ensure!(e["request"] == "resume", "{e}");
    for cl in [&mut a, &mut b] {
        let j = cl.expect("participant_joined").await?;
        ensure!(j["participant"] == pc.as_str(), "{j}");
    }

    // leave from the resumed session: A sees participant_left for B.
    b.send(json!({"type":"leave"})).await?;
    b.expect_close().await?;
    let left = a.expect("participant_left").await?;
    ensure!(left["participant"] == pb.as_str(), "{left}");
    // After a leave the resume token is dead.
    let mut b2 = Client::connect_named(
        "B''",
        &node,
        room,
        &token_b,
        &format!("&resume={resume}&last_seq=0"),
    )
    .await?;
    let w = b2.next().await?;
    ensure!(
        w["type"] == "welcome" && w["participant"] != pb.as_str(),
        "{w}"
    );
    let e = b2.expect("error").await?;
    ensure!(e["request"] == "resume", "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_get_is_401_or_426() {
    init_tracing();
    let node = TestNode::start().await.expect("node");
    let path = "/v1/rooms/get-room/ws";
    let good = node.token("get-room", "alice", true, true);
    let base = node.base_url();

    for (what, query) in [
        ("no token", String::new()),
        ("bad token", "?token=not.a.jwt".to_string()),
        (
            "other room",
            format!("?token={}", node.token("elsewhere", "alice", true, true)),
        ),
    ] {
        let r = http(&base, "GET", &format!("{path}{query}"), &[], "")
            .await
            .expect("GET");
        let want = if what == "other room" { 403 } else { 401 };
        assert_eq!(r.status, want, "{what}: {}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{what}: {:?}",
            r.headers
        );
        let v: Value = serde_json::from_str(&r.body).expect("JSON body");
        assert!(
            v["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        if want == 401 {
            assert!(r.header("www-authenticate").is_some(), "{what}");
        }
    }

    let r = http(&base, "GET", &format!("{path}?token={good}"), &[], "")
        .await
        .expect("GET");
    assert_eq!(r.status, 426, "good token: {}", r.body);
    let v: Value = serde_json::from_str(&r.body).expect("JSON body");
    assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");

    // A bad token on a real upgrade is refused before the upgrade, too.
    let url = format!("ws://{}{path}?token=not.a.jwt", node.node.http_addr());
    match connect_async(url.as_str()).await {
        Ok(_) => panic!("upgrade with a bad token succeeded"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        Err(e) => panic!("unexpected error {e}"),
    }
    // And a good one upgrades (the client helper asserts 101).
    let mut c = Client::connect(&node, "get-room", &good, "")
        .await
        .expect("upgrade");
    let w = c.next().await.expect("welcome");
    check_welcome(&w, "alice", &[]).expect("welcome shape");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_token_of_another_identity_is_refused() {
    init_tracing();
    other_identity_inner()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn other_identity_inner() -> Result<()> {
    let node = TestNode::start().await?;
    let room = "steal-room";
    let mut a =
        Client::connect_named("A", &node, room, &node.token(room, "alice", true, true), "").await?;
    let welcome_a = a.next().await?;
    let pa = check_welcome(&welcome_a, "alice", &[])?;
    let stolen = welcome_a["resume"].as_str().context("resume")?.to_string();
    // Mallory presents alice's resume token with her own valid token.
    let mut m = Client::connect_named(
        "M",
        &node,
        room,
        &node.token(room, "mallory", true, true),
        &format!("&resume={stolen}&last_seq=0"),
    )
    .await?;
    let w = m.next().await?;
    let pm = check_welcome(&w, "mallory", &[(&pa, "alice")])?;
    ensure!(pm != pa, "mallory took over alice's session");
    ensure!(w["resume"] != stolen.as_str(), "{w}");
    let e = m.expect("error").await?;
    ensure!(e["request"] == "resume", "{e}");
    m.quiet().await?;
    // Alice's session is untouched: she sees mallory join, and her socket
    // still works.
    let j = a.expect("participant_joined").await?;
    ensure!(j["participant"] == pm.as_str(), "{j}");
    a.send(json!({"type":"ping"})).await?;
    a.expect("pong").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_under_traffic_loses_and_duplicates_nothing() {
    init_tracing();
    resume_under_traffic_inner()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn resume_under_traffic_inner() -> Result<()> {
    const CHATS: usize = 240;
    // 240 chats as fast as they go: past the default token bucket (20/s,
    // burst 40), which is not what this test is about.
    let node = TestNode::start_with(ridge_dataplane::config::Overrides {
        ws_message_rate: Some(100_000),
        ws_message_burst: Some(100_000),
        ..Default::default()
    })
    .await?;
    let room = "busy-room";
    let token_b = node.token(room, "bob", true, true);
    let mut a =
        Client::connect_named("A", &node, room, &node.token(room, "alice", true, true), "").await?;
    a.expect("welcome").await?;
    let mut b = Client::connect_named("B", &node, room, &token_b, "").await?;
    let welcome = b.next().await?;
    let pb = welcome["participant"].as_str().context("id")?.to_string();
    let resume = welcome["resume"].as_str().context("resume")?.to_string();
    a.expect("participant_joined").await?;

    // A chats steadily (its own echoes are drained by a task).
    let (mut a_tx, mut a_rx) = a.ws.split();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = a_rx.next().await {} });
    let sender = tokio::spawn(async move {
        for i in 0..CHATS {
            let m = json!({"type":"chat","text":format!("c{i}")});
            a_tx.send(Message::text(m.to_string())).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(a_tx)
    });

    // B keeps dropping its connection and resuming while the chats flow.
    // `next_within` checks that the seqs B reads are consecutive across
    // every resume: a lost or duplicated event fails it.
    let mut texts: Vec<String> = Vec::new();
    let mut collect = |v: &Value| {
        if v["type"] == "chat" {
            texts.push(v["text"].as_str().unwrap_or_default().to_string());
        }
    };
    for round in 0..10u64 {
        let until = tokio::time::Instant::now() + Duration::from_millis(30 + 7 * round);
        while let Some(v) = b
            .next_within(until.saturating_duration_since(tokio::time::Instant::now()))
            .await?
        {
            collect(&v);
        }
        let seen = b.last_seq;
        drop(b);
        tokio::time::sleep(Duration::from_millis(round % 3 * 5)).await;
        b = Client::connect_named(
            "B",
            &node,
            room,
            &token_b,
            &format!("&resume={resume}&last_seq={seen}"),
        )
        .await?;
        let w = b.next().await?;
        ensure!(
            w["type"] == "welcome" && w["participant"] == pb.as_str(),
            "round {round}: {w}"
        );
        ensure!(w["seq"].as_u64() >= Some(seen), "round {round}: {w}");
        b.last_seq = seen;
    }
    let a_tx = sender.await??;
    while let Some(v) = b.next_within(Duration::from_millis(500)).await? {
        collect(&v);
    }
    let want: Vec<String> = (0..CHATS).map(|i| format!("c{i}")).collect();
    ensure!(
        texts == want,
        "B saw {} chats: first differences {:?}",
        texts.len(),
        texts
            .iter()
            .zip(&want)
            .filter(|(x, y)| x != y)
            .take(3)
            .collect::<Vec<_>>()
    );
    drop(a_tx);
    drain.abort();
    Ok(())
}
