//! RTP fixed header, header extensions (RFC 3550 §5.1, RFC 8285) and in-place
//! rewriting for forwarding.
//!
//! The relay re-stamps each forwarded packet (payload type, sequence number,
//! timestamp, SSRC) for the subscriber, so parsing stops at the header and the
//! payload is only ever borrowed.

use super::{PacketError, be_u16};

/// Length of the fixed RTP header.
pub const FIXED_HEADER_LEN: usize = 12;

/// Profile marker of the RFC 8285 one-byte extension form.
const ONE_BYTE_PROFILE: u16 = 0xBEDE;
/// Profile of the RFC 8285 two-byte extension form, low 4 bits ("appbits") masked.
const TWO_BYTE_PROFILE: u16 = 0x1000;

/// The validated RTP header of one packet.
///
/// `Copy` and borrow-free so routing code can keep it next to the buffer
/// without tying up lifetimes; accessors take the buffer again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// Marker bit (end of frame for video, start of talkspurt for audio).
    pub marker: bool,
    /// Payload type (7 bits).
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// Media timestamp.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
    /// Number of CSRC entries after the fixed header.
    pub csrc_count: u8,
    /// Whether a header extension block follows the CSRC list.
    pub has_extension: bool,
    /// Bytes before the payload: fixed header, CSRCs and extension block.
    pub header_len: usize,
    /// Trailing padding bytes, count byte included (0 when P is clear).
    pub padding_len: usize,
}

impl RtpHeader {
    /// Parses and validates the header so later accessors can trust its
    /// offsets: version must be 2, the CSRC list and extension block must fit,
    /// and a set P bit needs a count byte of at least 1 that fits after the
    /// header.
    pub fn parse(buf: &[u8]) -> Result<RtpHeader, PacketError> {
        let have = buf.len();
        let Some(fixed) = buf.first_chunk::<FIXED_HEADER_LEN>() else {
            return Err(PacketError::Truncated {
                what: "RTP header",
                need: FIXED_HEADER_LEN,
                have,
            });
        };
        let version = fixed[0] >> 6;
        if version != 2 {
            return Err(PacketError::BadVersion(version));
        }
        let has_padding = fixed[0] & 0x20 != 0;
        let has_extension = fixed[0] & 0x10 != 0;
        let csrc_count = fixed[0] & 0x0f;

        let mut header_len = FIXED_HEADER_LEN + 4 * usize::from(csrc_count);
        if have < header_len {
            return Err(PacketError::Truncated {
                what: "RTP CSRC list",
                need: header_len,
                have,
            });
        }
        if has_extension {
            let Some(words) = be_u16(buf, header_len + 2) else {
                return Err(PacketError::Truncated {
                    what: "RTP header extension",
                    need: header_len + 4,
                    have,
                });
            };
            header_len += 4 + 4 * usize::from(words);
            if have < header_len {
                return Err(PacketError::Truncated {
                    what: "RTP header extension",
                    need: header_len,
                    have,
                });
            }
        }

        let padding_len = if has_padding {
            let available = have.saturating_sub(header_len);
            let padding = usize::from(buf.last().copied().unwrap_or(0));
            if padding == 0 || padding > available {
                return Err(PacketError::BadPadding {
                    what: "RTP packet",
                    padding,
                    available,
                });
            }
            padding
        } else {
            0
        };

        Ok(RtpHeader {
            marker: fixed[1] & 0x80 != 0,
            payload_type: fixed[1] & 0x7f,
            sequence: u16::from_be_bytes([fixed[2], fixed[3]]),
            timestamp: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
            ssrc: u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
            csrc_count,
            has_extension,
            header_len,
            padding_len,
        })
    }

    /// The media payload between header and padding; empty (never a panic)
    /// if `buf` is not the buffer this header was parsed from.
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let end = buf.len().saturating_sub(self.padding_len);
        buf.get(self.header_len..end).unwrap_or_default()
    }
}

/// Looks up one header-extension element by its negotiated id, because the
/// relay only needs a few of them (audio level, MID/RID) and should not walk
/// the block into a structure.
///
/// Handles the one-byte (`0xBEDE`, ids 1..=14) and two-byte (`0x100x`, ids
/// 1..=255) forms of RFC 8285, skips padding bytes, and stops at a one-byte
/// id 15 as the RFC requires. Returns `None` if the packet has no extension,
/// the element is absent, or the block is malformed before the element.
pub fn find_extension<'a>(buf: &'a [u8], header: &RtpHeader, id: u8) -> Option<&'a [u8]> {
    if !header.has_extension || id == 0 {
        return None;
    }
    let start = FIXED_HEADER_LEN + 4 * usize::from(header.csrc_count);
    let profile = be_u16(buf, start)?;
    let words = be_u16(buf, start + 2)?;
    let data_start = start + 4;
    let data = buf.get(data_start..data_start + 4 * usize::from(words))?;
    if profile == ONE_BYTE_PROFILE {
        find_one_byte(data, id)
    } else if profile & 0xfff0 == TWO_BYTE_PROFILE {
        find_two_byte(data, id)
    } else {
        None
    }
}

fn find_one_byte(mut data: &[u8], id: u8) -> Option<&[u8]> {
    if id > 14 {
        return None;
    }
    while let Some((&b, rest)) = data.split_first() {
        let elem_id = b >> 4;
        let len = usize::from(b & 0x0f) + 1;
        if elem_id == 0 {
            // A 0x00 byte is padding; id 0 with a length is malformed (as libwebrtc).
            if len != 1 {
                return None;
            }
            data = rest;
            continue;
        }
        if elem_id == 15 {
            // RFC 8285 §4.2: stop processing at the reserved id.
            return None;
        }
        let value = rest.get(..len)?;
        if elem_id == id {
            return Some(value);
        }
        data = rest.get(len..)?;
    }
    None
}

fn find_two_byte(mut data: &[u8], id: u8) -> Option<&[u8]> {
    while let Some((&elem_id, rest)) = data.split_first() {
        if elem_id == 0 {
            data = rest;
            continue;
        }
        let (&len, rest) = rest.split_first()?;
        let len = usize::from(len);
        let value = rest.get(..len)?;
        if elem_id == id {
            return Some(value);
        }
        data = rest.get(len..)?;
    }
    None
}

/// Reads the RFC 6464 client-to-mixer audio level so the relay can pick active
/// speakers without decoding audio.
///
/// Returns `(voice_activity, level)` where `level` is 0..=127 meaning
/// `-level` dBov (0 is loudest, 127 is silence). `None` if the extension is
/// absent or empty.
pub fn audio_level(buf: &[u8], header: &RtpHeader, ext_id: u8) -> Option<(bool, u8)> {
    let &b = find_extension(buf, header, ext_id)?.first()?;
    Some((b & 0x80 != 0, b & 0x7f))
}

/// Re-stamps a packet for one subscriber in place, so forwarding needs no copy
/// of the payload. The marker bit and everything after byte 12 are untouched.
///
/// Errors only if `buf` is shorter than the fixed header.
pub fn rewrite_header(
    buf: &mut [u8],
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
) -> Result<(), PacketError> {
    let have = buf.len();
    let Some(h) = buf.first_chunk_mut::<FIXED_HEADER_LEN>() else {
        return Err(PacketError::Truncated {
            what: "RTP header",
            need: FIXED_HEADER_LEN,
            have,
        });
    };
    let [_, b1, s0, s1, t0, t1, t2, t3, x0, x1, x2, x3] = h;
    *b1 = (*b1 & 0x80) | (payload_type & 0x7f);
    [*s0, *s1] = sequence.to_be_bytes();
    [*t0, *t1, *t2, *t3] = timestamp.to_be_bytes();
    [*x0, *x1, *x2, *x3] = ssrc.to_be_bytes();
    Ok(())
}

/// Appends a minimal RTP packet (12-byte header, no CSRC, no extension, no
/// padding), used for synthesised packets such as padding probes or plain-RTP
/// egress.
pub fn write_packet(
    out: &mut Vec<u8>,
    marker: bool,
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
    payload: &[u8],
) {
    out.reserve(FIXED_HEADER_LEN + payload.len());
    write_header(out, marker, payload_type, sequence, timestamp, ssrc);
    out.extend_from_slice(payload);
}

/// Appends a 12-byte RTP header (no CSRCs, no extension) to `out`.
pub fn write_header(
    out: &mut Vec<u8>,
    marker: bool,
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
) {
    out.push(0x80);
    out.push((u8::from(marker) << 7) | (payload_type & 0x7f));
    out.extend_from_slice(&sequence.to_be_bytes());
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
}

/// Writes a fixed header as [`write_header`], followed, when `level` is
/// given, by an RFC 8285 one-byte extension block holding one RFC 6464
/// audio level (voice flag, attenuation 0-127 dBov) under `ext_id` (1-14).
#[allow(clippy::too_many_arguments)]
pub fn write_header_with_level(
    out: &mut Vec<u8>,
    marker: bool,
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
    ext_id: u8,
    level: Option<(bool, u8)>,
) {
    let level = level.map(|(voice, attenuation)| [(u8::from(voice) << 7) | attenuation.min(127)]);
    let elements = [(ext_id, level.as_ref().map(|l| &l[..]))];
    write_header_with_extensions(
        out,
        marker,
        payload_type,
        sequence,
        timestamp,
        ssrc,
        &elements,
    );
}

/// Writes a fixed header as [`write_header`], followed by an RFC 8285
/// one-byte extension block holding the present `elements` (id 1-14, value
/// 1-16 bytes), in order, padded to a 32-bit boundary. No block when none is
/// present.
pub fn write_header_with_extensions(
    out: &mut Vec<u8>,
    marker: bool,
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
    elements: &[(u8, Option<&[u8]>)],
) {
    let start = out.len();
    write_header(out, marker, payload_type, sequence, timestamp, ssrc);
    let present = || {
        elements
            .iter()
            .filter_map(|(id, v)| v.map(|v| (*id, &v[..v.len().min(16)])))
            .filter(|(id, v)| (1..=14).contains(id) && !v.is_empty())
    };
    let bytes: usize = present().map(|(_, v)| 1 + v.len()).sum();
    if bytes == 0 {
        return;
    }
    let words = bytes.div_ceil(4);
    out[start] |= 0x10;
    out.extend_from_slice(&ONE_BYTE_PROFILE.to_be_bytes());
    out.extend_from_slice(&(words as u16).to_be_bytes());
    for (id, v) in present() {
        // Element header: id, length - 1; then the value.
        out.push((id << 4) | (v.len() - 1) as u8);
        out.extend_from_slice(v);
    }
    out.resize(out.len() + words * 4 - bytes, 0);
}

/// Reads a 24-bit abs-send-time (6.18 fixed-point seconds, as WebRTC's
/// `http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time`) from the
/// one-byte or two-byte header extension `ext_id`.
pub fn abs_send_time(buf: &[u8], header: &RtpHeader, ext_id: u8) -> Option<u32> {
    match find_extension(buf, header, ext_id)? {
        &[a, b, c] => Some(u32::from_be_bytes([0, a, b, c])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fuzz::samples;
    use super::*;

    #[test]
    fn a_written_audio_level_parses_back() {
        let mut buf = vec![0xee]; // writing appends
        write_header_with_level(&mut buf, true, 63, 7, 960, 0xabcd, 1, Some((true, 33)));
        let h = RtpHeader::parse(&buf[1..]).unwrap();
        assert!(h.has_extension && h.marker);
        assert_eq!((h.payload_type, h.sequence, h.ssrc), (63, 7, 0xabcd));
        assert_eq!(h.header_len, 20);
        assert_eq!(audio_level(&buf[1..], &h, 1), Some((true, 33)));
        assert_eq!(audio_level(&buf[1..], &h, 2), None);
        let mut plain = Vec::new();
        write_header_with_level(&mut plain, false, 111, 1, 2, 3, 1, None);
        let h = RtpHeader::parse(&plain).unwrap();
        assert!(!h.has_extension);
        assert_eq!(h.header_len, 12);
    }

    #[test]
    fn written_extensions_parse_back_in_any_combination() {
        let send = [0x12, 0x34, 0x56];
        for level in [None, Some([0x85u8])] {
            for time in [None, Some(&send[..])] {
                let mut buf = Vec::new();
                write_header_with_extensions(
                    &mut buf,
                    false,
                    96,
                    9,
                    90,
                    0x77,
                    &[(1, level.as_ref().map(|l| &l[..])), (2, time)],
                );
                buf.extend_from_slice(b"payload");
                let h = RtpHeader::parse(&buf).unwrap();
                assert_eq!(h.has_extension, level.is_some() || time.is_some());
                assert_eq!(h.header_len % 4, 0);
                assert_eq!(h.payload(&buf), b"payload");
                assert_eq!(audio_level(&buf, &h, 1), level.map(|_| (true, 5)));
                assert_eq!(
                    abs_send_time(&buf, &h, 2),
                    time.map(|_| 0x0012_3456),
                    "{level:?} {time:?}"
                );
            }
        }
    }

    #[test]
    fn parses_audio_packet_with_one_byte_extension() {
        let buf = samples::RTP_AUDIO_LEVEL;
        let h = RtpHeader::parse(buf).unwrap();
        assert!(h.marker);
        assert_eq!(h.payload_type, 111);
        assert_eq!(h.sequence, 0x1234);
        assert_eq!(h.timestamp, 0xdead_beef);
        assert_eq!(h.ssrc, 0x1122_3344);
        assert_eq!(h.csrc_count, 0);
        assert!(h.has_extension);
        assert_eq!(h.header_len, 24);
        assert_eq!(h.padding_len, 0);
        assert_eq!(h.payload(buf), &[0xfc, 0xff, 0xfe, 0x01, 0x02]);
        assert_eq!(audio_level(buf, &h, 1), Some((true, 5)));
        assert_eq!(find_extension(buf, &h, 2), Some(&[0x12, 0x34, 0x56][..]));
        assert_eq!(find_extension(buf, &h, 3), None);
        assert_eq!(find_extension(buf, &h, 0), None);
        assert_eq!(find_extension(buf, &h, 15), None);
        assert_eq!(audio_level(buf, &h, 3), None);
    }

    #[test]
    fn parses_padded_packet_with_csrc_and_two_byte_extension() {
        let buf = samples::RTP_PADDED_TWO_BYTE_EXT;
        let h = RtpHeader::parse(buf).unwrap();
        assert!(!h.marker);
        assert_eq!(h.payload_type, 96);
        assert_eq!(h.sequence, 65535);
        assert_eq!(h.timestamp, 90_000);
        assert_eq!(h.ssrc, 0xcafe_babe);
        assert_eq!(h.csrc_count, 1);
        assert!(h.has_extension);
        assert_eq!(h.header_len, 12 + 4 + 4 + 12);
        assert_eq!(h.padding_len, 3);
        assert_eq!(h.payload(buf), &[0x90, 0x80, 0x00]);
        assert_eq!(find_extension(buf, &h, 1), Some(&b"0"[..]));
        assert_eq!(find_extension(buf, &h, 200), Some(&[][..]));
        assert_eq!(find_extension(buf, &h, 17), Some(&[0xaa, 0xbb][..]));
        assert_eq!(find_extension(buf, &h, 2), None);
        assert_eq!(audio_level(buf, &h, 200), None);
    }

    #[test]
    fn every_truncation_is_an_error_or_a_shorter_payload() {
        // Unpadded: cutting into the header is an error; cutting the payload
        // just yields a shorter payload (RTP carries no total length).
        let buf = samples::RTP_AUDIO_LEVEL;
        for cut in 0..buf.len() {
            let part = &buf[..cut];
            match RtpHeader::parse(part) {
                Ok(h) => {
                    assert!(cut >= 24, "cut {cut}");
                    assert_eq!(h.payload(part), &buf[24..cut]);
                }
                Err(e) => {
                    assert!(cut < 24, "cut {cut}: {e}");
                    assert!(matches!(e, PacketError::Truncated { .. }), "{e}");
                }
            }
        }
        // Padded: the count byte moves, so any truncation either errors or
        // reports a consistent header.
        let buf = samples::RTP_PADDED_TWO_BYTE_EXT;
        for cut in 0..buf.len() {
            let part = &buf[..cut];
            if let Ok(h) = RtpHeader::parse(part) {
                assert!(h.header_len + h.padding_len <= cut);
                let _ = h.payload(part);
            }
        }
        assert!(matches!(
            RtpHeader::parse(&buf[..31]),
            Err(PacketError::Truncated {
                what: "RTP header extension",
                need: 32,
                have: 31
            })
        ));
        assert!(matches!(
            RtpHeader::parse(&buf[..15]),
            Err(PacketError::Truncated {
                what: "RTP CSRC list",
                need: 16,
                have: 15
            })
        ));
    }

    #[test]
    fn rejects_bad_version_and_padding() {
        let mut buf = samples::RTP_AUDIO_LEVEL.to_vec();
        buf[0] = (buf[0] & 0x3f) | 0x40;
        assert_eq!(RtpHeader::parse(&buf), Err(PacketError::BadVersion(1)));

        let mut buf = samples::RTP_AUDIO_LEVEL.to_vec();
        buf[0] |= 0x20;
        *buf.last_mut().unwrap() = 0;
        assert!(matches!(
            RtpHeader::parse(&buf),
            Err(PacketError::BadPadding { padding: 0, .. })
        ));
        *buf.last_mut().unwrap() = 6; // payload is 5 bytes
        assert!(matches!(
            RtpHeader::parse(&buf),
            Err(PacketError::BadPadding {
                padding: 6,
                available: 5,
                ..
            })
        ));
        *buf.last_mut().unwrap() = 5; // all padding: empty payload
        let h = RtpHeader::parse(&buf).unwrap();
        assert_eq!(h.payload(&buf), &[] as &[u8]);
    }

    #[test]
    fn payload_never_panics_on_foreign_buffer() {
        let h = RtpHeader::parse(samples::RTP_PADDED_TWO_BYTE_EXT).unwrap();
        assert_eq!(h.payload(&[0u8; 4]), &[] as &[u8]);
        assert_eq!(h.payload(&[]), &[] as &[u8]);
        assert_eq!(find_extension(&[0u8; 4], &h, 1), None);
    }

    #[test]
    fn malformed_one_byte_extensions() {
        // id 15 stops processing even if the wanted id follows.
        let mut buf = vec![0x90, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xbe, 0xde, 0, 1];
        buf.extend_from_slice(&[0xf0, 0x10, 0x05, 0x00]);
        let h = RtpHeader::parse(&buf).unwrap();
        assert_eq!(find_extension(&buf, &h, 1), None);
        // An element overrunning the block is not returned.
        buf[16..20].copy_from_slice(&[0x00, 0x13, 0x01, 0x02]);
        assert_eq!(find_extension(&buf, &h, 1), None);
        // Padding then a valid element.
        buf[16..20].copy_from_slice(&[0x00, 0x00, 0x10, 0x7f]);
        assert_eq!(audio_level(&buf, &h, 1), Some((false, 127)));
        // Unknown profile.
        buf[12..14].copy_from_slice(&[0x12, 0x34]);
        assert_eq!(find_extension(&buf, &h, 1), None);
    }

    #[test]
    fn rewrite_keeps_marker_and_payload() {
        let mut buf = samples::RTP_AUDIO_LEVEL.to_vec();
        rewrite_header(&mut buf, 0xff, 7, 8, 9).unwrap();
        let h = RtpHeader::parse(&buf).unwrap();
        assert!(h.marker);
        assert_eq!(
            (h.payload_type, h.sequence, h.timestamp, h.ssrc),
            (0x7f, 7, 8, 9)
        );
        assert_eq!(&buf[12..], &samples::RTP_AUDIO_LEVEL[12..]);

        let mut short = [0x80u8; 11];
        assert!(matches!(
            rewrite_header(&mut short, 0, 0, 0, 0),
            Err(PacketError::Truncated {
                need: 12,
                have: 11,
                ..
            })
        ));
        assert_eq!(short, [0x80u8; 11]);
    }

    #[test]
    fn write_then_parse_round_trip() {
        let mut out = vec![0xee]; // writers append
        write_packet(&mut out, true, 0x80 | 100, 65535, 1, 2, b"hello");
        let pkt = &out[1..];
        let h = RtpHeader::parse(pkt).unwrap();
        assert!(h.marker);
        assert_eq!(h.payload_type, 100);
        assert_eq!((h.sequence, h.timestamp, h.ssrc), (65535, 1, 2));
        assert!(!h.has_extension);
        assert_eq!(h.header_len, 12);
        assert_eq!(h.payload(pkt), b"hello");
    }
}
