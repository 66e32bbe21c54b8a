//! Socket creation and the options both backends share.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::cmsg::{SOL_UDP, UDP_GRO, UDP_SEGMENT};
use crate::{IoError, SocketOptions};

/// A bound non-blocking UDP socket and what the kernel agreed to.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) socket: Socket,
    pub(crate) local: SocketAddr,
    pub(crate) v6: bool,
    pub(crate) gso: bool,
    pub(crate) gro: bool,
}

pub(crate) fn bind_udp(
    addr: SocketAddr,
    opts: &SocketOptions,
    want_gro: bool,
) -> Result<Bound, IoError> {
    let bind_err = |source| IoError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    if opts.reuse_port {
        socket.set_reuse_port(true).map_err(bind_err)?;
    }
    if let Some(size) = opts.recv_buffer_size {
        socket.set_recv_buffer_size(size).map_err(bind_err)?;
    }
    if let Some(size) = opts.send_buffer_size {
        socket.set_send_buffer_size(size).map_err(bind_err)?;
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    let local = socket
        .local_addr()
        .map_err(bind_err)?
        .as_socket()
        .ok_or_else(|| bind_err(io::Error::other("bound address is not an IP address")))?;

    let gso = opts.gso && gso_supported(&socket);
    if opts.gso && !gso {
        tracing::info!(%local, "UDP_SEGMENT unsupported, GSO transmits will be split");
    }
    let gro = want_gro && set_int(&socket, SOL_UDP, UDP_GRO, 1).is_ok();
    if want_gro && !gro {
        tracing::info!(%local, "UDP_GRO unsupported, receiving without it");
    }
    Ok(Bound {
        socket,
        local,
        v6: local.is_ipv6(),
        gso,
        gro,
    })
}

fn gso_supported(socket: &Socket) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `socket`; value/len point to
    // locals of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            SOL_UDP,
            UDP_SEGMENT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0
}

fn set_int(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the fd is a live socket owned by `socket`; the option value is
    // a local c_int whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a transmit needs a `UDP_SEGMENT` message at all, and fits in one.
pub(crate) fn wants_gso(contents: &[u8], segment_size: Option<u16>) -> Option<u16> {
    match segment_size {
        Some(s) if s > 0 && contents.len() > usize::from(s) => {
            let count = contents.len().div_ceil(usize::from(s));
            (count <= crate::cmsg::UDP_MAX_SEGMENTS).then_some(s)
        }
        _ => None,
    }
}

/// The next datagram (or GSO run) to send from transmit `tx` at byte
/// `offset`, and where the batch continues after it.
#[derive(Debug)]
pub(crate) struct NextDatagram<'a> {
    /// Sent first, from its own iovec (empty when the transmit has none).
    pub(crate) prefix: &'a [u8],
    pub(crate) chunk: &'a [u8],
    pub(crate) gso: Option<u16>,
    pub(crate) next_tx: usize,
    pub(crate) next_offset: usize,
}

pub(crate) fn next_datagram<'a>(
    t: &crate::Transmit<'a>,
    tx: usize,
    offset: usize,
    gso_on: bool,
) -> NextDatagram<'a> {
    if !t.prefix.is_empty() {
        return NextDatagram {
            prefix: t.prefix,
            chunk: t.contents,
            gso: None,
            next_tx: tx + 1,
            next_offset: 0,
        };
    }
    let gso = if gso_on && offset == 0 {
        wants_gso(t.contents, t.segment_size)
    } else {
        None
    };
    let whole = NextDatagram {
        prefix: &[],
        chunk: t.contents,
        gso,
        next_tx: tx + 1,
        next_offset: 0,
    };
    match (gso, t.segment_size) {
        (None, Some(s)) if s > 0 && t.contents.len() > usize::from(s) => {
            let end = (offset + usize::from(s)).min(t.contents.len());
            let (next_tx, next_offset) = if end == t.contents.len() {
                (tx + 1, 0)
            } else {
                (tx, end)
            };
            NextDatagram {
                prefix: &[],
                chunk: &t.contents[offset..end],
                gso: None,
                next_tx,
                next_offset,
            }
        }
        _ => whole,
    }
}

/// Points `iovs` at a planned datagram: the prefix (if any), then the
/// chunk. Returns how many iovecs are in use.
pub(crate) fn fill_iovecs(iovs: &mut [libc::iovec; 2], d: &NextDatagram<'_>) -> usize {
    let chunk = libc::iovec {
        iov_base: d.chunk.as_ptr() as *mut libc::c_void,
        iov_len: d.chunk.len(),
    };
    if d.prefix.is_empty() {
        iovs[0] = chunk;
        1
    } else {
        iovs[0] = libc::iovec {
            iov_base: d.prefix.as_ptr() as *mut libc::c_void,
            iov_len: d.prefix.len(),
        };
        iovs[1] = chunk;
        2
    }
}

/// Where a backend keeps the per-datagram state of its send slots.
pub(crate) trait SendSlots {
    /// Writes `destination` into slot `n`; `None` when this socket cannot
    /// address that family.
    fn set_destination(&mut self, n: usize, destination: SocketAddr) -> Option<libc::socklen_t>;
    /// Points slot `n` at one planned datagram of transmit `cur`.
    fn set_datagram(
        &mut self,
        n: usize,
        namelen: libc::socklen_t,
        cur: usize,
        datagram: &NextDatagram<'_>,
    );
}

/// Fills up to `max` send slots from `batch`, starting at transmit
/// `start_tx`, byte `start_offset`; returns the number of slots filled.
/// Transmits at the front that the socket cannot address (wrong family) are
/// dropped, counted in `send_dropped`, and the start moved past them; one
/// further in ends the round instead, so it leads the next one and is counted
/// once.
#[allow(clippy::too_many_arguments, reason = "the state of one send round")]
pub(crate) fn plan_sends<'a>(
    slots: &mut impl SendSlots,
    max: usize,
    batch: &[crate::Transmit<'a>],
    start_tx: &mut usize,
    start_offset: &mut usize,
    gso_on: bool,
    local: SocketAddr,
    send_dropped: &mut u64,
) -> usize {
    let (mut tx, mut offset) = (*start_tx, *start_offset);
    let mut n = 0;
    while n < max && tx < batch.len() {
        let t = &batch[tx];
        let Some(namelen) = slots.set_destination(n, t.destination) else {
            if n > 0 {
                break;
            }
            tracing::debug!(destination = %t.destination, %local, "dropping datagram for an unreachable address family");
            *send_dropped += 1;
            (tx, offset) = (tx + 1, 0);
            (*start_tx, *start_offset) = (tx, offset);
            continue;
        };
        let d = next_datagram(t, tx, offset, gso_on);
        slots.set_datagram(n, namelen, tx, &d);
        tx = d.next_tx;
        offset = d.next_offset;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Transmit;

    fn t(contents: &[u8], segment_size: Option<u16>) -> Transmit<'_> {
        Transmit {
            destination: "127.0.0.1:1".parse().unwrap(),
            prefix: &[],
            contents,
            segment_size,
        }
    }

    #[test]
    fn plans_gso_split_and_plain() {
        let data = [0u8; 250];
        let gso = next_datagram(&t(&data, Some(100)), 3, 0, true);
        assert_eq!((gso.chunk.len(), gso.gso, gso.next_tx), (250, Some(100), 4));

        let mut at = (3, 0);
        let mut sizes = Vec::new();
        while at.0 == 3 {
            let d = next_datagram(&t(&data, Some(100)), at.0, at.1, false);
            assert_eq!(d.gso, None);
            sizes.push(d.chunk.len());
            at = (d.next_tx, d.next_offset);
        }
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(at, (4, 0));

        // One segment's worth, no segment size, or empty: one plain datagram.
        for (contents, seg) in [
            (&data[..100], Some(100)),
            (&data[..], None),
            (&data[..0], Some(100)),
        ] {
            let d = next_datagram(&t(contents, seg), 0, 0, true);
            assert_eq!((d.chunk.len(), d.gso, d.next_tx), (contents.len(), None, 1));
        }

        // More than UDP_MAX_SEGMENTS: split even with GSO on.
        let big = [0u8; 65 * 10];
        let d = next_datagram(&t(&big, Some(10)), 0, 0, true);
        assert_eq!((d.chunk.len(), d.gso, d.next_offset), (10, None, 10));
    }
}
