//! The node's limits: sessions and media (quotas, handshake and consent
//! timeouts, where plain-RTP endpoints may send), the WebSocket room API's
//! bounds, and the HTTP(S) listener's timeouts and connection caps; their
//! defaults, and how they are built and validated from the file and the
//! flags (docs/operations.md, "Limits and abuse").

use std::time::Duration;

use ridge_sfu::{Cidr, QuotaLimits};
use ridge_wire::config::{ConfigError, duration_setting, invalid};

use super::FileConfig;
use super::Overrides;
use super::fmt_duration;

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
pub(super) fn build_limits(
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

pub(super) fn build_ws(file: &FileConfig, o: &Overrides) -> Result<WsConfig, ConfigError> {
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

pub(super) fn build_http_limits(
    file: &FileConfig,
    o: &Overrides,
) -> Result<HttpLimits, ConfigError> {
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
