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
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// io_uring is missing, disabled, or lacks an opcode or feature we need.
    #[error("io_uring unavailable: {reason}")]
    UringUnavailable {
        reason: String,
        #[source]
        source: Option<io::Error>,
    },
    /// A system call failed in a way that leaves the socket unusable.
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
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
