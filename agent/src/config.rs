//! Typed, validated agent configuration: flags > environment > TOML file >
//! defaults, all checked before anything binds or connects. Errors name the
//! field; the binary exits with [`EXIT_CONFIG`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ridge_wire::config::{duration_setting, invalid, read_file};
use serde::Deserialize;

pub use ridge_wire::config::ConfigError;

/// Exit status for an invalid configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;
/// Exit status when the scheduler refuses the bootstrap token or the stored
/// credential, or no token is available (`EX_NOPERM`).
pub const EXIT_ENROLL: i32 = 77;
/// Environment variable with the bootstrap token.
pub const ENV_TOKEN: &str = "RIDGE_BOOTSTRAP_TOKEN";
/// Default system CA bundle (Debian) used when `scheduler_ca` is not set.
pub const DEFAULT_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Default distance from a node's mesh port to its probe responder's:
/// clear of the dataplane's shard ports (mesh port + shard index).
pub const DEFAULT_PROBE_PORT_OFFSET: u16 = 1000;
/// Default metrics listener.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9107";

/// The TOML file. Durations are humantime strings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub scheduler_url: Option<String>,
    pub scheduler_ca: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub cmdline_path: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub media_address: Option<SocketAddr>,
    pub mesh_address: Option<SocketAddr>,
    pub http_url: Option<String>,
    pub probe_listen: Option<SocketAddr>,
    pub probe_port_offset: Option<u16>,
    pub probe_interval: Option<String>,
    pub watch_wait: Option<String>,
    pub metrics_listen: Option<String>,
    pub drain_timeout: Option<String>,
    pub log: Option<String>,
}

/// Values from flags (and, for the token, the environment).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub scheduler_url: Option<String>,
    pub scheduler_ca: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub cmdline_path: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub media_address: Option<SocketAddr>,
    pub mesh_address: Option<SocketAddr>,
    pub http_url: Option<String>,
    pub probe_listen: Option<SocketAddr>,
    pub probe_port_offset: Option<u16>,
    pub probe_interval: Option<Duration>,
    pub watch_wait: Option<Duration>,
    /// `""` disables the metrics listener.
    pub metrics_listen: Option<String>,
    pub drain_timeout: Option<Duration>,
    pub log: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host:port`, no trailing slash.
    pub scheduler_url: String,
    pub scheduler_ca: PathBuf,
    /// Holds `identity.json` (mode 0600); created 0700.
    pub state_dir: PathBuf,
    pub token_file: Option<PathBuf>,
    /// Read for `ridge.token=` (normally `/proc/cmdline`).
    pub cmdline_path: PathBuf,
    /// The dataplane's control API; `None`: apply nothing locally.
    pub control_socket: Option<PathBuf>,
    /// Reported as `addresses.media`; default: the dataplane's media address.
    pub media_address: Option<SocketAddr>,
    /// Reported as `addresses.mesh`; default: `media_address`.
    pub mesh_address: Option<SocketAddr>,
    pub http_url: Option<String>,
    pub probe_listen: SocketAddr,
    /// Peers' probe responders listen on their mesh port + this.
    pub probe_port_offset: u16,
    pub probe_interval: Duration,
    pub watch_wait: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub drain_timeout: Duration,
    pub log: String,
}

/// Reads `file` (when given), merges it with `overrides` and validates.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let fc = match file {
        Some(path) => {
            toml::from_str(&read_file(path)?).map_err(|e: toml::de::Error| ConfigError::Parse {
                path: Some(path.to_owned()),
                message: e.message().to_owned(),
            })?
        }
        None => FileConfig::default(),
    };
    build(fc, overrides)
}

fn euid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The state directory when none is configured.
pub fn default_state_dir(euid: Option<u32>, home: Option<&str>) -> Option<PathBuf> {
    match (euid, home) {
        (Some(0), _) => Some(PathBuf::from("/var/lib/ridge-agent")),
        (_, Some(h)) if !h.is_empty() => Some(Path::new(h).join(".local/state/ridge-agent")),
        _ => None,
    }
}

/// Merges and validates.
pub fn build(fc: FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
    let url = o
        .scheduler_url
        .clone()
        .or(fc.scheduler_url)
        .ok_or_else(|| {
            invalid(
                "scheduler_url",
                "not set: give the scheduler's https:// URL (--scheduler)",
            )
        })?;
    let url = url.trim().trim_end_matches('/').to_owned();
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        invalid(
            "scheduler_url",
            format!("`{url}` must start with https:// (the scheduler only speaks HTTPS)"),
        )
    })?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(invalid("scheduler_url", format!("`{url}` has no host")));
    }
    let scheduler_ca = o
        .scheduler_ca
        .clone()
        .or(fc.scheduler_ca)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CA));
    if !scheduler_ca.is_file() {
        return Err(invalid(
            "scheduler_ca",
            format!(
                "{} is not a readable file: give the PEM CA certificate of the scheduler (--scheduler-ca)",
                scheduler_ca.display()
            ),
        ));
    }
    let state_dir = o
        .state_dir
        .clone()
        .or(fc.state_dir)
        .or_else(|| default_state_dir(euid(), std::env::var("HOME").ok().as_deref()))
        .ok_or_else(|| {
            invalid(
                "state_dir",
                "not set and no default applies (no HOME): give --state-dir",
            )
        })?;
    if state_dir.is_relative() {
        return Err(invalid(
            "state_dir",
            format!("{} is relative: give an absolute path", state_dir.display()),
        ));
    }
    let token_file = o.token_file.clone().or(fc.token_file);
    let cmdline_path = o
        .cmdline_path
        .clone()
        .or(fc.cmdline_path)
        .unwrap_or_else(|| PathBuf::from("/proc/cmdline"));
    let control_socket = match o.control_socket.clone().or(fc.control_socket) {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p),
        None => match euid() {
            Some(0) => Some(PathBuf::from("/run/ridge/dataplane.sock")),
            _ => std::env::var("XDG_RUNTIME_DIR")
                .ok()
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(&d).join("ridge/dataplane.sock")),
        },
    };
    if let Some(p) = &control_socket
        && p.is_relative()
    {
        return Err(invalid(
            "control_socket",
            format!(
                "{} is relative: give an absolute path or \"\" to disable",
                p.display()
            ),
        ));
    }
    let http_url = o.http_url.clone().or(fc.http_url);
    if let Some(u) = &http_url
        && !(u.starts_with("https://") || u.starts_with("http://"))
    {
        return Err(invalid(
            "http_url",
            format!("`{u}` must be an http(s):// URL"),
        ));
    }
    let probe_port_offset = o
        .probe_port_offset
        .or(fc.probe_port_offset)
        .unwrap_or(DEFAULT_PROBE_PORT_OFFSET);
    // By default the responder listens where peers send: this node's mesh
    // port plus the offset (peers use the same offset).
    let probe_listen = match o.probe_listen.or(fc.probe_listen) {
        Some(a) => a,
        None => {
            let mesh_port = o
                .mesh_address
                .or(fc.mesh_address)
                .or(o.media_address)
                .or(fc.media_address)
                .map_or(5004, |a| a.port());
            let port = mesh_port.checked_add(probe_port_offset).ok_or_else(|| {
                invalid(
                    "probe_port_offset",
                    "the mesh port plus the offset is beyond 65535",
                )
            })?;
            SocketAddr::from(([0, 0, 0, 0], port))
        }
    };
    let probe_interval = duration_setting(
        "probe_interval",
        o.probe_interval,
        fc.probe_interval.as_deref(),
        Duration::from_secs(1),
    )?;
    if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&probe_interval) {
        return Err(invalid("probe_interval", "must be 10ms ..= 60s"));
    }
    let watch_wait = duration_setting(
        "watch_wait",
        o.watch_wait,
        fc.watch_wait.as_deref(),
        Duration::from_secs(30),
    )?;
    if watch_wait > Duration::from_secs(60) {
        return Err(invalid(
            "watch_wait",
            "must be at most 60s (the scheduler's limit)",
        ));
    }
    let metrics_listen = match o
        .metrics_listen
        .clone()
        .or(fc.metrics_listen)
        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_owned())
    {
        s if s.is_empty() => None,
        s => Some(s.parse().map_err(|_| {
            invalid(
                "metrics_listen",
                format!("`{s}` is not IP:PORT (\"\" disables)"),
            )
        })?),
    };
    let drain_timeout = duration_setting(
        "drain_timeout",
        o.drain_timeout,
        fc.drain_timeout.as_deref(),
        Duration::from_secs(5),
    )?;
    if drain_timeout > Duration::from_secs(60) {
        return Err(invalid("drain_timeout", "must be at most 60s"));
    }
    let log = o
        .log
        .clone()
        .or(fc.log)
        .unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        return Err(invalid(
            "log",
            format!("`{log}` is not a tracing filter ({e})"),
        ));
    }
    Ok(Config {
        scheduler_url: url,
        scheduler_ca,
        state_dir,
        token_file,
        cmdline_path,
        control_socket,
        media_address: o.media_address.or(fc.media_address),
        mesh_address: o.mesh_address.or(fc.mesh_address),
        http_url,
        probe_listen,
        probe_port_offset,
        probe_interval,
        watch_wait,
        metrics_listen,
        drain_timeout,
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Overrides {
        Overrides {
            scheduler_url: Some("https://127.0.0.1:8443/".into()),
            scheduler_ca: Some(PathBuf::from("/proc/self/status")),
            state_dir: Some(PathBuf::from("/tmp/ridge-agent-test")),
            ..Overrides::default()
        }
    }

    #[test]
    fn defaults_and_trailing_slash() {
        let c = build(FileConfig::default(), &base()).unwrap();
        assert_eq!(c.scheduler_url, "https://127.0.0.1:8443");
        assert_eq!(c.probe_port_offset, 1000);
        assert_eq!(c.cmdline_path, PathBuf::from("/proc/cmdline"));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9107".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(Overrides, &str)> = vec![
            (
                Overrides {
                    scheduler_url: None,
                    ..base()
                },
                "scheduler_url",
            ),
            (
                Overrides {
                    scheduler_url: Some("http://x".into()),
                    ..base()
                },
                "scheduler_url",
            ),
            (
                Overrides {
                    scheduler_ca: Some("/nonexistent.pem".into()),
                    ..base()
                },
                "scheduler_ca",
            ),
            (
                Overrides {
                    state_dir: Some("rel".into()),
                    ..base()
                },
                "state_dir",
            ),
            (
                Overrides {
                    control_socket: Some("rel.sock".into()),
                    ..base()
                },
                "control_socket",
            ),
            (
                Overrides {
                    probe_interval: Some(Duration::from_millis(1)),
                    ..base()
                },
                "probe_interval",
            ),
            (
                Overrides {
                    watch_wait: Some(Duration::from_secs(61)),
                    ..base()
                },
                "watch_wait",
            ),
            (
                Overrides {
                    metrics_listen: Some("nope".into()),
                    ..base()
                },
                "metrics_listen",
            ),
            (
                Overrides {
                    log: Some("x=verbose!!".into()),
                    ..base()
                },
                "log",
            ),
            (
                Overrides {
                    http_url: Some("ftp://x".into()),
                    ..base()
                },
                "http_url",
            ),
        ];
        for (o, field) in cases {
            let e = build(FileConfig::default(), &o).unwrap_err();
            assert_eq!(e.field(), Some(field), "{e}");
        }
    }

    #[test]
    fn file_and_precedence() {
        let fc: FileConfig = toml::from_str(
            "scheduler_url = \"https://file:1\"\nprobe_interval = \"250ms\"\ncontrol_socket = \"\"\nmetrics_listen = \"\"\n",
        )
        .unwrap();
        let o = Overrides {
            scheduler_url: None,
            ..base()
        };
        let c = build(fc.clone(), &o).unwrap();
        assert_eq!(c.scheduler_url, "https://file:1");
        assert_eq!(c.probe_interval, Duration::from_millis(250));
        assert_eq!(c.control_socket, None);
        assert_eq!(c.metrics_listen, None);
        let c = build(fc, &base()).unwrap();
        assert_eq!(c.scheduler_url, "https://127.0.0.1:8443");
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }
}
