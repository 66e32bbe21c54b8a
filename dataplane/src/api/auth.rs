//! Access tokens: HS256 JWTs signed with the node's secret (see `docs/api.md`).
//!
//! [`Authenticator`] extracts a token from a request (`Authorization: Bearer`
//! header, else the `token` query parameter), verifies it and returns its
//! [`Claims`]; [`Authenticator::authorize`] checks the room and grant for an
//! operation. [`mint`] signs new tokens (the `token` subcommand).
//!
//! Error messages never contain the token or the secret.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Secret};

/// Clock skew tolerated when checking `exp`, in seconds.
pub const LEEWAY_SECS: u64 = 5;
/// Longest token accepted; anything larger is rejected before decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Identity given to every request when authentication is disabled.
pub const DEV_IDENTITY: &str = "dev";
/// The room claim that admits to every room.
pub const ANY_ROOM: &str = "*";
/// `exp` of the claims handed out when authentication is disabled (2100-01-01).
const DEV_EXP: u64 = 4_102_444_800;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// The room the token admits to; `"*"` admits to every room.
    pub room: String,
    /// The participant's identity.
    pub sub: String,
    /// May publish media.
    #[serde(default)]
    pub can_publish: bool,
    /// May receive media.
    #[serde(default)]
    pub can_subscribe: bool,
    /// May read `/metrics` and `/healthz`.
    #[serde(default)]
    pub admin: bool,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
    /// The token's id: the key its sessions are counted under. Without
    /// one, a digest of the claims names the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The token's own limits; each only tightens the node's per-token
    /// limit (docs/api.md, "Limits").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ClaimLimits>,
    /// The codecs this token's sessions negotiate, in order of preference
    /// (`["h264","opus"]`); each must be one the node allows, and the
    /// room's own list still applies (docs/api.md, "Codecs").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codecs: Option<Vec<ridge_sfu::CodecSpec>>,
}

/// The `limits` claim: at most this many, for this token (absent: the
/// node's limit).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClaimLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracks: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtp_endpoints: Option<usize>,
}

impl Claims {
    /// The key this token's sessions are counted under: `jti:` and its
    /// `jti`, or `sha256:` and a digest of the claims (two tokens with the
    /// same claims, down to the second they were issued, count as one).
    pub fn token_key(&self) -> String {
        if let Some(jti) = &self.jti {
            return format!("jti:{jti}");
        }
        use sha2::Digest;
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = sha2::Sha256::digest(&bytes);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    /// Whom this token's sessions are charged to: its identity and token,
    /// with the token's own limits. Admin tokens are exempt from the
    /// per-identity and per-token limits (never from the node's).
    pub fn owner(&self) -> ridge_sfu::Owner {
        let l = self.limits.unwrap_or_default();
        let cap = |v: Option<usize>| v.unwrap_or(usize::MAX);
        ridge_sfu::Owner::identity(&self.sub)
            .with_token(self.token_key())
            .with_token_limits(ridge_sfu::QuotaLimits {
                sessions: cap(l.sessions),
                rooms: cap(l.rooms),
                tracks: cap(l.tracks),
                rtp_endpoints: cap(l.rtp_endpoints),
            })
            .exempt(self.admin)
            .with_codecs(self.codecs.clone())
    }
}

impl Claims {
    /// Whether the token admits to `room`.
    pub fn admits_room(&self, room: &str) -> bool {
        self.room == room || self.room == ANY_ROOM
    }

    fn dev() -> Self {
        Self {
            room: ANY_ROOM.to_owned(),
            sub: DEV_IDENTITY.to_owned(),
            can_publish: true,
            can_subscribe: true,
            admin: true,
            exp: DEV_EXP,
            iat: 0,
            jti: None,
            limits: None,
            codecs: None,
        }
    }
}

/// The permission an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `can_publish`.
    Publish,
    /// `can_subscribe`.
    Subscribe,
    /// `can_publish` or `can_subscribe` (e.g. joining a room).
    Either,
    /// `admin`.
    Admin,
}

impl Grant {
    /// The claim(s) this grant is checked against.
    pub fn claim(self) -> &'static str {
        match self {
            Self::Publish => "can_publish",
            Self::Subscribe => "can_subscribe",
            Self::Either => "can_publish or can_subscribe",
            Self::Admin => "admin",
        }
    }
}

/// Verifies access tokens. Cheap to clone. `Debug` never shows the key.
#[derive(Clone)]
pub struct Authenticator {
    /// Shared by every clone, so that a key rotated through the control API
    /// ([`Authenticator::rotate`]) is seen by every handler at once.
    mode: Arc<RwLock<Mode>>,
}

#[derive(Clone)]
enum Mode {
    /// Verify HS256 tokens with this key.
    Verify(Arc<Verifier>),
    /// `dev_no_auth`: every request is admitted.
    Disabled,
    /// Authentication is on but no secret was given: reject everything.
    NoSecret,
}

struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match *self.mode() {
            Mode::Verify(_) => "hs256",
            Mode::Disabled => "disabled (dev_no_auth)",
            Mode::NoSecret => "no secret (rejects all)",
        };
        f.debug_struct("Authenticator")
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// With `dev_no_auth`, every request is admitted with claims for room `"*"`,
    /// identity `"dev"` and all grants. Otherwise tokens are verified with
    /// `secret`; without one (which a validated [`Config`] rules out) every
    /// token is rejected.
    pub fn new(secret: Option<&Secret>, dev_no_auth: bool) -> Self {
        let mode = match (dev_no_auth, secret) {
            (true, _) => Mode::Disabled,
            (false, Some(secret)) => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.algorithms = vec![Algorithm::HS256];
                validation.leeway = LEEWAY_SECS;
                validation.validate_exp = true;
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp"]);
                Mode::Verify(Arc::new(Verifier {
                    key: DecodingKey::from_secret(secret.expose().as_bytes()),
                    validation,
                }))
            }
            (false, None) => Mode::NoSecret,
        };
        Self {
            mode: Arc::new(RwLock::new(mode)),
        }
    }

    fn mode(&self) -> std::sync::RwLockReadGuard<'_, Mode> {
        // A poisoned lock only means a writer panicked between two plain
        // assignments; the value is still whole.
        self.mode.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the HS256 key (the scheduler's `dataplane_secret`, applied
    /// through the control API). Tokens signed with the previous key are
    /// refused from now on. With `dev_no_auth` nothing changes and this
    /// returns `false`.
    pub fn rotate(&self, secret: &Secret) -> bool {
        let mut mode = self.mode.write().unwrap_or_else(|e| e.into_inner());
        if matches!(*mode, Mode::Disabled) {
            return false;
        }
        let fresh = Self::new(Some(secret), false);
        let fresh = fresh.mode().clone();
        *mode = fresh;
        true
    }

    /// From a validated configuration.
    pub fn from_config(config: &Config) -> Self {
        Self::new(config.jwt_secret.as_ref(), config.dev_no_auth)
    }

    /// Whether authentication is disabled (`dev_no_auth`).
    pub fn disabled(&self) -> bool {
        matches!(*self.mode(), Mode::Disabled)
    }

    /// Extracts the token from `Authorization: Bearer ...` or, failing that,
    /// the `token` query parameter (percent-decoded), then verifies signature
    /// and `exp` (leeway 5 s). `query` is the raw query string, with or without
    /// the leading `?`.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Claims, AuthError> {
        if self.disabled() {
            return Ok(Claims::dev());
        }
        let token = bearer_token(headers)
            .map(str::to_owned)
            .or_else(|| query.and_then(query_token))
            .ok_or(AuthError::Missing)?;
        self.verify(&token)
    }

    /// Verifies a token (HS256 only) and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let verifier = match &*self.mode() {
            Mode::Disabled => return Ok(Claims::dev()),
            Mode::NoSecret => {
                return Err(AuthError::Invalid(
                    "this node has no token secret configured".to_owned(),
                ));
            }
            Mode::Verify(v) => v.clone(),
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Invalid(format!(
                "token longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        // Check the header first so that `alg: none` and other algorithms get a
        // precise message (jsonwebtoken would reject them too).
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) => AuthError::Invalid(
                "unsupported or malformed token header (only HS256 tokens are accepted)".to_owned(),
            ),
            _ => map_jwt_error(&e),
        })?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted (only HS256)",
                header.alg
            )));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map_err(|e| map_jwt_error(&e))?;
        let claims = data.claims;
        if claims.room.is_empty() {
            return Err(AuthError::Invalid("empty `room` claim".to_owned()));
        }
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty `sub` claim".to_owned()));
        }
        Ok(claims)
    }

    /// Checks that `claims` admit to `room` (when given) and carry the grant
    /// `need`. Another room gives [`AuthError::WrongRoom`], a missing grant
    /// [`AuthError::Forbidden`].
    pub fn authorize(claims: &Claims, room: Option<&str>, need: Grant) -> Result<(), AuthError> {
        if let Some(room) = room
            && !claims.admits_room(room)
        {
            return Err(AuthError::WrongRoom {
                room: room.to_owned(),
            });
        }
        let granted = match need {
            Grant::Publish => claims.can_publish,
            Grant::Subscribe => claims.can_subscribe,
            Grant::Either => claims.can_publish || claims.can_subscribe,
            Grant::Admin => claims.admin,
        };
        if granted {
            Ok(())
        } else {
            Err(AuthError::Forbidden(need.claim()))
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme matched
/// case-insensitively), if any.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers.get_all(AUTHORIZATION).iter().find_map(|value| {
        let value = value.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    })
}

/// The first non-empty `token` parameter of a query string, percent-decoded.
fn query_token(query: &str) -> Option<String> {
    let query = query.strip_prefix('?').unwrap_or(query);
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key) != "token" {
            return None;
        }
        let value = percent_decode(value);
        (!value.is_empty()).then_some(value)
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte;
/// malformed escapes are kept literally.
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let pair = bytes
                    .get(i + 1)
                    .and_then(|&h| hex(h))
                    .zip(bytes.get(i + 2).and_then(|&l| hex(l)));
                if let Some((h, l)) = pair {
                    out.push(h << 4 | l);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn map_jwt_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    let reason = match e.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::InvalidToken => "malformed token (expected three base64url parts)".to_owned(),
        ErrorKind::Base64(_) => "malformed token (bad base64url)".to_owned(),
        ErrorKind::Utf8(_) => "malformed token (not UTF-8)".to_owned(),
        ErrorKind::InvalidSignature => "signature does not match".to_owned(),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "algorithm not accepted (only HS256)".to_owned()
        }
        ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed `{claim}` claim"),
        ErrorKind::Json(err) => {
            // serde's "missing field `room`" is useful; other messages may echo
            // claim values, so keep them generic.
            let msg = err.to_string();
            match msg.split_once(" at line") {
                Some((head, _)) if head.starts_with("missing field") => {
                    format!("claims: {head}")
                }
                _ => "claims have the wrong shape".to_owned(),
            }
        }
        _ => "token rejected".to_owned(),
    };
    AuthError::Invalid(reason)
}

/// Signs a token for `room` and `identity` with the given grants, valid for
/// `ttl` from `now_unix` (seconds since the epoch).
#[expect(
    clippy::too_many_arguments,
    reason = "mirrors the token claims one to one"
)]
pub fn mint(
    secret: &Secret,
    room: &str,
    identity: &str,
    can_publish: bool,
    can_subscribe: bool,
    admin: bool,
    ttl: Duration,
    now_unix: u64,
) -> Result<String, AuthError> {
    if room.is_empty() {
        return Err(AuthError::Invalid("room must not be empty".to_owned()));
    }
    if identity.is_empty() {
        return Err(AuthError::Invalid("identity must not be empty".to_owned()));
    }
    if ttl.as_secs() == 0 {
        return Err(AuthError::Invalid("ttl must be at least 1s".to_owned()));
    }
    let claims = Claims {
        room: room.to_owned(),
        sub: identity.to_owned(),
        can_publish,
        can_subscribe,
        admin,
        exp: now_unix.saturating_add(ttl.as_secs()),
        iat: now_unix,
        jti: None,
        limits: None,
        codecs: None,
    };
    sign(secret, &claims)
}

/// Signs arbitrary claims (HS256).
pub fn sign(secret: &Secret, claims: &Claims) -> Result<String, AuthError> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| AuthError::Invalid(format!("cannot sign token: {:?}", e.kind())))
}

/// Why a request was not admitted. Messages never contain the token or secret.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the `Authorization` header or the `token` query parameter.
    #[error(
        "missing access token: send `Authorization: Bearer <jwt>` or the `token` query parameter"
    )]
    Missing,
    /// The token's `exp` has passed.
    #[error("access token expired")]
    Expired,
    /// Forged, malformed or otherwise unacceptable token.
    #[error("invalid access token: {0}")]
    Invalid(String),
    /// The token is for another room.
    #[error("access token does not admit to room `{room}`")]
    WrongRoom {
        /// The room that was requested.
        room: String,
    },
    /// The token lacks the grant (claim) the operation needs.
    #[error("access token lacks the `{0}` grant")]
    Forbidden(&'static str),
}

impl AuthError {
    /// HTTP status: 401 for a missing, expired or invalid token, 403 for a
    /// valid token with the wrong room or a missing grant.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Missing | Self::Expired | Self::Invalid(_) => StatusCode::UNAUTHORIZED,
            Self::WrongRoom { .. } | Self::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Expired => "expired",
            Self::Invalid(_) => "invalid",
            Self::WrongRoom { .. } => "wrong_room",
            Self::Forbidden(_) => "forbidden",
        }
    }

    /// RFC 6750 `WWW-Authenticate` challenge for this error.
    fn challenge(&self) -> &'static str {
        match self {
            Self::Missing => "Bearer",
            Self::Expired | Self::Invalid(_) => "Bearer error=\"invalid_token\"",
            Self::WrongRoom { .. } | Self::Forbidden(_) => "Bearer error=\"insufficient_scope\"",
        }
    }
}

/// `status()` with a JSON body `{"error": "<message>"}` and a
/// `WWW-Authenticate` challenge.
impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        let mut response = (self.status(), axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(self.challenge()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-test-secret";
    const NOW: u64 = 1_700_000_000;

    fn secret() -> Secret {
        Secret::new(SECRET)
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn auth() -> Authenticator {
        Authenticator::new(Some(&secret()), false)
    }

    fn token(room: &str, publish: bool, subscribe: bool, admin: bool) -> String {
        mint(
            &secret(),
            room,
            "alice",
            publish,
            subscribe,
            admin,
            Duration::from_secs(3600),
            now(),
        )
        .unwrap()
    }

    fn b64(data: &[u8]) -> String {
        // Minimal base64url (no padding) for hand-made tokens.
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn b64_decode(s: &str) -> Vec<u8> {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let vals: Vec<u32> = s
            .bytes()
            .map(|c| A.iter().position(|&a| a == c).unwrap() as u32)
            .collect();
        let mut out = Vec::new();
        for chunk in vals.chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &v)| acc | v << (18 - 6 * i));
            for i in 0..chunk.len() - 1 {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }

    fn assert_clean(e: &AuthError, token: &str) {
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains(token), "{text}");
    }

    #[test]
    fn mint_verify_round_trip() {
        let t = mint(
            &secret(),
            "room1",
            "alice",
            true,
            false,
            true,
            Duration::from_secs(60),
            now(),
        )
        .unwrap();
        assert_eq!(t.split('.').count(), 3);
        let c = auth().verify(&t).unwrap();
        assert_eq!(c.room, "room1");
        assert_eq!(c.sub, "alice");
        assert!(c.can_publish && !c.can_subscribe && c.admin);
        assert!(c.exp >= c.iat + 60);
    }

    #[test]
    fn claims_defaults_and_room() {
        let c: Claims = serde_json::from_str(r#"{"room":"r","sub":"s","exp":1}"#).unwrap();
        assert!(!c.can_publish && !c.can_subscribe && !c.admin);
        assert_eq!(c.iat, 0);
        assert!(c.admits_room("r"));
        assert!(!c.admits_room("other"));
        let any = Claims {
            room: "*".into(),
            ..c
        };
        assert!(any.admits_room("anything"));
    }

    #[test]
    fn expired_token() {
        let t = mint(
            &secret(),
            "r",
            "a",
            true,
            true,
            false,
            Duration::from_secs(60),
            NOW - 3600,
        )
        .unwrap();
        let e = auth().verify(&t).unwrap_err();
        assert!(matches!(e, AuthError::Expired), "{e:?}");
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(e.reason(), "expired");
        assert_clean(&e, &t);
    }

    #[test]
    fn leeway_is_five_seconds() {
        // exp 2 s ago: inside the leeway.
        let t = sign(
            &secret(),
            &Claims {
                room: "r".into(),
                sub: "a".into(),
                can_publish: true,
                can_subscribe: false,
                admin: false,
                exp: now() - 2,
                iat: 0,
                jti: None,
                limits: None,
                codecs: None,
            },
        )
        .unwrap();
        assert!(auth().verify(&t).is_ok());
        // exp 30 s ago: outside.
        let t = sign(
            &secret(),
            &Claims {
                room: "r".into(),
                sub: "a".into(),
                can_publish: true,
                can_subscribe: false,
                admin: false,
                exp: now() - 30,
                iat: 0,
                jti: None,
                limits: None,
                codecs: None,
            },
        )
        .unwrap();
        assert!(matches!(auth().verify(&t), Err(AuthError::Expired)));
    }

    #[test]
    fn the_codecs_claim_travels_to_the_owner_and_unknown_codecs_are_refused() {
        let claims = Claims {
            room: "r".into(),
            sub: "a".into(),
            can_publish: true,
            can_subscribe: false,
            admin: false,
            exp: now() + 60,
            iat: 0,
            jti: None,
            limits: None,
            codecs: Some(vec![ridge_sfu::CodecSpec::H264, ridge_sfu::CodecSpec::Opus]),
        };
        let t = sign(&secret(), &claims).unwrap();
        let verified = auth().verify(&t).unwrap();
        assert_eq!(
            verified.owner().codecs,
            Some(vec![ridge_sfu::CodecSpec::H264, ridge_sfu::CodecSpec::Opus])
        );
        // A codec the node does not know is not a valid token.
        let raw = serde_json::json!({"room":"r","sub":"a","exp":now() + 60,"codecs":["h265"]});
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &raw,
            &jsonwebtoken::EncodingKey::from_secret(secret().expose().as_bytes()),
        )
        .unwrap();
        assert!(auth().verify(&t).is_err());
    }

    #[test]
    fn forged_signature_rejected() {
        let other = Secret::new("another-secret-another-secret");
        let t = mint(
            &other,
            "r",
            "a",
            true,
            true,
            true,
            Duration::from_secs(60),
            now(),
        )
        .unwrap();
        let e = auth().verify(&t).unwrap_err();
        assert!(matches!(e, AuthError::Invalid(_)), "{e:?}");
        assert!(e.to_string().contains("signature"), "{e}");
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(e.reason(), "invalid");
        assert_clean(&e, &t);
    }

    #[test]
    fn alg_none_rejected() {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64(
            format!(
                r#"{{"room":"*","sub":"eve","can_publish":true,"can_subscribe":true,"admin":true,"exp":{}}}"#,
                now() + 3600
            )
            .as_bytes(),
        );
        for t in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            let e = auth().verify(&t).unwrap_err();
            assert!(matches!(e, AuthError::Invalid(_)), "{e:?}");
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
            assert_clean(&e, &t);
        }
    }

    #[test]
    fn other_algorithm_rejected() {
        // An HS512 token signed with the right secret is still rejected.
        let claims = Claims {
            room: "r".into(),
            sub: "a".into(),
            can_publish: true,
            can_subscribe: true,
            admin: false,
            exp: now() + 60,
            iat: 0,
            jti: None,
            limits: None,
            codecs: None,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let e = auth().verify(&t).unwrap_err();
        assert!(e.to_string().contains("HS256"), "{e}");
    }

    #[test]
    fn tampered_payload_rejected() {
        let t = token("room1", false, true, false);
        let parts: Vec<&str> = t.split('.').collect();
        let payload = String::from_utf8(b64_decode(parts[1])).unwrap();
        let forged = payload
            .replace("\"room1\"", "\"*\"")
            .replace("\"admin\":false", "\"admin\":true");
        assert_ne!(payload, forged);
        let t2 = format!("{}.{}.{}", parts[0], b64(forged.as_bytes()), parts[2]);
        let e = auth().verify(&t2).unwrap_err();
        assert!(matches!(e, AuthError::Invalid(_)), "{e:?}");
        assert_clean(&e, &t2);
        // Garbage.
        for bad in ["", "abc", "a.b.c", "....", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            let e = auth().verify(bad).unwrap_err();
            assert!(
                matches!(e, AuthError::Invalid(_) | AuthError::Missing),
                "{bad}: {e:?}"
            );
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        }
    }

    #[test]
    fn missing_claims_rejected() {
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let e = auth().verify(&t).unwrap_err();
        assert!(e.to_string().contains("room"), "{e}");
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"room": "r", "sub": "a"}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let e = auth().verify(&t).unwrap_err();
        assert!(e.to_string().contains("exp"), "{e}");
    }

    #[test]
    fn wrong_room_is_403() {
        let c = auth().verify(&token("room1", true, true, false)).unwrap();
        assert!(Authenticator::authorize(&c, Some("room1"), Grant::Publish).is_ok());
        let e = Authenticator::authorize(&c, Some("room2"), Grant::Publish).unwrap_err();
        assert!(matches!(&e, AuthError::WrongRoom { room } if room == "room2"));
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.reason(), "wrong_room");
        // A wildcard token admits everywhere.
        let c = auth().verify(&token("*", true, true, false)).unwrap();
        assert!(Authenticator::authorize(&c, Some("room2"), Grant::Subscribe).is_ok());
    }

    #[test]
    fn missing_grant_is_403() {
        let c = auth().verify(&token("r", false, true, false)).unwrap();
        let e = Authenticator::authorize(&c, Some("r"), Grant::Publish).unwrap_err();
        assert!(matches!(e, AuthError::Forbidden("can_publish")), "{e:?}");
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.reason(), "forbidden");
        assert!(Authenticator::authorize(&c, Some("r"), Grant::Subscribe).is_ok());
        assert!(Authenticator::authorize(&c, Some("r"), Grant::Either).is_ok());
        let e = Authenticator::authorize(&c, None, Grant::Admin).unwrap_err();
        assert!(matches!(e, AuthError::Forbidden("admin")));

        let none = auth().verify(&token("r", false, false, false)).unwrap();
        assert!(Authenticator::authorize(&none, Some("r"), Grant::Either).is_err());
        let admin = auth().verify(&token("r", false, false, true)).unwrap();
        assert!(Authenticator::authorize(&admin, None, Grant::Admin).is_ok());
        // Room is checked before the grant.
        let e = Authenticator::authorize(&c, Some("x"), Grant::Publish).unwrap_err();
        assert!(matches!(e, AuthError::WrongRoom { .. }));
    }

    #[test]
    fn bearer_header_and_query_param() {
        let a = auth();
        let t = token("r", true, false, false);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        assert_eq!(a.authenticate(&headers, None).unwrap().room, "r");
        headers.insert(AUTHORIZATION, format!("bearer  {t} ").parse().unwrap());
        assert!(a.authenticate(&headers, None).is_ok());

        // Header wins over the query parameter.
        let other = token("q", true, false, false);
        headers.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        let q = format!("token={other}");
        assert_eq!(a.authenticate(&headers, Some(&q)).unwrap().room, "r");

        // Query parameter, percent-encoded, among others, with a leading '?'.
        let empty = HeaderMap::new();
        let encoded = other.replace('.', "%2E");
        let q = format!("?resume=abc&last_seq=3&token={encoded}");
        assert_eq!(a.authenticate(&empty, Some(&q)).unwrap().room, "q");
        let q = format!("tok%65n={other}");
        assert_eq!(a.authenticate(&empty, Some(&q)).unwrap().room, "q");

        // A non-Bearer header falls back to the query.
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
        let q = format!("token={other}");
        assert_eq!(a.authenticate(&basic, Some(&q)).unwrap().room, "q");

        // Missing everywhere.
        for q in [None, Some(""), Some("token="), Some("tokens=x&foo=bar")] {
            let e = a.authenticate(&empty, q).unwrap_err();
            assert!(matches!(e, AuthError::Missing), "{q:?}: {e:?}");
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(e.reason(), "missing");
        }
        let e = a.authenticate(&basic, None).unwrap_err();
        assert!(matches!(e, AuthError::Missing));

        // A bad token in the query is invalid, not missing.
        let e = a.authenticate(&empty, Some("token=nope")).unwrap_err();
        assert!(matches!(e, AuthError::Invalid(_)));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb%2ec"), "a.b.c");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%E2%9C%93"), "\u{2713}");
    }

    #[test]
    fn dev_no_auth_admits_everything() {
        let a = Authenticator::new(None, true);
        assert!(a.disabled());
        let c = a.authenticate(&HeaderMap::new(), None).unwrap();
        assert_eq!(c.room, "*");
        assert_eq!(c.sub, "dev");
        assert!(c.can_publish && c.can_subscribe && c.admin);
        assert!(c.exp > now() + 365 * 24 * 3600);
        for g in [
            Grant::Publish,
            Grant::Subscribe,
            Grant::Either,
            Grant::Admin,
        ] {
            assert!(Authenticator::authorize(&c, Some("any"), g).is_ok());
        }
        // Even with a secret, dev_no_auth wins.
        let a = Authenticator::new(Some(&secret()), true);
        assert!(a.disabled());
        assert!(a.verify("garbage").is_ok());
    }

    #[test]
    fn no_secret_rejects_everything() {
        let a = Authenticator::new(None, false);
        assert!(!a.disabled());
        let t = token("r", true, true, true);
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn debug_redacts() {
        let a = auth();
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(dbg.contains("hs256"));
    }

    #[test]
    fn mint_validates_input() {
        let s = secret();
        let ttl = Duration::from_secs(60);
        assert!(mint(&s, "", "a", true, true, false, ttl, NOW).is_err());
        assert!(mint(&s, "r", "", true, true, false, ttl, NOW).is_err());
        assert!(
            mint(
                &s,
                "r",
                "a",
                true,
                true,
                false,
                Duration::from_millis(10),
                NOW
            )
            .is_err()
        );
        let t = mint(
            &s,
            "r",
            "a",
            true,
            true,
            false,
            Duration::from_secs(90),
            NOW,
        )
        .unwrap();
        let claims: Claims =
            serde_json::from_slice(&b64_decode(t.split('.').nth(1).unwrap())).unwrap();
        assert_eq!(claims.iat, NOW);
        assert_eq!(claims.exp, NOW + 90);
    }

    #[test]
    fn error_response_is_json() {
        let resp = AuthError::Forbidden("can_publish").into_response();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "application/json"
        );
        assert!(resp.headers().contains_key(WWW_AUTHENTICATE));
        let resp = AuthError::Missing.into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[WWW_AUTHENTICATE], "Bearer");
    }
}
