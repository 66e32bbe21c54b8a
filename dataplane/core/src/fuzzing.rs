//! Entry points shared by the cargo-fuzz targets (dataplane/fuzz) and the
//! random-input tests: whole-core paths that take untrusted bytes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{OfferIntent, RtpDirection, RtpEndpointSpec, Sfu, SfuConfig, TrackKind};

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9)))
}

/// Feeds `data` as an SDP offer, both as a publish and a subscribe offer.
pub fn sdp_offer(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let now = Instant::now();
    let mut sfu = Sfu::new(SfuConfig::new(addr("127.0.0.1:5004")), now);
    for intent in [OfferIntent::Publish, OfferIntent::Subscribe { from: None }] {
        if let Ok(p) = sfu.join("fuzz", "fuzzer", true) {
            let _ = sfu.accept_offer(now, p, &text, intent);
        }
    }
    while sfu.poll_output().is_some() {}
    sfu.handle_timeout(now + Duration::from_secs(1));
    while sfu.poll_output().is_some() {}
}

/// Splits `data` into datagrams (first byte of each chunk picks the source
/// and the length) and feeds them to a core with plain RTP endpoints.
pub fn datagrams(data: &[u8]) {
    let mut now = Instant::now();
    let local = addr("127.0.0.1:5004");
    let mut sfu = Sfu::new(SfuConfig::new(local), now);
    let sources = [
        addr("127.0.0.1:6000"),
        addr("127.0.0.1:6001"),
        addr("127.0.0.1:6002"),
        addr("10.9.9.9:7000"),
    ];
    let specs = [
        (RtpDirection::Publish, sources[0], Some(0x1111)),
        (RtpDirection::Subscribe, sources[1], Some(0x2222)),
        (RtpDirection::Subscribe, sources[2], None),
    ];
    for (direction, remote, ssrc) in specs {
        if let Ok(p) = sfu.join("fuzz", "peer", true) {
            let _ = sfu.add_rtp_endpoint(
                now,
                p,
                RtpEndpointSpec {
                    direction,
                    kind: TrackKind::Video,
                    remote,
                    payload_type: 96,
                    ssrc,
                    track: None,
                },
            );
        }
    }
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head >> 2).min(tail.len()) * 4;
        let len = len.min(tail.len());
        let (chunk, next) = tail.split_at(len);
        let source = sources[usize::from(head & 3)];
        sfu.handle_datagram(now, source, local, chunk);
        while let Some(out) = sfu.poll_output() {
            if let crate::Output::Transmit(t) = out {
                sfu.recycle(t.contents);
            }
        }
        now += Duration::from_millis(u64::from(head & 0x0f));
        if now >= sfu.poll_timeout() {
            sfu.handle_timeout(now);
        }
        rest = next;
    }
}
