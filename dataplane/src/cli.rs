//! Command-line interface (clap derive). Nothing here prints: `main` does.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::auth::{self, AuthError};
use crate::config::{self, Config, ConfigError, EXIT_CONFIG, Overrides};

const LONG_ABOUT: &str = "\
Ridge edge node: WebRTC (WHIP/WHEP, WebSocket rooms) and plain-RTP media relay.

Every HTTP and WebSocket entry point requires an access token: an HS256 JWT \
signed with the node's secret. The secret is read from the RIDGE_JWT_SECRET \
environment variable (preferred, so it never shows up in the process list) or \
from `jwt_secret` in the TOML file given with --config; it must be at least 16 \
bytes. Flags override the environment, which overrides the file. Use the \
`token` subcommand to mint tokens and `check-config` to validate a \
configuration without starting the node.

Minimal example:

  export RIDGE_JWT_SECRET=\"$(openssl rand -base64 32)\"
  ridge-dataplane --http 127.0.0.1:8080 --udp 127.0.0.1:5004
  ridge-dataplane token --room demo --identity alice --publish --subscribe";

const AFTER_HELP: &str = "\
Environment:
  RIDGE_JWT_SECRET  HS256 token secret (>= 16 bytes); overrides `jwt_secret` in --config";

/// `ridge-dataplane [RUN FLAGS] | ridge-dataplane <COMMAND>`.
#[derive(Debug, Parser)]
#[command(
    name = "ridge-dataplane",
    version,
    about = "Ridge edge node: WebRTC (WHIP/WHEP, WebSocket rooms) and plain-RTP media relay",
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Without a subcommand the node runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags for running the node.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags that configure the node; they override the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML config file (flags and RIDGE_JWT_SECRET override its values)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP(S) listen address [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// UDP media listen address; port 0 picks an ephemeral port [default: 127.0.0.1:5004]
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<SocketAddr>,
    /// Address advertised in ICE candidates (repeatable); required when --udp binds 0.0.0.0 or [::]
    #[arg(long = "public-ip", value_name = "IP")]
    pub public_ip: Vec<IpAddr>,
    /// PEM certificate chain for HTTPS (with --tls-key)
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS (with --tls-cert)
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (TLS terminated by a proxy in front)
    #[arg(long)]
    pub insecure_http: bool,
    /// DANGEROUS: disable authentication; every request is admitted with all grants. Local development only
    #[arg(long)]
    pub dev_no_auth: bool,
    /// How long to let sessions drain on shutdown, e.g. "10s" (at most 10m) [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Maximum number of concurrent sessions [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// Minimum interval between keyframe requests to a publisher, 50ms..=10s [default: 500ms]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub pli_interval: Option<Duration>,
    /// Media shards: pinned threads, each with its own UDP socket on port udp+i; 0 = one per core [default: 0]
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// A loopback or link-local network plain-RTP endpoints may name, e.g. 127.0.0.0/8 (repeatable; replaces rtp_allow_networks)
    #[arg(long, value_name = "CIDR")]
    pub rtp_allow_network: Vec<ridge_sfu::Cidr>,
    /// A network whose plain-RTP subscribers receive without first sending a packet (repeatable; replaces rtp_trusted_networks)
    #[arg(long, value_name = "CIDR")]
    pub rtp_trusted_network: Vec<ridge_sfu::Cidr>,
    /// Do not pin shard threads to cores
    #[arg(long)]
    pub no_pin_cores: bool,
    /// Datagram I/O backend [default: auto]
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub io_backend: Option<crate::config::IoBackend>,
    /// Send every datagram on its own, never as a UDP GSO run to one destination
    #[arg(long)]
    pub no_udp_gso: bool,
    /// Shard sockets: "per-shard" (port udp+i each) or "shared" (all on the udp port,
    /// steered to their shard by a BPF program; needs root) [default: per-shard]
    #[arg(long, value_enum, value_name = "MODE")]
    pub shard_ports: Option<crate::config::ShardPorts>,
    /// Mesh links' loss repair: every hop NACKs its upstream, or only the last
    /// node does (relays pass NACKs on; for comparison) [default: hop-by-hop]
    #[arg(long, value_enum, value_name = "MODE")]
    pub mesh_recovery: Option<crate::config::MeshRecoveryMode>,
    /// Codecs WebRTC sessions may negotiate, in order of preference (an
    /// answer lists them in this order, and a browser sends the first it
    /// offered) [default: opus,vp8,h264,vp9,av1]
    #[arg(long, value_delimiter = ',', value_parser = parse_codec, value_name = "CODEC,...")]
    pub codecs: Vec<ridge_sfu::CodecSpec>,
    /// Kernel fast path: try XDP (native, else generic, else none) or off [default: auto]
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp: Option<crate::config::XdpSetting>,
    /// Interface the XDP guard attaches to; repeat for several [default: the one owning --udp]
    #[arg(long = "media-interface", value_name = "IFACE")]
    pub media_interfaces: Vec<String>,
    /// XDP guard: packets per second per source on media ports, 0 = no limit [default: 10000]
    #[arg(long, value_name = "PPS")]
    pub guard_rate_pps: Option<u32>,
    /// XDP guard: token-bucket burst per source, in packets [default: 2000]
    #[arg(long, value_name = "PACKETS")]
    pub guard_burst: Option<u32>,
    /// Keep learned plain-RTP flows in userspace (no kernel forwarding)
    #[arg(long)]
    pub no_kernel_forwarding: bool,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "ridge_dataplane=debug,info" [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// Unix socket of the local control API for ridge-agent (mode 0600); "" disables it
    /// [default: /run/ridge/dataplane.sock as root, else $XDG_RUNTIME_DIR/ridge/dataplane.sock, else none]
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// WebSocket room sessions on the node; past it upgrades get 429 [default: 10000]
    #[arg(long, value_name = "N")]
    pub ws_max_sessions: Option<usize>,
    /// WebSocket room sessions of one identity [default: 16]
    #[arg(long, value_name = "N")]
    pub ws_max_sessions_per_identity: Option<usize>,
    /// Bytes queued to one WebSocket before it is disconnected as a slow reader [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub ws_send_queue_bytes: Option<usize>,
    /// Bytes of events kept per room session for a resume [default: 262144]
    #[arg(long, value_name = "BYTES")]
    pub ws_resume_buffer_bytes: Option<usize>,
    /// Chat and data messages per second per participant [default: 20]
    #[arg(long, value_name = "N")]
    pub ws_message_rate: Option<u32>,
    /// Burst of the chat/data token bucket [default: 40]
    #[arg(long, value_name = "N")]
    pub ws_message_burst: Option<u32>,
    /// How long before its token expires a session gets `token_expiring` [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ws_token_warning: Option<Duration>,
    /// Time a client has to send a request's headers, and the next request on a kept-alive connection [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Option<Duration>,
    /// Time a client has to send a request's body [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub http_body_timeout: Option<Duration>,
    /// Time a connection may pass with no byte read or written [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Option<Duration>,
    /// Time a TLS handshake may take [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Option<Duration>,
    /// Concurrent HTTP(S) connections, 0 = half the descriptor limit, at most 16384 [default: 0]
    #[arg(long, value_name = "N")]
    pub http_max_connections: Option<usize>,
    /// Concurrent HTTP(S) connections from one source address, 0 = half of
    /// --http-max-connections, at most 256 [default: 0]
    #[arg(long, value_name = "N")]
    pub http_max_connections_per_source: Option<usize>,
}

impl RunArgs {
    /// The flags as config overrides (boolean flags only ever switch on).
    pub fn overrides(&self) -> Overrides {
        Overrides {
            http: self.http,
            udp: self.udp,
            public_ip: self.public_ip.clone(),
            jwt_secret: None,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            insecure_http: self.insecure_http.then_some(true),
            dev_no_auth: self.dev_no_auth.then_some(true),
            drain_timeout: self.drain_timeout,
            max_sessions: self.max_sessions,
            pli_interval: self.pli_interval,
            shards: self.shards,
            pin_cores: self.no_pin_cores.then_some(false),
            io_backend: self.io_backend,
            udp_gso: self.no_udp_gso.then_some(false),
            shard_ports: self.shard_ports,
            mesh_recovery: self.mesh_recovery,
            codecs: self.codecs.clone(),
            xdp: self.xdp,
            media_interfaces: self.media_interfaces.clone(),
            guard_rate_pps: self.guard_rate_pps,
            guard_burst: self.guard_burst,
            kernel_forwarding: self.no_kernel_forwarding.then_some(false),
            log: self.log.clone(),
            control_socket: self.control_socket.clone(),
            rtp_allow_networks: self.rtp_allow_network.clone(),
            rtp_trusted_networks: self.rtp_trusted_network.clone(),
            handshake_timeout: None,
            rtp_consent_timeout: None,
            identity_max_sessions: None,
            token_max_sessions: None,
            ws_max_sessions: self.ws_max_sessions,
            ws_max_sessions_per_identity: self.ws_max_sessions_per_identity,
            ws_send_queue_bytes: self.ws_send_queue_bytes,
            ws_resume_buffer_bytes: self.ws_resume_buffer_bytes,
            ws_message_rate: self.ws_message_rate,
            ws_message_burst: self.ws_message_burst,
            ws_token_warning: self.ws_token_warning,
            http_header_timeout: self.http_header_timeout,
            http_body_timeout: self.http_body_timeout,
            http_idle_timeout: self.http_idle_timeout,
            tls_handshake_timeout: self.tls_handshake_timeout,
            http_max_connections: self.http_max_connections,
            http_max_connections_per_source: self.http_max_connections_per_source,
        }
    }

    /// Loads and validates the configuration: `--config` file, these flags and
    /// `env_secret` (the value of RIDGE_JWT_SECRET, if set).
    pub fn load(&self, env_secret: Option<String>) -> Result<Config, ConfigError> {
        config::load(self.config.as_deref(), &self.overrides(), env_secret)
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing would only complicate clap's derive"
)]
pub enum Command {
    /// Print an access token signed with the node's secret
    Token(TokenArgs),
    /// Validate the configuration and exit (0 if valid)
    CheckConfig(RunArgs),
}

/// Flags of the `token` subcommand.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Room the token admits to ("*" for every room)
    #[arg(long, value_name = "ROOM")]
    pub room: String,
    /// Participant identity (the `sub` claim)
    #[arg(long, value_name = "IDENTITY")]
    pub identity: String,
    /// Grant publishing (WHIP, WS publish, RTP publish)
    #[arg(long)]
    pub publish: bool,
    /// Grant subscribing (WHEP, WS subscribe, RTP subscribe)
    #[arg(long)]
    pub subscribe: bool,
    /// Grant access to /metrics and /healthz
    #[arg(long)]
    pub admin: bool,
    /// Lifetime of the token, e.g. "1h", "30m", "7d"
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Config file holding `jwt_secret` (RIDGE_JWT_SECRET overrides it)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Failure of a subcommand.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Configuration problem (missing or short secret, unreadable file, ...).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The token could not be minted (e.g. empty room or identity).
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl CliError {
    /// Process exit status: [`EXIT_CONFIG`] (64) for all of these usage and
    /// configuration errors.
    pub fn exit_code(&self) -> i32 {
        EXIT_CONFIG
    }
}

/// Implements `token`: returns the token (the caller prints it).
/// `env_secret` is the value of RIDGE_JWT_SECRET, if set; it overrides
/// `jwt_secret` from `--config`. Other settings in the file are not validated.
pub fn run_token(
    args: &TokenArgs,
    env_secret: Option<String>,
    now_unix: u64,
) -> Result<String, CliError> {
    let secret = config::load_secret(args.config.as_deref(), env_secret)?;
    Ok(auth::mint(
        &secret,
        &args.room,
        &args.identity,
        args.publish,
        args.subscribe,
        args.admin,
        args.ttl,
        now_unix,
    )?)
}

/// Implements `check-config`: returns the validated configuration (the caller
/// reports success and exits 0).
pub fn run_check_config(args: &RunArgs, env_secret: Option<String>) -> Result<Config, CliError> {
    Ok(args.load(env_secret)?)
}

/// A codec name on the command line.
fn parse_codec(s: &str) -> Result<ridge_sfu::CodecSpec, String> {
    ridge_sfu::CodecSpec::from_name(s.trim())
        .ok_or_else(|| format!("`{s}` is not a codec this node routes: opus, vp8, h264, vp9, av1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    const SECRET: &str = "0123456789abcdef-test-secret";

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ridge-dataplane").chain(args.iter().copied())).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_become_overrides() {
        let cli = parse(&[
            "--http",
            "0.0.0.0:8443",
            "--udp",
            "[::]:0",
            "--public-ip",
            "203.0.113.7",
            "--public-ip",
            "2001:db8::1",
            "--insecure-http",
            "--drain-timeout",
            "30s",
            "--max-sessions",
            "12",
            "--pli-interval",
            "250ms",
            "--codecs",
            "H264,opus",
            "--log",
            "debug",
        ]);
        assert!(cli.command.is_none());
        let o = cli.run.overrides();
        assert_eq!(o.http, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(o.public_ip.len(), 2);
        assert_eq!(o.insecure_http, Some(true));
        assert_eq!(o.dev_no_auth, None);
        assert_eq!(o.drain_timeout, Some(Duration::from_secs(30)));
        assert_eq!(o.max_sessions, Some(12));
        assert_eq!(o.pli_interval, Some(Duration::from_millis(250)));
        assert_eq!(
            o.codecs,
            [ridge_sfu::CodecSpec::H264, ridge_sfu::CodecSpec::Opus]
        );
        assert_eq!(o.log.as_deref(), Some("debug"));
        assert!(o.jwt_secret.is_none());

        let cfg = cli.run.load(Some(SECRET.into())).unwrap();
        assert_eq!(cfg.max_sessions, 12);
        assert_eq!(cfg.udp.port(), 0);
    }

    #[test]
    fn no_flags_no_overrides() {
        let o = parse(&[]).run.overrides();
        assert!(o.http.is_none() && o.insecure_http.is_none() && o.public_ip.is_empty());
    }

    #[test]
    fn bad_flag_values_rejected_by_clap() {
        for args in [
            &["--http", "nope"][..],
            &["--drain-timeout", "soon"],
            &["--max-sessions", "-1"],
            &["--public-ip", "0.0.0.0:1"],
            &["--codecs", "vp8,h265"],
        ] {
            let argv = std::iter::once("ridge-dataplane").chain(args.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{args:?}");
        }
    }

    #[test]
    fn token_subcommand() {
        let cli = parse(&[
            "token",
            "--room",
            "demo",
            "--identity",
            "alice",
            "--publish",
        ]);
        let Some(Command::Token(args)) = cli.command else {
            panic!("expected token")
        };
        assert_eq!(args.ttl, Duration::from_secs(3600));
        assert!(args.publish && !args.subscribe && !args.admin);

        let t = run_token(&args, Some(SECRET.into()), now()).unwrap();
        assert_eq!(t.split('.').count(), 3);
        let claims = auth::Authenticator::new(Some(&config::Secret::new(SECRET)), false)
            .verify(&t)
            .unwrap();
        assert_eq!(claims.room, "demo");
        assert_eq!(claims.sub, "alice");
        assert!(claims.can_publish && !claims.can_subscribe);

        // Room and identity are required.
        assert!(Cli::try_parse_from(["ridge-dataplane", "token", "--room", "x"]).is_err());
        // Run flags do not mix with subcommands.
        assert!(
            Cli::try_parse_from([
                "ridge-dataplane",
                "--http",
                "127.0.0.1:1",
                "token",
                "--room",
                "r",
                "--identity",
                "i"
            ])
            .is_err()
        );
    }

    #[test]
    fn token_without_secret_is_config_error() {
        let cli = parse(&["token", "--room", "r", "--identity", "i", "--ttl", "5m"]);
        let Some(Command::Token(args)) = cli.command else {
            panic!()
        };
        let e = run_token(&args, None, now()).unwrap_err();
        assert!(matches!(e, CliError::Config(_)));
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("RIDGE_JWT_SECRET"), "{e}");

        let cli = parse(&["token", "--room", "", "--identity", "i"]);
        let Some(Command::Token(args)) = cli.command else {
            panic!()
        };
        let e = run_token(&args, Some(SECRET.into()), now()).unwrap_err();
        assert!(matches!(e, CliError::Auth(_)));
        assert!(!e.to_string().contains(SECRET));
    }

    #[test]
    fn check_config_subcommand() {
        let cli = parse(&["check-config", "--max-sessions", "0"]);
        let Some(Command::CheckConfig(args)) = cli.command else {
            panic!("expected check-config")
        };
        let e = run_check_config(&args, Some(SECRET.into())).unwrap_err();
        assert_eq!(e.exit_code(), EXIT_CONFIG);
        assert!(e.to_string().contains("max_sessions"), "{e}");

        let cli = parse(&["check-config", "--dev-no-auth"]);
        let Some(Command::CheckConfig(args)) = cli.command else {
            panic!()
        };
        assert!(run_check_config(&args, None).unwrap().dev_no_auth);
    }

    #[test]
    fn help_mentions_secret_env_and_danger() {
        let long = Cli::command().render_long_help().to_string();
        assert!(long.contains("RIDGE_JWT_SECRET"), "{long}");
        assert!(long.contains("DANGEROUS"), "{long}");
        let short = Cli::command().render_help().to_string();
        assert!(short.contains("RIDGE_JWT_SECRET"), "{short}");
    }
}
