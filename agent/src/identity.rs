//! The node's identity: its Ed25519 key pair and the credential the
//! scheduler issued at enrollment, kept in `<state_dir>/identity.json` with
//! mode 0600 and reused across restarts. Also where the bootstrap token
//! comes from.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// File name inside the state directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// An identity problem. Messages never contain the token or the key.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no bootstrap token: this node is not enrolled yet and no token was found in --token-file, ${env} or `ridge.token=` in {}", cmdline.display())]
    NoToken { env: &'static str, cmdline: PathBuf },
    #[error("cannot read the bootstrap token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the identity to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the identity file {} is readable by others (mode {mode:o}); it must be 0600: fix it with chmod 600 or remove it and enroll again", path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the identity file {} is corrupt or has been tampered with ({why}); remove it and enroll again with a new bootstrap token", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot generate a key pair: {0}")]
    Crypto(String),
}

/// Where a bootstrap token came from (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    File,
    Env,
    Cmdline,
}

/// A bootstrap token. `Debug` does not show it.
#[derive(Clone)]
pub struct BootstrapToken(pub String);

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BootstrapToken(<redacted>)")
    }
}

/// `ridge.token=VALUE` from a kernel command line.
pub fn cmdline_token(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ridge.token="))
        .map(|t| t.trim_matches('"').to_owned())
        .filter(|t| !t.is_empty())
}

/// The bootstrap token: the file, else the environment value, else the
/// kernel command line. A named file that cannot be read is an error.
pub fn find_token(
    file: Option<&Path>,
    env: Option<String>,
    cmdline: &Path,
) -> Result<(BootstrapToken, TokenSource), IdentityError> {
    if let Some(path) = file {
        let t = std::fs::read_to_string(path).map_err(|source| IdentityError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        // Warned, not refused: provisioning tools often write such files
        // 0644, and a bootstrap token is short-lived and limited-use (the
        // long-lived identity file is refused when open to others).
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o777),
                "the bootstrap token file is readable by others: give it mode 0600 \
                 (and remove it after enrollment)"
            );
        }
        let t = t.trim();
        if !t.is_empty() {
            return Ok((BootstrapToken(t.to_owned()), TokenSource::File));
        }
    }
    if let Some(t) = env.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()) {
        return Ok((BootstrapToken(t), TokenSource::Env));
    }
    if let Some(t) = std::fs::read_to_string(cmdline)
        .ok()
        .and_then(|c| cmdline_token(&c))
    {
        return Ok((BootstrapToken(t), TokenSource::Cmdline));
    }
    Err(IdentityError::NoToken {
        env: crate::config::ENV_TOKEN,
        cmdline: cmdline.to_owned(),
    })
}

/// A freshly generated Ed25519 key pair (PKCS#8).
pub struct NodeKey {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &self.public_b64())
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    pub fn generate() -> Result<Self, IdentityError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref()).map_err(IdentityError::Crypto)
    }

    fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
        Ok(Self {
            pkcs8: pkcs8.to_vec(),
            pair,
        })
    }

    /// Standard base64 of the raw 32-byte public key.
    pub fn public_b64(&self) -> String {
        STANDARD.encode(self.pair.public_key().as_ref())
    }

    /// The enrollment proof (docs/scheduler-api.md §3.1): a signature over
    /// `"ridge-enroll-v1\n" + token + "\n" + public key`.
    pub fn enroll_proof(&self, token: &str) -> String {
        let msg = format!("ridge-enroll-v1\n{token}\n{}", self.public_b64());
        STANDARD.encode(self.pair.sign(msg.as_bytes()).as_ref())
    }
}

/// What enrollment gave us, plus our key: the node's identity.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub node_id: String,
    pub node_token: String,
    pub node_token_expires_at: u64,
    pub scheduler_url: String,
    pub region: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub heartbeat_interval_ms: u64,
    pub lease_misses: u32,
    pub enrolled_at: u64,
    pub key_alg: String,
    /// Standard base64 of the raw public key.
    pub public_key: String,
    /// Standard base64 of the PKCS#8 private key.
    pub private_key_pkcs8: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("scheduler_url", &self.scheduler_url)
            .field("region", &self.region)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Builds the identity from an enrollment answer.
    #[allow(clippy::too_many_arguments, reason = "one field each")]
    pub fn new(
        key: &NodeKey,
        node_id: String,
        node_token: String,
        node_token_expires_at: u64,
        scheduler_url: String,
        region: String,
        labels: BTreeMap<String, String>,
        heartbeat_interval_ms: u64,
        lease_misses: u32,
        enrolled_at: u64,
    ) -> Self {
        Self {
            node_id,
            node_token,
            node_token_expires_at,
            scheduler_url,
            region,
            labels,
            heartbeat_interval_ms,
            lease_misses,
            enrolled_at,
            key_alg: "ed25519".into(),
            public_key: key.public_b64(),
            private_key_pkcs8: STANDARD.encode(&key.pkcs8),
        }
    }

    /// Checks internal consistency: the private key parses and matches the
    /// public key, the node id and token look like what the scheduler issues.
    fn check(&self) -> Result<(), String> {
        if self.key_alg != "ed25519" {
            return Err(format!("unsupported key_alg `{}`", self.key_alg));
        }
        let pkcs8 = STANDARD
            .decode(&self.private_key_pkcs8)
            .map_err(|_| "private_key_pkcs8 is not base64".to_owned())?;
        let key =
            NodeKey::from_pkcs8(&pkcs8).map_err(|_| "private key does not parse".to_owned())?;
        if key.public_b64() != self.public_key {
            return Err("the public key does not match the private key".into());
        }
        let id_ok = self.node_id.len() == 18
            && self.node_id.starts_with("n-")
            && self.node_id[2..].bytes().all(|b| b.is_ascii_hexdigit());
        if !id_ok {
            return Err(format!("`{}` is not a node id", self.node_id));
        }
        if self.node_token.split('.').count() != 3 {
            return Err("node_token is not a JWT".into());
        }
        Ok(())
    }
}

/// `<state_dir>/identity.json`.
pub fn identity_path(state_dir: &Path) -> PathBuf {
    state_dir.join(IDENTITY_FILE)
}

/// Sets the state directory's mode to exactly 0700 (whatever the umask, or
/// a looser mode it was found with, which is logged): it holds the node's
/// private key. A missing directory is fine.
pub fn tighten_state_dir(state_dir: &Path) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: state_dir.to_owned(),
        source,
    };
    let meta = match std::fs::metadata(state_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o700 {
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %state_dir.display(),
                mode = format!("{mode:o}"),
                "the state directory (it holds the node's private key) was open to others; \
                 setting it to 0700"
            );
        }
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Loads the stored identity; `Ok(None)` when there is none yet.
pub fn load(state_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    tighten_state_dir(state_dir)?;
    let path = identity_path(state_dir);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IdentityError::Read { path, source }),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path, mode });
    }
    let text = std::fs::read_to_string(&path).map_err(|source| IdentityError::Read {
        path: path.clone(),
        source,
    })?;
    let id: Identity = serde_json::from_str(&text).map_err(|e| IdentityError::Corrupt {
        path: path.clone(),
        // serde_json's message names the field, never the value.
        why: e.to_string(),
    })?;
    id.check()
        .map_err(|why| IdentityError::Corrupt { path, why })?;
    Ok(Some(id))
}

/// Writes the identity atomically (temporary file, fsync, rename), mode
/// 0600 from the moment it exists, in a 0700 directory.
pub fn store(state_dir: &Path, id: &Identity) -> Result<PathBuf, IdentityError> {
    let path = identity_path(state_dir);
    let err = |source| IdentityError::Write {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(err)?;
    tighten_state_dir(state_dir)?;
    let tmp = state_dir.join(format!(".{IDENTITY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let json = serde_json::to_vec_pretty(id).map_err(|e| err(std::io::Error::other(e)))?;
    f.write_all(&json).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "ridge-agent-id-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn sample(key: &NodeKey) -> Identity {
        Identity::new(
            key,
            "n-0011223344556677".into(),
            "aaa.bbb.ccc".into(),
            1,
            "https://s".into(),
            "eu".into(),
            BTreeMap::new(),
            2000,
            3,
            0,
        )
    }

    #[test]
    fn cmdline_parsing() {
        assert_eq!(
            cmdline_token("quiet ridge.token=rbt_x.y root=/dev/sda"),
            Some("rbt_x.y".into())
        );
        assert_eq!(
            cmdline_token("ridge.token=\"rbt_q\"\n"),
            Some("rbt_q".into())
        );
        assert_eq!(cmdline_token("ridge.token= quiet"), None);
        assert_eq!(cmdline_token("ridge.tokens=x"), None);
    }

    #[test]
    fn token_precedence() {
        let d = scratch("tok");
        let file = d.join("token");
        let cmd = d.join("cmdline");
        std::fs::write(&cmd, "ro ridge.token=from-cmdline\n").unwrap();
        std::fs::write(&file, "from-file\n").unwrap();
        let (t, s) = find_token(Some(&file), Some("from-env".into()), &cmd).unwrap();
        assert_eq!((t.0.as_str(), s), ("from-file", TokenSource::File));
        let (t, s) = find_token(None, Some("from-env".into()), &cmd).unwrap();
        assert_eq!((t.0.as_str(), s), ("from-env", TokenSource::Env));
        let (t, s) = find_token(None, None, &cmd).unwrap();
        assert_eq!((t.0.as_str(), s), ("from-cmdline", TokenSource::Cmdline));
        let e = find_token(None, None, &d.join("none")).unwrap_err();
        assert!(matches!(e, IdentityError::NoToken { .. }), "{e}");
        assert!(find_token(Some(&d.join("missing")), None, &cmd).is_err());
        assert!(!format!("{t:?}").contains("from-cmdline"));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn store_load_mode_and_tamper() {
        let d = scratch("store");
        let key = NodeKey::generate().unwrap();
        let id = sample(&key);
        assert!(load(&d).unwrap().is_none());
        let path = store(&d, &id).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load(&d).unwrap(), Some(id.clone()));
        assert!(!format!("{id:?}").contains(&id.private_key_pkcs8));

        // Another key's public half: caught.
        let mut bad = id.clone();
        bad.public_key = NodeKey::generate().unwrap().public_b64();
        store(&d, &bad).unwrap();
        assert!(matches!(load(&d), Err(IdentityError::Corrupt { .. })));
        // Garbage.
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(load(&d), Err(IdentityError::Corrupt { .. })));
        // World-readable.
        store(&d, &id).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&d), Err(IdentityError::Permissions { .. })));
        let _ = std::fs::remove_dir_all(d);
    }
}
