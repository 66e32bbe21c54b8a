//! What the scheduler's, the agent's and the dataplane's configuration
//! loaders share: each merges flags, environment, a TOML file and defaults
//! into a validated configuration, and reports every problem as a
//! [`ConfigError`] that names the field. All of them are the operator's to
//! fix; a binary exits with `EX_USAGE` (64) on one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration problem: the operator's to fix. Messages never contain a
/// secret.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped fields.
    #[error("cannot parse config{}: {message}", display_origin(path.as_deref()))]
    Parse {
        /// The file; `None` when parsed from a string.
        path: Option<PathBuf>,
        /// What is wrong, with the line where the parser says so.
        message: String,
    },
    /// A value is missing, out of range or inconsistent with another one.
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        /// The setting, as the config file spells it.
        field: &'static str,
        /// What is wrong and what to do about it.
        message: String,
    },
}

impl ConfigError {
    /// The field an [`ConfigError::Invalid`] error is about.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn display_origin(path: Option<&Path>) -> String {
    path.map(|p| format!(" file {}", p.display()))
        .unwrap_or_default()
}

/// A [`ConfigError::Invalid`] about `field`.
pub fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Reads a config file to a string ([`ConfigError::Read`] when it cannot).
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A humantime duration (`"10s"`, `"500ms"`, `"1m"`) given for `field`.
pub fn parse_duration(field: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        invalid(
            field,
            format!("`{value}` is not a duration ({e}); write e.g. \"10s\", \"500ms\" or \"1m\""),
        )
    })
}

/// A duration setting by precedence: the flag's value, else the file's
/// (a humantime string, parsed with [`parse_duration`]), else `default`.
pub fn duration_setting(
    field: &'static str,
    flag: Option<Duration>,
    file: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match (flag, file) {
        (Some(d), _) => Ok(d),
        (None, Some(s)) => parse_duration(field, s),
        (None, None) => Ok(default),
    }
}

/// A secret string (a token or key). `Debug` and `Display` print
/// `<redacted>`; only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value. Never log it or return it to a client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_file() {
        let e = invalid("max_sessions", "must be at least 1");
        assert_eq!(e.field(), Some("max_sessions"));
        assert_eq!(
            e.to_string(),
            "invalid configuration: max_sessions: must be at least 1"
        );
        let e = ConfigError::Parse {
            path: Some("/etc/ridge/x.toml".into()),
            message: "line 1: bad".into(),
        };
        assert_eq!(e.field(), None);
        assert_eq!(
            e.to_string(),
            "cannot parse config file /etc/ridge/x.toml: line 1: bad"
        );
        let e = ConfigError::Parse {
            path: None,
            message: "line 1: bad".into(),
        };
        assert_eq!(e.to_string(), "cannot parse config: line 1: bad");
        let e = read_file(Path::new("/nonexistent/ridge.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/ridge.toml"), "{e}");
    }

    #[test]
    fn durations_by_precedence() {
        let d = |flag, file| duration_setting("drain_timeout", flag, file, Duration::from_secs(5));
        assert_eq!(d(None, None).unwrap(), Duration::from_secs(5));
        assert_eq!(
            d(None, Some(" 250ms ")).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            d(Some(Duration::from_secs(1)), Some("nonsense")).unwrap(),
            Duration::from_secs(1)
        );
        let e = d(None, Some("soon")).unwrap_err();
        assert_eq!(e.field(), Some("drain_timeout"));
        assert!(e.to_string().contains("`soon` is not a duration"), "{e}");
    }

    #[test]
    fn secrets_stay_out_of_output() {
        #[derive(Debug, Deserialize)]
        struct File {
            #[allow(dead_code)]
            token: Secret,
        }
        let f: File = toml::from_str("token = \"hunter2hunter2\"").unwrap();
        assert!(!format!("{f:?}").contains("hunter2"));
        let s = Secret::new("hunter2hunter2");
        assert_eq!(s.to_string(), "<redacted>");
        assert_eq!(s.expose(), "hunter2hunter2");
        assert_eq!(Secret::from(String::from("hunter2hunter2")), s);
    }
}
