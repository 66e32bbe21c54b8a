//! Helpers shared by the privileged tests: prerequisite checks, network
//! namespaces and crafted packets.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use ridge_ebpf::RidgeBpf;

/// Returns `Ok(())` if `check` holds. Otherwise: with `RIDGE_REQUIRE_ALL=1`
/// it panics; without it prints `SKIP <test>: <why>` to stderr and returns
/// `Err(())` so the test can `return`. (A copy of ridge-tests' helper.)
#[allow(clippy::result_unit_err)]
pub fn require(test: &str, check: Result<(), String>) -> Result<(), ()> {
    let Err(why) = check else {
        return Ok(());
    };
    if std::env::var("RIDGE_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("required test prerequisite missing: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    Err(())
}

/// Root (for BPF and namespaces).
pub fn root() -> Result<(), String> {
    if nix::unistd::Uid::effective().is_root() {
        Ok(())
    } else {
        Err("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".to_owned())
    }
}

/// Root and the `ip` tool (namespaces).
pub fn ip_tool() -> Result<(), String> {
    root()?;
    let ok = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(())
    } else {
        Err("`ip` (iproute2) is missing; install it with `bash tests/install-deps.sh`".to_owned())
    }
}

/// Root and the `ip` and `ethtool` tools.
pub fn netns_tools() -> Result<(), String> {
    root()?;
    for (tool, flag) in [("ip", "-V"), ("ethtool", "--version")] {
        let ok = Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!(
                "`{tool}` is missing; install it with `bash tests/install-deps.sh`"
            ));
        }
    }
    Ok(())
}

/// Loads the programs or panics with the whole error chain (including the
/// verifier log).
pub fn load() -> RidgeBpf {
    match RidgeBpf::load() {
        Ok(bpf) => bpf,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!("\n  caused by: {s}"));
                source = s.source();
            }
            panic!("loading the BPF programs failed: {msg}");
        }
    }
}

// ---- network namespaces --------------------------------------------------

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop (with its interfaces).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ridge-ebpf-{tag}-{}-{n}", std::process::id());
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// `ip netns exec <ns> args…`
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs `f` on a thread inside this namespace (sockets it creates
    /// belong to the namespace; interface names resolve there).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// (ifindex, MAC) of an interface.
    pub fn link(&self, iface: &str) -> (u32, [u8; 6]) {
        let json = self.ip(&["-j", "link", "show", "dev", iface]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        let ifindex = v[0]["ifindex"].as_u64().expect("ifindex") as u32;
        let mac = parse_mac(v[0]["address"].as_str().expect("address"));
        (ifindex, mac)
    }

    /// A counter from /proc/net/snmp, e.g. ("Udp", "InCsumErrors").
    pub fn snmp(&self, proto: &str, field: &str) -> u64 {
        let text = self.exec(&["cat", "/proc/net/snmp"]);
        let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let header: Vec<&str> = lines
            .next()
            .expect("snmp header")
            .split_whitespace()
            .collect();
        let values: Vec<&str> = lines
            .next()
            .expect("snmp values")
            .split_whitespace()
            .collect();
        let i = header.iter().position(|h| *h == field).expect("snmp field");
        values[i].parse().expect("snmp value")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(s.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("mac");
    }
    mac
}

/// A veth pair from `a_if` in `a` to `b_if` in `b`, with addresses (CIDR)
/// and both ends up; the sender side's TX checksum offload is off so that
/// packets carry real checksums, as they do on a wire.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
    a.exec(&["ethtool", "-K", a_if, "tx", "off"]);
    b.exec(&["ethtool", "-K", b_if, "tx", "off"]);
}

// ---- packets ---------------------------------------------------------------

pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

/// An RTP header (version 2) plus `payload_len` bytes of pattern.
pub fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32, payload_len: usize) -> Vec<u8> {
    let mut p = vec![0x80, pt & 0x7f];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seq as u8)));
    p
}

/// An RTCP sender report (PT 200) for `ssrc`.
pub fn rtcp_sr(ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 200, 0, 6];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0u8; 20]);
    p
}

/// A STUN binding request.
pub fn stun() -> Vec<u8> {
    let mut p = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    p.extend_from_slice(&[7u8; 12]);
    p
}

/// A DTLS ClientHello-looking record header (content type 22).
pub fn dtls() -> Vec<u8> {
    let mut p = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16];
    p.extend_from_slice(&[1u8; 16]);
    p
}

/// Builder for Ethernet / VLAN / IPv4 / UDP frames.
#[derive(Clone, Debug)]
pub struct Frame4 {
    pub vlans: Vec<u16>, // TPIDs, outermost first
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
    pub options: Vec<u8>, // IPv4 options, multiple of 4 bytes
    pub frag: u16,        // flags and offset field
    pub payload: Vec<u8>,
    pub zero_checksum: bool,
}

impl Frame4 {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, payload: Vec<u8>) -> Self {
        Self {
            vlans: Vec::new(),
            src,
            dst,
            ttl: 61,
            options: Vec::new(),
            frag: 0,
            payload,
            zero_checksum: false,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&DST_MAC);
        f.extend_from_slice(&SRC_MAC);
        for (i, tpid) in self.vlans.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100 + i as u16).to_be_bytes()); // TCI
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let l3 = f.len();
        let ihl = 5 + self.options.len() / 4;
        let udp_len = 8 + self.payload.len();
        let tot_len = ihl * 4 + udp_len;
        f.push(0x40 | ihl as u8);
        f.push(0);
        f.extend_from_slice(&(tot_len as u16).to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(17);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        f.extend_from_slice(&self.options);
        let csum = checksum(&f[l3..l3 + ihl * 4], 0);
        f[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
        let l4 = f.len();
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.payload);
        if !self.zero_checksum {
            let c = udp4_checksum(&f[l3..], &f[l4..]);
            f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        }
        f
    }
}

/// An Ethernet / IPv6 / [extension headers] / UDP frame. `ext` is a list of
/// (next-header value of the extension, its bytes).
pub fn frame6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    ext: &[(u8, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    let ext_len: usize = ext.iter().map(|(_, b)| b.len()).sum();
    let udp_len = 8 + payload.len();
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((ext_len + udp_len) as u16).to_be_bytes());
    f.push(ext.first().map_or(17, |(nh, _)| *nh));
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = ext.get(i + 1).map_or(17, |(nh, _)| *nh);
        f.extend_from_slice(&b);
    }
    let l4 = f.len();
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    let c = checksum(&f[l4..], sum(&pseudo));
    let c = if c == 0 { 0xffff } else { c };
    f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    f
}

fn sum(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        s += u32::from(w);
    }
    s
}

/// Internet checksum of `data` with an initial partial sum.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut s = initial + sum(data);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The UDP checksum for `udp` (header with the checksum field as is, and
/// payload) under the IPv4 header `ip`.
fn udp4_checksum(ip: &[u8], udp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    let c = checksum(udp, sum(&pseudo));
    if c == 0 { 0xffff } else { c }
}

/// Checks the IPv4 header checksum and (unless zero) the UDP checksum of an
/// untagged frame.
pub fn checksums_valid(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    if checksum(&ip[..ihl], 0) != 0 {
        return Err("bad IPv4 header checksum".to_owned());
    }
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let udp = &ip[ihl..tot];
    if udp[6..8] == [0, 0] {
        return Ok(());
    }
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    if checksum(udp, sum(&pseudo)) != 0 {
        return Err("bad UDP checksum".to_owned());
    }
    Ok(())
}

pub fn v4(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}
