//! Per-stream retransmission buffer: the last N packets a subscriber was
//! sent, so its NACKs are answered locally instead of travelling upstream.
//!
//! It holds no copies: each slot keeps a shared view of the payload (the
//! same bytes every other subscriber was sent) and the few header fields
//! that differ per subscriber, so a NACK is answered by writing a 12-byte
//! header in front of the stored payload.

use std::mem;
use std::time::{Duration, Instant};

use crate::buf::PacketBuf;

/// What was sent with one sequence number.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The sequence number it was sent with.
    pub seq: u16,
    /// The timestamp it was sent with.
    pub timestamp: u32,
    /// The RTP marker bit it was sent with.
    pub marker: bool,
    /// Its payload (shared, not copied).
    pub payload: PacketBuf,
    /// Sent with this many packets before it as redundant blocks (RED on
    /// a mesh link; 0: none): a retransmission must carry the same bytes.
    pub redundant: u8,
    /// Sent with this audio level (voice flag, attenuation) in a header
    /// extension (mesh links): a retransmission carries it again.
    pub audio_level: Option<(bool, u8)>,
    /// Sent with this 24-bit abs-send-time in a header extension (mesh
    /// links): a retransmission carries the same value again.
    pub send_time: Option<u32>,
}

/// Marks a slot's send time as present.
const SEND_TIME_SET: u32 = 1 << 31;

#[derive(Debug, Default)]
struct Slot {
    stored_at: Option<Instant>,
    timestamp: u32,
    seq: u16,
    marker: bool,
    redundant: u8,
    audio_level: Option<(bool, u8)>,
    /// The 24-bit send time with [`SEND_TIME_SET`] (4 bytes, not an
    /// `Option`'s 8: the slot stays as small as before).
    send_time: u32,
    payload: Option<PacketBuf>,
}

/// A ring of sent packets indexed by sequence number. Slots are reused in
/// place, so the steady state allocates nothing.
#[derive(Debug)]
pub struct RetransmitBuffer {
    slots: Vec<Slot>,
    max_age: Duration,
}

impl RetransmitBuffer {
    /// `capacity` is rounded up to a power of two (16 to 32768).
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

    /// Remembers a sent packet; the payload is shared, not copied.
    pub fn insert(
        &mut self,
        now: Instant,
        seq: u16,
        timestamp: u32,
        marker: bool,
        payload: &PacketBuf,
    ) {
        let i = self.index(seq);
        let slot = &mut self.slots[i];
        slot.seq = seq;
        slot.timestamp = timestamp;
        slot.marker = marker;
        slot.redundant = 0;
        slot.audio_level = None;
        slot.send_time = 0;
        slot.stored_at = Some(now);
        // Assigning drops the previous view, releasing its pool slot.
        slot.payload = Some(payload.clone());
    }

    /// The packet sent with `seq`, if still held and not too old.
    pub fn get(&self, now: Instant, seq: u16) -> Option<Sent> {
        let slot = &self.slots[self.index(seq)];
        let fresh = slot
            .stored_at
            .is_some_and(|at| now.saturating_duration_since(at) <= self.max_age);
        match &slot.payload {
            Some(p) if slot.seq == seq && fresh => Some(Sent {
                seq,
                timestamp: slot.timestamp,
                marker: slot.marker,
                payload: p.clone(),
                redundant: slot.redundant,
                audio_level: slot.audio_level,
                send_time: (slot.send_time & SEND_TIME_SET != 0)
                    .then_some(slot.send_time & !SEND_TIME_SET),
            }),
            _ => None,
        }
    }

    /// Records that the packet stored with `seq` went out with the
    /// `blocks` packets before it as redundant blocks (see
    /// [`Sent::redundant`]).
    pub fn set_redundant(&mut self, seq: u16, blocks: u8) {
        let i = self.index(seq);
        let slot = &mut self.slots[i];
        if slot.seq == seq && slot.payload.is_some() {
            slot.redundant = blocks;
        }
    }

    /// Records the audio level the packet stored with `seq` was sent with
    /// (see [`Sent::audio_level`]).
    pub fn set_audio_level(&mut self, seq: u16, level: Option<(bool, u8)>) {
        let i = self.index(seq);
        let slot = &mut self.slots[i];
        if slot.seq == seq && slot.payload.is_some() {
            slot.audio_level = level;
        }
    }

    /// Records the send time the packet stored with `seq` was sent with
    /// (see [`Sent::send_time`]; 24 bits, the higher ones are not kept).
    pub fn set_send_time(&mut self, seq: u16, send_time: Option<u32>) {
        let i = self.index(seq);
        let slot = &mut self.slots[i];
        if slot.seq == seq && slot.payload.is_some() {
            slot.send_time = send_time.map_or(0, |t| (t & 0x00ff_ffff) | SEND_TIME_SET);
        }
    }

    /// Drops every stored view (the subscriber switched streams).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            *s = Slot::default();
        }
    }

    /// How many packets the buffer holds at most.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of state this buffer keeps, not counting the shared payloads.
    pub fn state_bytes(&self) -> usize {
        mem::size_of::<Self>() + self.slots.len() * mem::size_of::<Slot>()
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
            b.insert(
                t0,
                s,
                u32::from(s) * 10,
                s % 2 == 0,
                &PacketBuf::copy_from(&[s as u8; 3]),
            );
        }
        let got = b.get(t0, 19).unwrap();
        assert_eq!((got.seq, got.timestamp, got.marker), (19, 190, false));
        assert_eq!(got.payload.as_slice(), &[19u8; 3]);
        assert!(b.get(t0, 3).is_none(), "overwritten by 19");
        assert_eq!(b.get(t0, 4).unwrap().payload.as_slice(), &[4u8; 3]);
        assert!(b.get(t0 + Duration::from_secs(2), 19).is_none(), "too old");
        b.clear();
        assert!(b.get(t0, 19).is_none());
    }
}
