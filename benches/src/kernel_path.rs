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
//! ridge-bench kernel-path [--duration 3] [--json FILE]
//! ```
//!
//! Needs root; prints a table and then one JSON object.
//! `KERNEL_PATH_DEBUG=1` also prints the programs' counters after each path.
#![allow(clippy::print_stdout)] // a command-line report

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{self, Frame4, Netns, rtcp_sr, rtp, v4};
use ridge_ebpf::{
    AttachMode, Destination, FlowEntry, FlowKey, RateLimit, RidgeBpf, TestProgram, XdpProgram,
    tc_verdict, xdp_verdict,
};
use ridge_io::{DatagramIo, MmsgIo, RecvMeta, SocketOptions, Transmit};

const MEDIA_PORT: u16 = 5004;
const PAYLOAD: usize = 160; // RTP payload bytes: 20 ms of G.711
const REPEAT: u32 = 1_000_000;

/// Runs both measurements, prints the tables and the JSON object, and
/// writes the JSON to `json_path` when given.
pub fn run(seconds: f64, json_path: Option<&std::path::Path>) -> anyhow::Result<()> {
    if let Err(e) = common::netns_tools() {
        anyhow::bail!("kernel-path needs root and iproute2: {e}");
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
    println!(
        "== B forwarding b0 -> b1 -> C on veth, {seconds} s per path, {PAYLOAD} B RTP payload"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>15}",
        "path", "injected", "B fwd", "C recv", "B ns/pkt", "pps per B core"
    );
    for r in [&userspace, &kernel] {
        println!(
            "{:<10} {:>10} {:>10} {:>10} {:>10.0} {:>15.0}",
            r.path, r.injected, r.forwarded, r.received, r.b_ns_per_packet, r.per_core_pps
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
    if let Some(path) = json_path {
        std::fs::write(path, format!("{json:#}\n"))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(())
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
    let a = FlowKey {
        src: v4([10, 99, 0, 1], 4000),
        dst: v4([10, 99, 0, 2], MEDIA_PORT),
        ssrc: 0x1111,
    };
    let b = FlowKey {
        src: v4([10, 99, 0, 3], 4001),
        dst: v4([10, 99, 0, 4], MEDIA_PORT),
        ssrc: 0x2222,
    };
    let frame = |k: &FlowKey, payload: Vec<u8>| Frame4::new(k.src, k.dst, payload).build();
    let media = frame(&a, rtp(96, 1, 160, a.ssrc, PAYLOAD));
    let mut other = Frame4::new(a.src, a.dst, rtp(96, 1, 160, a.ssrc, PAYLOAD));
    other.dst.set_port(53);
    let other = other.build();

    let mut out = Vec::new();
    out.push((
        "guard: not a media port".to_owned(),
        median_ns(&bpf, TestProgram::Guard, &other, None, xdp_verdict::PASS),
    ));
    out.push((
        "guard: valid media packet".to_owned(),
        median_ns(&bpf, TestProgram::Guard, &media, None, xdp_verdict::PASS),
    ));
    bpf.guard()
        .set_rate_limit(Some(RateLimit {
            packets_per_second: u32::MAX,
            burst: u32::MAX,
        }))
        .unwrap();
    out.push((
        "guard: valid media packet + rate limiter".to_owned(),
        median_ns(&bpf, TestProgram::Guard, &media, None, xdp_verdict::PASS),
    ));
    let mut truncated = media.clone();
    truncated.truncate(60);
    out.push((
        "guard: truncated media packet (drop)".to_owned(),
        median_ns(
            &bpf,
            TestProgram::Guard,
            &truncated,
            None,
            xdp_verdict::DROP,
        ),
    ));
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
    for (ifindex, verdict, label) in [
        (1, xdp_verdict::TX, "XDP_TX"),
        (7777, xdp_verdict::REDIRECT, "XDP_REDIRECT verdict"),
    ] {
        bpf.flows()
            .insert(
                a,
                &FlowEntry {
                    destinations: vec![dest_to(&b, ifindex)],
                    sample_every: 0,
                },
            )
            .unwrap();
        bpf.flows()
            .insert(
                b,
                &FlowEntry {
                    destinations: vec![dest_to(&a, ifindex)],
                    sample_every: 0,
                },
            )
            .unwrap();
        out.push((
            format!("guard+forward: rewrite + {label}"),
            median_ns(&bpf, TestProgram::Xdp, &media, Some(1), verdict),
        ));
    }
    out.push((
        "guard+forward: unknown flow (pass)".to_owned(),
        median_ns(
            &bpf,
            TestProgram::Xdp,
            &frame(&v4_key(), rtp(96, 1, 160, 9, PAYLOAD)),
            Some(1),
            xdp_verdict::PASS,
        ),
    ));
    out.push((
        "guard+forward: RTCP on a forwarded flow (pass)".to_owned(),
        median_ns(
            &bpf,
            TestProgram::Xdp,
            &frame(&a, rtcp_sr(a.ssrc)),
            Some(1),
            xdp_verdict::PASS,
        ),
    ));

    // TC 1 -> 2: one clone (really sent, to lo of a private namespace) and
    // one redirect verdict per packet.
    let junk = Destination {
        dst: v4([10, 99, 9, 9], 9),
        ..dest_to(&a, 1)
    };
    bpf.flows()
        .insert(
            a,
            &FlowEntry {
                destinations: vec![junk, dest_to(&b, 1)],
                sample_every: 0,
            },
        )
        .unwrap();
    bpf.flows()
        .insert(
            b,
            &FlowEntry {
                destinations: vec![junk, dest_to(&a, 1)],
                sample_every: 0,
            },
        )
        .unwrap();
    let ns = Netns::new("bench-tc");
    let tc = ns.enter(|| {
        median_ns(
            &bpf,
            TestProgram::Fanout,
            &media,
            None,
            tc_verdict::REDIRECT,
        )
    });
    out.push((
        "tc fan-out 1->2: 2 rewrites + clone + redirect".to_owned(),
        tc,
    ));
    out
}

fn v4_key() -> FlowKey {
    FlowKey {
        src: v4([10, 99, 5, 5], 4000),
        dst: v4([10, 99, 0, 2], MEDIA_PORT),
        ssrc: 9,
    }
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
    injected: u64,
    forwarded: u64,
    received: u64,
    b_ns_per_packet: f64,
    per_core_pps: f64,
    mode: AttachMode,
}

impl LiveResult {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "injected": self.injected,
            "b_forwarded": self.forwarded,
            "c_received": self.received,
            "b_cpu_ns_per_packet": self.b_ns_per_packet,
            "pps_per_b_core": self.per_core_pps,
            "xdp_mode": self.mode.as_str(),
        })
    }
}

/// The threaded-NAPI kernel thread of `iface` (named `napi/<iface>-<id>`).
fn napi_thread(iface: &str) -> i32 {
    let prefix = format!("napi/{iface}-");
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim().starts_with(&prefix))
        {
            return pid;
        }
    }
    panic!("no NAPI thread for {iface}");
}

fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// CPU time (ns) the calling thread has run, from schedstat.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// B receives on b0 and forwards to C through b1. Packets enter B's b0 from
/// a live-frames XDP test run on CPU 0 (the packet generator; it costs what
/// a driver's receive would), which runs `ridge_xdp`:
/// - kernel path: the flow is installed, so `ridge_xdp` rewrites it and
///   redirects it out of b1; B's cost is the injector's time per packet.
/// - userspace path: no flow entry, so `ridge_xdp` passes it up B's stack
///   to a relay thread (also on CPU 0: `recvmmsg`, rewrite, `sendmmsg` out
///   of b1); B's cost is the injector's time plus the relay's CPU time.
///
/// C counts what arrives (CPU 1).
fn live(path: Path, duration: Duration) -> LiveResult {
    const CHUNK: u32 = 256;
    let tag = if path == Path::Kernel { "k" } else { "u" };
    let a = Netns::new(&format!("bench-{tag}a"));
    let b = Netns::new(&format!("bench-{tag}b"));
    let c = Netns::new(&format!("bench-{tag}c"));
    let (a0, b0, b1, c0) = ("kpa0", "kpb0", "kpb1", "kpc0");
    common::veth(&a, a0, "10.77.1.1/24", &b, b0, "10.77.1.2/24");
    common::veth(&b, b1, "10.77.2.2/24", &c, c0, "10.77.2.1/24");
    // Real NICs offload transmit checksums.
    b.exec(&["ethtool", "-K", b1, "tx", "on"]);

    let mut bpf = common::load();
    bpf.guard().set_media_ports(&[MEDIA_PORT]).unwrap();
    let mode = b.enter(|| bpf.attach_xdp(b0, XdpProgram::GuardAndForward));
    // A veth takes redirected frames only when its peer runs XDP.
    let c_mode = c.enter(|| bpf.attach_xdp(c0, XdpProgram::Guard));
    assert_eq!((mode, c_mode), (AttachMode::Native, AttachMode::Native));
    // C's receive work runs in its own NAPI thread on CPU 1, not in the
    // softirq of whoever sent to it (which would charge it to B).
    c.exec(&[
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{c0}/threaded"),
    ]);
    let mut cpu1 = nix::sched::CpuSet::new();
    cpu1.set(1).expect("CPU 1");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(napi_thread(c0)), &cpu1)
        .expect("pin C's NAPI thread");

    let key = FlowKey {
        src: v4([10, 77, 1, 1], 4000),
        dst: v4([10, 77, 1, 2], MEDIA_PORT),
        ssrc: 0x5555,
    };
    let (b0_index, b0_mac) = b.link(b0);
    let (_, a0_mac) = a.link(a0);
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
        bpf.flows()
            .insert(
                key,
                &FlowEntry {
                    destinations: vec![dest],
                    sample_every: 0,
                },
            )
            .unwrap();
        // Live-mode frames are recycled with the program's modifications
        // (the kernel does not copy the input again), so a recycled frame
        // already carries C's addresses. Two more entries keep those
        // forwarded to C too (rewriting SSRC, seq, ts, MACs, TTL; the
        // addresses and ports are already C's), so no frame is wasted.
        bpf.guard().add_media_port(dest.dst.port()).unwrap();
        for (from, to) in [(dest.ssrc, 0x7777), (0x7777, dest.ssrc)] {
            let k = FlowKey {
                src: dest.src,
                dst: dest.dst,
                ssrc: from,
            };
            let d = Destination { ssrc: to, ..dest };
            bpf.flows()
                .insert(
                    k,
                    &FlowEntry {
                        destinations: vec![d],
                        sample_every: 0,
                    },
                )
                .unwrap();
        }
    }
    let mut frame = Frame4::new(key.src, key.dst, rtp(96, 7, 160, key.ssrc, PAYLOAD)).build();
    frame[0..6].copy_from_slice(&b0_mac);
    frame[6..12].copy_from_slice(&a0_mac);

    let opts = SocketOptions {
        recv_buffer_size: Some(4 << 20),
        send_buffer_size: Some(4 << 20),
        gso: false,
        ..SocketOptions::default()
    };
    let mut receiver =
        c.enter(|| MmsgIo::bind(SocketAddr::V4(dest.dst), &opts).expect("bind receiver"));
    let relay = (path == Path::Userspace).then(|| {
        b.enter(|| {
            MmsgIo::bind(SocketAddr::from(([0, 0, 0, 0], MEDIA_PORT)), &opts).expect("bind relay")
        })
    });

    let stop = AtomicBool::new(false);
    let received = AtomicU64::new(0);
    let relayed = AtomicU64::new(0);
    let relay_cpu = AtomicU64::new(0);

    let (inject_ns, injected) = thread::scope(|s| {
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
                let start = thread_cpu_ns();
                let mut bufs = vec![[0u8; 2048]; 64];
                let mut meta = vec![RecvMeta::default(); 64];
                let to = SocketAddr::V4(dest.dst);
                while !stop.load(Ordering::Relaxed) {
                    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
                    let n = match relay.recv(&mut slices, &mut meta) {
                        Ok(0) | Err(_) => {
                            thread::sleep(Duration::from_micros(20));
                            continue;
                        }
                        Ok(n) => n,
                    };
                    // The same header work as the kernel path: SSRC, seq, ts.
                    for (buf, m) in bufs.iter_mut().zip(&meta).take(n) {
                        if m.len >= 12 {
                            let seq =
                                u16::from_be_bytes([buf[2], buf[3]]).wrapping_add(dest.seq_offset);
                            buf[2..4].copy_from_slice(&seq.to_be_bytes());
                            let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]])
                                .wrapping_add(dest.ts_offset);
                            buf[4..8].copy_from_slice(&ts.to_be_bytes());
                            buf[8..12].copy_from_slice(&dest.ssrc.to_be_bytes());
                        }
                    }
                    let tx: Vec<Transmit<'_>> = bufs
                        .iter()
                        .zip(&meta)
                        .take(n)
                        .map(|(b, m)| Transmit::new(to, &b[..m.len]))
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
                relay_cpu.store(thread_cpu_ns() - start, Ordering::Relaxed);
            });
        }
        // The generator, in B's namespace on CPU 0. For the userspace path
        // it waits (sleeping) after each chunk until the relay has caught
        // up, so that the socket never overflows and the relay gets the CPU.
        let result = b.enter(|| {
            pin(0);
            // Warm-up (ARP for C on the userspace path).
            bpf.inject_live(XdpProgram::GuardAndForward, &frame, b0_index, 64, 64)
                .expect("inject");
            thread::sleep(Duration::from_millis(100));
            let base = relayed.load(Ordering::Relaxed);
            let (mut ns, mut injected) = (0f64, 0u64);
            let start = Instant::now();
            while start.elapsed() < duration {
                let per = bpf
                    .inject_live(XdpProgram::GuardAndForward, &frame, b0_index, CHUNK, 64)
                    .expect("inject");
                ns += per.as_nanos() as f64 * f64::from(CHUNK);
                injected += u64::from(CHUNK);
                if path == Path::Userspace {
                    let wait = Instant::now();
                    while relayed.load(Ordering::Relaxed) - base < injected
                        && wait.elapsed() < Duration::from_millis(20)
                    {
                        thread::sleep(Duration::from_micros(50));
                    }
                }
            }
            (ns, injected)
        });
        thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        result
    });

    if std::env::var_os("KERNEL_PATH_DEBUG").is_some() {
        eprintln!(
            "{path:?}: {:?} flow {:?}",
            bpf.counters().unwrap(),
            bpf.flows().counters(key).unwrap()
        );
    }
    let warmup = 64;
    let forwarded = match path {
        Path::Kernel => bpf
            .flows()
            .list()
            .unwrap()
            .iter()
            .map(|(_, c)| c.packets)
            .sum::<u64>()
            .saturating_sub(warmup),
        Path::Userspace => relayed.load(Ordering::Relaxed).saturating_sub(warmup),
    };
    let b_cpu = inject_ns + relay_cpu.load(Ordering::Relaxed) as f64;
    let b_ns_per_packet = b_cpu / forwarded.max(1) as f64;
    LiveResult {
        path: if path == Path::Kernel {
            "kernel"
        } else {
            "userspace"
        },
        injected,
        forwarded,
        received: received.load(Ordering::Relaxed).saturating_sub(warmup),
        b_ns_per_packet,
        per_core_pps: 1e9 / b_ns_per_packet,
        mode,
    }
}
