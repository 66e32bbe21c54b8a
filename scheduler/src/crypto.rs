//! Secrets, hashes, signatures and the two kinds of JWT the scheduler signs:
//! node tokens (its own credential for agents) and dataplane access tokens
//! (signed with a node's dataplane secret, in the claim format of
//! `dataplane/src/api/auth.rs`).

use aws_lc_rs::{digest, hmac, signature};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// `typ` claim of node tokens.
pub const NODE_TOKEN_TYP: &str = "ridge-node";
/// Prefix of bootstrap tokens.
pub const BOOTSTRAP_PREFIX: &str = "rbt_";

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    hex(&b)
}

/// `n` random bytes, base64url without padding.
pub fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    URL_SAFE_NO_PAD.encode(b)
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    // A table, not `write!`: the leader derives tens of thousands of link
    // keys per tick.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0x0f)]));
    }
    s
}

/// SHA-256 as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

/// Equality that takes the same time wherever the inputs differ: both sides
/// are hashed first, so lengths leak nothing either.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let ha = digest::digest(&digest::SHA256, a);
    let hb = digest::digest(&digest::SHA256, b);
    ha.as_ref()
        .iter()
        .zip(hb.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A bootstrap token split into its id and secret part.
pub fn split_bootstrap(token: &str) -> Option<(&str, &str)> {
    let rest = token.trim().strip_prefix(BOOTSTRAP_PREFIX)?;
    let (id, secret) = rest.split_once('.')?;
    (id.starts_with("bt-") && !secret.is_empty()).then_some((id, secret))
}

/// The message an enrollment proof signs.
pub fn enroll_message(bootstrap_token: &str, public_key_b64: &str) -> Vec<u8> {
    format!("ridge-enroll-v1\n{bootstrap_token}\n{public_key_b64}").into_bytes()
}

/// Why a key or proof was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{0}")]
    BadKey(String),
    #[error("{0}")]
    BadProof(String),
}

/// Checks the public key's encoding and that `proof_b64` is its signature
/// over `message`.
pub fn verify_proof(
    alg: &str,
    key_b64: &str,
    message: &[u8],
    proof_b64: &str,
) -> Result<(), KeyError> {
    let key = STANDARD
        .decode(key_b64.trim())
        .map_err(|_| KeyError::BadKey("public_key.key is not standard base64".into()))?;
    let verifier: &dyn signature::VerificationAlgorithm = match alg {
        "ed25519" => {
            if key.len() != 32 {
                return Err(KeyError::BadKey(format!(
                    "an Ed25519 public key is 32 bytes, got {}",
                    key.len()
                )));
            }
            &signature::ED25519
        }
        "p256" => {
            if key.len() != 65 || key[0] != 4 {
                return Err(KeyError::BadKey(
                    "a P-256 public key is a 65-byte uncompressed point (0x04‖X‖Y)".into(),
                ));
            }
            &signature::ECDSA_P256_SHA256_FIXED
        }
        other => {
            return Err(KeyError::BadKey(format!(
                "public_key.alg `{}` is not supported (ed25519 or p256)",
                other.chars().take(32).collect::<String>()
            )));
        }
    };
    let sig = STANDARD
        .decode(proof_b64.trim())
        .map_err(|_| KeyError::BadProof("proof is not standard base64".into()))?;
    signature::UnparsedPublicKey::new(verifier, &key)
        .verify(message, &sig)
        .map_err(|_| {
            // A P-256 point off the curve also fails here; say which.
            if alg == "p256" && !p256_point_valid(&key) {
                KeyError::BadKey("public_key.key is not a point on P-256".into())
            } else {
                KeyError::BadProof(
                    "proof is not a valid signature of the enrollment message by public_key".into(),
                )
            }
        })
}

fn p256_point_valid(key: &[u8]) -> bool {
    use aws_lc_rs::agreement;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let Ok(mine) = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng) else {
        return false;
    };
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, key);
    agreement::agree_ephemeral(mine, peer, (), |_| Ok(())).is_ok()
}

/// The per-link key both ends of a mesh link get: HMAC-SHA256 over the
/// ordered pair of node ids with the scheduler's mesh key.
pub fn link_key(mesh_key: &str, a: &str, b: &str) -> String {
    LinkKeys::new(mesh_key).key(a, b)
}

/// [`link_key`] with the HMAC key prepared once (deriving many keys).
#[derive(Debug)]
pub struct LinkKeys(hmac::Key);

impl LinkKeys {
    /// From the mesh key.
    pub fn new(mesh_key: &str) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, mesh_key.as_bytes()))
    }

    /// The key of the link between `a` and `b` (order does not matter).
    pub fn key(&self, a: &str, b: &str) -> String {
        let (x, y) = if a <= b { (a, b) } else { (b, a) };
        hex(hmac::sign(&self.0, format!("ridge-link-v1:{x}:{y}").as_bytes()).as_ref())
    }
}

/// Claims of a node token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeClaims {
    pub typ: String,
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
}

/// Why a node token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeTokenError {
    #[error("node token expired")]
    Expired,
    #[error("{0}")]
    Invalid(&'static str),
}

/// Signs and verifies node tokens (HS256).
pub struct NodeTokenKey {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for NodeTokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTokenKey(<redacted>)")
    }
}

impl NodeTokenKey {
    /// From the key stored in the database.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 5;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// A token for `node_id`, valid `ttl_secs` from `now`.
    pub fn sign(&self, node_id: &str, now: u64, ttl_secs: u64) -> String {
        let claims = NodeClaims {
            typ: NODE_TOKEN_TYP.to_owned(),
            sub: node_id.to_owned(),
            iat: now,
            exp: now + ttl_secs,
        };
        // Encoding HS256 claims of plain strings and integers cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc).unwrap_or_default()
    }

    /// Verifies signature, algorithm, `exp` and `typ`; returns the node id.
    pub fn verify(&self, token: &str) -> Result<String, NodeTokenError> {
        if token.len() > 4096 {
            return Err(NodeTokenError::Invalid("credential too long"));
        }
        let data = jsonwebtoken::decode::<NodeClaims>(token, &self.dec, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => NodeTokenError::Expired,
                ErrorKind::InvalidSignature => {
                    NodeTokenError::Invalid("credential signature does not match")
                }
                _ => NodeTokenError::Invalid("credential is not a valid node token"),
            },
        )?;
        if data.claims.typ != NODE_TOKEN_TYP {
            return Err(NodeTokenError::Invalid("credential is not a node token"));
        }
        Ok(data.claims.sub)
    }
}

/// The dataplane's access-token claims (`dataplane/src/api/auth.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    pub room: String,
    pub sub: String,
    pub can_publish: bool,
    pub can_subscribe: bool,
    pub admin: bool,
    pub exp: u64,
    pub iat: u64,
}

/// Signs a dataplane access token with a node's dataplane secret (its UTF-8
/// bytes are the HS256 key, as the dataplane's `jwt_secret`).
pub fn sign_access(secret: &str, claims: &AccessClaims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn ed25519_and_p256_proofs() {
        let kp = Ed25519KeyPair::generate().unwrap();
        let key = STANDARD.encode(kp.public_key().as_ref());
        let msg = enroll_message("rbt_bt-1.x", &key);
        let sig = STANDARD.encode(kp.sign(&msg).as_ref());
        assert_eq!(verify_proof("ed25519", &key, &msg, &sig), Ok(()));
        let other = enroll_message("rbt_bt-2.x", &key);
        assert!(matches!(
            verify_proof("ed25519", &key, &other, &sig),
            Err(KeyError::BadProof(_))
        ));
        assert!(matches!(
            verify_proof("ed25519", "AAAA", &msg, &sig),
            Err(KeyError::BadKey(_))
        ));
        assert!(matches!(
            verify_proof("rsa", &key, &msg, &sig),
            Err(KeyError::BadKey(_))
        ));

        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let kp =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                .unwrap();
        let key = STANDARD.encode(kp.public_key().as_ref());
        let msg = enroll_message("t", &key);
        let sig = STANDARD.encode(kp.sign(&rng, &msg).unwrap().as_ref());
        assert_eq!(verify_proof("p256", &key, &msg, &sig), Ok(()));
        let mut bad = kp.public_key().as_ref().to_vec();
        bad[10] ^= 1;
        let bad = STANDARD.encode(bad);
        assert!(matches!(
            verify_proof("p256", &bad, &enroll_message("t", &bad), &sig),
            Err(KeyError::BadKey(_))
        ));
    }

    #[test]
    fn node_tokens() {
        let k = NodeTokenKey::new("k1k1k1k1k1k1k1k1");
        let t = k.sign("n-1", 1_000, 60);
        // Validation uses the real clock: a token from 1970 is expired.
        assert_eq!(k.verify(&t), Err(NodeTokenError::Expired));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = k.sign("n-1", now, 60);
        assert_eq!(k.verify(&t).as_deref(), Ok("n-1"));
        let other = NodeTokenKey::new("k2k2k2k2k2k2k2k2");
        assert!(matches!(other.verify(&t), Err(NodeTokenError::Invalid(_))));
        assert!(k.verify("garbage").is_err());
    }

    #[test]
    fn bootstrap_split_and_link_keys() {
        assert_eq!(split_bootstrap("rbt_bt-12.abc"), Some(("bt-12", "abc")));
        assert_eq!(split_bootstrap("bt-12.abc"), None);
        assert_eq!(split_bootstrap("rbt_bt-12."), None);
        assert_eq!(link_key("m", "a", "b"), link_key("m", "b", "a"));
        assert_ne!(link_key("m", "a", "b"), link_key("m", "a", "c"));
        assert_eq!(link_key("m", "a", "b").len(), 64);
        assert!(ct_eq(b"x", b"x") && !ct_eq(b"x", b"y"));
    }
}
