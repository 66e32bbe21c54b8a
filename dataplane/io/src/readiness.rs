//! Waiting for a [`DatagramIo`] to have something to receive, from a tokio
//! runtime.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use crate::DatagramIo;

/// Registers a duplicate of `io`'s wait descriptor ([`DatagramIo::raw_fd`])
/// with the current tokio runtime. Await `readable()` on the result, then
/// call [`DatagramIo::recv`] until it returns `Ok(0)` before clearing the
/// readiness. Must be called inside a runtime; drop it before `io`.
pub fn register_readiness(io: &dyn DatagramIo) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `raw_fd` is the live descriptor owned by `io`, which the
    // caller holds for the duration of this call; the borrow ends before we
    // return (we keep only a duplicate).
    let borrowed = unsafe { BorrowedFd::borrow_raw(io.raw_fd()) };
    let owned = borrowed.try_clone_to_owned()?;
    // SAFETY: `owned` is an open descriptor that the AsyncFd takes ownership
    // of: it stays open, and `as_raw_fd` returns the same number, until the
    // AsyncFd is dropped.
    unsafe { AsyncFd::register(owned) }.map_err(|e| e.into_parts().1)
}

/// A duplicate of `io`'s UDP socket ([`DatagramIo::socket_fd`]), e.g. to
/// put it in a BPF `REUSEPORT_SOCKARRAY` or attach a program to its
/// `SO_REUSEPORT` group. The duplicate refers to the same socket.
pub fn dup_socket(io: &dyn DatagramIo) -> io::Result<OwnedFd> {
    // SAFETY: `socket_fd` is the live socket owned by `io`, which the caller
    // holds for the duration of this call; the borrow ends before we return
    // (we keep only a duplicate).
    let borrowed = unsafe { BorrowedFd::borrow_raw(io.socket_fd()) };
    borrowed.try_clone_to_owned()
}
