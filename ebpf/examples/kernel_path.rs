//! Benchmarks of the kernel fast path.
//!
//! 1. Cost per packet of each program, measured by the kernel with
//!    `BPF_PROG_TEST_RUN` and `repeat` (median of 5 runs).
//! 2. On one veth topology A → B → C in private namespaces, in the same run:
//!    packets per second per B core for the kernel path (XDP rewrite +
//!    redirect on B) and for a userspace relay on B (the dataplane's
//!    recvmmsg/sendmmsg backend, `ridge_io::MmsgIo`, rewriting the same
//!    header fields). B's cost is the CPU time of B's receive NAPI thread
//!    (threaded NAPI, pinned to CPU 0) plus, for the userspace path, the
//!    relay thread (also on CPU 0), divided by the packets B forwarded;
//!    the sender and receiver run on CPU 1 and are not charged to B.
//!
//! ```sh
//! cargo run -p ridge-ebpf --release --example kernel_path -- [--seconds 3] [--json FILE]
//! ```
//!
//! Needs root; prints a table and then one JSON object.
#![allow(clippy::print_stdout)] // a command-line report

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Frame4, Netns, rtcp_sr, rtp, v4};
use ridge_ebpf::{
    AttachMode, Destination, FlowEntry, FlowKey, RateLimit, RidgeBpf, TestProgram, XdpProgram,
    tc_verdict, xdp_verdict,
};
use ridge_io::{DatagramIo, MmsgIo, RecvMeta, SocketOptions, Transmit};

const MEDIA_PORT: u16 = 5004;
const PAYLOAD: usize = 160; // RTP payload bytes: 20 ms of G.711
const REPEAT: u32 = 1_000_000;

fn main() {
    let mut seconds = 3.0f64;
    let mut json_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(seconds),
            "--json" => json_path = args.next(),
            _ => {
                eprintln!("usage: kernel_path [--seconds N] [--json FILE]");
                std::process::exit(64);
            }
        }
    }
    if let Err(e) = common::netns_tools() {
        eprintln!("kernel_path: {e}");
        std::process::exit(2);
    }

    let costs = test_run_costs();
    println!("== cost per packet (BPF_PROG_TEST_RUN, repeat {REPEAT}, median of 5)");
    println!("{:<44} {:>8}", "program / case", "ns/pkt");
    for (name, ns) in &costs {
        println!("{name:<44} {ns:>8.1}");
    }

    let duration = Duration::from_secs_f64(seconds);
    let userspace = live(Path::Userspace, duration);
    let kernel = live(Path::Kernel, duration);
    println!();
    println!("== A -> B -> C on veth, {seconds} s per path, {PAYLOAD} B RTP payload");
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>10} {:>14}",
        "path", "sent pps", "B fwd pps", "C recv pps", "B ns/pkt", "pps per B core"
    );
    for r in [&userspace, &kernel] {
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>12.0} {:>10.0} {:>14.0}",
            r.path, r.sent_pps, r.forwarded_pps, r.received_pps, r.b_ns_per_packet, r.per_core_pps
        );
    }
    let ratio = kernel.per_core_pps / userspace.per_core_pps;
    println!("kernel / userspace, packets per B core: {ratio:.1}x");

    let json = serde_json::json!({
        "test_run_ns_per_packet": costs.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "live": {
            "seconds": seconds,
            "payload_bytes": PAYLOAD,
            "userspace": userspace.json(),
            "kernel": kernel.json(),
            "kernel_over_userspace_per_core": ratio,
        },
    });
    println!("{json}");
    if let Some(path) = json_path
        && let Err(e) = std::fs::write(&path, format!("{json:#}\n"))
    {
        eprintln!("kernel_path: writing {path}: {e}");
        std::process::exit(1);
    }
}

// ---- 1. test_run -----------------------------------------------------------

fn median_ns(bpf: &RidgeBpf, prog: TestProgram, frame: &[u8], ctx: Option<u32>, want: u32) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let out = bpf.test_run(prog, frame, ctx, REPEAT).expect("test_run");
            assert_eq!(out.verdict, want, "{prog:?}: unexpected verdict");
            out.per_run.as_nanos() as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn test_run_costs() -> Vec<(String, f64)> {
    let mut bpf = common::load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let a = FlowKey { src: v4([10, 99, 0, 1], 4000), dst: v4([10, 99, 0, 2], MEDIA_PORT), ssrc: 0x1111 };
    let b = FlowKey { src: v4([10, 99, 0, 3], 4001), dst: v4([10, 99, 0, 4], MEDIA_PORT), ssrc: 0x2222 };
    let frame = |k: &FlowKey, payload: Vec<u8>| Frame4::new(k.src, k.dst, payload).build();
    let media = frame(&a, rtp(96, 1, 160, a.ssrc, PAYLOAD));
    let mut other = Frame4::new(a.src, a.dst, rtp(96, 1, 160, a.ssrc, PAYLOAD));
    other.dst.set_port(53);
    let other = other.build();

    let mut out = Vec::new();
    out.push(("guard: not a media port".to_owned(), median_ns(&bpf, TestProgram::Guard, &other, None, xdp_verdict::PASS)));
    out.push(("guard: valid media packet".to_owned(), median_ns(&bpf, TestProgram::Guard, &media, None, xdp_verdict::PASS)));
    bpf.guard().set_rate_limit(Some(RateLimit { packets_per_second: u32::MAX, burst: u32::MAX })).unwrap();
    out.push(("guard: valid media packet + rate limiter".to_owned(), median_ns(&bpf, TestProgram::Guard, &media, None, xdp_verdict::PASS)));
    let mut truncated = media.clone();
    truncated.truncate(60);
    out.push(("guard: truncated media packet (drop)".to_owned(), median_ns(&bpf, TestProgram::Guard, &truncated, None, xdp_verdict::DROP)));
    bpf.guard().set_rate_limit(None).unwrap();

    // Two entries that rewrite into each other, so that every repetition
    // (which sees the previous one's output) does the full rewrite.
    let dest_to = |k: &FlowKey, ifindex: u32| Destination {
        dst: k.dst,
        src: k.src,
        ssrc: k.ssrc,
        seq_offset: 1,
        ts_offset: 160,
        ifindex,
        dst_mac: [2, 0, 0, 0, 0, 1],
        src_mac: [2, 0, 0, 0, 0, 2],
    };
    for (ifindex, verdict, label) in [(1, xdp_verdict::TX, "XDP_TX"), (7777, xdp_verdict::REDIRECT, "XDP_REDIRECT verdict")] {
        bpf.flows().insert(a, &FlowEntry { destinations: vec![dest_to(&b, ifindex)], sample_every: 0 }).unwrap();
        bpf.flows().insert(b, &FlowEntry { destinations: vec![dest_to(&a, ifindex)], sample_every: 0 }).unwrap();
        out.push((format!("guard+forward: rewrite + {label}"), median_ns(&bpf, TestProgram::Xdp, &media, Some(1), verdict)));
    }
    out.push(("guard+forward: unknown flow (pass)".to_owned(), median_ns(&bpf, TestProgram::Xdp, &frame(&v4_key(), rtp(96, 1, 160, 9, PAYLOAD)), Some(1), xdp_verdict::PASS)));
    out.push(("guard+forward: RTCP on a forwarded flow (pass)".to_owned(), median_ns(&bpf, TestProgram::Xdp, &frame(&a, rtcp_sr(a.ssrc)), Some(1), xdp_verdict::PASS)));

    // TC 1 -> 2: one clone (really sent, to lo of a private namespace) and
    // one redirect verdict per packet.
    let junk = Destination { dst: v4([10, 99, 9, 9], 9), ..dest_to(&a, 1) };
    bpf.flows().insert(a, &FlowEntry { destinations: vec![junk, dest_to(&b, 1)], sample_every: 0 }).unwrap();
    bpf.flows().insert(b, &FlowEntry { destinations: vec![junk, dest_to(&a, 1)], sample_every: 0 }).unwrap();
    let ns = Netns::new("bench-tc");
    let tc = ns.enter(|| median_ns(&bpf, TestProgram::Fanout, &media, None, tc_verdict::REDIRECT));
    out.push(("tc fan-out 1->2: 2 rewrites + clone + redirect".to_owned(), tc));
    out
}

fn v4_key() -> FlowKey {
    FlowKey { src: v4([10, 99, 5, 5], 4000), dst: v4([10, 99, 0, 2], MEDIA_PORT), ssrc: 9 }
}

// ---- 2. live ---------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Userspace,
}

#[derive(Debug)]
struct LiveResult {
    path: &'static str,
    sent_pps: f64,
    forwarded_pps: f64,
    received_pps: f64,
    b_ns_per_packet: f64,
    per_core_pps: f64,
    mode: AttachMode,
}

impl LiveResult {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "sent_pps": self.sent_pps,
            "b_forwarded_pps": self.forwarded_pps,
            "c_received_pps": self.received_pps,
            "b_cpu_ns_per_packet": self.b_ns_per_packet,
            "pps_per_b_core": self.per_core_pps,
            "xdp_mode": self.mode.as_str(),
        })
    }
}

fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// CPU time (ns) a thread or process has run, from schedstat.
fn cpu_ns(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The threaded-NAPI kernel thread of `iface` (named `napi/<iface>-<id>`).
fn napi_thread(iface: &str) -> i32 {
    let prefix = format!("napi/{iface}-");
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim().starts_with(&prefix)) {
            return pid;
        }
    }
    panic!("no NAPI thread for {iface}");
}

fn live(path: Path, duration: Duration) -> LiveResult {
    let tag = if path == Path::Kernel { "k" } else { "u" };
    let a = Netns::new(&format!("bench-{tag}a"));
    let b = Netns::new(&format!("bench-{tag}b"));
    let c = Netns::new(&format!("bench-{tag}c"));
    let (a0, b0, b1, c0) = ("kpa0", "kpb0", "kpb1", "kpc0");
    common::veth(&a, a0, "10.77.1.1/24", &b, b0, "10.77.1.2/24");
    common::veth(&b, b1, "10.77.2.2/24", &c, c0, "10.77.2.1/24");
    // Real NICs offload transmit checksums; only the sender must put real
    // ones on the "wire" for the XDP path's incremental updates.
    b.exec(&["ethtool", "-K", b1, "tx", "on"]);
    for (ns, iface) in [(&b, b0), (&c, c0)] {
        ns.exec(&["ethtool", "-K", iface, "gro", "on"]);
        ns.exec(&["sh", "-c", &format!("echo 1 > /sys/class/net/{iface}/threaded")]);
    }

    let mut bpf = common::load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let mode = b.enter(|| bpf.attach_xdp(b0, XdpProgram::GuardAndForward));
    let c_mode = c.enter(|| bpf.attach_xdp(c0, XdpProgram::Guard));
    assert_eq!((mode, c_mode), (AttachMode::Native, AttachMode::Native));

    let b_napi = napi_thread(b0);
    let c_napi = napi_thread(c0);
    let mut cpu0 = nix::sched::CpuSet::new();
    cpu0.set(0).unwrap();
    let mut cpu1 = nix::sched::CpuSet::new();
    cpu1.set(1).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(b_napi), &cpu0).expect("pin B's NAPI thread");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(c_napi), &cpu1).expect("pin C's NAPI thread");

    let key = FlowKey { src: v4([10, 77, 1, 1], 4000), dst: v4([10, 77, 1, 2], MEDIA_PORT), ssrc: 0x5555 };
    let (b1_index, b1_mac) = b.link(b1);
    let (_, c0_mac) = c.link(c0);
    let dest = Destination {
        dst: v4([10, 77, 2, 1], 6000),
        src: v4([10, 77, 2, 2], MEDIA_PORT),
        ssrc: 0x6666,
        seq_offset: 1000,
        ts_offset: 90_000,
        ifindex: b1_index,
        dst_mac: c0_mac,
        src_mac: b1_mac,
    };
    if path == Path::Kernel {
        bpf.flows().insert(key, &FlowEntry { destinations: vec![dest], sample_every: 0 }).unwrap();
    }

    let opts = SocketOptions { recv_buffer_size: Some(4 << 20), send_buffer_size: Some(4 << 20), gso: false, ..SocketOptions::default() };
    let mut sender = a.enter(|| MmsgIo::bind(SocketAddr::V4(key.src), &opts).expect("bind sender"));
    let mut receiver = c.enter(|| MmsgIo::bind(SocketAddr::V4(dest.dst), &opts).expect("bind receiver"));
    let relay = (path == Path::Userspace)
        .then(|| b.enter(|| MmsgIo::bind(SocketAddr::from(([0, 0, 0, 0], MEDIA_PORT)), &opts).expect("bind relay")));

    // Warm-up: ARP for B, and the receiver path.
    let probe = rtp(96, 0, 0, key.ssrc, PAYLOAD);
    let _ = sender.send(&[Transmit { destination: SocketAddr::V4(key.dst), contents: &probe, segment_size: None }]);
    thread::sleep(Duration::from_millis(100));

    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let relayed = AtomicU64::new(0);
    let relay_cpu = AtomicU64::new(0);
    let fwd_before = bpf.flows().counters(key).unwrap().map_or(0, |c| c.packets);
    let napi_path = format!("/proc/{b_napi}/schedstat");

    let (napi_ns, elapsed) = thread::scope(|s| {
        s.spawn(|| {
            pin(1);
            let mut bufs = vec![[0u8; 2048]; 64];
            let mut meta = vec![RecvMeta::default(); 64];
            while !stop.load(Ordering::Relaxed) {
                let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
                match receiver.recv(&mut slices, &mut meta) {
                    Ok(0) | Err(_) => thread::sleep(Duration::from_micros(50)),
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        });
        if let Some(mut relay) = relay {
            let (stop, relayed, relay_cpu) = (&stop, &relayed, &relay_cpu);
            s.spawn(move || {
                pin(0);
                let start = cpu_ns("/proc/thread-self/schedstat");
                let mut bufs = vec![[0u8; 2048]; 64];
                let mut meta = vec![RecvMeta::default(); 64];
                let to = SocketAddr::V4(dest.dst);
                while !stop.load(Ordering::Relaxed) {
                    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
                    let n = match relay.recv(&mut slices, &mut meta) {
                        Ok(0) | Err(_) => {
                            thread::sleep(Duration::from_micros(50));
                            continue;
                        }
                        Ok(n) => n,
                    };
                    // The same header work as the kernel path: SSRC, seq, ts.
                    for (buf, m) in bufs.iter_mut().zip(&meta).take(n) {
                        if m.len >= 12 {
                            let seq = u16::from_be_bytes([buf[2], buf[3]]).wrapping_add(dest.seq_offset);
                            buf[2..4].copy_from_slice(&seq.to_be_bytes());
                            let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]).wrapping_add(dest.ts_offset);
                            buf[4..8].copy_from_slice(&ts.to_be_bytes());
                            buf[8..12].copy_from_slice(&dest.ssrc.to_be_bytes());
                        }
                    }
                    let tx: Vec<Transmit<'_>> = bufs
                        .iter()
                        .zip(&meta)
                        .take(n)
                        .map(|(b, m)| Transmit { destination: to, contents: &b[..m.len], segment_size: None })
                        .collect();
                    let mut done = 0;
                    while done < tx.len() && !stop.load(Ordering::Relaxed) {
                        match relay.send(&tx[done..]) {
                            Ok(k) => done += k,
                            Err(_) => break,
                        }
                    }
                    relayed.fetch_add(done as u64, Ordering::Relaxed);
                }
                relay_cpu.store(cpu_ns("/proc/thread-self/schedstat") - start, Ordering::Relaxed);
            });
        }
        thread::sleep(Duration::from_millis(50));
        let napi_start = cpu_ns(&napi_path);
        let start = Instant::now();
        let (sent, sender) = (&sent, &mut sender);
        let sender_thread = s.spawn(move || {
            pin(1);
            let packets: Vec<Vec<u8>> = (0..64u16).map(|i| rtp(96, i, 0, key.ssrc, PAYLOAD)).collect();
            let to = SocketAddr::V4(key.dst);
            let batch: Vec<Transmit<'_>> =
                packets.iter().map(|p| Transmit { destination: to, contents: p, segment_size: None }).collect();
            while start.elapsed() < duration {
                if let Ok(k) = sender.send(&batch) {
                    sent.fetch_add(k as u64, Ordering::Relaxed);
                }
            }
        });
        sender_thread.join().unwrap();
        let elapsed = start.elapsed();
        let napi_ns = cpu_ns(&napi_path) - napi_start;
        thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        (napi_ns, elapsed)
    });

    let secs = elapsed.as_secs_f64();
    let forwarded = match path {
        Path::Kernel => bpf.flows().counters(key).unwrap().map_or(0, |c| c.packets) - fwd_before,
        Path::Userspace => relayed.load(Ordering::Relaxed),
    };
    let b_cpu = napi_ns + relay_cpu.load(Ordering::Relaxed);
    let b_ns_per_packet = b_cpu as f64 / forwarded.max(1) as f64;
    LiveResult {
        path: if path == Path::Kernel { "kernel" } else { "userspace" },
        sent_pps: sent.load(Ordering::Relaxed) as f64 / secs,
        forwarded_pps: forwarded as f64 / secs,
        received_pps: received.load(Ordering::Relaxed) as f64 / secs,
        b_ns_per_packet,
        per_core_pps: 1e9 / b_ns_per_packet,
        mode,
    }
}
