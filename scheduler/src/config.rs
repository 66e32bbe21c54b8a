//! Typed, validated scheduler configuration.
//!
//! Assembled once before anything binds, from (highest precedence first)
//! command-line flags ([`Overrides`]), the environment (only the two secrets,
//! [`ENV_ADMIN_TOKEN`] and [`ENV_DISPATCH_TOKEN`]), an optional TOML file
//! ([`FileConfig`]) and defaults. Every problem is a [`ConfigError`] naming
//! the field; binaries exit with [`EXIT_CONFIG`]. Secrets are [`Secret`]s and
//! never appear in `Debug`/`Display` output or error messages.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ridge_wire::config::{duration_setting, invalid, read_file};
use serde::Deserialize;

pub use ridge_wire::config::{ConfigError, Secret};

/// Exit status for an invalid configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;
/// Environment variable with the operator (admin) token.
pub const ENV_ADMIN_TOKEN: &str = "RIDGE_ADMIN_TOKEN";
/// Environment variable with the dispatch token.
pub const ENV_DISPATCH_TOKEN: &str = "RIDGE_DISPATCH_TOKEN";
/// Default listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443);
/// Default database.
pub const DEFAULT_DATABASE: &str = "sqlite:ridge-scheduler.db";
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// Default TLS handshake timeout.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a request's body.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a connection may stay open with no request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on open connections (lowered to fit the descriptor limit
/// when left unset, see [`Config::max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16384;
/// Default cap on open connections from one source address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// Default cap on concurrent desired-state long polls per node.
pub const DEFAULT_MAX_LONG_POLLS_PER_NODE: usize = 4;
/// Minimum length of the admin and dispatch tokens.
pub const MIN_SECRET_LEN: usize = 16;

/// A client-address → region rule.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionPrefix {
    /// `ADDR/LEN`, IPv4 or IPv6.
    pub cidr: String,
    pub region: String,
}

/// The TOML file. Durations are humantime strings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub database: Option<String>,
    pub admin_token: Option<Secret>,
    pub dispatch_token: Option<Secret>,
    pub heartbeat_interval: Option<String>,
    pub lease_misses: Option<u32>,
    pub max_hops: Option<usize>,
    pub node_token_ttl: Option<String>,
    pub access_token_ttl: Option<String>,
    pub drain_timeout: Option<String>,
    pub replica_id: Option<String>,
    pub log: Option<String>,
    pub tls_handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub request_body_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub max_long_polls_per_node: Option<usize>,
    /// DNS names a node may report in `addresses.http` besides the hosts
    /// of its own addresses (`name`, or `*.suffix` for any name under it).
    #[serde(default)]
    pub node_url_domains: Vec<String>,
    #[serde(default)]
    pub region_prefixes: Vec<RegionPrefix>,
}

/// Command-line values; they win over everything.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub database: Option<String>,
    pub heartbeat_interval: Option<Duration>,
    pub lease_misses: Option<u32>,
    pub max_hops: Option<usize>,
    pub drain_timeout: Option<Duration>,
    pub replica_id: Option<String>,
    pub log: Option<String>,
    pub tls_handshake_timeout: Option<Duration>,
    pub header_read_timeout: Option<Duration>,
    pub request_body_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub max_long_polls_per_node: Option<usize>,
}

/// Secrets from the environment.
#[derive(Debug, Clone, Default)]
pub struct EnvSecrets {
    pub admin_token: Option<String>,
    pub dispatch_token: Option<String>,
}

impl EnvSecrets {
    /// Reads [`ENV_ADMIN_TOKEN`] and [`ENV_DISPATCH_TOKEN`].
    pub fn from_env() -> Self {
        let get = |k| std::env::var(k).ok().filter(|s: &String| !s.is_empty());
        Self {
            admin_token: get(ENV_ADMIN_TOKEN),
            dispatch_token: get(ENV_DISPATCH_TOKEN),
        }
    }
}

/// A parsed CIDR rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, l) = s.split_once('/')?;
        let addr: IpAddr = a.trim().parse().ok()?;
        let len: u8 = l.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Self { addr, len })
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
            let full = usize::from(len / 8);
            if a[..full] != b[..full] {
                return false;
            }
            let rem = len % 8;
            rem == 0 || {
                let mask = 0xffu8 << (8 - rem);
                a[full] & mask == b[full] & mask
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(&a.octets(), &b.octets(), self.len),
            (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(&a.octets(), &b.octets(), self.len),
            (IpAddr::V6(a), IpAddr::V4(b)) => a
                .to_ipv4_mapped()
                .is_some_and(|_| prefix_eq(&a.octets(), &b.to_ipv6_mapped().octets(), self.len)),
            (IpAddr::V4(_), IpAddr::V6(b)) => b
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// `sqlite:PATH` or `postgres://…`.
    pub database: String,
    pub admin_token: Secret,
    pub dispatch_token: Option<Secret>,
    pub heartbeat_interval: Duration,
    pub lease_misses: u32,
    pub max_hops: usize,
    pub node_token_ttl: Duration,
    pub access_token_ttl: Duration,
    pub drain_timeout: Duration,
    pub replica_id: String,
    pub log: String,
    /// Connection and request limits.
    pub limits: Limits,
    /// See [`FileConfig::node_url_domains`]; lowercase.
    pub node_url_domains: Vec<String>,
    /// Longest prefix wins.
    pub region_prefixes: Vec<(Cidr, String)>,
}

/// Connection and request limits (docs/operations.md, "Limits and abuse").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// From accept to the end of the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// To receive a request's headers (HTTP/1.1; it also bounds the wait
    /// for the next request on a keep-alive connection).
    pub header_read_timeout: Duration,
    /// To receive a request's whole body.
    pub request_body_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections in total; `None` when left unset (then
    /// [`DEFAULT_MAX_CONNECTIONS`], lowered to fit the descriptor limit).
    pub max_connections: Option<usize>,
    /// Open connections from one source address.
    pub max_connections_per_source: usize,
    /// Concurrent desired-state long polls per node.
    pub max_long_polls_per_node: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: None,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_long_polls_per_node: DEFAULT_MAX_LONG_POLLS_PER_NODE,
        }
    }
}

/// Descriptors kept free for the database, the runtime and the accept
/// loop itself when the connection cap is derived from the limit.
pub const FD_RESERVE: usize = 64;

/// The soft `RLIMIT_NOFILE` of this process (from /proc/self/limits).
pub fn nofile_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Limits {
    /// The connection cap in force: the configured one, or the default
    /// lowered to the descriptor limit less [`FD_RESERVE`].
    pub fn max_connections(&self, nofile: Option<usize>) -> usize {
        self.max_connections.unwrap_or_else(|| match nofile {
            Some(n) => DEFAULT_MAX_CONNECTIONS.min(n.saturating_sub(FD_RESERVE).max(1)),
            None => DEFAULT_MAX_CONNECTIONS,
        })
    }
}

impl Config {
    /// A node is down once its last heartbeat is older than this.
    pub fn lease(&self) -> Duration {
        self.heartbeat_interval * self.lease_misses
    }

    /// How often the background loop runs (flush, reload, recompute).
    pub fn tick(&self) -> Duration {
        (self.heartbeat_interval / 2).max(Duration::from_millis(20))
    }

    /// The region configured for a client address.
    pub fn region_for(&self, ip: IpAddr) -> Option<&str> {
        self.region_prefixes
            .iter()
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.len)
            .map(|(_, r)| r.as_str())
    }

    /// The storage URL with any password replaced, for logs.
    pub fn database_for_logs(&self) -> String {
        redact_url(&self.database)
    }
}

/// Replaces the password of `scheme://user:password@host…` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.split_once('@') {
        Some(x) => x,
        None => return url.to_owned(),
    };
    let user = auth.split_once(':').map_or(auth, |(u, _)| u);
    format!("{scheme}://{user}:***@{host}")
}

/// Reads `file` (if any), merges and validates.
pub fn load(
    file: Option<&Path>,
    overrides: &Overrides,
    env: EnvSecrets,
) -> Result<Config, ConfigError> {
    let fc = match file {
        Some(path) => parse_text(&read_file(path)?, Some(path))?,
        None => FileConfig::default(),
    };
    build(fc, overrides, env)
}

/// Parses TOML without validating. Errors show line and column but not the
/// source line (which could hold a secret).
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    parse_text(text, None)
}

/// [`parse_file`]; `origin` only labels errors.
fn parse_text(text: &str, origin: Option<&Path>) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let mut msg = e.message().trim().to_owned();
        if let Some(span) = e.span() {
            let start = span.start.min(text.len());
            let start = (0..=start)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            if text[line_start..line_end].contains("token") {
                msg = "invalid token setting (details not shown to keep secrets out of logs): \
                       it must be a quoted string"
                    .to_owned();
            }
            let line = text[..start].matches('\n').count() + 1;
            msg = format!("line {line}: {msg}");
        }
        ConfigError::Parse {
            path: origin.map(Path::to_owned),
            message: msg,
        }
    })
}

fn secret(
    field: &'static str,
    env_name: &str,
    env: Option<String>,
    file: Option<Secret>,
) -> Result<Option<Secret>, ConfigError> {
    let s = env
        .map(Secret::new)
        .or(file)
        .filter(|s| !s.expose().is_empty());
    if let Some(s) = &s
        && s.expose().len() < MIN_SECRET_LEN
    {
        return Err(invalid(
            field,
            format!(
                "shorter than {MIN_SECRET_LEN} bytes (from {env_name} or `{field}`); \
                 generate one with `openssl rand -hex 32`"
            ),
        ));
    }
    Ok(s)
}

/// Merges and validates.
pub fn build(fc: FileConfig, o: &Overrides, env: EnvSecrets) -> Result<Config, ConfigError> {
    let listen = o.listen.or(fc.listen).unwrap_or(DEFAULT_LISTEN);
    let tls_cert = o.tls_cert.clone().or(fc.tls_cert).ok_or_else(|| {
        invalid(
            "tls_cert",
            "the scheduler only serves HTTPS: give a PEM certificate chain (--tls-cert)",
        )
    })?;
    let tls_key = o
        .tls_key
        .clone()
        .or(fc.tls_key)
        .ok_or_else(|| invalid("tls_key", "give the PEM private key (--tls-key)"))?;
    for (field, p) in [("tls_cert", &tls_cert), ("tls_key", &tls_key)] {
        if !p.is_file() {
            return Err(invalid(
                field,
                format!("{} is not a readable file", p.display()),
            ));
        }
    }
    let database = o
        .database
        .clone()
        .or(fc.database)
        .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
    if !(database.starts_with("sqlite:")
        || database.starts_with("postgres://")
        || database.starts_with("postgresql://"))
    {
        return Err(invalid(
            "database",
            format!(
                "`{}` is neither `sqlite:PATH` nor `postgres://…`",
                redact_url(&database)
            ),
        ));
    }
    let admin_token = secret(
        "admin_token",
        ENV_ADMIN_TOKEN,
        env.admin_token,
        fc.admin_token,
    )?
    .ok_or_else(|| {
        invalid(
            "admin_token",
            format!(
                "no operator token: set {ENV_ADMIN_TOKEN} or `admin_token` \
                 (e.g. `openssl rand -hex 32`)"
            ),
        )
    })?;
    let dispatch_token = secret(
        "dispatch_token",
        ENV_DISPATCH_TOKEN,
        env.dispatch_token,
        fc.dispatch_token,
    )?;
    if dispatch_token.as_ref() == Some(&admin_token) {
        return Err(invalid(
            "dispatch_token",
            "must differ from the admin token",
        ));
    }
    let heartbeat_interval = duration_setting(
        "heartbeat_interval",
        o.heartbeat_interval,
        fc.heartbeat_interval.as_deref(),
        DEFAULT_HEARTBEAT,
    )?;
    if heartbeat_interval < Duration::from_millis(50)
        || heartbeat_interval > Duration::from_secs(300)
    {
        return Err(invalid("heartbeat_interval", "must be between 50ms and 5m"));
    }
    let lease_misses = o.lease_misses.or(fc.lease_misses).unwrap_or(3);
    if !(1..=100).contains(&lease_misses) {
        return Err(invalid("lease_misses", "must be between 1 and 100"));
    }
    let max_hops = o.max_hops.or(fc.max_hops).unwrap_or(4);
    if !(1..=16).contains(&max_hops) {
        return Err(invalid("max_hops", "must be between 1 and 16"));
    }
    let node_token_ttl = duration_setting(
        "node_token_ttl",
        None,
        fc.node_token_ttl.as_deref(),
        Duration::from_secs(30 * 24 * 3600),
    )?;
    if node_token_ttl < Duration::from_secs(60) {
        return Err(invalid("node_token_ttl", "must be at least 1m"));
    }
    let access_token_ttl = duration_setting(
        "access_token_ttl",
        None,
        fc.access_token_ttl.as_deref(),
        Duration::from_secs(3600),
    )?;
    if access_token_ttl < Duration::from_secs(1)
        || access_token_ttl > Duration::from_secs(86400 * 7)
    {
        return Err(invalid("access_token_ttl", "must be between 1s and 7 days"));
    }
    let drain_timeout = duration_setting(
        "drain_timeout",
        o.drain_timeout,
        fc.drain_timeout.as_deref(),
        Duration::from_secs(10),
    )?;
    if drain_timeout > Duration::from_secs(600) {
        return Err(invalid("drain_timeout", "must be at most 10m"));
    }
    let replica_id = o
        .replica_id
        .clone()
        .or(fc.replica_id)
        .unwrap_or_else(|| format!("replica-{}", std::process::id()));
    if replica_id.is_empty() || replica_id.len() > 64 {
        return Err(invalid("replica_id", "must be 1 to 64 bytes"));
    }
    let mut region_prefixes = Vec::new();
    for rp in fc.region_prefixes {
        let cidr = Cidr::parse(&rp.cidr)
            .ok_or_else(|| invalid("region_prefixes", format!("`{}` is not ADDR/LEN", rp.cidr)))?;
        if !valid_region(&rp.region) {
            return Err(invalid(
                "region_prefixes",
                format!(
                    "`{}` is not a region name ([A-Za-z0-9._-], 1-64)",
                    rp.region
                ),
            ));
        }
        region_prefixes.push((cidr, rp.region));
    }
    let log = o
        .log
        .clone()
        .or(fc.log)
        .unwrap_or_else(|| "info".to_owned());
    let timeout = |field: &'static str,
                   flag: Option<Duration>,
                   file: Option<&str>,
                   default: Duration,
                   max: Duration|
     -> Result<Duration, ConfigError> {
        let d = duration_setting(field, flag, file, default)?;
        if d < Duration::from_millis(100) || d > max {
            return Err(invalid(
                field,
                format!(
                    "must be between 100ms and {}",
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok(d)
    };
    let limits = Limits {
        tls_handshake_timeout: timeout(
            "tls_handshake_timeout",
            o.tls_handshake_timeout,
            fc.tls_handshake_timeout.as_deref(),
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            Duration::from_secs(300),
        )?,
        header_read_timeout: timeout(
            "header_read_timeout",
            o.header_read_timeout,
            fc.header_read_timeout.as_deref(),
            DEFAULT_HEADER_READ_TIMEOUT,
            Duration::from_secs(300),
        )?,
        request_body_timeout: timeout(
            "request_body_timeout",
            o.request_body_timeout,
            fc.request_body_timeout.as_deref(),
            DEFAULT_REQUEST_BODY_TIMEOUT,
            Duration::from_secs(600),
        )?,
        idle_timeout: timeout(
            "idle_timeout",
            o.idle_timeout,
            fc.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
            Duration::from_secs(3600),
        )?,
        max_connections: o.max_connections.or(fc.max_connections),
        max_connections_per_source: o
            .max_connections_per_source
            .or(fc.max_connections_per_source)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_SOURCE),
        max_long_polls_per_node: o
            .max_long_polls_per_node
            .or(fc.max_long_polls_per_node)
            .unwrap_or(DEFAULT_MAX_LONG_POLLS_PER_NODE),
    };
    if let Some(m) = limits.max_connections
        && !(1..=1_000_000).contains(&m)
    {
        return Err(invalid("max_connections", "must be between 1 and 1000000"));
    }
    if !(1..=1_000_000).contains(&limits.max_connections_per_source) {
        return Err(invalid(
            "max_connections_per_source",
            "must be between 1 and 1000000",
        ));
    }
    if !(1..=64).contains(&limits.max_long_polls_per_node) {
        return Err(invalid(
            "max_long_polls_per_node",
            "must be between 1 and 64",
        ));
    }
    if fc.node_url_domains.len() > 256 {
        return Err(invalid("node_url_domains", "at most 256 entries"));
    }
    let mut node_url_domains = Vec::new();
    for d in fc.node_url_domains {
        let name = d.strip_prefix("*.").unwrap_or(&d);
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(invalid(
                "node_url_domains",
                format!("`{d}` is not a DNS name or `*.` followed by one"),
            ));
        }
        node_url_domains.push(d.to_ascii_lowercase());
    }
    Ok(Config {
        listen,
        tls_cert,
        tls_key,
        database,
        admin_token,
        dispatch_token,
        heartbeat_interval,
        lease_misses,
        max_hops,
        node_token_ttl,
        access_token_ttl,
        drain_timeout,
        replica_id,
        log,
        limits,
        node_url_domains,
        region_prefixes,
    })
}

/// `[A-Za-z0-9._-]{1,64}`.
pub fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempdir::Dir, Overrides) {
        let d = tempdir::Dir::new();
        let cert = d.0.join("c.pem");
        let key = d.0.join("k.pem");
        std::fs::write(&cert, "x").unwrap();
        std::fs::write(&key, "x").unwrap();
        let o = Overrides {
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..Overrides::default()
        };
        (d, o)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "ridge-sched-cfg-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn env(admin: &str) -> EnvSecrets {
        EnvSecrets {
            admin_token: Some(admin.into()),
            dispatch_token: None,
        }
    }

    #[test]
    fn defaults_and_precedence() {
        let (_d, o) = files();
        let fc = parse_file(
            "heartbeat_interval = \"500ms\"\nadmin_token = \"file-token-file-token\"\n\
             [[region_prefixes]]\ncidr = \"10.0.0.0/8\"\nregion = \"a\"\n\
             [[region_prefixes]]\ncidr = \"10.1.0.0/16\"\nregion = \"b\"\n",
        )
        .unwrap();
        let c = build(fc, &o, env("env-token-env-token")).unwrap();
        assert_eq!(c.admin_token.expose(), "env-token-env-token");
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.lease(), Duration::from_millis(1500));
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.region_for("10.1.2.3".parse().unwrap()), Some("b"));
        assert_eq!(c.region_for("10.2.2.3".parse().unwrap()), Some("a"));
        assert_eq!(c.region_for("::ffff:10.2.2.3".parse().unwrap()), Some("a"));
        assert_eq!(c.region_for("11.0.0.1".parse().unwrap()), None);
        assert!(!format!("{c:?}").contains("env-token"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_connections(Some(1024)), 1024 - FD_RESERVE);
        assert_eq!(
            c.limits.max_connections(Some(1 << 20)),
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(c.limits.max_connections(None), DEFAULT_MAX_CONNECTIONS);
        let fc = parse_file(
            "idle_timeout = \"5s\"\nmax_connections = 100\nmax_long_polls_per_node = 2\n",
        )
        .unwrap();
        let o2 = Overrides {
            idle_timeout: Some(Duration::from_secs(7)),
            ..o.clone()
        };
        let c = build(fc, &o2, env("env-token-env-token")).unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.limits.max_connections(Some(64)), 100);
        assert_eq!(c.limits.max_long_polls_per_node, 2);
        assert!(nofile_limit().is_some());
    }

    #[test]
    fn rejects_bad_values() {
        let (_d, o) = files();
        let e = build(FileConfig::default(), &o, EnvSecrets::default()).unwrap_err();
        assert!(e.to_string().contains("admin_token"), "{e}");
        let e = build(FileConfig::default(), &o, env("zq9x")).unwrap_err();
        assert!(!e.to_string().contains("zq9x"), "{e}");
        let e = build(
            FileConfig::default(),
            &Overrides {
                tls_cert: None,
                ..o.clone()
            },
            env("0123456789abcdef"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tls_cert"));
        for toml in [
            "heartbeat_interval = \"1ms\"",
            "lease_misses = 0",
            "max_hops = 0",
            "database = \"mysql://x\"",
            "[[region_prefixes]]\ncidr = \"10.0.0.0/33\"\nregion = \"a\"",
            "header_read_timeout = \"1ms\"",
            "idle_timeout = \"2h\"",
            "tls_handshake_timeout = \"soon\"",
            "request_body_timeout = \"11m\"",
            "max_connections = 0",
            "max_connections_per_source = 0",
            "max_long_polls_per_node = 0",
            "max_long_polls_per_node = 65",
            "node_url_domains = [\"*.\"]",
            "node_url_domains = [\"a..b\"]",
            "node_url_domains = [\"javascript:x\"]",
        ] {
            let fc = parse_file(toml).unwrap();
            assert!(build(fc, &o, env("0123456789abcdef")).is_err(), "{toml}");
        }
        let e = parse_file("admin_token = 12345678901234567").unwrap_err();
        assert!(!e.to_string().contains("12345678901234567"), "{e}");
        assert!(parse_file("bogus = 1").is_err());
    }

    #[test]
    fn redacts_database_password() {
        assert_eq!(
            redact_url("postgres://ridge:hunter2@db:5432/ridge"),
            "postgres://ridge:***@db:5432/ridge"
        );
        assert_eq!(redact_url("sqlite:/x.db"), "sqlite:/x.db");
    }
}
