//! The ingress guard's configuration: media ports, the per-source rate, and
//! the sources exempt from it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use aya::maps::{Array, HashMap, MapData};

use crate::error::{Error, Result};
use crate::steer::mapped;
use crate::types::{GuardCfg, MAX_RATE_EXEMPT, RateState, SrcKey};

pub(crate) const PORTS_MAP: &str = "ridge_media_ports";
pub(crate) const CFG_MAP: &str = "ridge_guard_cfg";
pub(crate) const RATE_MAP: &str = "ridge_rate";
pub(crate) const EXEMPT_MAP: &str = "ridge_rate_exempt";

/// Most sources [`Guard::set_rate_exempt`] takes (`RIDGE_MAX_RATE_EXEMPT`).
pub const MAX_RATE_EXEMPT_SOURCES: usize = MAX_RATE_EXEMPT;

/// Per-source rate limit on media ports: a token bucket (implemented as
/// GCRA) that refills at `packets_per_second` and holds `burst` packets.
/// Sources are IP addresses (not address and port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate, packets per second (at least 1).
    pub packets_per_second: u32,
    /// Packets a source may send at once after being idle (at least 1).
    pub burst: u32,
}

impl RateLimit {
    pub(crate) fn to_cfg(self) -> Result<GuardCfg> {
        if self.packets_per_second == 0 || self.burst == 0 {
            return Err(Error::InvalidArgument(format!(
                "rate limit needs packets_per_second >= 1 and burst >= 1 (got {self:?}); \
                 pass None to disable it"
            )));
        }
        let interval_ns = 1_000_000_000 / u64::from(self.packets_per_second);
        Ok(GuardCfg {
            interval_ns: interval_ns.max(1),
            tolerance_ns: interval_ns.max(1) * (u64::from(self.burst) - 1),
            ..GuardCfg::default()
        })
    }
}

/// The guard's maps: which UDP ports carry media, the rate limit, and the
/// sources exempt from it.
///
/// Packets to other ports pass the guard untouched. Changes take effect for
/// the next packet; the program need not be re-attached.
pub struct Guard {
    /// Indexed by port: 1 for media ports.
    ports: Array<MapData, u8>,
    /// What `ports` holds, so listing needs no 65536 lookups.
    media: BTreeSet<u16>,
    cfg: Array<MapData, GuardCfg>,
    /// What `cfg` holds: the rate limit and the exemption flag are written
    /// together.
    cfg_now: GuardCfg,
    rate: HashMap<MapData, SrcKey, RateState>,
    /// Rate-exempt sources: key present (value 1) = exempt.
    exempt: HashMap<MapData, SrcKey, u8>,
    /// What `exempt` holds, canonical (IPv4-mapped IPv6 as IPv4).
    exempt_set: BTreeSet<IpAddr>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

impl Guard {
    pub(crate) fn new(
        ports: Array<MapData, u8>,
        cfg: Array<MapData, GuardCfg>,
        rate: HashMap<MapData, SrcKey, RateState>,
        exempt: HashMap<MapData, SrcKey, u8>,
    ) -> Self {
        Self {
            ports,
            media: BTreeSet::new(),
            cfg,
            cfg_now: GuardCfg::default(),
            rate,
            exempt,
            exempt_set: BTreeSet::new(),
        }
    }

    /// Makes `ports` the set of media ports, removing the others.
    pub fn set_media_ports(&mut self, ports: &[u16]) -> Result<()> {
        let wanted: BTreeSet<u16> = ports.iter().copied().collect();
        let old: Vec<u16> = self.media.difference(&wanted).copied().collect();
        for port in old {
            self.remove_media_port(port)?;
        }
        for port in wanted {
            self.add_media_port(port)?;
        }
        Ok(())
    }

    /// Adds one media port.
    pub fn add_media_port(&mut self, port: u16) -> Result<()> {
        self.ports
            .set(u32::from(port), 1, 0)
            .map_err(|e| Error::map(PORTS_MAP, e))?;
        self.media.insert(port);
        Ok(())
    }

    /// Removes one media port; removing an absent port is not an error.
    pub fn remove_media_port(&mut self, port: u16) -> Result<()> {
        self.ports
            .set(u32::from(port), 0, 0)
            .map_err(|e| Error::map(PORTS_MAP, e))?;
        self.media.remove(&port);
        Ok(())
    }

    /// The media ports, sorted.
    pub fn media_ports(&self) -> Vec<u16> {
        self.media.iter().copied().collect()
    }

    /// Sets (or with `None` disables) the per-source rate limit.
    pub fn set_rate_limit(&mut self, limit: Option<RateLimit>) -> Result<()> {
        let limit = match limit {
            Some(limit) => limit.to_cfg()?,
            None => GuardCfg::default(),
        };
        self.write_cfg(GuardCfg {
            exempt_any: self.cfg_now.exempt_any,
            ..limit
        })
    }

    fn write_cfg(&mut self, cfg: GuardCfg) -> Result<()> {
        self.cfg
            .set(0, cfg, 0)
            .map_err(|e| Error::map(CFG_MAP, e))?;
        self.cfg_now = cfg;
        Ok(())
    }

    /// Makes `addrs` the set of sources the rate limit never applies to
    /// (peer nodes, whose mesh links carry many rooms from one address):
    /// adds the new ones, removes those no longer listed. Their packets
    /// still go through every other check of the guard. An IPv4-mapped IPv6
    /// address is the same source as its IPv4 address; duplicates count
    /// once. More than [`MAX_RATE_EXEMPT_SOURCES`] distinct sources is an
    /// [`Error::InvalidArgument`] and changes nothing.
    ///
    /// A source that leaves the set is limited again from its next packet
    /// (its bucket as it was before it became exempt, or full).
    pub fn set_rate_exempt(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let wanted: BTreeSet<IpAddr> = addrs.iter().map(IpAddr::to_canonical).collect();
        if wanted.len() > MAX_RATE_EXEMPT {
            return Err(Error::InvalidArgument(format!(
                "{} rate-exempt sources, at most {MAX_RATE_EXEMPT}",
                wanted.len()
            )));
        }
        // Removals first, so the map never needs room for both sets.
        let gone: Vec<IpAddr> = self.exempt_set.difference(&wanted).copied().collect();
        for ip in gone {
            match self.exempt.remove(&src_key(ip)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(EXEMPT_MAP, e)),
            }
            self.exempt_set.remove(&ip);
        }
        // The program looks exemptions up only while this flag is set:
        // cleared once the map is empty, set before the first insertion.
        let any = u32::from(!wanted.is_empty());
        if self.cfg_now.exempt_any != any {
            self.write_cfg(GuardCfg {
                exempt_any: any,
                ..self.cfg_now
            })?;
        }
        let new: Vec<IpAddr> = wanted.difference(&self.exempt_set).copied().collect();
        for ip in new {
            self.exempt
                .insert(src_key(ip), 1, 0)
                .map_err(|e| Error::map(EXEMPT_MAP, e))?;
            self.exempt_set.insert(ip);
        }
        Ok(())
    }

    /// The rate-exempt sources, sorted (IPv4 sources as IPv4).
    pub fn rate_exempt(&self) -> Vec<IpAddr> {
        self.exempt_set.iter().copied().collect()
    }

    /// Forgets every source's rate state (each starts with a full bucket).
    pub fn reset_rate_state(&mut self) -> Result<()> {
        let keys = self
            .rate
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::map(RATE_MAP, e))?;
        for key in keys {
            match self.rate.remove(&key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(RATE_MAP, e)),
            }
        }
        Ok(())
    }
}

/// A source address as the guard's maps key it.
fn src_key(ip: IpAddr) -> SrcKey {
    SrcKey { addr: mapped(ip) }
}

/// Whether a map error is "no such key" (ENOENT), which removals tolerate.
pub(crate) fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(2),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_becomes_gcra_interval_and_tolerance() {
        let cfg = RateLimit {
            packets_per_second: 500,
            burst: 100,
        }
        .to_cfg()
        .unwrap();
        assert_eq!(cfg.interval_ns, 2_000_000);
        assert_eq!(cfg.tolerance_ns, 99 * 2_000_000);
        let one = RateLimit {
            packets_per_second: 1,
            burst: 1,
        }
        .to_cfg()
        .unwrap();
        assert_eq!((one.interval_ns, one.tolerance_ns), (1_000_000_000, 0));
        let max = RateLimit {
            packets_per_second: u32::MAX,
            burst: u32::MAX,
        }
        .to_cfg()
        .unwrap();
        assert_eq!(max.interval_ns, 1, "never 0, which would disable the limit");
        for bad in [(0, 1), (1, 0)] {
            let limit = RateLimit {
                packets_per_second: bad.0,
                burst: bad.1,
            };
            assert!(matches!(limit.to_cfg(), Err(Error::InvalidArgument(_))));
        }
    }
}
