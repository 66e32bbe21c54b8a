//! What the kernel fast path needs to know about this host's network, read
//! from the kernel's own tables without `unsafe`: which interface owns an
//! address (`ip -j addr`, `/proc/net/if_inet6`), the IPv4 route to a
//! destination (`/proc/net/route`: the main table, longest prefix first),
//! the next hop's MAC (`/proc/net/arp`), and an interface's MAC and index
//! (`/sys/class/net`). Files are read in the calling thread's network
//! namespace. Parsers take text so they are tested with fixtures.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Why a destination could not be resolved to an egress interface and MACs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    #[error("no IPv4 route to {0}")]
    NoRoute(Ipv4Addr),
    #[error("no complete neighbour entry for {hop} on {iface}")]
    NoNeighbour { hop: Ipv4Addr, iface: String },
    #[error("cannot read {what}: {message}")]
    Read { what: String, message: String },
}

/// One row of `/proc/net/route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub destination: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub flags: u32,
    pub metric: u32,
}

const RTF_UP: u32 = 0x0001;
const RTF_GATEWAY: u32 = 0x0002;
const RTF_REJECT: u32 = 0x0200;
/// `ATF_COM`: the neighbour entry is complete (has a MAC).
const ATF_COM: u32 = 0x02;

/// `/proc/net/route` stores addresses as the hex of the `u32` in host
/// (little-endian on every platform Ridge runs on) order.
fn hex_ipv4(s: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(s, 16).ok()?;
    Some(Ipv4Addr::from(v.swap_bytes()))
}

fn hex_u32(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Parses `/proc/net/route`; malformed rows are skipped.
pub fn parse_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            Some(Route {
                iface: f[0].to_owned(),
                destination: hex_ipv4(f[1])?,
                gateway: hex_ipv4(f[2])?,
                flags: hex_u32(f[3])?,
                metric: f[6].parse().ok()?,
                mask: hex_ipv4(f[7])?,
            })
        })
        .collect()
}

/// The route the kernel's main table would pick for `dst`: up, not a
/// reject route, longest prefix, then lowest metric. Returns the egress
/// interface and the next hop (the gateway, or `dst` itself when on-link).
pub fn route_to(routes: &[Route], dst: Ipv4Addr) -> Option<(String, Ipv4Addr)> {
    let d = u32::from(dst);
    routes
        .iter()
        .filter(|r| r.flags & RTF_UP != 0 && r.flags & RTF_REJECT == 0)
        .filter(|r| d & u32::from(r.mask) == u32::from(r.destination) & u32::from(r.mask))
        .max_by_key(|r| (u32::from(r.mask).count_ones(), std::cmp::Reverse(r.metric)))
        .map(|r| {
            let hop = if r.flags & RTF_GATEWAY != 0 {
                r.gateway
            } else {
                dst
            };
            (r.iface.clone(), hop)
        })
}

/// One row of `/proc/net/arp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub complete: bool,
    pub iface: String,
}

/// Parses `/proc/net/arp`; malformed rows are skipped.
pub fn parse_arp(text: &str) -> Vec<Neighbour> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                return None;
            }
            Some(Neighbour {
                ip: f[0].parse().ok()?,
                complete: hex_u32(f[2])? & ATF_COM != 0,
                mac: parse_mac(f[3])?,
                iface: f[5].to_owned(),
            })
        })
        .collect()
}

/// The MAC of `hop` on `iface`, if the neighbour entry is complete.
pub fn neighbour_mac(neighbours: &[Neighbour], hop: Ipv4Addr, iface: &str) -> Option<[u8; 6]> {
    neighbours
        .iter()
        .find(|n| n.ip == hop && n.iface == iface && n.complete && n.mac != [0; 6])
        .map(|n| n.mac)
}

/// `02:00:5e:10:00:01` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The interface that owns `ip`, from `ip -j addr show` output (IPv4 and
/// IPv6).
pub fn owner_from_ip_json(json: &str, ip: IpAddr) -> Option<String> {
    let links: serde_json::Value = serde_json::from_str(json).ok()?;
    links.as_array()?.iter().find_map(|link| {
        let owns = link
            .get("addr_info")?
            .as_array()?
            .iter()
            .filter_map(|a| a.get("local")?.as_str()?.parse::<IpAddr>().ok())
            .any(|a| a == ip);
        owns.then(|| link.get("ifname")?.as_str().map(str::to_owned))?
    })
}

/// The interface that owns the IPv6 address `ip`, from `/proc/net/if_inet6`.
pub fn owner_from_if_inet6(text: &str, ip: Ipv6Addr) -> Option<String> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[0].len() != 32 {
            return None;
        }
        let v = u128::from_str_radix(f[0], 16).ok()?;
        (Ipv6Addr::from(v) == ip).then(|| f[5].to_owned())
    })
}

/// The interface that owns `ip` on this host (IPv6 from `/proc`, IPv4 by
/// asking `ip -j addr show`).
pub fn interface_owning(ip: IpAddr) -> Result<Option<String>, ResolveError> {
    if let IpAddr::V6(v6) = ip
        && let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6")
        && let Some(name) = owner_from_if_inet6(&text, v6)
    {
        return Ok(Some(name));
    }
    let out = std::process::Command::new("ip")
        .args(["-j", "addr", "show"])
        .output()
        .map_err(|e| ResolveError::Read {
            what: "`ip -j addr show`".into(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ResolveError::Read {
            what: "`ip -j addr show`".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(owner_from_ip_json(
        &String::from_utf8_lossy(&out.stdout),
        ip,
    ))
}

fn read(path: &Path) -> Result<String, ResolveError> {
    std::fs::read_to_string(path).map_err(|e| ResolveError::Read {
        what: path.display().to_string(),
        message: e.to_string(),
    })
}

/// An interface's index and MAC address, from `/sys/class/net`.
pub fn link(iface: &str) -> Result<(u32, [u8; 6]), ResolveError> {
    let dir = Path::new("/sys/class/net").join(iface);
    let index = read(&dir.join("ifindex"))?;
    let index = index.trim().parse().map_err(|_| ResolveError::Read {
        what: format!("{}/ifindex", dir.display()),
        message: format!("not a number: {index:?}"),
    })?;
    let mac = read(&dir.join("address"))?;
    let mac = parse_mac(&mac).ok_or_else(|| ResolveError::Read {
        what: format!("{}/address", dir.display()),
        message: format!("not a MAC address: {mac:?}"),
    })?;
    Ok((index, mac))
}

/// How to reach an IPv4 destination from this host at layer 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Path {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// A snapshot of the route and neighbour tables, taken once per reconcile.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

impl Tables {
    /// Reads `/proc/net/route` and `/proc/net/arp`.
    pub fn read() -> Result<Self, ResolveError> {
        Ok(Self {
            routes: parse_routes(&read(Path::new("/proc/net/route"))?),
            neighbours: parse_arp(&read(Path::new("/proc/net/arp"))?),
        })
    }

    /// The egress interface (name) and next-hop MAC for `dst`.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Result<(String, [u8; 6]), ResolveError> {
        let (iface, hop) = route_to(&self.routes, dst).ok_or(ResolveError::NoRoute(dst))?;
        let mac = neighbour_mac(&self.neighbours, hop, &iface).ok_or_else(|| {
            ResolveError::NoNeighbour {
                hop,
                iface: iface.clone(),
            }
        })?;
        Ok((iface, mac))
    }

    /// [`Tables::next_hop`] plus the egress interface's index and MAC.
    pub fn resolve(&self, dst: Ipv4Addr) -> Result<L2Path, ResolveError> {
        let (iface, dst_mac) = self.next_hop(dst)?;
        let (ifindex, src_mac) = link(&iface)?;
        Ok(L2Path {
            ifindex,
            src_mac,
            dst_mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth1\t00000000\t01330A0A\t0003\t0\t0\t50\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
b0\t00014D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
b1\t80014D0A\t00000000\t0001\t0\t0\t0\t80FFFFFF\t0\t0\t0
eth0\t0000A8C0\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t00000010\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0
garbage line
";

    const ARP: &str = "\
IP address       HW type     Flags       HW address            Mask     Device
192.0.2.1        0x1         0x2         02:fc:00:00:00:05     *        eth0
10.77.1.1        0x1         0x2         aa:bb:cc:dd:ee:01     *        b0
10.77.1.200      0x1         0x2         aa:bb:cc:dd:ee:02     *        b1
10.77.1.9        0x1         0x0         00:00:00:00:00:00     *        b0
10.10.51.1       0x1         0x6         0a:0b:0c:0d:0e:0f     *        eth1
";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn routes_parse_in_host_order() {
        let r = parse_routes(ROUTES);
        assert_eq!(r.len(), 7, "the garbage line is skipped");
        assert_eq!(r[0].gateway, ip("192.0.2.1"));
        assert_eq!(r[0].metric, 100);
        assert_eq!(r[2].destination, ip("192.0.2.0"));
        assert_eq!(r[2].mask, ip("255.255.255.0"));
        assert_eq!(r[4].destination, ip("10.77.1.128"));
        assert_eq!(r[4].mask, ip("255.255.255.128"));
    }

    #[test]
    fn route_lookup_is_longest_prefix_then_metric() {
        let r = parse_routes(ROUTES);
        // On-link: the next hop is the destination itself.
        assert_eq!(
            route_to(&r, ip("10.77.1.1")),
            Some(("b0".into(), ip("10.77.1.1")))
        );
        // The /25 beats the /24.
        assert_eq!(
            route_to(&r, ip("10.77.1.200")),
            Some(("b1".into(), ip("10.77.1.200")))
        );
        // Default routes: the lower metric wins, the next hop is the gateway.
        assert_eq!(
            route_to(&r, ip("198.51.100.7")),
            Some(("eth1".into(), ip("10.10.51.1")))
        );
        // A reject route is never taken; a route that is not up neither.
        assert_eq!(
            route_to(&r, ip("192.168.3.4")),
            Some(("eth1".into(), ip("10.10.51.1")))
        );
        assert_eq!(
            route_to(&r, ip("16.0.0.9")),
            Some(("eth1".into(), ip("10.10.51.1")))
        );
        assert_eq!(route_to(&parse_routes(""), ip("10.0.0.1")), None);
    }

    #[test]
    fn neighbours_need_a_complete_entry_on_the_egress_interface() {
        let n = parse_arp(ARP);
        assert_eq!(n.len(), 5);
        let t = Tables {
            routes: parse_routes(ROUTES),
            neighbours: n.clone(),
        };
        assert_eq!(
            t.next_hop(ip("10.77.1.1")),
            Ok(("b0".into(), [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01]))
        );
        assert_eq!(
            t.next_hop(ip("198.51.100.7")),
            Ok(("eth1".into(), [0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f])),
            "via the gateway's entry"
        );
        // Incomplete entry.
        assert_eq!(
            t.next_hop(ip("10.77.1.9")),
            Err(ResolveError::NoNeighbour {
                hop: ip("10.77.1.9"),
                iface: "b0".into()
            })
        );
        // An entry on another interface does not count.
        assert_eq!(neighbour_mac(&n, ip("10.77.1.1"), "b1"), None);
        let no_default = Tables {
            routes: parse_routes(ROUTES)
                .into_iter()
                .filter(|r| r.mask != Ipv4Addr::UNSPECIFIED)
                .collect(),
            neighbours: n,
        };
        assert_eq!(
            no_default.next_hop(ip("203.0.113.1")),
            Err(ResolveError::NoRoute(ip("203.0.113.1")))
        );
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:5e:10:00:01\n"),
            Some([2, 0, 0x5e, 0x10, 0, 1])
        );
        assert_eq!(parse_mac("02:00:5e:10:00"), None);
        assert_eq!(parse_mac("02:00:5e:10:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:5e:10:00:01"), None);
    }

    #[test]
    fn address_owners() {
        let json = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8},{"family":"inet6","local":"::1","prefixlen":128}]},
            {"ifindex":4,"ifname":"eth0","addr_info":[{"family":"inet","local":"192.0.2.2","prefixlen":24},{"family":"inet6","local":"fd00::2","prefixlen":64}]},
            {"ifindex":5,"ifname":"nolink"}]"#;
        let owner = |s: &str| owner_from_ip_json(json, s.parse().unwrap());
        assert_eq!(owner("192.0.2.2").as_deref(), Some("eth0"));
        assert_eq!(owner("127.0.0.1").as_deref(), Some("lo"));
        assert_eq!(owner("fd00::2").as_deref(), Some("eth0"));
        assert_eq!(owner("192.0.2.3"), None);
        assert_eq!(
            owner_from_ip_json("not json", "192.0.2.2".parse().unwrap()),
            None
        );

        let inet6 = "\
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
";
        assert_eq!(
            owner_from_if_inet6(inet6, "fd00::2".parse().unwrap()).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            owner_from_if_inet6(inet6, "::1".parse().unwrap()).as_deref(),
            Some("lo")
        );
        assert_eq!(owner_from_if_inet6(inet6, "fd00::3".parse().unwrap()), None);
    }
}
