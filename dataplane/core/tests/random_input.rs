//! Random and mutated input through whole-core paths: SDP offers and
//! datagram streams. Nothing may panic. (The same entry points are the
//! cargo-fuzz targets `sdp_offer` and `datagrams`.)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ridge_sfu::fuzzing;
use std::time::Instant;
use str0m::Rtc;
use str0m::media::{Direction, MediaKind};

/// A real offer, as a str0m client (like a browser) makes it.
fn real_offer() -> String {
    let mut rtc = Rtc::new(Instant::now());
    let addr = "127.0.0.1:7000".parse().expect("addr");
    rtc.add_local_candidate(str0m::Candidate::host(addr, "udp").expect("candidate"));
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    api.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
    let (offer, _) = api.apply().expect("offer");
    offer.to_sdp_string()
}

#[test]
fn mutated_sdp_offers_never_panic() {
    let offer = real_offer();
    fuzzing::sdp_offer(offer.as_bytes());
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..300 {
        let mut bytes = offer.clone().into_bytes();
        for _ in 0..rng.random_range(1..8) {
            let i = rng.random_range(0..bytes.len());
            match rng.random_range(0..4) {
                0 => bytes[i] = rng.random(),
                1 => bytes.truncate(i),
                2 => {
                    let line = b"a=rid:x send\r\na=simulcast:send x;y\r\nm=video 9 UDP/TLS/RTP/SAVPF 255\r\n";
                    bytes.splice(i..i, line.iter().copied());
                }
                _ => {
                    let j = rng.random_range(0..bytes.len());
                    bytes.swap(i, j);
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
        fuzzing::sdp_offer(&bytes);
    }
}

#[test]
fn random_datagram_streams_never_panic() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..200 {
        let len = rng.random_range(0..4096);
        let mut data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Make many chunks look like RTP/RTCP so they get past the classifier.
        for i in (0..data.len()).step_by(17) {
            data[i] = 0x80 | (data[i] & 0x3f);
        }
        fuzzing::datagrams(&data);
    }
}

#[test]
fn random_mesh_control_messages_never_panic() {
    let mut rng = StdRng::seed_from_u64(12);
    for _ in 0..20_000 {
        let len = rng.random_range(0..256);
        let mut data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if data.len() >= 12 {
            data[0] = 0x80 | (data[0] & 0x03);
            data[1] = 204;
            data[8..12].copy_from_slice(b"RDGM");
        }
        fuzzing::mesh_message(&data);
    }
}

#[test]
fn random_mesh_fec_and_red_payloads_never_panic() {
    let mut rng = StdRng::seed_from_u64(14);
    for i in 0..20_000 {
        let len = rng.random_range(0..160);
        let mut data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Half of them shaped as repair packets: RTP with one CSRC and a
        // flexible-mask FEC header (R = F = 0) with a short mask.
        if i % 2 == 0 && data.len() >= 28 {
            data[0] = 0x81 | (data[0] & 0x30);
            data[16] &= 0x3f;
            data[26] |= if i % 4 == 0 { 0x80 } else { 0 };
        }
        fuzzing::mesh_fec(&data);
    }
}

/// Authenticated garbage on a mesh link: the handlers behind SRTP.
#[test]
fn random_authenticated_mesh_datagrams_never_panic() {
    let mut rng = StdRng::seed_from_u64(13);
    let mut accepted = 0;
    for round in 0..300 {
        let len = rng.random_range(0..4096);
        let mut data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Shape some chunks as RTP/RTCP headers, some as mesh APP packets.
        for i in (1..data.len()).step_by(23) {
            data[i] = 0x80 | (data[i] & 0x3f);
            if round % 2 == 0 && i + 12 < data.len() {
                data[i + 1] = 204;
                data[i + 8..i + 12].copy_from_slice(b"RDGM");
            }
        }
        accepted += fuzzing::mesh_datagrams(&data);
    }
    assert!(
        accepted > 1_000,
        "only {accepted} datagrams got past authentication"
    );
}
