//! Media shards end to end, on each I/O backend: a real node (one shard,
//! real UDP sockets) relaying plain RTP from a publisher to subscribers.
//!
//! - The packet path allocates nothing in steady state: 10,000 packets go
//!   through while a counting global allocator watches the shard thread.
//!   Control commands (creating endpoints, stats snapshots) are excluded by
//!   the shard itself; receiving, routing, fan-out, retransmission-buffer
//!   bookkeeping, sending and timers are all inside the window.
//! - Datagrams larger than a packet buffer are dropped and counted, and the
//!   stream around them keeps flowing.
//! - Bursts leave as UDP GSO runs per subscriber (and never with
//!   `udp_gso = false`), with every subscriber getting each packet once, in
//!   order, intact.
//!
//! The allocation counter is per thread, so the tests do not disturb each
//! other.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ridge_dataplane::config::{self, FileConfig, IoBackend, Overrides};
use ridge_dataplane::node::Node;

use common::video_spec as spec;
use ridge_sfu::RtpDirection;

#[global_allocator]
static ALLOC: ridge_io::CountingAlloc = ridge_io::CountingAlloc;

const SSRC: u32 = 0x1234_5678;

fn rtp(seq: u16, keyframe: bool) -> Vec<u8> {
    common::vp8_rtp(SSRC, seq, keyframe, 200)
}

/// A blocking receive that retries when a signal interrupts it.
fn recv(sock: &UdpSocket, buf: &mut [u8]) -> usize {
    loop {
        match sock.recv_from(buf) {
            Ok((len, _)) => return len,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("relayed packet: {e}"),
        }
    }
}

fn skip_without_uring(backend: IoBackend) -> bool {
    if backend == IoBackend::Uring && ridge_io::probe_uring().is_err() {
        if std::env::var("RIDGE_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("io_uring unavailable: {:?}", ridge_io::probe_uring());
        }
        eprintln!("SKIP shards ({backend:?}): io_uring unavailable");
        return true;
    }
    false
}

/// A one-shard node with a plain-RTP publisher and three subscribers.
struct Relay {
    node: Node,
    publisher: UdpSocket,
    subs: Vec<UdpSocket>,
    dest: SocketAddr,
    seq: u16,
}

impl Relay {
    async fn start(backend: IoBackend) -> Relay {
        Self::start_with(backend, true).await
    }

    async fn start_with(backend: IoBackend, udp_gso: bool) -> Relay {
        let overrides = Overrides {
            udp_gso: Some(udp_gso),
            http: Some("127.0.0.1:0".parse().unwrap()),
            udp: Some("127.0.0.1:0".parse().unwrap()),
            shards: Some(1),
            pin_cores: Some(false),
            io_backend: Some(backend),
            dev_no_auth: Some(true),
            // Loopback subscribers receive without a consent packet first.
            rtp_trusted_networks: vec!["127.0.0.0/8".parse().unwrap()],
            ..Overrides::default()
        };
        let cfg = config::build(FileConfig::default(), &overrides, None).expect("config");
        let node = Node::start(cfg).await.expect("node");
        let media = node.media().clone();
        let publisher = UdpSocket::bind("127.0.0.1:0").unwrap();
        let info = media
            .rtp_endpoint(
                "shards",
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
                    "shards",
                    &format!("sub{i}"),
                    spec(RtpDirection::Subscribe, s.local_addr().unwrap(), None),
                )
                .await
                .expect("subscriber");
        }
        Relay {
            node,
            publisher,
            subs,
            dest: info.local,
            seq: 1000,
        }
    }

    /// Sends `n` packets in bursts of 50 (a keyframe first) and reads them
    /// all back on every subscriber, so nothing queues up unboundedly.
    fn relay(&mut self, n: usize) {
        let mut buf = [0u8; 2048];
        for burst in 0..n / 50 {
            let first = self.seq;
            for k in 0..50 {
                let key = burst == 0 && k == 0;
                self.publisher
                    .send_to(&rtp(self.seq, key), self.dest)
                    .unwrap();
                self.seq = self.seq.wrapping_add(1);
            }
            for s in &self.subs {
                for k in 0..50u16 {
                    let len = recv(s, &mut buf);
                    let sent = rtp(first.wrapping_add(k), burst == 0 && k == 0);
                    assert_eq!(len, sent.len());
                    assert_eq!(&buf[12..len], &sent[12..], "payload of packet {k} intact");
                }
            }
        }
    }

    fn shard(&self) -> std::sync::Arc<ridge_dataplane::shard::ShardStats> {
        self.node.media().shard_stats()[0].clone()
    }

    async fn stop(self) {
        self.node.shutdown();
        self.node.wait().await.expect("clean stop");
    }
}

fn block_on(f: impl std::future::Future<Output = ()>) {
    common::block_on(1, f);
}

fn allocates_nothing(backend: IoBackend) {
    if skip_without_uring(backend) {
        return;
    }
    block_on(async {
        let mut r = Relay::start(backend).await;
        let stats = r.shard();
        // Warm-up: pools, queues and retransmission buffers reach their
        // steady size.
        tokio::task::block_in_place(|| r.relay(3000));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = stats.allocations.load(Ordering::Relaxed);
        assert!(
            before > 0,
            "the counter sees the shard's start-up allocations"
        );
        let started = Instant::now();
        tokio::task::block_in_place(|| r.relay(10_000));
        // Let the shard's loop publish its counter after the last packet.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = stats.allocations.load(Ordering::Relaxed);
        assert_eq!(
            after - before,
            0,
            "{backend:?}: the shard allocated {} times while relaying 10,000 packets to 3 \
             subscribers ({:?})",
            after - before,
            started.elapsed()
        );
        // Bursts of 50 reach the shard in batches, and each subscriber's
        // packets of a batch leave as one GSO send. (The shard publishes
        // these counters every 500 ms.)
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (sends, datagrams) = (
            stats.gso_sends.load(Ordering::Relaxed),
            stats.gso_datagrams.load(Ordering::Relaxed),
        );
        assert!(
            sends > 0 && datagrams >= 2 * sends,
            "{backend:?}: no GSO runs ({sends} sends, {datagrams} datagrams)"
        );
        r.stop().await;
    });
}

/// With `udp_gso = false` the same bursts arrive just as intact, each
/// datagram in its own send.
fn gso_off_sends_each_datagram_alone(backend: IoBackend) {
    if skip_without_uring(backend) {
        return;
    }
    block_on(async {
        let mut r = Relay::start_with(backend, false).await;
        tokio::task::block_in_place(|| r.relay(2000));
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stats = r.shard();
        assert_eq!(stats.gso_sends.load(Ordering::Relaxed), 0);
        assert_eq!(stats.gso_datagrams.load(Ordering::Relaxed), 0);
        r.stop().await;
    });
}

fn oversized_datagrams_are_dropped_and_counted(backend: IoBackend) {
    if skip_without_uring(backend) {
        return;
    }
    block_on(async {
        let mut r = Relay::start(backend).await;
        tokio::task::block_in_place(|| {
            r.relay(100);
            // Larger than a packet buffer (2048 bytes), but valid RTP
            // from the publisher: dropped whole, never half-forwarded.
            let mut big = rtp(r.seq, false);
            big.resize(3000, 0xcd);
            for _ in 0..20 {
                r.publisher.send_to(&big, r.dest).unwrap();
            }
            r.relay(100);
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(r.shard().truncated.load(Ordering::Relaxed), 20);
        r.stop().await;
    });
}

#[test]
fn uring_packet_path_allocates_nothing() {
    allocates_nothing(IoBackend::Uring);
}

#[test]
fn mmsg_packet_path_allocates_nothing() {
    allocates_nothing(IoBackend::Mmsg);
}

#[test]
fn uring_gso_off_sends_each_datagram_alone() {
    gso_off_sends_each_datagram_alone(IoBackend::Uring);
}

#[test]
fn mmsg_gso_off_sends_each_datagram_alone() {
    gso_off_sends_each_datagram_alone(IoBackend::Mmsg);
}

#[test]
fn uring_oversized_datagrams_are_dropped_and_counted() {
    oversized_datagrams_are_dropped_and_counted(IoBackend::Uring);
}

#[test]
fn mmsg_oversized_datagrams_are_dropped_and_counted() {
    oversized_datagrams_are_dropped_and_counted(IoBackend::Mmsg);
}
