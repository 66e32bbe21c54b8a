//! Hand-off of mesh transit streams to a kernel fast path, and taking them
//! back when the kernel's hop turns lossy.

use std::time::Instant;

use crate::types::{MeshFlow, MeshFlowProgress};

use super::{KERNEL_CLEAN, KERNEL_LOSS_SAMPLE, KERNEL_MAX_LOSS, Link};
use crate::sfu::Sfu;

impl Sfu {
    /// Mesh transit streams a kernel fast path may forward instead of the
    /// core: a remote track's layer received on a trusted link with SipHash
    /// tags and no FEC, whose track has no local subscriber and exactly one
    /// downstream link (trusted, SipHash, no FEC) that carries the layer
    /// now from this very upstream stream. The kernel then does what the
    /// core would: check the tag, swap the link SSRC, re-sign, send; the
    /// bytes are otherwise the upstream's (sequence number, timestamp,
    /// audio level), but for the send time, which the kernel stamps on this
    /// core's clock ([`MeshFlow::send_epoch`]).
    ///
    /// The answer changes with subscriptions, layer demand and budget,
    /// routes and links, so a caller re-queries and diffs.
    pub fn mesh_flows(&self, now: Instant) -> Vec<MeshFlow> {
        let mut out = Vec::new();
        let siphash = |l: &Link| l.profile.siphash() && !l.fec && l.linger_until.is_none();
        for l in self.mesh.links.iter().filter(|l| siphash(l)) {
            for (&ssrc, s) in &l.inbound {
                let lossy = s
                    .lost_at
                    .is_some_and(|t| now.saturating_duration_since(t) < KERNEL_CLEAN);
                if s.draining_until.is_some() || !s.delivered || s.fec_seen.is_some() || lossy {
                    continue;
                }
                let Some(track) = self.reg.tracks.get(&s.at.track) else {
                    continue;
                };
                let [m] = track.mesh_out.as_slice() else {
                    continue;
                };
                if !track.subscribers.is_empty() {
                    continue;
                }
                let Some(ol) = m.layers.get(s.at.layer) else {
                    continue;
                };
                if ol.paused
                    || ol.capped
                    || ol.source_ssrc != Some(ssrc)
                    || ol.kernel_hold_until.is_some_and(|t| now < t)
                {
                    continue;
                }
                let Some(down) = self
                    .mesh
                    .links
                    .get(m.link)
                    .filter(|d| siphash(d) && d.capacity.last_loss <= KERNEL_MAX_LOSS)
                else {
                    continue;
                };
                let Some(rx) = l.rx.get(&s.remote) else {
                    continue;
                };
                let (Some(in_key), Some(out_key)) =
                    (rx.rtp_siphash_key(), down.tx.rtp_siphash_key())
                else {
                    continue;
                };
                out.push(MeshFlow {
                    track: s.at.track,
                    source: s.remote,
                    local: self.config.local_addr,
                    ssrc,
                    in_key,
                    in_highest: rx.highest_received(ssrc),
                    dest: m.dest,
                    out_ssrc: ol.ssrc,
                    out_key,
                    out_highest: down.tx.highest_sent(ol.ssrc),
                    send_epoch: self.mesh.epoch,
                });
            }
        }
        out.sort_by_key(|f| (f.track, f.ssrc));
        out
    }

    /// What a kernel fast path did with the [`Sfu::mesh_flows`] it took:
    /// exactly the layers of `progress` marked `forwarded` are kernel
    /// forwarded from now on (their downstream NACKs go upstream), and
    /// every flow's SRTP contexts move on to the indices the kernel
    /// accepted and sent, so the core places later packets (after a
    /// sequence-number wrap, too) where the kernel did when it takes a
    /// stream back. A stream of which more than 1 % of what the kernel
    /// forwarded was NACKed is not offered again for 10 s.
    pub fn set_kernel_mesh_forwarded(&mut self, now: Instant, progress: &[MeshFlowProgress]) {
        for p in progress {
            for l in &mut self.mesh.links {
                if let Some(s) = l.inbound.get_mut(&p.ssrc)
                    && let Some(rx) = l.rx.get_mut(&p.source)
                    && let Some(index) = p.in_highest
                {
                    rx.advance_received(p.ssrc, index);
                    // What the kernel forwarded is no gap of this hop's.
                    s.loss.skip_to(index as u16);
                }
                if l.outbound.contains_key(&p.out_ssrc)
                    && let Some(index) = p.out_highest
                {
                    l.tx.advance_sent(p.out_ssrc, index);
                }
            }
        }
        for (tid, track) in self.reg.tracks.iter_mut() {
            for m in &mut track.mesh_out {
                for ol in &mut m.layers {
                    let p = progress.iter().find(|p| {
                        p.out_ssrc == ol.ssrc
                            && self
                                .mesh
                                .links
                                .get(m.link)
                                .and_then(|l| l.outbound.get(&p.out_ssrc))
                                .is_some_and(|(t, _)| t == tid)
                    });
                    let Some(p) = p.filter(|p| p.forwarded) else {
                        ol.kernel = false;
                        continue;
                    };
                    if !ol.kernel {
                        ol.kernel = true;
                        ol.kernel_packets = p.packets;
                        ol.kernel_nacked = 0;
                        continue;
                    }
                    let forwarded = p.packets.saturating_sub(ol.kernel_packets);
                    if forwarded >= KERNEL_LOSS_SAMPLE {
                        let loss = ol.kernel_nacked.min(forwarded) as f64 / forwarded as f64;
                        if loss > KERNEL_MAX_LOSS {
                            ol.kernel_hold_until = Some(now + KERNEL_CLEAN);
                        }
                        ol.kernel_packets = p.packets;
                        ol.kernel_nacked = 0;
                    }
                }
            }
        }
    }

    /// Counts `n` NACKed sequence numbers against a kernel-forwarded layer
    /// (its loss decides whether it stays in the kernel).
    pub(in crate::sfu) fn mesh_kernel_nacked(&mut self, link: usize, ssrc: u32, n: u64) {
        let Some(&(tid, layer)) = self
            .mesh
            .links
            .get(link)
            .and_then(|l| l.outbound.get(&ssrc))
        else {
            return;
        };
        let Some(track) = self.reg.tracks.get_mut(&tid) else {
            return;
        };
        for m in track.mesh_out.iter_mut().filter(|m| m.link == link) {
            if let Some(ol) = m.layers.get_mut(layer).filter(|ol| ol.kernel) {
                ol.kernel_nacked += n;
            }
        }
    }
}
