//! Shard steering: which socket of a `SO_REUSEPORT` group gets a flow.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{Array, HashMap, MapData, ReusePortSockArray};

use crate::error::{Error, Result};
use crate::guard::is_not_found;
use crate::types::{MAX_SHARDS, SteerCfg, SteerKey};

pub(crate) const FLOWS_MAP: &str = "ridge_steer_flows";
pub(crate) const SOCKS_MAP: &str = "ridge_steer_socks";
pub(crate) const CFG_MAP: &str = "ridge_steer_cfg";

/// A UDP flow as a shard socket sees it: datagrams from `remote` to
/// `local`. `local` is the address the datagram was sent to; an unspecified
/// `local` IP (`0.0.0.0`, `::`) matches datagrams to any local address on
/// `local`'s port (for groups bound to the wildcard address, where the
/// destination address of a future flow is not known).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SteerFlow {
    /// The sender.
    pub remote: SocketAddr,
    /// The datagram's destination on this node.
    pub local: SocketAddr,
}

impl SteerFlow {
    pub(crate) fn key(&self) -> SteerKey {
        SteerKey {
            src_addr: mapped(self.remote.ip()),
            dst_addr: if self.local.ip().is_unspecified() {
                [0; 16]
            } else {
                mapped(self.local.ip())
            },
            src_port: self.remote.port().to_be(),
            dst_port: self.local.port().to_be(),
        }
    }
}

/// IPv4 as IPv4-mapped IPv6, as the BPF side keys it.
impl SteerFlow {
    /// The flow a map key stands for (IPv4-mapped addresses back to IPv4;
    /// an all-zero local address is the unspecified one).
    pub(crate) fn from_key(k: &SteerKey) -> Self {
        let ip = |b: [u8; 16]| -> IpAddr {
            let v6 = std::net::Ipv6Addr::from(b);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        };
        let local_ip = if k.dst_addr == [0; 16] {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            ip(k.dst_addr)
        };
        SteerFlow {
            remote: SocketAddr::new(ip(k.src_addr), u16::from_be(k.src_port)),
            local: SocketAddr::new(local_ip, u16::from_be(k.dst_port)),
        }
    }
}

pub(crate) fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The steering maps: flow → shard, the shard sockets, and what unknown
/// flows get. Attach with [`crate::RidgeBpf::attach_steering`].
pub struct Steering {
    flows: HashMap<MapData, SteerKey, u32>,
    socks: ReusePortSockArray<MapData>,
    cfg: Array<MapData, SteerCfg>,
    shards: u32,
    /// A duplicate of one socket of the group, to detach on drop.
    pub(crate) group: Option<OwnedFd>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("shards", &self.shards)
            .field("attached", &self.group.is_some())
            .finish_non_exhaustive()
    }
}

impl Steering {
    pub(crate) fn new(
        flows: HashMap<MapData, SteerKey, u32>,
        socks: ReusePortSockArray<MapData>,
        cfg: Array<MapData, SteerCfg>,
    ) -> Self {
        Self {
            flows,
            socks,
            cfg,
            shards: 0,
            group: None,
        }
    }

    /// Puts socket `i` of `sockets` at shard index `i`. The sockets must be
    /// UDP, have `SO_REUSEPORT` and be bound (to the same address).
    pub(crate) fn set_sockets<S: AsFd>(&mut self, sockets: &[S]) -> Result<()> {
        if sockets.is_empty() || sockets.len() > MAX_SHARDS as usize {
            return Err(Error::InvalidArgument(format!(
                "{} shard sockets; steering takes 1..={MAX_SHARDS}",
                sockets.len()
            )));
        }
        for (index, socket) in (0u32..).zip(sockets) {
            self.socks
                .set(index, &socket.as_fd(), 0)
                .map_err(|e| Error::map(SOCKS_MAP, e))?;
        }
        for index in u32::try_from(sockets.len()).unwrap_or(MAX_SHARDS)..self.shards {
            match self.socks.clear_index(&index) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(SOCKS_MAP, e)),
            }
        }
        self.shards = u32::try_from(sockets.len()).unwrap_or(MAX_SHARDS);
        Ok(())
    }

    fn check_shard(&self, shard: u32) -> Result<()> {
        if shard >= self.shards {
            return Err(Error::InvalidArgument(format!(
                "shard {shard} does not exist ({} shard sockets attached)",
                self.shards
            )));
        }
        Ok(())
    }

    /// Sends `flow` to `shard` (an index into the sockets given to
    /// `attach_steering`). Replaces an earlier entry for the flow.
    pub fn insert(&mut self, flow: SteerFlow, shard: u32) -> Result<()> {
        self.check_shard(shard)?;
        self.flows
            .insert(flow.key(), shard, 0)
            .map_err(|e| Error::map(FLOWS_MAP, e))
    }

    /// Forgets `flow`; it then goes where unknown flows go. Removing an
    /// unknown flow is not an error.
    pub fn remove(&mut self, flow: SteerFlow) -> Result<()> {
        match self.flows.remove(&flow.key()) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::map(FLOWS_MAP, e)),
        }
    }

    /// Where unknown flows go: `Some(shard)`, or `None` for the kernel's own
    /// hash over the group.
    pub fn set_default_shard(&mut self, shard: Option<u32>) -> Result<()> {
        let cfg = match shard {
            Some(shard) => {
                self.check_shard(shard)?;
                SteerCfg {
                    use_default: 1,
                    default_shard: shard,
                }
            }
            None => SteerCfg::default(),
        };
        self.cfg.set(0, cfg, 0).map_err(|e| Error::map(CFG_MAP, e))
    }

    /// Every flow entry and its shard (a control-path scan of the map).
    pub fn flows(&self) -> Result<Vec<(SteerFlow, u32)>> {
        let mut out = Vec::new();
        for item in self.flows.iter() {
            let (key, shard) = item.map_err(|e| Error::map(FLOWS_MAP, e))?;
            out.push((SteerFlow::from_key(&key), shard));
        }
        Ok(out)
    }

    /// Number of flow entries.
    pub fn len(&self) -> Result<usize> {
        let mut n = 0;
        for key in self.flows.keys() {
            key.map_err(|e| Error::map(FLOWS_MAP, e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Whether there are no flow entries.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Removes every flow entry.
    pub fn clear(&mut self) -> Result<()> {
        let keys = self
            .flows
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::map(FLOWS_MAP, e))?;
        for key in keys {
            match self.flows.remove(&key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(FLOWS_MAP, e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_flows_are_keyed_as_mapped_ipv6() {
        let flow = SteerFlow {
            remote: "192.0.2.1:4000".parse().unwrap(),
            local: "[2001:db8::1]:5004".parse().unwrap(),
        };
        let key = flow.key();
        assert_eq!(
            &key.src_addr[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
        assert_eq!(&key.src_addr[12..], &[192, 0, 2, 1]);
        assert_eq!(key.dst_addr[0..2], [0x20, 0x01]);
        assert_eq!(key.src_port.to_ne_bytes(), 4000u16.to_be_bytes());
        assert_eq!(key.dst_port.to_ne_bytes(), 5004u16.to_be_bytes());
    }
}
