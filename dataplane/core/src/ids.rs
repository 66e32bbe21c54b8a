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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let p = PeerId(0xdead_beef);
        assert_eq!(p.to_string(), "s-deadbeef");
        assert_eq!("s-deadbeef".parse::<PeerId>(), Ok(p));
        assert!("p-deadbeef".parse::<PeerId>().is_err());
        assert!("s-xyz".parse::<PeerId>().is_err());
    }
}
