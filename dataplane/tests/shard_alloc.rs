//! The media shard's packet path allocates nothing in steady state, measured
//! end to end: a real node (one shard, real UDP sockets, the io_uring or
//! mmsg backend) relays 10,000 plain-RTP packets from a publisher to three
//! subscribers while a counting global allocator watches the shard thread.
//! Control commands (creating endpoints, stats snapshots) are excluded by
//! the shard itself; receiving, routing, fan-out, retransmission-buffer
//! bookkeeping, sending and timers are all inside the window.
//!
//! One test per backend, in this one binary (the counter is per thread, so
//! they do not disturb each other).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ridge_dataplane::config::{self, FileConfig, IoBackend, Overrides};
use ridge_dataplane::node::Node;
use ridge_sfu::{RtpDirection, RtpEndpointSpec, TrackKind};

#[global_allocator]
static ALLOC: ridge_io::CountingAlloc = ridge_io::CountingAlloc;

const SSRC: u32 = 0x1234_5678;

fn rtp(seq: u16, keyframe: bool) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 3000).to_be_bytes());
    p.extend_from_slice(&SSRC.to_be_bytes());
    // VP8 payload descriptor + a keyframe (P bit clear) or delta frame.
    p.extend_from_slice(&[0x10, if keyframe { 0x00 } else { 0x01 }, 0x9d, 0x01, 0x2a]);
    p.resize(200, 0xab);
    p
}

fn run(backend: IoBackend) {
    if backend == IoBackend::Uring && ridge_io::probe_uring().is_err() {
        if std::env::var("RIDGE_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("io_uring unavailable: {:?}", ridge_io::probe_uring());
        }
        eprintln!("SKIP shard_alloc uring: io_uring unavailable");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let overrides = Overrides {
            http: Some("127.0.0.1:0".parse().unwrap()),
            udp: Some("127.0.0.1:0".parse().unwrap()),
            shards: Some(1),
            pin_cores: Some(false),
            io_backend: Some(backend),
            dev_no_auth: Some(true),
            ..Overrides::default()
        };
        let cfg = config::build(FileConfig::default(), &overrides, None).expect("config");
        let node = Node::start(cfg).await.expect("node");
        let media = node.media().clone();
        let publisher = UdpSocket::bind("127.0.0.1:0").unwrap();
        let spec = |direction, remote: SocketAddr, ssrc| RtpEndpointSpec {
            direction,
            kind: TrackKind::Video,
            remote,
            payload_type: 96,
            ssrc,
            track: None,
        };
        let info = media
            .rtp_endpoint(
                "alloc",
                "pub",
                spec(
                    RtpDirection::Publish,
                    publisher.local_addr().unwrap(),
                    Some(SSRC),
                ),
            )
            .await
            .expect("publisher");
        let subs: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (i, s) in subs.iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            media
                .rtp_endpoint(
                    "alloc",
                    &format!("sub{i}"),
                    spec(RtpDirection::Subscribe, s.local_addr().unwrap(), None),
                )
                .await
                .expect("subscriber");
        }
        let stats = media.shard_stats()[0].clone();
        let dest = info.local;
        let mut buf = [0u8; 2048];
        let mut seq = 1000u16;
        // Sends `n` packets in bursts of 50 and reads them all back on every
        // subscriber, so nothing queues up unboundedly.
        let mut relay = |n: usize, seq: &mut u16| {
            for burst in 0..n / 50 {
                for k in 0..50 {
                    let key = burst == 0 && k == 0;
                    publisher.send_to(&rtp(*seq, key), dest).unwrap();
                    *seq = seq.wrapping_add(1);
                }
                for s in &subs {
                    for _ in 0..50 {
                        let (len, _) = s.recv_from(&mut buf).expect("relayed packet");
                        assert_eq!(len, 200);
                    }
                }
            }
        };
        // Warm-up: pools, queues and retransmission buffers reach their
        // steady size.
        tokio::task::block_in_place(|| relay(3000, &mut seq));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = stats.allocations.load(Ordering::Relaxed);
        assert!(
            before > 0,
            "the counter sees the shard's start-up allocations"
        );
        let started = Instant::now();
        tokio::task::block_in_place(|| relay(10_000, &mut seq));
        // Let the shard's loop publish its counter after the last packet.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = stats.allocations.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        assert_eq!(
            after - before,
            0,
            "{backend:?}: the shard allocated {} times while relaying 10,000 packets to 3 \
             subscribers ({elapsed:?})",
            after - before
        );
        node.shutdown();
        drop(media);
        node.wait().await.expect("clean stop");
    });
}

#[test]
fn uring_shard_packet_path_allocates_nothing() {
    run(IoBackend::Uring);
}

#[test]
fn mmsg_shard_packet_path_allocates_nothing() {
    run(IoBackend::Mmsg);
}
