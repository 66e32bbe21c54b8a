//! The same behavioural suite for both backends. uring tests are skipped,
//! with a printed reason, when `probe_uring` fails; with
//! `RIDGE_REQUIRE_ALL=1` a skip is a failure.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use ridge_io::{
    Backend, BackendChoice, DatagramIo, RecvMeta, SocketOptions, Transmit, bind, probe_uring,
};

type Io = Box<dyn DatagramIo + Send>;

fn skip(reason: &str) {
    if std::env::var("RIDGE_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("RIDGE_REQUIRE_ALL=1 but this test would be skipped: {reason}");
    }
    println!("SKIPPED: {reason}");
}

fn open_with(choice: BackendChoice, addr: &str, opts: &SocketOptions) -> Option<Io> {
    if choice == BackendChoice::Uring
        && let Err(e) = probe_uring()
    {
        skip(&format!("io_uring backend: {e}"));
        return None;
    }
    let io = bind(addr.parse().unwrap(), choice, opts).expect("bind");
    let want = match choice {
        BackendChoice::Uring => Some(Backend::Uring),
        BackendChoice::Mmsg => Some(Backend::Mmsg),
        BackendChoice::Auto => None,
    };
    if let Some(want) = want {
        assert_eq!(io.backend(), want);
    }
    Some(io)
}

thread_local! {
    /// Set by the `uring_ring_sends` copy of the suite: uring sockets send
    /// through the ring instead of sendmmsg.
    static RING_SENDS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn open(choice: BackendChoice) -> Option<Io> {
    let opts = SocketOptions {
        recv_buffer_size: Some(4 << 20),
        uring_ring_sends: RING_SENDS.with(|r| r.get()),
        ..SocketOptions::default()
    };
    open_with(choice, "127.0.0.1:0", &opts)
}

fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    rc > 0
}

/// Receives until `count` datagrams arrived or `timeout` passed.
fn recv_n(
    io: &mut Io,
    count: usize,
    buf_size: usize,
    timeout: Duration,
) -> Vec<(Vec<u8>, RecvMeta)> {
    let deadline = Instant::now() + timeout;
    let mut storage = vec![vec![0u8; buf_size]; 16];
    let mut meta = [RecvMeta::default(); 16];
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|b| b.as_mut_slice()).collect();
        let n = io.recv(&mut bufs, &mut meta).expect("recv");
        for (buf, m) in bufs.iter().zip(&meta).take(n) {
            out.push((buf[..m.len].to_vec(), *m));
        }
        if n == 0 {
            wait_readable(io.raw_fd(), Duration::from_millis(20));
        }
    }
    out
}

/// Sends everything, retrying the tail the kernel did not take.
fn send_all(io: &mut Io, batch: &[Transmit<'_>]) {
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while done < batch.len() {
        assert!(Instant::now() < deadline, "send made no progress");
        done += io.send(&batch[done..]).expect("send");
    }
}

fn payload(i: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|k| (k as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    p[..4].copy_from_slice(&i.to_be_bytes());
    p
}

fn round_trip_1000(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let dst = b.local_addr();
    let payloads: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| payload(i, 4 + (i as usize * 37) % 1400))
        .collect();
    let mut got = BTreeMap::new();
    for chunk in payloads.chunks(50) {
        let batch: Vec<Transmit<'_>> = chunk
            .iter()
            .map(|p| Transmit {
                prefix: &[],
                suffix: &[],
                destination: dst,
                contents: p,
                segment_size: None,
            })
            .collect();
        send_all(&mut a, &batch);
        for (data, meta) in recv_n(&mut b, chunk.len(), 2048, Duration::from_secs(5)) {
            assert_eq!(meta.source, a.local_addr());
            assert!(!meta.truncated);
            assert_eq!(meta.gro_segment, None);
            let i = u32::from_be_bytes(data[..4].try_into().unwrap());
            assert!(got.insert(i, data).is_none(), "duplicate datagram {i}");
        }
    }
    assert_eq!(got.len(), 1000);
    for (i, data) in got {
        assert_eq!(data, payloads[i as usize], "datagram {i} corrupted");
    }
}

fn ipv6_round_trip(choice: BackendChoice) {
    let opts = SocketOptions::default();
    let Some(mut a) = open_with(choice, "[::1]:0", &opts) else {
        return;
    };
    let Some(mut b) = open_with(choice, "[::]:0", &opts) else {
        return;
    };
    let dst: SocketAddr = format!("[::1]:{}", b.local_addr().port()).parse().unwrap();
    let data = payload(7, 300);
    send_all(
        &mut a,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: dst,
            contents: &data,
            segment_size: None,
        }],
    );
    let got = recv_n(&mut b, 1, 2048, Duration::from_secs(2));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, data);
    assert_eq!(got[0].1.source, a.local_addr());
    // An IPv4 destination on a dual-stack IPv6 socket goes out v4-mapped.
    let Some(mut v4) = open(choice) else { return };
    send_all(
        &mut b,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: v4.local_addr(),
            contents: &data,
            segment_size: None,
        }],
    );
    let got = recv_n(&mut v4, 1, 2048, Duration::from_secs(2));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, data);
}

fn truncation(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let sizes = [1500usize, 100, 3000, 50];
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| payload(i as u32, n))
        .collect();
    let batch: Vec<Transmit<'_>> = payloads
        .iter()
        .map(|p| Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: p,
            segment_size: None,
        })
        .collect();
    send_all(&mut a, &batch);
    let got = recv_n(&mut b, 4, 1000, Duration::from_secs(2));
    assert_eq!(got.len(), 4);
    for ((data, meta), p) in got.iter().zip(&payloads) {
        let truncated = p.len() > 1000;
        assert_eq!(meta.truncated, truncated, "size {}", p.len());
        assert!(meta.len <= 1000);
        assert_eq!(&data[..], &p[..meta.len]);
        if !truncated {
            assert_eq!(meta.len, p.len());
        }
    }
}

fn empty_recv(choice: BackendChoice) {
    let Some(mut b) = open(choice) else { return };
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    let start = Instant::now();
    for _ in 0..1000 {
        let n = b
            .recv(&mut [storage.as_mut_slice()], &mut meta)
            .expect("recv");
        assert_eq!(n, 0);
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "recv blocked: {:?}",
        start.elapsed()
    );
    assert!(!wait_readable(b.raw_fd(), Duration::from_millis(10)));
    assert_eq!(b.recv(&mut [], &mut []).expect("recv"), 0);
}

fn readiness(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let data = payload(1, 64);
    // Arm whatever recv arms, then wait on the descriptor only.
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    assert_eq!(b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap(), 0);
    send_all(
        &mut a,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &data,
            segment_size: None,
        }],
    );
    assert!(
        wait_readable(b.raw_fd(), Duration::from_secs(2)),
        "raw_fd never became readable"
    );
    assert_eq!(b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap(), 1);
    assert_eq!(&storage[..meta[0].len], &data[..]);
}

/// The receiving thread sleeps in poll(2) on `raw_fd` while another thread
/// sends: the datagram must wake it.
fn readiness_cross_thread(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    assert_eq!(b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap(), 0);
    let dst = b.local_addr();
    let sender = std::thread::spawn(move || {
        for i in 0..3u32 {
            std::thread::sleep(Duration::from_millis(30));
            let data = payload(i, 64);
            send_all(
                &mut a,
                &[Transmit {
                    prefix: &[],
                    suffix: &[],
                    destination: dst,
                    contents: &data,
                    segment_size: None,
                }],
            );
        }
    });
    for i in 0..3u32 {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "datagram {i} never woke the poller"
            );
            assert!(
                wait_readable(b.raw_fd(), Duration::from_secs(2)),
                "datagram {i}: poll timed out"
            );
            if b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap() == 1 {
                break;
            }
        }
        assert_eq!(&storage[..4], &i.to_be_bytes());
    }
    sender.join().unwrap();
}

fn exhaustion(choice: BackendChoice) {
    let opts = SocketOptions {
        uring_ring_sends: RING_SENDS.with(|r| r.get()),
        uring_buffers: 8,
        recv_buffer_size: Some(4 << 20),
        ..SocketOptions::default()
    };
    let (Some(mut a), Some(mut b)) = (open(choice), open_with(choice, "127.0.0.1:0", &opts)) else {
        return;
    };
    // Arm the receive side first so the buffer ring really runs dry.
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    assert_eq!(b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap(), 0);
    let payloads: Vec<Vec<u8>> = (0..40u32).map(|i| payload(i, 200)).collect();
    let batch: Vec<Transmit<'_>> = payloads
        .iter()
        .map(|p| Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: p,
            segment_size: None,
        })
        .collect();
    send_all(&mut a, &batch);
    std::thread::sleep(Duration::from_millis(50));
    if b.backend() == Backend::Uring {
        // Every provided buffer sits in an unreaped completion: the ring is dry.
        assert_eq!(b.buffers_outstanding(), 8);
    }
    let got = recv_n(&mut b, 40, 2048, Duration::from_secs(3));
    let ids: Vec<u32> = got
        .iter()
        .map(|(d, _)| u32::from_be_bytes(d[..4].try_into().unwrap()))
        .collect();
    assert_eq!(ids, (0..40).collect::<Vec<_>>());
    assert_eq!(b.buffers_outstanding(), 0, "provided buffers leaked");
    if b.backend() == Backend::Uring {
        let stats = b.stats();
        assert!(stats.ring_exhausted >= 1 && stats.rearms >= 1, "{stats:?}");
    }
    // And again: service continues after the ring ran dry.
    send_all(&mut a, &batch[..5]);
    assert_eq!(recv_n(&mut b, 5, 2048, Duration::from_secs(2)).len(), 5);
    assert_eq!(b.buffers_outstanding(), 0, "provided buffers leaked");
}

fn gso_send(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    if a.max_gso_segments() == 1 {
        println!("NOTE: kernel refuses UDP_SEGMENT here; testing the split fallback only");
    }
    let data = payload(9, 10 * 100 + 50);
    send_all(
        &mut a,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &data,
            segment_size: Some(100),
        }],
    );
    let got = recv_n(&mut b, 11, 2048, Duration::from_secs(2));
    assert_eq!(got.len(), 11);
    for (i, (d, meta)) in got.iter().enumerate() {
        assert_eq!(meta.source, a.local_addr());
        assert_eq!(&d[..], &data[i * 100..(i * 100 + 100).min(data.len())]);
    }
}

/// `SO_NO_CHECK` makes the kernel refuse `UDP_SEGMENT` with EINVAL: the
/// backend must fall back to splitting, remember it, and lose nothing.
fn gso_fallback(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    if a.max_gso_segments() == 1 {
        skip("kernel refuses UDP_SEGMENT on loopback; fallback tested by gso_send");
        return;
    }
    let one: libc::c_int = 1;
    // SAFETY: valid socket fd and option value.
    let rc = unsafe {
        libc::setsockopt(
            a.socket_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0);
    let data = payload(3, 5 * 200);
    for _ in 0..2 {
        send_all(
            &mut a,
            &[Transmit {
                prefix: &[],
                suffix: &[],
                destination: b.local_addr(),
                contents: &data,
                segment_size: Some(200),
            }],
        );
        let got = recv_n(&mut b, 5, 2048, Duration::from_secs(2));
        assert_eq!(got.len(), 5);
        for (i, (d, _)) in got.iter().enumerate() {
            assert_eq!(&d[..], &data[i * 200..i * 200 + 200]);
        }
    }
    assert_eq!(a.max_gso_segments(), 1, "GSO refusal not remembered");
    assert!(a.stats().gso_disabled);
}

fn gro_opts(gro: bool) -> SocketOptions {
    SocketOptions {
        uring_ring_sends: RING_SENDS.with(|r| r.get()),
        recv_buffer_size: Some(4 << 20),
        gro,
        ..SocketOptions::default()
    }
}

/// What a GRO receive test saw: every datagram, split out of coalesced
/// buffers, in arrival order, and how many buffers held more than one.
#[derive(Debug, Default)]
struct GroReceived {
    datagrams: Vec<Vec<u8>>,
    buffers: usize,
    coalesced: usize,
    truncated: usize,
}

/// Splits a received buffer into the datagrams it holds: runs of
/// `gro_segment` bytes (the last may be shorter) with GRO, else one.
fn split_gro<'d>(data: &'d [u8], meta: &RecvMeta) -> Vec<&'d [u8]> {
    assert_eq!(data.len(), meta.len);
    match meta.gro_segment {
        Some(s) => {
            assert!(s > 0, "zero GRO segment size");
            data.chunks(usize::from(s)).collect()
        }
        None => vec![data],
    }
}

/// Receives until `count` datagrams (after splitting coalesced buffers)
/// arrived or `timeout` passed.
fn recv_datagrams(io: &mut Io, count: usize, buf_size: usize, timeout: Duration) -> GroReceived {
    let deadline = Instant::now() + timeout;
    let mut storage = vec![vec![0u8; buf_size]; 16];
    let mut meta = [RecvMeta::default(); 16];
    let mut out = GroReceived::default();
    while out.datagrams.len() < count && Instant::now() < deadline {
        let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|b| b.as_mut_slice()).collect();
        let n = io.recv(&mut bufs, &mut meta).expect("recv");
        for (buf, m) in bufs.iter().zip(&meta).take(n) {
            out.buffers += 1;
            out.truncated += usize::from(m.truncated);
            let parts = split_gro(&buf[..m.len], m);
            out.coalesced += usize::from(parts.len() > 1);
            out.datagrams.extend(parts.into_iter().map(<[u8]>::to_vec));
        }
        if n == 0 {
            wait_readable(io.raw_fd(), Duration::from_millis(20));
        }
    }
    out
}

/// One GSO transmit (500-byte segments) per run, to `destination`.
fn gso_transmits(runs: &[Vec<u8>], destination: SocketAddr) -> Vec<Transmit<'_>> {
    runs.iter()
        .map(|r| Transmit {
            prefix: &[],
            suffix: &[],
            destination,
            contents: r,
            segment_size: Some(500),
        })
        .collect()
}

/// `bursts` GSO runs of 8 × 500 bytes and a 120-byte tail, each datagram
/// numbered: the contents of every transmit, and every datagram in order.
fn gso_bursts(bursts: u32) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut runs = Vec::new();
    let mut datagrams = Vec::new();
    for k in 0..bursts {
        let mut run = Vec::new();
        for j in 0..9 {
            let d = payload(k * 9 + j, if j < 8 { 500 } else { 120 });
            run.extend_from_slice(&d);
            datagrams.push(d);
        }
        runs.push(run);
    }
    (runs, datagrams)
}

/// GSO runs sent to a GRO receiver arrive coalesced (the kernel hands a GSO
/// packet on loopback to a GRO socket whole) and split back into exactly the
/// datagrams sent, in order, each once.
fn gro_receive(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (
        open(choice),
        open_with(choice, "127.0.0.1:0", &gro_opts(true)),
    ) else {
        return;
    };
    let (runs, want) = gso_bursts(20);
    send_all(&mut a, &gso_transmits(&runs, b.local_addr()));
    let got = recv_datagrams(&mut b, want.len(), 65536, Duration::from_secs(2));
    assert_eq!(got.truncated, 0);
    assert_eq!(got.datagrams.len(), want.len(), "{got:?}");
    for (i, (g, w)) in got.datagrams.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "datagram {i}");
    }
    println!(
        "{:?}: {} datagrams in {} buffers, {} coalesced",
        b.backend(),
        got.datagrams.len(),
        got.buffers,
        got.coalesced
    );
    if a.max_gso_segments() > 1 && !a.stats().gso_disabled {
        assert!(
            got.coalesced >= 1,
            "{:?}: GSO runs to a GRO socket were never coalesced",
            b.backend()
        );
    }
    assert_eq!(b.buffers_outstanding(), 0, "provided buffers leaked");
}

/// With GRO off the same GSO runs arrive one datagram per buffer.
fn gro_off_splits_gso_runs(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (
        open(choice),
        open_with(choice, "127.0.0.1:0", &gro_opts(false)),
    ) else {
        return;
    };
    let (runs, want) = gso_bursts(5);
    send_all(&mut a, &gso_transmits(&runs, b.local_addr()));
    let got = recv_n(&mut b, want.len(), 65536, Duration::from_secs(2));
    assert_eq!(got.len(), want.len());
    for (i, ((d, meta), w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(meta.gro_segment, None, "datagram {i}");
        assert!(!meta.truncated);
        assert_eq!(d, w, "datagram {i}");
    }
}

/// The largest run GSO can send (64 segments, 65,472 bytes) arrives whole:
/// the uring backend's provided buffers are enlarged for GRO even though the
/// options ask for 2 KiB ones.
fn gro_largest_run(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (
        open(choice),
        open_with(choice, "127.0.0.1:0", &gro_opts(true)),
    ) else {
        return;
    };
    let want: Vec<Vec<u8>> = (0..64u32).map(|i| payload(i, 1023)).collect();
    let run = want.concat();
    assert_eq!(run.len(), 65_472);
    send_all(
        &mut a,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &run,
            segment_size: Some(1023),
        }],
    );
    let got = recv_datagrams(&mut b, want.len(), 65536, Duration::from_secs(2));
    assert_eq!(
        got.truncated,
        0,
        "{:?}: coalesced run truncated",
        b.backend()
    );
    assert_eq!(got.datagrams, want);
    if a.max_gso_segments() > 1 && !a.stats().gso_disabled {
        assert_eq!(got.buffers, 1, "{:?}: {got:?}", b.backend());
    }
}

/// Plain (non-GSO) datagrams of mixed sizes to a GRO socket, more than the
/// uring backend's GRO buffer ring holds (64): all arrive, in order, intact,
/// and every provided buffer comes back.
fn gro_plain_burst(choice: BackendChoice) {
    // The sender's GSO is off, or it would gather these into GSO runs.
    let plain = SocketOptions {
        gso: false,
        ..gro_opts(false)
    };
    let (Some(mut a), Some(mut b)) = (
        open_with(choice, "127.0.0.1:0", &plain),
        open_with(choice, "127.0.0.1:0", &gro_opts(true)),
    ) else {
        return;
    };
    // Arm first, so that the uring ring really runs dry.
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    assert_eq!(b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap(), 0);
    let want: Vec<Vec<u8>> = (0..200u32)
        .map(|i| payload(i, if i % 10 == 9 { 77 } else { 300 }))
        .collect();
    let batch: Vec<Transmit<'_>> = want
        .iter()
        .map(|p| Transmit::new(b.local_addr(), p))
        .collect();
    send_all(&mut a, &batch);
    let got = recv_datagrams(&mut b, want.len(), 65536, Duration::from_secs(3));
    assert_eq!(got.truncated, 0);
    assert_eq!(got.datagrams.len(), want.len(), "{got:?}");
    for (i, (g, w)) in got.datagrams.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "datagram {i}");
    }
    assert_eq!(b.buffers_outstanding(), 0, "provided buffers leaked");
    if b.backend() == Backend::Uring {
        // GRO keeps at most 64 (enlarged) provided buffers: 200 datagrams
        // drained the ring, and receiving went on after re-arming.
        let stats = b.stats();
        assert!(stats.ring_exhausted >= 1 && stats.rearms >= 1, "{stats:?}");
    }
}

/// A coalesced run larger than the caller's buffer is reported truncated
/// (with its segment size), and the socket keeps working.
fn gro_truncation(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (
        open(choice),
        open_with(choice, "127.0.0.1:0", &gro_opts(true)),
    ) else {
        return;
    };
    if a.max_gso_segments() == 1 {
        skip("kernel refuses UDP_SEGMENT on loopback: nothing is coalesced");
        return;
    }
    let run: Vec<u8> = (0..8u32).flat_map(|i| payload(i, 500)).collect();
    let dst = b.local_addr();
    send_all(
        &mut a,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: dst,
            contents: &run,
            segment_size: Some(500),
        }],
    );
    let got = recv_n(&mut b, 1, 1000, Duration::from_secs(2));
    assert_eq!(got.len(), 1);
    let (d, meta) = &got[0];
    assert!(meta.truncated, "{:?}: {meta:?}", b.backend());
    assert_eq!(meta.len, 1000);
    assert_eq!(meta.gro_segment, Some(500));
    assert_eq!(&d[..], &run[..1000]);
    let one = payload(99, 100);
    send_all(&mut a, &[Transmit::new(dst, &one)]);
    let got = recv_n(&mut b, 1, 1000, Duration::from_secs(2));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, one);
    assert!(!got[0].1.truncated);
    assert_eq!(b.buffers_outstanding(), 0, "provided buffers leaked");
}

fn unreachable_port(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    // Report ICMP errors on this unconnected socket too, the harshest case.
    let one: libc::c_int = 1;
    // SAFETY: valid socket fd and option value.
    let rc = unsafe {
        libc::setsockopt(
            a.socket_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0);
    let junk = payload(0, 100);
    let good = payload(1, 100);
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    let mut received = 0;
    for round in 0..20 {
        let to_closed = Transmit {
            prefix: &[],
            suffix: &[],
            destination: closed,
            contents: &junk,
            segment_size: None,
        };
        assert_eq!(a.send(&[to_closed]).expect("send to closed port"), 1);
        std::thread::sleep(Duration::from_millis(2));
        // The pending ICMP error must neither fail recv nor lose the next
        // good datagram.
        assert_eq!(
            a.recv(&mut [storage.as_mut_slice()], &mut meta)
                .expect("recv after ICMP"),
            0
        );
        let to_b = Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &good,
            segment_size: None,
        };
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(1);
        while sent == 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: send never went through"
            );
            sent = a.send(&[to_b]).expect("send after ICMP");
        }
        received += recv_n(&mut b, 1, 2048, Duration::from_secs(1)).len();
    }
    assert_eq!(received, 20);
    assert_eq!(
        a.stats().send_dropped,
        0,
        "a good datagram was dropped for an old ICMP error"
    );
    println!("{:?} {:?}", a.backend(), a.stats());
    // And the socket still receives.
    send_all(
        &mut b,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: a.local_addr(),
            contents: &good,
            segment_size: None,
        }],
    );
    assert_eq!(recv_n(&mut a, 1, 2048, Duration::from_secs(1)).len(), 1);
}

/// Datagrams the kernel refuses (wrong family, too big) are dropped and
/// counted as consumed; the ones around them still go out.
fn refused_datagrams_are_skipped(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let good: Vec<Vec<u8>> = (0..3u32).map(|i| payload(i, 100)).collect();
    let huge = vec![0u8; 70_000];
    let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
    let t = |destination, contents| Transmit {
        prefix: &[],
        suffix: &[],
        destination,
        contents,
        segment_size: None,
    };
    let dst = b.local_addr();
    let batch = [
        t(dst, &good[0]),
        t(v6, &good[1]),
        t(dst, &huge),
        t(dst, &good[1]),
        t(dst, &huge),
        t(dst, &good[2]),
    ];
    assert_eq!(a.send(&batch).expect("send"), batch.len());
    assert_eq!(a.stats().send_dropped, 3);
    let got = recv_n(&mut b, 3, 2048, Duration::from_secs(2));
    let got: Vec<Vec<u8>> = got.into_iter().map(|(d, _)| d).collect();
    assert_eq!(got, good);
    assert!(recv_n(&mut b, 1, 2048, Duration::from_millis(50)).is_empty());
}

/// More segments than one GSO send (64) and than one send chain carries:
/// split, in order, nothing lost or repeated.
fn long_gso_is_split(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let data: Vec<u8> = (0..150u32).flat_map(|i| payload(i, 100)).collect();
    send_all(
        &mut a,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &data,
            segment_size: Some(100),
        }],
    );
    let got = recv_n(&mut b, 150, 2048, Duration::from_secs(2));
    assert_eq!(got.len(), 150);
    for (i, (d, _)) in got.iter().enumerate() {
        assert_eq!(&d[..], &data[i * 100..i * 100 + 100], "segment {i}");
    }
}

/// Dropping a socket with a receive armed and datagrams in flight neither
/// hangs nor crashes, and the port can be bound again.
fn drop_while_busy(choice: BackendChoice) {
    let (Some(mut a), Some(mut b)) = (open(choice), open(choice)) else {
        return;
    };
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    assert_eq!(b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap(), 0);
    let data = payload(0, 500);
    let dst = b.local_addr();
    let batch = vec![
        Transmit {
            prefix: &[],
            suffix: &[],
            destination: dst,
            contents: &data,
            segment_size: None,
        };
        20
    ];
    send_all(&mut a, &batch);
    let start = Instant::now();
    drop(b);
    assert!(start.elapsed() < Duration::from_secs(1));
    let again = open_with(choice, &dst.to_string(), &SocketOptions::default());
    assert!(again.is_some());
}

/// Receive completions reaped by `send` (the ring ran dry meanwhile) must
/// not confuse teardown or the next `recv`.
fn completions_reaped_by_send(choice: BackendChoice) {
    let opts = SocketOptions {
        uring_ring_sends: RING_SENDS.with(|r| r.get()),
        uring_buffers: 8,
        ..SocketOptions::default()
    };
    let (Some(mut a), Some(mut b)) = (open(choice), open_with(choice, "127.0.0.1:0", &opts)) else {
        return;
    };
    let mut storage = vec![0u8; 2048];
    let mut meta = [RecvMeta::default()];
    assert_eq!(b.recv(&mut [storage.as_mut_slice()], &mut meta).unwrap(), 0);
    let data = payload(0, 300);
    let to_b = vec![
        Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &data,
            segment_size: None,
        };
        20
    ];
    let to_a = Transmit {
        prefix: &[],
        suffix: &[],
        destination: a.local_addr(),
        contents: &data,
        segment_size: None,
    };
    for round in 0..2 {
        send_all(&mut a, &to_b);
        std::thread::sleep(Duration::from_millis(20));
        send_all(&mut b, &[to_a]);
        if round == 0 {
            assert_eq!(recv_n(&mut b, 20, 2048, Duration::from_secs(2)).len(), 20);
            assert_eq!(b.buffers_outstanding(), 0);
        }
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(b);
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(3))
        .expect("drop hung");
    assert_eq!(recv_n(&mut a, 2, 2048, Duration::from_secs(1)).len(), 2);
}

/// SO_REUSEPORT lets shards share a port; without it the second bind is a
/// typed `Bind` error.
fn reuse_port(choice: BackendChoice) {
    let opts = SocketOptions {
        uring_ring_sends: RING_SENDS.with(|r| r.get()),
        reuse_port: true,
        ..SocketOptions::default()
    };
    let Some(first) = open_with(choice, "127.0.0.1:0", &opts) else {
        return;
    };
    let addr = first.local_addr();
    let second = bind(addr, choice, &opts).expect("second SO_REUSEPORT bind");
    assert_eq!(second.local_addr(), addr);
    match bind(addr, choice, &SocketOptions::default()) {
        Err(ridge_io::IoError::Bind { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!(
            "expected a Bind error, got {:?}",
            other.map(|io| io.local_addr())
        ),
    }
}

fn auto_picks_a_backend(choice: BackendChoice) {
    let Some(io) = open(choice) else { return };
    let want = if probe_uring().is_ok() {
        Backend::Uring
    } else {
        Backend::Mmsg
    };
    if choice == BackendChoice::Auto {
        assert_eq!(io.backend(), want);
    }
}

/// A prefix and shared contents leave as one datagram each, in order, for
/// many destinations sharing one payload buffer (zero-copy fan-out).
fn prefixed_fan_out(choice: BackendChoice) {
    let (Some(mut a), Some(mut b), Some(mut c)) = (open(choice), open(choice), open(choice)) else {
        return;
    };
    let shared = payload(7, 300);
    let headers: Vec<[u8; 12]> = (0..200u8).map(|i| [i; 12]).collect();
    // A segment size on a prefixed transmit is ignored: still one datagram.
    let batch: Vec<Transmit<'_>> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| Transmit {
            destination: if i % 2 == 0 {
                b.local_addr()
            } else {
                c.local_addr()
            },
            prefix: h,
            suffix: &[],
            contents: &shared,
            segment_size: Some(100),
        })
        .collect();
    send_all(&mut a, &batch);
    for (io, parity) in [(&mut b, 0u8), (&mut c, 1u8)] {
        let got = recv_n(io, 100, 2048, Duration::from_secs(5));
        assert_eq!(got.len(), 100);
        for (k, (bytes, meta)) in got.iter().enumerate() {
            assert_eq!(meta.len, 312);
            let i = (k as u8) * 2 + parity;
            assert_eq!(&bytes[..12], &[i; 12], "header of datagram {i}");
            assert_eq!(&bytes[12..], &shared[..], "payload of datagram {i}");
        }
    }
}

/// Consecutive transmits to one destination, of one length but a shorter
/// last, go as one gathered GSO message built from their prefixes, shared
/// payloads and suffixes: a GRO receiver gets them coalesced, a plain one
/// datagram by datagram, and both get exactly what was sent, in order. With
/// GSO off nothing is coalesced.
fn gathered_gso_fan_out(choice: BackendChoice) {
    for gso in [true, false] {
        let sender = SocketOptions {
            gso,
            ..gro_opts(false)
        };
        let (Some(mut a), Some(mut b), Some(mut c)) = (
            open_with(choice, "127.0.0.1:0", &sender),
            open_with(choice, "127.0.0.1:0", &gro_opts(true)),
            open(choice),
        ) else {
            return;
        };
        let payloads: Vec<Vec<u8>> = (0..100u32)
            .map(|i| payload(i, if i % 25 == 24 { 61 } else { 188 }))
            .collect();
        let headers: Vec<[u8; 12]> = (0..100u8).map(|i| [i; 12]).collect();
        // Each with a trailer of its own after the shared payload (a mesh
        // link's SRTP tag): three iovecs per datagram.
        let trailers: Vec<[u8; 10]> = (0..100u8).map(|i| [!i; 10]).collect();
        // 0..40 to b, 40..70 to c, 70..100 to b: runs end at the short
        // datagrams (24, 49, 74, 99) and where the destination changes.
        let dest = |i: usize| {
            if (40..70).contains(&i) {
                c.local_addr()
            } else {
                b.local_addr()
            }
        };
        let batch: Vec<Transmit<'_>> = (0..100)
            .map(|i| Transmit {
                destination: dest(i),
                prefix: &headers[i],
                suffix: &trailers[i],
                contents: &payloads[i],
                segment_size: None,
            })
            .collect();
        send_all(&mut a, &batch);
        let want = |to: SocketAddr| -> Vec<Vec<u8>> {
            (0..100)
                .filter(|&i| dest(i) == to)
                .map(|i| [&headers[i][..], &payloads[i][..], &trailers[i][..]].concat())
                .collect()
        };
        let (want_b, want_c) = (want(b.local_addr()), want(c.local_addr()));
        let got_b = recv_datagrams(&mut b, want_b.len(), 65536, Duration::from_secs(2));
        assert_eq!(got_b.truncated, 0);
        assert_eq!(got_b.datagrams, want_b, "gso {gso}");
        let got_c: Vec<Vec<u8>> = recv_n(&mut c, want_c.len(), 2048, Duration::from_secs(2))
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(got_c, want_c, "gso {gso}");
        println!(
            "{:?} gso {gso}: {} datagrams to the GRO socket in {} buffers",
            a.backend(),
            got_b.datagrams.len(),
            got_b.buffers
        );
        if gso && a.max_gso_segments() > 1 && !a.stats().gso_disabled {
            assert!(got_b.coalesced >= 2, "no gathered run coalesced: {got_b:?}");
            // Runs: 0..25, 25..40 to b; 40..50, 50..70 to c; 70..75, 75..100.
            let stats = a.stats();
            assert_eq!(
                (stats.gso_sends, stats.gso_datagrams),
                (6, 100),
                "{stats:?}"
            );
        } else {
            assert_eq!(got_b.coalesced, 0, "coalesced without GSO");
        }
        assert!(recv_n(&mut c, 1, 2048, Duration::from_millis(30)).is_empty());
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod mmsg {
            $(#[test] fn $name() { super::$name(ridge_io::BackendChoice::Mmsg) })*
        }
        mod uring {
            $(#[test] fn $name() { super::$name(ridge_io::BackendChoice::Uring) })*
        }
        mod uring_ring_sends {
            $(#[test] fn $name() {
                super::RING_SENDS.with(|r| r.set(true));
                super::$name(ridge_io::BackendChoice::Uring)
            })*
        }
    };
}

suite!(
    round_trip_1000,
    ipv6_round_trip,
    truncation,
    empty_recv,
    readiness,
    readiness_cross_thread,
    exhaustion,
    gso_send,
    gso_fallback,
    gro_receive,
    gro_off_splits_gso_runs,
    gro_largest_run,
    gro_plain_burst,
    gro_truncation,
    unreachable_port,
    refused_datagrams_are_skipped,
    long_gso_is_split,
    drop_while_busy,
    completions_reaped_by_send,
    reuse_port,
    auto_picks_a_backend,
    prefixed_fan_out,
    gathered_gso_fan_out,
);

/// uring GSO really leaves as one GSO packet: a GRO receiver on loopback
/// gets it coalesced.
#[test]
fn uring_gso_reaches_gro_receiver() {
    let Some(mut a) = open(BackendChoice::Uring) else {
        return;
    };
    if a.max_gso_segments() == 1 {
        skip("kernel refuses UDP_SEGMENT on loopback");
        return;
    }
    let opts = SocketOptions {
        uring_ring_sends: RING_SENDS.with(|r| r.get()),
        gro: true,
        ..SocketOptions::default()
    };
    let mut b = open_with(BackendChoice::Mmsg, "127.0.0.1:0", &opts).unwrap();
    let data = payload(5, 8 * 500);
    send_all(
        &mut a,
        &[Transmit {
            prefix: &[],
            suffix: &[],
            destination: b.local_addr(),
            contents: &data,
            segment_size: Some(500),
        }],
    );
    let got = recv_n(&mut b, 1, 65536, Duration::from_secs(2));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, data);
    assert_eq!(got[0].1.gro_segment, Some(500));
}

#[test]
fn uring_rejects_bad_buffer_options() {
    for (buffers, size) in [(3u16, 2048u32), (0, 2048), (8, 64)] {
        let opts = SocketOptions {
            uring_ring_sends: RING_SENDS.with(|r| r.get()),
            uring_buffers: buffers,
            uring_buffer_size: size,
            ..SocketOptions::default()
        };
        match bind("127.0.0.1:0".parse().unwrap(), BackendChoice::Uring, &opts) {
            Err(ridge_io::IoError::Config(_)) => {}
            other => panic!(
                "{buffers} x {size}: expected Config, got {:?}",
                other.map(|io| io.backend())
            ),
        }
    }
}

#[test]
fn auto() {
    auto_picks_a_backend(BackendChoice::Auto);
    round_trip_1000(BackendChoice::Auto);
}
