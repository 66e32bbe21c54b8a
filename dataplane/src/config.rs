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

use ridge_sfu::{Cidr, QuotaLimits};
use ridge_wire::config::{duration_setting, invalid, read_file};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The configuration error and the secret string, shared with the
/// scheduler and the agent.
pub use ridge_wire::config::{ConfigError, Secret};

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

/// Default cap on WebSocket room sessions on the node.
pub const DEFAULT_WS_MAX_SESSIONS: usize = 10_000;
/// Default cap on WebSocket room sessions of one identity.
pub const DEFAULT_WS_MAX_SESSIONS_PER_IDENTITY: usize = 16;
/// Default bound of one socket's send queue, in bytes.
pub const DEFAULT_WS_SEND_QUEUE_BYTES: usize = 1024 * 1024;
/// Default bound of one session's resume (replay) buffer, in bytes.
pub const DEFAULT_WS_RESUME_BUFFER_BYTES: usize = 256 * 1024;
/// Default chat and data messages per second per participant.
pub const DEFAULT_WS_MESSAGE_RATE: u32 = 20;
/// Default burst of the chat/data token bucket.
pub const DEFAULT_WS_MESSAGE_BURST: u32 = 40;
/// Default warning before a session's token expires.
pub const DEFAULT_WS_TOKEN_WARNING: Duration = Duration::from_secs(60);
/// Default time a client has to send a request's headers (and, on a
/// kept-alive connection, the next request).
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a request's body.
pub const DEFAULT_HTTP_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a connection may pass with no byte read or written.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a TLS handshake may take.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of the automatic `http_max_connections`.
pub const AUTO_MAX_CONNECTIONS: usize = 16_384;
/// Upper bound of the automatic `http_max_connections_per_source`.
pub const AUTO_MAX_CONNECTIONS_PER_SOURCE: usize = 256;
const MIN_LIMIT_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_LIMIT_TIMEOUT: Duration = Duration::from_secs(600);
const MIN_WS_QUEUE_BYTES: usize = 32 * 1024;
const MIN_WS_RESUME_BYTES: usize = 16 * 1024;
const MAX_WS_BYTES: usize = 1 << 30;

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

/// Limits of the WebSocket room API (docs/operations.md, "Limits and abuse").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsConfig {
    pub max_sessions: usize,
    pub max_sessions_per_identity: usize,
    pub send_queue_bytes: usize,
    pub resume_buffer_bytes: usize,
    pub message_rate: u32,
    pub message_burst: u32,
    pub token_warning: Duration,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_WS_MAX_SESSIONS,
            max_sessions_per_identity: DEFAULT_WS_MAX_SESSIONS_PER_IDENTITY,
            send_queue_bytes: DEFAULT_WS_SEND_QUEUE_BYTES,
            resume_buffer_bytes: DEFAULT_WS_RESUME_BUFFER_BYTES,
            message_rate: DEFAULT_WS_MESSAGE_RATE,
            message_burst: DEFAULT_WS_MESSAGE_BURST,
            token_warning: DEFAULT_WS_TOKEN_WARNING,
        }
    }
}

/// Timeouts and connection caps of the HTTP(S) listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
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

/// Sessions and media: what one identity and one token may hold, how long
/// a session may take to connect or stay silent, and where plain-RTP
/// endpoints may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub ice_consent_timeout: Duration,
    pub rtp_consent_timeout: Duration,
    pub rtp_allow_networks: Vec<Cidr>,
    pub rtp_trusted_networks: Vec<Cidr>,
    pub per_identity: QuotaLimits,
    pub per_token: QuotaLimits,
}

/// Defaults of [`Limits`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_ICE_CONSENT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RTP_CONSENT_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_IDENTITY_MAX_ROOMS: usize = 16;

/// Parses a list of CIDRs of setting `field`.
fn networks(field: &'static str, list: Option<Vec<String>>) -> Result<Vec<Cidr>, ConfigError> {
    list.unwrap_or_default()
        .iter()
        .map(|s| s.parse::<Cidr>().map_err(|e| invalid(field, e.to_string())))
        .collect()
}

/// The limits of `file` and `overrides`, defaults derived from
/// `max_sessions`.
fn build_limits(
    file: &mut FileConfig,
    overrides: &Overrides,
    max_sessions: usize,
) -> Result<Limits, ConfigError> {
    let timeout = |field: &'static str,
                   flag: Option<Duration>,
                   file: Option<&str>,
                   default: Duration,
                   max: Duration|
     -> Result<Duration, ConfigError> {
        let d = duration_setting(field, flag, file, default)?;
        if d < Duration::from_secs(1) || d > max {
            return Err(invalid(
                field,
                format!(
                    "{} is out of range: use 1s ..= {}",
                    fmt_duration(d),
                    fmt_duration(max)
                ),
            ));
        }
        Ok(d)
    };
    let ten_minutes = Duration::from_secs(600);
    let handshake_timeout = timeout(
        "handshake_timeout",
        overrides.handshake_timeout,
        file.handshake_timeout.as_deref(),
        DEFAULT_HANDSHAKE_TIMEOUT,
        Duration::from_secs(120),
    )?;
    let ice_consent_timeout = timeout(
        "ice_consent_timeout",
        None,
        file.ice_consent_timeout.as_deref(),
        DEFAULT_ICE_CONSENT_TIMEOUT,
        ten_minutes,
    )?;
    let rtp_consent_timeout = timeout(
        "rtp_consent_timeout",
        overrides.rtp_consent_timeout,
        file.rtp_consent_timeout.as_deref(),
        DEFAULT_RTP_CONSENT_TIMEOUT,
        ten_minutes,
    )?;
    let rtp_allow_networks = if overrides.rtp_allow_networks.is_empty() {
        networks("rtp_allow_networks", file.rtp_allow_networks.take())?
    } else {
        overrides.rtp_allow_networks.clone()
    };
    let rtp_trusted_networks = if overrides.rtp_trusted_networks.is_empty() {
        networks("rtp_trusted_networks", file.rtp_trusted_networks.take())?
    } else {
        overrides.rtp_trusted_networks.clone()
    };
    let sessions = overrides
        .identity_max_sessions
        .or(file.identity_max_sessions)
        .unwrap_or(max_sessions.max(1).div_ceil(4));
    let per_identity = QuotaLimits {
        sessions,
        rooms: file
            .identity_max_rooms
            .unwrap_or(DEFAULT_IDENTITY_MAX_ROOMS),
        tracks: file
            .identity_max_tracks
            .unwrap_or(sessions.saturating_mul(2)),
        rtp_endpoints: file.identity_max_rtp_endpoints.unwrap_or(sessions),
    };
    let per_token = QuotaLimits {
        sessions: overrides
            .token_max_sessions
            .or(file.token_max_sessions)
            .unwrap_or(per_identity.sessions),
        rooms: file.token_max_rooms.unwrap_or(per_identity.rooms),
        tracks: file.token_max_tracks.unwrap_or(per_identity.tracks),
        rtp_endpoints: file
            .token_max_rtp_endpoints
            .unwrap_or(per_identity.rtp_endpoints),
    };
    for (field, v) in [
        ("identity_max_sessions", per_identity.sessions),
        ("identity_max_rooms", per_identity.rooms),
        ("identity_max_tracks", per_identity.tracks),
        ("identity_max_rtp_endpoints", per_identity.rtp_endpoints),
        ("token_max_sessions", per_token.sessions),
        ("token_max_rooms", per_token.rooms),
        ("token_max_tracks", per_token.tracks),
        ("token_max_rtp_endpoints", per_token.rtp_endpoints),
    ] {
        if v == 0 {
            return Err(invalid(field, "must be at least 1"));
        }
    }
    Ok(Limits {
        handshake_timeout,
        ice_consent_timeout,
        rtp_consent_timeout,
        rtp_allow_networks,
        rtp_trusted_networks,
        per_identity,
        per_token,
    })
}

/// The soft `RLIMIT_NOFILE` of this process, if it can be read.
pub fn descriptor_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// `http_max_connections` when none is configured: half the descriptor
/// limit (the rest is for media sockets, the kernel path and headroom), at
/// most [`AUTO_MAX_CONNECTIONS`].
pub fn auto_max_connections(nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => usize::try_from(n / 2)
            .unwrap_or(usize::MAX)
            .clamp(1, AUTO_MAX_CONNECTIONS),
        None => 1024,
    }
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
        kernel,
        log,
        control_socket,
        control_socket_is_default,
        limits,
        ws,
        http_limits,
    })
}

fn limit_duration(
    field: &'static str,
    flag: &str,
    over: Option<Duration>,
    file: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration_setting(field, over, file, default)?;
    if !(MIN_LIMIT_TIMEOUT..=MAX_LIMIT_TIMEOUT).contains(&d) {
        return Err(invalid(
            field,
            format!(
                "{} is out of range: use {} ..= {} ({flag})",
                fmt_duration(d),
                fmt_duration(MIN_LIMIT_TIMEOUT),
                fmt_duration(MAX_LIMIT_TIMEOUT)
            ),
        ));
    }
    Ok(d)
}

fn at_least(
    field: &'static str,
    flag: &str,
    v: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    if v < min || v > max {
        return Err(invalid(
            field,
            format!("{v} is out of range: use {min} ..= {max} ({flag})"),
        ));
    }
    Ok(v)
}

fn build_ws(file: &FileConfig, o: &Overrides) -> Result<WsConfig, ConfigError> {
    let d = WsConfig::default();
    let ws = WsConfig {
        max_sessions: at_least(
            "ws_max_sessions",
            "--ws-max-sessions",
            o.ws_max_sessions
                .or(file.ws_max_sessions)
                .unwrap_or(d.max_sessions),
            1,
            10_000_000,
        )?,
        max_sessions_per_identity: at_least(
            "ws_max_sessions_per_identity",
            "--ws-max-sessions-per-identity",
            o.ws_max_sessions_per_identity
                .or(file.ws_max_sessions_per_identity)
                .unwrap_or(d.max_sessions_per_identity),
            1,
            10_000_000,
        )?,
        send_queue_bytes: at_least(
            "ws_send_queue_bytes",
            "--ws-send-queue-bytes",
            o.ws_send_queue_bytes
                .or(file.ws_send_queue_bytes)
                .unwrap_or(d.send_queue_bytes),
            MIN_WS_QUEUE_BYTES,
            MAX_WS_BYTES,
        )?,
        resume_buffer_bytes: at_least(
            "ws_resume_buffer_bytes",
            "--ws-resume-buffer-bytes",
            o.ws_resume_buffer_bytes
                .or(file.ws_resume_buffer_bytes)
                .unwrap_or(d.resume_buffer_bytes),
            MIN_WS_RESUME_BYTES,
            MAX_WS_BYTES,
        )?,
        message_rate: o
            .ws_message_rate
            .or(file.ws_message_rate)
            .unwrap_or(d.message_rate),
        message_burst: o
            .ws_message_burst
            .or(file.ws_message_burst)
            .unwrap_or(d.message_burst),
        token_warning: duration_setting(
            "ws_token_warning",
            o.ws_token_warning,
            file.ws_token_warning.as_deref(),
            d.token_warning,
        )?,
    };
    if ws.message_rate == 0 {
        return Err(invalid(
            "ws_message_rate",
            "must be at least 1 chat/data message per second (--ws-message-rate)",
        ));
    }
    if ws.message_burst == 0 {
        return Err(invalid(
            "ws_message_burst",
            "must be at least 1 (--ws-message-burst)",
        ));
    }
    if ws.token_warning > Duration::from_secs(3600) {
        return Err(invalid(
            "ws_token_warning",
            format!(
                "{} is too long: at most 1h (--ws-token-warning)",
                fmt_duration(ws.token_warning)
            ),
        ));
    }
    Ok(ws)
}

fn build_http_limits(file: &FileConfig, o: &Overrides) -> Result<HttpLimits, ConfigError> {
    let max_connections = match o.http_max_connections.or(file.http_max_connections) {
        None | Some(0) => auto_max_connections(descriptor_limit()),
        Some(n) => at_least(
            "http_max_connections",
            "--http-max-connections",
            n,
            1,
            10_000_000,
        )?,
    };
    let max_connections_per_source = match o
        .http_max_connections_per_source
        .or(file.http_max_connections_per_source)
    {
        None | Some(0) => (max_connections / 2).clamp(1, AUTO_MAX_CONNECTIONS_PER_SOURCE),
        Some(n) => at_least(
            "http_max_connections_per_source",
            "--http-max-connections-per-source",
            n,
            1,
            10_000_000,
        )?,
    };
    Ok(HttpLimits {
        header_timeout: limit_duration(
            "http_header_timeout",
            "--http-header-timeout",
            o.http_header_timeout,
            file.http_header_timeout.as_deref(),
            DEFAULT_HTTP_HEADER_TIMEOUT,
        )?,
        body_timeout: limit_duration(
            "http_body_timeout",
            "--http-body-timeout",
            o.http_body_timeout,
            file.http_body_timeout.as_deref(),
            DEFAULT_HTTP_BODY_TIMEOUT,
        )?,
        idle_timeout: limit_duration(
            "http_idle_timeout",
            "--http-idle-timeout",
            o.http_idle_timeout,
            file.http_idle_timeout.as_deref(),
            DEFAULT_HTTP_IDLE_TIMEOUT,
        )?,
        tls_handshake_timeout: limit_duration(
            "tls_handshake_timeout",
            "--tls-handshake-timeout",
            o.tls_handshake_timeout,
            file.tls_handshake_timeout.as_deref(),
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        )?,
        max_connections,
        max_connections_per_source,
    })
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
mod tests {
    use super::*;
    use std::net::Ipv6Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SECRET: &str = "0123456789abcdef-test-secret";

    fn env() -> Option<String> {
        Some(SECRET.to_owned())
    }

    fn ok(toml: &str) -> Config {
        from_toml_str(toml, &Overrides::default(), env()).expect("valid config")
    }

    fn err(toml: &str, overrides: &Overrides) -> (&'static str, String) {
        match from_toml_str(toml, overrides, env()) {
            Err(ConfigError::Invalid { field, message }) => (field, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn limits_default_below_max_sessions_and_parse() {
        let c = from_toml_str("max_sessions = 100\n", &Overrides::default(), env()).unwrap();
        let l = &c.limits;
        assert_eq!(l.per_identity.sessions, 25);
        assert_eq!(l.per_identity.tracks, 50);
        assert_eq!(l.per_identity.rtp_endpoints, 25);
        assert_eq!(l.per_identity.rooms, DEFAULT_IDENTITY_MAX_ROOMS);
        assert_eq!(l.per_token, l.per_identity);
        assert_eq!(l.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(l.rtp_consent_timeout, DEFAULT_RTP_CONSENT_TIMEOUT);
        assert!(l.rtp_allow_networks.is_empty() && l.rtp_trusted_networks.is_empty());
        assert!(
            c.warnings()
                .iter()
                .all(|w| !w.contains("identity_max_sessions"))
        );

        let c = from_toml_str(
            "max_sessions = 10\nidentity_max_sessions = 10\ntoken_max_sessions = 2\n\
             handshake_timeout = \"5s\"\nrtp_allow_networks = [\"127.0.0.0/8\"]\n\
             rtp_trusted_networks = [\"10.0.0.0/8\", \"fd00::/8\"]\n",
            &Overrides::default(),
            env(),
        )
        .unwrap();
        assert_eq!(c.limits.per_identity.sessions, 10);
        assert_eq!(c.limits.per_token.sessions, 2);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(5));
        assert_eq!(c.limits.rtp_allow_networks[0].to_string(), "127.0.0.0/8");
        assert_eq!(c.limits.rtp_trusted_networks.len(), 2);
        assert!(
            c.warnings()
                .iter()
                .any(|w| w.contains("identity_max_sessions"))
        );

        let (field, msg) = err(
            "rtp_trusted_networks = [\"10.0.0.0/33\"]\n",
            &Overrides::default(),
        );
        assert_eq!(field, "rtp_trusted_networks");
        assert!(msg.contains("CIDR"), "{msg}");
        let (field, _) = err("token_max_rooms = 0\n", &Overrides::default());
        assert_eq!(field, "token_max_rooms");
        let (field, _) = err("handshake_timeout = \"10m\"\n", &Overrides::default());
        assert_eq!(field, "handshake_timeout");
    }

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A fresh, process-unique scratch directory.
    fn scratch() -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ridge-config-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    // Structurally valid PEM (the DER inside is not checked by PEM parsing).
    const CERT_PEM: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydA==\n-----END CERTIFICATE-----\n";
    const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH\n-----END PRIVATE KEY-----\n";

    fn tls_files(cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let dir = scratch();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Secret files must be private; the tests also pass the
        // certificate where a key is expected.
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o600)).unwrap();
        (c, k)
    }

    #[test]
    fn defaults() {
        let c = ok("");
        assert_eq!(c.http, DEFAULT_HTTP);
        assert_eq!(c.http.to_string(), "127.0.0.1:8080");
        assert_eq!(c.udp.to_string(), "127.0.0.1:5004");
        assert_eq!(c.public_ip, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(c.jwt_secret.as_ref().unwrap().expose(), SECRET);
        assert!(c.tls.is_none());
        assert!(!c.insecure_http);
        assert!(!c.dev_no_auth);
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.max_sessions, 1000);
        assert_eq!(c.pli_interval, Duration::from_millis(500));
        assert_eq!(c.log, "info");
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn udp_gso_on_by_default_and_off_by_file_or_flag() {
        assert!(ok("").udp_gso);
        assert!(!ok("udp_gso = false").udp_gso);
        let o = Overrides {
            udp_gso: Some(false),
            ..Overrides::default()
        };
        let c = from_toml_str("udp_gso = true", &o, env()).expect("config");
        assert!(!c.udp_gso, "the flag wins over the file");
    }

    #[test]
    fn shard_ports_per_shard_by_default_or_shared() {
        assert_eq!(ok("").shard_ports, ShardPorts::PerShard);
        assert_eq!(
            ok(r#"shard_ports = "per-shard""#).shard_ports,
            ShardPorts::PerShard
        );
        let c = ok("shard_ports = \"shared\"\nshards = 4\nudp = \"127.0.0.1:65535\"");
        assert_eq!(c.shard_ports, ShardPorts::Shared);
        assert_eq!(c.shard_ports.as_str(), "shared");
        // Per-shard, the same would run past port 65535.
        let (field, msg) = err(
            "shards = 4\nudp = \"127.0.0.1:65535\"",
            &Overrides::default(),
        );
        assert_eq!(field, "shards", "{msg}");
        // The flag wins over the file.
        let over = Overrides {
            shard_ports: Some(ShardPorts::PerShard),
            ..Overrides::default()
        };
        let c = from_toml_str(r#"shard_ports = "shared""#, &over, env()).unwrap();
        assert_eq!(c.shard_ports, ShardPorts::PerShard);
        assert!(from_toml_str(r#"shard_ports = "one""#, &Overrides::default(), env()).is_err());
    }

    #[test]
    fn kernel_defaults_and_values() {
        let c = ok("");
        assert_eq!(
            c.kernel,
            KernelConfig {
                xdp: XdpSetting::Auto,
                media_interfaces: vec![],
                guard_rate_pps: 10_000,
                guard_burst: 2_000,
                kernel_forwarding: true,
            }
        );
        let c = ok(r#"
            xdp = "off"
            media_interfaces = ["eth0", "ens1f0"]
            guard_rate_pps = 0
            guard_burst = 0
            kernel_forwarding = false
        "#);
        assert_eq!(c.kernel.xdp, XdpSetting::Off);
        assert_eq!(c.kernel.media_interfaces, vec!["eth0", "ens1f0"]);
        assert_eq!((c.kernel.guard_rate_pps, c.kernel.guard_burst), (0, 0));
        assert!(!c.kernel.kernel_forwarding);
        let o = Overrides {
            media_interfaces: vec!["b0".into()],
            xdp: Some(XdpSetting::Auto),
            ..Overrides::default()
        };
        let c = from_toml_str("xdp = \"off\"\nmedia_interfaces = [\"eth0\"]", &o, env()).unwrap();
        assert_eq!(c.kernel.xdp, XdpSetting::Auto);
        assert_eq!(c.kernel.media_interfaces, vec!["b0"]);
    }

    #[test]
    fn kernel_settings_are_validated() {
        let o = Overrides::default();
        for bad in ["", "a/b", "eth 0", "sixteen-chars-xx", "..", "eth0:1"] {
            let (field, msg) = err(&format!("media_interfaces = [{bad:?}]"), &o);
            assert_eq!(field, "media_interfaces", "{bad:?}: {msg}");
        }
        let (field, _) = err("guard_rate_pps = 100\nguard_burst = 0", &o);
        assert_eq!(field, "guard_burst");
        assert!(from_toml_str("xdp = \"maybe\"", &o, env()).is_err());
        // A wildcard udp without interfaces is valid, with a warning.
        let c = ok("udp = \"0.0.0.0:5004\"\npublic_ip = [\"203.0.113.7\"]");
        assert!(
            c.warnings().iter().any(|w| w.contains("media_interfaces")),
            "{:?}",
            c.warnings()
        );
        let c = ok("udp = \"0.0.0.0:5004\"\npublic_ip = [\"203.0.113.7\"]\nxdp = \"off\"");
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn load_without_file_uses_defaults() {
        let c = load(None, &Overrides::default(), env()).unwrap();
        assert_eq!(c.http, DEFAULT_HTTP);
    }

    #[test]
    fn file_values_are_used() {
        let c = ok(r#"
            http = "127.0.0.1:9000"
            udp = "0.0.0.0:0"
            public_ip = ["203.0.113.7", "203.0.113.7", "198.51.100.1"]
            drain_timeout = "1m 30s"
            max_sessions = 5
            pli_interval = "1s"
            log = "ridge_dataplane=debug,info"
        "#);
        assert_eq!(c.http.port(), 9000);
        assert_eq!(c.udp.port(), 0);
        assert_eq!(
            c.public_ip,
            vec![
                "203.0.113.7".parse::<IpAddr>().unwrap(),
                "198.51.100.1".parse().unwrap()
            ]
        );
        assert_eq!(c.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.max_sessions, 5);
        assert_eq!(c.pli_interval, Duration::from_secs(1));
        assert_eq!(c.log, "ridge_dataplane=debug,info");
    }

    #[test]
    fn precedence_flags_env_file_defaults() {
        let file = r#"
            http = "127.0.0.1:9000"
            max_sessions = 5
            drain_timeout = "20s"
            jwt_secret = "file-secret-file-secret"
            public_ip = ["127.0.0.2"]
        "#;
        // env beats file for the secret.
        let c = from_toml_str(file, &Overrides::default(), env()).unwrap();
        assert_eq!(c.jwt_secret.unwrap().expose(), SECRET);
        // file used when env unset (or empty).
        let c = from_toml_str(file, &Overrides::default(), None).unwrap();
        assert_eq!(c.jwt_secret.unwrap().expose(), "file-secret-file-secret");
        let c = from_toml_str(file, &Overrides::default(), Some(String::new())).unwrap();
        assert_eq!(c.jwt_secret.unwrap().expose(), "file-secret-file-secret");
        // flags beat file.
        let o = Overrides {
            http: Some("127.0.0.1:9100".parse().unwrap()),
            max_sessions: Some(7),
            drain_timeout: Some(Duration::from_secs(3)),
            public_ip: vec!["127.0.0.3".parse().unwrap()],
            jwt_secret: Some(Secret::new("flag-secret-flag-secret")),
            log: Some("debug".into()),
            ..Overrides::default()
        };
        let c = from_toml_str(file, &o, env()).unwrap();
        assert_eq!(c.http.port(), 9100);
        assert_eq!(c.max_sessions, 7);
        assert_eq!(c.drain_timeout, Duration::from_secs(3));
        assert_eq!(c.public_ip, vec!["127.0.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.jwt_secret.unwrap().expose(), "flag-secret-flag-secret");
        assert_eq!(c.log, "debug");
    }

    #[test]
    fn load_reads_file() {
        let dir = scratch();
        let path = dir.join("ridge.toml");
        std::fs::write(&path, "max_sessions = 3\n").unwrap();
        let c = load(Some(&path), &Overrides::default(), env()).unwrap();
        assert_eq!(c.max_sessions, 3);
    }

    #[test]
    fn missing_file_is_read_error() {
        let path = scratch().join("nope.toml");
        let e = load(Some(&path), &Overrides::default(), env()).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("nope.toml"), "{e}");
    }

    #[test]
    fn parse_errors_have_line_and_column() {
        let e = from_toml_str(
            "max_sessions = 1\nbogus = 3\n",
            &Overrides::default(),
            env(),
        )
        .unwrap_err();
        let ConfigError::Parse { message, path } = &e else {
            panic!("{e:?}")
        };
        assert!(path.is_none());
        assert!(message.contains("line 2, column 1"), "{message}");
        assert!(message.contains("bogus"), "{message}");

        let e =
            from_toml_str("max_sessions = \"many\"\n", &Overrides::default(), env()).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");

        let e =
            from_toml_str("http = \"not an address\"\n", &Overrides::default(), env()).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
    }

    #[test]
    fn parse_errors_never_show_the_secret() {
        for src in [
            "jwt_secret = \"super-secret-value-123\n",
            "jwt_secret = 'super-secret-value-123' junk\n",
            "jwt_secret = 9876543210123456\n",
            "max_sessions = 1\njwt_secret = [\"super-secret-value-123\"]\n",
        ] {
            let e = from_toml_str(src, &Overrides::default(), None).unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(!text.contains("super-secret-value-123"), "{text}");
            assert!(!text.contains("9876543210123456"), "{text}");
            assert!(text.contains("line"), "{text}");
        }
    }

    #[test]
    fn secret_missing() {
        let e = from_toml_str("", &Overrides::default(), None).unwrap_err();
        assert_eq!(e.field(), Some("jwt_secret"));
        let msg = e.to_string();
        assert!(msg.contains("RIDGE_JWT_SECRET"), "{msg}");
        assert!(msg.contains("jwt_secret"), "{msg}");
    }

    #[test]
    fn secret_too_short() {
        let e = from_toml_str("", &Overrides::default(), Some("short".into())).unwrap_err();
        assert_eq!(e.field(), Some("jwt_secret"));
        let msg = e.to_string();
        assert!(msg.contains("16 bytes"), "{msg}");
        assert!(!msg.contains("short\""), "{msg}");
    }

    #[test]
    fn dev_no_auth_needs_no_secret() {
        let c = from_toml_str("dev_no_auth = true", &Overrides::default(), None).unwrap();
        assert!(c.dev_no_auth);
        assert!(c.jwt_secret.is_none());
        assert_eq!(c.warnings().len(), 1);
        let o = Overrides {
            dev_no_auth: Some(true),
            ..Overrides::default()
        };
        let c = from_toml_str("", &o, None).unwrap();
        assert!(c.dev_no_auth);
    }

    #[test]
    fn secret_never_in_debug_or_errors() {
        let c = ok("");
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(dbg.contains("<redacted>"));
        let s = Secret::new(SECRET);
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(format!("{s:?}"), "<redacted>");
        let fc = parse_file_config(&format!("jwt_secret = \"{SECRET}\""), None).unwrap();
        assert!(!format!("{fc:?}").contains(SECRET));
        let o = Overrides {
            jwt_secret: Some(s),
            ..Overrides::default()
        };
        assert!(!format!("{o:?}").contains(SECRET));
        // Every validation error below is produced with the secret configured.
        let e = from_toml_str("max_sessions = 0", &Overrides::default(), env()).unwrap_err();
        assert!(!format!("{e} {e:?}").contains(SECRET));
    }

    #[test]
    fn non_loopback_http_needs_tls_or_insecure() {
        let (field, msg) = err("http = \"0.0.0.0:8080\"", &Overrides::default());
        assert_eq!(field, "http");
        assert!(msg.contains("secure origin"), "{msg}");
        assert!(msg.contains("tls_cert/tls_key"), "{msg}");
        assert!(msg.contains("insecure_http = true"), "{msg}");

        let c = ok("http = \"0.0.0.0:8080\"\ninsecure_http = true");
        assert!(c.insecure_http);
        assert_eq!(c.warnings().len(), 1);
        let c = ok("http = \"[::1]:8080\"");
        assert!(c.tls.is_none());
    }

    #[test]
    fn tls_both_or_neither() {
        let (c, k) = tls_files(CERT_PEM, KEY_PEM);
        let (field, msg) = err(
            &format!("tls_cert = {:?}", c.display().to_string()),
            &Overrides::default(),
        );
        assert_eq!(field, "tls_key");
        assert!(msg.contains("both"), "{msg}");
        let o = Overrides {
            tls_key: Some(k.clone()),
            ..Overrides::default()
        };
        let (field, _) = err("", &o);
        assert_eq!(field, "tls_cert");
        // Combined from file and flag.
        let conf = from_toml_str(
            &format!(
                "tls_cert = {:?}\nhttp = \"0.0.0.0:443\"",
                c.display().to_string()
            ),
            &o,
            env(),
        )
        .unwrap();
        assert_eq!(conf.tls, Some(TlsConfig { cert: c, key: k }));
    }

    #[test]
    fn tls_files_must_exist_and_parse() {
        let (c, k) = tls_files(CERT_PEM, KEY_PEM);
        let missing = c.with_file_name("missing.pem");
        let with = |cert: &Path, key: &Path| Overrides {
            tls_cert: Some(cert.to_owned()),
            tls_key: Some(key.to_owned()),
            ..Overrides::default()
        };
        let (field, msg) = err("", &with(&missing, &k));
        assert_eq!(field, "tls_cert");
        assert!(msg.contains("missing.pem"), "{msg}");
        let (field, _) = err("", &with(&c, &missing));
        assert_eq!(field, "tls_key");

        // Cert file without certificates (a key instead).
        let (field, msg) = err("", &with(&k, &k));
        assert_eq!(field, "tls_cert");
        assert!(msg.contains("no PEM certificate"), "{msg}");
        // Key file without a key.
        let (field, msg) = err("", &with(&c, &c));
        assert_eq!(field, "tls_key");
        assert!(msg.contains("no PEM private key"), "{msg}");
        // Two keys.
        let (c2, k2) = tls_files(CERT_PEM, &format!("{KEY_PEM}{KEY_PEM}"));
        let (field, msg) = err("", &with(&c2, &k2));
        assert_eq!(field, "tls_key");
        assert!(msg.contains("exactly one"), "{msg}");
        // Broken PEM.
        let (c3, k3) = tls_files(
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            KEY_PEM,
        );
        let (field, msg) = err("", &with(&c3, &k3));
        assert_eq!(field, "tls_cert");
        assert!(msg.contains("not valid PEM"), "{msg}");
        let (c4, k4) = tls_files(CERT_PEM, "-----BEGIN PRIVATE KEY-----\nMIGH\n");
        let (field, _) = err("", &with(&c4, &k4));
        assert_eq!(field, "tls_key");

        // A chain of two certificates and an EC key are fine.
        let (c5, k5) = tls_files(
            &format!("{CERT_PEM}{CERT_PEM}"),
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n\
             -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n",
        );
        let conf = from_toml_str("", &with(&c5, &k5), env()).unwrap();
        assert!(conf.tls.is_some());
    }

    #[test]
    fn public_ip_rules() {
        let (field, msg) = err("udp = \"0.0.0.0:5004\"", &Overrides::default());
        assert_eq!(field, "public_ip");
        assert!(msg.contains("public_ip"), "{msg}");
        let (field, _) = err("udp = \"[::]:5004\"", &Overrides::default());
        assert_eq!(field, "public_ip");

        let (field, msg) = err(
            "udp = \"0.0.0.0:5004\"\npublic_ip = [\"0.0.0.0\"]",
            &Overrides::default(),
        );
        assert_eq!(field, "public_ip");
        assert!(msg.contains("0.0.0.0"), "{msg}");
        let (field, _) = err("public_ip = [\"::\"]", &Overrides::default());
        assert_eq!(field, "public_ip");
        let (field, _) = err("public_ip = [\"224.0.0.1\"]", &Overrides::default());
        assert_eq!(field, "public_ip");
        // Family mismatch with a v4 socket.
        let (field, msg) = err("public_ip = [\"2001:db8::1\"]", &Overrides::default());
        assert_eq!(field, "public_ip");
        assert!(msg.contains("family"), "{msg}");

        let c = ok("udp = \"[::]:0\"\npublic_ip = [\"2001:db8::1\", \"203.0.113.7\"]");
        assert_eq!(c.public_ip.len(), 2);
        let c = ok("udp = \"[::1]:0\"");
        assert_eq!(c.public_ip, vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        let o = Overrides {
            udp: Some("0.0.0.0:0".parse().unwrap()),
            public_ip: vec!["192.0.2.1".parse().unwrap()],
            ..Overrides::default()
        };
        let c = from_toml_str("", &o, env()).unwrap();
        assert_eq!(c.public_ip, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn durations_and_ranges() {
        let (field, msg) = err("drain_timeout = \"ten seconds\"", &Overrides::default());
        assert_eq!(field, "drain_timeout");
        assert!(msg.contains("10s"), "{msg}");
        let (field, _) = err("pli_interval = \"5\"", &Overrides::default());
        assert_eq!(field, "pli_interval");

        let (field, msg) = err("drain_timeout = \"11m\"", &Overrides::default());
        assert_eq!(field, "drain_timeout");
        assert!(msg.contains("10m"), "{msg}");
        assert_eq!(
            ok("drain_timeout = \"10m\"").drain_timeout,
            MAX_DRAIN_TIMEOUT
        );
        assert_eq!(ok("drain_timeout = \"0s\"").drain_timeout, Duration::ZERO);

        let (field, msg) = err("max_sessions = 0", &Overrides::default());
        assert_eq!(field, "max_sessions");
        assert!(msg.contains("at least 1"), "{msg}");

        let (field, msg) = err("pli_interval = \"10ms\"", &Overrides::default());
        assert_eq!(field, "pli_interval");
        assert!(msg.contains("50ms"), "{msg}");
        let (field, _) = err("pli_interval = \"11s\"", &Overrides::default());
        assert_eq!(field, "pli_interval");
        assert_eq!(ok("pli_interval = \"50ms\"").pli_interval, MIN_PLI_INTERVAL);
        assert_eq!(ok("pli_interval = \"10s\"").pli_interval, MAX_PLI_INTERVAL);
    }

    #[test]
    fn control_socket_rules() {
        assert_eq!(
            default_control_socket(Some(0), Some("/run/user/0")),
            Some(PathBuf::from("/run/ridge/dataplane.sock"))
        );
        assert_eq!(
            default_control_socket(Some(1000), Some("/run/user/1000")),
            Some(PathBuf::from("/run/user/1000/ridge/dataplane.sock"))
        );
        assert_eq!(default_control_socket(Some(1000), None), None);
        assert_eq!(default_control_socket(Some(1000), Some("")), None);

        let c = ok("control_socket = \"/tmp/x/dp.sock\"");
        assert_eq!(c.control_socket, Some(PathBuf::from("/tmp/x/dp.sock")));
        assert!(!c.control_socket_is_default);
        let c = ok("control_socket = \"\"");
        assert_eq!(c.control_socket, None);
        let o = Overrides {
            control_socket: Some(PathBuf::from("/tmp/flag.sock")),
            ..Overrides::default()
        };
        let c = from_toml_str("control_socket = \"/tmp/file.sock\"", &o, env()).unwrap();
        assert_eq!(c.control_socket, Some(PathBuf::from("/tmp/flag.sock")));
        assert!(ok("").control_socket_is_default);

        let (field, msg) = err("control_socket = \"run/dp.sock\"", &Overrides::default());
        assert_eq!(field, "control_socket");
        assert!(msg.contains("absolute"), "{msg}");
        let long = format!("control_socket = \"/{}\"", "a".repeat(120));
        let (field, msg) = err(&long, &Overrides::default());
        assert_eq!(field, "control_socket");
        assert!(msg.contains("107"), "{msg}");
    }

    #[test]
    fn bad_log_filter() {
        let (field, msg) = err("log = \"ridge=verbose!!\"", &Overrides::default());
        assert_eq!(field, "log");
        assert!(msg.contains("filter"), "{msg}");
    }

    #[test]
    fn load_secret_for_token_command() {
        let e = load_secret(None, None).unwrap_err();
        assert!(e.to_string().contains("RIDGE_JWT_SECRET"), "{e}");
        assert!(load_secret(None, Some("short".into())).is_err());
        assert_eq!(load_secret(None, env()).unwrap().expose(), SECRET);

        let dir = scratch();
        let path = dir.join("ridge.toml");
        // The token command ignores unrelated settings that would fail validation.
        std::fs::write(
            &path,
            "jwt_secret = \"file-secret-file-secret\"\nhttp = \"0.0.0.0:80\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Readable by others: refused, without the secret in the message.
        let e = load_secret(Some(&path), None).unwrap_err().to_string();
        assert!(e.contains("readable by group or others"), "{e}");
        assert!(!e.contains("file-secret-file-secret"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            load_secret(Some(&path), None).unwrap().expose(),
            "file-secret-file-secret"
        );
        assert_eq!(load_secret(Some(&path), env()).unwrap().expose(), SECRET);
    }

    #[test]
    fn error_display_names_field() {
        let e = invalid("max_sessions", "must be at least 1");
        assert_eq!(
            e.to_string(),
            "invalid configuration: max_sessions: must be at least 1"
        );
    }
}
