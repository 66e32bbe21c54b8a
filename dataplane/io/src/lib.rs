//! Datagram I/O for the Ridge dataplane shards.
//!
//! This crate holds every line of `unsafe` the dataplane needs: raw
//! `recvmmsg`/`sendmmsg`, control messages (UDP GSO/GRO), and io_uring with a
//! provided buffer ring. The layers above see one safe trait, [`DatagramIo`],
//! with two backends behind it:
//!
//! - [`Backend::Uring`]: one io_uring per socket, one multishot `RecvMsg`
//!   armed over a provided buffer ring, sends as linked `SendMsg` chains.
//! - [`Backend::Mmsg`]: `recvmmsg`/`sendmmsg` on a non-blocking socket with
//!   preallocated headers; the fallback when io_uring is unavailable.
//!
//! [`bind`] with [`BackendChoice::Auto`] runs [`probe_uring`] and falls back
//! to `Mmsg` with one log line that says why.
//!
//! # Run loop
//!
//! Wait until [`DatagramIo::raw_fd`] polls readable, then call
//! [`DatagramIo::recv`] until it returns `Ok(0)`. `recv` never blocks.
//! [`DatagramIo::send`] returns how many transmits, from the front of the
//! batch, it consumed; keep the rest and retry them later (the socket was
//! full). A datagram the kernel rejects for its own sake (unreachable
//! destination, wrong address family, too big) is dropped, logged and counted
//! as consumed, because retrying it would never succeed.
//!
//! # Errors
//!
//! Peer behaviour (ICMP errors, truncated datagrams, floods) never surfaces as
//! an error. Errors are configuration problems at [`bind`] time or internal
//! failures (a broken ring, a closed descriptor) that mean the socket is no
//! longer usable.
//!
//! # Copies
//!
//! Received payloads are copied once, from the kernel (mmsg) or from the
//! provided ring buffer (uring), into the caller's buffers. Handing the ring
//! buffers themselves out as refcounted packets, for zero-copy fan-out, is
//! later work.

#![deny(missing_docs)]

pub mod alloc;
mod cmsg;
mod error;
mod mmsg;
mod readiness;
mod sockaddr;
mod socket;
mod uring;

use std::net::SocketAddr;
use std::os::fd::RawFd;

pub use alloc::CountingAlloc;
pub use error::IoError;

pub use mmsg::MmsgIo;
pub use readiness::{dup_socket, register_readiness};
pub use uring::{UringIo, probe_uring};

/// What the kernel told us about one received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes written into the caller's buffer (never more than its length).
    pub len: usize,
    /// Who sent it. On a dual-stack IPv6 socket IPv4 peers appear as
    /// v4-mapped IPv6 addresses.
    pub source: SocketAddr,
    /// The datagram was larger than the buffer and its tail is lost
    /// (`MSG_TRUNC`).
    pub truncated: bool,
    /// With GRO, the buffer holds several datagrams of this size (the last
    /// may be shorter), coalesced by the kernel.
    pub gro_segment: Option<u16>,
}

impl Default for RecvMeta {
    fn default() -> Self {
        Self {
            len: 0,
            source: SocketAddr::from(([0, 0, 0, 0], 0)),
            truncated: false,
            gro_segment: None,
        }
    }
}

/// One datagram (or, with `segment_size`, a run of equal-sized datagrams) to
/// send.
#[derive(Debug, Clone, Copy)]
pub struct Transmit<'a> {
    /// Where the datagram goes. On an IPv6 socket an IPv4 destination is
    /// sent to its v4-mapped address; on an IPv4 socket a v4-mapped IPv6
    /// destination is sent to its IPv4 address, and any other IPv6 one is
    /// dropped and counted in [`IoStats::send_dropped`] (never an error).
    pub destination: SocketAddr,
    /// Bytes sent ahead of `contents` in the same datagram, from a separate
    /// buffer: a header rewritten per destination in front of a payload
    /// shared by every destination (zero-copy fan-out). Usually empty. A
    /// transmit with a prefix is one datagram: `segment_size` is ignored.
    pub prefix: &'a [u8],
    /// The payload: one datagram, or with `segment_size` a run of
    /// datagrams laid end to end. Read in place by the kernel (no copy);
    /// the borrow only has to last for the [`DatagramIo::send`] call.
    pub contents: &'a [u8],
    /// Bytes sent after `contents` in the same datagram, from a separate
    /// buffer: a trailer computed per destination behind a shared payload
    /// (an SRTP tag). Usually empty. A transmit with a suffix is one
    /// datagram: `segment_size` is ignored.
    pub suffix: &'a [u8],
    /// GSO: `contents` is several datagrams of this size, the last of which
    /// may be shorter. Sent in one syscall when the kernel supports
    /// `UDP_SEGMENT`, split into separate datagrams otherwise. Keep the count
    /// at or below [`DatagramIo::max_gso_segments`].
    pub segment_size: Option<u16>,
}

impl<'a> Transmit<'a> {
    /// One datagram of `contents` to `destination`.
    pub fn new(destination: SocketAddr, contents: &'a [u8]) -> Self {
        Self {
            destination,
            prefix: &[],
            contents,
            suffix: &[],
            segment_size: None,
        }
    }

    /// Bytes this transmit puts on the wire (all segments, no headers).
    pub fn len(&self) -> usize {
        self.prefix.len() + self.contents.len() + self.suffix.len()
    }

    /// Whether this transmit carries no bytes at all (prefix, contents and
    /// suffix all empty). An empty transmit is never gathered into a GSO
    /// run: it goes alone, as a zero-length datagram.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters of events that are not errors but an operator wants to see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IoStats {
    /// Datagrams dropped because the kernel refused them (unreachable
    /// destination, wrong family, too big).
    pub send_dropped: u64,
    /// Pending socket errors (usually ICMP unreachables) reported to a
    /// receive call and cleared.
    pub socket_errors: u64,
    /// uring: times the provided buffer ring ran dry (`ENOBUFS`).
    pub ring_exhausted: u64,
    /// uring: times the multishot receive was re-armed after it ended.
    pub rearms: u64,
    /// The kernel refused `UDP_SEGMENT` at send time and GSO was turned off.
    pub gso_disabled: bool,
    /// Sends that carried several datagrams with `UDP_SEGMENT` (a caller's
    /// GSO run or one gathered from consecutive transmits).
    pub gso_sends: u64,
    /// Datagrams those sends carried.
    pub gso_datagrams: u64,
}

/// Which implementation is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// [`UringIo`]: io_uring with a multishot receive over a provided
    /// buffer ring.
    Uring,
    /// [`MmsgIo`]: `recvmmsg`/`sendmmsg` on a non-blocking socket.
    Mmsg,
}

/// Which implementation [`bind`] should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring when [`probe_uring`] succeeds, mmsg otherwise.
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// recvmmsg/sendmmsg.
    Mmsg,
}

/// Socket and backend options, validated by [`bind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// `SO_REUSEPORT`, so that several shards can bind the same address.
    pub reuse_port: bool,
    /// `SO_RCVBUF` in bytes; `None` keeps the system default.
    pub recv_buffer_size: Option<usize>,
    /// `SO_SNDBUF` in bytes; `None` keeps the system default.
    pub send_buffer_size: Option<usize>,
    /// Use `UDP_SEGMENT` when the kernel accepts it: for a transmit with a
    /// `segment_size`, and to gather consecutive transmits of a batch that go
    /// to one destination with one length (a shorter one may end the run)
    /// into one GSO send, built from their prefixes and contents without a
    /// copy (datagrams of at most 1,452 bytes, so that no segment exceeds a
    /// 1,500-byte path MTU). The receiver gets the same datagrams either way; a 1:1 relay or
    /// a fan-out whose batch is grouped by destination pays one send per run
    /// instead of one per datagram.
    pub gso: bool,
    /// Enable `UDP_GRO` on receive: a run of equal-sized datagrams from one
    /// sender may arrive as one buffer, described by
    /// [`RecvMeta::gro_segment`]. Coalesced runs need large receive buffers
    /// (64 KiB): a smaller caller buffer truncates them. Both backends honour
    /// it; uring also needs its provided buffers that large, so with GRO on
    /// buffers smaller than 64 KiB plus headers are enlarged and at most 64
    /// of them kept (about 4 MiB per socket; larger configured buffers are
    /// used as they are).
    pub gro: bool,
    /// uring: number of provided buffers (a power of two, at most 32768).
    pub uring_buffers: u16,
    /// uring: size of each provided buffer, headers included (see `gro`).
    pub uring_buffer_size: u32,
    /// uring: send through linked `SendMsg` chains on the ring instead of
    /// `sendmmsg` on the socket. Off by default: our sends are synchronous
    /// (the caller waits for them), and on loopback the ring path measured
    /// about 30% slower than one `sendmmsg` per batch (`examples/loopback_flood`,
    /// docs/benchmarks.md).
    pub uring_ring_sends: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            reuse_port: false,
            recv_buffer_size: None,
            send_buffer_size: None,
            gso: true,
            gro: false,
            uring_buffers: 512,
            uring_buffer_size: 2048,
            uring_ring_sends: false,
        }
    }
}

/// A bound, non-blocking UDP socket with batched receive and send.
///
/// Both backends ([`MmsgIo`], [`UringIo`]) keep the same contract, tested by
/// the same suite (`tests/backends.rs`):
///
/// - no call blocks, and none allocates in steady state;
/// - peer behaviour (ICMP errors, truncated or oversized datagrams, floods)
///   never surfaces as an [`IoError`]: it is counted in [`IoStats`] or
///   reported in [`RecvMeta`];
/// - an `Err` from [`recv`](Self::recv) or [`send`](Self::send) is an
///   [`IoError::Os`] and means the socket or ring is no longer usable: drop
///   it (and rebind) rather than retry.
pub trait DatagramIo {
    /// The address the socket is bound to, with the port the kernel chose
    /// when [`bind`] was given port 0.
    fn local_addr(&self) -> SocketAddr;

    /// The descriptor to wait on for readability (tokio `AsyncFd`, epoll).
    /// For mmsg this is the socket; for uring it is the ring, which polls
    /// readable when completions are pending.
    fn raw_fd(&self) -> RawFd;

    /// Receives up to `min(bufs.len(), meta.len())` datagrams (mmsg: at most
    /// 64 per call) without blocking; `Ok(0)` when nothing is pending.
    /// Datagram `i` lands in `bufs[i]`, described by `meta[i]`; entries
    /// past the returned count are left as they were.
    ///
    /// A datagram larger than its buffer (or, uring, than a provided
    /// buffer) is cut and reported with [`RecvMeta::truncated`]; later
    /// datagrams still arrive. A pending socket error (an ICMP unreachable
    /// for an earlier send) is cleared and counted in
    /// [`IoStats::socket_errors`].
    ///
    /// # Errors
    ///
    /// [`IoError::Os`] when the descriptor or ring is broken (`EBADF`,
    /// `EFAULT`, a multishot receive the kernel rejects): the socket is no
    /// longer usable.
    fn recv(&mut self, bufs: &mut [&mut [u8]], meta: &mut [RecvMeta]) -> Result<usize, IoError>;

    /// Sends as much of `batch` as the kernel takes and returns how many
    /// transmits, from the front, were consumed (sent, or dropped because the
    /// kernel rejected that datagram). A full socket gives a short count,
    /// never an error. With GSO on, runs of consecutive transmits to one
    /// destination may leave as one `UDP_SEGMENT` send (see
    /// [`SocketOptions::gso`]); keep a batch grouped by destination to make
    /// the most of it.
    ///
    /// The kernel reads the transmits' buffers in place; they need only
    /// stay borrowed for the call. A GSO transmit that stops half-way
    /// through is not counted as consumed, so a retry may resend its first
    /// segments (SRTP replay protection drops such duplicates).
    ///
    /// # Errors
    ///
    /// [`IoError::Os`] when the descriptor or ring is broken; nothing a
    /// destination does produces an error.
    fn send(&mut self, batch: &[Transmit<'_>]) -> Result<usize, IoError>;

    /// Which implementation this is; fixed at [`bind`].
    fn backend(&self) -> Backend;

    /// The UDP socket itself, for socket options and for attaching a
    /// `SO_ATTACH_REUSEPORT_EBPF` program. Do not read from or write to it.
    fn socket_fd(&self) -> RawFd;

    /// A snapshot of the counters since [`bind`]. They only grow (and
    /// [`IoStats::gso_disabled`] only turns on), so a caller exporting them
    /// as metrics can diff consecutive snapshots.
    fn stats(&self) -> IoStats;

    /// Provided buffers currently held by completions not yet consumed
    /// (uring); always 0 for mmsg. For leak tests.
    #[doc(hidden)]
    fn buffers_outstanding(&self) -> usize {
        0
    }

    /// How many segments one GSO transmit may carry; 1 when GSO is off.
    fn max_gso_segments(&self) -> usize;
}

/// Binds a UDP socket on `addr` with the chosen backend.
///
/// The socket is non-blocking, with the options in `opts` applied before
/// the bind; GSO and GRO are probed and quietly left off (one `info` line)
/// where the kernel lacks them. With [`BackendChoice::Auto`], a failed
/// [`probe_uring`] or io_uring setup falls back to [`MmsgIo`] with one
/// `warn` line that says why.
///
/// # Errors
///
/// - [`IoError::Config`]: `opts` is invalid (uring buffer count or size out
///   of range); the caller's fault.
/// - [`IoError::Bind`]: the socket cannot be created, configured or bound
///   (address in use, not local, permissions).
/// - [`IoError::UringUnavailable`]: only with [`BackendChoice::Uring`], the
///   kernel cannot run the io_uring backend here.
/// - [`IoError::Os`]: a setup call failed (`mmap`, `dup`).
pub fn bind(
    addr: SocketAddr,
    prefer: BackendChoice,
    opts: &SocketOptions,
) -> Result<Box<dyn DatagramIo + Send>, IoError> {
    match prefer {
        BackendChoice::Mmsg => Ok(Box::new(MmsgIo::bind(addr, opts)?)),
        BackendChoice::Uring => Ok(Box::new(UringIo::bind(addr, opts)?)),
        BackendChoice::Auto => match probe_uring() {
            Ok(()) => match UringIo::bind(addr, opts) {
                Ok(io) => Ok(Box::new(io)),
                Err(e @ IoError::UringUnavailable { .. }) => {
                    tracing::warn!(error = %e, "io_uring setup failed, using recvmmsg/sendmmsg");
                    Ok(Box::new(MmsgIo::bind(addr, opts)?))
                }
                Err(e) => Err(e),
            },
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, using recvmmsg/sendmmsg");
                Ok(Box::new(MmsgIo::bind(addr, opts)?))
            }
        },
    }
}
