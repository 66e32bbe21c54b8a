//! `SocketAddr` <-> `sockaddr_storage` without allocation.

use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Writes `addr` into `out` in the form a socket of family `v6_socket`
/// accepts, mapping IPv4 destinations to v4-mapped IPv6 on IPv6 sockets (and
/// back, for v4-mapped destinations on IPv4 sockets). `None` when the socket
/// cannot reach that family.
pub(crate) fn write(
    addr: SocketAddr,
    v6_socket: bool,
    out: &mut libc::sockaddr_storage,
) -> Option<libc::socklen_t> {
    let addr = match (addr, v6_socket) {
        (SocketAddr::V4(a), true) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        (SocketAddr::V6(a), false) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, a.port())),
            None => return None,
        },
        (a, _) => a,
    };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and at least as aligned
            // as sockaddr_in (that is its purpose), and `out` is a unique
            // reference, so writing a sockaddr_in at its start is in bounds.
            unsafe {
                (out as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            Some(mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, sockaddr_storage holds any sockaddr_in6.
            unsafe {
                (out as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            Some(mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Parses a socket address the kernel wrote into `bytes` (any alignment).
pub(crate) fn read(bytes: &[u8]) -> Option<SocketAddr> {
    if bytes.len() < 2 {
        return None;
    }
    let family = libc::sa_family_t::from_ne_bytes([bytes[0], bytes[1]]);
    match i32::from(family) {
        libc::AF_INET if bytes.len() >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the length check above keeps the read in bounds;
            // read_unaligned has no alignment requirement, and sockaddr_in is
            // plain data for which every bit pattern is valid.
            let sin = unsafe { bytes.as_ptr().cast::<libc::sockaddr_in>().read_unaligned() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if bytes.len() >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { bytes.as_ptr().cast::<libc::sockaddr_in6>().read_unaligned() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The bytes of a `sockaddr_storage`, limited to the length the kernel set.
pub(crate) fn storage_bytes(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> &[u8] {
    let len = (len as usize).min(mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: `storage` is a live, initialised sockaddr_storage borrowed for
    // the returned lifetime, and `len` is clamped to its size.
    unsafe {
        std::slice::from_raw_parts((storage as *const libc::sockaddr_storage).cast::<u8>(), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_maps_families() {
        let mut st: libc::sockaddr_storage = unsafe_zeroed();
        for (addr, v6, want) in [
            ("1.2.3.4:5", false, "1.2.3.4:5"),
            ("[::1]:7", true, "[::1]:7"),
            ("1.2.3.4:5", true, "[::ffff:1.2.3.4]:5"),
            ("[::ffff:1.2.3.4]:5", false, "1.2.3.4:5"),
        ] {
            let len = write(addr.parse().unwrap(), v6, &mut st).unwrap();
            assert_eq!(read(storage_bytes(&st, len)), Some(want.parse().unwrap()));
        }
        assert!(write("[::1]:7".parse().unwrap(), false, &mut st).is_none());
    }

    fn unsafe_zeroed() -> libc::sockaddr_storage {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
        unsafe { mem::zeroed() }
    }
}
