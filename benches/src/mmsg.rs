//! The only module with `unsafe` code: thin wrappers around the Linux system
//! calls the standard library does not expose (`sendmmsg`, `recvmmsg`,
//! `setsockopt(UDP_GRO)`, `poll`, `kill`, `sysconf`). Everything else in the
//! crate is safe code.

#![allow(unsafe_code, reason = "the crate's one FFI module")]

use std::io;
use std::mem::MaybeUninit;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Largest batch a single call handles.
pub const MAX_BATCH: usize = 64;

/// Sends every buffer in `bufs` (at most [`MAX_BATCH`]) as one datagram on the
/// *connected* socket `sock` with `sendmmsg(2)`. Returns how many were sent
/// (the kernel may send fewer than asked; the caller retries the rest).
pub fn send_batch(sock: &UdpSocket, bufs: &[&[u8]]) -> io::Result<usize> {
    let n = bufs.len().min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iovs: [MaybeUninit<libc::iovec>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    let mut hdrs: [MaybeUninit<libc::mmsghdr>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    for (i, buf) in bufs[..n].iter().enumerate() {
        iovs[i].write(libc::iovec {
            // The kernel only reads from a send buffer; the `*mut` is an
            // artefact of the shared `iovec` type.
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        });
    }
    for i in 0..n {
        // SAFETY: an all-zero `mmsghdr` is a valid value (null name, null
        // control, zero lengths and flags); the fields that matter are set
        // right after.
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        h.msg_hdr.msg_iov = iovs[i].as_mut_ptr();
        h.msg_hdr.msg_iovlen = 1;
        hdrs[i].write(h);
    }
    // SAFETY: `hdrs[..n]` and `iovs[..n]` were initialised above and live on
    // this stack frame for the whole call; each iovec points into a borrowed
    // slice of `bufs` that outlives the call and is only read by the kernel.
    // The socket is connected, so `msg_name` may be null.
    let sent = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            0,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// `SOL_UDP` and `UDP_GRO` (linux/udp.h): not every libc release names
/// them.
const SOL_UDP: libc::c_int = 17;
const UDP_GRO: libc::c_int = 104;

/// Control bytes per received message: room for one `UDP_GRO` message
/// (`CMSG_SPACE(sizeof(int))`, 24 bytes on 64-bit), 8-byte aligned.
type Control = [u64; 4];

/// Turns on `UDP_GRO` on `sock`: datagrams that arrive as one GSO run (a
/// sender's `UDP_SEGMENT` send, kept whole on loopback) are then received
/// as one buffer, split by [`recv_batch`]'s segment sizes.
pub fn enable_gro(sock: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int for the call and its size is passed; the
    // fd is owned by `sock`.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives up to `bufs.len()` (at most [`MAX_BATCH`]) buffers from `sock`
/// with a non-blocking `recvmmsg(2)`, writing each one's length to `lens`
/// and its GRO segment size to `segs` (0: one datagram; otherwise the
/// buffer holds datagrams of that size, the last possibly shorter). Returns
/// how many were received; `Ok(0)` when none was waiting.
pub fn recv_batch(
    sock: &UdpSocket,
    bufs: &mut [Vec<u8>],
    lens: &mut [usize],
    segs: &mut [usize],
) -> io::Result<usize> {
    let n = bufs.len().min(lens.len()).min(segs.len()).min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iovs: [MaybeUninit<libc::iovec>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    let mut hdrs: [MaybeUninit<libc::mmsghdr>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    let mut controls: [Control; MAX_BATCH] = [[0; 4]; MAX_BATCH];
    for (i, buf) in bufs[..n].iter_mut().enumerate() {
        iovs[i].write(libc::iovec {
            iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
            iov_len: buf.len(),
        });
    }
    for i in 0..n {
        // SAFETY: an all-zero `mmsghdr` is a valid value (see `send_batch`).
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        h.msg_hdr.msg_iov = iovs[i].as_mut_ptr();
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = controls[i].as_mut_ptr().cast::<libc::c_void>();
        h.msg_hdr.msg_controllen = std::mem::size_of::<Control>() as _;
        hdrs[i].write(h);
    }
    // SAFETY: `hdrs[..n]`, `iovs[..n]` and `controls[..n]` are initialised
    // and outlive the call; every iovec points at a distinct, exclusively
    // borrowed buffer of `iov_len` writable bytes, and every control pointer
    // at its own `Control` of `msg_controllen` bytes. `msg_name` is null (the
    // source address is not wanted) and the timeout pointer is null
    // (MSG_DONTWAIT makes the call non-blocking).
    let got = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(e)
        };
    }
    let got = got as usize;
    for i in 0..got {
        // SAFETY: the kernel filled in the first `got` headers, and all `n`
        // were initialised before the call anyway.
        let h = unsafe { hdrs[i].assume_init_ref() };
        lens[i] = h.msg_len as usize;
        segs[i] = gro_segment(&h.msg_hdr);
    }
    Ok(got)
}

/// The `UDP_GRO` segment size in a received header's control data, or 0.
fn gro_segment(hdr: &libc::msghdr) -> usize {
    if hdr.msg_controllen == 0 {
        return 0;
    }
    // SAFETY: `hdr` was filled by `recvmmsg` over a control buffer that is
    // still alive (the caller's `controls`), with `msg_controllen` set to the
    // bytes the kernel wrote; CMSG_FIRSTHDR/CMSG_NXTHDR stay within it.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: `c` is a non-null header inside the control data (above).
        let cm = unsafe { &*c };
        if cm.cmsg_level == SOL_UDP && cm.cmsg_type == UDP_GRO {
            // SAFETY: a UDP_GRO message carries one int (the segment size)
            // as its data; read unaligned, as the kernel packs it.
            let size =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>()) };
            return usize::try_from(size).unwrap_or(0);
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
    0
}

/// Waits until at least one socket in `socks` is readable or `timeout` has
/// passed (`poll(2)`). `ready[i]` is set for each readable socket.
pub fn wait_readable(
    socks: &[UdpSocket],
    ready: &mut [bool],
    timeout: Duration,
) -> io::Result<usize> {
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()`
    // initialised `pollfd`s for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    for (flag, fd) in ready.iter_mut().zip(&fds) {
        *flag = fd.revents & (libc::POLLIN | libc::POLLERR) != 0;
    }
    Ok(r as usize)
}

/// Sends SIGTERM to process `pid`.
pub fn sigterm(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and has no memory-safety
    // preconditions; `pid` is the id of a child this process spawned.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Clock ticks per second (`USER_HZ`), the unit of the CPU times in
/// `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf(3) takes an integer name and has no memory-safety
    // preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ridge_io::{DatagramIo, MmsgIo, SocketOptions, Transmit};

    /// A GSO run sent to a socket with `UDP_GRO` on comes back as one buffer
    /// with its segment size; a lone datagram with none; and without GRO the
    /// run arrives datagram by datagram.
    #[test]
    fn gro_runs_come_back_whole_with_their_segment_size() {
        let gro = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(&gro).unwrap();
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut tx =
            MmsgIo::bind("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        assert!(tx.max_gso_segments() > 1, "this kernel sends UDP GSO");
        let run: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let lone = [7u8; 60];
        for to in [&gro, &plain] {
            let dest = to.local_addr().unwrap();
            let batch = [
                Transmit {
                    destination: dest,
                    prefix: &[],
                    contents: &run,
                    suffix: &[],
                    segment_size: Some(100),
                },
                Transmit::new(dest, &lone),
            ];
            assert_eq!(tx.send(&batch).unwrap(), 2);
        }

        let mut bufs = vec![vec![0u8; 65_535]; 16];
        let (mut lens, mut segs) = (vec![0; 16], vec![0; 16]);
        let n = recv_batch(&gro, &mut bufs, &mut lens, &mut segs).unwrap();
        assert_eq!(n, 2);
        assert_eq!((lens[0], segs[0]), (1000, 100));
        assert_eq!(&bufs[0][..1000], &run[..]);
        assert_eq!((lens[1], segs[1]), (60, 0));

        let n = recv_batch(&plain, &mut bufs, &mut lens, &mut segs).unwrap();
        assert_eq!(n, 11);
        for (i, (&len, &seg)) in lens.iter().zip(&segs).take(10).enumerate() {
            assert_eq!((len, seg), (100, 0));
            assert_eq!(&bufs[i][..100], &run[i * 100..(i + 1) * 100]);
        }
        assert_eq!((lens[10], segs[10]), (60, 0));
    }
}
