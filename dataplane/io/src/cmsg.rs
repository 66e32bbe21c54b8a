//! The two control messages we use: `UDP_SEGMENT` (send, GSO) and `UDP_GRO`
//! (receive). Written and parsed over plain byte buffers so that the same
//! code serves `sendmmsg` and io_uring's `RecvMsgOut`.

use std::mem;

pub(crate) const SOL_UDP: libc::c_int = 17;
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
pub(crate) const UDP_GRO: libc::c_int = 104;
/// The kernel's `UDP_MAX_SEGMENTS`.
pub(crate) const UDP_MAX_SEGMENTS: usize = 64;

const fn align(len: usize) -> usize {
    let a = mem::size_of::<usize>();
    (len + a - 1) & !(a - 1)
}

const HDR: usize = align(mem::size_of::<libc::cmsghdr>());

/// `CMSG_SPACE(len)`.
pub(crate) const fn space(len: usize) -> usize {
    HDR + align(len)
}

/// Room for one control message of up to 8 bytes of data, aligned like a
/// `cmsghdr`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct CmsgBuf(pub(crate) [u8; space(8)]);

impl CmsgBuf {
    pub(crate) const fn new() -> Self {
        Self([0; space(8)])
    }
}

/// Writes a `UDP_SEGMENT` message into `buf`; returns `msg_controllen`.
pub(crate) fn write_segment_size(buf: &mut CmsgBuf, segment_size: u16) -> usize {
    let hdr = libc::cmsghdr {
        cmsg_len: (HDR + mem::size_of::<u16>()) as _,
        cmsg_level: SOL_UDP,
        cmsg_type: UDP_SEGMENT,
    };
    // SAFETY: CmsgBuf is aligned to 8 and at least HDR bytes long, so a
    // cmsghdr fits at its start; the buffer is borrowed mutably.
    unsafe {
        buf.0
            .as_mut_ptr()
            .cast::<libc::cmsghdr>()
            .write_unaligned(hdr)
    };
    buf.0[HDR..HDR + 2].copy_from_slice(&segment_size.to_ne_bytes());
    space(mem::size_of::<u16>())
}

/// Finds `UDP_GRO` in received control data and returns the segment size.
pub(crate) fn parse_gro(control: &[u8]) -> Option<u16> {
    let mut at = 0;
    while at + HDR <= control.len() {
        // SAFETY: the loop condition keeps a whole cmsghdr in bounds;
        // read_unaligned copes with any alignment and every bit pattern is a
        // valid cmsghdr.
        let hdr = unsafe {
            control
                .as_ptr()
                .add(at)
                .cast::<libc::cmsghdr>()
                .read_unaligned()
        };
        #[allow(clippy::unnecessary_cast, reason = "cmsg_len is u32 on musl")]
        let len = hdr.cmsg_len as usize;
        if len < HDR || at + len > control.len() {
            return None;
        }
        if hdr.cmsg_level == SOL_UDP && hdr.cmsg_type == UDP_GRO && len >= HDR + 4 {
            let d = &control[at + HDR..at + HDR + 4];
            let size = i32::from_ne_bytes([d[0], d[1], d[2], d[3]]);
            return u16::try_from(size).ok();
        }
        at += align(len);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_size_layout_matches_libc() {
        let mut buf = CmsgBuf::new();
        let n = write_segment_size(&mut buf, 1200);
        // SAFETY: CMSG_SPACE/CMSG_LEN only do arithmetic.
        let (want_space, want_len) = unsafe { (libc::CMSG_SPACE(2), libc::CMSG_LEN(2)) };
        assert_eq!(n, want_space as usize);
        // SAFETY: see write_segment_size.
        let hdr = unsafe { buf.0.as_ptr().cast::<libc::cmsghdr>().read_unaligned() };
        #[allow(clippy::unnecessary_cast, reason = "cmsg_len is u32 on musl")]
        let len = hdr.cmsg_len as usize;
        assert_eq!(len, want_len as usize);
    }

    #[test]
    fn parses_gro() {
        let mut buf = [0u8; 64];
        let hdr = libc::cmsghdr {
            cmsg_len: (HDR + 4) as _,
            cmsg_level: SOL_UDP,
            cmsg_type: UDP_GRO,
        };
        // SAFETY: buf holds more than one cmsghdr; unaligned write.
        unsafe {
            buf.as_mut_ptr()
                .cast::<libc::cmsghdr>()
                .write_unaligned(hdr)
        };
        buf[HDR..HDR + 4].copy_from_slice(&1100i32.to_ne_bytes());
        assert_eq!(parse_gro(&buf[..space(4)]), Some(1100));
        assert_eq!(parse_gro(&buf[..HDR]), None);
        assert_eq!(parse_gro(&[]), None);
    }
}
