//! The only module with `unsafe` code: thin wrappers around the Linux system
//! calls the standard library does not expose (`sendmmsg`, `recvmmsg`,
//! `poll`, `kill`, `sysconf`). Everything else in the crate is safe code.

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

/// Receives up to `bufs.len()` (at most [`MAX_BATCH`]) datagrams from `sock`
/// with a non-blocking `recvmmsg(2)`, writing each datagram's length to
/// `lens`. Returns how many were received; `Ok(0)` when none was waiting.
pub fn recv_batch(sock: &UdpSocket, bufs: &mut [Vec<u8>], lens: &mut [usize]) -> io::Result<usize> {
    let n = bufs.len().min(lens.len()).min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iovs: [MaybeUninit<libc::iovec>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    let mut hdrs: [MaybeUninit<libc::mmsghdr>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
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
        hdrs[i].write(h);
    }
    // SAFETY: `hdrs[..n]` and `iovs[..n]` are initialised and outlive the
    // call; every iovec points at a distinct, exclusively borrowed buffer of
    // `iov_len` writable bytes. `msg_name` is null (the source address is not
    // wanted) and the timeout pointer is null (MSG_DONTWAIT makes the call
    // non-blocking).
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
    for (i, len) in lens[..got].iter_mut().enumerate() {
        // SAFETY: the kernel filled in the first `got` headers, and all `n`
        // were initialised before the call anyway.
        *len = unsafe { hdrs[i].assume_init_ref() }.msg_len as usize;
    }
    Ok(got)
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
