//! Per-stream retransmission buffer: the last N packets a subscriber was
//! sent, so its NACKs are answered locally instead of travelling upstream.

use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Slot {
    seq: u16,
    valid: bool,
    stored_at: Option<Instant>,
    data: Vec<u8>,
}

/// A ring of packet copies indexed by sequence number. Slots keep their
/// allocation, so the steady state allocates nothing.
#[derive(Debug)]
pub struct RetransmitBuffer {
    slots: Vec<Slot>,
    max_age: Duration,
}

impl RetransmitBuffer {
    /// `capacity` is rounded up to a power of two.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        let n = capacity.clamp(16, 1 << 15).next_power_of_two();
        RetransmitBuffer {
            slots: (0..n).map(|_| Slot::default()).collect(),
            max_age,
        }
    }

    fn index(&self, seq: u16) -> usize {
        usize::from(seq) & (self.slots.len() - 1)
    }

    /// Stores a copy of a sent packet.
    pub fn insert(&mut self, now: Instant, seq: u16, packet: &[u8]) {
        let i = self.index(seq);
        let slot = &mut self.slots[i];
        slot.seq = seq;
        slot.valid = true;
        slot.stored_at = Some(now);
        slot.data.clear();
        slot.data.extend_from_slice(packet);
    }

    /// The packet sent with `seq`, if still held and not too old.
    pub fn get(&self, now: Instant, seq: u16) -> Option<&[u8]> {
        let slot = &self.slots[self.index(seq)];
        let fresh = slot
            .stored_at
            .is_some_and(|at| now.saturating_duration_since(at) <= self.max_age);
        (slot.valid && slot.seq == seq && fresh).then_some(slot.data.as_slice())
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_recent_packets_and_forgets_overwritten_or_old_ones() {
        let t0 = Instant::now();
        let mut b = RetransmitBuffer::new(16, Duration::from_secs(1));
        for s in 0..20u16 {
            b.insert(t0, s, &[s as u8; 3]);
        }
        assert_eq!(b.get(t0, 19), Some(&[19u8; 3][..]));
        assert_eq!(b.get(t0, 3), None, "overwritten by 19");
        assert_eq!(b.get(t0, 4), Some(&[4u8; 3][..]));
        assert_eq!(b.get(t0 + Duration::from_secs(2), 19), None, "too old");
    }
}
