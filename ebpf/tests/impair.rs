//! The packet-loss impairment (`ridge_impair`): its verdicts on crafted
//! packets (`BPF_PROG_TEST_RUN`), its loss rate, and live loss on veth pairs
//! between network namespaces (TCX and clsact, egress and ingress, several
//! interfaces at once), with ARP, ICMP and neighbour discovery unharmed.

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use common::{Frame4, Netns, frame6, netns_tools, require, root, v4, veth};
use ridge_ebpf::{
    Error, ImpairCounters, Impairment, LOSS_ALL_PPM, TcAttachKind, TcDirection, tc_verdict,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn impairment(loss_ppm: u32) -> Impairment {
    Impairment::load(loss_ppm).unwrap_or_else(|e| {
        panic!("loading ridge_impair failed: {}", chain(&e));
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!("\n  caused by: {s}"));
        source = s.source();
    }
    msg
}

// ---- crafted packets ---------------------------------------------------------

fn udp4() -> Vec<u8> {
    Frame4::new(
        v4([10, 98, 0, 1], 4000),
        v4([10, 98, 0, 2], 5000),
        vec![7; 100],
    )
    .build()
}

/// A later IPv4 fragment of a UDP datagram (no UDP header, protocol UDP).
fn udp4_later_fragment() -> Vec<u8> {
    let mut f = Frame4::new(
        v4([10, 98, 0, 1], 4000),
        v4([10, 98, 0, 2], 5000),
        vec![7; 100],
    );
    f.frag = 0x00b9; // offset 1480
    f.build()
}

fn icmp4() -> Vec<u8> {
    let mut f = udp4();
    f[14 + 9] = 1; // IPPROTO_ICMP (checksums do not matter here)
    f
}

fn tcp4() -> Vec<u8> {
    let mut f = udp4();
    f[14 + 9] = 6;
    f
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&common::SRC_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&common::SRC_MAC);
    f.extend_from_slice(&[10, 98, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 98, 0, 2]);
    f
}

fn ip6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, n)
}

/// UDP over IPv6 behind `ext` extension headers (next-header value, bytes).
fn udp6(ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
    frame6(ip6(1), ip6(2), 4000, 5000, ext, &[7; 100])
}

/// An 8-byte hop-by-hop / destination-options / routing header.
fn ext8(next_header_value: u8) -> (u8, Vec<u8>) {
    (next_header_value, vec![0, 0, 1, 4, 0, 0, 0, 0]) // length 0, PadN
}

/// A fragment header (first fragment, more to come).
fn frag_ext() -> (u8, Vec<u8>) {
    (44, vec![0, 0, 0, 1, 0, 0, 0x12, 0x34])
}

/// An ICMPv6 neighbour solicitation (only its next header matters here).
fn icmp6() -> Vec<u8> {
    let mut f = frame6(ip6(1), ip6(2), 0, 0, &[], &[0; 24]);
    f[14 + 6] = 58; // IPPROTO_ICMPV6
    f[14 + 40] = 135;
    f
}

fn verdict(imp: &Impairment, frame: &[u8]) -> u32 {
    let out = imp.test_run(frame, 1).expect("test_run");
    assert_eq!(out.data, frame, "the program never changes a packet");
    out.verdict
}

#[test]
fn impair_verdicts_on_crafted_packets() {
    if require("impair_verdicts_on_crafted_packets", root()).is_err() {
        return;
    }
    let udp: Vec<(&str, Vec<u8>)> = vec![
        ("udp4", udp4()),
        ("udp4 later fragment", udp4_later_fragment()),
        ("udp6", udp6(&[])),
        ("udp6 behind hop-by-hop", udp6(&[ext8(0)])),
        ("udp6 behind a fragment header", udp6(&[frag_ext()])),
        (
            "udp6 behind four extension headers",
            udp6(&[ext8(0), ext8(60), ext8(43), frag_ext()]),
        ),
    ];
    let other: Vec<(&str, Vec<u8>)> = vec![
        ("arp", arp()),
        ("icmp4", icmp4()),
        ("tcp4", tcp4()),
        ("icmp6", icmp6()),
        (
            "udp6 behind five extension headers (too deep to look)",
            udp6(&[ext8(0), ext8(60), ext8(43), ext8(60), frag_ext()]),
        ),
    ];
    let n_udp = udp.len() as u64;
    let n_other = other.len() as u64;

    // Loss 0: everything passes, without a verdict of its own.
    let mut imp = impairment(0);
    assert!(imp.udp_only(), "UDP only by default");
    assert_eq!((imp.iface(), imp.attach_kind()), (None, None));
    for (what, f) in udp.iter().chain(&other) {
        assert_eq!(verdict(&imp, f), tc_verdict::UNSPEC, "{what} at loss 0");
    }
    let c: ImpairCounters = imp.counters().unwrap();
    assert_eq!((c.passed, c.dropped, c.exempt), (n_udp, 0, n_other));

    // Loss 100%: every UDP packet is dropped; the rest pass.
    imp.set_loss_ppm(LOSS_ALL_PPM).unwrap();
    assert_eq!(imp.loss_ppm(), LOSS_ALL_PPM);
    for (what, f) in &udp {
        assert_eq!(verdict(&imp, f), tc_verdict::SHOT, "{what} at 100%");
    }
    for (what, f) in &other {
        assert_eq!(verdict(&imp, f), tc_verdict::UNSPEC, "{what} is exempt");
    }
    let c = imp.counters().unwrap();
    assert_eq!((c.passed, c.dropped, c.exempt), (n_udp, n_udp, 2 * n_other));

    // Not UDP-only: everything is dropped, ARP included.
    imp.set_udp_only(false).unwrap();
    assert!(!imp.udp_only());
    for (what, f) in udp.iter().chain(&other) {
        assert_eq!(
            verdict(&imp, f),
            tc_verdict::SHOT,
            "{what} without udp_only"
        );
    }
    let c = imp.counters().unwrap();
    assert_eq!(c.dropped, 2 * n_udp + n_other);
    assert_eq!(c.exempt, 2 * n_other, "nothing exempt without udp_only");

    // Over 100% is refused and changes nothing.
    assert!(matches!(
        imp.set_loss_ppm(LOSS_ALL_PPM + 1),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(imp.loss_ppm(), LOSS_ALL_PPM);
    assert!(matches!(
        Impairment::load(2_000_000),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn impair_drops_at_the_configured_rate() {
    if require("impair_drops_at_the_configured_rate", root()).is_err() {
        return;
    }
    let mut imp = impairment(0);
    let runs = 200_000u32;
    let mut before = imp.counters().unwrap();
    // Standard deviation of the measured fraction: at most 0.0011 here.
    for (ppm, tolerance) in [(200_000, 0.006), (500_000, 0.006), (10_000, 0.002)] {
        imp.set_loss_ppm(ppm).unwrap();
        imp.test_run(&udp4(), runs).expect("test_run");
        let c = imp.counters().unwrap();
        let (passed, dropped) = (c.passed - before.passed, c.dropped - before.dropped);
        assert_eq!(passed + dropped, u64::from(runs));
        let got = dropped as f64 / f64::from(runs);
        let want = f64::from(ppm) / 1e6;
        assert!(
            (got - want).abs() < tolerance,
            "{ppm} ppm: dropped {got:.4} of packets"
        );
        before = c;
    }
}

// ---- live: veth pairs in namespaces -------------------------------------------

/// a0 10.78.1.1 / fd78::1 ↔ b0 10.78.1.2 / fd78::2.
fn pair(tag: &str) -> (Netns, Netns) {
    let a = Netns::new(&format!("{tag}-a"));
    let b = Netns::new(&format!("{tag}-b"));
    veth(&a, "a0", "10.78.1.1/24", &b, "b0", "10.78.1.2/24");
    a.ip(&["-6", "addr", "add", "fd78::1/64", "dev", "a0", "nodad"]);
    b.ip(&["-6", "addr", "add", "fd78::2/64", "dev", "b0", "nodad"]);
    (a, b)
}

fn bind(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    ns.enter(|| {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20))
            .expect("SO_RCVBUFFORCE");
        s
    })
}

/// Sends datagrams numbered `first..first + n` (a 4-byte sequence number
/// and padding), paced so that no queue on the way overflows, while a
/// thread receives on `rx` until it is quiet; returns the numbers received.
fn send_and_receive(
    tx: &UdpSocket,
    to: SocketAddr,
    rx: &UdpSocket,
    first: u32,
    n: u32,
) -> Vec<u32> {
    thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            loop {
                match rx.recv(&mut buf) {
                    Ok(len) => {
                        assert_eq!(len, 200, "datagram size");
                        got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        return got;
                    }
                    Err(e) => panic!("recv: {e}"),
                }
            }
        });
        let mut p = [0x5au8; 200];
        for i in first..first + n {
            p[..4].copy_from_slice(&i.to_be_bytes());
            tx.send_to(&p, to).expect("send");
            if i % 16 == 15 {
                thread::sleep(Duration::from_millis(1));
            }
        }
        receiver.join().unwrap()
    })
}

/// Sends one ICMP echo request from `ns` to `dst` (a raw socket, as ping
/// does) and waits up to a second for the reply; tries three times.
fn ping(ns: &Netns, dst: IpAddr) -> bool {
    ns.enter(|| {
        let (domain, protocol, request, reply) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
        };
        let sock = Socket::new(domain, Type::RAW, Some(protocol)).expect("raw ICMP socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let id = (std::process::id() as u16).to_be_bytes();
        for seq in 1u16..=3 {
            let mut echo = vec![request, 0, 0, 0, id[0], id[1]];
            echo.extend_from_slice(&seq.to_be_bytes());
            echo.extend_from_slice(b"ridge-impair");
            if dst.is_ipv4() {
                // The kernel fills in ICMPv6 checksums, not ICMPv4 ones.
                let c = common::checksum(&echo, 0);
                echo[2..4].copy_from_slice(&c.to_be_bytes());
            }
            sock.send_to(&echo, &SockAddr::from(SocketAddr::new(dst, 0)))
                .expect("send echo request");
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut buf = [0u8; 1500];
            while Instant::now() < deadline {
                let Ok(n) = (&sock).read(&mut buf) else {
                    continue;
                };
                // An ICMPv4 raw socket reads the IP header too.
                let icmp = if dst.is_ipv4() {
                    &buf[usize::from(buf[0] & 0xf) * 4..n]
                } else {
                    &buf[..n]
                };
                if icmp.len() >= 8
                    && icmp[0] == reply
                    && icmp[4..6] == id
                    && icmp[6..8] == seq.to_be_bytes()
                {
                    return true;
                }
            }
        }
        false
    })
}

/// Forgets the neighbours on both ends, so that the next packet needs ARP /
/// neighbour discovery again.
fn flush_neighbours(a: &Netns, b: &Netns) {
    a.ip(&["neigh", "flush", "dev", "a0"]);
    b.ip(&["neigh", "flush", "dev", "b0"]);
    a.ip(&["-6", "neigh", "flush", "dev", "a0"]);
    b.ip(&["-6", "neigh", "flush", "dev", "b0"]);
}

#[test]
fn impair_loses_udp_on_a_veth() {
    if require("impair_loses_udp_on_a_veth", netns_tools()).is_err() {
        return;
    }
    let (a, b) = pair("loss");
    let mut imp = a
        .enter(|| Impairment::attach("a0", TcDirection::Egress, 200_000))
        .unwrap_or_else(|e| panic!("attach: {}", chain(&e)));
    assert_eq!(imp.attach_kind(), Some(TcAttachKind::Tcx), "kernel 6.6+");
    assert_eq!(
        (imp.iface(), imp.direction()),
        (Some("a0"), Some(TcDirection::Egress))
    );

    let to = SocketAddr::from(([10, 78, 1, 2], 5000));
    let rx = bind(&b, to);
    let tx = bind(&a, SocketAddr::from(([10, 78, 1, 1], 4000)));
    assert!(ping(&a, "10.78.1.2".parse().unwrap()), "ARP and ping work");

    // 20% loss on 20,000 datagrams.
    let sent = 20_000u32;
    let got = send_and_receive(&tx, to, &rx, 0, sent);
    assert_eq!(b.snmp("Udp", "RcvbufErrors"), 0, "b's socket overflowed");
    let unique: HashSet<u32> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "no duplicates");
    assert!(got.iter().all(|&i| i < sent));
    let c = imp.counters().unwrap();
    let fraction = got.len() as f64 / f64::from(sent);
    eprintln!(
        "20% loss: received {} of {sent} ({fraction:.4}); {c:?}",
        got.len()
    );
    assert_eq!(
        c.passed + c.dropped,
        u64::from(sent),
        "every datagram counted once"
    );
    assert_eq!(got.len() as u64, c.passed, "what passed arrived");
    assert!(
        (fraction - 0.8).abs() <= 0.015,
        "received {fraction:.4}, expected 0.80 ± 0.015"
    );
    assert!(c.exempt > 0, "the ping and ARP went through, exempt");

    // 100% UDP loss: ARP, ICMP and neighbour discovery still work, over
    // IPv4 and IPv6, while no datagram gets through on either.
    imp.set_loss_ppm(LOSS_ALL_PPM).unwrap();
    flush_neighbours(&a, &b);
    assert!(
        ping(&a, "10.78.1.2".parse().unwrap()),
        "ARP + ping at 100% UDP loss"
    );
    assert!(
        ping(&a, "fd78::2".parse().unwrap()),
        "ND + ping6 at 100% UDP loss"
    );
    let to6 = SocketAddr::from(("fd78::2".parse::<Ipv6Addr>().unwrap(), 5000));
    let rx6 = bind(&b, to6);
    let tx6 = bind(
        &a,
        SocketAddr::from(("fd78::1".parse::<Ipv6Addr>().unwrap(), 4000)),
    );
    assert!(send_and_receive(&tx, to, &rx, sent, 100).is_empty());
    assert!(send_and_receive(&tx6, to6, &rx6, 0, 100).is_empty());
    let c100 = imp.counters().unwrap();
    assert_eq!(c100.dropped, c.dropped + 200);
    assert_eq!(c100.passed, c.passed);

    // Loss 0: everything arrives and nothing more is dropped.
    imp.set_loss_ppm(0).unwrap();
    let got = send_and_receive(&tx, to, &rx, 0, 2000);
    assert_eq!(got, (0..2000).collect::<Vec<_>>(), "all, in order");
    let got6 = send_and_receive(&tx6, to6, &rx6, 0, 500);
    assert_eq!(got6.len(), 500);
    let c0 = imp.counters().unwrap();
    assert_eq!(c0.dropped, c100.dropped, "nothing more dropped at loss 0");
    assert_eq!(c0.passed, c100.passed + 2500);

    // Dropping it detaches: at 100% again, then dropped, all arrive.
    imp.set_loss_ppm(LOSS_ALL_PPM).unwrap();
    drop(imp);
    assert_eq!(send_and_receive(&tx, to, &rx, 0, 200).len(), 200);
}

#[test]
fn impair_several_interfaces_ingress_and_clsact() {
    if require(
        "impair_several_interfaces_ingress_and_clsact",
        netns_tools(),
    )
    .is_err()
    {
        return;
    }
    let (a, b) = pair("multi");
    // a0 egress: 30% on TCX; b0 ingress: 50% on a clsact filter. A datagram
    // from a to b crosses both; one from b to a crosses neither.
    let a_out = a
        .enter(|| Impairment::attach("a0", TcDirection::Egress, 300_000))
        .unwrap_or_else(|e| panic!("attach a0: {}", chain(&e)));
    let b_in = b
        .enter(|| {
            Impairment::attach_with("b0", TcDirection::Ingress, 500_000, &[TcAttachKind::Clsact])
        })
        .unwrap_or_else(|e| panic!("attach b0: {}", chain(&e)));
    assert_eq!(a_out.attach_kind(), Some(TcAttachKind::Tcx));
    assert_eq!(b_in.attach_kind(), Some(TcAttachKind::Clsact));
    let filters = || b.exec(&["tc", "filter", "show", "dev", "b0", "ingress"]);
    assert!(filters().contains("ridge_impair"), "{}", filters());

    let (a_addr, b_addr) = (
        SocketAddr::from(([10, 78, 1, 1], 4000)),
        SocketAddr::from(([10, 78, 1, 2], 5000)),
    );
    let (a_sock, b_sock) = (bind(&a, a_addr), bind(&b, b_addr));
    assert!(ping(&a, "10.78.1.2".parse().unwrap()));

    let sent = 4000u32;
    let got = send_and_receive(&a_sock, b_addr, &b_sock, 0, sent);
    let (ca, cb) = (a_out.counters().unwrap(), b_in.counters().unwrap());
    let fraction = got.len() as f64 / f64::from(sent);
    eprintln!("30% then 50%: received {fraction:.4}; a0 egress {ca:?}, b0 ingress {cb:?}");
    assert_eq!(ca.impaired(), u64::from(sent));
    assert_eq!(cb.impaired(), ca.passed, "b0 saw what a0 let through");
    assert_eq!(got.len() as u64, cb.passed);
    assert!((fraction - 0.35).abs() < 0.035, "received {fraction:.4}");
    assert!((ca.loss_ratio() - 0.3).abs() < 0.035, "{ca:?}");
    assert!((cb.loss_ratio() - 0.5).abs() < 0.05, "{cb:?}");

    // The other way is not impaired, and neither program sees it.
    let back = send_and_receive(&b_sock, a_addr, &a_sock, 0, 1000);
    assert_eq!(back.len(), 1000);
    assert_eq!(a_out.counters().unwrap().impaired(), ca.impaired());
    assert_eq!(b_in.counters().unwrap().impaired(), cb.impaired());

    // Dropped here, outside both namespaces: the clsact filter is removed
    // in b's namespace (not by ifindex in this one), the TCX link closes.
    drop(a_out);
    drop(b_in);
    assert!(!filters().contains("ridge_impair"), "{}", filters());
    assert_eq!(
        send_and_receive(&a_sock, b_addr, &b_sock, 0, 1000).len(),
        1000
    );

    // A missing interface is an error, not a panic.
    let missing = a.enter(|| Impairment::attach("nosuch0", TcDirection::Egress, 0));
    assert!(matches!(missing, Err(Error::Attach { .. })), "{missing:?}");
    assert!(matches!(
        Impairment::attach("bad\0name", TcDirection::Egress, 0),
        Err(Error::InvalidArgument(_))
    ));
}
