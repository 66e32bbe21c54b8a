//! The local (in-process) packet path allocates nothing per packet in
//! steady state, checked with a counting global allocator: a local video
//! publisher fed from the core's packet pool, a local subscriber and a
//! plain-RTP subscriber. After a warm-up, 10,000 packets go through
//! `handle_local_rtp`; the plain transmits are recycled and the local
//! media dropped as an embedding program would once done with them;
//! `handle_timeout` runs whenever it is due, and every 100 packets the
//! local subscriber NACKs one packet and asks for a keyframe.
//!
//! This file holds exactly one `#[test]`: the allocator counts only on the
//! thread that opened the window.

mod common;

use std::time::Instant;

use common::*;
use ridge_sfu::packet;
use ridge_sfu::{CodecSpec, LocalOutput, Output, PeerId, RtpDirection, Sfu};

#[global_allocator]
static GLOBAL: ridge_io::CountingAlloc = ridge_io::CountingAlloc;

const WARMUP: u32 = 2_000;
const MEASURED: u32 = 10_000;

#[derive(Default)]
struct Tally {
    media: u64,
    keyframe_requests: u64,
    transmits: u64,
    /// The last sequence number the local subscriber received.
    last_seq: u16,
}

fn pump(sfu: &mut Sfu, tally: &mut Tally) {
    while let Some(out) = sfu.poll_output() {
        match out {
            Output::Transmit(t) => {
                tally.transmits += 1;
                sfu.recycle(t.contents);
            }
            Output::Local(LocalOutput::Media(m)) => {
                tally.media += 1;
                tally.last_seq = m.header.sequence;
                drop(m);
            }
            Output::Local(LocalOutput::KeyframeRequest { .. }) => tally.keyframe_requests += 1,
            Output::Event(_) | Output::MeshControl(_) => {}
        }
    }
}

/// Feeds packet `i` (a keyframe every 100) into the local publisher, from
/// the core's own pool; every 100 packets the subscriber NACKs and asks
/// for a keyframe.
fn step(
    sfu: &mut Sfu,
    now: &mut Instant,
    (publisher, subscriber): (PeerId, PeerId),
    i: u32,
    (key, delta): (&[u8], &[u8]),
    scratch: &mut Vec<u8>,
    tally: &mut Tally,
) {
    *now += ms(5);
    let payload = if i.is_multiple_of(100) { key } else { delta };
    let seq = i as u16;
    scratch.clear();
    packet::rtp::write_packet(scratch, true, 96, seq, i.wrapping_mul(450), 0xabcd, payload);
    let packet = sfu.packet_pool().copy_in(scratch);
    sfu.handle_local_rtp(*now, publisher, packet).unwrap();
    if i % 100 == 50 {
        sfu.handle_local_nack(*now, subscriber, &[tally.last_seq.wrapping_sub(3)])
            .unwrap();
        sfu.request_local_keyframe(*now, subscriber).unwrap();
    }
    if sfu.poll_timeout() <= *now {
        sfu.handle_timeout(*now);
    }
    pump(sfu, tally);
}

#[test]
fn local_path_allocates_nothing_per_packet_in_steady_state() {
    let mut node = Node::new(|_| {});
    let mut now = node.now;
    let room = "r";
    let alice = node.sfu.join(room, "publisher", false).unwrap();
    let publisher = node
        .local_endpoint(alice, RtpDirection::Publish, CodecSpec::Vp8, 96, None)
        .peer;
    let bob = node.sfu.join(room, "local", false).unwrap();
    let subscriber = node
        .local_endpoint(bob, RtpDirection::Subscribe, CodecSpec::Vp8, 100, None)
        .peer;
    let carol = node.sfu.join(room, "plain", false).unwrap();
    node.plain_video_endpoint(carol, RtpDirection::Subscribe, remote(3, 3000), 96, None);
    let key = vp8_payload(true, 640, 360, b"key", 1000);
    let delta = vp8_payload(false, 640, 360, b"delta", 1000);
    let mut scratch = Vec::with_capacity(1500);
    let mut tally = Tally::default();
    let sfu = &mut node.sfu;
    let mut run = |packets: std::ops::Range<u32>, tally: &mut Tally| {
        for i in packets {
            let payloads = (&key[..], &delta[..]);
            step(
                sfu,
                &mut now,
                (publisher, subscriber),
                i,
                payloads,
                &mut scratch,
                tally,
            );
        }
    };
    run(0..WARMUP, &mut tally);
    let before = Tally { ..tally };
    let a0 = ridge_io::alloc::thread_allocations();
    run(WARMUP..WARMUP + MEASURED, &mut tally);
    let allocs = ridge_io::alloc::thread_allocations() - a0;
    let media = tally.media - before.media;
    let transmits = tally.transmits - before.transmits;
    let requests = tally.keyframe_requests - before.keyframe_requests;
    eprintln!(
        "{MEASURED} local packets: {media} local deliveries, {transmits} transmits, \
         {requests} keyframe requests: {allocs} allocations"
    );
    // Every packet reached both subscribers, plus one resend a NACK.
    let nacks = u64::from(MEASURED / 100);
    assert_eq!(media, u64::from(MEASURED) + nacks);
    assert!(transmits >= u64::from(MEASURED));
    assert!(
        requests > 0,
        "keyframe requests reached the local publisher"
    );
    assert_eq!(allocs, 0, "allocations in the steady-state local path");
}
