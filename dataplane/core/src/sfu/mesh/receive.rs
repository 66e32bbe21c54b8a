//! What a node receives on its links: authentication and SRTP, loss
//! tracking and NACKs, FEC and RED recovery, delay feedback, and link RTCP
//! (NACKs, PLIs, control messages) from downstream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::buf::PacketBuf;
use crate::fec::{FecPacket, Recovery};
use crate::mesh::{
    DelayDetector, InboundRef, MeshMessage, MeshRecovery, is_delay_report, is_mesh_app,
    parse_delay_report, parse_message, write_delay_report, write_message,
};
use crate::packet::{self, PacketClass, rtcp, rtp::RtpHeader};
use crate::red::{self, RedPayload};
use crate::srtp::{SrtpContext, SrtpError, Unprotected};
use crate::types::{CodecSpec, DropReason, PayloadInfo, TrackKind};

use super::{
    FEC_ACTIVE, FEC_NACK_HOLD, MAX_RX_CONTEXTS, MESH_EXT_AUDIO_LEVEL, MESH_EXT_SEND_TIME,
    MESH_PT_FLEXFEC, MESH_PT_RED,
};
use crate::sfu::Sfu;
use crate::sfu::forward::Forward;
use crate::sfu::outbox::{Feedback, RtcpFeedback};

impl Sfu {
    /// Handles a datagram that may come from a mesh link. Returns false if
    /// it does not (no link authenticates it).
    pub(in crate::sfu) fn mesh_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        packet: &PacketBuf,
    ) -> bool {
        let data = packet.as_slice();
        let class = packet::classify(data);
        let rtcp = match class {
            PacketClass::Rtp => false,
            PacketClass::Rtcp => true,
            _ => return false,
        };
        let link = match self.mesh.by_addr.get(&source) {
            Some(&l) => l,
            None => match self.mesh_authenticate_new(source, data, rtcp) {
                Some(l) => l,
                None => return false,
            },
        };
        let mut scratch = std::mem::take(&mut self.mesh.scratch);
        let Some(l) = self.mesh.links.get_mut(link) else {
            self.mesh.scratch = scratch;
            return false;
        };
        let Some(ctx) = l.rx.get_mut(&source) else {
            self.mesh.scratch = scratch;
            return false;
        };
        let result = if rtcp {
            ctx.unprotect_rtcp(data, &mut scratch)
        } else {
            ctx.unprotect_rtp(data, &mut scratch)
        };
        let plain = match result {
            Ok(Unprotected::InPlace(len)) => packet.slice(0..len),
            Ok(Unprotected::Decrypted) => self.out.packets.copy_in(&scratch),
            // An authentic copy of what already arrived: a retransmission
            // racing the repaired original, not an attack.
            Err(SrtpError::Replayed | SrtpError::TooOld) => {
                l.stats.duplicates += 1;
                self.out.drop_packet(DropReason::MeshDuplicate);
                self.mesh.scratch = scratch;
                return true;
            }
            Err(_) => {
                l.stats.auth_failures += 1;
                self.out.drop_packet(DropReason::MeshAuth);
                self.mesh.scratch = scratch;
                return true;
            }
        };
        self.mesh.scratch = scratch;
        l.stats.packets_in += 1;
        l.stats.bytes_in += data.len() as u64;
        if rtcp {
            self.mesh_rtcp(now, link, source, plain.as_slice());
        } else {
            self.mesh_rtp(now, link, source, &plain);
        }
        true
    }

    /// Finds the link whose keys authenticate a datagram from a socket not
    /// seen before, trying links at that IP first.
    pub(in crate::sfu) fn mesh_authenticate_new(
        &mut self,
        source: SocketAddr,
        data: &[u8],
        rtcp: bool,
    ) -> Option<usize> {
        let mut order: Vec<usize> = (0..self.mesh.links.len()).collect();
        order.sort_by_key(|&i| self.mesh.links[i].address.ip() != source.ip());
        let mut scratch = std::mem::take(&mut self.mesh.scratch);
        let mut found = None;
        for i in order {
            let l = &mut self.mesh.links[i];
            if l.rx.len() >= MAX_RX_CONTEXTS {
                continue;
            }
            let mut ctx = SrtpContext::new(l.profile, &l.rx_key.0, &l.rx_key.1);
            // Verify without consuming: the caller unprotects again through
            // the stored context (fresh contexts accept any first index).
            let ok = if rtcp {
                ctx.unprotect_rtcp(data, &mut scratch).is_ok()
            } else {
                ctx.unprotect_rtp(data, &mut scratch).is_ok()
            };
            if ok {
                let fresh = SrtpContext::new(l.profile, &l.rx_key.0, &l.rx_key.1);
                l.rx.insert(source, fresh);
                found = Some(i);
                break;
            }
        }
        self.mesh.scratch = scratch;
        match found {
            Some(i) => {
                self.mesh.by_addr.insert(source, i);
                Some(i)
            }
            None => {
                if self
                    .mesh
                    .links
                    .iter()
                    .any(|l| l.address.ip() == source.ip())
                {
                    self.out.drop_packet(DropReason::MeshAuth);
                    if let Some(l) = self
                        .mesh
                        .links
                        .iter_mut()
                        .find(|l| l.address.ip() == source.ip())
                    {
                        l.stats.auth_failures += 1;
                    }
                }
                None
            }
        }
    }

    pub(in crate::sfu) fn mesh_rtp(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        packet: &PacketBuf,
    ) {
        let Ok(header) = RtpHeader::parse(packet.as_slice()) else {
            self.out.drop_packet(DropReason::Malformed);
            return;
        };
        if header.payload_type == MESH_PT_FLEXFEC {
            self.mesh_fec(now, link, source, packet);
        } else {
            self.mesh_media(now, link, source, packet, &header, false);
        }
    }

    /// A media packet of a link stream: received, or rebuilt from a repair
    /// packet (`repaired`, already marked received in the SRTP replay
    /// window). Tracks loss (and NACKs), unwraps RED (rebuilding the
    /// packet before when it is missing) and forwards.
    pub(in crate::sfu) fn mesh_media(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        packet: &PacketBuf,
        header: &RtpHeader,
        repaired: bool,
    ) {
        let data = packet.as_slice();
        // The media payload (the primary of a RED packet), and a RED block.
        let payload_at = header.header_len;
        let payload_end = data.len().saturating_sub(header.padding_len);
        let (range, red_block) = if header.payload_type == MESH_PT_RED {
            match RedPayload::parse(header.payload(data)) {
                Ok(r) => (
                    payload_at + r.primary.start..payload_at + r.primary.end,
                    Some(r),
                ),
                Err(e) => {
                    tracing::debug!(error = %e, "bad RED payload on a mesh link");
                    self.out.drop_packet(DropReason::MeshFec);
                    return;
                }
            }
        } else {
            (payload_at..payload_end, None)
        };
        let Some(at) = self
            .mesh
            .links
            .get(link)
            .and_then(|l| l.inbound.get(&header.ssrc))
            .map(|s| s.at)
        else {
            self.out.drop_packet(DropReason::UnknownSsrc);
            return;
        };
        if !repaired && let Some(t) = packet::rtp::abs_send_time(data, header, MESH_EXT_SEND_TIME) {
            self.mesh_delay(now, link, source, t, data.len());
        }
        let Some(track) = self.reg.tracks.get(&at.track) else {
            return;
        };
        // End-to-end recovery: relays leave loss to the last node.
        let relay_only =
            self.config.mesh_recovery == MeshRecovery::EndToEnd && !track.mesh_out.is_empty();
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        let Some(s) = l.inbound.get_mut(&header.ssrc) else {
            return;
        };
        s.remote = source;
        let mut first = false;
        match s.draining_until {
            // A previous upstream past its hand-over.
            Some(d) if now >= d => {
                self.out.drop_packet(DropReason::MeshUnrouted);
                return;
            }
            Some(_) => {}
            None => {
                first = !s.delivered;
                s.delivered = true;
            }
        }
        if let Some(dec) = &mut s.fec {
            dec.store(header.sequence, packet);
        }
        if !relay_only {
            let (lost, recovered) = (s.loss.lost, s.loss.recovered);
            let fec_active = s
                .fec_seen
                .is_some_and(|t| now.saturating_duration_since(t) < FEC_ACTIVE);
            s.loss.set_hold(if fec_active {
                FEC_NACK_HOLD
            } else {
                Duration::ZERO
            });
            // Whatever `on_packet` says, the packet is forwarded: one older
            // than this hop waits for still passed SRTP's replay check, so
            // nobody downstream has it either.
            if repaired {
                s.loss.on_repaired(now, header.sequence);
            } else {
                s.loss.on_packet(now, header.sequence);
            }
            self.out.counters.packets_lost += s.loss.lost - lost;
            if s.loss.lost > lost {
                s.lost_at = Some(now);
            }
            l.stats.recovered += s.loss.recovered - recovered;
        }
        // RED: block `i` of `n` (oldest first) is the packet `n - i` before;
        // rebuild those that never came (the replay window says so, and
        // from then on refuses them).
        let mut rebuilt: [Option<(u16, u32, PacketBuf)>; red::MAX_BLOCKS] = Default::default();
        if let Some(r) = red_block {
            let n = r.redundant().len();
            for (i, (b, slot)) in r.redundant().iter().zip(&mut rebuilt).enumerate() {
                let seq = header.sequence.wrapping_sub((n - i) as u16);
                let fresh =
                    l.rx.get_mut(&source)
                        .is_some_and(|ctx| ctx.mark_received(header.ssrc, seq).is_ok());
                if fresh {
                    if !relay_only {
                        s.loss.on_repaired(now, seq);
                    }
                    l.stats.red_recovered += 1;
                    *slot = Some((
                        seq,
                        header.timestamp.wrapping_sub(u32::from(b.ts_offset)),
                        packet.slice(payload_at + b.start..payload_at + b.end),
                    ));
                }
            }
        }
        if !relay_only {
            match s.loss.next_due() {
                Some(d) if d <= now => self.mesh_nack_stream(now, link, header.ssrc),
                Some(d) => {
                    self.mesh.next_nack = Some(self.mesh.next_nack.map_or(d, |n| n.min(d)));
                }
                None => {}
            }
        }
        if first {
            self.mesh_end_handover(at);
        }
        let Some(track) = self.reg.tracks.get(&at.track) else {
            return;
        };
        let codec = track.codec.and_then(CodecSpec::from_str0m);
        // The publisher's audio level, carried by the upstream: it counts
        // in this node's active-speaker detection for the remote
        // participant, and goes on with the packet.
        let audio_level = (track.kind == TrackKind::Audio)
            .then(|| packet::rtp::audio_level(data, header, MESH_EXT_AUDIO_LEVEL))
            .flatten();
        crate::sfu::registry::observe_level(
            &mut self.reg.rooms,
            &track.room,
            track.participant,
            audio_level,
        );
        for (seq, timestamp, view) in rebuilt.into_iter().flatten() {
            let Ok(info) = codec.map_or(Ok(PayloadInfo::default()), |c| {
                c.inspect(view.as_slice(), false)
            }) else {
                self.out.drop_packet(DropReason::MalformedPayload);
                continue;
            };
            let fwd = Forward {
                ssrc: header.ssrc,
                seq,
                timestamp,
                marker: false,
                keyframe: false,
                payload: view.as_slice(),
                shared: None,
                stored: Some(view.clone()),
                audio_level: None,
                svc: info.layers,
            };
            self.forward(now, at.track, at.layer, &fwd);
        }
        let stored = packet.slice(range);
        let payload = stored.as_slice();
        let Ok(info) = codec.map_or(Ok(PayloadInfo::default()), |c| {
            c.inspect(payload, header.marker)
        }) else {
            self.out.drop_packet(DropReason::MalformedPayload);
            return;
        };
        let fwd = Forward {
            ssrc: header.ssrc,
            seq: header.sequence,
            timestamp: header.timestamp,
            marker: header.marker,
            keyframe: info.keyframe,
            payload,
            shared: None,
            stored: Some(stored.clone()),
            audio_level,
            svc: info.layers,
        };
        self.forward(now, at.track, at.layer, &fwd);
    }

    /// A FlexFEC repair packet: rebuilds the one missing packet of its
    /// group if it can (and forwards it as if it had arrived); missing
    /// packets up to the group's last that it cannot rebuild are NACKed at
    /// once instead of after the hold.
    pub(in crate::sfu) fn mesh_fec(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        packet: &PacketBuf,
    ) {
        let fec = match FecPacket::parse(packet.as_slice()) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "bad FEC packet on a mesh link");
                self.out.drop_packet(DropReason::MeshFec);
                return;
            }
        };
        let ssrc = fec.protected_ssrc;
        let mut scratch = std::mem::take(&mut self.mesh.fec_scratch);
        let Some(l) = self.mesh.links.get_mut(link) else {
            self.mesh.fec_scratch = scratch;
            return;
        };
        l.stats.fec_received += 1;
        let Some(s) = l.inbound.get_mut(&ssrc) else {
            self.mesh.fec_scratch = scratch;
            self.out.drop_packet(DropReason::UnknownSsrc);
            return;
        };
        s.fec_seen = Some(now);
        let dec = s.fec.get_or_insert_with(Box::default);
        let mut rebuilt = None;
        match dec.recover(&fec, &mut scratch) {
            Ok(Recovery::Recovered(seq)) => {
                // Only what never came: the replay window knows.
                let fresh =
                    l.rx.get_mut(&source)
                        .is_some_and(|ctx| ctx.mark_received(ssrc, seq).is_ok());
                if fresh {
                    l.stats.fec_recovered += 1;
                    rebuilt = Some(self.out.packets.copy_in(&scratch));
                }
            }
            Ok(Recovery::Complete | Recovery::Unrecoverable(_)) => {}
            Err(e) => {
                tracing::debug!(error = %e, "unusable FEC packet on a mesh link");
                self.out.drop_packet(DropReason::MeshFec);
            }
        }
        self.mesh.fec_scratch = scratch;
        if let Some(buf) = rebuilt {
            match RtpHeader::parse(buf.as_slice()) {
                Ok(h) if h.ssrc == ssrc => self.mesh_media(now, link, source, &buf, &h, true),
                _ => self.out.drop_packet(DropReason::MeshFec),
            }
        }
        // What this group could not rebuild is NACKed now.
        let Some(s) = self
            .mesh
            .links
            .get_mut(link)
            .and_then(|l| l.inbound.get_mut(&ssrc))
        else {
            return;
        };
        s.loss.release_through(now, fec.last());
        if s.loss.next_due().is_some_and(|d| d <= now) {
            self.mesh_nack_stream(now, link, ssrc);
        }
    }

    /// The current upstream's stream of a layer delivered its first
    /// packet: the previous upstream's stream of that layer stops feeding
    /// it, and a previous upstream left with no stream of the room is told
    /// to stop sending.
    pub(in crate::sfu) fn mesh_end_handover(&mut self, at: InboundRef) {
        let Some(origin) = self
            .reg
            .tracks
            .get(&at.track)
            .and_then(|t| t.origin.clone())
        else {
            return;
        };
        let mut done: Vec<(usize, SocketAddr)> = Vec::new();
        for (li, l) in self.mesh.links.iter_mut().enumerate() {
            let mut remote = None;
            l.inbound.retain(|_, s| {
                let old = s.draining_until.is_some() && s.at == at;
                if old {
                    remote = Some(s.remote);
                }
                !old
            });
            let Some(remote) = remote else { continue };
            tracing::debug!(
                room = %origin.room,
                source = %origin.source,
                previous = %l.peer,
                "mesh hand-over: the new upstream's stream delivered; the previous one's stops feeding"
            );
            let tracks = &self.reg.tracks;
            let more = l.inbound.values().any(|s| {
                s.draining_until.is_some()
                    && tracks
                        .get(&s.at.track)
                        .and_then(|t| t.origin.as_ref())
                        .is_some_and(|o| o.room == origin.room && o.source == origin.source)
            });
            if !more {
                done.push((li, remote));
            }
        }
        for (link, dest) in done {
            let mut buf = self.out.buffer();
            write_message(
                &mut buf,
                self.rtcp_ssrc,
                &MeshMessage::Unsubscribe {
                    room: origin.room.clone(),
                    source: origin.source.clone(),
                },
            );
            self.mesh_send_rtcp(link, dest, buf);
        }
    }

    /// Sends one NACK with every due sequence number of a stream.
    pub(in crate::sfu) fn mesh_nack_stream(&mut self, now: Instant, link: usize, ssrc: u32) {
        let mut lost = [0u16; 64];
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        let Some(s) = l.inbound.get_mut(&ssrc) else {
            return;
        };
        let n = s.loss.due(now, &mut lost);
        let dest = s.remote;
        if n == 0 {
            return;
        }
        l.stats.nacks_sent += n as u64;
        self.out.counters.nacks_sent += n as u64;
        let mut buf = self.out.buffer();
        rtcp::write_nack(&mut buf, self.rtcp_ssrc, ssrc, &lost[..n]);
        self.mesh_send_rtcp(link, dest, buf);
        self.mesh_schedule_nacks();
    }

    pub(in crate::sfu) fn mesh_schedule_nacks(&mut self) {
        self.mesh.next_nack = self
            .mesh
            .links
            .iter()
            .flat_map(|l| l.inbound.values())
            .filter_map(|s| s.loss.next_due())
            .min();
    }

    /// Due NACK retries (from `handle_timeout`).
    pub(in crate::sfu) fn mesh_timeout(&mut self, now: Instant) {
        if self.mesh.announce_due.is_some_and(|t| t <= now)
            || self.mesh.next_pending.is_some_and(|t| t <= now)
            || self.mesh.subscribe_due.is_some_and(|t| t <= now)
        {
            self.mesh_tick(now);
        }
        if self.mesh.next_nack.is_none_or(|t| t > now) {
            return;
        }
        let due: Vec<(usize, u32)> = self
            .mesh
            .links
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.inbound
                    .iter()
                    .filter(|(_, s)| s.loss.next_due().is_some_and(|d| d <= now))
                    .map(move |(ssrc, _)| (i, *ssrc))
            })
            .collect();
        for (link, ssrc) in due {
            self.mesh_nack_stream(now, link, ssrc);
        }
        // Streams whose missing packets all expired.
        for l in &mut self.mesh.links {
            for s in l.inbound.values_mut() {
                let mut none = [0u16; 0];
                s.loss.due(now, &mut none);
            }
            l.stats.unrecovered = l.inbound.values().map(|s| s.loss.unrecovered).sum::<u64>();
        }
        self.mesh_schedule_nacks();
    }

    /// A timed media packet from `source` on a link: feeds that sender's
    /// delay detector, and sends it a delay report when one is due.
    pub(in crate::sfu) fn mesh_delay(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        send_time: u32,
        bytes: usize,
    ) {
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        let i = match l.delay.iter().position(|(a, _)| *a == source) {
            Some(i) => i,
            // One per receive context, so bounded as those are.
            None if l.delay.len() < MAX_RX_CONTEXTS => {
                l.delay.push((source, DelayDetector::default()));
                l.delay.len() - 1
            }
            None => return,
        };
        let d = &mut l.delay[i].1;
        d.on_packet(now, send_time, bytes);
        let Some(report) = d.report_due(now) else {
            return;
        };
        l.stats.delay_reports_sent += 1;
        let mut buf = self.out.buffer();
        write_delay_report(&mut buf, self.rtcp_ssrc, &report);
        self.mesh_send_rtcp(link, source, buf);
    }

    /// A delay report from the downstream of a link: the budget follows it
    /// (a lower one takes effect and is announced at once).
    pub(in crate::sfu) fn mesh_delay_report(&mut self, now: Instant, link: usize, data: &[u8]) {
        let report = match parse_delay_report(data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "bad mesh delay report");
                self.out.drop_packet(DropReason::MeshFeedback);
                return;
            }
        };
        let Some(l) = self.mesh.links.get_mut(link) else {
            return;
        };
        l.stats.delay_reports_received += 1;
        if l.capacity.on_delay_report(now, &report) {
            self.mesh.announce_due = Some(now);
            self.mesh_reconcile(now);
            self.select_layers(now);
        }
    }

    pub(in crate::sfu) fn mesh_rtcp(
        &mut self,
        now: Instant,
        link: usize,
        source: SocketAddr,
        data: &[u8],
    ) {
        if is_delay_report(data) {
            self.mesh_delay_report(now, link, data);
            return;
        }
        if is_mesh_app(data) {
            match parse_message(data) {
                Ok(msg) => self.mesh_message(now, link, source, msg, data),
                Err(e) => {
                    tracing::debug!(error = %e, "bad mesh control message");
                    self.out.drop_packet(DropReason::Malformed);
                }
            }
            return;
        }
        let mut feedback = RtcpFeedback::new(data);
        for fb in &mut feedback {
            match fb {
                Feedback::Nack { media_ssrc, lost } => {
                    // End-to-end recovery, or a stream the kernel forwards
                    // (this hop holds none of it): what a relay does not
                    // hold goes on upstream, towards the source.
                    let relay = self
                        .mesh
                        .links
                        .get(link)
                        .and_then(|l| l.outbound.get(&media_ssrc))
                        .and_then(|(t, layer)| Some((self.reg.tracks.get(t)?, *layer)))
                        .is_some_and(|(t, layer)| {
                            (self.config.mesh_recovery == MeshRecovery::EndToEnd
                                && t.origin.is_some())
                                || t.mesh_out.iter().any(|m| {
                                    m.link == link
                                        && m.layers.get(layer).is_some_and(|ol| ol.kernel)
                                })
                        });
                    let mut misses = [0u16; 64];
                    let mut n = 0;
                    for seq in lost {
                        if !self.mesh_retransmit(now, link, media_ssrc, seq) && relay && n < 64 {
                            misses[n] = seq;
                            n += 1;
                        }
                    }
                    if n > 0 {
                        self.mesh_kernel_nacked(link, media_ssrc, n as u64);
                        self.mesh_relay_nack(link, media_ssrc, &misses[..n]);
                    }
                }
                // Links carry PLIs only.
                Feedback::Keyframe {
                    media_ssrc,
                    fir: false,
                } => {
                    if let Some(&(t, layer)) = self
                        .mesh
                        .links
                        .get(link)
                        .and_then(|l| l.outbound.get(&media_ssrc))
                    {
                        self.out.counters.keyframe_requests_received += 1;
                        self.request_keyframe(now, t, layer);
                    }
                }
                _ => {}
            }
        }
        feedback.finish(&mut self.out);
    }
}
