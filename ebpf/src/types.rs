//! `#[repr(C)]` mirrors of the map key and value types in `bpf/ridge.h`.
//!
//! Every struct has explicit padding fields and compile-time checks of its
//! size, alignment and every field offset against the C layout, so a change
//! on one side that is not made on the other fails the build. The C header
//! is the source of truth, and asserts the same sizes and offsets with
//! `_Static_assert`, so a change on either side alone fails a build.

use core::mem::{align_of, offset_of, size_of};

/// Limits compiled into the maps (`RIDGE_MAX_*` in `ridge.h`).
pub(crate) const MAX_RATE_EXEMPT: usize = 4096;
pub(crate) const MAX_SHARDS: u32 = 64;
pub(crate) const MAX_FWD_FLOWS: u32 = 16384;
pub(crate) const FWD_MAX_DESTS: usize = 8;
pub(crate) const MAX_MESH_FLOWS: u32 = 4096;
/// `RIDGE_MESH_IN_VALID` / `RIDGE_MESH_OUT_VALID`: `MeshState::flags` bits.
pub(crate) const MESH_IN_VALID: u32 = 1;
pub(crate) const MESH_OUT_VALID: u32 = 2;

/// `enum ridge_stat`: indices of the per-CPU counter array.
pub(crate) mod stat {
    pub(crate) const DROP_TRUNCATED: u32 = 0;
    pub(crate) const DROP_BAD_IP_LENGTH: u32 = 1;
    pub(crate) const DROP_BAD_UDP_LENGTH: u32 = 2;
    pub(crate) const DROP_FRAGMENT: u32 = 3;
    pub(crate) const DROP_RATE_LIMITED: u32 = 4;
    pub(crate) const GUARD_MEDIA_OK: u32 = 5;
    pub(crate) const GUARD_NOT_MEDIA: u32 = 6;
    pub(crate) const FWD_XDP_TX: u32 = 7;
    pub(crate) const FWD_XDP_REDIRECT: u32 = 8;
    pub(crate) const FWD_TC_COPIES: u32 = 9;
    pub(crate) const FWD_SAMPLED: u32 = 10;
    pub(crate) const FWD_ERRORS: u32 = 11;
    pub(crate) const STEER_FLOW: u32 = 12;
    pub(crate) const STEER_DEFAULT: u32 = 13;
    pub(crate) const STEER_HASH: u32 = 14;
    pub(crate) const STEER_ERRORS: u32 = 15;
    pub(crate) const STEER_STUN_LEARNED: u32 = 16;
    pub(crate) const GUARD_RATE_EXEMPT: u32 = 17;
    pub(crate) const MESH_FORWARDED: u32 = 18;
    pub(crate) const MESH_BAD_TAG: u32 = 19;
    pub(crate) const MESH_TOO_OLD: u32 = 20;
    pub(crate) const COUNT: u32 = 21;
}

/// `struct ridge_guard_cfg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GuardCfg {
    pub(crate) interval_ns: u64,
    pub(crate) tolerance_ns: u64,
    /// Non-zero while the rate-exempt map has entries.
    pub(crate) exempt_any: u32,
    pub(crate) _pad0: u32,
}

/// `struct ridge_src_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct SrcKey {
    pub(crate) addr: [u8; 16],
}

/// `struct ridge_rate_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RateState {
    pub(crate) tat_ns: u64,
}

/// `struct ridge_steer_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct SteerKey {
    pub(crate) src_addr: [u8; 16],
    pub(crate) dst_addr: [u8; 16],
    /// Network byte order.
    pub(crate) src_port: u16,
    /// Network byte order.
    pub(crate) dst_port: u16,
}

/// `struct ridge_steer_cfg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SteerCfg {
    pub(crate) use_default: u32,
    pub(crate) default_shard: u32,
}

/// `struct ridge_fwd_key`. Addresses, ports and SSRC in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct FwdKey {
    pub(crate) src_addr: u32,
    pub(crate) dst_addr: u32,
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    pub(crate) ssrc: u32,
}

/// `struct ridge_fwd_dest`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FwdDest {
    pub(crate) dst_addr: u32,
    pub(crate) src_addr: u32,
    pub(crate) dst_port: u16,
    pub(crate) src_port: u16,
    pub(crate) ssrc: u32,
    pub(crate) ts_offset: u32,
    pub(crate) seq_offset: u16,
    pub(crate) _pad0: u16,
    pub(crate) ifindex: u32,
    pub(crate) dst_mac: [u8; 6],
    pub(crate) src_mac: [u8; 6],
}

/// `struct ridge_fwd_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FwdEntry {
    pub(crate) n_dests: u32,
    pub(crate) sample_every: u32,
    pub(crate) stats_slot: u32,
    pub(crate) _pad0: u32,
    pub(crate) dests: [FwdDest; FWD_MAX_DESTS],
}

/// `struct ridge_fwd_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FwdStats {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) copies: u64,
    pub(crate) sampled: u64,
    pub(crate) errors: u64,
    pub(crate) sample_countdown: u32,
    pub(crate) _pad0: u32,
}

/// `struct ridge_mesh_entry`. Keys as SipHash's (k0, k1): little-endian
/// u64s of key bytes 0..8 and 8..16, stored in host order (the BPF side
/// reads them as u64s on the same machine).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MeshEntry {
    pub(crate) in_key: [u64; 2],
    pub(crate) out_key: [u64; 2],
    pub(crate) dest: FwdDest,
    pub(crate) state_slot: u32,
    pub(crate) _pad0: u32,
    /// CLOCK_MONOTONIC ns of the transit core's epoch; 0: forwarded
    /// packets keep their abs-send-time extension as it is.
    pub(crate) send_epoch_ns: u64,
}

// Not derived: the keys are secrets.
impl core::fmt::Debug for MeshEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MeshEntry")
            .field("in_key", &"<redacted>")
            .field("out_key", &"<redacted>")
            .field("dest", &self.dest)
            .field("state_slot", &self.state_slot)
            .field("send_epoch_ns", &self.send_epoch_ns)
            .finish_non_exhaustive()
    }
}

/// `struct ridge_mesh_cfg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MeshCfg {
    /// Entries in the mesh flow map; 0: the XDP path skips its lookup.
    pub(crate) flows: u32,
    pub(crate) _pad0: u32,
}

/// `struct ridge_mesh_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MeshState {
    pub(crate) in_highest: u64,
    pub(crate) out_highest: u64,
    /// [`MESH_IN_VALID`] | [`MESH_OUT_VALID`].
    pub(crate) flags: u32,
    pub(crate) _pad0: u32,
}

/// `struct ridge_mesh_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MeshStats {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) bad_tag: u64,
    pub(crate) too_old: u64,
    pub(crate) passed: u64,
}

/// `RIDGE_IMPAIR_PPM`: the `loss_ppm` that drops every packet.
pub(crate) const IMPAIR_PPM: u32 = 1_000_000;

/// `struct ridge_impair_cfg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImpairCfg {
    pub(crate) loss_ppm: u32,
    /// Non-zero: only UDP over IPv4/IPv6 is impaired.
    pub(crate) udp_only: u32,
}

/// `struct ridge_impair_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImpairStats {
    pub(crate) passed: u64,
    pub(crate) dropped: u64,
    pub(crate) exempt: u64,
}

const _: () = {
    assert!(size_of::<GuardCfg>() == 24 && align_of::<GuardCfg>() == 8);
    assert!(offset_of!(GuardCfg, interval_ns) == 0);
    assert!(offset_of!(GuardCfg, tolerance_ns) == 8);
    assert!(offset_of!(GuardCfg, exempt_any) == 16);
    assert!(offset_of!(GuardCfg, _pad0) == 20);

    assert!(size_of::<SrcKey>() == 16 && align_of::<SrcKey>() == 1);
    assert!(size_of::<RateState>() == 8);

    assert!(size_of::<SteerKey>() == 36 && align_of::<SteerKey>() == 2);
    assert!(offset_of!(SteerKey, src_addr) == 0);
    assert!(offset_of!(SteerKey, dst_addr) == 16);
    assert!(offset_of!(SteerKey, src_port) == 32);
    assert!(offset_of!(SteerKey, dst_port) == 34);

    assert!(size_of::<SteerCfg>() == 8);
    assert!(offset_of!(SteerCfg, use_default) == 0);
    assert!(offset_of!(SteerCfg, default_shard) == 4);

    assert!(size_of::<FwdKey>() == 16 && align_of::<FwdKey>() == 4);
    assert!(offset_of!(FwdKey, src_addr) == 0);
    assert!(offset_of!(FwdKey, dst_addr) == 4);
    assert!(offset_of!(FwdKey, src_port) == 8);
    assert!(offset_of!(FwdKey, dst_port) == 10);
    assert!(offset_of!(FwdKey, ssrc) == 12);

    assert!(size_of::<FwdDest>() == 40 && align_of::<FwdDest>() == 4);
    assert!(offset_of!(FwdDest, dst_addr) == 0);
    assert!(offset_of!(FwdDest, src_addr) == 4);
    assert!(offset_of!(FwdDest, dst_port) == 8);
    assert!(offset_of!(FwdDest, src_port) == 10);
    assert!(offset_of!(FwdDest, ssrc) == 12);
    assert!(offset_of!(FwdDest, ts_offset) == 16);
    assert!(offset_of!(FwdDest, seq_offset) == 20);
    assert!(offset_of!(FwdDest, _pad0) == 22);
    assert!(offset_of!(FwdDest, ifindex) == 24);
    assert!(offset_of!(FwdDest, dst_mac) == 28);
    assert!(offset_of!(FwdDest, src_mac) == 34);

    assert!(size_of::<FwdEntry>() == 16 + 40 * FWD_MAX_DESTS);
    assert!(offset_of!(FwdEntry, n_dests) == 0);
    assert!(offset_of!(FwdEntry, sample_every) == 4);
    assert!(offset_of!(FwdEntry, stats_slot) == 8);
    assert!(offset_of!(FwdEntry, _pad0) == 12);
    assert!(offset_of!(FwdEntry, dests) == 16);

    assert!(size_of::<FwdStats>() == 48 && align_of::<FwdStats>() == 8);
    assert!(offset_of!(FwdStats, packets) == 0);
    assert!(offset_of!(FwdStats, bytes) == 8);
    assert!(offset_of!(FwdStats, copies) == 16);
    assert!(offset_of!(FwdStats, sampled) == 24);
    assert!(offset_of!(FwdStats, errors) == 32);
    assert!(offset_of!(FwdStats, sample_countdown) == 40);
    assert!(offset_of!(FwdStats, _pad0) == 44);

    assert!(size_of::<MeshEntry>() == 88 && align_of::<MeshEntry>() == 8);
    assert!(offset_of!(MeshEntry, in_key) == 0);
    assert!(offset_of!(MeshEntry, out_key) == 16);
    assert!(offset_of!(MeshEntry, dest) == 32);
    assert!(offset_of!(MeshEntry, state_slot) == 72);
    assert!(offset_of!(MeshEntry, _pad0) == 76);
    assert!(offset_of!(MeshEntry, send_epoch_ns) == 80);

    assert!(size_of::<MeshCfg>() == 8 && align_of::<MeshCfg>() == 4);
    assert!(offset_of!(MeshCfg, flows) == 0);
    assert!(offset_of!(MeshCfg, _pad0) == 4);

    assert!(size_of::<MeshState>() == 24 && align_of::<MeshState>() == 8);
    assert!(offset_of!(MeshState, in_highest) == 0);
    assert!(offset_of!(MeshState, out_highest) == 8);
    assert!(offset_of!(MeshState, flags) == 16);
    assert!(offset_of!(MeshState, _pad0) == 20);

    assert!(size_of::<MeshStats>() == 40 && align_of::<MeshStats>() == 8);
    assert!(offset_of!(MeshStats, packets) == 0);
    assert!(offset_of!(MeshStats, bytes) == 8);
    assert!(offset_of!(MeshStats, bad_tag) == 16);
    assert!(offset_of!(MeshStats, too_old) == 24);
    assert!(offset_of!(MeshStats, passed) == 32);

    assert!(size_of::<ImpairCfg>() == 8 && align_of::<ImpairCfg>() == 4);
    assert!(offset_of!(ImpairCfg, loss_ppm) == 0);
    assert!(offset_of!(ImpairCfg, udp_only) == 4);

    assert!(size_of::<ImpairStats>() == 24 && align_of::<ImpairStats>() == 8);
    assert!(offset_of!(ImpairStats, passed) == 0);
    assert!(offset_of!(ImpairStats, dropped) == 8);
    assert!(offset_of!(ImpairStats, exempt) == 16);
};
