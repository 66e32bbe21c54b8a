//! Rough loopback throughput of each backend, one thread alternating send
//! and receive: `cargo run --release -p ridge-io --example loopback_flood`.

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

fn main() {
    use BackendChoice::{Mmsg, Uring};
    let uring = match probe_uring() {
        Ok(()) => true,
        Err(e) => {
            println!("uring skipped: {e}");
            false
        }
    };
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
