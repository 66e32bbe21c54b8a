//! Zero-copy fan-out: a packet received into the core's pool is sent to
//! every plain subscriber as a fresh 12-byte header in front of the very
//! same stored payload, and a plain subscriber's state stays small.

mod common;

use common::*;
use ridge_sfu::{Output, PacketBuf, RtpDirection};

const PUB: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 0, 1),
    5000,
));

#[test]
fn fan_out_shares_one_stored_payload() {
    let mut node = Node::new(|_| {});
    let publisher = node.sfu.join("room", "pub", false).unwrap();
    node.plain_video_endpoint(publisher, RtpDirection::Publish, PUB, 96, Some(0x1111));
    let subs: Vec<_> = (0..50u16)
        .map(|i| {
            let p = node.sfu.join("room", &format!("sub{i}"), false).unwrap();
            node.plain_video_endpoint(
                p,
                RtpDirection::Subscribe,
                remote(2, 6000 + i),
                100,
                Some(0x2000 + u32::from(i)),
            );
            remote(2, 6000 + i)
        })
        .collect();
    node.drain();

    // Receive the way the I/O loop does: straight into a pool slot.
    let payload = vp8_payload(true, 640, 480, b"k", 200);
    let datagram = rtp(96, 7, 1234, 0x1111, true, &payload);
    let pool = node.sfu.packet_pool();
    pool.recv_slots(1, |bufs| {
        bufs[0][..datagram.len()].copy_from_slice(&datagram)
    });
    let stored = pool.freeze(0, datagram.len());
    let now = node.now;
    node.sfu.handle_packet(now, PUB, LOCAL, stored.clone());

    let mut seen = 0;
    while let Some(out) = node.sfu.poll_output() {
        let Output::Transmit(t) = out else { continue };
        assert!(subs.contains(&t.destination));
        assert_eq!(
            t.contents.len(),
            12,
            "only the header is written per subscriber"
        );
        let shared: &PacketBuf = t.payload.as_ref().expect("payload shared, not copied");
        assert!(shared.shares_storage_with(&stored), "same stored bytes");
        assert_eq!(shared.as_slice(), &payload[..]);
        let whole = parse_rtp(&t.to_vec());
        assert_eq!(whole.payload, payload);
        seen += 1;
        node.sfu.recycle(t.contents);
    }
    assert_eq!(seen, subs.len());
}

#[test]
fn plain_subscriber_state_is_at_most_16_kib() {
    let mut node = Node::new(|_| {});
    let p = node.sfu.join("room", "sub", false).unwrap();
    let info = node.plain_video_endpoint(p, RtpDirection::Subscribe, remote(3, 7000), 100, None);
    let bytes = node.sfu.peer_state_bytes(info.peer).expect("peer exists");
    assert!(
        bytes <= 16 * 1024,
        "a plain subscriber keeps {bytes} bytes of state (limit 16 KiB)"
    );
}
