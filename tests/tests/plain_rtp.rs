//! Plain RTP endpoints over real UDP sockets on 127.0.0.1: one publisher,
//! two subscribers. Checks the relayed stream byte for byte, NACK
//! retransmission from the buffer, PLI forwarding to the publisher and
//! DELETE.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ridge_tests::node::{TestNode, http, metric_value};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

const ROOM: &str = "plain-rtp";
/// The publisher's SSRC.
const PUB_SSRC: u32 = 0x5151_0001;
const PUB_PT: u8 = 96;
const SUB_PT: u8 = 100;
const SUB_SSRC: [u32; 2] = [0x0000_a001, 0x0000_b002];
const PACKETS: usize = 200;
/// Publisher sequence numbers start just before the wrap.
const FIRST_SEQ: u16 = 65_436;
const FIRST_TS: u32 = 4_294_960_000;

/// A UDP socket whose datagrams are collected by a task, so nothing is lost
/// to a full socket buffer while the test does something else.
struct Endpoint {
    sock: Arc<UdpSocket>,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Endpoint {
    async fn bind() -> Result<Endpoint> {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = sock.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Ok(Endpoint { sock, rx })
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local addr")
    }

    async fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Everything already received.
    fn drain(&mut self) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while let Ok(p) = self.rx.try_recv() {
            v.push(p);
        }
        v
    }
}

/// A parsed RTP packet (no CSRCs or extensions are expected here).
#[derive(Debug, Clone, PartialEq)]
struct Rtp {
    marker: bool,
    pt: u8,
    seq: u16,
    ts: u32,
    ssrc: u32,
    payload: Vec<u8>,
}

fn parse_rtp(d: &[u8]) -> Result<Rtp> {
    ensure!(d.len() >= 12, "datagram of {} bytes is not RTP", d.len());
    ensure!(d[0] == 0x80, "first byte {:#04x}: not plain RTP v2", d[0]);
    let pt = d[1] & 0x7f;
    ensure!(
        !(64..96).contains(&pt),
        "RTCP (PT {}) where RTP was expected",
        d[1]
    );
    Ok(Rtp {
        marker: d[1] & 0x80 != 0,
        pt,
        seq: u16::from_be_bytes([d[2], d[3]]),
        ts: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
        ssrc: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        payload: d[12..].to_vec(),
    })
}

/// The VP8 payload of packet `i`: a keyframe first (payload descriptor with
/// S set, then a frame header with P = 0 and the keyframe start code), then
/// interframes (P = 1). Each payload is distinct.
fn vp8_payload(i: usize) -> Vec<u8> {
    let mut p = if i == 0 {
        b"\x10\x00\x00\x00\x9d\x01\x2a\x80\x02\xe0\x01".to_vec()
    } else {
        vec![0x10, 0x01, 0x00, 0x00]
    };
    p.extend_from_slice(&(i as u32).to_be_bytes());
    p.extend((0..(i % 37) + 20).map(|k| (k as u8).wrapping_mul(31) ^ i as u8));
    p
}

fn rtp_packet(i: usize) -> Vec<u8> {
    let mut p = vec![0x80, 0x80 | PUB_PT];
    p.extend_from_slice(&FIRST_SEQ.wrapping_add(i as u16).to_be_bytes());
    p.extend_from_slice(&FIRST_TS.wrapping_add(3000 * i as u32).to_be_bytes());
    p.extend_from_slice(&PUB_SSRC.to_be_bytes());
    p.extend_from_slice(&vp8_payload(i));
    p
}

/// RFC 4585 generic NACK (PT 205, FMT 1) for `lost` (one PID/BLP pair per
/// run of up to 17 numbers).
fn nack(sender: u32, media: u32, lost: &[u16]) -> Vec<u8> {
    let mut fci: Vec<(u16, u16)> = Vec::new();
    let mut sorted = lost.to_vec();
    sorted.sort_by_key(|s| s.wrapping_sub(lost[0]));
    for seq in sorted {
        match fci.last_mut() {
            Some((pid, blp)) if (1..=16).contains(&seq.wrapping_sub(*pid)) => {
                *blp |= 1 << (seq.wrapping_sub(*pid) - 1);
            }
            _ => fci.push((seq, 0)),
        }
    }
    let words = 2 + fci.len() as u16;
    let mut p = vec![0x81, 205];
    p.extend_from_slice(&words.to_be_bytes());
    p.extend_from_slice(&sender.to_be_bytes());
    p.extend_from_slice(&media.to_be_bytes());
    for (pid, blp) in fci {
        p.extend_from_slice(&pid.to_be_bytes());
        p.extend_from_slice(&blp.to_be_bytes());
    }
    p
}

/// RFC 4585 picture loss indication (PT 206, FMT 1).
fn pli(sender: u32, media: u32) -> Vec<u8> {
    let mut p = vec![0x81, 206, 0, 2];
    p.extend_from_slice(&sender.to_be_bytes());
    p.extend_from_slice(&media.to_be_bytes());
    p
}

/// The media SSRCs of the PLIs in an RTCP (compound) datagram.
fn plis_in(d: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut rest = d;
    while rest.len() >= 4 {
        let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
        if rest[0] >> 6 != 2 || len > rest.len() {
            break;
        }
        if rest[1] == 206 && rest[0] & 0x1f == 1 && len >= 12 {
            out.push(u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]));
        }
        rest = &rest[len..];
    }
    out
}

async fn create(node: &TestNode, token: &str, spec: Value) -> Result<(Value, String)> {
    let auth = format!("Bearer {token}");
    let r = http(
        &node.base_url(),
        "POST",
        &format!("/v1/rooms/{ROOM}/rtp"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &spec.to_string(),
    )
    .await?;
    ensure!(r.status == 201, "POST rtp {spec}: {} {}", r.status, r.body);
    let body: Value = serde_json::from_str(&r.body).context("201 body")?;
    let location = r.header("location").context("no Location")?.to_string();
    let id = body["id"].as_str().context("no id")?;
    ensure!(
        location == format!("/v1/rooms/{ROOM}/rtp/{id}"),
        "Location {location} for id {id}"
    );
    Ok((body, location))
}

/// Collects `n` RTP packets (or fewer at the timeout).
async fn collect(ep: &mut Endpoint, n: usize, timeout: Duration) -> Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match ep.recv(left).await {
            Some(d) => got.push(d),
            None => break,
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_rtp_relay_nack_pli_delete() {
    init_tracing();
    plain_rtp_inner().await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn plain_rtp_inner() -> Result<()> {
    let node = TestNode::start().await?;
    let media = node.node.udp_addr();
    let token = node.token(ROOM, "gateway", true, true);

    let mut publisher = Endpoint::bind().await?;
    let mut receivers = [Endpoint::bind().await?, Endpoint::bind().await?];

    let (pub_body, _pub_location) = create(
        &node,
        &token,
        json!({"direction":"publish","kind":"video","remote":publisher.addr().to_string(),
               "payload_type":PUB_PT,"ssrc":PUB_SSRC}),
    )
    .await?;
    ensure!(
        pub_body["local"] == media.to_string(),
        "local {} != media address {media}",
        pub_body["local"]
    );
    ensure!(pub_body["ssrc"] == PUB_SSRC, "{pub_body}");
    let track = pub_body["track"]
        .as_str()
        .context("publish endpoint without a track")?
        .to_string();
    ensure!(track.starts_with("t-"), "track {track}");

    let mut locations = Vec::new();
    for (i, rx) in receivers.iter().enumerate() {
        let (body, location) = create(
            &node,
            &token,
            json!({"direction":"subscribe","kind":"video","remote":rx.addr().to_string(),
                   "payload_type":SUB_PT,"ssrc":SUB_SSRC[i]}),
        )
        .await?;
        ensure!(body["local"] == media.to_string(), "{body}");
        ensure!(body["ssrc"] == SUB_SSRC[i], "{body}");
        ensure!(body["track"] == track.as_str(), "subscriber {i}: {body}");
        locations.push(location);
    }
    let subscribed_at = Instant::now();

    // The stream, paced a little.
    let sent: Vec<Vec<u8>> = (0..PACKETS).map(rtp_packet).collect();
    for (i, p) in sent.iter().enumerate() {
        publisher.sock.send_to(p, media).await?;
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let sent: Vec<Rtp> = sent.iter().map(|p| parse_rtp(p)).collect::<Result<_>>()?;

    let mut received: Vec<Vec<Vec<u8>>> = Vec::new();
    for (r, rx) in receivers.iter_mut().enumerate() {
        let got = collect(rx, PACKETS, Duration::from_secs(5)).await?;
        ensure!(
            got.len() == PACKETS,
            "receiver {r} got {} of {PACKETS} packets",
            got.len()
        );
        let parsed: Vec<Rtp> = got.iter().map(|d| parse_rtp(d)).collect::<Result<_>>()?;
        let first = &parsed[0];
        for (i, (p, s)) in parsed.iter().zip(&sent).enumerate() {
            ensure!(p.pt == SUB_PT, "receiver {r} packet {i}: PT {}", p.pt);
            ensure!(
                p.ssrc == SUB_SSRC[r],
                "receiver {r} packet {i}: SSRC {:#x}",
                p.ssrc
            );
            ensure!(
                p.seq == first.seq.wrapping_add(i as u16),
                "receiver {r} packet {i}: seq {} after first {}",
                p.seq,
                first.seq
            );
            ensure!(
                p.ts.wrapping_sub(first.ts) == s.ts.wrapping_sub(sent[0].ts),
                "receiver {r} packet {i}: timestamp spacing changed"
            );
            ensure!(p.marker == s.marker, "receiver {r} packet {i}: marker");
            ensure!(
                p.payload == s.payload,
                "receiver {r} packet {i}: payload differs"
            );
        }
        received.push(got);
    }

    let text = node.metrics().await?;
    ensure!(
        metric_value(&text, "ridge_packets_lost_total") == 0.0,
        "loss reported: {text}"
    );
    ensure!(
        metric_value(&text, r#"ridge_sessions{transport="rtp"}"#) == 3.0,
        "{text}"
    );

    // NACK three of the packets receiver 0 got: two adjacent (one PID+BLP
    // pair) and one further on.
    let picks = [10usize, 11, 150];
    let wanted: Vec<&Vec<u8>> = picks.iter().map(|&i| &received[0][i]).collect();
    let seqs: Vec<u16> = wanted
        .iter()
        .map(|d| u16::from_be_bytes([d[2], d[3]]))
        .collect();
    receivers[0]
        .sock
        .send_to(&nack(0x7777_0000, SUB_SSRC[0], &seqs), media)
        .await?;
    let again = collect(&mut receivers[0], 3, Duration::from_secs(3)).await?;
    ensure!(again.len() == 3, "{} retransmissions, not 3", again.len());
    let mut resent: Vec<u16> = Vec::new();
    for got in &again {
        let seq = u16::from_be_bytes([got[2], got[3]]);
        let k = seqs
            .iter()
            .position(|s| *s == seq)
            .with_context(|| format!("retransmitted seq {seq} was not NACKed ({seqs:?})"))?;
        ensure!(
            got == wanted[k],
            "retransmission of seq {seq} differs from the original"
        );
        resent.push(seq);
    }
    resent.sort_unstable();
    let mut nacked = seqs.clone();
    nacked.sort_unstable();
    ensure!(resent == nacked, "resent {resent:?}, NACKed {nacked:?}");
    // Nothing more for anyone: no duplicates, and receiver 1 gets nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(receivers[0].drain().is_empty(), "extra packets after NACK");
    ensure!(
        receivers[1].drain().is_empty(),
        "receiver 1 got retransmissions"
    );
    let text = node.metrics().await?;
    ensure!(
        metric_value(&text, "ridge_retransmits_total") == 3.0,
        "ridge_retransmits_total = {}",
        metric_value(&text, "ridge_retransmits_total")
    );
    ensure!(metric_value(&text, "ridge_nacks_received_total") == 3.0);
    ensure!(metric_value(&text, "ridge_retransmit_misses_total") == 0.0);

    // PLI from receiver 1 reaches the publisher as a PLI for its SSRC. Wait
    // out the keyframe-request throttle (500 ms) of the requests made when
    // the subscribers were bound, and forget those.
    let throttle = Duration::from_millis(700);
    tokio::time::sleep(throttle.saturating_sub(subscribed_at.elapsed())).await;
    publisher.drain();
    receivers[1]
        .sock
        .send_to(&pli(0x7777_0001, SUB_SSRC[1]), media)
        .await?;
    let d = publisher
        .recv(Duration::from_secs(3))
        .await
        .context("no PLI reached the publisher")?;
    ensure!(
        plis_in(&d) == [PUB_SSRC],
        "publisher got {d:02x?}, not a PLI for {PUB_SSRC:#x}"
    );
    let text = node.metrics().await?;
    ensure!(metric_value(&text, "ridge_plis_received_total") == 1.0);

    // DELETE receiver 0: its flow stops, receiver 1's goes on.
    let auth = format!("Bearer {token}");
    let r = http(
        &node.base_url(),
        "DELETE",
        &locations[0],
        &[("Authorization", &auth)],
        "",
    )
    .await?;
    ensure!(r.status == 200, "DELETE: {} {}", r.status, r.body);
    receivers[0].drain();
    receivers[1].drain();
    for i in PACKETS..PACKETS + 20 {
        publisher.sock.send_to(&rtp_packet(i), media).await?;
    }
    let more = collect(&mut receivers[1], 20, Duration::from_secs(3)).await?;
    ensure!(
        more.len() == 20,
        "receiver 1 got {} of 20 after DELETE",
        more.len()
    );
    let last = parse_rtp(received[1].last().context("empty")?)?;
    ensure!(
        parse_rtp(&more[0])?.seq == last.seq.wrapping_add(1),
        "receiver 1's sequence broke after the DELETE"
    );
    ensure!(
        receivers[0]
            .recv(Duration::from_millis(500))
            .await
            .is_none(),
        "receiver 0 still gets packets after DELETE"
    );
    // The deleted endpoint is gone.
    let r = http(
        &node.base_url(),
        "DELETE",
        &locations[0],
        &[("Authorization", &auth)],
        "",
    )
    .await?;
    ensure!(r.status == 404, "second DELETE: {} {}", r.status, r.body);
    let text = node.metrics().await?;
    ensure!(
        metric_value(&text, r#"ridge_sessions{transport="rtp"}"#) == 2.0,
        "{text}"
    );
    Ok(())
}
