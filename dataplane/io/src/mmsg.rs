//! The `recvmmsg`/`sendmmsg` backend.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;

use socket2::Socket;

use crate::cmsg::{self, CmsgBuf};
use crate::error::{ErrnoClass, classify};
use crate::socket::{MAX_IOVECS, NextDatagram, SendSlots, bind_udp, plan_sends};
use crate::{Backend, DatagramIo, IoError, IoStats, RecvMeta, SocketOptions, Transmit, sockaddr};

/// Messages per syscall.
const BATCH: usize = 64;

/// Preallocated `mmsghdr`s and everything they point to. The pointers are
/// filled in on every call, just before the syscall, so moving the struct
/// never leaves a stale one behind.
struct Headers<const IOV: usize> {
    hdrs: Vec<libc::mmsghdr>,
    /// `IOV` per message: one to receive into; to send, an optional prefix
    /// and the contents of each datagram of a gathered GSO run.
    iovs: Vec<[libc::iovec; IOV]>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<CmsgBuf>,
}

impl<const IOV: usize> Headers<IOV> {
    fn new() -> Self {
        // SAFETY: mmsghdr, iovec and sockaddr_storage are plain C structs for
        // which all-zero (null pointers, zero lengths) is a valid value.
        let (hdr, iov, addr) = unsafe {
            (
                mem::zeroed::<libc::mmsghdr>(),
                mem::zeroed::<libc::iovec>(),
                mem::zeroed::<libc::sockaddr_storage>(),
            )
        };
        Self {
            hdrs: vec![hdr; BATCH],
            iovs: vec![[iov; IOV]; BATCH],
            addrs: vec![addr; BATCH],
            cmsgs: vec![CmsgBuf::new(); BATCH],
        }
    }

    /// Points header `i` at its own address, iovec and control buffer.
    /// `iovlen` of its iovecs are in use.
    fn link(&mut self, i: usize, namelen: libc::socklen_t, controllen: usize, iovlen: usize) {
        let h = &mut self.hdrs[i];
        h.msg_len = 0;
        h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        h.msg_hdr.msg_namelen = namelen;
        h.msg_hdr.msg_iov = self.iovs[i].as_mut_ptr();
        h.msg_hdr.msg_iovlen = iovlen as _;
        h.msg_hdr.msg_control = if controllen == 0 {
            ptr::null_mut()
        } else {
            self.cmsgs[i].0.as_mut_ptr().cast()
        };
        h.msg_hdr.msg_controllen = controllen as _;
        h.msg_hdr.msg_flags = 0;
    }
}

/// Where a send slot leaves the batch once it is sent: the transmit index
/// and byte offset to continue from.
#[derive(Debug, Clone, Copy, Default)]
struct Resume {
    /// The transmit this slot carries.
    cur: usize,
    tx: usize,
    offset: usize,
    gso: bool,
    /// Datagrams the slot's message carries.
    datagrams: u16,
}

/// `recvmmsg`/`sendmmsg` on a non-blocking socket.
pub struct MmsgIo {
    socket: Socket,
    local: SocketAddr,
    v6: bool,
    gso: bool,
    gro: bool,
    recv: Headers<1>,
    send: Headers<MAX_IOVECS>,
    resume: Vec<Resume>,
    stats: IoStats,
}

// SAFETY: the raw pointers inside `Headers` only ever point into the same
// MmsgIo's own heap arrays or, during one call, into the caller's buffers;
// they are rewritten before every syscall and never shared, so moving the
// whole value to another thread is sound.
unsafe impl Send for MmsgIo {}

impl std::fmt::Debug for MmsgIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmsgIo")
            .field("local", &self.local)
            .field("gso", &self.gso)
            .field("gro", &self.gro)
            .finish_non_exhaustive()
    }
}

impl MmsgIo {
    /// Binds a non-blocking UDP socket on `addr` with `opts` (the `uring_*`
    /// options are ignored). Prefer [`crate::bind`], which returns the
    /// backend behind [`DatagramIo`]; this is for callers that need this
    /// backend by type.
    ///
    /// # Errors
    ///
    /// [`IoError::Bind`] when the socket cannot be created, configured or
    /// bound. Missing GSO or GRO support is not an error: it is logged and
    /// left off.
    pub fn bind(addr: SocketAddr, opts: &SocketOptions) -> Result<Self, IoError> {
        Ok(Self::from_bound(bind_udp(addr, opts, opts.gro)?))
    }

    /// Wraps an already bound socket (the io_uring backend sends through
    /// one of these on a duplicate of its own socket).
    pub(crate) fn from_bound(b: crate::socket::Bound) -> Self {
        Self {
            socket: b.socket,
            local: b.local,
            v6: b.v6,
            gso: b.gso,
            gro: b.gro,
            recv: Headers::new(),
            send: Headers::new(),
            resume: vec![Resume::default(); BATCH],
            stats: IoStats::default(),
        }
    }

    /// Fills send slots from `batch`; see [`plan_sends`].
    fn fill(
        &mut self,
        batch: &[Transmit<'_>],
        start_tx: &mut usize,
        start_offset: &mut usize,
    ) -> usize {
        let mut slots = MmsgSlots {
            send: &mut self.send,
            resume: &mut self.resume,
            v6: self.v6,
        };
        plan_sends(
            &mut slots,
            BATCH,
            batch,
            start_tx,
            start_offset,
            self.gso,
            self.local,
            &mut self.stats.send_dropped,
        )
    }
}

/// The mmsg backend's send slots: header arrays plus where each resumes.
struct MmsgSlots<'s> {
    send: &'s mut Headers<MAX_IOVECS>,
    resume: &'s mut [Resume],
    v6: bool,
}

impl SendSlots for MmsgSlots<'_> {
    fn set_destination(&mut self, n: usize, destination: SocketAddr) -> Option<libc::socklen_t> {
        sockaddr::write(destination, self.v6, &mut self.send.addrs[n])
    }

    fn set_datagram(
        &mut self,
        n: usize,
        namelen: libc::socklen_t,
        cur: usize,
        d: &NextDatagram<'_>,
    ) {
        let iovlen = crate::socket::fill_iovecs(&mut self.send.iovs[n], d);
        let controllen = match d.gso {
            Some(s) => cmsg::write_segment_size(&mut self.send.cmsgs[n], s),
            None => 0,
        };
        self.send.link(n, namelen, controllen, iovlen);
        self.resume[n] = Resume {
            cur,
            tx: d.next_tx,
            offset: d.next_offset,
            gso: d.gso.is_some(),
            datagrams: d.datagrams(),
        };
    }
}

impl DatagramIo for MmsgIo {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn recv(&mut self, bufs: &mut [&mut [u8]], meta: &mut [RecvMeta]) -> Result<usize, IoError> {
        let n = bufs.len().min(meta.len()).min(BATCH);
        if n == 0 {
            return Ok(0);
        }
        let controllen = if self.gro { cmsg::space(4) } else { 0 };
        for (i, buf) in bufs.iter_mut().take(n).enumerate() {
            self.recv.iovs[i][0] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            self.recv.link(
                i,
                mem::size_of::<libc::sockaddr_storage>() as _,
                controllen,
                1,
            );
        }
        let mut attempts = 0;
        let got = loop {
            // SAFETY: headers 0..n were just linked to this struct's own
            // address/control arrays and to iovecs covering the caller's
            // `bufs`, all of which stay borrowed and alive for the duration
            // of this blocking-free call; n <= BATCH is the array length.
            let rc = unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    self.recv.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    0,
                    ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let err = io::Error::last_os_error();
            match classify(err.raw_os_error().unwrap_or(0)) {
                ErrnoClass::Retry => {}
                ErrnoClass::WouldBlock => return Ok(0),
                // A pending ICMP error is reported once and cleared; the
                // datagrams behind it are still queued.
                ErrnoClass::Datagram => {
                    tracing::trace!(error = %err, local = %self.local, "recvmmsg reported a socket error");
                    self.stats.socket_errors += 1;
                    attempts += 1;
                    if attempts > 4 {
                        return Ok(0);
                    }
                }
                ErrnoClass::Fatal => return Err(IoError::os("recvmmsg", err)),
            }
        };
        for (i, m) in meta.iter_mut().take(got).enumerate() {
            let h = &self.recv.hdrs[i];
            #[allow(clippy::unnecessary_cast, reason = "msg_controllen is u32 on musl")]
            let got_control = h.msg_hdr.msg_controllen as usize;
            let control = &self.recv.cmsgs[i].0[..got_control.min(controllen)];
            *m = RecvMeta {
                len: h.msg_len as usize,
                source: sockaddr::read(sockaddr::storage_bytes(
                    &self.recv.addrs[i],
                    h.msg_hdr.msg_namelen,
                ))
                .unwrap_or(RecvMeta::default().source),
                // With GRO, a lost control message means a coalesced run
                // whose segment size is unknown: report it as truncated, as
                // the uring backend does.
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0
                    || (self.gro && h.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0),
                gro_segment: if self.gro {
                    cmsg::parse_gro(control)
                } else {
                    None
                },
            };
        }
        Ok(got)
    }

    fn send(&mut self, batch: &[Transmit<'_>]) -> Result<usize, IoError> {
        let (mut tx, mut offset) = (0, 0);
        // A pending ICMP error from an earlier datagram is reported (and
        // cleared) by whichever send comes next, so a refused datagram gets
        // one more try before it is dropped.
        let mut retried = None;
        while tx < batch.len() {
            let n = self.fill(batch, &mut tx, &mut offset);
            if n == 0 {
                // Everything left was dropped while filling.
                break;
            }
            // SAFETY: `fill` linked headers 0..n to this struct's own
            // address/control arrays and to iovecs over `batch`'s contents,
            // which the caller keeps borrowed until we return; the kernel
            // only reads them during this call.
            let rc = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    self.send.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    0,
                )
            };
            if rc > 0 {
                for r in self.resume[..rc as usize].iter().filter(|r| r.gso) {
                    self.stats.gso_sends += 1;
                    self.stats.gso_datagrams += u64::from(r.datagrams);
                }
                let r = self.resume[rc as usize - 1];
                (tx, offset) = (r.tx, r.offset);
                continue;
            }
            let err = io::Error::last_os_error();
            let errno = err.raw_os_error().unwrap_or(0);
            match classify(errno) {
                ErrnoClass::Retry => {}
                ErrnoClass::WouldBlock => return Ok(self.resume[0].cur),
                ErrnoClass::Datagram
                    if self.resume[0].gso && (errno == libc::EIO || errno == libc::EINVAL) =>
                {
                    tracing::warn!(error = %err, local = %self.local, "kernel refused UDP_SEGMENT, splitting GSO transmits from now on");
                    self.gso = false;
                    self.stats.gso_disabled = true;
                }
                ErrnoClass::Datagram if retried != Some((tx, offset)) => {
                    retried = Some((tx, offset))
                }
                ErrnoClass::Datagram => {
                    let cur = self.resume[0].cur;
                    tracing::debug!(error = %err, destination = %batch[cur].destination, "dropping datagram the kernel refused");
                    self.stats.send_dropped += 1;
                    (tx, offset) = (cur + 1, 0);
                }
                ErrnoClass::Fatal => return Err(IoError::os("sendmmsg", err)),
            }
        }
        Ok(tx)
    }

    fn backend(&self) -> Backend {
        Backend::Mmsg
    }

    fn socket_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn stats(&self) -> IoStats {
        self.stats
    }

    fn max_gso_segments(&self) -> usize {
        if self.gso { cmsg::UDP_MAX_SEGMENTS } else { 1 }
    }
}
