//! Typed, validated node configuration.
//!
//! The configuration is assembled once at start-up, before anything binds, from
//! (highest precedence first):
//!
//! 1. command-line flags ([`Overrides`]),
//! 2. the environment (only `RIDGE_JWT_SECRET`, see [`ENV_JWT_SECRET`]),
//! 3. an optional TOML file ([`FileConfig`]),
//! 4. built-in defaults.
//!
//! Every problem is reported as a [`ConfigError`] that names the offending field
//! and says what to do about it; a binary should exit with [`EXIT_CONFIG`].
//! The JWT secret is wrapped in [`Secret`] and never appears in `Debug`/`Display`
//! output or in error messages.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ridge_sfu::Cidr;
use ridge_wire::config::{duration_setting, invalid, read_file};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The configuration error and the secret string, shared with the
/// scheduler and the agent.
pub use ridge_wire::config::{ConfigError, Secret};

mod limits;

pub use limits::*;
use limits::{build_http_limits, build_limits, build_ws};

/// Process exit status for an invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Environment variable that carries the HS256 token secret.
pub const ENV_JWT_SECRET: &str = "RIDGE_JWT_SECRET";

/// Default HTTP(S) listen address.
pub const DEFAULT_HTTP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// Default UDP media address.
pub const DEFAULT_UDP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5004);
/// Default graceful-shutdown drain timeout.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for `drain_timeout`.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Default maximum number of concurrent sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 1000;
/// Shards beyond this are a configuration mistake (ids carry the shard in one byte).
const MAX_SHARDS: usize = 64;
/// Default minimum interval between keyframe requests (PLI) sent to a publisher.
pub const DEFAULT_PLI_INTERVAL: Duration = Duration::from_millis(500);
/// Lower bound for `pli_interval`.
pub const MIN_PLI_INTERVAL: Duration = Duration::from_millis(50);
/// Upper bound for `pli_interval`.
pub const MAX_PLI_INTERVAL: Duration = Duration::from_secs(10);
/// Default per-source packet rate of the XDP guard on media ports.
pub const DEFAULT_GUARD_RATE_PPS: u32 = 10_000;
/// Default burst (packets) of the XDP guard's per-source token bucket.
pub const DEFAULT_GUARD_BURST: u32 = 2_000;
/// Longest Linux interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Default tracing `EnvFilter` directive.
pub const DEFAULT_LOG: &str = "info";
/// Minimum length of the JWT secret in bytes.
pub const MIN_SECRET_LEN: usize = 16;

const SECRET_HINT: &str = "generate one with e.g. `openssl rand -base64 32`";

/// The TOML config file, as written. All fields are optional.
///
/// Durations are humantime strings (`"10s"`, `"500ms"`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// HTTP(S) listen address.
    pub http: Option<SocketAddr>,
    /// UDP media listen address.
    pub udp: Option<SocketAddr>,
    /// Addresses advertised in ICE candidates.
    pub public_ip: Option<Vec<IpAddr>>,
    /// HS256 token secret (the environment variable takes precedence).
    pub jwt_secret: Option<Secret>,
    /// PEM certificate chain.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback address.
    pub insecure_http: Option<bool>,
    /// Disable authentication (development only).
    pub dev_no_auth: Option<bool>,
    /// Graceful-shutdown drain timeout (humantime).
    pub drain_timeout: Option<String>,
    /// Maximum number of concurrent sessions.
    pub max_sessions: Option<usize>,
    /// Minimum interval between keyframe requests (humantime).
    pub pli_interval: Option<String>,
    /// Media shards (pinned threads, each with its own socket); 0 = one per
    /// core.
    pub shards: Option<usize>,
    /// Pin each shard thread to one core.
    pub pin_cores: Option<bool>,
    /// Datagram I/O: "auto", "uring" or "mmsg".
    pub io_backend: Option<IoBackend>,
    /// Send runs of datagrams to one destination as one UDP GSO send
    /// (default true).
    pub udp_gso: Option<bool>,
    /// "per-shard" (shard `i` on udp port + `i`) or "shared" (one port,
    /// steered by BPF; needs root).
    pub shard_ports: Option<ShardPorts>,
    /// Mesh links' loss repair: "hop-by-hop" (default) or "end-to-end".
    pub mesh_recovery: Option<MeshRecoveryMode>,
    /// The codecs WebRTC sessions may negotiate, in order of preference
    /// (default: opus, vp8, h264, vp9, av1).
    pub codecs: Option<Vec<ridge_sfu::CodecSpec>>,
    /// Kernel fast path: "auto" (try XDP, fall back) or "off".
    pub xdp: Option<XdpSetting>,
    /// Interfaces the XDP guard attaches to (default: the one owning the
    /// `udp` address).
    pub media_interfaces: Option<Vec<String>>,
    /// XDP guard: packets per second allowed per source address (0: no limit).
    pub guard_rate_pps: Option<u32>,
    /// XDP guard: burst of the per-source token bucket, in packets.
    pub guard_burst: Option<u32>,
    /// Forward learned plain-RTP flows in the kernel.
    pub kernel_forwarding: Option<bool>,
    /// tracing `EnvFilter` directive.
    pub log: Option<String>,
    /// Unix socket of the local control API (`""`: none).
    pub control_socket: Option<PathBuf>,
    /// A WebRTC session that has not finished ICE and DTLS this long after
    /// its offer is closed (humantime, default 15s).
    pub handshake_timeout: Option<String>,
    /// A connected WebRTC session silent this long is closed (default 30s).
    pub ice_consent_timeout: Option<String>,
    /// A plain-RTP subscriber whose remote sent nothing this long is closed
    /// (default 15s).
    pub rtp_consent_timeout: Option<String>,
    /// Loopback/link-local networks plain endpoints may name (CIDRs).
    pub rtp_allow_networks: Option<Vec<String>>,
    /// Networks whose plain subscribers need not prove consent (CIDRs).
    pub rtp_trusted_networks: Option<Vec<String>>,
    /// Sessions one identity may hold (default: a quarter of max_sessions).
    pub identity_max_sessions: Option<usize>,
    /// Rooms one identity may be in (default 16).
    pub identity_max_rooms: Option<usize>,
    /// Tracks one identity may publish (default: twice its sessions).
    pub identity_max_tracks: Option<usize>,
    /// Plain-RTP endpoints one identity may hold (default: its sessions).
    pub identity_max_rtp_endpoints: Option<usize>,
    /// Sessions one token may hold (default: the identity's limit).
    pub token_max_sessions: Option<usize>,
    /// Rooms one token may be in (default: the identity's limit).
    pub token_max_rooms: Option<usize>,
    /// Tracks one token may publish (default: the identity's limit).
    pub token_max_tracks: Option<usize>,
    /// Plain-RTP endpoints one token may hold (default: the identity's limit).
    pub token_max_rtp_endpoints: Option<usize>,
    /// WebSocket room sessions on the node.
    pub ws_max_sessions: Option<usize>,
    /// WebSocket room sessions of one identity.
    pub ws_max_sessions_per_identity: Option<usize>,
    /// Bytes queued to one socket before it is disconnected as too slow.
    pub ws_send_queue_bytes: Option<usize>,
    /// Bytes of events kept per session for a resume.
    pub ws_resume_buffer_bytes: Option<usize>,
    /// Chat and data messages per second per participant.
    pub ws_message_rate: Option<u32>,
    /// Burst of the chat/data token bucket.
    pub ws_message_burst: Option<u32>,
    /// How long before its token's `exp` a session gets `token_expiring`.
    pub ws_token_warning: Option<String>,
    /// Time to receive a request's headers (humantime).
    pub http_header_timeout: Option<String>,
    /// Time to receive a request's body (humantime).
    pub http_body_timeout: Option<String>,
    /// Time a connection may pass without traffic (humantime).
    pub http_idle_timeout: Option<String>,
    /// Time a TLS handshake may take (humantime).
    pub tls_handshake_timeout: Option<String>,
    /// Concurrent HTTP(S) connections (0: automatic).
    pub http_max_connections: Option<usize>,
    /// Concurrent HTTP(S) connections from one source address (0: automatic).
    pub http_max_connections_per_source: Option<usize>,
}

/// Whether the node tries to attach its XDP programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpSetting {
    /// Load the BPF programs and attach native XDP, else generic, else none
    /// (one log line says which); the node works in userspace either way.
    #[default]
    Auto,
    /// No BPF at all: every packet takes the userspace path.
    Off,
}

/// Which datagram I/O backend the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// io_uring when the kernel supports it, recvmmsg/sendmmsg otherwise.
    #[default]
    Auto,
    /// io_uring (multishot recvmsg over a provided buffer ring), or fail.
    Uring,
    /// recvmmsg/sendmmsg.
    Mmsg,
}

impl IoBackend {
    pub fn choice(self) -> ridge_io::BackendChoice {
        match self {
            IoBackend::Auto => ridge_io::BackendChoice::Auto,
            IoBackend::Uring => ridge_io::BackendChoice::Uring,
            IoBackend::Mmsg => ridge_io::BackendChoice::Mmsg,
        }
    }
}

/// How the shards' media sockets are addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ShardPorts {
    /// Shard `i` binds the udp port + `i` and advertises it: no kernel
    /// support needed.
    #[default]
    PerShard,
    /// Every shard binds the udp port itself (SO_REUSEPORT) and the
    /// `ridge_steer` BPF program sends each datagram to the owning shard;
    /// needs root (CAP_BPF and CAP_NET_ADMIN).
    Shared,
}

/// How mesh links repair loss (docs/mesh.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MeshRecoveryMode {
    /// Every hop NACKs its upstream and answers from its own buffers.
    #[default]
    HopByHop,
    /// Only the last node NACKs; relays pass what they lack upstream (for
    /// comparison: how cascades without per-hop recovery behave).
    EndToEnd,
}

impl MeshRecoveryMode {
    pub fn core(self) -> ridge_sfu::MeshRecovery {
        match self {
            MeshRecoveryMode::HopByHop => ridge_sfu::MeshRecovery::HopByHop,
            MeshRecoveryMode::EndToEnd => ridge_sfu::MeshRecovery::EndToEnd,
        }
    }
}

impl ShardPorts {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardPorts::PerShard => "per-shard",
            ShardPorts::Shared => "shared",
        }
    }
}

/// Values given on the command line; they take precedence over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub http: Option<SocketAddr>,
    pub udp: Option<SocketAddr>,
    /// Replaces the file's `public_ip` list when non-empty.
    pub public_ip: Vec<IpAddr>,
    /// Programmatic only (there is deliberately no command-line flag for it).
    pub jwt_secret: Option<Secret>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_http: Option<bool>,
    pub dev_no_auth: Option<bool>,
    pub drain_timeout: Option<Duration>,
    pub max_sessions: Option<usize>,
    pub pli_interval: Option<Duration>,
    pub shards: Option<usize>,
    pub pin_cores: Option<bool>,
    pub io_backend: Option<IoBackend>,
    pub udp_gso: Option<bool>,
    pub shard_ports: Option<ShardPorts>,
    pub mesh_recovery: Option<MeshRecoveryMode>,
    /// Replaces the file's `codecs` when non-empty.
    pub codecs: Vec<ridge_sfu::CodecSpec>,
    pub xdp: Option<XdpSetting>,
    /// Replaces the file's `media_interfaces` when non-empty.
    pub media_interfaces: Vec<String>,
    pub guard_rate_pps: Option<u32>,
    pub guard_burst: Option<u32>,
    pub kernel_forwarding: Option<bool>,
    pub log: Option<String>,
    /// An empty path disables the control socket.
    pub control_socket: Option<PathBuf>,
    /// Replaces the file's `rtp_allow_networks` when non-empty.
    pub rtp_allow_networks: Vec<Cidr>,
    /// Replaces the file's `rtp_trusted_networks` when non-empty.
    pub rtp_trusted_networks: Vec<Cidr>,
    pub handshake_timeout: Option<Duration>,
    pub rtp_consent_timeout: Option<Duration>,
    pub identity_max_sessions: Option<usize>,
    pub token_max_sessions: Option<usize>,
    pub ws_max_sessions: Option<usize>,
    pub ws_max_sessions_per_identity: Option<usize>,
    pub ws_send_queue_bytes: Option<usize>,
    pub ws_resume_buffer_bytes: Option<usize>,
    pub ws_message_rate: Option<u32>,
    pub ws_message_burst: Option<u32>,
    pub ws_token_warning: Option<Duration>,
    pub http_header_timeout: Option<Duration>,
    pub http_body_timeout: Option<Duration>,
    pub http_idle_timeout: Option<Duration>,
    pub tls_handshake_timeout: Option<Duration>,
    pub http_max_connections: Option<usize>,
    pub http_max_connections_per_source: Option<usize>,
}

/// TLS certificate chain and private key files (both PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP(S) listen address.
    pub http: SocketAddr,
    /// UDP media listen address (port 0: ephemeral).
    pub udp: SocketAddr,
    /// Addresses advertised in ICE candidates; never empty, never unspecified.
    pub public_ip: Vec<IpAddr>,
    /// HS256 token secret; `None` only when `dev_no_auth`.
    pub jwt_secret: Option<Secret>,
    /// TLS for the HTTP listener.
    pub tls: Option<TlsConfig>,
    /// Plain HTTP on a non-loopback address was explicitly allowed.
    pub insecure_http: bool,
    /// Authentication disabled (development only).
    pub dev_no_auth: bool,
    /// Graceful-shutdown drain timeout (at most 10 minutes).
    pub drain_timeout: Duration,
    /// Maximum number of concurrent sessions (at least 1).
    pub max_sessions: usize,
    /// Minimum interval between keyframe requests (50 ms ..= 10 s).
    pub pli_interval: Duration,
    /// Media shards (1 ..= 64). Shard `i` listens on `udp` port + `i`, or
    /// every shard on `udp` itself with [`ShardPorts::Shared`].
    pub shards: usize,
    /// Pin shard `i` to core `i` (modulo the cores this process may use).
    pub pin_cores: bool,
    pub io_backend: IoBackend,
    /// UDP GSO for runs of datagrams to one destination.
    pub udp_gso: bool,
    /// Per-shard ports, or one port steered by BPF.
    pub shard_ports: ShardPorts,
    pub mesh_recovery: MeshRecoveryMode,
    /// The codecs WebRTC sessions may negotiate, in order of preference
    /// (never empty, no repeats).
    pub codecs: Vec<ridge_sfu::CodecSpec>,
    /// The kernel fast path (XDP guard and forwarding).
    pub kernel: KernelConfig,
    /// tracing `EnvFilter` directive.
    pub log: String,
    /// The local control API's Unix socket (`None`: no control API).
    pub control_socket: Option<PathBuf>,
    /// `control_socket` is the built-in default rather than configured: if
    /// another live node holds it, this node runs without a control API
    /// (and says so) instead of failing.
    pub control_socket_is_default: bool,
    /// Quotas, handshake and consent timeouts, plain-RTP remotes
    /// (docs/operations.md, "Limits and abuse").
    pub limits: Limits,
    /// WebSocket room API limits.
    pub ws: WsConfig,
    /// HTTP(S) listener timeouts and connection caps.
    pub http_limits: HttpLimits,
}

/// The control socket used when none is configured:
/// `/run/ridge/dataplane.sock` for root, `$XDG_RUNTIME_DIR/ridge/dataplane.sock`
/// for other users, none when neither applies.
pub fn default_control_socket(euid: Option<u32>, xdg_runtime_dir: Option<&str>) -> Option<PathBuf> {
    match (euid, xdg_runtime_dir) {
        (Some(0), _) => Some(PathBuf::from("/run/ridge/dataplane.sock")),
        (_, Some(dir)) if !dir.is_empty() => Some(Path::new(dir).join("ridge/dataplane.sock")),
        _ => None,
    }
}

fn process_euid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective uid.
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The kernel fast path settings (docs/operations.md, "Kernel fast path").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    pub xdp: XdpSetting,
    /// Interfaces to attach to; empty: the interface that owns the `udp`
    /// address (none when `udp` is a wildcard address).
    pub media_interfaces: Vec<String>,
    /// Per-source packets per second on media ports; 0: no rate limit.
    pub guard_rate_pps: u32,
    /// Token-bucket burst in packets (at least 1 when a rate is set).
    pub guard_burst: u32,
    /// Install learned plain-RTP flows in the kernel forwarding table.
    pub kernel_forwarding: bool,
}

impl Config {
    /// Human-readable warnings about risky but valid settings. Log them once
    /// tracing is initialised.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.dev_no_auth {
            let scope = if self.http.ip().is_loopback() {
                String::new()
            } else {
                format!(" and {} is reachable from other hosts", self.http)
            };
            out.push(format!(
                "dev_no_auth is on: every request is admitted without a token{scope}; \
                 never use this outside local development"
            ));
        }
        if self.kernel.xdp == XdpSetting::Auto
            && self.kernel.media_interfaces.is_empty()
            && self.udp.ip().is_unspecified()
        {
            out.push(format!(
                "udp listens on {} (all interfaces) and media_interfaces is empty: the XDP \
                 guard and kernel forwarding stay off; name the interfaces in \
                 media_interfaces (--media-interface) to enable them",
                self.udp
            ));
        }
        if self.limits.per_identity.sessions >= self.max_sessions {
            out.push(format!(
                "identity_max_sessions ({}) is not below max_sessions ({}): one identity \
                 can take every session of this node",
                self.limits.per_identity.sessions, self.max_sessions
            ));
        }
        if self.tls.is_none() && self.insecure_http && !self.http.ip().is_loopback() {
            out.push(format!(
                "serving plain HTTP on {} (insecure_http): tokens travel in clear text \
                 unless a TLS-terminating proxy is in front of this node",
                self.http
            ));
        }
        out
    }
}

/// Reads `file` (when given), merges it with `overrides` and `env_secret`
/// (the value of `RIDGE_JWT_SECRET`, if set) and validates the result.
///
/// Precedence: flags (`overrides`) > environment > file > defaults.
pub fn load(
    file: Option<&Path>,
    overrides: &Overrides,
    env_secret: Option<String>,
) -> Result<Config, ConfigError> {
    let file_config = match file {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    build(file_config, overrides, env_secret)
}

/// Like [`load`], with the file's contents given as a string.
pub fn from_toml_str(
    s: &str,
    overrides: &Overrides,
    env_secret: Option<String>,
) -> Result<Config, ConfigError> {
    build(parse_file_config(s, None)?, overrides, env_secret)
}

/// Reads and parses a config file without validating it.
/// A file that holds `jwt_secret` must not be readable by group or others
/// ([`check_private`]).
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let file = parse_file_config(&read_file(path)?, Some(path))?;
    if file
        .jwt_secret
        .as_ref()
        .is_some_and(|s| !s.expose().is_empty())
    {
        check_private("jwt_secret", path)?;
    }
    Ok(file)
}

/// Refuses a file holding a secret (`jwt_secret`'s config file, the TLS
/// key) that group or others may read. It is refused rather than fixed:
/// the node cannot know who read it already (a secret that was exposed
/// must be rotated, which only the operator can do), a chmod by the node
/// would fail on read-only mounts and hide the mistake from the deployment
/// that makes it on every start. Mode 0600 or 0400 passes.
pub fn check_private(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // Reported by whoever reads it, with what it should have held.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(invalid(
                field,
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            field,
            format!(
                "{} holds a secret and is readable by group or others (mode {mode:04o}): \
                 `chmod 600 {}` (and rotate the secret if others may have read it); \
                 on Kubernetes set the secret volume's defaultMode to 0400",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Parses TOML into a [`FileConfig`] without validating it. `origin` only
/// labels errors.
pub fn parse_file_config(s: &str, origin: Option<&Path>) -> Result<FileConfig, ConfigError> {
    toml::from_str(s).map_err(|err| ConfigError::Parse {
        path: origin.map(Path::to_owned),
        message: parse_message(&err, s),
    })
}

/// Formats a TOML error as `line L, column C: message` without the source
/// snippet (which could show the secret); redacts errors about `jwt_secret`.
fn parse_message(err: &toml::de::Error, src: &str) -> String {
    let mut message = err.message().trim().to_owned();
    let mut location = String::new();
    if let Some(span) = err.span() {
        let start = floor_char_boundary(src, span.start.min(src.len()));
        let end = floor_char_boundary(src, span.end.clamp(start, src.len()));
        let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = src[end..].find('\n').map_or(src.len(), |i| end + i);
        if src[line_start..line_end].contains("jwt_secret") {
            message = "invalid `jwt_secret` (details not shown to keep the secret out of \
                       logs): it must be a quoted string of at least 16 bytes"
                .to_owned();
        }
        let line = src[..start].matches('\n').count() + 1;
        let column = src[line_start..start].chars().count() + 1;
        location = format!("line {line}, column {column}: ");
    }
    // Belt and braces: if the secret itself is readable, make sure it does not
    // appear in the message.
    if let Ok(table) = src.parse::<toml::Table>()
        && let Some(toml::Value::String(secret)) = table.get("jwt_secret")
        && !secret.is_empty()
        && message.contains(secret.as_str())
    {
        message = message.replace(secret.as_str(), "<redacted>");
    }
    format!("{location}{message}")
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Picks the secret by precedence (flag > environment > file). Empty values
/// count as unset.
fn pick_secret(flag: Option<&Secret>, env: Option<String>, file: Option<Secret>) -> Option<Secret> {
    flag.cloned()
        .filter(|s| !s.expose().is_empty())
        .or_else(|| env.filter(|s| !s.is_empty()).map(Secret::new))
        .or_else(|| file.filter(|s| !s.expose().is_empty()))
}

fn check_secret_len(secret: &Secret) -> Result<(), ConfigError> {
    if secret.expose().len() < MIN_SECRET_LEN {
        return Err(invalid(
            "jwt_secret",
            format!(
                "the JWT secret (from {ENV_JWT_SECRET} or `jwt_secret`) is shorter than \
                 {MIN_SECRET_LEN} bytes; use a longer random value ({SECRET_HINT})"
            ),
        ));
    }
    Ok(())
}

/// Resolves only the token secret (environment > file), as the `token`
/// subcommand needs it; the rest of the file is parsed but not validated.
pub fn load_secret(file: Option<&Path>, env_secret: Option<String>) -> Result<Secret, ConfigError> {
    let file_secret = match file {
        Some(path) => read_file_config(path)?.jwt_secret,
        None => None,
    };
    let secret = pick_secret(None, env_secret, file_secret).ok_or_else(|| {
        invalid(
            "jwt_secret",
            format!(
                "no JWT secret configured: set the {ENV_JWT_SECRET} environment variable \
                 or `jwt_secret` in the config file (--config), the same secret the node \
                 uses ({SECRET_HINT})"
            ),
        )
    })?;
    check_secret_len(&secret)?;
    Ok(secret)
}

fn fmt_duration(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// Merges `file` with `overrides` and `env_secret` and validates the result.
pub fn build(
    mut file: FileConfig,
    overrides: &Overrides,
    env_secret: Option<String>,
) -> Result<Config, ConfigError> {
    let http = overrides.http.or(file.http).unwrap_or(DEFAULT_HTTP);
    let udp = overrides.udp.or(file.udp).unwrap_or(DEFAULT_UDP);
    let insecure_http = overrides
        .insecure_http
        .or(file.insecure_http)
        .unwrap_or(false);
    let dev_no_auth = overrides.dev_no_auth.or(file.dev_no_auth).unwrap_or(false);
    let ws = build_ws(&file, overrides)?;
    let http_limits = build_http_limits(&file, overrides)?;

    let drain_timeout = duration_setting(
        "drain_timeout",
        overrides.drain_timeout,
        file.drain_timeout.as_deref(),
        DEFAULT_DRAIN_TIMEOUT,
    )?;
    let pli_interval = duration_setting(
        "pli_interval",
        overrides.pli_interval,
        file.pli_interval.as_deref(),
        DEFAULT_PLI_INTERVAL,
    )?;
    let max_sessions = overrides
        .max_sessions
        .or(file.max_sessions)
        .unwrap_or(DEFAULT_MAX_SESSIONS);
    let limits = build_limits(&mut file, overrides, max_sessions)?;
    let log = overrides
        .log
        .clone()
        .or(file.log)
        .unwrap_or_else(|| DEFAULT_LOG.to_owned());
    let shards = match overrides.shards.or(file.shards).unwrap_or(0) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let pin_cores = overrides.pin_cores.or(file.pin_cores).unwrap_or(true);
    let io_backend = overrides.io_backend.or(file.io_backend).unwrap_or_default();
    let udp_gso = overrides.udp_gso.or(file.udp_gso).unwrap_or(true);
    let shard_ports = overrides
        .shard_ports
        .or(file.shard_ports)
        .unwrap_or_default();
    let mesh_recovery = overrides
        .mesh_recovery
        .or(file.mesh_recovery)
        .unwrap_or_default();
    let codecs = if overrides.codecs.is_empty() {
        file.codecs
            .clone()
            .unwrap_or_else(|| ridge_sfu::CodecSpec::ALL.to_vec())
    } else {
        overrides.codecs.clone()
    };
    check_codecs(&codecs)?;
    let configured_socket = overrides
        .control_socket
        .clone()
        .or(file.control_socket.clone());
    let control_socket_is_default = configured_socket.is_none();
    let control_socket = match configured_socket {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p),
        None => default_control_socket(
            process_euid(),
            std::env::var("XDG_RUNTIME_DIR").ok().as_deref(),
        ),
    };
    if let Some(p) = &control_socket {
        if p.is_relative() {
            return Err(invalid(
                "control_socket",
                format!(
                    "{} is relative: give an absolute path (--control-socket), or \"\" to \
                     disable the control API",
                    p.display()
                ),
            ));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if p.as_os_str().len() > 107 {
            return Err(invalid(
                "control_socket",
                format!(
                    "{} is longer than the 107 bytes a Unix socket path may have",
                    p.display()
                ),
            ));
        }
    }
    let kernel = KernelConfig {
        xdp: overrides.xdp.or(file.xdp).unwrap_or_default(),
        media_interfaces: if overrides.media_interfaces.is_empty() {
            file.media_interfaces.unwrap_or_default()
        } else {
            overrides.media_interfaces.clone()
        },
        guard_rate_pps: overrides
            .guard_rate_pps
            .or(file.guard_rate_pps)
            .unwrap_or(DEFAULT_GUARD_RATE_PPS),
        guard_burst: overrides
            .guard_burst
            .or(file.guard_burst)
            .unwrap_or(DEFAULT_GUARD_BURST),
        kernel_forwarding: overrides
            .kernel_forwarding
            .or(file.kernel_forwarding)
            .unwrap_or(true),
    };
    check_kernel(&kernel)?;

    // Secret.
    let jwt_secret = pick_secret(overrides.jwt_secret.as_ref(), env_secret, file.jwt_secret);
    match &jwt_secret {
        Some(secret) => check_secret_len(secret)?,
        None if dev_no_auth => {}
        None => {
            return Err(invalid(
                "jwt_secret",
                format!(
                    "no JWT secret configured: set the {ENV_JWT_SECRET} environment variable \
                     or `jwt_secret` in the config file, at least {MIN_SECRET_LEN} bytes \
                     ({SECRET_HINT}); --dev-no-auth disables authentication for local \
                     development only"
                ),
            ));
        }
    }

    // TLS.
    let tls_cert = overrides.tls_cert.clone().or(file.tls_cert);
    let tls_key = overrides.tls_key.clone().or(file.tls_key);
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => {
            check_private("tls_key", &key)?;
            check_cert_file(&cert)?;
            check_key_file(&key)?;
            Some(TlsConfig { cert, key })
        }
        (Some(_), None) => {
            return Err(invalid(
                "tls_key",
                "tls_cert is set but tls_key is not: set both (PEM certificate chain and \
                 PEM private key, --tls-cert/--tls-key) or neither",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "tls_cert",
                "tls_key is set but tls_cert is not: set both (PEM certificate chain and \
                 PEM private key, --tls-cert/--tls-key) or neither",
            ));
        }
        (None, None) => None,
    };
    if tls.is_none() && !insecure_http && !http.ip().is_loopback() {
        return Err(invalid(
            "http",
            format!(
                "{http} is not a loopback address and TLS is off: browsers need a secure \
                 origin (HTTPS) for WebRTC, and tokens would travel in clear text; set \
                 tls_cert/tls_key (--tls-cert/--tls-key), or insecure_http = true \
                 (--insecure-http) if a TLS-terminating proxy is in front of this node"
            ),
        ));
    }

    // Media addresses.
    let configured_ips = if overrides.public_ip.is_empty() {
        file.public_ip.unwrap_or_default()
    } else {
        overrides.public_ip.clone()
    };
    let public_ip = if configured_ips.is_empty() {
        if udp.ip().is_unspecified() {
            return Err(invalid(
                "public_ip",
                format!(
                    "udp listens on {udp} (all interfaces), so the address to advertise in \
                     ICE candidates is unknown: set public_ip = [\"203.0.113.7\"] \
                     (--public-ip) to the address clients reach this node on, or bind udp \
                     to a specific address"
                ),
            ));
        }
        vec![udp.ip()]
    } else {
        let mut ips: Vec<IpAddr> = Vec::with_capacity(configured_ips.len());
        for ip in configured_ips {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(
                    "public_ip",
                    format!(
                        "{ip} cannot be advertised in ICE candidates: give the unicast \
                         address clients reach this node on"
                    ),
                ));
            }
            let family_ok = match udp.ip() {
                // A dual-stack [::] socket serves both families.
                IpAddr::V6(v6) if v6.is_unspecified() => true,
                IpAddr::V4(_) => ip.is_ipv4(),
                IpAddr::V6(_) => ip.is_ipv6(),
            };
            if !family_ok {
                return Err(invalid(
                    "public_ip",
                    format!(
                        "{ip} is not the same address family as udp = {udp}: media sent to \
                         it could never reach the socket; bind udp to [::] or use an \
                         address of the same family"
                    ),
                ));
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips
    };

    // Ranges.
    if drain_timeout > MAX_DRAIN_TIMEOUT {
        return Err(invalid(
            "drain_timeout",
            format!(
                "{} is too long: at most {} (--drain-timeout)",
                fmt_duration(drain_timeout),
                fmt_duration(MAX_DRAIN_TIMEOUT)
            ),
        ));
    }
    if shards > MAX_SHARDS {
        return Err(invalid(
            "shards",
            format!("{shards} is too many: at most {MAX_SHARDS} (--shards; 0 = one per core)"),
        ));
    }
    if shard_ports == ShardPorts::PerShard
        && udp.port() != 0
        && usize::from(udp.port()) + shards - 1 > usize::from(u16::MAX)
    {
        return Err(invalid(
            "shards",
            format!(
                "{shards} shards listen on ports {} ..= {}, past 65535: lower the udp port \
                 or the shard count",
                udp.port(),
                usize::from(udp.port()) + shards - 1
            ),
        ));
    }
    if max_sessions == 0 {
        return Err(invalid(
            "max_sessions",
            "must be at least 1 (--max-sessions)",
        ));
    }
    if !(MIN_PLI_INTERVAL..=MAX_PLI_INTERVAL).contains(&pli_interval) {
        return Err(invalid(
            "pli_interval",
            format!(
                "{} is out of range: use {} ..= {} (--pli-interval)",
                fmt_duration(pli_interval),
                fmt_duration(MIN_PLI_INTERVAL),
                fmt_duration(MAX_PLI_INTERVAL)
            ),
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        return Err(invalid(
            "log",
            format!(
                "`{log}` is not a valid tracing filter ({e}); write e.g. \"info\" or \
                 \"ridge_dataplane=debug,info\" (--log)"
            ),
        ));
    }

    Ok(Config {
        http,
        udp,
        public_ip,
        jwt_secret,
        tls,
        insecure_http,
        dev_no_auth,
        drain_timeout,
        max_sessions,
        pli_interval,
        shards,
        pin_cores,
        io_backend,
        udp_gso,
        shard_ports,
        mesh_recovery,
        codecs,
        kernel,
        log,
        control_socket,
        control_socket_is_default,
        limits,
        ws,
        http_limits,
    })
}

fn check_codecs(codecs: &[ridge_sfu::CodecSpec]) -> Result<(), ConfigError> {
    if codecs.is_empty() {
        return Err(invalid(
            "codecs",
            "names at least one codec: opus, vp8, h264, vp9, av1 (--codecs)",
        ));
    }
    for (i, c) in codecs.iter().enumerate() {
        if codecs[..i].contains(c) {
            return Err(invalid("codecs", format!("{c} is named twice (--codecs)")));
        }
    }
    Ok(())
}

fn check_kernel(k: &KernelConfig) -> Result<(), ConfigError> {
    for name in &k.media_interfaces {
        if name.is_empty()
            || name.len() > MAX_IFNAME
            || name == "."
            || name == ".."
            || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "media_interfaces",
                format!(
                    "`{}` is not a network interface name (1..={MAX_IFNAME} bytes, no '/', \
                     ':' or whitespace) (--media-interface)",
                    name.escape_debug()
                ),
            ));
        }
    }
    if k.guard_rate_pps > 0 && k.guard_burst == 0 {
        return Err(invalid(
            "guard_burst",
            "must be at least 1 while guard_rate_pps is set (--guard-burst); \
             set guard_rate_pps = 0 to turn the rate limit off",
        ));
    }
    Ok(())
}

fn check_cert_file(path: &Path) -> Result<(), ConfigError> {
    let field = "tls_cert";
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| pem_error(field, path, e))?;
    let mut count = 0usize;
    for item in iter {
        item.map_err(|e| pem_error(field, path, e))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid(
            field,
            format!(
                "{} contains no PEM certificate (expected at least one \
                 -----BEGIN CERTIFICATE----- block)",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn check_key_file(path: &Path) -> Result<(), ConfigError> {
    let field = "tls_key";
    let iter = PrivateKeyDer::pem_file_iter(path).map_err(|e| pem_error(field, path, e))?;
    let mut count = 0usize;
    for item in iter {
        item.map_err(|e| pem_error(field, path, e))?;
        count += 1;
    }
    match count {
        1 => Ok(()),
        0 => Err(invalid(
            field,
            format!(
                "{} contains no PEM private key (expected one PRIVATE KEY, RSA PRIVATE KEY \
                 or EC PRIVATE KEY block)",
                path.display()
            ),
        )),
        n => Err(invalid(
            field,
            format!(
                "{} contains {n} private keys; expected exactly one",
                path.display()
            ),
        )),
    }
}

fn pem_error(field: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> ConfigError {
    let what = match &e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read {}: {io}", path.display()),
        // The other variants describe structure only, never key material.
        other => format!("{} is not valid PEM: {other}", path.display()),
    };
    invalid(field, what)
}

#[cfg(test)]
mod tests;
