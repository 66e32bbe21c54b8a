//! Identifiers handed out by the core. They are small `Copy` values so the
//! packet path never hashes strings.

use std::fmt;
use std::str::FromStr;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{:x}"), self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                let hex = s.strip_prefix($prefix).ok_or(())?;
                u64::from_str_radix(hex, 16).map($name).map_err(|_| ())
            }
        }
    };
}

id_type!(
    /// A participant: one identity in one room, owning any number of peers.
    ParticipantId,
    "p-"
);
id_type!(
    /// A transport session: a WebRTC peer connection or a plain RTP endpoint.
    /// Its value is random so session URLs cannot be guessed.
    PeerId,
    "s-"
);
id_type!(
    /// A published track (one audio or video source, possibly simulcast).
    TrackId,
    "t-"
);

/// The shard that owns `room` among `shards`: a stable hash (FNV-1a, the
/// same in every build and run), so every peer of a room, and every node's
/// idea of it, lands on one shard.
pub fn shard_for_room(room: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// Bits of an identifier below the shard byte.
pub(crate) const ID_MASK: u64 = (1 << 56) - 1;

/// Tags a core-local id value with its core's shard number.
pub(crate) fn tagged(shard: u8, value: u64) -> u64 {
    (u64::from(shard) << 56) | (value & ID_MASK)
}

/// The shard (core) that handed out an identifier's value.
pub fn shard_of(id: u64) -> u8 {
    (id >> 56) as u8
}

/// A local ICE username fragment that names its shard: two lowercase hex
/// digits (the shard index), then `random`, which must be ice-chars
/// (ALPHA / DIGIT / "+" / "/") with at least 24 bits of randomness.
///
/// The kernel's `ridge_steer` program reads those two digits from the
/// USERNAME of a STUN binding request ("ourufrag:theirufrag") to send a
/// WebRTC session's first datagram, and the rest of its 4-tuple, to the
/// shard that owns the session when every shard shares one port.
pub fn shard_ufrag(shard: u8, random: &str) -> String {
    format!("{shard:02x}{random}")
}

/// The shard a ufrag made by [`shard_ufrag`] names, if it has the prefix.
pub fn ufrag_shard(ufrag: &str) -> Option<u8> {
    let digits = ufrag.get(..2)?;
    if !digits
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u8::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_ice_ufrag(s: &str) -> bool {
        // RFC 8839: ice-ufrag = 4*256ice-char; ice-char = ALPHA / DIGIT / "+" / "/"
        (4..=256).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    }

    #[test]
    fn ufrags_carry_the_shard_and_stay_valid() {
        for shard in [0u8, 1, 9, 10, 15, 16, 63, 255] {
            let creds = str0m::IceCreds::new();
            let ufrag = shard_ufrag(shard, &creds.ufrag);
            assert!(is_ice_ufrag(&ufrag), "{ufrag}");
            assert_eq!(ufrag_shard(&ufrag), Some(shard), "{ufrag}");
            assert_eq!(&ufrag[..2], format!("{shard:02x}"));
            // str0m's random part: 16 alphanumerics, ~95 bits.
            assert!(ufrag.len() - 2 >= 4, "{ufrag}");
        }
        assert_eq!(ufrag_shard("x1abcd"), None);
        assert_eq!(
            ufrag_shard("A1abcd"),
            None,
            "lowercase only, as BPF reads it"
        );
        assert_eq!(ufrag_shard("1"), None);
        assert_ne!(
            shard_ufrag(1, &str0m::IceCreds::new().ufrag),
            shard_ufrag(1, &str0m::IceCreds::new().ufrag)
        );
    }

    #[test]
    fn ids_round_trip_through_text() {
        let p = PeerId(0xdead_beef);
        assert_eq!(p.to_string(), "s-deadbeef");
        assert_eq!("s-deadbeef".parse::<PeerId>(), Ok(p));
        assert!("p-deadbeef".parse::<PeerId>().is_err());
        assert!("s-xyz".parse::<PeerId>().is_err());
    }
}
