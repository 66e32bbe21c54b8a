//! The outbox: what routing a packet or a control call produces (transmits,
//! events, drop counts), and the buffer pools that keep the packet path
//! free of allocation.

use std::collections::VecDeque;
use std::net::SocketAddr;

use str0m::Event;

use crate::buf::{BufPool, PacketBuf};
use crate::ids::PeerId;
use crate::packet::rtcp;
use crate::types::{
    Counters, DropReason, LocalMedia, LocalOutput, Output, SfuEvent, Trailer, Transmit,
};

/// Recycled transmit buffers kept for reuse.
pub(super) const POOL_MAX: usize = 8192;

/// Capacity of a header buffer: an RTP header with room to spare.
pub(super) const HEADER_CAPACITY: usize = 32;

/// Header buffers kept for reuse: enough for a fan-out burst of a receive
/// batch to thousands of subscribers (32 bytes each).
pub(super) const HEADER_POOL_MAX: usize = 1 << 16;

/// Everything a packet being routed may write to, kept apart from the
/// peer and track tables so both can be borrowed at once.
pub(super) struct Outbox {
    /// What [`Sfu::poll_output`](super::Sfu::poll_output) hands out.
    pub(super) outputs: VecDeque<Output>,
    /// str0m events waiting to be handled (after the session that raised
    /// them is no longer borrowed).
    pub(super) rtc_events: VecDeque<(PeerId, Event)>,
    /// Recycled transmit buffers.
    pub(super) pool: Vec<Vec<u8>>,
    /// Small buffers for per-subscriber headers in front of shared payloads.
    pub(super) headers: Vec<Vec<u8>>,
    /// Received packets, stored once and shared by every transmit of them.
    pub(super) packets: BufPool,
    /// The core's totals.
    pub(super) counters: Counters,
    pub(super) drops: [u64; DropReason::ALL.len()],
    local_addr: SocketAddr,
}

impl Outbox {
    /// An empty outbox whose transmits leave from `local_addr`.
    pub(super) fn new(local_addr: SocketAddr) -> Self {
        Outbox {
            outputs: VecDeque::with_capacity(1024),
            rtc_events: VecDeque::with_capacity(256),
            pool: Vec::new(),
            headers: Vec::new(),
            packets: BufPool::new(1024),
            counters: Counters::default(),
            drops: [0; DropReason::ALL.len()],
            local_addr,
        }
    }

    /// Takes back a transmitted buffer: a full-size one into the transmit
    /// pool, a small one into the header pool.
    pub(super) fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= 1200 {
            if self.pool.len() < POOL_MAX {
                self.pool.push(buf);
            }
        } else if buf.capacity() >= HEADER_CAPACITY && self.headers.len() < HEADER_POOL_MAX {
            self.headers.push(buf);
        }
    }
    /// Makes room for `packets` more header-plus-payload transmits in
    /// flight at once: header buffers in the pool and output queue slots.
    pub(super) fn reserve_fanout(&mut self, packets: usize) {
        let add = packets.min(HEADER_POOL_MAX.saturating_sub(self.headers.len()));
        self.headers
            .extend((0..add).map(|_| Vec::with_capacity(HEADER_CAPACITY)));
        // Capacity grows by `packets` for every subscriber added (exactly:
        // `reserve` would double it every time).
        let want = self.outputs.capacity() + packets;
        self.outputs.reserve_exact(want - self.outputs.len());
    }

    /// A buffer for a header of up to [`HEADER_CAPACITY`] bytes.
    pub(super) fn header(&mut self) -> Vec<u8> {
        let mut b = self
            .headers
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(HEADER_CAPACITY));
        b.clear();
        b
    }

    pub(super) fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(1500));
        b.clear();
        b
    }

    /// Sends one datagram from the media socket, counted against
    /// `counters` (a session's) and the core's totals.
    pub(super) fn send(
        &mut self,
        counters: &mut Counters,
        destination: SocketAddr,
        contents: Vec<u8>,
    ) {
        self.send_from(counters, self.local_addr, destination, contents);
    }

    /// Sends one datagram from `source` (str0m names the local address of
    /// each of its transmits).
    pub(super) fn send_from(
        &mut self,
        counters: &mut Counters,
        source: SocketAddr,
        destination: SocketAddr,
        contents: Vec<u8>,
    ) {
        counters.packets_out += 1;
        counters.bytes_out += contents.len() as u64;
        self.counters.packets_out += 1;
        self.counters.bytes_out += contents.len() as u64;
        self.outputs.push_back(Output::Transmit(Transmit {
            source,
            destination,
            contents,
            payload: None,
            trailer: Trailer::default(),
        }));
    }

    /// Hands one packet to a local subscriber, counted as a transmit of
    /// its header (12 bytes) and payload.
    pub(super) fn deliver_local(&mut self, counters: &mut Counters, media: LocalMedia) {
        let len = 12 + media.payload.len() as u64;
        counters.packets_out += 1;
        counters.bytes_out += len;
        self.counters.packets_out += 1;
        self.counters.bytes_out += len;
        self.outputs
            .push_back(Output::Local(LocalOutput::Media(media)));
    }

    /// Sends `header` followed by a shared payload, without copying it.
    pub(super) fn send_shared(
        &mut self,
        counters: &mut Counters,
        destination: SocketAddr,
        header: Vec<u8>,
        payload: PacketBuf,
    ) {
        self.send_parts(counters, destination, header, payload, Trailer::default());
    }

    /// Sends `header`, a shared payload (not copied) and `trailer`.
    pub(super) fn send_parts(
        &mut self,
        counters: &mut Counters,
        destination: SocketAddr,
        header: Vec<u8>,
        payload: PacketBuf,
        trailer: Trailer,
    ) {
        let len = (header.len() + payload.len() + trailer.as_slice().len()) as u64;
        counters.packets_out += 1;
        counters.bytes_out += len;
        self.counters.packets_out += 1;
        self.counters.bytes_out += len;
        self.outputs.push_back(Output::Transmit(Transmit {
            source: self.local_addr,
            destination,
            contents: header,
            payload: Some(payload),
            trailer,
        }));
    }

    pub(super) fn drop_packet(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    pub(super) fn event(&mut self, e: SfuEvent) {
        self.outputs.push_back(Output::Event(e));
    }
}

/// What a receiver asks of a stream we send, read from a compound RTCP
/// packet by [`RtcpFeedback`].
pub(super) enum Feedback<'a> {
    /// Sequence numbers it lost.
    Nack {
        media_ssrc: u32,
        lost: rtcp::NackSeqs<'a>,
    },
    /// A keyframe: a PLI, or one entry of a FIR (`fir`).
    Keyframe { media_ssrc: u32, fir: bool },
    /// Reception reports (of a receiver or a sender report).
    Reports(rtcp::ReportBlocks<'a>),
}

/// The feedback in a compound RTCP packet, up to its first malformed item,
/// which [`RtcpFeedback::finish`] counts as a drop (nothing after it is
/// read). Other items are passed over.
pub(super) struct RtcpFeedback<'a> {
    items: rtcp::RtcpIter<'a>,
    /// The entries of a FIR still to hand out.
    fir: Option<rtcp::FirEntries<'a>>,
    malformed: bool,
}

impl<'a> RtcpFeedback<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        RtcpFeedback {
            items: rtcp::iter(data),
            fir: None,
            malformed: false,
        }
    }

    /// Counts the malformed item that ended the walk, if one did.
    pub(super) fn finish(self, out: &mut Outbox) {
        if self.malformed {
            out.drop_packet(DropReason::Malformed);
        }
    }
}

impl<'a> Iterator for RtcpFeedback<'a> {
    type Item = Feedback<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entries) = &mut self.fir {
                match entries.next() {
                    Some((media_ssrc, _)) => {
                        return Some(Feedback::Keyframe {
                            media_ssrc,
                            fir: true,
                        });
                    }
                    None => self.fir = None,
                }
            }
            if self.malformed {
                return None;
            }
            let item = match self.items.next()? {
                Ok(item) => item,
                Err(_) => {
                    self.malformed = true;
                    return None;
                }
            };
            match item {
                rtcp::RtcpPacket::Nack {
                    media_ssrc, lost, ..
                } => return Some(Feedback::Nack { media_ssrc, lost }),
                rtcp::RtcpPacket::Pli { media_ssrc, .. } => {
                    return Some(Feedback::Keyframe {
                        media_ssrc,
                        fir: false,
                    });
                }
                rtcp::RtcpPacket::Fir { entries, .. } => self.fir = Some(entries),
                rtcp::RtcpPacket::ReceiverReport { reports, .. }
                | rtcp::RtcpPacket::SenderReport { reports, .. } => {
                    return Some(Feedback::Reports(reports));
                }
                _ => {}
            }
        }
    }
}
