//! Local (in-process) endpoints on a real node: a local publisher feeds a
//! room through `MediaHandle::local_endpoint`, and a local subscriber and a
//! plain-RTP subscriber on a real UDP socket (once it has sent a packet of
//! its own, its consent) both receive its stream; the
//! local subscriber's keyframe request reaches the local publisher; a
//! dropped endpoint leaves its room and a slow consumer's queue stays
//! bounded (the overflow is counted, not queued).

mod common;

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ridge_dataplane::config::{self, FileConfig, IoBackend, Overrides};
use ridge_dataplane::node::Node;
use ridge_dataplane::shard::{LOCAL_QUEUE, LocalEndpoint};
use ridge_sfu::{CodecSpec, LocalEndpointSpec, LocalOutput, RtpDirection};

const ROOM: &str = "local";
const SSRC: u32 = 0x0bad_cafe;

async fn node() -> Node {
    let overrides = Overrides {
        http: Some("127.0.0.1:0".parse().unwrap()),
        udp: Some("127.0.0.1:0".parse().unwrap()),
        shards: Some(1),
        pin_cores: Some(false),
        io_backend: Some(IoBackend::Mmsg),
        dev_no_auth: Some(true),
        // The sessions these tests leave open need not hold up the stop.
        drain_timeout: Some(Duration::from_millis(200)),
        ..Overrides::default()
    };
    let cfg = config::build(FileConfig::default(), &overrides, None).expect("config");
    Node::start(cfg).await.expect("node")
}

fn spec(direction: RtpDirection) -> LocalEndpointSpec {
    LocalEndpointSpec {
        direction,
        codec: CodecSpec::Vp8,
        payload_type: common::PT,
        ssrc: None,
        track: None,
    }
}

/// The next media packet for `sub` within a second: (sequence, payload).
async fn next_media(sub: &mut LocalEndpoint) -> (u16, Vec<u8>) {
    loop {
        let out = tokio::time::timeout(Duration::from_secs(1), sub.recv())
            .await
            .expect("local media within 1 s")
            .expect("the endpoint is open");
        if let LocalOutput::Media(m) = out {
            return (m.header.sequence, m.payload.as_slice().to_vec());
        }
    }
}

#[test]
fn a_local_publisher_reaches_local_and_plain_subscribers() {
    common::block_on(2, async {
        let node = node().await;
        let media = node.media().clone();
        let publisher = media
            .local_endpoint(ROOM, "ingest", spec(RtpDirection::Publish))
            .await
            .expect("local publisher");
        assert!(publisher.info().track.is_some(), "it publishes a track");
        let mut sub = media
            .local_endpoint(ROOM, "recorder", spec(RtpDirection::Subscribe))
            .await
            .expect("local subscriber");
        assert_eq!(sub.info().track, publisher.info().track);
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let plain = media
            .rtp_endpoint(
                ROOM,
                "plain",
                common::video_spec(RtpDirection::Subscribe, udp.local_addr().unwrap(), None),
            )
            .await
            .expect("plain subscriber");
        // The plain subscriber consents to the stream by sending first (an
        // empty RTCP receiver report), as a real one does.
        let rr = [0x80, 201, 0, 1, 0x12, 0x34, 0x56, 0x78];
        udp.send_to(&rr, plain.local).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let mut first_seq = None;
        for i in 0..50u16 {
            let p = common::vp8_rtp(SSRC, 7000 + i, i == 0, 300);
            publisher.send_rtp(&p).await.expect("fed");
            let (seq, payload) = next_media(&mut sub).await;
            assert_eq!(payload, p[12..], "local subscriber: payload of packet {i}");
            let first = *first_seq.get_or_insert(seq);
            assert_eq!(seq, first.wrapping_add(i), "one continuous stream");
            let mut buf = [0u8; 2048];
            let len = tokio::task::block_in_place(|| udp.recv(&mut buf)).expect("plain media");
            assert_eq!(
                &buf[12..len],
                &p[12..],
                "plain subscriber: payload of packet {i}"
            );
        }

        // The local subscriber asks for a keyframe; the local publisher is
        // told.
        let mut publisher = publisher;
        sub.request_keyframe(&media).await.expect("request");
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match publisher.recv().await {
                    Some(LocalOutput::KeyframeRequest { peer }) => return peer,
                    Some(_) => {}
                    None => panic!("the publisher's queue closed"),
                }
            }
        })
        .await
        .expect("a keyframe request reaches the local publisher");
        assert_eq!(got, publisher.info().peer);

        // A dropped endpoint leaves its room.
        let before = media.room_state(ROOM).await.participants.len();
        drop(sub);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(media.room_state(ROOM).await.participants.len(), before - 1);

        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}

#[test]
fn a_slow_local_consumer_is_dropped_from_not_queued_without_bound() {
    common::block_on(2, async {
        let node = node().await;
        let media = node.media().clone();
        let publisher = media
            .local_endpoint(ROOM, "ingest", spec(RtpDirection::Publish))
            .await
            .expect("local publisher");
        // Subscribes and never reads.
        let mut sub = media
            .local_endpoint(ROOM, "slow", spec(RtpDirection::Subscribe))
            .await
            .expect("local subscriber");
        let fed = LOCAL_QUEUE + 500;
        for i in 0..fed {
            let p = common::vp8_rtp(SSRC, i as u16, i == 0, 200);
            publisher.send_rtp(&p).await.expect("fed");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let dropped = media.shard_stats()[0].local_dropped.load(Ordering::Relaxed);
        let mut queued = 0;
        while let Some(out) = sub.try_recv() {
            if matches!(out, LocalOutput::Media(_)) {
                queued += 1;
            }
        }
        assert!(
            queued <= LOCAL_QUEUE,
            "{queued} queued, bound {LOCAL_QUEUE}"
        );
        assert!(
            dropped >= (fed - LOCAL_QUEUE) as u64,
            "{dropped} dropped of {fed} fed past a queue of {LOCAL_QUEUE}"
        );
        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}
