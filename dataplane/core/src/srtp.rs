//! SRTP and SRTCP (RFC 3711) for node-to-node mesh links.
//!
//! Three profiles:
//!
//! * [`SrtpProfile::NullHmacSha1_80`]: the RFC 3711 NULL cipher with an
//!   HMAC-SHA1 80-bit tag. Payloads stay readable, packets are authenticated
//!   and replay-protected; unprotecting copies nothing.
//! * [`SrtpProfile::NullSipHash24_80`]: the NULL cipher with an 80-bit
//!   SipHash-2-4 tag on SRTP (SRTCP keeps HMAC-SHA1-80). Used on trusted
//!   links: the node's XDP program can check and re-sign it, so a transit
//!   node can forward a link's media in the kernel (docs/mesh.md, "Kernel
//!   forwarding of transit"). The tag is the first 10 bytes of
//!   SipHash-2-4-128 (session auth key's first 16 bytes) over
//!   `ROC (4 bytes, big-endian) || 0 0 0 0 || packet`: the rollover counter
//!   comes first, in a word of its own, so the kernel hashes the packet in
//!   aligned words.
//! * [`SrtpProfile::Aes128CmHmacSha1_80`]: `AES_CM_128_HMAC_SHA1_80`, the
//!   standard profile. Used on untrusted links.
//!
//! One [`SrtpContext`] is one direction of one link: the sending node keeps
//! one to protect, the receiving node one (with the same master key) to
//! unprotect. [`mesh_master_key`] derives a separate master key and salt for
//! each direction from the link's shared key. Session keys follow RFC 3711
//! §4.3 with a key derivation rate of 0.
//!
//! ## Packet index
//!
//! The sender keeps the highest 48-bit index (rollover counter and sequence
//! number) it has protected for each SSRC and places every packet relative to
//! it with the index estimation of RFC 3711 §3.3.1, exactly as the receiver
//! does. A retransmission of an older packet (same SSRC, old sequence
//! number, possibly from before a wrap) therefore gets the index, the rollover
//! counter and, the plaintext being the same, the very bytes of the original;
//! the receiver accepts it if the original never arrived and reports
//! [`SrtpError::Replayed`] if it did.
//!
//! The receiver places the first packet it sees of an SSRC at rollover
//! counter 0, as RFC 3711 §3.3.1 does, so both contexts of a direction must
//! start together (a fresh key per link session).
//!
//! ## Invariants
//!
//! * Nothing a peer sends can panic: every malformed input is an error.
//! * A packet that fails authentication changes no state.
//! * For an SSRC already seen, protect and unprotect allocate nothing when
//!   the packet (protect) or scratch (unprotect) buffer has the capacity.

use std::collections::HashMap;
use std::fmt;

use aes::Aes128;
use aes::cipher::{
    BlockCipherEncrypt, InnerIvInit, KeyInit, StreamCipher, StreamCipherCoreWrapper,
};
use ctr::CtrCore;
use ctr::flavors::Ctr128BE;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher24};

/// Length of the authentication tag appended to every SRTP and SRTCP packet.
pub const SRTP_AUTH_TAG_LEN: usize = 10;
/// Length of the SRTCP trailer: the E flag with the 31-bit SRTCP index, then
/// the authentication tag.
pub const SRTCP_TRAILER_LEN: usize = 4 + SRTP_AUTH_TAG_LEN;
/// Longest protected packet (trailer included) the context handles: the
/// largest UDP payload. Anything longer is [`SrtpError::TooLong`].
pub const SRTP_MAX_PACKET_LEN: usize = 65_535;

/// Master key length of both profiles.
const MASTER_KEY_LEN: usize = 16;
/// Master and session salt length of both profiles.
const SALT_LEN: usize = 14;
/// Session authentication key length (HMAC-SHA1, RFC 3711 §5.2).
const AUTH_KEY_LEN: usize = 20;
/// HMAC-SHA1 and HMAC-SHA256 block size: keys are zero-padded to it.
const HMAC_BLOCK_LEN: usize = 64;
/// Fixed RTP header (RFC 3550 §5.1).
const RTP_HEADER_LEN: usize = 12;
/// RTCP header and sender SSRC, which SRTCP leaves in the clear.
const RTCP_HEADER_LEN: usize = 8;
/// Highest 48-bit SRTP packet index.
const MAX_INDEX: u64 = (1 << 48) - 1;
/// Highest 31-bit SRTCP index.
const MAX_SRTCP_INDEX: u32 = (1 << 31) - 1;
/// The E flag in the SRTCP trailer word.
const SRTCP_E_FLAG: u32 = 1 << 31;
/// Replay window size in packets (RFC 3711 §3.3.2; the RFC's minimum is 64).
const REPLAY_WINDOW: u64 = 128;

/// Key derivation labels (RFC 3711 §4.3.1): encryption key, authentication
/// key, salt.
const RTP_LABELS: [u8; 3] = [0x00, 0x01, 0x02];
const RTCP_LABELS: [u8; 3] = [0x03, 0x04, 0x05];

/// The transform a link uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SrtpProfile {
    /// NULL cipher, HMAC-SHA1 80-bit tag: authenticated, not encrypted.
    NullHmacSha1_80,
    /// NULL cipher; SRTP tagged with 80 bits of SipHash-2-4-128, SRTCP with
    /// HMAC-SHA1-80. Authenticated, not encrypted; checkable in XDP.
    NullSipHash24_80,
    /// `AES_CM_128_HMAC_SHA1_80`: AES-128 counter mode, HMAC-SHA1 80-bit tag.
    Aes128CmHmacSha1_80,
}

impl SrtpProfile {
    /// Whether payloads are encrypted (and SRTCP's E flag is set).
    pub fn encrypts(self) -> bool {
        matches!(self, SrtpProfile::Aes128CmHmacSha1_80)
    }

    /// Whether SRTP packets carry a SipHash tag (the kernel can check them).
    pub fn siphash(self) -> bool {
        matches!(self, SrtpProfile::NullSipHash24_80)
    }
}

/// Why a packet could not be protected or unprotected. None of these changes
/// the context's state.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SrtpError {
    /// Shorter than its headers (fixed header, CSRC list, extension block)
    /// and trailer need.
    #[error("packet too short")]
    TooShort,
    /// Longer than [`SRTP_MAX_PACKET_LEN`] once protected.
    #[error("packet too long")]
    TooLong,
    /// Not RTP/RTCP version 2.
    #[error("not an RTP/RTCP version 2 packet")]
    BadVersion,
    /// The authentication tag does not match: forged, corrupted, or
    /// protected with another key.
    #[error("authentication tag mismatch")]
    BadTag,
    /// This packet index was already accepted.
    #[error("replayed packet")]
    Replayed,
    /// The packet index is older than the replay window.
    #[error("packet older than the replay window")]
    TooOld,
    /// The SRTCP E flag contradicts the profile (an unencrypted packet on an
    /// encrypting link, or the reverse).
    #[error("SRTCP encryption flag does not match the profile")]
    EncryptionMismatch,
    /// [`SrtpContext::protect_rtp_parts`] on an encrypting profile, whose
    /// payload must be rewritten (and so be in the packet).
    #[error("this profile encrypts: protect the whole packet")]
    Encrypts,
    /// The packet index space (2^48 SRTP, 2^31 SRTCP) is used up; the link
    /// must be rekeyed.
    #[error("packet index exhausted; rekey the link")]
    IndexExhausted,
}

/// Where a successfully unprotected packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unprotected {
    /// Nothing was copied: the RTP/RTCP packet is `packet[..len]` of the
    /// protected input (NULL profile).
    InPlace(usize),
    /// The plaintext packet was written into the scratch buffer (AES profile).
    Decrypted,
}

impl Unprotected {
    /// The unprotected packet, given the input and scratch buffers of the call
    /// that returned `self`.
    pub fn packet<'a>(self, packet: &'a [u8], scratch: &'a [u8]) -> &'a [u8] {
        match self {
            Unprotected::InPlace(len) => packet.get(..len).unwrap_or_default(),
            Unprotected::Decrypted => scratch,
        }
    }
}

/// Derives one direction's master key and salt from a mesh link's shared key:
/// `HMAC-SHA256(link_key, "ridge mesh srtp v1" || 0x00 || sender || 0x00 || receiver)`,
/// whose first 16 bytes are the master key and next 14 the master salt.
///
/// Swapping `sender` and `receiver` gives the other direction's keys, so the
/// two directions never share a keystream.
pub fn mesh_master_key(link_key: &[u8], sender: &str, receiver: &str) -> ([u8; 16], [u8; 14]) {
    // RFC 2104: a key longer than the block is hashed first, and the key is
    // zero-padded to the block.
    let mut block = [0u8; HMAC_BLOCK_LEN];
    if link_key.len() > HMAC_BLOCK_LEN {
        copy_prefix(&mut block, &Sha256::digest(link_key));
    } else {
        copy_prefix(&mut block, link_key);
    }
    let mut mac = <Hmac<Sha256> as Mac>::new(&block.into());
    mac.update(b"ridge mesh srtp v1");
    mac.update(&[0]);
    mac.update(sender.as_bytes());
    mac.update(&[0]);
    mac.update(receiver.as_bytes());
    let out = mac.finalize().into_bytes();
    let mut key = [0u8; MASTER_KEY_LEN];
    let mut salt = [0u8; SALT_LEN];
    copy_prefix(&mut key, &out);
    copy_prefix(&mut salt, out.get(MASTER_KEY_LEN..).unwrap_or_default());
    (key, salt)
}

/// Copies as much of `src` as fits into the front of `dst`.
fn copy_prefix(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

/// The AES-CM PRF of RFC 3711 §4.3.3 with key derivation rate 0: the
/// keystream of the master key under IV = (master_salt XOR label << 48) * 2^16.
fn prf(master: &Aes128, master_salt: &[u8; SALT_LEN], label: u8, out: &mut [u8]) {
    let mut x = [0u8; 16];
    copy_prefix(&mut x, master_salt);
    // key_id = label || r (r = 0, six bytes) is aligned right in the 14-byte
    // salt, so the label lands on byte 7.
    x[7] ^= label;
    for (counter, chunk) in (0u16..).zip(out.chunks_mut(16)) {
        let [hi, lo] = counter.to_be_bytes();
        x[14] = hi;
        x[15] = lo;
        let mut block = aes::Block::from(x);
        master.encrypt_block(&mut block);
        copy_prefix(chunk, &block);
    }
}

/// XORs the AES-CM keystream starting at `iv` into `buf` (RFC 3711 §4.1.1:
/// the blocks are E(k, IV), E(k, IV + 1 mod 2^128), ...).
fn apply_keystream(cipher: &Aes128, iv: [u8; 16], buf: &mut [u8]) -> Result<(), SrtpError> {
    let core = CtrCore::<&Aes128, Ctr128BE>::inner_iv_init(cipher, &iv.into());
    StreamCipherCoreWrapper::from_core(core)
        .try_apply_keystream(buf)
        .map_err(|_| SrtpError::TooLong)
}

/// The AES-CM IV of one packet (RFC 3711 §4.1.1):
/// `(k_s * 2^16) XOR (SSRC * 2^64) XOR (i * 2^16)`.
fn packet_iv(salt: &[u8; SALT_LEN], ssrc: u32, index: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    copy_prefix(&mut iv, salt);
    for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
        *b ^= s;
    }
    // The 48-bit index: the low six bytes of the u64, on bytes 8..14.
    for (b, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
        *b ^= s;
    }
    iv
}

/// Length of a SipHash-2-4 key.
pub const SIPHASH_KEY_LEN: usize = 16;

/// How a session's packets are authenticated.
enum Auth {
    /// HMAC-SHA1 keyed with the session authentication key; cloned per
    /// packet. The tag covers `packet || ROC`.
    HmacSha1(Hmac<Sha1>),
    /// SipHash-2-4-128 keyed with the first 16 bytes of the session
    /// authentication key. The tag covers `ROC || 0 0 0 0 || packet`.
    SipHash([u8; SIPHASH_KEY_LEN]),
}

/// The session keys of one of SRTP or SRTCP.
struct SessionKeys {
    /// Encryption key schedule; `None` for the NULL cipher.
    cipher: Option<Aes128>,
    salt: [u8; SALT_LEN],
    auth: Auth,
}

/// The SipHash tag of an SRTP packet (see the module docs): the first 10
/// bytes of SipHash-2-4-128 over `ROC || 0 0 0 0 || body`.
pub fn siphash_tag(key: &[u8; SIPHASH_KEY_LEN], roc: u32, body: &[u8]) -> [u8; SRTP_AUTH_TAG_LEN] {
    siphash_tag_parts(key, roc, &[body])
}

/// [`siphash_tag`] of the concatenation of `parts`.
fn siphash_tag_parts(
    key: &[u8; SIPHASH_KEY_LEN],
    roc: u32,
    parts: &[&[u8]],
) -> [u8; SRTP_AUTH_TAG_LEN] {
    let mut h = SipHasher24::new_with_key(key);
    let mut head = [0u8; 8];
    copy_prefix(&mut head, &roc.to_be_bytes());
    h.write(&head);
    for p in parts {
        h.write(p);
    }
    let full = h.finish128().as_bytes();
    let mut tag = [0u8; SRTP_AUTH_TAG_LEN];
    copy_prefix(&mut tag, &full);
    tag
}

impl SessionKeys {
    fn derive(
        master: &Aes128,
        master_salt: &[u8; SALT_LEN],
        [enc_label, auth_label, salt_label]: [u8; 3],
        encrypt: bool,
        siphash: bool,
    ) -> Self {
        // The 20-byte auth key, zero-padded to the HMAC block as RFC 2104 does.
        let mut auth_key = [0u8; HMAC_BLOCK_LEN];
        prf(
            master,
            master_salt,
            auth_label,
            &mut auth_key[..AUTH_KEY_LEN],
        );
        let mut salt = [0u8; SALT_LEN];
        prf(master, master_salt, salt_label, &mut salt);
        let cipher = encrypt.then(|| {
            let mut key = [0u8; MASTER_KEY_LEN];
            prf(master, master_salt, enc_label, &mut key);
            Aes128::new(&key.into())
        });
        let auth = if siphash {
            let mut key = [0u8; SIPHASH_KEY_LEN];
            copy_prefix(&mut key, &auth_key);
            Auth::SipHash(key)
        } else {
            Auth::HmacSha1(<Hmac<Sha1> as Mac>::new(&auth_key.into()))
        };
        SessionKeys { cipher, salt, auth }
    }

    /// The 80-bit tag over `data` under rollover counter `roc` (SRTP), or
    /// over `data` alone (SRTCP: `roc` is `None`; HMAC only).
    fn tag(&self, data: &[u8], roc: Option<u32>) -> [u8; SRTP_AUTH_TAG_LEN] {
        self.tag_parts(&[data], roc)
    }

    /// [`SessionKeys::tag`] over the concatenation of `parts`.
    fn tag_parts(&self, parts: &[&[u8]], roc: Option<u32>) -> [u8; SRTP_AUTH_TAG_LEN] {
        match &self.auth {
            Auth::HmacSha1(key) => {
                let mut mac = key.clone();
                for p in parts {
                    mac.update(p);
                }
                if let Some(roc) = roc {
                    mac.update(&roc.to_be_bytes());
                }
                let full = mac.finalize().into_bytes();
                let mut tag = [0u8; SRTP_AUTH_TAG_LEN];
                copy_prefix(&mut tag, &full);
                tag
            }
            Auth::SipHash(key) => siphash_tag_parts(key, roc.unwrap_or(0), parts),
        }
    }

    /// Checks `tag` against [`SessionKeys::tag`] in constant time.
    fn verify(&self, data: &[u8], roc: Option<u32>, tag: &[u8]) -> Result<(), SrtpError> {
        let want = self.tag(data, roc);
        // Constant time: fold every byte's difference.
        let diff = want
            .iter()
            .zip(tag)
            .fold(u8::from(tag.len() != want.len()), |acc, (a, b)| {
                acc | (a ^ b)
            });
        if diff == 0 {
            Ok(())
        } else {
            Err(SrtpError::BadTag)
        }
    }
}

/// What protect and unprotect need from an RTP header.
struct RtpFields {
    ssrc: u32,
    sequence: u16,
}

/// SSRC and sequence number, at fixed offsets, so authentication can run
/// before anything else is trusted.
fn rtp_fields(packet: &[u8]) -> Result<RtpFields, SrtpError> {
    let fixed = packet
        .first_chunk::<RTP_HEADER_LEN>()
        .ok_or(SrtpError::TooShort)?;
    Ok(RtpFields {
        sequence: u16::from_be_bytes([fixed[2], fixed[3]]),
        ssrc: u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
    })
}

/// Length of the clear part of an RTP packet (fixed header, CSRCs,
/// extension block), checked against the packet.
fn rtp_header_len(packet: &[u8]) -> Result<usize, SrtpError> {
    let first = *packet.first().ok_or(SrtpError::TooShort)?;
    if first >> 6 != 2 {
        return Err(SrtpError::BadVersion);
    }
    let mut len = RTP_HEADER_LEN + 4 * usize::from(first & 0x0f);
    if first & 0x10 != 0 {
        let Some(&[hi, lo]) = packet.get(len + 2..len + 4) else {
            return Err(SrtpError::TooShort);
        };
        len += 4 + 4 * usize::from(u16::from_be_bytes([hi, lo]));
    }
    if len > packet.len() {
        return Err(SrtpError::TooShort);
    }
    Ok(len)
}

/// The index of a packet with sequence number `seq`, relative to the highest
/// index `highest` seen so far (RFC 3711 §3.3.1). Sender and receiver use the
/// same rule, so a packet they both place gets the same index. A packet that
/// would fall before rollover counter 0 is placed at counter 0.
fn estimate_index(highest: u64, seq: u16) -> Result<u64, SrtpError> {
    const HALF: i32 = 1 << 15;
    let roc = highest >> 16;
    let s_l = i32::from((highest & 0xffff) as u16);
    let s = i32::from(seq);
    let v = if s_l < HALF {
        if s - s_l > HALF {
            roc.saturating_sub(1)
        } else {
            roc
        }
    } else if s_l - HALF > s {
        roc + 1
    } else {
        roc
    };
    let index = (v << 16) | u64::from(seq);
    if index > MAX_INDEX {
        return Err(SrtpError::IndexExhausted);
    }
    Ok(index)
}

/// Sliding replay window (RFC 3711 §3.3.2) over packet indices.
#[derive(Debug, Clone, Copy)]
struct ReplayWindow {
    /// Highest accepted index.
    highest: u64,
    /// Bit `k` set: index `highest - k` was accepted.
    seen: u128,
}

impl ReplayWindow {
    fn new(index: u64) -> Self {
        ReplayWindow {
            highest: index,
            seen: 1,
        }
    }

    fn check(&self, index: u64) -> Result<(), SrtpError> {
        let Some(age) = self.highest.checked_sub(index) else {
            return Ok(());
        };
        if age >= REPLAY_WINDOW {
            return Err(SrtpError::TooOld);
        }
        if (self.seen >> age) & 1 != 0 {
            return Err(SrtpError::Replayed);
        }
        Ok(())
    }

    /// Marks `index` accepted; `check` must have passed.
    fn accept(&mut self, index: u64) {
        if index > self.highest {
            let ahead = index - self.highest;
            self.seen = if ahead >= REPLAY_WINDOW {
                0
            } else {
                self.seen << ahead
            };
            self.seen |= 1;
            self.highest = index;
        } else {
            let age = self.highest - index;
            if age < REPLAY_WINDOW {
                self.seen |= 1 << age;
            }
        }
    }
}

/// SRTP/SRTCP state of one direction of one link: the sending side protects,
/// the receiving side unprotects.
pub struct SrtpContext {
    profile: SrtpProfile,
    rtp: SessionKeys,
    rtcp: SessionKeys,
    /// Sender: highest SRTP index protected, per SSRC.
    sent: HashMap<u32, u64>,
    /// Receiver: replay window per SSRC.
    received: HashMap<u32, ReplayWindow>,
    /// Sender: the next SRTCP index.
    rtcp_next: u32,
    /// Receiver: the SRTCP replay window, from the first accepted packet on.
    rtcp_received: Option<ReplayWindow>,
}

impl fmt::Debug for SrtpContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("SrtpContext")
            .field("profile", &self.profile)
            .field("sending_ssrcs", &self.sent.len())
            .field("receiving_ssrcs", &self.received.len())
            .field("srtcp_next_index", &self.rtcp_next)
            .finish_non_exhaustive()
    }
}

impl SrtpContext {
    /// A context for one direction, deriving the SRTP and SRTCP session keys
    /// from the master key and salt (RFC 3711 §4.3, key derivation rate 0).
    pub fn new(profile: SrtpProfile, master_key: &[u8; 16], master_salt: &[u8; 14]) -> Self {
        let master = Aes128::new(&(*master_key).into());
        let encrypt = profile.encrypts();
        SrtpContext {
            profile,
            rtp: SessionKeys::derive(&master, master_salt, RTP_LABELS, encrypt, profile.siphash()),
            rtcp: SessionKeys::derive(&master, master_salt, RTCP_LABELS, encrypt, false),
            sent: HashMap::new(),
            received: HashMap::new(),
            rtcp_next: 0,
            rtcp_received: None,
        }
    }

    /// The context's profile.
    pub fn profile(&self) -> SrtpProfile {
        self.profile
    }

    /// The SRTP SipHash key of a [`SrtpProfile::NullSipHash24_80`] context
    /// (what the kernel needs to check or sign this direction's packets);
    /// `None` for the other profiles.
    pub fn rtp_siphash_key(&self) -> Option<[u8; SIPHASH_KEY_LEN]> {
        match &self.rtp.auth {
            Auth::SipHash(key) => Some(*key),
            Auth::HmacSha1(_) => None,
        }
    }

    /// The highest SRTP index received on `ssrc` (receiving context).
    pub fn highest_received(&self, ssrc: u32) -> Option<u64> {
        self.received.get(&ssrc).map(|w| w.highest)
    }

    /// The highest SRTP index protected on `ssrc` (sending context).
    pub fn highest_sent(&self, ssrc: u32) -> Option<u64> {
        self.sent.get(&ssrc).copied()
    }

    /// Moves the receive window of `ssrc` on to `index` when it is ahead:
    /// someone else (the kernel) accepted the packets up to it, so later
    /// sequence numbers are placed after it. The indices skipped are not
    /// marked received. Nothing happens for an index at or behind the
    /// window, or above the 48-bit index space.
    pub fn advance_received(&mut self, ssrc: u32, index: u64) {
        if index > MAX_INDEX {
            return;
        }
        match self.received.get_mut(&ssrc) {
            Some(window) if index > window.highest => {
                let ahead = index - window.highest;
                window.seen = if ahead >= REPLAY_WINDOW {
                    0
                } else {
                    window.seen << ahead
                };
                window.highest = index;
            }
            Some(_) => {}
            None => {
                let mut window = ReplayWindow::new(index);
                window.seen = 0;
                self.received.insert(ssrc, window);
            }
        }
    }

    /// Moves the send index of `ssrc` on to `index` when it is ahead
    /// (someone else, the kernel, sent under this key up to it).
    pub fn advance_sent(&mut self, ssrc: u32, index: u64) {
        if index > MAX_INDEX {
            return;
        }
        let highest = self.sent.entry(ssrc).or_insert(index);
        *highest = (*highest).max(index);
    }

    /// Drops the send and receive state of `ssrc` (its stream ended). A later
    /// packet of that SSRC starts afresh at rollover counter 0, so only use
    /// this when the SSRC will not come back with the same key.
    pub fn forget_ssrc(&mut self, ssrc: u32) {
        self.sent.remove(&ssrc);
        self.received.remove(&ssrc);
    }

    /// Protects an RTP packet in place: the payload (everything after the
    /// fixed header, CSRCs and extension block) is encrypted for the AES
    /// profile, and the 10-byte tag over the packet and the rollover counter
    /// is appended.
    ///
    /// The index is estimated from the highest one sent on this SSRC, so a
    /// retransmission of an older packet gets the original's index. It must
    /// carry the original's bytes: for the AES profile, other bytes under the
    /// same index would reuse its keystream. On error the packet is unchanged.
    pub fn protect_rtp(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        if packet.len() > SRTP_MAX_PACKET_LEN - SRTP_AUTH_TAG_LEN {
            return Err(SrtpError::TooLong);
        }
        let header_len = rtp_header_len(packet)?;
        let RtpFields { ssrc, sequence } = rtp_fields(packet)?;
        let highest = self.sent.get(&ssrc).copied();
        let index = match highest {
            Some(highest) => estimate_index(highest, sequence)?,
            None => u64::from(sequence),
        };
        if let Some(cipher) = &self.rtp.cipher {
            let payload = packet.get_mut(header_len..).ok_or(SrtpError::TooShort)?;
            apply_keystream(cipher, packet_iv(&self.rtp.salt, ssrc, index), payload)?;
        }
        let tag = self.rtp.tag(packet, Some((index >> 16) as u32));
        packet.extend_from_slice(&tag);
        match self.sent.get_mut(&ssrc) {
            Some(highest) => *highest = (*highest).max(index),
            None => {
                self.sent.insert(ssrc, index);
            }
        }
        Ok(())
    }

    /// [`SrtpContext::protect_rtp`] for a packet held in two pieces, its
    /// header here and its payload elsewhere (shared with other sends):
    /// returns the tag to send after them, copying nothing. Only for the
    /// profiles that do not encrypt ([`SrtpError::Encrypts`] otherwise).
    /// The index rules are protect_rtp's, so a retransmission gets the
    /// original's index and tag.
    pub fn protect_rtp_parts(
        &mut self,
        header: &[u8],
        payload: &[u8],
    ) -> Result<[u8; SRTP_AUTH_TAG_LEN], SrtpError> {
        if self.profile.encrypts() {
            return Err(SrtpError::Encrypts);
        }
        if header.len() + payload.len() > SRTP_MAX_PACKET_LEN - SRTP_AUTH_TAG_LEN {
            return Err(SrtpError::TooLong);
        }
        rtp_header_len(header)?;
        let RtpFields { ssrc, sequence } = rtp_fields(header)?;
        let index = match self.sent.get(&ssrc) {
            Some(&highest) => estimate_index(highest, sequence)?,
            None => u64::from(sequence),
        };
        let tag = self
            .rtp
            .tag_parts(&[header, payload], Some((index >> 16) as u32));
        let highest = self.sent.entry(ssrc).or_insert(index);
        *highest = (*highest).max(index);
        Ok(tag)
    }

    /// Verifies (and, for the AES profile, decrypts) an SRTP packet.
    ///
    /// NULL profile: nothing is copied, the RTP packet is `packet[..len]` of
    /// [`Unprotected::InPlace`]`(len)`. AES profile: the RTP packet is written
    /// into `scratch` (cleared first) and [`Unprotected::Decrypted`] is
    /// returned. Packets are checked against a 128-packet replay window per
    /// SSRC. On error no state changes (`scratch` may hold anything).
    pub fn unprotect_rtp(
        &mut self,
        packet: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Unprotected, SrtpError> {
        if packet.len() > SRTP_MAX_PACKET_LEN {
            return Err(SrtpError::TooLong);
        }
        let body_len = packet
            .len()
            .checked_sub(SRTP_AUTH_TAG_LEN)
            .ok_or(SrtpError::TooShort)?;
        let (body, tag) = packet
            .split_at_checked(body_len)
            .ok_or(SrtpError::TooShort)?;
        let RtpFields { ssrc, sequence } = rtp_fields(body)?;
        let window = self.received.get(&ssrc).copied();
        let index = match window {
            Some(window) => estimate_index(window.highest, sequence)?,
            None => u64::from(sequence),
        };
        // Authenticate first: a forged packet is BadTag whatever it claims.
        self.rtp.verify(body, Some((index >> 16) as u32), tag)?;
        let header_len = rtp_header_len(body)?;
        if let Some(window) = window {
            window.check(index)?;
        }
        let result = match &self.rtp.cipher {
            Some(cipher) => {
                scratch.clear();
                scratch.extend_from_slice(body);
                let payload = scratch.get_mut(header_len..).ok_or(SrtpError::TooShort)?;
                apply_keystream(cipher, packet_iv(&self.rtp.salt, ssrc, index), payload)?;
                Unprotected::Decrypted
            }
            None => Unprotected::InPlace(body_len),
        };
        match self.received.get_mut(&ssrc) {
            Some(window) => window.accept(index),
            None => {
                self.received.insert(ssrc, ReplayWindow::new(index));
            }
        }
        Ok(result)
    }

    /// Marks sequence number `seq` of `ssrc` as received without a packet:
    /// one rebuilt from FEC or RED, so a later retransmission or late
    /// original of it is refused as a replay. Fails (changing nothing) if
    /// it already arrived, is older than the replay window, or the SSRC has
    /// not been received from at all.
    pub fn mark_received(&mut self, ssrc: u32, seq: u16) -> Result<(), SrtpError> {
        let window = self.received.get_mut(&ssrc).ok_or(SrtpError::TooOld)?;
        let index = estimate_index(window.highest, seq)?;
        window.check(index)?;
        window.accept(index);
        Ok(())
    }

    /// Protects an RTCP (compound) packet in place: for the AES profile
    /// everything after the first 8 bytes is encrypted; then the E flag with
    /// the 31-bit SRTCP index (one counter per context, from 0) and the
    /// 10-byte tag are appended. On error the packet is unchanged.
    pub fn protect_rtcp(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        if packet.len() > SRTP_MAX_PACKET_LEN - SRTCP_TRAILER_LEN {
            return Err(SrtpError::TooLong);
        }
        let head = packet
            .first_chunk::<RTCP_HEADER_LEN>()
            .ok_or(SrtpError::TooShort)?;
        if head[0] >> 6 != 2 {
            return Err(SrtpError::BadVersion);
        }
        let ssrc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let index = self.rtcp_next;
        if index > MAX_SRTCP_INDEX {
            return Err(SrtpError::IndexExhausted);
        }
        let mut word = index;
        if let Some(cipher) = &self.rtcp.cipher {
            let body = packet
                .get_mut(RTCP_HEADER_LEN..)
                .ok_or(SrtpError::TooShort)?;
            apply_keystream(
                cipher,
                packet_iv(&self.rtcp.salt, ssrc, u64::from(index)),
                body,
            )?;
            word |= SRTCP_E_FLAG;
        }
        packet.extend_from_slice(&word.to_be_bytes());
        let tag = self.rtcp.tag(packet, None);
        packet.extend_from_slice(&tag);
        self.rtcp_next = index + 1;
        Ok(())
    }

    /// Verifies (and, for the AES profile, decrypts) an SRTCP packet, with a
    /// 128-entry replay window on the SRTCP index. On success the RTCP packet
    /// without the trailer is `packet[..len]` ([`Unprotected::InPlace`]) or
    /// in `scratch` ([`Unprotected::Decrypted`]). On error no state changes.
    pub fn unprotect_rtcp(
        &mut self,
        packet: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Unprotected, SrtpError> {
        if packet.len() > SRTP_MAX_PACKET_LEN {
            return Err(SrtpError::TooLong);
        }
        let body_len = packet
            .len()
            .checked_sub(SRTCP_TRAILER_LEN)
            .filter(|&len| len >= RTCP_HEADER_LEN)
            .ok_or(SrtpError::TooShort)?;
        let (authenticated, tag) = packet
            .split_at_checked(body_len + 4)
            .ok_or(SrtpError::TooShort)?;
        self.rtcp.verify(authenticated, None, tag)?;
        let (body, word) = authenticated
            .split_last_chunk::<4>()
            .ok_or(SrtpError::TooShort)?;
        let word = u32::from_be_bytes(*word);
        let index = u64::from(word & MAX_SRTCP_INDEX);
        if (word & SRTCP_E_FLAG != 0) != self.profile.encrypts() {
            return Err(SrtpError::EncryptionMismatch);
        }
        let head = body
            .first_chunk::<RTCP_HEADER_LEN>()
            .ok_or(SrtpError::TooShort)?;
        if head[0] >> 6 != 2 {
            return Err(SrtpError::BadVersion);
        }
        let ssrc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if let Some(window) = &self.rtcp_received {
            window.check(index)?;
        }
        let result = match &self.rtcp.cipher {
            Some(cipher) => {
                scratch.clear();
                scratch.extend_from_slice(body);
                let encrypted = scratch
                    .get_mut(RTCP_HEADER_LEN..)
                    .ok_or(SrtpError::TooShort)?;
                apply_keystream(cipher, packet_iv(&self.rtcp.salt, ssrc, index), encrypted)?;
                Unprotected::Decrypted
            }
            None => Unprotected::InPlace(body_len),
        };
        match &mut self.rtcp_received {
            Some(window) => window.accept(index),
            None => self.rtcp_received = Some(ReplayWindow::new(index)),
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const PROFILES: [SrtpProfile; 3] = [
        SrtpProfile::NullHmacSha1_80,
        SrtpProfile::NullSipHash24_80,
        SrtpProfile::Aes128CmHmacSha1_80,
    ];

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn array<const N: usize>(s: &str) -> [u8; N] {
        hex(s).try_into().unwrap()
    }

    /// The master key and salt of RFC 3711 B.3 (also libsrtp's test key).
    fn rfc_master() -> ([u8; 16], [u8; 14]) {
        (
            array("E1F97A0D3E018BE0D64FA32C06DE4139"),
            array("0EC675AD498AFEEBB6960B3AABE6"),
        )
    }

    /// A sending and a receiving context sharing one master key.
    fn pair(profile: SrtpProfile) -> (SrtpContext, SrtpContext) {
        let (key, salt) = mesh_master_key(&[7; 32], "node-a", "node-b");
        (
            SrtpContext::new(profile, &key, &salt),
            SrtpContext::new(profile, &key, &salt),
        )
    }

    fn rtp(ssrc: u32, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&u32::from(seq).wrapping_mul(960).to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    /// An RTP packet with two CSRCs and a one-byte-form extension block.
    fn rtp_with_ext(ssrc: u32, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x92, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x12, 0x34]);
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(&[1, 1, 1, 1, 2, 2, 2, 2]);
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0xff, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    fn first_byte(mut packet: Vec<u8>, byte: u8) -> Vec<u8> {
        packet[0] = byte;
        packet
    }

    fn rtcp(ssrc: u32, body: &[u8]) -> Vec<u8> {
        // A receiver report without blocks, then `body` as if more packets followed.
        let mut p = vec![0x80, 201, 0, 1];
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    fn protected_rtp(tx: &mut SrtpContext, plain: &[u8]) -> Vec<u8> {
        let mut p = plain.to_vec();
        tx.protect_rtp(&mut p).unwrap();
        p
    }

    /// Unprotects and returns the plaintext packet.
    fn open_rtp(rx: &mut SrtpContext, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
        let mut scratch = Vec::new();
        let r = rx.unprotect_rtp(packet, &mut scratch)?;
        Ok(r.packet(packet, &scratch).to_vec())
    }

    fn open_rtcp(rx: &mut SrtpContext, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
        let mut scratch = Vec::new();
        let r = rx.unprotect_rtcp(packet, &mut scratch)?;
        Ok(r.packet(packet, &scratch).to_vec())
    }

    #[test]
    fn rfc3711_b2_aes_cm_keystream() {
        let cipher = Aes128::new(&array::<16>("2B7E151628AED2A6ABF7158809CF4F3C").into());
        let salt = array::<14>("F0F1F2F3F4F5F6F7F8F9FAFBFCFD");
        let iv = packet_iv(&salt, 0, 0);
        assert_eq!(iv, array::<16>("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000"));
        // The whole segment: 1044512 octets, 65282 blocks.
        let mut ks = vec![0u8; 1_044_512];
        apply_keystream(&cipher, iv, &mut ks).unwrap();
        assert_eq!(
            ks[..48],
            hex("E03EAD0935C95E80E166B16DD92B4EB4
                 D23513162B02D0F72A43A2FE4A5F97AB
                 41E95B3BB0A2E8DD477901E4FCA894C0")[..]
        );
        assert_eq!(
            ks[ks.len() - 48..],
            hex("EC8CDF7398607CB0F2D21675EA9EA1E4
                 362B7C3C6773516318A077D7FC5073AE
                 6A2CC3787889374FBEB4C81B17BA6C44")[..]
        );
    }

    #[test]
    fn rfc3711_b3_key_derivation() {
        let (key, salt) = rfc_master();
        let master = Aes128::new(&key.into());
        let mut cipher_key = [0u8; 16];
        prf(&master, &salt, 0x00, &mut cipher_key);
        assert_eq!(cipher_key, array::<16>("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut cipher_salt = [0u8; 14];
        prf(&master, &salt, 0x02, &mut cipher_salt);
        assert_eq!(cipher_salt, array::<14>("30CBBC08863D8C85D49DB34A9AE1"));
        // The RFC's 94-octet auth key; SRTP's HMAC-SHA1 uses its first 20.
        let mut auth_key = [0u8; 94];
        prf(&master, &salt, 0x01, &mut auth_key);
        assert_eq!(
            auth_key[..],
            hex("CEBE321F6FF7716B6FD4AB49AF256A15
                 6D38BAA48F0A0ACF3C34E2359E6CDBCE
                 E049646C43D9327AD175578EF7227098
                 6371C10C9A369AC2F94A8C5FBCDDDC25
                 6D6E919A48B610EF17C2041E47403576
                 6B68642C59BBFC2F34DB60DBDFB2")[..]
        );
        // The context's SRTP session keys are these.
        let ctx = SrtpContext::new(SrtpProfile::Aes128CmHmacSha1_80, &key, &salt);
        assert_eq!(ctx.rtp.salt, cipher_salt);
        let mut expected_mac = <Hmac<Sha1> as Mac>::new_from_slice(&auth_key[..20]).unwrap();
        expected_mac.update(b"x");
        let Auth::HmacSha1(auth) = &ctx.rtp.auth else {
            panic!("an HMAC profile keys HMAC-SHA1");
        };
        let mut mac = auth.clone();
        mac.update(b"x");
        assert_eq!(
            mac.finalize().into_bytes(),
            expected_mac.finalize().into_bytes()
        );
        // The SipHash profile keys SipHash with the first 16 bytes of the
        // same session auth key.
        let sip = SrtpContext::new(SrtpProfile::NullSipHash24_80, &key, &salt);
        assert_eq!(sip.rtp_siphash_key().unwrap()[..], auth_key[..16]);
        assert_eq!(ctx.rtp_siphash_key(), None);
    }

    /// libsrtp's srtp_driver known-answer packets for AES_CM_128_HMAC_SHA1_80
    /// under the B.3 master key.
    #[test]
    fn libsrtp_known_answer_packets() {
        let (key, salt) = rfc_master();
        let mut tx = SrtpContext::new(SrtpProfile::Aes128CmHmacSha1_80, &key, &salt);
        let mut rx = SrtpContext::new(SrtpProfile::Aes128CmHmacSha1_80, &key, &salt);

        let plain = hex("800f1234decafbadcafebabe abababababababababababababababab");
        let srtp = protected_rtp(&mut tx, &plain);
        assert_eq!(
            srtp,
            hex("800f1234decafbadcafebabe 4e55dc4ce79978d88ca4d215949d2402
                 b78d6acc99ea179b8dbb")
        );
        assert_eq!(open_rtp(&mut rx, &srtp).unwrap(), plain);

        // libsrtp's SRTCP vector has index 1: the second packet of a context.
        let plain = hex("81c8000bcafebabe abababababababab abababababababab");
        let mut first = plain.clone();
        tx.protect_rtcp(&mut first).unwrap();
        let mut second = plain.clone();
        tx.protect_rtcp(&mut second).unwrap();
        assert_eq!(
            second,
            hex("81c8000bcafebabe 7128035be487b9bd bef89041f977a5a8
                 80000001 993e08cd54d6c1230798")
        );
        assert_eq!(first[first.len() - 14..][..4], [0x80, 0, 0, 0]);
        assert_eq!(open_rtcp(&mut rx, &second).unwrap(), plain);
        assert_eq!(open_rtcp(&mut rx, &first).unwrap(), plain);
    }

    #[test]
    fn mesh_keys_per_direction() {
        let (ab_key, ab_salt) = mesh_master_key(&[0x42; 32], "node-a", "node-b");
        let (ba_key, ba_salt) = mesh_master_key(&[0x42; 32], "node-b", "node-a");
        // Reference values from an independent HMAC-SHA256.
        assert_eq!(ab_key, array::<16>("f3c101fa8efb1cf8d4bed4a7de00c4a9"));
        assert_eq!(ab_salt, array::<14>("8a1a842930d5b7d37ac1837f57c8"));
        assert_eq!(ba_key, array::<16>("d353ba6b3d2d8fa0f2a905b77d927837"));
        assert_eq!(ba_salt, array::<14>("055d9ab4fc139d466ade7352aecf"));
        // A link key longer than the HMAC block is hashed first (RFC 2104).
        let long: Vec<u8> = (0..100).collect();
        let (key, salt) = mesh_master_key(&long, "a", "b");
        assert_eq!(key, array::<16>("af9f042beaf2eacfe318150e2159a746"));
        assert_eq!(salt, array::<14>("e185d4987e741c1dfbc8874c3a37"));
        // Deterministic, and different for another link key.
        assert_eq!(mesh_master_key(&[0x42; 32], "node-a", "node-b").0, ab_key);
        assert_ne!(mesh_master_key(&[0x43; 32], "node-a", "node-b").0, ab_key);

        // A packet protected for one direction does not verify in the other.
        for profile in PROFILES {
            let mut tx = SrtpContext::new(profile, &ab_key, &ab_salt);
            let mut wrong = SrtpContext::new(profile, &ba_key, &ba_salt);
            let mut right = SrtpContext::new(profile, &ab_key, &ab_salt);
            let p = protected_rtp(&mut tx, &rtp(1, 1, b"payload"));
            assert_eq!(open_rtp(&mut wrong, &p), Err(SrtpError::BadTag));
            let mut c = rtcp(1, b"report");
            tx.protect_rtcp(&mut c).unwrap();
            assert_eq!(open_rtcp(&mut wrong, &c), Err(SrtpError::BadTag));
            assert_eq!(open_rtp(&mut right, &p).unwrap(), rtp(1, 1, b"payload"));
            assert_eq!(open_rtcp(&mut right, &c).unwrap(), rtcp(1, b"report"));
        }
    }

    #[test]
    fn round_trip_rtp() {
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            for (seq, plain) in [
                (
                    1,
                    rtp(0x1111, 1, b"hello mesh, this is a payload of some length"),
                ),
                (2, rtp_with_ext(0x1111, 2, b"with csrcs and an extension")),
                (3, rtp(0x1111, 3, b"")),
                (9, rtp(0x2222, 9, &[0xab; 1200])),
            ] {
                let p = protected_rtp(&mut tx, &plain);
                assert_eq!(p.len(), plain.len() + SRTP_AUTH_TAG_LEN);
                let header_len = rtp_header_len(&plain).unwrap();
                // The header is always clear.
                assert_eq!(p[..header_len], plain[..header_len], "seq {seq}");
                let payload = &p[header_len..plain.len()];
                match profile {
                    SrtpProfile::NullHmacSha1_80 | SrtpProfile::NullSipHash24_80 => {
                        assert_eq!(payload, &plain[header_len..])
                    }
                    SrtpProfile::Aes128CmHmacSha1_80 => {
                        if !payload.is_empty() {
                            assert_ne!(payload, &plain[header_len..]);
                        }
                    }
                }
                let mut scratch = Vec::with_capacity(1500);
                let r = rx.unprotect_rtp(&p, &mut scratch).unwrap();
                match profile {
                    SrtpProfile::NullHmacSha1_80 | SrtpProfile::NullSipHash24_80 => {
                        assert_eq!(r, Unprotected::InPlace(plain.len()));
                        assert_eq!(p[..plain.len()], plain[..]);
                    }
                    SrtpProfile::Aes128CmHmacSha1_80 => {
                        assert_eq!(r, Unprotected::Decrypted);
                        assert_eq!(scratch, plain);
                    }
                }
                assert_eq!(r.packet(&p, &scratch), &plain[..]);
            }
        }
    }

    #[test]
    fn round_trip_rtcp() {
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            for i in 0..5u32 {
                let plain = rtcp(0xabcd, &[i as u8; 40]);
                let mut p = plain.clone();
                tx.protect_rtcp(&mut p).unwrap();
                assert_eq!(p.len(), plain.len() + SRTCP_TRAILER_LEN);
                assert_eq!(p[..8], plain[..8]);
                let word = u32::from_be_bytes(p[plain.len()..plain.len() + 4].try_into().unwrap());
                match profile {
                    SrtpProfile::NullHmacSha1_80 | SrtpProfile::NullSipHash24_80 => {
                        assert_eq!(word, i, "E = 0, index counts from 0");
                        assert_eq!(p[8..plain.len()], plain[8..]);
                    }
                    SrtpProfile::Aes128CmHmacSha1_80 => {
                        assert_eq!(word, SRTCP_E_FLAG | i, "E = 1, index counts from 0");
                        assert_ne!(p[8..plain.len()], plain[8..]);
                    }
                }
                let mut scratch = Vec::new();
                let r = rx.unprotect_rtcp(&p, &mut scratch).unwrap();
                let expected = match profile {
                    SrtpProfile::NullHmacSha1_80 | SrtpProfile::NullSipHash24_80 => {
                        Unprotected::InPlace(plain.len())
                    }
                    SrtpProfile::Aes128CmHmacSha1_80 => Unprotected::Decrypted,
                };
                assert_eq!(r, expected);
                assert_eq!(r.packet(&p, &scratch), &plain[..]);
                assert_eq!(open_rtcp(&mut rx, &p), Err(SrtpError::Replayed));
            }
        }
    }

    #[test]
    fn srtcp_e_flag_must_match_profile() {
        // An authentic NULL packet fed to an AES receiver with the same
        // keys (auth keys are profile-independent) is refused by its E flag.
        let (key, salt) = rfc_master();
        let mut null_tx = SrtpContext::new(SrtpProfile::NullHmacSha1_80, &key, &salt);
        let mut aes_rx = SrtpContext::new(SrtpProfile::Aes128CmHmacSha1_80, &key, &salt);
        let mut p = rtcp(5, b"plain report");
        null_tx.protect_rtcp(&mut p).unwrap();
        assert_eq!(
            open_rtcp(&mut aes_rx, &p),
            Err(SrtpError::EncryptionMismatch)
        );

        let mut aes_tx = SrtpContext::new(SrtpProfile::Aes128CmHmacSha1_80, &key, &salt);
        let mut null_rx = SrtpContext::new(SrtpProfile::NullHmacSha1_80, &key, &salt);
        let mut p = rtcp(5, b"secret report");
        aes_tx.protect_rtcp(&mut p).unwrap();
        assert_eq!(
            open_rtcp(&mut null_rx, &p),
            Err(SrtpError::EncryptionMismatch)
        );
    }

    #[test]
    fn any_flipped_bit_is_bad_tag_and_changes_nothing() {
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            // Some history, so a flipped sequence bit moves the estimated ROC.
            for seq in 40_000..40_010u16 {
                let p = protected_rtp(&mut tx, &rtp(7, seq, b"history"));
                open_rtp(&mut rx, &p).unwrap();
            }
            let plain = rtp_with_ext(7, 40_010, b"the packet under attack");
            let p = protected_rtp(&mut tx, &plain);
            for bit in 0..p.len() * 8 {
                let mut bad = p.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(open_rtp(&mut rx, &bad), Err(SrtpError::BadTag), "bit {bit}");
            }
            // Nothing moved: the genuine packet and its successor pass.
            assert_eq!(open_rtp(&mut rx, &p).unwrap(), plain);
            let next = rtp(7, 40_011, b"next");
            assert_eq!(
                open_rtp(&mut rx, &protected_rtp(&mut tx, &next)).unwrap(),
                next
            );

            let plain = rtcp(7, b"rtcp under attack");
            let mut c = plain.clone();
            tx.protect_rtcp(&mut c).unwrap();
            for bit in 0..c.len() * 8 {
                let mut bad = c.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(
                    open_rtcp(&mut rx, &bad),
                    Err(SrtpError::BadTag),
                    "bit {bit}"
                );
            }
            assert_eq!(open_rtcp(&mut rx, &c).unwrap(), plain);
        }
    }

    #[test]
    fn forged_jump_does_not_move_the_window() {
        let (mut tx, mut rx) = pair(SrtpProfile::Aes128CmHmacSha1_80);
        for seq in 0..10u16 {
            open_rtp(&mut rx, &protected_rtp(&mut tx, &rtp(3, seq, b"x"))).unwrap();
        }
        // A forgery far ahead (it would bump the ROC if accepted).
        let mut forged = protected_rtp(
            &mut SrtpContext::new(SrtpProfile::Aes128CmHmacSha1_80, &[9; 16], &[9; 14]),
            &rtp(3, 60_000, b"x"),
        );
        assert_eq!(open_rtp(&mut rx, &forged), Err(SrtpError::BadTag));
        forged.truncate(4);
        assert_eq!(open_rtp(&mut rx, &forged), Err(SrtpError::TooShort));
        let p = protected_rtp(&mut tx, &rtp(3, 10, b"x"));
        assert_eq!(open_rtp(&mut rx, &p).unwrap(), rtp(3, 10, b"x"));
    }

    #[test]
    fn replay_reorder_and_window() {
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            let packets: Vec<Vec<u8>> = (0..400u16)
                .map(|seq| protected_rtp(&mut tx, &rtp(9, seq, &seq.to_be_bytes())))
                .collect();
            // In order, then every packet again.
            for p in &packets[..10] {
                open_rtp(&mut rx, p).unwrap();
            }
            for p in &packets[..10] {
                assert_eq!(open_rtp(&mut rx, p), Err(SrtpError::Replayed));
            }
            // Reordered within the window: 10..100 delivered back to front.
            for p in packets[10..100].iter().rev() {
                open_rtp(&mut rx, p).unwrap();
            }
            for p in &packets[10..100] {
                assert_eq!(open_rtp(&mut rx, p), Err(SrtpError::Replayed));
            }
            // A gap: 101..=300 arrive, 100 is late. Highest is 300.
            for p in &packets[101..=300] {
                open_rtp(&mut rx, p).unwrap();
            }
            // 173 is 127 behind: inside the window, already seen.
            assert_eq!(open_rtp(&mut rx, &packets[173]), Err(SrtpError::Replayed));
            // 172 is 128 behind: outside.
            assert_eq!(open_rtp(&mut rx, &packets[172]), Err(SrtpError::TooOld));
            assert_eq!(open_rtp(&mut rx, &packets[100]), Err(SrtpError::TooOld));
            // A hole near the top of the window is still fillable.
            let mut rx2 = pair(profile).1;
            for (i, p) in packets[200..=330].iter().enumerate() {
                if i != 3 {
                    open_rtp(&mut rx2, p).unwrap();
                }
            }
            assert!(open_rtp(&mut rx2, &packets[203]).is_ok());
            assert_eq!(open_rtp(&mut rx2, &packets[203]), Err(SrtpError::Replayed));
        }
    }

    #[test]
    fn rtcp_replay_window() {
        let (mut tx, mut rx) = pair(SrtpProfile::Aes128CmHmacSha1_80);
        let packets: Vec<Vec<u8>> = (0..300u32)
            .map(|i| {
                let mut p = rtcp(4, &i.to_be_bytes());
                tx.protect_rtcp(&mut p).unwrap();
                p
            })
            .collect();
        for p in packets[..50].iter().rev() {
            open_rtcp(&mut rx, p).unwrap();
        }
        assert_eq!(open_rtcp(&mut rx, &packets[7]), Err(SrtpError::Replayed));
        open_rtcp(&mut rx, &packets[299]).unwrap();
        assert_eq!(open_rtcp(&mut rx, &packets[171]), Err(SrtpError::TooOld));
        open_rtcp(&mut rx, &packets[172]).unwrap();
        assert_eq!(open_rtcp(&mut rx, &packets[172]), Err(SrtpError::Replayed));
    }

    #[test]
    fn a_packet_marked_received_is_refused_as_a_replay() {
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            let packets: Vec<Vec<u8>> = (100..104u16)
                .map(|seq| protected_rtp(&mut tx, &rtp(5, seq, &[1; 20])))
                .collect();
            assert_eq!(
                rx.mark_received(5, 101),
                Err(SrtpError::TooOld),
                "unknown SSRC"
            );
            open_rtp(&mut rx, &packets[0]).unwrap();
            open_rtp(&mut rx, &packets[2]).unwrap();
            // 101 was rebuilt (FEC): its retransmission is a replay.
            rx.mark_received(5, 101).unwrap();
            assert_eq!(rx.mark_received(5, 101), Err(SrtpError::Replayed));
            assert_eq!(open_rtp(&mut rx, &packets[1]), Err(SrtpError::Replayed));
            // Ahead of the highest works too, and moves the window.
            rx.mark_received(5, 103).unwrap();
            assert_eq!(open_rtp(&mut rx, &packets[3]), Err(SrtpError::Replayed));
        }
    }

    #[test]
    fn retransmission_gets_the_original_index() {
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            let plains: Vec<Vec<u8>> = (1000..1020u16)
                .map(|seq| rtp(5, seq, &[seq as u8; 50]))
                .collect();
            let originals: Vec<Vec<u8>> =
                plains.iter().map(|p| protected_rtp(&mut tx, p)).collect();
            // The receiver lost 1005 but got 1006.
            for (i, p) in originals.iter().enumerate() {
                if i != 5 && i != 6 {
                    open_rtp(&mut rx, p).unwrap();
                }
            }
            // Retransmissions, protected after newer packets: byte for byte
            // the originals.
            let rtx5 = protected_rtp(&mut tx, &plains[5]);
            assert_eq!(rtx5, originals[5]);
            assert_eq!(open_rtp(&mut rx, &rtx5).unwrap(), plains[5]);
            assert_eq!(open_rtp(&mut rx, &rtx5), Err(SrtpError::Replayed));
            open_rtp(&mut rx, &originals[6]).unwrap();
            let rtx6 = protected_rtp(&mut tx, &plains[6]);
            assert_eq!(open_rtp(&mut rx, &rtx6), Err(SrtpError::Replayed));
            // The sender's highest index did not go back.
            let next = rtp(5, 1020, b"next");
            assert_eq!(
                open_rtp(&mut rx, &protected_rtp(&mut tx, &next)).unwrap(),
                next
            );
        }
    }

    #[test]
    fn sequence_wrap_and_retransmission_across_it() {
        let (mut tx, mut rx) = pair(SrtpProfile::Aes128CmHmacSha1_80);
        // 70,000 packets, indices 61,122..=131,121: through two wraps, the
        // last 50 packets after the second.
        const START: u64 = 131_072 + 50 - 70_000;
        const LOST: u64 = 131_072 - 20; // ROC 1, seq 65,516: before the wrap
        let mut packet = Vec::with_capacity(64);
        let mut scratch = Vec::with_capacity(64);
        let mut lost = None;
        for index in START..START + 70_000 {
            let seq = (index & 0xffff) as u16;
            packet.clear();
            packet.extend_from_slice(&rtp(0xfeed, seq, &index.to_be_bytes()));
            tx.protect_rtp(&mut packet).unwrap();
            if index == LOST {
                lost = Some(packet.clone());
                continue;
            }
            let r = rx.unprotect_rtp(&packet, &mut scratch).unwrap();
            assert_eq!(r, Unprotected::Decrypted);
            assert_eq!(scratch[12..], index.to_be_bytes(), "index {index}");
        }
        assert_eq!(rx.received[&0xfeed].highest, START + 69_999);
        assert_eq!(tx.sent[&0xfeed], START + 69_999);
        // The retransmission, protected after the wrap, is the original.
        let rtx = protected_rtp(&mut tx, &rtp(0xfeed, 65_516, &LOST.to_be_bytes()));
        assert_eq!(Some(&rtx), lost.as_ref());
        assert_eq!(
            open_rtp(&mut rx, &rtx).unwrap(),
            rtp(0xfeed, 65_516, &LOST.to_be_bytes())
        );
        assert_eq!(open_rtp(&mut rx, &rtx), Err(SrtpError::Replayed));
        assert_eq!(tx.sent[&0xfeed], START + 69_999);
    }

    #[test]
    fn index_estimation() {
        // RFC 3711 3.3.1, around both ends of the sequence space.
        assert_eq!(estimate_index(65_535, 0), Ok(65_536));
        assert_eq!(estimate_index(65_536, 65_535), Ok(65_535));
        assert_eq!(estimate_index(65_536 + 10, 65_000), Ok(65_000));
        assert_eq!(estimate_index(65_536 + 40_000, 5), Ok(131_072 + 5));
        assert_eq!(estimate_index(100, 200), Ok(200));
        // Before ROC 0 there is nothing: placed at ROC 0.
        assert_eq!(estimate_index(100, 65_000), Ok(65_000));
        assert_eq!(estimate_index(MAX_INDEX, 0), Err(SrtpError::IndexExhausted));
        let mut w = ReplayWindow::new(1000);
        w.accept(1000 + 500);
        assert_eq!(w.check(1000 + 500 - 127), Ok(()));
        assert_eq!(w.check(1000 + 500 - 128), Err(SrtpError::TooOld));
        assert_eq!(w.check(1000), Err(SrtpError::TooOld));
        assert_eq!(w.check(1000 + 500), Err(SrtpError::Replayed));
    }

    #[test]
    fn srtcp_index_exhaustion() {
        let (mut tx, _) = pair(SrtpProfile::NullHmacSha1_80);
        tx.rtcp_next = MAX_SRTCP_INDEX;
        let mut p = rtcp(1, b"last");
        tx.protect_rtcp(&mut p).unwrap();
        let mut q = rtcp(1, b"one too many");
        assert_eq!(tx.protect_rtcp(&mut q), Err(SrtpError::IndexExhausted));
        assert_eq!(q, rtcp(1, b"one too many"));
    }

    #[test]
    fn malformed_input_is_an_error() {
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            let mut scratch = Vec::new();
            let cases = [
                (vec![], SrtpError::TooShort),
                (vec![0x80; 11], SrtpError::TooShort),
                (first_byte(rtp(1, 1, b"v1"), 0x40), SrtpError::BadVersion),
                // Four CSRCs claimed, two present.
                (first_byte(rtp(1, 1, &[0; 8]), 0x84), SrtpError::TooShort),
                // Extension header cut off.
                (
                    first_byte(rtp(1, 1, &[0xbe, 0xde]), 0x90),
                    SrtpError::TooShort,
                ),
                // Extension longer than the packet.
                (
                    first_byte(rtp(1, 1, &[0xbe, 0xde, 0, 9, 0, 0, 0, 0]), 0x90),
                    SrtpError::TooShort,
                ),
            ];
            for (packet, err) in cases {
                let mut p = packet.clone();
                assert_eq!(tx.protect_rtp(&mut p), Err(err), "{packet:02x?}");
                assert_eq!(p, packet, "unchanged on error");
            }
            // Authentic (tagged with the right key) but malformed: refused
            // after authentication, without touching the replay window.
            for (packet, err) in [
                (first_byte(rtp(1, 1, &[0; 8]), 0x84), SrtpError::TooShort),
                (first_byte(rtp(1, 1, b"v1"), 0x40), SrtpError::BadVersion),
            ] {
                let mut p = packet;
                p.extend_from_slice(&tx.rtp.tag(&p, Some(0)));
                assert_eq!(rx.unprotect_rtp(&p, &mut scratch), Err(err));
                let mut p = first_byte(rtcp(1, b"x"), 0x40);
                let e_flag = if profile.encrypts() { SRTCP_E_FLAG } else { 0 };
                p.extend_from_slice(&e_flag.to_be_bytes());
                p.extend_from_slice(&tx.rtcp.tag(&p, None));
                assert_eq!(
                    rx.unprotect_rtcp(&p, &mut scratch),
                    Err(SrtpError::BadVersion)
                );
            }
            assert!(rx.received.is_empty() && rx.rtcp_received.is_none());

            let mut huge = rtp(1, 1, &vec![0; SRTP_MAX_PACKET_LEN]);
            assert_eq!(tx.protect_rtp(&mut huge), Err(SrtpError::TooLong));
            assert_eq!(
                rx.unprotect_rtp(&huge, &mut scratch),
                Err(SrtpError::TooLong)
            );
            assert_eq!(
                rx.unprotect_rtcp(&huge, &mut scratch),
                Err(SrtpError::TooLong)
            );

            let mut p = vec![0x80, 200, 0, 0, 1, 2, 3];
            assert_eq!(tx.protect_rtcp(&mut p), Err(SrtpError::TooShort));
            let mut p = vec![0x40, 200, 0, 0, 1, 2, 3, 4];
            assert_eq!(tx.protect_rtcp(&mut p), Err(SrtpError::BadVersion));
            // A valid RTCP packet without its trailer.
            assert_eq!(
                rx.unprotect_rtcp(&rtcp(1, &[0; 8]), &mut scratch),
                Err(SrtpError::TooShort)
            );
            assert_eq!(
                rx.unprotect_rtcp(&[0x80; 21], &mut scratch),
                Err(SrtpError::TooShort)
            );
            assert_eq!(
                rx.unprotect_rtcp(&[0x80; 22], &mut scratch),
                Err(SrtpError::BadTag)
            );
            assert_eq!(
                rx.unprotect_rtp(&[0x80; 21], &mut scratch),
                Err(SrtpError::TooShort)
            );
            assert_eq!(
                rx.unprotect_rtp(&[0x80; 22], &mut scratch),
                Err(SrtpError::BadTag)
            );
        }
    }

    #[test]
    fn random_and_truncated_input_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x5eed_5a7c);
        for profile in PROFILES {
            let (mut tx, mut rx) = pair(profile);
            let mut scratch = Vec::new();
            // Some state first, so estimation runs against a known SSRC too.
            let good = protected_rtp(&mut tx, &rtp_with_ext(0x0102_0304, 77, &[0x55; 100]));
            let mut good_rtcp = rtcp(0x0102_0304, &[0x66; 60]);
            tx.protect_rtcp(&mut good_rtcp).unwrap();

            for round in 0..4000 {
                let len = rng.random_range(0..200);
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf[..]);
                if round % 2 == 0 && len >= 12 {
                    // Mostly-valid headers for a known SSRC.
                    buf[0] = 0x80 | (buf[0] & 0x3f);
                    buf[8..12].copy_from_slice(&0x0102_0304u32.to_be_bytes());
                }
                assert!(rx.unprotect_rtp(&buf, &mut scratch).is_err());
                assert!(rx.unprotect_rtcp(&buf, &mut scratch).is_err());
                let mut p = buf.clone();
                let _ = tx.protect_rtp(&mut p);
                let mut p = buf;
                let _ = tx.protect_rtcp(&mut p);
            }
            for len in 0..good.len() {
                assert!(
                    rx.unprotect_rtp(&good[..len], &mut scratch).is_err(),
                    "len {len}"
                );
                assert!(rx.unprotect_rtcp(&good[..len], &mut scratch).is_err());
            }
            for len in 0..good_rtcp.len() {
                assert!(
                    rx.unprotect_rtcp(&good_rtcp[..len], &mut scratch).is_err(),
                    "len {len}"
                );
                assert!(rx.unprotect_rtp(&good_rtcp[..len], &mut scratch).is_err());
            }
            // The untouched packets still pass.
            rx.unprotect_rtp(&good, &mut scratch).unwrap();
            rx.unprotect_rtcp(&good_rtcp, &mut scratch).unwrap();
        }
    }

    #[test]
    fn steady_state_reuses_buffers() {
        let (mut tx, mut rx) = pair(SrtpProfile::Aes128CmHmacSha1_80);
        let mut packet = Vec::with_capacity(1500);
        let mut scratch = Vec::with_capacity(1500);
        let (packet_ptr, scratch_ptr) = (packet.as_ptr(), scratch.as_ptr());
        for seq in 0..1000u16 {
            packet.clear();
            packet.extend_from_slice(&rtp(42, seq, &[seq as u8; 1000]));
            tx.protect_rtp(&mut packet).unwrap();
            rx.unprotect_rtp(&packet, &mut scratch).unwrap();
            packet.clear();
            packet.extend_from_slice(&rtcp(42, &[seq as u8; 100]));
            tx.protect_rtcp(&mut packet).unwrap();
            rx.unprotect_rtcp(&packet, &mut scratch).unwrap();
        }
        assert_eq!(packet.as_ptr(), packet_ptr);
        assert_eq!(scratch.as_ptr(), scratch_ptr);
        assert_eq!(scratch.capacity(), 1500);
    }

    #[test]
    fn forget_ssrc_restarts_the_stream() {
        let (mut tx, mut rx) = pair(SrtpProfile::NullHmacSha1_80);
        let p = protected_rtp(&mut tx, &rtp(8, 5, b"a"));
        open_rtp(&mut rx, &p).unwrap();
        rx.forget_ssrc(8);
        tx.forget_ssrc(8);
        assert_eq!(open_rtp(&mut rx, &p).unwrap(), rtp(8, 5, b"a"));
        assert!(format!("{rx:?}").contains("NullHmacSha1_80"));
    }

    /// The SipHash profile's tag is exactly the documented construction
    /// (what the XDP program computes): checked against SipHash-2-4-128's
    /// reference vector first, then against the packet layout.
    #[test]
    fn siphash_tag_is_the_documented_construction() {
        // Reference vector (SipHash-2-4-128, key 00..0f, empty message).
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let h = SipHasher24::new_with_key(&key).finish128().as_bytes();
        assert_eq!(h, array::<16>("a3817f04ba25a8e66df67214c7550293"));

        let (mk, ms) = mesh_master_key(&[9; 32], "a", "b");
        let mut tx = SrtpContext::new(SrtpProfile::NullSipHash24_80, &mk, &ms);
        let key = tx.rtp_siphash_key().unwrap();
        // ROC 0, then ROC 1 after a wrap.
        for (seq, roc) in [(65_535u16, 0u32), (2, 1)] {
            let plain = rtp(3, seq, b"siphash payload");
            let p = protected_rtp(&mut tx, &plain);
            let mut msg = roc.to_be_bytes().to_vec();
            msg.extend_from_slice(&[0; 4]);
            msg.extend_from_slice(&plain);
            let full = SipHasher24::new_with_key(&key).hash(&msg).as_bytes();
            assert_eq!(&p[plain.len()..], &full[..10], "seq {seq}");
            assert_eq!(siphash_tag(&key, roc, &plain)[..], full[..10]);
        }
        // SRTCP keeps HMAC-SHA1: an HMAC context with the same keys opens it.
        let mut hmac_rx = SrtpContext::new(SrtpProfile::NullHmacSha1_80, &mk, &ms);
        let mut c = rtcp(3, b"report");
        tx.protect_rtcp(&mut c).unwrap();
        assert_eq!(open_rtcp(&mut hmac_rx, &c).unwrap(), rtcp(3, b"report"));
        // But its SRTP does not open an HMAC receiver.
        let p = protected_rtp(&mut tx, &rtp(3, 3, b"x"));
        assert_eq!(open_rtp(&mut hmac_rx, &p), Err(SrtpError::BadTag));
    }

    /// Indices the kernel accepted or sent move a context on, so it places
    /// later sequence numbers (across wraps) where the kernel did.
    #[test]
    fn advancing_catches_a_context_up_with_the_kernel() {
        let (mut tx, mut rx) = pair(SrtpProfile::NullSipHash24_80);
        let p = protected_rtp(&mut tx, &rtp(5, 100, b"first"));
        open_rtp(&mut rx, &p).unwrap();
        // The kernel forwarded 3 wraps' worth meanwhile, signing as it went.
        let far = (3u64 << 16) | 40_000;
        let key = tx.rtp_siphash_key().unwrap();
        let mut p = rtp(5, 40_001, b"after");
        p.extend_from_slice(&siphash_tag(&key, 3, &p.clone()));
        assert_eq!(open_rtp(&mut rx, &p), Err(SrtpError::BadTag));
        rx.advance_received(5, far);
        assert_eq!(rx.highest_received(5), Some(far));
        assert_eq!(open_rtp(&mut rx, &p).unwrap(), rtp(5, 40_001, b"after"));
        // Behind the window: no change.
        rx.advance_received(5, 7);
        assert_eq!(rx.highest_received(5), Some(far + 1));
        // The sender places its next packet at ROC 3 too.
        tx.advance_sent(5, far);
        assert_eq!(tx.highest_sent(5), Some(far));
        let p = protected_rtp(&mut tx, &rtp(5, 40_002, b"next"));
        assert_eq!(open_rtp(&mut rx, &p).unwrap(), rtp(5, 40_002, b"next"));
        tx.advance_sent(5, 1);
        assert_eq!(tx.highest_sent(5), Some(far + 2));
        // Never past the 48-bit index space.
        tx.advance_sent(5, MAX_INDEX + 1);
        assert_eq!(tx.highest_sent(5), Some(far + 2));
    }

    /// A packet protected in two pieces gets the tag the whole packet
    /// would, under every non-encrypting profile and across a wrap; the
    /// AES profile refuses.
    #[test]
    fn protecting_in_parts_equals_protecting_the_whole() {
        for profile in [SrtpProfile::NullHmacSha1_80, SrtpProfile::NullSipHash24_80] {
            let (mut whole, mut rx) = pair(profile);
            let (mut parts, _) = pair(profile);
            // The last one is a retransmission from before the wrap.
            for (i, seq) in [65_534u16, 65_535, 0, 1, 65_535].into_iter().enumerate() {
                let plain = rtp_with_ext(9, seq, b"a shared payload");
                let p = protected_rtp(&mut whole, &plain);
                let split = rtp_header_len(&plain).unwrap();
                let tag = parts
                    .protect_rtp_parts(&plain[..split], &plain[split..])
                    .unwrap();
                assert_eq!(&p[plain.len()..], &tag[..], "{profile:?} seq {seq}");
                if i < 4 {
                    assert_eq!(open_rtp(&mut rx, &p).unwrap(), plain);
                }
            }
            assert_eq!(parts.highest_sent(9), whole.highest_sent(9));
        }
        let (mut aes, _) = pair(SrtpProfile::Aes128CmHmacSha1_80);
        let plain = rtp(9, 1, b"x");
        assert_eq!(
            aes.protect_rtp_parts(&plain[..12], &plain[12..]),
            Err(SrtpError::Encrypts)
        );
    }
}
