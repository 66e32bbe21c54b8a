//! The AV1 RTP payload (AV1 RTP specification §4.4): the aggregation
//! header and the OBU elements after it.
//!
//! ```text
//!  0 1 2 3 4 5 6 7
//! +-+-+-+-+-+-+-+-+
//! |Z|Y| W |N|-|-|-|
//! +-+-+-+-+-+-+-+-+
//! ```
//!
//! Z: the first OBU element continues an OBU from the previous packet. Y:
//! the last OBU element continues in the next packet. W: the number of OBU
//! elements (1-3), or 0 for any number. N: the packet is the first of a
//! coded video sequence. With W=0 every element is preceded by its LEB128
//! length; with W=1..3 all but the last are, and the last runs to the end
//! of the packet. The reserved bits are ignored.
//!
//! An element that starts an OBU begins with the OBU header (AV1 §5.3.2):
//! `|F| type(4) |X|S|r|`, then with X=1 the extension
//! `| temporal_id(3) | spatial_id(2) | r(3) |`, then with S=1 the OBU's own
//! LEB128 size (allowed, though senders should drop it).

use super::CodecError;
use super::bits::leb128;

/// The type of an OBU (AV1 §6.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObuType {
    /// 1: sequence header.
    SequenceHeader,
    /// 2: temporal delimiter (senders should remove these).
    TemporalDelimiter,
    /// 3: frame header.
    FrameHeader,
    /// 4: tile group.
    TileGroup,
    /// 5: metadata.
    Metadata,
    /// 6: frame (a frame header and a tile group).
    Frame,
    /// 7: redundant frame header.
    RedundantFrameHeader,
    /// 8: tile list (senders should not send these).
    TileList,
    /// 15: padding.
    Padding,
    /// 0 and 9-14: reserved.
    Reserved(u8),
}

impl ObuType {
    /// The type for the 4-bit `obu_type` field.
    pub fn from_bits(v: u8) -> ObuType {
        match v & 0x0f {
            1 => ObuType::SequenceHeader,
            2 => ObuType::TemporalDelimiter,
            3 => ObuType::FrameHeader,
            4 => ObuType::TileGroup,
            5 => ObuType::Metadata,
            6 => ObuType::Frame,
            7 => ObuType::RedundantFrameHeader,
            8 => ObuType::TileList,
            15 => ObuType::Padding,
            other => ObuType::Reserved(other),
        }
    }
}

/// One OBU element of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Obu<'a> {
    /// The OBU's type; `None` for an element that continues an OBU from
    /// the previous packet (the first element when Z=1), which has no
    /// header.
    pub obu_type: Option<ObuType>,
    /// X: the OBU header has an extension (temporal and spatial id).
    pub has_extension: bool,
    /// Temporal id from the extension, 0 without one.
    pub temporal_id: u8,
    /// Spatial id from the extension, 0 without one.
    pub spatial_id: u8,
    /// The element's bytes after the OBU header, its extension and its
    /// size field (the whole element for a continuation).
    pub data: &'a [u8],
    /// The element is the last one and Y=1: the OBU continues in the next
    /// packet.
    pub continues: bool,
}

/// A validated AV1 RTP payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Av1Packet<'a> {
    /// Z: the first element continues an OBU of the previous packet.
    pub first_is_continuation: bool,
    /// Y: the last element continues in the next packet.
    pub last_continues: bool,
    /// W: the number of OBU elements announced (0: each is
    /// length-prefixed).
    pub w: u8,
    /// N: the first packet of a coded video sequence.
    pub new_coded_video_sequence: bool,
    elements: &'a [u8],
    count: usize,
}

impl<'a> Av1Packet<'a> {
    /// Parses the aggregation header and validates every OBU element
    /// (lengths, OBU headers), so that [`Av1Packet::obus`] yields them all.
    ///
    /// Errors: an empty payload or an empty element list, fewer elements
    /// than W announces, a length past the end, an empty element, a set
    /// OBU forbidden bit, and N=1 with Z=1 (a coded video sequence cannot
    /// start with a continuation).
    pub fn parse(payload: &'a [u8]) -> Result<Av1Packet<'a>, CodecError> {
        let (&h, elements) = payload.split_first().ok_or(CodecError::Truncated {
            what: "AV1 aggregation header",
        })?;
        let packet = Av1Packet {
            first_is_continuation: h & 0x80 != 0,
            last_continues: h & 0x40 != 0,
            w: (h >> 4) & 0x03,
            new_coded_video_sequence: h & 0x08 != 0,
            elements,
            count: 0,
        };
        if packet.new_coded_video_sequence && packet.first_is_continuation {
            return Err(CodecError::Malformed {
                what: "AV1 aggregation header with both N and Z",
            });
        }
        if elements.is_empty() {
            return Err(CodecError::Truncated {
                what: "AV1 packet without OBU elements",
            });
        }
        let mut it = packet.obus();
        let mut count = 0;
        while it.next_obu()?.is_some() {
            count += 1;
        }
        if packet.w != 0 && count < usize::from(packet.w) {
            return Err(CodecError::Truncated {
                what: "AV1 packet with fewer OBU elements than W",
            });
        }
        Ok(Av1Packet { count, ..packet })
    }

    /// The OBU elements, in order.
    pub fn obus(&self) -> Av1Obus<'a> {
        Av1Obus {
            rest: self.elements,
            index: 0,
            w: self.w,
            z: self.first_is_continuation,
            y: self.last_continues,
        }
    }

    /// Number of OBU elements.
    pub fn obu_count(&self) -> usize {
        self.count
    }

    /// Whether the packet starts a keyframe: N=1 and its first OBU, after
    /// any temporal delimiters, is a sequence header.
    pub fn is_keyframe(&self) -> bool {
        self.new_coded_video_sequence
            && self
                .obus()
                .find(|o| o.obu_type != Some(ObuType::TemporalDelimiter))
                .is_some_and(|o| o.obu_type == Some(ObuType::SequenceHeader))
    }
}

/// Iterator over the OBU elements of an [`Av1Packet`], borrowing from it.
#[derive(Debug, Clone)]
pub struct Av1Obus<'a> {
    rest: &'a [u8],
    index: usize,
    w: u8,
    z: bool,
    y: bool,
}

impl<'a> Av1Obus<'a> {
    fn next_obu(&mut self) -> Result<Option<Obu<'a>>, CodecError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let last_by_w = self.w != 0 && self.index + 1 == usize::from(self.w);
        let element = if last_by_w {
            std::mem::take(&mut self.rest)
        } else {
            let (len, n) = leb128(self.rest, "AV1 OBU element length")?;
            let after = self.rest.get(n..).unwrap_or_default();
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let element = after.get(..len).ok_or(CodecError::LengthOverrun {
                what: "AV1 OBU element",
            })?;
            self.rest = after.get(len..).unwrap_or_default();
            element
        };
        if element.is_empty() {
            return Err(CodecError::Malformed {
                what: "empty AV1 OBU element",
            });
        }
        let continues = self.y && self.rest.is_empty();
        let first = self.index == 0;
        self.index += 1;
        if first && self.z {
            return Ok(Some(Obu {
                obu_type: None,
                has_extension: false,
                temporal_id: 0,
                spatial_id: 0,
                data: element,
                continues,
            }));
        }
        let (&header, mut data) = element.split_first().ok_or(CodecError::Truncated {
            what: "AV1 OBU header",
        })?;
        if header & 0x80 != 0 {
            return Err(CodecError::Malformed {
                what: "AV1 OBU header with the forbidden bit set",
            });
        }
        let has_extension = header & 0x04 != 0;
        let (mut temporal_id, mut spatial_id) = (0, 0);
        if has_extension {
            let (&ext, tail) = data.split_first().ok_or(CodecError::Truncated {
                what: "AV1 OBU extension header",
            })?;
            temporal_id = ext >> 5;
            spatial_id = (ext >> 3) & 0x03;
            data = tail;
        }
        if header & 0x02 != 0 {
            let (size, n) = leb128(data, "AV1 OBU size field")?;
            data = data.get(n..).unwrap_or_default();
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if let Some(obu) = data.get(..size) {
                data = obu;
            }
        }
        Ok(Some(Obu {
            obu_type: Some(ObuType::from_bits(header >> 3)),
            has_extension,
            temporal_id,
            spatial_id,
            data,
            continues,
        }))
    }
}

impl<'a> Iterator for Av1Obus<'a> {
    type Item = Obu<'a>;

    fn next(&mut self) -> Option<Obu<'a>> {
        match self.next_obu() {
            Ok(obu) => obu,
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::av1_is_keyframe;
    use super::*;

    /// The first packet of a keyframe as libwebrtc sends it: N=1, W=2; a
    /// length-prefixed sequence header, then a frame OBU to the end.
    const KEY: [u8; 19] = [
        0x28, // Z=0 Y=0 W=2 N=1
        0x0b, 0x08, 0x00, 0x00, 0x00, 0x02, 0xaf, 0xff, 0x9b, 0x5f, 0x30, 0x08, // seq header
        0x30, 0x10, 0x00, 0x00, 0xa0, 0x01, // frame OBU
    ];

    #[test]
    fn keyframe_packet_elements() {
        let p = Av1Packet::parse(&KEY).unwrap();
        assert!(p.new_coded_video_sequence && !p.first_is_continuation && !p.last_continues);
        assert_eq!((p.w, p.obu_count()), (2, 2));
        let obus: Vec<Obu<'_>> = p.obus().collect();
        assert_eq!(obus[0].obu_type, Some(ObuType::SequenceHeader));
        assert_eq!(obus[0].data, &KEY[3..13]);
        assert_eq!(obus[1].obu_type, Some(ObuType::Frame));
        assert!(!obus[1].has_extension && !obus[1].continues);
        assert_eq!(obus[1].data, &KEY[14..]);
        assert!(p.is_keyframe() && av1_is_keyframe(&KEY));
        // The same without N is no keyframe; neither is N with a frame first.
        let mut k = KEY;
        k[0] = 0x20;
        assert!(!av1_is_keyframe(&k));
        assert!(!av1_is_keyframe(&[0x18, 0x30, 0x10]));
        // A temporal delimiter before the sequence header is skipped.
        assert!(av1_is_keyframe(&[0x08, 0x01, 0x10, 0x02, 0x08, 0x00]));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for cut in 0..14 {
            assert!(Av1Packet::parse(&KEY[..cut]).is_err(), "cut {cut}");
            assert!(!av1_is_keyframe(&KEY[..cut]), "cut {cut}");
        }
        // Within the last element any cut after its header byte parses.
        for cut in 14..=KEY.len() {
            assert_eq!(Av1Packet::parse(&KEY[..cut]).unwrap().obu_count(), 2);
        }
    }

    #[test]
    fn w0_extension_continuations_and_size_fields() {
        // Z=1, Y=1, W=0: a continuation, a frame OBU with extension (TID 2,
        // SID 1) and an OBU size field, a tile group that continues.
        let p = [
            0xc0, // Z Y W=0
            0x02, 0xaa, 0xbb, // continuation
            0x05, 0x36, 0x48, 0x02, 0x11, 0x22, // frame, X, S, size 2
            0x02, 0x20, 0x33, // tile group
        ];
        let pkt = Av1Packet::parse(&p).unwrap();
        assert_eq!(pkt.obu_count(), 3);
        let obus: Vec<Obu<'_>> = pkt.obus().collect();
        assert_eq!(
            obus[0],
            Obu {
                obu_type: None,
                has_extension: false,
                temporal_id: 0,
                spatial_id: 0,
                data: &[0xaa, 0xbb],
                continues: false,
            }
        );
        assert_eq!(
            obus[1],
            Obu {
                obu_type: Some(ObuType::Frame),
                has_extension: true,
                temporal_id: 2,
                spatial_id: 1,
                data: &[0x11, 0x22],
                continues: false,
            }
        );
        assert_eq!(obus[2].obu_type, Some(ObuType::TileGroup));
        assert!(obus[2].continues);
        assert!(!pkt.is_keyframe());
        // W=1: a single element to the end, which may continue.
        let pkt = Av1Packet::parse(&[0x50, 0x30, 0x01, 0x02]).unwrap();
        let only: Vec<Obu<'_>> = pkt.obus().collect();
        assert_eq!(only.len(), 1);
        assert!(only[0].continues);
        assert_eq!(only[0].data, &[0x01, 0x02]);
        // W=3.
        let pkt = Av1Packet::parse(&[0x30, 0x01, 0x10, 0x01, 0x78, 0x30]).unwrap();
        let types: Vec<_> = pkt.obus().map(|o| o.obu_type).collect();
        assert_eq!(
            types,
            [
                Some(ObuType::TemporalDelimiter),
                Some(ObuType::Padding),
                Some(ObuType::Frame)
            ]
        );
    }

    #[test]
    fn typed_errors() {
        use CodecError::*;
        let cases: [(&[u8], CodecError); 8] = [
            (
                &[],
                Truncated {
                    what: "AV1 aggregation header",
                },
            ),
            (
                &[0x10],
                Truncated {
                    what: "AV1 packet without OBU elements",
                },
            ),
            (
                &[0x88, 0x30],
                Malformed {
                    what: "AV1 aggregation header with both N and Z",
                },
            ),
            (
                &[0x00, 0x05, 0x30],
                LengthOverrun {
                    what: "AV1 OBU element",
                },
            ),
            (
                &[0x00, 0x80],
                Truncated {
                    what: "AV1 OBU element length",
                },
            ),
            (
                &[0x00, 0x00],
                Malformed {
                    what: "empty AV1 OBU element",
                },
            ),
            (
                &[0x10, 0xb0],
                Malformed {
                    what: "AV1 OBU header with the forbidden bit set",
                },
            ),
            (
                &[0x10, 0x34],
                Truncated {
                    what: "AV1 OBU extension header",
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Av1Packet::parse(bytes), Err(want), "{bytes:02x?}");
        }
        // W=3 but two elements.
        assert_eq!(
            Av1Packet::parse(&[0x30, 0x01, 0x10, 0x01, 0x30]),
            Err(Truncated {
                what: "AV1 packet with fewer OBU elements than W"
            })
        );
        // A size field that is cut off.
        assert_eq!(
            Av1Packet::parse(&[0x10, 0x32, 0x80]),
            Err(Truncated {
                what: "AV1 OBU size field"
            })
        );
        // Reserved OBU types parse (the relay forwards them untouched).
        let p = Av1Packet::parse(&[0x10, 0x48]).unwrap();
        assert_eq!(
            p.obus().next().unwrap().obu_type,
            Some(ObuType::Reserved(9))
        );
        assert_eq!(ObuType::from_bits(0), ObuType::Reserved(0));
        for (v, t) in [
            (3, ObuType::FrameHeader),
            (5, ObuType::Metadata),
            (7, ObuType::RedundantFrameHeader),
            (8, ObuType::TileList),
        ] {
            assert_eq!(ObuType::from_bits(v), t);
        }
    }
}
