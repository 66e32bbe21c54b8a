//! Capability discovery from the running system: cores and memory from
//! `/proc`, NICs from `/sys/class/net` (plus addresses from `getifaddrs`),
//! io_uring (`ridge_io::probe_uring`), XDP prerequisites, and hardware codec
//! libraries. Parsers take text, so they are tested without the machine.

#[allow(
    unsafe_code,
    reason = "dlopen of codec libraries; the only unsafe in the crate"
)]
mod ffi;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

pub use ffi::library_loads;

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    pub name: String,
    /// Empty when the interface has no hardware address (or it is all zero).
    pub mac: String,
    pub mtu: u32,
    /// 0 when the driver does not say (virtual interfaces, link down).
    pub speed_mbps: u64,
    /// `ADDR/PREFIX`.
    pub addresses: Vec<String>,
    /// Kernel driver (`/sys/class/net/X/device/driver`), if any.
    pub driver: Option<String>,
}

/// What the XDP probe found. It checks prerequisites; it attaches nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpProbe {
    /// The kernel has the bpf() syscall (CONFIG_BPF_SYSCALL: it then exposes
    /// `/proc/sys/kernel/unprivileged_bpf_disabled`).
    pub kernel_bpf: bool,
    /// CAP_NET_ADMIN and (CAP_BPF or CAP_SYS_ADMIN) are effective.
    pub capable: bool,
    /// A non-loopback NIC is driven by a driver with native XDP support.
    pub native_driver: bool,
}

impl XdpProbe {
    /// `"native"`, `"generic"` or `"none"`: the best XDP mode this node
    /// could attach in, as the scheduler's `xdp_mode`.
    pub fn mode(&self) -> &'static str {
        match (self.kernel_bpf && self.capable, self.native_driver) {
            (false, _) => "none",
            (true, true) => "native",
            (true, false) => "generic",
        }
    }
}

/// A GPU with hardware codecs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub model: String,
    pub nvenc: bool,
    pub nvdec: bool,
}

/// Everything discovered.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// CPUs this process may run on (`available_parallelism`).
    pub cores: u32,
    pub memory_bytes: u64,
    pub nics: Vec<NicInfo>,
    pub io_uring: bool,
    /// Why io_uring is unavailable, when it is.
    pub io_uring_error: Option<String>,
    pub xdp: XdpProbe,
    pub gpus: Vec<GpuInfo>,
    /// libva loads and a DRM render node exists.
    pub vaapi: bool,
}

/// Drivers that implement XDP in the driver (native mode).
const NATIVE_XDP_DRIVERS: &[&str] = &[
    "mlx4_core",
    "mlx5_core",
    "i40e",
    "ice",
    "ixgbe",
    "ixgbevf",
    "igb",
    "igc",
    "bnxt_en",
    "nfp",
    "qede",
    "ena",
    "virtio_net",
    "veth",
    "tun",
    "sfc",
    "thunder",
    "stmmac",
];

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Discovers the capabilities of this machine.
pub fn discover() -> Capabilities {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| meminfo(&t).map(|m| m.total))
        .unwrap_or(0);
    let nics = nics(Path::new("/sys/class/net"));
    let (io_uring, io_uring_error) = match ridge_io::probe_uring() {
        Ok(()) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    };
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| effective_caps(&t))
        .unwrap_or(0);
    let xdp = XdpProbe {
        kernel_bpf: Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists(),
        capable: has_cap(cap_eff, CAP_NET_ADMIN)
            && (has_cap(cap_eff, CAP_BPF) || has_cap(cap_eff, CAP_SYS_ADMIN)),
        native_driver: nics.iter().any(|n| {
            n.name != "lo"
                && n.driver
                    .as_deref()
                    .is_some_and(|d| NATIVE_XDP_DRIVERS.contains(&d))
        }),
    };
    let nvenc = library_loads("libnvidia-encode.so.1");
    let nvdec = library_loads("libnvcuvid.so.1");
    let models = nvidia_models(Path::new("/proc/driver/nvidia/gpus"));
    let gpus = if !models.is_empty() {
        models
            .into_iter()
            .map(|model| GpuInfo {
                model,
                nvenc,
                nvdec,
            })
            .collect()
    } else if nvenc || nvdec {
        vec![GpuInfo {
            model: "NVIDIA (model unknown)".into(),
            nvenc,
            nvdec,
        }]
    } else {
        Vec::new()
    };
    let render_node = std::fs::read_dir("/dev/dri").is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
    });
    let vaapi = render_node && library_loads("libva.so.2");
    Capabilities {
        cores,
        memory_bytes,
        nics,
        io_uring,
        io_uring_error,
        xdp,
        gpus,
        vaapi,
    }
}

/// `MemTotal` and `MemAvailable` in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
}

impl MemInfo {
    /// Used fraction, 0.0 – 1.0.
    pub fn used(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        (1.0 - self.available as f64 / self.total as f64).clamp(0.0, 1.0)
    }
}

/// Parses `/proc/meminfo`.
pub fn meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
    };
    let total = field("MemTotal")?;
    Some(MemInfo {
        total,
        available: field("MemAvailable").unwrap_or(0),
    })
}

/// `CapEff` from `/proc/self/status`.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The interfaces under `dir` (normally `/sys/class/net`), sorted by name.
pub fn nics(dir: &Path) -> Vec<NicInfo> {
    let mut addrs = interface_addresses();
    let mut out: Vec<NicInfo> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let p = e.path();
                    let mac = read_trim(&p.join("address"))
                        .filter(|m| m.bytes().any(|b| b != b'0' && b != b':'))
                        .unwrap_or_default();
                    let mtu = read_trim(&p.join("mtu"))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    // Reading `speed` fails (EINVAL) for virtual and down
                    // links, and some drivers report -1.
                    let speed_mbps = read_trim(&p.join("speed"))
                        .and_then(|s| s.parse::<i64>().ok())
                        .filter(|s| *s > 0)
                        .map_or(0, |s| s as u64);
                    let driver = std::fs::read_link(p.join("device/driver"))
                        .ok()
                        .and_then(|l| l.file_name().map(|f| f.to_string_lossy().into_owned()));
                    let addresses = addrs.remove(&name).unwrap_or_default();
                    NicInfo {
                        name,
                        mac,
                        mtu,
                        speed_mbps,
                        addresses,
                        driver,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `ADDR/PREFIX` per interface name, from getifaddrs(3).
fn interface_addresses() -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifa in list {
        let Some(addr) = ifa.address.as_ref() else {
            continue;
        };
        let (ip, prefix) = if let Some(v4) = addr.as_sockaddr_in() {
            let prefix = ifa
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| m.ip().to_bits().count_ones());
            (IpAddr::V4(v4.ip()), prefix)
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let prefix = ifa
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in6())
                .map_or(128, |m| m.ip().to_bits().count_ones());
            (IpAddr::V6(v6.ip()), prefix)
        } else {
            continue;
        };
        out.entry(ifa.interface_name)
            .or_default()
            .push(format!("{ip}/{prefix}"));
    }
    out
}

/// GPU models from `/proc/driver/nvidia/gpus/*/information`.
fn nvidia_models(dir: &Path) -> Vec<String> {
    let Ok(d) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut models: Vec<String> = d
        .flatten()
        .filter_map(|e| {
            let info = std::fs::read_to_string(e.path().join("information")).ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map(|m| m.trim().to_owned())
        })
        .collect();
    models.sort();
    models
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let m =
            meminfo("MemTotal:       16000 kB\nMemFree: 1 kB\nMemAvailable:    4000 kB\n").unwrap();
        assert_eq!(m.total, 16000 * 1024);
        assert_eq!(m.available, 4000 * 1024);
        assert!((m.used() - 0.75).abs() < 1e-9);
        assert!(meminfo("nothing").is_none());
    }

    #[test]
    fn parses_caps() {
        let st = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let c = effective_caps(st).unwrap();
        assert!(has_cap(c, CAP_NET_ADMIN) && has_cap(c, CAP_BPF));
        let none = effective_caps("CapEff:\t0000000000000000\n").unwrap();
        assert!(!has_cap(none, CAP_NET_ADMIN));
    }

    #[test]
    fn xdp_mode_needs_kernel_and_caps() {
        let p = |k, c, n| XdpProbe {
            kernel_bpf: k,
            capable: c,
            native_driver: n,
        };
        assert_eq!(p(false, true, true).mode(), "none");
        assert_eq!(p(true, false, true).mode(), "none");
        assert_eq!(p(true, true, false).mode(), "generic");
        assert_eq!(p(true, true, true).mode(), "native");
    }
}
