//! `shard_ports = "shared"`: two shards on one UDP port, each datagram
//! steered to its shard by the `ridge_steer` BPF program. Needs root; prints
//! `SKIP <test>: <why>` otherwise (and fails under `RIDGE_REQUIRE_ALL=1`).
//!
//! - Plain RTP: rooms placed on shard 0 and shard 1, several publishers
//!   each, all sending to the one port; every subscriber gets its room's
//!   stream. A datagram the kernel's hash sent to the wrong shard would be
//!   dropped there (that shard has no such endpoint), so with 8 publishers
//!   a lucky pass without steering has odds of 1 in 256; the steering
//!   counters are checked too.
//! - WebRTC: a str0m client publishes to a room on shard 1 through the
//!   shared port and connects (ICE + DTLS), which needs its STUN request
//!   steered by the shard in our ufrag and the DTLS that follows by the
//!   learned flow.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::video_spec as spec;
use ridge_dataplane::config::{self, FileConfig, Overrides, ShardPorts};
use ridge_dataplane::node::Node;
use ridge_dataplane::shard::shard_for_room;
use ridge_sfu::{OfferIntent, RtpDirection};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, RtcConfig};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn skip(test: &str) -> bool {
    if is_root() {
        return false;
    }
    if std::env::var("RIDGE_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{test}: needs root (BPF steering)");
    }
    eprintln!("SKIP {test}: needs root (CAP_BPF, CAP_NET_ADMIN) for BPF steering");
    true
}

async fn shared_node() -> Node {
    let overrides = Overrides {
        http: Some("127.0.0.1:0".parse().unwrap()),
        udp: Some("127.0.0.1:0".parse().unwrap()),
        shards: Some(2),
        pin_cores: Some(false),
        shard_ports: Some(ShardPorts::Shared),
        dev_no_auth: Some(true),
        // Loopback subscribers receive without a consent packet first.
        rtp_trusted_networks: vec!["127.0.0.0/8".parse().unwrap()],
        ..Overrides::default()
    };
    let cfg = config::build(FileConfig::default(), &overrides, None).expect("config");
    Node::start(cfg)
        .await
        .expect("node with a shared media port")
}

/// A room name placed on `shard` of 2.
fn room_on(shard: usize) -> String {
    (0..)
        .map(|i| format!("room{i}"))
        .find(|r| shard_for_room(r, 2) == shard)
        .unwrap()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: ridge\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn rtp(ssrc: u32, seq: u16) -> Vec<u8> {
    common::vp8_rtp(ssrc, seq, seq == 0, 120)
}

fn block_on(f: impl std::future::Future<Output = ()>) {
    common::block_on(2, f);
}

#[test]
fn plain_rtp_rooms_on_both_shards_share_one_port() {
    if skip("plain_rtp_rooms_on_both_shards_share_one_port") {
        return;
    }
    block_on(async {
        let node = shared_node().await;
        let media = node.media().clone();
        assert_eq!(media.shard_ports(), "shared");
        let addrs = media.local_addrs();
        assert_eq!(addrs[0], addrs[1], "both shards on one address");
        // Per shard: 4 rooms' worth of (publisher, subscriber), each room
        // its own, so a publisher's packets have exactly one reader.
        let mut pairs = Vec::new();
        let mut n = 0u32;
        for shard in [0usize, 1] {
            for k in 0..4 {
                let room = loop {
                    let r = format!("s{shard}-{k}-{n}");
                    n += 1;
                    if shard_for_room(&r, 2) == shard {
                        break r;
                    }
                };
                let publisher = UdpSocket::bind("127.0.0.1:0").unwrap();
                let subscriber = UdpSocket::bind("127.0.0.1:0").unwrap();
                subscriber
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let ssrc = 0x1000 + n;
                let info = media
                    .rtp_endpoint(
                        &room,
                        "pub",
                        spec(
                            RtpDirection::Publish,
                            publisher.local_addr().unwrap(),
                            Some(ssrc),
                        ),
                    )
                    .await
                    .expect("publisher");
                assert_eq!(info.local, addrs[0], "the one shared port is advertised");
                media
                    .rtp_endpoint(
                        &room,
                        "sub",
                        spec(
                            RtpDirection::Subscribe,
                            subscriber.local_addr().unwrap(),
                            None,
                        ),
                    )
                    .await
                    .expect("subscriber");
                pairs.push((shard, publisher, subscriber, info.local, ssrc, info.peer));
            }
        }
        let shared = media.shared_port().expect("steering attached").clone();
        assert_eq!(shared.flows(), 16, "one entry per endpoint");
        tokio::task::block_in_place(|| {
            let mut buf = [0u8; 2048];
            for (shard, publisher, subscriber, dest, ssrc, _) in &pairs {
                for seq in 0..20u16 {
                    publisher.send_to(&rtp(*ssrc, seq), dest).unwrap();
                }
                for seq in 0..20u16 {
                    let (len, _) = subscriber.recv_from(&mut buf).unwrap_or_else(|e| {
                        panic!("shard {shard}: packet {seq} of SSRC {ssrc:#x} not relayed: {e}")
                    });
                    let sent = rtp(*ssrc, seq);
                    assert_eq!(len, sent.len());
                    assert_eq!(&buf[12..len], &sent[12..]);
                }
            }
        });
        let c = shared.counters().unwrap();
        assert!(c.steer_flow >= 8 * 20, "{c:?}");
        assert_eq!(c.steer_errors, 0, "{c:?}");

        let health = http_get(node.http_addr(), "/healthz");
        assert!(health.contains(r#""shard_ports":"shared""#), "{health}");
        let metrics = http_get(node.http_addr(), "/metrics");
        let line = metrics
            .lines()
            .find(|l| l.starts_with("ridge_steer_flow_total "))
            .unwrap_or_else(|| panic!("no ridge_steer_flow_total in {metrics}"));
        let v: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(v >= 160, "{line}");
        assert!(metrics.contains("ridge_steer_stun_learned_total"));

        // Removing an endpoint removes its entry.
        let (_, _, _, _, _, peer) = &pairs[0];
        media.remove_peer(*peer).await.unwrap();
        assert_eq!(shared.flows(), 15);

        // A session that goes without remove_peer (its participant leaves)
        // keeps its entry until the sweep has seen it dead twice; live
        // sessions' entries stay.
        let (_, _, _, _, _, peer) = &pairs[1];
        let (participant, _, _) = media.peer_owner(*peer).await.expect("owner");
        media.leave(participant).await.unwrap();
        let live: std::collections::HashSet<SocketAddr> =
            media.remote_addrs().await.unwrap().into_iter().collect();
        assert_eq!(live.len(), 14, "14 endpoints left");
        assert_eq!(shared.sweep(&live), 0, "first sweep only marks");
        assert_eq!(shared.flows(), 15);
        let removed = shared.sweep(&live);
        assert!(removed >= 1, "second sweep removes the dead entry");
        assert_eq!(shared.flows(), 15 - removed);
        assert!(shared.flows() >= 14, "no live entry removed");

        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}

#[test]
fn webrtc_publish_on_shard_1_connects_through_the_shared_port() {
    if skip("webrtc_publish_on_shard_1_connects_through_the_shared_port") {
        return;
    }
    block_on(async {
        let node = shared_node().await;
        let media = node.media().clone();
        let room = room_on(1);

        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let local = sock.local_addr().unwrap();
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_vp8(true)
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let mut change = rtc.sdp_api();
        change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        let (offer, pending) = change.apply().unwrap();
        let (_peer, answer) = media
            .session(&room, "cam", offer.to_sdp_string(), OfferIntent::Publish)
            .await
            .expect("WHIP-style session");
        assert!(
            answer.contains(&format!("{}", media.local_addr().port())),
            "{answer}"
        );
        let ufrag = answer
            .lines()
            .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
            .expect("ufrag in the answer");
        assert_eq!(&ufrag[..2], "01", "our ufrag names shard 1: {ufrag}");
        rtc.sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
            .unwrap();

        let connected = tokio::task::block_in_place(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = vec![0u8; 2048];
            let mut next = Instant::now();
            while Instant::now() < deadline {
                let now = Instant::now();
                while let Ok((n, source)) = sock.recv_from(&mut buf) {
                    if let Ok(r) = Receive::new(Protocol::Udp, source, local, &buf[..n]) {
                        rtc.handle_input(Input::Receive(now, r)).unwrap();
                    }
                }
                if now >= next {
                    rtc.handle_input(Input::Timeout(now)).unwrap();
                }
                loop {
                    match rtc.poll_output().unwrap() {
                        Output::Timeout(t) => {
                            next = t;
                            break;
                        }
                        Output::Transmit(t) => {
                            let _ = sock.send_to(&t.contents, t.destination);
                        }
                        Output::Event(Event::Connected) => return true,
                        Output::Event(_) => {}
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        });
        assert!(connected, "ICE + DTLS through the shared port to shard 1");
        let c = media.shared_port().unwrap().counters().unwrap();
        assert!(c.steer_stun_learned >= 1, "{c:?}");
        assert!(c.steer_flow >= 1, "DTLS followed the learned flow: {c:?}");
        assert_eq!(c.steer_errors, 0, "{c:?}");

        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}
