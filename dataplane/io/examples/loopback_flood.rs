//! Rough loopback throughput of each backend, one thread alternating send
//! and receive: `cargo run --release -p ridge-io --example loopback_flood`.
//!
//! `-- --gro`: GSO runs instead (8 transmits of 16 × 1200 B per send, from an
//! mmsg socket), received by each backend with `UDP_GRO` off and on; prints
//! datagrams/s, receive buffers per datagram and the time spent in `recv`
//! per datagram.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use ridge_io::{BackendChoice, RecvMeta, SocketOptions, Transmit, bind, probe_uring};

fn run(tx: BackendChoice, rx: BackendChoice, size: usize, ring_sends: bool) {
    let opts = SocketOptions {
        recv_buffer_size: Some(8 << 20),
        send_buffer_size: Some(8 << 20),
        uring_ring_sends: ring_sends,
        ..SocketOptions::default()
    };
    let addr = "127.0.0.1:0".parse().unwrap();
    let mut a = bind(addr, tx, &opts).expect("bind");
    let mut b = bind(addr, rx, &opts).expect("bind");
    let payload = vec![0x5au8; size];
    let batch = vec![
        Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &payload,
            segment_size: None,
        };
        32
    ];
    let mut storage = vec![vec![0u8; 2048]; 64];
    let mut meta = vec![RecvMeta::default(); 64];
    let (mut sent, mut received) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        sent += a.send(&batch).expect("send") as u64;
        loop {
            let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|b| b.as_mut_slice()).collect();
            let n = b.recv(&mut bufs, &mut meta).expect("recv");
            received += n as u64;
            if n == 0 {
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:?}{} -> {:?} {size:>4} B: sent {:>8.0}/s received {:>8.0}/s ({:.1}% lost in the socket queue) {:?}",
        a.backend(),
        if ring_sends { " (ring sends)" } else { "" },
        b.backend(),
        sent as f64 / secs,
        received as f64 / secs,
        100.0 * (sent - received.min(sent)) as f64 / sent.max(1) as f64,
        b.stats(),
    );
}

/// GSO runs from an mmsg sender to `rx` with GRO `gro`, for two seconds.
fn run_gro(rx: BackendChoice, gro: bool) {
    const SEGMENT: usize = 1200;
    const SEGMENTS: usize = 16;
    let opts = SocketOptions {
        recv_buffer_size: Some(8 << 20),
        send_buffer_size: Some(8 << 20),
        gro,
        ..SocketOptions::default()
    };
    let addr = "127.0.0.1:0".parse().unwrap();
    let mut a = bind(addr, BackendChoice::Mmsg, &opts).expect("bind");
    let mut b = bind(addr, rx, &opts).expect("bind");
    let payload = vec![0x5au8; SEGMENT * SEGMENTS];
    let batch = vec![
        Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &payload,
            segment_size: Some(SEGMENT as u16),
        };
        8
    ];
    let mut storage = vec![vec![0u8; 1 << 16]; 64];
    let mut meta = vec![RecvMeta::default(); 64];
    let (mut sent, mut received, mut buffers) = (0u64, 0u64, 0u64);
    let mut in_recv = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        sent += SEGMENTS as u64 * a.send(&batch).expect("send") as u64;
        let t = Instant::now();
        loop {
            let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|b| b.as_mut_slice()).collect();
            let n = b.recv(&mut bufs, &mut meta).expect("recv");
            for m in &meta[..n] {
                buffers += 1;
                received += match m.gro_segment {
                    Some(s) => m.len.div_ceil(usize::from(s).max(1)) as u64,
                    None => 1,
                };
            }
            if n == 0 {
                break;
            }
        }
        in_recv += t.elapsed();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "Mmsg (GSO {SEGMENTS} x {SEGMENT} B) -> {:?} gro {}: sent {:>8.0}/s received {:>8.0}/s ({:.1}% lost), {:.3} buffers/datagram, {:.0} ns in recv per datagram {:?}",
        b.backend(),
        if gro { "on " } else { "off" },
        sent as f64 / secs,
        received as f64 / secs,
        100.0 * (sent - received.min(sent)) as f64 / sent.max(1) as f64,
        buffers as f64 / received.max(1) as f64,
        in_recv.as_nanos() as f64 / received.max(1) as f64,
        b.stats(),
    );
}

fn main() {
    use BackendChoice::{Mmsg, Uring};
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: loopback_flood [--gro]\n  (no option) plain datagrams, every backend pair\n  --gro       GSO runs to each backend with UDP_GRO off and on"
        );
        return;
    }
    let gro = args.iter().any(|a| a == "--gro");
    let uring = match probe_uring() {
        Ok(()) => true,
        Err(e) => {
            println!("uring skipped: {e}");
            false
        }
    };
    if gro {
        for rx in [Mmsg, Uring] {
            if rx == Uring && !uring {
                continue;
            }
            run_gro(rx, false);
            run_gro(rx, true);
        }
        return;
    }
    for size in [100, 1200] {
        run(Mmsg, Mmsg, size, false);
        if uring {
            run(Uring, Uring, size, false);
            run(Uring, Uring, size, true);
            run(Uring, Mmsg, size, true);
            run(Mmsg, Uring, size, false);
        }
    }
}
