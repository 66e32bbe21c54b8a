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
    let mut sfu = Sfu::new(fuzz_config(SfuConfig::new(addr("127.0.0.1:5004"))), now);
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
    let mut sfu = Sfu::new(fuzz_config(SfuConfig::new(local)), now);
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
                    fmtp: None,
                    codec: None,
                    audio_level_ext: None,
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

/// Decodes `data` as a mesh control message (RTCP APP `RDGM`).
pub fn mesh_message(data: &[u8]) {
    let _ = crate::mesh::parse_message(data);
    // The delay report shares the APP framing; what parses re-encodes to
    // the same fields.
    if let Ok(r) = crate::mesh::parse_delay_report(data) {
        let mut out = Vec::new();
        crate::mesh::write_delay_report(&mut out, 1, &r);
        let again = crate::mesh::parse_delay_report(&out).expect("a written report parses");
        assert_eq!((again.state, again.received_bps), (r.state, r.received_bps));
    }
}

/// Decodes `data` as a mesh FEC repair packet (FlexFEC) and tries to
/// rebuild a packet from it with a decoder holding a few packets; and
/// decodes it as a RED payload, re-encoding what it finds.
pub fn mesh_fec(data: &[u8]) {
    use crate::buf::PacketBuf;
    use crate::fec::{FecDecoder, FecPacket};
    use crate::red::{self, RedPayload};
    if let Ok(fec) = FecPacket::parse(data) {
        let mut dec = FecDecoder::default();
        // Hold every other protected packet, made of the input's bytes.
        for (i, seq) in fec.protected().enumerate().filter(|(i, _)| i % 2 == 1) {
            let mut p = Vec::with_capacity(12 + data.len());
            crate::packet::rtp::write_header(&mut p, false, 96, seq, i as u32, fec.protected_ssrc);
            p.extend_from_slice(&data[..data.len().min(i * 7)]);
            dec.store(seq, &PacketBuf::copy_from(&p));
        }
        let mut out = Vec::new();
        if let Ok(crate::fec::Recovery::Recovered(seq)) = dec.recover(&fec, &mut out) {
            let h = crate::packet::RtpHeader::parse(&out);
            assert!(h.is_err() || h.is_ok_and(|h| h.sequence == seq));
        }
        let _ = fec.last();
    }
    if let Ok(r) = RedPayload::parse(data) {
        let primary = &data[r.primary.start..r.primary.end];
        let mut blocks = [(0u32, &data[..0]); red::MAX_BLOCKS];
        for (slot, b) in blocks.iter_mut().zip(r.redundant()) {
            *slot = (u32::from(b.ts_offset), &data[b.start..b.end]);
        }
        let blocks = &blocks[..r.redundant().len()];
        let mut out = Vec::new();
        let written = red::write(&mut out, r.primary.pt, blocks, primary);
        let again = RedPayload::parse(&out).expect("what we write parses");
        assert_eq!(&out[again.primary.start..again.primary.end], primary);
        assert_eq!(again.redundant().len(), written);
        // The blocks written are the most recent of those given.
        for (b, (_, d)) in again
            .redundant()
            .iter()
            .zip(&blocks[blocks.len() - written..])
        {
            assert_eq!(&out[b.start..b.end], *d);
        }
    }
}

/// Feeds a core with mesh links datagrams that *pass* link authentication:
/// each chunk of `data` is protected with the link's sending keys first
/// (as RTP or, when the first byte says so, RTCP; chunks SRTP refuses to
/// protect go in raw), so the fuzzer reaches the handlers behind the
/// authentication: media, NACK, PLI, SUBSCRIBE and ANNOUNCE. Returns how
/// many datagrams the link accepted (so tests can see the handlers ran).
pub fn mesh_datagrams(data: &[u8]) -> u64 {
    use crate::mesh::{MeshConfig, MeshLinkSpec, MeshRouteSpec};
    use crate::srtp::{SrtpContext, SrtpProfile, mesh_master_key};
    let mut now = Instant::now();
    let local = addr("10.0.0.3:5000");
    let peer = addr("10.0.0.2:5000");
    let key = [0x5a; 32];
    let mut sfu = Sfu::new(fuzz_config(SfuConfig::new(local)), now);
    if let Ok(p) = sfu.join("fuzz", "publisher", true) {
        let _ = sfu.add_rtp_endpoint(
            now,
            p,
            RtpEndpointSpec {
                fmtp: None,
                codec: None,
                audio_level_ext: None,
                direction: RtpDirection::Publish,
                kind: TrackKind::Video,
                remote: addr("127.0.0.1:6000"),
                payload_type: 96,
                ssrc: Some(0x1111),
                track: None,
            },
        );
    }
    if let Ok(p) = sfu.join("fuzz", "viewer", true) {
        let _ = sfu.add_rtp_endpoint(
            now,
            p,
            RtpEndpointSpec {
                fmtp: None,
                codec: None,
                audio_level_ext: None,
                direction: RtpDirection::Subscribe,
                kind: TrackKind::Video,
                remote: addr("127.0.0.1:6001"),
                payload_type: 96,
                ssrc: None,
                track: None,
            },
        );
    }
    let route = |source: &str, upstream: Option<&str>, downstream: &[&str]| MeshRouteSpec {
        room: "fuzz".into(),
        source: source.into(),
        upstream: upstream.map(str::to_owned),
        downstream: downstream.iter().map(|d| d.to_string()).collect(),
    };
    sfu.set_mesh(
        now,
        MeshConfig {
            node_id: "c".into(),
            links: vec![MeshLinkSpec {
                peer: "b".into(),
                address: peer,
                key,
                trusted: data.first().is_some_and(|b| b & 1 == 0),
                fec: true,
            }],
            routes: vec![route("a", Some("b"), &[]), route("c", None, &["b"])],
        },
    );
    let profile = if data.first().is_some_and(|b| b & 1 == 0) {
        SrtpProfile::NullSipHash24_80
    } else {
        SrtpProfile::Aes128CmHmacSha1_80
    };
    let (k, s) = mesh_master_key(&key, "b", "c");
    let mut tx = SrtpContext::new(profile, &k, &s);
    let mut rest = data;
    let mut buf = Vec::with_capacity(2048);
    while let Some((&head, tail)) = rest.split_first() {
        let len = (usize::from(head >> 2) * 4).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        buf.clear();
        buf.extend_from_slice(chunk);
        // Steer chunks towards what the handlers parse: RTP version 2, RTCP
        // packet types, and mesh APP packets with a consistent length.
        if let Some(b) = buf.first_mut() {
            *b = 0x80 | (*b & 0x3f);
        }
        if head & 2 != 0 && buf.len() >= 4 {
            buf[1] = 200 + buf[1] % 8;
            let words = (buf.len() / 4 - 1) as u16;
            buf[2..4].copy_from_slice(&words.to_be_bytes());
            if head & 1 != 0 && buf.len() >= 12 {
                buf[1] = 204;
                buf[8..12].copy_from_slice(b"RDGM");
            }
            buf.truncate(buf.len() / 4 * 4);
        }
        // Some RTP chunks as FEC repair packets (one CSRC) or RED audio.
        if head & 3 == 1 && buf.len() >= 2 {
            if head & 0x20 != 0 {
                buf[0] = 0x81 | (buf[0] & 0x30);
                buf[1] = (buf[1] & 0x80) | 118;
            } else {
                buf[1] = (buf[1] & 0x80) | 63;
            }
        }
        let protected = if head & 2 == 0 {
            tx.protect_rtp(&mut buf)
        } else {
            tx.protect_rtcp(&mut buf)
        };
        let datagram: &[u8] = if protected.is_ok() { &buf } else { chunk };
        sfu.handle_datagram(now, peer, local, datagram);
        while let Some(out) = sfu.poll_output() {
            if let crate::Output::Transmit(t) = out {
                sfu.recycle(t.contents);
            }
        }
        now += Duration::from_millis(u64::from(head & 0x1f));
        if now >= sfu.poll_timeout() {
            sfu.handle_timeout(now);
        }
        rest = next;
    }
    sfu.stats().mesh_links.iter().map(|l| l.packets_in).sum()
}

/// The fuzzers' configuration: every plain remote may be sent to at once
/// (the address checks and consent have their own tests), so that input
/// reaches the forwarding path.
fn fuzz_config(mut c: SfuConfig) -> SfuConfig {
    c.rtp_allow_networks = vec!["0.0.0.0/0".parse().expect("a network")];
    c.rtp_trusted_networks = c.rtp_allow_networks.clone();
    c
}
