//! SRTP/SRTCP protect and unprotect allocate nothing for an SSRC already seen
//! when the packet and scratch buffers have the capacity, checked with a
//! counting global allocator for both profiles.
//!
//! This file holds exactly one `#[test]`: the allocator counts only on the
//! thread that opened the window.

use ridge_sfu::{SrtpContext, SrtpProfile, mesh_master_key};

#[global_allocator]
static GLOBAL: ridge_io::CountingAlloc = ridge_io::CountingAlloc;

fn rtp(out: &mut Vec<u8>, ssrc: u32, seq: u16) {
    out.clear();
    out.extend_from_slice(&[0x90, 96]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0x7f, 0, 0]);
    out.resize(out.len() + 1000, seq as u8);
}

fn rtcp(out: &mut Vec<u8>, ssrc: u32) {
    out.clear();
    out.extend_from_slice(&[0x80, 201, 0, 1]);
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.resize(out.len() + 80, 0x5a);
}

#[test]
fn protect_and_unprotect_allocate_nothing_in_steady_state() {
    for profile in [
        SrtpProfile::NullHmacSha1_80,
        SrtpProfile::Aes128CmHmacSha1_80,
    ] {
        let (key, salt) = mesh_master_key(&[1; 32], "a", "b");
        let mut tx = SrtpContext::new(profile, &key, &salt);
        let mut rx = SrtpContext::new(profile, &key, &salt);
        let mut packet = Vec::with_capacity(1500);
        let mut scratch = Vec::with_capacity(1500);
        let ssrcs = [0x1111, 0x2222, 0x3333];

        // Warm-up: every SSRC seen once in each direction of the API.
        for &ssrc in &ssrcs {
            rtp(&mut packet, ssrc, 65_000);
            tx.protect_rtp(&mut packet).unwrap();
            rx.unprotect_rtp(&packet, &mut scratch).unwrap();
        }
        rtcp(&mut packet, 0x1111);
        tx.protect_rtcp(&mut packet).unwrap();
        rx.unprotect_rtcp(&packet, &mut scratch).unwrap();

        let a0 = ridge_io::alloc::thread_allocations();
        // Across the sequence wrap, with a retransmission and a replay.
        for i in 1..2_000u16 {
            let seq = 65_000u16.wrapping_add(i);
            for &ssrc in &ssrcs {
                rtp(&mut packet, ssrc, seq);
                tx.protect_rtp(&mut packet).unwrap();
                rx.unprotect_rtp(&packet, &mut scratch).unwrap();
                assert!(rx.unprotect_rtp(&packet, &mut scratch).is_err());
            }
            if i > 5 {
                // A retransmission of a packet the receiver already has.
                rtp(&mut packet, ssrcs[0], seq.wrapping_sub(5));
                tx.protect_rtp(&mut packet).unwrap();
                assert!(rx.unprotect_rtp(&packet, &mut scratch).is_err());
            }
            rtcp(&mut packet, 0x1111);
            tx.protect_rtcp(&mut packet).unwrap();
            rx.unprotect_rtcp(&packet, &mut scratch).unwrap();
        }
        assert_eq!(ridge_io::alloc::thread_allocations() - a0, 0, "{profile:?}");
    }
}
