//! H.264 RTP packetization (RFC 6184): single NAL unit packets (types
//! 1-23), STAP-A aggregation (24) and FU-A fragmentation (28), the modes
//! WebRTC uses, and [`ParameterSets`], the latest SPS and PPS of a stream.
//!
//! STAP-B (25), MTAP16/24 (26, 27) and FU-B (29) belong to the interleaved
//! mode, which WebRTC never negotiates: they are
//! [`CodecError::Unsupported`]. Types 0, 30 and 31 are reserved or
//! unspecified. The F (forbidden zero) bit is not checked: RFC 6184 lets a
//! receiver pass such NAL units on to the decoder.

use super::CodecError;

/// NAL unit type of an IDR slice.
pub const NAL_IDR: u8 = 5;
/// NAL unit type of a sequence parameter set.
pub const NAL_SPS: u8 = 7;
/// NAL unit type of a picture parameter set.
pub const NAL_PPS: u8 = 8;
/// Packet type of a STAP-A.
pub const NAL_STAP_A: u8 = 24;
/// Packet type of an FU-A.
pub const NAL_FU_A: u8 = 28;

/// The largest SPS or PPS (NAL header included) that [`ParameterSets`]
/// keeps.
pub const MAX_PARAMETER_SET_LEN: usize = 256;

fn is_key_nal(nal_header: u8) -> bool {
    matches!(nal_header & 0x1f, NAL_IDR | NAL_SPS)
}

/// One H.264 RTP payload, classified by its packetization type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H264Packet<'a> {
    /// A single NAL unit packet: the payload is one whole NAL unit.
    Single {
        /// NAL unit type (1-23).
        nal_type: u8,
        /// The NAL unit, header byte included.
        nal: &'a [u8],
    },
    /// A single-time aggregation packet.
    StapA(StapA<'a>),
    /// A fragment of a NAL unit.
    FuA(FuA<'a>),
}

impl<'a> H264Packet<'a> {
    /// Classifies and validates an RTP payload: a STAP-A's size fields all
    /// lie within it, an FU-A has its FU header and is not both start and
    /// end.
    pub fn parse(payload: &'a [u8]) -> Result<H264Packet<'a>, CodecError> {
        let (&header, rest) = payload.split_first().ok_or(CodecError::Truncated {
            what: "H.264 NAL unit header",
        })?;
        match header & 0x1f {
            nal_type @ 1..=23 => Ok(H264Packet::Single {
                nal_type,
                nal: payload,
            }),
            NAL_STAP_A => StapA::parse(header, rest).map(H264Packet::StapA),
            NAL_FU_A => FuA::parse(header, rest).map(H264Packet::FuA),
            25 => Err(CodecError::Unsupported {
                what: "H.264 STAP-B",
            }),
            26 | 27 => Err(CodecError::Unsupported { what: "H.264 MTAP" }),
            29 => Err(CodecError::Unsupported { what: "H.264 FU-B" }),
            _ => Err(CodecError::Reserved {
                what: "H.264 NAL unit type",
            }),
        }
    }

    /// Whether the packet carries the start of a keyframe: an IDR slice or
    /// SPS as a single NAL, inside a STAP-A, or as the start of an FU-A.
    pub fn is_keyframe(&self) -> bool {
        match self {
            H264Packet::Single { nal, .. } => nal.first().copied().is_some_and(is_key_nal),
            H264Packet::StapA(stap) => stap
                .nal_units()
                .any(|nal| nal.first().copied().is_some_and(is_key_nal)),
            H264Packet::FuA(fu) => fu.is_start() && is_key_nal(fu.nal_header()),
        }
    }

    /// Whether the packet starts an IDR slice: a single IDR NAL, a STAP-A
    /// holding one, or the start fragment of an IDR FU-A.
    pub fn is_idr_start(&self) -> bool {
        let idr = |h: u8| h & 0x1f == NAL_IDR;
        match self {
            H264Packet::Single { nal_type, .. } => *nal_type == NAL_IDR,
            H264Packet::StapA(stap) => stap
                .nal_units()
                .any(|nal| nal.first().copied().is_some_and(idr)),
            H264Packet::FuA(fu) => fu.is_start() && idr(fu.nal_header()),
        }
    }
}

/// A validated STAP-A: a sequence of 16-bit-size-prefixed NAL units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StapA<'a> {
    /// The STAP-A header byte (F, NRI, type 24).
    header: u8,
    /// The aggregation units after the header.
    units: &'a [u8],
    /// Number of NAL units.
    count: usize,
}

impl<'a> StapA<'a> {
    fn parse(header: u8, units: &'a [u8]) -> Result<StapA<'a>, CodecError> {
        let mut rest = units;
        let mut count = 0;
        if rest.is_empty() {
            return Err(CodecError::Truncated {
                what: "H.264 STAP-A without NAL units",
            });
        }
        while !rest.is_empty() {
            let (size, tail) = rest.split_first_chunk::<2>().ok_or(CodecError::Truncated {
                what: "H.264 STAP-A NAL unit size",
            })?;
            let size = usize::from(u16::from_be_bytes(*size));
            rest = tail.get(size..).ok_or(CodecError::LengthOverrun {
                what: "H.264 STAP-A NAL unit",
            })?;
            count += 1;
        }
        Ok(StapA {
            header,
            units,
            count,
        })
    }

    /// The STAP-A's own header byte.
    pub fn header(&self) -> u8 {
        self.header
    }

    /// Number of NAL units inside.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds no NAL unit (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The NAL units, each with its header byte (a zero-size unit is an
    /// empty slice).
    pub fn nal_units(&self) -> StapAUnits<'a> {
        StapAUnits { rest: self.units }
    }
}

/// Iterator over the NAL units of a [`StapA`], borrowing from the packet.
#[derive(Debug, Clone)]
pub struct StapAUnits<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for StapAUnits<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (size, tail) = self.rest.split_first_chunk::<2>()?;
        let size = usize::from(u16::from_be_bytes(*size));
        let nal = tail.get(..size)?;
        self.rest = tail.get(size..).unwrap_or_default();
        Some(nal)
    }
}

/// One FU-A fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuA<'a> {
    indicator: u8,
    header: u8,
    fragment: &'a [u8],
}

impl<'a> FuA<'a> {
    fn parse(indicator: u8, rest: &'a [u8]) -> Result<FuA<'a>, CodecError> {
        let (&header, fragment) = rest.split_first().ok_or(CodecError::Truncated {
            what: "H.264 FU-A header",
        })?;
        if header & 0xc0 == 0xc0 {
            return Err(CodecError::Malformed {
                what: "H.264 FU-A with both start and end bits",
            });
        }
        if matches!(header & 0x1f, 0 | 24..=31) {
            return Err(CodecError::Malformed {
                what: "H.264 FU-A fragment of an aggregation or reserved type",
            });
        }
        Ok(FuA {
            indicator,
            header,
            fragment,
        })
    }

    /// S: the first fragment of the NAL unit.
    pub fn is_start(&self) -> bool {
        self.header & 0x80 != 0
    }

    /// E: the last fragment of the NAL unit.
    pub fn is_end(&self) -> bool {
        self.header & 0x40 != 0
    }

    /// Type of the fragmented NAL unit.
    pub fn nal_type(&self) -> u8 {
        self.header & 0x1f
    }

    /// The reconstructed header byte of the fragmented NAL unit (F and NRI
    /// from the FU indicator, type from the FU header).
    pub fn nal_header(&self) -> u8 {
        (self.indicator & 0xe0) | (self.header & 0x1f)
    }

    /// The fragment's bytes after the FU header.
    pub fn fragment(&self) -> &'a [u8] {
        self.fragment
    }
}

/// One inline parameter set buffer.
#[derive(Clone)]
struct ParamBuf {
    len: usize,
    bytes: [u8; MAX_PARAMETER_SET_LEN],
}

/// Equal when they hold the same parameter set, whatever a longer
/// earlier one left past its end.
impl PartialEq for ParamBuf {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for ParamBuf {}

impl ParamBuf {
    const EMPTY: ParamBuf = ParamBuf {
        len: 0,
        bytes: [0; MAX_PARAMETER_SET_LEN],
    };

    fn get(&self) -> Option<&[u8]> {
        self.bytes.get(..self.len).filter(|b| !b.is_empty())
    }

    /// Stores `nal`; `Ok(true)` if it differs from what was kept.
    fn set(&mut self, nal: &[u8], what: &'static str) -> Result<bool, CodecError> {
        let slot = self
            .bytes
            .get_mut(..nal.len())
            .ok_or(CodecError::TooLarge { what })?;
        if self.len == nal.len() && slot == nal {
            return Ok(false);
        }
        slot.copy_from_slice(nal);
        self.len = nal.len();
        Ok(true)
    }
}

/// The latest SPS and PPS seen on a stream, in two fixed inline buffers of
/// [`MAX_PARAMETER_SET_LEN`] bytes, so a subscriber that starts mid-stream
/// can be sent them before its first IDR ([`ParameterSets::write_stap_a`]).
/// Observing packets never allocates.
#[derive(Clone, PartialEq, Eq)]
pub struct ParameterSets {
    sps: ParamBuf,
    pps: ParamBuf,
}

impl std::fmt::Debug for ParameterSets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParameterSets")
            .field("sps_len", &self.sps.len)
            .field("pps_len", &self.pps.len)
            .finish()
    }
}

impl Default for ParameterSets {
    fn default() -> Self {
        Self::new()
    }
}

impl ParameterSets {
    /// Neither SPS nor PPS known yet.
    pub const fn new() -> Self {
        ParameterSets {
            sps: ParamBuf::EMPTY,
            pps: ParamBuf::EMPTY,
        }
    }

    /// Takes the SPS and PPS from an RTP payload: a single NAL unit or the
    /// units of a STAP-A (fragmented parameter sets are not reassembled).
    /// Returns whether either changed. A malformed payload is an error; an
    /// SPS or PPS longer than [`MAX_PARAMETER_SET_LEN`] is
    /// [`CodecError::TooLarge`] and leaves the kept one unchanged (the rest
    /// of a STAP-A is still taken).
    pub fn observe(&mut self, payload: &[u8]) -> Result<bool, CodecError> {
        let mut changed = false;
        let mut error = None;
        let mut take = |nal: &[u8]| {
            let r = match nal.first().map(|h| h & 0x1f) {
                Some(NAL_SPS) => self.sps.set(nal, "H.264 SPS"),
                Some(NAL_PPS) => self.pps.set(nal, "H.264 PPS"),
                _ => Ok(false),
            };
            match r {
                Ok(c) => changed |= c,
                Err(e) => error = error.or(Some(e)),
            }
        };
        match H264Packet::parse(payload)? {
            H264Packet::Single { nal, .. } => take(nal),
            H264Packet::StapA(stap) => stap.nal_units().for_each(take),
            H264Packet::FuA(_) => {}
        }
        match error {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// The latest SPS (NAL header included).
    pub fn sps(&self) -> Option<&[u8]> {
        self.sps.get()
    }

    /// The latest PPS (NAL header included).
    pub fn pps(&self) -> Option<&[u8]> {
        self.pps.get()
    }

    /// Whether both an SPS and a PPS are known.
    pub fn has_both(&self) -> bool {
        self.sps().is_some() && self.pps().is_some()
    }

    /// Writes a STAP-A payload carrying the SPS then the PPS into `out`,
    /// returning its length; `None` if either is unknown or `out` is too
    /// small. The STAP-A's NRI is the larger of the two NAL units'.
    pub fn write_stap_a(&self, out: &mut [u8]) -> Option<usize> {
        let (sps, pps) = (self.sps()?, self.pps()?);
        let len = 1 + 2 + sps.len() + 2 + pps.len();
        let out = out.get_mut(..len)?;
        let nri = (sps.first()? & 0x60).max(pps.first()? & 0x60);
        out[0] = nri | NAL_STAP_A;
        let mut at = 1;
        for nal in [sps, pps] {
            out[at..at + 2].copy_from_slice(&(nal.len() as u16).to_be_bytes());
            out[at + 2..at + 2 + nal.len()].copy_from_slice(nal);
            at += 2 + nal.len();
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::super::h264_is_keyframe;
    use super::*;

    /// A Chrome-style STAP-A: SPS (4 bytes) + PPS (4 bytes), sent before an IDR.
    const STAP_SPS_PPS: [u8; 13] = [
        0x78, 0x00, 0x04, 0x67, 0x42, 0xc0, 0x1f, 0x00, 0x04, 0x68, 0xce, 0x3c, 0x80,
    ];

    #[test]
    fn classifies_packet_types() {
        let p = H264Packet::parse(&[0x65, 0x88, 0x84]).unwrap();
        assert_eq!(
            p,
            H264Packet::Single {
                nal_type: 5,
                nal: &[0x65, 0x88, 0x84]
            }
        );
        assert!(p.is_idr_start() && p.is_keyframe());
        let H264Packet::StapA(stap) = H264Packet::parse(&STAP_SPS_PPS).unwrap() else {
            panic!("not a STAP-A");
        };
        assert_eq!(
            (stap.len(), stap.is_empty(), stap.header()),
            (2, false, 0x78)
        );
        let units: Vec<&[u8]> = stap.nal_units().collect();
        assert_eq!(
            units,
            [&[0x67, 0x42, 0xc0, 0x1f][..], &[0x68, 0xce, 0x3c, 0x80][..]]
        );
        let H264Packet::FuA(fu) = H264Packet::parse(&[0x7c, 0x85, 0x88, 0x84]).unwrap() else {
            panic!("not an FU-A");
        };
        assert!(fu.is_start() && !fu.is_end());
        assert_eq!((fu.nal_type(), fu.nal_header()), (5, 0x65));
        assert_eq!(fu.fragment(), &[0x88, 0x84]);
        let H264Packet::FuA(fu) = H264Packet::parse(&[0x5c, 0x41]).unwrap() else {
            panic!("not an FU-A");
        };
        assert!(!fu.is_start() && fu.is_end() && fu.fragment().is_empty());
        assert_eq!(fu.nal_header(), 0x41);
    }

    #[test]
    fn typed_errors() {
        use CodecError::*;
        let cases: [(&[u8], CodecError); 11] = [
            (
                &[],
                Truncated {
                    what: "H.264 NAL unit header",
                },
            ),
            (
                &[0x00, 0x01],
                Reserved {
                    what: "H.264 NAL unit type",
                },
            ),
            (
                &[0x1e],
                Reserved {
                    what: "H.264 NAL unit type",
                },
            ),
            (
                &[0x1f],
                Reserved {
                    what: "H.264 NAL unit type",
                },
            ),
            (
                &[0x79, 0x00, 0x00, 0x00, 0x01, 0x65],
                Unsupported {
                    what: "H.264 STAP-B",
                },
            ),
            (&[0x7a, 0x00], Unsupported { what: "H.264 MTAP" }),
            (&[0x7b, 0x00], Unsupported { what: "H.264 MTAP" }),
            (
                &[0x7d, 0x85, 0x00, 0x00],
                Unsupported { what: "H.264 FU-B" },
            ),
            (
                &[0x7c],
                Truncated {
                    what: "H.264 FU-A header",
                },
            ),
            (
                &[0x7c, 0xc5, 0x88],
                Malformed {
                    what: "H.264 FU-A with both start and end bits",
                },
            ),
            (
                &[0x78],
                Truncated {
                    what: "H.264 STAP-A without NAL units",
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(H264Packet::parse(bytes), Err(want), "{bytes:02x?}");
        }
        assert!(matches!(
            H264Packet::parse(&[0x7c, 0x98]),
            Err(Malformed { .. })
        ));
        assert!(matches!(
            H264Packet::parse(&[0x7c, 0x80]),
            Err(Malformed { .. })
        ));
        // Size overrun, and a dangling size byte.
        assert_eq!(
            H264Packet::parse(&[0x78, 0x00, 0x09, 0x68, 0xce, 0x00, 0x01, 0x65]),
            Err(LengthOverrun {
                what: "H.264 STAP-A NAL unit"
            })
        );
        assert_eq!(
            H264Packet::parse(&[0x78, 0x00, 0x01, 0x65, 0x00]),
            Err(Truncated {
                what: "H.264 STAP-A NAL unit size"
            })
        );
    }

    #[test]
    fn every_cut_of_a_stap_a_is_an_error_but_the_whole() {
        for cut in 0..STAP_SPS_PPS.len() {
            // Cuts right after a complete unit are valid shorter STAP-As.
            let ok = matches!(cut, 7);
            assert_eq!(
                H264Packet::parse(&STAP_SPS_PPS[..cut]).is_ok(),
                ok,
                "cut {cut}"
            );
        }
        assert!(H264Packet::parse(&STAP_SPS_PPS).is_ok());
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
        let sps = H264Packet::parse(&[0x67, 0x42]).unwrap();
        assert!(sps.is_keyframe() && !sps.is_idr_start());
    }

    #[test]
    fn h264_stap_a() {
        assert!(h264_is_keyframe(&STAP_SPS_PPS));
        // Only PPS + SEI: not a keyframe.
        let stap = [0x78, 0x00, 0x02, 0x68, 0xce, 0x00, 0x02, 0x06, 0x05];
        assert!(!h264_is_keyframe(&stap));
        // Key NAL after a zero-length NAL.
        let stap = [0x78, 0x00, 0x00, 0x00, 0x01, 0x65];
        assert!(h264_is_keyframe(&stap));
        assert!(H264Packet::parse(&stap).unwrap().is_idr_start());
        // Size overruns before the key NAL: malformed, not a keyframe.
        let stap = [0x78, 0x00, 0x09, 0x68, 0xce, 0x00, 0x01, 0x65];
        assert!(!h264_is_keyframe(&stap));
        // A malformed STAP-A is rejected as a whole, even when a key NAL
        // precedes the damage.
        let stap = [0x78, 0x00, 0x01, 0x65, 0x00, 0x09, 0x68];
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

    #[test]
    fn parameter_sets_from_stap_a_and_single_nals() {
        let mut ps = ParameterSets::new();
        assert!(!ps.has_both());
        assert_eq!(ps.write_stap_a(&mut [0; 64]), None);
        assert_eq!(ps.observe(&[0x67, 0x42, 0xc0, 0x1f]), Ok(true));
        assert!(!ps.has_both());
        assert_eq!(ps.observe(&[0x65, 0x88]), Ok(false));
        assert_eq!(ps.observe(&[0x7c, 0x85, 0x88]), Ok(false));
        assert_eq!(
            ps.observe(&[0x7d]),
            Err(CodecError::Unsupported { what: "H.264 FU-B" })
        );
        assert_eq!(ps.observe(&STAP_SPS_PPS), Ok(true));
        assert_eq!(ps.observe(&STAP_SPS_PPS), Ok(false));
        assert!(ps.has_both());
        assert_eq!(ps.sps(), Some(&[0x67, 0x42, 0xc0, 0x1f][..]));
        assert_eq!(ps.pps(), Some(&[0x68, 0xce, 0x3c, 0x80][..]));
        let mut out = [0u8; 64];
        assert_eq!(ps.write_stap_a(&mut out), Some(STAP_SPS_PPS.len()));
        assert_eq!(&out[..STAP_SPS_PPS.len()], &STAP_SPS_PPS);
        assert_eq!(ps.write_stap_a(&mut out[..STAP_SPS_PPS.len() - 1]), None);
        // A new PPS replaces the old one; the written STAP-A parses back.
        assert_eq!(ps.observe(&[0x48, 0xee, 0x06, 0xe2, 0xc0]), Ok(true));
        let n = ps.write_stap_a(&mut out).unwrap();
        let mut again = ParameterSets::default();
        assert_eq!(again.observe(&out[..n]), Ok(true));
        assert_eq!(again, ps);
        assert!(H264Packet::parse(&out[..n]).unwrap().is_keyframe());
        assert_eq!(out[0], 0x78);
        assert!(format!("{ps:?}").contains("pps_len: 5"));
        // A shorter SPS replacing a longer one compares equal to a fresh
        // copy of it.
        let stap = [
            0x78, 0x00, 0x04, 0x67, 0x42, 0xc0, 0x1f, 0x00, 0x02, 0x67, 0x42,
        ];
        let mut one = ParameterSets::new();
        assert_eq!(one.observe(&stap), Ok(true));
        let mut two = ParameterSets::new();
        assert_eq!(two.observe(&[0x67, 0x42]), Ok(true));
        assert_eq!(one, two);
        assert_eq!(one.sps(), Some(&[0x67, 0x42][..]));
    }

    #[test]
    fn oversized_parameter_sets_are_reported_not_truncated() {
        let mut ps = ParameterSets::new();
        let mut big = vec![0x67u8; MAX_PARAMETER_SET_LEN + 1];
        assert_eq!(
            ps.observe(&big),
            Err(CodecError::TooLarge { what: "H.264 SPS" })
        );
        assert_eq!(ps.sps(), None);
        big.pop();
        assert_eq!(ps.observe(&big), Ok(true));
        assert_eq!(ps.sps().map(<[u8]>::len), Some(MAX_PARAMETER_SET_LEN));
        // In a STAP-A: the oversized SPS is reported, the PPS still taken.
        let mut stap = vec![0x78, 0x01, 0x01];
        stap.extend(std::iter::repeat_n(0x27, 257));
        stap.extend_from_slice(&[0x00, 0x02, 0x68, 0x01]);
        assert_eq!(
            ps.observe(&stap),
            Err(CodecError::TooLarge { what: "H.264 SPS" })
        );
        assert_eq!(ps.pps(), Some(&[0x68, 0x01][..]));
        assert_eq!(ps.sps().map(<[u8]>::len), Some(MAX_PARAMETER_SET_LEN));
        let mut out = [0u8; 1 + 2 + 256 + 2 + 2];
        assert_eq!(ps.write_stap_a(&mut out), Some(out.len()));
    }
}
