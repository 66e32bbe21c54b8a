//! Keyframe detection from RTP payloads, without decoding.
//!
//! A subscriber that joins, switches layers or recovers from loss can only
//! start decoding at a keyframe, so the relay must recognise one in the
//! packet stream. Both detectors look at the first bytes of a single packet
//! and answer `false` for anything they cannot parse.

/// VP8 payload descriptor bit: extended control bits present.
const VP8_X: u8 = 0x80;
/// VP8 payload descriptor bit: start of a VP8 partition.
const VP8_S: u8 = 0x10;
/// VP8 extension bits: PictureID, TL0PICIDX, TID, KEYIDX present.
const VP8_I: u8 = 0x80;
const VP8_L: u8 = 0x40;
const VP8_T: u8 = 0x20;
const VP8_K: u8 = 0x10;
/// VP8 PictureID bit: 15-bit (two-byte) picture id.
const VP8_M: u8 = 0x80;

/// Whether a VP8 RTP payload (RFC 7741 §4.2) starts a keyframe.
///
/// Skips the payload descriptor (X, then optional I with 7/15-bit PictureID,
/// L and T/K bytes), requires S=1 and partition index 0 (the first packet of
/// the frame), then checks that the P (inverse keyframe) bit of the VP8
/// payload header is 0.
pub fn vp8_is_keyframe(payload: &[u8]) -> bool {
    vp8_frame_header(payload).is_some_and(|first| first & 0x01 == 0)
}

/// First byte of the VP8 payload header, if this packet starts partition 0.
fn vp8_frame_header(payload: &[u8]) -> Option<u8> {
    let (&descriptor, mut rest) = payload.split_first()?;
    if descriptor & VP8_S == 0 || descriptor & 0x07 != 0 {
        return None;
    }
    if descriptor & VP8_X != 0 {
        let (&ext, tail) = rest.split_first()?;
        rest = tail;
        if ext & VP8_I != 0 {
            let (&picture_id, tail) = rest.split_first()?;
            rest = if picture_id & VP8_M != 0 {
                tail.get(1..)?
            } else {
                tail
            };
        }
        if ext & VP8_L != 0 {
            rest = rest.get(1..)?;
        }
        if ext & (VP8_T | VP8_K) != 0 {
            rest = rest.get(1..)?;
        }
    }
    rest.first().copied()
}

/// H.264 NAL unit types that start a decodable sequence.
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
/// H.264 RTP packetisation types (RFC 6184 §5.4).
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

fn is_key_nal(nal_header: u8) -> bool {
    matches!(nal_header & 0x1f, NAL_IDR | NAL_SPS)
}

/// Whether an H.264 RTP payload (RFC 6184) carries the start of a keyframe:
/// a single NAL unit, any NAL inside a STAP-A, or the start fragment of an
/// FU-A whose type is IDR (5) or SPS (7).
///
/// Browsers send SPS/PPS in a STAP-A just before the IDR, so matching SPS
/// lets the relay switch at the first packet of the keyframe. A STAP-A with a
/// malformed size field counts only if a key NAL precedes the damage.
pub fn h264_is_keyframe(payload: &[u8]) -> bool {
    let Some((&header, rest)) = payload.split_first() else {
        return false;
    };
    match header & 0x1f {
        1..=23 => is_key_nal(header),
        NAL_STAP_A => stap_a_has_key(rest),
        NAL_FU_A => rest
            .first()
            .is_some_and(|&fu| fu & 0x80 != 0 && is_key_nal(fu)),
        _ => false,
    }
}

fn stap_a_has_key(mut rest: &[u8]) -> bool {
    while let Some((size, tail)) = rest.split_first_chunk::<2>() {
        let size = usize::from(u16::from_be_bytes(*size));
        let Some(nal) = tail.get(..size) else {
            return false;
        };
        if nal.first().copied().is_some_and(is_key_nal) {
            return true;
        }
        rest = tail.get(size..).unwrap_or_default();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Start of a real VP8 keyframe: 10-byte frame header with start code
    /// 9d 01 2a and 640x480.
    const VP8_KEY_HEADER: [u8; 10] = [0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];

    fn vp8(descriptor: &[u8], frame: &[u8]) -> Vec<u8> {
        let mut v = descriptor.to_vec();
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn vp8_descriptor_variants() {
        // Minimal descriptor: S=1, PID=0.
        assert!(vp8_is_keyframe(&vp8(&[0x10], &VP8_KEY_HEADER)));
        // X, I with 15-bit PictureID, L, T/K: as Chrome sends it.
        let chrome = [0x90, 0xe0, 0x80 | 0x12, 0x34, 0x05, 0x20];
        assert!(vp8_is_keyframe(&vp8(&chrome, &VP8_KEY_HEADER)));
        // X, I with 7-bit PictureID only.
        assert!(vp8_is_keyframe(&vp8(&[0x90, 0x80, 0x12], &VP8_KEY_HEADER)));
        // X with only K.
        assert!(vp8_is_keyframe(&vp8(&[0x90, 0x10, 0x00], &VP8_KEY_HEADER)));
        // Interframe: P bit set.
        assert!(!vp8_is_keyframe(&vp8(&chrome, &[0x51, 0x42, 0x00])));
        // Not the start of the frame, or a later partition.
        assert!(!vp8_is_keyframe(&vp8(&[0x00], &VP8_KEY_HEADER)));
        assert!(!vp8_is_keyframe(&vp8(&[0x11], &VP8_KEY_HEADER)));
        // Descriptor without payload header.
        assert!(!vp8_is_keyframe(&chrome));
        assert!(!vp8_is_keyframe(&[]));
    }

    #[test]
    fn vp8_every_truncation_of_descriptor_is_false() {
        let chrome = [0x90, 0xe0, 0x80 | 0x12, 0x34, 0x05, 0x20];
        let full = vp8(&chrome, &VP8_KEY_HEADER);
        for cut in 0..=chrome.len() {
            assert!(!vp8_is_keyframe(&full[..cut]), "cut {cut}");
        }
        // Any prefix that still holds the payload header's first byte is a keyframe.
        for cut in chrome.len() + 1..=full.len() {
            assert!(vp8_is_keyframe(&full[..cut]), "cut {cut}");
        }
    }

    #[test]
    fn h264_single_nal() {
        assert!(h264_is_keyframe(&[0x65, 0x88, 0x84])); // IDR slice
        assert!(h264_is_keyframe(&[0x67, 0x42, 0xc0, 0x1f])); // SPS
        assert!(!h264_is_keyframe(&[0x68, 0xce, 0x3c, 0x80])); // PPS
        assert!(!h264_is_keyframe(&[0x41, 0x9a])); // non-IDR slice
        assert!(!h264_is_keyframe(&[0x06, 0x05])); // SEI
        assert!(!h264_is_keyframe(&[]));
        assert!(!h264_is_keyframe(&[0x00])); // type 0 is unspecified
    }

    #[test]
    fn h264_stap_a() {
        // STAP-A: SPS (4 bytes) + PPS (4 bytes), as Chrome sends before an IDR.
        let stap = [
            0x78, 0x00, 0x04, 0x67, 0x42, 0xc0, 0x1f, 0x00, 0x04, 0x68, 0xce, 0x3c, 0x80,
        ];
        assert!(h264_is_keyframe(&stap));
        // Only PPS + SEI: not a keyframe.
        let stap = [0x78, 0x00, 0x02, 0x68, 0xce, 0x00, 0x02, 0x06, 0x05];
        assert!(!h264_is_keyframe(&stap));
        // Key NAL after a zero-length NAL.
        let stap = [0x78, 0x00, 0x00, 0x00, 0x01, 0x65];
        assert!(h264_is_keyframe(&stap));
        // Size overruns before the key NAL: malformed, not a keyframe.
        let stap = [0x78, 0x00, 0x09, 0x68, 0xce, 0x00, 0x01, 0x65];
        assert!(!h264_is_keyframe(&stap));
        // Every truncation of a STAP-A whose key NAL comes second.
        let stap = [0x78, 0x00, 0x02, 0x68, 0xce, 0x00, 0x02, 0x65, 0x88];
        for cut in 0..stap.len() {
            assert!(!h264_is_keyframe(&stap[..cut]), "cut {cut}");
        }
        assert!(h264_is_keyframe(&stap));
    }

    #[test]
    fn h264_fu_a() {
        // FU indicator (NRI=3, type 28), FU header S=1 type 5.
        assert!(h264_is_keyframe(&[0x7c, 0x85, 0x88]));
        // Middle and end fragments of an IDR.
        assert!(!h264_is_keyframe(&[0x7c, 0x05, 0x88]));
        assert!(!h264_is_keyframe(&[0x7c, 0x45, 0x88]));
        // Start fragment of a non-IDR slice.
        assert!(!h264_is_keyframe(&[0x7c, 0x81, 0x9a]));
        // Truncated FU-A.
        assert!(!h264_is_keyframe(&[0x7c]));
        // FU-B and STAP-B, MTAP are not used by WebRTC.
        assert!(!h264_is_keyframe(&[0x7d, 0x85, 0x00, 0x00]));
        assert!(!h264_is_keyframe(&[0x79, 0x00, 0x00, 0x00, 0x01, 0x65]));
    }
}
