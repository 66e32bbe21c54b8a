//! Helpers shared by the dataplane's node-level tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;

use ridge_sfu::{RtpDirection, RtpEndpointSpec, TrackKind};

/// The payload type the tests' plain-RTP video endpoints use.
pub const PT: u8 = 96;

/// A plain-RTP VP8 packet of `len` bytes (at least 17): a 12-byte header, a
/// VP8 payload descriptor (a keyframe when `keyframe`), then a filler that
/// differs per `(ssrc, seq)`, so a buffer reused while a fan-out still held
/// it would show up as wrong bytes at a subscriber.
pub fn vp8_rtp(ssrc: u32, seq: u16, keyframe: bool, len: usize) -> Vec<u8> {
    let mut p = vec![0x80, PT];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 3000).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0x10, if keyframe { 0x00 } else { 0x01 }, 0x9d, 0x01, 0x2a]);
    let fill = (seq as u8) ^ (ssrc as u8) ^ 0x5a;
    while p.len() < len {
        p.push(fill.wrapping_add(p.len() as u8));
    }
    p
}

/// A plain-RTP video endpoint for `remote`.
pub fn video_spec(
    direction: RtpDirection,
    remote: SocketAddr,
    ssrc: Option<u32>,
) -> RtpEndpointSpec {
    RtpEndpointSpec {
        fmtp: None,
        codec: None,
        audio_level_ext: None,
        direction,
        kind: TrackKind::Video,
        remote,
        payload_type: PT,
        ssrc,
        track: None,
    }
}

/// Runs `f` on a multi-threaded runtime with `workers` worker threads.
pub fn block_on(workers: usize, f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}
