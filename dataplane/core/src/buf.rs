//! Received packets, stored once and shared: the fan-out path hands the
//! same bytes to every subscriber and to each retransmission buffer, and
//! only the per-subscriber RTP header is written anew.
//!
//! A [`BufPool`] owns fixed-size slots (`Arc<[u8]>`). A receive fills a
//! free slot in place ([`BufPool::recv_slots`]), and [`BufPool::freeze`]
//! turns it into a [`PacketBuf`], a cheap clone-able view of a byte range.
//! A slot is free again once every `PacketBuf` pointing into it has been
//! dropped (its strong count is back to one: the pool's own). Slots are
//! handed out round-robin, so in the steady state, where packets are
//! released roughly in the order they arrived, the next slot is free and
//! nothing is allocated; the pool grows only while more packets are held at
//! once than it has slots (retransmission windows, queued sends).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// Bytes per slot: a full Ethernet-MTU datagram with room to spare.
pub const SLOT_SIZE: usize = 2048;

/// An immutable, shared byte range of a received datagram.
#[derive(Clone)]
pub struct PacketBuf {
    slot: Arc<[u8]>,
    start: u16,
    end: u16,
}

impl PacketBuf {
    /// A buffer that does not come from a pool (tests, cold paths).
    pub fn copy_from(bytes: &[u8]) -> Self {
        let end = bytes.len().min(usize::from(u16::MAX));
        PacketBuf {
            slot: Arc::from(&bytes[..end]),
            start: 0,
            end: end as u16,
        }
    }

    /// The bytes this view covers.
    pub fn as_slice(&self) -> &[u8] {
        &self.slot[usize::from(self.start)..usize::from(self.end)]
    }

    /// How many bytes this view covers.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start)
    }

    /// Whether this view covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// A view of `range` (relative to this view), sharing the bytes.
    /// Out-of-range bounds are clamped.
    pub fn slice(&self, range: Range<usize>) -> PacketBuf {
        let len = self.len();
        let end = range.end.min(len);
        let start = range.start.min(end);
        PacketBuf {
            slot: self.slot.clone(),
            start: self.start + start as u16,
            end: self.start + end as u16,
        }
    }

    /// Whether two views share the same stored bytes (for tests).
    pub fn shares_storage_with(&self, other: &PacketBuf) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketBuf")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// Counters of a [`BufPool`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Slots owned by the pool.
    pub slots: usize,
    /// Slots referenced by live `PacketBuf`s right now.
    pub in_use: usize,
    /// Times the pool had to allocate a slot (growth).
    pub grown: u64,
}

/// Fixed-size receive slots, reused once every view of them is gone.
pub struct BufPool {
    slots: Vec<Arc<[u8]>>,
    cursor: usize,
    grown: u64,
    /// The slots lent out by the last `recv_slots`, in order.
    lent: Vec<usize>,
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("slots", &self.slots.len())
            .field("grown", &self.grown)
            .finish_non_exhaustive()
    }
}

/// The most slots handed to one receive batch.
pub const MAX_BATCH: usize = 64;

impl BufPool {
    /// A pool with `initial_slots` slots allocated up front (it grows on demand).
    pub fn new(initial_slots: usize) -> Self {
        BufPool {
            slots: (0..initial_slots.max(MAX_BATCH))
                .map(|_| Self::new_slot())
                .collect(),
            cursor: 0,
            grown: 0,
            lent: Vec::with_capacity(MAX_BATCH),
        }
    }

    fn new_slot() -> Arc<[u8]> {
        Arc::from(vec![0u8; SLOT_SIZE].into_boxed_slice())
    }

    fn is_free(slot: &Arc<[u8]>) -> bool {
        Arc::strong_count(slot) == 1 && Arc::weak_count(slot) == 0
    }

    /// The index of a free slot at or after the cursor, looking at no more
    /// than `budget` slots (and taking what it looked at off the budget);
    /// grows the pool when none is found.
    ///
    /// One receive lends its slots with one shared budget that starts at the
    /// pool's size: the cursor only moves forward, so the slots lent so far
    /// lie in the part of the ring already scanned, and a scan that stays
    /// within the budget never meets them again.
    fn free_slot(&mut self, budget: &mut usize) -> usize {
        let n = self.slots.len();
        while *budget > 0 {
            *budget -= 1;
            let i = self.cursor;
            self.cursor = (i + 1) % n;
            if Self::is_free(&self.slots[i]) {
                return i;
            }
        }
        self.grown += 1;
        self.slots.push(Self::new_slot());
        self.slots.len() - 1
    }

    /// Lends up to `n` (at most [`MAX_BATCH`]) free slots for a receive
    /// and passes their bytes to `fill`, which returns how many it filled,
    /// from the front. Then call [`BufPool::freeze`] for each filled one.
    pub fn recv_slots<R>(&mut self, n: usize, fill: impl FnOnce(&mut [&mut [u8]]) -> R) -> R {
        let n = n.min(MAX_BATCH);
        let mut lent = std::mem::take(&mut self.lent);
        lent.clear();
        let mut budget = self.slots.len();
        for _ in 0..n {
            let i = self.free_slot(&mut budget);
            lent.push(i);
        }
        // Disjoint mutable borrows of the lent slots: walk them in index
        // order, splitting the slot table as we go.
        let mut order: [(usize, usize); MAX_BATCH] = [(0, 0); MAX_BATCH];
        for (pos, &idx) in lent.iter().enumerate() {
            order[pos] = (idx, pos);
        }
        order[..n].sort_unstable();
        let mut bufs: [&mut [u8]; MAX_BATCH] = std::array::from_fn(|_| &mut [][..]);
        let mut rest: &mut [Arc<[u8]>] = &mut self.slots[..];
        let mut base = 0;
        for &(idx, pos) in &order[..n] {
            let tail = std::mem::take(&mut rest).split_at_mut(idx - base).1;
            let Some((slot, after)) = tail.split_first_mut() else {
                break;
            };
            if let Some(bytes) = Arc::get_mut(slot) {
                bufs[pos] = bytes;
            }
            rest = after;
            base = idx + 1;
        }
        let r = fill(&mut bufs[..n]);
        self.lent = lent;
        r
    }

    /// The first `len` bytes of the `i`-th slot lent by the last
    /// [`BufPool::recv_slots`], as a shared packet.
    pub fn freeze(&self, i: usize, len: usize) -> PacketBuf {
        let slot = self.slots[self.lent[i]].clone();
        PacketBuf {
            slot,
            start: 0,
            end: len.min(SLOT_SIZE) as u16,
        }
    }

    /// Copies `bytes` into a free slot.
    pub fn copy_in(&mut self, bytes: &[u8]) -> PacketBuf {
        let len = bytes.len().min(SLOT_SIZE);
        self.recv_slots(1, |bufs| bufs[0][..len].copy_from_slice(&bytes[..len]));
        self.freeze(0, len)
    }

    /// How many slots exist and how many are in use.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            slots: self.slots.len(),
            in_use: self.slots.iter().filter(|s| !Self::is_free(s)).count(),
            grown: self.grown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_only_when_every_view_is_gone() {
        let mut pool = BufPool::new(MAX_BATCH);
        let a = pool.copy_in(b"first packet");
        let held = a.slice(6..12);
        assert_eq!(held.as_slice(), b"packet");
        drop(a);
        // `held` keeps slot 0 busy: the next packets land elsewhere.
        let mut others = Vec::new();
        for i in 0..(MAX_BATCH - 1) {
            let p = pool.copy_in(&[i as u8; 10]);
            assert!(!p.shares_storage_with(&held));
            others.push(p);
        }
        assert_eq!(held.as_slice(), b"packet", "never overwritten while held");
        assert_eq!(pool.stats().in_use, MAX_BATCH);
        // Full: the pool grows rather than reuse a held slot.
        let extra = pool.copy_in(b"x");
        assert_eq!(pool.stats().grown, 1);
        drop((others, extra, held));
        assert_eq!(pool.stats().in_use, 0, "no slot leaked");
        let before = pool.stats().slots;
        for _ in 0..10_000 {
            let p = pool.copy_in(&[1; 200]);
            drop(p);
        }
        assert_eq!(pool.stats().slots, before, "steady state does not grow");
    }

    #[test]
    fn batch_receive_fills_slots_in_order() {
        let mut pool = BufPool::new(8);
        let filled = pool.recv_slots(3, |bufs| {
            for (i, b) in bufs.iter_mut().enumerate() {
                b[0] = i as u8 + 1;
            }
            3
        });
        let pkts: Vec<PacketBuf> = (0..filled).map(|i| pool.freeze(i, 1)).collect();
        assert_eq!(
            pkts.iter().map(|p| p.as_slice()[0]).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(!pkts[0].shares_storage_with(&pkts[1]));
    }

    #[test]
    fn slice_clamps() {
        let p = PacketBuf::copy_from(b"abcdef");
        assert_eq!(p.slice(2..100).as_slice(), b"cdef");
        assert_eq!(p.slice(9..12).as_slice(), b"");
        assert_eq!(p.slice(2..4).slice(1..5).as_slice(), b"d");
    }
}
