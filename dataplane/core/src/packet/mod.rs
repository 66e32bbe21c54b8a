//! Zero-copy parsing and writing of everything that arrives on the relay's
//! single UDP port: STUN (ICE connectivity checks), DTLS, RTP and RTCP.
//!
//! The relay forwards media without decoding it, so these parsers only look at
//! the bytes they need and borrow from the caller's buffer. Every parse path is
//! allocation-free and total: any byte sequence yields either a value or a
//! [`PacketError`], never a panic (the [`fuzz`] entry points and the fuzz
//! targets in `dataplane/fuzz` check exactly that). Writers append to a
//! caller-owned `Vec<u8>` so the hot path can reuse one buffer.
//!
//! Inside RTP payloads, [`codec`] reads the codec-specific descriptors and
//! headers (VP8, VP9, H.264, AV1, the dependency descriptor extension) under
//! the same rules, with its own [`codec::CodecError`].

pub mod codec;
pub mod fuzz;
pub mod rtcp;
pub mod rtp;
pub mod stun;

pub use codec::{av1_is_keyframe, h264_is_keyframe, vp8_is_keyframe, vp9_is_keyframe};
pub use rtcp::{FirEntries, NackSeqs, ReportBlock, ReportBlocks, RtcpIter, RtcpPacket, SsrcList};
pub use rtp::RtpHeader;
pub use stun::{StunAttributes, StunClass, StunMessage};

/// Why a packet was rejected.
///
/// Variants carry enough context to make a rate-limited log line useful when a
/// peer sends garbage, without the parser ever allocating a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// The buffer ends before a structure that its headers announce.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// The structure that did not fit.
        what: &'static str,
        /// Bytes the structure needs (counted from its own start).
        need: usize,
        /// Bytes actually available there.
        have: usize,
    },
    /// RTP/RTCP version field is not 2 (RFC 3550 §5.1).
    #[error("unsupported RTP/RTCP version {0} (expected 2)")]
    BadVersion(u8),
    /// A length field disagrees with the number of bytes received.
    #[error("{what}: length field says {declared} bytes but {actual} are present")]
    BadLength {
        /// The structure whose length field is wrong.
        what: &'static str,
        /// Length announced by the header.
        declared: usize,
        /// Length actually present.
        actual: usize,
    },
    /// A length that must be a multiple of 4 is not.
    #[error("{what}: length {len} is not a multiple of 4")]
    Unaligned {
        /// The structure whose length is misaligned.
        what: &'static str,
        /// The offending length.
        len: usize,
    },
    /// The padding count byte is zero or larger than the space it can occupy.
    #[error(
        "{what}: invalid padding count {padding} ({available} bytes available after the header)"
    )]
    BadPadding {
        /// The packet kind (RTP or RTCP).
        what: &'static str,
        /// Value of the trailing padding count byte.
        padding: usize,
        /// Bytes between the end of the header and the end of the packet.
        available: usize,
    },
    /// The first byte of a supposed STUN message has one of its top two bits set
    /// (RFC 5389 §6), so it is some other protocol.
    #[error("not a STUN message: first byte {0:#04x} has a top bit set")]
    NotStun(u8),
    /// The STUN magic cookie is missing (RFC 5389 §6); RFC 3489 peers are not supported.
    #[error("bad STUN magic cookie {0:#010x} (expected 0x2112a442)")]
    BadMagicCookie(u32),
}

/// What a datagram on the shared media port is, so it can be routed to the
/// ICE agent, the DTLS stack, or the RTP/RTCP forwarding path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketClass {
    /// STUN (ICE connectivity check or response).
    Stun,
    /// DTLS record (handshake or alert).
    Dtls,
    /// RTP media.
    Rtp,
    /// RTCP control (possibly compound).
    Rtcp,
    /// Anything else, including empty or too-short datagrams.
    Unknown,
}

/// Smallest STUN message (header only).
const MIN_STUN: usize = 20;
/// Smallest DTLS record (record header only).
const MIN_DTLS: usize = 13;
/// Smallest RTP packet (fixed header only).
const MIN_RTP: usize = 12;
/// Smallest RTCP packet worth routing: common header plus the sender SSRC that
/// every SR/RR/feedback packet carries.
const MIN_RTCP: usize = 8;

/// Demultiplexes a datagram by its first bytes (RFC 7983 §7, RFC 5761 §4).
///
/// The first byte picks STUN (0..=3), DTLS (20..=63) or RTP/RTCP (128..=191);
/// for the latter, a second byte whose low 7 bits are in 64..=95 (payload
/// type 192..=223 with the marker bit folded in) means RTCP. A datagram shorter
/// than the minimal header of its class is [`PacketClass::Unknown`], so callers
/// never hand a parser something that cannot possibly be valid. This is a cheap
/// routing decision, not validation: the class's parser still has the last word.
pub fn classify(buf: &[u8]) -> PacketClass {
    let Some((&first, rest)) = buf.split_first() else {
        return PacketClass::Unknown;
    };
    match first {
        0..=3 if buf.len() >= MIN_STUN => PacketClass::Stun,
        20..=63 if buf.len() >= MIN_DTLS => PacketClass::Dtls,
        128..=191 => match rest.first() {
            Some(&second) if (64..=95).contains(&(second & 0x7f)) => {
                if buf.len() >= MIN_RTCP {
                    PacketClass::Rtcp
                } else {
                    PacketClass::Unknown
                }
            }
            Some(_) if buf.len() >= MIN_RTP => PacketClass::Rtp,
            _ => PacketClass::Unknown,
        },
        _ => PacketClass::Unknown,
    }
}

/// Big-endian `u16` at `off`, or `None` past the end.
#[inline]
pub(crate) fn be_u16(buf: &[u8], off: usize) -> Option<u16> {
    buf.get(off..)?
        .first_chunk::<2>()
        .map(|b| u16::from_be_bytes(*b))
}

#[cfg(test)]
mod tests {
    use super::fuzz::samples;
    use super::*;

    #[test]
    fn classify_known_packets() {
        assert_eq!(classify(samples::STUN_BINDING_REQUEST), PacketClass::Stun);
        assert_eq!(classify(samples::RTP_AUDIO_LEVEL), PacketClass::Rtp);
        assert_eq!(classify(samples::RTP_PADDED_TWO_BYTE_EXT), PacketClass::Rtp);
        assert_eq!(classify(samples::RTCP_SR_SDES), PacketClass::Rtcp);
        assert_eq!(classify(samples::RTCP_NACK), PacketClass::Rtcp);
        assert_eq!(classify(samples::RTCP_PLI), PacketClass::Rtcp);
        assert_eq!(classify(samples::RTCP_FIR), PacketClass::Rtcp);
        // DTLS 1.2 ClientHello record header.
        let dtls = [22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40, 1];
        assert_eq!(classify(&dtls), PacketClass::Dtls);
    }

    #[test]
    fn classify_boundaries() {
        assert_eq!(classify(&[]), PacketClass::Unknown);
        assert_eq!(classify(&[0x80]), PacketClass::Unknown);
        assert_eq!(classify(&[0u8; 19]), PacketClass::Unknown);
        assert_eq!(classify(&[3u8; 20]), PacketClass::Stun);
        assert_eq!(classify(&[4u8; 20]), PacketClass::Unknown);
        assert_eq!(classify(&[19u8; 20]), PacketClass::Unknown);
        assert_eq!(classify(&[63u8; 13]), PacketClass::Dtls);
        assert_eq!(classify(&[64u8; 20]), PacketClass::Unknown);
        assert_eq!(classify(&[127u8; 20]), PacketClass::Unknown);
        assert_eq!(classify(&[192u8; 20]), PacketClass::Unknown);
        let mut p = [0u8; 12];
        p[0] = 0x80;
        for pt in 0..=255u8 {
            p[1] = pt;
            let want = if (64..=95).contains(&(pt & 0x7f)) {
                PacketClass::Rtcp
            } else {
                PacketClass::Rtp
            };
            assert_eq!(classify(&p), want, "pt byte {pt}");
            // 8..12 bytes: RTCP-sized but too short for RTP.
            let want_short = if want == PacketClass::Rtcp {
                PacketClass::Rtcp
            } else {
                PacketClass::Unknown
            };
            assert_eq!(classify(&p[..8]), want_short, "pt byte {pt}");
            assert_eq!(classify(&p[..7]), PacketClass::Unknown, "pt byte {pt}");
        }
    }

    #[test]
    fn error_messages_are_readable() {
        let e = PacketError::Truncated {
            what: "RTP header",
            need: 12,
            have: 3,
        };
        assert_eq!(e.to_string(), "truncated RTP header: need 12 bytes, have 3");
        assert_eq!(
            PacketError::BadVersion(1).to_string(),
            "unsupported RTP/RTCP version 1 (expected 2)"
        );
        assert_eq!(
            PacketError::BadMagicCookie(0xdead_beef).to_string(),
            "bad STUN magic cookie 0xdeadbeef (expected 0x2112a442)"
        );
    }
}
