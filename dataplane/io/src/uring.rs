//! The io_uring backend: one ring per socket, one multishot `RecvMsg` armed
//! over a provided buffer ring, sends as linked `SendMsg` chains.
//!
//! Receive path: the kernel picks a buffer from the ring for each datagram
//! and posts a completion that names it. [`DatagramIo::recv`] copies the
//! payload out and hands the buffer straight back. When the ring runs dry the
//! multishot request ends with `ENOBUFS` (no `IORING_CQE_F_MORE`); datagrams
//! keep queueing in the socket and are picked up when `recv` re-arms.
//!
//! With `UDP_GRO` the receive template also asks for room for the `UDP_GRO`
//! control message, which the kernel writes between the name and the payload
//! of each buffer, and the buffers are enlarged to hold a whole coalesced run
//! (see [`gro_buffers`]).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use socket2::Socket;

use crate::cmsg::{self, CmsgBuf};
use crate::error::{ErrnoClass, classify};
use crate::mmsg::MmsgIo;
use crate::socket::{MAX_IOVECS, NextDatagram, SendSlots, bind_udp, plan_sends};
use crate::{Backend, DatagramIo, IoError, IoStats, RecvMeta, SocketOptions, Transmit, sockaddr};

const RECV_TAG: u64 = u64::MAX;
const CANCEL_TAG: u64 = u64::MAX - 1;
/// Sends in flight per chain; also the send slab size.
const SEND_SLOTS: usize = 64;
const BGID: u16 = 0;
/// Room for the source address in every provided buffer.
const NAME_LEN: usize = mem::size_of::<libc::sockaddr_in6>();
/// `struct io_uring_recvmsg_out` (four `__u32`s), which the kernel writes at
/// the start of every provided buffer, before the name.
const RECVMSG_OUT_LEN: usize = 16;
/// Room for the `UDP_GRO` control message (an `int`) when GRO is on.
const GRO_CONTROL_LEN: usize = cmsg::space(mem::size_of::<libc::c_int>());
/// With GRO: room for the largest coalesced run. A UDP payload never exceeds
/// 65,535 bytes, and GRO stops coalescing before that.
const GRO_PAYLOAD: usize = 1 << 16;
/// With GRO: the smallest provided buffer that holds a whole coalesced run
/// after the recvmsg header, the name and the control message.
const GRO_BUFFER_SIZE: usize =
    (RECVMSG_OUT_LEN + NAME_LEN + GRO_CONTROL_LEN + GRO_PAYLOAD).next_multiple_of(64);
// Header, name and control message in front of the largest UDP payload.
const _: () = assert!(GRO_BUFFER_SIZE >= RECVMSG_OUT_LEN + NAME_LEN + GRO_CONTROL_LEN + 65_535);
/// With GRO, when the provided buffers had to be enlarged to
/// [`GRO_BUFFER_SIZE`], at most this many are allocated (about 4 MiB).
const GRO_MAX_BUFFERS: u16 = 64;
const IORING_REGISTER_PBUF_STATUS: libc::c_uint = 26;

fn unavailable(reason: &str, source: io::Error) -> IoError {
    IoError::UringUnavailable {
        reason: format!("{reason}: {source}"),
        source: Some(source),
    }
}

/// Checks that io_uring works here and has what this backend needs:
/// `io_uring_setup`, the `RecvMsg`/`SendMsg`/`AsyncCancel` opcodes, a
/// provided buffer ring and multishot `RecvMsg`. The last two cannot be seen
/// in the opcode table, so the probe binds a loopback socket and arms one.
pub fn probe_uring() -> Result<(), IoError> {
    let ring = IoUring::new(4).map_err(|e| unavailable("io_uring_setup", e))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| unavailable("IORING_REGISTER_PROBE", e))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "IORING_OP_RECVMSG"),
        (opcode::SendMsg::CODE, "IORING_OP_SENDMSG"),
        (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(IoError::UringUnavailable {
                reason: format!("kernel lacks {name}"),
                source: None,
            });
        }
    }
    drop(ring);
    let opts = SocketOptions {
        uring_buffers: 2,
        ..SocketOptions::default()
    };
    let mut io = UringIo::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &opts)?;
    io.recv(&mut [&mut [0u8; 16]], &mut [RecvMeta::default()])
        .map_err(|e| IoError::UringUnavailable {
            reason: format!("multishot recvmsg: {e}"),
            source: None,
        })?;
    Ok(())
}

/// One `io_uring_buf`: the kernel's layout of a buffer ring entry. The
/// `resv` field of entry 0 is the ring's tail.
#[repr(C)]
struct RingEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// An anonymous private mapping, page-aligned as buffer rings require.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing touches no existing memory.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            // A placeholder left behind by a deliberate leak (see UringIo's
            // Drop): nothing was mapped.
            return;
        }
        // SAFETY: ptr/len are exactly what mmap returned, and the owner
        // (BufRing, dropped after the ring and after the multishot request
        // ended) guarantees the kernel no longer writes here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A provided buffer ring and its buffers. The kernel owns a buffer from
/// the moment its entry is published until the completion naming it is
/// reaped; we own it from then until [`BufRing::recycle`].
struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    buf_size: usize,
    /// Our copy of the tail; the shared one is only ever written by us.
    tail: u16,
}

impl BufRing {
    fn new(count: u16, buf_size: usize) -> io::Result<Self> {
        let entries = Mapping::new(usize::from(count) * mem::size_of::<RingEntry>())?;
        let buffers = Mapping::new(usize::from(count) * buf_size)?;
        let mut ring = Self {
            entries,
            buffers,
            count,
            buf_size,
            tail: 0,
        };
        for bid in 0..count {
            ring.write_entry(bid);
        }
        ring.publish();
        Ok(ring)
    }

    fn tail_atomic(&self) -> &AtomicU16 {
        // SAFETY: entry 0's `resv` (offset 14) is the ring tail, a u16 that
        // is naturally aligned in the page-aligned mapping and lives as long
        // as `self`. The kernel only reads it (with acquire semantics), so
        // sharing it as an atomic is the intended protocol.
        unsafe {
            AtomicU16::from_ptr(
                self.entries
                    .ptr
                    .as_ptr()
                    .add(mem::offset_of!(RingEntry, resv))
                    .cast::<u16>(),
            )
        }
    }

    /// Writes buffer `bid` into the slot at our tail (not yet visible).
    fn write_entry(&mut self, bid: u16) {
        let mask = self.count - 1;
        let slot = usize::from(self.tail & mask);
        // SAFETY: slot < count, so the entry lies in the mapping. The kernel
        // reads entries only between its head and the published tail, and
        // this one is at our unpublished tail, so nobody reads it now. Field
        // writes through a raw pointer leave entry 0's `resv` (the tail)
        // untouched.
        unsafe {
            let e = self.entries.ptr.as_ptr().cast::<RingEntry>().add(slot);
            ptr::addr_of_mut!((*e).addr).write(self.buffer_ptr(bid) as u64);
            ptr::addr_of_mut!((*e).len).write(self.buf_size as u32);
            ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes written entries visible to the kernel.
    fn publish(&self) {
        self.tail_atomic().store(self.tail, Ordering::Release);
    }

    fn buffer_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        // SAFETY: bid < count keeps the offset inside the buffer mapping.
        unsafe {
            self.buffers
                .ptr
                .as_ptr()
                .add(usize::from(bid) * self.buf_size)
        }
    }

    /// The first `len` bytes of buffer `bid`.
    ///
    /// # Safety
    ///
    /// A completion naming `bid` must have been reaped and the buffer not yet
    /// recycled: only then is the kernel done writing it.
    unsafe fn filled(&self, bid: u16, len: usize) -> &[u8] {
        // SAFETY: bid < count (checked by the caller against the ring size),
        // len is clamped to the buffer size, and by this fn's contract the
        // kernel does not write the buffer while the slice lives.
        unsafe { std::slice::from_raw_parts(self.buffer_ptr(bid), len.min(self.buf_size)) }
    }

    fn recycle(&mut self, bid: u16) {
        self.write_entry(bid);
        self.publish();
    }

    fn ring_addr(&self) -> u64 {
        self.entries.ptr.as_ptr() as u64
    }
}

/// A send in flight: the kernel reads `hdr`, and through it `iov`, `addr`,
/// `cmsg` and the caller's payload, until this slot's completion arrives.
struct SendSlot {
    hdr: libc::msghdr,
    /// The prefix (if any) and the contents, of each datagram of a gathered
    /// GSO run.
    iov: [libc::iovec; MAX_IOVECS],
    addr: libc::sockaddr_storage,
    cmsg: CmsgBuf,
    result: Option<i32>,
    /// The transmit this slot carries, and where the batch continues once it
    /// is sent.
    cur: usize,
    next_tx: usize,
    next_offset: usize,
    gso: bool,
    /// Datagrams the slot's message carries.
    datagrams: u16,
}

/// The uring backend's send slots, each a self-contained msghdr.
struct UringSlots<'s> {
    slots: &'s mut [SendSlot],
    v6: bool,
}

impl SendSlots for UringSlots<'_> {
    fn set_destination(&mut self, n: usize, destination: SocketAddr) -> Option<libc::socklen_t> {
        sockaddr::write(destination, self.v6, &mut self.slots[n].addr)
    }

    fn set_datagram(
        &mut self,
        n: usize,
        namelen: libc::socklen_t,
        cur: usize,
        d: &NextDatagram<'_>,
    ) {
        let s = &mut self.slots[n];
        let iovlen = crate::socket::fill_iovecs(&mut s.iov, d);
        let controllen = match d.gso {
            Some(size) => cmsg::write_segment_size(&mut s.cmsg, size),
            None => 0,
        };
        s.hdr.msg_name = (&mut s.addr as *mut libc::sockaddr_storage).cast();
        s.hdr.msg_namelen = namelen;
        s.hdr.msg_iov = s.iov.as_mut_ptr();
        s.hdr.msg_iovlen = iovlen as _;
        s.hdr.msg_control = if controllen == 0 {
            ptr::null_mut()
        } else {
            s.cmsg.0.as_mut_ptr().cast()
        };
        s.hdr.msg_controllen = controllen as _;
        s.hdr.msg_flags = 0;
        s.result = None;
        s.cur = cur;
        s.next_tx = d.next_tx;
        s.next_offset = d.next_offset;
        s.gso = d.gso.is_some();
        s.datagrams = d.datagrams();
    }
}

/// io_uring on one UDP socket. Use it from one thread once `recv` has been
/// called: completions of the armed multishot request are delivered through
/// the arming thread (moving it elsewhere is safe but adds latency).
pub struct UringIo {
    // Field order is drop order: the ring goes first, after `Drop` has ended
    // every request that points into the fields below.
    ring: IoUring,
    socket: Socket,
    bufs: BufRing,
    /// The template the multishot `RecvMsg` was armed with; boxed so its
    /// address is stable.
    recv_hdr: Box<libc::msghdr>,
    slots: Box<[SendSlot]>,
    /// Receive completions reaped while waiting for sends.
    stash: VecDeque<cqueue::Entry>,
    armed: bool,
    armed_once: bool,
    local: SocketAddr,
    v6: bool,
    gso: bool,
    /// `UDP_GRO` is on: the receive template has room for its control
    /// message and the provided buffers for a coalesced run.
    gro: bool,
    pbuf_status: bool,
    stats: IoStats,
    /// `sendmmsg` on a duplicate of the socket, unless ring sends were asked
    /// for ([`SocketOptions::uring_ring_sends`]).
    sender: Option<MmsgIo>,
}

// SAFETY: the raw pointers (buffer ring, msghdrs) point into memory this
// value owns; nothing is tied to the creating thread (no SINGLE_ISSUER), and
// completions of requests armed on another thread are still delivered by the
// kernel (through that thread's task work or its fallback).
unsafe impl Send for UringIo {}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("local", &self.local)
            .field("armed", &self.armed)
            .field("buffers", &self.bufs.count)
            .field("buffer_size", &self.bufs.buf_size)
            .field("gso", &self.gso)
            .field("gro", &self.gro)
            .finish_non_exhaustive()
    }
}

/// The provided buffers to use with GRO on, given the configured ones: each
/// must hold a whole coalesced run ([`GRO_BUFFER_SIZE`]). Buffers too small
/// for that are enlarged, and then at most [`GRO_MAX_BUFFERS`] of them are
/// kept, so that the default 512 × 2 KiB (1 MiB) becomes 64 × 64 KiB (4 MiB)
/// rather than 32 MiB. Buffers already large enough are left as configured.
fn gro_buffers(count: u16, buf_size: usize) -> (u16, usize) {
    if buf_size >= GRO_BUFFER_SIZE {
        (count, buf_size)
    } else {
        (count.min(GRO_MAX_BUFFERS), GRO_BUFFER_SIZE)
    }
}

fn zeroed_slot() -> SendSlot {
    // SAFETY: msghdr, iovec and sockaddr_storage are plain C structs for
    // which all-zero (null pointers, zero lengths) is valid.
    let (hdr, iov, addr) = unsafe { (mem::zeroed(), mem::zeroed::<libc::iovec>(), mem::zeroed()) };
    SendSlot {
        hdr,
        iov: [iov; MAX_IOVECS],
        addr,
        cmsg: CmsgBuf::new(),
        result: None,
        cur: 0,
        next_tx: 0,
        next_offset: 0,
        gso: false,
        datagrams: 0,
    }
}

impl UringIo {
    /// Binds a non-blocking UDP socket on `addr`, sets up its ring (with
    /// `COOP_TASKRUN` where the kernel has it) and registers a provided
    /// buffer ring of `opts.uring_buffers` × `opts.uring_buffer_size` bytes
    /// (enlarged with GRO, see [`SocketOptions::gro`]). The multishot
    /// receive is armed by the first [`DatagramIo::recv`], on the calling
    /// thread. Does not run [`probe_uring`]; [`crate::bind`] with
    /// [`crate::BackendChoice::Auto`] does, and falls back to [`MmsgIo`].
    ///
    /// # Errors
    ///
    /// - [`IoError::Config`]: `uring_buffers` is not a power of two at most
    ///   32768, or `uring_buffer_size` is outside 128 bytes..=1 MiB.
    /// - [`IoError::Bind`]: the socket cannot be created, configured or bound.
    /// - [`IoError::UringUnavailable`]: `io_uring_setup` or the buffer ring
    ///   registration was refused (old kernel, seccomp,
    ///   `kernel.io_uring_disabled`).
    /// - [`IoError::Os`]: mapping the buffers or duplicating the socket for
    ///   `sendmmsg` failed.
    pub fn bind(addr: SocketAddr, opts: &SocketOptions) -> Result<Self, IoError> {
        let count = opts.uring_buffers;
        if !count.is_power_of_two() || count > 32768 {
            return Err(IoError::Config(
                "uring_buffers must be a power of two, at most 32768",
            ));
        }
        let buf_size = opts.uring_buffer_size as usize;
        if !(128..=(1 << 20)).contains(&buf_size) {
            return Err(IoError::Config(
                "uring_buffer_size must be between 128 bytes and 1 MiB",
            ));
        }
        let b = bind_udp(addr, opts, opts.gro)?;
        let (count, buf_size) = if b.gro {
            gro_buffers(count, buf_size)
        } else {
            (count, buf_size)
        };
        if (count, buf_size) != (opts.uring_buffers, opts.uring_buffer_size as usize) {
            tracing::info!(local = %b.local, buffers = count, buffer_size = buf_size, "UDP_GRO: provided buffers enlarged to hold coalesced datagrams");
        }
        let sender = if opts.uring_ring_sends {
            None
        } else {
            let dup = b.socket.try_clone().map_err(|e| IoError::os("dup", e))?;
            Some(MmsgIo::from_bound(crate::socket::Bound {
                socket: dup,
                local: b.local,
                v6: b.v6,
                gso: b.gso,
                gro: false,
            }))
        };
        let cq = (u32::from(count) + 2 * SEND_SLOTS as u32).next_power_of_two();
        // COOP_TASKRUN (5.19+): a datagram arriving while the shard runs
        // queues its completion without an inter-processor interrupt; the
        // shard posts it at its next syscall, and a sleeping shard is still
        // woken. Measured: 7-12% less CPU per packet and a lower p99
        // (docs/benchmarks.md). Older kernels refuse the flag: set up
        // without it there.
        let entries = 2 * SEND_SLOTS as u32;
        let ring = match IoUring::builder()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .build(entries)
        {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                IoUring::builder().setup_cqsize(cq).build(entries)
            }
            other => other,
        }
        .map_err(|e| unavailable("io_uring_setup", e))?;
        let bufs = BufRing::new(count, buf_size).map_err(|e| IoError::os("mmap", e))?;
        // SAFETY: the entry mapping holds `count` entries, is page-aligned,
        // and outlives the registration: `bufs` is dropped after `ring`
        // (field order), and closing the ring drops the registration.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(bufs.ring_addr(), count, BGID, 0)
        }
        .map_err(|e| unavailable("IORING_REGISTER_PBUF_RING", e))?;
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
        recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        // Multishot recvmsg lays out every buffer as the recvmsg header, then
        // `msg_namelen` bytes of name, then `msg_controllen` bytes of control
        // data, then the payload; only these two lengths are read from the
        // template.
        recv_hdr.msg_controllen = if b.gro { GRO_CONTROL_LEN } else { 0 } as _;
        let mut io = Self {
            ring,
            socket: b.socket,
            bufs,
            recv_hdr,
            slots: (0..SEND_SLOTS).map(|_| zeroed_slot()).collect(),
            stash: VecDeque::with_capacity(usize::from(count) + 16),
            armed: false,
            armed_once: false,
            local: b.local,
            v6: b.v6,
            gso: b.gso,
            gro: b.gro,
            pbuf_status: true,
            stats: IoStats::default(),
            sender,
        };
        io.pbuf_status = io.kernel_head().is_some();
        Ok(io)
    }

    /// The kernel's head of the buffer ring (6.8+).
    fn kernel_head(&self) -> Option<u16> {
        #[repr(C)]
        struct BufStatus {
            buf_group: u32,
            head: u32,
            resv: [u32; 8],
        }
        let mut status = BufStatus {
            buf_group: u32::from(BGID),
            head: 0,
            resv: [0; 8],
        };
        // SAFETY: IORING_REGISTER_PBUF_STATUS writes one io_uring_buf_status
        // (this layout) into `status`, a live local; the ring fd is ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.ring.as_raw_fd(),
                IORING_REGISTER_PBUF_STATUS,
                &mut status as *mut BufStatus,
                1,
            )
        };
        (rc == 0).then_some(status.head as u16)
    }

    /// Queues `entry`, submitting first if the queue is full.
    ///
    /// # Safety
    ///
    /// Everything `entry` points at (msghdr, iovecs, names, control data,
    /// payloads, the buffer group) must stay valid and unmoved until the
    /// entry's last completion has been reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), IoError> {
        loop {
            // SAFETY: forwarded from this fn's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.enter(0)?;
        }
    }

    fn sq_room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// `io_uring_enter`, retrying what is transient.
    fn enter(&mut self, want: usize) -> Result<(), IoError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // The completion queue is full: our caller reaps, and
                    // the kernel already holds what it could not post.
                    Some(libc::EBUSY | libc::EAGAIN) => return Ok(()),
                    _ => return Err(IoError::os("io_uring_enter", e)),
                },
            }
        }
    }

    fn arm(&mut self) -> Result<(), IoError> {
        let entry =
            opcode::RecvMsgMulti::new(types::Fd(self.socket.as_raw_fd()), &*self.recv_hdr, BGID)
                .build()
                .user_data(RECV_TAG);
        // SAFETY: the entry points at `recv_hdr`, boxed (stable address) and
        // owned by self until Drop, which cancels the request and waits for
        // its final completion before anything is freed (or leaks the memory
        // if it cannot); it selects buffers from group BGID, whose ring and
        // buffers live as long as the io_uring itself.
        unsafe { self.push(&entry)? };
        if self.armed_once {
            self.stats.rearms += 1;
        }
        self.armed = true;
        self.armed_once = true;
        Ok(())
    }

    /// Handles one receive completion; returns whether it filled `buf`/`meta`.
    fn on_recv(
        &mut self,
        cqe: &cqueue::Entry,
        buf: &mut [u8],
        meta: &mut RecvMeta,
    ) -> Result<bool, IoError> {
        let flags = cqe.flags();
        let res = cqe.result();
        let bid = cqueue::buffer_select(flags);
        if res < 0 {
            if let Some(bid) = bid {
                self.bufs.recycle(bid);
            }
            return match -res {
                libc::ENOBUFS => {
                    tracing::trace!(local = %self.local, "provided buffer ring ran dry; re-arming");
                    self.stats.ring_exhausted += 1;
                    Ok(false)
                }
                libc::EINVAL | libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::EOPNOTSUPP => {
                    Err(IoError::os(
                        "multishot recvmsg",
                        io::Error::from_raw_os_error(-res),
                    ))
                }
                errno => {
                    tracing::trace!(local = %self.local, errno, "recvmsg reported a socket error");
                    if errno != libc::ECANCELED {
                        self.stats.socket_errors += 1;
                    }
                    Ok(false)
                }
            };
        }
        let Some(bid) = bid.filter(|b| *b < self.bufs.count) else {
            tracing::error!(local = %self.local, "recvmsg completion without a valid buffer");
            return Ok(false);
        };
        // SAFETY: this completion hands `bid` to us; it is recycled below,
        // after the last use of `data`.
        let data = unsafe { self.bufs.filled(bid, res as usize) };
        let filled = match types::RecvMsgOut::parse(data, &self.recv_hdr) {
            Ok(out) => {
                let payload = out.payload_data();
                let len = payload.len().min(buf.len());
                buf[..len].copy_from_slice(&payload[..len]);
                // With GRO, a lost control message means a coalesced run
                // whose segment size is unknown: it cannot be split, so it is
                // reported as truncated, like a payload that did not fit.
                let control_lost = self.gro && out.is_control_data_truncated();
                if control_lost {
                    tracing::trace!(local = %self.local, "recvmsg control data truncated (MSG_CTRUNC)");
                }
                *meta = RecvMeta {
                    len,
                    source: sockaddr::read(out.name_data()).unwrap_or(RecvMeta::default().source),
                    truncated: out.is_payload_truncated()
                        || control_lost
                        || payload.len() > buf.len(),
                    gro_segment: if self.gro && !control_lost {
                        cmsg::parse_gro(out.control_data())
                    } else {
                        None
                    },
                };
                true
            }
            Err(()) => {
                tracing::error!(local = %self.local, len = res, "unparseable recvmsg completion");
                false
            }
        };
        self.bufs.recycle(bid);
        Ok(filled)
    }

    fn on_cqe(&mut self, cqe: cqueue::Entry) {
        match cqe.user_data() {
            RECV_TAG => {
                // `armed` follows the ring, not the stash: a stashed final
                // completion means the request has already ended.
                if !cqueue::more(cqe.flags()) {
                    self.armed = false;
                }
                self.stash.push_back(cqe);
            }
            CANCEL_TAG => {}
            slot => {
                if let Some(s) = self.slots.get_mut(slot as usize) {
                    s.result = Some(cqe.result());
                }
            }
        }
    }

    /// Fills send slots from `batch`, starting at transmit `start_tx`, byte
    /// `start_offset`, and pushes them as one linked chain; returns the
    /// count. Leading transmits the socket cannot address are dropped and the
    /// start moved past them, as in the mmsg backend.
    fn push_chain(
        &mut self,
        batch: &[Transmit<'_>],
        start_tx: &mut usize,
        start_offset: &mut usize,
    ) -> Result<usize, IoError> {
        let mut slots = UringSlots {
            slots: &mut self.slots,
            v6: self.v6,
        };
        let n = plan_sends(
            &mut slots,
            SEND_SLOTS,
            batch,
            start_tx,
            start_offset,
            self.gso,
            self.local,
            &mut self.stats.send_dropped,
        );
        // Make room for the whole chain first, so that no error can return
        // while part of it is queued.
        while self.sq_room() < n {
            self.enter(0)?;
        }
        for i in 0..n {
            // MSG_DONTWAIT: a full socket completes with EAGAIN instead of
            // parking the request on a poll. IO_LINK: the chain runs in
            // order and the first failure cancels the rest, so successes
            // are always a prefix.
            let link = if i + 1 < n {
                squeue::Flags::IO_LINK
            } else {
                squeue::Flags::empty()
            };
            let entry =
                opcode::SendMsg::new(types::Fd(self.socket.as_raw_fd()), &self.slots[i].hdr)
                    .flags(libc::MSG_DONTWAIT as u32)
                    .build()
                    .flags(link)
                    .user_data(i as u64);
            // SAFETY: the entry points at slot i of the send slab: a boxed
            // slice owned by self (stable addresses), whose msghdr, iovec,
            // sockaddr and cmsg are not written again until this slot's
            // completion is reaped. Through the iovec it points at the
            // caller's payload, borrowed by `send` for the whole call, and
            // `send` does not return before `wait_chain` has reaped every
            // slot of the chain (it aborts the process rather than return
            // with a send in flight). The queue has room (checked above), so
            // this push cannot fail half-way through the chain.
            unsafe { self.push(&entry)? };
        }
        Ok(n)
    }

    /// Waits until every slot of the chain has its completion. The kernel
    /// reads caller memory until then, so this cannot give up: an
    /// unrecoverable ring error here aborts the process.
    fn wait_chain(&mut self, n: usize) {
        loop {
            loop {
                let Some(cqe) = self.ring.completion().next() else {
                    break;
                };
                self.on_cqe(cqe);
            }
            if self.slots[..n].iter().all(|s| s.result.is_some()) {
                return;
            }
            if let Err(e) = self.enter(1) {
                tracing::error!(error = %e, "io_uring broke with sends in flight; aborting to keep their buffers safe");
                std::process::abort();
            }
        }
    }
}

impl DatagramIo for UringIo {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    fn recv(&mut self, bufs: &mut [&mut [u8]], meta: &mut [RecvMeta]) -> Result<usize, IoError> {
        let cap = bufs.len().min(meta.len());
        let mut n = 0;
        while n < cap {
            let Some(cqe) = self.stash.pop_front() else {
                break;
            };
            if self.on_recv(&cqe, bufs[n], &mut meta[n])? {
                n += 1;
            }
        }
        // Re-arming is bounded per call so that a socket error that ends
        // every request cannot spin here.
        let mut arms = 0;
        while n < cap {
            if !self.armed {
                if arms == 4 {
                    break;
                }
                arms += 1;
                self.arm()?;
            }
            // Enter only when there is something to submit or nothing to
            // reap: entering also runs the task work that posts completions.
            let submit = !self.ring.submission().is_empty();
            if submit || self.ring.completion().is_empty() {
                self.enter(0)?;
            }
            let before = n;
            while n < cap {
                let Some(cqe) = self.ring.completion().next() else {
                    break;
                };
                if cqe.user_data() != RECV_TAG {
                    self.on_cqe(cqe);
                    continue;
                }
                if !cqueue::more(cqe.flags()) {
                    self.armed = false;
                }
                if self.on_recv(&cqe, bufs[n], &mut meta[n])? {
                    n += 1;
                }
            }
            if n == before && self.armed {
                break;
            }
        }
        Ok(n)
    }

    fn send(&mut self, batch: &[Transmit<'_>]) -> Result<usize, IoError> {
        if let Some(sender) = &mut self.sender {
            return sender.send(batch);
        }
        let (mut tx, mut offset) = (0, 0);
        let mut retried = None;
        while tx < batch.len() {
            let n = self.push_chain(batch, &mut tx, &mut offset)?;
            if n == 0 {
                // Everything left was dropped while filling.
                break;
            }
            self.wait_chain(n);
            let sent = self.slots[..n]
                .iter()
                .take_while(|s| s.result.is_some_and(|r| r >= 0))
                .count();
            for s in self.slots[..sent].iter().filter(|s| s.gso) {
                self.stats.gso_sends += 1;
                self.stats.gso_datagrams += u64::from(s.datagrams);
            }
            if sent == n {
                let last = &self.slots[n - 1];
                (tx, offset) = (last.next_tx, last.next_offset);
                continue;
            }
            if sent > 0 {
                let last = &self.slots[sent - 1];
                (tx, offset) = (last.next_tx, last.next_offset);
            }
            let failed = &self.slots[sent];
            let errno = -failed.result.unwrap_or(-libc::EIO);
            let (cur, gso) = (failed.cur, failed.gso);
            match classify(errno) {
                ErrnoClass::Retry => {}
                ErrnoClass::WouldBlock => return Ok(cur),
                ErrnoClass::Datagram if gso && (errno == libc::EIO || errno == libc::EINVAL) => {
                    tracing::warn!(errno, local = %self.local, "kernel refused UDP_SEGMENT, splitting GSO transmits from now on");
                    self.gso = false;
                    self.stats.gso_disabled = true;
                }
                ErrnoClass::Datagram if retried != Some((tx, offset)) => {
                    retried = Some((tx, offset))
                }
                ErrnoClass::Datagram => {
                    tracing::debug!(errno, destination = %batch[cur].destination, "dropping datagram the kernel refused");
                    self.stats.send_dropped += 1;
                    (tx, offset) = (cur + 1, 0);
                }
                ErrnoClass::Fatal => {
                    return Err(IoError::os("sendmsg", io::Error::from_raw_os_error(errno)));
                }
            }
        }
        Ok(tx)
    }

    fn backend(&self) -> Backend {
        Backend::Uring
    }

    fn socket_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn stats(&self) -> IoStats {
        let mut s = self.stats;
        if let Some(sender) = &self.sender {
            let t = sender.stats();
            s.send_dropped += t.send_dropped;
            s.gso_disabled |= t.gso_disabled;
            s.gso_sends += t.gso_sends;
            s.gso_datagrams += t.gso_datagrams;
        }
        s
    }

    fn buffers_outstanding(&self) -> usize {
        let available = if self.pbuf_status {
            self.kernel_head()
                .map(|head| self.bufs.tail.wrapping_sub(head))
        } else {
            None
        };
        let held_by_stash = self.stash.len();
        match available {
            Some(a) => usize::from(self.bufs.count) - usize::from(a),
            None => held_by_stash,
        }
    }

    fn max_gso_segments(&self) -> usize {
        match &self.sender {
            Some(sender) => sender.max_gso_segments(),
            None if self.gso => cmsg::UDP_MAX_SEGMENTS,
            None => 1,
        }
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // The armed multishot request writes into `bufs` and reads
        // `recv_hdr`: cancel it and wait for its last completion before any
        // of that memory goes away.
        let cancel = opcode::AsyncCancel::new(RECV_TAG)
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request points at no memory.
        let mut ok = unsafe { self.push(&cancel) }.is_ok();
        // Bounded: never hang in drop; after ~2 s, leak instead.
        let wait = types::Timespec::new().nsec(50_000_000);
        for _ in 0..40 {
            if !ok || !self.armed {
                break;
            }
            let args = types::SubmitArgs::new().timespec(&wait);
            ok = match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => true,
                Err(e) => matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY | libc::EAGAIN)
                ),
            };
            loop {
                let Some(cqe) = self.ring.completion().next() else {
                    break;
                };
                if cqe.user_data() == RECV_TAG && !cqueue::more(cqe.flags()) {
                    self.armed = false;
                }
            }
        }
        if self.armed {
            tracing::error!(local = %self.local, "could not end the receive request; leaking its buffers");
            // Leak rather than free memory the kernel may still write.
            let bufs = mem::replace(
                &mut self.bufs.buffers,
                Mapping {
                    ptr: NonNull::dangling(),
                    len: 0,
                },
            );
            mem::forget(bufs);
            // SAFETY: msghdr is plain data; all-zero is valid.
            let hdr = mem::replace(&mut self.recv_hdr, Box::new(unsafe { mem::zeroed() }));
            mem::forget(hdr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gro_buffers_hold_the_largest_run() {
        // The default 512 x 2 KiB becomes 64 enlarged buffers, not 32 MiB.
        assert_eq!(gro_buffers(512, 2048), (64, GRO_BUFFER_SIZE));
        assert_eq!(gro_buffers(8, 2048), (8, GRO_BUFFER_SIZE));
        // Buffers already large enough are used as configured.
        assert_eq!(gro_buffers(512, 1 << 17), (512, 1 << 17));
        assert_eq!(gro_buffers(256, GRO_BUFFER_SIZE), (256, GRO_BUFFER_SIZE));
    }
}
