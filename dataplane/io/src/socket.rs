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

/// The most UDP payload one datagram, and so one GSO send, can carry
/// (IPv4: 65,535 less the IP and UDP headers; IPv6 allows slightly more).
pub(crate) const MAX_GSO_BYTES: usize = 65_507;

/// Iovecs one message may need: a prefix, contents and suffix for each of
/// up to [`crate::cmsg::UDP_MAX_SEGMENTS`] gathered datagrams.
pub(crate) const MAX_IOVECS: usize = 3 * crate::cmsg::UDP_MAX_SEGMENTS;

/// How many bytes of a caller's GSO run (`remaining` bytes of `s`-byte
/// segments) one `UDP_SEGMENT` send can carry: at most
/// [`crate::cmsg::UDP_MAX_SEGMENTS`] segments and [`MAX_GSO_BYTES`] bytes.
/// `None` when that is a single segment, which goes as a plain datagram.
fn gso_chunk(remaining: usize, s: usize) -> Option<usize> {
    let max_segments = (MAX_GSO_BYTES / s).min(crate::cmsg::UDP_MAX_SEGMENTS);
    let chunk = remaining.min(max_segments * s);
    (chunk > s).then_some(chunk)
}

/// The next message to send from transmit `tx` at byte `offset`, and where
/// the batch continues after it.
///
/// A message is one datagram, a caller's GSO run (`gso`), or, with GSO on,
/// a run *gathered* from consecutive transmits: whole datagrams to the same
/// destination, all of one length except a shorter last one, sent as one
/// `UDP_SEGMENT` message whose iovecs point at each transmit's prefix,
/// contents and suffix (no copy). The receiver sees the same datagrams
/// either way.
#[derive(Debug)]
pub(crate) struct NextDatagram<'a> {
    /// Sent first, from its own iovec (empty when the transmit has none).
    pub(crate) prefix: &'a [u8],
    pub(crate) chunk: &'a [u8],
    /// Sent after the chunk, from its own iovec (empty when none).
    pub(crate) suffix: &'a [u8],
    /// Transmits gathered after the first (each its whole prefix, contents
    /// and suffix), in order; empty unless this is a gathered run.
    pub(crate) gathered: &'a [crate::Transmit<'a>],
    pub(crate) gso: Option<u16>,
    pub(crate) next_tx: usize,
    pub(crate) next_offset: usize,
}

/// The largest datagram gathered into a GSO run: what fits a 1,500-byte
/// path MTU under IPv6 and UDP headers. The kernel refuses (`EINVAL`) a GSO
/// send whose segments exceed the route's MTU, where it would have
/// fragmented the same datagrams sent alone; larger ones go alone.
pub(crate) const MAX_GATHERED_DATAGRAM: usize = 1_452;

/// Transmits after `batch[tx]` that can join it in one gathered GSO message
/// (see [`NextDatagram`]); 0 when none can.
fn gather_len(batch: &[crate::Transmit<'_>], tx: usize) -> usize {
    let first = &batch[tx];
    let size = first.len();
    if first.segment_size.is_some() || size == 0 || size > MAX_GATHERED_DATAGRAM {
        return 0;
    }
    let max_segments = (MAX_GSO_BYTES / size).min(crate::cmsg::UDP_MAX_SEGMENTS);
    let mut n = 0;
    for t in &batch[tx + 1..] {
        if n + 1 >= max_segments
            || t.destination != first.destination
            || t.segment_size.is_some()
            || t.is_empty()
            || t.len() > size
        {
            break;
        }
        n += 1;
        if t.len() < size {
            // A shorter datagram can only end a run.
            break;
        }
    }
    n
}

impl NextDatagram<'_> {
    /// Datagrams on the wire: with GSO, the segments of the run.
    pub(crate) fn datagrams(&self) -> u16 {
        match self.gso {
            _ if !self.gathered.is_empty() => self.gathered.len() as u16 + 1,
            Some(s) if s > 0 => self.chunk.len().div_ceil(usize::from(s)) as u16,
            _ => 1,
        }
    }
}

pub(crate) fn next_datagram<'a>(
    batch: &'a [crate::Transmit<'a>],
    tx: usize,
    offset: usize,
    gso_on: bool,
) -> NextDatagram<'a> {
    let t = &batch[tx];
    let whole = NextDatagram {
        prefix: t.prefix,
        chunk: t.contents,
        suffix: t.suffix,
        gathered: &[],
        gso: None,
        next_tx: tx + 1,
        next_offset: 0,
    };
    let segment = match t.segment_size {
        Some(s)
            if s > 0
                && t.prefix.is_empty()
                && t.suffix.is_empty()
                && t.contents.len() > usize::from(s) =>
        {
            usize::from(s)
        }
        _ => {
            if !gso_on {
                return whole;
            }
            let n = gather_len(batch, tx);
            if n == 0 {
                return whole;
            }
            return NextDatagram {
                gathered: &batch[tx + 1..tx + 1 + n],
                gso: u16::try_from(t.len()).ok(),
                next_tx: tx + 1 + n,
                ..whole
            };
        }
    };
    // A caller's GSO run: as much as one send carries (with GSO on), else
    // one segment; the rest of the run continues at `next_offset`.
    let remaining = t.contents.len() - offset;
    let (len, gso) = match gso_chunk(remaining, segment) {
        Some(chunk) if gso_on => (chunk, Some(segment as u16)),
        _ => (remaining.min(segment), None),
    };
    let end = offset + len;
    let (next_tx, next_offset) = if end == t.contents.len() {
        (tx + 1, 0)
    } else {
        (tx, end)
    };
    NextDatagram {
        prefix: &[],
        chunk: &t.contents[offset..end],
        suffix: &[],
        gathered: &[],
        gso,
        next_tx,
        next_offset,
    }
}

/// Points `iovs` at a planned message: the prefix (if any), the chunk, the
/// suffix (if any), then each gathered transmit's prefix, contents and
/// suffix, skipping empty ones. Returns how many iovecs are in use.
pub(crate) fn fill_iovecs(iovs: &mut [libc::iovec; MAX_IOVECS], d: &NextDatagram<'_>) -> usize {
    let mut n = 0;
    let parts = [d.prefix, d.chunk, d.suffix].into_iter().chain(
        d.gathered
            .iter()
            .flat_map(|t| [t.prefix, t.contents, t.suffix].into_iter()),
    );
    for part in parts.filter(|p| !p.is_empty()) {
        iovs[n] = libc::iovec {
            iov_base: part.as_ptr() as *mut libc::c_void,
            iov_len: part.len(),
        };
        n += 1;
    }
    n
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
        let d = next_datagram(batch, tx, offset, gso_on);
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
            suffix: &[],
            contents,
            segment_size,
        }
    }

    fn one<'a>(b: &'a [Transmit<'a>], offset: usize, gso_on: bool) -> NextDatagram<'a> {
        next_datagram(b, 0, offset, gso_on)
    }

    #[test]
    fn plans_gso_split_and_plain() {
        let data = [0u8; 250];
        let b = [t(&data, Some(100))];
        let gso = one(&b, 0, true);
        assert_eq!((gso.chunk.len(), gso.gso, gso.next_tx), (250, Some(100), 1));

        let mut at = (0, 0);
        let mut sizes = Vec::new();
        while at.0 == 0 {
            let d = one(&b, at.1, false);
            assert_eq!(d.gso, None);
            sizes.push(d.chunk.len());
            at = (d.next_tx, d.next_offset);
        }
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(at, (1, 0));

        // One segment's worth, no segment size, or empty: one plain datagram.
        for (contents, seg) in [
            (&data[..100], Some(100)),
            (&data[..], None),
            (&data[..0], Some(100)),
        ] {
            let b = [t(contents, seg)];
            let d = one(&b, 0, true);
            assert_eq!((d.chunk.len(), d.gso, d.next_tx), (contents.len(), None, 1));
        }
    }

    #[test]
    fn long_gso_runs_go_in_sends_gso_can_carry() {
        // 65 segments: 64 in one send, then the last alone.
        let big = [0u8; 65 * 10];
        let b = [t(&big, Some(10))];
        let d = one(&b, 0, true);
        assert_eq!((d.chunk.len(), d.gso, d.next_offset), (640, Some(10), 640));
        assert_eq!(d.datagrams(), 64);
        let d = one(&b, 640, true);
        assert_eq!((d.chunk.len(), d.gso, d.next_tx), (10, None, 1));
        // 1,200-byte segments: 54 fit in one UDP datagram's 65,507 bytes.
        let big = vec![0u8; 60 * 1200];
        let b = [t(&big, Some(1200))];
        let d = one(&b, 0, true);
        assert_eq!((d.chunk.len(), d.gso), (54 * 1200, Some(1200)));
        let d = one(&b, 54 * 1200, true);
        assert_eq!((d.chunk.len(), d.gso, d.next_tx), (6 * 1200, Some(1200), 1));
    }

    /// The iovecs `fill_iovecs` points at a planned message, and their
    /// lengths.
    fn iovecs_of(d: &NextDatagram<'_>) -> ([libc::iovec; MAX_IOVECS], Vec<usize>) {
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        let n = fill_iovecs(&mut iovs, d);
        let lens = iovs[..n].iter().map(|v| v.iov_len).collect();
        (iovs, lens)
    }

    fn to(port: u16, prefix: &'static [u8], contents: &'static [u8]) -> Transmit<'static> {
        Transmit {
            destination: SocketAddr::from(([127, 0, 0, 1], port)),
            prefix,
            contents,
            suffix: &[],
            segment_size: None,
        }
    }

    /// Header, shared payload and trailer (a mesh link's SRTP tag): one
    /// datagram of three iovecs, gathered like any other of its length.
    #[test]
    fn suffixes_follow_their_contents_in_gathered_runs() {
        const H: &[u8] = &[1; 12];
        const P: &[u8] = &[2; 178];
        const T: &[u8] = &[9; 10];
        let tagged = Transmit {
            suffix: T,
            ..to(1, H, P)
        };
        assert_eq!(tagged.len(), 200);
        let batch = [tagged, tagged, to(1, &[], &[4; 200])];
        let d = next_datagram(&batch, 0, 0, true);
        assert_eq!((d.gso, d.next_tx, d.datagrams()), (Some(200), 3, 3));
        let (iovs, lens) = iovecs_of(&d);
        assert_eq!(lens, [12, 178, 10, 12, 178, 10, 200]);
        assert_eq!(iovs[2].iov_base as *const u8, T.as_ptr());
        // A caller's GSO run with a suffix is one datagram.
        let run = Transmit {
            suffix: T,
            segment_size: Some(50),
            ..to(1, &[], &[0; 150])
        };
        let d = next_datagram(std::slice::from_ref(&run), 0, 0, true);
        assert_eq!(
            (d.gso, d.next_tx, d.chunk.len(), d.suffix.len()),
            (None, 1, 150, 10)
        );
        // The most a message can need: 64 datagrams of three parts.
        let full: Vec<Transmit<'static>> = (0..64).map(|_| tagged).collect();
        let d = next_datagram(&full, 0, 0, true);
        assert_eq!(iovecs_of(&d).1.len(), MAX_IOVECS);
    }

    #[test]
    fn gathers_equal_datagrams_to_one_destination() {
        const H: &[u8] = &[1; 12];
        const P: &[u8] = &[2; 188];
        const SHORT: &[u8] = &[3; 50];
        let batch = [
            to(1, H, P),
            to(1, H, P),
            to(1, &[], &[4; 200]),
            to(1, H, SHORT),
            to(1, H, P), // after the shorter one: a new run
            to(2, H, P), // another destination
            to(2, H, P),
            to(2, H, &[5; 189]), // longer: not in the run
        ];
        let d = next_datagram(&batch, 0, 0, true);
        assert_eq!((d.gso, d.next_tx, d.gathered.len()), (Some(200), 4, 3));
        assert_eq!(d.datagrams(), 4);
        let (_, lens) = iovecs_of(&d);
        assert_eq!(lens, [12, 188, 12, 188, 200, 12, 50]);

        let d = next_datagram(&batch, 4, 0, true);
        assert_eq!((d.gso, d.next_tx), (None, 5), "a run of one is plain");
        let d = next_datagram(&batch, 5, 0, true);
        assert_eq!((d.gso, d.next_tx, d.datagrams()), (Some(200), 7, 2));
        let d = next_datagram(&batch, 7, 0, true);
        assert_eq!((d.gso, d.next_tx), (None, 8));

        // GSO off: one datagram each.
        for i in 0..batch.len() {
            let d = next_datagram(&batch, i, 0, false);
            assert_eq!((d.gso, d.next_tx, d.gathered.len()), (None, i + 1, 0));
        }
    }

    #[test]
    fn gathered_runs_stay_within_one_gso_send() {
        static P: [u8; 1200] = [0; 1200];
        let batch: Vec<Transmit<'static>> = (0..100).map(|_| to(1, &[], &P)).collect();
        let d = next_datagram(&batch, 0, 0, true);
        assert_eq!(d.next_tx, 54, "65,507 bytes hold 54 datagrams of 1,200");
        static JUMBO: [u8; MAX_GATHERED_DATAGRAM + 1] = [0; MAX_GATHERED_DATAGRAM + 1];
        let batch = [to(1, &[], &JUMBO), to(1, &[], &JUMBO)];
        assert_eq!(next_datagram(&batch, 0, 0, true).next_tx, 1, "over the MTU");
        static S: [u8; 20] = [0; 20];
        let batch: Vec<Transmit<'static>> = (0..100).map(|_| to(1, &[], &S)).collect();
        let d = next_datagram(&batch, 0, 0, true);
        assert_eq!(d.next_tx, crate::cmsg::UDP_MAX_SEGMENTS);
        // A caller's own GSO transmit is never gathered into another.
        let own = Transmit {
            segment_size: Some(20),
            ..to(1, &[], &S)
        };
        let batch = [to(1, &[], &S), own];
        assert_eq!(next_datagram(&batch, 0, 0, true).next_tx, 1);
    }
}
