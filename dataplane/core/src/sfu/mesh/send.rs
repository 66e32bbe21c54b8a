//! What a node sends on its links: media (RED for audio and FEC for video
//! on links with FEC, SRTP, shared payloads where the profile allows),
//! retransmissions, and link RTCP.

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::PacketBuf;
use crate::fec::FecEncoder;
use crate::ids::TrackId;
use crate::mesh::abs_send_time;
use crate::packet::{self, rtcp};
use crate::red::{self};
use crate::retransmit::Sent;
use crate::types::{Counters, TrackKind, Trailer};

use super::{
    FEC_GROUP_SPAN, Link, MESH_EXT_AUDIO_LEVEL, MESH_EXT_SEND_TIME, MESH_PT_AUDIO, MESH_PT_FLEXFEC,
    MESH_PT_RED, MESH_PT_VIDEO, MeshState,
};
use crate::sfu::Sfu;
use crate::sfu::forward::Forward;
use crate::sfu::outbox::Outbox;
use crate::sfu::registry::Track;

/// Sends a link media packet whose `header` is written and whose payload
/// is shared (not copied): the SRTP tag over both goes after them as the
/// transmit's trailer. Only for a link whose profile does not encrypt.
/// Returns whether it was sent.
fn send_link_parts(
    out: &mut Outbox,
    l: &mut Link,
    dest: SocketAddr,
    header: Vec<u8>,
    payload: &PacketBuf,
) -> bool {
    let Ok(tag) = l.tx.protect_rtp_parts(&header, payload.as_slice()) else {
        out.pool.push(header);
        return false;
    };
    let len = header.len() + payload.len() + tag.len();
    l.stats.packets_out += 1;
    l.stats.bytes_out += len as u64;
    l.capacity.on_sent(len);
    let mut scratch = Counters::default();
    out.send_parts(
        &mut scratch,
        dest,
        header,
        payload.clone(),
        Trailer::new(&tag).unwrap_or_default(),
    );
    true
}

/// RED blocks from the packets before one (`prevs[k]`: sequence number
/// − 1 − k, as many as present from the first): (timestamp, payload),
/// oldest first, and how many.
fn red_blocks(prevs: &[Option<Sent>; red::MAX_DEPTH]) -> ([(u32, &[u8]); red::MAX_DEPTH], usize) {
    let mut out: [(u32, &[u8]); red::MAX_DEPTH] = [(0, &[]); red::MAX_DEPTH];
    let n = prevs.iter().take_while(|p| p.is_some()).count();
    for (slot, p) in out.iter_mut().zip(prevs[..n].iter().rev().flatten()) {
        *slot = (p.timestamp, p.payload.as_slice());
    }
    (out, n)
}

/// The repair stream's SSRC for a link stream (any SSRC not otherwise used
/// on the link would do: receivers find repair packets by payload type).
fn repair_ssrc(ssrc: u32) -> u32 {
    (ssrc.rotate_left(16) ^ 0x0fec_0fec) | 1
}

/// Sends the repair packet of an FEC group (none for a group of one).
fn send_repair(
    out: &mut Outbox,
    l: &mut Link,
    enc: &mut FecEncoder,
    protected: u32,
    dest: SocketAddr,
) {
    if enc.pending() < 2 {
        enc.reset();
        return;
    }
    let mut buf = out.buffer();
    if !enc.finish(MESH_PT_FLEXFEC, protected, &mut buf) || l.tx.protect_rtp(&mut buf).is_err() {
        out.pool.push(buf);
        return;
    }
    l.stats.fec_sent += 1;
    l.stats.packets_out += 1;
    l.stats.bytes_out += buf.len() as u64;
    l.capacity.on_sent(buf.len());
    l.capacity.on_repair_sent();
    let mut scratch = Counters::default();
    out.send(&mut scratch, dest, buf);
}

impl Sfu {
    pub(in crate::sfu) fn mesh_send_rtcp(
        &mut self,
        link: usize,
        dest: SocketAddr,
        mut buf: Vec<u8>,
    ) {
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        if l.tx.protect_rtcp(&mut buf).is_err() {
            return;
        }
        l.stats.packets_out += 1;
        l.stats.bytes_out += buf.len() as u64;
        let mut scratch = Counters::default();
        self.out.send(&mut scratch, dest, buf);
    }

    pub(in crate::sfu) fn mesh_retransmit(
        &mut self,
        now: Instant,
        link: usize,
        ssrc: u32,
        seq: u16,
    ) -> bool {
        let Some(l) = self.mesh.links.get_mut(link) else {
            return false;
        };
        l.stats.nacks_received += 1;
        self.out.counters.nacks_received += 1;
        let Some(&(tid, layer)) = l.outbound.get(&ssrc) else {
            return false;
        };
        let Some(track) = self.reg.tracks.get(&tid) else {
            return false;
        };
        let kind = track.kind;
        let found = track
            .mesh_out
            .iter()
            .find(|m| m.link == link)
            .and_then(|m| {
                let rtx = &m.layers.get(layer)?.retransmit;
                let sent = rtx.get(now, seq)?;
                // Sent as RED: the same bytes again (under SRTP's AES-CM, other
                // bytes with the same index would reuse its keystream).
                let mut prevs: [Option<Sent>; red::MAX_DEPTH] = Default::default();
                for (k, slot) in prevs
                    .iter_mut()
                    .enumerate()
                    .take(usize::from(sent.redundant))
                {
                    *slot = Some(rtx.get(now, seq.wrapping_sub(k as u16 + 1))?);
                }
                Some((m.dest, sent, prevs))
            });
        let Some((dest, sent, prevs)) = found else {
            // Not (yet) here: on a relay, usually a packet this hop is
            // itself still waiting for.
            l.stats.nack_misses += 1;
            return false;
        };
        // Loss of this link: only what it carried counts (a gap in a
        // stream that was paused or over the budget here is no loss, nor
        // is what a relay misses itself).
        l.capacity.on_nacked(1);
        if kind == TrackKind::Audio {
            l.capacity.on_audio_nacked();
        }
        let (blocks, n_blocks) = red_blocks(&prevs);
        let mut buf = self.out.buffer();
        let fields = (
            sent.marker,
            sent.seq,
            sent.timestamp,
            sent.audio_level,
            sent.send_time,
        );
        if n_blocks == 0 && !l.tx.profile().encrypts() {
            // The same bytes as the original: header, the stored payload
            // (not copied), the tag.
            write_link_media(&mut buf, kind, ssrc, fields, &[], &[]);
            if !send_link_parts(&mut self.out, l, dest, buf, &sent.payload) {
                return false;
            }
            l.stats.retransmits += 1;
            self.out.counters.retransmits += 1;
            return true;
        }
        write_link_media(
            &mut buf,
            kind,
            ssrc,
            fields,
            sent.payload.as_slice(),
            &blocks[..n_blocks],
        );
        if l.tx.protect_rtp(&mut buf).is_err() {
            return false;
        }
        l.stats.retransmits += 1;
        l.capacity.on_sent(buf.len());
        l.stats.packets_out += 1;
        l.stats.bytes_out += buf.len() as u64;
        self.out.counters.retransmits += 1;
        let mut scratch = Counters::default();
        self.out.send(&mut scratch, dest, buf);
        true
    }

    /// End-to-end recovery on a relay, or a stream the kernel forwards:
    /// passes a downstream NACK for one of our link streams to the
    /// upstream stream that feeds it.
    pub(in crate::sfu) fn mesh_relay_nack(&mut self, link: usize, ssrc: u32, seqs: &[u16]) {
        let Some(l) = self.mesh.links.get(link) else {
            return;
        };
        let Some(&(tid, layer)) = l.outbound.get(&ssrc) else {
            return;
        };
        let upstream = self.mesh.links.iter().enumerate().find_map(|(i, l)| {
            l.inbound
                .iter()
                .find(|(_, s)| s.at.track == tid && s.at.layer == layer)
                .map(|(up_ssrc, s)| (i, *up_ssrc, s.remote))
        });
        let Some((up, up_ssrc, dest)) = upstream else {
            return;
        };
        if let Some(u) = self.mesh.links.get_mut(up) {
            u.stats.nacks_sent += seqs.len() as u64;
        }
        self.out.counters.nacks_sent += seqs.len() as u64;
        let mut buf = self.out.buffer();
        rtcp::write_nack(&mut buf, self.rtcp_ssrc, up_ssrc, seqs);
        self.mesh_send_rtcp(up, dest, buf);
    }

    /// Asks the upstream of a remote track's layer for a keyframe.
    pub(in crate::sfu) fn mesh_keyframe_request(
        &mut self,
        room: &str,
        source: &str,
        ssrc: Option<u32>,
    ) {
        let Some(ssrc) = ssrc else { return };
        let Some((link, dest)) = self.mesh.routes.iter().find_map(|r| {
            (r.spec.room == room && r.spec.source == source)
                .then_some(())
                .and(r.upstream)
                .map(|u| (u, r.upstream_addr))
        }) else {
            return;
        };
        let Some(l) = self.mesh.links.get(link) else {
            return;
        };
        let dest = dest.unwrap_or(l.address);
        let mut buf = self.out.buffer();
        rtcp::write_pli(&mut buf, self.rtcp_ssrc, ssrc);
        self.mesh_send_rtcp(link, dest, buf);
    }
}

/// A link stream's media packet: the RTP header under the link SSRC (with
/// the audio level, when known, and the send time as header extensions),
/// then the payload,
/// or RED (audio on a link with FEC) with `prev` (the packet before:
/// timestamp and payload) as its redundant block. A retransmission
/// calls this with what was sent, so it writes the same bytes again (under
/// SRTP's AES-CM, other bytes with the same index would reuse its
/// keystream).
fn write_link_media(
    buf: &mut Vec<u8>,
    kind: TrackKind,
    ssrc: u32,
    (marker, seq, timestamp, level, send_time): (bool, u16, u32, Option<(bool, u8)>, Option<u32>),
    payload: &[u8],
    prev: &[(u32, &[u8])],
) {
    let pt = if !prev.is_empty() {
        MESH_PT_RED
    } else {
        mesh_pt(kind)
    };
    let level = level.map(|(voice, attenuation)| [(u8::from(voice) << 7) | attenuation.min(127)]);
    let send_time = send_time.map(|t| {
        let [_, a, b, c] = t.to_be_bytes();
        [a, b, c]
    });
    packet::rtp::write_header_with_extensions(
        buf,
        marker,
        pt,
        seq,
        timestamp,
        ssrc,
        &[
            (MESH_EXT_AUDIO_LEVEL, level.as_ref().map(|l| &l[..])),
            (MESH_EXT_SEND_TIME, send_time.as_ref().map(|t| &t[..])),
        ],
    );
    if prev.is_empty() {
        buf.extend_from_slice(payload);
    } else {
        // Timestamps to offsets, the most recent blocks if more are given.
        let prev = &prev[prev.len().saturating_sub(red::MAX_DEPTH)..];
        let mut blocks: [(u32, &[u8]); red::MAX_DEPTH] = [(0, &[]); red::MAX_DEPTH];
        for (b, (ts, data)) in blocks.iter_mut().zip(prev) {
            *b = (timestamp.wrapping_sub(*ts), data);
        }
        red::write(buf, MESH_PT_AUDIO, &blocks[..prev.len()], payload);
    }
}

fn mesh_pt(kind: TrackKind) -> u8 {
    match kind {
        TrackKind::Audio => MESH_PT_AUDIO,
        TrackKind::Video => MESH_PT_VIDEO,
    }
}

impl MeshState {
    /// Sends a packet of a track's layer on every link stream of it.
    /// Called from [`Sfu::forward`] once the layer is known to be wanted.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::sfu) fn forward(
        &mut self,
        out: &mut Outbox,
        tid: TrackId,
        track: &mut Track,
        now: Instant,
        layer: usize,
        pkt: &Forward<'_>,
        stored: &mut Option<PacketBuf>,
    ) {
        let kind = track.kind;
        for m in &mut track.mesh_out {
            let Some(ol) = m.layers.get_mut(layer) else {
                continue;
            };
            if ol.paused || ol.capped {
                continue;
            }
            let Some(l) = self.links.get_mut(m.link) else {
                continue;
            };
            if ol.source_ssrc != Some(pkt.ssrc) {
                if ol.source_ssrc.is_some() {
                    // New source, new link stream: the downstream learns its
                    // SSRC from the next announcement.
                    l.outbound.remove(&ol.ssrc);
                    ol.ssrc = ol.ssrc.wrapping_mul(0x9e37_79b9).rotate_left(7) | 1;
                    l.outbound.insert(ol.ssrc, (tid, layer));
                    ol.retransmit.clear();
                    if let Some(enc) = &mut ol.fec {
                        enc.reset();
                    }
                    self.announce_due = Some(now);
                }
                ol.source_ssrc = Some(pkt.ssrc);
            }
            let payload = stored.get_or_insert_with(|| out.packets.copy_in(pkt.payload));
            // Audio on a link with FEC: RED, the packets right before as
            // redundant blocks (1, or 2 on a lossy link), as many as this
            // link sent and fit, the packet before first.
            let depth = if l.fec && kind == TrackKind::Audio {
                self.red_depth
                    .unwrap_or_else(|| l.capacity.red_depth())
                    .clamp(1, red::MAX_DEPTH)
            } else {
                0
            };
            let mut prevs: [Option<Sent>; red::MAX_DEPTH] = Default::default();
            for (k, slot) in prevs.iter_mut().enumerate().take(depth) {
                let Some(p) = ol
                    .retransmit
                    .get(now, pkt.seq.wrapping_sub(k as u16 + 1))
                    .filter(|p| {
                        red::fits(pkt.timestamp.wrapping_sub(p.timestamp), p.payload.len())
                    })
                else {
                    break;
                };
                *slot = Some(p);
            }
            let (blocks, n_blocks) = red_blocks(&prevs);
            ol.retransmit
                .insert(now, pkt.seq, pkt.timestamp, pkt.marker, payload);
            let mut buf = out.buffer();
            if n_blocks > 0 {
                ol.retransmit.set_redundant(pkt.seq, n_blocks as u8);
                l.stats.red_sent += 1;
                if n_blocks > 1 {
                    l.stats.red_deep_sent += 1;
                }
            }
            let level = pkt.audio_level.filter(|_| kind == TrackKind::Audio);
            ol.retransmit.set_audio_level(pkt.seq, level);
            let send_time = abs_send_time(now.saturating_duration_since(self.epoch));
            ol.retransmit.set_send_time(pkt.seq, Some(send_time));
            let fields = (pkt.marker, pkt.seq, pkt.timestamp, level, Some(send_time));
            let fec_video = l.fec && kind == TrackKind::Video;
            if n_blocks == 0 && !fec_video && !l.tx.profile().encrypts() {
                // The payload stays where it was received: the header and
                // the tag go around it (no copy).
                write_link_media(&mut buf, kind, ol.ssrc, fields, &[], &[]);
                if send_link_parts(out, l, m.dest, buf, payload) && kind == TrackKind::Audio {
                    l.capacity.on_audio_sent(false);
                }
                continue;
            }
            write_link_media(
                &mut buf,
                kind,
                ol.ssrc,
                fields,
                payload.as_slice(),
                &blocks[..n_blocks],
            );
            // Video on a link with FEC: the packet joins its FEC group.
            let fec = if fec_video {
                let enc = ol
                    .fec
                    .get_or_insert_with(|| FecEncoder::new(repair_ssrc(ol.ssrc)));
                enc.set_group_size(self.fec_group.unwrap_or_else(|| l.capacity.fec_group()));
                if enc.must_close_before(pkt.seq) || enc.is_stale(now, FEC_GROUP_SPAN) {
                    send_repair(out, l, enc, ol.ssrc, m.dest);
                }
                enc.push_at(now, &buf);
                Some(enc)
            } else {
                None
            };
            if l.tx.protect_rtp(&mut buf).is_err() {
                out.pool.push(buf);
                continue;
            }
            l.stats.packets_out += 1;
            l.stats.bytes_out += buf.len() as u64;
            l.capacity.on_sent(buf.len());
            if kind == TrackKind::Audio {
                l.capacity.on_audio_sent(n_blocks > 0);
            }
            let mut scratch = Counters::default();
            out.send(&mut scratch, m.dest, buf);
            if let Some(enc) = fec
                && enc.is_full()
            {
                send_repair(out, l, enc, ol.ssrc, m.dest);
            }
        }
    }
}
