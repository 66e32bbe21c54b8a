//! The link-probe datagram (docs/control-api.md, "Link probes"), sans-IO.
//!
//! ```text
//! 0      4    5     6        8            16               24      25        25+n     25+n+32
//! | RDGP | v1 | kind | 0 0 | seq (u64 BE) | t_sent (u64 BE) | n (u8) | node id | HMAC-SHA256 |
//! ```
//!
//! `kind` is 1 for a request and 2 for a reply. `t_sent` is the requester's
//! clock in microseconds; the responder echoes `seq` and `t_sent` and puts
//! its own node id in the reply. The MAC covers every byte before it and is
//! keyed with the link's key from the desired state (the scheduler gives
//! both ends of a link the same 32-byte key), so only the two nodes of a
//! link can produce probes the other accepts.

use aws_lc_rs::hmac;

const MAGIC: &[u8; 4] = b"RDGP";
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
const HEADER_LEN: usize = 25;
/// Node ids are at most this long.
pub const MAX_ID_LEN: usize = 64;
/// Largest probe datagram.
pub const MAX_LEN: usize = HEADER_LEN + MAX_ID_LEN + MAC_LEN;

/// Request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Reply,
}

/// A decoded probe whose MAC is not checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: Kind,
    pub seq: u64,
    pub sent_us: u64,
    /// The sender's node id.
    pub node: String,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("not a well-formed probe")]
    Malformed,
    #[error("the MAC does not match the link key")]
    BadMac,
}

impl ProbeError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadMac => "bad_mac",
        }
    }
}

/// Encodes and MACs a probe. `node` is at most [`MAX_ID_LEN`] bytes.
pub fn encode(p: &Probe, key: &[u8]) -> Vec<u8> {
    let id = &p.node.as_bytes()[..p.node.len().min(MAX_ID_LEN)];
    let mut out = Vec::with_capacity(HEADER_LEN + id.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(match p.kind {
        Kind::Request => 1,
        Kind::Reply => 2,
    });
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&p.seq.to_be_bytes());
    out.extend_from_slice(&p.sent_us.to_be_bytes());
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &out);
    out.extend_from_slice(tag.as_ref());
    out
}

/// Parses a datagram without checking its MAC (the key depends on the
/// sender's node id inside it); then call [`verify`].
pub fn decode(buf: &[u8]) -> Result<Probe, ProbeError> {
    if buf.len() < HEADER_LEN + MAC_LEN
        || buf.len() > MAX_LEN
        || &buf[..4] != MAGIC
        || buf[4] != VERSION
    {
        return Err(ProbeError::Malformed);
    }
    let kind = match buf[5] {
        1 => Kind::Request,
        2 => Kind::Reply,
        _ => return Err(ProbeError::Malformed),
    };
    let n = usize::from(buf[24]);
    if n == 0 || buf.len() != HEADER_LEN + n + MAC_LEN {
        return Err(ProbeError::Malformed);
    }
    let node = std::str::from_utf8(&buf[HEADER_LEN..HEADER_LEN + n])
        .map_err(|_| ProbeError::Malformed)?
        .to_owned();
    let seq = u64::from_be_bytes(buf[8..16].try_into().map_err(|_| ProbeError::Malformed)?);
    let sent_us = u64::from_be_bytes(buf[16..24].try_into().map_err(|_| ProbeError::Malformed)?);
    Ok(Probe {
        kind,
        seq,
        sent_us,
        node,
    })
}

/// Checks the MAC of a datagram [`decode`] accepted (constant time).
pub fn verify(buf: &[u8], key: &[u8]) -> Result<(), ProbeError> {
    let (body, tag) = buf.split_at(buf.len() - MAC_LEN);
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), body, tag).map_err(|_| ProbeError::BadMac)
}

/// Decodes a link key: 64 hex digits.
pub fn parse_key(hex: &str) -> Option<Vec<u8>> {
    if hex.len() != 64 {
        return None;
    }
    (0..32)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe {
        Probe {
            kind: Kind::Request,
            seq: 7,
            sent_us: 123_456,
            node: "n-0011223344556677".into(),
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let key = [7u8; 32];
        let buf = encode(&probe(), &key);
        assert_eq!(decode(&buf).unwrap(), probe());
        verify(&buf, &key).unwrap();
        assert_eq!(verify(&buf, &[8u8; 32]), Err(ProbeError::BadMac));
    }

    #[test]
    fn every_bit_flip_is_caught() {
        let key = [7u8; 32];
        let buf = encode(&probe(), &key);
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 1;
            let ok = decode(&b).is_ok_and(|_| verify(&b, &key).is_ok());
            assert!(!ok, "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn garbage_is_malformed() {
        for b in [&b""[..], b"RDGP", &[0u8; 80], &[0xffu8; 200]] {
            assert_eq!(decode(b), Err(ProbeError::Malformed));
        }
        let mut b = encode(&probe(), &[1; 32]);
        b.truncate(b.len() - 1);
        assert_eq!(decode(&b), Err(ProbeError::Malformed));
    }

    #[test]
    fn keys() {
        assert_eq!(parse_key(&"0a".repeat(32)), Some(vec![10u8; 32]));
        assert_eq!(parse_key("0a"), None);
        assert_eq!(parse_key(&"zz".repeat(32)), None);
    }
}
