//! Zero-copy parsers for the codec-specific parts of RTP video: payload
//! descriptors and headers (VP8, VP9, H.264, AV1) and the AV1 Dependency
//! Descriptor header extension, plus keyframe detection from them.
//!
//! A subscriber that joins, switches layers or recovers from loss can only
//! start decoding at a keyframe, and layer selection needs each packet's
//! spatial and temporal layer, so the relay reads these few bytes without
//! decoding any media. Every parser borrows from the packet, never
//! allocates and never panics: any byte string yields a value or a
//! [`CodecError`]. The `*_is_keyframe` functions answer `false` for
//! anything they cannot parse.
//!
//! - [`vp8`]: the VP8 payload descriptor (RFC 7741 §4.2).
//! - [`vp9`]: the VP9 payload descriptor and scalability structure (RFC 9628).
//! - [`h264`]: H.264 packetization (RFC 6184): single NAL units, STAP-A,
//!   FU-A, and the latest SPS/PPS of a stream.
//! - [`av1`]: the AV1 aggregation header and OBU elements (AV1 RTP
//!   specification §4).
//! - [`dd`]: the Dependency Descriptor extension (AV1 RTP specification,
//!   appendix A), which also carries layering for VP8, VP9 and H.264.
//! - [`bits`]: the bit reader they share.

pub mod av1;
pub mod bits;
pub mod dd;
pub mod h264;
pub mod vp8;
pub mod vp9;

pub use av1::{Av1Obus, Av1Packet, Obu, ObuType};
pub use dd::{DdStructure, DependencyDescriptor, Dti};
pub use h264::{FuA, H264Packet, ParameterSets, StapA, StapAUnits};
pub use vp8::Vp8Descriptor;
pub use vp9::{Vp9Descriptor, Vp9Layer, Vp9Ss};

/// Why a codec payload or header extension was rejected. Each variant is
/// the sender's fault: the bytes do not follow the packetization format.
///
/// `what` names the structure or field, a static string so that building
/// the error never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The packet ends inside a structure its headers announce.
    #[error("sender's {what} is truncated")]
    Truncated {
        /// The structure that did not fit.
        what: &'static str,
    },
    /// A length field points past the end of the packet.
    #[error("sender's {what} runs past the end of the packet")]
    LengthOverrun {
        /// The length-prefixed element.
        what: &'static str,
    },
    /// A field holds a value the format reserves.
    #[error("sender used a reserved value in {what}")]
    Reserved {
        /// The field.
        what: &'static str,
    },
    /// A field combination the format forbids.
    #[error("sender sent a malformed {what}")]
    Malformed {
        /// What is wrong.
        what: &'static str,
    },
    /// A valid mode of the format that WebRTC does not use and the relay
    /// does not parse (H.264 STAP-B, MTAP, FU-B).
    #[error("sender used {what}, which is not supported")]
    Unsupported {
        /// The mode.
        what: &'static str,
    },
    /// A structure larger than the parser's fixed capacity; it is reported
    /// rather than truncated.
    #[error("sender's {what} exceeds the relay's fixed capacity")]
    TooLarge {
        /// The structure.
        what: &'static str,
    },
    /// A dependency descriptor refers to a template structure the sender
    /// has not sent (or that was lost).
    #[error("sender's dependency descriptor refers to a template structure not yet received")]
    NoStructure,
}

/// Whether a VP8 RTP payload (RFC 7741 §4.2) starts a keyframe.
///
/// Parses the payload descriptor ([`Vp8Descriptor::parse`]), requires S=1
/// and partition index 0 (the first packet of the frame), then checks that
/// the P (inverse keyframe) bit of the VP8 payload header is 0.
pub fn vp8_is_keyframe(payload: &[u8]) -> bool {
    Vp8Descriptor::parse(payload).is_ok_and(|d| d.is_keyframe(payload))
}

/// Whether an H.264 RTP payload (RFC 6184) carries the start of a keyframe:
/// a single NAL unit, any NAL inside a STAP-A, or the start fragment of an
/// FU-A whose type is IDR (5) or SPS (7).
///
/// Browsers send SPS/PPS in a STAP-A just before the IDR, so matching SPS
/// lets the relay switch at the first packet of the keyframe. A malformed
/// packet (for instance a STAP-A with a size field that overruns it) is
/// never a keyframe, whatever precedes the damage.
pub fn h264_is_keyframe(payload: &[u8]) -> bool {
    H264Packet::parse(payload).is_ok_and(|p| p.is_keyframe())
}

/// Whether a VP9 RTP payload (RFC 9628) starts a keyframe: the beginning
/// of a frame (B=1) that is not inter-picture predicted (P=0), in spatial
/// layer 0 or without layer indices.
pub fn vp9_is_keyframe(payload: &[u8]) -> bool {
    Vp9Descriptor::parse(payload).is_ok_and(|d| d.is_keyframe())
}

/// Whether an AV1 RTP payload starts a keyframe: N=1 (the first packet of
/// a coded video sequence) and its first OBU, after any temporal
/// delimiter, is a sequence header.
pub fn av1_is_keyframe(payload: &[u8]) -> bool {
    Av1Packet::parse(payload).is_ok_and(|p| p.is_keyframe())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_the_senders_fault() {
        assert_eq!(
            CodecError::Truncated {
                what: "VP9 payload descriptor"
            }
            .to_string(),
            "sender's VP9 payload descriptor is truncated"
        );
        assert_eq!(
            CodecError::NoStructure.to_string(),
            "sender's dependency descriptor refers to a template structure not yet received"
        );
    }
}
