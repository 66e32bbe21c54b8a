//! A bit reader over a byte slice, most significant bit first, as the AV1
//! and VP9 specifications read their headers.
//!
//! Every read is bounds-checked and returns [`CodecError::Truncated`] past
//! the end, naming the structure given to [`BitReader::new`]; nothing here
//! panics or allocates.

use super::CodecError;

/// Reads bits MSB-first from a borrowed buffer.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    data: &'a [u8],
    /// Position in bits from the start of `data`.
    pos: usize,
    /// The structure being read, for truncation errors.
    what: &'static str,
}

impl<'a> BitReader<'a> {
    /// A reader at the first bit of `data`; `what` names the structure in
    /// errors.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        BitReader { data, pos: 0, what }
    }

    /// Bits consumed so far.
    pub fn bits_read(&self) -> usize {
        self.pos
    }

    /// Bits left to read.
    pub fn bits_left(&self) -> usize {
        (self.data.len() * 8).saturating_sub(self.pos)
    }

    /// Bytes touched so far, counting a partly read byte as whole.
    pub fn bytes_read(&self) -> usize {
        self.pos.div_ceil(8)
    }

    fn truncated(&self) -> CodecError {
        CodecError::Truncated { what: self.what }
    }

    /// One bit.
    pub fn read_bit(&mut self) -> Result<bool, CodecError> {
        let byte = *self
            .data
            .get(self.pos / 8)
            .ok_or_else(|| self.truncated())?;
        let bit = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Ok(bit == 1)
    }

    /// `n` bits (at most 32) as an unsigned number, first bit most
    /// significant. `n == 0` reads nothing and yields 0.
    pub fn read_bits(&mut self, n: u32) -> Result<u32, CodecError> {
        if n > 32 {
            return Err(CodecError::Malformed {
                what: "bit field wider than 32 bits",
            });
        }
        if self.bits_left() < n as usize {
            return Err(self.truncated());
        }
        let mut v = 0u32;
        for _ in 0..n {
            v = (v << 1) | u32::from(self.read_bit()?);
        }
        Ok(v)
    }

    /// An unsigned LEB128 number (AV1 §4.10.5): at most 8 bytes, value below
    /// 2^32.
    pub fn leb128(&mut self) -> Result<u32, CodecError> {
        let mut value = 0u64;
        for i in 0..8 {
            let byte = self.read_bits(8)?;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return u32::try_from(value).map_err(|_| CodecError::Malformed {
                    what: "LEB128 value of 2^32 or more",
                });
            }
        }
        Err(CodecError::Malformed {
            what: "LEB128 number longer than 8 bytes",
        })
    }

    /// A non-symmetric unsigned number below `n` (AV1 §4.10.7, used by the
    /// dependency descriptor). `n` must be at least 1.
    pub fn ns(&mut self, n: u32) -> Result<u32, CodecError> {
        if n == 0 {
            return Err(CodecError::Malformed {
                what: "non-symmetric number with an empty range",
            });
        }
        let w = 32 - n.leading_zeros(); // FloorLog2(n) + 1
        let m = ((1u64 << w) - u64::from(n)) as u32;
        let v = self.read_bits(w - 1)?;
        if v < m {
            return Ok(v);
        }
        let extra = u32::from(self.read_bit()?);
        Ok((v << 1) - m + extra)
    }
}

/// An unsigned LEB128 number at the start of `buf` (AV1 §4.10.5): the value
/// and the bytes it took.
pub fn leb128(buf: &[u8], what: &'static str) -> Result<(u32, usize), CodecError> {
    let mut r = BitReader::new(buf, what);
    let v = r.leb128()?;
    Ok((v, r.bytes_read()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_msb_first_and_truncation() {
        let mut r = BitReader::new(&[0b1010_0000, 0xff], "test");
        assert!(r.read_bit().unwrap());
        assert!(!r.read_bit().unwrap());
        assert_eq!(r.read_bits(6).unwrap(), 0b10_0000);
        assert_eq!(r.read_bits(0).unwrap(), 0);
        assert_eq!(r.bits_left(), 8);
        assert_eq!(r.read_bits(9), Err(CodecError::Truncated { what: "test" }));
        // A failed wide read consumes nothing.
        assert_eq!(r.read_bits(8).unwrap(), 0xff);
        assert!(r.read_bit().is_err());
        assert!(BitReader::new(&[0; 8], "t").read_bits(33).is_err());
        assert_eq!(
            BitReader::new(&[0xff; 4], "t").read_bits(32).unwrap(),
            u32::MAX
        );
    }

    #[test]
    fn leb128_values_and_limits() {
        assert_eq!(leb128(&[0x00], "t"), Ok((0, 1)));
        assert_eq!(leb128(&[0x7f, 0xaa], "t"), Ok((127, 1)));
        assert_eq!(leb128(&[0x80, 0x01], "t"), Ok((128, 2)));
        assert_eq!(leb128(&[0xe5, 0x8e, 0x26], "t"), Ok((624_485, 3)));
        assert_eq!(
            leb128(&[0xff, 0xff, 0xff, 0xff, 0x0f], "t"),
            Ok((u32::MAX, 5))
        );
        assert!(matches!(
            leb128(&[0xff, 0xff, 0xff, 0xff, 0x10], "t"),
            Err(CodecError::Malformed { .. })
        ));
        // Redundant zero continuation bytes are legal up to 8 bytes.
        assert_eq!(
            leb128(&[0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00], "t"),
            Ok((1, 8))
        );
        assert!(matches!(
            leb128(&[0x80; 9], "t"),
            Err(CodecError::Malformed { .. })
        ));
        assert_eq!(
            leb128(&[0x80], "t"),
            Err(CodecError::Truncated { what: "t" })
        );
        assert_eq!(leb128(&[], "t"), Err(CodecError::Truncated { what: "t" }));
    }

    #[test]
    fn ns_matches_the_av1_definition() {
        // n = 5: w = 3, m = 3; values 0..3 take 2 bits, 3 and 4 take 3 bits.
        let cases: [(u8, u32, usize); 5] = [
            (0b0000_0000, 0, 2),
            (0b0100_0000, 1, 2),
            (0b1000_0000, 2, 2),
            (0b1100_0000, 3, 3),
            (0b1110_0000, 4, 3),
        ];
        for (byte, want, bits) in cases {
            let buf = [byte];
            let mut r = BitReader::new(&buf, "t");
            assert_eq!(r.ns(5).unwrap(), want);
            assert_eq!(r.bits_read(), bits);
        }
        // n = 1 reads nothing; n = 0 is an error; every value stays below n.
        let mut r = BitReader::new(&[], "t");
        assert_eq!(r.ns(1).unwrap(), 0);
        assert!(r.ns(0).is_err());
        for n in 1..=33u32 {
            for byte in 0..=255u8 {
                let buf = [byte];
                let mut r = BitReader::new(&buf, "t");
                if let Ok(v) = r.ns(n) {
                    assert!(v < n, "ns({n}) = {v}");
                }
            }
        }
    }
}
