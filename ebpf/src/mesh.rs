//! The table of mesh transit flows: SRTP (NULL cipher, `NULL_SIPHASH24_80`)
//! flows that arrive on one mesh link and leave on another, verified and
//! re-signed by `ridge_xdp`.

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};

use crate::error::{Error, MeshEntryError, Result};
use crate::forward::{Destination, FlowKey, Slots, zero_per_cpu_slot};
use crate::guard::is_not_found;
use crate::types::{
    FwdKey, MAX_MESH_FLOWS as MAX_MESH_FLOWS_U32, MESH_IN_VALID, MESH_OUT_VALID, MeshCfg,
    MeshEntry, MeshState, MeshStats,
};

pub(crate) const ENTRIES_MAP: &str = "ridge_mesh_fwd";
pub(crate) const STATE_MAP: &str = "ridge_mesh_state";
pub(crate) const STATS_MAP: &str = "ridge_mesh_stats";
pub(crate) const CFG_MAP: &str = "ridge_mesh_cfg";

/// Most mesh transit flows installed at once (`RIDGE_MAX_MESH_FLOWS`).
pub const MAX_MESH_FLOWS: usize = MAX_MESH_FLOWS_U32 as usize;

/// Largest SRTP packet index (48 bits).
const MAX_INDEX: u64 = (1 << 48) - 1;

/// One mesh transit flow: verify with `in_key`, re-sign with `out_key`,
/// send to `dest`.
///
/// The keys are `NULL_SIPHASH24_80` auth keys: SipHash-2-4 keys as
/// `siphasher::sip128::SipHasher24::new_with_key` takes them.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshFlowEntry {
    /// Auth key of the upstream link direction (verifies received packets).
    pub in_key: [u8; 16],
    /// Auth key of the downstream link direction (signs sent packets).
    pub out_key: [u8; 16],
    /// The rewrite and egress. `seq_offset` and `ts_offset` must be 0
    /// (else [`MeshEntryError::NonZeroOffsets`]): sequence numbers and
    /// timestamps cross unchanged.
    pub dest: Destination,
    /// Highest SRTP index userspace accepted from upstream (seeds the
    /// kernel's index estimate). `None`: every packet goes to userspace
    /// (counted as `passed`) until the entry is replaced with one.
    pub in_highest: Option<u64>,
    /// Highest SRTP index userspace sent downstream on `dest.ssrc`. `None`:
    /// the first forwarded packet's index is its sequence number (ROC 0).
    pub out_highest: Option<u64>,
    /// The transit core's epoch on `CLOCK_MONOTONIC`, in ns (the clock of
    /// `bpf_ktime_get_ns` and of `std::time::Instant` on Linux). With it,
    /// each forwarded packet's abs-send-time header extension (RFC 8285
    /// one-byte element id 2, 3 bytes) is restamped with this node's send
    /// time, `now - send_epoch_ns` as 24-bit 6.18 fixed-point seconds (as
    /// the core's `abs_send_time`; 0 if the epoch is ahead of the clock),
    /// before the packet is re-signed. `None`: the extension crosses
    /// unchanged. (`Some(0)` is stored as 1 ns: 0 is the kernel's "none".)
    pub send_epoch_ns: Option<u64>,
}

impl std::fmt::Debug for MeshFlowEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshFlowEntry")
            .field("in_key", &"<redacted>")
            .field("out_key", &"<redacted>")
            .field("dest", &self.dest)
            .field("in_highest", &self.in_highest)
            .field("out_highest", &self.out_highest)
            .field("send_epoch_ns", &self.send_epoch_ns)
            .finish()
    }
}

impl MeshFlowEntry {
    fn validate(&self) -> Result<(), MeshEntryError> {
        let d = &self.dest;
        if d.seq_offset != 0 || d.ts_offset != 0 {
            return Err(MeshEntryError::NonZeroOffsets {
                seq_offset: d.seq_offset,
                ts_offset: d.ts_offset,
            });
        }
        for (field, value) in [
            ("in_highest", self.in_highest),
            ("out_highest", self.out_highest),
        ] {
            if let Some(value) = value.filter(|&v| v > MAX_INDEX) {
                return Err(MeshEntryError::IndexOutOfRange { field, value });
            }
        }
        Ok(())
    }

    fn raw(&self, state_slot: u32) -> MeshEntry {
        MeshEntry {
            in_key: sip_key(&self.in_key),
            out_key: sip_key(&self.out_key),
            dest: self.dest.raw(),
            state_slot,
            _pad0: 0,
            send_epoch_ns: self.send_epoch_ns.map_or(0, |ns| ns.max(1)),
        }
    }

    fn raw_state(&self) -> MeshState {
        let mut flags = 0;
        if self.in_highest.is_some() {
            flags |= MESH_IN_VALID;
        }
        if self.out_highest.is_some() {
            flags |= MESH_OUT_VALID;
        }
        MeshState {
            in_highest: self.in_highest.unwrap_or(0),
            out_highest: self.out_highest.unwrap_or(0),
            flags,
            _pad0: 0,
        }
    }
}

/// SipHash's (k0, k1): little-endian u64s of key bytes 0..8 and 8..16.
fn sip_key(key: &[u8; 16]) -> [u64; 2] {
    let mut k0 = [0u8; 8];
    let mut k1 = [0u8; 8];
    k0.copy_from_slice(&key[..8]);
    k1.copy_from_slice(&key[8..]);
    [u64::from_le_bytes(k0), u64::from_le_bytes(k1)]
}

/// A mesh flow's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshFlowCounters {
    /// Packets verified, re-signed and sent in the kernel.
    pub packets: u64,
    /// Their size (Ethernet frame).
    pub bytes: u64,
    /// Packets whose tag did not verify: handed to userspace.
    pub bad_tag: u64,
    /// Packets more than 1024 indices behind the highest: dropped.
    pub too_old: u64,
    /// Packets handed to userspace for any other reason (RTP packet shorter
    /// than 12 + 10 bytes or longer than 1472, no `in_highest` seed).
    pub passed: u64,
}

/// Where a mesh flow's SRTP indices stand in the kernel, and its counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshFlowState {
    /// Highest index accepted from upstream (the seed until a packet
    /// advances it).
    pub in_highest: Option<u64>,
    /// Highest index sent downstream.
    pub out_highest: Option<u64>,
    /// Counters since the entry was (re)installed.
    pub counters: MeshFlowCounters,
}

/// The mesh transit table: installed flows, their index state and counters.
///
/// Each entry owns a slot of the state array and of the per-CPU counter
/// array (the same index in both). Freed slots are reused last-in-line, as
/// in [`FlowTable`](crate::FlowTable).
///
/// The table also keeps the flow count the XDP program reads
/// (`ridge_mesh_cfg`) equal to [`len`](Self::len): while it is 0, media
/// packets skip the mesh flow lookup. It is raised before a new entry is
/// written and lowered after one is removed, so it is never below the
/// number of entries in the map.
pub struct MeshFlowTable {
    entries: HashMap<MapData, FwdKey, MeshEntry>,
    state: Array<MapData, MeshState>,
    stats: PerCpuArray<MapData, MeshStats>,
    cfg: Array<MapData, MeshCfg>,
    /// What `cfg` holds.
    cfg_flows: u32,
    slots: Slots,
    cpus: usize,
}

impl std::fmt::Debug for MeshFlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshFlowTable")
            .field("flows", &self.slots.len())
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

impl MeshFlowTable {
    pub(crate) fn new(
        entries: HashMap<MapData, FwdKey, MeshEntry>,
        state: Array<MapData, MeshState>,
        stats: PerCpuArray<MapData, MeshStats>,
        cfg: Array<MapData, MeshCfg>,
        cpus: usize,
    ) -> Self {
        Self {
            entries,
            state,
            stats,
            cfg,
            // A freshly created array map is zeroed.
            cfg_flows: 0,
            slots: Slots::new(MAX_MESH_FLOWS_U32),
            cpus,
        }
    }

    /// Installs or replaces the entry for `key`. A replaced entry keeps its
    /// slot; its state is re-seeded from `entry` and its counters restart
    /// at 0 (a packet of the flow in flight on another CPU during the
    /// replacement may still count or advance the state). At most
    /// [`MAX_MESH_FLOWS`] flows, else [`Error::TableFull`].
    pub fn insert(&mut self, key: FlowKey, entry: &MeshFlowEntry) -> Result<()> {
        entry.validate()?;
        let raw_key = key.raw();
        let (slot, fresh) = self.slots.claim(&raw_key).ok_or(Error::TableFull {
            table: "mesh flow",
            capacity: MAX_MESH_FLOWS,
        })?;
        // State, counters and the flow count first: the entry makes the
        // flow visible.
        let count = self.slots.len() + usize::from(fresh);
        let result = self
            .state
            .set(slot, entry.raw_state(), 0)
            .map_err(|e| Error::map(STATE_MAP, e))
            .and_then(|()| self.zero_slot(slot))
            .and_then(|()| self.set_flow_count(count))
            .and_then(|()| {
                self.entries
                    .insert(raw_key, entry.raw(slot), 0)
                    .map_err(|e| Error::map(ENTRIES_MAP, e))
            });
        match result {
            Ok(()) => {
                self.slots.bind(raw_key, slot);
                Ok(())
            }
            Err(e) => {
                if fresh {
                    self.slots.unclaim(slot);
                    self.lower_flow_count();
                }
                Err(e)
            }
        }
    }

    /// Writes `count` to the flow count the program reads, if it differs.
    fn set_flow_count(&mut self, count: usize) -> Result<()> {
        let flows = u32::try_from(count).unwrap_or(u32::MAX);
        if flows != self.cfg_flows {
            self.cfg
                .set(0, MeshCfg { flows, _pad0: 0 }, 0)
                .map_err(|e| Error::map(CFG_MAP, e))?;
            self.cfg_flows = flows;
        }
        Ok(())
    }

    /// Brings the flow count down to [`len`](Self::len) after an entry is
    /// gone. A failure is only logged: a count above the number of entries
    /// costs packets a lookup, nothing else, and the next insert or remove
    /// tries again.
    fn lower_flow_count(&mut self) {
        if let Err(e) = self.set_flow_count(self.slots.len()) {
            tracing::warn!("ridge-ebpf: updating the mesh flow count: {e}");
        }
    }

    /// The flow count the XDP program reads (`ridge_mesh_cfg`); equal to
    /// [`len`](Self::len) unless an update of it failed (logged). While it
    /// is 0 the program does not look mesh flows up.
    pub fn kernel_flow_count(&self) -> Result<u32> {
        self.cfg
            .get(&0, 0)
            .map(|cfg| cfg.flows)
            .map_err(|e| Error::map(CFG_MAP, e))
    }

    fn zero_slot(&mut self, slot: u32) -> Result<()> {
        zero_per_cpu_slot(&mut self.stats, STATS_MAP, slot, self.cpus)
    }

    /// Removes the entry; its packets go to userspace again. Returns the
    /// final state (indices, counters summed over CPUs) so that userspace
    /// can catch its SRTP contexts up, or `None` if the flow was not
    /// installed.
    pub fn remove(&mut self, key: FlowKey) -> Result<Option<MeshFlowState>> {
        let raw_key = key.raw();
        let Some(slot) = self.slots.get(&raw_key) else {
            return Ok(None);
        };
        match self.entries.remove(&raw_key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::map(ENTRIES_MAP, e)),
        }
        let state = self.slot_state(slot)?;
        self.slots.release(&raw_key);
        self.lower_flow_count();
        Ok(Some(state))
    }

    /// The flow's current state, or `None` if it is not installed.
    pub fn state(&self, key: FlowKey) -> Result<Option<MeshFlowState>> {
        match self.slots.get(&key.raw()) {
            Some(slot) => self.slot_state(slot).map(Some),
            None => Ok(None),
        }
    }

    fn slot_state(&self, slot: u32) -> Result<MeshFlowState> {
        let raw = self
            .state
            .get(&slot, 0)
            .map_err(|e| Error::map(STATE_MAP, e))?;
        let per_cpu = self
            .stats
            .get(&slot, 0)
            .map_err(|e| Error::map(STATS_MAP, e))?;
        Ok(MeshFlowState {
            in_highest: (raw.flags & MESH_IN_VALID != 0).then_some(raw.in_highest),
            out_highest: (raw.flags & MESH_OUT_VALID != 0).then_some(raw.out_highest),
            counters: sum(&per_cpu),
        })
    }

    /// Number of installed flows.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no flow is installed.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The installed flows' keys.
    pub fn keys(&self) -> Vec<FlowKey> {
        self.slots.keys()
    }

    /// Removes every flow.
    pub fn clear(&mut self) -> Result<()> {
        for key in self.keys() {
            self.remove(key)?;
        }
        Ok(())
    }
}

fn sum(per_cpu: &PerCpuValues<MeshStats>) -> MeshFlowCounters {
    per_cpu
        .iter()
        .fold(MeshFlowCounters::default(), |acc, s| MeshFlowCounters {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
            bad_tag: acc.bad_tag + s.bad_tag,
            too_old: acc.too_old + s.too_old,
            passed: acc.passed + s.passed,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> MeshFlowEntry {
        MeshFlowEntry {
            in_key: *b"0123456789abcdef",
            out_key: [0xa5; 16],
            dest: Destination {
                dst: "192.0.2.9:6000".parse().unwrap(),
                src: "198.51.100.1:5004".parse().unwrap(),
                ssrc: 0x0102_0304,
                seq_offset: 0,
                ts_offset: 0,
                ifindex: 3,
                dst_mac: [2, 0, 0, 0, 0, 1],
                src_mac: [2, 0, 0, 0, 0, 2],
            },
            in_highest: Some((5 << 16) | 7),
            out_highest: None,
            send_epoch_ns: Some(123_456_789),
        }
    }

    #[test]
    fn keys_are_siphash_k0_k1() {
        let raw = entry().raw(9);
        assert_eq!(raw.in_key[0], u64::from_le_bytes(*b"01234567"));
        assert_eq!(raw.in_key[1], u64::from_le_bytes(*b"89abcdef"));
        assert_eq!(raw.out_key, [0xa5a5_a5a5_a5a5_a5a5; 2]);
        assert_eq!(raw.state_slot, 9);
        assert_eq!(raw.dest.ssrc.to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(raw.send_epoch_ns, 123_456_789);
    }

    #[test]
    fn no_send_epoch_is_0_and_epoch_0_is_not() {
        let mut e = entry();
        e.send_epoch_ns = None;
        assert_eq!(e.raw(0).send_epoch_ns, 0);
        e.send_epoch_ns = Some(0);
        assert_eq!(e.raw(0).send_epoch_ns, 1);
    }

    #[test]
    fn state_seed_sets_the_valid_bits() {
        let s = entry().raw_state();
        assert_eq!(
            (s.in_highest, s.out_highest, s.flags),
            ((5 << 16) | 7, 0, 1)
        );
        let mut e = entry();
        e.in_highest = None;
        e.out_highest = Some(3);
        let s = e.raw_state();
        assert_eq!((s.in_highest, s.out_highest, s.flags), (0, 3, 2));
    }

    #[test]
    fn validation() {
        assert_eq!(entry().validate(), Ok(()));
        let mut e = entry();
        e.dest.ts_offset = 1;
        assert_eq!(
            e.validate(),
            Err(MeshEntryError::NonZeroOffsets {
                seq_offset: 0,
                ts_offset: 1
            })
        );
        let mut e = entry();
        e.out_highest = Some(1 << 48);
        assert!(matches!(
            e.validate(),
            Err(MeshEntryError::IndexOutOfRange {
                field: "out_highest",
                ..
            })
        ));
    }

    #[test]
    fn debug_redacts_the_keys() {
        let text = format!("{:?} {:?}", entry(), entry().raw(0));
        assert!(text.contains("<redacted>"), "{text}");
        assert!(!text.contains("48, 49"), "{text}"); // b"01" as bytes
        assert!(!text.contains("165, 165"), "{text}"); // 0xa5 bytes
        for secret in [u64::from_le_bytes(*b"01234567"), 0xa5a5_a5a5_a5a5_a5a5] {
            assert!(!text.contains(&secret.to_string()), "{text}");
        }
    }
}
