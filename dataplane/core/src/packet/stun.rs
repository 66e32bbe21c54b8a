//! STUN message framing (RFC 5389 §6, §15) for ICE-lite demultiplexing.
//!
//! The relay needs just enough of a binding request to map an unknown source
//! address to a session (the USERNAME ufrags) before handing it to the ICE
//! agent, which does the cryptographic checks. Validation here is structural:
//! the header and every attribute's bounds are checked once in
//! [`StunMessage::parse`], after which lookups are cheap slice walks.

use std::iter::FusedIterator;

use super::PacketError;

/// The fixed magic cookie that distinguishes RFC 5389 STUN from other traffic.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// The Binding method, the only one ICE uses.
pub const METHOD_BINDING: u16 = 0x0001;

/// USERNAME: `receiver-ufrag:sender-ufrag` in ICE.
pub const ATTR_USERNAME: u16 = 0x0006;
/// MESSAGE-INTEGRITY (HMAC-SHA1).
pub const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
/// ERROR-CODE.
pub const ATTR_ERROR_CODE: u16 = 0x0009;
/// MESSAGE-INTEGRITY-SHA256 (RFC 8489).
pub const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
/// XOR-MAPPED-ADDRESS.
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// PRIORITY (RFC 8445).
pub const ATTR_PRIORITY: u16 = 0x0024;
/// USE-CANDIDATE (RFC 8445).
pub const ATTR_USE_CANDIDATE: u16 = 0x0025;
/// FINGERPRINT (CRC-32).
pub const ATTR_FINGERPRINT: u16 = 0x8028;
/// ICE-CONTROLLED (RFC 8445).
pub const ATTR_ICE_CONTROLLED: u16 = 0x8029;
/// ICE-CONTROLLING (RFC 8445).
pub const ATTR_ICE_CONTROLLING: u16 = 0x802A;

/// STUN message class (RFC 5389 §6), encoded in two bits of the type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunClass {
    /// Expects a response.
    Request,
    /// Fire-and-forget (e.g. ICE keepalive).
    Indication,
    /// Successful response to a request.
    SuccessResponse,
    /// Error response to a request.
    ErrorResponse,
}

/// A structurally valid STUN message borrowing the received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunMessage<'a> {
    /// 12-bit method (0x001 = Binding).
    pub method: u16,
    /// Message class.
    pub class: StunClass,
    /// Transaction id, echoed in responses.
    pub transaction_id: [u8; 12],
    /// Attribute bytes after the header, bounds-checked by `parse`.
    attrs: &'a [u8],
}

impl<'a> StunMessage<'a> {
    /// Validates the header (top two bits 0, magic cookie, length a multiple
    /// of 4 and equal to the bytes after the header) and the bounds of every
    /// attribute, so a message that parses can be walked without further
    /// error handling.
    pub fn parse(buf: &'a [u8]) -> Result<Self, PacketError> {
        let have = buf.len();
        let truncated = PacketError::Truncated {
            what: "STUN header",
            need: HEADER_LEN,
            have,
        };
        let Some((fixed, rest)) = buf.split_first_chunk::<8>() else {
            return Err(truncated);
        };
        let Some((transaction_id, attrs)) = rest.split_first_chunk::<12>() else {
            return Err(truncated);
        };
        if fixed[0] & 0xc0 != 0 {
            return Err(PacketError::NotStun(fixed[0]));
        }
        let cookie = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        if cookie != MAGIC_COOKIE {
            return Err(PacketError::BadMagicCookie(cookie));
        }
        let length = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if length % 4 != 0 {
            return Err(PacketError::Unaligned {
                what: "STUN message",
                len: length,
            });
        }
        if length != attrs.len() {
            return Err(PacketError::BadLength {
                what: "STUN message",
                declared: length,
                actual: attrs.len(),
            });
        }
        validate_attributes(attrs)?;

        let typ = u16::from_be_bytes([fixed[0], fixed[1]]);
        // Type bits: M11..M7 C1 M6..M4 C0 M3..M0.
        let class = match ((typ >> 7) & 0x2) | ((typ >> 4) & 0x1) {
            0 => StunClass::Request,
            1 => StunClass::Indication,
            2 => StunClass::SuccessResponse,
            _ => StunClass::ErrorResponse,
        };
        let method = (typ & 0x000f) | ((typ >> 1) & 0x0070) | ((typ >> 2) & 0x0f80);
        Ok(StunMessage {
            method,
            class,
            transaction_id: *transaction_id,
            attrs,
        })
    }

    /// The attributes that count, in order: everything up to MESSAGE-INTEGRITY
    /// (inclusive), then only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, since
    /// RFC 5389 §15.4 / RFC 8489 §14.5 say anything else after the integrity
    /// check is unauthenticated and must be ignored.
    pub fn attributes(&self) -> StunAttributes<'a> {
        StunAttributes {
            rest: self.attrs,
            after_integrity: false,
        }
    }

    /// Value of the first attribute of type `typ` (see [`Self::attributes`]
    /// for which ones are visible), without its padding.
    pub fn attribute(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes()
            .find(|&(t, _)| t == typ)
            .map(|(_, value)| value)
    }

    /// USERNAME split at the first `':'` into `(local, remote)`: for a request
    /// the relay receives, the part before the colon is the relay's own ufrag
    /// (which identifies the session) and the rest is the peer's. `None` if
    /// the attribute is absent or has no colon.
    pub fn username(&self) -> Option<(&'a [u8], &'a [u8])> {
        let value = self.attribute(ATTR_USERNAME)?;
        let colon = value.iter().position(|&b| b == b':')?;
        Some((value.get(..colon)?, value.get(colon + 1..)?))
    }

    /// Whether this is an ICE connectivity check (Binding request), the only
    /// STUN message that can open a new path.
    pub fn is_binding_request(&self) -> bool {
        self.method == METHOD_BINDING && self.class == StunClass::Request
    }
}

/// Checks that every attribute header and (padded) value fits.
fn validate_attributes(mut rest: &[u8]) -> Result<(), PacketError> {
    while !rest.is_empty() {
        let Some((header, tail)) = rest.split_first_chunk::<4>() else {
            return Err(PacketError::Truncated {
                what: "STUN attribute header",
                need: 4,
                have: rest.len(),
            });
        };
        let padded = padded_len(u16::from_be_bytes([header[2], header[3]]));
        let Some(next) = tail.get(padded..) else {
            return Err(PacketError::Truncated {
                what: "STUN attribute value",
                need: padded,
                have: tail.len(),
            });
        };
        rest = next;
    }
    Ok(())
}

/// Attribute value length rounded up to the 4-byte boundary.
fn padded_len(len: u16) -> usize {
    usize::from(len).div_ceil(4) * 4
}

/// Iterator over `(type, value)` of a message's visible attributes; see
/// [`StunMessage::attributes`].
#[derive(Debug, Clone)]
pub struct StunAttributes<'a> {
    rest: &'a [u8],
    after_integrity: bool,
}

impl<'a> Iterator for StunAttributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (header, tail) = self.rest.split_first_chunk::<4>()?;
            let typ = u16::from_be_bytes([header[0], header[1]]);
            let len = u16::from_be_bytes([header[2], header[3]]);
            let value = tail.get(..usize::from(len))?;
            self.rest = tail.get(padded_len(len)..).unwrap_or_default();
            match typ {
                ATTR_FINGERPRINT => {
                    // FINGERPRINT is always last.
                    self.rest = &[];
                    return Some((typ, value));
                }
                ATTR_MESSAGE_INTEGRITY | ATTR_MESSAGE_INTEGRITY_SHA256 => {
                    self.after_integrity = true;
                    return Some((typ, value));
                }
                _ if self.after_integrity => {}
                _ => return Some((typ, value)),
            }
        }
    }
}

impl FusedIterator for StunAttributes<'_> {}

#[cfg(test)]
mod tests {
    use super::super::fuzz::samples;
    use super::*;

    #[test]
    fn chrome_binding_request() {
        let buf = samples::STUN_BINDING_REQUEST;
        let msg = StunMessage::parse(buf).unwrap();
        assert_eq!(msg.method, METHOD_BINDING);
        assert_eq!(msg.class, StunClass::Request);
        assert!(msg.is_binding_request());
        assert_eq!(
            &msg.transaction_id,
            b"\x6b\x4c\x51\x6a\x71\x55\x39\x61\x6d\x2b\x65\x47"
        );
        assert_eq!(msg.username(), Some((&b"abcd"[..], &b"efgh"[..])));
        assert_eq!(msg.attribute(ATTR_USERNAME), Some(&b"abcd:efgh"[..]));
        assert_eq!(msg.attribute(ATTR_USE_CANDIDATE), Some(&[][..]));
        assert_eq!(
            msg.attribute(ATTR_PRIORITY),
            Some(&[0x6e, 0x7f, 0x1e, 0xff][..])
        );
        assert_eq!(
            msg.attribute(ATTR_ICE_CONTROLLING).map(<[u8]>::len),
            Some(8)
        );
        assert_eq!(
            msg.attribute(ATTR_MESSAGE_INTEGRITY).map(<[u8]>::len),
            Some(20)
        );
        assert_eq!(msg.attribute(ATTR_FINGERPRINT).map(<[u8]>::len), Some(4));
        assert_eq!(msg.attribute(ATTR_ICE_CONTROLLED), None);
        let types: Vec<u16> = msg.attributes().map(|(t, _)| t).collect();
        assert_eq!(
            types,
            [
                ATTR_USERNAME,
                0xc057,
                ATTR_ICE_CONTROLLING,
                ATTR_USE_CANDIDATE,
                ATTR_PRIORITY,
                ATTR_MESSAGE_INTEGRITY,
                ATTR_FINGERPRINT
            ]
        );
    }

    #[test]
    fn classes_and_methods() {
        let mut buf = samples::STUN_BINDING_REQUEST.to_vec();
        for (typ, class) in [
            (0x0001u16, StunClass::Request),
            (0x0011, StunClass::Indication),
            (0x0101, StunClass::SuccessResponse),
            (0x0111, StunClass::ErrorResponse),
        ] {
            buf[..2].copy_from_slice(&typ.to_be_bytes());
            let msg = StunMessage::parse(&buf).unwrap();
            assert_eq!((msg.method, msg.class), (METHOD_BINDING, class));
            assert_eq!(msg.is_binding_request(), class == StunClass::Request);
        }
        // Allocate (0x003) success response: 0x0103; all-ones method: 0x3eef.
        buf[..2].copy_from_slice(&0x0103u16.to_be_bytes());
        let msg = StunMessage::parse(&buf).unwrap();
        assert_eq!((msg.method, msg.class), (3, StunClass::SuccessResponse));
        buf[..2].copy_from_slice(&0x3eefu16.to_be_bytes());
        let msg = StunMessage::parse(&buf).unwrap();
        assert_eq!((msg.method, msg.class), (0x0fff, StunClass::Request));
        assert!(!msg.is_binding_request());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = samples::STUN_BINDING_REQUEST;
        for cut in 0..buf.len() {
            let err = StunMessage::parse(&buf[..cut]).unwrap_err();
            if cut < HEADER_LEN {
                assert!(matches!(err, PacketError::Truncated { .. }), "{err}");
            } else {
                assert!(
                    matches!(
                        err,
                        PacketError::Unaligned { .. } | PacketError::BadLength { .. }
                    ),
                    "cut {cut}: {err}"
                );
            }
        }
    }

    #[test]
    fn truncated_attribute_with_fixed_length() {
        // Shorten the message and its length field together so only the
        // attribute walk can catch the overrun.
        let buf = samples::STUN_BINDING_REQUEST;
        for new_len in (4..buf.len() - HEADER_LEN).step_by(4) {
            let mut short = buf[..HEADER_LEN + new_len].to_vec();
            short[2..4].copy_from_slice(&(new_len as u16).to_be_bytes());
            let boundary = [16, 24, 36, 40, 48, 72, 80].contains(&new_len);
            match StunMessage::parse(&short) {
                Ok(msg) => {
                    assert!(boundary, "len {new_len}");
                    let _ = msg.attributes().count();
                }
                Err(e) => {
                    assert!(!boundary, "len {new_len}: {e}");
                    assert!(matches!(e, PacketError::Truncated { .. }), "{e}");
                }
            }
        }
    }

    #[test]
    fn rejects_non_stun() {
        let mut buf = samples::STUN_BINDING_REQUEST.to_vec();
        buf[4] = 0;
        assert_eq!(
            StunMessage::parse(&buf),
            Err(PacketError::BadMagicCookie(0x0012_a442))
        );
        let mut buf = samples::STUN_BINDING_REQUEST.to_vec();
        buf[0] = 0x40;
        assert_eq!(StunMessage::parse(&buf), Err(PacketError::NotStun(0x40)));
        let mut buf = samples::STUN_BINDING_REQUEST.to_vec();
        buf[3] = 0x4e;
        assert!(matches!(
            StunMessage::parse(&buf),
            Err(PacketError::Unaligned { len: 0x4e, .. })
        ));
        buf[3] = 0x4c;
        assert!(matches!(
            StunMessage::parse(&buf),
            Err(PacketError::BadLength {
                declared: 0x4c,
                actual: 0x50,
                ..
            })
        ));
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        let mut buf = samples::STUN_BINDING_REQUEST.to_vec();
        // Drop FINGERPRINT, append a forged PRIORITY and USERNAME, then FINGERPRINT.
        buf.truncate(buf.len() - 8);
        buf.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        buf.extend_from_slice(&[0x00, 0x06, 0x00, 0x03, b'x', b':', b'y', 0]);
        buf.extend_from_slice(&[0x80, 0x28, 0x00, 0x04, 9, 9, 9, 9]);
        let len = (buf.len() - HEADER_LEN) as u16;
        buf[2..4].copy_from_slice(&len.to_be_bytes());
        let msg = StunMessage::parse(&buf).unwrap();
        assert_eq!(msg.username(), Some((&b"abcd"[..], &b"efgh"[..])));
        assert_eq!(
            msg.attribute(ATTR_PRIORITY),
            Some(&[0x6e, 0x7f, 0x1e, 0xff][..])
        );
        assert_eq!(msg.attribute(ATTR_FINGERPRINT), Some(&[9, 9, 9, 9][..]));

        assert_eq!(msg.attributes().count(), 7);

        // Without a preceding PRIORITY the forged one stays invisible.
        let mut no_prio = Vec::from(&buf[..HEADER_LEN]);
        no_prio.extend_from_slice(&[0x00, 0x08, 0x00, 0x00]); // empty MI
        no_prio.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        no_prio[2..4].copy_from_slice(&12u16.to_be_bytes());
        let msg = StunMessage::parse(&no_prio).unwrap();
        assert_eq!(msg.attribute(ATTR_PRIORITY), None);
        assert_eq!(msg.attribute(ATTR_MESSAGE_INTEGRITY), Some(&[][..]));
    }

    #[test]
    fn username_without_colon() {
        let mut buf = Vec::from(&samples::STUN_BINDING_REQUEST[..HEADER_LEN]);
        buf.extend_from_slice(&[0x00, 0x06, 0x00, 0x04, b'a', b'b', b'c', b'd']);
        buf[2..4].copy_from_slice(&8u16.to_be_bytes());
        let msg = StunMessage::parse(&buf).unwrap();
        assert_eq!(msg.username(), None);
        assert_eq!(msg.attribute(ATTR_USERNAME), Some(&b"abcd"[..]));
        // Empty ufrags on either side are still a split.
        buf[8 + 12 + 4..].copy_from_slice(b":bcd");
        let msg = StunMessage::parse(&buf).unwrap();
        assert_eq!(msg.username(), Some((&b""[..], &b"bcd"[..])));
    }
}
