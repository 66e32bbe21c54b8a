//! The traffic generator (a paced `sendmmsg` sender) and the receiver (one
//! thread polling every subscriber socket with non-blocking `recvmmsg`).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::mmsg;
use crate::packet::{self, Stamp};
use crate::stats;

/// Datagrams per `sendmmsg` call.
pub const SEND_BATCH: usize = 32;
/// Datagrams per `recvmmsg` call.
const RECV_BATCH: usize = 64;
/// Receive buffer size: the largest UDP payload, so that a GRO run fits.
const GRO_BUFFER: usize = 65_535;
/// Socket buffer size asked for (the kernel caps it at `net.core.[rw]mem_max`).
const SOCKET_BUFFER: usize = 8 << 20;

/// Nanoseconds since `base`: the clock shared by sender and receiver.
pub fn now_ns(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// Binds a UDP socket on 127.0.0.1 with large socket buffers.
pub fn bind_loopback() -> io::Result<UdpSocket> {
    bind(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Binds a UDP socket on `addr` (in the calling thread's network
/// namespace) with large socket buffers.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    let r = socket2::SockRef::from(&sock);
    // Best effort: a smaller buffer only means earlier loss.
    let _ = r.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = r.set_send_buffer_size(SOCKET_BUFFER);
    Ok(sock)
}

/// The sending side: one or more streams, each a socket connected to its
/// first hop with its own RTP sequence number, which continues across runs
/// so the relay sees gap-free streams. Batches go to the streams in turn.
#[derive(Debug)]
pub struct Publisher {
    streams: Vec<Stream>,
    /// A stream's packets `0, n, 2n, ...` are VP8 keyframes.
    keyframe_interval: u64,
    /// Datagrams per `sendmmsg` call, all with the same send time.
    batch: usize,
    /// What the payloads look like.
    codec: packet::Codec,
}

#[derive(Debug)]
struct Stream {
    sock: UdpSocket,
    next_rtp_seq: u16,
    /// Packets sent on this stream (keyframes are every Nth of these).
    sent: u64,
}

/// What one paced send achieved.
#[derive(Debug, Clone, Copy)]
pub struct SendReport {
    pub sent: u64,
    pub elapsed: Duration,
    /// `sendmmsg` calls that failed with an error other than a refused
    /// connection (which is counted but ignored: it is an ICMP echo of an
    /// earlier datagram).
    pub errors: u64,
    /// CPU seconds the sending thread used.
    pub cpu_seconds: Option<f64>,
}

impl Publisher {
    /// Wraps `sock` (already bound) and connects it to `dest`.
    pub fn new(sock: UdpSocket, dest: SocketAddr) -> io::Result<Publisher> {
        Self::many(vec![(sock, dest)])
    }

    /// One stream per (socket, destination) pair.
    pub fn many(streams: Vec<(UdpSocket, SocketAddr)>) -> io::Result<Publisher> {
        let streams = streams
            .into_iter()
            .map(|(sock, dest)| {
                sock.connect(dest).map(|()| Stream {
                    sock,
                    next_rtp_seq: 1000,
                    sent: 0,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Publisher {
            streams,
            keyframe_interval: packet::KEYFRAME_INTERVAL,
            batch: SEND_BATCH,
            codec: packet::Codec::Vp8,
        })
    }

    /// Payloads in `codec` instead of VP8.
    pub fn with_codec(mut self, codec: packet::Codec) -> Publisher {
        self.codec = codec;
        self
    }

    /// A keyframe every `packets` packets of each stream instead of every
    /// [`packet::KEYFRAME_INTERVAL`].
    pub fn with_keyframe_interval(mut self, packets: u64) -> Publisher {
        self.keyframe_interval = packets.max(1);
        self
    }

    /// Sends `n` datagrams per `sendmmsg` (1..=[`SEND_BATCH`]; default
    /// [`SEND_BATCH`]). With 1 every packet is paced on its own and carries
    /// its own send time.
    pub fn with_batch(mut self, n: usize) -> Publisher {
        self.batch = n.clamp(1, SEND_BATCH);
        self
    }

    /// Sends run `run` for `duration`: packets of `size` bytes in batches
    /// (of [`SEND_BATCH`] unless [`with_batch`](Self::with_batch)), each
    /// batch paced against its deadline for `rate` packets/s (`None`: as
    /// fast as possible). When the sender cannot keep up it sends late
    /// batches at once and the report shows the achieved rate.
    pub fn send(
        &mut self,
        base: Instant,
        run: u32,
        rate: Option<f64>,
        size: usize,
        duration: Duration,
    ) -> io::Result<SendReport> {
        let size = size.clamp(packet::MIN_SIZE, packet::MAX_SIZE);
        let mut bufs: Vec<Vec<u8>> = (0..self.batch)
            .map(|i| (0..size).map(|k| (k as u8) ^ (i as u8)).collect())
            .collect();
        let interval = rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(self.batch as f64 / r));
        let cpu_before = stats::thread_cpu_seconds();
        let start = Instant::now();
        let end = start + duration;
        let mut seq: u64 = 0;
        let mut errors = 0u64;
        let mut batch: u32 = 0;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if let Some(iv) = interval {
                let deadline = start + iv * batch;
                if deadline >= end {
                    break;
                }
                if deadline > now {
                    std::thread::sleep(deadline - now);
                }
            }
            let sent_ns = now_ns(base);
            let stream = batch as usize % self.streams.len();
            let st = &mut self.streams[stream];
            for buf in bufs.iter_mut() {
                let stamp = Stamp { run, seq, sent_ns };
                let keyframe = packet::is_keyframe_every(st.sent, self.keyframe_interval);
                packet::build(buf, self.codec, st.next_rtp_seq, keyframe, stamp);
                st.next_rtp_seq = st.next_rtp_seq.wrapping_add(1);
                st.sent += 1;
                seq += 1;
            }
            let refs: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
            let mut off = 0;
            while off < refs.len() {
                match mmsg::send_batch(&st.sock, &refs[off..]) {
                    Ok(0) => break,
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        errors += 1;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            batch = batch.wrapping_add(1);
        }
        Ok(SendReport {
            sent: seq,
            elapsed: start.elapsed(),
            errors,
            cpu_seconds: cpu_before
                .zip(stats::thread_cpu_seconds())
                .map(|(a, b)| b - a),
        })
    }
}

/// What the receiver saw during one run.
#[derive(Debug, Clone, Default)]
pub struct RecvReport {
    /// Packets of this run received, per socket.
    pub per_socket: Vec<u64>,
    /// One-way latencies (ns) of the sampled packets.
    pub latencies_ns: Vec<u64>,
    /// Datagrams that were not packets of this run (RTCP, earlier runs).
    pub foreign: u64,
    /// Every packet of this run in arrival order, as (benchmark sequence
    /// number, one-way latency in ns); only from [`Receiver::recording`].
    pub arrivals: Vec<(u64, u64)>,
    /// CPU seconds the receiver thread used.
    pub cpu_seconds: Option<f64>,
}

/// A receiver thread for one run.
#[derive(Debug)]
pub struct Receiver {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<io::Result<(Vec<UdpSocket>, RecvReport)>>,
}

impl Receiver {
    /// Starts receiving run `run` on `socks`; every packet whose benchmark
    /// sequence number is a multiple of `sample_stride` contributes a latency
    /// sample.
    pub fn start(socks: Vec<UdpSocket>, base: Instant, run: u32, sample_stride: u64) -> Receiver {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-recv".into())
            .spawn(move || receive(socks, base, run, sample_stride.max(1), false, &flag))
            .expect("spawn the receiver thread");
        Receiver { stop, handle }
    }

    /// Like [`start`](Self::start) with a latency sample of every packet,
    /// and also records each packet's sequence number and latency in
    /// arrival order ([`RecvReport::arrivals`]): for runs of a few
    /// thousand packets where which packets arrived matters.
    pub fn recording(socks: Vec<UdpSocket>, base: Instant, run: u32) -> Receiver {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-recv".into())
            .spawn(move || receive(socks, base, run, 1, true, &flag))
            .expect("spawn the receiver thread");
        Receiver { stop, handle }
    }

    /// Stops the thread and returns the sockets (for the next run) and what
    /// it saw.
    pub fn finish(self) -> io::Result<(Vec<UdpSocket>, RecvReport)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| io::Error::other("the receiver thread panicked"))?
    }
}

fn receive(
    socks: Vec<UdpSocket>,
    base: Instant,
    run: u32,
    stride: u64,
    record: bool,
    stop: &AtomicBool,
) -> io::Result<(Vec<UdpSocket>, RecvReport)> {
    let mut report = RecvReport {
        per_socket: vec![0; socks.len()],
        ..RecvReport::default()
    };
    // Room for a whole GRO run (receivers started with `--gro-receivers`
    // get up to 64 KiB per buffer); without GRO one datagram fills the start.
    let mut bufs: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; GRO_BUFFER]).collect();
    let mut lens = vec![0usize; RECV_BATCH];
    let mut segs = vec![0usize; RECV_BATCH];
    let mut ready = vec![false; socks.len()];
    let cpu_before = stats::thread_cpu_seconds();
    while !stop.load(Ordering::Relaxed) {
        if mmsg::wait_readable(&socks, &mut ready, Duration::from_millis(5))? == 0 {
            continue;
        }
        for (i, sock) in socks.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            loop {
                let n = match mmsg::recv_batch(sock, &mut bufs, &mut lens, &mut segs) {
                    Ok(n) => n,
                    // An ICMP error queued on the socket: read on.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e),
                };
                let now = now_ns(base);
                for ((buf, &len), &seg) in bufs.iter().zip(&lens).zip(&segs).take(n) {
                    let seg = if seg == 0 { len.max(1) } else { seg };
                    for datagram in buf[..len].chunks(seg) {
                        match packet::parse(datagram) {
                            Some(s) if s.run == run => {
                                report.per_socket[i] += 1;
                                let latency = now.saturating_sub(s.sent_ns);
                                if s.seq.is_multiple_of(stride) {
                                    report.latencies_ns.push(latency);
                                }
                                if record {
                                    report.arrivals.push((s.seq, latency));
                                }
                            }
                            _ => report.foreign += 1,
                        }
                    }
                }
                if n < RECV_BATCH {
                    break;
                }
            }
        }
    }
    report.cpu_seconds = cpu_before
        .zip(stats::thread_cpu_seconds())
        .map(|(a, b)| b - a);
    Ok((socks, report))
}
