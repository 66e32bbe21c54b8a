use std::io;
use std::net::SocketAddr;

/// Errors of the datagram I/O layer. Peer behaviour never produces one: these
/// are configuration problems (caller's fault) or a socket/ring that is no
/// longer usable (internal).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The options passed to [`crate::bind`] are invalid.
    #[error("invalid socket options: {0}")]
    Config(&'static str),
    /// Creating or binding the socket failed (address in use, permissions).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address the caller asked to bind.
        addr: SocketAddr,
        /// What the kernel said (`EADDRINUSE`, `EADDRNOTAVAIL`, `EACCES`...).
        #[source]
        source: io::Error,
    },
    /// io_uring is missing, disabled, or lacks an opcode or feature we need.
    #[error("io_uring unavailable: {reason}")]
    UringUnavailable {
        /// Which step failed and why, for the operator: the syscall or
        /// registration that was refused, or the opcode the kernel lacks.
        reason: String,
        /// The system error behind it; `None` when a capability is simply
        /// missing (an opcode not in the kernel's probe table).
        #[source]
        source: Option<io::Error>,
    },
    /// A system call failed in a way that leaves the socket unusable.
    #[error("{op} failed: {source}")]
    Os {
        /// The call that failed (`recvmmsg`, `sendmmsg`, `io_uring_enter`,
        /// `multishot recvmsg`, `mmap`, `dup`).
        op: &'static str,
        /// The error the kernel returned for it.
        #[source]
        source: io::Error,
    },
}

impl IoError {
    pub(crate) fn os(op: &'static str, source: io::Error) -> Self {
        Self::Os { op, source }
    }
}

/// What to do about an errno returned for one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrnoClass {
    /// Interrupted: try again now.
    Retry,
    /// The socket is full or has nothing: stop, try again when ready.
    WouldBlock,
    /// A pending ICMP error or a problem with this datagram: skip it.
    Datagram,
    /// The descriptor or our memory is broken.
    Fatal,
}

pub(crate) fn classify(errno: i32) -> ErrnoClass {
    match errno {
        libc::EINTR => ErrnoClass::Retry,
        libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM => ErrnoClass::WouldBlock,
        libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::EOPNOTSUPP => ErrnoClass::Fatal,
        // ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENETDOWN,
        // EPERM (netfilter), EACCES (broadcast), EMSGSIZE, EINVAL,
        // EADDRNOTAVAIL, EAFNOSUPPORT, EIO and the like.
        _ => ErrnoClass::Datagram,
    }
}
