//! Consent and reaping: which remotes a plain-RTP endpoint may send to,
//! the proof a plain subscriber's remote must give before it receives
//! anything (latching), and the sessions closed for never finishing their
//! handshake or for going silent.
//!
//! Everything here runs on the control path (endpoint creation, the tick)
//! or on the receive path of an endpoint still waiting for consent; the
//! forwarding path never looks at it: a plain subscriber joins its track's
//! subscriber list only once consent is given.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Instant;

use crate::buf::PacketBuf;
use crate::error::SpecError;
use crate::ids::{PeerId, TrackId};
use crate::packet::{self, PacketClass};
use crate::types::SfuEvent;

use super::Sfu;
use super::peer::Transport;

/// An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or a single
/// address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a [`Cidr`] did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a network in CIDR notation (e.g. 10.0.0.0/8, fd00::/8, 192.0.2.7)")]
pub struct CidrError(String);

impl Cidr {
    /// The network of `addr` with a `prefix`-bit mask; `None` if `prefix`
    /// is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts
    /// as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| err())?;
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| err())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).ok_or_else(err)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why the core closed a session on its own. Each reason is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ReapReason {
    /// A WebRTC session that did not complete ICE and DTLS in time.
    Handshake = 0,
    /// A connected WebRTC session whose remote went silent (ICE consent
    /// lost: str0m saw no binding request for its timeout, or the core no
    /// datagram at all for [`SfuConfig::ice_consent_timeout`](crate::SfuConfig::ice_consent_timeout)).
    IceConsent,
    /// A plain-RTP subscriber whose remote never proved it wants the
    /// stream (no RTP or RTCP from it in time).
    RtpConsent,
}

impl ReapReason {
    /// Every reason, in metric order.
    pub const ALL: [ReapReason; 3] = [
        ReapReason::Handshake,
        ReapReason::IceConsent,
        ReapReason::RtpConsent,
    ];

    /// The reason's metric label.
    pub fn label(self) -> &'static str {
        match self {
            ReapReason::Handshake => "handshake",
            ReapReason::IceConsent => "ice_consent",
            ReapReason::RtpConsent => "rtp_consent",
        }
    }
}

/// Whether `ip` is in one of `nets`.
fn listed(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// Checks a plain endpoint's remote: a concrete unicast address of a family
/// the media socket `local` reaches; loopback and link-local only when the
/// operator allows them (`allow` or `trusted`), or loopback when the media
/// socket is itself on loopback (it reaches nothing else).
pub(super) fn check_remote(
    remote: SocketAddr,
    local: SocketAddr,
    allow: &[Cidr],
    trusted: &[Cidr],
) -> Result<(), SpecError> {
    let ip = remote.ip().to_canonical();
    if remote.port() == 0 || ip.is_unspecified() {
        return Err(SpecError::RemoteNotConcrete(remote));
    }
    let (not_unicast, restricted) = match ip {
        IpAddr::V4(v4) => (
            v4.is_broadcast() || v4.is_multicast() || v4.octets()[0] == 0,
            v4.is_loopback() || v4.is_link_local(),
        ),
        IpAddr::V6(v6) => (
            v6.is_multicast(),
            v6.is_loopback() || v6.is_unicast_link_local(),
        ),
    };
    if not_unicast {
        return Err(SpecError::RemoteNotUnicast(remote));
    }
    let reachable = match local.ip() {
        IpAddr::V6(l) if l.is_unspecified() => true,
        IpAddr::V4(_) => ip.is_ipv4(),
        IpAddr::V6(l) => l.to_ipv4_mapped().is_some() == ip.is_ipv4(),
    };
    if !reachable {
        return Err(SpecError::RemoteFamily {
            remote,
            local: local.ip(),
        });
    }
    let local_loopback = local.ip().to_canonical().is_loopback();
    let allowed = (ip.is_loopback() && local_loopback) || listed(allow, ip) || listed(trusted, ip);
    if restricted && !allowed {
        return Err(SpecError::RemoteRestricted(remote));
    }
    Ok(())
}

/// Plain subscribers waiting for their remote's first packet: when they
/// time out, and the track they asked for.
#[derive(Debug, Default)]
pub(super) struct ConsentState {
    pub(super) pending: HashMap<PeerId, (Instant, Option<TrackId>)>,
    pub(super) reaped: [u64; ReapReason::ALL.len()],
}

impl Sfu {
    /// Whether a new plain subscriber at `remote` must wait for consent.
    pub(super) fn needs_consent(&self, remote: SocketAddr) -> bool {
        !listed(&self.config.rtp_trusted_networks, remote.ip())
    }

    /// A datagram from `source`, a plain remote with a subscriber waiting
    /// for consent: RTP or RTCP from the address the endpoint names is the
    /// proof (the remote sends from where it receives, RFC 4961), and the
    /// subscriber is bound to its track now.
    pub(super) fn latch_plain(&mut self, now: Instant, source: SocketAddr, packet: &PacketBuf) {
        let Some(ids) = self.index.rtp_by_addr.get(&source) else {
            return;
        };
        if !ids.iter().any(|id| self.consent.pending.contains_key(id)) {
            return;
        }
        if !matches!(
            packet::classify(packet.as_slice()),
            PacketClass::Rtp | PacketClass::Rtcp
        ) {
            return;
        }
        let latched: Vec<PeerId> = ids
            .iter()
            .copied()
            .filter(|id| self.consent.pending.contains_key(id))
            .collect();
        for id in latched {
            let Some((_, wanted)) = self.consent.pending.remove(&id) else {
                continue;
            };
            self.bind_rtp_subscriber(now, id, wanted);
            if let Some(p) = self.peers.get(&id) {
                let (room, participant) = (p.room.clone(), p.participant);
                self.out.event(SfuEvent::PeerConnected {
                    room,
                    participant,
                    peer: id,
                });
            }
        }
    }

    /// Closes a session the core gives up on, saying why.
    pub(super) fn reap(&mut self, now: Instant, id: PeerId, reason: ReapReason) {
        let Some(p) = self.peers.get(&id) else {
            return;
        };
        self.consent.reaped[reason as usize] += 1;
        tracing::debug!(peer = %id, reason = reason.label(), "session reaped");
        self.out.event(SfuEvent::SessionReaped {
            room: p.room.clone(),
            participant: p.participant,
            peer: id,
            reason,
        });
        self.close_peer(now, id);
    }

    /// The tick's part: reaps WebRTC sessions past their handshake time or
    /// silent past the consent timeout, and plain subscribers that never
    /// gave consent. Allocates only when it finds one.
    pub(super) fn reap_expired(&mut self, now: Instant) {
        let handshake = self.config.handshake_timeout;
        let silence = self.config.ice_consent_timeout;
        let mut due: Vec<(PeerId, ReapReason)> = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let Transport::WebRtc(w) = &mut p.transport else {
                continue;
            };
            if !w.connected {
                if now.saturating_duration_since(p.created) >= handshake {
                    due.push((*id, ReapReason::Handshake));
                }
            } else if p.counters.packets_in != w.heard_packets {
                w.heard_packets = p.counters.packets_in;
                w.heard_at = now;
            } else if now.saturating_duration_since(w.heard_at) >= silence {
                due.push((*id, ReapReason::IceConsent));
            }
        }
        for (id, (deadline, _)) in &self.consent.pending {
            if *deadline <= now {
                due.push((*id, ReapReason::RtpConsent));
            }
        }
        for (id, reason) in due {
            self.reap(now, id, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let n: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("ten/8".parse::<Cidr>().is_err());
        assert_eq!(n.to_string(), "10.1.0.0/16");
    }

    #[test]
    fn remotes_must_be_unicast_and_reachable() {
        let local = sa("203.0.113.1:5000");
        let ok = |r: &str| check_remote(sa(r), local, &[], &[]);
        assert!(ok("198.51.100.7:4000").is_ok());
        assert!(matches!(
            ok("255.255.255.255:9"),
            Err(SpecError::RemoteNotUnicast(_))
        ));
        assert!(matches!(
            ok("224.0.0.1:9"),
            Err(SpecError::RemoteNotUnicast(_))
        ));
        assert!(matches!(
            ok("0.1.2.3:9"),
            Err(SpecError::RemoteNotUnicast(_))
        ));
        assert!(matches!(
            ok("0.0.0.0:9"),
            Err(SpecError::RemoteNotConcrete(_))
        ));
        assert!(matches!(
            ok("127.0.0.1:9"),
            Err(SpecError::RemoteRestricted(_))
        ));
        assert!(matches!(
            ok("[::ffff:127.0.0.1]:9"),
            Err(SpecError::RemoteRestricted(_))
        ));
        assert!(matches!(
            ok("169.254.1.1:9"),
            Err(SpecError::RemoteRestricted(_))
        ));
        assert!(matches!(
            ok("[2001:db8::1]:9"),
            Err(SpecError::RemoteFamily { .. })
        ));
        // A dual-stack socket reaches IPv6; multicast and link-local stay out.
        let dual = sa("[::]:5000");
        assert!(check_remote(sa("[2001:db8::1]:9"), dual, &[], &[]).is_ok());
        assert!(check_remote(sa("[ff02::1]:9"), dual, &[], &[]).is_err());
        assert!(check_remote(sa("[fe80::1]:9"), dual, &[], &[]).is_err());
        // The operator's allowlist lets loopback through; a loopback node
        // reaches loopback anyway.
        let lo: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(check_remote(sa("127.0.0.1:9"), local, &[lo], &[]).is_ok());
        assert!(check_remote(sa("127.0.0.1:9"), local, &[], &[lo]).is_ok());
        assert!(check_remote(sa("127.0.0.1:9"), sa("127.0.0.1:5000"), &[], &[]).is_ok());
    }
}
