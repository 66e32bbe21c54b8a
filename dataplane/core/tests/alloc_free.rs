//! The crate's promise that the plain-RTP packet path allocates nothing per
//! packet in steady state, checked with a counting global allocator.
//!
//! One plain video publisher feeds three plain subscribers, in each codec the
//! core routes (VP8, H.264, VP9, AV1: every packet's payload format is
//! checked on the way). After a warm-up
//! (which fills the transmit-buffer pool, the retransmission slots and the
//! output queue), 10,000 more packets go through `handle_datagram`, the
//! output is drained and every buffer recycled as the real I/O loop does, and
//! `handle_timeout` runs whenever it is due. The window also answers a NACK
//! every 100 packets from the retransmission buffer, NACKs upstream for a
//! lost packet every 1,000, and takes receiver reports and PLIs from a
//! subscriber. Not a single allocation may happen in it.
//!
//! Set `RIDGE_ALLOC_TRACE=N` to print a backtrace for each of the first N
//! allocations made inside the measured window (8 when N is not a number).
//!
//! This file holds exactly one `#[test]`: the allocator counts only on the
//! thread that opened the window, but a second test running beside it could
//! still touch shared state (and would muddle traces).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ridge_sfu::packet::{self, rtcp};
use ridge_sfu::{CodecSpec, Output, RtpDirection, Sfu};

// ----- the counting allocator ---------------------------------------------------

/// Forwards to [`System`], counting allocations made on a thread whose
/// [`COUNTING`] flag is set.
struct CountingAlloc;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations (`alloc`, `alloc_zeroed`, and `realloc`, which may move) seen
/// while counting.
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);
/// Whether to print a backtrace for counted allocations, and how many more.
static TRACE: AtomicBool = AtomicBool::new(false);
static TRACES_LEFT: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// Set on the measuring thread for the measured window only. A const
    /// initialiser and no destructor: reading it never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn record(size: usize) {
    if !COUNTING.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    ALLOC_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    if TRACE.load(Ordering::Relaxed)
        && TRACES_LEFT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    {
        // Capturing and printing allocate: stop counting meanwhile, which
        // also keeps this from recursing.
        COUNTING.set(false);
        let bt = std::backtrace::Backtrace::force_capture();
        let _ = writeln!(
            std::io::stderr(),
            "allocation of {size} bytes in the measured window:\n{bt}"
        );
        COUNTING.set(true);
    }
}

// SAFETY: every method forwards its arguments unchanged to `System`, which
// implements `GlobalAlloc` correctly, and returns its result unchanged. The
// bookkeeping around the calls only touches atomics and a const-initialised
// thread-local `Cell`, never unwinds (`try_with`, ignored write errors), and
// allocates only while tracing, with counting switched off so it cannot recurse.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: our caller guarantees `layout` has a non-zero size, which
        // is all `System.alloc` requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as for `alloc`: `layout` has a non-zero size.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: our caller guarantees `ptr` was allocated by this
        // allocator, i.e. by `System`, with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: our caller guarantees `ptr` came from this allocator (so
        // from `System`) with `layout`, and that `new_size` is non-zero and
        // does not overflow `isize` when rounded to `layout.align()`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` with counting on; returns the allocations and bytes it made.
fn count_allocations<R>(f: impl FnOnce() -> R) -> (u64, u64, R) {
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        ALLOC_BYTES.load(Ordering::Relaxed),
    );
    COUNTING.set(true);
    let r = f();
    COUNTING.set(false);
    (
        ALLOCS.load(Ordering::Relaxed) - a0,
        ALLOC_BYTES.load(Ordering::Relaxed) - b0,
        r,
    )
}

// ----- the scenario -----------------------------------------------------------

const ROOM: &str = "alloc";
const PUB_SSRC: u32 = 0x5151_0001;
const PUB_PT: u8 = 96;
const SUB_PT: u8 = 100;
const SUB_SSRCS: [u32; 3] = [0xb0b0_0001, 0xc0c0_0002, 0xd0d0_0003];
/// Subscriber 0 (B) sends the NACKs, reports and PLIs.
const B: usize = 0;

const WARMUP: u32 = 2_000;
const MEASURED: u32 = 10_000;
/// About 90 packets/s: three packets per frame at 30 frames/s.
const PACKET_INTERVAL: Duration = Duration::from_millis(11);
const PACKETS_PER_FRAME: u32 = 3;
const KEYFRAME_EVERY: u32 = 300;
const NACK_EVERY: u32 = 100;
const LOSS_EVERY: u32 = 1_000;
const REPORT_EVERY: u32 = 250;
const PLI_EVERY: u32 = 1_000;

fn publisher_addr() -> SocketAddr {
    remote(10, 4000)
}

fn subscriber_addrs() -> [SocketAddr; 3] {
    [remote(20, 4002), remote(30, 4004), remote(40, 4006)]
}

/// What the node sent during a run, tallied without allocating.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    /// Datagrams (RTP, including retransmissions) per subscriber.
    to_subscriber: [u64; 3],
    /// RTCP datagrams to the publisher: NACKs and PLIs.
    nacks_upstream: u64,
    plis_upstream: u64,
    other: u64,
    events: u64,
    /// Output sequence number of the last packet forwarded to B.
    last_b_seq: Option<u16>,
}

/// A publisher stream and the feedback of subscriber B, generated into
/// reused buffers so the driver itself allocates nothing.
struct Driver {
    now: Instant,
    /// Packets generated so far (the publisher's packet index).
    n: u32,
    seq: u16,
    ts: u32,
    payloads: [Vec<u8>; 2],
    datagram: Vec<u8>,
    feedback: Vec<u8>,
    nacks_sent: u64,
    nacked_seqs: u64,
    losses: u64,
    reports: u64,
    plis: u64,
}

impl Driver {
    fn new(now: Instant, payloads: [Vec<u8>; 2]) -> Self {
        Driver {
            now,
            n: 0,
            seq: 40_000,
            ts: 1_000_000,
            // Both payloads are as long as the largest packet of the run, so
            // each retransmission slot reaches its final size on first use.
            payloads,
            datagram: Vec::with_capacity(1_500),
            feedback: Vec::with_capacity(1_500),
            nacks_sent: 0,
            nacked_seqs: 0,
            losses: 0,
            reports: 0,
            plis: 0,
        }
    }

    /// Fires every timeout due by `self.now`, then feeds one publisher packet
    /// and, on their schedules, B's NACK, receiver report and PLI, draining
    /// and recycling all output after each input.
    fn step(&mut self, sfu: &mut Sfu, tally: &mut Tally) {
        self.now += PACKET_INTERVAL;
        loop {
            let due = sfu.poll_timeout();
            if due > self.now {
                break;
            }
            sfu.handle_timeout(due.max(self.now - PACKET_INTERVAL));
            pump(sfu, tally);
        }

        self.n += 1;
        if self.n.is_multiple_of(LOSS_EVERY) {
            // This sequence number never arrives: the node NACKs it upstream.
            self.seq = self.seq.wrapping_add(1);
            self.losses += 1;
        }
        let in_frame = self.n % PACKETS_PER_FRAME;
        let keyframe = self.n % KEYFRAME_EVERY == 1;
        self.datagram.clear();
        packet::rtp::write_packet(
            &mut self.datagram,
            in_frame == 0,
            PUB_PT,
            self.seq,
            self.ts,
            PUB_SSRC,
            &self.payloads[usize::from(keyframe)],
        );
        self.seq = self.seq.wrapping_add(1);
        if in_frame == 0 {
            self.ts = self.ts.wrapping_add(3_000);
        }
        sfu.handle_datagram(self.now, publisher_addr(), LOCAL, &self.datagram);
        let before = tally.to_subscriber[B];
        pump(sfu, tally);
        assert!(
            tally.to_subscriber[B] > before,
            "packet {} not forwarded",
            self.n
        );

        let b = subscriber_addrs()[B];
        let b_ssrc = SUB_SSRCS[B];
        if self.n.is_multiple_of(NACK_EVERY) {
            let last = tally.last_b_seq.expect("B received packets");
            let lost = [last.wrapping_sub(7), last.wrapping_sub(2)];
            self.feedback.clear();
            rtcp::write_nack(&mut self.feedback, b_ssrc, b_ssrc, &lost);
            self.nacks_sent += 1;
            self.nacked_seqs += lost.len() as u64;
            self.feed(sfu, b, tally);
        }
        if self.n.is_multiple_of(REPORT_EVERY) {
            let block = rtcp::ReportBlock {
                ssrc: b_ssrc,
                fraction_lost: 3,
                highest_seq: u32::from(tally.last_b_seq.unwrap_or(0)),
                ..Default::default()
            };
            self.feedback.clear();
            rtcp::write_receiver_report(&mut self.feedback, b_ssrc, &[block]);
            self.reports += 1;
            self.feed(sfu, b, tally);
        }
        if self.n.is_multiple_of(PLI_EVERY) {
            self.feedback.clear();
            rtcp::write_pli(&mut self.feedback, b_ssrc, b_ssrc);
            self.plis += 1;
            self.feed(sfu, b, tally);
        }
    }

    fn feed(&mut self, sfu: &mut Sfu, from: SocketAddr, tally: &mut Tally) {
        sfu.handle_datagram(self.now, from, LOCAL, &self.feedback);
        pump(sfu, tally);
    }
}

/// Drains every output, tallies it and recycles the buffers, like the I/O loop.
fn pump(sfu: &mut Sfu, tally: &mut Tally) {
    let subs = subscriber_addrs();
    while let Some(out) = sfu.poll_output() {
        match out {
            Output::Transmit(t) => {
                if let Some(i) = subs.iter().position(|a| *a == t.destination) {
                    tally.to_subscriber[i] += 1;
                    // Forwarded packets carry the newest output numbers;
                    // retransmissions only come back as answers to NACKs.
                    if i == B && t.contents.len() >= 4 {
                        let seq = u16::from_be_bytes([t.contents[2], t.contents[3]]);
                        let newer = tally
                            .last_b_seq
                            .is_none_or(|l| seq.wrapping_sub(l).wrapping_sub(1) < 0x8000);
                        if newer {
                            tally.last_b_seq = Some(seq);
                        }
                    }
                } else if t.destination == publisher_addr() {
                    // PT of an RTCP feedback message: 205 RTPFB (NACK), 206 PSFB (PLI).
                    match t.contents.get(1) {
                        Some(205) => tally.nacks_upstream += 1,
                        Some(206) => tally.plis_upstream += 1,
                        _ => tally.other += 1,
                    }
                } else {
                    tally.other += 1;
                }
                sfu.recycle(t.contents);
            }
            Output::Event(_) | Output::MeshControl(_) | Output::Local(_) => tally.events += 1,
        }
    }
}

/// A delta and a keyframe payload of `codec`, 1,100 bytes each.
fn payloads(codec: CodecSpec) -> [Vec<u8>; 2] {
    let padded = |head: &[u8]| {
        let mut v = head.to_vec();
        v.resize(1_100, 0x5a);
        v
    };
    match codec {
        CodecSpec::H264 => [padded(&[0x41, 0x9a, 0x02]), padded(&[0x65, 0x88, 0x84])],
        // B and E set; P set on the delta.
        CodecSpec::Vp9 => [
            padded(&[0x4c, 0x01]),
            padded(&[0x0c, 0x82, 0x49, 0x83, 0x42]),
        ],
        // W=1: one OBU to the end, a frame; N=1 and a sequence header first.
        CodecSpec::Av1 => [padded(&[0x10, 0x30]), padded(&[0x18, 0x08, 0x00])],
        _ => [
            vp8_payload(false, 640, 360, b"delta", 1_100),
            vp8_payload(true, 640, 360, b"key", 1_100),
        ],
    }
}

#[test]
fn plain_rtp_path_allocates_nothing_per_packet_in_steady_state() {
    if let Some(n) = std::env::var_os("RIDGE_ALLOC_TRACE") {
        let n = n.to_str().and_then(|n| n.parse().ok()).unwrap_or(8);
        TRACES_LEFT.store(n, Ordering::Relaxed);
        TRACE.store(true, Ordering::Relaxed);
    }

    // The allocator is live: a known allocation is counted.
    let (n, bytes, v) = count_allocations(|| std::hint::black_box(Vec::<u8>::with_capacity(100)));
    drop(v);
    assert_eq!((n, bytes), (1, 100), "the counting allocator is not in use");
    for codec in [
        CodecSpec::Vp8,
        CodecSpec::H264,
        CodecSpec::Vp9,
        CodecSpec::Av1,
    ] {
        steady_state(codec);
    }
}

fn steady_state(codec: CodecSpec) {
    let mut node = Node::new(|_| {});
    let publisher = node.sfu.join(ROOM, "publisher", true).unwrap();
    let track = node
        .plain_video_endpoint_in(
            codec,
            publisher,
            RtpDirection::Publish,
            publisher_addr(),
            PUB_PT,
            Some(PUB_SSRC),
        )
        .track
        .expect("publishing creates a track");
    for (i, (addr, ssrc)) in subscriber_addrs().into_iter().zip(SUB_SSRCS).enumerate() {
        let p = node.sfu.join(ROOM, &format!("sub{i}"), true).unwrap();
        let info = node.plain_video_endpoint_in(
            codec,
            p,
            RtpDirection::Subscribe,
            addr,
            SUB_PT,
            Some(ssrc),
        );
        assert_eq!(info.track, Some(track));
    }
    node.drain();

    // Warm-up: the same traffic, uncounted.
    let mut driver = Driver::new(node.now, payloads(codec));
    let mut warm = Tally::default();
    let (warm_allocs, warm_bytes, ()) = count_allocations(|| {
        for _ in 0..WARMUP {
            driver.step(&mut node.sfu, &mut warm);
        }
    });
    eprintln!("{codec}: warm-up: {WARMUP} packets: {warm_allocs} allocations, {warm_bytes} bytes");
    assert_eq!(warm.to_subscriber[1], u64::from(WARMUP));
    let before = node.sfu.stats().counters;
    let d0 = (
        driver.nacks_sent,
        driver.nacked_seqs,
        driver.losses,
        driver.plis,
        driver.reports,
    );

    // The measured window.
    let mut tally = Tally {
        last_b_seq: warm.last_b_seq,
        ..Tally::default()
    };
    let (allocs, bytes, ()) = count_allocations(|| {
        for _ in 0..MEASURED {
            driver.step(&mut node.sfu, &mut tally);
        }
    });

    // The window did what it was meant to do...
    let after = node.sfu.stats().counters;
    let nacks = driver.nacks_sent - d0.0;
    let nacked = driver.nacked_seqs - d0.1;
    let losses = driver.losses - d0.2;
    let plis = driver.plis - d0.3;
    let reports = driver.reports - d0.4;
    let measured = u64::from(MEASURED);
    assert_eq!(nacks, measured / u64::from(NACK_EVERY));
    assert_eq!(losses, measured / u64::from(LOSS_EVERY));
    assert_eq!(reports, measured / u64::from(REPORT_EVERY));
    assert_eq!(plis, measured / u64::from(PLI_EVERY));
    assert_eq!(after.nacks_received - before.nacks_received, nacked);
    assert_eq!(
        after.retransmits - before.retransmits,
        nacked,
        "every NACKed packet answered from the buffer"
    );
    assert_eq!(after.retransmit_misses, before.retransmit_misses);
    assert_eq!(tally.to_subscriber[B], measured + nacked);
    assert_eq!(tally.to_subscriber[1], measured);
    assert_eq!(tally.to_subscriber[2], measured);
    assert_eq!(tally.nacks_upstream, losses, "one upstream NACK per loss");
    assert_eq!(after.packets_lost - before.packets_lost, losses);
    assert_eq!(
        after.keyframe_requests_received - before.keyframe_requests_received,
        plis
    );
    assert!(
        tally.plis_upstream >= 1,
        "B's PLIs reach the publisher: {tally:?}"
    );
    assert_eq!((tally.other, tally.events), (0, 0), "{tally:?}");
    let loss = node
        .sfu
        .stats()
        .peers
        .iter()
        .find_map(|p| p.loss)
        .expect("B's receiver reports recorded");
    assert!((loss - 3.0 / 256.0).abs() < 1e-6, "{loss}");

    // ...and allocated nothing.
    eprintln!(
        "{codec}: measured window: {measured} packets, {nacks} NACKs ({nacked} retransmits), \
         {losses} upstream NACKs, {reports} RRs, {plis} PLIs: {allocs} allocations, {bytes} bytes"
    );
    assert_eq!(
        allocs, 0,
        "{codec}: {allocs} allocations ({bytes} bytes) in the steady-state plain-RTP path; \
         rerun with RIDGE_ALLOC_TRACE=1 -- --nocapture for backtraces"
    );
}
