//! The table of plain-RTP flows forwarded in the kernel.

use std::net::{Ipv4Addr, SocketAddrV4};

use std::collections::{HashMap as StdHashMap, VecDeque};

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};

use crate::error::{Error, Result};
use crate::guard::is_not_found;
use crate::types::{FWD_MAX_DESTS, FwdDest, FwdEntry, FwdKey, FwdStats, MAX_FWD_FLOWS};

pub(crate) const ENTRIES_MAP: &str = "ridge_fwd";
pub(crate) const STATS_MAP: &str = "ridge_fwd_stats";

/// Which slot of a table's per-flow arrays each installed flow owns, and
/// the free slots. Freed slots are reused last-in-line, so a packet in
/// flight during a removal cannot plausibly count into a new flow's slot.
#[derive(Debug)]
pub(crate) struct Slots {
    by_key: StdHashMap<FwdKey, u32>,
    free: VecDeque<u32>,
}

impl Slots {
    /// Slots `0..capacity`, all free.
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            by_key: StdHashMap::new(),
            free: (0..capacity).collect(),
        }
    }

    pub(crate) fn get(&self, key: &FwdKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The slot `key` owns (`false`), or a free one taken for it (`true`):
    /// [`Slots::bind`] it once the entry is written, or give it back with
    /// [`Slots::unclaim`]. `None` when none is free.
    pub(crate) fn claim(&mut self, key: &FwdKey) -> Option<(u32, bool)> {
        match self.get(key) {
            Some(slot) => Some((slot, false)),
            None => self.free.pop_front().map(|slot| (slot, true)),
        }
    }

    pub(crate) fn bind(&mut self, key: FwdKey, slot: u32) {
        self.by_key.insert(key, slot);
    }

    /// Returns a slot taken by [`Slots::claim`] and never bound: first in
    /// line again.
    pub(crate) fn unclaim(&mut self, slot: u32) {
        self.free.push_front(slot);
    }

    /// Frees `key`'s slot (last in line); `None` if it owned none.
    pub(crate) fn release(&mut self, key: &FwdKey) -> Option<u32> {
        let slot = self.by_key.remove(key)?;
        self.free.push_back(slot);
        Some(slot)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&FwdKey, u32)> {
        self.by_key.iter().map(|(k, s)| (k, *s))
    }

    pub(crate) fn keys(&self) -> Vec<FlowKey> {
        self.by_key.keys().map(FlowKey::from_raw).collect()
    }
}

/// Sets slot `slot` of per-CPU counter array `map` (named `name`) to
/// zero on every one of `cpus` CPUs: a slot handed to a new entry starts
/// its counters afresh.
pub(crate) fn zero_per_cpu_slot<T: aya::Pod + Default + Clone>(
    map: &mut PerCpuArray<MapData, T>,
    name: &'static str,
    slot: u32,
    cpus: usize,
) -> Result<()> {
    let zero = PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|e| Error::Io {
        context: "sizing per-CPU counters",
        source: e,
    })?;
    map.set(slot, zero, 0).map_err(|e| Error::map(name, e))
}

/// Most destinations one flow can have.
pub const MAX_DESTINATIONS: usize = FWD_MAX_DESTS;

/// A received plain-RTP stream: IPv4 UDP from `src` to `dst` with RTP SSRC
/// `ssrc`. RTCP, STUN and DTLS on the same ports never match and always
/// reach userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The sender.
    pub src: SocketAddrV4,
    /// The node's address and media port it was sent to.
    pub dst: SocketAddrV4,
    /// RTP SSRC as received.
    pub ssrc: u32,
}

impl FlowKey {
    pub(crate) fn raw(&self) -> FwdKey {
        FwdKey {
            src_addr: u32::from(*self.src.ip()).to_be(),
            dst_addr: u32::from(*self.dst.ip()).to_be(),
            src_port: self.src.port().to_be(),
            dst_port: self.dst.port().to_be(),
            ssrc: self.ssrc.to_be(),
        }
    }

    pub(crate) fn from_raw(raw: &FwdKey) -> Self {
        Self {
            src: SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(raw.src_addr)),
                u16::from_be(raw.src_port),
            ),
            dst: SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(raw.dst_addr)),
                u16::from_be(raw.dst_port),
            ),
            ssrc: u32::from_be(raw.ssrc),
        }
    }
}

/// One copy of a forwarded packet: how its headers are rewritten and where
/// it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    /// New destination address and port.
    pub dst: SocketAddrV4,
    /// New source address and port (the node's address on the egress side).
    pub src: SocketAddrV4,
    /// New RTP SSRC.
    pub ssrc: u32,
    /// Added to the RTP sequence number (mod 2^16).
    pub seq_offset: u16,
    /// Added to the RTP timestamp (mod 2^32).
    pub ts_offset: u32,
    /// Egress interface. The same as the ingress interface means `XDP_TX`.
    pub ifindex: u32,
    /// Next hop's MAC address.
    pub dst_mac: [u8; 6],
    /// Egress interface's MAC address.
    pub src_mac: [u8; 6],
}

impl Destination {
    pub(crate) fn raw(&self) -> FwdDest {
        FwdDest {
            dst_addr: u32::from(*self.dst.ip()).to_be(),
            src_addr: u32::from(*self.src.ip()).to_be(),
            dst_port: self.dst.port().to_be(),
            src_port: self.src.port().to_be(),
            ssrc: self.ssrc.to_be(),
            ts_offset: self.ts_offset,
            seq_offset: self.seq_offset,
            _pad0: 0,
            ifindex: self.ifindex,
            dst_mac: self.dst_mac,
            src_mac: self.src_mac,
        }
    }

    pub(crate) fn from_raw(raw: &FwdDest) -> Self {
        Self {
            dst: SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(raw.dst_addr)),
                u16::from_be(raw.dst_port),
            ),
            src: SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(raw.src_addr)),
                u16::from_be(raw.src_port),
            ),
            ssrc: u32::from_be(raw.ssrc),
            seq_offset: raw.seq_offset,
            ts_offset: raw.ts_offset,
            ifindex: raw.ifindex,
            dst_mac: raw.dst_mac,
            src_mac: raw.src_mac,
        }
    }
}

/// What the kernel does with a flow's packets.
///
/// One destination: the XDP program rewrites and sends it (`XDP_TX` or
/// `XDP_REDIRECT`). Two or more: the XDP program passes it up and the TC
/// program sends a copy to each (`bpf_clone_redirect`), so the TC program
/// must be attached on the ingress interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    /// 1..=[`MAX_DESTINATIONS`] destinations.
    pub destinations: Vec<Destination>,
    /// Hand 1 in N packets to userspace instead of forwarding them in the
    /// kernel (the first one after install is one of them); 0: never.
    /// Per CPU: with several receive CPUs each keeps its own count.
    pub sample_every: u32,
}

impl FlowEntry {
    fn raw(&self, stats_slot: u32) -> Result<FwdEntry> {
        let n = self.destinations.len();
        if n == 0 || n > MAX_DESTINATIONS {
            return Err(Error::InvalidArgument(format!(
                "a forwarded flow needs 1..={MAX_DESTINATIONS} destinations, not {n}"
            )));
        }
        let mut raw = FwdEntry {
            n_dests: u32::try_from(n).unwrap_or(0),
            sample_every: self.sample_every,
            stats_slot,
            ..FwdEntry::default()
        };
        for (slot, dest) in raw.dests.iter_mut().zip(&self.destinations) {
            *slot = dest.raw();
        }
        Ok(raw)
    }

    fn from_raw(raw: &FwdEntry) -> Self {
        let n = (raw.n_dests as usize).min(MAX_DESTINATIONS);
        Self {
            destinations: raw.dests[..n].iter().map(Destination::from_raw).collect(),
            sample_every: raw.sample_every,
        }
    }
}

/// A flow's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Received packets forwarded in the kernel.
    pub packets: u64,
    /// Their size (Ethernet frame).
    pub bytes: u64,
    /// Copies sent (packets × destinations).
    pub copies: u64,
    /// Packets handed to userspace as samples.
    pub sampled: u64,
    /// Copies lost to redirect/clone/rewrite failures.
    pub errors: u64,
}

/// The forwarding table: installed flows and their counters.
///
/// Each entry owns a slot of a per-CPU counter array (cheaper for the
/// programs than a second hash lookup; see [`Slots`]).
pub struct FlowTable {
    entries: HashMap<MapData, FwdKey, FwdEntry>,
    stats: PerCpuArray<MapData, FwdStats>,
    slots: Slots,
    cpus: usize,
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable")
            .field("flows", &self.slots.len())
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

impl FlowTable {
    pub(crate) fn new(
        entries: HashMap<MapData, FwdKey, FwdEntry>,
        stats: PerCpuArray<MapData, FwdStats>,
        cpus: usize,
    ) -> Self {
        Self {
            entries,
            stats,
            slots: Slots::new(MAX_FWD_FLOWS),
            cpus,
        }
    }

    /// Installs or replaces the entry for `key`. Replacing keeps the
    /// counters. At most 16384 flows.
    pub fn insert(&mut self, key: FlowKey, entry: &FlowEntry) -> Result<()> {
        let raw_key = key.raw();
        let (slot, fresh) = self.slots.claim(&raw_key).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the forwarding table is full ({MAX_FWD_FLOWS} flows)"
            ))
        })?;
        let raw_entry = match entry.raw(slot) {
            Ok(raw) => raw,
            Err(e) => {
                if fresh {
                    self.slots.unclaim(slot);
                }
                return Err(e);
            }
        };
        let result = self.zero_slot(slot, fresh).and_then(|()| {
            self.entries
                .insert(raw_key, raw_entry, 0)
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
                }
                Err(e)
            }
        }
    }

    fn zero_slot(&mut self, slot: u32, fresh: bool) -> Result<()> {
        if !fresh {
            return Ok(());
        }
        zero_per_cpu_slot(&mut self.stats, STATS_MAP, slot, self.cpus)
    }

    /// Removes the entry; its packets go to userspace again. Returns the
    /// final counters, or `None` if the flow was not installed.
    pub fn remove(&mut self, key: FlowKey) -> Result<Option<FlowCounters>> {
        let raw_key = key.raw();
        let Some(slot) = self.slots.get(&raw_key) else {
            return Ok(None);
        };
        match self.entries.remove(&raw_key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::map(ENTRIES_MAP, e)),
        }
        let counters = self.slot_counters(slot)?;
        self.slots.release(&raw_key);
        Ok(Some(counters))
    }

    /// The entry installed for `key`.
    pub fn get(&self, key: FlowKey) -> Result<Option<FlowEntry>> {
        match self.entries.get(&key.raw(), 0) {
            Ok(raw) => Ok(Some(FlowEntry::from_raw(&raw))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::map(ENTRIES_MAP, e)),
        }
    }

    fn slot_counters(&self, slot: u32) -> Result<FlowCounters> {
        let per_cpu = self
            .stats
            .get(&slot, 0)
            .map_err(|e| Error::map(STATS_MAP, e))?;
        Ok(sum(&per_cpu))
    }

    /// A flow's counters, or `None` if it is not installed.
    pub fn counters(&self, key: FlowKey) -> Result<Option<FlowCounters>> {
        match self.slots.get(&key.raw()) {
            Some(slot) => self.slot_counters(slot).map(Some),
            None => Ok(None),
        }
    }

    /// Every installed flow with its counters.
    pub fn list(&self) -> Result<Vec<(FlowKey, FlowCounters)>> {
        self.slots
            .iter()
            .map(|(raw, slot)| Ok((FlowKey::from_raw(raw), self.slot_counters(slot)?)))
            .collect()
    }

    /// Number of installed flows.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no flow is installed.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Removes every flow.
    pub fn clear(&mut self) -> Result<()> {
        for key in self.slots.keys() {
            self.remove(key)?;
        }
        Ok(())
    }
}

fn sum(per_cpu: &PerCpuValues<FwdStats>) -> FlowCounters {
    per_cpu
        .iter()
        .fold(FlowCounters::default(), |acc, s| FlowCounters {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
            copies: acc.copies + s.copies,
            sampled: acc.sampled + s.sampled,
            errors: acc.errors + s.errors,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(i: u8) -> Destination {
        Destination {
            dst: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, i), 6000),
            src: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 5004),
            ssrc: 0x0102_0304,
            seq_offset: 0x0a0b,
            ts_offset: 0x1122_3344,
            ifindex: 7,
            dst_mac: [2, 0, 0, 0, 0, i],
            src_mac: [2, 0, 0, 0, 0, 0xff],
        }
    }

    #[test]
    fn keys_are_in_network_byte_order() {
        let key = FlowKey {
            src: "192.0.2.1:4000".parse().unwrap(),
            dst: "192.0.2.2:5004".parse().unwrap(),
            ssrc: 0xdead_beef,
        };
        let raw = key.raw();
        assert_eq!(raw.src_addr.to_ne_bytes(), [192, 0, 2, 1]);
        assert_eq!(raw.dst_port.to_ne_bytes(), 5004u16.to_be_bytes());
        assert_eq!(raw.ssrc.to_ne_bytes(), [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(FlowKey::from_raw(&raw), key);
    }

    #[test]
    fn entries_round_trip_and_need_one_to_eight_destinations() {
        let entry = FlowEntry {
            destinations: (1..=3).map(dest).collect(),
            sample_every: 5,
        };
        let raw = entry.raw(42).unwrap();
        assert_eq!((raw.n_dests, raw.sample_every, raw.stats_slot), (3, 5, 42));
        assert_eq!(raw.dests[0].dst_addr.to_ne_bytes(), [192, 0, 2, 1]);
        assert_eq!(
            raw.dests[0].seq_offset, 0x0a0b,
            "offsets stay in host order"
        );
        assert_eq!(FlowEntry::from_raw(&raw), entry);
        for n in [0, MAX_DESTINATIONS + 1] {
            let bad = FlowEntry {
                destinations: (0..n).map(|i| dest(i as u8)).collect(),
                sample_every: 0,
            };
            assert!(matches!(bad.raw(0), Err(Error::InvalidArgument(_))));
        }
    }
}
