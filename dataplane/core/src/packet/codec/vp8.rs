//! The VP8 RTP payload descriptor (RFC 7741 §4.2).
//!
//! ```text
//!       0 1 2 3 4 5 6 7
//!      +-+-+-+-+-+-+-+-+
//!      |X|R|N|S|R| PID | (REQUIRED)
//!      +-+-+-+-+-+-+-+-+
//! X:   |I|L|T|K| RSV   | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! I:   |M| PictureID   | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//!      |   PictureID   | (when M = 1)
//!      +-+-+-+-+-+-+-+-+
//! L:   |   TL0PICIDX   | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! T/K: |TID|Y| KEYIDX  | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! ```
//!
//! The R and RSV bits must be ignored by receivers, so they are.

use super::CodecError;

const X: u8 = 0x80;
const N: u8 = 0x20;
const S: u8 = 0x10;
const PID: u8 = 0x07;
const I: u8 = 0x80;
const L: u8 = 0x40;
const T: u8 = 0x20;
const K: u8 = 0x10;
const M: u8 = 0x80;

const WHAT: &str = "VP8 payload descriptor";

/// A parsed VP8 payload descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp8Descriptor {
    /// PictureID (7 or 15 bits), when I=1.
    pub picture_id: Option<u16>,
    /// Whether the PictureID is the 15-bit (two-byte) form.
    pub long_picture_id: bool,
    /// TL0PICIDX, when L=1.
    pub tl0_pic_idx: Option<u8>,
    /// Temporal layer index, when T=1.
    pub tid: Option<u8>,
    /// Y: layer sync (the frame depends only on temporal layer 0); false
    /// when T=0.
    pub layer_sync: bool,
    /// KEYIDX, when K=1.
    pub key_idx: Option<u8>,
    /// N: the frame is not used as a reference by any other frame.
    pub non_reference: bool,
    /// S: the packet starts a VP8 partition.
    pub start_of_partition: bool,
    /// PID: the partition index.
    pub partition_index: u8,
    /// S=1 and PID=0: the packet starts the frame.
    pub starts_frame: bool,
    /// Length of the descriptor: the VP8 payload starts at this offset.
    pub header_len: usize,
}

impl Vp8Descriptor {
    /// Parses the descriptor at the start of an RTP payload. The payload may
    /// end right after it (`header_len == payload.len()`).
    pub fn parse(payload: &[u8]) -> Result<Vp8Descriptor, CodecError> {
        let truncated = CodecError::Truncated { what: WHAT };
        let mut at = 0usize;
        let mut next = || {
            let b = payload.get(at).copied().ok_or(truncated);
            at += 1;
            b
        };
        let first = next()?;
        let mut d = Vp8Descriptor {
            non_reference: first & N != 0,
            start_of_partition: first & S != 0,
            partition_index: first & PID,
            starts_frame: first & S != 0 && first & PID == 0,
            ..Vp8Descriptor::default()
        };
        if first & X != 0 {
            let ext = next()?;
            if ext & I != 0 {
                let hi = next()?;
                d.picture_id = Some(if hi & M != 0 {
                    d.long_picture_id = true;
                    u16::from_be_bytes([hi & 0x7f, next()?])
                } else {
                    u16::from(hi)
                });
            }
            if ext & L != 0 {
                d.tl0_pic_idx = Some(next()?);
            }
            if ext & (T | K) != 0 {
                let tk = next()?;
                if ext & T != 0 {
                    d.tid = Some(tk >> 6);
                    d.layer_sync = tk & 0x20 != 0;
                }
                if ext & K != 0 {
                    d.key_idx = Some(tk & 0x1f);
                }
            }
        }
        d.header_len = at;
        Ok(d)
    }

    /// The VP8 payload after the descriptor, given the payload the
    /// descriptor was parsed from (empty for a shorter buffer).
    pub fn vp8_payload<'a>(&self, payload: &'a [u8]) -> &'a [u8] {
        payload.get(self.header_len..).unwrap_or_default()
    }

    /// Whether the packet starts a keyframe: it starts the frame and the P
    /// (inverse keyframe) bit of the VP8 payload header is 0.
    pub fn is_keyframe(&self, payload: &[u8]) -> bool {
        self.starts_frame
            && self
                .vp8_payload(payload)
                .first()
                .is_some_and(|&b| b & 0x01 == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::vp8_is_keyframe;
    use super::*;

    /// Start of a real VP8 keyframe: 10-byte frame header with start code
    /// 9d 01 2a and 640x480.
    const VP8_KEY_HEADER: [u8; 10] = [0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
    /// X, I with 15-bit PictureID 0x1234, L (TL0PICIDX 5), T/K (TID 0, Y=1,
    /// KEYIDX 0): as Chrome sends it.
    const CHROME: [u8; 6] = [0x90, 0xf0, 0x80 | 0x12, 0x34, 0x05, 0x20];

    fn vp8(descriptor: &[u8], frame: &[u8]) -> Vec<u8> {
        let mut v = descriptor.to_vec();
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn chrome_descriptor_fields() {
        let full = vp8(&CHROME, &VP8_KEY_HEADER);
        let d = Vp8Descriptor::parse(&full).unwrap();
        assert_eq!(
            d,
            Vp8Descriptor {
                picture_id: Some(0x1234),
                long_picture_id: true,
                tl0_pic_idx: Some(5),
                tid: Some(0),
                layer_sync: true,
                key_idx: Some(0),
                non_reference: false,
                start_of_partition: true,
                partition_index: 0,
                starts_frame: true,
                header_len: 6,
            }
        );
        assert_eq!(d.vp8_payload(&full), &VP8_KEY_HEADER);
        assert!(d.is_keyframe(&full));
        // TID 2, Y=0, KEYIDX 17, 7-bit PictureID 0x7f, N=1, later partition.
        let d = Vp8Descriptor::parse(&[0xb3, 0xb0, 0x7f, 0x91, 0xaa]).unwrap();
        assert_eq!(d.picture_id, Some(0x7f));
        assert!(!d.long_picture_id);
        assert_eq!(d.tl0_pic_idx, None);
        assert_eq!((d.tid, d.layer_sync, d.key_idx), (Some(2), false, Some(17)));
        assert!(d.non_reference && d.start_of_partition && !d.starts_frame);
        assert_eq!((d.partition_index, d.header_len), (3, 4));
        // K without T: no TID, no Y.
        let d = Vp8Descriptor::parse(&[0x90, 0x10, 0xff]).unwrap();
        assert_eq!((d.tid, d.layer_sync, d.key_idx), (None, false, Some(31)));
        // Reserved bits are ignored.
        let d = Vp8Descriptor::parse(&[0x58, 0x00]).unwrap();
        assert_eq!((d.header_len, d.starts_frame), (1, true));
        let d = Vp8Descriptor::parse(&[0x90, 0x0f, 0x00]).unwrap();
        assert_eq!(d.header_len, 2);
    }

    #[test]
    fn every_truncation_of_the_descriptor_is_an_error() {
        for cut in 0..CHROME.len() {
            assert_eq!(
                Vp8Descriptor::parse(&CHROME[..cut]),
                Err(CodecError::Truncated { what: WHAT }),
                "cut {cut}"
            );
        }
        // The descriptor alone parses; with no payload it is no keyframe.
        let d = Vp8Descriptor::parse(&CHROME).unwrap();
        assert_eq!(d.header_len, CHROME.len());
        assert!(!d.is_keyframe(&CHROME));
    }

    #[test]
    fn vp8_descriptor_variants() {
        // Minimal descriptor: S=1, PID=0.
        assert!(vp8_is_keyframe(&vp8(&[0x10], &VP8_KEY_HEADER)));
        assert!(vp8_is_keyframe(&vp8(&CHROME, &VP8_KEY_HEADER)));
        // X, I with 7-bit PictureID only.
        assert!(vp8_is_keyframe(&vp8(&[0x90, 0x80, 0x12], &VP8_KEY_HEADER)));
        // X with only K.
        assert!(vp8_is_keyframe(&vp8(&[0x90, 0x10, 0x00], &VP8_KEY_HEADER)));
        // Interframe: P bit set.
        assert!(!vp8_is_keyframe(&vp8(&CHROME, &[0x51, 0x42, 0x00])));
        // Not the start of the frame, or a later partition.
        assert!(!vp8_is_keyframe(&vp8(&[0x00], &VP8_KEY_HEADER)));
        assert!(!vp8_is_keyframe(&vp8(&[0x11], &VP8_KEY_HEADER)));
        // Descriptor without payload header.
        assert!(!vp8_is_keyframe(&CHROME));
        assert!(!vp8_is_keyframe(&[]));
    }

    #[test]
    fn vp8_every_truncation_of_descriptor_is_false() {
        let full = vp8(&CHROME, &VP8_KEY_HEADER);
        for cut in 0..=CHROME.len() {
            assert!(!vp8_is_keyframe(&full[..cut]), "cut {cut}");
        }
        // Any prefix that still holds the payload header's first byte is a keyframe.
        for cut in CHROME.len() + 1..=full.len() {
            assert!(vp8_is_keyframe(&full[..cut]), "cut {cut}");
        }
    }
}
