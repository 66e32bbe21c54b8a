//! Live tests on veth pairs in private network namespaces:
//! (a) transit A → B → C forwarded by XDP on B, (b) 1→N fan-out through the
//! TC clone, (c) the guard stopping a flood while a legitimate stream flows,
//! plus the XDP attach-mode fallback.

mod common;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Netns, load, netns_tools, require, rtcp_sr, rtp, v4, veth};
use ridge_ebpf::{
    AttachMode, Destination, FlowEntry, FlowKey, RateLimit, TcAttachKind, XdpProgram,
};

const MEDIA_PORT: u16 = 5004;
const PACKETS: u16 = 1000;

/// A → B → C: a0 10.77.1.1 ↔ b0 10.77.1.2, b1 10.77.2.2 ↔ c0 10.77.2.1.
struct Transit {
    a: Netns,
    b: Netns,
    c: Netns,
}

impl Transit {
    fn new(tag: &str) -> Self {
        let t = Self {
            a: Netns::new(&format!("{tag}-a")),
            b: Netns::new(&format!("{tag}-b")),
            c: Netns::new(&format!("{tag}-c")),
        };
        veth(&t.a, "a0", "10.77.1.1/24", &t.b, "b0", "10.77.1.2/24");
        veth(&t.b, "b1", "10.77.2.2/24", &t.c, "c0", "10.77.2.1/24");
        t
    }

    /// The destination that sends a packet from B to C at `port`.
    fn to_c(&self, port: u16, ssrc: u32, seq_offset: u16, ts_offset: u32) -> Destination {
        let (b1, b1_mac) = self.b.link("b1");
        let (_, c0_mac) = self.c.link("c0");
        Destination {
            dst: v4([10, 77, 2, 1], port),
            src: v4([10, 77, 2, 2], MEDIA_PORT),
            ssrc,
            seq_offset,
            ts_offset,
            ifindex: b1,
            dst_mac: c0_mac,
            src_mac: b1_mac,
        }
    }

    /// The destination that sends a packet from B back to A at `port`
    /// (out of the interface it came in on).
    fn to_a(&self, port: u16, ssrc: u32) -> Destination {
        let (b0, b0_mac) = self.b.link("b0");
        let (_, a0_mac) = self.a.link("a0");
        Destination {
            dst: v4([10, 77, 1, 1], port),
            src: v4([10, 77, 1, 2], MEDIA_PORT),
            ssrc,
            seq_offset: 0,
            ts_offset: 0,
            ifindex: b0,
            dst_mac: a0_mac,
            src_mac: b0_mac,
        }
    }
}

fn bind(ns: &Netns, addr: SocketAddrV4) -> UdpSocket {
    ns.enter(|| {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        // Room for every packet a test sends, even if the receiving thread
        // is descheduled for a while on a busy machine.
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))
            .expect("SO_RCVBUFFORCE");
        s
    })
}

/// Receives until the socket is quiet for its read timeout.
fn drain(sock: &UdpSocket) -> Vec<(Vec<u8>, std::net::SocketAddr)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => out.push((buf[..n].to_vec(), from)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return out;
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

type Received = Vec<(Vec<u8>, std::net::SocketAddr)>;

/// Runs `send` while a thread per socket receives (so socket buffers never
/// overflow); each stops when its socket has been quiet for its timeout.
fn collect(socks: &[&UdpSocket], send: impl FnOnce()) -> Vec<Received> {
    thread::scope(|s| {
        let rx: Vec<_> = socks.iter().map(|sock| s.spawn(|| drain(sock))).collect();
        send();
        rx.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Sends RTP packets 0..n with seq = i, ts = 160 i, paced lightly.
fn send_rtp(sock: &UdpSocket, to: SocketAddrV4, ssrc: u32, n: u16) {
    for i in 0..n {
        let p = rtp(96, i, u32::from(i) * 160, ssrc, 100);
        sock.send_to(&p, to).expect("send");
        if i % 16 == 15 {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Checks that `got` are RTP packets 0..n in order, rewritten with `ssrc`
/// and the offsets, payload intact.
fn assert_stream(
    got: &[(Vec<u8>, std::net::SocketAddr)],
    n: u16,
    ssrc: u32,
    seq_off: u16,
    ts_off: u32,
    from: SocketAddrV4,
) {
    assert_eq!(got.len(), usize::from(n), "every packet arrives");
    for (i, (p, src)) in got.iter().enumerate() {
        let i = i as u16;
        let want = rtp(96, i, u32::from(i) * 160, ssrc, 100);
        assert_eq!(*src, std::net::SocketAddr::V4(from), "source address");
        assert_eq!(p.len(), want.len());
        assert_eq!(
            u16::from_be_bytes([p[2], p[3]]),
            i.wrapping_add(seq_off),
            "in order"
        );
        assert_eq!(
            u32::from_be_bytes(p[4..8].try_into().unwrap()),
            (u32::from(i) * 160).wrapping_add(ts_off)
        );
        assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), ssrc);
        assert_eq!(p[12..], want[12..], "payload intact");
    }
}

#[test]
fn transit_is_forwarded_in_the_kernel() {
    if require("transit_is_forwarded_in_the_kernel", netns_tools()).is_err() {
        return;
    }
    let t = Transit::new("transit");
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let mode =
        t.b.enter(|| bpf.attach_xdp("b0", XdpProgram::GuardAndForward));
    assert_eq!(mode, AttachMode::Native, "veth supports native XDP");
    // A veth only accepts XDP_REDIRECTed frames when its peer runs XDP.
    let c_mode = t.c.enter(|| bpf.attach_xdp("c0", XdpProgram::Guard));
    assert_eq!(c_mode, AttachMode::Native);

    let b_sock = bind(&t.b, v4([10, 77, 1, 2], MEDIA_PORT));
    let c_sock = bind(&t.c, v4([10, 77, 2, 1], 6000));
    let a_sock = bind(&t.a, v4([10, 77, 1, 1], 4000));
    let key = FlowKey {
        src: v4([10, 77, 1, 1], 4000),
        dst: v4([10, 77, 1, 2], MEDIA_PORT),
        ssrc: 0x1234_5678,
    };
    let d = t.to_c(6000, 0xbeef_0001, 40_000, 0xffff_0000);
    bpf.flows()
        .insert(
            key,
            &FlowEntry {
                destinations: vec![d],
                sample_every: 0,
            },
        )
        .unwrap();

    // ARP for B first (the kernel answers; XDP passes non-IP).
    a_sock.send_to(&stun(), key.dst).unwrap();
    assert_eq!(drain(&b_sock).len(), 1, "STUN reaches B's userspace");

    let got = collect(&[&c_sock, &b_sock], || {
        send_rtp(&a_sock, key.dst, key.ssrc, PACKETS)
    });
    assert_eq!(t.c.snmp("Udp", "RcvbufErrors"), 0, "C's socket overflowed");
    assert_stream(&got[0], PACKETS, d.ssrc, d.seq_offset, d.ts_offset, d.src);
    assert!(got[1].is_empty(), "B's userspace socket sees no media");
    assert_eq!(t.c.snmp("Udp", "InCsumErrors"), 0);
    assert_eq!(t.c.snmp("Ip", "InHdrErrors"), 0);

    // RTCP on the same 5-tuple goes to B's userspace, not to C.
    a_sock.send_to(&rtcp_sr(key.ssrc), key.dst).unwrap();
    assert_eq!(drain(&b_sock).len(), 1);
    assert!(drain(&c_sock).is_empty());

    let fc = bpf.flows().counters(key).unwrap().unwrap();
    assert_eq!(
        (fc.packets, fc.copies, fc.errors),
        (u64::from(PACKETS), u64::from(PACKETS), 0)
    );
    assert_eq!(fc.bytes, u64::from(PACKETS) * (14 + 20 + 8 + 112));
    assert_eq!(
        bpf.counters().unwrap().forward_xdp_redirect,
        u64::from(PACKETS)
    );

    // Removing the entry sends the flow to userspace again.
    bpf.flows().remove(key).unwrap();
    send_rtp(&a_sock, key.dst, key.ssrc, 10);
    assert_eq!(drain(&b_sock).len(), 10);
    assert!(drain(&c_sock).is_empty());

    // Teardown detaches the programs.
    bpf.flows()
        .insert(
            key,
            &FlowEntry {
                destinations: vec![d],
                sample_every: 0,
            },
        )
        .unwrap();
    assert!(
        t.b.ip(&["-j", "link", "show", "dev", "b0"])
            .contains("\"xdp\"")
    );
    drop(bpf);
    assert!(
        !t.b.ip(&["-j", "link", "show", "dev", "b0"])
            .contains("\"xdp\""),
        "XDP detached on drop"
    );
    send_rtp(&a_sock, key.dst, key.ssrc, 10);
    assert_eq!(
        drain(&b_sock).len(),
        10,
        "after drop, media reaches B's userspace"
    );
    assert!(drain(&c_sock).is_empty());
}

fn stun() -> Vec<u8> {
    common::stun()
}

#[test]
fn transit_sampling_sends_one_in_n_to_userspace() {
    if require(
        "transit_sampling_sends_one_in_n_to_userspace",
        netns_tools(),
    )
    .is_err()
    {
        return;
    }
    let t = Transit::new("sample");
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    assert_eq!(
        t.b.enter(|| bpf.attach_xdp("b0", XdpProgram::GuardAndForward)),
        AttachMode::Native
    );
    assert_eq!(
        t.c.enter(|| bpf.attach_xdp("c0", XdpProgram::Guard)),
        AttachMode::Native
    );
    let b_sock = bind(&t.b, v4([10, 77, 1, 2], MEDIA_PORT));
    let c_sock = bind(&t.c, v4([10, 77, 2, 1], 6000));
    let a_sock = bind(&t.a, v4([10, 77, 1, 1], 4000));
    let key = FlowKey {
        src: v4([10, 77, 1, 1], 4000),
        dst: v4([10, 77, 1, 2], MEDIA_PORT),
        ssrc: 7,
    };
    let d = t.to_c(6000, 8, 0, 0);
    bpf.flows()
        .insert(
            key,
            &FlowEntry {
                destinations: vec![d],
                sample_every: 10,
            },
        )
        .unwrap();
    a_sock.send_to(&stun(), key.dst).unwrap();
    drain(&b_sock);

    let got = collect(&[&b_sock, &c_sock], || {
        send_rtp(&a_sock, key.dst, key.ssrc, 500)
    });
    let (to_b, to_c) = (got[0].len() as u64, got[1].len() as u64);
    let fc = bpf.flows().counters(key).unwrap().unwrap();
    assert_eq!(to_b + to_c, 500, "nothing lost");
    assert_eq!((to_b, to_c), (fc.sampled, fc.packets));
    // 1 in 10 per CPU; with 2 CPUs at most 2 extra.
    assert!((50..=52).contains(&to_b), "sampled {to_b}");
}

#[test]
fn fan_out_through_tc_clones() {
    if require("fan_out_through_tc_clones", netns_tools()).is_err() {
        return;
    }
    fan_out(TcAttachKind::Tcx);
}

#[test]
fn fan_out_through_tc_clones_on_clsact() {
    if require("fan_out_through_tc_clones_on_clsact", netns_tools()).is_err() {
        return;
    }
    fan_out(TcAttachKind::Clsact);
}

fn fan_out(kind: TcAttachKind) {
    let t = Transit::new(&format!("fanout-{kind:?}"));
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    assert_eq!(
        t.b.enter(|| bpf.attach_xdp("b0", XdpProgram::GuardAndForward)),
        AttachMode::Native
    );
    let got_kind =
        t.b.enter(|| bpf.attach_tc_fanout_with("b0", &[kind]))
            .expect("attach TC");
    assert_eq!(got_kind, kind);
    if kind == TcAttachKind::Clsact {
        assert!(
            t.b.exec(&["tc", "filter", "show", "dev", "b0", "ingress"])
                .contains("ridge_fanout")
        );
    }

    let b_sock = bind(&t.b, v4([10, 77, 1, 2], MEDIA_PORT));
    let a_sock = bind(&t.a, v4([10, 77, 1, 1], 4000));
    let a_back = bind(&t.a, v4([10, 77, 1, 1], 7000));
    let c_socks: Vec<UdpSocket> = (0..3)
        .map(|i| bind(&t.c, v4([10, 77, 2, 1], 6000 + i)))
        .collect();
    let key = FlowKey {
        src: v4([10, 77, 1, 1], 4000),
        dst: v4([10, 77, 1, 2], MEDIA_PORT),
        ssrc: 0xfeed,
    };
    let mut dests: Vec<Destination> = (0..3u16)
        .map(|i| t.to_c(6000 + i, 0x100 + u32::from(i), 1000 * i, 7 * u32::from(i)))
        .collect();
    dests.push(t.to_a(7000, 0x200)); // hairpin: out of the ingress interface
    bpf.flows()
        .insert(
            key,
            &FlowEntry {
                destinations: dests.clone(),
                sample_every: 0,
            },
        )
        .unwrap();

    a_sock.send_to(&stun(), key.dst).unwrap();
    assert_eq!(drain(&b_sock).len(), 1);
    let n = 500;
    let socks = [&c_socks[0], &c_socks[1], &c_socks[2], &a_back, &b_sock];
    let got = collect(&socks, || send_rtp(&a_sock, key.dst, key.ssrc, n));
    for (got, d) in got.iter().zip(&dests) {
        assert_stream(got, n, d.ssrc, d.seq_offset, d.ts_offset, d.src);
    }
    assert!(got[4].is_empty(), "B's userspace socket sees no media");
    assert_eq!(t.c.snmp("Udp", "InCsumErrors"), 0);
    assert_eq!(t.a.snmp("Udp", "InCsumErrors"), 0);
    let fc = bpf.flows().counters(key).unwrap().unwrap();
    assert_eq!(
        (fc.packets, fc.copies, fc.errors),
        (u64::from(n), 4 * u64::from(n), 0)
    );

    // Teardown detaches the TC program too: media reaches B's userspace.
    drop(bpf);
    send_rtp(&a_sock, key.dst, key.ssrc, 10);
    assert_eq!(
        drain(&b_sock).len(),
        10,
        "after drop, media reaches B's userspace"
    );
    assert!(drain(&c_socks[0]).is_empty());
}

#[test]
fn guard_stops_a_flood_while_a_stream_flows() {
    if require("guard_stops_a_flood_while_a_stream_flows", netns_tools()).is_err() {
        return;
    }
    let a = Netns::new("flood-a");
    let b = Netns::new("flood-b");
    veth(&a, "a0", "10.77.1.1/24", &b, "b0", "10.77.1.2/24");
    a.ip(&["addr", "add", "10.77.1.3/24", "dev", "a0"]);
    let mut bpf = load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let (rate, burst) = (500u32, 100u32);
    bpf.guard()
        .set_rate_limit(Some(RateLimit {
            packets_per_second: rate,
            burst,
        }))
        .unwrap();
    assert_eq!(
        b.enter(|| bpf.attach_xdp("b0", XdpProgram::Guard)),
        AttachMode::Native
    );

    let b_sock = bind(&b, v4([10, 77, 1, 2], MEDIA_PORT));
    b_sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let legit = bind(&a, v4([10, 77, 1, 1], 4000));
    let flood = bind(&a, v4([10, 77, 1, 3], 4000));
    let to = v4([10, 77, 1, 2], MEDIA_PORT);
    // Resolve ARP from both sources before counting.
    legit.send_to(&stun(), to).unwrap();
    flood.send_to(&stun(), to).unwrap();
    assert_eq!(drain(&b_sock).len(), 2);
    bpf.guard().reset_rate_state().unwrap();

    let stop = AtomicBool::new(false);
    let (received, flood_sent, elapsed) = thread::scope(|s| {
        let rx = s.spawn(|| {
            let mut by_source: HashMap<std::net::SocketAddr, u64> = HashMap::new();
            let mut buf = [0u8; 2048];
            loop {
                match b_sock.recv_from(&mut buf) {
                    Ok((_, from)) => *by_source.entry(from).or_default() += 1,
                    Err(_) if stop.load(Ordering::Relaxed) => return by_source,
                    Err(_) => {}
                }
            }
        });
        let start = Instant::now();
        let flood = &flood;
        let flooder = s.spawn(move || {
            let p = rtp(96, 0, 0, 0x666, 100);
            let mut sent = 0u64;
            while start.elapsed() < Duration::from_millis(1000) {
                if flood.send_to(&p, to).is_ok() {
                    sent += 1;
                }
            }
            sent
        });
        // 200 packets/s for one second, well under the limit.
        for i in 0..200u16 {
            legit.send_to(&rtp(96, i, 0, 0x1, 100), to).unwrap();
            thread::sleep(Duration::from_millis(5));
        }
        let flood_sent = flooder.join().unwrap();
        let elapsed = start.elapsed();
        thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        (rx.join().unwrap(), flood_sent, elapsed)
    });
    let got_legit = received
        .get(&"10.77.1.1:4000".parse().unwrap())
        .copied()
        .unwrap_or(0);
    let got_flood = received
        .get(&"10.77.1.3:4000".parse().unwrap())
        .copied()
        .unwrap_or(0);
    let allowed =
        u64::from(burst) + (u64::from(rate) as f64 * elapsed.as_secs_f64() * 1.1) as u64 + 2;
    let c = bpf.counters().unwrap();
    eprintln!(
        "flood: sent {flood_sent}, delivered {got_flood} (allowed {allowed}); legit 200 -> {got_legit}; {c:?}"
    );
    assert_eq!(got_legit, 200, "the legitimate stream is untouched");
    assert!(
        flood_sent > 10 * allowed,
        "the flood was a flood ({flood_sent})"
    );
    assert!(
        got_flood <= allowed,
        "flood delivered {got_flood} > {allowed}"
    );
    assert!(c.drop_rate_limited >= flood_sent - allowed, "{c:?}");
}

#[test]
fn xdp_attach_falls_back_to_generic_then_none() {
    if require("xdp_attach_falls_back_to_generic_then_none", netns_tools()).is_err() {
        return;
    }
    let ns = Netns::new("modes");
    // A bridge has no native XDP (and dummy may be a missing module).
    ns.ip(&["link", "add", "d0", "type", "bridge"]);
    ns.ip(&["link", "set", "d0", "up"]);
    let mut bpf = load();
    let (dummy, missing, forced) = ns.enter(|| {
        let dummy = bpf.attach_xdp("d0", XdpProgram::Guard);
        let missing = bpf.attach_xdp("nosuch0", XdpProgram::Guard);
        let forced = bpf.attach_xdp_with("lo", XdpProgram::GuardAndForward, &[AttachMode::Generic]);
        (dummy, missing, forced)
    });
    assert_eq!(dummy, AttachMode::Generic, "a bridge has no native XDP");
    assert_eq!(missing, AttachMode::None);
    assert_eq!(forced, AttachMode::Generic);
    assert_eq!(bpf.xdp_mode("d0"), AttachMode::Generic);
    assert_eq!(bpf.xdp_mode("nosuch0"), AttachMode::None);
    assert_eq!(AttachMode::Native.as_str(), "native");
    let json = ns.ip(&["-j", "link", "show", "dev", "d0"]);
    assert!(json.contains("\"xdp\""), "d0 shows an XDP program: {json}");
    ns.enter(|| bpf.detach_xdp("d0")).unwrap();
    let json = ns.ip(&["-j", "link", "show", "dev", "d0"]);
    assert!(!json.contains("\"xdp\""), "detached: {json}");
    assert!(
        !bpf.attach_xdp("bad\0name", XdpProgram::Guard)
            .eq(&AttachMode::Native)
    );
}
