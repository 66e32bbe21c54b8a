//! The VP9 RTP payload descriptor (RFC 9628 §4.2), with the scalability
//! structure (§4.2.1).
//!
//! ```text
//! Non-flexible mode (F = 0)              Flexible mode (F = 1)
//!       0 1 2 3 4 5 6 7                        0 1 2 3 4 5 6 7
//!      +-+-+-+-+-+-+-+-+                      +-+-+-+-+-+-+-+-+
//!      |I|P|L|F|B|E|V|Z|                      |I|P|L|F|B|E|V|Z|
//!      +-+-+-+-+-+-+-+-+                      +-+-+-+-+-+-+-+-+
//! I:   |M| PICTURE ID  |                 I:   |M| PICTURE ID  |
//!      +-+-+-+-+-+-+-+-+                      +-+-+-+-+-+-+-+-+
//! M:   | EXTENDED PID  |                 M:   | EXTENDED PID  |
//!      +-+-+-+-+-+-+-+-+                      +-+-+-+-+-+-+-+-+
//! L:   | TID |U| SID |D|                 L:   | TID |U| SID |D|
//!      +-+-+-+-+-+-+-+-+                      +-+-+-+-+-+-+-+-+   -\
//!      |   TL0PICIDX   |                 P,F: | P_DIFF      |N|    up to 3
//!      +-+-+-+-+-+-+-+-+                      +-+-+-+-+-+-+-+-+   -/
//! V:   | SS            |                 V:   | SS            |
//! ```
//!
//! The scalability structure:
//!
//! ```text
//! V:   | N_S |Y|G|-|-|-|
//! Y:   |     WIDTH     | (16 bits)  } N_S + 1 times
//!      |     HEIGHT    | (16 bits)  }
//! G:   |      N_G      |
//! G:   |  TID  |U| R |-|-|          } N_G times
//!      |    P_DIFF     | (R times)  }
//! ```
//!
//! The picture group (up to 255 entries) is validated and skipped; only its
//! size is kept.

use super::CodecError;

const WHAT: &str = "VP9 payload descriptor";
const SS: &str = "VP9 scalability structure";

/// The most spatial layers a scalability structure describes.
pub const MAX_SPATIAL_LAYERS: usize = 8;
/// The most reference differences (P_DIFF) of a flexible-mode picture.
pub const MAX_P_DIFFS: usize = 3;

/// Layer indices of a VP9 packet (the L octet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp9Layer {
    /// Temporal layer id (0-7).
    pub tid: u8,
    /// U: switching up point: a switch to a higher temporal layer is
    /// possible at this frame.
    pub switching_up: bool,
    /// Spatial layer id (0-7).
    pub sid: u8,
    /// D: the frame depends on the spatial layer below (inter-layer
    /// dependency).
    pub inter_layer_dependency: bool,
}

/// The scalability structure (SS), sent with V=1, usually on keyframes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp9Ss {
    spatial_layers: u8,
    resolutions: Option<[(u16, u16); MAX_SPATIAL_LAYERS]>,
    picture_group: Option<u8>,
}

impl Vp9Ss {
    /// Number of spatial layers (N_S + 1, 1-8).
    pub fn spatial_layers(&self) -> usize {
        usize::from(self.spatial_layers)
    }

    /// Width and height of spatial layer `sid`, when Y=1 and the layer
    /// exists.
    pub fn resolution(&self, sid: usize) -> Option<(u16, u16)> {
        if sid >= self.spatial_layers() {
            return None;
        }
        self.resolutions?.get(sid).copied()
    }

    /// Whether the structure carries resolutions (Y).
    pub fn has_resolutions(&self) -> bool {
        self.resolutions.is_some()
    }

    /// Number of frames in the picture group (N_G), when G=1.
    pub fn picture_group_len(&self) -> Option<u8> {
        self.picture_group
    }

    fn parse(mut buf: &[u8]) -> Result<(Vp9Ss, usize), CodecError> {
        let start = buf.len();
        let mut byte = || {
            let (&b, rest) = buf
                .split_first()
                .ok_or(CodecError::Truncated { what: SS })?;
            buf = rest;
            Ok::<u8, CodecError>(b)
        };
        let head = byte()?;
        let spatial_layers = (head >> 5) + 1;
        let mut resolutions = None;
        if head & 0x10 != 0 {
            let mut res = [(0u16, 0u16); MAX_SPATIAL_LAYERS];
            for slot in res.iter_mut().take(usize::from(spatial_layers)) {
                let w = u16::from_be_bytes([byte()?, byte()?]);
                let h = u16::from_be_bytes([byte()?, byte()?]);
                *slot = (w, h);
            }
            resolutions = Some(res);
        }
        let mut picture_group = None;
        if head & 0x08 != 0 {
            let n_g = byte()?;
            for _ in 0..n_g {
                let entry = byte()?;
                let refs = (entry >> 2) & 0x03;
                for _ in 0..refs {
                    if byte()? == 0 {
                        return Err(CodecError::Malformed {
                            what: "VP9 picture group reference difference of 0",
                        });
                    }
                }
            }
            picture_group = Some(n_g);
        }
        let ss = Vp9Ss {
            spatial_layers,
            resolutions,
            picture_group,
        };
        Ok((ss, start - buf.len()))
    }
}

/// A parsed VP9 payload descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp9Descriptor {
    /// Picture ID (7 or 15 bits), when I=1.
    pub picture_id: Option<u16>,
    /// Whether the picture ID is the 15-bit form (M=1).
    pub long_picture_id: bool,
    /// Layer indices, when L=1.
    pub layer: Option<Vp9Layer>,
    /// TL0PICIDX, present with layer indices in non-flexible mode.
    pub tl0_pic_idx: Option<u8>,
    /// F: flexible mode (references are listed as P_DIFFs).
    pub flexible: bool,
    /// B: the packet starts a frame (of its spatial layer).
    pub start_of_frame: bool,
    /// E: the packet ends a frame (of its spatial layer).
    pub end_of_frame: bool,
    /// P: the frame is inter-picture predicted.
    pub inter_picture_predicted: bool,
    /// Z: the frame is not used as reference by the next spatial layer up.
    pub not_reference_for_upper: bool,
    /// The scalability structure, when V=1.
    pub ss: Option<Vp9Ss>,
    p_diffs: [u8; MAX_P_DIFFS],
    p_diff_count: u8,
    /// Length of the descriptor: the VP9 payload starts at this offset.
    pub header_len: usize,
}

impl Vp9Descriptor {
    /// Parses the descriptor at the start of an RTP payload.
    ///
    /// F counts only with a picture ID (I=1): RFC 9628 has receivers
    /// ignore it otherwise, so such a packet is read in non-flexible mode.
    /// A P_DIFF of 0 and a fourth P_DIFF are malformed.
    pub fn parse(payload: &[u8]) -> Result<Vp9Descriptor, CodecError> {
        let truncated = CodecError::Truncated { what: WHAT };
        let mut at = 0usize;
        let byte = |at: &mut usize| {
            let b = payload.get(*at).copied().ok_or(truncated);
            *at += 1;
            b
        };
        let first = byte(&mut at)?;
        let bit = |mask: u8| first & mask != 0;
        let mut d = Vp9Descriptor {
            picture_id: None,
            long_picture_id: false,
            layer: None,
            tl0_pic_idx: None,
            flexible: bit(0x10),
            start_of_frame: bit(0x08),
            end_of_frame: bit(0x04),
            inter_picture_predicted: bit(0x40),
            not_reference_for_upper: bit(0x01),
            ss: None,
            p_diffs: [0; MAX_P_DIFFS],
            p_diff_count: 0,
            header_len: 0,
        };
        if bit(0x80) {
            let hi = byte(&mut at)?;
            d.picture_id = Some(if hi & 0x80 != 0 {
                d.long_picture_id = true;
                u16::from_be_bytes([hi & 0x7f, byte(&mut at)?])
            } else {
                u16::from(hi)
            });
        } else {
            // RFC 9628 §4.2: without a picture ID, F must be 0 and
            // receivers ignore it.
            d.flexible = false;
        }
        if bit(0x20) {
            let l = byte(&mut at)?;
            d.layer = Some(Vp9Layer {
                tid: l >> 5,
                switching_up: l & 0x10 != 0,
                sid: (l >> 1) & 0x07,
                inter_layer_dependency: l & 0x01 != 0,
            });
            if !d.flexible {
                d.tl0_pic_idx = Some(byte(&mut at)?);
            }
        }
        if d.flexible && d.inter_picture_predicted {
            loop {
                let p = byte(&mut at)?;
                let slot = d.p_diffs.get_mut(usize::from(d.p_diff_count)).ok_or(
                    CodecError::Malformed {
                        what: "VP9 descriptor with more than 3 P_DIFFs",
                    },
                )?;
                if p >> 1 == 0 {
                    return Err(CodecError::Malformed {
                        what: "VP9 reference difference of 0",
                    });
                }
                *slot = p >> 1;
                d.p_diff_count += 1;
                if p & 0x01 == 0 {
                    break;
                }
            }
        }
        if bit(0x02) {
            let (ss, len) = Vp9Ss::parse(payload.get(at..).unwrap_or_default())?;
            d.ss = Some(ss);
            at += len;
        }
        d.header_len = at;
        Ok(d)
    }

    /// The reference differences (P_DIFF) of a flexible-mode inter
    /// picture: up to three picture-ID distances.
    pub fn p_diffs(&self) -> &[u8] {
        self.p_diffs
            .get(..usize::from(self.p_diff_count))
            .unwrap_or_default()
    }

    /// Spatial layer id, 0 without layer indices.
    pub fn sid(&self) -> u8 {
        self.layer.map_or(0, |l| l.sid)
    }

    /// Temporal layer id, 0 without layer indices.
    pub fn tid(&self) -> u8 {
        self.layer.map_or(0, |l| l.tid)
    }

    /// Whether the packet starts a keyframe: B=1, P=0, and spatial layer 0
    /// (or no layer indices).
    pub fn is_keyframe(&self) -> bool {
        self.start_of_frame && !self.inter_picture_predicted && self.sid() == 0
    }

    /// The VP9 payload after the descriptor, given the payload the
    /// descriptor was parsed from (empty for a shorter buffer).
    pub fn vp9_payload<'a>(&self, payload: &'a [u8]) -> &'a [u8] {
        payload.get(self.header_len..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::vp9_is_keyframe;
    use super::*;

    /// The first packet of a three-spatial-layer keyframe as libwebrtc
    /// sends it in non-flexible mode: I, L, B, V; picture ID 0x1234
    /// (15-bit); TID 0, SID 0; TL0PICIDX 5; SS with 3 layers at
    /// 320x180/640x360/1280x720 and a 4-frame picture group (L1T3 pattern).
    const KEY_SS: [u8; 28] = [
        0xaa, 0x92, 0x34, 0x00, 0x05, // descriptor
        0x58, // N_S = 2, Y, G
        0x01, 0x40, 0x00, 0xb4, 0x02, 0x80, 0x01, 0x68, 0x05, 0x00, 0x02, 0xd0, // sizes
        0x04, // N_G
        0x04, 0x04, 0x54, 0x01, 0x34, 0x02, 0x54, 0x01, // picture group
        0x82, // start of the VP9 frame
    ];

    #[test]
    fn keyframe_with_scalability_structure() {
        let d = Vp9Descriptor::parse(&KEY_SS).unwrap();
        assert_eq!(d.picture_id, Some(0x1234));
        assert!(d.long_picture_id && !d.flexible);
        assert_eq!(d.layer, Some(Vp9Layer::default()));
        assert_eq!(d.tl0_pic_idx, Some(5));
        assert!(d.start_of_frame && !d.end_of_frame);
        assert!(!d.inter_picture_predicted && !d.not_reference_for_upper);
        assert_eq!(d.header_len, KEY_SS.len() - 1);
        assert_eq!(d.vp9_payload(&KEY_SS), &[0x82]);
        assert!(d.p_diffs().is_empty());
        let ss = d.ss.unwrap();
        assert_eq!(ss.spatial_layers(), 3);
        assert!(ss.has_resolutions());
        assert_eq!(ss.resolution(0), Some((320, 180)));
        assert_eq!(ss.resolution(1), Some((640, 360)));
        assert_eq!(ss.resolution(2), Some((1280, 720)));
        assert_eq!(ss.resolution(3), None);
        assert_eq!(ss.picture_group_len(), Some(4));
        assert!(d.is_keyframe() && vp9_is_keyframe(&KEY_SS));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for cut in 0..KEY_SS.len() - 1 {
            assert!(
                matches!(
                    Vp9Descriptor::parse(&KEY_SS[..cut]),
                    Err(CodecError::Truncated { .. })
                ),
                "cut {cut}"
            );
            assert!(!vp9_is_keyframe(&KEY_SS[..cut]));
        }
    }

    #[test]
    fn flexible_mode_reference_list() {
        // I, P, L, F, B, E; 7-bit picture ID 9; TID 2, U, SID 1, D;
        // P_DIFFs 1, 2 (N set on the first).
        let p = [0xfc, 0x09, 0x53, 0x03, 0x04, 0xaa];
        let d = Vp9Descriptor::parse(&p).unwrap();
        assert_eq!((d.picture_id, d.long_picture_id), (Some(9), false));
        assert!(d.flexible && d.inter_picture_predicted);
        assert!(d.start_of_frame && d.end_of_frame);
        assert_eq!(
            d.layer,
            Some(Vp9Layer {
                tid: 2,
                switching_up: true,
                sid: 1,
                inter_layer_dependency: true,
            })
        );
        assert_eq!((d.sid(), d.tid()), (1, 2));
        assert_eq!(d.tl0_pic_idx, None);
        assert_eq!(d.p_diffs(), &[1, 2]);
        assert_eq!(d.header_len, 5);
        assert!(!d.is_keyframe());
        // Three P_DIFFs is the most.
        let d = Vp9Descriptor::parse(&[0xd8, 0x09, 0x03, 0x05, 0x06]).unwrap();
        assert_eq!(d.p_diffs(), &[1, 2, 3]);
        assert_eq!(d.layer, None);
        assert!(matches!(
            Vp9Descriptor::parse(&[0xd8, 0x09, 0x03, 0x05, 0x07, 0x08]),
            Err(CodecError::Malformed { .. })
        ));
        // A zero difference.
        assert!(matches!(
            Vp9Descriptor::parse(&[0xd8, 0x09, 0x00]),
            Err(CodecError::Malformed { .. })
        ));
        // F without a picture ID is ignored: non-flexible, so L brings a
        // TL0PICIDX and P no P_DIFFs.
        let d = Vp9Descriptor::parse(&[0x78, 0x02, 0x07, 0xaa]).unwrap();
        assert!(!d.flexible && d.inter_picture_predicted);
        assert_eq!((d.sid(), d.tl0_pic_idx, d.header_len), (1, Some(7), 3));
        assert!(d.p_diffs().is_empty());
        // The last P_DIFF announces another that is missing.
        assert_eq!(
            Vp9Descriptor::parse(&[0xd8, 0x09, 0x03]),
            Err(CodecError::Truncated { what: WHAT })
        );
    }

    #[test]
    fn keyframe_rules() {
        // Minimal: B only.
        assert!(vp9_is_keyframe(&[0x08]));
        // Not the start of the frame; inter predicted.
        assert!(!vp9_is_keyframe(&[0x04]));
        assert!(!vp9_is_keyframe(&[0x48]));
        // Spatial layer 1 of a keyframe is no entry point.
        assert!(!vp9_is_keyframe(&[0x28, 0x02, 0x00]));
        assert!(vp9_is_keyframe(&[0x28, 0x00, 0x00]));
        assert!(!vp9_is_keyframe(&[]));
        // Non-flexible: P without P_DIFFs; Z.
        let d = Vp9Descriptor::parse(&[0x49]).unwrap();
        assert!(d.inter_picture_predicted && d.not_reference_for_upper);
        assert_eq!(d.header_len, 1);
    }

    #[test]
    fn scalability_structure_variants() {
        // V only, one layer, no sizes, no picture group.
        let d = Vp9Descriptor::parse(&[0x0a, 0x00]).unwrap();
        let ss = d.ss.unwrap();
        assert_eq!(ss.spatial_layers(), 1);
        assert!(!ss.has_resolutions());
        assert_eq!((ss.resolution(0), ss.picture_group_len()), (None, None));
        // Eight layers with sizes (the most), reserved bits set and ignored.
        let mut p = vec![0x0a, 0xf7];
        for i in 0..8u8 {
            p.extend_from_slice(&[0, i + 1, 0, i + 2]);
        }
        let ss = Vp9Descriptor::parse(&p).unwrap().ss.unwrap();
        assert_eq!(ss.spatial_layers(), 8);
        assert_eq!(ss.resolution(7), Some((8, 9)));
        // G with N_G = 0, and a 255-entry picture group with 3 refs each.
        assert_eq!(
            Vp9Descriptor::parse(&[0x0a, 0x08, 0x00])
                .unwrap()
                .ss
                .unwrap()
                .picture_group_len(),
            Some(0)
        );
        let mut p = vec![0x0a, 0x08, 0xff];
        for _ in 0..255 {
            p.extend_from_slice(&[0x0c, 1, 2, 3]);
        }
        let d = Vp9Descriptor::parse(&p).unwrap();
        assert_eq!(d.ss.unwrap().picture_group_len(), Some(255));
        assert_eq!(d.header_len, p.len());
        p.pop();
        assert!(Vp9Descriptor::parse(&p).is_err());
        // A zero reference difference in the picture group.
        assert!(matches!(
            Vp9Descriptor::parse(&[0x0a, 0x08, 0x01, 0x04, 0x00]),
            Err(CodecError::Malformed { .. })
        ));
    }
}
